"""One run per output directory, resumes that match their run, and a server that starts without a
tokenizer (issue 15, items 10-11).  Real processes where the point is concurrency."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltatune as dt
from cli_fixtures import spam_rows, tiny_bert_dir, tiny_llama_dir, write_csv
from deltatune.cli.main import app
from deltatune.train.runlock import LOCK_NAME, run_lock

runner = CliRunner()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("guard")
    return {"dir": d, "bert": tiny_bert_dir(d / "bert"), "data": write_csv(d / "train.csv", spam_rows(64))}


def _train_argv(ws, out, *extra):
    return ["train", "--model", str(ws["bert"]), "--data", str(ws["data"]), "--output", str(out), "--batch-size", "8",
            "--no-progress", *map(str, extra)]


# --------------------------------------------------------------------------- the lock

def test_two_runs_on_one_output_the_second_is_refused_naming_the_first(ws, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "from deltatune.cli import main; main()"]
    first = subprocess.Popen(cmd + _train_argv(ws, out, "--max-steps", 400), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).exists():  # the first run holds the lock from its start
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first run never took a lock"
            time.sleep(0.05)
        second = subprocess.run(cmd + _train_argv(ws, out, "--max-steps", 2), env=env, capture_output=True,
                                text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second was tried"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: output directory {out} is in use by another deltatune run (pid {first.pid}); wait for it to "
        "finish, or choose another --output"]
    # the kernel dropped the killed run's lock: the directory is usable again
    with run_lock(out):
        pass


def test_lock_is_released_and_leaves_nothing(tmp_path):
    out = tmp_path / "new"
    with run_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(dt.DeltaError, match=f"pid {os.getpid()}"):
            with run_lock(out):
                pass
    assert not out.exists()  # created by the lock, nothing written: removed again
    with pytest.raises(RuntimeError):
        with run_lock(tmp_path / "kept"):
            (tmp_path / "kept" / "metrics.json").write_text("{}")
            raise RuntimeError("the run failed")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["metrics.json"]


def test_train_under_a_real_file_size_limit_is_one_line(ws, tmp_path):
    """`ulimit -f 10` (10 KB): training runs, the adapter (~30 KB) cannot be written: exit 2 with one
    line naming the directory and the limit, not an OSError traceback."""
    resource = pytest.importorskip("resource")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 1024, 10 * 1024))

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", "from deltatune.cli import main; main()",
                        *_train_argv(ws, out, "--max-steps", 2)], capture_output=True, text=True,
                       preexec_fn=limit, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {out / 'adapter'}: a file exceeds the file-size limit (`ulimit -f` or the file "
        "system's maximum); raise the limit or write elsewhere (EFBIG: File too large)")
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- resume

def test_resume_with_other_options_is_one_line_listing_them(ws, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, _train_argv(ws, out, "--max-steps", 4, "--save-every", 2))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "run_options.json").read_text())["--batch-size"] == 8
    r = runner.invoke(app, _train_argv(ws, out, "--max-steps", 4, "--resume", "-o", "r=16", "--batch-size", 4))
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: --resume with options different from the checkpoint's") and \
        "--batch-size 8 -> 4" in line and "--opt r None -> 16" in line, line
    # the options the run was started with resume fine, and options that do not change the maths may differ
    r = runner.invoke(app, _train_argv(ws, out, "--max-steps", 4, "--resume", "--save-every", 1))
    assert r.exit_code == 0, r.output


def test_trainer_refuses_a_checkpoint_of_another_rank_without_a_traceback(ws, tmp_path):
    """Without run_options.json (a run of an older version), the trainer itself compares the
    checkpoint's tensor shapes: a DeltaError, not torch's RuntimeError from copy_."""
    out = tmp_path / "run"
    assert runner.invoke(app, _train_argv(ws, out, "--max-steps", 2, "--save-every", 1)).exit_code == 0
    (out / "run_options.json").unlink()
    r = runner.invoke(app, _train_argv(ws, out, "--max-steps", 2, "--resume", "-o", "r=4"))
    assert r.exit_code == 2 and "checkpoint tensors have other shapes" in r.output and "(8, 32) vs (4, 32)" in r.output


# --------------------------------------------------------------------------- serve / model dir

@pytest.fixture(scope="module")
def llama_without_tokenizer(tmp_path_factory):
    d = tiny_llama_dir(tmp_path_factory.mktemp("notok") / "llama")
    for f in d.iterdir():
        if "token" in f.name:
            f.unlink()
    return d


def test_serve_without_tokenizer_files_serves_token_ids(llama_without_tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    import uvicorn
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    (tmp_path / "adapters").mkdir()
    r = runner.invoke(app, ["serve", "--model", str(llama_without_tokenizer), "--adapters", str(tmp_path / "adapters")])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "holds no adapter sub-directory" in r.output  # an empty --adapters directory is said aloud
    with TestClient(apps[0]) as client:
        ok = client.post("/v1/generate", json={"input_ids": [2, 5, 6], "max_new_tokens": 3})
        text = client.post("/v1/generate", json={"prompt": "hello"})
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) >= 1, ok.text
    assert text.status_code == 400 and "no tokenizer" in text.text


def test_training_needs_the_tokenizer_and_says_so(llama_without_tokenizer, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(8)))
    r = runner.invoke(app, ["train", "--model", str(llama_without_tokenizer), "--data", str(data), "--task",
                            "causal-lm", "--output", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    assert r.exit_code == 2, (r.output, r.exception)
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no usable tokenizer" in last and "tokenizer files" in last, r.output
    assert not (tmp_path / "run").exists()
