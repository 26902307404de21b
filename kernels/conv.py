"""Convolutions, NCHW input, zero padding.

    conv2d(X, Wt, stride=1, padding=0, dilation=1)     X [N,C,H,W], Wt [O,C,KH,KW] -> [N,O,OH,OW]
    depthwise_conv2d(X, Wt, stride=1, padding=0, dilation=1)      Wt [C,KH,KW] -> [N,C,OH,OW]

conv2d is an implicit GEMM: for each filter tap (kh, kw) the output tile [O, OH x OW]
accumulates Wt[:, :, kh, kw]^T @ X-window, contracting over the input channels on the
systolic array (C on the partitions), so no im2col matrix is ever materialised. The zero
padding is a padded read (X.pad(0)) of the matmul's moving operand: lowering fills one box
[c-tile, rows + 2p, W + 2p] per channel step on chip (memsets for the border, X for the
interior) and every tap reads a shifted window of it. With few input channels (C * KH <=
FOLD_ROWS: the 7x7 stem's C = 3 would use 3 of 128 rows) the (c, kh) taps are folded into
the contraction: two small copy stages lay out Xk[n, c*KH + kh, oh, w] (the input rows each
kh reads, im2col along h only) and Wk[o, c*KH + kh, kw], and the matmuls contract over
C * KH rows, one per kw tap. Depthwise convolution has no contraction over channels: the
channels go on the partitions and each tap is one accumulating pass split over the scalar,
vector and gpsimd engines and the tensor engine (a matmul by diag(w), see
lower.Lowerer.scaled_acc). Caveat of that last share: 0 x Inf is NaN, so an Inf or NaN in
one channel makes the tensor engine's rows of the other channels of its 128-channel tile
NaN too; finite inputs give the same values as numpy.
"""
from __future__ import annotations

import math

import tensorlang as tl
from tensorlang.ir import ITEMSIZE

from ._library import KernelFn, fit
from .matmul import ext


def _out_size(what, n, k, stride, padding, dilation):
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if not isinstance(v, int) or v < lo:
            raise tl.TensorlangError(f"{what}: {name}={v!r} must be an int >= {lo}")
    out = (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    if out < 1:
        raise tl.TensorlangError(f"{what}: a {k}-tap filter (dilation {dilation}) does not fit an "
                                 f"input of {n} with padding {padding}")
    return out


FOLD_ROWS = 32   # conv2d folds the (c, kh) taps onto the contraction when C * KH fits this


@tl.kernel
def conv2d_algo(X, Wt, stride=1, padding=0, dilation=1, out_dtype="float32"):
    if len(X.shape) != 4 or len(Wt.shape) != 4 or X.shape[1] != Wt.shape[1]:
        raise tl.TensorlangError(f"conv2d: X {X.shape} and Wt {Wt.shape} do not fit; expected "
                                 "X [N,C,H,W] and Wt [O,C,KH,KW]")
    N, C, H, W = X.shape
    O, _, KH, KW = Wt.shape
    OH = _out_size("conv2d", H, KH, stride, padding, dilation)
    OW = _out_size("conv2d", W, KW, stride, padding, dilation)
    Y = tl.tensor((N, O, OH, OW), out_dtype, name="Y")
    Xz = X.pad(0.0) if padding else X
    if KH > 1 and C * KH <= FOLD_ROWS:      # fold the (c, kh) taps into the contraction
        Xk = tl.tensor((N, C * KH, OH, W + 2 * padding), X.dtype, name="Xk")
        for n, c, kh, h, w in tl.grid(N, C, KH, OH, W + 2 * padding):
            Xk[n, c * KH + kh, h, w] = Xz[n, c, h * stride + kh * dilation - padding,
                                          w - padding]
        Wk = tl.tensor((O, C * KH, KW), Wt.dtype, name="Wk")
        for o, c, kh, kw in tl.grid(O, C, KH, KW):
            Wk[o, c * KH + kh, kw] = Wt[o, c, kh, kw]
        for n, o, h, w in tl.grid(N, O, OH, OW):
            Y[n, o, h, w] = 0.0
            for kw, q in tl.reduce(KW, C * KH):
                Y[n, o, h, w] += Wk[o, q, kw] * Xk[n, q, h, w * stride + kw * dilation]
        return Y
    for n, o, h, w in tl.grid(N, O, OH, OW):
        Y[n, o, h, w] = 0.0
        for kh, kw, c in tl.reduce(KH, KW, C):
            Y[n, o, h, w] += Wt[o, c, kh, kw] * Xz[n, c, h * stride + kh * dilation - padding,
                                                   w * stride + kw * dilation - padding]
    return Y


conv2d_algo.name = "conv2d"


@tl.kernel
def depthwise_algo(X, Wt, stride=1, padding=0, dilation=1, out_dtype="float32"):
    if len(X.shape) != 4 or len(Wt.shape) != 3 or X.shape[1] != Wt.shape[0]:
        raise tl.TensorlangError(f"depthwise_conv2d: X {X.shape} and Wt {Wt.shape} do not fit; "
                                 "expected X [N,C,H,W] and Wt [C,KH,KW]")
    N, C, H, W = X.shape
    _, KH, KW = Wt.shape
    OH = _out_size("depthwise_conv2d", H, KH, stride, padding, dilation)
    OW = _out_size("depthwise_conv2d", W, KW, stride, padding, dilation)
    Xz = X.pad(0.0)
    Y = tl.tensor((N, C, OH, OW), out_dtype, name="Y")
    for n, c, h, w in tl.grid(N, C, OH, OW):
        Y[n, c, h, w] = 0.0
        for kh, kw in tl.reduce(KH, KW):
            Y[n, c, h, w] += Xz[n, c, h * stride + kh * dilation - padding,
                                w * stride + kw * dilation - padding] * Wt[c, kh, kw]
    return Y


depthwise_algo.name = "depthwise_conv2d"


# -- schedules ----------------------------------------------------------------------------------

DEFAULT = {"ot": 128, "ct": 128, "free": 512, "pipe": 4, "opipe": 2, "wt_kib": 48, "fold_pipe": 4}
DW_DEFAULT = {"free": 512, "pipe": 2, "plane_kib": 64, "small_kib": 8}


def _even(n: int, want: int) -> int:
    """A split factor <= want that cuts n into equal parts when one exists (no tail: the
    staged and box fills need whole tiles), else `want`."""
    parts = -(-n // max(1, want))
    return n // parts if n % parts == 0 else fit(n, want)


def _whole(n: int, want: int) -> int:
    """A split factor <= want that divides n into the fewest equal parts (up to twice the
    fewest possible: 576 channels -> 6 x 96); else as _even."""
    fewest = -(-n // max(1, want))
    for parts in range(fewest, 2 * fewest + 1):
        if n % parts == 0:
            return n // parts
    return _even(n, want)


def _spatial_free(s, stage, h, w, limit):
    """Vectorize w, and h too when whole rows fit the free size; returns the outer h loop."""
    if ext(s, w) > limit:
        wo, wi = s.split(w, _even(ext(s, w), limit))
        return [h, wo], [wi]
    rows = max(1, limit // ext(s, w))
    if rows >= ext(s, h):
        return [], [h, w]
    ho, hi = s.split(h, _even(ext(s, h), rows))
    return [ho], [hi, w]


def _fold_stages(s):
    """The copy stages of the folded program: Xk [(c, kh) rows, w] tiles with the output rows
    on the partitions (the kh loop multi-buffered), Wk as one tile per output channel block."""
    n, c, kh, h, w = s.axes("Xk")
    ho, hi = s.split(h, _even(ext(s, h), 128))
    s.reorder(n, c, kh, ho, hi, w)
    s.partition(hi)
    s.vectorize(w)
    if ext(s, kh) > 1:
        s.pipeline(kh, min(8, ext(s, kh)))
    o, c, kh, kw = s.axes("Wk")
    oo, oi = s.split(o, _even(ext(s, o), 128))
    s.reorder(oo, oi, c, kh, kw)
    s.partition(oi)
    for f in (c, kh, kw):
        s.vectorize(f)


def folded(s, cfg):
    """The folded program (module doc): output channels on the partitions, output rows as
    the moving free dimension, (c, kh) contracted, the kw taps accumulated; one Xk box per
    row block shared by the kw taps (row blocks multi-buffered, their loads ahead)."""
    _fold_stages(s)
    n, o, h, w = s.axes("Y")
    kw, q = s.reduce_axes("Y")
    oo, oi = s.split(o, _even(ext(s, o), cfg["ot"]))
    outer, free = _spatial_free(s, "Y", h, w, cfg["free"])
    s.reorder(n, oo, *outer, kw, oi, *free, q)
    s.partition(oi)
    for f in free:
        s.vectorize(f)
    s.tensorize(q, "matmul")
    s.cache_read("Wk", "sbuf", n)
    s.cache_read("Xk", "sbuf", outer[-1] if outer else oo)
    if outer and ext(s, outer[-1]) > 1:
        s.pipeline(outer[-1], min(cfg["fold_pipe"], ext(s, outer[-1])))


def template(s, cfg):
    """Implicit GEMM: output channels on the partitions, output pixels as the moving free
    dimension (<= one PSUM bank), input channels contracted on the systolic array, the taps
    as accumulation loops; the channel-step loop multi-buffered."""
    if "Xk" in s.prog.tensors:
        return folded(s, cfg)
    n, o, h, w = s.axes("Y")
    kh, kw, c = s.reduce_axes("Y")
    oo, oi = s.split(o, _even(ext(s, o), cfg["ot"]))
    co, ci = s.split(c, _even(ext(s, c), cfg["ct"]))
    outer, free = _spatial_free(s, "Y", h, w, cfg["free"])
    wt = s.prog.tensors["Wt"]
    few = math.prod(wt.shape) * ITEMSIZE[wt.dtype] // 128 <= cfg["wt_kib"] * 1024
    # few weights: all of them loaded (and transposed) once, outside the images (an outer
    # loop of one iteration over the batch holds them), both output blocks' rows at once
    top, n = s.split(n, ext(s, n)) if few and ext(s, n) > 1 else (n, n)
    s.reorder(*dict.fromkeys((top, n)), oo, *outer, co, kh, kw, oi, *free, ci)
    s.partition(oi)
    for f in free:
        s.vectorize(f)
    s.tensorize(ci, "matmul")
    if cfg["pipe"] > 1 and ext(s, co) > 1:           # channel steps' input loads ahead
        s.pipeline(co, min(cfg["pipe"], ext(s, co)))
    if cfg["opipe"] > 1 and outer and ext(s, outer[-1]) > 1:
        s.pipeline(outer[-1], cfg["opipe"])     # a row block's store overlaps the next one
    # weights: natural rows [o, c*kh*kw] loaded whole and transposed per tap on chip
    # one image and several output blocks: each block's weights are loaded (two slots) so
    # block 0's transposes and matmuls run while block 1's weights still load
    per_block = few and ext(s, n) == 1 and ext(s, oo) > 1
    if per_block:
        s.pipeline(oo, 2)
    s.cache_read("Wt", "sbuf", oo if per_block or not few else top)
    # one window box per channel step, shared by the taps; with one channel step, one box
    # (the whole padded plane) per image, shared by the output blocks and row blocks too
    s.cache_read("X", "sbuf", n if ext(s, co) == 1 else co)


def simple(s, cfg):
    """Fallback: one tap and one channel step per matmul, output row by row."""
    if "Xk" in s.prog.tensors:
        _fold_stages(s)
    n, o, h, w = s.axes("Y")
    *taps, c = s.reduce_axes("Y")
    oo, oi = s.split(o, fit(ext(s, o), cfg["ot"]))
    co, ci = s.split(c, fit(ext(s, c), cfg["ct"]))
    wo, wi = s.split(w, fit(ext(s, w), cfg["free"]))
    s.reorder(n, oo, h, wo, co, *taps, oi, wi, ci)
    s.partition(oi)
    s.vectorize(wi)
    s.tensorize(ci, "matmul")


def depthwise_template(s, cfg):
    """Channels on the partitions, output pixels on the free axis, taps accumulated. When a
    channel tile's output plane fits `plane_kib` per partition the tile is the whole plane:
    its input plane (with the zero border, set on chip) is loaded once per tile and every tap
    is one accumulating pass over a shifted window of it; the weights load once per tile."""
    n, c, h, w = s.axes("Y")
    kh, kw = s.reduce_axes("Y")
    if ext(s, h) * ext(s, w) * 4 <= cfg["plane_kib"] * 1024:
        co, ci = s.split(c, _whole(ext(s, c), 128))     # equal tiles: no tail, one box each
        images = ext(s, n) > 1
        if images:      # an outer loop of one iteration holds the weights (see below)
            top, n = s.split(n, ext(s, n))
            s.reorder(top, n, co, kh, kw, ci, h, w)
        else:
            s.reorder(n, co, kh, kw, ci, h, w)
        s.partition(ci)
        s.vectorize(h)
        s.vectorize(w)
        s.pipeline(kh, 1)      # a loop (depth 1: one slot), never a vectorized reduction
        s.unroll(kw)           # each column tap its own columns: no padding columns on chip
        tiles = s.fuse(n, co) if images else co
        # several images: the weights load once, by one DMA before the tiles (not once per
        # tile, queued on a load queue ahead of each plane's load); else once per tile,
        # first (not queued behind the plane's load)
        s.cache_read("Wt", "sbuf", top if images else tiles)
        s.cache_read("X", "sbuf", tiles)
        # small planes: a third slot (their PSUM rows fit three times)
        pipe = cfg["pipe"] + (ext(s, h) * ext(s, w) * 4 <= cfg["small_kib"] * 1024)
        if pipe > 1 and ext(s, tiles) > 1:
            s.pipeline(tiles, pipe)
        return
    co, ci = s.split(c, fit(ext(s, c), 128))
    outer, free = _spatial_free(s, "Y", h, w, cfg["free"] * 4)
    s.reorder(n, co, *outer, ci, *free)
    s.partition(ci)
    for f in free:
        s.vectorize(f)


conv2d = KernelFn("conv2d", conv2d_algo, (("expert", template, DEFAULT),
                                          ("simple", simple, DEFAULT)),
                  "2-D convolution (NCHW, OIHW weights) as an implicit GEMM")
depthwise_conv2d = KernelFn("depthwise_conv2d", depthwise_algo,
                            (("expert", depthwise_template, DW_DEFAULT),),
                            "depthwise 2-D convolution (NCHW, [C,KH,KW] weights)")
