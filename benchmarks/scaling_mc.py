"""Cost growth of the one-pass deep solver (``method="mc"``, L >= 2) in T, P and L.

From a base problem (L = 3 tanh, P = 8 train + Q = P / 2 test points, T = 50 steps,
gamma0 = 1, lr = 0.05, teacher-student data, the solver's default samples), one size at a time
is varied: T in (25, 50, 100), P in (4, 8, 16), L in (2, 3, 5). Each configuration runs in a
fresh subprocess (one BLAS thread), which reports its wall time, the peak resident memory
(``ru_maxrss``, including the interpreter's ~0.1 GB), the solver's own memory estimate and its
flop model. The table ends with the exponents fitted on log-log axes over each sweep.

Expected from the algorithm (:mod:`solvers.mc.causal`): the march and the kernel rows cost
~ S L (n T)^2 per solve, the tangent responses ~ Sr (L - 1) n P^2 T^3; memory ~ S L n T (fields)
+ L (n T)^2 (kernels) + Sr L n P T^2 (tangents).

Usage: ``python benchmarks/scaling_mc.py [--quick] [--out r.json]``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(L=3, P=8, T=50)
SWEEPS = {"T": [25, 50, 100], "P": [4, 8, 16], "L": [2, 3, 5]}

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np
import dmft
from dmft.config import teacher_student
from solvers.mc import causal
c = json.loads(sys.argv[1])
data = teacher_student(P=c["P"], Q=c["P"] // 2, D=10, seed=0)
net = dmft.MLP(c["L"], "tanh")
train = dmft.GradientDescent(1.0, 0.05, c["T"])
opts = c.get("opts", {{}})
t0 = time.perf_counter()
sol = dmft.solve(net, data, train, method="mc", seed=0, progress=False, **opts)
wall = time.perf_counter() - t0
n, T1, P = data.P + data.Q, c["T"] + 1, data.P
R, S, Sr = sol.options["replicates"], sol.options["samples"], sol.options["response_samples"]
print(json.dumps({{"wall_s": wall, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "est_gb": float(sol.extras["memory_estimate_bytes"]) / 1e9,
                  "gflop": R * causal.estimate_flops(T1, n, P, c["L"], S // R, Sr // R, True) / 1e9,
                  "f_se_rms": float(np.sqrt(np.mean(np.concatenate([sol.stderr["train_predictions"][-1],
                                                                    sol.stderr["test_predictions"][-1]]) ** 2)))}}))
"""


def run(cfg):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT), json.dumps(cfg)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and samples")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    base, sweeps, opts = dict(BASE), {k: list(v) for k, v in SWEEPS.items()}, {}
    if args.quick:
        base = dict(L=2, P=4, T=10)
        sweeps = {"T": [5, 10, 20], "P": [2, 4, 8], "L": [2, 3]}
        opts = {"samples": 256, "replicates": 4}
    cache, rows = {}, []
    print("| sweep | L | P | T | wall s | peak RSS GB | est. GB | model GFlop | GFlop/s | "
          "f se |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, values in sweeps.items():
        for v in values:
            cfg = dict(base, **{key: v}, opts=opts)
            tag = (cfg["L"], cfg["P"], cfg["T"])
            if tag not in cache:
                cache[tag] = run(cfg)
            r = dict(cache[tag], sweep=key, L=cfg["L"], P=cfg["P"], T=cfg["T"])
            rows.append(r)
            print(f"| {key} | {r['L']} | {r['P']} | {r['T']} | {r['wall_s']:.2f} | "
                  f"{r['rss_gb']:.3f} | {r['est_gb']:.3f} | {r['gflop']:.1f} | "
                  f"{r['gflop'] / r['wall_s']:.1f} | {r['f_se_rms']:.2e} |", flush=True)
    print("\nfitted exponents (log-log slope over each sweep):")
    print("| sweep | time | peak RSS | estimate | model flops |")
    print("|---|---|---|---|---|")
    fits = {}
    for key in sweeps:
        rs = [r for r in rows if r["sweep"] == key]
        x = np.log([r[key] for r in rs])
        fit = {q: float(np.polyfit(x, np.log([r[q] for r in rs]), 1)[0])
               for q in ("wall_s", "rss_gb", "est_gb", "gflop")}
        fits[key] = fit
        print(f"| {key} | {fit['wall_s']:.2f} | {fit['rss_gb']:.2f} | {fit['est_gb']:.2f} | "
              f"{fit['gflop']:.2f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "fits": fits}, fh, indent=1)
    return rows, fits


if __name__ == "__main__":
    main()
