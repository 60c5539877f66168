"""What a request is to the engine (``engine.py``): a ``Job`` (prompt ids, adapter, how many tokens,
its ``Sampling``; filled in with a result or an error), the ``RequestError`` a bad request becomes
(an HTTP status and one line), and the checks a prompt passes before it is queued."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# temperatures below this are greedy (vLLM's rule: logits / 1e-40 overflow float32); above the cap the
# distribution is uniform anyway, and a -inf logit divided by an overflowing temperature would be NaN
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-5, 100.0

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
    # the same, but called on the event loop: the engine's Outbox sends a whole step's tokens in one
    # call_soon_threadsafe (one wake-up of the loop per step, not one per token)
    on_token_loop: Callable[[int], None] | None = None
    cancelled: bool = False  # the client went away: skip the job if queued, end its row at the next step
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)
    trace: list = field(default_factory=list)  # per generated token: (logprob, [(token, logprob)] alternatives)
    delivered: int = 0  # tokens already handed on: a batch re-run after a failure does not repeat them


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


def validate_ids(ids: list[int], vocab: int | None, limit: int) -> None:
    if not ids:
        raise RequestError(400, "the prompt is empty: give a non-empty 'prompt'/'text' or 'input_ids'")
    if len(ids) > limit:
        raise RequestError(413, f"the prompt has {len(ids)} tokens; this server accepts at most {limit}")
    if vocab is not None and any(not 0 <= i < vocab for i in ids):
        raise RequestError(400, f"input_ids must be in [0, {vocab}) for this model")


__all__ = ["CONTEXT_KEYS", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "Job", "ParamError", "RequestError", "Sampling",
           "check_text", "context_size", "validate_ids"]
