"""deltatune: parameter-efficient fine-tuning of PyTorch models.

    import deltatune as dt
    model = dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    dt.save(model, "out/adapter");  model = dt.load(base_model, "out/adapter")
"""
__version__ = "0.1.0"

from . import methods as _methods  # noqa: F401  (fills METHODS)
from .api import (ParamCount, activate, active_adapters, adapter_tensors, adapters, attach, delete, disabled,
                  make_config, merge, trainable_parameters, unmerge)
from .core import METHODS, Delta, DeltaConfig, DeltaError, DeltaLayer, Method, register
from .io import load, save
from .methods.lora import LoraConfig, lora_plus_groups
from .targets import find_targets

__all__ = [
    "METHODS", "Delta", "DeltaConfig", "DeltaError", "DeltaLayer", "LoraConfig", "Method", "ParamCount",
    "activate", "active_adapters", "adapter_tensors", "adapters", "attach", "delete", "disabled",
    "find_targets", "load", "lora_plus_groups", "make_config", "merge", "register", "save",
    "trainable_parameters", "unmerge",
]
from .mixed import generate_mixed, mixed; from .arithmetic import combine; from .hotswap import hot_swap  # noqa: E402,E702 (issue 6)
from .importance import (adalora_hook, adalora_orth_penalty, adalora_ranks, adalora_report,  # noqa: E402,F401
                         adalora_to_lora, importance, magnitude_prune, select_sparse, truncate_lora)  # (issue 4)
from .losses import chunked_causal_lm_loss, linear_cross_entropy  # noqa: E402,F401  (issue 9: loss without full logits)
from .quant import load_quantized, quantize  # noqa: E402,F401  (issue 8: quantized bases)
from . import safety  # noqa: E402,F401  (issue 7: dt.safety.atomic_dir / check_finite / NanGuard / safe_join)
