"""Saving and loading adapters: one small directory per adapter.

    DIR/adapter_model.safetensors   weights, keys in peft's layout (base_model.model.<path>.<key>)
    DIR/adapter_config.json         peft's config keys for methods peft has (so peft loads it)
    DIR/deltatune.json              our full config + a manifest (sha256 and size of each file)

The three files are written into a hidden sibling directory, fsynced, and swapped in with one
atomic rename (``files.atomic_dir``), so a crash or a concurrent reader sees the previous adapter
or the new one, never a mix; the manifest's checksums catch later corruption.  Loading verifies the manifest, refuses pickles (safetensors, or
``torch.load(weights_only=True)`` for peft's legacy ``adapter_model.bin``), and reports every
missing, unexpected or mis-shaped tensor by name.

Adapter directories come from other people, so reading one is bounded (``_read_file``): only
regular files are opened (a FIFO would block forever, ``/dev/zero`` never ends), a symlink must stay
inside the directory, JSON files are capped in size and nesting depth, the safetensors header is
checked against the file's size before the data is read, and the config's sizes (ranks, token
counts) are checked against the saved tensors before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import model_card
from ..core import model_state
from ..core.delta import DeltaError, get_state
from ..core.method import METHODS, method_of
from ..core.dtypes import module_dtype
from .. import files  # files.atomic_dir / recover_dir looked up at call time (tests patch them)
from ..files import json_default
from .._version import __version__
from ..api import _remove, activate, attach
from ..core.adapters import adapter_tensors
from ..safety import describe, first_nonfinite

WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
CONFIG = "adapter_config.json"
MANIFEST = "deltatune.json"
FORMAT_VERSION = 1
MAX_JSON_BYTES = 4 << 20  # configs and manifests are KBs; peft's largest (per-module rank patterns) far below
MAX_JSON_DEPTH = 32  # ours nest 3 deep; deeper is damage (or an attempt to exhaust the parser's stack)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
MAX_SIZE = 1 << 20  # no rank or token count of a real adapter comes near this


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- save

def _pick_name(model: nn.Module, name: str | None) -> str:
    st = get_state(model)
    if name is not None:
        if name not in st.adapters:
            raise DeltaError(f"no adapter named {name!r} to save; attached: {sorted(st.adapters)}")
        return name
    if len(st.active) == 1:
        return st.active[0]
    if len(st.adapters) == 1:
        return next(iter(st.adapters))
    raise DeltaError(f"several adapters attached ({sorted(st.adapters)}): pass name=... to choose one")


def adapter_payload(model: nn.Module, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors with file keys, peft-style config, our config) for adapter ``name``."""
    name = _pick_name(model, name)
    rec = get_state(model).adapters[name]
    m = method_of(rec.method)
    tensors = {k: v.detach() for k, v in adapter_tensors(model, name).items()}
    tensors, cfg = m.export(model, name, tensors, rec.config)
    sd = {m.file_key(k): v.contiguous().cpu().clone() for k, v in tensors.items()}
    peft_cfg = m.to_peft(cfg, model, name)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if base_name and os.path.exists(base_name):  # a relative local path means nothing elsewhere
        base_name = os.path.abspath(base_name)
    if peft_cfg is None:
        peft_cfg = {"peft_type": f"DELTATUNE_{m.name.upper()}", **cfg.to_dict()}
    peft_cfg.setdefault("base_model_name_or_path", base_name)
    ours = {
        "format_version": FORMAT_VERSION,
        "deltatune_version": __version__,
        "method": m.name,
        "name": name,
        "config": cfg.to_dict(),
        "base_model": {"class": type(model).__name__, "name_or_path": base_name,
                       # None for a float base; eval warns when an adapter meets the other kind
                       "quantization": quantization_record(model)},
        # what the tensors are and what they ran on (safetensors keeps each tensor's dtype; the
        # config's autocast_adapter_dtype reproduces the choice when loading)
        "dtypes": {"base": _dtype_name(module_dtype(model)),
                   "adapter": sorted({_dtype_name(v.dtype) for v in sd.values() if v.is_floating_point()})},
    }
    return sd, peft_cfg, ours


def quantization_record(model: nn.Module) -> dict | None:
    """The base's quantization as the manifest records it ({"scheme", "block_size",
    "double_quant", "calibrated"}: JSON values only), or None for a float base."""
    info = model_state.get(model, model_state.QUANT)
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))} if info else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) to ``directory`` atomically."""
    from safetensors.torch import save as st_save

    sd, peft_cfg, ours = adapter_payload(model, name)
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise DeltaError(f"cannot save adapter to {d}: it is a file, not a directory")
    weights = st_save(sd, metadata={"format": "pt"})
    cfg_bytes = (json.dumps(peft_cfg, indent=2, sort_keys=True, default=json_default) + "\n").encode()
    ours["files"] = {WEIGHTS: {"sha256": sha256(weights), "bytes": len(weights)},
                     CONFIG: {"sha256": sha256(cfg_bytes), "bytes": len(cfg_bytes)}}
    # the three files are built in a sibling temp dir and swapped in with one rename, so a reader
    # (or a crash) sees the previous adapter or this one, never a mix; other files in d are kept
    ours["manifest_sha256"] = _manifest_digest(ours)  # the manifest vouches for itself too
    card = _minimal_card(model, sd, ours) if model_card.may_write(d) else None
    with files.atomic_dir(d, carry_over=True) as tmp:
        (tmp / WEIGHTS).write_bytes(weights)
        (tmp / CONFIG).write_bytes(cfg_bytes)
        (tmp / MANIFEST).write_text(json.dumps(ours, indent=2, sort_keys=True, default=json_default) + "\n")
        if card is not None:  # README.md is not in the manifest: the CLI rewrites it with the run
            (tmp / model_card.README).write_text(card, encoding="utf-8")
    return d


def _minimal_card(model: nn.Module, sd: dict, ours: dict) -> str:
    """What the model and adapter alone tell (``deltatune train`` adds data, command and metrics)."""
    total = sum(p.numel() for p in model.parameters())
    return model_card.card(base_model=ours["base_model"]["name_or_path"], method=ours["method"],
                           method_config=ours["config"], trainable=sum(v.numel() for v in sd.values()), total=total)


def _manifest_digest(ours: dict) -> str:
    body = {k: v for k, v in ours.items() if k != "manifest_sha256"}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=json_default).encode())


# --------------------------------------------------------------------------- load

def _read_file(path: Path, limit: int | None = None, header=None, too_big: str | None = None) -> bytes:
    """The bytes of ``path``, a regular file in its adapter directory, of at most ``limit`` bytes.

    Opened with O_NONBLOCK so a FIFO cannot block the open, then ``fstat`` on the open descriptor
    (no race with a swap) must say "regular file".  ``header(first_bytes, size)`` may refuse the
    file from its first bytes before the rest is read."""
    d = path.parent.resolve()
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a dangling link or a link loop
        raise DeltaError(f"{path}: missing or a broken symlink") from None
    inside = [d]
    if d.parent.name == "snapshots":  # the Hugging Face cache: snapshots/<rev>/file -> ../../blobs/<hash>
        inside.append(d.parent.parent / "blobs")
    if not any(real.parent == root or root in real.parents for root in inside):  # never read, nor report on, it
        raise DeltaError(f"{path}: a symlink pointing outside the adapter directory; refusing it "
                         "(copy the file into the directory instead)")
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DeltaError(f"{path}: not a regular file (a FIFO, device or socket); adapter files must be "
                             "plain files")
        if limit is not None and st.st_size > limit:
            raise DeltaError(f"{path}: " + (too_big or f"larger than expected (at most {limit} bytes); the file "
                                                        "is corrupted or was replaced, or it is not an adapter file"))
        if header is not None:
            first = f.read(8)
            header(f, first, st.st_size)
            f.seek(0)
        data = f.read(st.st_size + 1)
    if len(data) != st.st_size:
        raise DeltaError(f"{path}: changed size while being read; retry once the writer has finished")
    return data


def _depth(obj) -> int:
    """Nesting depth of a parsed JSON value, iteratively (stops counting past MAX_JSON_DEPTH)."""
    todo, deepest = [(obj, 1)], 0
    while todo and deepest <= MAX_JSON_DEPTH:
        o, k = todo.pop()
        deepest = max(deepest, k)
        if isinstance(o, (dict, list)):
            todo.extend((v, k + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _parse_json(data: bytes, path: Path):
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError as e:  # not UTF-8, not JSON, or an integer of more than 4300 digits
        why = e if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)) else "a number with thousands of digits"
        raise DeltaError(f"{path}: not valid JSON ({why}); the file is corrupted or not an adapter config") from None
    except RecursionError:  # nested past the parser's stack
        obj = deep = None
    else:
        deep = _depth(obj) <= MAX_JSON_DEPTH or None
    if deep is None:
        raise DeltaError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; the file is corrupted or "
                         "not an adapter config")
    return obj


def _read_json(path: Path):
    return _parse_json(_read_file(path, MAX_JSON_BYTES), path)


def _safetensors_header(path: Path):
    """A ``header`` check for ``_read_file``: the 8-byte header length and the header's data offsets
    must agree with the file size, before the (maybe huge) data is read."""
    def check(f, first: bytes, size: int) -> None:
        n = int.from_bytes(first, "little") if len(first) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise DeltaError(f"{path}: unreadable safetensors file (bad header length); it is truncated or "
                             "corrupted")
        meta = _parse_json(f.read(n), path)
        try:
            ends = [v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"]
        except (AttributeError, LookupError, TypeError):
            ends = None
        if ends is None or not all(isinstance(e, int) for e in ends) or max(ends, default=0) != size - 8 - n:
            raise DeltaError(f"{path}: unreadable safetensors file (its header does not match its size); it is "
                             "truncated or corrupted")
    return check


def check_sizes(cfg, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse config sizes (``size_fields``: ranks, token counts) that no saved tensor has as a
    dimension, before ``attach`` allocates them: ``r=3e6`` in an 8 KB config is damage, not a rank."""
    bound = max((max(t.shape, default=1) for t in tensors.values()), default=0)
    for name in type(cfg).size_fields:
        value = getattr(cfg, name, None)
        for key, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            if v is None:
                continue
            label = name if key is None else f"{name}[{key!r}]"
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DeltaError(f"{where}: {label} must be a positive integer, got {v!r}")
            if v > min(bound, MAX_SIZE):
                raise DeltaError(f"{where}: {label}={v} is larger than any dimension of the saved tensors "
                                 f"({bound}); the config is corrupted or belongs to other weights")


def read_adapter_dir(directory: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], str, Any, str | None]:
    """(tensors without prefix, method name, config object, saved adapter name).

    A save replaces the whole directory (``files.atomic_dir``), so a reader racing a writer can get
    the manifest of one save and the weights of the next: the checksum then fails.  Such a read is
    retried when the path names another directory than the one read; the one read is held open
    meanwhile, because a freed inode number is reused at once and would hide the swap."""
    for attempt in range(READ_RETRIES):
        held, ino = _hold_dir(directory)
        try:
            return _read_adapter_dir_once(directory, verify)
        except (DeltaError, OSError) as e:
            if not _swapped(directory, ino) or attempt == READ_RETRIES - 1:
                if isinstance(e, DeltaError):
                    raise
                raise DeltaError(f"{directory}: cannot read adapter ({e})") from None
        finally:
            if held is not None:
                os.close(held)
        time.sleep(0.001 * 2 ** attempt)  # let a writer saving in a loop finish its swap
    raise AssertionError("unreachable")


READ_RETRIES = 8


def _open_dir(directory) -> int:
    return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _hold_dir(directory) -> tuple[int | None, int | None]:
    """(open descriptor, inode number) of the directory before a read.  The open descriptor keeps the
    inode alive, so a swap cannot free it and hand its number to the new directory; where a directory
    cannot be opened (Windows) the number alone is compared, which still sees a swap whose new
    directory existed beside the old one (every save: write beside, then swap)."""
    try:
        fd = _open_dir(directory)
    except OSError:  # missing (reported by the read) or not openable as a directory (Windows)
        try:
            return None, os.stat(directory).st_ino
        except OSError:
            return None, None
    try:
        return fd, os.fstat(fd).st_ino
    except OSError:
        os.close(fd)
        return None, None


def _swapped(directory, ino: int | None) -> bool:
    try:
        return ino is not None and os.stat(directory).st_ino != ino
    except OSError:
        return False


def _read_adapter_dir_once(directory, verify):
    d = Path(directory)
    if not d.exists():
        files.recover_dir(d)  # a save killed between the two renames of the non-Linux fallback swap
    if d.exists() and not d.is_dir():
        raise DeltaError(f"{d} is a file, not an adapter directory (expected {CONFIG} and {WEIGHTS} inside)")
    if not d.is_dir():
        raise DeltaError(f"adapter directory {d} does not exist (expected {CONFIG} and {WEIGHTS} inside)")
    ours = _read_json(d / MANIFEST) if (d / MANIFEST).exists() else None
    if ours is not None and (not isinstance(ours, dict) or not isinstance(ours.get("files", {}), dict)):
        raise DeltaError(f"{d / MANIFEST}: not a deltatune manifest (expected a JSON object with 'files'); "
                         "delete it to load the directory as a plain peft adapter")
    if ours is not None:
        ver = ours.get("format_version", 0)
        if not isinstance(ver, int) or ver > FORMAT_VERSION:
            raise DeltaError(f"{d / MANIFEST}: format_version {ver} was written by a newer deltatune "
                             f"(this one reads <= {FORMAT_VERSION}); upgrade deltatune to load it")
        verified: dict[str, bytes] = {}
        if verify and ours.get("manifest_sha256") != _manifest_digest(ours):
            # every format-1 manifest carries its own checksum: a missing one is damage too
            raise DeltaError(f"{d / MANIFEST}: checksum mismatch or missing (its content was changed after "
                             "saving); the file is corrupted - re-save or restore the adapter")
        if verify:
            if WEIGHTS not in ours.get("files", {}) and LEGACY_WEIGHTS not in ours.get("files", {}):
                raise DeltaError(f"{d / MANIFEST}: lists no weights file, so {d} cannot be verified; "
                                 "re-save the adapter (or pass verify=False)")
            for fname, meta in ours.get("files", {}).items():
                if not isinstance(meta, dict) or "/" in fname or "\\" in fname or fname.startswith("."):
                    raise DeltaError(f"{d / MANIFEST}: bad entry for {fname!r}; the manifest is corrupted")
                p = d / fname
                if not p.exists():
                    raise DeltaError(f"{p}: listed in {MANIFEST} but missing; the save was interrupted "
                                     "or the directory was copied incompletely")
                size = meta.get("bytes")
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise DeltaError(f"{d / MANIFEST}: bad size for {fname!r}; the manifest is corrupted")
                fix = ("the file is truncated or corrupted, or was replaced after deltatune saved it - re-save or "
                       f"restore it (or delete {MANIFEST} to load it unverified)")
                # a bigger file than listed is refused before it is read
                data = _read_file(p, limit=size, too_big=f"checksum mismatch (more than the {size} bytes listed); {fix}")
                if len(data) != size or sha256(data) != meta.get("sha256"):
                    raise DeltaError(f"{p}: checksum mismatch ({len(data)} bytes, expected {size}); {fix}")
                verified[fname] = data  # parse exactly the bytes that were checked
        try:
            m = method_of(ours.get("method", ""))
            if not isinstance(ours.get("config", {}), dict):
                raise DeltaError("'config' is not a JSON object")
            cfg = m.config_cls.from_dict(ours.get("config", {}))
        except (DeltaError, TypeError, ValueError, ArithmeticError) as e:
            raise DeltaError(f"{d / MANIFEST}: {e}") from None
        saved_name = ours.get("name")
    else:
        if not (d / CONFIG).exists():
            raise DeltaError(f"{d}: no {CONFIG} or {MANIFEST}; this is not an adapter directory")
        verified = {}
        peft_cfg = _read_json(d / CONFIG)
        if not isinstance(peft_cfg, dict):
            raise DeltaError(f"{d / CONFIG}: expected a JSON object, got {type(peft_cfg).__name__}")
        ptype = peft_cfg.get("peft_type")
        cands = [m for m in METHODS.values() if m.peft_type and m.peft_type == ptype]
        if not cands:
            known = sorted(m.peft_type for m in METHODS.values() if m.peft_type)
            raise DeltaError(f"{d / CONFIG}: peft_type {ptype!r} is not supported; deltatune reads {known}")
        m = cands[0]
        try:
            cfg = m.from_peft(peft_cfg)
        except (DeltaError, TypeError, ValueError, ArithmeticError) as e:  # e.g. int(1e400) in from_peft
            hint = "" if isinstance(e, DeltaError) else " (a value of the wrong type or out of range: the config is corrupted)"
            raise DeltaError(f"{d / CONFIG}: {e}{hint}") from None
        saved_name = None
    tensors = _read_weights(d, verified.get(WEIGHTS))
    tensors = m.normalize_keys({m.from_file_key(k): v for k, v in tensors.items()})
    return tensors, m.name, cfg, saved_name


def _read_weights(d: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if (d / WEIGHTS).exists():
        if data is None:
            data = _read_file(d / WEIGHTS, header=_safetensors_header(d / WEIGHTS))
        try:
            return load(data)
        except (SafetensorError, ValueError) as e:
            raise DeltaError(f"{d / WEIGHTS}: unreadable safetensors file ({e}); it is truncated or corrupted")
    if (d / LEGACY_WEIGHTS).exists():
        buf = io.BytesIO(_read_file(d / LEGACY_WEIGHTS))
        try:  # peft's legacy format; weights_only refuses arbitrary pickled objects
            sd = torch.load(buf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DeltaError(f"{d / LEGACY_WEIGHTS}: refused or unreadable ({e}); only plain tensors are loaded")
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise DeltaError(f"{d / LEGACY_WEIGHTS}: not a flat {{name: tensor}} state dict; refusing it")
        return sd
    raise DeltaError(f"{d}: no {WEIGHTS} (nor {LEGACY_WEIGHTS}) inside")


def load(model: nn.Module, directory: str | os.PathLike, name: str | None = None, *,
         trainable: bool = False, verify: bool = True, autocast_adapter_dtype: bool | None = None) -> nn.Module:
    """Attach the adapter saved in ``directory`` (by deltatune or by peft) to ``model``.

    ``trainable=True`` keeps it trainable (resume training); otherwise its tensors are frozen.
    ``autocast_adapter_dtype`` overrides the saved choice (None: as saved; peft files: True).
    The new adapter is activated."""
    tensors, method, cfg, saved_name = read_adapter_dir(directory, verify=verify)
    if autocast_adapter_dtype is not None:
        cfg = dataclasses.replace(cfg, autocast_adapter_dtype=bool(autocast_adapter_dtype))
    bad = first_nonfinite(tensors)
    if bad is not None:  # a diverged run's checkpoint: refuse rather than load garbage silently
        raise DeltaError(f"{directory}: tensor {bad} has {describe(tensors[bad])}; this adapter was saved "
                         "from a diverged run - load an earlier checkpoint")
    check_sizes(cfg, tensors, str(directory))
    st = model_state.get(model, model_state.STATE)
    taken = set(st.adapters) if st else set()
    if name is None:
        name = next((n for n in ("default", saved_name) if n and n not in taken), None)
        if name is None:
            raise DeltaError(f"model already has adapters {sorted(taken)}; pass name=... to load {directory} under a new name")
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        attach(model, cfg, name=name)
    except DeltaError as e:  # attach left the model as it was; say which adapter did not fit
        raise DeltaError(f"adapter in {directory} cannot be attached to this {type(model).__name__} "
                         f"(was it trained on another base model?): {e}") from None
    expected = adapter_tensors(model, name)
    problems = []
    for k in sorted(set(expected) - set(tensors)):
        problems.append(f"missing {k} {tuple(expected[k].shape)}")
    for k in sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected {k} {tuple(tensors[k].shape)}")
    for k in sorted(set(expected) & set(tensors)):
        if tuple(expected[k].shape) != tuple(tensors[k].shape):
            problems.append(f"shape of {k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}")
        elif tensors[k].is_floating_point() != expected[k].is_floating_point():
            problems.append(f"dtype of {k}: file {tensors[k].dtype} vs model {expected[k].dtype}")
    if problems:  # undo the attach: the model is left as it was
        _remove(model, name)
        for p, g in grads:
            p.requires_grad_(g)
        if not get_state(model).adapters:
            model_state.pop(model, model_state.STATE)
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DeltaError(f"adapter in {directory} does not fit this {type(model).__name__} "
                         f"(was it trained on another base model?):\n  {shown}")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(tensors[k].to(dtype=t.dtype, device=t.device))
    get_state(model).adapters[name].trainable = trainable
    activate(model, [name])
    return model
