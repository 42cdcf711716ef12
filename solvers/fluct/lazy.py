"""Finite-width fluctuations in the lazy limit (gamma0 -> 0), discrete time (docs/theory.rst §5).

For gamma0 -> 0 the kernel is frozen at its random initial value K = K_inf + delta K / sqrt(N)
and the dynamics f(t+1) = f(t) + lr K Delta(t) is linear, so

    delta f(t+1) = delta f(t) - lr K_inf[:, train] delta f_train(t) + lr delta K[:, train] Delta_inf(t)

with delta f(0) (N Cov = kappa_f0 = Phi^1 / gamma0^2, absent for the centred model) independent
of delta K (N Cov = kappa_K, a four-index tensor). :func:`lazy_propagator` propagates the response
matrices of these two sources; no sampling is needed once the moments are known (closed form for
linear networks, :func:`linear_lazy_moments`; sampled otherwise, :func:`sampled_lazy_moments`).
"""
from __future__ import annotations

import numpy as np

from ..activations import apply

__all__ = ["linear_lazy_moments", "sampled_lazy_moments", "lazy_propagator", "lazy_delta"]


def linear_lazy_moments(kx, gamma0=None):
    """Exact single-site moments of a two-layer *linear* network at initialisation.

    Returns
    -------
    kappa_f0 : (n, n) or None
        N Cov f(0) = Phi^1 / gamma0^2 = kx / gamma0^2 (None when gamma0 is None).
    kappa_K : (n, n, n, n)
        N Cov(K_{mu nu}, K_{al be}) for k = kx w^2 + u u^T (Isserlis, E w^4 = 3):
        2 kx_{mu nu} kx_{al be} + kx_{mu al} kx_{nu be} + kx_{mu be} kx_{nu al}.
    """
    kK = 2.0 * np.einsum("ij,kl->ijkl", kx, kx) + np.einsum("ik,jl->ijkl", kx, kx) \
        + np.einsum("il,jk->ijkl", kx, kx)
    kf = None if gamma0 is None else kx / gamma0 ** 2
    return kf, kK


def sampled_lazy_moments(activation, u, w0, kx, gamma0=None, blocks=10):
    """Sampled single-site moments at initialisation (any activation, ReLU included).

    Returns
    -------
    dict with ``kappa_f0`` (n, n) or None, ``kappa_K`` (n, n, n, n), ``mean_K`` (n, n), and
    ``blocks``: a list of per-block dicts with the same keys (for batch-means errors).
    """
    n = u.shape[1]

    def moments(uu, ww):
        ph = apply(activation, uu, 0)
        g = apply(activation, uu, 1) * ww[:, None]
        k = (kx * g[:, :, None] * g[:, None, :] + ph[:, :, None] * ph[:, None, :]).reshape(
            uu.shape[0], n * n)
        return _unit_moments(k, None if gamma0 is None else ww[:, None] * ph / gamma0, n)

    return _with_blocks(moments, u, w0, blocks)


def _unit_moments(k, O, n):
    """Sample moments of the per-unit NTK entries k (S, n n) and outputs O (S, n) (or None):
    ``mean_K`` (n, n), ``kappa_K`` (n, n, n, n), ``kappa_f0`` (n, n) or None."""
    kc = k - k.mean(0)
    out = {"mean_K": k.mean(0).reshape(n, n),
           "kappa_K": (kc.T @ kc / (k.shape[0] - 1)).reshape(n, n, n, n), "kappa_f0": None}
    if O is not None:
        out["kappa_f0"] = np.cov(O, rowvar=False).reshape(n, n)
    return out


def _with_blocks(moments, u, w0, blocks):
    """``moments(u, w0)`` of all samples, with ``blocks``: the same for each of the
    consecutive batch-means blocks."""
    res = moments(u, w0)
    bounds = np.linspace(0, u.shape[0], blocks + 1).astype(int)
    res["blocks"] = [moments(u[a:b], w0[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return res


def lazy_propagator(K, delta, lr, kappa_K, kappa_f0=None):
    """O(1/N) fluctuations of the frozen-kernel (lazy, gamma0 -> 0) dynamics, discrete time.

    delta f(t+1) = delta f(t) - lr K[:, :P] delta f_train(t) + lr delta K[:, :P] Delta(t),
    with delta f(0) ~ kappa_f0 (omit for the centred model) independent of delta K ~ kappa_K
    (docs/theory.rst §5, the discrete form of the universal lazy propagator; for lr -> 0 it becomes
    delta Delta(t) = -e^{-Kt} delta f(0) - int_0^t e^{-K(t-s)} delta K e^{-Ks} y ds).

    Parameters
    ----------
    K : (n, n)
        Infinite-width (static) NTK.
    delta : (T, P)
        Lazy error signal Delta(t) = y - f(t) for t = 0 .. T-1.
    lr : float
    kappa_K : (n, n, n, n)
        N Cov(K_{mu nu}, K_{al be}).
    kappa_f0 : (n, n), optional
        N Cov f(0).

    Returns
    -------
    dict with ``cov`` (T+1, T+1, n, n) two-time N Cov(f), ``pred_cov`` (T+1, n, n),
    ``ntk_var`` (T+1, n, n) (constant: N Var K_{mu nu}).
    """
    T, P = delta.shape
    n = K.shape[0]
    R0 = np.empty((T + 1, n, n))      # d f(t) / d f(0)
    R1 = np.zeros((T + 1, n, n, P))   # d f(t) / d K_{nu be}, be over train
    R0[0] = np.eye(n)
    KP = K[:, :P]
    eye = np.eye(n)
    for t in range(T):
        R0[t + 1] = R0[t] - lr * KP @ R0[t, :P]
        R1[t + 1] = R1[t] - lr * np.einsum("ma,anb->mnb", KP, R1[t, :P])
        R1[t + 1] += lr * eye[:, :, None] * delta[t][None, None, :]
    return _source_covariance(R1, R0, kappa_K, kappa_f0)


def _source_covariance(RK, R0, kappa_K, kappa_f0):
    """N Cov of the frozen-kernel predictions from their responses to the two independent
    sources, RK (T+1, n, n, p) = d f(t) / d K[:, :p] (p training columns) and R0 (T+1, n, n)
    = d f(t) / d f(0): ``cov`` (T+1, T+1, n, n), ``pred_cov`` (T+1, n, n) and the constant
    ``ntk_var`` (T+1, n, n)."""
    T1, n, _, p = RK.shape
    R = RK.reshape(T1, n, n * p)
    kK = kappa_K[:, :p, :, :p].reshape(n * p, n * p)
    cov = np.einsum("tia,ab,sjb->tsij", R, kK, R, optimize=True)
    if kappa_f0 is not None:
        cov += np.einsum("tia,ab,sjb->tsij", R0, kappa_f0, R0, optimize=True)
    ntk_var = np.empty((T1, n, n))
    ntk_var[:] = np.einsum("ijij->ij", kappa_K)
    return {"cov": cov, "pred_cov": np.ascontiguousarray(cov[np.arange(T1), np.arange(T1)]),
            "ntk_var": ntk_var}


def lazy_delta(K, y, lr, steps):
    """Frozen-kernel error signal Delta(t) = y - f(t), f(t+1) = f(t) + lr K_train Delta(t),
    f(0) = 0, for t = 0 .. T-1: (T, P)."""
    P = y.shape[0]
    KPP = K[:P, :P]
    delta = np.empty((steps, P))
    d = np.array(y, dtype=np.float64)
    for t in range(steps):
        delta[t] = d
        d = d - lr * KPP @ d
    return delta


# --------------------------------------------------------------------------------------------
# beyond one squared-error output (docs/theory.rst §7): C outputs, any smooth loss, weight
# decay toward the initialisation, batches. Every point index is the flattened (point,
# output) pair I = mu C + c (training pairs first).
# --------------------------------------------------------------------------------------------
def linear_lazy_moments_multi(kx, C, gamma0=None):
    """:func:`linear_lazy_moments` with C outputs: k_{mu c, nu c'} = kx_{mu nu} w_c w_c'
    + delta_{cc'} u_mu u_nu, so (Isserlis)

        N Cov(k_{IJ}, k_{KL}) = kx_{mn} kx_{ab} (d_cd d_c'd' + d_cd' d_c'd)
                                + d_cc' d_dd' (kx_ma kx_nb + kx_mb kx_na)

    for I = (m, c), J = (n, c'), K = (a, d), L = (b, d'); N Cov f(0) = d_cd kx / gamma0^2.
    Returns (kappa_f0 (nC, nC) or None, kappa_K (nC, nC, nC, nC))."""
    n = kx.shape[0]
    e = np.eye(C)
    ww = np.einsum("cd,ef->cedf", e, e) + np.einsum("cf,ed->cedf", e, e)     # (c,c',d,d')
    kk = np.einsum("mn,ab->mnab", kx, kx)
    part1 = np.einsum("mnab,cedf->mcneadbf", kk, ww)
    uu = np.einsum("ma,nb->mnab", kx, kx) + np.einsum("mb,na->mnab", kx, kx)
    part2 = np.einsum("mnab,ce,df->mcneadbf", uu, e, e)
    kK = (part1 + part2).reshape(n * C, n * C, n * C, n * C)
    kf = None if gamma0 is None else np.kron(kx, e) / gamma0 ** 2
    return kf, kK


def sampled_lazy_moments_multi(activation, u, w0, kx, gamma0=None, blocks=10):
    """:func:`sampled_lazy_moments` with C outputs (w0 of shape (S, C)): per-unit
    k_{mu c, nu c'} = kx_{mu nu} g_{mu c} g_{nu c'} + delta_{cc'} phi_mu phi_nu."""
    n = u.shape[1]
    C = w0.shape[1]
    nC = n * C
    eye = np.eye(C)
    kxx = np.kron(kx, np.ones((C, C)))

    def moments(uu, ww):
        m = uu.shape[0]
        ph = apply(activation, uu, 0)
        g = (apply(activation, uu, 1)[:, :, None] * ww[:, None, :]).reshape(m, nC)
        pp = (ph[:, :, None, None, None] * ph[:, None, None, :, None]
              * eye[None, None, :, None, :]).reshape(m, nC, nC)
        k = (kxx * g[:, :, None] * g[:, None, :] + pp).reshape(m, nC * nC)
        return _unit_moments(k, None if gamma0 is None else
                             (ph[:, :, None] * ww[:, None, :]).reshape(m, nC) / gamma0, nC)

    return _with_blocks(moments, u, w0, blocks)


def lazy_trajectory(K, objective):
    """Frozen-kernel dynamics for any objective (docs/theory.rst §7): f(t) = K[:, train]
    alpha(t) (f(0) = 0 at infinite width), alpha(t+1) = a alpha(t) + lr Delta(t).

    Parameters
    ----------
    K : (n C, n C) static NTK over (point, output) pairs; objective : solvers.objective.Objective
        (decay toward the initialisation only).

    Returns
    -------
    dict with ``alpha`` (T+1, P C), ``delta`` (T, P, C), ``jac`` (T, P, C, C) (the loss
    Jacobian at f(t), zero off-batch), ``f`` (T+1, n C).
    """
    obj = objective
    T, P, C = obj.steps, obj.P, obj.C
    KP = K[:, :P * C]
    alpha = np.zeros((T + 1, P * C))
    f = np.zeros((T + 1, K.shape[0]))
    delta = np.empty((T, P, C))
    jac = np.empty((T, P, C, C))
    for t in range(T):
        Ft = f[t, :P * C].reshape(P, C)
        delta[t] = obj.delta(t, Ft)[:P]
        jac[t] = obj.jacobian(t, Ft)
        alpha[t + 1] = obj.a * alpha[t] + obj.lr * delta[t].reshape(-1)
        f[t + 1] = KP @ alpha[t + 1]
    return {"alpha": alpha, "delta": delta, "jac": jac, "f": f}


def lazy_propagator_objective(K, alpha, jac, a, lr, kappa_K, kappa_f0=None):
    """O(1/N) fluctuations of the frozen-kernel dynamics for any objective (docs/theory.rst
    §5, §7): with f(t) = f(0) + K[:, train] alpha(t), alpha(t+1) = a alpha(t) + lr Delta(t),

        delta f(t) = delta f(0) + delta K[:, train] alpha(t) + K[:, train] delta alpha(t)
        delta alpha(t+1) = a delta alpha(t) + lr D(t) delta f_train(t),   D = jac,

    with delta f(0) (kappa_f0) independent of delta K (kappa_K). For mse, C = 1, a = 1 this
    is :func:`lazy_propagator`.

    Parameters
    ----------
    K : (nC, nC); alpha : (T+1, PC); jac : (T, P, C, C); a, lr : float;
    kappa_K : (nC, nC, nC, nC); kappa_f0 : (nC, nC) or None.

    Returns
    -------
    dict with ``cov`` (T+1, T+1, nC, nC), ``pred_cov`` (T+1, nC, nC), ``ntk_var``
    (T+1, nC, nC) (constant).
    """
    T, P, C, _ = jac.shape
    nC = K.shape[0]
    p = P * C
    KP = K[:, :p]
    D = np.zeros((T, p, p))
    for al in range(P):
        D[:, al * C:(al + 1) * C, al * C:(al + 1) * C] = jac[:, al]
    Ra0 = np.zeros((p, nC))            # d alpha(t) / d f(0)
    RaK = np.zeros((p, nC, p))         # d alpha(t) / d K_{J, B}, B over training pairs
    Rf0 = np.empty((T + 1, nC, nC))
    RfK = np.empty((T + 1, nC, nC, p))
    eye = np.eye(nC)
    for t in range(T + 1):
        Rf0[t] = eye + KP @ Ra0
        RfK[t] = eye[:, :, None] * alpha[t][None, None, :] + np.einsum("ib,bjc->ijc", KP, RaK)
        if t == T:
            break
        Ra0 = a * Ra0 + lr * D[t] @ Rf0[t, :p]
        RaK = a * RaK + lr * np.einsum("ab,bjc->ajc", D[t], RfK[t, :p])
    return _source_covariance(RfK, Rf0, kappa_K, kappa_f0)
