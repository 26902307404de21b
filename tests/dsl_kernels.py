"""DSL kernels shared by the dsl, autotune and records tests (not a test module)."""
import tensorlang as tl


@tl.kernel
def matmul(A, B):
    M, K = A.shape
    _, N = B.shape
    C = tl.tensor((M, N), "float32", name="C")
    for i, j in tl.grid(M, N):
        C[i, j] = 0.0
        for k in tl.reduce(K):
            C[i, j] += A[i, k] * B[k, j]
    return C
