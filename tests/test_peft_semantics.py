"""Where users rely on peft's semantics, deltatune follows them (issue 13 §4).  Each case was
found by peft's own tests and was a wrong result or a silent surprise here before."""
from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from conftest import MODELS, tiny_bert_cls, tiny_llama
from test_invariants import perturb

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def test_two_active_adapters_with_the_same_modules_to_save_are_refused():
    m = tiny_bert_cls()
    dt.attach(m, "lora", name="a", targets=["query"])  # modules_to_save="auto": the classifier
    dt.attach(m, "lora", name="b", targets=["value"])
    with pytest.raises(dt.DeltaError, match=r"\['a', 'b'\] each keep their own trained copy of classifier"):
        dt.activate(m, ["a", "b"])
    assert dt.active_adapters(m) == ["a"]  # unchanged by the refusal
    dt.attach(m, "lora", name="c", targets=["value"], modules_to_save=None)
    dt.activate(m, ["a", "c"])  # one copy: fine


def test_deleting_the_active_adapter_activates_one_that_is_left():
    m = tiny_llama()
    dt.attach(m, "lora", name="a", targets=["q_proj"])
    dt.attach(m, "lora", name="b", targets=["v_proj"])
    perturb(m, "b", 1)
    with torch.no_grad():
        dt.activate(m, "b")
        yb = m(IDS).logits
        dt.activate(m, "a")
    with pytest.warns(UserWarning, match="'a' was active and is now deleted; adapter 'b' is active now"):
        dt.delete(m, "a")
    assert dt.active_adapters(m) == ["b"]
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, yb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the last one leaves nothing to activate: no warning
        dt.delete(m, "b")


@pytest.mark.parametrize("method", ["ln", "bitfit"])
def test_delete_after_an_in_place_merge_of_a_selector_is_refused(method):
    m = tiny_llama() if method == "ln" else MODELS["mlp"][0]()
    x = IDS if method == "ln" else MODELS["mlp"][1]()[0]
    dt.attach(m, method)
    with torch.no_grad():
        for t in dt.adapter_tensors(m, "default").values():
            t.add_(0.5)
        y = m(x)
        y = getattr(y, "logits", y)
    dt.merge(m, unload=False)
    with pytest.raises(dt.DeltaError, match="is merged; call dt.unmerge"):
        dt.delete(m, "default")
    with pytest.raises(dt.DeltaError, match="merged into the base weights"):
        dt.attach(m, "lora", name="other")
    with torch.no_grad():
        y2 = m(x)
    torch.testing.assert_close(getattr(y2, "logits", y2), y)  # the merge is still in place
    dt.unmerge(m)
    dt.delete(m, "default")


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_adalora_refuses_a_negative_or_non_finite_orth_reg_weight(bad):
    with pytest.raises(dt.DeltaError, match="orth_reg_weight must be a finite number >= 0"):
        dt.attach(tiny_llama(), "adalora", orth_reg_weight=bad, total_steps=10)


def test_gaussian_init_on_embedding_is_peft_s():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = dt.attach(tiny_llama(), "lora", targets=["embed_tokens"], init="gaussian", r=4)
    d = next(layer.deltas["default"] for _, layer in dt.core.iter_delta_layers(ours))
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["embed_tokens"], r=4,
                                                           init_lora_weights="gaussian"))
    emb = pm.base_model.model.model.embed_tokens
    a, b = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]
    assert torch.count_nonzero(a) == 0 and torch.count_nonzero(d.lora_embedding_A) == 0  # A = 0
    assert b.std().item() == pytest.approx(1.0, abs=0.25)  # B ~ N(0, 1) in both
    assert d.lora_embedding_B.std().item() == pytest.approx(1.0, abs=0.25)


def test_default_distilbert_classifier_file_loads_in_peft(tmp_path):
    """peft matches modules_to_save=["classifier"] by string suffix, so it also takes
    "pre_classifier": deltatune's default file must not put LoRA there."""
    peft = pytest.importorskip("peft")
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32,
                           num_labels=3)

    def make():
        torch.manual_seed(0)
        return DistilBertForSequenceClassification(cfg).eval()

    m = dt.attach(make(), "lora")
    perturb(m, "default", 1)
    ids = torch.randint(3, 60, (2, 6))
    with torch.no_grad():
        y = m(input_ids=ids).logits
    dt.save(m, tmp_path)
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)


def _peft_lora_dir(tmp_path, **cfg):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, init_lora_weights=False, **cfg)).eval()
    pm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        return pm(input_ids=IDS).logits


def test_peft_layers_to_transform_loads(tmp_path):
    y = _peft_lora_dir(tmp_path, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    m = dt.load(tiny_llama(), tmp_path)
    wrapped = sorted(p for p, _ in dt.core.iter_delta_layers(m))
    assert wrapped == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=IDS).logits, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg,key", [({"bias": "all"}, "bias='all'"),
                                     ({"bias": "lora_only"}, "bias='lora_only'")])
def test_peft_files_deltatune_cannot_load_name_the_key(tmp_path, cfg, key):
    _peft_lora_dir(tmp_path, target_modules=["q_proj"], **cfg)
    m = tiny_llama()
    with pytest.raises(dt.DeltaError, match=f"peft LoRA file with {key}.*load it with peft"):
        dt.load(m, tmp_path)
    assert not list(dt.core.iter_delta_layers(m))


def test_peft_target_parameters_named(tmp_path):
    import json

    _peft_lora_dir(tmp_path, target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["mlp.experts.gate_up_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(dt.DeltaError, match=r"target_parameters=\['mlp.experts.gate_up_proj'\]"):
        dt.load(tiny_llama(), tmp_path)
