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
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.delta import DeltaError, get_state
from .engine import MIN_TEMPERATURE, Engine, Job, ParamError, RequestError, Sampling, validate_ids
from .stream import TextStream
from ..api import _NAME_RE
from .openai_schemas import ChatIn, CompletionIn, LoadLoraIn, UnloadLoraIn, unsupported

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


class Logprobs:
    """One choice's logprobs in OpenAI's shape, from the engine's trace ((logprob, [(token, logprob)])
    per generated token), taken in pieces as a stream goes on (``offset``: where the next token's
    text starts, for completions' ``text_offset``)."""

    def __init__(self, tokenizer, chat: bool, k: int):
        self.tokenizer, self.chat, self.k, self.offset = tokenizer, chat, k, 0

    def take(self, ids: list[int], entries: list) -> dict | None:
        if not ids:
            return None
        piece = [self.tokenizer.decode([t]) for t in ids]
        alts = [[(self.tokenizer.decode([a]), v) for a, v in e[1]] for e in entries]
        if self.chat:
            return {"content": [{"token": p, "logprob": e[0], "bytes": list(p.encode()),
                                 "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())}
                                                  for a, v in alt]}
                                for p, e, alt in zip(piece, entries, alts)]}
        offsets = []
        for p in piece:
            offsets.append(self.offset)
            self.offset += len(p)
        return {"tokens": piece, "token_logprobs": [e[0] for e in entries],
                "top_logprobs": [dict(alt) for alt in alts] if self.k else None, "text_offset": offsets}


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
    from fastapi.responses import StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None:
        app.add_middleware(LegacyKeyGuard, key=key, paths=LEGACY_INFERENCE)
    bearer = HTTPBearer(auto_error=False)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    started = int(time.time())

    def api_key(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if key is not None and not _key_ok(key, f"Bearer {cred.credentials}" if cred else None):
            raise ParamError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")

    infer = APIRouter(route_class=_route_class(), dependencies=[Depends(api_key)], tags=["openai"])
    admin = APIRouter(route_class=_route_class(), dependencies=[Depends(admin_auth)], tags=["adapters"])

    # ------------------------------------------------------------------ request → jobs
    def adapter_of(name: str) -> str | None:
        if name == cfg.served_name:
            return None
        if name in get_state(model).adapters:
            return name
        raise ParamError(404, f"the model {name!r} does not exist: GET /v1/models lists the base "
                              f"({cfg.served_name!r}) and the loaded adapters", "model", "model_not_found")

    def about(e: RequestError, param: str) -> ParamError:  # OpenAI: 400 for a prompt too long, naming the field
        message = e.message.replace("max_new_tokens", "max_tokens").replace("'input_ids'", "token ids")
        return ParamError(400, f"{param}: {message}", param, "context_length_exceeded" if e.status == 413 else None)

    def accepted(body) -> str | None:
        """The checks that cost nothing, before any tokenizing: the server, the fields, the model."""
        if task != "generate":
            raise ParamError(400, "this server hosts a classifier: use /v1/classify")
        if tokenizer is None:
            raise ParamError(400, "the OpenAI endpoints need the server's tokenizer (to return text); this "
                                  "server has none: use /v1/generate with input_ids")
        unsupported(body)
        return adapter_of(body.model)

    def checked(ids: list[int], param: str) -> list[int]:
        try:
            validate_ids(ids, vocab, engine.cfg.max_input_tokens)
        except RequestError as e:
            raise about(e, param)
        return ids

    async def encode(text: str, param: str, special: bool = True) -> list[int]:
        """Tokenized off the event loop, after the engine's character and Unicode checks."""
        try:
            return checked(await engine.tokenize(text, special), param)
        except ParamError:
            raise
        except RequestError as e:
            raise about(e, param)

    def check_n(prompts: int, n: int) -> None:  # before any tokenizing: the count alone can be refused
        if prompts * n > cfg.max_n:
            raise ParamError(400, f"this request asks for {prompts * n} choices (prompts × n); this server "
                                  f"gives at most {cfg.max_n} per request", "n")

    async def prompts_of(body: "CompletionIn") -> list[list[int]]:
        p = body.prompt
        check_n(1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p), body.n)
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
            return [await encode(t, "prompt") for t in ([p] if isinstance(p, str) else p)]
        if not p:
            raise ParamError(400, "the prompt is empty", "prompt")
        lists = [p] if isinstance(p[0], int) else p
        return [checked(list(x), "prompt") for x in lists]

    async def chat_ids(body: "ChatIn") -> list[int]:
        check_n(1, body.n)
        if not getattr(tokenizer, "chat_template", None):
            raise ParamError(400, "this model's tokenizer has no chat template: use /v1/completions with a "
                                  "prompt you format yourself", "messages")
        msgs = [m.as_template_input() for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja's TemplateError (e.g. roles that must alternate), raised by the template
            raise ParamError(400, f"the model's chat template refused these messages: {e}", "messages")
        return await encode(text, "messages", special=False)

    def jobs_of(body, adapter: str | None, prompts: list[list[int]], max_tokens: int | None,
                default_max: int | None, logprobs: int | None, param: str) -> list[Job]:
        """One job per prompt × n.  ``default_max`` None: the server cap, or what the context leaves."""
        cap = engine.cfg.max_new_tokens
        if max_tokens is not None:
            new = max_tokens
        elif default_max is not None:
            new = min(default_max, cap)
        else:  # room left in the context after the longest prompt and the adapter's virtual tokens
            room = None if engine.context is None else \
                engine.context - max(map(len, prompts)) - engine.virtual_tokens(adapter)
            new = cap if room is None else max(1, min(cap, room))
        if new > cap:
            raise ParamError(400, f"max_tokens is at most {cap} on this server", "max_tokens")
        stops = tuple([body.stop] if isinstance(body.stop, str) else body.stop or ())
        t = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
        rp = body.repetition_penalty if body.repetition_penalty is not None else default_penalty
        jobs = []
        for ids in prompts:
            for i in range(body.n):
                if t < MIN_TEMPERATURE:
                    s = Sampling(repetition_penalty=rp, stop=stops)
                else:
                    seed = (body.seed + i) % 2**63 if body.seed is not None else secrets.randbelow(2**53)
                    s = Sampling(t, body.top_p if body.top_p is not None else 1.0, body.top_k or 0, rp, seed, stops)
                jobs.append(Job("generate", adapter, ids, new, 1, s, logprobs=logprobs))
            try:  # the model's context: prompt + max_tokens (+ a prompt/prefix adapter's virtual tokens)
                engine.check_length(jobs[-1])
            except RequestError as e:
                raise about(e, param)
        return jobs

    # ------------------------------------------------------------------ jobs → responses
    def usage(prompts: list[list[int]], jobs: list[Job]) -> dict:
        p, c = sum(map(len, prompts)), sum(len(j.result["output_ids"]) for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def finished(jobs: list[Job]) -> list[Job]:
        outs = await asyncio.gather(*engine.enqueue(jobs), return_exceptions=True)
        for o in outs:
            if isinstance(o, BaseException):
                raise o
        return outs

    def stream(jobs: list[Job], prompts: list[list[int]], head: dict, chat: bool, include_usage: bool):
        """SSE: a chunk per token of any choice as the engine decodes it, then each choice's final one."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, j in enumerate(jobs):
            j.on_token = lambda tok, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, tok))
        futures = engine.enqueue(jobs)  # a full queue is a 429 before any byte is sent
        for i, f in enumerate(futures):
            f.add_done_callback(lambda f, i=i: events.put_nowait((i, None)))
        texts = [TextStream(lambda t: tokenizer.decode(t, skip_special_tokens=True), j.sampling.stop) for j in jobs]
        lps = [Logprobs(tokenizer, chat, j.logprobs) if j.logprobs is not None else None for j in jobs]
        given = [0] * len(jobs)  # tokens whose logprobs were sent, per choice

        def chunk(i: int, text: str | None = None, reason: str | None = None, role: bool = False,
                  upto: list[int] | None = None) -> str:
            lp = None
            if lps[i] is not None and not role:  # the logprobs of the tokens received since the last chunk
                ids = texts[i].toks if upto is None else upto
                lp, given[i] = lps[i].take(ids[given[i]:], jobs[i].trace[given[i]:len(ids)]), len(ids)
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": reason}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        async def events_out():
            try:
                if chat:
                    for i in range(len(jobs)):
                        yield chunk(i, role=True)
                for _ in range(len(jobs)):
                    while True:
                        i, tok = await events.get()
                        if tok is not None:
                            if delta := texts[i].push(tok):
                                yield chunk(i, delta)
                            continue
                        f = futures[i]
                        if f.exception() is not None:  # after the headers: an error event, as OpenAI does
                            e = f.exception()
                            err = {"message": getattr(e, "message", str(e)), "type": "server_error", "param": None,
                                   "code": getattr(e, "status", 500)}
                            yield f"data: {json.dumps({'error': err})}\n\n"
                        else:
                            r = f.result().result
                            yield chunk(i, texts[i].finish(r["text"]) or None, r["finish_reason"], upto=r["output_ids"])
                        break
                if include_usage and all(f.exception() is None for f in futures):
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(prompts, jobs)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # a client that went away: its rows end at the next decoding step, queued ones never run
                for j, f in zip(jobs, futures):
                    j.cancelled = True
                    f.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no asyncio warning

        return StreamingResponse(events_out(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def logprobs_of(job: Job, chat: bool) -> dict | None:
        if job.logprobs is None:
            return None
        return Logprobs(tokenizer, chat, job.logprobs).take(job.result["output_ids"], job.result["logprobs"])

    # ------------------------------------------------------------------ endpoints
    def model_card(name: str, parent: str | None = None) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "deltatune",
                "root": name, "parent": parent}

    @infer.get("/v1/models")
    async def list_models():
        names = [n for n in list(get_state(model).adapters) if n != cfg.served_name]
        return {"object": "list", "data": [model_card(cfg.served_name)] +
                [model_card(n, cfg.served_name) for n in names]}

    @infer.get("/v1/models/{name}")
    async def retrieve_model(name: str):
        return model_card(name, None if adapter_of(name) is None else cfg.served_name)

    @infer.post("/v1/completions")
    async def completions(body: CompletionIn):
        adapter = accepted(body)
        prompts = await prompts_of(body)
        jobs = jobs_of(body, adapter, prompts, body.max_tokens, 16, body.logprobs, "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            return stream(jobs, prompts, head, False, bool(body.stream_options and body.stream_options.include_usage))
        done = await finished(jobs)
        choices = [{"index": i, "text": j.result["text"], "logprobs": logprobs_of(j, False),
                    "finish_reason": j.result["finish_reason"]} for i, j in enumerate(done)]
        return {**head, "choices": choices, "usage": usage(prompts, done)}

    @infer.post("/v1/chat/completions")
    async def chat_completions(body: ChatIn):
        adapter = accepted(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ParamError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        k = (body.top_logprobs or 0) if body.logprobs else None
        prompts = [await chat_ids(body)]
        cap = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        jobs = jobs_of(body, adapter, prompts, cap, None, k, "messages")  # None: OpenAI's default, all the room
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if body.stream
                else "chat.completion", "created": int(time.time()), "model": body.model}
        if body.stream:
            return stream(jobs, prompts, head, True, bool(body.stream_options and body.stream_options.include_usage))
        done = await finished(jobs)
        choices = [{"index": i, "message": {"role": "assistant", "content": j.result["text"]},
                    "logprobs": logprobs_of(j, True), "finish_reason": j.result["finish_reason"]}
                   for i, j in enumerate(done)]
        return {**head, "choices": choices, "usage": usage(prompts, done)}

    def lora_name(name: str) -> str:
        if not _NAME_RE.fullmatch(name):  # (fullmatch: "a\n" is no name)
            raise ParamError(400, f"lora_name: invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-'",
                             "lora_name")
        return name

    @admin.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraIn):
        name = lora_name(body.lora_name)
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
        return await unload_adapter(lora_name(body.lora_name))

    app.include_router(infer)
    app.include_router(admin)


__all__ = ["API_KEY_ENV", "LegacyKeyGuard", "Logprobs", "OpenAIConfig", "add_openai_routes", "error_response"]

