"""Adapter arithmetic: a weighted combination of attached adapters becomes a new, ordinary adapter
(activate it, save it, load it, mix it like any other).

    how              space                    result
    linear           each adapter tensor      θ = Σ wᵢ θᵢ          any method, identical shapes/config
    cat              LoRA ΔW, exact           A = [A₁; A₂; …], B = [w₁s₁B₁, w₂s₂B₂, …]  rank Σ rᵢ
    svd              LoRA ΔW                  SVD_k(Σ wᵢ ΔWᵢ)
    ties             LoRA ΔW  (Yadav et al. 2023, arXiv:2306.01708)
                         trim each ΔWᵢ to its top-density magnitudes, elect the sign per entry
                         (sign of Σ wᵢΔWᵢ, or of the count), average the weighted entries that agree
    dare_linear      LoRA ΔW  (Yu et al. 2023, arXiv:2311.03099)
                         drop entries with prob 1-density, rescale by 1/density, Σ wᵢ ΔWᵢ
    dare_ties        DARE drop, then TIES' sign election and disjoint mean
    magnitude_prune  LoRA ΔW  keep each ΔWᵢ's top-density magnitudes, Σ wᵢ ΔWᵢ

ΔW-space results are written back as a LoRA of rank ``rank`` (default: the largest source rank)
by truncated SVD, ΔW ≈ (U√S)(√S Vᵀ), with α = r so the scale is 1: exact when the combination's
rank is ≤ ``rank`` (Eckart–Young otherwise).  ``linear`` on LoRA mixes the factors as peft's
"linear" does, A = Σ sign(wᵢ)√|wᵢ| Aᵢ and B = Σ √|wᵢ| Bᵢ, so one adapter at weight w gives exactly
w·ΔW (w = -1 negates it); with several adapters the cross terms BᵢAⱼ make it not Σ wᵢΔWᵢ: use
``cat`` or ``svd`` for that.

    dt.combine(model, {"math": 0.7, "code": 0.3}, name="mix", how="ties", density=0.5, rank=16)
    dt.save(model, "out/mix", name="mix")
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..core.delta import CopyDelta, DeltaError, get_state, iter_delta_layers, merged_names
from ..api import activate, attach
from ..core.adapters import adapter_tensors, base_at
from ..methods.lora import LoraConfig, LoraLinear

HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


# --------------------------------------------------------------------------- task-vector operations
# tensors: (n, *shape) stacked task vectors; w: (n,) weights.  Each returns the merged (*shape).

def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of ``t``'s entries by magnitude, zero the rest."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    if k > 0:
        mask[t.abs().reshape(-1).topk(k).indices] = 1
    return t * mask.view(t.shape)


def dare_drop(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability 1 - density, rescale the survivors by 1 / density."""
    keep = torch.rand(t.shape, generator=gen, dtype=torch.float32).to(t.device) < density
    return t * keep / density


def elect_and_merge(t: torch.Tensor, w: torch.Tensor, majority: str) -> torch.Tensor:
    """TIES: weighted task vectors, one sign per entry, mean over those agreeing with it."""
    wt = t * w.view(-1, *[1] * (t.dim() - 1))
    score = {"total": lambda: wt.sum(0), "frequency": lambda: wt.sign().sum(0)}
    if majority not in score:
        raise DeltaError(f"combine: majority_sign must be 'total' or 'frequency', got {majority!r}")
    sign = torch.where(score[majority]() >= 0, 1.0, -1.0).to(t.dtype)
    agree = wt.sign() == sign  # zeros never agree: they were trimmed
    return (wt * agree).sum(0) / agree.sum(0).clamp(min=1)


def _weighted_sum(t, w):
    return (t * w.view(-1, *[1] * (t.dim() - 1))).sum(0)


def _ties(t, w, o):
    return elect_and_merge(torch.stack([magnitude_mask(x, o["density"]) for x in t]), w, o["majority_sign"])


def _dare_linear(t, w, o):
    return _weighted_sum(torch.stack([dare_drop(x, o["density"], o["gen"]) for x in t]), w)


def _dare_ties(t, w, o):
    return elect_and_merge(torch.stack([dare_drop(x, o["density"], o["gen"]) for x in t]), w, o["majority_sign"])


def _magnitude_prune(t, w, o):
    return _weighted_sum(torch.stack([magnitude_mask(x, o["density"]) for x in t]), w)


DENSE: dict[str, Callable] = {
    "svd": lambda t, w, o: _weighted_sum(t, w),
    "ties": _ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
    "magnitude_prune": _magnitude_prune,
}


def low_rank(dw: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW (out, in) ≈ B A with B (out, k), A (k, in), k = min(rank, out, in); best in Frobenius norm."""
    u, s, vh = torch.linalg.svd(dw.float(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return (u[:, :k] * root).to(dw.dtype), (root[:, None] * vh[:k]).to(dw.dtype)


# --------------------------------------------------------------------------- model level

def _lora_layers(model: nn.Module, names: list[str]):
    """{path: {adapter: LoraLinear}} over every layer any source adapts; refuses what ΔW cannot express."""
    st = get_state(model)
    for n in names:
        if st.adapters[n].method != "lora":
            raise DeltaError(f"combine: adapter {n!r} is {st.adapters[n].method!r}; the ΔW methods (cat, svd, "
                             "ties, dare_*, magnitude_prune) take LoRA adapters - use how='linear' for others")
        if getattr(st.adapters[n].config, "dora", False):
            raise DeltaError(f"combine: adapter {n!r} is DoRA, whose change is not additive; use how='linear' "
                             "with adapters of identical config")
    out: dict[str, dict] = {}
    for path, layer in iter_delta_layers(model):
        for n in names:
            if n not in layer.deltas:
                continue
            d = layer.deltas[n]
            if isinstance(d, CopyDelta):
                raise DeltaError(f"combine: adapter {n!r} trains a full copy of {path} (modules_to_save); the ΔW "
                                 "methods combine low-rank deltas only - use how='linear' or attach with "
                                 "modules_to_save=None")
            if not isinstance(d, LoraLinear):
                raise DeltaError(f"combine: adapter {n!r} adapts {path} ({type(layer.base_layer).__name__}) with "
                                 f"{type(d).__name__}; the ΔW methods support linear layers only (exclude "
                                 "embeddings/convolutions/attention modules)")
            out.setdefault(path, {})[n] = d
    return out


def _attach_lora(model, name, ranks: dict[str, int]) -> dict[str, object]:
    r = max(ranks.values())
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    cfg = LoraConfig(targets=sorted(ranks), r=r, alpha=float(r), rank_pattern=pattern,
                     alpha_pattern={p: float(k) for p, k in pattern.items()}, modules_to_save=None)
    attach(model, cfg, name=name)
    return {p: layer.deltas[name] for p, layer in iter_delta_layers(model) if name in layer.deltas}


def combine(model: nn.Module, weights: dict[str, float] | list[str], name: str, how: str = "svd", *,
            rank: int | None = None, density: float = 0.5, majority_sign: str = "total",
            seed: int = 0) -> nn.Module:
    """Attach adapter ``name`` = the ``how`` combination of the given adapters (see module doc).

    ``weights``: {adapter: weight}, or a list of names (weight 1 each).  ``rank``: LoRA rank of the
    result for the SVD-based methods.  ``density``: fraction of entries kept by ties/dare/magnitude.
    The sources are left untouched and the active adapter does not change."""
    st = get_state(model)
    if isinstance(weights, (list, tuple)):
        weights = {n: 1.0 for n in weights}
    if not weights:
        raise DeltaError("combine: give at least one adapter, e.g. {'a': 0.5, 'b': 0.5}")
    unknown = [n for n in weights if n not in st.adapters]
    if unknown:
        raise DeltaError(f"combine: unknown adapter(s) {unknown}; attached: {sorted(st.adapters)}")
    if how not in HOWS:
        raise DeltaError(f"combine: how must be one of {HOWS}, got {how!r}")
    if not 0 < density <= 1:
        raise DeltaError(f"combine: density must be in (0, 1], got {density!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise DeltaError(f"combine: rank must be a positive integer, got {rank!r}")
    if merged_names(model):
        raise DeltaError("combine: adapters are merged into the base weights; call dt.unmerge(model) first")
    active = list(st.active)
    if how == "linear":
        _linear(model, weights, name)
    else:
        _delta_space(model, weights, name, how, rank, density, majority_sign, seed)
    if active:
        activate(model, active)
    return model


def _linear(model, weights, name):
    st = get_state(model)
    names = list(weights)
    first = st.adapters[names[0]]
    for n in names[1:]:
        rec = st.adapters[n]
        if rec.method != first.method or rec.config.to_dict() != first.config.to_dict():
            raise DeltaError(f"combine(how='linear'): {n!r} ({rec.method}) and {names[0]!r} ({first.method}) have "
                             "different configs; linear combination needs identical shapes - use how='svd'/'cat' "
                             "for LoRA adapters of different ranks or targets")
    src = {n: adapter_tensors(model, n) for n in names}
    attach(model, first.config, name=name)
    dst = adapter_tensors(model, name)
    a_ids, b_ids, mid_ids = _factor_ids(model, name)
    sqrt = {n: abs(float(w)) ** 0.5 for n, w in weights.items()}
    mean = {n: 1.0 / len(names) for n in names}
    with torch.no_grad():
        for k, t in dst.items():
            if not t.is_floating_point():  # index buffers (sparse selections) are shared, not summed
                t.copy_(src[names[0]][k])
                continue
            # a product B·A scales by w when A takes sign(w)·√|w| and B takes √|w|; AdaLoRA's middle
            # factor Λ (B·diag(Λ)·A) is averaged, so it keeps its scale; every other tensor (IA3/VeRA
            # vectors, DoRA magnitudes, biases) is linear in itself and takes w
            coef = ({n: (1.0 if w >= 0 else -1.0) * sqrt[n] for n, w in weights.items()} if id(t) in a_ids else
                    sqrt if id(t) in b_ids else mean if id(t) in mid_ids else weights)
            t.copy_(sum(coef[n] * src[n][k].detach().to(t.dtype) for n in names))


def _factor_ids(model, name) -> tuple[set[int], set[int], set[int]]:
    """ids of the A, B (and AdaLoRA's Λ) factor tensors of adapter ``name``'s low-rank deltas."""
    a_ids, b_ids, mid_ids = set(), set(), set()
    for _, layer in iter_delta_layers(model):
        d = layer.deltas[name] if name in layer.deltas else None
        for sub in d.modules() if d is not None else ():  # MultiheadAttention's out_proj pair is a child
            a, b = getattr(sub, "lora_A", None), getattr(sub, "lora_B", None)
            if a is None or b is None:
                continue
            a, b = getattr(a, "weight", a), getattr(b, "weight", b)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                a_ids.add(id(a))
                b_ids.add(id(b))
                if isinstance(getattr(sub, "lora_E", None), torch.Tensor):
                    mid_ids.add(id(sub.lora_E))
    return a_ids, b_ids, mid_ids


def _delta_space(model, weights, name, how, rank, density, majority_sign, seed):
    names = list(weights)
    layers = _lora_layers(model, names)
    if not layers:
        raise DeltaError(f"combine: adapters {names} adapt no layer")
    gen = torch.Generator().manual_seed(seed)
    opts = {"density": density, "majority_sign": majority_sign, "gen": gen}
    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # path -> (B, A) with scale 1
    with torch.no_grad():
        for path, ds in layers.items():
            any_d = next(iter(ds.values()))
            if how == "cat":
                new[path] = (torch.cat([ds[n].lora_B.weight * (weights[n] * ds[n].scaling) for n in ds], 1),
                             torch.cat([ds[n].lora_A.weight for n in ds], 0))
                # a variant's own low-rank terms (PiSSA's − s B₀A₀) join as more rank
                extra = [(tb * (weights[n] * ds[n].scaling), ta) for n in ds for tb, ta in ds[n].extra_terms()]
                if extra:
                    b, a = new[path]
                    new[path] = (torch.cat([b, *[e[0] for e in extra]], 1), torch.cat([a, *[e[1] for e in extra]], 0))
                continue
            base = _lora_base(model, path)
            shape = any_d.product().shape  # (out, in)
            t = torch.stack([ds[n].delta_weight(base).float() if n in ds else torch.zeros(shape) for n in names])
            w = torch.tensor([float(weights[n]) for n in names])
            dw = DENSE[how](t, w, opts)
            k = rank or max(d.r for d in ds.values())
            b, a = low_rank(dw, k)
            new[path] = (b.to(any_d.lora_B.weight.dtype), a.to(any_d.lora_A.weight.dtype))
    created = _attach_lora(model, name, {p: ba[0].shape[1] for p, ba in new.items()})
    with torch.no_grad():
        for p, (b, a) in new.items():
            created[p].lora_B.weight.copy_(b)
            created[p].lora_A.weight.copy_(a)


def _lora_base(model, path):
    return base_at(model, path)


__all__ = ["HOWS", "combine", "dare_drop", "elect_and_merge", "low_rank", "magnitude_mask"]
