"""``--model org/name`` and ``--data org/name`` through the real download code
(``huggingface_hub.snapshot_download``) against a local server speaking the Hub's API
(tests/fake_hub.py): downloaded once when online, with only the files deltatune asks for and
nothing on stderr but the progress bars; then served from the cache with the server stopped and
HF_HUB_OFFLINE=1; a missing repository is one line naming the fix.  Subprocesses, because
huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE when imported."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import chat_jsonl, tiny_llama_dir
from fake_hub import FakeHub

TRAIN = ["train", "--task", "causal-lm", "--max-steps", 1, "--batch-size", 2, "--no-progress"]
# one frame of a tqdm bar ("Fetching 4 files:  50%|█████     | 2/4 [00:00<00:00, 9.1it/s]"), from any release
BAR = re.compile(r"^[^\n]*?:?\s*\d+%\|[^|]*\|\s*[\d.]+[kMG]?B?/[\d.?]+[kMG]?B?\s*\[[^\]]*\]$")


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def not_progress(stderr: str) -> list[str]:
    """What stderr holds besides progress-bar frames (tqdm redraws a line with carriage returns)."""
    frames = [f.strip() for line in stderr.splitlines() for f in line.split("\r")]
    return [f for f in frames if f and not BAR.match(f)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubdl")
    model = tiny_llama_dir(root / "llama")
    (model / "pytorch_model.bin").write_bytes(b"a duplicate .bin copy deltatune must not fetch")
    data = root / "chats"
    data.mkdir()
    chat_jsonl(data / "train.jsonl", 8)
    chat_jsonl(data / "test.jsonl", 6)
    (data / "notes.pdf").write_bytes(b"not a data file")
    return root, model, data


def test_hub_model_downloads_once_then_loads_offline_from_the_cache(files, tmp_path):
    root, model, data = files
    env = {"HF_HOME": str(tmp_path / "hf"), "DELTATUNE_CACHE": str(tmp_path / "cache")}
    local_data = data / "train.jsonl"
    with FakeHub() as hub:
        hub.add("someorg/tiny", model)
        online = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        r = _cli(TRAIN + ["--model", "someorg/tiny", "--data", local_data, "--output", tmp_path / "a"], online)
        assert r.returncode == 0, r.stderr
        assert "Fetching" in r.stderr  # the download's progress bar ...
        assert not_progress(r.stderr) == []  # ... and nothing else on stderr
        fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
        assert fetched == {p.name for p in model.iterdir()} - {"pytorch_model.bin"}
        r = _cli(TRAIN + ["--model", "someorg/missing", "--data", local_data, "--output", tmp_path / "m"], online)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: model 'someorg/missing': no such model repository on the Hub ({hub.url}); check the id "
            "(a private or gated one needs `hf auth login` first)")
    snap = next((tmp_path / "hf" / "hub" / "models--someorg--tiny" / "snapshots").iterdir())
    assert sorted(p.name for p in snap.iterdir()) == sorted(p.name for p in model.iterdir() if p.suffix != ".bin")
    offline = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"}  # the server is stopped now
    r = _cli(TRAIN + ["--model", "someorg/tiny", "--data", local_data, "--output", tmp_path / "b", "--json"], offline)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["after"]["loss"] > 0
    assert json.loads((tmp_path / "b" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "someorg/tiny"
    r = _cli(TRAIN + ["--model", "someorg/other", "--data", local_data, "--output", tmp_path / "c"], offline)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model 'someorg/other' is not a local directory and not in the local Hugging Face cache "
        "(HF_HUB_OFFLINE=1); download it once with `hf download someorg/other` (or run with HF_HUB_OFFLINE=0 "
        "to let deltatune download it), then run again")


def test_hub_dataset_downloads_once_then_loads_offline_from_the_cache(files, tmp_path):
    root, model, data = files
    env = {"HF_HOME": str(tmp_path / "hf"), "DELTATUNE_CACHE": str(tmp_path / "cache")}
    args = TRAIN + ["--model", model, "--data", "someorg/chats", "--json"]
    with FakeHub() as hub:
        hub.add("someorg/chats", data, repo_type="dataset")
        online = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        r = _cli(args + ["--data-split", "test", "--output", tmp_path / "a"], online)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["train_rows"] == 5  # the 6 rows of the test split, one held out
        assert "Fetching" in r.stderr
        fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
        assert fetched == {"train.jsonl", "test.jsonl"}  # not notes.pdf
        r = _cli(args + ["--data", "someorg/nothing", "--output", tmp_path / "m"], online)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: data 'someorg/nothing': no such dataset repository on the Hub ({hub.url}); check the id "
            "(a private or gated one needs `hf auth login` first)")
    offline = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"}
    r = _cli(args + ["--output", tmp_path / "b"], offline)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["train_rows"] == 7  # the train split this time, from the cache
    assert "Fetching" not in r.stderr
