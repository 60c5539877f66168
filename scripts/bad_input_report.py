"""Run the bad-input catalogue of tests/bad_input_cases.py and print it as a markdown table:
case, area, what was tried, and the message the user gets (each case is also checked to change
nothing on disk and nothing in the model, exactly as the tests do).

    .venv/bin/python scripts/bad_input_report.py                 # print the table
    .venv/bin/python scripts/bad_input_report.py --write docs/reliability.md
        # replace the part between <!-- bad-inputs:start --> and <!-- bad-inputs:end -->
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


def _cell(s: str, n: int = 220) -> str:
    s = " ".join(str(s).split()).replace("|", "\\|")
    return s if len(s) <= n else s[: n - 1] + "…"


def run() -> tuple[list[tuple], float]:
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("deltatune.serve").setLevel(logging.ERROR)  # the corrupted test adapter is expected
    from bad_input_cases import CASES, run_case

    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, case) in enumerate(CASES.items()):
            ws = Path(tmp) / f"{i}"
            try:
                msg, ok = run_case(case, ws), "ok"
            except AssertionError as e:
                msg, ok = str(e), "**FAIL**"
            for p in {str(ws.resolve()), str(ws)}:  # show workspace paths as <ws>
                msg = msg.replace(p, "<ws>")
            rows.append((name, case.area, case.doc, msg, ok))
    return rows, time.perf_counter() - t0


def table(rows: list[tuple], seconds: float) -> str:
    from collections import Counter

    areas = Counter(r[1] for r in rows)
    passed = sum(r[4] == "ok" for r in rows)
    head = (f"{len(rows)} bad inputs tried ({', '.join(f'{a}: {n}' for a, n in areas.items())}); "
            f"{passed} gave a clear error and changed nothing on disk or in the model "
            f"({seconds:.1f} s; `.venv/bin/python scripts/bad_input_report.py`).\n\n")
    lines = ["| case | area | input | message (what the user sees) | |", "|---|---|---|---|---|"]
    for name, area, doc, msg, ok in rows:
        lines.append(f"| `{name}` | {area} | {_cell(doc, 70)} | {_cell(msg)} | {ok} |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="markdown file whose bad-inputs section to replace")
    a = ap.parse_args()
    rows, secs = run()
    md = table(rows, secs)
    if a.write:
        text = a.write.read_text(encoding="utf-8")
        if START not in text or END not in text:
            sys.exit(f"{a.write}: no {START} ... {END} section to replace")
        pre, rest = text.split(START, 1)
        _, post = rest.split(END, 1)
        from deltatune.files import atomic_write

        atomic_write(a.write, (pre + START + "\n" + md + END + post).encode())
        print(f"wrote {len(rows)} cases to {a.write}")
    else:
        print(md)
    return 0 if all(r[4] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
