"""After AdaLoRA training: the report of the ranks it kept, and the conversion to a plain LoRA
adapter (what peft's LoraConfig/PeftModel load).  Operations on a trained adapter, so they sit
above the API they call (attach, delete, activate)."""
from __future__ import annotations

import torch
from torch import nn

from ..api import activate, attach, delete
from ..core.adapters import adapter_tensors
from ..core.delta import DeltaError, get_state
from ..methods.adalora import AdaLoraConfig, _adalora_name, _layer_paths, _layers
from ..methods.lora import LoraConfig
from .importance import LayerReport


def rank_report(model: nn.Module, name: str | None = None):
    """A :class:`deltatune.ops.importance.LayerReport` of the final ranks: ``.table()``, ``.plot(path)``."""
    name = _adalora_name(model, name)
    r0 = get_state(model).adapters[name].config.r
    rows = [{"module": p, "rank": d.rank, "initial_rank": r0} for p, d in _layers(model, name)]
    return LayerReport(rows, value="rank", title=f"AdaLoRA final ranks ({name})")


def adalora_to_lora(model: nn.Module, name: str | None = None, new_name: str | None = None) -> nn.Module:
    """Replace AdaLoRA adapter ``name`` by the equivalent plain LoRA adapter (same output): each
    layer keeps its surviving triplets, B = P[:, kept], A = (Λ·Q)[kept]; ``rank_pattern`` holds the
    per-layer ranks and layers pruned to rank 0 are dropped.  peft's LoraConfig/PeftModel load it."""
    name = _adalora_name(model, name)
    st = get_state(model)
    cfg: AdaLoraConfig = st.adapters[name].config
    was_active = name in st.active
    parts, ranks = {}, {}
    with torch.no_grad():
        for path, d in _layers(model, name):
            keep = (d.rank_mask & (d.lora_E.view(-1) != 0)).nonzero().view(-1)  # E = 0: pruned before a save
            if keep.numel():
                a = (d.lora_A * d.lora_E)[keep].detach().clone()  # (k, in)
                b = (d.lora_B[:, keep] * d.scaling).detach().clone()  # (out, k), scaling folded in
                parts[path], ranks[path] = (a, b), int(keep.numel())
    if not ranks:
        raise DeltaError(f"adalora: every layer of {name!r} was pruned to rank 0; nothing to convert")
    saved = {k: v.detach().clone() for k, v in adapter_tensors(model, name).items()
             if not any(k.startswith(p + ".lora_") for p in _layer_paths(model, name))}
    r = max(ranks.values())
    lcfg = LoraConfig(targets=sorted(ranks), exclude=None, modules_to_save=cfg.modules_to_save, r=r, alpha=float(r),
                      dropout=cfg.dropout, rank_pattern={p: k for p, k in ranks.items() if k != r},
                      alpha_pattern={p: float(k) for p, k in ranks.items() if k != r})  # s = 1 everywhere
    target = new_name or name
    delete(model, name)
    attach(model, lcfg, name=target)
    tensors = adapter_tensors(model, target)
    with torch.no_grad():
        for path, (a, b) in parts.items():
            tensors[f"{path}.lora_A.weight"].copy_(a)
            tensors[f"{path}.lora_B.weight"].copy_(b)
        for k, v in saved.items():  # modules_to_save copies (a classification head)
            tensors[k].copy_(v)
    if was_active:
        activate(model, [target] + [n for n in st.active if n != target])
    return model
