"""`deltatune importance`: gradient sensitivity of every layer on the user's data (the
"identify critical parameters" step), as a ranked table, a PNG plot and — given a parameter
budget — a LoRA config (targets + per-layer ranks) that `deltatune train` can use."""
from __future__ import annotations

from pathlib import Path
import deltatune as dt

from ..data.examples import load_examples
from ..files import atomic_write, atomic_write_json
from ..models import load_model
from .run import MAX_LENGTH, collate_for, encode_examples


def importance_report(model: str, data: str, task: str = "classify", output: str = "runs/importance",
                      budget: float | None = None, metric: str = "taylor", max_batches: int = 8,
                      batch_size: int = 16, max_length: int | None = None, columns: dict | None = None,
                      trust_remote_code: bool = False) -> dict:
    """Score the base model's layers on the first ``max_batches`` batches of ``data``; write
    ``importance.json``, ``importance.png`` (and ``lora_options.json`` when ``budget`` is given)."""
    import torch

    if max_batches < 1 or batch_size < 1:
        raise dt.DeltaError("importance: --max-batches and --batch-size must be at least 1")
    ex = load_examples(task, data, **(columns or {}))
    torch.manual_seed(0)
    net, proc, _ = load_model(model, task, ex.label_names or None, trust_remote_code)
    feats = encode_examples(ex, proc, max_length or MAX_LENGTH[task])[: batch_size * max_batches]
    coll = collate_for(proc)
    batches = [coll(feats[i:i + batch_size]) for i in range(0, len(feats), batch_size)]
    # a fresh classification head is random: score the body through it anyway (its gradients
    # reflect the task's labels), but leave the head itself out of the LoRA targets
    rep = dt.importance(net, batches, metric=metric)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    res = {"model": model, "data": data, "metric": metric, "batches": len(batches), "rows": rep.rows,
           "plot": str(out / "importance.png")}
    rep.plot(out / "importance.png")
    if budget is not None:
        cfg = rep.to_lora_config(budget=int(budget) if budget >= 1 else budget)
        opts = {"targets": cfg.targets, "r": cfg.r, "alpha": cfg.alpha, "rank_pattern": cfg.rank_pattern,
                "alpha_pattern": cfg.alpha_pattern}
        res["lora_options"] = opts
        atomic_write_json(out / "lora_options.json", opts)
    atomic_write_json(out / "importance.json", res)
    res["table"] = rep.table(top=25)
    atomic_write(out / "importance.txt", res["table"].encode())
    return res
