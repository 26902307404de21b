"""Tune the library kernels at real model shapes and write the shipped records.

    python -m kernels.tune_library [--trials 40] [--generated 200] [--machines trn1,trn2]
                                   [--only matmul,...]

For each (kernel, shape) of `kernels.shapes.MODEL_SHAPES` and each machine, autotune
searches the parameters of the kernel's expert template (tile sizes, row-tile grouping,
pipeline depth, caching); single-stage contractions (matmul, bmm) are also searched in the
generated space (`template=None`, `--generated` trials: tiling levels, loop order, cache
placement, pipelining). The expert template at its default config is measured too, and the
fastest is written, so a shipped record is never slower than the template.
Output: kernels/records/<kernel>.jsonl (one best record per workload and machine), merged
with what is already there.
"""
from __future__ import annotations

import argparse
import time

import kernels
from kernels import _library
from kernels.shapes import MODEL_SHAPES, workload

# the tunable parameters of each template family: name -> options (first = expert default)
SPACES = {
    "matmul": {"nt": [512, 256, 128], "mi": [4, 1, 2, 8], "pipe": [4, 3, 1, 2], "pj": [2, 1],
               "cache_a": [True, False]},
    "conv": {"ot": [128, 64], "ct": [128, 64], "free": [512, 256, 128], "pipe": [2, 1, 3]},
    "norm": {"mt": [128, 64], "pipe": [2, 1, 3], "cache_x": [True, False]},
    "attention": {"qt": [128, 64], "kt": [128, 64], "pipe": [2, 1, 3], "qi": [4, 2, 1],
                  "opipe": [4, 2, 1]},
    "elementwise": {"free": [4096, 2048, 1024, 8192], "pipe": [3, 2, 1], "wide": [4, 2, 1, 8],
                    "wide_free": [1024, 2048, 512]},
}
FAMILY = {"matmul": "matmul", "linear": "matmul", "matmul_add": "matmul", "bmm": "matmul",
          "rmsnorm_matmul": "matmul", "conv2d": "conv", "depthwise_conv2d": "conv",
          "softmax": "norm", "log_softmax": "norm", "layernorm": "norm", "rmsnorm": "norm",
          "attention": "attention"}


def tunable(kf, prog, which: int = 0):
    """The kernel's template `which` as an autotune template over its SPACES parameters."""
    tname, fn, default = kf.templates_for(prog)[which]
    space = SPACES[FAMILY.get(kf.name, "elementwise")]

    def template(s, cfg):
        fn(s, {**default, **{k: cfg.choice(k, v) for k, v in space.items() if k in default}})
    return template


def expert_record(kf, prog, machine, static):
    """The expert template at its default config, as a Record (None if it does not build)."""
    from autotune.records import TOOL_VERSION, Record, workload_key  # noqa: PLC0415
    choice, k = kf.choose(prog, machine, static, use_records=False)
    rep = k.simulate()
    return Record(kf.record_name(static), workload_key(prog), machine, TOOL_VERSION,
                  {"template": choice.source}, choice.schedule.trace(), rep.cycles,
                  rep.time_us, rep.roofline_fraction)


def tune_one(kname, dims, machine, trials, seed=0, generated=0):
    import autotune  # noqa: PLC0415
    from autotune.records import TOOL_VERSION, Record, workload_key  # noqa: PLC0415
    kf = kernels.LIBRARY[kname]
    specs, static = workload(kname, dims)
    prog = kf.trace(*specs, **static)
    expert = expert_record(kf, prog, machine, static)
    best = expert
    try:
        res = autotune.tune(prog, template=tunable(kf, prog), machine=machine, trials=trials,
                            seed=seed, progress=False, include_default=False,
                            kernel=kf.record_name(static))
        b = res.best
        if b.cycles is not None and b.cycles < expert.cycles:
            best = Record(kf.record_name(static), workload_key(prog), machine, TOOL_VERSION,
                          {"template": expert.config["template"], **b.config}, b.schedule,
                          b.cycles, b.time_us, b.roofline_fraction)
    except Exception as e:  # noqa: BLE001  (a failed search keeps the expert record)
        print(f"  tune failed: {type(e).__name__}: {e}")
    if generated and FAMILY.get(kname) == "matmul" and len(prog.stages) == 1:
        try:
            res = autotune.tune(prog, template=None, machine=machine, trials=generated,
                                seed=seed, progress=False, include_default=False,
                                kernel=kf.record_name(static))
            b = res.best
            if b.cycles is not None and b.cycles < best.cycles:
                best = Record(kf.record_name(static), workload_key(prog), machine, TOOL_VERSION,
                              {"template": "generated", **b.config}, b.schedule, b.cycles,
                              b.time_us, b.roofline_fraction)
        except Exception as e:  # noqa: BLE001
            print(f"  generated-space tune failed: {type(e).__name__}: {e}")
    return expert, best


def main(argv=None):
    from autotune.records import dump_jsonl, load_jsonl  # noqa: PLC0415
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--generated", type=int, default=200,
                    help="trials in the generated space for single-stage contractions (0: off)")
    ap.add_argument("--machines", default="trn1,trn2")
    ap.add_argument("--only", default=None, help="comma-separated kernel names")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    _library.RECORDS_DIR.mkdir(exist_ok=True)
    out: dict[str, dict] = {}
    for label, kname, dims in MODEL_SHAPES:
        if only and kname not in only:
            continue
        for machine in args.machines.split(","):
            t0 = time.time()
            expert, best = tune_one(kname, dims, machine, args.trials,
                                    generated=args.generated)
            print(f"{kname:<10} {label:<38} {machine}: expert {expert.time_us:9.2f} us, tuned "
                  f"{best.time_us:9.2f} us ({expert.time_us / best.time_us:.2f}x), roofline "
                  f"{100 * best.roofline_fraction:.1f}%  [{time.time() - t0:.0f}s]", flush=True)
            out.setdefault(kname, {})[(best.kernel, best.workload, machine)] = best
    for kname, recs in out.items():
        path = _library.RECORDS_DIR / f"{kname}.jsonl"
        old = {(r.kernel, r.workload, r.machine): r for r in load_jsonl(path)} \
            if path.exists() else {}
        old.update(recs)
        dump_jsonl(sorted(old.values(), key=lambda r: (r.kernel, r.workload, r.machine)), path)
        print(f"wrote {path} ({len(old)} records)")


if __name__ == "__main__":
    main()
