"""One layer of a deep network: the causal operators and the march of its fields.

Per layer l the single-site process (docs/theory.rst §2) is

    h(t) = u(t) + gamma0 sum_{s<t} C(t, s) g(s),
    z(t) = r(t) + gamma0 sum_{s<=t} D(t, s) phi(h(s)),
    C = A^{l-1} + lr tril_{-1}[Phi^{l-1} (.) Delta],  D = B^l + lr tril_{-1}[G^{l+1} (.) Delta]
    g(t) = phi'(h(t)) z(t)

with flat (T1 n, T1 n) operators (time-major index t n + mu, :mod:`solvers.layout`).
Samples of a chunk are batched into one BLAS product per time step (C(t, :t) is shared by
all samples).
"""
from __future__ import annotations

import numpy as np

from ..activations import apply
from ..layout import causal_mask

__all__ = ["causal_operators", "march_layer"]


def causal_operators(phi_prev, g_next, a_prev, b_l, dcol, lr: float, T1: int, n: int):
    """C^l and D^l of docs/theory.rst §3 as flat (T1 n, T1 n) matrices.

    C = A^{l-1} + lr tril_{-1}[Phi^{l-1} (.) Delta],  D = B^l + lr tril_{-1}[G^{l+1} (.) Delta],
    where ``dcol`` (T1 n,) is Delta on the column index (zero on test points) and tril_{-1}
    keeps s < t. ``a_prev`` / ``b_l`` may be None (zero).
    """
    w = lr * np.where(causal_mask(T1, n), dcol[None, :], 0.0)
    C = phi_prev * w
    D = g_next * w
    if a_prev is not None:
        C += a_prev
    if b_l is not None:
        D += b_l
    return C, D


def march_layer(u, r, C, D, gamma0: float, activation: str, T1: int, n: int,
                tblock: int = 8):
    """March S samples of one layer's fields through time (BLAS-batched over samples).

    Parameters
    ----------
    u, r : (S, T1 n) sources (flattened (t, mu)).
    C, D : (T1 n, T1 n) causal operators (C strictly, D weakly lower block-triangular).
    tblock : int
        Times per block. The memory terms of a block of times from all earlier blocks are one
        GEMM with ``tblock * n`` columns (one pass over the history instead of one per time
        step: the per-step products have only n columns and are memory bound); inside the
        block the recursion touches the block's own times only. ``tblock=1`` is the plain
        step-by-step march (tests/_reference.py has its NumPy twin); both give the same
        fields up to rounding.

    Returns
    -------
    H, PH, Z, G : (S, T1 n) pre-activation h, phi(h), z and g = phi'(h) z.
    """
    S = u.shape[0]
    m = T1 * n
    # time-major (m, S) inside: the slice of one time step is contiguous (in the sample-major
    # layout it is n scattered doubles per sample), returned as (S, m) views (Fortran order)
    H = np.empty((m, S))
    PH = np.empty_like(H)
    Z = np.empty_like(H)
    G = np.empty_like(H)
    uT, rT = np.asarray(u).T, np.asarray(r).T
    b = max(1, int(tblock))
    for t0 in range(0, T1, b):
        t1 = min(T1, t0 + b)
        a0, a1 = t0 * n, t1 * n
        if t0:
            # history of earlier blocks: h gets C g(s < t0), z gets D phi(s < t0)
            np.matmul(C[a0:a1, :a0], G[:a0], out=H[a0:a1])
            np.matmul(D[a0:a1, :a0], PH[:a0], out=Z[a0:a1])
        else:
            H[a0:a1] = 0.0
            Z[a0:a1] = 0.0
        for t in range(t0, t1):
            a, e = t * n, (t + 1) * n
            hs = H[a:e]
            if t > t0:
                hs += C[a:e, a0:a] @ G[a0:a]
            hs *= gamma0
            hs += uT[a:e]
            if activation == "tanh":
                np.tanh(hs, out=PH[a:e])
            else:
                PH[a:e] = apply(activation, hs, 0)
            zs = Z[a:e]
            zs += D[a:e, a0:e] @ PH[a0:e]
            zs *= gamma0
            zs += rT[a:e]
            if activation == "tanh":
                gs = G[a:e]
                np.multiply(PH[a:e], PH[a:e], out=gs)
                np.subtract(1.0, gs, out=gs)
                gs *= zs
            else:
                G[a:e] = apply(activation, hs, 1) * zs
    return H.T, PH.T, Z.T, G.T
