"""Adapter arithmetic against known answers: hand-computed TIES/DARE/magnitude results, exact
concatenation, SVD optimality, and a combined adapter that saves and loads like any other."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import MODELS, ids_input
from deltatune.ops.arithmetic import combine, dare_drop, elect_and_merge, low_rank, magnitude_mask


def two_loras(r=(4, 2), targets=("fc1", "fc2")):
    model = MODELS["mlp"][0]()
    for i, (name, rr) in enumerate(zip("ab", r)):
        torch.manual_seed(i)
        dt.attach(model, "lora", name=name, r=rr, alpha=2.0 * rr, targets=list(targets))
        with torch.no_grad():
            for t in dt.adapter_tensors(model, name).values():
                t.normal_(0, 0.3)
    return model


def dw(model, name, path):
    from deltatune.core.delta import get_submodule_clean

    layer = get_submodule_clean(model, path)
    return layer.deltas[name].delta_weight(layer.base_layer)


# --------------------------------------------------------------------------- the operations

def test_magnitude_mask_keeps_the_largest():
    t = torch.tensor([[0.1, -3.0], [2.0, -0.5]])
    assert magnitude_mask(t, 0.5).tolist() == [[0.0, -3.0], [2.0, 0.0]]
    assert magnitude_mask(t, 0.2).abs().sum() == 0  # int(0.8) = 0 entries kept


def test_ties_by_hand():
    t = torch.tensor([[1.0, -2.0, 3.0, 0.0],
                      [-1.0, -1.0, 1.0, 2.0],
                      [-3.0, 4.0, 0.0, 1.0]])
    w = torch.tensor([1.0, 1.0, 1.0])
    # column sums -3, 1, 4, 3 -> signs -, +, +, + ; agreeing entries averaged
    expect = [(-1.0 - 3.0) / 2, 4.0, (3.0 + 1.0) / 2, (2.0 + 1.0) / 2]
    assert elect_and_merge(t, w, "total").tolist() == expect
    # by frequency column 1 has two minus signs -> elected "-": mean(-2, -1)
    assert elect_and_merge(t, w, "frequency")[1].item() == -1.5
    w2 = torch.tensor([2.0, 1.0, 1.0])  # weights apply before the election
    assert elect_and_merge(t, w2, "total")[0].item() == pytest.approx(-2.0)


def test_dare_rescales_survivors():
    t = torch.ones(10000)
    d = dare_drop(t, 0.25, torch.Generator().manual_seed(0))
    kept = d[d != 0]
    assert torch.all(kept == 4.0)
    assert abs(len(kept) / 10000 - 0.25) < 0.02
    assert abs(d.mean().item() - 1.0) < 0.1  # unbiased in expectation


def test_low_rank_is_exact_then_optimal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g) @ torch.randn(3, 6, generator=g)  # rank 3
    b, a = low_rank(x, 3)
    torch.testing.assert_close(b @ a, x, atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(x)
    b, a = low_rank(x, 1)  # Eckart-Young: error norm = the dropped singular values
    assert (x - b @ a).norm().item() == pytest.approx(s[1:].norm().item(), rel=1e-4)


# --------------------------------------------------------------------------- on a model

def test_cat_is_exact_weighted_sum():
    model = two_loras()
    combine(model, {"a": 0.7, "b": -0.4}, name="ab", how="cat")
    for path in ("fc1", "fc2"):
        torch.testing.assert_close(dw(model, "ab", path), 0.7 * dw(model, "a", path) - 0.4 * dw(model, "b", path),
                                   atol=1e-6, rtol=0)
    assert dt.adapters(model)["ab"].r == 6


def test_svd_to_enough_rank_is_exact_and_outputs_match():
    model = two_loras()
    combine(model, {"a": 0.5, "b": 0.5}, name="s", how="svd", rank=6)
    x = ids_input()
    for path in ("fc1", "fc2"):
        torch.testing.assert_close(dw(model, "s", path), 0.5 * dw(model, "a", path) + 0.5 * dw(model, "b", path),
                                   atol=1e-5, rtol=0)
    # the function-level check: y(s) - y(base) equals the weighted ΔW applied to the same input
    combine(model, {"a": 0.5, "b": 0.5}, name="c", how="cat")
    dt.activate(model, "s")
    ys = model(x)
    dt.activate(model, "c")
    torch.testing.assert_close(ys, model(x), atol=1e-5, rtol=0)


def test_svd_lower_rank_truncates():
    model = two_loras()
    combine(model, {"a": 1.0, "b": 1.0}, name="s2", how="svd", rank=2)
    assert dt.adapters(model)["s2"].r == 2
    target = dw(model, "a", "fc1") + dw(model, "b", "fc1")
    s = torch.linalg.svdvals(target)
    err = (dw(model, "s2", "fc1") - target).norm().item()
    assert err == pytest.approx(s[2:].norm().item(), rel=1e-3)


@pytest.mark.parametrize("how", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_task_vector_methods_match_the_dense_formula(how):
    from deltatune.ops.arithmetic import DENSE

    model = two_loras()
    combine(model, {"a": 0.6, "b": 0.9}, name="m", how=how, density=0.4, rank=16, seed=5)
    # recompute the dense combination with the same seed: the rank-16 LoRA must reproduce it
    gen = torch.Generator().manual_seed(5)
    for path in ("fc1", "fc2"):
        t = torch.stack([dw(model, "a", path), dw(model, "b", path)])
        expect = DENSE[how](t, torch.tensor([0.6, 0.9]), {"density": 0.4, "majority_sign": "total", "gen": gen})
        torch.testing.assert_close(dw(model, "m", path), expect, atol=1e-5, rtol=0)
        if how != "dare_linear":
            assert (expect == 0).float().mean() > 0.2  # trimming really dropped entries


def test_linear_in_parameter_space_and_any_method():
    model = two_loras(r=(4, 4))
    combine(model, {"a": 0.25, "b": -0.75}, name="lin", how="linear")
    ta, tb, tl = (dt.adapter_tensors(model, n) for n in ("a", "b", "lin"))
    for k in tl:  # peft's rule: A takes sign(w)·√|w|, B takes √|w|
        wa, wb = (0.5, -0.75 ** 0.5) if "lora_A" in k else (0.5, 0.75 ** 0.5)
        torch.testing.assert_close(tl[k], wa * ta[k] + wb * tb[k])
    if "ia3" in dt.METHODS:  # other methods: a plain weighted sum of their tensors
        m = MODELS["mlp"][0]()
        for i, n in enumerate("xy"):
            dt.attach(m, "ia3", name=n, targets=["fc1", "fc2"], feedforward=["fc2"])
            with torch.no_grad():
                for t in dt.adapter_tensors(m, n).values():
                    t.fill_(1.0 + i)
        combine(m, {"x": 0.5, "y": 0.5}, name="xy", how="linear")
        assert all(torch.allclose(t, torch.full_like(t, 1.5)) for t in dt.adapter_tensors(m, "xy").values())


def test_combined_adapter_saves_and_loads(tmp_path):
    model = two_loras()
    combine(model, {"a": 1.0, "b": 0.5}, name="mix", how="ties", density=0.5, rank=3)
    assert dt.active_adapters(model) == ["a"]  # unchanged
    dt.activate(model, "mix")
    x = ids_input()
    y = model(x)
    dt.save(model, tmp_path / "mix", name="mix")
    fresh = MODELS["mlp"][0]()
    dt.load(fresh, tmp_path / "mix")
    torch.testing.assert_close(fresh(x), y, atol=1e-6, rtol=0)


def test_clear_errors():
    model = two_loras()
    with pytest.raises(dt.DeltaError, match="how must be"):
        combine(model, ["a", "b"], name="z", how="average")
    with pytest.raises(dt.DeltaError, match="unknown adapter"):
        combine(model, ["a", "q"], name="z")
    with pytest.raises(dt.DeltaError, match="different configs"):
        combine(model, ["a", "b"], name="z", how="linear")  # ranks 4 and 2
    with pytest.raises(dt.DeltaError, match="density"):
        combine(model, ["a", "b"], name="z", how="ties", density=0)
    dt.attach(model, "lora", name="d", dora=True, targets=["fc1"])
    with pytest.raises(dt.DeltaError, match="DoRA"):
        combine(model, ["a", "d"], name="z")
    assert "z" not in dt.adapters(model)


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("w", [-1.0, 0.5, 2.0])
def test_linear_single_adapter_scales_its_delta_by_w(method, w):
    """peft's contract: one adapter at weight w is w·ΔW (was w²·ΔW, and -1 gave +ΔW)."""
    m = MODELS["mlp"][0]()
    w0 = m.fc1.weight.detach().clone()
    opts = {"total_steps": 10} if method == "adalora" else {}
    dt.attach(m, method, name="a", targets=["fc1"], **opts)
    with torch.no_grad():
        for t in dt.adapter_tensors(m, "a").values():
            if t.is_floating_point():
                t.normal_(0, 0.3)
    combine(m, {"a": w}, name="w", how="linear")
    delta = {n: dt.merge(m, n, copy=True).fc1.weight.detach() - w0 for n in ("a", "w")}
    assert delta["a"].abs().max() > 1e-3
    torch.testing.assert_close(delta["w"], w * delta["a"], atol=1e-5, rtol=1e-4)
