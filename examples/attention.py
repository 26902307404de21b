"""Multi-head attention O = softmax(Q K^T * scale [+ causal mask]) V, one kernel.
Q: (H, Sq, D), K: (H, Sk, D), V: (H, Sk, Dv) -> O: (H, Sq, Dv).
Run: python examples/attention.py"""
import tensorlang as tl


@tl.kernel
def attention(Q, K, V, causal=False, scale=None):
    H, Sq, D = Q.shape
    _, Sk, Dv = V.shape
    if K.shape != (H, Sk, D):
        raise tl.TensorlangError(f"attention: K has shape {K.shape}, expected {(H, Sk, D)}")
    scale = D ** -0.5 if scale is None else scale
    S = tl.tensor((H, Sq, Sk), "float32")   # scores Q K^T
    mx = tl.tensor((H, Sq), "float32")      # row max of the scaled, masked scores
    total = tl.tensor((H, Sq), "float32")   # row sum of exp
    O = tl.tensor((H, Sq, Dv), Q.dtype)

    def logit(h, i, j):  # a traced helper: the scaled (and masked) score
        s = S[h, i, j] * scale
        return tl.where(j <= i, s, -tl.inf) if causal else s

    for h, i in tl.grid(H, Sq):
        for j in tl.grid(Sk):
            S[h, i, j] = 0.0
            for d in tl.reduce(D):
                S[h, i, j] += Q[h, i, d] * K[h, j, d]
        mx[h, i] = -tl.inf
        for j in tl.reduce(Sk):
            mx[h, i] = tl.max(mx[h, i], logit(h, i, j))
        total[h, i] = 0.0
        for j in tl.reduce(Sk):
            total[h, i] += tl.exp(logit(h, i, j) - mx[h, i])
        for e in tl.grid(Dv):
            O[h, i, e] = 0.0
            for j in tl.reduce(Sk):
                O[h, i, e] += tl.exp(logit(h, i, j) - mx[h, i]) / total[h, i] * V[h, j, e]
    return O


if __name__ == "__main__":
    shapes = [tl.spec((4, 128, 64), "bfloat16")] * 3
    prog = attention.trace(*shapes, causal=True)
    print(prog)
    Q, K, V = (tl.dtypes.random_array((4, 128, 64), "bfloat16", seed=s) for s in range(3))
    O = prog.reference(Q, K, V)
    print(f"O: {O.dtype}{list(O.shape)}, O[0, 0, :4] = {O[0, 0, :4]}")
