"""Shared pieces of the benchmark: models, method table, training steps, timing and RSS helpers.

Every configuration is built from the same seed, so deltatune, peft and the floor start from
identical random-init Llama-style weights.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable

import torch

SIZES = {  # name -> LlamaConfig overrides (tied embeddings, vocab 32k)
    "42m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "110m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
QV = ["q_proj", "v_proj"]

# bench name -> (deltatune method names to try, deltatune options, peft config class, peft options)
# options a method's config does not have are dropped (and reported), so renamed fields show up.
METHODS = {
    "full": (None, {}, None, {}),
    "lora_qv": (["lora"], dict(r=8, alpha=16, targets=QV), "LoraConfig", dict(r=8, lora_alpha=16, target_modules=QV)),
    "lora_all": (["lora"], dict(r=8, alpha=16, targets="all-linear"), "LoraConfig",
                 dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "dora": (["lora"], dict(r=8, alpha=16, targets=QV, dora=True), "LoraConfig",
             dict(r=8, lora_alpha=16, target_modules=QV, use_dora=True)),
    "ia3": (["ia3"], {}, "IA3Config", dict(task_type="CAUSAL_LM")),
    "prompt": (["prompt"], dict(num_virtual_tokens=20), "PromptTuningConfig",
               dict(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "prefix": (["prefix"], dict(num_virtual_tokens=20, prefix_projection=False), "PrefixTuningConfig",
               dict(task_type="CAUSAL_LM", num_virtual_tokens=20, prefix_projection=False)),
    "adalora": (["adalora"], dict(r=12, target_r=8, total_steps=1000, targets=QV), "AdaLoraConfig",
                dict(init_r=12, target_r=8, total_step=1000, target_modules=QV)),
}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def make_model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=512,
                      **SIZES[size])
    return LlamaForCausalLM(cfg).train()


def batch(batch_size: int, seq: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 32000, (batch_size, seq), generator=g)


def dt_method(bench_name: str):
    """(deltatune method name, options it accepts, dropped options) or None when not available."""
    import deltatune as dt

    names, opts, _, _ = METHODS[bench_name]
    name = next((n for n in names or [] if n in dt.METHODS), None)
    if name is None:
        return None
    fields = {f.name for f in dataclasses.fields(dt.METHODS[name].config_cls)}
    return name, {k: v for k, v in opts.items() if k in fields}, sorted(set(opts) - fields)


# --------------------------------------------------------------------------- steps
# A step is a closure doing one full optimizer step; all return the loss as a float.

def _opt(params):
    return torch.optim.AdamW(params, lr=1e-4)


def floor_step(model, ids):
    """The naive frozen-base floor: forward + backward to the input embeddings, no weight grads."""
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()

    def step():
        x = emb(ids).detach().requires_grad_()
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()
        return loss.item()
    return step


def peft_model(model, bench_name: str):
    import peft

    _, _, cls, opts = METHODS[bench_name]
    return peft.get_peft_model(model, getattr(peft, cls)(**opts))


def peft_step(model, bench_name, ids):
    if bench_name == "full":
        return plain_step(model, ids)
    pm = peft_model(model, bench_name)
    opt = _opt([p for p in pm.parameters() if p.requires_grad])
    count = [0]

    def step():
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if bench_name == "adalora":
            pm.base_model.update_and_allocate(count[0])
        opt.zero_grad(set_to_none=True)
        count[0] += 1
        return loss.item()
    return step


def plain_step(model, ids):
    """Full fine-tuning with transformers' own loss (what peft users run for full FT)."""
    for p in model.parameters():
        p.requires_grad_(True)
    opt = _opt(model.parameters())

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def dt_attach(model, bench_name: str):
    import deltatune as dt

    if bench_name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    name, opts, _ = dt_method(bench_name)
    return dt.attach(model, name, **opts)


def dt_step(model, bench_name, ids, *, loss: str = "chunked", chunk: int = 256, compile: bool | str = False,
            checkpointing: bool = False):
    """deltatune's recommended path: attach, then the chunked loss (``loss="plain"``: HF's loss).
    ``compile``: False, True / "step" (torch.compile of the whole step) or "blocks" (regional)."""
    from deltatune.train.losses import chunked_causal_lm_loss

    model = dt_attach(model, bench_name)
    if compile == "blocks":
        from deltatune.fast import compile_blocks

        compile_blocks(model)
        compile = False
    if checkpointing:
        from deltatune.fast import enable_checkpointing

        enable_checkpointing(model)
    opt = _opt([p for p in model.parameters() if p.requires_grad])
    if bench_name == "adalora":  # the pruning schedule runs from an optimizer step hook
        from deltatune.methods.adalora import adalora_hook

        adalora_hook(model, optimizer=opt)

    def fwd_bwd():
        if loss == "plain":
            out = model(input_ids=ids, labels=ids).loss
        else:
            out = chunked_causal_lm_loss(model, ids, ids, chunk=chunk)
        out.backward()
        return out

    if compile:
        from deltatune.fast import compile_step

        fwd_bwd = compile_step(fwd_bwd)

    def step():
        out = fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.item()
    return step


# --------------------------------------------------------------------------- measuring

def interleaved(steps: dict[str, Callable[[], float]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Run the steps round-robin (order rotated each round) and return every timing per name."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    return times


def median(xs):
    return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_r / b_r: each round's pair ran back to back, so load drifts cancel."""
    return statistics.median(x / y for x, y in zip(a, b))


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")
