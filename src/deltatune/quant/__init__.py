"""Quantized base layers (NF4, int8, GGUF-loaded) that deltas wrap like any linear layer.

``deltatune.quant`` is a documented path (``deltatune.quant.merge``, ``lossy_merge``...), so the
names of ``quant/quantize.py`` are re-exported here; loading is ``quant/load.py``, scale search
``quant/search.py``.
"""
from .load import load_quantized
from .quantize import *  # noqa: F401,F403
from .quantize import __all__ as _quantize_all

__all__ = [*_quantize_all, "load_quantized"]
