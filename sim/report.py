"""Report: the result of the timing simulator (`sim.timing.simulate`).

Fields (all derived from one simulated run of a Program on a MachineSpec):

  cycles            total time in tensor-engine (pe) clock cycles (rounded to nearest)
  time_ns, time_us  total time: the moment the last result (including DMA completion
                    latency) is ready
  engine_busy       dict name -> % of the total time that stream was busy:
                      "pe", "act", "dve", "pool"   the compute engines (issue intervals)
                      "q0".."qN"                   each DMA queue that was used
                      "dma"                        mean over the DMA queues that were used
                      "hbm"                        the HBM channel shared by the queues
                                                   (bytes / spec.hbm_gbps over the total)
  bytes_moved       dict memory -> bytes:
                      "hbm_read", "hbm_write"      bytes DMAs read from / wrote to HBM
                      "sbuf", "psum"               bytes read + written in that memory by all
                                                   instructions (each operand counted once per
                                                   execution: partitions x free x dtype size)
  flops             matmul: 2*K*M*N; activation / tensor_scalar / tensor_tensor / select:
                    1 per output element; tensor_reduce: 1 per input element; data movement
                    (dma, tensor_copy, transpose, memset, iota): 0
  instructions      dynamic instruction count (loops expanded)
  roofline_us       max(matmul flops / spec.peak_flops(input dtype),
                        compulsory HBM bytes / spec.dma_gbps), where the compulsory bytes are
                    the sizes of the program's input and output tensors (scratch excluded);
                    a compiled kernel's report (tensorlang CompiledKernel.simulate) counts
                    in the matmul term only the contractions its algorithm asks for, not
                    the diagonal / broadcast matmuls the lowering adds
  roofline_fraction roofline_us / time_us, clipped to [0, 1]
  bound             "compute" if the flop term of the roofline dominates, else "memory"

`save_trace(path)` writes a Chrome / Perfetto trace (open in ui.perfetto.dev or
chrome://tracing) when the run was made with `simulate(..., trace=True)`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Report:
    program: str
    machine: str
    cycles: int
    time_ns: float
    time_us: float
    engine_busy: dict
    bytes_moved: dict
    flops: int
    instructions: int
    roofline_us: float
    roofline_fraction: float
    bound: str
    # trace data (only when simulate(trace=True)); not part of to_dict()
    _trace: dict | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "program": self.program, "machine": self.machine, "cycles": self.cycles,
            "time_ns": self.time_ns, "time_us": self.time_us,
            "engine_busy": dict(self.engine_busy), "bytes_moved": dict(self.bytes_moved),
            "flops": self.flops, "instructions": self.instructions,
            "roofline_us": self.roofline_us, "roofline_fraction": self.roofline_fraction,
            "bound": self.bound,
        }

    def __str__(self) -> str:
        rows = [
            ("program", self.program), ("machine", self.machine),
            ("time", f"{self.time_us:,.3f} us  ({self.cycles:,} pe cycles)"),
            ("instructions", f"{self.instructions:,}"),
            ("flops", f"{self.flops:,}"),
            ("roofline", f"{self.roofline_us:,.3f} us  ({self.bound}-bound, "
                         f"{100 * self.roofline_fraction:.1f}% of it reached)"),
        ]
        for k, v in self.bytes_moved.items():
            rows.append((f"bytes {k}", f"{v:,}"))
        busy = "  ".join(f"{k} {v:.1f}%" for k, v in self.engine_busy.items())
        rows.append(("busy", busy))
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

    def save_trace(self, path) -> None:
        """Write the simulated timeline as Chrome trace JSON (one row per engine / DMA queue)."""
        from .machine import SimError  # noqa: PLC0415
        if self._trace is None:
            raise SimError("no per-instruction times were recorded for this report; "
                           "run simulate(program, spec, trace=True) to get a trace")
        t = self._trace
        names = t["streams"]            # stream id -> row name
        starts, ends, sids = t["start_ps"], t["end_ps"], t["static_id"]
        info = t["instrs"]              # static id -> (op, stream id, args dict)
        used = sorted({info[int(i)][1] for i in set(sids.tolist())})
        events = [{"ph": "M", "name": "process_name", "pid": 0,
                   "args": {"name": f"{self.program} on {self.machine}"}}]
        for s in used:
            events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": int(s),
                           "args": {"name": names[s]}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": int(s),
                           "args": {"sort_index": int(s)}})
        for st, en, i in zip(starts.tolist(), ends.tolist(), sids.tolist()):
            op, s, args = info[i]
            events.append({"ph": "X", "name": op, "pid": 0, "tid": s, "ts": st / 1e6,
                           "dur": (en - st) / 1e6, "args": args})
        meta = {"recorded_instructions": int(len(sids)), "total_instructions": self.instructions,
                "record_cap": t["cap"], "truncated": bool(len(sids) < self.instructions),
                "time_unit": "us", "report": self.to_dict()}
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ns", "otherData": meta}, f)
