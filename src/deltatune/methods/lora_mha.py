"""LoRA on ``torch.nn.MultiheadAttention``: the merged query/key/value projection and the output
projection each get a low-rank update, as in peft (same file keys, so files go both ways).

    in_proj_weight  (3E, E)  [W_q; W_k; W_v]  + s · B A        A (r, E), B (3E, r)
    out_proj.weight (E, E)   W_o              + s · B_o A_o    A_o (r, E), B_o (E, r)

``nn.MultiheadAttention`` never calls a submodule: its forward hands ``in_proj_weight`` and
``out_proj.weight`` to ``F.multi_head_attention_forward``.  So the delta cannot add to an output;
it is a ``reparam`` delta (core/delta.py): ``DeltaLayer`` runs the module's own forward with
W + ΔW swapped in for that call (``torch.func.functional_call``), which keeps every option of
the base (batch_first, masks, need_weights, its fused fast path) and leaves the frozen W alone.
peft does the same by merging before and unmerging after each forward.

As in peft: one module gets both updates (targeting ``out_proj`` alone would never run, and
core/direct_reads.py refuses it); only kdim == vdim == embed_dim (one packed ``in_proj_weight``);
no DoRA; and no LoRA dropout (the update is folded into the weights for the forward, so there is
no separate branch input to drop out).  Mixed batches are refused: the weights are the whole
batch's.

File keys (peft's): ``<path>.lora_A.weight``, ``<path>.lora_B.weight`` for in_proj and
``<path>.base_layer.out_proj.lora_{A,B}.weight`` for out_proj.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.delta import DeltaError
from ..core.dtypes import build_dtype
from .lora import EXTRA_LAYERS, LoraConfig, LoraDelta

OUT_PREFIX = "base_layer."  # peft keeps the out_proj adapter inside its wrapped MHA's base layer


class _OutProj(nn.Module):
    """The out_proj pair, a module of its own so its keys read ``out_proj.lora_A.weight``."""

    def __init__(self, e: int, r: int, dtype: torch.dtype):
        super().__init__()
        self.lora_A = nn.Linear(e, r, bias=False, dtype=dtype)  # (r, E)
        self.lora_B = nn.Linear(r, e, bias=False, dtype=dtype)  # (E, r)


def _check(base: nn.MultiheadAttention, cfg: LoraConfig) -> None:
    if not base._qkv_same_embed_dim:
        raise DeltaError(f"lora: nn.MultiheadAttention with kdim={base.kdim}, vdim={base.vdim} != embed_dim="
                         f"{base.embed_dim} (separate q/k/v weights) is not supported, as in peft; target other layers")
    if cfg.dora:
        raise DeltaError("lora: dora=True is not supported on nn.MultiheadAttention (peft has no DoRA there either); "
                         "use plain LoRA on it, or exclude it from targets")
    if cfg.init == "pissa":
        raise DeltaError("lora: init='pissa' supports linear layers only; use init='default' on nn.MultiheadAttention")
    if not isinstance(base.out_proj, nn.Linear):
        raise DeltaError(f"lora: nn.MultiheadAttention whose out_proj is a {type(base.out_proj).__name__}, not an "
                         "nn.Linear, is not supported; target other layers")


class LoraMHA(LoraDelta):
    """LoRA on both projections of one ``nn.MultiheadAttention``."""

    reparam = True
    kind = "attention"  # no LoRA variant declares it (peft has no DoRA here): refused before allocating

    def __init__(self, base: nn.MultiheadAttention, r: int, alpha: float, cfg: LoraConfig):
        super().__init__()
        _check(base, cfg)
        self._setup(r, alpha, cfg)
        self.dropout = nn.Identity()  # folded into the weights: no branch input to drop out (peft: same)
        e, dtype = base.embed_dim, build_dtype(base)
        self.lora_A = nn.Linear(e, r, bias=False, dtype=dtype)  # (r, E), Kaiming-uniform as nn.Linear's init
        self.lora_B = nn.Linear(r, 3 * e, bias=False, dtype=dtype)  # (3E, r)
        self.out_proj = _OutProj(e, r, dtype)
        for a, b in ((self.lora_A, self.lora_B), (self.out_proj.lora_A, self.out_proj.lora_B)):
            if cfg.init == "gaussian":
                nn.init.normal_(a.weight, std=1 / r)
            nn.init.zeros_(b.weight)

    def save_key(self, local_key: str) -> str:
        return OUT_PREFIX + local_key if local_key.startswith("out_proj.") else local_key

    def lora_B_dtype(self):
        return self.lora_B.weight.dtype

    def b_params(self):
        return [self.lora_B.weight, self.out_proj.lora_B.weight]

    def weight_deltas(self, base) -> dict[str, torch.Tensor]:
        s = self.scaling
        return {"in_proj_weight": (self.lora_B.weight @ self.lora_A.weight) * s,  # (3E, E)
                "out_proj.weight": (self.out_proj.lora_B.weight @ self.out_proj.lora_A.weight) * s}  # (E, E)

    def forward(self, x, y, base):
        # a reparam delta: DeltaLayer runs the base on W + ΔW instead (mixed.py refuses per-row routing)
        raise DeltaError("lora on nn.MultiheadAttention has no output to add to: call the wrapping DeltaLayer, "
                         "which runs the attention on W + ΔW")

    def _fold(self, base, sign: int) -> None:
        # in the wider dtype, rounded once into the base's
        with torch.no_grad():
            for k, dw in self.weight_deltas(base).items():
                p = base.get_parameter(k)
                dt = torch.promote_types(p.dtype, dw.dtype)
                p.data.copy_((p.data.to(dt) + sign * dw.to(dt)).to(p.dtype))

    def merge(self, base):
        self._fold(base, 1)

    def unmerge(self, base):
        self._fold(base, -1)

    def delta_weight(self, base):
        raise DeltaError("lora on nn.MultiheadAttention updates two weights (in_proj_weight, out_proj.weight); "
                         "use dt.merge, which folds both")


EXTRA_LAYERS[nn.MultiheadAttention] = LoraMHA
