"""The KV cache of a ragged batch (continuous batching, ``batching.py``): every row's keys and values
in ONE batch-of-1 ``DynamicCache``, columns in the order they were computed, plus the row each
column belongs to.

    owner      0 0 0 0 1 1 1 0 1 2 2 2 2 0 1 2 │ a step appends its new tokens' columns here
    (slots)    └ row 0's prompt ┘ └1's┘ ...     │ (decoding rows: 1 each, joining rows: a prompt chunk)

    keys/values per layer: (1, H_kv, S, d_h), S = len(owner) = the rows' tokens, no padding

A step's new tokens (N of them, flattened in row order) see exactly their own row's earlier
columns and their own row's earlier new tokens, through a 4-D additive mask (1, 1, N, S + N):
0 where ``owner[c] == slot[n]`` and column c is not in n's future, the dtype's minimum elsewhere;
transformers passes a 4-D mask to attention as it is.  The masked scores underflow to exactly 0
after the softmax, so a row attends what it attends alone.

Why not a padded (B, T) batch: a joining prompt of L tokens would make every decoding row feed L
positions too (measured: one step of 16 rows × 16 positions costs 4x a step of 16 × 1 plus a
separate 1 × 16 prefill on this CPU); flattened, a step computes each real token once.  Rows
leaving drop their columns (one ``index_select`` per layer); rows joining need no splice at all.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, H_kv, T, d_h)


class Unsupported(Exception):
    """The model's cache or attention cannot run a ragged batch: serve it with static batches."""


def cache_kv(cache) -> KV:
    """The per-layer (keys, values) of a DynamicCache, on any transformers release."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        if any(type(lay).__name__ != "DynamicLayer" for lay in layers):  # sliding window, state-space...
            raise Unsupported(f"cache layers {sorted({type(x).__name__ for x in layers})}")
        kv = [(lay.keys, lay.values) for lay in layers]
    elif hasattr(cache, "key_cache"):
        kv = list(zip(cache.key_cache, cache.value_cache))
    else:
        raise Unsupported(f"cache type {type(cache).__name__}")
    if not kv or any(not isinstance(k, torch.Tensor) or k.dim() != 4 for k, _ in kv):
        raise Unsupported("cache layers are not (B, H, T, d) keys/values")
    return kv


def make_cache(kv: KV):
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


class RaggedCache:
    """The running rows' keys/values and the slot (row id) of every column."""

    attn = None  # the model's own attention implementation, fed the 4-D mask

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.owner = torch.empty(0, dtype=torch.long, device=self.device)  # (S,) slot of each column

    @property
    def length(self) -> int:
        return int(self.owner.numel())

    def ordered(self, feed: list) -> list:
        return feed

    def mark(self) -> int:
        return self.length

    def rollback(self, mark: int) -> None:
        self.truncate(mark)

    def inputs(self, slots: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> dict:
        """Model keywords for new tokens of rows ``slots`` (N,) at positions ``pos`` (N,)."""
        return {"attention_mask": self.mask(slots, dtype)}

    def mask(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (1, 1, N, S + N) of N new tokens whose rows are ``slots`` (N,), each
        row's new tokens contiguous and in order."""
        s, n = self.length, slots.numel()
        owner = torch.cat([self.owner, slots])  # (S + N,)
        allowed = owner[None, :] == slots[:, None]  # (N, S + N) same row
        col = torch.arange(s + n, device=self.device)
        allowed &= col[None, :] <= (s + torch.arange(n, device=self.device))[:, None]  # not in its future
        mask = torch.zeros((n, s + n), dtype=dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]

    def appended(self, slots: torch.Tensor) -> None:
        """A forward appended the columns of ``slots`` (N,) to every layer: record their owners."""
        self.owner = torch.cat([self.owner, slots])

    def truncate(self, length: int) -> None:
        """Back to ``length`` columns (a forward that raised may have extended some layers only)."""
        if length == 0:
            self.reset()
            return
        kv = cache_kv(self.cache)
        if any(k.shape[2] != length for k, _ in kv):
            self.cache = make_cache([(k[:, :, :length], v[:, :, :length]) for k, v in kv])
        self.owner = self.owner[:length]

    def keep(self, slots: list[int]) -> None:
        """Drop every column whose row is not in ``slots`` (rows that left)."""
        if not slots:
            self.reset()
            return
        alive = torch.isin(self.owner, torch.tensor(slots, device=self.device))  # (S,)
        if bool(alive.all()):
            return
        cols = alive.nonzero().squeeze(1)
        self.cache = make_cache([(k.index_select(2, cols.to(k.device)), v.index_select(2, cols.to(v.device)))
                                 for k, v in cache_kv(self.cache)])
        self.owner = self.owner.index_select(0, cols)


__all__ = ["KV", "RaggedCache", "Unsupported", "cache_kv", "make_cache"]
