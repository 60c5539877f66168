"""The core every method builds on (``core/delta.py``): the wrapper around a frozen base layer,
the delta, the per-model state and the method registry; plus dtypes and target selection.

``deltatune.core`` is a documented path, so the names of ``core/delta.py`` are re-exported here.
"""
from .delta import (METHODS, PREFIX, STATE_ATTR, AdapterRecord, CopyDelta, Delta, DeltaConfig, DeltaError,
                    DeltaLayer, DeltaState, Method, base_weight, cast_adapter_dtype, clean_path, get_state,
                    get_submodule_clean, has_adapters, iter_base_modules, iter_delta_layers, merged_names,
                    method_of, register, set_base_weight, unwrap, wrap)

__all__ = ["METHODS", "PREFIX", "STATE_ATTR", "AdapterRecord", "CopyDelta", "Delta", "DeltaConfig", "DeltaError",
           "DeltaLayer", "DeltaState", "Method", "base_weight", "cast_adapter_dtype", "clean_path", "get_state",
           "get_submodule_clean", "has_adapters", "iter_base_modules", "iter_delta_layers", "merged_names",
           "method_of", "register", "set_base_weight", "unwrap", "wrap"]
