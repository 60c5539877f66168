"""The fresh classification head's own treatment: its learning rate (:func:`head_groups`) and LP-FT
(:class:`HeadWarmup`).

Head learning rate (``TrainConfig.head_lr``): the fresh head trains at ``max(lr, head_lr)``, every
method alike, full fine-tuning included.  A random ``Linear(F, L)`` on pretrained features is a
linear probe; the rate it needs is a property of the head, not of the method: full fine-tuning's
5e-5 suits the pretrained body but leaves the head random for a short run, and while it is random
the body follows its meaningless gradients.  The classic fine-tuning recipe gives the new layer
its own, higher rate (Caffe's ``lr_mult: 10`` on the replaced layer; timm's layer decay and
fast.ai's discriminative rates keep the head at the top rate); deltatune uses a floor instead of a
multiple, so the head's rate does not depend on which method trains the body (a multiple would
give a prompt-tuning head 0.3).  Causal LMs have no fresh head and are unaffected.

The floor is for features of natural scale (a BERT pooler's tanh outputs, a CNN's pooled
activations: per-coordinate magnitude ~0.3-1).  Adam moves each head weight by about the rate per
step, so a logit moves by about ``rate * ||x||_1``: for a *unit-norm* sentence embedding of width H
(sentence-transformers' Normalize) ``||x||_1 ~ 0.8 sqrt(H)``, about sqrt(H) times less than for
features of magnitude ~1, and at 1e-2 the probe is still far from trained when LP-FT ends -- the
body then does the head's work, which is what the forgetting measure sees.  Such a model declares
``head_lr_scale = sqrt(H)`` (:func:`head_lr_scale`), which multiplies ``head_lr``: the same
dynamics as a cosine classifier reading ``sqrt(H) x`` (NormFace's scale), with the weights kept at
the unit vector's scale so saved files are a plain ``Linear`` on the embedding.

LP-FT: the fresh classification head trains alone for the first share of the
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

HEAD_LR = 1e-2  # TrainConfig.head_lr's default: see the module docstring and docs/cli.md for the measurements


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors of ``model``'s fresh classification head (``auto_modules_to_save``:
    transformers' ``*ForSequenceClassification`` heads, the vision wrapper's ``classifier``); none
    for models without one (causal LMs keep their pretrained ``lm_head``)."""
    heads = auto_modules_to_save(model)
    return [p for n, p in model.named_parameters()
            if p.requires_grad and any(n == h or n.startswith(h + ".") for h in heads)]


def head_lr_scale(model: nn.Module) -> float:
    """The model's multiplier on ``head_lr`` (1 unless it declares one): a head reading a unit-norm
    sentence embedding needs a larger rate than one reading features of natural scale
    (``PooledModelForSequenceClassification.head_lr_scale``, text/classifier.py)."""
    s = getattr(model, "head_lr_scale", 1.0)
    return float(s) if isinstance(s, (int, float)) and 0 < s < float("inf") else 1.0


def _split(params: Sequence[nn.Parameter], head: Sequence[nn.Parameter]):
    ids = {id(p) for p in head}
    return [p for p in params if id(p) not in ids], [p for p in params if id(p) in ids]


def head_groups(params: Sequence[nn.Parameter], head: Sequence[nn.Parameter], lr: float,
                head_lr: float) -> list[dict]:
    """AdamW parameter groups: the body at ``lr``, the fresh head at ``max(lr, head_lr)`` (the
    scheduler scales both alike); one group when there is no head, no body or no faster rate."""
    body, mine = _split(params, head)
    if _rate(body, mine, lr, head_lr) in (None, lr):
        return [{"params": list(params)}]
    return [{"params": body}, {"params": mine, "lr": head_lr}]


def head_rate(params: Sequence[nn.Parameter], head: Sequence[nn.Parameter], lr: float,
              head_lr: float) -> float | None:
    """The peak rate the fresh head trains at under ``head_groups`` (None: no trained head); what a
    run records as ``head_lr``."""
    return _rate(*_split(params, head), lr, head_lr)


def _rate(body: list, mine: list, lr: float, head_lr: float) -> float | None:
    if not mine:
        return None
    return head_lr if body and head_lr > lr else lr


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
