"""The training display stays clean: library warnings go to the run's train.log, and
``--compile auto`` over batches of varying padded length compiles once, without dynamo's
recompilation warnings or tracebacks on the terminal."""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import warnings

import pytest
from cli_fixtures import tiny_llama_dir, words, write_jsonl

from deltatune.app.console import library_log


class Seen(logging.Handler):
    """Stands for the terminal handlers torch and transformers install on their loggers."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def terminal():
    h = Seen()
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "transformers")]
    levels = [(lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:  # other tests may have set transformers to errors only (quiet_transformers),
        lg.addHandler(h)  # or a library's dictConfig may have disabled existing loggers
        lg.setLevel(logging.WARNING)
        lg.disabled = False
    yield h
    for lg, (level, disabled) in zip(loggers, levels):
        lg.removeHandler(h)
        lg.setLevel(level)
        lg.disabled = disabled


def test_library_warnings_go_to_the_log_file(tmp_path, terminal, caplog, monkeypatch):
    monkeypatch.delenv("DELTATUNE_VERBOSE", raising=False)
    log = tmp_path / "run" / "train.log"
    with caplog.at_level(logging.WARNING), library_log(log):
        warnings.warn("a deprecation from some library", FutureWarning)
        logging.getLogger("torch._dynamo").warning("torch._dynamo hit config.recompile_limit (8)")
        logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
        logging.getLogger("deltatune").warning("our own line")
    text = log.read_text()
    shown = terminal.lines + [r.getMessage() for r in caplog.records]  # own handlers, and the root's
    for s in ("a deprecation from some library", "recompile_limit", "Some weights were not initialized"):
        assert s in text and not any(s in line for line in shown)
    assert "our own line" in shown and "our own line" not in text
    logging.getLogger("torch._dynamo").warning("after the block")  # handlers restored
    assert "after the block" in terminal.lines and "after the block" not in log.read_text()


def test_verbose_keeps_them_on_the_terminal_too(tmp_path, terminal, monkeypatch):
    monkeypatch.setenv("DELTATUNE_VERBOSE", "1")
    with library_log(tmp_path / "train.log"):
        logging.getLogger("transformers").warning("shown with verbose")
    assert "shown with verbose" in terminal.lines and "shown with verbose" in (tmp_path / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.heavy  # minutes of inductor compiles: `make test`, not CI
@pytest.mark.skipif(not shutil.which("c++"), reason="inductor needs a C++ compiler")
def test_compile_auto_over_varying_lengths_is_quiet(tmp_path):
    """500 steps (compile="auto" turns on from 500) over rows of 3..60 tokens, so nearly every batch
    has a new padded length: one compile, no fallback, nothing from dynamo on stdout/stderr."""
    lm = tiny_llama_dir(tmp_path / "llama")
    ws, rng = words(), random.Random(0)
    write_jsonl(tmp_path / "var.jsonl", [{"prompt": " ".join(rng.choices(ws, k=rng.randint(1, 40))),
                                          "response": " ".join(rng.choices(ws, k=rng.randint(1, 20)))}
                                         for _ in range(200)])
    r = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", "--model", lm, "--data", tmp_path / "var.jsonl",
                        "--task", "causal-lm", "--output", tmp_path / "o", "--max-steps", "500", "--batch-size", "4",
                        "--compile", "auto", "--json"],
                       capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "DELTATUNE_VERBOSE": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["compiled"] is True  # compiled, and never fell back to eager
    shown = (r.stdout + r.stderr).lower()
    assert "traceback" not in shown and "recompil" not in shown and "warning" not in shown, r.stderr[-2000:]


def test_a_logger_disabled_by_another_librarys_dictconfig_still_files(tmp_path):
    """mlflow/alembic call logging.config.dictConfig, which disables every existing logger."""
    lg = logging.getLogger("torch._dynamo")
    was = lg.disabled
    lg.disabled = True
    try:
        with library_log(tmp_path / "train.log"):
            lg.warning("recompiled after a dictConfig")
        assert "recompiled after a dictConfig" in (tmp_path / "train.log").read_text()
        assert lg.disabled  # restored as found
    finally:
        lg.disabled = was
