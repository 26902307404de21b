"""The kernel library: every kernel equals plain numpy, fallbacks never fail, shipped records
replay to the cycles they claim, and the run / asm / trace commands work."""
import json
import math

import numpy as np
import pytest

import kernels
import sim
import tensorlang as tl
from kernels import _library
from kernels.shapes import SHAPES, workload
from tensorlang import cli
from tensorlang.dtypes import assert_close, np_dtype, random_array
from sim.isa import walk_instrs


def R(shape, dtype="bfloat16", seed=0, scale=1.0):
    return random_array(shape, dtype, seed=seed, scale=scale)


def f32(a):
    return np.asarray(a, np.float32)


def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    with np.errstate(over="ignore"):      # exp of a large negative x: inf, silu -> -0
        return x / (1 + np.exp(-x))


ACT = {None: lambda x: x, "relu": lambda x: np.maximum(x, 0), "gelu": gelu, "silu": silu}


def check(kf, arrays, expected, dtype, **static):
    out = kf(*arrays, **static)
    assert_close(out, expected, dtype, what=f"{kf.name}{static}")
    return kf.compile(*arrays, **static)


# -- matmul family ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float8_e4m3"])
@pytest.mark.parametrize("mkn", [(128, 128, 512), (256, 384, 640), (200, 100, 300)])
def test_matmul(dtype, mkn):
    M, K, N = mkn
    A, B = R((M, K), dtype), R((K, N), dtype, 1)
    check(kernels.matmul, (A, B), f32(A) @ f32(B), dtype)


@pytest.mark.parametrize("act", [None, "relu", "gelu", "silu"])
def test_matmul_epilogues(act):
    A, B, b, Rr = R((256, 128)), R((128, 512), seed=1), R((512,), seed=2), R((256, 512), seed=3)
    H = f32(A) @ f32(B)
    check(kernels.matmul, (A, B), ACT[act](H), "bfloat16", act=act)
    check(kernels.linear, (A, B, b), ACT[act](H + f32(b)), "bfloat16", act=act)
    k = kernels.linear.compile(A, B, b, act=act, use_records=False)
    assert k.choice.source == "template fused"          # the epilogue stays on chip
    check(kernels.matmul_add, (A, B, Rr), ACT[act](H) + f32(Rr), "bfloat16", act=act)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float8_e4m3"])
@pytest.mark.parametrize("mnk", [(512, 1024, 256), (256, 1300, 384), (200, 600, 300),
                                 (640, 1100, 128)])
def test_fused_epilogue_template_over_shapes(dtype, mnk):
    """The fused template (records off): the accumulation laid out like the plain matmul
    (a row block's k steps outside its row tiles; tails of rows and columns), the epilogue
    (bias, activation, residual) computed on each accumulator as it completes. Equal to
    numpy; the pre-activation never goes to HBM and A is loaded once."""
    M, N, K = mnk
    A, B, b, Rr = R((M, K), dtype), R((K, N), dtype, 1), R((N,), dtype, 2), R((M, N), dtype, 3)
    H = f32(A) @ f32(B)
    for act in (None, "gelu", "silu"):
        k = kernels.linear.compile(A, B, b, act=act, use_records=False)
        assert k.choice.source == "template fused"
        assert_close(k.run(A, B, b), ACT[act](H + f32(b)), dtype, what=f"linear {act}")
        k = kernels.matmul_add.compile(A, B, Rr, act=act, use_records=False)
        assert k.choice.source == "template fused"
        assert_close(k.run(A, B, Rr), ACT[act](H) + f32(Rr), dtype, what=f"matmul_add {act}")
    asm = k.asm()
    assert "tensor H" not in asm                      # no HBM scratch for the accumulation
    r = k.simulate()
    assert r.bytes_moved["hbm_read"] < 2 * (A.nbytes + B.nbytes + Rr.nbytes)


def test_fused_epilogue_reads_psum_and_shares_b_tiles():
    """Each B tile is loaded once per k step for all row tiles of a block and A once (the
    plain matmul's traffic), b's row once for the whole kernel (broadcast to the partitions on
    chip, not per row block); the epilogue reads the accumulator in PSUM."""
    s, k = workload("linear", (1024, 1024, 512))
    kern = kernels.linear.compile(*s, use_records=False, **k)
    plain = kernels.matmul.compile(*s[:2], use_records=False)
    bias = 1024 * 2                      # b's row, read from HBM once
    assert kern.simulate().bytes_moved["hbm_read"] == plain.simulate().bytes_moved["hbm_read"] \
        + bias
    ops = {(i.op, tuple(a.mem for a in i.srcs)) for i, _ in walk_instrs(kern.program.body)}
    assert ("tensor_tensor", ("sbuf", "psum")) in ops      # b + acc, straight from PSUM


def test_fused_matmul_fill_into_a_slot_buffer_when_the_consumer_has_inner_hooks():
    """A cache_read inside the block loop keeps the consumer's own loops: the block's
    accumulators then go to an SBUF slot buffer (one per column and row tile) first."""
    import importlib  # noqa: PLC0415
    mm_mod = importlib.import_module("kernels.matmul")   # (kernels.matmul is the KernelFn)
    A, B, Rr = R((512, 256)), R((256, 1024), seed=1), R((512, 1024), seed=3)
    s = kernels.matmul_add.trace(A, B, Rr).schedule(machine="trn2")
    mm_mod.epilogue_template(s, dict(mm_mod.EPI))
    s.cache_read("R", "sbuf", next(v for v in s.loops("C") if v.startswith("jo")))
    k = s.build("trn2")
    assert "buffer H_cache" in k.asm()
    assert_close(k.run(A, B, Rr), f32(A) @ f32(B) + f32(Rr), "bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float8_e4m3"])
@pytest.mark.parametrize("shape", [(3, 128, 64, 256), (3, 200, 100, 300), (2, 1024, 512, 256)])
def test_bmm(dtype, shape):
    nb, M, K, N = shape
    A, B = R((nb, M, K), dtype), R((nb, K, N), dtype, 1)
    check(kernels.bmm, (A, B), np.matmul(f32(A), f32(B)), dtype)
    k = kernels.bmm.compile(A, B, use_records=False)
    assert k.choice.source == "template expert"
    assert_close(k.run(A, B), np.matmul(f32(A), f32(B)), dtype)
    if M >= 1024 and dtype != "float32":   # 8 row tiles of 4 k tiles: the fill's PSUM ring
        ring = next(b for b in k.program.buffers if b.name == "A_rows_T")   # spans the rows
        assert ring.size > 2 * k.spec.psum_bank_bytes, ring


def test_bmm_last_batch_drains_its_last_column_block_over_every_queue():
    """The batch loop (A cached per batch) peels its first and last batches; inside the last
    one the column-block loop peels its last iteration too, so that block's stores follow
    every load and go over every DMA queue (lower.Lowerer.bind_loop, assign_queues).
    Values equal numpy."""
    A, B = R((3, 256, 1024)), R((3, 1024, 1024), seed=1)
    k = kernels.bmm.compile(A, B, use_records=False)
    tail = []
    for node in reversed(k.program.body):     # the top-level nodes after the last load
        dmas = [(i, loops) for i, loops in sim.isa.walk_instrs((node,)) if i.op == "dma"]
        if any(i.dst.mem != "hbm" for i, _ in dmas):
            break
        tail += dmas
    assert {i.engine for i, _ in tail} == {f"q{q}" for q in range(k.spec.dma_queues)}
    assert sum(i.dst.num_elements * math.prod(lp.extent for lp in loops)
               for i, loops in tail) == 256 * 512                 # the last column block
    assert_close(k.run(A, B), np.matmul(f32(A), f32(B)), "bfloat16")


def test_psum_evacuation_split_over_act_and_dve():
    """Where the vector engine can read PSUM alongside the scalar engine (trn2, not trn1),
    an accumulator's evacuation is split between the two; the values are the same."""
    A, B = R((256, 256)), R((256, 512), seed=1)
    for machine, split in (("trn2", True), ("trn1", False)):
        k = kernels.matmul.compile(A, B, machine=machine, use_records=False)
        evac = [ln for ln in k.asm().splitlines() if "tensor_copy" in ln and "<- psum:C_acc" in ln]
        assert evac and any("tensor_copy.dve" in ln for ln in evac) == split, evac
        assert_close(k.run(A, B), f32(A) @ f32(B), "bfloat16")


def test_bad_shapes_are_one_clear_error():
    with pytest.raises(tl.TensorlangError, match="inner dimensions differ"):
        kernels.matmul(R((4, 8)), R((9, 4)))
    with pytest.raises(tl.TensorlangError, match="activation 'tanhh'"):
        kernels.matmul(R((4, 8)), R((8, 4)), act="tanhh")


# -- conv -----------------------------------------------------------------------------------------

def conv_ref(X, Wt, stride, padding, dilation):
    X, Wt = f32(X), f32(Wt)
    N, C, H, W = X.shape
    O, _, KH, KW = Wt.shape
    Xp = np.pad(X, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    OH = (H + 2 * padding - dilation * (KH - 1) - 1) // stride + 1
    OW = (W + 2 * padding - dilation * (KW - 1) - 1) // stride + 1
    Y = np.zeros((N, O, OH, OW), np.float32)
    for kh in range(KH):
        for kw in range(KW):
            win = Xp[:, :, kh * dilation:kh * dilation + stride * (OH - 1) + 1:stride,
                     kw * dilation:kw * dilation + stride * (OW - 1) + 1:stride]
            Y += np.einsum("nchw,oc->nohw", win, Wt[:, :, kh, kw])
    return Y


CONVS = [((1, 16, 8, 8), (32, 16, 3, 3), 1, 1, 1), ((2, 8, 9, 9), (16, 8, 3, 3), 2, 0, 1),
         ((1, 8, 10, 10), (8, 8, 3, 3), 1, 2, 2)]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation", CONVS)
def test_conv2d_and_depthwise(xs, ws, stride, padding, dilation):
    X, Wt = R(xs), R(ws, seed=1)
    st = dict(stride=stride, padding=padding, dilation=dilation)
    check(kernels.conv2d, (X, Wt), conv_ref(X, Wt, **st), "bfloat16", **st)
    Wd = R((xs[1],) + ws[2:], seed=2)
    ref = np.concatenate([conv_ref(X[:, c:c + 1], Wd[c][None, None], **st)
                          for c in range(xs[1])], 1)
    check(kernels.depthwise_conv2d, (X, Wd), ref, "bfloat16", **st)


DEPTHWISE = [((1, 256, 24, 24), 3, 1, 1, 1, "bfloat16"), ((2, 160, 9, 11), 3, 2, 1, 1, "bfloat16"),
             ((1, 128, 10, 10), 5, 1, 2, 1, "float32"), ((2, 64, 8, 8), 3, 1, 0, 1, "bfloat16"),
             ((1, 96, 11, 9), 3, 1, 2, 2, "bfloat16"), ((1, 128, 7, 7), 5, 2, 3, 1, "bfloat16"),
             ((2, 128, 23, 25), 5, 1, 2, 1, "float32"), ((1, 64, 40, 30), 3, 2, 1, 1, "bfloat16"),
             ((2, 192, 50, 44), 3, 1, 1, 1, "bfloat16")]   # tensor-engine rows stored from PSUM


@pytest.mark.parametrize("xs,k,stride,padding,dilation,dtype", DEPTHWISE)
def test_depthwise_planes(xs, k, stride, padding, dilation, dtype):
    """The whole-plane template: the padded plane on chip, one pass per tap split over the
    engines; several channel tiles, batches, strides, paddings (also wider than the taps
    reach) and dtypes."""
    X, Wd = R(xs, dtype), R((xs[1], k, k), dtype, seed=2)
    st = dict(stride=stride, padding=padding, dilation=dilation)
    ref = np.concatenate([conv_ref(X[:, c:c + 1], Wd[c][None, None], **st)
                          for c in range(xs[1])], 1)
    check(kernels.depthwise_conv2d, (X, Wd), ref, dtype, **st)   # what users get
    kc = kernels.depthwise_conv2d.compile(X, Wd, use_records=False, **st)   # the template's
    assert_close(kc.run(X, Wd), ref, dtype, what=f"depthwise template {st}")
    asm = kc.asm()
    assert "X_pad" not in asm.split("loop")[0].split("buffer")[0]   # no padded copy in HBM
    assert "tensor_reduce" not in asm                                # one pass per tap
    # the roofline is the problem's: HBM bytes (the diagonal matmuls are not work it needs)
    r = kc.simulate()
    hbm = sum(a.nbytes for a in (X, Wd)) + ref.size * 4
    assert r.bound == "memory" and r.roofline_us == pytest.approx(
        hbm / (sim.machine("trn2").dma_gbps * 1e3), rel=1e-9)


def test_padded_plane_taps_with_shared_or_constant_weights():
    """The plane schedule on sums whose weight is not per channel (one filter for every
    channel, a constant): the box keeps its padding columns then (no clipped taps), values
    still equal numpy."""
    @tl.kernel
    def shared(X, F):
        C, H, W = X.shape
        Y = tl.tensor((C, H, W), "float32")
        for c, h, w in tl.grid(C, H, W):
            Y[c, h, w] = 0.0
            for kh, kw in tl.reduce(3, 3):
                Y[c, h, w] += X.pad(0.0)[c, h + kh - 1, w + kw - 1] * F[kh, kw]
        return Y

    @tl.kernel
    def box_sum(X):
        C, H, W = X.shape
        Y = tl.tensor((C, H, W), "float32")
        for c, h, w in tl.grid(C, H, W):
            Y[c, h, w] = 0.0
            for kh, kw in tl.reduce(3, 3):
                Y[c, h, w] += X.pad(0.0)[c, h + kh - 1, w + kw - 1] * 0.5
        return Y

    X, F = R((256, 20, 30)), R((3, 3), seed=1)
    Xp = np.pad(f32(X), ((0, 0), (1, 1), (1, 1)))
    win = [Xp[:, kh:kh + 20, kw:kw + 30] for kh in range(3) for kw in range(3)]
    for kern, args, w in ((shared, (X, F), f32(F).ravel()), (box_sum, (X,), [0.5] * 9)):
        prog = kern.trace(*args)
        s = prog.schedule()
        c, h, w_ = s.axes("Y")
        kh, kw = s.reduce_axes("Y")
        co, ci = s.split(c, 128)
        s.reorder(co, kh, kw, ci, h, w_)
        s.partition(ci)
        s.vectorize(h)
        s.vectorize(w_)
        s.pipeline(kh, 1)
        s.unroll(kw)
        s.cache_read("X", "sbuf", co)
        k = s.build()
        assert "X_pad_box" in k.asm() and "X_pad scratch" not in k.asm()
        expect = sum(np.float32(wk) * x for wk, x in zip(w, win))
        assert_close(k.run(*args), expect, "bfloat16", what=kern.name)


# -- norms -----------------------------------------------------------------------------------------

def rms(x, g):
    return x / np.sqrt((x * x).mean(1, keepdims=True) + 1e-6) * g


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("mn", [(128, 256), (200, 300)])
def test_norms(dtype, mn):
    M, N = mn
    X, g, b = R((M, N), dtype), R((N,), dtype, 1), R((N,), dtype, 2)
    x = f32(X)
    e = np.exp(x - x.max(1, keepdims=True))
    check(kernels.softmax, (X,), e / e.sum(1, keepdims=True), dtype)
    check(kernels.log_softmax, (X,), np.log(e / e.sum(1, keepdims=True)), dtype)
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    check(kernels.layernorm, (X, g, b), (x - mu) / np.sqrt(var + 1e-5) * f32(g) + f32(b), dtype)
    check(kernels.rmsnorm, (X, g), rms(x, f32(g)), dtype)
    W = R((N, 256), dtype, 3)
    xn = rms(x, f32(g)).astype(np_dtype(dtype)).astype(np.float32)  # Xn is stored in W's dtype
    check(kernels.rmsnorm_matmul, (X, g, W), xn @ f32(W), dtype)


def test_rmsnorm_matmul_row_blocks_pipelined():
    """rmsnorm_matmul over four row blocks (mi=4 row tiles each) with a long row (K >= pb_k):
    the block loop is pipelined, each of the four blocks its own Xn buffer (three without
    it: 2048x256x2048 on trn2 316.8k vs 360.1k cycles), values = numpy."""
    dtype = "bfloat16"
    X, g, W = R((2048, 2048), dtype), R((2048,), dtype, 1), R((2048, 256), dtype, 3)
    prog = kernels.rmsnorm_matmul.trace(X, g, W)
    kern = kernels.rmsnorm_matmul.template_schedule(prog, "trn2", 0).build("trn2")
    assert sum(ln.startswith("buffer Xn_cache") for ln in kern.asm().splitlines()) == 4
    xn = rms(f32(X), f32(g)).astype(np_dtype(dtype)).astype(np.float32)
    assert_close(kern.run(X, g, W), xn @ f32(W), dtype)


# -- attention ------------------------------------------------------------------------------------

def attention_ref(Q, K, V, causal):
    Q, K, V = f32(Q), f32(K), f32(V)
    S = np.einsum("hid,hjd->hij", Q, K) / math.sqrt(Q.shape[-1])
    if causal:
        S = np.where(np.tril(np.ones(S.shape[1:], bool)), S, -np.inf)
    P = np.exp(S - S.max(-1, keepdims=True))
    return np.einsum("hij,hje->hie", P / P.sum(-1, keepdims=True), V)


@pytest.mark.parametrize("shape", [(2, 128, 128, 64), (1, 100, 100, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention(shape, causal):
    H, Sq, Sk, D = shape
    Q, K, V = R((H, Sq, D)), R((H, Sk, D), seed=1), R((H, Sk, D), seed=2)
    check(kernels.attention, (Q, K, V), attention_ref(Q, K, V, causal), "bfloat16",
          causal=causal)
    k = kernels.attention.compile(Q, K, V, causal=causal, use_records=False)
    assert k.choice.source == "template flash"          # P never goes to HBM


@pytest.mark.parametrize("shape,causal", [((1, 128, 4096, 64), True), ((1, 128, 4096, 64), False),
                                          ((2, 256, 2600, 32), True), ((1, 128, 3072, 128), False)])
def test_attention_long_sequences_stay_fused(shape, causal):
    """Key rows longer than PSUM holds (Sk > 2048) stay in the flash template: the scores
    go through PSUM one bank of keys at a time (the causal logits straight from the bank)
    into a row in SBUF; nothing but O is written to HBM."""
    H, Sq, Sk, D = shape
    Q, K, V = R((H, Sq, D)), R((H, Sk, D), seed=1), R((H, Sk, D), seed=2)
    k = kernels.attention.compile(Q, K, V, causal=causal, use_records=False)
    assert k.choice.source == "template flash"
    assert_close(k.run(Q, K, V), attention_ref(Q, K, V, causal), "bfloat16", what=f"attention {shape}")
    assert k.simulate().bytes_moved["hbm_write"] == Q.nbytes


def test_attention_cache_read_of_keys_read_by_the_scores():
    """K is read only by the scores S, computed inside O's query-tile loop: a cache_read of K
    at O's head loop loads each head's K^T once, before its query tiles (same values, K read
    from HBM once instead of once per query tile); refused while no stage at O reads K."""
    H, Sq, D = 2, 384, 32
    Q, K, V = R((H, Sq, D)), R((H, Sq, D), seed=1), R((H, Sq, D), seed=2)
    prog = kernels.attention.trace(Q, K, V, causal=True)

    def build(cache):
        s = prog.schedule()
        h, i, e = s.axes("O")
        (j,) = s.reduce_axes("O")
        io, ii = s.split(i, 128)
        jo, ji = s.split(j, 128)
        s.reorder(h, io, jo, ii, e, ji)
        s.partition(ii)
        s.vectorize(e)
        s.tensorize(ji, "matmul")
        if cache:
            with pytest.raises(tl.TensorlangError, match="does not read 'K'"):
                s.cache_read("K", "sbuf", h)
        for st in reversed([x.name for x in prog.stages if x.name != "O"]):
            s.compute_at(st, io)
        if cache:
            s.cache_read("K", "sbuf", h)
        (d,) = s.reduce_axes("S")
        s.tensorize(d, "matmul")
        return s.build()
    reads = []
    for cache in (False, True):
        k = build(cache)
        assert_close(k.run(Q, K, V), attention_ref(Q, K, V, True), "bfloat16", what=f"cache {cache}")
        reads.append(k.simulate().bytes_moved["hbm_read"])
    assert reads[0] - reads[1] == 2 * K.nbytes       # 3 query tiles per head read K once


# -- elementwise / reductions ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("mn", [(128, 256), (300, 200)])
def test_elementwise(dtype, mn):
    X, G = R(mn, dtype), R(mn, dtype, 1)
    x = f32(X)
    check(kernels.transpose, (X,), x.T, dtype)
    for axis in (0, 1):
        check(kernels.LIBRARY["sum"], (X,), x.sum(axis), dtype, axis=axis)
        check(kernels.LIBRARY["max"], (X,), x.max(axis), dtype, axis=axis)
        check(kernels.mean, (X,), x.mean(axis), dtype, axis=axis)
    check(kernels.gelu, (X,), gelu(x), dtype)
    check(kernels.silu, (X,), silu(x), dtype)
    check(kernels.swiglu, (X, G), silu(x) * f32(G), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("mn", [(1024, 512), (300, 700), (700, 130), (2048, 520)])
def test_transpose_wide_rows(dtype, mn):
    """The expert transpose puts up to 4 partition tiles of Y rows side by side: X is loaded
    as rows 4 x 128 long and transposed in 4 pieces each (lower: grouped_rows), tails too."""
    X = R(mn, dtype)
    k = kernels.transpose.compile(X, use_records=False)
    assert k.choice.source == "template expert"
    assert_close(k.run(X), f32(X).T, dtype, what=f"transpose{mn}")
    if mn[1] >= 512:
        assert "[1,512]" in k.asm() and "transpose.pe" in k.asm()   # 512-element X rows


@pytest.mark.parametrize("mn", [(8192, 256), (1030, 1000), (640, 520)])
def test_reduce_axis0_loads_rows(mn):
    """A reduction over axis 0 loads X as rows and transposes them on the tensor engine, also
    when the reduced axis is split so the tile has a size-1 dimension (8192 rows: that load
    was an element-by-element gather); means apply 1/M to the [P, wide] partial sums."""
    X = R(mn, "bfloat16", seed=1)
    for op in ("sum", "max", "mean"):
        k = kernels.LIBRARY[op].compile(X, use_records=False, axis=0)
        assert k.choice.source == "template expert" and "transpose.pe" in k.asm()
        assert_close(k.run(X), getattr(f32(X), op)(0), "bfloat16", what=f"{op}{mn}")


# -- choosing schedules -----------------------------------------------------------------------------

def test_every_kernel_runs_its_expert_template_at_the_default_shape():
    """The first template of every kernel builds at its CLI default shape (not a fallback)."""
    for name, kf in kernels.LIBRARY.items():
        specs, static = workload(name, dtype="bfloat16")
        prog = kf.trace(*specs, **static)
        kf.template_schedule(prog, "trn2", 0).build("trn2")


def test_unknown_shape_falls_back_and_never_fails(monkeypatch):
    """No records: the expert template; a template that cannot apply: the next one, then the
    default schedule; the result is right either way."""
    monkeypatch.setattr(_library, "_SHIPPED", [])
    monkeypatch.setenv("TENSORLANG_RECORDS", "/nonexistent/records.db")
    A, B = R((130, 70)), R((70, 90), seed=1)
    k = kernels.matmul.compile(A, B)
    assert k.choice.source.startswith("template")
    assert_close(k.run(A, B), f32(A) @ f32(B), "bfloat16")

    def broken(s, cfg):
        raise tl.TensorlangError("this template does not apply")
    kf = _library.KernelFn("mm_broken", kernels.matmul.algo, (("broken", broken, {}),))
    k = kf.compile(A, B)
    assert k.choice.source == "default"
    assert_close(k.run(A, B), f32(A) @ f32(B), "bfloat16")


def _record(prog, kf, cycles, trace, machine="trn2", kernel=None):
    from autotune.records import Record, workload_key
    return Record(kernel or kf.name, workload_key(prog), machine, "test", {}, trace, cycles,
                  1.0, 0.5)


def test_records_exact_then_nearest(monkeypatch):
    """An exact record is replayed; another shape's record is replayed when it is legal on
    this shape and not slower than the expert template there; a record whose trace does not
    replay is skipped."""
    monkeypatch.setenv("TENSORLANG_RECORDS", "/nonexistent/records.db")
    kf = kernels.matmul
    p1 = kf.trace(tl.spec((256, 128), "bfloat16"), tl.spec((128, 512), "bfloat16"))
    s = kf.template_schedule(p1, "trn2", 1)
    bad = [{"op": "split", "stage": "C", "args": ["nope", 2], "loops": [0]}]
    p2 = kf.trace(tl.spec((512, 128), "bfloat16"), tl.spec((128, 512), "bfloat16"))
    monkeypatch.setattr(_library, "_SHIPPED", [_record(p1, kf, 10, s.trace()),
                                               _record(p2, kf, 5, bad)])
    kf._cache.clear()
    A, B = R((256, 128)), R((128, 512), seed=1)
    k = kf.compile(A, B)
    assert k.choice.source == "record" and k.schedule.trace() == s.trace()
    A2 = R((384, 128))
    k2 = kf.compile(A2, B)           # nearest: p1's trace (p2's does not replay), unless the
    p3 = kf.trace(A2, B)             # expert template simulates faster at this shape
    near = tl.Schedule.replay(p3, s.trace(), "trn2").build("trn2").simulate().cycles
    expert = kf.template_schedule(p3, "trn2", 0).build("trn2").simulate().cycles
    assert k2.choice.source == ("nearest record" if near <= expert else "template expert")
    assert k2.simulate().cycles == min(near, expert)
    assert_close(k2.run(A2, B), f32(A2) @ f32(B), "bfloat16")
    # a nearest record faster than the template is kept
    monkeypatch.setattr(_library, "_SHIPPED", [_record(p1, kf, 10, kf.template_schedule(
        p1, "trn2", 0).trace())])
    kf._cache.clear()
    k3 = kf.compile(A2, B)
    assert k3.simulate().cycles <= expert
    kf._cache.clear()


def test_shipped_records_replay_to_their_cycles():
    recs = _library.shipped_records()
    for r in recs:
        name, static = _library.parse_record_name(r.kernel)
        kf = kernels.LIBRARY[name]
        from autotune.records import parse_workload
        _, args = parse_workload(r.workload)
        prog = kf.trace(*[tl.spec(s, d) for d, s in args], **static)
        s = tl.Schedule.replay(prog, r.trace, r.machine)
        rep = s.build(r.machine).simulate()
        assert rep.cycles == r.cycles, f"{r.kernel} {r.workload} on {r.machine}"


def test_shapes_table_covers_the_library():
    assert set(SHAPES) == set(kernels.LIBRARY)
    with pytest.raises(tl.TensorlangError, match="M,N,K"):
        workload("matmul", (1, 2))


# -- command line -----------------------------------------------------------------------------------

def test_cli_run_library_kernel(capsys):
    assert cli.main(["run", "matmul", "--shape", "128,256,128"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "template expert" in out and "default (untuned)" in out
    assert cli.main(["run", "softmax", "--shape", "128,256", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["check"]["matches_reference"] and d["report"]["cycles"] > 0


def test_cli_run_file_asm_trace(tmp_path, capsys):
    f = tmp_path / "k.py"
    f.write_text("import tensorlang as tl\n\n@tl.kernel\ndef double(X):\n"
                 "    M, N = X.shape\n    Y = tl.tensor((M, N), 'float32')\n"
                 "    for i, j in tl.grid(M, N):\n        Y[i, j] = X[i, j] * 2.0\n    return Y\n\n"
                 "SPECS = [tl.spec((128, 64), 'float32')]\n")
    assert cli.main(["run", str(f)]) == 0
    assert "double" in capsys.readouterr().out
    assert cli.main(["asm", "rmsnorm", "--shape", "128,128"]) == 0
    assert "program rmsnorm" in capsys.readouterr().out
    out = tmp_path / "t.json"
    assert cli.main(["trace", "transpose", str(out), "--shape", "128,128"]) == 0
    assert json.loads(out.read_text())["traceEvents"]


def test_cli_errors_are_one_line(capsys):
    assert cli.main(["run", "no_such_kernel"]) == 2
    err = capsys.readouterr().err
    assert "neither a library kernel" in err and "Traceback" not in err
    assert cli.main(["run", "matmul", "--shape", "4x4"]) == 2
    assert "comma-separated" in capsys.readouterr().err


# -- instruction selection (lowering) -------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_softmax_template_is_one_exp_pass_per_tile_and_exact(dtype):
    """exp(x - max) becomes one activation (bias = -max) that also sums the row; the output
    pass reuses its tile (value numbering) and writes the store dtype directly."""
    specs, static = workload("softmax", (256, 512), dtype)
    prog = kernels.softmax.trace(*specs)
    kern = kernels.softmax.template_schedule(prog, "trn2", 0).build("trn2")
    # executed instructions (the row-tile loop may be peeled into straight-line tiles)
    ops = [i.op for i, loops in walk_instrs(kern.program.body)
           for _ in range(math.prod(lp.extent for lp in loops))]
    assert ops.count("activation") == 256 // 128      # one per row tile
    assert "reduce_op=add" in kern.asm() and "bias=ap" in kern.asm()
    assert "tensor_copy" not in ops
    X = random_array((256, 512), dtype, seed=3)
    assert_close(kern.run(X), prog.reference(X), dtype)


def test_norm_statistics_fuse_and_gamma_is_loaded_once():
    """rmsnorm: the sum of squares is the square activation's fused reduce; gamma[j] is loaded
    once before the row-tile loop and broadcast on chip (tensor engine), not per tile."""
    specs, static = workload("rmsnorm", (512, 1024), "bfloat16")
    prog = kernels.rmsnorm.trace(*specs)
    kern = kernels.rmsnorm.template_schedule(prog, "trn2", 0).build("trn2")
    asm = kern.asm()
    assert "func=square reduce_op=add" in asm
    top = [ln for ln in asm.splitlines() if not ln.startswith(" ") and "gamma" in ln
           and ln.startswith(("dma", "matmul"))]
    assert top, "gamma is not loaded before the loop"
    assert not any("gamma" in ln and ln.lstrip().startswith("dma") for ln in asm.splitlines()
                   if ln.startswith("  "))
    X, g = random_array((512, 1024), "bfloat16", seed=1), random_array((1024,), "bfloat16", seed=2)
    assert_close(kern.run(X, g), prog.reference(X, g), "bfloat16")


@pytest.mark.parametrize("machine", ["trn2", "trn1"])
def test_pipelined_row_loop_peels_its_first_and_last_tiles_over_every_queue(machine):
    """A pipelined row-tile loop (layernorm, 8 tiles, 3 slots): its first PEEL_FIRST (2)
    iterations are peeled and their loads hoisted ahead of their compute, so every load of
    them precedes the first store and uses every DMA queue (the fill at full bandwidth); the last
    iteration is peeled too, its stores after every load, over every queue (the drain).
    gamma and beta are broadcast once, before the peeled tiles. Values equal numpy."""
    from tensorlang.lower import PEEL_FIRST
    M, N = 1024, 768
    specs, static = workload("layernorm", (M, N))
    prog = kernels.layernorm.trace(*specs)
    kern = kernels.layernorm.template_schedule(prog, machine, 0).build(machine)
    body = kern.program.body
    top = [i for i in body if not isinstance(i, sim.isa.Loop)]
    loop = [i for i in body if isinstance(i, sim.isa.Loop)]
    assert len(loop) == 1 and loop[0].extent == M // 128 - PEEL_FIRST - 1
    queues = {f"q{k}" for k in range(sim.machine(machine).dma_queues)}
    first_store = next(k for k, i in enumerate(top) if i.op == "dma" and i.dst.mem == "hbm")
    x_first = [i for i in top[:first_store] if i.op == "dma" and i.srcs[0].name == "X"]
    y_last = [i for i in body[body.index(loop[0]) + 1:] if i.op == "dma" and i.dst.name == "Y"]
    assert sum(i.dst.num_elements for i in x_first) == PEEL_FIRST * 128 * N
    assert {i.engine for i in x_first} == queues
    assert sum(i.dst.num_elements for i in y_last) == 128 * N
    assert {i.engine for i in y_last} == queues
    bc = [k for k, i in enumerate(top) if i.op == "matmul"]            # gamma / beta broadcast
    assert bc and max(bc) < top.index(x_first[0])

    def work(nodes):    # the last tile's engines and splits are the loop's (Lowerer.mirror)
        return [(i.op, i.engine, i.dst.shape) for i in nodes if i.op != "dma"]
    assert work(body[body.index(loop[0]) + 1:]) == work(loop[0].body)
    assert not [i for i, _ in walk_instrs(body)
                if i.op == "dma" and i.srcs[0].name in ("gamma", "beta") and i.dst.partitions > 1]
    X, g, b = R((M, N), seed=1), R((N,), seed=2), R((N,), seed=3)
    x = f32(X)
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    assert_close(kern.run(X, g, b), (x - mu) / np.sqrt(var + 1e-5) * f32(g) + f32(b), "bfloat16")


def test_short_pipelined_loop_is_peeled_whole_with_every_load_first():
    """rmsnorm with 4 row tiles: the loop is peeled whole (first tiles, middle, last); every
    load of X is hoisted ahead of the first store, so the loads and the stores each use
    every DMA queue. Values equal numpy."""
    M, N = 512, 1024
    specs, static = workload("rmsnorm", (M, N))
    prog = kernels.rmsnorm.trace(*specs)
    kern = kernels.rmsnorm.template_schedule(prog, "trn2", 0).build("trn2")
    body = kern.program.body
    assert not any(isinstance(i, sim.isa.Loop) for i in body)
    dmas = [i for i in body if i.op == "dma"]
    x = [k for k, i in enumerate(dmas) if i.srcs[0].name == "X"]
    y = [k for k, i in enumerate(dmas) if i.dst.name == "Y"]
    assert max(x) < min(y)
    assert sum(dmas[k].dst.num_elements for k in x) == M * N
    queues = {f"q{k}" for k in range(sim.machine("trn2").dma_queues)}
    assert {dmas[k].engine for k in x} == queues == {dmas[k].engine for k in y}
    X, g = R((M, N), seed=1), R((N,), seed=2)
    assert_close(kern.run(X, g), rms(f32(X), f32(g)), "bfloat16")


def test_store_nest_staging_tiles_are_double_buffered():
    """matmul (BERT QKV): the row blocks of a PSUM accumulator are copied out and stored in a
    loop; the staging tile rotates over STORE_SLOTS slots (or has a slot per row tile), so the
    next block's copy-out does not wait for this block's store to read the tile. Values equal
    numpy."""
    from tensorlang.lower import STORE_SLOTS
    M, N, K = 512, 768, 768
    specs, static = workload("matmul", (M, N, K))
    prog = kernels.matmul.trace(*specs)
    kern = kernels.matmul.template_schedule(prog, "trn2", 0).build("trn2")
    outs = [i for i, loops in walk_instrs(kern.program.body)
            if loops and i.op == "tensor_copy" and i.dst.name.startswith("C_out")]
    # rotating over >= STORE_SLOTS slots (the template pipelines its row tiles: pi of them)
    assert outs and all(any(m >= STORE_SLOTS or (m == 0 and c) for _, c, m in i.dst.offset.terms)
                        for i in outs)
    A, B = R((M, K), seed=1), R((K, N), seed=2)
    assert_close(kern.run(A, B), f32(A) @ f32(B), "bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_layernorm_prefills_beta_and_accumulates_gamma_in_one_pass(dtype):
    """layernorm's output tile is filled with beta first (a copy that needs no statistic),
    then (x - mean) * rstd * gamma accumulates into it in one tensor_tensor (acc=add): no
    separate +beta pass; rsqrt(ssq / N + eps) is one activation (scale 1/N, bias eps); the
    wide normalise splits on destination granules. Values equal numpy, also for rows far
    from zero mean."""
    M, N = 1024, 1024     # 8 row tiles: a loop between the peeled first and last ones
    specs, static = workload("layernorm", (M, N), dtype)
    prog = kernels.layernorm.trace(*specs)
    kern = kernels.layernorm.template_schedule(prog, "trn2", 0).build("trn2")
    body = [ln.strip() for ln in kern.asm().splitlines() if ln.startswith("  ")]
    tt = [ln for ln in body if ln.startswith("tensor_tensor")]
    assert len(tt) == 1 and "acc=add op=mul" in tt[0] and "gamma_bc" in tt[0], tt
    fill = [ln for ln in body if ln.startswith("tensor_copy") and "beta_bc" in ln]
    assert len(fill) == 1 and tt[0].split()[1].split("[")[0] in fill[0], fill
    rs = [ln for ln in body if "func=rsqrt" in ln]
    assert len(rs) == 1 and f"scale={1.0 / N!r}" in rs[0] and "bias=1e-05" in rs[0], rs
    widths = [i.dst.free_size for i, loops in walk_instrs(kern.program.body)
              if loops and i.op == "tensor_scalar" and i.attr("op1") == "mul"]
    assert sum(widths) == N and all(w % 128 == 0 for w in widths), widths
    X = (random_array((M, N), dtype, seed=1).astype(np.float32) * 3 + 5).astype(np_dtype(dtype))
    g, b = random_array((N,), dtype, seed=2), random_array((N,), dtype, seed=3)
    x = f32(X)
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    assert_close(kern.run(X, g, b), (x - mu) / np.sqrt(var + 1e-5) * f32(g) + f32(b), dtype)


@tl.kernel
def _scale_shift(X, g, b):
    M, N = X.shape
    Y = tl.tensor((M, N), X.dtype, name="Y")
    for i, j in tl.grid(M, N):
        Y[i, j] = X[i, j] * g[j] + b[j]
    return Y


@pytest.mark.parametrize("bdt", ["bfloat16", "float32"])
def test_store_of_t_times_vector_plus_vector_is_a_prefill_and_one_accumulating_pass(bdt):
    """Y = X * g[j] + b[j] under any schedule: b prefills the output tile and X * g
    accumulates into it (acc=add) -- only when b's values are exact in the store dtype
    (a float32 b into a bfloat16 Y stays a multiply and an add). Equal to the reference."""
    prog = _scale_shift.trace(tl.spec((256, 384), "bfloat16"), tl.spec((384,), "bfloat16"),
                              tl.spec((384,), bdt))
    X, g = random_array((256, 384), "bfloat16", seed=1), random_array((384,), "bfloat16", seed=2)
    b = random_array((384,), bdt, seed=3)
    for s in (prog.schedule(), kernels.layernorm.templates_for(prog)[0][1]):
        if callable(s):
            sch = prog.schedule()
            s(sch, dict(kernels.norm.DEFAULT))
            s = sch
        kern = s.build("trn2")
        assert ("acc=add" in kern.asm()) == (bdt == "bfloat16")
        assert_close(kern.run(X, g, b), prog.reference(X, g, b), "bfloat16")


def test_wide_elementwise_ops_are_split_over_engines_when_they_would_bound_the_kernel():
    specs, static = workload("swiglu", (128, 11008), "bfloat16")
    prog = kernels.swiglu.trace(*specs)
    kern = kernels.swiglu.template_schedule(prog, "trn2", 0).build("trn2")
    engines = {ln.split()[0] for ln in kern.asm().splitlines() if "tensor_tensor" in ln}
    assert len(engines) >= 2, engines
    X, G = (random_array((128, 11008), "bfloat16", seed=s) for s in (1, 2))
    assert_close(kern.run(X, G), prog.reference(X, G), "bfloat16")


# -- conv and attention expert templates (no records) ----------------------------------------------

TEMPLATE_CONVS = [((1, 16, 8, 8), (32, 16, 3, 3), 1, 1, 1), ((2, 8, 9, 9), (16, 8, 3, 3), 2, 0, 1),
                  ((1, 8, 10, 10), (8, 8, 3, 3), 1, 2, 2), ((1, 200, 30, 30), (136, 200, 3, 3), 1, 1, 1),
                  ((1, 130, 12, 12), (64, 130, 5, 5), 2, 2, 1), ((1, 64, 28, 28), (64, 64, 1, 1), 1, 0, 1),
                  ((3, 160, 10, 10), (144, 160, 3, 3), 1, 1, 1),   # weights once for all images
                  ((2, 32, 40, 36), (48, 32, 3, 3), 1, 1, 1),      # one channel step: plane per image
                  ((2, 24, 21, 19), (40, 24, 3, 3), 2, 1, 1), ((1, 40, 17, 23), (24, 40, 3, 3), 1, 3, 2),
                  ((1, 3, 30, 26), (20, 3, 7, 7), 2, 3, 1),        # stem-like: (c, kh) folded
                  ((2, 4, 12, 11), (8, 4, 5, 5), 1, 2, 2)]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation", TEMPLATE_CONVS)
def test_conv2d_expert_template(xs, ws, stride, padding, dilation):
    X, Wt = R(xs), R(ws, seed=1)
    st = dict(stride=stride, padding=padding, dilation=dilation)
    k = kernels.conv2d.compile(X, Wt, use_records=False, **st)
    assert k.choice.source == "template expert"
    assert_close(k.run(X, Wt), conv_ref(X, Wt, **st), "bfloat16", what=f"conv2d {xs} {ws} {st}")


@pytest.mark.parametrize("xs,ws,padding", [((2, 16, 9, 7), (24, 16, 3, 3), 1),
                                           ((1, 136, 6, 6), (40, 136, 3, 3), 2)])
def test_conv2d_expert_template_float32(xs, ws, padding):
    X, Wt = R(xs, "float32"), R(ws, "float32", seed=1)
    k = kernels.conv2d.compile(X, Wt, padding=padding, use_records=False)
    assert k.choice.source == "template expert"
    assert_close(k.run(X, Wt), conv_ref(X, Wt, 1, padding, 1), "float32")


@pytest.mark.parametrize("xs,ws", [((1, 64, 14, 14), (64, 64, 3, 3)),
                                   ((2, 256, 14, 14), (256, 256, 3, 3))])
def test_conv2d_template_keeps_weights_and_padded_input_on_chip(xs, ws):
    """Weights load as whole rows [o, c*kh*kw] and transpose per tap on the tensor engine,
    once for all images; the padded input is a box filled on chip (a border of memsets, the
    interior from X) once per channel step, shared by the taps: no padded copy in HBM."""
    X, Wt = R(xs), R(ws, seed=1)
    k = kernels.conv2d.compile(X, Wt, padding=1, use_records=False)
    asm = k.asm()
    assert "Wt_rows" in asm and "transpose.pe" in asm
    assert "X_pad_box" in asm and "tensor X_pad" not in asm and "hbm:X_pad" not in asm
    assert sum(ln.strip().startswith("matmul.pe") for ln in asm.splitlines()) == 1   # in the tap loops
    rep = k.simulate()
    assert rep.bytes_moved["hbm_write"] == xs[0] * ws[0] * xs[2] * xs[3] * 4        # Y only
    assert rep.bytes_moved["hbm_read"] <= 2 * X.nbytes + Wt.nbytes                  # weights once
    assert_close(k.run(X, Wt), conv_ref(X, Wt, 1, 1, 1), "bfloat16")


@tl.kernel
def _conv_padded_stage(X, Wt):
    """A 3x3 convolution (padding 1) whose zero-padded input is a stage of its own."""
    N, C, H, W = X.shape
    O = Wt.shape[0]
    Xp = tl.tensor((N, C, H + 2, W + 2), X.dtype, name="Xp")
    Xz = X.pad(0.0)
    for n, c, h, w in tl.grid(N, C, H + 2, W + 2):
        Xp[n, c, h, w] = Xz[n, c, h - 1, w - 1]
    Y = tl.tensor((N, O, H, W), "float32", name="Y")
    for n, o, h, w in tl.grid(N, O, H, W):
        Y[n, o, h, w] = 0.0
        for kh, kw, c in tl.reduce(3, 3, C):
            Y[n, o, h, w] += Wt[o, c, kh, kw] * Xp[n, c, h + kh, w + kw]
    return Y


@pytest.mark.parametrize("which", [0, 1])
def test_conv2d_few_channels_fold_taps_into_the_contraction(which):
    """C = 3, 7x7 (the ResNet stem): the (c, kh) taps are folded onto the partitions, so each
    matmul contracts over C * KH = 21 rows, one per kw tap (expert and simple templates)."""
    X, Wt = R((2, 3, 20, 18)), R((24, 3, 7, 7), seed=1)
    prog = kernels.conv2d.trace(X, Wt, stride=2, padding=3)
    assert {"Xk", "Wk"} <= set(prog.tensors)
    k = kernels.conv2d.template_schedule(prog, which=which).build()
    mms = [ln for ln in k.asm().splitlines() if ln.strip().startswith("matmul.pe")]
    assert mms and all("[1,21]" in ln for ln in mms)
    assert_close(k.run(X, Wt), conv_ref(X, Wt, 2, 3, 1), "bfloat16")


def test_compute_at_of_a_stage_reading_a_padded_tensor():
    """A producer computed inside its consumer that reads a padded input: the padded copy is
    filled before the consumer runs."""
    X, Wt = R((1, 16, 6, 6), "float32"), R((16, 16, 3, 3), "float32", seed=1)
    prog = _conv_padded_stage.trace(X, Wt)
    s = prog.schedule()
    n, o, h, w = s.axes("Y")
    kh, kw, c = s.reduce_axes("Y")
    s.reorder(n, o, c, kh, kw, h, w)
    s.partition(o)
    s.vectorize(h)
    s.vectorize(w)
    s.tensorize(c, "matmul")
    s.compute_at("Xp", kh)
    assert_close(s.build().run(X, Wt), conv_ref(X, Wt, 1, 1, 1), "float32")


def test_attention_causal_mask_of_static_query_tiles_computed_once():
    """A head's query tiles filled together (static offsets): each tile's causal-mask iota is
    computed once, before the head loop (Lowerer.hoisted_iota), not once per head; O's
    accumulators and stores rotate over the fill's tiles (two heads, values as numpy)."""
    Q, K, V = R((3, 512, 64)), R((3, 512, 64), seed=1), R((3, 512, 64), seed=2)
    k = kernels.attention.compile(Q, K, V, causal=True, use_records=False)
    assert k.choice.source == "template flash"
    assert_close(k.run(Q, K, V), attention_ref(Q, K, V, True), "bfloat16", what="attention causal")
    top = [ln for ln in k.asm().splitlines() if ln.startswith("iota")]
    assert len(top) == 4 and all("iota_job" in ln for ln in top)
    assert not [ln for ln in k.asm().splitlines() if ln.lstrip().startswith("iota") and ln[0] == " "]


@pytest.mark.parametrize("shape,causal", [((2, 256, 512, 64), True), ((1, 200, 200, 32), True),
                                          ((2, 128, 384, 128), False), ((1, 128, 1024, 64), False),
                                          ((2, 260, 256, 32), False)])
def test_attention_flash_template_keeps_everything_on_chip(shape, causal):
    """Scores, logits, row statistics and P are computed inside O's query-tile loop in the
    query rows' layout (P transposed per key block for O = P V): only Q, K, V and O touch HBM."""
    H, Sq, Sk, D = shape
    Q, K, V = R((H, Sq, D)), R((H, Sk, D), seed=1), R((H, Sk, D), seed=2)
    k = kernels.attention.compile(Q, K, V, causal=causal, use_records=False)
    assert k.choice.source == "template flash"
    assert_close(k.run(Q, K, V), attention_ref(Q, K, V, causal), "bfloat16", what=f"attention {shape}")
    assert not [ln for ln in k.asm().splitlines() if ln.startswith("tensor") and "scratch" in ln]
    rep = k.simulate()
    assert rep.bytes_moved["hbm_write"] == Q.nbytes        # O only
