"""Quantized frozen bases (deltatune.quant): storage error bounds, memory of autograd, the
quantize → attach → train → save → load → merge cycle for nf4 and int8, clear errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import deltatune as dt
from conftest import MODELS, run, tiny_conv, tiny_gpt2, tiny_llama
from deltatune.quant import layers as Q
from deltatune.fast import disable_checkpointing, enable_checkpointing

pytest.importorskip("bitsandbytes")
SCHEMES = ["nf4", "int8"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def heavy_tailed(out_f=96, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[0, 0], w[5, 70] = 0.5, -0.3  # outliers: their blocks/rows get a large absmax
    return w


# --------------------------------------------------------------------------- storage

def test_nf4_error_bound_and_size():
    w = heavy_tailed()
    for dq in (True, False):
        q = Q.NF4Linear(w, None, block_size=64, double_quant=dq)
        err = (q.dequantize() - w).abs()
        a = w.reshape(-1, 64).abs().amax(1, keepdim=True)  # true per-block absmax
        a2 = a
        if dq:  # the 8-bit double-quantized scales the codes are multiplied by
            import bitsandbytes.functional as bf

            a2 = (bf.dequantize_blockwise(q.absmax, q.quant_state().state2) + q.offset).reshape(-1, 1)
            assert ((a2 - a).abs() / a).max() < 0.05
        # codes are rounded with the true absmax a: half the widest gap between NF4 levels (-1 and
        # -0.696) is 0.152·a; decoding with the stored scale a2 adds at most |a - a2| (|level| <= 1)
        bound = 0.152 * a + (a - a2).abs() + 1e-6
        assert (err.reshape(-1, 64) <= bound).all()
        assert err.mean() / w.abs().mean() < 0.12  # ~0.09 for Gaussian weights
        bits = q.storage_bytes() * 8 / w.numel()
        assert bits < (4.2 if dq else 4.6), bits  # 4 + 8/64 + 32/(64·256) with double quant


def test_int8_error_bound():
    w = heavy_tailed()
    q = Q.Int8Linear(w, None)
    err = (q.dequantize() - w).abs()
    half_step = w.abs().amax(1, keepdim=True) / 254  # per output channel
    assert (err <= half_step + 1e-7).all()
    assert q.qweight.dtype == torch.int8


@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_backward_match_dequantized_linear(scheme):
    w, b = heavy_tailed(), torch.randn(96)
    q = Q.SCHEMES[scheme](w, b)
    with torch.no_grad():  # an evaluation first must not switch the layer to a no-autograd kernel
        q(torch.randn(2, 128))  # (peft + bitsandbytes on CPU loses input gradients after this)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, q.dequantize(), b)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_autograd_saves_storage_not_float_weight(scheme):
    """The point of QLoRA: backward must not hold an fp32 copy of W per layer."""
    w = heavy_tailed(256, 512)
    q = Q.SCHEMES[scheme](w, None)
    saved = []
    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    todo, seen = [y.grad_fn], set()
    while todo:  # bitsandbytes keeps its tensors on ctx.tensors, outside save_for_backward
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        saved += [t for t in getattr(node, "tensors", ()) or () if isinstance(t, torch.Tensor)]
        todo += [n for n, _ in node.next_functions]
    assert any(t.data_ptr() == q.qweight.data_ptr() for t in saved), "the quantized storage is not what is saved"
    big_float = [t for t in saved if t.is_floating_point() and t.numel() >= w.numel()]
    assert not big_float, [tuple(t.shape) for t in big_float]
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_to_dtype_keeps_statistics_fp32():
    q = Q.NF4Linear(heavy_tailed(), torch.zeros(96))
    q.to(torch.bfloat16)
    assert q.compute_dtype == torch.bfloat16 and q.absmax2.dtype == torch.float32
    y = q(torch.randn(2, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# --------------------------------------------------------------------------- quantize a model

@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_replaces_linears_but_heads(scheme):
    m = tiny_llama()
    y0 = run(m, "llama")
    Q.quantize(m, scheme)
    kinds = {p: type(mod).__name__ for p, mod in m.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] == Q.SCHEMES[scheme].__name__
    assert kinds["lm_head"] == "Linear"
    assert not [p for p in m.parameters() if p.requires_grad]
    rel = ((run(m, "llama") - y0).norm() / y0.norm()).item()
    assert rel < (0.2 if scheme == "nf4" else 0.02), rel


def test_gpt2_conv1d_keeps_its_layout():
    from transformers.pytorch_utils import Conv1D

    m = tiny_gpt2()
    w = m.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out) = (32, 96)
    Q.quantize(m, "int8")
    c = m.transformer.h[0].attn.c_attn
    assert isinstance(c, Conv1D) and isinstance(c, Q.Int8Linear)
    assert c.dequantize().shape == w.shape and (c.dequantize() - w).abs().max() < 0.01
    f = c.to_float()
    assert type(f) is Conv1D and f.weight.shape == w.shape


def test_clear_errors():
    with pytest.raises(dt.DeltaError, match=r"'c1' \(Conv2d\).*supported layer types.*Linear"):
        Q.quantize(tiny_conv(), "nf4", targets=["c1"])
    with pytest.raises(dt.DeltaError, match="no linear layer"):
        Q.quantize(tiny_conv(), "nf4")  # only the head is linear, and heads are skipped
    with pytest.raises(dt.DeltaError, match="unknown quantization scheme 'nf3'"):
        Q.quantize(tiny_llama(), "nf3")
    with pytest.raises(dt.DeltaError, match="block_size"):
        Q.quantize(tiny_llama(), "nf4", block_size=48)
    with pytest.raises(dt.DeltaError, match="tied"):
        Q.quantize(tiny_gpt2(), "nf4", skip=())  # lm_head shares wte's weight
    m = Q.quantize(tiny_llama(), "int8")
    with pytest.raises(dt.DeltaError, match="already quantized"):
        Q.quantize(m, "nf4", targets=["q_proj"])
    with pytest.raises(dt.DeltaError, match="before attaching"):
        Q.quantize(dt.attach(tiny_llama(), "lora"), "nf4")


# --------------------------------------------------------------------------- the QLoRA cycle

def train_step(model, name="llama", lr=0.1):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(2):  # B moves on step 1, A on step 2
        opt.zero_grad()
        run(model, name).float().pow(2).mean().backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_quantize_attach_train_save_load_merge(scheme, model_name, tmp_path):
    make = MODELS[model_name][0]
    m = Q.quantize(make(), scheme)
    y_base = run(m, model_name)
    storage = {p: {k: v.clone() for k, v in q.state_dict().items()} for p, q in Q.quantized_layers(m)}
    dt.attach(m, "lora", r=4, alpha=8)
    torch.testing.assert_close(run(m, model_name), y_base, atol=1e-5, rtol=0)  # unchanged at init
    train_step(m, model_name)
    after = dict(Q.quantized_layers(m))
    assert set(after) == set(storage)
    for p, sd in storage.items():  # the frozen storage never moves
        assert all(torch.equal(after[p].state_dict()[k], v) for k, v in sd.items()), p
    y = run(m, model_name)
    assert not torch.allclose(y, y_base, atol=1e-4)
    dt.save(m, tmp_path / "a")

    # load onto a quantized base: same outputs
    q2 = dt.load(Q.quantize(make(), scheme), tmp_path / "a")
    torch.testing.assert_close(run(q2, model_name), y, atol=1e-5, rtol=1e-5)
    # load onto the fp32 base: the same adapter, outputs differ only by the base's rounding
    f = dt.load(make(), tmp_path / "a")
    for k, t in dt.adapter_tensors(f, "default").items():
        assert torch.equal(t, dt.adapter_tensors(m, "default")[k])
    rel = ((run(f, model_name) - y).norm() / y.norm()).item()
    assert rel < (0.2 if scheme == "nf4" else 0.02)

    # merge: default dequantizes (exact w.r.t. the trained quantized model)
    merged, rep = Q.merge(m, copy=True)
    assert not any(isinstance(x, (Q.QuantLinear, dt.DeltaLayer)) for x in merged.modules())
    torch.testing.assert_close(run(merged, model_name), y, atol=1e-4, rtol=1e-4)
    assert rep.layers and all(r.error == 0 and r.change > 0 for r in rep.layers.values())
    plain = dt.merge(copy.deepcopy(m))  # dt.merge does the same
    torch.testing.assert_close(run(plain, model_name), y, atol=1e-4, rtol=1e-4)
    # ... optionally re-quantized, with the rounding reported
    req, rep = Q.merge(m, requantize=True, copy=True)
    assert sum(isinstance(x, Q.QuantLinear) for x in req.modules()) == sum(
        isinstance(x, Q.QuantLinear) for x in m.modules())
    assert all(r.error > 0 for r in rep.layers.values()) and scheme in str(rep)


def test_adapter_file_same_as_fp32(tmp_path):
    for model_name in ("llama", "gpt2"):
        make = MODELS[model_name][0]
        torch.manual_seed(3)
        dt.save(dt.attach(make(), "lora", r=4), tmp_path / "f")
        torch.manual_seed(3)
        dt.save(dt.attach(Q.quantize(make(), "nf4"), "lora", r=4), tmp_path / "q")
        from safetensors.torch import load_file

        a, b = load_file(tmp_path / "f" / "adapter_model.safetensors"), load_file(tmp_path / "q" / "adapter_model.safetensors")
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        ca, cb = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in "fq")
        assert ca == cb  # fan_in_fan_out included (GPT-2's quantized c_attn is still a Conv1D)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_in_place_merge_refuses_rounding_unless_allowed(scheme):
    m = dt.attach(Q.quantize(tiny_llama(), scheme), "lora", r=4)
    train_step(m)
    y = run(m, "llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(dt.DeltaError, match=r"lossy in-place merge.*% of ‖ΔW‖"):
        dt.merge(m, unload=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(run(m, "llama"), y, atol=1e-5, rtol=0)
    with Q.lossy_merge(m) as rep:
        dt.merge(m, unload=False)
    assert rep.layers and all(r.error > 0 for r in rep.layers.values())
    rel = ((run(m, "llama") - y).norm() / y.norm()).item()
    assert 0 < rel < (0.2 if scheme == "nf4" else 0.02)


@pytest.mark.parametrize("quantized", [False, True])
def test_gradient_checkpointing(quantized):
    torch.manual_seed(0)
    m = tiny_llama()
    if quantized:
        Q.quantize(m, "nf4")
    dt.attach(m, "lora", r=4, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for k, t in dt.adapter_tensors(m, "default").items():
            t.normal_(0, 0.1)  # non-zero B so that A gets gradients too
    ids = MODELS["llama"][1]()[0]
    m.train()

    def grads():
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        return {k: t.grad.clone() for k, t in dt.adapter_tensors(m, "default").items()}

    g0 = grads()
    enable_checkpointing(m)
    assert m.model.gradient_checkpointing
    g1 = grads()
    disable_checkpointing(m)
    assert all(v.abs().sum() > 0 for v in g1.values())
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- streaming load

@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_load_quantized_streams_the_same_model(model_name, tmp_path):
    make = MODELS[model_name][0]
    make().save_pretrained(tmp_path / "m")
    for scheme in SCHEMES:
        want = run(Q.quantize(make(), scheme), model_name)
        m = dt.load_quantized(tmp_path / "m", scheme)
        assert not any(t.is_meta for t in m.parameters())
        torch.testing.assert_close(run(m, model_name), want, atol=0, rtol=0)  # identical storage
        if model_name == "gpt2":
            assert m.lm_head.weight is m.transformer.wte.weight  # ties restored
        dt.attach(m, "lora", r=2)  # and it is an ordinary quantized base
        train_step(m, model_name)


def test_load_quantized_errors(tmp_path):
    with pytest.raises(dt.DeltaError, match="not a directory or .gguf"):
        dt.load_quantized(tmp_path / "nope", "nf4")
    tiny_llama().save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "m" / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.1.mlp" not in k}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(dt.DeltaError, match="lacks"):
        dt.load_quantized(tmp_path / "m", "int8")
