"""Default targets of IA3 and bottleneck adapters on the families transformers ships (issue 13
§3): each attaches with no options, adapts layers in every block, starts as the identity and
trains.  Models from transformers' own classes with tiny configs."""
from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
EXTRA = {"t5": dict(d_ff=64, d_kv=8), "bart": dict(encoder_ffn_dim=64, decoder_ffn_dim=64),
         "whisper": dict(encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2, decoder_layers=2,
                         max_target_positions=16),
         "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64), "falcon": dict(),
         "phi3": dict(), "deberta-v2": dict()}


def build(model_type):
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification, AutoModelForSpeechSeq2Seq)
    from transformers.utils import logging

    logging.set_verbosity_error()
    kw = {**SMALL, **EXTRA.get(model_type, {})}
    if model_type == "falcon":
        kw.pop("num_key_value_heads")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(model_type, **kw)
        torch.manual_seed(0)
        auto = {"t5": AutoModelForSeq2SeqLM, "bart": AutoModelForSeq2SeqLM, "whisper": AutoModelForSpeechSeq2Seq,
                "distilbert": AutoModelForSequenceClassification,
                "deberta-v2": AutoModelForSequenceClassification}.get(model_type, AutoModelForCausalLM)
        return auto.from_config(cfg).eval()


def inputs(model_type):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 6), generator=g)
    if model_type == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=g), "decoder_input_ids": ids[:, :3]}
    if model_type in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    return {"input_ids": ids}


CASES = [("ia3", t) for t in ("phi3", "gpt_neox", "bloom", "falcon", "mixtral", "t5", "deberta-v2", "distilbert")] + \
        [("adapter", t) for t in ("gpt_neox", "opt", "bart", "whisper", "t5")]


@pytest.mark.parametrize("method,model_type", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_default_targets_attach_start_as_identity_and_train(method, model_type):
    m = build(model_type)
    x = inputs(model_type)
    with torch.no_grad():
        y0 = m(**x).logits
    dt.attach(m, method)
    wrapped = [p for p, _ in dt.core.iter_delta_layers(m)]
    assert len(wrapped) >= 2, wrapped  # something in each of the 2 blocks
    with torch.no_grad():
        torch.testing.assert_close(m(**x).logits, y0, atol=1e-5, rtol=1e-5)  # identity at init
    m.train()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        m(**x).logits.pow(2).mean().backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        assert (m(**x).logits - y0).abs().max() > 1e-4
