"""Files are interchangeable with peft: our LoRA/DoRA directories load in peft and peft's load
here, with equal outputs (max abs diff <= 1e-5 in fp32)."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import MODELS, run
from test_invariants import perturb

peft = pytest.importorskip("peft")

CASES = {
    "llama-qv": ("llama", dict(targets=["q_proj", "v_proj"], r=4, alpha=8)),
    "llama-all-dora": ("llama", dict(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], dora=True)),
    "gpt2-conv1d-rslora": ("gpt2", dict(targets=["c_attn", "c_fc"], rslora=True, r=4)),
    "bert-rank-pattern": ("bert", dict(targets=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"value": 4.0})),
    "mlp-embedding": ("mlp", dict(targets=["emb", "fc1"])),
    "conv": ("conv", dict(targets=["c1", "c2"], modules_to_save=["head"])),
    "conv-dora": ("conv", dict(targets=["c1", "c2"], dora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ours_loads_in_peft(case, tmp_path):
    model_name, opts = CASES[case]
    model = dt.attach(MODELS[model_name][0](), "lora", **opts)
    perturb(model)
    y = run(model, model_name)
    dt.save(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(MODELS[model_name][0](), str(tmp_path)).eval()
    torch.testing.assert_close(run(pm, model_name), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_here(case, tmp_path):
    model_name, opts = CASES[case]
    o = dict(opts)
    kw = dict(target_modules=o.pop("targets"), r=o.pop("r", 8), lora_alpha=o.pop("alpha", 16),
              use_dora=o.pop("dora", False), use_rslora=o.pop("rslora", False),
              rank_pattern=o.pop("rank_pattern", {}), alpha_pattern=o.pop("alpha_pattern", {}),
              modules_to_save=o.pop("modules_to_save", None))
    assert not o
    torch.manual_seed(0)
    pm = peft.get_peft_model(MODELS[model_name][0](), peft.LoraConfig(**kw)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    y = run(pm, model_name)
    pm.save_pretrained(str(tmp_path))
    model = dt.load(MODELS[model_name][0](), tmp_path)
    torch.testing.assert_close(run(model, model_name), y, atol=1e-5, rtol=0)
