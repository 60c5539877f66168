"""QLoRA on the real packaged SmolLM2-135M-Instruct: stream it into NF4, train LoRA on
chatterbot-corpus dialogue pairs for a few steps, and check the held-out loss goes down; then the
adapter works on the fp32 base too.  Slow (real model, ~1 min)."""
from __future__ import annotations

import random

import pytest
import torch

import deltatune as dt
from deltatune.fast import enable_checkpointing

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.usefixtures("one_thread")]
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from deltatune.app.demo import chatterbot_pairs, smollm2_gguf
    from deltatune.models import gguf_to_fp32

    try:
        d = gguf_to_fp32(smollm2_gguf())  # cached fp32 directory (~20 s the first time)
        pairs = chatterbot_pairs()
    except dt.DeltaError as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    return d, AutoTokenizer.from_pretrained(str(d)), pairs


def batch(tok, pairs, max_len=48):
    text = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                    tokenize=False) for q, a in pairs]
    enc = tok(text, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {**enc, "labels": labels}


@torch.no_grad()
def loss_on(model, b):
    model.eval()
    return model(**b).loss.item()


def test_qlora_smollm2_instruction_tuning(smollm2, tmp_path):
    d, tok, pairs = smollm2
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rng = random.Random(0)
    rng.shuffle(pairs)
    held, train = batch(tok, pairs[:16]), pairs[16:16 + 96]
    model = dt.load_quantized(d, "nf4")
    n_quant = sum(isinstance(m, dt.quant.NF4Linear) for m in model.modules())
    assert n_quant == 30 * 7  # every projection of the 30 blocks; embeddings/lm_head stay float
    dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    enable_checkpointing(model)  # QLoRA's memory recipe, on the quantized base
    before = loss_on(model, held)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for i in range(0, len(train), 8):
        model.train()
        loss = model(**batch(tok, train[i:i + 8])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_on(model, held)
    assert after < before - 0.05, (before, after)
    dt.save(model, tmp_path / "qlora")

    # the same adapter on the fp32 base: close to the quantized result, far from the untrained base
    from transformers import AutoModelForCausalLM

    fp32 = dt.load(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32), tmp_path / "qlora")
    on_fp32 = loss_on(fp32, held)
    assert on_fp32 < before - 0.05, (before, after, on_fp32)
