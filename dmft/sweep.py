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
import importlib
import json
import logging
import os

import numpy as np

from . import _atomic, _sweep_point
from ._progress import progress_bar
from ._sweep_grid import _canonical, _check_structure, _points, _read_spec, expand_grid
from ._sweep_point import _persist, _point_paths, _read_record, run_point

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
#: the per-point summaries (dmft._sweep_point), kept importable from here (docs/sweeps.rst)
summarize, _summarize = _sweep_point.summarize, _sweep_point._summarize


# ------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------
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
    restore = _RestoreEnviron(WORKER_ENV)
    with dask.config.set(WORKER_CONFIG):
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None, env=dict(WORKER_ENV))
    c = distributed.Client(cluster)
    return c, [c, cluster, restore]


class _RestoreEnviron:
    """distributed's nannies write their pre-spawn environment (:data:`WORKER_ENV`) into this
    process's ``os.environ`` before each worker starts; ``close`` (after the cluster's) puts
    the previous values back, so that this process keeps its own thread settings (numba
    refuses a changed NUMBA_NUM_THREADS once its threads run)."""

    def __init__(self, keys):
        self.saved = {k: os.environ.get(k) for k in keys}

    def close(self):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
