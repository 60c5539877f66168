"""Property-based fuzzing of ``deltatune serve`` from its own OpenAPI schema (schemathesis): every
endpoint, valid and invalid bodies, against the real loopback server.  No answer is a 5xx, and
every 4xx says what is wrong (an OpenAI-shaped error names the field it is about).  Adapter
management is fuzzed with the token, on a server of its own."""
from __future__ import annotations

import pytest

from test_serve import TOKEN, adir, tokenizer  # noqa: F401

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from conftest import tiny_llama  # noqa: E402
from deltatune.serve.app import ServerThread, build_app  # noqa: E402
from deltatune.serve.openai import OpenAIConfig  # noqa: E402

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w60{% endif %}"


def app(adapter_dir=None):
    tok = tokenizer()
    tok.chat_template = TEMPLATE
    # small caps keep each fuzzed generation short
    return build_app(tiny_llama(), tok, adapter_dir, token=TOKEN, window_ms=1, max_new_tokens=4, max_input_tokens=48,
                     openai=OpenAIConfig(served_name="tiny", max_n=2))


# the schema is the app's own (the same whatever it serves); it is read at collection, the server runs per module
# (schemathesis' from_fixture cannot name tests under pytest 9)
schema = schemathesis.openapi.from_dict(app().openapi())


@pytest.fixture(scope="module")
def server(adir):  # noqa: F811
    with ServerThread(app(adir)) as srv:
        yield srv


def a_4xx_says_what_is_wrong(ctx, response, case) -> None:
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    if "error" in body:  # OpenAI's shape
        err = body["error"]
        assert err["message"] and err["type"], body
        assert err["param"] is None or err["param"] in err["message"], body
    else:
        assert isinstance(body.get("detail"), str) and body["detail"], body


@schema.parametrize()
# derandomize: the same inputs each run (CI stays reproducible; a new finding comes from a code change)
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_makes_a_5xx(case, server):
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and len(body["model"]) % 2:
        body["model"] = "a"  # half the random names become a loaded adapter: the fuzzed fields reach the engine
    # with the admin token: adapter management is fuzzed too (random names; this server's adapters only)
    response = case.call(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"})
    case.validate_response(response, checks=[not_a_server_error, a_4xx_says_what_is_wrong])
