"""Dtypes of adapters on half-precision bases: one rule for every method, peft's
``autocast_adapter_dtype``.

    base fp16/bf16 ──► adapter tensors float32 (default)   │ autocast_adapter_dtype=False:
    any other base ──► adapter tensors in the base's dtype │ always the base's dtype

Why float32: Adam's eps (1e-8) underflows to 0 in fp16, so a zero gradient gives 0/0 = NaN after
one step; bf16 keeps 8 mantissa bits, so a 1e-4 step of a value near 1 is rounded away.  The rule is
applied once at attach (``core.cast_adapter_dtype``), and at run time by ``Delta.run`` (the input
reaches a delta in its dtype, the result leaves in the base output's dtype) — never per method.
"""
from __future__ import annotations

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_dtype(base_dtype: torch.dtype, autocast: bool = True) -> torch.dtype:
    """dtype of an adapter's tensors on a base computing in ``base_dtype``."""
    return torch.float32 if autocast and base_dtype in HALF_DTYPES else base_dtype


def module_dtype(mod: nn.Module) -> torch.dtype:
    """The dtype a module computes in: a quantized base's ``compute_dtype``, else its first floating
    parameter or buffer (float32 for a module that has none)."""
    d = getattr(mod, "compute_dtype", None)
    if isinstance(d, torch.dtype):
        return d
    for t in (*mod.parameters(), *mod.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def build_dtype(base: nn.Module) -> torch.dtype:
    """The dtype methods build a new adapter's tensors in: float32 on a half base, so the init is
    exact; ``cast_adapter_dtype`` then rounds it once when ``autocast_adapter_dtype=False``."""
    return adapter_dtype(module_dtype(base))


def cast_tensors(tensors, dtype: torch.dtype) -> None:
    """Cast floating tensors in place (``.data``, so Parameter identity and optimizer refs survive)."""
    for t in tensors:
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)


def cast_like(y, dtype: torch.dtype | None):
    """``y`` (a tensor, or a tuple whose first item is the hidden state) in ``dtype``."""
    if dtype is None:
        return y
    if isinstance(y, torch.Tensor):
        return y.to(dtype) if y.is_floating_point() and y.dtype != dtype else y
    if isinstance(y, tuple) and y and isinstance(y[0], torch.Tensor):
        return (cast_like(y[0], dtype), *y[1:])
    return y
