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

The NTK parameterisation (``dmft.simulate(..., parameterization="ntk")``) is this model at
gamma0 = 1/sqrt(N): f = w . phi(h^L) / sqrt(N) and ``theta <- theta - lr dLoss/dtheta``
(lr gamma0^2 N = lr); the engine needs nothing else, the caller passes that gamma0.

Array layout: fields are stored points-major, ``h[l-1]`` has shape (n, N) (row mu is the
layer-l pre-activation of point mu), so that the features of all times can be stacked into one
(T+1) n x N matrix per layer and the two-time kernels formed by a single BLAS product.

Low-rank pending updates. A step changes each matrix by a rank-P outer product. Applying it to
the dense N x N matrix at every step costs a full read-and-write pass over the matrix, as much
memory traffic as the forward and backward products together. Instead each matrix is held as
``W = Wd + Ut^T Vt`` (:class:`LowRank`; it and :class:`Weights` live in
:mod:`solvers.network_weights` and are importable from here): the step appends P rows to the
factors ``Ut``, ``Vt`` and the products use ``A W^T = A Wd^T + (A Vt^T) Ut`` (cost O(n N r) for
pending rank r, tiny next to O(n N^2)). When the pending rank would exceed its cap the factors
are folded into ``Wd`` with one blocked BLAS product (no N x N temporary). ``fold_every=1``
keeps at most one step pending (practically the dense update); all schedules agree to rounding
(a test checks it). The cap balances the pending products (~ r / N of a pass each step) against
the fold (one pass every ``cap / P`` steps): ``fold_every ~ sqrt(0.6 min(rows, cols) / P)``
steps minimises the sum.

Beyond one squared-error output (docs/theory.rst §7; ``train(..., objective=)``): with C
outputs the readout is w (N, C), f_{mu c} = w_c . phi(h^L_mu) / (gamma0 N), the backward
fields g^l_{mu c} (arrays (n, C, N)) start from g^L_{mu c} = phi'(h^L_mu) w_c and the NTK runs
over (point, output) pairs, K_{mu c, nu c'} = delta_cc' Phi^L + sum_l Phi^l G^{l+1}_{mu c, nu c'}.
Any loss enters only through Delta(t) = ``objective.delta(t, f(t))`` (masked to the step's batch),
and the matrix updates stay rank B (batch size) with u_mu = sum_c Delta_{mu c} g_{mu c}. Weight
decay ``theta <- a theta + (1 - a) theta_bar + (update)``, a = 1 - lr lambda: toward zero it is
a scalar factor on the dense part (``W = s Wd + Ut^T Vt``, the pending factors rescaled, s
applied at the next fold); toward the initialisation the shrinkage is full rank, so each matrix
keeps a copy of its initial value and the pending part is folded together with the decay in
one blocked pass every step (:meth:`LowRank.decay`). One-output squared error, full batch,
without decay takes the original code path (bit-for-bit as before).

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
from .network_weights import FOLD_BLOCK, LowRank, Weights, default_fold_every

__all__ = ["LowRank", "Weights", "forward", "backward", "output", "equal_time_ntk",
           "gd_update", "train", "two_time_kernels", "default_fold_every", "backward_outputs",
           "equal_time_ntk_outputs", "gd_update_objective", "FOLD_BLOCK"]


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


def backward_outputs(weights: Weights, h: list, activation: str) -> list:
    """Backward fields of every output, g^l_{mu c} = gamma0 N df_c/dh^l_mu (docs/theory.rst §7).

    g^L_{mu c} = phi'(h^L_mu) * w_c and g^l_{mu c} = phi'(h^l_mu) * (W^l)^T g^{l+1}_{mu c}
    / sqrt(N).

    Parameters
    ----------
    weights : Weights
        Readout of shape (N,) (C = 1) or (N, C).
    h : list of L arrays (n, N)

    Returns
    -------
    list of L arrays (n, C, N): g^l, l = 1 .. L (list index l - 1).
    """
    L = len(h)
    n, N = h[0].shape
    w = weights.w.reshape(N, -1)
    C = w.shape[1]
    scale = 1.0 / math.sqrt(N)
    g = [None] * L
    g[L - 1] = apply(activation, h[L - 1], 1)[:, None, :] * w.T[None, :, :]
    for l in range(L - 2, -1, -1):
        z = weights.layers[l + 1].matmul(g[l + 1].reshape(n * C, N))
        z *= scale
        z = z.reshape(n, C, N)
        z *= apply(activation, h[l], 1)[:, None, :]
        g[l] = z
    return g


def equal_time_ntk_outputs(kx: np.ndarray, phi: list, g: list) -> np.ndarray:
    """NTK over (point, output) pairs, K_{mu c, nu c'} = delta_cc' Phi^L_{mu nu}
    + sum_{l=0}^{L-1} Phi^l_{mu nu} G^{l+1}_{mu c, nu c'} (docs/theory.rst §7).

    Parameters
    ----------
    kx : array (n, n)
        Phi^0.
    phi : list of L arrays (n, N)
    g : list of L arrays (n, C, N)

    Returns
    -------
    array (n, C, n, C)
    """
    n, C, N = g[0].shape
    L = len(phi)
    inv = 1.0 / N
    K = np.zeros((n, C, n, C))
    PhiL = (phi[L - 1] @ phi[L - 1].T) * inv
    for c in range(C):
        K[:, c, :, c] = PhiL
    for l in range(L):
        below = kx if l == 0 else (phi[l - 1] @ phi[l - 1].T) * inv
        gl = g[l].reshape(n * C, N)
        G = ((gl @ gl.T) * inv).reshape(n, C, n, C)
        K += below[:, None, :, None] * G
    return K


def gd_update_objective(weights: Weights, X_train: np.ndarray, delta: np.ndarray, phi: list,
                        g: list, lr: float, gamma0: float, rows=None, decay: float = 1.0,
                        toward=None) -> None:
    """One gradient step with any error signal, C outputs and weight decay, in place.

    ``theta <- a theta + (1 - a) theta_bar + lr gamma0^2 N (-dLoss/dtheta)`` with
    a = ``decay`` = 1 - lr lambda and theta_bar = ``toward`` (the initial weights; None: zero),
    the gradient taken at the current weights (docs/theory.rst §7). With
    u^{l+1}_mu = sum_c Delta_{mu c} g^{l+1}_{mu c} the updates stay rank P (module docstring):

        w_c += lr gamma0 sum_mu Delta_{mu c} phi(h^L_mu)
        W^l += lr gamma0 / sqrt(N) sum_mu u^{l+1}_mu phi(h^l_mu)^T,  W^0 likewise with x_mu

    Parameters
    ----------
    weights : Weights
    X_train : array (P, D)
    delta : array (P, C)
        Delta_{mu c} = -dl/df_{mu c} on the training points (zero off-batch).
    phi : list of L arrays (n, N)
    g : list of L arrays (n, C, N)
    lr, gamma0 : float
    rows : int array, optional
        The training points of the step's batch (the others have Delta = 0 and are skipped,
        so the pending rank grows by the batch size). Default: all P.
    decay : float
        a = 1 - lr lambda (1: no weight decay).
    toward : tuple (mats, w0) or None
        theta_bar for decay toward the initialisation: ``mats`` the list of initial dense
        matrices [W^0, .., W^{L-1}], ``w0`` the initial readout; None with ``decay < 1`` is
        decay toward zero.
    """
    P, D = X_train.shape
    L = len(phi)
    N = weights.width
    c = lr * gamma0
    if rows is None:
        rows = slice(0, P)
    d = delta[rows]                                        # (B, C)
    upd_w = c * (phi[L - 1][:P][rows].T @ d)               # (N, C)
    w = weights.w.reshape(N, -1)
    if decay != 1.0:
        w *= decay
        if toward is not None:
            w += (1.0 - decay) * toward[1].reshape(N, -1)
        for l, m in enumerate(weights.layers):
            m.decay(decay, None if toward is None else toward[0][l])
    w += upd_w
    alpha = c / math.sqrt(N)
    for l in range(1, L):
        u = np.einsum("pc,pcn->pn", d, g[l][:P][rows])
        weights.layers[l].add(alpha * u, phi[l - 1][:P][rows])
    u = np.einsum("pc,pcn->pn", d, g[0][:P][rows])
    weights.layers[0].add((c / math.sqrt(D)) * u, X_train[rows])


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


def _check_step(f, K, k, T, N, lr, gamma0) -> None:
    """FloatingPointError naming the step where the output or the NTK stopped being finite."""
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(K))):
        raise FloatingPointError(
            f"network training diverged: non-finite output or NTK at step {k} of {T} "
            f"(width {N}, lr={lr}, gamma0={gamma0}); use a smaller lr or gamma0")


def train(X: np.ndarray, y: np.ndarray, weights: Weights, *, activation: str, gamma0: float,
          lr: float, steps: int, record_kernels: bool = False, center: bool = False,
          fold_every: int | None = None, fold_at_end: bool = True, objective=None) -> dict:
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
    objective : solvers.objective.Objective, optional
        The loss, targets (P, C), batch schedule and weight decay (docs/theory.rst §7):
        Delta(t) = ``objective.delta(t, f(t))`` and the step of :func:`gd_update_objective`.
        None (or a plain objective with a readout of shape (N,)): squared error on ``y``, full
        batch, no decay, by the original code path (bit-for-bit as before). The readout must
        have C = ``objective.C`` outputs (shape (N,) for C = 1, else (N, C)).

    Returns
    -------
    dict with
        ``predictions`` (T+1, n), ``ntk`` (T+1, n, n), ``f0`` (n,) the raw initial output, and
        with ``record_kernels``: ``phi``, ``g`` (L, T+1, T+1, n, n), index l - 1 for layer l.
        With a readout of shape (N, C): ``predictions`` (T+1, n, C), ``f0`` (n, C), ``ntk``
        (T+1, n, C, n, C) and ``g`` (L, T+1, T+1, n, C, n, C).

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
    T = int(steps)
    if objective is not None:
        if objective.P != P or objective.n != n or objective.steps < T:
            raise ValueError(f"objective is for P={objective.P}, n={objective.n}, "
                             f"steps={objective.steps}, but y has {P} targets, X {n} rows and "
                             f"steps={T}; build it from the same problem")
        if objective.C != weights.outputs or (objective.C >= 2) != (weights.w.ndim == 2):
            raise ValueError(f"the readout has shape {weights.w.shape} but the objective has "
                             f"C = {objective.C} outputs; draw the weights with "
                             f"Weights.draw(..., outputs=C) for C >= 2 (None for C = 1)")
        if not (objective.plain and weights.w.ndim == 1):
            return _train_objective(X, weights, objective, activation=activation,
                                    gamma0=gamma0, lr=lr, steps=T,
                                    record_kernels=record_kernels, center=center,
                                    fold_every=fold_every, fold_at_end=fold_at_end)
    elif weights.w.ndim != 1:
        raise ValueError("a readout of shape (N, C) needs objective= (targets of shape (P, C))")
    _reserve(weights, P, T, fold_every)
    X_train = X[:P]

    def step(k, f, phi, g):
        gd_update(weights, X_train, y - f[:P], phi, g, lr, gamma0)

    return _loop(X, weights, step, None, activation=activation, gamma0=gamma0, lr=lr,
                 steps=T, record_kernels=record_kernels, center=center, fold_at_end=fold_at_end)


def _reserve(weights: Weights, B: int, T: int, fold_every) -> None:
    """Size every matrix's pending buffers for B rows a step over the steps between folds
    (``fold_every``, default :func:`default_fold_every` per matrix), never beyond what the
    T steps of the run can fill."""
    for m in weights.layers:
        k = fold_every if fold_every is not None else default_fold_every(*m.shape, B)
        m.reserve(B * max(1, min(int(k), T)))


def _train_objective(X, weights: Weights, obj, *, activation, gamma0, lr, steps, record_kernels,
                     center, fold_every, fold_at_end) -> dict:
    """:func:`train` for any loss, C outputs, batches and weight decay (docs/theory.rst §7).

    The loop of the plain path (:func:`_loop`) with Delta(t) = ``obj.delta(t, f(t))`` and the
    step of :func:`gd_update_objective`. Decay toward the initialisation keeps a copy of the
    initial weights (theta_bar) and folds every step (:meth:`LowRank.decay`); decay toward zero
    only rescales (the pending machinery is unchanged).
    """
    n = X.shape[0]
    P, C, T = obj.P, obj.C, steps
    L = weights.depth
    multi = weights.w.ndim == 2
    mask = obj.mask
    # pending rank per step: the batch size (the rows with a possible Delta)
    B = P if mask is None else max(1, int(mask[:T].sum(axis=1).max(initial=1)))
    toward = None
    decay = obj.a if obj.decays else 1.0
    if obj.decays and obj.decay_to == "init":
        weights.fold()
        toward = ([m.Wd.copy() for m in weights.layers], weights.w.copy())
    # decay toward the initialisation folds every step
    _reserve(weights, B, T, 1 if toward is not None else fold_every)
    X_train = X[:P]

    def step(k, f, phi, g):
        delta = obj.delta(k, f)[:P]
        rows = None if mask is None else np.flatnonzero(mask[k])
        gd_update_objective(weights, X_train, delta, phi, g, lr, gamma0, rows=rows,
                            decay=decay, toward=toward)

    out = _loop(X, weights, step, C, activation=activation, gamma0=gamma0, lr=lr, steps=T,
                record_kernels=record_kernels, center=center, fold_at_end=fold_at_end)
    if not multi:
        out.update(predictions=out["predictions"][..., 0], ntk=out["ntk"][:, :, 0, :, 0],
                   f0=out["f0"][:, 0])
    if record_kernels:
        gk = out["g"].reshape(L, T + 1, T + 1, n, C, n, C)
        out["g"] = gk if multi else gk[:, :, :, :, 0, :, 0]
    return out


def _loop(X, weights: Weights, step, C, *, activation, gamma0, lr, steps, record_kernels,
          center, fold_at_end) -> dict:
    """The training loop of :func:`train`, for one output (``C=None``) or C outputs.

    At each time k = 0 .. T: forward and backward passes on all points, the output (centred
    if asked), the equal-time NTK and the divergence check are recorded; then, for k < T,
    ``step(k, f, phi, g)`` updates the weights. Returns the dict of :func:`train` with the
    shapes of C outputs when C is given (``g`` of the two-time kernels flattened over
    (point, output): (L, T+1, T+1, n C, n C)).
    """
    n, D = X.shape
    T = steps
    L, N = weights.depth, weights.width
    kx = X @ X.T / D
    out_axes = () if C is None else (C,)
    preds = np.empty((T + 1, n) + out_axes)
    ntk = np.empty((T + 1,) + ((n, n) if C is None else (n, C, n, C)))
    backward_fields, kernel = ((backward, equal_time_ntk) if C is None
                               else (backward_outputs, equal_time_ntk_outputs))
    if record_kernels:
        phi_t = np.empty((L, T + 1, n, N))
        g_t = np.empty((L, T + 1, n) + out_axes + (N,))
    f0 = None
    # Overflow inside the passes is expected when training diverges: it is detected below
    # from the outputs and reported with the step, instead of as a NumPy warning.
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(T + 1):
            h, phi = forward(weights, X, activation)
            f = output(weights, phi[L - 1], gamma0)
            if C is not None:
                f = f.reshape(n, C)
            if k == 0:
                f0 = f.copy()
            if center:
                f = f - f0
            g = backward_fields(weights, h, activation)
            K = kernel(kx, phi, g)
            _check_step(f, K, k, T, N, lr, gamma0)
            preds[k] = f
            ntk[k] = K
            if record_kernels:
                for l in range(L):
                    phi_t[l, k] = phi[l]
                    g_t[l, k] = g[l]
            if k < T:
                step(k, f, phi, g)
        if fold_at_end:
            weights.fold()
    out = {"predictions": preds, "ntk": ntk, "f0": f0}
    if record_kernels:
        out["phi"] = np.stack([two_time_kernels(phi_t[l]) for l in range(L)])
        out["g"] = np.stack([two_time_kernels(g_t[l].reshape(T + 1, -1, N)) for l in range(L)])
    return out
