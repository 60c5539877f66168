"""``--model org/name`` from a Hub cache (the layout ``hf download`` leaves, built by hand in a temporary
HF_HOME), the offline error naming ``hf download``, and that local directories and ``.gguf`` files
still load.  Subprocesses, because huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when imported;
the network is never used (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import tiny_llama_dir

from deltatune.app.gguf_export import has_gguf_reader


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def fake_hub_cache(hf_home: Path, repo: str, model_dir: Path) -> Path:
    """``hub/models--org--name/{refs/main, blobs/<sha>, snapshots/<rev>/<file> -> ../../blobs/<sha>}``."""
    import hashlib

    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for f in model_dir.iterdir():
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, root / "blobs" / sha)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return snap


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = tiny_llama_dir(root / "llama")
    fake_hub_cache(root / "hf", "someorg/tiny-llama", model)
    return {"HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "DELTATUNE_CACHE": str(root / "cache")}, model, root


def test_hub_id_from_the_cache(env):
    e, _, _ = env
    r = _cli(["inspect", "someorg/tiny-llama", "--task", "causal-lm", "--json"], e)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["class"] == "LlamaForCausalLM" and res["path"] == "someorg/tiny-llama"


def test_missing_hub_id_offline_names_hf_download(env):
    e, _, _ = env
    r = _cli(["inspect", "someorg/not-there", "--task", "causal-lm"], e)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model 'someorg/not-there' is not a local directory and not in the local Hugging Face cache "
        "(HF_HUB_OFFLINE=1); download it once with `hf download someorg/not-there` (or run with HF_HUB_OFFLINE=0 "
        "to let deltatune download it), then run again")
    assert "huggingface-cli" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not has_gguf_reader(), reason="the GGUF file is made by our export (transformers >= 5)")
def test_local_directory_and_gguf_file_still_load(env):
    from deltatune.app.gguf_export import write_gguf
    from test_export_gguf import bpe_tokenizer, tiny

    e, model, root = env
    r = _cli(["inspect", model, "--task", "causal-lm", "--json"], e)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(model)
    tok = bpe_tokenizer()
    m = tiny("llama", len(tok))
    write_gguf(m, tok, root / "tiny.gguf")
    r = _cli(["inspect", root / "tiny.gguf", "--task", "causal-lm", "--json"], e)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["class"] == "LlamaForCausalLM" and res["params"] == sum(p.numel() for p in m.parameters())
    assert Path(res["path"]).parent == Path(e["DELTATUNE_CACHE"])  # dequantised once into deltatune's cache
