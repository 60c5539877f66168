"""LP-FT for new heads: the fresh classification head trains alone for the first share of the
steps, then the method's tensors (or, for full fine-tuning, the body) join.

Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution": a randomly initialised head sends gradients that point nowhere useful, and
the body follows them for as long as the head is random -- the features drift before the task is
learnt.  Training the head first (linear probing) and then everything (fine-tuning) keeps the
features closer to the pretrained ones.

    steps  0 ........ W ................................ total
    head   trains     trains
    body   (grads dropped before the step)   trains at the running schedule's rate

The body's gradients are dropped (set to None) rather than frozen with ``requires_grad``: the
trainable set, checkpoints, DDP and best-state snapshots stay exactly what they are without
LP-FT, and AdamW skips a tensor whose grad is None (no moment update, no step).  The price is that
phase 1 still runs the body's backward.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..core.targets import auto_modules_to_save


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors of ``model``'s fresh classification head (``auto_modules_to_save``:
    transformers' ``*ForSequenceClassification`` heads, the vision wrapper's ``classifier``); none
    for models without one (causal LMs keep their pretrained ``lm_head``)."""
    heads = auto_modules_to_save(model)
    return [p for n, p in model.named_parameters()
            if p.requires_grad and any(n == h or n.startswith(h + ".") for h in heads)]


class HeadWarmup:
    """Drops the body's gradients for the first ``round(share · total_steps)`` optimizer steps."""

    def __init__(self, params: Sequence[nn.Parameter], head: Sequence[nn.Parameter], share: float,
                 total_steps: int):
        ids = {id(p) for p in head}
        self.body = [p for p in params if id(p) not in ids]
        # no head (or a head that is everything, as in a probe-only run): nothing to warm up
        self.steps = round(share * total_steps) if ids and self.body else 0

    def drop_body_grads(self, step: int) -> None:
        """Called between backward and the optimizer step ``step`` (0-based)."""
        if step < self.steps:
            for p in self.body:
                p.grad = None
