"""Run the coverage matrix (tests/coverage_cases.py: every zoo family × every method with its
defaults) and write docs/coverage.md: ✓, or ✗ with the refusal's reason, per cell, plus totals, and the
peft round trips both ways (deltatune's files read by peft, peft's files read by deltatune: coverage_peft.py).

    PYTHONPATH=src .venv/bin/python scripts/gen_coverage.py            # the whole matrix (minutes)
    PYTHONPATH=src .venv/bin/python scripts/gen_coverage.py --families llama,bert --out /tmp/c.md

Exits 1 if a case fails that is not a known, listed bug (coverage_cases.XFAIL): the same verdict
as ``pytest -m slow tests/test_coverage_matrix.py``."""
from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import deltatune as dt  # noqa: E402

import coverage_cases as cc  # noqa: E402
import coverage_peft as cp  # noqa: E402
from zoo import FAMILIES  # noqa: E402


def _generic(msg: str, family: str) -> str:
    """The reason without the model's own names, so one footnote serves every family it applies to."""
    model = cc.pristine(family)
    msg = msg.replace(type(model).__name__, "{model}")
    msg = msg.replace(type(getattr(model, "base_model", model)).__name__, "{base}")
    msg = re.sub(r"its input embedding is \w+", "its input embedding is not one", msg)
    return re.sub(r"\b\d+ (bias-free layers)\b", r"\1", msg)


class Notes:
    """Distinct reasons -> footnote labels (r1, r2, ... for attach; m1, ... for merge)."""

    def __init__(self, prefix: str):
        self.prefix, self.ids = prefix, {}

    def __call__(self, reason: str) -> str:
        return self.ids.setdefault(reason, f"{self.prefix}{len(self.ids) + 1}")


def _reverse(fam: str, col: str) -> tuple[str, str | None]:
    """The peft -> deltatune round trip (coverage_peft.py): rev_ok | rev_na | rev_peft (peft itself
    fails: the reason) | rev_known (listed in PEFT_TO_US_XFAIL) | rev_fail | rev_xpass."""
    known = (fam, col) in cp.PEFT_TO_US_XFAIL
    try:
        applies = cp.we_load_peft_file(fam, col)
    except cp.PeftSide as e:
        return "rev_peft", _generic(str(e), fam)
    except Exception as e:  # noqa: BLE001
        return ("rev_known" if known else "rev_fail"), f"{type(e).__name__}: {str(e)[:300]}"
    if not applies:
        return "rev_na", None
    return ("rev_xpass" if known else "rev_ok"), None


def family_row(fam: str) -> tuple[str, list[tuple[str, str, str | None]], float]:
    """(family, [(column, kind, reason or error)], CPU seconds); kind: ok | refused | xfail | xpass | fail."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # one core per worker process
    c0, row = time.process_time(), []
    for col in cc.METHODS:
        try:
            o = cc.run_case(fam, col)
        except Exception as e:  # noqa: BLE001 - a failing case is what this script reports
            where = traceback.extract_tb(e.__traceback__)[-1]
            err = f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})"
            row.append((col, "xfail" if (fam, col) in cc.XFAIL else "fail", err))
            continue
        if (fam, col) in cc.XFAIL:
            row.append((col, "xpass", None))
        elif o.refusal:
            row.append((col, "refused", _generic(o.refusal, fam)))
        else:
            row.append((col, "ok", o.merge_refusal and _generic(o.merge_refusal, fam)))
        try:  # the peft round trip of the same case (peft-format methods only)
            row.append((col, "peft_ok" if cc.peft_loads_ours(fam, col) else "peft_na", None))
        except Exception as e:  # noqa: BLE001
            known = (fam, col) in cc.PEFT_XFAIL
            row.append((col, "peft_known" if known else "peft_fail", f"{type(e).__name__}: {str(e)[:300]}"))
        row.append((col, *_reverse(fam, col)))
    cc.pristine.cache_clear()
    return fam, row, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", help="comma-separated subset of the zoo (default: all)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    args = ap.parse_args()
    families = args.families.split(",") if args.families else list(FAMILIES)

    refusals, merges = Notes("r"), Notes("m")
    cells: dict[tuple[str, str], str] = {}
    count, failures, cpu, peft_bad, rev_bad = Counter(), [], 0.0, [], []
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:  # families are independent: one row per task
        for fam, row, secs in pool.map(family_row, families):
            for col, kind, text in row:
                if kind.startswith("rev_"):
                    count[kind] += 1
                    if kind == "rev_fail":
                        failures.append(f"{fam} × {col}: deltatune cannot read peft's file: {text}")
                    elif kind == "rev_xpass":
                        failures.append(f"{fam} × {col}: listed in PEFT_TO_US_XFAIL but passes: remove it")
                    elif kind in ("rev_peft", "rev_known"):
                        rev_bad.append((fam, col, kind, text))
                    continue
                if kind.startswith("peft"):
                    count[kind] += 1
                    if kind == "peft_fail":
                        failures.append(f"{fam} × {col}: peft cannot read our file: {text}")
                    if kind in ("peft_fail", "peft_known"):
                        peft_bad.append((fam, col))
                    continue
                if kind == "fail":
                    failures.append(f"{fam} × {col}: {text}")
                    cells[fam, col] = "**FAIL**"
                elif kind == "xpass":
                    if (fam, col) not in cc.FLAKY:
                        failures.append(f"{fam} × {col}: listed in XFAIL but passes (XPASS): remove it")
                    cells[fam, col], kind = "✓", "ok"
                elif kind == "xfail":
                    cells[fam, col] = "bug"
                elif kind == "refused":
                    cells[fam, col] = f"✗ {refusals(text)}"
                else:
                    cells[fam, col] = f"✓ {merges(text)}" if text else "✓"
                count[kind] += 1
            cpu += secs
            rev = [f"{c}:{k.removeprefix('rev_')}" for c, k, _ in row if k.startswith("rev_") and k != "rev_na"]
            print(f"{fam:20s} {' '.join(cells[fam, c] for c in cc.METHODS)}  peft->dt {' '.join(rev)}", flush=True)

    import transformers

    n = len(families) * len(cc.METHODS)
    lines = [
        "# Coverage: architecture × method",
        "",
        "Generated by `scripts/gen_coverage.py` from the cases of `tests/test_coverage_matrix.py`: every",
        "family of `tests/zoo.py` (tiny random models built by transformers from a small config) × every",
        "method with its default options.  ✓ means, on that family: attach; output unchanged at init (but",
        "prompt/prefix); exactly the adapter's tensors require grad; one optimizer step moves them and leaves",
        "every base tensor bit-identical; `dt.disabled` gives the bare base; `dt.save` + `dt.load` into a",
        "fresh copy reproduces the output (1e-5); `dt.merge` equals the unmerged model (1e-4 times the output's",
        "largest magnitude, at least 1e-4).  `✓ mN`: all of that, and the merge is refused for reason mN.",
        "`✗ rN`: attach refused, in one line, for reason rN (the model is left exactly as it was).  `bug`: a",
        "known failure, listed in `coverage_cases.XFAIL`.  Cached == uncached generation of prompt/prefix on",
        "the causal LMs is `tests/test_cache_compat.py`; the ported peft contract is `tests/test_peft_contract.py`.",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}.  **{n} cases: {count['ok']} ✓, {count['refused']} clear refusals, "
        f"{count['xfail']} known bugs (xfail), {count['fail']} failures.**",
        "",
        "| family | kind | " + " | ".join(cc.METHODS) + " |",
        "|---|---|" + "---|" * len(cc.METHODS),
    ]
    lines += [f"| {f} | {FAMILIES[f].kind} | " + " | ".join(cells[f, c] for c in cc.METHODS) + " |"
              for f in families]
    lines += ["", "## Attach refusals", ""] + [f"- **{k}**: {r}" for r, k in refusals.ids.items()]
    lines += ["", "## Merge refusals", ""] + [f"- **{k}**: {r}" for r, k in merges.ids.items()]
    lines += ["", "## peft reads deltatune's files", "",
              f"For the peft-format methods ({', '.join(c for c, (m, _) in cc.METHODS.items() if dt.METHODS[m].peft_type)}), "
              "every attached case is also saved by deltatune and loaded by peft's `PeftModel.from_pretrained` "
              f"(same output, 1e-5): **{count['peft_ok']} read by peft, {count['peft_known']} known failures, "
              f"{count['peft_fail']} new failures**.", ""]
    lines += [f"- {f} × {c}: {cc.PEFT_XFAIL.get((f, c), 'NEW FAILURE')}" for f, c in peft_bad]
    lines += ["", "## deltatune reads peft's files", "",
              "The reverse trip (`tests/coverage_peft.py`): for every attached case of those methods, peft builds the "
              "adapter itself (`get_peft_model` with the config deltatune's defaults choose), every trainable tensor is "
              "perturbed, peft's `save_pretrained` writes it and `dt.load` reads it into a fresh base (same output, "
              f"1e-5): **{count['rev_ok']} read by deltatune, {count['rev_peft']} that peft itself cannot build, run or "
              f"save, {count['rev_known']} known failures, {count['rev_fail']} new failures**.", ""]
    rev_notes = Notes("p")
    lines += [f"- {f} × {c}: " + (f"peft fails ({rev_notes(t)})" if k == "rev_peft" else cp.PEFT_TO_US_XFAIL[f, c])
              for f, c, k, t in rev_bad]
    if rev_notes.ids:
        lines += ["", "peft's own failures:", ""] + [f"- **{k}**: {r}" for r, k in rev_notes.ids.items()]
    bugs = [(f, c) for f in families for c in cc.METHODS if (f, c) in cc.XFAIL]
    if bugs:
        lines += ["", "## Known bugs (xfail)", ""] + [f"- {f} × {c}: {cc.XFAIL[f, c]}" for f, c in bugs]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{n} cases (+ peft round trips) in {time.time() - t0:.0f}s wall, {cpu:.0f}s CPU: {dict(count)} -> {args.out}")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
