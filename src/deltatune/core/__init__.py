"""The core every method builds on: the wrapper around a frozen base layer, the delta and the
per-model state (``delta.py``), the method protocol and registry (``method.py``); plus dtypes,
target selection, adapter tensors, mixed-batch rows and gradient statistics.

``deltatune.core`` is a documented path, so the names of ``delta.py`` and ``method.py`` are
re-exported here.
"""
from .delta import (PREFIX, STATE_ATTR, AdapterRecord, CopyDelta, Delta, DeltaConfig, DeltaError, DeltaLayer,
                    DeltaState, base_weight, clean_path, get_state, get_submodule_clean, has_adapters,
                    iter_base_modules, iter_delta_layers, merged_names, set_base_weight, unwrap, wrap)
from .method import METHODS, Method, cast_adapter_dtype, method_of, register

__all__ = ["METHODS", "PREFIX", "STATE_ATTR", "AdapterRecord", "CopyDelta", "Delta", "DeltaConfig", "DeltaError",
           "DeltaLayer", "DeltaState", "Method", "base_weight", "cast_adapter_dtype", "clean_path", "get_state",
           "get_submodule_clean", "has_adapters", "iter_base_modules", "iter_delta_layers", "merged_names",
           "method_of", "register", "set_base_weight", "unwrap", "wrap"]
