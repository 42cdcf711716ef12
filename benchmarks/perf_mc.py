"""Cost and accuracy of the Monte Carlo DMFT solver (``method="mc"``) against simulated networks.

Cases: (a) L = 1 tanh, 16 train + 16 test points, 100 steps, gamma0 = 1, lr = 0.1;
(b) L = 3 tanh, 8 train + 4 test points, 50 steps, gamma0 = 1, lr = 0.05 (at 0.1 case (b)
crosses the edge of stability, see CASES); (c) L = 3 tanh, 5 train + 3 test points, D = 10,
40 steps, gamma0 = 1, lr = 0.1 (a new user's first depth-3 problem); teacher-student data.

For each case:

1. A high-sample reference solve (``--ref-factor`` times the largest sample count, its own
   seed; for L >= 2 the one-pass solver with ``--ref-replicates`` populations sharing them).
   Its Monte Carlo standard error (``Solution.stderr``) is printed beside it.
2. For several sample counts S (for L >= 2 the total over the replicates): wall time of
   ``dmft.solve(method="mc", samples=S)`` with its other defaults, optionally peak NumPy
   memory of a second, identical call (``tracemalloc``: counts NumPy/Python allocations, not
   BLAS scratch; kept out of the timed call, which it slows), and the prediction error
   against the reference: err = RMS over all P + Q points of the final predictions f(T). It
   includes the reference's own error (its RMS stderr is shown as ``ref se``). With
   ``--iterative-samples`` the iterative deep solver (``scheme="iterative"``, the default
   before the one-pass solver) is timed too, in the same run; with ``--normal-samples`` the
   one pass as it was before moment-matched innovations (``deep_sources="normal"``), with
   ``--sampled-samples`` as it was before the known t = 0 kernels
   (``initial_kernels="sampled"``), with ``--one-block-samples`` as it was before the tangent
   blocks (``tangent_blocks=1``).
3. What a simulated ensemble needs for the same error. A pilot of centred networks
   (``center=True``; the raw initial outputs regressed out as control variates, mean exactly 0)
   at a few widths measures, per point j, the finite-width bias c_j / N (1/N slope fitted
   with a free intercept, so that the reference's own error is not booked as bias; mean_j
   c_j^2 debiased for the slopes' noise) and the per-network variance v_j / N of the
   adjusted predictions, and the time per network t(N) (log-log interpolated; beyond the
   pilot widths power-law extrapolated with the fitted exponent but at least the asymptotic
   one, N^2 for depth >= 2 and N for L = 1; held at the smallest pilot width's time below
   it). An ensemble of S networks of width N then has err^2 = mean_j (c_j/N)^2
   + mean_j v_j / (N S); for each target error the cheapest (N, S) over N = 2^k is chosen and
   its time S t(N) compared with the DMFT time (``speedup``; ``c+2sd``: the same with c_rms
   at its 2-sigma upper bound, the ensemble's worst case).
   For L = 1 the same solve is also timed with ``kernel_samples=2`` (``f-only``: identical
   predictions, the two-time kernels Phi(t, s), G(t, s) that the simulated ensemble does not
   produce are then nearly free) and compared likewise (``f-only`` speedup).
   With ``--verify`` the cheapest ensemble of the least accurate row is actually run and its
   measured error printed (one realisation: expect scatter of a few tens of percent).
4. A modelled projection to smaller errors than the rows reach (:func:`projection`): the DMFT's
   time linear in the samples and its error ~ samples^-1/2 (fitted to the rows, the
   reference's share of err removed) beside the cheapest modelled ensemble, whose cost grows
   like err^-3 once its bias forces wider networks. Where the two routes cross, if anywhere.

Times depend on the machine and on other jobs (the reference machine has 2 shared cores):
compare rows of one run. Set threads from the shell (``OPENBLAS_NUM_THREADS=1``,
``NUMBA_NUM_THREADS``) before Python starts.

Usage: ``python benchmarks/perf_mc.py [--quick] [--cases a b] [--samples ...] [--out r.json]
[--ref-cache PREFIX] [--response-samples SR]``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:          # run as a script from anywhere: import the package in ROOT
    sys.path.insert(0, ROOT)

from solvers.stats import fit_inverse_width  # noqa: E402  (after the path set-up above)

CASES = {
    "a": dict(L=1, activation="tanh", P=16, Q=16, steps=100, gamma0=1.0, lr=0.1,
              samples=[1 << 12, 1 << 14, 1 << 16, 1 << 18],
              pilot_widths=[256, 512, 1024], pilot_seeds=[256, 256, 256]),
    # lr = 0.05: at lr = 0.1 feature learning grows lambda_max(K) to ~28 by t ~ 4, so
    # lr lambda_max > 2 and finite networks catapult (edge of stability; width 1024 measured);
    # the solver then reports divergence
    "b": dict(L=3, activation="tanh", P=8, Q=4, steps=50, gamma0=1.0, lr=0.05,
              samples=[4096, 8192, 16384, 32768, 65536],
              # the bias is small (c_rms ~ 0.5: 4e-3 at N = 128), so the cheapest ensembles are
              # narrow; widths 128-512 give both the times there and a 1/N lever arm of 4
              pilot_widths=[128, 256, 512], pilot_seeds=[512, 256, 128]),
    # case (c): a new user's depth-3 problem
    "c": dict(L=3, activation="tanh", P=5, Q=3, D=10, steps=40, gamma0=1.0, lr=0.1,
              samples=[4096, 8192, 16384, 32768, 65536],
              pilot_widths=[128, 256, 512], pilot_seeds=[512, 256, 128]),
}
QUICK = {
    "a": dict(P=8, Q=8, steps=40, samples=[1 << 12, 1 << 14], pilot_widths=[128, 256, 512],
              pilot_seeds=[64, 64, 64]),
    "b": dict(P=4, Q=2, steps=20, samples=[2048, 4096], pilot_widths=[128, 256, 512],
              pilot_seeds=[48, 48, 48]),
    "c": dict(steps=20, samples=[2048, 4096], pilot_widths=[128, 256, 512],
              pilot_seeds=[48, 48, 48]),
}


def _problem(c, data_seed=0):
    import dmft
    from dmft.config import teacher_student
    data = teacher_student(P=c["P"], Q=c["Q"], D=c.get("D", max(8, c["P"] // 2)),
                           seed=data_seed)
    return (dmft.MLP(c["L"], c["activation"]), data,
            dmft.GradientDescent(c["gamma0"], c["lr"], c["steps"]))


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


def _pred_se(sol):
    """RMS over all P + Q points of the reported stderr of the final predictions."""
    return _rms(np.concatenate([sol.stderr["train_predictions"][-1],
                                sol.stderr["test_predictions"][-1]]))


def run_mc(net, data, train, samples, seed, memory=False, **opts):
    """One timed solve. Returns (Solution, wall seconds, peak traced MB or None).

    With ``memory`` the solve runs under ``tracemalloc``, which slows NumPy-heavy Python code
    (the deep solver took 2.1-2.6x longer under it): time and measure memory in separate
    solves."""
    import dmft
    if memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    sol = dmft.solve(net, data, train, method="mc", samples=int(samples), seed=seed,
                     progress=False, **opts)
    wall = time.perf_counter() - t0
    peak = None
    if memory:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return sol, wall, peak


def ensemble_errors(ens, ref):
    """Per-network final-prediction deviations from ``ref`` (n,) after regressing out the raw
    initial outputs f(0) (mean exactly 0). Returns (S, n)."""
    obs = ens.predictions[:, -1]
    Z = ens.extras["f0"]
    if ens.n_seeds > 2 * Z.shape[1] + 4:
        beta = np.linalg.lstsq(Z - Z.mean(0), obs - obs.mean(0), rcond=None)[0]
        obs = obs - Z @ beta
    return obs - ref[None, :]


def bias_rms(c, c_var):
    """RMS bias amplitude sqrt(mean_j c_j^2), debiased for the slopes' noise
    (E c_hat^2 = c^2 + var), and its 2-sigma upper bound (Var c_hat^2 = 2 var^2 + 4 c^2 var).

    ``c``, ``c_var``: the 1/N slopes of the ensembles' mean deviations from the reference and
    their variances, from a fit with a free intercept (:func:`solvers.stats.
    fit_inverse_width`), which absorbs the reference's own error (the same at every width).
    A fit through the origin would book that error as finite-width bias (it did for case (b)
    with a one-solve reference: c_rms 1.58 there against 0 with a 4-replicate one)."""
    c, c_var = np.asarray(c, dtype=float), np.asarray(c_var, dtype=float)
    c2 = float(np.mean(c ** 2 - c_var))
    c2_se = float(np.sqrt(np.mean(2 * c_var ** 2 + 4 * c ** 2 * c_var) / c.size))
    return math.sqrt(max(c2, 0.0)), math.sqrt(max(c2 + 2 * c2_se, 0.0))


def pilot(net, data, train, ref, widths, counts):
    """Bias slope c_j, variance slope v_j and time per network at the pilot widths."""
    import dmft
    widths = np.asarray(widths, dtype=float)
    means, varN, tnet = [], [], []
    for i, (N, S) in enumerate(zip(widths, counts)):
        seeds = range(10_000 * (i + 1), 10_000 * (i + 1) + int(S))
        ens = dmft.simulate(net, data, train, width=int(N), seeds=seeds, center=True,
                            progress=False)
        dev = ensemble_errors(ens, ref)
        means.append(dev.mean(0))
        varN.append(dev.var(0, ddof=1) * N)
        tnet.append(ens.elapsed / ens.n_seeds)
    means, varN = np.array(means), np.array(varN)
    v = varN.mean(0)                                   # v_j: N Var is O(1) in N
    se = np.sqrt(v[None, :] / (widths[:, None] * np.asarray(counts)[:, None]))
    _, _, c, c_se = fit_inverse_width(widths, means, se)
    c_rms, c_rms_upper = bias_rms(c, c_se ** 2)
    k = np.polyfit(np.log(widths), np.log(tnet), 1)[0] if len(widths) > 1 else 1.0
    return {"widths": widths.tolist(), "counts": [int(s) for s in counts],
            "t_net": tnet, "t_exponent": float(k), "c_rms": c_rms,
            "c_rms_upper": c_rms_upper,
            "v_mean": float(v.mean()), "mean_dev_rms": [_rms(m) for m in means]}


def _t_net(p, N):
    ws, ts = np.log(p["widths"]), np.log(p["t_net"])
    lN = math.log(N)
    if lN <= ws[-1]:
        return float(np.exp(np.interp(lN, ws, ts)))
    # beyond the widest pilot network: the fitted exponent, but at least the asymptotic one
    # (N x N hidden weights for depth >= 2: ~N^2; a two-layer net is ~N), since at the pilot
    # widths fixed per-step overheads flatten the fit
    return float(np.exp(ts[-1] + max(p["t_exponent"], p.get("t_exponent_min", 1.0))
                        * (lN - ws[-1])))


def cheapest_ensemble(p, err, widths=tuple(2 ** k for k in range(6, 16)), c_rms=None):
    """(time, N, S) of the cheapest ensemble with modelled error <= err, or None.

    ``c_rms``: the bias amplitude (default the pilot's estimate ``p["c_rms"]``)."""
    best = None
    c_rms = p["c_rms"] if c_rms is None else c_rms
    for N in widths:
        bias2 = (c_rms / N) ** 2
        if bias2 >= 0.9 * err ** 2:
            continue
        S = max(2, math.ceil(p["v_mean"] / (N * (err ** 2 - bias2))))
        t = S * _t_net(p, N)
        if best is None or t < best[0]:
            best = (t, N, S)
    return best


def run_case(name, c, args):
    import dmft
    net, data, train = _problem(c)
    n = data.P + data.Q
    print(f"\ncase {name}: L={c['L']} {c['activation']} P={data.P} Q={data.Q} "
          f"T={c['steps']} gamma0={c['gamma0']} lr={c['lr']}", flush=True)
    ref_samples = int(args.ref_factor * max(c["samples"]))
    ref_opts = {"replicates": args.ref_replicates} if c["L"] >= 2 else {}
    if c["L"] >= 2 and args.ref_response_samples:
        ref_opts["response_samples"] = args.ref_response_samples
    # the reference depends on the problem only (not on the timed rows or the pilot)
    key = json.dumps({"case": {k: v for k, v in c.items()
                               if k not in ("samples", "pilot_widths", "pilot_seeds")},
                      "ref_samples": ref_samples, **ref_opts}, sort_keys=True)
    cache = f"{args.ref_cache}_{name}.npz" if args.ref_cache else None
    cached = np.load(cache) if cache and os.path.exists(cache) else None
    if cached is not None and str(cached["key"]) != key:
        raise SystemExit(f"{cache} holds a reference for other settings; remove it")
    if cached is not None:
        ref_f, ref_se = cached["f"], float(cached["se"])
        ref_info = {k: cached[k].item() for k in ("samples", "wall_s", "iterations")}
        print(f"reference (cached in {cache}): {ref_info['samples']} samples in "
              f"{ref_opts.get('replicates', 1)} replicates, {ref_info['wall_s']:.1f} s when "
              f"computed, RMS stderr {ref_se:.2e}", flush=True)
    else:
        ref, ref_wall, _ = run_mc(net, data, train, ref_samples, seed=12345, **ref_opts)
        ref_f = ref.predictions[-1]
        ref_se = _pred_se(ref)
        ref_info = {"samples": int(ref.options["samples"]), "wall_s": ref_wall,
                    "iterations": int(ref.iterations)}
        if cache:
            np.savez(cache, key=key, f=ref_f, se=ref_se, **ref_info)
        print(f"reference: {ref.options['samples']} samples in {ref_opts.get('replicates', 1)} "
              f"replicates, {ref_wall:.1f} s, "
              f"{ref.iterations} iterations, RMS stderr {ref_se:.2e}", flush=True)
    # warm-up: load the cached Numba kernels and BLAS before the first timed row (the first
    # solve of a process paid ~2 s for it in case (a))
    run_mc(net, data, dataclasses.replace(train, steps=2), 256, seed=0)
    rows = []
    row_opts = {} if args.response_samples is None else {"response_samples":
                                                         args.response_samples}
    runs = [("default", S, row_opts) for S in c["samples"]]
    if c["L"] >= 2 and args.iterative_samples:
        # the iterative solver as it was the default before the one-pass solver (one solve)
        runs += [("iterative", S, {"scheme": "iterative"}) for S in args.iterative_samples]
    if c["L"] >= 2 and args.normal_samples:
        # the one pass as it was before 5 Dec 2026: i.i.d. deeper innovations, 16 replicates
        # at every sample count and max(8, samples per replicate / 128) tangent samples each
        R = 16
        runs += [("normal", S, {"deep_sources": "normal", "replicates": R,
                                "response_samples": R * max(8, S // R // 128)})
                 for S in args.normal_samples]
    if c["L"] >= 2 and args.sampled_samples:
        # the one pass as it was between 5 and 6 Dec 2026: the deeper sources drawn with the
        # population's own t = 0 kernels instead of the known NNGP ones
        runs += [("sampled", S, dict(row_opts, initial_kernels="sampled"))
                 for S in args.sampled_samples]
    if c["L"] >= 2 and args.one_block_samples:
        # the one pass as it was before 6 Dec 2026 (evening): one set of tangent samples
        # carries every source time's directions
        runs += [("one-block", S, dict(row_opts, tangent_blocks=1))
                 for S in args.one_block_samples]
    for scheme, S, opts in runs:
        sol, wall, _ = run_mc(net, data, train, S, seed=1, **opts)
        peak = (run_mc(net, data, train, S, seed=1, memory=True, **opts)[2]
                if args.memory else float("nan"))
        err = _rms(sol.predictions[-1] - ref_f)
        se = _pred_se(sol)
        total = int(sol.options["samples"])
        row = {"scheme": (scheme if scheme in ("normal", "sampled", "one-block") else
                          sol.options.get("scheme", "two-layer")), "samples": total,
               "wall_s": wall, "peak_mb": peak, "iterations": int(sol.iterations), "err": err,
               "stderr": se}
        if c["L"] == 1:
            # the predictions never need the two-time kernels (computed once at the end):
            # time the same solve with the fewest kernel samples (same predictions)
            sol2, wall2, _ = run_mc(net, data, train, S, seed=1, kernel_samples=2)
            assert np.array_equal(sol2.predictions, sol.predictions)
            row["f_only_s"] = wall2
        rows.append(row)
        print(f"  mc {row['scheme']} samples={total}: {wall:.2f} s "
              f"(predictions only {row.get('f_only_s', wall):.2f} s), err {err:.2e}, "
              f"stderr {se:.2e}", flush=True)
    t0 = time.perf_counter()
    p = pilot(net, data, train, ref_f, c["pilot_widths"], c["pilot_seeds"])
    p["t_exponent_min"] = 2.0 if c["L"] >= 2 else 1.0
    print(f"pilot ensembles {p['widths']} x {p['counts']} seeds ({time.perf_counter() - t0:.1f}"
          f" s): bias c_rms/N with c_rms = {p['c_rms']:.3g} (2-sigma upper "
          f"{p['c_rms_upper']:.3g}), N Var = {p['v_mean']:.3g}, "
          f"t/net = {['%.4f' % t for t in p['t_net']]} s (~N^{p['t_exponent']:.2f})",
          flush=True)
    for r in rows:
        best = cheapest_ensemble(p, r["err"])
        if best is None:
            r.update(sim_N=None, sim_S=None, sim_s=float("inf"), speedup=float("inf"),
                     speedup_f=float("inf"))
        else:
            r.update(sim_s=best[0], sim_N=best[1], sim_S=best[2], speedup=best[0] / r["wall_s"],
                     speedup_f=best[0] / r.get("f_only_s", r["wall_s"]))
        # the same with the bias at its 2-sigma upper bound (the ensemble's worst case)
        hi = cheapest_ensemble(p, r["err"], c_rms=p["c_rms_upper"])
        r["speedup_hi"] = float("inf") if hi is None else hi[0] / r["wall_s"]
    if args.verify and rows:
        r = max(rows, key=lambda r: r["err"])
        if r["sim_N"] is not None:
            t0 = time.perf_counter()
            ens = dmft.simulate(net, data, train, width=r["sim_N"],
                                seeds=range(500_000, 500_000 + r["sim_S"]), center=True,
                                progress=False)
            r["verify_err"] = _rms(ensemble_errors(ens, ref_f).mean(0))
            r["verify_s"] = time.perf_counter() - t0
    print(table(rows, ref_se))
    proj = projection([r for r in rows if r["scheme"] not in ("iterative", "normal")], ref_se,
                      p)
    if proj:
        print(proj["text"])
    return {"case": name, "spec": {k: v for k, v in c.items()}, "n": n,
            "reference": {**ref_info, "replicates": int(ref_opts.get("replicates", 1)),
                          "rms_stderr": ref_se, "f": [float(v) for v in ref_f]},
            "rows": rows, "pilot": p, "projection": proj and proj["rows"]}


def projection(rows, ref_se, p, targets=(1e-2, 3e-3, 1e-3, 3e-4, 1e-4)):
    """Both routes extrapolated to smaller errors than the rows reach (a model, not a run).

    DMFT: wall time t(S) = a + b S (least squares over the rows) and error^2 = V / S, with
    V = mean over rows of S (err^2 - ref_se^2) (the reference's share of err removed; rows
    where it dominates are skipped). Ensemble: :func:`cheapest_ensemble` with the pilot's
    bias and variance, so its cost grows like err^-3 once the bias c/N forces wider networks.
    The model keeps the rows' ``response_samples``: for deep networks that is optimistic for
    the DMFT below errors of ~2e-3 (the tangent remainder's own error, measured ~2e-3 at 128
    tangent samples, L = 3, T = 50, would need more of them). Returns None with fewer than
    two usable rows."""
    use = [r for r in rows if r["err"] ** 2 > 2 * ref_se ** 2]
    if len(use) < 2:
        return None
    S = np.array([r["samples"] for r in use], dtype=float)
    t = np.array([r["wall_s"] for r in use])
    b, a = np.polyfit(S, t, 1)
    a, b = max(a, 0.0), max(b, 1e-12)
    V = float(np.mean([r["samples"] * (r["err"] ** 2 - ref_se ** 2) for r in use]))
    out = []
    lines = [f"modelled (DMFT t = {a:.3g} s + {b * 1e3:.3g} ms x samples, err^2 = {V:.3g} / "
             f"samples; ensemble from the pilot):",
             f"{'err':>9} {'mc samples':>11} {'mc s':>10} | {'sim N':>6} {'sim S':>8} "
             f"{'sim s':>10} {'speedup':>8}"]
    for e in targets:
        Sm = V / e ** 2
        tm = a + b * Sm
        best = cheapest_ensemble(p, e)
        row = {"err": e, "samples": Sm, "mc_s": tm, "sim_N": best and best[1],
               "sim_S": best and best[2], "sim_s": best[0] if best else float("inf")}
        row["speedup"] = row["sim_s"] / tm
        out.append(row)
        sim = (f"{best[1]:>6} {best[2]:>8} {best[0]:>10.3g}" if best else
               f"{'-':>6} {'-':>8} {'inf':>10}")
        lines.append(f"{e:>9.1e} {Sm:>11.3g} {tm:>10.3g} | {sim} {row['speedup']:>8.3g}")
    return {"rows": out, "text": "\n".join(lines), "a": a, "b": b, "V": V}


def table(rows, ref_se):
    head = (f"{'scheme':>9} {'samples':>8} {'mc s':>8} {'f-only s':>8} {'peak MB':>8} "
            f"{'it':>3} {'err':>9} {'mc se':>9} {'ref se':>9} | {'sim N':>6} {'sim S':>7} "
            f"{'sim s':>9} {'speedup':>8} {'f-only':>7} {'c+2sd':>7} {'verify err':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        sim = (f"{r['sim_N']:>6} {r['sim_S']:>7} {r['sim_s']:>9.2f} {r['speedup']:>8.3g} "
               f"{r['speedup_f']:>7.3g} {r['speedup_hi']:>7.3g}" if r["sim_N"] is not None
               else f"{'-':>6} {'-':>7} {'inf':>9} {'inf':>8} {'inf':>7} {'inf':>7}")
        ver = f" {r['verify_err']:>10.2e}" if "verify_err" in r else ""
        f_only = r.get("f_only_s", r["wall_s"])
        lines.append(f"{r['scheme']:>9} {r['samples']:>8} {r['wall_s']:>8.2f} {f_only:>8.2f} "
                     f"{r['peak_mb']:>8.1f} "
                     f"{r['iterations']:>3} {r['err']:>9.2e} {r['stderr']:>9.2e} "
                     f"{ref_se:>9.2e} | {sim}{ver}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    p.add_argument("--cases", nargs="+", default=["a", "b", "c"], choices=sorted(CASES))
    p.add_argument("--samples", type=int, nargs="+", default=None,
                   help="sample counts (overrides the case's list)")
    p.add_argument("--ref-factor", type=float, default=4.0,
                   help="reference samples = this x the largest sample count")
    p.add_argument("--ref-replicates", type=int, default=8,
                   help="L >= 2: the reference's replicates (independent one-pass populations "
                        "sharing its samples)")
    p.add_argument("--ref-response-samples", type=int, default=None,
                   help="L >= 2: response_samples (total) of the reference")
    p.add_argument("--iterative-samples", type=int, nargs="*", default=None,
                   help="L >= 2: also time the iterative solver (scheme='iterative', one "
                        "solve, its defaults otherwise) at these sample counts")
    p.add_argument("--normal-samples", type=int, nargs="*", default=None,
                   help="L >= 2: also time the one pass as it was before 5 Dec 2026 "
                        "(deep_sources='normal', max(8, samples / 16 / 128) tangent samples "
                        "per replicate) at these sample counts")
    p.add_argument("--sampled-samples", type=int, nargs="*", default=None,
                   help="L >= 2: also time the one pass as it was before 6 Dec 2026 "
                        "(initial_kernels='sampled': the deeper sources drawn with the "
                        "population's t = 0 kernels) at these sample counts")
    p.add_argument("--one-block-samples", type=int, nargs="*", default=None,
                   help="L >= 2: also time the one pass with one set of tangent samples for "
                        "every source time (tangent_blocks=1, the estimator before 6 Dec 2026) "
                        "at these sample counts")
    p.add_argument("--response-samples", type=int, default=None,
                   help="L >= 2: response_samples of the timed rows (default: the solver's)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the second solve per row that measures peak memory")
    p.add_argument("--ref-cache", default=None, metavar="PREFIX",
                   help="keep the reference in PREFIX_<case>.npz and reuse it on later runs "
                        "with the same case and reference settings")
    p.add_argument("--verify", action="store_true",
                   help="run the cheapest matching ensemble of the least accurate row")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    results = []
    for name in args.cases:
        c = dict(CASES[name])
        if args.quick:
            c.update(QUICK[name])
        if args.samples:
            c["samples"] = list(args.samples)
        results.append(run_case(name, c, args))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1, default=float)
    return results


if __name__ == "__main__":
    main()
