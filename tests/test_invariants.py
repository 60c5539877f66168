"""Invariants every method must keep, over methods × tiny models (an MLP, a conv net, Llama,
BERT, GPT-2): unchanged at init, only delta tensors train, save/load reproduces outputs,
merged ≡ unmerged, unmerge restores the base, disabled ≡ base, adapters switch, delete restores."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import MODELS, run
from specs import SKIP, SPECS

ATOL = 1e-5


def build(model_name, spec, name="default", model=None, seed=0):
    method, opts, per_model = SPECS[spec]
    if model is None:
        model = MODELS[model_name][0]()
    if model_name in per_model and per_model[model_name] is None:
        pytest.skip(f"{spec} does not apply to {model_name}")
    torch.manual_seed(seed)
    dt.attach(model, method, name=name, **{**opts, **per_model.get(model_name, {})})
    return model


def perturb(model, name="default", seed=1):
    """Give the adapter non-trivial values (zero-init B would make many checks vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_tensors(model, name).values():
            if t.is_floating_point():  # integer tensors (sparse positions) are structure, not values
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.05)


def base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".deltas." not in k}


@pytest.fixture(params=list(SPECS))
def spec(request):
    return request.param


def skip_if(spec, invariant):
    if invariant in SKIP.get(spec, set()):
        pytest.skip(f"{spec} does not promise '{invariant}'")


def test_unchanged_at_init(model_name, spec):
    skip_if(spec, "init")
    base = MODELS[model_name][0]()
    y0 = run(base, model_name)
    model = build(model_name, spec, model=base)
    torch.testing.assert_close(run(model, model_name), y0, atol=ATOL, rtol=0)


def test_only_delta_tensors_train(model_name, spec):
    skip_if(spec, "train")
    model = build(model_name, spec)
    model.train()
    before = base_state(model)
    tensors = dt.adapter_tensors(model, "default")
    start = {k: v.detach().clone() for k, v in tensors.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(t) for t in tensors.values() if t.is_floating_point()}
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):  # two steps: B moves on step 1, A on step 2
        opt.zero_grad()
        out = run(model, model_name).float()  # feature-weighted: a LayerNorm output's mean square is ~1
        (out.pow(2) * torch.linspace(0.5, 1.5, out.shape[-1])).mean().backward()
        opt.step()
    after = base_state(model)
    own = {id(t) for t in tensors.values()}  # selectors (BitFit, ln) train tensors the model has
    selected = {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in own}
    for k, v in before.items():
        if ".deltas." in k or k in selected:
            continue
        torch.testing.assert_close(after[k], v, atol=0, rtol=0, msg=f"base tensor {k} changed")
    assert any(not torch.equal(tensors[k].detach(), start[k]) for k in tensors), "no adapter tensor moved"


def test_save_load_round_trip(model_name, spec, tmp_path):
    skip_if(spec, "save_load")
    model = build(model_name, spec)
    perturb(model)
    y = run(model, model_name)
    dt.save(model, tmp_path / "a")
    fresh = MODELS[model_name][0]()
    dt.load(fresh, tmp_path / "a")
    torch.testing.assert_close(run(fresh, model_name), y, atol=ATOL, rtol=1e-5)


def test_merge_unmerge_disable(model_name, spec):
    skip_if(spec, "merge")
    base = MODELS[model_name][0]()
    y_base = run(base, model_name)
    model = build(model_name, spec, model=base)
    perturb(model)
    y = run(model, model_name)
    assert not torch.allclose(y, y_base, atol=1e-4), "perturbed adapter should change the output"
    with dt.disabled(model):
        torch.testing.assert_close(run(model, model_name), y_base, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(model, model_name), y, atol=ATOL, rtol=0)
    before = base_state(model)
    if spec == "lora_embedding" and model_name == "gpt2":  # wte is tied to lm_head
        with pytest.raises(dt.DeltaError, match="tied"):
            dt.merge(model, unload=False)
        return
    dt.merge(model, unload=False)
    torch.testing.assert_close(run(model, model_name), y, atol=1e-4, rtol=1e-4)
    dt.unmerge(model)
    for k, v in base_state(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=1e-5, msg=f"unmerge did not restore {k}")
    torch.testing.assert_close(run(model, model_name), y, atol=ATOL, rtol=1e-5)
    merged = dt.merge(model, copy=True)
    assert type(merged) is type(base)
    assert not any(isinstance(m, dt.DeltaLayer) for m in merged.modules())
    torch.testing.assert_close(run(merged, model_name), y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(run(model, model_name), y, atol=ATOL, rtol=0)  # copy left model alone


def test_disabled_is_base(model_name, spec):
    skip_if(spec, "disable")
    base = MODELS[model_name][0]()
    y_base = run(base, model_name)
    model = build(model_name, spec, model=base)
    perturb(model)
    y = run(model, model_name)
    with dt.disabled(model):
        torch.testing.assert_close(run(model, model_name), y_base, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(model, model_name), y, atol=ATOL, rtol=0)


def test_two_adapters_switch_and_delete(model_name, spec):
    skip_if(spec, "switch")
    base = MODELS[model_name][0]()
    y_base = run(base, model_name)
    names_before = [n for n, _ in base.named_modules()]
    model = build(model_name, spec, model=base)
    build(model_name, spec, name="second", model=model, seed=5)
    perturb(model, "default", seed=1)
    perturb(model, "second", seed=2)
    assert dt.active_adapters(model) == ["default"]
    y1 = run(model, model_name)
    dt.activate(model, "second")
    y2 = run(model, model_name)
    assert not torch.allclose(y1, y2, atol=1e-5)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(t) for t in dt.adapter_tensors(model, "second").values() if t.is_floating_point()}
    with pytest.warns(UserWarning, match="'second' was active and is now deleted"):
        dt.delete(model, "second")  # peft's rule: the adapter left becomes active
    assert dt.active_adapters(model) == ["default"]
    torch.testing.assert_close(run(model, model_name), y1, atol=ATOL, rtol=0)
    with dt.disabled(model):
        torch.testing.assert_close(run(model, model_name), y_base, atol=ATOL, rtol=0)
    dt.delete(model, "default")
    assert [n for n, _ in model.named_modules()] == names_before
