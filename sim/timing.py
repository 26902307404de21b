"""The timing simulator: `simulate(program, spec, trace=False) -> Report`.

The model (every number comes from the MachineSpec; times are integer picoseconds)
=================================================================================

Streams. Each compute engine ("pe" tensor, "act" scalar, "dve" vector, "pool" gpsimd) and
each DMA queue "q0".."q{dma_queues-1}" is an in-order instruction stream. Instructions are
taken in program order (loops expanded). An instruction

    starts  at  max(its stream's free time, dependency-ready time, shared-port free time)
    is busy for its issue interval II           -> end   = start + II   (stream free again)
    has its result ready after a latency L      -> ready = end + L

Latency L: `access_latency_cycles` of the engine's clock for compute instructions (the
static SBUF/PSUM access cost); `dma_fixed_ns` for DMAs (the per-transfer fixed cost is
modelled as latency: it delays the consumers, not the queue, so a queue can have several
transfers in flight). `dependent_overhead_cycles` is not added separately: a RAW-dependent
instruction already waits end + L of its producer.

Issue intervals (engine cycles at the engine's clock, N = free elements of the operation,
P = partitions; MIN_II = spec.min_ii):
    matmul          max(min(matmul_min_stationary_ii, N_stationary), N_moving) / pe_rate[dt]
                    srcs = (stationary[K, M], moving[K, N]); dt = the slower input dtype
    transpose (pe)  max(P, min(transpose_min_f, F))                F = src free elements
    activation      max(MIN_II, N)  (+ act_reduce_extra_ii with reduce_op);
                    func "reciprocal": max(MIN_II, reciprocal_factor * N)
    tensor_scalar   max(MIN_II, N)
    tensor_tensor   max(MIN_II, 2N); max(MIN_II, N) when one input is in PSUM, one in SBUF
    select          as tensor_tensor (max(MIN_II, 2N))
    tensor_reduce   N of the input (N / reduce_bf16_speedup for bf16 input with add/max)
    tensor_copy     max(MIN_II, N)
    memset          N
    iota            iota_fixed_cycles + N
A compute operand in SBUF/PSUM whose innermost free-axis stride exceeds
`stride_penalty_bytes` multiplies N by `stride_penalty_factor` (once per instruction).
Cycles convert to ps as ceil(cycles * 1000 / clock_GHz).

DMA. A transfer of B bytes (max of source and destination bytes) in C contiguous chunks
(C = max over both sides of the number of contiguous runs; every SBUF partition is its
own run) occupies its queue for
    Q = ceil((B + C * dma_chunk_overhead_bytes) * 1000 / dma_queue_gbps) ps
so small or strided transfers are inefficient. Transfers touching HBM also need
    H = ceil(B_hbm * 1000 / hbm_gbps) ps
of the HBM channel that ALL queues of the core share (B_hbm counts the HBM side(s);
SBUF<->SBUF transfers use no HBM bandwidth). The channel is accounted in time bins of
`hbm_bin_ns` (rounded to a power of two in ps); each bin holds at most one bin-width of
channel time. Transfers reserve their channel time first come first served in program order,
from their start on: in the bin containing the start at most the time left in that bin
(and what the bin has free), then in the following bins as much as each has free, until H
is reserved. Channel end = start + H if it all fits the start bin (the uncontended case,
O(1)); otherwise the start of the last bin used plus that bin's used time after the
reservation (contended transfers stretch; a saturated channel serves transfers one bin
after another at exactly hbm_gbps). Later instructions (in program order) may back-fill
bins left free by earlier ones. The transfer ends at max(start + Q, channel end) and its
destination is ready `dma_fixed_ns` later. Bins live in a ring of HBM_RING_BINS bins; a
transfer reaching back further than the ring behind the furthest-ahead bin treats the
forgotten bins as full (only affects pathological programs).

Dependencies (buffer def-use). Every memory is a grid of *cells*:
  * SBUF / PSUM: rows = partitions, each row the partition's bytes;
  * HBM: each tensor, rows = all but its last dimension, each row the last dimension's bytes;
  rows in blocks of row_block(spec) = MASK_BITS * partition_block(spec) rows (128 on trn),
  columns in granules of `dep_granule_bytes` (SBUF/PSUM) / `hbm_granule_bytes` (HBM); a
  cell is (row block, column granule). An operand touches a row range (SBUF/PSUM: its
  partitions; HBM: from the element address, row = byte address // row bytes, plus the span
  of its dimensions whose strides are whole rows) and column runs (its other dimensions):
  their bounding byte range, or - when its largest-stride such dimension separates the runs
  by at least one granule - one run per step of that dimension. An HBM access whose
  columns run past the end of a row covers whole rows (the rows it reaches). Broadcast
  (stride 0) and size-1 dimensions do not widen the footprint; footprints outside the
  memory / tensor are clipped to it. Per touched cell the operand also has a mask of the
  row sub-blocks (MASK_BITS per row block, partition_block(spec) rows each) it touches.
  So a [128 x 512] tile of a row-major HBM matrix is one or two cells, not 128 rows.
  Per cell the simulator keeps the ready time of the last write, the stream of that write,
  and the latest end time of any read:
    RAW   a reader starts >= the last write's ready time (any rows of the cell)
    WAW   a writer starts >= the ready time of every earlier write to the same row
          sub-blocks, unless those writes were on the same stream (in-order streams keep
          their own writes ordered, so accumulating matmuls into one PSUM tile issue back
          to back). Row sub-blocks are tracked per cell as a mask over an *epoch*: writes
          with disjoint masks join the epoch (a tile loaded or stored as several DMAs over
          different partitions / rows, one per queue, moves in parallel); a write that
          overlaps the epoch's mask waits for all of it (unless every write of the epoch
          was on its own stream) and starts a new epoch; a disjoint write still waits for
          every write before the epoch.
    WAR   a writer starts >= the end of every earlier read (any rows of the cell)
  Reads are released at the reader's end (end of its issue interval / transfer); writes
  become visible at the writer's ready time. Accumulating instructions (`acc`) count as
  writes of dst only (accumulation happens in the memory). Activation `dst2` is a write;
  extra per-partition scale/bias operands are reads. Cells are coarser than bytes, so
  accesses sharing a cell order conservatively (never too little: partial overlaps order).
  Multi-buffering needs no special case: slots are distinct addresses (Addr mod terms), so
  distinct cells, so the next slot's load does not wait for the current slot's readers.

Shared ports (NeuronCore-v2). With `dve_pool_share_sbuf`, dve and pool instructions that
touch SBUF serialise on one "SBUF port" resource; with `dve_act_share_psum`, dve and act
instructions that touch PSUM serialise on a "PSUM port" resource (each such instruction
holds the port for its issue interval; reserved in program order, no back-fill).

The total time is the latest ready time of any instruction.

Implementation
==============
`flatten(program, spec)` turns the loop tree once into a compact bytecode
(LOOP_BEGIN / INSTR / LOOP_END with loop levels and extents) and per-static-instruction /
per-operand integer tables (stream, II, latency, DMA channel time, footprint geometry, affine
address terms as (loop, byte coefficient, mod, operand) rows grouped by loop). The static
work per instruction (`instr_cost` and the footprints) is cached per machine by instruction
value, so a tuner's candidates pay it once per distinct instruction. `_core` (Numba,
cache=True) expands the loops itself, keeps every operand's address up to date as loops
step, and runs the model above without any Python per dynamic instruction.
`sim.timing_ref` is a plain recursive Python implementation of the same model, used by
the tests to check this one exactly.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

from .isa import AP, Instr, Loop, OPS, Program, walk_instrs
from .machine import ENGINES, MachineSpec, SimError, machine
from .report import Report

HBM_RING_BINS = 8192            # ring of HBM-channel time bins (see the docstring)
TRACE_CAP = 1_000_000           # per-instruction records kept when simulate(trace=True)

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3": 1, "float8_e5m2": 1,
            "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint32": 4, "uint16": 2,
            "float64": 8, "int64": 8}

# bytecode
INSTR, LOOP_BEGIN, LOOP_END = 0, 1, 2
# per-static-instruction table columns
I_STREAM, I_II, I_LAT, I_DMA, I_HBM, I_PORTS, I_OP0, I_NOPS = range(8)
I_COLS = 8
# per-operand table columns, hot ones first (O_MODE: M_NONE untracked, M_FAST one run of
# static rows, M_FULL anything else)
(O_MODE, O_BASE, O_CBASE, O_GSH, O_E, O_NCOL, O_KIND, O_MASK, O_G, O_RUNS, O_PITCH, O_DYN,
 O_ROWS, O_RB, O_RBSH, O_SPAN, O_NROWS) = range(17)
M_NONE, M_FAST, M_FULL = 0, 1, 2
# address term columns: the loop's code row, byte coefficient, mod (0: none), mod - 1 for a
# power-of-two mod else -1, operand, contribution at the loop's last iteration
T_LOOP, T_COEF, T_MOD, T_MASK, T_OP, T_LAST = range(6)
T_COLS = 6
O_COLS = 17
K_READ, K_WRITE_WAR, K_WRITE = 0, 1, 2      # operand kinds (a write needs WAR checks only if
                                            # some instruction reads its region)
# cell state columns: last write's ready time; last write's stream + 1 (0: none, -1: mixed);
# latest read end; row sub-blocks written this epoch; latest ready before the epoch
S_LW, S_LWS, S_LR, S_LWM, S_LWO = range(5)
S_COLS = 8                      # (padded: one 64-byte line per cell)
MASK_BITS = 32                  # row sub-blocks tracked per cell (bits of an int64 mask)
FULL_MASK = (1 << MASK_BITS) - 1
PORT_SBUF, PORT_PSUM = 1, 2


def itemsize(dtype: str) -> int:
    try:
        return ITEMSIZE[dtype]
    except KeyError:
        raise SimError(f"unknown dtype {dtype!r}; known: {', '.join(ITEMSIZE)}") from None


def stream_names(spec: MachineSpec) -> list[str]:
    """Stream id -> name: the four engines, then the DMA queues."""
    return list(ENGINES) + [f"q{i}" for i in range(spec.dma_queues)]


def stream_of(ins: Instr, spec: MachineSpec) -> int:
    if ins.op not in OPS:
        raise SimError(f"unknown op {ins.op!r}; known: {', '.join(OPS)}")
    eng = ins.engine
    if ins.op == "dma":
        if not (eng.startswith("q") and eng[1:].isdigit()):
            raise SimError(f"dma must run on a DMA queue 'q0'..'q{spec.dma_queues - 1}', "
                           f"got engine {eng!r}")
        q = int(eng[1:])
        if q >= spec.dma_queues:
            raise SimError(f"DMA queue {eng!r} does not exist: {spec.name} has "
                           f"{spec.dma_queues} queues (q0..q{spec.dma_queues - 1})")
        return len(ENGINES) + q
    if eng not in OPS[ins.op][0]:
        raise SimError(f"{ins.op} cannot run on engine {eng!r}; allowed: "
                       f"{', '.join(OPS[ins.op][0])}")
    return ENGINES.index(eng)


def _ps(cycles: float, ghz: float) -> int:
    """Engine cycles -> integer picoseconds (rounded up)."""
    return max(0, math.ceil(cycles * 1000.0 / ghz - 1e-6))


def _bytes(ap: AP) -> int:
    n = ITEMSIZE.get(ap.dtype) or itemsize(ap.dtype)
    for _, size in ap.dims:
        n *= size
    return n


def _strided(ap: AP, spec: MachineSpec) -> bool:
    """Innermost non-trivial free-axis stride above spec.stride_penalty_bytes (SBUF/PSUM)."""
    if ap.mem == "hbm":
        return False
    for stride, size in reversed(ap.dims[1:]):
        if size > 1:
            return abs(stride) * itemsize(ap.dtype) > spec.stride_penalty_bytes
    return False


def contiguous_runs(ap: AP) -> int:
    """Number of contiguous runs of the access (each SBUF/PSUM partition is its own run)."""
    if ap.mem == "hbm":
        dims, outer = [d for d in ap.dims if d[1] > 1], 1
    else:
        dims, outer = [d for d in ap.dims[1:] if d[1] > 1], ap.partitions
    runs = outer
    if not dims:
        return runs
    stride, size = dims[-1]
    if stride != 1:
        for _, s in dims:
            runs *= s
        return runs
    run_len = size
    i = len(dims) - 2
    while i >= 0 and dims[i][0] == run_len:
        run_len *= dims[i][1]
        i -= 1
    for _, s in dims[:i + 1]:
        runs *= s
    return runs


@dataclass
class Cost:
    """The static cost of one instruction (shared by the Numba and the Python models)."""
    stream: int
    ii_ps: int          # issue interval (DMA: queue time Q)
    lat_ps: int         # latency from end to result ready
    is_dma: bool
    hbm_ps: int         # DMA: HBM channel time H (0 if no HBM side)
    ports: int          # PORT_SBUF | PORT_PSUM shared-port bits
    reads: tuple        # APs read
    writes: tuple       # APs written
    flops: int
    mm_flops: int       # matmul flops (roofline compute term)
    mm_dtype: str | None
    hbm_read: int
    hbm_write: int
    sbuf_bytes: int
    psum_bytes: int


def instr_cost(ins: Instr, spec: MachineSpec) -> Cost:
    """Issue interval, latency, channel time, operands and counters of one instruction."""
    stream = stream_of(ins, spec)
    op = ins.op
    writes = (ins.dst,) + ((ins.dst2,) if ins.dst2 is not None else ())
    reads = tuple(ins.srcs)
    ops = reads + writes
    nbytes = [_bytes(a) for a in ops]
    sbuf_b = psum_b = 0
    for a, nb in zip(ops, nbytes):
        if a.mem == "sbuf":
            sbuf_b += nb
        elif a.mem == "psum":
            psum_b += nb
    flops = mm_flops = 0
    mm_dtype = None
    if op == "dma":
        src, dst = ins.srcs[0], ins.dst
        b_src, b_dst = nbytes[0], nbytes[-1]
        b = max(b_src, b_dst)
        chunks = max(contiguous_runs(src), contiguous_runs(dst))
        q_ps = math.ceil((b + chunks * spec.dma_chunk_overhead_bytes) * 1000.0
                         / spec.dma_queue_gbps - 1e-6)
        hb_r = b_src if src.mem == "hbm" else 0
        hb_w = b_dst if dst.mem == "hbm" else 0
        h_ps = math.ceil((hb_r + hb_w) * 1000.0 / spec.hbm_gbps - 1e-6) if hb_r + hb_w else 0
        lat = round(spec.dma_fixed_ns * 1000)
        return Cost(stream, max(1, q_ps), lat, True, h_ps, 0, reads, writes, 0, 0, None,
                    hb_r, hb_w, sbuf_b, psum_b)

    engine = ins.engine
    pen = spec.stride_penalty_factor if any(_strided(a, spec) for a in ops) else 1.0
    min_ii = spec.min_ii
    dst = ins.dst
    n = dst.free_size * pen
    if op == "matmul":
        stat, mov = ins.srcs[0], ins.srcs[1]
        rates = []
        for a in (stat, mov):
            if a.dtype not in spec.pe_rate:
                raise SimError(f"matmul input dtype {a.dtype!r} has no tensor-engine rate on "
                               f"{spec.name}; known: {', '.join(spec.pe_rate)}")
            rates.append(spec.pe_rate[a.dtype])
        rate = min(rates)
        mm_dtype = stat.dtype if spec.pe_rate[stat.dtype] == rate else mov.dtype
        n_mov = mov.free_size * pen
        cyc = max(min(spec.matmul_min_stationary_ii, stat.free_size), n_mov) / rate
        flops = mm_flops = 2 * mov.partitions * stat.free_size * mov.free_size
    elif op == "transpose":
        src = ins.srcs[0]
        cyc = max(src.partitions, min(spec.transpose_min_f, src.free_size * pen))
    elif op == "activation":
        if ins.attr("func") == "reciprocal":
            cyc = max(min_ii, spec.reciprocal_factor * n)
        else:
            cyc = max(min_ii, n)
        if ins.attr("reduce_op") is not None:
            cyc += spec.act_reduce_extra_ii
        flops = dst.num_elements
    elif op == "tensor_scalar":
        cyc = max(min_ii, n)
        flops = dst.num_elements
    elif op in ("tensor_tensor", "select"):
        mems = {ins.srcs[0].mem, ins.srcs[1].mem}
        if op == "tensor_tensor" and mems == {"psum", "sbuf"}:
            cyc = max(min_ii, n)
        else:
            cyc = max(min_ii, 2 * n)
        flops = dst.num_elements
    elif op == "tensor_reduce":
        src = ins.srcs[0]
        cyc = src.free_size * pen
        if src.dtype == "bfloat16" and ins.attr("op") in ("add", "max"):
            cyc /= spec.reduce_bf16_speedup
        flops = src.num_elements
    elif op == "tensor_copy":
        cyc = max(min_ii, n)
    elif op == "memset":
        cyc = n
    elif op == "iota":
        cyc = spec.iota_fixed_cycles + n
    else:  # pragma: no cover - OPS and this table move together
        raise SimError(f"no timing rule for op {op!r}")
    ghz = spec.clock_ghz(engine)
    ports = 0
    if spec.dve_pool_share_sbuf and engine in ("dve", "pool") and any(a.mem == "sbuf" for a in ops):
        ports |= PORT_SBUF
    if spec.dve_act_share_psum and engine in ("dve", "act") and any(a.mem == "psum" for a in ops):
        ports |= PORT_PSUM
    return Cost(stream, max(1, _ps(cyc, ghz)), _ps(spec.access_latency_cycles, ghz), False, 0,
                ports, reads, writes, int(flops), int(mm_flops), mm_dtype, 0, 0, sbuf_b, psum_b)


# ----------------------------------------------------------------------------------------
# footprints


class Region(NamedTuple):
    """A def-use region as a grid of cells: rows (SBUF/PSUM: partitions; an HBM tensor: all
    but its last dimension) in blocks of `row_block(spec)` rows, times granules of `gran`
    bytes of a row."""
    rows: int
    row_bytes: int
    gran: int
    ncol: int           # granules per row
    cells: int          # row blocks * ncol


class Footprint(NamedTuple):
    """Static geometry of an operand's footprint (see the module docstring).

    The dynamic byte address is a = offset.eval(env) * scale + adj. HBM (dyn): rows
    a // row_bytes .. + nrows - 1, columns from a % row_bytes. SBUF/PSUM: rows (partitions)
    r0 .. r0 + nrows - 1, columns from a. Columns: runs r = 0..R-1 of bytes
    [col + r*pitch, col + r*pitch + extent); span = (R-1)*pitch + extent.
    """
    region: object      # "sbuf" | "psum" | ("hbm", tensor name)
    scale: int          # bytes per offset unit
    adj: int            # bytes added to the scaled offset (negative strides)
    dyn: bool           # rows from the address (HBM) or static (SBUF/PSUM partitions)
    r0: int
    nrows: int
    runs: int
    pitch: int
    extent: int
    span: int


def partition_block(spec: MachineSpec) -> int:
    """Partitions (HBM: rows) per bit of the WAW mask: writes to disjoint blocks of this many
    partitions do not order each other."""
    return max(1, -(-spec.partitions // MASK_BITS))


def row_block(spec: MachineSpec) -> int:
    """Rows per row block of a region (one MASK_BITS-bit mask covers a row block)."""
    return MASK_BITS * partition_block(spec)


def regions(program: Program, spec: MachineSpec) -> dict:
    """region key -> Region, in a fixed order (sbuf, psum, the HBM tensors)."""
    out = {}
    rbk = row_block(spec)
    g = spec.dep_granule_bytes
    for key, nbytes in (("sbuf", spec.sbuf_partition_bytes), ("psum", spec.psum_partition_bytes)):
        ncol = max(1, -(-nbytes // g))
        out[key] = Region(spec.partitions, nbytes, g, ncol, -(-spec.partitions // rbk) * ncol)
    g = spec.hbm_granule_bytes
    for t in program.tensors:
        shape = tuple(t.shape) or (1,)
        rows = max(1, math.prod(shape[:-1]))
        rb = max(1, shape[-1] * itemsize(t.dtype))
        ncol = -(-rb // g)
        out[("hbm", t.name)] = Region(rows, rb, g, ncol, -(-rows // rbk) * ncol)
    return out



def footprint(ap: AP, program: Program, spec: MachineSpec, regs: dict,
              tensors: "dict | None" = None) -> Footprint:
    es = itemsize(ap.dtype)
    if ap.mem == "hbm":
        try:
            t = tensors[ap.name] if tensors is not None else program.tensor(ap.name)
        except KeyError:
            raise SimError(f"operand refers to HBM tensor {ap.name!r}, which program "
                           f"{program.name!r} does not declare") from None
        key, scale, dims = ("hbm", ap.name), itemsize(t.dtype), ap.dims
    elif ap.mem in ("sbuf", "psum"):
        key, scale, dims = ap.mem, 1, ap.dims[1:]
    else:
        raise SimError(f"unknown memory {ap.mem!r} for operand {ap.name!r}; "
                       "known: hbm, sbuf, psum")
    reg = regs[key]
    rb = reg.row_bytes
    adj = 0
    row_span = 0
    ds = []
    for stride, size in dims:
        if size <= 1 or stride == 0:
            continue
        sb = stride * es
        if sb < 0:
            adj += sb * (size - 1)
            sb = -sb
        if key[0] == "hbm" and sb % rb == 0:
            row_span += sb // rb * (size - 1)        # steps whole rows
        else:
            ds.append((sb, size))
    if key[0] == "hbm":
        dyn, r0, nrows = True, 0, row_span + 1
    else:
        stride, n = ap.dims[0]
        dyn, r0 = False, ap.part + min(0, stride * (n - 1))
        nrows = abs(stride) * (n - 1) + 1
    if not ds:
        return Footprint(key, scale, adj, dyn, r0, nrows, 1, 0, es, es)
    span = sum(sb * (size - 1) for sb, size in ds) + es
    k = max(range(len(ds)), key=lambda i: ds[i][0])
    pitch, runs = ds[k]
    extent = span - pitch * (runs - 1)
    # separate runs only when the gap between them can hold a whole granule (otherwise they
    # touch every granule of the bounding range anyway); then runs <= span / granule + 1
    if pitch >= extent + reg.gran:
        return Footprint(key, scale, adj, dyn, r0, nrows, runs, pitch, extent, span)
    return Footprint(key, scale, adj, dyn, r0, nrows, 1, 0, span, span)


# ----------------------------------------------------------------------------------------
# flatten


@dataclass
class Flat:
    """A program flattened for the core (see the module docstring)."""
    code: np.ndarray        # [n, 6] (kind, level | instr id, extent, jump pc, loop's terms)
    itab: np.ndarray        # [instrs, I_COLS]
    otab: np.ndarray        # [operands, O_COLS]
    terms: np.ndarray       # [terms, T_COLS], grouped by loop
    depth: int
    n_cells: int
    max_segs: int           # most cell segments one instruction can touch
    instrs: list            # static id -> Instr
    costs: list             # static id -> Cost
    counts: np.ndarray      # static id -> dynamic executions


def hbm_bin_ps(spec: MachineSpec) -> int:
    """spec.hbm_bin_ns in ps, rounded to a power of two (bin index = time >> shift)."""
    return 1 << max(0, round(math.log2(max(spec.hbm_bin_ns * 1000.0, 1.0))))


def _shift(n: int) -> int:
    """log2(n) for a power of two, else -1 (the core then divides)."""
    return n.bit_length() - 1 if n > 0 and n & (n - 1) == 0 else -1


_CACHES: dict = {}      # id(spec) -> (spec, {Instr: (Cost, footprints, tensors)}, {AP: Footprint})
CACHE_CAP = 20_000


def _static_cache(spec: MachineSpec) -> tuple:
    """(spec, {Instr: (Cost, footprints, tensors)}, {AP: Footprint}) of this machine."""
    ent = _CACHES.get(id(spec))
    if ent is None or ent[0] is not spec:
        if len(_CACHES) >= 16:
            _CACHES.clear()
        ent = _CACHES[id(spec)] = (spec, {}, {})
    return ent


def _static(ins: Instr, spec: MachineSpec, program: Program, regs: dict, decls: dict,
            metas: dict, ent: tuple | None = None):
    """(Cost, footprints of reads + writes) of an instruction, cached per machine by the
    instruction's value: a tuner's candidates share most instruction templates, so repeated
    ones cost a dict lookup instead of the per-operand geometry. `ent`: _static_cache(spec)."""
    if ent is None:
        ent = _static_cache(spec)
    cache = ent[1]
    hit = cache.get(ins)
    if hit is not None:
        c, fps, used = hit
        # footprints depend on the HBM tensors' element size and row length too
        for n, m in used:
            if metas.get(n) != m:
                break
        else:
            return c, fps
    c = instr_cost(ins, spec)
    fpc = ent[2]
    fps = []
    for ap in c.reads + c.writes:
        key = (ap, metas.get(ap.name)) if ap.mem == "hbm" else ap
        fp = fpc.get(key)
        if fp is None:
            fp = footprint(ap, program, spec, regs, decls)
            if len(fpc) >= CACHE_CAP:
                fpc.clear()
            fpc[key] = fp
        fps.append(fp)
    fps = tuple(fps)
    used = tuple((ap.name, metas[ap.name]) for ap in c.reads + c.writes if ap.mem == "hbm")
    if len(cache) >= CACHE_CAP:
        cache.clear()
    cache[ins] = (c, fps, used)
    return c, fps


def flatten(program: Program, spec: MachineSpec) -> Flat:
    regs = regions(program, spec)
    rbk = row_block(spec)
    blk = rbk // MASK_BITS
    decls = {t.name: t for t in program.tensors}
    metas = {t.name: (t.dtype, tuple(t.shape)) for t in program.tensors}
    code: list = []
    statics: list = []          # per static instruction: (Instr, Cost, footprints, scope)
    counts: list = []
    depth = 0
    written, read = set(), set()
    ent = _static_cache(spec)

    def walk(nodes, scope: tuple, mult: int) -> None:
        nonlocal depth
        for n in nodes:
            if isinstance(n, Loop):
                if n.extent < 0:
                    raise SimError(f"loop {n.var!r} has negative extent {n.extent}")
                lvl = len(scope)
                if lvl >= depth:
                    depth = lvl + 1
                begin = len(code)
                code.append([LOOP_BEGIN, lvl, n.extent, 0, 0, 0])
                walk(n.body, scope + ((n.var, n.extent, begin),), mult * n.extent)
                code[begin][3] = len(code)
                code.append([LOOP_END, lvl, n.extent, begin, 0, 0])
            else:
                c, fps = _static(n, spec, program, regs, decls, metas, ent)
                nr = len(c.reads)
                for fp in fps[:nr]:
                    read.add(fp.region)
                for fp in fps[nr:]:
                    written.add(fp.region)
                code.append([INSTR, len(statics), 0, 0, 0, 0])
                statics.append((n, c, fps, scope))
                counts.append(mult)

    walk(program.body, (), 1)
    del walk    # a recursive closure is a reference cycle (holding the tables): free it now

    # regions no instruction writes: reading them can neither wait (RAW) nor hold up a
    # writer (WAR), so those reads are not tracked at all (exact, and saves most of the
    # work for input tensors); regions no instruction reads: writes need no WAR check.
    # Cell state is allocated for written regions only (numbered compactly here).
    cnum = {}
    n_cells = 0
    for key, reg in regs.items():
        if key in written:
            cnum[key] = n_cells
            n_cells += reg.cells
    rinfo = {key: (cnum[key], reg.rows, reg.row_bytes, _shift(reg.row_bytes), reg.ncol,
                   reg.gran, _shift(reg.gran), -(-reg.rows // rbk))
             for key, reg in regs.items() if key in written}
    untracked = (0,) * O_COLS
    irows: list = []
    orows: list = []
    trows: list = []
    max_segs = 1
    for ins, c, fps, scope in statics:
        op0 = len(orows)
        nr = len(c.reads)
        segs = 0
        for k, (ap, fp) in enumerate(zip(c.reads + c.writes, fps)):
            ri = rinfo.get(fp.region)
            if ri is None:                  # untracked: no address, no cells
                orows.append(untracked)
                continue
            cb, rows, rbytes, rbsh, ncol, gran, gsh, nrb = ri
            kind = K_READ if k < nr else (K_WRITE_WAR if fp.region in read else K_WRITE)
            off = ap.offset
            for var, coef, mod in off.terms:
                lvl = len(scope) - 1
                while lvl >= 0 and scope[lvl][0] != var:
                    lvl -= 1
                if lvl < 0:
                    names = ", ".join(v[0] for v in scope) or "none"
                    raise SimError(f"address of {ap.name!r} uses loop variable {var!r}, which "
                                   f"no enclosing loop defines (enclosing: {names})")
                if mod < 0:
                    raise SimError(f"address of {ap.name!r}: modulus {mod} of {var!r} must "
                                   "be >= 0")
                if mod >= scope[lvl][1]:
                    mod = 0                 # the loop never reaches the modulus
                if coef == 0 or mod == 1:
                    continue                # the term is always 0
                # x % mod == x & (mod - 1) for a power-of-two mod (saves a division)
                ext = scope[lvl][1]
                last = coef * fp.scale * (((ext - 1) % mod) if mod else ext - 1)
                trows.append((scope[lvl][2], coef * fp.scale, mod,
                              mod - 1 if mod and mod & (mod - 1) == 0 else -1, len(orows), last))
            runs, mask = fp.runs, 0
            if fp.dyn:
                # segments: one per row block and run (a wrapped access is one full-row run)
                touched = min(fp.nrows + (rbytes + fp.span - 2) // rbytes, rows)
                segs += min(nrb, (touched + rbk - 2) // rbk + 1) * runs
            else:                           # static rows (partitions): one row block
                r0, r1 = max(fp.r0, 0), min(fp.r0 + fp.nrows - 1, rows - 1)
                if r0 > r1:
                    runs = 0                # outside the memory: touches nothing
                else:
                    mask = ((2 << (r1 // blk)) - 1) ^ ((1 << (r0 // blk)) - 1)
                segs += runs
            mode = M_NONE if runs == 0 else M_FAST if runs == 1 and not fp.dyn else M_FULL
            orows.append((mode, off.base * fp.scale + fp.adj, cb, gsh, fp.extent,
                          ncol, kind, mask, gran, runs, fp.pitch, int(fp.dyn), rows, rbytes,
                          rbsh, fp.span, fp.nrows))
        if segs > max_segs:
            max_segs = segs
        irows.append((c.stream, c.ii_ps, c.lat_ps, int(c.is_dma), c.hbm_ps, c.ports, op0,
                      len(fps)))
    # terms grouped by the loop that drives them; each loop's range in its code rows
    trows.sort(key=lambda r: r[0])
    k = 0
    while k < len(trows):
        k1 = k
        begin = trows[k][0]
        while k1 < len(trows) and trows[k1][0] == begin:
            k1 += 1
        code[begin][4:6] = k, k1
        code[code[begin][3]][4:6] = k, k1
        k = k1
    return Flat(
        code=np.array(code, dtype=np.int64).reshape(-1, 6),
        itab=np.array(irows, dtype=np.int64).reshape(-1, I_COLS),
        otab=np.array(orows, dtype=np.int64).reshape(-1, O_COLS),
        terms=np.array(trows, dtype=np.int64).reshape(-1, T_COLS),
        depth=depth, n_cells=max(n_cells, 1), max_segs=max_segs,
        instrs=[x[0] for x in statics], costs=[x[1] for x in statics],
        counts=np.array(counts, dtype=np.int64))


# ----------------------------------------------------------------------------------------
# the Numba core


@njit(cache=True, error_model="numpy", inline="always")
def _dma_end(start, q, h, tag, used, bin_ps, bin_sh, mask):
    """End of a transfer needing q ps of its queue and h ps of the shared HBM channel
    (channel time reserved first come first served from the start bin on)."""
    b = start >> bin_sh
    slot = b & mask
    if tag[slot] == b:
        u = used[slot]
    elif tag[slot] > b:                         # forgotten bin: full
        u = bin_ps
    else:
        tag[slot] = b
        used[slot] = 0
        u = 0
    free = bin_ps - u
    avail = ((b + 1) << bin_sh) - start
    if free > avail:
        free = avail
    if h <= free:                               # fits the start bin: uncontended
        used[slot] = u + h
        e_h = start + h
    else:
        if free > 0:
            used[slot] = u + free
        rem = h - free
        while True:
            b += 1
            slot = b & mask
            tg = tag[slot]
            if tg != b:
                if tg > b:
                    continue
                tag[slot] = b
                used[slot] = 0
            u = used[slot]
            free = bin_ps - u
            if rem <= free:
                used[slot] = u + rem
                e_h = (b << bin_sh) + u + rem
                break
            used[slot] = bin_ps
            rem -= free
    e_q = start + q
    return e_q if e_q > e_h else e_h


@njit(cache=True, error_model="numpy")
def _addr_classes(code, otab, terms):
    """Group operands whose address terms are identical (same loops, coefficients and
    moduli in the same order) into address classes, so a loop step updates one offset per
    class instead of one address per operand (e.g. the three reads of a tile share one).
    Returns (class per operand, class terms in the `terms` layout with T_OP = class, and
    per code row the range of class terms its loop steps). Class 0: no terms."""
    n_ops = otab.shape[0]
    nt = terms.shape[0]
    cnt = np.zeros(n_ops + 1, np.int64)
    for k in range(nt):
        cnt[terms[k, T_OP] + 1] += 1
    for o in range(n_ops):
        cnt[o + 1] += cnt[o]
    lst = np.zeros(nt, np.int64)                # each operand's terms, in `terms` order
    fill = cnt[:n_ops].copy()
    for k in range(nt):
        o = terms[k, T_OP]
        lst[fill[o]] = k
        fill[o] += 1
    h = np.zeros(n_ops, np.int64)
    for o in range(n_ops):
        x = cnt[o + 1] - cnt[o]
        for j in range(cnt[o], cnt[o + 1]):
            k = lst[j]
            x = x * 1000003 + terms[k, T_LOOP]
            x = x * 1000003 + terms[k, T_COEF]
            x = x * 1000003 + terms[k, T_MOD]
        h[o] = x
    order = np.argsort(h, kind="mergesort")
    cls = np.zeros(n_ops, np.int64)
    rep = np.full(n_ops + 1, -1, np.int64)      # class -> its first operand
    ncls = 1
    prev = -1
    for j in range(n_ops):
        o = order[j]
        if cnt[o + 1] == cnt[o]:
            continue                            # no terms: class 0
        same = prev >= 0 and h[o] == h[prev] and cnt[o + 1] - cnt[o] == cnt[prev + 1] - cnt[prev]
        if same:
            for d in range(cnt[o + 1] - cnt[o]):
                a = lst[cnt[o] + d]
                b = lst[cnt[prev] + d]
                if (terms[a, T_LOOP] != terms[b, T_LOOP] or terms[a, T_COEF] != terms[b, T_COEF]
                        or terms[a, T_MOD] != terms[b, T_MOD]):
                    same = False
                    break
        if same:
            cls[o] = cls[prev]
        else:
            cls[o] = ncls
            rep[ncls] = o
            ncls += 1
            prev = o
    pre = np.zeros(nt + 1, np.int64)            # class terms among terms[:k]
    ct = np.zeros((nt, T_COLS), np.int64)
    n = 0
    for k in range(nt):
        o = terms[k, T_OP]
        if rep[cls[o]] == o:
            for c in range(T_COLS):
                ct[n, c] = terms[k, c]
            ct[n, T_OP] = cls[o]
            n += 1
        pre[k + 1] = n
    ncode = code.shape[0]
    crange = np.zeros((ncode, 2), np.int64)
    for pc in range(ncode):
        crange[pc, 0] = pre[code[pc, 4]]
        crange[pc, 1] = pre[code[pc, 5]]
    return cls, ct[:n], crange, ncls


@njit(cache=True, error_model="numpy")
def _core(code, itab, otab, terms, n_streams, depth, max_segs, bin_ps, rbk, rbk_sh, blk, blk_sh,
          st, tag, used, rec_cap):
    """Run the model. st (cell state, S_COLS entries per cell) and tag/used (HBM-channel
    bins) are caller-owned scratch: zero (tag: -1) on entry, and left so on return."""
    mask = tag.shape[0] - 1
    bin_sh = 0
    while (1 << bin_sh) < bin_ps:
        bin_sh += 1
    iv = np.zeros(max(depth, 1), np.int64)
    cls, cterms, crange, ncls = _addr_classes(code, otab, terms)
    # the tracked operands (mode != M_NONE) in instruction order, instruction i's being
    # hot[itr[i]:itr[i + 1]]: the fast path's columns in one 64-byte row, the mode column
    # packing mode | address class << 2 | operand << 32
    n_ins = itab.shape[0]
    itr = np.zeros(n_ins + 1, np.int64)
    hot = np.zeros((otab.shape[0], 8), np.int64)
    n = 0
    for i in range(n_ins):
        for o in range(itab[i, I_OP0], itab[i, I_OP0] + itab[i, I_NOPS]):
            if otab[o, O_MODE] != M_NONE:
                for c in range(8):
                    hot[n, c] = otab[o, c]
                hot[n, O_MODE] = otab[o, O_MODE] | (cls[o] << 2) | (o << 32)
                n += 1
        itr[i + 1] = n
    coff = np.zeros(ncls, np.int64)             # address classes' offsets, kept up to date
    sfree = np.zeros(n_streams, np.int64)
    busy = np.zeros(n_streams, np.int64)
    port_sbuf = 0
    port_psum = 0
    seg = np.zeros(max_segs * 4, np.int64)      # per segment: first cell, last cell, kind, mask
    rec_s = np.zeros(rec_cap, np.int64)
    rec_e = np.zeros(rec_cap, np.int64)
    rec_i = np.zeros(rec_cap, np.int64)
    gmin = st.shape[0] // S_COLS                           # touched cell range, cleared on return
    gmax = -1
    bmin = 1 << 62                               # touched bins
    bmax = -1
    nrec = 0
    total = 0
    hbm_busy = 0
    ndyn = 0
    ncode = code.shape[0]
    pc = 0
    while pc < ncode:
        kind = code[pc, 0]
        if kind == INSTR:
            i = code[pc, 1]
            s = itab[i, I_STREAM]
            s1 = s + 1
            t = sfree[s]
            ports = itab[i, I_PORTS]
            if ports != 0:
                if ports & PORT_SBUF and port_sbuf > t:
                    t = port_sbuf
                if ports & PORT_PSUM and port_psum > t:
                    t = port_psum
            # footprints: evaluate the affine addresses, cut into cell segments
            ns = 0
            for j in range(itr[i], itr[i + 1]):
                mc = hot[j, O_MODE]
                o = mc >> 32
                mode = mc & 3
                a = hot[j, O_BASE] + coff[(mc >> 2) & 0x3FFFFFFF]
                if mode == M_FAST:          # one run of static rows: one segment
                    gsh = hot[j, O_GSH]
                    if gsh >= 0:
                        g0 = a >> gsh
                        g1 = (a + hot[j, O_E] - 1) >> gsh
                    else:
                        g0 = a // otab[o, O_G]
                        g1 = (a + hot[j, O_E] - 1) // otab[o, O_G]
                    if g0 < 0:
                        g0 = 0
                    if g1 >= hot[j, O_NCOL]:
                        g1 = hot[j, O_NCOL] - 1
                    if g0 <= g1:
                        cb = hot[j, O_CBASE]
                        seg[4 * ns] = cb + g0
                        seg[4 * ns + 1] = cb + g1
                        seg[4 * ns + 2] = hot[j, O_KIND]
                        seg[4 * ns + 3] = hot[j, O_MASK]
                        ns += 1
                    continue
                # general: one group of segments per row block (rows from the address
                # for HBM), each the column runs, adjacent runs merged
                runs = otab[o, O_RUNS]
                pitch = otab[o, O_PITCH]
                ext = otab[o, O_E]
                col = a
                rb0 = 0
                rb1 = 0
                r0 = 0
                r1 = 0
                if otab[o, O_DYN]:
                    rbytes = otab[o, O_RB]
                    sh = otab[o, O_RBSH]
                    if sh >= 0:
                        r0 = a >> sh
                    else:
                        r0 = a // rbytes
                    col = a - r0 * rbytes
                    r1 = r0 + otab[o, O_NROWS] - 1
                    span = otab[o, O_SPAN]
                    if col + span > rbytes:     # wraps into the next row(s): whole rows
                        r1 += (col + span - 1) // rbytes
                        col = 0
                        runs = 1
                        pitch = 0
                        ext = rbytes
                    if r0 < 0:
                        r0 = 0
                    if r1 >= otab[o, O_ROWS]:
                        r1 = otab[o, O_ROWS] - 1
                    if r0 > r1:
                        continue
                    if rbk_sh >= 0:
                        rb0 = r0 >> rbk_sh
                        rb1 = r1 >> rbk_sh
                    else:
                        rb0 = r0 // rbk
                        rb1 = r1 // rbk
                ncol = otab[o, O_NCOL]
                gb = otab[o, O_G]
                gsh = otab[o, O_GSH]
                kind = otab[o, O_KIND]
                for rb in range(rb0, rb1 + 1):
                    if otab[o, O_DYN]:
                        lo_r = r0 - rb * rbk
                        if lo_r < 0:
                            lo_r = 0
                        hi_r = r1 - rb * rbk
                        if hi_r >= rbk:
                            hi_r = rbk - 1
                        if blk_sh >= 0:
                            m = ((2 << (hi_r >> blk_sh)) - 1) ^ ((1 << (lo_r >> blk_sh)) - 1)
                        else:
                            m = ((2 << (hi_r // blk)) - 1) ^ ((1 << (lo_r // blk)) - 1)
                    else:
                        m = otab[o, O_MASK]
                    base = otab[o, O_CBASE] + rb * ncol
                    first = ns
                    prev = -1
                    for r in range(runs):
                        lo = col + r * pitch
                        hi = lo + ext - 1
                        if gsh >= 0:
                            g0 = lo >> gsh
                            g1 = hi >> gsh
                        else:
                            g0 = lo // gb
                            g1 = hi // gb
                        if g0 <= prev:
                            g0 = prev + 1
                        if g0 < 0:
                            g0 = 0
                        if g1 >= ncol:
                            g1 = ncol - 1
                        if g0 <= g1:
                            if ns > first and seg[4 * (ns - 1) + 1] == base + g0 - 1:
                                seg[4 * (ns - 1) + 1] = base + g1
                            else:
                                seg[4 * ns] = base + g0
                                seg[4 * ns + 1] = base + g1
                                seg[4 * ns + 2] = kind
                                seg[4 * ns + 3] = m
                                ns += 1
                            prev = g1
            # RAW for reads; WAW (unless the same stream wrote last) and WAR for writes
            for k in range(ns):
                lo = seg[4 * k]
                hi = seg[4 * k + 1] + 1
                kk = seg[4 * k + 2]
                if hi == lo + 1:                # one cell (the common case): no loop
                    g8 = lo * S_COLS
                    if kk == K_READ:
                        if st[g8 + S_LW] > t:
                            t = st[g8 + S_LW]
                    else:
                        if kk == K_WRITE_WAR and st[g8 + S_LR] > t:
                            t = st[g8 + S_LR]
                        if st[g8 + S_LWM] & seg[4 * k + 3]:
                            if st[g8 + S_LWS] != s1 and st[g8 + S_LW] > t:
                                t = st[g8 + S_LW]
                        elif st[g8 + S_LWO] > t:
                            t = st[g8 + S_LWO]
                elif kk == K_READ:
                    for g in range(lo, hi):
                        g8 = g * S_COLS
                        if g8 < 0:      # (never: a second exit keeps LLVM from vectorizing
                            break       # these loops of a few cells with gathers)
                        if st[g8 + S_LW] > t:
                            t = st[g8 + S_LW]
                else:
                    war = kk == K_WRITE_WAR
                    m = seg[4 * k + 3]
                    for g in range(lo, hi):
                        g8 = g * S_COLS
                        if g8 < 0:
                            break
                        if war and st[g8 + S_LR] > t:
                            t = st[g8 + S_LR]
                        if st[g8 + S_LWM] & m:
                            if st[g8 + S_LWS] != s1 and st[g8 + S_LW] > t:
                                t = st[g8 + S_LW]
                        elif st[g8 + S_LWO] > t:
                            t = st[g8 + S_LWO]
            start = t
            if itab[i, I_DMA]:
                h = itab[i, I_HBM]
                if h > 0:
                    end = _dma_end(start, itab[i, I_II], h, tag, used, bin_ps, bin_sh, mask)
                    hbm_busy += h
                    b = start >> bin_sh
                    if b < bmin:
                        bmin = b
                    b = end >> bin_sh
                    if b > bmax:
                        bmax = b
                else:
                    end = start + itab[i, I_II]
            else:
                end = start + itab[i, I_II]
            ready = end + itab[i, I_LAT]
            sfree[s] = end
            busy[s] += end - start
            if ports != 0:
                if ports & PORT_SBUF:
                    port_sbuf = end
                if ports & PORT_PSUM:
                    port_psum = end
            for k in range(ns):
                lo = seg[4 * k]
                hi = seg[4 * k + 1] + 1
                if hi == lo + 1:                # one cell: no loop
                    g8 = lo * S_COLS
                    if seg[4 * k + 2] == K_READ:
                        if end > st[g8 + S_LR]:
                            st[g8 + S_LR] = end
                    else:
                        m = seg[4 * k + 3]
                        if st[g8 + S_LWM] & m:
                            st[g8 + S_LWO] = st[g8 + S_LW]
                            st[g8 + S_LWM] = m
                            st[g8 + S_LWS] = s1
                        else:
                            if st[g8 + S_LWM] == 0:
                                st[g8 + S_LWS] = s1
                            elif st[g8 + S_LWS] != s1:
                                st[g8 + S_LWS] = -1
                            st[g8 + S_LWM] |= m
                        if ready > st[g8 + S_LW]:
                            st[g8 + S_LW] = ready
                elif seg[4 * k + 2] == K_READ:
                    for g in range(lo, hi):
                        g8 = g * S_COLS
                        if g8 < 0:
                            break
                        if end > st[g8 + S_LR]:
                            st[g8 + S_LR] = end
                else:
                    m = seg[4 * k + 3]
                    for g in range(lo, hi):
                        g8 = g * S_COLS
                        if g8 < 0:
                            break
                        if st[g8 + S_LWM] & m:              # overlaps this epoch's writes: a new epoch
                            st[g8 + S_LWO] = st[g8 + S_LW]
                            st[g8 + S_LWM] = m
                            st[g8 + S_LWS] = s1
                        else:                       # disjoint partitions: joins the epoch
                            if st[g8 + S_LWM] == 0:
                                st[g8 + S_LWS] = s1
                            elif st[g8 + S_LWS] != s1:
                                st[g8 + S_LWS] = -1
                            st[g8 + S_LWM] |= m
                        if ready > st[g8 + S_LW]:
                            st[g8 + S_LW] = ready
                if lo < gmin:
                    gmin = lo
                if hi > gmax:
                    gmax = hi
            if ready > total:
                total = ready
            if nrec < rec_cap:
                rec_s[nrec] = start
                rec_e[nrec] = end
                rec_i[nrec] = i
                nrec += 1
            ndyn += 1
            pc += 1
        elif kind == LOOP_BEGIN:
            lvl = code[pc, 1]
            iv[lvl] = 0                             # (the loop's terms are 0 here)
            if code[pc, 2] <= 0:
                pc = code[pc, 3] + 1
            else:
                pc += 1
        else:
            lvl = code[pc, 1]
            x = iv[lvl] + 1
            iv[lvl] = x
            if x < code[pc, 2]:
                for k in range(crange[pc, 0], crange[pc, 1]):   # step the loop's terms
                    if cterms[k, T_MOD] == 0:
                        coff[cterms[k, T_OP]] += cterms[k, T_COEF]
                    else:
                        if cterms[k, T_MASK] >= 0:
                            y = x & cterms[k, T_MASK]
                        else:
                            y = x % cterms[k, T_MOD]
                        if y == 0:                  # wrapped
                            coff[cterms[k, T_OP]] -= cterms[k, T_COEF] * (cterms[k, T_MOD] - 1)
                        else:
                            coff[cterms[k, T_OP]] += cterms[k, T_COEF]
                pc = code[pc, 3] + 1
            else:
                for k in range(crange[pc, 0], crange[pc, 1]):   # back to 0 for the next entry
                    coff[cterms[k, T_OP]] -= cterms[k, T_LAST]
                pc += 1
    for g8 in range(gmin * S_COLS, gmax * S_COLS):   # leave the scratch clean for the next run
        st[g8] = 0
    if bmax - bmin + 1 >= tag.shape[0]:
        tag[:] = -1
        used[:] = 0
    else:
        for b in range(bmin, bmax + 1):
            tag[b & mask] = -1
            used[b & mask] = 0
    return total, busy, hbm_busy, ndyn, rec_s[:nrec], rec_e[:nrec], rec_i[:nrec]


def run_core(flat: Flat, spec: MachineSpec, rec_cap: int = 0):
    """Run the Numba core on a flattened program: (total_ps, busy[stream], hbm_busy_ps,
    dynamic count, start_ps[], end_ps[], static_id[]) (records only up to rec_cap)."""
    st, tag, used = _scratch(flat.n_cells, HBM_RING_BINS)
    return _core(flat.code, flat.itab, flat.otab, flat.terms, len(ENGINES) + spec.dma_queues,
                 flat.depth, flat.max_segs, hbm_bin_ps(spec), row_block(spec),
                 _shift(row_block(spec)), partition_block(spec), _shift(partition_block(spec)),
                 st, tag, used, rec_cap)


_pool = threading.local()


def _scratch(n_cells: int, n_bins: int):
    """Per-thread scratch state for the core, reused across runs (allocating and
    page-faulting the cell state per candidate would dominate small runs)."""
    if n_bins & (n_bins - 1):
        raise SimError(f"HBM_RING_BINS={n_bins} must be a power of two")
    st = getattr(_pool, "state", None)
    if st is None or st[0].shape[0] < n_cells * S_COLS or st[1].shape[0] != n_bins:
        st = (np.zeros(max(n_cells, 4096) * S_COLS, np.int64), np.full(n_bins, -1, np.int64),
              np.zeros(n_bins, np.int64))
        _pool.state = st
    return st

# ----------------------------------------------------------------------------------------
# the entry point


def _ap_str(ap: AP) -> str:
    return f"{ap.mem}:{ap.name}[{ap.offset}]{list(ap.shape)}:{ap.dtype}"


def make_report(program: Program, spec: MachineSpec, flat: Flat, total_ps: int, busy,
                hbm_busy: int, ndyn: int, trace: dict | None = None) -> Report:
    """Assemble a Report from the static tables and the simulated totals."""
    names = stream_names(spec)
    total_ps = int(total_ps)
    costs = flat.costs
    flops = hbm_r = hbm_w = sbuf_b = psum_b = 0
    mm_time_s = 0.0
    for c, n in zip(costs, flat.counts.tolist()):
        flops += c.flops * n
        hbm_r += c.hbm_read * n
        hbm_w += c.hbm_write * n
        sbuf_b += c.sbuf_bytes * n
        psum_b += c.psum_bytes * n
        if c.mm_flops:
            mm_time_s += c.mm_flops * n / spec.peak_flops(c.mm_dtype)
    compulsory = sum(itemsize(t.dtype) * math.prod(t.shape) for t in program.tensors
                     if t.kind in ("input", "output"))
    mem_time_s = compulsory / (spec.dma_gbps * 1e9)
    roof_us = max(mm_time_s, mem_time_s) * 1e6
    time_us = total_ps / 1e6
    busy_pct = {}
    pct = (lambda v: 100.0 * int(v) / total_ps) if total_ps else (lambda v: 0.0)
    for s, name in enumerate(names[:len(ENGINES)]):
        busy_pct[name] = pct(busy[s])
    used_q = sorted({c.stream for c in costs if c.is_dma})
    for s in used_q:
        busy_pct[names[s]] = pct(busy[s])
    busy_pct["dma"] = (sum(busy_pct[names[s]] for s in used_q) / len(used_q)) if used_q else 0.0
    busy_pct["hbm"] = pct(hbm_busy)
    return Report(
        program=program.name, machine=spec.name,
        cycles=int(round(total_ps * spec.pe_clock_ghz / 1000.0)),
        time_ns=total_ps / 1e3, time_us=time_us, engine_busy=busy_pct,
        bytes_moved={"hbm_read": hbm_r, "hbm_write": hbm_w, "sbuf": sbuf_b, "psum": psum_b},
        flops=flops, instructions=int(ndyn), roofline_us=roof_us,
        roofline_fraction=min(1.0, roof_us / time_us) if time_us > 0 else 1.0,
        bound="compute" if mm_time_s >= mem_time_s else "memory", _trace=trace)


def simulate(program: Program, spec: "MachineSpec | str" = "trn2", trace: bool = False,
             trace_cap: int = TRACE_CAP) -> Report:
    """Simulate `program` on `spec` (a MachineSpec or preset name); see the module docstring.

    trace=True records the start/end of the first `trace_cap` dynamic instructions so that
    `report.save_trace(path)` can write a Chrome/Perfetto timeline.
    """
    spec = machine(spec)
    flat = flatten(program, spec)
    cap = min(int(trace_cap), int(flat.counts.sum())) if trace else 0
    total, busy, hbm_busy, ndyn, rs, re_, ri = run_core(flat, spec, cap)
    tr = None
    if trace:
        names = stream_names(spec)
        info = []
        for ins, c in zip(flat.instrs, flat.costs):
            args = {"op": ins.op, "engine": ins.engine, "dst": _ap_str(ins.dst),
                    "srcs": [_ap_str(a) for a in ins.srcs]}
            if ins.dst2 is not None:
                args["dst2"] = _ap_str(ins.dst2)
            for k, v in ins.attrs:
                args[k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
            info.append((ins.op, c.stream, args))
        tr = {"streams": names, "start_ps": rs, "end_ps": re_, "static_id": ri,
              "instrs": info, "cap": cap}
    return make_report(program, spec, flat, total, busy, hbm_busy, ndyn, tr)
