"""The tracker interface, its registry and the fan-out the trainer talks to.

A backend subclasses :class:`Tracker`, sets ``name`` and is decorated with ``@register``; its
constructor imports its library (so a missing extra fails before training starts, naming
``pip install 'deltatune[tracking]'``).  What a run reports:

    log_config(config)          once: the full resolved run configuration (nested dict)
    log_metrics(metrics, step)  every optimizer step (train/loss, train/lr, train/grad_norm,
                                train/tokens_per_s, ...) and every evaluation (eval/<metric>)
    log_artifact(dir, name)     the saved adapter directory
    close(ok)                   finished or failed
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

from ..core.delta import DeltaError

INSTALL_HINT = "pip install 'deltatune[tracking]'"
TRACKERS: dict[str, type["Tracker"]] = {}


def register(cls: type["Tracker"]) -> type["Tracker"]:
    TRACKERS[cls.name] = cls
    return cls


def missing_extra(library: str, err: ImportError) -> DeltaError:
    return DeltaError(f"--report-to needs {library}, which is not installed ({err.name or err}); "
                      f"run: {INSTALL_HINT}")


def quiet(*loggers: str) -> None:
    """Library INFO chatter (mlflow's "Creating initial MLflow database tables...", alembic's
    migrations) stays out of the user's console; warnings still show."""
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists and None as JSON text."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


class Tracker:
    """One experiment-tracking backend writing under ``run_dir`` (see the module docstring)."""

    name: ClassVar[str] = ""

    def __init__(self, run_dir: Path, run_name: str):
        self.run_dir, self.run_name = Path(run_dir), run_name

    def log_config(self, config: dict) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, directory: Path, name: str) -> None:
        raise NotImplementedError

    def close(self, ok: bool = True) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where the run can be read back, for the log line."""
        return str(self.run_dir)


class Trackers:
    """Every selected backend behind the one interface (empty = tracking off, every call a no-op)."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = list(trackers or [])

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_config(self, config: dict) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.trackers:
            t.log_metrics(clean, step)

    def log_artifact(self, directory: Path, name: str) -> None:
        for t in self.trackers:
            t.log_artifact(Path(directory), name)

    def close(self, ok: bool = True) -> None:
        for t in self.trackers:
            t.close(ok)

    def describe(self) -> str:
        return ", ".join(f"{t.name} -> {t.where()}" for t in self.trackers)


def parse_report_to(spec: str | list[str] | None) -> list[str]:
    """``"tensorboard,mlflow"`` -> ["tensorboard", "mlflow"]; ``"none"`` / empty -> []."""
    names = spec if isinstance(spec, list) else [s.strip() for s in (spec or "").split(",")]
    names = [n.lower() for n in names if n]
    if "none" in names:
        if len(names) > 1:
            raise DeltaError(f"--report-to {','.join(names)}: 'none' cannot be combined with a tracker; "
                             "pass --report-to none alone")
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise DeltaError(f"--report-to: unknown tracker {unknown[0]!r}; choose from {sorted(TRACKERS)} or none "
                         "(comma-separated, e.g. --report-to tensorboard,mlflow)")
    return list(dict.fromkeys(names))


def make_trackers(spec: str | list[str] | None, run_dir: str | Path, run_name: str) -> Trackers:
    return Trackers([TRACKERS[n](Path(run_dir), run_name) for n in parse_report_to(spec)])
