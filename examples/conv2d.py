"""2-D convolution, NCHW input, OIHW weight, with stride and zero padding.
Run: python examples/conv2d.py"""
import tensorlang as tl


@tl.kernel
def conv2d(X, Wt, stride=1, padding=0, out_dtype="float32"):
    N, C, H, W = X.shape
    O, C2, KH, KW = Wt.shape
    if C != C2:
        raise tl.TensorlangError(f"conv2d: X has {C} channels but Wt expects {C2}")
    OH = (H + 2 * padding - KH) // stride + 1
    OW = (W + 2 * padding - KW) // stride + 1
    Xp = X.pad(0.0)  # reads outside X give 0.0
    Y = tl.tensor((N, O, OH, OW), out_dtype)
    for n, o, h, w in tl.grid(N, O, OH, OW):
        Y[n, o, h, w] = 0.0
        for c, kh, kw in tl.reduce(C, KH, KW):
            Y[n, o, h, w] += (Xp[n, c, h * stride + kh - padding, w * stride + kw - padding]
                              * Wt[o, c, kh, kw])
    return Y


if __name__ == "__main__":
    prog = conv2d.trace(tl.spec((1, 16, 32, 32), "bfloat16"), tl.spec((32, 16, 3, 3), "bfloat16"),
                        stride=1, padding=1)
    print(prog)
    X = tl.dtypes.random_array((1, 16, 32, 32), "bfloat16", seed=0)
    Wt = tl.dtypes.random_array((32, 16, 3, 3), "bfloat16", seed=1)
    Y = prog.reference(X, Wt)
    print(f"Y: {Y.dtype}{list(Y.shape)}, Y[0, 0, 0, :4] = {Y[0, 0, 0, :4]}")
