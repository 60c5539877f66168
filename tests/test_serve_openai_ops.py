"""Operating the OpenAI-compatible server: tokens leave the batched ``generate`` call step by step,
a disconnected stream frees its row, API keys, the bounded queue (429 + Retry-After), vLLM's
adapter endpoints, and per-adapter Prometheus metrics (and the Grafana dashboard's queries)."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from test_serve import ADAPTERS, AUTH, TOKEN, adir, tokenizer  # noqa: F401

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from deltatune.serve.app import ServerThread, build_app  # noqa: E402
from deltatune.serve.engine import Engine, EngineConfig, Job, RequestError, Sampling  # noqa: E402
from deltatune.serve.openai import OpenAIConfig  # noqa: E402
from deltatune.serve.stream import EngineEvents  # noqa: E402

KEY = "sk-test-key"
DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"


def long_llama():
    """tiny_llama with room for long generations (the disconnect test) without length warnings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def server(adir):  # noqa: F811
    app = build_app(long_llama(), tokenizer(), adir, token=TOKEN, window_ms=10, max_new_tokens=600,
                    openai=OpenAIConfig(served_name="base", api_key=KEY))
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(url) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


class Recorder(EngineEvents):
    def __init__(self):
        self.tokens: list[tuple[Job, bool]] = []
        self.running: list[int] = []

    def on_token(self, job, first, gap):
        assert gap >= 0
        self.tokens.append((job, first))

    def on_running(self, rows):
        self.running.append(rows)


def test_tokens_reach_each_row_while_the_batch_decodes():
    """One mixed generate call (greedy and sampled rows, different lengths): every row's tokens are
    handed over one by one before the call returns, exactly the row's output and no more."""
    from conftest import tiny_llama

    events = Recorder()
    engine = Engine(tiny_llama(), tokenizer(), EngineConfig(), events=events)
    jobs = [Job("generate", None, [3, 4, 5], 3), Job("generate", None, [6, 7], 9, sampling=Sampling(1.0, seed=4)),
            Job("generate", None, [8, 9, 10, 11], 6)]
    seen: dict[int, list[tuple[int, bool]]] = {i: [] for i in range(3)}
    for i, j in enumerate(jobs):
        j.on_token = lambda tok, i=i, j=j: seen[i].append((tok, j.result is None))
    engine._generate(jobs)
    for i, j in enumerate(jobs):
        toks = [t for t, _ in seen[i]]
        assert toks == j.result["output_ids"], i  # (no stop strings here: the whole output, EOS excluded)
        assert all(before for _, before in seen[i]), "a token arrived after generate returned"
        n = sum(1 for job, _ in events.tokens if job is j)
        assert n == len(toks) + (j.result["finish_reason"] == "stop")  # an EOS is timed but not handed on
        assert sum(1 for job, first in events.tokens if job is j and first) == 1
    assert len(seen[0]) <= 3 and events.running[0] == 3 and events.running[-1] == 0


def test_a_full_queue_refuses_with_retry_after():
    async def go():
        engine = Engine(torch.nn.Linear(1, 1), None, EngineConfig(max_queue=2))
        engine.queue = asyncio.Queue()  # the batcher is not running: jobs stay queued
        engine.enqueue([Job("generate", None, [1]), Job("generate", None, [2])])
        with pytest.raises(RequestError) as e:
            engine.enqueue([Job("generate", None, [3])])
        assert engine.depth() == 2
        return e.value

    e = asyncio.run(go())
    assert e.status == 429 and e.headers == {"Retry-After": "1"} and "retry later" in e.message


def test_a_busy_server_answers_429_with_retry_after(server, client, monkeypatch):
    engine = server.app.state.engine
    monkeypatch.setattr(engine, "depth", lambda: engine.cfg.max_queue)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="a", prompt="w1", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    r = httpx.post(server.url + "/v1/generate", json={"input_ids": [3]}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_inference_needs_the_api_key(server, client):
    assert client.completions.create(model="a", prompt="w1", max_tokens=2, temperature=0).choices
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.response.json()["error"]["code"] == "invalid_api_key"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/generate"):
            r = c.post(path, json={})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        r = c.post("/v1/generate", json={"input_ids": [3], "max_new_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_api_key_from_the_environment(adir, monkeypatch):  # noqa: F811
    from conftest import tiny_llama

    monkeypatch.setenv("DELTATUNE_API_KEY", "sk-env")
    with ServerThread(build_app(tiny_llama(), tokenizer(), adir, load_all=False)) as srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer sk-env"})
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["base"]


def test_vllm_adapter_endpoints_are_the_token_protected_ones(server, client, adir):  # noqa: F811
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "c"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "c"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert "c" not in [m.id for m in client.models.list()]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="c", prompt="w1", max_tokens=2)
        for body, status, param in [({"lora_name": "c", "lora_path": "/tmp"}, 400, "lora_path"),
                                    ({"lora_name": "../c", "lora_path": str(adir / "c")}, 400, "lora_name"),
                                    ({"lora_name": "c\n"}, 400, "lora_name"),
                                    ({"lora_name": "../c"}, 400, "lora_name"),
                                    ({"lora_name": "c", "lora_path": "c\u0000"}, 400, "lora_path"),
                                    ({"lora_name": "zz"}, 404, None)]:
            r = c.post("/v1/load_lora_adapter", json=body, headers=AUTH)
            assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adir / "c")}, headers=AUTH)
        assert r.status_code == 200 and r.json()["name"] == "c", r.text
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "c"}, headers=AUTH).status_code == 409
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "zz"}, headers=AUTH).status_code == 404
    assert "c" in [m.id for m in client.models.list()]


def test_metrics_count_tokens_and_latency_per_adapter(server, client):
    before = metrics(server.url)
    r = client.completions.create(model="b", prompt="w1 w2 w3 w4", max_tokens=6, temperature=0)
    after = metrics(server.url)
    assert r.choices[0].finish_reason == "length"  # (so every generated token was a text token)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("deltatune_prompt_tokens_total", adapter="b") == r.usage.prompt_tokens
    assert delta("deltatune_generated_tokens_total", adapter="b") == r.usage.completion_tokens == 6
    assert delta("deltatune_time_to_first_token_seconds_count", adapter="b") == 1
    assert delta("deltatune_inter_token_seconds_count", adapter="b") == 5
    assert delta("deltatune_adapter_requests_total", adapter="b") == 1
    assert after[("deltatune_running_rows", ())] == 0 and ("deltatune_queue_depth", ()) in after


def test_grafana_dashboard_queries_only_served_metrics(server, client):
    client.completions.create(model="a", prompt="w1", max_tokens=2, temperature=0)
    served = {name for name, _ in metrics(server.url)}
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    import re

    used = {m for e in exprs for m in re.findall(r"deltatune_[a-z_]+", e)}
    assert used and used <= served, used - served


def test_a_disconnected_stream_frees_its_row(server):
    before = metrics(server.url)
    body = {"model": "base", "prompt": "w1 w2 w3", "max_tokens": 600, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got == 3:
                    break  # leave after three chunks: the connection closes
    key = ("deltatune_generated_tokens_total", (("adapter", "(base)"),))
    deadline = time.monotonic() + 60
    while True:  # until the request is finished and counted (its row ended, its tokens counted)
        after = metrics(server.url)
        if after.get(("deltatune_running_rows", ()), 0) == 0 and after.get(key, 0) > before.get(key, 0):
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    made = after[key] - before.get(key, 0)
    assert 3 <= made < 100, made  # stopped a step after the disconnect, not after 600 tokens


def test_text_stream_holds_back_what_could_still_become_a_stop_string():
    from deltatune.serve.stream import TextStream

    words = TextStream(lambda toks: " ".join(f"w{t}" for t in toks), ("w5 w6",))
    assert [words.push(t) for t in (4, 5)] == ["w4", " "]  # "w5" may start "w5 w6": held
    assert words.push(6) == "" and words.stopped and words.push(7) == ""  # the stop string: nothing of it is sent
    assert words.sent == "w4 " and words.finish("w4 ") == ""
    false_alarm = TextStream(lambda toks: " ".join(f"w{t}" for t in toks), ("w5 w6",))
    assert [false_alarm.push(t) for t in (5, 7)] == ["", "w5 w7"]  # held "w5" released once it cannot match
    utf8 = TextStream(lambda toks: bytes(toks).decode("utf-8", errors="replace"))
    assert [utf8.push(b) for b in "é!".encode()] == ["", "é", "!"]  # half a character is never sent


def test_a_rerun_batch_hands_no_token_on_twice():
    """A batch that fails and is run again (serve_engine runs failed batches apart) must not repeat
    a streamed token: the job remembers how many it handed on."""
    from conftest import tiny_llama

    engine = Engine(tiny_llama(), tokenizer(), EngineConfig())
    job = Job("generate", None, [3, 4, 5], 6, logprobs=1)
    got = []
    job.on_token = got.append
    engine._generate([job])
    first = list(got)
    engine._generate([job])  # the same job again, as a re-run would
    assert got == first == job.result["output_ids"] and len(job.trace) == len(first)


def test_a_failure_after_the_stream_began_is_an_error_event(server, client, monkeypatch):
    from deltatune.serve import batching as serve_batching
    from deltatune.serve import engine as serve_engine

    def boom(engine, *args):
        raise RuntimeError("boom")

    monkeypatch.setitem(serve_engine.RUNNERS, "generate", boom)  # static batches
    monkeypatch.setattr(serve_batching.RunningBatch, "_forward", boom)  # the continuous batch
    with pytest.raises(openai.APIError, match="internal error"):
        list(client.completions.create(model="a", prompt="w1", max_tokens=3, stream=True))
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        lines = [x for x in c.post("/v1/completions", json={"model": "a", "prompt": "w1", "stream": True}).text
                 .split("\n\n") if x]
    assert json.loads(lines[0].removeprefix("data: "))["error"]["type"] == "server_error"
    assert lines[-1] == "data: [DONE]"
