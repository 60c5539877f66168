"""Shrinking trained deltas: SVD rank truncation of LoRA, magnitude pruning of any adapter.

Rank truncation (the Eckart–Young optimum in Frobenius norm).  Without forming the (out × in)
product, via two thin QR factorisations and an r × r SVD:

    B = Q_b R_b,  Aᵀ = Q_a R_a,   R_b R_aᵀ = U Σ Vᵀ     ⇒   BA = (Q_b U) Σ (Q_a V)ᵀ
    B' = Q_b U_k Σ_k^½,   A' = Σ_k^½ (Q_a V_k)ᵀ          kept energy = Σ_{i≤k} σ_i² / Σ_i σ_i²

Each layer keeps its scale s, so y = Wx + s B'A'x is the best rank-k approximation of the trained
update; the adapter stays a plain LoRA (``rank_pattern`` per layer) that peft loads.

Magnitude pruning zeroes the smallest-|x| entries of every trained adapter tensor (LoRA factors,
IA3 vectors, sparse values, ...), keeping ``density`` of them per tensor or across the adapter.
Full copies of a head (``modules_to_save``) are left alone.  (TIES / DARE merging of several
adapters lives in ``deltatune.ops.arithmetic``.)
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..core.delta import CopyDelta, DeltaError, get_state, iter_delta_layers
from .importance import LayerReport
from ..api import activate, attach, delete
from ..core.adapters import adapter_tensors
from ..methods.lora import LoraDelta


def _factors(d) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out', r), A (r, in')) with ΔW ∝ B @ A, for every LoRA layer type."""
    if hasattr(d, "lora_embedding_A"):
        return d.lora_embedding_B, d.lora_embedding_A  # (D, r), (r, V)
    return d.lora_B.weight.flatten(1), d.lora_A.weight.flatten(1)  # (out, r), (r, in·k)


def _write_factors(d, b: torch.Tensor, a: torch.Tensor) -> None:
    if hasattr(d, "lora_embedding_A"):
        d.lora_embedding_B.copy_(b)
        d.lora_embedding_A.copy_(a)
    else:
        d.lora_B.weight.copy_(b.view(d.lora_B.weight.shape))
        d.lora_A.weight.copy_(a.view(d.lora_A.weight.shape))


def svd_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_b U, σ, Q_a V) of B @ A: thin SVD in O((out + in) r²)."""
    qb, rb = torch.linalg.qr(b.double())  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(a.double().t())  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    return qb @ u, s, qa @ vh.t()


def truncate_lora(model, name: str | None = None, r: int | None = None, energy: float | None = None) -> LayerReport:
    """Truncate every layer of LoRA adapter ``name`` to rank ``r`` (or to the smallest rank keeping
    ``energy`` of Σσ²) in place; returns a per-layer report of the ranks and the kept energy."""
    if (r is None) == (energy is None):
        raise DeltaError("truncate_lora: pass exactly one of r=<new rank> or energy=<fraction to keep, e.g. 0.9>")
    if r is not None and (not isinstance(r, int) or r < 1):
        raise DeltaError(f"truncate_lora: r must be a positive integer, got {r!r}")
    if energy is not None and not 0 < energy <= 1:
        raise DeltaError(f"truncate_lora: energy must be in (0, 1], got {energy!r}")
    st = get_state(model)
    name = name or (st.active[0] if len(st.active) == 1 else None)
    if name not in st.adapters or st.adapters[name].method != "lora":
        raise DeltaError(f"truncate_lora: {name!r} is not a LoRA adapter; LoRA adapters: "
                         f"{[n for n, a in st.adapters.items() if a.method == 'lora']}")
    cfg = st.adapters[name].config
    if any(isinstance(d, LoraDelta) and d.variants for d in
           (layer.deltas[name] for _, layer in iter_delta_layers(model) if name in layer.deltas)):
        raise DeltaError("truncate_lora: DoRA / PiSSA adapters are not plain low-rank updates; save and "
                         "reload the PiSSA adapter (it is exported as plain LoRA) or keep the rank")
    new, rows = {}, []
    with torch.no_grad():
        for path, layer in iter_delta_layers(model):
            d = layer.deltas[name] if name in layer.deltas else None
            if not isinstance(d, LoraDelta):
                continue
            if d.reparam:  # two factor pairs (in_proj, out_proj) per layer: one rank cut does not fit both
                raise DeltaError(f"truncate_lora: {path} ({type(layer.base_layer).__name__}) holds two LoRA pairs, "
                                 "which truncate_lora does not cut; exclude it from the adapter or keep the rank")
            b, a = _factors(d)
            ub, s, va = svd_factors(b, a)
            e = s.pow(2)
            cum = e.cumsum(0) / e.sum().clamp_min(1e-30)
            k = min(r, d.r) if r is not None else int((cum < energy - 1e-12).sum().item()) + 1
            k = max(1, min(k, d.r))
            root = s[:k].sqrt()
            new[path] = (d.scaling, (ub[:, :k] * root).to(b.dtype), (root[:, None] * va[:, :k].t()).to(a.dtype))
            rows.append({"module": path, "rank_before": d.r, "rank_after": k, "kept_energy": float(cum[k - 1])})
    if not rows:
        raise DeltaError(f"truncate_lora: adapter {name!r} has no LoRA layers")
    ranks = {p: row["rank_after"] for p, row in zip(new, rows)}
    r0 = max(ranks.values())
    root = (lambda n: math.sqrt(n)) if cfg.rslora else (lambda n: n)
    ncfg = replace(cfg, targets=sorted(ranks), exclude=None, r=r0, alpha=new[next(iter(new))][0] * root(r0),
                   rank_pattern={p: k for p, k in ranks.items() if k != r0},
                   alpha_pattern={p: new[p][0] * root(k) for p, k in ranks.items()})  # same s per layer
    old = {k: v.detach().clone() for k, v in adapter_tensors(model, name).items()}
    was_active, trainable = list(st.active), st.adapters[name].trainable
    delete(model, name)
    attach(model, ncfg, name=name)
    st.adapters[name].trainable = trainable
    with torch.no_grad():
        for path, layer in iter_delta_layers(model):
            if path in new and name in layer.deltas:
                _write_factors(layer.deltas[name], new[path][1], new[path][2])
        for k, t in adapter_tensors(model, name).items():  # modules_to_save copies come back as they were
            if not any(k.startswith(p + ".lora_") for p in new) and k in old and old[k].shape == t.shape:
                t.copy_(old[k])
    activate(model, [n for n in was_active if n in st.adapters] or [name])
    kept = sum(r["kept_energy"] for r in rows) / len(rows)
    return LayerReport(rows, value="rank_after", title=f"LoRA rank truncation of {name!r} (mean kept energy {kept:.3f})")


def magnitude_prune(model, name: str | None = None, density: float = 0.1, scope: str = "tensor") -> LayerReport:
    """Zero all but the ``density`` fraction of largest-magnitude entries of each trained tensor of
    adapter ``name`` (``scope="tensor"``) or of the whole adapter (``scope="global"``), in place.
    The report gives, per tensor, the entries kept and the kept energy Σx²_kept / Σx²."""
    if not 0 < density <= 1:
        raise DeltaError(f"magnitude_prune: density must be in (0, 1], got {density!r}")
    if scope not in ("tensor", "global"):
        raise DeltaError(f"magnitude_prune: scope must be 'tensor' or 'global', got {scope!r}")
    st = get_state(model)
    name = name or (st.active[0] if len(st.active) == 1 else None)
    if name not in st.adapters:
        raise DeltaError(f"magnitude_prune: pick an adapter with name=...; attached: {sorted(st.adapters)}")
    copies = {id(p) for _, layer in iter_delta_layers(model) if isinstance(layer.deltas[name] if name in layer.deltas
                                                                           else None, CopyDelta)
              for p in layer.deltas[name].parameters()}
    tensors = {k: t for k, t in adapter_tensors(model, name).items() if t.is_floating_point() and id(t) not in copies}
    if not tensors:
        raise DeltaError(f"magnitude_prune: adapter {name!r} has no trained tensors to prune")
    thresh = None
    if scope == "global":
        flat = torch.cat([t.detach().abs().reshape(-1).float() for t in tensors.values()])
        keep = max(1, int(round(density * flat.numel())))
        thresh = torch.topk(flat, keep).values[-1]
    rows = []
    with torch.no_grad():
        for k, t in tensors.items():
            mag = t.abs().float()
            if thresh is None:
                n = max(1, int(round(density * t.numel())))
                cut = torch.topk(mag.reshape(-1), n).values[-1]
            else:
                cut = thresh
            mask = mag >= cut
            total = t.float().pow(2).sum().item()
            t.mul_(mask.to(t.dtype))
            rows.append({"module": k, "kept": int(mask.sum()), "params": t.numel(),
                         "kept_energy": t.float().pow(2).sum().item() / total if total > 0 else 1.0})
    return LayerReport(rows, value="kept_energy", title=f"magnitude pruning of {name!r} (density {density})")
