"""bench/quant_budget.py's search, parameter count and watchdog, on fake probes and a tiny child
process (the real probes train 0.2-5B models and are not run here)."""
from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import quant_budget as qb  # noqa: E402


def test_param_formula_matches_transformers_and_the_family_grows():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fam = qb.family()
    for s in (fam[0], fam[9], fam[-1]):
        with torch.device("meta"):
            m = LlamaForCausalLM(LlamaConfig(vocab_size=qb.VOCAB, **s))
        assert sum(p.numel() for p in m.parameters()) == qb.n_params(s)
    sizes = [qb.n_params(s) for s in fam]
    assert sizes == sorted(set(sizes)) and sizes[0] < 0.3e9 and sizes[-1] > 6e9


@pytest.mark.parametrize("text,mib", [("4GiB", 4096), ("3500MiB", 3500), ("1.5G", 1536), ("2gib", 2048)])
def test_parse_size(text, mib):
    assert qb.parse_size(text) == mib


def test_parse_size_refuses_in_one_line():
    with pytest.raises(SystemExit, match="give a size like 4GiB"):
        qb.parse_size("4 bananas")


def fake_probe(curve, calls):
    """A probe whose peak is ``curve(params in B)`` MiB; records which members were measured."""
    def probe(arm, idx, budget, threads, log):
        calls.append(idx)
        p = qb.n_params(qb.family()[idx])
        peak = curve(p / 1e9)
        return {"arm": arm, "idx": idx, "params": p, "whole_peak": peak, "fits": peak <= budget,
                "shape": qb.family()[idx]}
    return probe


@pytest.mark.parametrize("curve,expect_walk", [
    (lambda b: 600 + 700 * b, "none"),  # linear: the fit is exact
    (lambda b: 600 + 700 * b + (400 if b > 1.0 else 0), "down"),  # a jump above 1B: the fit is optimistic
    (lambda b: 600 + 700 * b - (300 if b > 1.0 else 0), "up"),  # cheaper above 1B: pessimistic
])
def test_search_finds_the_largest_member_that_fits_and_shows_the_next_fails(monkeypatch, curve, expect_walk):
    calls: list[int] = []
    monkeypatch.setattr(qb, "probe", fake_probe(curve, calls))
    monkeypatch.setitem(qb.FIT, "nf4", (1, 6))
    budget = 2048
    r = qb.search("nf4", budget, 1, print)
    fam = qb.family()
    truth = max(i for i, s in enumerate(fam) if curve(qb.n_params(s) / 1e9) <= budget)
    assert r["largest_idx"] == truth and r["largest"]["fits"]
    assert r["above"]["idx"] == truth + 1 and not r["above"]["fits"]
    walked = "none" if r["predicted_idx"] == truth else ("down" if r["predicted_idx"] > truth else "up")
    assert walked == expect_walk
    assert len(calls) == len(set(calls))  # every member probed at most once


def test_search_reports_when_nothing_fits(monkeypatch):
    monkeypatch.setattr(qb, "probe", fake_probe(lambda b: 5000 + b, []))
    r = qb.search("fp32", 1024, 1, print)
    assert r["error"] == "no family member fits"


def child(tmp_path, body: str) -> types.SimpleNamespace:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return types.SimpleNamespace(__file__=str(script))


def test_watchdog_kills_a_probe_whose_anonymous_memory_passes_the_budget(monkeypatch, tmp_path):
    monkeypatch.setattr(qb, "quant", child(tmp_path, """
        import time
        blocks = [bytearray(b"x" * (64 << 20)) for _ in range(6)]  # 384 MiB of touched anonymous pages
        time.sleep(30)
    """))
    r = qb.run_guarded({"arm": "nf4"}, budget_mib=200, threads=1)
    assert r["killed"] and r["anon_at_kill"] > 200 and r["seconds"] < 20


def test_a_probe_within_the_budget_reports_the_whole_process(monkeypatch, tmp_path):
    monkeypatch.setattr(qb, "quant", child(tmp_path, """
        import json
        print(json.dumps({"phases": [{"anon_mib": 5.0}], "peak_anon": 40.0,
                          "rss": {"RssAnon": 10 * 1024, "RssFile": 30 * 1024}}))
    """))
    r = qb.run_guarded({"arm": "fp32"}, budget_mib=200, threads=1)
    # absolute anonymous at the import baseline = 10 - 5; peak = that + 40; + 30 MiB of file pages
    assert r["anon_peak_abs"] == 45.0 and r["file_end_abs"] == 30.0 and r["whole_peak"] == 75.0


def test_render_reports_largest_per_arm_and_the_ratio(monkeypatch):
    calls: list[int] = []
    arms = {}
    for arm, per_b in (("fp32", 4000), ("nf4", 700)):
        monkeypatch.setattr(qb, "probe", fake_probe(lambda b, k=per_b: 600 + k * b, calls))
        arms[arm] = qb.search(arm, 2048, 1, print)
        for r in arms[arm]["probes"]:
            r.update(anon_peak_abs=r["whole_peak"] - 300, file_end_abs=300, seconds=1)
    meta = {"date": "d", "cpu": "c", "load_start": 1, "load_end": 2, "seconds": 60, "command": "bench/quant_budget.py"}
    text = "\n".join(qb.render({"meta": meta, "budget_mib": 2048, "arms": arms}))
    ratio = arms["nf4"]["largest"]["params"] / arms["fp32"]["largest"]["params"]
    assert f"**{ratio:.2f}×**" in text and ratio > 4
    for arm in arms.values():
        assert f"{arm['largest']['params'] / 1e9:.2f}B (hidden" in text and "over the budget" in text
