"""The real server on loopback (uvicorn on a thread, a free port), driven over HTTP: outputs equal
the library's per adapter, concurrent requests to different adapters share mixed batches, load and
unload while serving lose no request, auth, traversal names, bad bodies, metrics, OpenAPI."""
from __future__ import annotations

import concurrent.futures
import itertools

import pytest
import torch

import deltatune as dt
from conftest import tiny_bert_cls, tiny_llama, word_tokenizer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from deltatune.serve.app import ServerThread, build_app  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADAPTERS = ["a", "b", "c"]


def tokenizer():
    return word_tokenizer()


def perturbed(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_tensors(model, name).values():
            t.add_(torch.randn(t.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def adir(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    m = tiny_llama()
    for i, n in enumerate(ADAPTERS):
        torch.manual_seed(i)
        dt.attach(m, "lora", name=n, r=4)
        perturbed(m, n, 10 + i)
        dt.save(m, d / n, name=n)
    (d / "not_an_adapter").mkdir()
    return d


@pytest.fixture(scope="module")
def lm_server(adir):
    app = build_app(tiny_llama(), tokenizer(), adir, token=TOKEN, window_ms=60, max_new_tokens=32)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(adir):
    m = tiny_llama()
    for n in ADAPTERS:
        dt.load(m, adir / n, name=n)
    return m


def expected(ref, adapter, ids, new):
    x = torch.tensor([ids])
    with torch.no_grad():
        if adapter is None:
            with dt.disabled(ref):
                out = ref.generate(input_ids=x, max_new_tokens=new, do_sample=False, pad_token_id=0)
        else:
            dt.activate(ref, adapter)
            out = ref.generate(input_ids=x, max_new_tokens=new, do_sample=False, pad_token_id=0)
    toks = out[0, len(ids):].tolist()
    return toks[:toks.index(2)] if 2 in toks else toks


def prompt(i):
    return [3 + (7 * i + k) % 61 for k in range(3 + i % 4)]  # lengths 3..6: left padding in batches


def test_generate_equals_library_for_each_adapter(lm_server, reference):
    with httpx.Client(base_url=lm_server.url, timeout=60) as c:
        outs = set()
        for i, a in enumerate(ADAPTERS + [None]):
            r = c.post("/v1/generate", json={"adapter": a, "input_ids": prompt(i), "max_new_tokens": 6})
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == expected(reference, a, prompt(i), 6)
            outs.add(tuple(expected(reference, a, prompt(0), 6)))
        assert len(outs) > 1  # the adapters really differ
        r = c.post("/v1/generate", json={"adapter": "a", "prompt": "w1 w2 w3", "max_new_tokens": 4})
        ids = tokenizer()("w1 w2 w3")["input_ids"]
        assert r.json()["output_ids"] == expected(reference, "a", ids, 4)
        assert r.json()["text"] == tokenizer().decode(r.json()["output_ids"], skip_special_tokens=True)


def test_concurrent_requests_are_batched_and_correct(lm_server, reference):
    jobs = [(ADAPTERS[i % 3] if i % 4 else None, prompt(i), 3 + i % 4) for i in range(12)]

    def send(job):
        a, ids, new = job
        with httpx.Client(base_url=lm_server.url, timeout=60) as c:
            return c.post("/v1/generate", json={"adapter": a, "input_ids": ids, "max_new_tokens": new})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        rs = list(pool.map(send, jobs))
    for (a, ids, new), r in zip(jobs, rs):
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == expected(reference, a, ids, new), (a, ids)
    assert max(r.json()["batch_size"] for r in rs) > 1, "no two requests shared a batch"


def test_load_and_unload_while_serving_lose_no_request(lm_server, reference):
    stop = []

    def client(adapter):
        got = []
        with httpx.Client(base_url=lm_server.url, timeout=60) as c:
            for i in itertools.count():
                if (stop and i >= 4) or i >= 40:  # bounded
                    break
                r = c.post("/v1/generate", json={"adapter": adapter, "input_ids": prompt(i), "max_new_tokens": 3})
                got.append((i, r.status_code, r.json()))
        return got

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futs = {a: pool.submit(client, a) for a in ("a", "b", "c")}
        with httpx.Client(base_url=lm_server.url, timeout=60, headers=AUTH) as c:
            for _ in range(3):
                assert c.delete("/v1/adapters/c").status_code == 200
                assert "c" not in [x["name"] for x in c.get("/v1/adapters").json()["loaded"]]
                assert c.post("/v1/adapters", json={"name": "c"}).status_code == 201
            stop.append(True)
        results = {a: f.result() for a, f in futs.items()}
    for a in ("a", "b"):
        assert results[a] and all(s == 200 for _, s, _ in results[a])
        for i, _, body in results[a]:
            assert body["output_ids"] == expected(reference, a, prompt(i), 3)
    for i, s, body in results["c"]:  # c comes and goes: served correctly, or a clean 404
        assert s in (200, 404), body
        if s == 200:
            assert body["output_ids"] == expected(reference, "c", prompt(i), 3)


def test_mutations_need_the_token(lm_server, adir):
    with httpx.Client(base_url=lm_server.url, timeout=30) as c:
        assert c.post("/v1/adapters", json={"name": "c"}).status_code == 401
        assert c.delete("/v1/adapters/a").status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert c.post("/v1/adapters", json={"name": "c"}, headers=bad).status_code == 403
        assert c.delete("/v1/adapters/a", headers=bad).status_code == 403
        assert c.delete("/v1/adapters/a", headers={"Authorization": "Basic abc"}).status_code == 401
        assert "a" in [x["name"] for x in c.get("/v1/adapters").json()["loaded"]]
    app = build_app(tiny_llama(), None, adir, token="", load_all=False)  # no token configured: disabled
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/v1/adapters", json={"name": "a"}, headers=AUTH).status_code == 403


@pytest.mark.parametrize("name", ["../a", "a/../../etc", "..", ".", "a b", "", "/etc/passwd", "a" * 65, "a.b", 5, "a\n"])
def test_traversal_and_bad_names_are_400(lm_server, name):
    with httpx.Client(base_url=lm_server.url, timeout=30, headers=AUTH) as c:
        r = c.post("/v1/adapters", json={"name": name})
        assert r.status_code == 400, r.text
        if isinstance(name, str) and name:
            r = c.post("/v1/generate", json={"adapter": name, "input_ids": [3, 4]})
            assert r.status_code == 400, r.text


def test_traversal_in_the_url_is_400(lm_server):
    with httpx.Client(base_url=lm_server.url, timeout=30, headers=AUTH) as c:
        for raw in ("..%2F..%2Fetc", "a%2F..%2Fb", "%2E%2E", "a%00b", "a%0A", "a%0D%0A"):
            r = c.delete(f"/v1/adapters/{raw}")
            assert r.status_code == 400, (raw, r.status_code, r.text)
        assert "a" in [x["name"] for x in c.get("/v1/adapters").json()["loaded"]]  # "a\n" did not delete "a"


def test_bad_input_is_4xx_never_500(lm_server):
    cases = [
        ({"adapter": "nope", "input_ids": [3]}, 404),
        ({"adapter": "a"}, 400),  # no prompt
        ({"adapter": "a", "prompt": "w1", "input_ids": [3]}, 400),  # both
        ({"adapter": "a", "input_ids": []}, 400),
        ({"adapter": "a", "input_ids": [3, 999]}, 400),  # outside the vocabulary
        ({"adapter": "a", "input_ids": [3, -1]}, 400),
        ({"adapter": "a", "input_ids": [3], "max_new_tokens": 10_000}, 400),
        ({"adapter": "a", "input_ids": [3], "max_new_tokens": 0}, 422),
        ({"adapter": "a", "input_ids": "w1"}, 422),
        ({"adapter": "a", "input_ids": [3], "best_of": 2}, 422),  # unknown field
        ({"adapter": 7, "input_ids": [3]}, 422),
        ({"adapter": "a", "input_ids": [3] * 2000}, 413),
    ]
    with httpx.Client(base_url=lm_server.url, timeout=30) as c:
        for body, status in cases:
            r = c.post("/v1/generate", json=body)
            assert r.status_code == status, (body, r.status_code, r.text)
            assert "detail" in r.json()
        assert c.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/v1/generate", json=[1, 2]).status_code == 422
        assert c.post("/v1/classify", json={"adapter": "a", "input_ids": [3]}).status_code == 400  # an LM server
        with httpx.Client(base_url=lm_server.url, timeout=30, headers=AUTH) as ca:
            assert ca.post("/v1/adapters", json={"name": "zz"}).status_code == 404
            assert ca.post("/v1/adapters", json={"name": "not_an_adapter"}).status_code == 404
            assert ca.post("/v1/adapters", json={"name": "a"}).status_code == 409
            assert ca.delete("/v1/adapters/zz").status_code == 404
            assert ca.post("/v1/adapters", json={}).status_code == 422


def test_health_metrics_and_openapi(lm_server):
    with httpx.Client(base_url=lm_server.url, timeout=30) as c:
        c.post("/v1/generate", json={"adapter": "b", "input_ids": [3, 4], "max_new_tokens": 2})
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["task"] == "generate"
        m = c.get("/metrics")
        assert m.status_code == 200
        for needle in ('deltatune_requests_total{endpoint="/v1/generate",status="200"}',
                       "deltatune_request_seconds_bucket", "deltatune_batch_size_bucket",
                       'deltatune_adapter_requests_total{adapter="b"}', "deltatune_errors_total",
                       "deltatune_adapters_loaded"):
            assert needle in m.text, needle
        spec = c.get("/openapi.json").json()
        assert {"/v1/generate", "/v1/classify", "/v1/adapters", "/health", "/metrics"} <= set(spec["paths"])
        listing = c.get("/v1/adapters").json()
        assert {"a", "b", "c"} <= {x["name"] for x in listing["loaded"]}
        assert "not_an_adapter" not in listing["available"]


def test_classify_equals_library_with_per_adapter_heads(tmp_path):
    d = tmp_path / "cls"
    m = tiny_bert_cls()
    for i, n in enumerate(("pos", "neg")):
        torch.manual_seed(i)
        dt.attach(m, "lora", name=n, r=4)  # the head is trained too (modules_to_save="auto")
        perturbed(m, n, 20 + i)
        dt.save(m, d / n, name=n)
    ref = tiny_bert_cls()
    for n in ("pos", "neg"):
        dt.load(ref, d / n, name=n)
    app = build_app(tiny_bert_cls(), tokenizer(), d, window_ms=60)
    jobs = [("pos", [3, 4, 5]), ("neg", [6, 7]), (None, [8, 9, 10, 11]), ("pos", [12])]

    def send(job):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            return c.post("/v1/classify", json={"adapter": job[0], "input_ids": job[1]})

    with ServerThread(app) as srv, concurrent.futures.ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(send, jobs))
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.post("/v1/generate", json={"input_ids": [3]}).status_code == 400
    for (a, ids), r in zip(jobs, rs):
        assert r.status_code == 200, r.text
        with torch.no_grad():
            if a is None:
                with dt.disabled(ref):
                    logits = ref(torch.tensor([ids])).logits
            else:
                dt.activate(ref, a)
                logits = ref(torch.tensor([ids])).logits
        torch.testing.assert_close(torch.tensor(r.json()["scores"]), logits.softmax(-1)[0], atol=1e-5, rtol=1e-4)


def test_cli_serve_command(tmp_path, adir):
    """`deltatune serve` in a subprocess on a free loopback port: health, generation, clean stop."""
    import os
    import socket
    import subprocess
    import sys
    import time

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DELTATUNE_SERVE_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "DELTATUNE_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", "--model", str(model_dir), "--adapters",
                             str(adir), "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        r = httpx.post(url + "/v1/generate", json={"adapter": "b", "prompt": "w1 w2", "max_new_tokens": 3}, timeout=60)
        assert r.status_code == 200 and len(r.json()["output_ids"]) <= 3
        assert httpx.delete(url + "/v1/adapters/c", headers=AUTH, timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
