"""Hot-swap: replace an attached adapter's weights in place.

    model ── DeltaLayer ── deltas["a"] ── lora_A.weight ◄── copy_(new A)   same tensor, same storage
                                          lora_B.weight ◄── copy_(new B · s_file / s_model)

Nothing is rebuilt: the module tree, the parameter objects and their storage stay the same, so a
``torch.compile``-d model keeps its graphs (parameters are graph inputs, not constants) and an
optimizer or a server holding references keeps working.  Every key and shape is checked before
the first copy, so a mismatch leaves the adapter untouched.

A LoRA saved with a different ``alpha`` (same rank) is folded into B, so the scale attribute, a
Python float the compiler guards on, never changes.  Anything else that differs in the config
(rank, targets, method) needs ``dt.delete`` + ``dt.load`` instead.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import torch
from torch import nn

from ..core.delta import PREFIX, DeltaError, get_state, iter_delta_layers, merged_names
from ..core.adapters import adapter_tensors
from ..methods.lora import LoraDelta, _pattern_value
from ..storage.adapter import read_adapter_dir

# config fields that only scale LoRA's B; any other difference changes the structure
_LORA_SCALE_FIELDS = {"alpha", "alpha_pattern"}
_PLACEMENT_FIELDS = {"targets", "exclude", "modules_to_save"}  # checked through the keys instead


def _lora_scale_ratio(model: nn.Module, name: str, cfg) -> dict[str, float]:
    """{layer path: s_file / s_model} for a LoRA adapter saved with another alpha."""
    out = {}
    for path, layer in iter_delta_layers(model):
        d = layer.deltas[name] if name in layer.deltas else None
        if isinstance(d, LoraDelta):
            alpha = _pattern_value(path, cfg.alpha_pattern, cfg.alpha)
            s_file = alpha / (math.sqrt(d.r) if cfg.rslora else d.r)
            if s_file != d.scaling:
                out[path] = s_file / d.scaling
    return out


def hot_swap(model: nn.Module, name: str, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy new weights into adapter ``name``: ``source`` is an adapter directory (as written by
    ``dt.save`` or peft) or a {file key: tensor} dict (``dt.adapter_tensors`` keys, with or without
    peft's ``base_model.model.`` prefix)."""
    st = get_state(model)
    if name not in st.adapters:
        raise DeltaError(f"hot_swap: no adapter named {name!r}; attached: {sorted(st.adapters)} "
                         "(use dt.load to add a new one)")
    if name in merged_names(model):
        raise DeltaError(f"hot_swap: adapter {name!r} is merged into the base weights; call dt.unmerge(model) first")
    rec = st.adapters[name]
    ratios: dict[str, float] = {}
    if isinstance(source, Mapping):
        tensors = {k.removeprefix(PREFIX): v for k, v in source.items()}
    else:
        tensors, method, cfg, _ = read_adapter_dir(source)
        if method != rec.method:
            raise DeltaError(f"hot_swap: {source} holds a {method!r} adapter but {name!r} is {rec.method!r}; "
                             f"dt.delete(model, {name!r}) and dt.load it instead")
        old, new = rec.config.to_dict(), cfg.to_dict()
        differ = sorted(k for k in old.keys() | new.keys()
                        if old.get(k) != new.get(k) and k not in _PLACEMENT_FIELDS)
        if method == "lora":
            ratios = _lora_scale_ratio(model, name, cfg)
            differ = [k for k in differ if k not in _LORA_SCALE_FIELDS]
        if differ:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
            raise DeltaError(f"hot_swap: {source} was saved with another config ({diff}); only the weights can be "
                             f"swapped in place - dt.delete(model, {name!r}) and dt.load it instead")
    expected = adapter_tensors(model, name)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(tensors))]
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - set(expected))]
    problems += [f"shape of {k}: new {tuple(tensors[k].shape)} vs attached {tuple(expected[k].shape)}"
                 for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise DeltaError(f"hot_swap: the new weights do not fit adapter {name!r} ({shown}); nothing was changed")
    with torch.no_grad():
        for k, t in expected.items():
            v = tensors[k]
            path = k.rsplit(".lora_B.", 1)[0] if ".lora_B." in k else None
            # the layer owning this B: its own path, or a parent's (MultiheadAttention's out_proj pair
            # is keyed "<mha>.base_layer.out_proj.lora_B.weight")
            owner = next((p for p in ratios if path is not None and (path == p or path.startswith(p + "."))), None)
            if owner is not None:
                v = v.float() * ratios[owner]
            t.copy_(v.to(dtype=t.dtype, device=t.device))
    return model
