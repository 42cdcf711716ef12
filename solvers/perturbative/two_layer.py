"""Perturbation theory in gamma0^2 for two-layer networks with a smooth activation (L = 1).

Same expansion, same argument for the predictions: at gamma0 = 0, f[Delta](t) =
lr sum_{s<t} K0 Delta(s) is linear in Delta (K0 the static NTK), and Delta enters the
gamma0^2 terms only next to another gamma0^2, so f2 = S2 + lr sum_{s<t} K0 Delta2(s) with
S2 the gamma0^2 coefficient of gamma0^{-1} <w(t) phi(h(t))> at Delta fixed to Delta0.
With Delta fixed the single-site march (docs/theory.rst §2, L = 1)

    h(t+1) = h(t) + gamma0 lr K^x [Delta0(t) . phi'(h(t)) w(t)],
    w(t+1) = w(t) + gamma0 lr Delta0(t) . phi(h(t))

is a smooth function of gamma0 for each source (u, r). Pairing (u, r) with (u, -r) makes the
sample average of w phi(h) exactly odd in gamma0 and those of phi phi^T, g g^T exactly even
(gamma0 -> -gamma0 with r -> -r maps h -> h, w -> -w). The Taylor coefficients of these
Gaussian expectations are then extracted by Richardson extrapolation over gamma0 = k eps,
k = 1, 2, 3 (odd: a1 g + a3 g^3 + a5 g^5; even: c0 + c2 g^2 + c4 g^4), with truncation
error O(eps^4) relative and rounding O(1e-16 / eps^3). The Gaussian expectations over
(u, r) at t = 0 are Monte Carlo averages over S antithetic pairs with a caller-supplied
generator (error O(S^-1/2), reported as a standard error over blocks).
"""
from __future__ import annotations

import numpy as np

from ..activations import apply
from .core import (decay_factor, lazy_dynamics, objective_lazy_dynamics,
                   objective_second_order, second_order_predictions)

__all__ = ["two_layer_expansion", "objective_two_layer_expansion"]


def _two_layer_march(u, r, kx, delta0, gamma0, lr, act):
    """Single-site fields of a two-layer network with Delta fixed to ``delta0``.

    u : (S, n), r : (S,), delta0 : (T+1, n). Returns ``ph`` (T+1, S, n) phi(h(t)),
    ``g`` (T+1, S, n) phi'(h(t)) w(t) and ``w`` (T+1, S).

    Not :func:`solvers.mc.two_layer.march_fixed_delta` (the other engines' march): the same
    update with the products in another order differs by rounding, and the Richardson
    extrapolation over gamma0 = k eps amplifies rounding by ~eps^-3 (1e-16 -> ~1e-11).
    """
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
    f2, delta2 = second_order_predictions(source2, K0, lr, P)
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



# ------------------------------------------------------------------------------------------
# docs/theory.rst §7: C outputs, any smooth loss, mini-batches, weight decay toward the init
# ------------------------------------------------------------------------------------------
def _objective_march(u, r, kx, delta0, gamma0, lr, act, a):
    """The march of :func:`_two_layer_march` with C readouts and weight decay toward the
    initialisation: u (S, n), r (S, C), delta0 (T+1, n, C).

        h(t+1) = u + a (h(t) - u) + gamma0 lr K^x [sum_c Delta0_c(t) . phi'(h(t)) w_c(t)]
        w(t+1) = r + a (w(t) - r) + gamma0 lr Delta0(t)^T phi(h(t))

    (W(t+1) - W(0) = a (W(t) - W(0)) - lr gradient, exact for the two-layer single site).
    Returns ``ph`` (T+1, S, n), ``g`` (T+1, S, n, C) = phi'(h) w_c and ``w`` (T+1, S, C).
    """
    T1 = delta0.shape[0]
    S, n = u.shape
    C = r.shape[1]
    h, w = u.copy(), r.copy()
    ph = np.empty((T1, S, n))
    g = np.empty((T1, S, n, C))
    ws = np.empty((T1, S, C))
    for t in range(T1):
        ph[t] = apply(act, h)
        g[t] = apply(act, h, 1)[:, :, None] * w[:, None, :]
        ws[t] = w
        if t + 1 < T1:
            dh = gamma0 * lr * np.einsum("snc,nc->sn", g[t], delta0[t]) @ kx
            dw = gamma0 * lr * ph[t] @ delta0[t]
            if a == 1.0:
                h, w = h + dh, w + dw
            else:
                h, w = u + a * (h - u) + dh, r + a * (w - r) + dw
    return ph, g, ws


def objective_two_layer_expansion(kx, K0, act: str, lr: float, T: int, xi, objective,
                                  eps: float = 0.02, blocks: int = 8) -> dict:
    """:func:`two_layer_expansion` for the problems of docs/theory.rst §7.

    The argument of the module docstring holds with C readouts w_c (sources r ~ N(0, I_C)):
    the pairing (u, r) <-> (u, -r) keeps <w_c phi(h)> odd and <phi phi^T>, <g_c g_c'^T> even in
    gamma0; the memory terms carry a^(t-1-s) (weight decay toward the initialisation, in the
    march as W(t+1) - W(0) = a (W(t) - W(0)) - lr gradient); the error signal Delta0 is the
    lazy one of the objective (any loss, zero off the batch); the second order sees the loss
    through its Jacobian (:func:`solvers.perturbative.core.objective_second_order`). The NTK
    over (point, output) pairs is K_{mu c, nu c'} = G_{mu c, nu c'} K^x_{mu nu} +
    delta_{cc'} Phi_{mu nu}.

    Parameters
    ----------
    kx, K0 : arrays (n, n)
        Input kernel and static NTK over train + test points.
    act : str
        Smooth activation ("tanh", "erf", "linear").
    lr, T : float, int
    xi : array (S, n + C)
        Standard normal draws: u = chol(kx) xi[:, :n], r = xi[:, n:], each with (u, -r).
    objective : solvers.objective.Objective
    eps, blocks : as in :func:`two_layer_expansion`.

    Returns
    -------
    dict
        ``f0``, ``f2``, ``delta0``, ``delta2``, ``source2``, ``source2_se``, ``a1``
        (T+1, n, C); ``ntk0``, ``ntk2`` (T+1, n, C, n, C); ``phi2`` (1, T+1, T+1, n, n);
        ``g2`` (1, T+1, T+1, n, C, n, C).
    """
    kx = np.asarray(kx, float)
    n, T1, C = kx.shape[0], T + 1, objective.C
    a = decay_factor(objective)
    f0, delta0 = objective_lazy_dynamics(K0, lr, T, objective)
    chol = np.linalg.cholesky(kx + 1e-12 * np.trace(kx) / n * np.eye(n))
    u1 = xi[:, :n] @ chol.T
    u = np.concatenate([u1, u1])
    r = np.concatenate([xi[:, n:n + C], -xi[:, n:n + C]])
    S = len(r)

    def gram(x):
        """(T+1, S, m) -> (T+1, T+1, m, m): sum_s x[t, s, a] x[u, s, b] / S (one GEMM)."""
        m = x.shape[2]
        X = x.transpose(0, 2, 1).reshape(T1 * m, S)
        return (X @ X.T / S).reshape(T1, m, T1, m).transpose(0, 2, 1, 3)

    def gg(g):                                   # (T+1, S, n, C) -> (T+1, T+1, n, C, n, C)
        return gram(g.reshape(T1, S, n * C)).reshape(T1, T1, n, C, n, C)

    odd, even_phi, even_g = [], [], []
    for k in (1, 2, 3):
        ph, g, ws = _objective_march(u, r, kx, delta0, k * eps, lr, act, a)
        prod = (ws[:, :, None, :] * ph[:, :, :, None]).reshape(T1, S, n * C)
        odd.append(_block_means(prod, blocks).reshape(blocks, T1, n, C))
        even_phi.append(gram(ph))
        even_g.append(gg(g))
    ph0, g0, _ = _objective_march(u, r, kx, delta0, 0.0, lr, act, a)
    phi_0 = gram(ph0)
    g_0 = gg(g0)

    V = np.array([[k * eps, (k * eps) ** 3, (k * eps) ** 5] for k in (1, 2, 3)])
    coef = np.einsum("ik,kbtnc->ibtnc", np.linalg.inv(V), np.stack(odd))
    a1, a3 = coef[0].mean(0), coef[1].mean(0)
    a3_se = coef[1].std(0, ddof=1) / np.sqrt(blocks)
    Wi = np.linalg.inv(np.array([[(k * eps) ** 2, (k * eps) ** 4] for k in (1, 2)]))
    phi2 = Wi[0, 0] * (even_phi[0] - phi_0) + Wi[0, 1] * (even_phi[1] - phi_0)
    g2 = Wi[0, 0] * (even_g[0] - g_0) + Wi[0, 1] * (even_g[1] - g_0)

    f2, delta2 = objective_second_order(a3, K0, lr, objective, f0)
    idx = np.arange(T1)
    eye = np.eye(C)
    ntk2 = (np.einsum("tmn,cd->tmcnd", phi2[idx, idx], eye)
            + g2[idx, idx] * kx[None, :, None, :, None])
    ntk0 = np.broadcast_to(np.einsum("mn,cd->mcnd", K0, eye), (T1, n, C, n, C)).copy()
    return {"f0": f0, "f2": f2, "delta0": delta0, "delta2": delta2, "source2": a3,
            "source2_se": a3_se, "ntk0": ntk0, "ntk2": ntk2, "phi2": phi2[None],
            "g2": g2[None], "a1": a1}
