"""IA3 specifics: peft's vector layout, conv channel scaling (grouped/depthwise included) merging
exactly, and unmerge staying exact when a vector entry is zero."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import tiny_gpt2, tiny_llama
from deltatune.core.delta import iter_delta_layers


def test_defaults_and_shapes_follow_peft():
    t = dt.adapter_tensors(dt.attach(tiny_llama(), "ia3"), "default")
    assert t["model.layers.0.self_attn.k_proj.ia3_l"].shape == (16, 1)  # (out, 1)
    assert t["model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 64)  # feedforward: (1, in)
    assert len(t) == 6
    t = dt.adapter_tensors(dt.attach(tiny_gpt2(), "ia3"), "default")
    assert t["transformer.h.0.attn.c_attn.ia3_l"].shape == (96, 1)  # Conv1D: out = 3·hidden
    assert t["transformer.h.0.mlp.c_proj.ia3_l"].shape == (1, 128)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.gc = nn.Conv2d(8, 6, 3, padding=1, groups=2)  # grouped

    def forward(self, x):
        return self.gc(torch.relu(self.dw(torch.relu(self.pw(x)))))


@pytest.mark.parametrize("ff", [[], ["dw", "gc"], ["pw", "dw", "gc"]])
def test_conv_channels_merge_exactly(ff):
    torch.manual_seed(0)
    model = Convs()
    dt.attach(model, "ia3", targets=["pw", "dw", "gc"], feedforward=ff)
    with torch.no_grad():
        for t in dt.adapter_tensors(model, "default").values():
            t.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 5, 5)
    y = model(x)
    torch.testing.assert_close(dt.merge(model, copy=True)(x), y, atol=1e-5, rtol=1e-5)


def test_unmerge_with_a_zero_entry_restores_the_weight():
    model = tiny_llama()
    w0 = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    dt.attach(model, "ia3")
    t = dt.adapter_tensors(model, "default")["model.layers.0.self_attn.v_proj.ia3_l"]
    with torch.no_grad():
        t[3] = 0.0  # this output channel is switched off
    dt.merge(model, unload=False)
    assert model.model.layers[0].self_attn.v_proj.weight[3].abs().sum() == 0
    dt.unmerge(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.v_proj.weight, w0, atol=0, rtol=0)


def test_no_defaults_for_unknown_models():
    from conftest import tiny_mlp

    with pytest.raises(dt.DeltaError, match="no default targets.*targets=\\[...\\]"):
        dt.attach(tiny_mlp(), "ia3")
    assert not any(True for _ in iter_delta_layers(tiny_mlp()))
