"""`validate(program, spec)`: every ISA rule, checked once, before anything runs.

Raises one SimError naming the instruction (its index in program order and its asm text),
the operand, the offending value and the limit. The rules are the ones in sim/isa.py's
docstring; every limit comes from the MachineSpec.
"""
from __future__ import annotations

import math
import re

import numpy as np

from .asm import format_instr
from .isa import (ACT_FUNCS, ALU_OPS, DTYPE_SIZE, MEMS, OPS, REDUCE_OPS, AP, Addr, Instr,
                  Loop, Program)
from .machine import MachineSpec, SimError, machine

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_LOOP_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MEMS = frozenset(MEMS)
_KINDS = ("input", "output", "scratch")


def _size(n: float) -> str:
    if n >= 2 ** 20:
        return f"{n / 2 ** 20:.1f} MiB"
    if n >= 2 ** 10:
        return f"{n / 2 ** 10:.1f} KiB"
    return f"{n:g} B"


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(program: Program, spec: "MachineSpec | str | None" = None) -> None:
    """Check `program` against the ISA rules and the limits of `spec` (default trn2)."""
    spec = machine(spec if spec is not None else "trn2")
    if not isinstance(program, Program):
        raise SimError(f"validate() wants a sim.isa.Program, got {type(program).__name__}")
    tensors = _check_tensors(program)
    buffers = _check_buffers(program, spec)
    _check_loops(program.body, ())
    ctx = _Ctx(spec, tensors, buffers)
    for i, (ins, extents) in enumerate(_walk(program.body, {}, [])):
        if extents is None:
            raise SimError(f"program body holds a {type(ins).__name__}; want Instr or Loop")
        if not _plain_dma_ok(ins, extents, ctx, tensors, buffers):
            _InstrCheck(i, ins, extents, spec, tensors, buffers, ctx).run()


def _walk(nodes, extents, out: list) -> list:
    """[(instr, {enclosing loop var: extent})] in program order, one dict per loop body; a
    node that is neither comes as (node, None) (validate fails there, in program order)."""
    for n in nodes:
        if isinstance(n, Loop):
            _walk(n.body, {**extents, n.var: n.extent}, out)
        elif isinstance(n, Instr):
            out.append((n, extents))
        else:
            out.append((n, None))
    return out


class _Ctx:
    """Per-program facts the per-operand fast path needs (computed once per validate)."""

    def __init__(self, spec: MachineSpec, tensors: dict, buffers: dict):
        self.queues = frozenset(f"q{i}" for i in range(spec.dma_queues))
        self.sizes = {n: math.prod(t.shape) for n, t in tensors.items()}
        self.caps = {"sbuf": spec.sbuf_partition_bytes, "psum": spec.psum_partition_bytes}
        self.partitions = spec.partitions


# ----------------------------------------------------------------------------------------
# declarations


def _check_tensors(program: Program) -> dict:
    seen = {}
    for t in program.tensors:
        where = f"tensor {t.name!r}"
        if not isinstance(t.name, str) or not _NAME.match(t.name):
            raise SimError(f"{where}: bad name (letters, digits, '_' and '.')")
        if t.name in seen:
            raise SimError(f"{where} is declared twice")
        if t.kind not in _KINDS:
            raise SimError(f"{where}: kind {t.kind!r} is not one of {', '.join(_KINDS)}")
        if t.dtype not in DTYPE_SIZE:
            raise SimError(f"{where}: unknown dtype {t.dtype!r}; known: {', '.join(DTYPE_SIZE)}")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in t.shape):
            raise SimError(f"{where}: shape {t.shape} must be positive integers")
        seen[t.name] = t
    return seen


def _check_buffers(program: Program, spec: MachineSpec) -> dict:
    seen: dict = {}
    for b in program.buffers:
        where = f"buffer {b.name!r}"
        if b.name in seen:
            raise SimError(f"{where} is declared twice")
        if b.mem not in ("sbuf", "psum"):
            raise SimError(f"{where}: memory {b.mem!r} must be 'sbuf' or 'psum'")
        for field in ("offset", "size", "part", "partitions"):
            v = getattr(b, field)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if field in ("size", "partitions") else 0):
                raise SimError(f"{where}: {field}={v!r} must be a "
                               f"{'positive' if field in ('size', 'partitions') else 'non-negative'}"
                               " integer")
        seen[b.name] = b
    # Buffers are named views and may alias: lowering stack-allocates per loop scope and
    # reuses addresses across scopes. The timing model tracks dependencies by address, so
    # reuse is safe; each buffer must only fit the memory.
    for mem, per_part in (("sbuf", spec.sbuf_partition_bytes), ("psum", spec.psum_partition_bytes)):
        for b in (b for b in program.buffers if b.mem == mem):
            if b.part + b.partitions > spec.partitions:
                raise SimError(f"buffer {b.name!r}: partitions [{b.part}, {b.part + b.partitions})"
                               f" exceed the {spec.partitions} partitions of {spec.name}")
            if b.offset + b.size > per_part:
                raise SimError(f"buffer {b.name!r}: bytes [{b.offset}, {b.offset + b.size}) "
                               f"per partition exceed {mem}_partition_bytes={per_part} of "
                               f"{spec.name}")
    return seen


def _check_loops(nodes, path: tuple) -> None:
    for n in nodes:
        if not isinstance(n, Loop):
            continue
        where = f"loop {n.var!r}" + (f" (inside {', '.join(path)})" if path else "")
        if not isinstance(n.var, str) or not _LOOP_VAR.match(n.var):
            raise SimError(f"{where}: bad loop variable name")
        if n.var in path:
            raise SimError(f"{where}: loop variable {n.var!r} is already used by an enclosing "
                           "loop; names must be unique along a path")
        if not isinstance(n.extent, int) or isinstance(n.extent, bool) or n.extent < 1:
            raise SimError(f"{where}: extent {n.extent!r} must be a positive integer")
        _check_loops(n.body, path + (n.var,))


# ----------------------------------------------------------------------------------------
# instructions


def ap_bounds(ap: AP, extents: dict) -> tuple[int, int]:
    """Inclusive (min, max) element offset an AP touches relative to element 0 of its
    memory: hbm counts tensor elements over all dims; sbuf/psum counts bytes in a partition
    over the free dims (the max is the first byte of the last element)."""
    lo, hi = ap.offset.bounds(extents)
    dims = ap.dims if ap.mem == "hbm" else ap.dims[1:]
    scale = 1 if ap.mem == "hbm" else DTYPE_SIZE[ap.dtype]
    for stride, size in dims:
        lo += scale * min(0, stride * (size - 1))
        hi += scale * max(0, stride * (size - 1))
    return lo, hi


def addr_values(a: Addr, extents: dict, cap: int = 1 << 16) -> "np.ndarray | None":
    """All distinct values of an address over the loop ranges (None if more than `cap`)."""
    vals = np.array([a.base], dtype=np.int64)
    for var, coef, mod in a.terms:
        n = min(extents[var], mod) if mod else extents[var]
        vals = np.unique((vals[:, None] + coef * np.arange(n, dtype=np.int64)).ravel())
        if vals.size > cap:
            return None
    return vals


def _bank_ok(a: Addr, extents: dict, bank: int, flo: int, fhi: int, cap: int = 4096) -> bool:
    """True when bytes [o + flo, o + fhi) stay in one bank for every value o of the address:
    that depends only on o % bank, so the residues are enumerated instead of the values
    (one residue when the loop strides are whole banks). False: look closer (the caller's
    exact check names the first offending offset)."""
    res = {a.base % bank}
    for var, coef, mod in a.terms:
        if coef % bank == 0:
            continue
        n = min(extents[var], mod) if mod else extents[var]
        res = {(r + coef * x) % bank for r in res for x in range(n)}
        if len(res) > cap:
            return False
    return all((r + flo) // bank == (r + fhi - 1) // bank for r in res)


def _ap_ok(ap, ext: dict, ctx: _Ctx, tensors: dict, buffers: dict) -> bool:
    """True when _InstrCheck.check_ap would accept `ap`: the same rules in one pass, without
    building messages (a False sends the caller to check_ap, which raises the named error)."""
    if type(ap) is not AP:
        return False
    size = DTYPE_SIZE.get(ap.dtype)
    mem = ap.mem
    dims = ap.dims
    if size is None or mem not in _MEMS or not dims:
        return False
    for stride, n in dims:
        if type(n) is not int or n < 1 or type(stride) is not int:
            return False
    off = ap.offset
    lo = hi = off.base
    for var, coef, mod in off.terms:
        e = ext.get(var)
        if e is None or type(mod) is not int or mod < 0:
            return False
        c = coef * ((e if e < mod else mod) if mod else e) - coef
        if c < 0:
            lo += c
        else:
            hi += c
    if mem == "hbm":
        for stride, n in dims:
            c = stride * (n - 1)
            if c < 0:
                lo += c
            else:
                hi += c
        t = tensors.get(ap.name)
        return (t is not None and ap.dtype == t.dtype and ap.part == 0 and lo >= 0
                and hi < ctx.sizes[ap.name])
    for stride, n in dims[1:]:
        c = size * stride * (n - 1)
        if c < 0:
            lo += c
        else:
            hi += c
    part = ap.part
    if dims[0][0] != 1 or part < 0 or part + dims[0][1] > ctx.partitions:
        return False
    if off.base % size:
        return False
    for _, c, _ in off.terms:
        if c % size:
            return False
    end = hi + size
    if lo < 0 or end > ctx.caps[mem]:
        return False
    if buffers:
        b = buffers.get(ap.name)
        if (b is None or b.mem != mem or part < b.part
                or part + dims[0][1] > b.part + b.partitions
                or lo < b.offset or end > b.offset + b.size):
            return False
    return True


def _plain_dma_ok(ins: Instr, ext: dict, ctx: _Ctx, tensors: dict, buffers: dict) -> bool:
    """True when `ins` is a DMA without attributes that _InstrCheck.run() would accept (most
    instructions of a program: each transfer is split over the queues); False: run()."""
    if (ins.op != "dma" or ins.attrs or ins.dst2 is not None or len(ins.srcs) != 1
            or ins.engine not in ctx.queues):
        return False
    dst, src = ins.dst, ins.srcs[0]
    if not (_ap_ok(dst, ext, ctx, tensors, buffers) and _ap_ok(src, ext, ctx, tensors, buffers)
            and dst.dtype == src.dtype):
        return False
    n = m = 1                       # same element count (num_elements, without the properties)
    for _, size in dst.dims:
        n *= size
    for _, size in src.dims:
        m *= size
    return n == m


class _InstrCheck:
    def __init__(self, index, ins: Instr, extents: dict, spec: MachineSpec, tensors, buffers,
                 ctx: _Ctx | None = None):
        self.i, self.ins, self.spec = index, ins, spec
        self.tensors, self.buffers = tensors, buffers
        self.extents = extents
        self.ctx = ctx if ctx is not None else _Ctx(spec, tensors, buffers)

    def fail(self, msg: str):
        try:
            text = format_instr(self.ins)
        except Exception:  # noqa: BLE001  (unprintable: show the repr)
            text = repr(self.ins)
        return SimError(f"instruction #{self.i} ({self.ins.op}.{self.ins.engine}): {msg}\n"
                        f"    {text}")

    # -- driver ------------------------------------------------------------------------------
    def run(self):
        ins, spec = self.ins, self.spec
        if ins.op not in OPS:
            raise self.fail(f"unknown op {ins.op!r}; ops: {', '.join(OPS)}")
        engines, nsrc, attr_names = OPS[ins.op]
        if "q" in engines and ins.engine in self.ctx.queues:
            pass
        elif "q" in engines:
            m = re.fullmatch(r"q(\d+)", str(ins.engine))
            if not m:
                raise self.fail(f"{ins.op} runs on a DMA queue q0..q{spec.dma_queues - 1}, "
                                f"not {ins.engine!r}")
            if int(m.group(1)) >= spec.dma_queues:
                raise self.fail(f"DMA queue {ins.engine} does not exist: {spec.name} has "
                                f"dma_queues={spec.dma_queues} (q0..q{spec.dma_queues - 1})")
        elif ins.engine not in engines:
            raise self.fail(f"{ins.op} cannot run on engine {ins.engine!r}; "
                            f"engines: {', '.join(engines)}")
        keys = [k for k, _ in ins.attrs]
        for k in keys:
            if k not in attr_names:
                raise self.fail(f"unknown attribute {k!r} for {ins.op}; allowed: "
                                f"{', '.join(attr_names) or 'none'}")
        if len(set(keys)) != len(keys):
            raise self.fail(f"attribute given twice in {keys}")
        if nsrc is not None and len(ins.srcs) != nsrc:
            raise self.fail(f"{ins.op} takes {nsrc} source operand(s), got {len(ins.srcs)}")
        if ins.dst2 is not None and not (ins.op == "activation" and ins.attr("reduce_op")):
            raise self.fail("dst2 is only for activation with reduce_op")
        aps = [ins.dst, *ins.srcs] if ins.dst2 is None else [ins.dst, ins.dst2, *ins.srcs]
        if not all(map(self.ap_ok, aps)):
            for label, ap in self.operands():      # the slow path names what is wrong
                self.check_ap(label, ap)
        self.check_acc()
        getattr(self, "op_" + ins.op)()

    def operands(self):
        ins = self.ins
        names = {"matmul": ("stationary", "moving"), "select": ("pred", "on_true", "on_false"),
                 "dma": ("src",), "transpose": ("src",)}.get(ins.op)
        if ins.op == "activation":
            names = ("x",) + tuple(k for k in ("scale", "bias") if ins.attr(k) == "ap")
        if ins.op == "tensor_scalar":
            names = ("x",) + tuple(k for k in ("scalar0", "scalar1") if ins.attr(k) == "ap")
        out = [("dst", ins.dst)]
        if ins.dst2 is not None:
            out.append(("dst2", ins.dst2))
        for j, ap in enumerate(ins.srcs):
            nm = names[j] if names and j < len(names) else f"src{j}"
            out.append((f"srcs[{j}] ({nm})", ap))
        return out

    # -- one operand ---------------------------------------------------------------------
    def ap_ok(self, ap) -> bool:
        """True when check_ap would accept `ap` (see _ap_ok)."""
        return _ap_ok(ap, self.extents, self.ctx, self.tensors, self.buffers)

    def check_ap(self, label: str, ap: AP):
        spec = self.spec
        if not isinstance(ap, AP):
            raise self.fail(f"{label} is a {type(ap).__name__}, not an AP")
        if ap.mem not in MEMS:
            raise self.fail(f"{label}: unknown memory {ap.mem!r}; memories: {', '.join(MEMS)}")
        if ap.dtype not in DTYPE_SIZE:
            raise self.fail(f"{label}: unknown dtype {ap.dtype!r}; known: {', '.join(DTYPE_SIZE)}")
        if not ap.dims:
            raise self.fail(f"{label}: no dims (dims[0] is the partition dim)")
        for stride, size in ap.dims:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise self.fail(f"{label}: dim size {size!r} must be a positive integer")
            if not isinstance(stride, int) or isinstance(stride, bool):
                raise self.fail(f"{label}: dim stride {stride!r} must be an integer")
        for var, coef, mod in ap.offset.terms:
            if var not in self.extents:
                raise self.fail(f"{label}: address uses {var!r}, which is not an enclosing loop "
                                f"variable (enclosing: {', '.join(self.extents) or 'none'})")
            if not isinstance(mod, int) or mod < 0:
                raise self.fail(f"{label}: address modulus {mod!r} must be >= 0 (0 = none)")
        lo, hi = ap_bounds(ap, self.extents)
        if ap.mem == "hbm":
            t = self.tensors.get(ap.name)
            if t is None:
                raise self.fail(f"{label}: HBM tensor {ap.name!r} is not declared; tensors: "
                                f"{', '.join(self.tensors) or 'none'}")
            if ap.dtype != t.dtype:
                raise self.fail(f"{label}: dtype {ap.dtype} differs from tensor {t.name!r} "
                                f"({t.dtype})")
            if ap.part != 0:
                raise self.fail(f"{label}: an HBM access has no first partition (part={ap.part})")
            n = int(np.prod(t.shape, dtype=np.int64))
            if lo < 0 or hi >= n:
                raise self.fail(f"{label}: out of bounds: touches elements [{lo}, {hi}] of "
                                f"{t.name!r}, which has {n} elements {list(t.shape)}")
            return
        cap = spec.sbuf_partition_bytes if ap.mem == "sbuf" else spec.psum_partition_bytes
        size = DTYPE_SIZE[ap.dtype]
        if ap.dims[0][0] != 1:
            raise self.fail(f"{label}: the partition dim of an {ap.mem} access must have stride "
                            f"1, got {ap.dims[0][0]}")
        if ap.part < 0 or ap.part + ap.partitions > spec.partitions:
            raise self.fail(f"{label}: partitions [{ap.part}, {ap.part + ap.partitions}) exceed "
                            f"the {spec.partitions} partitions of {spec.name}")
        if ap.offset.base % size or any(c % size for _, c, _ in ap.offset.terms):
            raise self.fail(f"{label}: byte address {ap.offset} is not a multiple of the "
                            f"{ap.dtype} size ({size} bytes)")
        end = hi + size
        if lo < 0 or end > cap:
            raise self.fail(f"{label}: out of bounds: touches bytes [{lo}, {end}) of each "
                            f"partition; {ap.mem}_partition_bytes={cap} on {spec.name}")
        if self.buffers:
            b = self.buffers.get(ap.name)
            if b is None or b.mem != ap.mem:
                raise self.fail(f"{label}: {ap.mem} buffer {ap.name!r} is not declared; "
                                f"buffers: {', '.join(self.buffers)}")
            if ap.part < b.part or ap.part + ap.partitions > b.part + b.partitions:
                raise self.fail(f"{label}: partitions [{ap.part}, {ap.part + ap.partitions}) "
                                f"outside buffer {b.name!r} (partitions [{b.part}, "
                                f"{b.part + b.partitions}))")
            if lo < b.offset or end > b.offset + b.size:
                raise self.fail(f"{label}: touches bytes [{lo}, {end}) outside buffer "
                                f"{b.name!r} (bytes [{b.offset}, {b.offset + b.size}))")

    # -- shared rules -------------------------------------------------------------------
    def check_acc(self):
        ins = self.ins
        acc, reset_on = ins.attr("acc"), ins.attr("reset_on")
        if acc is not None:
            allowed = ("add",) if ins.op == "matmul" else REDUCE_OPS
            if acc not in allowed:
                raise self.fail(f"acc={acc!r} must be one of {', '.join(allowed)}")
        if reset_on is not None:
            if acc is None:
                raise self.fail(f"reset_on={reset_on!r} without acc")
            if not isinstance(reset_on, tuple) or not all(isinstance(v, str) for v in reset_on):
                raise self.fail(f"reset_on={reset_on!r} must be a tuple of loop variable names")
            for v in reset_on:
                if v not in self.extents:
                    raise self.fail(f"reset_on names {v!r}, which is not an enclosing loop "
                                    f"variable (enclosing: {', '.join(self.extents) or 'none'})")

    def shape_eq(self, label: str, ap: AP, ref: AP, ref_label: str = "dst"):
        if (ap.partitions, ap.free_size) != (ref.partitions, ref.free_size):
            raise self.fail(f"{label} is [{ap.partitions} partitions, {ap.free_size} free "
                            f"elements] but {ref_label} is [{ref.partitions}, {ref.free_size}]")

    def per_partition(self, label: str, ap: AP):
        if ap.partitions != self.ins.dst.partitions or ap.free_size != 1:
            raise self.fail(f"{label} must be [{self.ins.dst.partitions} partitions, 1 element], "
                            f"got [{ap.partitions}, {ap.free_size}]")

    def compute_operands(self):
        """Vector/scalar/gpsimd instruction: on-chip operands within the free-size limits."""
        spec, ins = self.spec, self.ins
        for label, ap in self.operands():
            if ap.mem == "hbm":
                raise self.fail(f"{label} is in HBM; {ins.op} operands live in sbuf or psum "
                                "(move data with dma)")
            if ap.mem == "psum" and ins.engine == "pool":
                raise self.fail(f"{label} is in PSUM, which the gpsimd engine (pool) cannot "
                                "access; use dve or act")
            limit, field = ((spec.max_free_elems_sbuf, "max_free_elems_sbuf") if ap.mem == "sbuf"
                            else (spec.max_free_elems_psum, "max_free_elems_psum"))
            if ap.free_size > limit:
                raise self.fail(f"{label}: free size {ap.free_size} exceeds {field}={limit} "
                                f"for {ap.mem} operands on {spec.name}")

    def scalar_attr(self, key: str, required: bool):
        v = self.ins.attr(key)
        if v is None:
            if required:
                raise self.fail(f"missing attribute {key}")
            return
        if not (_is_num(v) or v == "ap"):
            raise self.fail(f"{key}={v!r} must be a number or 'ap' (a [P,1] source operand)")

    def one_of(self, key: str, allowed, required=True):
        v = self.ins.attr(key)
        if v is None and not required:
            return
        if v not in allowed:
            raise self.fail(f"{key}={v!r} must be one of {', '.join(allowed)}")

    def psum_bank(self, label: str, ap: AP):
        spec = self.spec
        bank = spec.psum_bank_bytes
        size = DTYPE_SIZE[ap.dtype]
        flo = size * sum(min(0, s * (n - 1)) for s, n in ap.dims[1:])
        fhi = size * sum(max(0, s * (n - 1)) for s, n in ap.dims[1:]) + size
        if fhi - flo > bank:
            raise self.fail(f"{label}: {ap.free_size} x {ap.dtype} spans {fhi - flo} bytes; "
                            f"one PSUM bank holds {bank} bytes (psum_partition_bytes/psum_banks)")
        if _bank_ok(ap.offset, self.extents, bank, flo, fhi):
            return
        offs = addr_values(ap.offset, self.extents)
        offs = np.array([ap.offset.bounds(self.extents)[0]]) if offs is None else offs
        first, last = (offs + flo) // bank, (offs + fhi - 1) // bank
        bad = np.nonzero(first != last)[0]
        if bad.size:
            o = int(offs[bad[0]])
            raise self.fail(f"{label}: bytes [{o + flo}, {o + fhi}) straddle PSUM banks "
                            f"{int(first[bad[0]])} and {int(last[bad[0]])} ({bank} bytes each); "
                            "a matmul output must sit in one bank")

    # -- per op ---------------------------------------------------------------------------
    def op_dma(self):
        dst, src = self.ins.dst, self.ins.srcs[0]
        if dst.dtype != src.dtype:
            raise self.fail(f"dma does not convert: dst is {dst.dtype}, src is {src.dtype}")
        if dst.num_elements != src.num_elements:
            raise self.fail(f"dst has {dst.num_elements} elements {list(dst.shape)}, src has "
                            f"{src.num_elements} {list(src.shape)}")

    def op_matmul(self):
        spec, ins = self.spec, self.ins
        st, mv, dst = ins.srcs[0], ins.srcs[1], ins.dst
        for label, ap in (("stationary", st), ("moving", mv)):
            if ap.mem != "sbuf":
                raise self.fail(f"{label} operand must be in sbuf, not {ap.mem}")
            if ap.dtype not in spec.pe_rate:
                raise self.fail(f"{label} dtype {ap.dtype} is not supported by the tensor "
                                f"engine of {spec.name} (pe_rate: {', '.join(spec.pe_rate)})")
        if st.dtype != mv.dtype:
            raise self.fail(f"stationary is {st.dtype} but moving is {mv.dtype}; they must match")
        if dst.mem != "psum" or dst.dtype != "float32":
            raise self.fail(f"dst must be float32 in psum, got {dst.dtype} in {dst.mem}")
        K, M, N = st.partitions, st.free_size, mv.free_size
        if mv.partitions != K:
            raise self.fail(f"contraction mismatch: stationary has K={K} partitions, moving has "
                            f"{mv.partitions}")
        for what, v, limit, field in (("K (stationary/moving partitions)", K, spec.pe_rows,
                                       "pe_rows"),
                                      ("M (stationary free size)", M, spec.pe_cols, "pe_cols"),
                                      ("N (moving free size)", N, spec.matmul_max_n,
                                       "matmul_max_n")):
            if v > limit:
                raise self.fail(f"{what} = {v} exceeds {field}={limit} on {spec.name}")
        if (dst.partitions, dst.free_size) != (M, N):
            raise self.fail(f"dst is [{dst.partitions}, {dst.free_size}] but the product is "
                            f"[M={M}, N={N}]")
        self.psum_bank("dst", dst)

    def op_transpose(self):
        spec, ins = self.spec, self.ins
        src, dst = ins.srcs[0], ins.dst
        if src.mem != "sbuf":
            raise self.fail(f"transpose src must be in sbuf, not {src.mem}")
        if dst.mem != "psum":
            raise self.fail(f"transpose dst must be in psum, not {dst.mem}")
        if dst.dtype not in (src.dtype, "float32"):
            raise self.fail(f"transpose dst dtype {dst.dtype} must be the src dtype "
                            f"({src.dtype}) or float32")
        P, F = src.partitions, src.free_size
        if P > spec.pe_rows:
            raise self.fail(f"src partitions {P} exceed pe_rows={spec.pe_rows}")
        if F > spec.pe_cols:
            raise self.fail(f"src free size {F} exceeds pe_cols={spec.pe_cols}")
        if (dst.partitions, dst.free_size) != (F, P):
            raise self.fail(f"dst is [{dst.partitions}, {dst.free_size}] but the transpose of "
                            f"[{P}, {F}] is [{F}, {P}]")
        self.psum_bank("dst", dst)

    def op_activation(self):
        ins = self.ins
        self.one_of("func", ACT_FUNCS)
        self.scalar_attr("scale", False)
        self.scalar_attr("bias", False)
        want = 1 + (ins.attr("scale") == "ap") + (ins.attr("bias") == "ap")
        if len(ins.srcs) != want:
            raise self.fail(f"activation takes {want} source operand(s) (x"
                            f"{', scale' if ins.attr('scale') == 'ap' else ''}"
                            f"{', bias' if ins.attr('bias') == 'ap' else ''}), got {len(ins.srcs)}")
        self.one_of("reduce_op", REDUCE_OPS, required=False)
        if ins.attr("reduce_op") is not None and ins.dst2 is None:
            raise self.fail("reduce_op needs a dst2 operand ([P,1]) for the reduction")
        self.compute_operands()
        self.shape_eq("srcs[0] (x)", ins.srcs[0], ins.dst)
        for j, ap in enumerate(ins.srcs[1:], 1):
            self.per_partition(f"srcs[{j}]", ap)
        if ins.dst2 is not None:
            self.per_partition("dst2", ins.dst2)

    def op_tensor_tensor(self):
        self.one_of("op", ALU_OPS)
        self.compute_operands()
        for j, ap in enumerate(self.ins.srcs):
            self.shape_eq(f"srcs[{j}]", ap, self.ins.dst)

    def op_tensor_scalar(self):
        ins = self.ins
        self.one_of("op0", ALU_OPS)
        self.scalar_attr("scalar0", True)
        self.one_of("op1", ALU_OPS, required=False)
        self.scalar_attr("scalar1", ins.attr("op1") is not None)
        if ins.attr("op1") is None and ins.attr("scalar1") is not None:
            raise self.fail("scalar1 given without op1")
        for k in ("reverse0", "reverse1"):
            if ins.attr(k) is not None and not isinstance(ins.attr(k), bool):
                raise self.fail(f"{k}={ins.attr(k)!r} must be True or False")
        want = 1 + (ins.attr("scalar0") == "ap") + (ins.attr("scalar1") == "ap")
        if len(ins.srcs) != want:
            raise self.fail(f"tensor_scalar takes {want} source operand(s) (x and one [P,1] per "
                            f"scalar given as 'ap'), got {len(ins.srcs)}")
        self.compute_operands()
        self.shape_eq("srcs[0] (x)", ins.srcs[0], ins.dst)
        for j, ap in enumerate(ins.srcs[1:], 1):
            self.per_partition(f"srcs[{j}]", ap)

    def op_tensor_reduce(self):
        ins = self.ins
        self.one_of("op", REDUCE_OPS)
        self.compute_operands()
        src, dst = ins.srcs[0], ins.dst
        if src.partitions != dst.partitions:
            raise self.fail(f"src has {src.partitions} partitions but dst has {dst.partitions}")
        if src.free_size % dst.free_size:
            raise self.fail(f"src free size {src.free_size} is not a multiple of dst free size "
                            f"{dst.free_size} (each dst element reduces a contiguous chunk)")

    def op_tensor_copy(self):
        self.compute_operands()
        self.shape_eq("srcs[0]", self.ins.srcs[0], self.ins.dst)

    def op_memset(self):
        v = self.ins.attr("value")
        if not _is_num(v):
            raise self.fail(f"memset value={v!r} must be a number")
        self.compute_operands()

    def op_iota(self):
        ins = self.ins
        base, pcoef, fcoefs = ins.attr("base", 0), ins.attr("pcoef", 0), ins.attr("fcoefs", ())
        if isinstance(base, Addr):
            for var, _, _ in base.terms:
                if var not in self.extents:
                    raise self.fail(f"iota base uses {var!r}, which is not an enclosing loop "
                                    f"variable (enclosing: {', '.join(self.extents) or 'none'})")
        elif not isinstance(base, int) or isinstance(base, bool):
            raise self.fail(f"iota base={base!r} must be an integer or an Addr")
        if not isinstance(pcoef, int) or isinstance(pcoef, bool):
            raise self.fail(f"iota pcoef={pcoef!r} must be an integer")
        if not isinstance(fcoefs, tuple) or not all(isinstance(c, int) for c in fcoefs):
            raise self.fail(f"iota fcoefs={fcoefs!r} must be a tuple of integers")
        if fcoefs and len(fcoefs) != len(ins.dst.free_dims):
            raise self.fail(f"iota fcoefs has {len(fcoefs)} entries but dst has "
                            f"{len(ins.dst.free_dims)} free dims")
        self.compute_operands()

    def op_select(self):
        self.compute_operands()
        for j, ap in enumerate(self.ins.srcs):
            self.shape_eq(f"srcs[{j}]", ap, self.ins.dst)


__all__ = ["validate", "ap_bounds", "addr_values"]
