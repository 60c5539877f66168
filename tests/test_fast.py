"""deltatune.fast: every speed/memory switch keeps the plain computation's loss and gradients."""
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.fast import compile_blocks, compile_step, enable_checkpointing, lora_dropout_addmm


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def lora_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def nudge(model):
    torch.manual_seed(3)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0])
    assert a[1] and a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_dropout_branch_equals_plain_dropout_with_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, requires_grad=True)
    y = torch.randn(3, 5, 4, requires_grad=True)
    a = torch.randn(2, 6, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    p, s = 0.3, 1.5
    torch.manual_seed(11)
    out = lora_dropout_addmm(x, y, a, b, s, p)
    torch.manual_seed(11)
    keep = torch.rand_like(x) >= p  # the same draw
    ref = y + s * ((x * keep / (1 - p)) @ a.t()) @ b.t()
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, y, a, b), go)
    want = torch.autograd.grad(ref, (x, y, a, b), go)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_dropout_branch_saves_less_than_nn_dropout():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)  # as if the previous layer needed x's grad
    y = torch.randn(64, 48, requires_grad=True)
    a = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(48, 4, requires_grad=True)
    drop = nn.Dropout(0.1)
    plain = saved_bytes(lambda: torch.addmm(y, drop(x) @ a.t(), b.t(), alpha=2.0))
    fused = saved_bytes(lambda: lora_dropout_addmm(x, y, a, b, 2.0, 0.1))
    assert fused <= plain - x.numel() * 4 + x.numel()  # one fp32 copy of x traded for a bool mask


def test_lora_with_dropout_trains_and_is_exact_in_eval():
    m = llama()
    dt.attach(m, "lora", r=4, dropout=0.2, targets=["q_proj", "v_proj"])
    nudge(m)
    m.train()
    m(input_ids=ids(), labels=ids()).loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    m.eval()  # no dropout: the layer must equal the merged weights W + s·BA
    with torch.no_grad():
        out = m(input_ids=ids()).logits
        merged = dt.merge(m, copy=True)(input_ids=ids()).logits
    torch.testing.assert_close(out, merged, rtol=1e-4, atol=1e-5)


def test_checkpointing_keeps_adapter_gradients():
    m = llama()
    dt.attach(m, "lora", targets=["q_proj", "v_proj"])
    nudge(m)
    m.train()
    loss = lambda mm: mm(input_ids=ids(), labels=ids()).loss  # noqa: E731
    plain = lora_grads(m, loss)
    enable_checkpointing(m)
    assert any(getattr(x, "gradient_checkpointing", False) for x in m.modules())
    got = lora_grads(m, loss)
    assert_same(got, plain)
    assert_same(lora_grads(m, lambda mm: dt.chunked_causal_lm_loss(mm, ids(), ids(), chunk=4)), plain)


def test_checkpointing_error_for_plain_modules():
    with pytest.raises(dt.DeltaError, match="checkpointing"):
        enable_checkpointing(nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("how", [pytest.param("step", marks=pytest.mark.heavy), "blocks"])  # step: minutes of compiling, `make test`
def test_compiled_equals_eager(how):
    """torch.compile of the whole step (compile_step) or of each block (compile_blocks) keeps the
    loss and the adapter gradients of eager mode."""
    m = llama()
    dt.attach(m, "lora", targets=["q_proj", "v_proj"])
    nudge(m)
    m.train()
    eager = lora_grads(m, lambda mm: dt.chunked_causal_lm_loss(mm, ids(), ids(), chunk=4))
    if how == "step":
        step = compile_step(lambda: dt.chunked_causal_lm_loss(m, ids(), ids(), chunk=4))
        got = lora_grads(m, lambda mm: step())
    else:
        compile_blocks(m)
        got = lora_grads(m, lambda mm: dt.chunked_causal_lm_loss(mm, ids(), ids(), chunk=4))
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in m.model.layers)
    assert_same(got, eager)


def test_compile_blocks_needs_a_block_stack():
    with pytest.raises(dt.DeltaError, match="no stack of repeated blocks"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


@pytest.mark.parametrize("bias,fan_in_fan_out", [(True, False), (False, False), (True, True)])
def test_dora_fast_path_equals_the_plain_dora_formula(bias, fan_in_fan_out):
    """The DoRA autograd function gives the paper's output and gradients (x, A, B, m) of
    y' = m / ‖W + sBA‖ (detached) ⊙ (W + sBA) x + b."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    if fan_in_fan_out:
        base = Conv1D(6, 5)  # GPT-2 layout: weight (in, out)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(5, 6, bias=bias)
    model = nn.Sequential(base)
    dt.attach(model, "lora", r=3, alpha=6, dora=True, targets=["0"])
    d = model[0].deltas["default"]
    with torch.no_grad():
        d.lora_B.weight.normal_()
        d.lora_magnitude_vector.weight.mul_(1.5)
    x = torch.randn(4, 7, 5, requires_grad=True)
    out = model(x)
    assert "DoraLinearBranch" in type(out.grad_fn.next_functions[0][0]).__name__  # the fast path ran
    (out * torch.arange(6.0)).sum().backward()
    fast = [out.detach(), x.grad, d.lora_A.weight.grad, d.lora_B.weight.grad, d.lora_magnitude_vector.weight.grad]

    a, b, m = (t.detach().clone().requires_grad_() for t in
               (d.lora_A.weight, d.lora_B.weight, d.lora_magnitude_vector.weight))
    w = base.weight.detach().t() if fan_in_fan_out else base.weight.detach()  # (out, in)
    wd = w + d.scaling * b @ a
    xd = x.detach().clone().requires_grad_()
    ref = (m / wd.norm(dim=1).detach()) * (xd @ wd.t())
    if base.bias is not None:
        ref = ref + base.bias.detach()
    (ref * torch.arange(6.0)).sum().backward()
    for got, want in zip(fast, [ref.detach(), xd.grad, a.grad, b.grad, m.grad]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
