"""transformers' own progress bars ("Converting and de-quantizing GGUF tensors...", "Loading
weights", "Writing model shards") stay out of the user's console while ``deltatune`` reads and writes
GGUF files, and come back with ``deltatune --verbose``.  Subprocesses, so stderr is the real one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_export_gguf import lm_adapter, tok  # noqa: F401  (fixtures: a tiny Llama + LoRA adapter)

from deltatune.app.gguf_export import has_gguf_reader

pytestmark = pytest.mark.skipif(not has_gguf_reader(), reason="transformers < 5: GGUF export is refused")


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def bars(stderr: str) -> list[str]:
    """tqdm frames: ``desc: 100%|█████| 20/20 [...]``."""
    return [f for line in stderr.splitlines() for f in line.split("\r") if "%|" in f and "it/s" in f or "?it/s" in f]


def test_gguf_merge_and_load_print_no_transformers_bars(lm_adapter, tmp_path):  # noqa: F811
    env = {"DELTATUNE_CACHE": str(tmp_path / "cache")}
    # merge --format gguf writes the file and reads it back with transformers' GGUF reader (the check)
    r = _cli(["merge", "--adapter", lm_adapter / "adapter", "--model", lm_adapter / "base", "--task", "causal-lm",
              "--output", tmp_path / "m", "--format", "gguf", "--json"], env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no bar, no warning
    gguf = tmp_path / "m" / "m-FP32.gguf"
    # a .gguf model: dequantised by transformers' reader, saved with save_pretrained into deltatune's cache
    r = _cli(["inspect", gguf, "--task", "causal-lm", "--json"], env)
    assert r.returncode == 0, r.stderr
    assert bars(r.stderr) == [] and r.stderr == ""
    # --verbose lets them through (so the check above can see a bar when there is one)
    r = _cli(["--verbose", "inspect", gguf, "--task", "causal-lm", "--json"], {"DELTATUNE_CACHE": str(tmp_path / "c2")})
    assert r.returncode == 0, r.stderr
    assert any("Converting and de-quantizing GGUF tensors" in b for b in bars(r.stderr)), r.stderr
