"""The native inference and operations routes of ``deltatune serve``:

    POST /v1/generate   causal LMs: greedy, beam or sampled (seeded by the request) decoding
    POST /v1/classify   classifiers
    GET  /health        503 while the model thread is stuck (``liveness_s``)
    GET  /metrics       Prometheus

A request becomes one ``engine.Job``: its prompt checked by characters, then by tokens against the
model's context, before it is queued."""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time

import secrets

from ..core.delta import get_state
from .adapters import _valid_name
from .context import Served
from .engine import MIN_TEMPERATURE, Job, RequestError, Sampling, validate_ids
from .schemas import ClassifyIn, ClassifyOut, GenerateIn, GenerateOut


async def job_of(s: Served, kind: str, adapter: str | None, text: str | None, ids: list[int] | None, *args) -> Job:
    """The request's job, its prompt checked: characters, then tokens against the context."""
    if (text is None) == (ids is None):
        raise RequestError(400, "give exactly one of the text field or 'input_ids'")
    if text is not None:
        ids = await s.engine.tokenize(text)
    validate_ids(ids, s.vocab, s.engine.cfg.max_input_tokens)
    job = Job(kind, adapter, ids, *args)
    s.engine.check_length(job)
    return job


def check(s: Served, kind: str, adapter: str | None) -> None:
    """The endpoint fits the model, and the adapter (if any) is loaded."""
    if s.task != kind:
        other = {"generate": "/v1/generate", "classify": "/v1/classify"}[s.task]
        raise RequestError(400, f"this server hosts a {'causal LM' if s.task == 'generate' else 'classifier'}; "
                                f"use {other}")
    if adapter is not None:
        _valid_name(adapter)
        if adapter not in get_state(s.model).adapters:
            raise RequestError(404, f"adapter {adapter!r} is not loaded; GET /v1/adapters lists them")


async def run_job(s: Served, job: Job) -> Job:
    s.metrics.queue.set(s.engine.depth())
    return await s.engine.submit(job)


def sampling_of(s: Served, body: GenerateIn) -> Sampling:
    stop = tuple(body.stop or ())
    if stop and s.tokenizer is None:
        raise RequestError(400, "'stop' needs the server's tokenizer: this server has none")
    rp = body.repetition_penalty if body.repetition_penalty is not None else s.penalty
    if body.temperature < MIN_TEMPERATURE:  # greedy: top_p, top_k, seed do not apply (as in vLLM and OpenAI)
        return Sampling(repetition_penalty=rp, stop=stop)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**53)  # exact in JSON numbers
    return Sampling(body.temperature, body.top_p, body.top_k, rp, seed, stop)


def add_inference_routes(app, s: Served) -> None:
    @app.post("/v1/generate", response_model=GenerateOut, tags=["inference"])
    async def generate(body: GenerateIn):
        check(s, "generate", body.adapter)
        if body.max_new_tokens > s.engine.cfg.max_new_tokens:
            raise RequestError(400, f"max_new_tokens is at most {s.engine.cfg.max_new_tokens} on this server")
        sampling = sampling_of(s, body)
        job = await run_job(s, await job_of(s, "generate", body.adapter, body.prompt, body.input_ids,
                                            body.max_new_tokens, body.num_beams, sampling))
        settings = {"decoding": "beam" if body.num_beams > 1 else sampling.decoding,
                    "max_new_tokens": body.max_new_tokens, "num_beams": body.num_beams,
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                    "seed": sampling.seed, "repetition_penalty": sampling.repetition_penalty,
                    "stop": list(sampling.stop)}
        return {"adapter": body.adapter, "settings": settings, **job.result}

    @app.post("/v1/classify", response_model=ClassifyOut, tags=["inference"])
    async def classify(body: ClassifyIn):
        check(s, "classify", body.adapter)
        job = await run_job(s, await job_of(s, "classify", body.adapter, body.text, body.input_ids))
        return {"adapter": body.adapter, **job.result}


def add_ops_routes(app, s: Served) -> None:
    from fastapi.responses import JSONResponse, PlainTextResponse

    liveness_s = s.engine.cfg.liveness_s

    @app.get("/health", tags=["ops"])
    async def health():
        late = s.engine.stuck_for()
        body = {"status": "stuck" if late else "ok", "task": s.task, "model": type(s.model).__name__,
                "adapters": len(get_state(s.model).adapters), "queue_depth": s.engine.depth()}
        if late:  # a load balancer should stop sending here; the detail says since when
            body["detail"] = (f"the model thread has been busy with one call for {late + liveness_s:.0f} s "
                              f"(liveness deadline {liveness_s:g} s)")
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics", tags=["ops"])
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        s.metrics.queue.set(s.engine.depth())
        return PlainTextResponse(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["add_inference_routes", "add_ops_routes"]
