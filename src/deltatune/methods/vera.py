"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort & Asano, ICLR 2024,
arXiv:2310.11454).

One pair of frozen random matrices A (r × in_max) and B (out_max × r) is shared by every adapted
layer; each layer trains only two scaling vectors:

    x ──► W (frozen) ───────────────────────────────────────────┐
    │                                                           (+) ──► y = W x + Λ_b B Λ_d A x
    └──► A[:, :in] ──► ⊙ λ_d (r) ──► B[:out, :] ──► ⊙ λ_b (out) ┘

    λ_b = 0 at init (output unchanged), λ_d = d_initial (0.1 in the paper's code).

A and B are Kaiming-uniform draws from a ``torch.Generator`` seeded with ``projection_prng_key``,
regenerated on load and never stored, so a file is just Σ (out + r) numbers per layer.  The
generation is peft's, bit for bit, and the files are peft's (``vera_lambda_b``/``vera_lambda_d``,
``peft_type: "VERA"``, ``save_projection: false``).  peft files saved *with* the projection
(its default) load too: the stored A and B are checked against the regenerated ones.

ΔW = Λ_b B Λ_d A is additive, so VeRA merges exactly.  Layer types: Linear and GPT-2 Conv1D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import CopyDelta, Delta, DeltaConfig, DeltaError, base_weight, iter_delta_layers, wrap
from ..core.method import Method, register
from ..core.dtypes import build_dtype
from ..core.layer_types import is_conv1d, linear_types
from ..core.adapters import base_at


@dataclass
class VeraConfig(DeltaConfig):
    r: int = 256  # shared rank: large, as A and B are frozen and shared (paper: 256-1024)
    d_initial: float = 0.1  # initial λ_d (paper's code and peft; λ_b starts at 0)
    projection_prng_key: int = 0  # seed regenerating A and B: the only thing stored about them
    dropout: float = 0.0  # dropout on the VeRA branch input

    method = "vera"
    size_fields = ("r",)  # bounded by the saved tensors' shapes on load

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise DeltaError(f"vera: r must be a positive integer, got {self.r!r} (typical: 256)")
        if not 0 <= self.dropout < 1:
            raise DeltaError(f"vera: dropout must be in [0, 1), got {self.dropout!r}")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's ``_kaiming_init``: U(-b, b), b = √3 · √2 / √fan_in, drawn from ``generator``."""
    t = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


def projection(seed: int, r: int, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = kaiming_uniform((r, in_max), g)  # (r, in_max), drawn first (as peft)
    b = kaiming_uniform((out_max, r), g)  # (out_max, r)
    return a, b


class Shared:
    """A and B, shared by all layers of one adapter (a plain object: never in a state dict, one
    copy per device/dtype however many layers use it)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (self.a.to(device, dtype), self.b.to(device, dtype))
        return self._cache[key]


def _in_out(base: nn.Module) -> tuple[int, int, bool]:
    w = base_weight(base)
    conv1d = is_conv1d(base)  # GPT-2 (and quant.NF4Conv1D): (in, out)
    return (w.shape[0], w.shape[1], True) if conv1d else (w.shape[1], w.shape[0], False)


class VeraDelta(Delta):
    additive = True  # y + Λ_b B Λ_d A x

    def __init__(self, base: nn.Module, shared: Shared, cfg: VeraConfig):
        super().__init__()
        self.in_f, self.out_f, self.fan_in_fan_out = _in_out(base)
        w = base_weight(base)
        dtype = build_dtype(base)
        self.shared = shared
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_f, dtype=dtype))  # (out,)
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), dtype=dtype))  # (r,)

    def _ab(self, device, dtype):
        a, b = self.shared.get(device, dtype)
        return a[:, :self.in_f], b[:self.out_f, :]  # (r, in), (out, r)

    def forward(self, x, y, base):
        d, bvec = self.vera_lambda_d, self.vera_lambda_b
        a, b = self._ab(d.device, d.dtype)
        h = F.linear(self.dropout(x).to(d.dtype), a) * d  # (..., r)
        return y + (F.linear(h, b) * bvec).to(y.dtype)  # (..., out)

    def delta_weight(self, base):
        d, bvec = self.vera_lambda_d, self.vera_lambda_b
        a, b = self._ab(d.device, d.dtype)
        dw = (bvec[:, None] * b) @ (d[:, None] * a)  # (out, in)
        return dw.t() if self.fan_in_fan_out else dw


def _layer_types() -> tuple[type, ...]:
    return linear_types()  # Linear, GPT-2 Conv1D, quantized linears (via base_weight)


@register
class VeRA(Method):
    name = "vera"
    default_lr = 2.5e-3  # VeRA trains only scaling vectors
    default_targets = "attention"  # the paper adapts the query/value projections
    config_cls = VeraConfig
    peft_type = "VERA"
    summary = "shared frozen random A, B (from a seed) with trained per-layer scaling vectors λ_b, λ_d"
    layer_types = ("Linear", "Conv1D", "NF4Linear/Int8Linear")

    def attach(self, model, cfg: VeraConfig, name, state):
        paths = self.target_paths(model, cfg, types=_layer_types())
        dims = [_in_out(base_at(model, p)) for p in paths]
        in_max, out_max = max(d[0] for d in dims), max(d[1] for d in dims)
        a, b = projection(cfg.projection_prng_key, cfg.r, in_max, out_max)
        shared = Shared(a, b)
        made = [(p, VeraDelta(base_at(model, p), shared, cfg)) for p in paths]
        for p, d in made:
            wrap(model, p, state).deltas[name] = d

    def normalize_keys(self, tensors):
        # peft's save_projection=True files carry "base_model.vera_A"/"vera_B": check that they are
        # what the seed regenerates (from_peft, which io calls just before, noted the seed), drop them
        proj = {k.split(".")[1]: v for k, v in tensors.items() if k in ("base_model.vera_A", "base_model.vera_B")}
        seed = self.__dict__.pop("_peft_seed", None)
        if proj:
            sa, sb = proj.get("vera_A"), proj.get("vera_B")
            if seed is None or sa is None or sb is None:
                raise DeltaError("vera: the file carries a partial projection or no projection_prng_key; "
                                 "re-save it from peft with save_projection=False")
            a, b = projection(seed, sa.shape[0], sa.shape[1], sb.shape[0])
            if not (torch.equal(sa.float(), a) and torch.equal(sb.float(), b)):
                raise DeltaError(f"vera: the projection stored in the file differs from the one regenerated from "
                                 f"projection_prng_key={seed}; it was made by another random generator, which "
                                 "deltatune cannot reproduce")
        return {k: v for k, v in tensors.items() if k not in ("base_model.vera_A", "base_model.vera_B")}

    def to_peft(self, cfg: VeraConfig, model, name):
        targets, saved, conv1d = [], [], False
        for path, layer in iter_delta_layers(model):
            d = layer.deltas[name] if name in layer.deltas else None
            if isinstance(d, VeraDelta):
                targets.append(path)
                conv1d |= d.fan_in_fan_out
            elif isinstance(d, CopyDelta):
                saved.append(path)
        return {
            "peft_type": "VERA", "task_type": None, "r": cfg.r, "target_modules": sorted(targets),
            "projection_prng_key": cfg.projection_prng_key, "save_projection": False,
            "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial, "fan_in_fan_out": conv1d, "bias": "none",
            "modules_to_save": sorted(saved) or None, "init_weights": True, "layers_to_transform": None,
            "layers_pattern": None, "inference_mode": True, "revision": None,
        }

    def from_peft(self, d: dict[str, Any]) -> VeraConfig:
        if d.get("bias", "none") != "none":
            raise DeltaError(f"peft VeRA with bias={d['bias']!r} is not supported; attach 'bitfit' for biases")
        if d.get("layers_to_transform") is not None:
            raise DeltaError("peft VeRA with layers_to_transform is not supported; re-save with explicit target_modules")
        targets = d.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = list(targets)
        self._peft_seed = int(d.get("projection_prng_key", 0))  # for normalize_keys' projection check
        return VeraConfig(targets=targets, modules_to_save=d.get("modules_to_save") or None, r=int(d.get("r", 256)),
                          d_initial=float(d.get("d_initial", 0.1)),
                          projection_prng_key=int(d.get("projection_prng_key", 0)),
                          dropout=float(d.get("vera_dropout", 0.0)))
