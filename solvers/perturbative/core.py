"""Pieces shared by the perturbative engines: the lazy dynamics, the causal operator
lr tril[K . Delta], the causal recursion of the second-order predictions and the evaluation
of an expansion at a given gamma0."""
from __future__ import annotations

import numpy as np

from ..layout import causal_mask

__all__ = ["lazy_dynamics", "causal_drive", "second_order_predictions", "evaluate",
           "decay_factor", "objective_lazy_dynamics", "objective_second_order"]


def lazy_dynamics(K0: np.ndarray, y: np.ndarray, lr: float, T: int):
    """Static-NTK dynamics f(t+1) = f(t) + lr K0 Delta(t) (docs/theory.rst §4).

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



def causal_drive(kernel_flat: np.ndarray, delta: np.ndarray, lr: float, T1: int, n: int):
    """lr * tril_{-1}[kernel . Delta]: entry [(t,mu),(s,a)] = lr kernel Delta_a(s) for s < t."""
    out = lr * kernel_flat * delta.reshape(1, T1 * n)
    return out * causal_mask(T1, n)


def second_order_predictions(source2: np.ndarray, K0: np.ndarray, lr: float, P: int):
    """The causal recursion f2(t) = S2(t) + lr sum_{s<t} K0 Delta2(s), Delta2 = -f2 on the
    training points (0 on test points), from the source S2 (T+1, n); returns (f2, delta2)."""
    T1, n = source2.shape
    f2 = np.zeros((T1, n))
    delta2 = np.zeros((T1, n))
    for t in range(T1):
        if t > 0:
            f2[t] = source2[t] + lr * K0 @ delta2[:t].sum(axis=0)
        delta2[t, :P] = -f2[t, :P]
    return f2, delta2


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


# ------------------------------------------------------------------------------------------
# docs/theory.rst §7: the same two pieces for C outputs, any loss, batches, decay to the init
# ------------------------------------------------------------------------------------------
def decay_factor(objective) -> float:
    """a = 1 - lr lambda of weight decay toward the initialisation (1 without decay);
    ValueError for decay toward zero, which these expansions do not cover."""
    if not objective.decays:
        return 1.0
    if objective.decay_to != "init":
        raise ValueError("the perturbative expansions cover weight decay toward the "
                         "initialisation only (decay_to='init')")
    return float(objective.a)


def objective_lazy_dynamics(K0: np.ndarray, lr: float, T: int, objective):
    """Lazy dynamics f(t+1) = a f(t) + lr K0 Delta(t), f(0) = 0, with the objective's error
    signal (``solvers.objective.Objective``: loss, targets (P, C), batches, a).

    Returns ``f`` (T+1, n, C) and ``delta`` (T+1, n, C); ``delta[T]`` is the full-batch error
    signal at the last step (it drives nothing).
    """
    from ..objective import error_signal
    n, C, P = K0.shape[0], objective.C, objective.P
    a = decay_factor(objective)
    f = np.zeros((T + 1, n, C))
    delta = np.zeros((T + 1, n, C))
    for t in range(T):
        delta[t] = objective.delta(t, f[t])
        f[t + 1] = a * f[t] + lr * K0 @ delta[t]
    delta[T, :P] = error_signal(objective.loss, f[T, :P], objective.Y)
    return f, delta


def objective_second_order(source2: np.ndarray, K0: np.ndarray, lr: float, objective, f0):
    """f2(t) = S2(t) + lr sum_{s<t} a^(t-1-s) K0 Delta2(s), Delta2(s) = J(s) f2(s) on the
    training points with J = d Delta / d f at f0 (``objective.jacobian``, zero off the batch);
    S2, f0 (T+1, n, C). Returns (f2, delta2), each (T+1, n, C)."""
    T1, n, C = source2.shape
    P, a = objective.P, decay_factor(objective)
    f2 = np.zeros((T1, n, C))
    delta2 = np.zeros((T1, n, C))
    acc = np.zeros((n, C))                       # sum_{s<t} a^(t-1-s) K0 Delta2(s)
    for t in range(T1):
        if t > 0:
            acc = a * acc + lr * K0 @ delta2[t - 1]
            f2[t] = source2[t] + acc
        if t < T1 - 1:
            J = objective.jacobian(t, f0[t])
            delta2[t, :P] = np.einsum("pcd,pd->pc", J, f2[t, :P])
    return f2, delta2
