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

# build may refuse only for capacity (every other rule is checked by the step itself)
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


@settings(max_examples=int(os.environ.get("TENSORLANG_SCHEDULE_EXAMPLES", 400)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_legal_schedules_keep_values(data):
    name = data.draw(st.sampled_from(sorted(KERNELS)), label="kernel")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    prog, inputs, ref = case(name, dtype)
    s = prog.schedule()
    log = apply_random(s, Draw(data), data.draw(st.integers(1, 10), label="steps"))
    check_schedule(s, prog, inputs, ref, dtype, log)


def test_default_schedules_run_every_example():
    for name in sorted(KERNELS):
        for dtype in DTYPES:
            prog, inputs, ref = case(name, dtype)
            check_values(prog, prog.schedule().build("trn2"), inputs, ref, dtype,
                         what="default schedule")


# ---------------------------------------------------------------------------------------
# illegal steps: one test per refusal, checking the message names stage, loop, value, rule

matmul = load_example("matmul").matmul
softmax = load_example("softmax").softmax


def mm(m=256, k=64, n=1024, dtype="bfloat16"):
    return matmul.trace(tl.spec((m, k), dtype), tl.spec((k, n), dtype)).schedule()


def refused(fn, *needles):
    with pytest.raises(TensorlangError) as e:
        fn()
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in message: {msg}"
    return msg


def test_refuse_partition_wider_than_partitions():
    s = mm()
    i, _ = s.axes("C")
    refused(lambda: s.partition(i), "'i'", "'C'", "256", "128 partitions")


def test_refuse_partition_of_reduction():
    s = mm()
    (k,) = s.reduce_axes("C")
    refused(lambda: s.partition(k), "'k'", "'C'", "reduction")


def test_refuse_vectorize_beyond_free_size():
    s = softmax.trace(tl.spec((128, 70000), "float32")).schedule()
    (j,) = s.reduce_axes("mx")
    refused(lambda: s.vectorize(j), "mx.j", "70000", "65536", "free elements")


def test_refuse_vectorize_beyond_matmul_n():
    s = mm()
    (k,) = s.reduce_axes("C")
    s.tensorize(k)
    refused(lambda: s.vectorize(s.axes("C")[1]), "C.j", "1024", "512", "matmul N")


def test_refuse_tensorize_of_non_contraction():
    s = softmax.trace(tl.spec((64, 32), "float32")).schedule()
    (j,) = s.reduce_axes("mx")
    refused(lambda: s.tensorize(j), "mx.j", "'mx'", "not a contraction", "softmax.py")


def test_refuse_tensorize_wider_than_array():
    s = mm(k=256)
    (k,) = s.reduce_axes("C")
    refused(lambda: s.tensorize(k), "C.k", "256", "128 rows")


def test_refuse_tensorize_with_both_operands_on_partition():
    bmm = load_example("bmm").bmm
    s = bmm.trace(tl.spec((2, 16, 8)), tl.spec((2, 8, 16))).schedule()
    b = s.axes("C")[0]
    s.partition(b)
    (k,) = s.reduce_axes("C")
    refused(lambda: s.tensorize(k), "'C'", "'A'", "'B'", "partition loop 'b'", "[K, M] x [K, N]")


@pytest.mark.parametrize("factor, rule", [(0, "integer >= 1"), (-3, "integer >= 1"),
                                          (2.5, "integer >= 1"), (257, "1..256")])
def test_refuse_bad_split_factor(factor, rule):
    s = mm()
    i, _ = s.axes("C")
    refused(lambda: s.split(i, factor), "C.i", str(factor), rule)


def test_refuse_reorder_across_stages_and_unknown_loops():
    s = softmax.trace(tl.spec((64, 32), "float32")).schedule()
    (i,) = s.axes("mx")
    _, j = s.axes("Y")
    refused(lambda: s.reorder(i, j), "'j_2'", "stage 'Y'", "not 'mx'", "one stage")
    refused(lambda: s.reorder(j, tl.LoopVar("zz", "Y")), "stage 'Y'", "no loop 'zz'", "i, j_2")


def test_refuse_reorder_that_runs_a_tail_inner_loop_outside_its_outer():
    s = mm(m=200)
    io, ii = s.split(s.axes("C")[0], 64)
    refused(lambda: s.reorder(ii, io), "'C'", "'ii'", "'io'", "tail of 8", "by 64")


def test_refuse_vectorize_of_tail_outer_loop():
    s = mm(m=200)
    io, ii = s.split(s.axes("C")[0], 64)
    refused(lambda: s.vectorize(io), "'C'", "'io'", "tail of 8")


def test_refuse_fuse_of_non_adjacent_loops():
    s = mm()
    io, ii = s.split(s.axes("C")[0], 64)
    j = s.axes("C")[2]
    refused(lambda: s.fuse(io, j), "C.io", "j", "adjacent", "io, ii, j, k")


def test_refuse_fuse_of_spatial_and_reduction():
    s = mm()
    _, j = s.axes("C")
    (k,) = s.reduce_axes("C")
    refused(lambda: s.fuse(j, k), "C.j", "k", "spatial loop with a reduction loop")


def test_refuse_compute_at_a_non_consumer():
    s = scaled_softmax.trace(tl.spec((8, 16)), tl.spec((16,))).schedule()
    (i,) = s.axes("total")
    refused(lambda: s.compute_at("T", i), "'T'", "total.i", "does not read 'T'", "consumers (E)")


def test_refuse_compute_at_with_a_reader_left_outside():
    s = softmax.trace(tl.spec((64, 32), "float32")).schedule()
    i, _ = s.axes("Y")
    refused(lambda: s.compute_at("mx", i), "'mx'", "Y.i", "'total' also reads 'mx'",
            "compute 'total' at 'Y' first")
    s.compute_at("total", i)
    s.compute_at("mx", i)  # now legal: every reader of mx is computed inside Y


def test_refuse_compute_at_of_an_output():
    mlp = load_example("mlp").gelu_linear
    s = mlp.trace(tl.spec((8, 16)), tl.spec((16, 8)), tl.spec((8,))).schedule()
    refused(lambda: s.compute_inline("Y"), "'Y'", "output")


def test_refuse_pipeline_depth():
    s = mm()
    io, _ = s.split(s.axes("C")[0], 128)
    refused(lambda: s.pipeline(io, 0), "C.io", "depth 0", "1..8")
    refused(lambda: s.pipeline(io, 9), "C.io", "depth 9", "1..8")


def test_refuse_cache_read_beyond_sbuf_capacity():
    s = mm(m=128, k=16384, n=512, dtype="float32")
    i, _ = s.axes("C")
    s.cache_read("B", "sbuf", i)
    refused(lambda: s.build("trn2"), "cache_read of 'B' at C.i", "SBUF overflow on trn2",
            "256.0 KiB per partition", "224 KiB per partition", "28 MiB")


def test_refuse_psum_accumulators_beyond_banks():
    s = mm(m=256, k=128, n=8192)
    i, j = s.axes("C")
    (k,) = s.reduce_axes("C")
    io, ii = s.split(i, 128)
    jo, ji = s.split(j, 512)
    s.reorder(io, jo, ii, ji)
    s.partition(ii)
    s.vectorize(ji)
    s.tensorize(k)
    s.cache_write("C", "psum", at=io)
    refused(lambda: s.build("trn2"), "'C'", "16 PSUM accumulator tiles", "jo", "16 banks",
            "trn2 has 8")


def test_refuse_cache_write_inside_the_reduction():
    s = mm()
    (k,) = s.reduce_axes("C")
    refused(lambda: s.cache_write("C", "psum", at=k), "'C'", "'k'", "inside the reduction loop")


def test_refused_step_leaves_schedule_unchanged():
    s = mm(m=200)
    i, j = s.axes("C")
    before, trace = s.state, s.trace()
    with pytest.raises(TensorlangError):
        s.tile(i, j, 64, 0)  # the second split fails after the first succeeded
    assert s.state == before and s.trace() == trace


# ---------------------------------------------------------------------------------------
# refused at the step, not at build: a tensorized stage computed at a consumer takes the
# consumer's tile layout, so the matmul operand rule is checked against that layout by
# whichever step completes the conflict (compute_at, or the consumer's partition/vectorize)

def mlp_sched(split_i=True):
    mlp = load_example("mlp").gelu_linear
    prog = mlp.trace(tl.spec((24, 48), "bfloat16"), tl.spec((48, 40), "bfloat16"),
                     tl.spec((40,), "bfloat16"))
    s = prog.schedule()
    i, j = s.axes("Y")
    (k,) = s.reduce_axes("H")
    io, ii = s.split(i, 8) if split_i else (None, None)
    return prog, s, (io, ii, j, k)


def test_refuse_compute_at_of_tensorized_stage_into_a_mixed_layout():
    _, s, (io, ii, j, k) = mlp_sched()
    s.partition(ii)
    s.vectorize(io)
    s.tensorize(k)
    before = s.state
    refused(lambda: s.compute_at("H", j), "compute_at", "'H'", "Y.j", "partition 'ii'",
            "operand 'X'", "vectorized loop 'io'", "[K, M] x [K, N]")
    assert s.state == before


def test_refuse_consumer_layout_step_that_breaks_an_attached_matmul():
    _, s, (io, ii, j, k) = mlp_sched()
    s.tensorize(k)
    s.compute_at("H", j)
    s.partition(ii)
    refused(lambda: s.vectorize(io), "vectorize", "'H'", "computed at Y.j", "partition 'ii'",
            "operand 'X'", "vectorized loop 'io'", "[K, M] x [K, N]")


def test_refuse_consumer_step_that_leaves_no_partition_for_an_attached_matmul():
    _, s, (io, ii, j, k) = mlp_sched()
    s.tensorize(k)
    s.compute_at("H", j)
    # i's loops would then index X on both the partitions and the free axis; j hosts H
    refused(lambda: s.vectorize(io), "vectorize", "stage 'Y'", "no loop left to map to the "
            "partitions", "'H' is tensorized", "spatial loops: io, ii, j")


def test_tensorized_stage_at_a_consumer_builds_with_a_completed_layout():
    prog, s, (_, _, j, k) = mlp_sched(split_i=False)
    s.tensorize(k)
    s.compute_at("H", j)
    inputs = [random_array(t.shape, t.dtype, seed=n, scale=0.3) for n, t in enumerate(prog.inputs)]
    check_values(prog, s.build("trn2"), inputs, prog.reference(*inputs), "bfloat16")


# ---------------------------------------------------------------------------------------
# trace / replay


def hand_matmul(prog):
    """The canonical hand-tiled, tensorized, pipelined matmul schedule."""
    s = prog.schedule()
    i, j = s.axes("C")
    (k,) = s.reduce_axes("C")
    io, jo, ii, ji = s.tile(i, j, 128, 512)
    ko, ki = s.split(k, 128)
    s.reorder(io, jo, ko, ii, ji, ki)
    s.partition(ii)
    s.vectorize(ji)
    s.tensorize(ki, "matmul")
    s.cache_read("A", "sbuf", jo)
    s.cache_read("B", "sbuf", ko)
    s.pipeline(ko, 2)
    return s


def fused_softmax(prog):
    """Softmax with the row statistics computed at the output's row loop (no HBM round trip)."""
    s = prog.schedule()
    i, j = s.axes("Y")
    io, ii = s.split(i, 128)
    s.partition(ii)
    s.vectorize(j)
    s.compute_at("total", io)
    s.compute_at("mx", io)
    s.cache_read("X", "sbuf", io)
    s.pipeline(io, 2)
    return s


def test_trace_is_json_and_replays_to_identical_isa():
    prog = matmul.trace(tl.spec((256, 256), "bfloat16"), tl.spec((256, 1024), "bfloat16"))
    s = hand_matmul(prog)
    text = json.dumps(s.trace())
    s2 = tl.Schedule.replay(prog, json.loads(text))
    assert s2.trace() == s.trace()
    assert s2.build("trn2").asm() == s.build("trn2").asm()


def test_replay_refuses_unknown_steps():
    prog = matmul.trace(tl.spec((16, 16)), tl.spec((16, 16)))
    refused(lambda: tl.Schedule.replay(prog, [{"op": "explode"}]), "step 0", "explode",
            "split")


# ---------------------------------------------------------------------------------------
# golden ISA snapshots

GOLDEN_CASES = {
    "matmul_default": lambda: matmul.trace(tl.spec((256, 128), "bfloat16"),
                                           tl.spec((128, 512), "bfloat16")).schedule(),
    "matmul_hand_tensorized": lambda: hand_matmul(
        matmul.trace(tl.spec((256, 256), "bfloat16"), tl.spec((256, 1024), "bfloat16"))),
    "softmax_fused": lambda: fused_softmax(softmax.trace(tl.spec((256, 512), "bfloat16"))),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_asm(name):
    s = GOLDEN_CASES[name]()
    k = s.build("trn2")
    asm = k.asm()
    path = GOLDEN / f"{name}.asm"
    if UPDATE_GOLDEN or not path.exists():
        if not UPDATE_GOLDEN:
            pytest.fail(f"no golden file {path}; run with TENSORLANG_UPDATE_GOLDEN=1 to create it")
        path.parent.mkdir(exist_ok=True)
        path.write_text(asm)
    assert asm == path.read_text(), (f"{name}: ISA differs from {path}; if intended, regenerate "
                                     "with TENSORLANG_UPDATE_GOLDEN=1")
    # and the snapshot computes the right values
    prog = s.prog
    ins = [random_array(t.shape, t.dtype, seed=n) for n, t in enumerate(prog.inputs)]
    check_values(prog, k, ins, prog.reference(*ins), prog.inputs[0].dtype, what="golden")


# ---------------------------------------------------------------------------------------
# instruction-selection regressions (schedules the property test once found)

def test_hoisted_broadcast_is_not_overwritten_by_the_loop_body():
    """b[j] of gelu_linear is loaded once before the loops (a per-feature vector); its tile
    must not share addresses with buffers the loop body writes (unrolled k, tailed splits)."""
    prog, inputs, ref = case("mlp", "float32")
    s = prog.schedule()
    s.split("i", 1, stage="Y")
    s.vectorize("io", stage="Y")
    s.split("i", 24, stage="H")
    s.unroll("k", stage="H")
    s.tile("ii", "j", 19, 32, stage="H")
    s.tile("iii", "ji", 3, 22, stage="H")
    check_values(prog, s.build("trn2"), inputs, ref, "float32")



def test_row_statistic_scaled_into_psum_is_not_left_on_pool():
    """layernorm's mean accumulated in PSUM (cache_write): the 1/N scale of the row sum
    writes PSUM, which the reduce's engine (pool, the SBUF sum) cannot: another engine."""
    prog, inputs, ref = case("layernorm", "float32")
    s = prog.schedule()
    io, ii = s.split(s.axes("mean")[0], 24)
    s.partition(io)
    s.cache_write("mean", "psum")
    check_values(prog, s.build("trn2"), inputs, ref, "float32")


# DMA queue assignment (tensorlang.queues.assign_queues)

def _queue_bytes(body, spec):
    """{queue: (loads, stores)} queue bytes x loop trips of every DMA in `body`."""
    from tensorlang.queues import dma_queue_bytes
    out = {}
    for ins, loops in sim.isa.walk_instrs(body):
        if ins.op == "dma":
            trips = int(np.prod([lp.extent for lp in loops]))
            ld, stv = out.get(ins.engine, (0, 0))
            b = trips * dma_queue_bytes(ins.dst, ins.srcs[0], spec)
            out[ins.engine] = (ld, stv + b) if ins.dst.mem == "hbm" else (ld + b, stv)
    return out


def _tile_loop(load_cols, store_cols, n=32, dtype="bfloat16"):
    """A loop of n [128 x load_cols] loads from HBM and [128 x store_cols] fp32 stores."""
    I, A, AP = sim.isa.Instr, sim.isa.Addr, sim.isa.AP
    ld = I.make("dma", "q0", AP("sbuf", "x", dtype, A(0), ((1, 128), (1, load_cols))),
                [AP("hbm", "X", dtype, A(0, (("r", 128 * load_cols, 0),)),
                    ((load_cols, 128), (1, load_cols)))])
    stv = I.make("dma", "q0", AP("hbm", "Y", "float32", A(0, (("r", 128 * store_cols, 0),)),
                                 ((store_cols, 128), (1, store_cols))),
                 [AP("sbuf", "y", "float32", A(65536), ((1, 128), (1, store_cols)))])
    return (sim.isa.Loop("r", n, (ld, stv)),)


@pytest.mark.parametrize("load_cols, store_cols", [(4096, 1), (512, 512), (4096, 4096),
                                                   (1000, 8)])
def test_assign_queues_keeps_every_queue_of_a_pool_busy(load_cols, store_cols):
    from tensorlang.queues import assign_queues
    spec = sim.machine("trn2")
    body = _tile_loop(load_cols, store_cols)
    out = assign_queues(body, spec)
    per = _queue_bytes(out, spec)
    loads = {q: b[0] for q, b in per.items() if b[0]}
    stores = {q: b[1] for q, b in per.items() if b[1]}
    assert not set(loads) & set(stores)                   # own pools
    assert len(loads) + len(stores) == spec.dma_queues    # every queue used
    # the queues of a pool carry equal bytes to within one piece (whole partition blocks,
    # ceil(blocks / queues) of them) x the loop's trips
    for pool, row in ((loads, 2 * load_cols), (stores, 4 * store_cols)):
        piece = 32 * -(-32 // len(pool)) * 4 * (row + spec.dma_chunk_overhead_bytes)
        assert max(pool.values()) - min(pool.values()) <= piece
    # every element moved exactly once
    dmas = [i for i, _ in sim.isa.walk_instrs(out) if i.op == "dma"]
    assert sum(i.dst.num_elements for i in dmas if i.dst.mem != "hbm") == 128 * load_cols
    assert sum(i.dst.num_elements for i in dmas if i.dst.mem == "hbm") == 128 * store_cols


def test_assign_queues_sizes_pools_without_the_prologue():
    """Loads before the first store (the prologue) take every queue and wait for no store:
    they do not count when the loop's loads and stores split the queues (a large weight
    load up front would otherwise leave the loop's stores one queue)."""
    from tensorlang.queues import assign_queues
    I, A, AP = sim.isa.Instr, sim.isa.Addr, sim.isa.AP
    spec = sim.machine("trn2")
    big = I.make("dma", "q0", AP("sbuf", "w", "bfloat16", A(0), ((1, 128), (1, 32768))),
                 [AP("hbm", "W", "bfloat16", A(0), ((32768, 128), (1, 32768)))])
    out = assign_queues((big,) + _tile_loop(512, 512), spec)
    loop = [x for x in out if isinstance(x, sim.isa.Loop)]
    per = _queue_bytes(tuple(loop), spec)
    stores = {q for q, b in per.items() if b[1]}
    loads = {q for q, b in per.items() if b[0]}
    assert not stores & loads and len(stores) >= spec.dma_queues // 2
    assert {i.engine for i in out if isinstance(i, I)} == {f"q{k}" for k in range(spec.dma_queues)}


def test_assign_queues_cuts_left_over_rows_into_columns():
    # 32 partition blocks over 15 load queues: 2 blocks each and the last 2 blocks cut
    # along the row at 512-byte granules, so every queue carries the same ~1/15 of the tile
    from tensorlang.queues import assign_queues
    spec = sim.machine("trn2")
    out = assign_queues(_tile_loop(4096, 1), spec)
    loads = [i for i, _ in sim.isa.walk_instrs(out) if i.op == "dma" and i.dst.mem == "sbuf"]
    per = {}
    for i in loads:
        per[i.engine] = per.get(i.engine, 0) + i.dst.num_elements
        if i.dst.partitions < 8:                       # a column piece: granule aligned
            assert (i.dst.offset.base % spec.dep_granule_bytes == 0
                    and i.dst.dims[-1][1] * 2 % spec.dep_granule_bytes == 0)
    assert len(per) == 15
    assert max(per.values()) - min(per.values()) <= 8 * 256    # one 8-row granule column


def test_assign_queues_cuts_left_over_blocks_into_block_columns():
    # a [128 x 512] fp32 store per trip (a 2048-byte row: 2 HBM granules) and small loads:
    # the stores' 32 partition blocks leave blocks over on the store pool; cut into columns
    # alone they would make 2 pieces (2 queues doing a block more every trip), so they are
    # cut per block first: the store queues differ by at most one block x half a row
    from tensorlang.queues import assign_queues
    from sim.timing import partition_block
    spec = sim.machine("trn2")
    out = assign_queues(_tile_loop(128, 512), spec)
    stores = {q: b[1] for q, b in _queue_bytes(out, spec).items() if b[1]}
    assert 32 % len(stores)                     # blocks are left over
    cell = partition_block(spec) * (spec.hbm_granule_bytes + spec.dma_chunk_overhead_bytes)
    assert max(stores.values()) - min(stores.values()) <= 32 * cell
    dmas = [i for i, _ in sim.isa.walk_instrs(out) if i.op == "dma" and i.dst.mem == "hbm"]
    assert sum(i.dst.num_elements for i in dmas) == 128 * 512


def test_assign_queues_cuts_stores_into_few_bin_transfers():
    # a [128 x 4096] fp32 store per trip: each transfer costs its queue a few HBM-channel bins
    # at most (no burst claiming the channel ahead of the loads), cut on whole partition blocks
    from tensorlang.queues import STORE_TRANSFER_BINS, assign_queues, dma_queue_bytes
    from sim.timing import partition_block
    spec = sim.machine("trn2")
    out = assign_queues(_tile_loop(4096, 4096), spec)
    stores = [i for i, _ in sim.isa.walk_instrs(out) if i.op == "dma" and i.dst.mem == "hbm"]
    cap = STORE_TRANSFER_BINS * spec.hbm_bin_ns * spec.dma_queue_gbps
    assert len(stores) > spec.dma_queues
    assert all(dma_queue_bytes(i.dst, i.srcs[0], spec) <= cap for i in stores)
    assert sum(i.dst.num_elements for i in stores) == 128 * 4096
    blk = partition_block(spec)
    assert all(i.srcs[0].part % blk == 0 for i in stores)


def test_assign_queues_epilogue_stores_use_every_queue():
    # a loop of loads and stores, then a peeled last iteration (top level): its store comes
    # after every load, so it is spread over all queues; the loop's stores keep their pool
    from tensorlang.queues import assign_queues
    spec = sim.machine("trn2")
    (loop,) = _tile_loop(512, 512, n=3)
    first_ld = _tile_loop(512, 512)[0].body[0]
    ld, stv = _tile_loop(512, 512)[0].body                 # distinct instructions
    out = assign_queues((first_ld, loop, ld, stv), spec)
    tail = [i for i in out[-spec.dma_queues:] if i.op == "dma"]
    assert all(i.dst.mem == "hbm" for i in tail)
    assert {i.engine for i in tail} == {f"q{k}" for k in range(spec.dma_queues)}
    assert sum(i.dst.num_elements for i in tail) == 128 * 512
    walk = list(sim.isa.walk_instrs(out))
    in_loop = {i.engine for i, loops in walk if loops and i.dst.mem == "hbm"}
    loop_loads = {i.engine for i, loops in walk if loops and i.dst.mem != "hbm"}
    assert in_loop and loop_loads and not in_loop & loop_loads
    first = [i for i in out if isinstance(i, sim.isa.Instr)][:spec.dma_queues]   # prologue
    assert {i.engine for i in first} == {f"q{k}" for k in range(spec.dma_queues)}


def test_assign_queues_sizes_the_store_pool_by_its_busiest_queue(monkeypatch):
    # [128 x 1536] bf16 loads, [128 x 64] fp32 stores: the byte share rounds to one store
    # queue, which then carries the most; the share rounded up (2) leaves the busiest queue
    # less to do, so the pools are 14 + 2, with or without the POOL_MIN_GAIN margin (which
    # only a pool above the rounded-up share needs)
    from tensorlang import queues
    spec = sim.machine("trn2")
    body = _tile_loop(1536, 64)

    def busiest(out):
        return max(sum(b) for b in _queue_bytes(out, spec).values())

    def stores(out):
        return {q for q, b in _queue_bytes(out, spec).items() if b[1]}
    chosen, gain = queues.assign_queues(body, spec), queues.POOL_MIN_GAIN
    monkeypatch.setattr(queues, "POOL_MIN_GAIN", 1.0)         # the byte share only
    share = queues.assign_queues(body, spec)
    assert len(stores(share)) == 2 and len(stores(chosen)) == 2
    assert busiest(chosen) == busiest(share)
    total = sum(sum(b) for b in _queue_bytes(chosen, spec).values())
    assert busiest(chosen) < total / spec.dma_queues * (1 + gain)
