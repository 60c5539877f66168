"""Vision: every method that makes sense for images on a tiny ViT (transformers'
ViTForImageClassification, random init) and a tiny BatchNorm CNN with residual blocks (fast), and
on the real pretrained EfficientNet-Lite0 fine-tuned on sklearn digits (slow)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from test_invariants import perturb


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    return ViTForImageClassification(cfg).eval()


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        for b in self.blocks:
            h = b(h)
        return self.fc(h.mean((2, 3)))


def tiny_cnn():
    torch.manual_seed(0)
    m = TinyCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (m.bn, m.blocks[0].bn, m.blocks[1].bn):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


CNN_HEAD = {"modules_to_save": ["fc"]}
CASES = {
    "vit-lora": (tiny_vit, "lora", {}),
    "vit-ia3": (tiny_vit, "ia3", {}),
    "vit-vera": (tiny_vit, "vera", {"r": 8}),
    "vit-bitfit": (tiny_vit, "bitfit", {}),
    "vit-ln": (tiny_vit, "ln", {}),
    "vit-adapter-houlsby": (tiny_vit, "adapter", {}),
    "vit-adapter-parallel": (tiny_vit, "adapter", {"placement": "parallel"}),
    "cnn-lora-conv": (tiny_cnn, "lora", {"targets": ["stem", "conv"], "r": 2, **CNN_HEAD}),
    "cnn-ia3-channels": (tiny_cnn, "ia3", {"targets": ["stem", "conv"], "feedforward": ["blocks.1.conv"], **CNN_HEAD}),
    "cnn-bitfit": (tiny_cnn, "bitfit", CNN_HEAD),
    "cnn-ln-batchnorm": (tiny_cnn, "ln", CNN_HEAD),
    "cnn-adapter-after-blocks": (tiny_cnn, "adapter", {"targets": r"blocks\.\d+", "bottleneck": 4, **CNN_HEAD}),
}


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("case", list(CASES))
def test_image_classifier(case, tmp_path):
    make, method, opts = CASES[case]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    y_base = _logits(make(), x)
    model = dt.attach(make(), method, **opts)
    torch.testing.assert_close(_logits(model, x), y_base, atol=1e-5, rtol=0)
    perturb(model)  # away from the identity init, so every tensor gets a gradient
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(_logits(model, x), labels)
    loss.backward()
    opt.step()
    y = _logits(model, x)
    assert not torch.allclose(y, y_base, atol=1e-4)
    dt.save(model, tmp_path)
    fresh = dt.load(make(), tmp_path)
    torch.testing.assert_close(_logits(fresh, x), y, atol=1e-5, rtol=1e-5)
    if dt.METHODS[method].mergeable:
        torch.testing.assert_close(_logits(dt.merge(model, copy=True), x), y, atol=1e-4, rtol=1e-4)
    else:
        with pytest.raises(dt.DeltaError, match="cannot be merged"):
            dt.merge(model, copy=True)
    dt.delete(model, "default")
    torch.testing.assert_close(_logits(model, x), y_base, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ slow: EfficientNet-Lite0 + digits

PROJECT = r"_blocks\.\d+\._project_conv"  # the 1×1 (groups=1) convolutions closing each block
REAL = {
    "lora": {"targets": PROJECT, "r": 4, "alpha": 8},
    "ia3": {"targets": r"_blocks\.\d+\._(project|expand)_conv", "feedforward": r"_blocks\.\d+\._project_conv"},
    "bitfit": {},
    "ln": {},
    "adapter": {"targets": r"_blocks\.(5|10|15)", "bottleneck": 16, "scaling": 1.0},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(REAL))
def test_efficientnet_lite0_learns_digits(method, tmp_path):
    from real_vision import accuracy, digits, efficientnet_lite0, one_thread, train_steps

    (xtr, ytr), (xte, yte) = digits(size=64)
    with one_thread():
        model = efficientnet_lite0()
        before = accuracy(model, xte, yte)
        dt.attach(model, method, modules_to_save=["_fc"], **REAL[method])
        train_steps(model, xtr, ytr, steps=14, lr=3e-3)
        after = accuracy(model, xte, yte)
        print(f"\n{method}: accuracy {before:.3f} -> {after:.3f}")
        assert after > max(before, 0.1) + 0.25, (before, after)
        dt.save(model, tmp_path)
        fresh = dt.load(efficientnet_lite0(seed=1), tmp_path)
        assert accuracy(fresh, xte, yte) == pytest.approx(after)
