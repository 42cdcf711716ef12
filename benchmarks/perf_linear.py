"""Cost of the exact deep-linear DMFT solver (``method="linear"``, docs/theory.rst §3).

Default problem: depth L = 5, P = 20 training points (no test points), T = 100 and 200
steps, gamma0 = 1, Gaussian inputs in D = 40. For each case the script reports the time of the
time march alone (``solvers.linear.solve``), of the full-index responses A (two GEMMs per
layer), of the global verification of the equations, and of the whole ``dmft.solve`` call
(which also assembles the (L, T+1, T+1, n, n) output arrays), the peak NumPy memory of that
call (tracemalloc), the verification residual and the final training loss. Then it varies T,
P and L one at a time around the base case and fits the growth exponents of the march time
(expected: T^3 (rows of growing length), P^2 and L^1 at large sizes; smaller at small sizes,
where per-step Python overhead dominates).

Usage: ``python benchmarks/perf_linear.py [--quick] [--depth L] [--train P] [--steps T ...]``
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:          # run as a script from anywhere: import the package in ROOT
    sys.path.insert(0, ROOT)


def _problem(P, D, seed=0):
    import dmft
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P, D))
    y = rng.standard_normal(P) / np.sqrt(P)
    return dmft.Dataset(X, y)


def _case(L, P, T, gamma0, lr, D, full=True):
    import dmft
    from solvers import linear as lin

    data = _problem(P, D)
    kx, y = data.kx, data.y_train
    t0 = time.perf_counter()
    res = lin.solve(kx, y, L, gamma0, lr, T, fast_path=False)
    t_march = time.perf_counter() - t0
    row = {"L": L, "P": P, "T": T, "march_s": t_march}
    if not full:
        return row
    t0 = time.perf_counter()
    lin.full_responses(res, kx, gamma0, lr)
    row["responses_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    row["residual"] = lin.verify(res, kx, y, gamma0, lr)
    row["verify_s"] = time.perf_counter() - t0
    del res
    net = dmft.MLP(L, "linear")
    train = dmft.GradientDescent(gamma0, lr, T)
    tracemalloc.start()
    t0 = time.perf_counter()
    sol = dmft.solve(net, data, train, method="linear", fast_path=False)
    row["solve_s"] = time.perf_counter() - t0
    row["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    row["loss_ratio"] = float(sol.train_loss[-1] / sol.train_loss[0])
    return row


def _slope(xs, ys):
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--train", type=int, default=None)
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--dim", type=int, default=40)
    p.add_argument("--gamma0", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--no-scaling", action="store_true", help="skip the growth-exponent scans")
    args = p.parse_args(argv)

    if args.quick:
        L, P, steps = 3, 6, [20, 40]
    else:
        L, P, steps = 5, 20, [100, 200]
    L = args.depth or L
    P = args.train or P
    steps = args.steps or steps
    # a step that keeps lr * lambda_max(K) well below 2 for these inputs (K ~ (L+1) K^x)
    lr = args.lr or 0.4 / ((L + 1) * (1 + np.sqrt(P / args.dim)) ** 2)

    print(f"deep linear DMFT: L = {L}, P = {P}, D = {args.dim}, gamma0 = {args.gamma0}, "
          f"lr = {lr:.4g}")
    hdr = (f"{'L':>3} {'P':>4} {'T':>5} {'march s':>9} {'A s':>8} {'verify s':>9} "
           f"{'solve s':>9} {'peak MB':>9} {'residual':>10} {'loss T/0':>9}")
    print(hdr)
    print("-" * len(hdr))
    for T in steps:
        r = _case(L, P, T, args.gamma0, lr, args.dim)
        print(f"{r['L']:>3} {r['P']:>4} {r['T']:>5} {r['march_s']:>9.3f} "
              f"{r['responses_s']:>8.3f} {r['verify_s']:>9.3f} {r['solve_s']:>9.3f} "
              f"{r['peak_mb']:>9.1f} {r['residual']:>10.2e} {r['loss_ratio']:>9.3g}")
    if args.no_scaling:
        return 0

    print("\ngrowth of the march time (one factor varied, others at the base case)")
    T0 = steps[0]
    scans = {
        "T": [(L, P, T) for T in (T0 // 2, T0, 2 * T0)],
        "P": [(L, q, T0) for q in (max(1, P // 2), P, 2 * P)],
        "L": [(k, P, T0) for k in (max(1, L // 2), L, 2 * L)],
    }
    print(f"{'vary':>5} {'sizes':>18} {'times s':>30} {'exponent':>9}")
    for name, cases in scans.items():
        rows = [_case(*c, args.gamma0, 0.4 / ((c[0] + 1) * (1 + np.sqrt(c[1] / args.dim)) ** 2),
                      args.dim, full=False) for c in cases]
        xs = [c[{"L": 0, "P": 1, "T": 2}[name]] for c in cases]
        ts = [r["march_s"] for r in rows]
        print(f"{name:>5} {str(xs):>18} {' '.join(f'{t:9.3f}' for t in ts):>30} "
              f"{_slope(xs, ts):>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
