"""One bad request, row or adapter file never hurts anyone else (issue 15), on the real server:
prompts checked against the model's context and by characters before tokenizing, a failing row
re-run apart so its batch-mates still get their own answers, tokenizing off the event loop,
/health turning 503 on a stuck model thread, broken adapters at start-up listed (not fatal) with
no server paths in what unauthenticated callers see, and connections that survive a 4xx or 500."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import threading
import time

import pytest
import torch

import deltatune as dt
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama, word_tokenizer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from deltatune.serve.app import ServerThread, build_app  # noqa: E402
from test_serve import AUTH, TOKEN, adir, expected, lm_server, prompt, reference  # noqa: E402,F401 - fixtures

POISON = 63  # a token id the poisoned model refuses (prompt(i) for i < 8 never contains it)


class Poison:
    """A forward pre-hook that fails any pass containing POISON, as a model bug would, and records
    (tokens, poisoned?) of every pass of more than one position: a static batch's prompt pass
    (B, T), or a continuous batch's step, its rows' tokens flattened into (1, N)."""

    def __init__(self):
        self.passes: list[tuple[int, bool]] = []

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # static decoding steps feed (B, 1)
            bad = bool((ids == POISON).any())
            self.passes.append((ids.numel(), bad))
            if bad:
                raise RuntimeError("poisoned row")


class SlowTokenizer:
    """The word tokenizer, taking ``delay`` seconds per call and raising on the text "boom"."""

    def __init__(self, delay: float = 0.0):
        self.tok, self.delay, self.calls = word_tokenizer(), delay, 0

    def __call__(self, text, **kw):
        self.calls += 1
        time.sleep(self.delay)
        if text == "boom":
            raise RuntimeError("tokenizer bug")
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def send_all(url: str, jobs: list[tuple]) -> list:
    def send(job):
        a, ids, new = job
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/v1/generate", json={"adapter": a, "input_ids": ids, "max_new_tokens": new})

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(send, jobs))


# --------------------------------------------------------------------------- 1. context, isolation

def test_poisoned_row_fails_alone_and_its_batch_mates_equal_their_lone_runs(adir, reference):
    model, poison = tiny_llama(), Poison()
    model.register_forward_pre_hook(poison, with_kwargs=True)
    app = build_app(model, None, adir, window_ms=400, max_new_tokens=8)
    jobs = [(a, prompt(i), 4) for i, a in enumerate(["a", "b", None, "a", "c"])] + [("b", [5, POISON, 7], 4)]
    with ServerThread(app) as srv:
        rs = send_all(srv.url, jobs)
    for (a, ids, new), r in zip(jobs[:-1], rs[:-1]):
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == expected(reference, a, ids, new), (a, ids)
    assert rs[-1].status_code == 500 and "internal error" in rs[-1].json()["detail"]
    assert "poisoned row" not in rs[-1].text  # the exception's text stays in the server log
    # the poisoned prompt has 3 tokens: a pass of more shared them with other rows
    assert any(tokens > 3 and bad for tokens, bad in poison.passes), f"never batched with others: {poison.passes}"


def test_prompt_must_fit_the_models_context(tmp_path):
    """A 60-token prompt + 30 new tokens on a 64-position GPT-2 is a 413 naming the limit (it was a
    500 for its whole batch); the context counts max_new_tokens and a prompt adapter's tokens."""
    with TestClient(build_app(tiny_gpt2(), None, None, max_new_tokens=64)) as c:
        r = c.post("/v1/generate", json={"input_ids": [3] * 60, "max_new_tokens": 30})
        assert r.status_code == 413 and "64 positions" in r.json()["detail"] and "at most 34" in r.json()["detail"]
        assert c.post("/v1/generate", json={"input_ids": [3] * 60, "max_new_tokens": 4}).status_code == 200
        r = c.post("/v1/generate", json={"input_ids": [3], "max_new_tokens": 64})
        assert r.status_code == 400 and "no room" in r.json()["detail"]
    with TestClient(build_app(tiny_bert_cls(), None, None)) as c:
        r = c.post("/v1/classify", json={"input_ids": [3] * 65})
        assert r.status_code == 413 and "64 positions" in r.json()["detail"]
        assert c.post("/v1/classify", json={"input_ids": [3] * 64}).status_code == 200
    dt.save(dt.attach(tiny_llama(), "prompt", num_virtual_tokens=10, name="p"), tmp_path / "p", name="p")
    with TestClient(build_app(tiny_llama(), None, tmp_path, max_new_tokens=8)) as c:
        body = {"adapter": "p", "input_ids": [3] * 50, "max_new_tokens": 8}
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 413 and "10 virtual tokens" in r.json()["detail"] and "at most 46" in r.json()["detail"]
        assert c.post("/v1/generate", json={**body, "adapter": None}).status_code == 200


# --------------------------------------------------------------------------- 2. characters, event loop

def test_long_text_is_refused_by_characters_and_tokenizing_leaves_health_responsive():
    tok = SlowTokenizer(delay=2.0)
    app = build_app(tiny_llama(), tok, None, max_new_tokens=4)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(c.post, "/v1/generate", json={"prompt": "w1 w2", "max_new_tokens": 2})
            time.sleep(0.5)  # the tokenizer is now busy for 1.5 s more
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            waited = time.perf_counter() - t0
            assert slow.result().status_code == 200
        assert waited < 1.0, f"/health waited {waited:.1f} s for the tokenizer"
        calls = tok.calls
        r = c.post("/v1/generate", json={"prompt": "w1 " * 400, "max_new_tokens": 2})  # 1,200 characters; 64 positions x 16 = 1,024
        assert r.status_code == 413 and "1200 characters" in r.json()["detail"]
        r = c.post("/v1/generate", json={"prompt": "w1 " * 3_000_000, "max_new_tokens": 2})  # 9 MB: refused before it is read
        assert r.status_code == 413 and "request body" in r.json()["detail"]
        chunked = (b'{"prompt": "' + b"w1 " * 100_000 for _ in range(30))  # no Content-Length: refused while it streams
        r = c.post("/v1/generate", content=chunked, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "request body" in r.json()["detail"]
        assert tok.calls == calls, "the tokenizer saw a prompt over the limit"
        assert c.get("/health").status_code == 200


# --------------------------------------------------------------------------- 3. liveness, adapter files

def test_health_is_503_while_the_model_thread_is_stuck():
    model, gate = tiny_llama(), threading.Event()
    model.register_forward_pre_hook(lambda m, a, k: None if gate.wait(60) else None, with_kwargs=True)
    app = build_app(model, None, None, liveness_s=0.5)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(c.post, "/v1/generate", json={"input_ids": [3, 4], "max_new_tokens": 2})
            deadline = time.monotonic() + 20
            while (h := c.get("/health")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert h.status_code == 503 and h.json()["status"] == "stuck", h.text
            gate.set()
            assert stuck.result().status_code == 200
        assert c.get("/health").status_code == 200


def broken_adapters(tmp_path):
    """An adapter dir with a good 'a' and one of every kind of hostile adapter."""
    adir = tmp_path / "adapters"

    def lora(name, peft=True):
        d = dt.save(dt.attach(tiny_llama(), "lora", targets=["q_proj"], name=name), adir / name, name=name)
        if peft:
            (d / "deltatune.json").unlink()
        return d

    def config(name, text):
        (lora(name) / "adapter_config.json").write_text(text)

    lora("a", peft=False)
    d = lora("fifo", peft=False)  # verified path: the manifest lists the weights
    (d / "adapter_model.safetensors").unlink()
    os.mkfifo(d / "adapter_model.safetensors")
    d = lora("zero")
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.safetensors").symlink_to("/dev/zero")
    d = lora("leak")
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.safetensors").symlink_to("/etc/passwd")
    cfg = json.loads((lora("plain") / "adapter_config.json").read_text())
    for name, r in [("huge", 3_000_000), ("big", 1e9), ("vast", "1e30"), ("inf", "1e400")]:
        config(name, json.dumps({**cfg, "r": 0}).replace('"r": 0', f'"r": {r}'))
    config("deep", "[" * 100_000 + "]" * 100_000)
    dt.save(dt.attach(tiny_llama(), "lora", targets=["q_proj"], name="x"), tmp_path / "outside", name="x")
    (adir / "escape").symlink_to(tmp_path / "outside")
    return adir


def test_broken_adapters_at_start_up_are_listed_and_the_server_starts(tmp_path):
    adir = broken_adapters(tmp_path)
    built = []
    t = threading.Thread(target=lambda: built.append(build_app(tiny_llama(), None, adir, token=TOKEN)), daemon=True)
    t.start()
    t.join(120)
    assert built, "build_app hung or raised on a broken adapter"
    with TestClient(built[0]) as c:
        listing = c.get("/v1/adapters").json()
        assert sorted(x["name"] for x in listing["loaded"]) == ["a", "plain"]
        assert set(listing["failed"]) == {"fifo", "zero", "leak", "huge", "big", "vast", "inf", "deep", "escape"}
        text = json.dumps(listing)
        for secret in (str(tmp_path), str(tmp_path.resolve()), "/tmp", "/etc", "/dev"):
            assert secret not in text, f"{secret} leaked: {text}"
        assert "outside the adapter directory" in listing["failed"]["escape"]
        assert "not a regular file" in listing["failed"]["fifo"]
        assert "r=3000000" in listing["failed"]["huge"]
        r = c.post("/v1/adapters", json={"name": "leak"}, headers=AUTH)
        assert r.status_code == 422 and "outside the adapter directory" in r.text
        assert str(os.path.getsize("/etc/passwd")) not in r.text and "/etc" not in r.text
        assert c.get("/health").status_code == 200


# --------------------------------------------------------------------------- 6. surrogates, connections

def _raw(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None):
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **AUTH})
    r = conn.getresponse()
    return r.status, r.read().decode()


def test_lone_surrogate_is_400_and_connections_survive_errors(lm_server):
    host, port = lm_server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        status, text = _raw(conn, "POST", "/v1/generate", b'{"adapter": "a", "prompt": "w1 \\ud800 w2"}')
        assert status == 400 and "lone surrogate" in text, text
        sock = conn.sock
        status, text = _raw(conn, "POST", "/v1/generate", b'{"input_ids": [3], "stop": ["\\udfff"]}')
        assert status == 422 and "stop" in text, text  # pydantic refuses it in a constrained string
        assert _raw(conn, "GET", "/health")[0] == 200
        assert conn.sock is sock, "the server closed the connection after a 400"
    finally:
        conn.close()


def test_a_500_keeps_the_connection_open():
    app = build_app(tiny_llama(), SlowTokenizer(), None, max_new_tokens=4)
    with ServerThread(app) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            status, text = _raw(conn, "POST", "/v1/generate", b'{"prompt": "boom", "max_new_tokens": 2}')
            assert status == 500 and "tokenizer bug" not in text
            sock = conn.sock
            assert _raw(conn, "POST", "/v1/generate", b'{"prompt": "w1 w2", "max_new_tokens": 2}')[0] == 200
            assert conn.sock is sock, "the server closed the connection after a 500"
        finally:
            conn.close()
