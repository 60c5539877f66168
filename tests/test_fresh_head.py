"""The fresh classification head (core/targets.auto_modules_to_save) is only the head the wrapper or
transformers added next to the pretrained body, never a module of the body that happens to be
called ``classifier`` (torchvision's mobilenet_v3 keeps a pretrained ``classifier`` Sequential)."""
import sys
import textwrap

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.targets import auto_modules_to_save, modules_to_save_paths
from deltatune.vision.classifier import load_vision_model

# torchvision's mobilenet_v3_small layout in miniature: features -> avgpool -> classifier
# Sequential(Linear(576, 1024), Hardswish, Dropout, Linear(1024, 1000)); the wrapper replaces only
# the last Linear by its own head, the first Linear stays pretrained body.
MOBILENET_LIKE = """
import torch
from torch import nn

class MobileNetLike(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish(), nn.Conv2d(8, 16, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))

def build():
    torch.manual_seed(0)
    return MobileNetLike()
"""


@pytest.fixture
def mobilenet_like(tmp_path, monkeypatch):
    (tmp_path / "mobilenet_like.py").write_text(textwrap.dedent(MOBILENET_LIKE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield lambda: load_vision_model("mobilenet_like:build", ["a", "b", "c"])[0]
    sys.modules.pop("mobilenet_like", None)


def test_inner_pretrained_classifier_is_body_not_head(mobilenet_like):
    model = mobilenet_like()
    assert auto_modules_to_save(model) == ["classifier"]  # the wrapper's fresh Linear(32, 3) only
    lora = dt.attach(model, "lora")  # the CLI's default targets
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    # the pretrained Linear(16, 32) inside net.classifier is not copied to train in full (a fresh
    # head would be); only the wrapper's head trains in full
    full = {n for n in trainable if ".deltas.default.module." in n}
    assert full == {"classifier.deltas.default.module.weight", "classifier.deltas.default.module.bias"}, sorted(full)
    n_train = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in lora.parameters())
    assert n_train < 0.5 * n_all


def test_saved_full_paths_resolve_exactly(mobilenet_like):
    """A saved adapter lists full paths (["classifier"]): on load that means the top-level head,
    not also net.classifier by suffix; a bare name that is no full path still suffix-matches."""
    model = mobilenet_like()
    assert modules_to_save_paths(model, ["classifier"]) == ["classifier"]
    assert modules_to_save_paths(model, "auto") == ["classifier"]
    assert modules_to_save_paths(model, ["avgpool"]) == ["net.avgpool"]


def test_adapter_round_trip_keeps_the_body(mobilenet_like, tmp_path):
    model = dt.attach(mobilenet_like(), "lora", targets="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    x = torch.randn(2, 3, 16, 16)
    model.eval()  # Dropout in net.classifier
    want = model(pixel_values=x).logits
    dt.save(model, tmp_path / "ad")
    again = dt.load(mobilenet_like(), tmp_path / "ad").eval()
    torch.testing.assert_close(again(pixel_values=x).logits, want)


# --------------------------------------------------------------------------- the head's own rate
# TrainConfig.head_lr (train/head_warmup.head_groups): the fresh head trains at max(lr, head_lr),
# every method alike; the body keeps the method's lr; models without a fresh head get one group.

def _groups(model, **cfg):
    from deltatune.train.trainer import TrainConfig, Trainer

    feats = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 0}] * 4
    opt, _ = Trainer(model, feats, TrainConfig(max_steps=1, progress=False, compile="off", **cfg))._optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["lr"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups]


def _full(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.mark.parametrize("method", ["lora", "full", "bitfit"])
def test_head_trains_at_its_own_rate(method):
    from conftest import tiny_bert_cls

    model = _full(tiny_bert_cls()) if method == "full" else dt.attach(tiny_bert_cls(), method)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    (body_lr, body), (head_lr, head) = _groups(model, lr=5e-5, head_lr=1e-3)
    assert (body_lr, head_lr) == (5e-5, 1e-3)
    assert [n.rsplit(".", 1)[-1] for n in head] == ["bias", "weight"]
    assert all(n.startswith("classifier.") for n in head)
    assert len(body) + len(head) == n_trainable and not any(n.startswith("classifier.") for n in body)


def test_head_never_slower_than_the_method_and_off_at_zero():
    from conftest import tiny_bert_cls

    model = dt.attach(tiny_bert_cls(), "lora")
    assert [lr for lr, _ in _groups(model, lr=3e-2, head_lr=1e-3)] == [3e-2]  # e.g. prompt tuning's 3e-2
    assert [lr for lr, _ in _groups(model, lr=1e-4, head_lr=0.0)] == [1e-4]  # 0: the head at the method's lr
    assert [lr for lr, _ in _groups(model, lr=1e-4)] == [1e-4, 1e-2]  # the default floor


def test_recorded_head_rate_is_the_rate_the_optimizer_gives_the_head():
    """metrics.json's ``head_lr`` comes from ``head_rate``: it must name the head group's rate in
    every case ``head_groups`` distinguishes (split, not faster, head only, no head)."""
    from deltatune.train.head_warmup import head_groups, head_rate

    body, head = [nn.Parameter(torch.zeros(2))], [nn.Parameter(torch.zeros(3))]
    for params, lr, floor, want in [(body + head, 1e-3, 1e-2, 1e-2), (body + head, 3e-2, 1e-2, 3e-2),
                                    (head, 1e-3, 1e-2, 1e-3), (body, 1e-3, 1e-2, None)]:
        assert head_rate(params, head, lr, floor) == want
        groups = head_groups(params, head, lr, floor)
        in_head = [g.get("lr", lr) for g in groups if any(p is head[0] for p in g["params"])]
        assert in_head == ([] if want is None else [want])


def test_causal_lm_has_no_fresh_head_and_one_group():
    from conftest import tiny_gpt2

    model = dt.attach(tiny_gpt2(), "lora")
    assert [lr for lr, _ in _groups(model, lr=1e-4, head_lr=1e-2)] == [1e-4]


def test_resume_of_a_run_started_before_the_head_rate_says_how(tmp_path):
    """A checkpoint written with the head at the method's rate (one optimizer group, as every run
    before ``head_lr`` existed) cannot be resumed into two groups: a one-line error names
    ``--head-lr 0``, and resuming with it continues the run."""
    import torch.nn.functional as F

    from conftest import tiny_bert_cls
    from deltatune.train.trainer import Trainer, TrainConfig

    rows = [{"input_ids": [(i * 7 + j) % 50 + 5 for j in range(6)], "labels": i % 2} for i in range(16)]

    def loss_fn(model, batch):
        return F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])

    def trainer(head_lr, steps):
        torch.manual_seed(0)
        cfg = TrainConfig(lr=1e-3, batch_size=4, max_steps=steps, save_every=2, seed=1, progress=False,
                          head_lr=head_lr)
        return Trainer(dt.attach(tiny_bert_cls(), "lora"), rows, cfg, loss_fn=loss_fn, output_dir=tmp_path / "run")

    trainer(0.0, 4).train()  # the old behaviour: one group, checkpoints at steps 2 and 4
    with pytest.raises(dt.DeltaError, match=r"1 parameter group\(s\), this run has 2; resume with --head-lr 0"):
        trainer(1e-2, 4).train(resume=True)
    trainer(0.0, 4).train(resume=True)
