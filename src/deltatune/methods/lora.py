"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv:2106.09685), with its common variants.

    x ──► W (frozen, out×in) ─────────────────────┐
    │                                             (+) ──► y = W x + s · B A x
    └──► dropout ──► A (r×in) ──► B (out×r) ──────┘

    s = α / r                      (LoRA)
    s = α / √r                     (rsLoRA, Kalajdzievski 2023: stable at large r)
    y = m ⊙ (W + sBA) x / ‖W + sBA‖_c + b      (DoRA, Liu et al. 2024: magnitude m, direction)

Init: A Kaiming-uniform, B = 0, so the output is unchanged at init.  LoRA+ (Hayou et al. 2024) is
an optimizer recipe: :func:`lora_plus_groups` gives B a learning rate λ× that of A.

Layer types: nn.Linear, transformers' Conv1D (GPT-2, weight stored in×out), nn.Conv1d/2d/3d,
nn.Embedding, nn.MultiheadAttention (``methods/lora_mha.py``, registered in ``EXTRA_LAYERS``), and
the quantized linears of ``deltatune.quant`` (reached via ``base_weight``).

Variants are objects chosen from the config (``VARIANTS``; the protocol is ``lora_variant.py``):
DoRA (``dora.py``) takes over forward, merge and unmerge; PiSSA (``pissa.py``, ``init="pissa"``)
initialises A, B from the SVD of W and subtracts its initial product as an extra low-rank term.
peft's ``adapter_config.json``: ``methods/lora_peft.py``; the conv rank cap: ``methods/lora_rank.py``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import (CopyDelta, Delta, DeltaConfig, DeltaError, base_weight, get_state, iter_delta_layers,
                          set_base_weight, wrap)
from ..core.method import Method, register
from ..core.dtypes import build_dtype
from ..core.adapters import adapter_tensors, base_at
from ..core.layer_types import QUANT_LINEAR_TYPES, conv1d_type
from ..fast import lora_dropout_addmm
from .dora import DoraVariant
from .lora_variant import LoraVariant
from .pissa import PissaVariant
from .lora_rank import check_budget, conv_rank, explicit_patterns, same_scale_alpha
from .lora_peft import LAYERS_PATTERNS, config_kwargs, layers_regex, peft_config  # noqa: F401 (re-exported)

# the variants a config can choose, applied in this order (PiSSA's init before DoRA measures ‖W + ΔW‖)
VARIANTS: tuple[type[LoraVariant], ...] = (PissaVariant, DoraVariant)
INITS = ("default", "gaussian", *(v.init_option for v in VARIANTS if v.init_option))


@dataclass
class LoraConfig(DeltaConfig):
    r: int = 8  # rank of the update; 8 is the common default (LoRA paper: 1-8 suffice for q,v)
    alpha: float = 16.0  # scale numerator: s = alpha/r; alpha = 2r is the usual recipe
    dropout: float = 0.0  # dropout on the LoRA branch input; 0 avoids a copy of x per layer
    rslora: bool = False  # s = alpha/sqrt(r): keeps updates stable as r grows
    dora: bool = False  # weight-decomposed LoRA (magnitude vector + low-rank direction)
    init: str = "default"  # "default" (Kaiming A, zero B) | "gaussian" | "pissa" (SVD of W, pissa.py)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module r: {regex: r}
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-module alpha
    conv_budget: float = 0.015  # a conv's update adds <= this share of its weights (lora_rank.py); 0 = off

    method = "lora"
    size_fields = ("r", "rank_pattern")  # bounded by the saved tensors' shapes on load

    @classmethod
    def from_dict(cls, d, *, strict: bool = False) -> "LoraConfig":  # files from before conv_budget: r everywhere
        return super().from_dict({"conv_budget": 0.0, **d} if isinstance(d, dict) else d, strict=strict)

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise DeltaError(f"lora: r must be a positive integer, got {self.r!r} (typical: 4, 8, 16)")
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise DeltaError(f"lora: alpha must be a positive number, got {self.alpha!r} (typical: 2*r)")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise DeltaError(f"lora: dropout must be in [0, 1), got {self.dropout!r}")
        check_budget(self.conv_budget)
        if self.init not in INITS:
            raise DeltaError(f"lora: init must be one of {INITS}, got {self.init!r}")
        for field_name in ("rank_pattern", "alpha_pattern"):
            pat = getattr(self, field_name)
            if not isinstance(pat, dict):
                raise DeltaError(f"lora: {field_name} must be a dict {{module regex: value}}, got {pat!r}")
            for k in pat:
                try:
                    re.compile(k)
                except (re.error, TypeError) as e:
                    raise DeltaError(f"lora: {field_name} key {k!r} is not a valid regex ({e})") from None
        for k, v in self.rank_pattern.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DeltaError(f"lora: rank_pattern[{k!r}] must be a positive integer, got {v!r}")
        for k, v in self.alpha_pattern.items():
            if not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise DeltaError(f"lora: alpha_pattern[{k!r}] must be a positive number, got {v!r}")


def _pattern_value(path: str, pattern: dict[str, Any], default):
    # peft's rule: a key matches when the module path ends with it (as a regex)
    for key, val in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return val
    return default


def linear_layout(base: nn.Module) -> tuple[bool, int, int, torch.dtype]:
    """(fan_in_fan_out, out, in, delta dtype) of a linear-like base. GPT-2's Conv1D stores its
    weight as (in, out); half-precision bases get fp32 deltas (``dtypes.adapter_dtype``)."""
    conv1d = conv1d_type()
    t = conv1d is not None and isinstance(base, conv1d)
    w = base_weight(base)
    out_f, in_f = (w.shape[1], w.shape[0]) if t else (w.shape[0], w.shape[1])
    dtype = build_dtype(base)
    return t, out_f, in_f, dtype


# --------------------------------------------------------------------------- deltas

class LoraDelta(Delta):
    """Shared by every layer type: scaling, dropout, and the hand-off to the config's variants
    (``variants``, see ``lora_variant.py``): their extra low-rank ``terms`` join the update, and
    ``variant`` (None for plain LoRA, DoRA's object) owns forward, merge and unmerge.  Subclasses
    set ``kind`` and define ``lora(x)`` (the un-scaled B A x) and ``product()`` (B A in W's
    layout); ``lora_of`` / ``product_of`` for other factors where a variant adds terms."""

    kind: str = ""  # "linear" | "conv" | "embedding": what a variant may support
    variants: tuple[LoraVariant, ...] = ()
    variant: LoraVariant | None = None  # the one of ``variants`` that owns forward/merge/unmerge
    plain_product = True  # no variant adds terms: the update is exactly s·BA (fused and batched paths)

    @property
    def additive(self) -> bool:  # y + s·BAx; a variant (DoRA) renormalises W instead
        return self.variant is None

    @property
    def use_dora(self) -> bool:
        return isinstance(self.variant, DoraVariant)

    def _setup(self, r: int, alpha: float, cfg: LoraConfig):
        self.r = r  # may differ from cfg.r: rank_pattern, the conv cap (lora_rank.py)
        self.scaling = alpha / (math.sqrt(r) if cfg.rslora else r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # refused before any tensor is allocated; initialised by _init_variants once A, B exist
        self.variants = tuple(v.variant_for(self) for v in VARIANTS if v.chosen(cfg))
        self.variant = next((v for v in self.variants if v.owns_forward), None)
        self.plain_product = not any(v.adds_terms for v in self.variants)

    def _init_variants(self, base) -> None:
        for v in self.variants:
            v.init(self, base)

    def extra_terms(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The variants' low-rank terms (B', A'): ΔW = s·(BA + Σ B'A')."""
        return [t for v in self.variants for t in v.terms(self)]

    def lora_of(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} takes no extra low-rank terms")

    def product_of(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} takes no extra low-rank terms")

    def b_params(self) -> list[nn.Parameter]:
        """LoRA+: the 'B' side, which gets the larger learning rate."""
        raise NotImplementedError

    # W in (out, in, ...) layout, whatever the base stores
    def _w(self, base) -> torch.Tensor:
        return base_weight(base)

    def delta_weight(self, base) -> torch.Tensor:
        d = self.product() * self.scaling
        for b, a in self.extra_terms():
            d = d + self.product_of(b, a) * self.scaling
        return d

    def branch(self, xd: torch.Tensor) -> torch.Tensor:
        """s·BA x_d plus the variants' terms (PiSSA: − s·B₀A₀ x_d): what the adapter adds, before a
        forward variant (DoRA) rescales it."""
        lora = self.lora(xd) * self.scaling
        for b, a in self.extra_terms():
            lora = lora + self.lora_of(xd, a, b) * self.scaling
        return lora

    def save_key(self, local_key: str) -> str:
        # peft writes DoRA magnitudes without the ".weight" suffix
        return local_key.removesuffix(".weight") if local_key.startswith("lora_magnitude_vector") else local_key

    # layout hooks the DoRA variant reads: per-output-channel norms, broadcasting, m's stored shape
    def _norm(self, w: torch.Tensor) -> torch.Tensor:
        # per output channel: Linear/Conv rows (out, ...) ; layout handled by _w
        return w.flatten(1).norm(dim=1)

    def _channel(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return v  # linear: broadcast over the last dim; conv overrides

    def _magnitude_layout(self, m: torch.Tensor, base) -> torch.Tensor:
        return m  # (out,); conv overrides

    def forward(self, x, y, base):
        if self.variant is not None:
            return self.variant.forward(self, x, y, base)
        return y + self.branch(self.dropout(x)).to(y.dtype)

    def merge(self, base):
        if self.variant is not None:
            return self.variant.merge(self, base)
        return super().merge(base)

    def unmerge(self, base):
        if self.variant is not None:
            return self.variant.unmerge(self, base)
        return super().unmerge(base)

    def _set_w(self, base, w):
        set_base_weight(base, w)


class LoraLinear(LoraDelta):
    """nn.Linear, GPT-2 Conv1D (weight stored transposed) and quantized linears."""

    kind = "linear"

    def __init__(self, base: nn.Module, r: int, alpha: float, cfg: LoraConfig):
        super().__init__()
        self.fan_in_fan_out, out_f, in_f, dtype = linear_layout(base)
        self._setup(r, alpha, cfg)
        self.lora_A = nn.Linear(in_f, r, bias=False, dtype=dtype)  # (r, in)
        self.lora_B = nn.Linear(r, out_f, bias=False, dtype=dtype)  # (out, r)
        if cfg.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        nn.init.zeros_(self.lora_B.weight)
        self._init_variants(base)

    def lora_B_dtype(self):
        return self.lora_B.weight.dtype

    def b_params(self):
        return [self.lora_B.weight]

    def bmm_factors(self, dtype: torch.dtype):
        # plain LoRA only: a variant (DoRA's rescaling, PiSSA's extra term) or a live dropout changes the product
        if (type(self).forward is not LoraLinear.forward or self.variants
                or not (isinstance(self.dropout, nn.Identity) or not self.training)
                or dtype != self.lora_B.weight.dtype):
            return None
        return self.lora_A.weight, self.lora_B.weight, self.scaling

    def _w(self, base):
        w = base_weight(base)
        return w.t() if self.fan_in_fan_out else w

    def _set_w(self, base, w):
        set_base_weight(base, w.t() if self.fan_in_fan_out else w)

    def delta_weight_native(self, base):
        d = LoraDelta.delta_weight(self, base)
        return d.t() if self.fan_in_fan_out else d

    def merge(self, base):
        if self.variant is not None:
            return self.variant.merge(self, base)
        w, d = base_weight(base), self.delta_weight_native(base)
        dt = torch.promote_types(w.dtype, d.dtype)
        set_base_weight(base, w.to(dt) + d.to(dt))

    def unmerge(self, base):
        if self.variant is not None:
            return self.variant.unmerge(self, base)
        w, d = base_weight(base), self.delta_weight_native(base)
        dt = torch.promote_types(w.dtype, d.dtype)
        set_base_weight(base, w.to(dt) - d.to(dt))

    def lora(self, x):
        return self.lora_of(x, self.lora_A.weight, self.lora_B.weight)

    def lora_of(self, x, a, b):
        return F.linear(F.linear(x.to(a.dtype), a), b)  # (..., in) -> (..., r) -> (..., out)

    def product(self):
        return self.product_of(self.lora_B.weight, self.lora_A.weight)

    def product_of(self, b, a):
        return b @ a  # (out, r) @ (r, in) -> (out, in)

    def base_no_bias(self, base, x):
        return F.linear(x.to(self._w(base).dtype), self._w(base))

    def forward(self, x, y, base):
        if self.variant is not None:
            return self.variant.forward(self, x, y, base)
        if not self.plain_product or y.dtype != self.lora_B.weight.dtype:
            return super().forward(x, y, base)
        # fast path: one fused addmm, y + s·(x A^T) B^T, without materialising the scaled branch
        if self.training and isinstance(self.dropout, nn.Dropout) and x.dtype == self.lora_A.weight.dtype:
            # keeps a 1-byte mask, not a dropped-out copy of x
            return lora_dropout_addmm(x, y, self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout.p)
        h = F.linear(self.dropout(x), self.lora_A.weight)  # (..., r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.weight.t(),
                          alpha=self.scaling)
        return out.view(y.shape)


class LoraConv(LoraDelta):
    """nn.Conv1d / nn.Conv2d / nn.Conv3d: A is a conv with the base's kernel, stride and padding to r
    channels, B a 1×1 conv back to the output channels."""

    kind = "conv"

    def __init__(self, base: nn.Module, r: int, alpha: float, cfg: LoraConfig):
        super().__init__()
        if base.groups != 1:
            raise DeltaError(f"lora: grouped/depthwise convolutions (groups={base.groups}) are not supported; "
                             "target the pointwise (1x1, groups=1) convolutions instead")
        self._setup(r, alpha, cfg)
        conv = next(t for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(base, t))  # not a subclass's __init__
        self.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                           bias=False, padding_mode=base.padding_mode, dtype=build_dtype(base))
        self.lora_B = conv(r, base.out_channels, 1, 1, bias=False, dtype=build_dtype(base))
        if type(base).forward is not conv.forward:
            # a subclass that pads in its own forward (TF "same" padding: efficientnet-pytorch's
            # Conv2dStaticSamePadding, timm's Conv2dSame): A must see the padded input too, so it runs
            # through the base's forward.  A plain reference, not a submodule (no second copy in state dicts).
            object.__setattr__(self, "_own_forward_base", base)
        if cfg.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        nn.init.zeros_(self.lora_B.weight)
        self._init_variants(base)

    def lora_B_dtype(self):
        return self.lora_B.weight.dtype

    def b_params(self):
        return [self.lora_B.weight]

    def lora(self, x):
        base = self.__dict__.get("_own_forward_base")
        if base is None:
            return self.lora_B(self.lora_A(x))
        return self.lora_B(call_with(base, self.lora_A.weight, x))  # (B, r, H', W') -> (B, out, H', W')

    def product(self):
        a = self.lora_A.weight  # (r, in, *k)
        b = self.lora_B.weight  # (out, r, 1, ...)
        return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])

    def _channel(self, v, y):
        return v.view(1, -1, *[1] * (y.dim() - 2))

    def _magnitude_layout(self, m, base):
        return m.view(1, -1, *[1] * (base.weight.dim() - 2))  # peft stores conv magnitudes as (1, out, 1, ...)

    def base_no_bias(self, base, x):
        if "_own_forward_base" in self.__dict__:
            return call_with(base, base.weight, x.to(base.weight.dtype))
        return base._conv_forward(x.to(base.weight.dtype), base.weight, None)


def call_with(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``base``'s own forward (its padding included) with ``weight`` and no bias."""
    swap = {"weight": weight}
    if getattr(base, "bias", None) is not None:
        swap["bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return torch.func.functional_call(base, swap, (x,))


class LoraEmbedding(LoraDelta):
    """nn.Embedding: ΔE = s (B A)^T, shape (num_embeddings, dim). peft's init: A = 0, B ~ N(0,1)."""

    kind = "embedding"

    def __init__(self, base: nn.Embedding, r: int, alpha: float, cfg: LoraConfig):
        super().__init__()
        self._setup(r, alpha, cfg)  # refuses DoRA and PiSSA (their variants support no embeddings)
        self.dropout = nn.Identity()  # token ids cannot be dropped out; peft does the same
        dt = build_dtype(base)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, dtype=dt))  # (r, V)
        # (D, r); init="gaussian" too: peft draws embeddings' B from N(0, 1) whatever the init
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r, dtype=dt))

    def b_params(self):
        return [self.lora_embedding_B]

    def forward(self, x, y, base):
        h = F.embedding(x, self.lora_embedding_A.t(), base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)  # (..., r)
        return y + (h @ self.lora_embedding_B.t()) * self.scaling

    def product(self):
        return (self.lora_embedding_B @ self.lora_embedding_A).t()  # (V, D), the weight's layout


# layer types whose LoRA delta lives in a file of its own (methods/lora_mha.py adds nn.MultiheadAttention)
EXTRA_LAYERS: dict[type, type[LoraDelta]] = {}


def _layer_table() -> dict[type, type[LoraDelta]]:
    table: dict[type, type[LoraDelta]] = {nn.Linear: LoraLinear, nn.Conv1d: LoraConv, nn.Conv2d: LoraConv,
                                          nn.Conv3d: LoraConv, nn.Embedding: LoraEmbedding, **EXTRA_LAYERS}
    if conv1d_type() is not None:
        table[conv1d_type()] = LoraLinear
    for t in QUANT_LINEAR_TYPES:
        table[t] = LoraLinear
    return table


def make_delta(base: nn.Module, r: int, alpha: float, cfg: LoraConfig) -> LoraDelta:
    for t, cls in _layer_table().items():
        if isinstance(base, t):
            return cls(base, r, alpha, cfg)
    raise DeltaError(f"lora: layer type {type(base).__name__} is not supported; "
                     f"supported: {[t.__name__ for t in _layer_table()]}")


def _check_rank(path: str, base: nn.Module, r: int) -> None:
    """Refuse an absurd rank before allocating (r=1e8 would ask for gigabytes).  BA has rank <= min(in, out),
    so a larger r only costs memory, but a default r=8 on a thin layer (SwinV2's (512, 2) position-bias MLP)
    must still attach, as in peft: refuse only ranks above twice the layer's largest dimension."""
    if hasattr(base, "in_features") and hasattr(base, "out_features"):  # quantized bases too, no dequantize
        shape = (base.out_features, base.in_features)
    else:
        w = getattr(base, "weight", None)
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) and w.dim() >= 2 else None
    if shape is None:
        return
    smallest, largest = sorted((shape[0], math.prod(shape[1:])))
    if r > 2 * largest:
        raise DeltaError(f"lora: r={r} is too large for {path} (weight {shape}): the update's rank is "
                         f"at most {smallest}; use r <= {smallest} (typical: 4, 8, 16)")


# --------------------------------------------------------------------------- the method

@register
class LoRA(Method):
    name = "lora"
    config_cls = LoraConfig
    peft_type = "LORA"
    summary = "low-rank update s·BA added to frozen weights (with DoRA, rsLoRA, PiSSA, LoRA+)"
    layer_types = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding", "MultiheadAttention",
                   "NF4Linear/Int8Linear")
    default_targets = "all-linear"  # QLoRA (Dettmers et al. 2023): every linear layer beats q,v only

    def attach(self, model, cfg: LoraConfig, name, state):
        paths = self.target_paths(model, cfg, types=tuple(_layer_table()))
        made = []  # build every delta first: a failure leaves the model untouched
        for p in paths:
            base = base_at(model, p)
            r = _pattern_value(p, cfg.rank_pattern, None) or conv_rank(base, cfg.r, cfg.conv_budget)  # r >= 1
            alpha = _pattern_value(p, cfg.alpha_pattern, None) or same_scale_alpha(cfg.alpha, r, cfg.r, cfg.rslora)
            _check_rank(p, base, r)
            made.append((p, make_delta(base, r, alpha, cfg)))
        for p, d in made:
            wrap(model, p, state).deltas[name] = d

    def export(self, model, name, tensors, cfg: LoraConfig):
        cfg = replace(cfg, **explicit_patterns(model, name, cfg))  # convs under conv_budget, by path
        for v in VARIANTS:  # e.g. PiSSA is written as the plain LoRA peft loads
            if v.chosen(cfg):
                tensors, cfg = v.export(model, name, tensors, cfg)
        return tensors, cfg

    def normalize_keys(self, tensors):
        # older peft versions wrote "lora_magnitude_vector.weight"
        return {k.removesuffix(".weight") if k.endswith("lora_magnitude_vector.weight") else k: v
                for k, v in tensors.items()}

    def to_peft(self, cfg: LoraConfig, model, name):
        targets, saved = [], []
        for path, layer in iter_delta_layers(model):
            d = layer.deltas[name] if name in layer.deltas else None
            if isinstance(d, LoraDelta):
                targets.append(path)
            elif isinstance(d, CopyDelta):
                saved.append(path)
        conv1d = conv1d_type()
        fan_in_fan_out = any(conv1d is not None and isinstance(layer.base_layer, conv1d)
                             for _, layer in iter_delta_layers(model))
        return peft_config(cfg, targets, saved, fan_in_fan_out)

    def from_peft(self, d: dict[str, Any]) -> LoraConfig:
        return LoraConfig(**config_kwargs(d))


def lora_plus_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): optimizer param groups where every B matrix gets ``lr * ratio``.

    >>> opt = torch.optim.AdamW(lora_plus_groups(model, lr=2e-4, ratio=16))
    """
    st = get_state(model)
    b_ids = set()
    for _, layer in iter_delta_layers(model):
        for n in st.active:
            d = layer.deltas[n] if n in layer.deltas else None
            if isinstance(d, LoraDelta):
                b_ids.update(id(p) for p in d.b_params())
    params = {id(t): t for n in st.active for t in adapter_tensors(model, n).values() if t.requires_grad}
    a = [p for i, p in params.items() if i not in b_ids]
    b = [p for i, p in params.items() if i in b_ids]
    return [{"params": a, "lr": lr, "weight_decay": weight_decay},
            {"params": b, "lr": lr * ratio, "weight_decay": weight_decay}]
