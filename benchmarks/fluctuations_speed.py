"""Part 5 (``speed``) of ``benchmarks/fluctuations.py``: the cost of N Var at <= 5 % error.

Time and peak memory for N Var of the final test predictions (Vf, sum over test points) and of
the final NTK (VK, sum over the upper triangle), propagator (``dmft.fluctuations(...,
times=[T])``, samples doubled until both relative errors are <= the target) against ensembles
of simulated networks at ``SPEED_WIDTHS`` (seeds doubled until the intercept of a weighted
least-squares fit N Var = a + b / N reaches the target), for the ``SPEED_CASES`` rows. Every
propagator run and the ensembles run in fresh spawned processes (their own VmHWM is the peak
memory reported). Run it through ``python benchmarks/fluctuations.py --parts speed``; the
options are that script's.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:            # the spawned workers import this module, then dmft
    sys.path.insert(0, ROOT)

import dmft  # noqa: E402
from dmft._fluct_options import DEFAULT_MAP_REPLICATES  # noqa: E402
from solvers.stats import fit_inverse_width, summed_variance  # noqa: E402

__all__ = ["SPEED_CASES", "SPEED_WIDTHS", "speed", "summed_variances"]

SPEED_CASES = {
    # name: (depth, P, Q, steps)
    "two-layer": (1, 16, 16, 100),
    "depth2": (2, 8, 4, 40),
    "depth3": (3, 8, 4, 40),
}
SPEED_WIDTHS = (128, 256, 512)


def _speed_problem(case):
    from dmft.config import teacher_student
    L, P, Q, T = SPEED_CASES[case]
    data = teacher_student(P=P, Q=Q, D=10, seed=0)
    return dmft.MLP(L, "tanh"), data, dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=T)


def _pooled(values, blocks=None, se=None):
    """A pooled sum's value and standard error: from the per-block estimates when given
    (batch means of the sum), else the entry errors added linearly (an upper bound)."""
    if blocks is not None:
        return float(values), float(np.std(blocks, ddof=1) / np.sqrt(len(blocks))), "blocks"
    return float(values), float(np.sum(se)), "linear"


def summed_variances(fl, T, sel_f, sel_k):
    """Sums of the entries ``sel_f`` of N Cov f(T) and ``sel_k`` of N Var K(T) (boolean (n, n)
    masks) of a ``dmft.fluctuations`` result, each as (value, standard error, how). The error
    is that of the sum, the entries' correlations included: from the pairs of maps (deep
    propagator: kappa's batch means of the sums plus the pairs' map noise,
    :func:`solvers.fluct.deep_mc.pair_sum`; with ``ntk_rank`` the engine's own summed NTK
    variance, whose mask must then be the upper triangle, else ValueError), from the per-block estimates
    (two-layer adjoint engine), else the entry errors added linearly (an upper bound)."""
    if "pair_block_prediction_cov" in fl.extras:
        from solvers.fluct.deep_mc import pair_sum
        f = pair_sum(fl, "prediction_cov", T, sel_f) + ("pairs",)
        if "ntk_var_total" in fl.extras:
            # ntk_rank gives only the upper triangle's total; another mask has no estimate
            if not np.array_equal(sel_k, np.triu(np.ones_like(sel_k))):
                raise ValueError("sel_k: with ntk_rank only the upper triangle's summed N Var "
                                 "is estimated; pass the upper-triangle mask, or run without "
                                 "ntk_rank for other sums")
            k = (float(fl.extras["ntk_var_total"][T]), float(fl.stderr["ntk_var_total"][T]),
                 "ntk_rank")
        else:
            k = pair_sum(fl, "ntk_var", T, sel_k) + ("pairs",)
        return f, k
    vf = float(np.sum(fl.prediction_cov[T][sel_f]))
    vk = float(np.sum(fl.ntk_var[T][sel_k]))
    if "block_prediction_cov" in fl.extras:
        bf = fl.extras["block_prediction_cov"][:, T][:, sel_f].sum(1)
        bk = fl.extras["block_ntk_var"][:, T][:, sel_k].sum(1)
        return _pooled(vf, blocks=bf), _pooled(vk, blocks=bk)
    return (_pooled(vf, se=fl.stderr["prediction_cov"][T][sel_f]),
            _pooled(vk, se=fl.stderr["ntk_var"][T][sel_k]))


def _peak_gb():
    """Peak resident memory of this process in GB: VmHWM of /proc/self/status (the high-water
    mark of this process's own address space; ru_maxrss would carry the parent's peak over
    fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _prop_worker(job):
    """One propagator run in a fresh process: (Vf, se, VK, se, how, seconds, peak GB, opts)."""
    import pickle
    sol, kw = pickle.loads(job)
    T, P = sol.train.steps, sol.data.P
    n = P + sol.data.Q
    i, j = np.triu_indices(n)
    # warm-up: Numba cache load / PyTorch import, outside the timing
    deep = sol.net.depth > 1
    # (deep: at least 128 map samples per map replicate, the adapter's floor)
    warm = 128 * kw.get("map_replicates", DEFAULT_MAP_REPLICATES) if deep else 64
    # (its tiny maps are noisy by design: their map-noise warning is not the run's)
    import logging
    log = logging.getLogger("dmft")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        dmft.fluctuations(sol, **dict(kw, samples=warm, blocks=2, seed=99, throw=False,
                                      **({"kappa_samples": 16 * warm // 64} if deep else {})))
    finally:
        log.setLevel(level)
    t0 = time.perf_counter()
    fl = dmft.fluctuations(sol, **kw)
    el = time.perf_counter() - t0
    sel_f = np.zeros((n, n), bool)
    sel_f[np.arange(P, n), np.arange(P, n)] = True
    sel_k = np.zeros((n, n), bool)
    sel_k[i, j] = True
    f, k = summed_variances(fl, T, sel_f, sel_k)
    peak = _peak_gb()
    return f[0], f[1], k[0], k[1], f[2], el, peak, dict(fl.options)


def _ens_worker(job):
    """Ensembles at SPEED_WIDTHS, seeds doubled until the extrapolated N Var of both sums has
    <= ``target`` relative error; batches of seeds keep only the final step. Returns the
    rows per seed count and the process's peak memory."""
    import pickle
    net, data, train, start, cap, target, batch = pickle.loads(job)
    T, P = train.steps, data.P
    n = P + data.Q
    i, j = np.triu_indices(n)
    acc = {N: ([], []) for N in SPEED_WIDTHS}
    elapsed = 0.0
    history = []
    S, have = start, 0
    while True:
        for wi, N in enumerate(SPEED_WIDTHS):
            for lo in range(have, S, batch):
                hi = min(S, lo + batch)
                t0 = time.perf_counter()
                ens = dmft.simulate(net, data, train, width=N,
                                    seeds=range(wi * 10 ** 6 + lo, wi * 10 ** 6 + hi),
                                    center=True)
                elapsed += time.perf_counter() - t0
                acc[N][0].append(np.asarray(ens.test_predictions[:, T]))
                acc[N][1].append(np.asarray(ens.ntk[:, T])[:, i, j])
                del ens
        have = S
        fits = []
        for q in (0, 1):
            y, se = [], []
            for N in SPEED_WIDTHS:
                v, v_se = summed_variance(np.concatenate(acc[N][q]), N)
                y.append(v)
                se.append(v_se)
            b0, se0, _, _ = fit_inverse_width(SPEED_WIDTHS, np.array(y)[:, None],
                                              np.array(se)[:, None])
            fits.append((float(b0[0]), float(se0[0])))
        history.append((S, elapsed, fits))
        rel = max(fits[0][1] / abs(fits[0][0]), fits[1][1] / abs(fits[1][0]))
        print(f"    ensembles: {S} seeds/width, {elapsed:.1f} s, Vf {fits[0][0]:.4g} +- "
              f"{fits[0][1]:.2g}, VK {fits[1][0]:.4g} +- {fits[1][1]:.2g}", flush=True)
        if rel <= target or 2 * S > cap:
            break
        S *= 2
    peak = _peak_gb()
    return history, peak


def _in_fresh_process(ctx, fn, job):
    """fn(job) in a new spawned process (a worker killed, e.g. out of memory, raises
    BrokenProcessPool instead of hanging)."""
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        return ex.submit(fn, job).result()


def speed(args):
    import multiprocessing as mp
    import pickle
    ctx = mp.get_context("spawn")
    target = args.speed_target
    print(f"\n[speed] N Var at the final step to {target:.0%} relative error: propagator "
          f"(times=[T], samples doubled from {args.speed_start}) vs ensembles at widths "
          f"{SPEED_WIDTHS} (seeds doubled from {args.speed_seeds}, N -> inf by weighted LSQ "
          f"a + b / N); gamma0 = 1, lr = 0.1, centred. Peak: VmHWM of the process.")
    rows = []
    for case in args.cases:
        net, data, train = _speed_problem(case)
        T = train.steps
        row = {"case": case}
        try:
            t0 = time.perf_counter()
            sol = dmft.solve(net, data, train, method="mc", seed=0)
            row["solve_s"] = time.perf_counter() - t0
            print(f"  {case}: solve (method='mc', {sol.options.get('samples')} samples) "
                  f"{row['solve_s']:.1f} s", flush=True)
            method = "propagator" if net.depth == 1 else "deep-propagator"
            S, total = args.speed_start, 0.0
            while True:
                kw = dict(method=method, times=[T], samples=S, center=True, seed=1)
                if net.depth == 1 and args.speed_sampler:
                    kw["sampler"] = args.speed_sampler
                if net.depth > 1 and getattr(args, "speed_ntk_rank", None):
                    kw["ntk_rank"] = args.speed_ntk_rank
                if net.depth > 1 and getattr(args, "speed_map_replicates", None):
                    kw["map_replicates"] = args.speed_map_replicates
                if net.depth > 1 and getattr(args, "speed_kappa_fraction", None):
                    kw["kappa_samples"] = max(2, int(S * args.speed_kappa_fraction))
                res = _in_fresh_process(ctx, _prop_worker, pickle.dumps((sol, kw)))
                vf, sf, vk, sk, how, el, peak, opts = res
                total += el
                print(f"    propagator: samples {S}, {el:.1f} s, peak {peak:.2f} GB, Vf {vf:.4g} "
                      f"+- {sf:.2g}, VK {vk:.4g} +- {sk:.2g} (errors: {how})", flush=True)
                if max(sf / vf, sk / vk) <= target or 2 * S > args.speed_max_samples:
                    break
                S *= 2
            row["prop"] = dict(samples=S, seconds=el, search=total, peak=peak, vf=(vf, sf),
                               vk=(vk, sk), how=how, options=opts)
        except Exception as exc:      # a row that fails prints its error (deep rows: WIP)
            row["prop_error"] = f"{type(exc).__name__}: {exc}"
            print(f"    propagator FAILED: {row['prop_error']}", flush=True)
        try:
            job = pickle.dumps((net, data, train, args.speed_seeds, args.speed_max_seeds,
                                target, 256))
            history, peak = _in_fresh_process(ctx, _ens_worker, job)
            S, el, fits = history[-1]
            row["ens"] = dict(seeds=S, seconds=el, peak=peak, vf=fits[0], vk=fits[1])
        except Exception as exc:
            row["ens_error"] = f"{type(exc).__name__}: {exc}"
            print(f"    ensembles FAILED: {row['ens_error']}", flush=True)
        rows.append(row)
    print("\n| case | propagator samples | time s (search) | peak GB | Vf | VK | ensemble "
          "seeds/width | time s | peak GB | Vf (N->inf) | VK (N->inf) | speed-up | agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, e = r.get("prop"), r.get("ens")
        ptxt = (f"{p['samples']} | {p['seconds']:.1f} ({p['search']:.1f}) | {p['peak']:.2f} | "
                f"{p['vf'][0]:.4g} +- {p['vf'][1]:.2g} | {p['vk'][0]:.4g} +- {p['vk'][1]:.2g}"
                if p else f"FAILED: {r.get('prop_error', '')[:150]} | | | |")
        etxt = (f"{e['seeds']} | {e['seconds']:.1f} | {e['peak']:.2f} | {e['vf'][0]:.4g} +- "
                f"{e['vf'][1]:.2g} | {e['vk'][0]:.4g} +- {e['vk'][1]:.2g}"
                if e else f"FAILED: {r.get('ens_error', '')[:150]} | | | |")
        if p and e:
            sp = f"{e['seconds'] / p['seconds']:.1f}x"
            z = [abs(p[q][0] - e[q][0]) / np.hypot(p[q][1], e[q][1]) for q in ("vf", "vk")]
            agree = ("yes" if max(z) < 2 else "NO") + f" (z = {z[0]:.1f}, {z[1]:.1f})"
        else:
            sp = agree = "-"
        print(f"| {r['case']} | {ptxt} | {etxt} | {sp} | {agree} |")
    return rows
