"""Scheduling + lowering benchmarks (issue 4).

    python benchmarks/bench_schedule.py [--repeats 30] [--candidate-only]

1. One tuning candidate for a 2048^3 bf16 matmul on trn2: apply a hand schedule, lower it
   to the ISA (build) and simulate it (timing model), broken down into schedule (the 13
   steps with their legality checks), lower (completion + lowering to the ISA), validate
   (sim.validate: tile rules and capacities), flatten (sim.timing.flatten: static tables)
   and core (the Numba timing core), plus the end-to-end total
   `hand_matmul(p).build("trn2").simulate()`. Medians over repeats of thread CPU time (the
   machine is shared; wall-clock medians of the total are printed too), after a warm-up
   that loads the Numba core.
2. The 4096^3 bf16 matmul hand schedule on trn2: simulated time and fraction of the roofline.
3. Fused softmax (1024 x 4096 bf16): HBM bytes moved by the default schedule vs one with the
   row statistics computed at the consumer (compute_at): intermediates stay in SBUF.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import sim  # noqa: E402
import tensorlang as tl  # noqa: E402
from sim import timing  # noqa: E402
from tensorlang.lower import lower  # noqa: E402
from matmul import matmul  # noqa: E402
from softmax import softmax  # noqa: E402


def hand_matmul(prog, mt=512, nt=512, depth=4):
    """The expert schedule: a strip of mt rows of A, transposed once into SBUF; B streamed in
    [128 x 512] tiles, `depth`-buffered over k; mt/128 PSUM accumulators, double-buffered
    over the column blocks (pipeline jo) so the copy-out overlaps the next block."""
    s = prog.schedule()
    i, j = s.axes("C")
    (k,) = s.reduce_axes("C")
    io, i1 = s.split(i, mt)
    mi, ii = s.split(i1, 128)
    jo, j1 = s.split(j, nt)
    nj, ji = s.split(j1, 512)
    ko, ki = s.split(k, 128)
    s.reorder(io, jo, ko, mi, nj, ii, ji, ki)
    s.partition(ii)
    s.vectorize(ji)
    s.tensorize(ki, "matmul")
    s.pipeline(ko, depth)
    s.pipeline(jo, 2)
    s.cache_read("A", "sbuf", io)
    s.cache_read("B", "sbuf", ko)
    return s


def fused_softmax(prog):
    s = prog.schedule()
    i, j = s.axes("Y")
    io, ii = s.split(i, 128)
    s.partition(ii)
    s.vectorize(j)
    s.compute_at("total", io)
    s.compute_at("mx", io)
    return s


def median_ms(fn, repeats, clock=time.thread_time):
    ts = []
    for _ in range(repeats):
        t = clock()
        fn()
        ts.append((clock() - t) * 1e3)
    return statistics.median(ts)


PARTS = ("schedule", "lower", "validate", "flatten", "core")


def candidate_breakdown(prog, repeats, clock=time.thread_time) -> dict:
    """Median ms of each part of one candidate (see the module docstring), same runs."""
    spec = sim.machine("trn2")
    ts = {k: [] for k in PARTS}
    for _ in range(repeats):
        t0 = clock()
        s = hand_matmul(prog)
        t1 = clock()
        isa_prog, _ = lower(s, spec)
        t2 = clock()
        sim.validate(isa_prog, spec)
        t3 = clock()
        flat = timing.flatten(isa_prog, spec)
        t4 = clock()
        timing.run_core(flat, spec)
        t5 = clock()
        for k, a, b in zip(PARTS, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
            ts[k].append((b - a) * 1e3)
    return {k: statistics.median(v) for k, v in ts.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--candidate-only", action="store_true", help="only part 1 (per-candidate cost)")
    args = ap.parse_args()

    p2048 = matmul.trace(tl.spec((2048, 2048), "bfloat16"), tl.spec((2048, 2048), "bfloat16"))
    for _ in range(3):
        hand_matmul(p2048).build("trn2").simulate()      # warm-up: Numba core load

    def candidate():
        return hand_matmul(p2048).build("trn2").simulate()
    parts = candidate_breakdown(p2048, args.repeats)
    total = median_ms(candidate, args.repeats)
    wall = median_ms(candidate, args.repeats, clock=time.perf_counter)
    k = hand_matmul(p2048).build("trn2")
    print("## one tuning candidate, 2048^3 bf16 matmul, trn2 (median ms, thread CPU time)")
    print("| " + " | ".join(PARTS) + " | sum of parts | end to end | end to end (wall) |")
    print("|" + " --- |" * (len(PARTS) + 3))
    print("| " + " | ".join(f"{parts[k_]:.2f}" for k_ in PARTS) +
          f" | {sum(parts.values()):.2f} | {total:.2f} | {wall:.2f} |")
    print(f"static instructions: {sum(1 for _ in sim.walk_instrs(k.program.body))}, "
          f"dynamic instructions simulated: {k.simulate().instructions:,}")
    if args.candidate_only:
        return

    p4096 = matmul.trace(tl.spec((4096, 4096), "bfloat16"), tl.spec((4096, 4096), "bfloat16"))
    r = hand_matmul(p4096).build("trn2").simulate()
    print("\n## 4096^3 bf16 matmul, hand schedule, trn2")
    print(f"time {r.time_us:,.1f} us  roofline {r.roofline_us:,.1f} us  "
          f"fraction {r.roofline_fraction:.3f}  pe busy {r.engine_busy['pe']:.1f}%")
    rd = p4096.schedule().build("trn2").simulate()
    print(f"default schedule: time {rd.time_us:,.1f} us  fraction {rd.roofline_fraction:.4f}")

    ps = softmax.trace(tl.spec((1024, 4096), "bfloat16"))
    print("\n## softmax 1024x4096 bf16, trn2: HBM bytes (read / write) and time")
    for name, s in (("default", ps.schedule()), ("fused (compute_at)", fused_softmax(ps))):
        r = s.build("trn2").simulate()
        b = r.bytes_moved
        print(f"{name:20s} hbm_read {b['hbm_read']:>12,}  hbm_write {b['hbm_write']:>12,}  "
              f"time {r.time_us:8.1f} us  fraction {r.roofline_fraction:.3f}")


if __name__ == "__main__":
    main()
