"""OpenAI-compatible endpoints for ``deltatune serve``: what the official ``openai`` client, chat UIs
and eval tools already speak, translated into the engine's jobs (``serve_engine.Job``).

    GET  /v1/models                 the base model (``OpenAIConfig.served_name``) and every loaded adapter
    POST /v1/completions            {"model": "<adapter or base>", "prompt": ..., "max_tokens": 16, ...}
    POST /v1/chat/completions       {"model": ..., "messages": [...]}  through the tokenizer's chat template
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}   vLLM's names for POST /v1/adapters   (admin token)
    POST /v1/unload_lora_adapter    {"lora_name"}                vLLM's names for DELETE /v1/adapters (admin token)

``model`` picks the adapter; each prompt × ``n`` choice is one job, so they batch with everything
else (mixed adapters, greedy and sampled rows together).  ``temperature`` (OpenAI's default 1) <
1e-5 is greedy; sampled choice i draws from its own generator seeded ``seed + i`` (a fresh seed
when none is given), so a seeded request replays and equals ``/v1/generate`` with that seed.
``top_k`` and ``repetition_penalty`` are accepted as extensions (vLLM's names, ``extra_body`` in
the client).  ``stream: true`` answers with Server-Sent Events, one chunk per decoded token (see
``serve_stream``), ``data: [DONE]`` last.  ``logprobs`` (completions: 0-5 alternatives; chat:
``logprobs: true`` + ``top_logprobs`` 0-20) are the model's log-softmax at each step, before the
request's temperature or top-k/top-p, as vLLM reports them.  Not supported, and refused with a
400 that says so: ``echo`` (so no prompt logprobs), ``suffix``, ``best_of`` > 1, nonzero
presence/frequency penalties, ``logit_bias``, tools and response formats.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the client
raises ``BadRequestError`` (400), ``AuthenticationError`` (401), ``NotFoundError`` (404),
``RateLimitError`` (429).  With an API key (``OpenAIConfig.api_key`` or env
``DELTATUNE_API_KEY``) every inference endpoint, ``/v1/generate`` and ``/v1/classify`` included,
needs ``Authorization: Bearer <key>``; ``/health``, ``/metrics`` and the adapter listing stay open,
and adapter management keeps its own token.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time

import asyncio
import hmac
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.delta import DeltaError, get_state
from .engine import Engine, Job, ParamError, RequestError
from .openai_jobs import OpenAIRequests
from .openai_schemas import ChatIn, CompletionIn, LoadLoraIn, UnloadLoraIn
from .openai_stream import Logprobs, logprobs_of, stream, usage
from ..api import _NAME_RE

API_KEY_ENV = "DELTATUNE_API_KEY"
# the endpoints an API key guards that serve.py defines (the ones defined here check it themselves)
LEGACY_INFERENCE = ("/v1/generate", "/v1/classify")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error"}


@dataclass
class OpenAIConfig:
    served_name: str = "base"  # the `model` value that means the bare base model (adapters use their names)
    api_key: str | None = None  # Bearer key for inference; None: env DELTATUNE_API_KEY, unset = open
    max_n: int = 8  # most choices (prompts × n) per request: each is a row in a batch

    @classmethod
    def default(cls, model) -> "OpenAIConfig":
        path = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
        return cls(served_name=Path(path).name if path.strip("/.") else "base")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None):
    from fastapi.responses import JSONResponse

    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _error_of(e: Exception):
    """The OpenAI-shaped response for an exception raised while handling a request."""
    from fastapi.exceptions import RequestValidationError

    if isinstance(e, RequestValidationError):  # e.g. "temperature: Input should be less than or equal to 100"
        errs = e.errors()
        loc = list(errs[0].get("loc", ())) if errs else []
        msgs = "; ".join(".".join(str(p) for p in x.get("loc", ())[1:]) + ": " + x.get("msg", "") for x in errs)
        return error_response(400, f"invalid request: {msgs}" if msgs else "invalid request body",
                              str(loc[1]) if len(loc) > 1 else None)  # the top-level field
    if isinstance(e, RequestError):
        headers = {**({"WWW-Authenticate": "Bearer"} if e.status == 401 else {}), **(e.headers or {})}
        return error_response(e.status, e.message, getattr(e, "param", None), getattr(e, "code", None), headers)
    return error_response(400, str(e))  # DeltaError


def _route_class():
    from fastapi.exceptions import RequestValidationError
    from fastapi.routing import APIRoute

    class OpenAIRoute(APIRoute):
        """Errors of these routes (validation, RequestError, DeltaError) in OpenAI's shape, leaving the
        app's handlers, and ``/v1/generate``'s ``{"detail"}`` errors, as they are."""

        def get_route_handler(self):
            handler = super().get_route_handler()

            async def handle(request):
                try:
                    return await handler(request)
                except (RequestValidationError, RequestError, DeltaError) as e:
                    return _error_of(e)

            return handle

    return OpenAIRoute


def _key_ok(key: str | None, authorization: str | None) -> bool:
    if key is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


class LegacyKeyGuard:
    """ASGI middleware: the API key on serve.py's own inference endpoints (their error shape)."""

    def __init__(self, app, key: str, paths: tuple[str, ...]):
        self.app, self.key, self.paths = app, key, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in self.paths:
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not _key_ok(self.key, auth):
                from fastapi.responses import JSONResponse

                r = JSONResponse({"detail": "missing or invalid API key: send 'Authorization: Bearer <key>'"},
                                 status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await r(scope, receive, send)
        await self.app(scope, receive, send)


def add_openai_routes(app, model, tokenizer, engine: Engine, cfg: OpenAIConfig, *, task: str,
                      adapter_dir: Path | None, default_penalty: float, admin_auth: Callable,
                      load_adapter: Callable, unload_adapter: Callable) -> None:
    """Register the endpoints above on ``app`` (built by ``serve.build_app``, which passes its own
    adapter load/unload endpoints and admin check for the vLLM aliases)."""
    from fastapi import APIRouter, Depends
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None:
        app.add_middleware(LegacyKeyGuard, key=key, paths=LEGACY_INFERENCE)
    bearer = HTTPBearer(auto_error=False)

    def api_key(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if key is not None and not _key_ok(key, f"Bearer {cred.credentials}" if cred else None):
            raise ParamError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")

    infer = APIRouter(route_class=_route_class(), dependencies=[Depends(api_key)], tags=["openai"])
    admin = APIRouter(route_class=_route_class(), dependencies=[Depends(admin_auth)], tags=["adapters"])
    requests = OpenAIRequests(model, tokenizer, engine, cfg, task, default_penalty)
    _add_model_routes(infer, requests, started=int(time.time()))
    _add_completion_routes(infer, requests)
    _add_lora_routes(admin, adapter_dir, load_adapter, unload_adapter)
    app.include_router(infer)
    app.include_router(admin)


async def finished(engine: Engine, jobs: list[Job]) -> list[Job]:
    """The jobs run (batched with whatever else is queued); the first failure is raised."""
    outs = await asyncio.gather(*engine.enqueue(jobs), return_exceptions=True)
    for o in outs:
        if isinstance(o, BaseException):
            raise o
    return outs


def _add_model_routes(infer, r: OpenAIRequests, started: int) -> None:
    """GET /v1/models: the base model (``served_name``) and every loaded adapter, its parent."""
    base = r.cfg.served_name

    def model_card(name: str, parent: str | None = None) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "deltatune",
                "root": name, "parent": parent}

    @infer.get("/v1/models")
    async def list_models():
        names = [n for n in list(get_state(r.model).adapters) if n != base]
        return {"object": "list", "data": [model_card(base)] + [model_card(n, base) for n in names]}

    @infer.get("/v1/models/{name}")
    async def retrieve_model(name: str):
        return model_card(name, None if r.adapter_of(name) is None else base)


def _add_completion_routes(infer, r: OpenAIRequests) -> None:
    engine, tokenizer = r.engine, r.tokenizer

    @infer.post("/v1/completions")
    async def completions(body: CompletionIn):
        adapter = r.accepted(body)
        prompts = await r.prompts_of(body)
        jobs = r.jobs_of(body, adapter, prompts, body.max_tokens, 16, body.logprobs, "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            return stream(engine, tokenizer, jobs, prompts, head, False,
                          bool(body.stream_options and body.stream_options.include_usage))
        done = await finished(engine, jobs)
        choices = [{"index": i, "text": j.result["text"], "logprobs": logprobs_of(tokenizer, j, False),
                    "finish_reason": j.result["finish_reason"]} for i, j in enumerate(done)]
        return {**head, "choices": choices, "usage": usage(prompts, done)}

    @infer.post("/v1/chat/completions")
    async def chat_completions(body: ChatIn):
        adapter = r.accepted(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ParamError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        k = (body.top_logprobs or 0) if body.logprobs else None
        prompts = [await r.chat_ids(body)]
        cap = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        jobs = r.jobs_of(body, adapter, prompts, cap, None, k, "messages")  # None: OpenAI's default, all the room
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if body.stream
                else "chat.completion", "created": int(time.time()), "model": body.model}
        if body.stream:
            return stream(engine, tokenizer, jobs, prompts, head, True,
                          bool(body.stream_options and body.stream_options.include_usage))
        done = await finished(engine, jobs)
        choices = [{"index": i, "message": {"role": "assistant", "content": j.result["text"]},
                    "logprobs": logprobs_of(tokenizer, j, True), "finish_reason": j.result["finish_reason"]}
                   for i, j in enumerate(done)]
        return {**head, "choices": choices, "usage": usage(prompts, done)}


def _lora_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):  # (fullmatch: "a\n" is no name)
        raise ParamError(400, f"lora_name: invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-'",
                         "lora_name")
    return name


def _add_lora_routes(admin, adapter_dir: Path | None, load_adapter: Callable, unload_adapter: Callable) -> None:
    """vLLM's names for POST /v1/adapters and DELETE /v1/adapters/{name} (the same admin token)."""

    @admin.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraIn):
        name = _lora_name(body.lora_name)
        if adapter_dir is not None and body.lora_path is not None:
            try:
                same = (adapter_dir / body.lora_path).resolve() == (adapter_dir / name).resolve()
            except (OSError, ValueError):  # e.g. a NUL byte in the path
                same = False
            if not same:
                raise ParamError(400, f"lora_path must be the adapter directory's {body.lora_name!r} "
                                      "(this server loads adapters only from its adapter directory, by name)",
                                 "lora_path")
        return await load_adapter(name)

    @admin.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoraIn):
        return await unload_adapter(_lora_name(body.lora_name))


__all__ = ["API_KEY_ENV", "LegacyKeyGuard", "Logprobs", "OpenAIConfig", "add_openai_routes", "error_response"]
