"""The grid of a sweep (:mod:`dmft.sweep`): the ``[sweep]`` table parsed into dimensions, the
points (one configuration each, in the ``dmft run`` format) and the checks made before any
point runs (unknown keys, structural mistakes: ValueError naming the grid key)."""
from __future__ import annotations

import copy
import itertools
import json
import os

import numpy as np

_TASK_SECTIONS = ("solve", "simulate", "fluctuations")
_SECTIONS = ("net", "data", "train") + _TASK_SECTIONS


def _flatten(table, prefix=""):
    """{"train": {"gamma0": [..]}} (TOML dotted keys) -> {"train.gamma0": [..]}."""
    flat = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _check_key(key, where="grid"):
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{where} key {key!r} must be 'section.key' (e.g. 'train.gamma0', "
                         f"'net.depth', 'solve.seed', 'simulate.width')")
    if parts[0] not in _SECTIONS:
        raise ValueError(f"{where} key {key!r}: unknown section {parts[0]!r}; use one of "
                         f"{', '.join(_SECTIONS)}")
    return parts


def _check_values(key, values):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"grid key {key!r} needs a list of values, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"grid key {key!r} has no values; give at least one")
    for v in values:
        if isinstance(v, np.generic):
            v = v.item()
        if not isinstance(v, (bool, int, float, str)):
            raise ValueError(f"grid key {key!r}: values must be numbers, strings or booleans "
                             f"(one coordinate per point), got {v!r}")
    return [v.item() if isinstance(v, np.generic) else v for v in values]


class _Axis:
    """One dimension of the grid: a name, its coordinates {key: values} and, for variants,
    the tables each entry merges in."""

    def __init__(self, name, coords, tables=None):
        self.name, self.coords, self.tables = name, coords, tables
        self.size = len(next(iter(coords.values())))


def expand_grid(grid=None, zip=None, variants=None):
    """Parse a grid (see the module docstring) into its dimensions.

    Returns a list of axes, each with ``name``, ``coords`` ({key: list of values}),
    ``tables`` (variants only) and ``size``. Raises ValueError naming a malformed key.
    """
    grid = dict(grid or {})
    if zip is not None:
        if "zip" in grid:
            raise ValueError("zip given both in the grid and as zip=; use one of the two")
        grid["zip"] = zip
    if variants is not None:
        if "variant" in grid:
            raise ValueError("variants given both in the grid and as variants=; use one")
        grid["variant"] = variants
    axes = []
    for key, value in grid.items():
        if key == "zip":
            groups = [value] if isinstance(value, dict) else value
            if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
                raise ValueError("grid 'zip' must be a table {key: [values]} or a list of "
                                 "such tables ([[sweep.zip]] in TOML)")
            for i, group in enumerate(groups):
                group = dict(group)
                name = group.pop("name", f"zip{i}")
                flat = _flatten(group)
                if not flat:
                    raise ValueError(f"zip group {name!r} has no keys")
                coords = {}
                for k, v in flat.items():
                    _check_key(k, "zip")
                    coords[k] = _check_values(k, v)
                sizes = {k: len(v) for k, v in coords.items()}
                if len(set(sizes.values())) != 1:
                    raise ValueError(f"zip group {name!r}: the keys vary together and need "
                                     f"lists of one length, got {sizes}")
                axes.append(_Axis(str(name), coords))
        elif key == "variant":
            if not isinstance(value, list) or not value or \
                    not all(isinstance(v, dict) for v in value):
                raise ValueError("grid 'variant' must be a non-empty list of tables, each "
                                 "with a 'name' and sections ([[sweep.variant]] in TOML)")
            names, tables = [], []
            for i, var in enumerate(value):
                var = dict(var)
                names.append(str(var.pop("name", f"variant{i}")))
                for sec, tab in var.items():
                    if sec not in _SECTIONS or not isinstance(tab, dict):
                        raise ValueError(f"variant {names[-1]!r}: {sec!r} is not a section "
                                         f"table; a variant holds tables among "
                                         f"{', '.join(_SECTIONS)} (and a name)")
                tables.append(var)
            if len(set(names)) != len(names):
                raise ValueError(f"variant names must differ, got {names}")
            axes.append(_Axis("variant", {"variant": names}, tables))
        elif isinstance(value, dict):
            for k, v in _flatten(value, key + ".").items():   # {"train": {"gamma0": [..]}}
                _check_key(k)
                axes.append(_Axis(k, {k: _check_values(k, v)}))
        else:
            _check_key(key)
            axes.append(_Axis(key, {key: _check_values(key, value)}))
    names = [a.name for a in axes]
    keys = [k for a in axes for k in a.coords]
    for seq, what in ((names, "dimension"), (keys, "key")):
        dup = sorted({n for n in seq if seq.count(n) > 1})
        if dup:
            raise ValueError(f"grid {what} {dup[0]!r} appears twice; give each once")
    return axes


def _merge_variant(cfg, tables):
    cfg = copy.deepcopy(cfg)
    if "solve" in tables:
        cfg.pop("simulate", None)
    if "simulate" in tables:
        cfg.pop("solve", None)
        cfg.pop("fluctuations", None)
    for sec, tab in tables.items():
        cfg[sec] = {**cfg.get(sec, {}), **copy.deepcopy(tab)}
    return cfg


def _points(base, axes):
    """Every point: (index tuple, coordinates {key: value}, config dict)."""
    points = []
    used = {k: False for a in axes for k in a.coords if k != "variant"}
    for idx in itertools.product(*(range(a.size) for a in axes)):
        cfg = copy.deepcopy(base)
        for a, i in zip(axes, idx):
            if a.tables is not None:
                cfg = _merge_variant(cfg, a.tables[i])
        coords = {}
        for a, i in zip(axes, idx):
            for key, values in a.coords.items():
                coords[key] = values[i]
                if a.tables is not None:
                    continue
                sec, name = key.split(".")
                if sec in _TASK_SECTIONS and sec not in cfg:
                    continue      # e.g. simulate.width on a DMFT variant's point
                cfg.setdefault(sec, {})[name] = values[i]
                used[key] = True
        if "solve" in cfg and "seed" not in cfg["solve"]:
            cfg["solve"]["seed"] = 0   # reproducible points (see the module docstring)
        points.append((idx, coords, cfg))
    unused = [k for k, u in used.items() if not u]
    if unused:
        sec = unused[0].split(".")[0]
        raise ValueError(f"grid key {unused[0]!r}: no point has a [{sec}] section (the base "
                         f"config and the variants give none); add [{sec}] or drop the key")
    return points


def _check_structure(points, base_dir, axes):
    """Unknown keys and structural mistakes are fatal (ValueError naming the grid key);
    bad values are left to the points (recorded as "invalid")."""
    from .config import parse_config
    keys = [k for a in axes for k in a.coords if k != "variant"]
    seen = set()
    for _, _, cfg in points:
        shape = json.dumps({s: sorted(t) for s, t in cfg.items() if isinstance(t, dict)},
                           sort_keys=True) + str(cfg.get("solve", {}).get("method"))
        if shape in seen:
            continue
        seen.add(shape)
        try:
            parse_config(copy.deepcopy(cfg), base_dir)
        except ValueError as exc:
            msg = str(exc)
            for key in keys:
                sec, name = key.split(".")
                if f"unknown key {name!r} in [{sec}]" in msg or \
                        ("unknown option" in msg and f"'{name}'" in msg and sec == "solve"):
                    raise ValueError(f"grid key {key!r}: {msg}") from None
            if "unknown key" in msg or "exactly one of" in msg or "has no [" in msg or \
                    "needs a [solve]" in msg or "unknown option" in msg:
                raise ValueError(f"the sweep's configuration: {msg}") from None


def _canonical(cfg) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))



# ------------------------------------------------------------------------------------------
# the sweep's spec: a base configuration and its [sweep] table
# ------------------------------------------------------------------------------------------
def _read_spec(spec):
    """(base config dict, grid from its [sweep] table or None, base_dir)."""
    if isinstance(spec, (str, os.PathLike)):
        from .config import read_toml
        path = os.fspath(spec)
        cfg = read_toml(path, "sweep file")
        base_dir = os.path.dirname(os.path.abspath(path))
    elif isinstance(spec, dict):
        cfg, base_dir = copy.deepcopy(spec), os.getcwd()
    else:
        raise ValueError(f"spec must be a config dict (the dmft run format) or a TOML path, "
                         f"got {type(spec).__name__}")
    table = cfg.pop("sweep", None)
    if table is not None and not isinstance(table, dict):
        raise ValueError("[sweep] must be a table of 'section.key' = [values]")
    extra = [k for k in cfg if k not in _SECTIONS]
    if extra:
        raise ValueError(f"unknown section {extra[0]!r} in the sweep's configuration; allowed: "
                         f"{', '.join(_SECTIONS)}, sweep")
    if table is not None:
        flat = {}
        for k, v in table.items():
            if k in ("zip", "variant"):
                flat[k] = v
            elif isinstance(v, dict):
                flat.update(_flatten(v, k + "."))
            else:
                flat[k] = v
        table = flat
    return cfg, table, base_dir

