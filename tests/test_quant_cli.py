"""QLoRA from the command line (issue 16 item 4, issue 18): `train|eval|compare --quantize` on a
tiny Llama saved to disk, the adapter manifest's record of the base, and the mismatch warning."""
import json

import pytest

from cli_fixtures import chat_jsonl, spam_rows, tiny_bert_dir, tiny_llama_dir, write_csv, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

run = run_cli  # deltatune ARGS in-process (cli_fixtures.run_cli)


@pytest.fixture(scope="module")
def qrun(tmp_path_factory):
    d = tmp_path_factory.mktemp("qcli")
    llama = tiny_llama_dir(d / "llama")
    data = chat_jsonl(d / "chat.jsonl", 24)
    out = d / "run"
    r = run("train", "--model", llama, "--data", data, "--task", "causal-lm", "--quantize", "nf4", "--output", out,
            "--max-steps", 3, "--batch-size", 4, "--no-progress", "--json")
    return {"dir": d, "llama": llama, "data": data, "run": out, "metrics": json.loads(r.stdout), "log": r.stderr}


def test_train_quantized_records_the_base(qrun):
    m = qrun["metrics"]
    assert m["steps"] == 3 and m["after"]["loss"] > 0
    man = json.loads((qrun["run"] / "adapter" / "deltatune.json").read_text())
    q = man["base_model"]["quantization"]
    assert q["scheme"] == "nf4" and q["block_size"] == 64 and q["double_quant"] is True
    assert json.loads((qrun["run"] / "adapter" / "task.json").read_text())["quantize"] == "nf4"
    # the small-memory default was decided and said (tiny model: recomputing does not pay)
    assert "quantized base (nf4): gradient checkpointing off" in qrun["log"]
    assert m["train_config"]["gradient_checkpointing"] is False


def test_eval_warns_on_the_other_kind_of_base(qrun):
    r = run("eval", "--adapter", qrun["run"], "--data", qrun["data"], "--json")
    res = float_res = json.loads(r.stdout)
    line = "warning: adapter was trained on a nf4 base and is evaluated on a float base"
    assert res["warnings"] and line in r.stderr and r.stderr.count("warning:") == 1
    r = run("eval", "--adapter", qrun["run"], "--data", qrun["data"], "--quantize", "nf4", "--json")
    res = json.loads(r.stdout)
    assert res["warnings"] == [] and "warning:" not in r.stderr and res["quantize"] == "nf4"
    # the base really is the rounded one: its loss differs from the float base's on the same rows
    assert res["rows"] == float_res["rows"]
    assert abs(res["base_metrics"]["loss"] - float_res["base_metrics"]["loss"]) > 1e-4


def test_float_adapter_on_quantized_base_warns(qrun, tmp_path):
    out = tmp_path / "float"
    run("train", "--model", qrun["llama"], "--data", qrun["data"], "--task", "causal-lm", "--output", out,
        "--max-steps", 1, "--batch-size", 4, "--no-progress", "--json")
    man = json.loads((out / "adapter" / "deltatune.json").read_text())
    assert man["base_model"]["quantization"] is None
    r = run("eval", "--adapter", out, "--data", qrun["data"], "--quantize", "int8")
    assert "warning: adapter was trained on a float base and is evaluated on a int8 base" in r.output
    assert "drop --quantize" in r.output


def test_compare_quantized(qrun, tmp_path):
    r = run("compare", "--methods", "lora,ia3", "--model", qrun["llama"], "--data", qrun["data"], "--task",
            "causal-lm", "--quantize", "nf4", "--max-steps", 1, "--batch-size", 4, "--output", tmp_path / "cmp",
            "--json")
    res = json.loads(r.stdout)
    assert [row["method"] for row in res["rows"]] == ["lora", "ia3"], res["skipped"]
    man = json.loads((tmp_path / "cmp" / "lora" / "adapter" / "deltatune.json").read_text())
    assert man["base_model"]["quantization"]["scheme"] == "nf4"


@pytest.mark.parametrize("args,message", [
    (["--quantize", "nf3"], "unknown --quantize 'nf3'; choose one of ['nf4', 'int8']"),
    (["--quantize", "nf4", "--method", "full"], "--method full cannot train it"),
])
def test_bad_quantize_options(qrun, tmp_path, args, message):
    r = run("train", "--model", qrun["llama"], "--data", qrun["data"], "--task", "causal-lm", "--output",
            tmp_path / "x", "--no-progress", *args, ok=False)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1


def test_quantize_refuses_classification(tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    data = write_csv(tmp_path / "t.csv", spam_rows(16))
    r = run("train", "--model", bert, "--data", data, "--quantize", "nf4", "--output", tmp_path / "o",
            "--no-progress", ok=False)
    assert r.exit_code == 2 and "--quantize applies to --task causal-lm (got 'classify')" in r.output
