"""Attention: O = softmax(Q K^T * scale [+ causal mask]) V, per head.

    attention(Q, K, V, causal=False, scale=None)
        Q [H, Sq, D], K [H, Sk, D], V [H, Sk, Dv] -> O [H, Sq, Dv] (Q's dtype)

The algorithm has five stages: scores S = Q K^T (a contraction over D), the row max, the
row sum of exp, the probabilities P (in V's dtype, so the second product runs on the
systolic array at the input precision) and O = P V (a contraction over the keys).

The expert schedule tiles over the sequence the way flash attention does as far as the
language allows: 128 query rows per tile on the partitions, keys in 128-wide steps
contracted on the systolic array, and the probabilities P computed inside the output's
query-tile loop (compute_at) so the [Sq, Sk] probability matrix never goes to HBM. True
online-softmax rescaling (one pass over the keys) is a recurrence the DSL cannot express,
so the scores still make one HBM round trip (report, gap 4).
"""
from __future__ import annotations

import tensorlang as tl

from ._library import KernelFn, fit
from .matmul import ext, tile_matmul


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
    scale = D ** -0.5 if scale is None else float(scale)
    S = tl.tensor((H, Sq, Sk), "float32", name="S")
    mx = tl.tensor((H, Sq), "float32", name="mx")
    total = tl.tensor((H, Sq), "float32", name="total")
    P = tl.tensor((H, Sq, Sk), V.dtype, name="P")
    O = tl.tensor((H, Sq, Dv), Q.dtype, name="O")

    def logit(h, i, j):
        s = S[h, i, j] * scale
        return tl.where(j <= i, s, -tl.inf) if causal else s

    for h, i, j in tl.grid(H, Sq, Sk):
        S[h, i, j] = 0.0
        for d in tl.reduce(D):
            S[h, i, j] += Q[h, i, d] * K[h, j, d]
    for h, i in tl.grid(H, Sq):
        mx[h, i] = -tl.inf
        for j in tl.reduce(Sk):
            mx[h, i] = tl.max(mx[h, i], logit(h, i, j))
        total[h, i] = 0.0
        for j in tl.reduce(Sk):
            total[h, i] += tl.exp(logit(h, i, j) - mx[h, i])
        for j in tl.grid(Sk):
            P[h, i, j] = tl.exp(logit(h, i, j) - mx[h, i]) / total[h, i]
    for h, i, e in tl.grid(H, Sq, Dv):
        O[h, i, e] = 0.0
        for j in tl.reduce(Sk):
            O[h, i, e] += P[h, i, j] * V[h, j, e]
    return O


attention_algo.name = "attention"


# -- schedules ----------------------------------------------------------------------------------

DEFAULT = {"qt": 128, "kt": 128, "pipe": 2, "mm": {"mt": 128, "nt": 512, "kt": 128, "mi": 1,
                                                   "pipe": 2, "cache_a": True}}


def _rows(s, stage, qt):
    """Row stage [h, i(, j)]: 128 query rows on the partitions."""
    h, i, *rest = s.axes(stage)
    io, ii = s.split(i, fit(ext(s, i), qt))
    s.reorder(h, io, ii, *rest)
    s.partition(ii)
    return io


def _output(s, cfg):
    """O = P V on the systolic array: query rows on the partitions, Dv free, keys contracted."""
    h, i, e = s.axes("O")
    (j,) = s.reduce_axes("O")
    io, ii = s.split(i, fit(ext(s, i), cfg["qt"]))
    jo, ji = s.split(j, fit(ext(s, j), cfg["kt"]))
    s.reorder(h, io, jo, ii, e, ji)
    s.partition(ii)
    s.vectorize(e)
    s.tensorize(ji, "matmul")
    if cfg["pipe"] > 1 and ext(s, jo) > 1:
        s.pipeline(jo, cfg["pipe"])
    return io


def template(s, cfg):
    """Flash-style as far as the language allows: S on the systolic array, row statistics
    per 128-row query tile, P computed on chip inside O's query-tile loop."""
    tile_matmul(s, "S", cfg["mm"], "Q", "K")
    io = _output(s, cfg)
    s.compute_at("P", io)
    _rows(s, "mx", cfg["qt"])
    _rows(s, "total", cfg["qt"])


def unfused(s, cfg):
    """Fallback: both products on the systolic array, P through HBM."""
    tile_matmul(s, "S", cfg["mm"], "Q", "K")
    _output(s, cfg)
    for st in ("mx", "total", "P"):
        _rows(s, st, cfg["qt"])


attention = KernelFn("attention", attention_algo, (("flash", template, DEFAULT),
                                                   ("unfused", unfused, DEFAULT)),
                     "softmax(Q K^T / sqrt(D) [+ causal mask]) V per head")
