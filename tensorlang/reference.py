"""The numpy reference interpreter: `reference(program, *arrays)` (also `program.reference`).

Semantics (the meaning of a Program, which every schedule must preserve):

* stages run in order, each over its whole iteration domain before the next;
* arithmetic is float32: inputs are converted to float32, constants are float32;
* a store rounds the value to the tensor's dtype; a reduction accumulates in float32 and
  rounds once when it stores (like PSUM accumulation);
* a reduction starts from its init expression, or from the op's identity when init is None;
* a padded load (Load.pad) reads `pad` outside the tensor's bounds;
* outputs and temporaries start at zero (elements no stage writes stay zero).

Input arrays must match the program's inputs in count, shape and dtype; the one
conversion done is float64 -> float32 for float32 inputs.

Each stage is vectorised over its domain with broadcast index grids. Domains larger than
BUDGET elements are cut into boxes (outer spatial axes first). A sum-of-products reduction
(matmul, bmm, conv, attention's P @ V) is contracted with np.matmul instead of being
materialised, so a 1024^3 matmul costs one BLAS call.
"""
from __future__ import annotations

import numpy as np

from . import ir
from .dtypes import np_dtype
from .ir import (Affine, Binary, Cast, Compare, Const, IndexValue, Load, Program, Select, Stage,
                 TensorlangError, Unary)

BUDGET = 1 << 22  # elements per box of an elementwise evaluation (16 MiB of float32)
CONTRACT_BUDGET = 1 << 25  # elements of a matmul's operands + result (mostly views)

_GELU_C = float(np.sqrt(2.0 / np.pi))


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


_UNARY = {
    "neg": np.negative,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: np.reciprocal(np.sqrt(x)),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "gelu": lambda x: 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x * x * x))),
    "relu": lambda x: np.maximum(x, np.float32(0)),
    "abs": np.abs,
    "silu": lambda x: x * _sigmoid(x),
    "square": np.square,
    "reciprocal": lambda x: np.reciprocal(np.asarray(x, np.float32)),
}
_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
           "max": np.maximum, "min": np.minimum, "pow": np.power}
_COMPARE = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
            "eq": np.equal, "ne": np.not_equal}
_REDUCE = {"add": np.add, "max": np.maximum, "min": np.minimum, "mul": np.multiply}
assert set(_UNARY) == set(ir.UNARY_OPS) and set(_BINARY) == set(ir.BINARY_OPS)
assert set(_REDUCE) == set(ir.REDUCE_OPS)


def _round(x, dtype: str) -> np.ndarray:
    """Round float32 values to `dtype`, keeping float32 storage."""
    x = np.asarray(x, np.float32)
    return x if dtype == "float32" else x.astype(np_dtype(dtype)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# a box of an iteration domain: per-axis [lo, hi) ranges, evaluated with broadcasting


class _Box:
    def __init__(self, names: list[str], ranges: list[tuple[int, int]]):
        self.names = names
        self.ranges = ranges
        self.pos = {n: d for d, n in enumerate(names)}
        self.shape = tuple(hi - lo for lo, hi in ranges)

    def var(self, name: str) -> np.ndarray:
        d = self.pos[name]
        shape = [1] * len(self.names)
        shape[d] = self.shape[d]
        lo, hi = self.ranges[d]
        return np.arange(lo, hi, dtype=np.int64).reshape(shape)

    def affine(self, a: Affine):
        out = a.const
        for v, c in a.terms:
            out = out + c * self.var(v)
        return out

    def sub(self, axes: list[int]) -> "_Box":
        return _Box([self.names[d] for d in axes], [self.ranges[d] for d in axes])


def _strided_view(arr: np.ndarray, index: tuple[Affine, ...], box: _Box):
    """When each index dim is `c*v + k` (c > 0, distinct v) or a constant: (view, axes) with
    `view` a strided view of arr over the box, and axes[d] the box axis of tensor dim d
    (None for constant dims, which keep size 1). Else None."""
    slices, axes = [], []
    for a in index:
        if not a.terms:
            slices.append(slice(a.const, a.const + 1))
            axes.append(None)
            continue
        v, c = a.terms[0]
        if len(a.terms) != 1 or c <= 0 or box.pos[v] in axes:
            return None
        lo, hi = box.ranges[box.pos[v]]
        slices.append(slice(c * lo + a.const, c * (hi - 1) + a.const + 1, c))
        axes.append(box.pos[v])
    return arr[tuple(slices)], axes


def _load(ld: Load, box: _Box, bufs) -> np.ndarray:
    """The loaded values, broadcastable to the box (size-1 dims for axes not used)."""
    arr = bufs[ld.tensor]
    if ld.pad is None:
        fast = _strided_view(arr, ld.index, box)
        if fast is not None:
            view, axes = fast
            used = [d for d in axes if d is not None]
            view = view.reshape([box.shape[d] for d in used]).transpose(np.argsort(used))
            return view.reshape([box.shape[d] if d in used else 1 for d in range(len(box.shape))])
        return arr[tuple(box.affine(a) for a in ld.index)]
    idx = [box.affine(a) for a in ld.index]
    inside = True
    for d, i in enumerate(idx):
        inside = inside & (i >= 0) & (i < arr.shape[d])
    clipped = tuple(np.clip(i, 0, n - 1) for i, n in zip(idx, arr.shape))
    return np.where(inside, arr[clipped], np.float32(ld.pad))


def _eval(e, box: _Box, bufs, memo: dict):
    if e in memo:
        return memo[e]
    if isinstance(e, Const):
        out = np.float32(e.value)
    elif isinstance(e, IndexValue):
        out = np.asarray(box.affine(e.index), np.float32)
    elif isinstance(e, Load):
        out = _load(e, box, bufs)
    elif isinstance(e, Unary):
        out = _UNARY[e.op](_eval(e.a, box, bufs, memo))
    elif isinstance(e, Binary):
        out = _BINARY[e.op](_eval(e.a, box, bufs, memo), _eval(e.b, box, bufs, memo))
    elif isinstance(e, Compare):
        out = _COMPARE[e.op](_eval(e.a, box, bufs, memo), _eval(e.b, box, bufs, memo))
        out = out.astype(np.float32)
    elif isinstance(e, Select):
        out = np.where(_eval(e.cond, box, bufs, memo) != 0, _eval(e.a, box, bufs, memo),
                       _eval(e.b, box, bufs, memo))
    elif isinstance(e, Cast):
        out = _round(_eval(e.a, box, bufs, memo), e.dtype)
    else:
        raise TypeError(f"not an expression: {e!r}")
    out = np.asarray(out, np.float32) if not isinstance(out, np.float32) else out
    memo[e] = out
    return out


def _store(buf: np.ndarray, index: tuple[Affine, ...], box: _Box, value, dtype: str) -> None:
    value = _round(np.broadcast_to(value, box.shape), dtype)
    fast = _strided_view(buf, index, box)
    if fast is not None:
        view, axes = fast
        used = [d for d in axes if d is not None]
        if sorted(used) == list(range(len(box.shape))):
            view[...] = value.transpose(used).reshape(view.shape)
            return
    idx = np.broadcast_arrays(*(np.broadcast_to(box.affine(a), box.shape) for a in index))
    buf[tuple(idx)] = value


# ---------------------------------------------------------------------------------------
# sum-of-products reductions as matmuls


def _factors(e) -> list:
    if isinstance(e, Binary) and e.op == "mul":
        return _factors(e.a) + _factors(e.b)
    return [e]


def _contraction_plan(stage: Stage):
    """For `+= f1 * f2 * ...` whose factors split into two groups over different axes:
    [(factors, axis names), (factors, axis names)] plus constant factors; else None."""
    if stage.reduce != "add" or not stage.reduce_axes:
        return None
    consts, groups = [], []
    for f in sorted(_factors(stage.value), key=lambda f: -len(ir.expr_vars(f))):
        vs = ir.expr_vars(f)
        if not vs:
            consts.append(f)
            continue
        for g in groups:
            if vs <= g[1]:
                g[0].append(f)
                break
        else:
            groups.append(([f], vs))
    if len(groups) != 2:
        return None
    return groups, consts


def _group_value(factors, vs, box: _Box, bufs, memo) -> tuple[np.ndarray, list[int]]:
    """The product of a factor group, as an array over just the group's axes (box order)."""
    axes = sorted(box.pos[v] for v in vs)
    val = _eval(factors[0], box, bufs, memo)
    for f in factors[1:]:
        val = val * _eval(f, box, bufs, memo)
    full = [box.shape[d] if d in axes else 1 for d in range(len(box.shape))]
    return np.broadcast_to(val, full).reshape([box.shape[d] for d in axes]), axes


def _contract(plan, box: _Box, nspatial: int, bufs, memo) -> np.ndarray:
    """Sum over the box's reduce axes of the product of the two groups, via np.matmul;
    returns an array broadcastable to the spatial part of the box."""
    (ga, va), (gb, vb) = plan[0]
    a, ax_a = _group_value(ga, va, box, bufs, memo)
    b, ax_b = _group_value(gb, vb, box, bufs, memo)

    def presum(x, axes, other):  # reduce axes only one side has are summed right away
        own = [d for d in axes if d >= nspatial and d not in other]
        if not own:
            return x, axes
        return x.sum(axis=tuple(axes.index(d) for d in own)), [d for d in axes if d not in own]

    a, ax_a = presum(a, ax_a, ax_b)
    b, ax_b = presum(b, ax_b, ax_a)
    batch = [d for d in ax_a if d in ax_b and d < nspatial]
    contract = [d for d in ax_a if d in ax_b and d >= nspatial]
    free_a = [d for d in ax_a if d not in ax_b]
    free_b = [d for d in ax_b if d not in ax_a]
    size = lambda ds: int(np.prod([box.shape[d] for d in ds], dtype=np.int64))
    a = a.transpose([ax_a.index(d) for d in batch + free_a + contract])
    b = b.transpose([ax_b.index(d) for d in batch + contract + free_b])
    out = np.matmul(a.reshape(size(batch), size(free_a), size(contract)),
                    b.reshape(size(batch), size(contract), size(free_b)))
    dims = batch + free_a + free_b
    out = out.reshape([box.shape[d] for d in dims]).transpose(np.argsort(dims))
    shape = [box.shape[d] if d in dims else 1 for d in range(nspatial)]
    out = out.reshape(shape)
    for c in plan[1]:
        out = out * _eval(c, box, bufs, memo)
    return out


# ---------------------------------------------------------------------------------------
# stages


def _split(ranges, cost, budget, order):
    """Cut a box (list of (lo, hi)) into boxes with cost(extents) <= budget, splitting the
    axes in `order` one after another."""
    sizes = [hi - lo for lo, hi in ranges]
    if cost(sizes) <= budget:
        yield ranges
        return
    for d in order:
        lo, hi = ranges[d]
        if hi - lo > 1:
            chunk = hi - lo
            while chunk > 1 and cost(sizes[:d] + [chunk] + sizes[d + 1:]) > budget:
                chunk = (chunk + 1) // 2
            for s in range(lo, hi, chunk):
                yield from _split(ranges[:d] + [(s, min(s + chunk, hi))] + ranges[d + 1:],
                                  cost, budget, order)
            return
    yield ranges


def _run_stage(stage: Stage, bufs, dtype: str) -> None:
    names = [a.name for a in stage.all_axes]
    full = [(0, a.extent) for a in stage.all_axes]
    ns = len(stage.axes)
    spatial = list(range(ns))
    buf = bufs[stage.tensor]
    if stage.reduce is None:
        for ranges in _split(full, lambda s: 2 * np.prod(s, dtype=np.int64), BUDGET, spatial):
            box = _Box(names, ranges)
            _store(buf, stage.index, box, _eval(stage.value, box, bufs, {}), dtype)
        return

    whole = _Box(names[:ns], full[:ns])
    init = (_eval(stage.init, whole, bufs, {}) if stage.init is not None
            else np.float32(ir.REDUCE_IDENTITY[stage.reduce]))
    acc = np.array(np.broadcast_to(init, whole.shape), np.float32)
    ufunc = _REDUCE[stage.reduce]
    plan = _contraction_plan(stage)
    if plan is not None:
        groups = [g[1] for g in plan[0]]
        pos = {n: d for d, n in enumerate(names)}

        def cost(sizes):
            part = [int(np.prod([sizes[pos[v]] for v in vs], dtype=np.int64)) for vs in groups]
            return sum(part) + np.prod(sizes[:ns], dtype=np.int64)
        budget = CONTRACT_BUDGET
    else:
        def cost(sizes):
            return 2 * np.prod(sizes, dtype=np.int64)
        budget = BUDGET

    red = tuple(range(ns, len(names)))
    for ranges in _split(full, cost, budget, list(range(len(names)))):
        box = _Box(names, ranges)
        if plan is not None:
            part = _contract(plan, box, ns, bufs, {})
        else:
            val = np.broadcast_to(_eval(stage.value, box, bufs, {}), box.shape)
            part = ufunc.reduce(val, axis=red) if red else val
        sl = tuple(slice(lo, hi) for lo, hi in ranges[:ns])
        acc[sl] = ufunc(acc[sl], part)
    _store(buf, stage.index, whole, acc, dtype)


def _check_inputs(program: Program, arrays) -> dict[str, np.ndarray]:
    names = ", ".join(t.name for t in program.inputs)
    if len(arrays) != len(program.inputs):
        raise TensorlangError(f"{program.name} takes {len(program.inputs)} input arrays "
                              f"({names}), got {len(arrays)}", program.loc)
    bufs = {}
    for t, a in zip(program.inputs, arrays):
        if not isinstance(a, np.ndarray):
            raise TensorlangError(f"input {t.name} of {program.name} must be a numpy array of "
                                  f"{t.dtype}{list(t.shape)}, got {type(a).__name__}", program.loc)
        if a.shape != t.shape:
            raise TensorlangError(f"input {t.name} of {program.name} has shape {a.shape}; the "
                                  f"program was traced for shape {t.shape}", program.loc)
        allowed = {np_dtype(t.dtype)} | ({np.dtype(np.float64)} if t.dtype == "float32" else set())
        if a.dtype not in allowed:
            raise TensorlangError(
                f"input {t.name} of {program.name} has dtype {a.dtype}; the program was traced "
                f"for {t.dtype} (convert with .astype(tl.dtypes.np_dtype({t.dtype!r})))",
                program.loc)
        bufs[t.name] = a.astype(np.float32)
    return bufs


def reference(program: Program, *arrays: np.ndarray):
    """Run `program` on numpy arrays; returns the output array (a tuple for several outputs),
    each in its tensor's dtype."""
    bufs = _check_inputs(program, arrays)
    for t in program.outputs + program.temps:
        bufs[t.name] = np.zeros(t.shape, np.float32)
    dtypes = {t.name: t.dtype for t in program.outputs + program.temps}
    with np.errstate(all="ignore"):
        for stage in program.stages:
            _run_stage(stage, bufs, dtypes[stage.tensor])
    outs = tuple(bufs[t.name].astype(np_dtype(t.dtype)) for t in program.outputs)
    return outs[0] if len(outs) == 1 else outs


Program.reference = lambda self, *arrays: reference(self, *arrays)
Program.reference.__doc__ = reference.__doc__
