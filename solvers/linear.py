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

Where the code lives
--------------------
This module is the entry point: :func:`solve` (the plain march, through the whitened one-point
reduction when it applies), :func:`sharpness` and :func:`max_stable_gamma0`. The plain march
with its responses and global check is :mod:`solvers.linear_march`; the general one is
:mod:`solvers.linear_general`. Both are importable from here.

Flattened layout
----------------
Internally a point-time index (t, mu) is flattened to ``t * n + mu`` (time major), so a time
block row is a contiguous slice. ``Phi[l]`` is (n (T+1), n (T+1)); ``c``, ``a`` are
(n (T+1), T+1); ``d``, ``b``, ``E`` are (T+1, n (T+1)); ``mt``, ``W``, ``G`` are (T+1, T+1).
"""
from __future__ import annotations

import math

import numpy as np

from .layout import two_time
from .linear_general import full_responses_general, march_general, verify_general
from .linear_march import _check_inputs, full_responses, march, verify
from .static import peak_lr_lambda

__all__ = ["march", "full_responses", "verify", "whitened_reduction", "max_stable_gamma0",
           "two_time", "march_general", "verify_general", "full_responses_general"]


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
    return peak_lr_lambda(res["ntk"], res["shape"]["P"], lr)


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

