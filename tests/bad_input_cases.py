"""The bad-input catalogue (used by tests/test_bad_inputs.py and scripts/bad_input_report.py).

Every case must fail with a clear ``DeltaError`` (CLI: exit status 2, HTTP: a 4xx) whose message
names the problem, and must change NOTHING: no file in the workspace is created, modified or
deleted, and the model (weights, modules, requires_grad, adapters) is exactly as before.

Areas: config (attach / make_config / from_dict), adapter-dir (dt.load / dt.save), data (the
loaders of ``deltatune.data``), cli (``deltatune`` commands), http (``deltatune.serve``).
A case is ``build(workspace) -> (model or None, action)``; :func:`run_case` runs and checks it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import deltatune as dt
from conftest import tiny_llama, tiny_mlp

W, C, M = "adapter_model.safetensors", "adapter_config.json", "deltatune.json"


@dataclass
class Case:
    area: str
    expect: tuple[str, ...]  # substrings the message must contain
    build: Callable[[Path], tuple]  # workspace -> (model or None, action); action raises or returns (code, text)
    doc: str = ""


CASES: dict[str, Case] = {}


def case(area: str, *expect: str):
    def deco(fn):
        CASES[fn.__name__.removeprefix("c_")] = Case(area, expect, fn, (fn.__doc__ or "").strip())
        return fn
    return deco


# --------------------------------------------------------------------------- helpers

def model_with_adapter():
    """An MLP that already carries a trained-looking adapter 'first' (a failure must not touch it)."""
    m = dt.attach(tiny_mlp(), "lora", targets=["fc1"], name="first")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in dt.adapter_tensors(m, "first").values():
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return m


def good_adapter(ws: Path, name="good", model=None, **opts) -> Path:
    model = model or dt.attach(tiny_mlp(), "lora", targets=["fc1", "fc2"], **opts)
    return dt.save(model, ws / name)


def peft_style(ws: Path, name="peft", **opts) -> Path:
    d = good_adapter(ws, name, **opts)
    (d / M).unlink()
    return d


def model_snapshot(m) -> tuple:
    st = m.__dict__.get("_deltatune")
    return ({k: v.detach().clone() for k, v in m.state_dict().items()}, [n for n, _ in m.named_modules()],
            [p.requires_grad for p in m.parameters()],
            None if st is None else (sorted(st.adapters), list(st.active), st.disabled))


def same_model(a: tuple, b: tuple) -> bool:
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and a[1:] == b[1:])


def disk_snapshot(root: Path) -> dict[str, str]:
    out = {}
    for d, dirs, files in os.walk(root):
        for x in dirs:
            out[os.path.relpath(os.path.join(d, x), root) + "/"] = "dir"
        for f in files:
            p = os.path.join(d, f)
            if os.path.islink(p):  # never follow it (it may point at /dev/zero)
                out[os.path.relpath(p, root)] = "-> " + os.readlink(p)
            elif not os.path.isfile(p):  # a FIFO would block a read
                out[os.path.relpath(p, root)] = "special"
            else:
                out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def run_case(c: Case, ws: Path) -> str:
    """Run one case in workspace ``ws``; return its message. Raises AssertionError if the case
    does not fail cleanly, or if anything changed."""
    ws.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, action = c.build(ws)
    disk = disk_snapshot(ws)
    snap = model_snapshot(model) if model is not None else None
    try:
        result = action()
    except dt.DeltaError as e:
        msg, ok = str(e), True
    except Exception as e:  # noqa: BLE001 - any other exception is a bug in the library's messages
        raise AssertionError(f"{type(e).__name__} instead of a DeltaError: {e}") from e
    else:
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AssertionError(f"no error: the bad input was accepted (returned {result!r:.200})")
        code, msg = result
        msg = " ".join(re.sub(r"[│╭╮╰╯─]", " ", msg).split())  # rich's error panel wraps lines in a box
        ok = code == 2 if c.area == "cli" else 400 <= code < 500
        if not ok:
            raise AssertionError(f"{c.area} case returned status {code}: {msg[:300]}")
    for pat in c.expect:
        assert pat in msg, f"message lacks {pat!r}: {msg}"
    assert disk_snapshot(ws) == disk, "the failed call changed files on disk"
    if snap is not None:
        assert same_model(model_snapshot(model), snap), "the failed call changed the model"
    return msg


# --------------------------------------------------------------------------- config

def _attach(**kw):
    def build(ws):
        m = model_with_adapter()
        return m, lambda: dt.attach(m, **{"method": "lora", "targets": ["fc2"], "name": "second", **kw})
    return build


def _cfg(fn):
    return lambda ws: (None, fn)


for _id, _kw, _exp in [
    ("unknown_method", {"method": "lroa"}, ("unknown method 'lroa'", "Did you mean", "lora")),
    ("method_not_a_string", {"method": None}, ("method must be a name", "NoneType")),
    ("rank_zero", {"r": 0}, ("r must be a positive integer, got 0",)),
    ("rank_negative", {"r": -4}, ("r must be a positive integer, got -4",)),
    ("rank_fraction", {"r": 2.5}, ("r must be a positive integer, got 2.5",)),
    ("rank_string", {"r": "8"}, ("r must be a positive integer, got '8'",)),
    ("alpha_zero", {"alpha": 0}, ("alpha must be a positive number",)),
    ("alpha_nan", {"alpha": float("nan")}, ("alpha must be a positive number, got nan",)),
    ("dropout_negative", {"dropout": -0.1}, ("dropout must be in [0, 1), got -0.1",)),
    ("dropout_one_or_more", {"dropout": 1.5}, ("dropout must be in [0, 1), got 1.5",)),
    ("targets_match_nothing", {"targets": ["q_proj"]}, ("matched no module of MLP", "Adaptable module names")),
    ("targets_bad_regex", {"targets": "fc["}, ("'fc[' is not a valid regular expression",)),
    ("targets_wrong_type", {"targets": 42}, ("targets must be a list of module names or a regex string, got 42",)),
    ("exclude_removes_all", {"targets": ["fc2"], "exclude": ["fc2"]}, ("matched no module",)),
    ("unknown_option_typo", {"alpah": 4}, ("has no option 'alpah' (did you mean 'alpha'?)",)),
    ("duplicate_adapter_name", {"name": "first"}, ("already has an adapter named 'first'",)),
    ("name_with_path", {"name": "../evil"}, ("adapter name '../evil' is invalid",)),
    ("name_empty", {"name": ""}, ("adapter name '' is invalid",)),
    ("name_with_space", {"name": "a b"}, ("adapter name 'a b' is invalid",)),
    ("name_too_long", {"name": "n" * 65}, ("is invalid: use 1-64",)),
    ("init_unknown", {"init": "svd"}, ("init must be one of", "'svd'")),
    ("rank_pattern_zero", {"rank_pattern": {"fc2": 0}}, ("rank_pattern['fc2'] must be a positive integer",)),
    ("rank_pattern_not_dict", {"rank_pattern": [4]}, ("rank_pattern must be a dict",)),
    ("rank_pattern_bad_regex", {"rank_pattern": {"(": 2}}, ("rank_pattern key '(' is not a valid regex",)),
    ("alpha_pattern_negative", {"alpha_pattern": {"fc2": -1.0}}, ("alpha_pattern['fc2'] must be a positive",)),
    ("modules_to_save_nothing", {"modules_to_save": ["classifier"]}, ("'classifier'", "matched no module")),
]:
    CASES[_id] = Case("config", _exp, _attach(**_kw), f"dt.attach(model, {_kw})")


@case("config", "has no option 'bogus'")
def c_option_on_config_object(ws):
    """dt.make_config(LoraConfig(), bogus=1)"""
    return _cfg(lambda: dt.make_config(dt.LoraConfig(), bogus=1))(ws)


@case("config", "expected a dict of options, got list")
def c_from_dict_not_a_dict(ws):
    """LoraConfig.from_dict([1, 2])"""
    return None, lambda: dt.LoraConfig.from_dict([1, 2])


@case("config", "unknown option(s) ['zz']")
def c_from_dict_strict_unknown(ws):
    """LoraConfig.from_dict({'zz': 1}, strict=True)"""
    return None, lambda: dt.LoraConfig.from_dict({"zz": 1}, strict=True)


@case("config", "merged", "dt.unmerge")
def c_attach_to_merged_model(ws):
    """attach while adapters are merged (unload=False)"""
    m = model_with_adapter()
    dt.merge(m, unload=False)
    return m, lambda: dt.attach(m, "lora", targets=["fc2"], name="second")


@case("config", "unknown adapter(s) ['nope']")
def c_activate_unknown(ws):
    """dt.activate(model, 'nope')"""
    m = model_with_adapter()
    return m, lambda: dt.activate(m, "nope")


@case("config", "no adapter named 'nope' to delete")
def c_delete_unknown(ws):
    """dt.delete(model, 'nope')"""
    m = model_with_adapter()
    return m, lambda: dt.delete(m, "nope")


# --------------------------------------------------------------------------- adapter directories

def _load(make_dir, model=None, **kw):
    def build(ws):
        d = make_dir(ws)
        m = model() if model else model_with_adapter()
        return m, lambda: dt.load(m, d, **{"name": "second", **kw})
    return build


def _write(rel: str, content: bytes, base=good_adapter):
    def make(ws):
        d = base(ws)
        (d / rel).write_bytes(content)
        return d
    return make


def _edit_json(rel: str, fn, base=good_adapter):
    def make(ws):
        d = base(ws)
        obj = json.loads((d / rel).read_text())
        fn(obj)
        (d / rel).write_text(json.dumps(obj))
        return d
    return make


def _remove(rel: str, base=good_adapter):
    def make(ws):
        d = base(ws)
        (d / rel).unlink()
        return d
    return make


def _file(ws):
    (ws / "adapter.txt").write_text("not a directory")
    return ws / "adapter.txt"


def _empty(ws):
    (ws / "empty").mkdir()
    return ws / "empty"


def _llama_adapter(ws):
    return dt.save(dt.attach(tiny_llama(), "lora", targets=["q_proj", "v_proj"]), ws / "llama")


def _other_rank(ws):
    d = peft_style(ws, "peft", r=8)
    other = good_adapter(ws, "r4", r=4)
    (d / W).write_bytes((other / W).read_bytes())
    return d


def _extra_key(ws):
    from safetensors.torch import load_file, save_file

    d = peft_style(ws)
    sd = load_file(d / W)
    sd["base_model.model.emb.lora_A.weight"] = torch.zeros(8, 20)
    save_file(sd, d / W)
    return d


def _truncate(ws):
    d = good_adapter(ws)
    (d / W).write_bytes((d / W).read_bytes()[:100])
    return d


def _bit_flip(ws):
    d = good_adapter(ws)
    b = bytearray((d / W).read_bytes())
    b[-3] ^= 1
    (d / W).write_bytes(bytes(b))
    return d


def _nan(ws):
    m = dt.attach(tiny_mlp(), "lora", targets=["fc1", "fc2"])
    with torch.no_grad():
        m.fc1.deltas["default"].lora_A.weight[0, 0] = float("inf")
    return dt.save(m, ws / "nan")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _pickle_bin(ws):
    d = peft_style(ws)
    (d / W).unlink()
    torch.save({"base_model.model.fc1.lora_A.weight": torch.zeros(8, 16), "x": _Evil()}, d / "adapter_model.bin")
    return d


def _special(kind: str, base=peft_style):
    """Weights replaced by a FIFO (a read would block forever), or by a symlink to /dev/zero (endless)
    or to a file outside the adapter directory."""
    def make(ws):
        d = base(ws)
        w = d / W
        if kind == "outside":
            w.rename(ws / "elsewhere.safetensors")
        else:
            w.unlink()
        {"fifo": lambda: os.mkfifo(w), "zero": lambda: w.symlink_to("/dev/zero"),
         "outside": lambda: w.symlink_to(ws / "elsewhere.safetensors")}[kind]()
        return d
    return make


def _header(length: int, cut: int = 0):
    """A peft adapter whose safetensors header length is ``length`` (or whose data is ``cut`` short)."""
    def make(ws):
        d = peft_style(ws)
        b = (d / W).read_bytes()
        (d / W).write_bytes((length.to_bytes(8, "little") + b[8:] if length else b)[:len(b) - cut])
        return d
    return make


for _id, _make, _exp, _kw in [
    ("weights_fifo", _special("fifo"), (W, "not a regular file"), {}),
    ("weights_fifo_verified", _special("fifo", good_adapter), (W, "not a regular file"), {}),
    ("weights_symlink_dev_zero", _special("zero"), (W, "symlink pointing outside the adapter directory"), {}),
    ("weights_symlink_outside", _special("outside"), (W, "symlink pointing outside the adapter directory"), {}),
    ("weights_header_length_huge", _header(10**12), (W, "bad header length"), {}),
    ("weights_header_vs_size", _header(0, cut=4), (W, "header does not match its size"), {}),
    ("config_rank_huge", _edit_json(C, lambda o: o.update(r=3_000_000), peft_style),
     ("r=3000000 is larger than any dimension of the saved tensors (32)",), {}),
    ("config_rank_1e9_float", _edit_json(C, lambda o: o.update(r=1e9), peft_style), ("r=1000000000 is larger",), {}),
    ("config_rank_1e30", _edit_json(C, lambda o: o.update(r=1e30), peft_style), ("is larger than any dimension",), {}),
    ("config_rank_infinite", _edit_json(C, lambda o: o.update(r=float("inf")), peft_style),
     (C, "infinity", "the config is corrupted"), {}),
    ("config_rank_pattern_huge", _edit_json(C, lambda o: o.update(rank_pattern={"fc1": 10**7}), peft_style),
     ("rank_pattern['fc1']=10000000 is larger",), {}),
    ("config_deeply_nested", _write(C, b"[" * 100_000 + b"]" * 100_000, peft_style), (C, "nested deeper than 32"), {}),
    ("config_integer_5000_digits", _write(C, b'{"r": ' + b"9" * 5000 + b"}", peft_style), (C, "not valid JSON"), {}),
    ("config_too_large", _write(C, b" " * (5 << 20) + b"{}", peft_style), (C, "larger than expected"), {}),
    ("manifest_deeply_nested", _write(M, b'{"a": ' * 50 + b"1" + b"}" * 50), (M, "nested deeper than 32"), {}),
    ("path_is_a_file", _file, ("adapter.txt is a file, not an adapter directory",), {}),
    ("path_missing", lambda ws: ws / "nope", ("adapter directory", "nope does not exist"), {}),
    ("dir_empty", _empty, ("no adapter_config.json or deltatune.json", "not an adapter directory"), {}),
    ("weights_missing_peft", _remove(W, peft_style), ("no adapter_model.safetensors",), {}),
    ("weights_missing_manifest", _remove(W), (W, "listed in deltatune.json but missing"), {}),
    ("config_not_json", _write(C, b"{'r': 8,", peft_style), (C, "not valid JSON"), {}),
    ("config_not_object", _write(C, b"[1, 2]", peft_style), (C, "expected a JSON object"), {}),
    ("config_bad_value", _edit_json(C, lambda o: o.update(r=0), peft_style), (C, "r must be a positive integer"), {}),
    ("config_not_utf8", _write(C, b"\xff\xfe{}", peft_style), (C, "not valid JSON"), {}),
    ("manifest_not_json", _write(M, b"\x00\x01garbage"), (M, "not valid JSON"), {}),
    ("future_format_version", _edit_json(M, lambda o: o.update(format_version=7)), (M, "format_version 7", "newer"), {}),
    ("unknown_peft_type", _edit_json(C, lambda o: o.update(peft_type="FOO"), peft_style), ("peft_type 'FOO' is not supported",), {}),
    ("wrong_base_model", _llama_adapter, ("llama", "cannot be attached to this MLP", "q_proj"), {}),
    ("wrong_shapes", _other_rank, ("does not fit", "shape of fc1.lora_A.weight: file (4, 16) vs model (8, 16)"), {}),
    ("unknown_keys", _extra_key, ("unexpected emb.lora_A.weight (8, 20)",), {}),
    ("truncated_weights", _truncate, (W, "checksum mismatch", "truncated"), {}),
    ("bit_flip", _bit_flip, (W, "checksum mismatch"), {}),
    ("weights_nan_inf", _nan, ("fc1.lora_A.weight has 0 NaN and 1 Inf", "diverged"), {}),
    ("malicious_pickle_bin", _pickle_bin, ("adapter_model.bin", "refused"), {}),
    ("load_invalid_name", good_adapter, ("adapter name '../x' is invalid",), {"name": "../x"}),
    ("load_taken_name", good_adapter, ("already has an adapter named 'first'",), {"name": "first"}),
]:
    CASES[_id] = Case("adapter-dir", _exp, _load(_make, **_kw), f"dt.load(model, <{_id}>)")


@case("adapter-dir", "is a file")
def c_save_onto_a_file(ws):
    """dt.save(model, path_of_a_file)"""
    m = model_with_adapter()
    (ws / "f").write_text("user data")
    return m, lambda: dt.save(m, ws / "f")


@case("adapter-dir", "no adapter named 'nope' to save")
def c_save_unknown_adapter(ws):
    """dt.save(model, dir, name='nope')"""
    m = model_with_adapter()
    return m, lambda: dt.save(m, ws / "out", name="nope")


@case("adapter-dir", "carries no deltatune adapter")
def c_save_without_adapter(ws):
    """dt.save(bare_model, dir)"""
    m = tiny_mlp()
    return m, lambda: dt.save(m, ws / "out")


# data files, CLI arguments and HTTP bodies live in their own file (registers into CASES)
import bad_input_cases_io  # noqa: E402,F401
