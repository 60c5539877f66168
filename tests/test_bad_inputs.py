"""The bad-input catalogue (``bad_input_cases.CASES``: configs, adapter dirs, data files, CLI
args, HTTP bodies), one test per case: a clear error and nothing changed on disk or in the model.
``scripts/bad_input_report.py`` prints the same catalogue as a table.  Property-based tests
(hypothesis) close the file: config parsing, data parsing, random corruption of a saved adapter.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import deltatune as dt
from bad_input_cases import CASES, C, M, W, run_case
from conftest import tiny_mlp


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path):
    run_case(CASES[name], tmp_path / "ws")


def test_catalogue_size():
    from collections import Counter

    areas = Counter(c.area for c in CASES.values())
    assert len(CASES) >= 40 and {"config", "adapter-dir", "data", "cli", "http"} <= set(areas), areas


def test_malicious_pickle_did_not_run(tmp_path):
    run_case(CASES["malicious_pickle_bin"], tmp_path)
    assert not (Path.cwd() / "pwned").exists() and not (tmp_path / "pwned").exists()


def test_huge_row_is_truncated_not_fatal(tmp_path):
    """A 4 MB text cell is not an error: it loads, and encoding truncates it to max_length."""
    from deltatune.data.examples import encode, load_classify

    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "word " * 800_000 + ",1\nshort,0\n")
    ex = load_classify(p)
    assert len(ex) == 2 and len(ex.rows[0]) == 4_000_000

    class Tok:  # a whitespace tokenizer is enough to check truncation
        def __call__(self, rows, truncation=True, max_length=128):
            return {"input_ids": [[1] * min(len(r.split()), max_length) for r in rows]}

    feats = encode(ex, Tok(), max_length=64)
    assert [len(f["input_ids"]) for f in feats] == [64, 1]


# --------------------------------------------------------------------------- properties

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2))
LORA_VALUES = {"r": st.one_of(st.integers(-3, 64), JUNK), "alpha": st.one_of(st.floats(-5, 100), JUNK),
               "dropout": st.one_of(st.floats(-1, 2), JUNK), "rslora": st.booleans(), "dora": st.booleans(),
               "init": st.one_of(st.sampled_from(["default", "gaussian", "pissa", "svd"]), JUNK),
               "rank_pattern": st.one_of(st.dictionaries(st.sampled_from(["fc1", "fc2", "(", "fc.*"]),
                                                         st.integers(-2, 16), max_size=2), JUNK),
               "alpha_pattern": st.one_of(st.dictionaries(st.sampled_from(["fc1", "fc2"]), st.floats(-2, 32),
                                                          max_size=2), JUNK),
               "targets": st.one_of(st.sampled_from([["fc1"], ["fc1", "fc2"], "fc.", "all-linear", "fc[", ["x"]]),
                                    JUNK)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(LORA_VALUES) + ["alpah", "method"]), st.just(None), max_size=5)
       .flatmap(lambda d: st.fixed_dictionaries({k: LORA_VALUES.get(k, JUNK) for k in d})))
def test_property_lora_config(opts):
    """make_config / from_dict on arbitrary option values: a valid config that round-trips through
    to_dict/from_dict, or a DeltaError - never another exception."""
    opts = {k: v for k, v in opts.items() if k != "method"}
    try:
        cfg = dt.make_config("lora", **opts)
    except dt.DeltaError:
        if "alpah" not in opts:  # from_dict (files) must refuse the same values (it only warns on unknown keys)
            with pytest.raises(dt.DeltaError):
                dt.LoraConfig.from_dict(opts)
        return
    # a file without conv_budget predates the conv rank cap: from_dict turns the cap off for it
    legacy = {} if "conv_budget" in opts else {"conv_budget": 0.0}
    assert dt.LoraConfig.from_dict(opts) == dataclasses.replace(cfg, **legacy)
    assert dt.LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert isinstance(cfg.r, int) and cfg.r >= 1 and 0 <= cfg.dropout < 1 and cfg.alpha > 0
    try:  # attaching either works or explains itself
        m = dt.attach(tiny_mlp(), cfg)
    except dt.DeltaError:
        return
    assert dt.adapter_tensors(m, "default")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.text(max_size=20), st.one_of(st.integers(-2, 3), st.text(max_size=3),
                                                          st.floats(allow_nan=True), st.none())),
                min_size=0, max_size=8),
       st.sampled_from(["csv", "jsonl"]))
def test_property_data_parser(tmp_path_factory, rows, fmt):
    """Any table of (text, label) rows: Examples with one entry per row and labels in range, or a
    DeltaError naming the file - never another exception."""
    import csv
    import io

    from deltatune.data.examples import load_classify

    p = tmp_path_factory.mktemp("data") / f"d.{fmt}"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["text", "label"])
        w.writerows(rows)
        p.write_text(buf.getvalue(), encoding="utf-8")
    else:
        p.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    try:
        ex = load_classify(p)
    except dt.DeltaError as e:
        assert str(p) in str(e), f"message does not name the file: {e}"
        return
    assert 2 <= len(ex.label_names) and all(0 <= y < len(ex.label_names) for y in ex.labels)
    assert len(ex) <= len(rows)


_GOOD: dict[str, bytes] = {}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([W, C, M]), st.data())
def test_property_corruption_never_loads_silently(tmp_path_factory, fname, data):
    """Damage one file of a saved adapter at a random place (bit flip, truncation, garbage): the
    load fails with a DeltaError naming a file, or - when nothing changed (bytes, or the JSON
    value of the manifest) - loads identically."""
    if not _GOOD:
        m = dt.attach(tiny_mlp(), "lora", targets=["fc1", "fc2"])
        d = dt.save(m, tmp_path_factory.mktemp("good") / "a")
        _GOOD.update({f.name: f.read_bytes() for f in d.iterdir()})
        _GOOD["_tensors"] = {k: v.clone() for k, v in dt.adapter_tensors(m, "default").items()}
    d = tmp_path_factory.mktemp("bad") / "a"
    d.mkdir()
    for n, b in _GOOD.items():
        if n != "_tensors":
            (d / n).write_bytes(b)
    blob = bytearray(_GOOD[fname])
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    i = data.draw(st.integers(0, len(blob) - 1))
    if kind == "flip":
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        blob = blob[:i]
    else:
        blob[i:i + 8] = data.draw(st.binary(min_size=1, max_size=8))
    (d / fname).write_bytes(bytes(blob))
    try:
        m = dt.load(tiny_mlp(), d)
    except dt.DeltaError as e:
        assert any(n in str(e) for n in (W, C, M)), str(e)
        return
    if bytes(blob) != _GOOD[fname]:  # only a change that leaves the same JSON (whitespace) may load
        assert fname != W and json.loads(bytes(blob)) == json.loads(_GOOD[fname]), \
            f"{fname} was changed ({kind} at {i}) but loaded without error"
    got = dt.adapter_tensors(m, "default")
    assert all(torch.equal(got[k], v) for k, v in _GOOD["_tensors"].items())
