"""Workloads of the library kernels from a few integers: what `tensorlang run KERNEL --shape`
takes, and the real model shapes the shipped records are tuned at.

    workload("matmul", (512, 1024, 256), "bfloat16") -> ([spec A, spec B], static kwargs)
"""
from __future__ import annotations

import tensorlang as tl


def _mm(d, t):
    M, N, K = d
    return [tl.spec((M, K), t), tl.spec((K, N), t)], {}


def _lin(d, t):
    M, N, K = d
    return [tl.spec((M, K), t), tl.spec((K, N), t), tl.spec((N,), t)], {"act": "gelu"}


def _mm_add(d, t):
    M, N, K = d
    return [tl.spec((M, K), t), tl.spec((K, N), t), tl.spec((M, N), t)], {}


def _bmm(d, t):
    B, M, N, K = d
    return [tl.spec((B, M, K), t), tl.spec((B, K, N), t)], {}


def _conv(d, t):
    N, C, H, W, O, KH, KW, stride, pad = tuple(d) + (1, 0)[len(d) - 7:]
    return [tl.spec((N, C, H, W), t), tl.spec((O, C, KH, KW), t)], {"stride": stride,
                                                                     "padding": pad}


def _dw(d, t):
    N, C, H, W, KH, KW, stride, pad = tuple(d) + (1, 0)[len(d) - 6:]
    return [tl.spec((N, C, H, W), t), tl.spec((C, KH, KW), t)], {"stride": stride,
                                                                  "padding": pad}


def _rows(d, t):
    M, N = d
    return [tl.spec((M, N), t)], {}


def _ln(d, t):
    M, N = d
    return [tl.spec((M, N), t), tl.spec((N,), t), tl.spec((N,), t)], {}


def _rms(d, t):
    M, N = d
    return [tl.spec((M, N), t), tl.spec((N,), t)], {}


def _rms_mm(d, t):
    M, N, K = d
    return [tl.spec((M, K), t), tl.spec((K,), t), tl.spec((K, N), t)], {}


def _att(d, t):
    H, S, D = d[:3]
    causal = bool(d[3]) if len(d) > 3 else False
    return [tl.spec((H, S, D), t)] * 3, {"causal": causal}


def _two(d, t):
    M, N = d
    return [tl.spec((M, N), t)] * 2, {}


# kernel -> (what --shape means, default dims, dims -> (specs, static))
SHAPES = {
    "matmul": ("M,N,K", (512, 1024, 256), _mm),
    "linear": ("M,N,K (gelu epilogue)", (512, 1024, 256), _lin),
    "matmul_add": ("M,N,K", (512, 1024, 256), _mm_add),
    "bmm": ("B,M,N,K", (4, 256, 512, 128), _bmm),
    "conv2d": ("N,C,H,W,O,KH,KW[,stride,padding]", (1, 64, 28, 28, 64, 3, 3, 1, 1), _conv),
    "depthwise_conv2d": ("N,C,H,W,KH,KW[,stride,padding]", (1, 128, 28, 28, 3, 3, 1, 1), _dw),
    "softmax": ("M,N", (512, 1024), _rows),
    "log_softmax": ("M,N", (512, 1024), _rows),
    "layernorm": ("M,N", (512, 768), _ln),
    "rmsnorm": ("M,N", (512, 1024), _rms),
    "rmsnorm_matmul": ("M,N,K", (256, 512, 512), _rms_mm),
    "attention": ("H,S,D[,causal]", (4, 256, 64, 1), _att),
    "transpose": ("M,N", (512, 1024), _rows),
    "sum": ("M,N", (512, 1024), _rows),
    "max": ("M,N", (512, 1024), _rows),
    "mean": ("M,N", (512, 1024), _rows),
    "gelu": ("M,N", (512, 1024), _rows),
    "silu": ("M,N", (512, 1024), _rows),
    "swiglu": ("M,N", (512, 1024), _two),
}


def workload(kernel: str, dims=None, dtype: str = "bfloat16"):
    """(specs, static) for library kernel `kernel` at `dims` (default: its default dims)."""
    if kernel not in SHAPES:
        raise tl.TensorlangError(f"no library kernel {kernel!r}; kernels are: "
                                 f"{', '.join(sorted(SHAPES))}")
    meaning, default, fn = SHAPES[kernel]
    dims = tuple(default if dims is None else dims)
    n_req = len(meaning.split("[")[0].rstrip(",").split(","))
    n_max = n_req + (len(meaning.split("[")[1].split(",")) if "[" in meaning else 0)
    if not n_req <= len(dims) <= n_max or any(d < 0 for d in dims):
        raise tl.TensorlangError(f"{kernel}: --shape {','.join(map(str, dims))} must give "
                                 f"{meaning.split(' (')[0]} ({n_req}"
                                 f"{'' if n_max == n_req else f' to {n_max}'} integers)")
    return fn(dims, dtype)


# Real shapes the shipped records are tuned at (name, kernel, dims).
MODEL_SHAPES = [
    ("BERT-base QKV/out proj (seq 512)", "matmul", (512, 768, 768)),
    ("BERT-base FFN up (seq 512)", "linear", (512, 3072, 768)),
    ("GPT-2 FFN down (seq 1024)", "matmul", (1024, 768, 3072)),
    ("Llama-7B attn proj (seq 512)", "matmul", (512, 4096, 4096)),
    ("Llama-7B MLP up (seq 512)", "matmul", (512, 11008, 4096)),
    ("square 4096^3", "matmul", (4096, 4096, 4096)),
    ("BERT-base attention heads", "bmm", (12, 512, 512, 64)),
    ("ResNet-50 conv3x3 stage 3", "conv2d", (1, 256, 14, 14, 256, 3, 3, 1, 1)),
    ("ResNet-50 conv1x1 stage 2", "conv2d", (1, 512, 28, 28, 128, 1, 1, 1, 0)),
    ("BERT-base softmax (scores)", "softmax", (1536, 512)),
    ("BERT-base layernorm", "layernorm", (512, 768)),
    ("Llama-7B rmsnorm", "rmsnorm", (512, 4096)),
    ("GPT-2 attention (12 heads, seq 512)", "attention", (12, 512, 64, 1)),
    ("Llama-7B SwiGLU", "swiglu", (512, 11008)),
    # the large shapes (long sequences / big batches): where memory-bound kernels stream
    ("Llama-7B attention scores (seq 4096, one head)", "softmax", (4096, 4096)),
    ("Llama-7B rmsnorm (seq 4096)", "rmsnorm", (4096, 4096)),
    ("BERT-large layernorm (batch 8, seq 512)", "layernorm", (4096, 1024)),
    ("Llama-7B SwiGLU (seq 2048)", "swiglu", (2048, 11008)),
    ("BERT-large FFN up + GELU (batch 8, seq 512)", "linear", (4096, 4096, 1024)),
    ("Llama-7B log-softmax (seq 4096, one head)", "log_softmax", (4096, 4096)),
    ("GPT-2 FFN GELU (seq 4096)", "gelu", (4096, 3072)),
    ("Llama-7B hidden transpose (seq 4096)", "transpose", (4096, 4096)),
    ("Llama-7B hidden row sum (seq 4096)", "sum", (4096, 4096)),
    ("MobileNet-style depthwise 3x3 (batch 8, 256 ch, 56x56)", "depthwise_conv2d",
     (8, 256, 56, 56, 3, 3, 1, 1)),
]
