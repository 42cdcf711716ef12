"""Read-outs of learned representations (self-supervised training; docs/theory.rst §7).

They take a :class:`~dmft.Solution` or :class:`~dmft.Ensemble` (any method) and return arrays
over time (with a leading seed axis for an Ensemble):

:func:`cross_correlation`
    The Barlow Twins cross-correlation C(t) of the two views' embeddings (T+1, C, C).
:func:`ntk_change`
    ||K(t) - K(0)||_F / ||K(0)||_F of the NTK over the training points (T+1,): the quantity
    whose supremum over t tends to 0 in the NTK parameterisation (the theorem of
    arXiv 2411.11176; at least as fast as N^(-1/2), measured 1/N for tanh).
:func:`linear_probe`
    Accuracy of a ridge-regression linear classifier fitted on the embeddings of part of the
    labelled test points and evaluated on the rest (T+1,).
"""
from __future__ import annotations

import numbers

import numpy as np

from solvers.objective import cross_correlation as _cc

__all__ = ["cross_correlation", "ntk_change", "linear_probe", "embeddings"]


def _outputs(result, which):
    """Predictions (..., T+1, points, C) with an explicit output axis."""
    f = np.asarray(getattr(result, which), dtype=np.float64)
    return f if result.data.multi_output else f[..., None]


def embeddings(result, which: str = "test") -> np.ndarray:
    """The embeddings (predictions with an output axis) of the ``"train"`` views or the
    ``"test"`` points: (..., T+1, points, C)."""
    if which not in ("train", "test"):
        raise ValueError(f"which must be 'train' or 'test', got {which!r}")
    return _outputs(result, f"{which}_predictions")


def cross_correlation(result, standardize: bool | None = None) -> np.ndarray:
    """C_ij(t) = sum_m z^A_mi(t) z^B_mj(t) / M of the views' embeddings (docs/theory.rst §7),
    batch-standardised when ``standardize`` (default: as the training did): (..., T+1, C, C).
    Needs paired data (:meth:`dmft.Dataset.views`)."""
    if not getattr(result.data, "paired", False):
        raise ValueError("cross_correlation needs paired views (dmft.Dataset.views or "
                         "Dataset.augmented); this result's data are not paired")
    if standardize is None:
        standardize = bool(getattr(result.train, "standardize", True))
    return _cc(_outputs(result, "train_predictions"), standardize)


def ntk_change(result, points: str = "train") -> np.ndarray:
    """||K(t) - K(0)||_F / ||K(0)||_F over the ``"train"`` points (default) or ``"all"``
    points, all outputs: (..., T+1)."""
    if points not in ("train", "all"):
        raise ValueError(f"points must be 'train' or 'all', got {points!r}")
    K = np.asarray(result.ntk, dtype=np.float64)
    multi = result.data.multi_output
    n_axes = 4 if multi else 2
    if points == "train":
        P = result.data.P
        idx = (slice(None, P), slice(None)) * 2 if multi else (slice(None, P),) * 2
        K = K[(Ellipsis,) + idx]
    flat = K.reshape(K.shape[:K.ndim - n_axes] + (-1,))
    d = flat - flat[..., :1, :]
    return np.linalg.norm(d, axis=-1) / np.linalg.norm(flat[..., :1, :], axis=-1)


def linear_probe(result, train_fraction: float = 0.5, ridge: float = 1e-3) -> np.ndarray:
    """Linear-probe accuracy of the embeddings of the labelled test points over time.

    The first ``ceil(train_fraction * Q)`` test points (in dataset order) fit a ridge
    regression of one-hot labels on the C embeddings (standardised by the fitting points' mean
    and spread; penalty ``ridge * n_fit`` on the weights, none on the bias); the other points
    are classified by argmax. Returns (..., T+1). Needs ``data.labels_test``.
    """
    labels = getattr(result.data, "labels_test", None)
    if labels is None:
        raise ValueError("linear_probe needs labelled test points: pass labels_test to "
                         "dmft.Dataset (or Dataset.views(..., X_test=, labels_test=))")
    if not isinstance(train_fraction, numbers.Real) or not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    if not isinstance(ridge, numbers.Real) or not ridge > 0:
        raise ValueError(f"ridge must be a number > 0, got {ridge!r}")
    Q = labels.shape[0]
    n_fit = int(np.ceil(train_fraction * Q))
    if n_fit < 2 or n_fit >= Q:
        raise ValueError(f"train_fraction={train_fraction} leaves {n_fit} fitting and "
                         f"{Q - n_fit} held-out points of Q = {Q}; both must be >= 2 / >= 1")
    classes = int(labels.max()) + 1
    Y = np.eye(classes)[labels[:n_fit]]
    E = _outputs(result, "test_predictions")
    lead = E.shape[:-2]
    Ef = E.reshape((-1,) + E.shape[-2:])
    acc = np.empty(Ef.shape[0])
    for k, e in enumerate(Ef):
        fit, held = e[:n_fit], e[n_fit:]
        mu, sd = fit.mean(axis=0), fit.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        Xf = np.column_stack([(fit - mu) / sd, np.ones(n_fit)])
        Xh = np.column_stack([(held - mu) / sd, np.ones(Q - n_fit)])
        reg = ridge * np.eye(Xf.shape[1])
        reg[-1, -1] = 0.0
        W = np.linalg.solve(Xf.T @ Xf + reg * n_fit, Xf.T @ Y)
        acc[k] = np.mean(np.argmax(Xh @ W, axis=1) == labels[n_fit:])
    return acc.reshape(lead)
