"""The `tensorlang` command line: one entry point, one subcommand per job.

    tensorlang run FILE|KERNEL     build + check + simulate a kernel, print the report
    tensorlang asm FILE|KERNEL     print the ISA program
    tensorlang trace FILE|KERNEL   write a Chrome/Perfetto trace of the simulated timeline
    tensorlang tune ...            autotune a kernel (autotune)
    tensorlang sweep SPEC.toml     kernels x shapes x machines, tuned and tabulated
    tensorlang records {list,export,import}
    tensorlang machines            presets and their headline figures

Each subcommand is a pair: `add_<name>(subparsers)` declares its arguments and
`cmd_<name>(args)` runs it. Errors the user can fix (TensorlangError / SimError) print one
line and exit 2; `--json` prints machine-readable output where a command has a result.
The CLI is the application on top of the packages, so it imports autotune / kernels lazily
inside the commands that need them.
"""
from __future__ import annotations

import argparse
import json
import sys

COMMANDS: list = []  # (name, help, add_fn, cmd_fn), in the order shown by --help


def command(name: str, help: str):
    """Register `fn(args)` as subcommand `name`; `fn.add(parser)` may declare arguments."""
    def deco(fn):
        COMMANDS.append((name, help, fn))
        return fn
    return deco


def _table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    cols = cols or list(rows[0])
    cells = [[str(c) for c in cols]] + [["" if r.get(c) is None else str(r.get(c)) for c in cols]
                                        for r in rows]
    w = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w[i]) for i, v in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def _emit(args, obj, rows=None, cols=None):
    """Print `obj` as JSON with --json, else `rows` as a table (or obj as text)."""
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, default=str))
    elif rows is not None:
        print(_table(rows, cols))
    else:
        print(obj)


# -- machines ---------------------------------------------------------------------------------

@command("machines", "list the machine presets and their headline figures")
def cmd_machines(args):
    import sim  # noqa: PLC0415
    from sim.machine import describe, describe_presets  # noqa: PLC0415
    rows = describe_presets()
    for path in args.files:
        rows.append(describe(sim.machine(path)))
    _emit(args, rows, rows, ["name", "pe_clock_ghz", "peak_tflops_bf16", "peak_tflops_fp8",
                             "sbuf_mib", "psum_mib", "hbm_gbps", "dma_queues", "dma_gbps"])


def _add_machines(p):
    p.add_argument("files", nargs="*", help="also describe these machine TOML files")


cmd_machines.add = _add_machines


# -- run / asm / trace ------------------------------------------------------------------------

def _add_target(p, trace_out=False):
    p.add_argument("target", metavar="KERNEL|FILE",
                   help="a library kernel name (e.g. matmul, softmax, attention) or a .py file "
                        "defining a @tl.kernel (optional module-level SPECS list of tl.spec and "
                        "STATIC dict)")
    if trace_out:
        p.add_argument("out", nargs="?", default=None, metavar="OUT.json",
                       help="where to write the trace (default: <kernel>.trace.json)")
    p.add_argument("--shape", default=None,
                   help="comma-separated sizes; for library kernels e.g. matmul takes M,N,K "
                        "(default 512,1024,256)")
    p.add_argument("--dtype", default="bfloat16", help="input dtype (default bfloat16)")
    p.add_argument("--machine", default="trn2", help="machine preset or TOML file (default trn2)")
    p.add_argument("--kernel", default=None, help="FILE only: which @tl.kernel in the file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")


def _dims(text):
    from .ir import TensorlangError  # noqa: PLC0415
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise TensorlangError(f"--shape {text!r} must be comma-separated integers, e.g. "
                              "4096,4096,4096") from None


def _load_file(args):
    """(Kernel, specs, static) from a .py file defining a @tl.kernel."""
    import importlib.util  # noqa: PLC0415
    import os  # noqa: PLC0415

    import tensorlang as tl  # noqa: PLC0415
    path = args.target
    if not os.path.exists(path):
        import kernels  # noqa: PLC0415
        raise tl.TensorlangError(f"{path!r} is neither a library kernel ({', '.join(sorted(kernels.LIBRARY))}) "
                                 "nor a file")
    spec = importlib.util.spec_from_file_location("_tensorlang_user_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    found = {v.name: v for v in vars(mod).values() if isinstance(v, tl.Kernel)}
    if not found:
        raise tl.TensorlangError(f"{path}: defines no @tl.kernel")
    if args.kernel:
        if args.kernel not in found:
            raise tl.TensorlangError(f"{path}: no kernel {args.kernel!r}; it defines "
                                     f"{', '.join(found)}")
        kern = found[args.kernel]
    elif len(found) > 1 and not hasattr(mod, "SPECS"):
        raise tl.TensorlangError(f"{path} defines several kernels ({', '.join(found)}); pick one "
                                 "with --kernel")
    else:
        kern = next(iter(found.values()))
    specs = getattr(mod, "SPECS", None)
    if args.shape is not None:  # one shape for every input of that rank
        dims = _dims(args.shape)
        specs = [tl.spec(dims, args.dtype) for _ in kern.tensor_params]
    if specs is None:
        raise tl.TensorlangError(f"{path}: give the input shapes with a module-level SPECS = "
                                 "[tl.spec(shape, dtype), ...] or --shape")
    return kern, list(specs), dict(getattr(mod, "STATIC", {}))


def _build(args):
    """Everything run/asm/trace need: (name, prog, chosen kernel, how it was chosen, default
    schedule builder)."""
    import kernels  # noqa: PLC0415
    from kernels.shapes import workload  # noqa: PLC0415
    if args.target in kernels.LIBRARY:
        kf = kernels.LIBRARY[args.target]
        specs, static = workload(args.target, _dims(args.shape) if args.shape else None,
                                 args.dtype)
        k = kf.compile(*specs, machine=args.machine, **static)
        return args.target, k.schedule.prog, k, k.choice.source
    kern, specs, static = _load_file(args)
    prog = kern.trace(*specs, **static)
    k = prog.schedule(machine=args.machine).build(args.machine)
    return kern.name, prog, k, "default"


def _shape_text(prog):
    return ", ".join(f"{t.name} {t.dtype}[{','.join(map(str, t.shape))}]" for t in prog.inputs)


@command("run", "build, check against the numpy reference and simulate a kernel; print the report")
def cmd_run(args):
    import numpy as np  # noqa: PLC0415

    import tensorlang as tl  # noqa: PLC0415
    name, prog, k, source = _build(args)
    arrays = [tl.dtypes.random_array(t.shape, t.dtype, seed=args.seed + n, scale=0.5)
              for n, t in enumerate(prog.inputs)]
    outs = k.run(*arrays)
    refs = prog.reference(*arrays)
    outs, refs = (outs, refs) if isinstance(outs, tuple) else ((outs,), (refs,))
    err, ok = 0.0, True
    for t, o, r in zip(prog.outputs, outs, refs):
        d = np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64))
        err = max(err, float(np.nanmax(d)) if d.size else 0.0)
        ok = ok and tl.dtypes.allclose(o, r, t.dtype, *(x.dtype for x in prog.inputs))
    rep = k.simulate()
    rows = [dict(schedule=source, **_summary(rep))]
    base = None
    if source != "default":
        base = prog.schedule(machine=args.machine).build(args.machine).simulate()
        rows.append(dict(schedule="default (untuned)", **_summary(base)))
    result = {"kernel": name, "inputs": _shape_text(prog), "machine": rep.machine,
              "schedule": source, "check": {"matches_reference": ok, "max_abs_error": err},
              "report": rep.to_dict(),
              "default_report": base.to_dict() if base else None,
              "speedup_vs_default": (base.time_us / rep.time_us) if base else None}
    if args.json:
        _emit(args, result)
        return 0 if ok else 1
    print(f"{name}: {_shape_text(prog)} on {rep.machine}")
    print(f"schedule: {source}")
    print(f"check:    {'OK' if ok else 'MISMATCH'} - simulator output vs the numpy reference on "
          f"random inputs (max abs error {err:.3g})\n")
    print(_table(rows, ["schedule", "time_us", "cycles", "roofline", "bound", "tflops"]))
    if base:
        print(f"\nspeedup of the library schedule over the default schedule: "
              f"{base.time_us / rep.time_us:.1f}x")
    print(f"\n{rep}")
    return 0 if ok else 1


def _summary(rep):
    return {"time_us": f"{rep.time_us:,.2f}", "cycles": f"{rep.cycles:,}",
            "roofline": f"{100 * rep.roofline_fraction:.1f}%", "bound": rep.bound,
            "tflops": f"{rep.flops / max(rep.time_us, 1e-9) / 1e6:.2f}"}


cmd_run.add = _add_target


@command("asm", "print the ISA program of a kernel (the library's schedule, or the default)")
def cmd_asm(args):
    name, prog, k, source = _build(args)
    text = k.asm()
    _emit(args, {"kernel": name, "schedule": source, "asm": text}) if args.json else print(text)


cmd_asm.add = _add_target


@command("trace", "simulate a kernel and write its Chrome/Perfetto timeline (ui.perfetto.dev)")
def cmd_trace(args):
    name, prog, k, source = _build(args)
    rep = k.simulate(trace=True)
    out = args.out or f"{name}.trace.json"
    rep.save_trace(out)
    _emit(args, {"kernel": name, "trace": out, "report": rep.to_dict()}) if args.json else print(
        f"wrote {out}: {rep.instructions:,} instructions, {rep.time_us:,.2f} us simulated on "
        f"{rep.machine}; open it in ui.perfetto.dev or chrome://tracing")


cmd_trace.add = lambda p: _add_target(p, trace_out=True)


# -- tune / sweep / records (autotune) -------------------------------------------------------

def _tune_target(args):
    """(kernel record name, prog, template or None) for `tune`: a library kernel or a file."""
    import kernels  # noqa: PLC0415
    if args.target in kernels.LIBRARY:
        from kernels.shapes import workload  # noqa: PLC0415
        kf = kernels.LIBRARY[args.target]
        specs, static = workload(args.target, _dims(args.shape) if args.shape else None,
                                 args.dtype)
        prog = kf.trace(*specs, **static)
        template = None
        if args.space == "template":
            from kernels.tune_library import tunable  # noqa: PLC0415
            template = tunable(kf, prog)
        return kf.record_name(static), prog, template
    kern, specs, static = _load_file(args)
    return kern.name, kern.trace(*specs, **static), None


def _trial_row(name, prog, machine, t, default=None):
    row = {"kernel": name, "shape": _shape_text(prog), "machine": machine,
           "cycles": f"{t.cycles:,}", "time_us": f"{t.time_us:.2f}",
           "roofline": f"{t.roofline_fraction:.3f}"}
    if default is not None and default.cycles:
        row["vs default"] = f"{default.cycles / t.cycles:.2f}x"
    return row


@command("tune", "autotune a kernel's schedule (Optuna over the generated or template space)")
def cmd_tune(args):
    import autotune  # noqa: PLC0415
    name, prog, template = _tune_target(args)
    res = autotune.tune(prog, template=template, machine=args.machine, trials=args.trials,
                        storage=args.storage, workers=args.workers, seed=args.seed,
                        sampler=args.sampler, early_stop=args.early_stop,
                        progress=not args.json, plot=args.plot,
                        records=None if args.no_records else autotune.Records(args.records),
                        study_name=args.study, kernel=name)
    b = res.best
    obj = {"kernel": name, "workload": autotune.workload_key(prog), "machine": args.machine,
           "cycles": b.cycles, "time_us": b.time_us, "roofline_fraction": b.roofline_fraction,
           "config": b.config, "schedule": b.schedule, "trials": len(res.trials),
           "default_cycles": res.default.cycles if res.default else None}
    if args.json:
        _emit(args, obj)
        return
    print(_table([_trial_row(name, prog, args.machine, b, res.default)]))
    print(f"best config: {b.config}")


def _add_tune(p):
    _add_target(p)
    p.add_argument("--shapes", dest="shape", help=argparse.SUPPRESS)
    p.add_argument("--trials", type=int, default=300, help="distinct configs to measure (repeated proposals do not count; default 300)")
    p.add_argument("--sampler", default="tpe", help="tpe (default), random, grid, cmaes, gp")
    p.add_argument("--storage", default=None,
                   help="study storage: a journal file path or an Optuna URL (sqlite:///..., "
                        "postgresql://...); re-running with the same storage resumes")
    p.add_argument("--study", default=None, help="study name (default: kernel|workload|machine)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (needs --storage)")
    p.add_argument("--early-stop", type=int, default=None,
                   help="stop after this many trials without improvement")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a convergence plot")
    p.add_argument("--records", default=None,
                   help="records DB (default: $TENSORLANG_RECORDS or ~/.cache/tensorlang/records.db)")
    p.add_argument("--no-records", action="store_true", help="do not read or write records")
    p.add_argument("--space", choices=("generated", "template"), default="generated",
                   help="library kernels: search the generated space or the expert template's "
                        "parameters (default generated)")


cmd_tune.add = _add_tune


@command("sweep", "tune kernels x shapes x machines from a TOML spec; CSV + table (+ plot)")
def cmd_sweep(args):
    from pathlib import Path  # noqa: PLC0415

    from autotune.sweep import file_resolver, run_sweep  # noqa: PLC0415
    by_file = file_resolver(Path(args.spec).parent)

    def resolve(entry, shape, dtype):
        if "file" in entry:
            return by_file(entry, shape, dtype)
        import kernels  # noqa: PLC0415
        from kernels.shapes import workload  # noqa: PLC0415
        kf = kernels.LIBRARY.get(entry["name"])
        if kf is None:
            from .ir import TensorlangError  # noqa: PLC0415
            raise TensorlangError(f"sweep: no library kernel {entry['name']!r}; kernels are: "
                                  f"{', '.join(sorted(kernels.LIBRARY))}")
        specs, static = workload(entry["name"], tuple(shape), dtype)
        return kf.record_name(static), kf.trace(*specs, **static)

    rows = run_sweep(args.spec, resolve, csv_path=args.csv, plot=args.plot, progress=not args.json)
    _emit(args, rows, rows)


def _add_sweep(p):
    p.add_argument("spec", metavar="SPEC.toml", help="the sweep: kernels, shapes, machines, trials")
    p.add_argument("--csv", default=None, help="CSV output (default: SPEC.csv next to the spec)")
    p.add_argument("--plot", default=None, metavar="PNG", help="bar chart of roofline fractions")


cmd_sweep.add = _add_sweep


@command("records", "list, export or import tuning records")
def cmd_records(args):
    from autotune.records import Records  # noqa: PLC0415
    db = Records(args.db)
    if args.action == "list":
        recs = db.all(args.kernel, args.machine)
        best = {}
        for r in recs:  # fastest first: keep the first per (kernel, workload, machine)
            best.setdefault((r.kernel, r.workload, r.machine), r)
        shown = recs if args.all else list(best.values())
        rows = [{"kernel": r.kernel, "workload": r.workload, "machine": r.machine,
                 "version": r.version, "cycles": r.cycles, "time_us": round(r.time_us, 3),
                 "roofline": round(r.roofline_fraction, 3)} for r in shown]
        _emit(args, rows, rows)
    elif args.action == "export":
        if not args.file:
            from .ir import TensorlangError  # noqa: PLC0415
            raise TensorlangError("records export: give the output FILE.jsonl")
        n = db.export_jsonl(args.file, args.kernel, args.machine)
        print(f"exported {n} records to {args.file}")
    else:
        if not args.file:
            from .ir import TensorlangError  # noqa: PLC0415
            raise TensorlangError("records import: give the input FILE.jsonl")
        n = db.import_jsonl(args.file)
        print(f"imported {n} new records from {args.file} into {db.path}")


def _add_records(p):
    p.add_argument("action", choices=("list", "export", "import"))
    p.add_argument("file", nargs="?", default=None, metavar="FILE.jsonl")
    p.add_argument("--db", default=None,
                   help="records DB (default: $TENSORLANG_RECORDS or ~/.cache/tensorlang/records.db)")
    p.add_argument("--kernel", default=None, help="only this kernel")
    p.add_argument("--machine", default=None, help="only this machine")
    p.add_argument("--all", action="store_true", help="list every record, not just the best")


cmd_records.add = _add_records


# -- entry point ------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tensorlang", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help, fn in COMMANDS:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if hasattr(fn, "add"):
            fn.add(p)
        p.set_defaults(fn=fn)
    return ap


def main(argv=None) -> int:
    from .ir import TensorlangError  # noqa: PLC0415
    args = parser().parse_args(argv)
    try:
        from sim import SimError  # noqa: PLC0415
        errors = (TensorlangError, SimError)
    except ImportError:  # pragma: no cover
        errors = (TensorlangError,)
    try:
        rc = args.fn(args)
    except errors as e:
        print(f"tensorlang {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tensorlang {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
