"""RMS normalisation: x * rsqrt(mean(x^2) + eps) * gamma. Run: python examples/rmsnorm.py"""
import tensorlang as tl


@tl.kernel
def rmsnorm(X, gamma, eps=1e-6):
    M, N = X.shape
    ms = tl.tensor((M,), "float32")  # mean of squares
    Y = tl.tensor((M, N), X.dtype)
    for i in tl.grid(M):
        ms[i] = 0.0
        for j in tl.reduce(N):
            ms[i] += X[i, j] * X[i, j] * (1.0 / N)
        for j in tl.grid(N):
            Y[i, j] = X[i, j] * tl.rsqrt(ms[i] + eps) * gamma[j]
    return Y


if __name__ == "__main__":
    prog = rmsnorm.trace(tl.spec((128, 1024), "bfloat16"), tl.spec((1024,), "bfloat16"))
    print(prog)
    X = tl.dtypes.random_array((128, 1024), "bfloat16", seed=0)
    g = tl.dtypes.random_array((1024,), "bfloat16", seed=1)
    Y = prog.reference(X, g)
    print(f"Y: {Y.dtype}{list(Y.shape)}, Y[0, :4] = {Y[0, :4]}")
