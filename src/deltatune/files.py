"""Files nothing can half-write: atomic files and directories, write errors a user can act on,
and user-supplied path components kept inside their root.  The one home of atomic writes.

Atomic directory (used by ``dt.save``, and for anything written by ``save_pretrained``)::

    with atomic_dir("out/adapter") as tmp:      # tmp = out/.adapter.dt-new-<pid>-<rand>/
        write files into tmp                    # readers still see the old out/adapter
    # on exit: fsync every file and tmp, then swap tmp <-> out/adapter in ONE rename
    # (Linux renameat2(RENAME_EXCHANGE)); the old copy is then deleted.

A reader therefore sees the whole previous directory or the whole new one, never weights from
one save and a config from another.  A killed writer leaves only a hidden ``.NAME.dt-*`` sibling,
which the next save removes.  Where the exchange is unavailable (not Linux, some network file
systems) we rename old -> ``.NAME.dt-old-<pid>-*`` then new -> NAME; a crash between the two is
undone by :func:`recover_dir` (called by the next save and by ``dt.load``).

Paths: :func:`safe_join` keeps user-supplied names (adapter names in HTTP requests, CLI args)
inside their root directory.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .core.delta import DeltaError

# --------------------------------------------------------------------------- write failures

# errno -> what to do about it: the failures a user can fix (space, limits, permissions)
_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere",
    errno.EFBIG: "a file exceeds the file-size limit (`ulimit -f` or the file system's maximum); raise the "
                 "limit or write elsewhere",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a directory you can write to",
    errno.EPERM: "operation not permitted; choose a directory you can write to",
}


class WriteError(DeltaError, OSError):
    """A write failed for a reason the user can fix (disk full, file-size limit, read-only file
    system, no permission).  Both a :class:`DeltaError` (one-line message) and an ``OSError``
    (``errno`` kept), so code catching either still does."""

    __str__ = BaseException.__str__  # the message, not OSError's "[Errno N] strerror: filename"


def write_error(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` as a one-line :class:`WriteError` naming ``path`` if it is a fixable write failure,
    else ``e`` itself (a real bug keeps its traceback)."""
    if isinstance(e, DeltaError) or e.errno not in _WRITE_HINTS:
        return e
    w = WriteError(f"cannot write {path}: {_WRITE_HINTS[e.errno]} ({errno.errorcode[e.errno]}: "
                   f"{e.strerror or os.strerror(e.errno)})")
    w.errno, w.filename = e.errno, getattr(e, "filename", None)
    return w


def umask() -> int:
    """The process umask, read without changing it where possible (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    m = os.umask(0o022)  # elsewhere: set and restore (racy with threads creating files meanwhile)
    os.umask(m)
    return m


def chmod_written(d: str | os.PathLike) -> None:
    """Give every file under ``d`` the mode a plain write would (0666 & ~umask): transformers and
    safetensors write weights through 0600 temporary files."""
    for f in Path(d).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~umask())


def new_mode(existing: str | os.PathLike, default: int) -> int:
    """Permission bits for a file or directory replacing ``existing``: its own if it exists, else
    ``default`` (0o666 files, 0o777 directories) less the umask - what open()/mkdir() would give;
    mkstemp/mkdtemp make 0600/0700, which a swap must not leak into the result."""
    try:
        return os.stat(existing).st_mode & 0o7777
    except OSError:
        return default & ~umask()


# --------------------------------------------------------------------------- atomic directories

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.dt-(?P<kind>new|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _renameat2():
    try:
        f = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_EXCHANGE = _renameat2()


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (one syscall). False if the OS/file system cannot."""
    if _EXCHANGE is None:
        return False
    r = _EXCHANGE(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95, 18):  # EINVAL, ENOSYS, EOPNOTSUPP, EXDEV: not supported here
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def fsync_path(p: str | os.PathLike) -> None:
    """fsync a file or a directory (directories: best effort, some systems refuse)."""
    try:  # O_NONBLOCK: opening a FIFO someone left in the directory must not wait for a writer
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (bottom-up), then ``root`` itself."""
    for d, _, files in os.walk(root, topdown=False):
        for f in files:
            fsync_path(os.path.join(d, f))
        fsync_path(d)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def _siblings(final: Path) -> Iterator[tuple[Path, str, int]]:
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = _TMP_RE.match(p.name)
        if m and m["name"] == final.name:
            yield p, m["kind"], int(m["pid"])


def recover_dir(path: str | os.PathLike) -> bool:
    """Repair what a killed writer left next to ``path``; True if the directory was restored.

    * ``path`` missing and a ``.NAME.dt-old-*`` of a dead writer present (crash between the two
      renames of the fallback swap): the old copy is renamed back;
    * leftovers of dead writers (``.NAME.dt-new-*``, stale ``.NAME.dt-old-*``) are removed."""
    final = Path(path)
    restored = False
    stale = [(p, kind) for p, kind, pid in _siblings(final) if not _alive(pid)]
    if not final.exists():
        olds = sorted((p for p, kind in stale if kind == "old"), key=lambda p: p.stat().st_mtime)
        if olds:
            with contextlib.suppress(OSError):
                os.rename(olds[-1], final)
                fsync_path(final.parent)
                restored = True
    for p, _ in stale:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
    return restored


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, carry_over: bool = False) -> Iterator[Path]:
    """Build a directory at a temporary path beside ``path``; on success it replaces ``path`` in
    one atomic step (see the module docstring).  On an exception the temporary is removed and
    ``path`` is untouched.

    ``carry_over=True`` keeps entries of the existing directory that the block did not write
    (hard links, so no copying): used by ``dt.save`` so that saving an adapter into a directory
    does not delete the user's other files there.  Use ``carry_over=False`` for whole
    directories such as ``save_pretrained`` output or training checkpoints, where stale files
    (old shards) must not survive."""
    final = Path(path).resolve()  # a symlinked directory is replaced where it really lives
    if final.exists() and not final.is_dir():
        raise DeltaError(f"cannot write directory {final}: a file with that name exists; remove it or "
                         "choose another path")
    cwd = Path.cwd().resolve()
    if final == cwd or final in cwd.parents or final.parent == final:
        raise DeltaError(f"cannot atomically replace {final}: it is the current directory or one of its "
                         "parents; save into a sub-directory (e.g. ./adapter)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.dt-new-{os.getpid()}-", dir=final.parent))
    except OSError as e:
        raise write_error(e, final) from e
    try:
        yield tmp
        if carry_over and final.is_dir():
            for e in final.iterdir():
                dst = tmp / e.name
                if dst.exists() or os.path.lexists(dst):
                    continue
                if e.is_dir() and not e.is_symlink():
                    shutil.copytree(e, dst, symlinks=True, copy_function=_link_or_copy)
                elif e.is_symlink():
                    os.symlink(os.readlink(e), dst)
                else:
                    _link_or_copy(str(e), str(dst))
        fsync_tree(tmp)
        os.chmod(tmp, new_mode(final, 0o777))  # mkdtemp made it 0700: keep the old mode, or the umask's
        _publish(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, final) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, final: Path) -> None:
    if not final.exists():
        try:
            os.rename(tmp, final)
            fsync_path(final.parent)
            return
        except OSError:
            if not final.exists():
                raise  # a real failure, not a race with another writer
    try:
        swapped = exchange(tmp, final)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        return _copy_into(tmp, final)
    if swapped:
        fsync_path(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.dt-old-{os.getpid()}-", dir=final.parent))
    os.rmdir(old)
    try:
        os.rename(final, old)  # a crash here leaves `old`, which recover_dir renames back
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        return _copy_into(tmp, final)
    os.rename(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _copy_into(tmp: Path, final: Path) -> None:
    """Fallback when ``final`` cannot be renamed (EBUSY: it is a mount point, e.g. a container
    volume's root): copy every file of ``tmp`` into ``final`` (each under a temporary name, fsynced,
    then renamed over the old one), then delete what ``tmp`` does not have.  Each file is replaced
    atomically; the directory as a whole is not (a reader may see new weights with an old config
    for a moment, which an adapter's manifest checksums catch)."""
    for d, dirs, files in os.walk(tmp):
        rel = Path(d).relative_to(tmp)
        for x in dirs:
            (final / rel / x).mkdir(exist_ok=True)
        for f in files:
            src, dst = Path(d) / f, final / rel / f
            if dst.exists() and os.path.samefile(src, dst):
                continue  # carried over as a hard link: already there
            part = dst.with_name(f".{f}.dt-copy-{os.getpid()}")
            shutil.copy2(src, part)
            fsync_path(part)
            os.replace(part, dst)
        fsync_path(final / rel)
    for d, dirs, files in os.walk(final, topdown=False):
        rel = Path(d).relative_to(final)
        for x in files + dirs:
            if not os.path.lexists(tmp / rel / x):
                p = Path(d) / x
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        fsync_path(d)
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- paths

def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """``root/part/...`` for user-supplied parts, refusing anything that would leave ``root``
    (absolute paths, ``..``, symlinks pointing outside, NUL bytes)."""
    base = Path(root).resolve()
    for part in parts:
        if not isinstance(part, str) or not part or "\x00" in part:
            raise DeltaError(f"invalid path component {part!r}: use a plain non-empty name")
        if os.path.isabs(part) or part.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", part):
            raise DeltaError(f"path {part!r} is absolute; give a name relative to {base}")
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise DeltaError(f"path {'/'.join(parts)!r} escapes {base}; use a plain name without '..' or links")
    return target


# --------------------------------------------------------------------------- atomic files

def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), new_mode(path, 0o666))  # mkstemp made 0600: the old mode, or the umask's
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise
    fsync_path(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n").encode())


def json_default(o):
    if isinstance(o, (set, tuple)):
        return sorted(o) if isinstance(o, set) else list(o)
    raise TypeError(f"cannot store {type(o).__name__} in a config")
