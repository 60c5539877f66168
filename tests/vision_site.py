"""A site directory in which ``import timm`` and ``import torchvision`` work on this CPU-only
machine -- for tests only, never installed, never shipped.

Why: the only torchvision wheel built for torch 2.13 here is a CUDA build.  Its compiled ``_C.so``
needs libtorch_cuda, so it fails to load; torchvision tolerates that (``extension._has_ops()`` is
False) except in ``_meta_registrations.py``, which calls ``torch.library.register_fake`` on
``torchvision::nms`` / ``torchvision::qnms`` unconditionally and dies with "operator
torchvision::nms does not exist".  timm imports torchvision, so it dies too.  The model code of
both is pure Python and never calls those detection ops.

The fix, for a subprocess only: the unzipped torchvision + timm wheels in a temporary directory
plus a ``sitecustomize.py`` (Python imports it at start-up from PYTHONPATH) that *declares* the
op schemas torchvision's meta registrations touch, with ``torch.library.define`` and no kernel.
Calling one of those ops would still fail ("no kernel"), which is right: they are not there.
A user whose torchvision matches their torch needs none of this (docs/cli.md, "timm and
torchvision on a machine without a matching wheel").

The main venv is never touched: with torchvision importable there, transformers would build its
image processors through torchvision and the rest of the suite would test another code path.
"""
from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import pytest

WHEEL_DIRS = [d for d in os.environ.get("DELTATUNE_TEST_WHEELS", "").split(os.pathsep) if d] + [
    "/opt/pypi-more/files", "/opt/pypi/files", str(Path.home() / ".cache" / "deltatune-test-wheels")]
WHEELS = {"torchvision": "torchvision-0.28.0-*.whl", "timm": "timm-1.0.29-*.whl"}  # 0.28 is the torch 2.13 build

# Schemas as torchvision's C++ registers them (csrc/ops/*.cpp); exactly the ops its
# _meta_registrations.py / _autograd_registrations.py name.
SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                 "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward": "(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
                           "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
                           "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward": "(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
                              "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
                              "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
                "-> (Tensor, Tensor)",
    "_roi_pool_backward": "(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
                          "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
                          "-> Tensor",
    "ps_roi_pool": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
                   "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward": "(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
                             "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
                             "SymInt height, SymInt width) -> Tensor",
    "deform_conv2d": "(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
                     "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
                     "SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward": "(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
                               "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
                               "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
                               "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}

SITECUSTOMIZE = '''\
# Written by tests/vision_site.py: declare the torchvision ops a CUDA-only _C.so failed to provide.
import torch

_LIB = torch.library.Library("torchvision", "DEF")  # kept alive: dropping it undefines the ops
for _name, _schema in {schemas!r}.items():
    try:
        _LIB.define(_name + _schema)
    except RuntimeError:  # already defined (a torchvision whose _C.so did load)
        pass
'''


def find_wheel(pattern: str) -> Path | None:
    for d in WHEEL_DIRS:
        hits = sorted(Path(d).glob(pattern)) if Path(d).is_dir() else []
        if hits:
            return hits[-1]
    return None


def build_site(root: Path) -> Path:
    """``root`` filled with the two unzipped wheels and the sitecustomize; pytest.skip without wheels."""
    site = root / "vision-site"
    if (site / "sitecustomize.py").exists():
        return site
    wheels = {name: find_wheel(pat) for name, pat in WHEELS.items()}
    absent = [f"{n} ({WHEELS[n]})" for n, w in wheels.items() if w is None]
    if absent:
        pytest.skip(f"no wheel for {', '.join(absent)} in {WHEEL_DIRS}; set DELTATUNE_TEST_WHEELS to a folder "
                    "holding them (pip download timm==1.0.29 torchvision==0.28.0 --no-deps)")
    site.mkdir(parents=True, exist_ok=True)
    for w in wheels.values():
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(schemas=SCHEMAS), encoding="utf-8")
    return site


def site_env(site: Path) -> dict[str, str]:
    """Environment for a subprocess that sees the site dir, this checkout's src, and no hub."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join([str(site), src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def vision_site(tmp_path_factory) -> dict[str, str]:
    """The environment of a subprocess in which timm and torchvision import (or a skip)."""
    return site_env(build_site(tmp_path_factory.mktemp("vision")))


PYTHON = sys.executable
