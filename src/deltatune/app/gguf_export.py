"""Writing a merged causal LM as one GGUF file (llama.cpp, ollama, LM Studio, and transformers'
own ``from_pretrained(dir, gguf_file=...)``), in float32, float16 or bfloat16.

The file holds three things, under llama.cpp's key names (``gguf.constants.Keys``):

* the architecture's hyper-parameters (``llama.block_count``, ``llama.rope.freq_base``, ...);
* the tokenizer: every token string, its type (NORMAL / CONTROL / USER_DEFINED / BYTE), the BPE
  merges, the special token ids and the chat template -- a GGUF has no tokenizer.json; byte-level
  BPE tokenizers are written as llama.cpp's "gpt2" kind, SentencePiece BPE ones (Llama 2, Mistral)
  as its "llama" kind (:data:`TOKENIZER_KINDS`);
* the tensors, renamed by ``gguf.TensorNameMap`` (``model.layers.0.self_attn.q_proj.weight`` ->
  ``blk.0.attn_q.weight``).  Llama's q/k projections are stored with the two halves of each
  rotary head interleaved (llama.cpp's rope pairs adjacent dims, transformers' ``rotate_half`` pairs
  dim i with i + d/2), so they are permuted here exactly as llama.cpp's convert_hf_to_gguf does,
  and transformers' reader undoes it.  1-D tensors (norms, biases) stay float32, as llama.cpp keeps them.

Architectures are a registry: one :class:`GgufArch` line per transformers ``model_type``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.delta import DeltaError
from ..models import quiet_progress

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = ("safetensors", "gguf")


@dataclass(frozen=True)
class GgufArch:
    name: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool  # rotary halves interleaved the llama.cpp way (Llama); Qwen2 is stored as is
    rope_dim_key: bool  # write rope.dimension_count (transformers reads it back as head_dim for llama)


ARCHS = {
    "llama": GgufArch("llama", permute_qk=True, rope_dim_key=True),
    "qwen2": GgufArch("qwen2", permute_qk=False, rope_dim_key=False),
}


def check_exportable(model) -> GgufArch:
    """The registry entry for ``model``, or one line naming what is supported."""
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCHS:
        raise DeltaError(f"GGUF export does not map {type(model).__name__} (model_type {mt!r}); supported: "
                         f"{', '.join(sorted(ARCHS))} -- use --format safetensors for this model")
    rope = _rope(model.config)
    if rope.get("rope_type", "default") != "default":
        raise DeltaError(f"GGUF export writes plain rotary embeddings only; this model uses rope_type "
                         f"{rope['rope_type']!r} -- use --format safetensors for this model")
    return ARCHS[mt]


def _rope(config) -> dict:
    # transformers 5 keeps rope settings in config.rope_parameters; older releases in rope_theta/rope_scaling
    rp = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rp and getattr(config, "rope_theta", None) is not None:
        rp["rope_theta"] = config.rope_theta
    return rp


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head * d, in) -> same shape, each head's rows reordered [0, d/2, 1, d/2+1, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(tokenizer, vocab_size: int):
    """(tokens, types) for ids 0..vocab_size-1 of a byte-level BPE tokenizer, the way llama.cpp's
    converter lists them: added special tokens are CONTROL (kept whole by every reader), other added
    tokens USER_DEFINED, ids the tokenizer lacks (embedding padding) placeholder ``[PAD{i}]``."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def _pre_name(pre: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for how text is split before the merges: GPT-2's
    built-in regex is "gpt2"; a ``Split`` regex is looked up in the table transformers' GGUF reader
    uses to rebuild it (llama.cpp's names: "llama-bpe", "qwen2", ...)."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    try:  # the table exists in transformers >= 5; older readers rebuild only GPT-2's split
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        raise DeltaError("GGUF export: this transformers cannot read back a tokenizer that splits text with "
                         "a custom regex (it has no GGUF pre-tokenizer table); upgrade transformers (>= 5) or "
                         "use --format safetensors") from None
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre]
    splits = [st.get("pattern", {}).get("Regex") for st in steps if st.get("type") == "Split"]
    names = {rx: name for name, rx in reversed(list(GGUF_PRE_TOKENIZER_SPLITS.items()))}
    if len(splits) == 1 and splits[0] in names:
        return names[splits[0]]
    raise DeltaError("GGUF export: this tokenizer splits text with a pre-tokenizer GGUF readers do not know "
                     "(neither GPT-2's nor a llama.cpp-named regex); use --format safetensors")


def _byte_level_fields(writer, tokenizer, tj: dict, vocab_size: int) -> None:
    """GPT-2-style byte-level BPE: ``tokenizer.ggml.model = "gpt2"`` and the pre-tokenizer's name."""
    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(tj.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _sentencepiece_fields(writer, tokenizer, tj: dict, vocab_size: int) -> None:
    """SentencePiece BPE with byte fallback (Llama 1/2, Mistral, TinyLlama tokenizers):
    ``tokenizer.ggml.model = "llama"``.  Pieces are written as they are spelled (``▁`` for a space),
    ``<0xNN>`` pieces as BYTE, the unknown piece as UNKNOWN; scores are SentencePiece-BPE's (minus the
    piece's rank, so llama.cpp merges in the same order), and the merges are written too, which
    transformers' reader uses as they are instead of rebuilding them from the scores."""
    from gguf import TokenType

    tokens, types = _vocab(tokenizer, vocab_size)
    unk = getattr(tokenizer, "unk_token", None) or tj["model"].get("unk_token")
    for i, t in enumerate(tokens):
        if types[i] == TokenType.NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = TokenType.BYTE
        elif t == unk:
            types[i] = TokenType.UNKNOWN
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) if ty == TokenType.NORMAL else 0.0 for i, ty in enumerate(types)])
    writer.add_token_types(types)
    writer.add_add_space_prefix((tj.get("pre_tokenizer") or {}).get("prepend_scheme", "always") != "never")


def _tokenizer_kind(tj: dict | None) -> str | None:
    """"gpt2" (byte-level BPE), "llama" (SentencePiece BPE with byte fallback) or None (not exportable)."""
    model, dec = (tj or {}).get("model", {}), (tj or {}).get("decoder") or {}
    if model.get("type") != "BPE":
        return None
    if not model.get("byte_fallback") and dec.get("type") == "ByteLevel":
        return "gpt2"
    steps = [d.get("type") for d in dec.get("decoders", [])] if dec.get("type") == "Sequence" else []
    pre = (tj or {}).get("pre_tokenizer") or {}
    if model.get("byte_fallback") and "ByteFallback" in steps and pre.get("type") == "Metaspace":
        return "llama"
    return None


TOKENIZER_KINDS = {"gpt2": _byte_level_fields, "llama": _sentencepiece_fields}


def _tokenizer_fields(writer, tokenizer, tok_dir: Path, vocab_size: int) -> None:
    import json

    from gguf import SpecialVocab

    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8")) \
        if (tok_dir / "tokenizer.json").exists() else None
    kind = _tokenizer_kind(tj)
    if kind is None:
        raise DeltaError("GGUF export needs a BPE tokenizer: byte-level (GPT-2 / Llama-3 / SmolLM / Qwen style "
                         "tokenizer.json) or SentencePiece with byte fallback (Llama 2 / Mistral style); this one "
                         "is neither -- use --format safetensors")
    TOKENIZER_KINDS[kind](writer, tokenizer, tj, vocab_size)
    # merges, bos/eos/unk/pad ids, add_bos and the chat template, read from the saved files by gguf's helper
    sv = SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size)
    if not sv.merges:
        raise DeltaError(f"{tok_dir}: the tokenizer has no BPE merges; cannot describe it in GGUF")
    if getattr(tokenizer, "chat_template", None) and sv.chat_template is None:
        sv.chat_template = tokenizer.chat_template
    # whether BOS/EOS are added, from what the tokenizer does (its config may not say: readers then
    # assume BOS for a "llama" vocabulary)
    ids = tokenizer("a").input_ids
    sv.add_special_token.update(bos=bool(ids) and ids[0] == tokenizer.bos_token_id,
                                eos=bool(ids) and ids[-1] == tokenizer.eos_token_id and len(ids) > 1)
    sv.add_to_gguf(writer, quiet=True)


def _tensor(t: torch.Tensor, dtype: str):
    """(numpy data, GGML type) of one tensor in the file: 1-D tensors float32, others ``dtype``."""
    from gguf import GGMLQuantizationType, quants

    t = t.detach().to(torch.float32).contiguous()
    if t.ndim <= 1 or dtype == "fp32":
        return t.numpy(), GGMLQuantizationType.F32
    if dtype == "fp16":
        return t.to(torch.float16).numpy(), GGMLQuantizationType.F16
    # numpy has no bfloat16: gguf packs the bytes (rounding to nearest even, as torch does)
    return quants.quantize(t.numpy(), GGMLQuantizationType.BF16), GGMLQuantizationType.BF16


def has_gguf_reader() -> bool:
    """transformers' GGUF package (tokenizer mapping, pre-tokenizer table): present from 5.x on."""
    import importlib.util

    try:
        return importlib.util.find_spec("transformers.integrations.gguf") is not None
    except ImportError:
        return False


def write_gguf(model, tokenizer, path: str | os.PathLike, dtype: str = "fp32", name: str | None = None) -> Path:
    """Write ``model`` (a merged ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``) and ``tokenizer`` to
    ``path``.  Not atomic by itself: write into a temporary directory (``safety.atomic_dir``)."""
    import tempfile

    try:
        import gguf  # optional: the `gguf` extra
    except ImportError:
        raise DeltaError("--format gguf needs the gguf package: pip install 'deltatune[gguf]'") from None

    if dtype not in DTYPES:
        raise DeltaError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not has_gguf_reader():
        raise DeltaError("--format gguf needs transformers' GGUF reader of transformers >= 5 (older ones rebuild "
                         "the tokenizer differently, so the file could not be verified); upgrade transformers "
                         "or use --format safetensors")
    arch = check_exportable(model)
    if tokenizer is None:
        raise DeltaError("GGUF export needs the model's tokenizer (a GGUF file carries its own); none was found")
    c = model.config
    n_head, n_kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    sd = model.state_dict()
    tied = bool(getattr(c, "tie_word_embeddings", False))
    vocab_size = sd["model.embed_tokens.weight"].shape[0]

    w = gguf.GGUFWriter(str(path), arch.name)
    w.add_name(name or Path(str(getattr(c, "_name_or_path", "") or "model")).name)
    w.add_file_type({"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(_rope(c).get("rope_theta", 10000.0)))
    if arch.rope_dim_key:
        w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab_size)
    with tempfile.TemporaryDirectory() as tok_dir:  # gguf's SpecialVocab reads the saved tokenizer files
        tokenizer.save_pretrained(tok_dir)
        _tokenizer_fields(w, tokenizer, Path(tok_dir), vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], c.num_hidden_layers)
    for key, t in sd.items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp writes output.weight only when it is not the embedding matrix
        if key.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise DeltaError(f"GGUF export: no llama.cpp name for tensor {key!r} of {type(model).__name__}")
        if arch.permute_qk and key.endswith("self_attn.q_proj.weight"):
            t = _permute(t, n_head)
        elif arch.permute_qk and key.endswith("self_attn.k_proj.weight"):
            t = _permute(t, n_kv)
        data, qtype = _tensor(t, dtype)
        w.add_tensor(new, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def load_gguf(path: str | os.PathLike):
    """(model, tokenizer) read back by transformers' own GGUF reader, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    with quiet_progress():  # no "Converting and de-quantizing GGUF tensors" bar in the user's console
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return model.eval(), tok


def logits_gap(a, b, inputs: dict) -> float:
    """max |logits(a) - logits(b)| on ``inputs``, both in float32."""
    with torch.no_grad():
        return float((a(**inputs).logits.float() - b(**inputs).logits.float()).abs().max())


__all__ = ["ARCHS", "DTYPES", "FORMATS", "GgufArch", "check_exportable", "write_gguf", "load_gguf", "logits_gap"]
