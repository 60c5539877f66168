"""Per-row decoding inside one batched ``generate`` call (``engine.py``): ``RowSampler`` gives each
row its own repetition penalty, temperature, top-k/top-p and seeded generator, so greedy and
sampled requests share a batch and a seeded answer never depends on its neighbours;
``StopStrings`` ends each row at its own stop strings."""
from __future__ import annotations

from typing import Callable

import torch

from .jobs import Job


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


__all__ = ["RowSampler", "StopStrings"]
