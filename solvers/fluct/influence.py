"""Batch-means estimation shared by the two-layer O(1/N) propagators (docs/theory.rst §5).

The engines (:mod:`solvers.fluct.propagator`, every step; :mod:`solvers.fluct.propagator_times`,
selected times; :mod:`solvers.fluct.propagator_objective`, any objective) differ in how they
march the single-site fields, sum the forward-mode tangents into the mean response J and form
the influence vectors psi; they share what is here: the chunking of the samples, the
covariances from the influence sums, the batch-means loop of the every-step engines
(:func:`batch_means_propagator`) and the check that a result is finite.
"""
from __future__ import annotations

import numpy as np

from ..layout import two_time

__all__ = ["default_chunk", "chunk_ranges", "influence_result", "finite_result",
           "batch_means_propagator"]


def default_chunk(n, P, T, target=4_000_000):
    """Samples per chunk so that the tangent buffers hold about ``target`` floats (32 MB):
    few large BLAS calls (thread start-up dominates small ones on a busy machine) while the
    buffers stay small."""
    return int(np.clip(target // (T * P * (P + 1 + 3 * n)), 32, 8192))


def chunk_ranges(lo, hi, size):
    """Consecutive (start, stop) sample ranges of at most ``size`` covering lo .. hi."""
    for a in range(lo, hi, size):
        yield a, min(hi, a + size)


def influence_result(ff, kk, count, k, n, iu):
    """Covariances from the influence sums over ``count`` samples at k times: ``cov`` (k, k,
    n, n) two-time, ``pred_cov`` (k, n, n) equal-time, ``ntk_var`` (k, n, n) from the NTK
    entries' sums ``kk`` (k m,) over the upper triangle ``iu`` (omitted when kk is None)."""
    ff /= (count - 1)
    cov = two_time(ff, k, n)
    out = {"cov": cov, "pred_cov": np.ascontiguousarray(cov[np.arange(k), np.arange(k)])}
    if kk is not None:
        kk /= (count - 1)
        m = iu[0].size
        var = np.empty((k, n, n))
        var[:, iu[0], iu[1]] = kk.reshape(k, m)
        var[:, iu[1], iu[0]] = kk.reshape(k, m)
        out["ntk_var"] = var
    return out


def finite_result(res, keys, rows=slice(None)):
    """``res`` unchanged when the arrays ``keys`` (those present and not None) are finite on
    ``rows``; otherwise one FloatingPointError (a diverging linearisation)."""
    for key in keys:
        if res.get(key) is not None and not np.all(np.isfinite(res[key][rows])):
            raise FloatingPointError("non-finite propagator: the linearised dynamics diverged; "
                                     "reduce lr or gamma0")
    return res


def batch_means_propagator(fields, accumulate, solve, influence, *, samples, shape, iu,
                           blocks, chunk, ntk, direction_major=False, progress=None):
    """N Cov from influence vectors over every step, with batch-means standard errors.

    The samples are split into ``blocks`` consecutive blocks; each block gives an estimate
    from its own mean response J, J_K and means, and the reported value uses all samples at
    once (module docstring of :mod:`solvers.fluct.propagator`).

    Parameters
    ----------
    fields : callable (lo, hi) -> (h, w, O, k)
        The marched fields of samples lo .. hi and their per-unit observables O (C, T+1, n)
        and NTK entries k (C, T+1, m) (None when not ``ntk``).
    accumulate : callable (h, w, JO, Jk)
        Adds the chunk's tangent sums to JO, Jk (in place).
    solve : callable JO -> A
        The unit lower triangular solve matrix from the mean response (T+1, n, p).
    influence : callable (O, k, mean_O, mean_k, JO, Jk, A, out_ff, out_kk)
        Adds a chunk's sums psi_f psi_f^T and psi_k^2 to out_ff, out_kk.
    samples : int; shape : (T+1, n, p); iu : the NTK entries (m of them)
    direction_major : bool
        ``accumulate`` sums in the layout (T+1, p, n) (transposed after each block).

    Returns
    -------
    dict with ``cov``, ``pred_cov``, ``ntk_var`` (or None), ``pred_cov_stderr``,
    ``block_pred_cov``, ``ntk_var_stderr`` (or None), ``response`` (T+1, n, p) and
    ``kappa`` (T+1, n, n).
    """
    S = samples
    T1, n, p = shape
    m = iu[0].size
    bounds = np.linspace(0, S, blocks + 1).astype(int)

    def estimate(lo, hi, JO, Jk, mO, mk):
        ff = np.zeros((T1 * n, T1 * n))
        kk = np.zeros(T1 * m) if ntk else None
        A = solve(JO)
        for a, b in chunk_ranges(lo, hi, chunk):
            _, _, O, k = fields(a, b)
            influence(O, k, mO, mk, JO, Jk, A, ff, kk)
        return influence_result(ff, kk, hi - lo, T1, n, iu)

    JO_tot = np.zeros((T1, n, p))
    Jk_tot = np.zeros((T1, m, p)) if ntk else None
    sO_tot = np.zeros((T1, n))
    sk_tot = np.zeros((T1, m))
    kap_tot = np.zeros((T1, n, n))
    block_est = []
    for bi in range(blocks):
        lo, hi = bounds[bi], bounds[bi + 1]
        sO = np.zeros((T1, n))
        sk = np.zeros((T1, m))
        if direction_major:
            JO = np.zeros((T1, p, n))
            Jk = np.zeros((T1, p, m)) if ntk else None
        else:
            JO = np.zeros((T1, n, p))
            Jk = np.zeros((T1, m, p)) if ntk else None
        for a, b in chunk_ranges(lo, hi, chunk):
            h, w, O, k = fields(a, b)
            accumulate(h, w, JO, Jk)
            sO += O.sum(0)
            kap_tot += np.einsum("cti,ctj->tij", O, O)
            if ntk:
                sk += k.sum(0)
            if progress is not None:
                progress(b - a)
        if direction_major:
            JO = np.ascontiguousarray(JO.transpose(0, 2, 1))
            Jk = None if Jk is None else np.ascontiguousarray(Jk.transpose(0, 2, 1))
        JO_tot += JO
        sO_tot += sO
        if ntk:
            Jk_tot += Jk
            sk_tot += sk
        cnt = hi - lo
        block_est.append(estimate(lo, hi, JO / cnt, None if Jk is None else Jk / cnt,
                                  sO / cnt, sk / cnt))
        del JO, Jk
    JO_tot /= S
    mO = sO_tot / S
    if ntk:
        Jk_tot /= S
    res = estimate(0, S, JO_tot, Jk_tot, mO, sk_tot / S)
    kappa = (kap_tot - S * mO[:, :, None] * mO[:, None, :]) / (S - 1)

    def se(key):
        arr = np.stack([b[key] for b in block_est])
        return arr.std(axis=0, ddof=1) / np.sqrt(blocks), arr

    res["pred_cov_stderr"], res["block_pred_cov"] = se("pred_cov")
    if ntk:
        res["ntk_var_stderr"], _ = se("ntk_var")
    else:
        res["ntk_var"] = None
        res["ntk_var_stderr"] = None
    res["response"] = JO_tot
    res["kappa"] = kappa
    return res
