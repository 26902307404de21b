"""Layer normalisation over the last axis: mean, variance, then gamma * x_hat + beta.
Run: python examples/layernorm.py"""
import tensorlang as tl


@tl.kernel
def layernorm(X, gamma, beta, eps=1e-5):
    M, N = X.shape
    mean = tl.tensor((M,), "float32")
    var = tl.tensor((M,), "float32")
    Y = tl.tensor((M, N), X.dtype)
    for i in tl.grid(M):
        mean[i] = 0.0
        for j in tl.reduce(N):
            mean[i] += X[i, j] * (1.0 / N)
        var[i] = 0.0
        for j in tl.reduce(N):
            var[i] += tl.square(X[i, j] - mean[i]) * (1.0 / N)
        for j in tl.grid(N):
            Y[i, j] = (X[i, j] - mean[i]) * tl.rsqrt(var[i] + eps) * gamma[j] + beta[j]
    return Y


if __name__ == "__main__":
    prog = layernorm.trace(tl.spec((128, 1024), "bfloat16"), tl.spec((1024,), "bfloat16"),
                           tl.spec((1024,), "bfloat16"))
    print(prog)
    X = tl.dtypes.random_array((128, 1024), "bfloat16", seed=0)
    g = tl.dtypes.random_array((1024,), "bfloat16", seed=1)
    b = tl.dtypes.random_array((1024,), "bfloat16", seed=2)
    Y = prog.reference(X, g, b)
    print(f"Y: {Y.dtype}{list(Y.shape)}, Y[0, :4] = {Y[0, :4]}")
