"""Experiment tracking through the real libraries: ``--report-to tensorboard,mlflow`` (``none`` = off).

    run.py ──make_trackers("tensorboard,mlflow", OUT)──► Trackers ─┬─ TensorBoardTracker  OUT/tensorboard/
                                                                   └─ MlflowTracker       OUT/mlflow.db + OUT/mlartifacts/
    Trainer ──tracker.log_metrics({...}, step)──► every backend

One interface (:class:`deltatune.tracking.base.Tracker`), one small file per backend, registered
by name in :data:`TRACKERS`; the trainer calls ``log_metrics`` and nothing else.  The libraries
are the extra ``pip install 'deltatune[tracking]'``; a missing one is a one-line error.
"""
from __future__ import annotations

from .base import TRACKERS, Tracker, Trackers, make_trackers, parse_report_to, register
from .mlflow_tracker import MlflowTracker
from .tb_tracker import TensorBoardTracker

__all__ = ["TRACKERS", "Tracker", "Trackers", "make_trackers", "parse_report_to", "register", "MlflowTracker",
           "TensorBoardTracker"]
