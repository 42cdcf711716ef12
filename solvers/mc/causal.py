"""One-pass causal Monte Carlo solver of the deep DMFT, in exact discrete time.

The discrete-time DMFT is causal across all layers. At step t, bottom-up, layer l needs only

    h^l(t)  = u^l(t) + gamma0 sum_{s<t} C^l(t, s) g^l(s),  C^l = A^{l-1} + lr tril_{-1}[Phi^{l-1} Delta]

with u^l(t) drawn from Phi^{l-1}(<=t, <=t), and A^{l-1}(t, <t), Phi^{l-1}(t, <=t) are estimated
from layer l-1 at the same t; then, top-down,

    z^l(t)  = r^l(t) + gamma0 sum_{s<=t} D^l(t, s) phi(h^l(s)),  D^l = B^l + lr tril_{-1}[G^{l+1} Delta]

with r^l(t) drawn from G^{l+1}(<=t, <=t), and B^l(t, <=t), G^{l+1}(t, <=t) estimated from layer
l+1 at the same t; g^l(t) = phi'(h^l(t)) z^l(t); finally f(t) = gamma0^{-1} <z^L(t) phi(h^L(t))>
and Delta(t) = y - f(t), first used at step t + 1. Every order parameter at time t is therefore
a function of the samples' fields at times <= t, and the fields at time t of the order
parameters at times <= t (and, within a step, of lower layers going up and upper layers going
down): the dependency graph over (t, pass, layer) is acyclic. Marching all samples and all
layers time-major and estimating each new kernel row, response row and f(t) from the
population as soon as it exists solves the self-consistency in one pass.

Sources are drawn causally: with Phi^{l-1} = F F^T the causal (time-major, block lower
triangular) Cholesky factor, u(t) = sum_{s<=t} F(t, s) xi(s), xi i.i.d. N(0, 1). The factor is
extended by one time block per step (:class:`CausalFactor`); its row block t depends on
Phi(<=t, <=t) only (the Cholesky factor of a leading block is the leading block of the factor).
An innovation whose variance, given all earlier variables, is below ``rtol`` times the
variable's own variance is dropped (the variable is then the regression on the earlier ones;
exactly so for the time-constant u^1, whose covariance has no innovations after t = 0).

Fixed-point property (the proof is the causality above, checked by a test): with common random
numbers xi, the alternating map of the iterative solver -- march every sample with the order
parameters q held fixed, re-estimate q -- restricted to times <= t depends on q at times <= t
only, and strictly so except for the within-step layer order. By induction over t (and over
layers within a step) its fixed point restricted to [0, t] is unique and equals the one-pass
values. ``tests/test_causal.py`` marches the one-pass sources with the iterative solver's
machinery (:func:`solvers.mc.march_layer`, :func:`solvers.mc.response_sums`) and the one-pass
order parameters, and recovers them to rounding.

Responses. A^l(t, s) = gamma0^{-1} <d phi(h^l(t)) / d r^l(s)> and B^{l-1}(t, s) =
gamma0^{-1} <d g^l(t) / d u^l(s)> by forward-mode tangents of the march, marched causally with
it on the first ``response_samples`` samples of each population: the h-part of each tangent
in the bottom-up pass, the z-part in the top-down pass. With the control variate (default) the
first-order terms C (.) <Lam1 Lam1^T>, D (.) <Lam1 Lam1^T> and gamma0^{-1} diag <Lam2> come
from all samples and the tangents give only the remainder (float32). For ReLU, B by Stein's
lemma in causally whitened sources (per row group, :class:`CausalFactor` with ``stein_rtol``),
accumulated row by row as g(t) appears.

Error bars. The samples form ``populations`` independent populations, each a complete one-pass
solution with its own order parameters and Delta; the result is their mean and the standard
error their spread / sqrt(populations). That includes the propagation of the sampling noise
through the layers, the sources and the self-consistency.

Training objectives (docs/theory.rst §7). C outputs, any loss, weight decay (toward the
initialisation or toward zero) and mini-batch schedules: :func:`_population_objective`, the
same march with an output index on the backward fields, memory weights a^(t-1-s) and the
initial-weight channel a^t (its docstring has the equations). The plain problem (one mse
output, full batch, no decay) keeps :func:`_population`, bit for bit.

Layout: per layer, fields are held time-major as (T1, n_points, S) with the sample axis last
(one time slice is a contiguous (n, S) matrix, the history up to t a contiguous ((t+1) n, S)
one), train and test points in separate arrays so that the memory terms, which have train
columns only, are single GEMMs. Kernels are flat (T1 n, T1 n) with index t n + mu.
"""
from __future__ import annotations

import numpy as np
from numba import njit
from scipy.linalg import solve_triangular

from ..activations import apply
from ..layout import CausalFactor, low_rank_factor
from ._common import _single_thread_blas
from .cost import estimate_flops, estimate_memory
from .responses import _lam, default_relu_eps

__all__ = ["CausalFactor", "solve_causal", "estimate_memory", "estimate_flops",
           "estimate_memory_outputs", "estimate_flops_outputs"]


def estimate_memory_outputs(T1, n, P, depth, samples_per_population, tangent_samples,
                            responses, stein, tangent_bytes=4, C=1) -> int:
    """:func:`solvers.mc.cost.estimate_memory` with C outputs (docs/theory.rst §7): the
    backward fields, G and its sources have n C rows per time, the r-tangents T1 P C
    directions per sample and P C g-rows, the u-tangents P C g-rows; C = 1 is that function.
    """
    if C == 1:
        return estimate_memory(T1, n, P, depth, samples_per_population, tangent_samples,
                               responses, stein, tangent_bytes)
    L, S, m = int(depth), int(samples_per_population), T1 * n
    fields = L * (2 * m * S + 2 * m * C * S + m * S * (1 + C) // 2) * 8
    tang = 0
    if responses and L >= 2:
        cols = T1 * P * int(tangent_samples)
        nr = L - 1
        nu = 0 if stein else L - 1
        tang = (nr * T1 * P * (1 + C) * C + nu * (T1 * n + T1 * P * C)) * cols * tangent_bytes
    kernels = L * (2 + 3 * C * C) * m * m * 8 * 3
    stein_b = (L - 1) * (n - P + 1) * T1 * (P + 1) * S * 8 if stein else 0
    return int(fields + tang + kernels + stein_b)


def estimate_flops_outputs(T1, n, P, depth, samples, tangent_samples, responses, C=1) -> float:
    """:func:`solvers.mc.cost.estimate_flops` with C outputs: the march and the G rows scale
    like C and C^2, the r-tangents like C^2 (T1 P C directions on P C rows), the u-tangents
    like C; C = 1 is that function."""
    if C == 1:
        return estimate_flops(T1, n, P, depth, samples, tangent_samples, responses)
    L = int(depth)
    march = L * samples * T1 ** 2 * (2 * n * P * C + (2 + 3 * C * C) * n * n)
    tang = 0.0
    if responses and L >= 2:
        tang = (L - 1) * tangent_samples * 4 * n * P * P * T1 ** 3 / 3 * (C * C + C)
    return float(march + tang)


@njit(cache=True)
def _add_with_square(acc, acc2, x):
    """acc += x and acc2 += x * x in one pass over flat arrays (the same float64 operations
    as numpy's, without the temporaries: the per-population sums of the two-time kernels
    are the largest arrays of the solve)."""
    for i in range(x.size):
        v = x[i]
        acc[i] += v
        acc2[i] += v * v


def _check_finite(name, a, t, layer):
    if not np.all(np.isfinite(a)):
        raise FloatingPointError(f"non-finite {name} in layer {layer} at step {t}; the fields "
                                 f"diverged (gamma0 or lr is too large)")


class _Layer:
    """State of one layer of one population (see the module docstring for the layout)."""

    def __init__(self, T1, n, P, S, Sr, *, r_sys, u_sys, stein, resp, cv, tdtype, src_rtol,
                 stein_rtol, C=1, phi=None, g=None):
        # C outputs (docs/theory.rst §7): backward fields and G over rows (mu, c), point-major
        Q = n - P
        m = T1 * n
        self.PH = np.zeros((T1, n, S))
        self.G = np.zeros((T1, n * C, S))
        self.Gtr = np.zeros((T1, P * C, S))           # train rows of g, for the memory GEMMs
        self.PHtr = np.zeros((T1, P, S))
        self.PHte = np.zeros((T1, Q, S)) if Q else None
        # the flat kernels may be views into the population's stacked (L, ...) results
        self.phi = np.zeros((m, m)) if phi is None else phi
        self.g = np.zeros((m * C, m * C)) if g is None else g
        # <Lam1 Lam1^T> over all samples and over the tangent samples (responses' control
        # variate and the closed-form test-test blocks of B)
        # (only its train columns and the test-test diagonal blocks are ever used)
        self.L1tr = np.zeros((T1, P, S)) if resp else None
        self.L1te = np.zeros((T1, Q, S)) if (resp and Q) else None
        self.psi = np.zeros((T1, n, T1, P)) if resp else None       # [t, mu, s, a]
        self.psi_r = np.zeros((T1, n, T1, P)) if cv else None
        self.psi_qq = np.zeros((T1, T1, Q)) if resp else None       # [t, s, q]
        self.fac_u = CausalFactor(m, src_rtol)
        self.fac_r = CausalFactor(m * C, src_rtol)
        self.xi_u = np.zeros((m, S // 2))
        self.xi_r = np.zeros((m * C, S // 2))
        self.r_sys, self.u_sys, self.stein = r_sys, u_sys, stein
        cols = T1 * P * Sr
        if r_sys:
            # directions (s, a, c, k): r_ac(s) of tangent sample k. Train rows are all that
            # later times need: C and D have train columns only, apart from D's test-test
            # blocks, which r-tangents of test rows reach only through test rows themselves
            self.rdphi = np.zeros((T1, P, cols * C), dtype=tdtype)
            self.rdg = np.zeros((T1, P * C, cols * C), dtype=tdtype)
        if u_sys:
            self.udphi = np.zeros((T1, P, cols), dtype=tdtype)
            self.udphi_te = np.zeros((T1, Q, cols), dtype=tdtype) if Q else None
            self.udg = np.zeros((T1, P * C, cols), dtype=tdtype)
        if stein:
            self.groups = []
            for q in [None] + list(range(P, n)):
                pts = np.arange(P) if q is None else np.append(np.arange(P), q)
                rows = np.arange(P) if q is None else np.array([q])
                self.groups.append({"pts": pts, "rows": rows,
                                    "fac": CausalFactor(T1 * len(pts), stein_rtol),
                                    "xi": np.zeros((T1 * len(pts), S))})


def _rows(cur, hist, t):
    """Kernel row block K(t, <=t) = cur hist[:t+1]^T / S as (n, (t+1) n') from a (n, S)
    current slice and a (T1, n', S) history."""
    S = cur.shape[1]
    return cur @ hist[:t + 1].reshape(-1, S).T / S


def _store_row(K, row, t, n):
    """Write row block t (n, (t+1) n) of a symmetric flat kernel and its transpose."""
    a, e = t * n, (t + 1) * n
    K[a:e, :e] = row
    K[:e, a:e] = row.T


def _draw(fac, xi_store, rng, n, half):
    """Normals for the innovations a factor just gained (n drawn per step, whatever is kept,
    so the stream does not depend on the keep decisions); returns the number in use."""
    xi = rng.standard_normal((n, half))
    new = fac.new
    if len(new):
        xi_store[fac.k - len(new):fac.k] = xi[new]
    return fac.k


def _top_D(delta, t, n, P, lr):
    """D^L(t, s) = lr Delta(s) 1[s < t] (G^{L+1} = 1, B^L = 0) as (n, t+1, n)."""
    D = np.zeros((n, t + 1, n))
    D[:, :t, :P] = lr * delta[None, :t, :]
    return D


def _stein_row(ly, Bl, phi_src, u, g, t, n, gamma0):
    """Row block t of B^{l-1} = gamma0^{-1} <dg^l / du^l> by Stein's lemma, per row group.

    In each group (the train rows with the train sources; each test point with the train
    sources and itself: test points are passive) the sources are whitened causally,
    u_g = F xi_g with F the causal factor of Phi^{l-1} on the group (:class:`CausalFactor`,
    innovations below ``stein_rtol`` of a variable's variance dropped). Stein's lemma in
    whitened coordinates, <g(t) xi^T> = <dg(t)/du_g> F, is exact for Gaussian u; g(t) does not
    depend on innovations of later times, so the row block is J(t) Lk^{-1} with J over the
    innovations up to t: causal, no pseudo-inverse, no regularisation.
    """
    S = u.shape[1]
    for grp in ly.groups:
        pts, rows, fac, xi = grp["pts"], grp["rows"], grp["fac"], grp["xi"]
        b = len(pts)
        cols = (np.arange(t + 1)[:, None] * n + pts[None, :]).reshape(-1)
        Frow = fac.extend(phi_src[np.ix_(t * n + pts, cols)])
        new, k = fac.new, fac.k
        k0 = k - len(new)
        if len(new):
            Fn = Frow[new]
            rhs = u[pts[new]] - Fn[:, :k0] @ xi[:k0]
            xi[k0:k] = solve_triangular(Fn[:, k0:k], rhs, lower=True, check_finite=False)
        J = g[rows] @ xi[:k].T / S
        X = solve_triangular(fac.Lk[:k, :k], J.T, lower=True, trans="T", check_finite=False).T
        piv = fac.piv[:k]
        flat = (piv // b) * n + pts[piv % b]
        Bl[np.ix_(t * n + rows, flat)] = X / gamma0


_SOBOL_CACHE: dict = {}


def _sobol_normals(d: int, count: int, rng) -> np.ndarray:
    """(count, d) normals from a randomly digitally shifted Sobol set: the first ``count``
    points of the (unscrambled) Sobol sequence, each coordinate's 30-bit integer XORed with an
    independent uniform random integer (a random digital shift: every point is uniform on
    [0, 1)^d and the set keeps its stratification), cell midpoints through the normal quantile
    (never 0 or 1). Unbiased; independent shifts give independent replicates (cheaper than
    Owen's scrambling; measurements: benchmarks/README.md)."""
    import warnings

    from scipy.special import ndtri
    from scipy.stats import qmc
    bits = 30
    key = (d, count)
    if key not in _SOBOL_CACHE:
        eng = qmc.Sobol(d, scramble=False, bits=bits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # balance is exact for powers of 2
            _SOBOL_CACHE[key] = np.round(eng.random(count) * 2.0 ** bits).astype(np.int64)
    shift = rng.integers(0, 2 ** bits, size=d, dtype=np.int64)
    x = (np.bitwise_xor(_SOBOL_CACHE[key], shift[None, :]) + 0.5) / 2.0 ** bits
    return ndtri(x)


def _population(kx, y, act, L, gamma0, lr, T, S, Sr, seed, *, responses, stein, cv, tdtype,
                eps, src_rtol, stein_rtol, divergence, record_sources, bar, sampler="sobol"):
    """One population of S samples (Sr of them with tangents) marched through all steps and
    layers; returns its own f, NTK, flat kernels and responses (and, with
    ``record_sources``, the sources u, r of every layer as (T1 n, S) arrays)."""
    n = kx.shape[0]
    P = y.shape[0]
    Q = n - P
    T1 = T + 1
    m = T1 * n
    half = S // 2
    rng = np.random.default_rng(seed)
    # the results are written in place into stacked arrays (no copy at the end)
    phi_all, g_all = np.zeros((L, m, m)), np.zeros((L, m, m))
    layers = [_Layer(T1, n, P, S, Sr, r_sys=responses and l <= L - 2,
                     u_sys=responses and l >= 1 and not stein,
                     stein=responses and l >= 1 and stein, resp=responses, cv=cv,
                     tdtype=tdtype, src_rtol=src_rtol, stein_rtol=stein_rtol,
                     phi=phi_all[l], g=g_all[l])
              for l in range(L)]
    # responses, flat (T1 n, T1 n): A[l] = A^{l+1}, B[l] = B^{l+1} (1-based layers)
    A_all, B_all = np.zeros((L - 1, m, m)), np.zeros((L - 1, m, m))
    A, B = list(A_all), list(B_all)
    # layer 1: u^1 constant in time, u = Fx xi with Fx the low-rank factor of Kx; with w(0)
    # these are rank(Kx) + 1 numbers per pair, drawn by randomised QMC (``sampler="sobol"``)
    Fx = low_rank_factor(kx)
    r1 = Fx.shape[1]
    if sampler == "sobol":
        z = _sobol_normals(r1 + 1, half, rng)
        xi1, w0h = z[:, :r1].T, z[:, r1].copy()
    else:
        xi1, w0h = rng.standard_normal((r1, half)), rng.standard_normal(half)
    u1 = np.repeat(Fx @ xi1, 2, axis=1)
    w0 = np.stack([w0h, -w0h], axis=1).reshape(-1)     # antithetic pairs (u, r), (u, -r)
    w = w0.copy()                                       # z^L(t) = w(t), one scalar per sample
    cols_all = T1 * P * Sr
    dw = np.zeros(cols_all, dtype=tdtype)               # u-tangents of w (top layer)
    f = np.zeros((T1, n))
    delta = np.zeros((T1, P))
    ntk = np.zeros((T1, n, n))
    tr = np.arange(P)
    te = np.arange(P, n)
    rec = {"u": [np.zeros((m, S)) for _ in range(L)],
           "r": [np.zeros((m, S)) for _ in range(L)]} if record_sources else None
    for t in range(T1):
        a, e = t * n, (t + 1) * n
        cz0, cz1 = t * P * Sr, (t + 1) * P * Sr          # tangent columns of directions < t, <= t
        # ------------- bottom-up: h^l(t), phi, Phi^l(t, <=t), A^l(t, <t), dh ---------------
        for l, ly in enumerate(layers):
            if l == 0:
                u = u1
                # C^1(t, s) = lr Delta(s) Kx for s < t (A^0 = 0)
                C3 = lr * kx[:, None, :P] * delta[None, :t, :]
            else:
                lo = layers[l - 1]
                Frow = ly.fac_u.extend(lo.phi[a:e, :e])
                k = _draw(ly.fac_u, ly.xi_u, rng, n, half)
                u = np.repeat(Frow @ ly.xi_u[:k], 2, axis=1)
                C3 = (A[l - 1][a:e, :a].reshape(n, t, n)[:, :, :P]
                      + lr * lo.phi[a:e, :a].reshape(n, t, n)[:, :, :P] * delta[None, :t, :])
            ly.C3 = C3
            Crow = np.ascontiguousarray(C3).reshape(n, t * P)
            if rec is not None:
                rec["u"][l][a:e] = u
            ly.u = u
            h = u + gamma0 * (Crow @ ly.Gtr[:t].reshape(t * P, S)) if t else u.copy()
            _check_finite("pre-activations", h, t, l + 1)
            ly.H = h
            ph = np.tanh(h) if act == "tanh" else apply(act, h, 0)
            ly.PH[t] = ph
            ly.PHtr[t] = ph[:P]
            if Q:
                ly.PHte[t] = ph[P:]
            ly.lam1 = (1.0 - ph * ph) if act == "tanh" else apply(act, h, 1)
            _store_row(ly.phi, _rows(ph, ly.PH, t), t, n)
            if responses:
                ly.L1tr[t] = ly.lam1[:P]
                ly.psi[t, :, :t + 1] = _rows(ly.lam1, ly.L1tr, t).reshape(n, t + 1, P)
                if cv:
                    ly.psi_r[t, :, :t + 1] = _rows(ly.lam1[:, :Sr], ly.L1tr[:, :, :Sr],
                                                   t).reshape(n, t + 1, P)
                if Q:
                    ly.L1te[t] = ly.lam1[P:]
                    ly.psi_qq[t, :t + 1] = np.einsum("qk,sqk->sq", ly.lam1[P:],
                                                     ly.L1te[:t + 1]) / S
            if ly.r_sys or ly.u_sys:
                Ct = Crow.astype(tdtype, copy=False)
                l1t = ly.lam1[:, :Sr].astype(tdtype, copy=False)
            if ly.r_sys:
                # dh(t)/dr(s), s < t: gamma0 C(t, <t) dg(<t)
                dh = np.zeros((n, cols_all), dtype=tdtype)
                if t:
                    dh[:, :cz0] = gamma0 * (Ct @ ly.rdg[:t].reshape(t * P, cols_all)[:, :cz0])
                ly.rdh = dh[:P]
                dphi = (dh[:, :cz0].reshape(n, -1, Sr) * l1t[:, None, :]).reshape(n, cz0)
                ly.rdphi[t, :, :cz0] = dphi[:P]
                if t:
                    Arow = dphi.reshape(n, t, P, Sr).sum(-1, dtype=np.float64) / (gamma0 * Sr)
                    if cv:
                        Arow += C3 * (ly.psi[t, :, :t] - ly.psi_r[t, :, :t])
                    A[l][a:e, :a].reshape(n, t, n)[:, :, :P] = Arow
            if ly.u_sys:
                # dh(t)/du(s), s <= t: direct term at s = t plus gamma0 C(t, <t) dg(<t)
                dh = np.zeros((n, cols_all), dtype=tdtype)
                if t:
                    dh[:, :cz0] = gamma0 * (Ct @ ly.udg[:t].reshape(t * P, cols_all)[:, :cz0])
                dh[:P, cz0:cz1].reshape(P, P, Sr)[tr, tr, :] += 1.0
                ly.udh = dh
                dphi = (dh[:, :cz1].reshape(n, -1, Sr) * l1t[:, None, :]).reshape(n, cz1)
                ly.udphi[t, :, :cz1] = dphi[:P]
                if Q:
                    ly.udphi_te[t, :, :cz1] = dphi[P:]
        # ------------- top-down: z^l(t), g, G^l(t, <=t), B^{l-1}(t, <=t), dz ----------------
        for l in reversed(range(L)):
            ly = layers[l]
            if l == L - 1:
                z = np.broadcast_to(w, (n, S))
                D4 = _top_D(delta, t, n, P, lr)
                if rec is not None:
                    rec["r"][l][a:e] = w0[None, :]
            else:
                up = layers[l + 1]
                Frow = ly.fac_r.extend(up.g[a:e, :e])
                k = _draw(ly.fac_r, ly.xi_r, rng, n, half)
                rh = Frow @ ly.xi_r[:k]
                r = np.empty((n, S))
                r[:, 0::2] = rh
                r[:, 1::2] = -rh
                if rec is not None:
                    rec["r"][l][a:e] = r
                # D(t, s) = B^l(t, s) + lr Delta(s) G^{l+1}(t, s) [s < t]
                D4 = B[l][a:e, :e].reshape(n, t + 1, n).copy()
                D4[:, :t, :P] += lr * up.g[a:e, :a].reshape(n, t, n)[:, :, :P] * delta[None, :t]
                Dtr = np.ascontiguousarray(D4[:, :, :P]).reshape(n, (t + 1) * P)
                z = r + gamma0 * (Dtr @ ly.PHtr[:t + 1].reshape((t + 1) * P, S))
                if Q:
                    # test-test diagonal blocks of B (a test point sees only itself)
                    Dqq = D4[te, :, te]                                  # (Q, t+1)
                    z[P:] += gamma0 * np.einsum("qs,sqk->qk", Dqq, ly.PHte[:t + 1])
            g = ly.lam1 * z
            _check_finite("backward fields", g, t, l + 1)
            ly.G[t] = g
            ly.Gtr[t] = g[:P]
            _store_row(ly.g, _rows(g, ly.G, t), t, n)
            if ly.r_sys or ly.u_sys:
                l1t = ly.lam1[:, :Sr].astype(tdtype, copy=False)
                # Lam2 = phi''(h) z: over all samples where B needs its average (u-system),
                # else over the tangent samples only
                k = S if ly.u_sys else Sr
                lam2 = _lam(act, ly.H[:, :k], z[:, :k], eps,
                            ly.PH[t][:, :k] if act == "tanh" else None)[1]
                l2t = lam2[:, :Sr].astype(tdtype, copy=False)
            if ly.r_sys:
                # dz(t)/dr(s), s <= t (train rows): direct term at s = t plus gamma0 D dphi
                Dt = Dtr[:P].astype(tdtype)
                dz = gamma0 * (Dt @ ly.rdphi[:t + 1].reshape((t + 1) * P, cols_all)[:, :cz1])
                if t < T:
                    dz[:, cz0:cz1].reshape(P, P, Sr)[tr, tr, :] += 1.0
                dg = (ly.rdh[:, :cz1].reshape(P, -1, Sr) * l2t[:P, None, :]
                      + dz.reshape(P, -1, Sr) * l1t[:P, None, :])
                ly.rdg[t, :, :cz1] = dg.reshape(P, cz1)
            if ly.u_sys:
                if l == L - 1:
                    # z^L = w: dz(t) = gamma0 lr sum_{s<t} Delta(s) . dphi_train(s)
                    dz = np.broadcast_to(dw[:cz1], (n, cz1))
                else:
                    Dt = Dtr.astype(tdtype)
                    dz = gamma0 * (Dt @ ly.udphi[:t + 1].reshape((t + 1) * P, cols_all)[:, :cz1])
                    if Q:
                        dz[P:] += gamma0 * np.einsum("qs,sqc->qc", Dqq.astype(tdtype),
                                                     ly.udphi_te[:t + 1, :, :cz1])
                dg = (ly.udh[:, :cz1].reshape(n, -1, Sr) * l2t[:, None, :]
                      + dz.reshape(n, -1, Sr) * l1t[:, None, :])
                ly.udg[t, :, :cz1] = dg[:P].reshape(P, cz1)
                Brow = dg.reshape(n, t + 1, P, Sr).sum(-1, dtype=np.float64) / (gamma0 * Sr)
                l2_all = lam2.mean(-1)
                if cv:
                    Brow += D4[:, :, :P] * (ly.psi[t, :, :t + 1] - ly.psi_r[t, :, :t + 1])
                    l2_r = lam2[:, :Sr].mean(-1)
                    Brow[tr, t, tr] += (l2_all[:P] - l2_r[:P]) / gamma0
                Bb = B[l - 1][a:e, :e].reshape(n, t + 1, n)
                Bb[:, :, :P] = Brow
                if Q:
                    # test sources: closed form over all samples (only their own point responds)
                    blockqq = D4[te, :, te] * ly.psi_qq[t, :t + 1].T      # (Q, t+1)
                    blockqq[:, t] += l2_all[P:] / gamma0
                    Bb[te, :, te] = blockqq
            if ly.stein:
                _stein_row(ly, B[l - 1], layers[l - 1].phi, ly.u, g, t, n, gamma0)
        # ------------- predictions, NTK, Delta(t) ---------------------------------------
        top = layers[L - 1]
        if responses:
            f[t] = (w[None, :] * top.PH[t]).mean(axis=1) / gamma0
        K = top.phi[a:e, a:e].copy()
        for l in range(L):
            K += layers[l].g[a:e, a:e] * (kx if l == 0 else layers[l - 1].phi[a:e, a:e])
        ntk[t] = K
        if not np.all(np.isfinite(f[t])) or np.abs(f[t]).max() > divergence:
            raise FloatingPointError(f"the predictions diverged at step {t} (|f| = "
                                     f"{np.abs(f[t]).max():.3g}); gamma0 or lr is too large")
        delta[t] = y - f[t, :P]
        if t < T:
            if not responses:
                # GIA: f(t+1) = f(t) + lr K(t) Delta(t) (the reading <w phi> needs A^{L-1})
                f[t + 1] = f[t] + lr * K[:, :P] @ delta[t]
            # z^L(t+1) = z^L(t) + gamma0 lr Delta(t) . phi_train(h^L(t))
            w = w + gamma0 * lr * (delta[t] @ top.PHtr[t])
            if top.u_sys:
                dw[:cz1] += (gamma0 * lr) * (delta[t].astype(tdtype) @ top.udphi[t, :, :cz1])
        if bar is not None:
            bar.update(1)
    out = {"f": f, "ntk": ntk, "phi": phi_all, "g": g_all,
           "A": A_all if (responses and L >= 2) else None,
           "B": B_all if (responses and L >= 2) else None}
    if rec is not None:
        out["sources"] = rec
    return out



def _stein_row_outputs(ly, Bl, phi_src, u, g, t, n, C, gamma0):
    """:func:`_stein_row` with C outputs: g (n C, S) with rows (mu, c) point-major, B^{l-1}
    flat (T1 n C, T1 n) with row t n C + mu C + c (docs/theory.rst §7)."""
    S = u.shape[1]
    g3 = g.reshape(n, C, S)
    for grp in ly.groups:
        pts, rows, fac, xi = grp["pts"], grp["rows"], grp["fac"], grp["xi"]
        b = len(pts)
        cols = (np.arange(t + 1)[:, None] * n + pts[None, :]).reshape(-1)
        Frow = fac.extend(phi_src[np.ix_(t * n + pts, cols)])
        new, k = fac.new, fac.k
        k0 = k - len(new)
        if len(new):
            Fn = Frow[new]
            rhs = u[pts[new]] - Fn[:, :k0] @ xi[:k0]
            xi[k0:k] = solve_triangular(Fn[:, k0:k], rhs, lower=True, check_finite=False)
        J = g3[rows].reshape(-1, S) @ xi[:k].T / S
        X = solve_triangular(fac.Lk[:k, :k], J.T, lower=True, trans="T", check_finite=False).T
        piv = fac.piv[:k]
        flat = (piv // b) * n + pts[piv % b]
        out_rows = (t * n * C + rows[:, None] * C + np.arange(C)[None, :]).reshape(-1)
        Bl[np.ix_(out_rows, flat)] = X / gamma0


def _population_objective(kx, obj, act, L, gamma0, lr, T, S, Sr, seed, *, responses, stein,
                          cv, tdtype, eps, src_rtol, stein_rtol, divergence, bar,
                          sampler="sobol"):
    """:func:`_population` for any training objective (docs/theory.rst §7): C outputs, any
    loss, weight decay, mini-batches (``obj``: :class:`solvers.objective.Objective`).

    With m(t, s) = a^(t-1-s) (:meth:`Objective.memory`) and iota(t) = a^t toward zero, else 1
    (:meth:`Objective.init_scale`, the initial-weight channel), per layer

        h_mu(t)    = iota(t) [u_mu(t) + gamma0 sum_{s<t} A^{l-1}_{mu,ac}(t,s) g_ac(s)]
                     + gamma0 lr sum_{s<t} m(t,s) Delta_ac(s) Phi^{l-1}_{mu a}(t,s) g_ac(s)
        z_mc(t)    = iota(t) [r_mc(t) + gamma0 sum_{s<=t} B^l_{mc,a}(t,s) phi(h_a(s))]
                     + gamma0 lr sum_{s<t} m(t,s) Delta_ac'(s) G^{l+1}_{mc,ac'}(t,s) phi(h_a(s))
        z^L_c(t)   = w_c(t) = iota(t) w_c(0) + gamma0 lr sum_{s<t} m(t,s) Delta_c(s) . phi(h^L(s))

    (sums over repeated indices: train points a, outputs c'), i.e. the plain march with the
    operators C(t, s) = iota(t) A(t, s) + lr m(t, s) Delta(s) Phi(t, s), D(t, s) = iota(t) B(t, s)
    + lr m(t, s) G(t, s) Delta(s) and sources iota(t) u, iota(t) r. A and B are derivatives in
    the raw sources u, r, so the tangents' direct terms are iota(s) and the control variates'
    first-order terms carry iota(s). Delta(t) = obj.delta(t, f(t)) (zero off-batch).

    Layout: the backward fields have rows (mu, c) point-major, so flat G is (T1 n C)^2 with
    index t n C + mu C + c, A^l is (T1 n, T1 n C), B^l (T1 n C, T1 n).
    """
    n = kx.shape[0]
    P, Cout = obj.P, obj.C
    Q = n - P
    T1 = T + 1
    m = T1 * n
    nC, PC, QC = n * Cout, P * Cout, Q * Cout
    mC = T1 * nC
    half = S // 2
    rng = np.random.default_rng(seed)
    iota = np.array([obj.init_scale(t) for t in range(T1)])
    phi_all, g_all = np.zeros((L, m, m)), np.zeros((L, mC, mC))
    layers = [_Layer(T1, n, P, S, Sr, r_sys=responses and l <= L - 2,
                     u_sys=responses and l >= 1 and not stein,
                     stein=responses and l >= 1 and stein, resp=responses, cv=cv,
                     tdtype=tdtype, src_rtol=src_rtol, stein_rtol=stein_rtol, C=Cout,
                     phi=phi_all[l], g=g_all[l])
              for l in range(L)]
    A_all, B_all = np.zeros((L - 1, m, mC)), np.zeros((L - 1, mC, m))
    A, B = list(A_all), list(B_all)
    Fx = low_rank_factor(kx)
    r1 = Fx.shape[1]
    if sampler == "sobol":
        z = _sobol_normals(r1 + Cout, half, rng)
        xi1, w0h = z[:, :r1].T, z[:, r1:].T.copy()                # w0h (C, half)
    else:
        xi1, w0h = rng.standard_normal((r1, half)), rng.standard_normal((Cout, half))
    u1 = np.repeat(Fx @ xi1, 2, axis=1)
    w0 = np.stack([w0h, -w0h], axis=2).reshape(Cout, S)        # antithetic pairs (u, +-r)
    wm = np.zeros((Cout, S))                # memory part of the readouts w_c(t)
    colsr = T1 * PC * Sr                    # r-tangent directions (s, a, c, k)
    colsu = T1 * P * Sr                     # u-tangent directions (s, a, k)
    dwm = np.zeros((Cout, colsu), dtype=tdtype)
    f = np.zeros((T1, n, Cout))
    delta = np.zeros((T1, P, Cout))
    ntk = np.zeros((T1, n, Cout, n, Cout))
    eyeC = np.eye(Cout)
    tr = np.arange(P)
    trc = np.arange(PC)
    te = np.arange(P, n)

    def lam2_of(ly, zz, k):
        """phi''(h) z over rows (mu, c) and the first k samples."""
        H = np.repeat(ly.H[:, :k], Cout, axis=0)
        PH = np.repeat(ly.PH[ly.t][:, :k], Cout, axis=0) if act == "tanh" else None
        return _lam(act, H, zz[:, :k], eps, PH)[1]

    for t in range(T1):
        a, e = t * n, (t + 1) * n
        ac, ec = t * nC, (t + 1) * nC
        it = iota[t]
        mw = obj.memory(t)                                   # (t,) a^(t-1-s)
        lrm = lr * mw
        cr0, cr1 = t * PC * Sr, (t + 1) * PC * Sr
        cu0, cu1 = t * P * Sr, (t + 1) * P * Sr
        # ------------- bottom-up: h^l(t), phi, Phi^l(t, <=t), A^l(t, <t), dh ---------------
        for l, ly in enumerate(layers):
            ly.t = t
            if l == 0:
                u = u1
                C3 = (lrm[None, :, None, None] * kx[:, None, :P, None]
                      * delta[None, :t, :, :])
            else:
                lo = layers[l - 1]
                Frow = ly.fac_u.extend(lo.phi[a:e, :e])
                k = _draw(ly.fac_u, ly.xi_u, rng, n, half)
                u = np.repeat(Frow @ ly.xi_u[:k], 2, axis=1)
                C3 = (it * A[l - 1][a:e, :t * nC].reshape(n, t, n, Cout)[:, :, :P, :]
                      + lrm[None, :, None, None]
                      * lo.phi[a:e, :a].reshape(n, t, n)[:, :, :P, None]
                      * delta[None, :t, :, :])
            Crow = np.ascontiguousarray(C3).reshape(n, t * PC)
            ly.u = u
            h = it * u
            if t:
                h = h + gamma0 * (Crow @ ly.Gtr[:t].reshape(t * PC, S))
            _check_finite("pre-activations", h, t, l + 1)
            ly.H = h
            ph = np.tanh(h) if act == "tanh" else apply(act, h, 0)
            ly.PH[t] = ph
            ly.PHtr[t] = ph[:P]
            if Q:
                ly.PHte[t] = ph[P:]
            ly.lam1 = (1.0 - ph * ph) if act == "tanh" else apply(act, h, 1)
            _store_row(ly.phi, _rows(ph, ly.PH, t), t, n)
            if responses:
                ly.L1tr[t] = ly.lam1[:P]
                ly.psi[t, :, :t + 1] = _rows(ly.lam1, ly.L1tr, t).reshape(n, t + 1, P)
                if cv:
                    ly.psi_r[t, :, :t + 1] = _rows(ly.lam1[:, :Sr], ly.L1tr[:, :, :Sr],
                                                   t).reshape(n, t + 1, P)
                if Q:
                    ly.L1te[t] = ly.lam1[P:]
                    ly.psi_qq[t, :t + 1] = np.einsum("qk,sqk->sq", ly.lam1[P:],
                                                     ly.L1te[:t + 1]) / S
            if ly.r_sys or ly.u_sys:
                Ct = Crow.astype(tdtype, copy=False)
                l1t = ly.lam1[:, :Sr].astype(tdtype, copy=False)
            if ly.r_sys:
                # dh(t)/dr_ac(s), s < t: gamma0 C(t, <t) dg(<t)
                dh = np.zeros((n, colsr), dtype=tdtype)
                if t:
                    dh[:, :cr0] = gamma0 * (Ct @ ly.rdg[:t].reshape(t * PC, colsr)[:, :cr0])
                ly.rdh = dh[:P]
                dphi = (dh[:, :cr0].reshape(n, -1, Sr) * l1t[:, None, :]).reshape(n, cr0)
                ly.rdphi[t, :, :cr0] = dphi[:P]
                if t:
                    Arow = (dphi.reshape(n, t, PC, Sr).sum(-1, dtype=np.float64)
                            / (gamma0 * Sr)).reshape(n, t, P, Cout)
                    if cv:
                        Arow += (C3 * iota[None, :t, None, None]
                                 * (ly.psi[t, :, :t] - ly.psi_r[t, :, :t])[..., None])
                    A[l][a:e, :t * nC].reshape(n, t, n, Cout)[:, :, :P, :] = Arow
            if ly.u_sys:
                # dh(t)/du_a(s), s <= t: direct term iota(t) at s = t plus gamma0 C dg(<t)
                dh = np.zeros((n, colsu), dtype=tdtype)
                if t:
                    dh[:, :cu0] = gamma0 * (Ct @ ly.udg[:t].reshape(t * PC, colsu)[:, :cu0])
                dh[:P, cu0:cu1].reshape(P, P, Sr)[tr, tr, :] += it
                ly.udh = dh
                dphi = (dh[:, :cu1].reshape(n, -1, Sr) * l1t[:, None, :]).reshape(n, cu1)
                ly.udphi[t, :, :cu1] = dphi[:P]
                if Q:
                    ly.udphi_te[t, :, :cu1] = dphi[P:]
        # ------------- top-down: z^l(t), g, G^l(t, <=t), B^{l-1}(t, <=t), dz ----------------
        for l in reversed(range(L)):
            ly = layers[l]
            if l == L - 1:
                w = it * w0 + wm                                        # (C, S)
                z = np.ascontiguousarray(np.broadcast_to(w[None], (n, Cout, S))).reshape(nC, S)
                # D^L_{mc, a}(t, s) = lr m(t, s) Delta_ac(s), s < t
                D4 = np.zeros((n, Cout, t + 1, n))
                D4[:, :, :t, :P] = (lrm[None, :, None] * delta[:t].transpose(2, 0, 1))[None]
                D4 = D4.reshape(nC, t + 1, n)
            else:
                up = layers[l + 1]
                Frow = ly.fac_r.extend(up.g[ac:ec, :ec])
                k = _draw(ly.fac_r, ly.xi_r, rng, nC, half)
                rh = Frow @ ly.xi_r[:k]
                r = np.empty((nC, S))
                r[:, 0::2] = rh
                r[:, 1::2] = -rh
                # D(t, s) = iota(t) B^l(t, s) + lr m(t, s) sum_c' G^{l+1}_{mc, ac'}(t, s)
                # Delta_ac'(s) [s < t]
                D4 = it * B[l][ac:ec, :e].reshape(nC, t + 1, n)
                mem = np.einsum("xsac,sac->xsa",
                                up.g[ac:ec, :t * nC].reshape(nC, t, n, Cout)[:, :, :P, :],
                                delta[:t]) * lrm[None, :, None]
                D4[:, :t, :P] += mem
                Dtr = np.ascontiguousarray(D4[:, :, :P]).reshape(nC, (t + 1) * P)
                z = it * r + gamma0 * (Dtr @ ly.PHtr[:t + 1].reshape((t + 1) * P, S))
                if Q:
                    # test-test diagonal blocks (a test point sees only itself)
                    Dqq = D4.reshape(n, Cout, t + 1, n)[te, :, :, te]       # (Q, C, t+1)
                    z[PC:] += gamma0 * np.einsum("qcs,sqk->qck", Dqq,
                                                 ly.PHte[:t + 1]).reshape(QC, S)
            l1 = np.repeat(ly.lam1, Cout, axis=0)                        # rows (mu, c)
            g = l1 * z
            _check_finite("backward fields", g, t, l + 1)
            ly.G[t] = g
            ly.Gtr[t] = g[:PC]
            _store_row(ly.g, _rows(g, ly.G, t), t, nC)
            if ly.r_sys or ly.u_sys:
                l1t = ly.lam1[:, :Sr].astype(tdtype, copy=False)
                k = S if ly.u_sys else Sr
                lam2 = lam2_of(ly, z, k)                                  # (n C, k)
                l2t = lam2[:, :Sr].astype(tdtype, copy=False)
            if ly.r_sys:
                # dz_mc(t)/dr_ac(s), s <= t (train rows): direct iota(t) at s = t plus
                # gamma0 D dphi
                Dt = Dtr[:PC].astype(tdtype)
                dz = gamma0 * (Dt @ ly.rdphi[:t + 1].reshape((t + 1) * P, colsr)[:, :cr1])
                if t < T:
                    dz[:, cr0:cr1].reshape(PC, PC, Sr)[trc, trc, :] += it
                dg = (ly.rdh[:, :cr1].reshape(P, 1, -1, Sr)
                      * l2t[:PC].reshape(P, Cout, 1, Sr)
                      + dz.reshape(P, Cout, -1, Sr) * l1t[:P, None, None, :])
                ly.rdg[t, :, :cr1] = dg.reshape(PC, cr1)
            if ly.u_sys:
                if l == L - 1:
                    dz = np.ascontiguousarray(np.broadcast_to(
                        dwm[None, :, :cu1], (n, Cout, cu1))).reshape(nC, cu1)
                else:
                    Dt = Dtr.astype(tdtype)
                    dz = gamma0 * (Dt @ ly.udphi[:t + 1].reshape((t + 1) * P, colsu)[:, :cu1])
                    if Q:
                        dz[PC:] += gamma0 * np.einsum(
                            "qcs,sqx->qcx", Dqq.astype(tdtype),
                            ly.udphi_te[:t + 1, :, :cu1]).reshape(QC, cu1)
                dg = (ly.udh[:, :cu1].reshape(n, 1, -1, Sr) * l2t.reshape(n, Cout, 1, Sr)
                      + dz.reshape(n, Cout, -1, Sr) * l1t[:, None, None, :])
                dg = dg.reshape(nC, cu1)
                ly.udg[t, :, :cu1] = dg[:PC]
                Brow = dg.reshape(nC, t + 1, P, Sr).sum(-1, dtype=np.float64) / (gamma0 * Sr)
                l2_all = lam2.mean(-1)
                if cv:
                    psi = np.repeat(ly.psi[t, :, :t + 1] - ly.psi_r[t, :, :t + 1], Cout, axis=0)
                    Brow += D4[:, :, :P] * iota[None, :t + 1, None] * psi
                    l2_r = lam2[:, :Sr].mean(-1)
                    Brow[:PC].reshape(P, Cout, t + 1, P)[tr, :, t, tr] += (
                        it * (l2_all[:PC] - l2_r[:PC]) / gamma0).reshape(P, Cout)
                Bb = B[l - 1][ac:ec, :e].reshape(nC, t + 1, n)
                Bb[:, :, :P] = Brow
                if Q:
                    # test sources: closed form over all samples (only their own point responds)
                    Dqq_l = D4.reshape(n, Cout, t + 1, n)[te, :, :, te]      # (Q, C, t+1)
                    blockqq = (Dqq_l * iota[None, None, :t + 1]
                               * ly.psi_qq[t, :t + 1].T[:, None, :])
                    blockqq[:, :, t] += it * l2_all[PC:].reshape(Q, Cout) / gamma0
                    Bb.reshape(n, Cout, t + 1, n)[te, :, :, te] = blockqq
            if ly.stein:
                _stein_row_outputs(ly, B[l - 1], layers[l - 1].phi, ly.u, g, t, n, Cout,
                                   gamma0)
        # ------------- predictions, NTK, Delta(t) ---------------------------------------
        top = layers[L - 1]
        if responses:
            f[t] = top.PH[t] @ w.T / (S * gamma0)
        K = top.phi[a:e, a:e][:, None, :, None] * eyeC[None, :, None, :]
        for l in range(L):
            lower = kx if l == 0 else layers[l - 1].phi[a:e, a:e]
            K = K + layers[l].g[ac:ec, ac:ec].reshape(n, Cout, n, Cout) * lower[:, None, :, None]
        ntk[t] = K
        if not np.all(np.isfinite(f[t])) or np.abs(f[t]).max() > divergence:
            raise FloatingPointError(f"the predictions diverged at step {t} (|f| = "
                                     f"{np.abs(f[t]).max():.3g}); gamma0 or lr is too large")
        if t < T:
            delta[t] = obj.delta(t, f[t])[:P]
            if not responses:
                # GIA: f(t+1) = f(t) + lr K(t) Delta(t) (no weight decay: refused upstream)
                f[t + 1] = f[t] + lr * np.einsum("xcad,ad->xc", K[:, :, :P, :], delta[t])
            # memory part of the readouts: w_m(t+1) = a w_m(t) + gamma0 lr Delta(t)^T phi(t)
            wm = obj.a * wm + gamma0 * lr * (delta[t].T @ top.PHtr[t])
            if top.u_sys:
                dwm[:, :cu1] = obj.a * dwm[:, :cu1] + (gamma0 * lr) * (
                    delta[t].T.astype(tdtype) @ top.udphi[t, :, :cu1])
        if bar is not None:
            bar.update(1)
    return {"f": f, "ntk": ntk, "phi": phi_all, "g": g_all,
            "A": A_all if (responses and L >= 2) else None,
            "B": B_all if (responses and L >= 2) else None}


def solve_causal(kx, y, activation: str, depth: int, gamma0: float, lr: float, steps: int, *,
                 samples: int, seed, populations: int = 8, responses: bool = True,
                 response_samples: int = 128, b_estimator: str = "auto",
                 response_cv: bool = True, relu_eps: float | None = None,
                 src_rtol: float = 1e-6, stein_rtol: float = 1e-6, divergence: float = 1e8,
                 sampler: str = "sobol", max_memory: float | None = None,
                 flop_rate: float = 10e9, record_sources: bool = False, logger=None,
                 bar=None, state: dict | None = None, on_population=None,
                 objective=None) -> dict:
    """One-pass solution of the deep DMFT by ``populations`` independent causal marches.

    Parameters
    ----------
    kx : (n, n) input kernel; y : (P,) train targets; activation, depth (L >= 2), gamma0, lr,
    steps : problem.
    samples : total samples (rounded to ``populations`` times an even number).
    seed : SeedSequence (or int); population p uses ``seed.spawn(populations)[p]``.
    responses : False for the gradient-independence ansatz (A = B = 0, predictions by
        f(t+1) = f(t) + lr K(t) Delta(t)).
    response_samples : total tangent samples (split equally over the populations).
    b_estimator : "auto" (Stein for relu, tangents otherwise), "tangent" or "stein".
    response_cv : control variate of the tangent responses (float32 tangents).
    state, on_population : checkpoint hook. After each finished population
        ``on_population(state)`` is called with ``state = {"next": p + 1, "acc": {...},
        "acc2": {...}}``, the running sums over populations 0..p of each result and of its
        square (arrays that are updated in place afterwards: save them before returning).
        Passing such a state back as ``state`` resumes with population ``state["next"]``:
        the sums are copied, the finished populations skipped, the others drawn from their own
        (unchanged) seeds, so the result is bit-identical to an uninterrupted solve. Not with
        ``record_sources``.
    objective : :class:`solvers.objective.Objective` or None
        The training objective (docs/theory.rst §7: C outputs, loss, weight decay, batches).
        None or a plain one (mse, one output, full batch, no decay) marches the original
        problem with targets ``y`` (bit-identical to earlier versions); otherwise ``y`` is
        ignored and :func:`_population_objective` marches ``objective``. Then ``f``
        is (T1, n, C), ``ntk`` (T1, n, C, n, C), flat ``g`` (L, T1 n C, T1 n C) (index
        t n C + mu C + c), ``A`` (L-1, T1 n, T1 n C), ``B`` (L-1, T1 n C, T1 n).
    max_memory : bytes a population may use (:func:`estimate_memory`); a larger solve is
        refused with a ValueError before any work (None: no check). The estimate and a flop
        count (:func:`estimate_flops`, a time at ``flop_rate``) are logged.
    sampler : "sobol" (default): the first layer's sources and the readouts w(0), rank(Kx) + 1
        numbers per antithetic pair, by randomised quasi-Monte Carlo (one scrambled Sobol set
        per population); "random": i.i.d. normals. The deeper sources are always i.i.d.

    Returns
    -------
    dict with ``f`` (T1, n), ``ntk`` (T1, n, n), flat ``phi``, ``g`` (L, T1 n, T1 n), ``A``,
    ``B`` (L-1, T1 n, T1 n) or None: the population means; ``f_se``, ``ntk_se``, ``phi_se``,
    ``g_se``: standard errors of the means (spread over populations / sqrt(populations); zero
    for one population); ``samples``, ``response_samples``, ``populations``, ``relu_eps``,
    ``b_estimator``, ``memory_bytes``.
    """
    L = int(depth)
    n = kx.shape[0]
    general = objective is not None and not objective.plain
    if general:
        if record_sources:
            raise ValueError("record_sources is for the plain problem (one mse output, full "
                             "batch, no weight decay); drop record_sources")
        if not responses and objective.decays:
            raise ValueError(
                "the gradient-independence ansatz (responses=False) reads the predictions "
                "from f(t+1) = f(t) + lr K(t) Delta(t), which has no weight-decay term; use "
                "the full solver (method='mc') for weight_decay > 0")
        P, Cout = objective.P, objective.C
    else:
        if objective is not None:
            y = objective.Y[:, 0]
        P, Cout = y.shape[0], 1
    T1 = steps + 1
    R = max(1, int(populations))
    Sp = max(2, 2 * (int(samples) // (2 * R)))
    Srp = 0
    if responses:
        Srp = max(1, min(Sp, -(-int(response_samples) // R)))
    if b_estimator == "auto":
        b_estimator = "stein" if activation == "relu" else "tangent"
    stein = responses and b_estimator == "stein"
    cv = bool(response_cv) and responses
    tdtype = np.float32 if cv else np.float64
    eps = default_relu_eps(max(Srp * R, 2048)) if relu_eps is None else float(relu_eps)
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    mem = estimate_memory_outputs(T1, n, P, L, Sp, Srp, responses, stein,
                                  4 if tdtype == np.float32 else 8, Cout)
    flops = R * estimate_flops_outputs(T1, n, P, L, Sp, Srp, responses, Cout)
    if logger is not None:
        logger.info("mc one-pass: %d populations x %d samples (%d tangent), %d steps: "
                    "~%.2g GFlop (~%.0f s at %.0f GFlop/s), %.3g GB per population%s", R, Sp,
                    Srp, steps, flops / 1e9, flops / flop_rate, flop_rate / 1e9, mem / 1e9,
                    "" if max_memory is None else f" (limit {max_memory / 1e9:.3g} GB)")
    if max_memory is not None and mem > max_memory:
        raise ValueError(
            f"the one-pass solve needs ~{mem / 2**30:.3g} GiB per replicate but "
            f"{max_memory / 2**30:.3g} GiB are available (max_memory_gb or 80% of free "
            f"memory); raise replicates (memory ~ samples / replicates x T n, and "
            f"~ response_samples / replicates x T^2 P n for the tangents) or lower samples")
    keys = ("f", "ntk", "phi", "g", "A", "B")
    acc, acc2 = {}, {}                     # running sums over populations (no R-fold stack)
    pops = []
    p0 = 0
    if state is not None:
        if record_sources:
            raise ValueError("state (resume) and record_sources exclude each other")
        p0 = int(state["next"])
        if not 1 <= p0 <= R:
            raise ValueError(f"state['next'] = {p0} is not a population index in 1..{R}")
        acc = {k: np.array(v, dtype=np.float64) for k, v in state["acc"].items()}
        acc2 = {k: np.array(v, dtype=np.float64) for k, v in state["acc2"].items()}
        if bar is not None:
            bar.update(p0 * T1)
        if logger is not None:
            logger.info("mc one-pass: resumed at population %d/%d", p0 + 1, R)
    with _single_thread_blas():
        for p, sp in enumerate(ss.spawn(R) if R > 1 else [ss]):
            if p < p0:
                continue
            if general:
                o = _population_objective(
                    kx, objective, activation, L, gamma0, lr, steps, Sp, Srp, sp,
                    responses=responses, stein=stein, cv=cv, tdtype=tdtype, eps=eps,
                    src_rtol=src_rtol, stein_rtol=stein_rtol, divergence=divergence, bar=bar,
                    sampler=sampler)
            else:
                o = _population(kx, y, activation, L, gamma0, lr, steps, Sp, Srp, sp,
                                responses=responses, stein=stein, cv=cv, tdtype=tdtype,
                                eps=eps, src_rtol=src_rtol, stein_rtol=stein_rtol,
                                divergence=divergence, record_sources=record_sources, bar=bar,
                                sampler=sampler)
            for key in keys:
                if o[key] is None:
                    continue
                if p == 0:
                    acc[key] = o[key].copy()
                    if key in ("f", "ntk", "phi", "g"):
                        acc2[key] = o[key] * o[key]
                elif key in acc2:
                    _add_with_square(acc[key].reshape(-1), acc2[key].reshape(-1),
                                     o[key].reshape(-1))
                else:
                    acc[key] += o[key]
            if record_sources:
                pops.append(o)
            if logger is not None:
                logger.info("mc population %d/%d: f(T) rms %.4g", p + 1, R,
                            float(np.sqrt(np.mean(o["f"][-1] ** 2))))
            del o
            if on_population is not None:
                on_population({"next": p + 1, "acc": acc, "acc2": acc2})
    res = {}
    for key in keys:
        if key not in acc:
            res[key] = None
            continue
        mean = acc.pop(key) / R
        res[key] = mean
        if key in acc2:
            if R > 1:
                var = np.maximum(acc2.pop(key) / R - mean * mean, 0.0) * (R / (R - 1))
                res[key + "_se"] = np.sqrt(var / R)
            else:
                res[key + "_se"] = np.zeros_like(mean)
    if record_sources:
        res["sources"] = [o["sources"] for o in pops]
        res["population_results"] = pops
    res.update(samples=Sp * R, response_samples=Srp * R, populations=R,
               relu_eps=eps if activation == "relu" else None, b_estimator=b_estimator,
               memory_bytes=mem)
    return res

