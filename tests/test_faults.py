"""Fault injection: writers are SIGKILLed in the middle of saving, and the previous adapter must
still load, verified and consistent (weights, config and manifest from one save), every time.

* ``test_random_kills``: a child process saves an adapter in a loop; it is killed after a random
  delay, >= 50 times; after each kill ``dt.load`` must succeed and give the last completed save
  or the one in flight, never a mix.
* ``test_random_kills_during_training_checkpoints``: a run checkpointing every step is killed
  at random moments and resumed, 12 times: the checkpoint ``latest`` names is always complete.
* ``test_kill_at_every_step``: deterministic: the child kills itself at the k-th file-system call
  of a save, for every k, with the Linux one-syscall swap and with the portable two-rename
  fallback; before the swap the old adapter loads, after it the new one.

Children are forked from a helper that has torch/deltatune imported already, so
each kill costs milliseconds, not an interpreter start (see ``ForkServer``).
"""
from __future__ import annotations

import importlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL/forkserver fault tests need Linux")

KILLS = 60


class ForkServer:
    """A helper process with torch, transformers and deltatune imported that forks a child per
    request (multiprocessing's forkserver re-imports __main__ per child: ~0.6 s here, too slow).

    ``start(fn, *args)`` returns the child's pid (kill it with os.kill); ``wait(pid)`` returns
    its exit code (-9 when SIGKILLed)."""

    def __init__(self):
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import test_faults; test_faults._serve()"], cwd=here,
            env={**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def _ask(self, *words) -> str:
        self.proc.stdin.write(json.dumps(words) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "fork server died"
        return line.strip()

    def start(self, fn: str, *args) -> int:
        return int(self._ask("start", fn, *args))

    def wait(self, pid: int) -> int:
        return int(self._ask("wait", pid))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _serve() -> None:
    torch.set_num_threads(1)  # no OpenMP pool before fork
    from transformers import pytorch_utils  # noqa: F401  (imported once, not per child)

    import deltatune.data.examples  # noqa: F401
    import deltatune.train.trainer  # noqa: F401
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo (~5 s) once

    for line in sys.stdin:
        cmd, *args = json.loads(line)
        if cmd == "start":
            pid = os.fork()
            if pid == 0:
                os.dup2(2, 1)  # the child's prints must not mix into the protocol on stdout
                sys.stdout = sys.stderr
                code = 0
                try:
                    mod, _, fn = args[0].rpartition(":")  # "func" here or "module:func"
                    (getattr(importlib.import_module(mod), fn) if mod else globals()[fn])(*args[1:])
                except SystemExit as e:
                    code = e.code or 0
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                os._exit(code)
            print(pid, flush=True)
        elif cmd == "wait":
            _, status = os.waitpid(int(args[0]), 0)
            print(os.waitstatus_to_exitcode(status), flush=True)


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


class Net(nn.Module):
    """Two 256x256 layers: LoRA r=32 makes a ~130 KB file, so kills land inside writes too."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 256)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def make_model(seed=0):
    torch.manual_seed(seed)
    return dt.attach(Net(), "lora", targets=["a", "b"], r=32)


def fill(model, value: float) -> None:
    with torch.no_grad():
        for t in dt.adapter_tensors(model, "default").values():
            t.fill_(value)


def saved_value(d: Path) -> float:
    """Load (verified) into a fresh model; every tensor must hold the same value (one save)."""
    model = dt.load(Net(), d)
    vals = {float(v) for t in dt.adapter_tensors(model, "default").values() for v in t.unique()}
    assert len(vals) == 1, f"{d}: mixed adapter contents {sorted(vals)[:5]}: weights from two saves"
    return vals.pop()


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}.dt-"))


# --------------------------------------------------------------------------- children

def _save_loop(d: str, progress: str, start: int) -> None:
    torch.set_num_threads(1)
    model = make_model()
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"ready\n")
    i = start
    while True:
        fill(model, float(i))
        os.write(fd, f"begin {i}\n".encode())
        dt.save(model, d)
        os.write(fd, f"end {i}\n".encode())
        i += 1


def _save_crashing_at(d: str, value: int, k: int, use_exchange: bool) -> None:
    """Save once, SIGKILLing ourselves at the k-th file-system call (k=0: never)."""
    import pathlib
    import shutil

    from deltatune import files as safety

    torch.set_num_threads(1)
    model = make_model()
    fill(model, float(value))
    if not use_exchange:
        safety._EXCHANGE = None
    count = [0]

    def hook(fn):
        def wrapped(*a, **kw):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return wrapped

    for mod, names in ((os, ["open", "fsync", "rename", "replace", "rmdir", "unlink", "link", "mkdir"]),
                       (pathlib.Path, ["write_bytes", "write_text"]), (safety, ["exchange"]),
                       (shutil, ["rmtree", "copytree"])):
        for n in names:
            setattr(mod, n, hook(getattr(mod, n)))
    dt.save(model, d)
    sys.exit(0)


# --------------------------------------------------------------------------- tests

def _lines(progress: Path) -> list[str]:
    return progress.read_text().split() if progress.exists() else []


def test_random_kills(tmp_path, server):
    d = tmp_path / "adapter"
    model = make_model()
    fill(model, 0.0)
    dt.save(model, d)
    last = 0.0
    rng = random.Random(7)
    mid_save = 0
    t0 = time.time()
    for kill in range(KILLS):
        start = (kill + 1) * 1000
        progress = tmp_path / f"progress{kill}"
        pid = server.start("_save_loop", str(d), str(progress), start)
        deadline = time.time() + 30
        while "ready" not in _lines(progress):
            assert time.time() < deadline, "save loop did not start"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.08))
        os.kill(pid, signal.SIGKILL)
        assert server.wait(pid) == -signal.SIGKILL
        lines = _lines(progress)
        done = [int(x) for a, x in zip(lines, lines[1:]) if a == "end"]
        in_flight = [int(x) for a, x in zip(lines, lines[1:]) if a == "begin"]
        mid_save += len(in_flight) > len(done)
        v = saved_value(d)  # raises if the directory does not load (verified) or mixes two saves
        allowed = {float(done[-1])} if done else {last}
        if len(in_flight) > len(done):
            allowed.add(float(in_flight[-1]))  # the killed save had already swapped itself in
        assert v in allowed, f"kill {kill}: loaded {v}, expected one of {allowed} (progress {lines[-4:]})"
        last = v
    # the next save removes what the killed writers left behind
    fill(model, -1.0)
    dt.save(model, d)
    assert saved_value(d) == -1.0 and leftovers(d) == []
    print(f"\n{KILLS} kills survived ({mid_save} inside dt.save) in {time.time() - t0:.1f}s")
    assert mid_save >= KILLS // 2, "too few kills landed inside a save to mean anything"


@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_kill_at_every_step(tmp_path, use_exchange, server):
    d = tmp_path / "adapter"
    model = make_model()
    seen = []
    for k in range(1, 200):
        fill(model, 1.0)
        dt.save(model, d)  # the previous adapter (also cleans what the last crash left)
        assert leftovers(d) == []
        code = server.wait(server.start("_save_crashing_at", str(d), 2, k, use_exchange))
        v = saved_value(d)
        seen.append(v)
        if code == 0:
            assert v == 2.0, "a save that completed is not what loads"
            break
        assert code == -signal.SIGKILL, f"child failed at step {k} with exit code {code}"
    else:
        pytest.fail("save never completed")
    steps = len(seen) - 1
    assert steps >= 8, f"only {steps} file-system calls hooked: the hook is not reaching dt.save"
    # old until the one atomic swap, new from then on: never a third state
    switch = seen.index(2.0)
    assert set(seen[:switch]) == {1.0} and set(seen[switch:]) == {2.0}, seen
    print(f"\n{steps} crash points ({'exchange' if use_exchange else 'two renames'}): old adapter "
          f"for the first {switch}, new adapter after")


def test_reader_never_sees_a_mix(tmp_path, server):
    """A reader loading while another process saves in a loop (a server hot-reloading what a
    trainer writes) always gets one complete, verified save."""
    d = tmp_path / "adapter"
    model = make_model()
    fill(model, 0.0)
    dt.save(model, d)
    progress = tmp_path / "progress"
    pid = server.start("_save_loop", str(d), str(progress), 1)
    try:
        while "ready" not in _lines(progress):
            time.sleep(0.002)
        values = [saved_value(d) for _ in range(15)]
    finally:
        os.kill(pid, signal.SIGKILL)
        server.wait(pid)
    assert len(set(values)) > 1, "the writer made no progress while reading: the test proved nothing"
    assert values == sorted(values), f"a reader went back in time: {values}"


@pytest.mark.parametrize("open_dir", [True, False], ids=["held-open", "no-dir-handles"])
@pytest.mark.parametrize("swaps", [1, 5])
def test_a_save_between_the_manifest_and_the_weights_is_read_again(tmp_path, monkeypatch, swaps, open_dir):
    """A save landing between the reader's manifest read and its weights read (the race the loop
    above hits by chance) is detected and read again, `swaps` times in a row: the load returns the
    newest save whole, never the old manifest with the new weights.  Also where a directory cannot
    be opened (Windows): the swap is then seen by the inode number alone."""
    import deltatune.storage.adapter as store

    if not open_dir:
        def refuse(directory):
            raise PermissionError(13, "a directory cannot be opened here", str(directory))
        monkeypatch.setattr(store, "_open_dir", refuse)

    d = tmp_path / "adapter"
    model = make_model()
    fill(model, 0.0)
    dt.save(model, d)
    real, saves = store._read_file, []

    def save_then_read(path, *a, **k):
        if path.name == store.WEIGHTS and len(saves) < swaps:  # the manifest is read, the weights not yet
            saves.append(len(saves) + 1)
            fill(model, float(len(saves)))
            dt.save(model, d)
        return real(path, *a, **k)

    monkeypatch.setattr(store, "_read_file", save_then_read)
    assert saved_value(d) == float(swaps)
    assert saves == list(range(1, swaps + 1))


# --------------------------------------------------------------------------- training checkpoints

CKPT_KILLS = 12


def _train_forever(out: str) -> None:
    """Resume (or start) a long training run that checkpoints every step, until killed."""
    import torch.nn.functional as F

    from conftest import tiny_mlp
    from deltatune.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = dt.attach(tiny_mlp(), "lora", targets=["fc1", "fc2"], r=4)
    feats = [{"input_ids": [i % 20, (3 * i) % 20, 7], "labels": i % 3} for i in range(32)]
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=100_000, save_every=1, keep_checkpoints=2, progress=False)
    Trainer(model, feats, cfg, output_dir=out,
            loss_fn=lambda m, b: F.cross_entropy(m(b["input_ids"]), b["labels"])).train(resume=True)


def check_latest_checkpoint(out: Path) -> int:
    """The checkpoint `latest` names is complete and self-consistent; returns its step."""
    from conftest import tiny_mlp

    ck = out / "checkpoints"
    name = (ck / "latest").read_text().strip()
    st = torch.load(ck / name / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert name == f"step-{st['step']:07d}", f"latest names {name} but holds step {st['step']}"
    model = dt.load(tiny_mlp(), ck / name / "adapter")  # verified against its manifest
    saved = {k.replace(".deltas.default.", ".").replace(".base_layer.", "."): v for k, v in st["trainable"].items()}
    for k, t in dt.adapter_tensors(model, "default").items():
        assert torch.equal(saved[k], t), f"{name}: adapter and trainer state disagree on {k}"
    return st["step"]


def test_random_kills_during_training_checkpoints(tmp_path, server):
    """A run checkpointing every step is SIGKILLed at random moments and resumed each time:
    the checkpoint `latest` names is always complete and consistent, and steps never go back."""
    out = tmp_path / "run"
    rng = random.Random(3)
    steps = [0]
    for kill in range(CKPT_KILLS):
        latest = out / "checkpoints" / "latest"
        before = latest.read_text() if latest.exists() else None
        pid = server.start("_train_forever", str(out))
        deadline = time.time() + 60
        while not latest.exists() or latest.read_text() == before:  # this child has checkpointed once
            assert time.time() < deadline, "training made no progress"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.15))
        os.kill(pid, signal.SIGKILL)
        assert server.wait(pid) == -signal.SIGKILL
        steps.append(check_latest_checkpoint(out))
        assert steps[-1] >= steps[-2], f"kill {kill}: resumed run went back from step {steps[-2]} to {steps[-1]}"
    assert steps[-1] > CKPT_KILLS, f"too little progress to mean anything: {steps}"
    print(f"\n{CKPT_KILLS} kills during training with a checkpoint every step: latest always complete "
          f"(steps reached {steps[1:]})")
