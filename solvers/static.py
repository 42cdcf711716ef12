"""Infinite-width kernels at t = 0 and the frozen-kernel (static NTK) dynamics.

docs/theory.rst §4. With the input kernel Phi^0 = X X^T / D over all n = P + Q points,

    Phi^l   = E[phi(u) phi(u)^T],            u ~ N(0, Phi^{l-1}),    l = 1 .. L   (NNGP)
    Gdot^l  = E[phi'(u) phi'(u)^T],          u ~ N(0, Phi^{l-1})
    G^{L+1} = 1,   G^l = G^{l+1} * Gdot^l                                (elementwise)
    K       = sum_{l=0}^{L} G^{l+1} * Phi^l                               (NTK)

and, with the kernel frozen at K, gradient descent on the MSE loss in exact discrete time:

    f(0) = 0,   Delta(t) = y - f_train(t),   f(t+1) = f(t) + lr K[:, train] Delta(t)

for every point (test points follow passively). On the training points this is
f(t) = (I - (I - lr K_train)^t) y, stable iff lr < 2 / lambda_max(K_train).

Beyond one squared-error output (docs/theory.rst §7, :func:`frozen_dynamics_objective`): the
lazy NTK over (point, output) pairs is K_{mu c, nu c'} = delta_cc' K_{mu nu}, so C outputs
decouple in the kernel and couple only through the loss, and with weight decay toward the
initialisation (a = 1 - lr lambda), f - f(0) = K alpha with alpha(t+1) = a alpha(t) +
lr Delta(t), i.e.

    f(0) = 0,   f(t+1) = a f(t) + lr K[:, train] Delta(t),   Delta(t) = objective.delta(t, f(t))

(a kernel machine trained by (sub)gradient descent: kernel ridge regression for the squared
error, the soft-margin SVM for the hinge loss). Batches only mask Delta.
"""
from __future__ import annotations

import numpy as np

from . import gaussian

__all__ = ["static_kernels", "frozen_dynamics", "frozen_dynamics_closed_form",
           "stable_lr", "peak_lr_lambda", "frozen_dynamics_objective"]


def static_kernels(activation: str, kx, depth: int, **quad) -> dict:
    """NNGP and NTK recursions at t = 0 (docs/theory.rst §4).

    Parameters
    ----------
    activation : str
        ``"linear"``, ``"tanh"``, ``"relu"`` or ``"erf"``.
    kx : array (n, n)
        Input kernel Phi^0 = X X^T / D (train points first).
    depth : int
        L >= 1 hidden layers.
    **quad
        Options of :func:`solvers.gaussian.expect` (``order``, ``tol``, ...) for
        activations without closed forms.

    Returns
    -------
    dict with
        ``phi``  (L, n, n): Phi^l, l = 1 .. L;
        ``gdot`` (L, n, n): Gdot^l = E[phi' phi'^T] under N(0, Phi^{l-1});
        ``g``    (L, n, n): G^l, l = 1 .. L;
        ``ntk``  (n, n):    K;
        ``kx``   (n, n):    Phi^0.
    """
    kx = np.array(kx, dtype=np.float64)
    if kx.ndim != 2 or kx.shape[0] != kx.shape[1]:
        raise ValueError(f"kx must be a square (n, n) input kernel, got shape {kx.shape}")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    L, n = int(depth), kx.shape[0]
    phi = np.empty((L + 1, n, n))  # phi[l] = Phi^l, l = 0 .. L
    gdot = np.empty((L, n, n))
    phi[0] = kx
    for l in range(1, L + 1):
        phi[l] = gaussian.nngp(activation, phi[l - 1], **quad)
        gdot[l - 1] = gaussian.derivative_kernel(activation, phi[l - 1], **quad)
    g = np.empty((L, n, n))
    upper = np.ones((n, n))  # G^{L+1}
    for l in range(L, 0, -1):
        upper = upper * gdot[l - 1]
        g[l - 1] = upper
    ntk = phi[L].copy()  # l = L term, G^{L+1} = 1
    for l in range(L):
        ntk += g[l] * phi[l]
    return {"phi": phi[1:], "gdot": gdot, "g": g, "ntk": ntk, "kx": phi[0]}


def stable_lr(K_train) -> float:
    """Largest stable learning rate 2 / lambda_max(K_train) of frozen-kernel MSE descent.

    Returns inf when K_train has no positive eigenvalue (nothing moves).
    """
    lam = float(np.linalg.eigvalsh(np.asarray(K_train, dtype=np.float64)).max())
    return np.inf if lam <= 0 else 2.0 / lam


def peak_lr_lambda(ntk, P: int, lr: float) -> float:
    """max over t of lr lambda_max(K_train(t)) of a (T1, n, n) NTK trajectory (the first P
    points are the training points): gradient descent on the squared error contracts the
    training error at step t iff this is below 2 (the edge of stability; above it the
    residual's top mode grows and flips sign every step). inf if no time is finite."""
    k = np.asarray(ntk, dtype=np.float64)[:, :P, :P]
    k = 0.5 * (k + k.transpose(0, 2, 1))
    finite = np.isfinite(k).all(axis=(1, 2))
    if not finite.any():
        return float("inf")
    return float(lr * np.linalg.eigvalsh(k[finite])[:, -1].max())


def frozen_dynamics(K, y, lr: float, steps: int, out=None) -> np.ndarray:
    """Gradient descent on the MSE loss with the kernel frozen at K, in exact discrete time.

    Parameters
    ----------
    K : array (n, n)
        NTK over all points, the P training points first.
    y : array (P,)
        Training targets.
    lr : float
        Learning rate (time step).
    steps : int
        T.
    out : array (T+1, n), optional
        Preallocated output.

    Returns
    -------
    f : array (T+1, n)
        f[t] on all points: f(0) = 0, f(t+1) = f(t) + lr K[:, :P] (y - f(t)[:P]).
        Unstable steps (lr > 2 / lambda_max) grow geometrically and may overflow to inf;
        the caller decides (see :func:`stable_lr`).
    """
    K = np.asarray(K, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    P = y.shape[0]
    n = K.shape[0]
    f = np.empty((steps + 1, n)) if out is None else out
    f[0] = 0.0
    drive = lr * K[:, :P]
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps):
            f[t + 1] = f[t] + drive @ (y - f[t, :P])
    return f


def frozen_dynamics_objective(K, objective, out=None) -> np.ndarray:
    """Frozen-kernel dynamics for any loss, C outputs, batches and weight decay toward the
    initialisation, in exact discrete time (module docstring; docs/theory.rst §7).

    Parameters
    ----------
    K : array (n, n)
        NTK over all points (the P training points first); the outputs share it
        (K_{mu c, nu c'} = delta_cc' K_{mu nu}).
    objective : solvers.objective.Objective
        Loss, targets (P, C), batch schedule, lr and a = 1 - lr lambda. Weight decay toward
        zero is not a frozen-kernel problem (the initial weights shrink, so the kernel moves
        even as gamma0 -> 0) and raises ValueError.
    out : array (T+1, n, C), optional

    Returns
    -------
    f : array (T+1, n, C)
        f(0) = 0, f(t+1) = a f(t) + lr K[:, :P] Delta(t). Unstable steps may overflow to inf
        (the caller decides).
    """
    obj = objective
    if obj.decays and obj.decay_to == "zero":
        raise ValueError("weight decay toward zero shrinks the initial weights, so the kernel "
                         "moves even as gamma0 -> 0: not a frozen-kernel problem; use "
                         "method='mc' or dmft.simulate, or decay_to='init'")
    K = np.asarray(K, dtype=np.float64)
    n, P, T = K.shape[0], obj.P, obj.steps
    if obj.n != n:
        raise ValueError(f"objective is for n = {obj.n} points but K is {n} x {n}")
    f = np.empty((T + 1, n, obj.C)) if out is None else out
    f[0] = 0.0
    drive = obj.lr * K[:, :P]
    a = obj.a
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T):
            d = obj.delta(t, f[t])[:P]
            f[t + 1] = drive @ d
            if a != 1.0:
                f[t + 1] += a * f[t]
            else:
                f[t + 1] += f[t]
    return f


def frozen_dynamics_closed_form(K, y, lr: float, steps: int) -> np.ndarray:
    """Closed form of :func:`frozen_dynamics` by diagonalising K_train (the test reference).

    With K_train = V diag(lam) V^T and the residual Delta(t) = (I - lr K_train)^t y:
    f_train(t) = y - Delta(t) and f_test(t) = lr K_test,train sum_{k<t} Delta(k), the
    geometric sum taken per eigenvalue (t lr for lam = 0).

    Returns
    -------
    f : array (T+1, n)
    """
    K = np.asarray(K, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    P = y.shape[0]
    lam, V = np.linalg.eigh(K[:P, :P])
    t = np.arange(steps + 1)[:, None]
    c = V.T @ y                                            # y in the eigenbasis
    q = 1.0 - lr * lam
    decay = q[None, :] ** t                                # (T+1, P)
    # sum_{k<t} q^k = (1 - q^t) / (1 - q) = (1 - q^t) / (lr lam); t where lam = 0
    small = np.abs(lr * lam) < 1e-12
    geo = np.where(small[None, :], t.astype(float),
                   (1.0 - decay) / np.where(small, 1.0, lr * lam)[None, :])
    f = np.empty((steps + 1, K.shape[0]))
    f[:, :P] = (c[None, :] * (1.0 - decay)) @ V.T
    f[:, P:] = lr * (c[None, :] * geo) @ (K[P:, :P] @ V).T
    return f
