"""How ``deltatune merge`` writes a merged model: a format registry (``--format``) and the dtype the
weights are stored in (``--dtype``).  Each writer fills a temporary directory that replaces the output
in one atomic step, and returns what it checked.

* ``safetensors``: ``save_pretrained`` of the model cast to ``dtype`` (+ tokenizer); loads with
  ``from_pretrained(dir)``.
* ``gguf``: one ``<output name>-<DTYPE>.gguf`` file (:mod:`deltatune.app.gguf_export`), read back with
  transformers' own GGUF reader before the directory is published, so a file transformers cannot load
  or whose logits drift from the merged model's never reaches the user.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.delta import DeltaError
from ..files import chmod_written
from ..safety import atomic_dir
from ..models import quiet_progress
from .gguf_export import DTYPES, check_exportable, load_gguf, logits_gap, write_gguf


@dataclass
class Exported:
    files: list[str]  # written, relative to the output directory
    check: dict  # what was verified after writing (name -> value)


def save_safetensors(merged, proc, tmp: Path, dtype: str, inputs: dict | None) -> Exported:
    check = {}
    if dtype != "fp32":
        if inputs is not None:
            with torch.no_grad():
                want = merged(**inputs).logits.float()
        merged = merged.to(DTYPES[dtype])
        if inputs is not None:
            with torch.no_grad():  # what the cast alone costs, on the same check batch
                check["dtype_max_abs_diff"] = float((merged(**inputs).logits.float() - want).abs().max())
    merged.save_pretrained(tmp)
    if proc is not None and hasattr(proc, "save_pretrained"):
        proc.save_pretrained(tmp)
    return Exported(sorted(p.name for p in tmp.iterdir()), check)


def save_gguf(merged, proc, tmp: Path, dtype: str, inputs: dict | None, name: str = "model") -> Exported:
    f = tmp / f"{name}-{dtype.upper()}.gguf"
    write_gguf(merged, proc, f, dtype, name=name)
    check = {}
    if inputs is not None:
        back, _ = load_gguf(f)  # transformers' reader, float32
        check["gguf_max_abs_diff"] = logits_gap(merged, back, inputs)
    return Exported([f.name], check)


FORMATS: dict[str, Callable[..., Exported]] = {"safetensors": save_safetensors, "gguf": save_gguf}


def check_options(fmt: str, dtype: str) -> None:
    """One line per bad choice, before any model is loaded."""
    if fmt not in FORMATS:
        raise DeltaError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise DeltaError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def export_merged(merged, proc, out: Path, fmt: str = "safetensors", dtype: str = "fp32",
                  inputs: dict | None = None, task: str | None = None,
                  extra: Callable[[Path, Exported], None] | None = None) -> Exported:
    """Write ``merged`` to ``out`` (atomically); ``extra(tmp, written)`` adds files (card, provenance) before
    the swap.  ``inputs``: a check batch for the verifications, or None to skip them."""
    check_options(fmt, dtype)
    if fmt == "gguf":
        if task != "causal-lm":
            raise DeltaError(f"--format gguf writes causal language models; this adapter's task is {task!r} "
                             "-- use --format safetensors")
        check_exportable(merged)  # fail before writing anything
    kw = {"name": Path(out).name} if fmt == "gguf" else {}
    with atomic_dir(out) as tmp, quiet_progress():  # transformers' "Writing model shards" bar stays off
        res = FORMATS[fmt](merged, proc, tmp, dtype, inputs, **kw)
        if extra is not None:
            extra(tmp, res)
        chmod_written(tmp)
    return res
