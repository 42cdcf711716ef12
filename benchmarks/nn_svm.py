"""Wide networks trained with the hinge loss and weight decay toward the initialisation vs the
soft-margin SVM with the NTK (docs/theory.rst §7).

In the lazy limit, gradient descent on sum_mu max(0, 1 - y_mu f_mu) with weight decay lambda
toward the initialisation (``decay_to="init"``) is a kernel machine: f - f(0) = K alpha,
alpha(t+1) = a alpha(t) + lr Delta(t), a = 1 - lr lambda, Delta = y 1[y f < 1], i.e.
subgradient descent on the primal soft-margin SVM min_w sum_mu max(0, 1 - y_mu w.psi_mu) +
(lambda / 2) |w|^2 in any feature space psi with psi psi^T = K (C_svm = 1 / lambda).

Three parts, one table each:

(a) ``static vs SVM``: ``method="static"`` (loss="hinge", weight_decay=lambda,
    decay_to="init") against an SVM written here independently: the depth-1 ReLU NTK from its
    closed arc-cosine form, K = Phi^1 + Gdot^1 * Phi^0 with Phi^1 = sqrt(k k')(sin th +
    (pi - th) cos th) / (2 pi), Gdot^1 = (pi - th) / (2 pi), explicit features psi from its
    eigendecomposition, and primal subgradient descent on w with the same lr and steps.
    Columns: the largest difference of the kernels and of the predictions (train and test).

(b) ``networks -> SVM``: centred finite networks (``dmft.simulate(..., center=True)``) of
    width N in this package's mean-field convention with gamma0 = gamma / sqrt(N) (gamma = 1):
    then f = w . phi / (gamma sqrt(N)) and the step theta <- theta - lr gamma0^2 N dL/dtheta
    = theta - lr gamma^2 dL/dtheta are exactly the NTK parameterisation, whose N -> infinity
    limit is the lazy kernel machine above, approached at rate N^(-1/2) (the NTK at
    initialisation fluctuates by O(N^(-1/2)) and moves by O(gamma0) = O(N^(-1/2))). Distance:
    per network the mean over all points of |f_net - f_svm|, then mean +- standard error over
    the networks (an L1 distance: the hinge subgradient is discontinuous, so a point near the
    margin can switch with probability O(N^(-1/2)); the mean absolute change stays
    O(N^(-1/2)), the RMS would not). Two columns: for the predictions averaged over the last
    half of the steps ("tail avg", the ergodic average that subgradient descent with a fixed
    step converges in) and at the last step. Fitted slope of log distance vs log N (weighted
    by the standard errors), expected -0.5.

    Finding: the tail average follows N^(-1/2) (slope -0.489 +- 0.008 over N = 64..4096);
    the last-step distance does not (slope -0.34, flattening to ~0.047 at N >= 2048; 0.045 at
    N = 16384 in a separate 12-network run). Once the points reach the margin, subgradient
    descent with a fixed step chatters around y f = 1 (the active set toggles from step to
    step), and which points toggle at a given step is sensitive to O(N^(-1/2))
    perturbations, so the instantaneous predictions differ by O(lr K) while their time
    average converges at the expected rate. With the (smooth) squared error in the same setup
    the last-step distance falls as N^(-1/2) (0.046, 0.023, 0.011 at N = 256, 1024, 4096), and
    with the hinge loss so does it before the margin is reached (t <= 20 steps).

(c) ``feature learning``: gamma0 = O(1) (fixed, mean-field) at the largest width, where the
    features move and the network leaves the SVM: margins y f on the training points (min,
    median), the number of support vectors (y f <= 1 + tol, tol = 0.05), the training and test
    error and the distance to the SVM, vs gamma0. Infinite-width rows from ``method="mc"``
    when it solves the problem (else marked unavailable), finite rows from
    ``dmft.simulate``.

Usage: ``python benchmarks/nn_svm.py [--quick] [--widths 64 128 ...] [--seeds 16]``.

Measured (2-core reference machine shared with other jobs, so times are upper bounds;
default run ``python benchmarks/nn_svm.py``, about 2.5 minutes; P = 30, Q = 60, D = 8, depth
1 ReLU, lr = 0.05, lambda = 0.5, 100 steps)::

    (a) max |K_static - K_closed| = 2.22e-16   max_t,mu |f_static - f_svm| = 7.11e-15

    (b) centred, gamma0 = 1/sqrt(N), 32 seeds; mean |f_net - f_svm| (+- se over networks)
         N   tail avg      +-se  last step      +-se  time s
        64  1.552e-01   3.7e-03  1.694e-01   4.7e-03     4.9
       128  1.105e-01   4.0e-03  1.282e-01   4.7e-03     3.6
       256  8.112e-02   1.9e-03  9.452e-02   2.5e-03     5.0
       512  5.650e-02   1.6e-03  7.388e-02   2.5e-03     7.7
      1024  3.994e-02   1.2e-03  6.262e-02   2.7e-03    11.8
      2048  2.872e-02   9.8e-04  4.918e-02   2.4e-03    23.1
      4096  2.037e-02   6.3e-04  4.729e-02   3.2e-03    43.1
        slope: tail average -0.489 +- 0.008 (expected -0.5); last step -0.343 +- 0.011

    (c) tail-averaged predictions; SV: y f <= 1.05 (training points), 8 networks per row;
        mc rows from ``--mc --gammas 0.5 1 2`` (2000 samples, 2 networks per N row there)
                 model   min yf   med yf    #SV train err  test err  |f-f_svm|
          SVM (static)   -0.100    1.005   21.0     0.033     0.233  0.000e+00
        N=4096 g0=0.25    0.104    1.028   16.6     0.000     0.217  1.457e-01
         N=4096 g0=0.5    0.279    1.079    9.9     0.000     0.217  2.560e-01
            mc  g0=0.5    0.283    1.078   10.0     0.000     0.217  2.532e-01  se(f) <= 0.05
           N=4096 g0=1    0.709    1.202    3.0     0.000     0.217  4.280e-01
              mc  g0=1    0.688    1.208    3.0     0.000     0.217  4.247e-01  se(f) <= 0.08
           N=4096 g0=2    0.752    1.446    1.1     0.000     0.217  6.816e-01
              mc  g0=2    0.745    1.477    1.0     0.000     0.217  6.950e-01  se(f) <= 0.18
           N=4096 g0=4    0.878    1.943    1.0     0.000     0.217  1.136e+00

Reading (c): feature learning takes the network away from the SVM steadily with gamma0 (the
distance grows from 0.15 at gamma0 = 0.25 to 1.1 at 4): the NTK grows along the labels, so
the margins widen (median y f from 1.0 to 1.9, smallest from -0.1 to 0.9), the training
points become separable (training error 3.3 % -> 0) and the support vectors thin out from 21 of
30 points to one; the test error barely moves on this small linear-teacher problem (0.233 ->
0.217, i.e. one of 60 test points; resolution 1/60). The infinite-width mc rows agree with the
N = 4096 networks within their Monte Carlo error bars.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

# The products here are small (n <= 100 points): one BLAS thread is fastest, and on a machine
# shared with other jobs several threads per process oversubscribe the cores (measured 100x
# slower); set before NumPy loads BLAS, overridable from the environment.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dmft  # noqa: E402


def make_data(P: int, Q: int, D: int, noise: float = 0.3, seed: int = 0) -> dmft.Dataset:
    """Gaussian inputs with |x|^2 = D, labels sign(x . beta / sqrt(D) + noise xi) in +-1."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    X *= math.sqrt(D) / np.linalg.norm(X, axis=1, keepdims=True)
    beta = rng.standard_normal(D)
    y = np.sign(X @ beta / math.sqrt(D) + noise * rng.standard_normal(P + Q))
    y[y == 0] = 1.0
    return dmft.Dataset(X[:P], y[:P], X[P:], y[P:])


def relu_ntk(X: np.ndarray) -> np.ndarray:
    """Depth-1 ReLU NTK of this convention in closed form (arc-cosine kernels)."""
    kx = X @ X.T / X.shape[1]
    d = np.sqrt(np.diag(kx))
    cos = np.clip(kx / np.outer(d, d), -1.0, 1.0)
    th = np.arccos(cos)
    phi1 = np.outer(d, d) * (np.sin(th) + (np.pi - th) * cos) / (2 * np.pi)
    gdot = (np.pi - th) / (2 * np.pi)
    return phi1 + gdot * kx


def svm_subgradient(K: np.ndarray, y: np.ndarray, lam: float, lr: float, steps: int):
    """Primal subgradient descent on sum_mu max(0, 1 - y_mu w.psi_mu) + lam |w|^2 / 2.

    psi (n, r): features with psi psi^T = K over all n points (eigendecomposition, negative
    rounding eigenvalues dropped); w(0) = 0; each step w <- w - lr (lam w - sum_{y f < 1}
    y_mu psi_mu). Returns f (steps + 1, n) = psi w(t).
    """
    P = y.shape[0]
    ev, V = np.linalg.eigh(K)
    keep = ev > ev.max() * 1e-14
    psi = V[:, keep] * np.sqrt(ev[keep])
    w = np.zeros(psi.shape[1])
    out = np.empty((steps + 1, K.shape[0]))
    for t in range(steps + 1):
        f = psi @ w
        out[t] = f
        if t == steps:
            break
        grad = lam * w
        for mu in range(P):
            if y[mu] * f[mu] < 1.0:
                grad -= y[mu] * psi[mu]
        w = w - lr * grad
    return out


def part_a(data, lam, lr, steps):
    net = dmft.MLP(1, "relu")
    tr = dmft.GradientDescent(0.0, lr, steps, loss="hinge", weight_decay=lam)
    sol = dmft.solve(net, data, tr, method="static")
    K = relu_ntk(data.X)
    f_svm = svm_subgradient(K, data.y_train, lam, lr, steps)
    dK = np.abs(sol.ntk[0] - K).max()
    df = np.abs(sol.predictions - f_svm).max()
    return sol, f_svm, dK, df


def tail_mean(f, axis=0):
    """Average over the last half of the steps (the ergodic average of subgradient descent)."""
    T1 = f.shape[axis]
    return np.take(f, np.arange(T1 // 2, T1), axis=axis).mean(axis=axis)


def distances(ens_pred, f_svm):
    """Per network: mean over points of |f - f_svm| for the tail-averaged predictions and at
    the last step. Returns (mean, se) of each over the networks."""
    avg = np.abs(tail_mean(ens_pred, 1) - tail_mean(f_svm, 0)[None]).mean(axis=1)   # (S,)
    last = np.abs(ens_pred[:, -1] - f_svm[-1][None]).mean(axis=1)
    S = avg.size
    return (avg.mean(), avg.std(ddof=1) / math.sqrt(S), last.mean(),
            last.std(ddof=1) / math.sqrt(S))


def fit_slope(widths, d, se):
    """Weighted least squares of log d against log N (weights 1 / se(log d)^2)."""
    logN, y = np.log(widths), np.log(d)
    w = (np.asarray(d) / np.asarray(se)) ** 2
    A = np.stack([np.ones_like(logN), logN], axis=1)
    cov = np.linalg.inv(A.T @ (w[:, None] * A))
    coef = cov @ (A.T @ (w * y))
    return coef[1], math.sqrt(cov[1, 1])


def part_b(data, lam, lr, steps, widths, seeds, gamma, f_svm):
    net = dmft.MLP(1, "relu")
    rows = []
    for N in widths:
        tr = dmft.GradientDescent(gamma / math.sqrt(N), lr, steps, loss="hinge",
                                  weight_decay=lam)
        t0 = time.perf_counter()
        ens = dmft.simulate(net, data, tr, width=N, seeds=range(seeds), center=True)
        el = time.perf_counter() - t0
        rows.append((N,) + distances(ens.predictions, f_svm) + (el,))
    r = np.array(rows)
    return rows, fit_slope(r[:, 0], r[:, 1], r[:, 2]), fit_slope(r[:, 0], r[:, 3], r[:, 4])


def margins(f, y, tol=0.05):
    m = y * f
    return m.min(), np.median(m), int(np.sum(m <= 1 + tol))


def part_c(data, lam, lr, steps, gammas, width, seeds, f_svm, samples, mc=True):
    """Rows (model, min yf, median yf, #SV, train err, test err, |f - f_svm|, note) of the
    tail-averaged predictions."""
    net = dmft.MLP(1, "relu")
    P = data.P
    y, yt = data.y_train, data.y_test
    ref = tail_mean(f_svm, 0)

    def row(name, f, note):
        f = np.atleast_2d(f)                                     # (S, n)
        st = np.array([margins(fi[:P], y) for fi in f])
        return (name, st[:, 0].mean(), st[:, 1].mean(), st[:, 2].mean(),
                np.mean(np.sign(f[:, :P]) != y), np.mean(np.sign(f[:, P:]) != yt),
                np.abs(f - ref).mean(), note)

    rows = [row("SVM (static)", ref, "")]
    for g0 in gammas:
        tr = dmft.GradientDescent(g0, lr, steps, loss="hinge", weight_decay=lam)
        if mc:
            t0 = time.perf_counter()
            try:
                sol = dmft.solve(net, data, tr, method="mc", samples=samples, seed=0)
            except (ValueError, dmft.results.ConvergenceError) as exc:
                rows.append((f"mc  g0={g0:g}", np.nan, np.nan, np.nan, np.nan, np.nan, np.nan,
                             "unavailable: " + str(exc)[:50]))
            else:
                se = sol.stderr.get("train_predictions")
                se = "" if se is None else f", se(f) <= {np.max(tail_mean(se, 0)):.1e}"
                rows.append(row(f"mc  g0={g0:g}", tail_mean(sol.predictions, 0),
                                f"{time.perf_counter() - t0:.1f}s{se}"))
        t0 = time.perf_counter()
        ens = dmft.simulate(net, data, tr, width=width, seeds=range(seeds), center=True)
        rows.append(row(f"N={width} g0={g0:g}", tail_mean(ens.predictions, 1),
                        f"{time.perf_counter() - t0:.1f}s, {seeds} nets"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small preset (< 60 s)")
    ap.add_argument("--widths", type=int, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--train", type=int, default=30)
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--gammas", type=float, nargs="+", default=None)
    ap.add_argument("--mc", action="store_true",
                    help="add infinite-width rows from method='mc' to part (c) (minutes: "
                         "about 1 min per gamma0 at 1000 samples and 100 steps)")
    ap.add_argument("--samples", type=int, default=2000, help="mc samples (part c, --mc)")
    args = ap.parse_args(argv)
    q = args.quick
    widths = args.widths or ([64, 256, 1024] if q else [64, 128, 256, 512, 1024, 2048, 4096])
    seeds = args.seeds or (8 if q else 32)
    steps = args.steps or (40 if q else 100)
    gammas = args.gammas or ([0.5, 2.0] if q else [0.25, 0.5, 1.0, 2.0, 4.0])
    data = make_data(args.train, args.test, args.dim)
    lam, lr = args.weight_decay, args.lr

    print(f"P={data.P} Q={data.Q} D={data.D} depth 1 relu, hinge, weight_decay={lam} toward "
          f"init, lr={lr}, steps={steps}")
    sol, f_svm, dK, df = part_a(data, lam, lr, steps)
    print("\n(a) static vs SVM (independent closed-form NTK + primal subgradient descent)")
    print(f"    max |K_static - K_closed| = {dK:.2e}   max_t,mu |f_static - f_svm| = {df:.2e}")

    rows, (slope, se), (slope_last, se_last) = part_b(data, lam, lr, steps, widths, seeds,
                                                       1.0, f_svm)
    print(f"\n(b) networks -> SVM: centred, gamma0 = 1/sqrt(N), {seeds} seeds; mean over "
          f"networks and points of |f_net - f_svm|")
    print(f"{'N':>6} {'tail avg':>10} {'+-se':>9} {'last step':>10} {'+-se':>9} {'time s':>7}")
    for N, a, sa, b, sb, el in rows:
        print(f"{N:>6} {a:>10.3e} {sa:>9.1e} {b:>10.3e} {sb:>9.1e} {el:>7.1f}")
    print(f"    slope of log distance vs log N: tail average {slope:.3f} +- {se:.3f} "
          f"(expected -0.5); last step {slope_last:.3f} +- {se_last:.3f}")

    crow = part_c(data, lam, lr, steps, gammas, widths[-1], max(2, seeds // 4), f_svm,
                  args.samples, mc=args.mc)
    print("\n(c) feature learning (gamma0 fixed), tail-averaged predictions; margins y f on "
          "train, SV: y f <= 1.05")
    print(f"{'model':>18} {'min yf':>8} {'med yf':>8} {'#SV':>6} {'train err':>9} "
          f"{'test err':>9} {'|f-f_svm|':>10}  note")
    for name, mt, mm, sv, te, tt, d, note in crow:
        print(f"{name:>18} {mt:>8.3f} {mm:>8.3f} {sv:>6.1f} {te:>9.3f} {tt:>9.3f} {d:>10.3e}"
              f"  {note}")
    return {"dK": dK, "df": df, "rows_b": rows, "slope": slope, "slope_se": se,
            "slope_last": slope_last, "rows_c": crow}


if __name__ == "__main__":
    main()
