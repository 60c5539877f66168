"""Tiny on-disk models + data files for the CLI / trainer tests (seconds, no downloads).

A word-level tokenizer built from the test sentences and 2-layer BERT / Llama models saved with
``save_pretrained``, so the CLI loads them exactly as it loads a real model directory."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

SPAM = ["win a free prize now", "claim your cash reward today", "free entry win money call now",
        "urgent you won a prize claim now", "cash prize waiting call today", "win free money now"]
HAM = ["see you at lunch", "the meeting is at noon", "can you call me later", "thanks for dinner last night",
       "are we still on for lunch", "i will be late for the meeting"]
CHAT = [("hello", "hi there how are you"), ("how are you", "i am fine thanks"),
        ("what is your name", "my name is bot"), ("tell me a joke", "why did the chicken cross the road")]


def words() -> list[str]:
    from deltatune.data.reference_text import TEXTS

    ws = set()
    for t in SPAM + HAM + [w for p in CHAT for w in p] + list(TEXTS):
        ws.update(t.lower().replace(",", " ").replace(".", " ").split())
    return sorted(ws)


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[SEP]")
    fast.save_pretrained(path)
    return fast, len(vocab) + 8


def tiny_bert_dir(path: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    _, v = make_tokenizer(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def tiny_llama_dir(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, v = make_tokenizer(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=3, bos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def spam_rows(n: int = 48, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = [(rng.choice(SPAM), "spam") if i % 2 else (rng.choice(HAM), "ham") for i in range(n)]
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chat_jsonl(path: Path, n: int = 24) -> Path:
    return write_jsonl(path, [{"prompt": p, "response": r} for p, r in (CHAT * n)[:n]])


def run_cli(*args, ok: bool = True):
    """``deltatune ARGS`` through typer's CliRunner (in-process); with ``ok`` it must exit 0."""
    from typer.testing import CliRunner

    from deltatune.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r
