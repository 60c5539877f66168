"""BitFit and LayerNorm tuning (selectors): what they select, bias-free models, the saved file,
and named adapters swapping values in and out."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import tiny_bert, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_mlp
from test_invariants import perturb


def _keys(model, name="default"):
    return set(dt.adapter_tensors(model, name))


def test_bitfit_selects_every_bias_and_only_biases():
    model = dt.attach(tiny_bert(), "bitfit")
    keys = _keys(model)
    expected = {n for n, p in tiny_bert().named_parameters() if n.endswith(".bias")}
    assert keys == expected
    assert dt.trainable_parameters(model).trainable == sum(p.numel() for p in dt.adapter_tensors(model, "default").values())


@pytest.mark.parametrize("parts,must,must_not", [
    (["attention"], ["attention.self.query.bias", "attention.output.dense.bias"], ["intermediate", "LayerNorm", "pooler"]),
    (["ffn"], ["intermediate.dense.bias", "layer.0.output.dense.bias"], ["attention", "LayerNorm"]),
    (["norm"], ["attention.output.LayerNorm.bias", "embeddings.LayerNorm.bias"], ["dense", "query"]),
])
def test_bitfit_parts(parts, must, must_not):
    keys = _keys(dt.attach(tiny_bert(), "bitfit", parts=parts))
    for m in must:
        assert any(m in k for k in keys), (m, keys)
    for m in must_not:
        assert not any(m in k for k in keys), (m, keys)


def test_bitfit_gpt2_roles():
    keys = _keys(dt.attach(tiny_gpt2(), "bitfit", parts=["ffn"]))
    assert keys == {f"transformer.h.{i}.mlp.{n}.bias" for i in range(2) for n in ("c_fc", "c_proj")}


def test_bias_free_llama_says_so_and_offers_add_missing():
    with pytest.raises(dt.DeltaError, match="no bias terms.*add_missing=True"):
        dt.attach(tiny_llama(), "bitfit")
    model = tiny_llama()
    dt.attach(model, "bitfit", add_missing=True, parts=["attention"])
    keys = _keys(model)
    assert "model.layers.0.self_attn.q_proj.bias" in keys and not any("mlp" in k for k in keys)
    merged = dt.merge(model, copy=True)  # merging gives the layers real biases
    assert merged.model.layers[0].self_attn.q_proj.bias is not None


def test_saved_file_holds_only_bias_values(tmp_path):
    model = dt.attach(tiny_bert_cls(), "bitfit")
    perturb(model)
    dt.save(model, tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    base = dict(tiny_bert_cls().named_parameters())
    for k, v in sd.items():
        k = k.removeprefix("base_model.model.")
        assert k.endswith(".bias") or k.startswith("classifier."), k
        assert v.shape == base[k].shape
    # the classifier is trained in full (modules_to_save), not double-selected
    assert "classifier.bias" in {k.removeprefix("base_model.model.") for k in sd}
    x = torch.randint(0, 64, (2, 5))
    fresh = dt.load(tiny_bert_cls(), tmp_path)
    torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_named_adapters_restore_original_biases():
    model = tiny_mlp()
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    orig_obj = model.fc1.bias
    dt.attach(model, "bitfit", name="a")
    dt.attach(model, "bitfit", name="b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    assert model.fc1.bias is dt.adapter_tensors(model, "a")["fc1.bias"]
    dt.activate(model, "b")
    assert model.fc1.bias is dt.adapter_tensors(model, "b")["fc1.bias"]
    with dt.disabled(model):
        assert model.fc1.bias is orig_obj
    with pytest.raises(dt.DeltaError, match="both select fc1.bias"):
        dt.activate(model, ["a", "b"])
    dt.activate(model, "a")
    dt.delete(model, "a")
    dt.delete(model, "b")
    assert model.fc1.bias is orig_obj and "_dt_selected" not in model.fc1.__dict__
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, orig[n], atol=0, rtol=0)
        assert not p.requires_grad


def test_ln_selects_norm_gain_and_bias():
    keys = _keys(dt.attach(tiny_llama(), "ln"))
    assert keys == {"model.norm.weight"} | {f"model.layers.{i}.{n}.weight" for i in range(2)
                                            for n in ("input_layernorm", "post_attention_layernorm")}
    keys = _keys(dt.attach(tiny_bert(), "ln", params=["bias"]))
    assert keys and all(k.endswith("LayerNorm.bias") for k in keys)
    with pytest.raises(dt.DeltaError, match="no normalisation layer"):
        dt.attach(tiny_mlp(), "ln")


def test_selector_follows_dtype_moves():
    model = dt.attach(tiny_bert(), "ln", name="a")
    dt.attach(model, "ln", name="b")
    model.to(torch.float64)
    dt.activate(model, "b")  # b's copies were not registered during .to(): they follow on swap-in
    x = torch.randint(0, 64, (2, 5))
    assert model(x).last_hidden_state.dtype == torch.float64


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_bitfit_on_quantized_gpt2(scheme):
    # a quantized GPT-2 layer is a Conv1D storing (in, out): added biases must have its out size
    if scheme == "nf4":
        pytest.importorskip("bitsandbytes")
    from deltatune.core.delta import iter_delta_layers
    from deltatune.quant.layers import quantized_layers

    model = dt.quantize(tiny_gpt2(), scheme)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    y_ref = model(ids).logits
    biases = {p: m.bias.detach().clone() for p, m in quantized_layers(model)}
    for _, m in quantized_layers(model):
        m.bias = None
    dt.attach(model, "bitfit", add_missing=True)
    layers = dict(iter_delta_layers(model))
    for p, b in biases.items():  # the added biases, set to the removed ones, give the same model back
        added = layers[p].deltas["default"].bias
        assert added.shape == (layers[p].base_layer.out_features,)
        added.data.copy_(b)
    y = model(ids).logits
    torch.testing.assert_close(y, y_ref)
    y.square().mean().backward()
    assert all(layers[p].deltas["default"].bias.grad.abs().sum() > 0 for p in biases)
