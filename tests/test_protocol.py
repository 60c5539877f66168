"""The declared extension points: the registry owns a method's name, optional hooks are found by
override (not by getattr), mixed batches reach the core through the router dt.mixed installs,
and a delta says itself whether its rows can share one batched matmul."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import deltatune as dt
from conftest import tiny_mlp
from deltatune.core import DeltaConfig, Method, get_state, register


def test_register_refuses_a_name_its_config_does_not_carry():
    @dataclass
    class OddConfig(DeltaConfig):
        method = "odd"

    class Odd(Method):
        name = "odd-one"
        config_cls = OddConfig

    with pytest.raises(dt.DeltaError, match="'odd-one' and OddConfig.method 'odd' must be the same"):
        register(Odd)
    assert "odd-one" not in dt.METHODS and "odd" not in dt.METHODS


def test_register_refuses_to_replace_another_method_of_the_same_name():
    class Lora2(Method):
        name = "lora"
        config_cls = dt.LoraConfig

    with pytest.raises(dt.DeltaError, match="'lora' is already registered"):
        register(Lora2)
    assert type(dt.METHODS["lora"]).__name__ == "LoRA"


def test_optional_hooks_are_found_by_override(monkeypatch):
    lora, adalora = dt.METHODS["lora"], dt.METHODS["adalora"]
    assert adalora.overrides("step_hook") and adalora.overrides("train_state")
    assert not lora.overrides("step_hook") and not lora.overrides("load_train_state")
    assert lora.step_hook(None, "a", 1, 2) is None and lora.train_state(None, "a") == {}  # declared defaults
    monkeypatch.setattr(lora, "step_hook", lambda model, name, step, total: None)  # an instance's own counts
    assert lora.overrides("step_hook")


def test_check_mixed_is_asked_of_each_method_in_the_batch(monkeypatch):
    model = tiny_mlp()
    dt.attach(model, "lora", r=2, targets=["fc1"], name="a")
    dt.attach(model, "ia3", targets=["fc1"], feedforward=[], name="b")
    asked = []
    monkeypatch.setattr(dt.METHODS["ia3"], "check_mixed", lambda m, rows: asked.append(list(rows)))
    with dt.mixed(model, ["a", "b", None]):
        model(torch.randint(0, 20, (3, 5)))
    assert asked == [["a", "b", None]]

    def refuse(m, rows):
        raise dt.DeltaError("no")

    monkeypatch.setattr(dt.METHODS["ia3"], "check_mixed", refuse)
    with pytest.raises(dt.DeltaError, match="no"):
        with dt.mixed(model, ["a", "b"]):
            pass


def test_row_routing_without_the_router_is_a_clear_error():
    model = tiny_mlp()
    dt.attach(model, "lora", r=2, targets=["fc1"], name="a")
    st = get_state(model)
    with dt.mixed(model, ["a"]):
        assert st.row_router is not None
    assert st.row_router is None and st.row_adapters is None  # restored on exit
    st.row_adapters = ["a"]
    with pytest.raises(dt.DeltaError, match="no row router is installed.*dt.mixed"):
        model(torch.randint(0, 20, (1, 5)))


def test_only_plain_lora_declares_bmm_factors():
    model = tiny_mlp()
    dt.attach(model, "lora", r=2, targets=["fc1"], name="plain")
    dt.attach(model, "lora", r=2, targets=["fc1"], dora=True, name="dora")
    dt.attach(model, "ia3", targets=["fc1"], feedforward=[], name="ia3")
    layer = model.fc1
    a, b, s = layer.deltas["plain"].bmm_factors(torch.float32)
    assert a is layer.deltas["plain"].lora_A.weight and b is layer.deltas["plain"].lora_B.weight
    assert s == layer.deltas["plain"].scaling
    assert layer.deltas["plain"].bmm_factors(torch.float16) is None  # y in another dtype: run alone
    assert layer.deltas["dora"].bmm_factors(torch.float32) is None
    assert layer.deltas["ia3"].bmm_factors(torch.float32) is None


def test_rows_of_batchable_deltas_equal_their_lone_runs():
    torch.manual_seed(0)
    model = tiny_mlp()
    for n in ("a", "b", "c"):
        dt.attach(model, "lora", r=2, targets=["fc1", "fc2"], name=n)
        for p in dt.adapter_tensors(model, n).values():
            torch.nn.init.normal_(p)  # B starts at zero: make every adapter change the output
    x = torch.randint(0, 20, (4, 5))
    rows = ["a", "b", None, "c"]
    with torch.no_grad():
        with dt.mixed(model, rows):
            got = model(x)
        for i, n in enumerate(rows):
            if n is None:
                with dt.disabled(model):
                    want = model(x[i:i + 1])
            else:
                dt.activate(model, n)
                want = model(x[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_every_registry_entry_owns_its_name_and_default_learning_rate():
    from deltatune.app.run import FULL_LR, MAX_LENGTH, default_lr

    for name, m in dt.METHODS.items():
        assert m.name == name == m.config_cls.method and m.default_lr > 0
        # a task with a fresh head (its own rate) trains the delta at the method's rate; a causal LM,
        # whose delta alone carries the task, at twice it
        assert default_lr(name, "classify") == default_lr(name, "image-classify") == m.default_lr
        assert default_lr(name, "causal-lm") == 2 * m.default_lr
    assert set(MAX_LENGTH) == {"classify", "causal-lm", "image-classify"}  # no task left unchecked
    assert default_lr("lora", "causal-lm") == 1e-3 and default_lr("lora", "classify") == 5e-4
    assert dt.METHODS["vera"].default_lr > dt.METHODS["lora"].default_lr  # few-number methods train faster
    assert {default_lr("full", t) for t in MAX_LENGTH} == {FULL_LR}  # full fine-tuning: one rate, no factor
