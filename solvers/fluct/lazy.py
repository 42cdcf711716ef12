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
    S, n = u.shape

    def moments(uu, ww):
        ph = apply(activation, uu, 0)
        g = apply(activation, uu, 1) * ww[:, None]
        k = (kx * g[:, :, None] * g[:, None, :] + ph[:, :, None] * ph[:, None, :]).reshape(
            uu.shape[0], n * n)
        kc = k - k.mean(0)
        out = {"mean_K": k.mean(0).reshape(n, n),
               "kappa_K": (kc.T @ kc / (uu.shape[0] - 1)).reshape(n, n, n, n),
               "kappa_f0": None}
        if gamma0 is not None:
            O = ww[:, None] * ph / gamma0
            out["kappa_f0"] = np.cov(O, rowvar=False).reshape(n, n)
        return out

    res = moments(u, w0)
    bounds = np.linspace(0, S, blocks + 1).astype(int)
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
    R1f = R1.reshape(T + 1, n, n * P)
    kK = kappa_K[:, :P, :, :P].reshape(n * P, n * P)
    cov = np.einsum("tia,ab,sjb->tsij", R1f, kK, R1f, optimize=True)
    if kappa_f0 is not None:
        cov += np.einsum("tia,ab,sjb->tsij", R0, kappa_f0, R0, optimize=True)
    T1 = T + 1
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
