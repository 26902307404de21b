"""Autotuner benchmarks (issue 5).

1. Search efficiency on a space small enough to enumerate: a matmul template (1024x1024x1024
   bf16 on trn2). Every config is measured once (the exhaustive optimum); then TPE and random
   search run at budgets of 5% and 10% of the space over several seeds. Reported: how often
   best-of-N is within 2% of the optimum, the median gap, and the Willemsen-style score
   (found - random) / (optimum - random), where `random` is the expected best of N uniform
   draws from the measured space (computed exactly from the exhaustive table).
2. Tuning a 2048^3 bf16 matmul on trn2 from the generated space (template=None): roofline
   fraction reached, and the per-candidate cost.

    python benchmarks/bench_tuner.py [--seeds 5] [--trials 300]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import autotune  # noqa: E402
import tensorlang as tl  # noqa: E402
from autotune import space as sp  # noqa: E402
from autotune.tuner import Evaluator  # noqa: E402
from matmul import matmul  # noqa: E402


def template(s, cfg):
    """tm x tn x tk tiles, loop order, A cached per row block or not, pipeline depth."""
    i, j = s.axes("C")
    (k,) = s.reduce_axes("C")
    M, N = (v.extent for v in (s.state.get("C").var(str(i)), s.state.get("C").var(str(j))))
    io, ii = s.split(i, cfg.split("tm", M, min=32, max=128, pow2=True))
    jo, ji = s.split(j, cfg.split("tn", N, min=64, max=512, pow2=True))
    ko, ki = s.split(k, cfg.choice("tk", [64, 128]))
    outer = cfg.order("order", [io, jo])
    s.reorder(*outer, ko, ii, ji, ki)
    s.partition(ii)
    s.vectorize(ji)
    s.tensorize(ki, "matmul")
    if cfg.choice("cache_a", [False, True]):
        s.cache_read("A", "sbuf", io)
    s.pipeline(ko, cfg.choice("depth", [1, 2, 3]))


def expected_best_of_random(values: list[float], n: int) -> float:
    """E[min of n draws without replacement] from `values` (exact, by order statistics)."""
    v = sorted(values)
    total = len(v)
    if n >= total:
        return v[0]
    out = 0.0
    # P(min is the r-th smallest) = C(total-r-1, n-1) / C(total, n)
    denom = math.comb(total, n)
    for r, x in enumerate(v):
        out += x * math.comb(total - r - 1, n - 1) / denom
    return out


def efficiency(seeds: int):
    prog = matmul.trace(tl.spec((1024, 1024), "bfloat16"), tl.spec((1024, 1024), "bfloat16"))
    ev = Evaluator(prog, template, "trn2")
    t0 = time.perf_counter()
    cfgs = list(sp.enumerate_configs(prog, template))
    table = []
    for c in cfgs:
        res, _ = ev.run(sp.Fixed(c))
        table.append(res.get("cycles"))
    t_enum = time.perf_counter() - t0
    feasible = [x for x in table if x is not None]
    opt = min(feasible)
    # a pruned candidate counts as "no result" for random: draw among all, worst if all pruned
    worst = max(feasible)
    padded = [x if x is not None else worst for x in table]
    print(f"space: {len(cfgs)} configs, {len(feasible)} feasible, optimum {opt:,} cycles "
          f"(enumerated in {t_enum:.1f}s)")
    rows = []
    for frac in (0.05, 0.10):
        n = max(1, round(frac * len(cfgs)))
        rnd = expected_best_of_random(padded, n)
        for sampler in ("tpe", "random"):
            found = []
            for seed in range(seeds):
                r = autotune.tune(prog, template, trials=n, seed=seed, sampler=sampler,
                                  progress=False, include_default=False, batch=4)
                found.append(r.best.cycles)
            gaps = [f / opt - 1 for f in found]
            score = [(rnd - f) / (rnd - opt) if rnd != opt else 1.0 for f in found]
            rows.append({"budget": f"{n} ({frac:.0%})", "sampler": sampler,
                         "within 2%": f"{sum(g <= 0.02 for g in gaps)}/{seeds}",
                         "median gap": f"{statistics.median(gaps):.2%}",
                         "worst gap": f"{max(gaps):.2%}",
                         "Willemsen score (median)": f"{statistics.median(score):.2f}"})
    return rows, len(cfgs), opt


def big_matmul(trials: int):
    prog = matmul.trace(tl.spec((2048, 2048), "bfloat16"), tl.spec((2048, 2048), "bfloat16"))
    t0 = time.perf_counter()
    r = autotune.tune(prog, trials=trials, seed=0, progress=True, include_default=False,
                      plot=Path(__file__).with_name("tuner_2048.png"))
    dt = time.perf_counter() - t0
    pruned = sum(t.state == "pruned" for t in r.trials)
    return {"trials": len(r.trials), "pruned": pruned, "simulated": r.evaluated,
            "best cycles": f"{r.best.cycles:,}", "time_us": f"{r.best.time_us:.1f}",
            "roofline fraction": f"{r.best.roofline_fraction:.3f}",
            "wall s": f"{dt:.1f}", "ms/trial": f"{1e3 * dt / len(r.trials):.1f}",
            "config": r.best.config}


def table(rows):
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=300)
    args = ap.parse_args()
    rows, size, opt = efficiency(args.seeds)
    print(table(rows))
    big = big_matmul(args.trials)
    print(table([{k: v for k, v in big.items() if k != "config"}]))
    print("best config:", big["config"])


if __name__ == "__main__":
    main()
