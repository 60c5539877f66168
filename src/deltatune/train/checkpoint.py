"""The trainer's checkpoints: one directory per saved step, written atomically by rank 0
(``adapter/`` in the normal adapter format, ``trainer_state.pt`` = trainable tensors, optimizer,
scheduler, RNG states of every rank, history; ``method_state.safetensors`` = methods' own
training state such as AdaLoRA's importance averages), then ``latest`` names it.  Loading uses
``torch.load(weights_only=True)`` and safetensors only.  Mixed into :class:`~deltatune.train.trainer.Trainer`."""
from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import distributed as dtd
from ..core import model_state
from ..core.delta import DeltaError, has_adapters
from ..core.method import METHODS
from ..files import atomic_write

CHECKPOINTS = "checkpoints"  # the sub-directory of an output directory holding step-N checkpoints


def _method_hooks(model: nn.Module, attr: str):
    """(adapter name, bound ``Method.<attr>``) for each active trainable adapter whose method
    implements that training hook (``Method.overrides``)."""
    st = model_state.get(model, model_state.STATE)
    for name, rec in list(st.adapters.items()) if st is not None else []:
        m = METHODS.get(rec.method)
        if m is not None and m.overrides(attr) and getattr(rec, "trainable", True) and name in st.active:
            yield name, getattr(m, attr)


class CheckpointMixin:
    """save_checkpoint / latest_checkpoint / _restore for the Trainer (uses its model, net, cfg,
    world, rank, optimizer state helpers and history fields)."""

    def checkpoint_dir(self) -> Path:
        if self.output_dir is None:
            raise DeltaError("checkpoints need an output_dir")
        return self.output_dir / CHECKPOINTS

    def save_checkpoint(self, step: int, opt, sched) -> Path:
        """Every rank calls it (FSDP shards and per-rank RNG states are gathered); rank 0 writes."""
        from safetensors.torch import save as st_save

        d = self.checkpoint_dir() / f"step-{step:07d}"
        if has_adapters(self.model):
            dtd.save(self.net, d / "adapter")
        rngs = dtd.all_gather_objects(_rng_state())
        state = {
            "step": step, "total_steps": self.total_steps, "world_size": self.world,
            "trainable": self._trainable_state(), "optimizer": dtd.optimizer_state(opt),
            "scheduler": sched.state_dict(), "rng": rngs[0],
            "history": json.dumps({"history": self.history, "evals": self.evals, "best": self.best,
                                   "bad_evals": self.bad_evals}),
            "best_state": self.best_state,
            "config": json.dumps(asdict(self.cfg)),
        }
        if self.world > 1:
            state["rng_by_rank"] = rngs
        extra = {f"{name}/{k}": dtd.full_tensor(v).detach().cpu().contiguous()
                 for name, hook in _method_hooks(self.model, "train_state")
                 for k, v in hook(self.model, name).items()}
        if self.is_main:
            if extra:
                atomic_write(d / "method_state.safetensors", st_save(extra))
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write(d / "trainer_state.pt", buf.getvalue())
            atomic_write(self.checkpoint_dir() / "latest", d.name.encode())  # last: names a complete checkpoint
            done = sorted(p for p in self.checkpoint_dir().glob("step-*") if p.is_dir() and p != d)
            for old in done[: max(0, len(done) - self.cfg.keep_checkpoints + 1)]:
                shutil.rmtree(old, ignore_errors=True)
        dtd.barrier()
        return d

    def latest_checkpoint(self) -> Path | None:
        f = self.checkpoint_dir() / "latest"
        if not f.exists():
            return None
        d = self.checkpoint_dir() / f.read_text().strip()
        return d if (d / "trainer_state.pt").exists() else None

    def _restore(self, d: Path, opt, sched) -> int:
        try:
            state = torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise DeltaError(f"{d / 'trainer_state.pt'}: unreadable checkpoint ({e}); delete it to resume "
                             "from the previous one") from None
        if state["total_steps"] != self.total_steps:
            raise DeltaError(f"{d}: the checkpoint planned {state['total_steps']} steps, this run plans "
                             f"{self.total_steps}; resume with the same data, batch size, epochs/steps")
        if state.get("world_size", 1) != self.world:
            raise DeltaError(f"{d}: the checkpoint was written by {state.get('world_size', 1)} processes, this run "
                             f"has {self.world}; resume with the same number of processes (the data order and "
                             "global batch depend on it)")
        saved, now = len(state["optimizer"]["param_groups"]), len(opt.param_groups)
        if saved != now:  # a run started before the fresh head had its own rate (--head-lr) had one group
            raise DeltaError(f"{d}: the checkpoint's optimizer has {saved} parameter group(s), this run has {now}; "
                             f"resume with {'--head-lr 0' if saved < now else 'the --head-lr the run started with'}")
        self._load_trainable(state["trainable"])
        dtd.load_optimizer_state(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng_by_rank"][self.rank] if self.world > 1 else state["rng"])
        if (d / "method_state.safetensors").exists():
            from safetensors.torch import load_file

            extra = load_file(str(d / "method_state.safetensors"))
            for name, hook in _method_hooks(self.model, "load_train_state"):
                mine = {k.split("/", 1)[1]: v for k, v in extra.items() if k.split("/", 1)[0] == name}
                hook(self.model, name, {k: v.to(self.device) for k, v in mine.items()})
        h = json.loads(state["history"])
        self.history, self.evals, self.best, self.bad_evals = h["history"], h["evals"], h["best"], h["bad_evals"]
        self.best_state = state["best_state"]
        return int(state["step"])


def _rng_state() -> dict:
    import numpy as np

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_v": random.getstate()[0], "numpy": torch.from_numpy(np_state[1].astype("int64")),
            "numpy_pos": int(np_state[2])}


def _set_rng_state(r: dict) -> None:
    import numpy as np

    torch.set_rng_state(r["torch"])
    random.setstate((r["python_v"], tuple(r["python"]), None))
    np.random.set_state(("MT19937", r["numpy"].numpy().astype("uint32"), r["numpy_pos"], 0, 0.0))
