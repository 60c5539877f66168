"""Sampling in ``deltatune serve`` (POST /v1/generate with temperature > 0), on the real loopback
server of test_serve: a seeded answer equals ``model.generate(do_sample=True)`` under the same
seed, replays, and does not depend on what it was batched with; different seeds differ; greedy is
unchanged; repetition penalty and stop strings; bad settings are 422s naming the field."""
from __future__ import annotations

import concurrent.futures
import contextlib

import pytest
import torch

import deltatune as dt
from test_serve import adir, expected, lm_server, prompt, reference, tokenizer  # noqa: F401  (fixtures)

httpx = pytest.importorskip("httpx")
from deltatune.serve.engine import Job, RowSampler, Sampling  # noqa: E402

EOS = 2


def library(ref, adapter, ids, new, seed=None, **gen):
    """``ref.generate`` on this prompt alone; with ``seed``, after ``torch.manual_seed(seed)``."""
    ctx = dt.disabled(ref) if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        dt.activate(ref, adapter)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad(), ctx:
        out = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, pad_token_id=0, **gen)
    toks = out[0, len(ids):].tolist()
    return toks[:toks.index(EOS)] if EOS in toks else toks


def hf_kwargs(body: dict) -> dict:
    """The server's fields as transformers' generate arguments (its top_k default is 50: 0 = off here)."""
    if body.get("temperature", 0) == 0:
        return {"do_sample": False, "repetition_penalty": body.get("repetition_penalty", 1.0),
                "num_beams": body.get("num_beams", 1)}
    return {"do_sample": True, "temperature": body["temperature"], "top_k": body.get("top_k", 0),
            "top_p": body.get("top_p", 1.0), "repetition_penalty": body.get("repetition_penalty", 1.0),
            "seed": body["seed"]}


SAMPLED = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 8},
    {"temperature": 1.3, "top_p": 0.8},
    {"temperature": 2.0, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3},
]


def post(url, body):
    with httpx.Client(base_url=url, timeout=120) as c:
        return c.post("/v1/generate", json=body)


@pytest.mark.parametrize("settings", SAMPLED, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_seeded_sample_equals_library_and_replays(lm_server, reference, settings):
    for i, a in enumerate(["a", None]):
        body = {"adapter": a, "input_ids": prompt(i), "max_new_tokens": 10, "seed": 1234 + i, **settings}
        r1, r2 = post(lm_server.url, body), post(lm_server.url, body)
        assert r1.status_code == 200, r1.text
        assert r1.json()["output_ids"] == r2.json()["output_ids"]
        assert r1.json()["output_ids"] == library(reference, a, prompt(i), 10, **hf_kwargs(body))
        used = r1.json()["settings"]
        assert used["decoding"] == "sample" and used["seed"] == 1234 + i
        assert {k: used[k] for k in settings} == settings


def test_different_seeds_differ_and_a_drawn_seed_replays(lm_server, reference):
    body = {"adapter": "b", "input_ids": prompt(1), "max_new_tokens": 8, "temperature": 3.0}
    outs = [post(lm_server.url, {**body, "seed": s}).json()["output_ids"] for s in range(5)]
    assert outs == [library(reference, "b", prompt(1), 8, **hf_kwargs({**body, "seed": s})) for s in range(5)]
    assert len({tuple(o) for o in outs}) == 5  # deterministic: these seeds are fixed
    r = post(lm_server.url, body).json()  # no seed: the server draws one and reports it
    assert isinstance(r["settings"]["seed"], int)
    assert post(lm_server.url, {**body, "seed": r["settings"]["seed"]}).json()["output_ids"] == r["output_ids"]


def test_mixed_greedy_and_sampled_batches_are_each_correct(lm_server, reference):
    """Concurrent greedy, beam and sampled requests (several adapters, settings, lengths) share
    batches; every answer equals the library's run of that request alone."""
    jobs = []
    for i in range(16):
        body = {"adapter": ["a", "b", "c", None][i % 4], "input_ids": prompt(i), "max_new_tokens": 3 + i % 5}
        if i % 2:
            body.update(SAMPLED[i // 2 % len(SAMPLED)], seed=100 + i)
        elif i % 8 == 4:
            body.update(num_beams=2)
        jobs.append(body)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        rs = list(pool.map(lambda b: post(lm_server.url, b), jobs))
    for body, r in zip(jobs, rs):
        assert r.status_code == 200, r.text
        want = library(reference, body["adapter"], body["input_ids"], body["max_new_tokens"], **hf_kwargs(body))
        assert r.json()["output_ids"] == want, body
    assert max(r.json()["batch_size"] for r in rs) > 1, "no two requests shared a batch"
    assert any(r.json()["batch_size"] > 1 for b, r in zip(jobs, rs) if "seed" in b), "no sampled row was batched"


def test_greedy_is_unchanged_and_ignores_sampling_fields(lm_server, reference):
    body = {"adapter": "c", "input_ids": prompt(2), "max_new_tokens": 6}
    r = post(lm_server.url, {**body, "top_p": 0.5, "top_k": 3, "seed": 9})  # temperature 0: greedy
    assert r.json()["output_ids"] == expected(reference, "c", prompt(2), 6)
    assert r.json()["settings"] == {"decoding": "greedy", "max_new_tokens": 6, "num_beams": 1, "temperature": 0.0,
                                    "top_p": 1.0, "top_k": 0, "seed": None, "repetition_penalty": 1.0, "stop": []}
    assert r.json()["finish_reason"] in ("stop", "length")
    r = post(lm_server.url, {**body, "temperature": 1e-7, "seed": 9})  # below 1e-5: greedy, as in vLLM
    assert r.json()["output_ids"] == expected(reference, "c", prompt(2), 6)
    assert r.json()["settings"]["decoding"] == "greedy"


def test_repetition_penalty_equals_library(lm_server, reference):
    ids = [52, 27, 6, 40, 41]  # the base model's greedy continuation repeats tokens of this prompt
    plain = library(reference, None, ids, 12, do_sample=False)
    for extra in ({}, {"num_beams": 3}):
        body = {"adapter": None, "input_ids": ids, "max_new_tokens": 12, "repetition_penalty": 1.5, **extra}
        r = post(lm_server.url, body)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == library(reference, None, ids, 12, **hf_kwargs(body))
    assert post(lm_server.url, {"input_ids": ids, "max_new_tokens": 12, "repetition_penalty": 1.5}
                ).json()["output_ids"] != plain  # the penalty did something


def test_stop_strings_cut_the_text(lm_server, reference):
    tok = tokenizer()
    ids = tok("w1 w2 w3")["input_ids"]
    for extra in ({}, {"temperature": 1.5, "seed": 5}):
        body = {"adapter": "a", "prompt": "w1 w2 w3", "max_new_tokens": 12, **extra}
        full = library(reference, "a", ids, 12, **hf_kwargs(body))
        text = tok.decode(full, skip_special_tokens=True)
        stop = text.split()[3]  # a word of the output: the first place it occurs ends the text
        r = post(lm_server.url, {**body, "stop": ["zzz", stop]}).json()
        assert r["text"] == text[:text.index(stop)] and r["finish_reason"] == "stop"
        k = next(k for k in range(1, len(full) + 1) if stop in tok.decode(full[:k], skip_special_tokens=True))
        assert r["output_ids"] == full[:k]  # up to the token that completed the stop string
        assert post(lm_server.url, {**body, "stop": "zzz"}).json()["output_ids"] == full
    assert post(lm_server.url, {"input_ids": [3], "stop": "\n"}).status_code == 200


@pytest.mark.parametrize("bad, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 101}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": -3}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e-9}, "repetition_penalty"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"do_sample": True}, "temperature"),  # points to the rule
    ({"temperature": 0.5, "num_beams": 2}, "num_beams"),
])
def test_bad_sampling_settings_are_422_naming_the_field(lm_server, bad, field):
    r = post(lm_server.url, {"adapter": "a", "input_ids": [3, 4], **bad})
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"], r.json()


def test_bad_float_literals_are_422(lm_server):
    with httpx.Client(base_url=lm_server.url, timeout=30) as c:
        for lit in (b"NaN", b"Infinity", b"-Infinity"):
            r = c.post("/v1/generate", content=b'{"input_ids": [3], "temperature": ' + lit + b"}",
                       headers={"content-type": "application/json"})
            assert r.status_code == 422 and "temperature" in r.json()["detail"], r.text


def test_metrics_and_openapi_show_the_settings(lm_server):
    post(lm_server.url, {"input_ids": [3, 4], "max_new_tokens": 2, "temperature": 0.9, "seed": 1})
    post(lm_server.url, {"input_ids": [3, 4], "max_new_tokens": 2})
    with httpx.Client(base_url=lm_server.url, timeout=30) as c:
        text = c.get("/metrics").text
        spec = c.get("/openapi.json").json()
    for mode in ("greedy", "sample"):
        assert f'deltatune_generate_rows_total{{decoding="{mode}"}}' in text
    props = spec["components"]["schemas"]["GenerateIn"]["properties"]
    assert {"temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop"} <= set(props)
    assert {"settings", "finish_reason"} <= set(spec["components"]["schemas"]["GenerateOut"]["properties"])


def test_row_sampler_rows_are_independent():
    """Each row's token equals transformers' warpers + multinomial on that row alone under
    ``torch.manual_seed(seed)``, whatever the other rows and their left padding."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    rows = [([5, 6, 7], Sampling(0.8, 0.9, 10, 1.2, 11)), ([9], Sampling()),  # a greedy row stays as it was
            ([1, 2, 3, 4, 5, 6], Sampling(1.5, 1.0, 0, 1.0, 12)), ([4, 4], Sampling(0.5, 0.5, 3, 1.0, 13)),
            ([8, 9], Sampling(1.0, seed=14))]  # temperature 1, nothing cut: still sampled
    t = max(len(ids) for ids, _ in rows)
    jobs = [Job("generate", None, ids, 1, 1, s) for ids, s in rows]
    input_ids = torch.tensor([[0] * (t - len(ids)) + ids for ids, _ in rows])  # (B, T), left padded
    scores = torch.randn(len(rows), 50)  # (B, V)
    out = RowSampler(jobs, t)(input_ids, scores.clone())
    for i, (ids, s) in enumerate(rows):
        if s.temperature == 0:
            torch.testing.assert_close(out[i], scores[i])
            continue
        procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(s.repetition_penalty)]
                                    + ([TemperatureLogitsWarper(s.temperature)] if s.temperature != 1 else [])
                                    + ([TopKLogitsWarper(s.top_k)] if s.top_k else [])
                                    + ([TopPLogitsWarper(s.top_p)] if s.top_p < 1 else []))
        torch.manual_seed(s.seed)
        want = torch.multinomial(procs(torch.tensor([ids]), scores[i:i + 1]).softmax(-1), 1).item()
        assert out[i].argmax().item() == want and torch.isfinite(out[i]).sum() == 1
