"""Commands on finished artifacts: ``inspect`` (a model, an adapter, or the method list) and
``merge`` (fold an adapter into its base)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..app.tools import inspect_path, merge_adapter, print_inspect, print_methods
from ..core.delta import DeltaError
from .options import ConfigOpt, JsonOpt, Out, one_line_errors, parse_opts


@one_line_errors
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
    res = inspect_path(path, task=task, method=method, options=parse_opts(opt), trust_remote_code=trust_remote_code)
    out.done(res, lambda: print_inspect(out, res))


@one_line_errors
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
