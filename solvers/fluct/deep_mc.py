"""O(1/N) propagator of deep *nonlinear* networks (docs/theory.rst §5 on top of §2), sampled.

The model of the finite-width noise is the one of :mod:`solvers.fluct.deep_linear` (checked
there against simulated linear networks), with the Gaussian unit replaced by sampled single-site
fields. Integrating out the initial weights couples layers only through averages over the
units of a layer; at width N each average is its single-unit mean plus noise E / sqrt(N):

    Phi^l = <phi phi^T> + E_pp,   G^l = <g g^T> + E_gg,   f = (<z^L phi^L> + E_f) / gamma0,
    A^l = (<phi rho_r^T> + E_a) / gamma0,   B^{l-1} = (<g rho_u^T> + E_b) / gamma0,

where rho_r, rho_u are the MSR response fields conjugate to the sources r^l, u^l of a unit
(<F rho(s)> = <dF / d source(s)>). As in the linear module, the response noise E_a is used on
s <= t (its equal-time part pairs with the coupling of the same times) and E_b on s < t, for
*every* pair of points. The responses whose mean is zero because test points are passive
(A^l(t mu, s q): nothing depends on a test point's r; B^{l-1}(t mu, s q), mu != q: a training
point's g does not depend on a test point's u) still fluctuate in the formal sense: their
noise is correlated with the others' by the MSR rules (e.g. <g_mu rho_u,q . z phi_q> =
<g_mu z d phi_q / d u_q> != 0), and it enters the training points' dynamics through the memory
kernels. Leaving it out (as this module did until 6 Dec 2026) overestimated test points'
N Var by 17-28 % on a linear depth-2 network at 6-12 steps against the exact propagator
(benchmarks/README.md, "A bias of the deep propagator at longer horizons").

Linearising the fixed point q = M(q) + E (one Gauss-Seidel sweep of the single-site map M, in
PyTorch, with the sources reparameterised as u = L_Phi xi_u, r = L_G xi_r so that M is a
differentiable function of q at fixed samples) gives dq/dE = (I - M_q)^{-1} M_E. The adjoint
rows w_i = d obs_i / dq (I - M_q)^{-1} are iterated, w <- d obs / dq + w M_q (one batched
vector-Jacobian product per iteration; the map is causal, so about T + L iterations suffice;
they stop when the relative change of w is below ``tol``), and J_i = w_i M_E = d obs_i / dE.

The adjoint rows are by default computed without that iteration: the map is causal in time,
and one batched backward pass through its causal recursion gives grad obs (I - M_q)^{-1} M_E
exactly (:mod:`solvers.fluct.deep_causal`, ``adjoint="causal"``); the iteration above is
``adjoint="iterate"``.

The noise covariance kappa is the single-site covariance of the averaged quantities, with the
formal MSR rules for the response fields (<F rho_b> = <dF/dsrc_b>, <F rho_b rho_d> =
<d^2 F / dsrc_b dsrc_d>). In whitened sources (src = L xi, kept innovations only) these are
Gaussian integration by parts: rho <-> L^{-T} xi and, for pairs, the second Hermite
polynomial xi xi^T - I. For each layer and observable i the per-sample scalar

    X_i = <J_i^pp, phi phi^T> + <J_i^gg, g g^T> + <J_i^f, z phi> + alpha_i . xi_r + beta_i . xi_u,
    alpha_i = L_G^{-1} (J_i^a)^T phi,   beta_i = L_Phi^{-1} (J_i^b)^T g,

gives N Cov(obs_i, obs_j) = sum_l [ Cov_s(X_i, X_j) - <alpha_i . alpha_j + beta_i . beta_j> ].
That Stein form (``kappa="stein"``) is noise-dominated when innovations are small and misses
the derivatives along degenerate source directions; the default ``kappa="jvp"`` evaluates the
same formal moments with exact forward-mode directional derivatives of the march and
Hutchinson traces, no Hessians (:mod:`solvers.fluct.kappa_stein`, with the measurements).

Responses inside the map are estimated by Stein's lemma in causally whitened sources (as
:func:`solvers.mc.stein_finish`), which is differentiable in q. Two mean responses are zero
at the linearisation point but not their derivatives:

- B^{l-1}(t mu, s q) of a test column q in another row (nothing reads a test point's fields
  there, but the noise of C and D couples the points): tangent estimates
  (``tangent_samples``; :mod:`solvers.fluct.deep_causal`, "Responses outside their
  structure"). Holding them at zero biased the test points' N Var f from depth 3 on (+16 % on
  a linear network at 8 steps).
- the equal-time A^l(t, t), which changes at first order with the equal-time memory
  C^l(t, t) = A^{l-1}(t, t): A^l(t, t) = C^l(t, t) (.) <phi'(h(t)) phi'(h(t))^T>
  (:func:`solvers.fluct.deep_causal.equal_time_response`, and taken out of the Stein columns
  that r(t) regresses on). Without it (until 6 Dec 2026, session 30) the equal-time response
  noise of a layer stopped at the next one, and depth 3 was biased (N Var f(1) +13 % on a
  linear network at one step; the test points +5 % at 15 steps).

Smooth activations only: the derivative of the map for ReLU would miss the phi'' = delta term.

Cost: per layer and iteration one march of S samples (O(S (nT)^2)) and its backward pass per
batch of observables; memory one sweep's graph. Meant for modest n (T + 1) (a few hundred).
"""
from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._memory import release
from ..layout import causal_cholesky, causal_mask, equal_time
from ..mc.responses import stein_groups
from .deep_linear import _torch
from .deep_causal import (causal_adjoint, equal_time_response, regression_rows,
                          seed_matrix, tangent_count)
from .kappa_hessian import _kappa_layer
from .kappa_stein import jvp_kappa_layer, stein_kappa_layer

__all__ = ["deep_propagator", "deep_propagator_once", "combine_pairs", "pair_sum"]


class _Factor:
    """Causal whitening of a source covariance K (m, m) at fixed innovations ``keep``:
    u = F xi with F (m, k) = K[:, keep] L^{-T}, L = chol(K[keep, keep]); differentiable in K
    (the kept set is chosen once, at the linearisation point, and held fixed)."""

    def __init__(self, torch, K, keep):
        self.keep = keep
        L = torch.linalg.cholesky(K[keep][:, keep])
        # F = K[:, keep] L^{-T}  (rows of kept variables: F[keep] = L)
        self.F = torch.linalg.solve_triangular(L, K[:, keep].T, upper=False).T

    def sources(self, xi):
        """(S, m) sources from (S, k) standard normals."""
        return xi @ self.F.T


#: innovations of the kappa step's single-site law: every one above this fraction of a
#: source's variance (the solver's default; the maps use ``rtol``, see deep_propagator_once)
KAPPA_RTOL = 1e-6


def _keep(K, rtol):
    return np.asarray(causal_cholesky(K, rtol)[0])


# Observables per batched backward pass of each map of a pair while their passes run side by
# side, one per thread (:func:`_rows_of_maps`). Measured 7 Dec 2026 (tanh, 8 + 4 points, 40
# steps, a pair of 2048-sample maps, kappa 2048, ntk_rank=8, two cores; fresh processes): 3 per
# pass (the single map's cache-sized batch) took the adjoint rows in ~46 s at depth 3, the main
# thread's passes ~1.5x slower than the worker's, and peaked at 4.0-4.1 GiB (two passes'
# adjoint fields beside both graphs); 2 per pass: ~45 s, both threads in step, peak 2.73 GiB
# (the run 104 s against 107-114 s); 1 per pass: ~54 s, 2.43 GiB. Depth 2: 53.5 s and 2.04 GiB
# against 57.6 s and 2.63 GiB. The numbers are the same (the rows are linear in the seed rows).
PAIR_BATCH = 2


def deep_propagator(kx, y, activation, depth, gamma0, lr, steps, *, samples=16384, seed=0,
                    kappa_samples=None, map_replicates=1, progress=None, logger=None, **kw):
    """Leading-order N Cov of the predictions (and N Var of NTK entries) of a deep network,
    with error bars that include the sampling noise of the map.

    The estimand is N Cov(o_i, o_j) = J_i kappa J_j^T (module docstring), with the adjoint rows
    J from the sampled single-site map. Sampled rows J = J_bar + dJ make the quadratic form
    biased: E[J kappa J^T] = J_bar kappa J_bar^T + E[dJ kappa dJ^T], an upward bias that
    grows with the noisy directions and falls with the map samples: ~0.1 % at n (T + 1) = 21,
    +8 % (4096 map samples) and +37 % (2048) for the NTK's N Var at depth 3, n (T + 1) = 492;
    sampling kappa from the map's own samples correlated the two and added more there (+33 %
    in all at 4096; benchmarks/README.md): kappa now always comes from fresh samples.

    ``map_replicates`` = R, even: R / 2 pairs of independent maps (seeds of their own, each
    with ``samples / R`` map samples). For each pair, kappa is sampled once from
    ``2 kappa_samples / R`` fresh samples (a value pass with a seed of its own, independent of
    both maps) with the rows of both maps stacked, and the pair's estimate is the cross term
    (J^a kappa J^b^T + J^b kappa J^a^T) / 2: its expectation is J_bar kappa J_bar^T, since
    dJ^a, dJ^b and kappa's noise are independent with mean zero (up to the O(1 / samples)
    bias of J itself, a nonlinear function of the map's samples: not measured separately;
    the comparisons with networks in benchmarks/README.md bound it). The result is the mean
    over the pairs. Its error: per entry, the pair's
    batch means se_p (kappa's noise) plus the map's noise, whose variance in the cross term is
    estimated by delta_p^2, delta_p = (J^a kappa J^a^T - J^b kappa J^b^T) / 2 (to first order
    in dJ: J_bar kappa (dJ^a - dJ^b)^T, the same variance as the cross term's
    J_bar kappa (dJ^a + dJ^b)^T and uncorrelated with it). Pooled over the entries of the
    predictions (and separately of the NTK), rho = mean_i(mean_p delta_p,i^2 / mean_p
    se_p,i^2) gives the standard error sqrt(mean_p se_p,i^2 (1 + rho) / pairs); rho per group
    is returned in ``map_noise_ratio``, and the relative bias of the plain estimate that the
    cross term removes, (sum of the plain variances - sum of the cross ones) / the latter,
    in ``map_noise_bias``. Cost: each map's adjoint as before; kappa with twice the rows
    (~2.4x the plain form's kappa step at equal ``kappa_samples``); memory: both maps' graphs
    are retained, and the kappa step asks them for one group of observables' rows at a time;
    they are dropped once the last group's rows are out.

    R = 1 is one map and the plain quadratic form (biased as above), its error bar kappa's
    batch means only (a lower bound). ``progress(done, total, what)`` gets one monotone
    fraction over the whole computation.
    """
    R = int(map_replicates)
    if R < 1:
        raise ValueError(f"map_replicates={map_replicates!r}: use an integer >= 1")
    if R > 1 and R % 2:
        raise ValueError(f"map_replicates={R}: use 1 or an even number (pairs of independent "
                         f"maps give the unbiased cross estimate), e.g. {R + 1}")
    if R == 1:
        return deep_propagator_once(kx, y, activation, depth, gamma0, lr, steps,
                                    samples=samples, seed=seed, kappa_samples=kappa_samples,
                                    progress=progress, logger=logger, **kw)
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    seeds, Sr, npair = ss.spawn(R), int(samples) // R, R // 2
    Kp = 2 * Sr if kappa_samples is None else max(2, int(kappa_samples) // npair)
    outs = []
    for p in range(npair):
        def tick(d, tot, what, p=p):
            if progress is not None:
                progress(int(1e6 * (p + d / tot) / npair), 1_000_000,
                         f"pair {p + 1}/{npair}: {what}")
        if logger is not None:
            logger.info("deep propagator: maps %d, %d of %d (%d map samples each), then kappa "
                        "from %d fresh samples", 2 * p + 1, 2 * p + 2, R, Sr, Kp)
        # the first map's graph is kept (its rows are asked for by groups of observables
        # during the pair's kappa step, beside the second map's)
        oa = deep_propagator_once(kx, y, activation, depth, gamma0, lr, steps, samples=Sr,
                                  seed=seeds[2 * p], rows_only=True, logger=logger, **kw)
        if "rows" not in oa:
            return oa                     # a failed map: the caller reports it
        ob = deep_propagator_once(kx, y, activation, depth, gamma0, lr, steps, samples=Sr,
                                  seed=seeds[2 * p + 1], kappa_samples=Kp, hold=oa["rows"],
                                  progress=tick, logger=logger, **kw)
        ob["residual"] = max(ob["residual"], oa["residual"])
        if oa["fixed_point_gap"] is not None and ob["fixed_point_gap"] is not None:
            ob["fixed_point_gap"] = {k: max(v, oa["fixed_point_gap"][k])
                                     for k, v in ob["fixed_point_gap"].items()}
        del oa
        # the pair's graphs are in reference cycles (closures of the passes): collect them
        # now, not at the collector's leisure, and hand the pages back before the next pair
        gc.collect()
        release()
        if not np.isfinite(ob["residual"]) or not np.any(np.isfinite(ob["pred_cov"])):
            return ob
        outs.append(ob)
    return combine_pairs(outs)


def _pooled_ratio(v, m):
    """mean(v / m) over the entries where both are finite and m > 0 (0 if none): the maps'
    noise variance over kappa's, pooled (:func:`deep_propagator`)."""
    ok = np.isfinite(m) & np.isfinite(v) & (m > 0)
    return float(np.mean(v[ok] / m[ok])) if np.any(ok) else 0.0


def pair_sum(fl, key, t, sel):
    """A sum of the entries ``sel`` (boolean (n, n)) of ``fl.<key>[t]`` (``key``:
    ``"prediction_cov"`` or ``"ntk_var"``) of a ``dmft.fluctuations`` result of the deep
    propagator with pairs of maps, and its standard error: Var = mean over pairs of (variance
    over kappa's batch-means blocks of the block sums / blocks + delta_sum^2), divided by the
    number of pairs (:func:`deep_propagator`; the extras ``pair_block_<key>``,
    ``pair_delta_<key>``)."""
    blk = fl.extras[f"pair_block_{key}"][:, :, t][..., sel].sum(-1)       # (pairs, blocks)
    dl = fl.extras[f"pair_delta_{key}"][:, t][..., sel].sum(-1)            # (pairs,)
    pairs, blocks = blk.shape
    var = np.mean(blk.var(axis=1, ddof=1) / blocks + dl ** 2) / pairs
    return float(getattr(fl, key)[t][sel].sum()), float(np.sqrt(var))


def combine_pairs(outs):
    """Mean of the cross estimates of independent pairs of maps, with standard errors that
    include the maps' noise, and the plain estimate's bias (:func:`deep_propagator`)."""
    P = len(outs)
    res = {"cov": np.mean([o["cov"] for o in outs], axis=0),
           "residual": max(o["residual"] for o in outs), "map_noise_ratio": {},
           "map_noise_bias": {}}
    for key, se_key, name in (("pred_cov", "pred_cov_se", "predictions"),
                              ("ntk_var", "ntk_var_se", "ntk")):
        if outs[0][key] is None:
            res[key] = res[se_key] = None
            continue
        x = np.stack([o[key] for o in outs])
        m = np.mean(np.stack([o[se_key] for o in outs]) ** 2, axis=0)
        v = np.mean(np.stack([o["delta"][key] for o in outs]) ** 2, axis=0)
        iu = np.triu_indices(x.shape[-1])
        rho = _pooled_ratio(v[..., iu[0], iu[1]], m[..., iu[0], iu[1]])
        res[key] = x.mean(axis=0)
        res[se_key] = np.sqrt(m * (1.0 + rho) / P)
        res["map_noise_ratio"][name] = rho
        # the variances (diagonal of the predictions' covariance; every NTK entry)
        plain = np.mean([o["plain"][key] for o in outs], axis=0)
        diag = (np.eye(x.shape[-1], dtype=bool)[None] if key == "pred_cov" else
                np.ones(x.shape[1:], dtype=bool)) & np.isfinite(res[key])
        tot = float(np.sum(res[key][diag]))
        res["map_noise_bias"][name] = float(np.sum(plain[diag]) - tot) / tot if tot else 0.0
    if "combo" in outs[0]:
        # combinations of NTK entries (ntk_seeds): the same pooling, over the combinations
        x = np.stack([o["combo"]["var"] for o in outs])
        m = np.mean(np.stack([o["combo"]["var_se"] for o in outs]) ** 2, axis=0)
        d = np.stack([o["combo"]["delta"] for o in outs])
        rho = _pooled_ratio(np.mean(d ** 2, axis=0), m)
        res["combo"] = {"var": x.mean(axis=0), "var_se": np.sqrt(m * (1.0 + rho) / P),
                        "block": np.stack([o["combo"]["block"] for o in outs]), "delta": d,
                        "plain": np.mean([o["combo"]["plain"] for o in outs], axis=0),
                        "rho": rho}
        res["map_noise_ratio"]["ntk"] = rho
        tot = float(np.sum(res["combo"]["var"]))
        res["map_noise_bias"]["ntk"] = (float(np.sum(res["combo"]["plain"])) - tot) / tot \
            if tot else 0.0
    # per pair: kappa's per-block estimates and delta, for the errors of sums of entries
    for part in ("block", "delta"):
        if part in outs[0]:
            res[part] = {key: None if outs[0][part][key] is None else
                         np.stack([o[part][key] for o in outs])
                         for key in ("pred_cov", "ntk_var")}
    gaps = [o.get("fixed_point_gap") for o in outs]
    res["fixed_point_gap"] = (None if gaps[0] is None else
                              {k: max(gp[k] for gp in gaps) for k in gaps[0]})
    return res


def deep_propagator_once(kx, y, activation, depth, gamma0, lr, steps, *, f, phi, g, A, B,
                         center=False, ntk=True, samples=16384, seed=0, rtol=3e-2, blocks=8,
                         batch=32, iters=None, chunk=None, kappa_samples=None, tol=1e-12,
                         kappa="jvp", adjoint="causal", times=None, fixed_point_tol=0.25,
                         kappa_group=32, kappa_precision="single", hold=None,
                         kappa_divergence="exact", ntk_seeds=None, rows_only=False,
                         tangent_samples=64, progress=None, logger=None):
    """One propagator run: leading-order N Cov of the predictions (and N Var of NTK entries)
    of a deep network, its standard errors kappa's batch means only.

    Parameters
    ----------
    kx : (n, n) input kernel (train first); y : (P,) targets; activation : smooth name;
    depth : L >= 2; gamma0, lr, steps : the training.
    f : (T1, n); phi, g : (L, m, m) flat two-time kernels (m = T1 n, index t n + mu);
    A, B : (L - 1, m, m) flat responses: the infinite-width solution to linearise around.
    center : bool
        Centred model f - f(theta_0) (no initial-output variance; Delta from centred f).
    ntk : bool
        Also N Var of the equal-time NTK entries.
    samples : int
        Single-site samples per layer of the map (kappa gets ``kappa_samples``, default as
        many, fresh ones of the exact law, innovations above KAPPA_RTOL); ``blocks`` batch
        means give the standard error of kappa's sampling (the map's own sampling error is not
        included: :func:`deep_propagator` with ``map_replicates`` >= 2 adds it).
    seed : int or SeedSequence.
    rtol : float
        Innovations below this fraction of a source's variance are dropped
        (:func:`solvers.layout.causal_cholesky`). Default 3e-2, larger than the solver's 1e-6:
        the derivative of a Stein response with respect to the source covariance carries the
        sampling noise times the inverse whitening factor, and with near-degenerate
        innovations kept the linearised map amplifies that noise along the horizon (1e-3 was
        enough at T = 10; tanh depth 3, 4 + 2 points, 20 steps, 4096 samples gave N Var K =
        27 570 +- 27 960 at 1e-3 and 38.4 +- 5.7 at 1e-2, simulations ~40). At 1e-2 (the
        default until 6 Dec 2026) the amplified noise still biased depth 3 upward and beyond
        its error bars at 8 + 4 points: tanh, 20 steps, N Var of the NTK 1.28 / 1.50x the
        networks' on two seeds (errors 5 %), 40 steps 1.8x; 3e-2 gives 1.08 / 1.10 and
        1.05 (benchmarks/README.md). The dropped innovations carry at most this fraction of
        each source's variance; kappa is sampled from the full law (``KAPPA_RTOL``).
    batch : int
        Observables per batched backward pass.
    iters : int, optional
        Most adjoint iterations (default 2 (T1 + L) + 3; the causal map needs about T1 + L);
        they stop early when the relative change of the adjoint rows falls below ``tol``. The
        last change is returned as ``residual``.
    adjoint : {"causal", "iterate"}
        How the adjoint rows d obs / dE are obtained: "causal" (default) by one batched
        backward pass through the causal recursion of the map
        (:mod:`solvers.fluct.deep_causal`); "iterate" by iterating w <- grad obs + w M_q
        through the non-causal sweep (about T + L backward passes, the previous default;
        ``iters``, ``tol``).
    times : list of int, optional
        Steps whose predictions and NTK entries are the observables (default every step);
        the covariances are NaN at the other steps.
    fixed_point_tol : float
        Causal adjoint: refuse (residual inf, NaN covariances) when the samples' estimates of
        the solution's rows differ from them by more than max(fixed_point_tol, 10 / sqrt(S))
        relative to the largest entry (``fixed_point_gap`` in the result): the solution is then
        not a fixed point of the single-site map at the given parameters.
    kappa : {"jvp", "stein", "hessian"}
        How the noise covariance is sampled (all three estimate the same formal MSR moments):
        "jvp" (default) from forward-mode directional derivatives of the march along K
        directions per sample plus Hutchinson probes for the traces, O(K m^2) per sample,
        memory O(K m^2 + chunk K m) (:mod:`solvers.fluct.kappa_stein`); "stein" by Gaussian
        integration by parts in the whitened sources, no derivatives at all, but its noise
        grows as 1/(smallest kept innovation) and is useless for near-degenerate kernels
        (measured there); "hessian" from per-sample Jacobians and Hessians of the march
        (:mod:`solvers.fluct.kappa_hessian`: (chunk, m, m, m) per layer, small m only).
    kappa_group : int
        Rows per kappa pass for the NTK entries (a pair's two maps count twice: 16 entries):
        their rows are held one group at a time; the predictions, whose full covariance is
        returned, come first in the first group (with ``kappa_divergence="exact"`` beside the
        first ``kappa_group`` NTK rows, since each group costs a Jacobian per sample; else
        alone).
    chunk : int, optional
        Samples per kappa pass: default 128 for "jvp" and "stein" (per-operation overhead of
        the tangent marches: 0.17 ms per sample and row at 32, 0.11 at 128-256, single
        precision, m = 492, 32 rows), 32 for "hessian" (its memory grows as chunk m^3).
    kappa_precision : {"single", "double"}
        Precision of the per-sample work of ``kappa="jvp"`` (the products with the adjoint
        rows and the tangent marches; the moments are summed in double precision). Single
        precision is ~1.5x faster; its rounding (~1e-6 relative per sample) is far below the
        sampling error (benchmarks/README.md, "Deep propagator at half the cost, within
        4 GB").
    kappa_divergence : {"exact", "probe"}
        ``kappa="jvp"``: how the divergences div V_i = tr(J_i^T dF/dsrc) are obtained.
        "exact" (default) from each sample's Jacobian of the march in its sources (one unit
        direction per source coordinate, marched causally from its own time: about 2 m^3 / 3
        flops per sample and channel, O(K m^2) for the traces); "probe" from two Rademacher
        probes (Hutchinson), cheaper per sample but their noise was 70-285 times the
        divergences' own spread over samples (tanh depth 2, 8 + 4 points, 40 steps): exact
        divergences halve the NTK variance's error at equal kappa samples
        (benchmarks/README.md, "Exact divergences in kappa").
    ntk_seeds : (R, K_ntk) array, optional
        Instead of every NTK entry's variance, the variances of R combinations w . K of the
        NTK observables (K_ntk = len(times) n (n + 1) / 2 upper-triangle entries, time-major),
        one adjoint row each (:func:`ntk_trace_seeds`: principal directions and residual
        probes whose variances add up to the sum of the entries' variances). Returned in
        ``combo`` (``var``, ``var_se``, per-block ``block``; with ``hold`` also ``plain``,
        ``delta``); ``ntk_var`` is then NaN.
    tangent_samples : int
        Map samples whose tangents along the test points' sources u^l(s q) give the mean
        responses B^{l-1}(t mu, s q) outside their structure (zero at the linearisation
        point, not their derivative; module docstring), capped by
        :func:`solvers.fluct.deep_causal.tangent_count`. 0 leaves them out (the estimator
        before 6 Dec 2026, biased from depth 3 on).
    rows_only : bool
        Stop after the value and graph passes: return ``rows`` (the adjoint rows J on demand,
        :class:`solvers.fluct.deep_causal.AdjointRows`, its graph retained) with ``residual``
        and ``fixed_point_gap``, no kappa step (the first map of a pair, :func:`deep_propagator`).
    hold : AdjointRows, optional
        The ``rows`` of an independent map of the same problem (its other seed). Then kappa
        (fresh samples, as always) is contracted with the rows of both maps, and the result is
        the cross estimate J_hold kappa J^T (symmetrised), free of the map noise's quadratic
        bias, plus ``plain`` (the mean of the two maps' own quadratic forms, the biased
        estimate) and ``delta`` (half their difference, whose square estimates the map
        noise's variance of the cross estimate), each a dict with ``pred_cov`` and ``ntk_var``.
    progress : callable, optional
        Called with ``(done, total, what)`` after each adjoint iteration and kappa chunk.
    logger : logging.Logger, optional
        One INFO line per observable batch (iterations, residual) and per kappa layer.

    Returns
    -------
    dict with ``cov`` (T1, T1, n, n) two-time N Cov(f), ``pred_cov`` (T1, n, n), ``ntk_var``
    (T1, n, n) or None, their batch-means standard errors ``pred_cov_se``, ``ntk_var_se``,
    ``residual`` (relative change of the adjoint rows in the last iteration; when it exceeds
    1e-3 or is not finite the kappa step is skipped and the covariances are NaN).
    """
    torch = _torch()
    if kappa_precision not in ("single", "double"):
        raise ValueError(f"kappa_precision={kappa_precision!r}: use 'single' or 'double'")
    kdtype = torch.float32 if kappa_precision == "single" else None
    if kappa_divergence not in ("exact", "probe"):
        raise ValueError(f"kappa_divergence={kappa_divergence!r}: use 'exact' or 'probe'")
    if chunk is None:
        chunk = 32 if kappa == "hessian" else 128
    dt = torch.float64
    kx = np.asarray(kx, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, P, L, T1 = kx.shape[0], y.size, int(depth), int(steps) + 1
    if adjoint not in ("causal", "iterate"):
        raise ValueError(f"adjoint={adjoint!r}: use 'causal' (default) or 'iterate'")
    times = list(range(int(steps) + 1)) if times is None else sorted(int(t) for t in times)
    tsel = np.asarray(times, dtype=np.int64)
    if kappa not in ("jvp", "stein", "hessian"):
        raise ValueError(f"kappa={kappa!r}: use 'jvp' (default), 'stein' or 'hessian'")
    if L < 2:
        raise ValueError("deep_propagator handles depth >= 2 (two-layer networks: "
                         "solvers.fluct.two_layer_propagator)")
    m = T1 * n
    S = int(samples)
    iters = 2 * (T1 + L) + 3 if iters is None else int(iters)
    clock = __import__("time").perf_counter
    t_start = clock()
    tb = np.repeat(np.arange(T1), n)
    pb = np.tile(np.arange(n), T1)
    train = pb < P
    kx_flat = np.tile(kx, (T1, T1))
    ones = np.ones((m, m))

    # masks (numpy bool -> torch float)
    strict = causal_mask(T1, n)
    lower = causal_mask(T1, n, strict=False)
    # A: the mean on training columns only (test r reaches nothing), the noise on every
    # column (module docstring), both on s <= t
    maskA = lower
    # B: the mean where it can be nonzero (train rows see train sources; test row q sees
    # train sources and its own, s <= t), the noise on every pair with s < t
    maskB_struct = np.zeros((m, m), bool)
    maskB_struct[np.ix_(train, train)] = True
    for q in range(P, n):
        rows = pb == q
        maskB_struct[np.ix_(rows, train | rows)] = True
    maskB_use = (maskB_struct & lower) | strict
    maskB_noise = strict
    T = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=dt)      # noqa: E731
    t_strict, t_maskA = T(strict), T(maskA)
    t_maskBm, t_maskBn = T(maskB_use), T(maskB_noise)

    # the linearisation point
    q0 = {"f": T(f), "phi": [T(phi[l]) for l in range(L)], "g": [T(g[l]) for l in range(L)],
          "A": [T(A[l]) for l in range(L - 1)], "B": [T(B[l]) for l in range(L - 1)]}
    # source covariances and their innovations (held fixed)
    Ku = [kx_flat] + [np.asarray(phi[l]) for l in range(L - 1)]       # layer l: Phi^{l-1}
    Kr = [np.asarray(g[l + 1]) for l in range(L - 1)] + [ones]        # layer l: G^{l+1}
    keep_u = [_keep(K, rtol) for K in Ku]
    keep_r = [_keep(K, rtol) for K in Kr]
    groups = [None] + [stein_groups(Ku[l], T1, n, P, rtol) for l in range(1, L)]
    # A's whitening: training sources only (time-major)
    tr_idx = np.flatnonzero(train)
    keep_rtr = [tr_idx[_keep(Kr[l][np.ix_(tr_idx, tr_idx)], rtol)] for l in range(L - 1)]

    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    rngs = [np.random.default_rng(c) for c in ss.spawn(2 * L)]
    # antithetic pairs (u, r), (u, -r): the parts of phi even in r and of g odd in r (the
    # dominant ones) cancel in the Stein responses of the map, whose noise sets the error of
    # the linearisation (measurements: benchmarks/README.md)
    def draw(rngs, S, keep_u=keep_u, keep_r=keep_r):
        """(S, k) standard normals of the kept innovations per layer, in antithetic pairs."""
        half = S // 2
        xu = [T(np.repeat(rngs[2 * l].standard_normal((half, len(keep_u[l]))), 2, axis=0))
              for l in range(L)]
        xr = []
        for l in range(L):
            e = rngs[2 * l + 1].standard_normal((half, len(keep_r[l])))
            xr.append(T(np.stack([e, -e], axis=1).reshape(S, -1)))
        return xu, xr

    S -= S % 2
    xi_u, xi_r = draw(rngs, S)

    act = _activation(torch, activation)
    yv = T(y)
    kx_t = T(kx_flat)

    def march(u, r, C, D):
        """Fields (m, S) time-major; C may have (noise-only) equal-time blocks, handled to
        first order by one predictor step (module docstring)."""
        Hs, Ps, Zs, Gs = [], [], [], []
        uT, rT = u.T, r.T
        for t in range(T1):
            a, e = t * n, (t + 1) * n
            h0 = uT[a:e]
            if t:
                h0 = h0 + gamma0 * (C[a:e, :a] @ torch.cat(Gs, 0))
                pprev = torch.cat(Ps, 0)
            Ctt = C[a:e, a:e]
            Dtt = D[a:e, a:e]
            zpast = rT[a:e] + (gamma0 * (D[a:e, :a] @ pprev) if t else 0.0)
            # predictor without the equal-time memory term, then the corrected step
            p0 = act(h0, 0)
            gt = act(h0, 1) * (zpast + gamma0 * (Dtt @ p0))
            h = h0 + gamma0 * (Ctt @ gt)
            p = act(h, 0)
            z = zpast + gamma0 * (Dtt @ p)
            Hs.append(h)
            Ps.append(p)
            Zs.append(z)
            Gs.append(act(h, 1) * z)
        return (torch.cat(Hs, 0), torch.cat(Ps, 0), torch.cat(Zs, 0), torch.cat(Gs, 0))

    def stein(F_rows, xi, Lc, col_t, row_t, strict_time):
        """gamma0 * <dF/dsrc> = <F xi^T> L^{-1} with the causal mask on innovations."""
        J = (F_rows @ xi) / S
        mask = (col_t[None, :] < row_t[:, None]) if strict_time else \
            (col_t[None, :] <= row_t[:, None])
        J = J * T(mask)
        return torch.linalg.solve_triangular(Lc, J, upper=False, left=False)

    # B^{l-1}(t mu, s q) outside its structure (test columns q of the other rows, s < t): zero
    # at the linearisation point but not its derivative (module docstring), as the Jacobian
    # of the population mean of g along a common shift of u, on the first ``ts`` samples
    ts = tangent_count(S, T1 * (n - P), tangent_samples)
    extra = strict & ~maskB_struct
    maskB_extra = T(extra)
    extra_rows = np.flatnonzero(extra.any(1))

    def tangent_B(u, r, C, D):
        du = torch.zeros(m, dtype=dt, requires_grad=True)
        _, _, _, Gt = march(u[:ts] + du, r[:ts], C, D)
        Gm = Gt.mean(1)
        J = torch.zeros(m, m, dtype=dt)
        for i in extra_rows:
            gr = torch.autograd.grad(Gm[i], du, create_graph=True, retain_graph=True,
                                     allow_unused=True)[0]
            if gr is not None:
                J[i] = gr
        return J * maskB_extra

    def equal_time_rows(H, C, Gr, ktr):
        """The mean equal-time response A^l(t, t) of a layer whose equal-time memory C(t, t)
        is perturbed (zero at the linearisation point; deep_causal.equal_time_response), taken
        out of the Stein columns of the training variables of times < t on which r(t)
        regresses (deep_causal: the same correction, row by row), as an (m, m) matrix."""
        lam = act(H, 1)
        rows = []
        for t in range(T1):
            a, e = t * n, (t + 1) * n
            Aeq = equal_time_response(C[a:e, a:e], lam[a:e])
            row = torch.zeros(n, m, dtype=dt)
            row[:, a:e] = Aeq
            kc = torch.as_tensor(ktr[tb[ktr] < t])
            if len(kc):
                row[:, kc] = -Aeq @ regression_rows(torch, Gr, torch.arange(a, e), kc)
            rows.append(row)
        return torch.cat(rows, 0)

    def sweep(q, E):
        fq = q["f"]
        fc = fq - fq[:1] if center else fq
        dcol = torch.zeros(T1, n, dtype=dt)
        dcol[:, :P] = yv[None, :] - fc[:, :P]
        W = lr * t_strict * dcol.reshape(1, m)
        out = {"phi": [], "g": [], "A": [], "B": [None] * (L - 1)}
        phi_prev, A_prev = kx_t, None
        for l in range(L):
            g_next = torch.ones(m, m, dtype=dt) if l == L - 1 else q["g"][l + 1]
            C = phi_prev * W
            if A_prev is not None:
                C = C + A_prev * t_maskA
            D = g_next * W
            if l <= L - 2:
                D = D + q["B"][l] * t_maskBm
            fu = _Factor(torch, phi_prev, keep_u[l])
            fr = _Factor(torch, g_next, keep_r[l])
            u = fu.sources(xi_u[l])
            r = fr.sources(xi_r[l])
            H, PH, Z, G = march(u, r, C, D)                        # (m, S)
            El = E[l]
            Phi_l = PH @ PH.T / S + El["pp"]
            G_l = G @ G.T / S + El["gg"]
            out["phi"].append(Phi_l)
            out["g"].append(G_l)
            if l <= L - 2:
                # A^l = gamma0^{-1} <dphi / dr_train>: Stein in the training sources
                ktr = keep_rtr[l]
                Ltr = torch.linalg.cholesky(g_next[ktr][:, ktr])
                xi_tr = torch.linalg.solve_triangular(Ltr, r[:, ktr].T, upper=False)  # (k,S)
                Js = stein(PH, xi_tr.T, Ltr, tb[ktr], tb, True)
                A_l = torch.zeros(m, m, dtype=dt)
                A_l[:, ktr] = Js
                if l >= 1:
                    A_l = A_l + gamma0 * equal_time_rows(H, C, g_next, ktr)
                A_l = (A_l + El["a"] * t_maskA) / gamma0
                out["A"].append(A_l)
                A_prev = A_l
            if l >= 1:
                B_l = torch.zeros(m, m, dtype=dt)
                for grp in groups[l]:
                    cols = grp["cols"]
                    Lg = torch.linalg.cholesky(phi_prev[cols][:, cols])
                    xg = torch.linalg.solve_triangular(Lg, u[:, cols].T, upper=False)
                    Js = stein(G[grp["rows"]], xg.T, Lg, grp["col_t"], grp["row_t"], False)
                    B_l[np.ix_(grp["rows"], cols)] = Js
                if ts:
                    B_l = B_l + tangent_B(u, r, C, D)
                out["B"][l - 1] = (B_l + El["b"] * t_maskBn) / gamma0
            if l == L - 1:
                zf = (Z * PH).mean(1).reshape(T1, n) + El["f"].reshape(T1, n)
                out["f"] = zf / gamma0
            phi_prev = Phi_l
        return out

    def observables(q):
        fq = q["f"]
        fc = fq - fq[:1] if center else fq
        obs = [fc[tsel].reshape(-1)]
        if ntk:
            K = equal_time(kx_t, T1, n) * equal_time(q["g"][0], T1, n)
            for l in range(L):
                Gl1 = equal_time(q["g"][l + 1], T1, n) if l < L - 1 else 1.0
                K = K + Gl1 * equal_time(q["phi"][l], T1, n)
            iu = np.triu_indices(n)
            obs.append(K[tsel][:, iu[0], iu[1]].reshape(-1))
        return torch.cat(obs)

    def zero_noise():
        return [{"pp": torch.zeros(m, m, dtype=dt, requires_grad=True),
                 "gg": torch.zeros(m, m, dtype=dt, requires_grad=True),
                 "f": torch.zeros(m, dtype=dt, requires_grad=True),
                 "a": torch.zeros(m, m, dtype=dt, requires_grad=True),
                 "b": torch.zeros(m, m, dtype=dt, requires_grad=True)} for _ in range(L)]

    def flat(q):
        return [q["f"]] + q["phi"] + q["g"] + q["A"] + [b for b in q["B"]]

    nthreads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        if adjoint == "causal":
            # one backward pass through the causal recursion (solvers.fluct.deep_causal)
            J, fields, K, gaps = causal_adjoint(
                torch, act=act, kx=kx, y=y, L=L, gamma0=gamma0, lr=lr, T1=T1, n=n,
                center=center, q0=q0, keep_u=keep_u, keep_r=keep_r, keep_rtr=keep_rtr,
                groups=groups, xi_u=xi_u, xi_r=xi_r, times=times, ntk=ntk, batch=batch,
                logger=logger, lazy=True, tangent_samples=tangent_samples)
            del fields            # kappa samples afresh (below)
            # the causal recursion needs no iteration; its check is the fixed-point gap
            gap = max(gaps.values())
            residual = 0.0
            if logger is not None:
                logger.info("deep propagator: fixed-point gaps of the solution under the "
                            "sampled map %s", {k: round(v, 4) for k, v in gaps.items()})
            # Monte Carlo noise of the estimates is about 3 / sqrt(S) here (measured:
            # 0.03-0.08 at S = 2048-4096); far above it the solution is not a fixed point
            if not (gap < max(fixed_point_tol, 10.0 / np.sqrt(S))):
                # the solution is not a fixed point of the sampled map at these parameters
                nan = np.full((T1, n, n), np.nan)
                return {"cov": np.full((T1, T1, n, n), np.nan), "pred_cov": nan,
                        "pred_cov_se": nan, "ntk_var": nan if ntk else None,
                        "ntk_var_se": nan if ntk else None, "residual": float("inf"),
                        "fixed_point_gap": gaps}
        else:
            qin = {"f": q0["f"].clone().requires_grad_(True),
                   "phi": [x.clone().requires_grad_(True) for x in q0["phi"]],
                   "g": [x.clone().requires_grad_(True) for x in q0["g"]],
                   "A": [x.clone().requires_grad_(True) for x in q0["A"]],
                   "B": [x.clone().requires_grad_(True) for x in q0["B"]]}
            E = zero_noise()
            qout = sweep(qin, E)
            leaves_q = flat(qin)
            leaves_E = [El[k] for El in E for k in ("pp", "gg", "f", "a", "b")]
            outs = flat(qout)
            # d obs / dq at the fixed point (obs depend on q directly)
            qobs = {"f": qin["f"], "phi": qin["phi"], "g": qin["g"]}
            obs = observables(qobs)
            K = obs.numel()
            eye = torch.eye(K, dtype=dt)
            nbatch = -(-K // batch)
            Jall = {k: [] for k in ("pp", "gg", "f", "a", "b")}
            residual = 0.0
            for lo in range(0, K, batch):
                hi = min(K, lo + batch)
                nb = hi - lo
                g0 = torch.autograd.grad(obs, [qin["f"]] + qin["phi"] + qin["g"],
                                         grad_outputs=eye[lo:hi], retain_graph=True,
                                         allow_unused=True, is_grads_batched=True)
                base = [x if x is not None else torch.zeros((nb,) + tuple(lf.shape), dtype=dt)
                        for x, lf in zip(g0, [qin["f"]] + qin["phi"] + qin["g"])]
                base += [torch.zeros((nb,) + tuple(lf.shape), dtype=dt)
                         for lf in qin["A"] + qin["B"]]
                w = base
                for k in range(iters):
                    gr = torch.autograd.grad(outs, leaves_q, grad_outputs=w, retain_graph=True,
                                             allow_unused=True, is_grads_batched=True)
                    new = [b + (x if x is not None else 0.0) for b, x in zip(base, gr)]
                    num = sum(float(((a - b) ** 2).sum()) for a, b in zip(new, w))
                    den = sum(float((a ** 2).sum()) for a in new) + 1e-300
                    change = (num / den) ** 0.5
                    w = new
                    if not np.isfinite(change):
                        break
                    if progress is not None:
                        progress(int(5e5 * (lo // batch * iters + k + 1) / (nbatch * iters)),
                                 1_000_000, "adjoint")
                    if change < tol:
                        break
                if not (change < 1e-3):
                    # the linearised dynamics blew up or the adjoint iteration does not converge:
                    # report it (the caller raises) without spending the kappa step
                    nan = np.full((T1, n, n), np.nan)
                    return {"cov": np.full((T1, T1, n, n), np.nan), "pred_cov": nan,
                            "pred_cov_se": nan, "ntk_var": nan if ntk else None,
                            "ntk_var_se": nan if ntk else None, "residual": float(change)}
                residual = max(residual, change)
                if logger is not None:
                    logger.info("deep propagator: observables %d-%d of %d, %d adjoint iterations, "
                                "change %.2e (%.1f s)", lo, hi - 1, K, k + 1, change,
                                clock() - t_start)
                gE = torch.autograd.grad(outs, leaves_E, grad_outputs=w, retain_graph=True,
                                         allow_unused=True, is_grads_batched=True)
                for l in range(L):
                    for j, key in enumerate(("pp", "gg", "f", "a", "b")):
                        x = gE[5 * l + j]
                        shape = (nb,) + tuple(E[l][key].shape)
                        Jall[key].append((l, lo, x.detach() if x is not None else
                                          torch.zeros(shape, dtype=dt)))
            # assemble J per layer: (K, ...) arrays
            J = _FullRows([{key: torch.cat([x for (ll, lo, x) in Jall[key] if ll == l], 0)
                            for key in Jall} for l in range(L)], K)
        if rows_only:
            return {"rows": J, "residual": residual,
                    "fixed_point_gap": gaps if adjoint == "causal" else None}
        # kappa contracted with the J's, from per-sample derivatives (module docstring);
        # its work is GEMMs with the (K, m, m) adjoint rows, which use every thread (measured:
        # 2 threads 1.9x faster than 1 at m = 492, K = 90; the adjoint's small ops are not)
        torch.set_num_threads(nthreads)
        # kappa from fresh samples of the exact single-site law: independent of the maps' rows
        # (the cross estimate of a pair of maps needs that), and with every innovation above
        # KAPPA_RTOL. The maps' law drops innovations below ``rtol`` (3e-2) of a source's
        # variance, which costs each source < 1 % of its variance but most of the variance of
        # its increments u(t) - u(s), the part centred predictions and kernel changes are made
        # of (linear depth 2, 8 steps: the top layer's N Var of a training point 17 % low).
        # kappa="stein" whitens in the kept innovations and keeps the maps' law.
        Sk = S if kappa_samples is None else int(kappa_samples)
        Sk -= Sk % 2
        krngs = [np.random.default_rng(c) for c in ss.spawn(2 * L)]
        if kappa == "stein":
            ku, kr = keep_u, keep_r
        else:
            ku = [_keep(K, KAPPA_RTOL) for K in Ku]
            kr = [_keep(K, KAPPA_RTOL) for K in Kr]
        xu_k, xr_k = draw(krngs, Sk, ku, kr)
        torch.set_num_threads(1)
        with torch.no_grad():
            fields, _ = causal_adjoint(
                torch, act=act, kx=kx, y=y, L=L, gamma0=gamma0, lr=lr, T1=T1, n=n,
                center=center, q0=q0, keep_u=ku, keep_r=kr, keep_rtr=keep_rtr,
                groups=groups, xi_u=xu_k, xi_r=xr_k, times=times, ntk=ntk,
                values_only=True)
        torch.set_num_threads(nthreads)
        for l in range(L):
            fields[l].update({"xi_u": xu_k[l], "xi_r": xr_k[l],
                              "Ku": T(Ku[l]), "Kr": T(Kr[l])})
        maps = [J] if hold is None else [hold, J]
        edges = np.linspace(0, Sk, blocks + 1).astype(int)
        kseeds = ss.spawn(L)          # Hutchinson probes of kappa='jvp' (the same per group)
        # The results need the predictions' full covariance block but only the NTK entries'
        # variances: kappa runs over groups of observables (all predictions; then NTK entries
        # kappa_group at a time, only their diagonal kept), each group's adjoint rows asked
        # for when its turn comes, so one group's rows are held at a time, not all K.
        nf = len(times) * n
        gsize = max(1, int(kappa_group) // (1 if hold is None else 2))
        # exact divergences cost a Jacobian of the march per sample and group, whatever the
        # group's rows: the predictions share their group with the first NTK rows
        merge = kappa == "jvp" and kappa_divergence == "exact"
        if ntk_seeds is None:
            first = min(K, nf + (gsize if merge else 0))
            kgroups = [np.arange(first)] + [np.arange(lo, min(K, lo + gsize))
                                            for lo in range(first, K, gsize)]
            nrows = K
        else:
            # combinations of the NTK observables: seed rows over all K observables
            Wn = np.asarray(ntk_seeds, dtype=np.float64)
            if not ntk or Wn.ndim != 2 or Wn.shape[1] != K - nf:
                raise ValueError(f"ntk_seeds of shape {Wn.shape}: need ntk=True and (R, "
                                 f"{K - nf}) weights over the NTK observables")
            Wall = np.zeros((Wn.shape[0], K))
            Wall[:, nf:] = Wn
            g0 = min(len(Wn), gsize) if merge else 0
            kgroups = ([np.vstack([np.eye(K)[:nf], Wall[:g0]])] +
                       [Wall[lo:lo + gsize] for lo in range(g0, len(Wn), gsize)])
            nrows = nf + len(Wn)
            combo = {(i, j): {"v": np.zeros(len(Wn)), "bv": np.zeros((blocks, len(Wn)))}
                     for i in range(len(maps)) for j in range(i, len(maps))}
            ndone = 0
        kgroups = [gi for gi in kgroups if len(gi)]
        nm = len(maps)
        # per map pair (a, b) of the stacked rows: the predictions' covariance block and the
        # variances of every observable (those of the NTK entries are used), with the
        # per-block estimates of both (batch means)
        cov = {(i, j): {"f": np.zeros((nf, nf)), "v": np.zeros(K), "bf": np.zeros(
            (blocks, nf, nf)), "bv": np.zeros((blocks, K))} for i in range(nm)
            for j in range(i, nm)}
        kdone = [0]
        ktotal = L * Sk * len(kgroups)

        def report(what):
            if progress is not None:
                adj = min(1.0, sum(mp.done for mp in maps) / (nm * nrows))
                progress(int(5e5 * (adj + kdone[0] / ktotal)), 1_000_000, what)

        for mp in maps:
            mp.progress = lambda d, tot, what: report("adjoint")
        for gi, idx in enumerate(kgroups):
            G = len(idx)
            # the kappa step runs in kdtype: the group's rows (every layer) are stored in it,
            # not in double precision (half the memory of the largest arrays; the same
            # numbers, jvp_kappa_layer converted them anyway)
            rows = _rows_of_maps(torch, maps, idx, nthreads,
                                 kdtype if kappa == "jvp" else None)
            if gi == len(kgroups) - 1:
                # the last group's rows are out: the maps' graphs or rows (the caller's
                # ``hold`` too) are not needed by the kappa step, so it runs without them
                # (tanh depth 3, 8 + 4 points, 40 steps, a pair of 2048-sample maps: ~1.4 GB)
                for mp in maps:
                    mp.free()
                gc.collect()
                release()
            c = np.zeros((nm * G, nm * G))
            bc = np.zeros((blocks, nm * G, nm * G))
            for l in range(L):
                def tick(d, l=l, gi=gi):
                    kdone[0] = (gi * L + l) * Sk + d
                    report("kappa")
                # the maps' rows of this layer stacked (the per-map copies freed as we go)
                Jl = {key: torch.cat([r[l].pop(key) for r in rows]) for key in list(rows[0][l])}
                with torch.no_grad():
                    if kappa == "jvp":
                        mom = jvp_kappa_layer(torch, fields[l], Jl, l == 0, l == L - 1, edges,
                                              chunk, gamma0=gamma0, act=act, T1=T1, n=n,
                                              seed=kseeds[l], progress=tick, dtype=kdtype,
                                              divergence=kappa_divergence)
                    elif kappa == "stein":
                        mom = stein_kappa_layer(
                            torch, fields[l], Jl, l == 0, l == L - 1, edges, chunk,
                            keep_u=ku[l], keep_r=kr[l], progress=tick)
                    else:
                        mom = _kappa_layer(torch, fields[l], Jl, l == 0, l == L - 1, edges,
                                           chunk, gamma0, act, T1, n, tick)
                del Jl
                release()
                for b in range(blocks):
                    cnt = edges[b + 1] - edges[b]
                    m1, m2 = mom["m1"][b] / cnt, mom["m2"][b] / cnt
                    bc[b] += (m2 - np.outer(m1, m1)) * cnt / (cnt - 1)
                m1 = sum(mom["m1"]) / Sk
                m2 = sum(mom["m2"]) / Sk
                c += (m2 - np.outer(m1, m1)) * Sk / (Sk - 1)
            del rows
            release()
            if logger is not None:
                logger.info("deep propagator: kappa of %d rows of group %d of %d (%d layers, %d "
                            "samples, %d map(s)) (%.1f s)", G, gi + 1, len(kgroups), L, Sk, nm,
                            clock() - t_start)
            npred = nf if gi == 0 else 0      # the first group's rows start with the predictions
            if ntk_seeds is not None and G > npred:
                sl = slice(ndone, ndone + G - npred)
                ndone += G - npred
                for (i, j) in combo:
                    blk = c[i * G:(i + 1) * G, j * G:(j + 1) * G]
                    bb = bc[:, i * G:(i + 1) * G, j * G:(j + 1) * G]
                    combo[(i, j)]["v"][sl] = np.diag(blk)[npred:]
                    combo[(i, j)]["bv"][:, sl] = np.diagonal(bb, axis1=1, axis2=2)[:, npred:]
            if gi > 0 and ntk_seeds is not None:
                continue
            vidx = np.arange(nf) if ntk_seeds is not None else idx
            for (i, j) in cov:
                blk = c[i * G:(i + 1) * G, j * G:(j + 1) * G]
                bb = bc[:, i * G:(i + 1) * G, j * G:(j + 1) * G]
                if i != j:          # the cross term, symmetrised
                    blk = 0.5 * (blk + blk.T)
                    bb = 0.5 * (bb + bb.transpose(0, 2, 1))
                if gi == 0:         # the predictions: the full block
                    cov[(i, j)]["f"][...] = blk[:nf, :nf]
                    cov[(i, j)]["bf"][...] = bb[:, :nf, :nf]
                cov[(i, j)]["v"][vidx] = np.diag(blk)[:len(vidx)]
                cov[(i, j)]["bv"][:, vidx] = np.diagonal(bb, axis1=1, axis2=2)[:, :len(vidx)]

        def se(x):
            return x.std(axis=0, ddof=1) / np.sqrt(blocks)

        if ntk_seeds is not None:
            # the entries' variances were not computed: NaN, not zeros
            for d in cov.values():
                d["v"][nf:] = np.nan
                d["bv"][:, nf:] = np.nan
            cc = combo[(0, 1) if hold is not None else (0, 0)]
            cres = {"var": cc["v"], "var_se": se(cc["bv"]), "block": cc["bv"]}
            if hold is not None:
                a, b = combo[(0, 0)]["v"], combo[(1, 1)]["v"]
                cres.update(plain=0.5 * (a + b), delta=0.5 * (a - b))
        if hold is None:
            c = cov[(0, 0)]
            res = _assemble(c["f"], se(c["bf"]), c["v"], se(c["bv"]), times, T1, n, ntk)
        else:
            c, a, b = cov[(0, 1)], cov[(0, 0)], cov[(1, 1)]
            res = _assemble(c["f"], se(c["bf"]), c["v"], se(c["bv"]), times, T1, n, ntk)
            for name, sign in (("plain", 1.0), ("delta", -1.0)):
                part = _assemble(0.5 * (a["f"] + sign * b["f"]), np.zeros((nf, nf)),
                                 0.5 * (a["v"] + sign * b["v"]), np.zeros(K), times, T1, n, ntk)
                res[name] = {"pred_cov": part["pred_cov"], "ntk_var": part["ntk_var"]}
            # the cross term's per-block estimates (kappa's batch means of any sum of entries)
            parts = [_assemble(c["bf"][i], np.zeros((nf, nf)), c["bv"][i], np.zeros(K),
                               times, T1, n, ntk) for i in range(blocks)]
            res["block"] = {"pred_cov": np.stack([q["pred_cov"] for q in parts]),
                            "ntk_var": np.stack([q["ntk_var"] for q in parts]) if ntk else None}
        if ntk_seeds is not None:
            res["combo"] = cres
    finally:
        torch.set_num_threads(nthreads)
    res.update(residual=residual, fixed_point_gap=gaps if adjoint == "causal" else None)
    return res


def _rows_of_maps(torch, maps, idx, nthreads, dtype=None):
    """Each map's adjoint rows of the observables ``idx``. A backward pass gains little from
    a second thread (its operations are small), so with two threads the maps of a pair run
    side by side, the second in one worker thread, each single-threaded: the same numbers,
    1.5-2x faster (depth 3, 8 + 4 points, 40 steps, 2048 samples per map: 12.8 s against
    23.2 s for the predictions' rows). Two worker threads (the main thread waiting) were as
    fast but left the next kappa step 30 % slower with 3 GB more resident memory (cause not
    pinned down; the allocator's per-thread arenas are the likely one). One map keeps every
    thread (0.62-0.76 s per observable at 2048 samples, 0.85 s single-threaded). Side by side,
    each map takes at most PAIR_BATCH observables per backward pass (memory)."""
    if len(maps) < 2 or nthreads < 2:
        return [mp.rows(idx, dtype) for mp in maps]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(maps[1].rows, idx, dtype, PAIR_BATCH)
            return [maps[0].rows(idx, dtype, PAIR_BATCH), other.result()]
    finally:
        torch.set_num_threads(nthreads)


class _FullRows:
    """The iterated adjoint's rows of every observable, served like
    :class:`solvers.fluct.deep_causal.AdjointRows` (by groups of observables)."""

    def __init__(self, J, K):
        self.J, self.K, self.done, self.progress = J, K, K, None

    def free(self):
        """Drop the rows once no more will be asked for (as ``AdjointRows.free``)."""
        self.J = None

    def rows(self, idx, dtype=None, batch=None):
        """As ``AdjointRows.rows`` (``batch`` unused: the rows are already computed)."""
        torch = _torch()
        if self.J is None:
            raise RuntimeError("_FullRows.rows after free(): the rows were dropped")
        W = self.J[0]["f"].new_tensor(seed_matrix(idx, self.K))
        return [{key: torch.tensordot(W, x, dims=1).to(dtype or x.dtype)
                 for key, x in Jl.items()} for Jl in self.J]


def _assemble(fcov, fcov_se, v, v_se, times, T1, n, ntk):
    """Result arrays from the (nf, nf) covariance block of the predictions at ``times`` (n
    each, time-major), the (K,) variances of every observable (the NTK's upper triangle at
    ``times`` after the predictions) and their standard errors."""
    tsel = np.asarray(times, dtype=np.int64)
    idx_t = np.arange(T1)
    nt = len(times)
    nf = nt * n
    cf = np.full((T1, T1, n, n), np.nan)
    cf_se = np.full((T1, T1, n, n), np.nan)
    cf[np.ix_(tsel, tsel)] = fcov.reshape(nt, n, nt, n).transpose(0, 2, 1, 3)
    cf_se[np.ix_(tsel, tsel)] = fcov_se.reshape(nt, n, nt, n).transpose(0, 2, 1, 3)
    res = {"cov": cf, "pred_cov": np.ascontiguousarray(cf[idx_t, idx_t]),
           "pred_cov_se": np.ascontiguousarray(cf_se[idx_t, idx_t]),
           "ntk_var": None, "ntk_var_se": None}
    if ntk:
        iu = np.triu_indices(n)
        v = v[nf:].reshape(nt, iu[0].size)
        vs = v_se[nf:].reshape(nt, iu[0].size)
        var = np.full((T1, n, n), np.nan)
        vse = np.full((T1, n, n), np.nan)
        for j, t in enumerate(times):
            var[t][iu[0], iu[1]] = v[j]
            var[t][iu[1], iu[0]] = v[j]
            vse[t][iu[0], iu[1]] = vs[j]
            vse[t][iu[1], iu[0]] = vs[j]
        res["ntk_var"], res["ntk_var_se"] = var, vse
    return res


def _activation(torch, name):
    """phi (order 0) and its first three derivatives (orders 1-3) as torch functions (orders
    2 and 3 for the second-order tangents of the kappa step, :mod:`solvers.fluct.march_tangents`)."""
    if name == "tanh":
        def act(x, order):
            t = torch.tanh(x)
            if order == 0:
                return t
            d1 = 1.0 - t * t
            if order == 1:
                return d1
            return -2.0 * t * d1 if order == 2 else d1 * (6.0 * t * t - 2.0)
    elif name == "erf":
        c = 2.0 / np.sqrt(np.pi)

        def act(x, order):
            if order == 0:
                return torch.erf(x)
            d1 = c * torch.exp(-x * x)
            if order == 1:
                return d1
            return -2.0 * x * d1 if order == 2 else (4.0 * x * x - 2.0) * d1
    elif name == "linear":
        def act(x, order):
            if order == 0:
                return x
            return torch.ones_like(x) if order == 1 else torch.zeros_like(x)
    else:
        raise ValueError(f"deep_propagator supports smooth activations (tanh, erf, linear), "
                         f"got {name!r}: for relu the map's derivative misses phi'' = delta")
    return act


def ntk_trace_seeds(directions, probes, rng):
    """Seed rows whose variances add up to the sum of the NTK entries' variances, per time.

    ``directions``: one (E, r_j) array per selected time with orthonormal columns over that
    time's E = n (n + 1) / 2 upper-triangle entries (e.g. the leading eigenvectors of a pilot
    covariance of the entries); ``probes``: Gaussian probes of the complement per time;
    ``rng``: numpy Generator. For any covariance C of the entries of one time and U the
    directions, P = U U^T,

        tr C = sum_k u_k^T C u_k + E_z[z^T C z],   z = (I - P) xi,  xi ~ N(0, I_E),

    since E[z z^T] = I - P. So sum_k Var(u_k . K) + mean_j Var(z_j . K) is unbiased for the sum of
    the entries' variances whatever the directions; good directions (those carrying most of
    tr C) make the probes' part small, so a few adjoint rows replace E of them. Returns
    (W, layout): W (R, len(directions) E) and layout = dict(time (R,) index of the time,
    weight (R,) 1 for a direction and 1 / probes for a probe, probe (R,) bool)."""
    nt = len(directions)
    E = directions[0].shape[0]
    rows, tix, wts, prb = [], [], [], []
    for j, U in enumerate(directions):
        U = np.asarray(U, dtype=np.float64).reshape(E, -1)
        if U.shape[1] and not np.allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-8):
            raise ValueError("ntk directions must have orthonormal columns")
        g = 0 if U.shape[1] >= E else int(probes)
        if g == 1:
            raise ValueError("probes=1 gives the residual no error bar; use probes >= 2 "
                             "(or 0 to leave the residual out)")
        for k in range(U.shape[1]):
            rows.append((j, U[:, k]))
            wts.append(1.0)
            prb.append(False)
        for _ in range(g):
            xi = rng.standard_normal(E)
            rows.append((j, xi - U @ (U.T @ xi)))
            wts.append(1.0 / g)
            prb.append(True)
    W = np.zeros((len(rows), nt * E))
    for i, (j, w) in enumerate(rows):
        W[i, j * E:(j + 1) * E] = w
        tix.append(j)
    return W, {"time": np.asarray(tix), "weight": np.asarray(wts), "probe": np.asarray(prb)}


def ntk_trace(combo, layout, nt):
    """The sum of the NTK entries' N Var per selected time, with its standard error, from the
    variances of the combinations of :func:`ntk_trace_seeds` (``combo`` of the engine).

    Error: kappa's batch means of the per-block sums (per pair of maps, or of one map),
    inflated by (1 + rho) for the maps' noise (rho pooled over the combinations, as the
    entries' errors are: :func:`deep_propagator`), plus the probes' own spread: the sample
    variance of the probes' variances over the probes, / probes, or, where larger, the
    Gaussian probes' own variance 2 tr(C_r^2) / probes = 2 q (mean probe variance)^2 / probes
    with q = tr(C_r^2) / tr(C_r)^2 of the remainder C_r = (I - P) C (I - P) taken from a pilot
    (``layout["q"]``, one per time; a handful of probes' spread alone is unreliable when the
    remainder has a few dominant directions), and the remainder's size the larger of the
    probes' mean and the principal part x (1 - share) / share (``layout["share"]``: the pilot's
    fraction of the summed variance in the directions)."""
    tix, wt, prb = layout["time"], layout["weight"], layout["probe"]
    v = np.asarray(combo["var"])
    blk = np.asarray(combo["block"])
    if blk.ndim == 2:                   # one map: (blocks, R)
        blk = blk[None]
    pairs, blocks = blk.shape[:2]
    rho = float(combo.get("rho", 0.0))
    total, se, resid = np.zeros(nt), np.zeros(nt), np.zeros(nt)
    for j in range(nt):
        sel = tix == j
        total[j] = float(np.sum(wt[sel] * v[sel]))
        bt = (blk[:, :, sel] * wt[sel]).sum(-1)                  # (pairs, blocks)
        var = np.mean(bt.var(axis=1, ddof=1) / blocks) * (1.0 + rho) / pairs
        ps = sel & prb
        if ps.sum() >= 2:
            resid[j] = float(v[ps].mean())
            q = float(np.asarray(layout.get("q", np.zeros(nt)))[j])
            # the remainder's scale: the probes' mean, or the pilot's share of it relative
            # to the principal directions' part, whichever is larger
            c = float(np.asarray(layout.get("share", np.ones(nt)))[j])
            scale = max(resid[j], float(np.sum(v[sel & ~prb])) * (1.0 - c) / max(c, 1e-12))
            var += max(v[ps].var(ddof=1), 2.0 * q * scale ** 2) / ps.sum()
        se[j] = np.sqrt(var)
    return total, se, resid

