"""Integrity: every way an adapter directory can be damaged is detected on load with a message
naming the file and the problem, never a silent partial load, and a failed load leaves the model
exactly as it was.  Numerical faults: NaN/Inf losses, gradients and merges are caught."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from conftest import tiny_llama, tiny_mlp
from deltatune import safety
from deltatune.storage.adapter import _manifest_digest
from test_invariants import perturb

W, C, M = "adapter_model.safetensors", "adapter_config.json", "deltatune.json"


def saved(tmp_path, name="a", **opts) -> Path:
    model = dt.attach(tiny_mlp(), "lora", targets=["fc1", "fc2"], **opts)
    perturb(model)
    return dt.save(model, tmp_path / name)


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_fails(directory, *patterns, model=None, **kw) -> str:
    """dt.load must raise a DeltaError matching every pattern and leave the model untouched."""
    model = model if model is not None else tiny_mlp()
    before, grads = snapshot(model), [p.requires_grad for p in model.parameters()]
    with pytest.raises(dt.DeltaError) as e:
        dt.load(model, directory, **kw)
    msg = str(e.value)
    for pat in patterns:
        assert pat in msg, f"{pat!r} not in message: {msg}"
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert "_deltatune" not in model.__dict__
    return msg


def flip_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) - 7 if offset is None else offset
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- damaged files

def test_truncated_weights(tmp_path):
    d = saved(tmp_path)
    data = (d / W).read_bytes()
    (d / W).write_bytes(data[: len(data) // 2])
    load_fails(d, W, "checksum mismatch", "truncated")
    # without the manifest check the safetensors parser still refuses it
    load_fails(d, W, "truncated", verify=False)


def test_bit_flip_in_weights_and_config(tmp_path):
    d = saved(tmp_path)
    flip_bit(d / W)
    load_fails(d, W, "checksum mismatch")
    d2 = saved(tmp_path, "b")
    cfg = (d2 / C).read_text().replace('"r": 8', '"r": 9')
    (d2 / C).write_text(cfg)
    load_fails(d2, C, "checksum mismatch")


def test_weights_from_another_adapter(tmp_path):
    d, other = saved(tmp_path, "a"), saved(tmp_path, "b", r=4)
    shutil.copy(other / W, d / W)
    load_fails(d, str(d / W), "checksum mismatch", "replaced")
    # a peft-style directory (no manifest) with the other adapter's weights: shapes disagree
    (d / M).unlink()
    load_fails(d, "does not fit", "shape of fc1.lora_A.weight: file (4, 16) vs model (8, 16)")


def test_missing_files(tmp_path):
    d = saved(tmp_path)
    (d / W).unlink()
    load_fails(d, W, "missing", "interrupted")
    d = saved(tmp_path, "b")
    (d / C).unlink()
    load_fails(d, C, "missing")
    d = saved(tmp_path, "c")
    (d / M).unlink()
    (d / C).unlink()
    load_fails(d, "not an adapter directory")
    load_fails(tmp_path / "nope", "does not exist")
    (tmp_path / "file").write_text("x")
    load_fails(tmp_path / "file", "is a file, not an adapter directory")


def test_leftover_temp_files_are_ignored(tmp_path):
    d = saved(tmp_path)
    (d / f".{W}.abc.tmp").write_bytes(b"half a file")  # what an older writer may leave
    (tmp_path / ".a.dt-new-999999-x").mkdir()  # a dead writer's temp dir (pid 999999)
    model = dt.load(tiny_mlp(), d)
    assert dt.active_adapters(model) == ["default"]


def test_unknown_and_missing_keys(tmp_path):
    d = saved(tmp_path)
    (d / M).unlink()  # no manifest: the key check is what catches it
    sd = load_file(d / W)
    sd["base_model.model.fc3.lora_A.weight"] = torch.zeros(8, 4)
    del sd["base_model.model.fc2.lora_B.weight"]
    save_file(sd, d / W)
    msg = load_fails(d, "unexpected fc3.lora_A.weight (8, 4)", "missing fc2.lora_B.weight (16, 8)")
    assert str(d) in msg


def test_wrong_base_model(tmp_path):
    d = saved(tmp_path)
    load_fails(d, "matched no module of LlamaForCausalLM", model=tiny_llama())


def test_wrong_dtype_is_refused(tmp_path):
    d = saved(tmp_path)
    (d / M).unlink()
    sd = load_file(d / W)
    sd["base_model.model.fc1.lora_A.weight"] = sd["base_model.model.fc1.lora_A.weight"].to(torch.int32)
    save_file(sd, d / W)
    load_fails(d, "dtype of fc1.lora_A.weight: file torch.int32")


def test_future_format_version(tmp_path):
    d = saved(tmp_path)
    man = json.loads((d / M).read_text())
    man["format_version"] = 99
    (d / M).write_text(json.dumps(man))
    load_fails(d, M, "format_version 99", "newer deltatune")


@pytest.mark.parametrize("content,pattern", [
    (b"\xff\xfe not utf8", "not valid JSON"),
    (b"{truncated", "not valid JSON"),
    (b"[1, 2]", "not a deltatune manifest"),
    (b'{"format_version": 1, "method": "lora", "files": {}}', "lists no weights file"),
    (b'{"format_version": 1, "method": "lroa", "files": {"adapter_model.safetensors": '
     b'{"sha256": "x", "bytes": 1}}}', "checksum mismatch"),
])
def test_corrupt_manifest(tmp_path, content, pattern):
    d = saved(tmp_path)
    try:  # a well-formed dict gets a valid self-checksum, so the deeper checks are what fire
        man = json.loads(content)
        if isinstance(man, dict):
            man["manifest_sha256"] = _manifest_digest(man)
            content = json.dumps(man).encode()
    except (UnicodeDecodeError, ValueError):
        pass
    (d / M).write_bytes(content)
    load_fails(d, M if pattern != "checksum mismatch" else W, pattern)


def test_bad_config_values_name_the_file(tmp_path):
    d = saved(tmp_path)
    man = json.loads((d / M).read_text())
    man["method"] = "lroa"
    (d / M).write_text(json.dumps(man))
    load_fails(d, M, "unknown method 'lroa'", verify=False)
    man["method"], man["config"]["r"] = "lora", -3
    (d / M).write_text(json.dumps(man))
    load_fails(d, M, "r must be a positive integer", verify=False)
    (d / M).unlink()
    cfg = json.loads((d / C).read_text())
    cfg["r"] = "eight"
    (d / C).write_text(json.dumps(cfg))
    load_fails(d, C, "eight")


def test_nan_adapter_is_refused_on_load(tmp_path):
    model = dt.attach(tiny_mlp(), "lora", targets=["fc1"])
    with torch.no_grad():
        dt.adapter_tensors(model, "default")["fc1.lora_B.weight"][0, 0] = float("nan")
    d = dt.save(model, tmp_path / "a")  # saving a diverged adapter is allowed (post-mortem)
    load_fails(d, "fc1.lora_B.weight has 1 NaN", "diverged")


# --------------------------------------------------------------------------- atomic directory

def test_save_keeps_other_files_and_replaces_the_adapter(tmp_path):
    d = saved(tmp_path)
    (d / "README.md").write_text("my notes")
    (d / "logs").mkdir()
    (d / "logs" / "run.txt").write_text("log")
    model = dt.attach(tiny_mlp(), "lora", targets=["fc1"], r=2)
    dt.save(model, d)
    assert (d / "README.md").read_text() == "my notes" and (d / "logs" / "run.txt").read_text() == "log"
    assert dt.adapters(dt.load(tiny_mlp(), d))["default"].r == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_dir_failure_leaves_target_untouched(tmp_path):
    d = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(RuntimeError):
        with safety.atomic_dir(d) as tmp:
            (tmp / W).write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(dt.DeltaError, match="a file with that name exists"):
        with safety.atomic_dir(tmp_path / "f"):
            pass


def test_atomic_dir_without_carry_over_drops_stale_files(tmp_path):
    d = tmp_path / "merged"
    with safety.atomic_dir(d) as tmp:
        (tmp / "model-00001-of-00002.safetensors").write_text("old shard")
    with safety.atomic_dir(d) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in d.iterdir()) == ["model.safetensors"]


def test_fallback_swap_recovers_after_crash_between_renames(tmp_path):
    d = saved(tmp_path)
    # simulate the state a crash leaves between the two renames of the non-Linux fallback
    old = tmp_path / ".a.dt-old-999999-abc"
    d.rename(old)
    model = dt.load(tiny_mlp(), d)  # recovered from the dead writer's old copy
    assert dt.active_adapters(model) == ["default"] and d.is_dir() and not old.exists()


# --------------------------------------------------------------------------- numerical faults

def test_check_finite_names_the_culprit():
    model = dt.attach(tiny_mlp(), "lora", targets=["fc1"])
    safety.check_finite(torch.tensor(1.0), model)  # fine: no grads yet
    with pytest.raises(safety.NonFiniteError, match="loss is nan at step 3"):
        safety.check_finite(torch.tensor(float("nan")), model, step=3)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    model.fc1.deltas["default"].lora_B.weight.grad[1, 2] = float("inf")
    with pytest.raises(safety.NonFiniteError, match=r"gradient of fc1\..*lora_B.weight has 0 NaN and 1 Inf"):
        safety.check_finite(torch.tensor(0.5), model)
    assert safety.first_nonfinite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}) == "b"
    assert safety.first_nonfinite({"i": torch.arange(3)}) is None


def test_nan_guard_skips_then_stops():
    torch.manual_seed(0)
    model = dt.attach(tiny_mlp(), "lora", targets=["fc1"])
    perturb(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    guard = safety.NanGuard(policy="skip", max_skips=3)
    ids = torch.randint(0, 20, (2, 5))
    stepped = []
    for step, poison in enumerate([False, True, False, True, True, True]):
        before = [p.detach().clone() for p in params]
        loss = model(ids).pow(2).mean() * (float("nan") if poison else 1.0)
        loss.backward()
        if step == 5:
            with pytest.raises(safety.NonFiniteError, match="3 non-finite steps in a row.*last saved checkpoint"):
                guard.ok(loss, model, step=step)
            break
        if guard.ok(loss, model, step=step):
            opt.step()
        opt.zero_grad()
        moved = any(not torch.equal(a, p) for a, p in zip(before, params))
        stepped.append(moved)
        assert all(torch.isfinite(p).all() for p in params)
    assert stepped == [True, False, True, False, False]
    assert guard.skipped == 4 and "loss is nan" in guard.log[0]
    with pytest.raises(safety.NonFiniteError, match="loss is nan"):
        safety.NanGuard(policy="stop").ok(torch.tensor(float("nan")), model)
    with pytest.raises(dt.DeltaError, match="policy"):
        safety.NanGuard(policy="ignore")


def test_merge_refuses_nan_adapter_and_changes_nothing():
    model = dt.attach(tiny_mlp(), "lora", targets=["fc1", "fc2"])
    perturb(model)
    with torch.no_grad():
        dt.adapter_tensors(model, "default")["fc2.lora_A.weight"][0, 0] = float("nan")
    before = snapshot(model)
    for kw in ({}, {"unload": False}, {"copy": True}):
        with pytest.raises(dt.DeltaError, match="fc2.lora_A.weight has 1 NaN.*refusing to merge"):
            dt.merge(model, **kw)
        after = snapshot(model)
        assert all(torch.equal(after[k], before[k]) or k.endswith("lora_A.weight") for k in before)
        assert dt.adapters(model) and not any(layer.merged for _, layer in dt.core.iter_delta_layers(model))


def test_merge_overflow_rolls_back_every_layer():
    # fp16 base whose second layer overflows once the delta is added: nothing may be merged
    model = tiny_mlp().half()
    with torch.no_grad():
        model.fc2.weight.fill_(60000.0)
    dt.attach(model, "lora", targets=["fc1", "fc2"])
    perturb(model)
    with torch.no_grad():
        model.fc2.deltas["default"].lora_B.weight.fill_(100.0)
        model.fc2.deltas["default"].lora_A.weight.fill_(100.0)
    before = snapshot(model)
    with pytest.raises(dt.DeltaError, match=r"merging \['default'\] into fc2 gives weight with .*Inf.*nothing was merged"):
        dt.merge(model, unload=False)
    after = snapshot(model)
    assert torch.equal(after["fc2.base_layer.weight"], before["fc2.base_layer.weight"])
    torch.testing.assert_close(after["fc1.base_layer.weight"], before["fc1.base_layer.weight"], atol=2e-3, rtol=0)
    assert not any(layer.merged for _, layer in dt.core.iter_delta_layers(model))
    assert dt.adapters(model)


# --------------------------------------------------------------------------- the trainer keeps the last good checkpoint

def _train_until_fault(tmp_path, fault: str):
    from deltatune.train.trainer import TrainConfig, Trainer

    model = dt.attach(tiny_mlp(), "lora", targets=["fc1", "fc2"])
    feats = [{"input_ids": [i % 20, (i + 3) % 20, 5], "labels": i % 3} for i in range(16)]
    calls = [0]

    def loss_fn(m, batch):
        calls[0] += 1
        loss = torch.nn.functional.cross_entropy(m(batch["input_ids"]), batch["labels"])
        if calls[0] == 5:  # the 5th optimizer step goes wrong
            if fault == "loss":
                return loss * float("nan")
            b = m.fc1.deltas["default"].lora_B.weight
            return loss + (b - b.detach()).abs().sqrt().sum()  # finite loss, infinite gradient
        return loss

    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=8, save_every=1, progress=False)
    tr = Trainer(model, feats, cfg, loss_fn=loss_fn, output_dir=tmp_path / "run")
    with pytest.raises(dt.DeltaError) as e:
        tr.train()
    return str(e.value), tr


@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_trainer_stops_on_nonfinite_and_keeps_last_good_checkpoint(tmp_path, fault):
    msg, tr = _train_until_fault(tmp_path, fault)
    assert "step 5" in msg and "step-0000004" in msg, msg
    assert ("loss is nan" if fault == "loss" else "gradient of fc1.deltas.default.lora_B.weight") in msg, msg
    last = tr.latest_checkpoint()
    assert last.name == "step-0000004"
    model = dt.load(tiny_mlp(), last / "adapter")  # verified, and refused if it held NaN/Inf
    assert all(torch.isfinite(t).all() for t in dt.adapter_tensors(model, "default").values())


def test_manifest_without_its_checksum_is_refused(tmp_path):
    d = saved(tmp_path)
    man = json.loads((d / M).read_text())
    man.pop("manifest_sha256")
    (d / M).write_text(json.dumps(man))
    load_fails(d, M, "checksum mismatch or missing")
