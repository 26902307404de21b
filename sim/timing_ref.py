"""A plain pure-Python implementation of the timing model of `sim.timing`.

Used by the tests to check the Numba core: it walks the loop tree recursively with a dict
of loop variables, evaluates each operand's `Addr` with `Addr.eval`, enumerates its cells
(row blocks x column granules, row masks from the set of rows) into dicts and keeps the
model's state in dicts; the HBM channel is a ring of bins (lists) walked bin by bin. Only the static per-instruction
rules (issue intervals, latencies, DMA byte counts: `timing.instr_cost`) and the static
footprint geometry (`timing.footprint`) are shared with the fast path, so the loop
expansion, address arithmetic, dependency tracking, DMA / HBM-channel model and the
counters are implemented twice. Both must give identical integer picosecond times.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .isa import Loop, Program
from .machine import MachineSpec, machine
from . import timing
from .timing import (PORT_PSUM, PORT_SBUF, footprint, hbm_bin_ps, instr_cost, partition_block,
                     regions, row_block)


@dataclass
class RefResult:
    total_ps: int = 0
    busy: dict = field(default_factory=dict)       # stream id -> busy ps
    hbm_busy: int = 0
    records: list = field(default_factory=list)   # (static id, start ps, end ps) per dynamic instr


class _Model:
    def __init__(self, program: Program, spec: MachineSpec):
        self.program, self.spec = program, spec
        self.regs = regions(program, spec)
        self.stream_free: dict[int, int] = {}
        self.port_free = {PORT_SBUF: 0, PORT_PSUM: 0}
        self.rbk, self.blk = row_block(spec), partition_block(spec)
        self.last_write: dict = {}          # cell -> ready ps
        self.last_writer: dict = {}         # cell -> stream
        self.last_read: dict = {}           # cell -> end ps
        self.epoch_mask: dict = {}          # cell -> row sub-blocks written this epoch
        self.before_epoch: dict = {}        # cell -> latest ready before the epoch
        self.bin_ps = hbm_bin_ps(spec)
        self.n_bins = timing.HBM_RING_BINS
        self.bin_tag = [-1] * self.n_bins
        self.bin_used = [0] * self.n_bins
        self.static_ids: dict = {}          # id(Instr) at its tree position -> static id
        self.costs: dict = {}
        self.fps: dict = {}
        self.res = RefResult()

    # -- footprints ------------------------------------------------------------------------
    def cells(self, ap, env) -> dict:
        """{(region, row block, granule): mask of the row sub-blocks touched}."""
        key = id(ap)
        fp = self.fps.get(key)
        if fp is None:
            fp = self.fps[key] = footprint(ap, self.program, self.spec, self.regs)
        reg = self.regs[fp.region]
        a = ap.offset.eval(env) * fp.scale + fp.adj
        runs = [(r * fp.pitch, fp.extent) for r in range(fp.runs)]
        if fp.dyn:
            first, col = divmod(a, reg.row_bytes)
            last = first + fp.nrows - 1
            if col + fp.span > reg.row_bytes:       # wraps: whole rows
                last = (a + fp.span - 1) // reg.row_bytes + fp.nrows - 1
                col, runs = 0, [(0, reg.row_bytes)]
        else:
            first, last, col = fp.r0, fp.r0 + fp.nrows - 1, a
        first, last = max(first, 0), min(last, reg.rows - 1)
        grans = set()
        for off, ext in runs:
            lo = col + off
            grans.update(range(max(lo // reg.gran, 0),
                               min((lo + ext - 1) // reg.gran, reg.ncol - 1) + 1))
        out: dict = {}
        for rb in range(first // self.rbk, last // self.rbk + 1 if first <= last else 0):
            rows = range(max(first, rb * self.rbk), min(last, rb * self.rbk + self.rbk - 1) + 1)
            mask = sum(1 << b for b in {(r - rb * self.rbk) // self.blk for r in rows})
            for g in grans:
                out[(fp.region, rb, g)] = mask
        return out

    # -- the shared HBM channel ------------------------------------------------------------
    def channel_used(self, b: int):
        """Channel time used in bin b, or None if the ring has forgotten it (full)."""
        slot = b % self.n_bins
        if self.bin_tag[slot] > b:
            return None
        if self.bin_tag[slot] < b:
            self.bin_tag[slot], self.bin_used[slot] = b, 0
        return self.bin_used[slot]

    def dma_end(self, start: int, q: int, h: int) -> int:
        if h <= 0:
            return start + q
        w = self.bin_ps
        b, rem = start // w, h
        while True:
            used = self.channel_used(b)
            if used is not None:
                free = w - used
                if b == start // w:
                    free = min(free, (b + 1) * w - start)
                take = min(rem, free)
                self.bin_used[b % self.n_bins] += take
                rem -= take
                if rem == 0:
                    channel_end = start + take if b == start // w else b * w + used + take
                    return max(start + q, channel_end)
            b += 1

    # -- one instruction -------------------------------------------------------------------
    def execute(self, ins, sid: int, env: dict) -> None:
        c = self.costs.get(sid)
        if c is None:
            c = self.costs[sid] = instr_cost(ins, self.spec)
        s = c.stream
        t = self.stream_free.get(s, 0)
        for bit in (PORT_SBUF, PORT_PSUM):
            if c.ports & bit:
                t = max(t, self.port_free[bit])
        read_gs = [self.cells(ap, env) for ap in c.reads]
        write_gs = [self.cells(ap, env) for ap in c.writes]
        for gs in read_gs:                               # RAW
            for g in gs:
                t = max(t, self.last_write.get(g, 0))
        for gs in write_gs:                              # WAR, WAW
            for g, m in gs.items():
                t = max(t, self.last_read.get(g, 0))
                if self.epoch_mask.get(g, 0) & m:
                    if self.last_writer.get(g) != s:
                        t = max(t, self.last_write.get(g, 0))
                else:
                    t = max(t, self.before_epoch.get(g, 0))
        start = t
        if c.is_dma:
            end = self.dma_end(start, c.ii_ps, c.hbm_ps)
            self.res.hbm_busy += c.hbm_ps
        else:
            end = start + c.ii_ps
        ready = end + c.lat_ps
        self.stream_free[s] = end
        self.res.busy[s] = self.res.busy.get(s, 0) + end - start
        for bit in (PORT_SBUF, PORT_PSUM):
            if c.ports & bit:
                self.port_free[bit] = end
        for gs in read_gs:
            for g in gs:
                self.last_read[g] = max(self.last_read.get(g, 0), end)
        for gs in write_gs:
            for g, m in gs.items():
                em = self.epoch_mask.get(g, 0)
                if em & m:                      # overlapping: a new epoch
                    self.before_epoch[g] = self.last_write.get(g, 0)
                    self.epoch_mask[g] = m
                    self.last_writer[g] = s
                else:                           # disjoint partitions: join the epoch
                    if em == 0:
                        self.last_writer[g] = s
                    elif self.last_writer.get(g) != s:
                        self.last_writer[g] = "mixed"
                    self.epoch_mask[g] = em | m
                self.last_write[g] = max(self.last_write.get(g, 0), ready)
        self.res.total_ps = max(self.res.total_ps, ready)
        self.res.records.append((sid, start, end))

    # -- the loop tree -----------------------------------------------------------------------
    def number(self, nodes, path=()) -> None:
        """Static ids in program order (the order `timing.flatten` uses)."""
        for k, n in enumerate(nodes):
            if isinstance(n, Loop):
                self.number(n.body, path + (k,))
            else:
                self.static_ids[path + (k,)] = len(self.static_ids)

    def run(self, nodes, env: dict, path=()) -> None:
        for k, n in enumerate(nodes):
            if isinstance(n, Loop):
                saved = env.get(n.var)
                for i in range(n.extent):
                    env[n.var] = i
                    self.run(n.body, env, path + (k,))
                if saved is None:
                    env.pop(n.var, None)
                else:
                    env[n.var] = saved
            else:
                self.execute(n, self.static_ids[path + (k,)], env)


def simulate_ref(program: Program, spec: "MachineSpec | str" = "trn2") -> RefResult:
    """The timing model in plain Python: totals, busy times and every dynamic instruction's
    (static id, start, end) in picoseconds."""
    spec = machine(spec)
    m = _Model(program, spec)
    m.number(program.body)
    m.run(program.body, {})
    return m.res
