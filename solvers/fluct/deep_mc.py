"""O(1/N) propagator of deep *nonlinear* networks (docs/theory.rst §5 on top of §2), sampled.

The model of the finite-width noise is the one of :mod:`solvers.fluct.deep_linear` (checked
there against simulated linear networks), with the Gaussian unit replaced by sampled single-site
fields. Integrating out the initial weights couples layers only through averages over the
units of a layer; at width N each average is its single-unit mean plus noise E / sqrt(N):

    Phi^l = <phi phi^T> + E_pp,   G^l = <g g^T> + E_gg,   f = (<z^L phi^L> + E_f) / gamma0,
    A^l = (<phi rho_r^T> + E_a) / gamma0,   B^{l-1} = (<g rho_u^T> + E_b) / gamma0,

where rho_r, rho_u are the MSR response fields conjugate to the sources r^l, u^l of a unit
(<F rho(s)> = <dF / d source(s)>). As in the linear module, the response noise E_a is used on
s <= t (its equal-time part pairs with the coupling of the same times) and E_b on s < t; the
structural zeros (test points are passive) carry no noise.

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
:func:`solvers.mc.stein_finish`), which is differentiable in q. Smooth activations only: the
derivative of the map for ReLU would miss the phi'' = delta term.

Cost: per layer and iteration one march of S samples (O(S (nT)^2)) and its backward pass per
batch of observables; memory one sweep's graph. Meant for modest n (T + 1) (a few hundred).
"""
from __future__ import annotations

import numpy as np

from ..layout import causal_cholesky, causal_mask, equal_time
from ..mc.responses import stein_groups
from .deep_linear import _torch
from .deep_causal import causal_adjoint
from .kappa_hessian import _kappa_layer
from .kappa_stein import jvp_kappa_layer, stein_kappa_layer

__all__ = ["deep_propagator", "deep_propagator_once", "combine_replicates"]


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


def _keep(K, rtol):
    return np.asarray(causal_cholesky(K, rtol)[0])


def deep_propagator(kx, y, activation, depth, gamma0, lr, steps, *, samples=16384, seed=0,
                    kappa_samples=None, map_replicates=1, progress=None, logger=None, **kw):
    """Leading-order N Cov of the predictions (and N Var of NTK entries) of a deep network,
    with error bars that include the sampling noise of the map.

    ``map_replicates`` = R >= 2 runs R independent propagators (:func:`deep_propagator_once`,
    whose docstring lists the other parameters), each with its own ``samples / R`` map samples
    and ``kappa_samples / R`` kappa samples (about the cost of one run at ``samples``: both
    steps are linear in the samples), and returns their mean. One run's batch means see only
    kappa's sampling; the map (the adjoint rows J from the sampled single-site map) is noisy
    too, and at depth 3 about as much (benchmarks/README.md, coverage over seeds). Per entry
    i, with m_i the mean over replicates of the squared batch-means error and s_i^2 the
    replicates' sample variance, the excess ratio rho = max(0, mean_i(s_i^2 / m_i) - 1)
    (pooled over the entries of the predictions, and separately of the NTK: R - 1 degrees of
    freedom per entry are too few alone) gives the standard error of the mean
    sqrt(m_i (1 + rho) / R). ``rho`` per group is returned in ``map_noise_ratio``. R = 1 is
    one run, its error bar kappa's only (a lower bound). ``progress(done, total, what)`` gets
    one monotone fraction over the whole computation (each replicate's adjoint, then its kappa).
    """
    R = int(map_replicates)
    if R < 1:
        raise ValueError(f"map_replicates={map_replicates!r}: use an integer >= 1")
    if R == 1:
        seeds, Sr, Kr = [seed], samples, kappa_samples
    else:
        ss = seed if isinstance(seed, np.random.SeedSequence) else \
            np.random.SeedSequence(seed)
        seeds, Sr = ss.spawn(R), int(samples) // R
        Kr = None if kappa_samples is None else \
            max(1, min(int(kappa_samples), int(samples)) // R)
    outs = []
    for r, sr in enumerate(seeds):
        # ``progress(done, total, what)`` sees one monotone fraction over the replicates:
        # the adjoint then kappa of each, half and half
        tick = None if progress is None else \
            (lambda d, tot, what, r=r: progress(
                int(1e6 * (r + 0.5 * (what == "kappa") + 0.5 * d / tot) / R), 1_000_000,
                what if R == 1 else f"map {r + 1}/{R}: {what}"))
        if logger is not None and R > 1:
            logger.info("deep propagator: map replicate %d/%d (%d map samples)", r + 1, R, Sr)
        o = deep_propagator_once(kx, y, activation, depth, gamma0, lr, steps, samples=Sr,
                                 seed=sr, kappa_samples=Kr, progress=tick, logger=logger, **kw)
        if R == 1 or not np.isfinite(o["residual"]) or not np.any(np.isfinite(o["pred_cov"])):
            return o                      # one run, or a failed replicate: the caller reports it
        outs.append(o)
    return combine_replicates(outs)


def _excess_ratio(x, se):
    """Pooled excess ratio rho of :func:`deep_propagator` from replicate estimates x (R, ...)
    and their batch-means errors se (R, ...), over the finite entries with se > 0."""
    s2 = np.var(x, axis=0, ddof=1)
    m = np.mean(se * se, axis=0)
    ok = np.isfinite(s2) & np.isfinite(m) & (m > 0)
    if not np.any(ok):
        return 0.0
    return float(max(0.0, np.mean(s2[ok] / m[ok]) - 1.0))


def combine_replicates(outs):
    """Mean of independent :func:`deep_propagator_once` results and standard errors that
    include the map's noise (:func:`deep_propagator`)."""
    R = len(outs)
    res = {"cov": np.mean([o["cov"] for o in outs], axis=0),
           "residual": max(o["residual"] for o in outs), "map_noise_ratio": {}}
    for key, se_key, name in (("pred_cov", "pred_cov_se", "predictions"),
                              ("ntk_var", "ntk_var_se", "ntk")):
        if outs[0][key] is None:
            res[key] = res[se_key] = None
            continue
        x = np.stack([o[key] for o in outs])
        se = np.stack([o[se_key] for o in outs])
        n = x.shape[-1]
        iu = np.triu_indices(n)
        rho = _excess_ratio(x[..., iu[0], iu[1]], se[..., iu[0], iu[1]])
        res[key] = x.mean(axis=0)
        res[se_key] = np.sqrt(np.mean(se * se, axis=0) * (1.0 + rho) / R)
        res["map_noise_ratio"][name] = rho
    gaps = [o.get("fixed_point_gap") for o in outs]
    res["fixed_point_gap"] = (None if gaps[0] is None else
                              {k: max(gp[k] for gp in gaps) for k in gaps[0]})
    return res


def deep_propagator_once(kx, y, activation, depth, gamma0, lr, steps, *, f, phi, g, A, B,
                         center=False, ntk=True, samples=16384, seed=0, rtol=1e-2, blocks=8,
                         batch=32, iters=None, chunk=32, kappa_samples=None, tol=1e-12,
                         kappa="jvp", adjoint="causal", times=None, fixed_point_tol=0.25,
                         progress=None, logger=None):
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
        Single-site samples per layer (the map and kappa); ``blocks`` batch means give the
        standard error of kappa's sampling (the map's own sampling error is not included:
        :func:`deep_propagator` with ``map_replicates`` >= 2 adds it).
    seed : int or SeedSequence.
    rtol : float
        Innovations below this fraction of a source's variance are dropped
        (:func:`solvers.layout.causal_cholesky`). Default 1e-2, larger than the solver's 1e-6:
        the derivative of a Stein response with respect to the source covariance carries the
        sampling noise times the inverse whitening factor, and with near-degenerate
        innovations kept the linearised map amplifies that noise along the horizon (1e-3 was
        enough at T = 10; tanh depth 3, 4 + 2 points, 20 steps, 4096 samples gave N Var K =
        27 570 +- 27 960 at 1e-3 and 38.4 +- 5.7 at 1e-2, simulations ~40). The dropped
        innovations carry at most this fraction of each source's variance.
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
    # A: rows all points, columns train sources only (test r reaches nothing)
    maskA = lower & train[None, :]
    # B: train rows see train sources; test row q sees train sources and its own
    maskB_struct = np.zeros((m, m), bool)
    maskB_struct[np.ix_(train, train)] = True
    for q in range(P, n):
        rows = pb == q
        maskB_struct[np.ix_(rows, train | rows)] = True
    maskB_mean = maskB_struct & lower
    maskB_noise = maskB_struct & strict
    T = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=dt)      # noqa: E731
    t_strict, t_maskA = T(strict), T(maskA)
    t_maskBm, t_maskBn = T(maskB_mean), T(maskB_noise)

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
    S -= S % 2
    half = S // 2
    xi_u = [T(np.repeat(rngs[2 * l].standard_normal((half, len(keep_u[l]))), 2, axis=0))
            for l in range(L)]
    xi_r = []
    for l in range(L):
        e = rngs[2 * l + 1].standard_normal((half, len(keep_r[l])))
        xi_r.append(T(np.stack([e, -e], axis=1).reshape(S, -1)))

    act = _activation(torch, activation)
    yv = T(y)
    kx_t = T(kx_flat)
    idx_t = np.arange(T1)

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

    def sweep(q, E, keep_fields=False):
        fq = q["f"]
        fc = fq - fq[:1] if center else fq
        dcol = torch.zeros(T1, n, dtype=dt)
        dcol[:, :P] = yv[None, :] - fc[:, :P]
        W = lr * t_strict * dcol.reshape(1, m)
        out = {"phi": [], "g": [], "A": [], "B": [None] * (L - 1)}
        fields = []
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
                out["B"][l - 1] = (B_l + El["b"] * t_maskBn) / gamma0
            if l == L - 1:
                zf = (Z * PH).mean(1).reshape(T1, n) + El["f"].reshape(T1, n)
                out["f"] = zf / gamma0
            if keep_fields:
                fields.append({"phi": PH.detach(), "g": G.detach(), "z": Z.detach(),
                               "u": u.detach(), "r": r.detach(), "C": C.detach(),
                               "D": D.detach(), "xi_u": xi_u[l], "xi_r": xi_r[l],
                               "Ku": phi_prev.detach(), "Kr": g_next.detach()})
            phi_prev = Phi_l
        return out, fields

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
                logger=logger, progress=progress)
            for l in range(L):
                fields[l].update({"xi_u": xi_u[l], "xi_r": xi_r[l],
                                  "Ku": T(Ku[l]), "Kr": T(Kr[l])})
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
            qout, fields = sweep(qin, E, keep_fields=True)
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
                        progress(lo // batch * iters + k + 1, nbatch * iters, "adjoint")
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
            J = [{key: torch.cat([x for (ll, lo, x) in Jall[key] if ll == l], 0)
                  for key in Jall} for l in range(L)]
        # kappa contracted with the J's, from per-sample derivatives (module docstring);
        # its work is GEMMs with the (K, m, m) adjoint rows, which use every thread (measured:
        # 2 threads 1.9x faster than 1 at m = 492, K = 90; the adjoint's small ops are not)
        torch.set_num_threads(nthreads)
        Sk = S if kappa_samples is None else min(S, int(kappa_samples))
        edges = np.linspace(0, Sk, blocks + 1).astype(int)
        cov = np.zeros((K, K))
        bc = np.zeros((blocks, K, K))
        kseeds = ss.spawn(L)          # Hutchinson probes of kappa='jvp'
        for l in range(L):
            tick = None if progress is None else \
                (lambda d, l=l: progress(l * Sk + d, L * Sk, "kappa"))
            with torch.no_grad():
                if kappa == "jvp":
                    mom = jvp_kappa_layer(torch, fields[l], J[l], l == 0, l == L - 1, edges,
                                          chunk, gamma0=gamma0, act=act, T1=T1, n=n,
                                          seed=kseeds[l], progress=tick)
                elif kappa == "stein":
                    mom = stein_kappa_layer(
                        torch, fields[l], J[l], l == 0, l == L - 1, edges, chunk,
                        keep_u=keep_u[l], keep_r=keep_r[l], progress=tick)
                else:
                    mom = _kappa_layer(torch, fields[l], J[l], l == 0, l == L - 1, edges,
                                       chunk, gamma0, act, T1, n, tick)
            if logger is not None:
                logger.info("deep propagator: kappa of layer %d/%d from %d samples (%.1f s)",
                            l + 1, L, Sk, clock() - t_start)
            for b in range(blocks):
                cnt = edges[b + 1] - edges[b]
                m1, m2 = mom["m1"][b] / cnt, mom["m2"][b] / cnt
                bc[b] += (m2 - np.outer(m1, m1)) * cnt / (cnt - 1)
            m1 = sum(mom["m1"]) / Sk
            m2 = sum(mom["m2"]) / Sk
            cov += (m2 - np.outer(m1, m1)) * Sk / (Sk - 1)
        cov_se = bc.std(axis=0, ddof=1) / np.sqrt(blocks)
    finally:
        torch.set_num_threads(nthreads)
    # observables: f at ``times`` (n each), then the NTK's upper triangle at ``times``
    nt = len(times)
    nf = nt * n
    cf = np.full((T1, T1, n, n), np.nan)
    cf_se = np.full((T1, T1, n, n), np.nan)
    cf[np.ix_(tsel, tsel)] = cov[:nf, :nf].reshape(nt, n, nt, n).transpose(0, 2, 1, 3)
    cf_se[np.ix_(tsel, tsel)] = cov_se[:nf, :nf].reshape(nt, n, nt, n).transpose(0, 2, 1, 3)
    res = {"cov": cf, "pred_cov": np.ascontiguousarray(cf[idx_t, idx_t]),
           "pred_cov_se": np.ascontiguousarray(cf_se[idx_t, idx_t]),
           "residual": residual, "ntk_var": None, "ntk_var_se": None,
           "fixed_point_gap": gaps if adjoint == "causal" else None}
    if ntk:
        iu = np.triu_indices(n)
        v = np.diag(cov)[nf:].reshape(nt, iu[0].size)
        vs = np.diag(cov_se)[nf:].reshape(nt, iu[0].size)
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
