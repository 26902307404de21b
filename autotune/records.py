"""The tuning-records database: measured schedules per (kernel, workload, machine, version).

A `Record` is one measured candidate: which kernel, on which workload (input shapes and
dtypes, see `workload_key`), on which machine, with which tool version; the config the
search chose, the replayable schedule trace it produced and what the simulator measured.

`Records` keeps them in SQLite (stdlib sqlite3, WAL mode, so tuning workers and readers
share one file safely). Every write is one transaction: a killed process leaves the file as
it was before the write or after it, never in between. JSON lines are the exchange format
(`export_jsonl` / `import_jsonl`, `dump_jsonl` / `load_jsonl`); imports are validated in
full before anything is written.
"""
from __future__ import annotations

import json
import math
import os
import re
import sqlite3
from contextlib import closing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tensorlang.ir import TensorlangError


def _tool_version() -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415
        return version("tensorlang")
    except Exception:  # noqa: BLE001  (not installed: running from a checkout)
        return "0.0.0+checkout"


TOOL_VERSION = _tool_version()


@dataclass(frozen=True)
class Record:
    kernel: str
    workload: str
    machine: str
    version: str
    config: dict
    trace: list
    cycles: int
    time_us: float
    roofline_fraction: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


FIELD_TYPES = {"kernel": str, "workload": str, "machine": str, "version": str, "config": dict,
               "trace": list, "cycles": int, "time_us": (int, float),
               "roofline_fraction": (int, float)}
assert set(FIELD_TYPES) == {f.name for f in fields(Record)}


def workload_key(prog) -> str:
    """'name(dtype[shape],...)' of a traced Program's inputs, e.g.
    'matmul(bfloat16[512,256],bfloat16[256,1024])'."""
    args = ",".join(f"{t.dtype}[{','.join(str(d) for d in t.shape)}]" for t in prog.inputs)
    return f"{prog.name}({args})"


_ARG = re.compile(r"([A-Za-z0-9_]+)\[([0-9,]*)\]")


def parse_workload(key: str) -> tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]:
    """Inverse of workload_key: (name, ((dtype, shape), ...))."""
    m = re.fullmatch(r"([^()]*)\((.*)\)", key)
    if not m:
        raise TensorlangError(f"workload {key!r} is not of the form name(dtype[shape],...)")
    args = tuple((d, tuple(int(x) for x in s.split(",") if x))
                 for d, s in _ARG.findall(m.group(2)))
    return m.group(1), args


def shape_distance(a: str, b: str) -> float | None:
    """Sum of |log2| shape ratios between two workloads; None when not comparable
    (different dtypes, number of inputs or ranks)."""
    try:
        (_, xa), (_, xb) = parse_workload(a), parse_workload(b)
    except TensorlangError:
        return None
    if len(xa) != len(xb):
        return None
    d = 0.0
    for (da, sa), (db, sb) in zip(xa, xb):
        if da != db or len(sa) != len(sb):
            return None
        d += sum(abs(math.log2(max(p, 1) / max(q, 1))) for p, q in zip(sa, sb))
    return d


def validate(obj, where: str) -> Record:
    """A Record from a parsed JSON object, or one TensorlangError naming `where`."""
    if not isinstance(obj, dict):
        raise TensorlangError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in FIELD_TYPES if k not in obj]
    if missing:
        raise TensorlangError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = sorted(set(obj) - set(FIELD_TYPES))
    if extra:
        raise TensorlangError(f"{where}: unknown field(s) {', '.join(extra)}; fields are "
                              f"{', '.join(FIELD_TYPES)}")
    for k, ty in FIELD_TYPES.items():
        v = obj[k]
        if isinstance(v, bool) or not isinstance(v, ty):
            want = ty.__name__ if isinstance(ty, type) else "number"
            raise TensorlangError(f"{where}: field {k!r} must be a {want}, got {v!r}")
    if obj["cycles"] < 0 or not math.isfinite(obj["time_us"]) or obj["time_us"] < 0:
        raise TensorlangError(f"{where}: cycles/time_us must be >= 0 (cycles={obj['cycles']!r}, "
                              f"time_us={obj['time_us']!r})")
    if not (0.0 <= obj["roofline_fraction"] <= 1.5):
        raise TensorlangError(f"{where}: roofline_fraction {obj['roofline_fraction']!r} "
                              "outside 0..1.5")
    for i, step in enumerate(obj["trace"]):
        if not isinstance(step, dict) or not isinstance(step.get("op"), str):
            raise TensorlangError(f"{where}: trace step {i} is not a schedule step "
                                  f"{{'op': ..., 'args': [...]}}: {step!r}")
    try:
        parse_workload(obj["workload"])
    except TensorlangError as e:
        raise TensorlangError(f"{where}: {e}") from None
    return Record(**{**obj, "time_us": float(obj["time_us"]),
                     "roofline_fraction": float(obj["roofline_fraction"])})


def load_jsonl(path) -> list[Record]:
    """All records of a JSON-lines file, validated; blank lines are skipped. Raises one
    TensorlangError naming the file and line of the first bad line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TensorlangError(f"cannot read records file {str(path)!r}: {e.strerror}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TensorlangError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        out.append(validate(obj, where))
    return out


def dump_jsonl(records, path) -> None:
    """Write records as JSON lines (atomically: a temp file renamed over `path`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(r.to_json() + "\n")
    os.replace(tmp, path)


def default_path() -> Path:
    env = os.environ.get("TENSORLANG_RECORDS")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "tensorlang" / "records.db"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    kernel TEXT NOT NULL, workload TEXT NOT NULL, machine TEXT NOT NULL, version TEXT NOT NULL,
    config TEXT NOT NULL, trace TEXT NOT NULL,
    cycles INTEGER NOT NULL, time_us REAL NOT NULL, roofline_fraction REAL NOT NULL,
    UNIQUE (kernel, workload, machine, version, config, trace)
);
CREATE INDEX IF NOT EXISTS records_key ON records (kernel, machine, workload, cycles);
"""
_COLS = ("kernel", "workload", "machine", "version", "config", "trace", "cycles", "time_us",
         "roofline_fraction")


def _row(r: Record) -> tuple:
    return (r.kernel, r.workload, r.machine, r.version, json.dumps(r.config, sort_keys=True),
            json.dumps(r.trace, sort_keys=True), int(r.cycles), float(r.time_us),
            float(r.roofline_fraction))


def _record(row) -> Record:
    k, w, m, v, c, t, cy, us, rf = row
    return Record(k, w, m, v, json.loads(c), json.loads(t), int(cy), float(us), float(rf))


class Records:
    """Tuning records in one SQLite file. Identical records (same kernel, workload, machine,
    version, config and trace) are stored once, so re-importing a file is harmless."""

    def __init__(self, path=None):
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise TensorlangError(f"records database {str(self.path)!r}: {e}") from None

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def __repr__(self) -> str:
        return f"Records({str(self.path)!r})"

    # -- writing -----------------------------------------------------------------------------
    def add(self, record: Record) -> None:
        self.add_many([record])

    def add_many(self, records) -> int:
        """Insert records in one transaction; returns how many were new."""
        rows = [_row(r) for r in records]
        with closing(self._connect()) as db, db:
            before = db.total_changes
            db.executemany(f"INSERT OR IGNORE INTO records ({', '.join(_COLS)}) "
                           f"VALUES ({', '.join('?' * len(_COLS))})", rows)
            return db.total_changes - before

    def import_jsonl(self, path) -> int:
        """Validate the whole file, then insert it in one transaction; returns the number of
        new records. A malformed file raises one TensorlangError and changes nothing."""
        return self.add_many(load_jsonl(path))

    # -- reading -----------------------------------------------------------------------------
    def _query(self, where: str, params: tuple, tail: str = "") -> list[Record]:
        sql = f"SELECT {', '.join(_COLS)} FROM records"
        if where:
            sql += " WHERE " + where
        sql += " ORDER BY cycles, id" + tail
        with closing(self._connect()) as db:
            return [_record(r) for r in db.execute(sql, params)]

    def best(self, kernel: str, workload: str, machine: str) -> Record | None:
        """The fastest record for this kernel, workload and machine (any tool version)."""
        got = self._query("kernel = ? AND workload = ? AND machine = ?",
                          (kernel, workload, machine), " LIMIT 1")
        return got[0] if got else None

    def all(self, kernel: str | None = None, machine: str | None = None) -> list[Record]:
        """All records (optionally of one kernel / machine), fastest first."""
        conds, params = [], []
        for col, val in (("kernel", kernel), ("machine", machine)):
            if val is not None:
                conds.append(f"{col} = ?")
                params.append(val)
        return self._query(" AND ".join(conds), tuple(params))

    def nearest(self, kernel: str, workload: str, machine: str, n: int = 3) -> list[Record]:
        """The best record of each of the `n` workloads of this kernel and machine whose input
        shapes are closest to `workload` (log-ratio distance; same dtypes and ranks only),
        nearest first. The workload itself, when recorded, comes first."""
        with closing(self._connect()) as db:
            rows = db.execute(
                f"SELECT {', '.join(_COLS)}, MIN(cycles) FROM records "
                "WHERE kernel = ? AND machine = ? GROUP BY workload",
                (kernel, machine)).fetchall()
        scored = []
        for row in rows:
            d = shape_distance(workload, row[1])
            if d is not None:
                scored.append((d, row[1], _record(row[:len(_COLS)])))
        scored.sort(key=lambda x: (x[0], x[1]))
        return [r for _, _, r in scored[:n]]

    def export_jsonl(self, path, kernel: str | None = None, machine: str | None = None) -> int:
        recs = self.all(kernel, machine)
        dump_jsonl(recs, path)
        return len(recs)

    def __len__(self) -> int:
        with closing(self._connect()) as db:
            return db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
