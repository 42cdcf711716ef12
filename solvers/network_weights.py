"""Weight storage of the finite-width simulator (:mod:`solvers.network`).

:class:`LowRank` holds one weight matrix as a dense part plus pending low-rank factors,
W = s Wd + Ut^T Vt: a gradient step appends its rank-P outer product to the factors, and
:meth:`LowRank.fold` applies them (with the weight-decay scale s) in one blocked pass every few
steps, :func:`default_fold_every` choosing how many (the trade-off is worked out in the
:mod:`solvers.network` docstring). :meth:`LowRank.decay` applies weight decay, as a scale
toward zero and as a folded pass toward the initialisation. :class:`Weights` is one network's
parameters, drawn in a fixed order from a ``numpy.random.Generator`` (:meth:`Weights.draw`).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["FOLD_BLOCK", "LowRank", "Weights", "default_fold_every"]

#: rows of W updated per block when folding (block temporary: FOLD_BLOCK x cols floats)
FOLD_BLOCK = 256


def default_fold_every(rows: int, cols: int, P: int) -> int:
    """Steps between folds minimising pending-product plus fold traffic (the
    :mod:`solvers.network` docstring)."""
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
    s : float
        Scale of the dense part, W = s Wd + Ut^T Vt (1 except under weight decay toward zero,
        which multiplies it by a = 1 - lr lambda each step instead of rewriting Wd; a fold
        applies it).
    """

    def __init__(self, Wd: np.ndarray):
        self.Wd = Wd
        self.Ut = np.empty((0, Wd.shape[0]))
        self.Vt = np.empty((0, Wd.shape[1]))
        self.r = 0
        self.s = 1.0

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
        if self.s != 1.0:
            out *= self.s
        if self.r:
            out += (A @ self.Vt[:self.r].T) @ self.Ut[:self.r]
        return out

    def matmul(self, B: np.ndarray) -> np.ndarray:
        """B @ W for B (n, rows) -> (n, cols)."""
        out = B @ self.Wd
        if self.s != 1.0:
            out *= self.s
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
        """Wd <- s Wd + Ut^T Vt in row blocks (bounded temporary), then r = 0, s = 1."""
        r, s = self.r, self.s
        if not r and s == 1.0:
            return
        rows = self.Wd.shape[0]
        U, V = self.Ut[:r], self.Vt[:r]
        tmp = np.empty((min(FOLD_BLOCK, rows), self.Wd.shape[1]))
        for i in range(0, rows, FOLD_BLOCK):
            j = min(i + FOLD_BLOCK, rows)
            if s != 1.0:
                self.Wd[i:j] *= s
            if r:
                np.matmul(U[:, i:j].T, V, out=tmp[:j - i])
                self.Wd[i:j] += tmp[:j - i]
        self.r, self.s = 0, 1.0

    def decay(self, a: float, toward: np.ndarray | None = None) -> None:
        """W <- a W + (1 - a) toward: weight decay (docs/theory.rst §7).

        Toward zero (``toward=None``) it only rescales: s <- a s and the pending factors
        Ut <- a Ut (O(r rows) work, no pass over Wd). Toward a fixed matrix (the
        initialisation) the shrinkage is not low-rank, so the pending part is folded and the
        decay applied in the same blocked pass, Wd <- a (s Wd + Ut^T Vt) + (1 - a) toward
        (one read of ``toward`` and one read-write of Wd per step).
        """
        if toward is None:
            self.s *= a
            if self.r:
                self.Ut[:self.r] *= a
            return
        r, s = self.r, self.s
        rows = self.Wd.shape[0]
        U, V = self.Ut[:r], self.Vt[:r]
        tmp = np.empty((min(FOLD_BLOCK, rows), self.Wd.shape[1]))
        b = 1.0 - a
        for i in range(0, rows, FOLD_BLOCK):
            j = min(i + FOLD_BLOCK, rows)
            blk = self.Wd[i:j]
            if s != 1.0:
                blk *= s
            if r:
                np.matmul(U[:, i:j].T, V, out=tmp[:j - i])
                blk += tmp[:j - i]
            blk *= a
            np.multiply(toward[i:j], b, out=tmp[:j - i])
            blk += tmp[:j - i]
        self.r, self.s = 0, 1.0

    def dense(self) -> np.ndarray:
        """W as one dense array (folds the pending part)."""
        self.fold()
        return self.Wd


class Weights:
    """The trainable parameters of one network (updated in place by
    :func:`solvers.network.gd_update`).

    Parameters / attributes
    -----------------------
    W0 : array (N, D)
        First-layer weights W^0.
    W : list of L - 1 arrays (N, N)
        Hidden weights W^1 .. W^{L-1} (empty for a two-layer network).
    w : array (N,) or (N, C)
        Readout weights: one output, or C >= 2 outputs f_c = w[:, c] . phi(h^L) / (gamma0 N)
        (docs/theory.rst §7).

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

    @property
    def outputs(self) -> int:
        """C, the number of outputs (1 for a readout of shape (N,))."""
        return 1 if self.w.ndim == 1 else self.w.shape[1]

    @classmethod
    def draw(cls, rng: np.random.Generator, D: int, width: int, depth: int,
             outputs: int | None = None) -> "Weights":
        """Draw i.i.d. N(0, 1) weights, in the order W^0, W^1, ..., W^{L-1}, w.

        ``outputs=None`` draws the readout w of shape (N,) (one output); an integer C draws
        it as ``rng.standard_normal((N, C))`` at the same place in the order.
        """
        W0 = rng.standard_normal((width, D))
        W = [rng.standard_normal((width, width)) for _ in range(depth - 1)]
        w = rng.standard_normal(width if outputs is None else (width, int(outputs)))
        return cls(W0, W, w)

    def fold(self) -> None:
        """Apply every pending low-rank update to the dense matrices."""
        for m in self.layers:
            m.fold()

    def copy(self) -> "Weights":
        return Weights(self.W0.copy(), [Wl.copy() for Wl in self.W], self.w.copy())
