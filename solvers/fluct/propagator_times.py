"""O(1/N) propagator of two-layer networks at selected times only (docs/theory.rst §5, issue 21).

When only some observables o are wanted (predictions and NTK entries at a few times), the
estimand of :func:`solvers.fluct.propagator.two_layer_propagator` is contracted from the left:
psi_o = e_o - J_o U = e_o - w_o . (E e) with the adjoint rows w_o = (I + E J)^-T J_o^T
(since J_o (I + E J)^-1 E e = ((I + E J)^-T J_o^T) . E e), one triangular solve for all of
them and one GEMM per chunk of samples. Only the rows E J (training predictions at t < T) and
J_o are formed: the tangent march runs on the training points alone
(:func:`_tangent_rows_kernel`), the other points' tangents only at the selected times. J may
come from a subsample of each batch-means block (``response_samples``); the means and psi use
every sample. With every sample carrying tangents the numbers equal
:func:`~solvers.fluct.propagator.two_layer_propagator`'s at those times to rounding (a test).
The initial conditions may be randomised QMC (:func:`draw_units_sobol`).
"""
from __future__ import annotations

import numpy as np
from numba import prange
from scipy.linalg import solve_triangular

from .._jit import jit, njit
from ..activations import apply
from .influence import chunk_ranges, default_chunk, finite_result, influence_result
from .two_layer import march, triu_index, unit_observables

__all__ = ["two_layer_propagator_times", "accumulate_response_times", "draw_units_sobol"]


def draw_units_sobol(kx: np.ndarray, samples: int, blocks: int, rng: np.random.Generator):
    """Single-site initial conditions from randomised QMC: each of the ``blocks`` consecutive
    groups (the batch-means blocks of :func:`two_layer_propagator_times`, same
    ``np.linspace`` bounds) is an independently scrambled Sobol set (Owen scrambling, seeded
    from ``rng``) of the (rank of kx) + 1 normals, mapped through the normal quantile; u =
    F xi with F F^T = kx (:func:`solvers.layout.low_rank_factor`, largest directions first),
    w0 the last coordinate. Every point is marginally N(0, kx) x N(0, 1) and the blocks are
    independent replicates, so batch means stay honest error bars."""
    import warnings

    from scipy.special import ndtri
    from scipy.stats import qmc

    from ..layout import low_rank_factor
    F = low_rank_factor(kx)
    r = F.shape[1]
    bounds = np.linspace(0, samples, blocks + 1).astype(int)
    z = np.empty((samples, r + 1))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        eng = qmc.Sobol(r + 1, scramble=True, seed=np.random.default_rng(
            int(rng.integers(2 ** 63))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)    # balance is exact for powers of 2
            x = eng.random(hi - lo)
        z[lo:hi] = ndtri(np.clip(x, 2.0 ** -53, 1 - 2.0 ** -53))
    return z[:, :r] @ F.T, np.ascontiguousarray(z[:, r])


@jit
def _beta_to_dh(K, vb, a0, out):
    """out[i, ci] = sum_ga K[i, ga] vb[a0, ga, ci]: the field tangents dh = K beta of
    direction a0 for every sample ci of the chunk (K = kx[:P, :P] or kx[:, :P])."""
    for i in range(K.shape[0]):
        for ci in range(out.shape[1]):
            out[i, ci] = 0.0
        for ga in range(K.shape[1]):
            k = K[i, ga]
            for ci in range(out.shape[1]):
                out[i, ci] += k * vb[a0, ga, ci]


@njit(parallel=True)
def _tangent_rows_kernel(P, w, ph, d1, d2, kPP, kxP, delta, c, gamma0, row_of, kij, iu0, iu1,
                         JE, JO, Jk, do_k):
    """Forward-mode tangents of a chunk, summed into the rows a selected-times propagator
    needs (see :func:`accumulate_response_times`).

    Fields in time-major, sample-last layout: w (T1, C), ph / d1 / d2 = phi, phi', phi'' of
    h (T1, n, C). Directions are independent given the samples' fields: the threads split
    the steps s whose P directions d = s P + a (Delta_a(s)) they march, all samples of the
    chunk together, in one parallel region; each writes only its own rows d (deterministic,
    whatever the number of threads). The P directions of one s share every read of the
    fields; the innermost loops run over the samples (contiguous). Steps are handled in
    pairs (s, T - 1 - s) so that the threads get equal work. The state of one direction is
    (beta, w) per sample; dh on the training points is kx[:P, :P] beta, on all points (at
    selected times only) kx[:, :P] beta.
    """
    T1, n, C = ph.shape
    T = T1 - 1
    m = kij.size
    half = (T + 1) // 2
    for q in prange(half):
        vb = np.empty((P, P, C))
        vw = np.empty((P, C))
        dw = np.empty(C)
        dhp = np.empty((P, C))
        dph = np.empty((n, C))
        dg = np.empty((n, C))
        for side in range(2):
            s = np.int64(q) if side == 0 else np.int64(T - 1) - np.int64(q)
            if side == 1 and s == q:
                break
            # Delta_a0(s) enters the state at s + 1
            vb[:, :, :] = 0.0
            for a0 in range(P):
                for ci in range(C):
                    vb[a0, a0, ci] = c * w[s, ci] * d1[s, a0, ci]
                    vw[a0, ci] = c * ph[s, a0, ci]
            for t in range(s + 1, T1):
                row = row_of[t]
                for a0 in range(P):
                    d = s * P + a0
                    _beta_to_dh(kPP, vb, a0, dhp)
                    if t < T:
                        for al in range(P):
                            acc = 0.0
                            for ci in range(C):
                                acc += vw[a0, ci] * ph[t, al, ci] \
                                    + w[t, ci] * d1[t, al, ci] * dhp[al, ci]
                            JE[t, d, al] += acc / gamma0
                    if row >= 0:
                        _beta_to_dh(kxP, vb, a0, dph)
                        for mu in range(n):
                            acc = 0.0
                            for ci in range(C):
                                dh = dph[mu, ci]
                                dg[mu, ci] = w[t, ci] * d2[t, mu, ci] * dh \
                                    + d1[t, mu, ci] * vw[a0, ci]
                                dph[mu, ci] = d1[t, mu, ci] * dh
                                acc += vw[a0, ci] * ph[t, mu, ci] + w[t, ci] * dph[mu, ci]
                            JO[row, d, mu] += acc / gamma0
                        if do_k:
                            for e in range(m):
                                i = iu0[e]
                                j = iu1[e]
                                ke = kij[e]
                                acc = 0.0
                                for ci in range(C):
                                    acc += ke * w[t, ci] * (dg[i, ci] * d1[t, j, ci]
                                                            + dg[j, ci] * d1[t, i, ci]) \
                                        + dph[i, ci] * ph[t, j, ci] + dph[j, ci] * ph[t, i, ci]
                                Jk[row, d, e] += acc
                    if t < T:
                        # one step: both updates read the old state
                        for ci in range(C):
                            dw[ci] = 0.0
                        for al in range(P):
                            dl = delta[t, al]
                            for ci in range(C):
                                a = dl * d1[t, al, ci]
                                dw[ci] += a * dhp[al, ci]
                                vb[a0, al, ci] += c * (dl * w[t, ci] * d2[t, al, ci] * dhp[al, ci]
                                                       + a * vw[a0, ci])
                        for ci in range(C):
                            vw[a0, ci] += c * dw[ci]


def accumulate_response_times(activation, h, w, kx, delta, c, gamma0, sel, JE, JO, Jk=None,
                              iu=None, work=None):
    """Forward-mode tangents of a chunk, summed, for the rows a propagator at selected times
    needs: the training predictions at t = 1 .. T-1 (the solve matrix I + E J) and all
    predictions (and NTK entries ``iu``) at the selected times only.

    The tangent march (:func:`_tangent_rows_kernel`) runs on the training points alone (the
    state (beta, w) needs only dh there); the test points' tangents dh = kx[:, :P] beta are
    formed only at the selected times, and no tangent array over the chunk is ever stored.
    Per sample the cost is ~T^2 P^3 / 2 (march) + |sel| T P (P n + n (n + 1) / 2) (selected
    rows), instead of T^2 P n (P + n) of
    :func:`~solvers.fluct.propagator.accumulate_response_jit`.

    Parameters
    ----------
    sel : dict {time: row}
        Selected times (1 .. T) and their row in JO / Jk (time 0 has no tangent).
    JE : (T, P T, P)
        Sum over samples of dO_al(t) / dDelta_d (direction-major, in place; row t = 0 stays 0).
    JO : (k, P T, n); Jk : (k, P T, m) or None
        Same for all points / the NTK entries at the selected times (in place).
    work : unused (kept for the signature of
        :func:`~solvers.fluct.propagator.accumulate_response_jit`).
    """
    C, T1, n = h.shape
    P = delta.shape[1]
    iu = triu_index(n) if iu is None else iu
    row_of = np.full(T1, -1, dtype=np.int64)
    for t, r in sel.items():
        row_of[t] = r
    do_k = Jk is not None
    if Jk is None:
        Jk = np.zeros((1, 1, 1))
    hT = np.ascontiguousarray(np.moveaxis(h, 0, -1))                 # (T1, n, C)
    _tangent_rows_kernel(P, np.ascontiguousarray(w.T), apply(activation, hT, 0),
                         apply(activation, hT, 1), apply(activation, hT, 2),
                         np.ascontiguousarray(kx[:P, :P]), np.ascontiguousarray(kx[:, :P]),
                         np.ascontiguousarray(delta, dtype=np.float64), float(c),
                         float(gamma0), row_of, np.ascontiguousarray(kx[iu]),
                         np.ascontiguousarray(iu[0], dtype=np.int64),
                         np.ascontiguousarray(iu[1], dtype=np.int64), JE, JO, Jk, do_k)
    return work


def two_layer_propagator_times(activation, u, w0, kx, delta, gamma0, lr, times, **options):
    """O(1/N) propagator of a two-layer network at selected times (adjoint rows).

    See :func:`_two_layer_propagator_times`. Overflow is reported as one FloatingPointError.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        res = _two_layer_propagator_times(activation, u, w0, kx, delta, gamma0, lr, times,
                                          **options)
    return finite_result(res, ("pred_cov", "ntk_var"), np.asarray(res["times"]))


def _two_layer_propagator_times(activation, u, w0, kx, delta, gamma0, lr, times, *,
                                center=False, blocks=10, chunk=None, ntk=True,
                                response_samples=None, progress=None):
    """O(1/N) propagator of a two-layer network at the selected ``times`` only.

    The same estimand as :func:`~solvers.fluct.propagator.two_layer_propagator`,
    N Cov = (I + J E)^-1 kappa (I + J E)^-T restricted to the rows of the selected
    observables o (predictions at ``times``, NTK entries at ``times``), in adjoint form:
    with e = o - <o> and the training predictions' deviations E e (P T),
    psi_o = e_o - w_o . (E e), w_o = (I + E J)^-T J_o^T, so N Cov(o, o') = <psi_o psi_o'>:
    one triangular solve for all the adjoint rows W, then one GEMM per chunk of samples
    (never per-sample products with the full J).

    Responses from a subsample: J (the tangents, the expensive part) is the mean over the
    first ``response_samples`` / blocks samples of each batch-means block; the means <o> and
    psi use every sample (the march is cheap). Each block's estimate uses its own J, so the
    batch-means standard errors include the noise of J. With ``response_samples`` = S (or
    None) the numbers equal
    :func:`~solvers.fluct.propagator.two_layer_propagator`'s at those times to rounding.

    Parameters
    ----------
    times : sequence of int
        Sorted distinct steps in 0 .. T.
    response_samples : int, optional
        Samples (over all blocks) whose tangents form J (default all).
    Other parameters as :func:`solvers.fluct.propagator._two_layer_propagator`.

    Returns
    -------
    dict as :func:`~solvers.fluct.propagator.two_layer_propagator` (full shapes over T+1
    times, NaN outside ``times``: ``cov`` on the times x times blocks, ``response`` on the
    selected times and, for the training points, at every t < T), plus ``times`` and
    ``block_ntk_var``.
    """
    S, n = u.shape
    T, P = delta.shape
    T1 = T + 1
    p = T * P
    c = lr * gamma0
    times = np.asarray(times, dtype=int)
    k = times.size
    sel = {int(t): i for i, t in enumerate(times) if t > 0}
    if chunk is None:
        chunk = default_chunk(n, P, T)
    iu = triu_index(n)
    m = iu[0].size
    bounds = np.linspace(0, S, blocks + 1).astype(int)
    R = S if response_samples is None else int(min(max(response_samples, 2 * blocks), S))
    rcount = np.diff(np.linspace(0, R, blocks + 1).astype(int))    # tangent samples per block

    def fields(lo, hi):
        h, w = march(activation, u[lo:hi], w0[lo:hi], kx, delta, c)
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(w))):
            raise FloatingPointError("the single-site fields diverged; reduce lr or gamma0")
        ph = apply(activation, h, 0)
        O = w[:, :, None] * ph / gamma0
        if center:
            O = O - O[:, :1]
        OE = O[:, :T, :P].reshape(hi - lo, p)
        Os = O[:, times]
        ks = unit_observables(activation, h[:, times], w[:, times], kx, gamma0, False, iu)[1] \
            if ntk else None
        return h, w, OE, Os, ks

    def chunks(lo, hi, size=chunk):
        return chunk_ranges(lo, hi, size)

    def estimate(lo, hi, JE, JO, Jk, means):
        mE, mO, mk = means
        A = np.eye(p) + JE.transpose(0, 2, 1).reshape(p, p)       # I + E J, unit lower
        # J_o^T with columns (t, mu): the direction-major sums (k, p, n) -> (p, k n)
        WO = solve_triangular(A, JO.transpose(1, 0, 2).reshape(p, k * n), trans="T",
                              lower=True, unit_diagonal=True, check_finite=False)
        Wk = solve_triangular(A, Jk.transpose(1, 0, 2).reshape(p, k * m), trans="T", lower=True,
                              unit_diagonal=True, check_finite=False) if ntk else None
        ff = np.zeros((k * n, k * n))
        kk = np.zeros(k * m) if ntk else None
        for a, b in chunks(lo, hi, big):
            _, _, OE, Os, ks = fields(a, b)
            eE = OE - mE
            psi = (Os - mO).reshape(b - a, k * n) - eE @ WO
            ff += psi.T @ psi
            if ntk:
                psik = (ks - mk).reshape(b - a, k * m) - eE @ Wk
                kk += np.einsum("ci,ci->i", psik, psik)
        return influence_result(ff, kk, hi - lo, k, n, iu)

    # chunks of the tangent-free passes: a few MB of fields
    big = int(np.clip(4_000_000 // (T1 * n + k * (n + m) + p), 64, 65536))
    JE_tot = np.zeros((T, p, P))
    JO_tot = np.zeros((k, p, n))
    Jk_tot = np.zeros((k, p, m)) if ntk else None
    sE_tot, sO_tot = np.zeros(p), np.zeros((k, n))
    sk_tot = np.zeros((k, m))
    kap_tot = np.zeros((k, n, n))
    block_est = []
    work = None
    r_used = 0
    for bi in range(blocks):
        lo, hi = bounds[bi], bounds[bi + 1]
        rb = min(hi, lo + rcount[bi])
        JE = np.zeros((T, p, P))
        JO = np.zeros((k, p, n))
        Jk = np.zeros((k, p, m)) if ntk else None
        for a, b in chunks(lo, rb):
            h, w, _, _, _ = fields(a, b)
            work = accumulate_response_times(activation, h, w, kx, delta, c, gamma0, sel, JE,
                                             JO, Jk, iu, work)
            if progress is not None:
                progress(b - a)
        sE, sO = np.zeros(p), np.zeros((k, n))
        sk = np.zeros((k, m))
        for a, b in chunks(lo, hi, big):
            _, _, OE, Os, ks = fields(a, b)
            sE += OE.sum(0)
            sO += Os.sum(0)
            kap_tot += np.einsum("cti,ctj->tij", Os, Os)
            if ntk:
                sk += ks.sum(0)
            if progress is not None and b > rb:
                progress(b - max(a, rb))
        r_used += rb - lo
        JE_tot += JE
        JO_tot += JO
        sE_tot += sE
        sO_tot += sO
        if ntk:
            Jk_tot += Jk
            sk_tot += sk
        cnt, rc = hi - lo, rb - lo
        block_est.append(estimate(lo, hi, JE / rc, JO / rc, None if Jk is None else Jk / rc,
                                  (sE / cnt, sO / cnt, sk / cnt)))
        del JE, JO, Jk
    JE_tot /= r_used
    JO_tot /= r_used
    if ntk:
        Jk_tot /= r_used
    mO = sO_tot / S
    sub = estimate(0, S, JE_tot, JO_tot, Jk_tot, (sE_tot / S, mO, sk_tot / S))
    kappa_sel = (kap_tot - S * mO[:, :, None] * mO[:, None, :]) / (S - 1)

    def full(arr, lead=()):
        out = np.full(lead + (T1, n, n), np.nan)
        out[(slice(None),) * len(lead) + (times,)] = arr
        return out

    res = {"times": times, "response_samples": int(r_used)}
    cov = np.full((T1, T1, n, n), np.nan)
    cov[np.ix_(times, times)] = sub["cov"]
    res["cov"] = cov
    res["pred_cov"] = full(sub["pred_cov"])
    blk_f = np.stack([b["pred_cov"] for b in block_est])
    res["pred_cov_stderr"] = full(blk_f.std(axis=0, ddof=1) / np.sqrt(blocks))
    res["block_pred_cov"] = full(blk_f, (blocks,))
    if ntk:
        blk_k = np.stack([b["ntk_var"] for b in block_est])
        res["ntk_var"] = full(sub["ntk_var"])
        res["ntk_var_stderr"] = full(blk_k.std(axis=0, ddof=1) / np.sqrt(blocks))
        res["block_ntk_var"] = full(blk_k, (blocks,))
    else:
        res["ntk_var"] = res["ntk_var_stderr"] = res["block_ntk_var"] = None
    resp = np.full((T1, n, p), np.nan)
    resp[:T, :P] = JE_tot.transpose(0, 2, 1)
    resp[times] = JO_tot.transpose(0, 2, 1)
    res["response"] = resp.reshape(T1, n, T, P)
    res["kappa"] = full(kappa_sel)
    return res
