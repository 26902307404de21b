"""Batched matmul C[b] = A[b] @ B[b]. Run: python examples/bmm.py"""
import tensorlang as tl


@tl.kernel
def bmm(A, B, out_dtype="float32"):
    NB, M, K = A.shape
    NB2, K2, N = B.shape
    if (NB, K) != (NB2, K2):
        raise tl.TensorlangError(f"bmm: A is {A.shape} but B is {B.shape}")
    C = tl.tensor((NB, M, N), out_dtype)
    for b, i, j in tl.grid(NB, M, N):
        C[b, i, j] = 0.0
        for k in tl.reduce(K):
            C[b, i, j] += A[b, i, k] * B[b, k, j]
    return C


if __name__ == "__main__":
    prog = bmm.trace(tl.spec((4, 128, 64), "bfloat16"), tl.spec((4, 64, 256), "bfloat16"))
    print(prog)
    A = tl.dtypes.random_array((4, 128, 64), "bfloat16", seed=0)
    B = tl.dtypes.random_array((4, 64, 256), "bfloat16", seed=1)
    C = prog.reference(A, B)
    print(f"C: {C.dtype}{list(C.shape)}, C[0, 0, :4] = {C[0, 0, :4]}")
