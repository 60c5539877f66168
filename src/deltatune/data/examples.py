"""Reading training data for the trainer and the CLI: CSV / TSV / JSONL / Parquet tables (pandas),
dataset directories / Arrow files / Hub ids (``datasets``, see :mod:`deltatune.data.sources`),
``.npz`` arrays and image folders, turned into examples for three tasks.

    file ──read_table──► DataFrame ──load_<task>──► Examples(rows, labels) ──encode──► token ids
                                                     └─ split_validation (seeded 10 %)

Every error is a :class:`deltatune.DeltaError` that names the file, and where it applies the row
(1-based, as a spreadsheet or ``sed -n Np`` would show it: CSV rows count the header line) and
the column: missing columns list the ones that exist, empty files, wrong types, non-UTF-8 bytes,
labels at evaluation time that the model was not trained on.

Tasks:
  * ``classify``: a text column and a label column (strings or integers; ids follow sorted order);
  * ``causal-lm``: alpaca, sharegpt, messages, prompt-completion or plain text rows
    (:mod:`deltatune.data.chat_formats`), tokenized through the tokenizer's chat template with the loss
    on every assistant turn (:mod:`deltatune.data.chat_encode`);
  * ``image-classify``: a folder of class sub-folders of images, or an ``.npz`` with ``images``
    (N, H, W[, C]) and ``labels`` arrays.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..core.delta import DeltaError
from ..vision.images import is_table, load_pixel_table
from .chat_encode import encode_causal_lm
from .chat_formats import load_records
from .tables import (CHARS_PER_TOKEN, IMAGE_SUFFIXES, LABEL_GUESSES, TEXT_GUESSES, _is_missing, _lines, _text_values,
                     _where, pick_column, read_table)


@dataclass
class Examples:
    """What a task loader returns: one entry per example, plus where it came from."""

    task: str
    rows: list[Any]  # classify: text; causal-lm: records of deltatune.data.chat_formats ({"messages"} / {"text"})
    labels: list[int] | None = None  # classify / image-classify
    label_names: list[str] = field(default_factory=list)
    source: str = ""
    line_of: list[int] = field(default_factory=list)  # file line/row of each example (for errors)
    format: str = ""  # causal-lm: the chat_formats name the rows were read as

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: Sequence[int]) -> "Examples":
        return Examples(self.task, [self.rows[i] for i in idx],
                        None if self.labels is None else [self.labels[i] for i in idx],
                        list(self.label_names), self.source, [self.line_of[i] for i in idx] if self.line_of else [],
                        self.format)


# --------------------------------------------------------------------------- tables

def _label_key(v, col: str, path: Path, line: int) -> str:
    if _is_missing(v) or (isinstance(v, str) and not v.strip()):
        raise DeltaError(f"{_where(path, line)}, column {col!r}: missing label")
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        if not v.is_integer():
            raise DeltaError(f"{_where(path, line)}, column {col!r}: label {v!r} is not a class (a fractional "
                             "number); classification needs integer or string labels")
        return str(int(v))
    if isinstance(v, (int, str)):
        return str(v).strip()
    if hasattr(v, "item"):  # numpy scalars from parquet
        return _label_key(v.item(), col, path, line)
    raise DeltaError(f"{_where(path, line)}, column {col!r}: expected a label (text or integer), got "
                     f"{type(v).__name__} {v!r}")


# Spellings of a missing value in exported tables (pandas' and spreadsheets' NA markers): never a
# class.  "NA" and "None" can be real class names, so they count as missing only in a numeric column.
_MISSING_ALWAYS = {"nan", "-nan", "null", "<na>", "#n/a", "n/a", "#na"}
_MISSING_IF_NUMERIC = {"na", "none"}


def _as_number(k: str) -> float | None:
    try:
        v = float(k)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _normalise_labels(keys: list[str], col: str, path: Path, lines: list[int]) -> list[str]:
    """Text labels as read from a table -> class keys: missing-value markers are refused with their
    line, and in a numeric column ``1``, ``1.0`` and ``1e0`` are one class ``"1"`` (a column that went
    through a spreadsheet or pandas comes back as floats).  Leading zeros (``"01"``) are kept: such
    columns are codes, not numbers, unless a float spelling shows up too."""
    numeric = [k for k in keys if k.lower() not in _MISSING_ALWAYS | _MISSING_IF_NUMERIC]
    is_numeric = bool(numeric) and all(_as_number(k) is not None for k in numeric)
    missing = _MISSING_ALWAYS | (_MISSING_IF_NUMERIC if is_numeric else set())
    for k, line in zip(keys, lines):
        if k.lower() in missing:
            raise DeltaError(f"{_where(path, line)}, column {col!r}: missing label ({k!r}); fill it in or drop "
                             "the row")
    if not is_numeric or not any(any(c in k for c in ".eE+") for k in keys):
        return keys
    out = []
    for k, line in zip(keys, lines):
        v = _as_number(k)
        if not v.is_integer():
            raise DeltaError(f"{_where(path, line)}, column {col!r}: label {k!r} is not a class (a fractional "
                             "number); classification needs integer or string labels")
        out.append(str(int(v)))
    return out


def _sorted_labels(keys) -> list[str]:
    keys = set(keys)
    if all(k.lstrip("-").isdigit() for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


# --------------------------------------------------------------------------- tasks

def load_classify(path, text_column=None, label_column=None, label_names: list[str] | None = None,
                  split: str | None = None, config: str | None = None) -> Examples:
    """Text + label rows. ``label_names`` (from training) makes unknown labels an error."""
    df = read_table(path, split, config)
    path = Path(path)
    lines = _lines(df, path)
    tcol = pick_column(df, path, text_column, TEXT_GUESSES, "text", "--text-column")
    lcol = pick_column(df, path, label_column, LABEL_GUESSES, "labels", "--label-column")
    texts = _text_values(df, tcol, path, lines)
    keys = _normalise_labels([_label_key(v, lcol, path, line) for v, line in zip(df[lcol].tolist(), lines)],
                             lcol, path, lines)
    if label_names is None:
        label_names = _sorted_labels(keys)
        if len(label_names) < 2:
            raise DeltaError(f"{path}, column {lcol!r}: only one label ({label_names}); classification needs >= 2")
    index = {k: i for i, k in enumerate(label_names)}
    for k, line in zip(keys, lines):
        if k not in index:
            raise DeltaError(f"{_where(path, line)}, column {lcol!r}: label {k!r} was not seen in training; "
                             f"the model knows {label_names}")
    return Examples("classify", texts, [index[k] for k in keys], list(label_names), str(path), lines)


def load_causal_lm(path, text_column=None, prompt_column=None, response_column=None,
                   messages_column=None, format: str | None = None, split: str | None = None,
                   config: str | None = None) -> Examples:
    """Rows as records of :mod:`deltatune.data.chat_formats` (alpaca, sharegpt, messages,
    prompt-completion, text; detected from the columns unless ``format`` is given)."""
    rows, lines, name = load_records(path, format, split, config, text_column=text_column,
                                     prompt_column=prompt_column, response_column=response_column,
                                     messages_column=messages_column)
    return Examples("causal-lm", rows, source=str(path), line_of=lines, format=name)


def load_images(path, label_names: list[str] | None = None, label_column: str | None = None) -> Examples:
    """An ``.npz`` with ``images`` and ``labels``, a folder ``DIR/<class>/<image>``, or a pixel
    CSV (MNIST: 784 grey pixels + label, :func:`deltatune.vision.images.load_pixel_table`). Rows are
    float arrays (H, W, C) in [0, 1]."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise DeltaError(f"image data {path} does not exist")
    if is_table(path):
        rows, keys, lines = load_pixel_table(path, label_column)
    elif path.is_dir():
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        if not classes:
            raise DeltaError(f"{path}: expected one sub-folder per class (e.g. {path}/cat/1.png)")
        rows, keys, lines = [], [], []
        from PIL import Image

        for c in classes:
            for f in sorted((path / c).iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    img = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0
                except Exception as e:
                    raise DeltaError(f"{f}: not a readable image ({e})") from None
                rows.append(img)
                keys.append(c)
                lines.append(len(lines) + 1)
        if not rows:
            raise DeltaError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    else:
        if path.suffix.lower() != ".npz":
            raise DeltaError(f"{path}: image data must be a folder of class folders, an .npz file or a pixel "
                             "CSV (784 pixels + label, as MNIST)")
        try:
            z = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DeltaError(f"{path}: not a readable .npz ({e})") from None
        for k in ("images", "labels"):
            if k not in z:
                raise DeltaError(f"{path}: no array {k!r}; arrays are {list(z.keys())}")
        try:
            imgs, labs = z["images"], z["labels"]
        except ValueError as e:  # object arrays need pickle, which we refuse
            raise DeltaError(f"{path}: refused ({e}); store images and labels as plain numeric arrays") from None
        if imgs.ndim not in (3, 4) or len(imgs) != len(labs):
            raise DeltaError(f"{path}: images must be (N, H, W[, C]) with one label each; got images "
                             f"{imgs.shape}, labels {labs.shape}")
        imgs = imgs.astype(np.float32)
        if imgs.max() > 1.0:
            imgs = imgs / 255.0
        if imgs.ndim == 3:
            imgs = imgs[..., None]
        rows = list(imgs)
        keys = [str(v.item() if hasattr(v, "item") else v) for v in labs]
        lines = list(range(1, len(rows) + 1))
    if label_names is None:
        label_names = _sorted_labels(keys)
    index = {k: i for i, k in enumerate(label_names)}
    for k, line in zip(keys, lines):
        if k not in index:
            raise DeltaError(f"{path}: image {line}: label {k!r} was not seen in training; known {label_names}")
    return Examples("image-classify", rows, [index[k] for k in keys], list(label_names), str(path), lines)


def split_validation(ex: Examples, fraction: float = 0.1, seed: int = 0, max_rows: int = 2000
                     ) -> tuple[Examples, Examples]:
    """A seeded random hold-out: ``fraction`` of the rows (at least 1, at most ``max_rows``)."""
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:  # NaN fails too
        raise DeltaError(f"validation fraction (--val-fraction) must be between 0 and 1, got {fraction!r}; "
                         "e.g. 0.1 holds out 10 % of the rows")
    n = len(ex)
    if n < 2:
        raise DeltaError(f"{ex.source}: only {n} example(s); need at least 2 to hold out a validation split "
                         "(or pass --val-data)")
    k = min(max(1, round(n * fraction)), max_rows, n - 1)
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return ex.subset(sorted(idx[k:])), ex.subset(sorted(idx[:k]))


def load_examples(task: str, path, label_names=None, **cols) -> Examples:
    src = {"split": cols.get("data_split"), "config": cols.get("data_config")}
    if task != "causal-lm" and cols.get("format") not in (None, "classification"):
        raise DeltaError(f"--format {cols['format']} is for --task causal-lm; --task {task} reads "
                         "its own format (text + label, or images)")
    loaders = {
        "classify": lambda: load_classify(path, cols.get("text_column"), cols.get("label_column"), label_names, **src),
        "causal-lm": lambda: load_causal_lm(path, cols.get("text_column"), cols.get("prompt_column"),
                                            cols.get("response_column"), cols.get("messages_column"),
                                            cols.get("format"), **src),
        "image-classify": lambda: load_images(path, label_names, cols.get("label_column")),
    }
    if task not in loaders:
        raise DeltaError(f"unknown task {task!r}; choose one of {sorted(loaders)}")
    return loaders[task]()


# --------------------------------------------------------------------------- encoding

def encode(ex: Examples, tokenizer=None, max_length: int = 128, image_size: int | None = None, **lm) -> list[dict]:
    """Examples -> list of feature dicts of Python lists / arrays (padding happens in :func:`collate`).
    ``lm``: causal-LM options of :func:`deltatune.data.chat_encode.encode_causal_lm` (train_on, cache)."""
    cap = max(1, max_length) * CHARS_PER_TOKEN
    if ex.task == "classify":
        enc = tokenizer([t[:cap] for t in ex.rows], truncation=True, max_length=max_length)
        return [{"input_ids": ids, "labels": y} for ids, y in zip(enc["input_ids"], ex.labels)]
    if ex.task == "causal-lm":
        return encode_causal_lm(ex.rows, tokenizer, max_length, **lm)
    if ex.task == "image-classify":
        import numpy as np

        out = []
        for img, y in zip(ex.rows, ex.labels):
            chw = np.ascontiguousarray(np.transpose(img, (2, 0, 1)))  # (C, H, W)
            out.append({"pixel_values": chw, "labels": y})
        return out
    raise DeltaError(f"unknown task {ex.task!r}")


def collate(features: list[dict], pad_id: int = 0) -> dict:
    """Pad token ids to the longest row; stack images. ``labels`` of -100 are ignored by the loss."""
    import numpy as np
    import torch

    if "pixel_values" in features[0]:
        return {"pixel_values": torch.tensor(np.stack([f["pixel_values"] for f in features])),
                "labels": torch.tensor([f["labels"] for f in features])}
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(features), n), dtype=torch.long)  # (B, T)
    seq_labels = isinstance(features[0]["labels"], list)
    labels = torch.full((len(features), n), -100, dtype=torch.long) if seq_labels else None
    for i, f in enumerate(features):
        t = len(f["input_ids"])
        ids[i, :t] = torch.tensor(f["input_ids"])
        mask[i, :t] = 1
        if seq_labels:
            labels[i, :t] = torch.tensor(f["labels"])
    if not seq_labels:
        labels = torch.tensor([f["labels"] for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
