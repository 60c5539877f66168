"""Mixed-adapter batches: every row of one batch goes through its own adapter.

    rows = ["a", "b", "a", None]          (None = the bare base model)

    x (B, ..., in) ──► base(x) once for the whole batch ──► y (B, ..., out)
                       for each adapter k used by the batch:
                           y[rows_k] = delta_k(x[rows_k], y[rows_k])      gather → delta → scatter
                       deltas declaring ``bmm_factors`` (plain LoRA), many adapters (punica /
                       S-LoRA style, Chen et al. 2023 arXiv:2310.18547, Sheng et al. 2023 arXiv:2311.03285):
                           y[i] += s_i · (x[i] A_iᵀ) B_iᵀ   for all rows i in one pair of bmm calls

The frozen base runs once on the whole batch, so the cost of serving many adapters at once is the
cost of their small deltas.  A delta with an input transform (``pre``, e.g. IA³ on a feed-forward
input) rewrites its rows of ``x`` before the base runs; a ``replaces`` delta (a classification
head copy, ``modules_to_save``) recomputes its rows.

The row list may be shorter than the batch the layer sees: ``generate(num_beams=k)`` and
``num_return_sequences`` expand every prompt into k consecutive rows (``repeat_interleave``), and
so does flattening (B, T, C) to (B·T, C).  The mapping is therefore derived from each layer's
current input: a batch of n·k rows maps row j to prompt j // k.  The batch dimension must be the
first one (true for every transformers model).

Prompt and prefix tuning route rows themselves (``supports_mixed = True``): their model-level hook
gives each row its adapter's virtual tokens, padding rows that need fewer with masked slots where
that is exact (causal LMs); see ``methods/_virtual_tokens.py``, whose ``check_mixed`` refuses the
rest.  The BitFit / LayerNorm / sparse selectors change base tensors shared by all rows and are
refused with a DeltaError.  Attach and delete adapters outside a ``mixed`` block: its row plan is
computed once per batch size.

    with dt.mixed(model, ["a", "b", None]):
        logits = model(input_ids).logits
    out = dt.generate_mixed(model, ["a", "b"], input_ids=ids, num_beams=4, max_new_tokens=20)
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .core import model_state
from .core.delta import Delta, DeltaError, DeltaLayer, get_state, merged_names
from .core.method import method_of
from .core.rows import RowName, RowPlan

BMM_MIN_ADAPTERS = 2  # LoRA adapters of one rank per layer from which the gathered bmm is used


# --------------------------------------------------------------------------- row helpers

def _take(t: torch.Tensor, idx: torch.Tensor, sl: slice | None) -> torch.Tensor:
    return t[sl] if sl is not None else t.index_select(0, idx)


def _put(y: torch.Tensor, idx: torch.Tensor, sl: slice | None, rows: torch.Tensor, name: str) -> torch.Tensor:
    expect = (len(idx), *y.shape[1:])
    if tuple(rows.shape) != expect:
        raise DeltaError(f"mixed batch: adapter {name!r} changes this layer's output shape "
                         f"({tuple(rows.shape)} vs {expect}); such adapters cannot "
                         "share a batch with others - run their rows in a separate batch")
    rows = rows.to(y.dtype)
    if _inplace_ok(y):
        if sl is not None:
            y[sl] = rows
        else:
            y.index_copy_(0, idx, rows)
        return y
    return y.index_copy(0, idx, rows)


def _inplace_ok(y: torch.Tensor) -> bool:
    # the base output is fresh, but autograd may have saved it (e.g. a base ending in sigmoid)
    return not (torch.is_grad_enabled() and y.requires_grad)


def _slice_rows(obj: Any, n: int, idx: torch.Tensor, sl: slice | None) -> Any:
    """Rows of every tensor argument whose first dimension is the batch."""
    if isinstance(obj, torch.Tensor) and obj.dim() and obj.shape[0] == n:
        return _take(obj, idx, sl)
    return obj


def _has_pre(d: Delta) -> bool:
    return type(d).pre is not Delta.pre


# --------------------------------------------------------------------------- low-rank deltas: batched gather

def _pool(plan: RowPlan, layer: DeltaLayer, r: int, dtype: torch.dtype) -> tuple:
    """(names, Aᵀ (K, in, r), s·Bᵀ (K, r, out)) for every LoRA adapter of rank r on ``layer``.

    Built once and kept on the layer (outside the state dict) until an adapter is added/removed or
    a weight changes in place (version counters: a training step or a hot-swap rebuilds it); costs
    one extra copy of the layer's LoRA weights.  Stored contiguous in bmm's layout: restacking per
    forward cost a 512-token prefill ~20% here, strided transposes made bmm up to 2x slower."""
    ent = plan._pools.get((id(layer), r))  # validated earlier in this context: check versions only
    if ent is not None and all(p._version == v for p, v in zip(ent[1], ent[2])):
        return ent[0], ent[3], ent[4]
    store = model_state.setdefault(layer, model_state.MIXED_STACKS, {})  # {rank: stacked LoRA weights}
    factors = {a: f for a, f in ((a, d.bmm_factors(dtype)) for a, d in layer.deltas.items())
               if f is not None and f[0].shape[0] == r}
    params = [t for f in factors.values() for t in f[:2]]
    hit = store.get(r)
    if (hit is not None and hit[0] == tuple(factors) and len(hit[1]) == len(params)
            and all(t is p and p._version == v for t, p, v in zip(hit[1], params, hit[2]))
            and hit[3].device == params[0].device and hit[3].dtype == params[0].dtype):
        plan._pools[(id(layer), r)] = hit
        return hit[0], hit[3], hit[4]
    At = torch.stack([a.detach().t() for a, _, _ in factors.values()])  # (K, in, r)
    Bt = torch.stack([b.detach().t() * s for _, b, s in factors.values()])  # (K, r, out)
    store[r] = plan._pools[(id(layer), r)] = (tuple(factors), params, [p._version for p in params], At, Bt)
    return tuple(factors), At, Bt


def _lora_bmm(plan: RowPlan, layer: DeltaLayer, x: torch.Tensor, y: torch.Tensor, names: list[RowName],
              deltas: dict[str, Delta], use: list[str], rank: int) -> torch.Tensor:
    """y[i] += s_i (x[i] A_iᵀ) B_iᵀ for every row whose adapter is in ``use`` (all of rank ``rank``)."""
    if torch.is_grad_enabled():  # autograd: stack the live parameters so gradients reach each adapter
        factors = [deltas[a].bmm_factors(y.dtype) for a in use]
        order = tuple(use)
        At = torch.stack([a.t() for a, _, _ in factors])  # (k, in, r)
        Bt = torch.stack([b.t() * s for _, b, s in factors])  # (k, r, out)
    else:  # (asking each delta for its factors here cost ~10% of a small model's decoding step)
        order, At, Bt = _pool(plan, layer, rank, y.dtype)
        if plan.per_token and x.numel() == len(names) * At.shape[1] and _dense_pays(At, Bt):
            return _lora_dense(plan, layer, x, y, names, order, use, At, Bt)
    key = (len(names), order, tuple(use))
    rowsel = plan._rowsel.get(key)
    if rowsel is None:
        pos = {a: i for i, a in enumerate(order)}
        rows = [j for j, a in enumerate(names) if a in use]
        sel = [pos[names[j]] for j in rows]
        rowsel = plan._rowsel[key] = (
            None if sel == list(range(len(order))) else torch.tensor(sel, device=x.device),  # (b,)
            None if len(rows) == len(names) else torch.tensor(rows, device=x.device))  # (b,)
    sel, idx = rowsel
    if sel is not None:
        At, Bt = At.index_select(0, sel), Bt.index_select(0, sel)  # (b, in, r), (b, r, out)
    xs = x if idx is None else x.index_select(0, idx)
    b = xs.shape[0]
    h = torch.bmm(xs.reshape(b, -1, xs.shape[-1]).to(At.dtype), At)  # (b, L, r)
    if idx is None and y.is_contiguous() and y.dtype == Bt.dtype:
        y3 = y.view(b, -1, y.shape[-1])  # (b, L, out)
        return (y3.baddbmm_(h, Bt) if _inplace_ok(y) else torch.baddbmm(y3, h, Bt)).view(y.shape)
    upd = torch.bmm(h, Bt).view(b, *y.shape[1:]).to(y.dtype)  # (b, ..., out)
    if idx is None:
        return y.add_(upd) if _inplace_ok(y) else y + upd
    return y.index_add_(0, idx, upd) if _inplace_ok(y) else y.index_add(0, idx, upd)


DENSE_ATTR = "_dt_mixed_dense"  # layer.__dict__ key: {rank: (At, A_cat, B_cat)} for _lora_dense


def _dense_pays(At: torch.Tensor, Bt: torch.Tensor) -> bool:
    """All K adapters' low-rank products for every token cost at most the base layer's matmul:
    K·r·(in + out) ≤ in·out (8 adapters of r=8 on a 256 x 256 projection: half)."""
    k, i, r = At.shape
    return k * r * (i + Bt.shape[2]) <= i * Bt.shape[2]


def _lora_dense(plan: RowPlan, layer: DeltaLayer, x: torch.Tensor, y: torch.Tensor, names: list[RowName],
                order: tuple, use: list[str], At: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """One token per row (a flattened ragged batch): every token through ALL K adapters' A in one
    matmul, the other adapters' r columns zeroed, then one matmul with all B stacked:

        h = (x A_catᵀ) ⊙ onehot     (N, K·r)    A_cat (in, K·r): the K Aᵀ side by side
        y += h B_cat                (N, out)    B_cat (K·r, out): the K s·Bᵀ stacked

    Gathering one (in, r) + (r, out) weight pair per token cost 1.7x these two matmuls for 16
    tokens and 15x for a 300-token prompt (one torch thread); the zeroed columns add exact zeros."""
    store = layer.__dict__.setdefault(DENSE_ATTR, {})
    hit = store.get(At.shape[2])
    if hit is None or hit[0] is not At:
        k, i, r = At.shape
        hit = store[r] = (At, At.permute(1, 0, 2).reshape(i, k * r).contiguous(), Bt.reshape(k * r, -1).contiguous())
    _, A_cat, B_cat = hit
    key = ("dense", len(names), order, tuple(use))
    onehot = plan._rowsel.get(key)
    if onehot is None:
        pos = {a: i for i, a in enumerate(order)}
        onehot = torch.zeros(len(names), len(order), 1, dtype=A_cat.dtype, device=x.device)  # (N, K, 1)
        for j, a in enumerate(names):
            if a in use:
                onehot[j, pos[a]] = 1
        plan._rowsel[key] = onehot
    n = len(names)
    h = (x.reshape(n, -1).to(A_cat.dtype) @ A_cat).view(n, len(order), -1).mul_(onehot)  # (N, K, r)
    if y.is_contiguous() and y.dtype == B_cat.dtype and _inplace_ok(y):
        y.view(n, -1).addmm_(h.view(n, -1), B_cat)
        return y
    return y + (h.view(n, -1) @ B_cat).view(y.shape).to(y.dtype)


# --------------------------------------------------------------------------- the layer forward

def mixed_forward(layer: DeltaLayer, row_adapters: Sequence[RowName], args: tuple, kwargs: dict):
    """``DeltaLayer.forward`` when the model runs a mixed batch (``DeltaState.row_adapters`` set)."""
    plan = row_adapters if isinstance(row_adapters, RowPlan) else RowPlan(row_adapters)
    if plan.per_token:
        return _per_token_forward(layer, plan, args, kwargs)
    return _rows_forward(layer, plan, args, kwargs)


def _per_token_forward(layer: DeltaLayer, plan: RowPlan, args: tuple, kwargs: dict):
    """A ragged batch flattened into one sequence (serve's continuous batching): the input is
    (1, N, ...) and ``plan`` names the adapter of each of the N tokens.  Seen as N rows of one token,
    (N, 1, ...) — a view, no copy — it is an ordinary mixed batch."""
    x = args[0] if args else next(iter(kwargs.values()))
    if x.dim() >= 2 and x.shape[0] == len(plan):  # already (N, 1, ...): a layer inside a routed one
        return _rows_forward(layer, plan, args, kwargs)
    if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != len(plan):
        raise DeltaError(f"mixed batch: a per-token plan of {len(plan)} tokens met a layer input of shape "
                         f"{tuple(x.shape)}; per-token routing needs inputs shaped (1, tokens, ...) - run this "
                         "model with one row per request instead")
    xt = x.transpose(0, 1)  # (N, 1, ...)
    if args:
        args = (xt, *args[1:])
    else:
        kwargs = {**kwargs, next(iter(kwargs)): xt}
    return _rows_forward(layer, plan, args, kwargs).transpose(0, 1)  # (1, N, ...)


def _rows_forward(layer: DeltaLayer, plan: RowPlan, args: tuple, kwargs: dict):
    x = args[0] if args else next(iter(kwargs.values()))
    n = x.shape[0]
    names, groups = plan.expand(n, x.device)
    lp = plan._layers.get((id(layer), n))
    if lp is None:
        lp = plan._layers[(id(layer), n)] = _LayerPlan(layer, groups)
    if not lp.deltas:
        return layer.base_layer(*args, **kwargs)

    # 1. input transforms (pre) rewrite their rows of x before the shared base runs
    for a in lp.pre:
        idx, sl = groups[a]
        nx = lp.deltas[a].run_pre(_take(x, idx, sl))
        if nx is not None:
            x = x.index_copy(0, idx, nx.to(x.dtype))
            if args:
                args = (x, *args[1:])
            else:
                kwargs = {**kwargs, next(iter(kwargs)): x}

    # 2. the base, once for the whole batch; full replacements (head copies) redo their rows
    y = layer.base_layer(*args, **kwargs)
    for a in lp.replaces:
        idx, sl = groups[a]
        ra = tuple(_slice_rows(v, n, idx, sl) for v in args)
        rk = {k: _slice_rows(v, n, idx, sl) for k, v in kwargs.items()}
        y = _put(y, idx, sl, lp.deltas[a](*ra, **rk), a)

    # 3. additive deltas: LoRA adapters of equal rank share one gathered bmm, the rest go per group
    bmm_groups, rest = lp.split(y)
    for use in bmm_groups:
        y = _lora_bmm(plan, layer, x, y, names, lp.deltas, use, lp.rank[use[0]])
    for a in rest:
        idx, sl = groups[a]
        y = _put(y, idx, sl, lp.deltas[a].run(_take(x, idx, sl), _take(y, idx, sl), layer.base_layer), a)
    return y


class _LayerPlan:
    """What one wrapped layer does for one mixed batch, decided once per layer and batch size."""

    def __init__(self, layer: DeltaLayer, groups: dict):
        self.deltas = {a: layer.deltas[a] for a in groups
                       if a is not None and a in layer.deltas and a not in layer.merged}
        bad = next((a for a, d in self.deltas.items() if d.reparam), None)
        if bad is not None:  # e.g. LoRA on nn.MultiheadAttention: the base runs on W + ΔW for every row
            raise DeltaError(f"mixed batch: adapter {bad!r} changes the weights of a {type(layer.base_layer).__name__} "
                             "for the whole batch, so it cannot apply to some rows only; run its rows in a separate batch")
        self.pre = [a for a, d in self.deltas.items() if _has_pre(d)]
        self.replaces = [a for a, d in self.deltas.items() if d.replaces]
        self.additive = [a for a, d in self.deltas.items() if not d.replaces]
        self._split: dict[tuple, tuple[list[list[str]], list[str]]] = {}
        self.rank: dict[str, int] = {}  # LoRA rank of each adapter in a bmm group (filled by split)

    def split(self, y) -> tuple[list[list[str]], list[str]]:
        """(groups of equal-rank LoRA adapters for the gathered bmm, adapters to run per group)."""
        key = (y.dtype, y.dim() if isinstance(y, torch.Tensor) else 0, any(self.deltas[a].training for a in self.additive))
        hit = self._split.get(key)
        if hit is None:
            by_rank: dict[int, list[str]] = {}
            if isinstance(y, torch.Tensor) and y.dim() >= 2:
                for a in self.additive:
                    f = self.deltas[a].bmm_factors(y.dtype)
                    if f is not None:
                        by_rank.setdefault(f[0].shape[0], []).append(a)
                        self.rank[a] = f[0].shape[0]
            groups = [use for use in by_rank.values() if len(use) >= BMM_MIN_ADAPTERS]
            batched = {a for use in groups for a in use}
            hit = self._split[key] = (groups, [a for a in self.additive if a not in batched])
        return hit


# --------------------------------------------------------------------------- public API

def _check(model: nn.Module, rows: Sequence[RowName]) -> None:
    st = get_state(model)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise DeltaError(f"mixed batch: adapters must be a list with one name (or None) per row, got {rows!r}")
    unknown = sorted({a for a in rows if a is not None and a not in st.adapters}, key=str)
    if unknown:
        raise DeltaError(f"mixed batch: unknown adapter(s) {unknown}; attached: {sorted(st.adapters)}")
    if merged_names(model):
        raise DeltaError("mixed batch: adapters are merged into the base weights; call dt.unmerge(model) first")
    for a in sorted({a for a in rows if a is not None} | set(st.active)):
        m = method_of(st.adapters[a].method)
        if m.supports_mixed is False or (m.supports_mixed is None and m.own_tensors(model, a)):
            role = "used by a row" if a in rows else "active"
            raise DeltaError(f"mixed batch: adapter {a!r} ({m.name}, {role}) changes base tensors "
                             "shared by every row (it selects tensors outside wrapped layers), so it cannot apply to "
                             "some rows only; " + ("run its rows in a separate batch" if a in rows else
                                                   "deactivate it first (dt.activate(model, [...]))"))
    used = [a for a in rows if a is not None] + list(st.active)
    for m in dict.fromkeys(method_of(st.adapters[a].method) for a in used):
        m.check_mixed(model, list(rows))  # e.g. prompt / prefix rows: can their shapes be routed exactly?


def row_plan(model: nn.Module, adapters: Sequence[RowName]) -> RowPlan:
    """A checked plan for ``adapters``, to pass to ``mixed`` in every step of a decoding loop
    whose rows do not change: the checks (a walk over every layer) and the per-layer plans and
    LoRA stacks then cost once, not per step (they were ~40% of a small model's decoding step).
    Make a new plan when the rows change or an adapter is attached or deleted."""
    _check(model, adapters)
    plan = RowPlan(adapters)
    plan.checked = True
    return plan


@contextlib.contextmanager
def mixed(model: nn.Module, adapters: Sequence[RowName]) -> Iterator[nn.Module]:
    """Inside the block, batch row i runs through adapter ``adapters[i]`` (None = bare base);
    the active-adapter setting is ignored.  Works with ``model.generate`` (beam search too).
    ``adapters`` may be a ``row_plan`` (checked once, reused across steps)."""
    if isinstance(adapters, RowPlan) and adapters.checked:
        plan = adapters
    else:
        _check(model, adapters)
        plan = RowPlan(adapters)
    st = get_state(model)
    prev = st.row_adapters, st.row_router
    st.row_adapters, st.row_router = plan, mixed_forward
    try:
        yield model
    finally:
        st.row_adapters, st.row_router = prev


def generate_mixed(model: nn.Module, adapters: Sequence[RowName], **generate_kwargs):
    """``model.generate(**generate_kwargs)`` with prompt i routed through ``adapters[i]``."""
    ids = generate_kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.shape[0] != len(adapters):
        raise DeltaError(f"generate_mixed: {len(adapters)} adapter name(s) for {ids.shape[0]} prompt(s); "
                         "pass one per prompt")
    with mixed(model, adapters):
        return model.generate(**generate_kwargs)
