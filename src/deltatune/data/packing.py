"""Packing: several short causal-LM rows in one sequence, each seeing only itself.

    rows    [a a a] [b b] [c c c c] [d]          (token ids of ``chat_encode``, no padding)
    packed  [a a a b b c c c c d]                 one sequence of <= max_length tokens
    pos     [0 1 2 0 1 0 1 2 3 0]                 position ids restart at every row
    labels  [- a a - b - c c c -]                 a row's first label is -100: the token before it
                                                  belongs to another row (unpacked, nothing predicts it)

Attention may not cross rows.  Two ways, chosen per model by :func:`attention_mode`:

* ``"position_ids"``: no ``attention_mask``; transformers' masking utilities
  (``masking_utils.find_packed_sequence_indices``; seen working on Llama, GPT-2 and Qwen2 with
  4.56.2 and 5.24) read the restarting position ids and build the block-diagonal causal mask
  themselves (flash-attention kernels run varlen).  Nothing (B, T, T) is built here.
* ``"mask"``: an explicit additive 4-D mask (B, 1, T, T), 0 inside a row's causal triangle and
  the dtype's minimum elsewhere.  transformers passes a 4-D mask through unchanged to eager and
  sdpa attention, in every release deltatune supports.

The mode is not guessed from version numbers: :func:`attention_mode` packs two probe rows and
keeps ``"position_ids"`` only if the model's logits for them equal its unpacked logits; else the
mask, checked the same way.  A model for which neither holds is refused with the reason.

So each row's loss equals its unpacked loss (``tests/test_packing.py``, <= 1e-5); the gain is
that no compute goes to padding: short chat rows padded to the batch's longest row waste most of
a batch (``bench/packing.py``).

Prompt / prefix tuning prepend virtual tokens to every *sequence*, so a packed sequence would give
its rows one shared prompt at shifted positions: :func:`check_method` refuses that combination.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.delta import DeltaError

# Packing is on by default (``--packing`` unset) when the median row uses at most this fraction of
# max_length: then padded batches waste about half their compute or more, and a packed sequence
# holds two or more rows.  Longer rows gain little and only reorder the data.
AUTO_PACK_FRACTION = 0.5
# methods whose virtual tokens are prepended per sequence, not per row (see the module docstring)
PER_SEQUENCE_METHODS = ("prompt", "prefix")
MODES = ("position_ids", "mask")


def should_pack(lengths: Sequence[int], max_length: int) -> bool:
    """The default rule: pack when the median row is at most AUTO_PACK_FRACTION of max_length."""
    return bool(lengths) and statistics.median(lengths) <= AUTO_PACK_FRACTION * max_length


def check_method(method: str, packing: bool | None) -> None:
    """Refuse ``--packing`` with methods that prepend virtual tokens per sequence."""
    if packing and method in PER_SEQUENCE_METHODS:
        raise DeltaError(f"--packing cannot be used with --method {method}: its virtual tokens are prepended "
                         "once per packed sequence, not per row; pass --no-packing")


def pack(features: Sequence[dict], max_length: int) -> list[dict]:
    """Causal-LM features ``{"input_ids", "labels"}`` -> packed features ``{"input_ids", "labels",
    "position_ids", "rows"}`` of at most ``max_length`` tokens each (``rows``: the indices of the
    features inside, in order).

    First-fit decreasing: rows longest first, each into the first sequence with room (a few %
    of padding left at most, on real chat data).  Which sequence a row lands in is deterministic;
    the trainer shuffles the packed sequences each epoch."""
    if max_length < 1:
        raise DeltaError(f"packing needs a positive max_length, got {max_length}")
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(features[i]["input_ids"])
        if n > max_length:
            raise DeltaError(f"row {i + 1} has {n} tokens, more than max_length {max_length}; encode the rows "
                             "with the same --max-length as the packing")
        if n == 0:
            continue
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([])
            room.append(max_length)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= n
    out = []
    for rows in bins:
        ids, labels, pos = [], [], []
        for i in rows:
            f = features[i]
            ids += list(f["input_ids"])
            labels += [-100] + list(f["labels"])[1:]  # nothing in this row predicts its first token
            pos += range(len(f["input_ids"]))
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos, "rows": rows})  # rows: source indices
    return out


def block_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal mask (B, 1, T, T) that keeps every row (a run of position ids counting up
    from 0) to itself: 0 where query t may see key s, dtype-min elsewhere."""
    b, t = position_ids.shape
    starts = (position_ids == 0).cumsum(-1)  # (B, T): which row each token belongs to
    same = starts[:, :, None] == starts[:, None, :]  # (B, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same & causal
    mask = torch.zeros(b, 1, t, t, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


@dataclass
class PackedCollator:
    """Pads packed features to the batch's longest sequence; the tail padding is one more "row"
    (position ids from 0, labels -100), so it is attended by nothing real.

    ``mode``: "position_ids" (transformers builds the mask) or "mask" (a 4-D mask here)."""

    pad_id: int = 0
    mode: str = "position_ids"
    dtype: torch.dtype = torch.float32  # of the 4-D mask: the model's compute dtype

    def __post_init__(self):
        if self.mode not in MODES:
            raise DeltaError(f"unknown packing attention mode {self.mode!r}; choose one of {list(MODES)}")

    def __call__(self, features: list[dict]) -> dict:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(features), n), -100, dtype=torch.long)  # (B, T)
        pos = torch.zeros((len(features), n), dtype=torch.long)  # (B, T)
        for i, f in enumerate(features):
            t = len(f["input_ids"])
            ids[i, :t] = torch.tensor(f["input_ids"])
            labels[i, :t] = torch.tensor(f["labels"])
            pos[i, :t] = torch.tensor(f["position_ids"])
            pos[i, t:] = torch.arange(n - t)
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
        if self.mode == "mask":
            batch["attention_mask"] = block_mask(pos, self.dtype)
        return batch


# --------------------------------------------------------------------------- which mode works

def _model_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _probe_equal(model, mode: str, tol: float = 1e-4) -> bool:
    """Pack two probe rows (lengths 5 and 3) with ``mode``; True if each row's logits equal its
    unpacked logits.  A model that rejects the inputs counts as unequal."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 2:
        return False
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, vocab, (k,), generator=g).tolist() for k in (5, 3)]
    feats = [{"input_ids": r, "labels": r} for r in rows]
    coll = PackedCollator(pad_id=0, mode=mode, dtype=_model_dtype(model))
    batch = coll(pack(feats, 16) + [{"input_ids": rows[1], "labels": rows[1], "position_ids": list(range(3))}])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**{k: v.to(dev) for k, v in batch.items() if k != "labels"}, use_cache=False).logits
            ref = [model(input_ids=torch.tensor([r], device=dev), use_cache=False).logits[0] for r in rows]
    except (TypeError, ValueError, RuntimeError, IndexError):
        return False
    finally:
        model.train(was)
    got = [packed[0, :5], packed[0, 5:8], packed[1, :3]]  # rows land longest first; row 2 also alone
    want = [ref[0], ref[1], ref[1]]
    return all(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in zip(got, want))


def attention_mode(model) -> str:
    """"position_ids" where the model itself keeps packed rows apart, else "mask"; both verified
    on probe rows against the unpacked logits (see the module docstring)."""
    for mode in MODES:
        if _probe_equal(model, mode):
            return mode
    raise DeltaError(f"{type(model).__name__} mixes packed rows (neither restarting position ids nor a 4-D "
                     "attention mask keep them apart: its attention ignores both); pass --no-packing")
