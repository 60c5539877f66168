"""Reading one table of training data: CSV / TSV / JSONL / JSON / Parquet files (pandas), or a
dataset directory, Arrow file or Hub id (``sources.py``), as a DataFrame whose errors name the
file, the row (1-based, as a spreadsheet or ``sed -n Np`` shows it) and the column; plus the
column guesses and helpers the task loaders (``examples.py``) and the chat formats share.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..core.delta import DeltaError
from .sources import is_dataset_source, read_dataset_table

TEXT_GUESSES = ("text", "sentence", "content", "review", "document", "input")
LABEL_GUESSES = ("label", "labels", "class", "target", "category", "y")
PROMPT_GUESSES = ("prompt", "instruction", "question", "statement", "input")
RESPONSE_GUESSES = ("response", "answer", "output", "reply", "completion")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# A text is cut to max_length * CHARS_PER_TOKEN characters before it is tokenized: a fast tokenizer
# builds offsets and token objects for the WHOLE text before truncating (a 20 MB cell peaked at
# 3.2 GB).  16 characters is more than any real token spans (English BPE/WordPiece average ~4),
# so the cut never changes the max_length tokens that are kept.
CHARS_PER_TOKEN = 16
# Rows are flat records (chat messages nest 3 deep); deeper JSON is refused before it can exhaust
# the parser's recursion or build huge nested objects.
MAX_JSON_DEPTH = 32


def _row_offset(path: Path) -> int:
    """File line of DataFrame row 0: CSV has a header line, JSONL does not."""
    return 2 if path.suffix.lower() in (".csv", ".tsv", ".txt") else 1


def _check_utf8(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DeltaError(f"{path}: line {line} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                         "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def read_table(path: str | os.PathLike, split: str | None = None, config: str | None = None) -> "Any":
    """A pandas DataFrame from CSV/TSV/JSONL/JSON/Parquet, with errors that name the file; dataset
    directories, Arrow files and Hub ids go through ``datasets`` (:mod:`deltatune.data.sources`)."""
    if is_dataset_source(path):
        return read_dataset_table(path, split, config, read_table)
    path = Path(path)
    if not path.exists():
        raise DeltaError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".tsv": _read_csv, ".txt": _read_csv, ".jsonl": _read_jsonl,
               ".json": _read_jsonl, ".parquet": _read_parquet, ".pq": _read_parquet}
    if suffix not in readers:
        raise DeltaError(f"{path}: unknown file type {suffix!r}; use one of {sorted(readers)}")
    if path.stat().st_size == 0:
        raise DeltaError(f"{path}: the file is empty")
    df = readers[suffix](path)
    if len(df) == 0:
        raise DeltaError(f"{path}: no data rows (only a header?)")
    df.columns = [str(c) for c in df.columns]
    return df


def _read_csv(path: Path):
    import pandas as pd

    data = path.read_bytes()
    _check_utf8(path, data)
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:  # everything as text: a label "01" stays "01"; numbers are parsed where we need them
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise DeltaError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as e:
        raise DeltaError(f"{path}: not a valid {'TSV' if sep == chr(9) else 'CSV'} file ({e})") from None


def _read_jsonl(path: Path):
    import json

    import pandas as pd

    data = path.read_bytes()
    _check_utf8(path, data)
    text = data.decode("utf-8")
    too_deep = (f"JSON nested more than {MAX_JSON_DEPTH} levels deep; rows must be flat records "
                "{\"column\": value, ...}")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DeltaError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DeltaError(f"{path}: {too_deep}") from None
        lines = list(range(1, len(records) + 1))
        if _too_deep(records, MAX_JSON_DEPTH + 1):
            raise DeltaError(f"{path}: {too_deep}")
    else:
        records, lines = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DeltaError(f"{path}: line {i}: invalid JSON ({e.msg}); JSONL needs one object per line") from None
            except RecursionError:  # deeper than the interpreter's recursion limit
                raise DeltaError(f"{path}: line {i}: {too_deep}") from None
            if _too_deep(rec, MAX_JSON_DEPTH):
                raise DeltaError(f"{path}: line {i}: {too_deep}")
            records.append(rec)
            lines.append(i)
    bad = next((i for r, i in zip(records, lines) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DeltaError(f"{path}: line {bad}: expected a JSON object {{\"column\": value, ...}}")
    df = pd.DataFrame.from_records(records)
    df.attrs["lines"] = lines
    return df


def _too_deep(obj, limit: int) -> bool:
    """True if ``obj`` nests lists/dicts more than ``limit`` levels (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (list, dict)):
            if d > limit:
                return True
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


def _read_parquet(path: Path):
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except ImportError as e:
        raise DeltaError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow ({e})") from None
    except Exception as e:
        raise DeltaError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def _lines(df, path: Path) -> list[int]:
    if "lines" in df.attrs:
        return list(df.attrs["lines"])
    off = _row_offset(path)
    return [i + off for i in range(len(df))]


def _where(path: Path, line: int) -> str:
    return f"{path}: {'line' if path.suffix.lower() in ('.csv', '.tsv', '.txt', '.jsonl', '.json') else 'row'} {line}"


def pick_column(df, path: Path, given: str | None, guesses: Sequence[str], role: str, flag: str) -> str:
    cols = list(df.columns)
    if given is not None:
        if given not in cols:
            import difflib

            close = difflib.get_close_matches(given, cols, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DeltaError(f"{path}: no column {given!r}{hint}; columns are {cols}. Pass {flag} COLUMN")
        return given
    lower = {c.lower(): c for c in cols}
    for g in guesses:
        if g in lower:
            return lower[g]
    raise DeltaError(f"{path}: cannot tell which column holds the {role}; columns are {cols}. Pass {flag} COLUMN")


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _text_values(df, col: str, path: Path, lines: list[int]) -> list[str]:
    out = []
    for v, line in zip(df[col].tolist(), lines):
        if _is_missing(v):
            raise DeltaError(f"{_where(path, line)}, column {col!r}: missing value; every row needs text")
        if not isinstance(v, str):
            raise DeltaError(f"{_where(path, line)}, column {col!r}: expected text, got {type(v).__name__} {v!r}")
        out.append(v)
    return out
