"""Continuous batching for ``deltatune serve``: rows join the running batch at the next decoding
step and leave it when done, each with its own adapter, sampling settings, seed and KV-cache slot.

    queue ─► engine loop (event loop) ── every step ──► RunningBatch.step(joining) on the model thread
                                                           1. decode one token for the running rows
                                                           2. prefill the joining rows (their 1st token)
                                                              and splice their caches in
                                                           3. rows at EOS / max_new_tokens / a stop
                                                              string / disconnected leave

The cache is one left-padded (right-aligned) ``DynamicCache``: per layer keys and values of shape
(B, H_kv, T, d_h), T = the longest row; a row's earlier slots are padding (attention mask 0):

    row 0 (running, 6 tokens)   k k k k k k │ + one column per step for every row
    row 1 (joined, 3 tokens)    · · · k k k │   · = zero key/value, mask 0, never attended
    join  = pad the shorter of (running, newcomers) on the left along T, concatenate along B
    leave = index_select along B, then drop the leading columns no row uses any more

Each row's position ids count its own real tokens (what ``generate`` computes from the mask), so
a row computes what it computes alone.  Tokens are chosen per row exactly as the static path does
(``engine.RowSampler``: the row's own processors and ``torch.Generator``, then argmax), so a
greedy or seeded row gives the same tokens whatever it shares steps with.

Why not transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``,
a paged cache): it flattens every request into one ragged sequence (B = 1, the tokens of all rows
concatenated) and runs the model through its own attention interface.  deltatune's per-row
adapter routing (``dt.mixed``) maps *batch rows* to adapters; in a flattened batch there are no
rows to route, and prompt/prefix adapters add virtual tokens through a model-level hook the
manager does not call.  Prompt/prefix rows and beam search therefore keep the static path (a
whole ``generate`` call, ``engine.py``); every additive method (LoRA, DoRA, IA³, adapters, VeRA
...) and the bare base decode here.  Caches are read and built through the ``layers[i].keys``
(transformers ≥ 4.54) or ``key_cache`` (older) attributes, feature-detected; a model whose cache
is not a plain per-layer key/value cache (state-space, sliding-window layers) raises
``Unsupported`` on its first prefill and the engine falls back to static batching.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from ..api import activate, disabled
from ..core.delta import get_state
from ..methods._hf_compat import cache_kwarg, output_cache
from ..mixed import mixed, row_plan
from .stream import EngineEvents, LogprobTap

log = logging.getLogger("deltatune.serve")

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, H_kv, T, d_h)


class Unsupported(Exception):
    """The model's cache cannot be spliced row by row: serve it with static batches."""


@dataclass
class Row:
    job: "Job"  # noqa: F821 - engine.Job (that module imports this one)
    sampler: Callable | None  # RowSampler for this row alone (None: plain greedy)
    tap: LogprobTap | None  # keeps the step's log-softmax when the request asked for logprobs
    last: float  # perf_counter of the previous token (for time to first token / inter-token latency)
    toks: list[int] = field(default_factory=list)  # generated so far
    peak: int = 0  # the most rows this one shared a step with (reported as batch_size)
    done: bool = False


@dataclass
class Part:
    """Rows and their cache: the running batch, or newcomers about to be spliced in."""

    rows: list[Row]
    cache: object  # DynamicCache, right-aligned
    mask: torch.Tensor  # (B, T) long, 1 = a real token


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


def select(part: Part, idx: list[int]) -> Part:
    """Rows ``idx`` of ``part``, without the leading columns none of them uses."""
    sel = torch.tensor(idx, dtype=torch.long)
    mask = part.mask.index_select(0, sel)
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    kv = [(k.index_select(0, sel.to(k.device))[:, :, start:], v.index_select(0, sel.to(v.device))[:, :, start:])
          for k, v in cache_kv(part.cache)]
    return Part([part.rows[i] for i in idx], make_cache(kv), mask[:, start:].contiguous())


def splice(parts: list[Part]) -> Part:
    """One right-aligned batch of ``parts``: the shorter ones padded on the left (zero keys/values,
    mask 0), then concatenated along the batch."""
    parts = [p for p in parts if p.rows]
    if len(parts) == 1:
        return parts[0]
    t = max(p.mask.shape[1] for p in parts)

    def left(x: torch.Tensor, dim: int) -> torch.Tensor:
        gap = t - x.shape[dim]
        if not gap:
            return x
        shape = list(x.shape)
        shape[dim] = gap
        return torch.cat([x.new_zeros(shape), x], dim)

    kvs = [cache_kv(p.cache) for p in parts]
    kv = [(torch.cat([left(kvp[i][0], 2) for kvp in kvs]), torch.cat([left(kvp[i][1], 2) for kvp in kvs]))
          for i in range(len(kvs[0]))]
    return Part([r for p in parts for r in p.rows], make_cache(kv), torch.cat([left(p.mask, 1) for p in parts]))


class RunningBatch:
    """The rows decoding now (used on the model thread only).  ``step(joining)`` runs one decoding
    step and returns the jobs that finished (with ``result`` or ``error`` set)."""

    def __init__(self, engine):
        self.engine = engine  # engine.Engine: routing, padding, finishing, errors
        self.model = engine.model
        self.events: EngineEvents = engine.events
        self.part: Part | None = None
        self.plans: dict[frozenset, object] = {}  # adapters in a batch -> its last mixed.RowPlan
        self.loaded: tuple = ()  # the loaded adapters those plans were checked against
        self.key = cache_kwarg(self.model)
        if self.key is None:
            raise Unsupported("the model's forward takes no KV cache")
        params = inspect.signature(self.model.forward).parameters
        self.positions = "position_ids" in params  # else the model numbers positions itself (from the mask)

    @property
    def size(self) -> int:
        return len(self.part.rows) if self.part is not None else 0

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self, joining: list) -> list:
        finished: list = []
        if self.part is not None:
            self.part = self._decode(self.part, finished)
        if joining:
            new = self._prefill(joining, finished)
            self.part = splice([p for p in (self.part, *new) if p is not None]) if new or self.part else None
        if self.part is not None:
            self.part = self._leave(self.part, finished)
        self.events.on_running(self.size)
        return finished

    def abort(self, error) -> list:
        """Every running row fails with ``error`` (a failure outside the per-row isolation)."""
        jobs = [r.job for r in self.part.rows] if self.part is not None else []
        self.part = None
        for j in jobs:
            j.error = error
        return jobs

    # ------------------------------------------------------------------ model calls
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, rows: list[Row]):
        """Logits of each row's last position (B, V) in float32, and the cache (extended in place)."""
        kw = {"input_ids": ids, "attention_mask": mask, "use_cache": True, self.key: cache}
        if self.positions:  # each row counts its own real tokens: (B, T_new)
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with self._route(rows):
            out = self.model(**kw)
        return out.logits[:, -1].float(), output_cache(out) or cache

    def _route(self, rows: list[Row]):
        """Rows of several adapters: a mixed batch.  Its checks (a walk over every layer), layer
        plans and stacked LoRA weights are kept per set of adapters until an adapter is attached
        or deleted, though rows join and leave at almost every step; one adapter: it is
        activated only when it changes (``activate`` walks every layer too)."""
        names = [r.job.adapter for r in rows]
        st = get_state(self.model)
        if len(set(names)) == 1 and names[0] is not None:
            if list(st.active) != names[:1]:
                activate(self.model, names[:1])
            return contextlib.nullcontext()
        if len(set(names)) == 1:
            return disabled(self.model)
        loaded = tuple((n, id(a)) for n, a in st.adapters.items())
        if self.loaded != loaded:  # an adapter was attached or deleted: check everything again
            self.loaded, self.plans = loaded, {}
        seen = self.plans.get(frozenset(names))
        plan = seen.with_rows(names) if seen is not None else row_plan(self.model, names)
        self.plans[frozenset(names)] = plan
        return mixed(self.model, plan)

    def _decode(self, part: Part, finished: list) -> Part | None:
        """One new token for every row of ``part``; if the batch raises, each row runs alone so only
        a row failing by itself gets the error."""
        st = get_state(self.model)
        gone = [i for i, r in enumerate(part.rows) if r.job.adapter is not None and r.job.adapter not in st.adapters]
        if gone:  # deleted between two steps (admin calls run between steps)
            for i in gone:
                part.rows[i].job.error = self.engine.unloaded(part.rows[i].job.adapter)
                finished.append(part.rows[i].job)
            keep = [i for i in range(len(part.rows)) if i not in gone]
            if not keep:
                return None
            part = select(part, keep)
        ids = torch.tensor([[r.toks[-1]] for r in part.rows])  # (B, 1) each row's last token
        mask = torch.cat([part.mask, part.mask.new_ones(len(part.rows), 1)], 1)  # (B, T + 1)
        try:
            logits, cache = self._forward(ids, mask, part.cache, part.rows)
        except Exception as e:  # noqa: BLE001 - isolated below, reported per row
            if len(part.rows) == 1:
                self._fail(part.rows[0], e, finished)
                return None
            log.info("a decoding step of %d rows failed (%s: %s); running its rows apart", len(part.rows),
                     type(e).__name__, e)
            alone = [self._decode(select(part, [i]), finished) for i in range(len(part.rows))]
            alone = [p for p in alone if p is not None]
            return splice(alone) if alone else None
        part = Part(part.rows, cache, mask)
        self._choose(part.rows, logits)
        return part

    def _prefill(self, jobs: list, finished: list) -> list[Part]:
        """Run the prompts of ``jobs`` (left-padded, one forward) and give each its first token; a
        prompt pass that raises is re-run apart (per adapter, then per row), as the static path does."""
        try:
            ids, mask = self.engine._padded(jobs, left=True)  # (B, T)
            self.events.on_batch(jobs)
            logits, cache = self._forward(ids, mask, DynamicCache(), [Row(j, None, None, 0.0) for j in jobs])
            cache_kv(cache)  # a cache this loop cannot splice: raise Unsupported before any row took a token
        except Unsupported:
            raise
        except Exception as e:  # noqa: BLE001
            if len(jobs) == 1:
                jobs[0].error = self.engine._error(e)
                finished.append(jobs[0])
                return []
            by: dict = {}
            for j in jobs:
                by.setdefault(j.adapter, []).append(j)
            groups = list(by.values()) if len(by) > 1 else [[j] for j in jobs]
            log.info("a prompt pass of %d rows failed (%s: %s); running it as %d parts", len(jobs),
                     type(e).__name__, e, len(groups))
            return [p for g in groups for p in self._prefill(g, finished)]
        rows = [self._row(j) for j in jobs]
        self._choose(rows, logits)
        return [Part(rows, cache, mask)]

    # ------------------------------------------------------------------ tokens
    def _row(self, job) -> Row:
        s = job.sampling
        sampler = self.engine.sampler([job], len(job.ids)) if s.temperature > 0 or s.repetition_penalty != 1.0 \
            else None
        tap = LogprobTap([job]) if job.logprobs is not None else None
        return Row(job, sampler, tap, job.t0)

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> None:  # logits (B, V) float32
        """Each row's next token: its logprob tap, then its own processors/sampler, then argmax."""
        for i, r in enumerate(rows):
            if r.tap is not None:
                r.tap(None, logits[i:i + 1])
            if r.sampler is not None:
                seen = torch.tensor([r.job.ids + r.toks])  # (1, T) the row's prompt and tokens so far
                logits[i:i + 1] = r.sampler(seen, logits[i:i + 1])
        toks = logits.argmax(-1).tolist()
        now = time.perf_counter()
        for r, tok in zip(rows, toks):
            self._accept(r, tok, now, len(rows))

    def _accept(self, row: Row, tok: int, now: float, batch: int) -> None:
        """Hand ``tok`` on (streaming, metrics, logprobs) and decide whether the row is done, as
        ``stream.RowStreamer`` does for the static path."""
        j, eng = row.job, self.engine
        row.toks.append(tok)
        row.peak = max(row.peak, batch)
        j.delivered = len(row.toks)
        self.events.on_token(j, len(row.toks) == 1, now - row.last)
        row.last = now
        if tok == eng.eos:
            row.done = True
            return
        if row.tap is not None:
            j.trace.append(row.tap.entry(0, tok, j.logprobs))
        if j.on_token is not None:
            j.on_token(tok)
        row.done = len(row.toks) >= j.max_new_tokens or j.cancelled or (
            bool(j.sampling.stop) and eng.tokenizer is not None
            and any(s in eng._decode(row.toks) for s in j.sampling.stop))

    def _leave(self, part: Part, finished: list) -> Part | None:
        keep = []
        for i, r in enumerate(part.rows):
            if not r.done:
                keep.append(i)
                continue
            j = r.job
            toks, text, reason = self.engine._finish(r.toks[:j.max_new_tokens], j)
            j.result = {"output_ids": toks, "text": text, "finish_reason": reason, "batch_size": r.peak}
            if j.logprobs is not None:
                j.result["logprobs"] = j.trace[:len(toks)]
            finished.append(j)
        if len(keep) == len(part.rows):
            return part
        return select(part, keep) if keep else None

    def _fail(self, row: Row, e: Exception, finished: list) -> None:
        row.job.error = self.engine._error(e)
        finished.append(row.job)


__all__ = ["Part", "Row", "RunningBatch", "Unsupported", "cache_kv", "make_cache", "select", "splice"]
