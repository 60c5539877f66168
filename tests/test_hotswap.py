"""Hot-swap: weights replaced in place (same tensors), outputs equal a fresh load, nothing changes on
a mismatch, and a torch.compile-d model gives the new outputs without recompiling."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import MODELS, ids_input
from deltatune.ops.hotswap import hot_swap


def lora_mlp(seed, **opts):
    model = MODELS["mlp"][0]()
    torch.manual_seed(seed)
    dt.attach(model, "lora", name="a", targets=["fc1", "fc2"], **opts)
    with torch.no_grad():
        for t in dt.adapter_tensors(model, "a").values():
            t.normal_(0, 0.3)
    return model


@pytest.fixture
def saved(tmp_path):
    """Two adapters of the same shape, saved: the one to serve and its replacement."""
    dt.save(lora_mlp(1), tmp_path / "one", name="a")
    dt.save(lora_mlp(2), tmp_path / "two", name="a")
    dt.save(lora_mlp(3, alpha=5.0), tmp_path / "alpha5", name="a")
    dt.save(lora_mlp(4, r=2), tmp_path / "r2", name="a")
    return tmp_path


def reference(path):
    m = MODELS["mlp"][0]()
    dt.load(m, path, name="a")
    return m(ids_input())


def test_swap_in_place_equals_fresh_load(saved):
    model = MODELS["mlp"][0]()
    dt.load(model, saved / "one", name="a")
    ptrs = {k: (id(t), t.data_ptr()) for k, t in dt.adapter_tensors(model, "a").items()}
    hot_swap(model, "a", saved / "two")
    assert {k: (id(t), t.data_ptr()) for k, t in dt.adapter_tensors(model, "a").items()} == ptrs
    torch.testing.assert_close(model(ids_input()), reference(saved / "two"), atol=0, rtol=0)
    # from a tensor dict too (keys with peft's prefix)
    from deltatune.storage.adapter import read_adapter_dir

    tensors = read_adapter_dir(saved / "one")[0]
    hot_swap(model, "a", {"base_model.model." + k: v for k, v in tensors.items()})
    torch.testing.assert_close(model(ids_input()), reference(saved / "one"), atol=0, rtol=0)


def test_other_alpha_is_folded_into_b(saved):
    model = MODELS["mlp"][0]()
    dt.load(model, saved / "one", name="a")
    scales = [layer.deltas["a"].scaling for _, layer in dt.core.iter_delta_layers(model)]
    hot_swap(model, "a", saved / "alpha5")
    assert [layer.deltas["a"].scaling for _, layer in dt.core.iter_delta_layers(model)] == scales
    torch.testing.assert_close(model(ids_input()), reference(saved / "alpha5"), atol=1e-6, rtol=1e-5)


def test_mismatch_changes_nothing(saved):
    model = MODELS["mlp"][0]()
    dt.load(model, saved / "one", name="a")
    y = model(ids_input())
    with pytest.raises(dt.DeltaError, match="another config"):
        hot_swap(model, "a", saved / "r2")
    bad = {k: v[..., :1] for k, v in dt.adapter_tensors(model, "a").items()}
    with pytest.raises(dt.DeltaError, match="do not fit"):
        hot_swap(model, "a", bad)
    with pytest.raises(dt.DeltaError, match="no adapter named"):
        hot_swap(model, "zz", saved / "two")
    torch.testing.assert_close(model(ids_input()), y, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_sees_new_weights_without_recompiling(saved, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = MODELS["mlp"][0]()
    dt.load(model, saved / "one", name="a")
    cnt = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=cnt)
    x = ids_input()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(saved / "one"), atol=1e-6, rtol=1e-5)
        frames = cnt.frame_count
        assert frames >= 1
        hot_swap(model, "a", saved / "two")
        torch.testing.assert_close(compiled(x), reference(saved / "two"), atol=1e-6, rtol=1e-5)
        hot_swap(model, "a", saved / "alpha5")
        torch.testing.assert_close(compiled(x), reference(saved / "alpha5"), atol=1e-6, rtol=1e-5)
    assert cnt.frame_count == frames, "hot-swap caused a recompilation"
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_model_without_recompiling(saved):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = MODELS["mlp"][0]()
    dt.load(model, saved / "one", name="a")
    compiled = torch.compile(model)
    x = ids_input()
    with torch.no_grad():
        compiled(x)
        before = counters["stats"]["unique_graphs"]
        hot_swap(model, "a", saved / "two")
        torch.testing.assert_close(compiled(x), reference(saved / "two"), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == before
    torch._dynamo.reset()
