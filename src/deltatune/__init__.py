"""deltatune: parameter-efficient fine-tuning of PyTorch models.

    import deltatune as dt
    model = dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    dt.save(model, "out/adapter");  model = dt.load(base_model, "out/adapter")
"""
from ._version import __version__

from . import methods as _methods  # noqa: F401  (fills METHODS)
from . import safety  # noqa: F401  (dt.safety.atomic_dir / check_finite / NanGuard / safe_join)
from .api import (ParamCount, activate, active_adapters, adapter_tensors, adapters, attach, delete, disabled,
                  make_config, merge, trainable_parameters, unmerge)
from .ops.arithmetic import combine
from .core.delta import Delta, DeltaConfig, DeltaError, DeltaLayer
from .core.method import METHODS, Method, register
from .ops.hotswap import hot_swap
from .ops.importance import importance
from .storage.adapter import load, save
from .train.losses import chunked_causal_lm_loss, linear_cross_entropy
from .methods.adalora import adalora_hook, adalora_ranks
from .methods.adalora import orth_penalty as adalora_orth_penalty
from .ops.adalora_convert import adalora_to_lora
from .ops.adalora_convert import rank_report as adalora_report
from .methods.lora import LoraConfig, lora_plus_groups
from .methods.sparse import select_sparse
from .mixed import generate_mixed, mixed
from .ops.prune import magnitude_prune, truncate_lora
from .quant.load import load_quantized
from .quant.layers import quantize
from .core.targets import find_targets

__all__ = [
    "METHODS", "Delta", "DeltaConfig", "DeltaError", "DeltaLayer", "LoraConfig", "Method", "ParamCount",
    "activate", "active_adapters", "adalora_hook", "adalora_orth_penalty", "adalora_ranks", "adalora_report",
    "adalora_to_lora", "adapter_tensors", "adapters", "attach", "chunked_causal_lm_loss", "combine", "delete",
    "disabled", "find_targets", "generate_mixed", "hot_swap", "importance", "linear_cross_entropy", "load",
    "load_quantized", "lora_plus_groups", "magnitude_prune", "make_config", "merge", "mixed", "quantize",
    "register", "safety", "save", "select_sparse", "trainable_parameters", "truncate_lora", "unmerge",
]
