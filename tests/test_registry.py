"""The method registry owns each method's name, default targets and default learning rate, and
LoRA's variants (DoRA, PiSSA) are objects chosen from the config (methods/lora_variant.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import deltatune as dt
from cli_fixtures import run_cli
from conftest import ids_input, tiny_conv, tiny_llama, tiny_mlp
from deltatune.core import model_state
from deltatune.core.method import Method
from deltatune.core.targets import find_targets
from deltatune.methods.dora import DoraVariant, LinearDoraVariant
from deltatune.methods.pissa import PissaVariant


def test_every_entry_owns_its_name_default_targets_and_lr():
    assert len(dt.METHODS) >= 10
    for name, m in dt.METHODS.items():
        assert m.name == name == m.config_cls.method
        assert isinstance(m.default_targets, str) and m.default_targets.strip(), name
        assert isinstance(m.default_lr, float) and 0 < m.default_lr < 1, name
    assert dt.METHODS["vera"].default_targets == "attention"  # the paper's q, v
    assert dt.METHODS["lora"].default_targets == "all-linear"


def test_inspect_methods_json_lists_the_registry_entries():
    rows = {r["name"]: r for r in json.loads(run_cli("inspect", "--methods", "--json").stdout)["methods"]}
    assert set(rows) == set(dt.METHODS)
    for name, m in dt.METHODS.items():
        assert rows[name]["default_targets"] == m.default_targets
        assert rows[name]["default_lr"] == m.default_lr
        # the rate train uses per task (causal LMs at twice the method's rate: app/run.py)
        assert rows[name]["default_lr_by_task"] == {"classify": m.default_lr, "image-classify": m.default_lr,
                                                    "causal-lm": 2 * m.default_lr}
    human = " ".join(run_cli("inspect", "--methods").output.replace("│", " ").split())
    assert "default targets" in human and "attention" in human and "lr x2 for causal LMs" in human


@pytest.mark.parametrize("method", ["lora", "vera", "adalora"])
def test_attach_without_targets_uses_the_registry_default(method, monkeypatch):
    m = dt.METHODS[method]
    model = tiny_llama()
    dt.attach(model, method, name="a", **({"total_steps": 10} if method == "adalora" else {}))
    got = sorted(p for p, layer in dt.core.iter_delta_layers(model) if "a" in layer.deltas)
    assert got == sorted(find_targets(tiny_llama(), m.default_targets))
    # the entry is what attach reads: another default changes what is adapted
    monkeypatch.setattr(type(m), "default_targets", ["fc1"])
    model = tiny_mlp()
    dt.attach(model, method, name="a", **({"total_steps": 10} if method == "adalora" else {}))
    assert [p for p, layer in dt.core.iter_delta_layers(model) if "a" in layer.deltas] == ["fc1"]


def test_ia3_defaults_depend_on_the_architecture(monkeypatch):
    ia3 = dt.METHODS["ia3"]
    assert ia3.default_targets_for(tiny_llama()) == ["k_proj", "v_proj", "down_proj"]
    assert ia3.default_targets_for(tiny_conv()) == ["c1", "c2"]  # a CNN: every Conv2d
    monkeypatch.setattr(type(ia3), "default_targets_for", lambda self, model: ["fc2"])
    model = tiny_mlp()
    dt.attach(model, "ia3", name="a", feedforward=[])
    assert [p for p, layer in dt.core.iter_delta_layers(model) if "a" in layer.deltas] == ["fc2"]
    assert Method.default_targets_for is not type(ia3).default_targets_for


# --------------------------------------------------------------------------- LoRA variants

def test_variants_are_chosen_from_the_config():
    model = tiny_mlp()
    dt.attach(model, "lora", r=2, targets=["fc1"], name="plain")
    dt.attach(model, "lora", r=2, targets=["fc1"], init="pissa", name="pissa")
    dt.attach(model, "lora", r=2, targets=["fc1"], init="pissa", dora=True, name="both")
    d = model.fc1.deltas
    assert d["plain"].variants == () and d["plain"].variant is None and d["plain"].plain_product
    assert [type(v) for v in d["pissa"].variants] == [PissaVariant] and not d["pissa"].plain_product
    assert [type(v) for v in d["both"].variants] == [PissaVariant, LinearDoraVariant]
    assert isinstance(d["both"].variant, DoraVariant) and d["both"].use_dora
    assert d["pissa"].bmm_factors(torch.float32) is None  # an extra term: not batched as plain LoRA


def test_variant_refusals_name_the_layer():
    with pytest.raises(dt.DeltaError, match=r"^lora: init='pissa' supports linear layers only$"):
        dt.attach(tiny_conv(), "lora", targets=["c1"], init="pissa")
    with pytest.raises(dt.DeltaError, match="dora=True is not supported on nn.Embedding"):
        dt.attach(tiny_mlp(), "lora", targets=["emb"], dora=True)


def test_pissa_starts_at_the_svd_and_round_trips_as_plain_lora(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_llama(), ids_input(vocab=64)
    with torch.no_grad():
        base_out = model(x).logits
    r, alpha = 2, 16.0
    dt.attach(model, "lora", r=r, alpha=alpha, init="pissa", targets=["q_proj"], name="p")
    q = model.model.layers[0].self_attn.q_proj
    d = q.deltas["p"]
    # the paper's init, computed here: A = √S_r Vᵀ_r / √s, B = U_r √S_r / √s, so s·BA = U_r S_r Vᵀ_r
    u, s, vh = torch.linalg.svd(q.base_layer.weight.float(), full_matrices=False)
    scale = alpha / r
    torch.testing.assert_close(d.lora_B.weight @ d.lora_A.weight * scale, (u[:, :r] * s[:r]) @ vh[:r])
    torch.testing.assert_close(d.lora_A.weight, s[:r].sqrt()[:, None] * vh[:r] / math.sqrt(scale))
    assert "A0" not in d.state_dict() and "B0" not in d.state_dict()  # frozen copies, never saved as such
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base_out)  # − s·B₀A₀ cancels the start
        for p in dt.adapter_tensors(model, "p").values():
            p.add_(torch.randn_like(p) * 0.05)
        want = model(x).logits
    dt.save(model, tmp_path / "a", name="p")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (2 * r, 2 * alpha, True)
    fresh = tiny_llama()
    dt.load(fresh, tmp_path / "a", name="p")
    loaded = fresh.model.layers[0].self_attn.q_proj.deltas["p"]
    assert loaded.variants == () and loaded.r == 2 * r  # a plain rank-2r LoRA
    torch.testing.assert_close(loaded.lora_A.weight[:r], d.lora_A.weight.detach())
    torch.testing.assert_close(loaded.lora_A.weight[r:], d.A0)
    torch.testing.assert_close(loaded.lora_B.weight[:, r:], -d.B0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, rtol=1e-5, atol=1e-5)
    dt.merge(model, "p")  # merging adds s(BA − B₀A₀), the same change
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- hidden model state

def test_hidden_state_is_declared_and_invisible_to_torch():
    import copy

    model = tiny_llama()
    dt.attach(model, "prompt", num_virtual_tokens=2, name="p")
    dt.attach(model, "lora", r=2, targets=["q_proj"], name="l")
    with torch.no_grad():
        model(ids_input(vocab=64))
    attrs = {k.attr for k in model_state.KEYS}
    hidden = {k for k in model.__dict__ if k.startswith(("_deltatune", "_dt_"))}
    assert hidden and hidden <= attrs  # every private key on the model is declared in model_state
    assert not any(k.startswith(("_deltatune", "_dt_")) for k in model.state_dict())
    twin = copy.deepcopy(model).to(torch.float64)
    assert isinstance(model_state.get(twin, model_state.STATE), type(dt.core.get_state(model)))
    assert model_state.get(twin, model_state.STATE) is not dt.core.get_state(model)
