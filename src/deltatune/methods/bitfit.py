"""BitFit: train only the bias terms (Ben Zaken, Ravfogel & Goldberg 2022, arXiv:2106.10199).

    y = W x + b      W frozen, b trained        (every Linear, Conv, LayerNorm ... bias)

A *selector*: no module is added, the model's own bias tensors train (see ``_selector.py`` for
how named adapters swap their values in and out).  The paper trains every bias; ``parts`` picks
a subset by role:

    attention   biases of query/key/value/output projections (the paper's b_q is one of them)
    ffn         biases of the feed-forward block (the paper's b_m2 is one of them)
    norm        LayerNorm/BatchNorm biases (β)
    other       everything else (embedding-free convs, pooler, ...)

The file holds the trained bias *values*, keyed by the parameter path; merge is trivial (they are
already in place).  Bias-free models (Llama, most modern LLMs) have nothing to select: that is an
error unless ``add_missing=True``, which adds zero-initialised biases (y = Wx + b, b = 0 at init)
to the linear layers of the chosen parts.  Those are small additive Deltas, exactly mergeable
(merging gives the layer a bias).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.delta import Delta, DeltaConfig, DeltaError, wrap
from ..core.method import register
from ..core.layer_types import linear_types
from ..core.targets import HEAD_NAMES
from ._selector import SelectorMethod, candidate_modules, is_norm
from .lora import linear_layout  # GPT-2's Conv1D stores (in, out); quantized variants too

PARTS = ("attention", "ffn", "norm", "other")
_ATTN = re.compile(r"(^|\.)(attn|attention|self_attn|self_attention|q_proj|k_proj|v_proj|o_proj|query|key|value|"
                   r"c_attn|qkv|q_lin|k_lin|v_lin|out_lin|query_key_value)(\.|$)")
_FFN = re.compile(r"(^|\.)(mlp|ffn|feed_forward|intermediate|output|c_fc|up_proj|down_proj|gate_proj|lin1|lin2|"
                  r"dense_h_to_4h|dense_4h_to_h|wi|wo|fc1|fc2)(\.|$)")

# role of a module, first match wins (a LayerNorm inside "attention.output" is a norm)
ROLES = {
    "norm": lambda path, mod: is_norm(mod),
    "attention": lambda path, mod: bool(_ATTN.search(path)),
    "ffn": lambda path, mod: bool(_FFN.search(path)),
}


def role(path: str, mod: nn.Module) -> str:
    return next((r for r, test in ROLES.items() if test(path, mod)), "other")


@dataclass
class BitFitConfig(DeltaConfig):
    parts: list[str] = field(default_factory=lambda: list(PARTS))  # the paper trains every bias
    add_missing: bool = False  # bias-free layers (Llama): add zero-init biases instead of failing

    method = "bitfit"

    def __post_init__(self):
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise DeltaError(f"bitfit: parts must be a non-empty subset of {list(PARTS)}, got {self.parts!r}")


class AddedBias(Delta):
    """``add_missing``: a zero-initialised bias for a layer that has none. y' = y + b."""
    additive = True  # y + b

    def __init__(self, n_out: int, channel_dim: int, dtype: torch.dtype):
        super().__init__()
        self.channel_dim = channel_dim  # -1 for linear (…, out), 1 for conv (B, out, …)
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=dtype))  # (out,)

    def _shaped(self, y: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1:
            return self.bias.to(y.dtype)
        return self.bias.to(y.dtype).view(1, -1, *[1] * (y.dim() - 2))

    def forward(self, x, y, base):
        return y + self._shaped(y)

    def merge(self, base):
        self._created = base.bias is None  # merging gives the layer a bias; unmerge takes it away
        if self._created:
            w = base.weight
            base.bias = nn.Parameter(torch.zeros(self.bias.shape, dtype=w.dtype, device=w.device), requires_grad=False)
        base.bias.data += self.bias.detach().to(base.bias.dtype)

    def unmerge(self, base):
        base.bias.data -= self.bias.detach().to(base.bias.dtype)
        if self.__dict__.pop("_created", False):
            base.bias = None


def _out_features(mod: nn.Module) -> tuple[int, int] | None:
    """(number of output features, channel dim) of a layer that could carry a bias."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return mod.out_channels, 1
    if isinstance(mod, linear_types()) and hasattr(mod, "weight"):
        return linear_layout(mod)[1], -1
    return None


@register
class BitFit(SelectorMethod):
    name = "bitfit"
    config_cls = BitFitConfig
    summary = "train only the existing bias terms (optionally by role); add_missing adds zero biases"
    default_targets = "every bias in `parts` (not the heads)"
    layer_types = ("any module with a bias", "Linear/Conv1D/Conv (add_missing)")
    mergeable = True

    def pick(self, model, cfg: BitFitConfig):
        picked = []
        for path, mod in candidate_modules(model, cfg):
            b = mod._parameters.get("bias")
            if isinstance(b, nn.Parameter) and role(path, mod) in cfg.parts:
                picked.append((path, mod, "bias"))
        return picked

    def _missing(self, model, cfg: BitFitConfig):
        out = []
        for path, mod in candidate_modules(model, cfg):
            shape = _out_features(mod)
            if (shape is not None and "bias" in mod._parameters and mod._parameters["bias"] is None
                    and path.rsplit(".", 1)[-1] not in HEAD_NAMES and role(path, mod) in cfg.parts):
                out.append((path, mod, shape))
        return out

    def attach_extra(self, model, cfg: BitFitConfig, name, state, picked):
        missing = self._missing(model, cfg)
        if not cfg.add_missing:
            if not picked:
                hint = (f"; pass add_missing=True to add zero-initialised biases to its {len(missing)} "
                        "bias-free layers, or tune norms ('ln') or scales ('ia3') instead") if missing else ""
                raise DeltaError(f"bitfit: {type(model).__name__} has no bias terms in parts {cfg.parts}{hint}")
            return
        if not picked and not missing:
            raise DeltaError(f"bitfit: {type(model).__name__} has no layer in parts {cfg.parts} that "
                             "could carry a bias; check targets/parts")
        made = [(p, AddedBias(n, ch, mod.weight.dtype)) for p, mod, (n, ch) in missing]
        for p, d in made:
            wrap(model, p, state).deltas[name] = d
