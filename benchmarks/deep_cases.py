"""Deep networks where the iterative solver reported divergence, against simulated networks.

The cases (teacher-student data, 8 train + 4 test points, D = 10, ``--steps`` steps, default 40):
tanh depth 3 at lr = 0.1 and gamma0 = 1.25, 1.5, 2; relu depth 3 and tanh depth 4 at
gamma0 = 1, lr = 0.1; linear depth 3 and 4 at gamma0 = 1, lr = 0.05 (there also against the
exact ``method="linear"``). For each case:

1. the default one-pass solve (``method="mc"``), its time and its reported standard errors;
2. with ``--iterative``, the iterative solver (``scheme="iterative"``) with its defaults, and
   whether it reports divergence;
3. ensembles of centred networks (f - f(0), the raw f(0) regressed out as a control variate
   with known mean 0) at ``--widths`` with ``--seeds`` seeds each, final predictions and NTK
   extrapolated linearly in 1/N to N = infinity (:func:`solvers.stats.fit_inverse_width`;
   ``--fit-min-width N`` fits only the widths >= N, for cases whose narrow widths are outside
   the 1/N regime);
   the table prints the largest gap to the DMFT over the P + Q final predictions (with the
   largest standard errors of the DMFT and of the extrapolation) and over the final NTK entries
   (relative to max|K|, with the combined standard error), the largest |gap| / combined se, and
   the final training loss of the widest networks (do the networks train?); below each case,
   the same gaps width by width (is the finite-width gap in its 1/N regime?). ``--out``
   keeps the full vectors (DMFT, per-width means and errors, the extrapolation) for other fits.
   Also the two-step mean NTK (K(T - 1) + K(T)) / 2 and the peak lr lambda_max(K_train(t)):
   at the edge of stability (that peak near 2, relu depth 3 here) each network's NTK
   oscillates with period 2 and a random phase, an O(1) spread of K(T) that does not fall
   like N^-1/2 at reachable widths; the two-step mean cancels it to first order.

A case where the networks themselves diverge (``--diverge``: tanh depth 3, gamma0 = 1,
lr = 1.5, above the static stable rate 0.92) checks that the one-pass solver reports divergence
there. (At lr = 0.6 the infinite-width dynamics catapult -- lr lambda_max(K) reaches 6.9 at
t = 3, then settles at 1.84 -- and train to loss ~1e-4; finite networks mostly do the same, but
some seeds diverge at every width tried, 256-2048, so ensemble means are not defined there.)

Usage: ``python benchmarks/deep_cases.py [--quick] [--cases ...] [--iterative] [--out r.json]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from solvers.stats import fit_inverse_width  # noqa: E402
from solvers.static import peak_lr_lambda  # noqa: E402

CASES = {
    "tanh3-g1.25": dict(L=3, activation="tanh", gamma0=1.25, lr=0.1),
    "tanh3-g1.5": dict(L=3, activation="tanh", gamma0=1.5, lr=0.1),
    "tanh3-g2": dict(L=3, activation="tanh", gamma0=2.0, lr=0.1),
    "relu3-g1": dict(L=3, activation="relu", gamma0=1.0, lr=0.1),
    "tanh4-g1": dict(L=4, activation="tanh", gamma0=1.0, lr=0.1),
    "linear3-g1": dict(L=3, activation="linear", gamma0=1.0, lr=0.05),
    "linear4-g1": dict(L=4, activation="linear", gamma0=1.0, lr=0.05),
}
DIVERGE = dict(L=3, activation="tanh", gamma0=1.0, lr=1.5)


def _problem(c, steps, P=8, Q=4):
    import dmft
    from dmft.config import teacher_student
    data = teacher_student(P=P, Q=Q, D=10, seed=0)
    return (dmft.MLP(c["L"], c["activation"]), data,
            dmft.GradientDescent(c["gamma0"], c["lr"], steps))


def _final(sol):
    return np.concatenate([sol.train_predictions[-1], sol.test_predictions[-1]])


def _final_se(sol):
    return np.concatenate([sol.stderr["train_predictions"][-1],
                           sol.stderr["test_predictions"][-1]])


def _fit(widths, means, ses, fit_min=0):
    """The 1/N extrapolation over the widths >= ``fit_min`` (all by default): where the
    narrow widths are outside the 1/N regime (tanh depth 3 at gamma0 = 2: per-width gaps 15 /
    9 / 3.5 / 1.7 % at N = 1024 .. 8192) fit only the wide ones."""
    w = np.asarray(widths, float)
    keep = w >= fit_min
    if keep.sum() < 2:
        raise ValueError(f"--fit-min-width {fit_min} leaves {int(keep.sum())} of the widths "
                         f"{list(widths)}: the 1/N fit needs at least two")
    b0, se0, _, _ = fit_inverse_width(w[keep], np.asarray(means)[keep], np.asarray(ses)[keep])
    return b0, se0


def ensemble(net, data, train, widths, seeds, fit_min=0):
    """Extrapolated N = infinity final predictions, NTK (upper triangle) and two-step mean NTK
    (K(T - 1) + K(T)) / 2 with standard errors, and the mean final training loss of the widest
    ensemble."""
    import dmft
    n = data.P + data.Q
    iu = np.triu_indices(n)
    means, ses, t_sim = [], [], 0.0
    loss = None
    for i, (N, S) in enumerate(zip(widths, seeds)):
        ens = dmft.simulate(net, data, train, width=N, center=True, progress=False,
                            seeds=range(100_000 * (i + 1), 100_000 * (i + 1) + S))
        t_sim += ens.elapsed
        two = 0.5 * (ens.ntk[:, -1] + ens.ntk[:, -2])           # the two-step mean NTK
        obs = np.concatenate([ens.predictions[:, -1], ens.ntk[:, -1][:, iu[0], iu[1]],
                              two[:, iu[0], iu[1]]], axis=1)
        Zc = ens.extras["f0"] - ens.extras["f0"].mean(0)
        beta = np.linalg.lstsq(Zc, obs - obs.mean(0), rcond=None)[0]
        adj = obs - ens.extras["f0"] @ beta
        means.append(adj.mean(0))
        ses.append(adj.std(0, ddof=Zc.shape[1] + 1) / np.sqrt(S))
        loss = float(np.mean(ens.train_loss[:, -1]))
        finite = bool(np.all(np.isfinite(ens.train_loss)))
    b0, se0 = _fit(widths, means, ses, fit_min)
    return b0, se0, loss, finite, t_sim, np.array(means), np.array(ses)


class _Populations:
    """Record each one-pass population's two-step mean NTK (K(T-1) + K(T)) / 2 while a solve
    runs (wrapping the population functions of :mod:`solvers.mc.causal`): the standard error of
    that mean is the spread of the populations' own values / sqrt(R), which the per-time
    stderr of the result cannot give (at the edge of stability K(T-1) and K(T) are
    anti-correlated over the populations)."""

    def __enter__(self):
        from solvers.mc import causal
        self.mod, self.two = causal, []
        self.orig = {k: getattr(causal, k) for k in ("_population", "_population_objective")}
        for k, f in self.orig.items():
            setattr(causal, k, self._wrap(f))
        return self

    def _wrap(self, f):
        def run(*a, **kw):
            o = f(*a, **kw)
            k = np.asarray(o["ntk"])
            self.two.append(0.5 * (k[-1] + k[-2]))
            return o
        return run

    def __exit__(self, *exc):
        for k, f in self.orig.items():
            setattr(self.mod, k, f)

    def se(self):
        """(n, n) standard error of the two-step mean NTK over the recorded populations."""
        x = np.array(self.two)
        return x.std(axis=0, ddof=1) / np.sqrt(len(x))


def _sims_from(path, name, widths, seeds, fit_min=0):
    """The ensemble part of case ``name`` from an earlier ``--out`` file (same widths and seeds:
    the networks are deterministic given their seeds), or None."""
    with open(path) as fh:
        rows = json.load(fh)
    for r in rows:
        v = r.get("vectors")
        if r.get("case") == name and v and v["widths"] == list(widths) and \
                r.get("seeds") == list(seeds):
            means, ses = np.array(v["means"]), np.array(v["ses"])
            b0, se0 = _fit(widths, means, ses, fit_min)
            return b0, se0, r["net_loss"], r["nets_finite"], r["sim_s"], means, ses
    return None


def run_case(name, c, args):
    import dmft
    net, data, train = _problem(c, args.steps)
    n = data.P + data.Q
    iu = np.triu_indices(n)
    row = {"case": name}
    try:
        opts = dict(args.option or [])
        if args.samples:
            opts["samples"] = args.samples
        with _Populations() as pops:
            sol = dmft.solve(net, data, train, method="mc", seed=args.seed, progress=False,
                             **opts)
        row.update(mc_s=sol.elapsed, status="ok")
    except dmft.ConvergenceError as exc:
        row.update(status="diverged: " + str(exc).split(".")[0])
        sol = None
    if args.iterative:
        try:
            it = dmft.solve(net, data, train, method="mc", scheme="iterative", seed=args.seed,
                            progress=False)
            row["iterative"] = f"ok ({it.iterations} it, {it.elapsed:.0f} s)"
        except dmft.ConvergenceError as exc:
            row["iterative"] = "diverged" if "diverged" in str(exc) else "not converged"
    if c["activation"] == "linear" and sol is not None:
        ex = dmft.solve(net, data, train, method="linear")
        row["vs_exact_pred"] = float(np.abs(_final(sol) - _final(ex)).max())
        row["vs_exact_ntk_rel"] = float(np.abs(sol.ntk[-1] - ex.ntk[-1]).max()
                                        / np.abs(ex.ntk[-1]).max())
    row["seeds"] = list(args.seeds)
    if args.fit_min_width:
        row["fit_min_width"] = int(args.fit_min_width)
    cached = _sims_from(args.sims_from, name, args.widths, args.seeds,
                        args.fit_min_width) if args.sims_from else None
    if cached is not None:
        row["sims_from"] = args.sims_from          # sim_s is then that run's time
    try:
        b0, se0, loss, finite, t_sim, means, ses = cached or ensemble(
            net, data, train, args.widths, args.seeds, args.fit_min_width)
    except dmft.ConvergenceError as exc:
        # dmft.simulate refuses a diverged ensemble (since 5 Dec 2026): the networks diverge
        # too, which is what the divergent case is meant to show
        row.update(net_loss=float("inf"), nets_finite=False, sim_s=float("nan"),
                   nets="the networks diverge (dmft.simulate: " + str(exc)[-120:] + ")")
        print(_line(row), flush=True)
        return row
    row.update(sim_s=t_sim, net_loss=loss, nets_finite=finite)
    if sol is not None:
        # the two-step mean (K(T - 1) + K(T)) / 2: at the edge of stability (lr lambda_max of
        # K_train near 2) each network's NTK oscillates with period 2 and a random phase, which
        # the mean over two steps cancels to first order; its DMFT se from the populations'
        # own two-step means (:class:`_Populations`)
        two = 0.5 * (sol.ntk[-1] + sol.ntk[-2])
        two_se = pops.se()
        th = np.concatenate([_final(sol), sol.ntk[-1][iu], two[iu]])
        th_se = np.concatenate([_final_se(sol), sol.stderr["ntk"][-1][iu], two_se[iu]])
        mi = len(iu[0])
        kk, k2 = slice(n, n + mi), slice(n + mi, None)
        se = np.hypot(se0, th_se)
        knorm = np.abs(sol.ntk[-1]).max()
        gap = b0 - th
        row.update(pred_gap=float(np.abs(gap[:n]).max()), pred_se=float(se[:n].max()),
                   pred_se_mc=float(th_se[:n].max()), pred_se_sim=float(se0[:n].max()),
                   ntk_gap_rel=float(np.abs(gap[kk]).max() / knorm),
                   ntk_se_rel=float(se[kk].max() / knorm),
                   max_z=float(np.abs(gap[:n + mi] / se[:n + mi]).max()),
                   ntk2_gap_rel=float(np.abs(gap[k2]).max() / knorm),
                   ntk2_se_rel=float(se[k2].max() / knorm),
                   ntk2_max_z=float(np.abs(gap[k2] / se[k2]).max()),
                   peak_lr_lambda=float(peak_lr_lambda(sol.ntk, data.P, c["lr"])),
                   dmft_loss=float(sol.train_loss[-1]))
        # the approach to the DMFT width by width: is the finite-width gap in its 1/N regime?
        k = int(np.argmax(np.abs(gap[:n])))
        row["by_width"] = [dict(N=int(N), pred_gap=float(np.abs(m[:n] - th[:n]).max()),
                                pred_gap_at_worst=float(m[k] - th[k]),
                                pred_se=float(s_[:n].max()),
                                ntk_gap_rel=float(np.abs(m[kk] - th[kk]).max() / knorm),
                                ntk2_gap_rel=float(np.abs(m[k2] - th[k2]).max() / knorm))
                           for N, m, s_ in zip(args.widths, means, ses)]
        # full vectors (final predictions, then the NTK's upper triangle) for later fits
        row["vectors"] = dict(dmft=th.tolist(), dmft_se=th_se.tolist(),
                              widths=[int(N) for N in args.widths], means=means.tolist(),
                              ses=ses.tolist(), extrapolated=b0.tolist(),
                              extrapolated_se=se0.tolist())
    print(_line(row), flush=True)
    return row


def _line(r):
    s = f"| {r['case']} | {r['status'][:40]} | "
    s += (f"{r['mc_s']:.1f} | " if "mc_s" in r else "- | ")
    if "pred_gap" in r:
        s += (f"{r['pred_gap']:.4f} ({r['pred_se_mc']:.4f}, {r['pred_se_sim']:.4f}) | "
              f"{100 * r['ntk_gap_rel']:.2f} % "
              f"({100 * r['ntk_se_rel']:.2f} %) | {r['max_z']:.2f} | {r['dmft_loss']:.2e} | ")
    else:
        s += "- | - | - | - | "
    s += f"{r['net_loss']:.2e} | {r['sim_s']:.0f} |"
    if "iterative" in r:
        s += f" {r['iterative']} |"
    if "vs_exact_pred" in r:
        s += f" exact: {r['vs_exact_pred']:.4f}, {100 * r['vs_exact_ntk_rel']:.2f} % |"
    if "nets" in r:
        s += " networks diverge |"
    if "ntk2_gap_rel" in r:
        s += (f"\n|   two-step mean NTK (K(T-1) + K(T)) / 2 | gap {100 * r['ntk2_gap_rel']:.2f} % "
              f"(se {100 * r['ntk2_se_rel']:.2f} %), max z {r['ntk2_max_z']:.2f} | peak lr "
              f"lambda_max(K_train) {r['peak_lr_lambda']:.3f} |")
    for w in r.get("by_width", []):
        s += (f"\n|   N = {w['N']} | pred gap {w['pred_gap']:.4f} (at the extrapolation's "
              f"worst point {w['pred_gap_at_worst']:+.4f}, se {w['pred_se']:.4f}) | "
              f"NTK gap {100 * w['ntk_gap_rel']:.2f} % (two-step mean "
              f"{100 * w['ntk2_gap_rel']:.2f} %) |")
    return s


def _option(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    return key, value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--widths", type=int, nargs="*", default=[256, 512, 1024])
    ap.add_argument("--seeds", type=int, nargs="*", default=[256, 128, 64])
    ap.add_argument("--samples", type=int, default=None, help="total samples of the one pass "
                    "(default: the solver's)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                    help="a further option of the one-pass solve (number or string), e.g. "
                         "--option stein_rtol=1e-3; repeatable")
    ap.add_argument("--iterative", action="store_true", help="also run scheme='iterative'")
    ap.add_argument("--diverge", action="store_true", help="also the divergent case")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sims-from", default=None, metavar="FILE",
                    help="reuse the networks of an earlier --out FILE (same case, widths and "
                         "seeds; they are deterministic given their seeds)")
    ap.add_argument("--fit-min-width", type=int, default=0, metavar="N",
                    help="extrapolate to N = infinity from the widths >= N only (default: all; "
                         "for cases whose narrow widths are outside the 1/N regime)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if sum(w >= args.fit_min_width for w in args.widths) < 2:
        ap.error(f"--fit-min-width {args.fit_min_width} leaves fewer than two of the widths "
                 f"{args.widths}: the 1/N fit needs two; lower it or add wider widths")
    if args.quick:
        args.cases = args.cases[:1]
        args.steps, args.widths, args.seeds = 10, [64, 128], [32, 16]
    print("| case | one-pass | mc s | pred gap (se mc, sim) | NTK gap (se) | max z | DMFT loss | "
          "net loss | sim s |" + (" iterative |" if args.iterative else ""))
    print("|---" * (9 + args.iterative) + "|")
    rows = [run_case(k, CASES[k], args) for k in args.cases]
    if args.diverge:
        rows.append(run_case("tanh3-lr1.5 (diverges)", DIVERGE, args))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
