"""Prompt tuning (methods/prompt.py) on tiny Llama / GPT-2 / BERT: what reaches the model (embeddings,
labels, masks, token types, positions), generate(), init from text, save/load, switching and
composition with LoRA, and peft interop (files load both ways with equal outputs)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from conftest import tiny_bert, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_mlp
from deltatune.methods.prompt import virtual_positions

P = 3


def ids_(batch=2, seq=5, seed=0):
    return torch.randint(1, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def capture(model):
    """Record the kwargs that reach the model's own forward (after our pre-hook)."""
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    return seen


def greedy_manual(model, ids, n):
    for _ in range(n):  # no cache, full forward each step: the reference for generate()
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def test_inputs_reaching_the_model_are_extended():
    model = dt.attach(tiny_bert(), "prompt", num_virtual_tokens=P)
    seen = capture(model)
    ids = ids_()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    tt = torch.ones_like(ids)
    out = model(ids, attention_mask=mask, token_type_ids=tt)  # positional input_ids is bound too
    prompt = dt.adapter_tensors(model, "default")["prompt_embeddings"]
    emb = seen["inputs_embeds"]
    assert seen["input_ids"] is None and emb.shape == (2, P + 5, 32)
    torch.testing.assert_close(emb[:, :P], prompt.unsqueeze(0).expand(2, -1, -1))
    torch.testing.assert_close(emb[:, P:], model.get_input_embeddings()(ids))
    assert seen["attention_mask"].tolist() == [[1] * P + row for row in mask.tolist()]
    assert seen["token_type_ids"].tolist() == [[0] * P + [1] * 5] * 2
    assert out.last_hidden_state.shape == (2, P + 5, 32)
    assert virtual_positions(model) == P
    with dt.disabled(model):
        assert virtual_positions(model) == 0


def test_causal_lm_labels_and_loss():
    model = dt.attach(tiny_llama(), "prompt", num_virtual_tokens=P)
    seen = capture(model)
    ids = ids_()
    out = model(input_ids=ids, labels=ids)
    assert seen["labels"].tolist() == [[-100] * P + row for row in ids.tolist()]
    # the last virtual position predicts the first real token, as in peft
    manual = F.cross_entropy(out.logits[:, P - 1:-1].reshape(-1, 64), ids.reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_sequence_classification_trains_prompt_and_head():
    model = dt.attach(tiny_bert_cls(), "prompt", num_virtual_tokens=P)
    tensors = dt.adapter_tensors(model, "default")
    assert set(tensors) == {"prompt_embeddings", "classifier.weight", "classifier.bias"}
    start = {k: v.detach().clone() for k, v in tensors.items()}
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if ".deltas." not in k}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(input_ids=ids_(), labels=torch.tensor([0, 1]))  # (B,) labels stay as they are
    assert out.logits.shape == (2, 2)
    out.loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a base tensor changed"
    assert all(not torch.equal(tensors[k].detach(), start[k]) for k in tensors), "an adapter tensor did not train"


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_generate_matches_manual_forward(make):
    model = dt.attach(make(), "prompt", num_virtual_tokens=P)
    ids = ids_()
    ref = greedy_manual(model, ids, 5)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref)
    assert torch.equal(model.generate(ids, use_cache=False, **kw), ref)
    with dt.disabled(model):  # and the bare model generates something else
        assert not torch.equal(model.generate(ids, **kw), ref)


def test_generate_left_padding_matches_unpadded():
    model = dt.attach(tiny_llama(), "prompt", num_virtual_tokens=P)
    ids, mask = ids_(), torch.ones(2, 5, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 0, 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    both = model.generate(ids, attention_mask=mask, **kw)
    alone = model.generate(ids[1:, 2:], attention_mask=mask[1:, 2:], **kw)
    assert torch.equal(both[1, -4:], alone[0, -4:])


def test_init_from_text_and_round_trip(tmp_path):
    base = tiny_llama()
    fake_tok = lambda text, add_special_tokens=True: {"input_ids": [7, 8]}  # noqa: E731
    model = dt.attach(base, "prompt", num_virtual_tokens=5, init_text="spam or ham?", tokenizer=fake_tok)
    prompt = dt.adapter_tensors(model, "default")["prompt_embeddings"]
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(prompt, emb[[7, 8, 7, 8, 7]])  # repeated to P tokens (peft's rule)
    with torch.no_grad():
        prompt.add_(0.1)
    y = model(input_ids=ids_()).logits
    dt.save(model, tmp_path)
    saved = json.loads((tmp_path / "deltatune.json").read_text())["config"]
    assert saved["init_token_ids"] == [7, 8] and "tokenizer" not in saved
    fresh = dt.load(tiny_llama(), tmp_path)  # no tokenizer needed to load
    torch.testing.assert_close(fresh(input_ids=ids_()).logits, y)


def test_two_prompts_switch_and_stack():
    model = dt.attach(tiny_gpt2(), "prompt", num_virtual_tokens=2, name="a")
    dt.attach(model, "prompt", num_virtual_tokens=4, name="b")
    ids = ids_()
    ya = model(input_ids=ids).logits
    dt.activate(model, "b")
    yb = model(input_ids=ids).logits
    assert ya.shape[1] == 2 + 5 and yb.shape[1] == 4 + 5
    dt.activate(model, ["a", "b"])  # both: the prompts are concatenated in activation order
    seen = capture(model)
    assert model(input_ids=ids).logits.shape[1] == 2 + 4 + 5
    t = dt.adapter_tensors
    torch.testing.assert_close(seen["inputs_embeds"][0, :6], torch.cat([t(model, "a")["prompt_embeddings"],
                                                                        t(model, "b")["prompt_embeddings"]]))
    dt.delete(model, "a")
    dt.activate(model, "b")
    torch.testing.assert_close(model(input_ids=ids).logits, yb)


def test_composes_with_lora(tmp_path):
    model = dt.attach(tiny_llama(), "lora", targets=["q_proj", "v_proj"], name="lora")
    dt.attach(model, "prompt", num_virtual_tokens=P, name="p")
    with torch.no_grad():
        for t in dt.adapter_tensors(model, "lora").values():
            t.add_(0.1)
    ids = ids_()
    dt.activate(model, "p")
    y_p = model(input_ids=ids).logits
    dt.activate(model, ["lora", "p"])
    y_both = model(input_ids=ids).logits
    assert not torch.allclose(y_both, y_p, atol=1e-4)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(t) for n in ("lora", "p") for t in dt.adapter_tensors(model, n).values()}
    with pytest.raises(dt.DeltaError, match="cannot be merged"):
        dt.merge(model)
    dt.merge(model, "lora", unload=False)  # LoRA folds in, the prompt stays a prompt
    torch.testing.assert_close(model(input_ids=ids).logits, y_both, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    dt.activate(model, "lora")  # merging a copy drops the (inactive) prompt from the copy only
    plain = dt.merge(model, copy=True)
    assert not plain._forward_pre_hooks and not hasattr(plain, "deltatune_virtual")
    dt.activate(model, ["lora", "p"])
    torch.testing.assert_close(model(input_ids=ids).logits, y_both)
    dt.save(model, tmp_path / "lora", name="lora")
    dt.save(model, tmp_path / "p", name="p")
    fresh = dt.load(tiny_llama(), tmp_path / "lora", name="lora")
    dt.load(fresh, tmp_path / "p", name="p")
    dt.activate(fresh, ["lora", "p"])
    torch.testing.assert_close(fresh(input_ids=ids).logits, y_both, atol=1e-5, rtol=1e-5)


def test_clear_errors():
    with pytest.raises(dt.DeltaError, match="not a transformers model"):
        dt.attach(tiny_mlp(), "prompt")
    with pytest.raises(dt.DeltaError, match="init='text' needs"):
        dt.attach(tiny_llama(), "prompt", init="text")
    with pytest.raises(dt.DeltaError, match="needs a tokenizer"):
        dt.attach(tiny_llama(), "prompt", init_text="hello")
    with pytest.raises(dt.DeltaError, match="out of range"):
        dt.attach(tiny_llama(), "prompt", init_token_ids=[1000])
    with pytest.raises(dt.DeltaError, match="init must be one of"):
        dt.attach(tiny_llama(), "prompt", init="nope")
    model = tiny_llama()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(dt.DeltaError):  # fails after the prompt was built: everything is rolled back
        dt.attach(model, "prompt", modules_to_save=["no_such_module"])
    assert [n for n, _ in model.named_modules()] == names
    assert not model._forward_pre_hooks and not model._forward_hooks


# --------------------------------------------------------------------------- peft interop

peft = pytest.importorskip("peft")
CASES = {"llama": (tiny_llama, "CAUSAL_LM", "logits"), "gpt2": (tiny_gpt2, "CAUSAL_LM", "logits"),
         "bert": (tiny_bert, "FEATURE_EXTRACTION", "last_hidden_state"),
         "bert_cls": (tiny_bert_cls, "SEQ_CLS", "logits")}


def _peft_out(pm, key):
    ids = ids_()
    return getattr(pm(input_ids=ids, attention_mask=torch.ones_like(ids)), key)


@pytest.mark.parametrize("case", list(CASES))
def test_ours_loads_in_peft(case, tmp_path):
    make, _, key = CASES[case]
    model = dt.attach(make(), "prompt", num_virtual_tokens=P)
    with torch.no_grad():
        for t in dt.adapter_tensors(model, "default").values():
            t.add_(0.1)
    y = _peft_out(model, key)
    dt.save(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(_peft_out(pm, key), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_here(case, tmp_path):
    make, task, key = CASES[case]
    torch.manual_seed(0)
    pm = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)).eval()
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1)
    y = _peft_out(pm, key)
    pm.save_pretrained(str(tmp_path))
    model = dt.load(make(), tmp_path)
    torch.testing.assert_close(_peft_out(model, key), y, atol=1e-5, rtol=0)
