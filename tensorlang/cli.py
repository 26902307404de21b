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
