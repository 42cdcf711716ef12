"""Sweeps: grids of solves, simulations and fluctuation expansions, run on dask, one result.

A sweep is a base configuration in the ``dmft run`` format (:mod:`dmft.config`: a dict or a
TOML file) plus grid axes over any of its keys, spelled ``"section.key"``::

    import dmft
    base = {"net": {"depth": 1, "activation": "tanh"},
            "data": {"P": 8, "Q": 8, "D": 10},
            "train": {"gamma0": 1.0, "lr": 0.1, "steps": 50},
            "solve": {"method": "mc", "samples": 4000, "seed": 0}}
    ds = dmft.sweep(base, {"train.gamma0": [0.25, 0.5, 1, 2], "net.depth": [1, 2, 3]},
                    out="sweep.h5")          # an xarray.Dataset; also written to sweep.h5
    ds.final_test_loss.sel({"net.depth": 2})

Grid
----
- ``{"key": [v1, v2, ...]}``: one dimension named ``key`` per axis; the points are the
  Cartesian product of the axes (in the order given; the last axis varies fastest).
- ``{"zip": {"train.lr": [...], "train.steps": [...]}}`` (or a list of such tables, each
  with an optional ``"name"``): keys that vary together, one dimension (``zip0``, ``zip1``
  ... or the name) with each key as a coordinate along it.
- ``{"variant": [{"name": "dmft", "solve": {...}}, {"name": "N=256", "simulate": {...}}]}``:
  one dimension ``variant`` whose entries merge whole tables into the base configuration
  (a variant giving ``[solve]`` drops the base's ``[simulate]`` and vice versa, one giving
  ``[simulate]`` also drops ``[fluctuations]``), so that DMFT and networks of several widths
  sit side by side in one Dataset. Axes over ``solve.*`` / ``simulate.*`` /
  ``fluctuations.*`` keys apply to the points that have that section.

In TOML the grid is the ``[sweep]`` table (``train.gamma0 = [...]``, ``[[sweep.zip]]``,
``[[sweep.variant]]``), see docs/sweeps.rst and examples/sweeps/*.toml.

Points with the same configuration (e.g. a DMFT point repeated along a ``simulate.width``
axis) are computed once. A ``[solve]`` table without ``seed`` gets ``seed = 0``, so that every
point is reproducible: all points then use the same random numbers (common random numbers,
which makes differences between neighbouring points smoother); make ``solve.seed`` an axis
(or zip it with another axis) for independent draws. Seeds never depend on the worker count
or on the order in which points finish.

Execution
---------
By default an embedded ``dask.distributed.LocalCluster`` (processes, one thread per worker,
``workers`` = the number of cores; BLAS, OpenMP and numba limited to one thread per worker);
``client=`` a ``distributed.Client`` or ``scheduler="tcp://host:port"`` for an existing
cluster (dask-jobqueue on Slurm: examples/sweep_slurm.py); ``serial=True`` runs the points in
this process without dask (debugging; the numbers are bit-for-bit those of the cluster run).

Persistence
-----------
Every finished point is written as it completes, atomically, into ``OUT.points/``:
``NNNN.h5`` (the full result, :func:`dmft.save`) and ``NNNN.npz`` (status, message, elapsed,
the point's configuration and the summaries that go into the sweep file). A point is done when
its ``.npz`` exists with the same configuration (and, for a result, its ``.h5`` exists);
rerunning the same sweep after a crash, Ctrl-C or ``kill -9`` computes only the other points.
Points that failed (any status but "converged") are recorded (``status``, ``message``); a
rerun computes again those whose failure may not recur (out of memory, a lost worker, an
unexpected exception) and reuses the others unless ``retry_failed=True``. The sweep file ``OUT`` (netCDF4-compatible HDF5, written atomically at
the end) opens with ``xarray.open_dataset(OUT, engine="h5netcdf")`` or :func:`load_sweep`;
the two-time kernels stay in the per-point files, :func:`load_point` reads one.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import itertools
import json
import logging
import os
import sys
import time

import numpy as np

from . import _atomic
from ._progress import progress_bar

__all__ = ["sweep", "load_sweep", "load_point", "expand_grid", "STATUSES"]

logger = logging.getLogger("dmft.sweep")

#: a point's status: the result's own ("converged", "not_converged", "diverged") or why it
#: has no result: "invalid" (ValueError: a bad combination of values), "out_of_memory",
#: "error" (any other exception), "worker_died" (the dask worker was lost, e.g. killed for
#: memory)
STATUSES = ("converged", "not_converged", "diverged", "invalid", "out_of_memory", "error",
            "worker_died")
#: failures that may not recur (memory pressure, a lost worker, an unexpected exception):
#: recomputed by every rerun; the others are reused unless ``retry_failed=True``
TRANSIENT = ("out_of_memory", "error", "worker_died")
_TASK_SECTIONS = ("solve", "simulate", "fluctuations")
_SECTIONS = ("net", "data", "train") + _TASK_SECTIONS
#: environment of the embedded cluster's workers: one thread for every numerical library
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1"}
#: dask configuration of the embedded cluster's workers: one thread per library and glibc's
#: own malloc thresholds (no MALLOC_TRIM_THRESHOLD_), no statistical profiler, slow ticks
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ": dict(WORKER_ENV),
                 "distributed.worker.profile.enabled": False,
                 "distributed.admin.tick.interval": "500ms",
                 "distributed.admin.system-monitor.interval": "2s",
                 "distributed.admin.system-monitor.gil.enabled": False,
                 "distributed.worker.memory.monitor-interval": "1s"}
_DASK_MISSING = ('dmft.sweep runs on dask.distributed, which is not installed: '
                 'pip install "dmft[sweeps]" (or pass serial=True / --serial to run the '
                 'points one after another in this process)')
#: variables that measure the run, not its numbers (left out of identity checks)
TIMING_VARIABLES = ("elapsed", "cpu_time")


# ------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------
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
# one point (runs on a worker, or here with serial=True)
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n):
    """Limit BLAS / OpenMP / numba (and torch, when imported) to ``n`` threads, so that a
    point gives the same bits in this process as on a one-thread worker."""
    from threadpoolctl import threadpool_limits
    import numba
    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    torch = sys.modules.get("torch")
    prev_torch = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        numba.set_num_threads(prev)
        if torch is not None:
            torch.set_num_threads(prev_torch)


def run_point(cfg, base_dir=".", threads=1, keep_arrays=False, save_to=None):
    """Run one point's configuration like ``dmft run`` (with ``throw=False`` unless the
    configuration says otherwise); never raises for a failed point.

    With ``save_to`` (a path) the result is written there (:func:`dmft.save`, atomic) by this
    process, so that only the summaries travel back from a worker.

    Returns a dict: ``status``, ``message``, ``elapsed`` and ``cpu`` (s), ``kind`` (the result
    class name, "" without a result), ``result`` (the Solution, Ensemble or Fluctuations;
    None without one or once saved), ``saved`` (bool) and ``summary`` ({name: (dims, array)}).
    """
    from .config import parse_config, run
    from .results import ConvergenceError
    start, cpu = time.perf_counter(), time.process_time()
    result, summary, saved = None, {}, False
    try:
        with _threads(threads):
            rc = parse_config(copy.deepcopy(cfg), base_dir)
            rc.options.setdefault("throw", False)
            if rc.fluctuations is not None:
                rc.fluctuations.setdefault("throw", False)
            result = run(rc, progress=False)
            summary = summarize(result, keep_arrays=keep_arrays)
        status = result.status or ("converged" if result.converged else "not_converged")
        message = result.message or ""
    except ConvergenceError as exc:
        result = getattr(exc, "result", None)
        status = getattr(result, "status", None) or "not_converged"
        message = str(exc)
        if result is not None:
            summary = summarize(result, keep_arrays=keep_arrays)
    except MemoryError as exc:
        result, status = None, "out_of_memory"
        message = f"out of memory ({exc or 'MemoryError'}); reduce steps / points / samples"
    except ValueError as exc:
        # the solvers' memory estimate refuses a problem with a ValueError (dmft._resources
        # .check) whose message says how much is available: that is memory, not bad input
        status = "out_of_memory" if "GiB are available" in str(exc) else "invalid"
        result, message = None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, the sweep goes on
        result, status, message = None, "error", f"{type(exc).__name__}: {exc}"
    kind = type(result).__name__ if result is not None else ""
    if result is not None and save_to is not None:
        from .io import save
        try:
            save(result, save_to)
            result, saved = None, True
        except ValueError as exc:   # e.g. an option value HDF5 cannot store
            result, kind, summary = None, "", {}
            status, message = "error", f"cannot save the result: {exc}"
    return {"status": status, "message": message, "result": result, "summary": summary,
            "kind": kind, "saved": saved,
            "elapsed": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def _flat_ntk(ntk):
    """(..., T+1, n, n) or (..., T+1, n, C, n, C) -> (..., T+1, nC, nC)."""
    if ntk.ndim >= 5 and ntk.shape[-1] == ntk.shape[-3] and ntk.shape[-2] == ntk.shape[-4]:
        lead = ntk.shape[:-4]
        n, C = ntk.shape[-4], ntk.shape[-3]
        return ntk.reshape(*lead, n * C, n * C)
    return ntk


def _ntk_change(K):
    """|K(t) - K(0)|_F / |K(0)|_F, K of shape (..., T+1, m, m) -> (..., T+1)."""
    num = np.sqrt(np.sum((K - K[..., :1, :, :]) ** 2, axis=(-2, -1)))
    den = np.sqrt(np.sum(K[..., :1, :, :] ** 2, axis=(-2, -1)))
    return num / den


def _alignment(K, y):
    """Kernel-target alignment y^T K y / (|K|_F |y|^2) on the training block, K (..., T+1,
    m, m) with the train points first, y the flattened (point-major) training targets."""
    m = y.size
    Kt = K[..., :m, :m]
    return np.einsum("i,...ij,j->...", y, Kt, y) / (
        np.sqrt(np.sum(Kt ** 2, axis=(-2, -1))) * np.dot(y, y))


def summarize(result, keep_arrays=False) -> dict:
    """The per-point numbers of the sweep file, {name: (dims, array)} (see :func:`_summarize`
    for the dims and the definitions)."""
    with np.errstate(all="ignore"):   # diverged results overflow: inf / NaN are the answer
        return _summarize(result, keep_arrays)


def _summarize(result, keep_arrays):
    """The per-point numbers of the sweep file: {name: (dims, array)}.

    Dims: ``step`` (0 .. T), ``train_point`` / ``test_point`` (and ``output`` with C >= 2
    outputs), ``point`` / ``point_`` (all P + Q points, times outputs). For an Ensemble the
    predictions and losses are means over the networks, their ``*_stderr`` the standard
    errors of those means, the NTK summaries means of the per-network values, and
    ``test_prediction_nvar`` is N times the variance over networks; for Fluctuations the
    numbers are the nested solution's and ``test_prediction_nvar`` the propagator's
    N Var of the test predictions (the diagonal of ``prediction_cov``).
    """
    from .results import Ensemble, Fluctuations
    out = {}
    fl = result if isinstance(result, Fluctuations) else None
    ens = result if isinstance(result, Ensemble) else None
    sol = fl.solution if fl is not None else result
    multi = sol.data.multi_output
    pdims = ("output",) if multi else ()
    out["t"] = (("step",), np.asarray(sol.t, dtype=float))
    if ens is not None:
        S = ens.n_seeds
        mean = ens.mean()
        for split in ("train", "test"):
            pred = getattr(ens, f"{split}_predictions")
            out[f"{split}_predictions"] = ((("step", f"{split}_point") + pdims),
                                           getattr(mean, f"{split}_predictions"))
            if S > 1:
                out[f"{split}_predictions_stderr"] = (
                    ("step", f"{split}_point") + pdims,
                    np.std(pred, axis=0, ddof=1) / np.sqrt(S))
            loss = getattr(ens, f"{split}_loss")
            if loss is not None:
                out[f"{split}_loss"] = (("step",), np.mean(loss, axis=0))
                if S > 1:
                    out[f"{split}_loss_stderr"] = (("step",),
                                                   np.std(loss, axis=0, ddof=1) / np.sqrt(S))
            acc = getattr(ens, f"{split}_accuracy")
            if acc is not None:
                out[f"{split}_accuracy"] = (("step",), np.mean(acc, axis=0))
        nvar = np.full(ens.test_predictions.shape[1:], np.nan)
        if S > 1:
            nvar = ens.width * np.var(ens.test_predictions, axis=0, ddof=1)
        out["test_prediction_nvar"] = (("step", "test_point") + pdims, nvar)
        K = _flat_ntk(np.asarray(ens.ntk))
        out["ntk_change"] = (("step",), np.mean(_ntk_change(K), axis=0))
        out["ntk_alignment"] = (("step",), np.mean(
            _alignment(K, np.asarray(sol.data.y_train, float).ravel()), axis=0))
        Kmean = np.mean(K, axis=0)
    else:
        for split in ("train", "test"):
            out[f"{split}_predictions"] = (("step", f"{split}_point") + pdims,
                                           np.asarray(getattr(sol, f"{split}_predictions")))
            se = sol.stderr.get(f"{split}_predictions") if sol.stderr else None
            if se is not None:
                out[f"{split}_predictions_stderr"] = (("step", f"{split}_point") + pdims,
                                                      np.asarray(se))
            for name in ("loss", "accuracy"):
                val = getattr(sol, f"{split}_{name}")
                if val is not None:
                    out[f"{split}_{name}"] = (("step",), np.asarray(val, float))
        if fl is not None:
            P, Q = sol.P, sol.Q
            cov = np.asarray(fl.prediction_cov)
            if multi:
                d = np.einsum("tici->tic", cov)
            else:
                d = np.einsum("tii->ti", cov)
            out["test_prediction_nvar"] = (("step", "test_point") + pdims, d[:, P:P + Q])
        K = _flat_ntk(np.asarray(sol.ntk))
        out["ntk_change"] = (("step",), _ntk_change(K))
        out["ntk_alignment"] = (("step",),
                                _alignment(K, np.asarray(sol.data.y_train, float).ravel()))
        Kmean = K
    if getattr(sol.data, "paired", False):
        _representation(out, sol if ens is None else ens, ens is not None)
    for name in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "ntk_change",
                 "ntk_alignment", "linear_probe", "off_diagonal_mass"):
        if name in out:
            out[f"final_{name}"] = ((), np.asarray(out[name][1][-1]))
    if keep_arrays:
        out["ntk"] = (("step", "point", "point_"), Kmean)
    return {k: (dims, np.asarray(v)) for k, (dims, v) in out.items()}


def _representation(out, result, ens):
    """Self-supervised read-outs (docs/theory.rst §7; means over the networks of an
    Ensemble): the views' cross-correlation C_ij(t) (dims step, embed, embed_), its
    off-diagonal mass sum_{i != j} C_ij^2 and, with labelled test points, the linear-probe
    accuracy. The kernel-target alignment has no targets here and is left out."""
    from .representation import cross_correlation, linear_probe
    out.pop("ntk_alignment", None)
    try:
        cc = cross_correlation(result)
    except FloatingPointError:          # a collapsed embedding: standardisation undefined
        cc = None
    if cc is not None:
        off = cc * (1.0 - np.eye(cc.shape[-1]))
        mass = np.sum(off * off, axis=(-2, -1))
        out["cross_correlation"] = (("step", "embed", "embed_"),
                                    np.mean(cc, axis=0) if ens else cc)
        out["off_diagonal_mass"] = (("step",), np.mean(mass, axis=0) if ens else mass)
    data = result.data
    if getattr(data, "labels_test", None) is not None and data.Q >= 4:
        acc = linear_probe(result)
        out["linear_probe"] = (("step",), np.mean(acc, axis=0) if ens else acc)


# ------------------------------------------------------------------------------------------
# per-point files
# ------------------------------------------------------------------------------------------
def _point_paths(points_dir, index):
    stem = os.path.join(points_dir, f"{index:04d}")
    return stem + ".h5", stem + ".npz"


def _write_record(path, meta, summary):
    arrays = {f"v_{k}": v for k, (_, v) in summary.items()}
    meta = dict(meta, dims={k: list(d) for k, (d, _) in summary.items()})
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()

    def write(fd):
        _atomic._write_all(fd, data)

    _atomic.replace_atomically(os.path.abspath(path), os.path.dirname(os.path.abspath(path)),
                               write)


def _read_record(path):
    """(meta, summary) of a point's record, or None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            summary = {k: (tuple(d), z[f"v_{k}"]) for k, d in meta["dims"].items()}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        if os.path.exists(path):
            logger.warning("sweep: ignoring unreadable point record %s (%s); recomputing",
                           path, exc)
        return None
    return meta, summary


def _persist(res, indices, points_dir, specs):
    """Write one finished computation for each point index that shares it: its result file
    first (unless the worker wrote the first one), then its record."""
    from .io import save
    first = _point_paths(points_dir, indices[0])[0]
    if res["result"] is not None:
        try:
            save(res["result"], first)
            res.update(result=None, saved=True)
        except ValueError as exc:   # e.g. an option value HDF5 cannot store
            res.update(status="error", message=f"cannot save the result: {exc}", result=None,
                       kind="", summary={}, saved=False)
    metas = []
    for i in indices:
        h5, rec = _point_paths(points_dir, i)
        if res["saved"] and i != indices[0]:     # the same configuration: the same file
            with open(first, "rb") as fh:
                data = fh.read()
            _atomic.replace_atomically(h5, points_dir,
                                       lambda fd, data=data: _atomic._write_all(fd, data))
        meta = {"status": res["status"], "message": res["message"], "elapsed": res["elapsed"],
                "cpu": res.get("cpu", float("nan")), "spec": specs[i], "kind": res["kind"],
                "file": os.path.basename(h5) if res["saved"] else ""}
        _write_record(rec, meta, res["summary"] if res["saved"] else {})
        metas.append(meta)
    return metas


# ------------------------------------------------------------------------------------------
# the sweep
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


def _client(client, scheduler, workers):
    """(client, things to close) for the requested execution."""
    try:
        import distributed
    except ImportError:
        raise ImportError(_DASK_MISSING) from None
    if client is not None:
        if scheduler is not None:
            raise ValueError("give client= or scheduler=, not both")
        return client, []
    if scheduler is not None:
        if workers is not None:
            raise ValueError("workers= sizes the embedded LocalCluster; with scheduler= the "
                             "cluster's own workers run the points (drop workers)")
        c = distributed.Client(scheduler)
        return c, [c]
    import dask
    n = workers if workers is not None else (os.cpu_count() or 1)
    # WORKER_CONFIG (handed on by the nannies): dask's nannies set MALLOC_TRIM_THRESHOLD_ in
    # the workers' environment, which switches off glibc's dynamic mmap threshold, so every
    # large numpy temporary of the solvers becomes an mmap + page faults: the same points ran
    # 35 % slower in a one-worker cluster than in this process (benchmarks/sweep.py; with the
    # defaults restored, the 2-worker cluster takes 0.52 x the serial wall time). The
    # statistical profiler and the frequent ticks are off too (they only add GIL traffic).
    with dask.config.set(WORKER_CONFIG):
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None, env=dict(WORKER_ENV))
    c = distributed.Client(cluster)
    return c, [c, cluster]


def sweep(spec, grid=None, *, out, client=None, scheduler=None, workers=None, serial=False,
          zip=None, variants=None, progress=None, keep_arrays=False, retry_failed=False,
          threads=1, worker_writes=None, log=None):
    """Run a grid of configurations; returns the sweep as an ``xarray.Dataset``.

    Parameters
    ----------
    spec : dict or path
        The base configuration (the ``dmft run`` format, :mod:`dmft.config`) as a dict or a
        TOML file; a ``[sweep]`` table in it gives the grid when ``grid`` is None. Data files
        are found relative to the TOML file (a dict: the working directory).
    grid : dict, optional
        ``{"section.key": [values], "zip": {...} or [{...}, ...], "variant": [{...}, ...]}``
        (module docstring). ``zip=`` / ``variants=`` may be given separately.
    out : path
        The sweep file (netCDF4-compatible HDF5); per-point files go to ``out + ".points"``.
    client, scheduler, workers, serial
        Where the points run: an existing ``distributed.Client``, a scheduler address, the
        size of the embedded ``LocalCluster`` (default: the number of cores), or
        ``serial=True`` for this process without dask.
    progress : bool or None
        Progress bar over points (None: when standard error is a terminal).
    keep_arrays : bool
        Also put the (seed-mean) equal-time NTK ``ntk`` (``step, point, point_``) in the sweep
        file (the two-time kernels always stay in the per-point files).
    retry_failed : bool
        Recompute the points an earlier run recorded with a status other than "converged".
        By default a rerun reuses every recorded point except those whose failure may not
        recur (:data:`TRANSIENT`: "out_of_memory", "error", "worker_died").
    threads : int
        Threads per point for BLAS / numba (1 keeps serial and cluster runs bit-identical).
    worker_writes : bool or None
        Whether the workers write the per-point result files themselves (they need the
        sweep's folder on a shared file system) or send the results back for this process
        to write. None: the workers of the embedded LocalCluster write; those of ``client=``
        / ``scheduler=`` clusters send back (set True for a cluster that shares the folder,
        e.g. Slurm with a shared home). The records (``.npz``) are always written here.
    log : callable, optional
        Called with one line per finished point (default: the ``dmft.sweep`` logger, INFO).

    Returns
    -------
    xarray.Dataset
        Dimensions: the grid's, then ``step``, ``train_point`` / ``test_point`` (``output``);
        variables :func:`summarize` lists plus ``status``, ``message``, ``elapsed``,
        ``cpu_time`` (the two timings, :data:`TIMING_VARIABLES`), ``spec``
        (JSON), ``kind``, ``point_file``. ``attrs``: ``points``, ``computed``, ``reused``,
        ``failed`` (points whose status is not "converged"), ``distinct_computed``,
        ``grid`` (JSON), ``base_spec`` (JSON), ``points_dir``.

    Raises
    ------
    ValueError
        Malformed grid or base configuration (naming the key), an unwritable ``out``.
    ImportError
        dask.distributed is missing (``pip install "dmft[sweeps]"``) and ``serial`` is False.
    """
    if isinstance(workers, bool) or (workers is not None and
                                     (not isinstance(workers, int) or workers < 1)):
        raise ValueError(f"workers must be an integer >= 1 (processes of the local cluster), "
                         f"got {workers!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1 (BLAS / numba threads per point), "
                         f"got {threads!r}")
    if serial and (client is not None or scheduler is not None or workers is not None):
        raise ValueError("serial=True runs the points in this process; drop client / "
                         "scheduler / workers")
    if out is None:
        raise ValueError("out= is required: the sweep file to write (e.g. out='sweep.h5')")
    out = os.path.abspath(os.fspath(out))
    directory = os.path.dirname(out)
    if not os.path.isdir(directory):
        raise ValueError(f"out={out}: the folder {directory} does not exist; create it first")
    if os.path.isdir(out):
        raise ValueError(f"out={out} is a directory; give a file name such as sweep.h5")
    base, table, base_dir = _read_spec(spec)
    if grid is None:
        grid = table or {}
    elif table:
        raise ValueError("the spec has a [sweep] table and grid= is given too; use one")
    axes = expand_grid(grid, zip=zip, variants=variants)
    points = _points(base, axes)
    _check_structure(points, base_dir, axes)
    _xarray()   # before any work
    if not serial:
        try:
            import distributed  # noqa: F401 - fail before any work when it is missing
        except ImportError:
            raise ImportError(_DASK_MISSING) from None
    say = log if log is not None else logger.info
    points_dir = out + ".points"
    os.makedirs(points_dir, exist_ok=True)
    specs = [_canonical(cfg) for _, _, cfg in points]

    records, todo = {}, []
    for i, s in enumerate(specs):
        h5, rec = _point_paths(points_dir, i)
        got = _read_record(rec) if os.path.exists(rec) else None
        if got is not None and got[0]["spec"] == s and \
                (not got[0]["file"] or os.path.exists(h5)) and \
                got[0]["status"] not in TRANSIENT and \
                not (retry_failed and got[0]["status"] != "converged"):
            records[i] = got
        else:
            todo.append(i)
    reused = len(records)
    # identical configurations are computed once
    unique = {}
    for i in todo:
        unique.setdefault(specs[i], []).append(i)
    say(f"sweep: {len(points)} points ({' x '.join(f'{a.name}={a.size}' for a in axes) or 1}"
        f"), {reused} already done, {len(todo)} to compute"
        f"{f' ({len(unique)} distinct)' if len(unique) != len(todo) else ''}"
        f" -> {out}")
    bar = progress_bar(len(points), "sweep", progress, unit="point")
    bar.update(reused)
    width = len(str(len(points) - 1))

    def finish(indices, res):
        metas = _persist(res, indices, points_dir, specs)
        for i, meta in ((indices[k], metas[k]) for k in range(len(indices))):  # zip= shadows
            records[i] = (meta, res["summary"] if meta["file"] else {})
            coords = ", ".join(f"{k}={v}" for k, v in points[i][1].items())
            note = "" if meta["status"] == "converged" else f": {meta['message'][:200]}"
            say(f"sweep: point {i:>{width}d}/{len(points)} [{coords}] {meta['status']} in "
                f"{res['elapsed']:.2f} s{note}")
            bar.update(1)

    closers = []
    try:
        if unique and serial:
            for indices in unique.values():
                finish(indices, run_point(points[indices[0]][2], base_dir, threads,
                                          keep_arrays, _point_paths(points_dir, indices[0])[0]))
        elif unique:
            if worker_writes is None:
                worker_writes = client is None and scheduler is None
            c, closers = _client(client, scheduler, workers)
            futures = {}
            for indices in unique.values():
                save_to = _point_paths(points_dir, indices[0])[0] if worker_writes else None
                f = c.submit(run_point, points[indices[0]][2], base_dir, threads, keep_arrays,
                             save_to, pure=False)
                futures[f] = indices
            for f in distributed.as_completed(list(futures)):
                if f.status == "error":
                    exc = f.exception()
                    killed = type(exc).__name__ == "KilledWorker"
                    res = {"status": "worker_died" if killed else "error",
                           "message": (f"the dask worker running this point died (often: "
                                       f"killed for exceeding its memory limit): {exc}")
                           if killed else f"{type(exc).__name__}: {exc}",
                           "result": None, "summary": {}, "elapsed": float("nan"),
                           "cpu": float("nan"), "kind": "", "saved": False}
                else:
                    res = f.result()
                finish(futures.pop(f), res)
                f.release()
    finally:
        bar.close()
        for obj in closers:
            with contextlib.suppress(Exception):
                obj.close()
    failed = sum(1 for m, _ in records.values() if m["status"] != "converged")
    ds = _assemble(axes, points, specs, records, out, points_dir, base)
    ds.attrs.update(computed=len(todo), reused=reused, failed=failed,
                    distinct_computed=len(unique))
    _write_dataset(ds, out)
    say(f"sweep: done, {len(points)} points: {len(todo)} computed, {reused} reused, "
        f"{failed} failed -> {out}")
    return ds


def _xarray():
    try:
        import xarray
        importlib.import_module("h5netcdf")   # the engine of the sweep file
    except ImportError:
        raise ImportError('the sweep file is written and read through xarray (h5netcdf '
                          'engine), which is not installed: pip install "dmft[sweeps]"') from None
    return xarray


def _assemble(axes, points, specs, records, out, points_dir, base):
    xr = _xarray()
    shape = tuple(a.size for a in axes)
    gdims = tuple(a.name for a in axes)
    n = len(points)
    # the union of variables, each padded (NaN) to the largest shape any point has
    var_dims, var_shape, var_dtype = {}, {}, {}
    for meta, summary in records.values():
        for k, (dims, arr) in summary.items():
            if k in var_dims and var_dims[k] != dims:
                if dims + ("output",) == var_dims[k]:
                    dims = var_dims[k]
                elif var_dims[k] + ("output",) == dims:
                    var_shape[k] = var_shape[k] + (1,)
                else:
                    raise ValueError(f"sweep: variable {k} has dims {dims} and {var_dims[k]} "
                                     f"at different points")
            var_dims[k] = dims
            s = arr.shape + (1,) * (len(dims) - arr.ndim)
            var_shape[k] = tuple(max(a, b) for a, b in
                                 zip(var_shape.get(k, s), s)) if k in var_shape else s
            var_dtype[k] = np.result_type(var_dtype.get(k, np.float64), arr.dtype, np.float64) \
                if arr.dtype.kind in "fiub" else arr.dtype
    data = {k: np.full((n,) + var_shape[k], np.nan, dtype=var_dtype[k]) for k in var_dims}
    status = np.empty(n, dtype=object)
    message = np.empty(n, dtype=object)
    kind = np.empty(n, dtype=object)
    pfile = np.empty(n, dtype=object)
    elapsed = np.full(n, np.nan)
    cpu = np.full(n, np.nan)
    for i in range(n):
        meta, summary = records[i]
        status[i], message[i], kind[i] = meta["status"], meta["message"], meta["kind"]
        pfile[i] = os.path.join(os.path.basename(points_dir), meta["file"]) \
            if meta["file"] else ""
        elapsed[i] = meta["elapsed"]
        cpu[i] = meta.get("cpu", np.nan)
        for k, (dims, arr) in summary.items():
            if arr.ndim < len(var_shape[k]):
                arr = arr.reshape(arr.shape + (1,) * (len(var_shape[k]) - arr.ndim))
            data[k][(i,) + tuple(slice(0, s) for s in arr.shape)] = arr

    def grid_shape(a):
        return a.reshape(shape + a.shape[1:])

    variables = {k: (gdims + var_dims[k], grid_shape(v)) for k, v in data.items()}
    variables["status"] = (gdims, grid_shape(status.astype(str)))
    variables["message"] = (gdims, grid_shape(message.astype(str)))
    variables["kind"] = (gdims, grid_shape(kind.astype(str)))
    variables["point_file"] = (gdims, grid_shape(pfile.astype(str)))
    variables["spec"] = (gdims, grid_shape(np.array(specs, dtype=str)))
    variables["elapsed"] = (gdims, grid_shape(elapsed))
    variables["cpu_time"] = (gdims, grid_shape(cpu))
    coords = {}
    for a in axes:
        for key, values in a.coords.items():
            coords[key] = (a.name, np.asarray(values))
    steps = max((v.shape[0] for k, (d, v) in
                 ((k, (var_dims[k], data[k][0])) for k in data) if d[:1] == ("step",)),
                default=0)
    if steps:
        coords["step"] = ("step", np.arange(steps))
    for name, dims in var_dims.items():
        for d in dims:
            if d not in coords and d != "step":
                size = data[name].shape[1 + dims.index(d)]
                coords[d] = (d, np.arange(size))
    ds = xr.Dataset(variables, coords=coords)
    from ._version import __version__
    ds.attrs.update(points=n, grid=json.dumps({a.name: a.coords for a in axes}),
                    base_spec=_canonical(base), points_dir=os.path.basename(points_dir),
                    dmft_version=__version__,
                    description="dmft sweep: grid dims, then step (time index; t = step * "
                                "lr), train_point / test_point (output); per-point results "
                                "in points_dir (point_file), dmft.load_point reads one")
    descriptions = {
        "t": "time t = step * lr (NaN past a point's last step)",
        "ntk_change": "|K(t) - K(0)|_F / |K(0)|_F over all points (networks: mean over seeds)",
        "ntk_alignment": "kernel-target alignment y^T K y / (|K|_F |y|^2) on the train block",
        "test_prediction_nvar": "N Var of the test predictions (networks: over seeds; "
                                "fluctuations: the propagator)",
        "status": f"one of {', '.join(STATUSES)}",
        "elapsed": "seconds the point took on its worker (wall clock)",
        "cpu_time": "CPU seconds of the process running the point, while it ran",
        "spec": "the point's configuration (JSON, the dmft run format)",
        "point_file": "the per-point result file (dmft.load), relative to the sweep file",
    }
    for k, text in descriptions.items():
        if k in ds:
            ds[k].attrs["description"] = text
    return ds


def _write_dataset(ds, path):
    try:
        import dask
        # with a distributed Client alive in this process (client=, a notebook's cluster)
        # xarray would take a cluster-wide lock for the write, which fails for an in-memory
        # target; the image is built here, in this thread, so a local lock is right
        local = dask.config.set(scheduler="synchronous")
    except ImportError:
        local = contextlib.nullcontext()
    with local:
        image = bytes(ds.to_netcdf(engine="h5netcdf"))

    def write(fd):
        _atomic._write_all(fd, image)

    _atomic.replace_atomically(path, os.path.dirname(path), write)


def load_sweep(path):
    """The sweep file written by :func:`sweep` as an ``xarray.Dataset`` (loaded into memory)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no sweep file at {path}")
    xr = _xarray()
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        ds = ds.load()
    ds.attrs["path"] = os.path.abspath(path)
    return ds


def load_point(path, index_or_coords):
    """The full result (Solution, Ensemble or Fluctuations, with its two-time kernels) of one
    point of the sweep file ``path``: by flat index (C order over the grid dims) or by a dict
    of coordinates ``{"train.gamma0": 0.5, "net.depth": 2}`` (one value per grid dim, or per
    zipped key)."""
    from .io import load
    ds = load_sweep(path)
    files = ds["point_file"]
    if isinstance(index_or_coords, dict):
        sel = files
        for key, value in index_or_coords.items():
            if key not in ds.coords:
                raise ValueError(f"{key!r} is not a coordinate of the sweep; use one of "
                                 f"{', '.join(map(str, ds.coords))}")
            dim = ds[key].dims[0]
            hits = np.flatnonzero(np.asarray(ds[key].values) == value)
            if hits.size != 1:
                raise ValueError(f"{key} = {value!r} matches {hits.size} points along {dim}; "
                                 f"give a value among {list(ds[key].values)}")
            sel = sel.isel({dim: int(hits[0])})
        if sel.ndim:
            raise ValueError(f"the coordinates leave dims {sel.dims} open; give one value "
                             f"for each")
        rel = str(sel.values)
    else:
        flat = np.asarray(files.values).ravel()
        if not isinstance(index_or_coords, (int, np.integer)) or \
                not 0 <= index_or_coords < flat.size:
            raise ValueError(f"index must be an integer in 0 .. {flat.size - 1} or a dict of "
                             f"coordinates, got {index_or_coords!r}")
        rel = str(flat[int(index_or_coords)])
    if not rel:
        raise ValueError("that point has no result (its status is a failure; see the "
                         "sweep's status / message)")
    return load(os.path.join(os.path.dirname(os.path.abspath(path)), rel))
