"""The plain deep-linear march (one squared-error output, full batch, no weight decay) and
the pieces that both marches of :mod:`solvers.linear` share.

The reduction, its causal time march and the flattened (t, mu) layout are derived in the
:mod:`solvers.linear` docstring; :func:`march` is that march, :func:`full_responses` the
full-index responses A^l it implies and :func:`verify` one dense global evaluation of the same
equations. The general march (:mod:`solvers.linear_general`) reuses the block-row update of
Phi^l, the divergence test, the NaN fill after a divergence and the per-layer step of the dense
check defined here, so both marches build Phi, stop, report and verify in one way.
"""
from __future__ import annotations

import math

import numpy as np

from .layout import causal_mask

__all__ = ["march", "full_responses", "verify"]


def _check_inputs(kx, y, depth, gamma0, lr, steps):
    """The plain problem's arguments as arrays and numbers; ValueError naming a bad one."""
    kx = np.asarray(kx, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    if kx.ndim != 2 or kx.shape[0] != kx.shape[1]:
        raise ValueError(f"kx must be a square (n, n) input kernel, got shape {kx.shape}")
    if y.size > kx.shape[0] or y.size < 1:
        raise ValueError(f"y must hold 1 .. n = {kx.shape[0]} training targets, got {y.size}")
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not (gamma0 >= 0 and math.isfinite(gamma0)):
        raise ValueError(f"gamma0 must be finite and >= 0, got {gamma0}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return kx, y, int(depth), float(gamma0), float(lr), int(steps)


def _divergence(t, ft, K, loss, loss0, divergence):
    """(t, message) when step t failed: a non-finite output or NTK, or a training loss above
    ``divergence`` times its initial value ``loss0``; (None, "") otherwise."""
    if not (np.all(np.isfinite(ft)) and np.all(np.isfinite(K))):
        return t, f"non-finite values at step {t}"
    if loss0 > 0 and loss > divergence * loss0:
        return t, (f"training loss {loss:.3g} at step {t} exceeds {divergence:g} x its "
                   f"initial value {loss0:.3g}")
    return None, ""


def _nan_from(t0, n, C, f, ntk, delta, Phi, G) -> None:
    """NaN every value from step t0 on, in place: rows t0.. of ``f``, ``ntk``, ``delta``; rows
    and columns (t >= t0, mu) of the flat kernels ``Phi`` (blocks of n) and (t >= t0, c) of the
    stacked backward kernels ``G`` (blocks of C, leading layer axis)."""
    f[t0:] = np.nan
    ntk[t0:] = np.nan
    delta[t0:] = np.nan
    for X in Phi:
        X[t0 * n:, :] = np.nan
        X[:, t0 * n:] = np.nan
    G[:, t0 * C:, :] = np.nan
    G[:, :, t0 * C:] = np.nan


def _change(new, old):
    """Largest change of a re-evaluated field relative to its size (at least 1)."""
    scale = max(1.0, float(np.max(np.abs(old))))
    return float(np.max(np.abs(new - old))) / scale


def _check_layer(l, res, c_new, d_new, src, gw, g2):
    """One layer of a dense global check, from its re-evaluated operators c, d, the source
    covariance ``src`` (Phi^{l-1}, scaled) and the backward base ``gw`` (G^{l+1}, scaled):
    mt by a dense solve (not the row recursion), then a, E, W, Phi^l, G^l and b^{l-1} as in
    the :mod:`solvers.linear` reduction. Returns the relative changes against the march's
    fields and, for the last layer, X = mt (E + W a^T) whose diagonal time blocks are f."""
    mt_new = np.linalg.solve(np.eye(d_new.shape[0]) - g2 * (d_new @ c_new),
                             np.eye(d_new.shape[0]))
    a_new = c_new @ mt_new
    E_new = d_new @ src
    W_new = gw + g2 * (E_new @ d_new.T)
    aE = a_new @ E_new
    phi_new = src + g2 * (aE + aE.T + a_new @ W_new @ a_new.T)
    G_new = mt_new @ W_new @ mt_new.T
    rel = [_change(phi_new, res["Phi"][l]), _change(G_new, res["G"][l]),
           _change(a_new, res["a"][l])]
    if l > 0:
        rel.append(_change(mt_new @ d_new, res["b"][l]))
    X = mt_new @ (E_new + W_new @ a_new.T) if l == res["shape"]["L"] - 1 else None
    return rel, X


def _phi_row(Phil, row, t, n, g2, al, El, Wl, pb):
    """Write block row (and column) t of the flat kernel Phi^l, in place.

    ``row`` (n, (t+1) n) holds the source part, P~^{l-1}[(t, mu), (s <= t, nu)]; the response
    terms gamma0^2 [a E + (a E)^T + a W a^T] of that row are added (``pb`` slices the backward
    index of the times before t), then the row is mirrored into column t and the diagonal
    block symmetrised.
    """
    rf, pf, uf = slice(t * n, (t + 1) * n), slice(0, t * n), slice(0, (t + 1) * n)
    if t > 0:
        at = al[rf, pb]
        row += g2 * (at @ El[pb, uf]
                     + (El[pb, rf].T + at @ Wl[pb, pb]) @ al[uf, pb].T)
    Phil[rf, uf] = row
    Phil[pf, rf] = row[:, pf].T
    blk = row[:, t * n:]
    Phil[rf, rf] = 0.5 * (blk + blk.T)


def march(kx, y, depth: int, gamma0: float, lr: float, steps: int, *,
          divergence: float = 1e8, callback=None) -> dict:
    """March the deep linear DMFT forward in time (exact discrete-time gradient descent).

    Parameters
    ----------
    kx : array (n, n)
        Input kernel Phi^0 = X X^T / D over the n = P + Q points, train first.
    y : array (P,)
        Training targets (MSE loss, Delta = y - f on train points, 0 on test points).
    depth : int
        L >= 1 hidden layers.
    gamma0, lr : float
        Feature-learning strength (>= 0; 0 is the lazy limit) and learning rate.
    steps : int
        T, number of gradient steps.
    divergence : float
        Stop (``diverged_at`` set) once the training loss exceeds ``divergence`` times its
        initial value, or any value is not finite.
    callback : callable, optional
        ``callback(t)`` after each time step (progress bars).

    Returns
    -------
    dict
        ``f`` (T+1, n) predictions; ``ntk`` (T+1, n, n); ``Phi`` list of L flat kernels
        (n (T+1), n (T+1)) (index l - 1 for Phi^l); ``G`` (L, T+1, T+1) the point-independent
        backward kernels G^l; ``a`` (L, n (T+1), T+1), ``d`` (L, T+1, n (T+1)),
        ``b`` (L, T+1, n (T+1)) (``b[l-1]`` = B^{l-1}, so ``b[0]`` = B^0 is unused),
        ``mt`` (L, T+1, T+1); ``delta`` (T+1, n); ``diverged_at`` (int or None, the first
        step whose values failed the check; later rows are NaN) and ``message``.
    """
    kx, y, L, gamma0, lr, T = _check_inputs(kx, y, depth, gamma0, lr, steps)
    n, P = kx.shape[0], y.size
    T1 = T + 1
    N1 = n * T1
    g2 = gamma0 * gamma0

    Phi = [np.zeros((N1, N1)) for _ in range(L)]
    G = np.zeros((L + 1, T1, T1))
    G[L] = 1.0                      # G^{L+1} = 1: the readout w(0) is one scalar per unit
    c = np.zeros((L, N1, T1))
    a = np.zeros((L, N1, T1))
    d = np.zeros((L, T1, N1))
    b = np.zeros((L + 1, T1, N1))   # b[l] = B^l reduced; b[L] = B^L = 0
    mt = np.zeros((L, T1, T1))
    E = np.zeros((L, T1, N1))
    W = np.zeros((L, T1, T1))
    f = np.zeros((T1, n))
    delta = np.zeros((T1, n))
    ntk = np.zeros((T1, n, n))
    loss0 = 0.5 * float(y @ y)
    diverged_at, message = None, ""
    # overflow is detected below from the values themselves (and reported), not from warnings
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T1):
            diverged_at, message = _step(t, kx, y, n, P, L, g2, lr, Phi, G, c, a, d, b, mt, E,
                                         W, f, delta, ntk, loss0, divergence)
            if callback is not None:
                callback(t)
            if diverged_at is not None:
                break

    if diverged_at is not None:
        _nan_from(diverged_at, n, 1, f, ntk, delta, Phi, G)
    return {"f": f, "ntk": ntk, "Phi": Phi, "G": G[:L].copy(), "a": a, "c": c, "d": d,
            "b": b[:L].copy(), "mt": mt, "E": E, "W": W, "delta": delta,
            "diverged_at": diverged_at, "message": message,
            "shape": {"n": n, "P": P, "T1": T1, "L": L}}


def _step(t, kx, y, n, P, L, g2, lr, Phi, G, c, a, d, b, mt, E, W, f, delta, ntk, loss0,
          divergence):
    """One time step of :func:`march`: block row t of every quantity, then f(t), Delta(t).

    Writes into the preallocated arrays; returns (diverged_at, message).
    """
    past = slice(0, t * n)
    rt = slice(t * n, (t + 1) * n)
    upto = slice(0, (t + 1) * n)
    # -- backward sweep: needs only rows < t of the forward quantities ---------------
    for l in range(L - 1, -1, -1):
        dl, ml, Wl, El = d[l], mt[l], W[l], E[l]
        Gnext = G[l + 1]
        ml[t, t] = 1.0
        if t > 0:
            dl[t, past] = b[l + 1][t, past] + lr * (delta[:t] * Gnext[t, :t, None]).ravel()
            dc = dl[t, past] @ c[l][past, :t]
            ml[t, :t] = g2 * (dc @ ml[:t, :t])
            if l > 0:
                b[l][t, past] = ml[t, :t + 1] @ dl[:t + 1, past]
            if l == 0:
                # Phi^0 = K^x at all times: E(t, (s, alpha)) does not depend on s
                El[t, past] = np.tile(dl[t, past].reshape(t, n).sum(0) @ kx, t)
            else:
                El[t, past] = dl[t, past] @ Phi[l - 1][past, past]
            Wl[t, :t + 1] = Gnext[t, :t + 1] + g2 * (dl[:t + 1, past] @ El[t, past])
            Wl[:t, t] = Wl[t, :t]
        else:
            Wl[0, 0] = Gnext[0, 0]
        v = ml[t, :t + 1] @ Wl[:t + 1, :t + 1]
        G[l][t, :t + 1] = ml[:t + 1, :t + 1] @ v
        G[l][:t, t] = G[l][t, :t]
    # -- forward sweep: needs rows <= t of the backward quantities ------------------
    for l in range(L):
        cl, al, El, Wl = c[l], a[l], E[l], W[l]
        if t > 0:
            if l == 0:
                cl[rt, :t] = lr * (kx @ delta[:t].T)
            else:
                prow = Phi[l - 1][rt, past].reshape(n, t, n)
                cl[rt, :t] = a[l - 1][rt, :t] + lr * np.einsum("msa,sa->ms", prow, delta[:t])
            al[rt, :t] = cl[rt, :t] @ mt[l][:t, :t]
            if l == 0:
                El[:t + 1, rt] = d[l][:t + 1, past].reshape(t + 1, t, n).sum(1) @ kx
            else:
                El[:t + 1, rt] = d[l][:t + 1, past] @ Phi[l - 1][past, rt]
        if l == 0:
            row = np.tile(kx, (1, t + 1))
        else:
            row = Phi[l - 1][rt, upto].copy()
        _phi_row(Phi[l], row, t, n, g2, al, El, Wl, slice(0, t))
    # -- output, error signal, NTK ---------------------------------------------------
    l = L - 1
    if t > 0:
        f[t] = mt[l][t, :t + 1] @ (E[l][:t + 1, rt] + W[l][:t + 1, :t] @ a[l][rt, :t].T)
    K = kx * G[0][t, t]
    for l in range(L):
        K = K + G[l + 1][t, t] * Phi[l][rt, rt]
    ntk[t] = K
    delta[t, :P] = y - f[t, :P]
    loss = 0.5 * float(delta[t, :P] @ delta[t, :P])
    return _divergence(t, f[t], K, loss, loss0, divergence)


def full_responses(res: dict, kx, gamma0: float, lr: float):
    """Full-index responses A^l (l = 1 .. L-1) from a march result (docs/theory.rst §3).

    A^l = M^l C^l with C^l = A^{l-1} + lr tril_{-1}[Phi^{l-1} (.) Delta] and, by Woodbury,
    M^l = I + gamma0^2 a^l d^l, so A^l = C^l + gamma0^2 a^l (d^l C^l): two GEMMs of size
    (n T1) x T1 x (n T1) per layer, no inverse.

    Returns
    -------
    A : array (L-1, n T1, n T1) flat, or None for L = 1
    """
    n, T1, L = res["shape"]["n"], res["shape"]["T1"], res["shape"]["L"]
    if L == 1:
        return None
    N1 = n * T1
    mask = causal_mask(T1, n)
    dcol = np.nan_to_num(res["delta"]).ravel()[None, :]   # Delta on the column index
    g2 = gamma0 * gamma0
    A = np.empty((L - 1, N1, N1))
    prev = np.zeros((N1, N1))
    for l in range(L - 1):              # layer l + 1
        phi_prev = np.kron(np.ones((T1, T1)), kx) if l == 0 else res["Phi"][l - 1]
        C = prev + lr * np.where(mask, phi_prev * dcol, 0.0)
        A[l] = C + g2 * (res["a"][l] @ (res["d"][l] @ C))
        prev = A[l]
    return A


def verify(res: dict, kx, y, gamma0: float, lr: float) -> float:
    """Residual of one global evaluation of the matrix equations at the marched solution.

    With Delta taken from the march, every layer's operators c, d, mt (by a dense triangular
    solve, not the row recursion), a, b, E, W, Phi, G and the output f are recomputed from
    whole matrices (GEMMs). Returns the largest change relative to the size of each field:
    a fixed point of the equations gives rounding-level values (~1e-14).
    """
    n, T1, L, P = (res["shape"][k] for k in ("n", "T1", "L", "P"))
    N1 = n * T1
    g2 = gamma0 * gamma0
    tmask = np.tril(np.ones((T1, T1), dtype=bool), -1)
    delta = res["delta"]
    dflat = delta.ravel()
    Phi, G, a, b = res["Phi"], res["G"], res["a"], res["b"]
    rel = []
    phi0 = np.kron(np.ones((T1, T1)), kx)
    for l in range(L):
        phi_prev = phi0 if l == 0 else Phi[l - 1]
        g_next = np.ones((T1, T1)) if l == L - 1 else G[l + 1]
        a_prev = np.zeros((N1, T1)) if l == 0 else a[l - 1]
        b_l = np.zeros((T1, N1)) if l == L - 1 else b[l + 1]
        cs = (phi_prev * dflat[None, :]).reshape(N1, T1, n).sum(2)
        c_new = a_prev + lr * np.where(np.repeat(tmask, n, axis=0), cs, 0.0)
        d_new = b_l + lr * np.where(np.repeat(tmask, n, axis=1),
                                    np.repeat(g_next, n, axis=1) * dflat[None, :], 0.0)
        changes, X = _check_layer(l, res, c_new, d_new, phi_prev, g_next, g2)
        rel += changes
        if X is not None:                                   # (T1, N1)
            f_new = X.reshape(T1, T1, n)[np.arange(T1), np.arange(T1)]
            rel.append(_change(f_new, res["f"]))
    return max(rel)
