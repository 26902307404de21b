"""Matrix multiplication: matmul, batched matmul, and matmuls with fused epilogues.

    matmul(A, B, act=None)            C = act(A @ B)             A [M,K], B [K,N]
    linear(X, W, b, act=None)         Y = act(X @ W + b)         b [N]
    matmul_add(A, B, R, act=None)     Y = act(A @ B) + R         R [M,N] (residual add)
    bmm(A, B)                         C[b] = A[b] @ B[b]

Inputs may be bfloat16, float32 or fp8 (float8_e4m3 / float8_e5m2); the result is float32
(`out_dtype=` changes it); `act` is None, "relu", "gelu" or "silu".

The expert schedule (`template`): 128-row output tiles on the partitions, 512-wide free
tiles (one PSUM bank of fp32), the contraction split into 128-deep steps on the systolic
array, `mi` row tiles sharing each loaded B tile (B cached per k-step, A cached per row
block), the k loop multi-buffered so loads overlap the multiplies. Epilogues are computed on
the accumulator tile inside the output loop (compute_at), so the pre-activation never goes
to HBM.
"""
from __future__ import annotations

import tensorlang as tl

from ._library import KernelFn, divisor, fit

ACTS = {None: None, "none": None, "relu": tl.relu, "gelu": tl.gelu, "silu": tl.silu}


def _act(name):
    if name not in ACTS:
        raise tl.TensorlangError(f"activation {name!r} is not supported; choose one of "
                                 f"{', '.join(str(a) for a in ACTS if a != 'none')}")
    return ACTS[name]


def _check_mk_kn(what, A, B):
    if len(A.shape) != 2 or len(B.shape) != 2:
        raise tl.TensorlangError(f"{what}: A and B must be 2-D, got A {A.shape}, B {B.shape}")
    if A.shape[1] != B.shape[0]:
        raise tl.TensorlangError(f"{what}: A is {A.shape[0]}x{A.shape[1]} but B is "
                                 f"{B.shape[0]}x{B.shape[1]}; inner dimensions differ")


@tl.kernel
def matmul_algo(A, B, act=None, out_dtype="float32"):
    _check_mk_kn("matmul", A, B)
    M, K = A.shape
    _, N = B.shape
    f = _act(act)
    if f is None:
        C = tl.tensor((M, N), out_dtype, name="C")
        for i, j in tl.grid(M, N):
            C[i, j] = 0.0
            for k in tl.reduce(K):
                C[i, j] += A[i, k] * B[k, j]
        return C
    H = tl.tensor((M, N), "float32", name="H")
    C = tl.tensor((M, N), out_dtype, name="C")
    for i, j in tl.grid(M, N):
        H[i, j] = 0.0
        for k in tl.reduce(K):
            H[i, j] += A[i, k] * B[k, j]
        C[i, j] = f(H[i, j])
    return C


matmul_algo.name = "matmul"


@tl.kernel
def linear_algo(X, W, b, act=None, out_dtype="float32"):
    _check_mk_kn("linear", X, W)
    M, K = X.shape
    _, N = W.shape
    if b.shape != (N,):
        raise tl.TensorlangError(f"linear: bias b has shape {b.shape}, expected ({N},)")
    f = _act(act)
    H = tl.tensor((M, N), "float32", name="H")   # accumulated from the bias
    C = tl.tensor((M, N), out_dtype, name="C")
    for i, j in tl.grid(M, N):
        H[i, j] = b[j]
        for k in tl.reduce(K):
            H[i, j] += X[i, k] * W[k, j]
        C[i, j] = f(H[i, j]) if f is not None else H[i, j]
    return C


linear_algo.name = "linear"


@tl.kernel
def matmul_add_algo(A, B, R, act=None, out_dtype="float32"):
    _check_mk_kn("matmul_add", A, B)
    M, K = A.shape
    _, N = B.shape
    if R.shape != (M, N):
        raise tl.TensorlangError(f"matmul_add: residual R has shape {R.shape}, expected {(M, N)}")
    f = _act(act)
    H = tl.tensor((M, N), "float32", name="H")
    C = tl.tensor((M, N), out_dtype, name="C")
    for i, j in tl.grid(M, N):
        H[i, j] = 0.0
        for k in tl.reduce(K):
            H[i, j] += A[i, k] * B[k, j]
        C[i, j] = (f(H[i, j]) if f is not None else H[i, j]) + R[i, j]
    return C


matmul_add_algo.name = "matmul_add"


@tl.kernel
def bmm_algo(A, B, out_dtype="float32"):
    if len(A.shape) != 3 or len(B.shape) != 3 or A.shape[0] != B.shape[0] \
            or A.shape[2] != B.shape[1]:
        raise tl.TensorlangError(f"bmm: A is {A.shape} but B is {B.shape}; expected "
                                 "[batch, M, K] and [batch, K, N]")
    NB, M, K = A.shape
    _, _, N = B.shape
    C = tl.tensor((NB, M, N), out_dtype, name="C")
    for b, i, j in tl.grid(NB, M, N):
        C[b, i, j] = 0.0
        for k in tl.reduce(K):
            C[b, i, j] += A[b, i, k] * B[b, k, j]
    return C


bmm_algo.name = "bmm"


# -- schedules ----------------------------------------------------------------------------------

DEFAULT = {"mt": 128, "nt": 512, "kt": 128, "mi": 4, "pipe": 4, "pj": 2, "cache_a": True,
           "pi": 4}
# nj: column tiles of a row block per pass (a tail-free split); pipe 8: a block's B tiles
# stream 8 k steps ahead, so the epilogue's evacuations and stores at the end of a column
# tile do not leave the next tile's matmuls waiting on their B (linear 4096x4096x1024 on
# trn2: 487.2 -> 470.6 us)
EPI = {**DEFAULT, "nj": 8, "pipe": 8}
SIMPLE = {"mt": 128, "nt": 512, "kt": 128, "mi": 1, "pipe": 2, "pj": 1, "cache_a": False}


def ext(s, loop) -> int:
    return s.state.get(loop.stage).var(str(loop)).extent


def tile_matmul(s, stage: str, cfg: dict, a: str, b: str):
    """Tile the contraction `stage` (spatial axes [batch..., i, j], reduction k) onto the
    systolic array; returns the loops (outer..., ioo, jo, ko, ioi)."""
    *batch, i, j = s.axes(stage)
    (k,) = s.reduce_axes(stage)
    io, ii = s.split(i, fit(ext(s, i), cfg["mt"]))
    jo, ji = s.split(j, fit(ext(s, j), cfg["nt"]))
    ko, ki = s.split(k, fit(ext(s, k), cfg["kt"]))
    if ext(s, i) % ext(s, ii) == 0 and cfg["mi"] > 1 and ext(s, io) > 1:
        ioo, ioi = s.split(io, fit(ext(s, io), cfg["mi"]))
    else:  # lowering cannot split the outer loop of a split with a tail (report, gap 1)
        ioo, ioi = io, None
    s.reorder(*batch, ioo, jo, ko, *([ioi] if ioi else []), ii, ji, ki)
    s.partition(ii)
    s.vectorize(ji)
    s.tensorize(ki, "matmul")
    if cfg["pipe"] > 1 and ext(s, ko) > 1:
        s.pipeline(ko, cfg["pipe"])
    if cfg.get("pj", 1) > 1 and ext(s, jo) > 1:   # double-buffer the PSUM accumulators
        s.pipeline(jo, cfg["pj"])
    if cfg.get("pa", 1) > 1 and cfg["cache_a"] and ext(s, ioo) > 1:  # prefetch next A block
        s.pipeline(ioo, cfg["pa"])
    if ioi is not None and cfg.get("pi", 1) > 1:   # each row tile's output tile its own slot
        s.pipeline(ioi, min(cfg["pi"], ext(s, ioi)))
    if ioi is not None:
        s.cache_read(b, "sbuf", ko)
    if cfg["cache_a"]:   # a batch of one row block: at the batch loop (its first iteration
        # is then peeled, and the first A block loads on every DMA queue; lower.bind_loop)
        s.cache_read(a, "sbuf", batch[-1] if batch and ext(s, ioo) == 1 else ioo)
    return ioo, jo, ko, ioi


def template(s, cfg):
    """Expert schedule for matmul / bmm (single stage C = A @ B)."""
    tile_matmul(s, "C", cfg, *[t.name for t in s.prog.inputs[:2]])


def epilogue_template(s, cfg):
    """Expert schedule with a fused epilogue: C is tiled like the plain matmul (row blocks of
    `mi` row tiles, `nj` column tiles of a block per pass) and the accumulation H is computed
    on chip at the block loop (compute_at): lowering lays it out like the plain matmul (k
    steps outside the row tiles, each B tile shared by them, the block's A rows cached and
    transposed once), each accumulator evacuated to SBUF as it completes; the epilogue runs
    per output tile from there. H never goes to HBM."""
    a = s.prog.inputs[0].name
    i, j = s.axes("C")
    io, ii = s.split(i, fit(ext(s, i), cfg["mt"]))
    jo, ji = s.split(j, fit(ext(s, j), cfg["nt"]))
    blk = io
    if ext(s, i) % ext(s, ii) == 0 and cfg["mi"] > 1 and ext(s, io) > 1:
        ioo, ioi = s.split(io, fit(ext(s, io), cfg["mi"]))
        blk = ioo
    else:
        ioo, ioi = io, None
    if ext(s, j) % ext(s, ji) == 0 and ext(s, jo) > cfg["nj"]:
        joo, joi = s.split(jo, divisor(ext(s, jo), cfg["nj"]))
        s.reorder(ioo, joo, joi, *([ioi] if ioi else []), ii, ji)
        blk = joo
    else:
        joo, joi = None, jo
        s.reorder(ioo, jo, *([ioi] if ioi else []), ii, ji)
    s.partition(ii)
    s.vectorize(ji)
    (k,) = s.reduce_axes("H")
    ko, ki = s.split(k, fit(ext(s, k), cfg["kt"]))
    s.tensorize(ki, "matmul")
    if cfg["pipe"] > 1 and ext(s, ko) > 1:
        s.pipeline(ko, cfg["pipe"])
    if cfg.get("pj", 1) > 1 and ext(s, joi) > 1:   # double-buffer the PSUM accumulators
        s.pipeline(joi, cfg["pj"])
    if ioi is not None and cfg.get("pi", 1) > 1:    # the epilogue tiles (R) of each row tile
        s.pipeline(ioi, min(cfg["pi"], ext(s, ioi)))
    s.compute_at("H", blk)
    if cfg["cache_a"]:
        s.cache_read(a, "sbuf", blk)


def epilogue_unfused(s, cfg):
    """Fallback: the matmul stage H tiled like `template`, the epilogue as its own pass."""
    a, b = (t.name for t in s.prog.inputs[:2])
    tile_matmul(s, "H", cfg, a, b)
    i, j = s.axes("C")
    io, ii = s.split(i, fit(ext(s, i), cfg["mt"]))
    s.partition(ii)
    s.vectorize(j) if ext(s, j) <= 2048 else s.vectorize(s.split(j, 2048)[1])


SINGLE = (("expert", template, DEFAULT), ("simple", template, SIMPLE))
# bmm: a batch's A block is transposed at its start (PE in order, so not overlapped): whole
# batches of rows (B read once) and deep B / output pipelines keep that stall short
BMM = {**DEFAULT, "mi": 8, "pj": 1, "pi": 8, "pipe": 8}
BATCHED = (("expert", template, BMM),) + SINGLE
EPILOGUE = (("fused", epilogue_template, EPI), ("unfused", epilogue_unfused, DEFAULT),
            ("simple", epilogue_unfused, SIMPLE))


def _templates(prog):
    """One stage (plain matmul): SINGLE; with an epilogue stage: EPILOGUE."""
    return SINGLE if len(prog.stages) == 1 else EPILOGUE


def _batched(prog):
    """bmm: BATCHED when the contraction takes several k steps (B reuse and the A fill
    matter); with one (K <= kt: each accumulator is one matmul, the output stores dominate)
    SINGLE, whose double-buffered accumulators let a column tile's matmuls run while the
    previous one's are evacuated (8x2048x2048x128 on trn2: 762.7 -> 572.7 us)."""
    return BATCHED if prog.inputs[0].shape[-1] > BMM["kt"] else SINGLE


matmul = KernelFn("matmul", matmul_algo, _templates,
                  "C = act(A @ B): A [M,K], B [K,N] (bf16 / fp32 / fp8) -> float32 [M,N]")
linear = KernelFn("linear", linear_algo, EPILOGUE, "Y = act(X @ W + b): the fused linear layer")
matmul_add = KernelFn("matmul_add", matmul_add_algo, EPILOGUE,
                      "Y = act(A @ B) + R: matmul with a fused residual add")
bmm = KernelFn("bmm", bmm_algo, _batched, "C[b] = A[b] @ B[b]: batched matmul")
