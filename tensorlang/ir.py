"""The tensorlang IR: small immutable dataclasses.

A traced kernel is a `Program`: input/output/temporary tensors and an ordered tuple of
`Stage`s. A stage is one store statement of the algorithm,

    tensor[index(axes)] = value(axes, reduce_axes)                 (reduce is None)
    tensor[index(axes)] = init  <reduce>=  value  over reduce_axes   (reduce in REDUCE_OPS)

evaluated over its whole iteration domain before the next stage starts (TE/Halide
semantics: the algorithm says *what*; the order of evaluation is the schedule's business).
Index expressions are affine forms of loop variables (`Affine`); value expressions are
trees of `Expr` nodes. Everything here is hashable and immutable; scheduling and lowering
build new objects instead of mutating these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Union

# ---------------------------------------------------------------------------------------
# dtypes

DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3", "float8_e5m2", "int32")
DTYPE_ALIASES = {"float8": "float8_e4m3", "fp32": "float32", "bf16": "bfloat16",
                 "fp16": "float16", "fp8": "float8_e4m3", "f32": "float32"}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3": 1, "float8_e5m2": 1,
            "int32": 4}

UNARY_OPS = ("neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "gelu", "relu", "abs",
             "silu", "square", "reciprocal")
BINARY_OPS = ("add", "sub", "mul", "div", "max", "min", "pow")
COMPARE_OPS = ("lt", "le", "gt", "ge", "eq", "ne")
REDUCE_OPS = ("add", "max", "min", "mul")
REDUCE_IDENTITY = {"add": 0.0, "max": float("-inf"), "min": float("inf"), "mul": 1.0}


class TensorlangError(ValueError):
    """A user-facing error: one message naming the offending thing, its value and the limit."""

    def __init__(self, message: str, loc: "Loc | None" = None):
        self.loc = loc
        super().__init__(f"{message}\n  at {loc}" if loc is not None else message)


def canonical_dtype(dtype) -> str:
    """Normalise a dtype given as a string (or numpy dtype) to one of DTYPES."""
    name = getattr(dtype, "name", None) or str(dtype)
    name = DTYPE_ALIASES.get(name, name)
    if name == "float8_e4m3fn":  # ml_dtypes' name
        name = "float8_e4m3"
    if name not in DTYPES:
        raise TensorlangError(f"unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return name


@dataclass(frozen=True)
class Loc:
    """A DSL source location, carried by stages and expressions for error messages."""
    file: str
    line: int
    text: str = ""

    def __str__(self) -> str:
        s = f"{self.file}:{self.line}"
        return f"{s}: {self.text.strip()}" if self.text else s


# ---------------------------------------------------------------------------------------
# index expressions: affine forms of loop variables


def _merge_terms(a: tuple, b: tuple) -> tuple:
    """The sum of two canonical term tuples (sorted by name, coefficients nonzero) in one
    merge pass, zero sums dropped: the result is canonical too."""
    if not b:
        return a
    if not a:
        return b
    if a[-1][0] < b[0][0]:
        return a + b
    if b[-1][0] < a[0][0]:
        return b + a
    out, i, j, na, nb = [], 0, 0, len(a), len(b)
    while i < na and j < nb:
        va, vb = a[i][0], b[j][0]
        if va == vb:
            c = a[i][1] + b[j][1]
            if c:
                out.append((va, c))
            i += 1
            j += 1
        elif va < vb:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return tuple(out) + a[i:] + b[j:]


@dataclass(frozen=True, init=False)
class Affine:
    """const + sum(coef * var). `terms` is sorted by variable name, coefficients nonzero
    (canonical, so arithmetic merges sorted term tuples and never re-sorts)."""
    terms: tuple[tuple[str, int], ...] = ()
    const: int = 0

    def __init__(self, terms: tuple[tuple[str, int], ...] = (), const: int = 0):
        d = self.__dict__       # frozen, but built on the lowering hot path: no __setattr__
        d["terms"] = terms
        d["const"] = const

    @staticmethod
    def var(name: str) -> "Affine":
        return Affine(((name, 1),), 0)

    @staticmethod
    def constant(c: int) -> "Affine":
        return Affine((), int(c))

    @staticmethod
    def make(coefs: dict[str, int], const: int = 0) -> "Affine":
        return Affine(tuple(sorted((v, int(c)) for v, c in coefs.items() if c != 0)), int(const))

    def coef(self, var: str) -> int:
        for v, c in self.terms:
            if v == var:
                return c
        return 0

    @property
    def vars(self) -> tuple[str, ...]:
        return tuple(v for v, _ in self.terms)

    def __add__(self, other: "Affine | int") -> "Affine":
        if isinstance(other, int):
            return Affine(self.terms, self.const + other)
        return Affine(_merge_terms(self.terms, other.terms), self.const + other.const)

    def scale(self, k: int) -> "Affine":
        if k == 0:
            return Affine((), 0)
        return Affine(tuple((v, c * k) for v, c in self.terms), self.const * k)

    def substitute(self, mapping: dict[str, "Affine"]) -> "Affine":
        """Replace variables by affine forms (used by split/fuse: i -> io*f + ii)."""
        const, d = self.const, {}
        for v, c in self.terms:                   # one sum, sorted once
            m = mapping.get(v)
            if m is None:
                d[v] = d.get(v, 0) + c
                continue
            const += m.const * c
            for u, k in m.terms:
                d[u] = d.get(u, 0) + k * c
        return Affine(tuple(sorted((u, k) for u, k in d.items() if k)), const)

    def bounds(self, extents: dict[str, int]) -> tuple[int, int]:
        """Inclusive (min, max) over 0 <= var < extents[var]."""
        lo = hi = self.const
        for v, c in self.terms:
            span = c * (extents[v] - 1)
            lo += min(0, span)
            hi += max(0, span)
        return lo, hi

    def __str__(self) -> str:
        parts = []
        for v, c in self.terms:
            parts.append(v if c == 1 else f"-{v}" if c == -1 else f"{c}*{v}")
        if self.const or not parts:
            parts.append(str(self.const))
        return " + ".join(parts).replace("+ -", "- ")


# ---------------------------------------------------------------------------------------
# value expressions


@dataclass(frozen=True)
class Const:
    value: float
    dtype: str = "float32"


@dataclass(frozen=True)
class IndexValue:
    """The value of an affine index expression used as data (iota, causal masks)."""
    index: Affine


@dataclass(frozen=True)
class Load:
    tensor: str
    index: tuple[Affine, ...]
    pad: float | None = None  # value read outside the tensor's bounds (None: must be in bounds)
    loc: Loc | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Unary:
    op: str
    a: "Expr"


@dataclass(frozen=True)
class Binary:
    op: str
    a: "Expr"
    b: "Expr"


@dataclass(frozen=True)
class Compare:
    op: str
    a: "Expr"
    b: "Expr"


@dataclass(frozen=True)
class Select:
    cond: "Expr"
    a: "Expr"
    b: "Expr"


@dataclass(frozen=True)
class Cast:
    dtype: str
    a: "Expr"


Expr = Union[Const, IndexValue, Load, Unary, Binary, Compare, Select, Cast]


def children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, (Unary, Cast)):
        return (e.a,)
    if isinstance(e, (Binary, Compare)):
        return (e.a, e.b)
    if isinstance(e, Select):
        return (e.cond, e.a, e.b)
    return ()


def walk(e: Expr) -> Iterator[Expr]:
    """Pre-order traversal of an expression tree."""
    yield e
    for c in children(e):
        yield from walk(c)


def loads(e: Expr) -> list[Load]:
    return [x for x in walk(e) if isinstance(x, Load)]


def expr_vars(e: Expr) -> set[str]:
    """Loop variables an expression depends on."""
    out: set[str] = set()
    for x in walk(e):
        if isinstance(x, Load):
            for a in x.index:
                out.update(a.vars)
        elif isinstance(x, IndexValue):
            out.update(x.index.vars)
    return out


def map_expr(e: Expr, fn) -> Expr:
    """Bottom-up rebuild: fn(node_with_new_children) -> node."""
    if isinstance(e, Unary):
        e = Unary(e.op, map_expr(e.a, fn))
    elif isinstance(e, Cast):
        e = Cast(e.dtype, map_expr(e.a, fn))
    elif isinstance(e, Binary):
        e = Binary(e.op, map_expr(e.a, fn), map_expr(e.b, fn))
    elif isinstance(e, Compare):
        e = Compare(e.op, map_expr(e.a, fn), map_expr(e.b, fn))
    elif isinstance(e, Select):
        e = Select(map_expr(e.cond, fn), map_expr(e.a, fn), map_expr(e.b, fn))
    return fn(e)


def format_expr(e: Expr) -> str:
    if isinstance(e, Const):
        return repr(float(e.value))
    if isinstance(e, IndexValue):
        return f"({e.index})"
    if isinstance(e, Load):
        idx = ", ".join(str(a) for a in e.index)
        return f"{e.tensor}[{idx}]" + (f"{{pad={e.pad}}}" if e.pad is not None else "")
    if isinstance(e, Unary):
        return f"-{format_expr(e.a)}" if e.op == "neg" else f"{e.op}({format_expr(e.a)})"
    if isinstance(e, Binary):
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}.get(e.op)
        if sym:
            return f"({format_expr(e.a)} {sym} {format_expr(e.b)})"
        return f"{e.op}({format_expr(e.a)}, {format_expr(e.b)})"
    if isinstance(e, Compare):
        sym = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}[e.op]
        return f"({format_expr(e.a)} {sym} {format_expr(e.b)})"
    if isinstance(e, Select):
        return f"where({format_expr(e.cond)}, {format_expr(e.a)}, {format_expr(e.b)})"
    if isinstance(e, Cast):
        return f"{e.dtype}({format_expr(e.a)})"
    raise TypeError(f"not an expression: {e!r}")


# ---------------------------------------------------------------------------------------
# stages and programs


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "input" | "output" | "temp"

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Axis:
    name: str
    extent: int
    kind: str = "spatial"  # "spatial" | "reduce"


@dataclass(frozen=True)
class Stage:
    name: str                      # unique within the program (the tensor name, or name.N)
    tensor: str                    # the tensor this stage stores to
    axes: tuple[Axis, ...]         # spatial loops enclosing the store, outermost first
    reduce_axes: tuple[Axis, ...]  # reduction loops (empty when reduce is None)
    index: tuple[Affine, ...]      # store index, affine in the spatial axes
    value: Expr
    reduce: str | None = None      # None or one of REDUCE_OPS
    init: Expr | None = None       # reductions: value before the first update (spatial axes only)
    loc: Loc | None = field(default=None, compare=False)

    @property
    def all_axes(self) -> tuple[Axis, ...]:
        return self.axes + self.reduce_axes

    def extents(self) -> dict[str, int]:
        return {a.name: a.extent for a in self.all_axes}

    def reads(self) -> list[Load]:
        out = loads(self.value)
        if self.init is not None:
            out += loads(self.init)
        return out


@dataclass(frozen=True)
class Program:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    temps: tuple[Tensor, ...]
    stages: tuple[Stage, ...]
    loc: Loc | None = field(default=None, compare=False)

    @property
    def tensors(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.inputs + self.outputs + self.temps}

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise TensorlangError(
            f"no stage named {name!r}; stages are: {', '.join(s.name for s in self.stages)}")

    def producer(self, tensor: str) -> Stage | None:
        for s in self.stages:
            if s.tensor == tensor:
                return s
        return None

    def consumers(self, tensor: str) -> list[Stage]:
        return [s for s in self.stages if any(ld.tensor == tensor for ld in s.reads())]

    def __str__(self) -> str:
        return format_program(self)

    # The methods below are implemented in their own modules and attached there, so this
    # module stays the plain data definition: reference() in tensorlang.reference,
    # schedule() in tensorlang.schedule.


def format_program(p: Program) -> str:
    def decl(t: Tensor) -> str:
        return f"{t.name}: {t.dtype}{list(t.shape)}"

    lines = [f"program {p.name}(" + ", ".join(decl(t) for t in p.inputs) + ")"
             + " -> " + ", ".join(decl(t) for t in p.outputs)]
    for t in p.temps:
        lines.append(f"  temp {decl(t)}")
    for s in p.stages:
        depth = 1
        for a in s.axes:
            lines.append("  " * depth + f"for {a.name} in range({a.extent}):")
            depth += 1
        target = f"{s.tensor}[{', '.join(str(a) for a in s.index)}]"
        if s.reduce is None:
            lines.append("  " * depth + f"{target} = {format_expr(s.value)}")
            continue
        init = format_expr(s.init) if s.init is not None else repr(REDUCE_IDENTITY[s.reduce])
        lines.append("  " * depth + f"{target} = {init}")
        for a in s.reduce_axes:
            lines.append("  " * depth + f"for {a.name} in reduce({a.extent}):")
            depth += 1
        sym = {"add": "+=", "mul": "*="}.get(s.reduce)
        if sym:
            lines.append("  " * depth + f"{target} {sym} {format_expr(s.value)}")
        else:
            lines.append("  " * depth + f"{target} = {s.reduce}({target}, {format_expr(s.value)})")
    return "\n".join(lines)
