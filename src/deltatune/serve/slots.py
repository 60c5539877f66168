"""The KV cache of continuous batching with per-row attention (``batching.py``): the step's tokens
still run flattened as one (1, N) sequence through every linear layer, but each row keeps its keys
and values in a slot of its own, and attention runs per row over that slot only.

    keys/values per layer: (C, H_kv, T_cap, d_h)    slot b = one running row, columns 0..len_b-1
                                                    (C, T_cap grow on demand; slots stay dense:
                                                    a row leaving hands its slot to the last row)

    a step:  update()   writes each new token's key/value at [slot, :, position] (index_put)
             attention  decoding rows (1 token each):   q (C, H_kv, rep, d) against the slots
                                                        (C, H_kv, T, d), T = longest row, no copy
                        rows feeding prompt tokens:     q (J, H_kv, rep·L, d) against their slots
                        (GQA: the rep query heads of a key head share its keys, no repeat_kv copy)

Why (measured, bench/serve_step.py): under the flattened 4-D mask of ``ragged.py`` every new token
attends over all rows' columns (N × S, S = the sum of the rows' lengths, ~700 for 16 rows) and the
grouped key/value heads are copied to every query head (``repeat_kv``), which a (B, 1) static
decode step avoids.  Here a decoding row attends to its own ≤ T columns, as in a static batch, but
without the padding of rows that finished.

The model runs with ``config._attn_implementation = "deltatune_slots"`` (registered with
transformers' ``AttentionInterface`` when the first slot cache is made) for the step only.  The step's layout reaches the attention
function on the key tensor the cache returned (``keys.dt_step``): model-level keywords would be
simpler, but not every model passes them on to its attention (GPT-2 in transformers 4.56 does not).
A model that changes the keys between its cache and its attention, or calls its cache differently,
fails ``_verify`` in ``batching.py``, which then falls back to ``ragged.py``'s flattened cache and
4-D mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from .ragged import Unsupported

ATTN = "deltatune_slots"


class Group:
    """Rows of one step attended in one SDPA call: B slots, L query positions per slot.

    tok (B·L,) index of each query in the flattened step (padding: a copy of some real token; None:
    the step's tokens are the slots' queries in slot order, one each),
    real (R,) which of the B·L queries are real (None: all), dest (R,) their index in the step,
    slots (B,) the cache slots (None: slots 0..B-1), end (B, L) the columns each query may see."""

    def __init__(self, tok, real, dest, slots, end):
        self.tok, self.real, self.dest, self.slots, self.end = tok, real, dest, slots, end
        self.length = int(end.max())
        self._mask: tuple[int, torch.Tensor] | None = None

    def mask(self, rep: int) -> torch.Tensor | None:
        """(B, 1, rep·L, T) bool, True = attend; built by the first layer, kept for the others.  None
        when every query sees every column (one decoding row, or rows of one length)."""
        if self._mask is None or self._mask[0] != rep:
            b, L = self.end.shape
            if L == 1 and int(self.end.min()) == self.length:
                self._mask = (rep, None)
                return None
            m = torch.arange(self.length, device=self.end.device)[None, None, :] < self.end[:, :, None]  # (B, L, T)
            if rep > 1 and L > 1:  # query order in a key head's group: rep-major, then position
                m = m[:, None].expand(b, rep, L, self.length).reshape(b, 1, rep * L, self.length)
            else:
                m = m[:, None]  # (B, 1, L, T): broadcast over the rep heads (L == 1) or rep == 1
            self._mask = (rep, m)
        return self._mask[1]


class Step:
    """One forward's layout, shared by all layers: where each new token is written, and the groups."""

    def __init__(self, index: torch.Tensor, pos: torch.Tensor, groups: list[Group]):
        self.index, self.pos, self.groups = index, pos, groups  # (N,) slot and column of each new token

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale) -> torch.Tensor:
        """query (1, H, N, d), keys/values (C, H_kv, T_cap, d) -> (1, N, H, d_v)."""
        _, h, n, d = query.shape
        hkv, dv = keys.shape[1], values.shape[-1]
        rep = h // hkv
        if rep * hkv != h:
            raise Unsupported(f"{h} query heads over {hkv} key/value heads")
        q = query[0].transpose(0, 1)  # (N, H, d)
        if len(self.groups) == 1 and self.groups[0].tok is None:  # every slot decodes, in slot order
            g = self.groups[0]
            o = F.scaled_dot_product_attention(q.reshape(n, hkv, rep, d), keys[:n, :, :g.length],
                                               values[:n, :, :g.length], attn_mask=g.mask(rep), scale=scale)
            return o.reshape(1, n, h, dv)  # (N, H_kv, rep, d_v) -> (1, N, H, d_v)
        out = query.new_empty(n, h, dv)
        for g in self.groups:
            b, L = g.end.shape
            tok = g.tok if g.tok is not None else torch.arange(b, device=q.device)
            qg = q.index_select(0, tok).view(b, L, hkv, rep, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, rep * L, d)
            k, v = (keys[:b], values[:b]) if g.slots is None else (keys.index_select(0, g.slots),
                                                                  values.index_select(0, g.slots))
            o = F.scaled_dot_product_attention(qg, k[:, :, :g.length], v[:, :, :g.length], attn_mask=g.mask(rep),
                                               scale=scale)  # (B, H_kv, rep·L, d_v)
            o = o.view(b, hkv, rep, L, dv).permute(0, 3, 1, 2, 4).reshape(b * L, h, dv)  # (B·L, H, d_v)
            out.index_copy_(0, g.dest, o if g.real is None else o.index_select(0, g.real))
        return out.unsqueeze(0)


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    step = getattr(key, "dt_step", None)  # set by SlotCache.update on the keys it returned
    if step is None:  # the model changed the keys between its cache and its attention
        raise Unsupported("the model's attention did not receive the slot cache's keys")
    return step.attend(query, key, value, scaling), None


def register() -> None:
    """Make ``ATTN`` a name transformers' models resolve, on the first slot cache rather than at
    import (importing deltatune.serve changes nothing in transformers); an entry already there --
    a test's stand-in -- is left alone."""
    if ATTN not in AttentionInterface():
        AttentionInterface.register(ATTN, slot_attention)


class SlotCache(DynamicCache):
    """Each running row's keys and values in a slot of its own (see the module docstring).  Rows
    are named by their id (``Row.slot`` in ``batching.py``); ``index`` maps an id to its slot."""

    attn = ATTN  # the model's attention implementation during a step

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        register()
        self.device = torch.device(device)
        self.reset()

    # ------------------------------------------------------------------ the layout (batching.py)
    def reset(self) -> None:
        self.kv: list[list[torch.Tensor]] = []  # per layer [keys, values] (C, H_kv, T_cap, d)
        self.ids: list[int] = []  # row id of each slot in use
        self.index: dict[int, int] = {}  # row id -> slot
        self.lens: list[int] = []  # columns filled, per slot
        self.step: Step | None = None

    @property
    def cache(self):
        return self

    @cache.setter
    def cache(self, value) -> None:
        if value is not self:
            raise Unsupported(f"the model returned another cache ({type(value).__name__}) than the one it was given")

    @property
    def length(self) -> int:
        return sum(self.lens)

    def ordered(self, feed: list) -> list:
        """``feed`` ((Row, tokens) pairs) in slot order, rows without a slot last: a step where every
        slot decodes then attends without gathering queries or scattering outputs."""
        last = len(self.ids)
        return sorted(feed, key=lambda f: self.index.get(f[0].slot, last))

    def mark(self) -> list[int]:
        return list(self.lens)

    def rollback(self, mark: list[int]) -> None:
        """A forward that raised: its writes lie past the rows' lengths and are overwritten later."""
        self.lens[:len(mark)] = mark

    def inputs(self, rows: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> dict:
        """Model keywords for new tokens of rows ``rows`` (N,) (row ids, each row's tokens contiguous)
        at positions ``pos`` (N,) = the columns they fill in their rows' slots."""
        ids = rows.tolist()
        for r in dict.fromkeys(ids):
            if r not in self.index:
                self.index[r] = len(self.ids)
                self.ids.append(r)
                self.lens.append(0)
        index = torch.tensor([self.index[r] for r in ids], device=self.device)  # (N,)
        self.step = Step(index, pos, self._groups(ids, pos.tolist()))
        return {"attention_mask": None}

    def _groups(self, ids: list[int], pos: list[int]) -> list[Group]:
        runs: dict[int, list[int]] = {}  # row id -> its token indices in the step
        for t, r in enumerate(ids):
            runs.setdefault(r, []).append(t)
        ones = {r: ts[0] for r, ts in runs.items() if len(ts) == 1}
        groups = []
        if ones:  # every slot in use, one query each: a view of the slots, no gather
            c = len(self.ids)
            first = next(iter(ones.values()))
            tok = [ones.get(r, first) for r in self.ids]  # slots not decoding now: a dummy query
            end = [pos[ones[r]] + 1 if r in ones else 1 for r in self.ids]
            real = [b for b, r in enumerate(self.ids) if r in ones]
            groups.append(self._group(tok, real, [tok[b] for b in real], None, [[e] for e in end]))
        many = {r: ts for r, ts in runs.items() if len(ts) > 1}
        if many:  # rows feeding prompt tokens: their slots gathered, L = the longest run
            L = max(len(ts) for ts in many.values())
            tok, real, ends = [], [], []
            for b, ts in enumerate(many.values()):
                tok += ts + [ts[0]] * (L - len(ts))
                real += range(b * L, b * L + len(ts))
                ends.append([pos[t] + 1 for t in ts] + [1] * (L - len(ts)))
            slots = [self.index[r] for r in many]
            groups.append(self._group(tok, real, [tok[i] for i in real], slots, ends))
        return groups

    def _group(self, tok, real, dest, slots, ends) -> Group:
        dev = self.device
        if slots is not None and slots == list(range(len(slots))):
            slots = None  # slots 0..B-1: a view of the cache, no gather
        in_order = slots is None and len(ends[0]) == 1 and len(real) == len(tok) and tok == list(range(len(tok)))
        return Group(None if in_order else torch.tensor(tok, device=dev),
                     None if len(real) == len(tok) else torch.tensor(real, device=dev),
                     torch.tensor(dest, device=dev), None if slots is None else torch.tensor(slots, device=dev),
                     torch.tensor(ends, device=dev))

    def appended(self, rows: torch.Tensor) -> None:
        """The forward wrote the new tokens: the rows' lengths grow."""
        for r in rows.tolist():
            self.lens[self.index[r]] += 1
        self.step = None

    def keep(self, ids: list[int]) -> None:
        """Rows not in ``ids`` leave: the last slot's row moves into each freed slot (slots stay dense)."""
        if not ids:
            self.reset()
            return
        alive = set(ids)
        for r in [r for r in self.ids if r not in alive]:
            b, last = self.index.pop(r), len(self.ids) - 1
            if b != last:
                moved = self.ids[last]
                for kv in self.kv:
                    for t in kv:
                        t[b].copy_(t[last])
                self.ids[b], self.lens[b], self.index[moved] = moved, self.lens[last], b
            self.ids.pop()
            self.lens.pop()

    # ------------------------------------------------------------------ the Cache API the model calls
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's new keys/values (1, H_kv, N, d) into their rows' slots; the attention
        function reads the slots (C, H_kv, T_cap, d)."""
        st = self.step
        if st is None or key_states.shape[0] != 1 or key_states.shape[2] != st.index.numel():
            raise Unsupported("the model called its cache outside a flattened step")
        k, v = self._layer(layer_idx, key_states, value_states)
        k[st.index, :, st.pos] = key_states[0].transpose(0, 1)  # (N, H_kv, d)
        v[st.index, :, st.pos] = value_states[0].transpose(0, 1)
        k.dt_step = st  # the attention function finds the step's layout on the keys it is given
        return k, v

    def _layer(self, i: int, key_states: torch.Tensor, value_states: torch.Tensor) -> list[torch.Tensor]:
        """Layer ``i``'s slot tensors, grown to the slots in use and the longest row after this step."""
        while len(self.kv) <= i:
            self.kv.append([])
        kv = self.kv[i]
        c, t = len(self.ids), int(self.step.pos.max()) + 1
        if not kv or kv[0].shape[0] < c or kv[0].shape[2] < t:
            old = kv
            cap_c = max(c, 2 * old[0].shape[0]) if old and old[0].shape[0] < c else (old[0].shape[0] if old else c)
            cap_t = max(t, 2 * old[0].shape[2]) if old and old[0].shape[2] < t else (old[0].shape[2] if old else t)
            kv = [s.new_zeros(cap_c, s.shape[1], max(cap_t, 64), s.shape[3]) for s in (key_states, value_states)]
            for new, prev in zip(kv, old):
                new[:prev.shape[0], :, :prev.shape[2]] = prev
            self.kv[i] = kv
        return kv

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lens, default=0)


__all__ = ["ATTN", "SlotCache", "Step", "slot_attention"]
