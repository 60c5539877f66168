"""Forgetting is measured for every method, including those that change the sequence length:
prompt tuning prepends virtual tokens, so the hidden states are (B, V+T, H) while the reference
text's mask is (B, T) (found by bench/quality.py: `deltatune train --method prompt` on MiniLM
crashed after training with "size of tensor a (41) must match ... (21)")."""
import pytest
import torch

import deltatune as dt
from deltatune.app.evaluate import Forgetting

from conftest import tiny_bert_cls, word_tokenizer

TEXTS = [" ".join(f"w{(i * 7 + j) % 60}" for j in range(3 + i % 5)) for i in range(12)]  # ragged lengths


@pytest.mark.parametrize("method", ["prompt", "lora"])  # prefix keeps the length (and BERT prefix needs transformers 5)
def test_drift_is_zero_at_init_and_measured_on_the_users_tokens(method):
    model = tiny_bert_cls()
    fg = Forgetting(word_tokenizer(), "classify", texts=TEXTS, batch_size=5)
    fg.snapshot(model)
    dt.attach(model, method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    assert fg.measure(model)["value"] > 1e-4  # the delta changed the real tokens' representations
    with dt.disabled(model):
        assert fg.measure(model)["value"] == pytest.approx(0.0, abs=1e-6)
