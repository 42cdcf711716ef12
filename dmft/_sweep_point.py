"""One point of a sweep (:mod:`dmft.sweep`): run its configuration on a worker (or here with
``serial=True``), summarise the result into the numbers of the sweep file, and persist it as
the point's files in ``OUT.points/`` (``NNNN.h5``, the full result, and ``NNNN.npz``, the
record: status, message, timings, configuration and summaries)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import sys
import time

import numpy as np

from . import _atomic

logger = logging.getLogger("dmft.sweep")


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

