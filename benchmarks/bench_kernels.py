"""The kernel library at model shapes: simulated time, fraction of the roofline bound, and the
speedup of the shipped (tuned) record over the expert template, per kernel, shape, machine.

    python benchmarks/bench_kernels.py [--machines trn2] [--markdown]

"tuned" is what `kernels.<name>(...)` runs (the shipped record when there is one);
"expert" is the kernel's first template at its default config (no records); "default" is
the untuned default schedule. All figures are simulated (timing simulator), one run each
(the simulator is deterministic).
"""
from __future__ import annotations

import argparse

import kernels
from kernels.shapes import MODEL_SHAPES, workload


def measure(kname, dims, machine):
    kf = kernels.LIBRARY[kname]
    specs, static = workload(kname, dims)
    tuned = kf.compile(*specs, machine=machine, **static)
    expert = kf.compile(*specs, machine=machine, use_records=False, **static)
    rt, re = tuned.simulate(), expert.simulate()
    return {"source": tuned.choice.source, "tuned_us": rt.time_us, "expert_us": re.time_us,
            "roofline": rt.roofline_fraction, "bound": rt.bound,
            "speedup": re.time_us / rt.time_us}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", default="trn1,trn2")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    head = ["kernel", "shape", "machine", "schedule", "time (us)", "roofline", "bound",
            "expert (us)", "tuned vs expert"]
    rows = []
    for label, kname, dims in MODEL_SHAPES:
        for machine in args.machines.split(","):
            m = measure(kname, dims, machine)
            rows.append([kname, label, machine, m["source"], f"{m['tuned_us']:,.1f}",
                         f"{100 * m['roofline']:.1f}%", m["bound"], f"{m['expert_us']:,.1f}",
                         f"{m['speedup']:.2f}x"])
            if not args.markdown:
                print("  ".join(rows[-1]), flush=True)
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
