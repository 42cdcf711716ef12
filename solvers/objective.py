"""What training minimises and how: the loss, its error signal, weight decay and the batches.

docs/theory.rst §7. With C outputs the training predictions are a (P, C) array F and every loss
enters the dynamics only through the error signal

    Delta_{mu c}(t) = - d loss / d f_{mu c}  at f(t),   times 1[mu in batch B(t)],

zero on test points. Losses (summed over the points of the batch):

==============  ==============================  =====================================  ========
loss            loss per point                  Delta                                   targets
==============  ==============================  =====================================  ========
mse             |f - y|^2 / 2                   y - f                                   any real
cross_entropy   -sum_c y_c log softmax(f)_c     y - softmax(f)                          C >= 2, rows
                                                                                        of y are
                                                                                        probabilities
logistic        log(1 + exp(-y f))              y sigma(-y f)                           C = 1, +-1
hinge           max(0, 1 - y f)                 y 1[y f < 1] (a subgradient)            C = 1, +-1
barlow_twins    not per point (below)           -dL/dF through the cross-correlation   none
==============  ==============================  =====================================  ========

Barlow Twins (docs/theory.rst §7; Fleissner, Anil & Ghoshdastidar, arXiv 2411.11176): the P training points are 2 M views, the first M
the views A of M samples and the last M their views B, in the same order. With the (optionally
batch-standardised, per view and output) embeddings Z^A = F[:M], Z^B = F[M:], the
cross-correlation C = Z^A^T Z^B / M (C x C) and

    L_BT = sum_i (1 - C_ii)^2 + lambda_off sum_{i != j} C_ij^2,

whose error signal couples every point and output (:func:`barlow_twins`).

An *output offset* f0 (n, C) -- a fixed function added to the output, e.g. a draw of the NNGP
(:func:`nngp_offset`) -- makes the loss act on f + f0: every method passes its own output f
(f(0) = 0 at infinite width in this package's convention) and the offset is added here, once.

Weight decay ``theta <- theta - lr [gamma0^2 N dLoss/dtheta + lambda (theta - theta_bar)]``
with ``a = 1 - lr lambda``: every memory term ``lr Delta(s)`` of the field equations becomes
``lr a^(t-1-s) Delta(s)`` (:meth:`Objective.memory`); toward zero (``theta_bar = 0``) the terms
carried by the initial weights (sources and responses) are multiplied by ``a^t`` at time t as
well (:meth:`Objective.init_scale`).

Everything here is NumPy; the solvers call :meth:`Objective.delta` once per step.
"""
from __future__ import annotations

import numpy as np

__all__ = ["LOSSES", "PER_POINT_LOSSES", "SCHEDULES", "DECAY_TO", "OFFSETS", "error_signal",
           "loss_value", "loss_jacobian", "accuracy", "batch_schedule", "Objective",
           "check_targets", "barlow_twins", "cross_correlation", "standardize_views",
           "nngp_offset"]

#: losses summed over points (their error signal at a point depends on that point only)
PER_POINT_LOSSES = ("mse", "cross_entropy", "logistic", "hinge")
LOSSES = PER_POINT_LOSSES + ("barlow_twins",)
#: output offsets: none, or a fixed draw of the network's NNGP added to the output
OFFSETS = ("none", "nngp")
SCHEDULES = ("epochs", "online")
DECAY_TO = ("init", "zero")


def _softmax(F):
    z = F - F.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(F):
    z = F - F.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _sigmoid(x):
    out = np.empty_like(x, dtype=np.float64)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def error_signal(loss: str, F, Y, **params) -> np.ndarray:
    """Delta = -d loss / dF for predictions F and targets Y, both (..., C) per point
    (``barlow_twins``: F (..., 2M, C), Y unused, ``params`` off_diagonal and standardize)."""
    F = np.asarray(F, dtype=np.float64)
    if loss == "barlow_twins":
        return barlow_twins(F, **params)[1]
    if loss == "mse":
        return Y - F
    if loss == "cross_entropy":
        return Y - _softmax(F)
    if loss == "logistic":
        return Y * _sigmoid(-Y * F)
    if loss == "hinge":
        return Y * (Y * F < 1.0)
    raise ValueError(f"loss {loss!r} is unknown; use one of {LOSSES}")


def loss_value(loss: str, F, Y, **params) -> np.ndarray:
    """The loss summed over points (axis -2) and outputs (axis -1): shape F.shape[:-2]
    (``barlow_twins``: :func:`barlow_twins` with ``params``)."""
    F = np.asarray(F, dtype=np.float64)
    if loss == "barlow_twins":
        return barlow_twins(F, **params)[0]
    if loss == "mse":
        per = 0.5 * (F - Y) ** 2
    elif loss == "cross_entropy":
        per = -Y * _log_softmax(F)
    elif loss == "logistic":
        m = -Y * F
        per = np.logaddexp(0.0, m)
    elif loss == "hinge":
        per = np.maximum(0.0, 1.0 - Y * F)
    else:
        raise ValueError(f"loss {loss!r} is unknown; use one of {LOSSES}")
    return per.sum(axis=(-2, -1))


def loss_jacobian(loss: str, F, Y) -> np.ndarray:
    """d Delta / d F per point: shape F.shape + (C,) (the C x C block of each point; the loss
    Hessian with a minus sign). Hinge: 0 (the subgradient is piecewise constant)."""
    F = np.asarray(F, dtype=np.float64)
    C = F.shape[-1]
    eye = np.eye(C)
    if loss == "mse":
        return -np.broadcast_to(eye, F.shape + (C,)).copy()
    if loss == "cross_entropy":
        p = _softmax(F)
        return -(p[..., :, None] * eye - p[..., :, None] * p[..., None, :])
    if loss == "logistic":
        s = _sigmoid(F)
        return (-(s * (1.0 - s)))[..., None]
    if loss == "hinge":
        return np.zeros(F.shape + (C,))
    if loss == "barlow_twins":
        raise ValueError("loss='barlow_twins' couples all points and outputs: its Jacobian is "
                         "not per point; methods that need d Delta / d f per point (the "
                         "fluctuation propagators, the perturbative expansion) do not solve it")
    raise ValueError(f"loss {loss!r} is unknown; use one of {LOSSES}")


def accuracy(F, Y) -> np.ndarray:
    """Fraction of points classified right: argmax over outputs (C >= 2) or the sign (C = 1,
    targets +-1). Shape F.shape[:-2]."""
    F = np.asarray(F)
    if F.shape[-1] == 1:
        right = np.sign(F[..., 0]) == np.sign(Y[..., 0])
    else:
        right = np.argmax(F, axis=-1) == np.argmax(Y, axis=-1)
    return right.mean(axis=-1)


def check_targets(loss: str, Y, name: str = "y_train") -> None:
    """ValueError (naming the fix) where the targets Y (P, C) do not suit the loss."""
    C = Y.shape[-1]
    if loss == "barlow_twins":
        return
    if loss in ("logistic", "hinge"):
        if C != 1:
            raise ValueError(
                f"loss={loss!r} has one output (binary labels +-1) but {name} has C = {C} "
                f"outputs; use loss='cross_entropy' for {C} classes, or one column of +-1 labels")
        if not np.all(np.isin(Y, (-1.0, 1.0))):
            bad = Y[~np.isin(Y, (-1.0, 1.0))].ravel()[:3]
            raise ValueError(
                f"loss={loss!r} needs labels +1 / -1 in {name}, found e.g. {bad.tolist()}; "
                f"map them, e.g. y = 2 * y - 1 for 0/1 labels")
    elif loss == "cross_entropy":
        if C < 2:
            raise ValueError(
                f"loss='cross_entropy' needs C >= 2 classes but {name} has one column; pass "
                f"one-hot targets of shape (P, C) (dmft.Dataset.from_labels) or use "
                f"loss='logistic' with +-1 labels for two classes")
        if np.any(Y < 0) or not np.allclose(Y.sum(axis=-1), 1.0, atol=1e-9):
            raise ValueError(
                f"loss='cross_entropy' needs each row of {name} to be a probability vector "
                f"(one-hot labels: dmft.Dataset.from_labels(X, labels)); rows found with "
                f"negative entries or sums != 1")
    elif loss != "mse":
        raise ValueError(f"loss {loss!r} is unknown; use one of {LOSSES}")


# ------------------------------------------------------------------------------------------
# Barlow Twins (docs/theory.rst §7)
# ------------------------------------------------------------------------------------------
def _split_views(F):
    F = np.asarray(F, dtype=np.float64)
    if F.shape[-2] % 2:
        raise ValueError(f"loss='barlow_twins' needs an even number of training points (M "
                         f"samples x 2 views, views A first), got {F.shape[-2]}; build the "
                         f"data with dmft.Dataset.views(X_a, X_b, ...)")
    M = F.shape[-2] // 2
    return F[..., :M, :], F[..., M:, :]


def standardize_views(Z):
    """Batch standardisation of one view's embeddings Z (..., M, C) over the M samples, per
    output: (Z - mean) / std (population std). Returns (Z_hat, std). A column with zero spread
    (e.g. f = 0, the stationary point) raises FloatingPointError."""
    m = Z.mean(axis=-2, keepdims=True)
    Zc = Z - m
    sd = np.sqrt((Zc * Zc).mean(axis=-2, keepdims=True))
    if np.any(~(sd > 0)):
        raise FloatingPointError(
            "Barlow Twins batch standardisation: an embedding dimension has zero spread over "
            "the samples (f = 0 is the loss's stationary point, where standardisation is "
            "undefined); give the output an O(1) start (GradientDescent(output_offset='nngp') "
            "in the DMFT methods, or the NTK parameterisation in dmft.simulate) or pass "
            "standardize=False")
    return Zc / sd, sd


def cross_correlation(F, standardize: bool = True):
    """The Barlow Twins cross-correlation C = Z^A^T Z^B / M of predictions F (..., 2M, C)
    (views A then B): shape (..., C, C)."""
    A, B = _split_views(F)
    if standardize:
        A, B = standardize_views(A)[0], standardize_views(B)[0]
    return np.einsum("...mi,...mj->...ij", A, B) / A.shape[-2]


def _standardize_backward(Zh, sd, gh):
    """d L / d Z from d L / d Z_hat for Z_hat = (Z - mean) / std over axis -2."""
    return (gh - gh.mean(axis=-2, keepdims=True)
            - Zh * (gh * Zh).mean(axis=-2, keepdims=True)) / sd


def barlow_twins(F, off_diagonal: float = 1.0, standardize: bool = True):
    """Barlow Twins loss and error signal of predictions F (..., 2M, C), views A = F[..., :M, :]
    and B = F[..., M:, :] of the same M samples.

    L = sum_i (1 - C_ii)^2 + off_diagonal * sum_{i != j} C_ij^2 with C = Z^A^T Z^B / M, Z the
    embeddings, batch-standardised over the M samples per view and output when
    ``standardize``. Returns ``(L (...), Delta (..., 2M, C))`` with Delta = -dL/dF (exact:
    tests/test_barlow_twins.py checks it against finite differences).
    """
    A, B = _split_views(F)
    M, C = A.shape[-2], A.shape[-1]
    if standardize:
        Ah, sa = standardize_views(A)
        Bh, sb = standardize_views(B)
    else:
        Ah, Bh = A, B
    Cc = np.einsum("...mi,...mj->...ij", Ah, Bh) / M
    eye = np.eye(C, dtype=bool)
    diag = np.diagonal(Cc, axis1=-2, axis2=-1)
    off = np.where(eye, 0.0, Cc)
    value = ((1.0 - diag) ** 2).sum(axis=-1) + off_diagonal * (off * off).sum(axis=(-2, -1))
    G = 2.0 * off_diagonal * off                              # dL/dC
    G = G - np.where(eye, 2.0 * (1.0 - Cc), 0.0)
    gA = np.einsum("...mj,...ij->...mi", Bh, G) / M           # dL/dZ^A_hat = Z^B_hat G^T / M
    gB = np.einsum("...mi,...ij->...mj", Ah, G) / M           # dL/dZ^B_hat = Z^A_hat G / M
    if standardize:
        gA, gB = _standardize_backward(Ah, sa, gA), _standardize_backward(Bh, sb, gB)
    return value, -np.concatenate([gA, gB], axis=-2)


def nngp_offset(K, C: int, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """A fixed draw f0 (n, C) of a centred Gaussian process with covariance K (n, n) over the
    points, independent over the C outputs, times ``scale``: the O(1) initial output of the
    Barlow Twins rich regime (docs/theory.rst §7). ``numpy.random.default_rng(seed)`` draws
    xi (n, C); f0 = K^(1/2) xi with the symmetric square root (eigendecomposition, negative
    round-off eigenvalues clipped to 0), so every method and network gets the same array."""
    K = np.asarray(K, dtype=np.float64)
    w, V = np.linalg.eigh(0.5 * (K + K.T))
    root = (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T
    xi = np.random.default_rng(seed).standard_normal((K.shape[0], int(C)))
    return float(scale) * (root @ xi)


def batch_schedule(P: int, steps: int, batch_size, batch_seed=0,
                   schedule: str = "epochs") -> np.ndarray | None:
    """Which training points each step uses: a (steps, P) boolean mask, or None (full batch).

    ``"epochs"``: every epoch a fresh permutation of the P points (``numpy.random.default_rng(
    batch_seed)``) cut into consecutive batches of ``batch_size`` (the last one of an epoch
    smaller when P is not a multiple). ``"online"``: step t uses the points
    ``t B .. (t + 1) B - 1`` in their dataset order, each seen once (needs P >= steps * B).
    """
    if batch_size is None:
        return None
    B = int(batch_size)
    mask = np.zeros((steps, P), dtype=bool)
    if schedule == "online":
        if P < steps * B:
            raise ValueError(
                f"schedule='online' sees each training point once: steps * batch_size = "
                f"{steps} * {B} = {steps * B} points are needed but the dataset has P = {P}; "
                f"pass more training points or fewer steps")
        for t in range(steps):
            mask[t, t * B:(t + 1) * B] = True
        return mask
    if schedule != "epochs":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    rng = np.random.default_rng(batch_seed)
    t = 0
    while t < steps:
        perm = rng.permutation(P)
        for start in range(0, P, B):
            if t >= steps:
                break
            mask[t, perm[start:start + B]] = True
            t += 1
    return mask


class Objective:
    """The loss, targets, batches and weight decay of one training run, as the solvers see it.

    Parameters
    ----------
    loss : str
        One of :data:`LOSSES`.
    Y : array (P, C)
        Training targets (one-hot rows for cross-entropy, +-1 for logistic / hinge).
    n : int
        Points in the kernels (P train + Q test); test rows of Delta are zero.
    steps : int
        T.
    lr : float
    weight_decay : float
        lambda >= 0 (``a = 1 - lr lambda``).
    decay_to : str
        ``"init"`` or ``"zero"``.
    mask : bool array (steps, P) or None
        The batch schedule (:func:`batch_schedule`); None is full batch.
    params : dict, optional
        Options of the loss (``barlow_twins``: ``off_diagonal``, ``standardize``).
    offset : array (n, C), callable or None
        The output offset f0 (the loss acts on F + f0); a callable returning it is called on
        first use (``from_specs`` defers the NNGP draw so that checks of the problem's kind
        stay cheap).
    """

    def __init__(self, loss: str, Y, n: int, steps: int, lr: float, weight_decay: float = 0.0,
                 decay_to: str = "init", mask=None, params=None, offset=None):
        Y = np.asarray(Y, dtype=np.float64)
        if Y.ndim == 1:
            Y = Y[:, None]
        self.loss, self.Y, self.n, self.steps, self.lr = loss, Y, int(n), int(steps), float(lr)
        self.P, self.C = Y.shape
        self.weight_decay, self.decay_to = float(weight_decay), decay_to
        self.a = 1.0 - self.lr * self.weight_decay
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.params = dict(params or {})
        self._offset = offset

    @classmethod
    def from_specs(cls, data, train, net=None) -> "Objective":
        """The objective of ``dmft.Dataset`` ``data`` trained by ``dmft.GradientDescent``
        ``train`` (``net``, a ``dmft.MLP``, is needed for ``output_offset="nngp"``: the offset
        is a draw of its NNGP kernel Phi^L over the n points, made when first used)."""
        offset = None
        if getattr(train, "output_offset", "none") != "none":
            def draw():
                if net is None:
                    raise ValueError("output_offset='nngp' is a draw of the network's NNGP "
                                     "kernel: build the objective with "
                                     "Objective.from_specs(data, train, net)")
                from .static import static_kernels
                K = static_kernels(net.activation, data.kx, net.depth)["phi"][-1]
                return nngp_offset(K, data.C, train.offset_scale, train.offset_seed)
            offset = draw
        params = train.loss_params if hasattr(train, "loss_params") else {}
        return cls(train.loss, data.Y_train, data.P + data.Q, train.steps, train.lr,
                   train.weight_decay, train.decay_to, train.batch_mask(data.P), params,
                   offset)

    # what kind of problem ------------------------------------------------------------------
    @property
    def plain(self) -> bool:
        """One squared-error output, full batch, no weight decay, no offset: the original
        problem."""
        return (self.loss == "mse" and self.C == 1 and self.mask is None
                and self.weight_decay == 0.0 and self._offset is None)

    @property
    def has_offset(self) -> bool:
        return self._offset is not None

    @property
    def offset(self) -> np.ndarray | None:
        """The output offset f0 (n, C), or None."""
        if callable(self._offset):
            self._offset = np.asarray(self._offset(), dtype=np.float64)
            self._offset.setflags(write=False)
        return self._offset

    def _shift(self, F):
        """F (..., P or n, C) plus the offset on the training rows."""
        f0 = self.offset
        if f0 is None:
            return F
        return F + f0[:F.shape[-2]] if F.shape[-2] <= self.n else F

    @property
    def decays(self) -> bool:
        return self.weight_decay != 0.0

    # the error signal ----------------------------------------------------------------------
    def delta(self, t: int, F) -> np.ndarray:
        """Delta(t) on all n points, (n, C), from the predictions F at step t ((n, C) or
        (P, C); only the P training rows are read). Zero on test points and off-batch."""
        F = np.asarray(F, dtype=np.float64)
        if F.ndim == 1:
            F = F[:, None]
        out = np.zeros((self.n, self.C))
        d = error_signal(self.loss, self._shift(F[:self.P]), self.Y, **self.params)
        if self.mask is not None:
            d = d * self.mask[t][:, None]
        out[:self.P] = d
        return out

    def jacobian(self, t: int, F) -> np.ndarray:
        """d Delta(t) / d F_train per training point, (P, C, C) (zero off-batch)."""
        F = np.asarray(F, dtype=np.float64)
        if F.ndim == 1:
            F = F[:, None]
        J = loss_jacobian(self.loss, self._shift(F[:self.P]), self.Y)
        if self.mask is not None:
            J = J * self.mask[t][:, None, None]
        return J

    def loss_at(self, F) -> np.ndarray:
        """Training loss (full training set, every point) of predictions F (..., P, C) (plus
        the offset)."""
        return loss_value(self.loss, self._shift(np.asarray(F, dtype=np.float64)), self.Y,
                          **self.params)

    # weight decay --------------------------------------------------------------------------
    def memory(self, t: int) -> np.ndarray:
        """Weights a^(t-1-s) of the memory terms lr Delta(s), s = 0 .. t-1 (ones without
        weight decay)."""
        return self.a ** np.arange(t - 1, -1, -1, dtype=np.float64)

    def init_scale(self, t: int) -> float:
        """Factor a^t on the initial-weight channel (sources and responses) at step t: a^t
        toward zero, 1 toward the initialisation."""
        return self.a ** t if (self.decay_to == "zero" and self.decays) else 1.0
