"""Specification objects: the network, the data and the training procedure.

All three are frozen, validated dataclasses (vary them with ``dataclasses.replace``).
The one convention of the package (docs/theory.rst §1):

    h^1_mu      = W^0 x_mu / sqrt(D)
    h^{l+1}_mu  = W^l phi(h^l_mu) / sqrt(N)          l = 1 .. L-1
    f_mu        = w . phi(h^L_mu) / (gamma0 N)

all weights i.i.d. N(0, 1), loss = sum_mu 1/2 (f_mu - y_mu)^2 by default, full-batch gradient
descent ``theta <- theta - lr * gamma0^2 * N * dLoss/dtheta``, time ``t = k * lr``. With C
outputs (targets of shape (P, C)) the readout is a (N, C) matrix; other losses, weight decay
and mini-batches: :class:`GradientDescent` and docs/theory.rst §7.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import numpy as np

from solvers.activations import ACTIVATIONS
from solvers.objective import (DECAY_TO, LOSSES, OFFSETS, SCHEDULES, batch_schedule,
                               check_targets)

__all__ = ["MLP", "Dataset", "GradientDescent", "LOSSES"]


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _set_int(spec, name: str, low: int, hint: str = "") -> None:
    """Validate the field ``name`` of a frozen spec as an integer >= ``low``; store it as int."""
    value = getattr(spec, name)
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{hint}, got {value!r}")
    object.__setattr__(spec, name, int(value))


def _set_real(spec, name: str, positive: bool, hint: str = "") -> None:
    """Validate the field ``name`` of a frozen spec as a finite number > 0 (``positive``) or
    >= 0; store it as float."""
    value = getattr(spec, name)
    if not _is_real(value) or not np.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}"
                         f"{hint}, got {value!r}")
    object.__setattr__(spec, name, float(value))


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
        _set_int(self, "depth", 1, " (number of hidden layers; 1 is a two-layer network)")
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


def _as_targets(name, y, P, C=None):
    """Targets of shape (P,) (one output; (P, 1) is squeezed) or (P, C)."""
    y = _as_real(name, y, f"a real array of shape ({P},) or ({P}, C)")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0].copy()
    if y.ndim == 0 or y.shape[0] != P or y.ndim > 2 or (y.ndim == 2 and y.shape[1] == 0):
        raise ValueError(f"{name} must have shape ({P},) (one output) or ({P}, C) (C outputs), "
                         f"one row per point, got shape {y.shape}")
    if C is not None and (1 if y.ndim == 1 else y.shape[1]) != C:
        raise ValueError(f"{name} has {1 if y.ndim == 1 else y.shape[1]} outputs but y_train "
                         f"has {C}; give both the same number of columns")
    return _finite_readonly(name, y)


def _one_hot(name, labels, classes):
    lab = np.asarray(labels)
    if lab.ndim != 1 or not (np.issubdtype(lab.dtype, np.integer)
                             or (np.issubdtype(lab.dtype, np.floating)
                                 and np.all(lab == np.round(lab)))):
        raise ValueError(f"{name} must be a 1-D array of integer class labels 0 .. C-1, got "
                         f"dtype {lab.dtype} and shape {lab.shape}")
    lab = lab.astype(np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= classes):
        raise ValueError(f"{name} holds labels outside 0 .. {classes - 1} (classes={classes}); "
                         f"relabel them 0 .. C-1 or pass classes=")
    Y = np.zeros((lab.size, classes))
    Y[np.arange(lab.size), lab] = 1.0
    return Y


@dataclass(frozen=True, eq=False)
class Dataset:
    """Training points (and optional passive test points).

    Arrays are copied and made read-only. Kernel indices run over the P + Q points, train first.

    Parameters
    ----------
    X_train : array (P, D)
    y_train : array (P,) or (P, C)
        Targets: one output (P,), or C outputs (P, C) (one-hot rows for cross-entropy: build
        them from integer labels with :meth:`from_labels`; +-1 for logistic and hinge).
    X_test : array (Q, D), optional
        Test points: extra kernel indices with error signal zero (they never drive training).
    y_test : array (Q,) or (Q, C), optional
        Test targets; only used for ``test_loss`` and ``test_accuracy``.
    labels_test : int array (Q,), optional
        Class labels of the test points for a linear probe of the learned representation
        (:func:`dmft.linear_probe`); self-supervised data (:meth:`views`) use them.
    paired : bool
        True for Barlow Twins data: the P training points are 2 M views, views A of M samples
        first, then their views B in the same order (build with :meth:`views` or
        :meth:`augmented`); ``y_train`` is then zeros (P, C) and only fixes C, the embedding
        dimension.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    labels_test: np.ndarray | None = None
    paired: bool = False

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
                                   _as_targets("y_test", self.y_test, Xt.shape[0], self.C))
        if self.labels_test is not None:
            lab = np.asarray(self.labels_test)
            if lab.ndim != 1 or lab.shape[0] != self.Q or not (
                    np.issubdtype(lab.dtype, np.integer)
                    or (np.issubdtype(lab.dtype, np.floating) and np.all(lab == np.round(lab)))):
                raise ValueError(f"labels_test must be {self.Q} integer class labels (one per "
                                 f"test point), got dtype {lab.dtype} and shape {lab.shape}")
            lab = lab.astype(np.int64)
            lab.setflags(write=False)
            object.__setattr__(self, "labels_test", lab)
        if not isinstance(self.paired, (bool, np.bool_)):
            raise ValueError(f"paired must be True or False, got {self.paired!r}")
        object.__setattr__(self, "paired", bool(self.paired))
        if self.paired and self.P % 2:
            raise ValueError(f"paired=True needs an even number of training points (M samples "
                             f"x 2 views), got P = {self.P}; build the data with "
                             f"dmft.Dataset.views(X_a, X_b)")

    @classmethod
    def from_labels(cls, X_train, labels_train, X_test=None, labels_test=None,
                    classes: int | None = None) -> "Dataset":
        """A classification dataset from integer labels 0 .. C-1: one-hot targets (P, C).

        ``classes`` (C) defaults to 1 + the largest label in either split; pass it when a
        class is missing from the data. Train with ``loss="cross_entropy"`` (or ``"mse"`` on
        the one-hot targets).
        """
        found = [np.max(np.asarray(v)) for v in (labels_train, labels_test)
                 if v is not None and np.size(v)]
        if classes is None:
            classes = int(max(found)) + 1 if found else 1
        if not _is_int(classes) or classes < 2:
            raise ValueError(f"classes must be an integer >= 2 (the number of classes), got "
                             f"{classes!r}")
        Y = _one_hot("labels_train", labels_train, int(classes))
        Yt = None if labels_test is None else _one_hot("labels_test", labels_test, int(classes))
        return cls(X_train, Y, X_test, Yt)

    @classmethod
    def views(cls, X_a, X_b, dim: int = 2, X_test=None, labels_test=None) -> "Dataset":
        """Self-supervised data: two views X_a, X_b (M, D) of the same M samples, row by row.

        The training points are the 2 M views, A first (docs/theory.rst §7); ``dim`` is C, the
        embedding dimension (outputs); ``X_test`` (Q, D) with ``labels_test`` (Q,) are passive
        labelled points for the linear probe of the representation (:func:`dmft.linear_probe`).
        Train with ``GradientDescent(loss="barlow_twins", ...)``.
        """
        A = _as_matrix("X_a", X_a)
        B = _as_matrix("X_b", X_b)
        if A.shape != B.shape:
            raise ValueError(f"X_a and X_b must have the same shape (one row per sample, the "
                             f"two views of a sample in the same row), got {A.shape} and "
                             f"{B.shape}")
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1 (embedding dimension C), got "
                             f"{dim!r}")
        P = 2 * A.shape[0]
        y = np.zeros(P) if dim == 1 else np.zeros((P, int(dim)))
        return cls(np.concatenate([A, B]), y, X_test, None, labels_test, True)

    @classmethod
    def augmented(cls, X, augment, dim: int = 2, seed: int = 0, X_test=None,
                  labels_test=None) -> "Dataset":
        """Self-supervised data from samples X (M, D) and an augmentation: two views drawn
        with ``numpy.random.default_rng(seed)`` (:mod:`dmft.augment`: ``gaussian_noise``,
        ``random_mask``, ``shift``; any callable ``augment(X, rng) -> X'``), then
        :meth:`views`."""
        if not callable(augment):
            raise ValueError(f"augment must be a callable augment(X, rng) -> X' (e.g. "
                             f"dmft.augment.gaussian_noise(0.1)), got {augment!r}")
        X = _as_matrix("X", X)
        rng = np.random.default_rng(seed)
        X_a = augment(X.copy(), rng)
        X_b = augment(X.copy(), rng)
        return cls.views(X_a, X_b, dim, X_test, labels_test)

    # sizes -------------------------------------------------------------------------------
    @property
    def M(self) -> int:
        """Number of samples of self-supervised data (P / 2 views), else P."""
        return self.P // 2 if self.paired else self.P

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
    def C(self) -> int:
        """Number of outputs (columns of y_train; 1 for targets of shape (P,))."""
        return 1 if self.y_train.ndim == 1 else self.y_train.shape[1]

    @property
    def multi_output(self) -> bool:
        """Whether the targets carry an output axis (y_train of shape (P, C), C >= 2): results
        then have an output axis too."""
        return self.y_train.ndim == 2

    @property
    def Y_train(self) -> np.ndarray:
        """Training targets as a (P, C) array (a view)."""
        return self.y_train.reshape(self.P, self.C)

    @property
    def Y_test(self) -> np.ndarray | None:
        """Test targets as a (Q, C) array, or None."""
        return None if self.y_test is None else self.y_test.reshape(self.Q, self.C)

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
        return self.paired == other.paired and all(
            same(getattr(self, f), getattr(other, f))
            for f in ("X_train", "y_train", "X_test", "y_test", "labels_test"))

    __hash__ = None

    def __repr__(self):
        c = f", C={self.C}" if self.multi_output else ""
        if self.paired:
            c += f", views of M={self.M} samples"
        return (f"Dataset(P={self.P}, Q={self.Q}, D={self.D}{c}, "
                f"y_test={'yes' if self.y_test is not None else 'no'})")


@dataclass(frozen=True)
class GradientDescent:
    """Gradient descent in the mean-field / muP convention (docs/theory.rst §1, §7).

    ``theta <- theta - lr * (gamma0**2 * N * dLoss/dtheta + weight_decay * (theta - theta_bar))``
    for ``steps`` steps; t = k * lr. The loss is summed over the points of the step's batch.

    Parameters
    ----------
    gamma0 : float
        Feature-learning strength, >= 0 (0 is the lazy / static-NTK limit).
    lr : float
        Learning rate eta > 0 (also the time step).
    steps : int
        T >= 1, number of gradient steps; results live on T + 1 times.
    loss : str
        ``"mse"`` (``|f - y|^2 / 2`` per point, any number of outputs), ``"cross_entropy"``
        (softmax over C >= 2 outputs, one-hot or probability targets), ``"logistic"``
        (log(1 + exp(-y f)), one output, labels +-1) or ``"hinge"`` (max(0, 1 - y f), one
        output, labels +-1).
    weight_decay : float
        lambda >= 0 with ``lr * weight_decay < 1``; 0 (default) is no decay.
    decay_to : str
        ``"init"`` (theta_bar = theta(0), the kernel-machine limit: kernel ridge regression
        for mse, the soft-margin SVM for hinge) or ``"zero"`` (theta_bar = 0, the usual
        weight decay).
    batch_size : int or None
        None (default): full batch. B: each step sums the loss over B training points.
    batch_seed : int
        Seed of the ``"epochs"`` permutations (the same in every method and network, so
        DMFT and networks see the same batches).
    schedule : str
        ``"epochs"``: a fresh permutation each epoch cut into batches of B. ``"online"``:
        step t uses training points t B .. (t + 1) B - 1, each seen once (P >= steps * B).
    off_diagonal : float
        ``loss="barlow_twins"``: the weight lambda_off >= 0 of the off-diagonal
        cross-correlation terms (default 1: L = ||C - I||_F^2).
    standardize : bool
        ``loss="barlow_twins"``: batch-standardise each view's embeddings over the samples,
        per output, before the cross-correlation (default True, as in Barlow Twins).
    output_offset : str
        ``"none"`` (default) or ``"nngp"``: add a fixed function f0 to the output, a draw of
        the network's NNGP kernel Phi^L over all points (independent over outputs; seed
        ``offset_seed``, times ``offset_scale``), the same array in every method and network.
        The O(1) initial output of the Barlow Twins rich regime: in this package's convention
        f(0) -> 0 as N -> infinity, a stationary point of that loss (docs/theory.rst §7).
    offset_scale : float
        Multiplies the offset (> 0).
    offset_seed : int
        Seed of the offset draw.
    """

    gamma0: float = 1.0
    lr: float = 0.1
    steps: int = 50
    loss: str = "mse"
    weight_decay: float = 0.0
    decay_to: str = "init"
    batch_size: int | None = None
    batch_seed: int = 0
    schedule: str = "epochs"
    off_diagonal: float = 1.0
    standardize: bool = True
    output_offset: str = "none"
    offset_scale: float = 1.0
    offset_seed: int = 0

    def __post_init__(self):
        _set_real(self, "gamma0", False, " (feature-learning strength; 0 is the lazy limit)")
        _set_real(self, "lr", True, " (learning rate / time step)")
        _set_int(self, "steps", 1)
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is not supported; use one of {LOSSES}")
        _set_real(self, "weight_decay", False)
        if self.lr * self.weight_decay >= 1.0:
            raise ValueError(f"lr * weight_decay = {self.lr * self.weight_decay:g} must be < 1 "
                             f"(each step multiplies the weights by 1 - lr * weight_decay); "
                             f"lower weight_decay or lr")
        if self.decay_to not in DECAY_TO:
            raise ValueError(f"decay_to must be one of {DECAY_TO} (the point weight decay pulls "
                             f"toward), got {self.decay_to!r}")
        if self.batch_size is not None:
            if not _is_int(self.batch_size) or self.batch_size < 1:
                raise ValueError(f"batch_size must be None (full batch) or an integer >= 1, "
                                 f"got {self.batch_size!r}")
            object.__setattr__(self, "batch_size", int(self.batch_size))
        _set_int(self, "batch_seed", 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "online" and self.batch_size is None:
            raise ValueError("schedule='online' draws fresh points each step: give batch_size "
                             "(points per step)")
        _set_real(self, "off_diagonal", False,
                  " (Barlow Twins weight of the off-diagonal cross-correlations)")
        if not isinstance(self.standardize, (bool, np.bool_)):
            raise ValueError(f"standardize must be True or False, got {self.standardize!r}")
        object.__setattr__(self, "standardize", bool(self.standardize))
        if self.output_offset not in OFFSETS:
            raise ValueError(f"output_offset must be one of {OFFSETS} (a fixed NNGP draw added "
                             f"to the output, or none), got {self.output_offset!r}")
        _set_real(self, "offset_scale", True)
        _set_int(self, "offset_seed", 0)
        if self.loss == "barlow_twins" and self.batch_size is not None:
            raise ValueError("loss='barlow_twins' takes the cross-correlation over all the "
                             "samples: mini-batches are not supported; pass batch_size=None")

    @property
    def times(self) -> np.ndarray:
        """The T + 1 times k * lr."""
        return np.arange(self.steps + 1) * self.lr

    @property
    def plain(self) -> bool:
        """Squared error, full batch, no weight decay, no offset (the original problem)."""
        return (self.loss == "mse" and self.weight_decay == 0.0 and self.batch_size is None
                and self.output_offset == "none")

    @property
    def loss_params(self) -> dict:
        """Options of the loss beyond its name (Barlow Twins: off_diagonal, standardize)."""
        if self.loss == "barlow_twins":
            return {"off_diagonal": self.off_diagonal, "standardize": self.standardize}
        return {}

    def batch_mask(self, P: int) -> np.ndarray | None:
        """Which of the P training points each step uses, (steps, P) bool; None: full batch
        (solvers/objective.py: batch_schedule)."""
        if self.batch_size is not None and self.batch_size > P:
            raise ValueError(f"batch_size={self.batch_size} exceeds the P = {P} training "
                             f"points; pass batch_size <= {P} or None for full batch")
        return batch_schedule(P, self.steps, self.batch_size, self.batch_seed, self.schedule)

    def check(self, data) -> None:
        """ValueError (naming the fix) where ``data`` does not suit this training."""
        paired = getattr(data, "paired", False)
        if self.loss == "barlow_twins" and not paired:
            raise ValueError("loss='barlow_twins' needs two views of each sample: build the data "
                             "with dmft.Dataset.views(X_a, X_b, dim=C) or "
                             "dmft.Dataset.augmented(X, augment, dim=C)")
        if paired and self.loss != "barlow_twins":
            raise ValueError(f"the data are paired views without targets (Dataset.views): "
                             f"train them with loss='barlow_twins', not {self.loss!r}")
        check_targets(self.loss, data.Y_train, "y_train")
        if data.y_test is not None and self.loss not in ("mse", "barlow_twins"):
            check_targets(self.loss, data.Y_test, "y_test")
        self.batch_mask(data.P)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_positive_int(name: str, value, hint: str = "") -> int:
    """Validate a positive integer option (samples, width, ...)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer{hint}, got {value!r}")
    return int(value)
