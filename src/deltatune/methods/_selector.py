"""Shared machinery of *selector* methods (BitFit, LayerNorm tuning): train tensors the model
already has, instead of adding modules.

    module.bias ──► (frozen original, kept aside)
          ▲
          └── swapped for adapter "a"'s own trainable copy while "a" is active

Each named adapter owns a trainable copy of every selected tensor (initialised from the
original).  Activating the adapter puts its copies into the model in place of the originals
(``module._parameters[name] = copy``); deactivating, disabling or deleting it puts the frozen
originals back.  So several selector adapters can live on one model, switch in O(#tensors),
and ``dt.disabled`` gives the untouched base.

The bookkeeping lives in the selected module's ``__dict__`` (``_dt_selected``: not a submodule,
not in the state dict, copied by ``copy.deepcopy``)::

    module.__dict__["_dt_selected"] = {"bias": {"orig": Parameter, "by": {adapter: Parameter}}}

The saved file holds the adapter's tensor **values** (not differences), keyed by the parameter's
own path (``encoder.layer.0.attention.self.query.bias``): loading onto a fresh copy of the base
reproduces the outputs exactly, and a file is directly readable as "the fine-tuned biases".
Merging is trivial (the values are already in place); ``unload`` keeps them and drops the
originals.  Two active selector adapters that select the same tensor cannot both be in place:
that is refused with a clear error.
"""
from __future__ import annotations

import re

from torch import nn

from ..core import DeltaError, Method, get_state, iter_base_modules

SEL = "_dt_selected"


def _selections(model: nn.Module):
    """(clean module path, module, {param name: record}) for every module carrying selections."""
    for path, mod in iter_base_modules(model):
        sel = mod.__dict__.get(SEL)
        if sel:
            yield path, mod, sel


def _key(path: str, pname: str) -> str:
    return f"{path}.{pname}" if path else pname


class SelectorMethod(Method):
    """A method that trains existing tensors. Subclasses implement :meth:`pick`, returning
    ``[(module path, module, parameter name)]``, and may add Deltas in :meth:`attach_extra`."""

    merge_note = ""

    def pick(self, model: nn.Module, cfg) -> list[tuple[str, nn.Module, str]]:  # pragma: no cover
        raise NotImplementedError

    def attach_extra(self, model, cfg, name, state, picked) -> None:
        """Hook for adders bundled with a selector (BitFit's ``add_missing`` biases)."""

    def attach(self, model, cfg, name, state):
        picked = self.pick(model, cfg)
        self.attach_extra(model, cfg, name, state, picked)  # may raise: nothing selected yet
        for _, mod, pname in picked:
            orig = mod._parameters[pname]
            rec = mod.__dict__.setdefault(SEL, {}).setdefault(pname, {"orig": orig, "by": {}})
            copy = nn.Parameter(rec["orig"].detach().clone(), requires_grad=False)
            rec["by"][name] = copy

    def own_tensors(self, model, name):
        return {_key(path, p): rec["by"][name] for path, _, sel in _selections(model)
                for p, rec in sel.items() if name in rec["by"]}

    def on_activate(self, model, name, active):
        for path, mod, sel in _selections(model):
            for pname, rec in sel.items():
                mine = rec["by"].get(name)
                if mine is None:
                    continue
                cur = mod._parameters[pname]
                if active and cur is not mine:
                    other = next((n for n, p in rec["by"].items() if p is cur), None)
                    if other is not None and other in get_state(model).active:
                        raise DeltaError(
                            f"{self.name} adapter {name!r} and adapter {other!r} both select "
                            f"{_key(path, pname)}; a tensor can hold one adapter's values at a time - "
                            "activate them one at a time (or attach one with exclude=[...])")
                    _put(mod, pname, mine, cur)
                elif not active and cur is mine:
                    _put(mod, pname, rec["orig"], cur)

    def delete(self, model, name):
        for _, mod, sel in list(_selections(model)):
            for pname in list(sel):
                rec = sel[pname]
                if mod._parameters[pname] is rec["by"].get(name):
                    _put(mod, pname, rec["orig"], mod._parameters[pname])
                rec["by"].pop(name, None)
                if not rec["by"]:
                    del sel[pname]
            if not sel:
                del mod.__dict__[SEL]

    def unload(self, model, name):
        # after a merge: whatever is in place stays (it *is* the merged value); drop the rest
        for _, mod, sel in list(_selections(model)):
            for pname in list(sel):
                sel[pname]["by"].pop(name, None)
                if not sel[pname]["by"]:
                    del sel[pname]
            if not sel:
                del mod.__dict__[SEL]

    def to_peft(self, cfg, model, name):
        return None  # peft has no equivalent format: the file is deltatune's own


def _put(mod: nn.Module, pname: str, new: nn.Parameter, cur: nn.Parameter) -> None:
    """Swap ``new`` in, following the device/dtype the model was moved to meanwhile."""
    if new.device != cur.device or new.dtype != cur.dtype:
        new.data = new.data.to(device=cur.device, dtype=cur.dtype)
    mod._parameters[pname] = new



# --------------------------------------------------------------------------- choosing modules

_NORM_NAME = re.compile(r"(Layer|RMS|Group|Batch|Instance)Norm", re.I)


def is_norm(mod: nn.Module) -> bool:
    """torch's norms and transformers' own (LlamaRMSNorm, T5LayerNorm, ...) by class name."""
    torch_norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, getattr(nn, "RMSNorm", nn.LayerNorm))
    return isinstance(mod, torch_norms) or bool(_NORM_NAME.search(type(mod).__name__))


def candidate_modules(model: nn.Module, cfg) -> list[tuple[str, nn.Module]]:
    """Modules a selector may touch: ``cfg.targets``/``cfg.exclude`` applied, and the modules
    trained in full via ``modules_to_save`` (a fresh classifier head) left out."""
    from ..targets import auto_modules_to_save, find_targets, matches

    mods = [(p, m) for p, m in iter_base_modules(model) if p]
    if cfg.targets is not None:
        keep = set(find_targets(model, cfg.targets, exclude=cfg.exclude))
        mods = [(p, m) for p, m in mods if p in keep]
    elif cfg.exclude is not None:
        mods = [(p, m) for p, m in mods if not matches(p, cfg.exclude)]
    mts = cfg.modules_to_save
    if mts == "auto":
        mts = auto_modules_to_save(model)
    if mts:
        saved = set(find_targets(model, [mts] if isinstance(mts, str) else list(mts)))
        mods = [(p, m) for p, m in mods if not any(p == s or p.startswith(s + ".") for s in saved)]
    return mods
