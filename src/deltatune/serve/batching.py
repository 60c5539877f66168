"""Continuous batching for ``deltatune serve``: rows join the running batch at the next decoding
step and leave it when done, each with its own adapter, sampling settings, seed and KV columns.

    queue ─► engine loop (event loop) ── every step ──► RunningBatch.step(joining) on the model thread
                                                           ONE forward over a ragged batch:
                                                             decoding rows   1 token each (their last)
                                                             joining rows    their prompt (≤ prefill_chunk
                                                                             prompt tokens per step in all)
                                                           then each row that finished its prompt takes
                                                           a token; rows at EOS / max_new_tokens / a stop
                                                           string / disconnected leave

The step's tokens are flattened into one sequence (1, N) — no padding — with per-token adapter
routing (``mixed`` with a ``per_token`` plan); each row's keys/values sit in a slot of their own
and attention runs per row (``slots.py``), or, for a model that cannot run that, in one flattened
cache under a 4-D mask that keeps each row to its own columns (``ragged.py``; ``LAYOUTS``).  Each row's position ids count its own tokens, so a row
computes what it computes alone.  Tokens are chosen per row exactly as the static path does
(``engine.RowSampler``: the row's own processors and ``torch.Generator``, then argmax), so a greedy
or seeded row gives the same tokens whatever it shares steps with.  A long prompt is fed in chunks
(``prefill_chunk`` prompt tokens per step over all joining rows), so it does not stall the rows
decoding meanwhile.

Why not transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``,
a paged cache): it flattens the batch the same way but runs the model through its own attention
interface and paged cache, and deltatune's per-token adapter routing and per-row samplers would
sit outside it; prompt/prefix adapters add virtual tokens through a model-level hook the manager
does not call.  Prompt/prefix rows and beam search therefore keep the static path (a whole
``generate`` call, ``engine.py``); every additive method (LoRA, DoRA, IA³, adapters, VeRA ...) and
the bare base decode here.  A model whose cache is not a plain per-layer key/value cache
(state-space), with sliding-window attention, or that does not honour a 4-D mask (checked once
against separate runs) raises ``Unsupported`` on the first step and the engine falls back to
static batching.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..api import activate, disabled
from ..core.delta import get_state
from ..methods._hf_compat import cache_kwarg, output_cache
from ..mixed import mixed, row_plan
from .ragged import RaggedCache, Unsupported, cache_kv
from .slots import SlotCache
from .stream import EngineEvents, LogprobTap

log = logging.getLogger("deltatune.serve")
ACTIVATE_AFTER = 8  # steps of one adapter alone before it is activated (activate walks every layer)
# KV layouts in order of preference, the first that passes _verify serves: per-row slots with per-row
# attention (slots.py), else one flattened cache under a 4-D mask (ragged.py), else static batches
LAYOUTS = (SlotCache, RaggedCache)


@dataclass
class Row:
    job: "Job"  # noqa: F821 - engine.Job (that module imports this one)
    sampler: Callable | None  # RowSampler for this row alone (None: plain greedy)
    tap: LogprobTap | None  # keeps the step's log-softmax when the request asked for logprobs
    last: float  # perf_counter of the previous token (for time to first token / inter-token latency)
    slot: int = 0  # this row's id in the ragged cache (RaggedCache.owner)
    pending: list[int] = field(default_factory=list)  # prompt tokens not fed yet (chunked prefill)
    pos: int = 0  # tokens of this row in the cache = the position id of its next token
    toks: list[int] = field(default_factory=list)  # generated so far
    peak: int = 0  # the most rows this one shared a step with (reported as batch_size)
    done: bool = False


Feed = list[tuple[Row, list[int]]]  # the tokens each row feeds one forward


class RunningBatch:
    """The rows decoding now (used on the model thread only).  ``step(joining)`` runs one decoding
    step and returns the jobs that finished (with ``result`` or ``error`` set)."""

    def __init__(self, engine):
        self.engine = engine  # engine.Engine: routing, finishing, errors, config
        self.model = engine.model
        self.events: EngineEvents = engine.events
        self.chunk = engine.cfg.prefill_chunk
        self.rows: list[Row] = []
        self.next_slot = 0
        self.plans: dict[frozenset, object] = {}  # adapters in a step -> its last mixed.RowPlan
        self.loaded: tuple = ()  # the loaded adapters those plans were checked against
        self.alone: tuple = (None, 0)  # (adapter, steps) of the latest run of single-adapter steps
        self.verified = False  # the first step checks the model honours the ragged mask
        self.key = cache_kwarg(self.model)
        if self.key is None:
            raise Unsupported("the model's forward takes no KV cache")
        params = inspect.signature(self.model.forward).parameters
        if "position_ids" not in params:
            raise Unsupported("the model's forward takes no position_ids")
        self.keep_arg = "logits_to_keep" in params  # lm_head on each row's last token only
        cfg = getattr(self.model, "config", None)
        kinds = set(getattr(cfg, "layer_types", None) or ())
        if any("sliding" in str(k) or "chunk" in str(k) for k in kinds) or (
                getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)):
            raise Unsupported("sliding-window attention (a 4-D mask would let rows see past their window)")
        p = next(self.model.parameters())
        self.dtype = p.dtype if p.is_floating_point() else torch.float32
        self.cache = LAYOUTS[0](p.device)

    @property
    def size(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self, joining: list) -> list:
        finished: list = []
        st = get_state(self.model)
        for r in self.rows:  # deleted between two steps (admin calls run between steps)
            if r.job.adapter is not None and r.job.adapter not in st.adapters:
                r.job.error = self.engine.unloaded(r.job.adapter)
        self._leave(finished)
        if not self.verified:
            self._verify()  # (raises Unsupported before any row joined: the engine serves them statically)
        if joining:
            self.events.on_batch(joining)
            self.rows += [self._row(j) for j in joining]
        feed, budget = [], self.chunk
        for r in self.rows:
            if not r.pending:
                feed.append((r, r.toks[-1:]))
            elif budget > 0:  # joining rows in arrival order share the step's prompt budget
                feed.append((r, r.pending[:budget]))
                budget -= len(feed[-1][1])
        self._feed(self.cache.ordered(feed), finished)
        self._leave(finished)
        self.events.on_running(self.size)
        return finished

    def abort(self, error) -> list:
        """Every running row fails with ``error`` (a failure outside the per-row isolation)."""
        jobs = [r.job for r in self.rows]
        self.rows = []
        self.cache.reset()
        for j in jobs:
            j.error = error
        return jobs

    # ------------------------------------------------------------------ model calls
    def _feed(self, feed: Feed, finished: list) -> None:
        """Run ``feed`` as one forward, then give a token to every row whose prompt is now all in;
        if the forward raises, each row runs alone so only a row failing by itself gets the error."""
        if not feed:
            return
        mark = self.cache.mark()
        try:
            logits = self._forward(feed)  # (R, V) float32
        except Unsupported:
            raise
        except Exception as e:  # noqa: BLE001 - isolated below, reported per row
            self.cache.rollback(mark)
            if len(feed) == 1:
                feed[0][0].job.error = self.engine._error(e)
                return
            log.info("a step of %d rows failed (%s: %s); running its rows apart", len(feed), type(e).__name__, e)
            for f in feed:
                self._feed([f], finished)
            return
        ready = []
        for i, (r, toks) in enumerate(feed):
            r.pos += len(toks)
            if r.pending:
                r.pending = r.pending[len(toks):]
            if not r.pending:
                ready.append(i)
        if ready:
            self._choose([feed[i][0] for i in ready], logits[ready] if len(ready) < len(feed) else logits)

    def _forward(self, feed: Feed, route=None) -> torch.Tensor:
        """Logits (R, V) float32 at the last fed token of each row of ``feed``; the cache grows by
        the fed tokens' keys and values.  ``route``: the routing context (default: the rows' adapters)."""
        dev = self.cache.device
        ids = torch.tensor([[t for _, toks in feed for t in toks]], device=dev)  # (1, N)
        pos = torch.tensor([[r.pos + i for r, toks in feed for i in range(len(toks))]], device=dev)  # (1, N)
        slots = torch.tensor([r.slot for r, toks in feed for _ in toks], device=dev)  # (N,)
        last = torch.tensor([len(toks) for _, toks in feed], device=dev).cumsum(0) - 1  # (R,)
        kw = {"input_ids": ids, "position_ids": pos, "use_cache": True, self.key: self.cache.cache,
              **self.cache.inputs(slots, pos[0], self.dtype)}
        if self.keep_arg:
            kw["logits_to_keep"] = last
        with route if route is not None else self._route([r.job.adapter for r, toks in feed for _ in toks]), \
                attention(self.model, self.cache.attn):
            out = self.model(**kw)
        cache = output_cache(out)
        if cache is not None and cache is not self.cache.cache:
            self.cache.cache = cache
        self.cache.appended(slots)
        logits = out.logits[0]  # (R, V), or (N, V) without logits_to_keep
        return (logits if self.keep_arg else logits.index_select(0, last)).float()

    def _verify(self) -> None:
        """Before any row takes a token: which KV layout (``LAYOUTS``) does the model run right?  Two
        short prompts run flattened must give their separate runs' logits (a model that ignored the
        mask, or whose attention never saw the step's layout, would mix the rows)."""
        saved, errors = self.cache, []
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", None) or 64)
        ids_a, ids_b = [t % vocab for t in (3, 5, 7, 11)], [t % vocab for t in (13, 17, 19)]
        for layout in LAYOUTS:
            a, b = Row(None, None, None, 0.0, slot=-1), Row(None, None, None, 0.0, slot=-2)
            self.cache = layout(saved.device)
            try:
                with disabled(self.model):  # the bare base, whatever the real steps route
                    both = self._forward([(a, ids_a), (b, ids_b)], route=contextlib.nullcontext())
                    if layout is RaggedCache:
                        cache_kv(self.cache.cache)
                    alone = torch.cat([self._alone(ids) for ids in (ids_a, ids_b)])
            except Exception as e:  # noqa: BLE001 - a model that cannot take this layout's inputs at all
                errors.append(f"{layout.__name__}: {type(e).__name__}: {e}")
                continue
            if torch.allclose(both, alone, rtol=1e-3, atol=1e-3 * float(alone.abs().max().clamp(min=1))):
                self.cache, self.verified = layout(saved.device), True
                return
            errors.append(f"{layout.__name__}: the model does not keep rows apart")
        self.cache = saved
        raise Unsupported("; ".join(errors))

    def _alone(self, ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.cache.device), use_cache=False)
        return out.logits[:, -1].float()  # (1, V)

    def _route(self, names: list):
        """The adapter of each fed token.  Tokens of several adapters: a per-token mixed plan; its
        checks (a walk over every layer), layer plans and stacked LoRA weights are kept per set of
        adapters until an adapter is attached or deleted, though rows join and leave at almost every
        step.  One adapter: its plain path if it is the active one; it is activated (a walk over
        every layer) only after ``ACTIVATE_AFTER`` steps alone, a mixed plan serves it until then."""
        kinds = set(names)
        st = get_state(self.model)
        if len(kinds) == 1:
            (name,) = kinds
            if name is not None and list(st.active) == [name] and not st.disabled:
                return contextlib.nullcontext()
            seen, n = self.alone
            self.alone = (name, n + 1 if seen == name else 1)
            if name is not None and self.alone[1] >= ACTIVATE_AFTER:
                activate(self.model, [name])
                return contextlib.nullcontext()
        else:
            self.alone = (None, 0)
        loaded = tuple((n, id(a)) for n, a in st.adapters.items())
        if self.loaded != loaded:  # an adapter was attached or deleted: check everything again
            self.loaded, self.plans = loaded, {}
        key = frozenset(kinds)
        seen_plan = self.plans.get(key)
        plan = seen_plan.with_rows(names) if seen_plan is not None else row_plan(self.model, names)
        plan.per_token = True
        self.plans[key] = plan
        return mixed(self.model, plan)

    # ------------------------------------------------------------------ tokens
    def _row(self, job) -> Row:
        s = job.sampling
        sampler = self.engine.sampler([job], len(job.ids)) if s.temperature > 0 or s.repetition_penalty != 1.0 \
            else None
        tap = LogprobTap([job]) if job.logprobs is not None else None
        self.next_slot += 1
        return Row(job, sampler, tap, job.t0, slot=self.next_slot, pending=list(job.ids))

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
            self._accept(r, tok, now, len(self.rows))
        self.engine.outbox.flush()

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
        if j.on_token_loop is not None:
            eng.outbox.post(j.on_token_loop, tok)
        row.done = len(row.toks) >= j.max_new_tokens or j.cancelled or (
            bool(j.sampling.stop) and eng.tokenizer is not None
            and any(s in eng._decode(row.toks) for s in j.sampling.stop))

    def _leave(self, finished: list) -> None:
        """Rows done or failed leave, and their cache columns with them."""
        keep = []
        for r in self.rows:
            j = r.job
            if j.error is not None:
                finished.append(j)
            elif not r.done:
                keep.append(r)
            else:
                toks, text, reason = self.engine._finish(r.toks[:j.max_new_tokens], j)
                j.result = {"output_ids": toks, "text": text, "finish_reason": reason, "batch_size": r.peak}
                if j.logprobs is not None:
                    j.result["logprobs"] = j.trace[:len(toks)]
                finished.append(j)
        if len(keep) != len(self.rows):
            self.rows = keep
            self.cache.keep([r.slot for r in keep])


@contextlib.contextmanager
def attention(model, name: str | None):
    """Run ``model`` with attention implementation ``name`` (None: its own) for one forward."""
    cfg = getattr(model, "config", None)
    prev = getattr(cfg, "_attn_implementation", None)
    if name is None or cfg is None or prev == name:
        yield
        return
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = prev


__all__ = ["LAYOUTS", "Row", "RunningBatch", "Unsupported", "attention"]
