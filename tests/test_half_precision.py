"""Half-precision bases: {fp32, fp16, bf16} × every method spec × the tiny models (Linear: MLP/Llama/
BERT, Conv1d/Conv2d: conv net, Embedding: ``lora_embedding``, GPT-2's Conv1D: gpt2).

peft's ``autocast_adapter_dtype`` contract, which deltatune follows (``dtypes.adapter_dtype``):
* an adapter's trainable tensors are float32 on an fp16/bf16 base (fp16 Adam gives NaN from a zero
  gradient - its eps underflows - and bf16 cannot hold a 1e-4 step of a value near 1);
* every wrapped layer answers in its input's dtype, so the next (half) layer runs;
* ``autocast_adapter_dtype=False`` keeps the adapter in the base's dtype, and saving/loading keeps
  whichever dtype the adapter has (the manifest records it).
"""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from conftest import MODELS
from deltatune.core.delta import DeltaLayer
from specs import SKIP, SPECS
from test_invariants import perturb

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# merged vs unmerged, relative to max|y|: merging rounds W + ΔW to the base dtype once per layer and
# the error grows through the layers; measured worst case over the matrix (perturbed adapters):
# 3 eps in fp16, 2.5 eps in bf16 (lora_rslora_dropout on Llama / GPT-2), 9e-7 in fp32
MERGE_RTOL = {torch.float32: 1e-5, torch.float16: 8 * 2.0 ** -10, torch.bfloat16: 8 * 2.0 ** -7}
UNUSED = {"bert": ("pooler.",)}  # BertModel's pooler does not feed last_hidden_state: no gradient


def _inputs(model_name, dtype):
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in MODELS[model_name][1]())


def _out(model, model_name, dtype):
    return MODELS[model_name][2](model(*_inputs(model_name, dtype)))


@torch.no_grad()
def _eval(model, model_name, dtype):
    return _out(model, model_name, dtype)


def _options(spec, model_name, dtype):
    method, opts, per_model = SPECS[spec]
    if model_name in per_model and per_model[model_name] is None:
        pytest.skip(f"{spec} does not apply to {model_name}")
    extra = dict(per_model.get(model_name, {}))
    if "batches" in extra:  # sparse selection: its batch must have the model's dtype too
        extra["batches"] = [_inputs(model_name, dtype)]
    return method, {**opts, **extra}


def build(spec, model_name, dtype, **kw):
    method, opts = _options(spec, model_name, dtype)
    model = MODELS[model_name][0]().to(dtype)
    torch.manual_seed(0)
    return dt.attach(model, method, **opts, **kw)


def _layer_dtypes(model) -> tuple[set, list]:
    """(set filled with the output dtypes of every wrapped layer on the next forward, hook handles)."""
    seen = set()

    def hook(mod, args, out):
        y = out[0] if isinstance(out, tuple) else out
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            seen.add(y.dtype)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DeltaLayer)]
    return seen, handles


def _train(model, model_name, dtype, steps=2, lr=1e-4):
    """Adam steps on a fixed random projection of the output (O(1) gradients).  Two steps: a
    zero-initialised factor (LoRA's B, AdaLoRA's Λ, VeRA's λ_b) moves on the first, its partner on
    the second."""
    model.train()
    tensors = dt.adapter_tensors(model, "default")
    params = [t for t in tensors.values() if t.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        opt.zero_grad()
        out = _out(model, model_name, dtype).float()
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        opt.step()
    model.eval()
    return tensors


def _torch_refuses(e: Exception) -> None:
    """fp16/bf16 kernels missing on this CPU build: skip, naming torch's own reason."""
    if "not implemented for" in str(e):
        pytest.skip(f"torch on this CPU: {e}")
    raise e


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("spec", list(SPECS))
def test_trains_saves_merges_in_dtype(spec, model_name, dtype_name, tmp_path):
    dtype = DTYPES[dtype_name]
    try:
        model = build(spec, model_name, dtype)
        want = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # peft's rule
        tensors = dt.adapter_tensors(model, "default")
        assert {str(t.dtype) for t in tensors.values() if t.is_floating_point()} == {str(want)}

        start = {k: t.detach().clone() for k, t in tensors.items()}
        _train(model, model_name, dtype)
    except (RuntimeError, NotImplementedError) as e:
        _torch_refuses(e)
    used = {k: t for k, t in tensors.items() if t.requires_grad and not k.startswith(UNUSED.get(model_name, ()))}
    still = sorted(k for k, t in used.items() if torch.equal(t.detach(), start[k]))
    assert not still, f"{spec} on {dtype_name} {model_name}: did not move in 2 Adam steps at lr 1e-4: {still[:4]}"
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    assert not bad, f"non-finite adapter tensors after training: {bad[:4]}"

    seen, handles = _layer_dtypes(model)
    y = _eval(model, model_name, dtype)
    for h in handles:
        h.remove()
    assert y.dtype == dtype and seen <= {dtype}, f"output {y.dtype}, wrapped layers gave {seen}"
    assert torch.isfinite(y).all()

    perturb(model)  # a visible adapter from here on: 2 steps at lr 1e-4 barely change the output
    y = _eval(model, model_name, dtype)
    # save/load: the same tensors in the same dtype, so the same outputs
    dt.save(model, tmp_path / "a")
    fresh = dt.load(MODELS[model_name][0]().to(dtype), tmp_path / "a")
    loaded = dt.adapter_tensors(fresh, "default")
    assert {t.dtype for t in loaded.values()} == {t.dtype for t in tensors.values()}  # prefix: MLP folded on save
    # exact but for PiSSA, saved as the single rank-2r product [B, −B₀][A; A₀]: rounding differs by
    # one half-precision ulp of the output, a few fp32 ulps grown through the layers (test_invariants: 1e-5)
    tol = max(torch.finfo(dtype).eps, 1e-5) * float(y.abs().max())
    torch.testing.assert_close(_eval(fresh, model_name, dtype), y, atol=tol, rtol=0)

    if "merge" in SKIP.get(spec, set()) or (spec == "lora_embedding" and model_name == "gpt2"):
        return  # not mergeable (bottleneck adapters, prompts), or tied to lm_head (test_invariants)
    merged = dt.merge(model, copy=True)
    y_merged = _eval(merged, model_name, dtype)
    assert y_merged.dtype == dtype
    err = float((y_merged.float() - y.float()).abs().max() / y.float().abs().max())
    assert err <= MERGE_RTOL[dtype], f"merged differs from unmerged by {err:.2e} of max|y| in {dtype_name}"


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_autocast_off_keeps_the_base_dtype(spec, dtype_name, tmp_path):
    # gpt2 covers Linear-like Conv1D, Embedding (lora_embedding) and every prompt method; the
    # conv net covers the specs that skip gpt2
    dtype = DTYPES[dtype_name]
    model_name = "gpt2" if SPECS[spec][2].get("gpt2", {}) is not None else "conv"
    model = build(spec, model_name, dtype, autocast_adapter_dtype=False)
    tensors = dt.adapter_tensors(model, "default")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {dtype}
    assert _eval(model, model_name, dtype).dtype == dtype
    dt.save(model, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "deltatune.json").read_text())
    assert manifest["config"]["autocast_adapter_dtype"] is False
    assert manifest["dtypes"] == {"base": str(dtype).removeprefix("torch."),
                                  "adapter": [str(dtype).removeprefix("torch.")]}
    fresh = dt.load(MODELS[model_name][0]().to(dtype), tmp_path / "a")
    assert {t.dtype for t in dt.adapter_tensors(fresh, "default").values() if t.is_floating_point()} == {dtype}
    # the caller may still ask for float32 masters when resuming training (peft's load option)
    up = dt.load(MODELS[model_name][0]().to(dtype), tmp_path / "a", autocast_adapter_dtype=True, trainable=True)
    assert {t.dtype for t in dt.adapter_tensors(up, "default").values() if t.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit", "ln", "prompt", "adapter"])
def test_head_copy_is_float32_and_answers_in_the_base_dtype(method, dtype_name, tmp_path):
    # modules_to_save ("auto": BERT's classifier) is a full trainable copy: float32 like any adapter
    # tensor, its output cast back so the logits keep the model's dtype
    from conftest import ids_input, tiny_bert_cls

    dtype = DTYPES[dtype_name]
    model = dt.attach(tiny_bert_cls().to(dtype), method)
    tensors = dt.adapter_tensors(model, "default")
    assert tensors["classifier.weight"].dtype == torch.float32
    ids = ids_input(vocab=64)
    start = {k: t.detach().clone() for k, t in tensors.items()}
    model.train()
    opt = torch.optim.Adam([t for t in tensors.values() if t.requires_grad], lr=1e-4)
    for _ in range(2):
        opt.zero_grad()
        model(ids).logits.float().sum().backward()
        opt.step()
    model.eval()
    still = sorted(k for k, t in tensors.items() if torch.equal(t.detach(), start[k]))
    assert not still and all(torch.isfinite(t).all() for t in tensors.values()), still[:4]
    with torch.no_grad():
        y = model(ids).logits
    assert y.dtype == dtype
    dt.save(model, tmp_path / "a")
    fresh = dt.load(tiny_bert_cls().to(dtype), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, y, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft → transformers
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("case", ["llama-all-dora", "gpt2-conv1d-rslora", "mlp-embedding", "conv", "conv-dora"])
def test_same_dtypes_and_outputs_as_peft(case, dtype_name, tmp_path):
    # peft on the same half base (autocast_adapter_dtype=True, its default): same adapter dtypes, and
    # its file gives the same outputs here
    peft = pytest.importorskip("peft")
    from test_peft_compat import CASES

    dtype = DTYPES[dtype_name]
    model_name, opts = CASES[case]
    o = dict(opts)
    kw = dict(target_modules=o.pop("targets"), r=o.pop("r", 8), lora_alpha=o.pop("alpha", 16),
              use_dora=o.pop("dora", False), use_rslora=o.pop("rslora", False),
              modules_to_save=o.pop("modules_to_save", None), fan_in_fan_out=model_name == "gpt2")
    torch.manual_seed(0)
    pm = peft.get_peft_model(MODELS[model_name][0]().to(dtype), peft.LoraConfig(**kw)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    # deliberate difference: peft leaves a modules_to_save copy in the base dtype (Adam on it in fp16
    # is the NaN this rule avoids); deltatune makes it float32 like every other adapter tensor
    theirs = {p.dtype for n, p in pm.named_parameters() if p.requires_grad and "modules_to_save" not in n}
    y = _eval(pm, model_name, dtype)
    pm.save_pretrained(str(tmp_path))
    model = dt.load(MODELS[model_name][0]().to(dtype), tmp_path)
    ours = {t.dtype for k, t in dt.adapter_tensors(model, "default").items() if ".lora_" in k}
    assert ours == theirs, f"adapter dtypes: peft {theirs}, deltatune {ours}"
    y_ours = _eval(model, model_name, dtype)
    assert y_ours.dtype == y.dtype == dtype
    err = float((y_ours.float() - y.float()).abs().max() / y.float().abs().max())
    assert err <= 2 * torch.finfo(dtype).eps, f"{err:.2e} of max|y| from peft's output"
