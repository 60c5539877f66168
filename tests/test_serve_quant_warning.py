"""serve: an adapter trained on a 4-bit base and served on a float one, or the reverse, is said
once on stderr when it loads and carries a "warning" in GET /v1/adapters (serve/adapters.py,
the same check as eval's: quant/load.base_mismatch on the manifest's base_model.quantization)."""
import logging
from types import SimpleNamespace

import pytest
import torch

import deltatune as dt
from conftest import tiny_llama

pytest.importorskip("bitsandbytes")
pytest.importorskip("fastapi")
from deltatune.serve.adapters import listing, load_at_start  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adir(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    for name, base in (("on_float", tiny_llama()), ("on_nf4", dt.quantize(tiny_llama(), "nf4"))):
        torch.manual_seed(0)
        dt.attach(base, "lora", name=name, r=4)
        dt.save(base, d / name, name=name)
    return d


@pytest.mark.parametrize("served,warned,line", [
    ("nf4", "on_float", "adapter on_float: adapter was trained on a float base and is served on a nf4 base; "
                        "metrics may differ from training (drop --quantize to match)"),
    (None, "on_nf4", "adapter on_nf4: adapter was trained on a nf4 base and is served on a float base; "
                     "metrics may differ from training (pass --quantize nf4 to match)"),
])
def test_mismatch_warned_at_load_and_listed(adir, caplog, served, warned, line):
    model = dt.quantize(tiny_llama(), served) if served else tiny_llama()
    s = SimpleNamespace(model=model, adapter_dir=adir, failed={})
    with caplog.at_level(logging.WARNING, logger="deltatune.serve"):
        load_at_start(s)
    assert [r.getMessage() for r in caplog.records] == [line]
    loaded = {a["name"]: a for a in listing(s)["loaded"]}
    assert loaded.keys() == {"on_float", "on_nf4"} and not s.failed
    assert loaded[warned]["warning"] == line.split(": ", 1)[1]
    other = ({"on_float", "on_nf4"} - {warned}).pop()
    assert "warning" not in loaded[other]
