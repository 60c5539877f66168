"""``--calibrate N``: calibrated NF4 block scales for a base streamed with ``--quantize nf4``.

N batches of text run through the base block by block while it loads (``load_quantized(...,
calibration=)``, quant/sequential.py); each block's scales then minimise the error its inputs see
instead of being the block's absmax (SmolLM2 perplexity: see docs/benchmarks.md).  Where the text
comes from:

    train / compare   the first N batches of the training rows (--batch-size rows each)
    eval              the first N batches of the evaluation rows
    serve             the packaged general text (4 texts a batch), or --calibrate-data FILE (a line a text)

The batches are built from the tokenizer, which loads before the weights, so
``models.load_quantized_model`` takes a function ``tokenizer -> batches``.  Fewer rows than N
batches: every row is used and the manifest records the batches that ran.
"""
from __future__ import annotations

from typing import Callable

from ..core import DeltaError
from ..data.examples import encode
from ..data.reference_text import TEXTS
from ..quant.load import QUANT_TASKS, SCHEMES

Batches = Callable[[object], list]  # tokenizer -> calibration batches (dicts of input_ids, attention_mask)
TEXTS_PER_BATCH, MAX_TOKENS = 4, 256


def check_quantize(quantize: str | None, calibrate: int | None, task: str, method: str) -> None:
    """``train``'s --quantize / --calibrate, refused in one line before anything loads."""
    if quantize is not None and quantize not in SCHEMES:
        raise DeltaError(f"unknown --quantize {quantize!r}; choose one of {list(SCHEMES)}")
    if quantize is not None and task not in QUANT_TASKS:
        raise DeltaError(f"--quantize applies to --task causal-lm (got {task!r}): other tasks add a fresh head "
                         "that is not in the checkpoint; drop --quantize")
    if quantize is not None and method == "full":
        raise DeltaError("--quantize freezes the base in 4-/8-bit storage, so --method full cannot train it; "
                         "use an adapter method (e.g. --method lora) or drop --quantize")
    check_calibrate(calibrate, quantize)


def check_calibrate(calibrate: int | None, quantize: str | None, data: str | None = None) -> None:
    """One line for a --calibrate that cannot apply (before anything loads)."""
    if data is not None and not calibrate:
        raise DeltaError("--calibrate-data gives the text for --calibrate N; add --calibrate N (e.g. 8) or drop it")
    if not calibrate:
        return
    if not isinstance(calibrate, int) or calibrate < 0:
        raise DeltaError(f"--calibrate must be a number of batches (0 = off), got {calibrate!r}")
    if quantize != "nf4":
        raise DeltaError(f"--calibrate {calibrate} picks NF4 block scales, so it needs --quantize nf4 "
                         f"(got {'--quantize ' + quantize if quantize else 'no --quantize'}); add it or drop --calibrate")


def _batch(rows: list[dict], pad_id: int) -> dict:
    """Token rows (dicts with input_ids) as one right-padded batch {input_ids, attention_mask} (B, T)."""
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _batches(rows: list[dict], n: int, per_batch: int, pad_id: int) -> list[dict]:
    return [_batch(rows[i:i + per_batch], pad_id) for i in range(0, min(len(rows), n * per_batch), per_batch)]


def from_examples(ex, n: int, batch_size: int, max_length: int, train_on: str = "responses",
                  prepare: Callable[[object], None] | None = None) -> Batches | None:
    """The first ``n`` batches of ``batch_size`` rows of ``ex`` (task examples, e.g. the training
    data), encoded as training encodes them; ``prepare(tokenizer)`` runs first (the chat template)."""
    if not n:
        return None

    def make(tok) -> list:
        if prepare is not None:
            prepare(tok)
        head = ex.subset(range(min(len(ex), n * batch_size)))
        rows = encode(head, tok, max_length, **({"train_on": train_on} if ex.task == "causal-lm" else {}))
        return _batches(rows, n, batch_size, tok.pad_token_id or 0)
    return make


def from_texts(n: int, texts: list[str] | None = None) -> Batches | None:
    """The first ``n`` batches of TEXTS_PER_BATCH texts (default: the packaged general text)."""
    if not n:
        return None
    texts = list(texts or TEXTS)

    def make(tok) -> list:
        rows = [{"input_ids": tok(t, truncation=True, max_length=MAX_TOKENS)["input_ids"]}
                for t in texts[: n * TEXTS_PER_BATCH]]
        return _batches([r for r in rows if r["input_ids"]], n, TEXTS_PER_BATCH, tok.pad_token_id or 0)
    return make
