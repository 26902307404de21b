"""The scheduling language: how a Program's stages are evaluated.

A `Schedule` is a replayable list of steps over an immutable per-stage state. Each
primitive is a pure function (state -> state) that checks its legality first and refuses
with a message naming the stage, the loop, the value and the rule. The algorithm (the
Program) never changes; the schedule only says *how* it is evaluated, so a legal schedule
cannot change results (up to floating-point reassociation of reductions).

Vocabulary. Every stage starts with one loop per axis (spatial axes, then reduction axes).
`split` / `fuse` derive new loops; the current loops, outermost first, are the stage's
*order*. Loops marked `partition` / `vectorize` / `tensorize` form the *tile*: the block of
the iteration space one engine instruction covers (partition loop -> the 128 partitions,
vectorized loops -> the free dimensions, a tensorized reduction loop -> the systolic
array's contraction dimension). All other loops become loops of the ISA program.

`build()` lowers with `tensorlang.lower`; unspecified decisions are completed there
(documented in `complete()`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .ir import Load, Program, Stage, TensorlangError, expr_vars, walk, Cast, Binary

MEMS = ("sbuf", "psum")
INTRINSICS = ("matmul",)


class LoopVar(str):
    """A loop handle: the loop's name (a str), remembering its stage."""

    stage: str

    def __new__(cls, name: str, stage: str):
        obj = super().__new__(cls, name)
        obj.stage = stage
        return obj


@dataclass(frozen=True)
class Var:
    name: str
    extent: int
    kind: str  # "spatial" | "reduce"


@dataclass(frozen=True)
class Split:
    parent: str
    outer: str
    inner: str
    factor: int
    tail: int  # parent extent % factor (0: the split divides)


@dataclass(frozen=True)
class Fuse:
    outer: str
    inner: str
    fused: str


@dataclass(frozen=True)
class StageSched:
    stage: str
    vars: tuple[Var, ...]
    order: tuple[str, ...]
    relations: tuple[Split | Fuse, ...] = ()
    partition: str | None = None
    vectorized: tuple[str, ...] = ()
    unrolled: tuple[str, ...] = ()
    tensorized: str | None = None
    pipelined: tuple[tuple[str, int], ...] = ()
    attach: tuple[str, str] | None = None      # compute_at: (consumer stage, consumer loop)
    inline: bool = False
    cache_write: tuple[str, str | None] | None = None  # (mem, at loop or None = default)

    def var(self, name: str) -> Var:
        return _info(self).var[name]

    def tile_vars(self) -> tuple[str, ...]:
        return _info(self).tile

    def loops(self) -> tuple[str, ...]:
        tile = _info(self).tile
        return tuple(v for v in self.order if v not in tile)

    def __getstate__(self):               # the derived-data cache is not part of the value
        return {k: v for k, v in self.__dict__.items() if k != "_info"}

    def depth(self, name: str) -> int:
        return dict(self.pipelined).get(name, 1)


@dataclass(frozen=True)
class CacheRead:
    tensor: str
    mem: str
    stage: str  # the consuming stage whose loop `at` hosts the cache
    at: str


@dataclass(frozen=True)
class State:
    stages: tuple[StageSched, ...]
    cache_reads: tuple[CacheRead, ...] = ()

    def get(self, stage: str) -> StageSched:
        for s in self.stages:
            if s.stage == stage:
                return s
        raise KeyError(stage)

    def put(self, ss: StageSched) -> "State":
        return State(tuple(ss if s.stage == ss.stage else s for s in self.stages),
                     self.cache_reads)


def _replace(obj, **changes):
    """dataclasses.replace for the frozen schedule records, without its per-call field
    introspection (a schedule step makes several); drops the derived-data cache."""
    new = object.__new__(type(obj))
    d = {k: v for k, v in obj.__dict__.items() if k != "_info"}
    d.update(changes)
    new.__dict__.update(d)
    return new


class _Info:
    """Data derived from one StageSched, computed once per state object (states are
    immutable, so every check of the same stage state reuses it): vars by name, the
    relation each loop comes from, and memoised closures over the split/fuse tree."""

    def __init__(self, ss: StageSched):
        self.var = {v.name: v for v in ss.vars}
        self.up: dict = {}          # loop -> the Split / Fuse that made it
        self.split: dict = {}       # parent -> its Split
        self.fuse: dict = {}        # fused loop -> its Fuse
        for r in ss.relations:
            if isinstance(r, Split):
                self.up[r.outer] = self.up[r.inner] = r
                self.split[r.parent] = r
            else:
                self.up[r.fused] = r
                self.fuse[r.fused] = r
        self.smemo: dict = {}       # (what, loop) -> roots / extents (functions of the tree)
        t = tuple(ss.vectorized)
        if ss.partition:
            t = (ss.partition,) + t
        if ss.tensorized:
            t = t + (ss.tensorized,)
        self.tile = t
        self.memo: dict = {}        # check results for this stage state

    def leaves(self, name: str) -> list[str]:
        r = self.split.get(name)
        return self.leaves(r.outer) + self.leaves(r.inner) if r else [name]

    def expand(self, name: str) -> list[str]:
        r = self.fuse.get(name)
        return self.expand(r.outer) + self.expand(r.inner) if r else [name]

    def roots(self, name: str) -> frozenset[str]:
        """The original axes a loop derives from (a fused loop: all of its parts')."""
        key = ("roots", name)
        out = self.smemo.get(key)
        if out is None:
            r = self.up.get(name)
            if r is None:
                out = frozenset((name,))
            elif isinstance(r, Fuse):
                out = self.roots(r.outer) | self.roots(r.inner)
            else:
                out = self.roots(r.parent)
            self.smemo[key] = out
        return out


def _info(ss: StageSched) -> _Info:
    d = ss.__dict__.get("_info")
    if d is None:
        d = _Info(ss)
        object.__setattr__(ss, "_info", d)
    return d


def extent_set(ss: StageSched, name: str) -> frozenset[int]:
    """Every extent loop `name` takes (more than one below a split that leaves a tail)."""
    info = _info(ss)
    key = ("extents", name)
    out = info.smemo.get(key)
    if out is not None:
        return out
    r = info.up.get(name)
    if isinstance(r, Split):
        parent = extent_set(ss, r.parent)
        if name == r.outer:
            out = frozenset(-(-n // r.factor) for n in parent)
        else:
            o = {r.factor for n in parent if n >= r.factor}
            o |= {n % r.factor for n in parent if n % r.factor}
            out = frozenset(o)
    elif isinstance(r, Fuse):
        out = frozenset(a * b for a in extent_set(ss, r.outer) for b in extent_set(ss, r.inner))
    else:
        out = frozenset((info.var[name].extent,))
    info.smemo[key] = out
    return out


def split_leaves(ss: StageSched, name: str) -> list[str]:
    """The loops a var was split into, recursively (the var itself when never split)."""
    return _info(ss).leaves(name)


def expand_fused(ss: StageSched, name: str) -> list[str]:
    """A fused loop's component loops, outermost first (the loop itself when not fused)."""
    return _info(ss).expand(name)


def check_tails(ss: StageSched, what: str):
    """A split that leaves a tail needs its outer loop(s) bound before its inner ones: every
    loop derived from the outer part stays a loop (not a tile loop) and runs outside every
    loop derived from the inner part (tile loops count as innermost)."""
    info = _info(ss)
    tails = [r for r in ss.relations if isinstance(r, Split) and r.tail]
    if not tails or info.memo.get("tails_ok"):
        return
    tile = {a for v in info.tile for a in info.expand(v)}
    pos = {}
    for v in ss.order:
        for a in info.expand(v):
            if a not in tile:
                pos[a] = len(pos)
    for r in tails:
        rule = (f"the split of {r.parent!r} by {r.factor} leaves a tail of {r.tail}, so "
                f"{r.outer!r} must run as a loop outside {r.inner!r} (or split by a divisor)")
        outer, inner = info.leaves(r.outer), info.leaves(r.inner)
        for a in outer:
            if a in tile:
                raise TensorlangError(f"{what}: stage {ss.stage!r} would make {a!r} a "
                                      f"partition/vectorized/tensorized tile loop, but {rule}")
        last = max(pos[a] for a in outer)
        for b in inner:
            if b in pos and pos[b] < last:
                a = max(outer, key=lambda x: pos[x])
                raise TensorlangError(f"{what}: stage {ss.stage!r} would run {b!r} outside "
                                      f"{a!r}, but {rule}")
    info.memo["tails_ok"] = True


def hosts(state: "State", stage: str) -> set[str]:
    """Loops of `stage` that host a cache_read, a compute_at or a cache_write: they stay loops."""
    out = {c.at for c in state.cache_reads if c.stage == stage}
    out |= {p.attach[1] for p in state.stages if p.attach and p.attach[0] == stage}
    cw = state.get(stage).cache_write
    if cw and cw[1]:
        out.add(cw[1])
    return out


def check_partitionable(ss: StageSched, what: str, hosting: set[str] = frozenset(), ok=None,
                        hint: str | None = None):
    """Every tile has a partition loop: the stage has one, or a spatial loop that `build` can
    split (when > the partitions) and partition -- not fused, annotated, or the outer part of
    a split that leaves a tail. `ok(loop)`, when given, is an extra rule on the candidates
    (matmul layouts: a loop of one operand only)."""
    if ss.partition is not None:
        return
    info = _info(ss)
    tile = set(info.tile)
    tail_outer = {a for r in ss.relations if isinstance(r, Split) and r.tail
                  for a in info.leaves(r.outer)}
    marked = tile | set(info.fuse) | set(dict(ss.pipelined)) | set(ss.unrolled) | tail_outer | \
        set(hosting)
    spatial = [v for v in ss.order if info.var[v].kind == "spatial"]
    if not any(v not in marked and (ok is None or ok(v)) for v in spatial):
        raise TensorlangError(
            f"{what}: stage {ss.stage!r} would have no loop left to map to the partitions "
            f"{hint or '(a tensorized stage partitions a loop of one operand only, not of the moving one) ' if ok else ''}"
            f"(spatial loops: {', '.join(spatial) or 'none'}; fused, vectorized, pipelined, "
            "unrolled, tail-splitting outer loops and loops hosting a cache or compute_at "
            "cannot be); partition a loop first")


class _ProgInfo:
    """What the legality checks need from a Program, computed once per Program (not once
    per schedule or per step): stages by name, their reads, who reads / produces each
    tensor, the matmul pattern of each stage and the axes each of its operands uses."""

    def __init__(self, prog: Program):
        self.stage = {st.name: st for st in prog.stages}
        self.index = {st.name: i for i, st in enumerate(prog.stages)}
        self.names = [st.name for st in prog.stages]
        self.tensors = prog.tensors
        self.reads = {st.name: tuple(st.reads()) for st in prog.stages}
        self.read_tensors = {n: frozenset(ld.tensor for ld in r) for n, r in self.reads.items()}
        self.readers: dict = {}     # tensor -> stages reading it, program order
        self.padded: dict = {}      # tensor -> stages reading it with padding
        for st in prog.stages:
            for ld in self.reads[st.name]:
                if st.name not in self.readers.setdefault(ld.tensor, []):
                    self.readers[ld.tensor].append(st.name)
                if ld.pad is not None and st.name not in self.padded.setdefault(ld.tensor, []):
                    self.padded[ld.tensor].append(st.name)
        self.producer = {}
        for st in prog.stages:
            self.producer.setdefault(st.tensor, st.name)
        self.mm = {st.name: matmul_operands(st) for st in prog.stages}
        # axes each matmul operand's index uses (nonzero coefficient)
        self.mm_axes = {n: tuple(_load_axes(ld) for ld in ops) if ops else None
                        for n, ops in self.mm.items()}
        self.initial = initial_state(prog)   # immutable: every schedule starts from this one


def _load_axes(ld: Load) -> frozenset[str]:
    return frozenset(v for ix in ld.index for v, c in ix.terms if c)


def _affine_axes(ix) -> frozenset[str]:
    return frozenset(v for v, c in ix.terms if c)


def _loads_of_value(st: Stage) -> list[Load]:
    return [x for x in walk(st.value) if isinstance(x, Load)]


def _prog_info(prog: Program) -> _ProgInfo:
    d = prog.__dict__.get("_sched_info")
    if d is None:
        d = _ProgInfo(prog)
        object.__setattr__(prog, "_sched_info", d)
    return d


def initial_state(prog: Program) -> State:
    out = []
    for st in prog.stages:
        vs = tuple(Var(a.name, a.extent, "spatial") for a in st.axes) + \
            tuple(Var(a.name, a.extent, "reduce") for a in st.reduce_axes)
        out.append(StageSched(st.name, vs, tuple(v.name for v in vs)))
    return State(tuple(out))


def matmul_operands(st: Stage) -> tuple[Load, Load] | None:
    """(a, b) when the stage is sum_k cast?(a) * cast?(b), the pattern tensorize('matmul') takes.
    A padded read (X.pad(v)[...]) is one too: lowering reads the padded copy (pad_tensors)."""
    if st.reduce != "add":
        return None
    v = st.value
    if not (isinstance(v, Binary) and v.op == "mul"):
        return None
    ops = []
    for x in (v.a, v.b):
        while isinstance(x, Cast):
            x = x.a
        if not isinstance(x, Load):
            return None
        ops.append(x)
    return ops[0], ops[1]


class Schedule:
    """The schedule of a Program: a mutable handle over immutable states, plus its trace."""

    def __init__(self, prog: Program, machine="trn2"):
        self.prog = prog
        self.machine = machine
        self.state = _prog_info(prog).initial
        self._trace: list[dict] = []

    # -- inspection -------------------------------------------------------------------------
    def _stage(self, stage) -> StageSched:
        name = stage.stage if isinstance(stage, LoopVar) else str(stage)
        try:
            return self.state.get(name)
        except KeyError:
            for st in self.prog.stages:      # a tensor name selects the stage storing to it
                if st.tensor == name:
                    return self.state.get(st.name)
            raise TensorlangError(f"no stage {name!r}; stages are: "
                                  f"{', '.join(s.stage for s in self.state.stages)}") from None

    def axes(self, stage) -> tuple[LoopVar, ...]:
        """The stage's current spatial loops, outermost first."""
        ss = self._stage(stage)
        return tuple(LoopVar(v, ss.stage) for v in ss.order if ss.var(v).kind == "spatial")

    def reduce_axes(self, stage) -> tuple[LoopVar, ...]:
        ss = self._stage(stage)
        return tuple(LoopVar(v, ss.stage) for v in ss.order if ss.var(v).kind == "reduce")

    def loops(self, stage) -> tuple[LoopVar, ...]:
        ss = self._stage(stage)
        return tuple(LoopVar(v, ss.stage) for v in ss.order)

    def trace(self) -> list[dict]:
        """The schedule as a JSON-serialisable list of steps (see `replay`)."""
        return json.loads(json.dumps(self._trace))

    @staticmethod
    def replay(prog: Program, trace: list[dict], machine="trn2") -> "Schedule":
        s = Schedule(prog, machine)
        for i, step in enumerate(trace):
            if not isinstance(step, dict) or step.get("op") not in STEP_OPS:
                raise TensorlangError(f"schedule trace step {i}: unknown step {step!r}; "
                                      f"steps are {', '.join(STEP_OPS)}")
            fn = getattr(s, step["op"])
            args = step.get("args", [])
            if "stage" in step:
                args = [LoopVar(a, step["stage"]) if isinstance(a, str) and n in step.get("loops", ())
                        else a for n, a in enumerate(args)]
            fn(*args, **step.get("kwargs", {}))
        return s

    def copy(self) -> "Schedule":
        s = object.__new__(Schedule)
        s.prog, s.machine, s.state, s._trace = self.prog, self.machine, self.state, list(self._trace)
        return s

    def __str__(self) -> str:
        lines = []
        for ss in self.state.stages:
            if ss.inline:
                lines.append(f"{ss.stage}: inlined")
                continue
            marks = []
            for v in ss.order:
                tag = ("P" if v == ss.partition else "V" if v in ss.vectorized else
                       "T" if v == ss.tensorized else "")
                tag += f"x{ss.depth(v)}" if ss.depth(v) > 1 else ""
                tag += "U" if v in ss.unrolled else ""
                marks.append(f"{v}({ss.var(v).extent}{':' + tag if tag else ''})")
            extra = f" @ {ss.attach[0]}.{ss.attach[1]}" if ss.attach else ""
            lines.append(f"{ss.stage}: " + " ".join(marks) + extra)
        for c in self.state.cache_reads:
            lines.append(f"cache_read {c.tensor} -> {c.mem} at {c.stage}.{c.at}")
        return "\n".join(lines)

    # -- helpers -------------------------------------------------------------------------------
    def _record(self, op: str, stage: str | None, args: list, loops=(), kwargs=None):
        step = {"op": op, "args": [str(a) if isinstance(a, LoopVar) else a for a in args]}
        if stage is not None:
            step["stage"] = stage
        if loops:
            step["loops"] = list(loops)
        if kwargs:
            step["kwargs"] = kwargs
        self._trace.append(step)

    def _loop(self, ss: StageSched, loop, what: str) -> str:
        name = str(loop)
        if isinstance(loop, LoopVar) and loop.stage != ss.stage:
            raise TensorlangError(f"{what}: loop {name!r} belongs to stage {loop.stage!r}, not "
                                  f"{ss.stage!r}; one step schedules the loops of one stage")
        if name not in ss.order:
            raise TensorlangError(f"{what}: stage {ss.stage!r} has no loop {name!r}; "
                                  f"its loops are {', '.join(ss.order)}")
        return name

    def _fresh(self, ss: StageSched, base: str) -> str:
        taken = _info(ss).var
        name, n = base, 1
        while name in taken:
            name, n = f"{base}{n}", n + 1
        return name

    def _spec(self):
        cached = self.__dict__.get("_spec_for")
        if cached is not None and cached[0] is self.machine:
            return cached[1]
        import sim  # noqa: PLC0415  (only for the limits used by up-front checks)
        spec = sim.machine(self.machine)
        self._spec_for = (self.machine, spec)
        return spec

    def _stage_of(self, loop, stage) -> StageSched:
        if stage is None:
            if not isinstance(loop, LoopVar):
                raise TensorlangError(f"loop {loop!r} is a plain string; pass the stage too "
                                      "or use the handles from s.axes()/s.split()")
            stage = loop.stage
        return self._stage(stage)

    def _commit(self, state: State, what: str):
        """Validate a whole new state (rules that involve several steps) and adopt it.
        Rules of one stage alone are checked once per stage state (states are immutable and
        their derived data is cached), so a step pays only for the stage it changed."""
        pi = self._pinfo
        attached_mm = [ss for ss in state.stages if ss.attach and ss.tensorized]
        for ss in state.stages:
            check_tails(ss, what)
            ok = self._check_matmul_layout(ss, what) if ss.tensorized else None
            if not ss.inline and not ss.attach:
                feeds = [p for p in attached_mm if p.attach[0] == ss.stage]
                if feeds:
                    ok = self._attached_ok(state, ss, feeds, what, ok)
                hosting = frozenset(hosts(state, ss.stage))
                memo = _info(ss).memo
                key = ("partitionable", hosting, pi)
                if feeds or not memo.get(key):
                    hint = None if not feeds else (
                        f"(stage {feeds[0].stage!r} is tensorized and computed at {ss.stage!r}, "
                        f"so the partition loop of {ss.stage!r} must index one of its matmul "
                        "operands only, and not the one the vectorized loops index) ")
                    check_partitionable(ss, what, hosting, ok, hint)
                    if not feeds:
                        memo[key] = True
        self._check_links(state, what)
        self.state = state

    @property
    def _pinfo(self) -> _ProgInfo:
        return _prog_info(self.prog)

    def _check_matmul_layout(self, ss: StageSched, what: str):
        """A tensorized stage computes out[M, N] = a[K, M]^T b[K, N]: the partition loop (M)
        and the vectorized loops (N) index different operands, and neither operand depends
        on both; the accumulator is in PSUM. Returns the rule on partition candidates."""
        info, pi = _info(ss), self._pinfo
        key = ("matmul_layout", pi)
        if key in info.memo:
            return info.memo[key]
        st = pi.stage[ss.stage]
        a, b = pi.mm[ss.stage]
        axes = pi.mm_axes[ss.stage]

        def uses(k, loop):
            return not axes[k].isdisjoint(info.roots(loop))
        free = [v for v in ss.vectorized if info.var[v].kind == "spatial"]
        for loop in ([ss.partition] if ss.partition else []) + free:
            if uses(0, loop) and uses(1, loop):
                raise TensorlangError(
                    f"{what}: stage {ss.stage!r} is tensorized, and both operands {a.tensor!r} "
                    f"and {b.tensor!r} depend on its {'partition' if loop == ss.partition else 'vectorized'}"
                    f" loop {loop!r}; a matmul takes [K, M] x [K, N]: the partition loop (M) and "
                    "the vectorized loops (N) must each index one operand only", st.loc)
        for k, ld in enumerate((a, b)):
            p = ss.partition is not None and uses(k, ss.partition)
            fs = [v for v in free if uses(k, v)]
            if p and fs:
                raise TensorlangError(
                    f"{what}: stage {ss.stage!r} is tensorized, and operand {ld.tensor!r} depends "
                    f"on both the partition loop {ss.partition!r} and the vectorized loop "
                    f"{fs[0]!r}; a matmul takes [K, M] x [K, N]: partition a loop of one operand "
                    "and vectorize loops of the other", st.loc)
        if ss.cache_write and ss.cache_write[0] != "psum":
            raise TensorlangError(f"{what}: stage {ss.stage!r} is tensorized, so its accumulator "
                                  f"is in PSUM, not {ss.cache_write[0]!r} (cache_write)")
        moving = {k for k in (0, 1) for v in free if uses(k, v)}

        def can_partition(v):  # candidates for the partition loop build may choose
            users = [k for k in (0, 1) if uses(k, v)]
            return len(users) == 1 and users[0] not in moving
        info.memo[key] = can_partition
        return can_partition

    def _attached_ok(self, state: State, cs: StageSched, feeds, what: str, ok):
        """Tensorized stages computed at root stage `cs` take their tile layout from it: the
        consumer's partition loop and vectorized loops (through the consumer's read of the
        producer's tensor) become the producer's M and N, so the producer's operands must
        fit [K, M] x [K, N] there. Checks the current layout; returns the rule on the
        consumer's partition candidates (combined with `ok`)."""
        pi = self._pinfo
        ci = _info(cs)
        cst = pi.stage[cs.stage]
        value_loads = _loads_of_value(cst)
        rules = []
        for ps in feeds:
            pst = pi.stage[ps.stage]
            a, b = pi.mm[ps.stage]
            spatial = {ax.name for ax in pst.axes}
            dim_of = {ix.terms[0][0]: d for d, ix in enumerate(pst.index)}
            for ld in pi.reads[cs.stage]:
                if ld.tensor != pst.tensor:
                    continue
                if not cs.tensorized and pi.mm[cs.stage] and ld in pi.mm[cs.stage]:
                    continue    # a later tensorize of the consumer changes this read's layout
                # the producer's operands, as axes of the consumer (through ld's index)
                mapped = []
                for op in (a, b):
                    ax = set()
                    for y in _load_axes(op):
                        if y in spatial:
                            ax |= _affine_axes(ld.index[dim_of[y]])
                    mapped.append(frozenset(ax))
                part, dims = self._consumer_layout(cs, ld, ld in value_loads)

                def uses(k, loop):
                    return not mapped[k].isdisjoint(ci.roots(loop))

                def bad(part, dims, ps=ps, uses=uses, a=a, b=b):
                    if part is None:
                        return None
                    deps = [f for f in dims if uses(0, f) or uses(1, f)]
                    pa, pb = uses(0, part), uses(1, part)
                    for k, (p, op) in enumerate(((pa, a), (pb, b))):
                        fs = [f for f in deps if uses(k, f)]
                        if p and fs:
                            return (f"operand {op.tensor!r} would depend on both the partition "
                                    f"loop {part!r} and the vectorized loop {fs[0]!r}")
                    if pa and pb:
                        return (f"both operands {a.tensor!r} and {b.tensor!r} would depend on "
                                f"the partition loop {part!r}")
                    return None
                why = bad(part, dims)
                if why:
                    raise TensorlangError(
                        f"{what}: stage {ps.stage!r} is tensorized and computed at "
                        f"{ps.attach[0]}.{ps.attach[1]}, so it takes the tile layout of "
                        f"{cs.stage!r} (partition {part!r}, vectorized "
                        f"{', '.join(dims) or 'none'}): {why}; a matmul takes [K, M] x [K, N]: "
                        f"the partition loop (M) and the vectorized loops (N) must each index "
                        f"one operand only", pst.loc)
                if cs.partition is None and not cs.tensorized:
                    rules.append(lambda v, bad=bad, dims=dims: bad(v, dims) is None)
        if not rules:
            return ok
        return lambda v: (ok is None or ok(v)) and all(r(v) for r in rules)

    def _consumer_layout(self, cs: StageSched, ld: Load, in_value: bool):
        """(partition loop, free loops) of the tiles in which root stage `cs` reads `ld`:
        a tensorized consumer reads its matmul operands with the contraction loop on the
        partitions (the stationary one along M, the moving one along N)."""
        ci = _info(cs)
        free = [v for v in cs.vectorized if ci.var[v].kind == "spatial"]
        if cs.tensorized:
            ops = self._pinfo.mm[cs.stage]
            axes = self._pinfo.mm_axes[cs.stage]
            if ld in ops:
                k = ops.index(ld)
                other = 1 - k

                def on(j, loops):
                    return any(not axes[j].isdisjoint(ci.roots(v)) for v in loops)
                part = [cs.partition] if cs.partition else []
                stationary = on(k, part) or on(other, free)
                return cs.tensorized, (part if stationary else free)
            return cs.partition, free
        red = [v for v in cs.vectorized if ci.var[v].kind == "reduce"] if in_value else []
        return cs.partition, free + red

    def _check_own_layout(self, ss: StageSched, name: str, what: str):
        if ss.attach and ss.var(name).kind == "spatial":
            raise TensorlangError(
                f"{what} {ss.stage}.{name}: {ss.stage!r} is computed at "
                f"{ss.attach[0]}.{ss.attach[1]} and takes its spatial layout from there; only "
                "its reduction loops can be scheduled")

    def _check_tile_loop(self, ss: StageSched, name: str, what: str, fused_ok: bool = False):
        """A loop becoming part of the tile: not pipelined/unrolled, not fused (partition and
        contraction: one affine stride), not a spatial loop of an attached stage."""
        if name in dict(ss.pipelined) or name in ss.unrolled:
            raise TensorlangError(f"{what} {ss.stage}.{name}: the loop is pipelined/unrolled; a "
                                  "tile loop is not a loop of the program")
        if not fused_ok and any(isinstance(r, Fuse) and r.fused == name for r in ss.relations):
            raise TensorlangError(f"{what} {ss.stage}.{name}: a fused loop cannot be the "
                                  f"{what} loop (it has no single stride); {what} one of its parts")
        self._check_own_layout(ss, name, what)

    def _consumers(self, state: State, tensor: str) -> list[str]:
        """Stages reading `tensor` once inlined stages are substituted into their readers."""
        pi = self._pinfo
        out = []
        for name in pi.readers.get(tensor, ()):
            if state.get(name).inline:
                out += [c for c in self._consumers(state, pi.stage[name].tensor) if c not in out]
            elif name not in out:
                out.append(name)
        return out

    def _check_links(self, state: State, what: str):
        """Rules between stages: compute_at targets, cache_read / cache_write positions."""
        for ss in state.stages:
            if ss.attach:
                target, at = ss.attach
                ts = state.get(target)
                where = f"{what}: {ss.stage!r} is computed at {target}.{at}"
                if ts.inline:
                    raise TensorlangError(f"{where}, but {target!r} is inlined")
                if ts.attach:
                    raise TensorlangError(f"{where}, but {target!r} is itself computed at "
                                          f"{ts.attach[0]}.{ts.attach[1]}; attach to a root stage")
                if at not in ts.order:
                    raise TensorlangError(f"{where}, but {at!r} is no longer a loop of {target!r} "
                                          "(split or fused since); transform loops first")
                if at in ts.tile_vars():
                    raise TensorlangError(f"{where}, but {target}.{at} is a tile loop "
                                          "(partition/vectorize/tensorize), not a loop")
                tensor = self._pinfo.stage[ss.stage].tensor
                for c in self._consumers(state, tensor):
                    cs = state.get(c)
                    if c != target and not (cs.attach and cs.attach[0] == target):
                        raise TensorlangError(
                            f"{where}, but stage {c!r} also reads {tensor!r} and is not computed "
                            f"inside {target!r}; compute {c!r} at {target!r} first")
        for c in state.cache_reads:
            cs = state.get(c.stage)
            where = f"{what}: cache_read of {c.tensor!r} at {c.stage}.{c.at}"
            if cs.inline or cs.attach:
                raise TensorlangError(f"{where}, but {c.stage!r} is "
                                      f"{'inlined' if cs.inline else 'computed at another stage'}"
                                      "; cache where the loop nest runs")
            if c.at not in cs.order:
                raise TensorlangError(f"{where}, but {c.at!r} is no longer a loop of {c.stage!r} "
                                      "(split or fused since); transform loops first")
            if c.at in cs.tile_vars():
                raise TensorlangError(f"{where}, but {c.at!r} is a tile loop, not a loop")
            p = self._pinfo.producer.get(c.tensor)
            if p is not None and (state.get(p).inline or state.get(p).attach):
                raise TensorlangError(f"{where}, but {c.tensor!r} is not in HBM: its stage "
                                      f"{p!r} is inlined or computed at a consumer")
        for ss in state.stages:
            if ss.cache_write is None or ss.cache_write[1] is None:
                continue
            at = ss.cache_write[1]
            where = f"{what}: cache_write of {ss.stage!r} at {at!r}"
            if ss.attach:
                raise TensorlangError(f"{where}, but {ss.stage!r} is computed at "
                                      f"{ss.attach[0]}.{ss.attach[1]}; its tile lives there")
            if at not in ss.order:
                raise TensorlangError(f"{where}, but {at!r} is no longer a loop of {ss.stage!r} "
                                      "(split or fused since); transform loops first")
            if at in ss.tile_vars():
                raise TensorlangError(f"{where}: {at!r} is a tile loop, not a loop")
            red = next((v for v in ss.loops() if ss.var(v).kind == "reduce"), None)
            if red is not None and ss.loops().index(at) >= ss.loops().index(red):
                raise TensorlangError(f"{where}: it is inside the reduction loop {red!r}; the "
                                      "accumulator must cover every reduction loop")

    # -- loop transformations -------------------------------------------------------------------
    def split(self, loop, factor: int, stage=None) -> tuple[LoopVar, LoopVar]:
        ss = self._stage_of(loop, stage)
        name = self._loop(ss, loop, "split")
        v = ss.var(name)
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise TensorlangError(f"split of {ss.stage}.{name}: factor {factor!r} must be an "
                                  "integer >= 1")
        if factor > v.extent:
            raise TensorlangError(f"split of {ss.stage}.{name}: factor {factor} > extent "
                                  f"{v.extent} of the loop; a factor must be 1..{v.extent}")
        if any(isinstance(r, Fuse) and r.fused == name for r in ss.relations):
            raise TensorlangError(f"split of {ss.stage}.{name}: a fused loop cannot be split; "
                                  "split before fusing")
        if name in ss.tile_vars() or name in dict(ss.pipelined) or name in ss.unrolled:
            raise TensorlangError(f"split of {ss.stage}.{name}: the loop is already annotated "
                                  "(partition/vectorize/tensorize/pipeline/unroll); split first")
        self._check_own_layout(ss, name, "split")
        for r in ss.relations:
            if isinstance(r, Split) and r.outer == name and r.tail:
                raise TensorlangError(
                    f"split of {ss.stage}.{name}: it is the outer loop of the split of "
                    f"{r.parent!r} by {r.factor} that leaves a tail of {r.tail}; split "
                    f"{r.inner!r} or {r.parent!r} by a divisor instead")
        outer, inner = self._fresh(ss, name + "o"), self._fresh(ss, name + "i")
        # the tail: the remainder of the largest extent the loop takes that leaves one (a loop
        # that is itself the inner part of a split with a tail takes several extents)
        tail = next((n % factor for n in sorted(extent_set(ss, name), reverse=True)
                     if n % factor), 0)
        ss2 = _replace(
            ss,
            vars=ss.vars + (Var(outer, -(-v.extent // factor), v.kind), Var(inner, factor, v.kind)),
            order=tuple(x for o in ss.order for x in ((outer, inner) if o == name else (o,))),
            relations=ss.relations + (Split(name, outer, inner, factor, tail),),
        )
        self._commit(self.state.put(ss2), "split")
        self._record("split", ss.stage, [name, factor], loops=[0])
        return LoopVar(outer, ss.stage), LoopVar(inner, ss.stage)

    def tile(self, a, b, fa: int, fb: int, stage=None):
        """split a and b and order the result (ao, bo, ai, bi); all or nothing."""
        state, trace = self.state, list(self._trace)
        try:
            ao, ai = self.split(a, fa, stage)
            bo, bi = self.split(b, fb, stage)
            self.reorder(ao, bo, ai, bi)
        except TensorlangError:
            self.state, self._trace = state, trace
            raise
        return ao, bo, ai, bi

    def reorder(self, *loops, stage=None):
        """Put the given loops in this order, in the positions they occupy now."""
        if not loops:
            raise TensorlangError("reorder needs at least one loop")
        ss = self._stage_of(loops[0], stage)
        names = [self._loop(ss, lp, "reorder") for lp in loops]
        if len(set(names)) != len(names):
            raise TensorlangError(f"reorder of stage {ss.stage!r}: loops repeated in {names}")
        slots = sorted(ss.order.index(n) for n in names)
        order = list(ss.order)
        for slot, n in zip(slots, names):
            order[slot] = n
        self._commit(self.state.put(_replace(ss, order=tuple(order))), "reorder")
        self._record("reorder", ss.stage, names, loops=list(range(len(names))))

    def fuse(self, a, b, stage=None) -> LoopVar:
        """Merge adjacent loops a (outer) and b (inner) into one loop of extent a*b."""
        ss = self._stage_of(a, stage)
        na, nb = self._loop(ss, a, "fuse"), self._loop(ss, b, "fuse")
        ia, ib = ss.order.index(na), ss.order.index(nb)
        if ib != ia + 1:
            raise TensorlangError(f"fuse of {ss.stage}.{na} and {nb}: loops must be adjacent, "
                                  f"{na!r} directly outside {nb!r} (order: {', '.join(ss.order)})")
        va, vb = ss.var(na), ss.var(nb)
        if va.kind != vb.kind:
            raise TensorlangError(f"fuse of {ss.stage}.{na} and {nb}: cannot fuse a spatial "
                                  "loop with a reduction loop")
        for x in (na, nb):
            if x in ss.tile_vars() or x in dict(ss.pipelined) or x in ss.unrolled:
                raise TensorlangError(f"fuse of {ss.stage}.{na} and {nb}: {x!r} is already "
                                      "annotated (partition/vectorize/tensorize/pipeline/unroll); "
                                      "fuse first, then annotate")
            self._check_own_layout(ss, x, "fuse")
        fused = self._fresh(ss, f"{na}_{nb}")
        order = ss.order[:ia] + (fused,) + ss.order[ib + 1:]
        ss2 = _replace(ss, vars=ss.vars + (Var(fused, va.extent * vb.extent, va.kind),),
                                  order=order, relations=ss.relations + (Fuse(na, nb, fused),))
        self._commit(self.state.put(ss2), "fuse")
        self._record("fuse", ss.stage, [na, nb], loops=[0, 1])
        return LoopVar(fused, ss.stage)

    # -- tile annotations --------------------------------------------------------------------------
    def partition(self, loop, stage=None):
        """Map this loop to the partitions (at most spec.partitions iterations)."""
        ss = self._stage_of(loop, stage)
        name = self._loop(ss, loop, "partition")
        v = ss.var(name)
        limit = self._spec().partitions
        if v.extent > limit:
            raise TensorlangError(f"partition axis {name!r} of stage {ss.stage!r} has extent "
                                  f"{v.extent} > {limit} partitions; split it first")
        if v.kind != "spatial":
            raise TensorlangError(f"partition axis {name!r} of stage {ss.stage!r} is a reduction "
                                  "loop; only tensorize('matmul') puts a reduction on partitions")
        if name in ss.vectorized or name == ss.tensorized:
            raise TensorlangError(f"partition: {ss.stage}.{name} is already vectorized/tensorized")
        self._check_tile_loop(ss, name, "partition")
        self._commit(self.state.put(_replace(ss, partition=name)), "partition")
        self._record("partition", ss.stage, [name], loops=[0])

    def vectorize(self, loop, stage=None):
        """Make this loop a free dimension of the stage's engine instructions."""
        ss = self._stage_of(loop, stage)
        name = self._loop(ss, loop, "vectorize")
        if name == ss.partition or name == ss.tensorized:
            raise TensorlangError(f"vectorize: {ss.stage}.{name} is already the partition / "
                                  "tensorized loop")
        if name in ss.vectorized:
            return
        spec = self._spec()
        free = ss.var(name).extent
        for v in ss.vectorized:
            free *= ss.var(v).extent
        limit = spec.matmul_max_n if ss.tensorized else spec.max_free_elems_sbuf
        if free > limit:
            raise TensorlangError(
                f"vectorize {ss.stage}.{name}: the tile's free size would be {free} elements > "
                f"{limit} ({'matmul N' if ss.tensorized else 'free elements per instruction'})")
        if ss.tensorized and ss.var(name).kind == "reduce":
            raise TensorlangError(f"vectorize {ss.stage}.{name}: the stage is tensorized over "
                                  f"{ss.tensorized!r}; a matmul reduces only over the partitions, "
                                  "so a reduction loop cannot be vectorized")
        self._check_tile_loop(ss, name, "vectorize", fused_ok=True)
        self._commit(self.state.put(_replace(ss, vectorized=ss.vectorized + (name,))),
                     "vectorize")
        self._record("vectorize", ss.stage, [name], loops=[0])

    def unroll(self, loop, stage=None):
        ss = self._stage_of(loop, stage)
        name = self._loop(ss, loop, "unroll")
        if name in ss.tile_vars():
            raise TensorlangError(f"unroll: {ss.stage}.{name} is a tile loop (partition/vectorize)")
        if ss.var(name).extent > 64:
            raise TensorlangError(f"unroll {ss.stage}.{name}: extent {ss.var(name).extent} > 64")
        if name in ss.unrolled:
            return
        self._commit(self.state.put(_replace(ss, unrolled=ss.unrolled + (name,))),
                     "unroll")
        self._record("unroll", ss.stage, [name], loops=[0])

    def tensorize(self, loop, intrinsic: str = "matmul", stage=None):
        """Run the stage on the systolic array, contracting over this reduction loop."""
        ss = self._stage_of(loop, stage)
        name = self._loop(ss, loop, "tensorize")
        if intrinsic not in INTRINSICS:
            raise TensorlangError(f"tensorize: unknown intrinsic {intrinsic!r}; "
                                  f"known: {', '.join(INTRINSICS)}")
        st = self.prog.stage(ss.stage)
        if matmul_operands(st) is None:
            raise TensorlangError(
                f"tensorize {ss.stage}.{name}: stage {ss.stage!r} is not a contraction "
                "sum(a[..] * b[..]) of two tensor reads", st.loc)
        v = ss.var(name)
        spec = self._spec()
        if v.kind != "reduce":
            raise TensorlangError(f"tensorize {ss.stage}.{name}: the contraction loop must be a "
                                  "reduction loop")
        if v.extent > spec.pe_rows:
            raise TensorlangError(f"tensorize {ss.stage}.{name}: contraction extent {v.extent} > "
                                  f"{spec.pe_rows} rows of the systolic array; split it first")
        if name in ss.vectorized:
            raise TensorlangError(f"tensorize: {ss.stage}.{name} is vectorized")
        free = 1
        for x in ss.vectorized:
            free *= ss.var(x).extent
            if ss.var(x).kind == "reduce":
                raise TensorlangError(f"tensorize {ss.stage}: vectorized loop {x!r} is a "
                                      "reduction; a matmul reduces only over the partitions")
        if free > spec.matmul_max_n:
            raise TensorlangError(f"tensorize {ss.stage}: moving free size {free} > "
                                  f"{spec.matmul_max_n} (matmul N limit)")
        self._check_tile_loop(ss, name, "tensorize")
        self._commit(self.state.put(_replace(ss, tensorized=name)), "tensorize")
        self._record("tensorize", ss.stage, [name, intrinsic], loops=[0])

    def pipeline(self, loop, depth: int = 2, stage=None):
        """Multi-buffer the tiles allocated inside this loop: `depth` slots rotate per iteration."""
        ss = self._stage_of(loop, stage)
        name = self._loop(ss, loop, "pipeline")
        if name in ss.tile_vars():
            raise TensorlangError(f"pipeline: {ss.stage}.{name} is a tile loop, not a loop")
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 8:
            raise TensorlangError(f"pipeline {ss.stage}.{name}: depth {depth!r} must be an "
                                  "integer 1..8 (the number of buffer slots that rotate)")
        pl = tuple(p for p in ss.pipelined if p[0] != name) + ((name, depth),)
        self._commit(self.state.put(_replace(ss, pipelined=pl)), "pipeline")
        self._record("pipeline", ss.stage, [name, depth], loops=[0])

    # -- producer / consumer -----------------------------------------------------------------------
    def compute_at(self, stage, loop, consumer=None):
        """Compute `stage` inside loop `loop` of its consumer: its result stays on chip."""
        ps = self._stage(stage)
        cs = self._stage_of(loop, consumer)
        name = self._loop(cs, loop, "compute_at")
        pst, cst = self.prog.stage(ps.stage), self.prog.stage(cs.stage)
        names = [s.name for s in self.prog.stages]
        if ps.stage == cs.stage:
            raise TensorlangError(f"compute_at: stage {ps.stage!r} cannot be computed inside itself")
        if names.index(ps.stage) > names.index(cs.stage):
            raise TensorlangError(f"compute_at: {ps.stage!r} comes after {cs.stage!r} in the "
                                  "program; a producer must come first")
        if not self._reads_transitively(cs.stage, pst.tensor):
            readers = [c.name for c in self.prog.consumers(pst.tensor)]
            raise TensorlangError(f"compute_at {ps.stage!r} at {cs.stage}.{name}: stage "
                                  f"{cs.stage!r} does not read {pst.tensor!r}; a stage is computed "
                                  f"at one of its consumers ({', '.join(readers) or 'none'})")
        if name in cs.tile_vars():
            raise TensorlangError(f"compute_at: {cs.stage}.{name} is a tile loop; choose a loop "
                                  f"outside the tile ({', '.join(cs.loops())})")
        if ps.inline:
            raise TensorlangError(f"compute_at: {ps.stage!r} is inlined")
        if self.prog.tensors[pst.tensor].kind == "output":
            raise TensorlangError(f"compute_at {ps.stage!r}: {pst.tensor!r} is a kernel output; "
                                  "outputs are computed by their own loop nest")
        for st in self.prog.stages:
            if any(ld.tensor == pst.tensor and ld.pad is not None for ld in st.reads()):
                raise TensorlangError(f"compute_at {ps.stage!r}: stage {st.name!r} reads "
                                      f"{pst.tensor!r} with padding; a padded read needs the "
                                      "tensor in HBM")
        for r in ps.relations:
            v = r.parent if isinstance(r, Split) else r.outer
            if ps.var(v).kind == "spatial":
                raise TensorlangError(
                    f"compute_at {ps.stage!r}: it has its own spatial loop transformations "
                    f"({v!r}); a stage computed at a consumer takes its spatial layout from it")
        if ps.partition or any(ps.var(v).kind == "spatial" for v in ps.vectorized):
            raise TensorlangError(f"compute_at {ps.stage!r}: it has its own partition/vectorized "
                                  "spatial loops; a stage computed at a consumer takes its "
                                  "spatial layout from it")
        _check_simple_store(pst, "compute_at")
        self._commit(self.state.put(_replace(ps, attach=(cs.stage, name))),
                     "compute_at")
        self._record("compute_at", None, [ps.stage, name], kwargs={"consumer": cs.stage})

    def _reads_transitively(self, stage: str, tensor: str) -> bool:
        st = self.prog.stage(stage)
        if any(ld.tensor == tensor for ld in st.reads()):
            return True
        # a consumer attached at `stage` reads it on its behalf
        return any(ss.attach and ss.attach[0] == stage and self._reads_transitively(ss.stage, tensor)
                   for ss in self.state.stages)

    def compute_inline(self, stage):
        """Substitute an elementwise stage into its consumers (no intermediate tensor)."""
        ss = self._stage(stage)
        st = self.prog.stage(ss.stage)
        if st.reduce is not None:
            raise TensorlangError(f"compute_inline: stage {ss.stage!r} is a reduction", st.loc)
        if self.prog.tensors[st.tensor].kind == "output":
            raise TensorlangError(f"compute_inline: {st.tensor!r} is an output of the kernel; "
                                  "outputs are stored")
        if not self.prog.consumers(st.tensor):
            raise TensorlangError(f"compute_inline: nothing reads {st.tensor!r}")
        _check_simple_store(st, "compute_inline")
        if ss.attach:
            raise TensorlangError(f"compute_inline: {ss.stage!r} is already computed at "
                                  f"{ss.attach[0]}.{ss.attach[1]}")
        for c in self.prog.consumers(st.tensor):
            if any(ld.tensor == st.tensor and ld.pad is not None for ld in c.reads()):
                raise TensorlangError(f"compute_inline {ss.stage!r}: stage {c.name!r} reads "
                                      f"{st.tensor!r} with padding; a padded read needs the "
                                      "tensor in HBM", st.loc)
        self._commit(self.state.put(_replace(ss, inline=True)), "compute_inline")
        self._record("compute_inline", None, [ss.stage])

    def cache_read(self, tensor: str, mem: str, at, consumer=None):
        """Load the part of `tensor` the consumer's loops inside `at` read, once per `at` iteration."""
        cs = self._stage_of(at, consumer)
        name = self._loop(cs, at, "cache_read")
        if mem != "sbuf":
            raise TensorlangError(f"cache_read of {tensor!r}: memory {mem!r} must be 'sbuf' "
                                  "(PSUM holds matmul results)")
        if tensor not in self.prog.tensors:
            raise TensorlangError(f"cache_read: no tensor {tensor!r}")
        # the consumer, or a stage computed at it (its tiles then read the cached copy)
        readers = [cs.stage] + [ss.stage for ss in self.state.stages
                                if ss.attach and ss.attach[0] == cs.stage]
        if not any(ld.tensor == tensor for r in readers for ld in self.prog.stage(r).reads()):
            raise TensorlangError(f"cache_read: stage {cs.stage!r} does not read {tensor!r} "
                                  "(nor does a stage computed at it)")
        if name in cs.tile_vars():
            raise TensorlangError(f"cache_read of {tensor!r}: {cs.stage}.{name} is a tile loop")
        crs = tuple(c for c in self.state.cache_reads if not (c.tensor == tensor and c.stage == cs.stage))
        self._commit(_replace(self.state,
                                         cache_reads=crs + (CacheRead(tensor, mem, cs.stage, name),)),
                     "cache_read")
        self._record("cache_read", None, [tensor, mem, name], kwargs={"consumer": cs.stage})

    def cache_write(self, stage, mem: str = "sbuf", at=None):
        """Where the stage's accumulator / result tile lives: 'psum' (tensorized) or 'sbuf',
        covering the loops inside `at` (default: just outside the outermost reduction loop)."""
        ss = self._stage(stage)
        if mem not in MEMS:
            raise TensorlangError(f"cache_write of {ss.stage!r}: memory {mem!r} must be one of {MEMS}")
        at_name = None
        if at is not None:
            at_name = self._loop(ss, at, "cache_write")
        self._commit(self.state.put(_replace(ss, cache_write=(mem, at_name))),
                     "cache_write")
        self._record("cache_write", None, [ss.stage, mem], kwargs={"at": at_name})

    # -- build ----------------------------------------------------------------------------------------
    def build(self, machine=None):
        from .lower import build  # noqa: PLC0415
        return build(self, machine if machine is not None else self.machine)


STEP_OPS = ("split", "tile", "reorder", "fuse", "partition", "vectorize", "unroll", "tensorize",
            "pipeline", "compute_at", "compute_inline", "cache_read", "cache_write")


def _check_simple_store(st: Stage, what: str):
    """compute_at / compute_inline need the store index to be a permutation of the axes."""
    names = [a.name for a in st.axes]
    got = []
    for ix in st.index:
        if len(ix.terms) != 1 or ix.terms[0][1] != 1 or ix.const != 0:
            raise TensorlangError(f"{what}: stage {st.name!r} stores to {st.tensor}[{ix}]; "
                                  "only plain loop variables are supported as store indices here",
                                  st.loc)
        got.append(ix.terms[0][0])
    if sorted(got) != sorted(names):
        raise TensorlangError(f"{what}: stage {st.name!r} does not store every point of its loops "
                              f"once ({st.tensor}[{', '.join(got)}] over {', '.join(names)})", st.loc)


def program_schedule(self: Program, machine="trn2") -> Schedule:
    return Schedule(self, machine)


Program.schedule = program_schedule
