"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353) as a
LoRA *variant*: one small object saying what DoRA changes in a LoRA delta (init, forward, merge,
unmerge), like peft's ``LoraVariant``, instead of ``if use_dora`` branches in every layer type.

    W' = m ⊙ (W + sBA) / ‖W + sBA‖_c          m (out,): per-output-channel magnitude, trained
    y  = m / ‖W + sBA‖_c ⊙ (W x + sBA x) + b   the norm is detached (paper §4.3)

The variant reaches the layer only through the delta's layout hooks, so one class serves Linear,
GPT-2 Conv1D, quantized linears and convolutions: ``_w`` / ``_set_w`` (W as (out, in, ...)),
``_norm`` (per output channel), ``_channel`` (a (out,) vector broadcast over y),
``_magnitude_layout`` (peft's shape for m), ``branch`` (s·BAx, other variants' terms included:
DoRA on a PiSSA init), ``base_no_bias`` and ``delta_weight``.  The protocol is ``lora_variant.py``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..fast import dora_linear
from .lora_variant import LoraVariant


class Magnitude(nn.Module):
    """DoRA's per-output-channel magnitude m, shape (out,). A module so the key is peft's."""

    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(m)


def magnitude(delta) -> torch.Tensor:
    return delta.lora_magnitude_vector.weight.reshape(-1)  # (out,), whatever peft's stored shape


class DoraVariant(LoraVariant):
    """DoRA on LoRA's linear and conv layers; stateless (a merge's norm is kept on the delta it belongs to)."""

    name = "dora"
    layers = ("linear", "conv")
    refusal = ("lora: dora=True is not supported on nn.Embedding; exclude the embedding from targets or use "
               "plain LoRA")
    owns_forward = True  # DoRA renormalises W, so its output is not y + something independent of y

    @staticmethod
    def chosen(cfg) -> bool:
        return cfg.dora

    @classmethod
    def variant_for(cls, delta) -> "DoraVariant":
        v = super().variant_for(delta)
        return LinearDoraVariant() if delta.kind == "linear" else v

    def init(self, delta, base) -> None:
        # m starts at ‖W + ΔW‖_c, so the adapted layer's output is unchanged at init
        with torch.no_grad():
            w = delta._w(base).float()
            norm = delta._norm(w + delta.delta_weight(base).float())
        delta.lora_magnitude_vector = Magnitude(delta._magnitude_layout(norm.to(delta.lora_B_dtype()), base))

    def forward(self, delta, x, y, base):
        # y' = m/‖W+sBA‖ ⊙ (W x_d + sBA x_d) + b ; the norm is detached (paper §4.3)
        xd = delta.dropout(x)
        lora = delta.branch(xd)
        m = magnitude(delta)
        w = delta._w(base).to(m.dtype)  # the norm in the adapter's dtype (fp32 on a half base)
        with torch.no_grad():  # detached: no graph, no saved (out, in) copy for a gradient never taken
            norm = delta._norm(w + delta.delta_weight(base).to(w.dtype))
        scale = delta._channel(m / norm, y)
        if isinstance(delta.dropout, nn.Identity):  # W x is y minus the bias: no second matmul
            bias = getattr(base, "bias", None)
            base_out = y - delta._channel(bias, y) if bias is not None else y
        else:  # dropout: W must see the same dropped-out x_d as the branch
            base_out = delta.base_no_bias(base, xd)
        return y + (scale - 1) * base_out + scale * lora  # in the adapter's dtype; Delta.run casts back

    # merges are not additive: W' = m ⊙ (W+ΔW)/‖W+ΔW‖; the norm is remembered to undo it exactly
    def merge(self, delta, base) -> None:
        m = magnitude(delta)
        w = delta._w(base)
        w = w.to(torch.promote_types(w.dtype, m.dtype))  # round once, when set_base_weight casts
        wd = w + delta.delta_weight(base).to(w.dtype)
        norm = delta._norm(wd)
        delta._merged_norm = norm
        scale = (m / norm).view(-1, *[1] * (w.dim() - 1))
        delta._set_w(base, wd * scale)

    def unmerge(self, delta, base) -> None:
        m = magnitude(delta)
        w = delta._w(base)
        w = w.to(torch.promote_types(w.dtype, m.dtype))
        scale = (m / delta._merged_norm).view(-1, *[1] * (w.dim() - 1))
        delta._set_w(base, w / scale - delta.delta_weight(base).to(w.dtype))
        del delta._merged_norm


class LinearDoraVariant(DoraVariant):
    """DoRA on linear layers: a fused kernel when nothing else changes the product."""

    def forward(self, delta, x, y, base):
        a, b = delta.lora_A.weight, delta.lora_B.weight
        if (not delta.plain_product or not x.dtype == y.dtype == a.dtype
                or not (isinstance(delta.dropout, nn.Identity) or not delta.training)):
            return super().forward(delta, x, y, base)
        w = delta._w(base)
        with torch.no_grad():  # ‖W + sBA‖ per output row, detached (DoRA paper §4.3)
            norm = torch.addmm(w.to(a.dtype), b, a, alpha=delta.scaling).norm(dim=1)  # (out,)
        bias = getattr(base, "bias", None)
        # fused kernel: keeps one (N, out) tensor per layer instead of four
        return dora_linear(x, y, None if bias is None else bias.to(y.dtype), a, b, magnitude(delta), norm,
                           delta.scaling)
