"""``deltatune train`` and ``deltatune demo``: one run each, printed as a before/after table."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..app import run as app_run
from ..app.demo import DEMOS
from ..app.run import RunOptions
from ..app.tools import command_line
from ..core.delta import DeltaError
from ..train.distributed import rank
from .options import (FORMAT_HELP, CalibrateOpt, ConfigOpt, JsonOpt, Out, PackingOpt, QuantizeOpt, ReportToOpt,
                      one_line_errors, parse_opts)


# the flags of `train` that are TrainConfig fields (RunOptions.train); every other flag but the
# output ones (--json, --config) and --opt is a RunOptions field of the same name
TRAIN_FLAGS = ("epochs", "max_steps", "batch_size", "grad_accum", "warmup_ratio", "schedule", "max_grad_norm",
               "weight_decay", "seed", "eval_every", "save_every", "early_stopping", "gradient_checkpointing",
               "precision", "compile", "progress", "head_warmup", "head_lr",
               "label_smoothing")


def _run_options(ctx: typer.Context) -> RunOptions:
    """The parsed flags of `train` (``ctx.params``, --config defaults included) as RunOptions."""
    flags = {k: v for k, v in ctx.params.items() if k not in ("as_json", "config", "opt")}
    train = {k: flags.pop(k) for k in TRAIN_FLAGS}
    train["gradient_checkpointing"] = train["gradient_checkpointing"] or None  # False means "not asked", not "off"
    # unset TrainConfig flags stay out, so the per-method defaults (lr, epochs, ...) apply
    return RunOptions(**flags, method_options=parse_opts(ctx.params["opt"]), command=command_line(ctx),
                      train={k: v for k, v in train.items() if v is not None})


@one_line_errors
def train(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model directory, id in the local HF cache, or .gguf file; image classifiers: "
                              "timm:NAME, torchvision:NAME, or package.module:factory (a Python callable returning "
                              "an nn.Module: this imports and runs YOUR code, from the working directory too)."),
    data: str = typer.Option(..., help="Training data: CSV, TSV, JSONL, JSON, Parquet, Arrow, a dataset directory, "
                             "a Hub dataset id (org/name, cached or online); images: .npz, image folder, or a "
                             "pixel CSV (MNIST: 784 pixels + label)."),
    weights: Optional[str] = typer.Option(None, help="timm:/torchvision:/factory models: a local state dict "
                                          "(.pth/.pt loaded with weights_only, or .safetensors); every key is checked."),
    image_size: Optional[int] = typer.Option(None, help="Image classifiers: input side in pixels (default: the "
                                             "model's own config, e.g. 224)."),
    task: str = typer.Option("classify", help="classify | causal-lm | image-classify"),
    method: str = typer.Option("lora", help="A registered method (list them: `deltatune inspect --methods`) or 'full'."),
    opt: Optional[list[str]] = typer.Option(None, "--opt", "-o", help="Method option KEY=VALUE (repeatable), e.g. -o r=16."),
    output: str = typer.Option("runs/latest", help="Output directory (adapter/, metrics.json, training.png)."),
    val_data: Optional[str] = typer.Option(None, help="Validation file; default: hold out --val-fraction."),
    val_fraction: float = typer.Option(0.1, help="Share of rows held out for validation."),
    text_column: Optional[str] = typer.Option(None, help="Text column (default: guessed, e.g. 'text')."),
    label_column: Optional[str] = typer.Option(None, help="Label column (default: guessed, e.g. 'label')."),
    prompt_column: Optional[str] = typer.Option(None, help="causal-lm: prompt column."),
    response_column: Optional[str] = typer.Option(None, help="causal-lm: response column (the loss is on it)."),
    messages_column: Optional[str] = typer.Option(None, help="causal-lm: column of chat messages."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    data_split: Optional[str] = typer.Option(None, help="Split of a dataset directory or Hub id (default: train)."),
    data_config: Optional[str] = typer.Option(None, help="Configuration (subset) of a Hub dataset."),
    val_split: Optional[str] = typer.Option(None, help="Split of --val-data (e.g. test; use --val-data DATA for "
                                            "another split of the same dataset)."),
    train_on: str = typer.Option("responses", help="causal-lm: responses (loss on assistant turns only) | "
                                 "prompt+response (every token)."),
    chat_template: Optional[str] = typer.Option(None, help="causal-lm: chat template for a tokenizer without one: "
                                                "a .jinja file, a Jinja string, or 'chatml'."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per row (default 128 classify, 256 causal-lm)."),
    packing: Optional[bool] = PackingOpt,
    report_to: str = ReportToOpt,
    lr: Optional[float] = typer.Option(None, help="Learning rate (default per method: 1e-3 LoRA, 5e-5 full, ...)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs (default 3) unless --max-steps is given."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per micro-batch (default 16)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step (default 1)."),
    warmup_ratio: Optional[float] = typer.Option(None, help="Warmup share of steps (default 0.06)."),
    head_warmup: Optional[float] = typer.Option(None, help="LP-FT: share of steps that train only a new "
                                                "classification head before the method (default 0)."),
    head_lr: Optional[float] = typer.Option(None, help="A new classification head trains at max(--lr, this) "
                                            "(default 1e-2, times sqrt(H) for a head on a unit-norm sentence "
                                            "embedding; 0 = at --lr like the method)."),
    label_smoothing: Optional[float] = typer.Option(None, help="Classification: cross-entropy against "
                                                    "targets smoothed by this much (default 0.1; 0 = off)."),
    schedule: Optional[str] = typer.Option(None, help="linear | cosine | constant (default linear)."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient clipping norm (default 1.0; 0 = off)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default 0)."),
    seed: Optional[int] = typer.Option(None, help="Seed for head init, data order, dropout (default 0)."),
    eval_every: Optional[int] = typer.Option(None, help="Steps between evaluations (default: 4 per run)."),
    save_every: Optional[int] = typer.Option(None, help="Steps between checkpoints (default: none)."),
    early_stopping: Optional[int] = typer.Option(None, help="Stop after N evaluations without improvement."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations: less memory, slower."),
    precision: Optional[str] = typer.Option(None, help="fp32 | bf16 (autocast)."),
    compile: Optional[str] = typer.Option(None, help="Regional torch.compile of the model's blocks: auto (default: "
                                          "on for runs of >= 500 steps when a C++ compiler exists) | on | off."),
    max_train_rows: Optional[int] = typer.Option(None, help="Use only the first N training rows."),
    reference: Optional[str] = typer.Option(None, help="Text file (one text a line) for the forgetting measure."),
    resume: bool = typer.Option(False, help="Continue the run in --output from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace a previous run in --output."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code (only if you trust it)."),
    quantize: Optional[str] = QuantizeOpt,
    calibrate: int = CalibrateOpt,
    progress: bool = typer.Option(True, help="Show the progress bar."),
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Train an adapter (or the full model with --method full) and write it with metrics and a plot."""
    out = Out(as_json)
    o = _run_options(ctx)
    m = app_run.train_run(o, log=out.log)  # looked up at call time (tests replace it)
    if rank() == 0:  # under torchrun, the other ranks stay quiet
        out.done(run_summary(m), lambda: print_run(out, m))


def run_summary(m: dict) -> dict:
    """The --json object of a run: its metrics without the per-step history (that is in metrics.json)."""
    return {k: v for k, v in m.items() if k not in ("history",)}


def print_run(out: Out, m: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{m['method']} on {Path(m['data']).name}", show_header=True)
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for k in m["after"]:
        t.add_row(k, f"{m['before'].get(k, float('nan')):.4f}", f"{m['after'][k]:.4f}")
    out.console.print(t)
    fg = m.get("forgetting")
    if fg:
        out.log(f"forgetting ({fg['kind']}): {fg['value']:.4f}" + (" %" if fg["kind"] == "perplexity_change" else ""))
    out.log(f"trainable: {m['trainable_params']:,} of {m['total_params']:,} ({m['trainable_percent']:.3f}%)")
    out.log(f"steps {m['steps']}/{m['total_steps']}, train {m['train_time_s']:.1f} s "
            f"({m['samples_per_s']:.1f} samples/s"
            + (f", {m['tokens_per_s']:.0f} tokens/s" if m.get("tokens_per_s") else "")
            + f"), wall {m['wall_time_s']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB")
    out.log(f"saved: {m['artifact']} ({m['artifact_bytes'] / 1e6:.2f} MB), {m['plot']}, "
            f"{Path(m['artifact']).parent / 'metrics.json'}")


@one_line_errors
def demo(
    task: str = typer.Option("classify", help="classify (MiniLM-L6 + SMS spam) | causal-lm (SmolLM2-135M + chatterbot)."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default 100 classify, 40 causal-lm)."),
    output: Optional[str] = typer.Option(None, help="Output directory (default runs/demo or runs/demo-lm)."),
    packing: Optional[bool] = PackingOpt,
    report_to: str = ReportToOpt,
    progress: bool = typer.Option(True, help="Show the progress bar."),
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Real pretrained model + real data, LoRA with library defaults, before/after and forgetting."""
    if task not in DEMOS:
        raise DeltaError(f"unknown demo task {task!r}; choose one of {sorted(DEMOS)}")
    out = Out(as_json)
    kw = {"steps": steps} if steps else {}
    m = DEMOS[task](output=output or ("runs/demo" if task == "classify" else "runs/demo-lm"), log=out.log,
                    packing=packing, report_to=report_to, progress=progress, **kw)
    out.done(run_summary(m), lambda: print_run(out, m))
