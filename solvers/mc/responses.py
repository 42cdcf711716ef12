"""Responses A^l, B^{l-1} of a deep network (L >= 2): tangents, Stein's lemma, control variate.

By exact per-sample forward-mode tangents of the causal march (:mod:`solvers.mc.layer`).
With Lam1 = diag phi'(h), Lam2 = diag phi''(h) z, M = Lam2 + gamma0 Lam1 D Lam1:

    r-direction: dh = gamma0 C (Lam2 dh + Lam1 dz),  dz = dr + gamma0 D Lam1 dh
                 A^l     = gamma0^{-1} < Lam1 dh/dr >
    u-direction: dh = du + gamma0 C M dh,            dg = M dh
                 B^{l-1} = gamma0^{-1} < dg/du >

Both systems are block unit-lower-triangular in time and are marched forward (never
inverted). Control variate (:func:`response_control`, on by default): the first-order terms
of these series, A ~ C (.) <Lam1 Lam1^T> and B ~ gamma0^{-1} diag<Lam2> + D (.) <Lam1 Lam1^T>,
are averaged over all samples (one GEMM per chunk) and only the remainder comes from the
``response_samples`` tangent samples, a remainder of much smaller variance (measurements:
benchmarks/README.md).

Structure used: Delta = 0 and A = 0 on test columns, so test sources reach only their own
point: A has zero test columns, B has zero (train row, test column) blocks and
diagonal test-test blocks, given in closed form by

    B_{aa}(t, s) = gamma0^{-1} < Lam2_a(t) > delta_ts + D_{aa}(t, s) < Lam1_a(t) Lam1_a(s) >.

The tangent march is blocked in time (:func:`response_sums`).

ReLU: phi'' is a Dirac delta. Per-sample tangents would miss its contribution
< delta(h) z dh > (nonzero in expectation), so for ReLU the tangents use the smoothed delta
Lam2 = z exp(-h^2 / (2 eps^2)) / sqrt(2 pi eps^2) (``relu_eps``, default
``0.3 * max(S_resp, 2048) ** -0.2``). That is adequate for A (r reaches h only through one
memory step) but not for B, where u enters h directly: the sources of layers l >= 2 move by
~1e-2 of their scale per step, E[z | h = x] has structure on that scale, and no smoothing
width is both unbiased and of finite variance. B for ReLU is therefore estimated by Stein's
lemma in causally whitened sources (:func:`stein_groups`, :func:`stein_accumulate`,
:func:`stein_finish`), exact for any activation, with the baseline g(s - 1) subtracted from
g(t) in the column of each innovation of time s (it has mean zero against that innovation).
"""
from __future__ import annotations

import math

import numpy as np

from ..activations import apply
from ..layout import causal_cholesky

#: subtract the baseline g(s - 1) in Stein's estimate of B (:func:`stein_accumulate`,
#: :func:`solvers.mc.causal_layer._stein_row`); False only to measure what it gains
STEIN_BASELINE = True

__all__ = ["default_relu_eps", "response_sums", "stein_groups", "stein_accumulate",
           "stein_finish", "response_control"]


def default_relu_eps(samples: int) -> float:
    """Width of the smoothed ReLU delta for ``samples`` tangent samples (module docstring)."""
    return 0.3 * float(samples) ** -0.2


def _lam(activation: str, H, Z, relu_eps, PH=None):
    """Lam1 = phi'(H), Lam2 = phi''(H) Z (smoothed delta for ReLU). For tanh, ``PH`` =
    tanh(H) may be passed to save the transcendental evaluations."""
    if PH is not None and activation == "tanh":
        lam1 = 1.0 - PH * PH
        return lam1, -2.0 * PH * lam1 * Z
    lam1 = apply(activation, H, 1)
    if activation == "relu":
        e = float(relu_eps)
        lam2 = Z * np.exp(-0.5 * (H / e) ** 2) / (math.sqrt(2 * math.pi) * e)
    else:
        lam2 = apply(activation, H, 2) * Z
    return lam1, lam2


# ------------------------------------------------------------------------------------------
# per-sample tangents
# ------------------------------------------------------------------------------------------
def response_sums(H, Z, C, D, gamma0: float, activation: str, T1: int, n: int, P: int,
                  direction: str, out, relu_eps: float = 0.05, tblock: int = 8,
                  dtype=np.float64) -> None:
    """Add the per-sample tangents of one chunk, summed over samples, to ``out``.

    ``direction="r"``: out[(t, mu), (s, a)] += sum_samples d phi(h_mu(t)) / d r_a(s)
    (train a, s < T); divide by gamma0 S for A^l.
    ``direction="u"``: out[(t, mu), (s, a)] += sum_samples d g_mu(t) / d u_a(s) for train a
    and the closed-form test-test diagonal blocks; divide by gamma0 S for B^{l-1}.

    The tangent march (module docstring) is blocked in time: for a block of ``tblock`` times
    the memory terms from earlier blocks are one GEMM with ``tblock * n`` rows per block of
    source times (only directions s' <= s are nonzero, so the upper panels are skipped); the
    recursion inside the block touches only ``tblock`` earlier times. Same arithmetic as the
    step-by-step march, 3-5x fewer memory passes.

    Parameters
    ----------
    H, Z : (S, T1 n) fields of the chunk (from :func:`march_layer`).
    C, D : (T1 n, T1 n) the operators the fields were marched with.
    out : (T1 n, T1 n) accumulator (float64; the per-chunk sums are added in float64).
    tblock : int, times per block.
    dtype : float64 (default) or float32, the precision of the tangent march. The solver uses
        float32 with the control variate (:func:`response_control`): the tangents then give
        only the remainder beyond first order, which carries Monte Carlo noise of ~1e-2
        relative, far above float32 rounding (~1e-7 per operation, ~T n^2 operations per
        entry), and single-precision BLAS is ~2x faster.
    """
    S = H.shape[0]
    Q = n - P
    T = T1 - 1
    lam1, lam2 = _lam(activation, H, Z, relu_eps)
    # (T1, n, S): samples last, to broadcast against (rows, directions, samples); the fields
    # of march_layer are time-major in memory, so this is a view there
    L1 = np.ascontiguousarray(lam1.T, dtype=dtype).reshape(T1, n, S)
    L2 = np.ascontiguousarray(lam2.T, dtype=dtype).reshape(T1, n, S)
    rdir = direction == "r"
    ndir_t = T if rdir else T1                    # source times s' that matter
    PS = P * S
    ncol = ndir_t * PS
    # columns (s', a, sample); a direction s' is zero at times before s' (r: before s' + 1)
    dphi_tr = np.zeros((T1, P, ncol), dtype=dtype)
    dphi_te = np.zeros((T1, Q, ncol), dtype=dtype) if Q else None
    dg_tr = np.zeros((T1, P, ncol), dtype=dtype)
    Cd = np.asarray(C, dtype=dtype).reshape(T1, n, T1, n)
    Dd = np.asarray(D, dtype=dtype).reshape(T1, n, T1, n)
    te = np.arange(P, n)
    Dqq = np.ascontiguousarray(np.transpose(Dd[:, te, :, te], (0, 1, 2))) if Q else None
    acc = np.zeros((T1, n, ndir_t, P))            # summed over samples
    eyeP = np.arange(P)
    b = max(1, int(tblock))
    for t0 in range(0, T1, b):
        t1 = min(T1, t0 + b)
        nb = t1 - t0
        # directions that can be nonzero before t0: s' < t0 (both kinds)
        cp = min(t0, ndir_t) * PS
        Hp = np.zeros((nb, n, cp), dtype=dtype)
        Zp = np.zeros((nb, n, cp), dtype=dtype)
        for d0 in range(0, min(t0, ndir_t), b):
            d1 = min(t0, ndir_t, d0 + b)
            c0, c1 = d0 * PS, d1 * PS
            Ck = np.ascontiguousarray(Cd[t0:t1, :, d0:t0, :P]).reshape(nb * n, (t0 - d0) * P)
            Dk = np.ascontiguousarray(Dd[t0:t1, :, d0:t0, :P]).reshape(nb * n, (t0 - d0) * P)
            Hp[:, :, c0:c1] = (Ck @ dg_tr[d0:t0, :, c0:c1].reshape(-1, c1 - c0)).reshape(
                nb, n, c1 - c0)
            Zp[:, :, c0:c1] = (Dk @ dphi_tr[d0:t0, :, c0:c1].reshape(-1, c1 - c0)).reshape(
                nb, n, c1 - c0)
            if Q:
                for qi in range(Q):
                    Zp[:, P + qi, c0:c1] += Dqq[qi, t0:t1, d0:t0] @ dphi_te[d0:t0, qi, c0:c1]
        for t in range(t0, t1):
            k = t - t0
            cz = min(t + 1, ndir_t) * PS          # directions s' <= t can be nonzero
            if cz == 0:
                continue
            h_ = np.zeros((n, cz), dtype=dtype)
            h_[:, :cp] = Hp[k]
            if t > t0:
                Ct = np.ascontiguousarray(Cd[t, :, t0:t, :P]).reshape(n, (t - t0) * P)
                h_ += Ct @ dg_tr[t0:t, :, :cz].reshape((t - t0) * P, cz)
            h_ *= gamma0
            if not rdir:                          # direct term du_a(t)
                blk = h_[:P, t * PS:(t + 1) * PS].reshape(P, P, S)
                blk[eyeP, eyeP, :] += 1.0
            h3 = h_.reshape(n, cz // S, S)
            dphi_tr[t, :, :cz] = (h3[:P] * L1[t, :P, None, :]).reshape(P, cz)
            if Q:
                dphi_te[t, :, :cz] = (h3[P:] * L1[t, P:, None, :]).reshape(Q, cz)
            z_ = np.zeros((n, cz), dtype=dtype)
            z_[:, :cp] = Zp[k]
            Dt = np.ascontiguousarray(Dd[t, :, t0:t + 1, :P]).reshape(n, (t + 1 - t0) * P)
            z_ += Dt @ dphi_tr[t0:t + 1, :, :cz].reshape((t + 1 - t0) * P, cz)
            if Q:
                for qi in range(Q):
                    z_[P + qi] += Dqq[qi, t, t0:t + 1] @ dphi_te[t0:t + 1, qi, :cz]
            z_ *= gamma0
            if rdir:                              # direct term dr_a(t)
                if t < T:
                    blk = z_[:P, t * PS:(t + 1) * PS].reshape(P, P, S)
                    blk[eyeP, eyeP, :] += 1.0
                acc[t, :P, :cz // PS] += dphi_tr[t, :, :cz].reshape(P, -1, P, S).sum(-1)
                if Q:
                    acc[t, P:, :cz // PS] += dphi_te[t, :, :cz].reshape(Q, -1, P, S).sum(-1)
            z3 = z_.reshape(n, cz // S, S)
            g3 = h3 * L2[t, :, None, :] + z3 * L1[t, :, None, :]
            dg_tr[t, :, :cz] = g3[:P].reshape(P, cz)
            if not rdir:
                acc[t, :, :cz // PS] += g3.reshape(n, -1, P, S).sum(-1)
    o = out.reshape(T1, n, T1, n)
    o[:, :, :ndir_t, :P] += acc
    if not rdir and Q:
        # test sources: closed form, only their own point responds
        s1 = L1[:, P:, :]
        diag = np.einsum("tqk,sqk->tsq", s1, s1)                       # (T1, T1, Q)
        dqq = Dd[:, te, :, te]                                          # (Q, T1, T1)
        tri = np.tril(np.ones((T1, T1)))
        blockqq = gamma0 * np.transpose(dqq, (1, 2, 0)) * diag * tri[:, :, None]
        idx = np.arange(T1)
        blockqq[idx, idx, :] += L2[:, P:, :].sum(-1)
        o[:, te, :, te] += np.transpose(blockqq, (2, 0, 1))


# ------------------------------------------------------------------------------------------
# deep networks: B by Stein's lemma in causally whitened sources (ReLU)
# ------------------------------------------------------------------------------------------
def stein_groups(K, T1: int, n: int, P: int, rtol: float = 1e-6) -> list:
    """Whitening groups for B^{l-1} = gamma0^{-1} <dg/du> by Stein's lemma (see
    :func:`stein_finish`), from the covariance K (T1 n, T1 n) of the sources u.

    Test points are passive, so g on a training point depends on the training sources only and
    g on test point q on the training sources and u_q only. One group per row set: the
    training rows with the training sources (time-major), and for each test point q its rows
    with the sources of the training points and q (time-major, interleaved). In each group
    u_c = L xi with L causal, and <g_rows xi^T> = <dg_rows/du_c> L exactly for Gaussian u.

    Returns
    -------
    list of dicts with ``rows`` (flat row indices), ``cols`` (flat source indices with an
    innovation), ``L`` (causal Cholesky factor of K[cols, cols]), ``row_t``, ``col_t`` (their
    times).
    """
    tb = np.repeat(np.arange(T1), n)
    pb = np.tile(np.arange(n), T1)
    train = np.flatnonzero(pb < P)
    groups = []
    for q in [None] + list(range(P, n)):
        rows = train if q is None else np.flatnonzero(pb == q)
        cand = train if q is None else np.flatnonzero((pb < P) | (pb == q))
        keep, Lc = causal_cholesky(K[np.ix_(cand, cand)], rtol)
        cols = cand[keep]
        groups.append({"rows": rows, "cols": cols, "L": Lc, "row_t": tb[rows],
                       "col_t": tb[cols]})
    return groups


def stein_accumulate(groups, u, G, acc, n: int | None = None) -> None:
    """Add sum_samples (g_rows - g_base) xi^T of one chunk to ``acc`` (a list, one array per
    group), xi = L^{-1} u_cols the whitened sources of the chunk (u, G: (S, T1 n)).

    Baseline (with ``n``, the points per time; :data:`STEIN_BASELINE`): the column of an
    innovation of time s >= 1 uses g_mu(t) - g_mu(s - 1) for row (t, mu). g(s - 1) depends on
    the sources of times < s and on the independent backward sources only, so
    <g_mu(s - 1) xi> = 0 exactly and the estimate stays unbiased; what it removes is the part
    of g(t) already fixed before the innovation, which is most of g(t) when t - s is small
    (measurements: benchmarks/README.md)."""
    from scipy.linalg import solve_triangular

    for grp, a in zip(groups, acc):
        xi = solve_triangular(grp["L"], u[:, grp["cols"]].T, lower=True, check_finite=False)
        a += G[:, grp["rows"]].T @ xi.T
        if n is None or not STEIN_BASELINE:
            continue
        pts, mu = np.unique(grp["rows"] % n, return_inverse=True)
        col_t = grp["col_t"]
        for s in np.unique(col_t[col_t >= 1]):
            c = np.flatnonzero(col_t == s)
            # the group's points at time s - 1 against the innovations of time s, then the
            # row (t, mu) takes its point's entries
            a[:, c] -= (G[:, (s - 1) * n + pts].T @ xi[c].T)[mu]


def stein_finish(groups, acc, samples: int, gamma0: float, m: int) -> np.ndarray:
    """B = gamma0^{-1} <dg/du> (m, m) from the Stein sums of :func:`stein_accumulate`.

    Stein's lemma in whitened coordinates: <dg/dxi> = <g xi^T> exactly for xi ~ N(0, I), so
    <dg/du_c> = <g xi^T> L^{-1}. Causality is imposed where it is exact, in xi: g(t) does not
    depend on innovations of later times (set to zero), which keeps the estimate causal after
    the triangular solve. No pseudo-inverse and no regularisation: the only approximation is
    the dropping of innovations below ``rtol`` of a variable's variance (their share of the
    fields is below sqrt(rtol)). The estimate is unbiased for every activation (ReLU's
    phi'' = delta needs no special treatment); its noise is larger than that of per-sample
    tangents but enters the fields as a fixed random linear map of whitened features.
    """
    from scipy.linalg import solve_triangular

    B = np.zeros((m, m))
    for grp, a in zip(groups, acc):
        J = a / samples
        J *= grp["col_t"][None, :] <= grp["row_t"][:, None]
        # J L^{-1}: solve L^T X^T = J^T
        X = solve_triangular(grp["L"], J.T, lower=True, trans="T", check_finite=False).T
        B[np.ix_(grp["rows"], grp["cols"])] = X / gamma0
    return B


# ------------------------------------------------------------------------------------------
# deep networks: control variate for the tangent responses
# ------------------------------------------------------------------------------------------
def response_control(accA, accB, C, D, kl_all, kl_r, l2_all, l2_r, samples: int,
                     response_samples: int, gamma0: float) -> None:
    """Replace the leading term of the tangent sums by its all-sample average (in place).

    The per-sample tangents are the Neumann series of (I - gamma0 C M)^{-1}; their first terms

        d phi / d r  ~  gamma0 Lam1 C Lam1            (A^l     ~ C (.) <Lam1 Lam1^T>)
        d g / d u    ~  Lam2 + gamma0 Lam1 D Lam1     (B^{l-1} ~ gamma0^{-1} diag<Lam2>
                                                                 + D (.) <Lam1 Lam1^T>)

    are averages of products of two fields: one (S, T1 n) GEMM per chunk (like the kernels)
    instead of ~ T P times that. With their sums over the ``response_samples`` tangent samples
    (``kl_r``: sum of Lam1 Lam1^T, ``l2_r``: sum of Lam2) and over all ``samples`` (``kl_all``,
    ``l2_all``), the estimate

        <J>  ~  mean_Sr(J - J1) + mean_S(J1)

    is unbiased (both terms are). Its noise is that of the remainder J - J1 from Sr samples
    plus that of J1 from S samples (the remainder's variance is far smaller than the tangents';
    measurements: benchmarks/README.md). The first-order terms lie inside the blocks the
    tangents fill (C, D have train columns and, through B, the test-test diagonal blocks
    only). ``accA`` / ``accB`` (sums over the Sr
    samples of d phi/dr and dg/du; either may be None) are modified so that the caller's
    division by gamma0 Sr gives the combined estimate.
    """
    q = response_samples / samples
    dk = q * kl_all - kl_r                          # Sr (mean_S - mean_Sr) of Lam1 Lam1^T
    if accA is not None:
        accA += gamma0 * C * dk
    if accB is not None:
        accB += gamma0 * D * dk
        accB[np.diag_indices_from(accB)] += q * l2_all - l2_r
