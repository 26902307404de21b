"""What-if machines from TOML files: `sim.machine("my_chip.toml")` -> MachineSpec.

A file starts from a preset and overrides MachineSpec fields (see docs/machine.md):

    base = "trn2"                  # optional preset to start from (default "trn2")
    name = "trn2-half-sbuf"        # optional; default: the file name without .toml
    sbuf_bytes = 14680064          # totals are accepted and divided over the partitions
    dma_queue_gbps = 46.0
    [pe_rate]                      # merged into the base's table (dtype -> rate vs bf16)
    float8_e4m3 = 4.0

Every problem (missing file, malformed TOML, unknown key, wrong type, bad value) is one
SimError naming the file, the key, its value and the rule.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from pathlib import Path

from .isa import DTYPE_SIZE
from .machine import PRESETS, MachineSpec, SimError, _TYPE_WORDS, _field_types

TOTALS = {"sbuf_bytes": "sbuf_partition_bytes", "psum_bytes": "psum_partition_bytes"}
FILE_KEYS = ("base",)


def load_toml(path) -> MachineSpec:
    """Load and validate a what-if machine description (see the module docstring)."""
    p = Path(path)
    where = f"machine file {str(path)!r}"
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SimError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise SimError(f"{where}: is a directory, not a TOML file") from None
    except OSError as e:
        raise SimError(f"{where}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise SimError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise SimError(f"{where}: malformed TOML: {e}") from None
    return spec_from_dict(data, where, default_name=p.stem)


def spec_from_dict(data: dict, where: str = "machine description",
                   default_name: str = "custom") -> MachineSpec:
    """A MachineSpec from the parsed TOML table `data` (errors are prefixed by `where`)."""
    base_name = data.get("base", "trn2")
    if not isinstance(base_name, str) or base_name not in PRESETS:
        near = difflib.get_close_matches(str(base_name), list(PRESETS), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise SimError(f"{where}: base = {base_name!r} is not a preset; {hint}"
                       f"presets: {', '.join(PRESETS)}")
    base = PRESETS[base_name]
    hints = _field_types()
    fields = [f.name for f in dataclasses.fields(MachineSpec)]
    known = fields + list(TOTALS) + list(FILE_KEYS)
    changes: dict = {}
    for key, value in data.items():
        if key in FILE_KEYS:
            continue
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise SimError(f"{where}: unknown key {key!r} (= {value!r}); {hint}"
                           "keys are MachineSpec fields, sbuf_bytes, psum_bytes and base "
                           "(see docs/machine.md)")
        want = int if key in TOTALS else hints[key]
        changes[key] = _check_type(where, key, value, want, base)
    for total, per in TOTALS.items():
        if total in changes and per in changes:
            raise SimError(f"{where}: give either {total} = {changes[total]!r} or {per} = "
                           f"{changes[per]!r}, not both")
    changes.setdefault("name", default_name)
    try:
        return base.replace(**changes)
    except SimError as e:
        raise SimError(f"{where}: {e}") from None


def _check_type(where: str, key: str, value, want: type, base: MachineSpec):
    """`value` of `key` checked against the field type; ints are accepted for floats and the
    [pe_rate] table is merged into the base's."""
    bad = (want is int and (isinstance(value, bool) or not isinstance(value, int))
           or want is float and (isinstance(value, bool) or not isinstance(value, (int, float)))
           or want is bool and not isinstance(value, bool)
           or want is str and not isinstance(value, str)
           or want is dict and not isinstance(value, dict))
    if bad:
        what = "a [pe_rate] table of dtype = number" if want is dict else _TYPE_WORDS[want]
        raise SimError(f"{where}: {key} = {value!r} must be {what}")
    if want is float:
        if not math.isfinite(value):
            raise SimError(f"{where}: {key} = {value!r} must be a finite number")
        return float(value)
    if want is dict:
        rates = dict(getattr(base, key))
        for dt, r in value.items():
            if dt not in DTYPE_SIZE:
                near = difflib.get_close_matches(dt, list(DTYPE_SIZE), n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise SimError(f"{where}: {key}.{dt} = {r!r}: unknown dtype {dt!r}; {hint}"
                               f"known: {', '.join(DTYPE_SIZE)}")
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                    or not r > 0:
                raise SimError(f"{where}: {key}.{dt} = {r!r} must be a positive number "
                               "(throughput relative to bfloat16)")
            rates[dt] = float(r)
        return rates
    return value
