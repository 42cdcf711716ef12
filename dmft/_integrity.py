"""Integrity of result files: checksums, and the error for a damaged file.

Files written by :func:`dmft.io.save` carry three layers of checks (still schema 1; files
without them load as before):

* a whole-file SHA-256 trailer (``\\x00DMFT-SHA256:<hex>\\n``, after the HDF5 end of file,
  ignored by HDF5 / netCDF / xarray; :func:`_trailer`) is verified by :func:`verify_checksum`,
  which :func:`dmft.io.load` calls *before* libhdf5 reads a byte, so a damaged file raises
  :class:`CorruptFileError` and never reaches HDF5 code that could crash on it;
* every non-scalar dataset carries an HDF5 Fletcher-32 checksum per chunk (verified by HDF5
  on every read), and the root attribute ``dmft_sha256`` (:data:`_HASH_ATTR`) holds a SHA-256
  of every attribute, of every dataset's name / dtype / shape, and of the values of the
  datasets without Fletcher-32 (scalars, JSON text), computed by :func:`_read_tree` (which
  also reads a file into plain data for :func:`dmft.io.load`) through :func:`_feed`,
  :func:`_hash_value` and :func:`_hash_attrs`; both still hold when the trailer is gone (a
  file edited with h5py, or repacked);
  :func:`_checksum_kwargs` gives the dataset options (Fletcher-32 needs chunks:
  :func:`_chunk_shape`);
* files use HDF5 1.10 object headers and chunk indexes, whose metadata is checksummed.

:func:`_open` verifies the trailer, then opens the file with h5py; a failure either way is a
:class:`CorruptFileError` (:func:`_damaged` words the message).
"""
from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np


class CorruptFileError(ValueError):
    """A result file is damaged (checksum mismatch, unreadable HDF5 structure, missing or
    malformed attribute / dataset). The message names the file and says "damaged"."""


CorruptFileError.__module__ = "dmft.io"  # its public home (tracebacks, pickling)


#: root attribute holding the SHA-256 of every attribute and dataset value
_HASH_ATTR = "dmft_sha256"
#: attributes left out of that hash: the hash itself and HDF5 object references
_UNHASHED = (_HASH_ATTR, "DIMENSION_LIST", "REFERENCE_LIST")

#: whole-file checksum appended after the HDF5 end of file
_TRAILER_MAGIC = b"\x00DMFT-SHA256:"
_TRAILER_LEN = len(_TRAILER_MAGIC) + 64 + 1


def _checksum_kwargs(arr) -> dict:
    """Fletcher-32 needs a chunked layout, which scalar and empty datasets cannot have; their
    values are covered by the root ``dmft_sha256`` and the whole-file trailer."""
    if arr.ndim == 0 or arr.size == 0:
        return {}
    return {"fletcher32": True, "chunks": _chunk_shape(arr.shape, arr.dtype.itemsize)}


#: target bytes per chunk (split along one axis only, so edge padding stays below one chunk)
CHUNK_BYTES = 1 << 20


def _chunk_shape(shape, itemsize) -> tuple:
    """Whole trailing axes, as many indices of one axis as fit in :data:`CHUNK_BYTES`, and 1
    along the axes before (h5py's own guess pads edge chunks: +27% for uncompressed files)."""
    chunk = [1] * len(shape)
    for ax in range(len(shape) - 1, -1, -1):
        row = int(np.prod(shape[ax + 1:], dtype=np.int64)) * itemsize
        if row * shape[ax] <= CHUNK_BYTES:
            chunk[ax] = shape[ax]
            continue
        n, per = shape[ax], max(1, min(shape[ax], CHUNK_BYTES // max(row, 1)))
        divisor = max(d for d in range(1, per + 1) if n % d == 0)
        if 2 * divisor >= per:  # tiles exactly
            per = divisor
        else:  # balanced split: less than one padded index per chunk
            k = -(-n // per)
            per = -(-n // k)
        chunk[ax] = per
        break
    return tuple(chunk)


def _feed(hasher, *parts):
    for part in parts:
        if isinstance(part, str):
            part = part.encode("utf-8")
        hasher.update(len(part).to_bytes(8, "little"))
        hasher.update(part)


def _hash_value(hasher, v):
    """Feed an attribute or dataset value, as h5py returns it, in a canonical form."""
    if isinstance(v, bytes):
        _feed(hasher, "b", v)
    elif isinstance(v, str):
        _feed(hasher, "s", v)
    elif isinstance(v, (np.ndarray, np.generic)):
        arr = np.asarray(v)
        _feed(hasher, "a", arr.dtype.str, repr(arr.shape))
        if arr.dtype.kind == "O":
            for item in arr.ravel():
                _hash_value(hasher, item)
        else:
            hasher.update(np.ascontiguousarray(arr).view(np.uint8).ravel().data
                          if arr.size else b"")
    else:
        _feed(hasher, type(v).__name__, repr(v))


def _hash_attrs(hasher, obj):
    for key in sorted(obj.attrs):
        if key not in _UNHASHED:
            _feed(hasher, "attr", key)
            _hash_value(hasher, obj.attrs[key])


def _trailer(image) -> bytes:
    return _TRAILER_MAGIC + hashlib.sha256(image).hexdigest().encode("ascii") + b"\n"


def _damaged(path, exc, what="its HDF5 structure cannot be read") -> CorruptFileError:
    return CorruptFileError(f"{os.fspath(path)} is damaged: {what} "
                            f"({type(exc).__name__}: {exc}); re-create it with dmft.save")


def verify_checksum(path):
    """Check the whole-file SHA-256 trailer written by :func:`dmft.io.save`.

    Returns True when it matches, False when the file has none (written by an older dmft,
    or edited / repacked since, which drops it); raises :class:`CorruptFileError` when it
    does not match. Reads the file with plain Python, so a damaged file never reaches libhdf5.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < _TRAILER_LEN:
            return False
        fh.seek(size - _TRAILER_LEN)
        trailer = fh.read(_TRAILER_LEN)
        if not (trailer.startswith(_TRAILER_MAGIC) and trailer.endswith(b"\n")):
            return False
        hasher = hashlib.sha256()
        fh.seek(0)
        left = size - _TRAILER_LEN
        while left:
            block = fh.read(min(left, 8 << 20))
            if not block:
                break
            hasher.update(block)
            left -= len(block)
    if hasher.hexdigest().encode("ascii") != trailer[len(_TRAILER_MAGIC):-1]:
        raise CorruptFileError(
            f"{path} is damaged: its SHA-256 checksum does not match its contents (the file "
            f"changed after dmft.save wrote it: a disk, copy or transfer error, or an edit); "
            f"re-create it with dmft.save")
    return True


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    return v




def _read_tree(group, hasher=None, keep=True) -> dict:
    """The group as plain data; ``hasher`` (hashlib) is fed every attribute and value
    (``keep=False``: only that, the tree holds None for the datasets)."""
    tree = {"attrs": {k: _attr_value(v) for k, v in group.attrs.items()},
            "datasets": {}, "dims": {}, "groups": {}}
    if hasher is not None:
        _feed(hasher, "group", group.name)
        _hash_attrs(hasher, group)
    for name in sorted(group):
        obj = group[name]
        if isinstance(obj, h5py.Group):
            tree["groups"][name] = _read_tree(obj, hasher, keep)
        else:
            # values under a Fletcher-32 checksum are checked by HDF5 as they are read; the
            # hash covers their dtype and shape, and the values of the other datasets
            checked = obj.fletcher32
            value = obj[...] if keep or not checked else None
            tree["datasets"][name] = value if keep else None
            tree["dims"][name] = tuple(d.label for d in obj.dims)
            if hasher is not None:
                _feed(hasher, "dataset", obj.name, "fletcher32" if checked else "plain")
                _hash_attrs(hasher, obj)
                if checked:
                    _feed(hasher, obj.dtype.str, repr(obj.shape))
                else:
                    _hash_value(hasher, value)
    return tree


def _open(path, verified=None):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such result file: {path}")
    ok = verify_checksum(path)
    if verified is not None:
        verified.append(ok)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if ok:
            raise _damaged(path, exc) from None
        raise CorruptFileError(f"{path} is not a readable HDF5 file, or is damaged ({exc}); "
                               f"pass a file written by dmft.save") from None
