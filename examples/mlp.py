"""A fused linear layer with GELU: Y = gelu(X @ W + b). Run: python examples/mlp.py"""
import tensorlang as tl


@tl.kernel
def gelu_linear(X, W, b):
    M, K = X.shape
    K2, N = W.shape
    if K != K2 or b.shape != (N,):
        raise tl.TensorlangError(f"gelu_linear: X {X.shape}, W {W.shape}, b {b.shape} do not fit")
    H = tl.tensor((M, N), "float32")  # pre-activation, accumulated from the bias
    Y = tl.tensor((M, N), "float32")
    for i, j in tl.grid(M, N):
        H[i, j] = b[j]
        for k in tl.reduce(K):
            H[i, j] += X[i, k] * W[k, j]
        Y[i, j] = tl.gelu(H[i, j])
    return Y


mlp = gelu_linear

if __name__ == "__main__":
    prog = gelu_linear.trace(tl.spec((256, 512), "bfloat16"), tl.spec((512, 1024), "bfloat16"),
                             tl.spec((1024,), "bfloat16"))
    print(prog)
    X = tl.dtypes.random_array((256, 512), "bfloat16", seed=0)
    W = tl.dtypes.random_array((512, 1024), "bfloat16", seed=1, scale=0.05)
    b = tl.dtypes.random_array((1024,), "bfloat16", seed=2)
    Y = prog.reference(X, W, b)
    print(f"Y: {Y.dtype}{list(Y.shape)}, Y[0, :4] = {Y[0, :4]}")
