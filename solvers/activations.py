"""Activation functions phi and their derivatives, for NumPy and Numba code.

Each activation has an integer code so that Numba kernels can branch on it without Python
objects. ``phi(code, x)``, ``dphi(code, x)`` and ``ddphi(code, x)`` are scalar jitted
functions; ``apply(name, x, order)`` is the vectorised NumPy path that tests compare against.

ReLU: phi'' is a Dirac delta at 0; ``ddphi`` returns 0 for it and engines that need the
delta handle it explicitly (see ``solvers.mc``).
"""
import math

import numpy as np
from scipy import special

from ._jit import njit

LINEAR, TANH, RELU, ERF = 0, 1, 2, 3
ACTIVATIONS = {"linear": LINEAR, "tanh": TANH, "relu": RELU, "erf": ERF}
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def code(name: str) -> int:
    """Integer code of an activation name (raises ValueError for unknown names)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is unknown; use one of {sorted(ACTIVATIONS)}") from None


@njit(inline="always")
def phi(c, x):
    if c == TANH:
        return math.tanh(x)
    if c == RELU:
        return x if x > 0.0 else 0.0
    if c == ERF:
        return math.erf(x)
    return x


@njit(inline="always")
def dphi(c, x):
    if c == TANH:
        t = math.tanh(x)
        return 1.0 - t * t
    if c == RELU:
        return 1.0 if x > 0.0 else 0.0
    if c == ERF:
        return _TWO_OVER_SQRT_PI * math.exp(-x * x)
    return 1.0


@njit(inline="always")
def ddphi(c, x):
    if c == TANH:
        t = math.tanh(x)
        return -2.0 * t * (1.0 - t * t)
    if c == ERF:
        return -2.0 * x * _TWO_OVER_SQRT_PI * math.exp(-x * x)
    return 0.0  # linear; relu: the delta at 0 is handled by the caller


def apply(name: str, x, order: int = 0):
    """NumPy path: phi (order 0), phi' (1) or phi'' (2; 0 for relu away from the kink)."""
    x = np.asarray(x, dtype=np.float64)
    if name == "linear":
        return x.copy() if order == 0 else (np.ones_like(x) if order == 1 else np.zeros_like(x))
    if name == "tanh":
        t = np.tanh(x)
        return t if order == 0 else (1 - t * t if order == 1 else -2 * t * (1 - t * t))
    if name == "relu":
        return np.maximum(x, 0.0) if order == 0 else (
            (x > 0).astype(np.float64) if order == 1 else np.zeros_like(x))
    if name == "erf":
        if order == 0:
            return special.erf(x)
        d = _TWO_OVER_SQRT_PI * np.exp(-x * x)
        return d if order == 1 else -2 * x * d
    raise ValueError(f"activation {name!r} is unknown; use one of {sorted(ACTIVATIONS)}")
