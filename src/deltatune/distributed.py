"""Multi-process training with PyTorch's own engine: ``torchrun`` + DDP or FSDP2 (``fully_shard``).

    torchrun --nproc_per_node 2 train.py          # train.py:
        rank, world = dtd.init()                   # process group from torchrun's environment
        model = dt.attach(load_base(), "lora", r=8)
        model = dtd.ddp(model)   or   dtd.fsdp(model)
        opt = torch.optim.AdamW(dtd.trainable_parameters(model), lr=2e-4)
        ... each rank trains on its own shard of every batch ...
        dtd.save(model, "out/adapter")             # every rank calls it; rank 0 writes

What is communicated:

    DDP    start: the adapter tensors are broadcast from rank 0 (the frozen base is loaded
           identically everywhere, so it is never sent); each step: an all-reduce (mean) of the
           adapter gradients only — DDP buckets only parameters with requires_grad.
    FSDP2  every parameter is sharded over the ranks (the base too: that is the point of FSDP,
           a base that does not fit on one device); each layer's shards are all-gathered for its
           forward/backward and freed again; gradients are reduce-scattered for the adapter
           parameters only, so optimizer state exists only for adapter shards.

Either way the optimizer sees only the adapter parameters, and ``save`` writes the same files as
``dt.save`` on one process (FSDP shards are gathered first, collectively).  Correctness check:
tests/test_distributed.py trains 2 ranks × batch b and compares with one process at batch 2b.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .core import DeltaError


def init(backend: str | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment; returns (rank, world size).

    ``backend`` defaults to nccl when CUDA is available, gloo otherwise.  Without torchrun's
    variables (a plain ``python train.py``) this is a no-op returning (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 shards in place, so it has none)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to give the optimizer: the active adapters' (everything else is frozen)."""
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    if not params:
        raise DeltaError("no trainable parameters: attach an adapter (dt.attach) before wrapping the model")
    return params


def broadcast_adapters(model: nn.Module, src: int = 0) -> None:
    """Copy every trainable tensor from rank ``src`` to all ranks, so randomly-initialised adapters
    (LoRA's A, prompt embeddings, ...) start identical.  Frozen tensors are not sent."""
    if _world() == 1:
        return
    with torch.no_grad():
        for p in trainable_parameters(model):
            dist.broadcast(p.data, src=src)


def ddp(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """Wrap for DistributedDataParallel; only adapter parameters are broadcast and all-reduced.

    ``ddp_kwargs`` go to ``DistributedDataParallel`` (``device_ids=[local_rank]`` on GPUs)."""
    from torch.nn.parallel import DistributedDataParallel

    if _world() == 1 and not (dist.is_available() and dist.is_initialized()):
        raise DeltaError("dtd.ddp needs a process group: launch with torchrun and call dtd.init() first")
    broadcast_adapters(model)
    ddp_kwargs.setdefault("init_sync", False)  # the base is identical on every rank; adapters just synced
    ddp_kwargs.setdefault("forward_sync_buffers", False)  # base buffers are deterministic (rotary tables, ...)
    return DistributedDataParallel(model, **ddp_kwargs)


def _layer_classes(model: nn.Module) -> set[str]:
    return set(getattr(model, "_no_split_modules", None) or [])


def fsdp(model: nn.Module, layer_classes: set[str] | None = None, **fsdp_kwargs) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each transformer block (``model._no_split_modules``
    for transformers models, or ``layer_classes``) is one unit, then the root.  Returns the model.

    ``fsdp_kwargs`` go to ``torch.distributed.fsdp.fully_shard`` (``mesh``, ``mp_policy``, ...)."""
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise DeltaError("dtd.fsdp needs a process group: launch with torchrun and call dtd.init() first")
    broadcast_adapters(model)
    names = _layer_classes(model) if layer_classes is None else set(layer_classes)
    for mod in list(model.modules()):
        if mod is not model and type(mod).__name__ in names:
            fully_shard(mod, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every FSDP-sharded parameter is whole on every rank (collective: all
    ranks must enter).  A no-op for DDP and single-process models."""
    from torch.distributed.fsdp import FSDPModule

    model = unwrap(model)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()


def save(model: nn.Module, directory, name: str | None = None):
    """``dt.save`` for a DDP/FSDP model: every rank must call it; rank 0 writes the usual adapter
    files (same format as a single-process save) and the others wait until they exist."""
    from .io import save as dt_save

    path = None
    with gathered(model) as m:
        if rank() == 0:
            path = dt_save(m, directory, name)
    if _world() > 1:
        dist.barrier()
    return path
