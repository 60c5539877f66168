"""LayerNorm tuning: train only the normalisation layers' gain and bias (Zhao et al. 2024,
"Tuning LayerNorm in Attention", arXiv:2312.11420; earlier as a baseline in Houlsby et al. 2019).

    LayerNorm:  y = γ ⊙ (x − μ) / √(σ² + ε) + β       γ, β trained, everything else frozen
    RMSNorm:    y = γ ⊙ x / √(mean(x²) + ε)             γ trained

A *selector* like BitFit (same machinery, ``_selector.py``): no module is added, each named
adapter swaps its own copies of γ/β in and out; the file holds their values.  Works on torch's
LayerNorm/RMSNorm/GroupNorm/BatchNorm and transformers' own norm classes (LlamaRMSNorm, ...).
BatchNorm also has running statistics, which are *buffers*: keep a CNN's BatchNorms in eval
mode while training if the base must stay bit-for-bit unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.delta import DeltaConfig, DeltaError
from ..core.method import register
from ._selector import SelectorMethod, candidate_modules, is_norm

PARAMS = ("weight", "bias")


@dataclass
class LNConfig(DeltaConfig):
    params: list[str] = field(default_factory=lambda: list(PARAMS))  # the paper tunes gain and bias

    method = "ln"

    def __post_init__(self):
        bad = [p for p in self.params if p not in PARAMS]
        if bad or not self.params:
            raise DeltaError(f"ln: params must be a non-empty subset of {list(PARAMS)}, got {self.params!r}")


@register
class LNTuning(SelectorMethod):
    name = "ln"
    config_cls = LNConfig
    summary = "train only the normalisation layers' gain/bias (LayerNorm, RMSNorm, GroupNorm, BatchNorm)"
    default_targets = "every normalisation layer"
    layer_types = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm")
    mergeable = True

    def pick(self, model, cfg: LNConfig):
        picked = [(path, mod, p) for path, mod in candidate_modules(model, cfg) if is_norm(mod)
                  for p in cfg.params if isinstance(mod._parameters.get(p), nn.Parameter)]
        if not picked:
            raise DeltaError(f"ln: {type(model).__name__} has no normalisation layer with {cfg.params} "
                             "among the targets; LayerNorm/RMSNorm/GroupNorm/BatchNorm are supported")
        return picked
