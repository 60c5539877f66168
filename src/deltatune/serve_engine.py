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
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .core import DeltaError, get_state


class RequestError(Exception):
    """A problem with one request: becomes an HTTP ``status`` with ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Job:
    kind: str  # "generate" | "classify"
    adapter: str | None
    ids: list[int]  # (T,) prompt token ids
    max_new_tokens: int = 0
    num_beams: int = 1
    future: asyncio.Future | None = None
    result: Any = None
    error: RequestError | None = None
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class EngineConfig:
    window_ms: float = 5.0  # wait this long after the first request for others to batch with it
    max_batch: int = 16  # rows per model call; more requests wait for the next batch
    max_new_tokens: int = 256  # per-request cap on generated tokens
    max_input_tokens: int = 1024  # per-request cap on prompt length


class Engine:
    def __init__(self, model, tokenizer, cfg: EngineConfig, on_batch: Callable[[list[Job]], None] | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.on_batch = on_batch or (lambda jobs: None)
        get_state(model, create=True)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deltatune-model")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        gc = getattr(model, "generation_config", None)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None and gc is not None:
            eos = gc.eos_token_id[0] if isinstance(gc.eos_token_id, list) else gc.eos_token_id
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.eos = eos
        self.pad = pad if pad is not None else (eos if eos is not None else 0)

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

    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, job: Job) -> Job:
        job.future = asyncio.get_running_loop().create_future()
        await self.queue.put(job)
        return await job.future

    async def admin(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the model thread, after the batches already running."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
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
            groups: dict[tuple, list[Job]] = {}
            for j in batch:
                groups.setdefault((j.kind, j.num_beams), []).append(j)
            for jobs in groups.values():
                try:
                    await loop.run_in_executor(self.pool, self._run, jobs)
                except Exception as e:  # an internal failure: every job of the group learns it
                    for j in jobs:
                        if j.error is None and j.result is None:
                            j.error = RequestError(500, f"internal error: {type(e).__name__}: {e}")
                for j in jobs:
                    if not j.future.done():
                        if j.error is not None:
                            j.future.set_exception(j.error)
                        else:
                            j.future.set_result(j)

    # ------------------------------------------------------------------ model thread
    def _run(self, jobs: list[Job]) -> None:
        st = get_state(self.model)
        ok = []
        for j in jobs:
            if j.adapter is not None and j.adapter not in st.adapters:
                j.error = RequestError(404, f"adapter {j.adapter!r} is not loaded; GET /v1/adapters lists them")
            else:
                ok.append(j)
        if not ok:
            return
        try:
            self._call(ok)
        except DeltaError as e:
            if len({j.adapter for j in ok}) == 1:
                for j in ok:
                    j.error = RequestError(400, str(e))
                return
            by: dict[str | None, list[Job]] = {}  # e.g. a prompt-tuning adapter: run each adapter apart
            for j in ok:
                by.setdefault(j.adapter, []).append(j)
            for sub in by.values():
                try:
                    self._call(sub)
                except DeltaError as e2:
                    for j in sub:
                        j.error = RequestError(400, str(e2))

    def _call(self, jobs: list[Job]) -> None:
        self.on_batch(jobs)
        RUNNERS[jobs[0].kind](self, jobs)

    @contextlib.contextmanager
    def _routed(self, jobs: list[Job]):
        """One adapter for all rows: the plain path (any method); several: a mixed batch."""
        from .api import activate, disabled
        from .mixed import mixed

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
        ids, mask = self._padded(jobs, left=True)
        new = max(j.max_new_tokens for j in jobs)
        with torch.inference_mode(), self._routed(jobs):
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                      num_beams=jobs[0].num_beams, pad_token_id=self.pad)
        gen = out[:, ids.shape[1]:]  # (B, new)
        for i, j in enumerate(jobs):
            toks = gen[i, :j.max_new_tokens].tolist()  # greedy: a longer run has the same prefix
            if self.eos is not None and self.eos in toks:
                toks = toks[:toks.index(self.eos)]
            text = self.tokenizer.decode(toks, skip_special_tokens=True) if self.tokenizer is not None else None
            j.result = {"output_ids": toks, "text": text, "batch_size": len(jobs)}

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


RUNNERS: dict[str, Callable[[Engine, list[Job]], None]] = {"generate": Engine._generate, "classify": Engine._classify}


def validate_ids(ids: list[int], vocab: int | None, limit: int) -> None:
    if not ids:
        raise RequestError(400, "the prompt is empty: give a non-empty 'prompt'/'text' or 'input_ids'")
    if len(ids) > limit:
        raise RequestError(413, f"the prompt has {len(ids)} tokens; this server accepts at most {limit}")
    if vocab is not None and any(not 0 <= i < vocab for i in ids):
        raise RequestError(400, f"input_ids must be in [0, {vocab}) for this model")


__all__ = ["Engine", "EngineConfig", "Job", "RequestError", "DeltaError", "validate_ids"]
