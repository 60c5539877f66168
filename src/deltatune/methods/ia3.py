"""IA3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv:2205.05638).

Learned vectors rescale the keys, the values and the FFN's inner activation:

    k' = l_k ⊙ (W_k x)          v' = l_v ⊙ (W_v x)          (output scaling, "targets")
    h' = W_down (l_ff ⊙ γ(W_up x))                           (input scaling, "feedforward")

All vectors start at 1, so the output is unchanged at init.  Both kinds merge exactly into the
weight: output scaling multiplies W's rows (and the bias), input scaling W's columns.  On a
convolution the vectors scale channels (out-channels, or in-channels for ``feedforward``).

Files are peft's: one tensor ``<path>.ia3_l`` per layer, shaped as peft shapes it (Linear and
GPT-2 Conv1D: (out, 1) or (1, in) for feedforward; Conv: (1, C, 1, 1)), and an
``adapter_config.json`` with ``peft_type: "IA3"``, ``target_modules`` and ``feedforward_modules``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.delta import (CopyDelta, Delta, DeltaConfig, DeltaError, base_weight, iter_base_modules, iter_delta_layers,
                          set_base_weight, wrap)
from ..core.method import Method, register
from ..core.dtypes import build_dtype
from ..core.layer_types import is_conv1d, linear_types
from ..core.targets import matches
from ..core.adapters import base_at

# peft's defaults per architecture family: (targets, feedforward); the first family whose
# targets all exist in the model wins.  (Llama/Mistral/Qwen, GPT-2, BERT/RoBERTa, OPT/CLIP/ViT.)
DEFAULTS: list[tuple[list[str], list[str]]] = [
    (["k_proj", "v_proj", "down_proj"], ["down_proj"]),  # Llama, Mistral, Qwen, Gemma, OLMo, ...
    (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # GPT-2, GPT-BigCode
    (["key", "value", "output.dense"], ["output.dense"]),  # BERT, RoBERTa, ViT, ELECTRA
    (["k_proj", "v_proj", "fc2"], ["fc2"]),  # OPT, Bart, Whisper, CLIP, transformers 5's ViT
    (["qkv_proj", "down_proj"], ["down_proj"]),  # Phi-3 (fused q/k/v)
    (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),  # GPT-NeoX, Bloom, Falcon (fused)
    (["k", "v", "wo"], ["wo"]),  # T5, mT5
    (["key_proj", "value_proj", "output.dense"], ["output.dense"]),  # DeBERTa-v2/v3
    (["k_lin", "v_lin", "lin2"], ["lin2"]),  # DistilBERT
    (["k_proj", "v_proj", "w2"], ["w2"]),  # Mixtral with per-expert linears
    (["k_proj", "v_proj"], []),  # MoE models whose experts are fused parameters: keys/values only
]
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class IA3Config(DeltaConfig):
    feedforward: list[str] | str | None = None  # targets whose *input* is scaled (the paper's l_ff);
    # None: the architecture's FFN down projection (peft's feedforward_modules), same pattern syntax

    method = "ia3"


class IA3Delta(Delta):
    """One learned vector ``ia3_l`` scaling a layer's output (or, feedforward, its input)."""

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        self.feedforward = feedforward
        w = base_weight(base)
        if isinstance(base, CONV_TYPES):
            n = base.in_channels if feedforward else base.out_channels
            shape = (1, n, *[1] * (w.dim() - 2))  # (1, C, 1, 1): broadcasts over (B, C, H, W)
        else:
            in_f, out_f = (w.shape[0], w.shape[1]) if is_conv1d(base) else (w.shape[1], w.shape[0])
            shape = (1, in_f) if feedforward else (out_f, 1)  # peft's layout
        dtype = build_dtype(base)
        self.conv = isinstance(base, CONV_TYPES)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype))

    @property
    def transforms_input(self) -> bool:  # feedforward vectors scale x: merged last (see _compose.py)
        return self.feedforward

    def _vec(self) -> torch.Tensor:
        return self.ia3_l if self.conv else self.ia3_l.flatten()  # conv (1,C,1..), linear (n,)

    def pre(self, x):
        if self.feedforward:
            return (x * self._vec()).to(x.dtype)
        return None

    def forward(self, x, y, base):
        if self.feedforward:
            return y  # the input was scaled in pre()
        return (y * self._vec()).to(y.dtype)

    # merge: W' = W · diag(l) (feedforward, columns) or diag(l) · W, b' = l ⊙ b (output, rows)
    def _weight_scale(self, base, w: torch.Tensor) -> torch.Tensor:
        v = self.ia3_l.detach().flatten().to(w.dtype)
        if not self.conv:
            rows = not self.feedforward  # Linear (out, in): output scales rows
            if is_conv1d(base):
                rows = not rows  # Conv1D stores (in, out)
            return v[:, None] if rows else v[None, :]
        k = [1] * (w.dim() - 2)
        if not self.feedforward:
            return v.view(-1, 1, *k)  # (out, 1, 1, 1)
        # input channel of W[o, j] is group(o) * (in/g) + j  (groups=1: just j)
        out_c, in_g = w.shape[0], w.shape[1]
        g = base.groups
        idx = (torch.arange(out_c) // (out_c // g))[:, None] * in_g + torch.arange(in_g)[None, :]
        return v[idx].view(out_c, in_g, *k)

    def merge(self, base):
        w = base_weight(base)
        s = self._weight_scale(base, w)
        if s.abs().min() < 1e-6:  # dividing back would not be exact: keep the originals
            # on this delta, not the model (core/model_state.py): only its own unmerge reads it
            self._orig = (w.clone(), None if base.bias is None else base.bias.detach().clone())
        set_base_weight(base, w * s)
        if not self.feedforward and getattr(base, "bias", None) is not None:
            base.bias.data *= self.ia3_l.detach().flatten().to(base.bias.dtype)

    def unmerge(self, base):
        orig = self.__dict__.pop("_orig", None)
        if orig is not None:
            set_base_weight(base, orig[0])
            if orig[1] is not None:
                base.bias.data.copy_(orig[1])
            return
        w = base_weight(base)
        set_base_weight(base, w / self._weight_scale(base, w))
        if not self.feedforward and getattr(base, "bias", None) is not None:
            base.bias.data /= self.ia3_l.detach().flatten().to(base.bias.dtype)


def _layer_types() -> tuple[type, ...]:
    return (*linear_types(), *CONV_TYPES)


def family(model: nn.Module) -> tuple[list[str], list[str]]:
    """(targets, feedforward) of the model's architecture family (``DEFAULTS``), or every 2-d
    convolution of a CNN (its output channels scaled, depthwise too)."""
    leaves = [p for p, _ in iter_base_modules(model) if p]
    fam = next(((t, f) for t, f in DEFAULTS if all(any(matches(p, [n]) for p in leaves) for n in t)), None)
    convs = [p for p, m in iter_base_modules(model) if p and isinstance(m, nn.Conv2d)]
    if fam is None and convs:
        fam = (convs, [])
    if fam is None:
        raise DeltaError(f"ia3: no default targets for {type(model).__name__}; pass targets=[...] "
                         "(and feedforward=[...] for the layers whose input should be scaled)")
    return fam


def feedforward_paths(model: nn.Module, cfg: IA3Config, paths: list[str]) -> list[str]:
    """Which of the target ``paths`` scale their input: ``cfg.feedforward``, else the family's."""
    ff = cfg.feedforward
    if ff is None:
        ff = family(model)[1] if cfg.targets is None else next((f for t, f in DEFAULTS if t == cfg.targets), [])
    return [p for p in paths if matches(p, ff)]


@register
class IA3(Method):
    name = "ia3"
    default_lr = 1.5e-3  # half T-Few's 3e-3 (Liu et al. 2022), as for every method (core/method.py)
    config_cls = IA3Config
    peft_type = "IA3"
    summary = "learned vectors rescaling keys, values and FFN inputs (or conv channels); merges exactly"
    layer_types = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "NF4Linear/Int8Linear")
    default_targets = "k, v, FFN down proj (per family); CNN Conv2d"

    def default_targets_for(self, model):
        return family(model)[0]  # peft's per-architecture table (DEFAULTS)

    def attach(self, model, cfg: IA3Config, name, state):
        paths = self.target_paths(model, cfg, types=_layer_types())
        ff = feedforward_paths(model, cfg, paths)
        made = [(p, IA3Delta(base_at(model, p), p in ff)) for p in paths]
        for p, d in made:
            wrap(model, p, state).deltas[name] = d

    def to_peft(self, cfg: IA3Config, model, name):
        targets, ff, saved = [], [], []
        for path, layer in iter_delta_layers(model):
            d = layer.deltas[name] if name in layer.deltas else None
            if isinstance(d, IA3Delta):
                targets.append(path)
                if d.feedforward:
                    ff.append(path)
            elif isinstance(d, CopyDelta):
                saved.append(path)
        return {
            "peft_type": "IA3", "task_type": None, "target_modules": sorted(targets),
            "feedforward_modules": sorted(ff), "exclude_modules": None, "modules_to_save": sorted(saved) or None,
            "fan_in_fan_out": any(is_conv1d(layer.base_layer) for _, layer in iter_delta_layers(model)
                                  if name in layer.deltas),
            "init_ia3_weights": True, "inference_mode": True, "revision": None,
        }

    def from_peft(self, d: dict[str, Any]) -> IA3Config:
        def lst(v):
            return list(v) if isinstance(v, (set, tuple, list)) else v

        return IA3Config(targets=lst(d.get("target_modules")), feedforward=lst(d.get("feedforward_modules")) or [],
                         exclude=lst(d.get("exclude_modules")), modules_to_save=d.get("modules_to_save") or None)
