"""A mixed batch's row plan: which adapter each batch row runs through (``dt.mixed``).

It lives in the core because both the per-layer routing (``mixed.py``) and the model-level
virtual-token hooks (``methods/_virtual_tokens.py``) read it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .delta import DeltaError

RowName = str | None


class RowPlan(list):
    """The per-row adapter list, plus its row groups cached per (batch size, device): every
    wrapped layer of one forward sees the same batch size, so the grouping is computed once."""

    def __init__(self, rows: Sequence[RowName]):
        super().__init__(rows)
        self.checked = False  # mixed.row_plan sets it: mixed() then skips its checks
        # True: the names are per *token* of a (1, N, ...) input (a ragged batch flattened into one
        # sequence, serve/batching.py), not per batch row
        self.per_token = False
        self._cache: dict[tuple[int, str], tuple[list[RowName], dict[RowName, tuple[torch.Tensor, slice | None]]]] = {}
        self._pools: dict[tuple, tuple] = {}  # (layer, rank) -> the layer's stacked LoRA weights (_pool)
        self._rowsel: dict[tuple, tuple] = {}  # (rows, pool order, adapters) -> (pool index per row, rows)
        self._layers: dict[tuple, Any] = {}  # per layer and batch size: what to run (mixed._LayerPlan)

    def with_rows(self, rows: Sequence[RowName]) -> "RowPlan":
        """A plan for ``rows`` over the same set of adapters (a decoding loop whose rows join and
        leave): the checks, per-layer plans (which depend on the adapter set only) and LoRA stacks
        carry over; the row groups and bmm row selections (keyed by batch size, not rows) do not."""
        if set(rows) != set(self):
            raise DeltaError(f"mixed batch: with_rows needs the same adapters ({sorted(set(self), key=str)}), "
                             f"got {sorted(set(rows), key=str)}")
        plan = RowPlan(rows)
        plan.checked, plan.per_token = self.checked, self.per_token
        plan._pools, plan._layers = self._pools, self._layers
        return plan

    def expand(self, n: int, device: torch.device):
        """(row names for a batch of n rows, {adapter: (row index tensor, slice if contiguous)})."""
        key = (n, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        m = len(self)
        if m == 0 or n % m:
            # either the names do not match the input rows, or the model runs an adapted layer on
            # a shared, non-batch tensor (DeBERTa's relative-position embeddings go through the
            # key/query projections as a batch of 1): say both, the caller knows which
            raise DeltaError(f"mixed batch: {m} row adapter(s) given but an adapted layer sees a batch of {n} rows; "
                             "pass one adapter name (or None) per input row - if you did, this model also runs "
                             "adapted layers on shared, non-batch tensors (e.g. DeBERTa's relative-position "
                             "embeddings), so its rows cannot take different adapters: run each adapter in its own batch")
        k = n // m  # beams / return sequences / flattened tokens per input row
        names = [self[j // k] for j in range(n)]
        rows: dict[RowName, list[int]] = {}
        for j, a in enumerate(names):
            rows.setdefault(a, []).append(j)
        groups = {}
        for a, idx in rows.items():
            contiguous = idx[-1] - idx[0] + 1 == len(idx)
            groups[a] = (torch.tensor(idx, device=device), slice(idx[0], idx[-1] + 1) if contiguous else None)
        self._cache[key] = (names, groups)
        return names, groups
