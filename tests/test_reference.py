"""The numpy reference interpreter against plain numpy, on the example kernels."""
import importlib.util
import pathlib

import numpy as np
import pytest

import tensorlang as tl
from tensorlang.dtypes import assert_close, np_dtype, random_array, tolerance
from tensorlang.ir import TensorlangError

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"tl_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


matmul = load_example("matmul").matmul
bmm = load_example("bmm").bmm
conv2d = load_example("conv2d").conv2d
softmax = load_example("softmax").softmax
layernorm = load_example("layernorm").layernorm
rmsnorm = load_example("rmsnorm").rmsnorm
attention = load_example("attention").attention
gelu_linear = load_example("mlp").gelu_linear


def f64(x):
    return np.asarray(x).astype(np.float64)


def check(out, expected, dtype):
    """out (in dtype) vs a float64 result rounded once to dtype."""
    expected = np.asarray(expected).astype(np_dtype(dtype))
    assert out.dtype == np_dtype(dtype)
    assert_close(out, expected, dtype)


# ---------------------------------------------------------------------------------------
# plain numpy implementations (float64 on the same rounded inputs)


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_conv2d(x, w, stride, padding):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, :, a:a + stride * (oh - 1) + 1:stride, b:b + stride * (ow - 1) + 1:stride]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, a, b])
    return y


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_layernorm(x, g, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def np_rmsnorm(x, g, eps=1e-6):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * g


def np_attention(q, k, v, causal):
    s = np.einsum("hid,hjd->hij", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    return np.einsum("hij,hje->hie", np_softmax(s), v)


# ---------------------------------------------------------------------------------------
# examples vs numpy


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float8_e4m3", "float8_e5m2"])
@pytest.mark.parametrize("m,k,n", [(96, 200, 64), (7, 13, 5), (1, 1, 1), (128, 128, 130)])
def test_matmul(m, k, n, dtype):
    A = random_array((m, k), dtype, seed=0)
    B = random_array((k, n), dtype, seed=1)
    C = matmul.trace(A, B).reference(A, B)
    check(C, f64(A) @ f64(B), "float32")  # fp32 accumulation and output: exact up to fp32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_output_dtype(dtype):
    A = random_array((33, 65), "bfloat16", seed=0)
    B = random_array((65, 17), "bfloat16", seed=1)
    C = matmul.trace(A, B, out_dtype=dtype).reference(A, B)
    check(C, f64(A) @ f64(B), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(3, 96, 40, 200), (1, 5, 7, 3)])
def test_bmm(shape, dtype):
    nb, m, k, n = shape
    A = random_array((nb, m, k), dtype, seed=0)
    B = random_array((nb, k, n), dtype, seed=1)
    check(bmm.trace(A, B).reference(A, B), np.matmul(f64(A), f64(B)), "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("x_shape,w_shape,stride,padding", [
    ((2, 3, 17, 19), (5, 3, 3, 3), 1, 1),
    ((1, 8, 20, 20), (4, 8, 3, 3), 2, 1),
    ((1, 4, 9, 9), (6, 4, 1, 1), 1, 0),
    ((2, 2, 11, 7), (3, 2, 5, 3), 2, 2),
])
def test_conv2d(x_shape, w_shape, stride, padding, dtype):
    X = random_array(x_shape, dtype, seed=0)
    W = random_array(w_shape, dtype, seed=1)
    Y = conv2d.trace(X, W, stride=stride, padding=padding).reference(X, W)
    check(Y, np_conv2d(f64(X), f64(W), stride, padding), "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(96, 200), (1, 1), (3, 4096), (128, 33)])
def test_softmax(shape, dtype):
    X = random_array(shape, dtype, seed=0, scale=3.0)
    check(softmax.trace(X).reference(X), np_softmax(f64(X)), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(96, 200), (4, 1024), (5, 3)])
def test_layernorm(shape, dtype):
    X = random_array(shape, dtype, seed=0)
    g = random_array(shape[1:], dtype, seed=1)
    b = random_array(shape[1:], dtype, seed=2)
    Y = layernorm.trace(X, g, b).reference(X, g, b)
    check(Y, np_layernorm(f64(X), f64(g), f64(b)), dtype)


def test_layernorm_eps():
    X = random_array((4, 8), seed=0, scale=1e-3)
    g, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    Y = layernorm.trace(X, g, b, eps=1e-2).reference(X, g, b)
    check(Y, np_layernorm(f64(X), 1.0, 0.0, eps=1e-2), "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(96, 200), (2, 4096)])
def test_rmsnorm(shape, dtype):
    X = random_array(shape, dtype, seed=0)
    g = random_array(shape[1:], dtype, seed=1)
    check(rmsnorm.trace(X, g).reference(X, g), np_rmsnorm(f64(X), f64(g)), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h,s,d", [(2, 96, 40), (1, 7, 3), (3, 33, 64)])
def test_attention(h, s, d, causal, dtype):
    Q, K, V = (random_array((h, s, d), dtype, seed=n) for n in range(3))
    O = attention.trace(Q, K, V, causal=causal).reference(Q, K, V)
    check(O, np_attention(f64(Q), f64(K), f64(V), causal), dtype)


def test_attention_cross_lengths():
    Q = random_array((2, 5, 8), seed=0)
    K, V = random_array((2, 9, 8), seed=1), random_array((2, 9, 4), seed=2)
    O = attention.trace(Q, K, V).reference(Q, K, V)
    check(O, np_attention(f64(Q), f64(K), f64(V), False), "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,k,n", [(96, 200, 64), (3, 5, 7)])
def test_gelu_linear(m, k, n, dtype):
    X = random_array((m, k), dtype, seed=0)
    W = random_array((k, n), dtype, seed=1, scale=0.1)
    b = random_array((n,), dtype, seed=2)
    Y = gelu_linear.trace(X, W, b).reference(X, W, b)
    check(Y, np_gelu(f64(X) @ f64(W) + f64(b)), "float32")


def test_big_matmul_runs():
    A = random_array((1024, 1024), seed=0)
    B = random_array((1024, 1024), seed=1)
    C = matmul.trace(A, B).reference(A, B)
    assert_close(C[:64], f64(A[:64]) @ f64(B), "float32")


def test_wide_softmax():
    X = random_array((512, 4096), "bfloat16", seed=0)
    Y = softmax.trace(X).reference(X)
    assert Y.shape == (512, 4096)
    check(Y[:8], np_softmax(f64(X[:8])), "bfloat16")


def test_chunked_evaluation_matches(monkeypatch):
    """Forcing tiny chunks (every stage split into boxes) gives the same results."""
    import tensorlang.reference as ref
    X = random_array((6, 50), seed=0)
    g, b = random_array((50,), seed=1), random_array((50,), seed=2)
    Q, K, V = (random_array((2, 9, 5), seed=n) for n in range(3))
    A, B = random_array((20, 30), seed=3), random_array((30, 10), seed=4)
    progs = [(layernorm.trace(X, g, b), (X, g, b)), (attention.trace(Q, K, V, causal=True), (Q, K, V)),
             (matmul.trace(A, B), (A, B))]
    full = [p.reference(*a) for p, a in progs]
    monkeypatch.setattr(ref, "BUDGET", 16)
    monkeypatch.setattr(ref, "CONTRACT_BUDGET", 16)
    for (p, a), want in zip(progs, full):
        np.testing.assert_allclose(p.reference(*a), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# semantics of small programs


def test_reduction_identity_and_ops():
    @tl.kernel
    def reds(X):
        M, N = X.shape
        mx = tl.tensor((M,), name="mx")
        mn = tl.tensor((M,), name="mn")
        pr = tl.tensor((M,), name="pr")
        sm = tl.tensor((M,), name="sm")
        for i in tl.grid(M):
            for j in tl.reduce(N):
                mx[i] = tl.max(mx[i], X[i, j])   # no init: starts at -inf
                mn[i] = tl.min(X[i, j], mn[i])
                pr[i] *= X[i, j]
                sm[i] -= X[i, j]
        return mx, mn, pr, sm

    X = -np.abs(random_array((5, 6), seed=0)) - 0.5  # all negative: a 0 init would be wrong
    mx, mn, pr, sm = reds.trace(X).reference(X)
    np.testing.assert_allclose(mx, X.max(1), rtol=1e-6)
    np.testing.assert_allclose(mn, X.min(1), rtol=1e-6)
    np.testing.assert_allclose(pr, X.prod(1), rtol=1e-5)
    np.testing.assert_allclose(sm, -X.sum(1), rtol=1e-5)


def test_store_rounds_to_dtype_and_cast():
    @tl.kernel
    def k(X):
        Y = tl.tensor(X.shape, "bfloat16")
        Z = tl.tensor(X.shape, "float32")
        for i in tl.grid(X.shape[0]):
            Y[i] = X[i] * 3.0
            Z[i] = tl.cast(X[i] * 3.0, "float8_e4m3")
        return Y, Z

    X = random_array((100,), seed=0)
    Y, Z = k.trace(X).reference(X)
    assert Y.dtype == np_dtype("bfloat16") and Z.dtype == np.float32
    np.testing.assert_array_equal(Y, (X * np.float32(3)).astype(np_dtype("bfloat16")))
    np.testing.assert_array_equal(Z, (X * np.float32(3)).astype(np_dtype("fp8")).astype(np.float32))


def test_pad_and_index_values():
    @tl.kernel
    def shift(X):
        N = X.shape[0]
        Y = tl.tensor((N + 4,), "float32")
        Z = tl.tensor((N,), "float32")
        for i in tl.grid(N + 4):
            Y[i] = X.pad(-1.0)[i - 2] + tl.pad(X, 100.0)[i + 1] * 0.0
        for i in tl.grid(N):
            Z[i] = tl.where(i >= 3, i * 0.5, -i)
        return Y, Z

    X = np.arange(6, dtype=np.float32)
    Y, Z = shift.trace(X).reference(X)
    np.testing.assert_array_equal(Y, [-1, -1, 0, 1, 2, 3, 4, 5, -1, -1])
    np.testing.assert_array_equal(Z, [0, -1, -2, 1.5, 2, 2.5])


def test_elementwise_functions():
    @tl.kernel
    def ew(X):
        N = X.shape[0]
        outs = [tl.tensor((N,), "float32") for _ in range(14)]
        fns = [tl.exp, tl.sqrt, tl.rsqrt, tl.tanh, tl.sigmoid, tl.gelu, tl.relu, tl.abs, tl.silu,
               tl.square, tl.reciprocal, tl.log]
        for i in tl.grid(N):
            for o, f in zip(outs, fns):
                o[i] = f(X[i])
            outs[12][i] = X[i] ** 2 - 1 / X[i] + abs(-X[i])
            outs[13][i] = (X[i] > 1.0) + (X[i] == X[i]) * 2 + (X[i] != 2.0) * 4
        return tuple(outs)

    X = np.abs(random_array((50,), seed=0)) + 0.1
    got = ew.trace(X).reference(X)
    x = f64(X)
    sig = 1 / (1 + np.exp(-x))
    want = [np.exp(x), np.sqrt(x), 1 / np.sqrt(x), np.tanh(x), sig, np_gelu(x), x, x, x * sig,
            x * x, 1 / x, np.log(x), x ** 2 - 1 / x + x, (x > 1) + 2 + 4]
    for n, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-6, err_msg=f"function #{n}")


def test_temps_and_outputs_start_at_zero():
    @tl.kernel
    def part(X):
        Y = tl.tensor((8,), "float32")
        for i in tl.grid(4):
            Y[2 * i + 1] = X[i]
        return Y

    X = np.arange(1, 5, dtype=np.float32)
    np.testing.assert_array_equal(part.trace(X).reference(X), [0, 1, 0, 2, 0, 3, 0, 4])


def test_kernel_call_runs_reference():
    A, B = random_array((4, 5), seed=0), random_array((5, 3), seed=1)
    np.testing.assert_allclose(matmul(A, B), A @ B, rtol=1e-5)
    np.testing.assert_allclose(matmul(A, B), A @ B, rtol=1e-5)  # cached trace


# ---------------------------------------------------------------------------------------
# input validation


@pytest.fixture(scope="module")
def mm_prog():
    return matmul.trace(tl.spec((4, 5), "bfloat16"), tl.spec((5, 3), "bfloat16"))


def test_reference_wrong_count(mm_prog):
    A = random_array((4, 5), "bfloat16")
    with pytest.raises(TensorlangError, match=r"matmul takes 2 input arrays \(A, B\), got 1"):
        mm_prog.reference(A)


def test_reference_wrong_shape(mm_prog):
    A, B = random_array((4, 5), "bfloat16"), random_array((5, 4), "bfloat16")
    with pytest.raises(TensorlangError, match=r"input B .* shape \(5, 4\); .* traced for shape \(5, 3\)"):
        mm_prog.reference(A, B)


def test_reference_wrong_dtype(mm_prog):
    A, B = random_array((4, 5), "bfloat16"), random_array((5, 3), "float32")
    with pytest.raises(TensorlangError, match=r"input B .* dtype float32; .* traced for bfloat16"):
        mm_prog.reference(A, B)
    with pytest.raises(TensorlangError, match=r"input A .* must be a numpy array"):
        mm_prog.reference([[1.0] * 5] * 4, B)


def test_reference_float64_accepted_for_float32():
    A, B = np.ones((2, 3)), np.ones((3, 2))
    prog = matmul.trace(tl.spec((2, 3)), tl.spec((3, 2)))
    np.testing.assert_array_equal(prog.reference(A, B), np.full((2, 2), 3.0, np.float32))
    with pytest.raises(TensorlangError, match="dtype float16"):
        prog.reference(A.astype(np.float16), B)


def test_tolerance_helpers():
    assert tolerance("float32") == (1e-4, 1e-4)
    assert tolerance("float32", "bf16") == tolerance("bfloat16")
    assert tolerance("fp8")[0] >= 0.1
    with pytest.raises(AssertionError, match="1 of 3 elements differ"):
        assert_close(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.1]), "bfloat16")


def test_scalar_domains():
    @tl.kernel
    def scalars(X):
        N = X.shape[0]
        total = tl.tensor((2,), "float32")
        first = tl.tensor((1,), "float32")
        first[0] = X[0] + X[N - 1]
        total[1] = 0.5
        for k in tl.reduce(N):
            total[1] += X[k]
        return total, first

    X = np.arange(5, dtype=np.float32)
    total, first = scalars.trace(X).reference(X)
    np.testing.assert_array_equal(total, [0.0, 10.5])
    np.testing.assert_array_equal(first, [4.0])


def test_transposed_and_strided_access():
    @tl.kernel
    def tr(X):
        M, N = X.shape
        Y = tl.tensor((N, M))
        Z = tl.tensor((M // 2, N))
        for i, j in tl.grid(M, N):
            Y[j, i] = X[i, j]
        for i, j in tl.grid(M // 2, N):
            Z[i, j] = X[2 * i + 1, N - 1 - j] + Y[j, 2 * i]
        return Y, Z

    X = random_array((6, 5), seed=0)
    Y, Z = tr.trace(X).reference(X)
    np.testing.assert_array_equal(Y, X.T)
    np.testing.assert_array_equal(Z, X[1::2, ::-1] + X[0::2, :])
