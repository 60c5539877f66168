"""The reverse peft round trip of the coverage matrix: peft builds the adapter, deltatune reads it.

For a zoo family × a peft-format column (tests/coverage_cases.py), the peft config is the one
deltatune's defaults choose (the ``adapter_config.json`` ``dt.save`` writes for that case: same
targets, rank, modules_to_save, virtual tokens), and then everything else is peft's own:

    peft.get_peft_model(fresh base, that config) ─► perturb every trainable tensor ─► save_pretrained
    dt.load(fresh base, the directory) ─► same output as the peft model (1e-5, float32)

A failure on peft's side (get_peft_model, its forward or save_pretrained raising) is a ``PeftSide``
(the test skips with the reason, docs/coverage.md counts it); anything deltatune raises while
loading, or a different output, is a failure unless listed in ``PEFT_TO_US_XFAIL``.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch

import deltatune as dt
from coverage_cases import ATOL, close, options, pristine
from zoo import run


class PeftSide(Exception):
    """peft itself cannot build, run or save this case (not deltatune's bug)."""


def _peft_config(family: str, column: str, d: Path):
    """peft's config object for the case, as deltatune's defaults would choose it; None when the case
    has no peft format or deltatune refuses it at attach (run_case checks that refusal)."""
    import peft

    method, opts = options(family, column)
    if not dt.METHODS[method].peft_type:
        return None
    model = copy.deepcopy(pristine(family))
    try:
        dt.attach(model, method, **opts)
    except dt.DeltaError:
        return None
    dt.save(model, d)
    cfg = _peft_side("PeftConfig.from_pretrained", lambda: peft.PeftConfig.from_pretrained(str(d)))
    cfg.inference_mode = False  # a file says True: peft would freeze the adapter, and perturbing finds nothing
    return cfg


# peft's own defaults (target_modules=None: peft's per-architecture table), small ranks for speed
PEFT_DEFAULTS = {
    "lora": lambda peft: peft.LoraConfig(r=4, lora_alpha=8),
    "dora": lambda peft: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True),
    "adalora": lambda peft: peft.AdaLoraConfig(total_step=10, init_r=4, target_r=2),
    "ia3": lambda peft: peft.IA3Config(),
    "vera": lambda peft: peft.VeraConfig(r=4),
}


def _perturb_peft(pm, seed: int = 2) -> int:
    """Give peft's adapter (its trainable tensors: the adapter and its modules_to_save copies) random
    values, as coverage_cases.perturb does ours; returns how many tensors it changed."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
                n += 1
    return n


def _peft_side(what: str, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - whatever peft raises is peft's side of the case
        raise PeftSide(f"peft {what}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e


def we_load_peft_file(family: str, column: str, tmp: Path | None = None, peft_defaults: bool = False) -> bool:
    """deltatune's ``dt.load`` reads a file peft wrote for the case and gives peft's output (1e-5).
    ``peft_defaults``: peft chooses the targets itself (``PEFT_DEFAULTS``) instead of taking deltatune's.
    False when the case does not apply; ``PeftSide`` when peft cannot build, run or save it."""
    import peft

    with tempfile.TemporaryDirectory(dir=tmp) as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes (VeRA's PRNG projections, transformers deprecations)
        if peft_defaults:
            cfg = PEFT_DEFAULTS[column](peft) if column in PEFT_DEFAULTS else None
        else:
            cfg = _peft_config(family, column, Path(d) / "ours")
        if cfg is None:
            return False
        pm = _peft_side("get_peft_model", lambda: peft.get_peft_model(copy.deepcopy(pristine(family)), cfg).eval())
        if not _perturb_peft(pm):
            raise AssertionError("peft's model has no trainable tensor to perturb: the check would be vacuous")
        with torch.no_grad():
            y = _peft_side("forward", lambda: run(pm, family))
        _peft_side("save_pretrained", lambda: pm.save_pretrained(str(Path(d) / "peft")))
        ours = dt.load(copy.deepcopy(pristine(family)), Path(d) / "peft")
        with torch.no_grad():
            close(run(ours, family), y, ATOL, "deltatune's output on peft's file")
    return True


# (family, column) -> why deltatune cannot read peft's file of that case today (strict xfails)
PEFT_TO_US_XFAIL: dict[tuple[str, str], str] = {}
