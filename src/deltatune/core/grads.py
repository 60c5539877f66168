"""One gradient pass over a few batches, accumulating per-weight statistics: the measurement both
importance scores (``ops/importance.py``) and gradient-chosen sparse deltas (``methods/sparse.py``)
are built on."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .delta import DeltaError, DeltaLayer, get_submodule_clean
from .targets import find_targets


def compute_loss(model: nn.Module, batch: Any, loss_fn: Callable | None) -> torch.Tensor:
    """``loss_fn(model, batch)`` if given, else ``model(**batch).loss`` (transformers with labels)."""
    if loss_fn is not None:
        return loss_fn(model, batch)
    if isinstance(batch, Mapping):  # dict, transformers' BatchEncoding
        out = model(**batch)
        loss = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
        if loss is not None:
            return loss
    raise DeltaError("cannot compute a loss from this batch: pass dict batches with 'labels' to a transformers "
                     "model, or loss_fn=lambda model, batch: <scalar loss>")


def weighted_modules(model: nn.Module, targets=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """(path, module) of every targeted module that owns a weight (default: all linear layers)."""
    paths = find_targets(model, targets, exclude=exclude)
    mods = [(p, get_submodule_clean(model, p)) for p in paths]
    mods = [(p, m.base_layer if isinstance(m, DeltaLayer) else m) for p, m in mods]  # score the base weight
    return [(p, m) for p, m in mods if isinstance(getattr(m, "weight", None), torch.Tensor)]


def accumulate_grads(model: nn.Module, modules: list[tuple[str, nn.Module]], batches: Iterable, loss_fn=None,
                     max_batches: int | None = None, stats: dict[str, Callable] | None = None) -> dict[str, dict]:
    """One pass over ``batches``; for each module path, each ``stats`` function
    ``f(weight, grad) -> tensor`` summed over batches.  Only the listed weights get gradients;
    requires_grad and the model's train/eval mode are restored afterwards."""
    weights = {p: m.weight for p, m in modules}
    was = {id(p): p.requires_grad for p in model.parameters()}
    acc: dict[str, dict] = {p: {} for p in weights}
    n = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            for w in weights.values():
                w.grad = None
            compute_loss(model, batch, loss_fn).backward()
            n += 1
            with torch.no_grad():
                for path, w in weights.items():
                    if w.grad is None:
                        continue
                    for k, f in stats.items():
                        v = f(w.detach(), w.grad.detach()).float()
                        acc[path][k] = acc[path][k] + v if k in acc[path] else v
    finally:
        for w in weights.values():
            w.grad = None
        for p in model.parameters():
            p.requires_grad_(was.get(id(p), False))
    if n == 0:
        raise DeltaError("no batches to score: pass a non-empty iterable of batches")
    return acc
