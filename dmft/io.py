"""HDF5 files for results: ``save(result, path)`` and ``load(path)``.

One file holds one run (a :class:`~dmft.results.Solution`, :class:`~dmft.results.Ensemble` or
:class:`~dmft.results.Fluctuations`) and round-trips every field exactly: arrays bit for bit,
``None`` fields, booleans, integers, floats and the (possibly nested) ``options`` /
``extras`` / ``stderr`` dicts.

Layout (schema version 1)
-------------------------
Root attributes
    ``schema_version`` (int), ``dmft_version``, ``kind`` ("Solution" / "Ensemble" /
    "Fluctuations"), ``method``, ``created`` (ISO 8601, UTC), ``seed`` (when an int), and the
    full specification: ``spec`` / ``net`` / ``train`` / ``options`` / ``meta`` as JSON strings,
    plus flat copies for quick inspection (``net_depth``, ``net_activation``, ``train_gamma0``,
    ``train_lr``, ``train_steps``, ``train_loss``, ``train_weight_decay``, ``train_decay_to``,
    ``train_batch_size`` (absent for full batch), ``train_schedule``, ``data_outputs`` (C),
    ``width``, ``status`` ...). ``train`` holds every field of
    :class:`~dmft.specs.GradientDescent` (``loss``, ``weight_decay``, ``decay_to``,
    ``batch_size`` (null for full batch), ``batch_seed``, ``schedule``); files written before
    these fields existed load with their defaults (mse, no decay, full batch). Flat copies are
    informative only; ``load`` reads the JSON. ``meta`` holds ``converged``, ``status`` and
    ``message`` of every kind of result; files written before ``status`` / ``message``
    existed load with ``status`` derived from ``converged`` and the status's default
    message (:data:`dmft.results.STATUSES`).
Root datasets
    Every array field (``t``, ``train_predictions``, ``test_predictions``, ``ntk``, ``phi``,
    ``g``, ``A``, ``B``, ``residuals``; Ensemble: with a leading ``seed`` axis; Fluctuations:
    ``prediction_cov``, ``ntk_var``). A field that is ``None`` is simply absent.
Dimension scales (netCDF4-compatible: a coordinate dataset per dimension name)
    ``t`` and ``s`` (the times k * lr), ``layer`` (1 .. L), ``response_layer`` (1 .. L-1),
    ``point`` and ``point_`` (kernel index 0 .. P+Q-1, train first), ``train_point``
    (0 .. P-1), ``test_point`` (P .. P+Q-1, i.e. their kernel index), ``iteration``,
    ``input_dim`` and, for ensembles, ``seed`` (the seeds); with C >= 2 outputs (targets of
    shape (P, C), docs/theory.rst §7) also ``output`` and ``output_`` (0 .. C-1). Names follow
    :data:`dmft.results.DIMS` and, for C >= 2 outputs, :data:`dmft.results.DIMS_OUTPUTS`
    (:func:`dmft.results.dims`), so ``xarray.open_dataset(path, engine="h5netcdf")`` gives
    labelled arrays, and plain ``h5py`` shows ``ds.dims[i].label``.
Recorded losses and accuracies (read-only derived copies)
    ``train_loss``, ``test_loss`` (the loss named by ``train.loss``, summed over the split's
    points and outputs) and, for classification (``result.classifies``), ``train_accuracy``,
    ``test_accuracy``, shape (T+1,) or (S, T+1) for an Ensemble; a field that is ``None`` (no
    ``y_test``, or a one-output mse problem for the accuracies) is absent. They carry the
    attribute ``derived = 1``: :func:`load` recomputes them from the predictions and the spec
    (they are properties of the result) and logs a warning if a stored copy disagrees. Files
    written before they were recorded load as before.
Groups
    ``data`` (``X_train``, ``y_train``, ``X_test``, ``y_test`` when present), ``stderr``,
    ``extras`` (arrays as datasets, nested dicts as sub-groups, other plain values as JSON in
    the group's ``values_json`` attribute) and, for Fluctuations, ``solution`` (the nested
    Solution with the same layout as a Solution file's root).

Writes are atomic (built in memory, written to a temporary file, renamed over the target;
nothing is left behind on errors or Ctrl-C / SIGTERM): see :mod:`dmft._atomic` and
:func:`clean_orphans`.

Integrity (still schema 1; files without these load as before): a whole-file SHA-256
trailer checked by :func:`load` before libhdf5 reads a byte, Fletcher-32 per dataset chunk,
the root attribute ``dmft_sha256`` and HDF5 1.10 checksummed metadata; a damaged file raises
:class:`CorruptFileError`. Details in :mod:`dmft._integrity`.

Compatibility: ``load`` refuses files of a newer schema with a message to upgrade, and
applies the functions registered in :data:`MIGRATIONS` to read files of older schemas.

Layout: the named dimensions, coordinates and descriptions of the arrays are in
:mod:`dmft._io_layout`, the tree -> object builders of :func:`load` in :mod:`dmft._io_read`;
this module writes files and reads them into plain trees (checks, migrations).
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from typing import Callable

import h5py
import numpy as np

from . import _atomic, _integrity
from ._atomic import clean_orphans
from ._integrity import (_HASH_ATTR, CorruptFileError, _attr_value, _checksum_kwargs,
                         _damaged, _open, _read_tree, verify_checksum)
from ._io_layout import _DESCRIPTIONS, _coords, _dims_for, _multi
from ._io_read import (_build_ensemble, _build_fluctuations, _build_solution,
                       _derived_values)
from ._json import put_json as _put_json
from ._version import __version__
from .results import Ensemble, Fluctuations, Solution
from .specs import Dataset

__all__ = ["save", "load", "read_attrs", "SCHEMA_VERSION", "MIGRATIONS", "register_migration",
           "CorruptFileError", "clean_orphans", "verify_checksum"]

logger = logging.getLogger(__name__)


#: version of the file layout written by :func:`save`
SCHEMA_VERSION = 1

#: from_version -> function(tree) -> tree in layout from_version + 1 (see :func:`register_migration`)
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}

#: arrays with at least this many elements are gzip-compressed (lossless, netCDF4-readable)
COMPRESS_MIN_SIZE = 4096

_KINDS = ("Solution", "Ensemble", "Fluctuations")

#: HDF5 format versions written (1.10: checksummed object headers and chunk indexes)
_LIBVER = ("v110", "latest")

#: kept importable from here (tests, dmft._checkpoint); they live in _integrity / _atomic
_TRAILER_MAGIC, _TRAILER_LEN = _integrity._TRAILER_MAGIC, _integrity._TRAILER_LEN
_tmp_prefix = _atomic._tmp_prefix
ORPHAN_AGE = _atomic.ORPHAN_AGE
CHUNK_BYTES = _integrity.CHUNK_BYTES


def register_migration(from_version: int):
    """Decorator: register ``fn(tree) -> tree`` upgrading a file tree from ``from_version``.

    A tree is the file read into plain data: ``{"attrs": {...}, "datasets": {name: array},
    "dims": {name: labels}, "groups": {name: tree}}``. :func:`load` applies the migrations
    ``v, v+1, ..., SCHEMA_VERSION - 1`` in turn to a file of schema ``v``.
    """
    def deco(fn):
        MIGRATIONS[int(from_version)] = fn
        return fn
    return deco


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------
class _Scales:
    """Creates the dimension scales of one group on demand and attaches them to datasets."""

    def __init__(self, group, coords: dict):
        self.group = group
        self.coords = coords  # dim name -> 1-D coordinate values
        self.multi_output = "output" in coords

    def get(self, name):
        if name in self.group:
            return self.group[name]
        values = np.asarray(self.coords[name])
        ds = self.group.create_dataset(name, data=values, **_checksum_kwargs(values))
        ds.make_scale(name)
        if name in _DESCRIPTIONS:
            ds.attrs["long_name"] = _DESCRIPTIONS[name]
        return ds

    def attach(self, ds, dims):
        """Attach scales ``dims`` to ``ds`` if every axis length matches; else leave it bare."""
        if dims is None or len(dims) != ds.ndim:
            return
        for name, length in zip(dims, ds.shape):
            if name not in self.coords or len(self.coords[name]) != length:
                return
        for i, name in enumerate(dims):
            ds.dims[i].attach_scale(self.get(name))
            ds.dims[i].label = name


def _create_array(group, name, arr, compression):
    _atomic._check_interrupt()
    if not isinstance(arr, np.ndarray):
        arr = np.asarray(arr)
    kwargs = _checksum_kwargs(arr)
    if compression and arr.size >= COMPRESS_MIN_SIZE:
        kwargs.update(compression=compression, shuffle=True)
        if compression == "gzip":
            kwargs["compression_opts"] = 4
    ds = group.create_dataset(name, data=arr, **kwargs)
    if name in _DESCRIPTIONS:
        ds.attrs["long_name"] = _DESCRIPTIONS[name]
    return ds


def _check_key(key, where):
    if not isinstance(key, str) or not key or "/" in key or key in (".", "..") \
            or key.startswith("__"):
        raise ValueError(f"{where}: key {key!r} cannot be an HDF5 name; use a non-empty string "
                         f"without '/' that does not start with '__'")


def _has_array(value) -> bool:
    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, dict):
        return any(_has_array(v) for v in value.values())
    return False


def _write_mapping(group, mapping, where, scales, compression, lead=()):
    """Arrays -> datasets, dicts holding arrays -> sub-groups, the rest -> JSON attribute.

    An array whose shape does not fit the one-output dims of its key gets the C-output dims
    (:meth:`_Scales.attach` checks every axis length; the output dims exist only for C >= 2).
    """
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a dict, got {type(mapping).__name__}")
    plain = {}
    for key, value in mapping.items():
        _check_key(key, where)
        if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
            ds = _create_array(group, key, value, compression)
            scales.attach(ds, _dims_for(key, value, lead, scales.multi_output))
        elif isinstance(value, dict) and _has_array(value):
            _write_mapping(group.create_group(key), value, f"{where}[{key!r}]", scales,
                           compression, lead)
        else:
            plain[key] = value
    _put_json(group, "values_json", plain, where)
    _put_json(group, "keys_json", list(mapping), where)



def _write_data(group, data: Dataset, scales, compression):
    g = group.create_group("data")
    g.attrs["P"], g.attrs["Q"], g.attrs["D"] = data.P, data.Q, data.D
    if getattr(data, "paired", False):
        g.attrs["paired"] = True
    for name in ("X_train", "y_train", "X_test", "y_test", "labels_test"):
        arr = getattr(data, name)
        if arr is not None:
            scales.attach(_create_array(g, name, np.asarray(arr), compression),
                          _dims_for(name, arr, multi_output=_multi(data)))


def _write_spec_attrs(group, result, kind):
    net, train = result.net, result.train
    a = group.attrs
    a["kind"] = kind
    a["method"] = str(result.method)
    _put_json(group, "net", net.to_dict(), "net")
    _put_json(group, "train", train.to_dict(), "train")
    _put_json(group, "options", result.options, "options")
    _put_json(group, "spec", result.spec, "spec")
    a["net_depth"] = net.depth
    a["net_activation"] = net.activation
    a["train_gamma0"] = train.gamma0
    a["train_lr"] = train.lr
    a["train_steps"] = train.steps
    a["train_loss"] = train.loss
    a["train_weight_decay"] = train.weight_decay
    a["train_decay_to"] = train.decay_to
    if train.batch_size is not None:
        a["train_batch_size"] = int(train.batch_size)
    a["train_schedule"] = train.schedule
    a["data_outputs"] = int(getattr(result.data, "C", 1))
    a["elapsed"] = float(result.elapsed)
    a["status"] = str(result.status)


def _status(result) -> dict:
    """``converged``, ``status`` and ``message`` of a result (stored in ``meta``)."""
    return {"converged": bool(result.converged), "status": result.status,
            "message": result.message}


def _write_solution(group, sol: Solution, compression):
    _write_spec_attrs(group, sol, "Solution")
    meta = {"method": sol.method, "converged": sol.converged, "iterations": sol.iterations,
            "seed": sol.seed, "elapsed": sol.elapsed, **_status(sol)}
    _put_json(group, "meta", meta, "Solution")
    group.attrs["converged"] = np.int8(bool(sol.converged))
    group.attrs["iterations"] = int(sol.iterations)
    if isinstance(sol.seed, (int, np.integer)) and not isinstance(sol.seed, bool):
        # informative flat copy; an int outside int64 (e.g. 2**70) is stored as text
        seed = int(sol.seed)
        group.attrs["seed"] = seed if -2**63 <= seed < 2**63 else str(seed)
    times = np.asarray(sol.t)
    coords = _coords(sol, times)
    coords["iteration"] = np.arange(1, np.size(sol.residuals) + 1)
    scales = _Scales(group, coords)
    scales.get("t")  # the field t is the coordinate variable of dimension t
    _write_data(group, sol.data, scales, compression)
    for name in ("train_predictions", "test_predictions", "ntk", "phi", "g", "A", "B",
                 "residuals"):
        arr = getattr(sol, name)
        if arr is None:
            continue
        ds = _create_array(group, name, np.asarray(arr), compression)
        scales.attach(ds, _dims_for(name, np.asarray(arr), multi_output=scales.multi_output))
    _write_derived(group, sol, scales, compression)
    _write_mapping(group.create_group("stderr"), sol.stderr, "stderr", scales, compression)
    _write_mapping(group.create_group("extras"), sol.extras, "extras", scales, compression)


def _write_ensemble(group, ens: Ensemble, compression):
    _write_spec_attrs(group, ens, "Ensemble")
    meta = {"width": ens.width, "center": ens.center, "elapsed": ens.elapsed, **_status(ens)}
    _put_json(group, "meta", meta, "Ensemble")
    group.attrs["width"] = int(ens.width)
    group.attrs["center"] = np.int8(bool(ens.center))
    group.attrs["n_seeds"] = len(ens.seeds)
    seeds = np.asarray(ens.seeds)
    scales = _Scales(group, _coords(ens, np.asarray(ens.t), lead_seeds=seeds))
    scales.get("t")
    scales.get("seed")  # the field seeds is the coordinate variable of dimension seed
    _write_data(group, ens.data, scales, compression)
    for name in ("train_predictions", "test_predictions", "ntk", "phi", "g"):
        arr = getattr(ens, name)
        if arr is None:
            continue
        ds = _create_array(group, name, np.asarray(arr), compression)
        scales.attach(ds, _dims_for(name, np.asarray(arr), lead=("seed",),
                                    multi_output=scales.multi_output))
    _write_derived(group, ens, scales, compression, lead=("seed",))
    _write_mapping(group.create_group("extras"), ens.extras, "extras",
                   _EnsembleExtraScales(scales), compression)


class _EnsembleExtraScales:
    """Ensemble extras usually carry a leading seed axis (e.g. ``f0`` (S, P+Q))."""

    def __init__(self, scales):
        self.scales = scales
        self.multi_output = scales.multi_output

    def attach(self, ds, dims):
        if dims is not None and len(dims) == ds.ndim - 1:
            dims = ("seed",) + tuple(dims)
        self.scales.attach(ds, dims)


def _write_fluctuations(group, fl: Fluctuations, compression):
    _write_spec_attrs(group, fl, "Fluctuations")
    meta = {"method": fl.method, "center": fl.center, "elapsed": fl.elapsed, **_status(fl)}
    _put_json(group, "meta", meta, "Fluctuations")
    group.attrs["center"] = np.int8(bool(fl.center))
    scales = _Scales(group, _coords(fl, np.asarray(fl.t)))
    scales.get("t")
    for name in ("prediction_cov", "ntk_var"):
        arr = np.asarray(getattr(fl, name))
        scales.attach(_create_array(group, name, arr, compression),
                      _dims_for(name, arr, multi_output=scales.multi_output))
    _write_mapping(group.create_group("stderr"), fl.stderr, "stderr", scales, compression)
    _write_mapping(group.create_group("extras"), fl.extras, "extras", scales, compression)
    _write_solution(group.create_group("solution"), fl.solution, compression)



def _write_derived(group, result, scales, compression, lead=()):
    """``train_loss``, ``test_loss``, ``train_accuracy``, ``test_accuracy`` as datasets with
    the attribute ``derived = 1`` (copies for readers of the file; :func:`load` recomputes
    them)."""
    for name, arr in _derived_values(result).items():
        ds = _create_array(group, name, arr, compression)
        ds.attrs["derived"] = np.int8(1)
        ds.attrs["loss"] = str(result.train.loss)
        scales.attach(ds, _dims_for(name, arr, lead))


def _write(f, result, compression):
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["dmft_version"] = __version__
    f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    f.attrs["Conventions"] = "dmft HDF5 schema 1 (netCDF4-compatible dimension scales)"
    if isinstance(result, Solution):
        _write_solution(f, result, compression)
    elif isinstance(result, Ensemble):
        _write_ensemble(f, result, compression)
    else:
        _write_fluctuations(f, result, compression)


def save(result, path, *, compression="gzip"):
    """Write a result to an HDF5 file, atomically.

    Parameters
    ----------
    result : Solution, Ensemble or Fluctuations
    path : str or os.PathLike
        Target file (conventionally ``*.h5``); an existing file is replaced only once the new
        one is complete.
    compression : {"gzip", "lzf", None}
        Lossless filter for arrays with at least :data:`COMPRESS_MIN_SIZE` elements
        (the round trip stays exact). ``"gzip"`` keeps the file readable by netCDF-C.

    Raises
    ------
    ValueError
        Not a result object, a bad ``compression``, or an ``options`` / ``extras`` value that
        cannot be stored (e.g. an arbitrary Python object).
    OSError
        Writing failed (full disk ``ENOSPC``, file-size limit ``EFBIG``, I/O error ...): one
        error naming the target and the cause; the previous file is unchanged and the
        temporary file removed.
    KeyboardInterrupt
        Ctrl-C during the save (re-raised after the temporary file is removed; the previous
        file is unchanged). SIGTERM likewise aborts the save, then ends the process.

    The file is built in memory first (peak extra memory about twice the file size), so
    libhdf5 never writes to disk itself; temporary files left by interrupted saves in the
    target folder are removed first (:func:`clean_orphans`).
    """
    if not isinstance(result, (Solution, Ensemble, Fluctuations)):
        raise ValueError(f"result must be a dmft Solution, Ensemble or Fluctuations, got "
                         f"{type(result).__name__}")
    if compression not in ("gzip", "lzf", None):
        raise ValueError(f"compression must be 'gzip', 'lzf' or None, got {compression!r}")
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ValueError(f"cannot save to {path}: directory {directory} does not exist; "
                         f"create it first")
    _atomic.save_image(lambda: _build_image(result, compression), path, directory)


def _build_image(result, compression) -> bytes:
    """The complete HDF5 file, built in memory (no disk I/O inside libhdf5)."""
    with h5py.File("dmft-image.h5", "w", driver="core", backing_store=False,
                   block_size=1 << 20, libver=_LIBVER) as f:
        _write(f, result, compression)
        hasher = hashlib.sha256()
        _read_tree(f, hasher, keep=False)
        f.attrs[_HASH_ATTR] = hasher.hexdigest()
        f.flush()
        return f.id.get_file_image()


# ------------------------------------------------------------------------------------------
# reading: file -> plain tree -> (migrations) -> objects (dmft._io_read)
# ------------------------------------------------------------------------------------------

def read_attrs(path) -> dict:
    """The root attributes of a result file (schema, versions, kind, spec JSON ...)."""
    with _open(path) as f:
        try:
            return {k: _attr_value(v) for k, v in f.attrs.items()}
        except Exception as exc:
            raise _damaged(path, exc) from None


def _upgrade(tree, path):
    version = tree["attrs"].get("schema_version")
    if version is None or "kind" not in tree["attrs"]:
        raise ValueError(f"{path} is not a dmft result file (no schema_version / kind "
                         f"attributes); pass a file written by dmft.save")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise CorruptFileError(f"{path} is damaged: schema_version {version!r} is not an "
                               f"integer") from None
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{path} was written with HDF5 schema version {version} by dmft "
            f"{tree['attrs'].get('dmft_version', '?')}, newer than this dmft {__version__} "
            f"understands (schema <= {SCHEMA_VERSION}); upgrade dmft to read it")
    while version < SCHEMA_VERSION:
        if version not in MIGRATIONS:
            raise ValueError(f"{path} has schema version {version} and no migration to "
                             f"version {version + 1} is registered")
        tree = MIGRATIONS[version](tree)
        version += 1
        tree["attrs"]["schema_version"] = version
    return tree


def load(path):
    """Read a result written by :func:`save`.

    Returns the same class (Solution, Ensemble or Fluctuations) with every field equal to the
    saved one. Files of an older schema are upgraded through :data:`MIGRATIONS`.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CorruptFileError (a ValueError)
        The file is damaged: a checksum (whole file, per-dataset Fletcher-32 or the
        ``dmft_sha256`` of attributes and arrays) does not match, its HDF5 structure cannot
        be read, or an attribute / dataset is missing or malformed. Never wrong numbers.
    ValueError
        Not an HDF5 file, not a dmft result, or a file from a newer schema version (upgrade
        dmft).
    """
    verified = []
    with _open(path, verified) as f:
        hasher = hashlib.sha256()
        try:
            tree = _read_tree(f, None if verified[0] else hasher)
        except Exception as exc:  # h5py raises OSError, KeyError, ValueError, RuntimeError ...
            raise _damaged(path, exc) from None
    attrs = tree["attrs"]
    stored = attrs.get(_HASH_ATTR)
    if not verified[0] and stored is not None and "schema_version" in attrs \
            and _as_int(attrs["schema_version"]) <= SCHEMA_VERSION \
            and stored != hasher.hexdigest():
        raise CorruptFileError(
            f"{os.fspath(path)} is damaged: the checksum of its attributes and arrays "
            f"({_HASH_ATTR}) does not match (changed after dmft.save wrote it); re-create it "
            f"with dmft.save")
    tree = _upgrade(tree, os.fspath(path))
    kind = tree["attrs"]["kind"]
    builders = {"Solution": _build_solution, "Ensemble": _build_ensemble,
                "Fluctuations": _build_fluctuations}
    if kind not in builders:
        raise CorruptFileError(f"{path} is damaged: unknown result kind {kind!r}; expected "
                               f"one of {_KINDS}")
    try:
        return builders[kind](tree)
    except CorruptFileError:
        raise
    except KeyError as exc:
        raise _damaged(path, exc, f"the {kind} misses attribute or dataset {exc}") from None
    except Exception as exc:  # malformed JSON, wrong types or shapes
        raise _damaged(path, exc, f"a {kind} field is malformed") from None


def _as_int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return SCHEMA_VERSION + 1
