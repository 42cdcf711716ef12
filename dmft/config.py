"""Run configurations: TOML files parsed into the spec objects at the edge of the library.

The library itself takes no free-form dicts; ``dmft run CONFIG.toml`` reads a file like ::

    [net]
    depth = 1                 # hidden layers (1: two-layer network)
    activation = "tanh"       # linear | tanh | relu | erf

    [data]                    # either a built-in generator ...
    generator = "teacher_student"
    P = 8                     # training points
    Q = 8                     # test points
    D = 10                    # input dimension
    seed = 0
    # ... or files (.npy, .csv, .txt; paths relative to the config file):
    # X_train = "X.npy"
    # y_train = "y.csv"
    # X_test = "Xt.npy"       # optional
    # y_test = "yt.npy"       # optional

    [train]
    gamma0 = 1.0
    lr = 0.1
    steps = 50

    [solve]                   # an infinite-width solve ...
    method = "mc"             # any name in dmft.METHODS, or "auto"
    seed = 0
    samples = 4000            # further keys are the method's options

    # [simulate]              # ... or finite-width networks (exactly one of the two)
    # width = 1024
    # seeds = 16              # an int n means seeds 0 .. n-1; or a list [0, 1, 5]
    # record_kernels = false
    # center = false

    # [fluctuations]          # optional, after [solve]: O(1/N) fluctuations; keys are
    # method = "propagator"   # options of dmft.fluctuations; the file then holds a
                              # Fluctuations (with the solution nested)

Unknown sections or keys raise ``ValueError`` naming them. The keys of [solve], [simulate] and
[fluctuations] are the fields of the method's options dataclass (``dmft.METHODS[method].Options``,
:class:`dmft._simulate.SimulateOptions`, :class:`dmft._fluctuations.FluctuationOptions`), plus
``seed`` / ``throw`` (and ``method``); their values are validated by that dataclass when the
file is read.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .specs import MLP, Dataset, GradientDescent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["RunConfig", "load_config", "parse_config", "teacher_student", "run"]

_SECTIONS = ("net", "data", "train", "solve", "simulate", "fluctuations")
_NET_KEYS = ("depth", "activation")
_TRAIN_KEYS = ("gamma0", "lr", "steps", "loss")
_GENERATOR_KEYS = ("generator", "P", "Q", "D", "seed", "teacher_width", "noise")
_FILE_KEYS = ("X_train", "y_train", "X_test", "y_test")
#: keys every method takes besides its options (the adapter skeleton's keywords)
_COMMON_KEYS = ("seed", "throw", "progress", "memory_limit")
_GENERATORS = ("teacher_student",)


def teacher_student(P: int = 8, Q: int = 8, D: int = 10, seed: int = 0, *,
                    teacher_width: int = 32, noise: float = 0.0) -> Dataset:
    """A small regression task: targets from a random two-layer tanh teacher.

    Inputs x ~ N(0, I_D) (so Phi^0 has unit diagonal on average). The teacher is
    ``f*(x) = sum_k a_k tanh(v_k . x / sqrt(D)) / sqrt(K)`` with K = ``teacher_width`` and
    a_k, v_k i.i.d. N(0, 1); all P + Q targets are divided by their root mean square, so that
    the targets have unit scale, then optional label noise ``noise * N(0, 1)`` is added to the
    training targets. Everything is drawn from ``numpy.random.default_rng(seed)``.

    Returns
    -------
    Dataset
        ``X_train`` (P, D), ``y_train`` (P,), ``X_test`` (Q, D), ``y_test`` (Q,) (or no test
        set when Q = 0).
    """
    for name, val, low in (("P", P, 1), ("Q", Q, 0), ("D", D, 1),
                           ("teacher_width", teacher_width, 1)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < low:
            raise ValueError(f"data.{name} must be an integer >= {low}, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"data.seed must be a non-negative integer, got {seed!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"data.noise must be a number >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    V = rng.standard_normal((teacher_width, D))
    a = rng.standard_normal(teacher_width)
    y = np.tanh(X @ V.T / np.sqrt(D)) @ a / np.sqrt(teacher_width)
    y /= np.sqrt(np.mean(y ** 2))
    y_train = y[:P] + noise * rng.standard_normal(P)
    if Q == 0:
        return Dataset(X[:P], y_train)
    return Dataset(X[:P], y_train, X[P:], y[P:])


@dataclass
class RunConfig:
    """A parsed configuration: the specs plus what to run.

    ``task`` is ``"solve"`` or ``"simulate"``; ``options`` are the keyword arguments of
    :func:`dmft.solve` (including ``method`` and ``seed``) or :func:`dmft.simulate`;
    ``fluctuations`` (or None) the options of :func:`dmft.fluctuations`.
    """

    net: MLP
    data: Dataset
    train: GradientDescent
    task: str
    options: dict = field(default_factory=dict)
    fluctuations: dict | None = None
    source: str = ""


def _unknown(section, table, allowed):
    extra = [k for k in table if k not in allowed]
    if extra:
        raise ValueError(f"unknown key {extra[0]!r} in [{section}] of the config; allowed keys: "
                         f"{', '.join(allowed)}")


def _table(cfg, name, required=True):
    if name not in cfg:
        if required:
            raise ValueError(f"the config has no [{name}] section; add one (see "
                             f"examples/*.toml)")
        return None
    table = cfg[name]
    if not isinstance(table, dict):
        raise ValueError(f"[{name}] must be a table (a [{name}] section), got {table!r}")
    return table


def _load_array(path, name, base_dir):
    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    if not os.path.exists(full):
        raise ValueError(f"data.{name}: file {full} does not exist")
    ext = os.path.splitext(full)[1].lower()
    try:
        if ext == ".npy":
            return np.load(full, allow_pickle=False)
        if ext in (".csv", ".txt", ".dat"):
            return np.loadtxt(full, delimiter="," if ext == ".csv" else None, ndmin=1)
    except ValueError as exc:
        raise ValueError(f"data.{name}: could not read {full}: {exc}") from None
    raise ValueError(f"data.{name}: unsupported file type {ext!r} for {full}; use .npy, "
                     f".csv or .txt")


def _parse_data(table, base_dir) -> Dataset:
    files = [k for k in _FILE_KEYS if k in table]
    if files and "generator" in table:
        raise ValueError("[data] gives both a generator and files; use one of the two")
    if files:
        _unknown("data", table, _FILE_KEYS)
        for req in ("X_train", "y_train"):
            if req not in table:
                raise ValueError(f"[data] reads files but {req!r} is missing; give paths for "
                                 f"X_train and y_train (and optionally X_test, y_test)")
        arrays = {}
        for k in files:
            if not isinstance(table[k], str):
                raise ValueError(f"data.{k} must be a file path string, got {table[k]!r}")
            arrays[k] = _load_array(table[k], k, base_dir)
        return Dataset(arrays["X_train"], arrays["y_train"], arrays.get("X_test"),
                       arrays.get("y_test"))
    _unknown("data", table, _GENERATOR_KEYS)
    generator = table.get("generator", "teacher_student")
    if generator not in _GENERATORS:
        raise ValueError(f"data.generator {generator!r} is unknown; use one of {_GENERATORS} "
                         f"or give X_train / y_train files")
    kw = {k: table[k] for k in _GENERATOR_KEYS[1:] if k in table}
    return teacher_student(**kw)


def _parse_seeds(value):
    if isinstance(value, bool):
        raise ValueError(f"simulate.seeds must be an integer count or a list, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"simulate.seeds must be >= 1 (number of networks), got {value}")
        return list(range(value))
    if isinstance(value, list):
        return value
    raise ValueError(f"simulate.seeds must be an integer count or a list of seeds, got "
                     f"{value!r}")


def parse_config(cfg: dict, base_dir: str = ".", source: str = "") -> RunConfig:
    """Turn the dict of a TOML file into a :class:`RunConfig` (validating every key)."""
    if not isinstance(cfg, dict):
        raise ValueError("a config must be a table of sections")
    _unknown("top level", cfg, _SECTIONS)
    net_t = _table(cfg, "net", required=False) or {}
    _unknown("net", net_t, _NET_KEYS)
    train_t = _table(cfg, "train")
    _unknown("train", train_t, _TRAIN_KEYS)
    data = _parse_data(_table(cfg, "data"), base_dir)
    net = MLP(**net_t)
    train = GradientDescent(**train_t)
    solve_t = _table(cfg, "solve", required=False)
    sim_t = _table(cfg, "simulate", required=False)
    fl_t = _table(cfg, "fluctuations", required=False)
    if (solve_t is None) == (sim_t is None):
        raise ValueError("the config needs exactly one of a [solve] or a [simulate] section")
    if sim_t is not None:
        if fl_t is not None:
            raise ValueError("[fluctuations] needs a [solve] section (it expands an "
                             "infinite-width solution), not [simulate]")
        from ._simulate import SIMULATE, SimulateOptions
        _unknown("simulate", sim_t, (*SimulateOptions.names(), "throw", "memory_limit"))
        if "width" not in sim_t:
            raise ValueError("[simulate] needs width = N (the hidden-layer width)")
        options = dict(sim_t)
        options["seeds"] = _parse_seeds(sim_t.get("seeds", 16))
        _check_options(SIMULATE, options)
        return RunConfig(net, data, train, "simulate", options, None, source)
    options = dict(solve_t)
    options.setdefault("method", "auto")
    if not isinstance(options["method"], str):
        raise ValueError(f"solve.method must be a string, got {options['method']!r}")
    adapter = _solve_adapter(options["method"], net)
    if adapter is not None:
        _check_options(adapter, options)
    if fl_t is not None:
        from ._fluctuations import FLUCTUATION_METHODS
        _check_options(FLUCTUATION_METHODS["auto"], fl_t)
    return RunConfig(net, data, train, "solve", options,
                     dict(fl_t) if fl_t is not None else None, source)


def _lookup(method, net):
    """The adapter behind ``method`` ("auto" resolved), or None if it is unknown or missing."""
    from . import api
    if method == "auto":
        method = "linear" if net.linear else "mc"
    return api.METHODS.get(method)


def _solve_adapter(method, net):
    """The adapter of ``method`` (None for an unknown method: reported when run)."""
    return _lookup(method, net)


def _check_options(adapter, table):
    """Validate a section's keys and values with the adapter's options dataclass (the
    messages of ``dmft.solve`` / ``dmft.fluctuations``)."""
    adapter.parse_options({k: v for k, v in table.items()
                           if k not in ("method", *_COMMON_KEYS)})


def load_config(path) -> RunConfig:
    """Read and validate a TOML run configuration (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            cfg = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_config(cfg, os.path.dirname(os.path.abspath(path)), source=path)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def run(config: RunConfig, *, progress=None):
    """Execute a configuration: a Solution, an Ensemble or (with [fluctuations]) Fluctuations."""
    from . import api
    if config.task == "simulate":
        return api.simulate(config.net, config.data, config.train, progress=progress,
                            **config.options)
    opts = dict(config.options)
    method = opts.pop("method")
    if progress is not None and "progress" not in opts:
        opts["progress"] = progress
    sol = api.solve(config.net, config.data, config.train, method=method, **opts)
    if config.fluctuations is not None:
        return api.fluctuations(sol, **config.fluctuations)
    return sol
