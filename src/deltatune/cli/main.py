"""The ``deltatune`` command line: train, eval, compare, inspect, merge, demo, serve.

Every command takes flags or ``--config FILE.yaml`` (keys are the flag names, ``-`` or ``_``;
flags given on the command line win), prints a human summary by default and one JSON object with
``--json`` (progress and logs then go to stderr).  Models are local directories, Hub ids (from the
local Hugging Face cache; downloaded only when the user sets ``HF_HUB_OFFLINE=0``), or GGUF files;
``trust_remote_code`` is off unless ``--trust-remote-code`` is given.  Errors print one line and exit with status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from ..app import run as app_run
from ..app.demo import DEMOS
from ..app.importance_report import importance_report
from ..app.run import RunOptions
from ..app.tools import (command_line, compare_methods, evaluate_adapter, inspect_path, merge_adapter, print_inspect,
                         print_methods)
from ..core.delta import DeltaError
from ..files import write_error
from ..models import configure_threads
from ..storage.adapter import CONFIG, MANIFEST
from ..train.distributed import rank

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient fine-tuning from the command line (deltatune).")


# --------------------------------------------------------------------------- --version

# what a bug report needs: ours, then the libraries whose releases change our behaviour
VERSION_PACKAGES = ("deltatune", "torch", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes")


def version_text() -> str:
    """One line per package (``not installed`` when absent), read from the installed metadata
    without importing the packages (fast, and works when one of them is broken)."""
    import platform
    from importlib import metadata

    def ver(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"{p} {ver(p)}" for p in VERSION_PACKAGES]
    lines.append(f"python {platform.python_version()} ({platform.system()} {platform.machine()})")
    return "\n".join(lines)


def _version(value: bool):
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the versions of deltatune, torch, transformers, peft, ... and exit.")):
    """Parameter-efficient fine-tuning from the command line (deltatune)."""


# --------------------------------------------------------------------------- config files

def _load_config(ctx: typer.Context, param, value: Optional[Path]):
    """Eager ``--config``: YAML keys become defaults of the command's other options."""
    if not value:
        return value
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise typer.BadParameter(f"config file {value} does not exist") from None
    except yaml.YAMLError as e:
        raise typer.BadParameter(f"{value}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values")
    # YAML keys are flag names ("json", "batch-size"); the parameter behind "--json" is called as_json
    by_flag = {o.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params for o in p.opts
               if o.startswith("--")}
    by_flag.update({p.name: p.name for p in ctx.command.params})
    dm: dict[str, Any] = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in ("method_options", "options") and isinstance(v, dict):
            key, v = "opt", [f"{a}={json.dumps(b)}" for a, b in v.items()]
        if key not in by_flag:
            flags = sorted(o for p in ctx.command.params for o in p.opts if o.startswith("--") and o != "--config")
            raise typer.BadParameter(f"{value}: unknown option {k!r}; known: {', '.join(flags)}")
        dm[by_flag[key]] = v
    ctx.default_map = {**(ctx.default_map or {}), **dm}
    return value


ConfigOpt = typer.Option(None, "--config", help="YAML file of option values (flags override it).",
                         is_eager=True, callback=_load_config, exists=False)
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of the human summary.")


class Out:
    """Human output on stdout via rich, or logs to stderr and one JSON object at the end."""

    def __init__(self, as_json: bool):
        from rich.console import Console

        self.as_json = as_json
        self.console = Console(stderr=as_json, highlight=False, soft_wrap=True)

    def log(self, msg: str) -> None:
        self.console.print(msg, markup=False)

    def done(self, obj: dict, human) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        else:
            human()


def _parse_opts(opts: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for o in opts or []:
        k, eq, v = o.partition("=")
        if not eq or not k.strip():
            raise DeltaError(f"--opt {o!r}: expected KEY=VALUE, e.g. --opt r=16 --opt targets='[q_proj,v_proj]'")
        try:
            val = yaml.safe_load(v)
        except yaml.YAMLError:
            val = v
        out[k.strip()] = _exponent_number(val) if val == v.strip() else val
    return out


def _exponent_number(v):
    """YAML 1.1 reads ``1e8`` and ``1e-3`` (no dot) as strings: give them their number (integers
    stay integers, so ``r=1e8`` is the rank 100000000 and is judged as such)."""
    import math

    if not isinstance(v, str) or not any(c in v for c in "eE"):
        return v
    try:
        f = float(v)
    except ValueError:
        return v
    if not math.isfinite(f):
        return v
    return int(f) if f.is_integer() and "." not in v.lower().split("e")[0] and "-" not in v.lower().split("e")[1] \
        else f


def _errors(fn):
    """Commands print a DeltaError as one line on stderr and exit with status 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except DeltaError as e:
            sys.stderr.write(f"error: {e}\n")
            raise typer.Exit(2) from None
        except OSError as e:  # disk full, file-size limit, read-only or forbidden path: one line too
            w = write_error(e, e.filename or "a file")
            if w is e:
                raise
            sys.stderr.write(f"error: {w}\n")
            raise typer.Exit(2) from None

    return wrapper


FORMAT_HELP = ("causal-lm data format (default: from the columns): messages | sharegpt | alpaca | "
               "prompt-completion | text.")


QuantizeOpt = typer.Option(None, "--quantize", help="causal-lm: stream the base into nf4 (QLoRA) or int8 storage "
                           "while loading (small-memory defaults: chunked loss, gradient checkpointing when it pays).")


def _train_dict(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


# --------------------------------------------------------------------------- train

@app.command()
@_errors
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
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing",
                                           help="causal-lm: several rows per sequence, each attending only to "
                                           "itself (default: on when the median row is <= half of --max-length; "
                                           "not with prompt/prefix)."),
    report_to: str = typer.Option("none", help="Experiment tracking: tensorboard, mlflow (comma-separated) or none; "
                                  "needs pip install 'deltatune[tracking]'."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default per method: 1e-3 LoRA, 5e-5 full, ...)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs (default 3) unless --max-steps is given."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per micro-batch (default 16)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step (default 1)."),
    warmup_ratio: Optional[float] = typer.Option(None, help="Warmup share of steps (default 0.06)."),
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
    progress: bool = typer.Option(True, help="Show the progress bar."),
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Train an adapter (or the full model with --method full) and write it with metrics and a plot."""
    out = Out(as_json)
    o = RunOptions(model=model, data=data, task=task, method=method, method_options=_parse_opts(opt), output=output,
                   val_data=val_data, val_fraction=val_fraction, text_column=text_column, label_column=label_column,
                   prompt_column=prompt_column, response_column=response_column, messages_column=messages_column,
                   format=format, data_split=data_split, data_config=data_config, val_split=val_split,
                   train_on=train_on, chat_template=chat_template, command=command_line(ctx),
                   max_length=max_length, max_train_rows=max_train_rows, reference=reference, resume=resume, overwrite=overwrite,
                   trust_remote_code=trust_remote_code, lr=lr, quantize=quantize, weights=weights, image_size=image_size,
                   packing=packing, report_to=report_to,
                   train=_train_dict(epochs=epochs,
                                     max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                                     warmup_ratio=warmup_ratio, schedule=schedule, max_grad_norm=max_grad_norm,
                                     weight_decay=weight_decay, seed=seed, eval_every=eval_every,
                                     save_every=save_every, early_stopping=early_stopping,
                                     gradient_checkpointing=gradient_checkpointing or None, precision=precision,
                                     compile=compile, progress=progress))
    m = app_run.train_run(o, log=out.log)  # looked up at call time (tests replace it)
    if rank() == 0:  # under torchrun, the other ranks stay quiet
        out.done(_summary(m), lambda: _print_run(out, m))


def _summary(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("history",)}


def _print_run(out: Out, m: dict) -> None:
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


# --------------------------------------------------------------------------- eval

@app.command("eval")
@_errors
def eval_cmd(
    adapter: Optional[str] = typer.Option(None, help="Adapter directory, or a run directory holding adapter/ or "
                                          "(--method full) model/. Leave out to evaluate --model itself."),
    data: str = typer.Option(..., help="Evaluation data file (same columns as training)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one recorded at training); alone: "
                                        "the model to evaluate."),
    weights: Optional[str] = typer.Option(None, help="With --model timm:/torchvision:/factory and no --adapter: "
                                          "its state dict."),
    image_size: Optional[int] = typer.Option(None, help="With --model and no --adapter: image input side."),
    text_column: Optional[str] = typer.Option(None),
    label_column: Optional[str] = typer.Option(None),
    prompt_column: Optional[str] = typer.Option(None),
    response_column: Optional[str] = typer.Option(None),
    messages_column: Optional[str] = typer.Option(None),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP + " Default: as at training."),
    data_split: Optional[str] = typer.Option(None, help="Split of a dataset directory or Hub id."),
    data_config: Optional[str] = typer.Option(None, help="Configuration (subset) of a Hub dataset."),
    task: Optional[str] = typer.Option(None, help="Task (default: recorded at training)."),
    reference: Optional[str] = typer.Option(None, help="Text file for the forgetting measure."),
    batch_size: int = typer.Option(32),
    trust_remote_code: bool = typer.Option(False),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Evaluate on the base streamed into nf4 or "
                                           "int8 storage (warns when the adapter was trained on the other kind)."),
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Task metrics on DATA and forgetting (drift / perplexity change on general text) of an adapter,
    of a --method full run against its recorded base, or (--model alone) of a base model."""
    out = Out(as_json)
    columns = dict(text_column=text_column, label_column=label_column, prompt_column=prompt_column,
                   response_column=response_column, messages_column=messages_column,
                   format=format, data_split=data_split, data_config=data_config)
    res = evaluate_adapter(adapter, data, model=model, task=task, reference=reference, batch_size=batch_size,
                           trust_remote_code=trust_remote_code, columns=columns, weights=weights, image_size=image_size,
                           quantize=quantize, log=out.log)

    def human():
        from rich.table import Table

        t = Table(title=f"{res['adapter'] or res['base_model']} on {Path(data).name} ({res['rows']} rows)")
        t.add_column("metric")
        tuned = {"full": "fine-tuned", "base": None}.get(res.get("kind"), "adapter")
        t.add_column("base", justify="right")
        if tuned:
            t.add_column(tuned, justify="right")
        for k, v in res["metrics"].items():
            t.add_row(k, f"{res['base_metrics'].get(k, float('nan')):.4f}", *([f"{v:.4f}"] if tuned else []))
        out.console.print(t)
        fg = res["forgetting"]
        if fg:
            ref = "reference images" if res["task"] == "image-classify" else "reference texts"
            out.log(f"forgetting ({fg['kind']}, {fg['texts']} {ref}): {fg['value']:.4f}"
                    + (f" %  (ppl {fg['ppl_base']:.2f} -> {fg['ppl_tuned']:.2f})" if fg["kind"] == "perplexity_change" else ""))

    out.done(res, human)


# --------------------------------------------------------------------------- compare

@app.command()
@_errors
def compare(
    methods: str = typer.Option("lora,ia3,bitfit", help="Comma-separated methods; unregistered ones are skipped."),
    model: str = typer.Option(..., help="Base model."),
    data: str = typer.Option(..., help="Training data."),
    task: str = typer.Option("classify"),
    full: bool = typer.Option(False, help="Also fine-tune every weight, as the reference."),
    weights: Optional[str] = typer.Option(None, help="timm:/torchvision:/factory models: a local state dict."),
    image_size: Optional[int] = typer.Option(None, help="Image classifiers: input side (default: the model's own)."),
    output: str = typer.Option("runs/compare", help="Directory: one sub-directory per method, table, plot."),
    max_steps: int = typer.Option(100, help="The same step budget for every method."),
    batch_size: int = typer.Option(16),
    max_length: Optional[int] = typer.Option(None),
    val_data: Optional[str] = typer.Option(None),
    text_column: Optional[str] = typer.Option(None),
    label_column: Optional[str] = typer.Option(None),
    prompt_column: Optional[str] = typer.Option(None),
    response_column: Optional[str] = typer.Option(None),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    data_split: Optional[str] = typer.Option(None, help="Split of a dataset directory or Hub id."),
    train_on: Optional[str] = typer.Option(None, help="causal-lm: responses | prompt+response."),
    chat_template: Optional[str] = typer.Option(None, help="causal-lm: template for a tokenizer without one."),
    max_train_rows: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    quantize: Optional[str] = QuantizeOpt,
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Train several methods on the same budget; one table (metric, forgetting, params, memory, time,
    size) and a Pareto plot (metric vs trainable parameters, colour = forgetting); --full adds the
    full fine-tuning reference."""
    out = Out(as_json)
    extra = {"--max-length": max_length, "--val-data": val_data, "--text-column": text_column,
             "--label-column": label_column, "--prompt-column": prompt_column,
             "--response-column": response_column, "--max-train-rows": max_train_rows, "--format": format,
             "--data-split": data_split, "--train-on": train_on, "--chat-template": chat_template,
             "--quantize": quantize, "--weights": weights, "--image-size": image_size}
    res = compare_methods([m.strip() for m in methods.split(",") if m.strip()], model, data, task, output,
                          max_steps, batch_size, seed, full, {k: v for k, v in extra.items() if v is not None},
                          log=out.log)

    def human():
        from rich.table import Table

        t = Table(title=f"compare on {Path(data).name}: {max_steps} steps each")
        kind = next((r["forgetting_kind"] for r in res["rows"] if r.get("forgetting_kind")), None)
        fg = f"forgetting ({kind.replace('_', ' ')})" if kind else "forgetting"
        for c in ("method", res["metric"], fg, "trainable", "peak RSS MB", "time s", "file MB"):
            t.add_column(c, justify="left" if c == "method" else "right")
        for r in res["rows"]:
            t.add_row(r["method"], f"{r['metric']:.4f}", f"{r['forgetting']:.4f}" if r["forgetting"] is not None else "-",
                      f"{r['trainable_params']:,} ({r['trainable_percent']:.2f}%)", f"{r['peak_rss_mb']:.0f}",
                      f"{r['wall_time_s']:.1f}", f"{r['artifact_bytes'] / 1e6:.2f}")
        out.console.print(t)
        for s in res["skipped"]:
            out.log(f"skipped {s['method']}: {s['reason']}")
        out.log(f"plot: {res['plot']}  table: {res['table']}")

    out.done(res, human)


@app.command()
@_errors
def importance(
    model: str = typer.Option(..., help="Model directory, id in the local HF cache, or .gguf file."),
    data: str = typer.Option(..., help="Data file of the task (same formats and columns as train)."),
    task: str = typer.Option("classify", help="classify | causal-lm | image-classify"),
    output: str = typer.Option("runs/importance", help="Directory for importance.json/.png/.txt."),
    budget: Optional[float] = typer.Option(None, help="LoRA parameter budget (count, or fraction < 1): writes lora_options.json."),
    metric: str = typer.Option("taylor", help="taylor (sum |w*g|) | fisher (sum g^2)."),
    max_batches: int = typer.Option(8, help="Batches of data to score on."),
    batch_size: int = typer.Option(16),
    max_length: Optional[int] = typer.Option(None),
    text_column: Optional[str] = typer.Option(None),
    label_column: Optional[str] = typer.Option(None),
    prompt_column: Optional[str] = typer.Option(None),
    response_column: Optional[str] = typer.Option(None),
    trust_remote_code: bool = typer.Option(False),
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Rank the model's layers by gradient sensitivity on DATA; with --budget, a LoRA config for it."""
    out = Out(as_json)
    cols = {"text_column": text_column, "label_column": label_column, "prompt_column": prompt_column,
            "response_column": response_column}
    res = importance_report(model, data, task, output, budget, metric, max_batches, batch_size, max_length,
                            {k: v for k, v in cols.items() if v is not None}, trust_remote_code)

    def human():
        out.console.print(res["table"])
        if "lora_options" in res:
            out.log(f"LoRA for budget {budget:g}: {len(res['lora_options']['targets'])} modules, "
                    f"ranks {sorted(set(res['lora_options']['rank_pattern'].values()))} -> {output}/lora_options.json")
        out.log(f"plot: {res['plot']}")

    out.done({k: v for k, v in res.items() if k != "table"}, human)


# --------------------------------------------------------------------------- inspect / merge / demo

@app.command()
@_errors
def inspect(
    path: Optional[str] = typer.Argument(None, help="An adapter directory or a model (directory / cached id / .gguf)."),
    methods: bool = typer.Option(False, "--methods", help="List the registered methods and exit."),
    task: Optional[str] = typer.Option(None, help="Load the model for this task's head (default: bare model)."),
    method: str = typer.Option("lora", help="Method whose per-layer trainable counts to show."),
    opt: Optional[list[str]] = typer.Option(None, "--opt", "-o", help="Method option KEY=VALUE."),
    trust_remote_code: bool = typer.Option(False),
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Modules, candidate targets and trainable counts of a model; or an adapter's files and integrity."""
    out = Out(as_json)
    if methods:
        return print_methods(out)
    if path is None:
        raise DeltaError("inspect needs a PATH (adapter or model), or --methods to list the methods")
    res = inspect_path(path, task=task, method=method, options=_parse_opts(opt), trust_remote_code=trust_remote_code)
    out.done(res, lambda: print_inspect(out, res))


@app.command()
@_errors
def merge(
    adapter: str = typer.Option(..., help="Adapter directory (or run directory)."),
    output: str = typer.Option(..., help="Directory for the merged model (written atomically)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one recorded at training)."),
    task: Optional[str] = typer.Option(None),
    force: bool = typer.Option(False, help="Replace an existing output directory."),
    dtype: str = typer.Option("fp32", "--dtype", help="Stored weight type: fp32 | bf16 | fp16."),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors (a from_pretrained directory) | gguf "
                            "(one .gguf file for llama.cpp / ollama; Llama and Qwen2 causal LMs)."),
    trust_remote_code: bool = typer.Option(False),
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Fold the adapter into the base weights; the result loads with transformers' from_pretrained
    (with --format gguf: from_pretrained(dir, gguf_file=...), llama.cpp, ollama)."""
    out = Out(as_json)
    res = merge_adapter(adapter, output, model=model, task=task, force=force, trust_remote_code=trust_remote_code,
                        fmt=fmt, dtype=dtype)

    def human():
        out.log(f"merged {res['adapter']} into {res['base_model']} -> {res['output']} ({res['bytes'] / 1e6:.1f} MB, "
                f"{res['class']}, {res['format']} {res['dtype']}); max |merged - adapter| on a check batch: "
                f"{res['check_max_abs_diff']:.2e}")
        if "dtype_max_abs_diff" in res:
            out.log(f"stored as {res['dtype']}: max |{res['dtype']} - fp32| logits on the check batch: "
                    f"{res['dtype_max_abs_diff']:.2e}")
        if "gguf_max_abs_diff" in res:
            out.log(f"{res['files'][0]} read back with transformers' GGUF reader: max |gguf - merged| logits: "
                    f"{res['gguf_max_abs_diff']:.2e}")

    out.done(res, human)


@app.command()
@_errors
def demo(
    task: str = typer.Option("classify", help="classify (MiniLM-L6 + SMS spam) | causal-lm (SmolLM2-135M + chatterbot)."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default 100 classify, 40 causal-lm)."),
    output: Optional[str] = typer.Option(None, help="Output directory (default runs/demo or runs/demo-lm)."),
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
                    progress=progress, **kw)
    out.done(_summary(m), lambda: _print_run(out, m))


@app.command()
@_errors
def serve(
    model: str = typer.Option(..., help="Base model: a directory, a cached id or a .gguf file."),
    adapters: Optional[str] = typer.Option(None, help="Directory of adapters (one sub-directory each)."),
    task: str = typer.Option("causal-lm", help="causal-lm (POST /v1/generate) | classify (POST /v1/classify)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (default: loopback only)."),
    port: int = typer.Option(8000),
    window_ms: float = typer.Option(5.0, help="Batching window: wait this long for requests to batch together."),
    max_batch: int = typer.Option(16, help="Most requests in one model call."),
    max_new_tokens: int = typer.Option(256, help="Cap on max_new_tokens per request."),
    token_file: Optional[Path] = typer.Option(None, help="File holding the bearer token for adapter management "
                                                          "(default: env DELTATUNE_SERVE_TOKEN; none = disabled)."),
    api_key: Optional[str] = typer.Option(None, help="Bearer key every inference request must send (default: env "
                                                     "DELTATUNE_API_KEY, which keeps it out of `ps`; none = open)."),
    served_model_name: Optional[str] = typer.Option(None, help="The base model's name in the OpenAI API "
                                                               "(default: the model's file or directory name)."),
    max_input_tokens: int = typer.Option(1024, min=1, help="Longest prompt accepted, in tokens."),
    max_n: int = typer.Option(8, min=1, help="Most choices (prompts x n) per OpenAI request."),
    max_queue: int = typer.Option(256, min=0, help="Most requests waiting; more get 429 with Retry-After "
                                                   "(0 = no limit)."),
    device: str = typer.Option("cpu", help="auto | cpu | cuda | cuda:N | mps (auto: cuda, then mps, then cpu)."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16 | auto (auto measures: bf16 on CPU only when "
                                           "a bf16 matmul is at least as fast as fp32 here)."),
    quantize: Optional[str] = typer.Option(None, help="nf4 | int8: quantize the linear layers while loading."),
    batching: str = typer.Option("continuous", help="continuous (requests join the running batch at every "
                                                    "decoding step) | static (a batch decodes to its longest request)."),
    config: Optional[Path] = ConfigOpt,
):
    """HTTP server: one base model, many adapters, mixed batches, OpenAI-compatible API (see deltatune.serve)."""
    from ..serve.app import Placement, run  # lazy: the server needs the optional serve extra (fastapi, uvicorn)

    token = _read_token(token_file) if token_file else None
    _check_adapter_dir(adapters)
    placement = Placement(device, dtype, quantize)
    placement.check()  # before loading the model: a typo costs nothing
    if batching not in ("continuous", "static"):
        raise DeltaError(f"--batching {batching!r}: choose continuous or static")
    run(model, adapters, task=task, host=host, port=port, token=token, window_ms=window_ms, max_batch=max_batch,
        max_new_tokens=max_new_tokens, max_input_tokens=max_input_tokens, max_queue=max_queue, api_key=api_key,
        served_name=served_model_name, max_n=max_n, placement=placement, batching=batching)


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DeltaError(f"--token-file {path}: cannot read it ({getattr(e, 'strerror', None) or e}); "
                         "give a file holding the bearer token") from None
    if not token:
        raise DeltaError(f"--token-file {path} is empty; write the bearer token into it")
    return token


def _check_adapter_dir(adapters: str | None) -> None:
    """A mistyped --adapters path is an error, not a server with no adapters; a directory with no
    adapter in it starts the server but says so."""
    if adapters is None:
        return
    p = Path(adapters)
    if not p.is_dir():
        raise DeltaError(f"--adapters {p}: {'not a directory' if p.exists() else 'does not exist'}; give the "
                         "directory holding one sub-directory per adapter (written by dt.save / deltatune train)")
    if not any((d / CONFIG).exists() or (d / MANIFEST).exists() for d in p.iterdir() if d.is_dir()):
        sys.stderr.write(f"warning: --adapters {p} holds no adapter sub-directory yet; serving the base model "
                         "only (adapters saved there later can be loaded with POST /v1/adapters)\n")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: DeltaErrors become one line on stderr and exit status 2."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_threads(int(os.environ["DELTATUNE_THREADS"]) if os.environ.get("DELTATUNE_THREADS") else None)
    try:
        app(args=argv, standalone_mode=True)
    except DeltaError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
