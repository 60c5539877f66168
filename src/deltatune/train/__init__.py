"""Training: the loop (``trainer.py``), its checkpoints (``checkpoint.py``), losses, several
processes (``distributed.py``) and the output-directory lock (``runlock.py``).
``deltatune.train.Trainer`` / ``TrainConfig`` are the documented entry points."""
from .trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
