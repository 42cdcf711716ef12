"""Specification objects: the network, the data and the training procedure.

All three are frozen, validated dataclasses (vary them with ``dataclasses.replace``).
The one convention of the package (docs/theory.rst §1):

    h^1_mu      = W^0 x_mu / sqrt(D)
    h^{l+1}_mu  = W^l phi(h^l_mu) / sqrt(N)          l = 1 .. L-1
    f_mu        = w . phi(h^L_mu) / (gamma0 N)

all weights i.i.d. N(0, 1), loss = sum_mu 1/2 (f_mu - y_mu)^2, full-batch gradient descent
``theta <- theta - lr * gamma0^2 * N * dLoss/dtheta``, time ``t = k * lr``.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import numpy as np

from solvers.activations import ACTIVATIONS

__all__ = ["MLP", "Dataset", "GradientDescent", "LOSSES"]

LOSSES = ("mse",)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class MLP:
    """A fully connected network with ``depth`` hidden layers of equal width.

    Parameters
    ----------
    depth : int
        L, the number of hidden layers (L = 1 is a two-layer network). Must be >= 1.
    activation : str
        Name of phi: one of ``"linear"``, ``"tanh"``, ``"relu"``, ``"erf"``.
    """

    depth: int = 1
    activation: str = "tanh"

    def __post_init__(self):
        if not _is_int(self.depth) or self.depth < 1:
            raise ValueError(
                f"depth must be an integer >= 1 (number of hidden layers; 1 is a two-layer "
                f"network), got {self.depth!r}")
        object.__setattr__(self, "depth", int(self.depth))
        if not isinstance(self.activation, str):
            raise ValueError(
                f"activation must be a name (a string), one of {sorted(ACTIVATIONS)}, got "
                f"{self.activation!r}")
        if self.activation.lower() not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is unknown; use one of {sorted(ACTIVATIONS)}")
        object.__setattr__(self, "activation", self.activation.lower())

    @property
    def linear(self) -> bool:
        return self.activation == "linear"

    def to_dict(self) -> dict:
        return {"depth": self.depth, "activation": self.activation}


def _as_real(name, a, what):
    """A float64 copy of ``a``; ``what`` (e.g. "a real (P, D) array") is what it must be."""
    if _is_complex(a):
        raise ValueError(f"{name} must be {what}, got complex values; pass the real part "
                         f"(np.real({name})) or split real and imaginary parts into features")
    try:
        return np.array(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be {what}: {exc}") from None


def _is_complex(a) -> bool:
    """Whether ``a`` (an array, or a nested sequence) holds complex numbers."""
    if isinstance(a, (complex, np.complexfloating)):
        return True
    if isinstance(a, (list, tuple)):
        return any(_is_complex(x) for x in a)
    return bool(np.iscomplexobj(a)) if hasattr(a, "dtype") else False


def _finite_readonly(name, a):
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf; remove or impute those entries")
    a.setflags(write=False)
    return a


def _as_matrix(name, X):
    X = _as_real(name, X, "a real (P, D) array")
    if X.ndim == 1:
        raise ValueError(f"{name} must be 2-D with shape (points, input dimension), got shape "
                         f"{X.shape}; use X.reshape(-1, 1) for one feature or X[None] for one point")
    if X.ndim != 2 or X.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D with shape (points, input dimension) and D >= 1, "
                         f"got shape {X.shape}")
    return _finite_readonly(name, X)


def _as_targets(name, y, P):
    y = _as_real(name, y, f"a real array of shape ({P},)")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0].copy()
    if y.shape != (P,):
        raise ValueError(f"{name} must have shape ({P},) (one scalar target per point), got "
                         f"shape {y.shape}")
    return _finite_readonly(name, y)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Training points (and optional passive test points).

    Arrays are copied and made read-only. Kernel indices run over the P + Q points, train first.

    Parameters
    ----------
    X_train : array (P, D)
    y_train : array (P,)
        Scalar targets (one network output).
    X_test : array (Q, D), optional
        Test points: extra kernel indices with error signal zero (they never drive training).
    y_test : array (Q,), optional
        Test targets; only used for ``test_loss``.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def __post_init__(self):
        X = _as_matrix("X_train", self.X_train)
        if X.shape[0] == 0:
            raise ValueError("X_train must hold at least one training point")
        object.__setattr__(self, "X_train", X)
        object.__setattr__(self, "y_train", _as_targets("y_train", self.y_train, X.shape[0]))
        if self.X_test is None:
            if self.y_test is not None:
                raise ValueError("y_test was given without X_test; pass X_test too")
            Xt = np.zeros((0, X.shape[1]))
            Xt.setflags(write=False)
            object.__setattr__(self, "X_test", Xt)
        else:
            Xt = _as_matrix("X_test", self.X_test) if np.size(self.X_test) else \
                np.zeros((0, X.shape[1]))
            if Xt.shape[1] != X.shape[1]:
                raise ValueError(f"X_test has input dimension {Xt.shape[1]} but X_train has "
                                 f"{X.shape[1]}; both need the same number of columns")
            Xt.setflags(write=False)
            object.__setattr__(self, "X_test", Xt)
            if self.y_test is not None:
                object.__setattr__(self, "y_test",
                                   _as_targets("y_test", self.y_test, Xt.shape[0]))

    # sizes -------------------------------------------------------------------------------
    @property
    def P(self) -> int:
        """Number of training points."""
        return self.X_train.shape[0]

    @property
    def Q(self) -> int:
        """Number of test points."""
        return self.X_test.shape[0]

    @property
    def D(self) -> int:
        """Input dimension."""
        return self.X_train.shape[1]

    @property
    def X(self) -> np.ndarray:
        """All inputs, train first, shape (P + Q, D)."""
        return np.concatenate([self.X_train, self.X_test], axis=0)

    @property
    def kx(self) -> np.ndarray:
        """Input kernel Phi^0 = X X^T / D over train + test points, (P + Q, P + Q)."""
        X = self.X
        return X @ X.T / self.D

    def __eq__(self, other):
        if not isinstance(other, Dataset):
            return NotImplemented
        def same(a, b):
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and np.array_equal(a, b)
        return all(same(getattr(self, f), getattr(other, f))
                   for f in ("X_train", "y_train", "X_test", "y_test"))

    __hash__ = None

    def __repr__(self):
        return f"Dataset(P={self.P}, Q={self.Q}, D={self.D}, y_test={'yes' if self.y_test is not None else 'no'})"


@dataclass(frozen=True)
class GradientDescent:
    """Full-batch gradient descent in the mean-field / muP convention.

    ``theta <- theta - lr * gamma0**2 * N * dLoss/dtheta`` for ``steps`` steps; t = k * lr.

    Parameters
    ----------
    gamma0 : float
        Feature-learning strength, >= 0 (0 is the lazy / static-NTK limit).
    lr : float
        Learning rate eta > 0 (also the time step).
    steps : int
        T >= 1, number of gradient steps; results live on T + 1 times.
    loss : str
        ``"mse"``: l(f, y) = (f - y)^2 / 2, summed over points.
    """

    gamma0: float = 1.0
    lr: float = 0.1
    steps: int = 50
    loss: str = "mse"

    def __post_init__(self):
        if not _is_real(self.gamma0) or not np.isfinite(self.gamma0) or self.gamma0 < 0:
            raise ValueError(f"gamma0 must be a finite number >= 0 (feature-learning strength; "
                             f"0 is the lazy limit), got {self.gamma0!r}")
        object.__setattr__(self, "gamma0", float(self.gamma0))
        if not _is_real(self.lr) or not np.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0 (learning rate / time step), "
                             f"got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is not supported; use one of {LOSSES}")

    @property
    def times(self) -> np.ndarray:
        """The T + 1 times k * lr."""
        return np.arange(self.steps + 1) * self.lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_positive_int(name: str, value, hint: str = "") -> int:
    """Validate a positive integer option (samples, width, ...)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer{hint}, got {value!r}")
    return int(value)
