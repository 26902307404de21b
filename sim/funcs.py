"""The scalar functions of the machine, defined once: activation functions, ALU ops, reductions.

The functional simulator computes with these, and the DSL reference interpreter reuses
them, so "the simulator equals the reference" never depends on two gelu definitions.

    ACT[name](x)        elementwise activation (sim.isa.ACT_FUNCS)
    ALU[name](a, b)     elementwise binary op; comparisons give 1.0 / 0.0 (sim.isa.ALU_OPS)
    REDUCE[name](x, axis)  reduction along an axis (sim.isa.REDUCE_OPS)
    NP_DTYPES[name]     numpy dtype of an ISA dtype name (bf16 / fp8 via ml_dtypes)

Functions keep the floating dtype of their input (the simulator passes float32).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .isa import ACT_FUNCS, ALU_OPS, DTYPE_SIZE, REDUCE_OPS

NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int32": np.dtype(np.int32),
}
assert set(NP_DTYPES) == set(DTYPE_SIZE)
assert all(NP_DTYPES[k].itemsize == DTYPE_SIZE[k] for k in DTYPE_SIZE)


def erf(x):
    """erf, vectorised: Abramowitz & Stegun 7.1.26 in float64 (|error| <= 1.5e-7)."""
    x64 = np.asarray(x, dtype=np.float64)
    a = np.abs(x64)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
                                                        + t * (-1.453152027 + t * 1.061405429))))
    y = 1.0 - poly * np.exp(-a * a)
    return np.sign(x64) * y


def _like(x, y):
    """y in x's floating dtype (float32 when x is not floating)."""
    x = np.asarray(x)
    dt = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    return np.asarray(y).astype(dt, copy=False)


def gelu(x):
    """gelu, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) -- the
    definition of the DSL's tl.gelu (docs/dsl.md), so the machine and the reference agree."""
    x64 = np.asarray(x, dtype=np.float64)
    c = np.sqrt(2.0 / np.pi)
    return _like(x, 0.5 * x64 * (1.0 + np.tanh(c * (x64 + 0.044715 * x64 * x64 * x64))))


def sigmoid(x):
    with np.errstate(over="ignore"):
        return _like(x, 1.0 / (1.0 + np.exp(-np.asarray(x))))


def silu(x):
    return _like(x, np.asarray(x) * sigmoid(x))


ACT = {
    "copy": lambda x: np.array(x),
    "neg": np.negative,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "tanh": np.tanh,
    "sigmoid": sigmoid,
    "gelu": gelu,
    "relu": lambda x: np.maximum(x, 0),
    "abs": np.abs,
    "silu": silu,
    "square": np.square,
    "reciprocal": lambda x: 1.0 / x,
}


ALU = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
    "pow": np.power,
    "lt": lambda a, b: _like(a, np.less(a, b)),
    "le": lambda a, b: _like(a, np.less_equal(a, b)),
    "gt": lambda a, b: _like(a, np.greater(a, b)),
    "ge": lambda a, b: _like(a, np.greater_equal(a, b)),
    "eq": lambda a, b: _like(a, np.equal(a, b)),
    "ne": lambda a, b: _like(a, np.not_equal(a, b)),
}

REDUCE = {
    "add": lambda x, axis: np.sum(x, axis=axis),
    "max": lambda x, axis: np.max(x, axis=axis),
    "min": lambda x, axis: np.min(x, axis=axis),
    "mul": lambda x, axis: np.prod(x, axis=axis),
}

REDUCE_IDENTITY = {"add": 0.0, "max": float("-inf"), "min": float("inf"), "mul": 1.0}

assert set(ACT) == set(ACT_FUNCS) and set(ALU) == set(ALU_OPS) and set(REDUCE) == set(REDUCE_OPS)


def round_to(values, dtype: str) -> np.ndarray:
    """float values rounded to an ISA dtype (nearest-even; ints: rint, saturating)."""
    dt = NP_DTYPES[dtype]
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        v = np.rint(np.asarray(values, dtype=np.float64))
        return np.clip(np.nan_to_num(v), info.min, info.max).astype(dt)
    return np.asarray(values).astype(dt)


__all__ = ["ACT", "ALU", "REDUCE", "REDUCE_IDENTITY", "NP_DTYPES", "erf", "gelu", "round_to"]
