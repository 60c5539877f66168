"""Measuring commands: ``eval`` (one adapter or model on data), ``compare`` (several methods on one
budget) and ``importance`` (which layers matter for a task)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..app.importance_report import importance_report
from ..app.tools import compare_methods, evaluate_adapter
from ..tracking import parse_report_to
from .options import FORMAT_HELP, ConfigOpt, JsonOpt, Out, PackingOpt, QuantizeOpt, ReportToOpt, one_line_errors


@one_line_errors
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


@one_line_errors
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
    packing: Optional[bool] = PackingOpt,
    report_to: str = ReportToOpt,
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
             "--quantize": quantize, "--weights": weights, "--image-size": image_size, "--report-to": report_to}
    if packing is not None:  # a bare flag: compare_methods passes True as the flag alone
        extra["--packing" if packing else "--no-packing"] = True
    parse_report_to(report_to)  # a typo fails here, not once per method
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


@one_line_errors
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
