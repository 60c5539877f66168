"""The bad-input catalogue, part 3 (issue 15, library and command line): hostile sizes and values,
failing disks, a busy output directory (registered into ``bad_input_cases.CASES``; see that module
for what every case must satisfy: a one-line DeltaError / exit 2, nothing changed on disk).

File-system faults that a test cannot cause for real as root (disk full, read-only file system,
a parent directory without write permission) are injected by making the write calls raise the
``OSError`` the kernel would; ``tests/test_write_safety.py`` also hits a real ``ulimit -f``."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import tempfile
from unittest import mock

import deltatune as dt
from bad_input_cases import CASES, Case, case, model_with_adapter
from bad_input_cases_io import GOOD_CSV, TRAIN, _cli, _data

# --------------------------------------------------------------------------- data files

DEEP = "[" * 40 + "]" * 40
for _id, _args, _exp in [
    ("label_nan_text", ("d.csv", "text,label\nhi,1\nyo,NaN\nok,0\n"), ("line 3", "missing label ('NaN')")),
    ("label_na_in_numeric_column", ("d.csv", "text,label\nhi,1\nyo,0\nok,NA\n"), ("line 4", "missing label ('NA')")),
    ("label_fractional_csv", ("d.csv", "text,label\nhi,1.0\nyo,0.5\n"), ("line 3", "label '0.5' is not a class")),
    ("jsonl_too_deep", ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0, "x": ' + DEEP + "}\n"),
     ("line 2", "nested more than 32 levels")),
    ("jsonl_deeper_than_recursion_limit", ("d.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
     ("line 1", "nested more than 32 levels")),
    ("json_array_too_deep", ("d.json", '[{"text": "a", "label": 1}, {"text": ' + DEEP + ', "label": 0}]'),
     ("nested more than 32 levels",)),
]:
    CASES[_id] = Case("data", _exp, _data(*_args), f"{_args[0]}: {_args[1]!r:.60}")


# --------------------------------------------------------------------------- config


@case("config", "r=100000000 is too large for fc1", "at most 16")
def c_rank_larger_than_layer(ws):
    """dt.attach(model, 'lora', r=10**8): refused before allocating ~10 GB"""
    m = model_with_adapter()
    return m, lambda: dt.attach(m, "lora", targets=["fc1"], r=10**8, name="big")


# --------------------------------------------------------------------------- failing disks

def _failing_save(err: int, target: str = "write_bytes"):
    """dt.save over an existing adapter while the OS answers ``err``: the old adapter is kept."""
    def build(ws):
        m = model_with_adapter()
        dt.save(m, ws / "out")

        def fail(*a, **kw):
            raise OSError(err, os.strerror(err), str(a[0]) if a else None)

        def act():
            where = {"write_bytes": (pathlib.Path, "write_bytes"), "mkdtemp": (tempfile, "mkdtemp")}[target]
            with mock.patch.object(*where, fail):
                return dt.save(m, ws / "out")
        return m, act
    return build


for _id, _err, _target, _exp in [
    ("save_disk_full", errno.ENOSPC, "write_bytes", ("cannot write", "out", "the disk is full", "ENOSPC")),
    ("save_file_size_limit", errno.EFBIG, "write_bytes", ("file-size limit", "ulimit -f", "EFBIG")),
    ("save_read_only_fs", errno.EROFS, "mkdtemp", ("read-only", "EROFS")),
    ("save_parent_not_writable", errno.EACCES, "mkdtemp", ("permission denied", "EACCES")),
]:
    CASES[_id] = Case("adapter-dir", _exp, _failing_save(_err, _target),
                      f"dt.save(model, existing_dir) while the OS says {errno.errorcode[_err]} ({_target})")


# --------------------------------------------------------------------------- command line

for _id, _args, _files, _exp in [
    ("cli_val_fraction_nan", TRAIN + ("--val-fraction", "nan"), GOOD_CSV, ("--val-fraction must be between 0 and 1",)),
    ("cli_val_fraction_above_one", TRAIN + ("--val-fraction", "1.5"), GOOD_CSV, ("got 1.5",)),
    ("cli_seed_negative", TRAIN + ("--seed", "-1"), GOOD_CSV, ("seed=-1 (--seed on the command line) is invalid", "[0, 2**32)")),
    ("cli_max_train_rows_zero", TRAIN + ("--max-train-rows", "0"), GOOD_CSV, ("--max-train-rows must be a positive",)),
    ("cli_serve_token_file_missing", ("serve", "--model", "{ws}/m", "--token-file", "{ws}/no-token"), None,
     ("--token-file", "no-token", "cannot read it")),
    ("cli_serve_adapters_mistyped", ("serve", "--model", "{ws}/m", "--adapters", "{ws}/adpaters"), None,
     ("--adapters", "adpaters", "does not exist")),
]:
    CASES[_id] = Case("cli", _exp, _cli(*_args, files=_files), "deltatune " + " ".join(_args))


@case("cli", "options different from the checkpoint's", "--lr 0.001 -> 0.01", "--opt r 8 -> 16")
def c_cli_resume_other_options(ws):
    """deltatune train --resume --lr 0.01 -o r=16 on a run started with --lr 0.001 -o r=8"""
    from deltatune.app.run import OPTIONS_FILE, RunOptions, options_fingerprint

    build = _cli(*TRAIN, "--resume", "--lr", "0.01", "-o", "r=16", files=GOOD_CSV)
    (ws / "run").mkdir()
    first = RunOptions(model=f"{ws}/no-model", data=f"{ws}/d.csv", output=f"{ws}/run", lr=0.001,
                       method_options={"r": 8}, train={"progress": True})
    (ws / "run" / OPTIONS_FILE).write_text(json.dumps(options_fingerprint(first)))
    return build(ws)


@case("cli", "in use by another deltatune run", "pid")
def c_cli_output_locked(ws):
    """deltatune train --output X while another run holds X's lock"""
    import fcntl

    from deltatune.train.runlock import LOCK_NAME

    _, act = _cli(*TRAIN, files=GOOD_CSV)(ws)
    (ws / "run").mkdir()
    fd = os.open(ws / "run" / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    os.write(fd, f"{os.getpid()}\n".encode())
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def held():
        try:
            return act()
        finally:
            os.close(fd)  # releases the lock
    return None, held


@case("cli", "r=100000000 is too large")
def c_cli_opt_rank_huge(ws):
    """deltatune train -o r=1e8 (a tiny BERT whose layers are 32 wide)"""
    from cli_fixtures import tiny_bert_dir

    tiny_bert_dir(ws / "no-model")
    return _cli(*TRAIN, "-o", "r=1e8", "--max-steps", "1", "--no-progress", files=GOOD_CSV)(ws)
