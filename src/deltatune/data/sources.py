"""Data that is not one local table file, read through Hugging Face ``datasets``:

    DIR/                 a ``save_to_disk`` directory, or a folder of json/jsonl/csv/parquet/arrow files
                         (one split per file name, as on the Hub: train.jsonl, test.jsonl, data/train-*.parquet)
    FILE.arrow           an Arrow file written by ``datasets``
    org/name             a Hub dataset id: from the local Hub cache (``hf download org/name --repo-type
                         dataset``) or, when online (HF_HUB_OFFLINE=0), downloaded into that cache first

Single csv/tsv/jsonl/json/parquet files stay with :func:`deltatune.data.tables.read_table` (pandas), which
names the exact line of a bad row; everything here comes back as the same kind of DataFrame, so
the task loaders and their errors (row, column) are shared.  ``--data-split`` picks a split
(default ``train``, or the only one), ``--data-config`` a Hub configuration.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..core.delta import DeltaError
from ..models import cached_snapshot, download_snapshot, offline

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".json", ".parquet", ".pq")
# what a Hub dataset download fetches: the data files and README.md (its YAML names the configs and splits)
DATA_FILES = ["README.md", *(f"*{s}" for s in TABLE_SUFFIXES), "*.arrow"]


def quiet_datasets() -> None:
    """No "Generating train split" bars or logs in the user's run."""
    import datasets

    datasets.disable_progress_bars()
    # its parse errors are logged before they are raised; we raise them as one DeltaError line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def is_dataset_source(spec: str | os.PathLike) -> bool:
    """True for what this module reads (a directory, an .arrow file, a Hub id); False for a table file."""
    p = Path(spec)
    if p.is_dir() or p.suffix.lower() == ".arrow":
        return True
    s = str(spec)
    # "org/name" or "name" that is not a path on disk and has no table suffix: a Hub dataset id
    return (not p.exists() and p.suffix.lower() not in TABLE_SUFFIXES and s.count("/") <= 1
            and not s.startswith((".", "/", "~")) and bool(s.strip()))


def read_dataset_table(spec: str | os.PathLike, split: str | None, config: str | None,
                       read_file: Callable[[Path], Any]):
    """A pandas DataFrame of one split of a dataset directory, Arrow file or Hub id.  ``read_file``
    reads one table file (``tables.read_table``): a directory that fails is re-read file by file
    with it, so the error names the file and line."""
    import pandas as pd

    ds = _one_split(_open(str(spec), config, read_file), str(spec), split)
    if len(ds) == 0:
        raise DeltaError(f"{spec}: split {split or 'train'!r} has no rows")
    # records, not ds.to_pandas(): nested columns (chat messages) stay Python lists of dicts
    df = pd.DataFrame.from_records(ds.to_list())
    df.columns = [str(c) for c in df.columns]
    return df


def _open(spec: str, config: str | None, read_file: Callable[[Path], Any]):
    import datasets

    quiet_datasets()
    p = Path(spec)
    try:
        if p.suffix.lower() == ".arrow" and p.is_file():
            return datasets.Dataset.from_file(str(p))
        if p.is_dir():
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                return datasets.load_from_disk(str(p))
            if not any(f.suffix.lower() in TABLE_SUFFIXES + (".arrow",) for f in p.rglob("*") if f.is_file()):
                raise DeltaError(f"{p} is a directory without data files; pass a .csv, .tsv, .jsonl, .json or "
                                 ".parquet file, or a directory of them (one split per file name)")
            return datasets.load_dataset(str(p), name=config)
        if not p.exists() and p.suffix.lower() == ".arrow":
            raise DeltaError(f"data file {p} does not exist")
        return _open_hub(spec, config)
    except DeltaError:
        raise
    except Exception as e:  # no data files, unknown config, a parse error of a file inside a directory
        if p.is_dir():
            _precise_error(p, read_file)  # name the file and line, as for a single file
        raise DeltaError(f"{spec}: cannot read it as a dataset ({type(e).__name__}: {_first_line(e)})") from None


def _precise_error(d: Path, read_table: Callable[[Path], Any]) -> None:
    """Read each table file of a directory on its own: the first bad one raises its error with the
    file and line (the pandas readers of ``tables.py``); columns that differ between files are named."""
    columns: dict[tuple, Path] = {}
    for f in sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in TABLE_SUFFIXES):
        columns.setdefault(tuple(read_table(f).columns), f)
    if len(columns) > 1:
        (a, fa), (b, fb) = list(columns.items())[:2]
        raise DeltaError(f"{d}: the files do not share their columns ({fa.name}: {list(a)}, {fb.name}: {list(b)}); "
                         "every split needs the same columns")


def _open_hub(repo: str, config: str | None):
    """The local Hub snapshot of dataset ``repo`` (works offline), else, when online, its data files
    downloaded into the Hub cache with the same ``snapshot_download`` as a model's; then the
    snapshot is read as a local folder (its README.md's configs included)."""
    import datasets

    local = cached_snapshot(repo, "dataset", DATA_FILES)
    if local is None:
        if offline():
            raise DeltaError(f"data {repo!r} is not a local file or directory, and the dataset is not in the local "
                             "Hugging Face cache (HF_HUB_OFFLINE=1); download it once with "
                             f"`hf download {repo} --repo-type dataset`, then run again")
        local = download_snapshot(repo, "dataset", DATA_FILES, f"data {repo!r}")
    return datasets.load_dataset(local, name=config)


def _one_split(ds, spec: str, split: str | None):
    import datasets

    if isinstance(ds, (datasets.DatasetDict, dict)):
        names = list(ds.keys())
        if split is None:
            if "train" in names or len(names) == 1:
                split = "train" if "train" in names else names[0]
            else:
                raise DeltaError(f"{spec}: several splits {names} and none is 'train'; pass --data-split NAME")
        if split not in names:
            raise DeltaError(f"{spec}: no split {split!r}; splits are {names}. Pass --data-split NAME")
        return ds[split]
    if split not in (None, "train"):
        raise DeltaError(f"{spec}: a single dataset without splits; drop --data-split {split}")
    return ds


def _first_line(e: BaseException) -> str:
    """The first line of the error, and of its cause (datasets wraps the real parse error)."""
    s = str(e).strip().splitlines()
    msg = s[0][:200] if s else type(e).__name__
    cause = e.__cause__ or e.__context__
    return f"{msg}: {_first_line(cause)}" if cause is not None and cause is not e else msg
