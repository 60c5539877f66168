"""Calibrated NF4 while streaming: the calibration batches walk through the model block by block,
so the float model never exists (``load_quantized(path, "nf4", calibration=batches)``).

    embeddings, norms, head ──► loaded as without calibration (they stay float)
    model(batch) with a hook that stops at block 0 ──► block 0's inputs: hidden states (B, T, H)
                                 and the keyword arguments the model builds for its blocks
                                 (attention mask, rotary (cos, sin), position ids)
    for each block i:  load block i in fp32 from the file ──► run the inputs through it, recording
                       h_j = E[x_j²] of each linear layer's input features ──► quantize its linear
                       layers with ``search_scales`` ──► run the inputs through the *quantized*
                       block: its outputs are block i+1's inputs ──► release block i's float scratch

    peak ≈ quantized model + one fp32 block + the calibration activations (B·T·H fp32 per batch)

This is the sequential calibration of GPTQ / AutoRound / llm-compressor: each block's statistics
come from inputs that went through the already-quantized blocks before it, so later scales see
the error the earlier rounding made (``dt.quantize(model, calibration=...)`` computes every
block's statistics on the float model instead; block 0's statistics, hence its codes, are the same
in both).  Within a block every layer is calibrated from one float pass of that block.

Blocks are found generically (the ``nn.ModuleList`` holding every layer to quantize) and all get
the keyword arguments captured at block 0, which holds for decoders whose blocks all attend the
same way (Llama, Qwen2, Mistral, GPT-2, ...); models whose blocks differ (sliding-window and full
attention interleaved) or with quantized layers outside the block list are refused in one line.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from ..core.delta import DeltaError, get_submodule_clean
from ..core.procmem import release_to_os
from .search import InputSquares, as_batches

Fill = Callable[[dict, set], None]  # fill(thunks subset, paths to quantize): read tensors into the skeleton
_FALLBACK = "load the float model and call dt.quantize(model, 'nf4', calibration=batches) instead"


class _Captured(Exception):
    """Raised by the hook on block 0 once its inputs are recorded: the rest of the model is not loaded."""


def decoder_blocks(model: nn.Module, quant_paths: set[str], where) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the blocks that hold every layer to quantize."""
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    inside = lambda p: {q for q in quant_paths if q.startswith(p + ".")}  # noqa: E731
    best = max(lists, key=lambda pm: len(inside(pm[0])), default=None)
    if best is None or not inside(best[0]):
        raise DeltaError(f"{where}: streamed calibration needs a list of transformer blocks and "
                         f"{type(model).__name__} has none holding its linear layers; {_FALLBACK}")
    outside = sorted(quant_paths - inside(best[0]))
    if outside:
        raise DeltaError(f"{where}: streamed calibration quantizes block by block, but {len(outside)} layer(s) sit "
                         f"outside {best[0]!r}, e.g. {outside[:2]}; pass skip=... for them or {_FALLBACK}")
    kinds = {getattr(b, "attention_type", None) for b in best[1]} | set(getattr(model.config, "layer_types", None) or [])
    if len(kinds) > 1:
        raise DeltaError(f"{where}: its blocks attend in different ways ({sorted(map(str, kinds))}), so the inputs "
                         f"captured at block 0 do not fit the others; {_FALLBACK}")
    return best


def capture_inputs(model: nn.Module, block: nn.Module, batches: list) -> list[tuple[tuple, dict]]:
    """(args, kwargs) that ``model``'s own forward passes to ``block`` for each batch, stopping
    there (the blocks and head need not be loaded)."""
    seen: list[tuple[tuple, dict]] = []

    def stop(mod, args, kwargs):
        seen.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                kw = dict(b) if isinstance(b, Mapping) else {"input_ids": b}
                try:
                    model(**kw, use_cache=False)
                except _Captured:
                    continue
                raise DeltaError("calibration: the model's forward never reached its first block; "
                                 f"{_FALLBACK}")
    finally:
        handle.remove()
    return seen


def _hidden(out) -> torch.Tensor:
    """A block's output hidden states (B, T, H): transformers' blocks return the tensor or a tuple."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _run(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The inputs of the next block: each batch's hidden states through ``block``."""
    with torch.no_grad():
        return [((_hidden(block(*args, **kw)), *args[1:]), kw) for args, kw in inputs]


def calibrate_streamed(model: nn.Module, thunks: dict, quant_paths: set[str], make: Callable, calibration,
                       fill: Fill, where, release: bool = True) -> int:
    """Load ``model`` from ``thunks`` block by block, quantizing the layers in ``quant_paths`` with
    ``make(float_module, path, input_sq)`` on statistics of ``calibration`` that went through the
    quantized blocks before; returns the number of calibration batches."""
    batches = as_batches(calibration)
    if not batches:
        raise DeltaError("calibration: no batches given; pass a batch or a list of batches (input_ids tensors or "
                         "dicts of model arguments), or calibration=None for absmax scales")
    path, blocks = decoder_blocks(model, quant_paths, where)
    own: list[dict] = [{} for _ in blocks]
    outer = {}
    for key, thunk in thunks.items():
        head, _, rest = key.partition(path + ".")
        i = rest.split(".", 1)[0] if not head and rest else ""
        (own[int(i)] if i.isdigit() and int(i) < len(blocks) else outer)[key] = thunk
    fill(outer, set())  # embeddings, final norm, head: float, as without calibration
    inputs = capture_inputs(model, blocks[0], batches)
    for i, block in enumerate(blocks):
        fill(own[i], set())  # this block in fp32: the only float block in memory
        prefix = f"{path}.{i}."
        mine = sorted(p for p in quant_paths if p.startswith(prefix))
        with InputSquares({p: get_submodule_clean(model, p) for p in mine}) as rec, torch.no_grad():
            for args, kw in inputs:  # float pass: the statistics only (outputs dropped)
                block(*args, **kw)
        stats = rec.result()
        del rec  # it holds the float modules: they must go with their replacement below
        for p, h in stats.items():
            parent, _, child = p.rpartition(".")
            owner = get_submodule_clean(model, parent)
            owner._modules[child] = make(owner._modules[child], p, h)
            if release:  # the search's scratch (slabs under glibc's mmap threshold) back to the OS per layer,
                release_to_os()  # else freed heap pieces pile up behind live ones: +15 MiB measured per block
        inputs = _run(block, inputs) if i + 1 < len(blocks) else []  # through the quantized block
        if release:
            release_to_os()
    return len(batches)
