"""O(1/N) propagator of two-layer networks around a given infinite-width Delta (docs/theory.rst §5).

Propagator
----------
At width N, f = <O>(Delta_N) + eps / sqrt(N) with Delta_N = y - f on the training points, so to
first order (I + J E) delta f = eps / sqrt(N), J = d<O>/dDelta (causal: O(t) depends on
Delta(s < t)), E the restriction to training points at times 0 .. T-1 with the sign of
delta Delta = -E delta f. Likewise delta K = eps_K / sqrt(N) - J_K E delta f. Hence

    N Cov(f)  = (I + J E)^{-1} kappa_O (I + J E)^{-T}                (two-time, all points)

and the same for the stacked vector (O, k). It is evaluated through per-sample *influence
vectors*: for a sample with centred observables e = O - <O>, q = k - <k>,

    U   = (I + E J)^{-1} E e          (unit lower triangular solve, size P T)
    psi_f = e - J U,     psi_k = q - J_K U

and N Cov = average of psi psi^T. J and J_K are sample averages of forward-mode tangents of the
march (:mod:`solvers.fluct.two_layer`; directions Delta_a(s)), accumulated with BLAS over
chunks of samples. Monte Carlo errors come from batch means: the samples are split into
blocks, each block gives an independent estimate (its own J, J_K, means), and the standard
error is the spread of the block estimates over sqrt(blocks). The reported value uses all
samples at once.

Selected times (:func:`two_layer_propagator_times`, issue 21)
-------------------------------------------------------------
When only some observables o are wanted (predictions and NTK entries at a few times), the
same estimand is contracted from the left: psi_o = e_o - J_o U = e_o - w_o . (E e) with the
adjoint rows w_o = (I + E J)^-T J_o^T (since J_o (I + E J)^-1 E e = ((I + E J)^-T J_o^T) . E e),
one triangular solve for all of them and one GEMM per chunk of samples. Only the rows E J
(training predictions at t < T) and J_o are formed: the tangent march runs on the training
points alone (:func:`_tangent_rows_kernel`), the other points' tangents only at the selected
times. J may come from a subsample of each batch-means block (``response_samples``); the
means and psi use every sample. With every sample carrying tangents the numbers equal
:func:`two_layer_propagator`'s at those times to rounding (a test).
"""
from __future__ import annotations

import numpy as np
from numba import prange
from scipy.linalg import solve_triangular

from .._jit import njit
from ..activations import apply, code as _act_code, ddphi as _ddphi, dphi as _dphi, phi as _phi
from ..layout import two_time
from .two_layer import march, triu_index, unit_observables

__all__ = ["accumulate_response", "accumulate_response_jit", "influence_moments",
           "default_chunk", "two_layer_propagator", "two_layer_propagator_times",
           "accumulate_response_times", "draw_units_sobol"]


def _ntk_tangent(X, Y, kij, iu):
    """Tangents of the per-unit NTK entries ``iu`` = (i, j), (d, m), from the direction-major
    sums X = sum_c dg g^T, Y = sum_c dphi phi^T (d, n, n): kx_ij (X_ij + X_ji) + Y_ij + Y_ji."""
    i, j = iu
    return kij * (X[:, i, j] + X[:, j, i]) + Y[:, i, j] + Y[:, j, i]


def accumulate_response(activation, h, w, kx, delta, c, gamma0, JO, Jk=None, iu=None):
    """Add the forward-mode tangents of a chunk of samples to the response sums.

    The tangent directions are the P T error-signal entries Delta_a(s), s = 0 .. T-1, in the
    order d = s P + a. Each sample's state tangents Vh = dh/dDelta (n, P T) and
    Vw = dw/dDelta (P T,) follow the linearised march; Delta(s) first enters the state at
    s + 1 (causality), so only the first t P directions are active at time t.

    Parameters
    ----------
    h : array (C, T+1, n); w : array (C, T+1)
        The chunk's marched fields (:func:`march`).
    kx : (n, n); delta : (T, P); c : lr * gamma0
    JO : array (T+1, n, P T)
        Sum over samples of dO_mu(t) / dDelta_a(s) (updated in place).
    Jk : array (T+1, m, P T), optional
        Sum over samples of dk_{mu nu}(t) / dDelta_a(s) for the entries ``iu`` (in place).
    """
    C, T1, n = h.shape
    T, P = delta.shape
    p = T * P
    iu = triu_index(n) if iu is None else iu
    kxP = kx[:, :P]
    Vh = np.zeros((C, n, p))
    Vw = np.zeros((C, p))
    for t in range(T):
        ht = h[:, t, :P]
        wt = w[:, t]
        a = apply(activation, ht, 1)
        act = t * P
        if act:
            b = apply(activation, ht, 2)
            VhP = Vh[:, :P, :act]
            # Z_{c,al,d} = Delta_al (phi'(h_al) dw_d + w phi''(h_al) dh_{al,d}): both tangent
            # updates read the old state, so Z and dVw are formed before either is applied
            Z = (delta[t] * a)[:, :, None] * Vw[:, None, :act] \
                + (delta[t] * b * wt[:, None])[:, :, None] * VhP
            dVw = np.einsum("ca,cad->cd", delta[t] * a, VhP)
            Vh[:, :, :act] += c * np.matmul(kxP, Z)
            Vw[:, :act] += c * dVw
        # new directions: Delta(t) enters the state at t + 1
        Vh[:, :, act:act + P] = c * kxP[None, :, :] * (wt[:, None] * a)[:, None, :]
        Vw[:, act:act + P] = c * apply(activation, ht, 0)
        act1 = act + P
        h1 = h[:, t + 1]
        w1 = w[:, t + 1]
        ph1 = apply(activation, h1, 0)
        dph1 = apply(activation, h1, 1)
        Vh1 = Vh[:, :, :act1]
        Vw1 = Vw[:, None, :act1]
        dph_tan = dph1[:, :, None] * Vh1                     # d phi(h_mu) / dDelta
        JO[t + 1, :, :act1] += (ph1[:, :, None] * Vw1 + w1[:, None, None] * dph_tan).sum(0) \
            / gamma0
        if Jk is not None:
            g1 = dph1 * w1[:, None]
            dg = (apply(activation, h1, 2) * w1[:, None])[:, :, None] * Vh1 + dph1[:, :, None] * Vw1
            # sum_c dg_{c mu d} g_{c nu} as one GEMM: (mu, d, nu)
            X = np.tensordot(dg, g1, axes=([0], [0]))
            Y = np.tensordot(dph_tan, ph1, axes=([0], [0]))
            Jk[t + 1, :, :act1] += _ntk_tangent(np.moveaxis(X, 1, 0), np.moveaxis(Y, 1, 0),
                                                kx[iu], iu).T


@njit(parallel=True)
def _tangent_step_kernel(act, t, P, h0, w0, h1, w1, kx, delta_t, c, Vb, Vw, dh, dph, dg):
    """One step of the forward-mode tangents of a chunk (see :func:`accumulate_response_jit`).

    Vb (C, p, P), Vw (C, p): tangents of beta and w (h = u + kx[:, :P] beta) in the directions
    d = s P + a; on entry they hold time t, on exit t + 1 (the P new directions of Delta(t)
    included). dh (C, p, n): the tangents of h = kx[:, :P] Vb, read at time t for the training
    points and rewritten at t + 1 (so the P x P product is never done twice). dph, dg
    (C, p, n): written for the active directions d < (t+1) P with d phi(h_mu(t+1)) and
    d g_mu(t+1) (g = phi'(h) w).
    """
    C = h0.shape[0]
    n = kx.shape[0]
    act0 = t * P
    act1 = act0 + P
    # samples are independent: threads over the chunk, each writing only its own rows, so
    # the result does not depend on the number of threads
    for ci in prange(C):
        a = np.empty(P)     # Delta phi'(h)
        b = np.empty(P)     # Delta w phi''(h)
        d1 = np.empty(n)
        d2 = np.empty(n)
        w = w0[ci]
        for al in range(P):
            x = h0[ci, al]
            a[al] = delta_t[al] * _dphi(act, x)
            b[al] = delta_t[al] * w * _ddphi(act, x)
        for d in range(act0):
            vw = Vw[ci, d]
            dw = 0.0
            for al in range(P):
                dht = dh[ci, d, al]
                dw += a[al] * dht
                Vb[ci, d, al] += c * (b[al] * dht + a[al] * vw)
            Vw[ci, d] = vw + c * dw
        for al in range(P):
            x = h0[ci, al]
            d = act0 + al
            for ga in range(P):
                Vb[ci, d, ga] = 0.0
            Vb[ci, d, al] = c * w * _dphi(act, x)
            Vw[ci, d] = c * _phi(act, x)
        w = w1[ci]
        for mu in range(n):
            x = h1[ci, mu]
            d1[mu] = _dphi(act, x)
            d2[mu] = w * _ddphi(act, x)
        for d in range(act1):
            vw = Vw[ci, d]
            for mu in range(n):
                acc = 0.0
                for ga in range(P):
                    acc += kx[mu, ga] * Vb[ci, d, ga]
                dh[ci, d, mu] = acc
                dph[ci, d, mu] = d1[mu] * acc
                dg[ci, d, mu] = d2[mu] * acc + d1[mu] * vw


def accumulate_response_jit(activation, h, w, kx, delta, c, gamma0, JO, Jk=None, iu=None,
                            work=None):
    """Fast path of :func:`accumulate_response` (same sums; tests compare the two).

    The tangent march runs in a Numba kernel in the reduced state (beta, w), P + 1 numbers
    per direction (h = u + kx[:, :P] beta, so test points cost nothing there); the sums over
    samples are BLAS products over the chunk axis.

    Parameters
    ----------
    JO : array (T+1, P T, n)
        Sum over samples of dO_mu(t) / dDelta_d, *direction-major* layout (in place).
    Jk : array (T+1, P T, m), optional
        Same for the NTK entries ``iu``.
    work : dict, optional
        Scratch buffers reused between calls with the same chunk size.
    """
    C, T1, n = h.shape
    T, P = delta.shape
    p = T * P
    iu = triu_index(n) if iu is None else iu
    code = _act_code(activation)
    if work is None or work["Vb"].shape[0] != C:
        work = {"Vb": np.empty((C, p, P)), "Vw": np.empty((C, p)), "dh": np.empty((C, p, n)),
                "dph": np.empty((C, p, n)), "dg": np.empty((C, p, n))}
    Vb, Vw, dh, dph, dg = work["Vb"], work["Vw"], work["dh"], work["dph"], work["dg"]
    kxc = np.ascontiguousarray(kx)
    kij = kx[iu]
    for t in range(T):
        _tangent_step_kernel(code, t, P, h[:, t], w[:, t], h[:, t + 1], w[:, t + 1], kxc,
                             np.ascontiguousarray(delta[t]), c, Vb, Vw, dh, dph, dg)
        a1 = (t + 1) * P
        h1 = h[:, t + 1]
        w1 = w[:, t + 1]
        ph1 = apply(activation, h1, 0)
        dph2 = dph[:, :a1].reshape(C, a1 * n)
        JO[t + 1, :a1] += (Vw[:, :a1].T @ ph1 + (w1 @ dph2).reshape(a1, n)) / gamma0
        if Jk is not None:
            g1 = apply(activation, h1, 1) * w1[:, None]
            X = (dg[:, :a1].reshape(C, a1 * n).T @ g1).reshape(a1, n, n)
            Y = (dph2.T @ ph1).reshape(a1, n, n)
            Jk[t + 1, :a1] += _ntk_tangent(X, Y, kij, iu)
    return work


def influence_moments(O, k, mean_O, mean_k, JO, Jk, solve_matrix, out_ff, out_kk):
    """Accumulate sum psi_f psi_f^T and sum psi_k^2 over a chunk (module docstring).

    Parameters
    ----------
    O : (C, T+1, n); k : (C, T+1, m) or None
    mean_O, mean_k : their population means
    JO : (T+1, n, P T) mean response; Jk : (T+1, m, P T) or None
    solve_matrix : (P T, P T)
        I + E J, unit lower triangular.
    out_ff : ((T+1) n, (T+1) n); out_kk : ((T+1) m,)  (updated in place)
    """
    C, T1, n = O.shape
    p = JO.shape[2]
    P = p // (T1 - 1)
    e = (O - mean_O).reshape(C, T1 * n)
    eE = (O[:, :T1 - 1, :P] - mean_O[:T1 - 1, :P]).reshape(C, p)
    U = solve_triangular(solve_matrix, eE.T, lower=True, unit_diagonal=True,
                         check_finite=False)                       # (p, C)
    psi = e - (JO.reshape(T1 * n, p) @ U).T
    out_ff += psi.T @ psi
    if k is not None:
        m = k.shape[2]
        psik = (k - mean_k).reshape(C, T1 * m) - (Jk.reshape(T1 * m, p) @ U).T
        out_kk += np.einsum("ci,ci->i", psik, psik)


def default_chunk(n, P, T, target=4_000_000):
    """Samples per chunk so that the tangent buffers hold about ``target`` floats (32 MB):
    few large BLAS calls (thread start-up dominates small ones on a busy machine) while the
    buffers stay small."""
    return int(np.clip(target // (T * P * (P + 1 + 3 * n)), 32, 8192))


def _influence_result(ff, kk, count, k, n, iu):
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


def _solve_matrix(JO):
    T1, n, p = JO.shape
    P = p // (T1 - 1)
    EJ = JO[:T1 - 1, :P, :].reshape(p, p)
    return np.eye(p) + EJ


def two_layer_propagator(activation, u, w0, kx, delta, gamma0, lr, **options):
    """O(1/N) propagator of a two-layer network around a given infinite-width Delta(t).

    See :func:`_two_layer_propagator` for the parameters. Overflow inside the tangent march
    (a diverging linearisation) is reported as one FloatingPointError, not NumPy warnings.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        res = _two_layer_propagator(activation, u, w0, kx, delta, gamma0, lr, **options)
    for key in ("cov", "response", "ntk_var"):
        if res.get(key) is not None and not np.all(np.isfinite(res[key])):
            raise FloatingPointError("non-finite propagator: the linearised dynamics diverged; "
                                     "reduce lr or gamma0")
    return res


def _two_layer_propagator(activation, u, w0, kx, delta, gamma0, lr, *, center=False,
                          blocks=10, chunk=None, ntk=True, progress=None, engine="jit"):
    """O(1/N) propagator of a two-layer network around a given infinite-width Delta(t).

    Parameters
    ----------
    activation : str
        Smooth activation ("linear", "tanh", "erf"): the tangents need phi''.
    u : (S, n); w0 : (S,)
        Single-site samples (:func:`draw_units`).
    kx : (n, n); delta : (T, P)
        Input kernel and the infinite-width error signal at t = 0 .. T-1 (centred predictions
        when ``center``).
    gamma0, lr : float
    center : bool
        Per-unit observable O(t) - O(0) (the centred model f - f(theta_0)).
    blocks : int
        Number of batch-means blocks (>= 2) for the standard errors.
    chunk : int, optional
        Samples per BLAS chunk (memory ~ chunk P T (P + 1 + 3 n) floats); default
        :func:`default_chunk`.
    ntk : bool
        Also propagate the per-unit NTK (memory (T+1) n (n+1)/2 P T floats, twice).
    progress : callable, optional
        Called with the number of samples just processed (for progress bars).
    engine : {"jit", "numpy"}
        Tangent march in Numba (:func:`accumulate_response_jit`) or the plain NumPy reference
        (:func:`accumulate_response`); identical results up to rounding.

    Returns
    -------
    dict with ``cov`` (T+1, T+1, n, n) two-time N Cov(f(t), f(s)); ``pred_cov`` (T+1, n, n)
    its equal-time part; ``ntk_var`` (T+1, n, n) N Var of each NTK entry (or None);
    ``pred_cov_stderr``, ``ntk_var_stderr`` (batch means); ``response`` (T+1, n, T, P)
    J = d<O>/dDelta; ``kappa`` (T+1, n, n) equal-time single-site Cov(O);
    ``block_pred_cov`` (blocks, T+1, n, n).

    Raises
    ------
    FloatingPointError
        Non-finite fields or covariances.
    """
    S, n = u.shape
    T, P = delta.shape
    T1 = T + 1
    p = T * P
    c = lr * gamma0
    if chunk is None:
        chunk = default_chunk(n, P, T)
    iu = triu_index(n)
    m = iu[0].size
    bounds = np.linspace(0, S, blocks + 1).astype(int)

    def fields(lo, hi):
        h, w = march(activation, u[lo:hi], w0[lo:hi], kx, delta, c)
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(w))):
            raise FloatingPointError("the single-site fields diverged; reduce lr or gamma0")
        O, k = unit_observables(activation, h, w, kx, gamma0, center, iu)
        return h, w, O, (k if ntk else None)

    def chunks(lo, hi):
        for a in range(lo, hi, chunk):
            yield a, min(hi, a + chunk)

    def estimate(lo, hi, JO, Jk, mO, mk):
        ff = np.zeros((T1 * n, T1 * n))
        kk = np.zeros(T1 * m) if ntk else None
        A = _solve_matrix(JO)
        for a, b in chunks(lo, hi):
            _, _, O, k = fields(a, b)
            influence_moments(O, k, mO, mk, JO, Jk, A, ff, kk)
        return _influence_result(ff, kk, hi - lo, T1, n, iu)

    JO_tot = np.zeros((T1, n, p))
    Jk_tot = np.zeros((T1, m, p)) if ntk else None
    sO_tot = np.zeros((T1, n))
    sk_tot = np.zeros((T1, m))
    kap_tot = np.zeros((T1, n, n))
    block_est = []
    work = None
    for bi in range(blocks):
        lo, hi = bounds[bi], bounds[bi + 1]
        sO = np.zeros((T1, n))
        sk = np.zeros((T1, m))
        if engine == "numpy":
            JO = np.zeros((T1, n, p))
            Jk = np.zeros((T1, m, p)) if ntk else None
        else:
            JO = np.zeros((T1, p, n))
            Jk = np.zeros((T1, p, m)) if ntk else None
        for a, b in chunks(lo, hi):
            h, w, O, k = fields(a, b)
            if engine == "numpy":
                accumulate_response(activation, h, w, kx, delta, c, gamma0, JO, Jk, iu)
            else:
                work = accumulate_response_jit(activation, h, w, kx, delta, c, gamma0, JO, Jk,
                                               iu, work)
            sO += O.sum(0)
            kap_tot += np.einsum("cti,ctj->tij", O, O)
            if ntk:
                sk += k.sum(0)
            if progress is not None:
                progress(b - a)
        if engine != "numpy":
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
    res["response"] = JO_tot.reshape(T1, n, T, P)
    res["kappa"] = kappa
    if not np.all(np.isfinite(res["cov"])):
        raise FloatingPointError("non-finite propagator (the linearised dynamics diverged)")
    return res



# --------------------------------------------------------------------------------------------
# selected times: adjoint rows, responses from a subsample, optional randomised QMC
# --------------------------------------------------------------------------------------------
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
                    for al in range(P):
                        for ci in range(C):
                            dhp[al, ci] = 0.0
                        for ga in range(P):
                            k = kPP[al, ga]
                            for ci in range(C):
                                dhp[al, ci] += k * vb[a0, ga, ci]
                    if t < T:
                        for al in range(P):
                            acc = 0.0
                            for ci in range(C):
                                acc += vw[a0, ci] * ph[t, al, ci] \
                                    + w[t, ci] * d1[t, al, ci] * dhp[al, ci]
                            JE[t, d, al] += acc / gamma0
                    if row >= 0:
                        for mu in range(n):
                            for ci in range(C):
                                dph[mu, ci] = 0.0
                            for ga in range(P):
                                k = kxP[mu, ga]
                                for ci in range(C):
                                    dph[mu, ci] += k * vb[a0, ga, ci]
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
    rows), instead of T^2 P n (P + n) of :func:`accumulate_response_jit`.

    Parameters
    ----------
    sel : dict {time: row}
        Selected times (1 .. T) and their row in JO / Jk (time 0 has no tangent).
    JE : (T, P T, P)
        Sum over samples of dO_al(t) / dDelta_d (direction-major, in place; row t = 0 stays 0).
    JO : (k, P T, n); Jk : (k, P T, m) or None
        Same for all points / the NTK entries at the selected times (in place).
    work : unused (kept for the signature of :func:`accumulate_response_jit`).
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
    sel = np.asarray(res["times"])
    for key in ("pred_cov", "ntk_var"):
        if res.get(key) is not None and not np.all(np.isfinite(res[key][sel])):
            raise FloatingPointError("non-finite propagator: the linearised dynamics diverged; "
                                     "reduce lr or gamma0")
    return res


def _two_layer_propagator_times(activation, u, w0, kx, delta, gamma0, lr, times, *,
                                center=False, blocks=10, chunk=None, ntk=True,
                                response_samples=None, progress=None):
    """O(1/N) propagator of a two-layer network at the selected ``times`` only.

    The same estimand as :func:`two_layer_propagator`, N Cov = (I + J E)^-1 kappa
    (I + J E)^-T restricted to the rows of the selected observables o (predictions at
    ``times``, NTK entries at ``times``), in adjoint form: with e = o - <o> and the training
    predictions' deviations E e (P T), psi_o = e_o - w_o . (E e), w_o = (I + E J)^-T J_o^T,
    so N Cov(o, o') = <psi_o psi_o'>: one triangular solve for all the adjoint rows W, then
    one GEMM per chunk of samples (never per-sample products with the full J).

    Responses from a subsample: J (the tangents, the expensive part) is the mean over the
    first ``response_samples`` / blocks samples of each batch-means block; the means <o> and
    psi use every sample (the march is cheap). Each block's estimate uses its own J, so the
    batch-means standard errors include the noise of J. With ``response_samples`` = S (or
    None) the numbers equal :func:`two_layer_propagator`'s at those times to rounding.

    Parameters
    ----------
    times : sequence of int
        Sorted distinct steps in 0 .. T.
    response_samples : int, optional
        Samples (over all blocks) whose tangents form J (default all).
    Other parameters as :func:`_two_layer_propagator`.

    Returns
    -------
    dict as :func:`two_layer_propagator` (full shapes over T+1 times, NaN outside ``times``:
    ``cov`` on the times x times blocks, ``response`` on the selected times and, for the
    training points, at every t < T), plus ``times`` and ``block_ntk_var``.
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
        for a in range(lo, hi, size):
            yield a, min(hi, a + size)

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
        return _influence_result(ff, kk, hi - lo, k, n, iu)

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


# --------------------------------------------------------------------------------------------
# beyond one squared-error output (docs/theory.rst §7): C outputs, any loss, weight decay,
# batches
# --------------------------------------------------------------------------------------------
def accumulate_response_multi(activation, h, w, kx, delta, c, gamma0, a, JO, Jk=None,
                              iu=None):
    """Forward-mode tangents of a chunk of C-output samples (:func:`march_multi`), summed.

    Directions: the P C T entries Delta_{al c}(s), d = (s P + al) C + c. The tangents of
    the decayed state obey V(t+1) = a V(t) + d(increment) whatever ``decay_to`` (the
    initial weights do not depend on Delta).

    Parameters
    ----------
    h : (S, T+1, n); w : (S, T+1, C); kx : (n, n); delta : (T, P, C); c : lr gamma0;
    a : 1 - lr lambda.
    JO : (T+1, n C, P C T)
        Sum over samples of dO_I(t) / dDelta_d (I = mu C + c), updated in place.
    Jk : (T+1, m, P C T), optional
        Same for the per-unit NTK entries ``iu`` of the (n C, n C) NTK.
    """
    S, T1, n = h.shape
    T, P, C = delta.shape
    p = T * P * C
    if iu is None:
        iu = np.triu_indices(n * C)
    kxP = kx[:, :P]
    Vh = np.zeros((S, n, p))
    Vw = np.zeros((S, C, p))
    i, j = iu
    mi, ci = np.divmod(i, C)
    mj, cj = np.divmod(j, C)
    same = ci == cj
    kij = kx[mi, mj]
    eyeC = np.eye(C)
    for t in range(T):
        ht, wt = h[:, t, :P], w[:, t]
        d1 = apply(activation, ht, 1)                       # (S, P)
        act = t * P * C
        if act:
            d2 = apply(activation, ht, 2)
            q = wt @ delta[t].T                              # (S, P)
            VhP = Vh[:, :P, :act]
            dq = np.matmul(delta[t], Vw[:, :, :act])                     # (S, P, d)
            Z = d1[:, :, None] * dq + (d2 * q)[:, :, None] * VhP
            dVw = np.matmul(delta[t].T, d1[:, :, None] * VhP)             # (S, C, d)
            Vh[:, :, :act] = a * Vh[:, :, :act] + c * np.matmul(kxP, Z)
            Vw[:, :, :act] = a * Vw[:, :, :act] + c * dVw
        # new directions: Delta_{al c}(t) enters the state at t + 1
        new = slice(act, act + P * C)
        Vh[:, :, new] = (c * kxP[None, :, :, None] * (d1[:, :, None] * wt[:, None, :])[:, None]
                         ).reshape(S, n, P * C)
        Vw[:, :, new] = (c * eyeC[None, :, None, :] * apply(activation, ht, 0)[:, None, :, None]
                         ).reshape(S, C, P * C)
        a1 = act + P * C
        h1, w1 = h[:, t + 1], w[:, t + 1]
        ph1 = apply(activation, h1, 0)
        dph1 = apply(activation, h1, 1)
        Vh1, Vw1 = Vh[:, :, :a1], Vw[:, :, :a1]
        dph_tan = dph1[:, :, None] * Vh1                     # (S, n, d)
        # dO_{mu c} = (Vw_c phi_mu + w_c phi'_mu Vh_mu) / gamma0
        dO = np.tensordot(ph1, Vw1, axes=([0], [0])) \
            + np.matmul(dph_tan.transpose(1, 2, 0), w1).transpose(0, 2, 1)   # (n, C, d)
        JO[t + 1, :, :a1] += dO.reshape(n * C, a1) / gamma0
        if Jk is not None:
            g1 = (dph1[:, :, None] * w1[:, None, :]).reshape(S, n * C)
            d21 = apply(activation, h1, 2)
            dg = ((d21[:, :, None] * Vh1)[:, :, None, :] * w1[:, None, :, None]
                  + dph1[:, :, None, None] * Vw1[:, None, :, :]).reshape(S, n * C, a1)
            X = np.tensordot(dg, g1, axes=([0], [0]))        # (I, d, J)
            Y = np.tensordot(dph_tan, ph1, axes=([0], [0]))  # (mu, d, nu)
            val = kij[:, None] * (X[i, :, j] + X[j, :, i])
            val[same] += Y[mi[same], :, mj[same]] + Y[mj[same], :, mi[same]]
            Jk[t + 1, :, :a1] += val


def _solve_matrix_multi(JO, jac):
    """I - D E J over the P C T error-signal entries (unit lower triangular: J is causal),
    D = blockdiag_t,al jac[t, al] (the loss Jacobian d Delta / d f)."""
    T1, nC, p = JO.shape
    T, P, C, _ = jac.shape
    EJ = JO[:T, :P * C, :].reshape(T, P, C, p)
    DEJ = np.matmul(jac, EJ).reshape(p, p)
    return np.eye(p) - DEJ


def influence_moments_multi(O, k, mean_O, mean_k, JO, Jk, solve_matrix, jac, out_ff, out_kk):
    """:func:`influence_moments` with the loss Jacobian: delta Delta = D E delta f, so
    U = (I - D E J)^{-1} D E e and psi = e + J U (for mse D = -I this is the plain form)."""
    C_, T1, nC = O.shape
    T, P, C, _ = jac.shape
    p = JO.shape[2]
    e = (O - mean_O).reshape(C_, T1 * nC)
    eE = (O[:, :T, :P * C] - mean_O[:T, :P * C]).reshape(C_, T, P, C)
    rhs = np.matmul(jac, eE.transpose(1, 2, 3, 0)).reshape(p, C_)
    U = solve_triangular(solve_matrix, rhs, lower=True, unit_diagonal=True,
                         check_finite=False)
    psi = e + (JO.reshape(T1 * nC, p) @ U).T
    out_ff += psi.T @ psi
    if k is not None:
        m = k.shape[2]
        psik = (k - mean_k).reshape(C_, T1 * m) + (Jk.reshape(T1 * m, p) @ U).T
        out_kk += np.einsum("ci,ci->i", psik, psik)


def objective_propagator(activation, u, w0, kx, delta, jac, gamma0, lr, *, a=1.0,
                         decay_to="init", center=False, blocks=10, chunk=None, ntk=True,
                         progress=None):
    """O(1/N) propagator of a two-layer network for any objective (docs/theory.rst §5, §7).

    As :func:`two_layer_propagator` with C outputs, the loss entering through its Jacobian
    (delta Delta(t) = jac(t) delta f_train(t); jac = -I for mse), weight decay (a, decay_to;
    :func:`solvers.fluct.two_layer.march_multi`) and batches (Delta and jac zero off-batch).

    Parameters
    ----------
    u : (S, n); w0 : (S, C); kx : (n, n)
    delta : (T, P, C)
        Infinite-width error signal (of the centred predictions when ``center``).
    jac : (T, P, C, C)
        d Delta_{al c}(t) / d f_{al c'}(t) at the infinite-width predictions.
    gamma0, lr : float; a : 1 - lr lambda; decay_to : "init" or "zero".

    Returns
    -------
    dict as :func:`two_layer_propagator` over the flattened (point, output) index
    I = mu C + c: ``cov`` (T+1, T+1, n C, n C), ``pred_cov`` (T+1, n C, n C), ``ntk_var``
    (T+1, n C, n C) or None, their ``*_stderr``, ``response`` (T+1, n C, T P C), ``kappa``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        res = _objective_propagator(activation, u, w0, kx, delta, jac, gamma0, lr, a,
                                    decay_to, center, blocks, chunk, ntk, progress)
    for key in ("cov", "response", "ntk_var"):
        if res.get(key) is not None and not np.all(np.isfinite(res[key])):
            raise FloatingPointError("non-finite propagator: the linearised dynamics diverged; "
                                     "reduce lr or gamma0")
    return res


def _objective_propagator(activation, u, w0, kx, delta, jac, gamma0, lr, a, decay_to, center,
                          blocks, chunk, ntk, progress):
    from .two_layer import march_multi, unit_observables_multi
    S, n = u.shape
    T, P, C = delta.shape
    T1, nC, p = T + 1, n * C, T * P * C
    c = lr * gamma0
    if chunk is None:
        chunk = int(np.clip(4_000_000 // (p * (n + C) * (4 + C)), 16, 8192))
    iu = np.triu_indices(nC)
    m = iu[0].size
    bounds = np.linspace(0, S, blocks + 1).astype(int)

    def fields(lo, hi):
        h, w = march_multi(activation, u[lo:hi], w0[lo:hi], kx, delta, c, a, decay_to)
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(w))):
            raise FloatingPointError("the single-site fields diverged; reduce lr or gamma0")
        O, k = unit_observables_multi(activation, h, w, kx, gamma0, center, iu)
        return h, w, O, (k if ntk else None)

    def chunks(lo, hi):
        for x in range(lo, hi, chunk):
            yield x, min(hi, x + chunk)

    def estimate(lo, hi, JO, Jk, mO, mk):
        ff = np.zeros((T1 * nC, T1 * nC))
        kk = np.zeros(T1 * m) if ntk else None
        A = _solve_matrix_multi(JO, jac)
        for x, y in chunks(lo, hi):
            _, _, O, k = fields(x, y)
            influence_moments_multi(O, k, mO, mk, JO, Jk, A, jac, ff, kk)
        ff /= (hi - lo - 1)
        cov = two_time(ff, T1, nC)
        out = {"cov": cov, "pred_cov": np.ascontiguousarray(cov[np.arange(T1), np.arange(T1)])}
        if ntk:
            kk /= (hi - lo - 1)
            var = np.empty((T1, nC, nC))
            var[:, iu[0], iu[1]] = kk.reshape(T1, m)
            var[:, iu[1], iu[0]] = kk.reshape(T1, m)
            out["ntk_var"] = var
        return out

    JO_tot = np.zeros((T1, nC, p))
    Jk_tot = np.zeros((T1, m, p)) if ntk else None
    sO_tot = np.zeros((T1, nC))
    sk_tot = np.zeros((T1, m))
    kap_tot = np.zeros((T1, nC, nC))
    block_est = []
    for bi in range(blocks):
        lo, hi = bounds[bi], bounds[bi + 1]
        sO = np.zeros((T1, nC))
        sk = np.zeros((T1, m))
        JO = np.zeros((T1, nC, p))
        Jk = np.zeros((T1, m, p)) if ntk else None
        for x, y in chunks(lo, hi):
            h, w, O, k = fields(x, y)
            accumulate_response_multi(activation, h, w, kx, delta, c, gamma0, a, JO, Jk, iu)
            sO += O.sum(0)
            kap_tot += np.einsum("cti,ctj->tij", O, O)
            if ntk:
                sk += k.sum(0)
            if progress is not None:
                progress(y - x)
        JO_tot += JO
        sO_tot += sO
        if ntk:
            Jk_tot += Jk
            sk_tot += sk
        cnt = hi - lo
        block_est.append(estimate(lo, hi, JO / cnt, None if Jk is None else Jk / cnt,
                                  sO / cnt, sk / cnt))
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
