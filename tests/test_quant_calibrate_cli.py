"""`--calibrate N` (issue 18, app/calibration.py): train / eval / compare / serve stream the base
into NF4 with block scales calibrated on N batches of their data, record it in the adapter
manifest, show it in `inspect`, and refuse it in one line without `--quantize nf4`."""
import json

import pytest
import torch

import deltatune as dt
from cli_fixtures import chat_jsonl, run_cli, tiny_llama_dir
from deltatune.app.calibration import from_examples, from_texts
from deltatune.core import DeltaError
from deltatune.data.examples import load_examples
from deltatune.quant.layers import quantized_layers

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")

run = run_cli


@pytest.fixture(scope="module")
def crun(tmp_path_factory):
    d = tmp_path_factory.mktemp("calcli")
    llama = tiny_llama_dir(d / "llama")
    data = chat_jsonl(d / "chat.jsonl", 24)
    out = d / "run"
    r = run("train", "--model", llama, "--data", data, "--task", "causal-lm", "--quantize", "nf4", "--calibrate", 2,
            "--output", out, "--max-steps", 1, "--batch-size", 4, "--no-progress", "--json")
    return {"dir": d, "llama": llama, "data": data, "run": out, "metrics": json.loads(r.stdout), "log": r.stderr}


def test_train_records_the_calibration_and_inspect_shows_it(crun):
    man = json.loads((crun["run"] / "adapter" / "deltatune.json").read_text())
    assert man["base_model"]["quantization"] == {"scheme": "nf4", "block_size": 64, "double_quant": True,
                                                 "calibrated": 2}
    assert "quantized base (nf4, calibrated on 2 batch(es)): gradient checkpointing" in crun["log"]
    r = run("inspect", crun["run"] / "adapter")
    assert "nf4 base (calibrated on 2 batch(es))" in r.output


def test_eval_calibrates_on_its_data(crun):
    """eval --calibrate 2 builds 2 batches of --batch-size rows of its data, encoded as for
    evaluation; the base it evaluates is that calibrated one (another base loss than absmax)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(crun["llama"]))
    batches = from_examples(load_examples("causal-lm", str(crun["data"])), 2, 4, 256)(tok)
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 4
    assert batches[0]["attention_mask"].sum() < batches[0]["attention_mask"].numel()  # padded rows, masked
    calibrated = dict(quantized_layers(dt.load_quantized(crun["llama"], "nf4", calibration=batches)))
    absmax = dict(quantized_layers(dt.load_quantized(crun["llama"], "nf4")))
    assert any(not torch.equal(q.qweight, absmax[p].qweight) for p, q in calibrated.items())
    res = json.loads(run("eval", "--adapter", crun["run"], "--data", crun["data"], "--quantize", "nf4",
                         "--calibrate", 2, "--batch-size", 4, "--json").stdout)
    res0 = json.loads(run("eval", "--adapter", crun["run"], "--data", crun["data"], "--quantize", "nf4",
                          "--batch-size", 4, "--json").stdout)
    assert res["rows"] == res0["rows"] == 24
    assert abs(res["base_metrics"]["loss"] - res0["base_metrics"]["loss"]) > 1e-6  # a different (calibrated) base


def test_compare_passes_calibrate_on(crun, tmp_path):
    r = run("compare", "--methods", "lora", "--model", crun["llama"], "--data", crun["data"], "--task", "causal-lm",
            "--quantize", "nf4", "--calibrate", 1, "--max-steps", 1, "--batch-size", 4, "--output", tmp_path / "cmp",
            "--json")
    assert [row["method"] for row in json.loads(r.stdout)["rows"]] == ["lora"]
    man = json.loads((tmp_path / "cmp" / "lora" / "adapter" / "deltatune.json").read_text())
    assert man["base_model"]["quantization"]["calibrated"] == 1


@pytest.mark.parametrize("cmd,args,message", [
    ("train", ["--calibrate", "4"], "--calibrate 4 picks NF4 block scales, so it needs --quantize nf4 (got no --quantize)"),
    ("train", ["--calibrate", "4", "--quantize", "int8"], "needs --quantize nf4 (got --quantize int8)"),
    ("train", ["--calibrate", "-1", "--quantize", "nf4"], "--calibrate must be a number of batches (0 = off), got -1"),
    ("eval", ["--calibrate", "4"], "--calibrate 4 picks NF4 block scales, so it needs --quantize nf4"),
    ("compare", ["--calibrate", "4"], "--calibrate 4 picks NF4 block scales, so it needs --quantize nf4"),
    ("serve", ["--calibrate", "4"], "--calibrate 4 picks NF4 block scales, so it needs --quantize nf4"),
    ("serve", ["--calibrate-data", "x.txt"], "--calibrate-data gives the text for --calibrate N"),
])
def test_calibrate_without_nf4_is_one_line(crun, tmp_path, cmd, args, message):
    common = {"train": ["--model", crun["llama"], "--data", crun["data"], "--task", "causal-lm", "--output",
                        tmp_path / "x", "--no-progress"],
              "eval": ["--adapter", crun["run"], "--data", crun["data"]],
              "compare": ["--model", crun["llama"], "--data", crun["data"], "--task", "causal-lm", "--output",
                          tmp_path / "c"],
              "serve": ["--model", crun["llama"]]}[cmd]
    r = run(cmd, *common, *args, ok=False)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_serve_calibrates_on_the_packaged_text_or_a_file(crun, tmp_path):
    pytest.importorskip("fastapi")
    from deltatune.serve.device import Placement, load_served

    model, tok, where = load_served(str(crun["llama"]), "causal-lm", Placement("cpu", "fp32", "nf4", 2))
    assert where.endswith("nf4 linear layers calibrated on 2 batch(es)") and model._dt_quant["calibrated"] == 2
    ref = dt.load_quantized(crun["llama"], "nf4", calibration=from_texts(2)(tok))
    r = dict(quantized_layers(ref))
    assert all(torch.equal(q.qweight, r[p].qweight) for p, q in quantized_layers(model))
    f = tmp_path / "cal.txt"
    f.write_text("hello how are you\nmy name is bot\n\nwhat is your name\n", encoding="utf-8")
    model2, _, where2 = load_served(str(crun["llama"]), "causal-lm", Placement("cpu", "fp32", "nf4", 3, str(f)))
    assert model2._dt_quant["calibrated"] == 1  # three texts: one batch of up to 4
    with pytest.raises(DeltaError, match="does not exist"):
        Placement("cpu", "fp32", "nf4", 2, str(tmp_path / "missing.txt")).check()
