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

``deltatune.train.Trainer`` uses the helpers at the bottom of this file (``wrap``, the
collectives, whole <-> sharded tensors) to do all of the above by itself under torchrun.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..core.delta import DeltaError
from ..storage.adapter import save as dt_save


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
    # leave the group before the interpreter tears down: a gloo/nccl group still alive at exit can
    # abort a process whose run succeeded ("terminate called without an active exception", exit -6),
    # and torchrun then reports the whole job as failed (seen under `accelerate launch`, 2 ranks)
    atexit.register(_leave)
    return dist.get_rank(), dist.get_world_size()


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return _world()


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
    path = None
    with gathered(model) as m:
        if rank() == 0:
            path = dt_save(m, directory, name)
    if _world() > 1:
        dist.barrier()
    return path


# --------------------------------------------------------------------------- for the trainer
# Everything below is a no-op / identity on one process, so the trainer calls it unconditionally.

def launched() -> bool:
    """True when the environment asks for several processes (torchrun, ``accelerate launch``)
    or a process group of more than one rank already exists."""
    return _world() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_wrapped(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, (DistributedDataParallel, FSDPModule))


def wrap(model: nn.Module, how: str, device: torch.device) -> nn.Module:
    """``ddp(model)`` or ``fsdp(model)`` for a model already on ``device`` (a wrapped model is
    returned as it is).  Returns the module to call in training: the DDP wrapper, or the model."""
    if is_wrapped(model) or _world() == 1:
        return model
    if how == "fsdp":
        return fsdp(model)
    on_gpu = device.type == "cuda"
    return ddp(model, device_ids=[torch.cuda.current_device() if device.index is None else device.index] if on_gpu
               else None)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of an FSDP DTensor (no communication); else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def sync_gradients(net: nn.Module, sync: bool) -> Iterator[None]:
    """Backward inside the block reduces gradients over the ranks only if ``sync``: gradient
    accumulation keeps them local for all micro-batches but the last (same sum, fewer messages)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if sync or _world() == 1:
        yield
    elif isinstance(net, DistributedDataParallel):
        with net.no_sync():
            yield
    elif isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield


def barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks (one all-reduce, float64)."""
    if _world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def mean_metrics(metrics: dict) -> dict:
    """Average the numeric entries (int/float, not bool) of a metrics dict over the ranks, so
    every rank sees and acts on the same numbers (early stopping, best checkpoint)."""
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if _world() == 1 or not keys:
        return metrics
    sums = sum_across_ranks([float(metrics[k]) for k in keys])
    return {**metrics, **{k: s / _world() for k, s in zip(keys, sums)}}


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled over the wire, not to disk)."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def same_on_all_ranks(rows: list[dict]) -> bool:
    """Whether every rank holds the same list of feature dicts (a fingerprint of its length and
    a few rows, not every row: it catches data pre-sharded by rank, cheaply)."""
    if _world() == 1:
        return True
    import hashlib

    n = len(rows)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({0, n // 3, n // 2, n - 1} if n else ()):
        for k, v in sorted(rows[i].items()):
            v = v.detach().cpu().numpy() if torch.is_tensor(v) else v
            h.update(k.encode() + (v.tobytes() if hasattr(v, "tobytes") else repr(v).encode()))
    return len(set(all_gather_objects(h.hexdigest()))) == 1


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (collective: every rank calls it); else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like ``like``: this rank's shard if ``like`` is an FSDP DTensor
    (every rank holds the same ``whole``, so nothing is sent); else ``whole`` on ``like``'s device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        whole = whole.to(like.device_mesh.device_type, like.dtype)
        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
    return whole.to(like.device, like.dtype)


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with FSDP shards gathered, so a checkpoint has the single-process
    layout (collective under FSDP)."""
    sd = opt.state_dict()
    sd["state"] = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Inverse of :func:`optimizer_state`: each rank keeps the shard of its parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sd = {**sd, "state": {i: {k: shard_like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() else v
                              for k, v in st.items()} for i, st in sd["state"].items()}}
    opt.load_state_dict(sd)
