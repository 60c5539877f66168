"""Nothing lost, nothing unsafe: numerical guards, plus the file helpers of ``deltatune.files``
re-exported under their documented names (``dt.safety.atomic_dir``, ``dt.safety.safe_join``).

Numerical guards for training loops (the trainer calls them, the core never does)::

    guard = NanGuard(policy="skip", max_skips=5)
    loss.backward()
    if guard.ok(loss, model):      # loss and every gradient finite?
        opt.step()                 # else the step is skipped (grads zeroed), and after
    opt.zero_grad()                # max_skips bad steps in a row NonFiniteError stops the run
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

from .core.delta import DeltaError
from .files import (WriteError, atomic_dir, atomic_write, atomic_write_json, exchange, fsync_path, fsync_tree,
                    new_mode, recover_dir, safe_join, umask, write_error)

__all__ = ["NanGuard", "NonFiniteError", "check_finite", "describe", "first_nonfinite", "load_exact",
           # the file helpers, documented as dt.safety.*; their home is deltatune.files
           "WriteError", "atomic_dir", "atomic_write", "atomic_write_json", "exchange", "fsync_path", "fsync_tree",
           "new_mode", "recover_dir", "safe_join", "umask", "write_error"]

# --------------------------------------------------------------------------- verified loads

def load_exact(model: nn.Module, path, what: str) -> None:
    """Load a saved full model's safetensors file into ``model``: every key of the file and of the
    model must match (a damaged file or one from another model is one DeltaError line, never a
    half-loaded model).  ``what`` names the architecture in the message."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    bad = set(sd) ^ set(model.state_dict())
    if bad:
        raise DeltaError(f"{path}: keys do not match {what} ({sorted(bad)[:4]} ...); the directory is damaged "
                         "or from another model")
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------- numerical faults


class NonFiniteError(DeltaError):
    """A loss, gradient or weight became NaN/Inf."""


def first_nonfinite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating tensor holding a NaN/Inf, else None (one fused check first,
    a per-tensor scan only when something is wrong)."""
    items = [(n, t) for n, t in (tensors.items() if isinstance(tensors, Mapping) else tensors)
             if t is not None and t.is_floating_point() and t.numel()]
    if not items:
        return None
    with torch.no_grad():
        # sum of |t| is non-finite iff some element is (up to overflow, which is a fault anyway)
        total = torch.stack([t.detach().float().abs().sum() for _, t in items]).sum()
        if torch.isfinite(total):
            return None
        for n, t in items:
            if not torch.isfinite(t.detach()).all():
                return n
    return items[0][0]  # finite elements whose sum overflows float32


def describe(t: torch.Tensor) -> str:
    t = t.detach()
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} Inf of {t.numel()} values"


def check_finite(loss: torch.Tensor | float | None = None, model: nn.Module | None = None, *,
                 grads: bool = True, weights: bool = False, step: int | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the loss, the gradient or the weight that is NaN/Inf.

    Only trainable parameters are checked (the frozen base cannot change during training)."""
    at = f" at step {step}" if step is not None else ""
    if loss is not None:
        lt = torch.as_tensor(loss)
        if not torch.isfinite(lt).all():
            raise NonFiniteError(f"loss is {lt.detach().flatten()[0].item()}{at}; lower the learning rate, "
                                 "check the data for empty/extreme rows, or use fp32/bf16 instead of fp16")
    if model is None:
        return
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if grads:
        bad = first_nonfinite([(n, p.grad) for n, p in params])
        if bad is not None:
            g = dict(params)[bad].grad
            raise NonFiniteError(f"gradient of {bad} has {describe(g)}{at}; lower the learning rate or "
                                 "enable gradient clipping")
    if weights:
        bad = first_nonfinite(params)
        if bad is not None:
            raise NonFiniteError(f"parameter {bad} has {describe(dict(params)[bad])}{at}; "
                                 "resume from the last good checkpoint with a lower learning rate")


@dataclass
class NanGuard:
    """Per-step policy for non-finite losses/gradients.

    ``ok(loss, model)`` returns True when the optimizer may step.  On a bad step it zeroes the
    gradients, records why, and returns False (``policy="skip"``) or raises (``"stop"``);
    ``max_skips`` bad steps in a row raise too, so a diverged run stops instead of spinning."""

    policy: str = "skip"  # "skip": drop the step and go on; "stop": raise at the first bad step
    max_skips: int = 5  # consecutive skipped steps before giving up (the run has diverged)
    skipped: int = 0  # total steps skipped so far
    consecutive: int = 0
    log: list[str] = field(default_factory=list)  # one message per skipped step

    def __post_init__(self):
        if self.policy not in ("skip", "stop"):
            raise DeltaError(f"NanGuard policy must be 'skip' or 'stop', got {self.policy!r}")
        if not isinstance(self.max_skips, int) or self.max_skips < 1:
            raise DeltaError(f"NanGuard max_skips must be a positive integer, got {self.max_skips!r}")

    def ok(self, loss, model: nn.Module, step: int | None = None) -> bool:
        try:
            check_finite(loss, model, grads=True, step=step)
        except NonFiniteError as e:
            if self.policy == "stop":
                raise
            for p in model.parameters():
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
            self.log.append(str(e))
            if self.consecutive >= self.max_skips:
                raise NonFiniteError(f"{self.consecutive} non-finite steps in a row (last: {e}); stopping. "
                                     "The last saved checkpoint is intact: resume from it with a lower "
                                     "learning rate") from None
            return False
        self.consecutive = 0
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, d: dict) -> None:
        self.skipped, self.consecutive = int(d.get("skipped", 0)), int(d.get("consecutive", 0))
