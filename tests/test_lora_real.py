"""Slow: LoRA on the real pretrained MiniLM-L6 + SMS spam beats the untrained head."""
import pytest

import deltatune as dt
from real_data import accuracy, minilm_classifier, sms_spam, train_steps


@pytest.mark.slow
@pytest.mark.heavy  # minutes on a real model: `make test`, not CI
@pytest.mark.parametrize("opts", [{}, {"dora": True}])
def test_lora_learns_sms_spam(opts, tmp_path):
    model, tok = minilm_classifier()
    train, test = sms_spam()
    before = accuracy(model, test, tok)
    dt.attach(model, "lora", **opts)
    train_steps(model, train, tok, steps=24, lr=2e-3)
    after = accuracy(model, test, tok)
    assert after > max(before, 0.5) + 0.15, (before, after)
    dt.save(model, tmp_path)
    fresh, _ = minilm_classifier(seed=1)  # a differently initialised head: the saved one must win
    dt.load(fresh, tmp_path)
    assert accuracy(fresh, test, tok) == pytest.approx(after)
