"""--report-to tensorboard,mlflow: the runs read back through TensorBoard's and MLflow's own readers."""
import json
import sys

import pytest
from typer.testing import CliRunner

from cli_fixtures import chat_jsonl, tiny_llama_dir
from deltatune.cli import app
from deltatune.core import DeltaError
from deltatune.tracking import make_trackers, parse_report_to

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

STEPS = 4


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    d = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    lm = tiny_llama_dir(d / "llama")
    data = chat_jsonl(d / "chat.jsonl", 24)
    out = d / "run"
    r = CliRunner().invoke(app, [str(a) for a in [
        "train", "--model", lm, "--data", data, "--task", "causal-lm", "--output", out, "--max-steps", STEPS,
        "--batch-size", 4, "--no-packing", "--eval-every", 2, "--no-progress", "--report-to", "tensorboard,mlflow"]])
    mp.undo()
    assert r.exit_code == 0, (r.output, r.exception)
    return {"out": out, "output": r.output, "metrics": json.loads((out / "metrics.json").read_text())}


def test_tensorboard_run_reads_back(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tracked["out"] / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
            "eval/loss", "eval/perplexity", "forgetting/ppl_base"} <= scalars
    m = tracked["metrics"]
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert [round(e.value, 5) for e in loss] == [round(h["loss"], 5) for h in m["history"]]
    assert [e.step for e in ea.Scalars("eval/loss")] == [0, 2, 4, 4]  # before, two evals, final
    assert abs(ea.Scalars("eval/loss")[0].value - m["before"]["loss"]) < 1e-5
    assert all(e.value > 0 for e in ea.Scalars("train/grad_norm"))
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    config = json.loads(text.split("```json\n", 1)[1].rsplit("```", 1)[0])
    assert config["method"]["name"] == "lora" and config["method"]["r"] == 8
    assert config["train"]["max_steps"] == STEPS and config["data"]["packing"] == "off"
    assert config["run"]["report_to"] == "tensorboard,mlflow"


def test_mlflow_run_reads_back(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked['out'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("deltatune")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    p = run.data.params
    assert p["method.name"] == "lora" and p["method.r"] == "8" and p["train.max_steps"] == str(STEPS)
    assert p["data.format"] == "prompt-completion" and float(p["train.lr"]) == tracked["metrics"]["lr"]
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(h.step for h in hist) == list(range(1, STEPS + 1))
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "forgetting/value", "forgetting/ppl_tuned"} <= \
        set(run.data.metrics)
    assert run.data.metrics["eval/loss"] == pytest.approx(tracked["metrics"]["after"]["loss"], abs=1e-6)
    files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/README.md"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    local = client.download_artifacts(run.info.run_id, "config.json", str(tracked["out"] / "dl"))
    assert json.loads(open(local).read())["method"]["name"] == "lora"


def test_console_stays_clean(tracked):
    out = tracked["output"]
    assert "tracking: tensorboard -> " in out and "mlflow -> sqlite:///" in out
    assert "INFO" not in out and "alembic" not in out and "Warning" not in out


def test_report_to_errors(tmp_path):
    assert parse_report_to("none") == [] and parse_report_to("") == []
    assert parse_report_to("MLflow, tensorboard") == ["mlflow", "tensorboard"]
    with pytest.raises(DeltaError, match=r"unknown tracker 'wandb'; choose from \['mlflow', 'tensorboard'\]"):
        parse_report_to("wandb")
    with pytest.raises(DeltaError, match="'none' cannot be combined"):
        parse_report_to("none,mlflow")
    assert not make_trackers("none", tmp_path, "x")


@pytest.mark.parametrize("name,module", [("mlflow", "mlflow.tracking"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_extra_names_the_install(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import of it raises ImportError
    with pytest.raises(DeltaError, match=r"--report-to needs .*run: pip install 'deltatune\[tracking\]'"):
        make_trackers(name, tmp_path, "x")


def test_cli_refuses_unknown_tracker_before_loading(tmp_path):
    r = CliRunner().invoke(app, ["train", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "d.jsonl"),
                                 "--task", "causal-lm", "--report-to", "wandb", "--output", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown tracker 'wandb'" in r.output
