"""Which layers count as linear, in one place: ``nn.Linear``, transformers' GPT-2 ``Conv1D``
(weight stored (in, out), the transpose of ``nn.Linear``'s) and the quantized linears.

``deltatune.quant`` appends its classes to ``QUANT_LINEAR_TYPES`` on import; targeting and the
LoRA family treat them as linear layers and reach their weights only through
``core.base_weight`` / ``core.set_base_weight``, so no method branches on the quantization backend.
"""
from __future__ import annotations

from torch import nn

QUANT_LINEAR_TYPES: list[type] = []


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` (GPT-2 and relatives), or None when transformers is not installed
    (it is optional for the library)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or broken: no Conv1D layers can exist either
        return None
    return Conv1D


def is_conv1d(mod: nn.Module) -> bool:
    """Whether ``mod`` stores its weight (in, out) like GPT-2's Conv1D; matched by class name along
    the MRO, so the quantized Conv1D variants (``NF4Conv1D``) and look-alike classes count too."""
    return any(c.__name__ == "Conv1D" for c in type(mod).__mro__)


def linear_types() -> tuple[type, ...]:
    """nn.Linear, transformers' GPT-2 Conv1D and quantized linears (anything with in/out_features)."""
    conv1d = conv1d_type()
    return (nn.Linear, *([conv1d] if conv1d is not None else []), *QUANT_LINEAR_TYPES)
