"""Tiny random models of every architecture family transformers builds from a small config: the
oracle is transformers' own modelling code, not fixtures we wrote.  One generic size
(hidden 32, 2 layers, 4 heads, 2 key/value heads, vocab 128) with per-family corrections where a
config validates its own shape rules.  ``build(kind, model_type)`` -> (model.eval(), config)."""
from __future__ import annotations

import warnings

import torch

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=128, max_position_embeddings=128, head_dim=8,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)

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


def build_causal_lm(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(model_type, **SMALL)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()
