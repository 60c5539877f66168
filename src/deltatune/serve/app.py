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

import hmac
import logging
import os
import re
import secrets
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

from ..core.delta import DeltaError, get_state
from ..core.tasks import task_of
from .device import Placement, load_served
from .engine import (MAX_TEMPERATURE, MIN_TEMPERATURE, Engine, EngineConfig, Job, RequestError, Sampling,
                     validate_ids)
from .openai import OpenAIConfig, add_openai_routes
from .stream import EngineEvents
from ..api import _NAME_RE, delete
from ..models import configure_threads
from ..storage.adapter import CONFIG, MANIFEST, load

TOKEN_ENV = "DELTATUNE_SERVE_TOKEN"
log = logging.getLogger("deltatune.serve")
SERVE_MODES = {"classify": "classify", "causal-lm": "generate"}  # core.tasks task -> what the server does


def _task_of(model) -> str:
    mode = SERVE_MODES.get(task_of(model))
    if mode is not None:
        return mode
    return "generate" if callable(getattr(model, "generate", None)) else "classify"


def _valid_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):  # fullmatch: "$" would let "a\n" through
        raise RequestError(400, f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name


def _label(job: Job) -> str:
    return job.adapter or "(base)"


def _public(message: str, adapter_dir: Path | None) -> str:
    """``message`` without server paths: the adapter directory becomes relative, any other absolute
    path becomes <path> (messages shown to callers who may hold no token)."""
    if adapter_dir is not None:  # adapters are loaded from resolved paths (_adapter_path)
        root = str(adapter_dir.resolve())
        message = message.replace(root + os.sep, "").replace(root, "<adapters>")
    return re.sub(r"(?<![\w.<])/[^\s:;,'\"()]+", "<path>", message)


class Metrics(EngineEvents):
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("deltatune_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("deltatune_request_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("deltatune_batch_size", "requests per model call", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.adapters = Counter("deltatune_adapter_requests_total", "rows served per adapter", ["adapter"], registry=r)
        self.errors = Counter("deltatune_errors_total", "failed requests", ["endpoint", "status"], registry=r)
        self.loaded = Gauge("deltatune_adapters_loaded", "adapters loaded", registry=r)
        self.queue = Gauge("deltatune_queue_depth", "requests waiting", registry=r)
        self.decoding = Counter("deltatune_generate_rows_total", "generated rows per decoding mode",
                                ["decoding"], registry=r)
        self.prompt_tokens = Counter("deltatune_prompt_tokens_total", "prompt tokens per adapter", ["adapter"],
                                     registry=r)
        self.generated_tokens = Counter("deltatune_generated_tokens_total", "tokens generated per adapter "
                                        "(after cutting at EOS / stop strings)", ["adapter"], registry=r)
        seconds = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("deltatune_time_to_first_token_seconds", "arrival to first generated token "
                              "(queueing + prefill)", ["adapter"], registry=r, buckets=seconds)
        self.itl = Histogram("deltatune_inter_token_seconds", "time between a request's successive tokens",
                             ["adapter"], registry=r, buckets=(.001, .0025) + seconds[:-2])
        self.running = Gauge("deltatune_running_rows", "rows still decoding in the current model call", registry=r)

    def on_batch(self, jobs: list[Job]) -> None:
        self.batch.observe(len(jobs))
        for j in jobs:
            self.adapters.labels(_label(j)).inc()
            self.prompt_tokens.labels(_label(j)).inc(len(j.ids))
            if j.kind == "generate":
                self.decoding.labels("beam" if j.num_beams > 1 else j.sampling.decoding).inc()

    def on_token(self, job: Job, first: bool, gap: float) -> None:
        (self.ttft if first else self.itl).labels(_label(job)).observe(gap)

    def on_running(self, rows: int) -> None:
        self.running.set(rows)

    def on_done(self, job: Job) -> None:
        if job.kind == "generate":
            self.generated_tokens.labels(_label(job)).inc(len(job.result["output_ids"]))


def _available(adapter_dir: Path | None) -> list[str]:
    if adapter_dir is None or not adapter_dir.is_dir():
        return []
    return sorted(p.name for p in adapter_dir.iterdir()
                  if p.is_dir() and _NAME_RE.fullmatch(p.name) and ((p / CONFIG).exists() or (p / MANIFEST).exists()))


def _adapter_path(adapter_dir: Path | None, name: str) -> Path:
    if adapter_dir is None:
        raise RequestError(404, "this server has no adapter directory to load from")
    root = adapter_dir.resolve()
    p = (root / name).resolve()
    if p.parent != root:  # a symlink pointing elsewhere: refuse to leave the directory
        raise RequestError(400, f"adapter {name!r} resolves outside the adapter directory")
    if name not in _available(adapter_dir):
        raise RequestError(404, f"no adapter {name!r} in the adapter directory; available: {_available(adapter_dir)}")
    return p


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
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    adir = Path(adapter_dir) if adapter_dir is not None else None
    task = _task_of(model) if task == "auto" else {"causal-lm": "generate"}.get(task, task)
    if task not in ("generate", "classify"):
        raise DeltaError(f"serve: task must be 'causal-lm'/'generate', 'classify' or 'auto', got {task!r}")
    model.eval()
    metrics = Metrics()
    engine = Engine(model, tokenizer, EngineConfig(window_ms, max_batch, max_new_tokens, max_input_tokens,
                                                   max_prompt_chars, liveness_s, max_queue=max_queue,
                                                   batching=batching), events=metrics)
    # JSON escapes take at most 12 bytes a character (a \\uXXXX pair); ids at most 21 ("-1234567890123456789,")
    max_body = 12 * engine.max_chars + 21 * max_input_tokens + 65536
    failed: dict[str, str] = {}
    if load_all:
        for name in _available(adir):
            try:  # the same rules as POST /v1/adapters, and no adapter may stop the server from starting
                load(model, _adapter_path(adir, name), name=name)
            except Exception as e:  # noqa: BLE001
                msg = e.message if isinstance(e, RequestError) else str(e) if isinstance(e, DeltaError) \
                    else f"cannot be loaded ({type(e).__name__}: {e})"
                failed[name] = _public(msg, adir)
                log.warning("adapter %s not loaded: %s", name, msg)
    metrics.loaded.set(len(get_state(model).adapters))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    # the model's own repetition penalty (generation_config) stays the default, as generate() applies it
    penalty = float(getattr(getattr(model, "generation_config", None), "repetition_penalty", None) or 1.0)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="deltatune serve", version="1", lifespan=lifespan,
                  description="One base model, many adapters, mixed batches.")
    app.state.engine, app.state.metrics = engine, metrics
    bearer = HTTPBearer(auto_error=False)

    StopStr = Annotated[str, StringConstraints(min_length=1, max_length=256)]

    class GenerateIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        adapter: str | None = Field(None, description="adapter name; null = the bare base model")
        prompt: str | None = Field(None, description="text prompt (needs the server's tokenizer)")
        input_ids: list[int] | None = Field(None, description="token ids instead of a prompt")
        max_new_tokens: int = Field(16, ge=1)
        num_beams: int = Field(1, ge=1, le=8, description="beam search (greedy only: temperature 0)")
        temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                   description=f"0 (default; in fact < {MIN_TEMPERATURE:g}) = greedy; "
                                               "more = sample from softmax(logits / temperature)")
        top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                             description="nucleus sampling: keep the most likely tokens summing to top_p (1 = off)")
        top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
        seed: int | None = Field(None, ge=0, le=2**63 - 1,
                                 description="seed of this request's generator: same seed → same tokens; "
                                             "none = a fresh one, reported in the response")
        repetition_penalty: float | None = Field(None, ge=0.01, le=10, allow_inf_nan=False,
                                                 description="> 1 discourages repeating prompt/output tokens "
                                                             "(CTRL); default: the model's, else 1")
        stop: list[StopStr] | None = Field(None, max_length=8, description="end the text before the first "
                                           "of these strings (at most 8; one string is a list of one)")

        @field_validator("stop", mode="before")
        @classmethod
        def _one_stop(cls, v: Any) -> Any:
            return [v] if isinstance(v, str) else v

        @model_validator(mode="before")
        @classmethod
        def _no_do_sample(cls, data: Any) -> Any:
            if isinstance(data, dict) and "do_sample" in data:
                raise ValueError("there is no 'do_sample' field: 'temperature' > 0 samples, 0 (default) is greedy")
            return data

        @model_validator(mode="after")
        def _beams_are_greedy(self) -> "GenerateIn":
            if self.temperature >= MIN_TEMPERATURE and self.num_beams > 1:
                raise ValueError("'temperature' > 0 (sampling) needs 'num_beams' = 1")
            return self

    class SettingsOut(BaseModel):
        decoding: str = Field(description="greedy | sample | beam")
        max_new_tokens: int
        num_beams: int
        temperature: float
        top_p: float
        top_k: int
        seed: int | None = Field(description="the generator's seed (sampling only): send it again to replay")
        repetition_penalty: float
        stop: list[str]

    class GenerateOut(BaseModel):
        adapter: str | None
        text: str | None
        output_ids: list[int]
        finish_reason: str = Field(description="stop (EOS or a stop string) | length (max_new_tokens)")
        settings: SettingsOut = Field(description="the generation settings used")
        batch_size: int = Field(description="requests in the model call that served this one")

    class ClassifyIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        adapter: str | None = None
        text: str | None = None
        input_ids: list[int] | None = None

    class ClassifyOut(BaseModel):
        adapter: str | None
        label: int
        label_name: str | None
        scores: list[float]
        batch_size: int

    class LoadIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Any = Field(description="a sub-directory of the server's adapter directory")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        headers = {**({"WWW-Authenticate": "Bearer"} if e.status == 401 else {}), **(e.headers or {})}
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(DeltaError)
    async def _delta_error(request: Request, e: DeltaError):
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = [{"loc": list(x.get("loc", ())), "msg": x.get("msg", "")} for x in e.errors()]
        named = "; ".join(".".join(str(p) for p in x["loc"][1:]) + ": " + x["msg"] if len(x["loc"]) > 1
                          else x["msg"] for x in errs)  # e.g. "temperature: Input should be ..."
        return JSONResponse({"detail": f"invalid request body: {named}" if named else "invalid request body",
                             "errors": errs}, status_code=422)

    app.add_middleware(BodyLimit, limit=max_body)  # inside _measure (added next), so 413s are counted

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
        except Exception:  # noqa: BLE001 - a bug: answer 500 here, so the connection is kept open
            log.exception("request failed: %s %s", request.method, request.url.path)
            response = JSONResponse({"detail": "internal error; see the server log"}, status_code=500)
        finally:
            route = request.scope.get("route")
            ep = getattr(route, "path", "unmatched")
            metrics.requests.labels(ep, str(status)).inc()
            metrics.latency.labels(ep).observe(time.perf_counter() - t0)
            if status >= 400:
                metrics.errors.labels(ep, str(status)).inc()
        return response

    def auth(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            raise RequestError(403, f"adapter management is disabled: start the server with a token ({TOKEN_ENV})")
        if cred is None:
            raise RequestError(401, "missing 'Authorization: Bearer <token>' header")
        if not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise RequestError(403, "invalid token")

    async def job_of(kind: str, adapter: str | None, text: str | None, ids: list[int] | None, *args) -> Job:
        """The request's job, its prompt checked: characters, then tokens against the context."""
        if (text is None) == (ids is None):
            raise RequestError(400, "give exactly one of the text field or 'input_ids'")
        if text is not None:
            ids = await engine.tokenize(text)
        validate_ids(ids, vocab, engine.cfg.max_input_tokens)
        job = Job(kind, adapter, ids, *args)
        engine.check_length(job)
        return job

    def check(kind: str, adapter: str | None) -> None:
        if task != kind:
            other = {"generate": "/v1/generate", "classify": "/v1/classify"}[task]
            raise RequestError(400, f"this server hosts a {'causal LM' if task == 'generate' else 'classifier'}; "
                                    f"use {other}")
        if adapter is not None:
            _valid_name(adapter)
            if adapter not in get_state(model).adapters:
                raise RequestError(404, f"adapter {adapter!r} is not loaded; GET /v1/adapters lists them")

    async def run_job(job: Job) -> Job:
        metrics.queue.set(engine.depth())
        return await engine.submit(job)

    def sampling_of(body: GenerateIn) -> Sampling:
        stop = tuple(body.stop or ())
        if stop and tokenizer is None:
            raise RequestError(400, "'stop' needs the server's tokenizer: this server has none")
        rp = body.repetition_penalty if body.repetition_penalty is not None else penalty
        if body.temperature < MIN_TEMPERATURE:  # greedy: top_p, top_k, seed do not apply (as in vLLM and OpenAI)
            return Sampling(repetition_penalty=rp, stop=stop)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**53)  # exact in JSON numbers
        return Sampling(body.temperature, body.top_p, body.top_k, rp, seed, stop)

    @app.post("/v1/generate", response_model=GenerateOut, tags=["inference"])
    async def generate(body: GenerateIn):
        check("generate", body.adapter)
        if body.max_new_tokens > engine.cfg.max_new_tokens:
            raise RequestError(400, f"max_new_tokens is at most {engine.cfg.max_new_tokens} on this server")
        sampling = sampling_of(body)
        job = await run_job(await job_of("generate", body.adapter, body.prompt, body.input_ids,
                                         body.max_new_tokens, body.num_beams, sampling))
        settings = {"decoding": "beam" if body.num_beams > 1 else sampling.decoding,
                    "max_new_tokens": body.max_new_tokens, "num_beams": body.num_beams,
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                    "seed": sampling.seed, "repetition_penalty": sampling.repetition_penalty,
                    "stop": list(sampling.stop)}
        return {"adapter": body.adapter, "settings": settings, **job.result}

    @app.post("/v1/classify", response_model=ClassifyOut, tags=["inference"])
    async def classify(body: ClassifyIn):
        check("classify", body.adapter)
        job = await run_job(await job_of("classify", body.adapter, body.text, body.input_ids))
        return {"adapter": body.adapter, **job.result}

    def _listing() -> dict:
        st = get_state(model)
        loaded = [{"name": n, "method": r.method} for n, r in list(st.adapters.items())]
        names = {d["name"] for d in loaded}
        return {"loaded": loaded, "available": [n for n in _available(adir) if n not in names],
                "failed": dict(failed)}

    @app.get("/v1/adapters", tags=["adapters"])
    async def list_adapters():
        return await engine.admin(_listing)

    async def load_named(name: Any) -> dict:  # POST /v1/adapters, and vLLM's /v1/load_lora_adapter
        name = _valid_name(name)
        path = _adapter_path(adir, name)

        def do():
            if name in get_state(model).adapters:
                raise RequestError(409, f"adapter {name!r} is already loaded; DELETE it first to reload")
            try:
                load(model, path, name=name)
            except DeltaError as e:
                raise RequestError(422, f"adapter {name!r} cannot be loaded: {_public(str(e), adir)}")
            failed.pop(name, None)
            metrics.loaded.set(len(get_state(model).adapters))
            return {"name": name, "method": get_state(model).adapters[name].method}

        return await engine.admin(do)

    @app.post("/v1/adapters", status_code=201, dependencies=[Depends(auth)], tags=["adapters"])
    async def load_adapter(body: LoadIn):
        return await load_named(body.name)

    async def unload_named(name: Any) -> dict:  # DELETE /v1/adapters/{name}, and vLLM's /v1/unload_lora_adapter
        name = _valid_name(name)

        def do():
            if name not in get_state(model).adapters:
                raise RequestError(404, f"adapter {name!r} is not loaded")
            with warnings.catch_warnings():  # "was active, X is active now": requests route per row here
                warnings.simplefilter("ignore", UserWarning)
                delete(model, name)
            metrics.loaded.set(len(get_state(model).adapters))
            return {"deleted": name}

        return await engine.admin(do)

    @app.delete("/v1/adapters/{name:path}", dependencies=[Depends(auth)], tags=["adapters"])
    async def delete_adapter(name: str, request: Request):
        # the route's regex ends with "$", which drops a final newline: "a%0A" would match as "a"
        return await unload_named(request.scope["path"].split("/v1/adapters/", 1)[-1])

    @app.get("/health", tags=["ops"])
    async def health():
        late = engine.stuck_for()
        body = {"status": "stuck" if late else "ok", "task": task, "model": type(model).__name__,
                "adapters": len(get_state(model).adapters), "queue_depth": engine.depth()}
        if late:  # a load balancer should stop sending here; the detail says since when
            body["detail"] = (f"the model thread has been busy with one call for {late + liveness_s:.0f} s "
                              f"(liveness deadline {liveness_s:g} s)")
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics", tags=["ops"])
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.queue.set(engine.depth())
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_openai_routes(app, model, tokenizer, engine, openai or OpenAIConfig.default(model), task=task,
                      adapter_dir=adir, default_penalty=penalty, admin_auth=auth,
                      load_adapter=load_named, unload_adapter=unload_named)
    return app


class BodyLimit:
    """ASGI middleware refusing a request body over ``limit`` bytes (413) before the app reads it:
    by its Content-Length, or, for a chunked body, as soon as the bytes received pass the limit
    (the chunks are then replayed to the app), so a 10 MB prompt never reaches the JSON parser."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None:
            if size.isdigit() and int(size) > self.limit:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, n, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return None
            chunks.append(msg.get("body", b""))
            n, more = n + len(chunks[-1]), msg.get("more_body", False)
            if n > self.limit:
                return await self._refuse(scope, receive, send)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        from fastapi.responses import JSONResponse

        await JSONResponse({"detail": f"the request body is larger than this server accepts ({self.limit} bytes)"},
                           status_code=413)(scope, receive, send)


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
