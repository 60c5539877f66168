"""Static batches on the model thread (``engine.py``): a group of jobs of one kind runs as one
``generate`` (left-padded, decoding to its longest row, each row cut to its own ``max_new_tokens``)
or one forward (classification), routed to one adapter or, with several, as a mixed batch.  A
batch that raises is re-run apart (per adapter, then per row) so only a row failing on its own
gets the error.  ``batching.RunningBatch`` (continuous batching) reuses the padding, routing,
error and finishing steps.

``StaticBatches`` is a base of ``Engine``: it reads the engine's ``model``, ``tokenizer``,
``eos``, ``pad`` and ``events``, and runs only on the model thread."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch

from ..core.delta import DeltaError
from .jobs import Job, RequestError
from .sampling import RowSampler, StopStrings
from .stream import Cancelled, EngineEvents, LogprobTap, Outbox, RowStreamer
from ..api import activate, disabled
from ..mixed import mixed

log = logging.getLogger("deltatune.serve")


class StaticBatches:
    # set by Engine.__init__
    model: Any  # the served model, with its adapters
    tokenizer: Any  # None: no text out (output_ids only) and no stop strings
    eos: int | None  # generate() stops a row there
    pad: int  # left padding of a generate batch, right padding of a classify batch
    events: EngineEvents  # batch, token and done reports (serve metrics)
    outbox: Outbox  # streamed tokens for the event loop, sent once per step

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
            kw["streamer"] = RowStreamer(jobs, self.eos, self.events, tap, self.outbox)
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


# the runner per job kind (a registry, so a test can make one fail)
RUNNERS: dict[str, Callable[[StaticBatches, list[Job]], None]] = {"generate": StaticBatches._generate,
                                                                  "classify": StaticBatches._classify}

__all__ = ["RUNNERS", "StaticBatches"]
