"""Speed/memory switches for training deltas on a frozen base.  Each one keeps the loss
and gradients of the plain computation (tests/test_fast.py); bench/run.py --ablation measures them.

* :func:`enable_checkpointing` — activation checkpointing per transformer block that cooperates
  with adapters: non-reentrant checkpointing, so blocks whose inputs do not require grad (a frozen
  embedding) still back-propagate into the adapter parameters inside them, with no
  ``enable_input_require_grads`` hack.  Trades one extra forward per block for activation memory.
* :func:`compile_blocks` — regional ``torch.compile`` of each transformer block (inductor fuses
  the frozen base's element-wise ops: RMSNorm, rotary, SiLU·gate); compiles one block, reuses it.
* :func:`compile_step` — ``torch.compile`` of a whole forward+backward closure (slow to compile).
* The chunked loss lives in :mod:`deltatune.train.losses`; the LoRA layer's own fast path (one fused
  ``addmm``, no dropout copy at p = 0) in :mod:`deltatune.methods.lora`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .core.delta import DeltaError


def enable_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each transformer block's activations in the backward instead of storing them."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise DeltaError(f"{type(model).__name__} does not support gradient checkpointing; wrap its blocks "
                         "with torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself")
    # transformers renamed the switch (activation_checkpointing_enable; the old name now warns):
    # take whichever this release has, newest first
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def disable_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_checkpointing` (the same rename applies)."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    return model


def compile_step(fn: Callable, **compile_kwargs) -> Callable:
    """``torch.compile`` for a training closure (forward + ``backward()``); dynamic shapes off by
    default because a training run repeats one batch shape.  The first call compiles."""
    compile_kwargs.setdefault("dynamic", False)
    return torch.compile(fn, **compile_kwargs)


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of identical blocks (transformer layers): the ``nn.ModuleList`` of one
    block class holding the most parameters, or None."""
    best, size = None, -1
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = m, n
    return best


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation: ``torch.compile`` each repeated block in place instead of the whole
    step.  The blocks share one class and shapes, so dynamo traces one and reuses its code for the
    rest (parameters are graph inputs): compile time is one block's, not the model's (≈30 s for
    the 42 M Llama here vs ≈400 s for the whole step), and inductor still fuses the element-wise
    work inside (RMSNorm, rotary, SiLU·gate, the LoRA adds).  Attach adapters first; switching
    adapters afterwards triggers one recompile."""
    blocks = repeated_blocks(model)
    if blocks is None:
        raise DeltaError(f"{type(model).__name__} has no stack of repeated blocks (an nn.ModuleList of one "
                         "class); use compile_step(...) or torch.compile(model) instead")
    compile_kwargs.setdefault("dynamic", False)
    for block in blocks:
        block.compile(**compile_kwargs)
    return model


class _LoraDropoutBranch(torch.autograd.Function):
    """y + s · ((x ⊙ keep / (1−p)) Aᵀ) Bᵀ for LoRA with dropout p > 0.

    Plain autograd keeps the dropped-out fp32 copy of x for A's gradient; this keeps only x
    (which the rest of the block holds anyway) and the 1-byte mask, and rebuilds the copy in the
    backward: one (N, in) fp32 tensor less per adapted layer."""

    @staticmethod
    def forward(ctx, x, y, a, b, scaling, p):  # x (N, in), y (N, out), a (r, in), b (out, r)
        keep = torch.rand_like(x) >= p  # (N, in) bool
        h = (x * keep / (1 - p)) @ a.t()  # (N, r); the dropped copy is freed right here
        ctx.save_for_backward(x, keep, h, a, b)
        ctx.scaling, ctx.p = scaling, p
        return torch.addmm(y, h, b.t(), alpha=scaling)  # (N, out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):  # go (N, out)
        x, keep, h, a, b = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        gh = (go @ b) * s  # (N, r)
        ga = gh.t() @ (x * keep / (1 - p)) if ctx.needs_input_grad[2] else None  # (r, in)
        gb = (go.t() @ h) * s if ctx.needs_input_grad[3] else None  # (out, r)
        gx = (gh @ a) * keep / (1 - p) if ctx.needs_input_grad[0] else None  # (N, in)
        return gx, go, ga, gb, None, None


def lora_dropout_addmm(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                       p: float) -> torch.Tensor:
    """LoRA branch with inverted dropout on its input, added to the base output ``y``.
    x (..., in), y (..., out) -> (..., out)."""
    out = _LoraDropoutBranch.apply(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), a, b, scaling, p)
    return out.view(y.shape)


class _DoraLinearBranch(torch.autograd.Function):
    """DoRA on a linear layer without dropout: out = c ⊙ (y₀ + s·(x Aᵀ) Bᵀ) + bias, c = m / ‖W + sBA‖.

    y = W x + bias comes from the frozen base; the norm arrives detached (DoRA paper §4.3).  Plain
    autograd keeps the scaled LoRA output, the base output and two products of them — four
    (N, out) tensors per layer; this keeps one, u = (W + sBA) x (needed for m's gradient), plus
    the (N, r) projection h."""

    @staticmethod
    def forward(ctx, x, y, bias, a, b, mag, norm, scaling):  # x (N, in), y (N, out), a (r, in), b (out, r)
        h = x @ a.t()  # (N, r)
        y0 = y if bias is None else y - bias
        u = torch.addmm(y0, h, b.t(), alpha=scaling)  # (N, out) = (W + sBA) x
        c = mag / norm  # (out,)
        ctx.save_for_backward(x, h, u, a, b, c, norm)
        ctx.scaling = scaling
        return u * c if bias is None else torch.addcmul(bias, u, c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):  # go (N, out)
        x, h, u, a, b, c, norm = ctx.saved_tensors
        s = ctx.scaling
        gu = go * c  # (N, out) = ∂out/∂u ⊙ go; also the gradient of y
        gmag = (go * u).sum(0) / norm if ctx.needs_input_grad[5] else None  # (out,)
        gh = (gu @ b) * s  # (N, r)
        ga = gh.t() @ x if ctx.needs_input_grad[3] else None  # (r, in)
        gb = (gu.t() @ h) * s if ctx.needs_input_grad[4] else None  # (out, r)
        gx = gh @ a if ctx.needs_input_grad[0] else None  # (N, in)
        return gx, gu, None, ga, gb, gmag, None, None


def dora_linear(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                mag: torch.Tensor, norm: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA output of a linear layer from its base output ``y`` (bias included).
    x (..., in), y (..., out), a (r, in), b (out, r), mag / norm (out,) -> (..., out)."""
    out = _DoraLinearBranch.apply(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), bias, a, b, mag,
                                  norm, scaling)
    return out.view(y.shape)
