"""tensorlang: write, schedule, autotune and simulate kernels for a Trainium-class accelerator.

    import tensorlang as tl

    @tl.kernel
    def matmul(A, B):
        M, K = A.shape
        _, N = B.shape
        C = tl.tensor((M, N), "float32")
        for i, j in tl.grid(M, N):
            C[i, j] = 0.0
            for k in tl.reduce(K):
                C[i, j] += A[i, k] * B[k, j]
        return C

    prog = matmul.trace(tl.spec((512, 256), "bfloat16"), tl.spec((256, 1024), "bfloat16"))
    C = prog.reference(A, B)

Importing this package stays light (numpy + ml_dtypes): no simulator, no numba.
"""
from . import dtypes, ir
from .dsl import (Kernel, Spec, cast, exp, gelu, grid, inf, kernel, log, maximum, minimum, pad,
                  reciprocal, reduce, relu, rsqrt, sigmoid, silu, spec, sqrt, square, tanh,
                  tensor, where)
from .dsl import abs_ as abs  # noqa: A001  (tl.abs, tl.max, tl.min shadow builtins on purpose)
from .ir import Program, TensorlangError
from . import reference  # the interpreter module; attaches Program.reference

max = maximum  # noqa: A001
min = minimum  # noqa: A001

from .schedule import LoopVar, Schedule  # attaches Program.schedule

__all__ = [
    "kernel", "Kernel", "spec", "Spec", "tensor", "grid", "reduce", "pad", "inf",
    "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "gelu", "relu", "abs", "silu", "square",
    "reciprocal", "max", "min", "maximum", "minimum", "where", "cast",
    "TensorlangError", "Program", "ir", "dtypes", "Schedule", "LoopVar",
]
