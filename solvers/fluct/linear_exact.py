"""Exact O(1/N) fluctuations of two-layer *linear* networks (an independent check of the
propagator).

With phi(h) = h every unit moves by a linear map s(t+1) = A_t s(t), s = (h, w) in R^{n+1},
A_t = I + c [[0, kx[:, train] Delta(t)], [Delta(t)^T, 0]], so the *empirical* second-moment
matrix M = <s s^T> over the N units closes: M(t+1) = A_t M(t) A_t^T, f_mu = M_{mu w} / gamma0,
K_{mu nu} = kx_{mu nu} M_{ww} + M_{mu nu}. This is exact at any finite N; only the initial M(0)
is random (Wishart: N Cov(M_ij, M_kl) = S_ik S_jl + S_il S_jk, S = blockdiag(kx, 1)).
Linearising in M(0) (complex-step derivatives, exact to rounding) gives N Cov(f) and N Var(K)
without the DMFT propagator (:func:`linear_exact_fluctuations`).
"""
from __future__ import annotations

import numpy as np

from ..layout import two_time

__all__ = ["linear_moments_march", "linear_exact_fluctuations"]


def linear_moments_march(M0, kx, y, gamma0, lr, steps, center=False):
    """Exact closed dynamics of the second moments of a two-layer linear network.

    Parameters
    ----------
    M0 : (n+1, n+1)
        Initial second-moment matrix of s = (h, w) over units (real or complex: the march is
        polynomial, so complex-step derivatives are exact).
    kx : (n, n); y : (P,); gamma0, lr : float; steps : int
    center : bool
        Subtract f(0) from the predictions (and from Delta).

    Returns
    -------
    f : (T+1, n)
        f_mu = M_{mu w} / gamma0 (minus f(0) when centred).
    K : (T+1, n, n)
        kx M_{ww} + M_{hh}.
    """
    n = kx.shape[0]
    P = y.shape[0]
    M = np.array(M0)
    f = np.empty((steps + 1, n), dtype=M.dtype)
    K = np.empty((steps + 1, n, n), dtype=M.dtype)
    c = lr * gamma0
    f0 = M[:n, n] / gamma0
    for t in range(steps + 1):
        f[t] = M[:n, n] / gamma0 - (f0 if center else 0.0)
        K[t] = kx * M[n, n] + M[:n, :n]
        if t == steps:
            break
        d = y - f[t, :P]
        A = np.eye(n + 1, dtype=M.dtype)
        A[:n, n] += c * (kx[:, :P] @ d)
        A[n, :P] += c * d
        M = A @ M @ A.T
    return f, K


def linear_exact_fluctuations(kx, y, gamma0, lr, steps, center=False, step=1e-30):
    """Exact O(1/N) fluctuations of a two-layer linear network (module docstring).

    Returns
    -------
    dict with ``f`` (T+1, n) and ``ntk`` (T+1, n, n) at infinite width, ``cov``
    (T+1, T+1, n, n) two-time N Cov(f), ``pred_cov`` (T+1, n, n), ``ntk_var`` (T+1, n, n).
    """
    n = kx.shape[0]
    T1 = steps + 1
    Sig = np.zeros((n + 1, n + 1))
    Sig[:n, :n] = kx
    Sig[n, n] = 1.0
    f_inf, K_inf = linear_moments_march(Sig, kx, y, gamma0, lr, steps, center)
    d = n + 1
    Gf = np.empty((d, d, T1, n))
    GK = np.empty((d, d, T1, n, n))
    for i in range(d):
        for j in range(d):
            M0 = Sig.astype(np.complex128)
            M0[i, j] += 1j * step
            ff, KK = linear_moments_march(M0, kx, y, gamma0, lr, steps, center)
            Gf[i, j] = ff.imag / step
            GK[i, j] = KK.imag / step
    # N Cov(M_ij, M_kl) = S_ik S_jl + S_il S_jk  (Wishart)
    W = np.einsum("ik,jl->ijkl", Sig, Sig) + np.einsum("il,jk->ijkl", Sig, Sig)
    Gf2 = Gf.reshape(d * d, T1 * n)
    Wm = W.reshape(d * d, d * d)
    cov = two_time(Gf2.T @ Wm @ Gf2, T1, n)
    GK2 = GK.reshape(d * d, T1 * n * n)
    ntk_var = np.einsum("ai,ab,bi->i", GK2, Wm, GK2).reshape(T1, n, n)
    return {"f": f_inf.real, "ntk": K_inf.real, "cov": cov,
            "pred_cov": np.ascontiguousarray(cov[np.arange(T1), np.arange(T1)]),
            "ntk_var": ntk_var}

