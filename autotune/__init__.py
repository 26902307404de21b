"""autotune: the search over schedules.

    import autotune
    res = autotune.tune(prog, template=None, machine="trn2", trials=300, seed=0)
    res.best.cycles, res.best.config, res.best.schedule     # schedule: a replayable trace

Modules: `records` (the tuning-records database), `space` (define-by-run config spaces and
the generated space), `tuner` (Optuna search), `sweep` (kernels x shapes x machines).
Importing this package is light; Optuna is imported when a search starts.
"""
from .records import Record, Records, dump_jsonl, load_jsonl, workload_key

__all__ = ["Record", "Records", "workload_key", "load_jsonl", "dump_jsonl"]
from .space import Config, enumerate_configs, generated
from .tuner import SAMPLERS, Trial, TuneResult, tune

__all__ += ["tune", "TuneResult", "Trial", "SAMPLERS", "Config", "generated", "enumerate_configs"]
