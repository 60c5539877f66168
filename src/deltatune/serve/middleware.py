"""What wraps every request of ``deltatune serve``: the error handlers (``RequestError`` → its
status, ``DeltaError`` → 400, a validation error → 422 naming the fields, each ``{"detail"}``), the
body-size limit (413 before the JSON parser sees a byte too many) and the per-endpoint request
metrics (a bug answers 500 and keeps the connection)."""
# no `from __future__ import annotations`: FastAPI reads the handler annotations at run time

import logging
import time

from ..core.delta import DeltaError
from .engine import RequestError
from .metrics import Metrics

log = logging.getLogger("deltatune.serve")


def add_error_handlers(app) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

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


def add_measure(app, metrics: Metrics) -> None:
    """Count and time every request by its route (a 4xx/5xx also as an error).  Added after
    ``BodyLimit``, so it runs outside it and counts the 413s too."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

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


__all__ = ["BodyLimit", "add_error_handlers", "add_measure"]
