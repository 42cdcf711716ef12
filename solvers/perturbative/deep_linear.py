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
from .core import decay_factor, objective_lazy_dynamics, objective_second_order

__all__ = ["linear_expansion", "objective_linear_expansion"]


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


# ------------------------------------------------------------------------------------------
# docs/theory.rst §7: C outputs, any smooth loss, mini-batches, weight decay toward the init
# ------------------------------------------------------------------------------------------
def objective_linear_expansion(kx: np.ndarray, L: int, lr: float, T: int, objective) -> dict:
    """The expansion of :func:`linear_expansion` for the problems of docs/theory.rst §7.

    Derivation. The module docstring's argument holds with an output index on every backward
    quantity: flatten the forward index I = (t, mu) (N = n (T+1)) and the backward index
    J = (t, mu, c) (N C entries, output fastest). G^{L+1}_{mu c, nu c'} = delta_{cc'}, so the
    order-0 backward kernel is G0 = 1 (x) I_C; the memory drives become rectangular,

        C^l  = A^{l-1} + lr tril[Phi^{l-1} . Delta]   (N x NC): [(t mu), (s a c)] entry
               lr w(t,s) Phi^{l-1}_{mu a}(t,s) Delta_{a c}(s),
        D^l  = B^l + lr tril[G^{l+1} . Delta]         (NC x N): [(t mu c), (s a)] entry
               lr w(t,s) sum_{c'} G^{l+1}_{mu c, a c'}(t,s) Delta_{a c'}(s),

    with w(t,s) = a^(t-1-s) for s < t (weight decay toward the initialisation, a = 1 - lr
    lambda; 1 without decay) and Delta the error signal of any loss, zero off the batch
    (``objective.delta``). The order-0 and order-gamma0^2 recursions of the module docstring
    then hold verbatim with 1 -> G0 (C0^l = l E, D0^l = (L+1-l) F, E = drive(K^x),
    F = drive(G0)), and f_{mu c}(t) = X[(t mu c), (t mu)]. The lazy dynamics are
    f0(t+1) = a f0(t) + lr K0 Delta0(t) with K0 = (L+1) K^x per output. The loss enters the
    second order only through its Jacobian J = d Delta / d f at f0 (``objective.jacobian``):
    Delta(f0 + gamma0^2 f2) = Delta0 + gamma0^2 J f2 + O(gamma0^4), so

        f2(t) = S2(t) + lr sum_{s<t} a^(t-1-s) K0 Delta2(s),   Delta2(s) = J(s) f2(s) (train).

    For one squared-error output, full batch, no decay this is :func:`linear_expansion`
    (tested to 1e-12). The hinge loss has no Jacobian where y f0 crosses 1 (the map f -> Delta
    jumps), and decay toward zero rescales the sources (docs/theory.rst §7): neither is
    expanded here.

    Parameters
    ----------
    kx : array (n, n)
    L, lr, T : int, float, int
    objective : solvers.objective.Objective
        Loss, targets (P, C), batch mask and the decay factor ``a`` (``decay_to="init"``).

    Returns
    -------
    dict
        ``f0``, ``f2``, ``delta0``, ``delta2`` (T+1, n, C); ``ntk0``, ``ntk2``
        (T+1, n, C, n, C); ``phi2`` (L, T+1, T+1, n, n); ``g2`` (L, T+1, T+1, n, C, n, C);
        ``g0`` (1, n, C, n, C) the order-0 backward kernel; ``source2`` (T+1, n, C).
        ``delta0[T]`` is the full-batch error signal at the last step (it drives nothing).
    """
    kx = np.asarray(kx, dtype=float)
    n, T1, C = kx.shape[0], T + 1, objective.C
    N = n * T1
    a = decay_factor(objective)
    K0 = (L + 1) * kx
    f0, delta0 = objective_lazy_dynamics(K0, lr, T, objective)

    s = np.arange(T1)
    W = np.where(s[:, None] > s[None, :],
                 a ** np.maximum(s[:, None] - 1 - s[None, :], 0).astype(float), 0.0)
    D = delta0.copy()
    D[T] = 0.0                                   # never enters (s < t <= T)

    def drive_c(K):                              # (N, N) -> (N, N C)
        K4 = K.reshape(T1, n, T1, n)
        out = lr * np.einsum("ts,tmsa,sac->tmsac", W, K4, D)
        return out.reshape(N, N * C)

    def drive_d(K):                              # (N C, N C) -> (N C, N)
        K6 = K.reshape(T1, n, C, T1, n, C)
        out = lr * np.einsum("ts,tmcsad,sad->tmcsa", W, K6, D)
        return out.reshape(N * C, N)

    KX = np.tile(kx, (T1, T1))
    G0 = np.kron(np.ones((N, N)), np.eye(C))
    E, F = drive_c(KX), drive_d(G0)
    C0 = [None] + [l * E for l in range(1, L + 1)]
    D0 = [None] + [(L + 1 - l) * F for l in range(1, L + 1)]
    CD = [None] + [C0[l] @ D0[l] for l in range(1, L + 1)]          # (N, N)
    DC = [None] + [D0[l] @ C0[l] for l in range(1, L + 1)]          # (NC, NC)

    Phi2 = [np.zeros((N, N))]
    for l in range(1, L + 1):
        x = CD[l] @ KX
        Phi2.append(Phi2[l - 1] + x + x.T + C0[l] @ G0 @ C0[l].T)
    G2 = {L + 1: np.zeros((N * C, N * C))}
    for l in range(L, 0, -1):
        x = DC[l] @ G0
        G2[l] = G2[l + 1] + x + x.T + D0[l] @ KX @ D0[l].T

    A2 = np.zeros((N, N * C))
    C2 = [None] * (L + 1)
    for l in range(1, L + 1):
        C2[l] = A2 + drive_c(Phi2[l - 1])
        A2 = C2[l] + CD[l] @ C0[l]
    B2 = np.zeros((N * C, N))
    D2 = [None] * (L + 2)
    for l in range(L, 0, -1):
        D2[l] = B2 + drive_d(G2[l + 1])
        B2 = D2[l] + DC[l] @ D0[l]

    X0 = D0[L] @ KX + G0 @ C0[L].T                                  # (NC, N)
    X2 = (D2[L] @ KX + D0[L] @ Phi2[L - 1] + G0 @ C2[L].T
          + DC[L] @ X0 + X0 @ CD[L].T)
    ti, mi = np.meshgrid(np.arange(T1), np.arange(n), indexing="ij")

    def diag(X):                                 # (NC, N) -> (T+1, n, C)
        return X.reshape(T1, n, C, T1, n)[ti, mi, :, ti, mi]

    source2 = diag(X2).copy()
    if not np.allclose(diag(X0), f0, rtol=1e-10, atol=1e-10 * (1 + np.abs(f0).max())):
        raise RuntimeError("internal check failed: the order-0 matrix form disagrees with the "
                           "lazy dynamics")

    f2, delta2 = objective_second_order(source2, K0, lr, objective, f0)

    phi2 = np.stack([two_time(Phi2[l], T1, n) for l in range(1, L + 1)])
    g2 = np.stack([G2[l].reshape(T1, n, C, T1, n, C).transpose(0, 3, 1, 2, 4, 5)
                   for l in range(1, L + 1)])
    g0 = np.einsum("mn,cd->mcnd", np.ones((n, n)), np.eye(C))[None]
    ntk2 = np.zeros((T1, n, C, n, C))
    eye = np.eye(C)
    for l in range(0, L + 1):
        ntk2 += np.einsum("tmn,cd->tmcnd", two_time(Phi2[l], T1, n)[s, s], eye)
        if l + 1 <= L:
            gl = G2[l + 1].reshape(T1, n, C, T1, n, C)[s, :, :, s]   # (T1, n, C, n, C)
            ntk2 += gl * kx[None, :, None, :, None]
    ntk0 = np.broadcast_to(np.einsum("mn,cd->mcnd", K0, eye), (T1, n, C, n, C)).copy()
    return {"f0": f0, "f2": f2, "delta0": delta0, "delta2": delta2, "ntk0": ntk0,
            "ntk2": ntk2, "phi2": phi2, "g2": g2, "g0": g0, "source2": source2}
