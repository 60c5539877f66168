"""The public verbs: attach, activate, disabled, delete, merge, unmerge, trainable_parameters.

All of them work on the user's own model object; the adapters' bookkeeping lives in a plain
attribute of the root module (``core.DeltaState``) and in ``DeltaLayer`` wrappers.
"""
from __future__ import annotations

import contextlib
import copy as _copy
import dataclasses
import re
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .core import model_state
from .core.delta import (AdapterRecord, CopyDelta, DeltaConfig, DeltaError, DeltaLayer, base_weight,
                         get_state, iter_delta_layers, merged_names, unwrap, wrap)
from .core.method import cast_adapter_dtype, method_of
from .core.adapters import adapter_tensors, base_at, refresh
from .core.targets import modules_to_save_paths
from .methods._compose import check_merge, merge_order
from .safety import describe, first_nonfinite

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):  # "$" alone would accept "a\n"
        raise DeltaError(f"adapter name {name!r} is invalid: use 1-64 letters, digits, '_' or '-' "
                         "(no dots, slashes or spaces)")


def make_config(method: str | DeltaConfig, config: DeltaConfig | None = None, **options) -> DeltaConfig:
    """A method's config from a config object or keyword options, with a clear error for typos."""
    if isinstance(method, DeltaConfig):
        config, method = method, method.method
    m = method_of(method)
    fields = {f.name for f in dataclasses.fields(m.config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        import difflib

        hints = {u: difflib.get_close_matches(u, fields, n=1) for u in unknown}
        hint = "; ".join(f"{u!r} (did you mean {h[0]!r}?)" if h else repr(u) for u, h in hints.items())
        raise DeltaError(f"method {method!r} has no option {hint}. Options: {sorted(fields)}")
    if config is not None:
        return dataclasses.replace(config, **options) if options else config
    return m.config_cls(**options)


def attach(model: nn.Module, method: str | DeltaConfig = "lora", config: DeltaConfig | None = None, *,
           name: str = "default", **options) -> nn.Module:
    """Freeze ``model`` and add adapter ``name`` of ``method``; returns the same model object.

    The new adapter becomes active when no other adapter is active (switch with ``activate``)."""
    cfg = make_config(method, config, **options)
    m = method_of(cfg.method)
    _check_name(name)
    st = get_state(model, create=True)
    if name in st.adapters:
        raise DeltaError(f"model already has an adapter named {name!r} ({st.adapters[name].method}); "
                         f"pass another name=..., or dt.delete(model, {name!r}) first")
    if merged_names(model):
        raise DeltaError("adapters are merged into the base weights; call dt.unmerge(model) before attaching")
    st.adapters[name] = AdapterRecord(cfg.method, cfg)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        m.attach(model, cfg, name, st)
        for path in modules_to_save_paths(model, cfg.modules_to_save):
            inner = [p for p, layer in iter_delta_layers(model)
                     if p.startswith(path + ".") and name in layer.deltas]
            if inner:  # the copy would hold this adapter's own wrappers and train twice
                raise DeltaError(f"targets include {inner[0]!r}, inside {path!r}, which modules_to_save already "
                                 f"trains in full; exclude it (exclude=[{path!r}]) or pass modules_to_save=None")
            wrap(model, path, st).deltas[name] = CopyDelta(base_at(model, path))
        cast_adapter_dtype(model, name, cfg.autocast_adapter_dtype)  # one dtype rule for every method
    except BaseException:  # leave the model exactly as it was
        _remove(model, name)
        for p, g in grads:
            p.requires_grad_(g)
        if not st.adapters:
            model_state.pop(model, model_state.STATE)
        raise
    for _, layer in iter_delta_layers(model):  # new modules start in train mode: follow the model
        layer.train(layer.base_layer.training)
    if not st.active:
        st.active = [name]
    refresh(model)
    return model


def activate(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make ``names`` the active adapter(s); the others stay attached but do nothing."""
    st = get_state(model)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in st.adapters]
    if unknown:
        raise DeltaError(f"unknown adapter(s) {unknown}; attached: {sorted(st.adapters)}")
    if merged_names(model):
        raise DeltaError("adapters are merged into the base weights; call dt.unmerge(model) before switching")
    for path, layer in iter_delta_layers(model):  # two full copies of one module cannot both run
        copies = [n for n in names if n in layer.deltas and layer.deltas[n].replaces]
        if len(copies) > 1:
            raise DeltaError(f"adapters {copies} each keep their own trained copy of {path} (modules_to_save); only "
                             "one copy can run at a time - activate them one at a time, or attach one with "
                             "modules_to_save=None")
    st.active = names
    refresh(model)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    return list(get_state(model).active)


def adapters(model: nn.Module) -> dict[str, DeltaConfig]:
    """name -> config of every attached adapter."""
    return {n: r.config for n, r in get_state(model).adapters.items()}


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block (merged adapters are unmerged for its duration)."""
    st = get_state(model)
    was_merged = bool(merged_names(model))
    if was_merged:
        unmerge(model)
    prev = st.disabled
    st.disabled = True
    refresh(model)
    try:
        yield model
    finally:
        st.disabled = prev
        refresh(model)
        if was_merged:
            merge(model, unload=False)


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` and every wrapper it leaves empty."""
    st = get_state(model)
    if name not in st.adapters:
        raise DeltaError(f"no adapter named {name!r} to delete; attached: {sorted(st.adapters)}")
    if name in merged_names(model):
        raise DeltaError(f"adapter {name!r} is merged; call dt.unmerge(model) before deleting it")
    was_active = name in st.active
    _remove(model, name)
    if was_active and not st.active and st.adapters:
        # peft's rule: deleting the active adapter activates the first one left (loudly), rather
        # than silently running the bare base
        st.active = [next(iter(st.adapters))]
        warnings.warn(f"adapter {name!r} was active and is now deleted; adapter {st.active[0]!r} is active now",
                      stacklevel=2)
    refresh(model)
    return model


def _remove(model: nn.Module, name: str) -> None:
    st = get_state(model)
    rec = st.adapters.get(name)
    if rec is not None:
        method_of(rec.method).on_activate(model, name, False)
        method_of(rec.method).delete(model, name)
    for path, layer in list(iter_delta_layers(model)):
        if name in layer.deltas:
            del layer.deltas[name]
            if not len(layer.deltas):
                unwrap(model, path)
    st.adapters.pop(name, None)
    st.active = [n for n in st.active if n != name]


def _check_mergeable(model: nn.Module, names: list[str]) -> None:
    """Raise before any weight changes if one of ``names`` cannot be merged exactly: unknown,
    a method or delta that cannot merge, a tied weight, a composition order merging would break,
    or NaN/Inf in the adapter (a diverged run's)."""
    st = get_state(model)
    for n in names:
        if n not in st.adapters:
            raise DeltaError(f"no adapter named {n!r}; attached: {sorted(st.adapters)}")
        m = method_of(st.adapters[n].method)
        if not m.mergeable:
            raise DeltaError(f"adapter {n!r} ({m.name}) cannot be merged into the weights: {m.merge_note}. "
                             "Keep it unmerged, or dt.delete it before merging the others")
    for path, layer in iter_delta_layers(model):
        for n in names:
            if n in layer.deltas and not layer.deltas[n].mergeable:
                raise DeltaError(f"adapter {n!r} on {path} ({type(layer.deltas[n]).__name__}) cannot be "
                                 "merged exactly; keep it unmerged")
    owners: dict[int, list[str]] = {}
    for pn, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pn)
    for path, layer in iter_delta_layers(model):
        w = getattr(layer.base_layer, "weight", None)
        if any(n in layer.deltas for n in names) and w is not None and len(owners.get(id(w), [])) > 1:
            raise DeltaError(f"cannot merge into {path}: its weight is tied to {owners[id(w)]} and merging would "
                             "change those too; untie the weights first or keep the adapter unmerged")
    check_merge(model, names)  # composed adapters: refuse merges that would not be exact

    for n in names:  # never fold NaN/Inf into the weights (a diverged run's adapter)
        tensors = adapter_tensors(model, n)
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise DeltaError(f"adapter {n!r}: {bad} has {describe(tensors[bad])}; refusing to merge it into "
                             "the weights - load an earlier checkpoint of the adapter")


def _fold_layers(model: nn.Module, names: list[str], unload: bool) -> None:
    """Merge ``names`` into every wrapped layer's base, in forward order; if any layer's merged
    weights are not finite, every layer is put back as it was and a DeltaError says where."""
    st = get_state(model)
    done: list[tuple[DeltaLayer, str, nn.Module]] = []  # (layer, adapter, base before to_float): for rollback
    for path, layer in iter_delta_layers(model):
        todo = merge_order(layer, names, st.active)  # forward order, input scalings last
        if not todo:
            continue
        orig_base = layer.base_layer
        if unload and hasattr(layer.base_layer, "to_float"):
            # merging into 4/8-bit storage would round the delta away: merge into a float copy
            layer.base_layer = layer.base_layer.to_float()
        snapshot = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
        for n in todo:
            layer.deltas[n].merge(layer.base_layer)
            layer.merged.append(n)
        merged_w = dict(layer.base_layer.state_dict())
        if hasattr(layer.base_layer, "dequantize"):
            merged_w["weight"] = base_weight(layer.base_layer)
        bad = first_nonfinite(merged_w)
        if bad is not None:  # put every weight back as it was, then refuse
            layer.base_layer.load_state_dict(snapshot)
            layer.merged = [m for m in layer.merged if m not in todo]
            layer.base_layer = orig_base
            for lay, n, ob in reversed(done):
                if lay.base_layer is ob:  # else it merged into a float copy: the original is intact
                    lay.deltas[n].unmerge(lay.base_layer)
                lay.merged.remove(n)
            for lay, _, ob in done:
                lay.base_layer = ob
            raise DeltaError(f"merging {todo} into {path} gives {bad} with {describe(merged_w[bad])}; "
                             "nothing was merged. The base or the adapter overflows in this dtype: "
                             "merge in float32")
        done += [(layer, n, orig_base) for n in todo]


def merge(model: nn.Module, names: str | list[str] | None = None, *, unload: bool = True,
          copy: bool = False) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights.

    ``unload=True`` (default) returns the plain base model, of the base's own class, with every
    wrapper removed (like peft's ``merge_and_unload``); ``copy=True`` leaves ``model`` untouched.
    ``unload=False`` merges in place and keeps the adapters so that :func:`unmerge` can undo it.
    Raises before touching any weight if one of the adapters cannot be merged exactly."""
    st = get_state(model)
    names = st.active if names is None else ([names] if isinstance(names, str) else list(names))
    _check_mergeable(model, names)
    if copy:
        model = _copy.deepcopy(model)
        st = get_state(model)
    with torch.no_grad():
        _fold_layers(model, names, unload)
        for n in names:
            method_of(st.adapters[n].method).merge(model, n)
        st.merged += [n for n in names if n not in st.merged]
    if unload:
        for n, rec in list(st.adapters.items()):
            method_of(rec.method).unload(model, n)
        for path, _ in list(iter_delta_layers(model)):
            unwrap(model, path)
        model_state.pop(model, model_state.STATE)
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge(model, unload=False)``: restore the base weights exactly (to float rounding)."""
    st = get_state(model)
    with torch.no_grad():
        for _, layer in iter_delta_layers(model):
            for n in reversed(layer.merged):
                layer.deltas[n].unmerge(layer.base_layer)
            layer.merged = []
        for n in st.active:
            method_of(st.adapters[n].method).unmerge(model, n)
        st.merged = []
    return model


@dataclass
class ParamCount:
    trainable: int
    total: int
    by_adapter: dict[str, int]
    names: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        per = ", ".join(f"{k}: {v:,}" for k, v in self.by_adapter.items())
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}" + (f" || by adapter: {per}" if per else ""))


def trainable_parameters(model: nn.Module) -> ParamCount:
    """What trains now: counts overall, per adapter, and per tensor."""
    seen: set[int] = set()
    total = trainable = 0
    names: dict[str, int] = {}
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            names[n] = p.numel()
    by: dict[str, int] = {}
    st = model_state.get(model, model_state.STATE)
    if st is not None:
        for a in st.adapters:
            by[a] = sum(t.numel() for t in adapter_tensors(model, a).values())
    return ParamCount(trainable, total, by, names)
