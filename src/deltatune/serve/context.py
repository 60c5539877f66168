"""What every native route of one server reads (``routes.py``, ``adapters.py``): built once by
``app.build_app`` and passed down, instead of each route closing over a dozen locals."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import Engine
from .metrics import Metrics


@dataclass
class Served:
    model: Any  # the base model, eval mode, with its loaded adapters (core.delta.get_state)
    tokenizer: Any  # None: only input_ids requests
    engine: Engine
    metrics: Metrics
    task: str  # "generate" | "classify": which inference endpoint this server answers
    adapter_dir: Path | None  # where POST /v1/adapters loads from, by name; None: nothing to load
    token: str | None  # the adapter-management bearer token; None: management disabled (403)
    penalty: float  # the default repetition penalty: the model's generation_config, as generate() applies it
    vocab: int | None  # token ids must be below it (None: unknown, unchecked)
    failed: dict[str, str] = field(default_factory=dict)  # adapter -> why it did not load (GET /v1/adapters)


__all__ = ["Served"]
