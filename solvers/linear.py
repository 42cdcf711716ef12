"""Deep linear networks: the DMFT as closed matrix equations, solved exactly (docs/theory.rst §3).

For phi(h) = h every single-site field is Gaussian and linear in its sources, so the
order parameters obey algebraic equations with no sampling. This engine solves them in exact
discrete time (gradient descent with step ``lr``) by marching forward in time, one block row
(time step) at a time; there is no outer fixed-point iteration and no sampling, so the result
is deterministic and exact up to rounding.

Reduction used here (derived for this engine, checked against the literal full-index
equations (tests/_reference.py) and against simulated networks in the tests)
----------------------------------------------------------------------------
For a single network output the backward fields do not depend on the data point:
g^l_mu(t) = z^l(t) (the backward pass of a linear net never sees the input). Hence
G^l_{mu nu}(t, s) = G^l(t, s) is a (T+1) x (T+1) object, the source r^l is one scalar process,
and only two reduced causal operators per layer matter:

    c^l_mu(t, s)    = sum_alpha C^l_{mu alpha}(t, s)
                    = a^{l-1}_mu(t, s) + lr sum_alpha Phi^{l-1}_{mu alpha}(t, s) Delta_alpha(s)
    d^l_alpha(t, s) = D^l_{mu alpha}(t, s)   (the same for every row mu)
                    = b^l_alpha(t, s) + lr Delta_alpha(s) G^{l+1}(t, s)            (s < t)

with the single-site equations h = u + gamma0 c z, z = r + gamma0 d h. Writing
mt = (I - gamma0^2 d c)^{-1} (a (T+1) x (T+1) unit lower-triangular matrix) and using
Woodbury, M = (I - gamma0^2 C D)^{-1} = I + gamma0^2 a d, so that

    a^l       = c^l mt^l                     (= sum_alpha A^l_{mu alpha}, A^l = M^l C^l)
    b^{l-1}   = mt^l d^l                     (= B^{l-1}_{mu alpha} for every mu)
    E^l       = d^l Phi^{l-1},   W^l = G^{l+1} + gamma0^2 E^l d^{lT}
    Phi^l     = Phi^{l-1} + gamma0^2 [a^l E^l + (a^l E^l)^T + a^l W^l a^{lT}]
    G^l       = mt^l W^l mt^{lT}
    f_mu(t)   = gamma0^{-1} <z^L(t) h^L_mu(t)> = [mt^L (E^L + W^L a^{LT})](t, (t, mu))

(Phi^0 = K^x constant in time, G^{L+1} = 1, a^0 = 0, b^L = 0). Nothing of size
(PT) x (PT) is ever inverted: the only inverse is the unit-triangular mt, built row by row.
The full-index responses of docs/theory.rst §3 follow as A^l = C^l + gamma0^2 a^l (d^l C^l) and
B^{l-1}_{mu alpha}(t, s) = b^{l-1}_alpha(t, s).

Causality makes a time march exact: block row t of the backward quantities (d, mt, b, W, G)
needs only rows < t of the forward ones (Phi, c, a) and vice versa, and Delta(t) = y - f(t)
needs only rows <= t. So at each step: backward sweep over layers (L .. 1), forward sweep
(1 .. L), then f(t) and Delta(t).

Cost: O(L n^2 T^3) time, O(L n^2 T^2) memory (n = P + Q points, T steps). The only large
arrays are the kernels Phi^l themselves.

Divergence and the largest stable gamma0
----------------------------------------
(I - gamma0^2 C D) is unit block lower-triangular in discrete time, so it is never singular;
instability shows up instead as growth of the trajectory at large gamma0 * lr (the NTK grows
with gamma0 ``|y|`` while the step lr stays fixed; edge of stability: lr K > 2). The march stops
and reports ``diverged_at`` when the training loss exceeds ``divergence`` times its initial
value or any value is not finite. :func:`max_stable_gamma0` defines the largest stable
gamma0 operationally: the first gamma0 (scanning upward, then bisecting) at which T steps of
gradient descent fail to lower the training loss or diverge.

Beyond one squared-error output
-------------------------------
C outputs, every loss, weight decay and mini-batches (docs/theory.rst §7) are solved by
:func:`march_general` (same algebra over the backward index (t, c); see its docstring), checked
by :func:`verify_general`; :func:`march` and the whitened fast path serve the plain problem
only, so its numbers stay bit for bit.

Flattened layout
----------------
Internally a point-time index (t, mu) is flattened to ``t * n + mu`` (time major), so a time
block row is a contiguous slice. ``Phi[l]`` is (n (T+1), n (T+1)); ``c``, ``a`` are
(n (T+1), T+1); ``d``, ``b``, ``E`` are (T+1, n (T+1)); ``mt``, ``W``, ``G`` are (T+1, T+1).
"""
from __future__ import annotations

import math

import numpy as np

from .layout import causal_mask, two_time

__all__ = ["march", "full_responses", "verify", "whitened_reduction", "max_stable_gamma0",
           "two_time", "march_general", "verify_general", "full_responses_general"]


def _check_inputs(kx, y, depth, gamma0, lr, steps):
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
        t0 = diverged_at
        f[t0:] = np.nan
        ntk[t0:] = np.nan
        delta[t0:] = np.nan
        for l in range(L):
            Phi[l][t0 * n:, :] = np.nan
            Phi[l][:, t0 * n:] = np.nan
        G[:, t0:, :] = np.nan
        G[:, :, t0:] = np.nan
    return {"f": f, "ntk": ntk, "Phi": Phi, "G": G[:L].copy(), "a": a, "c": c, "d": d,
            "b": b[:L].copy(), "mt": mt, "E": E, "W": W, "delta": delta,
            "diverged_at": diverged_at, "message": message,
            "shape": {"n": n, "P": P, "T1": T1, "L": L}}


def _step(t, kx, y, n, P, L, g2, lr, Phi, G, c, a, d, b, mt, E, W, f, delta, ntk, loss0,
          divergence):
    """One time step of :func:`march`: block row t of every quantity, then f(t), Delta(t).

    Writes into the preallocated arrays; returns (diverged_at, message).
    """
    diverged_at, message = None, ""
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
        if t > 0:
            at = al[rt, :t]
            row += g2 * (at @ El[:t, upto]
                         + (El[:t, rt].T + at @ Wl[:t, :t]) @ al[upto, :t].T)
        Phi[l][rt, upto] = row
        Phi[l][past, rt] = row[:, past].T
        blk = row[:, t * n:]
        Phi[l][rt, rt] = 0.5 * (blk + blk.T)
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
    if not (np.all(np.isfinite(f[t])) and np.all(np.isfinite(K))):
        diverged_at = t
        message = f"non-finite values at step {t}"
    elif loss0 > 0 and loss > divergence * loss0:
        diverged_at = t
        message = (f"training loss {loss:.3g} at step {t} exceeds {divergence:g} x its "
                   f"initial value {loss0:.3g}")
    return diverged_at, message


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

    def change(new, old):
        scale = max(1.0, float(np.max(np.abs(old))))
        return float(np.max(np.abs(new - old))) / scale

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
        mt_new = np.linalg.solve(np.eye(T1) - g2 * (d_new @ c_new), np.eye(T1))
        a_new = c_new @ mt_new
        E_new = d_new @ phi_prev
        W_new = g_next + g2 * (E_new @ d_new.T)
        aE = a_new @ E_new
        phi_new = phi_prev + g2 * (aE + aE.T + a_new @ W_new @ a_new.T)
        G_new = mt_new @ W_new @ mt_new.T
        rel += [change(phi_new, Phi[l]), change(G_new, G[l]), change(a_new, a[l])]
        if l > 0:
            rel.append(change(mt_new @ d_new, b[l]))
        if l == L - 1:
            X = mt_new @ (E_new + W_new @ a_new.T)          # (T1, N1)
            f_new = X.reshape(T1, T1, n)[np.arange(T1), np.arange(T1)]
            rel.append(change(f_new, res["f"]))
    return max(rel)


def whitened_reduction(kx, y, rtol: float = 1e-12):
    """Reduce a problem with whitened training inputs to a one-point problem along y.

    Applies when the training block of the input kernel is lambda I_P (always for P = 1).
    With e = y / |y| and u_e = e . u_train (variance lambda), every point's first-layer source
    splits as u_mu = kappa_mu u_e + rho_mu with kappa = K^x[:, :P] e / lambda and rho
    independent of u_e, time-constant, covariance R = K^x - lambda kappa kappa^T, and R e = 0
    on the training block. Since every memory term contracts the data index with Delta (which
    stays along e), all layers inherit the split (derived here; tested against the general
    march):

        f_mu(t) = kappa_mu f_e(t),
        Phi^l_{mu nu}(t, s) = kappa_mu kappa_nu Phi^l_e(t, s) + R_{mu nu},
        G^l(t, s) = G^l_e(t, s),   a^l_mu = kappa_mu a^l_e,   d^l_alpha = e_alpha d^l_e (train),

    where the subscript e marks the one-point problem with input kernel lambda and target |y|.

    Returns
    -------
    None if the training block is not lambda I within ``rtol``; else a dict with ``lam``,
    ``ynorm``, ``e`` (P,), ``kappa`` (n,), ``R`` (n, n).
    """
    kx = np.asarray(kx, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    P = y.size
    ktr = kx[:P, :P]
    lam = float(np.trace(ktr)) / P
    if lam <= 0 or np.max(np.abs(ktr - lam * np.eye(P))) > rtol * lam:
        return None
    ynorm = float(np.sqrt(y @ y))
    e = y / ynorm if ynorm > 0 else np.eye(P)[0]
    kappa = kx[:, :P] @ e / lam
    R = kx - lam * np.outer(kappa, kappa)
    return {"lam": lam, "ynorm": ynorm, "e": e, "kappa": kappa, "R": R}


def expand_whitened(res1: dict, red: dict, n: int, P: int) -> dict:
    """Expand a one-point march result ``res1`` to the n-point problem (see
    :func:`whitened_reduction`). Returns a dict with the same keys as :func:`march`."""
    kappa, e, R = red["kappa"], red["e"], red["R"]
    L, T1 = res1["shape"]["L"], res1["shape"]["T1"]
    N1 = n * T1
    f = res1["f"][:, :1] * kappa[None, :]
    Phi = []
    for l in range(L):
        pe = res1["Phi"][l]                                       # (T1, T1): n = 1
        full = pe[:, None, :, None] * np.outer(kappa, kappa)[None, :, None, :] \
            + R[None, :, None, :]
        Phi.append(full.reshape(N1, N1))
    ecol = np.zeros(n)
    ecol[:P] = e

    def rows(x):        # (L, T1, T1) with index (t, s) -> (L, n T1, T1) rows (t, mu)
        return (x[:, :, None, :] * kappa[None, None, :, None]).reshape(L, N1, T1)

    def cols(x):        # (L, T1, T1) with index (t, s) -> (L, T1, n T1) cols (s, alpha)
        return (x[:, :, :, None] * ecol[None, None, None, :]).reshape(L, T1, N1)

    delta = np.zeros((T1, n))
    delta[:, :P] = res1["delta"][:, :1] * e[None, :]
    ntk = np.empty((T1, n, n))
    Gdiag = [np.diagonal(res1["G"][l]) for l in range(L)]
    kx_full = red["lam"] * np.outer(kappa, kappa) + R
    for t in range(T1):
        K = Gdiag[0][t] * kx_full
        for l in range(L):
            gnext = Gdiag[l + 1][t] if l + 1 < L else 1.0
            K = K + gnext * (kappa[:, None] * kappa[None, :] * res1["Phi"][l][t, t] + R)
        ntk[t] = K
    return {"f": f, "ntk": ntk, "Phi": Phi, "G": res1["G"], "a": rows(res1["a"]),
            "c": rows(res1["c"]), "d": cols(res1["d"]), "b": cols(res1["b"]),
            "mt": res1["mt"], "delta": delta, "diverged_at": res1["diverged_at"],
            "message": res1["message"], "shape": {"n": n, "P": P, "T1": T1, "L": L}}


def solve(kx, y, depth: int, gamma0: float, lr: float, steps: int, *, fast_path="auto",
          divergence: float = 1e8, callback=None) -> dict:
    """:func:`march`, through the whitened one-point reduction when it applies.

    ``fast_path``: ``"auto"`` (use it when the training inputs are whitened, K^x_train =
    lambda I, which includes P = 1), ``True`` (require it) or ``False`` (never).
    The result has ``fast_path`` (bool) added.
    """
    kx, y, L, gamma0, lr, T = _check_inputs(kx, y, depth, gamma0, lr, steps)
    n, P = kx.shape[0], y.size
    red = whitened_reduction(kx, y) if fast_path in ("auto", True) else None
    if fast_path is True and red is None:
        raise ValueError("fast_path=True needs whitened training inputs (X_train X_train^T / D "
                         "= lambda I); use fast_path='auto' or False")
    if red is None or (n == 1):
        res = march(kx, y, L, gamma0, lr, T, divergence=divergence, callback=callback)
        res["fast_path"] = False
        return res
    res1 = march(np.array([[red["lam"]]]), np.array([red["ynorm"]]), L, gamma0, lr, T,
                 divergence=divergence, callback=callback)
    res = expand_whitened(res1, red, n, P)
    res["fast_path"] = True
    return res


def sharpness(kx, y, depth, gamma0, lr, steps, divergence=1e8):
    """max_t lr lambda_max(K_train(t)) along the exact trajectory (inf if it diverged).

    Gradient descent contracts the training error at step t iff the linearised map
    I - lr K_train(t) has spectral radius < 1, i.e. lr lambda_max(K_train(t)) < 2 (the edge of
    stability). Returns the largest value over the T + 1 times.
    """
    res = solve(kx, y, depth, gamma0, lr, steps, divergence=divergence)
    if res["diverged_at"] is not None:
        return math.inf
    P = res["shape"]["P"]
    lam = np.linalg.eigvalsh(res["ntk"][:, :P, :P])[:, -1]
    return float(lr * lam.max())


def max_stable_gamma0(kx, y, depth: int, lr: float, steps: int, *, start: float = 0.25,
                      factor: float = 2.0, gamma_max: float = 1e4, rtol: float = 1e-3,
                      divergence: float = 1e8) -> float:
    """The largest stable gamma0 for gradient descent with step ``lr`` over ``steps`` steps.

    Definition: gamma0 is *stable* when the exact infinite-width trajectory stays below the
    edge of stability at every step, max_t lr lambda_max(K_train(t)) < 2 (every step contracts
    the training error in its linearisation; see :func:`sharpness`), and does not diverge.
    The NTK grows with gamma0 (two-layer, one point, gradient flow: it ends at
    2 sqrt(1 + gamma0^2 y^2), so the edge is gamma0* = sqrt(1 / lr^2 - 1) / |y| there), so the
    first unstable gamma0 is found by scanning upward from ``start`` (multiplying by
    ``factor``) and bisecting in log gamma0 to relative width ``rtol``; the stable end of the
    bracket is returned. Returns ``inf`` if no instability is met below ``gamma_max``, and 0.0
    when even the lazy dynamics are unstable (lr lambda_max(K(0)) >= 2, independent of
    gamma0). Beyond gamma0* the dynamics oscillate; they may still catapult to a flatter
    minimum or diverge (which :func:`march` reports).

    Cost: one march per probe, about log2(gamma_max / start) + log2(1 / rtol) probes.
    """
    def stable(g):
        return sharpness(kx, y, depth, g, lr, steps, divergence) < 2.0

    if not stable(0.0):
        return 0.0
    lo = float(start)
    while not stable(lo):
        lo /= factor
        if lo < 1e-6 * start:
            return 0.0
    hi = lo * factor
    while stable(hi):
        lo, hi = hi, hi * factor
        if lo > gamma_max:
            return math.inf
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        if stable(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------------------
# The general march: C outputs, any loss, weight decay, mini-batches (docs/theory.rst §7)
# ------------------------------------------------------------------------------------------
def march_general(kx, obj, depth: int, gamma0: float, lr: float, steps: int, *,
                  divergence: float = 1e8, callback=None) -> dict:
    """March the deep linear DMFT for any objective (docs/theory.rst §3 and §7).

    The plain problem (one mse output, full batch, no weight decay) has its own path,
    :func:`march`; this one solves C >= 1 outputs, every loss of :mod:`solvers.objective`,
    weight decay toward the initialisation or toward zero, and mini-batch / online schedules.

    Reduction (derived here, checked against :func:`march`, the dense check
    :func:`verify_general` and simulated networks in tests/test_linear_objectives.py)
    -----------------------------------------------------------------------------------
    The backward pass of a linear network never sees the input: z^L_c = w_c and
    z^l = W^{lT} g^{l+1} / sqrt(N), so g^l_{mu c}(t) = z^l_c(t) for every point mu and
    G^l_{mu c, nu c'}(t, s) = G^l_{c c'}(t, s). The backward index is (t, c) (size C T1), the
    forward one (t, mu) (size n T1). With a = 1 - lr lambda, the memory weight
    m(t, s) = a^(t-1-s) (s < t) and the source scale s_t = a^t toward zero (1 otherwise):

        h^l = s (u^l + gamma0 A^{l-1} g^l) + gamma0 Cm^l g^l,
        z^l = s (r^l + gamma0 B^l h^l)     + gamma0 Dm^l h^l,

        Cm^l[(t,mu),(s,c)]  = lr m(t,s) sum_alpha Phi^{l-1}_{mu alpha}(t,s) Delta_{alpha c}(s)
        Dm^l[(t,c),(s,alpha)] = lr m(t,s) sum_c' G^{l+1}_{c c'}(t,s) Delta_{alpha c'}(s)

    (weight decay toward zero: W(t) = a^t W(0) + sum_s a^(t-1-s) lr (...), so the fields carried
    by W(0) -- the sources and the response terms -- are multiplied by a^t; A^l, B^l are the
    responses to the raw sources). With c = S A^{l-1} S + Cm, d = S B^l S + Dm (S = diag(s_t)),
    P~ = S Phi^{l-1} S and G~ = S G^{l+1} S the algebra of :func:`march` carries over:
    mt = (I - gamma0^2 d c)^{-1} (C T1 x C T1, unit lower block-triangular), a = c mt,
    b = mt d, E = d P~, W = G~ + gamma0^2 E d^T, Phi^l = P~ + gamma0^2 [a E + (a E)^T + a W a^T],
    G^l = mt W mt^T, f_{mu c}(t) = [mt (E + W a^T)]((t, c), (t, mu)), and the raw responses
    A^l = a^l S, B^{l-1} = b^l S. G^{L+1}_{c c'} = delta_{c c'} at all times, B^L = 0, A^0 = 0,
    Phi^0 = K^x. Delta(t) = obj.delta(t, f(t)) is evaluated at each step (the march is causal).

    Parameters
    ----------
    kx : array (n, n)
    obj : solvers.objective.Objective
        Loss, targets (P, C), batches, weight decay.
    depth, gamma0, lr, steps, divergence, callback
        As in :func:`march`; the divergence check uses the objective's training loss.

    Returns
    -------
    dict
        ``f`` (T+1, n, C); ``ntk`` (T+1, n, C, n, C); ``Phi`` list of L flat (n T1, n T1);
        ``G`` (L, C T1, C T1) flat over (t, c); ``a``, ``c`` (L, n T1, C T1); ``d``, ``b``, ``E``
        (L, C T1, n T1) (``b[l]`` = B^l before the source scale, ``b[0]`` unused); ``mt``,
        ``W`` (L, C T1, C T1); ``scale`` (T+1,) the source scale s_t; ``delta`` (T+1, n, C)
        (Delta(T), never used by the dynamics, is the full-batch error signal);
        ``diverged_at``, ``message``, ``shape``.
    """
    kx = np.asarray(kx, dtype=np.float64)
    L, T, n, P, C = int(depth), int(steps), kx.shape[0], obj.P, obj.C
    if obj.n != n or obj.steps != T:
        raise ValueError(f"obj: the objective is for n = {obj.n} points and {obj.steps} steps, "
                         f"the problem has n = {n} and steps = {T}; build it with "
                         f"Objective.from_specs(data, train)")
    T1 = T + 1
    N1, M1 = n * T1, C * T1
    g2 = float(gamma0) ** 2
    lr = float(lr)
    scale = np.array([obj.init_scale(t) for t in range(T1)])
    sf = np.repeat(scale, n)            # source scale on the forward index (t, mu)
    sb = np.repeat(scale, C)            # ... and on the backward index (t, c)
    decay_zero = bool(np.any(scale != 1.0))

    Phi0 = np.tile(kx, (T1, T1))
    Phi = [np.zeros((N1, N1)) for _ in range(L)]
    Gout = np.kron(np.ones((T1, T1)), np.eye(C))    # G^{L+1}_{c c'}(t, s) = delta_{c c'}
    G = [np.zeros((M1, M1)) for _ in range(L)] + [Gout]
    c = np.zeros((L, N1, M1))
    a = np.zeros((L, N1, M1))
    d = np.zeros((L, M1, N1))
    b = np.zeros((L + 1, M1, N1))
    mt = np.zeros((L, M1, M1))
    E = np.zeros((L, M1, N1))
    W = np.zeros((L, M1, M1))
    f = np.zeros((T1, n, C))
    delta = np.zeros((T1, n, C))
    ntk = np.zeros((T1, n, C, n, C))
    loss0 = float(obj.loss_at(np.zeros((P, C))))
    eye_c = np.eye(C)

    def phi_prev(l, rows, cols):
        """P~^{l-1}[rows, cols] = s Phi^{l-1} s (the source covariance of layer l)."""
        X = Phi0[rows, cols] if l == 0 else Phi[l - 1][rows, cols]
        if decay_zero:
            X = X * sf[rows][:, None] * sf[cols][None, :]
        return X

    def g_next(l, rows, cols):
        X = G[l + 1][rows, cols]
        if decay_zero:
            X = X * sb[rows][:, None] * sb[cols][None, :]
        return X

    diverged_at, message = None, ""
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T1):
            pf, rf, uf = slice(0, t * n), slice(t * n, (t + 1) * n), slice(0, (t + 1) * n)
            pb, rb, ub = slice(0, t * C), slice(t * C, (t + 1) * C), slice(0, (t + 1) * C)
            mem = obj.memory(t) if t > 0 else None
            dmem = delta[:t] * mem[:, None, None] * lr if t > 0 else None   # (t, n, C)
            # -- backward sweep over layers: rows < t of the forward quantities --------------
            for l in range(L - 1, -1, -1):
                dl, ml, Wl, El = d[l], mt[l], W[l], E[l]
                ml[rb, rb] = eye_c
                if t > 0:
                    Gn = G[l + 1][rb, pb].reshape(C, t, C)
                    row = np.einsum("csk,sak->csa", Gn, dmem).reshape(C, t * n)
                    if l < L - 1:
                        row += scale[t] * b[l + 1][rb, pf] * sf[pf][None, :]
                    dl[rb, pf] = row
                    dc = row @ c[l][pf, pb]
                    ml[rb, pb] = g2 * (dc @ ml[pb, pb])
                    if l > 0:
                        b[l][rb, pf] = ml[rb, ub] @ dl[ub, pf]
                    El[rb, pf] = row @ phi_prev(l, pf, pf)
                    Wl[rb, ub] = g_next(l, rb, ub) + g2 * (El[rb, pf] @ dl[ub, pf].T)
                    Wl[pb, rb] = Wl[rb, pb].T
                    blk = Wl[rb, rb]
                    Wl[rb, rb] = 0.5 * (blk + blk.T)
                else:
                    Wl[rb, rb] = g_next(l, rb, rb)
                V = ml[rb, ub] @ Wl[ub, ub]
                col = ml[ub, ub] @ V.T                      # G^l[(s <= t), (t)]
                G[l][ub, rb] = col
                G[l][rb, ub] = col.T
                blk = col[t * C:]
                G[l][rb, rb] = 0.5 * (blk + blk.T)
            # -- forward sweep over layers: rows <= t of the backward quantities ----------------
            for l in range(L):
                cl, al, El, Wl = c[l], a[l], E[l], W[l]
                if t > 0:
                    prow = (Phi0 if l == 0 else Phi[l - 1])[rf, pf].reshape(n, t, n)
                    row = np.einsum("msa,sac->msc", prow, dmem).reshape(n, t * C)
                    if l > 0:
                        row += scale[t] * a[l - 1][rf, pb] * sb[pb][None, :]
                    cl[rf, pb] = row
                    al[rf, pb] = row @ mt[l][pb, pb]
                    El[ub, rf] = d[l][ub, pf] @ phi_prev(l, pf, rf)
                prow = phi_prev(l, rf, uf).copy()
                if t > 0:
                    at = al[rf, pb]
                    prow += g2 * (at @ El[pb, uf]
                                  + (El[pb, rf].T + at @ Wl[pb, pb]) @ al[uf, pb].T)
                Phi[l][rf, uf] = prow
                Phi[l][pf, rf] = prow[:, pf].T
                blk = prow[:, t * n:]
                Phi[l][rf, rf] = 0.5 * (blk + blk.T)
            # -- output, error signal, NTK ---------------------------------------------------
            l = L - 1
            if t > 0:
                X = mt[l][rb, ub] @ (E[l][ub, rf] + W[l][ub, pb] @ a[l][rf, pb].T)   # (C, n)
                f[t] = X.T
            K = np.einsum("ab,cd->acbd", kx, G[0][rb, rb])
            for l in range(L):
                K = K + np.einsum("ab,cd->acbd", Phi[l][rf, rf], G[l + 1][rb, rb])
            ntk[t] = K
            if t < T or obj.mask is None:
                delta[t] = obj.delta(t, f[t])
            else:   # Delta(T) is never used by the dynamics: the full-batch error signal
                delta[t, :P] = _full_error(obj, f[t])
            loss = float(obj.loss_at(f[t, :P]))
            if callback is not None:
                callback(t)
            if not (np.all(np.isfinite(f[t])) and np.all(np.isfinite(K))):
                diverged_at, message = t, f"non-finite values at step {t}"
            elif loss0 > 0 and loss > divergence * loss0:
                diverged_at = t
                message = (f"training loss {loss:.3g} at step {t} exceeds {divergence:g} x its "
                           f"initial value {loss0:.3g}")
            if diverged_at is not None:
                break

    G = np.stack(G[:L])
    if diverged_at is not None:
        t0 = diverged_at
        f[t0:] = np.nan
        ntk[t0:] = np.nan
        delta[t0:] = np.nan
        for l in range(L):
            Phi[l][t0 * n:, :] = np.nan
            Phi[l][:, t0 * n:] = np.nan
        G[:, t0 * C:, :] = np.nan
        G[:, :, t0 * C:] = np.nan
    return {"f": f, "ntk": ntk, "Phi": Phi, "G": G, "a": a, "c": c, "d": d, "b": b[:L].copy(),
            "mt": mt, "E": E, "W": W, "delta": delta, "scale": scale,
            "diverged_at": diverged_at, "message": message,
            "shape": {"n": n, "P": P, "C": C, "T1": T1, "L": L}}


def _full_error(obj, F):
    """Delta on the training rows without the batch mask."""
    from .objective import error_signal
    return error_signal(obj.loss, obj._shift(np.asarray(F)[:obj.P]), obj.Y, **obj.params)


def _memory_matrix(obj, T1):
    """m(t, s) = a^(t-1-s) for s < t, else 0: (T1, T1)."""
    m = np.zeros((T1, T1))
    for t in range(1, T1):
        m[t, :t] = obj.memory(t)
    return m


def verify_general(res: dict, kx, obj, gamma0: float, lr: float) -> float:
    """Residual of one global (dense) evaluation of the equations of :func:`march_general`.

    With Delta taken from the march, every layer's c, d, mt (dense solve), a, b, E, W, Phi, G
    and the output f are recomputed from whole matrices. Returns the largest change relative
    to each field's size (rounding level, ~1e-14, at a fixed point).
    """
    n, T1, L, C = (res["shape"][k] for k in ("n", "T1", "L", "C"))
    N1, M1 = n * T1, C * T1
    g2 = float(gamma0) ** 2
    delta = res["delta"]
    m = _memory_matrix(obj, T1) * lr
    sf = np.repeat(res["scale"], n)
    sb = np.repeat(res["scale"], C)
    Phi, G, a, b = res["Phi"], res["G"], res["a"], res["b"]
    phi0 = np.tile(kx, (T1, T1))
    gout = np.kron(np.ones((T1, T1)), np.eye(C))
    rel = []

    def change(new, old):
        sc = max(1.0, float(np.max(np.abs(old))))
        return float(np.max(np.abs(new - old))) / sc

    for l in range(L):
        phi_prev = phi0 if l == 0 else Phi[l - 1]
        g_next = gout if l == L - 1 else G[l + 1]
        cm = np.einsum("tmsa,sac->tmsc", phi_prev.reshape(T1, n, T1, n), delta)
        cm = (cm * m[:, None, :, None]).reshape(N1, M1)
        dm = np.einsum("tcsk,sak->tcsa", g_next.reshape(T1, C, T1, C), delta)
        dm = (dm * m[:, None, :, None]).reshape(M1, N1)
        c_new = cm + (0.0 if l == 0 else sf[:, None] * a[l - 1] * sb[None, :])
        d_new = dm + (0.0 if l == L - 1 else sb[:, None] * b[l + 1] * sf[None, :])
        mt_new = np.linalg.solve(np.eye(M1) - g2 * (d_new @ c_new), np.eye(M1))
        a_new = c_new @ mt_new
        pt = sf[:, None] * phi_prev * sf[None, :]
        E_new = d_new @ pt
        W_new = sb[:, None] * g_next * sb[None, :] + g2 * (E_new @ d_new.T)
        aE = a_new @ E_new
        phi_new = pt + g2 * (aE + aE.T + a_new @ W_new @ a_new.T)
        G_new = mt_new @ W_new @ mt_new.T
        rel += [change(phi_new, Phi[l]), change(G_new, G[l]), change(a_new, a[l])]
        if l > 0:
            rel.append(change(mt_new @ d_new, b[l]))
        if l == L - 1:
            X = (mt_new @ (E_new + W_new @ a_new.T)).reshape(T1, C, T1, n)
            f_new = X[np.arange(T1), :, np.arange(T1), :].transpose(0, 2, 1)   # (T1, n, C)
            rel.append(change(f_new, res["f"]))
    return max(rel)


def full_responses_general(res: dict, kx, obj, gamma0: float, lr: float):
    """Full-index responses to the raw sources for one output (C = 1), any objective.

    A^l_{mu alpha}(t, s) = gamma0^-1 d h^l_mu(t) / d r^l_alpha(s) = [M^l C^l S](t mu, s alpha)
    with C^l = S A^{l-1} S + lr m(t, s) Phi^{l-1} Delta(s) (s < t), M^l = I + gamma0^2 a^l d^l;
    B^{l-1}_{mu alpha}(t, s) = [b^l S](t, (s, alpha)) for every mu. Returns (A, B) flat
    (L-1, n T1, n T1) each, or (None, None) for L = 1.
    """
    n, T1, L, C = (res["shape"][k] for k in ("n", "T1", "L", "C"))
    if C != 1:
        raise ValueError("full_responses_general: one output only (C = 1)")
    if L == 1:
        return None, None
    N1 = n * T1
    g2 = float(gamma0) ** 2
    m = _memory_matrix(obj, T1) * lr
    sf = np.repeat(res["scale"], n)
    dcol = np.nan_to_num(res["delta"][:, :, 0])              # (T1, n)
    A = np.empty((L - 1, N1, N1))
    B = np.empty((L - 1, N1, N1))
    prev = np.zeros((N1, N1))
    for l in range(L - 1):              # layer l + 1
        phi_prev = np.tile(kx, (T1, T1)) if l == 0 else res["Phi"][l - 1]
        mem = (phi_prev.reshape(T1, n, T1, n) * (m[:, None, :, None] * dcol[None, None, :, :]))
        Cl = sf[:, None] * prev * sf[None, :] + mem.reshape(N1, N1)
        A[l] = (Cl + g2 * (res["a"][l] @ (res["d"][l] @ Cl))) * sf[None, :]
        prev = A[l]
        B[l] = np.repeat(res["b"][l + 1] * sf[None, :], n, axis=0)
    return A, B
