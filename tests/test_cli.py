"""Every `deltatune` command on tiny on-disk models and tiny files (typer's CliRunner)."""
import json

import pytest
import torch

from cli_fixtures import chat_jsonl, spam_rows, tiny_bert_dir, tiny_llama_dir, write_csv, run_cli

run = run_cli  # deltatune ARGS in-process (cli_fixtures.run_cli)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    bert = tiny_bert_dir(d / "bert")
    data = write_csv(d / "train.csv", spam_rows(64))
    val = write_csv(d / "val.csv", spam_rows(16, seed=1))
    out = d / "run"
    r = run("train", "--model", bert, "--data", data, "--output", out, "--max-steps", 24, "--lr", 1e-2,
            "--batch-size", 8, "--save-every", 8, "--no-progress", "--json")
    return {"dir": d, "bert": bert, "data": data, "val": val, "run": out, "metrics": json.loads(r.stdout)}


@pytest.mark.parametrize("cmd", ["train", "eval", "compare", "inspect", "merge", "demo", "importance"])
def test_help(cmd):
    r = run(cmd, "--help")
    assert "--json" in r.output and "--config" in r.output


def test_train_writes_adapter_metrics_plot(ws):
    m, out = ws["metrics"], ws["run"]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "adapter" / "task.json").exists()
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"] == m["after"] and len(saved["history"]) == 24
    assert m["after"]["loss"] < m["before"]["loss"] and m["after"]["accuracy"] > m["before"]["accuracy"]
    assert m["forgetting"]["kind"] == "representation_drift" and 0 < m["forgetting"]["value"] < 1
    assert 0 < m["trainable_percent"] < 100 and m["artifact_bytes"] > 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000016", "step-0000024"]


def test_train_human_output_and_refuses_overwrite(ws, tmp_path):
    r = run("train", "--model", ws["bert"], "--data", ws["data"], "--output", tmp_path / "h", "--max-steps", 2,
            "--no-progress")
    assert "before" in r.output and "trainable:" in r.output and "forgetting (representation_drift)" in r.output
    r = run("train", "--model", ws["bert"], "--data", ws["data"], "--output", tmp_path / "h", "--max-steps", 2,
            "--no-progress", ok=False)
    assert r.exit_code == 2 and "already holds a run; pass --resume" in r.output


def test_resume_from_checkpoint_gives_same_adapter(ws, tmp_path):
    from safetensors.torch import load_file

    args = ["train", "--model", ws["bert"], "--data", ws["data"], "--max-steps", 6, "--save-every", 2, "--lr", 1e-2,
            "--batch-size", 8, "--grad-accum", 2, "--opt", "dropout=0.1", "--no-progress", "--json"]
    run(*args, "--output", tmp_path / "a")
    want = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    run(*args, "--output", tmp_path / "b")
    ck = tmp_path / "b" / "checkpoints"  # pretend the run died right after step 4
    (ck / "latest").write_text("step-0000004")
    (tmp_path / "b" / "metrics.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "b" / "adapter")
    run(*args, "--output", tmp_path / "b", "--resume")
    got = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)


def test_eval_metrics_forgetting_and_unknown_label(ws, tmp_path):
    r = run("eval", "--adapter", ws["run"], "--data", ws["val"], "--json")
    res = json.loads(r.stdout)
    assert res["rows"] == 16 and res["metrics"]["loss"] < res["base_metrics"]["loss"]
    assert set(res["base_metrics"]) == {"accuracy", "f1", "loss"}
    assert res["forgetting"]["value"] == pytest.approx(ws["metrics"]["forgetting"]["value"], abs=1e-5)
    r = run("eval", "--adapter", ws["run"] / "adapter", "--data", ws["val"])
    assert "forgetting (representation_drift" in r.output and "accuracy" in r.output
    bad = write_csv(tmp_path / "bad.csv", [("hello", "ham"), ("win", "eggs")])
    r = run("eval", "--adapter", ws["run"], "--data", bad, ok=False)
    assert r.exit_code == 2 and "bad.csv: line 3, column 'label': label 'eggs' was not seen in training" in r.output


def test_bad_data_errors_name_file_and_columns(ws, tmp_path):
    p = write_csv(tmp_path / "cols.csv", [("hi", "ham"), ("yo", "spam")], header=("body", "label"))
    r = run("train", "--model", ws["bert"], "--data", p, "--output", tmp_path / "o", ok=False)
    assert r.exit_code == 2 and "cols.csv: cannot tell which column holds the text; columns are ['body', 'label']" in r.output
    e = tmp_path / "empty.csv"
    e.write_text("")
    r = run("train", "--model", ws["bert"], "--data", e, "--output", tmp_path / "o", ok=False)
    assert "empty.csv: the file is empty" in r.output
    r = run("train", "--model", tmp_path / "nomodel", "--data", ws["data"], "--output", tmp_path / "o", ok=False)
    assert "does not exist" in r.output
    r = run("train", "--model", ws["bert"], "--data", ws["data"], "--output", tmp_path / "o", "--opt", "rank=4", ok=False)
    assert "has no option 'rank'" in r.output


def test_config_file(ws, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {ws['bert']}\ndata: {ws['data']}\nmax-steps: 2\nmethod_options: {{r: 2}}\nprogress: false\n")
    r = run("train", "--config", cfg, "--output", tmp_path / "o", "--json")
    m = json.loads(r.stdout)
    assert m["steps"] == 2 and m["method_options"] == {"r": 2}
    cfg.write_text("modle: x\n")
    r = run("train", "--config", cfg, ok=False)
    out = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code != 0 and "unknown option 'modle'" in out
    assert "known: --batch-size, --calibrate, --chat-template," in out and "--json" in out and "as_json" not in out
    cfg.write_text("json: true\nmethods: true\n")  # keys are the flag names, also where the parameter is not
    r = run("inspect", "--config", cfg)
    assert json.loads(r.stdout)["methods"][0]["name"] == "adalora"


def test_methods_list_that_train_help_points_to():
    assert "deltatune inspect --methods" in " ".join(run("train", "--help").output.replace("│", " ").split())
    r = run("inspect", "--methods")
    import deltatune as dt

    for name, m in dt.METHODS.items():
        assert name in r.output
    assert "full" in r.output
    r = run("inspect", ok=False)
    assert r.exit_code == 2 and "inspect needs a PATH (adapter or model), or --methods" in r.output


def test_merge_loads_in_transformers(ws, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import deltatune as dt

    r = run("merge", "--adapter", ws["run"], "--output", tmp_path / "merged", "--json")
    res = json.loads(r.stdout)
    assert res["check_max_abs_diff"] < 1e-5 and res["class"] == "BertForSequenceClassification"
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(ws["bert"]).eval()
    dt.load(base, ws["run"] / "adapter")
    x = tok(["win a free prize now", "see you at lunch"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**x).logits, base(**x).logits, atol=1e-5)
    r = run("merge", "--adapter", ws["run"], "--output", tmp_path / "merged", ok=False)
    assert r.exit_code == 2 and "--force" in r.output


def test_inspect_adapter_and_model(ws, tmp_path):
    import shutil

    res = json.loads(run("inspect", ws["run"], "--json").stdout)
    assert res["kind"] == "adapter" and res["integrity"] == "ok" and res["method"] == "lora"
    assert all(f.get("checksum", "ok") in ("ok", "(the manifest)") for f in res["files"]) and res["params"] > 0
    bad = tmp_path / "bad"
    shutil.copytree(ws["run"] / "adapter", bad)
    data = bytearray((bad / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "adapter_model.safetensors").write_bytes(bytes(data))
    res = json.loads(run("inspect", bad, "--json").stdout)
    assert res["integrity"] == "FAILED" and "checksum mismatch" in res["error"]
    res = json.loads(run("inspect", ws["bert"], "--task", "classify", "--opt", "r=2", "--json").stdout)
    assert res["class"] == "BertForSequenceClassification" and "classifier" in res["heads"]
    assert len(res["candidate_targets"]["all-linear"]) == 13 and "classifier" in res["trainable_by_layer"]
    r = run("inspect", ws["bert"])
    assert "targets 'attention'" in r.output and "trainable" in r.output


def test_causal_lm_train_and_eval(tmp_path):
    lm = tiny_llama_dir(tmp_path / "llama")
    data = chat_jsonl(tmp_path / "chat.jsonl", 24)
    r = run("train", "--model", lm, "--data", data, "--task", "causal-lm", "--output", tmp_path / "o",
            "--max-steps", 4, "--batch-size", 4, "--no-progress", "--json")
    m = json.loads(r.stdout)
    assert m["metric"] == "loss" and "perplexity" in m["after"] and m["after"]["loss"] < m["before"]["loss"]
    assert m["forgetting"]["kind"] == "perplexity_change" and m["forgetting"]["ppl_base"] > 1
    res = json.loads(run("eval", "--adapter", tmp_path / "o", "--data", data, "--json").stdout)
    assert res["task"] == "causal-lm" and res["metrics"]["perplexity"] > 1
    r = run("merge", "--adapter", tmp_path / "o", "--output", tmp_path / "m", "--json")
    assert json.loads(r.stdout)["class"] == "LlamaForCausalLM"


def test_compare_skips_missing_methods(ws, tmp_path):
    r = run("compare", "--methods", "lora,no_such_method", "--full", "--model", ws["bert"], "--data", ws["data"],
            "--output", tmp_path / "cmp", "--max-steps", 2, "--json")
    res = json.loads(r.stdout)
    assert [x["method"] for x in res["rows"]] == ["lora", "full"]
    assert res["skipped"][0]["method"] == "no_such_method" and "not registered" in res["skipped"][0]["reason"]
    lora, full = res["rows"]
    assert lora["trainable_params"] < full["trainable_params"] and lora["artifact_bytes"] < full["artifact_bytes"]
    assert lora["peak_rss_mb"] > 0 and (tmp_path / "cmp" / "pareto.png").exists()


@pytest.mark.parametrize("method", ["prompt", "prefix", "full", "ia3", "adapter", "adalora", "vera", "ln", "sparse"])
def test_causal_lm_training_with_other_methods(tmp_path, method):
    """The CLI's causal-LM loss (chunked) works for every kind of delta: virtual tokens, prefixes,
    full fine-tuning with a tied head, activation scaling."""
    lm = tiny_llama_dir(tmp_path / "llama")
    data = chat_jsonl(tmp_path / "chat.jsonl", 24)
    r = run("train", "--model", lm, "--data", data, "--task", "causal-lm", "--method", method, "--output",
            tmp_path / "o", "--max-steps", 4, "--batch-size", 4, "--no-progress", "--json")
    m = json.loads(r.stdout)
    assert m["after"]["loss"] < m["before"]["loss"], (method, m["before"], m["after"])


def test_classify_with_sparse_selects_from_training_batches(ws, tmp_path):
    """`--method sparse` needs gradients to choose its weights: the CLI hands it training batches."""
    r = run("train", "--model", ws["bert"], "--data", ws["data"], "--method", "sparse", "--output", tmp_path / "s",
            "--max-steps", 2, "--no-progress", "--json")
    m = json.loads(r.stdout)
    assert m["method"] == "sparse" and m["trainable_params"] > 0


def test_version_names_the_libraries_a_bug_report_needs():
    from importlib import metadata

    out = run("--version").stdout
    for pkg in ("deltatune", "torch", "transformers", "peft"):
        assert f"{pkg} {metadata.version(pkg)}" in out.splitlines()
    assert out.splitlines()[-1].startswith("python ")
