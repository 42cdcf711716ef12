"""Cost of C outputs in ``method="mc"``: CPU time at C = 1, 3, 10 with the same samples.

The goal of docs/theory.rst §7 (issue: "C outputs cost <= 1.5 C times one output"). Problem:
teacher-student data with C regression outputs (mse; C = 1 is the original single-output
problem and its original code path), tanh, gamma0 = 1, lr = 0.1; depth 1 (the two-layer
population march, :func:`solvers.mc.two_layer.solve_two_layer_objective`) and depth 2 (the
one-pass deep solver). Each row is the best of ``--repeat`` runs with the same seed and
samples (by default each depth's default samples).

Columns: ``full`` is ``dmft.solve`` with its defaults (predictions, the equal-time NTK over
(point, output) pairs from all samples, and the two-time kernels Phi(t, s), G_{mu c, nu c'}(t, s);
depth 1: from ``kernel_samples``); ``f+ntk`` the same with ``kernel_samples=2`` (depth 1 only:
the two-time kernels nearly free; depth 2 has no such option: the same number). ``ratio`` =
time(C) / time(C = 1) and ``bound`` = 1.5 C; ``r sources`` is how the deep solver drew its
backward sources (``backward_sources``: the causal factor of G, or the mixing of the upper
layer's samples that "auto" picks where it is cheaper). Times are CPU seconds of the process
with one BLAS thread (threaded BLAS adds spin-waiting to the CPU time), the best of
``--repeat`` after a warm-up: on a shared machine wall times move several-fold with other jobs.
The arrays themselves grow like C^2 (the NTK (T+1, n, C, n, C) and G (T+1, T+1, n, C, n, C)),
so the kernel parts cannot stay within 1.5 C at large C and n T: the table says where they do.

Usage: ``python benchmarks/outputs_cost.py [--quick] [--outputs 1 3 10] [--depths 1 2]``
"""
from __future__ import annotations

import argparse
import time

import dmft
from dmft.config import teacher_student
from solvers.mc._common import _single_thread_blas


def time_case(depth, C, args, **opts):
    """Best CPU time (``time.process_time``: all threads of this process; robust to other
    jobs on a shared machine, unlike wall time) of ``args.repeat`` solves after one warm-up
    solve, in seconds, and the wall time of that solve; None where refused."""
    data = teacher_student(P=args.P, Q=args.Q, D=args.D, seed=0, outputs=C)
    net = dmft.MLP(depth, "tanh")
    train = dmft.GradientDescent(1.0, args.lr, args.steps)
    if args.samples is not None:
        opts = dict(opts, samples=args.samples)
    best = None
    for k in range(args.repeat + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            with _single_thread_blas():
                sol = dmft.solve(net, data, train, method="mc", seed=0, progress=False,
                                 **opts)
        except ValueError as exc:
            if C > 1 and "does not solve" in str(exc):
                return None
            raise
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        if k and (best is None or cpu < best[0]):  # k = 0: warm-up (compilation, caches)
            best = (cpu, wall, sol.options.get("backward_sources", "-"),
                    sol.options["samples"])
    return best


def table(args):
    rows = []
    for depth in args.depths:
        base = {}
        for C in args.outputs:
            t_full = time_case(depth, C, args)
            t_fk = time_case(depth, C, args, kernel_samples=2) if depth == 1 else t_full
            if C == args.outputs[0]:
                base = {"full": t_full, "fk": t_fk}
            rows.append((depth, C, t_full, t_fk, base))
    fmt = lambda v: "n/a" if v is None else f"{v[0]:8.3f}"              # noqa: E731
    wal = lambda v: "n/a" if v is None else f"{v[1]:7.2f}"               # noqa: E731
    rat = lambda v, b: ("n/a" if v is None or not b else f"{v[0] / b[0]:6.2f}")  # noqa: E731
    print(f"method='mc' cost of C outputs: P={args.P} Q={args.Q} D={args.D} "
          f"steps={args.steps} samples={args.samples or 'default'} (CPU seconds with one "
          f"BLAS thread, best of {args.repeat} after a warm-up; wall seconds of that run)")
    print(f"{'depth':>5} {'C':>3} {'samples':>7} {'full cpu':>8} {'wall':>7} {'ratio':>6} "
          f"{'f+ntk':>8} {'wall':>7} {'ratio':>6} {'bound':>6} {'r sources':>9}")
    for depth, C, tf, tk, base in rows:
        print(f"{depth:>5} {C:>3} {tf[3] if tf else '-':>7} {fmt(tf):>8} {wal(tf):>7} "
              f"{rat(tf, base.get('full')):>6} {fmt(tk):>8} {wal(tk):>7} "
              f"{rat(tk, base.get('fk')):>6} {1.5 * C:>6.1f} {tf[2] if tf else '-':>9}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--outputs", type=int, nargs="+", default=[1, 3, 10])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    p.add_argument("--P", type=int, default=8)
    p.add_argument("--Q", type=int, default=8)
    p.add_argument("--D", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=None,
                   help="march samples (default: the solver's, 65536 at depth 1 and 16384 "
                        "at depth >= 2)")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.P, args.Q, args.steps, args.samples, args.repeat = 6, 2, 10, 4096, 1
    return table(args)


if __name__ == "__main__":
    main()
