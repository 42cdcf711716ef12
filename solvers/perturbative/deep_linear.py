"""Perturbation theory in gamma0^2 for deep linear networks, exact (docs/theory.rst §4).

Derivation (for this engine; checked against the exact solver :mod:`solvers.linear`)
-------------------------------------------------------------------------------------
Flatten (t, mu) into one index I = t * n + mu (time-major, n = P + Q points). docs/theory.rst §3
gives, with ``tril`` the strictly causal (s < t) block-lower part and Delta acting on the
column index,

    C^l = A^{l-1} + lr tril[Phi^{l-1} . Delta],      D^l = B^l + lr tril[G^{l+1} . Delta]
    M^l = (I - gamma0^2 C^l D^l)^{-1},               Mt^l = (I - gamma0^2 D^l C^l)^{-1}
    Phi^l = M^l [Phi^{l-1} + gamma0^2 C^l G^{l+1} C^{lT}] M^{lT}
    G^l   = Mt^l [G^{l+1} + gamma0^2 D^l Phi^{l-1} D^{lT}] Mt^{lT}
    A^l = M^l C^l,   B^{l-1} = Mt^l D^l,   Phi^0 = K^x,  G^{L+1} = 1 (all ones),  A^0 = B^L = 0.

and, since h^L = M^L (u^L + gamma0 C^L r^L), z^L = Mt^L (r^L + gamma0 D^L u^L) with u, r
independent,

    f_mu(t) = gamma0^{-1} <z^L_mu(t) h^L_mu(t)> = X[I, I],
    X = Mt^L (D^L Phi^{L-1} + G^{L+1} C^{LT}) M^{LT}.                              (*)

gamma0 enters only through the explicit gamma0^2 factors and through Delta = y - f, so every
quantity is a power series in gamma0^2 (the O(gamma0) and O(gamma0^3) terms vanish).

Order 0 (lazy). M = Mt = I, Phi^l = K^x and G^l = 1 at all times, so with
E = lr tril[K^x . Delta0] and F = lr tril[1 . Delta0] the recursions give
C0^l = l E and D0^l = (L + 1 - l) F, and (*) gives f0(t) = lr (L + 1) sum_{s<t} K^x Delta0(s):
the static-NTK dynamics with K0 = (L + 1) K^x, Delta0 = y - f0 on the training points.

Order 2 (kernels). The gamma0^2 coefficients of Phi and G only need order-0 operators:

    Phi2^l = Phi2^{l-1} + C0^l D0^l K^x + (C0^l D0^l K^x)^T + C0^l 1 C0^{lT}
    G2^l   = G2^{l+1}  + D0^l C0^l 1   + (D0^l C0^l 1)^T   + D0^l K^x D0^{lT}

(Phi2^0 = G2^{L+1} = 0), and the NTK K(t) = sum_{l=0}^{L} G^{l+1}(t,t) . Phi^l(t,t) gives
K2(t) = sum_l [G2^{l+1}(t,t) . K^x + Phi2^l(t,t)]. For one point with K^x = 1, L = 1 this is
K2(t) = 4 v(t)^2 - 2 lr^2 sum_{s<t} Delta0(s)^2 with v = lr sum_{s<t} Delta0(s): in gradient flow
(lr -> 0) the expansion 2 + 4 gamma0^2 v^2 of 2 cosh 2 gamma0 v (docs/theory.rst §3), the paper's
Eq. (13) for P = 1; the -2 lr^2 term is the exact discrete-time correction.

Order 2 (predictions). Split Delta = Delta0 + gamma0^2 Delta2. At gamma0 = 0, (*) is the
linear functional f[Delta](t) = lr sum_{s<t} K0 Delta(s) of the error signal, and Delta enters
the gamma0^2 terms of (*) only next to another gamma0^2, so

    f2(t) = S2(t) + lr sum_{s<t} K0 Delta2(s),    Delta2 = -f2 (train), 0 (test),

a causal recursion. The source S2 is the gamma0^2 coefficient of (*) at fixed Delta = Delta0:
with C2^l = A2^{l-1} + lr tril[Phi2^{l-1} . Delta0], A2^l = C2^l + C0^l D0^l C0^l (A2^0 = 0)
and D2^l = B2^l + lr tril[G2^{l+1} . Delta0], B2^{l-1} = D2^l + D0^l C0^l D0^l (B2^L = 0),

    X2 = D2^L K^x + D0^L Phi2^{L-1} + 1 C2^{LT} + D0^L C0^L X0 + X0 (C0^L D0^L)^T,
    X0 = D0^L K^x + 1 C0^{LT},     S2(t)_mu = X2[I, I].

The gamma0^2 coefficient of f therefore contains both the NTK correction (lr K2 Delta0) and
the discrete-time O(lr^2 gamma0^2) terms (for the one-point two-layer net, the
lr^2 gamma0^2 Delta^2 f term of docs/theory.rst §3's exact recursion).

Cost: dense (n(T+1))^2 matrices, a few GEMMs of that size per layer (O(L n^3 T^3)).
"""
from __future__ import annotations

import numpy as np

from ..layout import two_time
from .core import causal_drive as _causal, lazy_dynamics, second_order_predictions

__all__ = ["linear_expansion"]


def linear_expansion(kx: np.ndarray, y: np.ndarray, L: int, lr: float, T: int) -> dict:
    """Order-0 and order-gamma0^2 coefficients of the deep linear DMFT (module docstring).

    Parameters
    ----------
    kx : array (n, n)
        Input kernel Phi^0 = X X^T / D over train + test points (train first).
    y : array (P,)
        Training targets (P <= n).
    L : int
        Hidden layers.
    lr : float
        Learning rate (discrete time is exact).
    T : int
        Steps.

    Returns
    -------
    dict
        ``f0``, ``f2`` (T+1, n) predictions; ``delta0``, ``delta2`` (T+1, n);
        ``ntk0``, ``ntk2`` (T+1, n, n); ``phi2``, ``g2`` (L, T+1, T+1, n, n) kernel
        corrections (the order-0 kernels are K^x and 1); ``source2`` (T+1, n) the term S2.
    """
    kx = np.asarray(kx, dtype=float)
    y = np.asarray(y, dtype=float)
    n, P, T1 = kx.shape[0], y.shape[0], T + 1
    N = n * T1
    K0 = (L + 1) * kx
    f0, delta0 = lazy_dynamics(K0, y, lr, T)

    KX = np.tile(kx, (T1, T1))                  # Phi^0 (and order-0 Phi^l), time-major flat
    ONE = np.ones((N, N))                       # G^{L+1} (and order-0 G^l)
    E = _causal(KX, delta0, lr, T1, n)
    F = _causal(ONE, delta0, lr, T1, n)
    C0 = [None] + [l * E for l in range(1, L + 1)]                 # index l = 1 .. L
    D0 = [None] + [(L + 1 - l) * F for l in range(1, L + 1)]
    CD = [None] + [C0[l] @ D0[l] for l in range(1, L + 1)]
    DC = [None] + [D0[l] @ C0[l] for l in range(1, L + 1)]

    # kernels at order gamma0^2: Phi2[l], l = 0..L; G2[l], l = 1..L+1
    Phi2 = [np.zeros((N, N))]
    for l in range(1, L + 1):
        a = CD[l] @ KX
        Phi2.append(Phi2[l - 1] + a + a.T + C0[l] @ ONE @ C0[l].T)
    G2 = {L + 1: np.zeros((N, N))}
    for l in range(L, 0, -1):
        b = DC[l] @ ONE
        G2[l] = G2[l + 1] + b + b.T + D0[l] @ KX @ D0[l].T

    # operators at order gamma0^2 with Delta held at Delta0
    A2 = np.zeros((N, N))
    C2 = [None] * (L + 1)
    for l in range(1, L + 1):
        C2[l] = A2 + _causal(Phi2[l - 1], delta0, lr, T1, n)
        A2 = C2[l] + CD[l] @ C0[l]
    B2 = np.zeros((N, N))
    D2 = [None] * (L + 2)
    for l in range(L, 0, -1):
        D2[l] = B2 + _causal(G2[l + 1], delta0, lr, T1, n)
        B2 = D2[l] + DC[l] @ D0[l]

    X0 = D0[L] @ KX + ONE @ C0[L].T
    X2 = (D2[L] @ KX + D0[L] @ Phi2[L - 1] + ONE @ C2[L].T
          + DC[L] @ X0 + X0 @ CD[L].T)
    source2 = np.diag(X2).reshape(T1, n).copy()
    f0_check = np.diag(X0).reshape(T1, n)
    if not np.allclose(f0_check, f0, rtol=1e-10, atol=1e-10 * (1 + np.abs(f0).max())):
        raise RuntimeError("internal check failed: the order-0 matrix form disagrees with the "
                           "static-NTK dynamics")

    f2, delta2 = second_order_predictions(source2, K0, lr, P)

    phi2 = np.stack([two_time(Phi2[l], T1, n) for l in range(1, L + 1)])
    g2 = np.stack([two_time(G2[l], T1, n) for l in range(1, L + 1)])
    idx = np.arange(T1)
    ntk2 = np.zeros((T1, n, n))
    for l in range(0, L + 1):
        ntk2 += two_time(Phi2[l], T1, n)[idx, idx]
        ntk2 += two_time(G2[l + 1], T1, n)[idx, idx] * kx
    ntk0 = np.broadcast_to(K0, (T1, n, n)).copy()
    return {"f0": f0, "f2": f2, "delta0": delta0, "delta2": delta2, "ntk0": ntk0,
            "ntk2": ntk2, "phi2": phi2, "g2": g2, "source2": source2}
