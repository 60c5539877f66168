"""``deltatune merge --format gguf|safetensors --dtype fp32|fp16|bf16``: the GGUF file loads in
transformers' own GGUF reader with the merged model's logits (exactly, once the weights are rounded
to the stored dtype) and the same tokenizer; unmapped architectures are refused in one line.

The tiny models carry a real byte-level BPE tokenizer (trained here on the reference text, with
ChatML special tokens and a chat template), since a GGUF file must describe its tokenizer."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

import deltatune as dt
from cli_fixtures import run_cli
from deltatune.core.delta import DeltaError
from deltatune.app.gguf_export import DTYPES, has_gguf_reader, load_gguf, logits_gap, write_gguf

# the export verifies its file with transformers' own GGUF reader, which rebuilds tokenizers
# faithfully from 5.x on; older releases are refused (tests/test_export_gguf_old.py)
pytestmark = pytest.mark.skipif(not has_gguf_reader(), reason="transformers < 5: GGUF export is refused")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SAMPLE = ["The river rose after three days of rain.", "<|im_start|>user\nhello <|tool|> there<|im_end|>\n"]


def bpe_tokenizer():
    """A GPT-2-style byte-level BPE (vocab 400) with <|endoftext|>, <|im_start|>, <|im_end|> and a
    special token that is none of bos/eos/pad (<|tool|>), which only the CONTROL type keeps whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from deltatune.data.reference_text import TEXTS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(TEXTS), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tool|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", chat_template=CHATML,
                                   additional_special_tokens=["<|tool|>"])


def tiny(kind: str, vocab: int, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    m = LlamaForCausalLM(LlamaConfig(**kw)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))
    with torch.no_grad():  # random (not zero / one) norms and biases, so a mis-mapped tensor shows
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    return m.eval()


def rounded(m, dtype: str):
    """``m`` with every matrix rounded to ``dtype`` and back (1-D tensors stay float32, as in the file)."""
    import copy

    r = copy.deepcopy(m)
    with torch.no_grad():
        for p in r.parameters():
            if p.ndim > 1:
                p.copy_(p.to(DTYPES[dtype]).float())
    return r


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("qwen2", False)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_gguf_loads_in_transformers_with_equal_logits(tok, tmp_path, kind, tied, dtype):
    m = tiny(kind, len(tok), tied)
    f = write_gguf(m, tok, tmp_path / f"m-{dtype}.gguf", dtype)
    back, back_tok = load_gguf(f)
    assert type(back) is type(m)
    x = dict(tok(SAMPLE, padding=True, return_tensors="pt"))
    # the file stores exactly the rounded weights: logits equal up to float32 summation order
    assert logits_gap(rounded(m, dtype), back, x) < 1e-5
    if dtype == "fp32":
        assert logits_gap(m, back, x) < 1e-5
    else:
        assert 0 < logits_gap(m, back, x) < (1e-2 if dtype == "fp16" else 5e-2)
    for s in SAMPLE:
        assert back_tok(s).input_ids == tok(s).input_ids
    assert back_tok.convert_ids_to_tokens(back_tok("<|tool|>").input_ids) == ["<|tool|>"]  # kept whole
    assert back_tok.chat_template == CHATML and back_tok.eos_token == "<|im_end|>"


def test_gguf_refuses_unmapped_architectures(tok, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(DeltaError) as e:
        write_gguf(m, tok, tmp_path / "x.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "GPT2LMHeadModel" in msg and "supported: llama, qwen2" in msg
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_refuses_a_wordlevel_tokenizer(tmp_path):
    from cli_fixtures import make_tokenizer

    wl, v = make_tokenizer(tmp_path / "tok")
    with pytest.raises(DeltaError, match="needs a BPE tokenizer: byte-level"):
        write_gguf(tiny("llama", v), wl, tmp_path / "x.gguf")


# --------------------------------------------------------------------------- the command line

run = run_cli  # deltatune ARGS in-process (cli_fixtures.run_cli)


@pytest.fixture(scope="module")
def lm_adapter(tmp_path_factory, tok):
    """A tiny Llama directory (with the BPE tokenizer) and a LoRA adapter on it with non-zero B."""
    root = tmp_path_factory.mktemp("gguf")
    m = tiny("llama", len(tok), tied=True)
    m.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    dt.attach(m, "lora", r=4, targets="all-linear")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    dt.save(m, root / "adapter")
    return root


def test_merge_cli_gguf_fp16(lm_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = run("merge", "--adapter", lm_adapter / "adapter", "--model", lm_adapter / "base", "--task", "causal-lm",
            "--output", out, "--format", "gguf", "--dtype", "fp16", "--json")
    res = json.loads(r.stdout)
    assert res["format"] == "gguf" and res["dtype"] == "fp16" and res["files"] == ["merged-FP16.gguf"]
    assert res["check_max_abs_diff"] < 1e-5 and 0 < res["gguf_max_abs_diff"] < 1e-2
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "merged-FP16.gguf"]
    card = (out / "README.md").read_text()
    assert '"gguf"' in card and 'gguf_file="merged-FP16.gguf"' in card and "library_name" in card
    assert stat.S_IMODE((out / "merged-FP16.gguf").stat().st_mode) == 0o644  # umask 022 in the tests
    # the reference: base + adapter merged in Python, weights rounded to fp16
    base = AutoModelForCausalLM.from_pretrained(lm_adapter / "base").eval()
    dt.load(base, lm_adapter / "adapter")
    want = rounded(dt.merge(base), "fp16")
    back, back_tok = load_gguf(out / "merged-FP16.gguf")
    x = dict(back_tok(SAMPLE, padding=True, return_tensors="pt"))
    assert logits_gap(want, back, x) < 1e-5


def test_merge_cli_safetensors_bf16_and_bad_choices(lm_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    r = run("merge", "--adapter", lm_adapter / "adapter", "--model", lm_adapter / "base", "--task", "causal-lm",
            "--output", out, "--dtype", "bf16")
    assert "safetensors bf16" in r.output and "stored as bf16" in r.output
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16 and (out / "README.md").exists()
    for flag, value, want in (("--dtype", "int4", "unknown --dtype 'int4'; choose one of fp32, fp16, bf16"),
                              ("--format", "onnx", "unknown --format 'onnx'; choose one of safetensors, gguf")):
        r = run("merge", "--adapter", lm_adapter / "adapter", "--output", tmp_path / "x", flag, value, ok=False)
        assert r.exit_code == 2 and want in r.output and not (tmp_path / "x").exists()


def test_merge_cli_gguf_refuses_a_classifier(tmp_path):
    from cli_fixtures import tiny_bert_dir
    from transformers import AutoModelForSequenceClassification

    tiny_bert_dir(tmp_path / "bert")
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert")
    dt.attach(m, "lora", r=2)
    dt.save(m, tmp_path / "a")
    r = run("merge", "--adapter", tmp_path / "a", "--model", tmp_path / "bert", "--task", "classify",
            "--output", tmp_path / "o", "--format", "gguf", ok=False)
    assert r.exit_code == 2 and "--format gguf writes causal language models" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.heavy  # minutes on a real model: `make test`, not CI
def test_smollm2_lora_merged_to_gguf(tmp_path):
    """The real thing: SmolLM2-135M-Instruct (49,152-token BPE, ChatML template) + a LoRA adapter,
    merged and written as GGUF; transformers reads back the merged logits and the same tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.app.demo import smollm2_gguf
    from deltatune.models import resolve

    base = resolve(str(smollm2_gguf()))  # the packaged GGUF, dequantised once to a cached fp32 directory
    m = AutoModelForCausalLM.from_pretrained(base).eval()
    dt.attach(m, "lora", r=8)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    dt.save(m, tmp_path / "adapter")
    r = run("merge", "--adapter", tmp_path / "adapter", "--model", base, "--task", "causal-lm",
            "--output", tmp_path / "smol", "--format", "gguf", "--json")
    res = json.loads(r.stdout)
    assert res["gguf_max_abs_diff"] < 1e-4 and res["files"] == ["smol-FP32.gguf"]
    back, back_tok = load_gguf(tmp_path / "smol" / "smol-FP32.gguf")
    tok = AutoTokenizer.from_pretrained(base)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Answer: 42."}], tokenize=False,
                                   add_generation_prompt=True)
    for s in (chat, "The river rose after 3 days of rain.\n\n  Indented, emojis 🙂 and ünïcode."):
        assert back_tok(s).input_ids == tok(s).input_ids
    assert back_tok.chat_template == tok.chat_template
    x = dict(tok([chat], return_tensors="pt"))
    assert logits_gap(dt.merge(m), back, x) < 1e-4
