"""Quantized frozen bases: QLoRA's 4-bit NormalFloat and int8 per-channel (Dettmers et al. 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314).

    W (out×in, float) ──► NF4: 4-bit codes q (2 per byte), one absmax c per block of 64 weights
                            W ≈ c_b · NF4[q]   NF4 = 16 quantiles of N(0,1) scaled to [-1, 1]
                          double quant: c ──► 8-bit codes + one fp32 absmax per 256 scales
                          (≈ 4 + 8/64 + 32/(64·256) = 4.127 bits per weight)
                     ──► int8: W ≈ s ⊙ round(W / s),  s = max|W_row| / 127 per output channel

    y = x · dequant(q)ᵀ + b      forward AND backward dequantize on the fly: autograd saves the
                                 packed codes, never an fp32 copy of W (so QLoRA saves memory)

Calibrated NF4 (``quantize(model, "nf4", calibration=batches)``): the same storage, but each
block's scale is chosen to minimise the error the layer's *output* sees rather than c = absmax:

    s_b = argmin_s Σ_{j∈b} h_j (w_j − s·NF4[q_j])²     h_j = E[x_j²] of input feature j (calibration)
    candidates ±{1, .85, .7}·absmax, then 2 Lloyd steps (q_j = nearest level; s = Σhwc / Σhc²)

A negative s flips the block, so its values use NF4's denser positive half (8 levels above 0, 7
below); bitsandbytes decodes code·s whatever the sign.  Measured (bench/nf4_quality.py, SmolLM2-135M
perplexity, fp32 49.96): absmax 61.1 (+22 %), calibrated 52.3 (+4.7 %; 16 s to quantize instead of
1.4 s).  Plain weight-MSE scales (h = 1) lower the weight error 20 % but not the output-weighted
error (+12 %): they clip large weights that meet large activations; perplexity moved 59-63 with
the search's settings, so it is not offered without calibration.

The layers (:class:`NF4Linear`, :class:`Int8Linear`, and Conv1D variants for GPT-2 created on
demand) replace ``nn.Linear``/``Conv1D`` in place; every additive method wraps them like any
linear layer and reaches the weight only through ``dequantize()`` / ``set_weight()``
(``core.base_weight`` / ``core.set_base_weight``), so no method branches on the backend.
The storage codecs (bitsandbytes, nibble packing, the dequantizing matmuls) and why bitsandbytes
was chosen are in ``quant/codecs.py``.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..api import merge as api_merge
from ..core import layer_types as quant_registry
from ..core import model_state
from ..core.layer_types import conv1d_type
from ..core.delta import DeltaError, get_submodule_clean, iter_base_modules, iter_delta_layers
from .codecs import BLOCK_SIZES, DequantMatmul, Int8Matmul, bnb, code_table, pack_nibbles
from .search import input_stats, nf4_codes, search_scales
from ..core.targets import HEAD_NAMES, matches, no_match_message

__all__ = ["NF4Linear", "Int8Linear", "QuantLinear", "quantize", "merge", "lossy_merge",
           "SCHEMES", "MergeReport", "input_stats"]

_bnb, _table = bnb, code_table  # the names quant/load.py and the NF4 tests reach through this module


# --------------------------------------------------------------------------- rounding report

@dataclass
class Rounding:
    """How much of a weight change survives requantization, for one layer."""

    change: float  # ‖ΔW‖_F: the update being written (merge: the adapter's ΔW)
    error: float  # ‖requant(W+ΔW) − (W+ΔW)‖_F: what the storage format rounds away
    max_abs: float  # max |rounding error| of one weight

    @property
    def relative(self) -> float:
        return self.error / max(self.change, 1e-30)

    def __str__(self) -> str:
        return f"rounding ‖err‖={self.error:.3g} ({100 * self.relative:.0f}% of ‖ΔW‖={self.change:.3g}), max {self.max_abs:.3g}"


# --------------------------------------------------------------------------- layers

class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized. Subclasses define the storage
    (``_store``), its inverse (``_dequant``, layout (out, in)) and the matmul (``_matmul``)."""

    scheme: ClassVar[str] = ""
    fan_in_fan_out: ClassVar[bool] = False  # True for the GPT-2 Conv1D variants: native layout (in, out)
    _STATS: ClassVar[tuple[str, ...]] = ()  # float buffers that stay fp32 under model.to(dtype)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "", **options):
        nn.Module.__init__(self)  # not super(): the Conv1D variants must not run Conv1D.__init__
        w = weight.detach()
        w = w.t() if self.fan_in_fan_out else w  # (out, in)
        if w.dim() != 2 or not w.is_floating_point():
            raise DeltaError(f"cannot quantize {name or 'layer'}: weight must be a 2-D float tensor, got "
                             f"{tuple(w.shape)} {w.dtype}")
        if w.is_meta:
            raise DeltaError(f"cannot quantize {name or 'layer'}: its weight is on the meta device (not loaded); "
                             "use dt.load_quantized(path, ...) to quantize while loading")
        self.out_features, self.in_features = w.shape
        if self.fan_in_fan_out:  # Conv1D's attribute names, read by transformers' GPT-2 code
            self.nf, self.nx = self.out_features, self.in_features
        self.compute_dtype = w.dtype if w.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        self.options = options
        self.name = name  # for error messages
        self.allow_lossy = False  # set_weight refuses to round an update away unless True
        self.last_rounding: Rounding | None = None
        # registered even when None (like nn.Linear), so BitFit's add_missing can add one
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False))
        self._store(w.to(self.compute_dtype).contiguous())

    # -- what HF code and the methods read
    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the native layout. Costly (a full float copy): prefer
        ``in_features``/``out_features``/``dtype``/``device`` for metadata."""
        return self.dequantize()

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self) -> torch.Tensor:
        """The dense weight, native layout (Linear (out, in); Conv1D (in, out)), compute dtype."""
        w = self._dequant()
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self._matmul(x.to(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    # -- writing: used by in-place merges (core.set_base_weight)
    def rounding(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], Rounding]:
        """Quantize ``w`` (native layout) without storing it: (new buffers, rounding report)."""
        w_oi = (w.t() if self.fan_in_fan_out else w).detach().to(self.compute_dtype).contiguous()
        probe = type(self)(w_oi.t() if self.fan_in_fan_out else w_oi, None, self.name, **self.options)
        new = probe._dequant().float()
        change = (w_oi.float() - self._dequant().float()).norm().item()
        err = new - w_oi.float()
        return dict(probe._buffers), Rounding(change, err.norm().item(), err.abs().max().item())

    def set_weight(self, w: torch.Tensor, allow_lossy: bool | None = None) -> None:
        """Requantize to ``w`` (native layout). Refuses unless lossy writes are allowed, because
        the storage grid is coarse: a small update (an adapter's ΔW) is mostly rounded away."""
        bufs, rep = self.rounding(w)
        self.last_rounding = rep
        if not (self.allow_lossy if allow_lossy is None else allow_lossy):
            raise DeltaError(
                f"refusing a lossy in-place merge into {self.scheme} storage of {self.name or 'a layer'}: {rep}. "
                "Use dt.merge(model) (merges into a float copy of the dequantized base) or "
                "deltatune.quant.merge(model, requantize=True); to merge in place anyway wrap the call in "
                "`with deltatune.quant.lossy_merge(model):`")
        for k, v in bufs.items():
            if k != "bias":
                self._buffers[k] = v.to(self.qweight.device)

    def to_float(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) holding the dequantized weight; shares the bias."""
        w = self.dequantize()
        if self.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            m = Conv1D(self.out_features, self.in_features)
        else:
            m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        m.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            m.bias = self.bias
        return m.train(self.training)

    @classmethod
    def from_float(cls, module: nn.Module, name: str = "", **options) -> "QuantLinear":
        conv1d = conv1d_type()
        k = _variant(cls) if conv1d is not None and isinstance(module, conv1d) else cls
        return k(module.weight, getattr(module, "bias", None), name, **options).train(module.training)

    # -- keep the quantization statistics in fp32 and on the storage's device under .to()/.half()
    def _apply(self, fn, recurse=True):
        stats = {k: self._buffers.pop(k) for k in self._STATS if k in self._buffers}
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.empty((), dtype=self.compute_dtype))
            if probe.is_floating_point():
                self.compute_dtype = probe.dtype
        finally:
            for k, v in stats.items():
                self._buffers[k] = v.to(self.qweight.device)
        return self

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))
        opts += ", calibrated" if any(isinstance(v, torch.Tensor) for v in self.options.values()) else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.scheme}" + (f"({opts})" if opts else "") + f", compute_dtype={self.compute_dtype}")

    def _store(self, w: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _dequant(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class NF4Linear(QuantLinear):
    """4-bit NormalFloat storage (bitsandbytes): packed codes (out·in/2 bytes) + blockwise absmax,
    double-quantized to 8 bits by default.  ``input_sq`` (in,), the mean square of each input
    feature, switches from absmax to the calibrated scale search (same storage format)."""

    scheme = "nf4"
    _STATS = ("absmax", "offset", "absmax2")

    def __init__(self, weight, bias=None, name="", block_size: int = 64, double_quant: bool = True,
                 input_sq: torch.Tensor | None = None):
        if block_size not in BLOCK_SIZES:
            raise DeltaError(f"nf4: block_size must be one of {BLOCK_SIZES}, got {block_size!r} (QLoRA uses 64)")
        opts = {} if input_sq is None else {"input_sq": input_sq}  # kept, so merges requantize the same way
        super().__init__(weight, bias, name, block_size=block_size, double_quant=double_quant, **opts)

    def _store(self, w):  # w (out, in)
        _, bf = bnb()
        bs, dq, h = self.options["block_size"], self.options["double_quant"], self.options.get("input_sq")
        if h is None:  # bitsandbytes' own quantization: c = absmax
            q, st = bf.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)
            absmax, offset, state2 = st.absmax, st.offset, st.state2
        else:
            code = code_table("nf4", w.device)
            scale = search_scales(w, h, bs, code)  # (blocks,) fp32, signed
            absmax, offset, state2 = scale, None, None
            if dq:  # bitsandbytes' double quantization, then round against the scales it decodes
                offset = scale.mean()
                absmax, state2 = bf.quantize_blockwise(scale - offset, blocksize=256)
                scale = bf.dequantize_blockwise(absmax, state2) + offset
            q = pack_nibbles(nf4_codes(w, scale, bs, code))
        self.register_buffer("qweight", q)  # (out·in/2, 1) uint8, two codes per byte
        self.register_buffer("absmax", absmax)  # (blocks,) fp32, or uint8 when double-quantized
        if dq:
            self.register_buffer("offset", offset.reshape(()))  # mean of the block scales
            self.register_buffer("absmax2", state2.absmax)  # (blocks/256,) fp32
            self.block_size2 = state2.blocksize

    def quant_state(self):
        _, bf = bnb()
        s2 = None
        if self.options["double_quant"]:
            s2 = bf.QuantState(absmax=self.absmax2, code=code_table("dynamic8", self.absmax2.device),
                               blocksize=self.block_size2, dtype=torch.float32)
        return bf.QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                             code=code_table("nf4", self.qweight.device), blocksize=self.options["block_size"], quant_type="nf4",
                             dtype=self.compute_dtype, offset=getattr(self, "offset", None), state2=s2)

    @property
    def _rows_split_blocks(self) -> bool:
        # bitsandbytes 0.50's CPU kernel indexes block scales per row (row·(in // block) + col // block),
        # which misreads the flat blocking whenever a block crosses a row (in % block ≠ 0, e.g. in = 32)
        return self.in_features % self.options["block_size"] != 0

    def _dequant(self):
        _, bf = bnb()
        if self._rows_split_blocks:  # decode as one flat row (exact), then reshape
            st = self.quant_state()
            st.shape = torch.Size((1, self.out_features * self.in_features))
            return bf.dequantize_4bit(self.qweight, st).view(self.out_features, self.in_features)
        return bf.dequantize_4bit(self.qweight, self.quant_state())  # (out, in)

    def _matmul(self, x):
        if self._rows_split_blocks:
            return DequantMatmul.apply(x, self)
        bitsandbytes, _ = bnb()
        # MatMul4Bit saves the packed codes and dequantizes again in backward for dL/dx
        return bitsandbytes.matmul_4bit(x, self.qweight.t(), quant_state=self.quant_state())


class Int8Linear(QuantLinear):
    """int8 per-output-channel absmax (LLM.int8's weight format without the outlier split)."""

    scheme = "int8"
    _STATS = ("scale",)

    def __init__(self, weight, bias=None, name=""):
        super().__init__(weight, bias, name)

    def _store(self, w):  # w (out, in)
        scale = w.float().abs().amax(1).clamp_min(1e-12) / 127  # (out,)
        self.register_buffer("qweight", torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def _dequant(self):
        return (self.qweight.float() * self.scale[:, None]).to(self.compute_dtype)  # (out, in)

    def _matmul(self, x):
        return Int8Matmul.apply(x, self.qweight, self.scale)


SCHEMES: dict[str, type[QuantLinear]] = {"nf4": NF4Linear, "int8": Int8Linear}
quant_registry.QUANT_LINEAR_TYPES.extend(SCHEMES.values())


@functools.cache
@functools.cache
def _variant(cls: type[QuantLinear]) -> type[QuantLinear]:
    """``NF4Conv1D`` etc.: a quantized layer that *is* a transformers Conv1D (GPT-2), so methods
    see the Conv1D layout (weight (in, out)) exactly as with the float layer."""
    name = cls.__name__.replace("Linear", "Conv1D")
    k = type(name, (cls, conv1d_type()), {"__module__": __name__, "fan_in_fan_out": True,
                                            "__repr__": nn.Module.__repr__})
    globals()[name] = k  # picklable by name
    quant_registry.QUANT_LINEAR_TYPES.append(k)
    return k


# --------------------------------------------------------------------------- quantize a model

def _float_linear_types() -> tuple[type, ...]:
    c = conv1d_type()
    return (nn.Linear,) if c is None else (nn.Linear, c)


def _scheme(scheme: str) -> type[QuantLinear]:
    if scheme not in SCHEMES:
        raise DeltaError(f"unknown quantization scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def _options(scheme: str, double_quant: bool, block_size: int) -> dict[str, Any]:
    return {"block_size": block_size, "double_quant": double_quant} if scheme == "nf4" else {}


def plan(model: nn.Module, targets=None, skip=HEAD_NAMES) -> list[str]:
    """Paths of the layers ``quantize`` would replace; clear errors for unsupported ones."""
    if any(True for _ in iter_delta_layers(model)):
        raise DeltaError("quantize the base before attaching adapters: dt.attach(dt.quantize(model, 'nf4'), ...)")
    lin = _float_linear_types()
    mods = [(p, m) for p, m in iter_base_modules(model) if p]
    if targets is None:
        paths = [p for p, m in mods if isinstance(m, lin) and type(m) in lin]
    else:
        paths = [p for p, _ in mods if matches(p, targets)]
        if not paths:
            raise DeltaError(no_match_message(model, targets))
        bad = [(p, m) for p, m in mods if p in paths and not (isinstance(m, lin) and type(m) in lin)]
        if bad:
            p, m = bad[0]
            what = "already quantized" if isinstance(m, QuantLinear) else "not supported"
            raise DeltaError(f"cannot quantize {p!r} ({type(m).__name__}): {what}; supported layer types: "
                             f"{[t.__name__ for t in lin]} (narrow targets=... or add it to skip=...)")
    paths = [p for p in paths if not matches(p, list(skip) if not isinstance(skip, str) else skip)]
    owners: dict[int, list[str]] = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(t), []).append(n)
    for p in paths:
        w = get_submodule_clean(model, p).weight
        if len(owners.get(id(w), [])) > 1:
            raise DeltaError(f"cannot quantize {p!r}: its weight is tied to {owners[id(w)]}; add it to skip=... "
                             "(the tied embedding stays float)")
    return paths


def quantize(model: nn.Module, scheme: str = "nf4", targets=None, skip=HEAD_NAMES, double_quant: bool = True,
             block_size: int = 64, calibration: Iterable | None = None) -> nn.Module:
    """Replace the frozen linear layers of ``model`` by quantized storage, in place; returns ``model``.

    ``targets`` (peft pattern syntax, default every nn.Linear / GPT-2 Conv1D) minus ``skip``
    (default: output heads such as ``lm_head`` or ``classifier``, which stay float).
    ``calibration`` (nf4 only): a batch or an iterable of batches (an input_ids tensor, or a dict
    of model keyword arguments), run once through the float model; each NF4 block's scale is then
    searched to minimise the error weighted by the inputs' mean squares (module docstring) instead
    of being the block's absmax.  A few batches of text like the task's (bench/nf4_quality.py: 16×128
    tokens) are enough."""
    cls = _scheme(scheme)
    opts = _options(scheme, double_quant, block_size)
    if scheme == "nf4":
        if block_size not in BLOCK_SIZES:
            raise DeltaError(f"nf4: block_size must be one of {BLOCK_SIZES}, got {block_size!r} (QLoRA uses 64)")
        bnb()
    elif calibration is not None:
        raise DeltaError(f"calibration applies to scheme 'nf4' only ({scheme!r} keeps per-channel absmax)")
    paths = plan(model, targets, skip)
    if not paths:
        raise DeltaError(f"no linear layer to quantize in {type(model).__name__} (heads are skipped: skip={skip!r}); "
                         f"supported layer types: {[t.__name__ for t in _float_linear_types()]}")
    stats = input_stats(model, paths, calibration) if calibration is not None else {}
    for p in paths:
        parent_path, _, child = p.rpartition(".")
        parent = get_submodule_clean(model, parent_path) if parent_path else model
        old = parent._modules[child]
        extra = {"input_sq": stats[p]} if p in stats else {}
        parent._modules[child] = cls.from_float(old, name=p, **opts, **extra)
        del old  # the float weight is freed here unless the caller holds it
    for prm in model.parameters():
        prm.requires_grad_(False)
    model_state.put(model, model_state.QUANT, {"scheme": scheme, **opts, "calibrated": bool(stats)})
    return model


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for p, m in iter_base_modules(model):
        if isinstance(m, QuantLinear):
            yield p, m


# --------------------------------------------------------------------------- merging

@dataclass
class MergeReport:
    """Per-layer rounding of a merge into a quantized base."""

    requantized: str | None
    layers: dict[str, Rounding] = field(default_factory=dict)

    @property
    def worst(self) -> tuple[str, Rounding] | None:
        return max(self.layers.items(), key=lambda kv: kv[1].relative, default=None)

    def __str__(self) -> str:
        if not self.requantized:
            return (f"merged {len(self.layers)} quantized layer(s) into float copies of the dequantized base: exact "
                    "(no rounding)")
        w = self.worst
        mean = sum(r.relative for r in self.layers.values()) / max(len(self.layers), 1)
        return (f"merged and re-quantized {len(self.layers)} layer(s) to {self.requantized}: rounding is on average "
                f"{100 * mean:.0f}% of ‖ΔW‖" + (f"; worst {w[0]}: {w[1]}" if w else ""))


def merge(model: nn.Module, names=None, *, requantize: bool = False, copy: bool = False) -> tuple[nn.Module, MergeReport]:
    """Merge adapters of a model with a quantized base into float copies of the dequantized
    layers (exact), optionally re-quantizing them with the same scheme; reports the rounding.

    Returns ``(plain model, report)``; see ``dt.merge`` for ``names`` and ``copy``."""
    olds = {p: layer.base_layer for p, layer in iter_delta_layers(model) if isinstance(layer.base_layer, QuantLinear)}
    merged = api_merge(model, names, unload=True, copy=copy)
    report = MergeReport(requantized=None)
    with torch.no_grad():
        for p, old in olds.items():
            m = get_submodule_clean(merged, p)
            w = m.weight.detach()
            change = (w.float() - old.dequantize().float()).norm().item()
            if not requantize:
                report.layers[p] = Rounding(change, 0.0, 0.0)
                continue
            report.requantized = old.scheme
            q = SCHEMES[old.scheme].from_float(m, name=p, **old.options)
            err = q.dequantize().float() - w.float()
            report.layers[p] = Rounding(change, err.norm().item(), err.abs().max().item())
            parent_path, _, child = p.rpartition(".")
            parent = get_submodule_clean(merged, parent_path) if parent_path else merged
            parent._modules[child] = q
    return merged, report


@contextlib.contextmanager
def lossy_merge(model: nn.Module) -> Iterator[MergeReport]:
    """Allow in-place merges (``dt.merge(model, unload=False)``) to requantize the base; the
    yielded report lists what each layer rounded away."""
    layers = dict(quantized_layers(model))
    report = MergeReport(requantized="in place")
    for m in layers.values():
        m.allow_lossy, m.last_rounding = True, None
    try:
        yield report
    finally:
        for p, m in layers.items():
            m.allow_lossy = False
            if m.last_rounding is not None:
                report.layers[p] = m.last_rounding
