"""The tuning-records database: keys, best/nearest queries, JSON-lines round trip, refusals."""
import json
import sqlite3

import pytest

import tensorlang as tl
from autotune.records import (Record, Records, dump_jsonl, load_jsonl, parse_workload,
                              workload_key)
from tensorlang.ir import TensorlangError

from dsl_kernels import matmul  # tests/ is on sys.path under pytest


def mm_key(m, k, n, dtype="bfloat16"):
    return f"matmul({dtype}[{m},{k}],{dtype}[{k},{n}])"


def rec(workload=None, cycles=100, kernel="matmul", machine="trn2", tile=128, version="0.1.0"):
    return Record(kernel=kernel, workload=workload or mm_key(512, 256, 1024), machine=machine,
                  version=version, config={"tile": tile},
                  trace=[{"op": "split", "stage": "C", "args": ["i", tile], "loops": [0]}],
                  cycles=cycles, time_us=cycles / 1400.0, roofline_fraction=0.5)


@pytest.fixture
def db(tmp_path):
    return Records(tmp_path / "records.db")


def test_workload_key_of_a_traced_program():
    prog = matmul.trace(tl.spec((512, 256), "bfloat16"), tl.spec((256, 1024), "bfloat16"))
    assert workload_key(prog) == "matmul(bfloat16[512,256],bfloat16[256,1024])"
    assert parse_workload(workload_key(prog)) == (
        "matmul", (("bfloat16", (512, 256)), ("bfloat16", (256, 1024))))


def test_default_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORLANG_RECORDS", str(tmp_path / "sub" / "r.db"))
    r = Records()
    assert r.path == tmp_path / "sub" / "r.db" and r.path.exists()
    with sqlite3.connect(r.path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_best_and_all(db):
    db.add(rec(cycles=300, tile=32))
    db.add(rec(cycles=100, tile=128))
    db.add(rec(cycles=200, tile=64))
    db.add(rec(cycles=50, machine="trn1"))
    db.add(rec(cycles=10, workload=mm_key(128, 128, 128)))
    best = db.best("matmul", mm_key(512, 256, 1024), "trn2")
    assert best.cycles == 100 and best.config == {"tile": 128}
    assert best.trace[0]["args"] == ["i", 128]
    assert db.best("matmul", mm_key(512, 256, 1024), "trn3") is None
    assert [r.cycles for r in db.all(kernel="matmul", machine="trn2")] == [10, 100, 200, 300]
    assert len(db.all()) == 5 and len(db.all(machine="trn1")) == 1


def test_identical_records_are_stored_once(db):
    assert db.add_many([rec(), rec()]) == 1
    db.add(rec())
    assert len(db) == 1


def test_nearest_orders_by_shape_distance(db):
    for (m, k, n), cyc in {(512, 256, 1024): 5, (1024, 256, 1024): 7, (4096, 4096, 4096): 9,
                           (512, 256, 2048): 6}.items():
        db.add(rec(workload=mm_key(m, k, n), cycles=cyc))
        db.add(rec(workload=mm_key(m, k, n), cycles=cyc * 10, tile=64))
    db.add(rec(workload=mm_key(512, 256, 1024, "float32"), cycles=1))  # other dtype: not near
    db.add(rec(workload=mm_key(512, 256, 1024), kernel="other", cycles=1))
    near = db.nearest("matmul", mm_key(600, 256, 1024), "trn2", n=3)
    assert [r.workload for r in near] == [mm_key(512, 256, 1024), mm_key(1024, 256, 1024),
                                          mm_key(512, 256, 2048)]
    assert all(r.config == {"tile": 128} for r in near)  # the best record of each workload
    assert db.nearest("matmul", mm_key(600, 256, 1024), "trn1") == []


def test_jsonl_round_trip(db, tmp_path):
    recs = [rec(cycles=c, tile=t) for c, t in ((30, 32), (10, 128), (20, 64))]
    db.add_many(recs)
    assert db.export_jsonl(tmp_path / "out.jsonl") == 3
    back = load_jsonl(tmp_path / "out.jsonl")
    assert sorted(back, key=lambda r: r.cycles) == sorted(recs, key=lambda r: r.cycles)
    other = Records(tmp_path / "other.db")
    assert other.import_jsonl(tmp_path / "out.jsonl") == 3
    assert other.import_jsonl(tmp_path / "out.jsonl") == 0  # re-import changes nothing
    assert other.best("matmul", mm_key(512, 256, 1024), "trn2") == recs[1]
    dump_jsonl(recs, tmp_path / "again.jsonl")
    assert load_jsonl(tmp_path / "again.jsonl") == recs


@pytest.mark.parametrize("bad, pattern", [
    ("{not json", r"bad\.jsonl:3: not valid JSON"),
    ('[1, 2]', r"bad\.jsonl:3: expected a JSON object"),
    ("MISSING", r"bad\.jsonl:3: missing field\(s\) cycles"),
    ("EXTRA", r"bad\.jsonl:3: unknown field\(s\) colour"),
    ("CYCLES", r"bad\.jsonl:3: field 'cycles' must be a int, got '12'"),
    ("WORKLOAD", r"bad\.jsonl:3: workload 'matmul' is not of the form"),
    ("TRACE", r"bad\.jsonl:3: trace step 0 is not a schedule step"),
])
def test_malformed_import_names_the_line_and_changes_nothing(db, tmp_path, bad, pattern):
    good = json.loads(rec().to_json())
    fixes = {"MISSING": {k: v for k, v in good.items() if k != "cycles"},
             "EXTRA": {**good, "colour": "red"}, "CYCLES": {**good, "cycles": "12"},
             "WORKLOAD": {**good, "workload": "matmul"}, "TRACE": {**good, "trace": [3]}}
    line = json.dumps(fixes[bad]) if bad in fixes else bad
    path = tmp_path / "bad.jsonl"
    path.write_text(rec(cycles=1).to_json() + "\n\n" + line + "\n" + rec(cycles=2).to_json() + "\n")
    with pytest.raises(TensorlangError, match=pattern):
        db.import_jsonl(path)
    assert len(db) == 0  # nothing half-applied
    with pytest.raises(TensorlangError, match=pattern):
        load_jsonl(path)


def test_missing_file_and_corrupt_database(tmp_path):
    with pytest.raises(TensorlangError, match="cannot read records file .*nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(TensorlangError, match="records database .*junk.db"):
        Records(tmp_path / "junk.db")
