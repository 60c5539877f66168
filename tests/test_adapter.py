"""Bottleneck adapters: placements land where the papers put them, the maths matches a
hand-written reference, tuple outputs work, and merging is refused clearly."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import tiny_bert, tiny_conv, tiny_gpt2, tiny_llama
from deltatune.core.delta import iter_delta_layers
from test_invariants import perturb


def _where(model):
    return {p: type(layer.deltas["default"]).__name__ for p, layer in iter_delta_layers(model)}


@pytest.mark.parametrize("make,placement,expected", [
    (tiny_llama, "houlsby", {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp"}),
    (tiny_llama, "pfeiffer", {"model.layers.0.mlp"}),
    (tiny_gpt2, "houlsby", {"transformer.h.0.attn.c_proj", "transformer.h.0.mlp"}),
    (tiny_bert, "houlsby", {"encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"}),
    (tiny_bert, "parallel", {"encoder.layer.0.intermediate", "encoder.layer.0.output.dense"}),
])
def test_placements(make, placement, expected):
    where = _where(dt.attach(make(), "adapter", placement=placement))
    assert {p for p in where if ".0." in p} == expected
    assert len(where) == 2 * len(expected)  # the same in both blocks


def test_parallel_matches_reference_on_llama_mlp():
    model = dt.attach(tiny_llama(), "adapter", placement="parallel")
    perturb(model)
    layer = dict(iter_delta_layers(model))["model.layers.0.mlp"]
    d = layer.deltas["default"]
    x = torch.randn(2, 5, 32)
    ref = layer.base_layer(x) + 4.0 * d.adapter_up(torch.relu(d.adapter_down(x)))
    torch.testing.assert_close(layer(x), ref)


def test_bert_parallel_taps_the_ffn_input():
    model = dt.attach(tiny_bert(), "adapter", placement="parallel")
    perturb(model)
    block = model.encoder.layer[0]
    d = dict(iter_delta_layers(model))["encoder.layer.0.output.dense"].deltas["default"]
    h = torch.randn(2, 5, 32)  # the FFN input
    inner = block.intermediate(h)  # the tap records h ...
    ref = block.output.dense.base_layer(inner) + 4.0 * d.adapter_up(torch.relu(d.adapter_down(h)))
    torch.testing.assert_close(block.output.dense(inner), ref)  # ... the adapter adds s·U f(D h)


def test_tuple_outputs_and_sizes_read_off_the_module():
    # LlamaAttention returns (output, weights): the adapter changes the first element only
    model = dt.attach(tiny_llama(), "adapter", targets=["self_attn"], bottleneck=4)
    perturb(model)
    d = dict(iter_delta_layers(model))["model.layers.0.self_attn"].deltas["default"]
    assert d.adapter_down.weight.shape == (4, 32) and d.adapter_up.weight.shape == (32, 4)
    ids = torch.randint(0, 64, (2, 6))
    with dt.disabled(model):
        y0 = model(ids).logits
    assert not torch.allclose(model(ids).logits, y0)


def test_after_cnn_blocks_uses_the_channel_axis():
    model = dt.attach(tiny_conv(), "adapter", targets=["c1"], bottleneck=2)
    d = dict(iter_delta_layers(model))["c1"].deltas["default"]
    assert d.channel_dim == 1 and d.adapter_down.in_features == 8
    perturb(model)
    x = torch.randn(2, 3, 6, 6)
    layer = dict(iter_delta_layers(model))["c1"]
    y = layer.base_layer(x)
    ref = y + d.adapter_up(torch.nn.functional.silu(d.adapter_down(y.movedim(1, -1)))).movedim(-1, 1)
    torch.testing.assert_close(layer(x), ref)


def test_merge_is_refused_with_a_reason():
    model = dt.attach(tiny_llama(), "adapter")
    perturb(model)
    with pytest.raises(dt.DeltaError, match="non-linearity.*cannot be folded"):
        dt.merge(model)
    with pytest.raises(dt.DeltaError, match="non-linearity"):
        dt.merge(model, unload=False)
    assert not any(layer.merged for _, layer in iter_delta_layers(model))


def test_unknown_architecture_asks_for_targets():
    from conftest import tiny_mlp

    with pytest.raises(dt.DeltaError, match="pass targets=") as e:
        dt.attach(tiny_mlp(), "adapter")
    assert "attention" in str(e.value)
    with pytest.raises(dt.DeltaError, match="placement must be one of"):
        dt.attach(tiny_mlp(), "adapter", placement="serial")


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_quantized_gpt2_matches_its_dequantized_float_twin(scheme, placement):
    # quantized GPT-2 layers are Conv1Ds storing (in, out); the MLP's widths (32 -> 128 -> 32)
    # must be read in that layout, and the adapter must behave as on the dequantized float model
    if scheme == "nf4":
        pytest.importorskip("bitsandbytes")
    from deltatune.core.delta import get_submodule_clean
    from deltatune.quant.layers import quantized_layers

    quant = dt.quantize(tiny_gpt2(), scheme)
    twin = tiny_gpt2()
    with torch.no_grad():
        for p, m in quantized_layers(quant):
            get_submodule_clean(twin, p).weight.copy_(m.dequantize())
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    for model in (quant, twin):
        dt.attach(model, "adapter", placement=placement)
    perturb(quant)
    with torch.no_grad():  # the same adapter values in both
        for k, t in dt.adapter_tensors(twin, "default").items():
            t.copy_(dt.adapter_tensors(quant, "default")[k])
    outs, grads = [], []
    for model in (quant, twin):
        y = model(ids).logits
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append({k: t.grad for k, t in dt.adapter_tensors(model, "default").items()})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert grads[0][k] is not None and grads[0][k].abs().sum() > 0, k
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-3, atol=1e-6)
