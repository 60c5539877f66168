"""The storage codecs under the quantized layers of ``quant/layers.py``: how NF4 and int8 weights
are packed, which backend decodes them, and the autograd Functions that multiply by a weight
decoded on the fly (so autograd saves the packed storage, never a float W).

Backend choice, measured on this machine (torch 2.13 CPU, 2 shared cores, fwd+bwd of a
(1024×in) batch; medians of 5 interleaved runs; see docs/benchmarks.md):

    layer (out×in)   fp32 F.linear   bitsandbytes 0.50.2   torchao 0.18 NF4   pure torch
    576×576             3.5 ms           4.0 ms               5.2 ms           5.3 ms
    1536×576            9.2 ms           9.9 ms              13.8 ms          13.3 ms
    768×3072           24.7 ms          24.7 ms              37.5 ms          40.3 ms
    dequantize 768×3072               0.46 ms               4.8 ms           4.3 ms

NF4 uses **bitsandbytes** (``quantize_4bit`` / ``dequantize_4bit`` / ``matmul_4bit``): the QLoRA
authors' reference implementation, kept by Hugging Face, with a C++ CPU kernel that dequantizes
~10× faster than torchao or pure torch; its autograd Function saves only the packed codes.
torchao's ``to_nf4`` imports and runs but asserts that the number of blocks is divisible by its
scaler block (256): SmolLM2's 576×576 and 192×576 projections fail unless that is changed.
int8 per-channel absmax is three tensor ops, so it is plain torch (a small autograd Function that
casts the int8 matrix to the compute dtype inside forward/backward only).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..core.delta import DeltaError

# the NF4 block sizes bitsandbytes' kernels accept (QLoRA uses 64)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def bnb():
    """(bitsandbytes, bitsandbytes.functional), imported on first use (optional dependency: deltatune[quant])."""
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # silence "no GPU kernels" notices
        import bitsandbytes
        import bitsandbytes.functional as bf
    except ImportError as e:
        raise DeltaError(f"NF4 quantization needs bitsandbytes ({e}); pip install 'deltatune[quant]' "
                         "(or use scheme 'int8', which needs only torch)") from None
    return bitsandbytes, bf


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(kind: str, device: torch.device) -> torch.Tensor:
    """The constant code tables bitsandbytes decodes with ("nf4": 16 levels, "dynamic8": the
    double-quantized scales' 256 levels), one copy per device."""
    if (kind, device) not in _TABLES:
        _, bf = bnb()
        _TABLES[(kind, device)] = (bf.get_4bit_type("nf4", device=device) if kind == "nf4"
                                   else bf.create_dynamic_map(signed=True).to(device))
    return _TABLES[(kind, device)]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' packing: element 2i in the high nibble, 2i+1 in the low one; (n/2, 1) uint8."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    return ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)


class DequantMatmul(torch.autograd.Function):
    """y = x Wᵀ, W = layer._dequant() decoded in forward and again in backward: autograd keeps
    the packed storage only (the layer), never a float W."""

    @staticmethod
    def forward(ctx, x, layer):  # x (..., in)
        ctx.layer = layer
        return F.linear(x, layer._dequant().to(x.dtype))  # (..., out)

    @staticmethod
    def backward(ctx, g):  # g (..., out)
        gx = g @ ctx.layer._dequant().to(g.dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        return gx, None


class Int8Matmul(torch.autograd.Function):
    """y = (x Qᵀ) ⊙ s; saves the int8 Q and s only, casts Q to x's dtype inside each pass."""

    @staticmethod
    def forward(ctx, x, q, scale):  # x (..., in), q (out, in) int8, scale (out,)
        ctx.save_for_backward(q, scale)
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)  # (..., out)

    @staticmethod
    def backward(ctx, g):  # g (..., out)
        q, scale = ctx.saved_tensors
        gx = (g * scale.to(g.dtype)) @ q.to(g.dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        return gx, None, None
