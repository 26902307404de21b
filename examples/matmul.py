"""C = A @ B: the basic tensorlang kernel. Run: python examples/matmul.py"""
import tensorlang as tl


@tl.kernel
def matmul(A, B, out_dtype="float32"):
    M, K = A.shape
    K2, N = B.shape
    if K != K2:
        raise tl.TensorlangError(f"matmul: A is {M}x{K} but B is {K2}x{N}; inner dimensions differ")
    C = tl.tensor((M, N), out_dtype)
    for i, j in tl.grid(M, N):
        C[i, j] = 0.0
        for k in tl.reduce(K):
            C[i, j] += A[i, k] * B[k, j]
    return C


if __name__ == "__main__":
    prog = matmul.trace(tl.spec((512, 256), "bfloat16"), tl.spec((256, 1024), "bfloat16"))
    print(prog)
    A = tl.dtypes.random_array((512, 256), "bfloat16", seed=0)
    B = tl.dtypes.random_array((256, 1024), "bfloat16", seed=1)
    C = prog.reference(A, B)
    print(f"C: {C.dtype}{list(C.shape)}, C[0, :4] = {C[0, :4]}")
