"""Integrity of HDF5 result files: checksums, damaged files, interrupts, orphans, full disks.

What these tests prove
- Issue 20: every array has a Fletcher-32 checksum, the file a whole-file SHA-256 trailer and a SHA-256
  of its attributes and values (dmft._integrity); a flipped byte, an edited attribute or a
  missing / malformed attribute or dataset raises CorruptFileError ("<path> is damaged"),
  never TypeError / KeyError / JSONDecodeError, while files written before checksums still
  load.
- Orphaned temporary files of dead writers are removed by the next save; Ctrl-C mid-save is
  re-raised (even when a library swallowed it) with the target intact and no temporary file;
  a file-size limit (EFBIG) gives one clear OSError (dmft._atomic).
- The kill -9 / byte-flip campaigns are in test_files_slow.py (``-m slow``); round trips,
  layout and atomic writes in test_io.py, whose builders these tests use.
"""
import json
import os

import h5py
import numpy as np
import pytest
from conftest import unseal
from test_io import _listing, assert_same, make_fluctuations, make_solution

import dmft
from dmft import _atomic, io as dio


def _strip_trailer(path):
    """Drop the whole-file checksum (as an edit or h5repack would), exposing the inner layers."""
    data = path.read_bytes()
    if data[-dio._TRAILER_LEN:].startswith(dio._TRAILER_MAGIC):
        path.write_bytes(data[:-dio._TRAILER_LEN])


def _flip(path, offset, xor=0x5A):
    data = bytearray(path.read_bytes())
    data[offset] ^= xor
    path.write_bytes(bytes(data))


def _data_offset(path, name):
    with h5py.File(path, "r") as f:
        return f[name].id.get_chunk_info(0).byte_offset


def test_every_dataset_is_checksummed(tmp_path):
    path = tmp_path / "s.h5"
    make_fluctuations(np.random.default_rng(30)).save(path)
    assert dio.verify_checksum(path) is True
    assert path.read_bytes()[-dio._TRAILER_LEN:].startswith(dio._TRAILER_MAGIC)
    seen = []
    with h5py.File(path, "r") as f:
        assert len(f.attrs["dmft_sha256"]) == 64

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.shape and obj.size:
                assert obj.fletcher32, name
                seen.append(name)
        f.visititems(visit)
    assert {"ntk_var", "prediction_cov", "t", "solution/ntk", "solution/phi",
            "extras/two_time_cov", "solution/data/X_train"} <= set(seen)


@pytest.mark.parametrize("trailer", [True, False])
def test_flipped_byte_in_a_dataset_raises_clear_error(tmp_path, trailer):
    path = tmp_path / "s.h5"
    dio.save(make_solution(np.random.default_rng(31)), path, compression=None)
    if not trailer:
        _strip_trailer(path)  # the per-dataset Fletcher-32 checksum must catch it alone
    _flip(path, _data_offset(path, "ntk") + 13)
    with pytest.raises(dio.CorruptFileError, match=r"s\.h5 is damaged"):
        dmft.load(path)


def test_edited_attribute_fails_the_metadata_checksum(tmp_path):
    path = tmp_path / "s.h5"
    make_solution(np.random.default_rng(32)).save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["meta"] = f.attrs["meta"].replace('"iterations": 7', '"iterations": 8')
        f["data/y_train"][0] += 1.0
    _strip_trailer(path)
    with pytest.raises(dio.CorruptFileError, match="damaged.*dmft_sha256"):
        dmft.load(path)


def _replace_ntk(f):
    del f["ntk"]
    f["ntk"] = np.zeros(3)


#: ways to damage an open file (h5py.File in "r+" mode)
_DAMAGES = {
    "no meta": lambda f: f.attrs.__delitem__("meta"),
    "no ntk": lambda f: f.__delitem__("ntk"),
    "bad json": lambda f: f.attrs.__setitem__("meta", '{"method": "mc", '),
    "no net": lambda f: f.attrs.__delitem__("net"),
    "no stderr": lambda f: f.__delitem__("stderr"),
    "meta not a dict": lambda f: f.attrs.__setitem__("meta", "[1, 2]"),
    "ntk wrong shape": _replace_ntk,
}


@pytest.mark.parametrize("damage", list(_DAMAGES))
@pytest.mark.parametrize("checksummed", [True, False])
def test_missing_or_malformed_field_is_a_clear_error(tmp_path, damage, checksummed):
    path = tmp_path / "s.h5"
    make_solution(np.random.default_rng(33)).save(path)
    if not checksummed:
        if damage == "ntk wrong shape":
            pytest.skip("without checksums a replaced array is a valid edit")
        unseal(path)
    with h5py.File(path, "r+") as f:
        _DAMAGES[damage](f)
    with pytest.raises(dio.CorruptFileError, match=r"s\.h5 is damaged"):
        dmft.load(path)


def test_files_without_checksums_still_load(tmp_path, monkeypatch):
    """Files of the earlier schema-1 writer: HDF5 1.8 format, no Fletcher-32, no hashes."""
    sol = make_solution(np.random.default_rng(34))
    monkeypatch.setattr(dio, "_checksum_kwargs", lambda arr: {})
    monkeypatch.setattr(dio, "_LIBVER", ("earliest", "latest"))
    sol.save(tmp_path / "old.h5")
    monkeypatch.undo()
    unseal(tmp_path / "old.h5")
    assert dio.verify_checksum(tmp_path / "old.h5") is False
    assert_same(sol, dmft.load(tmp_path / "old.h5"))
    assert_same(sol, dmft.load(tmp_path / "old.h5"))


def test_truncated_file_is_damaged(tmp_path):
    path = tmp_path / "s.h5"
    make_solution(np.random.default_rng(35)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="damaged"):
        dmft.load(path)


def _dead_pid():
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphaned_temp_files_are_cleaned_on_next_save(tmp_path, caplog):
    prefix = dio._tmp_prefix(str(tmp_path / "run.h5")).rsplit("-", 2)[0]  # .run.h5.dmft-host
    dead = tmp_path / f"{prefix}-{_dead_pid()}-ab_c12.tmp"
    alive = tmp_path / f"{prefix}-{os.getppid()}-xyz123.tmp"  # a save in progress elsewhere
    other = tmp_path / ".b.h5.dmft-otherhost-1-q1w2e3.tmp"
    old_legacy = tmp_path / ".c.h5.abcd1234.tmp"
    new_legacy = tmp_path / ".c.h5.efgh5678.tmp"
    unrelated = tmp_path / ".notes.tmp"
    not_ours = tmp_path / ".d.txt.abcd1234.tmp"  # old enough, but not an HDF5 file
    for p in (dead, alive, other, new_legacy, unrelated, not_ours):
        p.write_bytes(b"x" * 1000)
    old_legacy.write_bytes(b"\x89HDF\r\n\x1a\n" + b"x" * 1000)
    stale = os.stat(other).st_mtime - 2 * dio.ORPHAN_AGE
    os.utime(old_legacy, (stale, stale))
    os.utime(not_ours, (stale, stale))
    with caplog.at_level("WARNING", logger="dmft.io"):
        make_solution(np.random.default_rng(37), L=1).save(tmp_path / "run.h5")
    left = set(_listing(tmp_path))
    assert left == {"run.h5", alive.name, other.name, new_legacy.name, unrelated.name,
                    not_ours.name}
    assert "no longer runs" in caplog.text and dead.name in caplog.text
    assert old_legacy.name in caplog.text


def test_keyboard_interrupt_mid_save_is_reraised_and_cleaned(tmp_path, monkeypatch):
    target = tmp_path / "run.h5"
    make_solution(np.random.default_rng(38), L=1).save(target)
    before = target.read_bytes()
    real = dio._create_array
    calls = {"n": 0}

    def interrupted(group, name, arr, compression):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(group, name, arr, compression)

    monkeypatch.setattr(dio, "_create_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dio.save(make_solution(np.random.default_rng(39)), target)
    monkeypatch.undo()
    assert target.read_bytes() == before and _listing(tmp_path) == ["run.h5"]

    real_write = _atomic._write_all  # Ctrl-C while the bytes go to disk

    def write_then_interrupt(fd, data):
        real_write(fd, bytes(data)[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(_atomic, "_write_all", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dio.save(make_solution(np.random.default_rng(39)), target)
    assert target.read_bytes() == before and _listing(tmp_path) == ["run.h5"]


def test_swallowed_ctrl_c_still_aborts_the_save(tmp_path, monkeypatch):
    """A real SIGINT whose KeyboardInterrupt some library code swallows still aborts."""
    import signal
    target = tmp_path / "run.h5"
    real = dio._create_array
    calls = {"n": 0}

    def swallowing(group, name, arr, compression):
        calls["n"] += 1
        if calls["n"] == 3:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs between bytecodes
                    pass
            except KeyboardInterrupt:
                pass
        return real(group, name, arr, compression)

    monkeypatch.setattr(dio, "_create_array", swallowing)
    with pytest.raises(KeyboardInterrupt):
        dio.save(make_solution(np.random.default_rng(40)), target)
    assert _listing(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler



def test_ctrl_c_at_the_end_of_a_save_is_not_lost(tmp_path, monkeypatch):
    """A Ctrl-C caught after the save's last check, while the handlers go back, still
    interrupts (the file is complete by then: the new result is kept)."""
    import signal
    target = tmp_path / "run.h5"
    real = _atomic._restore_handlers

    def signal_then_restore(previous):
        os.kill(os.getpid(), signal.SIGINT)  # recorded by the save's handler, still installed
        for _ in range(1000):  # the handler runs between bytecodes
            pass
        real(previous)

    monkeypatch.setattr(_atomic, "_restore_handlers", signal_then_restore)
    sol = make_solution(np.random.default_rng(41))
    with pytest.raises(KeyboardInterrupt):
        dio.save(sol, target)
    monkeypatch.undo()
    assert np.array_equal(dio.load(target).phi, sol.phi) and _listing(tmp_path) == ["run.h5"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

_EFBIG_SCRIPT = r"""
import errno, json, os, resource, signal, sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from test_io import make_solution
import dmft.io
target = os.path.join(sys.argv[1], "run.h5")
make_solution(np.random.default_rng(1), L=1).save(target)
before = open(target, "rb").read()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
try:
    dmft.io.save(make_solution(np.random.default_rng(2), L=2, T=30), target, compression=None)
    out = {"raised": None}
except OSError as exc:
    out = {"raised": type(exc).__name__, "errno": exc.errno, "msg": str(exc)}
out["intact"] = open(target, "rb").read() == before
out["listing"] = sorted(os.listdir(sys.argv[1]))
print(json.dumps(out))
"""


def test_file_size_limit_is_one_clear_oserror(tmp_path):
    import errno
    import subprocess
    import sys
    work = tmp_path / "w"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", _EFBIG_SCRIPT, str(work),
                           os.path.dirname(__file__)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr  # no segfault
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["raised"] == "OSError" and out["errno"] == errno.EFBIG, out
    assert "cannot save" in out["msg"] and "run.h5" in out["msg"] \
        and "File too large" in out["msg"], out
    assert out["intact"] and out["listing"] == ["run.h5"], out
