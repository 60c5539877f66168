"""Composition: several adapters, of different methods, active on one model at once, and when
merging them into the weights is exact.

On one wrapped layer the forward pass is (``core.DeltaLayer``)::

    x' = pre_k(...pre_1(x))                  input transforms (IA3 feedforward scaling)
    y  = base(x')                            or a modules_to_save copy instead of the base
    y  = d_n(x', ...d_2(x', d_1(x', y)))     output deltas, in the order of dt.active_adapters

Each mergeable delta folds into the weight as a function of the weight *as it is then*, so the
merged layer equals the unmerged one exactly when the weight sees the deltas in that same order:

1. output deltas merge in forward order, and the merged ones must be a *prefix* of it (merging
   ``b`` while ``a`` before it stays unmerged would apply ``b`` before ``a``), except that
   *additive* deltas (``Delta.additive``: y + f(x), ΔW independent of W; LoRA, VeRA, AdaLoRA,
   added biases) commute with each other, so one may merge while another stays unmerged;
2. input transforms merge last, and only together with every output delta of the layer (those
   see x', which after the merge they would no longer get);
3. DoRA renormalises the base weight, so it must be the first delta of its layer.

Selectors (BitFit, ln) change base tensors in place and are always exact.  Bottleneck adapters
are never mergeable (a non-linearity); ``dt.merge`` refuses them, and anything whose merge would
break the rules above, before touching a weight.
"""
from __future__ import annotations

from ..core.delta import Delta, DeltaError, DeltaLayer, get_state, iter_delta_layers


def transforms_input(d: Delta) -> bool:
    return bool(getattr(d, "transforms_input", type(d).pre is not Delta.pre))


def additive(d: Delta) -> bool:
    return bool(getattr(d, "additive", False))


def forward_order(layer: DeltaLayer, names: list[str], active: list[str]) -> list[str]:
    """The layer's deltas among ``active`` (then the other ``names``), as the forward applies them:
    a replacing copy first, output deltas in order; input transforms are listed last."""
    seq = [n for n in list(active) + [n for n in names if n not in active] if n in layer.deltas]
    rep = [n for n in seq if layer.deltas[n].replaces]
    outs = [n for n in seq if n not in rep and not transforms_input(layer.deltas[n])]
    pres = [n for n in seq if transforms_input(layer.deltas[n])]
    return rep + outs + pres


def merge_order(layer: DeltaLayer, names: list[str], active: list[str]) -> list[str]:
    """Which of ``names`` to merge into this layer, in the order that keeps the merge exact."""
    return [n for n in forward_order(layer, names, active) if n in names and n not in layer.merged]


def problem(layer: DeltaLayer, names: list[str], active: list[str]) -> str | None:
    order = forward_order(layer, names, active)
    merged = {n for n in order if n in names or n in layer.merged}
    if not merged:
        return None
    pres = [n for n in order if transforms_input(layer.deltas[n])]
    outs = [n for n in order if n not in pres]
    first_kept = next((n for n in outs if n not in merged), None)
    if first_kept is not None:
        for i, n in enumerate(outs):
            kept_before = [k for k in outs[:i] if k not in merged]
            if n not in merged or not kept_before:
                continue
            if additive(layer.deltas[n]) and all(additive(layer.deltas[k]) for k in kept_before):
                continue  # y + f_k(x) + f_n(x): the order of additive terms does not matter
            return (f"{n!r} runs after {kept_before[0]!r}, which would stay unmerged, so merging it alone would "
                    f"apply it first; merge both, or neither, or dt.activate them in the other order")
        if any(n in merged for n in pres):
            p = next(n for n in pres if n in merged)
            return (f"{p!r} scales the layer's input, which the unmerged {first_kept!r} also sees; merge them "
                    "together or keep both unmerged")
    dora = [n for n in outs if getattr(layer.deltas[n], "use_dora", False)]
    if dora and outs[0] != dora[0] and dora[0] in merged:
        return (f"DoRA adapter {dora[0]!r} renormalises the base weight, so it must be the first adapter on "
                f"the layer (here {outs[0]!r} comes first); dt.activate them with the DoRA one first")
    return None


def check_merge(model, names: list[str]) -> None:
    """Raise before any weight changes if merging ``names`` would not be exact."""
    active = get_state(model).active
    for path, layer in iter_delta_layers(model):
        why = problem(layer, names, active)
        if why:
            raise DeltaError(f"merging {names} into {path} would not be exact: {why}")
