"""LoRA ⇄ peft's ``adapter_config.json``: the field names, the cases deltatune refuses with a
reason, and peft's ``layers_to_transform`` filter rewritten as one target regex.

Kept apart from ``lora.py`` (the layers and their maths) because it is a translation table between
two config vocabularies; it returns plain dicts, so it needs neither the LoRA modules nor
``LoraConfig`` (``lora.py`` builds the config from :func:`config_kwargs`).
"""
from __future__ import annotations

import re
from typing import Any

from ..core.delta import DeltaError

# peft's default names of the block list whose index layers_to_transform selects
LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def peft_config(cfg, targets: list[str], saved: list[str], fan_in_fan_out: bool) -> dict[str, Any]:
    """peft's LoraConfig fields for a deltatune ``LoraConfig`` whose deltas sit at ``targets``
    (and whose fully trained copies sit at ``saved``)."""
    return {
        "peft_type": "LORA", "task_type": None, "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(targets), "exclude_modules": None,
        "modules_to_save": sorted(saved) or None, "bias": "none", "use_rslora": cfg.rslora,
        "use_dora": cfg.dora, "init_lora_weights": True, "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern), "layers_to_transform": None, "layers_pattern": None,
        "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "revision": None,
    }


def config_kwargs(d: dict[str, Any]) -> dict[str, Any]:
    """``LoraConfig`` keyword arguments from a peft ``adapter_config.json`` dict; a DeltaError
    for what deltatune cannot reproduce (trained biases, raw-parameter targets, modified bases)."""
    if d.get("bias", "none") != "none":
        raise DeltaError(f"peft LoRA file with bias={d['bias']!r} (biases trained and stored next to the LoRA "
                         "weights) cannot be loaded by deltatune; load it with peft, or retrain with bias='none'")
    if d.get("target_parameters"):
        raise DeltaError(f"peft LoRA file with target_parameters={list(d['target_parameters'])[:3]} (LoRA on raw "
                         "parameters such as MoE experts) cannot be loaded by deltatune yet; load it with peft")
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "eva")):
        raise DeltaError(f"peft LoRA saved with init_lora_weights={init!r} needs peft's modified base "
                         "weights; re-save it from peft with path_initial_model_for_weight_conversion")
    targets = d.get("target_modules")
    if isinstance(targets, (set, tuple)):
        targets = list(targets)
    if d.get("layers_to_transform") is not None:
        targets = layers_regex(targets, d["layers_to_transform"], d.get("layers_pattern"))
    return dict(
        targets=targets, exclude=d.get("exclude_modules"), modules_to_save=d.get("modules_to_save") or None,
        r=int(d.get("r", 8)), alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
        rslora=bool(d.get("use_rslora", False)), dora=bool(d.get("use_dora", False)),
        rank_pattern=dict(d.get("rank_pattern") or {}), alpha_pattern=dict(d.get("alpha_pattern") or {}),
        conv_budget=0.0)  # peft has no rank cap: r (or rank_pattern) on every conv, as in the file


def layers_regex(targets, layers, pattern=None) -> str:
    """peft's ``target_modules`` + ``layers_to_transform`` (+ ``layers_pattern``) as one full-match
    regex: a module is adapted when its name matches a target (exactly or as a dotted suffix) and
    it sits in block ``<pattern>.<i>`` with i in ``layers``.  (peft ignores the layer filter when
    target_modules is already a regex; so does this.)"""
    if isinstance(targets, str):
        return targets
    if not targets:
        raise DeltaError("peft LoRA file with layers_to_transform but no target_modules list; re-save it with "
                         "target_modules=[...]")
    idx = [layers] if isinstance(layers, int) else list(layers)
    pats = [pattern] if isinstance(pattern, str) else list(pattern or LAYERS_PATTERNS)
    alt = lambda xs: "|".join(re.escape(str(x)) for x in xs)  # noqa: E731
    return rf"(?:.*\.)?(?:{alt(pats)})\.(?:{alt(idx)})\.(?:.*\.)?(?:{alt(targets)})"
