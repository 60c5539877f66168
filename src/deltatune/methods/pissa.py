"""PiSSA (Meng, Wang & Zhang 2024, "PiSSA: Principal Singular values and Singular vectors
Adaptation", arXiv:2404.02948) as a LoRA *variant* (``lora_variant.py``), chosen by
``LoraConfig(init="pissa")``.

    W = U S Vᵀ                       (SVD of the frozen weight, out×in)
    B₀ = U[:, :r] √S_r / √s          (out, r)      A₀ = √S_r Vᵀ[:r] / √s      (r, in)
    y = W x + s (B A − B₀ A₀) x      A, B start at A₀, B₀ and train; A₀, B₀ stay frozen

The paper starts A, B at the top-r singular triplets and trains on the *residual* base
W − s B₀A₀.  Rewriting the frozen W would make the base one adapter's private copy, so instead
the initial product is subtracted as an extra low-rank term (``terms``): the base stays shared by
every adapter, the output is unchanged at init, and the file is saved as a plain LoRA of rank 2r,
s(BA − B₀A₀) = s'[B, −B₀][A; A₀] (``export``), which peft loads as an ordinary LoRA.  A₀, B₀ are
non-persistent buffers of the delta: they follow ``model.to()`` and are never in a state dict.

Linear layers only (nn.Linear, GPT-2's Conv1D, quantized linears through ``base_weight``): an SVD
of a convolution kernel or an embedding table is not the paper's method.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..core.delta import iter_delta_layers
from .lora_variant import LoraVariant


class PissaVariant(LoraVariant):
    name = "pissa"
    init_option = "pissa"
    layers = ("linear",)
    refusal = "lora: init='pissa' supports linear layers only"
    adds_terms = True

    @staticmethod
    def chosen(cfg) -> bool:
        return cfg.init == PissaVariant.init_option

    def init(self, delta, base: nn.Module) -> None:
        with torch.no_grad():
            w = delta._w(base).float()  # (out, in), whatever layout the base stores
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r = delta.r
            root = s[:r].sqrt() / math.sqrt(delta.scaling)  # split √S between A and B, undo s
            delta.lora_A.weight.copy_(root[:, None] * vh[:r])  # (r, in)
            delta.lora_B.weight.copy_(u[:, :r] * root[None])  # (out, r)
        delta.register_buffer("A0", delta.lora_A.weight.detach().clone(), persistent=False)  # (r, in)
        delta.register_buffer("B0", delta.lora_B.weight.detach().clone(), persistent=False)  # (out, r)

    def terms(self, delta):
        return [(-delta.B0, delta.A0)]  # − B₀A₀: the output is unchanged at init

    @classmethod
    def export(cls, model, name, tensors, cfg):
        # PiSSA → plain LoRA of rank 2r: s(BA − B₀A₀) = s'[B, −B₀][A; A₀] with s' = s
        k = 2.0 if not cfg.rslora else math.sqrt(2.0)
        for path, layer in iter_delta_layers(model):
            d = layer.deltas[name] if name in layer.deltas else None
            if d is not None and any(isinstance(v, cls) for v in getattr(d, "variants", ())):
                tensors[f"{path}.lora_A.weight"] = torch.cat([d.lora_A.weight.detach(), d.A0], 0)
                tensors[f"{path}.lora_B.weight"] = torch.cat([d.lora_B.weight.detach(), -d.B0], 1)
        cfg = replace(cfg, init="default", r=2 * cfg.r, alpha=cfg.alpha * k,
                      rank_pattern={kk: 2 * v for kk, v in cfg.rank_pattern.items()},
                      alpha_pattern={kk: v * k for kk, v in cfg.alpha_pattern.items()})
        return tensors, cfg
