"""The ideal continuous/static throughput ratio of bench/serve_compare.py's workload (issue 17).

    python bench/serve_ceiling.py [--requests 48] [--clients 16] [--rate 12] [--fixed 0.55] [--reps 2]

Simulates both schedulers on the same draws as serve_compare.py (seed = repetition: max_tokens
uniform in 8-64, Poisson arrivals from ``Random(1000 + seed)``), in units of decoding steps, with
nothing else costing time (no HTTP, no prefill, no batching window):

  static       a batch takes up to 16 waiting requests and decodes to its longest one; all its
               rows are answered when it ends
  continuous   every step takes waiting requests into free rows (≤ 16); a row leaves after its
               own tokens

A step over n rows costs ``fixed + (1 - fixed) · n / 16`` (1 for a full batch): ``fixed`` is the
share of a 16-row step that does not depend on the row count (weights read once per step, Python
and kernel launch overhead); bench/serve_step.py measures it (c(1) / c(16)).  Closed loop: each
of ``--clients`` clients sends its next request when its previous one is answered.  Open loop
(``--rate``): requests arrive at the seeded Poisson times, converted to steps with ``--step-ms``
(the measured full-step time).  Prints the ratio per repetition.
"""
from __future__ import annotations

import argparse
import random


def draws(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(8, 64) for _ in range(n)]  # serve_compare.round_ draws prompts' lengths the same way


def arrivals(seed: int, n: int, rate: float, step_s: float) -> list[float]:
    gaps, at = random.Random(1000 + seed), [0.0]
    for _ in range(n - 1):
        at.append(at[-1] + gaps.expovariate(rate))
    return [t / step_s for t in at]  # in steps


def simulate(lens: list[int], arrive: list[float] | None, clients: int, fixed: float, continuous: bool) -> float:
    """Time (in full-step units) until the last request is answered."""
    n = len(lens)
    cost = lambda rows: fixed + (1 - fixed) * rows / 16  # noqa: E731
    ready = list(arrive) if arrive is not None else [0.0 if i < clients else None for i in range(n)]
    nxt = {i: i + clients for i in range(n)} if arrive is None else {}  # closed loop: client's next request
    t, waiting, running, done = 0.0, list(range(n)), {}, 0
    while done < n:
        free = 16 - len(running)
        take = [i for i in waiting if ready[i] is not None and ready[i] <= t][:free]
        if not running and not take:  # idle until the next arrival
            t = min(ready[i] for i in waiting if ready[i] is not None)
            continue
        if continuous or not running:
            for i in take:
                waiting.remove(i)
                running[i] = lens[i]
        if not continuous:  # a whole batch: its longest row's steps, every row computed each step
            steps = max(running.values())
            t += steps * cost(len(running))
            finished = list(running)
        else:
            t += cost(len(running))
            for i in running:
                running[i] -= 1
            finished = [i for i, left in running.items() if left == 0]
        for i in finished:
            running.pop(i)
            done += 1
            j = nxt.get(i)
            if j is not None and j < n:
                ready[j] = t
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rate", type=float, default=None, help="open loop: requests/s (else the closed loop)")
    ap.add_argument("--step-ms", type=float, default=55.0,
                    help="a full step's wall time (open loop only; ~16 tokens / 300 tok/s over HTTP)")
    ap.add_argument("--fixed", type=float, default=0.55)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    for seed in range(a.reps):
        lens = draws(seed, a.requests)
        arrive = arrivals(seed, a.requests, a.rate, a.step_ms / 1000) if a.rate else None
        s = simulate(lens, arrive, a.clients, a.fixed, continuous=False)
        c = simulate(lens, arrive, a.clients, a.fixed, continuous=True)
        print(f"rep {seed}: {sum(lens)} tokens, static {s:.0f} step-units, continuous {c:.0f}: ideal ratio {s / c:.2f}")


if __name__ == "__main__":
    main()
