"""Calibrated NF4 scales (deltatune.quant.search_scales): never worse than absmax on the error
they minimise, stored in bitsandbytes' format exactly (bitsandbytes decodes them to our values),
and dt.quantize(..., calibration=...) wiring: statistics, merges, errors."""
from __future__ import annotations


import pytest
import torch

import deltatune as dt
from conftest import run, tiny_gpt2, tiny_llama
from deltatune.quant import layers as Q

bf = pytest.importorskip("bitsandbytes.functional")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def gaussian(out_f=96, in_f=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[0, 0], w[-1, -3] = 0.5, -0.3  # outliers
    return w


def uniform_grid(out_f=96, in_f=192, seed=0):
    """Q4_1-like weights (the packaged SmolLM2): per 32 weights, min + k·d for k in 0..15."""
    g = torch.Generator().manual_seed(seed)
    n = out_f * in_f // 32
    lo, d = torch.randn(n, 1, generator=g) * 0.02 - 0.03, torch.rand(n, 1, generator=g) * 0.005 + 0.001
    k = torch.randint(0, 16, (n, 32), generator=g).float()
    return (lo + k * d).view(out_f, in_f)


def input_power(in_f=192, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(in_f, generator=g) ** 4 * 10 + 1e-3  # a few loud input features, like LLMs'


def error(layer, w, h):
    return ((layer.dequantize() - w).square() * h).sum().item()


def unpacked(layer) -> torch.Tensor:
    """Our reading of the storage: code[q] × scale, without bitsandbytes' decoder."""
    q = layer.qweight.view(-1)
    idx = torch.stack([q >> 4, q & 15], 1).view(-1).long()[: layer.out_features * layer.in_features]
    scale = layer.absmax
    if layer.options["double_quant"]:
        scale = bf.dequantize_blockwise(layer.absmax, layer.quant_state().state2) + layer.offset
    n, bs = idx.numel(), layer.options["block_size"]
    levels = torch.nn.functional.pad(Q._table("nf4", q.device)[idx], (0, scale.numel() * bs - n))  # partial last block
    return (levels.view(-1, bs) * scale[:, None]).view(-1)[:n].view(layer.out_features, layer.in_features)


# --------------------------------------------------------------------------- the search

@pytest.mark.parametrize("make", [gaussian, uniform_grid])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dq", [False, True])
def test_error_not_above_absmax(make, weighted, dq):
    w = make()
    h = input_power() if weighted else torch.ones(w.shape[1])
    absmax = Q.NF4Linear(w, None, double_quant=dq)
    searched = Q.NF4Linear(w, None, double_quant=dq, input_sq=h)
    e0, e1 = error(absmax, w, h), error(searched, w, h)
    assert e1 <= e0, (e1, e0)
    assert e1 < 0.95 * e0  # and clearly lower on both kinds of data (measured: 10-30 %)


def test_per_block_error_not_above_absmax_without_double_quant():
    # absmax (fraction 1.0, bitsandbytes' codes) is a candidate: no block gets worse
    w, h = gaussian(), input_power()
    absmax = Q.NF4Linear(w, None, double_quant=False)
    searched = Q.NF4Linear(w, None, double_quant=False, input_sq=h)
    blocks = lambda m: ((m.dequantize() - w).square() * h).view(-1, 64).sum(1)  # noqa: E731
    assert (blocks(searched) <= blocks(absmax) * (1 + 1e-6) + 1e-12).all()


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape", [(96, 192), (32, 32), (16, 96), (7, 9)])  # blocks crossing rows; a partial block
def test_bitsandbytes_decodes_our_storage_exactly(dq, shape):
    w = gaussian(*shape)
    plain = Q.NF4Linear(w, None, double_quant=dq)
    ours = Q.NF4Linear(w, None, double_quant=dq, input_sq=input_power(shape[1]))
    # the same buffers (names, dtypes, shapes) as bitsandbytes' own quantization
    assert {k: (v.dtype, v.shape) for k, v in ours._buffers.items()} == \
           {k: (v.dtype, v.shape) for k, v in plain._buffers.items()}
    if not dq:
        assert (ours.absmax < 0).any()  # some blocks use a flipped (negative) scale
    for layer in (plain, ours):
        # bitsandbytes' dequantize_4bit == code × scale (its CPU kernel misreads blocks that cross
        # rows unless asked to decode one flat row: NF4Linear does that when in % block != 0)
        assert torch.equal(layer.dequantize(), unpacked(layer))
        x = torch.randn(3, shape[1], requires_grad=True)
        y = layer(x)  # forward and backward decode the same weights
        torch.testing.assert_close(y, x @ unpacked(layer).t())
        y.sum().backward()
        torch.testing.assert_close(x.grad, unpacked(layer).sum(0).expand(3, -1))
    with torch.no_grad():  # one row without grad: bitsandbytes' gemv kernel
        x = torch.randn(1, shape[1])
        torch.testing.assert_close(ours(x), x @ unpacked(ours).t())


def test_zero_and_constant_blocks():
    w = torch.zeros(4, 128)
    w[1, :64] = 0.25  # one constant block
    q = Q.NF4Linear(w, None, double_quant=False, input_sq=torch.ones(128))
    assert torch.isfinite(q.absmax).all()
    torch.testing.assert_close(q.dequantize(), w)


# --------------------------------------------------------------------------- dt.quantize(..., calibration=)

def test_quantize_with_calibration():
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = tiny_llama()
    y0 = ref(ids).logits
    stats = Q.input_stats(ref, ["model.layers.0.mlp.down_proj"], [ids[:2], {"input_ids": ids[2:]}])
    x = {}
    h = ref.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: x.setdefault("x", a[0]))
    ref(ids)
    h.remove()
    torch.testing.assert_close(stats["model.layers.0.mlp.down_proj"], x["x"].flatten(0, 1).square().mean(0))

    plain, calib = dt.quantize(tiny_llama(), "nf4"), dt.quantize(tiny_llama(), "nf4", calibration=ids)
    q = calib.model.layers[0].self_attn.q_proj
    assert q.options["input_sq"].shape == (32,) and "calibrated" in repr(q)
    assert calib._dt_quant["calibrated"] and not plain._dt_quant["calibrated"]
    assert "input_sq" not in plain.model.layers[0].self_attn.q_proj.options
    # the objective of the search, Σ h (Ŵ − W)² summed over the layers, is lower than absmax's
    ref_w = dict(ref.named_modules())
    h = Q.input_stats(ref, Q.plan(ref), ids)
    err = lambda m: sum(((q.dequantize() - ref_w[p].weight).square() * h[p]).sum().item()  # noqa: E731
                        for p, q in Q.quantized_layers(m))
    assert err(calib) < 0.9 * err(plain)
    # a random-init model has no loud input features: end to end it is about as close as absmax
    # (the gain shows on trained models, bench/nf4_quality.py)
    out = lambda m: (m(ids).logits - y0).norm().item()  # noqa: E731
    assert out(calib) < 1.25 * out(plain)
    assert not calib.training and not [p for p in calib.parameters() if p.requires_grad]


def test_calibrated_gpt2_and_merge_keep_the_search():
    ids = torch.randint(0, 64, (2, 8))
    m = dt.quantize(tiny_gpt2(), "nf4", calibration=ids)
    c = m.transformer.h[0].attn.c_attn  # Conv1D: input features = 32
    assert c.options["input_sq"].shape == (32,)
    y0 = run(m, "gpt2")
    dt.attach(m, "lora", r=2)
    merged, report = Q.merge(m, requantize=True, copy=True)
    assert merged.transformer.h[0].attn.c_attn.options["input_sq"] is c.options["input_sq"]
    y1 = run(merged, "gpt2")  # LoRA B = 0: requantizing the dequantized W nearly gives it back
    assert ((y1 - y0).norm() / y0.norm()).item() < 0.02


def test_calibration_errors():
    with pytest.raises(dt.DeltaError, match="'nf4' only"):
        dt.quantize(tiny_llama(), "int8", calibration=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(dt.DeltaError, match="saw no input"):
        dt.quantize(tiny_llama(), "nf4", calibration=[])
