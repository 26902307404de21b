"""`tune()`: Optuna search over a config space, measured by the timing simulator.

One candidate = run the template under the trial's decisions -> a Schedule -> build (lower +
validate) -> simulate -> cycles. Illegal schedules and capacity overflows (SBUF / PSUM /
partitions) raise TensorlangError before simulation and are told to Optuna as PRUNED.

Search loop: Optuna ask/tell in batches (the sampler proposes `batch` trials, they are
evaluated, then told), so the sampler's own overhead stays small against a fast simulator.
Identical configs -- and different configs that produce the identical schedule trace -- are
served from a cache instead of simulated again. The study lives in `storage`: in memory
(None), a JSON-lines journal file (a path), or any Optuna storage URL (sqlite:///,
postgresql://...). A finished trial is in the storage the moment it is told, so killing a
run loses at most the trials in flight; re-running with the same storage and study name
continues towards `trials` in total. `workers=N` starts N processes on one study (a journal
file or a database), each running its share of the remaining trials.

Warm start: with `records`, the configs of the best records of the nearest recorded shapes
(same kernel, machine) are mapped onto this space and enqueued first.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random as _random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tensorlang.ir import Program, TensorlangError

from . import space as sp
from .records import TOOL_VERSION, Record, Records, workload_key

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp")


@dataclass(frozen=True)
class Trial:
    number: int
    state: str                  # "complete" | "pruned"
    config: dict
    schedule: list              # replayable Schedule trace
    cycles: int | None = None
    time_us: float | None = None
    roofline_fraction: float | None = None
    error: str | None = None    # why a pruned candidate was refused


@dataclass(frozen=True)
class TuneResult:
    best: Trial
    trials: list = field(repr=False)
    default: Trial | None = None     # the default schedule, measured for reference
    study_name: str = ""
    evaluated: int = 0               # candidates actually simulated by this process

    @property
    def history(self) -> list[int | None]:
        """Best cycles so far after each trial (by trial number)."""
        out, best = [], None
        for t in sorted(self.trials, key=lambda t: t.number):
            if t.cycles is not None and (best is None or t.cycles < best):
                best = t.cycles
            out.append(best)
        return out


# ------------------------------------------------------------------------------------------
# evaluating candidates


class Evaluator:
    """Template + program + machine -> measured candidates, with a cache by config and trace."""

    def __init__(self, prog: Program, template, machine):
        import sim  # noqa: PLC0415
        self.prog, self.template = prog, template
        self.spec = sim.machine(machine)
        self.sim_error = sim.SimError
        self.machine_name = machine if isinstance(machine, str) else self.spec.name
        self.by_config: dict[str, dict] = {}
        self.by_trace: dict[str, dict] = {}
        self.evaluated = 0

    def measure(self, s) -> dict:
        key = json.dumps(s.trace(), sort_keys=True)
        hit = self.by_trace.get(key)
        if hit is None:
            try:
                rep = s.build(self.spec).simulate()
                hit = {"state": "complete", "cycles": int(rep.cycles), "time_us": float(rep.time_us),
                       "roofline_fraction": float(rep.roofline_fraction)}
                self.evaluated += 1
            except (TensorlangError, self.sim_error) as e:
                hit = {"state": "pruned", "error": str(e).splitlines()[0][:300]}
            self.by_trace[key] = hit
        return {**hit, "schedule": s.trace()}

    def run(self, source) -> tuple[dict, sp.Config | None]:
        """Apply the template under `source`, measure; a result dict and the Config."""
        cfg = sp.Config(source)
        s = self.prog.schedule()
        s.machine = self.spec
        try:
            self.template(s, cfg)
        except TensorlangError as e:
            return {"state": "pruned", "error": str(e).splitlines()[0][:300], "schedule": s.trace(),
                    "config": dict(cfg.values)}, cfg
        ckey = json.dumps(cfg.values, sort_keys=True)
        if ckey not in self.by_config:
            self.by_config[ckey] = self.measure(s)
        return {**self.by_config[ckey], "config": dict(cfg.values)}, cfg

    def default(self) -> dict:
        s = self.prog.schedule()
        s.machine = self.spec
        return {**self.measure(s), "config": {}}


def _trial_of(number: int, res: dict) -> Trial:
    return Trial(number, res["state"], res.get("config", {}), res.get("schedule", []),
                 res.get("cycles"), res.get("time_us"), res.get("roofline_fraction"),
                 res.get("error"))


# ------------------------------------------------------------------------------------------
# optuna plumbing


def _quiet_optuna():
    import optuna  # noqa: PLC0415
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def make_sampler(name: str, seed: int):
    optuna = _quiet_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True, n_startup_trials=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.BruteForceSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401, PLC0415
        except ImportError:
            raise TensorlangError("sampler 'cmaes' needs the 'cmaes' package "
                                  "(pip install cmaes)") from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        try:
            import torch  # noqa: F401, PLC0415
        except ImportError:
            raise TensorlangError("sampler 'gp' needs PyTorch (pip install torch)") from None
        return optuna.samplers.GPSampler(seed=seed)
    raise TensorlangError(f"unknown sampler {name!r}; samplers are: {', '.join(SAMPLERS)}")


def make_storage(storage):
    """None -> in memory; a URL with '://' -> Optuna's RDB storage; else a journal file path."""
    optuna = _quiet_optuna()
    if storage is None or not isinstance(storage, (str, os.PathLike)):
        return storage
    s = str(storage)
    if "://" in s:
        s = _pg_driver(s)
        try:
            return optuna.storages.RDBStorage(s, engine_kwargs={"pool_pre_ping": True})
        except Exception as e:  # noqa: BLE001  (driver missing, server down, bad URL)
            raise TensorlangError(f"tuning storage {s!r}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0]}") from None
    from optuna.storages.journal import JournalFileBackend  # noqa: PLC0415
    Path(s).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(s))


def _pg_driver(url: str) -> str:
    """postgresql:// means psycopg (v3) to SQLAlchemy >= 2.1; use psycopg2 when only it is there."""
    import importlib.util  # noqa: PLC0415
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def default_study_name(prog: Program, machine, kernel: str | None) -> str:
    m = machine if isinstance(machine, str) else getattr(machine, "name", "machine")
    return f"{kernel or prog.name}|{workload_key(prog)}|{m}"


def _finished(study) -> list:
    optuna = _quiet_optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def _result_of_frozen(t) -> dict:
    a = t.user_attrs
    out = {"state": "complete" if t.state.name == "COMPLETE" else "pruned",
           "config": a.get("config", {}), "schedule": a.get("schedule", [])}
    for k in ("cycles", "time_us", "roofline_fraction", "error"):
        if k in a:
            out[k] = a[k]
    return out


# ------------------------------------------------------------------------------------------
# the search loop (one process)


def _run_share(study, ev: Evaluator, n: int, batch: int, early_stop, pbar, records, kernel,
               best0=None) -> None:
    """Ask/tell `n` trials on `study` in batches of `batch`."""
    optuna = _quiet_optuna()
    best = best0
    since = 0
    done = 0
    while done < n:
        k = min(batch, n - done)
        asked = [study.ask() for _ in range(k)]
        told, recs = [], []
        for t in asked:
            res, _ = ev.run(sp.Optuna(t))
            for key in ("config", "schedule", "cycles", "time_us", "roofline_fraction", "error"):
                if key in res:
                    t.set_user_attr(key, res[key])
            if res["state"] == "complete":
                study.tell(t, res["cycles"])
                recs.append(res)
            else:
                study.tell(t, state=optuna.trial.TrialState.PRUNED)
            told.append(res)
        done += k
        if records is not None and recs:
            records.add_many(Record(kernel, workload_key(ev.prog), ev.machine_name, TOOL_VERSION,
                                    r["config"], r["schedule"], r["cycles"], r["time_us"],
                                    r["roofline_fraction"]) for r in recs)
        for res in told:
            c = res.get("cycles")
            if c is not None and (best is None or c < best):
                best, since = c, 0
            else:
                since += 1
        if pbar is not None:
            pbar.update(k)
            if best is not None:
                pbar.set_postfix_str(f"best {best:,} cycles")
        if early_stop and since >= early_stop:
            return


def _worker_main(prog, template, machine, storage, study_name, seed, sampler, n, batch,
                 early_stop, records_path, kernel):
    optuna = _quiet_optuna()
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage),
                              sampler=make_sampler(sampler, seed))
    ev = Evaluator(prog, template, machine)
    records = Records(records_path) if records_path is not None else None
    _run_share(study, ev, n, batch, early_stop, None, records, kernel)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415
    return tqdm(total=total, initial=initial, desc="tuning", unit="trial", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------
# public entry point


def tune(prog: Program, template=None, machine="trn2", trials: int = 300, storage=None,
         workers: int = 1, seed: int = 0, sampler: str = "tpe", early_stop: int | None = None,
         progress: bool = True, plot=None, records=None, study_name: str | None = None,
         kernel: str | None = None, batch: int = 8, warm_start: int = 3,
         include_default: bool = True) -> TuneResult:
    """Search schedules of `prog` for `machine`; see the module docstring.

    template: `template(s, cfg)` (see autotune.space) or None for the generated space.
    trials: the total number of trials in the study (a resumed study counts its finished
    trials). records: a Records database or path; trials are added as they finish, and the
    nearest recorded shapes warm-start the search (`warm_start` of them). include_default:
    also measure the default schedule, and return it when no trial beats it.
    """
    optuna = _quiet_optuna()
    if not isinstance(trials, int) or trials < 1:
        raise TensorlangError(f"tune: trials must be an integer >= 1, got {trials!r}")
    if not isinstance(workers, int) or workers < 1:
        raise TensorlangError(f"tune: workers must be an integer >= 1, got {workers!r}")
    if workers > 1 and storage is None:
        raise TensorlangError("tune: workers > 1 need a shared storage (a journal file path or "
                              "a database URL); in-memory studies live in one process")
    kernel = kernel or prog.name
    template = template or sp.generated(prog, machine)
    ev = Evaluator(prog, template, machine)
    if isinstance(records, (str, os.PathLike)):
        records = Records(records)
    study_name = study_name or default_study_name(prog, machine, kernel)
    sampler_obj = make_sampler(sampler, seed)
    study = optuna.create_study(study_name=study_name, storage=make_storage(storage),
                                sampler=sampler_obj, direction="minimize", load_if_exists=True)

    done = _finished(study)
    if not done and not study.get_trials(deepcopy=False) and records is not None and warm_start:
        _enqueue_nearest(study, ev, records, kernel, warm_start)
    remaining = max(0, trials - len(done))

    pbar = _progress(trials, len(done), progress)
    best0 = min((t.value for t in done if t.value is not None), default=None)
    try:
        if remaining and workers == 1:
            _run_share(study, ev, remaining, batch, early_stop, pbar, records, kernel, best0)
        elif remaining:
            _run_workers(prog, template, machine, storage, study, seed, sampler, remaining,
                         workers, batch, early_stop, records, kernel, pbar)
    finally:
        if pbar is not None:
            pbar.close()

    finished = sorted(_finished(study), key=lambda t: t.number)
    all_trials = [_trial_of(t.number, _result_of_frozen(t)) for t in finished]
    complete = [t for t in all_trials if t.state == "complete"]
    default = _trial_of(-1, ev.default()) if include_default else None
    cands = complete + ([default] if default is not None and default.cycles is not None else [])
    if not cands:
        reasons = {t.error for t in all_trials if t.error}
        raise TensorlangError(f"tune {kernel}: none of {len(all_trials)} candidates could be "
                              f"built; e.g. {sorted(reasons)[:1]}")
    best = min(cands, key=lambda t: (t.cycles, t.number < 0, t.number))
    res = TuneResult(best, all_trials, default, study_name, ev.evaluated)
    if plot:
        plot_convergence(res, plot)
    return res


def _enqueue_nearest(study, ev: Evaluator, records: Records, kernel: str, n: int):
    seen = set()
    for rec in records.nearest(kernel, workload_key(ev.prog), ev.machine_name, n=n):
        cfg = sp.Config(sp.Nearest(rec.config))
        s = ev.prog.schedule()
        s.machine = ev.spec
        try:
            ev.template(s, cfg)
        except TensorlangError:
            pass
        params = sp.optuna_params(cfg)
        key = json.dumps(params, sort_keys=True)
        if params and key not in seen:
            seen.add(key)
            study.enqueue_trial(params, skip_if_exists=True)


def _run_workers(prog, template, machine, storage, study, seed, sampler, remaining, workers,
                 batch, early_stop, records, kernel, pbar):
    import multiprocessing as mp  # noqa: PLC0415
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    shares = [remaining // workers + (w < remaining % workers) for w in range(workers)]
    rpath = str(records.path) if records is not None else None
    procs = []
    for w, n in enumerate(shares):
        if n == 0:
            continue
        p = ctx.Process(target=_worker_main,
                        args=(prog, template, machine, str(storage), study.study_name,
                              seed + 1000 * w, sampler, n, batch, early_stop, rpath, kernel),
                        daemon=False)
        p.start()
        procs.append(p)
    last = len(_finished(study))
    while any(p.is_alive() for p in procs):
        time.sleep(0.5)
        if pbar is not None:
            now = _finished(study)
            if len(now) > last:
                pbar.update(len(now) - last)
                last = len(now)
                vals = [t.value for t in now if t.value is not None]
                if vals:
                    pbar.set_postfix_str(f"best {int(min(vals)):,} cycles")
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise TensorlangError(f"tune: {len(bad)} worker process(es) failed (exit codes {bad}); "
                              "the study keeps every finished trial, re-run to continue")


# ------------------------------------------------------------------------------------------
# convergence plot


def plot_convergence(res: TuneResult, path) -> None:
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise TensorlangError("plot: matplotlib is not installed "
                              "(pip install 'tensorlang[plot]')") from None
    trials = sorted(res.trials, key=lambda t: t.number)
    xs = [t.number for t in trials if t.cycles is not None]
    ys = [t.cycles for t in trials if t.cycles is not None]
    hist = res.history
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=8, alpha=0.4, label="trial")
    ax.step(range(len(hist)), [h if h is not None else math.nan for h in hist], where="post",
            color="C1", label="best so far")
    if res.default is not None and res.default.cycles is not None:
        ax.axhline(res.default.cycles, color="grey", ls="--", lw=1, label="default schedule")
    ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel("cycles")
    ax.set_title(res.study_name, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
