"""O(1/N) propagator of two-layer networks around a given infinite-width Delta (docs/theory.rst §5).

Propagator
----------
At width N, f = <O>(Delta_N) + eps / sqrt(N) with Delta_N = y - f on the training points, so to
first order (I + J E) delta f = eps / sqrt(N), J = d<O>/dDelta (causal: O(t) depends on
Delta(s < t)), E the restriction to training points at times 0 .. T-1 with the sign of
delta Delta = -E delta f. Likewise delta K = eps_K / sqrt(N) - J_K E delta f. Hence

    N Cov(f)  = (I + J E)^{-1} kappa_O (I + J E)^{-T}                (two-time, all points)

and the same for the stacked vector (O, k). It is evaluated through per-sample *influence
vectors*: for a sample with centred observables e = O - <O>, q = k - <k>,

    U   = (I + E J)^{-1} E e          (unit lower triangular solve, size P T)
    psi_f = e - J U,     psi_k = q - J_K U

and N Cov = average of psi psi^T. J and J_K are sample averages of forward-mode tangents of the
march (:mod:`solvers.fluct.two_layer`; directions Delta_a(s)), accumulated with BLAS over
chunks of samples. Monte Carlo errors come from batch means: the samples are split into
blocks, each block gives an independent estimate (its own J, J_K, means), and the standard
error is the spread of the block estimates over sqrt(blocks). The reported value uses all
samples at once (:func:`solvers.fluct.influence.batch_means_propagator`).

This module holds the every-step engine for one squared-error output. Its siblings: the
selected-times engine in adjoint form (:mod:`solvers.fluct.propagator_times`, issue 21;
:func:`two_layer_propagator_times`, :func:`draw_units_sobol` and
:func:`accumulate_response_times` are importable from here too) and the engine for C outputs,
any loss, weight decay and batches (:mod:`solvers.fluct.propagator_objective`).
"""
from __future__ import annotations

import numpy as np
from numba import prange
from scipy.linalg import solve_triangular

from .._jit import njit
from ..activations import apply, code as _act_code, ddphi as _ddphi, dphi as _dphi, phi as _phi
from .influence import batch_means_propagator, default_chunk, finite_result
from .propagator_times import (accumulate_response_times, draw_units_sobol,
                               two_layer_propagator_times)
from .two_layer import march, triu_index, unit_observables

__all__ = ["accumulate_response", "accumulate_response_jit", "influence_moments",
           "default_chunk", "two_layer_propagator", "two_layer_propagator_times",
           "accumulate_response_times", "draw_units_sobol"]


def _ntk_tangent(X, Y, kij, iu):
    """Tangents of the per-unit NTK entries ``iu`` = (i, j), (d, m), from the direction-major
    sums X = sum_c dg g^T, Y = sum_c dphi phi^T (d, n, n): kx_ij (X_ij + X_ji) + Y_ij + Y_ji."""
    i, j = iu
    return kij * (X[:, i, j] + X[:, j, i]) + Y[:, i, j] + Y[:, j, i]


def accumulate_response(activation, h, w, kx, delta, c, gamma0, JO, Jk=None, iu=None):
    """Add the forward-mode tangents of a chunk of samples to the response sums.

    The tangent directions are the P T error-signal entries Delta_a(s), s = 0 .. T-1, in the
    order d = s P + a. Each sample's state tangents Vh = dh/dDelta (n, P T) and
    Vw = dw/dDelta (P T,) follow the linearised march; Delta(s) first enters the state at
    s + 1 (causality), so only the first t P directions are active at time t.

    Parameters
    ----------
    h : array (C, T+1, n); w : array (C, T+1)
        The chunk's marched fields (:func:`march`).
    kx : (n, n); delta : (T, P); c : lr * gamma0
    JO : array (T+1, n, P T)
        Sum over samples of dO_mu(t) / dDelta_a(s) (updated in place).
    Jk : array (T+1, m, P T), optional
        Sum over samples of dk_{mu nu}(t) / dDelta_a(s) for the entries ``iu`` (in place).
    """
    C, T1, n = h.shape
    T, P = delta.shape
    p = T * P
    iu = triu_index(n) if iu is None else iu
    kxP = kx[:, :P]
    Vh = np.zeros((C, n, p))
    Vw = np.zeros((C, p))
    for t in range(T):
        ht = h[:, t, :P]
        wt = w[:, t]
        a = apply(activation, ht, 1)
        act = t * P
        if act:
            b = apply(activation, ht, 2)
            VhP = Vh[:, :P, :act]
            # Z_{c,al,d} = Delta_al (phi'(h_al) dw_d + w phi''(h_al) dh_{al,d}): both tangent
            # updates read the old state, so Z and dVw are formed before either is applied
            Z = (delta[t] * a)[:, :, None] * Vw[:, None, :act] \
                + (delta[t] * b * wt[:, None])[:, :, None] * VhP
            dVw = np.einsum("ca,cad->cd", delta[t] * a, VhP)
            Vh[:, :, :act] += c * np.matmul(kxP, Z)
            Vw[:, :act] += c * dVw
        # new directions: Delta(t) enters the state at t + 1
        Vh[:, :, act:act + P] = c * kxP[None, :, :] * (wt[:, None] * a)[:, None, :]
        Vw[:, act:act + P] = c * apply(activation, ht, 0)
        act1 = act + P
        h1 = h[:, t + 1]
        w1 = w[:, t + 1]
        ph1 = apply(activation, h1, 0)
        dph1 = apply(activation, h1, 1)
        Vh1 = Vh[:, :, :act1]
        Vw1 = Vw[:, None, :act1]
        dph_tan = dph1[:, :, None] * Vh1                     # d phi(h_mu) / dDelta
        JO[t + 1, :, :act1] += (ph1[:, :, None] * Vw1 + w1[:, None, None] * dph_tan).sum(0) \
            / gamma0
        if Jk is not None:
            g1 = dph1 * w1[:, None]
            dg = (apply(activation, h1, 2) * w1[:, None])[:, :, None] * Vh1 + dph1[:, :, None] * Vw1
            # sum_c dg_{c mu d} g_{c nu} as one GEMM: (mu, d, nu)
            X = np.tensordot(dg, g1, axes=([0], [0]))
            Y = np.tensordot(dph_tan, ph1, axes=([0], [0]))
            Jk[t + 1, :, :act1] += _ntk_tangent(np.moveaxis(X, 1, 0), np.moveaxis(Y, 1, 0),
                                                kx[iu], iu).T


@njit(parallel=True)
def _tangent_step_kernel(act, t, P, h0, w0, h1, w1, kx, delta_t, c, Vb, Vw, dh, dph, dg):
    """One step of the forward-mode tangents of a chunk (see :func:`accumulate_response_jit`).

    Vb (C, p, P), Vw (C, p): tangents of beta and w (h = u + kx[:, :P] beta) in the directions
    d = s P + a; on entry they hold time t, on exit t + 1 (the P new directions of Delta(t)
    included). dh (C, p, n): the tangents of h = kx[:, :P] Vb, read at time t for the training
    points and rewritten at t + 1 (so the P x P product is never done twice). dph, dg
    (C, p, n): written for the active directions d < (t+1) P with d phi(h_mu(t+1)) and
    d g_mu(t+1) (g = phi'(h) w).
    """
    C = h0.shape[0]
    n = kx.shape[0]
    act0 = t * P
    act1 = act0 + P
    # samples are independent: threads over the chunk, each writing only its own rows, so
    # the result does not depend on the number of threads
    for ci in prange(C):
        a = np.empty(P)     # Delta phi'(h)
        b = np.empty(P)     # Delta w phi''(h)
        d1 = np.empty(n)
        d2 = np.empty(n)
        w = w0[ci]
        for al in range(P):
            x = h0[ci, al]
            a[al] = delta_t[al] * _dphi(act, x)
            b[al] = delta_t[al] * w * _ddphi(act, x)
        for d in range(act0):
            vw = Vw[ci, d]
            dw = 0.0
            for al in range(P):
                dht = dh[ci, d, al]
                dw += a[al] * dht
                Vb[ci, d, al] += c * (b[al] * dht + a[al] * vw)
            Vw[ci, d] = vw + c * dw
        for al in range(P):
            x = h0[ci, al]
            d = act0 + al
            for ga in range(P):
                Vb[ci, d, ga] = 0.0
            Vb[ci, d, al] = c * w * _dphi(act, x)
            Vw[ci, d] = c * _phi(act, x)
        w = w1[ci]
        for mu in range(n):
            x = h1[ci, mu]
            d1[mu] = _dphi(act, x)
            d2[mu] = w * _ddphi(act, x)
        for d in range(act1):
            vw = Vw[ci, d]
            for mu in range(n):
                acc = 0.0
                for ga in range(P):
                    acc += kx[mu, ga] * Vb[ci, d, ga]
                dh[ci, d, mu] = acc
                dph[ci, d, mu] = d1[mu] * acc
                dg[ci, d, mu] = d2[mu] * acc + d1[mu] * vw


def accumulate_response_jit(activation, h, w, kx, delta, c, gamma0, JO, Jk=None, iu=None,
                            work=None):
    """Fast path of :func:`accumulate_response` (same sums; tests compare the two).

    The tangent march runs in a Numba kernel in the reduced state (beta, w), P + 1 numbers
    per direction (h = u + kx[:, :P] beta, so test points cost nothing there); the sums over
    samples are BLAS products over the chunk axis.

    Parameters
    ----------
    JO : array (T+1, P T, n)
        Sum over samples of dO_mu(t) / dDelta_d, *direction-major* layout (in place).
    Jk : array (T+1, P T, m), optional
        Same for the NTK entries ``iu``.
    work : dict, optional
        Scratch buffers reused between calls with the same chunk size.
    """
    C, T1, n = h.shape
    T, P = delta.shape
    p = T * P
    iu = triu_index(n) if iu is None else iu
    code = _act_code(activation)
    if work is None or work["Vb"].shape[0] != C:
        work = {"Vb": np.empty((C, p, P)), "Vw": np.empty((C, p)), "dh": np.empty((C, p, n)),
                "dph": np.empty((C, p, n)), "dg": np.empty((C, p, n))}
    Vb, Vw, dh, dph, dg = work["Vb"], work["Vw"], work["dh"], work["dph"], work["dg"]
    kxc = np.ascontiguousarray(kx)
    kij = kx[iu]
    for t in range(T):
        _tangent_step_kernel(code, t, P, h[:, t], w[:, t], h[:, t + 1], w[:, t + 1], kxc,
                             np.ascontiguousarray(delta[t]), c, Vb, Vw, dh, dph, dg)
        a1 = (t + 1) * P
        h1 = h[:, t + 1]
        w1 = w[:, t + 1]
        ph1 = apply(activation, h1, 0)
        dph2 = dph[:, :a1].reshape(C, a1 * n)
        JO[t + 1, :a1] += (Vw[:, :a1].T @ ph1 + (w1 @ dph2).reshape(a1, n)) / gamma0
        if Jk is not None:
            g1 = apply(activation, h1, 1) * w1[:, None]
            X = (dg[:, :a1].reshape(C, a1 * n).T @ g1).reshape(a1, n, n)
            Y = (dph2.T @ ph1).reshape(a1, n, n)
            Jk[t + 1, :a1] += _ntk_tangent(X, Y, kij, iu)
    return work


def influence_moments(O, k, mean_O, mean_k, JO, Jk, solve_matrix, out_ff, out_kk):
    """Accumulate sum psi_f psi_f^T and sum psi_k^2 over a chunk (module docstring).

    Parameters
    ----------
    O : (C, T+1, n); k : (C, T+1, m) or None
    mean_O, mean_k : their population means
    JO : (T+1, n, P T) mean response; Jk : (T+1, m, P T) or None
    solve_matrix : (P T, P T)
        I + E J, unit lower triangular.
    out_ff : ((T+1) n, (T+1) n); out_kk : ((T+1) m,)  (updated in place)
    """
    C, T1, n = O.shape
    p = JO.shape[2]
    P = p // (T1 - 1)
    e = (O - mean_O).reshape(C, T1 * n)
    eE = (O[:, :T1 - 1, :P] - mean_O[:T1 - 1, :P]).reshape(C, p)
    U = solve_triangular(solve_matrix, eE.T, lower=True, unit_diagonal=True,
                         check_finite=False)                       # (p, C)
    psi = e - (JO.reshape(T1 * n, p) @ U).T
    out_ff += psi.T @ psi
    if k is not None:
        m = k.shape[2]
        psik = (k - mean_k).reshape(C, T1 * m) - (Jk.reshape(T1 * m, p) @ U).T
        out_kk += np.einsum("ci,ci->i", psik, psik)



def _solve_matrix(JO):
    T1, n, p = JO.shape
    P = p // (T1 - 1)
    EJ = JO[:T1 - 1, :P, :].reshape(p, p)
    return np.eye(p) + EJ


def two_layer_propagator(activation, u, w0, kx, delta, gamma0, lr, **options):
    """O(1/N) propagator of a two-layer network around a given infinite-width Delta(t).

    See :func:`_two_layer_propagator` for the parameters. Overflow inside the tangent march
    (a diverging linearisation) is reported as one FloatingPointError, not NumPy warnings.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        res = _two_layer_propagator(activation, u, w0, kx, delta, gamma0, lr, **options)
    return finite_result(res, ("cov", "response", "ntk_var"))


def _two_layer_propagator(activation, u, w0, kx, delta, gamma0, lr, *, center=False,
                          blocks=10, chunk=None, ntk=True, progress=None, engine="jit"):
    """O(1/N) propagator of a two-layer network around a given infinite-width Delta(t).

    Parameters
    ----------
    activation : str
        Smooth activation ("linear", "tanh", "erf"): the tangents need phi''.
    u : (S, n); w0 : (S,)
        Single-site samples (:func:`draw_units`).
    kx : (n, n); delta : (T, P)
        Input kernel and the infinite-width error signal at t = 0 .. T-1 (centred predictions
        when ``center``).
    gamma0, lr : float
    center : bool
        Per-unit observable O(t) - O(0) (the centred model f - f(theta_0)).
    blocks : int
        Number of batch-means blocks (>= 2) for the standard errors.
    chunk : int, optional
        Samples per BLAS chunk (memory ~ chunk P T (P + 1 + 3 n) floats); default
        :func:`default_chunk`.
    ntk : bool
        Also propagate the per-unit NTK (memory (T+1) n (n+1)/2 P T floats, twice).
    progress : callable, optional
        Called with the number of samples just processed (for progress bars).
    engine : {"jit", "numpy"}
        Tangent march in Numba (:func:`accumulate_response_jit`) or the plain NumPy reference
        (:func:`accumulate_response`); identical results up to rounding.

    Returns
    -------
    dict with ``cov`` (T+1, T+1, n, n) two-time N Cov(f(t), f(s)); ``pred_cov`` (T+1, n, n)
    its equal-time part; ``ntk_var`` (T+1, n, n) N Var of each NTK entry (or None);
    ``pred_cov_stderr``, ``ntk_var_stderr`` (batch means); ``response`` (T+1, n, T, P)
    J = d<O>/dDelta; ``kappa`` (T+1, n, n) equal-time single-site Cov(O);
    ``block_pred_cov`` (blocks, T+1, n, n).

    Raises
    ------
    FloatingPointError
        Non-finite fields or covariances.
    """
    S, n = u.shape
    T, P = delta.shape
    T1 = T + 1
    p = T * P
    c = lr * gamma0
    if chunk is None:
        chunk = default_chunk(n, P, T)
    iu = triu_index(n)

    def fields(lo, hi):
        h, w = march(activation, u[lo:hi], w0[lo:hi], kx, delta, c)
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(w))):
            raise FloatingPointError("the single-site fields diverged; reduce lr or gamma0")
        O, k = unit_observables(activation, h, w, kx, gamma0, center, iu)
        return h, w, O, (k if ntk else None)

    work = None

    def accumulate(h, w, JO, Jk):
        nonlocal work
        if engine == "numpy":
            accumulate_response(activation, h, w, kx, delta, c, gamma0, JO, Jk, iu)
        else:
            work = accumulate_response_jit(activation, h, w, kx, delta, c, gamma0, JO, Jk, iu,
                                           work)

    res = batch_means_propagator(fields, accumulate, _solve_matrix, influence_moments,
                                 samples=S, shape=(T1, n, p), iu=iu, blocks=blocks, chunk=chunk,
                                 ntk=ntk, direction_major=engine != "numpy", progress=progress)
    res["response"] = res["response"].reshape(T1, n, T, P)
    if not np.all(np.isfinite(res["cov"])):
        raise FloatingPointError("non-finite propagator (the linearised dynamics diverged)")
    return res
