"""The ISA: loop-structured programs of tile instructions, modelled on nki.isa.

A `Program` is a tree of `Loop`s whose leaves are `Instr`s. Addresses are affine in the
enclosing loop variables (`Addr`), so a 4096^3 matmul is a few dozen static instructions
inside loops, not a million objects; simulators expand the loops.

Memories:
  hbm   named tensors (Program.tensors); an HBM offset counts elements of that tensor.
  sbuf  `partitions` x `sbuf_partition_bytes`; an SBUF offset is a byte address inside
        each partition, the same for every partition of the access.
  psum  `partitions` x `psum_partition_bytes` in `psum_banks` banks; byte addressed.

An access pattern `AP` is (memory, name, dtype, offset, start partition, dims) where
dims = ((stride, size), ...) in elements of `dtype`; dims[0] is the partition dimension
(for sbuf/psum its stride is 1 partition; for hbm it is an element stride). The remaining
dims are the free dimensions, iterated row-major. A stride of 0 broadcasts.

An sbuf/psum offset is an absolute byte address within the partition (not relative to the
buffer); `name` names the Buffer it lies in (Program.buffers), and the validator checks the
access stays inside that buffer when the program declares buffers. Offsets must be aligned
to the dtype size.

Compute instructions take operands with the same partition count and the same number of
free elements (flattened row-major); values are computed in float32 and rounded to the
destination dtype (round-to-nearest-even; ints: rint). Element p of an operand pairs with
element p of the others whatever their first partitions. Ops and attributes are in OPS below;
exact semantics (sim/functional.py implements them, sim/validate.py checks the rules):

  dma            dst <- src: both flattened row-major over all dims (partition dim first),
                 same dtype and element count, any pair of memories; engine q0..q{n-1}.
  matmul         srcs (stationary [K,M], moving [K,N]) in SBUF, same dtype; dst [M,N] fp32 in
                 PSUM, inside one PSUM bank: dst = stationary.T @ moving (fp32 accumulation);
                 K <= pe_rows, M <= pe_cols, N <= matmul_max_n.
  transpose      src [P,F] in SBUF -> dst [F,P] in PSUM (dst dtype = src dtype or fp32).
  activation     srcs (x, [scale [P,1]], [bias [P,1]]): dst = func(x*scale + bias); with
                 reduce_op, dst2 [P,1] = reduce_op over the free elements of that fp32 result.
                 acc/reset_on combine into dst2 when reduce_op is set, else into dst.
  tensor_tensor  dst = op(srcs[0], srcs[1]).
  tensor_scalar  srcs (x, [scalar0 [P,1]], [scalar1 [P,1]]): t = op0(x, s0) (op0(s0, x) if
                 reverse0); dst = op1(t, s1) likewise, when op1 is given.
  tensor_reduce  dst free size G, src free size G*R: reduce each contiguous chunk of R
                 (flattened row-major) with op.
  tensor_copy    dst = src (a cast when dtypes differ).
  memset         dst = value.
  iota           dst[p, f...] = base + pcoef*p + sum(fcoefs[i]*f_i); base an int or an Addr
                 of the loop vars (computed exactly, then rounded to dst dtype).
  select         srcs (pred, on_true, on_false): dst = on_true where pred != 0 else on_false.

`acc`: dst = acc(old dst, result) -- unless `reset_on` is non-empty and all of its loop
vars are 0, in which case dst = result (an empty reset_on never resets).
Vector/scalar/gpsimd operands live in SBUF or PSUM (gpsimd: SBUF only); free sizes are
limited by max_free_elems_sbuf / max_free_elems_psum.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Union

# Addr, AP, Instr and Loop are frozen slotted dataclasses (eq, hash, repr, replace, fields as
# generated) whose __init__ stores each field through its slot descriptor: compilers build
# thousands per candidate, and the generated frozen __init__ (object.__setattr__ per field)
# costs ~2x more. Same signature and defaults, no conversion or checking either way
# (sim.validate checks programs). AP and Instr compare and hash field by field without the
# generated per-class tuples (simulators look instructions up by value); equal exactly when
# the generated __eq__ says so.


def _setters(cls) -> tuple:
    return tuple(getattr(cls, f.name).__set__ for f in fields(cls))

# ----------------------------------------------------------------------------------------
# addresses


@dataclass(frozen=True, slots=True, init=False)
class Addr:
    """base + sum(coef * (var % mod if mod else var)) over enclosing loop variables."""
    base: int = 0
    terms: tuple[tuple[str, int, int], ...] = ()  # (loop var, coef, mod); mod 0 = no modulo

    def __init__(self, base: int = 0, terms: tuple[tuple[str, int, int], ...] = ()):
        b, t = _ADDR_SET
        b(self, base)
        t(self, terms)

    def eval(self, env: dict[str, int]) -> int:
        v = self.base
        for var, coef, mod in self.terms:
            x = env[var]
            v += coef * (x % mod if mod else x)
        return v

    def bounds(self, extents: dict[str, int]) -> tuple[int, int]:
        """Inclusive (min, max) over the loop ranges."""
        lo = hi = self.base
        for var, coef, mod in self.terms:
            top = (min(extents[var], mod) if mod else extents[var]) - 1
            lo += min(0, coef * top)
            hi += max(0, coef * top)
        return lo, hi

    def __add__(self, k: int) -> "Addr":
        return Addr(self.base + k, self.terms)

    def __str__(self) -> str:
        s = str(self.base)
        for var, coef, mod in self.terms:
            x = f"({var}%{mod})" if mod else var
            s += f"+{coef}*{x}" if coef >= 0 else f"-{-coef}*{x}"
        return s


_ADDR_SET = _setters(Addr)


# ----------------------------------------------------------------------------------------
# operands


MEMS = ("hbm", "sbuf", "psum")

# dtype name -> bytes per element (numpy types: sim.funcs.NP_DTYPES)
DTYPE_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3": 1, "float8_e5m2": 1,
              "int32": 4}


@dataclass(frozen=True, slots=True, init=False, eq=False)
class AP:
    mem: str                              # "hbm" | "sbuf" | "psum"
    name: str                             # hbm tensor name, or the sbuf/psum buffer's name
    dtype: str
    offset: Addr                          # hbm: elements; sbuf/psum: bytes within a partition
    dims: tuple[tuple[int, int], ...]     # ((stride, size), ...); dims[0] = partition dim
    part: int = 0                         # sbuf/psum: first partition

    def __init__(self, mem: str, name: str, dtype: str, offset: Addr,
                 dims: tuple[tuple[int, int], ...], part: int = 0):
        m, n, t, o, d, p = _AP_SET
        m(self, mem)
        n(self, name)
        t(self, dtype)
        o(self, offset)
        d(self, dims)
        p(self, part)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self is other or (self.dims == other.dims and self.offset == other.offset
                                 and self.name == other.name and self.part == other.part
                                 and self.mem == other.mem and self.dtype == other.dtype)

    def __hash__(self):
        return hash((self.mem, self.name, self.dtype, self.offset, self.dims, self.part))

    @property
    def partitions(self) -> int:
        return self.dims[0][1]

    @property
    def free_dims(self) -> tuple[tuple[int, int], ...]:
        return self.dims[1:]

    @property
    def free_size(self) -> int:
        n = 1
        for _, size in self.dims[1:]:
            n *= size
        return n

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.dims)

    @property
    def num_elements(self) -> int:
        return self.partitions * self.free_size

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZE[self.dtype]


_AP_SET = _setters(AP)


# ----------------------------------------------------------------------------------------
# instructions

# op -> (engines it may run on, number of source operands (None = variable), attribute names)
# Attribute meanings:
#   acc       None or a REDUCE op: combine the result with dst's old value (matmul: "add")
#   reset_on  loop vars; when all are 0, `acc` is ignored (the first iteration overwrites)
#   func      activation function (see ACT_FUNCS); scale/bias are floats, or "ap" when the
#             per-partition [P,1] operand is given as an extra source (scale first)
#   op, op0, op1  ALU ops (see ALU_OPS); scalar0/scalar1 float or "ap" (extra [P,1] source)
#   reverse0/1  swap operands of op0/op1 (scalar OP x instead of x OP scalar)
#   reduce_op activation only: also reduce the result along the free axis into srcs-named
#             dst2 (see Instr.dst2) with this op
#   value     memset fill value
#   base, pcoef, fcoefs  iota: dst[p, f...] = base(loop vars) + pcoef*p + sum(fcoefs[i]*f_i)
OPS = {
    "dma":           (("q",), 1, ()),
    "matmul":        (("pe",), 2, ("acc", "reset_on")),
    "transpose":     (("pe",), 1, ()),
    "activation":    (("act",), None, ("func", "scale", "bias", "reduce_op", "acc", "reset_on")),
    "tensor_tensor": (("dve", "pool"), 2, ("op", "acc", "reset_on")),
    "tensor_scalar": (("dve", "pool", "act"), None,
                      ("op0", "scalar0", "reverse0", "op1", "scalar1", "reverse1")),
    "tensor_reduce": (("dve", "pool"), 1, ("op", "acc", "reset_on")),
    "tensor_copy":   (("dve", "act", "pool"), 1, ()),
    "memset":        (("dve", "pool"), 0, ("value",)),
    "iota":          (("pool",), 0, ("base", "pcoef", "fcoefs")),
    "select":        (("dve", "pool"), 3, ()),
}

ACT_FUNCS = ("copy", "neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "gelu", "relu",
             "abs", "silu", "square", "reciprocal")
ALU_OPS = ("add", "sub", "mul", "div", "max", "min", "pow",
           "lt", "le", "gt", "ge", "eq", "ne")  # comparisons give 1.0 / 0.0
REDUCE_OPS = ("add", "max", "min", "mul")


@dataclass(frozen=True, slots=True, init=False, eq=False)
class Instr:
    op: str
    engine: str                     # "pe" | "act" | "dve" | "pool" | "q0".."q{dma_queues-1}"
    dst: AP
    srcs: tuple[AP, ...] = ()
    attrs: tuple[tuple[str, object], ...] = ()   # sorted (name, value) pairs; see OPS
    dst2: AP | None = None          # activation reduce output ([P, 1])

    def __init__(self, op: str, engine: str, dst: AP, srcs: tuple[AP, ...] = (),
                 attrs: tuple[tuple[str, object], ...] = (), dst2: AP | None = None):
        o, e, d, s, a, d2 = _INSTR_SET
        o(self, op)
        e(self, engine)
        d(self, dst)
        s(self, srcs)
        a(self, attrs)
        d2(self, dst2)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self is other or (self.dst == other.dst and self.srcs == other.srcs
                                 and self.op == other.op and self.engine == other.engine
                                 and self.attrs == other.attrs and self.dst2 == other.dst2)

    def __hash__(self):
        return hash((self.op, self.engine, self.dst, self.srcs, self.attrs, self.dst2))

    def attr(self, name: str, default=None):
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    @staticmethod
    def make(op: str, engine: str, dst: AP, srcs=(), /, dst2: AP | None = None,
             **attrs) -> "Instr":
        """Instr.make("tensor_tensor", "dve", dst, (a, b), op="add"): attrs by keyword
        (`dst2=` sets the activation reduce output, it is not an attribute)."""
        clean = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                             for k, v in attrs.items() if v is not None))
        return Instr(op, engine, dst, tuple(srcs), clean, dst2)


_INSTR_SET = _setters(Instr)


@dataclass(frozen=True, slots=True, init=False)
class Loop:
    var: str
    extent: int
    body: tuple["Node", ...]

    def __init__(self, var: str, extent: int, body: tuple["Node", ...]):
        v, e, b = _LOOP_SET
        v(self, var)
        e(self, extent)
        b(self, body)


_LOOP_SET = _setters(Loop)


Node = Union[Instr, Loop]


@dataclass(frozen=True)
class TensorDecl:
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "input" | "output" | "scratch"


@dataclass(frozen=True)
class Buffer:
    """An on-chip allocation: `partitions` partitions from `part`, bytes [offset, offset+size)."""
    name: str
    mem: str  # "sbuf" | "psum"
    offset: int
    size: int  # bytes per partition (all slots of a multi-buffered tile)
    part: int = 0
    partitions: int = 128


@dataclass(frozen=True)
class Program:
    name: str
    tensors: tuple[TensorDecl, ...]
    body: tuple[Node, ...]
    buffers: tuple[Buffer, ...] = ()

    def tensor(self, name: str) -> TensorDecl:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


def walk_instrs(nodes, loops=()):
    """Yield (instr, enclosing loops outermost first) in program order, loops not expanded."""
    for n in nodes:
        if isinstance(n, Loop):
            yield from walk_instrs(n.body, loops + (n,))
        else:
            yield n, loops


def dynamic_count(nodes) -> int:
    """Number of instructions executed when the loops are expanded."""
    total = 0
    for n in nodes:
        total += n.extent * dynamic_count(n.body) if isinstance(n, Loop) else 1
    return total
