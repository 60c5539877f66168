"""``deltatune serve``: checks the flags that cost nothing to check, then hands over to
``deltatune.serve`` (imported on first use: it needs the optional serve extra)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..core.delta import DeltaError
from ..storage.adapter import CONFIG, MANIFEST
from .options import ConfigOpt, one_line_errors


@one_line_errors
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
    calibrate: int = typer.Option(0, help="With --quantize nf4: calibrated block scales from N batches of 4 texts "
                                          "(the packaged general text, or --calibrate-data), 0 = absmax."),
    calibrate_data: Optional[str] = typer.Option(None, help="Text file for --calibrate (one text a line)."),
    batching: str = typer.Option("continuous", help="continuous (requests join the running batch at every "
                                                    "decoding step) | static (a batch decodes to its longest request)."),
    config: Optional[Path] = ConfigOpt,
):
    """HTTP server: one base model, many adapters, mixed batches, OpenAI-compatible API (see deltatune.serve)."""
    from ..serve.app import Placement, run  # lazy: the server needs the optional serve extra (fastapi, uvicorn)

    token = _read_token(token_file) if token_file else None
    _check_adapter_dir(adapters)
    placement = Placement(device, dtype, quantize, calibrate, calibrate_data)
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
