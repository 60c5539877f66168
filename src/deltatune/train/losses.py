"""Causal-LM loss without the full fp32 logits (the "fused linear cross-entropy" of Liger-Kernel
and Unsloth, written in plain PyTorch).

The usual path builds logits of shape (B, T, V) in fp32, keeps their log-softmax for the backward
and then materialises their gradient: at V = 32k, B·T = 1k that is 3-4 tensors of 131 MB per step,
more memory than a small model's weights.  Here the final hidden states are projected a chunk of
rows at a time; each chunk's loss *and* its gradient are computed at once and only the gradient
w.r.t. the hidden states (B·T, D) is kept:

    h (N, D) ──► for each chunk c of rows with a label:
                   z_c = h_c Wᵀ (+ b)                       (c, V)  fp32, freed after the chunk
                   ℓ  += Σ_rows logsumexp(z_c) − z_c[label]
                   ∂ℓ/∂z_c = (softmax(z_c) − onehot(label)) / n      (in place in z_c)
                   ∂ℓ/∂h_c = ∂ℓ/∂z_c · W ;  ∂ℓ/∂W += ∂ℓ/∂z_cᵀ · h_c (only if W trains)
    loss = ℓ / n         (n = number of labelled tokens, or ``num_items_in_batch``)

Rows without a label (the last position of every sequence, padding, prompt tokens masked with
-100) are dropped before the projection, so they cost nothing.  The loss and gradients equal
``model(input_ids, labels=labels).loss`` within float rounding (tests/test_losses.py).  When the
head is not a plain linear layer (an adapter on ``lm_head``, a quantized head), each chunk is
instead recomputed under activation checkpointing: same memory bound, one extra head matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import DeltaError, get_state

# TrainConfig.label_smoothing's default, as timm's and Inception's (Szegedy et al. 2016) 0.1.  Measured
# (docs/cli.md): on SMS it halved LoRA's drift (0.276 -> 0.145) and cut full fine-tuning's
# (0.042 -> 0.034) at equal accuracy, and left LoRA's sentiment and MNIST accuracy as they were
LABEL_SMOOTHING = 0.1


_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum-reduced CE of ``h Wᵀ + b`` against ``labels`` divided by ``denom``; the gradient is
    computed chunk by chunk during the forward (no logits survive the call)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, denom, chunk):  # h (N, D), weight (V, D), labels (N,)
        need_h, need_w = h.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grads = need_h or need_w or need_b  # no backward will come: skip the gradient work
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # One (chunk, V) fp32 buffer serves every chunk: on CPU a fresh 32 MB tensor per chunk (and
        # logsumexp's own temporaries) costs more in page faults than the arithmetic on it.
        fp32 = h.dtype == torch.float32 and weight.dtype == torch.float32
        buf = h.new_empty((min(chunk, h.shape[0]), weight.shape[0]), dtype=torch.float32) if fp32 else None
        for s in range(0, h.shape[0], chunk):
            hc, lc = h[s:s + chunk], labels[s:s + chunk]  # (c, D), (c,)
            if fp32:
                z = buf[:hc.shape[0]]  # (c, V)
                torch.mm(hc, weight.t(), out=z) if bias is None else torch.addmm(bias, hc, weight.t(), out=z)
            else:
                z = F.linear(hc, weight, bias).float()  # (c, V)
            picked = z.gather(1, lc[:, None]).squeeze(1)  # (c,) logit of the label
            top = z.amax(dim=-1, keepdim=True)  # (c, 1); logsumexp by hand, in place in z
            g = z.sub_(top).exp_()  # (c, V) exp(z - max)
            norm = g.sum(dim=-1, keepdim=True)  # (c, 1)
            total += (top.squeeze(1) + norm.log().squeeze(1) - picked).sum()
            if not grads:
                continue
            g.div_(norm)  # softmax
            g[torch.arange(g.shape[0], device=g.device), lc] -= 1.0
            g = g.div_(denom).to(h.dtype)  # ∂loss/∂z (c, V)
            if need_h:
                torch.mm(g, weight, out=grad_h[s:s + chunk])
            if need_w:
                grad_w.addmm_(g.t(), hc)
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total / denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * go.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None


def _chunked_checkpointed(head: nn.Module, h, labels, denom, chunk):
    """Any head module: recompute each chunk's logits in the backward instead of keeping them."""
    from torch.utils.checkpoint import checkpoint

    def part(hc, lc):
        return F.cross_entropy(head(hc).float(), lc, reduction="sum")

    total = sum(checkpoint(part, h[s:s + chunk], labels[s:s + chunk], use_reentrant=False)
                for s in range(0, h.shape[0], chunk))
    return total / denom


def linear_cross_entropy(h: torch.Tensor, head: nn.Module, labels: torch.Tensor, *, chunk: int = 256,
                         ignore_index: int = -100, num_items_in_batch=None) -> torch.Tensor:
    """Mean cross-entropy of ``head(h)`` against ``labels`` without materialising all logits.

    ``h`` (..., D) and ``labels`` (...) are already aligned (no shift). ``head`` is an ``nn.Linear``
    (fused path) or any module mapping (c, D) -> (c, V) (checkpointed path)."""
    if chunk < 1:
        raise DeltaError(f"chunk must be a positive number of rows, got {chunk!r}")
    h = h.reshape(-1, h.shape[-1])  # (N, D)
    labels = labels.reshape(-1).to(h.device)  # (N,)
    keep = labels != ignore_index
    n = keep.sum()
    denom = (num_items_in_batch if num_items_in_batch is not None else n.clamp(min=1))
    denom = torch.as_tensor(denom, dtype=torch.float32, device=h.device)
    h, labels = h[keep], labels[keep]  # unlabelled rows never reach the head
    if type(head) is nn.Linear:
        return _FusedLinearCrossEntropy.apply(h, head.weight, head.bias, labels, denom, chunk)
    return _chunked_checkpointed(head, h, labels, denom, chunk)


def _mixed_rows(model: nn.Module) -> bool:
    try:
        return get_state(model).row_adapters is not None
    except DeltaError:  # no adapters attached
        return False


class _Capture(nn.Module):
    """Stands in for the output head during one forward: returns the final hidden states."""

    def forward(self, h):
        return h


def _head_slot(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        raise DeltaError(f"{type(model).__name__} has no output head (get_output_embeddings() is None); "
                         "chunked_causal_lm_loss needs a transformers *ForCausalLM model")
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is head:
                return parent, attr, head
    raise DeltaError(f"cannot find the output head of {type(model).__name__} among its submodules")


def chunked_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor | None = None,
                           labels: torch.Tensor | None = None, *, chunk: int = 256, ignore_index: int = -100,
                           num_items_in_batch=None, **model_kwargs) -> torch.Tensor:
    """``model(input_ids, labels=labels).loss`` for a transformers causal LM, computed from the final
    hidden states in chunks of ``chunk`` rows, so the (B, T, V) fp32 logits never exist.

    Labels follow transformers' convention (not shifted; -100 = ignored); extra keyword arguments
    (``attention_mask``, ...) go to the model.  Models that post-process logits (soft-capping,
    logit scales) fall back to the model's own loss.

    >>> loss = dt.chunked_causal_lm_loss(model, batch["input_ids"], batch["labels"]); loss.backward()
    """
    if labels is None:
        raise DeltaError("chunked_causal_lm_loss needs labels (use input_ids for plain language modelling)")
    inner = getattr(model, "module", model)  # DDP: swap the head inside, call the wrapper (grad sync)
    cfg = getattr(inner, "config", None)
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_POSTPROCESSING):
        return model(input_ids=input_ids, labels=labels, **model_kwargs).loss
    parent, attr, head = _head_slot(inner)
    # a loss needs no KV cache: building one per layer costs memory and, under compile_blocks,
    # a recompile per layer (the cache's per-layer state is guarded)
    model_kwargs.setdefault("use_cache", False)
    parent._modules[attr] = _Capture()
    try:
        h = model(input_ids=input_ids, **model_kwargs).logits  # (B, T', D): the head's input
    finally:
        parent._modules[attr] = head
    if h.shape[-1] != getattr(head, "in_features", h.shape[-1]) or h.dim() != 3:
        raise DeltaError(f"{type(model).__name__} post-processes its hidden states before the head; "
                         "use model(input_ids, labels=labels).loss instead")
    t = labels.shape[-1]
    if h.shape[1] > t:  # prompt tuning prepended P virtual tokens: label them -100, as the model does
        if _mixed_rows(inner):  # rows of a mixed batch have their own P: the model knows which labels count
            return model(input_ids=input_ids, labels=labels, **model_kwargs).loss
        labels = F.pad(labels, (h.shape[1] - t, 0), value=ignore_index)  # (B, P+T); the last virtual
        # position predicts the first real token, exactly as model(..., labels=labels).loss
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # token t predicts t+1
    return linear_cross_entropy(h, head, shifted, chunk=chunk, ignore_index=ignore_index,
                                num_items_in_batch=num_items_in_batch)


def causal_lm_batch_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """A Trainer ``loss_fn`` for causal-LM batches (``input_ids``, ``labels``, ``attention_mask``,
    ...): :func:`chunked_causal_lm_loss`, the same loss as ``model(**batch).loss``."""
    inner = getattr(model, "module", model)
    get = getattr(inner, "get_output_embeddings", None)
    if get is None or get() is None or "labels" not in batch:  # not a transformers head: the model's loss
        return model(**batch).loss
    rest = dict(batch)
    labels, ids = rest.pop("labels"), rest.pop("input_ids", None)
    return chunked_causal_lm_loss(model, ids, labels, **rest)


def default_loss(model: nn.Module, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    """The model's own loss; with ``label_smoothing`` > 0 and a single-label classification batch
    (logits (B, C), integer labels (B,)) the cross-entropy against smoothed targets instead
    (Szegedy et al. 2016): a row already classified with margin stops pulling on the weights, so a
    task learnt early does not keep moving the features (TrainConfig.label_smoothing)."""
    out = model(**batch)
    labels, logits = batch.get("labels"), getattr(out, "logits", None)
    if (label_smoothing > 0 and logits is not None and labels is not None and logits.dim() == 2
            and labels.dim() == 1 and not labels.is_floating_point() and logits.shape[-1] > 1):
        return F.cross_entropy(logits.float(), labels.to(logits.device), label_smoothing=label_smoothing)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        raise DeltaError(f"{type(model).__name__} returned no loss for a batch with keys {sorted(batch)}; "
                         "pass loss_fn=... to Trainer")
    return loss
