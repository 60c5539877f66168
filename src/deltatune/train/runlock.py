"""One training run per output directory at a time.

Two ``deltatune train --output X`` started together used to both run and both exit 0, one run's
files silently replacing the other's.  :func:`run_lock` takes an exclusive ``flock`` on
``X/.deltatune.lock`` (holding the owner's pid) for the whole run; a second run fails at once
with a :class:`DeltaError` naming the pid that holds it.  The kernel drops the lock when the
process dies, so a killed run never leaves a stale lock behind.

    with run_lock(out):       # raises DeltaError("... in use by pid 1234 ...") if taken
        train and write outputs

The lock file is removed on exit (and ``X`` itself if the lock created it and nothing else was
written), so a run that fails early leaves the disk as it was.  Removing a flock file races with a
process that opened it just before: after locking we check the path still names the file we
locked, and retry otherwise.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from ..core.delta import DeltaError
from ..files import write_error

LOCK_NAME = ".deltatune.lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output directory ``out`` (created if missing)."""
    import fcntl

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DeltaError(f"output {out} is a file; --output must be a directory")
    created = not out.exists()
    lock = out / LOCK_NAME
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(e, lock) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise DeltaError(f"output directory {out} is in use by another deltatune run ({_holder(lock)}); "
                             "wait for it to finish, or choose another --output") from None
        try:  # the previous holder may have unlinked the file between our open and our flock
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before unlocking: a waiter then sees a new file, not ours
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds if the run wrote nothing
