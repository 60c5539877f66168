"""VeRA specifics: one A/B pair shared by all layers, regenerated from the seed, never saved."""
from __future__ import annotations

import torch

import deltatune as dt
from conftest import tiny_llama
from deltatune.core.delta import iter_delta_layers
from deltatune.methods.vera import projection
from test_invariants import perturb


def _deltas(model, name="default"):
    return [layer.deltas[name] for _, layer in iter_delta_layers(model) if name in layer.deltas]


def test_projection_is_shared_and_follows_the_seed():
    model = dt.attach(tiny_llama(), "vera", targets="all-linear", r=8, projection_prng_key=5)
    ds = _deltas(model)
    assert len(ds) == 14 and all(d.shared is ds[0].shared for d in ds)  # one pair for all layers
    a, b = projection(5, 8, 64, 64)  # largest in (down_proj: 64) and out (gate/up: 64)
    assert torch.equal(ds[0].shared.a, a) and torch.equal(ds[0].shared.b, b)
    assert not any("vera_A" in n or "shared" in n for n in model.state_dict())
    assert set(k.rsplit(".", 1)[-1] for k in dt.adapter_tensors(model, "default")) == {"vera_lambda_b", "vera_lambda_d"}


def test_the_seed_matters_and_is_saved(tmp_path):
    ids = torch.randint(0, 64, (2, 5))
    outs = []
    for seed in (0, 1):
        model = dt.attach(tiny_llama(), "vera", r=8, projection_prng_key=seed)
        perturb(model)
        outs.append(model(ids).logits)
        dt.save(model, tmp_path / str(seed))
    assert not torch.allclose(outs[0], outs[1], atol=1e-5)
    for seed in (0, 1):
        fresh = dt.load(tiny_llama(), tmp_path / str(seed))
        torch.testing.assert_close(fresh(ids).logits, outs[seed], atol=1e-5, rtol=1e-5)


def test_dtype_follows_the_adapter():
    model = dt.attach(tiny_llama(), "vera", r=8)
    model.to(torch.float64)
    perturb(model)
    ids = torch.randint(0, 64, (2, 5))
    assert model(ids).logits.dtype == torch.float64
