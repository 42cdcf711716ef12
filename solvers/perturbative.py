"""Leading-order perturbation theory in gamma0^2 around the lazy dynamics (THEORY.md §4).

Deep linear networks (:func:`linear_expansion`, exact and deterministic) and two-layer networks
with a smooth activation (:func:`two_layer_expansion`, Gaussian expectations at t = 0 by Monte
Carlo; derivation in the comment block above it), in exact discrete time (gradient descent with
step ``lr``). The engines return the zeroth- and second-order coefficients of every order parameter,

    q(gamma0) = q0 + gamma0^2 q2 + O(gamma0^4),

so that a caller can evaluate the expansion at any gamma0 without re-solving.

Derivation (for this engine; checked against the exact solver :mod:`solvers.linear`)
-------------------------------------------------------------------------------------
Flatten (t, mu) into one index I = t * n + mu (time-major, n = P + Q points). THEORY.md §3
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
(lr -> 0) the expansion 2 + 4 gamma0^2 v^2 of 2 cosh 2 gamma0 v (THEORY.md §3), the paper's
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
lr^2 gamma0^2 Delta^2 f term of THEORY.md §3's exact recursion).

Cost: dense (n(T+1))^2 matrices, a few GEMMs of that size per layer (O(L n^3 T^3)).
"""
from __future__ import annotations

import numpy as np

__all__ = ["lazy_dynamics", "linear_expansion", "evaluate", "flat_to_two_time"]


def lazy_dynamics(K0: np.ndarray, y: np.ndarray, lr: float, T: int):
    """Static-NTK dynamics f(t+1) = f(t) + lr K0 Delta(t) (THEORY.md §4).

    Parameters
    ----------
    K0 : array (n, n)
        Frozen NTK over train + test points (train first).
    y : array (P,)
        Training targets.
    lr : float
    T : int
        Steps.

    Returns
    -------
    f : array (T+1, n)
        Predictions, f(0) = 0.
    delta : array (T+1, n)
        Error signal y - f on the training points, 0 on test points.
    """
    P, n = y.shape[0], K0.shape[0]
    f = np.zeros((T + 1, n))
    delta = np.zeros((T + 1, n))
    for t in range(T + 1):
        delta[t, :P] = y - f[t, :P]
        if t < T:
            f[t + 1] = f[t] + lr * K0 @ delta[t]
    return f, delta


def _causal(kernel_flat: np.ndarray, delta: np.ndarray, lr: float, T1: int, n: int):
    """lr * tril_{-1}[kernel . Delta]: entry [(t,mu),(s,a)] = lr kernel Delta_a(s) for s < t."""
    out = lr * kernel_flat * delta.reshape(1, T1 * n)
    mask = np.tril(np.ones((T1, T1), dtype=bool), k=-1)
    return out * np.kron(mask, np.ones((n, n), dtype=bool))


def flat_to_two_time(X: np.ndarray, T1: int, n: int) -> np.ndarray:
    """(T1 n, T1 n) time-major flat matrix -> (T1, T1, n, n) array X[t, s, mu, nu]."""
    return X.reshape(T1, n, T1, n).transpose(0, 2, 1, 3)


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

    f2 = np.zeros((T1, n))
    delta2 = np.zeros((T1, n))
    for t in range(T1):
        if t > 0:
            f2[t] = source2[t] + lr * K0 @ delta2[:t].sum(axis=0)
        delta2[t, :P] = -f2[t, :P]

    phi2 = np.stack([flat_to_two_time(Phi2[l], T1, n) for l in range(1, L + 1)])
    g2 = np.stack([flat_to_two_time(G2[l], T1, n) for l in range(1, L + 1)])
    idx = np.arange(T1)
    ntk2 = np.zeros((T1, n, n))
    for l in range(0, L + 1):
        ntk2 += flat_to_two_time(Phi2[l], T1, n)[idx, idx]
        ntk2 += flat_to_two_time(G2[l + 1], T1, n)[idx, idx] * kx
    ntk0 = np.broadcast_to(K0, (T1, n, n)).copy()
    return {"f0": f0, "f2": f2, "delta0": delta0, "delta2": delta2, "ntk0": ntk0,
            "ntk2": ntk2, "phi2": phi2, "g2": g2, "source2": source2}


def evaluate(expansion: dict, kx: np.ndarray, gamma0: float) -> dict:
    """Evaluate q0 + gamma0^2 q2 for predictions, NTK and two-time kernels.

    ``expansion`` may carry ``phi0``, ``g0`` (L, n, n), the order-0 kernels (default K^x and 1,
    the linear-network values).

    Returns
    -------
    dict
        ``f`` (T+1, n), ``ntk`` (T+1, n, n), ``phi``, ``g`` (L, T+1, T+1, n, n).
    """
    e2 = float(gamma0) ** 2
    # order-0 kernels: K^x and 1 for linear nets, else the static (NNGP) ones passed in
    phi0 = expansion.get("phi0", kx[None])                   # (L or 1, n, n)
    g0 = expansion.get("g0", np.ones((1,) + kx.shape))
    phi = phi0[:, None, None] + e2 * expansion["phi2"]
    g = g0[:, None, None] + e2 * expansion["g2"]
    return {"f": expansion["f0"] + e2 * expansion["f2"],
            "ntk": expansion["ntk0"] + e2 * expansion["ntk2"], "phi": phi, "g": g}


# --------------------------------------------------------------------------------------------
# Two-layer nonlinear networks (L = 1), smooth activations.
#
# Same expansion, same argument for the predictions: at gamma0 = 0, f[Delta](t) =
# lr sum_{s<t} K0 Delta(s) is linear in Delta (K0 the static NTK), and Delta enters the
# gamma0^2 terms only next to another gamma0^2, so f2 = S2 + lr sum_{s<t} K0 Delta2(s) with
# S2 the gamma0^2 coefficient of gamma0^{-1} <w(t) phi(h(t))> at Delta fixed to Delta0.
# With Delta fixed the single-site march (THEORY.md §2, L = 1)
#     h(t+1) = h(t) + gamma0 lr K^x [Delta0(t) . phi'(h(t)) w(t)],
#     w(t+1) = w(t) + gamma0 lr Delta0(t) . phi(h(t))
# is a smooth function of gamma0 for each source (u, r). Pairing (u, r) with (u, -r) makes the
# sample average of w phi(h) exactly odd in gamma0 and those of phi phi^T, g g^T exactly even
# (gamma0 -> -gamma0 with r -> -r maps h -> h, w -> -w). The Taylor coefficients of these
# Gaussian expectations are then extracted by Richardson extrapolation over gamma0 = k eps,
# k = 1, 2, 3 (odd: a1 g + a3 g^3 + a5 g^5; even: c0 + c2 g^2 + c4 g^4), with truncation
# error O(eps^4) relative and rounding O(1e-16 / eps^3). The Gaussian expectations over
# (u, r) at t = 0 are Monte Carlo averages over S antithetic pairs with a caller-supplied
# generator (error O(S^-1/2), reported as a standard error over blocks).
# --------------------------------------------------------------------------------------------

def _two_layer_march(u, r, kx, delta0, gamma0, lr, act):
    """Single-site fields of a two-layer network with Delta fixed to ``delta0``.

    u : (S, n), r : (S,), delta0 : (T+1, n). Returns ``ph`` (T+1, S, n) phi(h(t)),
    ``g`` (T+1, S, n) phi'(h(t)) w(t) and ``w`` (T+1, S).
    """
    from solvers.activations import apply
    T1 = delta0.shape[0]
    S, n = u.shape
    h, w = u.copy(), r.copy()
    ph = np.empty((T1, S, n))
    g = np.empty((T1, S, n))
    ws = np.empty((T1, S))
    for t in range(T1):
        ph[t] = apply(act, h)
        g[t] = apply(act, h, 1) * w[:, None]
        ws[t] = w
        if t + 1 < T1:
            h = h + gamma0 * lr * (g[t] * delta0[t]) @ kx
            w = w + gamma0 * lr * ph[t] @ delta0[t]
    return ph, g, ws


def two_layer_expansion(kx, y, K0, act: str, lr: float, T: int, xi, eps: float = 0.02,
                        blocks: int = 8) -> dict:
    """Order-0 / order-gamma0^2 coefficients for a two-layer network (comment block above).

    Parameters
    ----------
    kx : array (n, n)
        Input kernel over train + test points.
    y : array (P,)
    K0 : array (n, n)
        Static NTK (order 0), e.g. from :func:`solvers.static.static_kernels`.
    act : str
        Smooth activation name ("tanh", "erf", "linear").
    lr, T : float, int
    xi : array (S, n + 1)
        Standard normal draws (drawn by the caller); u = chol(kx) xi[:, :n], r = xi[:, n],
        each used with its antithetic partner (u, -r).
    eps : float
        Richardson step in gamma0.
    blocks : int
        Blocks of samples for the standard error of S2.

    Returns
    -------
    dict
        ``f0``, ``f2``, ``delta0``, ``delta2``, ``source2``, ``source2_se`` (T+1, n);
        ``ntk0``, ``ntk2`` (T+1, n, n); ``phi2``, ``g2`` (1, T+1, T+1, n, n);
        ``a1`` (T+1, n) the sampled order-0 predictions (should equal ``f0``).
    """
    kx = np.asarray(kx, float)
    n, P, T1 = kx.shape[0], len(y), T + 1
    f0, delta0 = lazy_dynamics(K0, np.asarray(y, float), lr, T)
    chol = np.linalg.cholesky(kx + 1e-12 * np.trace(kx) / n * np.eye(n))
    u1 = xi[:, :n] @ chol.T
    u = np.concatenate([u1, u1])
    r = np.concatenate([xi[:, n], -xi[:, n]])
    S = len(r)

    odd, even_phi, even_g = [], [], []
    for k in (1, 2, 3):
        ph, g, ws = _two_layer_march(u, r, kx, delta0, k * eps, lr, act)
        odd.append(_block_means(ws[:, :, None] * ph, blocks))
        even_phi.append(np.einsum("tsa,usb->tuab", ph, ph, optimize=True) / S)
        even_g.append(np.einsum("tsa,usb->tuab", g, g, optimize=True) / S)
    ph0, g0, _ = _two_layer_march(u, r, kx, delta0, 0.0, lr, act)
    phi_0 = np.einsum("tsa,usb->tuab", ph0, ph0, optimize=True) / S
    g_0 = np.einsum("tsa,usb->tuab", g0, g0, optimize=True) / S

    # odd: F(k eps) = a1 (k eps) + a3 (k eps)^3 + a5 (k eps)^5
    V = np.array([[k * eps, (k * eps) ** 3, (k * eps) ** 5] for k in (1, 2, 3)])
    Vi = np.linalg.inv(V)
    blk = np.stack(odd)                                  # (3, blocks, T+1, n)
    coef = np.einsum("ik,kbtn->ibtn", Vi, blk)           # (3, blocks, T+1, n)
    a1, a3 = coef[0].mean(0), coef[1].mean(0)
    a3_se = coef[1].std(0, ddof=1) / np.sqrt(blocks)
    # even: E(k eps) = c0 + c2 (k eps)^2 + c4 (k eps)^4, with c0 measured at gamma0 = 0
    W = np.array([[(k * eps) ** 2, (k * eps) ** 4] for k in (1, 2)])
    Wi = np.linalg.inv(W)
    phi2 = Wi[0, 0] * (even_phi[0] - phi_0) + Wi[0, 1] * (even_phi[1] - phi_0)
    g2 = Wi[0, 0] * (even_g[0] - g_0) + Wi[0, 1] * (even_g[1] - g_0)

    source2 = a3
    f2 = np.zeros((T1, n))
    delta2 = np.zeros((T1, n))
    for t in range(T1):
        if t > 0:
            f2[t] = source2[t] + lr * K0 @ delta2[:t].sum(axis=0)
        delta2[t, :P] = -f2[t, :P]
    idx = np.arange(T1)
    ntk2 = phi2[idx, idx] + g2[idx, idx] * kx           # K = Phi^1 + G^1 . Phi^0
    return {"f0": f0, "f2": f2, "delta0": delta0, "delta2": delta2, "source2": source2,
            "source2_se": a3_se, "ntk0": np.broadcast_to(K0, (T1, n, n)).copy(),
            "ntk2": ntk2, "phi2": phi2[None], "g2": g2[None], "a1": a1}


def _block_means(x, blocks):
    """(blocks, T+1, n) block means over the sample axis 1 of x (T+1, 2 S', n), keeping each
    sample with its antithetic partner (sample i and i + S')."""
    half = x.shape[1] // 2
    edges = np.linspace(0, half, blocks + 1).astype(int)
    return np.stack([np.concatenate([x[:, a:b], x[:, half + a:half + b]], axis=1).mean(axis=1)
                     for a, b in zip(edges[:-1], edges[1:])])
