"""Gradient checkpointing for small-memory runs (a quantized base): on only when the activations it
saves are a large part of the process, since recomputing them costs ~1/3 more compute per step."""
from __future__ import annotations

from torch import nn

# a transformer block keeps ~this many (B, T, hidden)-sized fp32 tensors for its backward (q, k, v,
# attention output, norms, residuals, and the MLP's 3 intermediate-sized ones at ~2.7x hidden)
ACTIVATIONS_PER_BLOCK = 16
CHECKPOINTING_FLOOR = 32 * 2**20  # below this the saving is noise next to the libraries' ~170 MiB


def checkpointing_pays(model: nn.Module, batch_size: int, max_length: int) -> bool:
    """Recomputing activations (~1/3 more compute per step) pays when the stored activations would
    be a large part of the process: here, when the estimate for all blocks exceeds a quarter of the
    model's storage and 32 MiB.  The 1B-class Llama at 1x512 (bench/quant.py): ~1 GiB of activations against
    ~0.8 GiB of NF4 weights and fp32 embeddings, so on; a tiny test model at 1x32: off."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    if not hidden or not layers or not getattr(model, "supports_gradient_checkpointing", False):
        return False
    acts = batch_size * max_length * hidden * 4 * ACTIVATIONS_PER_BLOCK * layers
    storage = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return acts > max(storage / 4, CHECKPOINTING_FLOOR)
