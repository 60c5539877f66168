"""Mixed-adapter batches: each row through its own adapter equals running that row alone, for every
method spec in the invariant matrix (methods that cannot route per row are skipped with the reason),
on every tiny model, with generate() and beam search.  Prompt / prefix rows in detail:
test_mixed_prompts.py."""
from __future__ import annotations

import contextlib

import pytest
import torch

import deltatune as dt
from conftest import MODELS
from specs import SPECS

ROWS = ["a", "b", None, "c", "a", "b"]  # non-contiguous groups + a bare-base row


def batch_input(model_name, n=len(ROWS)):
    g = torch.Generator().manual_seed(3)
    if model_name == "conv":
        return torch.randn(n, 3, 6, 6, generator=g)
    return torch.randint(0, 20 if model_name == "mlp" else 64, (n, 7), generator=g)


def out(model_name, o):
    return MODELS[model_name][2](o)


def perturbed(model, method, name, seed, **opts):
    """Attach adapter ``name`` and move its tensors off their init, so that it changes the output."""
    torch.manual_seed(seed)
    dt.attach(model, method, name=name, **opts)
    g = torch.Generator().manual_seed(10 + seed)
    with torch.no_grad():
        for t in dt.adapter_tensors(model, name).values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.2)
    return model


def three_adapters(model_name, spec):
    method, opts, per_model = SPECS[spec]
    if model_name in per_model and per_model[model_name] is None:
        pytest.skip(f"{spec} does not apply to {model_name}")
    model = MODELS[model_name][0]()
    for i, name in enumerate("abc"):
        perturbed(model, method, name, i, **{**opts, **per_model.get(model_name, {})})
    return model


@contextlib.contextmanager
def only(model, name):
    """Run the model through adapter ``name`` only (None: the bare base)."""
    if name is None:
        with dt.disabled(model):
            yield
    else:
        dt.activate(model, name)
        yield


def alone(model, model_name, x, name, **kw):
    with torch.no_grad(), only(model, name):
        return out(model_name, model(x, **kw))


def generate_alone(model, name, ids, **kw):
    with only(model, name):
        return model.generate(input_ids=ids, **kw)


def row_of(y, i, ref):
    """Row i of a mixed output, aligned with ``ref`` (that row run alone): prompt tuning prepends
    P_max positions to every row of a mixed batch, and a row of P_i tokens starts P_max - P_i later."""
    return y[i:i + 1, y.shape[1] - ref.shape[1]:] if y.dim() == 3 else y[i:i + 1]


@pytest.fixture(params=list(SPECS))
def spec(request):
    return request.param


@pytest.mark.parametrize("model_name", ["mlp", "conv", "llama"])  # GPT-2: generate test below
def test_rows_equal_running_alone(model_name, spec):
    model = three_adapters(model_name, spec)
    x = batch_input(model_name)
    try:
        with torch.no_grad(), dt.mixed(model, ROWS):
            y = out(model_name, model(x))
    except dt.DeltaError as e:
        pytest.skip(f"{spec}: no per-row routing: {e}")
    assert y.shape[0] == len(ROWS)
    for i, name in enumerate(ROWS):
        ref = alone(model, model_name, x[i:i + 1], name)
        torch.testing.assert_close(row_of(y, i, ref), ref, atol=2e-5, rtol=1e-4, msg=f"row {i} ({name})")
    # the rows really differ by adapter (else the check above is vacuous)
    assert not torch.allclose(y[0], y[1], atol=1e-4) or not torch.allclose(y[0], y[2], atol=1e-4)


def test_mixed_leaves_model_state_alone():
    model = three_adapters("mlp", "lora")
    dt.activate(model, "b")
    x = batch_input("mlp")
    before = model(x)
    with torch.no_grad(), dt.mixed(model, ROWS):
        model(x)
    assert dt.active_adapters(model) == ["b"]
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_and_beam_search(model_name, beams):
    model = three_adapters(model_name, "lora")
    rows = ["a", "b", None, "c"]
    ids = batch_input(model_name, len(rows))
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=beams, num_return_sequences=beams,
              pad_token_id=0, attention_mask=torch.ones_like(ids))
    got = dt.generate_mixed(model, rows, input_ids=ids, **kw)
    assert got.shape[0] == len(rows) * beams
    outs = set()
    for i, name in enumerate(rows):
        ref = generate_alone(model, name, ids[i:i + 1], **dict(kw, attention_mask=kw["attention_mask"][i:i + 1]))
        assert got[i * beams:(i + 1) * beams].tolist() == ref.tolist(), f"prompt {i} ({name})"
        outs.add(tuple(ref[0, ids.shape[1]:].tolist()))
    assert len(outs) > 1  # adapters change the continuation


def test_mixed_lora_of_different_ranks_and_variants():
    model = MODELS["llama"][0]()
    variants = {"r4": dict(r=4), "r8": dict(r=8), "r4b": dict(r=4, alpha=3.0), "dora": dict(r=4, dora=True)}
    for i, (name, opts) in enumerate(variants.items()):
        torch.manual_seed(i)
        dt.attach(model, "lora", name=name, **opts)
        with torch.no_grad():
            for t in dt.adapter_tensors(model, name).values():
                t.add_(torch.randn_like(t) * 0.2)
    rows = ["r4", "r8", "r4b", "dora", "r4", None]
    x = batch_input("llama", len(rows))
    with torch.no_grad(), dt.mixed(model, rows):
        y = model(x).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(y[i:i + 1], alone(model, "llama", x[i:i + 1], name), atol=2e-5, rtol=1e-4)


def test_gradients_reach_only_the_rows_adapter():
    model = three_adapters("mlp", "lora")
    model.train()
    x = batch_input("mlp")
    for t in model.parameters():
        t.requires_grad_(False)
    for n in "abc":
        for t in dt.adapter_tensors(model, n).values():
            t.requires_grad_(True)
    rows = ["a", "a", None, "b", None, None]  # "c" unused
    with dt.mixed(model, rows):
        model(x).pow(2).sum().backward()
    assert all(t.grad is None or not t.grad.any() for t in dt.adapter_tensors(model, "c").values())
    assert any(t.grad is not None and t.grad.any() for t in dt.adapter_tensors(model, "a").values())
    assert any(t.grad is not None and t.grad.any() for t in dt.adapter_tensors(model, "b").values())
    # the gradient of row group a equals that of running rows 0, 1 alone on a
    ga = {k: t.grad.clone() for k, t in dt.adapter_tensors(model, "a").items()}
    model.zero_grad()
    dt.activate(model, "a")
    model(x[:2]).pow(2).sum().backward()
    for k, t in dt.adapter_tensors(model, "a").items():
        torch.testing.assert_close(ga[k], t.grad, atol=1e-5, rtol=1e-4)


def test_clear_errors():
    model = three_adapters("mlp", "lora")
    x = batch_input("mlp")
    with pytest.raises(dt.DeltaError, match="unknown adapter"):
        with dt.mixed(model, ["a", "zz"]):
            pass
    with pytest.raises(dt.DeltaError, match="one name"):
        with dt.mixed(model, "a"):
            pass
    with pytest.raises(dt.DeltaError, match="batch of 6 rows"):
        with torch.no_grad(), dt.mixed(model, ["a"] * 4):
            model(x)
    with pytest.raises(dt.DeltaError, match="generate_mixed"):
        dt.generate_mixed(model, ["a"], input_ids=x)
    dt.merge(model, ["a"], unload=False)
    with pytest.raises(dt.DeltaError, match="merged"):
        with dt.mixed(model, ["a"] * 6):
            pass


def test_row_plan_expansion():
    from deltatune.mixed import RowPlan

    plan = RowPlan(["a", None, "a"])
    names, groups = plan.expand(6, torch.device("cpu"))  # 2 beams per prompt
    assert names == ["a", "a", None, None, "a", "a"]
    assert groups["a"][0].tolist() == [0, 1, 4, 5] and groups["a"][1] is None
    assert groups[None][0].tolist() == [2, 3] and groups[None][1] == slice(2, 4)
    assert plan.expand(6, torch.device("cpu"))[1] is groups  # cached per batch size


def test_cached_stacks_follow_weight_changes():
    """Inside one mixed context the stacked LoRA weights are cached; an in-place change (training
    step, hot-swap) must still be seen."""
    model = three_adapters("llama", "lora")
    x = batch_input("llama")
    with torch.no_grad(), dt.mixed(model, ROWS):
        y0 = model(x).logits
        for t in dt.adapter_tensors(model, "b").values():
            t.mul_(2.0)
        y1 = model(x).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(y1[i:i + 1], alone(model, "llama", x[i:i + 1], name), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(y0[1], y1[1]) and torch.equal(y0[0], y1[0])


def test_stack_cache_follows_adapter_set_changes():
    """The stacked weights persist on the layer across mixed blocks; adding, deleting or
    hot-swapping adapters must invalidate them."""
    model = three_adapters("llama", "lora")
    x = batch_input("llama")
    with torch.no_grad(), dt.mixed(model, ROWS):
        model(x)
    dt.delete(model, "c")
    torch.manual_seed(7)
    dt.attach(model, "lora", name="c", r=8)  # same name, new weights
    with torch.no_grad():
        for t in dt.adapter_tensors(model, "c").values():
            t.add_(torch.randn_like(t) * 0.2)
    dt.hot_swap(model, "a", {k: v * 0.5 for k, v in dt.adapter_tensors(model, "a").items()})
    with torch.no_grad(), dt.mixed(model, ROWS):
        y = model(x).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(y[i:i + 1], alone(model, "llama", x[i:i + 1], name), atol=2e-5, rtol=1e-4)


def test_mixed_on_deberta_v2_says_why_not_one_name_per_row():
    """DeBERTa-v2 runs its relative-position embeddings through the adapted key/query
    projections (a batch of 1, not one per row): refuse saying so, not "pass one name per row"."""
    import warnings

    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=32, relative_attention=True,
                          pos_att_type=["p2c", "c2p"], max_relative_positions=8, share_att_key=True,
                          position_buckets=8, norm_rel_ebd="layer_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = DebertaV2Model(cfg).eval()
    dt.attach(m, "lora", name="a", targets=["query_proj", "key_proj"])
    dt.attach(m, "lora", name="b", targets=["query_proj", "key_proj"])
    ids = torch.randint(3, 60, (3, 5))
    with pytest.raises(dt.DeltaError) as e, torch.no_grad(), dt.mixed(m, ["a", "b", None]):
        m(input_ids=ids)
    assert "shared, non-batch tensors (e.g. DeBERTa" in str(e.value) and "own batch" in str(e.value)
