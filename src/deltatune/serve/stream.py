"""Tokens as they are decoded, for ``deltatune serve``: from inside the batched ``generate`` call to
each request, and from token ids to text deltas a client can print.

    model thread:  generate(..., streamer=RowStreamer(jobs), stopping_criteria=[Cancelled(jobs), ...])
                      │ put(next_tokens (B,)) once per decoding step
                      ▼
                   job.on_token(tok)  ──call_soon_threadsafe──►  the request's asyncio.Queue
                                                                   │
    event loop:    TextStream(decode, stops).push(tok) → the new text, held back while it could
                   still turn into a stop string; SSE chunk per non-empty delta

transformers calls a streamer's ``put`` with the whole batch's new tokens after every step (its own
``TextStreamer`` refuses batches, the interface does not), so one streamer serves every row of a
mixed batch without a hand-written decoding loop.  A row ends, for the streamer, at EOS or at its
own ``max_new_tokens`` (the batch may run longer for other rows).  A client that disconnects sets
``job.cancelled``, which ``Cancelled`` turns into "this row is finished" at the next step: a lone
abandoned request stops at once; in a batch its row produces padding until the other rows end (a
static batch keeps its shape; freeing the slot for a new request is continuous batching's job).
``LogprobTap``, the first logits processor, keeps each step's log-softmax for the rows that asked
for logprobs until the streamer learns which token each took.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import Job


class EngineEvents:
    """What the engine reports while it works (``serve.Metrics`` records them); no-ops here."""

    def on_batch(self, jobs: list[Job]) -> None:
        """A model call starts with these rows."""

    def on_token(self, job: Job, first: bool, gap: float) -> None:
        """``job`` got a token ``gap`` seconds after its previous one (``first``: after it arrived)."""

    def on_running(self, rows: int) -> None:
        """``rows`` rows are still decoding in the current model call (0: none)."""

    def on_done(self, job: Job) -> None:
        """``job`` finished with a result."""


class RowStreamer:
    """A transformers streamer (``put``/``end``, the ``BaseStreamer`` interface) over a batch:
    hands each row's new token to ``jobs[i].on_token`` and times it, until the row's EOS or its own
    ``max_new_tokens``.  The EOS itself is not handed on (it has no text).  When a failed batch is run
    again (its rows apart), the tokens a job already handed on are not handed on twice."""

    def __init__(self, jobs: list[Job], eos: int | None, events: EngineEvents, tap: LogprobTap | None = None,
                 outbox: Outbox | None = None):
        self.jobs, self.eos, self.events, self.tap, self.outbox = jobs, eos, events, tap, outbox
        self.prompt_seen = False
        self.count = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self.last = [j.t0 for j in jobs]

    def put(self, value: torch.Tensor) -> None:  # first the prompts (B, T), then each step's tokens (B,)
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for i, tok in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            j = self.jobs[i]
            if self.done[i]:
                continue
            if j.cancelled:
                self.done[i] = True
                continue
            self.count[i] += 1
            self.done[i] = tok == self.eos or self.count[i] >= j.max_new_tokens
            if self.count[i] <= j.delivered:  # a re-run: this token was handed on before
                continue
            j.delivered = self.count[i]
            self.events.on_token(j, self.count[i] == 1, now - self.last[i])
            self.last[i] = now
            if tok == self.eos:
                continue
            if self.tap is not None and j.logprobs is not None:  # before on_token: the reader may look at it
                j.trace.append(self.tap.entry(i, tok, j.logprobs))
            if j.on_token is not None:
                j.on_token(tok)
            if j.on_token_loop is not None and self.outbox is not None:
                self.outbox.post(j.on_token_loop, tok)
        if self.outbox is not None:
            self.outbox.flush()
        self.events.on_running(self.done.count(False))

    def end(self) -> None:
        self.events.on_running(0)


class Outbox:
    """Calls for the event loop, made by the model thread and sent once per decoding step: each
    ``call_soon_threadsafe`` wakes the loop through its self-pipe, and one per token per row (16 per
    step) kept the loop and the model thread trading the GIL on a loaded 2-core machine."""

    def __init__(self):
        self.loop = None  # set by Engine.start (the serving loop)
        self.items: list[tuple] = []

    def post(self, fn, arg) -> None:
        self.items.append((fn, arg))

    def flush(self) -> None:
        if self.items and self.loop is not None:
            items, self.items = self.items, []
            self.loop.call_soon_threadsafe(_run_all, items)


def _run_all(items: list[tuple]) -> None:
    for fn, arg in items:
        fn(arg)


class LogprobTap:
    """A logits processor that changes nothing: for the rows asking for logprobs it keeps the
    log-softmax of this step's scores (the model's distribution, before any row's temperature or
    sampling), until the streamer learns which token each row took.  One (R, V) log-softmax per step."""

    FLOOR = -9999.0  # what OpenAI reports for an impossible token (JSON has no -inf)

    def __init__(self, jobs: list[Job]):
        self.rows = [i for i, j in enumerate(jobs) if j.logprobs is not None]
        self.last: dict[int, torch.Tensor] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # (B, T), (B, V)
        self.last = dict(zip(self.rows, scores[self.rows].float().log_softmax(-1)))  # row -> (V,)
        return scores

    def entry(self, row: int, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        lp = self.last[row]
        top = lp.topk(k) if k else None
        alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return max(float(lp[tok]), self.FLOOR), [(t, max(v, self.FLOOR)) for t, v in alts]


class Cancelled:
    """A stopping criterion: rows whose client disconnected are finished."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # (B, T) -> (B,) bool
        return torch.tensor([j.cancelled for j in self.jobs], dtype=torch.bool, device=input_ids.device)


class TextStream:
    """One choice's text as its tokens arrive.  ``push`` returns the text that became final: the
    decoding of all tokens so far, minus a tail that could still become one of ``stops`` (or is an
    incomplete UTF-8 character, decoded as U+FFFD), and nothing after a stop string is found.
    Decoding the whole prefix each time (not token by token) keeps multi-token characters and the
    tokenizer's spacing right."""

    def __init__(self, decode, stops: tuple[str, ...] = ()):
        self.decode, self.stops = decode, stops
        self.toks: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, tok: int) -> str:
        if self.stopped:
            return ""
        self.toks.append(tok)
        text = self.decode(self.toks)
        hits = [text.index(s) for s in self.stops if s in text]
        if hits:
            self.stopped = True
            return self._advance(text[:min(hits)])
        return self._advance(text[:len(text) - self._held(text)])

    def finish(self, final: str) -> str:
        """The rest of the request's final text (the engine's, authoritative)."""
        return self._advance(final)

    def _held(self, text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stops:
            held = max(held, next((k for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), 0))
        return held

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # the tokenizer re-spelled earlier text: what was sent stays sent
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


__all__ = ["Cancelled", "EngineEvents", "LogprobTap", "Outbox", "RowStreamer", "TextStream"]
