"""peft's own contract (tests/test_custom_models.py + testing_common.py of huggingface/peft), ported
to deltatune's verbs on zoo families × every method with its defaults.  Each test names the peft test
it ports.  Already covered elsewhere, not repeated here: only adapter params require grad, parameters
change after training, disable gives base, save/load round trip, merge_and_unload equals, forward
output finite (tests/coverage_cases.py, every family); fp16/bf16 forwards (the half-precision tests).
A method refused on a family is skipped here: the matrix checks that refusal."""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from coverage_cases import ATOL, METHODS, base_state, loss_of, options, perturb, pristine
from zoo import run, train_options

# hidden-32 models gain nothing from a second thread; on a shared machine it only spins (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

_FULL = (pytest.mark.slow, pytest.mark.matrix)
FAMILIES = {"bert": (), "llama": _FULL, "vit": _FULL, "whisper": _FULL}


def _params():
    for fam, marks in FAMILIES.items():
        for col in METHODS:
            yield pytest.param(fam, col, marks=marks, id=f"{fam}-{col}")


case = pytest.mark.parametrize("family,column", list(_params()))


def attached(family, column, name="default", seed=0, model=None):
    method, opts = options(family, column)
    model = copy.deepcopy(pristine(family)) if model is None else model
    torch.manual_seed(seed)
    try:
        dt.attach(model, method, name=name, **opts)
    except dt.DeltaError as e:
        pytest.skip(f"refused on {family}: {e}")
    perturb(model, name, seed=seed + 1)
    return model


def out(model, family):
    with torch.no_grad():
        return run(model, family)


def same(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def differ(a, b):
    return a.shape != b.shape or not torch.allclose(a, b, atol=1e-6)


def trainable_ids(model):
    return {id(p) for p in model.parameters() if p.requires_grad}


def tensor_ids(model, name):
    return {id(t) for t in dt.adapter_tensors(model, name).values() if t.is_floating_point()}


def merge_in_place(model):
    try:
        dt.merge(model, unload=False)
    except dt.DeltaError as e:
        pytest.skip(f"merge refused: {e}")


@case
def test_adapter_name_makes_no_difference(family, column):
    # peft: test_adapter_name_makes_no_difference
    a = attached(family, column, "default")
    b = attached(family, column, "other")
    same(out(b, family), out(a, family), atol=0)
    ta, tb = dt.adapter_tensors(a, "default"), dt.adapter_tensors(b, "other")
    assert [tuple(t.shape) for t in ta.values()] == [tuple(t.shape) for t in tb.values()]
    assert all(torch.equal(x, y) for x, y in zip(ta.values(), tb.values()))


@case
def test_active_adapter_switching(family, column):
    # peft: test_active_adapter, test_requires_grad_*_different_targets (set_adapter moves requires_grad)
    model = attached(family, column, "a", seed=0)
    y_a = out(model, family)
    attached(family, column, "b", seed=5, model=model)
    assert dt.active_adapters(model) == ["a"]
    same(out(model, family), y_a)
    assert trainable_ids(model) == tensor_ids(model, "a")
    dt.activate(model, "b")
    y_b = out(model, family)
    assert differ(y_a, y_b), "switching adapters did not change the output"
    assert trainable_ids(model) == tensor_ids(model, "b")
    dt.activate(model, "a")
    same(out(model, family), y_a)
    assert trainable_ids(model) == tensor_ids(model, "a")


@case
def test_delete_inactive_adapter_and_clean_up(family, column):
    # peft: test_delete_inactive_adapter, test_delete_adapter_properly_cleans_up_after_itself,
    # test_unload_adapter (removing every adapter without merging gives back the base model)
    base = pristine(family)
    y_base = out(base, family)
    model = attached(family, column, "a", seed=0)
    attached(family, column, "b", seed=5, model=model)
    dt.activate(model, "b")
    y_b = out(model, family)
    dt.delete(model, "a")
    assert dt.active_adapters(model) == ["b"] and list(dt.adapters(model)) == ["b"]
    same(out(model, family), y_b)
    assert trainable_ids(model) == tensor_ids(model, "b")
    dt.delete(model, "b")
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]
    assert list(model.state_dict()) == list(base.state_dict())
    assert not any(isinstance(m, dt.DeltaLayer) for m in model.modules())
    same(out(model, family), y_base)


@case
def test_delete_unknown_adapter_raises(family, column):
    # peft: test_delete_unknown_adapter_raises
    model = attached(family, column)
    with pytest.raises(dt.DeltaError, match="no adapter named 'nope'"):
        dt.delete(model, "nope")


@case
def test_duplicate_name_is_refused_without_mutation(family, column):
    # peft: test_add_adapter_rejects_duplicate_name_without_mutation
    model = attached(family, column)
    y, names, ids = out(model, family), [n for n, _ in model.named_modules()], trainable_ids(model)
    method, opts = options(family, column)
    with pytest.raises(dt.DeltaError, match="already has an adapter named 'default'"):
        dt.attach(model, method, **opts)
    assert [n for n, _ in model.named_modules()] == names and trainable_ids(model) == ids
    same(out(model, family), y, atol=0)


@case
def test_delete_merged_adapter_raises_without_mutation(family, column):
    # peft: test_delete_merged_adapter_raises_without_mutation
    model = attached(family, column)
    y = out(model, family)
    merge_in_place(model)
    merged = out(model, family)
    with pytest.raises(dt.DeltaError, match="merged"):
        dt.delete(model, "default")
    same(out(model, family), merged, atol=0)
    dt.unmerge(model)
    same(out(model, family), y)


@case
def test_disable_adapters_with_merging(family, column):
    # peft: test_disable_adapters_with_merging
    y_base = out(pristine(family), family)
    model = attached(family, column)
    y = out(model, family)
    merge_in_place(model)
    same(out(model, family), y, atol=1e-4)
    with dt.disabled(model):
        same(out(model, family), y_base, atol=1e-4)
    same(out(model, family), y, atol=1e-4)


@case
def test_merge_is_idempotent(family, column):
    # peft: test_merge_layers_is_idempotent (a second merge must not fold the delta in twice)
    model = attached(family, column)
    before, y = base_state(model), out(model, family)
    merge_in_place(model)
    once = out(model, family)
    try:
        dt.merge(model, unload=False)
    except dt.DeltaError as e:
        assert "\n" not in str(e)
    same(out(model, family), once, atol=1e-6)
    dt.unmerge(model)
    for k, v in base_state(model).items():
        same(v, before[k])
    same(out(model, family), y)


@case
def test_safe_merge_refuses_nan_and_changes_nothing(family, column):
    # peft: test_safe_merge, _test_merge_layers_nan (safe_merge raises on NaN, base left intact)
    model = attached(family, column)
    tensors = {k: t for k, t in dt.adapter_tensors(model, "default").items() if t.is_floating_point()}
    with torch.no_grad():
        next(iter(tensors.values())).view(-1)[0] = float("nan")
    before = base_state(model)
    with pytest.raises(dt.DeltaError):
        dt.merge(model, unload=False)
    after = base_state(model)
    assert list(after) == list(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0, equal_nan=True, msg=f"{k} changed")
    assert not any(layer.merged for _, layer in dt.core.iter_delta_layers(model))


@case
def test_disabled_context_restores_state_after_an_error(family, column):
    # peft: test_disable_adapters_exiting_context_restores_previous_state / _irregular_state
    y_base = out(pristine(family), family)
    model = attached(family, column)
    y = out(model, family)
    with pytest.raises(RuntimeError, match="inside"):
        with dt.disabled(model):
            with dt.disabled(model):  # nested: the inner exit must not re-enable the adapter
                pass
            same(out(model, family), y_base)
            raise RuntimeError("inside")
    same(out(model, family), y)
    assert dt.active_adapters(model) == ["default"]


@case
def test_load_multiple_adapters(family, column, tmp_path):
    # peft: test_load_multiple_adapters
    model = attached(family, column)
    y = out(model, family)
    dt.save(model, tmp_path / "a")
    fresh = copy.deepcopy(pristine(family))
    dt.load(fresh, tmp_path / "a", name="one")
    dt.load(fresh, tmp_path / "a", name="two")
    assert set(dt.adapters(fresh)) == {"one", "two"}
    for n in ("one", "two"):
        dt.activate(fresh, n)
        same(out(fresh, family), y)


@case
def test_save_selected_adapter(family, column, tmp_path):
    # peft: test_save_pretrained_selected_adapters
    model = attached(family, column, "a", seed=0)
    attached(family, column, "b", seed=5, model=model)
    dt.activate(model, "b")
    y_b = out(model, family)
    dt.save(model, tmp_path / "b", name="b")
    fresh = copy.deepcopy(pristine(family))
    dt.load(fresh, tmp_path / "b")
    same(out(fresh, family), y_b)


@case
def test_parameters_after_loading_model(family, column, tmp_path):
    # peft: test_parameters_after_loading_model (a loaded adapter trains on; the base stays put)
    model = attached(family, column)
    dt.save(model, tmp_path / "a")
    fresh = copy.deepcopy(pristine(family))
    dt.load(fresh, tmp_path / "a")
    assert not any(p.requires_grad for p in fresh.parameters()), "a loaded adapter is frozen by default"
    fresh = copy.deepcopy(pristine(family))
    dt.load(fresh, tmp_path / "a", trainable=True)
    tensors = dt.adapter_tensors(fresh, "default")
    assert trainable_ids(fresh) == tensor_ids(fresh, "default")
    own = {id(t) for t in tensors.values()}
    selected = {k for k, v in fresh.state_dict(keep_vars=True).items() if id(v) in own}
    before = base_state(fresh)
    start = {k: v.detach().clone() for k, v in tensors.items()}
    opt = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.5)
    loss_of(run(fresh, family, **train_options(family))).backward()
    opt.step()
    assert any(not torch.equal(tensors[k].detach(), start[k]) for k in tensors)
    for k, v in base_state(fresh).items():
        if k not in selected:
            assert torch.equal(v, before[k]), f"base tensor {k} changed"
