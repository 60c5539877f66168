"""LoRA's default rank on convolutions (methods/lora_rank.py): r = 8 capped so each conv's update adds
at most conv_budget (1.5 %) of its weights -- CNNs below 2 % trainable, linears untouched."""
import json

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lora_rank import conv_rank
from deltatune.storage.adapter import _manifest_digest


def delta_ranks(model):
    return {p: layer.deltas["default"].r for p, layer in dt.core.delta.iter_delta_layers(model)
            if "default" in layer.deltas and hasattr(layer.deltas["default"], "lora_A")}


def thin_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 96, 1), nn.ReLU(), nn.Conv2d(96, 256, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 4))


def test_cap_follows_the_layer_size_and_leaves_linears_alone():
    assert conv_rank(nn.Conv2d(16, 96, 1), 8, 0.015) == 1  # 1,536 weights: rank 8 would add 58 %
    assert conv_rank(nn.Conv2d(192, 1152, 1), 8, 0.015) == 2  # 221 k weights; r = 8 adds 4.9 %
    assert conv_rank(nn.Conv2d(512, 512, 3), 8, 0.015) == 6  # ResNet's widest (2.4 M weights)
    assert conv_rank(nn.Conv2d(2048, 2048, 1), 8, 0.015) == 8  # wide enough: the cap (15) does not bite
    assert conv_rank(nn.Linear(16, 96), 8, 0.015) == 8  # transformers' defaults do not change
    assert conv_rank(nn.Conv2d(16, 96, 1), 8, 0) == 8  # conv_budget=0: off


def test_default_ranks_on_a_cnn_and_the_overrides():
    m = dt.attach(thin_cnn(), "lora", targets=["0", "1", "3", "6"])
    assert delta_ranks(m) == {"0": 1, "1": 1, "3": 2, "6": 8}
    m = dt.attach(thin_cnn(), "lora", targets=["0", "1", "3", "6"], conv_budget=0)
    assert set(delta_ranks(m).values()) == {8}
    m = dt.attach(thin_cnn(), "lora", targets=["0", "1", "3", "6"], rank_pattern={"1": 4})
    assert delta_ranks(m) == {"0": 1, "1": 4, "3": 2, "6": 8}  # a rank_pattern entry wins over the cap
    with pytest.raises(dt.DeltaError, match="conv_budget must be"):
        dt.attach(thin_cnn(), "lora", conv_budget=-1)


def test_capped_layers_keep_the_scale_and_round_trip_through_save_and_peft(tmp_path):
    m = dt.attach(thin_cnn(), "lora", targets=["0", "1", "3", "6"])
    layers = dict(dt.core.delta.iter_delta_layers(m))
    assert {p: layers[p].deltas["default"].scaling for p in ("0", "1", "3", "6")} == dict.fromkeys("0136", 2.0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, 8)
    want = m(x)
    dt.save(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {"0": 1, "1": 1, "3": 2}  # peft rebuilds the same shapes
    assert cfg["alpha_pattern"] == {"0": 2.0, "1": 2.0, "3": 4.0}
    fresh = dt.load(thin_cnn(), tmp_path / "a")
    assert delta_ranks(fresh) == {"0": 1, "1": 1, "3": 2, "6": 8}
    torch.testing.assert_close(fresh(x), want)


def test_packaged_efficientnet_lite0_below_two_percent():
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    from deltatune.vision.classifier import _classifier
    from deltatune.vision.images import ImageConfig

    def pct(budget):
        m = _classifier(EfficientNet.from_name("efficientnet-lite0"), ImageConfig(), "x:y", [str(i) for i in range(10)])
        c = dt.trainable_parameters(dt.attach(m, "lora", **({} if budget is None else {"conv_budget": budget})))
        return 100 * c.trainable / c.total, m

    default, m = pct(None)
    assert 1.0 < default < 2.0, default  # 1.52 % with the 10-class head (5.46 % at r = 8 everywhere)
    assert pct(0)[0] > 5
    ranks = delta_ranks(m)
    assert len(ranks) == 33 and min(ranks.values()) == 1 and max(ranks.values()) <= 8


def test_files_without_the_cap_load_as_saved(tmp_path):
    """A deltatune file from before conv_budget, and any peft file, have rank r on every conv."""
    peft = pytest.importorskip("peft")
    x = torch.randn(2, 3, 8, 8)
    old = dt.attach(thin_cnn(), "lora", targets=["1", "3"], conv_budget=0)
    dt.save(old, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "deltatune.json").read_text())
    meta["config"].pop("conv_budget")  # as written before the cap existed
    meta["manifest_sha256"] = _manifest_digest(meta)
    (tmp_path / "old" / "deltatune.json").write_text(json.dumps(meta))
    assert delta_ranks(dt.load(thin_cnn(), tmp_path / "old")) == {"1": 8, "3": 8}
    pm = peft.get_peft_model(thin_cnn(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["1", "3"],
                                                        init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    mine = dt.load(thin_cnn(), tmp_path / "peft")
    assert delta_ranks(mine) == {"1": 8, "3": 8}
    torch.testing.assert_close(mine(x), pm.eval()(x))
