"""The autotuner: config spaces, reproducible search, pruning, records, resume, workers
(journal file and a real PostgreSQL server)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import autotune
import tensorlang as tl
from autotune import space as sp
from autotune.records import Records, workload_key
from tensorlang.ir import TensorlangError

from dsl_kernels import matmul  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


def mm(m=128, k=128, n=256):
    return matmul.trace(tl.spec((m, k), "bfloat16"), tl.spec((k, n), "bfloat16"))


def template(s, cfg):
    """A small matmul space: 3 x 3 x 2 x 2 = 36 configs (some overflow PSUM via depth)."""
    i, j = s.axes("C")
    (k,) = s.reduce_axes("C")
    io, ii = s.split(i, cfg.split("tm", 128, min=32, max=128))
    jo, ji = s.split(j, cfg.split("tn", 256, min=64, max=256, pow2=True))
    ko, ki = s.split(k, cfg.choice("tk", [64, 128]))
    s.reorder(io, jo, ko, ii, ji, ki)
    s.partition(ii)
    s.vectorize(ji)
    s.tensorize(ki, "matmul")
    s.pipeline(ko, cfg.choice("depth", [1, 2]))


# ------------------------------------------------------------------------------------------
# spaces


def test_sjt_orders_are_all_permutations_by_adjacent_swaps():
    for n in range(1, 6):
        perms = sp.sjt_orders(n)
        assert len(set(perms)) == len(perms) == [1, 1, 2, 6, 24, 120][n]
        for a, b in zip(perms, perms[1:]):
            diff = [x for x in range(n) if a[x] != b[x]]
            assert len(diff) == 2 and diff[1] == diff[0] + 1


def test_divisor_and_power_of_two_domains():
    assert sp.divisors(96, 8, 48) == [8, 12, 16, 24, 32, 48]
    assert sp.divisors(512, 16, 128, pow2=True) == [16, 32, 64, 128]


def test_enumeration_is_exhaustive_and_fixed_configs_replay():
    prog = mm()
    cfgs = list(sp.enumerate_configs(prog, template))
    assert len(cfgs) == sp.space_size(prog, template) == 3 * 3 * 2 * 2
    assert len({tuple(sorted(c.items())) for c in cfgs}) == len(cfgs)
    c = cfgs[7]
    s, cfg = sp.apply(prog, template, sp.Fixed(c))
    assert cfg.values == c
    again = tl.Schedule.replay(prog, s.trace())
    assert again.trace() == s.trace()
    with pytest.raises(TensorlangError, match=r"parameter 'tm': value 100 is not one of \[32, 64, 128\]"):
        sp.apply(prog, template, sp.Fixed({**c, "tm": 100}))
    # a config from another shape maps onto this space value by value
    _, near = sp.apply(prog, template, sp.Nearest({"tm": 100, "tn": 1024, "depth": 2}))
    assert near.values["tm"] == 128 and near.values["tn"] == 256 and near.values["depth"] == 2


def test_order_parameter_round_trips_through_fixed_configs():
    def tpl(s, cfg):
        i, j = s.axes("C")
        (k,) = s.reduce_axes("C")
        io, ii = s.split(i, 64)
        jo, ji = s.split(j, 128)
        s.reorder(*cfg.order("order", [io, jo]), ii, ji, k)
    prog = mm()
    cfgs = list(sp.enumerate_configs(prog, tpl))
    assert [c["order"] for c in cfgs] == [["io", "jo"], ["jo", "io"]]
    s, _ = sp.apply(prog, tpl, sp.Fixed(cfgs[1]))
    assert [str(x) for x in s.loops("C")][:2] == ["jo", "io"]


# ------------------------------------------------------------------------------------------
# tuning


def test_same_seed_same_result():
    a = autotune.tune(mm(), template, trials=12, seed=3, progress=False, batch=4)
    b = autotune.tune(mm(), template, trials=12, seed=3, progress=False, batch=4)
    assert a.best.config == b.best.config and a.best.cycles == b.best.cycles
    assert [t.config for t in a.trials] == [t.config for t in b.trials]
    # trials counts distinct configs: a repeated proposal is re-asked, not measured again
    assert len(a.trials) == 12 == len({tuple(sorted(t.config.items())) for t in a.trials})
    assert [t.number for t in a.trials] == sorted({t.number for t in a.trials})


def test_tuned_schedule_replays_to_the_measured_cycles_and_right_values():
    prog = mm()
    res = autotune.tune(prog, template, trials=10, seed=0, progress=False)
    k = tl.Schedule.replay(prog, res.best.schedule).build("trn2")
    assert k.simulate().cycles == res.best.cycles
    A = tl.dtypes.random_array((128, 128), "bfloat16", seed=0)
    B = tl.dtypes.random_array((128, 256), "bfloat16", seed=1)
    import numpy as np
    np.testing.assert_allclose(k.run(A, B), prog.reference(A, B), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(128, 128, 256), (256, 64, 128)])
def test_generated_space_never_worse_than_default(shape):
    prog = mm(*shape)
    res = autotune.tune(prog, trials=12, seed=0, progress=False)
    default = prog.schedule().build("trn2").simulate().cycles
    assert res.default.cycles == default
    assert res.best.cycles <= default
    assert any(t.state == "complete" for t in res.trials)


def test_generated_space_for_a_row_reduction():
    @tl.kernel
    def softmax(X):
        M, N = X.shape
        mx = tl.tensor((M,), "float32")
        total = tl.tensor((M,), "float32")
        Y = tl.tensor((M, N), X.dtype)
        for i in tl.grid(M):
            mx[i] = -tl.inf
            for j in tl.reduce(N):
                mx[i] = tl.max(mx[i], X[i, j])
            total[i] = 0.0
            for j in tl.reduce(N):
                total[i] += tl.exp(X[i, j] - mx[i])
            for j in tl.grid(N):
                Y[i, j] = tl.exp(X[i, j] - mx[i]) / total[i]
        return Y
    prog = softmax.trace(tl.spec((256, 256), "bfloat16"))
    res = autotune.tune(prog, trials=8, seed=0, progress=False)
    assert res.best.cycles <= res.default.cycles
    X = tl.dtypes.random_array((256, 256), "bfloat16", seed=0)
    k = tl.Schedule.replay(prog, res.best.schedule).build("trn2")
    import numpy as np
    np.testing.assert_allclose(k.run(X).astype("float32"), prog.reference(X).astype("float32"),
                               rtol=2e-2, atol=1e-2)


def test_capacity_overflow_is_pruned_before_simulation():
    def tpl(s, cfg):
        template(s, cfg)
        if cfg.choice("huge", [False, True]):   # all output tiles accumulate in PSUM at once
            s.cache_write("C", "psum", at=s.loops("C")[0])
    ev = autotune.tuner.Evaluator(mm(512, 128, 512), tpl, "trn2")
    res, _ = ev.run(sp.Fixed({"tm": 32, "tn": 64, "huge": True}))
    assert res["state"] == "pruned" and "PSUM" in res["error"] and ev.evaluated == 0
    res = autotune.tune(mm(512, 128, 512), tpl, trials=16, seed=1, progress=False,
                        sampler="random")
    pruned = [t for t in res.trials if t.state == "pruned"]
    assert pruned and all(t.cycles is None and t.error for t in pruned)


def test_duplicate_configs_are_served_from_the_cache():
    res = autotune.tune(mm(), template, trials=40, seed=0, progress=False, sampler="random",
                        include_default=False)
    distinct = {tuple(sorted(t.config.items())) for t in res.trials}
    assert res.evaluated <= len(distinct) < 40


def test_trials_count_distinct_configs_and_a_small_space_is_exhausted():
    res = autotune.tune(mm(), template, trials=100, seed=0, progress=False, batch=4,
                        include_default=False)
    configs = [tuple(sorted(t.config.items())) for t in res.trials]
    assert len(configs) == len(set(configs)) == 36          # every config once, then stop
    assert {t.source for t in res.trials} <= {"sampler", "local", "random"}


def test_neighbours_move_one_parameter_one_step():
    _, cfg = sp.apply(mm(), template, sp.Fixed({"tm": 64, "tn": 128, "tk": 64, "depth": 2}))
    nbs = sp.neighbours(cfg)
    assert {"tm": 32, "tn": 128, "tk": 64, "depth": 2} in nbs
    assert {"tm": 128, "tn": 128, "tk": 64, "depth": 2} in nbs
    assert {"tm": 64, "tn": 128, "tk": 128, "depth": 2} in nbs      # ordinal choice: 64 -> 128
    assert len(nbs) == 2 + 2 + 1 + 1
    assert all(sum(nb[k] != cfg.values[k] for k in nb) == 1 for nb in nbs)


def test_cmaes_sampler_runs_and_gp_names_its_missing_packages():
    res = autotune.tune(mm(), template, trials=8, seed=0, sampler="cmaes", progress=False)
    assert len(res.trials) == 8 and res.best.cycles is not None
    try:
        import scipy  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(TensorlangError, match="sampler 'gp' needs PyTorch and SciPy"):
            autotune.tune(mm(), template, trials=2, sampler="gp", progress=False)


def test_bad_arguments():
    with pytest.raises(TensorlangError, match="unknown sampler 'bayes'"):
        autotune.tune(mm(), template, trials=2, sampler="bayes", progress=False)
    with pytest.raises(TensorlangError, match="workers > 1 need a shared storage"):
        autotune.tune(mm(), template, trials=2, workers=2, progress=False)
    with pytest.raises(TensorlangError, match="trials must be an integer >= 1, got 0"):
        autotune.tune(mm(), template, trials=0, progress=False)


def test_early_stop_and_plot(tmp_path):
    res = autotune.tune(mm(), template, trials=200, seed=0, early_stop=8, batch=4,
                        progress=False, plot=tmp_path / "conv.png")
    assert len(res.trials) < 200
    assert (tmp_path / "conv.png").read_bytes()[:4] == b"\x89PNG"


def test_records_and_warm_start(tmp_path):
    db = Records(tmp_path / "r.db")
    prog = mm()
    res = autotune.tune(prog, template, trials=10, seed=0, progress=False, records=db)
    recs = db.all(kernel="matmul")
    assert len(recs) == len({tuple(sorted(t.config.items())) for t in res.trials
                             if t.state == "complete"})
    best = db.best("matmul", workload_key(prog), "trn2")
    assert best.cycles == min(t.cycles for t in res.trials if t.cycles is not None)
    assert tl.Schedule.replay(prog, best.trace).build("trn2").simulate().cycles == best.cycles
    # a new shape starts from the nearest recorded shape's best config
    other = mm(256, 128, 256)
    res2 = autotune.tune(other, template, trials=3, seed=5, progress=False, records=db)
    first = min(res2.trials, key=lambda t: t.number)
    assert first.config["tm"] == best.config["tm"] and first.config["depth"] == best.config["depth"]
    assert first.source == "warm_start"     # told apart from the search's own proposals


# ------------------------------------------------------------------------------------------
# resume and workers (real processes)

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import autotune
    from test_autotune import mm, template
    res = autotune.tune(mm(), template, trials=int(sys.argv[2]), storage=sys.argv[1],
                        workers=int(sys.argv[3]), seed=0, batch=1, progress=False,
                        study_name="t", include_default=False)
    print("DONE", len(res.trials))
""")


def _script(tmp_path):
    p = tmp_path / "run_tune.py"
    p.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    return p


def _study(storage):
    import optuna
    from autotune.tuner import make_storage
    return optuna.load_study(study_name="t", storage=make_storage(storage))


def _finished(storage):
    try:
        st = _study(storage)
    except KeyError:  # the study is not created yet
        return []
    return [t for t in st.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]


def _check_exact(storage, n):
    trials = _study(storage).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == n
    assert len({t.number for t in finished}) == n                 # none twice
    # every other trial is a re-asked duplicate proposal or a neighbour step still queued:
    # none lost, none left running
    rest = [(t.state.name, t.user_attrs) for t in trials if t not in finished]
    assert all(st == "FAIL" and a.get("duplicate") or st == "WAITING" and a.get("source") in ("local", "random")
               for st, a in rest), rest
    assert all("config" in t.user_attrs for t in finished)


def test_kill_then_resume_loses_nothing(tmp_path):
    journal = tmp_path / "study.jsonl"
    script = _script(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, str(script), str(journal), "5000", "1"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:   # wait for a few finished trials
        time.sleep(0.2)
        if journal.exists() and len(_finished(journal)) >= 4:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = _study(journal)
    before = [t for t in st.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    assert 0 < len(before) < 5000
    n = len(before) + 10
    out = subprocess.run([sys.executable, str(script), str(journal), str(n), "1"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"DONE {n}" in out.stdout
    trials = _study(journal).get_trials(deepcopy=False)
    finished = _finished(journal)
    assert len(finished) == n and len({t.number for t in finished}) == n
    in_flight = [t for t in trials if t.state.name == "RUNNING"]
    dups = [t for t in trials if t.state.name == "FAIL" and t.user_attrs.get("duplicate")]
    assert len(in_flight) <= 1 and len(trials) == n + len(in_flight) + len(dups)  # <= 1 lost
    after = {t.number: t.value for t in _study(journal).get_trials(deepcopy=False)}
    assert all(after[t.number] == t.value for t in before)   # finished trials kept as they were


def test_two_workers_on_one_journal(tmp_path):
    journal = tmp_path / "study.jsonl"
    out = subprocess.run([sys.executable, str(_script(tmp_path)), str(journal), "14", "2"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "DONE 14" in out.stdout
    _check_exact(journal, 14)


def _pg_bin():
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@pytest.fixture
def postgres():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                    "install Debian's 'postgresql' package (.ci/run does)")
    pytest.importorskip("psycopg2", reason="psycopg2 not installed (pip install -e '.[test]')")
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="tensorlang-pg-"))  # outside pytest's private tmp dir
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_as = []
    if os.geteuid() == 0:           # the server refuses to run as root: use 'nobody'
        import pwd
        user = pwd.getpwnam("nobody")
        os.chown(base, user.pw_uid, user.pw_gid)
        os.chown(sock, user.pw_uid, user.pw_gid)
        run_as = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot start PostgreSQL")
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(data), "-U", "tl", "-A", "trust"],
                   check=True, capture_output=True, env=env)
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l",
                             str(base / "pg.log"), "-o",
                             f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, env=env)
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tl",
                        "tune"], check=True, capture_output=True, env=env)
        yield f"postgresql://tl@127.0.0.1:{port}/tune"
    finally:
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, env=env)
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_on_postgresql(tmp_path, postgres):
    out = subprocess.run([sys.executable, str(_script(tmp_path)), postgres, "12", "2"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "DONE 12" in out.stdout
    _check_exact(postgres, 12)


# ------------------------------------------------------------------------------------------
# command line


def test_cli_tune_file_and_records(tmp_path, capsys):
    from tensorlang.cli import main
    db = tmp_path / "r.db"
    rc = main(["tune", str(ROOT / "examples" / "matmul.py"), "--shape", "128,128", "--trials", "4",
               "--records", str(db), "--json"])
    assert rc == 0
    import json
    out = json.loads(capsys.readouterr().out)
    assert out["trials"] == 4 and out["cycles"] <= out["default_cycles"]
    assert main(["records", "list", "--db", str(db)]) == 0
    assert "matmul(bfloat16[128,128],bfloat16[128,128])" in capsys.readouterr().out
    assert main(["records", "export", str(tmp_path / "r.jsonl"), "--db", str(db)]) == 0
    (tmp_path / "bad.jsonl").write_text((tmp_path / "r.jsonl").read_text() + "{oops\n")
    n = len(Records(db))
    assert main(["records", "import", str(tmp_path / "bad.jsonl"), "--db", str(db)]) == 2
    assert "bad.jsonl:" in capsys.readouterr().err and len(Records(db)) == n


def test_cli_sweep_with_a_what_if_machine(tmp_path, capsys):
    from tensorlang.cli import main
    spec = tmp_path / "sweep.toml"
    spec.write_text(textwrap.dedent(f"""
        trials = 3
        machines = ["trn2"]
        [[variant]]
        name = "trn2-half-sbuf"
        base = "trn2"
        replace = {{ sbuf_bytes = 14680064 }}
        [[kernel]]
        file = "{ROOT / 'examples' / 'matmul.py'}"
        shapes = [[[128, 128], [128, 256]]]
    """))
    assert main(["sweep", str(spec), "--json"]) == 0
    text = (tmp_path / "sweep.csv").read_text().splitlines()
    assert text[0].startswith("kernel,shape,machine,cycles") and len(text) == 3
    assert "trn2-half-sbuf" in text[2]
    spec.write_text("trials = 3\n")
    assert main(["sweep", str(spec)]) == 2
    assert "needs at least one [[kernel]] table" in capsys.readouterr().err
