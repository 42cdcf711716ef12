"""Checkpoint and resume of long work (``checkpoint=path``): one atomic ``.npz`` file.

Used by ``method="mc"`` / ``"gia"`` with the one-pass deep solver (one checkpoint per finished
replicate: the running sums over the populations and the index of the next one) and by
:func:`dmft.simulate` (one per finished seed: the rows of the networks trained so far).

A checkpoint holds arrays plus a JSON header: the kind of work, the package version and a
*fingerprint* of everything the result depends on (data arrays by SHA-256, the network,
training, options and the seed). Resuming with another problem, other options or another seed
is refused with a ValueError naming what differs, so a stale file can never be mixed into a
result. Resumed work is bit-identical to an uninterrupted run: the finished part is restored
exactly (float64 arrays, no re-rounding) and the rest is computed with its own, unchanged
random numbers, in the same order of floating-point operations.

Writes are atomic: the file is written to a temporary file in the same folder, flushed to disk
(``fsync``) and renamed over the old checkpoint (``os.replace``), then the folder is synced.
An interruption at any moment (Ctrl-C, SIGTERM turned into an exception by the caller,
``kill -9``, power loss after the rename) leaves either the previous checkpoint or the new one,
never a torn file; a KeyboardInterrupt during a write removes the temporary file. The library
installs no signal handlers. The checkpoint is removed after the work finishes.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from . import _atomic
from ._version import __version__

__all__ = ["Checkpoint", "fingerprint", "check_path"]

_HEADER = "__checkpoint__"


def _canon(value):
    """A JSON-able, exact description of one fingerprint item (arrays by their SHA-256)."""
    if isinstance(value, np.random.SeedSequence):
        return {"entropy": str(value.entropy), "spawn_key": [int(k) for k in value.spawn_key],
                "pool_size": int(value.pool_size),
                "n_children_spawned": int(value.n_children_spawned)}
    if isinstance(value, np.ndarray) or (isinstance(value, (list, tuple)) and value
                                         and isinstance(value[0], np.ndarray)):
        arrs = [value] if isinstance(value, np.ndarray) else list(value)
        h = hashlib.sha256()
        for a in arrs:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return "sha256:" + h.hexdigest()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return repr(float(value))           # exact: repr round-trips a float64
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    return repr(value)


def fingerprint(**items) -> dict:
    """name -> exact canonical description of each item (see :func:`_canon`)."""
    return {k: _canon(v) for k, v in sorted(items.items())}


def check_path(name, value):
    """Validator of a ``checkpoint=`` option: a non-empty str or os.PathLike."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a file path (str or pathlib.Path), e.g. "
                         f"{name}='run.ckpt.npz', got {value!r}")
    return value


class Checkpoint:
    """One checkpoint file for one piece of work.

    Parameters
    ----------
    path : str or os.PathLike
        The file (written as given, no suffix added); its folder must exist.
    kind : str
        What the work is (e.g. ``"mc-onepass"``, ``"simulate"``); part of the fingerprint.
    **items
        Everything the result depends on (:func:`fingerprint`).
    """

    def __init__(self, path, kind: str, **items):
        self.path = os.fspath(path)
        self.kind = kind
        self.fp = fingerprint(kind=kind, version=__version__, **items)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint={self.path!r}: the folder {folder!r} does not exist")
        if os.path.isdir(self.path):
            raise ValueError(f"checkpoint={self.path!r} is a folder; pass a file name, e.g. "
                             f"checkpoint='run.ckpt.npz'")
        self.writes = 0
        self.bytes = 0

    def load(self):
        """``(arrays, meta)`` of the checkpoint, or None when there is none yet.

        Raises ValueError when the file is not a dmft checkpoint or belongs to other work.
        """
        if not os.path.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                head = json.loads(str(z[_HEADER][()]))
                arrays = {k: z[k] for k in z.files if k != _HEADER}
        except Exception as exc:
            raise ValueError(f"checkpoint={self.path!r} exists but is not a dmft checkpoint "
                             f"({type(exc).__name__}: {exc}); remove it or pass another "
                             f"path") from exc
        fp = head.get("fingerprint", {})
        if fp != self.fp:
            keys = sorted(k for k in set(fp) | set(self.fp) if fp.get(k) != self.fp.get(k))
            raise ValueError(
                f"checkpoint={self.path!r} belongs to other work (it differs in {keys}: "
                f"another problem, other options, another seed or another dmft version); "
                f"resume with exactly the same call, or remove the file / pass another path "
                f"to start afresh")
        return arrays, head.get("meta", {})

    def save(self, arrays: dict, meta: dict) -> None:
        """Atomically replace the checkpoint by ``arrays`` (name -> ndarray) and ``meta``."""
        head = json.dumps({"fingerprint": self.fp, "meta": meta})
        folder = os.path.dirname(os.path.abspath(self.path))
        if self.writes == 0:
            # temp files of killed writers (of checkpoints or results) in this folder
            _atomic.clean_orphans(folder)
        # dmft.io's atomic replace: a temp file named so that the next save cleans it up
        # when this process is killed mid-write, synced, renamed, the rename synced

        def write(fd):
            with os.fdopen(fd, "wb", closefd=False) as fh:
                np.savez(fh, **{_HEADER: np.array(head)}, **arrays)

        _atomic.replace_atomically(os.path.abspath(self.path), folder, write)
        self.writes += 1
        self.bytes = os.path.getsize(self.path)

    def remove(self) -> None:
        """Delete the checkpoint (after the work has finished)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
