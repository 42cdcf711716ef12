"""Finite-width fluctuations of two-layer networks: theory (dmft.fluctuations) vs simulations.

Three parts, each printing a table (and, unless ``--no-plots``, a PNG figure):

1. ``convergence``: N Var of the final predictions (all points) and of the final NTK entries
   of simulated two-layer tanh networks (``--seeds`` per width, widths 128 .. 2048) divided by
   the propagator's prediction, for gamma0 = 0.1, 1, 2. The ratios should approach 1 as the
   width grows (the O(1/N) corrections to N Var vanish); error bars: the ensembles' own
   sampling error (spread over seeds of the summed squared deviations) and the propagator's
   batch-means error.
2. ``feature-learning``: the paper's claim (Bordelon & Pehlevan 2023) that feature learning
   reduces the variance of the final NTK and of the final predictions in two-layer networks:
   N Var at the last step against gamma0 (lazy limit first), theory and simulation at one
   width, for the raw and the centred model (f - f(theta_0); the raw model carries the
   initial-output variance Phi^1 / gamma0^2).
3. ``timing``: the two-layer propagator with 10 points and 100 steps.
4. ``depth``: the paper's claim that kernel variance accumulates with depth at large gamma0
   while the kernels' signal-to-noise ratio improves. For tanh networks of depth L = 1, 2, 3
   and gamma0 in ``--depth-gammas`` (default 0.5, 1, 2): simulations at one width (sum over
   entries of N Var K(T) of the final NTK, the width-free signal-to-noise ratio sum K_mean^2 /
   sum N Var K, sum N Var f(T)) beside the propagators at the last step (``times=[T]``;
   two-layer ``"propagator"``, deep ``"deep-propagator"``; ``--depth-no-theory`` skips
   them). Error bars: spread over seeds of the summed squared deviations (simulations), the
   entries' standard errors summed (propagators, an upper bound).

5. ``speed`` (issue 21): time and peak memory for N Var of the final test predictions (Vf, sum
   over test points) and of the final NTK (VK, sum over the upper triangle) at <= 5 %
   relative standard error, propagator (``dmft.fluctuations(..., times=[T])``, samples doubled
   until both errors are <= 5 %) against ensembles of simulated networks at widths 128, 256,
   512 (seeds doubled until the intercept a of a weighted least-squares fit N Var = a + b / N
   has <= 5 % relative error), for two-layer tanh (16 + 16 points, 100 steps) and tanh depth 2
   and 3 (8 + 4 points, 40 steps); gamma0 = 1, lr = 0.1, centred. Each propagator run is a
   fresh (spawned) process whose peak resident memory (VmHWM; interpreter, NumPy and Numba
   included) is its peak; the ensembles run in one spawned process, in batches of seeds
   keeping only the final step, and its VmHWM is theirs. ``--cases two-layer,depth2,depth3`` selects rows; a row
   that fails prints its error.

Usage: ``python benchmarks/fluctuations.py [--quick] [--parts convergence,feature-learning,timing,depth,speed]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
if HERE not in sys.path:            # part 5 lives in a sibling module
    sys.path.append(HERE)

import dmft  # noqa: E402
from dmft._two_layer import solve_two_layer  # noqa: E402
from solvers.stats import summed_variance  # noqa: E402
from fluctuations_speed import SPEED_CASES, speed, summed_variances  # noqa: E402


def _problem(P, Q, D, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    y = np.sign(X[:P, 0]) * 1.0
    return dmft.Dataset(X[:P], y, X[P:])


def pooled_ratio(x, theory):
    """(sum over entries of the seed variance) / (sum of theory) and its standard error."""
    v, se = summed_variance(x)
    tot = float(np.sum(theory))
    return v / tot, se / tot


def pooled_theory_se(value, se):
    """Standard error of a sum of theory entries (blocks are shared: add errors linearly,
    an upper bound)."""
    return float(np.sum(se)) / float(np.sum(value))


def _axes(**kw):
    """A figure with two panels side by side (matplotlib imported only when plotting)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, 2, figsize=(9, 3.6), **kw)


def _save(fig, args, name):
    fig.tight_layout()
    path = os.path.join(args.out, name)
    fig.savefig(path, dpi=120)
    print(f"  figure: {path}")


def convergence(args):
    data = _problem(args.points, 2, 8, 1)
    net = dmft.MLP(1, "tanh")
    i, j = np.triu_indices(data.P + data.Q)
    rows = []
    print(f"\n[convergence] two-layer tanh, P={data.P} train + {data.Q} test points, "
          f"T={args.steps}, lr={args.lr}, seeds per width={args.seeds}, propagator samples="
          f"{args.samples}")
    print(f"{'gamma0':>6} {'width':>6} {'NVar f / theory':>18} {'NVar K / theory':>18} "
          f"{'theory rel.err f':>16} {'K':>7} {'sim s':>7}")
    for gamma0 in args.gammas:
        train = dmft.GradientDescent(gamma0=gamma0, lr=args.lr, steps=args.steps)
        sol = solve_two_layer(net, data, train, samples=args.pop, seed=1)
        fl = dmft.fluctuations(sol, samples=args.samples, seed=2)
        T = train.steps
        thf, thk = np.diag(fl.prediction_cov[T]), fl.ntk_var[T][i, j]
        sef = pooled_theory_se(thf, np.diag(fl.stderr["prediction_cov"][T]))
        sek = pooled_theory_se(thk, fl.stderr["ntk_var"][T][i, j])
        for N in args.widths:
            t0 = time.perf_counter()
            ens = dmft.simulate(net, data, train, width=N, seeds=range(args.seeds))
            el = time.perf_counter() - t0
            rf = pooled_ratio(np.sqrt(N) * ens.predictions[:, T], thf)
            rk = pooled_ratio(np.sqrt(N) * ens.ntk[:, T][:, i, j], thk)
            rows.append((gamma0, N, rf, rk, sef, sek))
            print(f"{gamma0:6.2f} {N:6d} {rf[0]:10.3f} +- {rf[1]:.3f} {rk[0]:10.3f} +- "
                  f"{rk[1]:.3f} {sef:16.3f} {sek:7.3f} {el:7.1f}")
    verdict = []
    for gamma0 in args.gammas:
        last = [r for r in rows if r[0] == gamma0][-1]
        ok = all(abs(r[0] - 1) <= 0.10 or abs(r[0] - 1) <= 2 * r[1] for r in (last[2], last[3]))
        verdict.append(f"gamma0={gamma0:g}: {'within' if ok else 'NOT within'} 10 % (or 2 "
                       f"error bars) at width {last[1]}")
    print("  " + "\n  ".join(verdict))
    if not args.no_plots:
        fig, axes = _axes(sharey=True)
        for k, (ax, name) in enumerate(zip(axes, ("predictions", "NTK entries"))):
            for gamma0 in args.gammas:
                rr = [r for r in rows if r[0] == gamma0]
                Ns = np.array([r[1] for r in rr])
                val = np.array([r[2 + k][0] for r in rr])
                err = np.array([r[2 + k][1] for r in rr])
                ax.errorbar(Ns, val, yerr=err, marker="o", capsize=3, label=f"gamma0={gamma0:g}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.axhspan(0.9, 1.1, color="0.9")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width N")
            ax.set_title(f"N Var(final {name}) / propagator")
        axes[0].legend()
        _save(fig, args, "fluctuations_convergence.png")
    return rows


def feature_learning(args):
    data = _problem(args.points, 2, 8, 1)
    net = dmft.MLP(1, "tanh")
    P = data.P
    N = args.fl_width
    print(f"\n[feature-learning] two-layer tanh, P={P} + {data.Q} test, T={args.steps}, "
          f"lr={args.lr}; simulation width {N}, {args.seeds} seeds. Sums over entries of N Var at "
          f"the last step.")
    hdr = (f"{'gamma0':>7} {'centred':>7} {'K theory':>10} {'K sim':>14} {'f_train th':>11} "
           f"{'f_test th':>10} {'f_test sim':>16}")
    print(hdr)
    rows = []
    static = dmft.solve(net, data, dmft.GradientDescent(gamma0=0.0, lr=args.lr,
                                                        steps=args.steps), method="static")
    for center in (True, False):
        for gamma0 in [0.0] + list(args.fl_gammas):
            train = dmft.GradientDescent(gamma0=gamma0, lr=args.lr, steps=args.steps)
            T = train.steps
            if gamma0 == 0.0:
                if not center:
                    continue
                fl = dmft.fluctuations(static, center=True, samples=10 * args.samples, seed=2)
                sim = None
            else:
                sol = solve_two_layer(net, data, train, samples=args.pop, seed=1)
                fl = dmft.fluctuations(sol, samples=args.samples, seed=2, center=center)
                sim = dmft.simulate(net, data, train, width=N, seeds=range(args.seeds),
                                    center=center)
            K_th = float(np.sum(fl.ntk_var[T]))
            ftr = float(np.trace(fl.prediction_cov[T][:P, :P]))
            fte = float(np.trace(fl.prediction_cov[T][P:, P:]))
            if sim is not None:
                Ks = N * sim.ntk[:, T].var(0, ddof=1).sum()
                Ks_se = Ks * np.sqrt(2 / (args.seeds - 1))
                fs = N * sim.test_predictions[:, T].var(0, ddof=1).sum()
                fs_se = fs * np.sqrt(2 / (args.seeds - 1))
                ks, fss = f"{Ks:8.3f}+-{Ks_se:.2f}", f"{fs:9.4f}+-{fs_se:.4f}"
            else:
                Ks = fs = np.nan
                ks, fss = f"{'(lazy)':>14}", f"{'(lazy)':>16}"
            rows.append((gamma0, center, K_th, Ks, ftr, fte, fs))
            print(f"{gamma0:7.2f} {str(center):>7} {K_th:10.3f} {ks:>14} {ftr:11.4f} {fte:10.4f} "
                  f"{fss:>16}")
    for center in (True, False):
        rr = [r for r in rows if r[1] == center and r[0] > 0]
        dK = np.diff([r[2] for r in rr])
        dfte = np.diff([r[5] for r in rr])
        print(f"  centred={center}: final-NTK variance "
              f"{'decreases monotonically' if np.all(dK < 0) else 'does NOT decrease monotonically'}"
              f" with gamma0 over {[r[0] for r in rr]}; final test-prediction variance "
              f"{'decreases monotonically' if np.all(dfte < 0) else 'does NOT decrease monotonically'}")
    if not args.no_plots:
        fig, axes = _axes()
        for center, mk in ((True, "o"), (False, "s")):
            rr = [r for r in rows if r[1] == center and r[0] > 0]
            g = [r[0] for r in rr]
            axes[0].plot(g, [r[2] for r in rr], mk + "-", label=f"theory, centred={center}")
            axes[0].plot(g, [r[3] for r in rr], mk, mfc="none", ms=9,
                         label=f"sim N={N}, centred={center}")
            axes[1].plot(g, [r[5] for r in rr], mk + "-", label=f"theory, centred={center}")
            axes[1].plot(g, [r[6] for r in rr], mk, mfc="none", ms=9,
                         label=f"sim N={N}, centred={center}")
        lazy = [r for r in rows if r[0] == 0.0]
        if lazy:
            axes[0].axhline(lazy[0][2], color="k", ls=":", label="lazy limit")
            axes[1].axhline(lazy[0][5], color="k", ls=":", label="lazy limit (centred)")
        axes[0].set_title("sum N Var K(T)")
        axes[1].set_title("sum N Var f_test(T)")
        for ax in axes:
            ax.set_xlabel("gamma0")
            ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        _save(fig, args, "fluctuations_feature_learning.png")
    return rows


def timing(args):
    P, T = 10, 100
    data = _problem(P, 0, 20, 3)
    net = dmft.MLP(1, "tanh")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.05, steps=T)
    t0 = time.perf_counter()
    sol = solve_two_layer(net, data, train, samples=args.pop, seed=1)
    t_sol = time.perf_counter() - t0
    # warm-up (Numba compilation / cache load) on a tiny problem
    dmft.fluctuations(sol, samples=40, blocks=2, seed=0)
    print(f"\n[timing] two-layer tanh, P={P} points, T={T} steps (gamma0=1, lr=0.05)")
    print(f"{'what':>34} {'samples':>8} {'seconds':>8} {'ms/sample':>10}")
    print(f"{'infinite-width march (solve)':>34} {args.pop:8d} {t_sol:8.2f} "
          f"{1e3 * t_sol / args.pop:10.4f}")
    rows = []
    for ntk in (False, True):
        t0 = time.perf_counter()
        fl = dmft.fluctuations(sol, samples=args.time_samples, seed=2, ntk=ntk,
                               chunk=args.chunk)
        el = time.perf_counter() - t0
        rel = np.median(fl.stderr["prediction_cov"][T].diagonal()
                        / fl.prediction_cov[T].diagonal())
        rows.append((ntk, el))
        what = "propagator, predictions + NTK" if ntk else "propagator, predictions only"
        print(f"{what:>34} {args.time_samples:8d} {el:8.2f} "
              f"{1e3 * el / args.time_samples:10.3f}   (median rel. stderr of N Var f(T): "
              f"{rel:.3f})")
    return rows


def _depth_theory(net, data, train, args):
    """The propagator at the last step (times=[T], centred): sum N Var K(T) over all entries,
    sum K^2 of the infinite-width NTK, sum N Var f(T) over all points, their standard errors
    (the sums' own errors, :func:`fluctuations_speed.summed_variances`) and the seconds of
    solve + propagator."""
    T = train.steps
    t0 = time.perf_counter()
    if net.depth == 1:
        sol = solve_two_layer(net, data, train, samples=args.pop, seed=1)
        fl = dmft.fluctuations(sol, method="propagator", times=[T], center=True,
                               samples=args.samples, seed=2, progress=False)
    else:
        sol = dmft.solve(net, data, train, method="mc", seed=0, progress=False)
        fl = dmft.fluctuations(sol, method="deep-propagator", times=[T], center=True,
                               samples=args.depth_samples, seed=2, progress=False)
    el = time.perf_counter() - t0
    n = data.P + data.Q
    (vf, vf_se, _), (vK, vK_se, _) = summed_variances(fl, T, np.eye(n, dtype=bool),
                                                      np.ones((n, n), bool))
    sig = float(np.sum(np.asarray(sol.ntk[T]) ** 2))
    return vK, vK_se, sig, vf, vf_se, el


def depth(args):
    data = _problem(args.points, 2, 8, 1)
    N, S, T = args.depth_width, args.depth_seeds, args.steps
    theory = not args.depth_no_theory
    print(f"\n[depth] tanh networks, P={data.P} + {data.Q} test, T={T}, lr={args.lr}; "
          f"simulations at width {N}, {S} seeds per row"
          + (f"; propagator at the last step (deep: {args.depth_samples} samples; "
             f"two-layer: {args.samples})" if theory else ""))
    print(f"{'gamma0':>7} {'L':>2} {'sum N Var K(T)':>18} {'sum K_mean^2':>13} "
          f"{'SNR/N':>16} {'sum N Var f(T)':>18} {'sim s':>6}"
          + (f" | {'theory N Var K':>17} {'K_inf^2':>9} {'SNR/N':>7} {'N Var f':>16} "
             f"{'th s':>6}" if theory else ""))
    rows = []
    for gamma0 in args.depth_gammas:
        for L in args.depths:
            train = dmft.GradientDescent(gamma0=gamma0, lr=args.lr, steps=T)
            net = dmft.MLP(L, "tanh")
            t0 = time.perf_counter()
            ens = dmft.simulate(net, data, train, width=N, seeds=range(S), center=True)
            el = time.perf_counter() - t0
            K = ens.ntk[:, T].reshape(S, -1)
            vK, vK_se = summed_variance(K, N)
            sig = float(np.sum(K.mean(0) ** 2))
            snr, snr_se = sig / vK, sig / vK * vK_se / vK
            f = ens.predictions[:, T]
            vf, vf_se = summed_variance(f, N)
            th = _depth_theory(net, data, train, args) if theory else None
            rows.append((gamma0, L, vK, vK_se, sig, snr, snr_se, vf, vf_se, th))
            line = (f"{gamma0:7.2f} {L:2d} {vK:10.3f}+-{vK_se:6.3f} {sig:13.3f} "
                    f"{snr:8.3f}+-{snr_se:5.3f} {vf:10.4f}+-{vf_se:6.4f} {el:6.1f}")
            if th is not None:
                tK, tK_se, tsig, tf, tf_se, tel = th
                line += (f" | {tK:9.3f}+-{tK_se:6.3f} {tsig:9.3f} {tsig / tK:7.3f} "
                         f"{tf:8.4f}+-{tf_se:6.4f} {tel:6.1f}")
            print(line, flush=True)
    for gamma0 in args.depth_gammas:
        rr = [r for r in rows if r[0] == gamma0]
        grows = np.all(np.diff([r[2] for r in rr]) > 0)
        print(f"  gamma0={gamma0:g}: kernel variance "
              f"{'grows' if grows else 'does NOT grow monotonically'} with depth "
              f"L={[r[1] for r in rr]}")
    for L in args.depths:
        rr = sorted([r for r in rows if r[1] == L])
        if len(rr) >= 2:
            diff = rr[-1][5] - rr[0][5]
            se = np.hypot(rr[-1][6], rr[0][6])
            verdict = ("improves" if diff > 2 * se else "WORSENS" if diff < -2 * se
                       else "makes no significant (2 s.e.) difference to")
            print(f"  L={L}: SNR/N at gamma0={rr[-1][0]:g} is {rr[-1][5]:.3f} +- {rr[-1][6]:.3f} "
                  f"vs {rr[0][5]:.3f} +- {rr[0][6]:.3f} at gamma0={rr[0][0]:g}: feature learning "
                  f"{verdict} the kernel SNR")
    if not args.no_plots:
        fig, axes = _axes()
        for gamma0 in args.depth_gammas:
            rr = [r for r in rows if r[0] == gamma0]
            Ls = [r[1] for r in rr]
            axes[0].errorbar(Ls, [r[2] for r in rr], [r[3] for r in rr], marker="o",
                             capsize=3, label=f"gamma0={gamma0:g}")
            axes[1].errorbar(Ls, [r[5] for r in rr], [r[6] for r in rr], marker="o",
                             capsize=3, label=f"gamma0={gamma0:g}")
        axes[0].set_title(f"sum N Var K(T) (sim, N={N})")
        axes[1].set_title("kernel SNR / N = sum K^2 / sum N Var K")
        for ax in axes:
            ax.set_xlabel("depth L (hidden layers)")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        _save(fig, args, "fluctuations_depth.png")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small preset (about a minute)")
    ap.add_argument("--parts", default="convergence,feature-learning,timing,depth,speed")
    ap.add_argument("--seeds", type=int, default=1000, help="networks per width")
    ap.add_argument("--widths", default="128,256,512,1024,2048")
    ap.add_argument("--gammas", default="0.1,1,2")
    ap.add_argument("--fl-gammas", default="0.1,0.25,0.5,1,2,3")
    ap.add_argument("--fl-width", type=int, default=1024)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--samples", type=int, default=40_000, help="propagator samples")
    ap.add_argument("--pop", type=int, default=400_000, help="infinite-width population")
    ap.add_argument("--time-samples", type=int, default=2_000,
                    help="propagator samples in the timing part (cost is linear in this)")
    ap.add_argument("--chunk", type=int, default=None, help="propagator chunk (timing part)")
    ap.add_argument("--depths", default="1,2,3")
    ap.add_argument("--depth-gammas", default="0.5,1,2")
    ap.add_argument("--depth-width", type=int, default=256)
    ap.add_argument("--depth-seeds", type=int, default=200)
    ap.add_argument("--depth-samples", type=int, default=16384,
                    help="deep propagator samples in the depth part (the default 4 maps of "
                         "4096: at (T + 1) (P + Q) = 186 flat points, depth 3 needs >= 4096 "
                         "per map; maps of 1024 blew up there)")
    ap.add_argument("--depth-no-theory", action="store_true",
                    help="depth part: simulations only")
    ap.add_argument("--cases", default="two-layer,depth2,depth3", help="speed part rows")
    ap.add_argument("--speed-target", type=float, default=0.05)
    ap.add_argument("--speed-sampler", default=None,
                    help="two-layer propagator sampler (default: the library's, 'sobol')")
    ap.add_argument("--speed-ntk-rank", type=int, default=None,
                    help="deep rows: ntk_rank of the deep propagator (the NTK's summed N Var "
                         "from this many principal directions plus probes; default every entry)")
    ap.add_argument("--speed-map-replicates", type=int, default=None,
                    help="deep rows: map_replicates (default the library's, 4: two pairs of "
                         "maps of samples / 4 each)")
    ap.add_argument("--speed-kappa-fraction", type=float, default=None,
                    help="deep rows: kappa_samples = this fraction of samples (default the "
                         "library's, min(8192, samples))")
    ap.add_argument("--speed-start", type=int, default=1000, help="first propagator samples")
    ap.add_argument("--speed-max-samples", type=int, default=1 << 18)
    ap.add_argument("--speed-seeds", type=int, default=128, help="first seeds per width")
    ap.add_argument("--speed-max-seeds", type=int, default=1 << 14)
    ap.add_argument("--out", default="fluctuations_figures")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.widths, args.gammas = 200, "128,512", "1"
        args.fl_gammas, args.fl_width = "0.25,1,2", 512
        args.samples, args.pop, args.time_samples, args.steps = 5_000, 50_000, 500, 20
        args.depth_width, args.depth_seeds = 128, 60
    args.widths = [int(x) for x in args.widths.split(",")]
    args.gammas = [float(x) for x in args.gammas.split(",")]
    args.fl_gammas = [float(x) for x in args.fl_gammas.split(",")]
    args.depths = [int(x) for x in args.depths.split(",")]
    args.depth_gammas = [float(x) for x in args.depth_gammas.split(",")]
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(args.cases) - set(SPEED_CASES))
    if unknown:
        ap.error(f"--cases {unknown} unknown; use some of {list(SPEED_CASES)}")
    if not args.no_plots:
        os.makedirs(args.out, exist_ok=True)
    parts = args.parts.split(",")
    out = {}
    if "convergence" in parts:
        out["convergence"] = convergence(args)
    if "feature-learning" in parts:
        out["feature-learning"] = feature_learning(args)
    if "timing" in parts:
        out["timing"] = timing(args)
    if "depth" in parts:
        out["depth"] = depth(args)
    if "speed" in parts:
        out["speed"] = speed(args)
    return out


if __name__ == "__main__":
    main()
