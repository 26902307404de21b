"""Row-wise, numerically stable softmax: max, sum of exp, divide.
Run: python examples/softmax.py"""
import tensorlang as tl


@tl.kernel
def softmax(X):
    M, N = X.shape
    mx = tl.tensor((M,), "float32")     # row max
    total = tl.tensor((M,), "float32")  # row sum of exp(x - max)
    Y = tl.tensor((M, N), X.dtype)
    for i in tl.grid(M):
        mx[i] = -tl.inf
        for j in tl.reduce(N):
            mx[i] = tl.max(mx[i], X[i, j])
        total[i] = 0.0
        for j in tl.reduce(N):
            total[i] += tl.exp(X[i, j] - mx[i])
        for j in tl.grid(N):
            Y[i, j] = tl.exp(X[i, j] - mx[i]) / total[i]
    return Y


if __name__ == "__main__":
    prog = softmax.trace(tl.spec((128, 4096), "bfloat16"))
    print(prog)
    X = tl.dtypes.random_array((128, 4096), "bfloat16", seed=0)
    Y = prog.reference(X)
    print(f"Y: {Y.dtype}{list(Y.shape)}, row sums = {Y.astype('float32').sum(axis=1)[:4]}")
