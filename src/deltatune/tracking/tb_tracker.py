"""TensorBoard: event files in ``OUT/tensorboard/`` through torch's ``SummaryWriter``.

    tensorboard --logdir OUT/tensorboard

Scalars under ``train/`` and ``eval/``; the resolved config as a text panel (``config``, JSON) and
as TensorBoard hparams (flattened keys, so runs can be compared in the HPARAMS tab); the adapter
itself is not an event-file thing: its path is written to the ``adapter`` text panel.
"""
from __future__ import annotations

import json
from pathlib import Path

from .base import Tracker, flatten, missing_extra, register

LOG_SUBDIR = "tensorboard"


@register
class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str):
        super().__init__(run_dir, run_name)
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as e:
            raise missing_extra("tensorboard", e) from None
        self._hparams = hparams
        self.logdir = self.run_dir / LOG_SUBDIR
        self.writer = SummaryWriter(str(self.logdir))

    def where(self) -> str:
        return str(self.logdir)

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        # hparams take scalars and strings only; the metric list names what the HPARAMS tab shows
        flat = {k: v for k, v in flatten(config).items() if isinstance(v, (bool, int, float, str))}
        for summary in self._hparams(flat, {"eval/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_artifact(self, directory: Path, name: str) -> None:
        self.writer.add_text(name, str(Path(directory).resolve()), 0)

    def close(self, ok: bool = True) -> None:
        self.writer.flush()
        self.writer.close()
