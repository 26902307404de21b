"""Attention: O = softmax(Q K^T * scale [+ causal mask]) V, per head.

    attention(Q, K, V, causal=False, scale=None)
        Q [H, Sq, D], K [H, Sk, D], V [H, Sk, Dv] -> O [H, Sq, Dv] (Q's dtype)

The algorithm: scores S = Q K^T (a contraction over D); the logits L (causal: the scores
with keys j > i pushed far below any score, min(S, MASK * (i - j + 1/2)); none without a
mask); the row max of L; the row sum of exp(L * scale - max * scale) and the probabilities
P = exp(...) / sum (in V's dtype, so the second product runs on the systolic array at the
input precision); O = P V (a contraction over the keys). The scale is applied by exp's own
multiply (scale > 0: max(L) * scale is the row max of the scaled logits), so no pass
scales the score row, and exp is shared by the sum (the activation's reduce) and P.

The expert schedule (`flash`) computes every intermediate inside O's query-tile loop
(compute_at): the lowering evaluates P in its own layout (queries on the partitions, the
whole key row free), shares the row between its readers and transposes P per key block
into O's stationary operand, so only Q, K, V and O touch HBM. A row of up to 2048 keys is
a PSUM row of the systolic array; a longer one is computed one PSUM bank of keys at a
time into SBUF (the causal logits straight from the bank), so any Sk whose row fits SBUF
stays fused. K^T (transposed on the tensor engine) and V are loaded once per head
(cache_read at the head loop; K is read by the scores, computed inside O), and the next
head's while this one computes (the head loop pipelined). Up to `qi` query tiles are
filled together: their softmax chains are independent and are merged onto the engines by
list scheduling; O's accumulators and stores rotate over the fill's tiles (`opipe` slots),
so one tile's products overlap the previous tile's copy out and store, and a fill whose
tiles sit at static offsets (a whole head) has its causal-mask iotas computed once. True
online-softmax rescaling (one pass over the keys in blocks) is a recurrence the DSL cannot
express, and causal blocks above the diagonal are not skipped (loop extents are static);
`unfused` (intermediates through HBM) remains the fallback.
"""
from __future__ import annotations

import sim
import tensorlang as tl

from ._library import KernelFn, divisor, fit
from .conv import _even
from .matmul import ext, tile_matmul


MASK = 2 ** 46      # causal mask step (integer: iota computes it exactly)


@tl.kernel
def attention_algo(Q, K, V, causal=False, scale=None):
    if len(Q.shape) != 3 or len(K.shape) != 3 or len(V.shape) != 3:
        raise tl.TensorlangError(f"attention: Q, K, V must be [heads, seq, dim], got "
                                 f"{Q.shape}, {K.shape}, {V.shape}")
    H, Sq, D = Q.shape
    _, Sk, Dv = V.shape
    if K.shape != (H, Sk, D) or V.shape[0] != H:
        raise tl.TensorlangError(f"attention: K has shape {K.shape} and V {V.shape}; expected "
                                 f"K {(H, Sk, D)} and V ({H}, {Sk}, Dv)")
    if causal and Sq > Sk:
        raise tl.TensorlangError(f"attention: causal needs Sq <= Sk, got Sq={Sq}, Sk={Sk}")
    if causal and Sk * MASK >= 2 ** 62:
        raise tl.TensorlangError(f"attention: causal mask needs Sk < {2 ** 62 // MASK}, "
                                 f"got Sk={Sk}")
    scale = D ** -0.5 if scale is None else float(scale)
    S = tl.tensor((H, Sq, Sk), "float32", name="S")
    mx = tl.tensor((H, Sq), "float32", name="mx")
    total = tl.tensor((H, Sq), "float32", name="total")
    P = tl.tensor((H, Sq, Sk), V.dtype, name="P")
    O = tl.tensor((H, Sq, Dv), Q.dtype, name="O")
    # scale > 0 (the default): the max is taken over the raw scores and the scale applied by
    # exp's own multiply, exp(S * scale - max * scale), so no pass scales the score row
    pre = 1.0 if scale > 0 else scale
    post = scale if scale > 0 else 1.0
    if causal or pre != 1.0:
        L = tl.tensor((H, Sq, Sk), "float32", name="L")
    else:
        L = S

    for h, i, j in tl.grid(H, Sq, Sk):
        S[h, i, j] = 0.0
        for d in tl.reduce(D):
            S[h, i, j] += Q[h, i, d] * K[h, j, d]
        if L is not S:
            s = S[h, i, j] * pre if pre != 1.0 else S[h, i, j]
            # causal: min(s, MASK * (i - j + 1/2)): s itself for keys j <= i (as long as
            # s < MASK / 2), at most -MASK / 2 for j > i, far below any score (exp gives
            # exactly 0, as for -inf); one index iota and one min with the scores
            L[h, i, j] = tl.min(s, (i - j) * MASK + MASK // 2) if causal else s
    for h, i in tl.grid(H, Sq):
        mx[h, i] = -tl.inf
        for j in tl.reduce(Sk):
            mx[h, i] = tl.max(mx[h, i], L[h, i, j])
        total[h, i] = 0.0
        for j in tl.reduce(Sk):
            total[h, i] += tl.exp(L[h, i, j] * post + mx[h, i] * -post)
        for j in tl.grid(Sk):
            P[h, i, j] = tl.exp(L[h, i, j] * post + mx[h, i] * -post) / total[h, i]
    for h, i, e in tl.grid(H, Sq, Dv):
        O[h, i, e] = 0.0
        for j in tl.reduce(Sk):
            O[h, i, e] += P[h, i, j] * V[h, j, e]
    return O


attention_algo.name = "attention"


# -- schedules ----------------------------------------------------------------------------------

DEFAULT = {"qt": 128, "kt": 128, "pipe": 2, "qi": 4, "opipe": 4, "hpipe": 2, "mm": {"mt": 128, "nt": 512, "kt": 128, "mi": 1,
                                                   "pipe": 2, "cache_a": True}}


def _rows(s, stage, qt):
    """Row stage [h, i(, j)]: 128 query rows on the partitions."""
    h, i, *rest = s.axes(stage)
    io, ii = s.split(i, fit(ext(s, i), qt))
    s.reorder(h, io, ii, *rest)
    s.partition(ii)
    return io


def _output(s, cfg):
    """O = P V on the systolic array: query rows on the partitions, Dv free, keys contracted
    (splits without a tail where the extent allows: on-chip P is filled whole tiles)."""
    h, i, e = s.axes("O")
    (j,) = s.reduce_axes("O")
    io, ii = s.split(i, _even(ext(s, i), cfg["qt"]))
    kt = divisor(ext(s, j), cfg["kt"])    # whole key blocks when a divisor is not too small
    jo, ji = s.split(j, kt if 2 * kt >= fit(ext(s, j), cfg["kt"]) else _even(ext(s, j), cfg["kt"]))
    s.reorder(h, io, jo, ii, e, ji)
    s.partition(ii)
    s.vectorize(e)
    s.tensorize(ji, "matmul")
    if cfg["pipe"] > 1 and ext(s, jo) > 1:
        s.pipeline(jo, cfg["pipe"])
    return io


def template(s, cfg):
    """Flash-style: everything but Q, K, V and O stays on chip. Inside O's query-tile loop
    the scores S = Q K^T of the tile's 128 rows against every key (on the systolic array),
    the logits, the row max, exp, row sum and P are computed in the rows' own layout
    (queries on the partitions) and P is transposed per key block for O = P V. `qi` query
    tiles share one fill (their softmax chains interleave on the engines); K^T and V are
    cached per head and the head loop is pipelined (`hpipe` slots for those caches)."""
    io = _output(s, cfg)
    at = io
    bank = sim.machine(s.machine).psum_bank_bytes
    qi = divisor(ext(s, io), cfg["qi"])
    sq, sk = s.prog.tensors["Q"].shape[1], s.prog.tensors["K"].shape[1]
    if qi > 1 and sq % _even(sq, cfg["qt"]) == 0:   # io: no tail split
        at, tiles = s.split(io, qi)
        if cfg.get("opipe", 1) > 1:    # a fill's tiles: O's accumulators and stores rotate
            s.pipeline(tiles, cfg["opipe"])
    h = s.axes("O")[0]
    if cfg["hpipe"] > 1 and ext(s, h) > 1:
        s.pipeline(h, cfg["hpipe"])    # the next head's K^T and V load during this head
        s.pipeline(io if at == io else at, 1)   # (the query tiles' own buffers: one slot)
    for st in reversed([x.name for x in s.prog.stages if x.name != "O"]):
        s.compute_at(st, at)
    if cfg.get("cache_kv", True):  # K^T (transposed) and V loaded once per head
        s.cache_read("K", "sbuf", s.axes("O")[0])
        s.cache_read("V", "sbuf", s.axes("O")[0])
    for st in ("mx", "total"):    # whole rows: one tile per query tile, whatever Sk
        for r in s.reduce_axes(st):
            s.vectorize(r)
    (d,) = s.reduce_axes("S")
    if ext(s, d) > 128:
        d = s.split(d, fit(ext(s, d), 128))[1]
    s.tensorize(d, "matmul")


def unfused(s, cfg):
    """Fallback: both products on the systolic array, the intermediates through HBM."""
    tile_matmul(s, "S", cfg["mm"], "Q", "K")
    _output(s, cfg)
    for st in [x.name for x in s.prog.stages if x.name not in ("S", "O")]:
        _rows(s, st, cfg["qt"])


# fewer interleaved query tiles when their rows do not fit on chip together (long rows)
attention = KernelFn("attention", attention_algo, (("flash", template, DEFAULT),
                                                   ("flash", template, {**DEFAULT, "qi": 2}),
                                                   ("flash", template, {**DEFAULT, "qi": 1}),
                                                   ("unfused", unfused, DEFAULT)),
                     "softmax(Q K^T / sqrt(D) [+ causal mask]) V per head")
