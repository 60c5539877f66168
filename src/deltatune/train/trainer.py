"""A small training loop for deltatune models (used by the CLI, usable from Python).

    for step in range(start, total_steps):            # one step = one optimizer update
        for micro in range(grad_accum):                # gradient accumulation
            loss = loss_fn(model, next(batches)) / grad_accum;  loss.backward()
        clip_grad_norm_(trainable, max_grad_norm);  optimizer.step();  scheduler.step()
        run_step_hooks(model, step + 1, total_steps)  # methods' per-step logic (grads still present)
        callbacks(step + 1, total_steps, model);  optimizer.zero_grad()
        every eval_every: evaluate, early stopping;  every save_every: checkpoint (atomic)

AdamW over the trainable tensors (``requires_grad``, i.e. the active adapter; a fresh head at its own
rate, ``head_lr``), a linear / cosine / constant schedule with linear warmup, gradient clipping,
seeded data order, optional gradient checkpointing and bf16 autocast.  Checkpoints hold the
trainable tensors, optimizer, scheduler, RNG states and the data position, so
``train(resume=True)`` continues *exactly*: the final adapter equals that of an uninterrupted run.

**Step-hook interface (for methods such as AdaLoRA).**  After every optimizer step, before the
gradients are zeroed, the trainer calls, for each trainable adapter of the model whose method
defines it::

    Method.step_hook(self, model, name: str, step: int, total_steps: int) -> None

(``step`` counts finished optimizer steps from 1; ``total_steps`` is the planned number).  Plain
PyTorch loops get the same behaviour by calling :func:`run_step_hooks` after ``optimizer.step()``.
User callbacks are plain callables ``cb(step, total_steps, model)`` passed as ``callbacks=[...]``.
Experiment tracking (``tracker=``, a :class:`deltatune.tracking.Trackers`): after every step the
trainer reports ``train/loss``, ``train/lr``, ``train/grad_norm`` (before clipping),
``train/samples_per_s`` and ``train/tokens_per_s`` (real tokens: the unpadded feature lengths), and
``eval/<metric>`` after every evaluation; nothing else about tracking lives in the loop.

A method with training state beyond its tensors (AdaLoRA's importance averages, rank masks) also
defines the pair below, kept in checkpoints as ``method_state.safetensors`` (no pickle; exact resume)::

    Method.train_state(self, model, name) -> dict[str, torch.Tensor]
    Method.load_train_state(self, model, name, tensors: dict[str, torch.Tensor]) -> None

Data: a list of feature dicts and a ``collate`` function (:mod:`deltatune.data`); each epoch's order
is a permutation from a generator seeded with ``(seed, epoch)``: no global RNG, replayed on resume.

**Several processes** (``torchrun`` / ``accelerate launch``; docs/distributed.md).  The trainer
joins the process group from the environment (gloo on CPU, nccl on CUDA), wraps the model with
DDP (or FSDP2: ``parallel="fsdp"``) and shards the data: every rank gets the *whole* feature
list, draws the same epoch permutation (padded to a multiple of the world size W by repeating
its first rows, as ``DistributedSampler`` does) and takes its contiguous W-th of each global
batch of W × ``batch_size`` rows.  So ``batch_size`` is per rank, the global batch is W times
it, and a run on W ranks follows the same data order, learning-rate schedule and updates as one
process at batch W × ``batch_size`` (tested).  Losses and eval metrics are averaged over ranks;
rank 0 alone shows progress and writes checkpoints, the others wait at a barrier.
"""
from __future__ import annotations

import functools
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import distributed as dtd
from ..core.delta import DeltaError
from .results import TrainResult, plot, write_metrics  # noqa: F401 - plot, write_metrics: their public path
from ..safety import first_nonfinite
from ..tracking import Trackers
from .checkpoint import CheckpointMixin, _method_hooks
from .head_warmup import HEAD_LR, HeadWarmup, head_groups, head_lr_scale, head_parameters
from .losses import LABEL_SMOOTHING, default_loss
from .compile_fallback import COMPILE_RECOMPILE_LIMIT, fall_back_to_eager
from .. import fast
from ..data.examples import collate as default_collate
from ..fast import enable_checkpointing, repeated_blocks

SCHEDULES: dict[str, Callable[[float], float]] = {
    # progress in [0, 1] after warmup -> lr multiplier
    "linear": lambda p: max(0.0, 1.0 - p),
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0))),
    "constant": lambda p: 1.0,
}


COMPILE_AUTO_STEPS = 500  # compile="auto": ~30-60 s of compiling is repaid well before this many steps


@dataclass
class TrainConfig:
    lr: float = 1e-3  # adapters learn at ~5e-4..1e-3 (full fine-tuning ~5e-5); the CLI uses Method.default_lr
    weight_decay: float = 0.0  # adapters are tiny and start at zero: decay only pulls them back (peft default 0)
    batch_size: int = 16  # fits a 2-core CPU with 128-token rows; raise with grad_accum for stabler steps
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 3.0  # used when max_steps is None; small task sets need a few passes (HF's default too)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    warmup_ratio: float = 0.06  # of total steps: the RoBERTa / BERT fine-tuning recipe
    schedule: str = "linear"  # "linear" | "cosine" | "constant" after warmup
    max_grad_norm: float | None = 1.0  # clip: guards a fresh head's first large gradients
    seed: int = 0  # model init of new tensors, data order, dropout
    eval_every: int | None = None  # steps between evaluations; None = about 4 per run
    save_every: int | None = None  # steps between checkpoints; None = only the final adapter
    keep_checkpoints: int = 2  # older checkpoints are deleted
    early_stopping: int | None = None  # stop after this many evaluations without improvement
    metric: str = "loss"  # key of the eval dict that early stopping / best tracking watches
    greater_is_better: bool = False  # False for loss, True for accuracy
    restore_best: bool | None = None  # end with the best evaluated weights; None = only with early_stopping
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; CPU and GPU)
    device: str = "auto"  # "auto" = cuda when available, else cpu
    progress: bool = True  # tqdm bar with loss, throughput and ETA (stderr); rank 0 only
    parallel: str = "ddp"  # several processes: "ddp" (base fits one device) | "fsdp" (FSDP2 shards the base too)
    # regional torch.compile of the transformer blocks (fast.compile_blocks): ~30% faster steps for
    # a one-off ~30-60 s compile; "auto" = on for runs of >= COMPILE_AUTO_STEPS steps in one process
    # when a C++ compiler is installed (inductor needs one), where the compile pays for itself
    compile: str = "auto"  # "auto" | "on" | "off"
    head_warmup: float = 0.0  # LP-FT: share of steps in which only a new head trains (train/head_warmup.py)
    head_lr: float = HEAD_LR  # a fresh classification head trains at max(lr, head_lr) (train/head_warmup.py)
    # smoothed targets for single-label classification with the default loss (default_loss); causal
    # LMs and a user's loss_fn are unaffected
    label_smoothing: float = LABEL_SMOOTHING

    def validate(self) -> None:
        checks = {
            "lr": self.lr > 0, "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "epochs": self.epochs > 0, "max_steps": self.max_steps is None or self.max_steps >= 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1, "schedule": self.schedule in SCHEDULES,
            "precision": self.precision in ("fp32", "bf16"), "parallel": self.parallel in ("ddp", "fsdp"),
            "compile": self.compile in ("auto", "on", "off"), "head_warmup": 0 <= self.head_warmup < 1,
            "eval_every": self.eval_every is None or self.eval_every >= 1, "head_lr": self.head_lr >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "save_every": self.save_every is None or self.save_every >= 1,
            # torch, random and numpy are all seeded with it; numpy takes 0 <= seed < 2**32
            "seed": isinstance(self.seed, int) and 0 <= self.seed < 2**32,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            k = bad[0]
            raise DeltaError(f"training option {k}={getattr(self, k)!r} (--{k.replace('_', '-')} on the command "
                             "line) is invalid"
                             + (f"; choose one of {sorted(SCHEDULES)}" if k == "schedule" else "")
                             + ("; use an integer in [0, 2**32)" if k == "seed" else ""))


def run_step_hooks(model: nn.Module, step: int, total_steps: int) -> None:
    """Call ``Method.step_hook(model, name, step, total_steps)`` for each trainable adapter."""
    for name, hook in _method_hooks(model, "step_hook"):
        hook(model, name, step, total_steps)


def epoch_batches(n: int, seed: int, epoch: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Row indices of rank ``rank``'s batches in ``epoch``.  Every rank draws the same permutation
    (seeded by ``(seed, epoch)``), pads it to a multiple of ``world`` by repeating its first rows
    (as ``DistributedSampler`` does), cuts it into global batches of ``world × batch_size`` rows and
    takes its contiguous ``world``-th of each: concatenated over ranks, a global batch is exactly
    the batch of one process at ``world × batch_size`` (when ``world`` divides ``n``)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    perm += [perm[i % n] for i in range(-n % world)]
    size = batch_size * world
    out = []
    for start in range(0, len(perm), size):
        rows = perm[start:start + size]
        k = len(rows) // world  # the last global batch may be short: equal shares, still
        out.append(rows[rank * k:(rank + 1) * k])
    return out


def peak_rss_mb() -> float:
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


class Trainer(CheckpointMixin):
    """``Trainer(model, features, config, eval_fn=..., output_dir=...).train(resume=False)``.

    ``features``: list of dicts turned into a batch by ``collate``; ``eval_fn(model) -> dict`` of
    metrics (called in eval mode, under ``torch.no_grad``).  With ``output_dir``, checkpoints go
    to ``output_dir/checkpoints/step-N/``.

    Under torchrun every rank builds the same Trainer with the *whole* ``features`` (it shards
    them itself); ``loss_fn`` is then given the DDP wrapper (call it; ``dtd.unwrap`` for
    attributes), ``eval_fn`` and callbacks the model itself.  ``eval_fn`` runs on every rank and
    its numbers are averaged: let each rank score its share of the eval set to save time.  Save
    the result with :meth:`save_adapter` on every rank, or gate other writes on :attr:`is_main`."""

    def __init__(self, model: nn.Module, features: Sequence[dict], config: TrainConfig | None = None, *,
                 collate: Callable[[list], dict] | None = None, eval_fn: Callable[[nn.Module], dict] | None = None,
                 loss_fn: Callable[[nn.Module, dict], torch.Tensor] = default_loss,
                 output_dir: str | Path | None = None, callbacks: Sequence[Callable] = (),
                 param_groups: list[dict] | None = None, tracker: Trackers | None = None,
                 head_params: Sequence[nn.Parameter] | None = None):
        self.features = list(features)
        self.cfg = config or TrainConfig()
        self.cfg.validate()
        if not self.features:
            raise DeltaError("no training examples")
        self.collate = collate or default_collate
        if loss_fn is default_loss and self.cfg.label_smoothing > 0:
            loss_fn = functools.partial(default_loss, label_smoothing=self.cfg.label_smoothing)
        self.eval_fn, self.loss_fn = eval_fn, loss_fn
        self.output_dir = Path(output_dir) if output_dir else None
        self.compiled = False  # set by train(): torch.compile on, and still on at the end
        self.callbacks = list(callbacks)
        self.tracker = tracker or Trackers()  # --report-to backends (deltatune.tracking); empty = off
        self.rank, self.world = dtd.init() if dtd.launched() else (0, 1)
        self.model, self.net = dtd.unwrap(model), model  # net: what the loss calls (the DDP wrapper, if any)
        self.device = torch.device(self.cfg.device if self.cfg.device != "auto" else
                                   f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise DeltaError("the model has no trainable tensors; attach an adapter (dt.attach) first")
        self.param_groups = param_groups
        if not dtd.same_on_all_ranks(self.features):
            raise DeltaError("the ranks were given different training data; give every rank the whole "
                             "data set: the trainer shards it over the ranks itself")
        c = self.cfg
        self.batches_per_epoch = len(epoch_batches(len(self.features), c.seed, 0, c.batch_size, 0, self.world))
        self.total_steps = c.max_steps or max(1, math.ceil(c.epochs * self.batches_per_epoch / c.grad_accum))
        self.eval_every = c.eval_every or max(1, math.ceil(self.total_steps / 4))
        self._own_head = head_params is None  # default: the fresh head (found again after an FSDP wrap)
        self.head = head_parameters(self.model) if self._own_head else head_params
        self.head_warmup = HeadWarmup(self.params, self.head, c.head_warmup, self.total_steps)  # LP-FT
        self.head_lr = c.head_lr * head_lr_scale(self.model)  # the fresh head's floor, at the scale it reads

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0; always on a single process)."""
        return self.rank == 0

    def save_adapter(self, directory: str | Path, name: str | None = None) -> Path | None:
        """``dt.save`` of the trained model; every rank calls it, rank 0 writes (atomically)."""
        return dtd.save(self.net, directory, name)

    # ------------------------------------------------------------------ data order
    def _batch(self, micro: int) -> dict:
        epoch, pos = divmod(micro, self.batches_per_epoch)
        if getattr(self, "_order_epoch", None) != epoch:
            self._order = epoch_batches(len(self.features), self.cfg.seed, epoch, self.cfg.batch_size,
                                        self.rank, self.world)
            self._order_epoch = epoch
        feats = [self.features[i] for i in self._order[pos]]
        self._last_tokens = sum(len(f["input_ids"]) for f in feats if "input_ids" in f)
        batch = self.collate(feats)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ pieces
    def _optimizer(self):
        groups = self.param_groups or head_groups(self.params, self.head, self.cfg.lr, self.head_lr)
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warm = int(self.cfg.warmup_ratio * self.total_steps)
        decay = SCHEDULES[self.cfg.schedule]
        total = self.total_steps

        def mult(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            return decay((step - warm) / max(1, total - warm))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, mult)

    def _trainable_state(self) -> dict[str, torch.Tensor]:  # collective under FSDP
        return {n: dtd.full_tensor(p.detach()).cpu().clone() for n, p in self.model.named_parameters()
                if p.requires_grad}

    def _load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(own) != set(tensors):
            diff = sorted(set(own) ^ set(tensors))[:5]
            raise DeltaError(f"checkpoint does not match this model's trainable tensors (e.g. {diff}); "
                             "resume with the same model, method and options")
        # DTensor.shape is the global shape, so this holds under FSDP too
        shapes = [f"{n} {tuple(tensors[n].shape)} vs {tuple(p.shape)}" for n, p in own.items()
                  if tuple(tensors[n].shape) != tuple(p.shape)]
        if shapes:
            raise DeltaError(f"checkpoint tensors have other shapes than this model's ({', '.join(shapes[:3])}); "
                             "resume with the same model, method and options (e.g. the same rank r)")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(dtd.shard_like(tensors[n], p))

    def _evaluate(self) -> dict:
        was = self.model.training
        self.model.eval()
        # evaluation runs eagerly: under no_grad the compiled blocks would recompile (dynamo guards on
        # grad mode) at every evaluation, twice per eval_every, and hit the recompile cap
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            m = dtd.mean_metrics(dict(self.eval_fn(self.model)))
        self.model.train(was)
        return m

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        b = self.best[self.cfg.metric]
        return value > b if self.cfg.greater_is_better else value < b

    # ------------------------------------------------------------------ checkpoints
    def _accumulate(self, step: int, autocast) -> tuple[float, int, int]:
        """Forward + backward of one optimizer step's micro-batches; returns (mean loss, rows seen,
        real tokens seen: the unpadded length of the features, packed or not)."""
        c, loss_sum, samples, tokens = self.cfg, 0.0, 0, 0
        for k in range(c.grad_accum):
            batch = self._batch(step * c.grad_accum + k)
            with dtd.sync_gradients(self.net, k == c.grad_accum - 1):  # all-reduce once per step
                with autocast:
                    loss = self.loss_fn(self.net, batch)
                if not torch.isfinite(loss):
                    last = self.latest_checkpoint() if self.output_dir else None
                    raise DeltaError(f"loss is {loss.item()} at step {step + 1}; stopping (last good "
                                     f"checkpoint: {last or 'none'}). Lower --lr or check the data")
                (loss / c.grad_accum).backward()
            loss_sum += loss.item() / c.grad_accum
            samples += len(next(iter(batch.values()))) * self.world
            tokens += self._last_tokens  # this rank's; summed over the ranks by the caller
        return loss_sum, samples, tokens

    def _compile(self) -> bool:
        c = self.cfg
        if c.compile == "on":
            return True
        if c.compile == "off" or self.total_steps < COMPILE_AUTO_STEPS or self.world > 1:
            return False
        return repeated_blocks(self.model) is not None and any(
            shutil.which(cc) for cc in (os.environ.get("CXX", "c++"), "g++", "clang++"))

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False) -> TrainResult:
        c, model = self.cfg, self.model
        compiled = self._prepare_model()
        self.history, self.evals, self.best, self.bad_evals, self.best_state = [], [], None, 0, None
        opt, sched = self._optimizer()
        start = self._resume_or_seed(resume, opt, sched)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if c.precision == "bf16"
                    else _Null())
        bar = None
        if c.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        self.net.train()
        t0, samples, tokens, stopped = time.perf_counter(), 0, 0, False
        step = start
        limits = (torch._dynamo.config.patch(recompile_limit=COMPILE_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)
                  if compiled and c.compile == "auto" else _Null())
        try:
            limits.__enter__()
            while step < self.total_steps:
                loss_sum, n, n_tok, grad_norm = self._optimisation_step(step, opt, sched, autocast)
                step += 1
                samples, tokens = samples + n, tokens + n_tok
                elapsed = max(time.perf_counter() - t0, 1e-9)
                self._log_step(step, loss_sum, sched.get_last_lr()[0], grad_norm, n_tok, samples / elapsed,
                               tokens / elapsed, bar)
                stopped = self._eval_and_checkpoint(step, opt, sched, bar)
                if stopped:
                    break
        finally:
            limits.__exit__(None, None, None)
            if bar is not None:
                bar.close()
        restore = c.restore_best if c.restore_best is not None else bool(c.early_stopping)
        if restore and self.best_state is not None:
            self._load_trainable(self.best_state)
        wall = time.perf_counter() - t0
        model.eval()
        return TrainResult(step, self.total_steps, wall, self.history, self.evals, self.best, stopped,
                           samples / max(wall, 1e-9), peak_rss_mb(), tokens / max(wall, 1e-9))

    def _prepare_model(self) -> bool:
        """Checkpointing, regional compile and the DDP/FSDP wrap, once per run; True when compiled."""
        c, model = self.cfg, self.model
        if c.gradient_checkpointing:
            enable_checkpointing(model)
        compiled = self.compiled = self._compile()
        if compiled:
            # dynamic=True: padded (B, T) vary from batch to batch; symbolic sizes compile once for all of
            # them, where dynamic=None compiles a static graph first and recompiles at the first new length
            fast.compile_blocks(model, dynamic=True)
        if not dtd.is_wrapped(self.net):
            model.to(self.device)
            if self.world > 1:
                hooked = [n for n, _ in _method_hooks(model, "step_hook")]
                if c.parallel == "fsdp" and (self.param_groups or hooked):
                    why = (f"adapter {hooked[0]!r} runs a step hook on whole tensors (AdaLoRA's rank allocation)"
                           if hooked else "param_groups name the parameters that FSDP replaces")
                    raise DeltaError(f"parallel='fsdp' is not supported here: {why}; use parallel='ddp'")
                self.net = dtd.wrap(model, c.parallel, self.device)
                self.params = [p for p in model.parameters() if p.requires_grad]  # FSDP: the sharded ones
                if self._own_head:  # FSDP made new Parameters: the head's rate and LP-FT must name those
                    self.head = head_parameters(model)
                    self.head_warmup = HeadWarmup(self.params, self.head, c.head_warmup, self.total_steps)
        return compiled

    def _resume_or_seed(self, resume: bool, opt, sched) -> int:
        """The step to start from: the latest checkpoint's (its RNG states restored) or 0, freshly seeded."""
        import numpy as np

        c = self.cfg
        ckpt = self.latest_checkpoint() if resume and self.output_dir else None
        if resume and ckpt is None and self.output_dir is not None and (self.checkpoint_dir()).exists():
            # killed while writing the first checkpoint: nothing to lose, a fresh start is the exact
            # resume; but complete checkpoints that `latest` does not name mean something is broken
            if any((d / "trainer_state.pt").exists() for d in self.checkpoint_dir().glob("step-*")):
                raise DeltaError(f"{self.checkpoint_dir()}: 'latest' names no complete checkpoint; write the "
                                 "name of the step-* directory to resume from into it")
        if ckpt is not None:
            return self._restore(ckpt, opt, sched)
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        np.random.seed(c.seed)
        return 0

    def _optimisation_step(self, step: int, opt, sched, autocast) -> tuple[float, int, int, float]:
        """Optimizer step ``step + 1``: accumulate the micro-batches, refuse NaN gradients, clip, step,
        then the methods' step hooks and the callbacks (gradients still present).  Returns the global
        batch's (loss, samples, real tokens, grad norm before clipping)."""
        c, model = self.cfg, self.model
        rng = torch.get_rng_state() if self.compiled else None  # a failed compile replays the step
        try:
            loss_sum, n, n_tok = self._accumulate(step, autocast)
        except Exception as e:  # noqa: BLE001 - only compiler failures are handled, the rest re-raised
            if not (self.compiled and self.cfg.compile == "auto" and fall_back_to_eager(self.model, e)):
                raise
            self.compiled = False
            torch.set_rng_state(rng)
            loss_sum, n, n_tok = self._accumulate(step, autocast)
        self.head_warmup.drop_body_grads(step)
        bad = first_nonfinite([(n, dtd.local(q.grad)) for n, q in model.named_parameters()
                               if q.requires_grad])
        if self.world > 1:  # the global batch's loss; every rank stops if one saw NaN
            loss_sum, n_bad, n_tok = dtd.sum_across_ranks([loss_sum, float(bad is not None), float(n_tok)])
            n_tok = int(n_tok)
            loss_sum /= self.world
            bad = bad or ("an adapter tensor (on another rank)" if n_bad else None)
        if bad is not None:  # stepping would write NaN into the weights (and the next checkpoint)
            last = self.latest_checkpoint() if self.output_dir else None
            raise DeltaError(f"gradient of {bad} is NaN/Inf at step {step + 1}; stopping (last good "
                             f"checkpoint: {last or 'none'}). Lower --lr or enable gradient clipping")
        # the norm before clipping, for the log (max_norm=inf: measured, nothing scaled)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm or float("inf")))
        opt.step()
        sched.step()
        run_step_hooks(model, step + 1, self.total_steps)
        for cb in self.callbacks:
            cb(step + 1, self.total_steps, model)
        opt.zero_grad(set_to_none=True)
        return loss_sum, n, n_tok, grad_norm

    def _log_step(self, step: int, loss: float, lr: float, grad_norm: float, n_tok: int,
                  samples_per_s: float, tokens_per_s: float, bar) -> None:
        """One finished step into the history, the trackers and the progress bar."""
        self.history.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                             "tokens": n_tok})  # this step's real tokens
        self.tracker.log_metrics({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                  "train/samples_per_s": samples_per_s, "train/tokens_per_s": tokens_per_s}, step)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.1f}", refresh=False)
            bar.update(1)

    def _eval_and_checkpoint(self, step: int, opt, sched, bar) -> bool:
        """Evaluate every eval_every steps (and at the end), checkpoint every save_every; True = stop early."""
        stopped = False
        if self.eval_fn is not None and (step % self.eval_every == 0 or step == self.total_steps):
            stopped = self._after_eval(step, bar)
        if self.output_dir is not None and self.cfg.save_every and (step % self.cfg.save_every == 0):
            self.save_checkpoint(step, opt, sched)
        return stopped

    def _after_eval(self, step: int, bar) -> bool:
        m = self._evaluate()
        m["step"] = step
        self.evals.append(m)
        self.tracker.log_metrics({f"eval/{k}": v for k, v in m.items() if k != "step"}, step)
        if bar is not None:
            # beside the bar (stderr), never on stdout: `--json` prints one JSON object there
            bar.write("eval step %d: %s" % (step, ", ".join(f"{k}={v:.4f}" for k, v in m.items()
                                                           if k != "step" and isinstance(v, float))),
                      file=sys.stderr)
        if self.cfg.metric not in m:
            raise DeltaError(f"eval_fn returned {sorted(m)}; no {self.cfg.metric!r} to track (set metric=...)")
        if self._improved(m[self.cfg.metric]):
            self.best, self.bad_evals = dict(m), 0
            if self.cfg.early_stopping or self.cfg.restore_best:
                self.best_state = self._trainable_state()
        else:
            self.bad_evals += 1
        return bool(self.cfg.early_stopping and self.bad_evals >= self.cfg.early_stopping)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
