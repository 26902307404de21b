"""The tracing front-end: program structure, naming, and every trace-time error."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorlang as tl
from tensorlang import ir
from tensorlang.ir import Affine, Binary, Const, IndexValue, Load, TensorlangError, Unary

from dsl_kernels import matmul  # tests/ is on sys.path under pytest

F32 = tl.spec((8, 8))


@tl.kernel
def softmax(X):
    M, N = X.shape
    mx = tl.tensor((M,))
    total = tl.tensor((M,))
    Y = tl.tensor((M, N), X.dtype)
    for i in tl.grid(M):
        for j in tl.reduce(N):
            mx[i] = tl.max(mx[i], X[i, j])
        total[i] = 0.0
        for j in tl.reduce(N):
            total[i] += tl.exp(X[i, j] - mx[i])
        for j in tl.grid(N):
            Y[i, j] = tl.exp(X[i, j] - mx[i]) / total[i]
    return Y


def trace_error(kernel, specs, pattern, line, **static):
    """kernel.trace(*specs) fails with `pattern`, and the message quotes DSL source `line`."""
    with pytest.raises(TensorlangError, match=pattern) as info:
        kernel.trace(*specs, **static)
    msg = str(info.value)
    assert line in msg, f"source line {line!r} not in message:\n{msg}"
    assert info.value.loc is not None and info.value.loc.file.endswith(".py")
    assert info.value.loc.text == line or line in info.value.loc.text
    return msg


# ---------------------------------------------------------------------------------------
# structure of traced programs


def test_matmul_is_one_reduction_stage():
    prog = matmul.trace(tl.spec((96, 200), "bfloat16"), tl.spec((200, 64), "bf16"))
    assert isinstance(prog, tl.Program) and prog.name == "matmul"
    assert [(t.name, t.shape, t.dtype) for t in prog.inputs] == [
        ("A", (96, 200), "bfloat16"), ("B", (200, 64), "bfloat16")]
    assert [(t.name, t.shape, t.dtype) for t in prog.outputs] == [("C", (96, 64), "float32")]
    assert prog.temps == ()
    (s,) = prog.stages
    assert (s.name, s.tensor, s.reduce, s.init) == ("C", "C", "add", Const(0.0))
    assert s.axes == (ir.Axis("i", 96), ir.Axis("j", 64))
    assert s.reduce_axes == (ir.Axis("k", 200, "reduce"),)
    assert s.index == (Affine.var("i"), Affine.var("j"))
    assert s.value == Binary("mul", Load("A", (Affine.var("i"), Affine.var("k"))),
                             Load("B", (Affine.var("k"), Affine.var("j"))))
    assert s.loc.text == "C[i, j] += A[i, k] * B[k, j]"


def test_program_prints_loop_nest():
    text = str(matmul.trace(tl.spec((96, 200)), tl.spec((200, 64))))
    assert text.splitlines() == [
        "program matmul(A: float32[96, 200], B: float32[200, 64]) -> C: float32[96, 64]",
        "  for i in range(96):",
        "    for j in range(64):",
        "      C[i, j] = 0.0",
        "      for k in reduce(200):",
        "        C[i, j] += (A[i, k] * B[k, j])",
    ]


def test_softmax_stages_names_and_sequential_reductions():
    prog = softmax.trace(tl.spec((4, 10)))
    assert [s.tensor for s in prog.stages] == ["mx", "total", "Y"]
    assert [t.name for t in prog.temps] == ["mx", "total"]
    assert [t.name for t in prog.outputs] == ["Y"]
    mx, total, y = prog.stages
    assert (mx.reduce, mx.init) == ("max", None)  # no init store: the op's identity
    assert (total.reduce, total.init) == ("add", Const(0.0))
    # the three j loops are different loops: unique names; i is shared
    assert [a.name for a in mx.reduce_axes + total.reduce_axes + y.axes] == ["j", "j_1", "i", "j_2"]
    assert mx.axes == total.axes == (ir.Axis("i", 4),)
    assert "for j_2 in range(10):" in str(prog)


def test_init_merged_across_other_stages_and_sub_reduction():
    @tl.kernel
    def two(X):
        M, N = X.shape
        s = tl.tensor((M,))
        q = tl.tensor((M,))
        for i in tl.grid(M):
            s[i] = 1.0
            q[i] = X[i, 0]
            for j in tl.reduce(N):
                s[i] += X[i, j]
                q[i] -= X[i, j] * X[i, j]
        return s, q

    prog = two.trace(tl.spec((3, 5)))
    s, q = prog.stages
    assert (s.tensor, s.init, q.tensor, q.init) == ("s", Const(1.0), "q", Load("X", (Affine.var("i"), Affine.constant(0))))
    assert q.reduce == "add" and isinstance(q.value, Unary) and q.value.op == "neg"
    assert s.reduce_axes == q.reduce_axes  # the shared reduce loop
    X = np.arange(15, dtype=np.float32).reshape(3, 5)
    so, qo = prog.reference(X)
    np.testing.assert_allclose(so, 1 + X.sum(1))
    np.testing.assert_allclose(qo, X[:, 0] - (X * X).sum(1))


def test_tensor_and_loop_names():
    @tl.kernel
    def names(A, B):
        named = tl.tensor(A.shape, name="out")
        parts = [tl.tensor(A.shape) for _ in range(3)]
        A2 = tl.tensor(A.shape)
        for row, col in tl.grid(*A.shape):
            parts[0][row, col] = A[row, col]
        for row, _ in tl.grid(*A.shape):
            parts[1][row, _] = B[row, _]
        for ij in tl.grid(*B.shape):
            parts[2][ij[0], ij[1]] = B[ij[0], ij[1]]
        for r in tl.grid(A.shape[0]):
            for c in tl.grid(A.shape[1]):
                named[r, c] = parts[0][r, c] + parts[1][r, c] + parts[2][r, c]
                A2[r, c] = A[r, c]
        return named, A2

    prog = names.trace(tl.spec((2, 3)), tl.spec((2, 3)))
    assert [t.name for t in prog.outputs] == ["out", "A2"]
    assert [t.name for t in prog.temps] == ["t1", "t2", "t3"]
    axes = [[a.name for a in s.axes] for s in prog.stages]
    assert axes == [["row", "col"], ["row_1", "i0"], ["ij0", "ij1"], ["r", "c"], ["r", "c"]]


def test_fallback_names_without_source():
    src = ("import tensorlang as tl\n"
           "@tl.kernel\n"
           "def add1(A):\n"
           "    B = tl.tensor(A.shape)\n"
           "    for i, j in tl.grid(*A.shape):\n"
           "        B[i, j] = A[i, j] + 1\n"
           "    return B\n")
    ns = {}
    exec(compile(src, "<no-file>", "exec"), ns)
    prog = ns["add1"].trace(tl.spec((3, 4)))
    assert [a.name for a in prog.stages[0].axes] == ["i0", "i1"]
    assert prog.outputs[0].name == "t0"
    np.testing.assert_array_equal(prog.reference(np.zeros((3, 4), np.float32)), np.ones((3, 4)))


def test_static_parameters_and_python_unrolling():
    @tl.kernel
    def scale_rows(X, factor=2.0, reps=3):
        M, N = X.shape
        Y = tl.tensor((M, N))
        for i, j in tl.grid(M, N):
            v = X[i, j]
            for _ in range(reps):  # plain Python loop over ints: unrolled at trace time
                v = v * factor
            Y[i, j] = v
        return Y

    X = np.ones((2, 2), np.float32)
    np.testing.assert_array_equal(scale_rows.trace(X).reference(X), np.full((2, 2), 8.0))
    np.testing.assert_array_equal(scale_rows.trace(X, factor=1.5, reps=2).reference(X),
                                  np.full((2, 2), 2.25))
    with pytest.raises(TensorlangError, match=r"no parameter 'scale' .*static: factor, reps"):
        scale_rows.trace(X, scale=2)


def test_index_arithmetic_and_index_values():
    @tl.kernel
    def k(X):
        N = X.shape[0]
        Y = tl.tensor((N // 2,))
        for i in tl.grid(N // 2):
            Y[i] = X[2 * i + 1] + X[-i + (N - 1)] * 0 + (i - 1) * 1.0 + np.float32(2) * (1 - i)
        return Y

    prog = k.trace(tl.spec((10,)))
    s = prog.stages[0]
    loads = ir.loads(s.value)
    assert loads[0].index == (Affine.make({"i": 2}, 1),)
    assert loads[1].index == (Affine.make({"i": -1}, 9),)
    assert any(isinstance(e, IndexValue) for e in ir.walk(s.value))
    X = np.arange(10, dtype=np.float32)
    i = np.arange(5)
    np.testing.assert_allclose(prog.reference(X), X[2 * i + 1] + (i - 1) + 2 * (1 - i))


@settings(max_examples=40, deadline=None, database=None)
@given(a=st.integers(-3, 3), b=st.integers(-3, 3), c=st.integers(-5, 5), d=st.integers(-3, 3))
def test_affine_forms(a, b, c, d):
    """Index arithmetic on loop variables builds the expected affine form."""
    i, j = tl.dsl.IndexExpr(Affine.var("i")), tl.dsl.IndexExpr(Affine.var("j"))
    e = (i * a + b * j - c) * d + (-i)
    assert e.affine == Affine.make({"i": a * d - 1, "j": b * d}, -c * d)


@settings(max_examples=25, deadline=None, database=None)
@given(off=st.integers(-3, 3), stride=st.integers(1, 3), n=st.integers(1, 6))
def test_padded_strided_reads_match_numpy(off, stride, n):
    @tl.kernel
    def gather(X):
        Y = tl.tensor((n,))
        for i in tl.grid(n):
            Y[i] = X.pad(7.0)[stride * i + off]
        return Y

    X = np.arange(10, dtype=np.float32)
    idx = stride * np.arange(n) + off
    want = np.where((idx >= 0) & (idx < 10), X[np.clip(idx, 0, 9)], 7.0)
    np.testing.assert_array_equal(gather.trace(X).reference(X), want)


# ---------------------------------------------------------------------------------------
# trace-time errors: each names the thing and the limit, and quotes the DSL line


def test_error_wrong_number_of_inputs():
    with pytest.raises(TensorlangError, match=r"matmul takes 2 input tensors \(A, B\), got 3"):
        matmul.trace(F32, F32, F32)
    with pytest.raises(TensorlangError, match=r"matmul takes 2 input tensors \(A, B\), got 1"):
        matmul.trace(F32)


def test_error_bad_spec():
    with pytest.raises(TensorlangError, match=r"unknown dtype 'float64'"):
        tl.spec((4, 4), "float64")
    with pytest.raises(TensorlangError, match=r"positive ints, got \(4, 0\)"):
        tl.spec((4, 0))
    with pytest.raises(TensorlangError, match=r"input A: array dtype float64 is not supported"):
        matmul.trace(np.zeros((2, 2)), np.zeros((2, 2), np.float32))
    with pytest.raises(TensorlangError, match=r"input B must be a tl.spec"):
        matmul.trace(F32, (8, 8))


def test_error_out_of_bounds():
    @tl.kernel
    def k(A):
        B = tl.tensor(A.shape)
        for i in tl.grid(A.shape[0]):
            B[i] = A[i + 1]
        return B

    trace_error(k, [tl.spec((8,))],
                r"index i \+ 1 in dimension 0 of A\[i \+ 1\] ranges over \[1, 8\], out of bounds "
                r"for A of shape \(8,\) \(valid 0..7\)", "B[i] = A[i + 1]")


def test_error_out_of_bounds_store():
    @tl.kernel
    def k(A):
        B = tl.tensor((4,))
        for i in tl.grid(A.shape[0]):
            B[i] = A[i]
        return B

    trace_error(k, [tl.spec((5,))], r"ranges over \[0, 4\], out of bounds for B of shape \(4,\)",
                "B[i] = A[i]")


def test_error_non_affine_index():
    @tl.kernel
    def prod(A):
        B = tl.tensor(A.shape)
        for i, j in tl.grid(*A.shape):
            B[i, j] = A[i * j, j]
        return B

    trace_error(prod, [F32], r"non-affine index `\(\(i\) \* \(j\)\)` in dimension 0 of A",
                "B[i, j] = A[i * j, j]")

    @tl.kernel
    def floordiv(A):
        B = tl.tensor(A.shape)
        for i, j in tl.grid(*A.shape):
            B[i, j] = A[i // 2, j]
        return B

    trace_error(floordiv, [F32], r"`i // 2`: floor division .* \(non-affine index\)",
                "B[i, j] = A[i // 2, j]")

    @tl.kernel
    def gather(A):
        B = tl.tensor(A.shape)
        for i, j in tl.grid(*A.shape):
            B[i, j] = A[A[i, j], j]
        return B

    trace_error(gather, [F32], r"non-affine index `A\[i, j\]`", "B[i, j] = A[A[i, j], j]")


def test_error_index_shape_and_slices():
    @tl.kernel
    def k(A):
        B = tl.tensor(A.shape)
        for i in tl.grid(A.shape[0]):
            B[i] = A[i]
        return B

    trace_error(k, [F32], r"A has 2 dimensions \(shape \(8, 8\)\) but is indexed with 1 indices",
                "B[i] = A[i]")

    @tl.kernel
    def sl(A):
        B = tl.tensor(A.shape)
        for i in tl.grid(A.shape[0]):
            B[i, :] = A[i, :]
        return B

    trace_error(sl, [F32], r"slices are not supported when indexing A", "B[i, :] = A[i, :]")


def test_error_store_to_input():
    @tl.kernel
    def k(A):
        for i, j in tl.grid(*A.shape):
            A[i, j] = 0.0
        return A

    trace_error(k, [F32], r"cannot store to input tensor A", "A[i, j] = 0.0")


def test_error_reduction_variable_in_store_index():
    @tl.kernel
    def k(A):
        B = tl.tensor(A.shape)
        for i in tl.grid(A.shape[0]):
            for r in tl.reduce(A.shape[1]):
                B[i, r] += A[i, r]
        return B

    trace_error(k, [F32], r"store B\[i, r\] is indexed by reduction variable r", "B[i, r] += A[i, r]")


def test_error_reduction_variable_after_its_loop():
    @tl.kernel
    def k(A):
        s = tl.tensor((8,))
        t = tl.tensor((8,))
        for i in tl.grid(8):
            for r in tl.reduce(8):
                s[i] += A[i, r]
            t[i] = A[i, r]
        return s, t

    trace_error(k, [F32], r"loop variable r is used outside its tl.reduce loop \(opened at line "
                r"\d+\) in A\[i, r\]", "t[i] = A[i, r]")

    @tl.kernel
    def k2(A):
        s = tl.tensor((8,))
        t = tl.tensor((8,))
        for i in tl.grid(8):
            for r in tl.reduce(8):
                v = A[i, r]
                s[i] += v
            t[i] = v
        return s, t

    trace_error(k2, [F32], r"loop variable r is used outside its tl.reduce loop .* in the value "
                r"stored to t\[i\]", "t[i] = v")


def test_error_store_in_reduce_loop_must_accumulate():
    @tl.kernel
    def k(A):
        s = tl.tensor((8,))
        for i in tl.grid(8):
            for r in tl.reduce(8):
                s[i] = A[i, r]
        return s

    trace_error(k, [F32], r"store s\[i\] inside tl.reduce loop r must accumulate", "s[i] = A[i, r]")

    @tl.kernel
    def div(A):
        s = tl.tensor((8,))
        for i in tl.grid(8):
            for r in tl.reduce(8):
                s[i] /= A[i, r]
        return s

    trace_error(div, [F32], r"must accumulate", "s[i] /= A[i, r]")


def test_error_read_own_tensor_at_other_index():
    @tl.kernel
    def scan(A):
        B = tl.tensor((8,))
        for i in tl.grid(7):
            B[i + 1] = B[i] + A[i]
        return B

    trace_error(scan, [tl.spec((8,))], r"stage B reads B\[i\] while writing B\[i \+ 1\]: a stage "
                r"cannot read the tensor it writes", "B[i + 1] = B[i] + A[i]")

    @tl.kernel
    def acc(A):
        s = tl.tensor((8,))
        for i in tl.grid(8):
            for r in tl.reduce(8):
                s[i] += s[0] * A[i, r]
        return s

    trace_error(acc, [F32], r"stage s reads s\[0\] while writing s\[i\]", "s[i] += s[0] * A[i, r]")


def test_error_read_before_write():
    @tl.kernel
    def k(A):
        tmp = tl.tensor((8,))
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = tmp[i] + A[i]
        for i in tl.grid(8):
            tmp[i] = A[i]
        return B

    trace_error(k, [tl.spec((8,))], r"tmp\[i\] is read before any stage writes tmp",
                "B[i] = tmp[i] + A[i]")


def test_error_two_writers():
    @tl.kernel
    def k(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = A[i]
        for i in tl.grid(8):
            B[i] = A[i] * 2.0
        return B

    trace_error(k, [tl.spec((8,))], r"tensor B is already written by the stage at line \d+; "
                r"each tensor is written by exactly one stage", "B[i] = A[i] * 2.0")

    @tl.kernel
    def init_read_between(A):
        s = tl.tensor((8,))
        u = tl.tensor((8,))
        for i in tl.grid(8):
            s[i] = 0.0
            u[i] = s[i]
            for r in tl.reduce(8):
                s[i] += A[i, r]
        return s, u

    trace_error(init_read_between, [F32], r"tensor s is already written", "s[i] += A[i, r]")


def test_error_store_misses_spatial_loop():
    @tl.kernel
    def k(A):
        B = tl.tensor((8,))
        for i, j in tl.grid(8, 8):
            B[i] = A[i, j]
        return B

    trace_error(k, [F32], r"store B\[i\] does not use loop variable j \(extent 8\)", "B[i] = A[i, j]")


def test_error_interleaving_differs():
    @tl.kernel
    def k(X):
        M = X.shape[0]
        t = tl.tensor((M,))
        Y = tl.tensor((M,))
        for i in tl.grid(M):
            t[i] = X[i] * 2.0
            Y[i] = t[M - 1 - i]
        return Y

    msg = trace_error(k, [tl.spec((6,))], r"t\[-i \+ 5\] is read inside loop i, which also runs the "
                      r"stage writing t \(line \d+\), but not at the element written in the same "
                      r"iteration of i", "Y[i] = t[M - 1 - i]")
    assert "stage-by-stage and interleaved execution would differ" in msg

    @tl.kernel
    def ok(X):  # the same read after the loop is fine
        M = X.shape[0]
        t = tl.tensor((M,))
        Y = tl.tensor((M,))
        for i in tl.grid(M):
            t[i] = X[i] * 2.0
        for i in tl.grid(M):
            Y[i] = t[M - 1 - i]
        return Y

    X = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(ok.trace(X).reference(X), 2 * X[::-1])


def test_error_data_dependent_control_flow():
    @tl.kernel
    def branch(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            if A[i] > 0:
                B[i] = A[i]
        return B

    trace_error(branch, [tl.spec((8,))], r"data-dependent Python control flow is not supported in "
                r"a kernel: the truth value of `\(A\[i\] > 0.0\)`", "if A[i] > 0:")

    @tl.kernel
    def on_index(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = A[i] if i < 4 else 0.0
        return B

    trace_error(on_index, [tl.spec((8,))], r"data-dependent Python control flow",
                "B[i] = A[i] if i < 4 else 0.0")

    @tl.kernel
    def py_max(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = max(A[i], 0.0)
        return B

    trace_error(py_max, [tl.spec((8,))], r"use tl.where.* tl.max/tl.min instead of Python's max",
                "B[i] = max(A[i], 0.0)")

    @tl.kernel
    def loop_while(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            v = A[i]
            while v > 1.0:
                v = v / 2.0
            B[i] = v
        return B

    trace_error(loop_while, [tl.spec((8,))], r"data-dependent Python control flow", "while v > 1.0:")


def test_error_python_range_over_loop_variable():
    @tl.kernel
    def tri(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            for j in range(i):
                B[i] = A[j]
        return B

    trace_error(tri, [tl.spec((8,))], r"`i` is symbolic and cannot be used as a Python int",
                "for j in range(i):")


def test_error_break_in_kernel_loop():
    @tl.kernel
    def k(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = A[i]
            break
        return B

    trace_error(k, [tl.spec((8,))], r"`break` inside a tl.grid/tl.reduce loop is not supported",
                "break")

    @tl.kernel
    def early(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = A[i]
            return B

    trace_error(early, [tl.spec((8,))], r"`return` inside a tl.grid/tl.reduce loop", "return B")


def test_error_grid_inside_reduce_and_bad_extent():
    @tl.kernel
    def k(A):
        s = tl.tensor((8,))
        for r in tl.reduce(8):
            for i in tl.grid(8):
                s[i] += A[i, r]
        return s

    trace_error(k, [F32], r"tl.grid inside tl.reduce loop r is not supported",
                "for i in tl.grid(8):")

    @tl.kernel
    def ext(A):
        B = tl.tensor((8,))
        for i in tl.grid(8.0):
            B[i] = A[i]
        return B

    trace_error(ext, [tl.spec((8,))], r"tl.grid extent 8.0 must be a positive int known at trace "
                r"time", "for i in tl.grid(8.0):")


def test_error_tensor_used_as_value_and_bad_values():
    @tl.kernel
    def k(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = A + 1.0
        return B

    trace_error(k, [tl.spec((8,))], r"tensor A used as a value; index it, e.g. A\[i0\]",
                "B[i] = A + 1.0")

    @tl.kernel
    def arr(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = A[i] + "x"
        return B

    trace_error(arr, [tl.spec((8,))], r"str value 'x' cannot be used in a kernel expression",
                "B[i] = A[i] + \"x\"")


def test_error_outputs():
    @tl.kernel
    def none(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = A[i]

    with pytest.raises(TensorlangError, match=r"kernel none must return its output tensor"):
        none.trace(tl.spec((8,)))

    @tl.kernel
    def unwritten(A):
        B = tl.tensor((8,))
        return B

    trace_error(unwritten, [tl.spec((8,))], r"output B is returned but never written",
                "B = tl.tensor((8,))")

    @tl.kernel
    def dup_name(A):
        B = tl.tensor((8,), name="A")
        return B

    trace_error(dup_name, [tl.spec((8,))], r"tensor name 'A' is already used in kernel dup_name",
                'B = tl.tensor((8,), name="A")')


def test_error_outside_kernel():
    with pytest.raises(TensorlangError, match=r"tl.tensor can only be used inside a @tl.kernel"):
        tl.tensor((4,))
    with pytest.raises(TensorlangError, match=r"can only be used inside a @tl.kernel"):
        for _ in tl.grid(4):
            pass


def test_errors_have_short_tracebacks():
    """The error is raised from trace(), not from deep inside the tracer."""
    import traceback

    @tl.kernel
    def k(A):
        B = tl.tensor((8,))
        for i in tl.grid(8):
            B[i] = A[i + 1]
        return B

    with pytest.raises(TensorlangError) as info:
        k.trace(tl.spec((8,)))
    frames = traceback.extract_tb(info.value.__traceback__)
    assert [f.name for f in frames][-1] == "trace"
    assert re.search(r"at .*test_dsl.py:\d+: B\[i\] = A\[i \+ 1\]", str(info.value))


def test_error_store_not_one_to_one():
    @tl.kernel
    def diag(A):
        B = tl.tensor((15,))
        for i, j in tl.grid(8, 8):
            B[i + j] = A[i, j]
        return B

    trace_error(diag, [F32], r"store B\[i \+ j\] is not one-to-one: different iterations of "
                r"\(i, j\) write the same element of B", "B[i + j] = A[i, j]")

    @tl.kernel
    def flatten(A):  # mixed-radix indices are one-to-one
        B = tl.tensor((64,))
        for i, j in tl.grid(8, 8):
            B[i * 8 + j] = A[i, j]
        return B

    X = np.arange(64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(flatten.trace(X).reference(X), X.ravel())


def test_kernel_raised_error_gets_source_line():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "matmul.py"
    spec = importlib.util.spec_from_file_location("tl_example_matmul_dsl", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(TensorlangError, match=r"A is 4x5 but B is 6x3; inner dimensions differ"
                       r"\n  at .*matmul.py:\d+: raise tl.TensorlangError"):
        mod.matmul.trace(tl.spec((4, 5)), tl.spec((6, 3)))
