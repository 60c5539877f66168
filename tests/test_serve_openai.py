"""The OpenAI-compatible endpoints of ``deltatune serve``, driven by the official ``openai`` client
against the real loopback server of test_serve: models.list, completions and chat completions with
and without streaming, ``model`` routing (output equals the library's greedy output for that
adapter), seeded sampling equal to the library's and replayable, stop strings, and errors raised
as the client's own exception classes."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from test_serve import ADAPTERS, TOKEN, adir, expected, lm_server, prompt, reference, tokenizer  # noqa: F401
from test_serve_sampling import library

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from conftest import tiny_llama  # noqa: E402
from deltatune.serve.app import ServerThread, build_app  # noqa: E402
from deltatune.serve.openai import OpenAIConfig  # noqa: E402

BASE = "tiny"
# a chat template the WordLevel test tokenizer can read: the messages' words, then "w60" as the cue
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w60{% endif %}"


def chat_tokenizer():
    t = tokenizer()
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(scope="module")
def server(adir):  # noqa: F811
    app = build_app(tiny_llama(), chat_tokenizer(), adir, token=TOKEN, window_ms=30, max_new_tokens=32,
                    openai=OpenAIConfig(served_name=BASE, max_n=4))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def text_of(ids):
    return tokenizer().decode(ids, skip_special_tokens=True)


def adapter_of(model):
    return None if model == BASE else model


def test_models_list_names_the_base_and_every_adapter(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == BASE and sorted(ids[1:]) == sorted(ADAPTERS)
    assert client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completions_route_to_the_named_adapter(client, reference):  # noqa: F811
    outs = set()
    for i, model in enumerate(ADAPTERS + [BASE]):
        text_in = " ".join(f"w{k}" for k in prompt(i))
        ids = tokenizer()(text_in)["input_ids"]
        r = client.completions.create(model=model, prompt=text_in, max_tokens=6, temperature=0)
        want = expected(reference, adapter_of(model), ids, 6)
        assert r.choices[0].text == text_of(want), model
        assert r.choices[0].finish_reason == ("length" if len(want) == 6 else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
        assert r.model == model and r.object == "text_completion"
        outs.add(r.choices[0].text)
    assert len(outs) > 1  # the adapters really differ
    # token-id prompts, and several prompts in one request (choices in prompt order)
    r = client.completions.create(model="b", prompt=[prompt(0), prompt(1)], max_tokens=4, temperature=0)
    assert [c.text for c in r.choices] == [text_of(expected(reference, "b", prompt(k), 4)) for k in (0, 1)]


def test_chat_goes_through_the_chat_template(client, reference):  # noqa: F811
    messages = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w7 w8 w9"}]
    ids = chat_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer()(ids, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer().convert_tokens_to_ids("w60")
    for model in ("c", BASE):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0)
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == text_of(expected(reference, adapter_of(model), ids, 5))
        assert r.usage.prompt_tokens == len(ids)


def test_streaming_sends_token_chunks_that_add_up(client):
    body = {"model": "a", "prompt": "w1 w2 w3", "max_tokens": 8, "temperature": 0}
    whole = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert len([t for t in texts if t]) == whole.usage.completion_tokens  # one chunk per token (one word each)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices

    messages = [{"role": "user", "content": "w3 w4"}]
    whole = client.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


def test_seeded_sampling_equals_the_library_and_replays(client, reference):  # noqa: F811
    ids = tokenizer()("w4 w5 w6")["input_ids"]
    body = {"model": "a", "prompt": "w4 w5 w6", "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 2}
    r1 = client.completions.create(**body)
    r2 = client.completions.create(**body)
    assert [c.text for c in r1.choices] == [c.text for c in r2.choices]
    for i, c in enumerate(r1.choices):  # choice i draws from a generator seeded seed + i
        want = library(reference, "a", ids, 8, seed=11 + i, do_sample=True, temperature=1.0, top_k=0)
        assert c.text == text_of(want), i
    assert r1.choices[0].text != r1.choices[1].text
    streamed = list(client.completions.create(**body, stream=True))  # two choices interleaved in one stream
    for i, c in enumerate(r1.choices):
        assert "".join(x.choices[0].text for x in streamed if x.choices[0].index == i) == c.text
    top_k = client.completions.create(**{**body, "n": 1}, extra_body={"top_k": 3}).choices[0].text
    assert top_k == text_of(library(reference, "a", ids, 8, seed=11, do_sample=True, temperature=1.0, top_k=3))


def test_stop_strings_end_the_text(client):
    body = {"model": "c", "prompt": "w9 w10", "max_tokens": 12, "temperature": 0}
    full = client.completions.create(**body).choices[0].text
    stop = full.split()[2]  # a word of the output: its first occurrence ends the text
    r = client.completions.create(**body, stop=["zzz", stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**body, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, error, param", [
    ({"model": "nope"}, "NotFoundError", "model"),
    ({"max_tokens": 10_000}, "BadRequestError", "max_tokens"),
    ({"n": 5}, "BadRequestError", "n"),
    ({"n": 2, "prompt": ["w1"] * 3}, "BadRequestError", "n"),
    ({"temperature": -1}, "BadRequestError", "temperature"),
    ({"top_p": 0}, "BadRequestError", "top_p"),
    ({"stop": [""]}, "BadRequestError", "stop"),
    ({"logprobs": 6}, "BadRequestError", "logprobs"),
    ({"echo": True}, "BadRequestError", "echo"),
    ({"presence_penalty": 0.5}, "BadRequestError", "presence_penalty"),
    ({"prompt": "w1 " * 2000}, "BadRequestError", "prompt"),
    ({"prompt": "w1 " * 40, "max_tokens": 30}, "BadRequestError", "prompt"),  # 41 + 30 > the model's 64 positions
    ({"prompt": [3, 999]}, "BadRequestError", "prompt"),
    ({"prompt": []}, "BadRequestError", "prompt"),
    ({"extra_body": {"frobnicate": 1}}, "BadRequestError", "frobnicate"),
])
def test_bad_requests_are_openai_errors_naming_the_field(client, kwargs, error, param):
    body = {"model": "a", "prompt": "w1", "max_tokens": 2, **kwargs}
    with pytest.raises(getattr(openai, error)) as e:
        client.completions.create(**body)
    err = e.value.response.json()["error"]
    assert err["param"] == param and err["message"] and err["type"], err
    if param == "prompt" and len(body["prompt"]) > 100:
        assert err["code"] == "context_length_exceeded"


def test_chat_default_max_tokens_is_the_room_the_context_leaves(client):
    words = " ".join(f"w{3 + k % 50}" for k in range(50))  # 50 tokens + the cue: 13 of the 64 positions left
    r = client.chat.completions.create(model="a", messages=[{"role": "user", "content": words}], temperature=0)
    assert r.usage.prompt_tokens == 51 and 1 <= r.usage.completion_tokens <= 13
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_errors(client, lm_server):  # noqa: F811
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="a", messages=[])
    with pytest.raises(openai.BadRequestError, match="text"):  # an image part
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "w1"}], frequency_penalty=1)
    with pytest.raises(openai.BadRequestError, match="needs logprobs"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "w1"}], top_logprobs=2)
    no_template = openai.OpenAI(base_url=lm_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        no_template.chat.completions.create(model="a", messages=[{"role": "user", "content": "w1"}])


def test_cli_serve_speaks_openai(tmp_path, adir):  # noqa: F811
    """`deltatune serve` in a subprocess with an API key from the environment, a served name, a cap
    on n: the openai client lists, chats (the saved tokenizer's chat template) and is refused."""
    import os
    import socket
    import subprocess
    import sys
    import time

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DELTATUNE_API_KEY": "sk-cli", "HF_HUB_OFFLINE": "1", "DELTATUNE_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", "--model", str(model_dir), "--adapters",
                             str(adir), "--port", str(port), "--served-model-name", "tiny", "--max-n", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                ids = [m.id for m in c.models.list()]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        assert ids[0] == "tiny" and sorted(ids[1:]) == sorted(ADAPTERS)
        r = c.chat.completions.create(model="a", messages=[{"role": "user", "content": "w1 w2"}], max_tokens=3)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens <= 3
        with pytest.raises(openai.BadRequestError, match="at most 2"):
            c.completions.create(model="tiny", prompt="w1", n=3)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-no", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(30)


def model_logprobs(ref, adapter, ids, out):
    """(len(out), V) log-softmax of ``ref`` (``adapter`` active) at each step of ``out`` after ``ids``."""
    dt.activate(ref, adapter)
    with torch.no_grad():
        logits = ref(torch.tensor([ids + out])).logits[0]  # (T, V)
    return logits.float().log_softmax(-1)[len(ids) - 1:len(ids) - 1 + len(out)]  # row k predicts out[k]


def test_logprobs_are_the_models_before_sampling(client, reference):  # noqa: F811
    ids = tokenizer()("w2 w3 w4")["input_ids"]
    for settings in ({"temperature": 0}, {"temperature": 1.5, "seed": 3}):  # a sampled row: still the model's
        r = client.completions.create(model="a", prompt="w2 w3 w4", max_tokens=5, logprobs=3, **settings)
        out = tokenizer()(r.choices[0].text)["input_ids"]
        lps, lp = model_logprobs(reference, "a", ids, out), r.choices[0].logprobs
        assert lp.tokens == [tokenizer().decode([t]) for t in out]
        torch.testing.assert_close(torch.tensor(lp.token_logprobs), lps[range(len(out)), out], atol=1e-4, rtol=0)
        top = lps.topk(3)
        for k, alts in enumerate(lp.top_logprobs):
            assert list(alts) == [tokenizer().decode([t]) for t in top.indices[k].tolist()]
            torch.testing.assert_close(torch.tensor(list(alts.values())), top.values[k], atol=1e-4, rtol=0)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.choices[0].text != client.completions.create(model="a", prompt="w2 w3 w4", max_tokens=5,
                                                          temperature=0).choices[0].text  # it did sample
    chunks = list(client.completions.create(model="a", prompt="w2 w3 w4", max_tokens=5, logprobs=3, stream=True,
                                            **settings))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs

    messages = [{"role": "user", "content": "w7 w8"}]
    r = client.chat.completions.create(model="b", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer().decode([t]) for t in
                                          tokenizer()(r.choices[0].message.content)["input_ids"]]
    assert all(c.logprob == c.top_logprobs[0].logprob and len(c.top_logprobs) == 2 for c in content)  # greedy
