"""Weights saved by one port of an architecture, asked to load into another port's code.

Every key of the packaged EfficientNet-Lite0 file (lukemelas' EfficientNet-PyTorch naming,
``_conv_stem`` / ``_blocks.0._depthwise_conv``) maps by position onto timm's
``efficientnet_lite0`` -- same modules, same shapes -- yet the two compute different functions:

    file (TF port)                         timm efficientnet_lite0      timm tf_efficientnet_lite0
    TF "same" padding (asymmetric at /2)   symmetric padding            TF "same" padding
    BatchNorm eps 1e-3                     eps 1e-5                     eps 1e-3
    input mean/std 0.5 (TF Lite)           ImageNet mean/std            mean/std 0.5

Measured on the packaged weights (32 noisy digits, 224 px): ``efficientnet_lite0`` gives logits up to
4.6 away from the file's own model and the same top-1 class on 56 % of inputs; ``tf_efficientnet_lite0``
is identical (max |Δ logit| 0.0).  So a timm name whose weights come from a TF port is built as its
``tf_`` twin, and said so in the run log: the user asked for *those weights*, and only the twin runs
them as trained.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

# keys only lukemelas' EfficientNet-PyTorch family writes (every model of it is a TF checkpoint port)
TF_PORT_MARKERS = ("_conv_stem.weight", "_bn0.weight")


def is_tf_port(keys: Iterable[str]) -> bool:
    ks = set(keys)
    return all(k in ks for k in TF_PORT_MARKERS)


def timm_twin(name: str, keys: Iterable[str], exists: Callable[[str], bool]) -> str:
    """The timm model that computes what a state dict with ``keys`` was trained to compute:
    ``tf_NAME`` for TF-port weights when timm has it, else ``name`` unchanged."""
    if name.startswith("tf_") or not is_tf_port(keys):
        return name
    twin = f"tf_{name}"
    return twin if exists(twin) else name
