"""Layers whose parent computes with their ``.weight`` instead of calling them (WavLM's attention,
Mamba's dt_proj): a wrapped adapter there never runs while merge changes the weight.  The oracle
is transformers' own modelling code: the tiny WavLM/Mamba built from configs, merged == unmerged."""
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.delta import DeltaError
from deltatune.core.direct_reads import direct_children, direct_weight_paths

import zoo


def _attach_nonzero(model):
    """LoRA with B != 0, so an adapter that never runs shows as merged != unmerged."""
    dt.attach(model, "lora")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)


class _Reads(nn.Module):
    """q's weight is used in arithmetic, k is called, v's weight only inspected."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        assert x.dtype == self.v.weight.dtype and isinstance(self.v.weight, torch.Tensor)
        return torch.nn.functional.linear(x, self.q.weight.t()) + self.k(x) + 0 * self.v.weight.shape[0]


def test_arithmetic_is_flagged_metadata_is_not():
    assert direct_children(_Reads) == frozenset({"q"})


def test_all_linear_skips_them_and_merge_equals_unmerged():
    torch.manual_seed(0)
    model, x = _Reads(), torch.randn(3, 8)
    _attach_nonzero(model)
    wrapped = {p for p, m in model.named_modules() if type(m).__name__ == "DeltaLayer"}
    assert wrapped == {"k", "v"}
    y = model(x)
    dt.merge(model)
    torch.testing.assert_close(model(x), y)


def test_naming_one_is_a_one_line_error():
    with pytest.raises(DeltaError, match=r"'q'.*uses its \.weight directly.*targets='all-linear' skips"):
        dt.attach(_Reads(), "lora", targets=["q", "k"])


@pytest.mark.parametrize("family,expected", [("wavlm", {"q_proj", "k_proj", "v_proj", "out_proj"}),
                                             ("mamba", {"dt_proj", "x_proj", "out_proj", "conv1d"})])
def test_real_families(family, expected):
    model = zoo.build(family)
    leaves = {p.rsplit(".", 1)[-1] for p in direct_weight_paths(model)}
    assert leaves == expected
    x = zoo.inputs(family)
    _attach_nonzero(model)
    wrapped = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if type(m).__name__ == "DeltaLayer"}
    assert wrapped and not wrapped & expected
    with torch.no_grad():
        y = zoo.output(family, model(**x))
        dt.merge(model)
        torch.testing.assert_close(zoo.output(family, model(**x)), y, atol=1e-5, rtol=1e-4)


def test_sparse_selection_leaves_them_out():
    model = zoo.build("wavlm")
    x = zoo.inputs("wavlm")
    batches = [dict(x, labels=torch.tensor([0, 1]))]
    sel = dt.select_sparse(model, batches, budget=200)
    assert sel and not {p.rsplit(".", 1)[-1] for p in sel} & {"q_proj", "k_proj", "v_proj", "out_proj"}


@pytest.mark.parametrize("method", ["ia3", "vera"])
def test_method_defaults_give_way_to_reachable_layers(method):
    """IA3's family defaults (k/v projections) and VeRA's (query/value) are all read directly on
    WavLM: the defaults fall back to the layers an adapter reaches, instead of refusing."""
    model = zoo.build("wavlm")
    dt.attach(model, method)
    wrapped = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if type(m).__name__ == "DeltaLayer"}
    assert "intermediate_dense" in wrapped and not wrapped & {"q_proj", "k_proj", "v_proj", "out_proj"}
