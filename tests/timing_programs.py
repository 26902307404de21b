"""Small hand-built ISA programs for the timing-simulator tests and benchmark.

`sim.examples` (hand-written ISA programs) is the canonical source; these builders are the
fallback while it does not exist and a second, independent family of programs after.
"""
from __future__ import annotations

import importlib
import os
import sys
import types


def _import_sim():
    """`import sim`, or - while sibling modules of the package are still being written and
    sim/__init__.py fails - a bare namespace for it so its submodules import directly."""
    try:
        importlib.import_module("sim")
    except ImportError:
        for k in [k for k in sys.modules if k == "sim" or k.startswith("sim.")]:
            del sys.modules[k]
        pkg = types.ModuleType("sim")
        pkg.__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "sim")]
        sys.modules["sim"] = pkg


_import_sim()

from sim.isa import AP, Addr, Instr, Loop, Program, TensorDecl

ES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3": 1}


def _sb(name, off: Addr, parts, free, dtype, part=0, mem="sbuf"):
    return AP(mem, name, dtype, off, ((1, parts), (1, free)), part)


def matmul_program(M: int, N: int, K: int, dtype: str = "bfloat16", bufs: int = 1,
                   tile_n: int = 512, split: int = 4, queues: int = 16,
                   copy_engine: str = "act") -> Program:
    """C[M, N] (fp32) = AT[K, M].T @ B[K, N] tiled 128 x tile_n x 128.

    Every tile load/store is split into `split` DMAs over partition ranges, on distinct
    queues (round-robin over `queues`). SBUF/PSUM tiles have `bufs` slots rotating with the
    innermost loop that fills them.
    """
    P = 128
    es = ES[dtype]
    assert M % P == 0 and K % P == 0 and N % tile_n == 0 and P % split == 0
    ps = P // split
    qn = [0]

    def q():
        e = f"q{qn[0] % queues}"
        qn[0] += 1
        return e

    a_bytes, b_bytes, c_bytes = P * es, tile_n * es, tile_n * 4
    a_base, b_base = 0, a_bytes * bufs
    c_base = b_base + b_bytes * bufs
    a_off = Addr(a_base, (("k", a_bytes, bufs),))
    b_off = Addr(b_base, (("k", b_bytes, bufs),))
    c_off = Addr(c_base, (("n", c_bytes, bufs),))
    p_off = Addr(0, (("n", c_bytes, bufs),))
    kbody = []
    for j in range(split):
        p0 = j * ps
        kbody.append(Instr.make("dma", q(), _sb("a", a_off, ps, P, dtype, p0),
                                [AP("hbm", "AT", dtype, Addr(p0 * M, (("k", P * M, 0), ("m", P, 0))),
                                    ((M, ps), (1, P)))]))
    for j in range(split):
        p0 = j * ps
        kbody.append(Instr.make("dma", q(), _sb("b", b_off, ps, tile_n, dtype, p0),
                                [AP("hbm", "B", dtype, Addr(p0 * N, (("k", P * N, 0), ("n", tile_n, 0))),
                                    ((N, ps), (1, tile_n)))]))
    kbody.append(Instr.make("matmul", "pe", _sb("acc", p_off, P, tile_n, "float32", mem="psum"),
                            [_sb("a", a_off, P, P, dtype), _sb("b", b_off, P, tile_n, dtype)],
                            acc="add", reset_on=("k",)))
    nbody = [Loop("k", K // P, tuple(kbody)),
             Instr.make("tensor_copy", copy_engine, _sb("c", c_off, P, tile_n, "float32"),
                        [_sb("acc", p_off, P, tile_n, "float32", mem="psum")])]
    for j in range(split):
        p0 = j * ps
        nbody.append(Instr.make("dma", q(),
                                AP("hbm", "C", "float32", Addr(p0 * N, (("m", P * N, 0), ("n", tile_n, 0))),
                                   ((N, ps), (1, tile_n))),
                                [_sb("c", c_off, ps, tile_n, "float32", p0)]))
    body = (Loop("m", M // P, (Loop("n", N // tile_n, tuple(nbody)),)),)
    tensors = (TensorDecl("AT", (K, M), dtype, "input"), TensorDecl("B", (K, N), dtype, "input"),
               TensorDecl("C", (M, N), "float32", "output"))
    return Program(f"matmul_{M}x{N}x{K}_{dtype}_bufs{bufs}", tensors, body)


def softmax_program(M: int, N: int, dtype: str = "float32", bufs: int = 1, split: int = 4,
                    queues: int = 16) -> Program:
    """Row softmax of X[M, N] in 128-row blocks: max, exp(x - max) with sum, 1/sum, scale."""
    P = 128
    es = ES[dtype]
    ps = P // split
    xb = N * es
    x_off = Addr(0, (("m", xb, bufs),))
    y_off = Addr(xb * bufs, (("m", xb, bufs),))
    s_base = 2 * xb * bufs
    mx = Addr(s_base, (("m", 16, bufs),))
    nmx = Addr(s_base + 16 * bufs, (("m", 16, bufs),))
    sm = Addr(s_base + 32 * bufs, (("m", 16, bufs),))
    rs = Addr(s_base + 48 * bufs, (("m", 16, bufs),))
    body = []
    for j in range(split):
        p0 = j * ps
        body.append(Instr.make("dma", f"q{j % queues}", _sb("x", x_off, ps, N, dtype, p0),
                               [AP("hbm", "X", dtype, Addr(p0 * N, (("m", P * N, 0),)),
                                   ((N, ps), (1, N)))]))
    f32 = "float32"
    body += [
        # Instr.make's first parameter is named `op`, so an `op=` attribute goes in directly
        Instr("tensor_reduce", "dve", _sb("mx", mx, P, 1, f32), (_sb("x", x_off, P, N, dtype),),
              (("op", "max"),)),
        Instr.make("tensor_scalar", "dve", _sb("nmx", nmx, P, 1, f32), [_sb("mx", mx, P, 1, f32)],
                   op0="mul", scalar0=-1.0),
        Instr.make("activation", "act", _sb("y", y_off, P, N, dtype),
                   [_sb("x", x_off, P, N, dtype), _sb("nmx", nmx, P, 1, f32)],
                   dst2=_sb("sm", sm, P, 1, f32), func="exp", scale=1.0, bias="ap",
                   reduce_op="add"),
        Instr.make("activation", "act", _sb("rs", rs, P, 1, f32), [_sb("sm", sm, P, 1, f32)],
                   func="reciprocal"),
        Instr.make("tensor_scalar", "dve", _sb("y", y_off, P, N, dtype),
                   [_sb("y", y_off, P, N, dtype), _sb("rs", rs, P, 1, f32)],
                   op0="mul", scalar0="ap"),
    ]
    for j in range(split):
        p0 = j * ps
        body.append(Instr.make("dma", f"q{(split + j) % queues}",
                               AP("hbm", "Y", dtype, Addr(p0 * N, (("m", P * N, 0),)),
                                  ((N, ps), (1, N))),
                               [_sb("y", y_off, ps, N, dtype, p0)]))
    tensors = (TensorDecl("X", (M, N), dtype, "input"), TensorDecl("Y", (M, N), dtype, "output"))
    return Program(f"softmax_{M}x{N}_{dtype}_bufs{bufs}", tensors,
                   (Loop("m", M // P, tuple(body)),))
