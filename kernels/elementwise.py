"""Elementwise and reduction helpers over 2-D tensors [M, N].

    transpose(X)                    Y [N, M]
    sum(X, axis=1), max(X, axis=1), mean(X, axis=1)      -> [M] (axis=1) or [N] (axis=0)
    gelu(X), silu(X)                elementwise activations (gelu: tanh approximation)
    swiglu(X, G)                    silu(X) * G

Expert schedules: 128 rows on the partitions, up to `free` elements per instruction on the
free axis, the row-tile loop multi-buffered so DMA overlaps compute; transpose reads the
input with the partitions walking contiguous memory, which lowering turns into a tensor-
engine transpose; a reduction over axis 0 puts the kept axis on the partitions.
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

DEFAULT = {"pt": 128, "free": 4096, "pipe": 3}


def template(s, cfg):
    """Rows on the partitions, columns on the free axis (split to `free`), reductions
    vectorized along the reduced axis, the row-tile loop multi-buffered."""
    st = s.prog.stages[-1].name
    ax = s.axes(st)
    io, ii = s.split(ax[0], fit(ext(s, ax[0]), cfg["pt"]))
    inner = list(ax[1:]) + list(s.reduce_axes(st))
    loops = [io]
    for a in inner:
        if ext(s, a) > cfg["free"]:
            ao, a = s.split(a, cfg["free"])
            loops.append(ao)
        s.vectorize(a)
    s.reorder(*loops, ii)
    s.partition(ii)
    spatial = len(loops) > 1 and len(ax) > 1 and ext(s, ax[1]) > cfg["free"]
    if spatial and cfg.get("fuse", True):   # one loop over all tiles: every load of the next
        loops = [s.fuse(*loops[:2])] + loops[2:]     # tile overlaps this one's compute
    inner = loops[-1]
    if cfg["pipe"] > 1 and ext(s, inner) > 1:
        s.pipeline(inner, cfg["pipe"])


def transpose_template(s, cfg):
    """Y = X^T: `wide` partition tiles of Y's rows side by side on the free axis, so each
    row of X that lowering loads (then transposes on the tensor engine) is `wide` x 128
    contiguous elements, not 128: fewer, longer DMA chunks. Otherwise as `template`."""
    st = s.prog.stages[-1].name
    j, i = s.axes(st)
    pt = fit(ext(s, j), cfg["pt"])
    wide = fit(ext(s, j) // pt, cfg.get("wide", 1))    # (max/min are kernels in this module)
    jo, ji = s.split(j, pt * wide)
    loops, vec = [jo], [i]
    if wide > 1:
        ji, jm = s.split(ji, wide)      # Y rows wide * ji + jm: a partition stores whole rows
        vec = [jm, i]
    if ext(s, i) > cfg["free"]:
        io, i = s.split(i, cfg["free"])
        loops.append(io)
        vec[-1] = i
    for v in vec:
        s.vectorize(v)
    s.reorder(*loops, ji, *vec)
    s.partition(ji)
    if len(loops) > 1:
        loops = [s.fuse(*loops)]
    if cfg["pipe"] > 1 and ext(s, loops[0]) > 1:
        s.pipeline(loops[0], cfg["pipe"])


def simple(s, cfg):
    st = s.prog.stages[-1].name
    ax = s.axes(st)
    s.partition(s.split(ax[0], fit(ext(s, ax[0]), cfg["pt"]))[1])


T = (("expert", template, DEFAULT), ("simple", simple, DEFAULT))
transpose = KernelFn("transpose", transpose_algo,
                     (("expert", transpose_template, {**DEFAULT, "free": 1024, "wide": 4}),
                      ("simple", simple, DEFAULT)), "Y = X^T for a 2-D X")
sum = KernelFn("sum", _reduction("sum"), T, "sum over an axis (axis=1: rows)")  # noqa: A001
max = KernelFn("max", _reduction("max"), T, "max over an axis (axis=1: rows)")  # noqa: A001
mean = KernelFn("mean", _reduction("mean"), T, "mean over an axis (axis=1: rows)")
gelu = KernelFn("gelu", gelu_algo, T, "elementwise GELU (tanh approximation)")
silu = KernelFn("silu", silu_algo, T, "elementwise SiLU x * sigmoid(x)")
swiglu = KernelFn("swiglu", swiglu_algo, T, "silu(X) * G")
