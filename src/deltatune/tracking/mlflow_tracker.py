"""MLflow: a local tracking store under the run directory, no server.

    mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db     (artifacts in OUT/mlartifacts/)

The store is MLflow's default kind (sqlite; the ``./mlruns`` file store is in maintenance mode
and refused by MLflow 3), placed in the run's output directory; ``MLFLOW_TRACKING_URI`` (a server,
another database) wins when set.  Experiment ``deltatune`` (or ``MLFLOW_EXPERIMENT_NAME``); the
run is named after the output directory.  Params are the flattened resolved config (MLflow keeps
params as strings of <= 6000 characters), the full config is also ``config.json``, metrics
carry their step, and the adapter directory is logged as the artifact ``adapter/``.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from .base import Tracker, flatten, missing_extra, quiet, register

EXPERIMENT = "deltatune"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch


@register
class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str):
        super().__init__(run_dir, run_name)
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise missing_extra("mlflow", e) from None
        quiet("mlflow", "alembic")  # after the import: importing mlflow sets its logger to INFO
        self._Metric, self._Param = Metric, Param
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        with warnings.catch_warnings():  # the SQL store's own sqlalchemy deprecations are not the user's
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = MlflowClient(tracking_uri=self.uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                name, artifact_location=None if "MLFLOW_TRACKING_URI" in os.environ
                else (self.run_dir / "mlartifacts").resolve().as_uri())
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def where(self) -> str:
        return f"{self.uri} (run {self.run_id})"

    def log_config(self, config: dict) -> None:
        params = [self._Param(k[:250], str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(config).items()]
        for i in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i:i + PARAMS_PER_CALL])
        self.client.log_text(self.run_id, json.dumps(config, indent=2, default=str), "config.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifact(self, directory: Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path=name)

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
