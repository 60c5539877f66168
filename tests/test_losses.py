"""deltatune.losses: the chunked causal-LM loss equals transformers' own loss and gradients."""
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.train.losses import chunked_causal_lm_loss, linear_cross_entropy


def llama(vocab=97, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()  # eval: no dropout


def nudge_b(model):
    torch.manual_seed(3)
    for n, p in model.named_parameters():
        if "lora_B" in n or "lora_embedding" in n:
            nn.init.normal_(p, std=0.1)


def data(vocab=97, b=3, t=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, -3:] = -100  # padding
    return ids, labels


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_same(model, chunk, **kw):
    ids, labels = data(model.config.vocab_size)
    ref = model(input_ids=ids, labels=labels, **kw).loss
    g_ref = grads(model, ref)
    got = chunked_causal_lm_loss(model, ids, labels, chunk=chunk, **kw)
    g_got = grads(model, got)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert g_ref and g_ref.keys() == g_got.keys()
    for k in g_ref:
        torch.testing.assert_close(g_got[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("chunk,tied", [(1, True), (5, False), (1000, True)])
def test_lora_llama_same_loss_and_grads(chunk, tied):
    m = llama(tied=tied)
    dt.attach(m, "lora", targets=["q_proj", "v_proj"])
    nudge_b(m)
    check_same(m, chunk)


def test_full_finetuning_including_tied_head_grad():
    m = llama(tied=True)  # the head weight trains twice: as the embedding and as the head
    check_same(m, 4)


def test_gpt2_and_attention_mask():
    m = gpt2()
    dt.attach(m, "lora", targets=["c_attn"])
    nudge_b(m)
    ids, _ = data()
    check_same(m, 7, attention_mask=torch.ones_like(ids))


def test_adapter_on_the_head_uses_checkpointed_chunks():
    m = llama(tied=False)
    dt.attach(m, "lora", targets=["q_proj", "lm_head"])
    nudge_b(m)
    assert isinstance(m.get_output_embeddings(), dt.DeltaLayer)
    check_same(m, 6)


def test_num_items_in_batch_and_no_grad():
    m = llama()
    ids, labels = data()
    ref = m(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    got = chunked_causal_lm_loss(m, ids, labels, num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(got, ref)
    with torch.no_grad():
        torch.testing.assert_close(chunked_causal_lm_loss(m, ids, labels, chunk=3), m(input_ids=ids, labels=labels).loss)


def test_linear_head_with_bias_matches_cross_entropy():
    torch.manual_seed(0)
    head = nn.Linear(8, 13)
    h = torch.randn(4, 5, 8, requires_grad=True)
    y = torch.randint(0, 13, (4, 5))
    y[1, 2] = -100
    ref = nn.functional.cross_entropy(head(h).flatten(0, 1), y.flatten())
    ref.backward()
    g_ref = [t.grad.clone() for t in (h, head.weight, head.bias)]
    for t in (h, head.weight, head.bias):
        t.grad = None
    got = linear_cross_entropy(h, head, y, chunk=3)
    (got * 2).backward()  # the incoming gradient is applied
    torch.testing.assert_close(got, ref)
    for a, b in zip([t.grad for t in (h, head.weight, head.bias)], g_ref):
        torch.testing.assert_close(a, 2 * b)


def test_no_full_logits_are_saved_for_backward():
    m = llama(vocab=2000)
    dt.attach(m, "lora", targets=["q_proj", "v_proj"])
    ids, labels = data(vocab=2000, b=4, t=16)
    biggest = []

    def pack(t):
        biggest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_causal_lm_loss(m, ids, labels, chunk=8)
    assert max(biggest) < 8 * 2000  # no (B·T, V) logits or log-probs survive the forward
    biggest.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(input_ids=ids, labels=labels)
    assert max(biggest) >= 4 * 15 * 2000  # ...while the plain path keeps them


def test_errors():
    m = llama()
    with pytest.raises(dt.DeltaError, match="needs labels"):
        chunked_causal_lm_loss(m, data()[0])
    with pytest.raises(dt.DeltaError, match="output head"):
        chunked_causal_lm_loss(nn.Linear(2, 2), data()[0], data()[1])
    with pytest.raises(dt.DeltaError, match="chunk"):
        linear_cross_entropy(torch.randn(2, 4), nn.Linear(4, 3), torch.tensor([0, 1]), chunk=0)


def test_trainer_batch_loss_is_the_chunked_loss_with_the_models_value():
    """The CLI's causal-LM loss_fn: same loss and gradients as model(**batch).loss, masks included."""
    from deltatune.train.losses import causal_lm_batch_loss

    m = llama()
    dt.attach(m, "lora", targets=["q_proj", "v_proj"])
    nudge_b(m)
    ids, labels = data()
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    ref = m(**batch).loss
    g_ref = grads(m, ref)
    got = causal_lm_batch_loss(m, batch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for k, v in grads(m, got).items():
        torch.testing.assert_close(v, g_ref[k], rtol=1e-4, atol=1e-6, msg=k)
    # no transformers head: the model's own loss is used
    plain = nn.Linear(2, 2)
    plain_loss = lambda **b: type("O", (), {"loss": b["x"].sum()})()  # noqa: E731
    assert causal_lm_batch_loss(type("M", (), {"__call__": lambda self, **b: plain_loss(**b)})(),
                                {"x": torch.ones(2)}).item() == 2.0
    del plain


def test_prompt_tuning_scores_the_first_real_token_like_the_model():
    """With P virtual tokens the model's loss includes predicting token 0 from the last virtual
    position; the chunked loss must too (and in a mixed batch it defers to the model)."""
    m = llama()
    dt.attach(m, "prompt", num_virtual_tokens=4, name="p4")
    dt.attach(m, "prompt", num_virtual_tokens=2, name="p2")
    dt.activate(m, "p4")
    ids, labels = data()
    check_same(m, chunk=5)
    with dt.mixed(m, ["p4", None, "p2"]):
        ref = m(input_ids=ids, labels=labels).loss
        got = chunked_causal_lm_loss(m, ids, labels)
    torch.testing.assert_close(got, ref)
