"""Which layers matter for *this* task: gradient-based sensitivity of every module, on the user's data.

For each weight matrix W of a targeted module, over a few batches b:

    taylor(W) = Σ_b Σ_ij |W_ij · g_ij^(b)|      first-order Taylor estimate of the loss change if
                                                 W_ij were removed (Molchanov et al. 2019; the
                                                 sensitivity AdaLoRA uses, arXiv:2303.10512)
    fisher(W) = Σ_b Σ_ij (g_ij^(b))²             empirical Fisher information (diagonal), the
                                                 FISH-mask criterion (Sung et al. 2021, arXiv:2111.09839)

g^(b) is the gradient of the loss on batch b.  The result ranks layers and turns into a LoRA
config for a parameter budget: layers get rank in proportion to their share of the score per
parameter a rank costs (in + out), layers below one rank are left out.

    rep = dt.importance(model, batches)           # dict batches with labels: loss = model(**b).loss
    print(rep.table()); rep.plot("importance.png")
    cfg = rep.to_lora_config(budget=100_000)      # LoraConfig(targets=[...], rank_pattern={...})
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import nn

from ..core.delta import DeltaError
from ..core.grads import accumulate_grads, weighted_modules
from ..files import atomic_write
from ..core.layer_types import conv1d_type
from ..methods.lora import LoraConfig

METRICS = ("taylor", "fisher")


# --------------------------------------------------------------------------- reports

@dataclass
class LayerReport:
    """A per-layer table of one value (a score, a rank) with a text table and a PNG plot."""

    rows: list[dict[str, Any]]
    value: str
    title: str = ""

    def table(self, top: int | None = None) -> str:
        rows = self.rows[:top] if top else self.rows
        cols = list(rows[0]) if rows else ["module", self.value]
        try:
            from rich.console import Console
            from rich.table import Table

            t = Table(title=self.title or None)
            for c in cols:
                t.add_column(c, justify="left" if c == "module" else "right")
            for r in rows:
                t.add_row(*[_fmt(r[c]) for c in cols])
            con = Console(width=160, record=True, file=io.StringIO())
            con.print(t)
            return con.export_text()
        except ImportError:
            cells = [[_fmt(r[c]) for c in cols] for r in rows]
            wid = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
            lines = [self.title] if self.title else []
            lines += ["  ".join(c.ljust(w) for c, w in zip(cols, wid)), "  ".join("-" * w for w in wid)]
            lines += ["  ".join(x.ljust(w) for x, w in zip(row, wid)) for row in cells]
            return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def grid(self) -> tuple[list[str], list[str], list[list[float]]]:
        """Heat-map layout: rows = block index found in the path (``layers.3`` -> 3), columns = the
        path with the index removed (``self_attn.q_proj``)."""
        cells: dict[tuple[str, str], float] = {}
        for r in self.rows:
            m = re.search(r"\.(\d+)\.", "." + r["module"] + ".")
            row = m.group(1) if m else "-"
            col = r["module"] if not m else r["module"][m.end() - 1:]
            cells[(row, col)] = float(r[self.value])
        rows = sorted({k[0] for k in cells}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
        cols = list(dict.fromkeys(k[1] for k in cells))
        return rows, cols, [[cells.get((r, c), float("nan")) for c in cols] for r in rows]

    def plot(self, path, kind: str = "auto") -> str:
        """Write a PNG: a heat map (block × module) when paths carry block indices, else bars."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise DeltaError("plotting needs matplotlib: pip install matplotlib")
        rows, cols, z = self.grid()
        if kind == "auto":
            kind = "heatmap" if len(rows) > 1 and len(cols) > 0 else "bar"
        if kind == "heatmap":
            fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.2 + 0.45 * len(rows)))
            im = ax.imshow(z, aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_ylabel("block")
            for i, row in enumerate(z):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=7, color="w")
            fig.colorbar(im, ax=ax, label=self.value)
        else:
            names = [r["module"] for r in self.rows]
            fig, ax = plt.subplots(figsize=(8, 1 + 0.25 * len(names)))
            ax.barh(range(len(names)), [float(r[self.value]) for r in self.rows])
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(self.value)
        ax.set_title(self.title)
        fig.tight_layout()
        from pathlib import Path

        buf = io.BytesIO()  # rendered in memory, then written atomically (no half-written image)
        fig.savefig(buf, dpi=110, format=Path(path).suffix.lstrip(".").lower() or "png")
        plt.close(fig)
        atomic_write(path, buf.getvalue())
        return str(path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


@dataclass
class ImportanceReport(LayerReport):
    """Per-module sensitivity, most important first. ``rows``: module, type, params, shape,
    taylor, fisher, share (of the chosen metric)."""

    total_params: int = 0
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (out, in) of the weight

    def scores(self) -> dict[str, float]:
        return {r["module"]: float(r[self.value]) for r in self.rows}

    def to_lora_config(self, budget: int | float, r_max: int = 64, alpha_ratio: float = 2.0, **lora_options):
        """A LoraConfig spending at most ``budget`` parameters (an int count, or a float < 1 =
        fraction of the model's parameters): rank_l ∝ score_l / (in_l + out_l), capped at
        ``r_max``; layers below rank 1 are not targeted; alpha_l = alpha_ratio · rank_l."""
        total = int(budget * self.total_params) if isinstance(budget, float) and budget < 1 else int(budget)
        cost = {p: sum(self.shapes[p]) for p in self.shapes}
        s = {p: max(v, 0.0) for p, v in self.scores().items() if p in cost}
        norm = sum(s.values())
        if total < min(cost.values()) or norm <= 0:
            raise DeltaError(f"budget {total:,} parameters buys no rank-1 LoRA layer (the cheapest costs "
                             f"{min(cost.values()):,}); raise the budget")
        # rank_l = floor(share_l * total / cost_l): each layer spends its share of the budget
        ranks = {p: min(r_max, int(s[p] / norm * total / cost[p])) for p in s}
        spent = sum(ranks[p] * cost[p] for p in ranks)
        for p in sorted(s, key=lambda q: -s[q]):  # leftover: +1 rank to the most important layers
            if ranks[p] < r_max and spent + cost[p] <= total:
                ranks[p] += 1
                spent += cost[p]
        ranks = {p: r for p, r in ranks.items() if r > 0}
        r0 = max(ranks.values())
        return LoraConfig(targets=sorted(ranks), r=r0, alpha=alpha_ratio * r0,
                          rank_pattern={p: r for p, r in ranks.items() if r != r0},
                          alpha_pattern={p: alpha_ratio * r for p, r in ranks.items() if r != r0}, **lora_options)


STATS = {
    "taylor": lambda w, g: (w * g).abs().sum(),  # Σ |w·g|
    "fisher": lambda w, g: g.pow(2).sum(),  # Σ g²
}


def importance(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None, *, targets=None,
               exclude=None, metric: str = "taylor", max_batches: int | None = None) -> ImportanceReport:
    """Score every targeted module (default: every linear layer) by gradient sensitivity on
    ``batches``; ``metric`` ("taylor" = Σ|w·g|, "fisher" = Σg²) orders the table."""
    if metric not in METRICS:
        raise DeltaError(f"importance: metric must be one of {METRICS}, got {metric!r}")
    mods = weighted_modules(model, targets, exclude)
    acc = accumulate_grads(model, mods, batches, loss_fn, max_batches, STATS)
    rows, shapes = [], {}
    for p, m in mods:
        w = m.weight
        out_f, in_f = _out_in(m)
        shapes[p] = (out_f, in_f)
        rows.append({"module": p, "type": type(m).__name__, "params": w.numel(),
                     "taylor": float(acc[p].get("taylor", 0.0)), "fisher": float(acc[p].get("fisher", 0.0))})
    tot = sum(r[metric] for r in rows) or 1.0
    for r in rows:
        r["share"] = r[metric] / tot
    rows.sort(key=lambda r: -r[metric])
    seen, n_params = set(), 0
    for _, prm in model.named_parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            n_params += prm.numel()
    return ImportanceReport(rows, value=metric, title=f"gradient sensitivity ({metric})",
                            total_params=n_params, shapes=shapes)


def _out_in(m: nn.Module) -> tuple[int, int]:
    """(out, in) of a layer's LoRA factors: Linear (out, in); GPT-2 Conv1D stores (in, out);
    convolutions count in × kernel; embeddings (dim, vocab) as peft's embedding LoRA."""
    w = m.weight
    c1 = conv1d_type()
    if c1 is not None and isinstance(m, c1):
        return w.shape[1], w.shape[0]
    if isinstance(m, nn.Embedding):
        return w.shape[1], w.shape[0]
    return w.shape[0], int(w[0].numel())
