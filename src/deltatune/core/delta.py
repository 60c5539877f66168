"""The core abstraction: a frozen base module wrapped by a :class:`DeltaLayer` that adds one
:class:`Delta` per named adapter, plus the model-level bookkeeping (which adapters exist, which
are active, which are merged).

    x ──► base_layer(x) ──► y ──► delta_a(x, y) ──► delta_b(x, y') ──► out
            (frozen)             (adapter "a")      (adapter "b")

Two shapes of method share this bookkeeping:

* *adders* (LoRA, IA3, VeRA, bottleneck adapters, ...) put a ``Delta`` into the ``deltas``
  ModuleDict of a ``DeltaLayer`` that wraps the target module;
* *selectors* (BitFit, LayerNorm tuning, sparse masks) train existing tensors and report them
  through ``Method.own_tensors``.

Whatever the shape, :func:`adapter_tensors` is the single source of truth for an adapter: the
same dict decides what trains (``requires_grad``) and what is saved, keyed by the names that
appear in the saved file (peft's key layout).  The core never imports the trainer or the CLI.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from .dtypes import cast_like, module_dtype
from . import model_state

STATE_ATTR = model_state.STATE.attr  # kept for imports; the key is declared in model_state
PREFIX = "base_model.model."  # peft's key prefix, kept so files are interchangeable


class DeltaError(ValueError):
    """A user-facing error: the message says what is wrong and what to do."""


# --------------------------------------------------------------------------- configs

@dataclass
class DeltaConfig:
    """Fields every method understands. Method configs subclass this with the paper's defaults."""

    targets: list[str] | str | None = None
    """Module names to adapt: a list matches exact names or dotted suffixes (peft semantics), a
    string is a regex that must match the whole name, ``"all-linear"`` takes every linear layer
    but the output head, ``None`` uses the method's default for the architecture."""
    exclude: list[str] | str | None = None
    """Names (same syntax as ``targets``) to leave alone even if ``targets`` matches them."""
    modules_to_save: list[str] | str | None = "auto"
    """Modules trained in full and saved with the adapter (a fresh classification head must be).
    ``"auto"`` picks the head of ``*ForSequenceClassification``-style models."""
    autocast_adapter_dtype: bool = True
    """peft's switch: on a float16/bfloat16 base the adapter's trainable tensors are float32 (Adam's
    updates underflow in half precision: fp16 gives NaN, bf16 does not move at lr 1e-4).  False keeps
    them in the base's dtype (half the memory, for inference or bf16-aware optimizers)."""

    method: ClassVar[str] = ""
    size_fields: ClassVar[tuple[str, ...]] = ()
    """Integer options that size an allocation (a rank, a token count): ``dt.load`` bounds them by
    the dimensions of the saved tensors before attaching, so a corrupted config cannot allocate
    gigabytes. A dict-valued field (``rank_pattern``) has each value checked."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = False) -> "DeltaConfig":
        import warnings

        if not isinstance(d, dict):
            raise DeltaError(f"{cls.__name__}: expected a dict of options, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"method"})
        if unknown:
            if strict:
                raise DeltaError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
            warnings.warn(f"{cls.__name__}: ignoring unknown option(s) {unknown} "
                          "(written by a newer deltatune?)", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------- state

@dataclass
class AdapterRecord:
    method: str
    config: DeltaConfig
    trainable: bool = True  # False for adapters loaded for inference only


@dataclass
class DeltaState:
    """Plain-Python bookkeeping shared by the root model and every DeltaLayer (not a Module,
    so it never shows up in state dicts)."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled: bool = False
    # per-row adapter routing for mixed batches: list of adapter names/None, one per batch row
    row_adapters: list[str | None] | None = None
    # how a DeltaLayer runs such a batch, installed by ``dt.mixed`` (mixed.py, a layer above the
    # core) together with row_adapters: router(layer, row_adapters, args, kwargs) -> output
    row_router: Callable | None = None
    # adapters folded in by merge(unload=False), selectors included (their values sit in the base
    # tensors, with no DeltaLayer.merged to say so); unmerge() empties it
    merged: list[str] = field(default_factory=list)


def get_state(model: nn.Module, create: bool = False) -> DeltaState:
    st = model_state.get(model, model_state.STATE)
    if st is None:
        if not create:
            raise DeltaError(f"{type(model).__name__} carries no deltatune adapter; "
                             "call dt.attach(model, ...) or dt.load(model, DIR) first")
        st = DeltaState()
        model_state.put(model, model_state.STATE, st)
    return st


def merged_names(model: nn.Module) -> set[str]:
    """Adapters currently merged into the base weights (by any method, wrapped or selector)."""
    st = model_state.get(model, model_state.STATE)
    out = set(st.merged) if st is not None else set()
    for _, layer in iter_delta_layers(model):
        out.update(layer.merged)
    return out


def has_adapters(model: nn.Module) -> bool:
    st = model_state.get(model, model_state.STATE)
    return bool(st and st.adapters)


# --------------------------------------------------------------------------- base weights
# Quantized bases (deltatune.quant) expose `dequantize()` / `set_weight(w)`; plain layers expose
# `.weight`.  Deltas only ever go through these two functions, so no method branches on the
# backend.

def base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's dense weight in its native layout (Linear: (out, in); Conv1D: (in, out))."""
    if hasattr(base, "dequantize"):
        return base.dequantize()
    return base.weight.data


def set_base_weight(base: nn.Module, w: torch.Tensor) -> None:
    if hasattr(base, "set_weight"):
        base.set_weight(w)
    else:
        base.weight.data.copy_(w.to(base.weight.dtype))


# --------------------------------------------------------------------------- deltas

class Delta(nn.Module):
    """One adapter's change to one base module.

    ``forward(x, y, base)`` gets the module input ``x`` and the base output ``y`` and returns the
    new output.  Mergeable deltas implement ``delta_weight(base)`` (an additive ΔW in the base's
    weight layout) or override ``merge``/``unmerge`` when the change is not additive (DoRA, IA3).
    """

    mergeable: ClassVar[bool] = True
    replaces: ClassVar[bool] = False  # True: called *instead of* the base (modules_to_save copies)
    # True: forward adds a term of x alone (y + f(x)) and merge adds a ΔW that does not read W, so
    # the delta commutes with every other additive delta of its layer (merge order is free)
    additive: ClassVar[bool] = False
    # True: the base reads its weights inside its own forward (nn.MultiheadAttention passes
    # in_proj_weight / out_proj.weight to F.multi_head_attention_forward), so the delta cannot add
    # to its output; it gives ``weight_deltas`` instead and DeltaLayer runs the base on W + ΔW
    reparam: ClassVar[bool] = False

    def weight_deltas(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """``reparam`` deltas: {name of a base parameter (``"out_proj.weight"``): ΔW in its layout}."""
        raise NotImplementedError

    def pre(self, x: torch.Tensor) -> torch.Tensor | None:
        """Optionally transform the input before the base runs (None = no change)."""
        return None

    def param_dtype(self) -> torch.dtype | None:
        """The dtype this delta computes in (that of its first floating parameter)."""
        p = next((p for p in self.parameters() if p.is_floating_point()), None)
        return None if p is None else p.dtype

    def run(self, x, y, base):
        """``forward`` with the dtype rule: x arrives in the delta's dtype, the result leaves in y's."""
        dt = self.param_dtype()
        if dt is not None and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dt:
            x = x.to(dt)
        h = y[0] if isinstance(y, tuple) and y else y  # some HF modules return (hidden, extras...)
        return cast_like(self(x, y, base), h.dtype if isinstance(h, torch.Tensor) else None)

    def run_pre(self, x: torch.Tensor) -> torch.Tensor | None:
        nx = self.pre(x)
        return None if nx is None else cast_like(nx, x.dtype)

    def forward(self, x, y, base):  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        raise DeltaError(f"{type(self).__name__} cannot be merged into the base weights")

    # merges add in the wider of the two dtypes and round once (set_base_weight casts back)
    def merge(self, base: nn.Module) -> None:
        w, d = base_weight(base), self.delta_weight(base)
        dt = torch.promote_types(w.dtype, d.dtype)
        set_base_weight(base, w.to(dt) + d.to(dt))

    def unmerge(self, base: nn.Module) -> None:
        w, d = base_weight(base), self.delta_weight(base)
        dt = torch.promote_types(w.dtype, d.dtype)
        set_base_weight(base, w.to(dt) - d.to(dt))

    def save_key(self, local_key: str) -> str:
        """Map a key of this delta's own state dict to the key used in files (peft layout)."""
        return local_key

    def bmm_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """For mixed batches (``dt.mixed``): ``(A (r, in), B (out, r), scale)`` when, right now and
        for a base output of ``dtype``, this delta computes exactly ``y + scale · (x Aᵀ) Bᵀ``; rows
        of such deltas of one rank then share one batched matmul.  None (the default): the delta
        runs on its own rows."""
        return None


class CopyDelta(Delta):
    """``modules_to_save``: a full trainable copy of the base module, used instead of it.
    Saved under the base's own key names (``classifier.weight``), as peft does."""

    replaces = True

    def __init__(self, base: nn.Module):
        super().__init__()
        import copy

        self.module = copy.deepcopy(base)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        # the copy may be float32 on a half base: floating inputs follow it (DeltaLayer casts back)
        dt = self.param_dtype()
        args = tuple(cast_like(a, dt) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: cast_like(v, dt) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return self.module(*args, **kwargs)

    def merge(self, base: nn.Module) -> None:
        # the copy *becomes* the base: remember the original so unmerge can restore it
        self._orig = {k: v.detach().clone() for k, v in base.state_dict().items()}
        base.load_state_dict(self.module.state_dict())

    def unmerge(self, base: nn.Module) -> None:
        base.load_state_dict(self._orig)
        del self._orig

    def save_key(self, local_key: str) -> str:
        return local_key.removeprefix("module.")


def _keeps_fused_paths_away(module, args):
    return None  # a no-op: its presence alone makes torch's fused transformer layers call forward


class DeltaLayer(nn.Module):
    """Wraps a frozen base module; runs it, then the deltas of the active adapters."""

    def __init__(self, base: nn.Module, state: DeltaState):
        super().__init__()
        self.base_layer = base
        self.deltas = nn.ModuleDict()
        model_state.put(self, model_state.LAYER_STATE, state)  # shared bookkeeping, deliberately not a submodule
        self.merged: list[str] = []
        if isinstance(base, nn.MultiheadAttention):
            # nn.TransformerEncoderLayer's fused eval path reads self_attn.in_proj_weight itself and never
            # calls this layer (the adapter would be ignored); it stands aside when a submodule has a hook
            self.register_forward_pre_hook(_keeps_fused_paths_away)

    def __getattr__(self, name: str):
        # transformers code reads e.g. `self.q_proj.weight` or `.in_features`: forward those reads
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "deltas"):
                raise
            return getattr(self._modules["base_layer"], name)

    def active_deltas(self) -> list[tuple[str, Delta]]:
        st: DeltaState = model_state.get(self, model_state.LAYER_STATE)
        if st.disabled:
            return []
        return [(n, self.deltas[n]) for n in st.active if n in self.deltas and n not in self.merged]

    def forward(self, *args, **kwargs):
        st: DeltaState = model_state.get(self, model_state.LAYER_STATE)
        if st.row_adapters is not None and not st.disabled:
            if st.row_router is None:
                raise DeltaError("row_adapters is set but no row router is installed; route rows with "
                                 "`with dt.mixed(model, rows):` instead of setting DeltaState.row_adapters")
            return st.row_router(self, st.row_adapters, args, kwargs)
        active = self.active_deltas()
        if not active:
            return self.base_layer(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        for _, d in active:
            nx = d.run_pre(x)
            if nx is not None:
                x = nx
                args = (x, *args[1:]) if args else args
        run = next((d for _, d in active if d.replaces), None)
        reparam = [d for _, d in active if d.reparam]
        if reparam:
            y = reparam_forward(self.base_layer, reparam, args, kwargs)
        elif run is None:
            y = self.base_layer(*args, **kwargs)
        else:  # a replacing copy may compute in float32: the layer still answers in the base's dtype
            y = cast_like(run(*args, **kwargs), module_dtype(self.base_layer))
        for _, d in active:
            if not d.replaces and not d.reparam:
                y = d.run(x, y, self.base_layer)
        return y

    def extra_repr(self) -> str:
        return f"adapters={list(self.deltas)}, merged={self.merged}"


def reparam_forward(base: nn.Module, deltas: list[Delta], args: tuple, kwargs: dict):
    """The base's own forward on W + ΣΔW (``reparam`` deltas), without touching its parameters:
    ``torch.func.functional_call`` swaps them for this call only, so gradients reach the deltas and
    the frozen W stays as it is.  The sum is formed in the wider dtype and rounded once into W's
    (fp32 adapters on a half base: the base then computes, and answers, in its own dtype)."""
    over: dict[str, torch.Tensor] = {}
    for d in deltas:
        for k, dw in d.weight_deltas(base).items():
            over[k] = over.get(k, 0) + dw
    params = dict(base.named_parameters())
    merged = {}
    for k, dw in over.items():
        w = params[k]
        merged[k] = (w.to(torch.promote_types(w.dtype, dw.dtype)) + dw).to(w.dtype)
    return torch.func.functional_call(base, merged, args, kwargs)


# --------------------------------------------------------------------------- walking

def iter_delta_layers(model: nn.Module) -> Iterator[tuple[str, DeltaLayer]]:
    """(clean path, layer): the path as it was before wrapping (``base_layer.`` removed)."""
    for path, mod in model.named_modules():
        if isinstance(mod, DeltaLayer):
            yield clean_path(path), mod


def clean_path(path: str) -> str:
    return path.replace(".base_layer.", ".").removeprefix("base_layer.").removesuffix(".base_layer")


def iter_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(clean path, module) for every original module, seen through the wrappers."""
    for path, mod in model.named_modules():
        if isinstance(mod, DeltaLayer) or isinstance(mod, Delta):
            continue
        if ".deltas." in f".{path}." or path.startswith("deltas."):
            continue
        yield clean_path(path), mod


def get_submodule_clean(model: nn.Module, path: str) -> nn.Module:
    """Resolve a clean path, descending through DeltaLayers transparently."""
    mod = model
    for part in path.split(".") if path else []:
        if isinstance(mod, DeltaLayer):
            mod = mod.base_layer
        if part not in mod._modules:
            raise DeltaError(f"no module named {path!r} in {type(model).__name__}")
        mod = mod._modules[part]
    return mod


def wrap(model: nn.Module, path: str, state: DeltaState) -> DeltaLayer:
    """Make sure the module at ``path`` is wrapped by a DeltaLayer and return the wrapper."""
    parent_path, _, child = path.rpartition(".")
    parent = get_submodule_clean(model, parent_path) if parent_path else model
    if isinstance(parent, DeltaLayer):
        parent = parent.base_layer
    mod = parent._modules[child]
    if isinstance(mod, DeltaLayer):
        return mod
    layer = DeltaLayer(mod, state)
    parent._modules[child] = layer
    return layer


def unwrap(model: nn.Module, path: str) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = get_submodule_clean(model, parent_path) if parent_path else model
    if isinstance(parent, DeltaLayer):
        parent = parent.base_layer
    layer = parent._modules[child]
    assert isinstance(layer, DeltaLayer)
    parent._modules[child] = layer.base_layer
