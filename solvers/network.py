"""Finite-width network simulator: one fully connected network trained by full-batch GD.

Implements docs/theory.rst §1 exactly (the package's one convention), for width N, depth L and
activation phi, on n = P + Q points (P training points first, then Q passive test points):

    h^1_mu      = W^0 x_mu / sqrt(D)                      W^0: (N, D)
    h^{l+1}_mu  = W^l phi(h^l_mu) / sqrt(N)               W^l: (N, N),  l = 1 .. L-1
    f_mu        = w . phi(h^L_mu) / (gamma0 N)            w:   (N,)

all weights i.i.d. N(0, 1), loss = sum_{mu <= P} (f_mu - y_mu)^2 / 2, and gradient descent
``theta <- theta - lr * gamma0^2 * N * dLoss/dtheta``. With the error signal
Delta_mu = y_mu - f_mu on training points (zero on test points) and the backward fields

    g^L = phi'(h^L) * w,    g^l = phi'(h^l) * (W^l)^T g^{l+1} / sqrt(N)     (g^l = gamma0 N df/dh^l)

the per-matrix updates are (derived from d f_mu / d theta; the one-step test checks them against
finite-difference gradients of the loss):

    w   += lr gamma0             sum_mu Delta_mu phi(h^L_mu)
    W^l += lr gamma0 / sqrt(N)   sum_mu Delta_mu g^{l+1}_mu phi(h^l_mu)^T       (rank P)
    W^0 += lr gamma0 / sqrt(D)   sum_mu Delta_mu g^1_mu x_mu^T

Array layout: fields are stored points-major, ``h[l-1]`` has shape (n, N) (row mu is the
layer-l pre-activation of point mu), so that the features of all times can be stacked into one
(T+1) n x N matrix per layer and the two-time kernels formed by a single BLAS product.

Low-rank pending updates. A step changes each matrix by a rank-P outer product. Applying it to
the dense N x N matrix at every step costs a full read-and-write pass over the matrix, as much
memory traffic as the forward and backward products together. Instead each matrix is held as
``W = Wd + Ut^T Vt`` (:class:`LowRank`): the step appends P rows to the factors ``Ut``, ``Vt``
and the products use ``A W^T = A Wd^T + (A Vt^T) Ut`` (cost O(n N r) for pending rank r, tiny
next to O(n N^2)). When the pending rank would exceed its cap the factors are folded into
``Wd`` with one blocked BLAS product (no N x N temporary). ``fold_every=1`` keeps at most one
step pending (practically the dense update); all schedules agree to rounding (a test checks
it). The cap balances the pending products (~ r / N of a pass each step) against the fold (one
pass every ``cap / P`` steps): ``fold_every ~ sqrt(0.6 min(rows, cols) / P)`` steps minimises
the sum.

Everything is float64 and every large product is a NumPy matmul (one BLAS library: mixing
SciPy's separately bundled OpenBLAS with NumPy's made their thread pools fight for the cores
and doubled the time). Random numbers (the initial weights) are drawn from a
``numpy.random.Generator`` in a fixed order: W^0, W^1, ..., W^{L-1}, w
(see :meth:`Weights.draw`).
"""
from __future__ import annotations

import math

import numpy as np

from .activations import ACTIVATIONS, apply
from .layout import two_time

__all__ = ["LowRank", "Weights", "forward", "backward", "output", "equal_time_ntk",
           "gd_update", "train", "two_time_kernels", "default_fold_every"]

#: rows of W updated per block when folding (block temporary: FOLD_BLOCK x cols floats)
FOLD_BLOCK = 256


def default_fold_every(rows: int, cols: int, P: int) -> int:
    """Steps between folds minimising pending-product plus fold traffic (module docstring)."""
    return max(1, int(round(math.sqrt(0.6 * min(rows, cols) / max(P, 1)))))


class LowRank:
    """A weight matrix W = Wd + Ut[:r]^T Vt[:r] with a pending low-rank correction.

    Parameters
    ----------
    Wd : array (rows, cols)
        The dense part (C-ordered, updated in place by :meth:`fold`).

    Attributes
    ----------
    Wd : array (rows, cols)
    Ut : array (max_rank, rows), Vt : array (max_rank, cols)
        Factor buffers; only the first ``r`` rows are pending.
    r : int
        Pending rank.
    """

    def __init__(self, Wd: np.ndarray):
        self.Wd = Wd
        self.Ut = np.empty((0, Wd.shape[0]))
        self.Vt = np.empty((0, Wd.shape[1]))
        self.r = 0

    @property
    def shape(self):
        return self.Wd.shape

    def reserve(self, max_rank: int) -> None:
        """Size the factor buffers for ``max_rank`` pending rows (folds what is pending)."""
        self.fold()
        if self.Ut.shape[0] != max_rank:
            self.Ut = np.empty((max_rank, self.Wd.shape[0]))
            self.Vt = np.empty((max_rank, self.Wd.shape[1]))

    def matmul_t(self, A: np.ndarray) -> np.ndarray:
        """A @ W^T for A (n, cols) -> (n, rows)."""
        out = A @ self.Wd.T
        if self.r:
            out += (A @ self.Vt[:self.r].T) @ self.Ut[:self.r]
        return out

    def matmul(self, B: np.ndarray) -> np.ndarray:
        """B @ W for B (n, rows) -> (n, cols)."""
        out = B @ self.Wd
        if self.r:
            out += (B @ self.Ut[:self.r].T) @ self.Vt[:self.r]
        return out

    def add(self, u: np.ndarray, v: np.ndarray) -> None:
        """W += u^T v for u (k, rows), v (k, cols); folds first if the buffers are full."""
        k = u.shape[0]
        if self.r + k > self.Ut.shape[0]:
            self.fold()
            if k > self.Ut.shape[0]:
                self.Ut = np.empty((k, self.Wd.shape[0]))
                self.Vt = np.empty((k, self.Wd.shape[1]))
        self.Ut[self.r:self.r + k] = u
        self.Vt[self.r:self.r + k] = v
        self.r += k

    def fold(self) -> None:
        """Wd += Ut^T Vt in row blocks (bounded temporary), then r = 0."""
        r = self.r
        if not r:
            return
        rows = self.Wd.shape[0]
        U, V = self.Ut[:r], self.Vt[:r]
        tmp = np.empty((min(FOLD_BLOCK, rows), self.Wd.shape[1]))
        for i in range(0, rows, FOLD_BLOCK):
            j = min(i + FOLD_BLOCK, rows)
            np.matmul(U[:, i:j].T, V, out=tmp[:j - i])
            self.Wd[i:j] += tmp[:j - i]
        self.r = 0

    def dense(self) -> np.ndarray:
        """W as one dense array (folds the pending part)."""
        self.fold()
        return self.Wd


class Weights:
    """The trainable parameters of one network (updated in place by :func:`gd_update`).

    Parameters / attributes
    -----------------------
    W0 : array (N, D)
        First-layer weights W^0.
    W : list of L - 1 arrays (N, N)
        Hidden weights W^1 .. W^{L-1} (empty for a two-layer network).
    w : array (N,)
        Readout weights.

    ``W0`` and ``W`` read the dense matrices (folding any pending low-rank update first);
    ``layers`` gives the :class:`LowRank` objects [W^0, W^1, ..., W^{L-1}] used by the passes.
    """

    def __init__(self, W0: np.ndarray, W: list, w: np.ndarray):
        self.layers = [LowRank(np.ascontiguousarray(W0, dtype=np.float64))]
        self.layers += [LowRank(np.ascontiguousarray(Wl, dtype=np.float64)) for Wl in W]
        self.w = np.asarray(w, dtype=np.float64)

    @property
    def W0(self) -> np.ndarray:
        return self.layers[0].dense()

    @property
    def W(self) -> list:
        return [m.dense() for m in self.layers[1:]]

    @property
    def width(self) -> int:
        return self.w.shape[0]

    @property
    def depth(self) -> int:
        return len(self.layers)

    @classmethod
    def draw(cls, rng: np.random.Generator, D: int, width: int, depth: int) -> "Weights":
        """Draw i.i.d. N(0, 1) weights, in the order W^0, W^1, ..., W^{L-1}, w."""
        W0 = rng.standard_normal((width, D))
        W = [rng.standard_normal((width, width)) for _ in range(depth - 1)]
        w = rng.standard_normal(width)
        return cls(W0, W, w)

    def fold(self) -> None:
        """Apply every pending low-rank update to the dense matrices."""
        for m in self.layers:
            m.fold()

    def copy(self) -> "Weights":
        return Weights(self.W0.copy(), [Wl.copy() for Wl in self.W], self.w.copy())


def forward(weights: Weights, X: np.ndarray, activation: str):
    """Forward pass on all points.

    Parameters
    ----------
    weights : Weights
    X : array (n, D)
    activation : str

    Returns
    -------
    h, phi : lists of L arrays (n, N)
        Pre-activations h^l and features phi(h^l), l = 1 .. L (list index l - 1).
    """
    layers = weights.layers
    h = [layers[0].matmul_t(X)]
    h[0] *= 1.0 / math.sqrt(X.shape[1])
    f = [apply(activation, h[0])]
    scale = 1.0 / math.sqrt(weights.width)
    for m in layers[1:]:
        hl = m.matmul_t(f[-1])
        hl *= scale
        h.append(hl)
        f.append(apply(activation, hl))
    return h, f


def output(weights: Weights, phi_L: np.ndarray, gamma0: float) -> np.ndarray:
    """Network output f = phi(h^L) w / (gamma0 N): (n,) from ``phi_L`` (n, N)."""
    return (phi_L @ weights.w) * (1.0 / (gamma0 * weights.width))


def backward(weights: Weights, h: list, activation: str) -> list:
    """Backward fields g^l = gamma0 N df/dh^l on all points.

    g^L = phi'(h^L) * w and g^l = phi'(h^l) * (W^l)^T g^{l+1} / sqrt(N) (docs/theory.rst §1).

    Parameters
    ----------
    weights : Weights
    h : list of L arrays (n, N)
        Pre-activations from :func:`forward`.

    Returns
    -------
    list of L arrays (n, N): g^l, l = 1 .. L (list index l - 1).
    """
    L = len(h)
    scale = 1.0 / math.sqrt(weights.width)
    g = [None] * L
    g[L - 1] = apply(activation, h[L - 1], 1) * weights.w
    for l in range(L - 2, -1, -1):
        z = weights.layers[l + 1].matmul(g[l + 1])
        z *= scale
        z *= apply(activation, h[l], 1)
        g[l] = z
    return g


def equal_time_ntk(kx: np.ndarray, phi: list, g: list) -> np.ndarray:
    """NTK K = sum_{l=0}^{L} G^{l+1} * Phi^l (elementwise), from one network's own fields.

    Phi^l = phi(h^l) phi(h^l)^T / N, G^l = g^l g^{l T} / N at one time, Phi^0 = ``kx``
    (= X X^T / D), G^{L+1} = 1 (docs/theory.rst §1).

    Parameters
    ----------
    kx : array (n, n)
    phi, g : lists of L arrays (n, N)

    Returns
    -------
    array (n, n)
    """
    N = phi[0].shape[1]
    L = len(phi)
    inv = 1.0 / N
    K = (phi[L - 1] @ phi[L - 1].T) * inv
    K += kx * ((g[0] @ g[0].T) * inv)
    for l in range(1, L):
        K += ((phi[l - 1] @ phi[l - 1].T) * inv) * ((g[l] @ g[l].T) * inv)
    return K


def gd_update(weights: Weights, X_train: np.ndarray, delta: np.ndarray, phi: list, g: list,
              lr: float, gamma0: float) -> None:
    """One full-batch gradient step, in place (rank-P updates, no N x N temporaries).

    Parameters
    ----------
    weights : Weights
        Updated in place (as pending low-rank factors, see :class:`LowRank`).
    X_train : array (P, D)
    delta : array (P,)
        Error signal Delta_mu = -dl/df_mu on the training points.
    phi, g : lists of L arrays (n, N)
        Features and backward fields at the current weights; only the first P rows are used.
    lr, gamma0 : float
    """
    P, D = X_train.shape
    L = len(phi)
    c = lr * gamma0
    # w += c sum_mu Delta_mu phi(h^L_mu)
    weights.w += c * (delta @ phi[L - 1][:P])
    # W^l += (c / sqrt(N)) g^{l+1}_tr^T diag(Delta) phi(h^l)_tr
    alpha = c / math.sqrt(weights.width)
    for l in range(1, L):
        weights.layers[l].add(alpha * g[l][:P], delta[:, None] * phi[l - 1][:P])
    # W^0 += (c / sqrt(D)) g^1_tr^T diag(Delta) X_tr
    weights.layers[0].add((c / math.sqrt(D)) * g[0][:P], delta[:, None] * X_train)


def two_time_kernels(features: np.ndarray) -> np.ndarray:
    """Two-time kernel from stacked per-time fields, with one BLAS product.

    Parameters
    ----------
    features : array (T+1, n, N)
        The fields phi(h^l(t)) (or g^l(t)) of one layer at every time.

    Returns
    -------
    array (T+1, T+1, n, n): K[t, s, mu, nu] = features[t, mu] . features[s, nu] / N
    """
    T1, n, N = features.shape
    M = features.reshape(T1 * n, N)
    K = M @ M.T            # symmetric product: NumPy calls BLAS syrk here
    K *= 1.0 / N
    return two_time(K, T1, n)


def train(X: np.ndarray, y: np.ndarray, weights: Weights, *, activation: str, gamma0: float,
          lr: float, steps: int, record_kernels: bool = False, center: bool = False,
          fold_every: int | None = None, fold_at_end: bool = True) -> dict:
    """Train one network by full-batch gradient descent and record its trajectory.

    At each of the T + 1 times k = 0 .. T (before the update of step k) the forward and
    backward passes are run on all n = P + Q points and the predictions and the equal-time NTK
    K(t) = sum_l G^{l+1}(t,t) Phi^l(t,t) (docs/theory.rst §1) are recorded; then the weights take
    one gradient step with Delta = y - f on the P training points.

    Parameters
    ----------
    X : array (n, D)
        Inputs, the P training points first.
    y : array (P,)
        Training targets (P = len(y); the remaining n - P rows of X are passive test points).
    weights : Weights
        Initial weights; trained in place (they hold the weights at time T on return).
    activation : str
        ``"linear"``, ``"tanh"``, ``"relu"`` or ``"erf"``.
    gamma0, lr : float
        Feature-learning strength (> 0) and learning rate.
    steps : int
        T, the number of gradient steps.
    record_kernels : bool
        Also return the two-time kernels Phi^l(t,s), G^l(t,s). Costs 2 L (T+1) n N floats of
        memory for the stored fields.
    center : bool
        Train the centred model f(theta) - f(theta_0): Delta and the recorded predictions use
        the centred output; gradients are unchanged.
    fold_every : int, optional
        Steps of pending low-rank updates between folds into the dense matrices (1: at most
        one step pending, i.e. practically the dense update). Default:
        :func:`default_fold_every` per matrix.
    fold_at_end : bool
        Fold the pending updates before returning, so that ``weights.layers[l].Wd`` are the
        final dense matrices (``weights.W0`` / ``weights.W`` fold on access anyway). False saves
        the last fold when the weights are discarded.

    Returns
    -------
    dict with
        ``predictions`` (T+1, n), ``ntk`` (T+1, n, n), ``f0`` (n,) the raw initial output, and
        with ``record_kernels``: ``phi``, ``g`` (L, T+1, T+1, n, n), index l - 1 for layer l.

    Raises
    ------
    FloatingPointError
        If the output or the NTK becomes non-finite (divergence); names the step.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is unknown; use one of {sorted(ACTIVATIONS)}")
    X = np.ascontiguousarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, D = X.shape
    P = y.shape[0]
    if not 1 <= P <= n:
        raise ValueError(f"y has {P} targets but X has {n} rows; need 1 <= P <= n")
    if weights.layers[0].shape[1] != D:
        raise ValueError(f"weights expect input dimension {weights.layers[0].shape[1]}, "
                         f"X has {D}")
    if not gamma0 > 0:
        raise ValueError(f"gamma0 must be > 0 for a finite network, got {gamma0!r}")
    if fold_every is not None and (int(fold_every) != fold_every or fold_every < 1):
        raise ValueError(f"fold_every must be a positive integer or None, got {fold_every!r}")
    L, N = weights.depth, weights.width
    T = int(steps)
    for m in weights.layers:
        k = fold_every if fold_every is not None else default_fold_every(*m.shape, P)
        # no buffer beyond what the run can fill
        m.reserve(P * max(1, min(int(k), T)))
    kx = X @ X.T / D
    X_train = X[:P]

    preds = np.empty((T + 1, n))
    ntk = np.empty((T + 1, n, n))
    if record_kernels:
        phi_t = np.empty((L, T + 1, n, N))
        g_t = np.empty((L, T + 1, n, N))
    f0 = None
    # Overflow inside the passes is expected when training diverges: it is detected below
    # from the outputs and reported with the step, instead of as a NumPy warning.
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(T + 1):
            h, phi = forward(weights, X, activation)
            f = output(weights, phi[L - 1], gamma0)
            if k == 0:
                f0 = f.copy()
            if center:
                f = f - f0
            g = backward(weights, h, activation)
            K = equal_time_ntk(kx, phi, g)
            if not (np.all(np.isfinite(f)) and np.all(np.isfinite(K))):
                raise FloatingPointError(
                    f"network training diverged: non-finite output or NTK at step {k} of {T} "
                    f"(width {N}, lr={lr}, gamma0={gamma0}); use a smaller lr or gamma0")
            preds[k] = f
            ntk[k] = K
            if record_kernels:
                for l in range(L):
                    phi_t[l, k] = phi[l]
                    g_t[l, k] = g[l]
            if k < T:
                gd_update(weights, X_train, y - f[:P], phi, g, lr, gamma0)
        if fold_at_end:
            weights.fold()
    out = {"predictions": preds, "ntk": ntk, "f0": f0}
    if record_kernels:
        out["phi"] = np.stack([two_time_kernels(phi_t[l]) for l in range(L)])
        out["g"] = np.stack([two_time_kernels(g_t[l]) for l in range(L)])
    return out
