"""Finite-width fluctuations at O(1/N) for two-layer networks (THEORY.md §5).

Engines only (arrays in, arrays or plain dicts out; no :mod:`dmft` import). Notation as in
THEORY.md: n = P + Q points (P training points first), T steps, c = lr * gamma0, kx = Phi^0
(n, n), Delta (T, P) the infinite-width error signal on the training points at the times
t = 0 .. T-1 that drive the updates.

The single-site process of a two-layer network (L = 1)
------------------------------------------------------
A hidden unit is one sample (u, w0), u ~ N(0, kx) in R^n, w0 ~ N(0, 1). Given Delta it moves
deterministically (THEORY.md §2 with L = 1, which is the finite network's per-unit update):

    h_mu(t+1) = h_mu(t) + c sum_a Delta_a(t) kx_{mu a} w(t) phi'(h_a(t))
    w(t+1)    = w(t)    + c sum_a Delta_a(t) phi(h_a(t))                       (a over train)

with per-unit prediction O_mu(t) = w(t) phi(h_mu(t)) / gamma0 (f = mean of O over units) and
per-unit NTK k_{mu nu}(t) = kx_{mu nu} g_mu g_nu + phi_mu phi_nu, g = phi'(h) w.

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
march (directions Delta_a(s)), accumulated with BLAS over chunks of samples.
Monte Carlo errors come from batch means: the samples are split into blocks, each block gives
an independent estimate (its own J, J_K, means), and the standard error is the spread of the
block estimates over sqrt(blocks). The reported value uses all samples at once.

Lazy limit
----------
For gamma0 -> 0 the kernel is frozen at its random initial value K = K_inf + delta K / sqrt(N)
and the dynamics f(t+1) = f(t) + lr K Delta(t) is linear, so

    delta f(t+1) = delta f(t) - lr K_inf[:, train] delta f_train(t) + lr delta K[:, train] Delta_inf(t)

with delta f(0) (N Cov = kappa_f0 = Phi^1 / gamma0^2, absent for the centred model) independent
of delta K (N Cov = kappa_K, a four-index tensor). :func:`lazy_propagator` propagates the response
matrices of these two sources; no sampling is needed once the moments are known (closed form for
linear networks, :func:`linear_lazy_moments`; sampled otherwise, :func:`sampled_lazy_moments`).

Exact route for two-layer linear networks
-----------------------------------------
With phi(h) = h every unit moves by a linear map s(t+1) = A_t s(t), s = (h, w) in R^{n+1},
A_t = I + c [[0, kx[:, train] Delta(t)], [Delta(t)^T, 0]], so the *empirical* second-moment
matrix M = <s s^T> over the N units closes: M(t+1) = A_t M(t) A_t^T, f_mu = M_{mu w} / gamma0,
K_{mu nu} = kx_{mu nu} M_{ww} + M_{mu nu}. This is exact at any finite N; only the initial M(0)
is random (Wishart: N Cov(M_ij, M_kl) = S_ik S_jl + S_il S_jk, S = blockdiag(kx, 1)).
Linearising in M(0) (complex-step derivatives, exact to rounding) gives N Cov(f) and N Var(K)
without the DMFT propagator: an independent check of it (:func:`linear_exact_fluctuations`).
"""
from __future__ import annotations

import numpy as np
from numba import prange
from scipy.linalg import solve_triangular

from ._jit import njit
from .activations import apply, code as _act_code, ddphi as _ddphi, dphi as _dphi, phi as _phi

__all__ = ["sqrt_psd", "draw_units", "march", "march_numpy", "population_march",
           "unit_observables", "accumulate_response", "accumulate_response_jit", "influence_moments",
           "two_layer_propagator", "lazy_propagator", "linear_lazy_moments",
           "sampled_lazy_moments", "linear_moments_march", "linear_exact_fluctuations",
           "triu_index", "default_chunk", "lazy_delta"]


# --------------------------------------------------------------------------------------------
# sampling and the single-site march
# --------------------------------------------------------------------------------------------
def sqrt_psd(K: np.ndarray) -> np.ndarray:
    """A square root R (R R^T = K) of a symmetric PSD matrix (eigen-decomposition; tolerates
    singular K such as repeated points). Raises ValueError for a clearly indefinite K."""
    lam, V = np.linalg.eigh(K)
    if lam.min() < -1e-10 * max(1.0, abs(lam.max())):
        raise ValueError(f"the input kernel is not positive semidefinite (smallest eigenvalue "
                         f"{lam.min():.3g})")
    return V * np.sqrt(np.clip(lam, 0.0, None))


def draw_units(kx: np.ndarray, samples: int, rng: np.random.Generator):
    """Draw ``samples`` single-site initial conditions: u ~ N(0, kx) (S, n), w0 ~ N(0, 1) (S,).

    The standard normals are drawn in a fixed order (first the (S, n) block for u, then w0)
    so that a seed fixes every sample whatever the chunking downstream.
    """
    xi = rng.standard_normal((samples, kx.shape[0]))
    w0 = rng.standard_normal(samples)
    return xi @ sqrt_psd(kx).T, w0


@njit
def _march_kernel(act, u, w0, kx, delta, c, h_out, w_out):
    S, n = u.shape
    T, P = delta.shape
    a = np.empty(P)
    for i in range(S):
        for mu in range(n):
            h_out[i, 0, mu] = u[i, mu]
        w_out[i, 0] = w0[i]
        for t in range(T):
            w = w_out[i, t]
            dw = 0.0
            for al in range(P):
                x = h_out[i, t, al]
                a[al] = delta[t, al] * _dphi(act, x)
                dw += delta[t, al] * _phi(act, x)
            for mu in range(n):
                acc = 0.0
                for al in range(P):
                    acc += kx[mu, al] * a[al]
                h_out[i, t + 1, mu] = h_out[i, t, mu] + c * w * acc
            w_out[i, t + 1] = w + c * dw


def march(activation: str, u, w0, kx, delta, c, h_out=None, w_out=None):
    """March S single-site samples of a two-layer network under a given error signal.

    Parameters
    ----------
    activation : str
    u : array (S, n)
        Initial pre-activations h(0) (u ~ N(0, kx)).
    w0 : array (S,)
        Initial readout weights.
    kx : array (n, n)
        Input kernel Phi^0.
    delta : array (T, P)
        Error signal Delta(t), t = 0 .. T-1, on the P training points (the first P of n).
    c : float
        lr * gamma0.
    h_out : array (S, T+1, n), optional; w_out : array (S, T+1), optional
        Preallocated outputs (written in place).

    Returns
    -------
    h : (S, T+1, n), w : (S, T+1)
        The fields of every sample at every time (update rule in the module docstring).
    """
    u = np.ascontiguousarray(u, dtype=np.float64)
    w0 = np.ascontiguousarray(w0, dtype=np.float64)
    delta = np.ascontiguousarray(delta, dtype=np.float64)
    S, n = u.shape
    T = delta.shape[0]
    if h_out is None:
        h_out = np.empty((S, T + 1, n))
    if w_out is None:
        w_out = np.empty((S, T + 1))
    _march_kernel(_act_code(activation), u, w0, np.ascontiguousarray(kx, dtype=np.float64),
                  delta, float(c), h_out, w_out)
    return h_out, w_out


def march_numpy(activation: str, u, w0, kx, delta, c):
    """Plain NumPy reference of :func:`march` (vectorised over samples)."""
    T, P = delta.shape
    S, n = u.shape
    h = np.empty((S, T + 1, n))
    w = np.empty((S, T + 1))
    h[:, 0] = u
    w[:, 0] = w0
    for t in range(T):
        ht = h[:, t, :P]
        a = delta[t] * apply(activation, ht, 1)
        h[:, t + 1] = h[:, t] + c * w[:, t, None] * (a @ kx[:, :P].T)
        w[:, t + 1] = w[:, t] + c * (apply(activation, ht, 0) @ delta[t])
    return h, w


def triu_index(n: int):
    """Row and column indices of the upper triangle (mu <= nu) of an (n, n) matrix."""
    return np.triu_indices(n)


def unit_observables(activation, h, w, kx, gamma0, center=False, iu=None):
    """Per-unit prediction and NTK of marched samples.

    Parameters
    ----------
    h : array (S, T+1, n); w : array (S, T+1)
    iu : tuple of index arrays, optional
        Entries of the NTK to return (default: upper triangle, m = n (n + 1) / 2 entries).

    Returns
    -------
    O : (S, T+1, n)
        w phi(h) / gamma0, minus its t = 0 value when ``center``.
    k : (S, T+1, m)
        kx_{mu nu} g_mu g_nu + phi_mu phi_nu at the entries ``iu``, g = phi'(h) w.
    """
    if iu is None:
        iu = triu_index(h.shape[2])
    ph = apply(activation, h, 0)
    g = apply(activation, h, 1) * w[:, :, None]
    O = w[:, :, None] * ph / gamma0
    if center:
        O = O - O[:, :1]
    i, j = iu
    k = kx[i, j] * g[:, :, i] * g[:, :, j] + ph[:, :, i] * ph[:, :, j]
    return O, k


def population_march(activation, u, w0, kx, y, gamma0, lr, steps, center=False,
                     antithetic=False):
    """Infinite-width two-layer dynamics by a self-consistent forward march of a population.

    At each step f(t) = <O(t)> over the S samples, Delta(t) = y - f_train(t) (centred:
    f - f(0)), then every sample moves one step (THEORY.md §2, "Two-layer networks": no outer
    iteration is needed). With ``antithetic`` samples i and i + S/2 must share u and have
    opposite w0, so that the t = 0 term of f cancels exactly and the standard error is taken
    over pair means.

    Returns
    -------
    dict with ``f`` (T+1, n), ``f_stderr`` (T+1, n), ``delta`` (T, P), ``ntk`` (T+1, n, n)
    (population mean of the per-unit NTK).

    Raises
    ------
    FloatingPointError
        When the fields become non-finite (divergence); names the step.
    """
    S, n = u.shape
    P = y.shape[0]
    T = int(steps)
    c = lr * gamma0
    h = np.array(u, dtype=np.float64)
    w = np.array(w0, dtype=np.float64)
    f = np.empty((T + 1, n))
    f_se = np.empty((T + 1, n))
    ntk = np.empty((T + 1, n, n))
    delta = np.empty((T, P))
    half = S // 2

    def reduce(x):
        # x: (S, ...) per-unit values -> mean and standard error (over pair means if paired)
        if antithetic:
            x = 0.5 * (x[:half] + x[half:])
        return x.mean(axis=0), x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])

    f00 = None
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T + 1):
            ph = apply(activation, h, 0)
            dph = apply(activation, h, 1)
            O = w[:, None] * ph / gamma0
            f[t], f_se[t] = reduce(O)
            if f00 is None:
                f00 = f[0].copy()
            g = dph * w[:, None]
            # population NTK by two GEMMs; no per-sample (S, n, n) array
            ntk[t] = (kx * (g.T @ g) + ph.T @ ph) / S
            if not (np.all(np.isfinite(f[t])) and np.all(np.isfinite(ntk[t]))):
                raise FloatingPointError(f"the single-site fields diverged at step {t}")
            if t == T:
                break
            ft = f[t, :P] - (f00[:P] if center else 0.0)
            delta[t] = y - ft
            a = delta[t] * dph[:, :P]
            dw = ph[:, :P] @ delta[t]
            h += c * w[:, None] * (a @ kx[:, :P].T)
            w += c * dw
    if center:
        f = f - f00
    return {"f": f, "f_stderr": f_se, "delta": delta, "ntk": ntk}


# --------------------------------------------------------------------------------------------
# forward-mode tangents and the propagator
# --------------------------------------------------------------------------------------------
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
    if iu is None:
        iu = triu_index(n)
    i_idx, j_idx = iu
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
            Jk[t + 1, :, :act1] += kx[i_idx, j_idx][:, None] * (X[i_idx, :, j_idx]
                                                                  + X[j_idx, :, i_idx]) \
                + Y[i_idx, :, j_idx] + Y[j_idx, :, i_idx]


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
    if iu is None:
        iu = triu_index(n)
    i_idx, j_idx = iu
    code = _act_code(activation)
    if work is None or work["Vb"].shape[0] != C:
        work = {"Vb": np.empty((C, p, P)), "Vw": np.empty((C, p)), "dh": np.empty((C, p, n)),
                "dph": np.empty((C, p, n)), "dg": np.empty((C, p, n))}
    Vb, Vw, dh, dph, dg = work["Vb"], work["Vw"], work["dh"], work["dph"], work["dg"]
    kxc = np.ascontiguousarray(kx)
    kij = kx[i_idx, j_idx]
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
            Jk[t + 1, :a1] += kij * (X[:, i_idx, j_idx] + X[:, j_idx, i_idx]) \
                + Y[:, i_idx, j_idx] + Y[:, j_idx, i_idx]
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
        ff /= (hi - lo - 1)
        cov = ff.reshape(T1, n, T1, n).transpose(0, 2, 1, 3)
        out = {"cov": cov, "pred_cov": np.ascontiguousarray(cov[np.arange(T1), np.arange(T1)])}
        if ntk:
            kk /= (hi - lo - 1)
            var = np.empty((T1, n, n))
            var[:, iu[0], iu[1]] = kk.reshape(T1, m)
            var[:, iu[1], iu[0]] = kk.reshape(T1, m)
            out["ntk_var"] = var
        return out

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
# lazy limit
# --------------------------------------------------------------------------------------------
def linear_lazy_moments(kx, gamma0=None):
    """Exact single-site moments of a two-layer *linear* network at initialisation.

    Returns
    -------
    kappa_f0 : (n, n) or None
        N Cov f(0) = Phi^1 / gamma0^2 = kx / gamma0^2 (None when gamma0 is None).
    kappa_K : (n, n, n, n)
        N Cov(K_{mu nu}, K_{al be}) for k = kx w^2 + u u^T (Isserlis, E w^4 = 3):
        2 kx_{mu nu} kx_{al be} + kx_{mu al} kx_{nu be} + kx_{mu be} kx_{nu al}.
    """
    kK = 2.0 * np.einsum("ij,kl->ijkl", kx, kx) + np.einsum("ik,jl->ijkl", kx, kx) \
        + np.einsum("il,jk->ijkl", kx, kx)
    kf = None if gamma0 is None else kx / gamma0 ** 2
    return kf, kK


def sampled_lazy_moments(activation, u, w0, kx, gamma0=None, blocks=10):
    """Sampled single-site moments at initialisation (any activation, ReLU included).

    Returns
    -------
    dict with ``kappa_f0`` (n, n) or None, ``kappa_K`` (n, n, n, n), ``mean_K`` (n, n), and
    ``blocks``: a list of per-block dicts with the same keys (for batch-means errors).
    """
    S, n = u.shape

    def moments(uu, ww):
        ph = apply(activation, uu, 0)
        g = apply(activation, uu, 1) * ww[:, None]
        k = (kx * g[:, :, None] * g[:, None, :] + ph[:, :, None] * ph[:, None, :]).reshape(
            uu.shape[0], n * n)
        kc = k - k.mean(0)
        out = {"mean_K": k.mean(0).reshape(n, n),
               "kappa_K": (kc.T @ kc / (uu.shape[0] - 1)).reshape(n, n, n, n),
               "kappa_f0": None}
        if gamma0 is not None:
            O = ww[:, None] * ph / gamma0
            out["kappa_f0"] = np.cov(O, rowvar=False).reshape(n, n)
        return out

    res = moments(u, w0)
    bounds = np.linspace(0, S, blocks + 1).astype(int)
    res["blocks"] = [moments(u[a:b], w0[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return res


def lazy_propagator(K, delta, lr, kappa_K, kappa_f0=None):
    """O(1/N) fluctuations of the frozen-kernel (lazy, gamma0 -> 0) dynamics, discrete time.

    delta f(t+1) = delta f(t) - lr K[:, :P] delta f_train(t) + lr delta K[:, :P] Delta(t),
    with delta f(0) ~ kappa_f0 (omit for the centred model) independent of delta K ~ kappa_K
    (THEORY.md §5, the discrete form of the universal lazy propagator; for lr -> 0 it becomes
    delta Delta(t) = -e^{-Kt} delta f(0) - int_0^t e^{-K(t-s)} delta K e^{-Ks} y ds).

    Parameters
    ----------
    K : (n, n)
        Infinite-width (static) NTK.
    delta : (T, P)
        Lazy error signal Delta(t) = y - f(t) for t = 0 .. T-1.
    lr : float
    kappa_K : (n, n, n, n)
        N Cov(K_{mu nu}, K_{al be}).
    kappa_f0 : (n, n), optional
        N Cov f(0).

    Returns
    -------
    dict with ``cov`` (T+1, T+1, n, n) two-time N Cov(f), ``pred_cov`` (T+1, n, n),
    ``ntk_var`` (T+1, n, n) (constant: N Var K_{mu nu}).
    """
    T, P = delta.shape
    n = K.shape[0]
    R0 = np.empty((T + 1, n, n))      # d f(t) / d f(0)
    R1 = np.zeros((T + 1, n, n, P))   # d f(t) / d K_{nu be}, be over train
    R0[0] = np.eye(n)
    KP = K[:, :P]
    eye = np.eye(n)
    for t in range(T):
        R0[t + 1] = R0[t] - lr * KP @ R0[t, :P]
        R1[t + 1] = R1[t] - lr * np.einsum("ma,anb->mnb", KP, R1[t, :P])
        R1[t + 1] += lr * eye[:, :, None] * delta[t][None, None, :]
    R1f = R1.reshape(T + 1, n, n * P)
    kK = kappa_K[:, :P, :, :P].reshape(n * P, n * P)
    cov = np.einsum("tia,ab,sjb->tsij", R1f, kK, R1f, optimize=True)
    if kappa_f0 is not None:
        cov += np.einsum("tia,ab,sjb->tsij", R0, kappa_f0, R0, optimize=True)
    T1 = T + 1
    ntk_var = np.empty((T1, n, n))
    ntk_var[:] = np.einsum("ijij->ij", kappa_K)
    return {"cov": cov, "pred_cov": np.ascontiguousarray(cov[np.arange(T1), np.arange(T1)]),
            "ntk_var": ntk_var}


def lazy_delta(K, y, lr, steps):
    """Frozen-kernel error signal Delta(t) = y - f(t), f(t+1) = f(t) + lr K_train Delta(t),
    f(0) = 0, for t = 0 .. T-1: (T, P)."""
    P = y.shape[0]
    KPP = K[:P, :P]
    delta = np.empty((steps, P))
    d = np.array(y, dtype=np.float64)
    for t in range(steps):
        delta[t] = d
        d = d - lr * KPP @ d
    return delta


# --------------------------------------------------------------------------------------------
# exact route for two-layer linear networks
# --------------------------------------------------------------------------------------------
def linear_moments_march(M0, kx, y, gamma0, lr, steps, center=False):
    """Exact closed dynamics of the second moments of a two-layer linear network.

    Parameters
    ----------
    M0 : (n+1, n+1)
        Initial second-moment matrix of s = (h, w) over units (real or complex: the march is
        polynomial, so complex-step derivatives are exact).
    kx : (n, n); y : (P,); gamma0, lr : float; steps : int
    center : bool
        Subtract f(0) from the predictions (and from Delta).

    Returns
    -------
    f : (T+1, n)
        f_mu = M_{mu w} / gamma0 (minus f(0) when centred).
    K : (T+1, n, n)
        kx M_{ww} + M_{hh}.
    """
    n = kx.shape[0]
    P = y.shape[0]
    M = np.array(M0)
    f = np.empty((steps + 1, n), dtype=M.dtype)
    K = np.empty((steps + 1, n, n), dtype=M.dtype)
    c = lr * gamma0
    f0 = M[:n, n] / gamma0
    for t in range(steps + 1):
        f[t] = M[:n, n] / gamma0 - (f0 if center else 0.0)
        K[t] = kx * M[n, n] + M[:n, :n]
        if t == steps:
            break
        d = y - f[t, :P]
        A = np.eye(n + 1, dtype=M.dtype)
        A[:n, n] += c * (kx[:, :P] @ d)
        A[n, :P] += c * d
        M = A @ M @ A.T
    return f, K


def linear_exact_fluctuations(kx, y, gamma0, lr, steps, center=False, step=1e-30):
    """Exact O(1/N) fluctuations of a two-layer linear network (module docstring).

    Returns
    -------
    dict with ``f`` (T+1, n) and ``ntk`` (T+1, n, n) at infinite width, ``cov``
    (T+1, T+1, n, n) two-time N Cov(f), ``pred_cov`` (T+1, n, n), ``ntk_var`` (T+1, n, n).
    """
    n = kx.shape[0]
    T1 = steps + 1
    Sig = np.zeros((n + 1, n + 1))
    Sig[:n, :n] = kx
    Sig[n, n] = 1.0
    f_inf, K_inf = linear_moments_march(Sig, kx, y, gamma0, lr, steps, center)
    d = n + 1
    Gf = np.empty((d, d, T1, n))
    GK = np.empty((d, d, T1, n, n))
    for i in range(d):
        for j in range(d):
            M0 = Sig.astype(np.complex128)
            M0[i, j] += 1j * step
            ff, KK = linear_moments_march(M0, kx, y, gamma0, lr, steps, center)
            Gf[i, j] = ff.imag / step
            GK[i, j] = KK.imag / step
    # N Cov(M_ij, M_kl) = S_ik S_jl + S_il S_jk  (Wishart)
    W = np.einsum("ik,jl->ijkl", Sig, Sig) + np.einsum("il,jk->ijkl", Sig, Sig)
    Gf2 = Gf.reshape(d * d, T1 * n)
    Wm = W.reshape(d * d, d * d)
    cov = (Gf2.T @ Wm @ Gf2).reshape(T1, n, T1, n).transpose(0, 2, 1, 3)
    GK2 = GK.reshape(d * d, T1 * n * n)
    ntk_var = np.einsum("ai,ab,bi->i", GK2, Wm, GK2).reshape(T1, n, n)
    return {"f": f_inf.real, "ntk": K_inf.real, "cov": cov,
            "pred_cov": np.ascontiguousarray(cov[np.arange(T1), np.arange(T1)]),
            "ntk_var": ntk_var}
