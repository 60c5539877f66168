"""AdaLoRA: adaptive budget allocation (Zhang et al. 2023, arXiv:2303.10512, ICLR 2023).

The update is kept in SVD form and its rank budget moves to where it matters during training:

    x ──► W (frozen) ──────────────────────────────────────┐
    │                                                       (+) ──► y = W x + s · P Λ Q x
    └──► dropout ──► Q = lora_A (r×in) ──► Λ = lora_E (r) ──► P = lora_B (out×r)

    s = α / (r + 1e-5)                       (peft's scaling; r is the *initial* rank, ``ranknum``)
    R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F    orthogonality regulariser, added as γ·R to the loss
    I(w)    = |w · ∂L/∂w|                    sensitivity of one entry
    Ī_t     = β₁ Ī_{t−1} + (1−β₁) I_t        smoothed sensitivity
    Ū_t     = β₂ Ū_{t−1} + (1−β₂) |I_t − Ī_t| uncertainty
    S_i     = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki),   s(·) = Ī·Ū   (score of triplet i)
    b(t)    = b_T + (b_0 − b_T)(1 − (t − t_i)/(T − t_i − t_f))³   cubic budget, total rank b

Every ``deltaT`` steps between ``tinit`` and ``T − tfinal`` only the ``b(t)`` highest-scoring
triplets keep their Λ_i; the others are zeroed (pruned).  The last ``tfinal`` steps train with
the final mask fixed.  The regulariser's gradient is added to P and Q by gradient hooks in every
backward (``auto_orth``), and :class:`AdaLoraHook` runs the schedule from the optimizer's step
hook, the trainer's ``Method.step_hook`` or one ``hook.step()`` call a step, so the user never
calls the allocator by hand; afterwards
:func:`deltatune.ops.adalora_convert.adalora_to_lora` turns the adapter into a plain LoRA with a per-layer ``rank_pattern``.
File keys are peft's (``lora_A``, ``lora_B``, ``lora_E``, ``ranknum``), so peft loads the files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import model_state
from ..core.delta import CopyDelta, Delta, DeltaConfig, DeltaError, get_state, iter_delta_layers, wrap
from ..core.method import Method, register
from ..core.layer_types import linear_types
from ..core.adapters import base_at
from .lora import linear_layout


@dataclass
class AdaLoraConfig(DeltaConfig):
    r: int = 12  # initial rank per layer (peft's init_r; the paper starts 1.5x above the target)
    target_r: float = 8  # average final rank per layer: total budget = target_r x #layers
    alpha: float = 8.0  # scale numerator, s = alpha / r (peft's lora_alpha default for AdaLoRA)
    dropout: float = 0.0  # dropout on the adapter input
    tinit: float = 0.1  # warm-up steps before pruning starts; < 1 means a fraction of total_steps
    tfinal: float = 0.2  # last steps trained with the final ranks fixed; < 1 = fraction of total
    deltaT: int = 10  # prune every deltaT steps during the budget phase (paper: 10-100)
    beta1: float = 0.85  # EMA factor of the sensitivity (paper: 0.85)
    beta2: float = 0.85  # EMA factor of the uncertainty (paper: 0.85)
    orth_reg_weight: float = 0.5  # gamma of the orthogonality regulariser (peft's default; paper 0.1-0.5)
    auto_orth: bool = True  # add gamma*dR/dP, dR/dQ to the gradients in every backward: no loss edit needed
    total_steps: int | None = None  # T; None = take it from the trainer / dt.adalora_hook(total_steps=...)

    method = "adalora"
    size_fields = ("r",)  # bounded by the saved tensors' shapes on load

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise DeltaError(f"adalora: r (the initial rank) must be a positive integer, got {self.r!r}")
        if not 0 <= self.target_r <= self.r:
            raise DeltaError(f"adalora: target_r must be in [0, r={self.r}], got {self.target_r!r}")
        for k in ("beta1", "beta2"):
            if not 0 < getattr(self, k) < 1:
                raise DeltaError(f"adalora: {k} must be in (0, 1), got {getattr(self, k)!r} (paper: 0.85)")
        if self.deltaT < 1:
            raise DeltaError(f"adalora: deltaT must be >= 1, got {self.deltaT!r}")
        if not isinstance(self.orth_reg_weight, (int, float)) or not 0 <= self.orth_reg_weight < float("inf"):
            raise DeltaError(f"adalora: orth_reg_weight must be a finite number >= 0, got {self.orth_reg_weight!r} "
                             "(a negative weight pushes P and Q away from orthogonality; paper 0.1-0.5)")

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps for a run of ``total_steps``."""
        ti = round(self.tinit * total_steps) if self.tinit < 1 else int(self.tinit)
        tf = round(self.tfinal * total_steps) if self.tfinal < 1 else int(self.tfinal)
        if ti + tf >= total_steps:
            raise DeltaError(f"adalora: tinit={ti} + tfinal={tf} leave no budget phase in {total_steps} steps; "
                             "lower tinit/tfinal or train longer")
        return ti, tf


def budget_schedule(step: int, total: int, tinit: int, tfinal: int, deltaT: int, b0: int, bT: int) -> tuple[int, bool]:
    """(total rank budget at ``step``, whether to prune now): the paper's cubic schedule."""
    if step <= tinit:
        return b0, False
    if step > total - tfinal:
        return bT, True
    frac = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((b0 - bT) * frac ** 3 + bT), step % deltaT == 0


# --------------------------------------------------------------------------- the delta

class AdaLoraDelta(Delta):
    """P Λ Q on a linear layer (nn.Linear, GPT-2 Conv1D, quantized linears)."""
    additive = True  # y + P Λ Q x

    def __init__(self, base: nn.Module, cfg: AdaLoraConfig):
        super().__init__()
        self.fan_in_fan_out, out_f, in_f, dtype = linear_layout(base)
        r = cfg.r
        self.r = r
        self.scaling = cfg.alpha / (r + 1e-5)  # peft: lora_alpha / (ranknum + 1e-5)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.randn(r, in_f, dtype=dtype) * 0.02)  # Q (r, in), peft's init
        self.lora_B = nn.Parameter(torch.randn(out_f, r, dtype=dtype) * 0.02)  # P (out, r)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dtype))  # Λ (r, 1): zero, so ΔW = 0 at init
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool), persistent=False)  # kept triplets
        self.orth_coef = 0.0  # gamma / #matrices, set by the method when auto_orth is on

    def enable_orth(self, coef: float) -> None:
        """Add coef * grad ‖QQᵀ − I‖_F (resp. ‖PᵀP − I‖_F) to each backward's gradient of Q (P)."""
        self.orth_coef = coef
        self.lora_A.register_post_accumulate_grad_hook(lambda p: self._orth_grad(p, rows=True))
        self.lora_B.register_post_accumulate_grad_hook(lambda p: self._orth_grad(p, rows=False))

    def _orth_grad(self, p: torch.Tensor, rows: bool) -> None:
        with torch.no_grad():
            m = p @ p.t() if rows else p.t() @ p  # (r, r)
            m -= torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
            n = torch.linalg.norm(m)
            if n > 0:  # d‖M‖_F/dQ = 2 M Q / ‖M‖_F ;  d‖M‖_F/dP = 2 P M / ‖M‖_F
                p.grad.add_((m @ p if rows else p @ m), alpha=2 * self.orth_coef / n.item())

    @property
    def rank(self) -> int:
        return int(self.rank_mask.sum())

    def forward(self, x, y, base):
        a = self.lora_A * self.lora_E  # (r, in)
        h = F.linear(F.linear(self.dropout(x).to(a.dtype), a), self.lora_B)  # (..., in) -> (..., r) -> (..., out)
        return y + (h * self.scaling).to(y.dtype)

    def delta_weight(self, base):
        d = self.lora_B @ (self.lora_A * self.lora_E * self.rank_mask[:, None]) * self.scaling  # (out, in)
        return d.t() if self.fan_in_fan_out else d

    def apply_mask(self) -> None:
        with torch.no_grad():
            self.lora_E.masked_fill_(~self.rank_mask[:, None], 0.0)


# --------------------------------------------------------------------------- allocation

def _score(ema: torch.Tensor, unc: torch.Tensor) -> torch.Tensor:
    return ema * unc


class RankAllocator:
    """Sensitivity EMA, uncertainty and the budget mask over every AdaLoRA layer of one adapter."""

    def __init__(self, layers: list[tuple[str, AdaLoraDelta]], cfg: AdaLoraConfig, total_steps: int):
        self.layers, self.cfg, self.total = layers, cfg, int(total_steps)
        self.tinit, self.tfinal = cfg.schedule(self.total)
        self.b0 = sum(d.r for _, d in layers)
        self.bT = int(round(cfg.target_r * len(layers)))
        self.ema: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}

    def update_importance(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        with torch.no_grad():
            for _, d in self.layers:
                for p in (d.lora_A, d.lora_B, d.lora_E):
                    if p.grad is None:
                        raise DeltaError("adalora: an AdaLoRA tensor has no gradient; call the hook after "
                                         "loss.backward() and before optimizer.zero_grad()")
                    ipt = (p * p.grad).abs()
                    k = id(p)
                    ema = self.ema.get(k, torch.zeros_like(p))
                    ema = b1 * ema + (1 - b1) * ipt
                    self.unc[k] = b2 * self.unc.get(k, torch.zeros_like(p)) + (1 - b2) * (ipt - ema).abs()
                    self.ema[k] = ema

    def triplet_scores(self) -> list[torch.Tensor]:
        out = []
        for _, d in self.layers:
            s = [_score(self.ema[id(p)], self.unc[id(p)]) for p in (d.lora_A, d.lora_B, d.lora_E)]
            out.append(s[2].view(-1) + s[0].mean(1) + s[1].mean(0))  # (r,): Λ_i + mean Q_i· + mean P·i
        return out

    def mask_to_budget(self, budget: int) -> None:
        scores = self.triplet_scores()
        flat = torch.cat(scores)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel())).indices] = True  # exactly `budget` survive
        i = 0
        for (_, d), s in zip(self.layers, scores):
            d.rank_mask.copy_(keep[i:i + s.numel()])
            i += s.numel()

    def step(self, step: int) -> None:
        if step < self.total - self.tfinal:
            self.update_importance()
        budget, prune = budget_schedule(step, self.total, self.tinit, self.tfinal, self.cfg.deltaT, self.b0, self.bT)
        if prune and self.ema:  # final phase: frozen scores, so the mask settles on the target and stays
            self.mask_to_budget(budget)
        for _, d in self.layers:  # keep pruned Λ_i at zero (the optimizer may have moved them)
            d.apply_mask()


# --------------------------------------------------------------------------- the hook

def _layers(model: nn.Module, name: str) -> list[tuple[str, AdaLoraDelta]]:
    return [(p, layer.deltas[name]) for p, layer in iter_delta_layers(model)
            if name in layer.deltas and isinstance(layer.deltas[name], AdaLoraDelta)]


def _adalora_name(model: nn.Module, name: str | None) -> str:
    st = get_state(model)
    names = [n for n, rec in st.adapters.items() if rec.method == "adalora"]
    if name is None:
        active = [n for n in st.active if n in names]
        if len(active) != 1 and len(names) != 1:
            raise DeltaError(f"adalora: pick the adapter with name=...; AdaLoRA adapters: {names or 'none'}")
        name = active[0] if len(active) == 1 else names[0]
    if name not in names:
        raise DeltaError(f"adalora: {name!r} is not an AdaLoRA adapter; AdaLoRA adapters: {names or 'none'}")
    return name


def orth_penalty(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """γ · mean over P and Q matrices of ‖PᵀP − I‖_F (peft's form).  With ``auto_orth`` (default)
    its gradient is already added in every backward: use this value for logging only; with
    ``auto_orth=False`` add it to the loss yourself."""
    name = _adalora_name(model, name)
    cfg = get_state(model).adapters[name].config
    terms = []
    for _, d in _layers(model, name):
        for m in (d.lora_A @ d.lora_A.t(), d.lora_B.t() @ d.lora_B):  # (r, r) each
            terms.append(torch.linalg.norm(m - torch.eye(m.shape[0], dtype=m.dtype, device=m.device), "fro"))
    return cfg.orth_reg_weight * torch.stack(terms).mean()


class AdaLoraHook:
    """Runs AdaLoRA's schedule (importance update, pruning to the budget) during training.

    Plain PyTorch, automatic (recommended)::

        hook = dt.adalora_hook(model, total_steps=1000, optimizer=opt)
        # ... the usual loop: loss.backward(); opt.step(); opt.zero_grad()

    ``optimizer`` registers a step post-hook.  Without one, call ``hook.step()`` after
    ``opt.step()`` and before ``opt.zero_grad()`` (the importance needs the gradients).
    ``deltatune.train.Trainer`` needs nothing: it calls ``AdaLoRA.step_hook`` with its step count.  A
    hook is also a trainer callback, ``hook(step, total_steps, model)``.  One hook exists per
    adapter (``adalora_hook`` returns the existing one), and a step is never counted twice.
    """

    def __init__(self, model: nn.Module, total_steps: int | None = None, name: str | None = None,
                 optimizer: torch.optim.Optimizer | None = None):
        self.model, self.name = model, _adalora_name(model, name)
        self.cfg: AdaLoraConfig = get_state(model).adapters[self.name].config
        self.global_step = 0
        self.allocator: RankAllocator | None = None
        self._handles: list[Any] = []
        total = total_steps if total_steps is not None else self.cfg.total_steps
        if total is not None:
            self.set_total_steps(total)
        if optimizer is not None:
            self.register(optimizer)

    def set_total_steps(self, total_steps: int) -> None:
        if not isinstance(total_steps, int) or total_steps < 2:
            raise DeltaError(f"adalora: total_steps must be an integer >= 2, got {total_steps!r}")
        self.allocator = RankAllocator(_layers(self.model, self.name), self.cfg, total_steps)

    def register(self, optimizer: torch.optim.Optimizer) -> "AdaLoraHook":
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.step()))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def step(self, step: int | None = None) -> None:
        """Count one finished optimizer step (or jump to ``step``, as the trainer reports it)."""
        if self.allocator is None:
            raise DeltaError("adalora: the total number of training steps is unknown; pass "
                             "dt.adalora_hook(model, total_steps=N), set total_steps in the config, or train "
                             "with deltatune.train.Trainer (the budget schedule needs it)")
        step = self.global_step + 1 if step is None else int(step)
        if step <= self.global_step:
            return  # already counted (optimizer hook and trainer both firing)
        self.global_step = step
        self.allocator.step(step)

    def __call__(self, step: int, total_steps: int, model: nn.Module | None = None) -> None:
        if self.allocator is None:
            self.set_total_steps(int(total_steps))
        self.step(step)

    def ranks(self) -> dict[str, int]:
        return adalora_ranks(self.model, self.name)

    def total_rank(self) -> int:
        return sum(self.ranks().values())




def adalora_hook(model: nn.Module, total_steps: int | None = None, optimizer=None,
                 name: str | None = None) -> AdaLoraHook:
    """The step hook that drives AdaLoRA's pruning schedule (see :class:`AdaLoraHook`)."""
    name = _adalora_name(model, name)
    hooks = model_state.setdefault(model, model_state.ADALORA_HOOKS, {})
    hook = hooks.get(name)
    if hook is None or hook.allocator is None and total_steps is None:
        hook = hooks[name] = AdaLoraHook(model, total_steps=total_steps, name=name)
    elif total_steps is not None and (hook.allocator is None or hook.allocator.total != total_steps):
        hook.set_total_steps(total_steps)
    if optimizer is not None:
        hook.register(optimizer)
    return hook


def adalora_ranks(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """Current rank (kept triplets) of every AdaLoRA layer: {module path: rank}."""
    return {p: d.rank for p, d in _layers(model, _adalora_name(model, name))}


def _layer_paths(model, name):
    return [p for p, _ in _layers(model, name)]


# --------------------------------------------------------------------------- the method

@register
class AdaLoRA(Method):
    name = "adalora"
    default_targets = "all-linear"
    config_cls = AdaLoraConfig
    peft_type = "ADALORA"
    summary = "SVD-form LoRA (PΛQ) whose per-layer ranks are pruned to a budget during training"
    layer_types = ("Linear", "Conv1D", "NF4Linear/Int8Linear")

    def attach(self, model, cfg: AdaLoraConfig, name, state):
        paths = self.target_paths(model, cfg, types=linear_types())
        made = [(p, AdaLoraDelta(base_at(model, p), cfg)) for p in paths]
        for p, d in made:
            if cfg.auto_orth and cfg.orth_reg_weight > 0:
                d.enable_orth(cfg.orth_reg_weight / (2 * len(made)))  # peft: γ · mean over 2·#layers terms
            wrap(model, p, state).deltas[name] = d

    def step_hook(self, model, name, step, total_steps):
        """Called by the trainer (deltatune.train) after every optimizer step (gradients still present)."""
        hook = adalora_hook(model, name=name)
        if hook.allocator is None or hook.allocator.total != total_steps:
            hook.set_total_steps(int(total_steps))
        hook.step(step)

    def train_state(self, model, name):
        """What a checkpoint needs for an exact resume beyond the tensors: the step count, the
        importance averages Ī, Ū and the rank masks (``deltatune.train.Trainer`` saves it, safetensors)."""
        hook = model_state.get(model, model_state.ADALORA_HOOKS, {}).get(name)
        if hook is None or hook.allocator is None:
            return {}
        al = hook.allocator
        out = {"global_step": torch.tensor(hook.global_step), "total_steps": torch.tensor(al.total)}
        for path, d in al.layers:
            out[f"{path}.rank_mask"] = d.rank_mask
            for part in ("lora_A", "lora_B", "lora_E"):
                k = id(getattr(d, part))
                if k in al.ema:
                    out[f"{path}.{part}.ema"], out[f"{path}.{part}.unc"] = al.ema[k], al.unc[k]
        return out

    def load_train_state(self, model, name, tensors):
        if not tensors:
            return
        hook = adalora_hook(model, total_steps=int(tensors["total_steps"]), name=name)
        al = hook.allocator
        hook.global_step = int(tensors["global_step"])
        al.ema.clear()
        al.unc.clear()
        with torch.no_grad():
            for path, d in al.layers:
                d.rank_mask.copy_(tensors[f"{path}.rank_mask"])
                for part in ("lora_A", "lora_B", "lora_E"):
                    if f"{path}.{part}.ema" in tensors:
                        p = getattr(d, part)
                        al.ema[id(p)] = tensors[f"{path}.{part}.ema"].to(p.device, p.dtype)
                        al.unc[id(p)] = tensors[f"{path}.{part}.unc"].to(p.device, p.dtype)

    def delete(self, model, name):
        model_state.get(model, model_state.ADALORA_HOOKS, {}).pop(name, None)

    def export(self, model, name, tensors, cfg):
        tensors = dict(tensors)
        for path, d in _layers(model, name):
            tensors[f"{path}.lora_E"] = (d.lora_E * d.rank_mask[:, None]).detach()
            tensors[f"{path}.ranknum"] = torch.tensor([float(d.r)], dtype=d.lora_E.dtype)  # peft's constant
        return tensors, cfg

    def normalize_keys(self, tensors):
        return {k: v for k, v in tensors.items() if not k.endswith(".ranknum")}  # derived from the config

    def to_peft(self, cfg: AdaLoraConfig, model, name):
        targets = _layer_paths(model, name)
        saved = sorted(p for p, layer in iter_delta_layers(model) if isinstance(layer.deltas[name] if name in
                                                                                 layer.deltas else None, CopyDelta))
        total = cfg.total_steps or 1000
        ti, tf = cfg.schedule(total)
        return {"peft_type": "ADALORA", "task_type": None, "init_r": cfg.r, "target_r": int(round(cfg.target_r)),
                "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": sorted(targets),
                "modules_to_save": saved or None, "tinit": ti, "tfinal": tf, "deltaT": cfg.deltaT,
                "beta1": cfg.beta1, "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
                "total_step": total, "rank_pattern": None, "bias": "none", "inference_mode": True,
                "fan_in_fan_out": any(d.fan_in_fan_out for _, d in _layers(model, name))}

    def from_peft(self, d: dict[str, Any]) -> AdaLoraConfig:
        if d.get("rank_pattern"):
            raise DeltaError("peft AdaLoRA files saved with a rank_pattern hold resized tensors; load them in "
                             "peft and re-save, or train with deltatune and convert with dt.adalora_to_lora")
        total = d.get("total_step")
        return AdaLoraConfig(targets=list(d["target_modules"]) if isinstance(d.get("target_modules"), (list, set, tuple))
                             else d.get("target_modules"), modules_to_save=d.get("modules_to_save") or None,
                             r=int(d.get("init_r", 12)), target_r=float(d.get("target_r", 8)),
                             alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                             tinit=int(d.get("tinit", 0)), tfinal=int(d.get("tfinal", 0)),
                             deltaT=int(d.get("deltaT", 1)), beta1=float(d.get("beta1", 0.85)),
                             beta2=float(d.get("beta2", 0.85)), orth_reg_weight=float(d.get("orth_reg_weight", 0.5)),
                             total_steps=int(total) if total else None)
