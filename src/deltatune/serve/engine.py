"""The model side of ``deltatune serve``: one thread owns the model; a batcher gathers requests for
any adapters into mixed batches.

    request ─► asyncio queue ─► batcher: first job, then wait ≤ window for more (≤ max_batch)
                                   │ group by (kind, num_beams)
                                   ▼
                 model thread (1 worker):  dt.mixed(model, [adapter of each row]) → generate / forward
                                   │
                 per-request futures ◄─┘   (+ admin jobs: load / delete adapters, same thread, in order)

Everything that touches the model runs on that one thread, so loading or deleting an adapter
never races a forward pass: queued requests keep their place, and a request whose adapter was
deleted meanwhile gets a clean 404.

Sampling is decided per row, so it never splits a batch: greedy and sampled requests with any
temperature / top-k / top-p / seed share one ``generate(do_sample=False)`` call, and ``RowSampler``
(a logits processor) draws each sampled row's token from that row's own ``torch.Generator`` and
makes it the only finite logit, which greedy's argmax then takes.  Why not the alternatives:
``generate(do_sample=True)`` draws every row from one global generator, so a row's tokens would
depend on its neighbours (seeded requests could only run alone); a hand-written decode loop would
re-implement the KV cache, stopping and mixed routing that ``generate`` already does.  A row's
draws therefore depend only on its own seed and logits, and its first n tokens do not depend on
how long the batch runs, so trimming each row to its own ``max_new_tokens`` stays exact.

One bad row fails alone: a batch that raises is re-run without sharing (per adapter, then per
row), so only the row that fails by itself gets the error.  Prompts are bounded before they cost
anything: by characters on the event loop, by tokens (tokenized on a thread of its own, so
``/health`` never waits for a tokenizer) against the model's real context (positions minus
``max_new_tokens`` minus the adapter's virtual tokens).  ``/health`` turns 503 when a model-thread
call has run longer than ``liveness_s``.

Each row's tokens leave ``generate`` as they are decoded (``serve_stream.RowStreamer``, for
streaming responses and time-to-first-token); a job whose client left is skipped if still queued
and finished at the next step if running (``serve_stream.Cancelled``).

The job and error types and the prompt checks are in ``jobs.py``; the per-row logits processor
and stopping criterion in ``sampling.py`` (re-exported here); what runs one static batch on the
model thread in ``static.py`` (``Engine`` extends it).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..core.delta import DeltaError, get_state
from .batching import RunningBatch, Unsupported
from .jobs import (CONTEXT_KEYS, MAX_TEMPERATURE, MIN_TEMPERATURE, Job, ParamError, RequestError,  # noqa: F401
                   Sampling, check_text, context_size, validate_ids)
from .sampling import RowSampler, StopStrings
from .static import RUNNERS, StaticBatches  # noqa: F401 (RUNNERS: the runner per job kind)
from .stream import EngineEvents, Outbox
from ..methods._virtual_tokens import store


log = logging.getLogger("deltatune.serve")
CHARS_PER_TOKEN = 16  # a prompt over 16 characters per allowed token is refused before tokenizing
BATCHING = ("continuous", "static")
# the model thread runs further decoding steps itself while no row finished and no request waits,
# up to this long: each return to the event loop is a GIL hand-off and a loop turn, which on a
# loaded machine left the model idle between steps while the loop served streams
STEPS_BUDGET_S = 0.25


@dataclass
class EngineConfig:
    window_ms: float = 5.0  # wait this long after the first request for others to batch with it
    max_batch: int = 16  # rows per model call; more requests wait for the next batch
    max_new_tokens: int = 256  # per-request cap on generated tokens
    max_input_tokens: int = 1024  # per-request cap on prompt length (the model's context also caps it)
    max_prompt_chars: int | None = None  # cap on prompt text before tokenizing; None: CHARS_PER_TOKEN per token
    liveness_s: float = 300.0  # /health is 503 once one model-thread call runs longer (a stuck thread)
    max_queue: int = 256  # requests waiting beyond this are refused (429 + Retry-After), not queued without bound
    # "continuous": requests join the running batch at the next decoding step and leave when done
    # (batching.py); "static": a batch decodes to its longest request before the next one starts
    batching: str = "continuous"
    # continuous batching feeds joining prompts at most this many tokens per step in all (chunked
    # prefill), so a long prompt does not stall the rows decoding meanwhile
    prefill_chunk: int = 256


class Engine(StaticBatches):
    def __init__(self, model, tokenizer, cfg: EngineConfig, events: EngineEvents | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.events = events or EngineEvents()
        self.outbox = Outbox()
        get_state(model, create=True)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deltatune-model")
        # tokenizing a long prompt must block neither the event loop nor the model; one thread, as a
        # fast tokenizer's settings are not safe to share between concurrent calls
        self.tok_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deltatune-tokenize")
        self.admins = 0  # admin calls waiting for the model thread (a running batch yields to them)
        self.busy_since: float | None = None  # monotonic start of the running model-thread call
        self.context = context_size(model)  # positions the model has (None: unknown, no check)
        tokens = min(cfg.max_input_tokens, self.context or cfg.max_input_tokens)
        self.max_chars = cfg.max_prompt_chars or CHARS_PER_TOKEN * tokens
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        gc = getattr(model, "generation_config", None)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None and gc is not None:
            eos = gc.eos_token_id[0] if isinstance(gc.eos_token_id, list) else gc.eos_token_id
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.eos = eos
        self.pad = pad if pad is not None else (eos if eos is not None else 0)
        if cfg.prefill_chunk < 1:
            raise DeltaError(f"serve: prefill_chunk must be at least 1 token, got {cfg.prefill_chunk}")
        if cfg.batching not in BATCHING:
            raise DeltaError(f"serve: batching must be one of {BATCHING}, got {cfg.batching!r}")
        self.running: RunningBatch | None = None
        if cfg.batching == "continuous":
            try:
                self.running = RunningBatch(self)
            except Unsupported as e:
                log.warning("continuous batching is not available for this model (%s); using static batches", e)

    # ------------------------------------------------------------------ lifecycle (event loop)
    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.outbox.loop = asyncio.get_running_loop()
        self.task = self.outbox.loop.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.tok_pool.shutdown(wait=True, cancel_futures=True)

    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def enqueue(self, jobs: list[Job]) -> list[asyncio.Future]:
        """Queue ``jobs`` (each future gets its finished job), or none of them with a 429 when the queue
        would hold more than ``max_queue``."""
        if self.cfg.max_queue and self.depth() + len(jobs) > self.cfg.max_queue:
            raise RequestError(429, f"the server is busy: {self.depth()} requests are waiting (at most "
                                    f"{self.cfg.max_queue}); retry later", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        for j in jobs:
            j.future = loop.create_future()
            self.queue.put_nowait(j)
        return [j.future for j in jobs]

    def stuck_for(self) -> float:
        """Seconds the running model-thread call has exceeded ``liveness_s`` (0: alive)."""
        since = self.busy_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since - self.cfg.liveness_s)

    def _timed(self, fn: Callable, *args):
        """Run on the model thread, recording when the call started (for ``stuck_for``)."""
        self.busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.busy_since = None

    async def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text`` (checked: characters, valid Unicode), tokenized off the event loop;
        ``special=False`` adds no BOS/EOS (a chat template writes its own)."""
        if self.tokenizer is None:
            raise RequestError(400, "this server has no tokenizer: send 'input_ids'")
        if len(text) > self.max_chars:
            raise RequestError(413, f"the prompt has {len(text)} characters; this server accepts at most "
                                    f"{self.max_chars} (shorten it, or send 'input_ids')")
        check_text(text, "the prompt")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.tok_pool, lambda: list(self.tokenizer(text, add_special_tokens=special)["input_ids"]))

    def virtual_tokens(self, adapter: str | None) -> int:
        """Positions a prompt/prefix adapter's virtual tokens take before the prompt (0 for others)."""
        s = store(self.model) if adapter is not None else None
        d = s.deltas[adapter] if s is not None and adapter in s.deltas else None
        return int(d.num_virtual_tokens) if d is not None else 0

    def check_length(self, job: Job) -> None:
        """Refuse a prompt the model cannot take: over ``max_input_tokens``, or over its context once
        the adapter's virtual tokens and ``max_new_tokens`` are counted."""
        n = len(job.ids)
        if n > self.cfg.max_input_tokens:
            raise RequestError(413, f"the prompt has {n} tokens; this server accepts at most {self.cfg.max_input_tokens}")
        if self.context is None:
            return
        virtual = self.virtual_tokens(job.adapter)
        room = self.context - virtual - job.max_new_tokens
        spent = (f"max_new_tokens={job.max_new_tokens}" if job.kind == "generate" else "") + \
                (f"{' and ' if job.kind == 'generate' else ''}adapter {job.adapter!r}'s {virtual} virtual tokens"
                 if virtual else "")
        spent = f" less {spent}" if spent else ""
        if room < 1:
            raise RequestError(400, f"this model has {self.context} positions{spent}: no room is left for a "
                                    "prompt; lower max_new_tokens")
        if n > room:
            raise RequestError(413, f"the prompt has {n} tokens; this model has {self.context} positions{spent}, so "
                                    f"it takes at most {room} prompt tokens: shorten the prompt"
                                    + (" or lower max_new_tokens" if job.kind == "generate" else ""))

    async def submit(self, job: Job) -> Job:
        return await self.enqueue([job])[0]

    async def admin(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the model thread, after the batches already running (a running
        batch returns at its next step)."""
        self.admins += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self._timed, fn, *args)
        finally:
            self.admins -= 1

    async def _gather(self) -> list[Job]:
        """Wait for a request, then up to ``window_ms`` for more to share its batch (≤ max_batch)."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.cfg.window_ms / 1000
        while len(batch) < self.cfg.max_batch:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    def _take(self, n: int) -> list[Job]:
        """Up to ``n`` requests already waiting (the running batch's free rows), without waiting."""
        batch: list[Job] = []
        while len(batch) < n:
            try:
                batch.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    def joins(self, job: Job) -> bool:
        """Does ``job`` decode in the continuous batch?  Beams, classification and prompt/prefix
        adapters (virtual tokens added by a model-level hook) keep whole static batches."""
        return (self.running is not None and job.kind == "generate" and job.num_beams == 1
                and not self.virtual_tokens(job.adapter))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            busy = self.running is not None and self.running.size > 0
            # idle: wait for work (and a window for company); decoding: take what fits, don't wait
            batch = self._take(self.cfg.max_batch - self.running.size) if busy else await self._gather()
            joining = [j for j in batch if self.joins(j)]
            groups: dict[tuple, list[Job]] = {}
            for j in batch:
                if not self.joins(j):
                    groups.setdefault((j.kind, j.num_beams), []).append(j)
            for jobs in groups.values():
                await self._static(loop, jobs)
            if joining or busy:
                await self._continuous(loop, joining)

    async def _static(self, loop, jobs: list[Job]) -> None:
        """One whole batch (``_run``): it decodes to its longest row."""
        try:
            await loop.run_in_executor(self.pool, self._timed, self._run, jobs)
        except Exception as e:  # a failure outside the model call (rows are isolated in _run)
            log.exception("batch failed")
            for j in jobs:
                if j.error is None and j.result is None:
                    j.error = RequestError(500, f"internal error ({type(e).__name__}); see the server log")
        self._settle(jobs)

    async def _continuous(self, loop, joining: list[Job]) -> None:
        """One step of the running batch, ``joining`` entering it (``batching.py``)."""
        try:
            done = await loop.run_in_executor(self.pool, self._timed, self._join_and_step, joining)
        except Unsupported as e:  # the model's cache cannot be spliced: static batches from now on
            log.warning("continuous batching is not available for this model (%s); using static batches", e)
            self.running = None
            await self._static(loop, joining)
            return
        except Exception as e:  # a failure outside the per-row isolation: every row of the batch fails
            log.exception("decoding step failed")
            err = RequestError(500, f"internal error ({type(e).__name__}); see the server log")
            done = self.running.abort(err) + [j for j in joining if j.result is None and j.error is None]
            for j in done:
                j.error = j.error or err
        self._settle(done)

    def _settle(self, jobs: list[Job]) -> None:
        for j in jobs:
            if not j.future.done():
                if j.error is not None:
                    j.future.set_exception(j.error)
                else:
                    self.events.on_done(j)
                    j.future.set_result(j)

    def _join_and_step(self, joining: list[Job]) -> list[Job]:
        """Model thread: the checks ``_run`` makes, then one step of the running batch."""
        refused = [j for j in joining if self._rejected(j)]
        done = refused + self.running.step([j for j in joining if j.error is None])
        start = time.monotonic()
        while (not done and self.running.size and not self.depth() and not self.admins
               and time.monotonic() - start < STEPS_BUDGET_S):
            done = self.running.step([])  # (depth(): a deque's length, read from this thread as a hint)
        return done

    # ------------------------------------------------------------------ model thread
    def _run(self, jobs: list[Job]) -> None:
        ok = [j for j in jobs if not self._rejected(j)]
        if ok:
            self._attempt(ok)

    def _rejected(self, job: Job) -> bool:
        """Refuse ``job`` now if its client left, its adapter is gone or no longer fits its prompt."""
        if job.cancelled:  # its client left while it waited
            job.error = RequestError(499, "the client disconnected")
        elif job.adapter is not None and job.adapter not in get_state(self.model).adapters:
            job.error = RequestError(404, f"adapter {job.adapter!r} is not loaded; GET /v1/adapters lists them")
        else:
            return self._refused(job)  # the adapter may have changed since the request
        return True

    @staticmethod
    def unloaded(adapter: str) -> RequestError:
        return RequestError(404, f"adapter {adapter!r} was unloaded while this request was decoding")

    @staticmethod
    def sampler(jobs: list[Job], prompt_len: int) -> "RowSampler":
        return RowSampler(jobs, prompt_len)

    def _refused(self, job: Job) -> bool:
        try:
            self.check_length(job)
        except RequestError as e:
            job.error = e
        return job.error is not None


__all__ = ["Engine", "EngineConfig", "EngineEvents", "Job", "ParamError", "RequestError", "DeltaError", "RowSampler",
           "Sampling", "StopStrings", "check_text", "context_size", "validate_ids"]
