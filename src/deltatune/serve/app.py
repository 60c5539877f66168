"""``deltatune serve``: one base model, many adapters, one HTTP server (FastAPI + uvicorn).

    POST   /v1/generate           {"adapter": "a", "prompt": "...", "max_new_tokens": 32}  causal LMs
                                  + "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop"
    POST   /v1/classify           {"adapter": "b", "text": "..."}                          classifiers
    GET    /v1/adapters           loaded adapters, and those available in the adapter directory
    POST   /v1/adapters           {"name": "c"}   load ADAPTER_DIR/c            (bearer token)
    DELETE /v1/adapters/{name}    unload it                                   (bearer token)
    GET    /health, GET /metrics (Prometheus), GET /docs, GET /openapi.json
    GET    /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true = SSE)   OpenAI's API,
    POST   /v1/load_lora_adapter, /v1/unload_lora_adapter (bearer token)     ``model`` = adapter (serve_openai)

Requests for different adapters that arrive within ``window_ms`` of each other run as one mixed
batch (``deltatune.mixed``; see ``serve_engine``).  Decoding is greedy (``num_beams`` ≥ 1) unless
``temperature`` ≥ 1e-5, which samples (top-k, top-p) from the request's own generator, seeded by
``seed`` (drawn and reported when not given): neither a greedy nor a seeded answer depends on what
it was batched with, and a seed replays its answer.  Mutating endpoints need
``Authorization: Bearer <token>`` (``token=`` or the env var ``DELTATUNE_SERVE_TOKEN``): no
token configured → 403 (disabled), missing header → 401, wrong token → 403.  Adapter names are
1-64 of ``[A-Za-z0-9_-]`` (anything else, e.g. ``../x`` or ``a\n``, is a 400) and are only looked up
as direct children of the adapter directory (a symlink leaving it is refused, at start-up too).
Responses name adapters, never server paths.  A prompt is bounded by characters, then by the
model's context; a failing row fails alone; a broken adapter at start-up is listed under
``failed`` and the server starts; ``/health`` is 503 while the model thread is stuck (``liveness_s``).
Inference needs ``Authorization: Bearer <api key>`` when a key is configured
(``OpenAIConfig.api_key`` or env ``DELTATUNE_API_KEY``); more than ``max_queue`` waiting requests
are refused with 429 and ``Retry-After``.  Binds to 127.0.0.1 unless told otherwise.

    from .app import build_app, run
    run("path/to/model", "adapters/", task="causal-lm", port=8000)
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time

import logging
import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

from ..core.delta import DeltaError, get_state
from ..core.tasks import task_of
from .adapters import (TOKEN_ENV, _adapter_path, _available, _public, _valid_name, add_adapter_routes,  # noqa: F401
                       admin_auth, load_at_start, load_named, unload_named)
from .context import Served
from .device import Placement, load_served
from .engine import Engine, EngineConfig
from .metrics import Metrics
from .middleware import BodyLimit, add_error_handlers, add_measure
from .openai import OpenAIConfig, add_openai_routes
from .routes import add_inference_routes, add_ops_routes
from ..models import configure_threads

log = logging.getLogger("deltatune.serve")
SERVE_MODES = {"classify": "classify", "causal-lm": "generate"}  # core.tasks task -> what the server does


def _task_of(model) -> str:
    mode = SERVE_MODES.get(task_of(model))
    if mode is not None:
        return mode
    return "generate" if callable(getattr(model, "generate", None)) else "classify"


def build_app(model, tokenizer=None, adapter_dir: str | os.PathLike | None = None, *, token: str | None = None,
              task: str = "auto", window_ms: float = 5.0, max_batch: int = 16, max_new_tokens: int = 256,
              max_input_tokens: int = 1024, load_all: bool = True, max_prompt_chars: int | None = None,
              liveness_s: float = 300.0, max_queue: int = 256, openai: OpenAIConfig | None = None,
              batching: str = "continuous"):
    """A FastAPI app serving ``model`` (already on its device, eval mode) with the adapters found in
    ``adapter_dir`` (each a sub-directory written by ``dt.save``; loaded at start when ``load_all``;
    one that cannot be loaded is listed under ``failed`` in ``GET /v1/adapters``), and the
    OpenAI-compatible endpoints of ``serve_openai`` (configured by ``openai``).  ``batching``:
    "continuous" (rows join and leave the running batch at every decoding step, ``batching.py``)
    or "static" (a batch decodes to its longest request)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    task = _task_of(model) if task == "auto" else {"causal-lm": "generate"}.get(task, task)
    if task not in ("generate", "classify"):
        raise DeltaError(f"serve: task must be 'causal-lm'/'generate', 'classify' or 'auto', got {task!r}")
    model.eval()
    metrics = Metrics()
    engine = Engine(model, tokenizer, EngineConfig(window_ms, max_batch, max_new_tokens, max_input_tokens,
                                                   max_prompt_chars, liveness_s, max_queue=max_queue,
                                                   batching=batching), events=metrics)
    s = Served(model, tokenizer, engine, metrics, task,
               adapter_dir=Path(adapter_dir) if adapter_dir is not None else None,
               token=token if token is not None else os.environ.get(TOKEN_ENV) or None,
               # the model's own repetition penalty (generation_config) stays the default, as generate() applies it
               penalty=float(getattr(getattr(model, "generation_config", None), "repetition_penalty", None) or 1.0),
               vocab=getattr(getattr(model, "config", None), "vocab_size", None))
    if load_all:
        load_at_start(s)
    metrics.loaded.set(len(get_state(model).adapters))

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="deltatune serve", version="1", lifespan=lifespan,
                  description="One base model, many adapters, mixed batches.")
    app.state.engine, app.state.metrics = engine, metrics
    add_error_handlers(app)
    # JSON escapes take at most 12 bytes a character (a \\uXXXX pair); ids at most 21 ("-1234567890123456789,")
    max_body = 12 * engine.max_chars + 21 * max_input_tokens + 65536
    app.add_middleware(BodyLimit, limit=max_body)  # inside _measure (added next), so 413s are counted
    add_measure(app, metrics)
    auth = admin_auth(s.token)
    add_inference_routes(app, s)
    add_adapter_routes(app, s, auth)
    add_ops_routes(app, s)
    add_openai_routes(app, model, tokenizer, engine, openai or OpenAIConfig.default(model), task=task,
                      adapter_dir=s.adapter_dir, default_penalty=s.penalty, admin_auth=auth,
                      load_adapter=partial(load_named, s), unload_adapter=partial(unload_named, s))
    return app


class ServerThread:
    """Run an app with uvicorn on a background thread (tests, benchmarks, notebooks).

    >>> with ServerThread(app) as srv: httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="deltatune-serve")
        self.host = host

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("deltatune serve: the server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def run(base_model: str, adapter_dir: str | None = None, *, task: str = "causal-lm", host: str = "127.0.0.1",
        port: int = 8000, token: str | None = None, window_ms: float = 5.0, max_batch: int = 16,
        max_new_tokens: int = 256, threads: int | None = None, max_prompt_chars: int | None = None,
        liveness_s: float = 300.0, max_input_tokens: int = 1024, max_queue: int = 256, api_key: str | None = None,
        served_name: str | None = None, max_n: int = 8, placement: Placement = Placement(),
        batching: str = "continuous") -> None:
    """Load ``base_model`` (a directory, a cached id or a .gguf file) on ``placement``'s device, dtype
    and quantization (``serve/device.py``) and serve it until interrupted.  ``served_name`` is the base
    model's name in the OpenAI API (default: the file or directory name)."""
    import uvicorn

    configure_threads(threads)
    model, tok, where = load_served(base_model, task, placement)
    sys.stderr.write(f"deltatune serve: {where}\n")
    p = Path(base_model)
    name = served_name or (p.stem if p.suffix == ".gguf" else p.name) or "base"
    app = build_app(model, tok, adapter_dir, token=token, task=task, window_ms=window_ms, max_batch=max_batch,
                    max_new_tokens=max_new_tokens, max_prompt_chars=max_prompt_chars, liveness_s=liveness_s,
                    max_input_tokens=max_input_tokens, max_queue=max_queue, batching=batching,
                    openai=OpenAIConfig(served_name=name, api_key=api_key, max_n=max_n))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines", host)
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["TOKEN_ENV", "BodyLimit", "ServerThread", "build_app", "run"]
