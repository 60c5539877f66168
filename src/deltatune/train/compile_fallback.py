"""compile="auto" must never cost a run: when torch.compile itself fails (no working C++ toolchain,
an op dynamo cannot trace, inputs whose shapes keep changing) the trainer drops the compiled blocks
and redoes the step eagerly."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..fast import repeated_blocks

# compile="auto" compiles the blocks with symbolic batch and sequence sizes (one compile for every
# padded length; a batch of 1 is one more); past this many recompilations the run goes eager instead
# of spending minutes recompiling (torch's own limit, 8, only warns and keeps going per frame)
COMPILE_RECOMPILE_LIMIT = 8


def fall_back_to_eager(model: nn.Module, err: Exception) -> bool:
    """If ``err`` is a compiler failure, un-compile ``model``'s blocks, clear its gradients and say
    so in one line; True = redo the step eagerly, False = ``err`` is not ours to handle."""
    # imported here: torch._dynamo takes a while to import and most runs never get here
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    if not isinstance(err, (TorchDynamoException, FailOnRecompileLimitHit)):
        return False
    for block in repeated_blocks(model) or []:
        block._compiled_call_impl = None
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    why = ("the input shapes kept changing (more than %d recompilations)" % COMPILE_RECOMPILE_LIMIT
           if isinstance(err, FailOnRecompileLimitHit) else
           f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    # one line for the user (deltatune's logger reaches the terminal); the details are in the run's log
    logging.getLogger("deltatune").warning(
        "torch.compile stopped (%s); training continues without it (--compile off skips the attempt)", why)
    return True
