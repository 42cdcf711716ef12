"""Reference implementations used only by the tests: plain, literal versions of the engines'
fast kernels (``from _reference import ...``).

- :func:`two_layer_step` (per-sample Numba loop) and :func:`two_layer_step_reference` (NumPy)
  of :func:`solvers.mc.two_layer.two_layer_step_fast`;
- :func:`march_layer_reference` of :func:`solvers.mc.layer.march_layer`;
- :func:`response_reference` (dense per-sample solves) of
  :func:`solvers.mc.responses.response_sums`;
- :func:`march_numpy` of :func:`solvers.fluct.march`;
- :func:`reference_dense` (the literal full-index equations, iterated) of
  :func:`solvers.linear.march`;
- :func:`mc_and_exact_linear`: Monte Carlo solutions of a deep linear network with the exact
  (method="linear") solution as their reference.
"""
import math

import numpy as np

import dmft

from solvers._jit import njit
from solvers.activations import TANH as _TANH, apply
from solvers.activations import dphi as _dphi
from solvers.activations import phi as _phi
from solvers.layout import causal_mask
from solvers.linear import _check_inputs
from solvers.mc.responses import _lam


# --------------------------------------------------------------------------------------------
# solvers.mc: two-layer step, one layer's march, tangents
# --------------------------------------------------------------------------------------------
@njit(inline="always")
def _phi_dphi(act, x):
    """(phi(x), phi'(x)) with one transcendental call for tanh (phi and dphi each call it)."""
    if act == _TANH:
        # tanh x = -expm1(-2|x|) / (2 + expm1(-2|x|)) (sign restored): accurate to a few ulp,
        # also for tiny |x| (expm1: no cancellation)
        e = math.expm1(-2.0 * abs(x))
        p = -e / (2.0 + e)
        if x < 0.0:
            p = -p
        return p, 1.0 - p * p
    return _phi(act, x), _dphi(act, x)


@njit
def two_layer_step(h, w, phi_h, g, drive, wdrive, block, act, fsum):
    """Per-sample Numba loop of :func:`solvers.mc.two_layer.two_layer_step_fast` (same
    arguments, but the activation by its integer code ``act`` and no equal-time sums)."""
    S, n = h.shape
    P = wdrive.shape[1]
    for i in range(S):
        b = i // block
        dw = 0.0
        # axpy order (point index innermost): vectorises without reassociating sums
        for a in range(P):
            dw += wdrive[b, a] * phi_h[i, a]
            ga = g[i, a]
            for mu in range(n):
                h[i, mu] += drive[b, mu, a] * ga
        wi = w[i] + dw
        w[i] = wi
        for mu in range(n):
            p, dp = _phi_dphi(act, h[i, mu])
            phi_h[i, mu] = p
            g[i, mu] = dp * wi
            fsum[b, mu] += wi * p


def two_layer_step_reference(h, w, phi_h, g, drive, wdrive, block, activation, fsum):
    """Plain NumPy version of :func:`two_layer_step` (same arguments, activation by name)."""
    S, n = h.shape
    b = np.arange(S) // block
    P = wdrive.shape[1]
    dw = np.einsum("ia,ia->i", wdrive[b], phi_h[:, :P])
    h += np.einsum("ima,ia->im", drive[b], g[:, :P])
    w += dw
    phi_h[...] = apply(activation, h, 0)
    g[...] = apply(activation, h, 1) * w[:, None]
    np.add.at(fsum, b, w[:, None] * phi_h)


def march_layer_reference(u, r, C, D, gamma0: float, activation: str, T1: int, n: int):
    """Plain step-by-step NumPy march (test reference for :func:`march_layer`)."""
    S = u.shape[0]
    H, PH, Z, G = (np.zeros((S, T1 * n)) for _ in range(4))
    for t in range(T1):
        a, e = t * n, (t + 1) * n
        H[:, a:e] = u[:, a:e] + gamma0 * G[:, :a] @ C[a:e, :a].T
        PH[:, a:e] = apply(activation, H[:, a:e], 0)
        Z[:, a:e] = r[:, a:e] + gamma0 * PH[:, :e] @ D[a:e, :e].T
        G[:, a:e] = apply(activation, H[:, a:e], 1) * Z[:, a:e]
    return H, PH, Z, G


def response_reference(H, Z, C, D, gamma0: float, activation: str, direction: str,
                       relu_eps: float = 0.05):
    """Dense per-sample solve of the tangent systems (test reference for :func:`response_sums`).

    r: A = gamma0^{-1} < Lam1 (I - gamma0 C M)^{-1} gamma0 C Lam1 >;
    u: B = gamma0^{-1} < M (I - gamma0 C M)^{-1} >, with M = Lam2 + gamma0 Lam1 D Lam1.
    Returns the sample mean (before the 1 / gamma0), full (T1 n, T1 n).
    """
    lam1, lam2 = _lam(activation, H, Z, relu_eps)
    m = H.shape[1]
    I = np.eye(m)
    tot = np.zeros((m, m))
    for k in range(H.shape[0]):
        l1, l2 = lam1[k], lam2[k]
        M = np.diag(l2) + gamma0 * (l1[:, None] * D * l1[None, :])
        if direction == "r":
            dh = np.linalg.solve(I - gamma0 * C @ M, gamma0 * C * l1[None, :])
            tot += l1[:, None] * dh
        else:
            tot += M @ np.linalg.solve(I - gamma0 * C @ M, I)
    return tot / H.shape[0]


# --------------------------------------------------------------------------------------------
# solvers.fluct: the two-layer single-site march
# --------------------------------------------------------------------------------------------
def march_numpy(activation: str, u, w0, kx, delta, c):
    """Plain NumPy reference of :func:`march` (vectorised over samples)."""
    T, P = delta.shape
    S, n = u.shape
    h = np.empty((S, T + 1, n))
    w = np.empty((S, T + 1))
    h[:, 0] = u
    w[:, 0] = w0
    for t in range(T):
        ht = h[:, t, :P]
        a = delta[t] * apply(activation, ht, 1)
        h[:, t + 1] = h[:, t] + c * w[:, t, None] * (a @ kx[:, :P].T)
        w[:, t + 1] = w[:, t] + c * (apply(activation, ht, 0) @ delta[t])
    return h, w


# --------------------------------------------------------------------------------------------
# solvers.linear: the dense full-index equations
# --------------------------------------------------------------------------------------------
def reference_dense(kx, y, depth: int, gamma0: float, lr: float, steps: int, *,
                    tol: float = 1e-13, max_iter: int = 2000) -> dict:
    """Plain NumPy reference: the literal full-index equations of docs/theory.rst §3, iterated.

    Every operator is a dense (n (T+1)) x (n (T+1)) matrix: C^l, D^l, M^l = (I - gamma0^2
    C^l D^l)^{-1}, M~^l, and

        Phi^l = M^l [Phi^{l-1} + gamma0^2 C^l G^{l+1} C^{lT}] M^{lT}
        G^l   = M~^l [G^{l+1} + gamma0^2 D^l Phi^{l-1} D^{lT}] M~^{lT}
        A^l = M^l C^l,  B^{l-1} = M~^l D^l,
        f_mu(t) = gamma0^{-1} <z^L_mu(t) h^L_mu(t)>
                = [M~^L (G^{L+1} C^{LT} + D^L Phi^{L-1}) M^{LT}]_{(t mu), (t mu)}

    with G^{L+1} = 1 (all ones), Phi^0 = K^x in every time block. Jacobi iteration over all
    layers and Delta until the largest change is below ``tol``; causality makes it terminate.
    Small problems only (tests): no reduction, no time march, explicit inverses.

    Returns
    -------
    dict with ``f`` (T+1, n), ``Phi`` (L, N1, N1), ``G`` (L, N1, N1), ``A`` (L-1, N1, N1),
    ``B`` (L-1, N1, N1) (``B[l-1]`` = B^l), ``iterations``.
    """
    kx, y, L, gamma0, lr, T = _check_inputs(kx, y, depth, gamma0, lr, steps)
    n, P = kx.shape[0], y.size
    T1 = T + 1
    N1 = n * T1
    g2 = gamma0 * gamma0
    mask = causal_mask(T1, n)
    eye = np.eye(N1)
    phi0 = np.kron(np.ones((T1, T1)), kx)
    ones = np.ones((N1, N1))
    Phi = np.array([phi0] * L)
    G = np.array([ones] * L)
    A = np.zeros((L + 1, N1, N1))   # A[l] = A^l, A[0] = 0
    B = np.zeros((L + 1, N1, N1))   # B[l] = B^l, B[L] = 0
    f = np.zeros((T1, n))
    idx = np.arange(N1)
    for it in range(1, max_iter + 1):
        delta = np.zeros((T1, n))
        delta[:, :P] = y - f[:, :P]
        dcol = delta.ravel()[None, :]
        Phi_n, G_n = np.empty_like(Phi), np.empty_like(G)
        A_n, B_n = np.zeros_like(A), np.zeros_like(B)
        for l in range(1, L + 1):
            phi_prev = phi0 if l == 1 else Phi[l - 2]
            g_next = ones if l == L else G[l]
            C = A[l - 1] + lr * np.where(mask, phi_prev * dcol, 0.0)
            D = B[l] + lr * np.where(mask, g_next * dcol, 0.0)
            M = np.linalg.inv(eye - g2 * C @ D)
            Mt = np.linalg.inv(eye - g2 * D @ C)
            Phi_n[l - 1] = M @ (phi_prev + g2 * C @ g_next @ C.T) @ M.T
            G_n[l - 1] = Mt @ (g_next + g2 * D @ phi_prev @ D.T) @ Mt.T
            A_n[l] = M @ C
            B_n[l - 1] = Mt @ D
            if l == L:
                X = Mt @ (g_next @ C.T + D @ phi_prev) @ M.T
                f_n = X[idx, idx].reshape(T1, n)
        A_n[0] = 0.0
        change = max(np.max(np.abs(Phi_n - Phi)), np.max(np.abs(G_n - G)),
                     np.max(np.abs(A_n - A)), np.max(np.abs(B_n[1:] - B[1:])),
                     np.max(np.abs(f_n - f)))
        Phi, G, A, B, f = Phi_n, G_n, A_n, B_n, f_n
        B[L] = 0.0
        if change < tol:
            break
    return {"f": f, "Phi": Phi, "G": G, "A": A[1:L], "B": B[1:L], "iterations": it,
            "change": change}


def mc_and_exact_linear(depth, data, train, seeds, **mc_options):
    """(method="mc" solutions at each of ``seeds``..., the exact method="linear" solution) of a
    deep linear network of ``depth`` layers."""
    net = dmft.MLP(depth=depth, activation="linear")
    return tuple(dmft.solve(net, data, train, method="mc", seed=s, **mc_options)
                 for s in seeds) + (dmft.solve(net, data, train, method="linear"),)
