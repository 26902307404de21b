"""MachineSpec: every figure the simulators use, and the trn1 / trn2 presets.

Figures come from the public Neuron documentation (see docs/machine.md). Nothing in
`sim` hard-codes a machine number: the ISA checks, the functional simulator and the timing
model read them from a MachineSpec. What-if machines are `spec.replace(...)` or a TOML file.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field


class SimError(ValueError):
    """A user-facing error from the machine layer: names the thing, its value and the limit."""


ENGINES = ("pe", "act", "dve", "pool")  # tensor, scalar(activation), vector, gpsimd


@dataclass(frozen=True)
class MachineSpec:
    name: str
    # -- geometry -------------------------------------------------------------------------
    partitions: int = 128                 # SBUF/PSUM partitions = systolic rows
    pe_rows: int = 128                    # systolic array K (contraction) size
    pe_cols: int = 128                    # systolic array M (stationary columns)
    matmul_max_n: int = 512               # moving free size per matmul
    sbuf_partition_bytes: int = 192 * 1024
    psum_partition_bytes: int = 16 * 1024
    psum_banks: int = 8
    max_free_elems_sbuf: int = 65536      # vector/scalar instruction free elements from SBUF
    max_free_elems_psum: int = 4096       # ... from PSUM
    hbm_bytes: int = 32 * 1024 ** 3
    # -- clocks (GHz) -----------------------------------------------------------------------
    pe_clock_ghz: float = 2.8
    act_clock_ghz: float = 1.4
    dve_clock_ghz: float = 1.12
    pool_clock_ghz: float = 1.4
    # -- tensor engine rates (multiplier on bf16 throughput) --------------------------------
    pe_rate: dict = field(default_factory=lambda: {
        "float32": 0.25, "bfloat16": 1.0, "float16": 1.0, "float8_e4m3": 1.0, "float8_e5m2": 1.0})
    stationary_load_speedup: float = 4.0  # loading weights is up to 4x faster than a multiply
    # -- issue-interval rules (engine cycles) -----------------------------------------------
    min_ii: int = 64                      # MIN_II
    matmul_min_stationary_ii: int = 64    # min(64, N_stationary) term of the matmul rule
    act_reduce_extra_ii: int = 64         # activation with free-axis reduce: + MIN_II
    reciprocal_factor: int = 8            # reciprocal: max(MIN_II, 8N)
    iota_fixed_cycles: int = 150          # iota: 150 + N
    transpose_min_f: int = 64             # transpose: max(P, min(64, F))
    reduce_bf16_speedup: float = 2.0      # tensor_reduce: N/2 for bf16 add/max
    access_latency_cycles: int = 60       # static cost per SBUF/PSUM access (latency)
    dependent_overhead_cycles: int = 100  # small back-to-back dependent instructions
    stride_penalty_bytes: int = 16        # free-axis stride above this ...
    stride_penalty_factor: float = 2.0    # ... divides bandwidth by this
    dve_pool_share_sbuf: bool = True      # v2: vector and gpsimd can't access SBUF together
    dve_act_share_psum: bool = True       # v2: vector and scalar can't access PSUM together
    # -- memory system -----------------------------------------------------------------------
    hbm_gbps: float = 410.0               # this core's share of HBM bandwidth (GB/s = B/ns)
    dma_queues: int = 16
    dma_queue_gbps: float = 17.0          # per DMA engine (B/ns)
    dma_fixed_ns: float = 1300.0          # per-transfer fixed cost
    dma_chunk_overhead_bytes: int = 64    # each contiguous chunk costs this much extra
    # -- timing-model resolution -------------------------------------------------------------
    # def-use is tracked per cell = (block of 128 rows (partitions; HBM: rows of a tensor) with
    # a mask of 4-row sub-blocks) x (granule of a row's bytes):
    dep_granule_bytes: int = 512          # ... SBUF/PSUM: granule of a partition's bytes
    hbm_granule_bytes: int = 1024         # ... HBM: granule of a tensor row's bytes
    hbm_bin_ns: float = 1000.0            # timing model: the HBM channel shared by the DMA queues
                                          # is reserved in time bins of this width (resolution of
                                          # bandwidth sharing; uncontended transfers are exact)
    # -- headline figures (reported; the roofline uses the ones derived below) --------------
    vector_tflops_fp32: float = 2.3
    scalar_tflops_fp32: float = 2.9

    def __post_init__(self):
        self.validate()

    def __hash__(self):  # pe_rate is a dict; hash it as sorted items so specs can key caches
        return hash(tuple((f.name, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                          for f in dataclasses.fields(self)
                          for v in (getattr(self, f.name),)))

    # validation --------------------------------------------------------------------------
    def validate(self) -> "MachineSpec":
        """Check types and invariants; SimError naming the field, its value and the rule."""
        hints = _field_types()
        for f in dataclasses.fields(self):
            v, t = getattr(self, f.name), hints[f.name]
            bad = (t is int and (isinstance(v, bool) or not isinstance(v, int))
                   or t is float and (isinstance(v, bool) or not isinstance(v, (int, float)))
                   or t is bool and not isinstance(v, bool)
                   or t is str and not isinstance(v, str)
                   or t is dict and not isinstance(v, dict))
            if bad:
                raise SimError(f"machine {self.name!r}: {f.name}={v!r} must be "
                               f"{_TYPE_WORDS[t]}")
            if t in (int, float) and f.name not in _MAY_BE_ZERO and not v > 0:
                raise SimError(f"machine {self.name!r}: {f.name}={v!r} must be positive")
            if t in (int, float) and f.name in _MAY_BE_ZERO and not v >= 0:
                raise SimError(f"machine {self.name!r}: {f.name}={v!r} must be >= 0")
        if not self.name:
            raise SimError("machine name must be a non-empty string")
        rules = (
            (self.psum_partition_bytes % self.psum_banks == 0,
             f"psum_partition_bytes={self.psum_partition_bytes} must be a multiple of "
             f"psum_banks={self.psum_banks}"),
            (self.pe_rows <= self.partitions,
             f"pe_rows={self.pe_rows} must be <= partitions={self.partitions} "
             "(the contraction dim lives on the partitions)"),
            (self.pe_cols <= self.partitions,
             f"pe_cols={self.pe_cols} must be <= partitions={self.partitions} "
             "(matmul output rows land on PSUM partitions)"),
            (self.max_free_elems_psum * 4 <= self.psum_partition_bytes,
             f"max_free_elems_psum={self.max_free_elems_psum} fp32 elements must fit "
             f"psum_partition_bytes={self.psum_partition_bytes}"),
            ("bfloat16" in self.pe_rate,
             f"pe_rate={self.pe_rate!r} must give a rate for bfloat16 (the reference rate)"),
        )
        for ok, msg in rules:
            if not ok:
                raise SimError(f"machine {self.name!r}: {msg}")
        for k, r in self.pe_rate.items():
            if not isinstance(k, str) or isinstance(r, bool) or not isinstance(r, (int, float)) \
                    or not r > 0:
                raise SimError(f"machine {self.name!r}: pe_rate[{k!r}]={r!r} must be a "
                               "positive number")
        return self

    # derived ---------------------------------------------------------------------------------
    @property
    def sbuf_bytes(self) -> int:
        return self.partitions * self.sbuf_partition_bytes

    @property
    def psum_bytes(self) -> int:
        return self.partitions * self.psum_partition_bytes

    @property
    def psum_bank_bytes(self) -> int:
        return self.psum_partition_bytes // self.psum_banks

    def clock_ghz(self, engine: str) -> float:
        return {"pe": self.pe_clock_ghz, "act": self.act_clock_ghz,
                "dve": self.dve_clock_ghz, "pool": self.pool_clock_ghz}[engine]

    def peak_flops(self, dtype: str = "bfloat16") -> float:
        """Dense tensor-engine FLOP/s for matmul inputs of `dtype`."""
        return 2.0 * self.pe_rows * self.pe_cols * self.pe_clock_ghz * 1e9 * self.pe_rate[dtype]

    @property
    def dma_gbps(self) -> float:
        """Bandwidth the DMA engines can move together, capped by this core's HBM share."""
        return min(self.hbm_gbps, self.dma_queues * self.dma_queue_gbps)

    def replace(self, **changes) -> "MachineSpec":
        """A what-if variant: `m.replace(sbuf_partition_bytes=..., name=...)`.

        `sbuf_bytes=` / `psum_bytes=` are accepted and divided over the partitions.
        """
        for total, per in (("sbuf_bytes", "sbuf_partition_bytes"),
                           ("psum_bytes", "psum_partition_bytes")):
            if total in changes:
                v = changes.pop(total)
                parts = changes.get("partitions", self.partitions)
                if not isinstance(v, int) or v <= 0 or v % parts:
                    raise SimError(f"{total}={v!r} must be a positive multiple of {parts} partitions")
                changes[per] = v // parts
        names = [f.name for f in dataclasses.fields(self)]
        for k in changes:
            if k not in names:
                near = difflib.get_close_matches(k, names + ["sbuf_bytes", "psum_bytes"], n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise SimError(f"unknown MachineSpec field {k!r}{hint}")
        changes.setdefault("name", self.name + "*")
        return dataclasses.replace(self, **changes)


_MAY_BE_ZERO = {"access_latency_cycles", "dependent_overhead_cycles", "dma_fixed_ns",
                "dma_chunk_overhead_bytes", "iota_fixed_cycles", "act_reduce_extra_ii",
                "stride_penalty_bytes"}
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a table of dtype -> number"}


def _field_types() -> dict:
    global _FIELD_TYPES
    if _FIELD_TYPES is None:
        _FIELD_TYPES = typing.get_type_hints(MachineSpec)
    return _FIELD_TYPES


_FIELD_TYPES = None

TRN1 = MachineSpec(name="trn1")

TRN2 = MachineSpec(
    name="trn2",
    sbuf_partition_bytes=224 * 1024,
    hbm_bytes=96 * 1024 ** 3,
    pe_clock_ghz=2.4, act_clock_ghz=1.2, dve_clock_ghz=0.96, pool_clock_ghz=1.2,
    pe_rate={"float32": 0.25, "bfloat16": 1.0, "float16": 1.0, "float8_e4m3": 2.0,
             "float8_e5m2": 2.0},
    dve_pool_share_sbuf=False, dve_act_share_psum=False,
    hbm_gbps=2900.0 / 8, dma_queue_gbps=23.0, dma_fixed_ns=600.0,
    vector_tflops_fp32=1.0, scalar_tflops_fp32=1.2,
)

PRESETS = {"trn1": TRN1, "trn2": TRN2}


def machine(name_or_path: "str | MachineSpec" = "trn2") -> MachineSpec:
    """A preset by name ("trn1", "trn2"), a MachineSpec passed through, or a TOML file."""
    if isinstance(name_or_path, MachineSpec):
        return name_or_path
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if str(name_or_path).endswith(".toml"):
        from .machine_file import load_toml  # noqa: PLC0415  (TOML support, see that module)
        return load_toml(name_or_path)
    near = difflib.get_close_matches(str(name_or_path), list(PRESETS), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise SimError(f"unknown machine {name_or_path!r}; {hint}presets: {', '.join(PRESETS)} "
                   "(or a path to a .toml file)")


def describe_presets() -> list[dict]:
    """Headline figures of each preset, for `tensorlang machines` (one dict per preset)."""
    return [describe(m) for m in PRESETS.values()]


def describe(m: MachineSpec) -> dict:
    """Headline figures of one machine: clocks, peak TFLOPS, memory sizes and bandwidths."""
    return {
        "name": m.name,
        "pe_clock_ghz": m.pe_clock_ghz,
        "act_clock_ghz": m.act_clock_ghz,
        "dve_clock_ghz": m.dve_clock_ghz,
        "pool_clock_ghz": m.pool_clock_ghz,
        "peak_tflops_bf16": round(m.peak_flops("bfloat16") / 1e12, 1),
        "peak_tflops_fp8": round(m.peak_flops("float8_e4m3") / 1e12, 1)
        if "float8_e4m3" in m.pe_rate else None,
        "peak_tflops_fp32": round(m.peak_flops("float32") / 1e12, 1)
        if "float32" in m.pe_rate else None,
        "sbuf_mib": m.sbuf_bytes / 2 ** 20,
        "psum_mib": m.psum_bytes / 2 ** 20,
        "partitions": m.partitions,
        "hbm_gib": m.hbm_bytes / 2 ** 30,
        "hbm_gbps": m.hbm_gbps,
        "dma_queues": m.dma_queues,
        "dma_gbps": m.dma_gbps,
    }
