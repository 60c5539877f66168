"""Adapter management of ``deltatune serve``: names (1-64 of ``[A-Za-z0-9_-]``) looked up only as
direct children of the adapter directory, the bearer-token check, loading at start-up (a broken
adapter is listed under ``failed``, the server still starts), and the routes

    GET    /v1/adapters           loaded, available and failed adapters (open); a loaded adapter trained
                                  on the other kind of base (4-bit vs float) carries a "warning"
    POST   /v1/adapters           {"name": "c"}   load ADAPTER_DIR/c        (bearer token)
    DELETE /v1/adapters/{name}    unload it                                (bearer token)

``load_named`` / ``unload_named`` also serve vLLM's ``/v1/(un)load_lora_adapter`` (``openai.py``).
Messages name adapters, never server paths (``_public``)."""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time

import hmac
import json
import logging
import os
import re
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable

from ..core import model_state
from ..core.delta import DeltaError, get_state
from .context import Served
from .engine import RequestError
from .schemas import LoadIn
from ..api import _NAME_RE, delete
from ..quant.load import base_mismatch
from ..storage.adapter import CONFIG, MANIFEST, load

TOKEN_ENV = "DELTATUNE_SERVE_TOKEN"
log = logging.getLogger("deltatune.serve")


def _valid_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):  # fullmatch: "$" would let "a\n" through
        raise RequestError(400, f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name


def _public(message: str, adapter_dir: Path | None) -> str:
    """``message`` without server paths: the adapter directory becomes relative, any other absolute
    path becomes <path> (messages shown to callers who may hold no token)."""
    if adapter_dir is not None:  # adapters are loaded from resolved paths (_adapter_path)
        root = str(adapter_dir.resolve())
        message = message.replace(root + os.sep, "").replace(root, "<adapters>")
    return re.sub(r"(?<![\w.<])/[^\s:;,'\"()]+", "<path>", message)


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


def quantization_warning(s: Served, name: str) -> str | None:
    """One line when adapter ``name`` (in the adapter directory) was trained on a 4-bit base and is
    served on a float one or the reverse (its manifest's ``base_model.quantization``), else None."""
    if s.adapter_dir is None:
        return None
    try:
        man = json.loads((s.adapter_dir / name / MANIFEST).read_text(encoding="utf-8"))
        recorded = (man.get("base_model") or {}).get("quantization")
    except (OSError, ValueError, AttributeError):  # no manifest (a peft directory): nothing recorded
        return None
    served = (model_state.get(s.model, model_state.QUANT) or {}).get("scheme")
    return base_mismatch(recorded, served, use="served")


def _warn_loaded(s: Served, name: str) -> None:
    msg = quantization_warning(s, name)
    if msg:
        log.warning("adapter %s: %s", name, msg)


def load_at_start(s: Served) -> None:
    """Every adapter of the directory, by the same rules as POST /v1/adapters; one that fails is
    recorded in ``s.failed`` (and logged), as no adapter may stop the server from starting."""
    for name in _available(s.adapter_dir):
        try:
            load(s.model, _adapter_path(s.adapter_dir, name), name=name)
            _warn_loaded(s, name)
        except Exception as e:  # noqa: BLE001
            msg = e.message if isinstance(e, RequestError) else str(e) if isinstance(e, DeltaError) \
                else f"cannot be loaded ({type(e).__name__}: {e})"
            s.failed[name] = _public(msg, s.adapter_dir)
            log.warning("adapter %s not loaded: %s", name, msg)


def admin_auth(token: str | None) -> Callable:
    """The FastAPI dependency guarding adapter management: no token configured → 403 (disabled),
    missing header → 401, wrong token → 403 (compared in constant time)."""
    from fastapi import Depends
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    bearer = HTTPBearer(auto_error=False)

    def auth(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            raise RequestError(403, f"adapter management is disabled: start the server with a token ({TOKEN_ENV})")
        if cred is None:
            raise RequestError(401, "missing 'Authorization: Bearer <token>' header")
        if not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise RequestError(403, "invalid token")

    return auth


def listing(s: Served) -> dict:
    st = get_state(s.model)
    loaded = [{"name": n, "method": r.method, **({"warning": w} if (w := quantization_warning(s, n)) else {})}
              for n, r in list(st.adapters.items())]
    names = {d["name"] for d in loaded}
    return {"loaded": loaded, "available": [n for n in _available(s.adapter_dir) if n not in names],
            "failed": dict(s.failed)}


async def load_named(s: Served, name: Any) -> dict:  # POST /v1/adapters, and vLLM's /v1/load_lora_adapter
    name = _valid_name(name)
    path = _adapter_path(s.adapter_dir, name)

    def do():  # on the model thread (engine.admin): never while a batch runs
        if name in get_state(s.model).adapters:
            raise RequestError(409, f"adapter {name!r} is already loaded; DELETE it first to reload")
        try:
            load(s.model, path, name=name)
        except DeltaError as e:
            raise RequestError(422, f"adapter {name!r} cannot be loaded: {_public(str(e), s.adapter_dir)}")
        s.failed.pop(name, None)
        s.metrics.loaded.set(len(get_state(s.model).adapters))
        _warn_loaded(s, name)
        return {"name": name, "method": get_state(s.model).adapters[name].method}

    return await s.engine.admin(do)


async def unload_named(s: Served, name: Any) -> dict:  # DELETE /v1/adapters/{name}, and vLLM's /v1/unload_lora_adapter
    name = _valid_name(name)

    def do():
        if name not in get_state(s.model).adapters:
            raise RequestError(404, f"adapter {name!r} is not loaded")
        with warnings.catch_warnings():  # "was active, X is active now": requests route per row here
            warnings.simplefilter("ignore", UserWarning)
            delete(s.model, name)
        s.metrics.loaded.set(len(get_state(s.model).adapters))
        return {"deleted": name}

    return await s.engine.admin(do)


def add_adapter_routes(app, s: Served, auth: Callable) -> None:
    from fastapi import Depends, Request

    @app.get("/v1/adapters", tags=["adapters"])
    async def list_adapters():
        return await s.engine.admin(partial(listing, s))

    @app.post("/v1/adapters", status_code=201, dependencies=[Depends(auth)], tags=["adapters"])
    async def load_adapter(body: LoadIn):
        return await load_named(s, body.name)

    @app.delete("/v1/adapters/{name:path}", dependencies=[Depends(auth)], tags=["adapters"])
    async def delete_adapter(name: str, request: Request):
        # the route's regex ends with "$", which drops a final newline: "a%0A" would match as "a"
        return await unload_named(s, request.scope["path"].split("/v1/adapters/", 1)[-1])


__all__ = ["TOKEN_ENV", "add_adapter_routes", "admin_auth", "listing", "load_at_start", "load_named", "unload_named"]
