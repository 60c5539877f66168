"""The shared invariants (tests/test_invariants.py) for every method spec (tests/spec_*.py) on
a *quantized* base. Not expressible as spec entries (specs build the fp32 model themselves), so
this is a dedicated matrix: spec × {Llama, GPT-2} × {nf4, int8}, one test per combination.
The reference for every comparison is the quantized base model, not the fp32 one."""
from __future__ import annotations


import pytest
import torch

import deltatune as dt
from conftest import MODELS, run
from deltatune.quant import layers as Q
from specs import SKIP, SPECS

pytest.importorskip("bitsandbytes")
ATOL = 1e-5
# methods that train entries of W itself: quantized storage has no float W to train
INCOMPATIBLE = {"sparse"}

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def quantized(model_name, scheme):
    return Q.quantize(MODELS[model_name][0](), scheme)


def attach(model, model_name, spec, name="default", seed=0):
    method, opts, per_model = SPECS[spec]
    torch.manual_seed(seed)
    return dt.attach(model, method, name=name, **{**opts, **per_model.get(model_name, {})})


def perturb(model, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_tensors(model, name).values():
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.05)


def storage(model):
    # the quantized weight storage (biases are ordinary parameters: BitFit trains them)
    return {p: {k: v.clone() for k, v in q.state_dict().items() if k != "bias"} for p, q in Q.quantized_layers(model)}


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_invariants_on_quantized_base(spec, model_name, scheme, tmp_path):
    per_model = SPECS[spec][2]
    if model_name in per_model and per_model[model_name] is None:
        pytest.skip(f"{spec} does not apply to {model_name}")
    skip = SKIP.get(spec, set())
    model = quantized(model_name, scheme)
    if SPECS[spec][0] in INCOMPATIBLE:  # must refuse with a DeltaError, not crash or train nothing
        with pytest.raises(dt.DeltaError):
            attach(model, model_name, spec)
        return
    y_base = run(model, model_name)
    stored = storage(model)
    attach(model, model_name, spec)
    if "init" not in skip:
        torch.testing.assert_close(run(model, model_name), y_base, atol=ATOL, rtol=0)

    if "train" not in skip:
        model.train()
        tensors = dt.adapter_tensors(model, "default")
        start = {k: v.detach().clone() for k, v in tensors.items()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == {id(t) for t in tensors.values()}
        opt = torch.optim.SGD(trainable, lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            run(model, model_name).float().pow(2).mean().backward()
            opt.step()
        model.eval()
        assert any(not torch.equal(tensors[k].detach(), start[k]) for k in tensors), "no adapter tensor moved"
        after = storage(model)
        for p, sd in stored.items():
            assert all(torch.equal(after[p][k], v) for k, v in sd.items()), f"quantized storage of {p} changed"
    perturb(model)
    y = run(model, model_name)

    if "disable" not in skip:
        with dt.disabled(model):
            torch.testing.assert_close(run(model, model_name), y_base, atol=ATOL, rtol=0)
        torch.testing.assert_close(run(model, model_name), y, atol=ATOL, rtol=0)

    if "save_load" not in skip:
        dt.save(model, tmp_path / "a")
        fresh = dt.load(quantized(model_name, scheme), tmp_path / "a")
        torch.testing.assert_close(run(fresh, model_name), y, atol=ATOL, rtol=1e-5)

    if "merge" not in skip:
        try:
            merged, _ = Q.merge(model, copy=True)
        except dt.DeltaError as e:
            assert "tied" in str(e), e  # e.g. LoRA on GPT-2's wte, which is tied to lm_head
        else:
            assert not any(isinstance(m, dt.DeltaLayer) for m in merged.modules())
            torch.testing.assert_close(run(merged, model_name), y, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(run(model, model_name), y, atol=ATOL, rtol=0)

    if "switch" not in skip:
        attach(model, model_name, spec, name="second", seed=5)
        perturb(model, "second", seed=2)
        dt.activate(model, "second")
        y2 = run(model, model_name)
        assert not torch.allclose(y, y2, atol=1e-5)
        dt.delete(model, "second")
        dt.activate(model, "default")
        torch.testing.assert_close(run(model, model_name), y, atol=ATOL, rtol=0)
        dt.delete(model, "default")
        torch.testing.assert_close(run(model, model_name), y_base, atol=ATOL, rtol=0)
        assert not any(isinstance(m, dt.DeltaLayer) for m in model.modules())
