"""Define-by-run configuration spaces.

A template is a function `template(s, cfg)` that applies schedule steps to `s` and asks
`cfg` for every decision:

    def template(s, cfg):
        i, j = s.axes("C"); (k,) = s.reduce_axes("C")
        io, ii = s.split(i, cfg.split("tm", 512, max=128))
        ...
        s.pipeline(ko, cfg.choice("depth", [1, 2, 3]))

The same template runs under several *sources* of decisions: a fixed config dict
(`Fixed`), exhaustive enumeration (`enumerate_configs`), uniform random sampling (`Random`)
and Optuna trials (`Optuna`). Every parameter has a finite ordered domain:

  * `cfg.split(name, extent, ...)`: a tile size, one of the divisors of `extent` (or, with
    pow2=True, the powers of two up to it), ordered ascending;
  * `cfg.choice(name, options)`: one of `options` (JSON values), categorical;
  * `cfg.int(name, lo, hi, log=False)`: an integer range;
  * `cfg.order(name, items)`: a permutation of `items`, coded 0..n!-1 in
    Steinhaus-Johnson-Trotter order, so neighbouring codes differ by one adjacent swap.

Configs are dicts name -> value (the tile size, the option, the permutation as a list of
item names): JSON, readable, and replayable through `Fixed`. `Nearest` maps a config from
another shape onto this space (each value to the closest legal one): warm starts.

`generated(prog)` builds a template from the program's stages (template=None in tune).
"""
from __future__ import annotations

import json
import math
import random as _random
from functools import lru_cache

from tensorlang.ir import Program, TensorlangError
from tensorlang.schedule import Schedule, matmul_operands

# ------------------------------------------------------------------------------------------
# parameter domains


def divisors(n: int, lo: int = 1, hi: int | None = None, pow2: bool = False) -> list[int]:
    hi = n if hi is None else min(hi, n)
    if pow2:
        out = [1 << e for e in range(int(math.log2(max(hi, 1))) + 1)]
        return [d for d in out if lo <= d <= hi] or [min(max(lo, 1), hi)]
    return [d for d in range(max(lo, 1), hi + 1) if n % d == 0] or [hi]


@lru_cache(maxsize=64)
def sjt_orders(n: int) -> tuple[tuple[int, ...], ...]:
    """All permutations of range(n) in Steinhaus-Johnson-Trotter order (adjacent swaps)."""
    if n <= 1:
        return (tuple(range(n)),)
    out = []
    for k, p in enumerate(sjt_orders(n - 1)):
        slots = range(n - 1, -1, -1) if k % 2 == 0 else range(n)
        for pos in slots:
            out.append(p[:pos] + (n - 1,) + p[pos:])
    return tuple(out)


class Param:
    """One decision: kind in split|choice|int|order, and its ordered domain of values."""

    def __init__(self, name: str, kind: str, values: list, meta=None):
        self.name, self.kind, self.values, self.meta = name, kind, values, meta

    def index_of(self, value):
        for n, v in enumerate(self.values):
            if v == value:
                return n
        raise TensorlangError(f"config parameter {self.name!r}: value {value!r} is not one of "
                              f"{_short(self.values)}")

    @property
    def ordinal(self) -> bool:
        """Whether neighbouring indices are neighbouring values: tile sizes, int ranges, SJT
        orders, and choices among increasing numbers (e.g. pipeline depths)."""
        if self.kind != "choice":
            return True
        nums = [v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return len(nums) == len(self.values) and all(a < b for a, b in zip(nums, nums[1:]))

    def nearest_index(self, value) -> int:
        """The index of the legal value closest to `value` (warm starts from other shapes)."""
        try:
            return self.index_of(value)
        except TensorlangError:
            pass
        if self.kind in ("split", "int") and isinstance(value, (int, float)) and value > 0:
            return min(range(len(self.values)),
                       key=lambda n: abs(math.log2(max(self.values[n], 1) / value)))
        return 0


def _short(vals, n=12):
    s = ", ".join(json.dumps(v) for v in vals[:n])
    return "[" + s + (", ..." if len(vals) > n else "") + "]"


class Config:
    """What a template calls; each call resolves through the source and is recorded."""

    def __init__(self, source):
        self.source = source
        self.params: dict[str, Param] = {}
        self.values: dict = {}

    def _get(self, p: Param):
        if p.name in self.params:
            raise TensorlangError(f"config parameter {p.name!r} is defined twice in one template run")
        if not p.values:
            raise TensorlangError(f"config parameter {p.name!r} has no legal values")
        self.params[p.name] = p
        v = p.values[self.source.pick(p)]
        self.values[p.name] = v
        return v

    def split(self, name: str, extent: int, min: int = 1, max: int | None = None,  # noqa: A002
              pow2: bool = False) -> int:
        """A tile size for a loop of `extent`: a divisor (or power of two) in [min, max]."""
        return self._get(Param(name, "split", divisors(int(extent), min, max, pow2)))

    def choice(self, name: str, options):
        return self._get(Param(name, "choice", list(options)))

    def int(self, name: str, lo: int, hi: int, log: bool = False) -> int:  # noqa: A003
        if hi < lo:
            raise TensorlangError(f"config parameter {name!r}: empty range {lo}..{hi}")
        return self._get(Param(name, "int", list(range(lo, hi + 1)), meta=log))

    def order(self, name: str, items) -> list:
        """A permutation of `items` (returned as a list of the items)."""
        items = list(items)
        perms = [[str(items[i]) for i in p] for p in sjt_orders(len(items))]
        got = self._get(Param(name, "order", perms))
        by_name = {str(x): x for x in items}
        return [by_name[x] for x in got]

    def __getitem__(self, name):
        return self.values[name]


# ------------------------------------------------------------------------------------------
# sources of decisions


class Fixed:
    """Values from a config dict; a missing parameter takes its first value."""

    def __init__(self, config: dict, strict: bool = True):
        self.config, self.strict = dict(config), strict

    def pick(self, p: Param) -> int:
        if p.name not in self.config:
            return 0
        v = self.config[p.name]
        return p.index_of(v) if self.strict else p.nearest_index(v)


class Nearest(Fixed):
    """A config recorded for another shape, mapped onto this space value by value."""

    def __init__(self, config: dict):
        super().__init__(config, strict=False)


class Random:
    def __init__(self, rng: _random.Random):
        self.rng = rng

    def pick(self, p: Param) -> int:
        return self.rng.randrange(len(p.values))


class Prefix:
    """Enumeration step: the given indices first, then index 0 for new parameters."""

    def __init__(self, prefix: list[int]):
        self.prefix, self.seen = prefix, []

    def pick(self, p: Param) -> int:
        n = len(self.seen)
        idx = self.prefix[n] if n < len(self.prefix) else 0
        self.seen.append((idx, len(p.values)))
        return idx


class Optuna:
    """Decisions from an optuna Trial. Ordered domains (split, int, order, choices among
    increasing numbers) are integer indices so the sampler's model sees their order (a
    power-of-two tile size is its log2 less the smallest one's); other choices are
    categorical."""

    def __init__(self, trial):
        self.trial = trial

    def pick(self, p: Param) -> int:
        if p.kind == "choice" and not p.ordinal:
            return self.trial.suggest_categorical(p.name, list(range(len(p.values))))
        if p.kind == "int":
            return self.trial.suggest_int(p.name, p.values[0], p.values[-1], log=bool(p.meta)) \
                - p.values[0]
        return self.trial.suggest_int(p.name, 0, len(p.values) - 1)


def optuna_params(cfg: Config) -> dict:
    """The optuna parameter values (indices) of a resolved config, for enqueue_trial."""
    out = {}
    for name, p in cfg.params.items():
        i = p.index_of(cfg.values[name])
        out[name] = p.values[i] if p.kind == "int" else i
    return out


def neighbours(cfg: Config) -> list[dict]:
    """Configs one step away from a resolved config: one ordered parameter moved to the
    adjacent value, or one categorical parameter changed (value dicts, for `Nearest`)."""
    out = []
    for name, p in cfg.params.items():
        i = p.index_of(cfg.values[name])
        steps = [i - 1, i + 1] if p.ordinal else [j for j in range(len(p.values)) if j != i]
        out += [{**cfg.values, name: p.values[j]} for j in steps if 0 <= j < len(p.values)]
    return out


def optuna_distributions(cfg: Config) -> dict:
    """The optuna distributions `Optuna.pick` suggests from, for a trial added directly."""
    from optuna.distributions import CategoricalDistribution, IntDistribution  # noqa: PLC0415
    out = {}
    for name, p in cfg.params.items():
        if p.kind == "choice" and not p.ordinal:
            out[name] = CategoricalDistribution(list(range(len(p.values))))
        elif p.kind == "int":
            out[name] = IntDistribution(p.values[0], p.values[-1], log=bool(p.meta))
        else:
            out[name] = IntDistribution(0, len(p.values) - 1)
    return out


# ------------------------------------------------------------------------------------------
# running a template


def apply(prog: Program, template, source, machine="trn2") -> tuple[Schedule, Config]:
    """Run the template under `source`: the schedule and the resolved config. Illegal
    steps raise TensorlangError (the candidate is pruned)."""
    s = prog.schedule(machine if isinstance(machine, str) else "trn2")
    if not isinstance(machine, str):
        s.machine = machine
    cfg = Config(source)
    template(s, cfg)
    return s, cfg


def enumerate_configs(prog: Program, template, machine="trn2", limit: int = 100_000):
    """Every config of a (finite, define-by-run) template, depth first; yields config dicts.
    Templates whose own steps are illegal for a config are still yielded (pruning is the
    evaluator's business); a template must decide the same parameters in the same order
    for the same earlier decisions."""
    prefix: list[int] = []
    count = 0
    while True:
        src = Prefix(prefix)
        cfg = Config(src)
        s = prog.schedule(machine if isinstance(machine, str) else "trn2")
        try:
            template(s, cfg)
        except TensorlangError:
            pass
        yield dict(cfg.values)
        count += 1
        if count >= limit:
            raise TensorlangError(f"the config space has more than {limit} points; "
                                  "enumerate a smaller one or search it")
        seen = src.seen
        # odometer over the decisions made in this run: bump the last one that can move
        while seen and seen[-1][0] + 1 >= seen[-1][1]:
            seen.pop()
        if not seen:
            return
        prefix = [i for i, _ in seen[:-1]] + [seen[-1][0] + 1]


def space_size(prog: Program, template, machine="trn2") -> int:
    return sum(1 for _ in enumerate_configs(prog, template, machine))


# ------------------------------------------------------------------------------------------
# the generated space


def _spec(machine):
    import sim  # noqa: PLC0415
    return sim.machine(machine)


def _consumers_of(prog: Program, stage) -> list:
    return [c for c in prog.consumers(stage.tensor) if c.name != stage.name]


def generated(prog: Program, machine="trn2"):
    """A template derived from the program's stages.

    Contractions (a stage matching `matmul_operands`, e.g. matmul, bmm): see `_contraction`:
    tile sizes for M (partitions), N (matmul moving free size) and K (systolic rows), a
    second level of blocking for M and N, the order of the block and of the tile loops,
    whether the contraction loop sits inside the tile loops or outside them (PSUM-resident
    accumulators), where A and B are cached in SBUF (root, any outer loop, or not at all),
    the pipeline depth of the contraction loop, PSUM double buffering and cache prefetch.
    Reductions and elementwise stages: the partition tile, the free-size tile and a pipeline
    depth; temporaries read by exactly one later stage may be computed at that consumer's
    outer loop (or inlined, when elementwise).
    """
    spec = _spec(machine)
    stages = list(prog.stages)

    def template(s: Schedule, cfg: Config):
        attached: set[str] = set()
        for st in stages:
            if st.name in attached:
                continue
            if matmul_operands(st) is not None and st.reduce_axes and len(st.axes) >= 2:
                _contraction(s, cfg, st, spec)
            else:
                _generic(s, cfg, st, spec, prog, attached)

    template.__name__ = f"generated_{prog.name}"
    return template


def _contraction(s: Schedule, cfg: Config, st, spec):
    """Multi-level tiling of a contraction onto the systolic array.

    Loops, outer to inner: [root] blocks (iob, job in either order), then either the
    contraction steps ko outside the tile loops (k_at=block: bm x bn accumulators stay in PSUM
    over all of ko, every loaded tile is reused by the other block dimension) or inside them
    (k_at=inner: one accumulator at a time), then the tensorized tile (ii, ji, ki). A and B
    are each cached in SBUF at one of those loops or at the root (the whole operand loaded
    once), or not at all; ko is multi-buffered (depth) so loads overlap the multiplies, and
    the loop just outside ko may double-buffer the PSUM accumulators (psum_bufs) so copying
    results out overlaps the next accumulation. Domains are cut to what fits: accumulators
    x psum_bufs <= PSUM banks.
    """
    n = st.name
    axes = s.axes(n)
    batch, (i, j) = axes[:-2], axes[-2:]
    (k,) = s.reduce_axes(n)[-1:]
    M, N, K = (st.extents()[a] for a in (i, j, k))
    # tiles below a quarter of the engine's size only add instructions: leave them out
    tm = cfg.split(f"{n}.tm", M, min=min(M, spec.partitions // 4), max=spec.partitions,
                   pow2=M & (M - 1) == 0)
    tn = cfg.split(f"{n}.tn", N, min=min(N, spec.matmul_max_n // 8), max=spec.matmul_max_n,
                   pow2=N & (N - 1) == 0)
    tk = cfg.split(f"{n}.tk", K, min=min(K, spec.pe_rows // 4), max=spec.pe_rows,
                   pow2=K & (K - 1) == 0)
    kpos = cfg.choice(f"{n}.k_at", ["inner", "block"])
    banks = spec.psum_banks
    # tiles per block (second level); with k_at=block all bm x bn accumulate in PSUM at once
    bm = cfg.split(f"{n}.bm", M // tm, max=16 if kpos == "inner" else banks, pow2=True)
    bn = cfg.split(f"{n}.bn", N // tn, max=16 if kpos == "inner" else banks // bm, pow2=True)
    acc = bm * bn if kpos == "block" else 1
    io, ii = s.split(i, tm)
    jo, ji = s.split(j, tn)
    ko, ki = s.split(k, tk)
    iob, ioi = s.split(io, bm)
    job, joi = s.split(jo, bn)
    blocks = cfg.order(f"{n}.block_order", [iob, job])
    tiles = cfg.order(f"{n}.tile_order", [ioi, joi])
    outer = blocks + ([ko] + tiles if kpos == "block" else tiles + [ko])
    where = ["none", "root"] + list(range(len(outer) - 1))   # never at the innermost (ko / tile)
    cache = [cfg.choice(f"{n}.cache_{t}", where) for t in ("a", "b")]
    root = []
    if "root" in cache:  # an extent-1 loop around everything: the cache covers all of it
        r, first = s.split(outer[0], s.state.get(n).var(str(outer[0])).extent)
        root, outer = [r], [first] + outer[1:]
    s.reorder(*batch, *root, *outer, ii, ji, ki)
    s.partition(ii)
    s.vectorize(ji)
    s.tensorize(ki, "matmul")
    for at, ld in zip(cache, matmul_operands(s.prog.stage(n))):
        if at != "none":
            s.cache_read(ld.tensor, "sbuf", root[0] if at == "root" else outer[at], consumer=n)
    depth = cfg.choice(f"{n}.depth", [1, 2, 3, 4, 6, 8])
    if depth > 1:
        s.pipeline(ko, depth)
    kidx = outer.index(ko)
    bufs = cfg.choice(f"{n}.psum_bufs", [1, 2] if kidx > 0 and 2 * acc <= banks else [1])
    if bufs > 1:
        s.pipeline(outer[kidx - 1], bufs)
    # prefetch: double-buffer the loop a cache is filled at, so the next block's fill can
    # overlap this block's work (one decision per loop; ko and the PSUM loop have theirs)
    busy = {kidx} | ({kidx - 1} if bufs > 1 else set())
    for t, at in zip(("a", "b"), cache):
        if at not in ("none", "root") and at not in busy:
            busy.add(at)
            if cfg.choice(f"{n}.prefetch_{t}", [1, 2]) > 1:
                s.pipeline(outer[at], 2)


def _generic(s: Schedule, cfg: Config, st, spec, prog, attached: set):
    n = st.name
    consumers = _consumers_of(prog, st)
    if prog.tensors[st.tensor].kind == "temp" and len(consumers) == 1:
        how = cfg.choice(f"{n}.at", ["root", "consumer"] + (["inline"] if st.reduce is None else []))
        if how == "inline":
            s.compute_inline(n)
            attached.add(n)
            return
        if how == "consumer":
            c = consumers[0]
            _generic_tiles(s, cfg, c, spec)
            s.compute_at(n, s.loops(c.name)[0], consumer=c.name)
            attached.add(n)
            return
    if n in attached:
        return
    _generic_tiles(s, cfg, st, spec)


def _generic_tiles(s: Schedule, cfg: Config, st, spec):
    """Partition tile on the first spatial axis, free tile on the last; pipeline the outer loop."""
    n = st.name
    if f"{n}.tp" in cfg.params:  # already tiled (a producer attached here first)
        return
    axes = s.axes(n)
    if not axes:
        return
    ext = st.extents()
    p = axes[0]
    tp = cfg.split(f"{n}.tp", ext[p], min=min(ext[p], spec.partitions // 4), max=spec.partitions,
                   pow2=ext[p] & (ext[p] - 1) == 0)
    po, pi = s.split(p, tp) if tp < ext[p] else (None, p)
    if len(axes) > 1:
        f = axes[-1]
        tf = cfg.split(f"{n}.tf", ext[f], max=spec.max_free_elems_sbuf // 8,
                       pow2=ext[f] & (ext[f] - 1) == 0)
        if tf < ext[f]:
            fo, fi = s.split(f, tf)
        else:
            fi = f
        s.partition(pi)
        s.vectorize(fi)
    else:
        s.partition(pi)
    if po is not None:
        depth = cfg.choice(f"{n}.depth", [1, 2, 3])
        if depth > 1:
            s.pipeline(po, depth)
