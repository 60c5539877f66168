"""Nothing lost, nothing unsafe: atomic directories, numerical guards and path checks.

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

Numerical guards for training loops (the trainer calls them, the core never does)::

    guard = NanGuard(policy="skip", max_skips=5)
    loss.backward()
    if guard.ok(loss, model):      # loss and every gradient finite?
        opt.step()                 # else the step is skipped (grads zeroed), and after
    opt.zero_grad()                # max_skips bad steps in a row NonFiniteError stops the run

Paths: :func:`safe_join` keeps user-supplied names (adapter names in HTTP requests, CLI args)
inside their root directory.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .core import DeltaError

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
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.dt-new-{os.getpid()}-", dir=final.parent))
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
        _publish(tmp, final)
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
    if exchange(tmp, final):
        fsync_path(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.dt-old-{os.getpid()}-", dir=final.parent))
    os.rmdir(old)
    os.rename(final, old)  # a crash here leaves `old`, which recover_dir renames back
    os.rename(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


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


# --------------------------------------------------------------------------- numerical faults

class NonFiniteError(DeltaError):
    """A loss, gradient or weight became NaN/Inf."""


def first_nonfinite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating tensor holding a NaN/Inf, else None (one fused check first,
    a per-tensor scan only when something is wrong)."""
    items = [(n, t) for n, t in (tensors.items() if isinstance(tensors, Mapping) else tensors)
             if t is not None and t.is_floating_point() and t.numel()]
    if not items:
        return None
    with torch.no_grad():
        # sum of |t| is non-finite iff some element is (up to overflow, which is a fault anyway)
        total = torch.stack([t.detach().float().abs().sum() for _, t in items]).sum()
        if torch.isfinite(total):
            return None
        for n, t in items:
            if not torch.isfinite(t.detach()).all():
                return n
    return items[0][0]  # finite elements whose sum overflows float32


def describe(t: torch.Tensor) -> str:
    t = t.detach()
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} Inf of {t.numel()} values"


def check_finite(loss: torch.Tensor | float | None = None, model: nn.Module | None = None, *,
                 grads: bool = True, weights: bool = False, step: int | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the loss, the gradient or the weight that is NaN/Inf.

    Only trainable parameters are checked (the frozen base cannot change during training)."""
    at = f" at step {step}" if step is not None else ""
    if loss is not None:
        lt = torch.as_tensor(loss)
        if not torch.isfinite(lt).all():
            raise NonFiniteError(f"loss is {lt.detach().flatten()[0].item()}{at}; lower the learning rate, "
                                 "check the data for empty/extreme rows, or use fp32/bf16 instead of fp16")
    if model is None:
        return
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if grads:
        bad = first_nonfinite([(n, p.grad) for n, p in params])
        if bad is not None:
            g = dict(params)[bad].grad
            raise NonFiniteError(f"gradient of {bad} has {describe(g)}{at}; lower the learning rate or "
                                 "enable gradient clipping")
    if weights:
        bad = first_nonfinite(params)
        if bad is not None:
            raise NonFiniteError(f"parameter {bad} has {describe(dict(params)[bad])}{at}; "
                                 "resume from the last good checkpoint with a lower learning rate")


@dataclass
class NanGuard:
    """Per-step policy for non-finite losses/gradients.

    ``ok(loss, model)`` returns True when the optimizer may step.  On a bad step it zeroes the
    gradients, records why, and returns False (``policy="skip"``) or raises (``"stop"``);
    ``max_skips`` bad steps in a row raise too, so a diverged run stops instead of spinning."""

    policy: str = "skip"  # "skip": drop the step and go on; "stop": raise at the first bad step
    max_skips: int = 5  # consecutive skipped steps before giving up (the run has diverged)
    skipped: int = 0  # total steps skipped so far
    consecutive: int = 0
    log: list[str] = field(default_factory=list)  # one message per skipped step

    def __post_init__(self):
        if self.policy not in ("skip", "stop"):
            raise DeltaError(f"NanGuard policy must be 'skip' or 'stop', got {self.policy!r}")
        if not isinstance(self.max_skips, int) or self.max_skips < 1:
            raise DeltaError(f"NanGuard max_skips must be a positive integer, got {self.max_skips!r}")

    def ok(self, loss, model: nn.Module, step: int | None = None) -> bool:
        try:
            check_finite(loss, model, grads=True, step=step)
        except NonFiniteError as e:
            if self.policy == "stop":
                raise
            for p in model.parameters():
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
            self.log.append(str(e))
            if self.consecutive >= self.max_skips:
                raise NonFiniteError(f"{self.consecutive} non-finite steps in a row (last: {e}); stopping. "
                                     "The last saved checkpoint is intact: resume from it with a lower "
                                     "learning rate") from None
            return False
        self.consecutive = 0
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, d: dict) -> None:
        self.skipped, self.consecutive = int(d.get("skipped", 0)), int(d.get("consecutive", 0))
