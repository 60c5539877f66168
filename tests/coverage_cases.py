"""One case of the coverage matrix: a zoo family × a method with its default options.

``run_case`` attaches the method and then either records a clear refusal (a one-line
``DeltaError``, the model left exactly as it was) or checks the contract every adapter keeps:

    unchanged at init (but prompt/prefix) · only the adapter's tensors require grad · one optimizer
    step moves them and leaves every base tensor bit-identical · the adapter changes the output ·
    ``dt.disabled`` gives the bare base · ``dt.save`` + ``dt.load`` into a fresh copy reproduces it ·
    ``dt.merge`` equals the unmerged model (or refuses in one line).

Any other exception, or a broken check, is a bug.  Shared by tests/test_coverage_matrix.py and
scripts/gen_coverage.py (which writes docs/coverage.md from the outcomes)."""
from __future__ import annotations

import copy
import functools
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import deltatune as dt
from zoo import FAMILIES, build, inputs, run, train_options

ATOL = 1e-5  # eval-mode forwards of the same float32 weights
MERGE_ATOL = 1e-4  # W + ΔW folded once vs. added every forward: float32 rounding of the sum, relative
# to the output's scale (a recurrence such as Mamba's carries one rounding into every later position)

# matrix column -> (method, default options the method cannot do without)
METHODS: dict[str, tuple[str, dict]] = {
    "lora": ("lora", {}),
    "dora": ("lora", {"dora": True}),
    "adalora": ("adalora", {"total_steps": 10}),
    "adapter": ("adapter", {}),
    "prompt": ("prompt", {}),
    "prefix": ("prefix", {}),
    "bitfit": ("bitfit", {}),
    "ln": ("ln", {}),
    "ia3": ("ia3", {}),
    "vera": ("vera", {}),
    "sparse": ("sparse", {}),  # + batches/loss_fn for its selection pass, made per family below
}
NOT_IDENTITY_AT_INIT = {"prompt", "prefix"}  # virtual tokens change the output from the first forward


@dataclass
class Outcome:
    refusal: str | None = None  # attach refused: the DeltaError's message
    merge_refusal: str | None = None  # attached and checked, but dt.merge refused

    @property
    def ok(self) -> bool:
        return self.refusal is None


def loss_of(y: torch.Tensor) -> torch.Tensor:
    # feature-weighted mean square: a LayerNorm'd output's plain mean square has zero gradient
    y = y.float()
    return (y.pow(2) * torch.linspace(0.5, 1.5, y.shape[-1])).mean()


@functools.lru_cache(maxsize=None)
def pristine(family: str):
    """The family's base model, built once per process; every case works on a deep copy."""
    return build(family)


def options(family: str, column: str) -> tuple[str, dict]:
    method, opts = METHODS[column]
    if method == "sparse":
        opts = {"batches": [inputs(family)], "loss_fn": lambda m, b: loss_of(run(m, family, **train_options(family)))}
    return method, dict(opts)


def assert_one_line(e: dt.DeltaError, what: str) -> str:
    msg = str(e)
    assert "\n" not in msg and len(msg) > 20, f"{what} must be one line naming the problem and a fix: {msg!r}"
    return msg


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".deltas." not in k}


def perturb(model, name: str = "default", seed: int = 1) -> None:
    """Give the adapter non-trivial values, so that save/load and merge checks cannot pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_tensors(model, name).values():
            if t.is_floating_point():  # integer tensors (sparse positions) are structure, not values
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.05)


def close(a, b, atol, what):
    torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"{what}: {m}")


def run_case(family: str, column: str, tmp: Path | None = None) -> Outcome:
    method, opts = options(family, column)
    model = copy.deepcopy(pristine(family))
    with torch.no_grad():
        y_base = run(model, family)
    names = [n for n, _ in model.named_modules()]
    keys = list(model.state_dict())
    grads = [p.requires_grad for p in model.parameters()]  # Whisper keeps its sinusoids frozen
    try:
        dt.attach(model, method, **opts)
    except dt.DeltaError as e:  # a clear refusal is a valid answer, if it leaves the model as it was
        msg = assert_one_line(e, "attach refusal")
        assert [n for n, _ in model.named_modules()] == names and list(model.state_dict()) == keys, \
            "a refused attach changed the module tree"
        assert [p.requires_grad for p in model.parameters()] == grads, "a refused attach changed requires_grad"
        assert "_deltatune" not in model.__dict__, "a refused attach left adapter state on the model"
        return Outcome(refusal=msg)

    with torch.no_grad():  # peft: test_forward_output_finite / identity at init
        y0 = run(model, family)
    assert torch.isfinite(y0).all(), "non-finite output right after attach"
    if column not in NOT_IDENTITY_AT_INIT:
        close(y0, y_base, ATOL, "output changed at init")

    # peft: test_only_params_are_updated: exactly the adapter's float tensors require grad
    tensors = dt.adapter_tensors(model, "default")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "attach succeeded but nothing trains"
    assert {id(p) for p in trainable} == {id(t) for t in tensors.values() if t.is_floating_point()}, \
        "the trainable set differs from the adapter's tensors"

    # peft: test_parameters_after_loading_model / test_only_params_are_updated: one step
    own = {id(t) for t in tensors.values()}  # selectors (BitFit, ln) train tensors the model has
    selected = {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in own}
    before = base_state(model)
    start = {k: v.detach().clone() for k, v in tensors.items()}
    opt = torch.optim.SGD(trainable, lr=0.5)
    loss_of(run(model, family, **train_options(family))).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    for k, v in base_state(model).items():
        if k not in selected:
            assert torch.equal(v, before[k]), f"base tensor {k} changed in a training step"
    assert any(not torch.equal(tensors[k].detach(), start[k]) for k in tensors), "no adapter tensor moved"

    perturb(model)
    with torch.no_grad():
        y = run(model, family)
        assert torch.isfinite(y).all(), "non-finite output after a step"
        # (a prompt on a causal LM returns logits for its virtual tokens too: another shape)
        assert y.shape != y_base.shape or not torch.allclose(y, y_base, atol=1e-6), \
            "the adapter has no effect on the output"
        with dt.disabled(model):  # peft: test_disable_adapters
            close(run(model, family), y_base, ATOL, "disabled != base")
        close(run(model, family), y, ATOL, "output after leaving dt.disabled")

    with tempfile.TemporaryDirectory(dir=tmp) as d:  # peft: test_save_pretrained
        dt.save(model, Path(d) / "a")
        fresh = copy.deepcopy(pristine(family))
        dt.load(fresh, Path(d) / "a")
        with torch.no_grad():
            close(run(fresh, family), y, ATOL, "save + load into a fresh copy")

    try:  # peft: test_merge_layers / merge_and_unload
        merged = dt.merge(model)
    except dt.DeltaError as e:
        return Outcome(merge_refusal=assert_one_line(e, "merge refusal"))
    assert type(merged) is type(pristine(family))
    assert not any(isinstance(m, dt.DeltaLayer) for m in merged.modules()), "merge left wrappers"
    assert [n for n, _ in merged.named_modules()] == names, "merge did not restore the module tree"
    with torch.no_grad():
        close(run(merged, family), y, MERGE_ATOL * max(1.0, float(y.abs().max())), "merged != unmerged")
    return Outcome()


def peft_loads_ours(family: str, column: str, tmp: Path | None = None) -> bool:
    """peft's ``PeftModel.from_pretrained`` reads deltatune's file of a peft-format method and gives
    the same output (1e-5).  False when the case does not apply (no peft format, attach refused)."""
    import peft

    method, opts = options(family, column)
    if not dt.METHODS[method].peft_type:
        return False
    model = copy.deepcopy(pristine(family))
    try:
        dt.attach(model, method, **opts)
    except dt.DeltaError:
        return False  # the refusal is checked by run_case
    perturb(model)
    with torch.no_grad(), tempfile.TemporaryDirectory(dir=tmp) as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own notes (VeRA's PRNG projections, transformers deprecations)
        y = run(model, family)
        dt.save(model, d)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(pristine(family)), d).eval()
        close(run(pm, family), y, ATOL, "peft's output on deltatune's file")
    return True


def cases():
    """(family, column) for the whole matrix, in table order."""
    return [(f, c) for f in FAMILIES for c in METHODS]


# (family, column) -> why it fails today: known bugs, kept visible as strict xfails in the test
# and as "bug" in docs/coverage.md until fixed.  (Empty: the last ones, layers whose parent reads
# .weight directly - WavLM's attention, Mamba's dt_proj - are now left out of "all-linear" and
# refused by name, core/direct_reads.py.)
XFAIL: dict[tuple[str, str], str] = {}

FLAKY: set[tuple[str, str]] = set()  # xfail(strict=False): outcome varies by run

# (family, column) -> why peft cannot read deltatune's file of that case today
_GQA = ("peft sizes the prefix from config.num_key_value_heads, which the zoo's generic config sets (2) but {} "
        "ignores (its cache has {}); deltatune measures the cache the model fills. A peft bug on this synthetic "
        "config: real {} configs carry no num_key_value_heads")
_BERT_PREFIX = ("peft refuses prefix tuning on {} under transformers 5 ('Model does not support past key values'); "
                "deltatune injects the prefix with its own attention hook, so it writes a PREFIX_TUNING file peft "
                "cannot load")
PEFT_XFAIL: dict[tuple[str, str], str] = {
    **{(f, "prefix"): _GQA.format(f, "4 key/value heads", f)
       for f in ("gpt2", "gpt_neox", "bloom", "opt", "xglm", "mpt", "persimmon", "biogpt")},
    ("gpt_bigcode", "prefix"): _GQA.format("gpt_bigcode", "1 (multi-query)", "gpt_bigcode"),
    **{(f, "prefix"): _BERT_PREFIX.format(f)
       for f in ("bert", "roberta", "electra", "xlm-roberta", "roformer", "big_bird", "data2vec-text")},
}
