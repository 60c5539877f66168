"""Tiny random models of every architecture family transformers builds from a small config: the
oracle is transformers' own modelling code, not fixtures we wrote.  One generic size per kind
(hidden 32, 2 layers, 4 heads, vocab 128) with per-family corrections where a config validates its
own shape rules.

``build_causal_lm(model_type)`` -> model.eval() (the causal LMs, for generate tests);
``FAMILIES[name]`` -> Family (kind, model_type, config options) for every kind;
``build(name)`` -> model.eval(); ``inputs(name)`` -> forward kwargs; ``output(name, out)`` -> the
tensor a test compares (logits of the head the family is built with)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=128, max_position_embeddings=128, head_dim=8,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# mixture-of-experts families default to 8-128 experts: 4 small ones keep a case well under a second
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32)
MOE_LM = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "minimax"}

# decoder-only causal LMs (dense, MoE, state-space, hybrid) that build from SMALL
CAUSAL_LM = [
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi", "gpt2", "gpt_neox", "bloom", "opt", "mamba", "olmo", "olmo2", "granite",
    "stablelm", "starcoder2", "cohere", "gpt_bigcode", "xglm", "mpt", "persimmon", "rwkv", "biogpt",
    "nemotron", "exaone4", "ernie4_5", "hunyuan_v1_dense", "seed_oss", "arcee", "apertus", "olmoe",
    "falcon_mamba", "ministral", "helium", "lfm2", "granitemoe", "minimax", "cwm", "doge",
]
# a fast subset for CI on every stop (one per distinct code path: rotary GQA, learned positions,
# ALiBi, positions from the mask, MoE, state space)
CAUSAL_LM_FAST = ["llama", "gpt2", "bloom", "opt", "qwen2_moe", "gpt_neox", "mamba"]


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()


def build_causal_lm(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(model_type, **SMALL, **(MOE if model_type in MOE_LM else {}))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


# ----------------------------------------------------------------------------- every kind

ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128,
               max_position_embeddings=128, pad_token_id=0, num_labels=3)
SEQ2SEQ = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
T5 = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
          pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
           patch_size=8, num_channels=3, num_labels=3)
SWIN = dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2, patch_size=4, image_size=32,
            num_channels=3, num_labels=3)
CONVNET = dict(hidden_sizes=[16, 32], depths=[1, 1], num_channels=3, num_labels=3)
# wav2vec2-style: a 2-layer conv feature extractor (stride 10) instead of the 7-layer one (stride 320)
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(32, 32),
             conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
             num_labels=3, classifier_proj_size=16, vocab_size=32)
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

# kind -> (transformers Auto class, inputs maker, output getter)
_IDS = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(0))
_MASK = torch.ones_like(_IDS)
_MASK[1, :2] = 0  # left padding on the second row


def _text():
    return {"input_ids": _IDS.clone(), "attention_mask": _MASK.clone()}


def _seq2seq():
    return {**_text(), "decoder_input_ids": _IDS[:, :5].clone()}


def _g():
    return torch.Generator().manual_seed(1)


KINDS = {
    "causal_lm": ("AutoModelForCausalLM", _text, lambda o: o.logits),
    "seq_cls": ("AutoModelForSequenceClassification", _text, lambda o: o.logits),
    "seq2seq": ("AutoModelForSeq2SeqLM", _seq2seq, lambda o: o.logits),
    "image_cls": ("AutoModelForImageClassification",
                  lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=_g())}, lambda o: o.logits),
    "audio_cls": ("AutoModelForAudioClassification",
                  lambda: {"input_values": torch.randn(2, 800, generator=_g())}, lambda o: o.logits),
    "speech_seq2seq": ("AutoModelForSpeechSeq2Seq",
                       lambda: {"input_features": torch.randn(2, 16, 32, generator=_g()),
                                "decoder_input_ids": _IDS[:, :5].clone()}, lambda o: o.logits),
    "contrastive": ("AutoModel", lambda: {"input_ids": _IDS.clone(),
                                          "pixel_values": torch.randn(2, 3, 32, 32, generator=_g())},
                    lambda o: o.logits_per_image),
}


@dataclass(frozen=True)
class Family:
    kind: str
    model_type: str
    options: dict = field(default_factory=dict)


def _fam(kind, base, types, **extra):
    return {t: Family(kind, t, {**base, **extra}) for t in types}


FAMILIES: dict[str, Family] = {
    **_fam("causal_lm", SMALL, [t for t in CAUSAL_LM if t not in MOE_LM]),
    **_fam("causal_lm", {**SMALL, **MOE}, [t for t in CAUSAL_LM if t in MOE_LM]),
    **_fam("seq_cls", ENCODER, ["bert", "roberta", "deberta-v2", "deberta", "electra", "xlm-roberta", "albert",
                                "mpnet", "modernbert", "roformer", "esm", "big_bird", "fnet", "data2vec-text"]),
    "distilbert": Family("seq_cls", "distilbert", {**ENCODER, "hidden_dim": 64}),
    "mobilebert": Family("seq_cls", "mobilebert", {**ENCODER, "embedding_size": 32, "intra_bottleneck_size": 32}),
    **_fam("seq2seq", SEQ2SEQ, ["bart", "mbart", "marian", "pegasus", "m2m_100", "blenderbot-small"]),
    **_fam("seq2seq", T5, ["t5", "mt5", "umt5"]),
    "switch_transformers": Family("seq2seq", "switch_transformers", {**T5, "num_experts": 4}),
    "whisper": Family("speech_seq2seq", "whisper", {**SEQ2SEQ, "num_mel_bins": 16, "max_source_positions": 16,
                                                    "max_target_positions": 32, "decoder_start_token_id": 1,
                                                    "suppress_tokens": None, "begin_suppress_tokens": None}),
    **_fam("image_cls", VIT, ["vit", "beit", "dinov2", "vit_msn", "data2vec-vision"]),
    **_fam("image_cls", SWIN, ["swin", "swinv2"]),
    **_fam("image_cls", CONVNET, ["resnet", "regnet"]),
    **_fam("image_cls", CONVNET, ["convnext", "convnextv2"], num_stages=2),
    **_fam("audio_cls", AUDIO, ["wav2vec2", "hubert", "wavlm", "unispeech", "sew"]),
    **_fam("contrastive", {"text_config": {**TOWER, "vocab_size": 128, "max_position_embeddings": 32},
                           "vision_config": {**TOWER, "image_size": 32, "patch_size": 8}, "projection_dim": 16},
           ["clip"]),
}

# one or two of each kind, for CI on every stop
FAST = ["llama", "gpt2", "qwen2_moe", "mamba", "bert", "roberta", "distilbert", "t5", "bart", "whisper", "vit",
        "resnet", "convnext", "wav2vec2", "clip"]


def build(name: str, seed: int = 0):
    import transformers
    from transformers import AutoConfig

    fam = FAMILIES[name]
    _quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(fam.model_type, **fam.options)
        torch.manual_seed(seed)
        model = getattr(transformers, KINDS[fam.kind][0]).from_config(cfg)
    return model.eval()


def inputs(name: str) -> dict:
    return KINDS[FAMILIES[name].kind][1]()


def output(name: str, out) -> torch.Tensor:
    return KINDS[FAMILIES[name].kind][2](out)


def run(model, name: str, **extra) -> torch.Tensor:
    return output(name, model(**inputs(name), **extra))


def train_options(name: str) -> dict:
    """Extra forward options for a backward pass: RWKV's eval-mode forward updates its recurrent state
    in place, which autograd refuses, unless it runs without a cache."""
    return {"use_cache": False} if FAMILIES[name].kind == "causal_lm" else {}
