"""What deltatune writes, when the disk or the OS does not cooperate (issue 15, items 9 and 11):
permissions follow the umask (or the directory being replaced), fixable write failures are one
line, and a directory that cannot be renamed (a mount point: EBUSY) is updated by copying."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import deltatune as dt
from conftest import tiny_mlp
from deltatune import files as safety
from deltatune.files import atomic_write


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _adapter():
    return dt.attach(tiny_mlp(), "lora", targets=["fc1"])


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_new_directories_and_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    d = dt.save(_adapter(), tmp_path / "new")
    assert _mode(d) == 0o777 & ~mask
    assert {f.name: _mode(f) for f in d.iterdir()} == {f.name: 0o666 & ~mask for f in d.iterdir()}
    atomic_write(tmp_path / "x.json", b"{}")
    assert _mode(tmp_path / "x.json") == 0o666 & ~mask


def test_replacing_keeps_the_existing_mode(tmp_path, umask):
    d = tmp_path / "a"
    d.mkdir()
    os.chmod(d, 0o750)
    (tmp_path / "f.json").write_bytes(b"{}")
    os.chmod(tmp_path / "f.json", 0o640)
    dt.save(_adapter(), d)
    dt.save(_adapter(), d)  # and again over its own result
    atomic_write(tmp_path / "f.json", b"[]")
    assert _mode(d) == 0o750 and _mode(tmp_path / "f.json") == 0o640


def test_checkpoints_and_run_outputs_are_not_private(tmp_path, umask):
    """save_pretrained output swapped in by atomic_dir: 0755 / 0644 under umask 022, not 0700."""
    from deltatune.app.run import save_pretrained_atomic
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(vocab_size=20, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=2))
    out = save_pretrained_atomic(m, None, tmp_path / "model")
    assert _mode(out) == 0o755 and all(_mode(f) == 0o644 for f in out.iterdir())


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EDQUOT],
                         ids=errno.errorcode.get)
def test_fixable_write_failures_are_one_line_and_keep_the_old_adapter(tmp_path, monkeypatch, err):
    m = _adapter()
    d = dt.save(m, tmp_path / "a")
    before = {f.name: f.read_bytes() for f in d.iterdir()}

    def fail(self, *a, **kw):
        raise OSError(err, os.strerror(err), str(self))

    monkeypatch.setattr(Path, "write_bytes", fail)
    with pytest.raises(dt.DeltaError) as e:
        dt.save(m, d)
    assert isinstance(e.value, OSError) and e.value.errno == err  # still an OSError for old callers
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg and errno.errorcode[err] in msg
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # the temporary directory is gone


def test_atomic_write_failure_is_one_line(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(dt.DeltaError, match="x.json: the disk is full"):
        atomic_write(tmp_path / "x.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_keep_their_traceback(tmp_path, monkeypatch):
    """Only failures the user can fix become one line; anything else is a bug and stays loud."""
    def fail(self, *a, **kw):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "write_bytes", fail)
    with pytest.raises(OSError) as e:
        dt.save(_adapter(), tmp_path / "a")
    assert not isinstance(e.value, dt.DeltaError)


def test_real_file_size_limit(tmp_path):
    """A real ``ulimit -f`` (RLIMIT_FSIZE) in a child process: the save stops with EFBIG (Python
    ignores SIGXFSZ) and the user gets one line, not a traceback."""
    resource = pytest.importorskip("resource")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import deltatune as dt
        from conftest import tiny_mlp
        m = dt.attach(tiny_mlp(), "lora", targets=["fc1", "fc2"], r=16)
        try:
            dt.save(m, {str(tmp_path / "a")!r})
        except dt.DeltaError as e:
            print("DeltaError:", e)
    """)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # the weights file is ~6 KB

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DeltaError: cannot write" in r.stdout and "EFBIG" in r.stdout and "ulimit -f" in r.stdout, r.stdout
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_real_unwritable_location():
    """sysfs refuses new entries even to root (EPERM): a real refusal, no monkeypatching."""
    with pytest.raises(dt.DeltaError, match=r"cannot write /sys/deltatune-test: operation not permitted.*EPERM"):
        dt.save(_adapter(), "/sys/deltatune-test")
    assert not Path("/sys/deltatune-test").exists()


def test_cli_turns_a_fixable_os_error_into_one_line(monkeypatch):
    from typer.testing import CliRunner

    from deltatune import cli
    from deltatune.app import run

    def train_run(o, log=print):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/training.png")

    monkeypatch.setattr(run, "train_run", train_run)
    r = CliRunner().invoke(cli.app, ["train", "--model", "m", "--data", "d.csv"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: cannot write runs/x/training.png: the disk is full; free some space or write elsewhere "
        "(ENOSPC: No space left on device)"]


# --------------------------------------------------------------------------- mount points


@pytest.fixture
def busy(monkeypatch):
    """``final`` behaves like a mount point: it cannot be renamed or exchanged (EBUSY)."""
    def exchange(a, b):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    real_rename = os.rename
    victims = []

    def rename(src, dst, *a, **kw):
        if Path(src).resolve() in victims:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(safety, "exchange", exchange)
    monkeypatch.setattr(os, "rename", rename)
    return victims


def test_saving_into_a_mount_point_copies_into_it(tmp_path, busy):
    d = tmp_path / "volume"
    m = _adapter()
    dt.save(m, d)
    (d / "README.md").write_text("the user's")
    busy.append(d.resolve())
    ino = d.stat().st_ino
    with torch.no_grad():
        for t in dt.adapter_tensors(m, "default").values():
            t.add_(1.0)
    dt.save(m, d)  # exchange and rename both EBUSY: the files are copied in
    assert d.stat().st_ino == ino and (d / "README.md").read_text() == "the user's"
    got = dt.adapter_tensors(dt.load(tiny_mlp(), d), "default")  # verified against the manifest
    assert all(torch.equal(got[k], v) for k, v in dt.adapter_tensors(m, "default").items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]  # no temporary left over
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_whole_directory_replace_into_a_mount_point_drops_stale_files(tmp_path, busy):
    d = tmp_path / "volume"
    d.mkdir()
    (d / "old-shard.bin").write_bytes(b"stale")
    (d / "sub").mkdir()
    (d / "sub" / "x").write_bytes(b"stale")
    busy.append(d.resolve())
    with safety.atomic_dir(d) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "y").write_bytes(b"new")
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == ["model.safetensors", "sub", "sub/y"]
