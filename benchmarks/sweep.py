"""Sweeps on dask: a 24-point sweep serial vs a 2-worker LocalCluster, and kill -9 + rerun.

What it compares against: the serial run of the same sweep (``dmft.sweep(..., serial=True)``,
no dask) is the reference for both the wall time and the numbers.

1. ``speed``: 4 gamma0 x 3 depths x 2 seeds of small Monte Carlo DMFT solves (two-layer and
   deep tanh networks, samples zipped with the depth so that every point takes ~1-4 s of
   CPU: 128000 / 8000 / 4000 samples for depths 1 / 2 / 3, 30 steps).
   Wall time of the whole ``dmft.sweep`` call (cluster start-up included), the ratio
   cluster / serial (goal <= 0.6) and the largest |difference| of every variable between the
   two files (goal: 0, bit-identical; ``elapsed`` is a timing and is left out).
2. ``kill``: the same sweep through the command line (``dmft sweep SWEEP.toml -o ... --workers
   2``) in a subprocess, killed with SIGKILL once about half the points are persisted; the
   same command is run again. Prints the points computed by the rerun against the total and
   whether the final file equals the uninterrupted run's (all variables but ``elapsed``).

Usage: ``python benchmarks/sweep.py [--quick] [--workers 2] [--keep DIR]``.
``--quick``: 12 points (2 gamma0) and fewer samples.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dmft  # noqa: E402

TOML = """# benchmarks/sweep.py: 4 gamma0 x 3 depths (samples zipped with depth) x 2 seeds
[net]
activation = "tanh"

[data]
P = 8
Q = 8
D = 10
seed = 0

[train]
lr = 0.1
steps = {steps}

[solve]
method = "mc"
# a fixed memory budget (GB) for the solver's size check instead of "80% of what is free
# now": on a shared machine the free memory changes from moment to moment
memory_limit = 2

[sweep]
train.gamma0 = {gammas}
solve.seed = [0, 1]

[[sweep.zip]]
name = "depth"
net.depth = [1, 2, 3]
solve.samples = {samples}
"""


def max_diffs(a, b, skip=("elapsed", "cpu_time", "point_file")):
    """({variable: max |a - b|} over the points converged in both runs, the flat indices of
    points whose status differs). Floats: NaN equal to NaN; other types: 0 / 1 (equal / not)."""
    sa, sb = np.asarray(a.status.values).ravel(), np.asarray(b.status.values).ravel()
    both = (sa == "converged") & (sb == "converged")
    differ = np.flatnonzero(sa != sb).tolist()
    gdims = a.status.dims
    out = {}
    for name in sorted(set(a.data_vars) | set(b.data_vars)):
        if name in skip:
            continue
        if name not in a or name not in b or a[name].shape != b[name].shape:
            out[name] = float("inf")
            continue
        x = np.asarray(a[name].transpose(*gdims, ...).values)
        y = np.asarray(b[name].transpose(*gdims, ...).values)
        x = x.reshape((both.size,) + x.shape[len(gdims):])[both]
        y = y.reshape((both.size,) + y.shape[len(gdims):])[both]
        if x.dtype.kind == "f":
            d = np.where(np.isnan(x) & np.isnan(y), 0.0, np.abs(x - y))
            out[name] = float(np.max(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0
        else:
            out[name] = 0.0 if np.array_equal(x, y) else 1.0
    return out, differ


def run_cli(toml, out, workers):
    return [sys.executable, "-m", "dmft", "sweep", toml, "-o", out, "--workers", str(workers),
            "--no-progress"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="12 points, fewer samples")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default 2)")
    p.add_argument("--keep", metavar="DIR", help="keep the files in DIR (default: a temp dir)")
    args = p.parse_args(argv)
    gammas = [0.5, 2.0] if args.quick else [0.25, 0.5, 1.0, 2.0]
    samples = [16000, 1000, 500] if args.quick else [128000, 8000, 4000]
    steps = 15 if args.quick else 30
    root = args.keep or tempfile.mkdtemp(prefix="dmft-sweep-bench-")
    os.makedirs(root, exist_ok=True)
    toml = os.path.join(root, "sweep.toml")
    with open(toml, "w") as fh:
        fh.write(TOML.format(steps=steps, gammas=gammas, samples=samples))
    n = len(gammas) * 3 * 2
    print(f"sweep: {n} points ({len(gammas)} gamma0 x 3 depths x 2 seeds, mc, P = Q = 8, "
          f"{steps} steps), {args.workers} workers, files in {root}")

    # 1. serial vs LocalCluster -----------------------------------------------------------
    paths = {}
    times = {}
    load0 = os.getloadavg()[0]
    for mode in ("serial", "cluster"):
        d = os.path.join(root, mode)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        paths[mode] = os.path.join(d, "sweep.h5")
        start = time.perf_counter()
        if mode == "serial":
            ds = dmft.sweep(toml, out=paths[mode], serial=True, progress=False)
        else:
            ds = dmft.sweep(toml, out=paths[mode], workers=args.workers, progress=False)
        times[mode] = time.perf_counter() - start
        assert ds.attrs["computed"] == n, ds.attrs
    serial, cluster = dmft.load_sweep(paths["serial"]), dmft.load_sweep(paths["cluster"])
    diffs, differ = max_diffs(serial, cluster)
    point_s = float(serial.elapsed.sum())
    print()
    print(f"load average of the machine (1 min) before / after: {load0:.1f} / "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| run | wall time (s) | ratio to serial | sum of point wall times (s) | "
          "sum of point CPU times (s) |")
    print("|---|---|---|---|---|")
    print(f"| serial (no dask) | {times['serial']:.1f} | 1.00 | {point_s:.1f} | "
          f"{float(serial.cpu_time.sum()):.1f} |")
    print(f"| LocalCluster, {args.workers} workers | {times['cluster']:.1f} | "
          f"{times['cluster'] / times['serial']:.2f} | {float(cluster.elapsed.sum()):.1f} | "
          f"{float(cluster.cpu_time.sum()):.1f} |")
    worst = max(diffs.values())
    n_both = int(((serial.status == "converged") & (cluster.status == "converged")).sum())
    print(f"\nbit-identity serial vs cluster: max |diff| over {len(diffs)} variables and the "
          f"{n_both} points converged in both = {worst:g} "
          f"({'identical' if worst == 0 else 'DIFFERENT: ' + str(diffs)})")
    for i in differ:
        print(f"  point {i}: serial {serial.status.values.ravel()[i]}, cluster "
              f"{cluster.status.values.ravel()[i]}: "
              f"{(serial.message.values.ravel()[i] or cluster.message.values.ravel()[i])[:150]}")

    # 2. kill -9 of the driver halfway, then rerun -----------------------------------------
    d = os.path.join(root, "kill")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    out = os.path.join(d, "sweep.h5")
    points = out + ".points"
    cmd = run_cli(toml, out, args.workers)
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    half = n // 2
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(points) and \
                sum(f.endswith(".npz") for f in os.listdir(points)) >= half:
            break
        time.sleep(0.02)
    import psutil   # a dependency of dask.distributed
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    persisted = sum(f.endswith(".npz") for f in os.listdir(points))
    file_after_kill = os.path.exists(out)
    time.sleep(3.0)
    leftover = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    start = time.perf_counter()
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    t_rerun = time.perf_counter() - start
    m = re.search(r"(\d+) computed, (\d+) reused", rerun.stdout)
    computed, reused = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    final = dmft.load_sweep(out)
    kdiffs, kdiffer = max_diffs(cluster, final)
    kworst = max(kdiffs.values()) if not kdiffer else float("inf")
    print()
    print("| kill -9 check | value |")
    print("|---|---|")
    print(f"| points persisted when killed | {persisted} / {n} |")
    print(f"| sweep file after the kill | {'present' if file_after_kill else 'absent'} "
          f"(written only at the end) |")
    print(f"| its {len(children)} worker processes still running 3 s later | "
          f"{len(leftover)} |")
    print(f"| rerun: points computed / reused / total | {computed} / {reused} / {n} |")
    print(f"| rerun exit code, wall time | {rerun.returncode}, {t_rerun:.1f} s |")
    print(f"| final file equals the uninterrupted run | "
          f"{'yes' if kworst == 0 else 'NO: ' + str(kdiffs)} (max |diff| {kworst:g}) |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
