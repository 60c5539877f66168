"""Default targets on real architectures (issue 13 §3): heads that are containers, tied heads,
layer types a method cannot wrap.  Oracles: transformers' own model classes."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.adapters import base_at


def _quiet(fn):
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return fn()


def roberta_cls():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, num_labels=3)
    return _quiet(lambda: RobertaForSequenceClassification(cfg).eval())


def resnet_cls():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return _quiet(lambda: ResNetForImageClassification(cfg).eval())


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    return _quiet(lambda: WhisperForConditionalGeneration(cfg).eval())


def _wrapped(model, name="default"):
    return sorted(p for p, layer in dt.core.iter_delta_layers(model) if name in layer.deltas
                  and not layer.deltas[name].replaces)


@pytest.mark.parametrize("dora", [False, True])
def test_container_head_trains_in_full_and_nothing_inside_it_is_wrapped(dora, tmp_path):
    m = roberta_cls()
    dt.attach(m, "lora", dora=dora)
    assert not [p for p in _wrapped(m) if p.startswith("classifier")]
    keys = dt.adapter_tensors(m, "default")
    assert "classifier.dense.weight" in keys and "classifier.out_proj.weight" in keys
    assert not [k for k in keys if ".deltas." in k]
    ids = torch.randint(3, 60, (2, 6))
    with torch.no_grad():
        for t in keys.values():
            t.add_(torch.randn_like(t) * 0.05)
        y = m(input_ids=ids).logits
    dt.save(m, tmp_path)
    m2 = dt.load(roberta_cls(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)
        merged = dt.merge(m2)
        torch.testing.assert_close(merged(input_ids=ids).logits, y, atol=1e-4, rtol=1e-4)


def test_resnet_default_lora_adapts_the_convolutions_not_the_head():
    m = resnet_cls()
    dt.attach(m, "lora")
    wrapped = _wrapped(m)
    assert wrapped and all(isinstance(base_at(m, p), nn.Conv2d) for p in wrapped)
    assert "classifier.1.weight" in dt.adapter_tensors(m, "default")  # the head: trained in full
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = m(pixel_values=x).logits
        torch.testing.assert_close(dt.merge(m)(pixel_values=x).logits, y, atol=1e-5, rtol=1e-5)


def test_whisper_tied_output_head_is_not_a_default_target():
    m = whisper()
    dt.attach(m, "lora")
    assert "proj_out" not in _wrapped(m)
    feats = torch.randn(1, 8, 32)
    dec = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        for t in dt.adapter_tensors(m, "default").values():
            t.add_(torch.randn_like(t) * 0.05)
        y = m(input_features=feats, decoder_input_ids=dec).logits
        torch.testing.assert_close(dt.merge(m)(input_features=feats, decoder_input_ids=dec).logits, y,
                                   atol=1e-5, rtol=1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3)
        self.mha = nn.MultiheadAttention(8, 2)
        self.c2 = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(8, 8)


# (LoRA adapts Conv3d and MultiheadAttention since issue 13: tests/test_lora_conv3d_mha.py)
@pytest.mark.parametrize("method,targets,bad", [("adalora", ["c3", "fc"], "c3"), ("vera", ["mha", "fc"], "mha"),
                                                ("adalora", ["c2", "fc"], "c2"), ("ia3", ["mha", "fc"], "mha")])
def test_a_target_the_method_cannot_wrap_is_refused_not_skipped(method, targets, bad):
    m = Net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opts = {"total_steps": 10} if method == "adalora" else {}
    if method == "ia3":
        opts["feedforward"] = []
    with pytest.raises(dt.DeltaError, match=rf"matched '{bad}' of type \w+, which this method cannot adapt"):
        dt.attach(m, method, targets=targets, **opts)
    assert not list(dt.core.iter_delta_layers(m))  # left exactly as it was
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def vit_cls():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=64, num_labels=3)
    return _quiet(lambda: ViTForImageClassification(cfg).eval())


@pytest.mark.parametrize("make", [vit_cls, resnet_cls])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_methods_refuse_models_without_token_embeddings_at_attach(make, method):
    m = make()
    with pytest.raises(dt.DeltaError, match="takes .pixel_values., not token ids.*use lora, ia3 or adapter"):
        dt.attach(m, method)
    assert not hasattr(m, "deltatune_virtual")


def test_prompt_tuning_on_a_state_space_model_saves_and_loads(tmp_path):
    from zoo import build_causal_lm

    m = dt.attach(build_causal_lm("mamba"), "prompt", num_virtual_tokens=3)
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        dt.adapter_tensors(m, "default")["prompt_embeddings"].add_(0.3)
        y = m(input_ids=ids).logits
    dt.save(m, tmp_path)
    m2 = dt.load(build_causal_lm("mamba"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, y)
