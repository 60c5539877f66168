"""``deltatune serve --device/--dtype/--quantize`` (deltatune/serve/device.py): devices that do not exist and
unknown dtypes/schemes are one-line DeltaErrors (before the model loads); ``--dtype auto`` picks
bf16 on CPU only when the measured bf16 matmul is at least as fast as fp32; a tiny model loads in
bf16, or quantized (int8 / nf4 linear layers), and the server's answers equal the library's on
that same model."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from cli_fixtures import tiny_llama_dir
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from deltatune.serve import ServerThread, build_app  # noqa: E402
from deltatune.serve import device as serve_device  # noqa: E402
from deltatune.serve.device import Placement, load_served, pick_device, pick_dtype  # noqa: E402


@pytest.mark.parametrize("placement, message", [
    (Placement(dtype="float33"), "--dtype 'float33': choose one of auto, fp32, bf16, fp16"),
    (Placement(quantize="int3"), "--quantize 'int3': choose one of int8, nf4"),
])
def test_bad_dtype_or_scheme_is_one_line(placement, message):
    with pytest.raises(dt.DeltaError) as e:
        placement.check()
    assert str(e.value) == message


def test_devices_that_do_not_exist_are_refused():
    with pytest.raises(dt.DeltaError, match="is not a torch device; use auto, cpu"):
        pick_device("gpu0")
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(dt.DeltaError, match="no CUDA device is visible here .* use --device cpu"):
            pick_device("cuda")
        assert pick_device("auto").type in ("cpu", "mps")


def test_auto_dtype_on_cpu_follows_the_measurement(monkeypatch):
    speed = serve_device.bf16_speed(torch.device("cpu"), reps=1)
    assert speed > 0 and speed == speed  # a real, finite measurement
    monkeypatch.setattr(serve_device, "bf16_speed", lambda device: 0.02)  # no bf16 units: 50x slower
    assert pick_dtype("auto", torch.device("cpu")) == (torch.float32, "--dtype auto: a bf16 matmul ran 0.02x as "
                                                                      "fast as fp32 on this CPU")
    monkeypatch.setattr(serve_device, "bf16_speed", lambda device: 1.7)  # AMX
    assert pick_dtype("auto", torch.device("cpu"))[0] is torch.bfloat16
    assert pick_dtype("fp16", torch.device("cpu"))[0] is torch.float16


def served_answer(model, tok, ids, new=5):
    with ServerThread(build_app(model, tok, None, window_ms=1)) as srv:
        r = httpx.post(srv.url + "/v1/generate", json={"input_ids": ids, "max_new_tokens": new}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def library_answer(model, ids, new=5):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    toks = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    return toks[:toks.index(eos)] if eos in toks else toks


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_tiny_model_served_in_dtype(tmp_path, dtype):
    d = tiny_llama_dir(tmp_path / "m")
    model, tok, where = load_served(str(d), "causal-lm", Placement("cpu", dtype))
    assert where == f"LlamaForCausalLM on cpu, {'bfloat16' if dtype == 'bf16' else 'float32'} (--dtype {dtype})"
    assert {p.dtype for p in model.parameters()} == {serve_device.DTYPES[dtype]}
    ids = [5, 9, 12, 7]
    assert served_answer(model, tok, ids) == library_answer(model, ids)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_tiny_model_served_quantized(tmp_path, scheme):
    if scheme == "nf4":
        pytest.importorskip("bitsandbytes")
    d = tiny_llama_dir(tmp_path / "m")
    model, tok, _ = load_served(str(d), "causal-lm", Placement("cpu", "fp32", scheme))
    quantized = [m for m in model.modules() if isinstance(m, dt.quant.QuantLinear)]
    assert quantized and all(m.scheme == scheme for m in quantized)
    ref = dt.load_quantized(d, scheme)
    ids = [5, 9, 12, 7]
    assert served_answer(model, tok, ids) == library_answer(ref, ids)


def test_cli_refuses_bad_placement_before_loading(tmp_path):
    from typer.testing import CliRunner

    from deltatune import cli

    for argv, message in [(["--dtype", "half"], "--dtype 'half': choose one of"),
                          (["--quantize", "q4"], "--quantize 'q4': choose one of"),
                          (["--batching", "paged"], "--batching 'paged': choose continuous or static")]:
        r = CliRunner().invoke(cli.app, ["serve", "--model", str(tmp_path / "absent"), *argv])
        assert r.exit_code == 2 and r.output.strip().startswith("error: " + message), r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
