"""The machine layer: presets vs the reference figures, what-if variants, TOML machine files,
`tensorlang machines`, and the hand-written ISA programs in the functional simulator."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

import sim
from sim import examples
from sim.funcs import NP_DTYPES
from sim.machine import TRN1, TRN2, MachineSpec, SimError
from tensorlang import cli

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3


# ---------------------------------------------------------------------------------------
# presets: the figures of shared/reference/neuroncore.md


def test_trn1_matches_reference():
    m = sim.machine("trn1")
    assert m is TRN1 and m.name == "trn1"
    assert (m.pe_rows, m.pe_cols, m.partitions, m.matmul_max_n) == (128, 128, 128, 512)
    assert (m.pe_clock_ghz, m.dve_clock_ghz, m.act_clock_ghz, m.pool_clock_ghz) == \
        (2.8, 1.12, 1.4, 1.4)
    assert m.sbuf_bytes == 24 * MiB and m.sbuf_partition_bytes == 192 * KiB
    assert m.psum_bytes == 2 * MiB and m.psum_partition_bytes == 16 * KiB
    assert m.psum_banks == 8 and m.psum_bank_bytes == 2 * KiB
    assert m.hbm_bytes == 32 * GiB and m.hbm_gbps == 820 / 2       # 820 GB/s over 2 cores
    assert m.dma_queues == 16 and m.dma_queue_gbps == 17.0 and m.dma_fixed_ns == 1300.0
    assert m.dma_gbps == 16 * 17.0                                    # 272 GB/s (DMA guide)
    assert round(m.peak_flops("bfloat16") / 1e12) == 92
    assert round(m.peak_flops("float8_e4m3") / 1e12) == 92
    assert round(m.peak_flops("float32") / 1e12) == 23
    assert (m.vector_tflops_fp32, m.scalar_tflops_fp32) == (2.3, 2.9)
    assert m.dve_pool_share_sbuf and m.dve_act_share_psum             # v2-only port rules
    assert (m.min_ii, m.reciprocal_factor, m.iota_fixed_cycles, m.access_latency_cycles,
            m.dependent_overhead_cycles, m.stride_penalty_bytes) == (64, 8, 150, 60, 100, 16)
    assert (m.max_free_elems_sbuf, m.max_free_elems_psum) == (64 * 1024, 4 * 1024)


def test_trn2_matches_reference():
    m = sim.machine("trn2")
    assert m is TRN2 and sim.machine() is TRN2
    assert (m.pe_clock_ghz, m.dve_clock_ghz, m.act_clock_ghz, m.pool_clock_ghz) == \
        (2.4, 0.96, 1.2, 1.2)
    assert m.sbuf_bytes == 28 * MiB and m.sbuf_partition_bytes == 224 * KiB
    assert m.psum_bytes == 2 * MiB and m.psum_bank_bytes == 2 * KiB
    assert m.hbm_bytes == 96 * GiB and m.hbm_gbps == 2900 / 8      # 2.9 TB/s over 8 cores
    assert m.dma_queues == 16 and m.dma_queue_gbps == 23.0 and m.dma_fixed_ns == 600.0
    assert m.dma_gbps == min(16 * 23.0, 2900 / 8)
    assert round(m.peak_flops("bfloat16") / 1e12) == 79
    assert round(m.peak_flops("float8_e4m3") / 1e12) == 157               # ~158 in the doc
    assert round(m.peak_flops("float32") / 1e12) == 20
    assert (m.vector_tflops_fp32, m.scalar_tflops_fp32) == (1.0, 1.2)
    assert not m.dve_pool_share_sbuf and not m.dve_act_share_psum


def test_unknown_machine():
    with pytest.raises(SimError, match=r"unknown machine 'trn3'; did you mean 'trn2'\?"):
        sim.machine("trn3")
    assert sim.machine(TRN1) is TRN1


# ---------------------------------------------------------------------------------------
# what-if variants


def test_replace_what_ifs():
    half = TRN2.replace(sbuf_bytes=TRN2.sbuf_bytes // 2)
    assert half.sbuf_bytes == 14 * MiB and half.sbuf_partition_bytes == 112 * KiB
    assert half.name == "trn2*" and half.pe_clock_ghz == TRN2.pe_clock_ghz
    assert TRN2.sbuf_bytes == 28 * MiB                                # the preset is untouched
    fast = TRN1.replace(name="wide", dma_queue_gbps=40.0, psum_bytes=4 * MiB)
    assert fast.name == "wide" and fast.dma_gbps == TRN1.hbm_gbps   # capped by the HBM share
    assert fast.psum_partition_bytes == 32 * KiB and fast.psum_bank_bytes == 4 * KiB
    assert hash(fast) == hash(TRN1.replace(name="wide", dma_queue_gbps=40.0,
                                           psum_bytes=4 * MiB))


def test_replace_errors():
    with pytest.raises(SimError, match=r"unknown MachineSpec field 'sbuf_byte'; "
                                       r"did you mean 'sbuf_bytes'\?"):
        TRN2.replace(sbuf_byte=1)
    with pytest.raises(SimError, match=r"sbuf_bytes=1000 must be a positive multiple of 128"):
        TRN2.replace(sbuf_bytes=1000)
    with pytest.raises(SimError, match=r"dma_queues=0 must be positive"):
        TRN2.replace(dma_queues=0)
    with pytest.raises(SimError, match=r"pe_clock_ghz='2' must be a number"):
        TRN2.replace(pe_clock_ghz="2")
    with pytest.raises(SimError, match=r"pe_rows=256 must be <= partitions=128"):
        TRN2.replace(pe_rows=256)
    with pytest.raises(SimError, match=r"pe_rate\['float32'\]=0 must be a positive number"):
        TRN2.replace(pe_rate={"bfloat16": 1.0, "float32": 0})


# ---------------------------------------------------------------------------------------
# TOML machine files


def _write(tmp_path, text, name="chip.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_toml_happy_path(tmp_path):
    path = _write(tmp_path, """
        base = "trn1"
        sbuf_bytes = 12582912          # half of trn1's 24 MiB
        dma_queue_gbps = 34            # an integer is fine for a float field
        dve_pool_share_sbuf = false
        [pe_rate]
        float8_e4m3 = 4.0
        """, "half_sbuf.toml")
    m = sim.machine(path)
    assert isinstance(m, MachineSpec) and m.name == "half_sbuf"
    assert m.sbuf_bytes == 12 * MiB and m.sbuf_partition_bytes == 96 * KiB
    assert m.dma_queue_gbps == 34.0 and isinstance(m.dma_queue_gbps, float)
    assert not m.dve_pool_share_sbuf
    assert m.pe_rate == {**TRN1.pe_rate, "float8_e4m3": 4.0}      # merged into the base's
    assert m.pe_clock_ghz == TRN1.pe_clock_ghz                    # the rest from the base
    assert m.replace(sbuf_bytes=TRN1.sbuf_bytes).sbuf_partition_bytes == TRN1.sbuf_partition_bytes


def test_toml_defaults_to_trn2_and_takes_a_name(tmp_path):
    m = sim.machine(_write(tmp_path, 'name = "big-psum"\npsum_partition_bytes = 32768\n'))
    assert m.name == "big-psum" and m.psum_bytes == 4 * MiB
    assert m.replace(name="trn2", psum_partition_bytes=16 * KiB) == TRN2
    assert sim.machine(_write(tmp_path, "", "empty.toml")).replace(name="trn2") == TRN2


@pytest.mark.parametrize("text,pattern", [
    ("sbuf_bytez = 3\n",
     r"unknown key 'sbuf_bytez' \(= 3\); did you mean 'sbuf_bytes'\?"),
    ('pe_clock_ghz = "fast"\n', r"pe_clock_ghz = 'fast' must be a number"),
    ("dma_queues = 2.5\n", r"dma_queues = 2.5 must be an integer"),
    ("dma_queues = true\n", r"dma_queues = True must be an integer"),
    ("dve_pool_share_sbuf = 1\n", r"dve_pool_share_sbuf = 1 must be true or false"),
    ("hbm_gbps = inf\n", r"hbm_gbps = inf must be a finite number"),
    ("pe_rate = 2\n", r"pe_rate = 2 must be a \[pe_rate\] table"),
    ("[pe_rate]\nbfloat61 = 2.0\n",
     r"pe_rate.bfloat61 = 2.0: unknown dtype 'bfloat61'; did you mean 'bfloat16'\?"),
    ("[pe_rate]\nfloat32 = -1\n", r"pe_rate.float32 = -1 must be a positive number"),
    ("min_ii = -3\n", r"min_ii=-3 must be positive"),
    ("psum_banks = 7\n", r"psum_partition_bytes=16384 must be a multiple of psum_banks=7"),
    ("sbuf_bytes = 1000\n", r"sbuf_bytes=1000 must be a positive multiple of 128 partitions"),
    ("sbuf_bytes = 1048576\nsbuf_partition_bytes = 8192\n",
     r"give either sbuf_bytes = 1048576 or sbuf_partition_bytes = 8192, not both"),
    ('base = "trn3"\n', r"base = 'trn3' is not a preset; did you mean 'trn2'\?"),
    ("min_ii = 64\nmin_ii = = 3\n", r"malformed TOML: .*line 2"),
    ("min_ii = 64\nmin_ii = 32\n", r"malformed TOML"),
])
def test_toml_errors(tmp_path, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(SimError, match=pattern) as e:
        sim.machine(path)
    msg = str(e.value)
    assert msg.startswith(f"machine file {path!r}: ")
    assert "\n" not in msg


def test_toml_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(SimError, match=r"machine file '.*nope.toml': no such file"):
        sim.machine(path)
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(SimError, match=r"machine file '.*dir.toml': is a directory"):
        sim.machine(str(d))


def test_toml_not_utf8(tmp_path):
    p = tmp_path / "bin.toml"
    p.write_bytes(b"name = \"\xff\"\n")
    with pytest.raises(SimError, match=r"not UTF-8"):
        sim.machine(str(p))


def test_toml_machine_drives_the_simulator(tmp_path):
    prog = examples.matmul_program(256, 512, 256, bufs=2)
    slow = sim.machine(_write(tmp_path, "dma_queue_gbps = 2.0\nhbm_gbps = 20.0\n"))
    assert sim.simulate(prog, slow).time_ns > sim.simulate(prog, "trn2").time_ns
    assert sim.simulate(prog, slow).machine == "chip"


# ---------------------------------------------------------------------------------------
# tensorlang machines


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_machines_table():
    rc, out, _ = _cli("machines")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "pe_clock_ghz", "peak_tflops_bf16"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert set(rows) == {"trn1", "trn2"}
    assert rows["trn1"][1:3] == ["2.8", "91.8"] and rows["trn2"][1:3] == ["2.4", "78.6"]


def test_cli_machines_json_with_file(tmp_path):
    path = _write(tmp_path, 'base = "trn1"\nsbuf_bytes = 12582912\n', "half.toml")
    rc, out, _ = _cli("machines", "--json", path)
    assert rc == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["trn1", "trn2", "half"]
    by = {r["name"]: r for r in rows}
    assert by["trn2"]["sbuf_mib"] == 28.0 and by["trn1"]["sbuf_mib"] == 24.0
    assert by["half"]["sbuf_mib"] == 12.0 and by["half"]["pe_clock_ghz"] == 2.8
    assert by["trn2"]["dma_queues"] == 16 and math.isclose(by["trn2"]["dma_gbps"], 362.5)
    assert by["trn2"]["peak_tflops_bf16"] == 78.6 and by["trn2"]["psum_mib"] == 2.0


def test_cli_machines_bad_file(tmp_path):
    path = _write(tmp_path, "dma_queus = 4\n")
    rc, out, err = _cli("machines", path)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1
    assert "unknown key 'dma_queus'" in err and "did you mean 'dma_queues'?" in err
    assert path in err


# ---------------------------------------------------------------------------------------
# the hand-written ISA programs (sim.examples) in the functional simulator


@pytest.mark.parametrize("spec", ["trn1", "trn2"])
@pytest.mark.parametrize("dtype,out_dtype,bufs,tile_n", [
    ("bfloat16", "float32", 1, 512), ("bfloat16", "bfloat16", 2, 256),
    ("float32", "float32", 3, 128)])
def test_matmul_program_equals_numpy(spec, dtype, out_dtype, bufs, tile_n):
    M, N, K = 256, 512, 384
    rng = np.random.default_rng(1)
    A = rng.standard_normal((M, K)).astype(NP_DTYPES[dtype])
    B = rng.standard_normal((K, N)).astype(NP_DTYPES[dtype])
    prog = examples.matmul_program(M, N, K, dtype, bufs=bufs, tile_n=tile_n,
                                   out_dtype=out_dtype, spec=spec)
    C = sim.run(prog, {"A": A, "B": B}, spec)["C"]
    assert C.shape == (M, N) and C.dtype == NP_DTYPES[out_dtype]
    ref = A.astype(np.float64) @ B.astype(np.float64)
    tol = 1e-4 if out_dtype == "float32" else 1e-2
    np.testing.assert_allclose(C.astype(np.float64), ref, rtol=tol, atol=tol * math.sqrt(K))


@pytest.mark.parametrize("dtype,bufs", [("float32", 1), ("float32", 2), ("bfloat16", 2)])
def test_softmax_program_equals_numpy(dtype, bufs):
    M, N = 256, 300
    rng = np.random.default_rng(2)
    X = (3 * rng.standard_normal((M, N))).astype(NP_DTYPES[dtype])
    Y = sim.run(examples.softmax_program(M, N, dtype, bufs=bufs), {"X": X}, "trn2")["Y"]
    x = X.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    ref = e / e.sum(axis=1, keepdims=True)
    tol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(Y.astype(np.float64), ref, rtol=tol, atol=tol * 1e-2)
    np.testing.assert_allclose(Y.astype(np.float64).sum(axis=1), 1.0, rtol=tol * 5)


def test_example_programs_round_trip_through_the_assembler():
    for prog in (examples.matmul_program(256, 512, 256, bufs=2),
                 examples.softmax_program(256, 300, bufs=2)):
        text = sim.disassemble(prog)
        assert sim.assemble(text) == prog
        assert sim.disassemble(sim.assemble(text)) == text


def test_softmax_reduce_output_is_a_write():
    # the exp's fused row-sum (dst2) is written before the reciprocal reads it
    prog = examples.softmax_program(256, 300)
    act = [i for i, _ in sim.walk_instrs(prog.body) if i.op == "activation"]
    assert act[0].dst2 is not None and act[0].attr("dst2") is None
    assert act[1].srcs[0] == act[0].dst2


@pytest.mark.parametrize("spec", [TRN1, TRN2], ids=lambda s: s.name)
def test_each_memory_knob_alone_is_never_slower(spec):
    # complements test_timing's "more bandwidth never slower" (both knobs at once)
    progs = (examples.matmul_program(512, 1024, 512, bufs=2, spec=spec),
             examples.softmax_program(512, 1024, bufs=1, spec=spec))
    better = ({"dma_queue_gbps": 1.5 * spec.dma_queue_gbps}, {"hbm_gbps": 1.5 * spec.hbm_gbps},
              {"dma_fixed_ns": spec.dma_fixed_ns / 2})
    for prog in progs:
        base = sim.simulate(prog, spec).time_ns
        for kw in better:
            assert sim.simulate(prog, spec.replace(**kw)).time_ns <= base, (prog.name, kw)
