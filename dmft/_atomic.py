"""Atomic writes of result files, with Ctrl-C / SIGTERM deferred, and orphan clean-up.

:func:`save_image` writes a complete in-memory file image (built by :mod:`dmft.io`) to a
temporary file ``.<name>.dmft-<host>-<pid>-XXXX.tmp`` (:func:`_tmp_prefix`) in the target
directory with plain ``os.write`` / ``os.fsync`` (never inside libhdf5), then renames it over
the target (``os.replace``). On any error (a full disk or a file-size limit included) and on
Ctrl-C / SIGTERM the temporary file is removed and an existing file at the target is left
untouched: signals are recorded during the save (:func:`_interrupts_deferred`) and acted on
at the next :func:`_check_interrupt`. Temporary files of interrupted saves (``kill -9``,
power loss) are removed by the next save to that folder once their writer is gone
(:func:`clean_orphans`).

The signal state (:data:`_HIT`, :data:`_TERM_INTERRUPTS`) lives here together with every
function that reads or rebinds it; other modules call through this module.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time

from ._integrity import _trailer

#: removals are logged under the public module's name, ``dmft.io`` (see :func:`clean_orphans`)
logger = logging.getLogger("dmft.io")

#: temporary files of save: .<name>.dmft-<host>-<pid>-<random>.tmp
_TMP_RE = re.compile(r"^\..+\.dmft-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")
#: temporary files of dmft before the pid was in the name: .<name>.<8 random chars>.tmp
#: (removed only when empty or an HDF5 file, i.e. one of :func:`dmft.io.save`'s)
_LEGACY_TMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: a temporary file whose writer cannot be checked (other host, older dmft) is removed when
#: it has not been modified for this many seconds
ORPHAN_AGE = 3600.0


def save_image(build, path, directory):
    """Write the file image returned by ``build()`` atomically to ``path`` (absolute, in the
    existing ``directory``), with Ctrl-C / SIGTERM deferred while building and writing;
    temporary files that interrupted saves left in ``directory`` are removed first."""
    clean_orphans(directory)
    try:
        with _interrupts_deferred():
            image = build()
            _check_interrupt()
            _write_atomic(image, path, directory)
            del image
        # a signal that came after the last check inside, while the handlers were put back
        # (the file is saved: act on it now rather than lose it)
        _check_interrupt()
    except BaseException:
        if signal.SIGTERM in _HIT:  # the temporary file is gone: now die of SIGTERM as asked
            os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        _HIT.clear()


def _tmp_prefix(path) -> str:
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]
    return f".{os.path.basename(path)}.dmft-{host}-{os.getpid()}-"


def _write_atomic(image, path, directory):
    trailer = _trailer(image)

    def write(fd):
        view = memoryview(image)
        chunk = 16 << 20
        for start in range(0, len(view), chunk):
            _check_interrupt()
            _write_all(fd, view[start:start + chunk])
        _write_all(fd, trailer)

    replace_atomically(path, directory, write)


def replace_atomically(path, directory, write):
    """Replace ``path`` (in the existing ``directory``) by what ``write(fd)`` writes, atomically.

    The bytes go to a temporary file named by :func:`_tmp_prefix` (so that
    :func:`clean_orphans` removes it if this process is killed), are synced to disk, then
    renamed over ``path`` and the rename is synced too. On any error, Ctrl-C included, the
    temporary file is removed and ``path`` is untouched; an ``OSError`` while writing becomes
    one naming ``path``. Used by :func:`save_image` and by the checkpoints.
    """
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        try:
            write(fd)
            os.fsync(fd)  # the bytes are on disk before the rename makes them visible
        except OSError as exc:
            raise OSError(exc.errno, f"cannot save {path}: writing the temporary file failed "
                                     f"({exc.strerror or exc}); the previous file, if any, is "
                                     f"unchanged", path) from exc
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory):
    """Make a rename in ``directory`` durable (not possible on every platform: then a no-op)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


#: signals received during a save in the main thread, acted on by :func:`_check_interrupt`
_HIT: list = []
#: SIGTERM means KeyboardInterrupt (the command line's handler) during the current save
_TERM_INTERRUPTS = False


def _on_signal(signum, frame):
    # record only: an exception raised here could land in h5py's cleanup callbacks, where
    # Python prints "Exception ignored" and drops it (how Ctrl-C used to be swallowed)
    _HIT.append(signum)


def _check_interrupt():
    """Abort the save (between datasets and disk blocks) when Ctrl-C or SIGTERM came."""
    if _HIT and threading.current_thread() is threading.main_thread():
        if signal.SIGTERM in _HIT and not _TERM_INTERRUPTS:
            raise SystemExit(128 + signal.SIGTERM)
        raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_deferred():
    """During a save in the main thread, Ctrl-C and SIGTERM are recorded and acted on at the
    next :func:`_check_interrupt`: the save is aborted, the temporary file removed, then
    KeyboardInterrupt is re-raised / the process dies of SIGTERM. Only default handlers, and
    a handler that turns SIGTERM into KeyboardInterrupt (marked ``_dmft_interrupt``, as the
    command line's), are replaced; with the latter SIGTERM ends the save like Ctrl-C."""
    global _TERM_INTERRUPTS
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
        term = signal.getsignal(signal.SIGTERM)
        _TERM_INTERRUPTS = getattr(term, "_dmft_interrupt", False)
        if term == signal.SIG_DFL or _TERM_INTERRUPTS:
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_signal)
        yield
    finally:
        _restore_handlers(previous)


def _restore_handlers(previous):
    """Put the handlers back without losing a signal that arrives meanwhile.

    The signals are blocked first: a Python-level handler still pending from before runs
    (``pthread_sigmask`` checks for them) and records into :data:`_HIT`; one that arrives
    while the handlers change stays pending in the kernel and reaches the restored handler
    when the mask is put back (SIGTERM's default ends the process, Ctrl-C raises
    KeyboardInterrupt). Without the block, a signal caught just before a handler went back
    to SIG_DFL was dropped by Python.
    """
    if not previous:
        return
    block = getattr(signal, "pthread_sigmask", None)
    mask = block(signal.SIG_BLOCK, set(previous)) if block is not None else None
    try:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    finally:
        if mask is not None:
            block(signal.SIG_SETMASK, mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: exists, owned by someone else
        return True
    return True


def clean_orphans(directory) -> list:
    """Remove temporary files that interrupted saves left in ``directory``.

    A file ``.<name>.dmft-<host>-<pid>-XXXX.tmp`` is removed when it was written on this host
    by a process that no longer runs; one from another host or an older dmft
    (``.<name>.XXXXXXXX.tmp``) when unmodified for :data:`ORPHAN_AGE` seconds. Each removal
    is logged (logger ``dmft.io``, WARNING). Returns the removed paths; never raises.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]
    now = time.time()
    for name in names:
        m = _TMP_RE.match(name)
        if m is None and not _LEGACY_TMP_RE.match(name):
            continue
        full = os.path.join(directory, name)
        try:
            st = os.stat(full)
            if m is not None and m["host"] == host:
                pid = int(m["pid"])
                stale = pid != os.getpid() and not _pid_alive(pid)
                why = f"its writer (pid {pid}) no longer runs"
            else:
                stale = now - st.st_mtime > ORPHAN_AGE
                why = f"unmodified for {(now - st.st_mtime) / 3600:.1f} h"
                if stale and m is None and st.st_size:
                    with open(full, "rb") as fh:
                        stale = fh.read(8) == _HDF5_SIGNATURE
            if not stale:
                continue
            os.unlink(full)
        except OSError:
            continue
        removed.append(full)
        logger.warning("removed %s (%.1f MB), a temporary file left by an interrupted "
                       "dmft save: %s", full, st.st_size / 1e6, why)
    return removed
