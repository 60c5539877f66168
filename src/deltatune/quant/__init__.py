"""Quantized base layers (NF4, int8, GGUF-loaded) that deltas wrap like any linear layer.

``deltatune.quant`` is a documented path (``deltatune.quant.merge``, ``lossy_merge``...), so the
names of ``quant/layers.py`` (the quantized layer classes, ``quantize``, ``merge``) are re-exported
here; loading is ``quant/load.py``, scale search ``quant/search.py``, calibration while streaming
``quant/sequential.py``.
"""
from .load import load_quantized
from .layers import *  # noqa: F401,F403
from .layers import __all__ as _layers_all

__all__ = [*_layers_all, "load_quantized"]
