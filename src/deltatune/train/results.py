"""What a training run produces: :class:`TrainResult`, its plot (``training.png``) and the metrics
file; kept apart from the loop, which only fills the result in."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_write, atomic_write_json


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    wall_time_s: float
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "grad_norm", "tokens"} per step
    evals: list[dict] = field(default_factory=list)  # {"step", **metrics}
    best: dict | None = None
    stopped_early: bool = False
    samples_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    tokens_per_s: float = 0.0  # real (unpadded) input tokens of the training batches per second


def plot(result: TrainResult, path: str | Path, metric: str | None = None, title: str = "") -> Path:
    """Training loss (raw and smoothed) and the evaluation metric against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in result.history]
    losses = [h["loss"] for h in result.history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train loss")
    if len(losses) >= 5:
        w = max(2, len(losses) // 20)
        sm = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, sm, color="tab:blue", lw=2, label=f"train loss (mean of {w})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if result.evals:
        keys = [metric] if metric and metric in result.evals[0] else [k for k in result.evals[0] if k != "step"][:2]
        ax2 = ax.twinx()
        for k, col in zip(keys, ("tab:orange", "tab:green")):
            ax2.plot([e["step"] for e in result.evals], [e[k] for e in result.evals], "o-", color=col, label=f"eval {k}")
        ax2.set_ylabel(", ".join(keys))
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title or "training")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(path, metrics)
