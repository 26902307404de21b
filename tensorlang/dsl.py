"""The DSL front-end: trace a `@tl.kernel` Python function into an `ir.Program`.

The kernel body runs once, on symbolic values:

* input tensors are `TensorHandle`s named after the kernel's parameters;
* iterating `tl.grid(...)` / `tl.reduce(...)` yields symbolic loop variables exactly once
  (`IndexExpr`: affine forms of loop variables);
* `T[i, j]` gives a `Value` (an `ir.Expr` tree); `T[i, j] = v` records one stage;
  `+=`, `*=`, `-=` and `T[i] = tl.max(T[i], v)` inside a `tl.reduce` loop record a
  reduction, merged with the plain store `T[i] = init` just before the loop.

Everything the tracer can check is checked when the store is recorded, and reported as a
`TensorlangError` carrying the DSL source line. Names come from the source: loop variables
from the `for` targets, tensors from the variable they are assigned to (found with `ast`).
"""
from __future__ import annotations

import ast
import inspect
import linecache
import math
import os
import sys
import textwrap
import threading
from dataclasses import dataclass

import numpy as np

from . import ir
from .ir import (Affine, Axis, Binary, Cast, Compare, Const, IndexValue, Load, Loc, Program,
                 Select, Stage, Tensor, TensorlangError, Unary, canonical_dtype, format_expr)

_INTS = (int, np.integer)
_NUMBERS = (int, float, np.integer, np.floating)
_CONTROL_FLOW = ("data-dependent Python control flow is not supported in a kernel: the truth "
                 "value of {what} is only known when the kernel runs; use tl.where(cond, a, b) "
                 "for values and tl.max/tl.min instead of Python's max/min")

# ---------------------------------------------------------------------------------------
# source locations and names recovered from the kernel's source

_THIS_FILE = os.path.normcase(os.path.abspath(__file__))


def _user_frame():
    """The innermost frame outside this module: the DSL line being traced."""
    f = sys._getframe(1)
    while f is not None and os.path.normcase(os.path.abspath(f.f_code.co_filename)) == _THIS_FILE:
        f = f.f_back
    return f


def _loc(frame=None) -> Loc | None:
    frame = frame or _user_frame()
    if frame is None:
        return None
    file, line = frame.f_code.co_filename, frame.f_lineno
    return Loc(file, line, linecache.getline(file, line).strip())


_SOURCE_INDEX: dict[tuple[str, int], "_SourceIndex | None"] = {}


@dataclass
class _SourceIndex:
    """Line ranges of `for <targets> in <call>` and `<name> = <call>` statements in a file."""
    loops: list[tuple[int, int, list[str] | None]]
    assigns: list[tuple[int, int, str]]

    @staticmethod
    def of(filename: str) -> "_SourceIndex | None":
        lines = linecache.getlines(filename)
        if not lines:
            return None
        key = (filename, hash("".join(lines)))
        if key not in _SOURCE_INDEX:
            try:
                tree = ast.parse("".join(lines))
            except (SyntaxError, ValueError):
                _SOURCE_INDEX[key] = None
                return None
            loops, assigns = [], []
            for node in ast.walk(tree):
                if isinstance(node, (ast.For, ast.comprehension)) and _call_name(node.iter) in (
                        "grid", "reduce"):
                    loops.append((node.iter.lineno, node.iter.end_lineno, _target_names(node.target)))
                elif isinstance(node, (ast.Assign, ast.AnnAssign)) and _call_name(node.value) == "tensor":
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if len(targets) == 1 and isinstance(targets[0], ast.Name):
                        assigns.append((node.value.lineno, node.value.end_lineno, targets[0].id))
            _SOURCE_INDEX[key] = _SourceIndex(loops, assigns)
        return _SOURCE_INDEX[key]

    @staticmethod
    def _innermost(entries, line):
        hits = [e for e in entries if e[0] <= line <= e[1]]
        return min(hits, key=lambda e: e[1] - e[0]) if hits else None

    def loop_targets(self, line: int) -> list[str] | None:
        hit = self._innermost(self.loops, line)
        return hit[2] if hit else None

    def assigned_name(self, line: int) -> str | None:
        hit = self._innermost(self.assigns, line)
        return hit[2] if hit else None


def _call_name(node) -> str | None:
    """`tl.grid(...)` / `grid(...)` -> "grid"."""
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)


def _target_names(target) -> list[str] | None:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Name) for e in target.elts):
        return [e.id for e in target.elts]
    return None


def _check_kernel_source(fn) -> None:
    """Reject statements that break single-trip loop tracing: `break`/`continue` whose
    nearest loop is a tl.grid/tl.reduce loop, `return`/`yield` anywhere inside one."""
    try:
        lines, start = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        file = inspect.getsourcefile(fn) or "<kernel>"
    except (OSError, TypeError, SyntaxError):
        return

    def is_tl_loop(node) -> bool:
        return isinstance(node, ast.For) and _call_name(node.iter) in ("grid", "reduce")

    def visit(node, in_tl: bool, nearest_tl: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            bad = (nearest_tl and isinstance(child, (ast.Break, ast.Continue))
                   or in_tl and isinstance(child, (ast.Return, ast.Yield, ast.YieldFrom)))
            if bad:
                kind = type(child).__name__.lower()
                line = start + child.lineno - 1
                raise TensorlangError(
                    f"`{kind}` inside a tl.grid/tl.reduce loop is not supported in a kernel: the "
                    f"loop body is traced once and describes every iteration",
                    Loc(file, line, linecache.getline(file, line).strip()))
            if isinstance(child, (ast.For, ast.While)):
                tl_loop = is_tl_loop(child)
                visit(child, in_tl or tl_loop, tl_loop)
            else:
                visit(child, in_tl, nearest_tl)

    for top in tree.body:
        visit(top, False, False)


# ---------------------------------------------------------------------------------------
# the tracer: one per kernel trace


@dataclass
class _Loop:
    name: str
    extent: int
    kind: str  # "spatial" | "reduce"
    loc: Loc | None


class _Tracer:
    def __init__(self, name: str):
        self.name = name
        self.loops: list[_Loop] = []          # open loops, outermost first
        self.all_loops: dict[str, _Loop] = {}  # every loop ever opened, by unique name
        self.fallback_names = 0
        self.tensors: dict[str, TensorHandle] = {}
        self.stages: list[Stage] = []

    # -- loops ------------------------------------------------------------------------
    def open_loops(self, kind, extents, names, loc) -> list[_Loop]:
        if kind == "spatial" and any(l.kind == "reduce" for l in self.loops):
            red = next(l for l in self.loops if l.kind == "reduce")
            raise TensorlangError(
                f"tl.grid inside tl.reduce loop {red.name} is not supported: put spatial loops "
                f"outside the reduction loops", loc)
        loops = []
        for name, extent in zip(names, extents):
            loop = _Loop(self.unique_loop_name(name), extent, kind, loc)
            self.all_loops[loop.name] = loop
            loops.append(loop)
        self.loops.extend(loops)
        return loops

    def close_loops(self, loops) -> None:
        n = len(loops)
        if self.loops[-n:] != loops:
            raise TensorlangError("tl.grid/tl.reduce loops closed out of order "
                                  "(break/return inside a kernel loop?)", loops[0].loc)
        del self.loops[-n:]

    def unique_loop_name(self, name: str | None) -> str:
        if not name or name == "_":
            name = f"i{self.fallback_names}"
            self.fallback_names += 1
            while name in self.all_loops:
                name = f"i{self.fallback_names}"
                self.fallback_names += 1
            return name
        base, n = name, 0
        while name in self.all_loops:
            n += 1
            name = f"{base}_{n}"
        return name

    def active(self) -> dict[str, _Loop]:
        return {l.name: l for l in self.loops}

    def check_active(self, vars_, what: str, loc) -> None:
        active = self.active()
        for v in vars_:
            if v not in active:
                loop = self.all_loops.get(v)
                kind = "tl.reduce" if loop and loop.kind == "reduce" else "tl.grid"
                where = f" (opened at line {loop.loc.line})" if loop and loop.loc else ""
                raise TensorlangError(
                    f"loop variable {v} is used outside its {kind} loop{where} in {what}", loc)

    # -- tensors ----------------------------------------------------------------------
    def new_tensor(self, name, shape, dtype, kind, loc, explicit: bool) -> "TensorHandle":
        if name in self.tensors:
            if explicit:
                raise TensorlangError(f"tensor name {name!r} is already used in kernel "
                                      f"{self.name}; pick another name=", loc)
            base, n = name, 0
            while name in self.tensors:
                n += 1
                name = f"{base}_{n}"
        t = TensorHandle(name, shape, dtype, kind, loc)
        self.tensors[name] = t
        return t

    # -- stores -----------------------------------------------------------------------
    def writer(self, tensor: str) -> int | None:
        for n, s in enumerate(self.stages):
            if s.tensor == tensor:
                return n
        return None

    def record_store(self, t: "TensorHandle", index: tuple[Affine, ...], value, loc) -> None:
        if t.kind == "input":
            raise TensorlangError(f"cannot store to input tensor {t.name}: inputs are read-only; "
                                  f"declare an output with tl.tensor(...)", loc)
        target = f"{t.name}[{', '.join(map(str, index))}]"
        expr = _expr(value, loc)
        spatial = tuple(Axis(l.name, l.extent, "spatial") for l in self.loops if l.kind == "spatial")
        reduce_axes = tuple(Axis(l.name, l.extent, "reduce") for l in self.loops if l.kind == "reduce")
        for a in index:
            for v in a.vars:
                if any(r.name == v for r in reduce_axes):
                    raise TensorlangError(
                        f"store {target} is indexed by reduction variable {v}: a reduction's "
                        f"result cannot depend on the variable it reduces over", loc)
        self.check_active(ir.expr_vars(expr), f"the value stored to {target}", loc)
        used = {v for a in index for v in a.vars}
        for ax in spatial:
            if ax.name not in used:
                raise TensorlangError(
                    f"store {target} does not use loop variable {ax.name} (extent {ax.extent}): "
                    f"every iteration of {ax.name} would overwrite the same element; index "
                    f"{t.name} with {ax.name} or make it a tl.reduce loop", loc)
        if not _one_to_one(index, {a.name: a.extent for a in spatial}):
            raise TensorlangError(
                f"store {target} is not one-to-one: different iterations of "
                f"({', '.join(a.name for a in spatial)}) write the same element of {t.name}", loc)

        op, init = None, None
        if reduce_axes:
            op, expr = _match_reduction(t, index, expr, target, reduce_axes, loc)
        previous = self.writer(t.name)
        if previous is not None:
            prev = self.stages[previous]
            later_readers = [s for s in self.stages[previous + 1:]
                             if any(ld.tensor == t.name for ld in s.reads())]
            mergeable = (op is not None and prev.reduce is None and prev.index == index
                         and prev.axes == spatial and not later_readers)
            if not mergeable:
                line = f" at line {prev.loc.line}" if prev.loc else ""
                raise TensorlangError(
                    f"tensor {t.name} is already written by the stage{line}; each tensor is "
                    f"written by exactly one stage (a reduction may follow one init store "
                    f"`{t.name}[...] = init` in the same loops at the same index)", loc)
            init = prev.value
            del self.stages[previous]

        for ld in ir.loads(expr) + (ir.loads(init) if init is not None else []):
            self.check_read(t, index, ld, spatial, loc)
        self.stages.append(Stage(t.name, t.name, spatial, reduce_axes if op else (), index, expr,
                                 op, init, loc))

    def check_read(self, t, index, ld: Load, spatial, loc) -> None:
        read = f"{ld.tensor}[{', '.join(map(str, ld.index))}]"
        if ld.tensor == t.name:
            raise TensorlangError(
                f"stage {t.name} reads {read} while writing {t.name}"
                f"[{', '.join(map(str, index))}]: a stage cannot read the tensor it writes "
                f"(recurrences and scans are not supported); write into a new tensor", loc)
        src = self.tensors.get(ld.tensor)
        if src is None:
            raise TensorlangError(f"{read}: tensor {ld.tensor} does not belong to kernel "
                                  f"{self.name}", loc)
        if src.kind == "input":
            return
        w = self.writer(ld.tensor)
        if w is None:
            raise TensorlangError(f"{read} is read before any stage writes {ld.tensor}", loc)
        writer = self.stages[w]
        shared = [a.name for a in writer.axes if a in spatial]
        for v in shared:
            same_iteration = any(
                wi.vars == (v,) and ri == wi for wi, ri in zip(writer.index, ld.index))
            if not same_iteration:
                line = f" (line {writer.loc.line})" if writer.loc else ""
                raise TensorlangError(
                    f"{read} is read inside loop {v}, which also runs the stage writing "
                    f"{ld.tensor}{line}, but not at the element written in the same iteration of "
                    f"{v} (that stage writes {ld.tensor}[{', '.join(map(str, writer.index))}]): "
                    f"stage-by-stage and interleaved execution would differ; read "
                    f"{ld.tensor} at the index it is written at, or move its stage out of loop {v}",
                    loc)


def _one_to_one(index: tuple[Affine, ...], extents: dict[str, int]) -> bool:
    """Sufficient test that distinct loop points store to distinct elements: repeatedly find
    a dimension whose still-undetermined variables form a mixed-radix number (each |coef|
    exceeds the span of the smaller terms), so it determines them."""
    unknown = {v for a in index for v in a.vars if extents[v] > 1}
    progress = True
    while unknown and progress:
        progress = False
        for a in index:
            terms = sorted((abs(c), v) for v, c in a.terms if v in unknown)
            span = 0
            for c, v in terms:
                if c <= span:
                    break
                span += c * (extents[v] - 1)
            else:
                if terms:
                    unknown -= {v for _, v in terms}
                    progress = True
    return not unknown


def _match_reduction(t, index, expr, target, reduce_axes, loc):
    """`T[idx] = T[idx] <op> v` (either operand order) -> (op, v)."""
    def is_acc(e):
        return isinstance(e, Load) and e.tensor == t.name and e.index == index and e.pad is None
    red = ", ".join(a.name for a in reduce_axes)
    if isinstance(expr, Binary) and expr.op in ("add", "mul", "max", "min", "sub"):
        if is_acc(expr.a):
            if expr.op == "sub":  # T -= v  is  T += -v
                return "add", Unary("neg", expr.b)
            return expr.op, expr.b
        if is_acc(expr.b) and expr.op != "sub":
            return expr.op, expr.a
    raise TensorlangError(
        f"store {target} inside tl.reduce loop {red} must accumulate into {target}: write "
        f"{target} += v, *= v, -= v, or {target} = tl.max({target}, v) / tl.min(...)", loc)


_STATE = threading.local()  # .tracers: the kernels being traced on this thread, innermost last


def _tracers() -> list[_Tracer]:
    if not hasattr(_STATE, "tracers"):
        _STATE.tracers = []
    return _STATE.tracers


def _tracer(what: str) -> _Tracer:
    tracers = _tracers()
    if not tracers:
        raise TensorlangError(f"{what} can only be used inside a @tl.kernel function while it is "
                              f"traced (kernel.trace(...))", _loc())
    return tracers[-1]


# ---------------------------------------------------------------------------------------
# symbolic values


class _Symbolic:
    __slots__ = ()
    __array_ufunc__ = None  # make numpy scalars defer to our reflected operators
    __hash__ = None

    def __bool__(self):
        raise TensorlangError(_CONTROL_FLOW.format(what=f"`{self}`"), _loc())

    def __iter__(self):
        raise TensorlangError(f"`{self}` is symbolic and cannot be iterated or unpacked in a kernel",
                              _loc())

    def __len__(self):
        raise TensorlangError(f"len() of symbolic `{self}` is not available in a kernel", _loc())

    def __float__(self):
        raise TensorlangError(f"`{self}` is symbolic; float() of it is only known when the "
                              f"kernel runs", _loc())

    def __int__(self):
        raise TensorlangError(f"`{self}` is symbolic; int() of it is only known when the "
                              f"kernel runs", _loc())

    def __index__(self):
        raise TensorlangError(
            f"`{self}` is symbolic and cannot be used as a Python int (range(), list indexing, "
            f"shapes): loop bounds must be known when the kernel is traced", _loc())

    # value arithmetic (IndexExpr overrides the affine cases)
    def __add__(self, o): return _binary("add", self, o)
    def __radd__(self, o): return _binary("add", o, self)
    def __sub__(self, o): return _binary("sub", self, o)
    def __rsub__(self, o): return _binary("sub", o, self)
    def __mul__(self, o): return _binary("mul", self, o)
    def __rmul__(self, o): return _binary("mul", o, self)
    def __truediv__(self, o): return _binary("div", self, o)
    def __rtruediv__(self, o): return _binary("div", o, self)
    def __pow__(self, o): return _binary("pow", self, o)
    def __rpow__(self, o): return _binary("pow", o, self)
    def __neg__(self): return Value(Unary("neg", _expr(self)))
    def __pos__(self): return self
    def __abs__(self): return Value(Unary("abs", _expr(self)))
    def __lt__(self, o): return _compare("lt", self, o)
    def __le__(self, o): return _compare("le", self, o)
    def __gt__(self, o): return _compare("gt", self, o)
    def __ge__(self, o): return _compare("ge", self, o)
    def __eq__(self, o): return _compare("eq", self, o)
    def __ne__(self, o): return _compare("ne", self, o)

    def __floordiv__(self, o):
        raise TensorlangError(f"`{self} // {o}`: floor division is not supported in a kernel "
                              f"(non-affine index)", _loc())
    __rfloordiv__ = __floordiv__

    def __mod__(self, o):
        raise TensorlangError(f"`{self} % {o}`: modulo is not supported in a kernel "
                              f"(non-affine index)", _loc())
    __rmod__ = __mod__


class Value(_Symbolic):
    """A symbolic scalar value: an ir.Expr tree, known only when the kernel runs."""
    __slots__ = ("expr",)

    def __init__(self, expr):
        self.expr = expr

    def __repr__(self):
        return f"Value({format_expr(self.expr)})"

    def __str__(self):
        return format_expr(self.expr)


class IndexExpr(_Symbolic):
    """An affine form of loop variables (a loop variable, `i + 1`, `2*h + kh`, ...).
    Used as an index it addresses a tensor; used as a value it becomes ir.IndexValue."""
    __slots__ = ("affine",)

    def __init__(self, affine: Affine):
        self.affine = affine

    def __repr__(self):
        return f"IndexExpr({self.affine})"

    def __str__(self):
        return str(self.affine)

    def __add__(self, o):
        if isinstance(o, _INTS) and not isinstance(o, bool):
            return IndexExpr(self.affine + int(o))
        if isinstance(o, IndexExpr):
            return IndexExpr(self.affine + o.affine)
        return _binary("add", self, o)

    __radd__ = __add__

    def __sub__(self, o):
        if isinstance(o, _INTS) and not isinstance(o, bool):
            return IndexExpr(self.affine + (-int(o)))
        if isinstance(o, IndexExpr):
            return IndexExpr(self.affine + o.affine.scale(-1))
        return _binary("sub", self, o)

    def __rsub__(self, o):
        if isinstance(o, _INTS) and not isinstance(o, bool):
            return IndexExpr(self.affine.scale(-1) + int(o))
        return _binary("sub", o, self)

    def __mul__(self, o):
        if isinstance(o, _INTS) and not isinstance(o, bool):
            return IndexExpr(self.affine.scale(int(o)))
        if isinstance(o, IndexExpr) and not (o.affine.terms and self.affine.terms):
            const, form = (o, self) if not o.affine.terms else (self, o)
            return IndexExpr(form.affine.scale(const.affine.const))
        return _binary("mul", self, o)  # i * j, i * 0.5: a value, not an index

    __rmul__ = __mul__

    def __neg__(self):
        return IndexExpr(self.affine.scale(-1))


def _expr(x, loc=None):
    """Python number / Value / IndexExpr -> ir.Expr."""
    if isinstance(x, Value):
        return x.expr
    if isinstance(x, IndexExpr):
        return IndexValue(x.affine)
    if isinstance(x, _NUMBERS):
        return Const(float(x))
    if isinstance(x, TensorHandle):
        x._used_as_value()
    raise TensorlangError(f"{type(x).__name__} value {x!r} cannot be used in a kernel expression "
                          f"(only numbers, loaded values and loop variables)", loc or _loc())


def _binary(op, a, b) -> Value:
    return Value(Binary(op, _expr(a), _expr(b)))


def _compare(op, a, b) -> Value:
    return Value(Compare(op, _expr(a), _expr(b)))


# ---------------------------------------------------------------------------------------
# tensors


def _affine_index(key, t_name: str, dim: int, loc) -> Affine:
    if isinstance(key, IndexExpr):
        return key.affine
    if isinstance(key, _INTS) and not isinstance(key, bool):
        return Affine.constant(int(key))
    if isinstance(key, Value):
        raise TensorlangError(
            f"non-affine index `{key}` in dimension {dim} of {t_name}: indices must be affine "
            f"in loop variables (c0 + c1*i + c2*j ...); products of loop variables, floats and "
            f"loaded values are not allowed", loc)
    if isinstance(key, (slice, type(Ellipsis))) or key is None:
        raise TensorlangError(f"slices are not supported when indexing {t_name}: index every "
                              f"dimension with a loop variable or an int", loc)
    raise TensorlangError(f"index {key!r} of type {type(key).__name__} in dimension {dim} of "
                          f"{t_name} is not a loop variable or an int", loc)


class TensorHandle:
    """A tensor inside a kernel being traced: input, output or temporary."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, kind: str, loc: Loc | None):
        self.name, self.shape, self.dtype, self.kind, self.loc = name, shape, dtype, kind, loc

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        raise TensorlangError(f"tensor {self.name} cannot be iterated in a kernel; loop with "
                              f"tl.grid(*{self.name}.shape)", _loc())

    def __bool__(self):
        return True

    def _used_as_value(self, *_):
        raise TensorlangError(f"tensor {self.name} used as a value; index it, e.g. {self.name}"
                              f"[{', '.join('i' + str(d) for d in range(len(self.shape)))}]", _loc())

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _used_as_value
    __truediv__ = __rtruediv__ = __pow__ = __rpow__ = __neg__ = __abs__ = _used_as_value
    __array_ufunc__ = None

    def __repr__(self):
        return f"<{self.kind} tensor {self.name}: {self.dtype}{list(self.shape)}>"

    def pad(self, value) -> "PaddedView":
        """A read-only view whose out-of-bounds reads give `value` (zero padding for conv)."""
        if not isinstance(value, _NUMBERS):
            raise TensorlangError(f"pad value of {self.name} must be a Python number, got "
                                  f"{value!r}", _loc())
        return PaddedView(self, float(value))

    def _index(self, key, loc, padded: bool) -> tuple[Affine, ...]:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != len(self.shape):
            raise TensorlangError(f"{self.name} has {len(self.shape)} dimensions (shape "
                                  f"{self.shape}) but is indexed with {len(key)} indices", loc)
        index = tuple(_affine_index(k, self.name, d, loc) for d, k in enumerate(key))
        tracer = _tracer(f"indexing {self.name}")
        text = f"{self.name}[{', '.join(map(str, index))}]"
        tracer.check_active([v for a in index for v in a.vars], text, loc)
        if not padded:
            extents = {v: l.extent for v, l in tracer.active().items()}
            for d, (a, n) in enumerate(zip(index, self.shape)):
                lo, hi = a.bounds(extents)
                if lo < 0 or hi >= n:
                    raise TensorlangError(
                        f"index {a} in dimension {d} of {text} ranges over [{lo}, {hi}], out of "
                        f"bounds for {self.name} of shape {self.shape} (valid 0..{n - 1}); use "
                        f"{self.name}.pad(value)[...] for padded reads", loc)
        return index

    def __getitem__(self, key) -> Value:
        loc = _loc()
        return Value(Load(self.name, self._index(key, loc, False), None, loc))

    def __setitem__(self, key, value) -> None:
        loc = _loc()
        index = self._index(key, loc, False)
        _tracer(f"storing to {self.name}").record_store(self, index, value, loc)


class PaddedView:
    """`T.pad(v)`: reads outside T's bounds return v (ir.Load.pad); read-only."""

    def __init__(self, tensor: TensorHandle, value: float):
        self.tensor, self.value = tensor, value

    @property
    def shape(self):
        return self.tensor.shape

    @property
    def dtype(self):
        return self.tensor.dtype

    def __getitem__(self, key) -> Value:
        loc = _loc()
        return Value(Load(self.tensor.name, self.tensor._index(key, loc, True), self.value, loc))

    def __setitem__(self, key, value):
        raise TensorlangError(f"cannot store through the padded view of {self.tensor.name}; "
                              f"store to {self.tensor.name} itself", _loc())


def _check_shape(shape, what: str, loc) -> tuple[int, ...]:
    if isinstance(shape, _INTS):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TensorlangError(f"shape of {what} must be a tuple of ints, got {shape!r}", loc) from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, _INTS) or d < 1:
            raise TensorlangError(f"shape of {what} must be a tuple of positive ints, got "
                                  f"{shape!r} (dimension {d!r})", loc)
    return tuple(int(d) for d in dims)


def tensor(shape, dtype="float32", name: str | None = None) -> TensorHandle:
    """Declare an output or temporary tensor inside a kernel. Outputs are the tensors the
    kernel returns; the others are temporaries. The name defaults to the assigned variable."""
    frame = _user_frame()
    loc = _loc(frame)
    tracer = _tracer("tl.tensor")
    shape = _check_shape(shape, f"tl.tensor {name or ''}".strip(), loc)
    dtype = _dtype(dtype, loc)
    explicit = name is not None
    if name is None:
        index = _SourceIndex.of(frame.f_code.co_filename) if frame else None
        name = index.assigned_name(frame.f_lineno) if index else None
        name = name or f"t{sum(t.kind != 'input' for t in tracer.tensors.values())}"
    elif not isinstance(name, str) or not name:
        raise TensorlangError(f"tensor name must be a non-empty string, got {name!r}", loc)
    return tracer.new_tensor(name, shape, dtype, "temp", loc, explicit)


def pad(t: TensorHandle, value) -> PaddedView:
    """`tl.pad(T, v)[...]` is `T.pad(v)[...]`: out-of-bounds reads give v."""
    if not isinstance(t, TensorHandle):
        raise TensorlangError(f"tl.pad expects a tensor, got {t!r}", _loc())
    return t.pad(value)


def _dtype(dtype, loc) -> str:
    try:
        return canonical_dtype(dtype)
    except TensorlangError as e:
        raise TensorlangError(str(e), loc) from None


# ---------------------------------------------------------------------------------------
# loops


class _LoopRange:
    def __init__(self, kind: str, extents, frame):
        self.kind = kind
        self.loc = _loc(frame)
        what = "tl.grid" if kind == "spatial" else "tl.reduce"
        if not extents:
            raise TensorlangError(f"{what}() needs at least one extent", self.loc)
        for e in extents:
            if isinstance(e, bool) or not isinstance(e, _INTS) or e < 1:
                raise TensorlangError(f"{what} extent {e!r} must be a positive int known at trace "
                                      f"time (got {type(e).__name__})", self.loc)
        self.extents = tuple(int(e) for e in extents)
        index = _SourceIndex.of(frame.f_code.co_filename) if frame else None
        names = index.loop_targets(frame.f_lineno) if index else None
        if names is not None and len(names) != len(self.extents):
            names = [f"{names[0]}{d}" for d in range(len(self.extents))] if len(names) == 1 else None
        self.names = names or [None] * len(self.extents)

    def __iter__(self):
        tracer = _tracer("tl.grid/tl.reduce")
        loops = tracer.open_loops(self.kind, self.extents, self.names, self.loc)
        vars_ = tuple(IndexExpr(Affine.var(l.name)) for l in loops)
        yield vars_[0] if len(vars_) == 1 else vars_
        tracer.close_loops(loops)


def grid(*extents) -> _LoopRange:
    """`for i, j in tl.grid(M, N):` a nest of spatial (parallel) loops, traced once."""
    return _LoopRange("spatial", extents, _user_frame())


def reduce(*extents) -> _LoopRange:
    """`for k in tl.reduce(K):` reduction loops; stores inside must accumulate."""
    return _LoopRange("reduce", extents, _user_frame())


# ---------------------------------------------------------------------------------------
# kernels


@dataclass(frozen=True)
class Spec:
    """Shape and dtype of a kernel input, given to Kernel.trace."""
    shape: tuple[int, ...]
    dtype: str = "float32"


def spec(shape, dtype="float32") -> Spec:
    loc = _loc()
    return Spec(_check_shape(shape, "tl.spec", loc), _dtype(dtype, loc))


def _as_spec(x, param: str, loc) -> Spec:
    if isinstance(x, Spec):
        return x
    if isinstance(x, np.ndarray):
        try:
            dtype = canonical_dtype(x.dtype)
        except TensorlangError:
            raise TensorlangError(f"input {param}: array dtype {x.dtype} is not supported "
                                  f"(supported: {', '.join(ir.DTYPES)})", loc) from None
        return Spec(_check_shape(x.shape, f"input {param}", loc), dtype)
    raise TensorlangError(f"input {param} must be a tl.spec(shape, dtype) or a numpy array, got "
                          f"{type(x).__name__}", loc)


class Kernel:
    """A `@tl.kernel` function. `trace(*specs, **static)` -> ir.Program.

    Parameters without defaults are input tensors (positional specs or arrays); parameters
    with defaults are static Python values (stride, causal, eps ...), given by keyword."""

    def __init__(self, fn, name: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        self.__doc__ = fn.__doc__
        self.__name__ = self.name
        params = inspect.signature(fn).parameters.values()
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TensorlangError(f"kernel {self.name}: *args/**kwargs parameters are not "
                                      f"supported", self._loc())
        self.tensor_params = [p.name for p in params if p.default is p.empty]
        self.static_params = {p.name: p.default for p in params if p.default is not p.empty}
        self._cache: dict = {}
        self._source_checked = False

    def _loc(self) -> Loc | None:
        code = self.fn.__code__
        return Loc(code.co_filename, code.co_firstlineno,
                   linecache.getline(code.co_filename, code.co_firstlineno).strip())

    def __repr__(self):
        return f"<tl.kernel {self.name}({', '.join(self.tensor_params)})>"

    def trace(self, *inputs, **kwargs) -> Program:
        """Run the kernel body once on symbolic tensors of these specs (or arrays)."""
        try:
            return self._trace(_loc(), inputs, kwargs)
        except TensorlangError as e:
            if e.loc is None and type(e) is TensorlangError:  # raised by the kernel's own code
                e = TensorlangError(e.args[0], _innermost_user_loc(e.__traceback__))
            raise e.with_traceback(None) from None

    def _trace(self, call_loc, inputs, kwargs) -> Program:
        specs = dict(zip(self.tensor_params, inputs))
        static = {}
        for k, v in kwargs.items():
            if k in self.tensor_params and k not in specs:
                specs[k] = v
            elif k in self.static_params:
                static[k] = v
            else:
                raise TensorlangError(f"kernel {self.name} has no parameter {k!r} (inputs: "
                                      f"{', '.join(self.tensor_params)}; static: "
                                      f"{', '.join(self.static_params) or 'none'})", call_loc)
        if len(inputs) > len(self.tensor_params) or len(specs) != len(self.tensor_params):
            hint = (f"; static parameters ({', '.join(self.static_params)}) are passed by keyword"
                    if self.static_params else "")
            raise TensorlangError(
                f"kernel {self.name} takes {len(self.tensor_params)} input tensors "
                f"({', '.join(self.tensor_params)}), got {len(inputs) + len(kwargs) - len(static)}"
                f"{hint}", call_loc)
        if not self._source_checked:
            _check_kernel_source(self.fn)
            self._source_checked = True
        tracer = _Tracer(self.name)
        args = {}
        for p in self.tensor_params:
            s = _as_spec(specs[p], p, call_loc)
            args[p] = tracer.new_tensor(p, s.shape, s.dtype, "input", self._loc(), True)
        _tracers().append(tracer)
        try:
            result = self.fn(**args, **static)
            if tracer.loops:
                raise TensorlangError(f"loop {tracer.loops[-1].name} was not closed when the kernel "
                                      f"returned (return inside a tl.grid loop?)", tracer.loops[-1].loc)
        finally:
            _tracers().pop()
        return self._program(tracer, result)

    def _program(self, tracer: _Tracer, result) -> Program:
        loc = self._loc()
        outs = result if isinstance(result, (tuple, list)) else (result,)
        if result is None or not outs:
            raise TensorlangError(f"kernel {self.name} must return its output tensor(s)", loc)
        names = []
        for o in outs:
            if not isinstance(o, TensorHandle):
                raise TensorlangError(f"kernel {self.name} returned {o!r}; it must return tensors "
                                      f"created with tl.tensor (or a tuple of them)", loc)
            if o.kind == "input":
                raise TensorlangError(f"kernel {self.name} returns its input {o.name}; outputs "
                                      f"must be tensors created with tl.tensor", loc)
            if o.name in names:
                raise TensorlangError(f"kernel {self.name} returns {o.name} twice", loc)
            if tracer.writer(o.name) is None:
                raise TensorlangError(f"output {o.name} is returned but never written", o.loc)
            names.append(o.name)

        def decl(t: TensorHandle, kind: str) -> Tensor:
            return Tensor(t.name, t.shape, t.dtype, kind)

        written = {s.tensor for s in tracer.stages}
        inputs = tuple(decl(tracer.tensors[p], "input") for p in self.tensor_params)
        outputs = tuple(decl(tracer.tensors[n], "output") for n in names)
        temps = tuple(decl(t, "temp") for t in tracer.tensors.values()
                      if t.kind == "temp" and t.name not in names and t.name in written)
        return Program(self.name, inputs, outputs, temps, tuple(tracer.stages), loc)

    def __call__(self, *arrays, **static):
        """Trace for these arrays' shapes/dtypes (cached) and run the numpy reference."""
        from .reference import reference
        key = (tuple((a.shape, str(a.dtype)) if isinstance(a, np.ndarray) else a for a in arrays),
               tuple(sorted(static.items())))
        try:
            prog = self._cache[key]
        except (KeyError, TypeError):
            prog = self.trace(*arrays, **static)
            try:
                self._cache[key] = prog
            except TypeError:
                pass
        return reference(prog, *arrays)


def _innermost_user_loc(tb) -> Loc | None:
    loc = None
    while tb is not None:
        if os.path.normcase(os.path.abspath(tb.tb_frame.f_code.co_filename)) != _THIS_FILE:
            file, line = tb.tb_frame.f_code.co_filename, tb.tb_lineno
            loc = Loc(file, line, linecache.getline(file, line).strip())
        tb = tb.tb_next
    return loc


def kernel(fn=None, *, name: str | None = None):
    """Decorator: `@tl.kernel` or `@tl.kernel(name="...")` -> Kernel."""
    if fn is None:
        return lambda f: Kernel(f, name)
    return Kernel(fn, name)


# ---------------------------------------------------------------------------------------
# elementwise functions (named like numpy; `max`/`min`/`abs` shadow builtins only as tl.*)


def _unary(op):
    def f(x) -> Value:
        return Value(Unary(op, _expr(x)))
    f.__name__ = f.__qualname__ = op
    f.__doc__ = f"tl.{op}(x): elementwise {op}."
    return f


exp, log, sqrt, rsqrt, tanh, sigmoid, gelu, relu, silu, square, reciprocal = (
    _unary(op) for op in ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "gelu", "relu",
                          "silu", "square", "reciprocal"))
abs_ = _unary("abs")
gelu.__doc__ = "tl.gelu(x): GELU, tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))."


def maximum(a, b) -> Value:
    """Elementwise max; `T[i] = tl.max(T[i], v)` in a tl.reduce loop is a max-reduction."""
    return _binary("max", a, b)


def minimum(a, b) -> Value:
    return _binary("min", a, b)


def where(cond, a, b):
    """`cond ? a : b` elementwise (cond: a comparison such as `j <= i` or `x > 0`)."""
    if isinstance(cond, (bool, np.bool_)):
        return a if cond else b
    return Value(Select(_expr(cond), _expr(a), _expr(b)))


def cast(x, dtype) -> Value:
    """Round x to `dtype` (computation stays float32; the value is representable in dtype)."""
    return Value(Cast(_dtype(dtype, _loc()), _expr(x)))


inf = math.inf  # `-tl.inf`: masks and max-reduction inits
