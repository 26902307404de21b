"""Hand-written ISA programs: a tiled matmul and a row softmax.

They exercise every part of the machine model (strided DMA, matmul accumulation in PSUM,
PSUM evacuation with a cast, activation with a fused reduce, per-partition scalars,
multi-buffered slots via `Addr` modulo terms, DMA queue round-robin) and serve as test and
benchmark programs for the simulators. Tile sizes come from the MachineSpec.

    matmul_program(M, N, K, dtype="bfloat16", bufs=1, tile_n=512)  ->  C = A @ B
    softmax_program(M, N, dtype="float32", bufs=1)                 ->  Y = softmax(X, axis=1)
"""
from __future__ import annotations

from .isa import AP, DTYPE_SIZE, Addr, Buffer, Instr, Loop, Program, TensorDecl
from .machine import MachineSpec, SimError, machine


def hbm_ap(name: str, dtype: str, offset: Addr, dims) -> AP:
    return AP("hbm", name, dtype, offset, tuple(dims))


def tile_ap(mem: str, buf: Buffer, dtype: str, slot_var: "str | None", slots: int,
            slot_bytes: int, partitions: int, free: int, part: int = 0, col: int = 0) -> AP:
    """[partitions, free] contiguous tile in slot `slot_var % slots` of `buf` (col: element
    offset inside the slot)."""
    terms = ((slot_var, slot_bytes, slots),) if slot_var and slots > 1 else ()
    off = Addr(buf.offset + col * DTYPE_SIZE[dtype], terms)
    return AP(mem, buf.name, dtype, off, ((1, partitions), (1, free)), buf.part + part)


class _Alloc:
    """Bump allocator for SBUF / PSUM buffers (bytes per partition)."""

    def __init__(self, spec: MachineSpec):
        self.spec, self.top, self.buffers = spec, {"sbuf": 0, "psum": 0}, []

    def __call__(self, name: str, mem: str, size: int, partitions: int) -> Buffer:
        b = Buffer(name, mem, self.top[mem], size, 0, partitions)
        self.top[mem] += size
        self.buffers.append(b)
        return b


class _Queues:
    """Round-robin DMA queue assignment; `split` spreads one transfer over several queues
    by partition chunks."""

    def __init__(self, spec: MachineSpec, split: int):
        self.n, self.next, self.split = spec.dma_queues, 0, split

    def dma(self, dst: AP, src: AP) -> list[Instr]:
        P = dst.partitions
        split = self.split if P % self.split == 0 else 1
        out = []
        for c in range(split):
            c0, cp = c * P // split, P // split
            out.append(Instr.make("dma", f"q{self.next % self.n}",
                                  _part_chunk(dst, c0, cp), [_part_chunk(src, c0, cp)]))
            self.next += 1
        return out


def _part_chunk(ap: AP, c0: int, cp: int) -> AP:
    if c0 == 0 and cp == ap.partitions:
        return ap
    stride = ap.dims[0][0]
    dims = ((stride, cp),) + ap.dims[1:]
    if ap.mem == "hbm":
        return AP(ap.mem, ap.name, ap.dtype, ap.offset + c0 * stride, dims, ap.part)
    return AP(ap.mem, ap.name, ap.dtype, ap.offset, dims, ap.part + c0)


def _check(cond: bool, msg: str):
    if not cond:
        raise SimError(msg)


def matmul_program(M: int, N: int, K: int, dtype: str = "bfloat16", bufs: int = 1,
                   tile_n: int = 512, *, out_dtype: "str | None" = None, dma_split: int = 1,
                   spec: "MachineSpec | str | None" = None) -> Program:
    """C[M,N] = A[M,K] @ B[K,N] as 128x128 A^T tiles (strided DMA) times [128, tile_n] B
    tiles, accumulated over K in a PSUM bank, cast to `out_dtype` (default `dtype`) on the
    scalar engine and stored. `bufs` slots per tile (slot = loop var % bufs)."""
    spec = machine(spec if spec is not None else "trn2")
    out_dtype = out_dtype or dtype
    TM, TK = spec.pe_cols, spec.pe_rows
    TN = min(tile_n, N)
    _check(M % TM == 0 and K % TK == 0,
           f"matmul_program: M={M} must be a multiple of pe_cols={TM} and K={K} of pe_rows={TK}")
    _check(TN <= spec.matmul_max_n and N % TN == 0,
           f"matmul_program: N={N} must be a multiple of tile_n={TN} <= matmul_max_n="
           f"{spec.matmul_max_n}")
    _check(bufs >= 1, f"matmul_program: bufs={bufs} must be >= 1")
    isz, osz = DTYPE_SIZE[dtype], DTYPE_SIZE[out_dtype]
    alloc, q = _Alloc(spec), _Queues(spec, dma_split)
    at = alloc("AT_sb", "sbuf", bufs * TM * isz, TK)
    bt = alloc("B_sb", "sbuf", bufs * TN * isz, TK)
    ct = alloc("C_sb", "sbuf", bufs * TN * osz, TM)
    cp = alloc("C_ps", "psum", bufs * TN * DTYPE_SIZE["float32"], TM)

    at_tile = tile_ap("sbuf", at, dtype, "ko", bufs, TM * isz, TK, TM)
    b_tile = tile_ap("sbuf", bt, dtype, "ko", bufs, TN * isz, TK, TN)
    ps_tile = tile_ap("psum", cp, "float32", "no", bufs, TN * 4, TM, TN)
    c_tile = tile_ap("sbuf", ct, out_dtype, "no", bufs, TN * osz, TM, TN)
    # A^T tile: element (k, m) = A[mo*TM + m, ko*TK + k]
    a_src = hbm_ap("A", dtype, Addr(0, (("mo", TM * K, 0), ("ko", TK, 0))), [(1, TK), (K, TM)])
    b_src = hbm_ap("B", dtype, Addr(0, (("ko", TK * N, 0), ("no", TN, 0))), [(N, TK), (1, TN)])
    c_dst = hbm_ap("C", out_dtype, Addr(0, (("mo", TM * N, 0), ("no", TN, 0))), [(N, TM), (1, TN)])

    k_body = (*q.dma(at_tile, a_src), *q.dma(b_tile, b_src),
              Instr.make("matmul", "pe", ps_tile, [at_tile, b_tile], acc="add", reset_on=("ko",)))
    n_body = (Loop("ko", K // TK, k_body),
              Instr.make("tensor_copy", "act", c_tile, [ps_tile]),
              *q.dma(c_dst, c_tile))
    body = (Loop("mo", M // TM, (Loop("no", N // TN, n_body),)),)
    tensors = (TensorDecl("A", (M, K), dtype, "input"), TensorDecl("B", (K, N), dtype, "input"),
               TensorDecl("C", (M, N), out_dtype, "output"))
    return Program(f"matmul_{M}x{N}x{K}_{dtype}_bufs{bufs}", tensors, body, tuple(alloc.buffers))


def softmax_program(M: int, N: int, dtype: str = "float32", bufs: int = 1, *,
                    spec: "MachineSpec | str | None" = None) -> Program:
    """Y = softmax(X) over rows of X[M, N], one partition per row, `partitions` rows a tile:
    load, row max, negate, exp(x - max) with a fused row-sum, reciprocal, scale, store."""
    spec = machine(spec if spec is not None else "trn2")
    P = spec.partitions
    _check(M % P == 0, f"softmax_program: M={M} must be a multiple of partitions={P}")
    _check(N <= spec.max_free_elems_sbuf,
           f"softmax_program: N={N} exceeds max_free_elems_sbuf={spec.max_free_elems_sbuf}")
    _check(bufs >= 1, f"softmax_program: bufs={bufs} must be >= 1")
    isz, f4 = DTYPE_SIZE[dtype], DTYPE_SIZE["float32"]
    alloc, q = _Alloc(spec), _Queues(spec, 1)
    xb = alloc("x_sb", "sbuf", bufs * N * isz, P)
    eb = alloc("e_sb", "sbuf", bufs * N * f4, P)
    yb = alloc("y_sb", "sbuf", bufs * N * isz, P)
    stats = {n: alloc(n, "sbuf", bufs * f4, P) for n in ("mx", "nmx", "ssum", "rs")}

    def tile(buf, dt, free):
        return tile_ap("sbuf", buf, dt, "mo", bufs, free * DTYPE_SIZE[dt], P, free)

    x, e, y = tile(xb, dtype, N), tile(eb, "float32", N), tile(yb, dtype, N)
    mx, nmx, ssum, rs = (tile(stats[n], "float32", 1) for n in ("mx", "nmx", "ssum", "rs"))
    rows = [(N, P), (1, N)]
    body = (
        *q.dma(x, hbm_ap("X", dtype, Addr(0, (("mo", P * N, 0),)), rows)),
        Instr.make("tensor_reduce", "dve", mx, [x], op="max"),
        Instr.make("tensor_scalar", "dve", nmx, [mx], op0="mul", scalar0=-1.0),
        Instr.make("activation", "act", e, [x, nmx], dst2=ssum, func="exp", bias="ap",
                   reduce_op="add"),
        Instr.make("activation", "act", rs, [ssum], func="reciprocal"),
        Instr.make("tensor_scalar", "dve", y, [e, rs], op0="mul", scalar0="ap"),
        *q.dma(hbm_ap("Y", dtype, Addr(0, (("mo", P * N, 0),)), rows), y),
    )
    tensors = (TensorDecl("X", (M, N), dtype, "input"), TensorDecl("Y", (M, N), dtype, "output"))
    return Program(f"softmax_{M}x{N}_{dtype}_bufs{bufs}", tensors, (Loop("mo", M // P, body),),
                   tuple(alloc.buffers))


__all__ = ["matmul_program", "softmax_program", "hbm_ap", "tile_ap"]
