"""A plain pure-Python implementation of the timing model of `sim.timing`.

Used by the tests to check the Numba core: it walks the loop tree recursively with a dict
of loop variables, evaluates each operand's `Addr` with `Addr.eval`, enumerates granules
into Python sets and keeps the model's state in dicts. Only the static per-instruction
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
from .timing import (PORT_PSUM, PORT_SBUF, footprint, hbm_bin_ps, instr_cost, partition_mask,
                     regions)


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
        self.last_write: dict = {}          # (region, granule) -> ready ps
        self.last_writer: dict = {}         # (region, granule) -> stream
        self.last_read: dict = {}           # (region, granule) -> end ps
        self.epoch_mask: dict = {}          # (region, granule) -> partition blocks written this epoch
        self.before_epoch: dict = {}        # (region, granule) -> latest ready before the epoch
        self.bin_ps = hbm_bin_ps(spec)
        self.n_bins = timing.HBM_RING_BINS
        self.bin_tag = [-1] * self.n_bins
        self.bin_used = [0] * self.n_bins
        self.static_ids: dict = {}          # id(Instr) at its tree position -> static id
        self.costs: dict = {}
        self.fps: dict = {}
        self.res = RefResult()

    # -- footprints ------------------------------------------------------------------------
    def granules(self, ap, env) -> set:
        key = id(ap)
        fp = self.fps.get(key)
        if fp is None:
            fp = self.fps[key] = footprint(ap, self.program, self.spec, self.regs)
        _, n, gb = self.regs[fp.region]
        a = ap.offset.eval(env) * fp.scale + fp.adj
        out = set()
        for r in range(fp.rows):
            lo = a + r * fp.pitch
            g0 = max(lo // gb, 0)
            g1 = min((lo + fp.extent - 1) // gb, n - 1)
            for g in range(g0, g1 + 1):
                out.add((fp.region, g))
        return out

    # -- the shared HBM channel ------------------------------------------------------------
    def dma_end(self, start: int, q: int, h: int) -> int:
        if h <= 0:
            return start + q
        w, nb = self.bin_ps, self.n_bins
        t, rem = start, h
        while True:
            b = t // w
            bin_end = (b + 1) * w
            avail = bin_end - t
            slot = b % nb
            if self.bin_tag[slot] != b:
                if self.bin_tag[slot] > b:       # forgotten: full
                    t = bin_end
                    continue
                self.bin_tag[slot] = b
                self.bin_used[slot] = 0
            free = min(w - self.bin_used[slot], avail)
            rate_cap = -(-(avail * h) // q)
            take = min(rem, rate_cap, free)
            self.bin_used[slot] += take
            rem -= take
            if rem == 0:
                fin = max(take, -(-(take * q) // h))
                channel_end = min(t + fin, bin_end)
                return max(start + q, channel_end)
            t = bin_end

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
        read_gs = [self.granules(ap, env) for ap in c.reads]
        write_gs = [self.granules(ap, env) for ap in c.writes]
        write_ms = [partition_mask(ap, self.spec) for ap in c.writes]
        for gs in read_gs:                               # RAW
            for g in gs:
                t = max(t, self.last_write.get(g, 0))
        for gs, m in zip(write_gs, write_ms):            # WAR, WAW
            for g in gs:
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
        for gs, m in zip(write_gs, write_ms):
            for g in gs:
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
