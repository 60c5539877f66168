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

The bookkeeping lives in the selected module's ``__dict__`` under ``core.model_state.SELECTED``
(not a submodule, not in the state dict, copied by ``copy.deepcopy``)::

    model_state.get(module, SELECTED) == {"bias": {"orig": Parameter, "by": {adapter: Parameter}}}

The saved file holds the adapter's tensor **values** (not differences), keyed by the parameter's
own path (``encoder.layer.0.attention.self.query.bias``): loading onto a fresh copy of the base
reproduces the outputs exactly, and a file is directly readable as "the fine-tuned biases".
Merging is trivial (the values are already in place); ``unload`` keeps them and drops the
originals.  Two active selector adapters that select the same tensor cannot both be in place:
that is refused with a clear error.

Half-precision bases: the copies follow ``dtypes.adapter_dtype`` like every adapter (float32 on an
fp16/bf16 base), so they are *master* weights.  A forward pre-hook on the selected module hands the
module each selected tensor cast to the dtype it computes in (that of its floating input; a
differentiable cast, so gradients reach the float32 copy), and a forward hook puts the copy back;
``unload`` rounds a master into the base's dtype.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..core import model_state
from ..core.delta import DeltaError, get_state, iter_base_modules
from ..core.method import Method
from ..core.targets import find_targets, matches, modules_to_save_paths



def _cast_in(mod: nn.Module, args: tuple) -> None:
    """Forward pre-hook: run the module on its selected tensors cast to its input's dtype."""
    x = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
    stash = {}
    for pname, rec in model_state.get(mod, model_state.SELECTED, {}).items():
        cur = mod._parameters.get(pname)
        dt = x.dtype if x is not None else rec["orig"].dtype
        if cur is not None and cur.dtype != dt:
            stash[pname] = cur
            mod._parameters[pname] = cur.to(dt)  # a plain tensor for the duration of this forward
    if stash:
        # the in-place tensors, set aside while the module runs on casts of them
        model_state.put(mod, model_state.SELECTED_STASH, stash)


def _restore(mod: nn.Module, args: tuple, out) -> None:
    """Forward hook (always called, also on an exception): the selected Parameters go back."""
    mod._parameters.update(model_state.pop(mod, model_state.SELECTED_STASH, {}))


def _hook(mod: nn.Module, on: bool) -> None:
    """Install (once) or remove the casting hooks; found by identity, so deep copies need no handles."""
    have = _cast_in in mod._forward_pre_hooks.values()
    if on and not have:
        mod.register_forward_pre_hook(_cast_in)
        mod.register_forward_hook(_restore, always_call=True)
    elif not on and have:
        for hooks, fn in ((mod._forward_pre_hooks, _cast_in), (mod._forward_hooks, _restore)):
            for k in [k for k, v in hooks.items() if v is fn]:
                del hooks[k]
                mod._forward_hooks_always_called.pop(k, None)


def _selections(model: nn.Module):
    """(clean module path, module, {param name: record}) for every module carrying selections."""
    for path, mod in iter_base_modules(model):
        sel = model_state.get(mod, model_state.SELECTED)
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
            rec = model_state.setdefault(mod, model_state.SELECTED, {}).setdefault(pname, {"orig": orig, "by": {}})
            copy = nn.Parameter(rec["orig"].detach().clone(), requires_grad=False)
            rec["by"][name] = copy  # api.attach gives it the adapter dtype (core.cast_adapter_dtype)
            _hook(mod, True)

    def own_tensors(self, model, name):
        return {_key(path, p): rec["by"][name] for path, _, sel in _selections(model)
                for p, rec in sel.items() if name in rec["by"]}

    def own_dtypes(self, model, name):
        return {_key(path, p): rec["orig"].dtype for path, _, sel in _selections(model)
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
                model_state.pop(mod, model_state.SELECTED)
                _hook(mod, False)

    def unload(self, model, name):
        # after a merge: whatever is in place stays (it *is* the merged value); drop the rest
        for _, mod, sel in list(_selections(model)):
            for pname in list(sel):
                sel[pname]["by"].pop(name, None)
                if not sel[pname]["by"]:
                    orig, cur = sel[pname]["orig"], mod._parameters[pname]
                    if cur.dtype != orig.dtype:  # a float32 master becomes the base's own tensor again
                        mod._parameters[pname] = nn.Parameter(cur.detach().to(orig.dtype), requires_grad=False)
                    del sel[pname]
            if not sel:
                model_state.pop(mod, model_state.SELECTED)
                _hook(mod, False)

    def to_peft(self, cfg, model, name):
        return None  # peft has no equivalent format: the file is deltatune's own


def _put(mod: nn.Module, pname: str, new: nn.Parameter, cur: nn.Parameter) -> None:
    """Swap ``new`` in, following the device the model was moved to meanwhile.  Its dtype stays
    (a float32 master on a half base must stay float32): ``_cast_in`` casts it per forward."""
    if new.device != cur.device:
        new.data = new.data.to(device=cur.device)
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
    mods = [(p, m) for p, m in iter_base_modules(model) if p]
    if cfg.targets is not None:
        keep = set(find_targets(model, cfg.targets, exclude=cfg.exclude))
        mods = [(p, m) for p, m in mods if p in keep]
    elif cfg.exclude is not None:
        mods = [(p, m) for p, m in mods if not matches(p, cfg.exclude)]
    saved = set(modules_to_save_paths(model, cfg.modules_to_save))
    if saved:
        mods = [(p, m) for p, m in mods if not any(p == s or p.startswith(s + ".") for s in saved)]
    return mods
