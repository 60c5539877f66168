"""What an adapter is made of, read from the model: its tensors (the single source of what trains
and what is saved) and the ``requires_grad`` they get from the active set.  Methods use these when
they attach, the API when it saves, activates or counts."""
from __future__ import annotations

import torch
from torch import nn

from .delta import DeltaError, DeltaLayer, get_state, get_submodule_clean, iter_delta_layers
from .method import method_of


def base_at(model: nn.Module, path: str) -> nn.Module:
    """The frozen base module at ``path``, whether or not a DeltaLayer wraps it yet."""
    mod = get_submodule_clean(model, path)
    return mod.base_layer if isinstance(mod, DeltaLayer) else mod


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``name``, keyed as in the saved file (without peft's
    ``base_model.model.`` prefix).  The single source of what trains and what is saved."""
    st = get_state(model)
    if name not in st.adapters:
        raise DeltaError(f"no adapter named {name!r}; attached: {sorted(st.adapters)}")
    out: dict[str, torch.Tensor] = {}
    for path, layer in iter_delta_layers(model):
        if name in layer.deltas:
            d = layer.deltas[name]
            for k, p in d.named_parameters():
                out[f"{path}.{d.save_key(k)}" if path else d.save_key(k)] = p
    out.update(method_of(st.adapters[name].method).own_tensors(model, name))
    return out


def refresh(model: nn.Module) -> None:
    """Re-derive ``requires_grad`` from the active set: base frozen, active adapters trainable."""
    st = get_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, rec in st.adapters.items():
        on = n in st.active and not st.disabled
        method_of(rec.method).on_activate(model, n, on)
        if on and getattr(rec, "trainable", True):
            for t in adapter_tensors(model, n).values():
                if isinstance(t, nn.Parameter) or t.is_floating_point():
                    t.requires_grad_(True)
