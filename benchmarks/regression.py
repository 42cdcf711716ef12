"""Record and compare a fixed set of small solves (every method, seed 0) to catch behaviour changes.

A refactor that claims "no behaviour change" must reproduce these numbers. Usage::

    python benchmarks/regression.py --record benchmarks/data/regression_seed0.npz
    python benchmarks/regression.py --compare benchmarks/data/regression_seed0.npz [--rtol 1e-12]

``--compare`` prints one row per case and array: the largest absolute difference, the largest
difference relative to the array's scale (max |reference|), and exits 1 when any relative
difference exceeds ``--rtol``. The cases are small (a few seconds in all after compilation).
On the machine that recorded the file the differences are 0 (bit-identical); another CPU or
BLAS can move Monte Carlo results at the 1e-13 level, and chaotic amplification through
the self-consistency can take that higher, hence the test suite's looser default
(tests/test_regression.py).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import dmft
from dmft.config import teacher_student


def _data(P=3, Q=2, D=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    y = np.tanh(X[:P, 0]) + 0.3 * X[:P, 1]
    return dmft.Dataset(X[:P], y, X[P:], np.tanh(X[P:, 0]) + 0.3 * X[P:, 1])


def _fields(res):
    """The arrays that define a result (Solution, Ensemble or Fluctuations)."""
    out = {}
    for key in ("train_predictions", "test_predictions", "ntk", "phi", "g", "A", "B",
                "prediction_cov", "ntk_var"):
        val = getattr(res, key, None)
        if val is not None:
            out[key] = np.asarray(val, dtype=np.float64)
    for key, val in (getattr(res, "stderr", None) or {}).items():
        if val is not None:
            out["stderr." + key] = np.asarray(val, dtype=np.float64)
    return out


def cases():
    """name -> zero-argument callable returning a result. Small sizes, seed 0 everywhere."""
    data = _data()
    tr = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=6)
    lazy = dmft.GradientDescent(gamma0=0.5, lr=0.2, steps=6)
    tanh1, tanh2 = dmft.MLP(1, "tanh"), dmft.MLP(2, "tanh")
    relu2, lin1, lin3 = dmft.MLP(2, "relu"), dmft.MLP(1, "linear"), dmft.MLP(3, "linear")
    small = dmft.Dataset(data.X_train[:2], data.y_train[:2], data.X_test[:1], data.y_test[:1])
    tr3 = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=3)
    c = {
        "static_tanh2": lambda: dmft.solve(tanh2, data, tr, "static"),
        "static_relu2": lambda: dmft.solve(relu2, data, tr, "static"),
        "linear_lin3": lambda: dmft.solve(lin3, data, tr, "linear"),
        "mc_tanh1": lambda: dmft.solve(tanh1, data, tr, "mc", seed=0, samples=4096),
        "mc_tanh2_onepass": lambda: dmft.solve(tanh2, data, tr, "mc", seed=0, samples=2048),
        "mc_relu2_onepass": lambda: dmft.solve(relu2, data, tr, "mc", seed=0, samples=2048),
        "mc_tanh2_iterative": lambda: dmft.solve(tanh2, data, tr, "mc", seed=0, samples=1024,
                                                 scheme="iterative"),
        "gia_tanh2": lambda: dmft.solve(tanh2, data, tr, "gia", seed=0, samples=2048),
        "perturbative_tanh2": lambda: dmft.solve(tanh2, data, lazy, "perturbative", seed=0),
        "perturbative_lin3": lambda: dmft.solve(lin3, data, lazy, "perturbative", seed=0),
        "simulate_tanh2": lambda: dmft.simulate(tanh2, data, tr, width=64, seeds=range(3),
                                                record_kernels=True),
    }
    # C = 3 outputs (the general march), backward sources by the factor and by the mixing
    # (recorded 5 Dec 2026)
    data3 = teacher_student(P=3, Q=2, D=4, seed=0, outputs=3)
    for how in ("factor", "mix"):
        c[f"mc_tanh2_outputs3_{how}"] = (lambda how=how: dmft.solve(
            tanh2, data3, tr, "mc", seed=0, samples=2048, backward_sources=how))
    sol1 = {}

    def base():
        if "s" not in sol1:
            sol1["s"] = dmft.solve(tanh1, data, tr, "mc", seed=0, samples=4096)
        return sol1["s"]
    c["fluct_propagator_tanh1"] = lambda: dmft.fluctuations(base(), method="propagator",
                                                            seed=0, samples=4000)
    c["fluct_lazy_tanh1"] = lambda: dmft.fluctuations(
        dmft.solve(tanh1, data, tr, "static"), method="lazy", seed=0, samples=20000)
    c["fluct_linear_exact"] = lambda: dmft.fluctuations(
        dmft.solve(lin1, data, tr, "linear"), method="linear-exact")
    c["fluct_deep_linear"] = lambda: dmft.fluctuations(
        dmft.solve(dmft.MLP(2, "linear"), small, tr3, "linear"), method="deep-linear")
    c["fluct_deep_propagator"] = lambda: dmft.fluctuations(
        dmft.solve(tanh2, small, tr3, "mc", seed=0, samples=2048), method="deep-propagator",
        seed=0, samples=1024, kappa_samples=256, map_replicates=1)
    # the default: two pairs of independent sampled maps, the cross estimate with kappa from
    # fresh samples (re-recorded 5 Dec 2026, session 22, when it replaced the plain form)
    c["fluct_deep_propagator_replicates"] = lambda: dmft.fluctuations(
        dmft.solve(tanh2, small, tr3, "mc", seed=0, samples=2048), method="deep-propagator",
        seed=0, samples=1024, kappa_samples=256)
    return c


def record(path, only=None):
    arrays = {}
    for name, fn in cases().items():
        if only and name not in only:
            continue
        for key, val in _fields(fn()).items():
            arrays[f"{name}/{key}"] = val
        print(f"recorded {name}", flush=True)
    np.savez_compressed(path, **arrays)


def compare(path, rtol):
    ref = np.load(path)
    names = sorted({k.split("/")[0] for k in ref.files})
    worst = 0.0
    print(f"{'case':<26} {'field':<28} {'max |diff|':>11} {'rel':>10}")
    allc = cases()
    for name in names:
        got = _fields(allc[name]())
        for key in sorted(k for k in ref.files if k.startswith(name + "/")):
            field = key.split("/", 1)[1]
            r = ref[key]
            if field not in got:
                print(f"{name:<26} {field:<28} {'MISSING':>11}")
                worst = np.inf
                continue
            g = got[field]
            if g.shape != r.shape:
                print(f"{name:<26} {field:<28} shape {g.shape} != {r.shape}")
                worst = np.inf
                continue
            both_nan = np.isnan(g) & np.isnan(r)
            d = np.where(both_nan, 0.0, np.abs(g - r))
            scale = max(float(np.nanmax(np.abs(r))) if r.size and not np.all(np.isnan(r))
                        else 0.0, 1e-300)
            dmax = float(np.max(d)) if d.size else 0.0
            rel = dmax / scale
            worst = max(worst, rel)
            print(f"{name:<26} {field:<28} {dmax:11.2e} {rel:10.2e}")
    print(f"worst relative difference {worst:.2e} (tolerance {rtol:g})")
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", metavar="NPZ")
    g.add_argument("--compare", metavar="NPZ")
    ap.add_argument("--rtol", type=float, default=1e-12)
    args = ap.parse_args(argv)
    if args.record:
        record(args.record)
        return 0
    return 0 if compare(args.compare, args.rtol) <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
