"""Sweeps: kernels x shapes x machines (including what-if variants), tuned and tabulated.

A sweep spec is TOML:

    trials = 40                 # per point (optional; also seed, sampler, records)
    machines = ["trn1", "trn2"]

    [[variant]]                 # a what-if machine: a preset with fields replaced
    name = "trn2-half-sbuf"
    base = "trn2"
    replace = { sbuf_bytes = 14680064 }

    [[kernel]]
    name = "matmul"             # a library kernel (needs the `kernels` package) ...
    shapes = [[512, 512, 512], [1024, 1024, 1024]]
    dtype = "bfloat16"

    [[kernel]]
    file = "examples/softmax.py"  # ... or a file defining a @tl.kernel: one spec per input
    shapes = [[[128, 1024]], [[256, 2048]]]

`resolve(entry, shape, dtype) -> (name, prog)` turns a kernel entry into a program; the
CLI passes one that knows the library (autotune itself does not import `kernels`).
"""
from __future__ import annotations

import csv
import tomllib
from pathlib import Path

from tensorlang.ir import TensorlangError


def _fail(path, msg):
    raise TensorlangError(f"sweep spec {path}: {msg}")


def load_spec(path) -> dict:
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except OSError as e:
        raise TensorlangError(f"cannot read sweep spec {str(path)!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        _fail(path, f"not valid TOML ({e})")
    kern = spec.get("kernel")
    if not isinstance(kern, list) or not kern:
        _fail(path, "needs at least one [[kernel]] table")
    for n, k in enumerate(kern):
        if not isinstance(k, dict) or not ("name" in k or "file" in k):
            _fail(path, f"kernel #{n + 1} needs 'name' (library kernel) or 'file'")
        if not isinstance(k.get("shapes"), list) or not k["shapes"]:
            _fail(path, f"kernel #{n + 1} ({k.get('name') or k.get('file')}) needs a non-empty "
                        "'shapes' list")
    if not spec.get("machines") and not spec.get("variant"):
        spec["machines"] = ["trn2"]
    for key, ty in (("trials", int), ("seed", int), ("sampler", str)):
        if key in spec and not isinstance(spec[key], ty):
            _fail(path, f"'{key}' must be a {ty.__name__}, got {spec[key]!r}")
    return spec


def machines_of(spec: dict, path) -> list[tuple[str, object]]:
    import sim  # noqa: PLC0415
    out = [(m, sim.machine(m)) for m in spec.get("machines", [])]
    for n, v in enumerate(spec.get("variant", [])):
        if "name" not in v:
            _fail(path, f"variant #{n + 1} needs a 'name'")
        base = sim.machine(v.get("base", "trn2"))
        try:
            m = base.replace(**v.get("replace", {}))
        except (TypeError, ValueError) as e:
            _fail(path, f"variant {v['name']!r}: {e}")
        out.append((v["name"], m))
    return out


def file_resolver(base_dir: Path):
    def resolve(entry, shape, dtype):
        import importlib.util  # noqa: PLC0415

        import tensorlang as tl  # noqa: PLC0415
        if "file" not in entry:
            raise TensorlangError(f"sweep: library kernel {entry.get('name')!r} needs the "
                                  "`kernels` package; give 'file' instead")
        f = (base_dir / entry["file"]) if not Path(entry["file"]).is_absolute() else Path(entry["file"])
        spec = importlib.util.spec_from_file_location("_sweep_kernel", f)
        if spec is None or not f.exists():
            raise TensorlangError(f"sweep: kernel file {str(f)!r} not found")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        found = {v.name: v for v in vars(mod).values() if isinstance(v, tl.Kernel)}
        kern = found.get(entry.get("name")) if entry.get("name") else next(iter(found.values()), None)
        if kern is None:
            raise TensorlangError(f"sweep: {f} defines no @tl.kernel {entry.get('name') or ''}")
        return kern.name, kern.trace(*[tl.spec(tuple(s), dtype) for s in shape])
    return resolve


def run_sweep(path, resolve=None, csv_path=None, plot=None, progress=True) -> list[dict]:
    """Tune every (kernel, shape, machine) point; write the CSV; return the rows."""
    from .records import Records  # noqa: PLC0415
    from .tuner import tune  # noqa: PLC0415
    path = Path(path)
    spec = load_spec(path)
    resolve = resolve or file_resolver(path.parent)
    records = Records(spec["records"]) if "records" in spec else None
    rows = []
    for entry in spec["kernel"]:
        for shape in entry["shapes"]:
            name, prog = resolve(entry, shape, entry.get("dtype", "bfloat16"))
            for mname, m in machines_of(spec, path):
                res = tune(prog, machine=m, trials=spec.get("trials", 40), seed=spec.get("seed", 0),
                           sampler=spec.get("sampler", "tpe"), progress=progress, records=records,
                           kernel=name, study_name=f"{name}|{shape}|{mname}")
                b = res.best
                rows.append({"kernel": name, "shape": "x".join(map(str, _flat(shape))),
                             "machine": mname, "cycles": b.cycles, "time_us": round(b.time_us, 3),
                             "roofline": round(b.roofline_fraction, 4),
                             "default_cycles": res.default.cycles if res.default else None,
                             "trials": len(res.trials)})
    out = Path(csv_path) if csv_path else path.with_suffix(".csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if plot:
        _plot(rows, plot)
    return rows


def _flat(x):
    return [y for s in x for y in _flat(s)] if isinstance(x, list) else [x]


def _plot(rows, path):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    labels = [f"{r['kernel']} {r['shape']}\n{r['machine']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    ax.bar(range(len(rows)), [r["roofline"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("roofline fraction (tuned)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
