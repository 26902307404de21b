"""Scheduling + lowering benchmarks (issue 4).

    python benchmarks/bench_schedule.py [--repeats 15]

1. One tuning candidate for a 2048^3 bf16 matmul on trn2: apply a hand schedule, lower it
   to the ISA (build) and simulate it (timing model). Medians over repeats, after a warm-up
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

import tensorlang as tl  # noqa: E402
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


def median_ms(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    p2048 = matmul.trace(tl.spec((2048, 2048), "bfloat16"), tl.spec((2048, 2048), "bfloat16"))
    hand_matmul(p2048).build("trn2").simulate()          # warm-up: Numba core load
    sched = median_ms(lambda: hand_matmul(p2048), args.repeats)
    build = median_ms(lambda: hand_matmul(p2048).build("trn2"), args.repeats)
    k = hand_matmul(p2048).build("trn2")
    simt = median_ms(k.simulate, args.repeats)
    total = median_ms(lambda: hand_matmul(p2048).build("trn2").simulate(), args.repeats)
    print("## one tuning candidate, 2048^3 bf16 matmul, trn2 (median ms)")
    print(f"schedule {sched:.2f}  schedule+build {build:.2f}  simulate {simt:.2f}  "
          f"schedule+build+simulate {total:.2f}")
    print(f"dynamic instructions simulated: {k.simulate().instructions:,}")

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
