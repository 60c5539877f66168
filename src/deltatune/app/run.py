"""One training run, end to end, as the CLI (``train``, ``compare``, ``demo``) does it:

    data file ─► Examples ─► train / validation split ─► token ids
    model dir ─► model + tokenizer ─► forgetting snapshot, metrics before
              ─► dt.attach(method) ─► Trainer ─► metrics after, forgetting
              ─► OUT/adapter/ (+ task.json)  OUT/metrics.json  OUT/training.png

``method="full"`` trains every weight (the reference in ``compare``) and saves the whole model to
``OUT/model/`` instead of an adapter.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import deltatune as dt
from ..data import packing
from ..tracking import make_trackers, parse_report_to
from .calibration import check_quantize, from_examples
from .console import library_log
from ..core import model_state
from ..core.delta import DeltaError
from ..core.method import METHODS, Method
from ..data.chat_encode import TRAIN_ON, chat_template_text
from ..data.examples import collate, encode, load_examples, split_validation
from ..files import atomic_dir, atomic_write_json, chmod_written
from ..models import load_model, load_quantized_model
from ..storage import model_card
from ..train import distributed as dtd
from ..train.head_warmup import head_rate
from ..train.losses import causal_lm_batch_loss
from ..train.memory import checkpointing_pays
from ..train.checkpoint import CHECKPOINTS
from ..train.runlock import run_lock
from ..text.classifier import SENTENCE_HEAD_WARMUP
from ..train.trainer import TrainConfig, Trainer, plot
from .evaluate import Forgetting, MAIN_METRIC, read_reference, task_metrics

# full fine-tuning's rate without --lr (BERT / RoBERTa's 2e-5..1e-4); a method's own: Method.default_lr
FULL_LR = 5e-5
METRICS_FILE = "metrics.json"  # a run directory's results (train writes it; eval / inspect read it)
MAX_LENGTH = {"classify": 128, "causal-lm": 256, "image-classify": 0}
# a classifier's fresh head trains at its own rate (head_lr) and carries much of the new task; a causal LM
# has none, the delta alone carries it: twice the rate (dialogue LoRA 35.1 -> 32.1 perplexity, docs/cli.md)
HEADLESS_LR_FACTOR = {"causal-lm": 2.0}


def default_lr(method: str, task: str) -> float:
    lr = getattr(METHODS.get(method), "default_lr", Method.default_lr)  # unknown: attach names the choices
    return FULL_LR if method == "full" else lr * HEADLESS_LR_FACTOR.get(task, 1.0)


@dataclass
class RunOptions:
    model: str
    data: str
    task: str = "classify"
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    output: str = "runs/latest"
    val_data: str | None = None
    val_fraction: float = 0.1  # held out when no --val-data: enough rows for a stable accuracy
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    format: str | None = None  # causal-lm data format (chat_formats.FORMATS); None = from the columns
    data_split: str | None = None  # split of a dataset directory / Hub id (default train or the only one)
    data_config: str | None = None  # Hub dataset configuration
    val_split: str | None = None  # split of --val-data (a dataset directory / Hub id), e.g. test
    train_on: str = "responses"  # causal-lm: loss on assistant turns only, or on prompt+response
    chat_template: str | None = None  # file / Jinja string / name, for tokenizers that have none
    command: str | None = None  # the command line that started the run (for the model card)
    max_length: int | None = None  # None = per task (128 classify, 256 causal-lm)
    max_train_rows: int | None = None
    max_eval_rows: int | None = 2000  # keeps evaluation cheap on CPU
    reference: str | None = None  # text file for forgetting; None = packaged general text
    trust_remote_code: bool = False
    quantize: str | None = None  # nf4 | int8: stream the base into 4-/8-bit storage (QLoRA), causal-lm only
    calibrate: int = 0  # with nf4: calibrated block scales from this many training batches (app/calibration.py)
    weights: str | None = None  # state dict for a timm:/torchvision:/module:factory model
    image_size: int | None = None  # override the vision model's input side (None = its own config)
    resume: bool = False
    overwrite: bool = False  # replace a previous run in ``output`` (its checkpoints are deleted)
    lr: float | None = None
    packing: bool | None = None  # causal-lm: rows packed per sequence; None = when rows are short (packing.py)
    report_to: str = "none"  # experiment trackers (deltatune.tracking): "tensorboard,mlflow" | "none"
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields


OPTIONS_FILE = "run_options.json"  # what a run was started with; --resume must match it
# options that change neither the data, the model nor the maths of a step: free to differ on resume
RESUME_FREE = {"progress", "compile", "save_every", "gradient_checkpointing", "device", "eval_every"}


def check_options(o: RunOptions) -> None:
    """Refuse run options that would otherwise be ignored or crash late (before any loading)."""
    if o.max_train_rows is not None and (not isinstance(o.max_train_rows, int) or o.max_train_rows < 1):
        raise DeltaError(f"--max-train-rows must be a positive number of rows, got {o.max_train_rows!r}; "
                         "leave it out to use every row")
    if not o.val_data and (not isinstance(o.val_fraction, (int, float)) or not 0 < o.val_fraction < 1):
        raise DeltaError(f"--val-fraction must be between 0 and 1, got {o.val_fraction!r}; e.g. 0.1 holds out "
                         "10 % of the rows (or pass --val-data)")
    check_quantize(o.quantize, o.calibrate, o.task, o.method)
    if o.lr is not None and not 0 < o.lr < float("inf"):
        raise DeltaError(f"--lr must be a positive number, got {o.lr!r}")
    try:
        TrainConfig(**o.train).validate()
    except TypeError as e:
        raise DeltaError(f"unknown training option ({e})") from None
    if o.packing and o.task != "causal-lm":
        raise DeltaError(f"--packing is for --task causal-lm (rows of a {o.task} task are not token sequences "
                         "to concatenate); leave it out")
    packing.check_method(o.method, o.packing)
    parse_report_to(o.report_to)  # a typo fails before anything loads


def options_fingerprint(o: RunOptions) -> dict:
    """The run options that decide what a checkpoint contains, with defaults filled in (so
    ``--lr`` left out and ``--lr`` given as its default compare equal), as flag names."""
    train = {k: v for k, v in dataclasses.asdict(TrainConfig(**o.train)).items() if k not in RESUME_FREE | {"lr"}}
    fp = {"--model": o.model, "--data": o.data, "--task": o.task, "--method": o.method,
          "--val-data": o.val_data, "--val-fraction": None if o.val_data else o.val_fraction,
          "--max-length": o.max_length or MAX_LENGTH[o.task], "--max-train-rows": o.max_train_rows,
          "--lr": o.lr or default_lr(o.method, o.task), "--quantize": o.quantize, "--weights": o.weights, "--image-size": o.image_size,
          "--packing": o.packing, "--calibrate": o.calibrate,
          **{f"--{k.replace('_', '-')}": v for k, v in _columns(o).items()},
          **{f"--opt {k}": v for k, v in o.method_options.items()},
          **{f"--{k.replace('_', '-')}": v for k, v in train.items()}}
    return json.loads(json.dumps(fp, sort_keys=True, default=str))  # tuples -> lists, as stored


def check_resume(o: RunOptions, out: Path) -> None:
    """On ``--resume``: the options must be the ones the run was started with (else the checkpoint's
    tensors, step count or data order do not fit): one line listing every difference."""
    f = out / OPTIONS_FILE
    if not f.exists():
        return  # a run from before this file existed: the trainer's own checks still apply
    try:
        saved = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltaError(f"{f}: unreadable ({e}); delete it to resume without the options check") from None
    now = options_fingerprint(o)
    diff = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    if diff:
        raise DeltaError(f"--resume with options different from the checkpoint's in {out}: {'; '.join(diff)}; "
                         "resume with the run's options, or start a new run (another --output, or --overwrite)")


def _columns(o: RunOptions) -> dict:
    return {k: getattr(o, k) for k in ("text_column", "label_column", "prompt_column", "response_column",
                                       "messages_column", "format")}


def prepare(o: RunOptions, label_names=None):
    """(train Examples, validation Examples) for the options."""
    ex = load_examples(o.task, o.data, label_names=label_names, data_split=o.data_split, data_config=o.data_config,
                       **_columns(o))
    seed = o.train.get("seed", 0)
    if o.val_data:
        val = load_examples(o.task, o.val_data, label_names=ex.label_names or None, data_split=o.val_split,
                            data_config=o.data_config, **_columns(o))
        train = ex
    else:
        train, val = split_validation(ex, o.val_fraction, seed=seed)
    if o.max_train_rows is not None and len(train) > o.max_train_rows:
        train = train.subset(range(o.max_train_rows))
    if o.max_eval_rows and len(val) > o.max_eval_rows:
        val = val.subset(range(o.max_eval_rows))
    return train, val


def encode_examples(ex, proc, max_length: int, train_on: str = "responses"):
    if ex.task == "image-classify" and hasattr(proc, "features"):  # timm / torchvision / factory: lazy
        return proc.features(ex.rows, ex.labels)
    if ex.task == "image-classify" and proc is not None:
        import numpy as np

        pix = proc(images=[np.asarray(r) for r in ex.rows], return_tensors="np", do_rescale=False)["pixel_values"]
        return [{"pixel_values": p, "labels": y} for p, y in zip(pix, ex.labels)]
    return encode(ex, proc, max_length, **({"train_on": train_on} if ex.task == "causal-lm" else {}))


def collate_for(proc):
    from functools import partial

    pad = getattr(proc, "pad_token_id", None) or 0
    return partial(collate, pad_id=pad)


def attach_method(model, method: str, options: dict, batches: Callable[[], list] | None = None):
    """Attach ``method`` (or make everything trainable for ``full``).  Methods that choose their
    weights from gradients (``sparse``) get ``batches()`` — a few training batches — unless the
    options already give batches or a selection."""
    import dataclasses

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    fields = {f.name for f in dataclasses.fields(dt.METHODS[method].config_cls)}
    if "batches" in fields and batches is not None and not {"batches", "selection"} & set(options):
        options = {**options, "batches": batches()}
    return dt.attach(model, method, **options)


def train_run(o: RunOptions, log: Callable[[str], None] = print, on_model: Callable | None = None) -> dict:
    """Train per ``o``; write the adapter, metrics.json and training.png; return the metrics.
    ``on_model(stage, model, tokenizer)`` is called with stage "base" (before the adapter is
    attached) and "trained" (after training)."""
    import contextlib

    t_start = time.perf_counter()
    out = Path(o.output)
    check_options(o)
    rank, _ = dtd.init() if dtd.launched() else (0, 1)  # under torchrun: rank 0 logs and writes
    if rank != 0:
        log = lambda msg: None  # noqa: E731
    with run_lock(out) if rank == 0 else contextlib.nullcontext():  # one run per --output at a time
        tracker = make_trackers(o.report_to if rank == 0 else "none", out, out.resolve().name)
        if tracker:
            log(f"tracking: {tracker.describe()}")
        try:
            metrics = _train_locked(o, out, rank, log, on_model, t_start, tracker)
        except BaseException:
            tracker.close(ok=False)  # the run shows as FAILED in the tracker, with what it logged
            raise
        tracker.close(ok=True)
        return metrics


def _train_locked(o: RunOptions, out: Path, rank: int, log, on_model, t_start: float, tracker) -> dict:
    import torch

    _check_output_dir(o, out, rank)
    method_config = _check_before_loading(o)
    train_ex, val_ex = prepare(o)
    seed = o.train.get("seed", 0)
    torch.manual_seed(seed)  # the fresh head's init is part of the run
    model, proc, path, template = _load_base(o, train_ex, log)
    max_length = o.max_length or MAX_LENGTH[o.task]
    log(f"data: {len(train_ex)} train / {len(val_ex)} validation rows from {o.data}"
        + (f"; labels {train_ex.label_names}" if train_ex.label_names else "")
        + (f"; format {train_ex.format}, loss on {o.train_on}" if train_ex.format else ""))
    feats = _encode(o, model, proc, train_ex, val_ex, max_length, log)
    metric, greater = MAIN_METRIC[o.task]
    tok = proc if o.task != "image-classify" else None
    fg = Forgetting(tok, o.task, read_reference(o.reference) if o.reference else None).snapshot(model)
    before = task_metrics(o.task, model, feats.val, feats.collate)
    log("before: " + _fmt(before))
    if on_model is not None:
        on_model("base", model, proc)
    bs = int(o.train.get("batch_size", TrainConfig.batch_size))
    attach_method(model, o.method, o.method_options,  # selection pass: the first 8 training batches
                  batches=lambda: [feats.collate(feats.rows[i:i + bs])
                                   for i in range(0, min(len(feats.rows), 8 * bs), bs)])
    counts = dt.trainable_parameters(model)
    log(f"method: {o.method} {o.method_options or ''} | trainable {counts.trainable:,} of {counts.total:,} "
        f"({counts.percent:.3f}%)")
    lr = o.lr or default_lr(o.method, o.task)
    cfg = _train_config(o, model, lr, metric, greater, bs, max_length, log)
    # causal LMs: the chunked loss (same value and gradients, no (B, T, V) fp32 logits in memory)
    loss = {"loss_fn": causal_lm_batch_loss} if o.task == "causal-lm" else {}
    tracker.log_config(resolved_config(o, cfg, method_config, max_length, train_ex, val_ex, feats.pack_mode, counts))
    tracker.log_metrics({f"eval/{k}": v for k, v in before.items()}, 0)
    trainer = Trainer(model, feats.train, cfg, collate=feats.train_collate, output_dir=out,
                      eval_fn=lambda m: task_metrics(o.task, m, feats.val, feats.collate), tracker=tracker, **loss)
    if trainer.head and trainer.head_lr != cfg.head_lr:  # train/head_warmup.py: a head on a unit-norm embedding
        log(f"head: reads the unit-norm embedding, so it trains at --head-lr x sqrt(H) = {trainer.head_lr:.3g}")
    if rank == 0 and not (o.resume and (out / OPTIONS_FILE).exists()):
        atomic_write_json(out / OPTIONS_FILE, options_fingerprint(o))
    # torch / transformers / datasets warnings (dynamo recompiles, deprecations) go to train.log, not
    # into the progress bar; DELTATUNE_VERBOSE=1 shows them as well
    with library_log(out / "train.log" if rank == 0 else None):
        result = trainer.train(resume=o.resume)
    after = result.evals[-1] if result.evals and result.evals[-1]["step"] == result.steps and not cfg.early_stopping \
        else task_metrics(o.task, model, feats.val, feats.collate)
    after = {k: v for k, v in after.items() if k != "step"}
    forgetting = fg.measure(model)
    log("after:  " + _fmt(after))
    tracker.log_metrics({**{f"eval/{k}": v for k, v in after.items()},
                         **{f"forgetting/{k}": v for k, v in (forgetting or {}).items()}}, result.steps)
    if on_model is not None:
        on_model("trained", model, proc)
    task_info = {"task": o.task, "base_model": o.model, "resolved_model": path, "label_names": train_ex.label_names,
                 "max_length": max_length, "columns": _columns(o), "method": o.method,
                 "trust_remote_code": o.trust_remote_code, "format": train_ex.format or None,
                 "train_on": o.train_on, "chat_template": template,
                 "weights": str(Path(o.weights).expanduser().resolve()) if o.weights else None,
                 "image_size": o.image_size, "seed": seed, "quantize": o.quantize}  # seed: eval rebuilds the base's fresh head as it was
    art = _save_artifact(o, out, rank, trainer, model, proc, task_info, result, metric, tracker)
    metrics = {
        "task": o.task, "model": o.model, "data": o.data, "method": o.method, "method_options": o.method_options,
        "pooling": getattr(model.config, "sentence_pooling", None), "train_rows": len(train_ex), "val_rows": len(val_ex),
        "lr": lr, "train_config": dataclasses.asdict(cfg), "before": before, "after": after, "metric": metric,
        "forgetting": forgetting, "trainable_params": counts.trainable, "total_params": counts.total,
        "trainable_percent": counts.percent, "head_lr": head_rate(trainer.params, trainer.head, lr, trainer.head_lr),
        "steps": result.steps, "total_steps": result.total_steps, "stopped_early": result.stopped_early,
        "train_time_s": result.wall_time_s, "wall_time_s": time.perf_counter() - t_start,
        "samples_per_s": result.samples_per_s, "tokens_per_s": result.tokens_per_s, "peak_rss_mb": result.peak_rss_mb,
        "compiled": trainer.compiled,  # torch.compile ran to the end (False: off, or fell back to eager)
        "artifact": str(art), "artifact_bytes": sum(f.stat().st_size for f in art.iterdir() if f.is_file()),
        "history": result.history, "evals": result.evals, "plot": str(out / "training.png"), "packing": feats.pack_mode or "off",
    }
    if rank == 0:
        atomic_write_json(out / METRICS_FILE, metrics)
        write_run_card(o, metrics, art, train_ex.format)
    return metrics


def _check_output_dir(o: RunOptions, out: Path, rank: int) -> None:
    """--resume must match the run in ``out``; --overwrite drops its checkpoints; otherwise a
    directory already holding a run is an error (never train over someone's results)."""
    if o.resume:
        check_resume(o, out)
    if o.overwrite and not o.resume and rank == 0:
        import shutil

        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    elif out.exists() and any(out.iterdir()) and not o.resume:
        if (out / METRICS_FILE).exists() or (out / CHECKPOINTS).exists():
            raise DeltaError(f"output directory {out} already holds a run; pass --resume to continue it, "
                             "or choose another --output")


def _check_before_loading(o: RunOptions):
    """The checks that cost nothing, before minutes of loading: returns the method's config."""
    method_config = dt.make_config(o.method, **o.method_options) if o.method != "full" else None  # typos fail here
    if o.task == "causal-lm":
        if o.train_on not in TRAIN_ON:
            raise DeltaError(f"unknown --train-on {o.train_on!r}; choose one of {list(TRAIN_ON)}")
        if o.chat_template:
            chat_template_text(o.chat_template)  # a missing file fails here, not after loading the model
    return method_config


def _load_base(o: RunOptions, train_ex, log):
    """The base model (streamed into nf4/int8 with --quantize), its processor, resolved path and chat template."""
    if o.quantize:
        cal = from_examples(train_ex, o.calibrate, int(o.train.get("batch_size", TrainConfig.batch_size)),
                            o.max_length or MAX_LENGTH[o.task], o.train_on, lambda tok: set_chat_template(tok, o.chat_template))
        model, proc, path = load_quantized_model(o.model, o.quantize, o.task, o.trust_remote_code, calibration=cal)
    else:
        model, proc, path = load_model(o.model, o.task, train_ex.label_names or None, o.trust_remote_code,
                                       weights=o.weights, image_size=o.image_size, log=log)
    template = set_chat_template(proc, o.chat_template)
    if getattr(model, "config", None) is not None:  # adapter_config / model card record the real base
        model.config._name_or_path = real_model_name(o.model)
    return model, proc, path, template


@dataclass
class _Features:
    train: list  # what the trainer iterates: packed sequences when packing is on, else ``rows``
    rows: list  # the unpacked training rows (the selection pass of sparse methods batches them)
    val: list
    collate: Callable  # rows -> batch (evaluation, selection)
    train_collate: Callable  # ``train`` -> batch (PackedCollator when packed)
    pack_mode: str | None  # "position_ids" | "mask" (block-diagonal) | None (not packed)


def _encode(o: RunOptions, model, proc, train_ex, val_ex, max_length: int, log) -> _Features:
    train_f = encode_examples(train_ex, proc, max_length, o.train_on)
    val_f = encode_examples(val_ex, proc, max_length, o.train_on)
    coll = collate_for(proc)
    if not use_packing(o, train_f, max_length):
        return _Features(train_f, train_f, val_f, coll, coll, None)
    pack_mode = packing.attention_mode(model)  # checked on the base: no adapter changes attention
    packed = packing.pack(train_f, max_length)
    train_coll = packing.PackedCollator(getattr(proc, "pad_token_id", None) or 0, pack_mode,
                                        packing._model_dtype(model))
    log(f"packing: {len(train_f)} rows in {len(packed)} sequence(s) of <= {max_length} tokens "
        f"({sum(len(f['input_ids']) for f in packed) / (len(packed) * max_length):.0%} full; rows kept apart by "
        f"{'restarting position ids' if pack_mode == 'position_ids' else 'a block-diagonal 4-D mask'})")
    return _Features(packed, train_f, val_f, coll, train_coll, pack_mode)


def _train_config(o: RunOptions, model, lr: float, metric: str, greater: bool, bs: int, max_length: int, log):
    """TrainConfig: the method's lr, the task's metric, small-memory defaults for a quantized base, then the flags."""
    small = {}
    if o.quantize and "gradient_checkpointing" not in o.train:  # a small-memory run: recompute when it pays
        small["gradient_checkpointing"] = checkpointing_pays(model, bs, max_length)
        cal = (model_state.get(model, model_state.QUANT) or {}).get("calibrated")  # batches that ran
        log(f"quantized base ({o.quantize}{f', calibrated on {cal} batch(es)' if cal else ''}): gradient checkpointing "
            f"{'on' if small['gradient_checkpointing'] else 'off'}"
            " (activations estimate vs the quantized weights; --gradient-checkpointing forces it)")
    if "head_warmup" not in o.train and getattr(model.config, "sentence_pooling", None):  # text/classifier.py
        small["head_warmup"] = SENTENCE_HEAD_WARMUP
        log(f"LP-FT: the new head trains alone for {SENTENCE_HEAD_WARMUP:.0%} of the steps (--head-warmup 0: off)")
    return TrainConfig(**{"lr": lr, "metric": metric, "greater_is_better": greater, **small, **o.train})


def _save_artifact(o: RunOptions, out: Path, rank: int, trainer, model, proc, task_info: dict, result, metric: str,
                   tracker) -> Path:
    """The adapter (or the full model) with task.json, and the training plot; returns its directory."""
    art = out / ("model" if o.method == "full" else "adapter")
    if o.method != "full":
        trainer.save_adapter(art)  # every rank calls it (FSDP gathers); rank 0 writes
    if rank == 0:
        if o.method == "full":
            save_pretrained_atomic(model, proc, art)
        atomic_write_json(art / "task.json", task_info)
        plot(result, out / "training.png", metric, title=f"{o.method} on {Path(o.data).name}")
    dtd.barrier()
    if rank == 0:
        tracker.log_artifact(art, "adapter" if o.method != "full" else "model")
    return art


def use_packing(o: RunOptions, features: list[dict], max_length: int) -> bool:
    """--packing / --no-packing as given; unset: causal-LM rows that are short (packing.should_pack),
    and never for methods that prepend virtual tokens per sequence."""
    if o.task != "causal-lm":
        return False
    if o.packing is not None:
        return o.packing
    return o.method not in packing.PER_SEQUENCE_METHODS and packing.should_pack(
        [len(f["input_ids"]) for f in features], max_length)


def resolved_config(o: RunOptions, cfg, method_config, max_length: int, train_ex, val_ex, pack_mode, counts) -> dict:
    """Everything that decides the run, defaults filled in: what the trackers record."""
    skip = {"train", "resume", "overwrite"}
    return {"run": {k: v for k, v in dataclasses.asdict(o).items() if k not in skip},
            "train": dataclasses.asdict(cfg),
            "method": {"name": o.method, **(dataclasses.asdict(method_config)
                                            if dataclasses.is_dataclass(method_config) else {})},
            "data": {"train_rows": len(train_ex), "val_rows": len(val_ex), "format": train_ex.format or None,
                     "max_length": max_length, "packing": pack_mode or "off"},
            "params": {"trainable": counts.trainable, "total": counts.total, "percent": counts.percent}}


def real_model_name(spec: str) -> str:
    """A local model (directory or .gguf) as its absolute path; a cached Hub id as the id."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def card_config(o: RunOptions) -> dict:
    """The run's options as ``--config`` YAML keys (flag names), without run-management ones."""
    skip = {"train", "command", "resume", "overwrite", "max_eval_rows"}
    flat = {k: v for k, v in dataclasses.asdict(o).items() if k not in skip}
    flat.update(o.train)
    return {k: v for k, v in flat.items() if v is not None and v != {}}


def write_run_card(o: RunOptions, m: dict, art: Path, fmt: str | None = None) -> None:
    """README.md of the saved adapter (or full model) with the run: data, command, metrics, forgetting."""
    keys = [k for k in m["after"] if k in m["before"]] or list(m["after"])
    data = f"`{o.data}`" + (f" (split {o.data_split})" if o.data_split else "") + \
        f", {m['train_rows']} training / {m['val_rows']} validation rows" + (f", format {fmt}" if fmt else "") + \
        (f", loss on {o.train_on}" if o.task == "causal-lm" else "")
    text = model_card.card(
        base_model=real_model_name(o.model), method=o.method, method_config=o.method_options or None, task=o.task,
        trainable=m["trainable_params"], total=m["total_params"], datasets=[o.data if not Path(o.data).exists()
                                                                           else Path(o.data).name],
        data=data, metrics={k: (m["before"].get(k), m["after"][k]) for k in keys}, main_metric=m["metric"],
        forgetting=m.get("forgetting"), command=o.command, config=card_config(o), pooling=m.get("pooling"))
    model_card.write(art, text)


def set_chat_template(proc, value: str | None) -> str | None:
    """Give the tokenizer ``--chat-template`` (file, Jinja string or name); return the template text
    that was set (recorded in task.json so eval uses the same one), or None."""
    if not value or proc is None:
        return None
    proc.chat_template = chat_template_text(value)
    return proc.chat_template


def save_pretrained_atomic(model, proc, out: Path) -> Path:
    """``save_pretrained`` into a temp dir next to ``out``, fsync, then one atomic swap
    (``safety.atomic_dir``): readers and crashes see the old model dir or the new one, never half."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if proc is not None and hasattr(proc, "save_pretrained"):
            proc.save_pretrained(tmp)
        chmod_written(tmp)
    return out


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))


def read_task(adapter_dir: str | Path) -> dict:
    p = Path(adapter_dir) / "task.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DeltaError(f"{p}: not valid JSON ({e})") from None
