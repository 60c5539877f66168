"""Grouped q/k/v LoRA, measured before building it (issue 9): is one (in, 3r) A-projection of
the shared attention input cheaper than three (in, r) ones?

    .venv/bin/python bench/grouped_qkv.py            # 110 M shapes: x (8·128, 768), r = 8

Times the LoRA branches only (forward + backward of x Aᵀ for q, k, v plus B), interleaved
separate / grouped, and prints them next to one 110 M training step's LoRA share, so the
possible gain on a whole step can be read off.  Both variants compute the same numbers
(checked below)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def branches(x, As, Bs, grouped: bool):
    if grouped:  # one GEMM for the three A projections, split afterwards
        h = x @ torch.cat(As).t()  # (N, 3r)
        hs = h.split([a.shape[0] for a in As], dim=1)
    else:
        hs = [x @ a.t() for a in As]  # 3 × (N, r)
    return [hh @ b.t() for hh, b in zip(hs, Bs)]  # 3 × (N, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8 * 128)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.dim, generator=g, requires_grad=True)
    As = [torch.randn(a.r, a.dim, generator=g, requires_grad=True) for _ in range(3)]
    Bs = [torch.randn(a.dim, a.r, generator=g, requires_grad=True) for _ in range(3)]
    go = [torch.randn(a.rows, a.dim, generator=g) for _ in range(3)]

    def run(grouped):
        outs = branches(x, As, Bs, grouped)
        torch.autograd.backward(outs, go)
        grads = [t.grad.clone() for t in [x, *As, *Bs]]
        for t in [x, *As, *Bs]:
            t.grad = None
        return outs, grads

    (o1, g1), (o2, g2) = run(False), run(True)
    for p, q in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)
    times = {False: [], True: []}
    for i in range(a.reps):
        for grouped in ((False, True) if i % 2 else (True, False)):
            t = time.perf_counter()
            run(grouped)
            times[grouped].append(time.perf_counter() - t)
    sep, grp = statistics.median(times[False]), statistics.median(times[True])
    ratio = statistics.median(b / s for s, b in zip(times[False], times[True]))
    print(f"x ({a.rows}, {a.dim}), r={a.r}, {a.threads} threads, {a.reps} interleaved reps")
    print(f"three A projections + B, fwd+bwd: separate {sep * 1e3:.2f} ms, grouped {grp * 1e3:.2f} ms, "
          f"grouped/separate {ratio:.3f}; saving per attention block {1e3 * (sep - grp):.2f} ms")


if __name__ == "__main__":
    main()
