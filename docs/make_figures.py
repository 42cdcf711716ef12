"""Draw the figures of the documentation (docs/figures/*.png) with the public dmft API.

Usage, from the repository root (40 s alone on two cores, about 2 min under load)::

    python docs/make_figures.py [--out docs/figures] [--only NAME ...]

Figures:

``two_layer_linear``
    docs/theory.rst §3: a two-layer linear network on one point, ``method="linear"`` against
    the exact discrete-time recursion and the gradient-flow closed form.
``deep_tanh``
    docs/theory.rst §2 and §4: a depth-2 tanh network, the full DMFT (``method="mc"``) against
    the static NTK, the gradient-independence approximation and simulated networks.
``fluctuations``
    docs/theory.rst §5: N Var of the final predictions of two-layer tanh networks against
    gamma0, the propagator (``dmft.fluctuations``) against simulated ensembles.
``scaling_mc``
    The measured cost of ``method="mc"`` (numbers transcribed from benchmarks/README.md, not
    recomputed).

Every figure is written at a modest resolution so that each PNG stays well below 150 KB.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import dmft

DPI = 80
COLORS = {"static": "tab:blue", "gia": "tab:purple", "mc": "tab:orange", "linear": "tab:orange",
          "net256": "tab:green", "net1024": "tab:red", "theory": "k"}


def _save(fig, out, name):
    path = os.path.join(out, name + ".png")
    fig.savefig(path, dpi=DPI)
    print(f"  wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")


def _log_ticks(ax, xticks, yticks, yfmt="{:g}"):
    """Log axes with the given major ticks labelled plainly and unlabelled minor ticks."""
    ax.set_xticks(xticks, [f"{v:g}" for v in xticks])
    ax.set_yticks(yticks, [yfmt.format(v) for v in yticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _movement(ntk):
    """|K(t) - K(0)|_F / |K(0)|_F along the time axis (the last two axes are the kernel)."""
    d = np.linalg.norm(ntk - ntk[..., :1, :, :], axis=(-2, -1))
    return d / np.linalg.norm(ntk[..., :1, :, :], axis=(-2, -1))


def _teacher(P, Q, D, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    beta = rng.standard_normal(D) / np.sqrt(D)
    y = np.tanh(2.0 * X @ beta)
    return dmft.Dataset(X[:P], y[:P], X[P:], y[P:])


# --------------------------------------------------------------------------------------------
def two_layer_linear(out):
    """method="linear" vs the recursion (theory §3, eq. two-layer-discrete) and gradient flow."""
    y, lr, steps = 1.0, 0.05, 80
    data = dmft.Dataset(np.ones((1, 1)), np.array([y]))  # one point, |x|^2 / D = 1
    net = dmft.MLP(depth=1, activation="linear")
    fig = Figure(figsize=(9.5, 3.4), layout="constrained")
    ax_f, ax_k = fig.subplots(1, 2)
    for g0, ls in ((0.5, ":"), (1.0, "--"), (2.0, "-")):
        sol = dmft.solve(net, data, dmft.GradientDescent(gamma0=g0, lr=lr, steps=steps),
                         method="linear")
        # the exact discrete-time recursion of docs/theory.rst §3
        K, f = np.empty(steps + 1), np.empty(steps + 1)
        K[0], f[0] = 2.0, 0.0
        for k in range(steps):
            a = lr * g0 * (y - f[k])
            K[k + 1] = (1 + a * a) * K[k] + 4 * a * g0 * f[k]
            f[k + 1] = (1 + a * a) * f[k] + a * K[k] / g0
        # gradient flow: df/dt = 2 sqrt(1 + g0^2 f^2) (y - f), fine explicit steps
        tt = np.linspace(0.0, sol.t[-1], 4001)
        ff = np.zeros_like(tt)
        for i in range(tt.size - 1):
            ff[i + 1] = ff[i] + (tt[1] - tt[0]) * 2 * np.sqrt(1 + g0**2 * ff[i]**2) * (y - ff[i])
        ax_f.plot(sol.t[::4], sol.train_predictions[::4, 0], "o", ms=3.5,
                  color=COLORS["linear"])
        ax_f.plot(sol.t, f, ls, color="k", lw=1, label=rf"$\gamma_0={g0:g}$")
        ax_f.plot(tt, ff, ls, color="tab:gray", lw=3, alpha=0.35)
        ax_k.plot(sol.t[::4], sol.ntk[::4, 0, 0], "o", ms=3.5, color=COLORS["linear"])
        ax_k.plot(sol.t, K, ls, color="k", lw=1)
        ax_k.plot(tt, 2 * np.sqrt(1 + g0**2 * ff**2), ls, color="tab:gray", lw=3, alpha=0.35)
        gap = max(np.abs(sol.train_predictions[:, 0] - f).max(), np.abs(sol.ntk[:, 0, 0] - K).max())
        print(f"  gamma0={g0}: largest gap solver vs recursion {gap:.1e}")
    static = dmft.solve(net, data, dmft.GradientDescent(gamma0=1.0, lr=lr, steps=steps),
                        method="static")
    ax_f.plot(static.t, static.train_predictions[:, 0], color=COLORS["static"], lw=1,
              label="static NTK")
    ax_f.set(xlabel="t", ylabel="f(t)", title="prediction (target y = 1)")
    ax_k.set(xlabel="t", ylabel="K(t)", title=r"NTK, ends at $2\sqrt{1+\gamma_0^2y^2}$")
    ax_f.legend(fontsize=8, loc="lower right")
    fig.suptitle('Two-layer linear network, one point: method="linear" (dots), discrete '
                 'recursion (black), gradient flow (grey)', fontsize=9)
    _save(fig, out, "two_layer_linear")


# --------------------------------------------------------------------------------------------
def deep_tanh(out):
    """Depth-2 tanh: mc vs static vs gia vs simulated networks (theory §2, §4)."""
    data = _teacher(P=4, Q=4, D=8)
    net = dmft.MLP(depth=2, activation="tanh")
    fig = Figure(figsize=(9.5, 6.2), layout="constrained")
    axes = fig.subplots(2, 2)
    for row, g0 in enumerate((0.25, 1.0)):
        train = dmft.GradientDescent(gamma0=g0, lr=0.05, steps=30)
        ax_l, ax_m = axes[row]
        for method in ("static", "gia", "mc"):
            sol = dmft.solve(net, data, train, method=method, seed=0)
            ax_l.plot(sol.t, sol.test_loss, color=COLORS[method], label=method)
            ax_m.plot(sol.t, _movement(sol.ntk), color=COLORS[method], label=method)
            if method == "mc":
                se = sol.stderr.get("test_predictions")
                if se is not None:
                    print(f"  gamma0={g0}: mc test-prediction stderr {se[-1].max():.1e}")
        for width in (256, 1024):
            ens = dmft.simulate(net, data, train, width=width, seeds=range(8), center=True)
            key = f"net{width}"
            loss = ens.test_loss
            mv = _movement(ens.ntk)
            for ax, a in ((ax_l, loss), (ax_m, mv)):
                m, s = a.mean(0), a.std(0, ddof=1)
                ax.plot(ens.t, m, "--", color=COLORS[key], label=f"N={width} (8 seeds)")
                ax.fill_between(ens.t, m - s, m + s, color=COLORS[key], alpha=0.15, lw=0)
        ax_l.set(xlabel="t", ylabel="test loss", title=rf"$\gamma_0={g0:g}$: test loss")
        ax_m.set(xlabel="t", ylabel=r"$|K(t)-K(0)|/|K(0)|$",
                 title=rf"$\gamma_0={g0:g}$: NTK movement")
    axes[0, 1].legend(fontsize=8)
    fig.suptitle("Depth-2 tanh network, 4 + 4 points: the full DMFT follows the networks; "
                 "the static NTK and GIA miss the kernel movement at large gamma0", fontsize=9)
    _save(fig, out, "deep_tanh")


# --------------------------------------------------------------------------------------------
def fluctuations(out):
    """Two-layer tanh: N Var f(T) from dmft.fluctuations vs simulated ensembles (theory §5)."""
    data = _teacher(P=4, Q=2, D=8, seed=1)
    net = dmft.MLP(depth=1, activation="tanh")
    gammas = (0.25, 0.5, 1.0, 2.0)
    width, seeds = 512, 200
    theory, sim, sim_se, th_se = [], [], [], []
    for g0 in gammas:
        train = dmft.GradientDescent(gamma0=g0, lr=0.1, steps=20)
        sol = dmft.solve(net, data, train, method="mc", seed=0)
        fl = dmft.fluctuations(sol, center=True, seed=0)
        P = data.P
        var_th = np.diag(fl.prediction_cov[-1])
        theory.append([var_th[:P].sum(), var_th[P:].sum()])
        se = fl.stderr.get("prediction_cov") if fl.stderr else None
        th_se.append([0.0, 0.0] if se is None else
                     [np.sqrt((np.diag(se[-1])[:P] ** 2).sum()),
                      np.sqrt((np.diag(se[-1])[P:] ** 2).sum())])
        ens = dmft.simulate(net, data, train, width=width, seeds=range(seeds), center=True)
        f = ens.predictions[:, -1, :]                     # (S, n) final predictions
        v = width * f.var(axis=0, ddof=1)
        # standard error of a sample variance, Gaussian approximation
        sv = v * np.sqrt(2.0 / (seeds - 1))
        sim.append([v[:P].sum(), v[P:].sum()])
        sim_se.append([np.sqrt((sv[:P] ** 2).sum()), np.sqrt((sv[P:] ** 2).sum())])
        print(f"  gamma0={g0}: theory {theory[-1][0]:.3f} / {theory[-1][1]:.3f}, "
              f"sim {sim[-1][0]:.3f} / {sim[-1][1]:.3f}")
    theory, sim, sim_se, th_se = map(np.asarray, (theory, sim, sim_se, th_se))
    fig = Figure(figsize=(9.5, 3.4), layout="constrained")
    for j, (ax, what) in enumerate(zip(fig.subplots(1, 2), ("train", "test"))):
        ax.errorbar(gammas, theory[:, j], yerr=th_se[:, j], fmt="o-", color=COLORS["theory"],
                    label="propagator (N = infinity)", capsize=3)
        ax.errorbar(gammas, sim[:, j], yerr=sim_se[:, j], fmt="s--", color=COLORS["net1024"],
                    label=f"networks N={width}, {seeds} seeds", capsize=3)
        ax.set(xscale="log", xlabel=r"$\gamma_0$", ylabel=r"$\sum_\mu N\,\mathrm{Var} f_\mu(T)$",
               title=f"{what} points")
        ax.set_xticks(gammas, [f"{g:g}" for g in gammas])
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.axes[0].legend(fontsize=8)
    fig.suptitle("Two-layer tanh, centred model, 4 + 2 points, 20 steps: N Var of the final "
                 "predictions, propagator against networks", fontsize=9)
    _save(fig, out, "fluctuations")


# --------------------------------------------------------------------------------------------
def scaling_mc(out):
    """Measured cost of method="mc" (transcribed from benchmarks/README.md)."""
    # scaling_mc.py table: base L = 3 tanh, P = 8 (+4), T = 50; one size varied at a time
    sweeps = {"T": ([25, 50, 100], [4.45, 12.65, 51.63]),
              "P": ([4, 8, 16], [5.09, 12.65, 34.19]),
              "L": ([2, 3, 5], [6.96, 12.65, 19.78])}
    # perf_mc.py case (c), 5 Dec 2026 (one run): one pass with moment-matched deeper
    # innovations, samples -> (mc s, err, mc se); the previous estimator (i.i.d. innovations)
    # and the iterative old default in the same run
    onepass = np.array([[2048, 1.23, 3.3e-3, 4.6e-3], [4096, 1.81, 4.1e-3, 3.7e-3],
                        [8192, 2.87, 1.7e-3, 2.3e-3], [16384, 4.55, 2.3e-3, 1.55e-3],
                        [32768, 7.57, 1.2e-3, 7.9e-4], [65536, 13.96, 4.9e-4, 6.2e-4]])
    normal = np.array([[8192, 2.20, 4.0e-3, 3.5e-3], [16384, 3.90, 7.3e-4, 2.7e-3]])
    fig = Figure(figsize=(9.5, 3.4), layout="constrained")
    ax_s, ax_e = fig.subplots(1, 2)
    for (name, (x, y)), c in zip(sweeps.items(), ("tab:blue", "tab:orange", "tab:green")):
        x, y = np.asarray(x, float), np.asarray(y)
        slope = np.polyfit(np.log(x), np.log(y), 1)[0]
        ax_s.plot(x / x[1], y, "o-", color=c, label=f"{name} (slope {slope:.2f})")
    ax_s.set(xscale="log", yscale="log", xlabel="size / base size (T=50, P=8, L=3)",
             ylabel="wall time [s]", title="scaling_mc.py: cost growth, one core")
    ax_s.legend(fontsize=8)
    ax_e.plot(onepass[:, 1], onepass[:, 3], "o-", color="tab:orange", label="one pass: stderr")
    ax_e.plot(onepass[:, 1], onepass[:, 2], "x", color="tab:orange", ms=7,
              label="one pass: error vs reference")
    ax_e.plot(normal[:, 1], normal[:, 3], "^--", color="tab:gray",
              label="one pass, i.i.d. innovations: stderr")
    ax_e.plot([5.00], [4.5e-3], "s", color="tab:purple", ms=7,
              label="iterative (old default): error", zorder=3)
    for s, t, e in onepass[:, :3]:
        ax_e.annotate(f"{int(s)}", (t, e), fontsize=7, textcoords="offset points",
                      xytext=(4, 4))
    ax_e.set(xscale="log", yscale="log", xlabel="wall time [s]", ylabel="RMS prediction error",
             title="perf_mc.py case (c): L=3 tanh, 5+3 points, T=40")
    ax_e.set_ylim(4e-4, 7e-3)
    ax_e.legend(fontsize=7, loc="lower left")
    _log_ticks(ax_s, [0.5, 1, 2], [5, 10, 20, 50])
    _log_ticks(ax_e, [1, 2, 4, 8, 16], [5e-4, 1e-3, 2e-3, 5e-3], "{:.0e}")
    fig.suptitle("Measured cost of method='mc' (benchmarks/README.md, 2-core machine; "
                 "scaling 4 Dec, errors 5 Dec 2026)", fontsize=9)
    _save(fig, out, "scaling_mc")


FIGURES = {"two_layer_linear": two_layer_linear, "deep_tanh": deep_tanh,
           "fluctuations": fluctuations, "scaling_mc": scaling_mc}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "figures"))
    parser.add_argument("--only", nargs="*", choices=sorted(FIGURES), default=None)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    for name in args.only or FIGURES:
        t0 = time.perf_counter()
        print(f"{name}:")
        FIGURES[name](args.out)
        print(f"  {time.perf_counter() - t0:.1f} s")
    print(f"all figures in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
