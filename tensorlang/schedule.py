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
        for v in self.vars:
            if v.name == name:
                return v
        raise KeyError(name)

    def tile_vars(self) -> tuple[str, ...]:
        t = tuple(self.vectorized)
        if self.partition:
            t = (self.partition,) + t
        if self.tensorized:
            t = t + (self.tensorized,)
        return t

    def loops(self) -> tuple[str, ...]:
        tile = set(self.tile_vars())
        return tuple(v for v in self.order if v not in tile)

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
        return dataclasses.replace(
            self, stages=tuple(ss if s.stage == ss.stage else s for s in self.stages))


def initial_state(prog: Program) -> State:
    out = []
    for st in prog.stages:
        vs = tuple(Var(a.name, a.extent, "spatial") for a in st.axes) + \
            tuple(Var(a.name, a.extent, "reduce") for a in st.reduce_axes)
        out.append(StageSched(st.name, vs, tuple(v.name for v in vs)))
    return State(tuple(out))


def matmul_operands(st: Stage) -> tuple[Load, Load] | None:
    """(a, b) when the stage is sum_k cast?(a) * cast?(b), the pattern tensorize('matmul') takes."""
    if st.reduce != "add":
        return None
    v = st.value
    if not (isinstance(v, Binary) and v.op == "mul"):
        return None
    ops = []
    for x in (v.a, v.b):
        while isinstance(x, Cast):
            x = x.a
        if not isinstance(x, Load) or x.pad is not None:
            return None
        ops.append(x)
    return ops[0], ops[1]


class Schedule:
    """The schedule of a Program: a mutable handle over immutable states, plus its trace."""

    def __init__(self, prog: Program, machine="trn2"):
        self.prog = prog
        self.machine = machine
        self.state = initial_state(prog)
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
        s = Schedule(self.prog, self.machine)
        s.state, s._trace = self.state, list(self._trace)
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
        if name not in ss.order:
            raise TensorlangError(f"{what}: stage {ss.stage!r} has no loop {name!r}; "
                                  f"its loops are {', '.join(ss.order)}")
        return name

    def _fresh(self, ss: StageSched, base: str) -> str:
        taken = {v.name for v in ss.vars}
        name, n = base, 1
        while name in taken:
            name, n = f"{base}{n}", n + 1
        return name

    def _spec(self):
        import sim  # noqa: PLC0415  (only for the limits used by up-front checks)
        return sim.machine(self.machine)

    def _stage_of(self, loop, stage) -> StageSched:
        if stage is None:
            if not isinstance(loop, LoopVar):
                raise TensorlangError(f"loop {loop!r} is a plain string; pass the stage too "
                                      "or use the handles from s.axes()/s.split()")
            stage = loop.stage
        return self._stage(stage)

    def _check_tail_order(self, ss: StageSched, order: tuple[str, ...], what: str):
        pos = {v: i for i, v in enumerate(order)}
        for r in ss.relations:
            if isinstance(r, Split) and r.tail and r.outer in pos and r.inner in pos \
                    and pos[r.inner] < pos[r.outer]:
                raise TensorlangError(
                    f"{what}: stage {ss.stage!r} would run {r.inner!r} outside {r.outer!r}, but "
                    f"the split of {r.parent!r} by {r.factor} leaves a tail of {r.tail}; keep "
                    f"{r.outer!r} outside {r.inner!r} or split by a divisor")

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
                                  f"{v.extent}")
        if any(isinstance(r, Fuse) and r.fused == name for r in ss.relations):
            raise TensorlangError(f"split of {ss.stage}.{name}: a fused loop cannot be split; "
                                  "split before fusing")
        if name in ss.tile_vars() or name in dict(ss.pipelined) or name in ss.unrolled:
            raise TensorlangError(f"split of {ss.stage}.{name}: the loop is already annotated "
                                  "(partition/vectorize/tensorize/pipeline/unroll); split first")
        outer, inner = self._fresh(ss, name + "o"), self._fresh(ss, name + "i")
        ss2 = dataclasses.replace(
            ss,
            vars=ss.vars + (Var(outer, -(-v.extent // factor), v.kind), Var(inner, factor, v.kind)),
            order=tuple(x for o in ss.order for x in ((outer, inner) if o == name else (o,))),
            relations=ss.relations + (Split(name, outer, inner, factor, v.extent % factor),),
        )
        self.state = self.state.put(ss2)
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
        order = tuple(order)
        self._check_tail_order(ss, order, "reorder")
        self.state = self.state.put(dataclasses.replace(ss, order=order))
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
        for r in ss.relations:
            if isinstance(r, Split) and r.tail and nb == r.inner:
                raise TensorlangError(f"fuse of {ss.stage}.{na} and {nb}: {nb!r} comes from a "
                                      f"split with a tail of {r.tail}")
        for x in (na, nb):
            if x in ss.tile_vars() or x in dict(ss.pipelined) or x in ss.unrolled:
                raise TensorlangError(f"fuse of {ss.stage}.{x}: annotate after fusing")
        fused = self._fresh(ss, f"{na}_{nb}")
        order = ss.order[:ia] + (fused,) + ss.order[ib + 1:]
        ss2 = dataclasses.replace(ss, vars=ss.vars + (Var(fused, va.extent * vb.extent, va.kind),),
                                  order=order, relations=ss.relations + (Fuse(na, nb, fused),))
        self.state = self.state.put(ss2)
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
        self.state = self.state.put(dataclasses.replace(ss, partition=name))
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
        for r in ss.relations:
            if isinstance(r, Split) and r.tail and r.outer == name:
                raise TensorlangError(f"vectorize {ss.stage}.{name}: it is the outer loop of a "
                                      f"split with a tail of {r.tail}")
        self.state = self.state.put(dataclasses.replace(ss, vectorized=ss.vectorized + (name,)))
        self._record("vectorize", ss.stage, [name], loops=[0])

    def unroll(self, loop, stage=None):
        ss = self._stage_of(loop, stage)
        name = self._loop(ss, loop, "unroll")
        if name in ss.tile_vars():
            raise TensorlangError(f"unroll: {ss.stage}.{name} is a tile loop (partition/vectorize)")
        if ss.var(name).extent > 64:
            raise TensorlangError(f"unroll {ss.stage}.{name}: extent {ss.var(name).extent} > 64")
        self.state = self.state.put(dataclasses.replace(ss, unrolled=ss.unrolled + (name,)))
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
        self.state = self.state.put(dataclasses.replace(ss, tensorized=name))
        self._record("tensorize", ss.stage, [name, intrinsic], loops=[0])

    def pipeline(self, loop, depth: int = 2, stage=None):
        """Multi-buffer the tiles allocated inside this loop: `depth` slots rotate per iteration."""
        ss = self._stage_of(loop, stage)
        name = self._loop(ss, loop, "pipeline")
        if name in ss.tile_vars():
            raise TensorlangError(f"pipeline: {ss.stage}.{name} is a tile loop, not a loop")
        if not isinstance(depth, int) or not 1 <= depth <= 8:
            raise TensorlangError(f"pipeline {ss.stage}.{name}: depth {depth!r} must be 1..8")
        pl = tuple(p for p in ss.pipelined if p[0] != name) + ((name, depth),)
        self.state = self.state.put(dataclasses.replace(ss, pipelined=pl))
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
            raise TensorlangError(f"compute_at: stage {cs.stage!r} does not read {pst.tensor!r}")
        if name in cs.tile_vars():
            raise TensorlangError(f"compute_at: {cs.stage}.{name} is a tile loop; choose a loop "
                                  f"outside the tile ({', '.join(cs.loops())})")
        if ps.inline:
            raise TensorlangError(f"compute_at: {ps.stage!r} is inlined")
        _check_simple_store(pst, "compute_at")
        self.state = self.state.put(dataclasses.replace(ps, attach=(cs.stage, name)))
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
        self.state = self.state.put(dataclasses.replace(ss, inline=True))
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
        if not any(ld.tensor == tensor for ld in self.prog.stage(cs.stage).reads()):
            raise TensorlangError(f"cache_read: stage {cs.stage!r} does not read {tensor!r}")
        if name in cs.tile_vars():
            raise TensorlangError(f"cache_read of {tensor!r}: {cs.stage}.{name} is a tile loop")
        crs = tuple(c for c in self.state.cache_reads if not (c.tensor == tensor and c.stage == cs.stage))
        self.state = dataclasses.replace(self.state,
                                         cache_reads=crs + (CacheRead(tensor, mem, cs.stage, name),))
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
        self.state = self.state.put(dataclasses.replace(ss, cache_write=(mem, at_name)))
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
