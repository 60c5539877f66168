"""The LoRA *variant* protocol: one small object per variant saying what it changes in a LoRA
delta, like peft's ``LoraVariant`` (``init`` / ``merge`` / ``unmerge`` / ``forward``), instead of
``if dora`` / ``if init == "pissa"`` branches in every layer type of ``lora.py``.

A ``LoraConfig`` chooses its variants (``lora.VARIANTS``, each asked ``chosen(cfg)``); every delta
built from it gets one instance of each (``variant_for(delta)``: a layer type may have its own,
e.g. DoRA's fused kernel on linear layers), in ``delta.variants``.  Variants are stateless: what
they keep (PiSSA's initial factors, DoRA's magnitude and merge norm) lives on the delta, so it
moves with ``model.to()`` and ``deepcopy`` and appears in state dicts exactly when it is a
parameter.  Two kinds, which compose (DoRA on a PiSSA init):

* an **update** variant adds low-rank ``terms`` to s·BA (PiSSA subtracts its initial s·B₀A₀), so
  the update stays a sum of low-rank products that merging, ``dt.combine`` and export can read;
* a **forward** variant (``owns_forward``) takes over ``forward`` / ``merge`` / ``unmerge`` (DoRA
  renormalises W, so its output is not y + a term independent of y).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..core.delta import DeltaError


class LoraVariant:
    """Every hook defaults to plain LoRA; a variant overrides what it changes."""

    name: ClassVar[str] = ""
    init_option: ClassVar[str | None] = None  # the ``LoraConfig.init`` value choosing an init variant
    # LoRA layer kinds it works on (``LoraDelta.kind``: "linear", "conv", "embedding") and the
    # one-line refusal raised at attach for the others (formatted with ``kind``)
    layers: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")
    refusal: ClassVar[str] = "lora: this variant does not support {kind} layers"
    owns_forward: ClassVar[bool] = False  # True: forward / merge / unmerge are the variant's
    adds_terms: ClassVar[bool] = False  # True: ``terms`` is not empty (no fused / batched plain-LoRA paths)

    @staticmethod
    def chosen(cfg) -> bool:
        """Whether ``cfg`` (a ``LoraConfig``) asks for this variant."""
        raise NotImplementedError

    @classmethod
    def variant_for(cls, delta) -> "LoraVariant":
        """The instance for one delta, after refusing a layer kind the variant cannot handle."""
        if delta.kind not in cls.layers:
            raise DeltaError(cls.refusal.format(kind=delta.kind))
        return cls()

    def init(self, delta, base: nn.Module) -> None:
        """Called once when the delta is built, after A, B got LoRA's init (B = 0)."""

    def terms(self, delta) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Low-rank terms ``(B', A')`` added to the update: ΔW = s·(BA + Σ B'A'), W's layout."""
        return []

    def forward(self, delta, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        raise NotImplementedError  # only for owns_forward

    def merge(self, delta, base: nn.Module) -> None:
        raise NotImplementedError  # only for owns_forward

    def unmerge(self, delta, base: nn.Module) -> None:
        raise NotImplementedError  # only for owns_forward

    @classmethod
    def export(cls, model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
               cfg: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """Save time (``Method.export``): tensors and config as written to the file."""
        return tensors, cfg
