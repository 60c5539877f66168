"""bench/quality.py's aggregation, table and plot on fake rows (the training runs are not tested here)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
from quality_tasks import TASKS  # noqa: E402


def row(task, method, value, forgetting, pct, *, metric="accuracy", greater=True, kind="representation_drift"):
    return {"task": task, "method": method, "metric": metric, "greater": greater, "value": value, "before": 0.5,
            "forgetting": forgetting, "forgetting_kind": kind, "trainable_percent": pct, "trainable": 1,
            "lr": 1e-3, "steps": 40, "train_rows": 100, "val_rows": 10, "train_s": 12.0, "wall_s": 30.0,
            "date": "2026-12-02T05:00:00+00:00"}


def lm(method, ppl, change, pct):
    return row("dialogue", method, ppl, change, pct, metric="perplexity", greater=False, kind="perplexity_change")


ROWS = [
    row("sms", "full", 0.95, 0.60, 100.0),
    row("sms", "lora", 0.97, 0.30, 1.5),
    row("sms", "ia3", 0.90, 0.10, 0.1),
    row("sms", "adapter", 0.99, 0.20, 3.0),  # above the 2 % limit: not a PEFT candidate
    lm("full", 20.0, 15.0, 100.0),
    lm("lora", 21.0, 20.0, 0.5),
    lm("prompt", 25.0, 0.0, 0.01),
    {"task": "dialogue", "method": "sparse", "error": "DeltaError: boom", "wall_s": 3.0},
]


def test_summary_picks_best_peft_under_the_limit_and_checks_both_targets():
    s = quality.summarize(ROWS)
    assert s["sms"]["best"]["method"] == "lora"  # adapter is better but trains 3 %
    assert s["sms"]["beats_full"] is True and s["sms"]["lora_forgets_less"] is True
    # perplexity: lower is better, so LoRA's 21 does not match full's 20; LoRA forgets more here
    assert s["dialogue"]["best"]["method"] == "lora"
    assert s["dialogue"]["beats_full"] is False and s["dialogue"]["lora_forgets_less"] is False


def test_summary_without_full_run_leaves_targets_unmeasured():
    s = quality.summarize([r for r in ROWS if r.get("method") != "full"])
    assert s["sms"]["beats_full"] is None and s["sms"]["lora_forgets_less"] is None


def test_a_rerun_replaces_the_earlier_row():
    rows = ROWS + [row("sms", "full", 0.99, 0.05, 100.0)]
    s = quality.summarize(rows)
    assert s["sms"]["full"]["value"] == 0.99
    assert s["sms"]["beats_full"] is False and s["sms"]["lora_forgets_less"] is False


def test_table_has_every_run_in_method_order_and_the_targets():
    text = quality.render(ROWS)
    runs = text.split("| task | full fine-tuning")[0].splitlines()  # the per-run table, before the targets
    sms = [ln for ln in runs if ln.startswith("| sms |")]
    assert [ln.split("|")[2].strip() for ln in sms] == ["full", "lora", "dora", "ia3", "bitfit", "adapter", "prompt",
                                                        "sparse"]  # methods without a row: "not run"
    assert "| sms | dora | not run |" in text and "| sms | ia3 | not run |" not in text
    assert "| sms | lora | accuracy 0.9700 (0.5000) | 0.3000 | 1.500 |" in text
    assert "| dialogue | lora | perplexity 21.00 (0.50) | +20.0 % |" in text
    assert "| dialogue | sparse | failed: DeltaError: boom |" in text
    assert "| sms | 0.9500 | lora 0.9700 (1.50 %) | **yes** | **yes** |" in text
    assert "| dialogue | 20.00 | lora 21.00 (0.50 %) | **no** | **no** |" in text


def test_row_from_metrics_reads_what_the_cli_writes():
    m = {"after": {"accuracy": 0.9, "f1": 0.8}, "before": {"accuracy": 0.4}, "lr": 1e-3, "steps": 40,
         "forgetting": {"kind": "representation_drift", "value": 0.25}, "trainable_percent": 1.2,
         "trainable_params": 100, "train_rows": 10, "val_rows": 5, "train_time_s": 7.0}
    r = quality.row_from_metrics(TASKS["sms"], "lora", m, 9.0)
    assert (r["value"], r["before"], r["forgetting"], r["trainable_percent"], r["wall_s"]) == (0.9, 0.4, 0.25, 1.2, 9.0)


def test_report_writes_its_section_and_the_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    res = tmp_path / "quality.jsonl"
    import json

    res.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.setattr(quality, "RESULTS", res)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nkeep me\n")
    quality.report(doc, tmp_path / "quality.png")
    text = doc.read_text()
    assert "keep me" in text and text.count(quality.SECTION) == 1 and "| sms | lora |" in text
    assert (tmp_path / "quality.png").stat().st_size > 1000
    quality.report(doc, tmp_path / "quality.png")  # a second report replaces the section, not appends
    assert doc.read_text().count(quality.SECTION) == 1


def test_candidate_defaults_sit_beside_the_table_not_in_it():
    cand = row("sms", "lora-lpft", 0.999, 0.01, 1.4)  # would be the best PEFT cell if it counted
    assert quality.summarize(ROWS + [cand])["sms"]["best"]["method"] == "lora"
    text = quality.render(ROWS + [cand])
    main, _, extra = text.partition("Candidate defaults")
    assert "lora-lpft" not in main and "| sms | lora-lpft | accuracy 0.9990 | 0.0100 | 1.400 | 12 |" in extra
    assert "Candidate defaults" not in quality.render(ROWS)


def test_runs_import_this_checkouts_code_whatever_pythonpath_says():
    env = quality.child_env({"PYTHONPATH": "/elsewhere/src", "HOME": "/root"})
    parts = env["PYTHONPATH"].split(":")
    assert parts[0] == str(BENCH.parent / "src") and parts[-1] == "/elsewhere/src"
    assert env["HOME"] == "/root" and env["HF_HUB_OFFLINE"] == "1"
    assert quality.child_env({})["PYTHONPATH"].split(":")[0] == str(BENCH.parent / "src")


def test_report_names_each_machine_with_its_rows():
    rows = ROWS[:2] + [{**r, "cpu": "AMD EPYC"} for r in ROWS[2:4]]
    assert quality.machines(rows) == f"{quality.EARLIER_CPU} (2 rows), AMD EPYC (2 rows)"
