"""IA3 and VeRA files are interchangeable with peft: ours load in peft and peft's load here,
with equal outputs (max abs diff <= 1e-5 in fp32)."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import MODELS, run
from test_invariants import perturb

peft = pytest.importorskip("peft")

IA3_CASES = {
    "llama-default": ("llama", {}),
    "gpt2-default-conv1d": ("gpt2", {}),
    "bert-default": ("bert", {}),
    "mlp-ff": ("mlp", dict(targets=["fc1", "fc2"], feedforward=["fc2"])),
    "conv2d-channels": ("conv", dict(targets=["c1", "c2"], feedforward=["c2"], modules_to_save=["head"])),
}
VERA_CASES = {
    "llama-qv": ("llama", dict(targets=["q_proj", "v_proj"], r=16)),
    "llama-all-linear": ("llama", dict(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"], r=8, projection_prng_key=7)),
    "gpt2-conv1d": ("gpt2", dict(targets=["c_attn", "c_fc"], r=8)),
    "bert-qv": ("bert", dict(targets=["query", "value"], r=8, d_initial=0.5)),
}


def _ours_in_peft(method, model_name, opts, tmp_path):
    model = dt.attach(MODELS[model_name][0](), method, **opts)
    perturb(model)
    y = run(model, model_name)
    dt.save(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(MODELS[model_name][0](), str(tmp_path)).eval()
    torch.testing.assert_close(run(pm, model_name), y, atol=1e-5, rtol=0)
    return model


def _peft_here(peft_cfg, model_name, tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(MODELS[model_name][0](), peft_cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    y = run(pm, model_name)
    pm.save_pretrained(str(tmp_path))
    model = dt.load(MODELS[model_name][0](), tmp_path)
    torch.testing.assert_close(run(model, model_name), y, atol=1e-5, rtol=0)
    return model


@pytest.mark.parametrize("case", list(IA3_CASES))
def test_ia3_ours_loads_in_peft(case, tmp_path):
    _ours_in_peft("ia3", *IA3_CASES[case], tmp_path)


@pytest.mark.parametrize("case", list(IA3_CASES))
def test_ia3_peft_loads_here(case, tmp_path):
    model_name, opts = IA3_CASES[case]
    kw = {}
    if "targets" in opts:
        kw = dict(target_modules=opts["targets"], feedforward_modules=opts["feedforward"])
    if "modules_to_save" in opts:
        kw["modules_to_save"] = opts["modules_to_save"]
    if model_name == "gpt2":
        kw["fan_in_fan_out"] = True
    _peft_here(peft.IA3Config(**kw), model_name, tmp_path)


@pytest.mark.parametrize("case", list(VERA_CASES))
def test_vera_ours_loads_in_peft(case, tmp_path):
    import json

    _ours_in_peft("vera", *VERA_CASES[case], tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_projection"] is False


@pytest.mark.parametrize("case,save_projection", [(c, True) for c in VERA_CASES] + [("llama-qv", False)])
def test_vera_peft_loads_here(case, save_projection, tmp_path):
    model_name, opts = VERA_CASES[case]
    kw = dict(target_modules=opts["targets"], r=opts["r"], save_projection=save_projection,
              projection_prng_key=opts.get("projection_prng_key", 0), d_initial=opts.get("d_initial", 0.1))
    if model_name == "gpt2":
        kw["fan_in_fan_out"] = True
    _peft_here(peft.VeraConfig(**kw), model_name, tmp_path)


def test_vera_file_projection_must_match_the_seed(tmp_path):
    import json

    pm = peft.get_peft_model(MODELS["llama"][0](), peft.VeraConfig(target_modules=["q_proj"], r=8))
    pm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["projection_prng_key"] = 1  # the stored A, B no longer follow from the seed
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(dt.DeltaError, match="projection stored in the file differs"):
        dt.load(MODELS["llama"][0](), tmp_path)


def test_vera_file_is_tiny(tmp_path):
    model = dt.attach(MODELS["llama"][0](), "vera", targets=["q_proj", "v_proj"], r=16)
    dt.save(model, tmp_path)
    n = sum(t.numel() for t in dt.adapter_tensors(model, "default").values())
    assert n == 2 * 2 * 16 + 2 * (32 + 16)  # 2 layers × (λ_d: r) + λ_b: out (q: 32, v: 16)
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < n * 4 + 2048
