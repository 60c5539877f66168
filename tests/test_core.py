"""Core behaviour: targeting, clear errors, bookkeeping, LoRA+ groups, file layout."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.storage.adapter import _manifest_digest
from conftest import MODELS, run, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_mlp
from test_invariants import perturb


def test_targets_list_suffix_regex_and_presets():
    m = tiny_llama()
    qv = dt.find_targets(m, ["q_proj", "v_proj"])
    assert qv and all(p.endswith(("q_proj", "v_proj")) for p in qv) and len(qv) == 4
    assert dt.find_targets(m, r"model\.layers\.0\.self_attn\.(q|k)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    all_lin = dt.find_targets(m, "all-linear")
    assert "lm_head" not in all_lin and len(all_lin) == 14
    assert dt.find_targets(m, "attention") == qv
    assert dt.find_targets(tiny_gpt2(), "attention") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(p.endswith(("query", "value")) for p in dt.find_targets(MODELS["bert"][0](), "attention"))
    assert dt.find_targets(m, "all-linear", exclude=["mlp.down_proj"]) == [p for p in all_lin if "down_proj" not in p]


def test_no_match_error_lists_close_names():
    with pytest.raises(dt.DeltaError) as e:
        dt.attach(tiny_llama(), "lora", targets=["q_prj"])
    msg = str(e.value)
    assert "q_prj" in msg and "q_proj" in msg and "matched no module" in msg


def test_failed_attach_leaves_model_untouched():
    m = tiny_llama()
    before = [n for n, _ in m.named_modules()]
    with pytest.raises(dt.DeltaError):
        dt.attach(m, "lora", targets=["nope"])
    assert [n for n, _ in m.named_modules()] == before
    assert all(p.requires_grad for p in m.parameters())  # a failed attach freezes nothing


def test_duplicate_unknown_and_invalid_names():
    m = dt.attach(tiny_mlp(), "lora")
    with pytest.raises(dt.DeltaError, match="already has an adapter named 'default'"):
        dt.attach(m, "lora")
    with pytest.raises(dt.DeltaError, match="unknown adapter"):
        dt.activate(m, "missing")
    with pytest.raises(dt.DeltaError, match="invalid"):
        dt.attach(m, "lora", name="../x")
    with pytest.raises(dt.DeltaError, match="unknown method 'lroa'.*lora"):
        dt.attach(m, "lroa", name="x")
    with pytest.raises(dt.DeltaError, match="did you mean 'alpha'"):
        dt.attach(m, "lora", name="y", alpah=4)
    with pytest.raises(dt.DeltaError, match="positive integer"):
        dt.attach(m, "lora", name="z", r=0)
    with pytest.raises(dt.DeltaError, match=r"dropout must be in \[0, 1\)"):
        dt.attach(m, "lora", name="z", dropout=-0.1)


def test_failed_attach_keeps_first_adapter_working():
    m = dt.attach(tiny_mlp(), "lora")
    perturb(m)
    y = run(m, "mlp")
    with pytest.raises(dt.DeltaError):
        dt.attach(m, "lora", name="bad", targets=["nothing"])
    torch.testing.assert_close(run(m, "mlp"), y)
    assert list(dt.adapters(m)) == ["default"]


def test_load_onto_wrong_base_names_every_mismatch(tmp_path):
    m = dt.attach(tiny_llama(), "lora", targets=["q_proj"])
    dt.save(m, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = [n for n, _ in other.named_modules()]
    with pytest.raises(dt.DeltaError) as e:
        dt.load(other, tmp_path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in msg and "model.layers.1.self_attn.q_proj" in msg
    assert [n for n, _ in other.named_modules()] == before  # nothing left attached


def test_file_layout_is_peft_layout(tmp_path):
    m = dt.attach(tiny_llama(), "lora", targets=["q_proj"], r=4)
    dt.save(m, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "deltatune.json",
                                                    "README.md"}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 4


def test_unknown_config_keys_warn(tmp_path):
    m = dt.attach(tiny_mlp(), "lora")
    dt.save(m, tmp_path)
    man = json.loads((tmp_path / "deltatune.json").read_text())
    man["config"]["from_the_future"] = 1
    man["manifest_sha256"] = _manifest_digest(man)  # as a newer deltatune would write it
    (tmp_path / "deltatune.json").write_text(json.dumps(man))
    with pytest.warns(UserWarning, match="from_the_future"):
        dt.load(tiny_mlp(), tmp_path)


def test_trainable_parameters_and_modules_to_save():
    m = tiny_bert_cls()
    dt.attach(m, "lora", targets="attention", r=2)
    rep = dt.trainable_parameters(m)
    head = sum(p.numel() for p in m.classifier.base_layer.parameters())
    lora = sum(t.numel() for k, t in dt.adapter_tensors(m, "default").items() if "lora" in k)
    assert rep.trainable == lora + head and rep.by_adapter == {"default": lora + head}
    assert "trainable%" in str(rep) and 0 < rep.percent < 100


def test_lora_plus_groups():
    m = dt.attach(tiny_llama(), "lora", targets=["q_proj"])
    groups = dt.lora_plus_groups(m, lr=1e-3, ratio=16)
    assert groups[1]["lr"] == pytest.approx(16e-3)
    b_ids = {id(l.deltas["default"].lora_B.weight) for _, l in dt.core.iter_delta_layers(m)}
    assert {id(p) for p in groups[1]["params"]} == b_ids
    assert len(groups[0]["params"]) == len(b_ids)
    torch.optim.AdamW(groups)  # a valid optimizer spec


def test_two_methods_compose_and_merge_refuses_tied_weights():
    m = tiny_gpt2()
    dt.attach(m, "lora", targets=["wte"])
    perturb(m)
    with pytest.raises(dt.DeltaError, match="tied"):
        dt.merge(m)


def test_getattr_forwards_to_base():
    m = dt.attach(tiny_llama(), "lora", targets=["q_proj"])
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, dt.DeltaLayer) and q.weight is q.base_layer.weight and q.in_features == 32
