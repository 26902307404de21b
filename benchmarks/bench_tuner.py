"""Autotuner benchmarks (issue 5).

1. Search efficiency on a space small enough to enumerate: a matmul template (1024x1024x1024
   bf16 on trn2). Every config is measured once (the exhaustive optimum); then TPE and random
   search run at budgets of 5% and 10% of the space over several seeds. Reported: how often
   best-of-N is within 2% of the optimum, the median gap, and the Willemsen-style score
   (found - random) / (optimum - random), where `random` is the expected best of N uniform
   draws from the measured space (computed exactly from the exhaustive table).
   The budget N counts distinct configs measured (a repeated proposal is not measured or
   counted; its slot goes to a step outside the sampler); "proposals" counts the study's
   trials, repeats included.
2. Tuning a 2048^3 (--size) bf16 matmul on trn2 from the generated space (template=None): roofline
   fraction reached (and the library's expert template for reference), the per-candidate
   cost, and the convergence plot benchmarks/tuner_<size>.png.

    python benchmarks/bench_tuner.py [--seeds 10] [--trials 300] [--only efficiency|generated]
"""
from __future__ import annotations

import argparse
import importlib
import json
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


VARIANTS = {  # label -> tune() arguments
    "tpe": {"sampler": "tpe"},                       # TPE + best-first neighbour steps
    "tpe (no neighbour steps)": {"sampler": "tpe", "local": False},
    "cmaes": {"sampler": "cmaes"},
    "random": {"sampler": "random"},
}


def efficiency(seeds: int, variants: list[str], fracs=(0.05, 0.10)):
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
    near = sum(x <= 1.02 * opt for x in feasible)
    print(f"space: {len(cfgs)} configs, {len(feasible)} feasible, optimum {opt:,} cycles, "
          f"{near} within 2% (enumerated in {t_enum:.1f}s)")
    rows = []
    for frac in fracs:
        n = max(1, int(frac * len(cfgs)))          # budget: distinct configs, <= frac of space
        rnd = expected_best_of_random(padded, n)
        for label in variants:
            found, asked, wall = [], [], []
            for seed in range(seeds):
                t = time.perf_counter()
                r = autotune.tune(prog, template, trials=n, seed=seed, progress=False,
                                  include_default=False, batch=4, **VARIANTS[label])
                wall.append(time.perf_counter() - t)
                assert len(r.trials) == n and len({json.dumps(t.config) for t in r.trials}) == n
                found.append(r.best.cycles)
                asked.append(_asked(r))
            gaps = [f / opt - 1 for f in found]
            score = [(rnd - f) / (rnd - opt) if rnd != opt else 1.0 for f in found]
            rows.append({"budget": f"{n} ({n / len(cfgs):.1%})", "sampler": label,
                         "within 2%": f"{sum(g <= 0.02 for g in gaps)}/{seeds}",
                         "median gap": f"{statistics.median(gaps):.2%}",
                         "worst gap": f"{max(gaps):.2%}",
                         "Willemsen score (median)": f"{statistics.median(score):.2f}",
                         "Willemsen score (mean)": f"{statistics.mean(score):.2f}",
                         "proposals (mean)": f"{statistics.mean(asked):.1f}",
                         "wall s (median)": f"{statistics.median(wall):.2f}"})
    return rows, len(cfgs), opt


def _asked(r) -> int:
    """Trials in the study, repeated proposals included (numbers are 0..last)."""
    return max(t.number for t in r.trials) + 1


def big_matmul(trials: int, seed: int = 0, n: int = 2048):
    prog = matmul.trace(tl.spec((n, n), "bfloat16"), tl.spec((n, n), "bfloat16"))
    lib = importlib.import_module("kernels.matmul")   # the library's expert template
    s = prog.schedule()
    lib.template(s, lib.DEFAULT)
    expert = s.build("trn2").simulate()
    t0 = time.perf_counter()
    r = autotune.tune(prog, trials=trials, seed=seed, progress=True, include_default=False,
                      plot=Path(__file__).with_name(f"tuner_{n}.png"))
    dt = time.perf_counter() - t0
    pruned = sum(t.state == "pruned" for t in r.trials)
    first = r.history.index(r.best.cycles) + 1
    return {"trials": len(r.trials), "proposals": _asked(r), "pruned": pruned,
            "simulated": r.evaluated, "best cycles": f"{r.best.cycles:,}",
            "best at trial": first, "time_us": f"{r.best.time_us:.1f}",
            "roofline fraction": f"{r.best.roofline_fraction:.3f}",
            "library template": f"{expert.roofline_fraction:.3f}",
            "wall s": f"{dt:.1f}", "ms/trial": f"{1e3 * dt / len(r.trials):.1f}",
            "config": r.best.config}


def table(rows):
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds per sampler and budget")
    ap.add_argument("--trials", type=int, default=300, help="generated-space tuning budget")
    ap.add_argument("--only", choices=("efficiency", "generated"), help="run one part")
    ap.add_argument("--samplers", default="tpe,tpe (no neighbour steps),random",
                    help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0, help="generated-space tuning seed")
    ap.add_argument("--size", type=int, default=2048, help="generated-space matmul size n (n^3)")
    args = ap.parse_args()
    if args.only != "generated":
        rows, size, opt = efficiency(args.seeds, args.samplers.split(","))
        print(table(rows))
    if args.only != "efficiency":
        big = big_matmul(args.trials, args.seed, args.size)
        print(table([{k: v for k, v in big.items() if k != "config"}]))
        print("best config:", big["config"])


if __name__ == "__main__":
    main()
