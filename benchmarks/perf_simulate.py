"""Benchmark the finite-width network simulator (solvers/network.py) against a PyTorch loop.

Compares, per network (median over repeats), the time to train one network of the default
problem -- depth 3, width 4096, 6 train + 3 test points, 40 steps, tanh, float64 -- with

- ``numpy``          the engine as ``dmft.simulate`` runs it (pending low-rank updates, folded
                     every few steps; see the solvers.network docstring),
- ``numpy dense``    the engine with ``fold_every=1`` (practically a dense rank-P update per step),
- ``+kernels``       the same with ``record_kernels=True`` (two-time Phi^l(t,s), G^l(t,s)),
- ``torch``          an equivalent float64 PyTorch loop (torch.matmul forward/backward and
                     in-place ``addmm_`` rank-P updates of the dense weights; no autograd), when
                     torch is importable. torch is not a dependency of the package.

In round r every case starts from the same weights (drawn by NumPy, outside the timing) and
each timed network runs in its own subprocess, so that thread pools of different BLAS libraries
do not compete and the peak resident memory (``maxrss``, interpreter and libraries included:
importing torch alone takes ~190 MB) is per case. Rounds go through all cases in turn, so that
load from other jobs falls on every case alike. ``alloc MB`` is tracemalloc's peak of NumPy
allocations during one run (weights excluded); the torch loop's allocations are invisible to
it. ``max|df|`` is the largest difference of the predictions from the ``numpy`` case.
``--threads 1`` gives the most stable numbers on a machine shared with other jobs.

Usage: ``python benchmarks/perf_simulate.py [--quick] [--width N] [--steps T] ...``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CASES = ["numpy", "numpy+kernels", "numpy dense", "torch", "torch+kernels"]


def _problem(args):
    rng = np.random.default_rng(1234)
    n = args.train + args.test
    X = rng.standard_normal((n, args.dim))
    y = np.tanh(X[:args.train, 0])
    return X, y


def _draw(args, seed):
    from solvers import network
    return network.Weights.draw(np.random.default_rng(seed), args.dim, args.width, args.depth)


def _run_numpy(args, X, y, weights, record, fold_every):
    from solvers import network
    res = network.train(X, y, weights, activation="tanh", gamma0=args.gamma0, lr=args.lr,
                        steps=args.steps, record_kernels=record, fold_every=fold_every,
                        fold_at_end=False)
    return res["predictions"]


def _run_torch(args, X, y, weights, record):
    """Same math as solvers.network.train, dense weights, in-place rank-P updates."""
    import torch
    N, D, L, T, P = args.width, args.dim, args.depth, args.steps, args.train
    g0, lr = args.gamma0, args.lr
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y)
    W0 = torch.from_numpy(weights.W0)                 # shares memory, updated in place
    Ws = [torch.from_numpy(Wl) for Wl in weights.W]
    w = torch.from_numpy(weights.w)
    kx = Xt @ Xt.T / D
    preds = torch.empty((T + 1, X.shape[0]), dtype=torch.float64)
    ntk = torch.empty((T + 1, X.shape[0], X.shape[0]), dtype=torch.float64)
    phi_t, g_t = [], []         # with ``record``: per step, (L, n, N) stacks of phi(h^l), g^l
    sN, sD = 1.0 / math.sqrt(N), 1.0 / math.sqrt(D)
    with torch.no_grad():
        for k in range(T + 1):
            hs, fs = [Xt @ W0.T * sD], []
            fs.append(torch.tanh(hs[0]))
            for Wl in Ws:
                hs.append(fs[-1] @ Wl.T * sN)
                fs.append(torch.tanh(hs[-1]))
            f = fs[-1] @ w / (g0 * N)
            gs = [None] * L
            gs[L - 1] = (1 - fs[L - 1] ** 2) * w
            for l in range(L - 2, -1, -1):
                gs[l] = (1 - fs[l] ** 2) * (gs[l + 1] @ Ws[l] * sN)
            K = fs[L - 1] @ fs[L - 1].T / N + kx * (gs[0] @ gs[0].T / N)
            for l in range(1, L):
                K += (fs[l - 1] @ fs[l - 1].T / N) * (gs[l] @ gs[l].T / N)
            if not bool(torch.isfinite(f).all()):
                raise FloatingPointError(f"torch loop diverged at step {k}")
            preds[k], ntk[k] = f, K
            if record:
                phi_t.append(torch.stack(fs))
                g_t.append(torch.stack(gs))
            if k < T:
                delta = yt - f[:P]
                c = lr * g0
                w.add_(delta @ fs[L - 1][:P], alpha=c)
                for l, Wl in enumerate(Ws):
                    Wl.addmm_(gs[l + 1][:P].T, delta[:, None] * fs[l][:P], alpha=c * sN)
                W0.addmm_(gs[0][:P].T, delta[:, None] * Xt[:P], alpha=c * sD)
        if record:              # the two-time kernels Phi^l(t, s), G^l(t, s), as numpy's
            n = X.shape[0]
            for per_unit in (torch.stack(phi_t, 1), torch.stack(g_t, 1)):   # (L, T+1, n, N)
                for l in range(L):
                    M = per_unit[l].reshape(-1, N)
                    _ = (M @ M.T / N).reshape(T + 1, n, T + 1, n).permute(0, 2, 1, 3)
    return preds.numpy()


def _one_case(args, case):
    """Run one case in this process: warm-up, then one timed network (seed 100 + round)."""
    X, y = _problem(args)
    if case.startswith("torch"):
        import torch    # noqa: F401  (ImportError handled by the caller)
        torch.set_num_threads(args.threads or torch.get_num_threads())
    record = case.endswith("+kernels")

    def run(weights):
        if case.startswith("torch"):
            return _run_torch(args, X, y, weights, record)
        return _run_numpy(args, X, y, weights, record, 1 if case == "numpy dense" else None)

    # warm-up on a small network: imports, BLAS thread start-up, Numba caches
    small = argparse.Namespace(**dict(vars(args), width=64))
    w_small = _draw(small, 0)
    if case.startswith("torch"):
        _run_torch(small, X, y, w_small, record)
    else:
        _run_numpy(small, X, y, w_small, record, None)
    weights = _draw(args, 100 + args.round)
    tracemalloc.start()
    t0 = time.perf_counter()
    preds = run(weights)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"case": case, "time": elapsed, "alloc_mb": peak / 2 ** 20,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "preds": np.asarray(preds).tolist()}


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small preset (width 1024, 10 steps, 2 repeats) for a smoke run; explicit "
                         "--width/--steps/--repeats still win")
    ap.add_argument("--width", type=int, default=None, help="N (default 4096; quick 1024)")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="T (default 40; quick 10)")
    ap.add_argument("--train", type=int, default=6)
    ap.add_argument("--test", type=int, default=3)
    ap.add_argument("--dim", type=int, default=10, help="input dimension D")
    ap.add_argument("--gamma0", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed networks per case (default 3; quick 2)")
    ap.add_argument("--threads", type=int, default=0,
                    help="BLAS threads for every case: torch.set_num_threads and "
                         "OPENBLAS/OMP/MKL_NUM_THREADS in the case subprocesses (0: library "
                         "defaults). On a machine shared with other jobs, 1 gives stable timings")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {CASES}")
    ap.add_argument("--case", help=argparse.SUPPRESS)     # internal: run one case, print JSON
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = (1024, 10, 2) if args.quick else (4096, 40, 3)
    for name, value in zip(("width", "steps", "repeats"), preset):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.case:
        print(json.dumps(_one_case(args, args.case)))
        return 0
    print(f"depth {args.depth}, width {args.width}, {args.train} train + {args.test} test "
          f"points, {args.steps} steps, tanh, float64; median of {args.repeats} networks "
          f"(training only, weights drawn outside the timing)")
    threads = (f"{args.threads} BLAS thread(s) per case" if args.threads else
               "library-default BLAS threads")
    # torch is not imported here: ru_maxrss of a child started by fork counts the parent's
    # resident memory too, so the parent stays small
    import importlib.metadata
    import importlib.util
    if importlib.util.find_spec("torch") is not None:
        print(f"torch {importlib.metadata.version('torch')}; numpy {np.__version__}; "
              f"{threads}; {os.cpu_count()} CPUs")
    else:
        print(f"torch is not importable: torch rows skipped (pip install torch to compare); "
              f"numpy {np.__version__}; {threads}; {os.cpu_count()} CPUs")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {CASES}")
    env = dict(os.environ)
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
    # rounds go through every case in turn, so that load from other jobs on a shared machine
    # falls on all cases alike; the median over rounds is reported
    results = {case: [] for case in cases}
    missing = set()
    for r in range(args.repeats):
        for case in cases:
            if case in missing:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--case", case,
                   "--round", str(r)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode != 0:
                if case.startswith("torch") and "No module named 'torch'" in proc.stderr:
                    missing.add(case)
                    continue
                raise SystemExit(f"case {case} failed:\n{proc.stderr}")
            results[case].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    refs = results.get("numpy") or None
    rows = []
    for case in cases:
        res = results[case]
        if not res:
            rows.append((case, None))
            continue
        diff = None if refs is None else max(
            float(np.abs(np.array(a["preds"]) - np.array(b["preds"])).max())
            for a, b in zip(res, refs))
        rows.append((case, {"times": [x["time"] for x in res],
                            "alloc_mb": max(x["alloc_mb"] for x in res),
                            "maxrss_mb": max(x["maxrss_mb"] for x in res), "diff": diff}))
    head = (f"{'case':<15}{'median s':>10}{'min s':>9}{'steps/s':>9}{'alloc MB':>10}"
            f"{'maxrss MB':>11}{'max|df|':>10}")
    print(head)
    print("-" * len(head))
    for case, res in rows:
        if res is None:
            print(f"{case:<15}  (torch not installed)")
            continue
        med, mn = float(np.median(res["times"])), float(np.min(res["times"]))
        diff = "" if res["diff"] is None else f"{res['diff']:10.1e}"
        alloc = f"{res['alloc_mb']:10.1f}" if not case.startswith("torch") else f"{'n/a':>10}"
        print(f"{case:<15}{med:10.3f}{mn:9.3f}{(args.steps + 1) / med:9.1f}{alloc}"
              f"{res['maxrss_mb']:11.0f}{diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
