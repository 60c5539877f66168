"""Calibrated NF4 scales: the per-block scale search and the calibration statistics it weights
by (see the ``quant`` module docstring for the method and its measured effect).

    s_b = argmin_s Σ_{j∈b} h_j (w_j − s·NF4[q_j])²     h_j = E[x_j²] of input feature j (calibration)
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import DeltaError, get_submodule_clean

# candidates ± these × absmax (1.0 first: ties keep absmax), then Lloyd steps.  On SmolLM2 (bench/
# nf4_quality.py) 9 fractions × 3 steps reach perplexity 51.9 in 28 s, these 3 × 2 reach 52.3 in 14 s
SEARCH_FRACTIONS = (1.0, 0.85, 0.7)
LLOYD_STEPS = 2
_CHUNK = 1 << 18  # elements per (blocks × candidates × block_size) slab: 1 MB each, ~5 MB of temporaries in all


def _blocks(flat: torch.Tensor, bs: int, start: int, stop: int) -> torch.Tensor:
    """Blocks [start, stop) of a flat tensor in bitsandbytes' blocking, zero-padded at the end:
    (stop − start, bs) fp32."""
    x = flat[start * bs: stop * bs].float()
    return F.pad(x, (0, (stop - start) * bs - x.numel())).view(-1, bs)


def _feature_blocks(h: torch.Tensor, in_f: int, bs: int, start: int, stop: int) -> torch.Tensor:
    """The same blocks of a per-input-feature tensor h (in,) broadcast over rows: element i of
    the flat (out, in) weight gets h[i % in]."""
    return h.float()[torch.arange(start * bs, stop * bs, device=h.device) % in_f].view(-1, bs)


def _weighted_error(x, h, s, code, mid):  # x, h (C, bs) (h None: 1); s (C, K) -> (C, K)  Σ h (x − s·code[q])²
    q = code[torch.bucketize(x[:, None] / _nonzero(s)[..., None], mid, out_int32=True)] * s[..., None]  # (C, K, bs)
    d2 = (x[:, None] - q).square_()
    return (d2 if h is None else d2.mul_(h[:, None])).sum(-1)


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)  # a zero block's codes do not matter


def search_scales(w: torch.Tensor, input_sq: torch.Tensor | None, block_size: int,
                  code: torch.Tensor) -> torch.Tensor:
    """Per-block NF4 scales (blocks,) minimising Σ_j h_j (w_j − s·code[q_j])², q_j the nearest
    level, h = ``input_sq`` per input feature (None: plain squared error): the best of
    ±SEARCH_FRACTIONS × absmax, then LLOYD_STEPS of (q = nearest levels; s = Σhwc / Σhc², the
    weighted least-squares scale for those levels).  Each step is optimal for what it fixes, so
    the error never rises above the best candidate's (absmax included).  Chunked over blocks:
    temporaries stay ~6 MB whatever the layer size."""
    in_f, flat = w.shape[1], w.reshape(-1)
    n_blocks = -(-flat.numel() // block_size)
    code, mid = code.float(), (code[:-1] + code[1:]).float() / 2
    frac = torch.tensor(SEARCH_FRACTIONS, device=w.device)
    frac = torch.cat([frac, -frac])  # (K,)
    scales = torch.empty(n_blocks, device=w.device)
    step = max(1, _CHUNK // (block_size * frac.numel()))
    for b0 in range(0, n_blocks, step):
        b1 = min(b0 + step, n_blocks)
        x = _blocks(flat, block_size, b0, b1)  # (C, bs)
        h = None if input_sq is None else _feature_blocks(input_sq, in_f, block_size, b0, b1)
        cand = x.abs().amax(1, keepdim=True) * frac  # (C, K)
        k = _weighted_error(x, h, cand, code, mid).argmin(1, keepdim=True)  # first minimum: absmax on ties
        s = cand.gather(1, k)  # (C, 1)
        for _ in range(LLOYD_STEPS):
            c = code[torch.bucketize(x / _nonzero(s), mid, out_int32=True)]  # (C, bs) nearest levels
            hc = c if h is None else h * c
            den = (hc * c).sum(1, keepdim=True)
            s = torch.where(den > 0, (hc * x).sum(1, keepdim=True) / den.clamp_min(1e-30), s)
        scales[b0:b1] = s[:, 0]
    return scales


def nf4_codes(w: torch.Tensor, scale: torch.Tensor, block_size: int, code: torch.Tensor) -> torch.Tensor:
    """The nearest NF4 level index (0..15) of each weight under its block's ``scale``: (numel,) uint8."""
    mid = (code[:-1] + code[1:]).float() / 2
    n_blocks = scale.numel()
    out = torch.empty(n_blocks * block_size, dtype=torch.uint8, device=w.device)
    step = max(1, _CHUNK // block_size)
    for b0 in range(0, n_blocks, step):
        b1 = min(b0 + step, n_blocks)
        x = _blocks(w.reshape(-1), block_size, b0, b1) / _nonzero(scale[b0:b1].float())[:, None]
        out[b0 * block_size: b1 * block_size] = torch.bucketize(x, mid, out_int32=True).view(-1).to(torch.uint8)
    return out[: w.numel()]


class InputSquares:
    """Mean square of each input feature, E[x_j²] (in,) fp32, of ``modules`` ({path: module}),
    accumulated by forward pre-hooks while the context is open (batch after batch, in call order,
    so two passes over the same inputs give bitwise-equal statistics)."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = dict(modules)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles: list = []

    def _hook(self, path: str):
        def record(mod, args):
            if not args:  # called with keyword arguments only: not seen
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            sq = x.square().sum(0)
            self.sums[path] = self.sums[path] + sq if path in self.sums else sq
            self.counts[path] = self.counts.get(path, 0) + x.shape[0]
        return record

    def __enter__(self) -> "InputSquares":
        self.handles = [m.register_forward_pre_hook(self._hook(p)) for p, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def result(self) -> dict[str, torch.Tensor]:
        unseen = [p for p in self.modules if not self.counts.get(p)]
        if unseen:
            raise DeltaError(f"calibration: {len(unseen)} layer(s) saw no input, e.g. {unseen[:3]}; pass batches "
                             "that run through the whole model (input_ids tensors or dicts of model arguments)")
        return {p: self.sums[p] / self.counts[p] for p in self.modules}


def as_batches(calibration) -> list:
    """A batch (an input_ids tensor or a dict of model arguments) or an iterable of them, as a list."""
    return [calibration] if isinstance(calibration, (torch.Tensor, Mapping)) else list(calibration)


def input_stats(model: nn.Module, paths: list[str], calibration) -> dict[str, torch.Tensor]:
    """Mean square of each input feature, E[x_j²] (in,) fp32, of the modules at ``paths`` over one
    no-grad pass of ``calibration`` (a batch or an iterable of batches) through ``model``."""
    was_training = model.training
    try:
        model.eval()
        with InputSquares({p: get_submodule_clean(model, p) for p in paths}) as rec, torch.no_grad():
            for b in as_batches(calibration):
                model(**b) if isinstance(b, Mapping) else model(b)
    finally:
        model.train(was_training)
    return rec.result()
