"""Adapters of different methods on one model at once (LoRA + BitFit + IA3 + VeRA + adapters):
activated together, trained together, saved/loaded separately, merged exactly, or refused."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import tiny_bert, tiny_llama
from test_invariants import base_state, perturb

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def out(model):
    o = model(IDS)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _stack(make, bitfit_opts):
    model = make()
    dt.attach(model, "lora", name="lora", r=4)
    dt.attach(model, "bitfit", name="bitfit", **bitfit_opts)
    dt.attach(model, "ia3", name="ia3")
    dt.attach(model, "vera", name="vera", r=8)
    for i, n in enumerate(["lora", "bitfit", "ia3", "vera"]):
        perturb(model, n, seed=i + 1)
    return model


@pytest.mark.parametrize("make,bitfit_opts", [(tiny_llama, {"add_missing": True}), (tiny_bert, {})])
def test_lora_bitfit_ia3_vera_together(make, bitfit_opts, tmp_path):
    names = ["lora", "bitfit", "ia3", "vera"]
    y_base = out(make())
    model = _stack(make, bitfit_opts)
    singles = {}
    for n in names:
        dt.activate(model, n)
        singles[n] = out(model)
    dt.activate(model, names)
    y = out(model)
    for n in names:
        assert not torch.allclose(y, singles[n], atol=1e-4), f"{n} alone equals the stack"
    # all four train together, nothing else does
    own = {id(t) for n in names for t in dt.adapter_tensors(model, n).values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == own
    with dt.disabled(model):
        torch.testing.assert_close(out(model), y_base, atol=1e-5, rtol=0)
    # saved one by one, loaded together onto a fresh base: same output
    for n in names:
        dt.save(model, tmp_path / n, name=n)
    fresh = make()
    for n in names:
        dt.load(fresh, tmp_path / n, name=n)
    dt.activate(fresh, names)
    torch.testing.assert_close(out(fresh), y, atol=1e-5, rtol=1e-5)
    # merging the stack is exact, unmerge restores, merge+unload gives a plain model
    before = base_state(model)
    dt.merge(model, unload=False)
    torch.testing.assert_close(out(model), y, atol=1e-4, rtol=1e-4)
    dt.unmerge(model)
    for k, v in base_state(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=1e-5, msg=k)
    plain = dt.merge(model, copy=True)
    assert type(plain) is type(make()) and not any(isinstance(m, dt.DeltaLayer) for m in plain.modules())
    torch.testing.assert_close(out(plain), y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("order", [["lora", "ia3"], ["ia3", "lora"]])
def test_merge_follows_forward_order_whatever_the_names_order(order):
    model = tiny_bert()
    dt.attach(model, "lora", name="lora", targets=["value"])
    dt.attach(model, "ia3", name="ia3", targets=["value"], feedforward=[])
    perturb(model, "lora", 1)
    perturb(model, "ia3", 2)
    dt.activate(model, order)
    y = out(model)
    merged = dt.merge(model, list(reversed(order)), copy=True)
    torch.testing.assert_close(out(merged), y, atol=1e-5, rtol=1e-5)


def test_partial_merge_that_would_reorder_is_refused():
    model = tiny_bert()
    dt.attach(model, "lora", name="lora", targets=["value"])
    dt.attach(model, "ia3", name="ia3", targets=["value"], feedforward=[])
    perturb(model, "lora", 1)
    perturb(model, "ia3", 2)
    dt.activate(model, ["lora", "ia3"])  # y = l ⊙ (W x + B A x)
    y = out(model)
    with pytest.raises(dt.DeltaError, match="'ia3' runs after 'lora', which would stay unmerged"):
        dt.merge(model, ["ia3"], unload=False)
    assert all(not layer.merged for _, layer in dt.core.iter_delta_layers(model))
    dt.merge(model, ["lora"], unload=False)  # a prefix of the forward order: exact
    torch.testing.assert_close(out(model), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("second", [("lora", {}), ("vera", {}), ("adalora", {"total_steps": 10})])
def test_additive_deltas_merge_alone_while_another_stays(second):
    """peft merges one adapter while another active one sits on the same layer: additive deltas
    (y + f(x)) commute, so merging the second alone is exact."""
    method, opts = second
    model = tiny_bert()
    dt.attach(model, "lora", name="a", targets=["value"])
    dt.attach(model, method, name="b", targets=["value"], **opts)
    perturb(model, "a", 1)
    perturb(model, "b", 2)
    dt.activate(model, ["a", "b"])
    y = out(model)
    dt.merge(model, ["b"], unload=False)
    torch.testing.assert_close(out(model), y, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    torch.testing.assert_close(out(model), y, atol=1e-5, rtol=1e-5)


def test_input_scaling_merges_last_and_only_with_the_rest():
    model = tiny_llama()
    dt.attach(model, "ia3", name="ia3", targets=["down_proj"], feedforward=["down_proj"])
    dt.attach(model, "lora", name="lora", targets=["down_proj"])
    perturb(model, "ia3", 1)
    perturb(model, "lora", 2)
    dt.activate(model, ["ia3", "lora"])  # y = (W + BA)(l ⊙ x): both see the scaled input
    y = out(model)
    with pytest.raises(dt.DeltaError, match="scales the layer's input"):
        dt.merge(model, ["ia3"], unload=False)
    merged = dt.merge(model, copy=True)
    torch.testing.assert_close(out(merged), y, atol=1e-5, rtol=1e-5)


def test_adapter_with_mergeable_ones():
    model = tiny_llama()
    dt.attach(model, "lora", name="lora", targets=["o_proj"])
    dt.attach(model, "adapter", name="adapter")  # houlsby: on o_proj's output and the MLP's
    perturb(model, "lora", 1)
    perturb(model, "adapter", 2)
    dt.activate(model, ["lora", "adapter"])
    y = out(model)
    with pytest.raises(dt.DeltaError, match="'adapter' \\(adapter\\) cannot be merged.*non-linearity"):
        dt.merge(model)
    merged = dt.merge(model, ["lora"], unload=False)  # LoRA folds in, the adapter stays on top
    torch.testing.assert_close(out(merged), y, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    dt.activate(model, ["adapter", "lora"])  # now the adapter sees o_proj's bare output first
    with pytest.raises(dt.DeltaError, match="'lora' runs after 'adapter'"):
        dt.merge(model, ["lora"], unload=False)


def test_dora_must_come_first_on_its_layer():
    model = tiny_llama()
    dt.attach(model, "ia3", name="ia3", targets=["v_proj"], feedforward=[])
    dt.attach(model, "lora", name="dora", targets=["v_proj"], dora=True)
    perturb(model, "ia3", 1)
    perturb(model, "dora", 2)
    dt.activate(model, ["ia3", "dora"])
    with pytest.raises(dt.DeltaError, match="DoRA adapter 'dora'"):
        dt.merge(model, copy=True)
    dt.activate(model, ["dora", "ia3"])
    y = out(model)
    torch.testing.assert_close(out(dt.merge(model, copy=True)), y, atol=1e-5, rtol=1e-5)
