"""Lowering: a scheduled Program -> a loop-structured `sim.isa` Program.

How a stage becomes instructions
--------------------------------
After `complete()` every stage has a *tile*: one partition loop (<= 128 iterations, one per
partition), vectorized loops (the free dimensions) and, when tensorized, a contraction loop
on the systolic array's rows. The remaining loops, in schedule order, become ISA loops
whose variables address HBM and on-chip buffers affinely. A *job* is one such loop nest:

    loops ...                        ISA loops (splits with a tail: a main loop + a peeled tail)
      [acc level]                    the accumulator / result tile lives here (cache_write)
        loops ...
          tile:  operands -> engine instructions -> accumulate into the acc tile
      store nest                     acc tile (+ init) -> dtype cast -> DMA to HBM / SBUF slot

Operands come from, in this order: a tile already on chip with the same contents (loads
are memoised per loop level, so fused stages share one load), a buffer filled by
`cache_read` at an outer loop, a producer computed at this loop (`compute_at`: the
producer's definition is evaluated in the consumer's tile layout into an SBUF buffer, so
the intermediate never goes to HBM), or a DMA from HBM (split over the DMA queues; loads
whose partition walks contiguous memory go through a tensor-engine transpose instead).
Buffers are stack-allocated per loop level; a buffer allocated inside a pipelined loop
gets `depth` slots that rotate with the loop variable (multi-buffering).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

import sim
from sim import isa
from sim.timing import contiguous_runs, instr_cost, partition_block

from .dtypes import np_dtype
from .ir import (ITEMSIZE, REDUCE_IDENTITY, Affine, Binary, Cast, Compare, Const, Expr,
                 IndexValue, Load, Program, Select, Stage, TensorlangError, Unary, expr_vars,
                 map_expr)
from .queues import _slice_ap, assign_queues
from .schedule import Fuse, Schedule, Split, StageSched, matmul_operands

DEFAULT_FREE_ELEMS = 2048  # compiler choice: default vectorization width when a schedule is silent
TRANSPOSE_PSUM_SLOTS = 4  # compiler choice: PSUM banks a staged transposing fill rotates over
STORE_SLOTS = 2  # compiler choice: slots of a store nest loop's staging tiles (double-buffered)
MAX_SLOT_KEYS = 4096  # compiler choice: a one-transfer fill registers at most this many slot keys
BIAS_ROW_FRACTION = 0.25   # compiler choice: most of an SBUF partition a whole bias row takes
PEEL_FIRST = 2   # compiler choice: first iterations of a pipelined loop peeled (tile + prefetch)
SPLIT_MIN_ELEMS = 1024  # compiler choice: an elementwise instruction this wide may be split over engines
SPLIT_MIN_GAIN = 0.05   # ... when that lowers the busiest engine's estimated load by this fraction
SPLIT_BUSY = 0.8        # ... and one engine would be busier than this fraction of the HBM time
COMPUTE_ENGINES = ("act", "dve", "pool")
DIAG_DIRECT_ELEMS = 2048  # compiler choice: a tap-accumulation tile this big stores its tensor-
DIAG_DIRECT_KEEP = 0.85   # ... engine rows from PSUM when whole banks keep this share of them
INTERLEAVE_MAX = 4      # compiler choice: query tiles of a transposed fill whose chains interleave
SINGLE = "__single__"    # Env.pipe key: see _rotation
ROW_PSUM_BANKS = 4      # compiler choice: a kept contraction row over more banks goes to SBUF
HOIST_IOTA_FRACTION = 1 / 16  # compiler choice: loop-invariant index tiles kept for a whole job

# ----------------------------------------------------------------------------------------
# affine values over ISA loop variables


@dataclass(frozen=True, init=False)
class Lin:
    const: int = 0
    terms: tuple[tuple[str, int, int], ...] = ()  # (isa var, coef, mod), sorted by (var, mod)

    def __init__(self, const: int = 0, terms: tuple[tuple[str, int, int], ...] = ()):
        d = self.__dict__       # frozen, but built on the lowering hot path: no __setattr__
        d["const"] = const
        d["terms"] = terms

    def __add__(self, o: "Lin | int") -> "Lin":
        if isinstance(o, int):
            return Lin(self.const + o, self.terms)
        a, b = self.terms, o.terms
        if not b:                             # terms are kept canonical: nothing to merge
            return Lin(self.const + o.const, a)
        if not a:
            return Lin(self.const + o.const, b)
        if (a[-1][0], a[-1][2]) < (b[0][0], b[0][2]):
            return Lin(self.const + o.const, a + b)
        out, i, j = [], 0, 0                  # merge the two sorted tuples
        while i < len(a) and j < len(b):
            ka, kb = (a[i][0], a[i][2]), (b[j][0], b[j][2])
            if ka == kb:
                c = a[i][1] + b[j][1]
                if c:
                    out.append((ka[0], c, ka[1]))
                i += 1
                j += 1
            elif ka < kb:
                out.append(a[i])
                i += 1
            else:
                out.append(b[j])
                j += 1
        return Lin(self.const + o.const, tuple(out) + a[i:] + b[j:])

    def scale(self, k: int) -> "Lin":
        if k == 0:
            return Lin()
        return Lin(self.const * k, tuple((v, c * k, m) for v, c, m in self.terms))

    def addr(self) -> isa.Addr:
        return isa.Addr(self.const, self.terms)

    @staticmethod
    def var(v: str) -> "Lin":
        return Lin(0, ((v, 1, 0),))


# ----------------------------------------------------------------------------------------
# jobs: one loop nest computing one stage (or a producer inside its consumer)


@dataclass
class Job:
    stage: str
    value: Expr                    # indices over atom names
    reduce: str | None
    init: Expr | None
    loops: list[str]               # loop atoms, outermost first
    kind: dict[str, str]           # atom -> spatial | reduce
    split_of: dict[str, Split]     # split var (outer or inner) -> its split
    root_ext: dict[str, int]       # root vars -> extent
    part: str                      # partition atom
    free: list[str]                # spatial free atoms
    red_free: list[str]            # vectorized reduction atoms
    contract: str | None           # tensorized contraction atom
    acc_level: int
    acc_mem: str
    dest: "HbmDest | SlotDest"
    out_dtype: str
    pipe: dict[str, int] = field(default_factory=dict)
    unroll: set = field(default_factory=set)
    hooks: dict[str, list] = field(default_factory=dict)  # loop atom -> [("cache"|"attach", ...)]
    ops: tuple | None = None       # tensorized: (stationary load, moving load)
    mm_dtype: str = "bfloat16"     # tensorized: matmul input dtype
    direct: bool = False           # the acc tile is the destination (no store nest)
    epilogue: tuple | None = None  # (consumer job, its read of this stage): _matmul_fill
    emitted: set = field(default_factory=set)  # loops whose inner nest a hook emitted


@dataclass(frozen=True)
class HbmDest:
    tensor: str
    index: tuple[Affine, ...]


@dataclass(frozen=True)
class SlotDest:
    base: Lin
    dtype: str
    strides: tuple[int, ...]       # element strides of the free atoms
    mem: str = "sbuf"
    name: str = "slot"


@dataclass
class Val:
    """A tile of values on chip: partition p plus `deps` free atoms (row-major)."""
    mem: str
    base: Lin                      # byte offset within the partition
    deps: tuple[str, ...]
    strides: tuple[int, ...]       # element stride of each dep
    dtype: str
    name: str
    part: int = 0
    key: object = None             # value-numbering key (equal keys hold equal data), or None

    def with_deps(self, deps: tuple, key=None) -> "Val":
        """This tile read over `deps` (dataclasses.replace without its per-field work)."""
        return Val(self.mem, self.base, deps, self.strides, self.dtype, self.name, self.part, key)

    def with_key(self, key) -> "Val":
        return Val(self.mem, self.base, self.deps, self.strides, self.dtype, self.name,
                   self.part, key)


@dataclass
class Env:
    lin: dict                      # atom -> Lin
    ext: dict                      # atom / split var -> extent in this region
    loops: tuple = ()              # enclosing ISA loop vars
    pipe: dict = field(default_factory=dict)

    def bind(self, atom: str, value: Lin, **ext) -> "Env":
        """A copy with `atom` bound; shares `pipe` (copy it before changing it)."""
        lin = self.lin.copy()
        lin[atom] = value
        if ext:
            ext = {**self.ext, **ext}
        else:
            ext = self.ext.copy()
        return Env(lin, ext, self.loops, self.pipe)


# ----------------------------------------------------------------------------------------
# schedule completion


def complete(sched: Schedule, spec: sim.MachineSpec) -> Schedule:
    """Fill in what the schedule left open, deterministically, with legal defaults:
    a partition loop (the outermost spatial loop, split to the partition count) and
    vectorized loops (the innermost spatial loop and, for reductions, the innermost
    reduction loop, split to DEFAULT_FREE_ELEMS). Stages computed at a consumer take their
    spatial layout from it, so only their reduction loops are completed."""
    s = sched.copy()
    s.machine = spec
    for ss in s.state.stages:          # roots first: attached stages look at their consumer
        if not ss.inline and not ss.attach:
            _complete_root(s, ss.stage, spec)
    for ss in s.state.stages:
        if not ss.inline and ss.attach:
            _complete_attached(s, ss.stage, spec)
    return s


def _free_size(ss: StageSched) -> int:
    n = 1
    for v in ss.vectorized:
        n *= ss.var(v).extent
    return n


def _try(s: Schedule, steps) -> bool:
    """Apply completion steps all or nothing; False when the schedule refuses one."""
    state, trace = s.state, list(s._trace)
    try:
        steps()
        return True
    except TensorlangError:
        s.state, s._trace = state, trace
        return False


def _complete_root(s: Schedule, stage: str, spec):
    ss = s.state.get(stage)
    tile = set(ss.tile_vars())
    spatial = [v for v in ss.order if ss.var(v).kind == "spatial" and v not in tile]
    if ss.partition is None:
        # the outermost spatial loop the schedule lets us use (split to the partitions)
        cands = [v for v in spatial if ss.var(v).extent > 1] + \
            [v for v in spatial if ss.var(v).extent == 1]

        def part(v):
            if ss.var(v).extent > spec.partitions:
                _, v = s.split(v, spec.partitions, stage=stage)
            s.partition(v, stage=stage)
        if not any(_try(s, lambda v=v: part(v)) for v in cands):
            names = ", ".join(spatial) or "none"
            raise TensorlangError(f"stage {stage!r}: no spatial loop can map to the partitions "
                                  f"(spatial loops: {names}); partition one explicitly")
    ss = s.state.get(stage)
    limit = spec.matmul_max_n if ss.tensorized else DEFAULT_FREE_ELEMS
    if not any(ss.var(v).kind == "spatial" for v in ss.vectorized):
        rest = [v for v in ss.order if ss.var(v).kind == "spatial" and v not in ss.tile_vars()]

        def vec(v):
            if ss.var(v).extent * _free_size(ss) > limit:
                f = max(1, limit // _free_size(ss))
                if f < ss.var(v).extent:
                    _, v = s.split(v, f, stage=stage)
            s.vectorize(v, stage=stage)
        any(_try(s, lambda v=v: vec(v)) for v in reversed(rest))  # none fits: a 1-wide tile
    ss = s.state.get(stage)
    if not ss.tensorized and not any(ss.var(v).kind == "reduce" for v in ss.vectorized):
        _vectorize_reduce(s, stage)
    _check_tile(s.state.get(stage), spec, s.prog)


def _vectorize_reduce(s: Schedule, stage: str, width: int = DEFAULT_FREE_ELEMS):
    ss = s.state.get(stage)
    red = [v for v in ss.order if ss.var(v).kind == "reduce" and v not in ss.tile_vars()]
    if not red:
        return
    room = max(1, width // _free_size(ss))
    if room == 1:
        return

    def vec(v):
        if ss.var(v).extent > room:
            _, v = s.split(v, room, stage=stage)
        s.vectorize(v, stage=stage)
    any(_try(s, lambda v=v: vec(v)) for v in reversed(red))


def _complete_attached(s: Schedule, stage: str, spec):
    ss = s.state.get(stage)
    for r in ss.relations:
        v = r.parent if isinstance(r, Split) else r.outer
        if ss.var(v).kind == "spatial":
            raise TensorlangError(
                f"stage {stage!r} is computed at {ss.attach[0]}.{ss.attach[1]} and also has its own "
                f"spatial loop transformations ({v!r}); it takes its spatial tiling from the consumer")
    if ss.partition or any(ss.var(v).kind == "spatial" for v in ss.vectorized):
        raise TensorlangError(f"stage {stage!r} is computed at {ss.attach[0]}.{ss.attach[1]}; "
                              "its partition/vectorized spatial loops come from the consumer")
    if not ss.tensorized and not any(ss.var(v).kind == "reduce" for v in ss.vectorized):
        # as wide as the consumer's tile: a row statistic then reads the consumer's tiles
        _vectorize_reduce(s, stage, max(DEFAULT_FREE_ELEMS, _free_size(s.state.get(ss.attach[0]))))


def _check_tile(ss: StageSched, spec, prog: Program):
    st = prog.stage(ss.stage)
    for r in ss.relations:
        if isinstance(r, Split) and r.tail and r.outer in ss.tile_vars():
            raise TensorlangError(f"stage {ss.stage!r}: tile loop {r.outer!r} is the outer loop of "
                                  f"a split with a tail of {r.tail}")
        if isinstance(r, Fuse) and r.fused in (ss.partition, ss.tensorized):
            raise TensorlangError(f"stage {ss.stage!r}: a fused loop ({r.fused!r}) cannot be the "
                                  "partition or contraction loop")
    free = _free_size(ss)
    limit = spec.matmul_max_n if ss.tensorized else spec.max_free_elems_sbuf
    if free > limit:
        raise TensorlangError(f"stage {ss.stage!r}: tile free size {free} > {limit}")
    if ss.tensorized and st.reduce != "add":
        raise TensorlangError(f"stage {ss.stage!r}: tensorize needs a sum reduction")


# ----------------------------------------------------------------------------------------
# inlining and padding (program rewrites done before lowering)


def inline_stages(prog: Program, sched: Schedule) -> Program:
    inl = [ss.stage for ss in sched.state.stages if ss.inline]
    stages = list(prog.stages)
    for name in inl:
        p = next(st for st in stages if st.name == name)  # with earlier inlines substituted
        axis_of_dim = [ix.terms[0][0] for ix in p.index]

        def sub(e, p=p, axis_of_dim=axis_of_dim):
            if isinstance(e, Load) and e.tensor == p.tensor:
                if e.pad is not None:
                    raise TensorlangError(f"compute_inline {p.name!r}: a consumer reads "
                                          f"{p.tensor!r} with padding", e.loc)
                m = {axis_of_dim[d]: e.index[d] for d in range(len(e.index))}
                return _subst(p.value, m)
            return e

        stages = [dataclasses.replace(
            st, value=map_expr(st.value, sub),
            init=map_expr(st.init, sub) if st.init is not None else None)
            for st in stages if st.name != name]
    temps = tuple(t for t in prog.temps if not any(prog.stage(n).tensor == t.name for n in inl))
    return dataclasses.replace(prog, stages=tuple(stages), temps=temps)


def _subst(e: Expr, m: dict[str, Affine]) -> Expr:
    def fn(x):
        if isinstance(x, Load):
            return Load(x.tensor, tuple(ix.substitute(m) for ix in x.index), x.pad, x.loc)
        if isinstance(x, IndexValue):
            return IndexValue(x.index.substitute(m))
        return x
    return map_expr(e, fn)


def pad_tensors(prog: Program) -> tuple[Program, list]:
    """Reads with a pad value -> reads of a padded copy (filled before its first reader)."""
    need: dict = {}
    for st in prog.stages:
        ext = st.extents()
        for ld in st.reads():
            if ld.pad is None:
                continue
            shape = prog.tensors[ld.tensor].shape
            lo_hi = need.setdefault((ld.tensor, float(ld.pad)), [[0, 0] for _ in shape])
            for d, ix in enumerate(ld.index):
                lo, hi = ix.bounds(ext)
                lo_hi[d][0] = max(lo_hi[d][0], -lo)
                lo_hi[d][1] = max(lo_hi[d][1], hi - (shape[d] - 1))
    if not need:
        return prog, []
    names = {}
    pads = []
    for n, ((t, v), lh) in enumerate(need.items()):
        tt = prog.tensors[t]
        name = f"{t}_pad{n}" if len(need) > 1 else f"{t}_pad"
        shape = tuple(s + lo + hi for s, (lo, hi) in zip(tt.shape, lh))
        names[(t, v)] = (name, [lo for lo, _ in lh])
        pads.append((t, v, name, shape, [lo for lo, _ in lh]))

    def fn(x):
        if isinstance(x, Load) and x.pad is not None:
            name, lo = names[(x.tensor, float(x.pad))]
            return Load(name, tuple(ix + l for ix, l in zip(x.index, lo)), None, x.loc)
        return x

    stages = tuple(dataclasses.replace(st, value=map_expr(st.value, fn),
                                       init=map_expr(st.init, fn) if st.init is not None else None)
                   for st in prog.stages)
    from .ir import Tensor  # noqa: PLC0415
    temps = prog.temps + tuple(Tensor(name, shape, prog.tensors[t].dtype, "temp")
                               for t, v, name, shape, lo in pads)
    return dataclasses.replace(prog, stages=stages, temps=temps), pads


# ----------------------------------------------------------------------------------------
# the lowerer


class Lowerer:
    def __init__(self, prog: Program, sched: Schedule, spec: sim.MachineSpec, prior=None):
        self.prog, self.sched, self.spec = prog, sched, spec
        self.tensors = prog.tensors
        self.body: list[list] = [[]]
        self.buffers: list[isa.Buffer] = []
        self.live: list[tuple[str, int, int, str]] = []   # (mem, offset, size, name) in scope
        self.cursor = {"sbuf": 0, "psum": 0}              # next-fit placement (see place())
        self.memo: list[dict] = [{}]
        self.names: dict[str, int] = {}
        self.flats: dict = {}        # (tensor, id(index)) -> (index, flat index); see flat()
        self.scratch: set[str] = set()
        self.attached = {ss.stage: ss.attach for ss in sched.state.stages if ss.attach}
        self.stage_of_tensor = {st.tensor: st for st in prog.stages}
        self.busy = {e: 0 for e in COMPUTE_ENGINES}       # estimated busy ps per engine so far
        self.busy_peel = dict(self.busy)    # ... of peeled iterations (fill and drain)
        self.plans: dict = {}    # the loops' emit_balanced choices by instruction (mirror)
        self.trips = [1]                                  # iterations of the enclosing ISA loops
        self.peeled = 1          # iterations of the loop whose peeled iteration is being emitted
        self.peel_bid = None     # stands for the outermost loop body in a peeled iteration (anc)
        self.fill_end: dict = {}  # loop -> top-level index where its iteration's fills ended
        self.reserved = None      # (loop, [(mem, lo, hi)]): kept clear by its next fill
        self.in_last = True      # emitting the last iteration of every enclosing loop (peeled)
        self.home: int | None = None                      # memo level for kept intermediates
        self.home_funcs: set = set()                      # activation functions the consumer uses
        self.keep: int | None = None                      # memo level for attached producers' tiles
        self.writer: dict = {}                            # buffer -> engine of its last writer
        self.hoisting = False                             # placing a buffer before the job's loops
        self.bc_sbuf = False                              # broadcast() into SBUF, not PSUM
        self.job_buf0 = 0                                 # first buffer of the current root job
        self.job_top = 0         # where the current root job's broadcasts go in the top body
        self.anc: dict = {}      # buffer -> (outermost loop body, engines its value came through)
        self.decisions: list = []   # per emit_balanced call: {engine: load it added}
        self.ncall = 0
        self.prior = None           # second pass: the first pass's (decisions, loads)
        self.resident: set = set()       # PSUM buffers holding broadcast vectors
        self.prologue: set = set()       # scratch buffers used only before the job's loops
        self.outside: set = set()        # scratch buffers of loads hoisted by cached_load
        self.block = None                # (block loop, block width, row length) in blocked_map
        self.into = None                 # (Val, eval depth): where that eval's top result goes
        self.eval_depth = 0
        self.streams = 0                 # chains a transposed fill is generating (0: none)
        self.psum_peak = 0                # PSUM the rest of the program needs at once
        self.pads: dict = {}              # padded copy -> (source, value, shape, lo)
        self.diag_acc: dict = {}          # acc tile -> tensor-engine part (see diag_rows)
        self.diag_out: dict = {}          # acc tile -> copies of that part out of PSUM
        self.clipped: dict = {}           # box buffer -> (dim, padded range it holds)
        self.hbm_reads: set = set()       # HBM tensors some DMA has read
        self.unfilled: set = set()        # padded copies nothing reads from HBM (not filled)
        self.psum_room = spec.psum_partition_bytes // 2   # for resident broadcasts
        if prior is not None:
            self.prior, self.proj, self.proj_peel = prior[0], dict(prior[1]), dict(prior[3])
            # the first pass knows what the rest of the program needs: the rest is free
            self.psum_room = spec.psum_partition_bytes - prior[2] - spec.psum_bank_bytes
        hbm = sum(math.prod(t.shape) * ITEMSIZE[t.dtype] for t in (*prog.inputs, *prog.outputs))
        self.hbm_ps = hbm * 1000.0 / spec.dma_gbps         # the memory floor of the kernel

    # -- plumbing ---------------------------------------------------------------------------
    def emit(self, ins: isa.Instr, ii_ps: int | None = None):
        """Append `ins` (or a Loop) to the current body; a compute instruction adds its issue
        interval (`ii_ps` when the caller has it) x loop trips to its engine's load."""
        if ins.__class__ is isa.Instr and ins.engine in self.busy:
            if ii_ps is None:
                ii_ps = instr_cost(ins, self.spec).ii_ps
            busy = self.busy if self.peel_bid is None else self.busy_peel
            busy[ins.engine] += ii_ps * self.trips[-1]
            bid = id(self.body[1]) if len(self.body) > 1 else self.peel_bid
            anc = {ins.engine}
            for a in ins.srcs:
                b, e = self.anc.get(a.name, (None, ()))
                if b == bid:
                    anc.update(e)
            for a in (ins.dst, ins.dst2):
                if a is not None:
                    self.writer[a.name] = ins.engine
                    self.anc[a.name] = (bid, frozenset(anc))
        self.body[-1].append(ins)

    def close(self):
        """Drop the lowering state once the program is assembled: recursive local functions
        of the lowering (reference cycles, freed only by the garbage collector) may still
        refer to this Lowerer, and would keep every tile, memo and instruction alive until
        the next collection (which then has all of them to traverse)."""
        self.__dict__.clear()

    def fresh(self, base: str) -> str:
        n = self.names.get(base, 0)
        self.names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    class _Level:
        def __init__(self, lw):
            self.lw = lw

        def __enter__(self):
            self.lw.memo.append({})

        def __exit__(self, *exc):
            lw = self.lw
            depth = len(lw.memo) - 1
            lw.live[:] = [x for x in lw.live if x[4] < depth]
            lw.memo.pop()

    def level(self):
        return Lowerer._Level(self)

    def used(self, mem: str) -> int:
        return sum(x[2] for x in self.live if x[0] == mem)

    def place(self, mem: str, size: int, align: int) -> int | None:
        """An offset for `size` bytes per partition clear of every buffer in scope: next fit
        from where the last allocation ended, wrapping around. Buffers live per loop scope;
        next fit reuses a freed range as late as possible, so a buffer of the next scope does
        not alias (and so wait for) the one just released."""
        cap = self.spec.psum_partition_bytes if mem == "psum" else self.spec.sbuf_partition_bytes
        taken = [(x[1], x[1] + x[2]) for x in self.live if x[0] == mem]
        if self.hoisting:   # read by every iteration: clear of everything this job used too
            taken += [(b.offset, b.offset + b.size) for b in self.buffers[self.job_buf0:]
                      if b.mem == mem and b.name not in self.prologue]
        keep = [(lo, hi) for m, lo, hi in (self.reserved or (0, ()))[1] if m == mem]
        # (keep: the ranges a peeled iteration's consumer uses, kept clear by the next
        # iteration's fill when the fill fits beside them; see fill_ahead)
        for extra in ([keep] if keep else []) + [[]]:
            gaps, prev = [], 0
            for lo, hi in sorted(taken + extra):
                if lo > prev:
                    gaps.append((prev, lo))
                prev = max(prev, hi)
            gaps.append((prev, cap))
            cur = self.cursor[mem]
            for lo, hi in gaps + gaps:
                start = -(-max(lo, cur) // align) * align
                if start + size <= hi:
                    self.cursor[mem] = start + size
                    return start
                cur = 0 if hi >= gaps[-1][1] else cur
        return None

    def alloc(self, mem: str, nbytes: int, name: str, env: Env, what: str = "",
              depth: int | None = None) -> Lin:
        """Allocate `nbytes` per partition for the current scope (or the enclosing memo level
        `depth`; see place()); multi-slot inside a pipelined loop. `what` names the schedule
        step that asked for the buffer in an overflow message."""
        level = len(self.memo) - 1 if depth is None else depth
        spec = self.spec
        rot = _rotation(env)
        if mem == "psum":
            unit = spec.psum_bank_bytes
            if nbytes > unit:
                raise TensorlangError(f"PSUM tile {name!r} needs {nbytes} bytes per partition > "
                                      f"one {unit}-byte bank")
            slot = unit
        else:
            unit = spec.dep_granule_bytes
            slot = -(-max(nbytes, 1) // unit) * unit
        depth = rot[1] if rot else 1
        size = slot * depth
        cap = spec.psum_partition_bytes if mem == "psum" else spec.sbuf_partition_bytes
        top = self.place(mem, size, unit)
        if top is None:
            live = ", ".join(f"{x[3]} {x[2] / 1024:.1f} KiB" for x in self.live if x[0] == mem)
            total = spec.psum_bytes if mem == "psum" else spec.sbuf_bytes
            raise TensorlangError(
                f"{what + ': ' if what else ''}{mem.upper()} overflow on {spec.name}: tile {name!r} "
                f"needs {size / 1024:.1f} KiB per partition ({depth} slot(s); "
                f"{size * spec.partitions / 2**20:.1f} MiB over {spec.partitions} partitions) with "
                f"{self.used(mem) / 1024:.1f} KiB in use{f' [{live}]' if live else ''}; {spec.name} has "
                f"{cap / 1024:.0f} KiB per partition ({total / 2**20:.0f} MiB)")
        bname = self.fresh(name)
        self.buffers.append(isa.Buffer(bname, mem, top, size))
        self.live.append((mem, top, size, bname, level))
        self.note_psum()
        base = Lin(top)
        if rot:
            v, d = rot
            base = base + Lin(0, ((v, slot, d),))
        return base, bname

    def loop(self, var: str, extent: int, fn):
        self.body.append([])
        self.trips.append(self.trips[-1] * extent)
        fn()
        self.trips.pop()
        body = self.body.pop()
        if body:
            self.emit(isa.Loop(var, extent, tuple(body)))

    def dma(self, dst: isa.AP, src: isa.AP):
        """One whole-tile DMA; `assign_queues` splits it over the DMA queues at the end."""
        if src.mem == "hbm":
            self.hbm_reads.add(src.name)
        self.emit(isa.Instr.make("dma", "q0", dst, (src,)))

    # -- values -----------------------------------------------------------------------------
    def tile(self, P: int, deps, ext, dtype, name, env, mem="sbuf", depth=None) -> Val:
        strides, n = [], 1
        for d in reversed(deps):
            strides.append(n)
            n *= ext[d]
        base, bname = self.alloc(mem, n * ITEMSIZE[dtype], name, env, depth=depth)
        return Val(mem, base, tuple(deps), tuple(reversed(strides)), dtype, bname)

    def ap(self, v: Val, P: int, dims: list, ext) -> isa.AP:
        """Read/write AP of `v` over [P] + dims (stride 0 where v doesn't depend on a dim)."""
        d = [(1, P)]
        for a in dims:
            d.append((v.strides[v.deps.index(a)] if a in v.deps else 0, ext[a]))
        if len(d) == 1:
            d.append((1, 1))
        return isa.AP(v.mem, v.name, v.dtype, v.base.addr(), tuple(d), v.part)

    # -- the job driver -----------------------------------------------------------------------
    def run_job(self, job: Job, env: Env):
        self.emit_loops(job, 0, env)

    def ext_of(self, job: Job, u: str, env: Env) -> int:
        if u in env.ext:
            return env.ext[u]
        if u in job.root_ext:
            return job.root_ext[u]
        s = job.split_of.get(u)
        if s is None:
            raise AssertionError(f"no extent for {u}")
        n = self.ext_of(job, s.parent, env)
        if u == s.outer:
            return -(-n // s.factor)
        if n % s.factor:
            raise TensorlangError(f"stage {job.stage!r}: loop {u!r} would be ragged (its split "
                                  f"leaves a tail of {n % s.factor}); keep {s.outer!r} outside it")
        return s.factor

    def bind_loop(self, job: Job, u: str, env: Env, body, pipe: int = 1, drain: bool = False):
        """Emit loop atom u (main loop + peeled tail), calling body(env) inside; its buffers
        rotate over job.pipe[u] (else `pipe`) slots. drain: u is a loop of the job's own nest
        (emit_body), which may peel its last iteration inside a peeled last iteration."""
        s, drained = job.split_of.get(u), False
        if s is not None and s.outer == u:
            n = self.ext_of(job, s.parent, env)
            main, tail = n // s.factor, n % s.factor
            parts = [(0, main, s.factor)] + ([(main, 1, tail)] if tail else [])
            inner = s.inner
        else:
            parts = [(0, self.ext_of(job, u, env), None)]
            inner = None
        outer = (not env.loops and u not in job.unroll and job.kind.get(u) == "spatial"
                 and job.loops.index(u) < job.acc_level)   # an outermost spatial block loop
        if (outer and parts[0][1] > 1
                and (job.hooks.get(u) or self._fills_inside(job, u, reduce=True))):
            # the first iteration of the outermost loop that hosts fills is peeled: its loads
            # precede every store, so they use every DMA queue (assign_queues) and the first
            # block's operands arrive sooner; so is the last iteration (when the loop has no
            # tail): its stores follow every load, so they use every queue too. A pipelined
            # loop peels up to PEEL_FIRST first iterations (at most its slots) and their
            # loads go first (hoist_loads): all precede every store
            (_, n, f), rest = parts[0], parts[1:]
            last = [] if rest else [(n - 1, 1, f)]
            first = max(1, min(job.pipe.get(u, 1), PEEL_FIRST, n - len(last)))
            parts = ([(c, 1, f) for c in range(first)] + [(first, n - first - len(last), f)]
                     + last + rest)
        elif (drain and outer and self.in_last and self.peel_bid is not None
              and len(parts) == 1 and parts[0][1] > 1 and self.tile_reads_on_chip(job)):
            # inside the peeled last iteration (of every enclosing loop) a loop whose
            # iterations store their tiles peels its last iteration as well: its stores
            # then follow every load and use every DMA queue (assign_queues), e.g. the last
            # column block of bmm's peeled last batch (16x1024^3 on trn2: 506.9 -> 501.1 us).
            # Its iterations stay part of the enclosing peeled iteration (peel_bid). A
            # pipelined loop peels as many iterations as it has slots: a peeled iteration's
            # tiles are buffers of their own, and the first one would reuse the slot of the
            # loop's last iteration (linear 4096^3 on trn2: 1912.4 -> 1913.3 us with one)
            (_, n, f), = parts
            k = max(1, min(job.pipe.get(u, 1), n - 1))
            parts, first, drained = [(0, n - k, f)] + [(c, 1, f) for c in range(n - k, n)], 0, True
        else:
            first = 0
        outer_peeled, peel = self.peeled, len(parts) > 1 and not env.loops and not drained
        outer_last = self.in_last
        if len(parts) > 1 and not drained:
            self.peeled = sum(p[1] for p in parts)
        mark, top0 = len(self.body[-1]), self.job_top
        whole = first > 0 and all(p[1] <= 1 for p in parts)   # no loop left: all peeled
        ahead = (whole and peel and len(parts) > 1 and len(self.body) == 1
                 and job.pipe.get(u, 1) > 1 and bool(job.hooks.get(u)))
        segs = []       # ahead: per peeled iteration (fill nodes, consumer nodes)
        for k, (start, count, inner_ext) in enumerate(parts):
            if k == first and first > 1 and not whole:   # (broadcasts may have gone in
                self.hoist_loads(mark + self.job_top - top0)  # before the mark)
            if count <= 0:
                continue
            extra = {u: count if start == 0 else 1}
            if inner is not None:
                extra[inner] = inner_ext
            if count == 1 or u in job.unroll:
                for c in range(start, start + count):
                    self.in_last = outer_last and c == parts[-1][0] + parts[-1][1] - 1
                    if peel:            # a peeled iteration stands for a loop body (emit)
                        self.peel_bid = ("peel", u, c, len(self.body[0]))
                    e = env.bind(u, Lin(c), **extra)
                    if job.pipe.get(u) == 1 and job.kind.get(u) == "spatial":   # one slot
                        e.pipe = {**e.pipe, SINGLE: len(e.loops)}
                    a, t0 = len(self.body[-1]), self.job_top
                    self.fill_end.pop(u, None)
                    body(e)
                    if ahead:   # (broadcasts inserted at the job top shift the indices)
                        f = self.fill_end.get(u, a - t0) + self.job_top
                        a += self.job_top - t0
                        segs.append((self.body[-1][a:f], self.body[-1][f:]))
                        where = {b.name: (b.mem, b.offset, b.offset + b.size)
                                 for b in self.buffers}
                        self.reserved = (u, [where[x.name] for i, _ in isa.walk_instrs(
                            tuple(segs[-1][1])) for x in (i.dst, i.dst2, *i.srcs)
                            if x is not None and x.name in where]) if _pe_waits(
                                *segs[-1]) else None
                if peel:
                    self.peel_bid = None
            else:
                self.in_last = False
                e = env.bind(u, Lin.var(u) + start if start else Lin.var(u), **extra)
                e.loops = env.loops + (u,)
                d = job.pipe.get(u, pipe)
                if d > 1 or (u in job.pipe and job.kind.get(u) == "spatial"):
                    e.pipe = {**e.pipe, u: d}
                self.loop(u, count, lambda e=e: body(e))
        if segs:
            self.reserved = None
            self.fill_ahead(segs)
        if whole:
            self.hoist_loads(mark + self.job_top - top0)
        elif first > 0:     # the loop's box borders (set once before it) go before the peeled
            self.hoist_loads(mark + self.job_top - top0, loads=False)   # iterations' work
        self.peeled = outer_peeled
        self.in_last = outer_last

    def tile_reads_on_chip(self, job: Job) -> bool:
        """Every tensor job's tile reads is cached (cache_read) or computed on chip
        (compute_at): its store nest loads nothing from HBM, so a peeled iteration's stores
        can follow every load (a bias read per tile, as linear's, loads next to them)."""
        st = self.sched.state
        on_chip = ({c.tensor for c in st.cache_reads if c.stage == job.stage}
                   | {self.prog.stage(ps.stage).tensor for ps in st.stages
                      if ps.attach and ps.attach[0] == job.stage})
        exprs = [job.value] + ([job.init] if job.init is not None else [])
        return all(ld.tensor in on_chip for e in exprs for ld in _loads_of(e))

    def _fills_inside(self, job: Job, u: str, reduce: bool = False) -> bool:
        """The spatial loops directly inside loop u, up to one that hosts fills, form with u
        one pipelined sequence of tiles (a fused loop's atoms: its innermost rotates)."""
        k = job.loops.index(u) + 1
        while k < len(job.loops) and job.kind.get(job.loops[k]) == "spatial":
            v = job.loops[k]
            if job.hooks.get(v):
                return v in job.pipe
            k += 1
        # reduce: or the reduction loop right inside u hosts pipelined fills (a channel
        # step's input tiles: a 2-iteration loop of them is peeled, outside peeled iterations:
        # conv2d 1x1's row blocks, their last store then on every queue)
        def full(a):        # a loop's whole extent (not one peeled iteration's)
            s = job.split_of.get(a)
            return job.root_ext.get(a, 0) if s is None else (
                -(-full(s.parent) // s.factor) if a == s.outer else s.factor)
        i = job.loops.index(u)
        v = (job.loops[k] if reduce and k == i + 1 < len(job.loops) and job.stage not in
             self.attached and all(full(a) == 1 for a in job.loops[:i]) else None)  # outermost
        return bool(v and job.kind.get(v) == "reduce" and job.hooks.get(v) and v in job.pipe)

    def fill_ahead(self, segs: list):
        """Software-pipeline the peeled iterations of a multi-buffered loop that hosts fills
        (cache_read / compute_at producers): the leading nodes of iteration c+1's fill that
        use no tensor engine (its loads and vector / scalar work; the PE keeps its order)
        move ahead of iteration c's consumer nodes, as far as none of them touches a buffer
        (the unit) those nodes touch or reads an HBM tensor they write. The engines run in
        program order, so otherwise the next fill's normalisation waits behind this
        iteration's evacuations and the PE idles before the next block's transposes
        (rmsnorm_matmul 2048x4096x4096 on trn2: 1092.3 -> 1039.8 us). Only where the PE
        would idle for the fill's engine work (_pe_waits; elsewhere, e.g. a small rmsnorm's or
        conv2d's tuned schedules, moving the next loads ahead costs more than it hides).
        bind_loop keeps the ranges iteration c's consumer uses clear while it allocates
        iteration c+1's fill (Lowerer.reserved), so the two do not alias. segs: per iteration (fill nodes,
        consumer nodes), the iterations' runs contiguous and last in the body."""
        where = {b.name: (b.mem, b.offset, b.offset + b.size) for b in self.buffers}

        def acc(nodes):     # (buffer ranges read, written, HBM tensors written, uses PE)
            rd, wr, hw, pe = [], [], set(), False
            for i, _ in isa.walk_instrs(tuple(nodes)):
                pe = pe or i.engine == "pe"
                for a in (i.dst, i.dst2):
                    if a is not None:
                        if a.mem == "hbm":
                            hw.add(a.name)
                        else:
                            wr.append(where.get(a.name, (a.mem, 0, math.inf)))
                rd += [where.get(a.name, (a.mem, 0, math.inf)) for a in i.srcs if a.mem != "hbm"]
            return rd, wr, hw, pe

        def meet(xs, ys):
            return any(m == m2 and lo < hi2 and lo2 < hi for m, lo, hi in xs for m2, lo2, hi2 in ys)

        seq, n = list(segs[0][0]), len(segs)
        for c in range(n):
            rest, nxt, k = segs[c][1], segs[c + 1][0] if c + 1 < n else [], 0
            if not _pe_waits(nxt, rest):
                nxt = []        # only where the PE would idle for the fill (see _pe_waits)
            if nxt:
                crd, cwr, chw, _ = acc(rest)
            while k < len(nxt):
                rd, wr, hw, pe = acc([nxt[k]])
                hr = {a.name for i, _ in isa.walk_instrs((nxt[k],)) for a in i.srcs
                      if a.mem == "hbm"}
                if pe or hw or meet(wr, crd + cwr) or meet(rd, cwr) or hr & chw:
                    break
                k += 1
            seq += list(nxt[:k]) + list(rest) + list(segs[c + 1][0][k:] if c + 1 < n else [])
        body = self.body[-1]
        assert sorted(map(id, body[len(body) - len(seq):])) == sorted(map(id, seq))
        body[len(body) - len(seq):] = seq

    def hoist_loads(self, i0: int, loads: bool = True):
        """Move the HBM loads among the top-level nodes from i0 on ahead of the other nodes
        there (keeping the loads' order), with the SBUF memsets before them (a padded box's
        border), as far as no node they pass touches the buffer they fill (any byte of it:
        buffers are the unit) or writes the tensor they read: the
        peeled first iterations of a pipelined loop then load all their tiles before the
        first store, over every DMA queue (assign_queues), as the loop would have. With
        `loads` False only the memsets move (a loop's borders, set before it: its first
        loads need not wait for the peeled iterations' work on the engine setting them)."""
        seg = self.body[-1][i0:]
        where = {b.name: (b.mem, b.offset, b.offset + b.size) for b in self.buffers}
        front, rest, rest_bufs, rest_hbm, passed = [], [], [], set(), False
        for node in seg:
            aps = [(a, a is i.dst or a is i.dst2) for i, _ in isa.walk_instrs((node,))
                   for a in (i.dst, i.dst2, *i.srcs) if a is not None]
            if isinstance(node, isa.Instr) and (
                    loads and not passed and node.op == "dma" and node.dst.mem != "hbm"
                    and node.srcs[0].mem == "hbm" and node.srcs[0].name not in rest_hbm
                    or node.op == "memset" and node.dst.mem == "sbuf"):   # (a box's border)
                m, lo, hi = where.get(node.dst.name, (node.dst.mem, 0, math.inf))
                if not any(m == m2 and lo < hi2 and lo2 < hi for m2, lo2, hi2 in rest_bufs):
                    front.append(node)
                    continue
            rest.append(node)
            # a load does not overtake the loads of a loop left behind (an inner loop's
            # fills: a later block's tiles would queue ahead of this block's operands)
            passed = passed or any(i.op == "dma" and i.srcs[0].mem == "hbm"
                                   and i.dst.mem != "hbm" for i, _ in isa.walk_instrs((node,)))
            rest_hbm.update(a.name for a, w in aps if w and a.mem == "hbm")
            rest_bufs += [where.get(a.name, (a.mem, 0, math.inf)) for a, _ in aps
                          if a.mem != "hbm"]
        self.body[-1][i0:] = front + rest

    def emit_loops(self, job: Job, k: int, env: Env):
        if k == job.acc_level:
            with self.level():
                env = self.alloc_acc(job, env)
                self.emit_body(job, k, env)
                if (job.acc_level < len(job.loops) or job.reduce is not None) and not job.direct:
                    self.emit_store_nest(job, k, env)
            return
        self.emit_body(job, k, env)

    def emit_body(self, job: Job, k: int, env: Env):
        if k == len(job.loops):
            self.emit_tile(job, env)
            return
        u = job.loops[k]

        def inside(e):
            with self.level():
                for hook in job.hooks.get(u, ()):
                    hook(e)
                self.fill_end[u] = len(self.body[-1]) - self.job_top
                if self.reserved and self.reserved[0] == u:
                    self.reserved = None
                if u not in job.emitted:
                    self.emit_loops(job, k + 1, e)
        self.bind_loop(job, u, env, inside, drain=True)

    # -- accumulator and store ---------------------------------------------------------------
    def tile_ext(self, job: Job, env: Env, spatial_only: bool = False) -> dict:
        """Extents of the tile atoms here (spatial_only: outside the reduction loops, where
        the extent of a tailed reduction tile atom is not defined)."""
        ext = dict(env.ext)
        atoms = [job.part] + job.free
        if not spatial_only:
            atoms += job.red_free + ([job.contract] if job.contract else [])
        for a in atoms:
            ext[a] = self.ext_of(job, a, env)
        return ext

    def nominal(self, job: Job, u: str, env: Env | None = None) -> int:
        """The largest extent loop atom u takes (buffer slots are sized by it)."""
        if u in job.root_ext:
            return job.root_ext[u]
        s = job.split_of.get(u)
        if s is None:  # a consumer's atom inside a producer's job: its extent here
            return env.ext[u]
        return -(-self.nominal(job, s.parent, env) // s.factor) if u == s.outer else s.factor

    def alloc_acc(self, job: Job, env: Env) -> Env:
        """The acc / result tile at the acc level: one slot per iteration of the spatial loops
        inside it, each [P, free...] at nominal (largest) extents."""
        if job.acc_level == len(job.loops) and job.reduce is None:
            return env
        inner = [u for u in job.loops[job.acc_level:] if job.kind[u] == "spatial"]
        d = job.dest
        if (isinstance(d, SlotDest) and not inner and job.init is None and job.acc_mem == d.mem
                and d.dtype == "float32"):
            job.direct = True  # accumulate straight into the consumer's buffer
            env = Env(dict(env.lin), dict(env.ext), env.loops, dict(env.pipe))
            env.lin["__acc__"] = (d.mem, d.name, d.base, "float32", {}, d.strides)
            return env
        nom = {u: self.nominal(job, u, env) for u in inner + job.free}
        per_slot = 1
        for f in job.free:
            per_slot *= nom[f]
        dtype = "float32" if job.reduce is not None else job.out_dtype
        mem = job.acc_mem
        if mem == "psum":
            bank_elems = self.spec.psum_bank_bytes // ITEMSIZE[dtype]
            if per_slot > bank_elems:
                raise TensorlangError(f"stage {job.stage!r}: PSUM tile of {per_slot} elements > "
                                      f"{bank_elems} per bank")
            slot_elems = bank_elems
        else:
            slot_elems = per_slot
        nslots = 1
        for u in inner:
            nslots *= nom[u]
        if mem == "psum":
            bytes_total = nslots * self.spec.psum_bank_bytes
            if bytes_total > self.spec.psum_partition_bytes:
                raise TensorlangError(
                    f"stage {job.stage!r}: {nslots} PSUM accumulator tiles (loops "
                    f"{', '.join(inner)} inside the accumulator) need {nslots} banks; "
                    f"{self.spec.name} has {self.spec.psum_banks}")
            base, name = self.alloc_banks(nslots, f"{job.stage}_acc", env)
        else:
            base, name = self.alloc("sbuf", nslots * slot_elems * ITEMSIZE[dtype],
                                    f"{job.stage}_acc", env)
        slot_stride, s = {}, slot_elems
        for u in reversed(inner):
            slot_stride[u] = s
            s *= nom[u]
        strides, n = [], 1
        for f in reversed(job.free):
            strides.append(n)
            n *= nom[f]
        env = Env(dict(env.lin), dict(env.ext), env.loops, dict(env.pipe))
        env.lin["__acc__"] = (mem, name, base, dtype, slot_stride, tuple(reversed(strides)))
        return env

    def note_psum(self):
        """Track the most PSUM in use at once by everything but resident broadcasts."""
        n = sum(x[2] for x in self.live if x[0] == "psum" and x[3] not in self.resident)
        self.psum_peak = max(self.psum_peak, n)

    def alloc_banks(self, n: int, name: str, env: Env, level: int | None = None,
                    resident: bool = False):
        spec = self.spec
        rot = _rotation(env)
        depth = rot[1] if rot else 1
        size = n * depth * spec.psum_bank_bytes
        top = self.place("psum", size, spec.psum_bank_bytes)
        if top is None:
            raise TensorlangError(
                f"PSUM overflow on {spec.name}: {name!r} needs {n * depth} banks ({n} tiles x "
                f"{depth} slots) with {self.used('psum') // spec.psum_bank_bytes} in use; "
                f"{spec.name} has {spec.psum_banks}")
        bname = self.fresh(name)
        self.buffers.append(isa.Buffer(bname, "psum", top, size))
        self.live.append(("psum", top, size, bname, len(self.memo) - 1 if level is None else level))
        if resident:
            self.resident.add(bname)
        self.note_psum()
        base = Lin(top)
        if rot:
            base = base + Lin(0, ((rot[0], n * spec.psum_bank_bytes, rot[1]),))
        return base, bname

    def acc_val(self, job: Job, env: Env) -> Val:
        mem, name, base, dtype, slot_stride, strides = env.lin["__acc__"]
        b = base
        for u, st in slot_stride.items():
            b = b + env.lin[u].scale(st * ITEMSIZE[dtype])
        return Val(mem, b, tuple(job.free), strides, dtype, name)

    def emit_store_nest(self, job: Job, k: int, env: Env):
        inner = [u for u in job.loops[k:] if job.kind[u] == "spatial"]
        self._store_nest(job, inner, 0, env)

    def _store_nest(self, job: Job, inner: list, i: int, env: Env):
        if i == len(inner):
            self.store_tile(job, env)
            return
        # the staging tiles of the store rotate (STORE_SLOTS): the next tile's copy-out
        # overlaps this tile's store instead of waiting for its DMA to read the slot
        self.bind_loop(job, inner[i], env, lambda e2: self._store_nest(job, inner, i + 1, e2),
                       pipe=STORE_SLOTS)

    def store_tile(self, job: Job, env: Env):
        ext = self.tile_ext(job, env, spatial_only=True)
        P = ext[job.part]
        acc = self.acc_val(job, env)
        if self.diag_out and acc.mem == "sbuf":      # the tensor engine's rows (diag_rows)
            pe = self.diag_out.pop((acc.name, self.ap(acc, P, job.free, ext).offset), None)
            if isinstance(pe, tuple):                # (rows, chunks, outs): see diag_rows
                # stored from PSUM by one DMA (equal banks, see diag_rows: the banks as
                # one more dim), the rest from SBUF
                rows, chunks, outs = pe
                src = self.ap(acc, P, job.free, ext)
                dst = self.hbm_ap(job.dest.tensor, job.dest.index, job.part, job.free, env, ext)
                R, C = src.dims[1][1], src.dims[2][1]
                bank, nr = self.spec.psum_bank_bytes // 4, chunks[0][1]
                part = _rect_ap(dst, 0, rows, 0, C)
                self.dma(dataclasses.replace(part, dims=(part.dims[0], (nr * C, len(chunks)),
                                                         (C, nr), (1, C))),
                         dataclasses.replace(outs[0], dims=((1, P), (bank, len(chunks)),
                                                            (C, nr), (1, C))))
                if rows < R:
                    self.dma(_rect_ap(dst, rows, R - rows, 0, C),
                             _rect_ap(src, rows, R - rows, 0, C))
                self.invalidate(job.dest.tensor)
                return
            for ins in pe or ():
                self.emit(ins)
        if job.reduce is not None and job.init is not None:
            iv = self.eval(job, job.init, env, ext, job.free)
            out = self.binary(job.reduce, iv, acc, env, ext, job.free, P,
                              dst_dtype=job.out_dtype)
        else:
            out = acc
        if job.epilogue is not None:    # the consumer's tile, computed from this one
            cjob, ld = job.epilogue     # its read of this tile (at this tile's extents)
            key = self.operand_key(ld, job.part, tuple(job.free), env, ext)
            with self.level():
                self.memo[-1][key] = lambda e, d, v=out: v.with_deps(d, v.key)
                self.emit_tile(cjob, Env({k: x for k, x in env.lin.items() if k != "__acc__"},
                                         dict(env.ext), env.loops, dict(env.pipe)))
            return
        self.write_dest(job, out, env, ext)

    def write_dest(self, job: Job, v, env: Env, ext):
        P = ext[job.part]
        if isinstance(job.dest, SlotDest):
            d = job.dest
            dims = ((1, P),) + tuple((s, ext[f]) for s, f in zip(d.strides, job.free))
            dst = isa.AP(d.mem, d.name, d.dtype, d.base.addr(), dims if len(dims) > 1
                         else dims + ((1, 1),))
            self.copy_into(v, dst, job.free, ext, P, env)
            return
        t = self.tensors[job.dest.tensor]
        if not (isinstance(v, Val) and v.mem == "sbuf" and v.dtype == t.dtype
                and v.deps == tuple(job.free)):
            tv = self.tile(P, job.free, ext, t.dtype, f"{job.stage}_out", env)
            self.copy_into(v, self.ap(tv, P, job.free, ext), job.free, ext, P, env)
            v = tv
        src = self.ap(v, P, job.free, ext)
        dst = self.hbm_ap(job.dest.tensor, job.dest.index, job.part, job.free, env, ext)
        self.dma(dst, src)
        self.invalidate(job.dest.tensor)

    def copy_into(self, v, dst: isa.AP, dims, ext, P, env):
        if isinstance(v, float):
            self.emit(isa.Instr.make("memset", "dve", dst, value=float(v)))
        else:
            ins = isa.Instr.make("tensor_copy", "act" if v.mem == "psum" else "dve", dst,
                                 (self.ap(v, P, dims, ext),))
            if v.mem == "psum":
                self.emit_evacuation(ins)
            else:
                self.emit_balanced(ins)

    def emit_evacuation(self, ins: isa.Instr):
        """A PSUM -> SBUF copy: on the scalar engine; where the vector engine can read PSUM
        at the same time (not spec.dve_act_share_psum), split along the innermost free
        dimension between the two (pieces on dependency granules) so both finish together:
        the accumulator is free for the next matmuls into it sooner (bmm 16x1024^3 on trn2: the next column tile's
        first k step waited for the evacuations on the scalar engine alone)."""
        d = len(ins.dst.dims) - 1
        stride, units = ins.dst.dims[d]
        step = max(1, -(-self.spec.dep_granule_bytes // (abs(stride) * ins.dst.itemsize))) \
            if stride else units
        if self.spec.dve_act_share_psum or units // step < 2:
            self.emit(ins)
            return
        c = {e: instr_cost(isa.Instr(ins.op, e, ins.dst, ins.srcs, ins.attrs, ins.dst2),
                           self.spec).ii_ps for e in ("act", "dve")}
        n = units // step
        k = min(range(1, n), key=lambda k: max(c["act"] * k, c["dve"] * (n - k)))   # act's
        cut = k * step
        for e, lo, m in (("act", 0, cut), ("dve", cut, units - cut)):
            self.emit(isa.Instr(ins.op, e, _slice_ap(ins.dst, d, lo, m),
                                tuple(_slice_ap(a, d, lo, m) for a in ins.srcs),
                                ins.attrs, ins.dst2))

    def invalidate(self, tensor: str):
        for m in self.memo:
            for k in [k for k in m if k[0] == tensor]:
                del m[k]

    # -- HBM access patterns -----------------------------------------------------------------
    def flat(self, tensor: str, index: tuple[Affine, ...]) -> Affine:
        """The flat element index of tensor[index] (memoized per index tuple: a Load's index
        is flattened by every operand_key / hbm_ap of that load)."""
        hit = self.flats.get((tensor, id(index)))
        if hit is not None and hit[0] is index:
            return hit[1]
        fl = self._flat(tensor, index)
        self.flats[tensor, id(index)] = (index, fl)
        return fl

    def _flat(self, tensor: str, index: tuple[Affine, ...]) -> Affine:
        shape = self.tensors[tensor].shape
        coefs: dict = {}
        const, stride = 0, 1
        for d in reversed(range(len(shape))):    # one Affine at the end, not one per dim
            for v, c in index[d].terms:
                coefs[v] = coefs.get(v, 0) + c * stride
            const += index[d].const * stride
            stride *= shape[d]
        return Affine.make(coefs, const)

    def split_affine(self, a: Affine, env: Env) -> Lin:
        """The part of `a` bound to loop values (tile atoms are excluded by the caller)."""
        lin, const, d = env.lin, a.const, {}
        for v, c in a.terms:                      # one sum, sorted once (Lin terms are canonical)
            x = lin.get(v)
            if x is not None:
                const += x.const * c
                for u, k, m in x.terms:
                    d[u, m] = d.get((u, m), 0) + k * c
        return Lin(const, tuple((u, k, m) for (u, m), k in sorted(d.items()) if k) if d else ())

    def hbm_ap(self, tensor, index, part, free, env, ext) -> isa.AP:
        off, dims = self.hbm_offset_dims(tensor, index, part, free, env, ext)
        return isa.AP("hbm", tensor, self.tensors[tensor].dtype, off, dims)

    def hbm_offset_dims(self, tensor, index, part, free, env, ext) -> tuple:
        """(offset, dims) of hbm_ap: the tile atoms (part, free) are the dims, every other
        atom of the flat index is bound to its loop value in the offset."""
        fl = self.flat(tensor, index)
        lin, coef, const, d = env.lin, {}, fl.const, {}
        for v, c in fl.terms:
            if v == part or v in free:
                coef[v] = c
                continue
            x = lin.get(v)
            if x is None:
                raise AssertionError(f"unbound atom {v} in {tensor}")
            const += x.const * c               # split_affine, inline: one sum, sorted once
            for u, k, m in x.terms:
                d[u, m] = d.get((u, m), 0) + k * c
        terms = tuple((u, k, m) for (u, m), k in sorted(d.items()) if k) if d else ()
        dims = ((coef.get(part, 0), ext[part]),) + tuple((coef.get(f, 0), ext[f]) for f in free)
        return isa.Addr(const, terms), dims if len(dims) > 1 else dims + ((1, 1),)

    # -- operands -------------------------------------------------------------------------------
    def operand_key(self, ld: Load, part: str, deps, env: Env, ext):
        """Tiles with equal keys hold equal data: HBM loads are keyed by their access
        pattern (so stages with differently named loops share a load), on-chip producers
        by the symbolic read."""
        producer = self.stage_of_tensor.get(ld.tensor)
        if producer is not None and producer.name in self.attached:
            return self.attached_key(ld, part, deps, ext)
        return (ld.tensor, "hbm", *self.hbm_offset_dims(ld.tensor, ld.index, part, deps, env, ext))

    def operand(self, job: Job, ld: Load, part: str, dims, env: Env, ext) -> Val:
        deps = tuple(f for f in dims if any(ix.coef(f) for ix in ld.index))
        key = self.operand_key(ld, part, deps, env, ext)
        for m in reversed(self.memo):
            if key in m:
                return m[key](env, deps).with_key(key)
        P = ext[part]
        producer = self.stage_of_tensor.get(ld.tensor)
        level = -1
        if producer is not None and producer.name in self.attached:
            if self.keep is not None and not job.loops:
                level = self.keep       # kept for every reader inside the transposed fill
            v = self.virtual(producer, ld, part, deps, env, ext,
                             depth=None if level == -1 else level,
                             home=None if level == -1 else level)
        elif (hit := self.cached_load(ld, part, deps, env, ext, key)) is not None:
            v, level = hit
        elif self.invariant_broadcast(ld, part, deps, env, ext):
            v, level = self.broadcast(ld, part, deps, env, ext), 1
        else:
            v = self.load(ld, part, deps, env, ext, P)
        self.memo[level][key] = lambda e, d, v=v: v.with_deps(d, v.key)
        return v.with_key(key)

    def cache_mark(self, env: Env) -> tuple:
        """Where cached_load puts a load hoisted to this point: (memo level, body and trips
        depth, env, first buffer allocated after it)."""
        return (len(self.memo) - 1, len(self.body) - 1, len(self.trips) - 1, env,
                len(self.buffers))

    def cached_load(self, ld: Load, part: str, deps, env: Env, ext, key) -> tuple | None:
        """(tile, memo level) of a load under a cache_read of its tensor at an enclosing loop
        (see _attached_cache; or any load inside a block loop of blocked_map) whose address
        depends on no loop inside that one: emitted there (before the inner loops, in a
        buffer clear of every buffer allocated inside it) and kept at that level, the
        outermost such. None: no such cache, or the address varies inside it."""
        used = {v for v, _, _ in key[2].terms}
        mark = next((m[k] for m in self.memo for k in (("__cache__", ld.tensor), ("__cache__", "*"))
                     if k in m and used <= set(m[k][3].loops)), None)
        if mark is None:
            return None
        level, depth, tdepth, at_env, first = mark
        outer = Env(env.lin, env.ext, at_env.loops, dict(at_env.pipe))
        body, trips, hoisting, buf0 = self.body, self.trips, self.hoisting, self.job_buf0
        # clear of every buffer allocated inside this loop's body so far (rewritten by its
        # inner loops while the cached tile is read)
        self.body, self.trips, self.hoisting = body[:depth + 1], trips[:tdepth + 1], True
        self.job_buf0 = first
        try:
            v = self.tile(ext[part], deps, ext, self.tensors[ld.tensor].dtype,
                          f"{ld.tensor}_cache", outer, depth=level)
            self.hoisting, self.job_buf0 = False, buf0
            first = len(self.buffers)
            with self.level():
                self.load(ld, part, deps, outer, ext, ext[part], into=v)
            self.outside.update(b.name for b in self.buffers[first:])
        finally:
            self.body, self.trips, self.hoisting, self.job_buf0 = body, trips, hoisting, buf0
        return v, level

    @staticmethod
    def attached_key(ld: Load, part: str, deps, ext) -> tuple:
        """The key of a producer's tile computed on chip: the symbolic read with the tile's
        loops named by position (partition, then free dims, with their extents), so stages
        reading the same points through differently named loops (softmax's max, sum and
        normalisation each read S[i, j]) share one evaluation."""
        pos = {part: Affine.var("__p")}
        pos.update({d: Affine.var(f"__d{n}") for n, d in enumerate(deps)})
        index = tuple(ix.substitute(pos) for ix in ld.index)
        used = any(ix.coef(part) for ix in ld.index)
        return (ld.tensor, index, ext[part] if used else None, tuple(ext[d] for d in deps))

    def invariant_broadcast(self, ld: Load, part, deps, env, ext) -> bool:
        """A read the same on every partition and at every loop iteration (a per-feature
        vector such as gamma[j] of a row tile): loaded once for the whole root job."""
        if (len(self.memo) < 2 or ext[part] < 2 or not deps
                or max(self.trips[-1], self.peeled) < 2):
            return False
        fl = self.flat(ld.tensor, ld.index)
        if fl.coef(part) or any(c and v not in deps for v, c in fl.terms):
            return False
        n = ITEMSIZE[self.tensors[ld.tensor].dtype]
        for d in deps:
            n *= ext[d]
        if self.used("sbuf") + n > self.spec.sbuf_partition_bytes // 2:
            return False
        cursor, self.hoisting = dict(self.cursor), True
        ok = self.place("sbuf", n, self.spec.dep_granule_bytes) is not None
        self.cursor, self.hoisting = cursor, False
        return ok

    def broadcast(self, ld: Load, part, deps, env, ext) -> Val:
        """Emitted before the root job's loops and peeled iterations: one row [1, F] from HBM,
        copied to all P partitions on chip (tensor engine: ones[1, P]^T @ row[1, <=N] into
        PSUM, then a copy out) -- a broadcast DMA would read the row from HBM P times. The copy
        stays in PSUM when the program has no matmul and it fits in half of PSUM: a tensor_tensor
        with one operand in PSUM runs at one element per cycle instead of two."""
        t = self.tensors[ld.tensor]
        P = ext[part]
        body, trips, self.body, self.trips = self.body, self.trips, [[]], [1]
        root = Env({}, dict(ext))
        try:
            src = self.hbm_ap(ld.tensor, ld.index, part, list(deps), env, ext)
            row_ok = len(deps) == 1 and t.dtype in self.spec.pe_rate
            v = None
            self.hoisting = True
            if row_ok and not self.bc_sbuf and not any(ss.tensorized for ss in self.sched.state.stages):
                F, bank = ext[deps[0]], self.spec.psum_bank_bytes
                n = -(-F * ITEMSIZE[t.dtype] // bank)
                if (F <= self.spec.max_free_elems_psum
                        and sum(x[2] for x in self.live if x[3] in self.resident) + n * bank
                        <= self.psum_room
                        and self.place("psum", (n + 1) * bank, bank) is not None):
                    base, bname = self.alloc_banks(n, f"{ld.tensor}_bc", root, level=1,
                                                   resident=True)
                    v = Val("psum", base, tuple(deps), (1,), t.dtype, bname)
            if v is None:
                v = self.tile(P, deps, ext, t.dtype, f"{ld.tensor}_bc", root, depth=1)
            self.hoisting = False
            if not row_ok:
                self.dma(self.ap(v, P, list(deps), ext), src)
                return v
            F = ext[deps[0]]
            first = len(self.buffers)
            with self.level():
                row = self.tile(1, deps, ext, t.dtype, f"{ld.tensor}_row", root)
                self.dma(self.ap(row, 1, list(deps), ext),
                         dataclasses.replace(src, dims=((1, 1),) + src.dims[1:]))
                ones = self.tile(1, ("__p",), {"__p": P}, t.dtype, "ones", root)
                ones_ap = self.ap(ones, 1, ["__p"], {"__p": P})
                self.emit(isa.Instr.make("memset", "dve", ones_ap, value=1.0))
                n = self.spec.matmul_max_n
                for c in range(0, F, n):
                    k = min(n, F - c)
                    with self.level():
                        ps = self.tile(P, ("__c",), {"__c": k}, "float32", f"{ld.tensor}_ps",
                                       root, mem="psum")
                        ps_ap = self.ap(ps, P, ["__c"], {"__c": k})
                        mov = isa.AP("sbuf", row.name, t.dtype,
                                     row.base.addr() + c * ITEMSIZE[t.dtype], ((1, 1), (1, k)))
                        self.emit(isa.Instr.make("matmul", "pe", ps_ap, (ones_ap, mov)))
                        dst = isa.AP(v.mem, v.name, t.dtype, v.base.addr() + c * ITEMSIZE[t.dtype],
                                     ((1, P), (1, k)))
                        self.emit_balanced(isa.Instr.make("tensor_copy", "act", dst, (ps_ap,)))
            self.prologue.update(b.name for b in self.buffers[first:])
            return v
        finally:     # the broadcast goes before the root job's loops and peeled iterations
            body[0][self.job_top:self.job_top] = self.body[0]
            self.job_top += len(self.body[0])
            self.body, self.trips, self.hoisting = body, trips, False

    def load(self, ld: Load, part: str, deps, env: Env, ext, P: int, into: Val | None = None) -> Val:
        t = self.tensors[ld.tensor]
        fl = self.flat(ld.tensor, ld.index)
        v = into or self.tile(P, deps, ext, t.dtype, f"{ld.tensor}_t", env)
        dst = self.ap(v, P, list(deps), ext)
        src = self.hbm_ap(ld.tensor, ld.index, part, list(deps), env, ext)
        wide = [k for k, f in enumerate(deps) if ext[f] > 1]   # size-1 dims: same layout
        if len(wide) == 1 < len(deps) and (self.transposing(fl, part, [deps[wide[0]]], ext)
                                           or self.row_blocks(fl, part, [deps[wide[0]]], ext)):
            src = isa.AP("hbm", src.name, src.dtype, src.offset,
                         (src.dims[0], src.dims[1 + wide[0]]))
            deps = (deps[wide[0]],)
        if self.transposing(fl, part, deps, ext):
            # partitions would walk contiguous memory: load rows, transpose on the tensor engine
            f = deps[0]
            F = ext[f]
            with self.level():
                nat = self.tile(F, (part,), ext, t.dtype, f"{ld.tensor}_rows", env)
                self.dma(self.ap(nat, F, [part], ext),
                         isa.AP("hbm", ld.tensor, t.dtype, src.offset, ((src.dims[1][0], F),
                                                                         (src.dims[0][0], P))))
                self.transpose_into(nat, v, part, f, ext, env)
            return v
        if self.row_blocks(fl, part, deps, ext):
            (pstride, _), (fstride, _) = src.dims
            self.load_row_blocks(ld.tensor, part, deps[0], v, src.offset, pstride, fstride, ext,
                                 env)
            return v
        grouped = self.grouped_rows(fl, part, deps, ext)
        if grouped is not None:
            g, f = grouped
            self.load_row_blocks(ld.tensor, part, f, v, src.offset, src.dims[0][0],
                                 src.dims[1 + deps.index(f)][0], ext, env, g)
            return v
        self.dma(dst, src)
        return v

    def grouped_rows(self, fl: Affine, part: str, deps, ext) -> tuple | None:
        """(g, f) when a load reads [part, g, f] where part and g together walk one
        contiguous run (g steps by ext[part]: several partition tiles side by side, e.g. a
        transpose tile of Y rows [g x part] or [part x g]) and f steps by whole rows: loaded as rows
        [f x (g, part)], each row ext[g] times longer than a transposing load's, and
        transposed on the tensor engine in ext[g] pieces (see load_row_blocks)."""
        if len(deps) != 2:
            return None
        P = ext[part]
        for g, f in (deps, deps[::-1]):
            G = ext[g]
            if ((fl.coef(part), fl.coef(g)) in ((1, P), (G, 1)) and abs(fl.coef(f)) >= P * G
                    and 1 < P <= self.spec.partitions and G > 1
                    and G * self.spec.partitions * 4 <= self.spec.psum_bank_bytes):
                return g, f
        return None

    def row_blocks(self, fl: Affine, part: str, deps, ext) -> bool:
        """A transposing load (see transposing) with more rows than partitions."""
        return (len(deps) == 1 and abs(fl.coef(part)) == 1 and abs(fl.coef(deps[0])) > 1
                and 1 < ext[part] <= self.spec.partitions and ext[deps[0]] > self.spec.partitions)

    def load_row_blocks(self, tensor: str, part: str, f: str, v: Val, off: isa.Addr,
                        pstride: int, fstride: int, ext, env: Env, g: str | None = None):
        """v[part, f] from HBM rows [f, part] (contiguous along part; element strides pstride,
        fstride from `off`), spec.partitions rows at a time: each block is one DMA of whole
        rows and one tensor-engine transpose into a PSUM tile of up to a bank, copied out by
        the scalar and vector engines in turn. With `g` (see grouped_rows): v[part, g, f]
        from rows [f, (g, part)], each block's rows ext[g] * ext[part] long, transposed in
        ext[g] pieces."""
        P, F, B = ext[part], ext[f], self.spec.partitions
        G = ext[g] if g is not None else 1
        gstep, pstep = (P, 1) if pstride == 1 else (1, G)     # piece gi of a row: see grouped_rows
        vs = v.strides[v.deps.index(f)]
        gs = v.strides[v.deps.index(g)] if g is not None else 0
        W = max(B, self.spec.psum_bank_bytes // 4 // B * B)    # columns per PSUM tile
        per = max(1, W // B // G) * B                          # rows per PSUM tile
        k, pieces = 0, []
        for c0 in range(0, F, per):
            w = min(per, F - c0)
            with self.level():
                ps = self.tile(P, ("__c",), {"__c": G * -(-w // B) * B}, "float32",
                               f"{tensor}_rows_T", env, mem="psum")
                for b0 in range(c0, c0 + w, B):
                    n = min(B, F - b0)
                    with self.level():
                        nat = self.tile(n, ("__r",), {"__r": G * P}, v.dtype, f"{tensor}_rows",
                                        env)
                        self.dma(self.ap(nat, n, ["__r"], {"__r": G * P}),
                                 isa.AP("hbm", tensor, v.dtype, off + b0 * fstride,
                                        ((fstride, n), (pstride // pstep, G * P))))
                        for gi in range(G):
                            col = ((b0 - c0) // B * G + gi) * B
                            blk = isa.AP("psum", ps.name, "float32", (ps.base + col * 4).addr(),
                                         ((1, P), (1, n)))
                            piece = Val(nat.mem, nat.base + gi * gstep * ITEMSIZE[v.dtype],
                                        nat.deps, (pstep,), nat.dtype, nat.name, nat.part)
                            self.emit(isa.Instr.make("transpose", "pe", blk,
                                                     (self.ap(piece, n, ["__r"], {"__r": P}),)))
                            pieces.append((blk, b0, gi))
                    for blk, b0_, gi in pieces:
                        off_v = (b0_ * vs + gi * gs) * ITEMSIZE[v.dtype]
                        dst = isa.AP(v.mem, v.name, v.dtype, (v.base + off_v).addr(),
                                     ((1, P), (vs, n)), v.part)
                        self.emit(isa.Instr.make("tensor_copy", ("act", "dve")[k % 2], dst,
                                                 (blk,)))
                        k += 1
                    pieces.clear()
        if k > 1:   # written by both copy engines: no one writer for a [P,1] step to follow
            self.writer.pop(v.name, None)

    def transposing(self, fl: Affine, part: str, deps, ext) -> bool:
        """Would a load with this flat index walk contiguous memory along the partitions?
        Then it is loaded as rows [deps[0] x part] and transposed on the tensor engine."""
        return (len(deps) == 1 and abs(fl.coef(part)) == 1 and abs(fl.coef(deps[0])) > 1
                and ext[part] > 1 and ext[deps[0]] <= self.spec.partitions
                and ext[part] * 4 <= self.spec.psum_bank_bytes)

    def transpose_into(self, nat: Val, v: Val, part: str, f: str, ext, env: Env, engine="act"):
        """v[part, f] = nat[f, part]: a tensor-engine transpose into PSUM, copied out by
        `engine` (act or dve)."""
        P, F = ext[part], ext[f]
        with self.level():
            ps = self.tile(P, (f,), ext, "float32", f"{nat.name}_T", env, mem="psum")
            self.emit(isa.Instr.make("transpose", "pe", self.ap(ps, P, [f], ext),
                                     (self.ap(nat, F, [part], ext),)))
            self.emit(isa.Instr.make("tensor_copy", engine, self.ap(v, P, [f], ext),
                                     (self.ap(ps, P, [f], ext),)))

    def virtual(self, producer: Stage, ld: Load, part: str, deps, env: Env, ext,
                into: tuple | None = None, home: int | None = None,
                depth: int | None = None) -> Val:
        """Evaluate `producer` at the points `ld` reads, in the [part, deps] layout. `home`: a
        memo level of the consumer where the producer's computed tiles are kept (when the
        producer runs as one tile, no loops), so the consumer can reuse them."""
        P = ext[part]
        axis_of_dim = [ix.terms[0][0] for ix in producer.index]
        m = {axis_of_dim[d]: ld.index[d] for d in range(len(ld.index))}
        ss = self.sched.state.get(producer.name)
        ren = {}
        for v in ss.vars:
            if v.kind == "reduce":
                ren[v.name] = self.fresh(f"{producer.name}_{v.name}")
        job = make_job(self, producer, ss, ren, spatial_map=m, part=part, free=list(deps))
        env2 = Env({k: x for k, x in env.lin.items() if k != "__acc__"}, dict(env.ext),
                   env.loops, dict(env.pipe))
        for a in (part, *deps):
            env2.ext[a] = ext[a]
        if into is None and depth is not None and self.keep is not None and not job.loops:
            v = self.kept_tile(job, env2, ext, depth)
            if v is not None:
                return v
        if into is None:
            v = self.tile(P, deps, ext, self.tensors[producer.tensor].dtype,
                          f"{producer.tensor}_sb", env, depth=depth)
        else:
            v = into
        job.dest = SlotDest(v.base, v.dtype, v.strides, v.mem, v.name)
        outer = self.home, self.home_funcs
        self.home = home if not job.loops else None
        if home is not None:
            from .ir import walk  # noqa: PLC0415
            target = self.attached[producer.name][0]    # the consumer and its other producers
            readers = [self.prog.stage(target)] + [self.prog.stage(p) for p, a in
                                                   self.attached.items() if a[0] == target]
            self.home_funcs = {x.op for st in readers for x in walk(st.value)
                               if isinstance(x, Unary)}
        self.run_job(job, env2)
        self.home, self.home_funcs = outer
        return v

    def kept_tile(self, job: Job, env: Env, ext, depth: int) -> Val | None:
        """A loop-free producer evaluated for the readers of a transposed fill (kept at memo
        level `depth`) without a copy into a tile of its own: a tensorized one accumulates
        in a PSUM tile its readers read directly (a row of up to max_free_elems_psum over
        several banks: a query tile's scores against thousands of keys); an elementwise one
        is the tile its expression's last instruction wrote, when that was allocated at
        `depth` or outside (None: evaluate the usual way)."""
        P = ext[job.part]
        if job.contract:
            n = 1
            for f in job.free:
                n *= ext[f]
            bank = self.spec.psum_bank_bytes
            banks = -(-n * 4 // bank)
            if len(job.free) == 1 and (self.long_row(n) or (
                    banks > 1 and self.place("psum", banks * bank, bank) is None)):
                return self.blocked_row(job, env, ext, depth)
            if n > self.spec.max_free_elems_psum or (banks > 1 and len(job.free) != 1):
                return None
            if self.block is not None:
                self.block_row(job, env)
            if banks == 1:
                v = self.tile(P, job.free, ext, "float32", f"{job.stage}_ps", env, mem="psum",
                              depth=depth)
            else:   # a row over several banks (emit_matmul fills it bank by bank)
                if self.place("psum", banks * bank, bank) is None:
                    return None
                base, name = self.alloc_banks(banks, f"{job.stage}_ps", env, level=depth)
                v = Val("psum", base, tuple(job.free), (1,), "float32", name)
            job.dest = SlotDest(v.base, "float32", v.strides, "psum", v.name)
            self.run_job(job, env)
            return v
        if job.reduce is not None:
            return None
        if len(job.free) == 1 and self.reads_row(job) and (
                self.long_row(ext[job.free[0]]) or not self.psum_row_fits(ext[job.free[0]])):
            return self.blocked_map(job, env, ext, depth)
        home, self.home = self.home, depth
        try:
            v = self.eval(job, job.value, env, ext, job.free,
                          odt=self.tensors[job.dest.tensor].dtype)
        finally:
            self.home = home
        at = next((x[4] for x in self.live if x[3] == getattr(v, "name", None)), None)
        if (isinstance(v, Val) and v.mem == "sbuf" and v.deps == tuple(job.free) and at is not None
                and at <= depth and v.dtype == self.tensors[job.dest.tensor].dtype):
            return v
        out = self.tile(P, job.free, ext, self.tensors[job.dest.tensor].dtype,
                        f"{job.stage}_sb", env, depth=depth)
        self.copy_into(v, self.ap(out, P, job.free, ext), job.free, ext, P, env)
        return out

    def long_row(self, n: int) -> bool:
        """Is a float32 row of n elements too long to keep in PSUM (see kept_tile)?"""
        banks = -(-n * ITEMSIZE["float32"] // self.spec.psum_bank_bytes)
        return banks > 1 and (n > self.spec.max_free_elems_psum or banks > ROW_PSUM_BANKS)

    def psum_row_fits(self, n: int) -> bool:
        """Is there room in PSUM now for a float32 row of n elements (whole banks)?"""
        bank = self.spec.psum_bank_bytes
        banks = -(-n * ITEMSIZE["float32"] // bank)
        return self.place("psum", banks * bank, bank) is not None

    def reads_row(self, job: Job) -> bool:
        """Does the elementwise `job` read an on-chip contraction along its free row, and no
        other on-chip producer (a row statistic would need the whole row first)?"""
        from .ir import loads  # noqa: PLC0415
        (f,) = job.free
        found = False
        for ld in loads(job.value):
            p = self.stage_of_tensor.get(ld.tensor)
            if p is None or p.name not in self.attached:
                continue
            if not (self.sched.state.get(p.name).tensorized and any(ix.coef(f) for ix in ld.index)):
                return False
            found = True
        return found

    def blocked_map(self, job: Job, env: Env, ext, depth: int) -> Val:
        """A loop-free elementwise producer over a long row that reads a contraction row
        (causal logits min(S, mask) over thousands of keys, or a row PSUM has no room
        for): evaluated one PSUM bank of columns at a time, each block of the contraction
        kept in a PSUM bank (two rotate) and read there directly, the top instruction
        writing the block of the row (SBUF, kept at `depth`): the contraction row never
        goes to SBUF and the block's temporaries stay small."""
        P = ext[job.part]
        (f,) = job.free
        n = ext[f]
        dtype = self.tensors[job.dest.tensor].dtype
        blk = min(self.spec.psum_bank_bytes // ITEMSIZE["float32"], self.spec.matmul_max_n)
        out = self.tile(P, job.free, ext, dtype, f"{job.stage}_sb", env, depth=depth)
        b = self.fresh(f"{f}_blk")
        value = _subst(job.value, {f: Affine.make({f: 1, b: blk})})
        blocked = dataclasses.replace(job, value=value, hooks={})
        nb, tail = divmod(n, blk)

        def block(e, width):
            e.ext[f] = width
            with self.level():
                dst = Val("sbuf", out.base + e.lin[b].scale(blk * ITEMSIZE[dtype]), (f,), (1,),
                          dtype, out.name)
                saved = self.keep, self.home, self.block, self.into
                self.keep, self.home = len(self.memo) - 1, None
                self.block, self.into = (b, blk, n), (dst, self.eval_depth + 1)
                try:
                    v = self.eval(blocked, value, e, e.ext, [f], odt=dtype)
                finally:
                    self.keep, self.home, self.block, self.into = saved
                if v is not dst:      # (the top instruction wrote the row directly)
                    self.copy_into(v, self.ap(dst, P, [f], e.ext), [f], e.ext, P, e)
        # loads the blocks share (the query tile) are loaded once, before the block loop
        mark = ("__cache__", "*")
        self.memo[-1][mark] = self.cache_mark(env)
        try:
            self.blocks(b, f, nb, tail, blk, env, block)
        finally:
            del self.memo[-1][mark]
        return out

    def block_row(self, job: Job, env: Env):
        """Inside a block of blocked_map: the contraction block's moving operand (keys) as a
        slice of the whole row when a cache_read holds that row (see cached_row)."""
        b, blk, n = self.block
        mv = job.ops[1]
        (f,) = job.free
        if not any(ix.coef(b) for ix in mv.index) or len(job.free) != 1:
            return
        full = dataclasses.replace(mv, index=tuple(ix.substitute({b: Affine.constant(0)})
                                                  for ix in mv.index))
        ext = self.tile_ext(job, env)
        row = self.cached_row(job, env, full, {**ext, f: n})
        if row is None:
            return
        self.row_slice(row, job, mv, env, ext, b, blk)

    def row_slice(self, row: Val, job: Job, mv: Load, env: Env, ext, b: str, blk: int):
        """Block b (of blk columns) of a cached row: the tile the contraction's moving
        operand `mv` reads in this block (memo of this level)."""
        deps = tuple(d for d in job.free if any(ix.coef(d) for ix in mv.index))
        off = env.lin[b].scale(blk * row.strides[0] * ITEMSIZE[row.dtype])
        x = Val(row.mem, row.base + off, row.deps, row.strides, row.dtype, row.name)
        self.memo[-1][self.operand_key(mv, job.contract, deps, env, ext)] = \
            lambda e_, d, x=x: x.with_deps(d)

    def blocks(self, b: str, f: str, nb: int, tail: int, blk: int, env: Env, block):
        """block(env, width) for each block of `blk` columns of free atom f: an ISA loop b
        over the whole blocks (two slots for what a block allocates), then the tail."""
        if nb > 1:
            e = env.bind(b, Lin.var(b), **{f: blk})
            e.loops = env.loops + (b,)
            e.pipe = {**env.pipe, b: 2}
            self.loop(b, nb, lambda: block(e, blk))
        elif nb == 1:
            block(env.bind(b, Lin(0), **{f: blk}), blk)
        if tail:
            block(env.bind(b, Lin(nb), **{f: tail}), tail)

    def blocked_row(self, job: Job, env: Env, ext, depth: int) -> Val | None:
        """A loop-free contraction row too long to keep in PSUM (a query tile's scores
        against thousands of keys): kept in SBUF (float32), computed one PSUM bank of
        columns at a time -- matmuls into a bank (two banks rotate, so the next block's
        matmuls overlap this block's copy out), then one copy into the row. None when the
        row does not fit in SBUF (evaluate the usual way)."""
        P = ext[job.part]
        (f,) = job.free
        n = ext[f]
        blk = min(self.spec.psum_bank_bytes // ITEMSIZE["float32"], self.spec.matmul_max_n)
        if n * ITEMSIZE["float32"] > self.spec.sbuf_partition_bytes // 4:
            return None
        out = self.tile(P, job.free, ext, "float32", f"{job.stage}_sb", env, depth=depth)
        b = self.fresh(f"{f}_blk")
        m = {f: Affine.make({f: 1, b: blk})}
        ops = tuple(_subst(ld, m) for ld in job.ops)
        blocked = dataclasses.replace(job, value=_subst(job.value, m), ops=ops, hooks={})
        # the stationary operand (the query tile) once, outside the blocks; the moving one
        # (keys) sliced per block out of a whole row when a cache_read holds that
        self.operand(blocked, ops[0], job.contract, [job.part], env, self.tile_ext(blocked, env))
        row = self.cached_row(job, env)
        nb, tail = divmod(n, blk)

        def block(e, width):
            e.ext[f] = width
            with self.level():
                if row is not None:
                    self.row_slice(row, job, ops[1], e, self.tile_ext(blocked, e), b, blk)
                ps = self.tile(P, (f,), e.ext, "float32", f"{job.stage}_ps", e, mem="psum")
                blocked.dest = SlotDest(ps.base, "float32", ps.strides, "psum", ps.name)
                blocked.direct = False
                self.run_job(blocked, e)
                dst = Val("sbuf", out.base + e.lin[b].scale(blk * ITEMSIZE["float32"]), (f,),
                          (1,), "float32", out.name)
                self.emit_balanced(isa.Instr.make("tensor_copy", "act", self.ap(dst, P, [f], e.ext),
                                                  (self.ap(ps, P, [f], e.ext),)))
        self.blocks(b, f, nb, tail, blk, env, block)
        return out

    def cached_row(self, job: Job, env: Env, mv: Load | None = None, ext=None) -> Val | None:
        """The moving operand of a loop-free contraction over its whole free row (`mv` over
        `ext`, default: the job's) when it is (or can be, see cached_load) held by a
        cache_read at an enclosing loop; else None."""
        mv, ext = mv or job.ops[1], ext or self.tile_ext(job, env)
        deps = tuple(d for d in job.free if any(ix.coef(d) for ix in mv.index))
        if len(deps) != 1 or mv.tensor in self.stage_of_tensor:     # an input tensor's row
            return None
        key = self.operand_key(mv, job.contract, deps, env, ext)
        for m in reversed(self.memo):
            if key in m:
                return m[key](env, deps)
        hit = self.cached_load(mv, job.contract, deps, env, ext, key)
        if hit is None:
            return None
        v, level = hit
        v = v.with_key(key)
        self.memo[level][key] = lambda e, d, v=v: v.with_deps(d, v.key)
        return v

    # -- expression evaluation: instruction selection ---------------------------------------
    #
    # A tile expression becomes as few engine passes as the ISA allows (see docs/architecture.md,
    # "Instruction selection"): f(x * s + b) with per-partition s, b is one activation; x op s0
    # op s1 with per-partition / constant scalars is one tensor_scalar; a row reduction of
    # f(x * s + b) is the same activation with its free-axis reduce (reduce_op, dst2). Every
    # computed tile carries a value-numbering key, so a later stage computing the same
    # expression at the same loop iteration reuses the tile (loads are shared the same way).
    # Engines are picked by estimated load (emit_balanced).
    def eval(self, job: Job, e: Expr, env: Env, ext, dims, part=None, odt=None):
        """Evaluate `e` over the tile [part] + dims; a float, or a Val. `odt`: the dtype the
        top-level instruction writes (a store's dtype: rounding once, as a store does)."""
        self.eval_depth += 1
        try:
            return self.eval_expr(job, e, env, ext, dims, part, odt)
        finally:
            self.eval_depth -= 1

    def eval_expr(self, job: Job, e: Expr, env: Env, ext, dims, part=None, odt=None):
        part = part or job.part
        P = ext[part]
        if isinstance(e, Const):
            return float(e.value)
        if isinstance(e, Load):
            return self.operand(job, e, part, dims, env, ext)
        if isinstance(e, IndexValue):
            deps = tuple(f for f in dims if e.index.coef(f))
            base = self.split_affine(Affine(tuple((v, c) for v, c in e.index.terms
                                                  if v not in dims and v != part), e.index.const), env)
            if any(t[2] for t in base.terms):
                raise TensorlangError("index values of multi-buffered loops are not supported")
            key = ("iota", base, e.index.coef(part), tuple(e.index.coef(f) for f in deps),
                   tuple(ext[d] for d in deps), P)       # value-numbered like computed tiles
            for m in reversed(self.memo):
                if key in m:
                    return m[key](env, deps)
            iota = dict(base=base.addr(), pcoef=e.index.coef(part),
                        fcoefs=tuple(e.index.coef(f) for f in deps))
            out = self.hoisted_iota(key, P, deps, ext, iota) if not base.terms else None
            if out is not None:
                return out
            out = self.tile(P, deps, ext, "float32", "iota", env, depth=self.home)
            out.key = key
            self.emit(isa.Instr.make("iota", "pool", self.ap(out, P, list(deps), ext), **iota))
            self.memo[-1 if self.home is None else self.home][key] = \
                lambda e_, d, v=out: v.with_deps(d, v.key)
            return out
        if isinstance(e, Cast):
            a = self.eval(job, e.a, env, ext, dims, part)
            if isinstance(a, float):
                return float(np.asarray(a, np.float32).astype(np_dtype(e.dtype)).astype(np.float32))
            return self.compute("tensor_copy", a.deps, (a,), {}, e.dtype, P, env, ext)
        if isinstance(e, Binary) and e.op == "mul" and e.a == e.b:
            e = Unary("square", e.a)              # x * x is square(x), bit for bit
        if isinstance(e, Unary):
            x, s, b = self.affine_form(job, e.a, env, ext, dims, part)
            if isinstance(x, float):
                from sim.funcs import ACT  # noqa: PLC0415
                return float(ACT[e.op](np.array([x], np.float32))[0])
            return self.activation(e.op, x, s, b, P, env, ext, odt)
        if isinstance(e, (Binary, Compare)):
            return self.binop(job, e, env, ext, dims, part, odt)
        if isinstance(e, Select):
            c = self.eval(job, e.cond, env, ext, dims, part)
            a = self.eval(job, e.a, env, ext, dims, part)
            b = self.eval(job, e.b, env, ext, dims, part)
            if isinstance(c, float):
                return a if c != 0.0 else b
            ops = tuple(x if isinstance(x, Val) else self.const_tile(x, P, env) for x in (c, a, b))
            deps = tuple(f for f in dims if any(f in x.deps for x in ops))
            return self.compute("select", deps, ops, {}, odt or "float32", P, env, ext)
        raise TypeError(e)

    def scalar_valued(self, e: Expr, dims) -> bool:
        """Does `e` take one value per partition over the tile (no free-axis dependence)?"""
        return not (expr_vars(e) & set(dims))

    def affine_form(self, job, e: Expr, env, ext, dims, part):
        """(x, scale, bias) with e == x * scale + bias evaluated in that order; scale / bias
        are None, floats or per-partition [P,1] Vals (folded into one activation)."""
        if isinstance(e, (Binary,)) and e.op in ("add", "sub", "mul"):
            sa, sb = self.scalar_valued(e.a, dims), self.scalar_valued(e.b, dims)
            if sb and (not sa or isinstance(e.b, Const) and not isinstance(e.a, Const)):
                x, s, b = self.affine_form(job, e.a, env, ext, dims, part)
                if e.op == "mul" and s is None and b is None:
                    return x, self.eval(job, e.b, env, ext, dims, part), None
                if e.op in ("add", "sub") and b is None:
                    c = self.eval(job, e.b, env, ext, dims, part)
                    return x, s, (self.negate(c, env, ext, part) if e.op == "sub" else c)
            elif sa and not sb and e.op in ("add", "mul"):
                return self.affine_form(job, Binary(e.op, e.b, e.a), env, ext, dims, part)
        return self.eval(job, e, env, ext, dims, part), None, None

    def negate(self, c, env, ext, part):
        if isinstance(c, float):
            return -c
        return self.compute("tensor_scalar", (), (c,), {"op0": "mul", "scalar0": -1.0},
                            "float32", ext[part], env, ext)

    def activation(self, func, x: Val, s, b, P, env, ext, odt=None, reduce=None):
        """func(x * s + b) in one activation; with `reduce` = (op, dst2 AP, acc attrs) the
        free-axis reduction of the result goes to dst2 in the same instruction."""
        if not x.deps and isinstance(s, (float, type(None))) and isinstance(b, (float, type(None))):
            # a [P,1] value: plain passes -- except f(x * s + b) with both constants, one
            # activation (layernorm's rsqrt(ssq / N + eps): one dependent step less)
            if s in (None, 1.0) or b in (None, 0.0):
                x = self.binary("mul", x, s, env, ext, [], P) if s is not None else x
                x = self.binary("add", x, b, env, ext, [], P) if b is not None else x
                s = b = None
        srcs, attrs = [x], {"func": func}
        for k, v in (("scale", s), ("bias", b)):
            if isinstance(v, Val):
                srcs.append(v)
                attrs[k] = "ap"
            else:
                attrs[k] = 1.0 if v is None and k == "scale" else (0.0 if v is None else v)
        return self.compute("activation", x.deps, tuple(srcs), attrs, odt or "float32", P, env,
                            ext, reduce=reduce)

    def binop(self, job, e, env, ext, dims, part, odt):
        P = ext[part]
        if odt is not None and e.op == "add":
            v = self.prefilled_fma(job, e, env, ext, dims, part, odt)
            if v is not None:
                return v
        sa, sb = self.scalar_valued(e.a, dims), self.scalar_valued(e.b, dims)
        if sa != sb:
            # x op s (or s op x): one tensor_scalar, taking a second scalar op from x = y op0 s0
            rev1 = sa
            xe, s1e = (e.b, e.a) if sa else (e.a, e.b)
            s1 = self.eval(job, s1e, env, ext, dims, part)
            steps = [(e.op, s1, rev1)]
            if isinstance(xe, (Binary, Compare)) and not (isinstance(xe, Binary) and xe.op == "mul"
                                                          and xe.a == xe.b):
                ia, ib = self.scalar_valued(xe.a, dims), self.scalar_valued(xe.b, dims)
                if ia != ib:
                    ye, s0e = (xe.b, xe.a) if ia else (xe.a, xe.b)
                    s0 = self.eval(job, s0e, env, ext, dims, part)
                    if self.scalar_ok(s0) and self.scalar_ok(s1):
                        steps.insert(0, (xe.op, s0, ia))
                        xe = ye
            x = self.eval(job, xe, env, ext, dims, part)
            if isinstance(x, Val) and x.deps and all(self.scalar_ok(s) for _, s, _ in steps):
                return self.tensor_scalar(x, steps, P, env, ext, odt)
            y = x
            for op, s, rev in steps:      # scalar operands in PSUM: plain binary passes
                y = self.binary(op, s, y, env, ext, dims, P) if rev else \
                    self.binary(op, y, s, env, ext, dims, P)
            return y
        a = self.eval(job, e.a, env, ext, dims, part)
        b = self.eval(job, e.b, env, ext, dims, part)
        return self.binary(e.op, a, b, env, ext, dims, P, dst_dtype=odt or "float32")

    def prefilled_fma(self, job, e, env, ext, dims, part, odt):
        """A store's top `t * g + b` with g, b per-feature vectors (no partition index:
        layernorm's gamma, beta): the output tile is filled with b first (a copy that needs
        no row statistic, so an engine otherwise waiting on one does it early; b stays in
        SBUF so gpsimd can), then one tensor_tensor t * g accumulates into it (acc=add) -- one
        pass instead of a multiply and an add, the same float32 sum rounded once. None when
        `e` is not that (nothing emitted)."""
        def vec(x):
            return (isinstance(x, Load) and not any(ix.coef(part) for ix in x.index)
                    and set(dims) <= {v for ix in x.index for v, c in ix.terms if c})
        for m, be in ((e.a, e.b), (e.b, e.a)):
            if isinstance(m, Binary) and m.op == "mul" and vec(be) and (vec(m.a) or vec(m.b)):
                break
        else:
            return None
        ge, te = (m.b, m.a) if vec(m.b) else (m.a, m.b)
        if self.scalar_valued(te, dims) or not (self.tensors[be.tensor].dtype == odt
                                                or odt == "float32"):
            return None
        P = ext[part]
        self.bc_sbuf = True
        try:
            b = self.eval(job, be, env, ext, dims, part)
        finally:
            self.bc_sbuf = False
        g = self.eval(job, ge, env, ext, dims, part)
        out = self.tile(P, tuple(dims), ext, odt, "fma", env)
        dst = self.ap(out, P, list(dims), ext)
        self.emit_balanced(isa.Instr.make("tensor_copy", "pool", dst, (self.ap(b, P, list(dims), ext),)))
        t = self.eval(job, te, env, ext, dims, part)
        if isinstance(t, float):
            t = self.const_tile(t, P, env)
        self.emit_balanced(isa.Instr.make("tensor_tensor", "dve", dst,
                                          (self.ap(t, P, list(dims), ext),
                                           self.ap(g, P, list(dims), ext)), op="mul", acc="add"))
        return out

    @staticmethod
    def scalar_ok(s) -> bool:
        return isinstance(s, float) or (isinstance(s, Val) and not s.deps and s.mem == "sbuf")

    def tensor_scalar(self, x: Val, steps, P, env, ext, odt=None):
        srcs, attrs = [x], {}
        for k, (op, s, rev) in enumerate(steps):
            attrs[f"op{k}"] = op
            attrs[f"reverse{k}"] = bool(rev)
            if isinstance(s, Val):
                srcs.append(s)
                attrs[f"scalar{k}"] = "ap"
            else:
                attrs[f"scalar{k}"] = s
        return self.compute("tensor_scalar", x.deps, tuple(srcs), attrs, odt or "float32", P,
                            env, ext)

    def compute(self, op, deps, srcs, attrs, dtype, P, env, ext, reduce=None) -> Val:
        """Emit one compute instruction writing a new [P, deps] tile of `dtype` (or reuse the
        tile of an earlier identical one: value numbering). srcs[0] (and every src with free
        dims) is read over `deps`; sources without free dims are [P,1] operands."""
        keys = tuple(s.key for s in srcs)
        key = None
        if all(k is not None for k in keys):
            key = ("v", op, tuple(sorted(attrs.items())), keys, dtype,
                   tuple(ext[d] for d in deps), P)
            for m in reversed(self.memo):
                if key in m:
                    v = m[key](env, deps)
                    if reduce is None:
                        return v
                    break        # the reduce still has to be computed (from the kept tile)
            else:
                v = None
            if v is not None:    # reduce over a tile already computed
                op_r, dst2, acc = reduce
                self.emit_balanced(isa.Instr.make(
                    "tensor_reduce", "dve", dst2, (self.ap(v, P, list(deps), ext),),
                    op=op_r, **acc))
                return v
        home = self.home if key is not None else None
        if reduce is not None and attrs.get("func") not in self.home_funcs:
            home = None          # a reduction's elementwise result no consumer recomputes
        if home is not None:     # keep only what fits easily (a kept tile outlives its stage)
            n = ITEMSIZE[dtype]
            for d in deps:
                n *= ext[d]
            # (in a transposed fill, a row whose function its consumer computes again is
            # kept when it fits: the consumer would otherwise need a tile as large)
            again = reduce is not None and self.keep is not None
            if self.used("sbuf") + (n if again else 2 * n) > self.spec.sbuf_partition_bytes // (
                    1 if again else 2):
                home = None
        name = {"activation": attrs.get("func"), "tensor_scalar": attrs.get("op0"),
                "tensor_tensor": attrs.get("op"), "tensor_copy": "cast"}.get(op, op)
        if reduce is not None and home is None:
            # only the reduction is used: one slot, not multi-buffered (rewritten by the same
            # in-order engine each iteration, read by nobody)
            env = Env(dict(env.lin), dict(env.ext), env.loops, {})
        into = self.into
        if (into is not None and into[1] == self.eval_depth and reduce is None
                and into[0].dtype == dtype and into[0].deps == tuple(deps)):
            out, self.into = into[0], None      # the caller's destination (see blocked_map)
        else:
            out = self.tile(P, deps, ext, dtype, name, env, depth=home)
        out.key = key
        dst = self.ap(out, P, list(deps), ext)
        full = 1 if op in ("activation", "tensor_scalar") else len(srcs)   # then [P,1] scalars
        aps = tuple(self.ap(s, P, list(deps) if k < full else [], ext)
                    for k, s in enumerate(srcs))
        if reduce is not None:
            op_r, dst2, acc = reduce
            self.emit(isa.Instr.make(op, "act", dst, aps, dst2=dst2, reduce_op=op_r, **attrs,
                                     **acc))
        else:
            self.emit_balanced(isa.Instr.make(op, "act" if op == "activation" else "dve", dst,
                                              aps, **attrs))
        if key is not None:
            self.memo[-1 if home is None else home][key] = \
                lambda e, d, v=out: v.with_deps(d, v.key)
        return out

    def const_tile(self, value: float, P: int, env) -> Val:
        key = ("__const__", value, P)
        for m in reversed(self.memo):
            if key in m:
                return m[key](env, ())
        v = self.tile(P, (), {}, "float32", "const", env)
        v.key = key
        self.emit(isa.Instr.make("memset", "dve", self.ap(v, P, [], {}), value=float(value)))
        self.memo[-1][key] = lambda e, d, v=v: v
        return v

    def binary(self, op, a, b, env, ext, dims, P, dst_dtype="float32"):
        if isinstance(a, float) and isinstance(b, float):
            from sim.funcs import ALU  # noqa: PLC0415
            return float(ALU[op](np.float32(a), np.float32(b)))
        if isinstance(a, float) or isinstance(b, float):
            x, c, rev = (b, a, True) if isinstance(a, float) else (a, b, False)
            return self.tensor_scalar(x, [(op, c, rev)], P, env, ext, dst_dtype)
        deps = tuple(f for f in dims if f in a.deps or f in b.deps)
        if (not a.deps or not b.deps) and deps and a.mem == "sbuf" and b.mem == "sbuf":
            x, s, rev = (b, a, True) if not a.deps else (a, b, False)
            return self.tensor_scalar(x, [(op, s, rev)], P, env, ext, dst_dtype)
        return self.compute("tensor_tensor", deps, (a, b), {"op": op}, dst_dtype, P, env, ext)

    # -- engine selection -------------------------------------------------------------------------
    def engines_for(self, ins: isa.Instr) -> list[str]:
        ok = [e for e in isa.OPS[ins.op][0] if e in COMPUTE_ENGINES]
        aps = (ins.dst,) + ins.srcs + ((ins.dst2,) if ins.dst2 is not None else ())
        if any(a.mem == "psum" for a in aps) or (self.spec.dve_pool_share_sbuf and "dve" in ok):
            ok = [e for e in ok if e != "pool"] or ok
        return ok

    def emit_balanced(self, ins: isa.Instr):
        """Emit `ins` on the engine (of those that can run it) that keeps the busiest engine
        least loaded (loads: issue intervals x loop trips, from the timing model's cost
        rules); a wide elementwise instruction is split along its outermost free dimension
        over several engines when one engine would otherwise be busier than SPLIT_BUSY of
        the kernel's HBM time and the split lowers the peak by SPLIT_MIN_GAIN. The first
        lowering pass sees the load so far; the second (see lower()) the projected load of
        the whole program from the first, minus this instruction's own share."""
        engines = self.engines_for(ins)
        trips = self.trips[-1]
        if ins.dst.free_size == 1 and not (self.streams and ins.srcs[0].free_size > 1):
            # a [P,1] statistic step follows its operand's engine: streams are in order, so
            # on another engine it would wait behind that engine's wide work of the tile
            near = [e for e in engines if any(self.writer.get(a.name) == e for a in ins.srcs)]
            engines = near or engines
        # an engine that computed an earlier step of this iteration which reached this
        # instruction through another engine would wait here for that engine, and its next
        # iteration's early steps would queue behind it (in-order streams): avoid it
        bid = id(self.body[1]) if len(self.body) > 1 else self.peel_bid
        seen = [(self.writer.get(a.name), self.anc[a.name][1]) for a in ins.srcs
                if bid is not None and self.anc.get(a.name, (None,))[0] == bid]
        free = [e for e in engines if not any(e in anc and w != e for w, anc in seen)]
        if not self.streams:
            engines = free or engines

        iis = {}    # (id(instr), engine) -> (instr on engine, instr (keeps the id), ii ps)

        def on(i, e):
            k = (id(i), e)
            hit = iis.get(k)
            if hit is None:
                ie = i if i.engine == e else isa.Instr(i.op, e, i.dst, i.srcs, i.attrs, i.dst2)
                hit = iis[k] = (ie, i, instr_cost(ie, self.spec).ii_ps)
            return hit

        def cost(i, e):
            return on(i, e)[2] * trips
        k = self.ncall
        self.ncall += 1
        # the loops balance among themselves: a peeled iteration's (fill, drain) one-off
        # load would skew their steady state; a peeled iteration makes the choice its loop
        # made for the same instruction (the last one, see mirror), else balances against all
        peeled = self.peel_bid is not None
        if self.prior is None:
            base = {e: self.busy[e] + (self.busy_peel[e] if peeled else 0)
                    for e in COMPUTE_ENGINES}
        else:
            was = self.prior[k] if k < len(self.prior) else {}
            proj = self.proj_peel if peeled else self.proj
            base = {e: proj[e] - was.get(e, 0) + (self.proj[e] if peeled else 0)
                    for e in COMPUTE_ENGINES}

        def peak_of(plan):
            load = dict(base)
            for e, i in plan:
                load[e] += cost(i, e)
            return max(load.values()), sum(load[e] for e, _ in plan)
        plan = min(([(e, ins)] for e in engines),
                   key=lambda p: (*peak_of(p), COMPUTE_ENGINES.index(p[0][0])))
        own = base[plan[0][0]] + cost(ins, plan[0][0])
        key, same = _plan_key(ins), None
        if peeled and self.prior is not None:      # (second pass: the loads are projected)
            same = self.mirror(ins, self.plans.get(key), self.engines_for(ins))
        if same is not None:
            plan = same
        elif own > SPLIT_BUSY * self.hbm_ps:
            split = self.split_plan(ins, engines, cost, base)
            # (a transposed fill's one chain: its steps wait for each other, so a wide step
            # split over engines finishes sooner even at an equal peak load)
            if split is not None and (self.streams == 1 and ins.dst.free_size >= SPLIT_MIN_ELEMS
                                      or peak_of(split)[0] < peak_of(plan)[0] * (1 - SPLIT_MIN_GAIN)):
                plan = split
        if not peeled and self.trips[-1] > 1:
            self.plans[key] = tuple((e, i.dst.shape) for e, i in plan)
        mine = {}
        for e, i in plan:
            ie, _, ii = on(i, e)
            mine[e] = mine.get(e, 0) + ii * trips
            self.emit(ie, ii)
        self.decisions.append(mine)
        if self.prior is not None:
            for e in COMPUTE_ENGINES:
                proj[e] += mine.get(e, 0) - was.get(e, 0)

    def mirror(self, ins: isa.Instr, plan, engines):
        """`ins` cut and placed as `plan` ((engine, piece shape), ...: a loop's choice for the
        same instruction) did, or None when that plan does not fit it."""
        if not plan or any(e not in engines for e, _ in plan):
            return None
        if len(plan) == 1:
            return [(plan[0][0], ins)] if plan[0][1] == ins.dst.shape else None
        shape = ins.dst.shape
        d = next((k for k in range(1, len(shape)) if shape[k] > 1), None)
        if d is None or sum(sh[d] for _, sh in plan) != shape[d]:
            return None
        out, start = [], 0
        for e, sh in plan:
            k = sh[d]
            out.append((e, isa.Instr(ins.op, ins.engine, _slice_ap(ins.dst, d, start, k),
                                     tuple(_slice_ap(a, d, start, k) if a.shape == shape else a
                                           for a in ins.srcs), ins.attrs, ins.dst2)))
            start += k
        return out

    def split_plan(self, ins: isa.Instr, engines, cost, base):
        """[(engine, piece)]: `ins` split over 2+ engines so they finish together (from the
        loads `base`), pieces on dependency-granule boundaries; None when it cannot split."""
        if (len(engines) < 2 or ins.op not in ("tensor_tensor", "tensor_scalar", "tensor_copy")
                or ins.attr("acc") is not None or ins.dst.free_size < SPLIT_MIN_ELEMS):
            return None
        shape = ins.dst.shape
        if not all(a.shape == shape or (ins.op == "tensor_scalar" and k > 0)
                   for k, a in enumerate(ins.srcs)):
            return None
        d = next((k for k in range(1, len(shape)) if shape[k] > 1), None)
        if d is None:
            return None
        units = shape[d]
        step = 1       # units per piece boundary: no false WAW between pieces (pieces may
        a = ins.dst    # share a source granule: reads do not order them)
        if a.dims[d][0]:
            step = max(step, -(-self.spec.dep_granule_bytes // (abs(a.dims[d][0]) * a.itemsize)))
        n = units // step
        if n < 2:
            return None
        full = {e: cost(ins, e) for e in engines}
        best = None
        for r in range(2, len(engines) + 1):
            for subset in _subsets(engines, r):
                w = {e: full[e] / units * step for e in subset}      # load per `step` units
                t = (n + sum(base[e] / w[e] for e in subset)) / sum(1 / w[e] for e in subset)
                share = {e: int((t - base[e]) / w[e]) for e in subset}
                if any(k < 1 for k in share.values()):
                    continue
                for _ in range(n - sum(share.values())):
                    e = min(subset, key=lambda e: base[e] + (share[e] + 1) * w[e])
                    share[e] += 1
                share = {e: k * step for e, k in share.items()}
                share[subset[-1]] += units - n * step
                plan, start = [], 0
                for e in subset:
                    k = share[e]
                    piece = isa.Instr(
                        ins.op, ins.engine, _slice_ap(ins.dst, d, start, k),
                        tuple(_slice_ap(a, d, start, k) if a.shape == shape else a
                              for a in ins.srcs), ins.attrs, ins.dst2)
                    plan.append((e, piece))
                    start += k
                peak = max(base[e] + cost(i, e) for e, i in plan)
                if best is None or peak < best[0]:
                    best = (peak, plan)
        return None if best is None else best[1]

    # -- the tile --------------------------------------------------------------------------------
    def reset_on(self, job: Job, env: Env):
        """(acc, reset_on) for accumulating over the reduction loops inside the acc level."""
        red = [u for u in job.loops[job.acc_level:] if job.kind[u] == "reduce"]
        if not red:
            return None, None
        names = []
        for u in red:
            lv = env.lin[u]
            if lv.terms:
                names.append(lv.terms[0][0])
            elif lv.const != 0:
                return "acc", None  # never the first iteration: always accumulate
        if not names:
            return None, None       # the only iteration: overwrite
        return "acc", tuple(names)

    def emit_tile(self, job: Job, env: Env):
        ext = self.tile_ext(job, env)
        P = ext[job.part]
        acc_mode, reset = self.reset_on(job, env)
        if job.contract:
            return self.emit_matmul(job, env, ext, acc_mode, reset)
        if job.reduce is None:
            if "__acc__" in env.lin:
                odt = env.lin["__acc__"][3]
            elif isinstance(job.dest, SlotDest):
                odt = job.dest.dtype
            else:
                odt = self.tensors[job.dest.tensor].dtype
            v = self.eval(job, job.value, env, ext, job.free, odt=odt)
            if "__acc__" in env.lin:
                dst = self.ap(self.acc_val(job, env), P, job.free, ext)
                self.copy_into(v, dst, job.free, ext, P, env)
            else:
                self.write_dest(job, v, env, ext)
            return
        dims = job.free + job.red_free
        attrs = {}
        if acc_mode:
            attrs["acc"] = job.reduce
            if reset is not None:
                attrs["reset_on"] = reset
        acc_ap = self.ap(self.acc_val(job, env), P, job.free, ext)
        if job.red_free and self.row_reduce(job, env, ext, dims, P, acc_ap, attrs):
            return
        if self.scaled_acc(job, env, ext, P, acc_ap, attrs):
            return
        v = self.eval(job, job.value, env, ext, dims)
        if isinstance(v, float):
            v = self.const_tile(v, P, env)
        self.emit_balanced(isa.Instr.make("tensor_reduce", "dve", acc_ap,
                                          (self.ap(v, P, dims, ext),), op=job.reduce, **attrs))

    def row_reduce(self, job: Job, env: Env, ext, dims, P, acc_ap, attrs) -> bool:
        """A reduction of each partition's row into [P,1], in one pass where the ISA allows:
        a plain load -> tensor_reduce (bf16 twice as fast); f(x * s + b) -> the activation
        with its fused free-axis reduce. A constant factor of a sum is applied to the [P,1]
        result (sum(v * c) = c * sum(v), to float32 rounding). With spatial free dims (a
        [P, free] result, e.g. a reduction over axis 0 with several partition tiles side by
        side) only a plain load, times a constant. False: not such a reduction."""
        e, c = job.value, None
        if job.reduce == "add" and isinstance(e, Binary) and e.op == "mul":
            if isinstance(e.b, Const):
                e, c = e.a, float(e.b.value)
            elif isinstance(e.a, Const):
                e, c = e.b, float(e.a.value)
        if self.scalar_valued(e, dims) or (job.free and not isinstance(e, Load)):
            return False        # spatial free dims too ([P, free] results): plain loads only
        if isinstance(e, Binary) and e.op == "mul" and e.a == e.b:
            e = Unary("square", e.a)
        if c is None:
            dst2, red_attrs = acc_ap, attrs
        else:
            tmp = self.tile(P, tuple(job.free), ext, "float32", f"{job.stage}_part", env)
            dst2, red_attrs = self.ap(tmp, P, list(job.free), ext), {}
        if isinstance(e, Unary):
            x, s, b = self.affine_form(job, e.a, env, ext, dims, job.part)
            func = e.op
        else:
            x, s, b = self.affine_form(job, e, env, ext, dims, job.part)
            func = "copy"
        if not isinstance(x, Val) or x.deps != tuple(dims):
            if func != "copy" or s is not None or b is not None:
                x = self.activation(func, x, s, b, P, env, ext) if isinstance(x, Val) else x
            if isinstance(x, float):
                x = self.const_tile(x, P, env)
            self.emit_balanced(isa.Instr.make("tensor_reduce", "dve", dst2,
                                              (self.ap(x, P, dims, ext),), op=job.reduce,
                                              **red_attrs))
        elif func == "copy" and s is None and b is None:
            self.emit_balanced(isa.Instr.make("tensor_reduce", "dve", dst2,
                                              (self.ap(x, P, dims, ext),), op=job.reduce,
                                              **red_attrs))
        else:
            self.activation(func, x, s, b, P, env, ext, reduce=(job.reduce, dst2, red_attrs))
        if c is not None:
            eng = self.writer.get(dst2.name, "dve")

            def put(i):     # a [P, free] statistic stays on its reduce's engine, as a [P,1]
                if not job.free or eng not in self.engines_for(i):   # one does (emit_balanced;
                    return self.emit_balanced(i)                     # also: pool cannot PSUM)
                self.emit(isa.Instr(i.op, eng, i.dst, i.srcs, i.attrs, i.dst2))
            ts = isa.Instr.make("tensor_scalar", "dve", acc_ap if not attrs else dst2, (dst2,),
                                op0="mul", scalar0=c)
            put(ts)
            if attrs:
                put(isa.Instr.make("tensor_reduce", "dve", acc_ap, (dst2,), op="add", **attrs))
        return True

    def scaled_acc(self, job: Job, env: Env, ext, P, acc_ap, attrs) -> bool:
        """A sum of x * s, s per-partition ([P,1], e.g. a depthwise convolution's tap weight),
        over reduction loops: one accumulating pass per iteration instead of a product tile
        and a reduce -- an activation with the scale operand on act, a tensor_tensor with s
        broadcast along the free axes on dve / pool, and on the tensor engine a matmul with
        the diagonal matrix diag(s) accumulating in PSUM (see diag_rows). The tile is cut
        into pieces over the engines in proportion to their rates, the same cut in every
        iteration, so each engine accumulates its own part. False: not that shape."""
        e, dims = job.value, list(job.free)
        if job.reduce != "add" or job.red_free or not isinstance(e, Binary) or e.op != "mul":
            return False
        sa, sb = self.scalar_valued(e.a, dims), self.scalar_valued(e.b, dims)
        if sa == sb or not isinstance(e.b if sa else e.a, Load):
            return False
        s = self.eval(job, e.a if sa else e.b, env, ext, dims)
        if not isinstance(s, Val) or not self.scalar_ok(s):
            return False
        x = self.eval(job, e.b if sa else e.a, env, ext, dims)
        if not isinstance(x, Val) or x.deps != tuple(dims):
            return False
        xa, sap = self.ap(x, P, dims, ext), self.ap(s, P, [], ext)

        def on(eng, d, xs):
            if eng == "act":
                return isa.Instr.make("activation", "act", d, (xs, sap), func="copy",
                                      scale="ap", bias=0.0, **attrs)
            bc = dataclasses.replace(sap, dims=(sap.dims[0],) + tuple((0, n) for _, n in
                                                                      d.dims[1:]))
            return isa.Instr.make("tensor_tensor", eng, d, (xs, bc), op="mul", **attrs)
        free = acc_ap.dims[1:]
        R, C = (1, free[0][1]) if len(free) == 1 else (free[0][1], free[1][1])
        clip = self.clipped.get(x.name)
        if len(free) > 2 or free[-1][0] != 1 or (len(free) == 2 and free[0][0] != C):
            if clip is not None:
                raise TensorlangError(f"internal: the clipped box {x.name!r} is read by a "
                                      f"{len(free)}-dim / strided tile of {job.stage!r}")
            self.emit(on("act", acc_ap, xa))
            return True
        engines = [e for e in COMPUTE_ENGINES
                   if e == "act" or e in self.engines_for(on("dve", acc_ap, xa))]
        t = {e: instr_cost(on(e, acc_ap, xa), self.spec).ii_ps / (R * C) for e in engines}
        base = {e: 0.0 for e in engines}
        cols, zero = (0, C), []
        if clip is not None:    # the box holds the source's columns only (_clip_dim)
            cols = self.clip_cols(job, e.b if sa else e.a, clip, env, C)
            if "acc" not in attrs or "reset_on" in attrs:
                # the resetting pass does not reach the other columns: zero them first,
                # before the reduction loops (the passes after it accumulate)
                k = sum(1 for u in env.loops if job.kind.get(u) == "reduce")
                zero = [(self.body[-1 - k], c0, c1 - c0)
                        for c0, c1 in ((0, cols[0]), (cols[1], C)) if c1 > c0]
        for at, c0, nc in zero:
            at.append(isa.Instr.make("memset", "pool", _rect_ap(acc_ap, 0, R, c0, nc),
                                     value=0.0))
        rows = self.diag_rows(job, env, P, acc_ap, xa, s, attrs, t, base, R, C, cols, zero)
        E, a0 = R * C, rows * C
        # the rest over the vector engines: all finish a pass together (act may also move the
        # tensor engine's rows out of PSUM once per tile: its `base`)
        T = (E - a0 + sum(base[e] / t[e] for e in engines)) / sum(1 / t[e] for e in engines)
        gran, size, off = self.spec.dep_granule_bytes, acc_ap.itemsize, acc_ap.offset.base
        cuts, want = [a0], float(a0)
        for e in engines[:-1]:
            want += max(0.0, (T - base[e]) / t[e])
            at = (round((off + want * size) / gran) * gran - off) // size   # granule boundary
            cuts.append(min(E, max(cuts[-1], at)))
        cuts.append(E)
        for eng, a, b in zip(engines, cuts, cuts[1:]):
            for r0, nr, c0, nc in _flat_rects(a, b, C):
                c0, c1 = max(c0, cols[0]), min(c0 + nc, cols[1])
                if c1 > c0:
                    self.emit(on(eng, _rect_ap(acc_ap, r0, nr, c0, c1 - c0),
                                 _rect_ap(xa, r0, nr, c0, c1 - c0)))
        return True

    def clip_cols(self, job: Job, ld: Load, clip, env: Env, C: int) -> tuple:
        """The output columns [lo, hi) whose read of `ld` falls inside the padded range the
        clipped box holds (clip = (dim, a, b)); the other terms of that index are fixed
        here (unrolled taps)."""
        d, a, b = clip
        ix, f = ld.index[d], job.free[-1]
        sf = ix.coef(f)
        rest = self.split_affine(Affine(tuple((v, c) for v, c in ix.terms if v != f), ix.const),
                                 env)
        if rest.terms or sf < 1:
            raise TensorlangError(f"internal: clipped read {ld.tensor}[{ix}] of a box is not "
                                  f"fixed per tap here")
        lo, hi = -(-(a - rest.const) // sf), -(-(b - rest.const) // sf)
        return max(0, min(C, lo)), max(0, min(C, hi))

    def diag_rows(self, job: Job, env: Env, P, acc_ap, xa, s: Val, attrs, t, base, R, C,
                  cols=None, zero=()) -> int:
        """The first rows of a scaled_acc tile on the tensor engine: per iteration, diag(s)
        (iota == 0 times s: one tensor_scalar into a per-tap slot) as the stationary
        operand and the window rows as the moving one, accumulating in PSUM banks allocated
        at the acc level; store_tile copies them into the acc tile (act) before the store.
        Rows in proportion to the rates (`t`: ps per element per pass; the copy goes into
        `base`). 0 when the tensor engine cannot take them (dtypes, widths, PSUM room)."""
        spec = self.spec
        red = [u for u in job.loops[job.acc_level:] if job.kind[u] == "reduce"]
        dt = xa.dtype
        level = next((x[4] for x in self.live if x[3] == acc_ap.name), None)
        rows_mm = min(spec.matmul_max_n, spec.psum_bank_bytes // 4) // C
        if (not red or level is None or dt not in spec.pe_rate or s.dtype != dt or rows_mm < 1
                or P > min(spec.pe_rows, spec.pe_cols) or acc_ap.mem != "sbuf"
                or any(ss.tensorized for ss in self.sched.state.stages)):
            return 0
        nom = {u: self.nominal(job, u, env) for u in red}
        nt = math.prod(nom.values())
        key = (acc_ap.name, acc_ap.offset)
        st = self.diag_acc.get(key)
        if st is None:
            mm_rows = min(rows_mm, R)
            probe = isa.Instr.make("matmul", "pe", isa.AP("psum", "", "float32", isa.Addr(0),
                                                         ((1, P), (1, mm_rows * C))),
                                   (isa.AP("sbuf", "", dt, isa.Addr(0), ((1, P), (1, P))),
                                    _rect_ap(xa, 0, mm_rows, 0, C)))
            t_pe = instr_cost(probe, spec).ii_ps / (mm_rows * C)
            cp = isa.Instr.make("tensor_copy", "act", _rect_ap(acc_ap, 0, mm_rows, 0, C),
                                (probe.dst,))
            depth = next((env.pipe[v] for v in reversed(env.loops) if env.pipe.get(v, 1) > 1), 1)
            if depth == 1 and self.peel_bid is not None:   # a peeled iteration of a pipelined
                depth = job.pipe.get(self.peel_bid[1], 1)  # loop: PSUM for its slots too
            free = (spec.psum_partition_bytes - self.used("psum")) // spec.psum_bank_bytes

            def plan(t_cp):        # rows for the tensor engine when act also copies them
                inv = sum(1 / t[e] for e in t) + 1 / t_pe - t_cp / (t_pe * t["act"])
                n = min(R, int(R * C / inv / t_pe / C))
                return min(n, min(-(-n // rows_mm), free // depth) * rows_mm)
            t_cp = instr_cost(cp, spec).ii_ps / (mm_rows * C) / nt
            rows, direct = plan(t_cp), False
            if self.diag_direct(job) and R * C >= DIAG_DIRECT_ELEMS:
                # stored straight from PSUM by one DMA: k banks of nr rows each (store_tile),
                # as near the planned rows as they come, when they keep most of them
                want = plan(0.0)
                k, nr = min(((k, nr) for nr in range(1, rows_mm + 1)
                             for k in range(1, free // depth + 1) if k * nr <= R),
                            key=lambda kn: (abs(kn[0] * kn[1] - want), -kn[0] * kn[1]),
                            default=(0, 0))
                if k * nr >= DIAG_DIRECT_KEEP * want:
                    rows, direct, t_cp, rows_mm = k * nr, True, 0.0, nr
            if rows * C < 2 * P:    # diag(s) per pass ([P, P] on a vector engine) would
                rows = 0            # cost about what the tensor engine takes off them
            if rows < 1:
                self.diag_acc[key] = st = (0,)
            else:
                banks = -(-rows // rows_mm)
                ps, psname = self.alloc_banks(banks, f"{job.stage}_pe", env, level=level)
                db, dname = self.alloc("sbuf", nt * P * ITEMSIZE[dt], f"{job.stage}_diag", env,
                                       depth=level)
                chunks = [(r0, min(rows_mm, rows - r0)) for r0 in range(0, rows, rows_mm)]
                outs = [isa.AP("psum", psname, "float32",
                               (ps + k * spec.psum_bank_bytes).addr(), ((1, P), (1, nr * C)))
                        for k, (_, nr) in enumerate(chunks)]
                self.diag_out[key] = (rows, chunks, outs) if direct else [
                    isa.Instr.make("tensor_copy", "act", _rect_ap(acc_ap, r0, nr, 0, C), (o,))
                    for (r0, nr), o in zip(chunks, outs)]
                self.diag_acc[key] = st = (rows, chunks, outs, db, dname, t_cp * nt)
        if st[0] == 0:
            return 0
        rows, chunks, outs, db, dname, t_cp = st
        base["act"] += rows * C * t_cp / nt
        tap, k = Lin(0), 1
        for u in reversed(red):
            tap, k = tap + env.lin[u].scale(k), k * nom[u]
        d = isa.AP("sbuf", dname, dt, (db + tap.scale(P * ITEMSIZE[dt])).addr(), ((1, P), (1, P)))
        self.emit_balanced(isa.Instr.make("tensor_scalar", "dve", d, (self.diag_iota(P), self.ap(
            s, P, [], {})), op0="eq", scalar0=0.0, reverse0=False, op1="mul", scalar1="ap",
            reverse1=False))
        c0, c1 = cols or (0, C)
        for (r0, nr), o in zip(chunks, outs):
            grid = dataclasses.replace(o, dims=((1, P), (C, nr), (1, C)))
            for at, z0, nz in zero:        # PSUM columns the resetting pass does not reach
                at.append(isa.Instr.make("memset", "dve", _rect_ap(grid, 0, nr, z0, nz),
                                         value=0.0))
            if c1 > c0:
                self.emit(isa.Instr.make("matmul", "pe", _rect_ap(grid, 0, nr, c0, c1 - c0),
                                         (d, _rect_ap(xa, r0, nr, c0, c1 - c0)), **attrs))
        return rows

    def diag_direct(self, job: Job) -> bool:
        """Are the tensor engine's rows of a scaled_acc tile stored straight from PSUM (an
        fp32 HBM output of a [rows, cols] tile with nothing to add) instead of copied into
        the acc tile first (act)?"""
        return (isinstance(job.dest, HbmDest) and job.init is None and len(job.free) == 2
                and self.tensors[job.dest.tensor].dtype == "float32")

    def hoisted_iota(self, key, P: int, deps, ext, iota) -> Val | None:
        """An index tile that no loop changes (attention's causal mask of a query tile whose
        offset is static: a head's few query tiles filled together) computed once, before
        the job's loops, where it fits in at most HOIST_IOTA_FRACTION of an SBUF partition
        (with the job's other hoisted index tiles); None: computed in place."""
        if len(self.memo) < 2:
            return None
        n = ITEMSIZE["float32"]
        for d in deps:
            n *= ext[d]
        held = sum(b.size for b in self.buffers if b.name.startswith("iota_job"))
        if held + n > HOIST_IOTA_FRACTION * self.spec.sbuf_partition_bytes:
            return None
        try:
            out = self.iota_before_loops("iota_job", P, deps, ext, iota)
        except TensorlangError:
            return None
        out.key = key
        self.memo[1][key] = lambda e_, d, v=out: v.with_deps(d, v.key)
        return out

    def iota_before_loops(self, name: str, P: int, deps, ext, iota: dict) -> Val:
        """An iota tile [P, deps] emitted once at the job's top level, before its loops
        (TensorlangError when it does not fit there)."""
        body, trips, self.body, self.trips = self.body, self.trips, self.body[:1], [1]
        self.hoisting = True
        try:
            out = self.tile(P, deps, ext, "float32", name, Env({}, {}), depth=1)
            self.hoisting = False
            self.emit(isa.Instr.make("iota", "pool", self.ap(out, P, list(deps), ext), **iota))
        finally:
            self.body, self.trips, self.hoisting = body, trips, False
        return out

    def diag_iota(self, P: int) -> isa.AP:
        """[P, P] float32 p - f (zero on the diagonal), once per job before its loops."""
        key = ("__diag_iota__", P)
        if key not in self.memo[1]:
            v = self.iota_before_loops("diag_iota", P, ("__f",), {"__f": P},
                                       dict(base=0, pcoef=1, fcoefs=(-1,)))
            self.memo[1][key] = self.ap(v, P, ["__f"], {"__f": P})
        return self.memo[1][key]

    def emit_matmul(self, job: Job, env: Env, ext, acc_mode, reset):
        st_ld, mv_ld = job.ops
        K, M = ext[job.contract], ext[job.part]
        stat = self.operand(job, st_ld, job.contract, [job.part], env, ext)
        mov = self.operand(job, mv_ld, job.contract, job.free, env, ext)
        stat, mov = self.mm_dtype(job, stat, K, [job.part], env, ext), \
            self.mm_dtype(job, mov, K, job.free, env, ext)
        acc = self.acc_val(job, env)
        attrs = {}
        if acc_mode:
            attrs["acc"] = "add"
            if reset is not None:
                attrs["reset_on"] = reset
        dst, mv = self.ap(acc, M, job.free, ext), self.ap(mov, K, job.free, ext)
        N, n_max = dst.free_size, self.spec.matmul_max_n
        # a one-dimensional tile wider than a matmul (an accumulator over several PSUM banks,
        # see kept_tile): one matmul per bank-sized piece
        pieces = [(0, N)] if N <= n_max or len(job.free) != 1 else \
            [(c, min(n_max, N - c)) for c in range(0, N, n_max)]
        for c, n in pieces:
            if len(pieces) > 1:
                dst_c, mv_c = _slice_ap(dst, 1, c, n), _slice_ap(mv, 1, c, n)
            else:
                dst_c, mv_c = dst, mv
            self.emit(isa.Instr.make("matmul", "pe", dst_c,
                                     (self.ap(stat, K, [job.part], ext), mv_c), **attrs))

    def mm_dtype(self, job, v: Val, K, dims, env, ext) -> Val:
        want = job.mm_dtype
        if v.dtype == want:
            return v
        out = self.tile(K, v.deps, ext, want, "mmcast", env)
        self.emit_balanced(isa.Instr.make("tensor_copy", "dve", self.ap(out, K, list(v.deps), ext),
                                          (self.ap(v, K, list(v.deps), ext),)))
        return out


def _flat_rects(a: int, b: int, C: int) -> list:
    """Elements [a, b) of a row-major [*, C] block as (row, rows, col, cols) rectangles: a
    partial first row, whole rows, a partial last row."""
    out = []
    r, c = divmod(a, C)
    if c and a < b:
        n = min(C - c, b - a)
        out.append((r, 1, c, n))
        a, r = a + n, r + 1
    if b - a >= C:
        out.append((r, (b - a) // C, 0, C))
        r, a = r + (b - a) // C, a + (b - a) // C * C
    if a < b:
        out.append((r, 1, 0, b - a))
    return out


def _rect_ap(ap: isa.AP, r0: int, nr: int, c0: int, nc: int) -> isa.AP:
    """Rows [r0, r0+nr) x columns [c0, c0+nc) of a [P, rows, cols] (or [P, cols]) AP."""
    if len(ap.dims) == 2:
        return _slice_ap(ap, 1, c0, nc)
    return _slice_ap(_slice_ap(ap, 1, r0, nr), 2, c0, nc)


def _plan_key(ins: isa.Instr) -> tuple:
    """An instruction up to its buffers' copies (x, x_1, ...: the same tile in another
    iteration): what a peeled iteration looks its loop's engine choice up by."""
    def base(a):
        return (a.name.rsplit("_", 1)[0] if a.name.rsplit("_", 1)[-1].isdigit() else a.name,
                a.mem, a.shape)
    return (ins.op, ins.attrs, base(ins.dst), tuple(base(a) for a in ins.srcs))


def _subsets(items, r):
    from itertools import combinations  # noqa: PLC0415
    return combinations(items, r)


# ----------------------------------------------------------------------------------------
# building jobs from stages


def _expand_fused(v: str, fused: dict) -> list[str]:
    """The loops a (possibly fused) loop v stands for, outer first (fused: var -> Fuse)."""
    f = fused.get(v)
    if f is None:
        return [v]
    return _expand_fused(f.outer, fused) + _expand_fused(f.inner, fused)


def _split_strides(v: str, s: int, split_by_parent: dict, out: dict) -> dict:
    """out[atom] = stride of each leaf of v's split tree (v itself weighing s)."""
    sp = split_by_parent.get(v)
    if sp is not None:
        _split_strides(sp.outer, s * sp.factor, split_by_parent, out)
        _split_strides(sp.inner, s, split_by_parent, out)
    else:
        out[v] = s
    return out


def atoms_of(ss: StageSched) -> tuple[list[str], dict[str, Split], dict[str, int]]:
    """Loop order with fused loops expanded, split relations by child, root extents."""
    fused = {r.fused: r for r in ss.relations if isinstance(r, Fuse)}
    order = [a for v in ss.order for a in _expand_fused(v, fused)]
    split_of = {}
    for r in ss.relations:
        if isinstance(r, Split):
            split_of[r.outer] = r
            split_of[r.inner] = r
    derived = set(split_of) | set(fused)
    roots = {v.name: v.extent for v in ss.vars if v.name not in derived}
    return order, split_of, roots


def make_job(lw: Lowerer, st: Stage, ss: StageSched, ren: dict[str, str] | None,
             spatial_map: dict | None = None, part: str | None = None,
             free: list | None = None) -> Job:
    """A job for `st`. Root jobs use the stage's own atoms; a producer computed inside a
    consumer (`spatial_map` given) has its spatial axes replaced by the consumer's index
    expressions and keeps only its reduction loops (renamed through `ren`)."""
    order, split_of, roots = atoms_of(ss)
    kinds = {v.name: v.kind for v in ss.vars}
    ren = ren or {}
    split_by_parent, fuse_of = {}, {}
    for x in reversed(ss.relations):              # the first relation of each var wins
        if isinstance(x, Split):
            split_by_parent[x.parent] = x
        elif isinstance(x, Fuse):
            fuse_of[x.fused] = x

    def r(v):
        return ren.get(v, v)

    m: dict[str, Affine] = dict(spatial_map or {})
    for a in st.axes + st.reduce_axes:
        if a.name in m:
            continue
        # atom -> its stride in the root (root = sum of stride * atom over its split tree)
        strides = _split_strides(a.name, 1, split_by_parent, {})
        terms = {r(atom): s for atom, s in strides.items()}
        m[a.name] = Affine.make(terms)
    value = _subst(st.value, m)
    init = _subst(st.init, m) if st.init is not None else None
    if isinstance(init, Const) and st.reduce and init.value == REDUCE_IDENTITY[st.reduce]:
        init = None
    def atoms(v):  # a fused loop is its component loops (outer first)
        return _expand_fused(v, fuse_of)
    tile = {a for v in ss.tile_vars() for a in atoms(v)}
    vec = [a for v in ss.vectorized for a in atoms(v)]
    if spatial_map is not None:
        loops = [r(a) for a in order if kinds[a] == "reduce" and a not in tile]
        job_part, job_free = part, list(free)
    else:
        loops = [r(a) for a in order if a not in tile]
        job_part, job_free = r(ss.partition), [r(v) for v in vec if kinds[v] == "spatial"]
    red_free = [r(v) for v in vec if kinds[v] == "reduce"]
    kind = {r(v): k for v, k in kinds.items()}
    first_red = next((i for i, u in enumerate(loops) if kind[u] == "reduce"), len(loops))
    acc_level = first_red
    acc_mem = "psum" if ss.tensorized else "sbuf"
    if ss.cache_write:
        acc_mem = ss.cache_write[0]
        if ss.cache_write[1] is not None and spatial_map is None:
            at = r(atoms(ss.cache_write[1])[-1])
            if at not in loops:
                raise TensorlangError(f"cache_write of {st.name!r}: {at!r} is a tile loop")
            lvl = loops.index(at) + 1
            if lvl > first_red:
                raise TensorlangError(f"cache_write of {st.name!r} at {at!r}: inside the reduction "
                                      f"loop {loops[first_red]!r}; the accumulator must cover it")
            acc_level = lvl
    if st.reduce is None and not (ss.cache_write and ss.cache_write[1]):
        acc_level = len(loops)
    t = lw.tensors[st.tensor]
    if ren:                 # one renamed Split per split (its outer and inner share it)
        new = {id(s): Split(r(s.parent), r(s.outer), r(s.inner), s.factor, s.tail)
               for s in split_of.values()}
        split_of = {r(k): new[id(s)] for k, s in split_of.items()}
    job = Job(
        stage=st.name, value=value, reduce=st.reduce, init=init, loops=loops, kind=kind,
        split_of=split_of,
        root_ext={r(k): v for k, v in roots.items() if spatial_map is None or kinds[k] == "reduce"},
        part=job_part, free=job_free, red_free=red_free,
        contract=r(ss.tensorized) if ss.tensorized else None,
        acc_level=acc_level, acc_mem=acc_mem,
        dest=HbmDest(st.tensor, st.index if spatial_map is not None else
                     tuple(ix.substitute(m) for ix in st.index)),
        out_dtype=t.dtype,
        pipe={r(atoms(v)[-1]): d for v, d in ss.pipelined},   # a fused loop rotates per inner step
        unroll={r(a) for v in ss.unrolled for a in atoms(v)},
    )
    if ss.tensorized:
        a, b = matmul_operands(dataclasses.replace(st, value=value))
        pa = any(ix.coef(job.part) for ix in a.index)
        pb = any(ix.coef(job.part) for ix in b.index)
        fa = any(ix.coef(f) for ix in a.index for f in job.free)
        fb = any(ix.coef(f) for ix in b.index for f in job.free)
        if (pa and fa) or (pb and fb) or (pa and pb):
            where = ""
            if spatial_map is not None:
                c, at = lw.attached[st.name]
                where = (f" computed at {c}.{at}, whose tile (partition {job.part!r}, vectorized "
                         f"{', '.join(job.free) or 'none'}) is its layout")
            raise TensorlangError(f"tensorize {st.name!r}{where}: an operand depends on both the "
                                  "partition loop and a vectorized loop (or both operands on the "
                                  "partition loop); a matmul needs [K,M] x [K,N] operands", st.loc)
        job.ops = (a, b) if (pa or fb) and not (pb or fa) else (b, a)
        dts = [lw.tensors[x.tensor].dtype for x in (a, b)]
        job.mm_dtype = dts[0] if dts[0] == dts[1] else max(dts, key=lambda d: ITEMSIZE[d])
    return job


# ----------------------------------------------------------------------------------------
# program assembly


def lower(sched: Schedule, spec) -> tuple[isa.Program, Program]:
    spec = sim.machine(spec)
    sched = complete(sched, spec)
    prog = inline_stages(sched.prog, sched)
    prog, pads = pad_tensors(prog)
    _check_attachments(prog, sched)
    # two passes: the second picks engines against the first pass's projected loads
    lw = _lower_jobs(prog, sched, spec, pads, None)
    if lw.decisions:
        first = lw
        lw = _lower_jobs(prog, sched, spec, pads,
                         (lw.decisions, lw.busy, lw.psum_peak, lw.busy_peel))
        first.close()
    tensors = []
    for t in prog.inputs:
        tensors.append(isa.TensorDecl(t.name, t.shape, t.dtype, "input"))
    for t in prog.outputs:
        tensors.append(isa.TensorDecl(t.name, t.shape, t.dtype, "output"))
    attached = {sched.prog.stage(ss.stage).tensor for ss in sched.state.stages if ss.attach}
    for t in prog.temps:
        if t.name not in attached and t.name not in lw.unfilled:
            tensors.append(isa.TensorDecl(t.name, t.shape, t.dtype, "scratch"))
    body = assign_queues(tuple(lw.body[0]), spec)
    out = isa.Program(prog.name, tuple(tensors), body, tuple(lw.buffers))
    lw.close()
    return out, prog


def _lower_jobs(prog: Program, sched: Schedule, spec, pads, prior) -> "Lowerer":
    """Lower every root stage (its attached producers inside) into a fresh Lowerer."""
    lw = Lowerer(prog, sched, spec, prior)
    lw.pads = {name: (t, v, shape, lo) for t, v, name, shape, lo in pads}
    pad_by_src = {}
    for t, v, name, shape, lo in pads:
        pad_by_src.setdefault(t, []).append((v, name, shape, lo))
    filled = set()
    for st in prog.stages:
        ss = sched.state.get(st.name)
        if ss.attach:
            continue
        inside = [p for p in prog.stages   # stages computed inside this one read from HBM too
                  if sched.state.get(p.name).attach and sched.state.get(p.name).attach[0] == st.name]
        fills = {}              # pad copy -> (body, buffers) before its fill
        for ld in [ld for x in (st, *inside) for ld in x.reads()]:
            for t, v, name, shape, lo in pads:
                if ld.tensor == name and name not in filled:
                    fills[name] = (len(lw.body[-1]), len(lw.buffers))
                    fill_padded(lw, t, v, name, shape, lo)
                    filled.add(name)
        job = make_job(lw, st, ss, None)
        add_hooks(lw, job, st, sched)
        lw.job_buf0, lw.job_top = len(lw.buffers), len(lw.body[0])
        with lw.level():
            lw.run_job(job, Env({}, {}))
        job.hooks.clear()       # its closures refer to the job: break the cycle (else: GC)
        for name, (at, nbuf) in reversed(fills.items()):
            if name not in lw.hbm_reads:  # padded on chip (see _pad_on_chip): no HBM copy
                fill = lw.body[-1][at:]
                n_fill = next(k for k, i in enumerate(fill) if isinstance(i, isa.Instr)
                              and i.op == "dma" and i.dst.mem == "hbm" and i.srcs[0].mem == "hbm")
                del lw.body[-1][at:at + n_fill + 1]
                bufs = {i.dst.name for i in fill[:n_fill] if isinstance(i, isa.Instr)}
                lw.buffers[nbuf:] = [b for b in lw.buffers[nbuf:] if b.name not in bufs]
                filled.discard(name)
                lw.unfilled.add(name)
    return lw


def _pe_waits(fill, rest) -> bool:
    """The consumer nodes `rest` use the PE and the fill's PE work (e.g. transposes)
    follows vector / scalar work (e.g. a normalisation): in program order the PE would idle
    for that work after the consumer (Lowerer.fill_ahead moves it ahead)."""
    if not any(i.engine == "pe" for i, _ in isa.walk_instrs(tuple(rest))):
        return False
    work = False
    for node in fill:
        for i, _ in isa.walk_instrs((node,)):
            if i.engine == "pe":
                return work
            work = work or i.op != "dma"
    return False


def _rotation(env: Env):
    """(loop, slots) a buffer allocated here rotates over: the innermost enclosing loop with
    a pipeline depth, when that depth is 2 or more (a depth of 1 on a spatial loop inside a
    pipelined loop keeps what that inner loop allocates single-buffered, also when it runs
    once or unrolled: env.pipe[SINGLE] then counts the ISA loops outside it; on a reduction
    loop a depth of 1 only keeps it a loop: Lowerer.bind_loop does not record it); None: one
    slot."""
    for k in range(len(env.loops) - 1, env.pipe.get(SINGLE, 0) - 1, -1):
        v = env.loops[k]
        if v in env.pipe:
            return (v, env.pipe[v]) if env.pipe[v] > 1 else None
    return None


def _check_attachments(prog: Program, sched: Schedule):
    for ss in sched.state.stages:
        if not ss.attach:
            continue
        st = prog.stage(ss.stage)
        target = ss.attach[0]
        if sched.state.get(target).attach:
            raise TensorlangError(f"compute_at {ss.stage!r} at {target}.{ss.attach[1]}: {target!r} is "
                                  "itself computed at another stage; attach to a root stage")
        if prog.tensors[st.tensor].kind == "output":
            raise TensorlangError(f"compute_at {ss.stage!r}: {st.tensor!r} is a kernel output; "
                                  "outputs are computed by their own loop nest")
        for c in prog.consumers(st.tensor):
            cs = sched.state.get(c.name)
            if c.name != target and not (cs.attach and cs.attach[0] == target):
                raise TensorlangError(
                    f"compute_at {ss.stage!r} at {target}.{ss.attach[1]}: stage {c.name!r} also reads "
                    f"{st.tensor!r} but is not computed inside {target!r}")
            for ld in c.reads():
                if ld.tensor == st.tensor and ld.pad is not None:
                    raise TensorlangError(f"compute_at {ss.stage!r}: {c.name!r} reads it with padding")


def add_hooks(lw: Lowerer, job: Job, st: Stage, sched: Schedule):
    """Hoisted work at a loop of a root job: cache_read fills and compute_at producers."""
    ss = sched.state.get(st.name)
    order, _, _ = atoms_of(ss)
    fused = {r.fused: r for r in ss.relations if isinstance(r, Fuse)}

    def atom(v):
        while v in fused:
            v = fused[v].inner
        return v

    for c in sched.state.cache_reads:
        if c.stage == st.name:
            at = atom(c.at)
            padded = [n for n, p in lw.pads.items() if p[0] == c.tensor]  # X.pad(v) reads
            direct = _reads(job, c.tensor) or any(_reads(job, n) for n in padded)
            hook = hoist if direct else _attached_cache
            job.hooks.setdefault(at, []).append(
                lambda env, c=c, at=at, hook=hook: hook(lw, job, c.tensor, at, env, producer=None))
    for ps in sched.state.stages:
        if ps.attach and ps.attach[0] == st.name:
            at = atom(ps.attach[1])
            p = lw.prog.stage(ps.stage)  # the program with inlined stages substituted
            job.hooks.setdefault(at, []).append(
                lambda env, p=p, at=at: hoist(lw, job, p.tensor, at, env, producer=p))


def _attached_cache(lw: Lowerer, job: Job, tensor: str, at: str, env: Env, producer=None):
    """A cache_read at loop `at` of a tensor that only stages computed inside the job read
    (attention's K, read by the scores of every query tile): marks this loop level, so each
    tile of `tensor` those stages load whose address depends only on the loops enclosing
    `at` is loaded once per iteration of `at` (emitted before the inner loops, kept at this
    level; see Lowerer.cached_load) instead of once per inner iteration."""
    lw.memo[-1][("__cache__", tensor)] = lw.cache_mark(env)


def _reads(job: Job, tensor: str) -> list[Load]:
    from .ir import loads  # noqa: PLC0415
    out = loads(job.value) + (loads(job.init) if job.init is not None else [])
    seen = []
    for ld in out:
        if ld.tensor == tensor and ld not in seen:
            seen.append(ld)
    return seen


def hoist(lw: Lowerer, job: Job, tensor: str, at: str, env: Env, producer):
    """At loop `at` of `job`: fill a buffer with every tile of `tensor` that the job's tiles
    read inside `at` (one slot per iteration of the inner loops the read depends on), by DMA
    (cache_read) or by evaluating the producer there (compute_at). `at` None: at the start
    of the job, outside all its loops."""
    k = job.loops.index(at) + 1 if at is not None else 0
    inner = job.loops[k:]
    padded = [n for n, p in lw.pads.items() if p[0] == tensor]   # X.pad(v)[...] reads X_pad
    for ld in _reads(job, tensor) + [ld for n in padded for ld in _reads(job, n)]:
        if job.contract:
            a, b = job.ops
            if ld == a:
                part, dims = job.contract, [job.part]
            elif ld == b:
                part, dims = job.contract, list(job.free)
            else:
                part, dims = job.part, list(job.free)
        else:
            part, dims = job.part, list(job.free) + (job.red_free if ld in _loads_of(job.value) else [])
        deps = tuple(f for f in dims if any(ix.coef(f) for ix in ld.index))
        slots = [u for u in inner if any(ix.coef(u) for ix in ld.index)]
        used = [a for a in (part, *deps) if any(ix.coef(a) for ix in ld.index)]
        tailed = {job.split_of[a].outer for a in used if a in job.split_of
                  and job.split_of[a].inner == a and job.split_of[a].tail}
        slots += [u for u in inner if u in tailed and u not in slots]
        slots = [u for u in inner if u in slots]
        nom = {u: lw.nominal(job, u, env) for u in slots + [part, *deps]}
        per = 1
        for d in deps:
            per *= nom[d]
        dtype = lw.tensors[tensor].dtype
        nslots = 1
        for u in slots:
            nslots *= nom[u]
        what = (f"cache_read of {tensor!r} at {job.stage}.{at}" if producer is None else
                f"compute_at of {producer.name!r} at {job.stage}.{at}")
        if _box_fill(lw, job, ld, part, deps, slots, nom, nslots * per, env, what, producer):
            continue
        if producer is not None and _epilogue_ok(lw, job, tensor, at, slots) and _matmul_fill(
                lw, job, ld, producer, at, part, deps, slots, nom, None, lw.memo[-1], env):
            continue
        base, bname = lw.alloc("sbuf", nslots * per * ITEMSIZE[dtype], f"{tensor}_cache", env,
                               what)
        slot_stride, s = {}, per
        for u in reversed(slots):
            slot_stride[u] = s
            s *= nom[u]
        strides, n = [], 1
        for d in reversed(deps):
            strides.append(n)
            n *= nom[d]
        strides = tuple(reversed(strides))

        def slot_val(e, d=deps, base=base, bname=bname, slot_stride=slot_stride,
                     strides=strides, dtype=dtype):
            b = base
            for u, st_ in slot_stride.items():
                b = b + e.lin[u].scale(st_ * ITEMSIZE[dtype])
            return Val("sbuf", b, tuple(d), strides, dtype, bname)
        memo = lw.memo[-1]
        home = len(lw.memo) - 1 if not slots else None
        if producer is not None and _transposed_fill(lw, job, ld, producer, part, deps, slots,
                                                     nom, slot_val, memo, env):
            continue
        if producer is None and _staged_fill(lw, job, ld, part, deps, slots, nom, slot_val, memo,
                                             env):
            continue
        if producer is not None and _matmul_fill(lw, job, ld, producer, at, part, deps, slots,
                                                 nom, slot_val, memo, env):
            continue

        # slots whose rows are shorter than a run's DMA overhead (a depthwise conv's [C, KH,
        # KW] weights: one element per tap) share cells: slot by slot, transfers on
        # different queues would wait for each other's writes, each mostly overhead; one
        # transfer fills every slot. Each slot's tile is then
        # found by the access pattern the consumer reads it with (see operand_key): a loop
        # binds the slot atom to its variable, plus its first iterations' count when they are
        # peeled (Lowerer.bind_loop), a peeled or unrolled iteration to a constant
        binds = [[Lin(c) for c in range(nom[u])]
                 + ([] if u in job.unroll else [Lin.var(u) + k for k in range(PEEL_FIRST + 1)])
                 for u in slots]
        if (producer is None and slots and not tailed and part in used
                and per * ITEMSIZE[dtype] < lw.spec.dma_chunk_overhead_bytes
                and not any(u in job.split_of and job.split_of[u].tail for u in slots)
                and math.prod(map(len, binds)) <= MAX_SLOT_KEYS):
            ext = dict(env.ext)
            for a_ in (part, *deps, *slots):
                ext[a_] = nom[a_] if a_ in slots or a_ not in used else lw.ext_of(job, a_, env)
            box = Val("sbuf", base, (*slots, *deps),
                      (*(slot_stride[u] for u in slots), *strides), dtype, bname)
            with lw.level():
                lw.dma(lw.ap(box, ext[part], [*slots, *deps], ext),
                       lw.hbm_ap(ld.tensor, ld.index, part, [*slots, *deps], env, ext))
            for vals in itertools.product(*binds):
                e = env
                for u, val in zip(slots, vals):
                    e = e.bind(u, val)
                ext2 = dict(e.ext)
                for a_ in (part, *deps):
                    ext2[a_] = lw.ext_of(job, a_, e) if a_ in used else nom[a_]
                memo[lw.operand_key(ld, part, deps, e, ext2)] = slot_val
            continue

        def fill(e, i=0):
            if i < len(slots):
                lw.bind_loop(job, slots[i], e, lambda e2: fill(e2, i + 1))
                return
            ext = dict(e.ext)
            for a_ in (part, *deps):  # a broadcast partition: fill every row it can have
                ext[a_] = lw.ext_of(job, a_, e) if a_ in used else nom[a_]
            into = slot_val(e)
            memo[lw.operand_key(ld, part, deps, e, ext)] = slot_val
            with lw.level():
                if producer is None:
                    lw.load(ld, part, deps, e, ext, ext[part], into=into)
                else:
                    lw.virtual(producer, ld, part, deps, e, ext, into=into, home=home)
        fill(env)


def _staged_fill(lw: Lowerer, job: Job, ld: Load, part: str, deps, slots, nom, slot_val, memo,
                 env: Env) -> bool:
    """A cache_read of a transposed operand (see Lowerer.transposing) filled with few large
    DMAs: for each iteration of the slot loops that move across rows, the rows of every slot
    along the contiguous direction are loaded at once into a staging tile [F x span], then
    each slot is transposed out of it. Returns False (nothing emitted) when the fill does not
    have that shape; the caller then fills slot by slot.
    The partition loop need not be the contiguous one: when the slot loops inside its stride
    tile the row (conv weights [O, C, KH, KW] read as [c, o] per tap: c strides by KH*KW, the
    taps fill the gaps), the row is still loaded whole and each slot transposes a strided
    view of it."""
    fl = lw.flat(ld.tensor, ld.index)
    if len(deps) != 1 or fl.coef(part) < 1:
        return False
    f = deps[0]
    if not (abs(fl.coef(f)) > 1 and 1 < nom[part] and nom[f] <= lw.spec.partitions
            and nom[part] * 4 <= lw.spec.psum_bank_bytes):   # Lowerer.transposing, any stride
        return False
    for u in (part, f, *slots):
        sp = job.split_of.get(u)
        if sp is not None and sp.tail:
            return False
    row, span = [], 1           # the contiguous chain of part and slot loops, from stride 1
    for u in sorted((part, *slots), key=lambda u: fl.coef(u)):
        if fl.coef(u) == span:
            row.append(u)
            span *= nom[u]
    if part not in row:
        return False
    row.remove(part)
    dtype = lw.tensors[ld.tensor].dtype
    if not row or span * ITEMSIZE[dtype] > lw.spec.sbuf_partition_bytes // 8:
        return False
    row = [u for u in slots if u in row]          # keep the schedule's loop order, but an
    even = [u for u in row if nom[u] % 2 == 0]   # even loop innermost (copies pair up, below)
    if even and nom[row[-1]] % 2:
        row = [u for u in row if u != even[-1]] + [even[-1]]
    outer = [u for u in slots if u not in row]
    coef = {u: fl.coef(u) for u in row}

    def stage(e, i=0):
        if i < len(outer):
            lw.bind_loop(job, outer[i], e, lambda e2: stage(e2, i + 1))
            return
        ext = dict(e.ext)
        for a in (part, f):
            ext[a] = lw.ext_of(job, a, e)
        F = ext[f]
        with lw.level():
            es = Env(dict(e.lin), dict(e.ext), e.loops, dict(e.pipe))
            if outer and e.loops and e.loops[-1] == outer[-1]:
                # a staging slot per iteration of the innermost outer loop when they fit
                # (the next block's rows then load while this block computes), else two
                n_o = lw.nominal(job, outer[-1], e)
                fit_all = n_o * span * ITEMSIZE[dtype] <= lw.spec.sbuf_partition_bytes // 4
                es.pipe[outer[-1]] = n_o if fit_all else 2
            base, bname = lw.alloc("sbuf", span * ITEMSIZE[dtype], f"{ld.tensor}_rows", es)
            skip = {f, part, *row}
            off = lw.split_affine(Affine(tuple((v, c) for v, c in fl.terms if v not in skip),
                                         fl.const), e)
            lw.dma(isa.AP("sbuf", bname, dtype, base.addr(), ((1, F), (1, span))),
                   isa.AP("hbm", ld.tensor, dtype, off.addr(), ((fl.coef(f), F), (1, span))))

            def each(e2, j=0):
                u = row[j]
                n_u = lw.nominal(job, u, e2)
                if j < len(row) - 1 or n_u < 2 or n_u % 2:
                    if j < len(row) - 1:
                        lw.bind_loop(job, u, e2, lambda e3: each(e3, j + 1))
                    else:
                        lw.bind_loop(job, u, e2, lambda e3: leaf(e3, "act", u, n_u))
                    return
                # the innermost row loop, unrolled by 2: the PSUM -> SBUF copies alternate
                # between the scalar and vector engines (one engine alone bounds the fill).
                # Each engine's transposes rotate over [P x F] fp32 tiles packed several to a
                # PSUM bank (TRANSPOSE_PSUM_SLOTS banks in all, fewer when fewer are free):
                # the other banks stay free for the consumer's accumulators, so its matmuls
                # do not wait for these copies, and the copies' backlog (they are slower than
                # the transposes) drains behind the matmuls instead of stalling the PE.
                v2 = lw.fresh(f"{u}2")
                tb, bank = F * ITEMSIZE["float32"], lw.spec.psum_bank_bytes
                free = (lw.spec.psum_partition_bytes - lw.used("psum")) // bank
                banks = max(1, min(TRANSPOSE_PSUM_SLOTS, free) // 2) if bank % tb == 0 else 1
                per = min(banks * (bank // tb), n_u // 2)      # no tile across two banks
                rot = v2           # one pair: the tiles rotate over the next row loop out
                out_u = e2.lin.get(row[j - 1]) if n_u == 2 and j > 0 else None
                if out_u is not None and len(out_u.terms) == 1 and out_u.terms[0][1:] == (1, 0):
                    rot = out_u.terms[0][0]
                    per = min(banks * (bank // tb), lw.nominal(job, row[j - 1], e2))
                nb = -(-per * tb // bank)
                # a whole row in fewer banks than are free, inside a loop over the rows (the
                # staged row tiles): the ring also rotates over that loop (up to every free
                # bank), so the next row's transposes do not wait for this row's copies
                o = outer[-1] if outer and e2.loops and e2.loops[-1] == outer[-1] else None
                m = (max(1, min(free // (2 * nb), lw.nominal(job, o, e2)))
                     if o is not None and per == n_u // 2 else 1)
                ring = Env(e2.lin, e2.ext, e2.loops + (v2,), {v2: nb * m})
                with lw.level():
                    # at the top of PSUM when free there: the consumer's accumulators are
                    # placed from the bottom, and the first ones it uses wait for no copy
                    lw.cursor["psum"] = max(0, lw.spec.psum_partition_bytes - 2 * nb * m * bank)
                    rings = []
                    if m > 1:   # one block, the two engines' rings interleaved per row, so
                        # a row's first transposes take the banks the accumulators free first
                        rb, rn = lw.alloc("psum", bank, f"{bname}_T",
                                          Env(e2.lin, e2.ext, e2.loops + (v2,), {v2: 2 * nb * m}))
                        for k in range(2):
                            rings.append(Val("psum", Lin(rb.const + k * nb * bank)
                                             + Lin(0, ((v2, tb, per),))
                                             + Lin(0, ((o, 2 * nb * bank, m),)),
                                             (f,), (1,), "float32", rn))
                    for _ in range(2 if m == 1 else 0):   # bank-sized slots over v2: contiguous
                        rb, rn = lw.alloc("psum", bank, f"{bname}_T", ring)
                        rings.append(Val("psum", Lin(rb.const) + Lin(0, ((rot, tb, per),)), (f,),
                                         (1,), "float32", rn))

                    def pair():
                        for k, eng in enumerate(("act", "dve")):
                            e3 = Env(dict(e2.lin), dict(e2.ext), e2.loops + (v2,), dict(e2.pipe))
                            e3.lin[u] = Lin.var(v2).scale(2) + k
                            leaf(e3, eng, v2, n_u // 2, key_env=e2.bind(u, Lin.var(u)),
                                 ps=rings[k])
                    lw.loop(v2, n_u // 2, pair)

            def leaf(e2, engine, rot_var, rot_ext, key_env=None, ps=None):
                b = base
                for u in row:
                    b = b + e2.lin[u].scale(coef[u] * ITEMSIZE[dtype])
                nat = Val("sbuf", b, (part,), (fl.coef(part),), dtype, bname)
                ext2 = dict(ext)
                into = slot_val(e2)
                memo[lw.operand_key(ld, part, deps, key_env or e2, ext2)] = slot_val
                if ps is not None:   # into a tile of the fill's PSUM ring
                    P = ext2[part]
                    lw.emit(isa.Instr.make("transpose", "pe", lw.ap(ps, P, [f], ext2),
                                           (lw.ap(nat, ext2[f], [part], ext2),)))
                    lw.emit(isa.Instr.make("tensor_copy", engine, lw.ap(into, P, [f], ext2),
                                           (lw.ap(ps, P, [f], ext2),)))
                    return
                env_t = Env(dict(e2.lin), dict(e2.ext), e2.loops, dict(e2.pipe))
                if e2.loops and e2.loops[-1] == rot_var:   # rotate the PSUM tile over free banks
                    free = (lw.spec.psum_partition_bytes - lw.used("psum")) // lw.spec.psum_bank_bytes
                    n = min(TRANSPOSE_PSUM_SLOTS, free, rot_ext)
                    if n > 1:
                        env_t.pipe[rot_var] = n
                lw.transpose_into(nat, into, part, f, ext2, env_t, engine)
            each(e)
    stage(env)
    return True


def _epilogue_ok(lw: Lowerer, job: Job, tensor: str, at: str, slots) -> bool:
    """Whether root `job` can be computed tile by tile inside a _matmul_fill at loop `at`
    (slot_val None): every loop inside `at` is a slot loop (the producer's tile is the
    job's), with no hooks, the job reads the producer once, reduces nothing and has no other
    stage computed at it."""
    inner = job.loops[job.loops.index(at) + 1:]
    attached = [p for p, (c, _) in lw.attached.items() if c == job.stage]
    return (len(attached) == 1 and job.reduce is None and job.acc_level == len(job.loops) and inner == list(slots)
            and not any(job.hooks.get(u) for u in inner) and isinstance(job.dest, HbmDest)
            and len(_reads(job, tensor)) == 1)


def _matmul_fill(lw: Lowerer, job: Job, ld: Load, producer: Stage, at: str, part: str, deps,
                 slots, nom, slot_val, memo, env: Env) -> bool:
    """A tensorized producer computed at loop `at` of its consumer, over several slot loops
    (the consumer's column tiles jo and row tiles ioi inside `at`): one job over all slots
    instead of one per slot, laid out like a root matmul: the slot loops that index the moving
    operand outside the contraction loops, those indexing only the stationary one inside (an
    accumulator bank per inner slot), so each moving tile is loaded once per k step for all
    row tiles (filled at the outermost contraction loop), and a cache_read of the consumer at
    `at` of a tensor the producer reads is filled once at the job's start (the stationary rows
    of the block: one load and transpose per block, not per column tile). Each accumulator
    goes to its slot when its contraction ends (bias init applied there), while the next
    slots accumulate; with `slot_val` None (see _epilogue_ok) the consumer's tile is computed
    right there from the accumulator instead (the epilogue reads PSUM; no slot buffer) and
    the consumer's own loops inside `at` are not emitted. False: not such a fill (not
    tensorized, no slots, or a tail on an inner slot loop or with a slot buffer)."""
    ss = lw.sched.state.get(producer.name)
    if not ss.tensorized or not slots:
        return False
    axis_of_dim = [ix.terms[0][0] for ix in producer.index]
    m = {axis_of_dim[d]: ld.index[d] for d in range(len(ld.index))}
    ren = {v.name: lw.fresh(f"{producer.name}_{v.name}") for v in ss.vars if v.kind == "reduce"}
    pj = make_job(lw, producer, ss, ren, spatial_map=m, part=part, free=list(deps))
    st_ld, mv_ld = pj.ops

    def uses(op, u):
        return any(ix.coef(u) for ix in op.index)
    inner = [u for u in slots if uses(st_ld, u) and not uses(mv_ld, u)]
    outer = [u for u in slots if u not in inner]
    red = list(pj.loops)
    tailed = [sp for u in slots if (sp := job.split_of.get(u)) is not None and sp.tail]
    if not red or any(sp.outer not in outer for sp in tailed) or (
            tailed and slot_val is not None):
        return False        # a tail only on an outer slot loop, and with no slot buffer
    pj.loops = outer + red + inner
    pj.kind.update({u: "spatial" for u in slots})
    pj.root_ext.update({u: nom[u] for u in slots})
    for sp in tailed:       # bind_loop peels the tail iteration (the tile atom narrower)
        pj.split_of[sp.outer] = sp
        pj.root_ext[sp.parent] = lw.ext_of(job, sp.parent, env)
    pj.pipe.update({u: d for u, d in job.pipe.items() if u in slots})
    pj.acc_level = len(outer)
    ext = dict(env.ext)
    for a in (part, *deps):     # this iteration's extent (a tail of a slot loop: bound inside)
        sp = job.split_of.get(a)
        ext[a] = nom[a] if sp is not None and sp.outer in slots else lw.ext_of(job, a, env)
    key = lw.operand_key(ld, part, deps, env, ext)
    if slot_val is None:        # the consumer's tiles are computed as the accumulators end
        pj.epilogue = (job, ld)
        job.emitted.add(at)
    else:
        e0 = Env(dict(env.lin), dict(env.ext), env.loops, dict(env.pipe))
        for u in slots:         # a loop of one iteration is bound to 0 (Lowerer.bind_loop)
            e0.lin[u] = Lin.var(u) if nom[u] > 1 else Lin(0)
        v = slot_val(e0)
        pj.dest = SlotDest(v.base, v.dtype, v.strides, v.mem, v.name)
        memo[key] = slot_val
    env2 = Env({k: x for k, x in env.lin.items() if k != "__acc__"}, dict(env.ext),
               env.loops, dict(env.pipe))
    for a in (part, *deps):
        env2.ext[a] = ext[a]
    cached = [c.tensor for c in lw.sched.state.cache_reads
              if c.stage == job.stage and c.at == at and _reads(pj, c.tensor)]
    if isinstance(pj.init, Load) and not any(ix.coef(part) for ix in pj.init.index) \
            and pj.init.tensor not in cached and pj.init.tensor not in lw.stage_of_tensor:
        cached.append(pj.init.tensor)   # a bias row b[j]: loaded once per block, not per tile
    if mv_ld.tensor not in cached and not any(uses(mv_ld, u) for u in inner):
        pj.hooks[red[0]] = [lambda e: hoist(lw, pj, mv_ld.tensor, red[0], e, producer=None)]
    with lw.level():
        for t in cached:
            if not (t == getattr(pj.init, "tensor", None) and _bias_row(lw, pj, env2)):
                hoist(lw, pj, t, None, env2, producer=None)
        lw.run_job(pj, env2)
    return True


def _bias_row(lw: Lowerer, pj: Job, env: Env) -> bool:
    """The bias init b[j] of a block's accumulators (_matmul_fill) whose address runs
    contiguously over the block's slot loops and the tile's free dims only: the whole row is
    broadcast to the partitions once for the root job (Lowerer.broadcast: one row from HBM,
    copied out on chip) and every block's tiles read slices of it, instead of a broadcast DMA
    per block reading the row from HBM once per partition, ahead of the block's first B tiles
    (linear 4096x4096x1024 on trn2). False: not such a read (hoist loads it per block)."""
    ld, part = pj.init, pj.part
    slots = [u for u in pj.loops if pj.kind.get(u) == "spatial"]
    deps = tuple(f for f in pj.free if any(ix.coef(f) for ix in ld.index))
    fl = lw.flat(ld.tensor, ld.index)
    if (len(lw.memo) < 2 or len(ld.index) != 1 or fl.coef(part) or len(deps) != 1
            or any(v not in (*slots, *deps) for v, _ in fl.terms)):
        return False
    used = [u for u in slots if fl.coef(u)]
    nom = {u: lw.nominal(pj, u, env) for u in (*used, *deps)}
    if any(u in pj.split_of and pj.split_of[u].tail for u in used):
        return False
    span = 1
    for v, c in sorted(fl.terms, key=lambda t: t[1]):   # one contiguous run of the row
        if c != span:
            return False
        span *= nom[v]
    t = lw.tensors[ld.tensor]
    if (t.dtype not in lw.spec.pe_rate
            or span * ITEMSIZE[t.dtype] > BIAS_ROW_FRACTION * lw.spec.sbuf_partition_bytes):
        return False
    g = f"__{ld.tensor}_row"
    row = Load(ld.tensor, (Affine.var(g) + fl.const,))
    key = ("__bias_row__", ld.tensor, fl.const, span)
    if key not in lw.memo[1]:
        ext = {**env.ext, part: lw.ext_of(pj, part, env), g: span}
        lw.memo[1][key] = lw.broadcast(row, part, (g,), Env({}, ext), ext)
    v = lw.memo[1][key]
    size = ITEMSIZE[t.dtype]
    binds = [[Lin(c) for c in range(nom[u])]
             + ([] if u in pj.unroll else [Lin.var(u) + k for k in range(PEEL_FIRST + 1)])
             for u in used]
    if math.prod(map(len, binds)) > MAX_SLOT_KEYS:
        return False

    def slot_val(e, d=deps):
        b = v.base
        for u in used:
            b = b + e.lin[u].scale(fl.coef(u) * size)
        return Val("sbuf", b, tuple(d), (1,), t.dtype, v.name)
    for vals in itertools.product(*binds):
        e = env
        for u, val in zip(used, vals):
            e = e.bind(u, val)
        ext2 = dict(e.ext)
        ext2[part] = lw.ext_of(pj, part, e)
        ext2[deps[0]] = lw.ext_of(pj, deps[0], e)
        lw.memo[-1][lw.operand_key(ld, part, deps, e, ext2)] = slot_val
    return True


def _transposed_fill(lw: Lowerer, job: Job, ld: Load, producer: Stage, part: str, deps, slots,
                     nom, slot_val, memo, env: Env) -> bool:
    """A producer computed at a tensorized consumer that reads it as a matmul operand [K, M]
    along its rows: the contraction loop K is on the partitions but runs along the
    producer's last (row) dimension -- softmax probabilities P[i, j], read as P^T[j, i] by
    O = P V, whose row statistics belong to each query row i. The producer is evaluated in
    its own layout, [M on the partitions, the whole row (K and the slot loops stepping along
    it) free], once per iteration of the other slot loops, with everything it computes on
    the way kept for all its readers (S = Q K^T is evaluated once for the max, the sum and
    P); each slot is then transposed out on the tensor engine. Returns False (nothing
    emitted) when the read does not have that shape."""
    if not job.contract or part != job.contract or len(deps) != 1:
        return False
    if lw.sched.state.get(producer.name).tensorized:
        return False
    f = deps[0]
    for u in (part, *slots):    # M (f) may have a tail: each fill takes its extent there
        sp = job.split_of.get(u)
        if (sp is not None and sp.tail) or u in job.unroll:
            return False
    dj = len(ld.index) - 1
    ix = ld.index[dj]
    if (ix.coef(part) != 1 or ix.coef(f) or any(i2.coef(part) for i2 in ld.index[:dj])
            or max(nom[part], nom[f]) > lw.spec.partitions):
        return False
    row, span = [], 1           # K and the slot loops along the row, contiguous from stride 1
    for u in sorted([part] + [u for u in slots if ix.coef(u)], key=ix.coef):
        if ix.coef(u) != span or any(i2.coef(u) for i2 in ld.index[:dj]):
            return False
        row.append(u)
        span *= nom[u]
    row_slots = [u for u in slots if u in row]
    outer = [u for u in slots if u not in row]
    g = lw.fresh(f"{ld.tensor}_row")
    rest = Affine(tuple((v, c) for v, c in ix.terms if v not in row), ix.const)
    rd = dataclasses.replace(ld, index=ld.index[:dj] + (rest + Affine.var(g),))
    n_rows = 1
    for u in row_slots:
        n_rows *= nom[u]

    def rows(e):
        """The producer's rows at this iteration of the outer slot loops (kept level: the
        memo level just pushed)."""
        ext = dict(e.ext)
        ext.update({f: lw.ext_of(job, f, e), part: nom[part], g: span})
        keep, lw.keep = lw.keep, len(lw.memo) - 1
        streams, lw.streams = lw.streams, lw.streams or 1
        try:
            return lw.virtual(producer, rd, f, (g,), e, ext, home=lw.keep, depth=lw.keep), ext
        finally:
            lw.keep, lw.streams = keep, streams

    def transposes(T, ext, e):
        unroll = n_rows <= 16   # few slots: their PSUM copies alternate act / dve
        k = [0]

        def each(e2, j=0, engine=None):
            if j < len(row_slots):
                u = row_slots[j]
                if unroll:
                    for c in range(nom[u]):
                        each(e2.bind(u, Lin(c), **{u: 1}), j + 1)
                elif j == len(row_slots) - 1 and nom[u] >= 4 and nom[u] % 2 == 0:
                    # many slots (a long row): a loop over pairs whose copies alternate
                    # act / dve (one engine alone would bound the transposes)
                    v2 = lw.fresh(f"{u}2")

                    def pair():
                        for c, eng in enumerate(("act", "dve")):
                            e3 = Env(dict(e2.lin), {**e2.ext, u: 1}, e2.loops + (v2,),
                                     {**e2.pipe, v2: 2})
                            e3.lin[u] = Lin.var(v2).scale(2) + c
                            each(e3, j + 1, eng)
                    lw.loop(v2, nom[u] // 2, pair)
                else:
                    lw.bind_loop(job, u, e2, lambda e3: each(e3, j + 1))
                return
            b = T.base
            for u in row_slots:
                b = b + e2.lin[u].scale(ix.coef(u) * T.strides[0] * ITEMSIZE[T.dtype])
            nat = Val("sbuf", b, (part,), T.strides, T.dtype, T.name)
            lw.transpose_into(nat, slot_val(e2), part, f, ext, e2,
                              engine or (("act", "dve")[k[0] % 2] if unroll else "act"))
            k[0] += 1
        each(e)

    def fill(e, i=0):
        if i < len(outer):
            lw.bind_loop(job, outer[i], e, lambda e2: fill(e2, i + 1))
            return
        with lw.level():
            T, ext = rows(e)
            memo[lw.operand_key(ld, part, deps, e, ext)] = slot_val
            transposes(T, ext, e)

    n_out = 1
    for u in outer:
        n_out *= nom[u]
    if outer and n_out <= INTERLEAVE_MAX:
        # Few outer iterations (query tiles): each tile's rows are generated on their own
        # (own buffers, no shared memo) and the instruction streams interleaved, so the
        # in-order engines alternate between independent softmax chains instead of running
        # one chain's steps back to back; then every tile's slots are transposed. Every
        # buffer a stream allocates stays reserved until the end: once interleaved, a later
        # stream must not reuse space an earlier one still reads.
        level, done = len(lw.memo), []
        for combo in itertools.product(*(range(nom[u]) for u in outer)):
            e = env
            for u, c in zip(outer, combo):
                e = e.bind(u, Lin(c), **{u: 1})
            lw.body.append([])
            lw.memo.append({})
            first = len(lw.buffers)
            lw.streams = n_out
            try:
                T, ext = rows(e)
            finally:
                lw.streams = 0
            live = {x[3] for x in lw.live}
            lw.live += [(b.mem, b.offset, b.size, b.name, level) for b in lw.buffers[first:]
                        if b.name not in live and b.name not in lw.outside]
            done.append((lw.body.pop(), T, ext, e))
            lw.memo.pop()
        lw.body[-1].extend(_interleave([b for b, *_ in done], lw.spec))
        rows_t = {T.name for _, T, *_ in done}    # after the streams, only the rows are read
        lw.live[:] = [x for x in lw.live if x[4] < level or x[3] in rows_t]
        lw.memo.append({})
        for _, T, ext, e in done:
            transposes(T, ext, e)
        lw.memo.pop()
        lw.live[:] = [x for x in lw.live if x[4] < level]
        memo[lw.operand_key(ld, part, deps, env, done[0][2])] = slot_val
        return True
    fill(env)
    return True


def _interleave(streams: list, spec) -> list:
    """Merge independent instruction streams, each keeping its order, by list scheduling on
    in-order engines: the next node is, of the streams' next ones, the one that could start
    first (its engine free and the buffers it reads written, from the timing model's issue
    intervals and latencies; ties go to the first stream, which so runs ahead and reaches
    the later engines first). One stream's steps on one engine then overlap another's on a
    different engine, where a round-robin merge queues every stream's first step on an
    engine before any stream's second step can start."""
    free: dict = {}                 # engine -> time it is free
    ready: dict = {}                # buffer -> time its last write lands
    pos, out = [0] * len(streams), []

    def costs(x, mult=1):
        """[(engine, busy ps, latency ps, reads, writes)] of a node (a loop: its body x trips)."""
        if isinstance(x, isa.Loop):
            return [c for y in x.body for c in costs(y, mult * x.extent)]
        c = instr_cost(x, spec)
        eng = "dma" if c.is_dma else x.engine
        return [(eng, c.ii_ps * mult, c.lat_ps, {a.name for a in x.srcs},
                 {a.name for a in (x.dst, x.dst2) if a is not None})]

    def start(cs):
        return max([free.get(e, 0) for e, *_ in cs if e != "dma"]
                   + [ready.get(b, 0) for *_, rd, _ in cs for b in rd] + [0])

    while True:
        best = None
        for s in range(len(streams)):
            if pos[s] < len(streams[s]):
                cs = costs(streams[s][pos[s]])
                t = start(cs)
                if best is None or t < best[0]:
                    best = (t, s, cs)
        if best is None:
            return out
        t, s, cs = best
        out.append(streams[s][pos[s]])
        pos[s] += 1
        end = {}
        for e, ii, lat, _, wr in cs:        # a loop's instructions run back to back per engine
            end[e] = end.get(e, max(t, free.get(e, 0) if e != "dma" else t)) + ii
            for b in wr:
                ready[b] = max(ready.get(b, 0), end[e] + lat)
        for e, x in end.items():
            if e != "dma":
                free[e] = x


def _box_fill(lw: Lowerer, job: Job, ld: Load, part: str, deps, slots, nom, slot_elems: int,
              env: Env, what: str, producer=None) -> bool:
    """A hoisted read whose slots overlap: the slot loops shift a window that the tile's free
    loops also walk (a convolution's taps, X[c, h + kh, w + kw]). The box of the tensor that
    every slot reads, [part, box dims...], is filled once -- one DMA (cache_read) or one
    evaluation of the producer over the box (compute_at) -- and each slot reads a strided
    view of it at its offset (no per-slot copies). Returns False (nothing emitted) when the
    read does not have that shape or the box is not smaller than the slots."""
    if not slots:
        return False
    inner = (part, *deps, *slots)
    for u in inner:
        sp = job.split_of.get(u)
        if (sp is not None and sp.tail) or (u in job.unroll and u not in slots):
            return False
    one = {u for u in slots if nom[u] == 1}     # a slot loop of one iteration: always 0
    coef = [{a: ix.coef(a) for a in inner if ix.coef(a) and a not in one} for ix in ld.index]
    dp = [d for d, c in enumerate(coef) if part in c]
    if len(dp) != 1 or coef[dp[0]] != {part: 1} or any(c < 0 for cd in coef for c in cd.values()):
        return False
    box = [(d, 1 + sum(c * (nom[a] - 1) for a, c in cd.items()))
           for d, cd in enumerate(coef) if cd and d != dp[0]]
    clip = _clip_dim(lw, job, ld, part, deps, coef, box, inner) if producer is None else None
    if clip is not None:        # the innermost dim holds the source's part only (see there)
        box = [(d, clip[2] if d == clip[0] else e) for d, e in box]
    elems = 1
    for _, n in box:
        elems *= n
    t = lw.tensors[ld.tensor]
    size = elems * ITEMSIZE[t.dtype]
    if elems > slot_elems or (elems == slot_elems and deps) \
            or size > lw.spec.sbuf_partition_bytes // 4:
        return False        # (a box as big as its slots: one load instead of one per slot)
    bstride, n = {}, 1
    for d, e in reversed(box):
        bstride[d] = n
        n *= e
    tstride = _strides(t.shape)
    base, bname = lw.alloc("sbuf", size, f"{ld.tensor}_box", env, what)
    ext = dict(env.ext)
    for a in (part, *deps):
        ext[a] = nom[a]
    if producer is None and _pad_on_chip(lw, ld, inner, dp[0], nom[part], box, bstride, base,
                                         bname, env, clip):
        pass
    elif producer is None:
        fl = lw.flat(ld.tensor, ld.index)
        off = lw.split_affine(Affine(tuple((v, c) for v, c in fl.terms if v not in inner),
                                     fl.const), env)
        lw.dma(isa.AP("sbuf", bname, t.dtype, base.addr(), ((1, nom[part]),) +
                      tuple((bstride[d], e) for d, e in box)),
               isa.AP("hbm", ld.tensor, t.dtype, off.addr(), ((tstride[dp[0]], nom[part]),) +
                      tuple((tstride[d], e) for d, e in box)))
    else:   # the producer over the box: its index is the read's outer part + a box atom
        batoms = {d: lw.fresh(f"{ld.tensor}_b{d}") for d, _ in box}
        index = tuple(Affine(tuple((v, c) for v, c in ix.terms if v not in inner), ix.const)
                      + Affine.var(batoms[d]) if d in batoms else ix
                      for d, ix in enumerate(ld.index))
        bext = dict(ext)
        bext.update({batoms[d]: e for d, e in box})
        bdeps = tuple(batoms[d] for d, _ in box)
        into = Val("sbuf", base, bdeps, tuple(bstride[d] for d, _ in box), t.dtype, bname)
        with lw.level():
            lw.virtual(producer, dataclasses.replace(ld, index=index), part, bdeps, env, bext,
                       into=into)

    vbase = base if clip is None else base + -clip[1] * bstride[clip[0]] * ITEMSIZE[t.dtype]
    if clip is not None:        # padded coordinates [a, b) of the clipped dim are in the box
        o = _pad_spans(lw, ld, inner, box)[clip[0]][0]
        lw.clipped[bname] = (clip[0], o + clip[1], o + clip[1] + clip[2])

    def view(e, d_=deps):
        b = vbase
        for u in slots:
            b = b + e.lin[u].scale(sum(cd.get(u, 0) * bstride.get(d, 0)
                                       for d, cd in enumerate(coef)) * ITEMSIZE[t.dtype])
        strides = tuple(sum(cd.get(f, 0) * bstride.get(d, 0) for d, cd in enumerate(coef))
                        for f in deps)
        return Val("sbuf", b, tuple(d_), strides, t.dtype, bname)
    key_envs = [env]
    for u in slots:   # the consumer's loops over the slots bind these (extent 1: a constant;
        n = lw.nominal(job, u, env)       # unrolled: each value)
        vals = [Lin(c) for c in range(n)] if u in job.unroll else \
            [Lin.var(u) if n > 1 else Lin(0)]
        key_envs = [k.bind(u, v) for k in key_envs for v in vals]
    for key_env in key_envs:
        lw.memo[-1][lw.operand_key(ld, part, deps, key_env, ext)] = view
    return True


def _pad_spans(lw: Lowerer, ld: Load, inner, box) -> dict | None:
    """{box dim: (box start, interior start, interior end)} in the padded copy's coordinates
    for a read of a padded copy whose box sits at a fixed place (see _pad_on_chip); None
    when it does not, or a dim outside the box is padded."""
    pad = lw.pads.get(ld.tensor)
    if pad is None:
        return None
    src, _, _, lo = pad
    sshape = lw.tensors[src].shape
    where = dict(box)
    span = {}
    for d, ix in enumerate(ld.index):
        o = Affine(tuple((v, c) for v, c in ix.terms if v not in inner), ix.const)
        if d in where:
            if o.terms:
                return None
            span[d] = (o.const, max(o.const, lo[d]), min(o.const + where[d], lo[d] + sshape[d]))
        elif lo[d] or lw.tensors[ld.tensor].shape[d] != sshape[d]:
            return None
    return span


def _clip_dim(lw: Lowerer, job: Job, ld: Load, part: str, deps, coef, box, inner):
    """(dim, shift, extent) when the box of a padded read can leave out the padding of its
    innermost dim: each row of the box is then one contiguous run of the source (one DMA
    chunk per partition instead of one per row) and the consumer clips each tap to the
    output columns that read inside the source (Lowerer.scaled_acc, with the tap loop of
    that dim unrolled so each tap has its own columns). Only for that consumer: a sum of
    `ld` times a per-partition scalar. None: keep the padded layout."""
    e = job.value
    d = len(ld.index) - 1
    if (not deps or len(deps) > 2 or job.reduce != "add" or job.red_free
            or not isinstance(e, Binary) or e.op != "mul" or ld not in (e.a, e.b)
            or box[-1][0] != d or tuple(deps) != tuple(job.free)):
        return None
    w = e.b if ld == e.a else e.a       # per-partition (not broadcast: its value is in SBUF)
    if (not isinstance(w, Load) or not lw.scalar_valued(w, job.free)
            or not any(ix.coef(part) for ix in w.index)):
        return None
    f = deps[-1]
    if set(coef[d]) - {f} - set(job.unroll) or coef[d].get(f, 0) < 1:
        return None
    span = _pad_spans(lw, ld, inner, box)
    if span is None:
        return None
    o, a, b = span[d]
    if b <= a or (a, b) == (o, o + box[-1][1]):
        return None
    return d, a - o, b - a


def _pad_on_chip(lw: Lowerer, ld: Load, inner, dp: int, P: int, box, bstride, base, bname,
                 env: Env, clip=None) -> bool:
    """The box of a zero-padded read (`ld` reads the padded copy of a tensor, see
    pad_tensors) filled on chip: the part of the box inside the source tensor by one DMA from
    the source, the border by memsets of the pad value; the padded copy in HBM is then never
    needed. Only when the box sits at a fixed place in every padded dimension (a whole padded
    plane per tile) and the other dimensions are not padded. False: nothing emitted."""
    span = _pad_spans(lw, ld, inner, box)  # box dim -> (box start, interior start, end)
    if span is None:
        return False
    src, value, _, lo = lw.pads[ld.tensor]
    sshape = lw.tensors[src].shape
    dtype = lw.tensors[src].dtype
    where = dict(box)
    outer = [Affine(tuple((v, c) for v, c in ix.terms if v not in inner), ix.const)
             for ix in ld.index]
    if clip is not None:                   # that dim holds the interior only
        a = span[clip[0]][0] + clip[1]
        span[clip[0]] = (a, a, a + clip[2])
    size = ITEMSIZE[dtype]

    def region(lims, at=base):             # SBUF AP of the box region {d: (start, stop)}
        off = at + sum((lims[d][0] - span[d][0]) * bstride[d] for d in span) * size
        return isa.AP("sbuf", bname, dtype, off.addr(),
                      ((1, P),) + tuple((bstride[d], lims[d][1] - lims[d][0]) for d, _ in box))
    # the border never changes (only this fill writes the box, the DMA only its interior):
    # set it before the enclosing loops, once per buffer slot, when the box sits at fixed
    # slots (else here, where a compute engine would take it after the last tile's work)
    outside = len(lw.body) - 1 - len(env.loops)
    slots = [()]
    if env.loops and outside >= 0 and all(m for _, _, m in base.terms):
        for v, c, m in base.terms:
            slots = [x + (c * k,) for x in slots for k in range(m)]
    else:
        outside = None
    # the border: for each box dim, the slabs before and after the interior, inside the
    # interior along the earlier dims and whole along the later ones
    order = [d for d, _ in box]
    for k, d in enumerate(order):
        o, a, b = span[d]
        for lo_, hi_ in ((o, min(a, o + where[d])), (max(b, o), o + where[d])):
            if hi_ <= lo_:
                continue
            lims = {e: (span[e][1], span[e][2]) if i < k else (span[e][0], span[e][0] + where[e])
                    for i, e in enumerate(order)}
            lims[d] = (lo_, hi_)
            if not all(lims[e][1] > lims[e][0] for e in order):
                continue
            if outside is None:
                lw.emit_balanced(isa.Instr.make("memset", "pool", region(lims), value=value))
                continue
            for x in slots:
                lw.body[outside].append(isa.Instr.make(
                    "memset", "pool", region(lims, Lin(base.const + sum(x))), value=value))
    if all(span[d][2] > span[d][1] for d in order):
        sstride = _strides(sshape)
        terms = tuple((v, c * sstride[d]) for d, o in enumerate(outer) if d not in where
                      for v, c in o.terms)
        const = sum((span[d][1] - lo[d] if d in where else outer[d].const - lo[d]) * sstride[d]
                    for d in range(len(sshape)))
        off = lw.split_affine(Affine(terms, const), env)
        into = region({d: (span[d][1], span[d][2]) for d in order})
        hbm = isa.AP("hbm", src, dtype, off.addr(), ((sstride[dp], P),) +
                     tuple((sstride[d], span[d][2] - span[d][1]) for d in order))
        sizes = [span[d][2] - span[d][1] for d in order]
        if (contiguous_runs(into) > P and contiguous_runs(hbm) <= P
                and sizes[-1] * size < lw.spec.dma_chunk_overhead_bytes):
            # interior rows shorter than the box's (padded columns) and than a DMA chunk's
            # overhead: each row a chunk would cost more queue time than its bytes; one
            # contiguous DMA into a staging tile and one on-chip copy into the box instead
            sb, sname = lw.alloc("sbuf", math.prod(sizes) * size, f"{bname}_in", env)
            st = _strides(sizes)
            stage = isa.AP("sbuf", sname, dtype, sb.addr(),
                           ((1, P),) + tuple((st[k], sizes[k]) for k in range(len(order))))
            lw.dma(stage, hbm)
            lw.emit_balanced(isa.Instr.make("tensor_copy", "pool", into, (stage,)))
        else:
            lw.dma(into, hbm)
    return True


def _loads_of(e):
    from .ir import loads  # noqa: PLC0415
    return loads(e)


def fill_padded(lw: Lowerer, src: str, value: float, name: str, shape, lo):
    """Fill HBM tensor `name` with `value`, then copy `src` into its interior."""
    spec = lw.spec
    total = int(np.prod(shape))
    dtype = lw.tensors[src].dtype
    P = spec.partitions
    cols = max(1, min(-(-total // P), DEFAULT_FREE_ELEMS))
    rows = shape[-1] * partition_block(spec)    # whole row sub-blocks of the tensor per
    if cols >= rows:                            # partition: the queues' pieces then share
        cols -= cols % rows                     # no def-use cell (each would wait for the last)
    env = Env({}, {})
    with lw.level():
        base, bname = lw.alloc("sbuf", cols * ITEMSIZE[dtype], f"{name}_fill", env)
        tile = isa.AP("sbuf", bname, dtype, base.addr(), ((1, P), (1, cols)))
        lw.emit(isa.Instr.make("memset", "dve", tile, value=float(value)))
        chunk = P * cols
        n_full = total // chunk

        def put(off, rows, c):
            lw.dma(isa.AP("hbm", name, dtype, isa.Addr(off), ((c, rows), (1, c))),
                   dataclasses.replace(tile, dims=((1, rows), (1, c))))
        if n_full:
            def body():
                lw.dma(isa.AP("hbm", name, dtype, isa.Addr(0, (("c", chunk, 0),)), ((cols, P), (1, cols))),
                       tile)
            if n_full == 1:
                put(0, P, cols)
            else:
                lw.loop("c", n_full, body)
        rem = total - n_full * chunk
        off = n_full * chunk
        if rem >= cols:
            put(off, rem // cols, cols)
            off += (rem // cols) * cols
            rem -= (rem // cols) * cols
        if rem:
            put(off, 1, rem)
    # interior copy: one DMA over every dimension (adjacent dimensions merged where both
    # sides are contiguous across them); the queue split cuts it along the outermost one
    src_shape = lw.tensors[src].shape
    sstr, dstr = _strides(src_shape), _strides(shape)
    dims = []                                   # [src stride, dst stride, extent], outer first
    for ss_, ds_, n in zip(sstr, dstr, src_shape):
        if dims and dims[-1][0] == ss_ * n and dims[-1][1] == ds_ * n:
            dims[-1] = [ss_, ds_, dims[-1][2] * n]
        elif n > 1 or not dims:
            dims.append([ss_, ds_, n])
    dims = [[1, 1, 1]] * (2 - len(dims)) + dims
    do = sum(l * s_ for l, s_ in zip(lo, dstr))
    lw.dma(isa.AP("hbm", name, dtype, isa.Addr(do), tuple((d, n) for _, d, n in dims)),
           isa.AP("hbm", src, dtype, isa.Addr(0), tuple((s_, n) for s_, _, n in dims)))


def _strides(shape):
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return list(reversed(out))


# ----------------------------------------------------------------------------------------
# the compiled kernel


class CompiledKernel:
    """A scheduled program lowered for one machine: asm(), run(), simulate()."""

    def __init__(self, schedule: Schedule, machine):
        self.spec = sim.machine(machine)
        self.schedule = schedule
        self.program, self.lowered_ir = lower(schedule, self.spec)
        try:
            sim.validate(self.program, self.spec)
        except sim.SimError as e:
            raise TensorlangError(f"lowering produced an invalid program: {e}") from None

    def asm(self) -> str:
        return sim.disassemble(self.program)

    def run(self, *arrays):
        prog = self.schedule.prog
        if len(arrays) != len(prog.inputs):
            raise TensorlangError(f"{prog.name}: expected {len(prog.inputs)} inputs "
                                  f"({', '.join(t.name for t in prog.inputs)}), got {len(arrays)}")
        ins = {}
        for t, a in zip(prog.inputs, arrays):
            a = np.asarray(a)
            if tuple(a.shape) != tuple(t.shape):
                raise TensorlangError(f"{prog.name}: input {t.name!r} has shape {tuple(a.shape)}, "
                                      f"expected {tuple(t.shape)}")
            ins[t.name] = a.astype(np_dtype(t.dtype), copy=False)
        outs = sim.run(self.program, ins, self.spec)
        res = tuple(outs[t.name] for t in prog.outputs)
        return res[0] if len(res) == 1 else res

    def simulate(self, trace: bool = False):
        """The timing report; its roofline counts the algorithm's work (see roofline)."""
        return self.roofline(sim.simulate(self.program, self.spec, trace=trace))

    def roofline(self, r):
        """The report's roofline with the matmul term cut to the contractions the algorithm
        asks for (tensorized stages: 2 x their loop extents): instructions the lowering
        adds on the tensor engine -- diagonal weights standing in for a vector engine
        (Lowerer.diag_rows), broadcasts of a row (ones^T @ row) -- spend its time but are
        not work the problem needs, so they must not move the bound. Unchanged when the
        program's matmul flops do not exceed the algorithm's."""
        isa_flops, isa_s = 0, 0.0
        for ins, loops in isa.walk_instrs(self.program.body):
            if ins.op == "matmul":
                n = math.prod(lp.extent for lp in loops) * 2 * ins.srcs[1].partitions \
                    * ins.srcs[0].free_size * ins.srcs[1].free_size
                isa_flops += n
                isa_s += n / self.spec.peak_flops(ins.srcs[0].dtype)
        sched = self.schedule
        alg = sum(2 * math.prod(st.extents().values()) for st in sched.prog.stages
                  if sched.state.get(st.name).tensorized)
        if isa_flops <= alg:
            return r
        compulsory = sum(ITEMSIZE[t.dtype] * math.prod(t.shape) for t in self.program.tensors
                         if t.kind in ("input", "output"))
        mem_s = compulsory / (self.spec.dma_gbps * 1e9)
        mm_s = isa_s * alg / isa_flops
        roof = max(mm_s, mem_s) * 1e6
        return dataclasses.replace(r, roofline_us=roof, roofline_fraction=min(
            1.0, roof / r.time_us) if r.time_us > 0 else 1.0,
            bound="compute" if mm_s >= mem_s else "memory")


def build(sched: Schedule, machine="trn2") -> CompiledKernel:
    return CompiledKernel(sched, machine)
