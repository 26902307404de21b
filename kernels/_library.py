"""The library runner: a `KernelFn` ties an algorithm (@tl.kernel) to its schedule templates
and the tuning records, so `matmul(A, B)` just works.

Choosing a schedule for (kernel, workload, machine), first that builds wins:

  1. the fastest record of this exact workload (shipped kernels/records/*.jsonl, then the
     user's records DB when it exists), its trace replayed with `Schedule.replay`;
  2. the record of the nearest shape (same dtypes and ranks), if its trace replays legally
     on this shape and the result simulates faster than the first expert template there (a
     trace tuned at another shape can fit this one badly: a tail tile, a lost fast path);
  3. the expert templates of the kernel, in order (the first is what an expert writes, later
     ones are simpler fallbacks), with their default configs;
  4. the default schedule (always legal).

Compiled kernels are cached per (kernel, workload, static args, machine).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import sim
import tensorlang as tl
from tensorlang.ir import TensorlangError

RECORDS_DIR = Path(__file__).parent / "records"
_BUILD_ERRORS = (TensorlangError, sim.SimError)


def machine_name(machine) -> str:
    return machine if isinstance(machine, str) else machine.name


# -- records ------------------------------------------------------------------------------------

_SHIPPED: list | None = None


def shipped_records() -> list:
    """Every record in kernels/records/*.jsonl (loaded once)."""
    global _SHIPPED
    if _SHIPPED is None:
        from autotune.records import load_jsonl  # noqa: PLC0415
        _SHIPPED = [r for p in sorted(RECORDS_DIR.glob("*.jsonl")) for r in load_jsonl(p)]
    return _SHIPPED


def user_records(kernel: str, machine: str) -> list:
    """Records of the user's DB (TENSORLANG_RECORDS or ~/.cache/tensorlang/records.db) when it
    exists; the library never creates it."""
    from autotune.records import Records, default_path  # noqa: PLC0415
    path = default_path()
    if not path.exists():
        return []
    return Records(path).all(kernel, machine)


def candidates(kernel: str, workload: str, machine: str) -> list[tuple[str, object]]:
    """[(source, Record)]: the best exact record, then the best record of each other
    workload by shape distance (nearest first)."""
    from autotune.records import shape_distance  # noqa: PLC0415
    recs = [r for r in shipped_records() if r.kernel == kernel and r.machine == machine]
    recs += user_records(kernel, machine)
    best: dict[str, object] = {}
    for r in recs:
        if r.workload not in best or r.cycles < best[r.workload].cycles:
            best[r.workload] = r
    out = [("record", best.pop(workload))] if workload in best else []
    near = []
    for w, r in best.items():
        d = shape_distance(workload, w)
        if d is not None:
            near.append((d, w, r))
    out += [("nearest record", r) for _, _, r in sorted(near, key=lambda x: x[:2])]
    return out


def parse_record_name(kernel: str) -> tuple[str, dict]:
    """Inverse of KernelFn.record_name: 'conv2d[padding=1,stride=2]' -> ('conv2d', {...})."""
    name, _, rest = kernel.partition("[")
    static = {}
    for kv in filter(None, rest.rstrip("]").split(",")):
        k, _, v = kv.partition("=")
        static[k] = json.loads(v)
    return name, static


# -- the kernel function ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """The schedule the library picked and why."""
    schedule: object          # tl.Schedule
    source: str               # "record" | "nearest record" | "template <name>" | "default"
    record: object = None     # the Record replayed, if any


@dataclass
class KernelFn:
    """A library kernel: `fn(*arrays, machine="trn2", **static)` -> numpy result(s)."""
    name: str
    algo: object                            # tl.Kernel
    templates: object     # ((name, template(s, cfg), default cfg), ...) or prog -> that tuple
    doc: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.__doc__ = self.doc or self.algo.__doc__
        self.__name__ = self.name

    def __repr__(self):
        return f"<kernels.{self.name}({', '.join(self.algo.tensor_params)})>"

    # the algorithm
    def trace(self, *specs, **static):
        return self.algo.trace(*specs, **static)

    def record_name(self, static: dict) -> str:
        """The `kernel` field of this kernel's records: the name plus non-default static args."""
        extra = [f"{k}={json.dumps(v)}" for k, v in sorted(static.items())
                 if self.algo.static_params.get(k) != v]
        return f"{self.name}[{','.join(extra)}]" if extra else self.name

    # schedules
    def templates_for(self, prog) -> tuple:
        return self.templates(prog) if callable(self.templates) else self.templates

    def template_schedule(self, prog, machine="trn2", which: int = 0, cfg: dict | None = None):
        """The schedule of template `which` applied to `prog` (may raise TensorlangError)."""
        tname, fn, default = self.templates_for(prog)[which]
        s = prog.schedule(machine=machine)
        fn(s, {**default, **(cfg or {})})
        return s

    def choose(self, prog, machine="trn2", static: dict | None = None,
               use_records: bool = True) -> tuple[Choice, object]:
        """(Choice, CompiledKernel): the first candidate schedule that builds (module doc)."""
        from autotune.records import workload_key  # noqa: PLC0415
        mname = machine_name(machine)
        if use_records:
            for source, rec in candidates(self.record_name(static or {}), workload_key(prog),
                                          mname):
                try:
                    s = tl.Schedule.replay(prog, rec.trace, machine)
                    k = s.build(machine)
                except _BUILD_ERRORS:
                    continue
                if source == "nearest record":   # tuned at another shape: keep it only when
                    alt = self._template(prog, machine)   # it simulates faster than the expert
                    if alt is not None and alt[1].simulate().cycles < k.simulate().cycles:
                        return alt
                return Choice(s, source, rec), k
        alt = self._template(prog, machine)
        if alt is not None:
            return alt
        s = prog.schedule(machine=machine)
        return Choice(s, "default"), s.build(machine)

    def _template(self, prog, machine):
        """(Choice, CompiledKernel) of the first template that builds, or None."""
        for n, (tname, _, _) in enumerate(self.templates_for(prog)):
            try:
                s = self.template_schedule(prog, machine, n)
                return Choice(s, f"template {tname}"), s.build(machine)
            except _BUILD_ERRORS:
                continue
        return None

    def compile(self, *specs, machine="trn2", use_records: bool = True, **static):
        """The compiled kernel (asm(), run(), simulate()) for these input specs or arrays;
        `.choice` on it says which schedule was picked."""
        prog = self.trace(*specs, **static)
        from autotune.records import workload_key  # noqa: PLC0415
        key = (workload_key(prog), tuple(sorted(static.items())), machine_name(machine)
               if isinstance(machine, str) else machine, use_records)
        if key not in self._cache:
            choice, k = self.choose(prog, machine, static, use_records)
            k.choice = choice
            self._cache[key] = k
        return self._cache[key]

    def __call__(self, *arrays, machine="trn2", **static):
        arrays = tuple(np.asarray(a) for a in arrays)
        return self.compile(*arrays, machine=machine, **static).run(*arrays)


# -- small helpers for templates ---------------------------------------------------------------

def fit(n: int, want: int) -> int:
    """The split factor to use for a loop of extent n: `want`, or n when n is smaller."""
    return max(1, min(n, want))


def divisor(n: int, want: int) -> int:
    """The largest divisor of n that is <= want (a split without a tail)."""
    want = max(1, min(n, want))
    for f in range(want, 0, -1):
        if n % f == 0:
            return f
    return 1
