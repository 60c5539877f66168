"""``deltatune eval`` beyond adapters: a full fine-tuning run (``--method full`` saved the whole
model to ``RUN/model/``) against the base recorded at train time, and a base model alone.

    RUN/model/ (+ task.json: base_model, weights, labels, columns) ─► tuned model
    task.json base_model (or --model)                              ─► base model
    same data, same encoding ─► metrics(tuned), metrics(base), forgetting(base -> tuned)

Full fine-tuning is the yardstick of every PEFT comparison, so it is evaluated exactly like an
adapter: the same held-out data and the same forgetting measure (the base's behaviour is a
snapshot of the separately loaded base instead of ``dt.disabled``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.delta import DeltaError
from ..data.examples import load_examples
from ..models import load_model
from ..vision.classifier import is_vision_spec
from .evaluate import Forgetting, read_reference, task_metrics
from .run import MAX_LENGTH, collate_for, encode_examples, read_task, set_chat_template


def full_run_dir(path: str | Path) -> Path | None:
    """The saved model directory of a ``--method full`` run (the run directory or its ``model/``), else None."""
    p = Path(path)
    for d in (p / "model", p):
        if d.is_dir() and read_task(d).get("method") == "full":
            return d
    return None


def _features(task: str, data, proc, info: dict, columns: dict | None):
    cols = dict(info.get("columns") or {})
    cols.update({k: v for k, v in (columns or {}).items() if v is not None})
    ex = load_examples(task, data, label_names=info.get("label_names") or None, **cols)
    feats = encode_examples(ex, proc, info.get("max_length") or MAX_LENGTH[task], info.get("train_on") or "responses")
    return ex, feats, collate_for(proc)


def evaluate_full(run, data, model: str | None = None, task: str | None = None, reference=None, batch_size: int = 32,
                  trust_remote_code: bool = False, columns: dict | None = None) -> dict:
    """Metrics of a full fine-tuning run's model and of its base on ``data``, and the forgetting."""
    d = full_run_dir(run)
    if d is None:
        raise DeltaError(f"{run}: not a --method full run (no model/ with task.json saying method full)")
    info = read_task(d)
    task = task or info.get("task")
    base = model or info.get("base_model")
    if not base or not task:
        raise DeltaError(f"{d / 'task.json'}: the base model or task is not recorded; pass --model and --task")
    labels = info.get("label_names") or None
    tuned, proc, _ = load_model(str(d), task, labels, trust_remote_code)
    set_chat_template(proc, info.get("chat_template"))
    ex, feats, coll = _features(task, data, proc, info, columns)
    metrics = task_metrics(task, tuned, feats, coll, batch_size)
    # the base exactly as training started from it (its weights file, its input size)
    weights = info.get("weights") if model is None else None
    torch.manual_seed(info.get("seed", 0))  # a fresh head initialised as in train's "before"
    base_m, _, _ = load_model(base, task, labels, trust_remote_code, weights=weights, image_size=info.get("image_size"))
    base_metrics = task_metrics(task, base_m, feats, coll, batch_size)
    tok = proc if task != "image-classify" else None
    fg = Forgetting(tok, task, read_reference(reference) if reference else None).snapshot(base_m).measure(tuned)
    return {"adapter": str(d), "kind": "full", "base_model": base, "task": task, "data": str(data), "rows": len(ex),
            "metrics": metrics, "base_metrics": base_metrics, "forgetting": fg}


def evaluate_base(model: str, data, task: str | None, batch_size: int = 32, trust_remote_code: bool = False,
                  columns: dict | None = None, weights: str | None = None, image_size: int | None = None) -> dict:
    """Metrics of a base model on ``data`` (no adapter: forgetting is zero by definition).
    A transformers classifier keeps its own head and labels (``config.id2label``; data labels it
    does not have are refused); a timm/torchvision/factory model gets a fresh head sized by the
    data's labels, as ``train`` measures "before"."""
    if task is None:
        raise DeltaError("eval --model without --adapter: pass --task (classify | causal-lm | image-classify)")
    cols = {k: v for k, v in (columns or {}).items() if v is not None}
    labels = None
    if task != "causal-lm" and is_vision_spec(model) and not Path(model).is_dir():
        labels = load_examples(task, data, **cols).label_names
    torch.manual_seed(0)  # a fresh head initialised as train's "before" with the default seed
    m, proc, _ = load_model(model, task, labels, trust_remote_code, weights=weights, image_size=image_size)
    if task != "causal-lm" and labels is None:
        id2label = getattr(m.config, "id2label", None) or {}
        labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))] or None
    ex, feats, coll = _features(task, data, proc, {"label_names": labels}, cols)
    metrics = task_metrics(task, m, feats, coll, batch_size)
    return {"adapter": None, "kind": "base", "base_model": model, "task": task, "data": str(data), "rows": len(ex),
            "metrics": metrics, "base_metrics": metrics, "forgetting": None}
