"""kernels: the kernel library — algorithms, expert schedule templates, shipped tuned records.

    from kernels import matmul, softmax, layernorm, attention
    C = matmul(A, B)                              # best known schedule, functional simulator
    k = matmul.compile(A, B, machine="trn1")      # the compiled kernel: asm(), run(), simulate()
    k.choice.source                               # "record", "nearest record", "template ..."

Each operator family is one module (matmul, conv, norm, attention, elementwise) holding the
algorithm (@tl.kernel), its expert schedule templates and a `KernelFn` per operator; the
runner (`_library`) picks the schedule: tuned record -> nearest record -> template -> default.
"""
from ._library import KernelFn
from .attention import attention
from .conv import conv2d, depthwise_conv2d
from .elementwise import gelu, mean, silu, swiglu, transpose
from .elementwise import max as max_  # `kernels.max` / `kernels.sum` stay reachable by name
from .elementwise import sum as sum_
from .matmul import bmm, linear, matmul, matmul_add
from .norm import layernorm, log_softmax, rmsnorm, rmsnorm_matmul, softmax

LIBRARY = {k.name: k for k in (
    matmul, bmm, linear, matmul_add, conv2d, depthwise_conv2d, softmax, log_softmax, layernorm,
    rmsnorm, rmsnorm_matmul, attention, transpose, sum_, max_, mean, gelu, silu, swiglu)}
globals().update({"sum": sum_, "max": max_})

__all__ = ["KernelFn", "LIBRARY", *LIBRARY]
