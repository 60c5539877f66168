"""Exact resume: a training run SIGKILLed at a random point and resumed ends with the same adapter,
optimizer, scheduler and RNG state as the uninterrupted run (max abs diff <= 1e-6 on CPU).

The run exercises everything resume must restore: dropout (torch RNG), several epochs of seeded
shuffling with a short last batch (data order), gradient accumulation (2 micro-batches a step),
warmup + cosine schedule, AdamW moments, gradient clipping and a fully trained head
(modules_to_save).  Kill points: after a random optimizer step (before its checkpoint), and at
a random file-system call of the run (inside checkpoint writing), plus a run killed twice.
AdaLoRA adds state outside its tensors (importance averages, rank masks): its resume is exact too.
Every run is a child forked from ``test_faults.ForkServer`` so a kill is real (SIGKILL).
"""
from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from conftest import tiny_mlp
from test_faults import ForkServer

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL fault tests need Linux")

STEPS = 12
TOL = 1e-6


def make_model():
    torch.manual_seed(0)
    return dt.attach(tiny_mlp(), "lora", targets=["fc1", "fc2"], r=4, dropout=0.2, modules_to_save=["head"])


def features():
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(26):  # 26 rows / batch 4: 7 batches an epoch, the last one short
        n = int(torch.randint(3, 9, (1,), generator=g))
        rows.append({"input_ids": torch.randint(0, 20, (n,), generator=g).tolist(), "labels": i % 3})
    return rows


def loss_fn(model, batch):
    return F.cross_entropy(model(batch["input_ids"]), batch["labels"])


def config():
    from deltatune.train.trainer import TrainConfig

    return TrainConfig(lr=5e-3, weight_decay=0.01, batch_size=4, grad_accum=2, max_steps=STEPS, warmup_ratio=0.2,
                       schedule="cosine", max_grad_norm=0.5, seed=3, save_every=2, keep_checkpoints=2,
                       progress=False)


def _train(out: str, kill_step: int = 0, kill_call: int = 0, count_file: str = "", break_rng: bool = False) -> None:
    """Train (resuming when a checkpoint exists); SIGKILL self after optimizer step ``kill_step``
    or at the ``kill_call``-th file-system call.  ``break_rng``: a deliberately wrong resume
    (torch RNG not restored), the negative control."""
    import pathlib

    from deltatune import files as safety
    from deltatune.train.trainer import Trainer

    torch.set_num_threads(1)
    if break_rng:
        torch.set_rng_state = lambda state: None
    calls = [0]
    if kill_call or count_file:
        def hook(fn):
            def wrapped(*a, **kw):
                calls[0] += 1
                if calls[0] == kill_call:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*a, **kw)
            return wrapped

        for mod, names in ((os, ["fsync", "rename", "replace", "rmdir", "unlink", "mkdir"]),
                           (pathlib.Path, ["write_bytes", "write_text"]), (safety, ["exchange"])):
            for n in names:
                setattr(mod, n, hook(getattr(mod, n)))

    def killer(step, total, model):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer(make_model(), features(), config(), loss_fn=loss_fn, output_dir=out,
            callbacks=[killer]).train(resume=True)
    if count_file:
        pathlib.Path(count_file).write_text(str(calls[0]))


def final_state(out: Path) -> dict:
    ck = out / "checkpoints"
    d = ck / (ck / "latest").read_text().strip()
    assert d.name == f"step-{STEPS:07d}", f"run did not finish: latest is {d.name}"
    st = torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=True)
    adapter = dt.adapter_tensors(dt.load(tiny_mlp(), d / "adapter"), "default")
    return {"state": st, "adapter": {k: v.detach() for k, v in adapter.items()}}


def max_diff(a, b, path="") -> float:
    """Max abs difference over nested dicts/lists of tensors; non-tensor leaves must be equal."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape, f"{path}: {a.shape} vs {getattr(b, 'shape', b)}"
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        return max([max_diff(a[k], b[k], f"{path}.{k}") for k in a] + [0.0])
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        return max([max_diff(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))] + [0.0])
    if isinstance(a, float):
        return abs(a - b)
    assert a == b, f"{path}: {a!r} vs {b!r}"
    return 0.0


def diffs(ref: dict, got: dict) -> dict[str, float]:
    import json

    s, r = got["state"], ref["state"]
    hist = lambda st: [h["loss"] for h in json.loads(st["history"])["history"]]  # noqa: E731
    return {"adapter": max_diff(ref["adapter"], got["adapter"]),
            "trainable": max_diff(r["trainable"], s["trainable"]),
            "optimizer": max_diff(r["optimizer"], s["optimizer"]),
            "scheduler": max_diff(r["scheduler"], s["scheduler"]),
            "rng": max_diff(r["rng"], s["rng"]),
            "loss_history": max_diff(hist(r), hist(s))}


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    count = out / "calls"
    assert server.wait(server.start("test_resume:_train", str(out / "run"), 0, 0, str(count))) == 0
    return final_state(out / "run"), int(count.read_text())


def run_with_kills(server, out: Path, kills: list[tuple[str, int]]) -> dict:
    for kind, k in kills:
        pid = server.start("test_resume:_train", str(out), k if kind == "step" else 0, k if kind == "call" else 0)
        code = server.wait(pid)
        assert code == -signal.SIGKILL, f"kill at {kind} {k} did not happen (exit code {code})"
    assert server.wait(server.start("test_resume:_train", str(out))) == 0, "resume failed"
    return final_state(out)


def kill_plans(n_calls: int) -> list[list[tuple[str, int]]]:
    rng = random.Random(11)
    steps = rng.sample(range(3, STEPS), 6)  # odd ones resume from an older checkpoint and replay
    # file-system calls after the first checkpoint is complete (about 2/STEPS of the run's calls)
    calls = rng.sample(range(2 * n_calls // STEPS + 8, n_calls - 2), 5)
    return ([[("step", s)] for s in steps] + [[("call", c)] for c in calls]
            + [[("call", 5)]]  # inside the first checkpoint: nothing to resume, starts over
            + [[("step", 3), ("call", n_calls // 2), ("step", 10)]])


def test_resume_is_exact(server, reference, tmp_path):
    ref, n_calls = reference
    report = []
    for i, plan in enumerate(kill_plans(n_calls)):
        got = run_with_kills(server, tmp_path / f"run{i}", plan)
        d = diffs(ref, got)
        report.append((plan, d))
        assert max(d.values()) <= TOL, f"kill plan {plan}: resumed run differs from the uninterrupted one: {d}"
    worst = max(max(d.values()) for _, d in report)
    print(f"\n{sum(len(p) for p, _ in report)} kills in {len(report)} runs ({n_calls} fs calls per run); "
          f"max abs diff after resume: {worst:.3g}")
    for plan, d in report:
        print(f"  {plan}: " + ", ".join(f"{k} {v:.2g}" for k, v in d.items()))


def test_resume_refuses_a_different_run(server, reference, tmp_path):
    """Resuming with another plan (steps) is refused with a message, not silently mixed."""
    from deltatune.train.trainer import Trainer

    out = tmp_path / "run"
    assert server.wait(server.start("test_resume:_train", str(out), 5)) == -signal.SIGKILL
    cfg = config()
    cfg.max_steps = STEPS + 4
    with pytest.raises(dt.DeltaError, match="planned 12 steps, this run plans 16"):
        Trainer(make_model(), features(), cfg, loss_fn=loss_fn, output_dir=out).train(resume=True)


def test_a_wrong_resume_is_detected(server, reference, tmp_path):
    """Negative control: if resume forgot the torch RNG (dropout masks), the comparison above
    would see it - so its zeros mean something."""
    ref, _ = reference
    out = tmp_path / "run"
    assert server.wait(server.start("test_resume:_train", str(out), 6)) == -signal.SIGKILL
    assert server.wait(server.start("test_resume:_train", str(out), 0, 0, "", True)) == 0
    d = diffs(ref, final_state(out))
    assert d["adapter"] > 1e-4 and d["rng"] > 0, d


# --------------------------------------------------------------------------- AdaLoRA's extra state
# AdaLoRA prunes by importance averages (Ī, Ū) and keeps rank masks outside its tensors; the
# trainer checkpoints them through Method.train_state / load_train_state (method_state.safetensors).

ADA = dict(targets=["fc1", "fc2"], r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, dropout=0.1,
           modules_to_save=["head"])  # budget phase: steps 3..9, pruning on even steps


def _train_adalora(out: str, kill_step: int = 0, forget_state: bool = False) -> None:
    """Like ``_train`` with AdaLoRA; ``forget_state``: resume without the method state (negative control)."""
    from deltatune.methods.adalora import AdaLoRA
    from deltatune.train.trainer import Trainer

    torch.set_num_threads(1)
    if forget_state:
        AdaLoRA.load_train_state = lambda self, model, name, tensors: None

    def killer(step, total, model):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = config()
    cfg.lr = 5e-2  # large enough that a resume with wrong masks / averages visibly changes the result
    torch.manual_seed(0)
    model = dt.attach(tiny_mlp(), "adalora", **ADA)
    Trainer(model, features(), cfg, loss_fn=loss_fn, output_dir=out, callbacks=[killer]).train(resume=True)


def adalora_final(out: Path) -> dict:
    from safetensors.torch import load_file

    ck = out / "checkpoints"
    d = ck / (ck / "latest").read_text().strip()
    assert d.name == f"step-{STEPS:07d}", f"run did not finish: latest is {d.name}"
    st = torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=True)
    method = load_file(str(d / "method_state.safetensors"))
    return {"trainable": st["trainable"], "optimizer": st["optimizer"], "method": method,
            "file": load_file(str(d / "adapter" / "adapter_model.safetensors"))}


def test_adalora_resume_is_exact(server, tmp_path):
    """An AdaLoRA run killed during the budget phase and resumed ends bit-exact: same tensors,
    optimizer, importance averages and rank masks; without the method state it would not."""
    assert server.wait(server.start("test_resume:_train_adalora", str(tmp_path / "ref"))) == 0
    ref = adalora_final(tmp_path / "ref")
    masks = {k: v for k, v in ref["method"].items() if k.endswith("rank_mask")}
    assert masks and not all(bool(m.all()) for m in masks.values()), "nothing was pruned: a weak test"
    assert any(k.endswith(".ema") for k in ref["method"]) and int(ref["method"]["default/global_step"]) == STEPS
    for kill in (5, 8):  # 5: resumes from step 4 and replays step 5; 8: dies before its own checkpoint
        out = tmp_path / f"k{kill}"
        assert server.wait(server.start("test_resume:_train_adalora", str(out), kill)) == -signal.SIGKILL
        assert server.wait(server.start("test_resume:_train_adalora", str(out))) == 0
        got = adalora_final(out)
        d = {k: max_diff(ref[k], got[k]) for k in ref}
        assert max(d.values()) <= TOL, f"kill at step {kill}: {d}"
    out = tmp_path / "forgot"  # negative control
    assert server.wait(server.start("test_resume:_train_adalora", str(out), 5)) == -signal.SIGKILL
    assert server.wait(server.start("test_resume:_train_adalora", str(out), 0, True)) == 0
    got = adalora_final(out)
    assert max_diff(ref["file"], got["file"]) > 1e-2, "resuming without the AdaLoRA state changed nothing"
