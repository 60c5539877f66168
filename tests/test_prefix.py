"""Prefix tuning (methods/prefix.py) on tiny Llama (grouped-query attention) / GPT-2 / BERT: the
cache really holds the prefix, masks and positions line up, generate() works with and without a
cache, the MLP folds away exactly, save/load, and peft interop both ways with equal outputs."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.fast import enable_checkpointing
from conftest import tiny_bert, tiny_bert_cls, tiny_gpt2, tiny_llama
from deltatune.methods.prefix import fold
from test_prompt import capture, greedy_manual, ids_

P = 3


def perturbed(model, name="default", scale=0.1):
    with torch.no_grad():
        for t in dt.adapter_tensors(model, name).values():
            t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) * scale)
    return model


def test_cache_holds_the_prefix_and_mask_is_extended():
    model = dt.attach(tiny_llama(), "prefix", num_virtual_tokens=P, encoder_hidden_size=16)
    seen = capture(model)
    ids = ids_()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    enc = model.deltatune_virtual.deltas["default"]
    kv = enc.key_values()  # (L, 2, H_kv, P, d_h) = (2, 2, 2, 3, 8) for the tiny Llama
    assert kv.shape == (2, 2, 2, P, 8)
    cache = out.past_key_values
    assert cache.get_seq_length() == P + 5
    for layer in range(2):
        torch.testing.assert_close(cache.layers[layer].keys[:, :, :P], kv[layer, 0].expand(2, -1, -1, -1))
        torch.testing.assert_close(cache.layers[layer].values[:, :, :P], kv[layer, 1].expand(2, -1, -1, -1))
    assert seen["attention_mask"].shape == (2, P + 5)
    assert out.logits.shape == (2, 5, 64)  # a prefix adds no output positions


def test_positions_follow_the_cache():
    """Explicit position_ids 0..T-1 are shifted by P, as the model itself does from the cache length."""
    model = perturbed(dt.attach(tiny_llama(), "prefix", num_virtual_tokens=P))
    ids = ids_()
    y_default = model(input_ids=ids).logits
    y_explicit = model(input_ids=ids, position_ids=torch.arange(5).expand(2, -1)).logits
    torch.testing.assert_close(y_explicit, y_default)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_generate_matches_manual_forward(make):
    model = perturbed(dt.attach(make(), "prefix", num_virtual_tokens=P, encoder_hidden_size=16))
    ids = ids_()
    ref = greedy_manual(model, ids, 5)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref)
    assert torch.equal(model.generate(ids, use_cache=False, **kw), ref)
    with dt.disabled(model):
        assert not torch.equal(model.generate(ids, **kw), ref)


def test_generate_left_padding_and_prompt_plus_prefix():
    model = dt.attach(tiny_llama(), "prefix", num_virtual_tokens=2, name="f")
    dt.attach(model, "prompt", num_virtual_tokens=P, name="p")
    dt.activate(model, ["p", "f"])  # both at once: prompt in the input, prefix in the cache
    ids, mask = ids_(), torch.ones(2, 5, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 0, 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    both = model.generate(ids, attention_mask=mask, **kw)
    alone = model.generate(ids[1:, 2:], attention_mask=mask[1:, 2:], **kw)
    assert torch.equal(both[1, -4:], alone[0, -4:])
    assert torch.equal(model.generate(ids[:1], **kw), greedy_manual(model, ids[:1], 4))


def test_bert_encoder_attends_to_prefix_and_respects_padding():
    model = perturbed(dt.attach(tiny_bert(), "prefix", num_virtual_tokens=P, encoder_hidden_size=16))
    ids = ids_(batch=1, seq=6)
    y = model(input_ids=ids).last_hidden_state
    with dt.disabled(model):
        assert not torch.allclose(model(input_ids=ids).last_hidden_state, y, atol=1e-4)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    y_pad = model(input_ids=padded, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(y_pad[:, :6], y, atol=1e-5, rtol=1e-5)


def test_fold_is_exact_and_is_what_is_saved(tmp_path):
    model = perturbed(dt.attach(tiny_gpt2(), "prefix", num_virtual_tokens=P, encoder_hidden_size=16))
    assert set(dt.adapter_tensors(model, "default")) == {
        "prefix_encoder.embedding", "prefix_encoder.mlp.0.weight", "prefix_encoder.mlp.0.bias",
        "prefix_encoder.mlp.2.weight", "prefix_encoder.mlp.2.bias"}
    ids = ids_()
    y = model(input_ids=ids).logits
    dt.save(model, tmp_path / "a")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in sd.items()} == {"prompt_embeddings": (P, 2 * 2 * 32)}
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["prefix_projection"] is False
    fold(model)
    table = dt.adapter_tensors(model, "default")
    assert set(table) == {"prompt_embeddings"} and table["prompt_embeddings"].requires_grad
    torch.testing.assert_close(table["prompt_embeddings"].detach(), sd["prompt_embeddings"])
    torch.testing.assert_close(model(input_ids=ids).logits, y, atol=1e-6, rtol=1e-6)
    fresh = dt.load(tiny_gpt2(), tmp_path / "a", trainable=True)
    torch.testing.assert_close(fresh(input_ids=ids).logits, y, atol=1e-6, rtol=1e-6)
    assert all(t.requires_grad for t in dt.adapter_tensors(fresh, "default").values())


def test_init_from_text_copies_real_keys_and_values(tmp_path):
    base = tiny_llama()
    fake_tok = lambda text, add_special_tokens=True: {"input_ids": [7, 8]}  # noqa: E731
    model = dt.attach(base, "prefix", num_virtual_tokens=P, prefix_projection=False, init_text="hi", tokenizer=fake_tok)
    with dt.disabled(model):
        real = model(input_ids=torch.tensor([[7, 8, 7]]), use_cache=True).past_key_values
    kv = model.deltatune_virtual.deltas["default"].key_values()  # (L, 2, H_kv, P, d_h)
    for layer in range(2):
        torch.testing.assert_close(kv[layer, 0], real.layers[layer].keys[0])
        torch.testing.assert_close(kv[layer, 1], real.layers[layer].values[0])
    dt.save(model, tmp_path)
    assert json.loads((tmp_path / "deltatune.json").read_text())["config"]["init_token_ids"] == [7, 8]
    with pytest.raises(dt.DeltaError, match="prefix_projection=False"):
        dt.attach(tiny_llama(), "prefix", init="vocab")


def test_only_prefix_trains_and_clear_errors():
    model = dt.attach(tiny_llama(), "prefix", num_virtual_tokens=P)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("deltatune_virtual.deltas.default.") for n in trainable)
    with pytest.raises(dt.DeltaError, match="cannot be merged"):
        dt.merge(model)
    with pytest.raises(dt.DeltaError, match="positive integer"):
        dt.attach(tiny_llama(), "prefix", num_virtual_tokens=0)
    gc = tiny_llama()
    enable_checkpointing(gc)
    with pytest.raises(dt.DeltaError, match="gradient checkpointing"):
        dt.attach(gc, "prefix")


# --------------------------------------------------------------------------- peft interop

peft = pytest.importorskip("peft")
CASES = {"llama": (tiny_llama, "CAUSAL_LM", "logits"), "gpt2": (tiny_gpt2, "CAUSAL_LM", "logits"),
         "bert": (tiny_bert, "FEATURE_EXTRACTION", "last_hidden_state"),
         "bert_cls": (tiny_bert_cls, "SEQ_CLS", "logits")}


def _out(m, key):
    ids = ids_()
    return getattr(m(input_ids=ids, attention_mask=torch.ones_like(ids)), key)


def _peft_out(pm, key):
    """peft's output, or a skip naming the versions when peft itself cannot run prefix tuning on
    this model (peft <= 0.21 looks for the old ``past_key_values`` name on sequence-classification
    backbones, which transformers renamed to ``cache``)."""
    try:
        return _out(pm, key)
    except ValueError as e:
        if "does not support past key values" not in str(e):
            raise
        import transformers
        pytest.skip(f"peft {peft.__version__} cannot run prefix tuning on {type(pm.base_model).__name__} "
                    f"with transformers {transformers.__version__}: {e}")


def _refused_here(make) -> bool:
    """Older transformers (< 5) give BertForSequenceClassification no way to pass a cache to BERT:
    prefix tuning must then be refused at attach with a clear message (checked), not break later."""
    from deltatune.methods import _virtual_tokens as vt

    model = make()
    if vt.cache_kwarg(model) is not None:
        return False
    with pytest.raises(dt.DeltaError, match="does not pass a KV cache on to BertModel"):
        dt.attach(model, "prefix", num_virtual_tokens=P)
    return True


@pytest.mark.parametrize("case", list(CASES))
def test_ours_loads_in_peft(case, tmp_path):
    make, _, key = CASES[case]
    if _refused_here(make):
        return
    model = perturbed(dt.attach(make(), "prefix", num_virtual_tokens=P, encoder_hidden_size=16))
    y = _out(model, key)
    dt.save(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(_peft_out(pm, key), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_here(case, tmp_path):
    make, task, key = CASES[case]
    if _refused_here(make):
        return
    torch.manual_seed(0)
    cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=16)
    pm = peft.get_peft_model(make(), cfg).eval()
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    y = _peft_out(pm, key)
    pm.save_pretrained(str(tmp_path))
    model = dt.load(make(), tmp_path)
    torch.testing.assert_close(_out(model, key), y, atol=1e-5, rtol=0)
