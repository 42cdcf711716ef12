"""Result objects: rich, self-describing containers returned by solve / simulate / fluctuations.

Axis conventions (T = steps, P train points, Q test points, n = P + Q, L = depth):

=====================  ===============================  ======================================
field                  shape                            meaning
=====================  ===============================  ======================================
t                      (T+1,)                           times k * lr
train_predictions      (T+1, P)                         f on training points
test_predictions       (T+1, Q)                         f on test points
train_loss, test_loss  (T+1,)                           sum_mu 1/2 (f_mu - y_mu)^2 over the split
ntk                    (T+1, n, n)                      equal-time NTK K(t)
phi, g                 (L, T+1, T+1, n, n)              Phi^l(t, s), G^l(t, s), l = 1 .. L
A, B                   (L-1, T+1, T+1, n, n) or None    responses A^l, B^l, l = 1 .. L-1
=====================  ===============================  ======================================

With C >= 2 outputs (targets of shape (P, C), docs/theory.rst §7) the prediction fields gain a
trailing output axis, ``train_predictions`` (T+1, P, C) and ``test_predictions`` (T+1, Q, C),
and the backward kernels and the NTK run over (point, output) pairs: ``ntk`` (T+1, n, C, n, C)
= K_{mu c, nu c'}(t) and ``g`` (L, T+1, T+1, n, C, n, C) = G^l_{mu c, nu c'}(t, s) (reshape
to (T+1, n C, n C) for the matrix over flattened point-major pairs); ``phi`` has no output
index. C = 1 keeps every shape above. The losses are those of ``train.loss``;
``train_accuracy`` / ``test_accuracy`` (fraction classified right: argmax over outputs, or the
sign for one output) exist for the classification losses and for mse with C >= 2.

``Ensemble`` holds the same prediction, loss and NTK fields with a leading seed axis.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from solvers.objective import accuracy, loss_value

from .specs import MLP, Dataset, GradientDescent

__all__ = ["Solution", "Ensemble", "Fluctuations", "ConvergenceError", "DIMS", "STATUSES"]

#: ``result.status`` -> default ``result.message`` (see :mod:`dmft._method`):
#: "converged" (finished, every check passed), "not_converged" (finished, a check failed:
#: iteration limit, residual above tolerance), "diverged" (the dynamics blew up)
STATUSES = {
    "converged": "converged",
    "not_converged": "did not converge",
    "diverged": "diverged",
}


class ConvergenceError(RuntimeError):
    """A solver did not converge, diverged or met a singular matrix.

    ``result`` holds the partial result (``converged=False``) where one exists.
    """

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


#: named dimensions of every array field (HDF5 dimension scales / xarray dims)
DIMS = {
    "t": ("t",),
    "train_predictions": ("t", "train_point"),
    "test_predictions": ("t", "test_point"),
    "train_loss": ("t",),
    "test_loss": ("t",),
    "ntk": ("t", "point", "point_"),
    "phi": ("layer", "t", "s", "point", "point_"),
    "g": ("layer", "t", "s", "point", "point_"),
    "train_accuracy": ("t",),
    "test_accuracy": ("t",),
    "A": ("response_layer", "t", "s", "point", "point_"),
    "B": ("response_layer", "t", "s", "point", "point_"),
    "residuals": ("iteration",),
    "prediction_cov": ("t", "point", "point_"),
    "ntk_var": ("t", "point", "point_"),
}


#: the dims of the fields that gain output axes with C >= 2 outputs
DIMS_OUTPUTS = {
    "train_predictions": ("t", "train_point", "output"),
    "test_predictions": ("t", "test_point", "output"),
    "ntk": ("t", "point", "output", "point_", "output_"),
    "g": ("layer", "t", "s", "point", "output", "point_", "output_"),
    "prediction_cov": ("t", "point", "output", "point_", "output_"),
    "ntk_var": ("t", "point", "output", "point_", "output_"),
}


def dims(name: str, multi_output: bool = False) -> tuple:
    """Named dimensions of a field (with output axes when ``multi_output``)."""
    if multi_output and name in DIMS_OUTPUTS:
        return DIMS_OUTPUTS[name]
    return DIMS[name]


def _loss(f, y, loss: str = "mse", params=None):
    """The loss of predictions f (..., P) or (..., P, C) against targets y (P,) or (P, C),
    summed over points and outputs (``params``: the loss's options, ``train.loss_params``)."""
    y = np.asarray(y, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if y.ndim == 1:
        y, f = y[:, None], f[..., None]
    return loss_value(loss, f, y, **(params or {}))


def _accuracy(f, y):
    y = np.asarray(y, dtype=np.float64)
    f = np.asarray(f)
    if y.ndim == 1:
        y, f = y[:, None], f[..., None]
    return accuracy(f, y)


class _Status:
    """``converged``, ``status`` and ``message``, kept consistent (mixin of every result).

    A result built without ``status`` gets ``"converged"`` or ``"not_converged"`` from
    ``converged``, and without ``message`` the status's default message.
    """

    def _init_status(self):
        if self.status is None:
            self.status = "converged" if self.converged else "not_converged"
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, got {self.status!r}")
        if self.message is None:
            self.message = STATUSES[self.status]

    def __post_init__(self):
        self._init_status()

    def fail(self, status: str, message: str):
        """Mark the result as failed: ``converged=False`` with ``status`` and ``message``."""
        if status not in STATUSES or status == "converged":
            raise ValueError(f"a failure status is one of {list(STATUSES)[1:]}, got {status!r}")
        self.converged, self.status, self.message = False, status, message
        return self


@dataclass(eq=False)
class _Predictions(_Status):
    """The specification, and losses and all-point predictions, for one solution
    (T+1, ...) or a stack of networks (S, T+1, ...)."""

    net: MLP
    data: Dataset
    train: GradientDescent

    @property
    def train_loss(self) -> np.ndarray:
        """Training loss (``train.loss``, summed over all P training points and the outputs;
        e.g. sum_mu (f_mu - y_mu)^2 / 2), shape (T+1,), or (S, T+1) for an Ensemble."""
        return _loss(self.train_predictions, self.data.y_train, self.train.loss,
                     getattr(self.train, "loss_params", None))

    @property
    def test_loss(self) -> np.ndarray | None:
        """Test loss like ``train_loss``, or None without ``y_test``."""
        if self.data.y_test is None or self.train.loss == "barlow_twins":
            return None
        return _loss(self.test_predictions, self.data.y_test, self.train.loss)

    @property
    def classifies(self) -> bool:
        """Whether accuracies are defined: a classification loss, or mse with C >= 2."""
        if self.train.loss == "barlow_twins":
            return False
        return self.train.loss != "mse" or self.data.multi_output

    @property
    def train_accuracy(self) -> np.ndarray | None:
        """Fraction of training points classified right (argmax over outputs; the sign for
        one output), (T+1,) or (S, T+1); None for one-output mse."""
        if not self.classifies:
            return None
        return _accuracy(self.train_predictions, self.data.y_train)

    @property
    def test_accuracy(self) -> np.ndarray | None:
        """Like ``train_accuracy`` on the test points (None without ``y_test``)."""
        if not self.classifies or self.data.y_test is None or self.data.Q == 0:
            return None
        return _accuracy(self.test_predictions, self.data.y_test)

    @property
    def predictions(self) -> np.ndarray:
        """Predictions on all points, train first, shape (T+1, P+Q) (or (T+1, P+Q, C)), with a
        leading seed axis for an Ensemble."""
        axis = -2 if self.data.multi_output else -1
        return np.concatenate([self.train_predictions, self.test_predictions], axis=axis)


@dataclass(eq=False)
class Solution(_Predictions):
    """Infinite-width (or frozen-kernel) solution of the training dynamics.

    Field shapes: the table in the module docstring (docs/results.rst). ``stderr`` maps
    field names to Monte Carlo standard errors of the same shape (empty for deterministic
    methods). ``extras`` holds
    method-specific arrays (e.g. ``"f_std"``); all arrays there are saved to HDF5 too.
    ``converged``, ``status`` (``"converged"``, ``"not_converged"`` or ``"diverged"``) and
    ``message`` say how the solver ended (:mod:`dmft._method`).
    """

    method: str
    t: np.ndarray
    train_predictions: np.ndarray
    test_predictions: np.ndarray
    ntk: np.ndarray
    phi: np.ndarray
    g: np.ndarray
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    converged: bool = True
    iterations: int = 0
    residuals: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stderr: dict = field(default_factory=dict)
    seed: int | None = None
    elapsed: float = 0.0
    options: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    status: str | None = None
    message: str | None = None

    # derived -----------------------------------------------------------------------------
    @property
    def spec(self) -> dict:
        """The full specification as plain data (what HDF5 files store as attributes)."""
        return {"net": self.net.to_dict(), "train": self.train.to_dict(),
                "method": self.method, "options": dict(self.options), "seed": self.seed}

    @property
    def L(self) -> int:
        return self.net.depth

    @property
    def P(self) -> int:
        return self.data.P

    @property
    def Q(self) -> int:
        return self.data.Q

    def save(self, path) -> None:
        """Write to an HDF5 file (atomic: temporary file, then rename)."""
        from .io import save
        save(self, path)

    def __repr__(self):
        return (f"Solution(method={self.method!r}, L={self.L}, P={self.P}, Q={self.Q}, "
                f"T={self.train.steps}, gamma0={self.train.gamma0}, converged={self.converged}, "
                f"iterations={self.iterations}, status={self.status!r}, "
                f"elapsed={self.elapsed:.2f}s)")


@dataclass(eq=False)
class Ensemble(_Predictions):
    """Finite-width networks trained from ``len(seeds)`` random initialisations.

    Fields as in :class:`Solution` with a leading seed axis S: ``train_predictions``
    (S, T+1, P), ``test_predictions`` (S, T+1, Q), ``ntk`` (S, T+1, n, n) and, when recorded,
    ``phi`` / ``g`` (S, L, T+1, T+1, n, n). ``converged`` is False (``status="diverged"``)
    when a network diverged under ``simulate(..., throw=False)``; its rows are NaN.
    """

    width: int
    seeds: np.ndarray
    t: np.ndarray
    train_predictions: np.ndarray
    test_predictions: np.ndarray
    ntk: np.ndarray
    phi: np.ndarray | None = None
    g: np.ndarray | None = None
    center: bool = False
    elapsed: float = 0.0
    options: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    converged: bool = True
    status: str | None = None
    message: str | None = None

    method = "simulate"

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def spec(self) -> dict:
        return {"net": self.net.to_dict(), "train": self.train.to_dict(), "method": "simulate",
                "width": int(self.width), "center": bool(self.center),
                "options": dict(self.options)}

    def _summary(self, reduce, stderr_of) -> Solution:
        """A Solution of per-field seed statistics ``reduce(a)`` with ``stderr_of(a)``."""
        S = self.n_seeds
        fields = ("train_predictions", "test_predictions", "ntk", "phi", "g")
        stderr = {}
        if S >= 2:
            stderr = {k: stderr_of(getattr(self, k)) for k in fields
                      if getattr(self, k) is not None}
        L, T1, n = self.net.depth, self.t.size, self.data.P + self.data.Q
        nan_k = np.full((L, T1, T1, n, n), np.nan)
        # G runs over (point, output) pairs with C >= 2 outputs (module docstring)
        oc = (self.data.C,) if self.data.multi_output else ()
        nan_g = np.full((L, T1, T1, n) + oc + (n,) + oc, np.nan)
        return Solution(net=self.net, data=self.data, train=self.train, method="simulate",
                        t=self.t, train_predictions=reduce(self.train_predictions),
                        test_predictions=reduce(self.test_predictions), ntk=reduce(self.ntk),
                        phi=reduce(self.phi) if self.phi is not None else nan_k,
                        g=reduce(self.g) if self.g is not None else nan_g,
                        converged=self.converged, status=self.status, message=self.message,
                        stderr=stderr, elapsed=self.elapsed,
                        options=dict(self.options, width=int(self.width),
                                     n_seeds=S, center=bool(self.center)))

    def mean(self) -> Solution:
        """Seed average as a Solution (``stderr`` = standard error of the mean, S >= 2)."""
        S = self.n_seeds
        return self._summary(lambda a: a.mean(axis=0),
                             lambda a: a.std(axis=0, ddof=1) / np.sqrt(S))

    def var(self) -> Solution:
        """Seed variance (ddof=1) as a Solution-shaped object. Multiply by ``width`` for N*Var.

        ``stderr`` is the standard error of the sample variance s^2, from the fourth central
        moment m4 = mean_i (x_i - xbar)^4:  se(s^2)^2 = (m4 - (S-3)/(S-1) s^4) / S (the unbiased
        large-S form of Var[s^2]; clipped at 0). For Gaussian data it is about
        s^2 sqrt(2 / (S-1)).

        Raises
        ------
        ValueError
            With a single seed (S = 1), which has no sample variance.
        """
        S = self.n_seeds
        if S < 2:
            raise ValueError("Ensemble.var() needs at least 2 seeds (the sample variance of one "
                             "network is undefined); simulate with more seeds, e.g. "
                             "seeds=range(16)")

        def se_var(a):
            s2 = a.var(axis=0, ddof=1)
            m4 = ((a - a.mean(axis=0)) ** 4).mean(axis=0)
            return np.sqrt(np.maximum(m4 - (S - 3) / (S - 1) * s2 ** 2, 0.0) / S)

        return self._summary(lambda a: a.var(axis=0, ddof=1), se_var)

    def save(self, path) -> None:
        from .io import save
        save(self, path)

    def __repr__(self):
        return (f"Ensemble(width={self.width}, seeds={self.n_seeds}, L={self.net.depth}, "
                f"P={self.data.P}, Q={self.data.Q}, T={self.train.steps}, "
                f"gamma0={self.train.gamma0}, center={self.center})")


@dataclass(eq=False)
class Fluctuations(_Status):
    """Leading-order finite-width fluctuations: N * Cov over initialisations as N -> infinity.

    ``prediction_cov`` (T+1, n, n): N Cov[f_mu(t), f_nu(t)] at equal times.
    ``ntk_var`` (T+1, n, n): N Var[K_mu,nu(t)] entrywise.
    ``extras``: further covariances (e.g. two-time prediction covariance, kernel covariances).
    ``converged``, ``status``, ``message``: how the computation ended, as for a Solution.
    """

    solution: Solution
    prediction_cov: np.ndarray
    ntk_var: np.ndarray
    center: bool = False
    method: str = ""
    stderr: dict = field(default_factory=dict)
    elapsed: float = 0.0
    options: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    converged: bool = True
    status: str | None = None
    message: str | None = None

    @property
    def t(self) -> np.ndarray:
        return self.solution.t

    @property
    def net(self):
        return self.solution.net

    @property
    def data(self):
        return self.solution.data

    @property
    def train(self):
        return self.solution.train

    @property
    def spec(self) -> dict:
        return dict(self.solution.spec, fluctuations_method=self.method, center=bool(self.center),
                    fluctuations_options=dict(self.options))

    def save(self, path) -> None:
        from .io import save
        save(self, path)
