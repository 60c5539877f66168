"""Rank truncation gives the best rank-k approximation of the trained LoRA update (and reports the
kept energy); magnitude pruning keeps exactly the requested density."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import run, tiny_conv, tiny_llama, tiny_mlp
from deltatune.ops.prune import magnitude_prune, truncate_lora
from test_invariants import perturb


def _deltas(model, name="default"):
    return {p: layer.deltas[name].delta_weight(layer.base_layer).detach().clone()
            for p, layer in dt.core.iter_delta_layers(model) if name in layer.deltas}


def test_truncation_is_the_best_rank_k_approximation():
    model = dt.attach(tiny_llama(), "lora", targets=["q_proj", "v_proj"], r=8, alpha=16)
    perturb(model)
    before = _deltas(model)
    rep = truncate_lora(model, r=3)
    after = _deltas(model)
    assert set(after) == set(before)
    for p, d in before.items():
        u, s, vh = torch.linalg.svd(d.double())
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(after[p].double(), best, atol=1e-5, rtol=1e-4)
        row = next(r for r in rep.rows if r["module"] == p)
        assert row["rank_after"] == 3 and row["kept_energy"] == pytest.approx(float(s[:3].pow(2).sum() / s.pow(2).sum()))
    assert dt.adapters(model)["default"].r == 3
    assert all(t.requires_grad for t in dt.adapter_tensors(model, "default").values())  # still trainable


def test_energy_target_and_peft_loads_the_result(tmp_path):
    peft = pytest.importorskip("peft")
    model = dt.attach(tiny_llama(), "lora", targets=["q_proj", "v_proj"], r=8, rslora=True)
    perturb(model)
    rep = truncate_lora(model, energy=0.8)
    assert all(r["kept_energy"] >= 0.8 for r in rep.rows)
    assert len({r["rank_after"] for r in rep.rows}) >= 1 and all(r["rank_after"] < 8 for r in rep.rows)
    y = run(model, "llama")
    dt.save(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(run(pm, "llama"), y, atol=1e-5, rtol=1e-5)


def test_full_rank_truncation_keeps_outputs_conv_and_embedding():
    for make, name, targets in ((tiny_conv, "conv", ["c1", "c2"]), (tiny_mlp, "mlp", ["emb", "fc1"])):
        model = dt.attach(make(), "lora", targets=targets, r=4)
        perturb(model)
        y = run(model, name)
        rep = truncate_lora(model, r=4)
        assert all(r["kept_energy"] == pytest.approx(1.0) for r in rep.rows)
        torch.testing.assert_close(run(model, name), y, atol=1e-5, rtol=1e-5)


def test_magnitude_prune_density():
    model = dt.attach(tiny_llama(), "lora", targets=["q_proj", "v_proj"], r=8)
    perturb(model)
    rep = magnitude_prune(model, density=0.25)
    for k, t in dt.adapter_tensors(model, "default").items():
        assert int((t != 0).sum()) == round(0.25 * t.numel()), k
    assert all(0 < r["kept_energy"] < 1 for r in rep.rows)
    magnitude_prune(model, density=0.5, scope="global")  # already at 0.25 everywhere: nothing more to drop
    assert sum(int((t != 0).sum()) for t in dt.adapter_tensors(model, "default").values()) <= \
        0.25 * sum(t.numel() for t in dt.adapter_tensors(model, "default").values()) + 1
    with pytest.raises(dt.DeltaError, match="density"):
        magnitude_prune(model, density=0)
    with pytest.raises(dt.DeltaError, match="exactly one"):
        truncate_lora(model)
