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
    # outputs = 3             # C teacher outputs: targets of shape (P, C)
    # classes = 3             # C-class labels (argmax of C teacher outputs), one-hot (P, C)
    # labels = true           # with one output: +-1 labels (sign of the teacher)
    # ... or files (.npy, .csv, .txt; paths relative to the config file):
    # X_train = "X.npy"
    # y_train = "y.csv"       # (P,) or (P, C) targets (one row per point)
    # X_test = "Xt.npy"       # optional
    # y_test = "yt.npy"       # optional
    # labels = true           # y files hold integer class labels 0 .. C-1 (one-hot targets)
    # classes = 10            # number of classes (default: 1 + the largest label)
    # ... or self-supervised views (Barlow Twins, docs/theory.rst §7):
    # generator = "views"     # M samples x 2 augmented views + Q labelled probe points
    # M = 8, Q = 16, D = 10, classes = 2, dim = 2 (embedding C), noise = 0.5, mask = 0.0

    [train]
    gamma0 = 1.0
    lr = 0.1
    steps = 50
    # loss = "mse"            # mse | cross_entropy | logistic | hinge (docs/theory.rst §7)
    # weight_decay = 0.0      # lambda (lr * weight_decay < 1)
    # decay_to = "init"       # init | zero
    # batch_size = 4          # omit for full batch
    # batch_seed = 0
    # schedule = "epochs"     # epochs | online
    # loss = "barlow_twins"   # with [data] generator = "views" ...
    # output_offset = "nngp"  # ... and an O(1) initial output (a fixed NNGP draw)
    # off_diagonal = 1.0      # lambda_off;  standardize = true;  offset_seed = 0

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

Unknown sections or keys raise ``ValueError`` naming them; so do targets that do not suit
``train.loss`` (e.g. cross-entropy on one output, logistic labels other than +-1) and a
``batch_size`` larger than the training set, checked when the file is read
(:meth:`dmft.GradientDescent.check`). The keys of [solve], [simulate] and
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

__all__ = ["RunConfig", "load_config", "parse_config", "teacher_student", "clustered_views",
           "run"]

_SECTIONS = ("net", "data", "train", "solve", "simulate", "fluctuations")
_NET_KEYS = ("depth", "activation")
_TRAIN_KEYS = ("gamma0", "lr", "steps", "loss", "weight_decay", "decay_to", "batch_size",
               "batch_seed", "schedule", "off_diagonal", "standardize", "output_offset",
               "offset_scale", "offset_seed")
_GENERATOR_KEYS = ("generator", "P", "Q", "D", "seed", "teacher_width", "noise", "outputs",
                   "classes", "labels")
_FILE_KEYS = ("X_train", "y_train", "X_test", "y_test")
#: keys of a [data] table that reads files, besides the file paths
_FILE_LABEL_KEYS = ("labels", "classes")
#: keys every method takes besides its options (the adapter skeleton's keywords)
_COMMON_KEYS = ("seed", "throw", "progress", "memory_limit")
_GENERATORS = ("teacher_student", "views")
#: keys of the "views" generator (:func:`clustered_views`)
_VIEWS_KEYS = ("generator", "M", "Q", "D", "seed", "classes", "dim", "noise", "mask",
               "separation")


def teacher_student(P: int = 8, Q: int = 8, D: int = 10, seed: int = 0, *,
                    teacher_width: int = 32, noise: float = 0.0, outputs: int = 1,
                    classes: int | None = None, labels: bool = False) -> Dataset:
    """A small regression or classification task from a random two-layer tanh teacher.

    Inputs x ~ N(0, I_D) (so Phi^0 has unit diagonal on average). The teacher is
    ``f*_c(x) = sum_k a_kc tanh(v_k . x / sqrt(D)) / sqrt(K)`` with K = ``teacher_width``,
    c = 1 .. C (C = ``outputs``) and a_kc, v_k i.i.d. N(0, 1); each output's P + Q targets
    are divided by their root mean square, so that the targets have unit scale, then optional
    label noise ``noise * N(0, 1)`` is added to the training targets. Everything is drawn from
    ``numpy.random.default_rng(seed)`` (one output: the same numbers as before ``outputs``
    existed).

    Classification (docs/theory.rst §7): ``classes = C`` draws C teacher outputs and labels
    each point by the largest (one-hot targets (P, C), :meth:`Dataset.from_labels`; for
    ``loss="cross_entropy"``); ``labels=True`` with one output gives the labels
    ``sign(f*)`` = +-1 (for ``loss="logistic"`` or ``"hinge"``). ``noise`` must be 0 then.

    Returns
    -------
    Dataset
        ``X_train`` (P, D), ``y_train`` (P,) or (P, C), ``X_test`` (Q, D), ``y_test`` (Q,) or
        (Q, C) (or no test set when Q = 0).
    """
    if classes is not None:
        if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) \
                or classes < 2:
            raise ValueError(f"data.classes must be an integer >= 2 (the number of classes), "
                             f"got {classes!r}")
        if outputs not in (1, classes):
            raise ValueError(f"data.classes = {classes} labels by the largest of {classes} "
                             f"teacher outputs, but data.outputs = {outputs!r}; drop outputs")
        outputs, labels = int(classes), True
    if not isinstance(labels, (bool, np.bool_)):
        raise ValueError(f"data.labels must be true or false, got {labels!r}")
    for name, val, low in (("P", P, 1), ("Q", Q, 0), ("D", D, 1),
                           ("teacher_width", teacher_width, 1), ("outputs", outputs, 1)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < low:
            raise ValueError(f"data.{name} must be an integer >= {low}, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"data.seed must be a non-negative integer, got {seed!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"data.noise must be a number >= 0, got {noise!r}")
    if labels and noise:
        raise ValueError(f"data.noise = {noise!r} adds Gaussian noise to regression targets, "
                         f"but the targets are class labels (data.labels / data.classes); "
                         f"set noise = 0")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    V = rng.standard_normal((teacher_width, D))
    C = int(outputs)
    a = rng.standard_normal(teacher_width if C == 1 else (teacher_width, C))
    y = np.tanh(X @ V.T / np.sqrt(D)) @ a / np.sqrt(teacher_width)
    y /= np.sqrt(np.mean(y ** 2, axis=0))
    if labels and C >= 2:
        cls = np.argmax(y, axis=1)
        return Dataset.from_labels(X[:P], cls[:P], X[P:] if Q else None,
                                   cls[P:] if Q else None, classes=C)
    if labels:
        y = np.where(y >= 0, 1.0, -1.0)
    y_train = y[:P] + noise * rng.standard_normal(y[:P].shape)
    if Q == 0:
        return Dataset(X[:P], y_train)
    return Dataset(X[:P], y_train, X[P:], y[P:])


def clustered_views(M: int = 8, Q: int = 16, D: int = 10, seed: int = 0, *, classes: int = 2,
                    dim: int = 2, noise: float = 0.5, mask: float = 0.0,
                    separation: float = 2.0) -> Dataset:
    """Self-supervised data (docs/theory.rst §7): M samples from ``classes`` Gaussian
    clusters, two augmented views each, and Q labelled probe points from the same clusters.

    Cluster centres ``separation * N(0, I_D) / sqrt(2)``, points centre + N(0, I_D) (labels
    k = i mod classes); views by :func:`dmft.augment.gaussian_noise` (``noise``) then, when
    ``mask`` > 0, :func:`dmft.augment.random_mask`. Everything from
    ``numpy.random.default_rng(seed)``. ``dim`` is the embedding dimension C. Train with
    ``GradientDescent(loss="barlow_twins", output_offset="nngp", ...)``; the probe points'
    labels feed :func:`dmft.linear_probe`.
    """
    from . import augment
    for name, val, low in (("M", M, 2), ("Q", Q, 0), ("D", D, 1), ("classes", classes, 2),
                           ("dim", dim, 1)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < low:
            raise ValueError(f"data.{name} must be an integer >= {low}, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"data.seed must be a non-negative integer, got {seed!r}")
    for name, val in (("noise", noise), ("mask", mask), ("separation", separation)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
            raise ValueError(f"data.{name} must be a number >= 0, got {val!r}")
    rng = np.random.default_rng(seed)
    centres = separation * rng.standard_normal((classes, D)) / np.sqrt(2.0)
    lab = np.arange(M + Q) % classes
    X = centres[lab] + rng.standard_normal((M + Q, D))
    aug = augment.gaussian_noise(float(noise))
    if mask > 0:
        aug = augment.compose(aug, augment.random_mask(float(mask)))
    return Dataset.augmented(X[:M], aug, dim=int(dim), seed=int(rng.integers(2 ** 31)),
                             X_test=X[M:] if Q else None, labels_test=lab[M:] if Q else None)


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
        _unknown("data", table, _FILE_KEYS + _FILE_LABEL_KEYS)
        for req in ("X_train", "y_train"):
            if req not in table:
                raise ValueError(f"[data] reads files but {req!r} is missing; give paths for "
                                 f"X_train and y_train (and optionally X_test, y_test)")
        arrays = {}
        for k in files:
            if not isinstance(table[k], str):
                raise ValueError(f"data.{k} must be a file path string, got {table[k]!r}")
            arrays[k] = _load_array(table[k], k, base_dir)
        labels = table.get("labels", "classes" in table)
        if not isinstance(labels, bool):
            raise ValueError(f"data.labels must be true (the y files hold integer class "
                             f"labels 0 .. C-1) or false, got {labels!r}")
        if labels:
            return _from_label_files(arrays, table.get("classes"))
        if "classes" in table:
            raise ValueError("data.classes needs data.labels = true (or no labels key)")
        return Dataset(arrays["X_train"], arrays["y_train"], arrays.get("X_test"),
                       arrays.get("y_test"))
    generator = table.get("generator", "teacher_student")
    if generator not in _GENERATORS:
        raise ValueError(f"data.generator {generator!r} is unknown; use one of {_GENERATORS} "
                         f"or give X_train / y_train files")
    if generator == "views":
        _unknown("data", table, _VIEWS_KEYS)
        return clustered_views(**{k: table[k] for k in _VIEWS_KEYS[1:] if k in table})
    _unknown("data", table, _GENERATOR_KEYS)
    kw = {k: table[k] for k in _GENERATOR_KEYS[1:] if k in table}
    return teacher_student(**kw)


def _from_label_files(arrays, classes):
    """A classification Dataset (one-hot targets) from files of integer labels 0 .. C-1."""
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int)
                                or classes < 2):
        raise ValueError(f"data.classes must be an integer >= 2 (the number of classes), "
                         f"got {classes!r}")
    for k in ("y_train", "y_test"):
        y = arrays.get(k)
        if y is None:
            continue
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or not np.all(np.isfinite(y)) or np.any(y != np.round(y)) \
                or np.any(y < 0):
            raise ValueError(f"data.{k}: with labels = true the file must hold one integer "
                             f"class label 0 .. C-1 per point (a column), got shape "
                             f"{np.shape(arrays[k])}" + ("" if y.ndim != 1 else
                                                          " with non-integer or negative "
                                                          "values"))
        arrays[k] = y.astype(np.int64)
    try:
        return Dataset.from_labels(arrays["X_train"], arrays["y_train"], arrays.get("X_test"),
                                   arrays.get("y_test"), classes=classes)
    except ValueError as exc:
        raise ValueError(f"[data] with labels = true: {exc}") from None


def _parse_train(table) -> GradientDescent:
    """The [train] table; TOML has no null, so full batch is written by omitting batch_size."""
    bs = table.get("batch_size")
    if "batch_size" in table and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
        raise ValueError(f"train.batch_size must be an integer >= 1 (points per step), got "
                         f"{bs!r}; omit the key for full-batch training")
    return GradientDescent(**table)


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
    train = _parse_train(train_t)
    try:
        train.check(data)
    except ValueError as exc:
        raise ValueError(f"[train] does not suit [data]: {exc}") from None
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


def read_toml(path, what: str = "config file") -> dict:
    """The table of a TOML file; ValueError (naming ``what`` and the path) when it is missing
    or not valid TOML."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{what} {path} does not exist")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None


def load_config(path) -> RunConfig:
    """Read and validate a TOML run configuration (see the module docstring)."""
    path = os.fspath(path)
    cfg = read_toml(path)
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
