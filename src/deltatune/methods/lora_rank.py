"""The rank a LoRA delta gets on a convolution: ``r``, capped so the update adds at most
``budget`` (default 1.5 %) of the conv's own weights.

Why a cap for convs only: a LoRA update on a layer with weight (out, in, k, k) costs
r·(in·k² + out) parameters, a share r·(1/out + 1/(in·k²)) of the layer.  Transformer linears are
wide and square-ish (MiniLM's 384×384: r = 8 adds 4 %, and embeddings, which LoRA leaves alone,
hold half the model), so the same r = 8 trains 1.5 % of MiniLM.  A CNN puts its parameters into
many thin 1×1 convs (EfficientNet-Lite0: 33 of them, 16-1,280 channels, 3.4 M weights in all):
r = 8 adds 4.9 % to a 192→1,152 expansion and 58 % to a 16→96 one, 5.1 % of the backbone -- 5.5 %
trainable with the 10-class head, over the issue's 2 % line.  Bounding each conv's update by a
share of that conv's weights keeps every CNN below the line whatever its widths (rank ≥ 1, so the
thinnest layers still adapt), and leaves wide convs near the rank they would have had (ResNet's 512→512 3×3: 6).  1.5 %
rather than 2 % leaves room for the fresh head under the line.  Measured (docs/cli.md), trainable
with a 10-class head, r = 8 everywhere → capped: EfficientNet-Lite0 5.46 → 1.52 %, ResNet-18
2.55 → 1.33 %, ResNet-50 2.71 → 1.40 %, ConvNeXt-atto 4.65 → 1.12 %.

    cap = floor(budget · out·in·k² / (in·k² + out)),   rank = max(1, min(r, cap))

A capped layer keeps the scale s = alpha/r of the others (its alpha shrinks with its rank), so
its update grows at the same pace.  A ``rank_pattern`` entry for the layer wins over the cap;
``conv_budget=0`` turns it off.  Saved adapters list the capped layers in rank/alpha_pattern.
"""
from __future__ import annotations

import math
import re

from torch import nn

from ..core.delta import DeltaError, iter_delta_layers

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < math.inf:
        raise DeltaError(f"lora: conv_budget must be a share >= 0 (0.015 = 1.5 %, 0 = no cap), got {budget!r}")


def conv_rank(base: nn.Module, r: int, budget: float) -> int:
    """``r`` for a non-conv layer or ``budget`` 0; the capped rank for a convolution."""
    if budget <= 0 or not isinstance(base, CONVS):
        return r
    k = math.prod(base.kernel_size)
    per_rank = base.in_channels * k + base.out_channels  # A: (r, in, k…) + B: (out, r, 1…)
    cap = int(budget * base.weight.numel() / per_rank)
    return max(1, min(r, cap))


def same_scale_alpha(alpha: float, rank: int, r: int, rslora: bool) -> float:
    """The alpha that gives a capped layer the scale s = alpha/r of the uncapped ones (alpha/sqrt(r)
    with rsLoRA): B·A then moves at the same pace per step, instead of r/rank times faster."""
    return alpha * (math.sqrt(rank / r) if rslora else rank / r)


def explicit_patterns(model: nn.Module, name: str, cfg) -> dict[str, dict]:
    """``cfg``'s rank_pattern / alpha_pattern plus one exact entry per LoRA layer of adapter ``name``
    whose (rank, alpha) differ from (cfg.r, cfg.alpha), so a saved adapter (and peft, which knows no
    budget) rebuilds the same layers.  peft's rule: a key matches a module path's end at a dot, so
    the escaped path is exact."""
    ranks, alphas, seen = dict(cfg.rank_pattern), dict(cfg.alpha_pattern), []
    for path, layer in iter_delta_layers(model):
        d = layer.deltas[name] if name in layer.deltas else None
        if not (hasattr(d, "r") and hasattr(d, "scaling")):  # a LoRA delta (not the head's CopyDelta)
            continue
        rank, a = d.r, d.scaling * (math.sqrt(d.r) if cfg.rslora else d.r)
        seen.append(rank)
        if rank != cfg.r and not any(re.match(rf"(.*\.)?({k})$", path) for k in cfg.rank_pattern):
            ranks[re.escape(path)] = rank
        if not math.isclose(a, cfg.alpha) and not any(re.match(rf"(.*\.)?({k})$", path) for k in cfg.alpha_pattern):
            alphas[re.escape(path)] = a
    # every layer capped (a small CNN): the file's r is its largest rank, as the load checks r against the
    # tensors' sizes; each layer is listed in both patterns, so nothing else depends on r
    r = cfg.r if not seen or cfg.r in seen else max(seen)
    return {"r": r, "rank_pattern": ranks, "alpha_pattern": alphas}
