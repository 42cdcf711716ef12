"""O(1/N) two-layer propagator for C outputs, any loss, weight decay, batches (theory.rst §5, §7).

The propagator of :mod:`solvers.fluct.propagator` with C outputs, any loss (entering through
its Jacobian D = d Delta / d f at the infinite-width predictions: delta Delta = D E delta f,
D = -I for mse), weight decay and batches (Delta and D zero off-batch). The forward-mode
tangents follow :func:`solvers.fluct.two_layer.march_multi` in the directions Delta_{al c}(s);
the influence vectors solve with I - D E J (:func:`influence_moments_multi`). The batch-means
loop is :func:`solvers.fluct.influence.batch_means_propagator`, as for one output.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

from ..activations import apply
from .influence import batch_means_propagator, finite_result
from .two_layer import march_multi, unit_observables_multi

__all__ = ["objective_propagator", "accumulate_response_multi", "influence_moments_multi"]


def accumulate_response_multi(activation, h, w, kx, delta, c, gamma0, a, JO, Jk=None,
                              iu=None):
    """Forward-mode tangents of a chunk of C-output samples (:func:`march_multi`), summed.

    Directions: the P C T entries Delta_{al c}(s), d = (s P + al) C + c. The tangents of
    the decayed state obey V(t+1) = a V(t) + d(increment) whatever ``decay_to`` (the
    initial weights do not depend on Delta).

    Parameters
    ----------
    h : (S, T+1, n); w : (S, T+1, C); kx : (n, n); delta : (T, P, C); c : lr gamma0;
    a : 1 - lr lambda.
    JO : (T+1, n C, P C T)
        Sum over samples of dO_I(t) / dDelta_d (I = mu C + c), updated in place.
    Jk : (T+1, m, P C T), optional
        Same for the per-unit NTK entries ``iu`` of the (n C, n C) NTK.
    """
    S, T1, n = h.shape
    T, P, C = delta.shape
    p = T * P * C
    if iu is None:
        iu = np.triu_indices(n * C)
    kxP = kx[:, :P]
    Vh = np.zeros((S, n, p))
    Vw = np.zeros((S, C, p))
    i, j = iu
    mi, ci = np.divmod(i, C)
    mj, cj = np.divmod(j, C)
    same = ci == cj
    kij = kx[mi, mj]
    eyeC = np.eye(C)
    for t in range(T):
        ht, wt = h[:, t, :P], w[:, t]
        d1 = apply(activation, ht, 1)                       # (S, P)
        act = t * P * C
        if act:
            d2 = apply(activation, ht, 2)
            q = wt @ delta[t].T                              # (S, P)
            VhP = Vh[:, :P, :act]
            dq = np.matmul(delta[t], Vw[:, :, :act])                     # (S, P, d)
            Z = d1[:, :, None] * dq + (d2 * q)[:, :, None] * VhP
            dVw = np.matmul(delta[t].T, d1[:, :, None] * VhP)             # (S, C, d)
            Vh[:, :, :act] = a * Vh[:, :, :act] + c * np.matmul(kxP, Z)
            Vw[:, :, :act] = a * Vw[:, :, :act] + c * dVw
        # new directions: Delta_{al c}(t) enters the state at t + 1
        new = slice(act, act + P * C)
        Vh[:, :, new] = (c * kxP[None, :, :, None] * (d1[:, :, None] * wt[:, None, :])[:, None]
                         ).reshape(S, n, P * C)
        Vw[:, :, new] = (c * eyeC[None, :, None, :] * apply(activation, ht, 0)[:, None, :, None]
                         ).reshape(S, C, P * C)
        a1 = act + P * C
        h1, w1 = h[:, t + 1], w[:, t + 1]
        ph1 = apply(activation, h1, 0)
        dph1 = apply(activation, h1, 1)
        Vh1, Vw1 = Vh[:, :, :a1], Vw[:, :, :a1]
        dph_tan = dph1[:, :, None] * Vh1                     # (S, n, d)
        # dO_{mu c} = (Vw_c phi_mu + w_c phi'_mu Vh_mu) / gamma0
        dO = np.tensordot(ph1, Vw1, axes=([0], [0])) \
            + np.matmul(dph_tan.transpose(1, 2, 0), w1).transpose(0, 2, 1)   # (n, C, d)
        JO[t + 1, :, :a1] += dO.reshape(n * C, a1) / gamma0
        if Jk is not None:
            g1 = (dph1[:, :, None] * w1[:, None, :]).reshape(S, n * C)
            d21 = apply(activation, h1, 2)
            dg = ((d21[:, :, None] * Vh1)[:, :, None, :] * w1[:, None, :, None]
                  + dph1[:, :, None, None] * Vw1[:, None, :, :]).reshape(S, n * C, a1)
            X = np.tensordot(dg, g1, axes=([0], [0]))        # (I, d, J)
            Y = np.tensordot(dph_tan, ph1, axes=([0], [0]))  # (mu, d, nu)
            val = kij[:, None] * (X[i, :, j] + X[j, :, i])
            val[same] += Y[mi[same], :, mj[same]] + Y[mj[same], :, mi[same]]
            Jk[t + 1, :, :a1] += val


def _solve_matrix_multi(JO, jac):
    """I - D E J over the P C T error-signal entries (unit lower triangular: J is causal),
    D = blockdiag_t,al jac[t, al] (the loss Jacobian d Delta / d f)."""
    T1, nC, p = JO.shape
    T, P, C, _ = jac.shape
    EJ = JO[:T, :P * C, :].reshape(T, P, C, p)
    DEJ = np.matmul(jac, EJ).reshape(p, p)
    return np.eye(p) - DEJ


def influence_moments_multi(O, k, mean_O, mean_k, JO, Jk, solve_matrix, jac, out_ff, out_kk):
    """:func:`~solvers.fluct.propagator.influence_moments` with the loss Jacobian:
    delta Delta = D E delta f, so U = (I - D E J)^{-1} D E e and psi = e + J U (for mse
    D = -I this is the plain form)."""
    C_, T1, nC = O.shape
    T, P, C, _ = jac.shape
    p = JO.shape[2]
    e = (O - mean_O).reshape(C_, T1 * nC)
    eE = (O[:, :T, :P * C] - mean_O[:T, :P * C]).reshape(C_, T, P, C)
    rhs = np.matmul(jac, eE.transpose(1, 2, 3, 0)).reshape(p, C_)
    U = solve_triangular(solve_matrix, rhs, lower=True, unit_diagonal=True,
                         check_finite=False)
    psi = e + (JO.reshape(T1 * nC, p) @ U).T
    out_ff += psi.T @ psi
    if k is not None:
        m = k.shape[2]
        psik = (k - mean_k).reshape(C_, T1 * m) + (Jk.reshape(T1 * m, p) @ U).T
        out_kk += np.einsum("ci,ci->i", psik, psik)


def objective_propagator(activation, u, w0, kx, delta, jac, gamma0, lr, *, a=1.0,
                         decay_to="init", center=False, blocks=10, chunk=None, ntk=True,
                         progress=None):
    """O(1/N) propagator of a two-layer network for any objective (docs/theory.rst §5, §7).

    As :func:`~solvers.fluct.propagator.two_layer_propagator` with C outputs, the loss
    entering through its Jacobian (delta Delta(t) = jac(t) delta f_train(t); jac = -I for
    mse), weight decay (a, decay_to; :func:`solvers.fluct.two_layer.march_multi`) and batches
    (Delta and jac zero off-batch).

    Parameters
    ----------
    u : (S, n); w0 : (S, C); kx : (n, n)
    delta : (T, P, C)
        Infinite-width error signal (of the centred predictions when ``center``).
    jac : (T, P, C, C)
        d Delta_{al c}(t) / d f_{al c'}(t) at the infinite-width predictions.
    gamma0, lr : float; a : 1 - lr lambda; decay_to : "init" or "zero".

    Returns
    -------
    dict as :func:`~solvers.fluct.propagator.two_layer_propagator` over the flattened
    (point, output) index I = mu C + c: ``cov`` (T+1, T+1, n C, n C), ``pred_cov``
    (T+1, n C, n C), ``ntk_var`` (T+1, n C, n C) or None, their ``*_stderr``, ``response``
    (T+1, n C, T P C), ``kappa``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        res = _objective_propagator(activation, u, w0, kx, delta, jac, gamma0, lr, a,
                                    decay_to, center, blocks, chunk, ntk, progress)
    return finite_result(res, ("cov", "response", "ntk_var"))


def _objective_propagator(activation, u, w0, kx, delta, jac, gamma0, lr, a, decay_to, center,
                          blocks, chunk, ntk, progress):
    S, n = u.shape
    T, P, C = delta.shape
    T1, nC, p = T + 1, n * C, T * P * C
    c = lr * gamma0
    if chunk is None:
        chunk = int(np.clip(4_000_000 // (p * (n + C) * (4 + C)), 16, 8192))
    iu = np.triu_indices(nC)

    def fields(lo, hi):
        h, w = march_multi(activation, u[lo:hi], w0[lo:hi], kx, delta, c, a, decay_to)
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(w))):
            raise FloatingPointError("the single-site fields diverged; reduce lr or gamma0")
        O, k = unit_observables_multi(activation, h, w, kx, gamma0, center, iu)
        return h, w, O, (k if ntk else None)

    def accumulate(h, w, JO, Jk):
        accumulate_response_multi(activation, h, w, kx, delta, c, gamma0, a, JO, Jk, iu)

    def influence(O, k, mO, mk, JO, Jk, A, ff, kk):
        influence_moments_multi(O, k, mO, mk, JO, Jk, A, jac, ff, kk)

    return batch_means_propagator(fields, accumulate, lambda JO: _solve_matrix_multi(JO, jac),
                                  influence, samples=S, shape=(T1, nC, p), iu=iu,
                                  blocks=blocks, chunk=chunk, ntk=ntk, progress=progress)
