"""Sparse fine-tuning of gradient-selected weights: train only k individual entries of W.

    ΔW = scatter(zeros(out, in), idx, v)        idx: k flat positions (fixed), v: k trained values
    y  = base(x) + f(x; ΔW)                     f = the layer's own op (linear, conv, embedding)

The positions come from one pass of gradients over a few batches of the user's task:

    gps     per output neuron, the top-k inputs by Σ_b |g|         (GPS, Zhang et al. 2024,
            "Gradient-based Parameter Selection for Efficient Fine-Tuning", arXiv:2312.10136)
    sift    global top-k by Σ_b |g|                                  (SIFT, Song et al. 2023,
            "Sparse is Enough in Fine-tuning Pre-trained LLMs", arXiv:2312.11875)
    fisher  global top-k by the empirical Fisher Σ_b g²              (FISH mask, Sung et al. 2021,
            arXiv:2111.09839; exact per-example Fisher with batches of one example)

Only ``v`` is a parameter, so the optimizer state is 2k floats (AdamW), never the size of the
model; the file holds ``sparse_idx`` (int64) and ``sparse_values`` per layer, its size ∝ k.
Merging adds v into W at idx (exact: the merged entries equal W[idx] + v bit for bit, and
unmerge restores the saved originals).

    dt.attach(model, "sparse", budget=0.01, rule="gps", batches=loader_subset, loss_fn=...)
    sel = dt.select_sparse(model, batches, budget=50_000); dt.attach(model, "sparse", selection=sel)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta, DeltaConfig, DeltaError, base_weight, iter_delta_layers, set_base_weight, wrap
from ..core.method import Method, register
from ..core.dtypes import build_dtype
from ..core.adapters import base_at
from ..core.grads import accumulate_grads, weighted_modules
from ..core.layer_types import conv1d_type
from .lora import call_with
from ..core.targets import skip_direct_reads

RUNTIME = ("batches", "loss_fn", "selection")  # config fields used at attach time, never saved


@dataclass
class SparseConfig(DeltaConfig):
    budget: float = 0.005  # entries to train: int = count, float < 1 = fraction of all model parameters
    rule: str = "gps"  # "gps" | "sift" | "fisher" (see the module docstring)
    max_batches: int | None = 8  # selection pass length; the papers use a few batches to one epoch
    batches: Any = None  # iterable of batches for the selection pass (not saved)
    loss_fn: Callable | None = None  # loss_fn(model, batch) -> loss; None: model(**batch).loss (not saved)
    selection: dict | None = None  # precomputed {path: flat indices} from dt.select_sparse (not saved)
    counts: dict[str, int] = field(default_factory=dict)  # entries per layer; filled at attach, rebuilds on load

    method = "sparse"

    def __post_init__(self):
        if self.rule not in RULES:
            raise DeltaError(f"sparse: rule must be one of {sorted(RULES)}, got {self.rule!r}")
        if not (isinstance(self.budget, (int, float)) and self.budget > 0) or isinstance(self.budget, bool):
            raise DeltaError(f"sparse: budget must be a positive count or a fraction in (0, 1), got {self.budget!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUNTIME}
        return {"method": self.method, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}}


# --------------------------------------------------------------------------- selection rules
# scores: {path: accumulated statistic in the weight's native layout}; rows(path) -> (view (out, rest),
# map from flat view indices to flat native indices).  Each rule returns {path: native flat indices}.

def _global_topk(scores: dict[str, torch.Tensor], k: int, _rows: Callable) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    top = torch.topk(flat, k).indices.sort().values
    out, start = {}, 0
    for p, s in scores.items():
        n = s.numel()
        sel = top[(top >= start) & (top < start + n)] - start
        if sel.numel():
            out[p] = sel
        start += n
    return out


def _per_neuron_topk(scores: dict[str, torch.Tensor], k: int, rows: Callable) -> dict[str, torch.Tensor]:
    # GPS: every output neuron gets its top-`base` inputs; the `rem` neurons whose next-best entry
    # scores highest get one more, so exactly k entries are chosen
    views = {p: rows(p) for p in scores}
    n_rows = sum(v.shape[0] for v, _ in views.values())
    base, rem = divmod(k, n_rows)
    top = {p: torch.topk(v, min(base + 1, v.shape[1]), dim=1) for p, (v, _) in views.items()}  # (out, base+1)
    nxt = torch.cat([t.values[:, base] if t.values.shape[1] > base else torch.full((t.values.shape[0],), -1.0)
                     for t in top.values()])
    extra = torch.zeros(n_rows, dtype=torch.bool)
    extra[torch.topk(nxt, rem).indices] = True
    out, start = {}, 0
    for p, (v, to_native) in views.items():
        n_out, n_in = v.shape
        take = torch.arange(top[p].indices.shape[1])[None, :] < (base + extra[start:start + n_out].long())[:, None]
        flat = (torch.arange(n_out)[:, None] * n_in + top[p].indices)[take]  # (row, col) -> flat in the view
        if flat.numel():
            out[p] = to_native(flat).sort().values
        start += n_out
    return out


RULES: dict[str, tuple[str, Callable]] = {  # rule -> (statistic, how to pick)
    "gps": ("abs", _per_neuron_topk),
    "sift": ("abs", _global_topk),
    "fisher": ("sq", _global_topk),
}
STATISTICS = {"abs": lambda w, g: g.abs(), "sq": lambda w, g: g.pow(2)}


def select_sparse(model: nn.Module, batches, budget: float = 0.005, rule: str = "gps", loss_fn=None,
                  targets=None, exclude=None, max_batches: int | None = 8) -> dict[str, torch.Tensor]:
    """{module path: flat indices into its weight} chosen by ``rule`` from one gradient pass."""
    SparseConfig(budget=budget, rule=rule)  # validates
    mods = [(p, m) for p, m in weighted_modules(model, targets, exclude)
            if isinstance(m, _types()) and not hasattr(m, "dequantize")]  # quantized storage: no float W
    # a sparse delta runs in the layer's forward: leave out layers whose parent reads .weight itself
    keep = set(skip_direct_reads(model, "all-linear" if targets is None else targets, [p for p, _ in mods]))
    mods = [(p, m) for p, m in mods if p in keep]
    if not mods:
        raise DeltaError("sparse: no Linear/Conv1D/Conv/Embedding weight among the targets")
    stat, pick = RULES[rule]
    acc = accumulate_grads(model, mods, batches, loss_fn, max_batches, {"s": STATISTICS[stat]})
    scores = {p: acc[p].get("s", torch.zeros(m.weight.shape)) for p, m in mods}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    k = int(budget * total) if isinstance(budget, float) and budget < 1 else int(budget)
    avail = sum(s.numel() for s in scores.values())
    if not 1 <= k <= avail:
        raise DeltaError(f"sparse: budget {budget!r} = {k:,} entries, but the targets hold {avail:,}; "
                         "use a budget between 1 and that (or widen targets)")
    conv1d = conv1d_type()
    kinds = dict(mods)

    def rows(path):  # (out, rest) view of the scores + index map back to the native layout
        s = scores[path]
        if conv1d is not None and isinstance(kinds[path], conv1d):  # GPT-2 Conv1D stores (in, out)
            in_f, out_f = s.shape
            return s.t(), lambda i: (i % in_f) * out_f + i // in_f  # view (o, c) -> native (c, o)
        return s.reshape(s.shape[0], -1), lambda i: i

    return pick(scores, k, rows)


# --------------------------------------------------------------------------- the delta

def _types() -> tuple[type, ...]:
    return tuple(t for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, conv1d_type()) if t is not None)


def _conv1d_apply(x, dw, base):  # GPT-2 Conv1D: y = x @ W + b, W (in, out)
    return x @ dw


def _conv_apply(x, dw, base):
    """The base's convolution with ΔW and no bias.  A subclass that pads in its own forward (TF
    "same": efficientnet-pytorch's Conv2dStaticSamePadding, timm's Conv2dSame) runs through that
    forward, else ΔW would see the unpadded input and give another output size."""
    plain = next(t for t in (nn.Conv1d, nn.Conv2d) if isinstance(base, t))
    return base._conv_forward(x, dw, None) if type(base).forward is plain.forward else call_with(base, dw, x)


APPLY: dict[str, Callable] = {  # layer type name -> f(x, ΔW, base): the layer's op on ΔW, no bias
    "Linear": lambda x, dw, base: F.linear(x, dw),
    "Conv1D": _conv1d_apply,
    "Conv1d": _conv_apply,
    "Conv2d": _conv_apply,
    "Embedding": lambda x, dw, base: F.embedding(x, dw, base.padding_idx, base.max_norm, base.norm_type,
                                                 base.scale_grad_by_freq, base.sparse),
}


class SparseDelta(Delta):
    """k trained entries of one weight."""
    additive = True  # y + S x, S sparse

    def __init__(self, base: nn.Module, idx: torch.Tensor):
        super().__init__()
        w = base_weight(base)
        self.kind = next(k for k in APPLY if type(base).__name__ == k or
                         any(c.__name__ == k for c in type(base).__mro__))
        self.shape = tuple(w.shape)
        dtype = build_dtype(base)
        self.register_buffer("sparse_idx", idx.to(torch.int64).clone(), persistent=False)  # (k,) flat, native layout
        self.sparse_values = nn.Parameter(torch.zeros(idx.numel(), dtype=dtype))  # (k,)

    def dense(self) -> torch.Tensor:
        n = 1
        for d in self.shape:
            n *= d
        z = self.sparse_values.new_zeros(n)
        return z.index_put((self.sparse_idx,), self.sparse_values).view(self.shape)  # ΔW, native layout

    def _coo(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(indices (2, k) of ΔW as an (out, in) matrix in row-major order, the permutation of the
        values into that order, (out, in)).  Cached until the positions change (e.g. on load)."""
        key = (self.sparse_idx.data_ptr(), self.sparse_idx._version)
        if getattr(self, "_coo_key", None) != key:
            idx = self.sparse_idx
            if self.kind == "Conv1D":  # stored (in, out): entry (i, o) is ΔW^T
                in_f, out_f = self.shape
                rows, cols = idx % out_f, idx // out_f
            else:
                out_f, in_f = self.shape
                rows, cols = idx // in_f, idx % in_f
            perm = torch.argsort(rows * in_f + cols)
            self._coo_cache = (torch.stack([rows[perm], cols[perm]]), perm, (out_f, in_f))
            self._coo_key = key
        return self._coo_cache

    def forward(self, x, y, base):
        if self.kind in ("Linear", "Conv1D"):  # sparse matmul: O(k·tokens), no dense ΔW (out, in)
            ind, perm, (out_f, in_f) = self._coo()
            s = torch.sparse_coo_tensor(ind, self.sparse_values[perm], (out_f, in_f), is_coalesced=True,
                                        check_invariants=False)  # (out, in), k entries
            x2 = x.reshape(-1, in_f).to(self.sparse_values.dtype)  # (N, in)
            return y + torch.sparse.mm(s, x2.t()).t().reshape(y.shape).to(y.dtype)  # (N, out)
        dw = self.dense()
        xin = x if self.kind == "Embedding" else x.to(dw.dtype)
        return y + APPLY[self.kind](xin, dw, base).to(y.dtype)

    def delta_weight(self, base):
        return self.dense()

    def merge(self, base):
        w = base_weight(base).clone()
        flat = w.view(-1)
        self._orig = flat[self.sparse_idx].clone()
        flat[self.sparse_idx] += self.sparse_values.detach().to(w.dtype)
        set_base_weight(base, w)

    def unmerge(self, base):
        w = base_weight(base).clone()
        w.view(-1)[self.sparse_idx] = self._orig  # exact restore, no float round trip
        set_base_weight(base, w)
        del self._orig


# --------------------------------------------------------------------------- the method

@register
class Sparse(Method):
    name = "sparse"
    config_cls = SparseConfig
    summary = "trains k gradient-selected weight entries (GPS / SIFT / FISH mask), stored as indices + values"
    default_targets = "all-linear"  # candidates; the gradient mask then chooses the entries
    layer_types = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Embedding")

    def attach(self, model, cfg: SparseConfig, name, state):
        if cfg.selection is not None:
            sel = {p: torch.as_tensor(i) for p, i in cfg.selection.items()}
        elif cfg.batches is not None:
            targets = self.default_targets if cfg.targets is None else cfg.targets
            sel = select_sparse(model, cfg.batches, cfg.budget, cfg.rule, cfg.loss_fn, targets, cfg.exclude,
                                cfg.max_batches)
        elif cfg.counts:  # loading a saved adapter: shapes now, indices and values from the file
            sel = {p: torch.zeros(n, dtype=torch.int64) for p, n in cfg.counts.items()}
        else:
            raise DeltaError("sparse: pass batches=... (and loss_fn=... unless batches are dicts with labels) to "
                             "choose the weights, or selection=dt.select_sparse(...)")
        skip_direct_reads(model, sorted(sel), sorted(sel))  # a saved selection on such a layer: refuse
        made = []
        for p, idx in sel.items():
            base = base_at(model, p)
            if not isinstance(base, _types()):
                raise DeltaError(f"sparse: {p} is a {type(base).__name__}; supported: {self.layer_types}")
            n = base_weight(base).numel()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise DeltaError(f"sparse: selection for {p} has indices outside its {n} weights")
            made.append((p, SparseDelta(base, idx)))
        state.adapters[name].config = dataclasses.replace(cfg, batches=None, loss_fn=None, selection=None,
                                                          counts={p: d.sparse_idx.numel() for p, d in made})
        for p, d in made:
            wrap(model, p, state).deltas[name] = d

    def own_tensors(self, model, name):
        # the (integer, untrained) positions are saved with the values, keyed like them
        return {f"{p}.sparse_idx": layer.deltas[name].sparse_idx for p, layer in iter_delta_layers(model)
                if name in layer.deltas and isinstance(layer.deltas[name], SparseDelta)}

    def selected(self, model, name) -> dict[str, int]:
        return {p: layer.deltas[name].sparse_idx.numel() for p, layer in iter_delta_layers(model)
                if name in layer.deltas and isinstance(layer.deltas[name], SparseDelta)}
