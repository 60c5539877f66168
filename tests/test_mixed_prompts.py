"""Prompt and prefix tuning rows in mixed batches (methods/_virtual_tokens.py): each row gets its own
adapter's virtual tokens, and rows needing fewer (shorter prompts, None / LoRA rows, prefix rows
next to prompt rows) get masked slots; every row must equal running it alone (forward, labels,
gradients, generate with beams), and what cannot be exact is refused with a clear DeltaError."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import MODELS, tiny_bert
from deltatune.methods.prompt import virtual_positions
from test_mixed import alone, generate_alone, only, out, perturbed, row_of

TOL = 1e-5  # max abs difference between a mixed row and the row run alone

ADAPTERS = {  # name -> (method, options)
    "p3a": ("prompt", dict(num_virtual_tokens=3)),
    "p3b": ("prompt", dict(num_virtual_tokens=3, init="random")),
    "p3c": ("prompt", dict(num_virtual_tokens=3)),
    "p2": ("prompt", dict(num_virtual_tokens=2)),
    "f3a": ("prefix", dict(num_virtual_tokens=3, encoder_hidden_size=16)),
    "f3b": ("prefix", dict(num_virtual_tokens=3, prefix_projection=False)),
    "f2": ("prefix", dict(num_virtual_tokens=2, prefix_projection=False)),
    "lora": ("lora", {}),
}


def zoo(model_name, names=tuple(ADAPTERS)):
    model = MODELS[model_name][0]()
    for i, name in enumerate(names):
        method, opts = ADAPTERS[name]
        perturbed(model, method, name, i, **opts)
    return model


def tokens(n, t=6):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(5))


def left_padded(ids):
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 left-padded by 2, row 2 by 1
    mask[2, :1] = 0
    return mask


def check_rows(model, model_name, rows, x, **kw):
    """Run ``rows`` as one mixed batch and compare every row with the row run alone."""
    with torch.no_grad(), dt.mixed(model, rows):
        y = out(model_name, model(x, **kw))
        lead = virtual_positions(model)
    assert y.shape[:2] == (len(rows), lead + x.shape[1])  # every row carries P_max virtual positions
    for i, name in enumerate(rows):
        ref = alone(model, model_name, x[i:i + 1], name, **{k: v[i:i + 1] for k, v in kw.items()})
        diff = (row_of(y, i, ref) - ref).abs().max().item()
        assert diff <= TOL, f"row {i} ({name}): max abs diff {diff}"
    return y


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_prompt_rows_of_equal_length(model_name):
    model = zoo(model_name, ("p3a", "p3b", "p3c"))
    rows = ["p3a", "p3b", "p3c", "p3a"]
    y = check_rows(model, model_name, rows, tokens(4))
    assert not torch.allclose(y[0], y[1], atol=1e-3) and not torch.allclose(y[1], y[2], atol=1e-3)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("call", ["plain", "left_padded", "positions"])
def test_prompt_rows_with_shorter_prompts_base_and_lora_rows(model_name, call):
    model = zoo(model_name, ("p3a", "p3b", "p2", "lora"))
    rows = ["p3a", None, "lora", "p2", "p3b"]
    x = tokens(len(rows))
    kw = {}
    if call != "plain":
        kw["attention_mask"] = left_padded(x)
    if call == "positions":  # what generate() passes: counted from the mask
        kw["position_ids"] = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    check_rows(model, model_name, rows, x, **kw)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_prefix_rows(model_name):
    model = zoo(model_name, ("f3a", "f3b", "f2", "lora"))
    x = tokens(6)
    check_rows(model, model_name, ["f3a", "f3b", "f3a", "f3b", "f3b", "f3a"], x)  # equal lengths
    y = check_rows(model, model_name, ["f3a", "f3b", None, "lora", "f2", "f3a"], x, attention_mask=left_padded(x))
    assert y.shape[1] == x.shape[1]  # a prefix adds no output positions


def test_prompt_and_prefix_rows_in_one_batch():
    model = zoo("llama")
    rows = ["p3a", "f3a", "p2", "f2", None, "lora", "f3b", "p3c"]
    x = tokens(len(rows))
    check_rows(model, "llama", rows, x, attention_mask=left_padded(x))


def test_active_prompt_adapter_is_ignored_by_mixed_rows():
    """Inside dt.mixed the rows decide, as for LoRA: an active prompt adapter is not prepended."""
    model = zoo("llama", ("p3a", "lora"))
    dt.activate(model, ["p3a", "lora"])
    x = tokens(2)
    with torch.no_grad(), dt.mixed(model, ["lora", None]):
        y = model(x).logits
        assert virtual_positions(model) == 0
    assert y.shape[1] == x.shape[1]
    for i, name in enumerate(["lora", None]):
        assert (y[i:i + 1] - alone(model, "llama", x[i:i + 1], name)).abs().max() <= TOL


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_mixed_virtual_rows(model_name, beams):
    model = zoo(model_name)
    rows = ["p3a", "f3a", "p2", None, "lora", "f2"]
    ids = tokens(len(rows), 5)
    mask = left_padded(ids)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=beams, num_return_sequences=beams, pad_token_id=0)
    got = dt.generate_mixed(model, rows, input_ids=ids, attention_mask=mask, **kw)
    assert got.shape[0] == len(rows) * beams
    conts = set()
    for i, name in enumerate(rows):
        ref = generate_alone(model, name, ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)
        assert got[i * beams:(i + 1) * beams].tolist() == ref.tolist(), f"prompt {i} ({name})"
        conts.add(tuple(ref[0, ids.shape[1]:].tolist()))
    assert len(conts) > 2  # the adapters change the continuations


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_mixed_without_mask_or_cache(use_cache):
    """generate() drops an all-ones mask, so the hook builds one; use_cache=False re-runs the full
    sequence every step, so the prompt is prepended each time."""
    model = zoo("gpt2", ("p3a", "p2", "f2"))
    rows = ["p3a", "p2", None, "f2"]
    ids = tokens(len(rows), 4) + 1  # no pad token (0): generate() infers an all-ones mask
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=use_cache)
    got = dt.generate_mixed(model, rows, input_ids=ids, **kw)
    for i, name in enumerate(rows):
        ref = generate_alone(model, name, ids[i:i + 1], **kw)
        assert got[i:i + 1].tolist() == ref.tolist(), f"prompt {i} ({name})"


def test_decoding_by_hand_without_mask_or_positions():
    """A cached step with neither mask nor positions: the hook derives both from the cache length."""
    model = zoo("llama", ("p3a", "p2", "f2", "f3a"))
    rows = ["p3a", None, "f2", "p2", "f3a"]
    x, nxt = tokens(len(rows)), tokens(len(rows), 2)

    def two_steps(ids, new):
        first = model(ids, use_cache=True)
        return model(new, past_key_values=first.past_key_values, use_cache=True).logits  # (B, 2, V)

    with torch.no_grad(), dt.mixed(model, rows):
        y = two_steps(x, nxt)
    for i, name in enumerate(rows):
        with torch.no_grad(), only(model, name):
            ref = two_steps(x[i:i + 1], nxt[i:i + 1])
        assert (y[i:i + 1] - ref).abs().max() <= TOL, f"row {i} ({name})"


def test_labels_loss_equals_the_rows_alone():
    """The mixed loss averages the same token losses as the rows alone: a row without a prompt must
    not predict its first token from a masked slot."""
    model = zoo("llama", ("p3a", "p2", "f2"))
    rows = ["p3a", None, "p2", "f2"]
    x = tokens(len(rows))
    with torch.no_grad(), dt.mixed(model, rows):
        loss = model(x, labels=x).loss
    total, count = 0.0, 0
    for i, name in enumerate(rows):
        n = x.shape[1] - (0 if name in ("p3a", "p2") else 1)  # targets: a prompt row predicts all T tokens
        with torch.no_grad(), only(model, name):
            li = model(x[i:i + 1], labels=x[i:i + 1]).loss
        total, count = total + li * n, count + n
    assert abs(loss.item() - (total / count).item()) <= TOL


def test_gradients_reach_each_rows_prompt():
    model = zoo("llama", ("p3a", "p3b", "p3c"))
    model.train()
    for t in model.parameters():
        t.requires_grad_(False)
    for n in ("p3a", "p3b", "p3c"):
        dt.adapter_tensors(model, n)["prompt_embeddings"].requires_grad_(True)
    x = tokens(4)
    with dt.mixed(model, ["p3a", "p3b", "p3a", None]):
        model(x).logits.pow(2).sum().backward()
    grad = {n: dt.adapter_tensors(model, n)["prompt_embeddings"].grad for n in ("p3a", "p3b", "p3c")}
    assert grad["p3c"] is None and grad["p3b"].abs().sum() > 0
    ga = grad["p3a"].clone()
    model.zero_grad()
    dt.activate(model, "p3a")
    model(x[[0, 2]]).logits.pow(2).sum().backward()
    torch.testing.assert_close(ga, dt.adapter_tensors(model, "p3a")["prompt_embeddings"].grad, atol=1e-5, rtol=1e-4)


def test_encoder_rows_of_equal_length_work_and_padding_is_refused():
    """BERT's output is exact when every row has the same number of prompt tokens; padding a row
    would put a masked slot where its [CLS]-reading head looks, so that is refused."""
    model = tiny_bert()
    for i, name in enumerate(("p3a", "p3b", "p2")):
        perturbed(model, ADAPTERS[name][0], name, i, **ADAPTERS[name][1])
    check_rows(model, "bert", ["p3a", "p3b", "p3b"], tokens(3))
    for rows in (["p3a", None], ["p3a", "p2"]):
        with pytest.raises(dt.DeltaError, match=r"not a causal LM.*same virtual tokens"):
            with dt.mixed(model, rows):
                pass


def test_clear_errors_name_rows_and_fix():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4)
    model = MistralForCausalLM(cfg).eval()
    for i, name in enumerate(("p3a", "f2")):
        perturbed(model, ADAPTERS[name][0], name, i, **ADAPTERS[name][1])
    with pytest.raises(dt.DeltaError, match=r"'p3a' \(rows \[0, 2\]\): 3 prompt tokens, 'f2' \(rows \[1\]\): "
                                            r"2 prefix tokens.*sliding window.*separate batches"):
        with dt.mixed(model, ["p3a", "f2", "p3a"]):
            pass
    check_rows(model, "llama", ["p3a", None, "p3a"], tokens(3))  # padded prompt rows stay exact ("llama": read .logits)
    dt.attach(model, "ln", name="norms")  # selectors change base tensors every row shares
    with pytest.raises(dt.DeltaError, match="'norms' .*shared by every row"):
        with dt.mixed(model, ["p3a", "norms"]):
            pass


@pytest.mark.parametrize("model_type", ["opt", "llama", "gpt2"])
def test_left_padded_base_row_next_to_a_prompt_row_on_real_families(model_type):
    """OPT numbers positions from the attention mask: the base row's real tokens must keep the
    positions they have alone (was off by 0.30)."""
    from zoo import build_causal_lm

    model = build_causal_lm(model_type)
    dt.attach(model, "prompt", name="p", num_virtual_tokens=3)
    with torch.no_grad():
        dt.adapter_tensors(model, "p")["prompt_embeddings"].add_(0.5)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad(), dt.mixed(model, ["p", None]):
        y = model(input_ids=ids, attention_mask=mask).logits  # (2, 3 + 6, V)
    with torch.no_grad():
        dt.activate(model, "p")
        y0 = model(input_ids=ids[:1], attention_mask=mask[:1]).logits
        with dt.disabled(model):
            y1 = model(input_ids=ids[1:], attention_mask=mask[1:]).logits
    torch.testing.assert_close(y[0], y0[0], atol=TOL, rtol=0)
    torch.testing.assert_close(y[1, 3 + 2:], y1[0, 2:], atol=TOL, rtol=0)  # the real tokens
