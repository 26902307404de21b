"""Elementwise and reduction helpers over 2-D tensors [M, N].

    transpose(X)                    Y [N, M]
    sum(X, axis=1), max(X, axis=1), mean(X, axis=1)      -> [M] (axis=1) or [N] (axis=0)
    gelu(X), silu(X)                elementwise activations (gelu: tanh approximation)
    swiglu(X, G)                    silu(X) * G

Expert schedules: 128 rows on the partitions, up to `free` elements per instruction on the
free axis, the row-tile loop multi-buffered so DMA overlaps compute; transpose reads the
input with the partitions walking contiguous memory, which lowering turns into a tensor-
engine transpose; a reduction over axis 0 puts the kept axis on the partitions. Both put
`wide` partition tiles side by side so the input's rows load `wide` x 128 elements long.
"""
from __future__ import annotations

import tensorlang as tl

from ._library import KernelFn, fit
from .matmul import ext


def _2d(what, X):
    if len(X.shape) != 2:
        raise tl.TensorlangError(f"{what}: X must be 2-D, got shape {X.shape}")
    return X.shape


@tl.kernel
def transpose_algo(X):
    M, N = _2d("transpose", X)
    Y = tl.tensor((N, M), X.dtype, name="Y")
    for j, i in tl.grid(N, M):
        Y[j, i] = X[i, j]
    return Y


transpose_algo.name = "transpose"

_RED = {"sum": "add", "max": "max", "mean": "add"}


def _reduction(op: str):
    @tl.kernel
    def algo(X, axis=1):
        M, N = _2d(op, X)
        if axis not in (0, 1, -1, -2):
            raise tl.TensorlangError(f"{op}: axis={axis!r} must be 0 or 1 for a 2-D input")
        keep, red = (M, N) if axis in (1, -1) else (N, M)
        Y = tl.tensor((keep,), "float32", name="Y")
        w = 1.0 / red if op == "mean" else 1.0
        for r in tl.grid(keep):
            Y[r] = -tl.inf if op == "max" else 0.0
            for q in tl.reduce(red):
                x = X[r, q] if axis in (1, -1) else X[q, r]
                if op == "max":
                    Y[r] = tl.max(Y[r], x)
                else:
                    Y[r] += x * w if op == "mean" else x
        return Y
    algo.name = op
    return algo


@tl.kernel
def gelu_algo(X):
    M, N = _2d("gelu", X)
    Y = tl.tensor((M, N), X.dtype, name="Y")
    for i, j in tl.grid(M, N):
        Y[i, j] = tl.gelu(X[i, j])
    return Y


gelu_algo.name = "gelu"


@tl.kernel
def silu_algo(X):
    M, N = _2d("silu", X)
    Y = tl.tensor((M, N), X.dtype, name="Y")
    for i, j in tl.grid(M, N):
        Y[i, j] = tl.silu(X[i, j])
    return Y


silu_algo.name = "silu"


@tl.kernel
def swiglu_algo(X, G):
    M, N = _2d("swiglu", X)
    if G.shape != (M, N):
        raise tl.TensorlangError(f"swiglu: G has shape {G.shape}, expected {(M, N)}")
    Y = tl.tensor((M, N), X.dtype, name="Y")
    for i, j in tl.grid(M, N):
        Y[i, j] = tl.silu(X[i, j]) * G[i, j]
    return Y


swiglu_algo.name = "swiglu"


# -- schedules ----------------------------------------------------------------------------------

DEFAULT = {"pt": 128, "free": 4096, "pipe": 3, "wide": 4, "wide_free": 1024}


def _walks_rows(s, a) -> bool:
    """Does loop `a` step along the contiguous last dimension of a 2-D+ input the stage reads
    (then a tile with `a` on the partitions loads transposed: rows of X, transposed on the
    tensor engine)?"""
    return any(len(ld.index) > 1 and ld.index[-1].coef(str(a)) == 1
               and not any(ix.coef(str(a)) for ix in ld.index[:-1])
               for ld in s.prog.stages[-1].reads())


def template(s, cfg):
    """Rows on the partitions, columns on the free axis (split to `free`), reductions
    vectorized along the reduced axis, the row-tile loop multi-buffered. When the partition
    axis walks the input's contiguous rows (transpose, a reduction over axis 0), `wide`
    partition tiles sit side by side on the free axis (partition p holds rows wide*p ..
    wide*p + wide-1, so each row of the input that lowering loads is `wide` x 128 elements
    long: fewer, longer DMA chunks), with `wide_free` elements of the other axes per tile."""
    st = s.prog.stages[-1].name
    ax = s.axes(st)
    pt = fit(ext(s, ax[0]), cfg["pt"])
    wide = fit(ext(s, ax[0]) // pt, cfg.get("wide", 1)) if _walks_rows(s, ax[0]) else 1
    free = cfg.get("wide_free", cfg["free"]) if wide > 1 else cfg["free"]
    io, ii = s.split(ax[0], pt * wide)
    vec = []
    if wide > 1:
        ii, im = s.split(ii, wide)
        vec.append(im)
    inner = list(ax[1:]) + list(s.reduce_axes(st))
    loops = [io]
    for a in inner:
        if ext(s, a) > free:
            ao, a = s.split(a, free)
            loops.append(ao)
        vec.append(a)
    for a in vec:
        s.vectorize(a)
    s.reorder(*loops, ii, *(vec if wide > 1 else ()))
    s.partition(ii)
    spatial = len(loops) > 1 and len(ax) > 1 and ext(s, ax[1]) > free
    if spatial and cfg.get("fuse", True):   # one loop over all tiles: every load of the next
        loops = [s.fuse(*loops[:2])] + loops[2:]     # tile overlaps this one's compute
    inner = loops[-1]
    if cfg["pipe"] > 1 and ext(s, inner) > 1:
        s.pipeline(inner, cfg["pipe"])


def simple(s, cfg):
    st = s.prog.stages[-1].name
    ax = s.axes(st)
    s.partition(s.split(ax[0], fit(ext(s, ax[0]), cfg["pt"]))[1])


T = (("expert", template, DEFAULT), ("simple", simple, DEFAULT))
RED = (("expert", template, {**DEFAULT, "wide_free": 2048}), ("simple", simple, DEFAULT))
transpose = KernelFn("transpose", transpose_algo, T, "Y = X^T for a 2-D X")
sum = KernelFn("sum", _reduction("sum"), RED, "sum over an axis (axis=1: rows)")  # noqa: A001
max = KernelFn("max", _reduction("max"), RED, "max over an axis (axis=1: rows)")  # noqa: A001
mean = KernelFn("mean", _reduction("mean"), RED, "mean over an axis (axis=1: rows)")
gelu = KernelFn("gelu", gelu_algo, T, "elementwise GELU (tanh approximation)")
silu = KernelFn("silu", silu_algo, T, "elementwise SiLU x * sigmoid(x)")
swiglu = KernelFn("swiglu", swiglu_algo, T, "silu(X) * G")
