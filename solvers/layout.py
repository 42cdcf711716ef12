"""Shared layouts (flat <-> two-time, causal masks) and PSD factorisations of the engines.

Layouts. n points (train first), T1 = T + 1 times. A two-time kernel is held either *flat*,
a (T1 n, T1 n) matrix with time-major index ``i = t * n + mu`` (``K[t*n + mu, s*n + nu] =
K_{mu nu}(t, s)``), or *two-time*, an array (T1, T1, n, n) with axes (t, s, mu, nu).
:func:`two_time` converts flat to two-time, :func:`equal_time` takes the equal-time blocks
K(t, t) (T1, n, n), :func:`flat_index` gives the flat index of (t, mu) and :func:`causal_mask`
the flat mask of the causal blocks (s < t, or s <= t).

Factorisations. Four ideas, kept apart because their numbers differ:

- :func:`psd_sqrt`: the symmetric root S = V sqrt(w) V^T. Use it where the factor must be a
  continuous function of K (common random numbers across fixed-point iterations).
- :func:`eig_factor`: R = V sqrt(w) (R R^T = K, full size, eigenvalues clipped at 0). The
  cheapest root for drawing i.i.d. Gaussian samples when continuity does not matter.
- :func:`low_rank_factor`: F (m, r) with the r kept eigen-directions, largest first. Use it
  with quasi-random numbers: the first coordinates drive the largest directions, and the
  dimension of the point set is the rank, not m.
- :func:`causal_cholesky` (whole matrix) and :class:`CausalFactor` (revealed one time block at
  a time): Cholesky factors in the given time-major order, dropping innovations below
  ``rtol`` of a variable's variance. Use them where the factor must be causal (a variable
  depends only on innovations of variables up to it): causal sources and Stein's lemma.
"""
from __future__ import annotations

import math

import numpy as np

from ._jit import njit

__all__ = ["two_time", "equal_time", "flat_index", "causal_mask", "psd_sqrt", "eig_factor",
           "low_rank_factor", "causal_cholesky", "CausalFactor"]


# ------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------
def two_time(K, T1, n):
    """Flat (..., T1 n, T1 n) kernel -> contiguous (..., T1, T1, n, n) (axes t, s, mu, nu)."""
    lead = K.shape[:-2]
    return np.ascontiguousarray(
        np.moveaxis(K.reshape(*lead, T1, n, T1, n), -3, -2))


def flat_index(T1, n):
    """(T1, n) integer array of the flat time-major index t * n + mu."""
    return np.arange(T1)[:, None] * n + np.arange(n)[None, :]


def equal_time(K, T1, n):
    """Equal-time blocks K(t, t) (T1, n, n) of a flat (T1 n, T1 n) kernel (NumPy or torch)."""
    idx = np.arange(T1)
    return K.reshape(T1, n, T1, n)[idx, :, idx, :]


def causal_mask(T1, n, strict: bool = True):
    """(T1 n, T1 n) boolean mask of the causal blocks: s < t (``strict``) or s <= t."""
    tb = np.repeat(np.arange(T1), n)
    return tb[:, None] > tb[None, :] if strict else tb[:, None] >= tb[None, :]


# ------------------------------------------------------------------------------------------
# factorisations
# ------------------------------------------------------------------------------------------
def psd_sqrt(K, rtol: float = 1e-12) -> np.ndarray:
    """Symmetric PSD square root S = V sqrt(max(w, 0)) V^T of a symmetric matrix K.

    Eigenvalues below ``rtol * max(w)`` (rank deficiency, rounding) are set to zero. The
    symmetric root (not a Cholesky or eigenvector factor) is used because it is a continuous
    function of K: with common random numbers u = S xi the fixed-point map then stays
    continuous across iterations, even where eigenvalues are degenerate.

    Parameters
    ----------
    K : array (m, m)

    Returns
    -------
    S : array (m, m), symmetric, S @ S = K up to the clipped eigenvalues.
    """
    K = np.asarray(K, dtype=np.float64)
    K = 0.5 * (K + K.T)
    if not np.all(np.isfinite(K)):
        raise FloatingPointError("non-finite kernel: the fields diverged")
    w, V = np.linalg.eigh(K)
    top = max(float(w[-1]), 0.0)
    if top == 0.0:
        return np.zeros_like(K)
    if w[0] < -0.5 * top:
        # small negative eigenvalues come from mixing / extrapolating estimates and are
        # clipped; a dominant negative one means the iteration has left the kernels' cone
        raise FloatingPointError(f"kernel is far from positive semidefinite (eigenvalue "
                                 f"{w[0]:.3g} against largest {top:.3g})")
    w = np.where(w > rtol * top, w, 0.0)
    return (V * np.sqrt(w)) @ V.T


def eig_factor(K, *, symmetrize: bool = False, check: bool = True) -> np.ndarray:
    """A square root R = V sqrt(max(w, 0)) (R R^T = K) of a symmetric PSD matrix, singular K
    (repeated points) included.

    ``symmetrize``: factor 0.5 (K + K^T) (else the lower triangle of K is read). ``check``:
    raise ValueError for a clearly indefinite K (smallest eigenvalue below -1e-10 max(1, |w|)).
    """
    if symmetrize:
        K = 0.5 * (K + K.T)
    lam, V = np.linalg.eigh(K)
    if check and lam.min() < -1e-10 * max(1.0, abs(lam.max())):
        raise ValueError(f"the input kernel is not positive semidefinite (smallest eigenvalue "
                         f"{lam.min():.3g})")
    return V * np.sqrt(np.clip(lam, 0.0, None))


def low_rank_factor(K, rtol: float = 1e-12) -> np.ndarray:
    """F (m, r) with F F^T = K (eigenvalues below ``rtol * max`` dropped), columns ordered by
    decreasing eigenvalue: the first quasi-random coordinates drive the largest directions."""
    K = 0.5 * (np.asarray(K, dtype=np.float64) + np.asarray(K, dtype=np.float64).T)
    w, V = np.linalg.eigh(K)
    w, V = w[::-1], V[:, ::-1]
    top = max(float(w[0]), 0.0)
    keep = w > rtol * top if top > 0 else np.zeros(len(w), dtype=bool)
    if not keep.any():
        return np.zeros((K.shape[0], 1))
    return V[:, keep] * np.sqrt(w[keep])


def causal_cholesky(K, rtol: float = 1e-6):
    """Cholesky factor of a PSD matrix in its given (causal) order, dropping innovations.

    Left-looking Cholesky without pivoting (the order is time-major, so the factor is causal:
    variable j is a combination of the innovations of variables <= j). A variable whose
    innovation variance (Schur pivot) is below ``rtol`` times its own variance is a
    combination of the earlier ones to that accuracy and gets no innovation of its own.

    Returns
    -------
    keep : (k,) int, the variables with an innovation (increasing);
    L : (k, k) exact lower Cholesky factor of ``K[keep][:, keep]``.
    """
    K = 0.5 * (np.asarray(K, dtype=np.float64) + np.asarray(K, dtype=np.float64).T)
    m = K.shape[0]
    if not np.all(np.isfinite(K)):
        raise FloatingPointError("non-finite kernel: the fields diverged")
    F = np.zeros((m, m))
    keep = np.zeros(m, dtype=bool)
    diag = np.diag(K)
    for j in range(m):
        v = K[j:, j] - F[j:, :j] @ F[j, :j]
        if v[0] > rtol * max(diag[j], 0.0) and v[0] > 0.0:
            F[j:, j] = v / math.sqrt(v[0])
            keep[j] = True
    idx = np.flatnonzero(keep)
    # the exact factor of the kept block: its pivots are >= the ones above (fewer conditions)
    return idx, np.linalg.cholesky(K[np.ix_(idx, idx)])


@njit
def _block_cholesky(Sch, var, rtol):
    """Left-looking Cholesky of a block's Schur complement in its given order, variable i
    getting an innovation only if its pivot exceeds 0 and ``rtol * var[i]``: (Fb, kept) with
    Fb (b, b) holding the kept columns first (column r for the r-th kept variable)."""
    b = Sch.shape[0]
    Fb = np.zeros((b, b))
    kept = np.zeros(b, dtype=np.bool_)
    r = 0
    for i in range(b):
        piv = Sch[i, i]
        for c in range(r):
            piv -= Fb[i, c] * Fb[i, c]
        if piv > 0.0 and piv > rtol * max(var[i], 0.0):
            d = math.sqrt(piv)
            Fb[i, r] = d
            for j in range(i + 1, b):
                v = Sch[j, i]
                for c in range(r):
                    v -= Fb[j, c] * Fb[i, c]
                Fb[j, r] = v / d
            kept[i] = True
            r += 1
    return Fb, kept


@njit(fastmath={"reassoc"})
def _extend_block(Krows, F, Lk, piv, k, v0, rtol, tol_loss):
    """The work of :meth:`CausalFactor.extend` in place on ``F``, ``Lk``, ``piv``: returns
    (code, worst, kept) with code 0 (done), 1 (non-finite ``Krows``) or 2 (a Schur
    complement's diagonal below ``-tol_loss`` times the variable's variance: lost accuracy;
    ``worst`` its smallest diagonal); nothing is written unless the code is 0.

    X = Krows[:, piv[:k]] Lk^-T by forward substitution (row c of ``Lk`` against the
    contiguous row of X), Sch = Krows[:, v0:v0+b] - X X^T symmetrised, then
    :func:`_block_cholesky`; rows v0.. of F get X and the kept columns, ``Lk`` the kept rows.
    The dot products may be reassociated (``fastmath={"reassoc"}``: vectorised reductions, a
    different order of rounding); every input is checked finite first."""
    b = Krows.shape[0]
    kept = np.zeros(b, dtype=np.bool_)
    for i in range(b):
        for j in range(v0 + b):
            if not np.isfinite(Krows[i, j]):
                return 1, 0.0, kept
    X = np.empty((b, k))
    for j in range(b):
        for c in range(k):
            acc = Krows[j, piv[c]]
            for d in range(c):
                acc -= X[j, d] * Lk[c, d]
            X[j, c] = acc / Lk[c, c]
    Sch = np.empty((b, b))
    for i in range(b):
        for j in range(i + 1):
            v = 0.0
            for c in range(k):
                v += X[i, c] * X[j, c]
            a = 0.5 * ((Krows[i, v0 + j] - v) + (Krows[j, v0 + i] - v))
            Sch[i, j] = a
            Sch[j, i] = a
    var = np.empty(b)
    worst = np.inf
    lost = False
    for i in range(b):
        var[i] = Krows[i, v0 + i]
        worst = min(worst, Sch[i, i])
        if Sch[i, i] < -tol_loss * max(var[i], 1e-300):
            lost = True
    if lost:
        return 2, worst, kept
    Fb, kept = _block_cholesky(Sch, var, rtol)
    r = 0
    for i in range(b):
        if kept[i]:
            r += 1
    for i in range(b):
        for c in range(k):
            F[v0 + i, c] = X[i, c]
        for c in range(r):
            F[v0 + i, k + c] = Fb[i, c]
    c = 0
    for i in range(b):
        if kept[i]:
            piv[k + c] = v0 + i
            for d in range(k + r):
                Lk[k + c, d] = F[v0 + i, d]
            c += 1
    return 0, worst, kept


class CausalFactor:
    """Causal Cholesky factor of a covariance revealed one block of variables at a time.

    Variables are indexed in their causal order. After ``extend`` calls for blocks of b
    variables, ``F[:nvar, :k]`` satisfies F F^T = K (up to dropped innovations) with F lower
    trapezoidal in the compact innovation index: innovation c belongs to variable ``piv[c]``
    and loads only on variables >= piv[c]. ``Lk = F[piv[:k], :k]`` is lower triangular.

    A variable whose innovation variance (the Schur complement given all earlier variables) is
    at most ``rtol`` times its own variance gets no innovation; it is represented by its
    regression on the earlier variables.
    """

    def __init__(self, m: int, rtol: float):
        self.F = np.zeros((m, m))
        self.Lk = np.zeros((m, m))
        self.piv = np.zeros(m, dtype=np.int64)
        self.k = 0
        self.nvar = 0
        self.rtol = float(rtol)
        self.tol_loss = 1e-3
        self.new = np.zeros(0, dtype=np.int64)      # in-block indices of the last new pivots
        # rows of the innovations' normals generated ahead (solvers.mc.causal_layer._draw)
        self.gen = 0

    def extend(self, Krows) -> np.ndarray:
        """Add a block of b variables; ``Krows`` (b, nvar + b) is their covariance with all
        variables so far and with themselves. Returns the new rows ``F[block, :k]``.

        One compiled call (:func:`_extend_block`): the regression of the block on the kept
        innovations (a forward substitution with ``Lk``), the block's Schur complement and
        its pivoted Cholesky (:func:`_block_cholesky`)."""
        Krows = np.ascontiguousarray(Krows, dtype=np.float64)
        b = Krows.shape[0]
        v0, k = self.nvar, self.k
        code, worst, newmask = _extend_block(Krows, self.F, self.Lk, self.piv, k, v0,
                                             self.rtol, self.tol_loss)
        if code == 1:
            raise FloatingPointError("non-finite kernel: the fields diverged")
        if code == 2:
            # the Schur complement is PSD in exact arithmetic; a clearly negative diagonal
            # means the factor lost accuracy (near-degenerate pivots compounding): never
            # draw from it
            raise FloatingPointError(
                "the causal factor of a source kernel lost accuracy (innovation variance "
                f"{worst:.3g} < 0); raise the innovation threshold src_rtol")
        self.new = np.flatnonzero(newmask)
        self.k = k + len(self.new)
        self.nvar = v0 + b
        return self.F[v0:v0 + b, :self.k]
