"""The functional simulator: `run(program, inputs, spec) -> outputs`, values only, no time.

Memories are numpy arrays: each HBM tensor a flat array in its dtype; SBUF and PSUM
`uint8[partitions, partition_bytes]`, viewed through each access pattern's dtype. Every
static instruction is compiled once into a closure holding its operands' index arrays;
executing the loop tree then only adds each access's dynamic offset. Semantics: see the
sim/isa.py docstring; the scalar functions live in sim/funcs.py.
"""
from __future__ import annotations

import numpy as np

from .funcs import ACT, ALU, NP_DTYPES, REDUCE, round_to
from .isa import AP, Addr, Instr, Loop, Program
from .machine import MachineSpec, SimError, machine
from .validate import validate

_F32 = np.float32


def run(program: Program, inputs: dict, spec: "MachineSpec | str | None" = None) -> dict:
    """Execute `program` on `inputs` ({name: array} for every input tensor); return
    {name: array} for every output tensor, shaped and typed as declared."""
    spec = machine(spec if spec is not None else "trn2")
    validate(program, spec)
    state = _State(program, spec, inputs)
    code = _compile(program.body, state)
    with np.errstate(all="ignore"):
        _exec(code, {})
    return {t.name: state.hbm[t.name].reshape(t.shape).copy()
            for t in program.tensors if t.kind == "output"}


class _State:
    def __init__(self, program: Program, spec: MachineSpec, inputs: dict):
        if not isinstance(inputs, dict):
            raise SimError(f"inputs must be a dict {{tensor name: array}}, got "
                           f"{type(inputs).__name__}")
        decls = {t.name: t for t in program.tensors}
        wanted = [t.name for t in program.tensors if t.kind == "input"]
        missing = [n for n in wanted if n not in inputs]
        extra = [n for n in inputs if n not in wanted]
        if missing:
            raise SimError(f"program {program.name!r}: missing input(s) {', '.join(missing)}; "
                           f"inputs: {', '.join(wanted)}")
        if extra:
            what = {n: decls[n].kind for n in extra if n in decls}
            raise SimError(f"program {program.name!r}: unexpected input(s) "
                           + ", ".join(f"{n} ({what[n]})" if n in what else n for n in extra)
                           + f"; inputs: {', '.join(wanted) or 'none'}")
        self.hbm = {}
        for t in program.tensors:
            dt = NP_DTYPES[t.dtype]
            if t.kind == "input":
                a = np.asarray(inputs[t.name])
                if a.shape != tuple(t.shape):
                    raise SimError(f"input {t.name!r}: shape {a.shape} != declared "
                                   f"{tuple(t.shape)}")
                if a.dtype != dt:
                    raise SimError(f"input {t.name!r}: dtype {a.dtype} != declared {t.dtype} "
                                   f"(convert it first, e.g. a.astype(sim.funcs.NP_DTYPES"
                                   f"[{t.dtype!r}]))")
                self.hbm[t.name] = np.ascontiguousarray(a).reshape(-1).copy()
            else:
                self.hbm[t.name] = np.zeros(int(np.prod(t.shape, dtype=np.int64)), dt)
        self.mem = {"sbuf": np.zeros((spec.partitions, spec.sbuf_partition_bytes), np.uint8),
                    "psum": np.zeros((spec.partitions, spec.psum_partition_bytes), np.uint8)}
        self.views: dict = {}
        self.access_cache: dict = {}

    def view(self, mem: str, dtype: str) -> np.ndarray:
        key = (mem, dtype)
        if key not in self.views:
            self.views[key] = self.mem[mem].view(NP_DTYPES[dtype])
        return self.views[key]

    def access(self, ap: AP) -> "_Access":
        acc = self.access_cache.get(ap)
        if acc is None:
            acc = self.access_cache[ap] = _Access(ap, self)
        return acc


def addr_fn(a: Addr):
    """A closure env -> int evaluating `a` (Addr.eval without the per-call attribute lookups)."""
    base, terms = a.base, a.terms
    if not terms:
        return lambda env: base
    if len(terms) == 1 and not terms[0][2]:
        (var, coef, _), = terms
        return lambda env: base + coef * env[var]

    def f(env):
        v = base
        for var, coef, mod in terms:
            x = env[var]
            v += coef * (x % mod if mod else x)
        return v
    return f


def free_index(dims) -> np.ndarray:
    """Flattened row-major element offsets of the free dims ((stride, size), ...)."""
    idx = np.zeros(1, np.int64)
    for stride, size in dims:
        idx = (idx[:, None] + stride * np.arange(size, dtype=np.int64)).ravel()
    return idx


class _Access:
    """Reads / writes one AP as a [partitions, free] array in its dtype."""

    def __init__(self, ap: AP, st: _State):
        self.shape = (ap.partitions, ap.free_size)
        self.dtype = ap.dtype
        self.off = addr_fn(ap.offset)
        free = free_index(ap.dims[1:])
        P, F = self.shape
        if ap.mem == "hbm":
            self.arr = st.hbm[ap.name]
            self.unit = 1
            idx = (ap.dims[0][0] * np.arange(P, dtype=np.int64))[:, None] + free[None, :]
            self.contig = bool(np.array_equal(idx.ravel(), np.arange(P * F)))
            self.idx = idx
        else:
            self.arr = st.view(ap.mem, ap.dtype)
            self.unit = NP_DTYPES[ap.dtype].itemsize
            self.rows = slice(ap.part, ap.part + P)
            self.contig = bool(np.array_equal(free, np.arange(F)))
            self.idx = free
        self.hbm = ap.mem == "hbm"

    def read(self, env) -> np.ndarray:
        o = self.off(env) // self.unit
        P, F = self.shape
        if self.hbm:
            return self.arr[o:o + P * F].reshape(P, F) if self.contig else self.arr[o + self.idx]
        return self.arr[self.rows, o:o + F] if self.contig else self.arr[self.rows, o + self.idx]

    def write(self, env, values: np.ndarray) -> None:
        o = self.off(env) // self.unit
        P, F = self.shape
        values = values.reshape(P, F)
        if self.hbm:
            if self.contig:
                self.arr[o:o + P * F] = values.ravel()
            else:
                self.arr[o + self.idx] = values
        elif self.contig:
            self.arr[self.rows, o:o + F] = values
        else:
            self.arr[self.rows, o + self.idx] = values

    def read32(self, env) -> np.ndarray:
        return self.read(env).astype(_F32)


# ----------------------------------------------------------------------------------------
# compiling the loop tree


def _compile(nodes, st: _State) -> list:
    out = []
    for n in nodes:
        if isinstance(n, Loop):
            out.append((n.var, n.extent, _compile(n.body, st)))
        else:
            out.append(_BUILD[n.op](n, st))
    return out


def _exec(code: list, env: dict) -> None:
    for item in code:
        if callable(item):
            item(env)
        else:
            var, extent, body = item
            for i in range(extent):
                env[var] = i
                _exec(body, env)


def _storer(dst: _Access, acc, reset_on):
    """fn(env, fp32 result) writing dst, combined with its old value when `acc` applies."""
    dtype = dst.dtype
    if acc is None:
        return lambda env, r: dst.write(env, round_to(r, dtype))
    combine = ALU[acc]
    reset_on = tuple(reset_on or ())

    def store(env, r):
        if not (reset_on and all(env[v] == 0 for v in reset_on)):
            r = combine(dst.read32(env), r)
        dst.write(env, round_to(r, dtype))
    return store


def _operand(value, srcs: list, st: _State):
    """An immediate or (when "ap") the next [P,1] source; returns fn(env) -> float32."""
    if value == "ap":
        a = st.access(srcs.pop(0))
        return a.read32
    c = _F32(value)
    return lambda env: c


def _b_dma(ins: Instr, st: _State):
    src, dst = st.access(ins.srcs[0]), st.access(ins.dst)
    return lambda env: dst.write(env, src.read(env).ravel())


def _b_matmul(ins: Instr, st: _State):
    sta, mov = st.access(ins.srcs[0]), st.access(ins.srcs[1])
    store = _storer(st.access(ins.dst), ins.attr("acc"), ins.attr("reset_on"))
    return lambda env: store(env, sta.read32(env).T @ mov.read32(env))


def _b_transpose(ins: Instr, st: _State):
    src = st.access(ins.srcs[0])
    store = _storer(st.access(ins.dst), None, None)
    return lambda env: store(env, src.read32(env).T)


def _b_activation(ins: Instr, st: _State):
    x = st.access(ins.srcs[0])
    rest = list(ins.srcs[1:])
    scale = _operand(ins.attr("scale", 1.0), rest, st)
    bias = _operand(ins.attr("bias", 0.0), rest, st)
    f = ACT[ins.attr("func")]
    rop = ins.attr("reduce_op")
    acc, reset_on = ins.attr("acc"), ins.attr("reset_on")
    store = _storer(st.access(ins.dst), None if rop else acc, reset_on)
    if rop is None:
        return lambda env: store(env, f(x.read32(env) * scale(env) + bias(env)))
    store2 = _storer(st.access(ins.dst2), acc, reset_on)
    red = REDUCE[rop]

    def act(env):
        y = np.asarray(f(x.read32(env) * scale(env) + bias(env)), _F32)
        store(env, y)
        store2(env, red(y, 1).reshape(-1, 1))
    return act


def _b_tensor_tensor(ins: Instr, st: _State):
    a, b = st.access(ins.srcs[0]), st.access(ins.srcs[1])
    f = ALU[ins.attr("op")]
    store = _storer(st.access(ins.dst), ins.attr("acc"), ins.attr("reset_on"))
    return lambda env: store(env, f(a.read32(env), b.read32(env)))


def _b_tensor_scalar(ins: Instr, st: _State):
    x = st.access(ins.srcs[0])
    rest = list(ins.srcs[1:])
    steps = []
    for k in ("0", "1"):
        op = ins.attr("op" + k)
        if op is not None:
            steps.append((ALU[op], _operand(ins.attr("scalar" + k), rest, st),
                          bool(ins.attr("reverse" + k, False))))
    store = _storer(st.access(ins.dst), None, None)

    def ts(env):
        t = x.read32(env)
        for f, s, rev in steps:
            t = f(s(env), t) if rev else f(t, s(env))
        store(env, t)
    return ts


def _b_tensor_reduce(ins: Instr, st: _State):
    src = st.access(ins.srcs[0])
    P, G = ins.dst.partitions, ins.dst.free_size
    R = ins.srcs[0].free_size // G
    red = REDUCE[ins.attr("op")]
    store = _storer(st.access(ins.dst), ins.attr("acc"), ins.attr("reset_on"))
    return lambda env: store(env, red(src.read32(env).reshape(P, G, R), 2))


def _b_tensor_copy(ins: Instr, st: _State):
    src, dst = st.access(ins.srcs[0]), st.access(ins.dst)
    if ins.srcs[0].dtype == ins.dst.dtype:          # same dtype: a bit-exact copy
        return lambda env: dst.write(env, src.read(env))
    store = _storer(dst, None, None)
    return lambda env: store(env, src.read32(env))


def _b_memset(ins: Instr, st: _State):
    dst = st.access(ins.dst)
    vals = round_to(np.full(dst.shape, ins.attr("value"), np.float64), ins.dst.dtype)
    return lambda env: dst.write(env, vals)


def _b_iota(ins: Instr, st: _State):
    dst = st.access(ins.dst)
    base = ins.attr("base", 0)
    base_fn = addr_fn(base) if isinstance(base, Addr) else (lambda env: base)
    fcoefs = ins.attr("fcoefs", ()) or (0,) * len(ins.dst.free_dims)
    free = free_index([(c, size) for c, (_, size) in zip(fcoefs, ins.dst.free_dims)])
    static = (ins.attr("pcoef", 0) * np.arange(ins.dst.partitions, dtype=np.int64))[:, None] \
        + free[None, :]
    dtype = ins.dst.dtype
    return lambda env: dst.write(env, round_to((static + base_fn(env)).astype(np.float64), dtype))


def _b_select(ins: Instr, st: _State):
    p, a, b = (st.access(s) for s in ins.srcs)
    store = _storer(st.access(ins.dst), None, None)
    return lambda env: store(env, np.where(p.read32(env) != 0, a.read32(env), b.read32(env)))


_BUILD = {name[3:]: f for name, f in globals().items() if name.startswith("_b_")}

__all__ = ["run", "addr_fn", "free_index"]
