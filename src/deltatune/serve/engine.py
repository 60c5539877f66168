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
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.delta import DeltaError, get_state
from .batching import RunningBatch, Unsupported
from .stream import Cancelled, EngineEvents, LogprobTap, RowStreamer
from ..api import activate, disabled
from ..methods._virtual_tokens import store
from ..mixed import mixed


# temperatures below this are greedy (vLLM's rule: logits / 1e-40 overflow float32); above the cap the
# distribution is uniform anyway, and a -inf logit divided by an overflowing temperature would be NaN
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-5, 100.0

log = logging.getLogger("deltatune.serve")
CHARS_PER_TOKEN = 16  # a prompt over 16 characters per allowed token is refused before tokenizing
BATCHING = ("continuous", "static")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


class RequestError(Exception):
    """A problem with one request: becomes an HTTP ``status`` with ``message``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class ParamError(RequestError):
    """A 4xx about one request field: OpenAI's error ``param`` (and ``code``), for ``serve_openai``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens.  temperature 0 is greedy (argmax) and ignores top_p, top_k
    and seed; > 0 samples from softmax(logits / temperature) cut by top-k then top-p (the order
    and code of transformers' own warpers), one draw per step from ``Generator().manual_seed(seed)``."""

    temperature: float = 0.0  # 0 = greedy; > 0 = sample (1 = the model's distribution)
    top_p: float = 1.0  # keep the most likely tokens whose probabilities sum to top_p (1 = all)
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019): logits of prompt/output tokens ÷ (or ×) this
    seed: int | None = None  # of the row's generator; sampled rows always get one (serve.py draws it)
    stop: tuple[str, ...] = ()  # the output text ends before the first of these (greedy or sampled)

    @property
    def decoding(self) -> str:
        return "sample" if self.temperature > 0 else "greedy"


@dataclass
class Job:
    kind: str  # "generate" | "classify"
    adapter: str | None
    ids: list[int]  # (T,) prompt token ids
    max_new_tokens: int = 0
    num_beams: int = 1
    sampling: Sampling = field(default_factory=Sampling)
    future: asyncio.Future | None = None
    result: Any = None
    error: RequestError | None = None
    t0: float = field(default_factory=time.perf_counter)
    # streaming: called on the model thread with each new token id as it is decoded (serve_stream.RowStreamer)
    on_token: Callable[[int], None] | None = None
    cancelled: bool = False  # the client went away: skip the job if queued, end its row at the next step
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)
    trace: list = field(default_factory=list)  # per generated token: (logprob, [(token, logprob)] alternatives)
    delivered: int = 0  # tokens already handed on: a batch re-run after a failure does not repeat them


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


class Engine:
    def __init__(self, model, tokenizer, cfg: EngineConfig, events: EngineEvents | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.events = events or EngineEvents()
        get_state(model, create=True)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deltatune-model")
        # tokenizing a long prompt must block neither the event loop nor the model; one thread, as a
        # fast tokenizer's settings are not safe to share between concurrent calls
        self.tok_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deltatune-tokenize")
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
        self.task = asyncio.get_running_loop().create_task(self._loop())

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
        """Run ``fn(*args)`` on the model thread, after the batches already running."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._timed, fn, *args)

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
        return refused + self.running.step([j for j in joining if j.error is None])

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

    def _attempt(self, jobs: list[Job]) -> None:
        """Run ``jobs`` as one batch; if that raises, run them apart (per adapter when several share
        the batch, else one row at a time) so that only a row failing on its own gets the error."""
        try:
            self._call(jobs)
            return
        except Exception as e:  # noqa: BLE001 - any failure is isolated, then reported per row
            if len(jobs) == 1:
                jobs[0].result, jobs[0].error = None, self._error(e)
                return
            err = e
        by: dict[str | None, list[Job]] = {}
        for j in jobs:
            j.result = None
            by.setdefault(j.adapter, []).append(j)
        parts = list(by.values()) if len(by) > 1 else [[j] for j in jobs]
        log.info("a batch of %d rows failed (%s: %s); running it as %d parts", len(jobs), type(err).__name__,
                 err, len(parts))
        for part in parts:
            self._attempt(part)

    @staticmethod
    def _error(e: Exception) -> RequestError:
        if isinstance(e, RequestError):
            return e
        if isinstance(e, DeltaError):
            return RequestError(400, str(e))
        log.error("request failed", exc_info=e)  # the traceback stays in the server's log
        return RequestError(500, f"internal error ({type(e).__name__}); see the server log")

    def _call(self, jobs: list[Job]) -> None:
        self.events.on_batch(jobs)
        RUNNERS[jobs[0].kind](self, jobs)

    @contextlib.contextmanager
    def _routed(self, jobs: list[Job]):
        """One adapter for all rows: the plain path (any method); several: a mixed batch."""
        names = [j.adapter for j in jobs]
        if len(set(names)) > 1:
            with mixed(self.model, names):
                yield
        elif names[0] is None:
            with disabled(self.model):
                yield
        else:
            activate(self.model, [names[0]])
            yield

    def _padded(self, jobs: list[Job], left: bool):
        n, t = len(jobs), max(len(j.ids) for j in jobs)
        ids = torch.full((n, t), self.pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((n, t), dtype=torch.long)
        for i, j in enumerate(jobs):
            sl = slice(t - len(j.ids), t) if left else slice(0, len(j.ids))
            ids[i, sl] = torch.tensor(j.ids)
            mask[i, sl] = 1
        return ids, mask

    def _generate(self, jobs: list[Job]) -> None:
        ids, mask = self._padded(jobs, left=True)  # (B, T)
        new = max(j.max_new_tokens for j in jobs)
        kw: dict[str, Any] = {}
        if any(j.sampling.temperature > 0 or j.sampling.repetition_penalty != 1.0 for j in jobs):
            kw["logits_processor"] = [RowSampler(jobs, ids.shape[1])]
        if jobs[0].num_beams == 1:  # (transformers streams only without beams)
            # each row's tokens as they are decoded (streaming, time-to-first-token); a row whose client
            # left is finished at the next step
            tap = LogprobTap(jobs) if any(j.logprobs is not None for j in jobs) else None
            if tap is not None:  # first: it reads the model's scores before any row's sampling changes them
                kw["logits_processor"] = [tap, *kw.get("logits_processor", [])]
            kw["streamer"] = RowStreamer(jobs, self.eos, self.events, tap)
            kw["stopping_criteria"] = [Cancelled(jobs)]
            if self.tokenizer is not None and any(j.sampling.stop for j in jobs):
                kw["stopping_criteria"].append(StopStrings(jobs, ids.shape[1], self._decode))  # end those rows early
        with torch.inference_mode(), self._routed(jobs):
            # repetition_penalty=1.0: the rows' own penalties are applied by RowSampler, not a batch-wide one
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                      num_beams=jobs[0].num_beams, pad_token_id=self.pad, repetition_penalty=1.0,
                                      **kw)
        gen = out[:, ids.shape[1]:]  # (B, new)
        for i, j in enumerate(jobs):
            # a row's first max_new_tokens tokens do not depend on how long the batch ran: greedy rows by
            # definition, sampled rows because each draws from its own generator, once per step
            toks, text, reason = self._finish(gen[i, :j.max_new_tokens].tolist(), j)
            j.result = {"output_ids": toks, "text": text, "finish_reason": reason, "batch_size": len(jobs)}
            if j.logprobs is not None:
                j.result["logprobs"] = j.trace[:len(toks)]

    def _decode(self, toks: list[int]) -> str:
        return self.tokenizer.decode(toks, skip_special_tokens=True)

    def _finish(self, toks: list[int], job: Job) -> tuple[list[int], str | None, str]:
        """Cut at EOS or at the first stop string (finish_reason "stop"), else "length" (OpenAI's
        names).  At a stop string the text ends before it; output_ids keep the token completing it."""
        reason = "stop" if self.eos is not None and self.eos in toks else "length"
        if reason == "stop":
            toks = toks[:toks.index(self.eos)]
        if self.tokenizer is None:
            return toks, None, reason
        text = self._decode(toks)
        stops = [s for s in job.sampling.stop if s in text]
        if stops:
            k = next(k for k in range(1, len(toks) + 1) if any(s in self._decode(toks[:k]) for s in stops))
            toks, text, reason = toks[:k], text[:min(text.index(s) for s in stops)], "stop"
        return toks, text, reason

    def _classify(self, jobs: list[Job]) -> None:
        ids, mask = self._padded(jobs, left=False)
        with torch.inference_mode(), self._routed(jobs):
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, labels)
        probs = logits.float().softmax(-1)
        names = getattr(getattr(self.model, "config", None), "id2label", None) or {}
        for i, j in enumerate(jobs):
            label = int(probs[i].argmax())
            j.result = {"label": label, "label_name": names.get(label), "scores": probs[i].tolist(),
                        "batch_size": len(jobs)}


class RowSampler:
    """A logits processor giving each row its own settings (``jobs[i].sampling`` for row i, or rows
    i·k … i·k+k-1 under beam search): repetition penalty on the row's own tokens (its left padding
    excluded), then for sampled rows temperature → top-k → top-p with transformers' warpers, a
    softmax and one ``torch.multinomial`` draw from the row's generator, exactly the operations of
    ``generate(do_sample=True)`` on that row alone.  The drawn token becomes the row's only finite
    logit.  Rows with default settings are left untouched (they stay greedy)."""

    def __init__(self, jobs: list[Job], prompt_len: int):
        from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                  TopPLogitsWarper)

        self.n = len(jobs)
        self.rows = []  # (row, first real token, processors, sampled?, seed)
        for i, j in enumerate(jobs):
            s, procs = j.sampling, []
            if s.repetition_penalty != 1.0:
                procs.append(RepetitionPenaltyLogitsProcessor(float(s.repetition_penalty)))
            if s.temperature > 0:  # the same conditions as transformers' _get_logits_processor
                if s.temperature != 1.0:
                    procs.append(TemperatureLogitsWarper(float(s.temperature)))
                if s.top_k != 0:
                    procs.append(TopKLogitsWarper(s.top_k))
                if s.top_p < 1.0:
                    procs.append(TopPLogitsWarper(float(s.top_p)))
            if procs or s.temperature > 0:  # (temperature 1 without top-k/p: no warper, still a draw)
                self.rows.append((i, prompt_len - len(j.ids), procs, s.temperature > 0, s.seed))
        self.generators: dict[int, torch.Generator] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # (R, T), (R, V)
        k = input_ids.shape[0] // self.n  # beams per request
        for i, start, procs, sample, seed in self.rows:
            for r in range(i * k, i * k + k):
                row = scores[r:r + 1]  # (1, V)
                for p in procs:
                    row = p(input_ids[r:r + 1, start:], row)
                if sample:
                    g = self.generators.get(r)
                    if g is None:
                        g = self.generators[r] = torch.Generator(scores.device)
                        if seed is None:
                            g.seed()  # no seed given (serve.py always gives one): a fresh random one
                        else:
                            g.manual_seed(seed)
                    probs = row.softmax(-1)
                    if not torch.isfinite(probs).all():  # NaN/inf logits from the model: don't fail the batch
                        probs = torch.ones_like(probs)
                    tok = torch.multinomial(probs, 1, generator=g)  # (1, 1)
                    row = torch.full_like(row, float("-inf")).scatter_(1, tok, 0.0)
                scores[r:r + 1] = row
        return scores


class StopStrings:
    """A stopping criterion: row i is done once its generated text contains one of its stop strings
    (the rows of one batch stop separately; ``_finish`` then cuts the text)."""

    def __init__(self, jobs: list[Job], prompt_len: int, decode: Callable[[list[int]], str]):
        self.rows = [(i, j.sampling.stop) for i, j in enumerate(jobs) if j.sampling.stop]
        self.t, self.decode = prompt_len, decode

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # (B, T) -> (B,) bool
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, stops in self.rows:
            text = self.decode(input_ids[i, self.t:].tolist())
            done[i] = any(s in text for s in stops)
        return done


def context_size(model) -> int | None:
    """Positions the model can attend over (``max_position_embeddings`` & co.), None if unknown."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for key in CONTEXT_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_text(text: str, what: str) -> None:
    """Refuse text that cannot be UTF-8 (a lone surrogate such as "\\ud800" from JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(400, f"{what} is not valid Unicode (a lone surrogate at character {e.start}); "
                                "send UTF-8 text") from None


RUNNERS: dict[str, Callable[[Engine, list[Job]], None]] = {"generate": Engine._generate, "classify": Engine._classify}


def validate_ids(ids: list[int], vocab: int | None, limit: int) -> None:
    if not ids:
        raise RequestError(400, "the prompt is empty: give a non-empty 'prompt'/'text' or 'input_ids'")
    if len(ids) > limit:
        raise RequestError(413, f"the prompt has {len(ids)} tokens; this server accepts at most {limit}")
    if vocab is not None and any(not 0 <= i < vocab for i in ids):
        raise RequestError(400, f"input_ids must be in [0, {vocab}) for this model")


__all__ = ["Engine", "EngineConfig", "EngineEvents", "Job", "ParamError", "RequestError", "DeltaError", "RowSampler",
           "Sampling", "StopStrings", "check_text", "context_size", "validate_ids"]
