"""numpy dtypes and comparison tolerances for tensorlang's dtype names.

    np_dtype("bfloat16")            -> numpy dtype (via ml_dtypes for bf16 / fp8)
    dtype_name(array.dtype)         -> "bfloat16"        (the inverse)
    tolerance("bfloat16")           -> (rtol, atol)      loosest over several dtypes
    assert_close(actual, expected, "bfloat16")

Tolerances are for comparing a result computed in another order or on another engine
(simulator vs reference) against the reference, both produced from the same inputs. They
are a few units of the dtype's rounding error, so a value stored once in that dtype and
rounded differently still compares equal.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .ir import DTYPES, canonical_dtype

_NP = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int32": np.dtype(np.int32),
}
assert set(_NP) == set(DTYPES)

TOLERANCE = {  # dtype -> (rtol, atol)
    "float32": (1e-4, 1e-4),  # 1e-5 is too tight for K >= 1024 sums in another order
    "float16": (2e-3, 2e-3),
    "bfloat16": (2e-2, 2e-2),
    "float8_e4m3": (1e-1, 1e-1),
    "float8_e5m2": (2e-1, 2e-1),
    "int32": (0.0, 0.0),
}


def np_dtype(dtype) -> np.dtype:
    """The numpy dtype for a tensorlang dtype name (aliases like "bf16" accepted)."""
    return _NP[canonical_dtype(dtype)]


def dtype_name(dtype) -> str:
    """The tensorlang name of a numpy dtype; TensorlangError for unsupported ones."""
    return canonical_dtype(np.dtype(dtype).name)


def tolerance(*dtypes) -> tuple[float, float]:
    """(rtol, atol) for comparing results that involve these dtypes: the loosest one."""
    tols = [TOLERANCE[canonical_dtype(d)] for d in dtypes] or [TOLERANCE["float32"]]
    return max(t[0] for t in tols), max(t[1] for t in tols)


def rtol(*dtypes) -> float:
    return tolerance(*dtypes)[0]


def atol(*dtypes) -> float:
    return tolerance(*dtypes)[1]


def allclose(actual, expected, *dtypes) -> bool:
    r, a = tolerance(*dtypes)
    return bool(np.allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                            rtol=r, atol=a, equal_nan=True))


def assert_close(actual, expected, *dtypes, what: str = "result") -> None:
    """Raise AssertionError naming the worst element when actual != expected within tolerance."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    r, t = tolerance(*dtypes)
    bad = ~np.isclose(a, e, rtol=r, atol=t, equal_nan=True)
    if bad.any():
        err = np.where(bad, np.abs(a - e) - r * np.abs(e), 0.0)
        worst = np.unravel_index(int(np.nanargmax(err)), a.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} elements differ beyond rtol={r}, atol={t} "
            f"(dtype {', '.join(map(str, dtypes)) or 'float32'}); worst at {worst}: "
            f"{a[worst]!r} vs expected {e[worst]!r}")


def random_array(shape, dtype="float32", seed=0, scale=1.0) -> np.ndarray:
    """Standard-normal test data rounded to `dtype` (small ints for int32)."""
    rng = np.random.default_rng(seed)
    name = canonical_dtype(dtype)
    if name == "int32":
        return rng.integers(-8, 8, size=shape).astype(np.int32)
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(_NP[name])


__all__ = ["np_dtype", "dtype_name", "tolerance", "rtol", "atol", "allclose", "assert_close",
           "random_array", "TOLERANCE"]
