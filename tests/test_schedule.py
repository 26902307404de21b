"""The scheduling language: random legal schedules keep values, illegal steps are refused with
a clear message, traces replay, and a few canonical schedules lower to golden ISA text.

Golden snapshots live in tests/golden/*.asm and are compared exactly. After an intended
change to lowering, regenerate them with

    TENSORLANG_UPDATE_GOLDEN=1 python -m pytest -q tests/test_schedule.py -k golden

and review the diff like any other code change.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim
import tensorlang as tl
from tensorlang.dtypes import assert_close, random_array
from tensorlang.ir import TensorlangError

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN = os.environ.get("TENSORLANG_UPDATE_GOLDEN") == "1"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"tl_example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@tl.kernel
def scaled_softmax(X, b):
    """Elementwise intermediates (for compute_inline / compute_at) feeding reductions."""
    M, N = X.shape
    T = tl.tensor((M, N), "float32")
    E = tl.tensor((M, N), "float32")
    total = tl.tensor((M,), "float32")
    Y = tl.tensor((M, N), X.dtype)
    for i, j in tl.grid(M, N):
        T[i, j] = X[i, j] * 0.5 + b[j]
    for i, j in tl.grid(M, N):
        E[i, j] = tl.exp(T[i, j])
    for i in tl.grid(M):
        total[i] = 0.0
        for j in tl.reduce(N):
            total[i] += E[i, j]
    for i, j in tl.grid(M, N):
        Y[i, j] = E[i, j] / total[i]
    return Y


# ---------------------------------------------------------------------------------------
# the example kernels at small shapes (one dim > 128 here and there, to exercise tails of
# the partition split)

KERNELS = {
    "matmul": ("matmul", "matmul", lambda dt: [((136, 48), dt), ((48, 80), dt)], {}),
    "bmm": ("bmm", "bmm", lambda dt: [((2, 24, 40), dt), ((2, 40, 36), dt)], {}),
    "conv2d": ("conv2d", "conv2d", lambda dt: [((1, 4, 7, 7), dt), ((6, 4, 3, 3), dt)],
               {"padding": 1}),
    "softmax": ("softmax", "softmax", lambda dt: [((40, 72), dt)], {}),
    "layernorm": ("layernorm", "layernorm",
                  lambda dt: [((24, 64), dt), ((64,), dt), ((64,), dt)], {}),
    "rmsnorm": ("rmsnorm", "rmsnorm", lambda dt: [((136, 40), dt), ((40,), dt)], {}),
    "attention": ("attention", "attention", lambda dt: [((2, 16, 8), dt)] * 3, {"causal": True}),
    "mlp": ("mlp", "gelu_linear", lambda dt: [((24, 48), dt), ((48, 40), dt), ((40,), dt)], {}),
    "scaled_softmax": (None, scaled_softmax, lambda dt: [((20, 36), dt), ((36,), dt)], {}),
}
DTYPES = ("float32", "bfloat16")



@functools.lru_cache(maxsize=None)
def case(name: str, dtype: str):
    """(program, inputs, reference outputs) for one example kernel at its small shape."""
    module, fn, shapes, kwargs = KERNELS[name]
    kern = getattr(load_example(module), fn) if module else fn
    shapes = shapes(dtype)
    prog = kern.trace(*[tl.spec(s, d) for s, d in shapes], **kwargs)
    scale = 0.3 if name in ("mlp", "matmul", "bmm") else 1.0
    inputs = tuple(random_array(s, d, seed=n, scale=scale) for n, (s, d) in enumerate(shapes))
    return prog, inputs, prog.reference(*inputs)


def check_values(prog, kernel, inputs, ref, dtype, what="run vs reference"):
    out = kernel.run(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for t, o, r in zip(prog.outputs, outs, refs):
        assert_close(o, r, dtype, t.dtype, what=f"{prog.name} {what} ({t.name})")


# ---------------------------------------------------------------------------------------
# random schedule steps, drawn from the schedule's current loops

CAPACITY = re.compile(r"overflow|PSUM tile|banks|per bank|needs .* SBUF")


class Draw:
    """What a step generator needs from a source of choices (hypothesis or random)."""

    def __init__(self, data):
        self.data = data

    def choice(self, seq):
        return self.data.draw(st.sampled_from(list(seq)))

    def int(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def draw_step(s: tl.Schedule, draw) -> tuple[str, list, dict] | None:
    """One random schedule step (op, args, kwargs) over `s`'s current stages and loops."""
    live = [ss for ss in s.state.stages if not ss.inline]
    ss = draw.choice(live)
    name = ss.stage
    loops = s.loops(name)
    op = draw.choice(["split", "split", "split", "reorder", "fuse", "partition", "vectorize",
                      "vectorize", "unroll", "tensorize", "pipeline", "cache_read",
                      "cache_write", "compute_at", "compute_inline", "tile"])
    if op == "split":
        lp = draw.choice(loops)
        n = ss.var(str(lp)).extent
        kind = draw.choice(["divisor", "any", "any", "p128"])
        f = (draw.choice(divisors(n)) if kind == "divisor" else
             min(n, 128) if kind == "p128" else draw.int(1, n))
        return op, [lp, f], {}
    if op == "tile":
        sp = s.axes(name)
        if len(sp) < 2:
            return None
        a, b = sp[-2], sp[-1]
        return op, [a, b, draw.int(1, ss.var(str(a)).extent), draw.int(1, ss.var(str(b)).extent)], {}
    if op == "reorder":
        n = draw.int(2, max(2, len(loops)))
        perm = list(loops)
        chosen = [perm[draw.int(0, len(perm) - 1)] for _ in range(n)]
        chosen = list(dict.fromkeys(chosen))
        if len(chosen) < 2:
            chosen = list(reversed(loops))
        return op, chosen, {}
    if op == "fuse":
        if len(loops) < 2:
            return None
        i = draw.int(0, len(loops) - 2)
        return op, [loops[i], loops[i + 1]], {}
    if op in ("partition", "vectorize", "unroll"):
        return op, [draw.choice(loops)], {}
    if op == "tensorize":
        red = s.reduce_axes(name)
        if not red:
            return None
        return op, [draw.choice(red), "matmul"], {}
    if op == "pipeline":
        return op, [draw.choice(loops), draw.int(1, 3)], {}
    if op == "cache_read":
        reads = sorted({ld.tensor for ld in s.prog.stage(name).reads()})
        if not reads:
            return None
        return op, [draw.choice(reads), "sbuf", draw.choice(loops)], {}
    if op == "cache_write":
        at = draw.choice([None] + list(loops))
        return op, [name, draw.choice(["sbuf", "psum"])], {"at": at}
    if op == "compute_at":
        # mostly a producer of something this stage reads, at one of its non-tile loops
        reads = {ld.tensor for ld in s.prog.stage(name).reads()}
        prods = [p for p in live if s.prog.stage(p.stage).tensor in reads] or \
            [p for p in live if p.stage != name]
        outer = [lp for lp in loops if str(lp) not in ss.tile_vars()] or loops
        if not prods:
            return None
        return op, [draw.choice(prods).stage, draw.choice(outer)], {}
    if op == "compute_inline":
        return op, [draw.choice(live).stage], {}
    raise AssertionError(op)


def apply_random(s: tl.Schedule, draw, nsteps: int) -> list:
    """Apply nsteps random steps; refused ones (TensorlangError) must leave s unchanged."""
    log = []
    for _ in range(nsteps):
        step = draw_step(s, draw)
        if step is None:
            continue
        op, args, kwargs = step
        before_state, before_trace = s.state, s.trace()
        try:
            getattr(s, op)(*args, **kwargs)
            log.append((op, [str(a) for a in args], kwargs, "ok"))
        except TensorlangError as e:
            log.append((op, [str(a) for a in args], kwargs, f"refused: {str(e).splitlines()[0]}"))
            assert s.state == before_state, f"refused {op} changed the schedule"
            assert s.trace() == before_trace, f"refused {op} changed the trace"
    return log


def check_schedule(s: tl.Schedule, prog, inputs, ref, dtype, log):
    """Build (a capacity error is the only acceptable refusal), run, compare, replay."""
    steps = "\n".join(f"  {op}({', '.join(map(repr, a))}{', ' + repr(k) if k else ''}) -> {r}"
                      for op, a, k, r in log)
    try:
        k = s.build("trn2")
    except TensorlangError as e:
        if CAPACITY.search(str(e)):
            return "capacity"
        raise AssertionError(f"build refused a schedule the primitives accepted:\n{s}\n"
                             f"steps:\n{steps}\nerror: {e}") from e
    try:
        check_values(prog, k, inputs, ref, dtype)
    except AssertionError as e:
        raise AssertionError(f"{e}\nschedule:\n{s}\nsteps:\n{steps}") from None
    trace = json.loads(json.dumps(s.trace()))
    k2 = tl.Schedule.replay(prog, trace).build("trn2")
    assert k2.asm() == k.asm(), f"replayed trace lowers differently:\n{steps}"
    return "ok"


@settings(max_examples=int(os.environ.get("TENSORLANG_SCHEDULE_EXAMPLES", 300)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_legal_schedules_keep_values(data):
    name = data.draw(st.sampled_from(sorted(KERNELS)), label="kernel")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    prog, inputs, ref = case(name, dtype)
    s = prog.schedule()
    log = apply_random(s, Draw(data), data.draw(st.integers(1, 10), label="steps"))
    check_schedule(s, prog, inputs, ref, dtype, log)
