"""GGUF export of a SentencePiece tokenizer (Llama 2 / Mistral style: BPE pieces with ``▁`` for a
space and ``<0xNN>`` byte fallback), written as llama.cpp's "llama" tokenizer kind: transformers' own
GGUF reader rebuilds the same token ids on sample texts (bytes, unicode, spaces, newlines, special
tokens) and the merged model's logits.  The tokenizer is trained here by ``sentencepiece`` on the
packaged reference text (a second) and converted by transformers as a Llama tokenizer."""
from __future__ import annotations

import shutil

import pytest
import torch
from test_export_gguf import rounded, tiny

import deltatune as dt
from deltatune.app.gguf_export import has_gguf_reader, load_gguf, logits_gap, write_gguf
from deltatune.data.reference_text import TEXTS

pytestmark = pytest.mark.skipif(not has_gguf_reader(), reason="transformers < 5: GGUF export is refused")

SAMPLE = ["The river rose after three days of rain.", "ünïcödé and an emoji 🙂 fall back to bytes",
          "two  spaces,\na newline\tand a tab", "</s> is a special token; so is <s>", "12345 + 67890 = 80235"]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer

    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(TEXTS)), model_prefix=str(d / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (d / "tok").mkdir()
    shutil.copy(d / "sp.model", d / "tok" / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(d / "tok")  # converted to a tokenizers BPE with byte fallback
    assert len(tok) == 400 and tok.unk_token == "<unk>"
    return tok


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sentencepiece_gguf_same_ids_and_logits(sp_tok, tmp_path, dtype):
    m = tiny("llama", len(sp_tok), tied=False)
    dt.attach(m, "lora", r=4, targets="all-linear")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    merged = dt.merge(m)
    f = write_gguf(merged, sp_tok, tmp_path / f"sp-{dtype}.gguf", dtype)
    back, back_tok = load_gguf(f)
    for s in SAMPLE:
        assert back_tok(s).input_ids == sp_tok(s).input_ids, s
        assert back_tok.decode(back_tok(s).input_ids, skip_special_tokens=True) == \
            sp_tok.decode(sp_tok(s).input_ids, skip_special_tokens=True)
    assert any(t.startswith("<0x") for t in sp_tok.convert_ids_to_tokens(sp_tok(SAMPLE[1]).input_ids))  # bytes used
    x = dict(sp_tok(SAMPLE, padding=True, return_tensors="pt")) if sp_tok.pad_token else \
        {"input_ids": torch.tensor([sp_tok(SAMPLE[0]).input_ids])}
    assert logits_gap(rounded(merged, dtype), back, x) < 1e-5


def test_sentencepiece_gguf_token_kinds(sp_tok, tmp_path):
    from gguf import GGUFReader, TokenType

    f = write_gguf(tiny("llama", len(sp_tok)), sp_tok, tmp_path / "k.gguf")
    r = GGUFReader(str(f))
    field = r.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    types = r.fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[i][0]) for i in types.data]
    vocab = sp_tok.convert_ids_to_tokens(list(range(len(sp_tok))))
    assert kinds[vocab.index("<unk>")] == TokenType.UNKNOWN
    assert kinds[vocab.index("<s>")] == kinds[vocab.index("</s>")] == TokenType.CONTROL
    assert kinds[vocab.index("<0x0A>")] == TokenType.BYTE
    assert sum(k == TokenType.BYTE for k in kinds) == 256
