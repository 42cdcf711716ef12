"""Slow file-robustness checks (issue 20, "Files"); run with ``pytest -m slow -s``.

- 20 ``kill -9`` (and 5 SIGTERM, 5 Ctrl-C) of a process in the middle of saving a large-ish result:
  the target is always the old or the new result and loads; every orphaned temporary file is
  gone after the next save to that folder (SIGTERM and Ctrl-C leave none at all).
- 300 single-byte changes of an uncompressed result file, each loaded in a worker process
  (restarted when a load kills it): no load returns wrong numbers; every failure is a clear
  ValueError (CorruptFileError naming the file and "damaged"). Also measured on the same
  files without the whole-file checksum trailer (the state of a file edited or repacked
  since), where libhdf5 reads damaged bytes itself; interpreter crashes are counted and
  printed there, they cannot be caught in-process.
"""
import json
import os
import random
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dmft
from dmft import io as dio

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow

_WRITER = r"""
import faulthandler, os, signal, sys
_trace = open(sys.argv[1] + ".trace", "w")
faulthandler.register(signal.SIGUSR1, file=_trace)  # the test asks for a traceback if we hang
sys.path.insert(0, sys.argv[2])
import numpy as np
from dmft import io as dio
from test_io import make_solution
target = sys.argv[1]
sols = [make_solution(np.random.default_rng(k), L=2, P=6, Q=4, T=40) for k in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    dio.save(sols[i % 2], target, compression=None)
    i += 1
"""


def _wait_or_explain(proc, name, trace, timeout=120):
    """Wait for the killed writer; if it outlives the signal, fail with its state and stack."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        state = subprocess.run(["ps", "-o", "stat=,wchan=", "-p", str(proc.pid)],
                               capture_output=True, text=True).stdout.strip()
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        proc.wait()
        with open(trace) as fh:
            stack = fh.read()[-4000:]
        pytest.fail(f"the writer outlived {name} by {timeout} s (process state {state!r}); "
                    f"its stack:\n{stack}")


def _versions():
    sys.path.insert(0, HERE)
    from test_io import make_solution
    return [make_solution(np.random.default_rng(k), L=2, P=6, Q=4, T=40) for k in (0, 1, 2)]


def _which(loaded, versions):
    for k, v in enumerate(versions):
        if np.array_equal(loaded.phi, v.phi) and np.array_equal(loaded.ntk, v.ntk) \
                and loaded.options == v.options:
            return k
    return None


def _orphans(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_kill_mid_save_never_corrupts_and_orphans_are_cleaned(tmp_path):
    versions = _versions()
    target = str(tmp_path / "run.h5")
    dio.save(versions[0], target, compression=None)
    size = os.path.getsize(target)
    rnd = random.Random(0)
    # kills, corrupt targets, orphans
    stats = {"kill -9": [0, 0, 0], "SIGTERM": [0, 0, 0], "SIGINT": [0, 0, 0]}
    for i in range(30):
        sig = signal.SIGKILL if i < 20 else signal.SIGTERM if i < 25 else signal.SIGINT
        name = "kill -9" if sig == signal.SIGKILL else sig.name
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, target, HERE],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.05, 1.5))
        proc.send_signal(sig)
        _wait_or_explain(proc, name, target + ".trace")
        # SIGTERM still ends the process; Ctrl-C ends it with an uncaught KeyboardInterrupt
        assert proc.returncode == -sig, proc.returncode
        stats[name][0] += 1
        try:
            k = _which(dmft.load(target), versions)
        except ValueError:
            k = None
        stats[name][1] += k is None
        orphans = _orphans(tmp_path)
        stats[name][2] += len(orphans)
        if sig != signal.SIGKILL:
            assert orphans == [], orphans
        dio.save(versions[i % 3], target, compression=None)  # the next save to the folder
        assert _orphans(tmp_path) == []
    print(f"\n[kill test] target {size / 1e6:.1f} MB; kill -9: {stats['kill -9'][0]} kills, "
          f"{stats['kill -9'][1]} corrupt targets, {stats['kill -9'][2]} orphaned temporary "
          f"files right after the kills, 0 after the next save; SIGTERM: "
          f"{stats['SIGTERM'][0]} kills, {stats['SIGTERM'][1]} corrupt targets, "
          f"{stats['SIGTERM'][2]} temporary files left; SIGINT: {stats['SIGINT'][0]} "
          f"kills, {stats['SIGINT'][1]} corrupt targets, {stats['SIGINT'][2]} temporary "
          f"files left")
    assert stats["kill -9"][1] == stats["SIGTERM"][1] == stats["SIGINT"][1] == 0


_WORKER = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
import numpy as np
import dmft
from test_io import assert_same
ref = dmft.load(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    path = line.strip()
    try:
        got = dmft.load(path)
    except Exception as exc:
        clear = isinstance(exc, ValueError) and path in str(exc)
        out = ("error-clear " if clear else "error-unclear ") + type(exc).__name__ + " " \
            + str(exc).replace("\n", " ")[:300]
    else:
        try:
            assert_same(ref, got)
            out = "same"
        except AssertionError as exc:
            out = "WRONG " + str(exc).replace("\n", " ")[:200]
    print(out, flush=True)
"""


class _Worker:
    def __init__(self, ref):
        self.ref = ref
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, self.ref, HERE],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        assert self.proc.stdout.readline().strip() == "ready"

    def load(self, path, timeout=30.0):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            return "hang"
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return f"crash {signal.Signals(-code).name if code < 0 else code}"
        return line.strip()

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _flip_campaign(tmp_path, data, label, n=300, seed=0):
    ref = tmp_path / f"ref-{label}.h5"
    ref.write_bytes(data)
    bad = tmp_path / f"bad-{label}.h5"
    worker = _Worker(str(ref))
    rnd = random.Random(seed)
    tally, examples = {}, {}
    try:
        for _ in range(n):
            buf = bytearray(data)
            offset = rnd.randrange(len(buf))
            buf[offset] ^= rnd.randrange(1, 256)
            bad.write_bytes(bytes(buf))
            out = worker.load(str(bad))
            kind = out.split(" ")[0] if not out.startswith("crash") else "crash"
            tally[kind] = tally.get(kind, 0) + 1
            examples.setdefault(kind, f"offset {offset}: {out[:160]}")
    finally:
        worker.close()
    return tally, examples


def test_single_byte_flips_never_load_wrong_numbers(tmp_path):
    sys.path.insert(0, HERE)
    from test_io import make_solution
    sol = make_solution(np.random.default_rng(5), L=2, P=4, Q=2, T=6)
    path = tmp_path / "s.h5"
    dio.save(sol, path, compression=None)
    data = path.read_bytes()
    assert data[-dio._TRAILER_LEN:].startswith(dio._TRAILER_MAGIC)
    report = {}
    for label, blob in (("as saved", data), ("no trailer", data[:-dio._TRAILER_LEN])):
        tally, examples = _flip_campaign(tmp_path, blob, label.replace(" ", "-"))
        report[label] = tally
        print(f"\n[flip test, {label}, {len(blob)} bytes] 300 flips: "
              f"{json.dumps(tally, sort_keys=True)}")
        for kind, example in sorted(examples.items()):
            print(f"    {kind}: {example}")
        assert tally.get("WRONG", 0) == 0  # never silently wrong numbers
        assert tally.get("error-unclear", 0) == 0  # never TypeError / KeyError / ...
        assert tally.get("hang", 0) == 0
    # the whole-file checksum is verified before libhdf5 touches the file: no crash at all
    assert report["as saved"].get("crash", 0) == 0
