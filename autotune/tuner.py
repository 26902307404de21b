"""`tune()`: Optuna search over a config space, measured by the timing simulator.

One candidate = run the template under the trial's decisions -> a Schedule -> build (lower +
validate) -> simulate -> cycles. Illegal schedules and capacity overflows (SBUF / PSUM /
partitions) raise TensorlangError before simulation and are told to Optuna as PRUNED.

Search loop: Optuna ask/tell in batches (the sampler proposes `batch` trials, they are
evaluated, then told), so the sampler's own overhead stays small against a fast simulator.
The budget `trials` counts distinct configs: a proposal of a config already measured is told
FAILED (user attr `duplicate`) and not counted, and the sampler is asked again; different
configs that produce the identical schedule trace are served from a cache instead of
simulated again. Model-based samplers also get best-first neighbour steps (`_Search`); each
trial records its `source` (sampler, local, random, warm_start). The study lives in `storage`: in memory
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
    source: str = "sampler"     # "sampler" | "local" (neighbour step) | "warm_start" (records)


@dataclass(frozen=True)
class TuneResult:
    best: Trial
    trials: list = field(repr=False)
    default: Trial | None = None     # the default schedule, measured for reference
    study_name: str = ""
    evaluated: int = 0               # candidates actually simulated by this process

    @property
    def history(self) -> list[int | None]:
        """Best cycles so far after each counted trial (distinct configs, by trial number)."""
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
                 res.get("error"), res.get("source", "sampler"))


# ------------------------------------------------------------------------------------------
# optuna plumbing


def _quiet_optuna():
    import optuna  # noqa: PLC0415
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def startup_trials(trials: int) -> int:
    """Random start-up trials of the model-based samplers: a quarter of the budget, 4..10."""
    return min(10, max(4, trials // 4))


def make_sampler(name: str, seed: int, trials: int = 40):
    optuna = _quiet_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True,
                                          n_startup_trials=startup_trials(trials))
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
        # categorical parameters (no order) are left to the independent sampler (random)
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup_trials(trials),
                                            warn_independent_sampling=False)
    if name == "gp":
        try:
            import scipy  # noqa: F401, PLC0415
            import torch  # noqa: F401, PLC0415
        except ImportError:
            raise TensorlangError("sampler 'gp' needs PyTorch and SciPy (pip install torch "
                                  "scipy); they are not tensorlang dependencies") from None
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(trials))
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
    for k in ("cycles", "time_us", "roofline_fraction", "error", "source"):
        if k in a:
            out[k] = a[k]
    return out


# ------------------------------------------------------------------------------------------
# the search loop (one process)


def _config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


class _Search:
    """One process's view of a study: the distinct configs measured so far (by anyone on the
    storage), best-first neighbour steps and uniform fills.

    A proposal whose config was already measured is a duplicate: it is told FAILED (marked
    `duplicate`), not counted, and its slot is filled by a step taken outside the sampler --
    an unmeasured neighbour (one parameter one step away) of the best measured configs with
    `local`, else a uniformly drawn unmeasured config. With `local`, one in four counted
    configs after the start-up is such a neighbour step even without duplicates: the
    sampler's model finds the region, the neighbour steps finish the descent inside it. A
    step's result is added to the study as a finished trial (the sampler learns from it; no
    sampler call is spent on it), and the next batch asks the sampler for as many fewer
    proposals as it repeated in this one."""

    def __init__(self, study, ev: Evaluator, local: bool, startup: int, seed: int = 0):
        self.study, self.ev, self.local, self.startup = study, ev, local, startup
        self.rng = _random.Random(seed)
        self.seen: dict[str, tuple] = {}       # config key -> (cycles or None, config)
        self.done_numbers: set[int] = set()
        self.exhausted: set[str] = set()       # configs whose neighbours are all measured
        self.refresh()

    def refresh(self):
        for t in _finished(self.study):
            if t.number not in self.done_numbers:
                self.done_numbers.add(t.number)
                cfg = t.user_attrs.get("config", {})
                self.seen.setdefault(_config_key(cfg), (t.value, cfg))

    def step(self) -> tuple[dict, "sp.Config", str] | None:
        """Measure one unmeasured config chosen outside the sampler and add it to the study
        (a neighbour step with `local`, else or when none is left a uniform draw)."""
        cfg, source = (self._neighbour(), "local") if self.local else (None, "")
        if cfg is None:
            cfg, source = self._random(), "random"
        if cfg is None:
            return None
        optuna = _quiet_optuna()
        res, _ = self.ev.run(sp.Fixed(cfg.values))
        attrs = {a: res[a] for a in ("config", "schedule", "cycles", "time_us",
                                      "roofline_fraction", "error") if a in res}
        attrs["source"] = source
        complete = res["state"] == "complete"
        t = optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.PRUNED,
            value=res["cycles"] if complete else None, params=sp.optuna_params(cfg),
            distributions=sp.optuna_distributions(cfg), user_attrs=attrs)
        self.study.add_trial(t)
        self.seen[_config_key(res["config"])] = (res.get("cycles"), res["config"])
        return {**res, "source": source}

    def _neighbour(self):
        """The first unmeasured neighbour of the measured configs, best first."""
        order = sorted(self.seen.items(), key=lambda kv: (kv[1][0] is None, kv[1][0] or 0))
        for key, (_, config) in order:
            if key in self.exhausted:
                continue
            cfg = self._resolve(config)
            nbs = sp.neighbours(cfg) if cfg is not None else []
            self.rng.shuffle(nbs)
            for nb in nbs:
                near = self._resolve(nb)
                if near is not None and _config_key(near.values) not in self.seen:
                    return near
            self.exhausted.add(key)
        return None

    def _random(self, tries: int = 64):
        for _ in range(tries):
            cfg = self._resolve(None)
            if cfg is not None and _config_key(cfg.values) not in self.seen:
                return cfg
        return None

    def _resolve(self, config: dict | None):
        """The config a template run resolves `config` to (None: a random draw)."""
        cfg = sp.Config(sp.Random(self.rng) if config is None else sp.Nearest(config))
        s = self.ev.prog.schedule()
        s.machine = self.ev.spec
        try:
            self.ev.template(s, cfg)
        except TensorlangError:
            pass
        return cfg if cfg.params else None


def _run_share(study, ev: Evaluator, n: int, batch: int, early_stop, pbar, records, kernel,
               best0=None, local: bool = True, startup: int = 10, seed: int = 0) -> None:
    """Measure `n` new distinct configs: the sampler's proposals asked/told in batches of
    `batch`, repeated proposals replaced by steps (see `_Search`)."""
    optuna = _quiet_optuna()
    search = _Search(study, ev, local, startup, seed)
    best = best0
    since = repeats = credit = 0
    done = 0
    while done < n:
        search.refresh()
        k = min(batch, n - done)
        steps = 0
        if local and len(search.seen) >= startup:   # one in four counted configs
            credit += k
            steps, credit = min(k, credit // 4), credit % 4
        asked = [study.ask() for _ in range(max(0, k - steps - repeats))]
        told, recs = [], []
        repeats = 0
        for t in asked:
            res, _ = ev.run(sp.Optuna(t))
            key = _config_key(res["config"])
            if key in search.seen:
                t.set_user_attr("duplicate", True)
                t.set_user_attr("config", res["config"])
                study.tell(t, state=optuna.trial.TrialState.FAIL)
                repeats += 1
                continue
            for a in ("config", "schedule", "cycles", "time_us", "roofline_fraction", "error"):
                if a in res:
                    t.set_user_attr(a, res[a])
            if res["state"] == "complete":
                study.tell(t, res["cycles"])
            else:
                study.tell(t, state=optuna.trial.TrialState.PRUNED)
            search.seen[key] = (res.get("cycles"), res["config"])
            search.done_numbers.add(t.number)
            told.append(res)
        while len(told) < k:        # neighbour / uniform steps fill the batch
            res = search.step()
            if res is None:
                break
            told.append(res)
        if not told:                # nothing new proposed and nothing left to step to
            return
        done += len(told)
        recs = [r for r in told if r["state"] == "complete"]
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
            pbar.update(len(told))
            if best is not None:
                pbar.set_postfix_str(f"best {best:,} cycles")
        if early_stop and since >= early_stop:
            return


def _worker_main(prog, template, machine, storage, study_name, seed, sampler, n, batch,
                 early_stop, records_path, kernel, local, trials):
    optuna = _quiet_optuna()
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage),
                              sampler=make_sampler(sampler, seed, trials))
    ev = Evaluator(prog, template, machine)
    records = Records(records_path) if records_path is not None else None
    _run_share(study, ev, n, batch, early_stop, None, records, kernel, local=local,
               startup=startup_trials(trials), seed=seed)


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
         include_default: bool = True, local: bool | None = None) -> TuneResult:
    """Search schedules of `prog` for `machine`; see the module docstring.

    template: `template(s, cfg)` (see autotune.space) or None for the generated space.
    trials: the number of distinct configs to measure, in total over the study (a resumed
    study counts its finished trials); a config the sampler proposes again is not measured
    again and not counted (the trial is told FAILED, marked `duplicate`); the run also ends
    when the sampler proposes only measured configs (a small space is exhausted). local:
    best-first neighbour steps besides the sampler's proposals (default: on for the
    model-based samplers tpe/cmaes/gp, off for random/grid). records: a Records database or path; trials are added as they finish, and the
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
    sampler_obj = make_sampler(sampler, seed, trials)
    if local is None:
        local = sampler in ("tpe", "cmaes", "gp")
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
            _run_share(study, ev, remaining, batch, early_stop, pbar, records, kernel, best0,
                       local=local, startup=startup_trials(trials), seed=seed)
        elif remaining:
            _run_workers(prog, template, machine, storage, study, seed, sampler, remaining,
                         workers, batch, early_stop, records, kernel, pbar, local, trials)
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
            study.enqueue_trial(params, skip_if_exists=True, user_attrs={"source": "warm_start"})


def _run_workers(prog, template, machine, storage, study, seed, sampler, remaining, workers,
                 batch, early_stop, records, kernel, pbar, local, trials):
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
                              seed + 1000 * w, sampler, n, batch, early_stop, rpath, kernel,
                              local, trials),
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
    xs = [n for n, t in enumerate(trials) if t.cycles is not None]
    ys = [t.cycles for t in trials if t.cycles is not None]
    hist = res.history
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=8, alpha=0.4, label="trial")
    ax.step(range(len(hist)), [h if h is not None else math.nan for h in hist], where="post",
            color="C1", label="best so far")
    if res.default is not None and res.default.cycles is not None:
        ax.axhline(res.default.cycles, color="grey", ls="--", lw=1, label="default schedule")
    ax.set_yscale("log")
    ax.set_xlabel("distinct configs measured")
    ax.set_ylabel("cycles")
    ax.set_title(res.study_name, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
