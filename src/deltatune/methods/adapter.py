"""Bottleneck adapters: Houlsby et al. 2019 (arXiv:1902.00751), Pfeiffer et al. 2021
("AdapterFusion", arXiv:2005.00247) and the parallel adapter of He et al. 2022 ("Towards a
Unified View of Parameter-Efficient Transfer Learning", arXiv:2110.04366).

    sequential (houlsby, pfeiffer):   h' = h + U f(D h)            h = the module's output
    parallel:                         h' = h + s · U f(D x)        x = the module's input

    D: d → m (down-projection, with bias)   f: non-linearity   U: m → d (up-projection, zero-init)

U starts at zero, so every adapter is the identity at init.  Placements (where the modules go):

    houlsby    after the attention output projection and after the FFN     (2 per block)
    pfeiffer   after the FFN only                                          (1 per block)
    parallel   beside the FFN: its input feeds the adapter, the sum leaves (1 per block)

They attach at module *outputs* through the usual DeltaLayer wrappers, so no model class is
subclassed: Llama (``self_attn.o_proj``, ``mlp``), GPT-2 (``attn.c_proj``, ``mlp``), BERT/ViT
(``attention.output.dense``, ``layer.N.output.dense``; their FFN has no single module, so the
parallel adapter taps ``intermediate``'s input and adds at ``output.dense``).  With explicit
``targets`` (e.g. the blocks of a CNN) the adapter goes after (or beside) each target; the width
and the channel axis (last for transformers, 1 for conv feature maps) are read off the module.

Not mergeable: f is non-linear, so U f(D h) is no weight matrix.  It costs ~4·d·m FLOPs a token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.delta import Delta, DeltaConfig, DeltaError, iter_base_modules, wrap
from ..core.method import Method, register
from ..core.dtypes import build_dtype
from ..core.layer_types import linear_types
from ..core.targets import conv_blocks, matches
from .lora import linear_layout  # GPT-2's Conv1D stores (in, out); quantized variants too
from ..core.adapters import base_at

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}

# placement -> (points, reduction factor, activation, scaling); adapter-hub's defaults for
# Houlsby (SeqBn x2, swish), Pfeiffer (SeqBn, relu) and He et al.'s parallel adapter (s = 4).
PLACEMENTS = {
    "houlsby": (("attention", "ffn"), 16, "swish", 1.0),
    "pfeiffer": (("ffn",), 16, "relu", 1.0),
    "parallel": (("ffn_parallel",), 2, "relu", 4.0),
}

# module paths of the attachment points, per architecture family
ATTN_OUT = re.compile(r"(.*\.)?((self_attn|attn|self_attention|encoder_attn)\.(o_proj|c_proj|out_proj|dense)|"
                      r"attention\.(output\.dense|out_lin|o_proj|out_proj|dense)|"  # BERT, DistilBERT, GPT-NeoX
                      r"(SelfAttention|EncDecAttention)\.o)")  # T5
FFN_BLOCK = re.compile(r"(.*\.)?(mlp|feed_forward|ffn|DenseReluDense)")  # one module: FFN input -> output
# FFNs that are two sibling layers: the input enters the first, the output leaves the second
# (same prefix): BERT/ViT's intermediate -> output.dense, OPT/Bart/Whisper's fc1 -> fc2
FFN_SPLITS = [(re.compile(r"(.*\.)?intermediate"), "intermediate", "output.dense"),
              (re.compile(r"(.*\.)?fc1"), "fc1", "fc2")]


@dataclass
class AdapterConfig(DeltaConfig):
    placement: str = "houlsby"  # "houlsby" | "pfeiffer" | "parallel" (see the module docstring)
    reduction_factor: int | None = None  # m = d / factor; None: 16 (houlsby/pfeiffer), 2 (parallel)
    bottleneck: int | None = None  # explicit m, overrides reduction_factor (Houlsby tried 8-256)
    activation: str | None = None  # None: swish (houlsby), relu (pfeiffer, parallel)
    scaling: float | None = None  # output scale s; None: 1, or 4 for parallel (He et al. 2022)
    dropout: float = 0.0  # dropout on the adapter input
    channel_dim: int | None = None  # axis of the features: None reads it off the module (-1 or 1)

    method = "adapter"
    size_fields = ("bottleneck",)  # bounded by the saved tensors' shapes on load

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise DeltaError(f"adapter: placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise DeltaError(f"adapter: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for k in ("reduction_factor", "bottleneck"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise DeltaError(f"adapter: {k} must be a positive integer, got {v!r}")

    def resolved(self) -> tuple[tuple[str, ...], int, str, float]:
        points, rf, act, s = PLACEMENTS[self.placement]
        return (points, self.reduction_factor or rf, self.activation or act,
                s if self.scaling is None else float(self.scaling))


# --------------------------------------------------------------------------- sizes

def _leaf_dims(mod: nn.Module) -> tuple[int, int, int] | None:
    """(in, out, channel axis) of a layer with a known width, else None."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return mod.in_channels, mod.out_channels, 1
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        return mod.num_features, mod.num_features, 1
    if isinstance(mod, nn.LayerNorm) and mod.normalized_shape:
        return mod.normalized_shape[-1], mod.normalized_shape[-1], -1
    if isinstance(mod, linear_types()) and getattr(mod, "weight", None) is not None:
        _, out_f, in_f, _ = linear_layout(mod)
        return in_f, out_f, -1
    return None


def module_dims(mod: nn.Module) -> tuple[int, int, int]:
    """(input width, output width, channel axis): the first and last sized layers inside ``mod``."""
    sized = [d for m in mod.modules() if (d := _leaf_dims(m)) is not None]
    if not sized:
        raise DeltaError(f"adapter: cannot tell the width of {type(mod).__name__} (no Linear/Conv/Norm inside); "
                         "target a module that contains one")
    d_in, (_, d_out, ch) = sized[0][0], sized[-1]
    if ch == -1 and d_out != d_in and any(o == d_in for _, o, _ in sized[1:]):
        # a transformer block writes back into the residual stream (hidden -> hidden); a last layer
        # of another width is a side branch (Qwen2-MoE's shared_expert_gate, hidden -> 1)
        d_out = d_in
    return d_in, d_out, ch


# --------------------------------------------------------------------------- deltas

class _Slot:
    """Carries the FFN input from the tap (``intermediate``) to the adapter (``output.dense``)."""
    x: torch.Tensor | None = None


class BottleneckDelta(Delta):
    """h' = h + s · U f(D src), src = the output (sequential) or the input (parallel)."""

    mergeable: ClassVar[bool] = False

    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig, parallel: bool, channel_dim: int,
                 dtype: torch.dtype, slot: _Slot | None = None):
        super().__init__()
        _, rf, act, s = cfg.resolved()
        m = cfg.bottleneck or max(1, d_out // rf)
        self.parallel, self.scaling, self.channel_dim = parallel, s, channel_dim
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.adapter_down = nn.Linear(d_in, m, dtype=dtype)  # (m, d_in)
        self.act = ACTIVATIONS[act]()
        self.adapter_up = nn.Linear(m, d_out, dtype=dtype)  # (d_out, m), zero: identity at init
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.__dict__["slot"] = slot  # shared with the tap; not a submodule

    def branch(self, src: torch.Tensor) -> torch.Tensor:
        ch = self.channel_dim
        h = src.movedim(ch, -1) if ch != -1 else src  # (..., d_in)
        h = self.adapter_up(self.act(self.adapter_down(self.dropout(h.to(self.adapter_down.weight.dtype)))))
        return (h.movedim(-1, ch) if ch != -1 else h) * self.scaling  # back to the module's layout

    def forward(self, x, y, base):
        h = y[0] if isinstance(y, tuple) else y  # some HF modules return (hidden, extras...)
        if self.parallel:
            src = x
            if self.slot is not None:
                src, self.slot.x = self.slot.x, None
                if src is None:
                    raise DeltaError("adapter: the parallel adapter's FFN input was not seen; "
                                     "the model ran output.dense without its intermediate layer")
        else:
            src = h
        out = h + self.branch(src).to(h.dtype)
        return (out, *y[1:]) if isinstance(y, tuple) else out


class InputTap(Delta):
    """Records a module's input for a parallel adapter that ends elsewhere; output unchanged."""

    mergeable: ClassVar[bool] = False

    def __init__(self, slot: _Slot):
        super().__init__()
        self.__dict__["slot"] = slot

    def forward(self, x, y, base):
        self.slot.x = x
        return y


# --------------------------------------------------------------------------- attaching

def _points(method: Method, model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, str, str | None]]:
    """[(kind, path, tap path)]: kind "seq" (after the module), "seq2d" (after a CNN block: channels at
    axis 1) or "par" (beside it)."""
    points = cfg.resolved()[0]
    if cfg.targets is not None:
        kind = "par" if cfg.placement == "parallel" else "seq"
        return [(kind, p, None) for p in method.target_paths(model, cfg)]
    paths = [p for p, _ in iter_base_modules(model) if p]
    if cfg.exclude is not None:
        paths = [p for p in paths if not matches(p, cfg.exclude)]
    have = set(paths)
    mods = dict(iter_base_modules(model))
    # containers the model iterates over (MobileBERT's ffn ModuleList) are not callable blocks
    blocks = [p for p in paths if FFN_BLOCK.fullmatch(p) and not isinstance(mods[p], (nn.ModuleList, nn.ModuleDict))]
    blocks = [p for p in blocks if not any(b != p and p.startswith(b + ".") for b in blocks)]  # outermost
    split = [(p, p[: -len(first)] + second) for rx, first, second in FFN_SPLITS for p in paths if rx.fullmatch(p)]
    split = [(i, o) for i, o in split if o in have]
    found = {
        "attention": [("seq", p, None) for p in paths if ATTN_OUT.fullmatch(p)],
        "ffn": [("seq", p, None) for p in blocks] or [("seq", o, None) for _, o in split],
        "ffn_parallel": [("par", p, None) for p in blocks] or [("par", o, i) for i, o in split],
    }
    missing = [pt for pt in points if not found[pt]]
    blocks = conv_blocks(model) if missing and cfg.placement != "parallel" else []
    if blocks:  # a CNN: one adapter after each block (channels at axis 1), Rebuffi et al. 2017's serial adapters
        return [("seq2d", p, None) for p in blocks]
    if missing:
        raise DeltaError(f"adapter: cannot find the {missing} attachment points of {type(model).__name__} for "
                         f"placement {cfg.placement!r} (known: Llama/GPT-2/GPT-NeoX/BERT/ViT/OPT/Bart/Whisper/T5-style blocks); pass "
                         "targets=[...] to put adapters after (or, parallel, beside) those modules")
    out = [pt for point in points for pt in found[point]]
    return out


@register
class Adapter(Method):
    name = "adapter"
    config_cls = AdapterConfig
    summary = "bottleneck adapters h + U f(D h) after attention/FFN (houlsby, pfeiffer) or beside the FFN (parallel)"
    default_targets = "attention/FFN outputs (by placement); CNN blocks"
    layer_types = ("any module (at its output)", "Llama/GPT-2/BERT/ViT blocks", "CNN blocks")
    mergeable = False
    merge_note = ("a bottleneck adapter applies a non-linearity, so it is not a weight matrix and cannot be "
                  "folded into the base")

    def attach(self, model, cfg: AdapterConfig, name, state):
        made = []  # build every delta first: a failure leaves the model untouched
        for kind, path, tap in _points(self, model, cfg):
            mod = base_at(model, path)
            d_in, d_out, ch = module_dims(mod)
            if kind == "seq2d":  # a CNN block returns (B, C, H, W) whatever it does inside (ConvNeXt
                kind, ch = "seq", 1  # permutes to channels-last for its LayerNorm/Linear layers and back)
            ch = cfg.channel_dim if cfg.channel_dim is not None else ch
            dtype = build_dtype(mod)
            if kind == "seq":
                made.append((path, BottleneckDelta(d_out, d_out, cfg, False, ch, dtype)))
            elif tap is None:
                made.append((path, BottleneckDelta(d_in, d_out, cfg, True, ch, dtype)))
            else:  # BERT/ViT: the FFN input is the input of `intermediate`
                slot = _Slot()
                tap_in = module_dims(base_at(model, tap))[0]
                made.append((tap, InputTap(slot)))
                made.append((path, BottleneckDelta(tap_in, d_out, cfg, True, ch, dtype, slot)))
        for p, d in made:
            wrap(model, p, state).deltas[name] = d
