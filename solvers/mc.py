"""Monte Carlo engine of the nonlinear DMFT (THEORY.md §2), in exact discrete time.

Notation. n = P + Q points (train first), T1 = T + 1 times, flattened field index
``i = t * n + mu`` (time-major). Two-time kernels are held as flat (T1 n, T1 n) matrices
``K[t*n + mu, s*n + nu] = K_{mu nu}(t, s)``. Per layer l the single-site process is

    h(t) = u(t) + gamma0 sum_{s<t} C(t, s) g(s),
    z(t) = r(t) + gamma0 sum_{s<=t} D(t, s) phi(h(s)),
    C = A^{l-1} + lr tril_{-1}[Phi^{l-1} (.) Delta],  D = B^l + lr tril_{-1}[G^{l+1} (.) Delta]
    g(t) = phi'(h(t)) z(t)

with Gaussian sources u ~ N(0, Phi^{l-1}) (u^1 constant in time, covariance X X^T / D) and
r ~ N(0, G^{l+1}) (r^L = w(0), one scalar per sample); Delta acts on the column index (train
columns only: test points are passive).

Responses (only for L >= 2) by exact per-sample forward-mode tangents of the causal march.
With Lam1 = diag phi'(h), Lam2 = diag phi''(h) z, M = Lam2 + gamma0 Lam1 D Lam1:

    r-direction: dh = gamma0 C (Lam2 dh + Lam1 dz),  dz = dr + gamma0 D Lam1 dh
                 A^l     = gamma0^{-1} < Lam1 dh/dr >
    u-direction: dh = du + gamma0 C M dh,            dg = M dh
                 B^{l-1} = gamma0^{-1} < dg/du >

Both systems are block unit-lower-triangular in time and are marched forward (never
inverted). Control variate (:func:`response_control`, on by default): the first-order terms
of these series, A ~ C (.) <Lam1 Lam1^T> and B ~ gamma0^{-1} diag<Lam2> + D (.) <Lam1 Lam1^T>,
are averaged over all samples (one GEMM per chunk) and only the remainder comes from the
``response_samples`` tangent samples; that remainder has 10-75x less variance.

Structure used: Delta = 0 and A = 0 on test columns, so test sources reach only their own
point: A has zero test columns, B has zero (train row, test column) blocks and
diagonal test-test blocks, given in closed form by

    B_{aa}(t, s) = gamma0^{-1} < Lam2_a(t) > delta_ts + D_{aa}(t, s) < Lam1_a(t) Lam1_a(s) >.

Samples of a chunk are batched into one BLAS product per time step (C(t, :t) is shared by all
samples) and chunks are streamed, so at most ``chunk`` x (T1 n) x (T P) numbers are held. The
tangent march is blocked in time (:func:`response_sums`) and all BLAS calls of the deep
solver run on one thread (thin GEMMs; threads were 3-7x slower on the shared 2-core box).

ReLU: phi'' is a Dirac delta. Per-sample tangents would miss its contribution
< delta(h) z dh > (nonzero in expectation), so for ReLU the tangents use the smoothed delta
Lam2 = z exp(-h^2 / (2 eps^2)) / sqrt(2 pi eps^2) (``relu_eps``, default
``0.3 * max(S_resp, 2048) ** -0.2``). That is adequate for A (r reaches h only through one
memory step; measured within 3 % of Stein's lemma on A g) but not for B, where u enters h
directly: the sources of layers l >= 2 move by ~1e-2 of their scale per step, E[z | h = x]
has structure on that scale, and no smoothing width is both unbiased and of finite variance.
B for ReLU is therefore estimated by Stein's lemma in causally whitened sources
(:func:`stein_groups`, :func:`stein_accumulate`, :func:`stein_finish`), exact for any
activation.

Predictions f(t) = gamma0^{-1} < z^L(t) phi(h^L(t)) > with antithetic pairs (u, r), (u, -r):
the t = 0 term, of Monte Carlo size 1 / (gamma0 sqrt S), cancels exactly.

Two-layer networks (L = 1) have no responses: u^1 and w(0) only see the population through
Delta, so all samples are marched together one step at a time, reading f(t) from the
population (:func:`two_layer_step_fast`: BLAS + NumPy SIMD activations, checked against the
per-sample Numba kernel :func:`two_layer_step` and :func:`two_layer_step_reference`). Sources by
randomised quasi-Monte Carlo (:func:`two_layer_sources`); the two-time kernels are computed once
at the end by symmetric rank-k updates (:func:`two_layer_kernels`).
"""
from __future__ import annotations

import contextlib
import logging
import math

import numpy as np

from . import fixedpoint
from .activations import ACTIVATIONS, TANH as _TANH, apply
from .activations import dphi as _dphi
from .activations import phi as _phi
from ._jit import njit

__all__ = ["psd_sqrt", "two_layer_step", "two_layer_step_reference", "two_layer_step_fast",
           "march_two_layer", "two_layer_kernels", "causal_operators", "march_layer",
           "march_layer_reference",
           "response_sums", "response_reference", "solve_two_layer", "solve_deep",
           "low_rank_factor", "two_layer_sources", "default_relu_eps", "causal_cholesky",
           "stein_groups", "stein_accumulate", "stein_finish"]


def _single_thread_blas():
    """Context limiting BLAS to one thread (no-op without ``threadpoolctl``).

    The GEMMs of the march and the tangents are thin (n or tblock * n rows / columns):
    threaded OpenBLAS spends more time synchronising than computing, and on this shared
    2-core machine it was measured 3-7x slower than one thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                            # optional dependency
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# ------------------------------------------------------------------------------------------
# helpers
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


def _act_name(code_or_name):
    if isinstance(code_or_name, str):
        return code_or_name
    return {v: k for k, v in ACTIVATIONS.items()}[int(code_or_name)]


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
# two-layer networks: forward march of the population
# ------------------------------------------------------------------------------------------
@njit(inline="always")
def _phi_dphi(act, x):
    """(phi(x), phi'(x)) with one transcendental call for tanh (phi and dphi each call it)."""
    if act == _TANH:
        # tanh x = -expm1(-2|x|) / (2 + expm1(-2|x|)) (sign restored): accurate to a few ulp,
        # also for tiny |x| (expm1: no cancellation); the step got ~10% faster than with libm
        # tanh, the vectorised two_layer_step_fast is the fast path
        e = math.expm1(-2.0 * abs(x))
        p = -e / (2.0 + e)
        if x < 0.0:
            p = -p
        return p, 1.0 - p * p
    return _phi(act, x), _dphi(act, x)


@njit
def two_layer_step(h, w, phi_h, g, drive, wdrive, block, act, fsum):
    """Advance every sample of a two-layer network by one gradient step (in place).

    THEORY.md §2 with L = 1, where C = lr Kx Delta is constant in time and z = w:
    ``h_mu += gamma0 lr sum_a Kx_{mu a} Delta_a g_a``, ``w += gamma0 lr sum_a Delta_a phi(h_a)``,
    both evaluated at the current time; then phi(h), g = phi'(h) w at the new time are
    written and ``fsum[b, mu] += w phi(h_mu)`` accumulated for the sample's block b.

    Parameters
    ----------
    h : (S, n) pre-activations, updated.
    w : (S,) readout weights z = w, updated.
    phi_h, g : (S, n) phi(h) and g at the current time on entry, at the new time on exit.
    drive : (B, n, P) gamma0 lr Kx[:, :P] Delta_b (one row block per sample block b).
    wdrive : (B, P) gamma0 lr Delta_b.
    block : int, samples per block (sample i belongs to block i // block).
    act : int, activation code.
    fsum : (B, n) accumulator, added to.
    """
    S, n = h.shape
    P = wdrive.shape[1]
    for i in range(S):
        b = i // block
        dw = 0.0
        # axpy order (point index innermost): vectorises without reassociating sums
        for a in range(P):
            dw += wdrive[b, a] * phi_h[i, a]
            ga = g[i, a]
            for mu in range(n):
                h[i, mu] += drive[b, mu, a] * ga
        wi = w[i] + dw
        w[i] = wi
        for mu in range(n):
            p, dp = _phi_dphi(act, h[i, mu])
            phi_h[i, mu] = p
            g[i, mu] = dp * wi
            fsum[b, mu] += wi * p


def two_layer_step_reference(h, w, phi_h, g, drive, wdrive, block, activation, fsum):
    """Plain NumPy version of :func:`two_layer_step` (same arguments, activation by name)."""
    S, n = h.shape
    b = np.arange(S) // block
    P = wdrive.shape[1]
    dw = np.einsum("ia,ia->i", wdrive[b], phi_h[:, :P])
    h += np.einsum("ima,ia->im", drive[b], g[:, :P])
    w += dw
    phi_h[...] = apply(activation, h, 0)
    g[...] = apply(activation, h, 1) * w[:, None]
    np.add.at(fsum, b, w[:, None] * phi_h)


def two_layer_step_fast(h, w, phi_h, g, drive, wdrive, block, activation, fsum, ptt=None,
                        gtt=None, cache_rows: int = 2048):
    """Vectorised :func:`two_layer_step` used by the marches (same arguments, activation by
    name): per slice of at most ``cache_rows`` samples of one block, one BLAS product for the
    h update and the activation with NumPy's SIMD transcendental functions, so the slice stays
    in cache. Optionally accumulates the equal-time kernels of the new time per block:
    ``ptt[b] += phi^T phi``, ``gtt[b] += g^T g`` (sums over the block's samples).
    Measured ~5x faster than the per-sample Numba loop (whose libm tanh call costs ~17 ns per
    entry) at S = 4096, n = 32, P = 16.
    """
    S, n = h.shape
    P = wdrive.shape[1]
    for b in range(drive.shape[0]):
        end = min(S, (b + 1) * block)
        dT = drive[b].T
        for c0 in range(b * block, end, cache_rows):
            sl = slice(c0, min(end, c0 + cache_rows))
            hs, ps, gs = h[sl], phi_h[sl], g[sl]
            dw = ps[:, :P] @ wdrive[b]                 # phi(h) at the current time
            hs += gs[:, :P] @ dT
            ws = w[sl]
            ws += dw
            if activation == "tanh":
                np.tanh(hs, out=ps)
                np.multiply(ps, ps, out=gs)
                np.subtract(1.0, gs, out=gs)
            else:
                ps[...] = apply(activation, hs, 0)
                gs[...] = apply(activation, hs, 1)
            gs *= ws[:, None]
            fsum[b] += ws @ ps
            if ptt is not None:
                ptt[b] += ps.T @ ps
                gtt[b] += gs.T @ gs


def march_two_layer(kx, y, u, w0, gamma0: float, lr: float, steps: int, activation: str,
                    blocks: int = 1, equal_time: bool = True, divergence: float = 1e8,
                    bar=None) -> dict:
    """March a two-layer population forward, reading Delta(t) from it (no iteration).

    Samples are split into ``blocks`` equal consecutive blocks, each an independent
    population with its own f and Delta (``blocks=1``: one population).

    Parameters
    ----------
    kx : (n, n) input kernel Phi^0.
    y : (P,) training targets.
    u : (S, n) sources u^1 ~ N(0, kx); w0 : (S,) initial readouts ~ N(0, 1).
    gamma0, lr, steps, activation : problem.
    blocks : int, number of independent populations (S divisible by it).
    equal_time : bool, also accumulate Phi^1(t, t), G^1(t, t) per block.

    Returns
    -------
    dict with ``f`` (B, T1, n) predictions, ``delta`` (B, T1, P) error signals and, with
    ``equal_time``, ``phi_tt``, ``g_tt`` (B, T1, n, n).
    """
    S, n = u.shape
    P = y.shape[0]
    T1 = steps + 1
    if S % blocks:
        raise ValueError(f"samples ({S}) must be divisible by blocks ({blocks})")
    block = S // blocks
    h = np.array(u, dtype=np.float64, copy=True)
    w = np.array(w0, dtype=np.float64, copy=True)
    phi_h = apply(activation, h, 0)
    g = apply(activation, h, 1) * w[:, None]
    f = np.zeros((blocks, T1, n))
    delta = np.zeros((blocks, T1, P))
    phi_tt = np.zeros((blocks, T1, n, n)) if equal_time else None
    g_tt = np.zeros((blocks, T1, n, n)) if equal_time else None
    kdrive = gamma0 * lr * np.asarray(kx)[:, :P]

    def record(t, ptt=None, gtt=None):
        f[:, t] = fsum / (gamma0 * block)
        delta[:, t] = y[None, :] - f[:, t, :P]
        if equal_time:
            if ptt is None:
                ptt = np.stack([phi_h[b * block:(b + 1) * block].T
                                @ phi_h[b * block:(b + 1) * block] for b in range(blocks)])
                gtt = np.stack([g[b * block:(b + 1) * block].T
                                @ g[b * block:(b + 1) * block] for b in range(blocks)])
            phi_tt[:, t] = ptt / block
            g_tt[:, t] = gtt / block

    fsum = (w[:, None] * phi_h).reshape(blocks, block, n).sum(axis=1)
    record(0)
    for t in range(steps):
        d = delta[:, t]
        drive = kdrive[None, :, :] * d[:, None, :]
        wdrive = gamma0 * lr * d
        fsum = np.zeros((blocks, n))
        ptt = np.zeros((blocks, n, n)) if equal_time else None
        gtt = np.zeros((blocks, n, n)) if equal_time else None
        two_layer_step_fast(h, w, phi_h, g, drive, wdrive, block, activation, fsum, ptt, gtt)
        record(t + 1, ptt, gtt)
        if not np.all(np.isfinite(f[:, t + 1])) or np.abs(f[:, t + 1]).max() > divergence:
            raise FloatingPointError(
                f"the predictions diverged at step {t + 1} (|f| = "
                f"{np.abs(f[:, t + 1]).max():.3g}); gamma0 or lr is too large")
        if bar is not None:
            bar.update(1)
    return {"f": f, "delta": delta, "phi_tt": phi_tt, "g_tt": g_tt}


@njit
def _accumulate_upper(tmp, scale, total, sq):
    """total += tmp, sq += (scale tmp)^2 on the upper triangle (i <= j) of Fortran-ordered
    (m, m) arrays (column j contiguous): one memory pass instead of four NumPy temporaries."""
    m = tmp.shape[0]
    for j in range(m):
        for i in range(j + 1):
            v = tmp[i, j]
            total[i, j] += v
            v *= scale
            sq[i, j] += v * v


@njit
def _finish_upper(total, sq, inv_s, nb, mean, se):
    """Symmetric C-ordered mean = total / S and batch-means standard error
    se = sqrt(max(sq / nb - mean^2, 0) / (nb - 1)) from the upper triangles of the
    Fortran-ordered accumulators of :func:`_accumulate_upper` (one pass, no temporaries)."""
    m = total.shape[0]
    for j in range(m):
        for i in range(j + 1):
            mu = total[i, j] * inv_s
            mean[i, j] = mu
            mean[j, i] = mu
            v = 0.0
            if nb > 1:
                v = math.sqrt(max(sq[i, j] / nb - mu * mu, 0.0) / (nb - 1))
            se[i, j] = v
            se[j, i] = v


def two_layer_kernels(kx, delta, u, w0, gamma0: float, lr: float, activation: str,
                      chunk: int = 2048, blocks: int = 8) -> dict:
    """Two-time kernels Phi^1(t, s), G^1(t, s) of a two-layer network for a given Delta(t).

    Given Delta the samples are independent: they are re-marched in chunks recording every
    time into feature matrices F (chunk, T1 n) (flat index t n + mu), and each kernel is
    accumulated by one symmetric rank-k update per chunk (BLAS ``dsyrk``: K += F^T F, half
    the flops of a GEMM, into a preallocated Fortran-ordered buffer). Standard errors by batch
    means over ``blocks`` consecutive sample blocks; the per-block update of the sums and
    sums of squares is one fused pass over the upper triangle (:func:`_accumulate_upper`).
    Cost ~ S (T1 n)^2 flops per kernel plus ~ blocks * 5 (T1 n)^2 / 2 memory traffic.

    Parameters
    ----------
    kx : (n, n); delta : (T1, P) error signal (the last row is unused);
    u : (S, n); w0 : (S,); blocks : number of batch-means blocks for standard errors
    (>= 2; block edges are kept even so antithetic pairs stay together).

    Returns
    -------
    dict with flat kernels ``phi``, ``g`` (T1 n, T1 n) and their standard errors
    ``phi_se``, ``g_se`` (batch means over ``blocks`` consecutive sample blocks).
    """
    from scipy.linalg.blas import dsyrk

    S, n = u.shape
    T1, P = delta.shape
    m = T1 * n
    kdrive = gamma0 * lr * np.asarray(kx)[:, :P]
    blocks = max(1, min(int(blocks), S // 2))
    edges = [2 * ((S // 2) * k // blocks) for k in range(blocks)] + [S]
    keys = ("phi", "g")
    tmp = {k: np.zeros((m, m), order="F") for k in keys}
    total = {k: np.zeros((m, m), order="F") for k in keys}
    sq = {k: np.zeros((m, m), order="F") for k in keys}
    chunk = max(2, int(chunk))
    for b0, b1 in zip(edges[:-1], edges[1:]):
        first = True
        for c0 in range(b0, b1, chunk):
            c1 = min(b1, c0 + chunk)
            Sc = c1 - c0
            h = np.array(u[c0:c1], dtype=np.float64, copy=True)
            w = np.array(w0[c0:c1], dtype=np.float64, copy=True)
            feats = {"phi": np.empty((Sc, T1, n)), "g": np.empty((Sc, T1, n))}
            ph = apply(activation, h, 0)
            g = apply(activation, h, 1) * w[:, None]
            feats["phi"][:, 0] = ph
            feats["g"][:, 0] = g
            fs = np.zeros((1, n))
            for t in range(T1 - 1):
                d = delta[t]
                two_layer_step_fast(h, w, ph, g, (kdrive * d[None, :])[None],
                                    (gamma0 * lr * d)[None], Sc, activation, fs)
                feats["phi"][:, t + 1] = ph
                feats["g"][:, t + 1] = g
            for k in keys:
                # F^T as an (m, Sc) Fortran view: dsyrk computes a a^T = F^T F without copies
                tmp[k] = dsyrk(1.0, feats[k].reshape(Sc, m).T, beta=0.0 if first else 1.0,
                               c=tmp[k], trans=0, lower=0, overwrite_c=1)
            first = False
        for k in keys:
            _accumulate_upper(tmp[k], 1.0 / (b1 - b0), total[k], sq[k])
    out = {}
    nb = len(edges) - 1
    for k in keys:
        del tmp[k]
        out[k] = np.empty((m, m))
        out[k + "_se"] = np.empty((m, m))
        _finish_upper(total[k], sq[k], 1.0 / S, nb, out[k], out[k + "_se"])
        del total[k], sq[k]
    return out


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


def two_layer_sources(kx, samples: int, seed, replicates: int = 1, sampler: str = "sobol"):
    """Sources (u, w0) of a two-layer network in antithetic pairs (u, w0), (u, -w0).

    ``sampler="sobol"``: randomised quasi-Monte Carlo. u = F xi with F the rank-r factor of
    Kx (:func:`low_rank_factor`, r <= D), so a sample is a point of R^{r + 1} (xi, eta);
    ``replicates`` independent Owen-scrambled Sobol sets of ``samples / (2 replicates)``
    points each are mapped through the normal quantile (cell midpoints, never 0 or 1) and
    concatenated: each replicate is an unbiased estimate of every average, and the spread of
    the replicate estimates gives an honest standard error. ``sampler="random"``: i.i.d.
    normals (the replicates are then consecutive blocks).

    Returns
    -------
    u : (S, n), w0 : (S,), with S = 2 replicates floor(samples / (2 replicates)); sample
    2k and 2k + 1 form a pair, replicate b occupies rows [b S / replicates, (b+1) S / replicates).
    """
    from scipy.special import ndtri

    n = kx.shape[0]
    B = max(1, int(replicates))
    hb = (int(samples) // 2) // B
    if hb < 1:
        raise ValueError(f"samples={samples} is too small for {B} replicates: need at least "
                         f"{2 * B}")
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    if sampler == "random":
        rng = np.random.default_rng(ss)
        xi = rng.standard_normal((hb * B, n))
        eta = rng.standard_normal(hb * B)
        u = xi @ psd_sqrt(kx)
    elif sampler == "sobol":
        import warnings

        from scipy.stats import qmc
        F = low_rank_factor(kx)
        r = F.shape[1]
        bits = 30
        zs = []
        for child in ss.spawn(B):
            gen = np.random.default_rng(child)
            try:
                eng = qmc.Sobol(r + 1, scramble=True, bits=bits, rng=gen)
            except TypeError:                      # scipy < 1.15 names it ``seed``
                eng = qmc.Sobol(r + 1, scramble=True, bits=bits, seed=gen)
            with warnings.catch_warnings():
                # balance is exact for powers of 2; other sizes are still unbiased
                warnings.simplefilter("ignore", UserWarning)
                x = eng.random(hb)
            zs.append(ndtri(x + 0.5 ** (bits + 1)))
        z = np.concatenate(zs)
        u = z[:, :r] @ F.T
        eta = z[:, r]
    else:
        raise ValueError(f"sampler must be 'sobol' or 'random', got {sampler!r}")
    u = np.repeat(u, 2, axis=0)                    # pairs (u, w0), (u, -w0) adjacent
    w0 = np.stack([eta, -eta], axis=1).reshape(-1)
    return u, w0


def solve_two_layer(kx, y, activation: str, gamma0: float, lr: float, steps: int, *,
                    samples: int, seed, kernel_samples: int | None = None, blocks: int = 8,
                    chunk: int = 2048, sampler: str = "sobol", bar=None) -> dict:
    """Two-layer DMFT by the forward march (no outer iteration), with replicate errors.

    Sources from :func:`two_layer_sources` (``blocks`` replicates, antithetic pairs: the
    t = 0 term of f cancels exactly), drawn from ``seed`` (a ``numpy.random.SeedSequence``).
    The replicates are marched as ``blocks`` independent populations (each with its own
    Delta); the solution is the mean of the replicate solutions and the standard error
    se = std(replicate solutions) / sqrt(blocks) includes the feedback of noise through
    Delta. ``blocks < 2``: one population of all samples, no standard errors. With
    ``sampler="sobol"`` (randomised QMC) the error of a replicate falls faster than
    1 / sqrt(samples) (measured, THEORY.md §2 case P = Q = 16, T = 100: 1.6x smaller than
    i.i.d. at 4096 samples, 1.8x at 16384, with 8 replicates). Two-time kernels use the
    first ``kernel_samples`` samples (default all) re-marched with the population's Delta
    (:func:`two_layer_kernels`); the predictions never need them.

    Returns
    -------
    dict: ``f`` (T1, n), ``f_se`` (T1, n), ``delta`` (T1, P), ``ntk``, ``ntk_se`` (T1, n, n),
    ``phi``, ``g``, ``phi_se``, ``g_se`` flat (T1 n, T1 n), ``samples``, ``kernel_samples``.
    """
    n = kx.shape[0]
    B = max(1, min(int(blocks), samples // 2)) if blocks >= 2 else 1
    u, w0 = two_layer_sources(kx, samples, seed, B, sampler)
    S = u.shape[0]
    if B >= 2:
        # the standard randomised-QMC estimator: the mean of the replicate solutions, each
        # replicate an independent population with its own Delta (one march, not two). Its
        # bias from the nonlinear Delta feedback is second order in the replicate error.
        blk = march_two_layer(kx, y, u, w0, gamma0, lr, steps, activation, blocks=B, bar=bar)
        Kb = blk["phi_tt"] + blk["g_tt"] * kx[None, None]
        f = blk["f"].mean(axis=0)
        res = {"f": f, "delta": y[None, :] - f[:, :y.shape[0]], "ntk": Kb.mean(axis=0),
               "samples": S, "f_se": blk["f"].std(axis=0, ddof=1) / math.sqrt(B),
               "ntk_se": Kb.std(axis=0, ddof=1) / math.sqrt(B)}
    else:
        full = march_two_layer(kx, y, u, w0, gamma0, lr, steps, activation, blocks=1, bar=bar)
        f = full["f"][0]
        K = full["phi_tt"][0] + full["g_tt"][0] * kx[None]
        res = {"f": f, "delta": full["delta"][0], "ntk": K, "samples": S,
               "f_se": np.zeros_like(f), "ntk_se": np.zeros_like(K)}
    ks = S if kernel_samples is None else min(S, 2 * (int(kernel_samples) // 2))
    if B >= 2 and ks >= 2 * B:
        # the same number of pairs from every replicate: kernel blocks = replicates
        kb = 2 * ((ks // 2) // B)
        Sr = S // B
        idx = (np.arange(B)[:, None] * Sr + np.arange(kb)[None, :]).reshape(-1)
        ks, kblocks = kb * B, B
    else:
        idx = np.arange(ks)
        kblocks = max(2, min(8, ks // 2))
    ker = two_layer_kernels(kx, res["delta"], u[idx], w0[idx], gamma0, lr, activation,
                            chunk=chunk, blocks=kblocks)
    res.update(phi=ker["phi"], g=ker["g"], phi_se=ker["phi_se"], g_se=ker["g_se"],
               kernel_samples=ks)
    return res


# ------------------------------------------------------------------------------------------
# deep networks: one layer's march and its tangents
# ------------------------------------------------------------------------------------------
def _strict_mask(T1, n):
    tb = np.repeat(np.arange(T1), n)
    return tb[:, None] > tb[None, :]


def causal_operators(phi_prev, g_next, a_prev, b_l, dcol, lr: float, T1: int, n: int):
    """C^l and D^l of THEORY.md §3 as flat (T1 n, T1 n) matrices.

    C = A^{l-1} + lr tril_{-1}[Phi^{l-1} (.) Delta],  D = B^l + lr tril_{-1}[G^{l+1} (.) Delta],
    where ``dcol`` (T1 n,) is Delta on the column index (zero on test points) and tril_{-1}
    keeps s < t. ``a_prev`` / ``b_l`` may be None (zero).
    """
    w = lr * np.where(_strict_mask(T1, n), dcol[None, :], 0.0)
    C = phi_prev * w
    D = g_next * w
    if a_prev is not None:
        C += a_prev
    if b_l is not None:
        D += b_l
    return C, D


def march_layer(u, r, C, D, gamma0: float, activation: str, T1: int, n: int,
                tblock: int = 8):
    """March S samples of one layer's fields through time (BLAS-batched over samples).

    Parameters
    ----------
    u, r : (S, T1 n) sources (flattened (t, mu)).
    C, D : (T1 n, T1 n) causal operators (C strictly, D weakly lower block-triangular).
    tblock : int
        Times per block. The memory terms of a block of times from all earlier blocks are one
        GEMM with ``tblock * n`` columns (one pass over the history instead of one per time
        step: the per-step products have only n columns and are memory bound); inside the
        block the recursion touches the block's own times only. ``tblock=1`` is the plain
        step-by-step march (:func:`march_layer_reference` is its NumPy twin); both give the
        same fields up to rounding.

    Returns
    -------
    H, PH, Z, G : (S, T1 n) pre-activation h, phi(h), z and g = phi'(h) z.
    """
    S = u.shape[0]
    m = T1 * n
    # time-major (m, S) inside: the slice of one time step is contiguous (in the sample-major
    # layout it is n scattered doubles per sample), returned as (S, m) views (Fortran order)
    H = np.empty((m, S))
    PH = np.empty_like(H)
    Z = np.empty_like(H)
    G = np.empty_like(H)
    uT, rT = np.asarray(u).T, np.asarray(r).T
    b = max(1, int(tblock))
    for t0 in range(0, T1, b):
        t1 = min(T1, t0 + b)
        a0, a1 = t0 * n, t1 * n
        if t0:
            # history of earlier blocks: h gets C g(s < t0), z gets D phi(s < t0)
            np.matmul(C[a0:a1, :a0], G[:a0], out=H[a0:a1])
            np.matmul(D[a0:a1, :a0], PH[:a0], out=Z[a0:a1])
        else:
            H[a0:a1] = 0.0
            Z[a0:a1] = 0.0
        for t in range(t0, t1):
            a, e = t * n, (t + 1) * n
            hs = H[a:e]
            if t > t0:
                hs += C[a:e, a0:a] @ G[a0:a]
            hs *= gamma0
            hs += uT[a:e]
            if activation == "tanh":
                np.tanh(hs, out=PH[a:e])
            else:
                PH[a:e] = apply(activation, hs, 0)
            zs = Z[a:e]
            zs += D[a:e, a0:e] @ PH[a0:e]
            zs *= gamma0
            zs += rT[a:e]
            if activation == "tanh":
                gs = G[a:e]
                np.multiply(PH[a:e], PH[a:e], out=gs)
                np.subtract(1.0, gs, out=gs)
                gs *= zs
            else:
                G[a:e] = apply(activation, hs, 1) * zs
    return H.T, PH.T, Z.T, G.T


def march_layer_reference(u, r, C, D, gamma0: float, activation: str, T1: int, n: int):
    """Plain step-by-step NumPy march (test reference for :func:`march_layer`)."""
    S = u.shape[0]
    H, PH, Z, G = (np.zeros((S, T1 * n)) for _ in range(4))
    for t in range(T1):
        a, e = t * n, (t + 1) * n
        H[:, a:e] = u[:, a:e] + gamma0 * G[:, :a] @ C[a:e, :a].T
        PH[:, a:e] = apply(activation, H[:, a:e], 0)
        Z[:, a:e] = r[:, a:e] + gamma0 * PH[:, :e] @ D[a:e, :e].T
        G[:, a:e] = apply(activation, H[:, a:e], 1) * Z[:, a:e]
    return H, PH, Z, G


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


def response_reference(H, Z, C, D, gamma0: float, activation: str, direction: str,
                       relu_eps: float = 0.05):
    """Dense per-sample solve of the tangent systems (test reference for :func:`response_sums`).

    r: A = gamma0^{-1} < Lam1 (I - gamma0 C M)^{-1} gamma0 C Lam1 >;
    u: B = gamma0^{-1} < M (I - gamma0 C M)^{-1} >, with M = Lam2 + gamma0 Lam1 D Lam1.
    Returns the sample mean (before the 1 / gamma0), full (T1 n, T1 n).
    """
    lam1, lam2 = _lam(activation, H, Z, relu_eps)
    m = H.shape[1]
    I = np.eye(m)
    tot = np.zeros((m, m))
    for k in range(H.shape[0]):
        l1, l2 = lam1[k], lam2[k]
        M = np.diag(l2) + gamma0 * (l1[:, None] * D * l1[None, :])
        if direction == "r":
            dh = np.linalg.solve(I - gamma0 * C @ M, gamma0 * C * l1[None, :])
            tot += l1[:, None] * dh
        else:
            tot += M @ np.linalg.solve(I - gamma0 * C @ M, I)
    return tot / H.shape[0]


# ------------------------------------------------------------------------------------------
# deep networks: B by Stein's lemma in causally whitened sources (ReLU)
# ------------------------------------------------------------------------------------------
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


def stein_accumulate(groups, u, G, acc) -> None:
    """Add sum_samples g_rows xi^T of one chunk to ``acc`` (a list, one array per group),
    xi = L^{-1} u_cols the whitened sources of the chunk (u, G: (S, T1 n))."""
    from scipy.linalg import solve_triangular

    for grp, a in zip(groups, acc):
        xi = solve_triangular(grp["L"], u[:, grp["cols"]].T, lower=True, check_finite=False)
        a += G[:, grp["rows"]].T @ xi.T


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
    plus that of J1 from S samples; measured (L = 3 tanh, gamma0 = 1, 20 steps, at the fixed
    point) the remainder's variance is 11x smaller than the tangents' for A and 55-75x for B.
    The first-order terms lie inside the blocks the tangents fill (C, D have train columns
    and, through B, the test-test diagonal blocks only). ``accA`` / ``accB`` (sums over the Sr
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


# ------------------------------------------------------------------------------------------
# deep networks: the alternating solver
# ------------------------------------------------------------------------------------------
def _chunk_sizes(samples: int, T1: int, n: int, P: int, chunk_mb: float, min_blocks: int = 8):
    """Even chunk sizes: march chunks (also the batch-means blocks) and tangent sub-chunks."""
    per = 8.0 * T1 * n * 8                       # ~8 (S, T1 n) float64 arrays in flight
    c = int(chunk_mb * 1e6 / per)
    c = max(2, min(c, -(-samples // min_blocks)))
    c += c % 2
    per_t = 8.0 * (3 * T1 * P + T1 * n + 2 * n) * T1 * P + 1.0
    ct = max(1, int(chunk_mb * 1e6 / per_t))
    return c, ct


def _extend(prev: dict, kx, y, lr: float, H: int, steps: int) -> dict:
    """Starting point on [0, steps] from a solution on [0, H] (flat (H+1) n layouts).

    Kernels Phi, G: clamp both times to H (kernels vary slowly late in training). Responses
    A, B: shift along the diagonal (keep the lag t - s, which preserves causality). f: the
    frozen-NTK dynamics continued from f(H) with K(H).
    """
    n = kx.shape[0]
    P = y.shape[0]
    T1h, T1 = H + 1, steps + 1
    tc = np.minimum(np.arange(T1), H)
    ic = (tc[:, None] * n + np.arange(n)[None, :]).reshape(-1)

    def clamp(K):
        return K[..., ic[:, None], ic[None, :]]

    def shift(K):
        if K is None:
            return None
        K4 = K.reshape(K.shape[0], T1h, n, T1h, n)
        out = np.zeros((K.shape[0], T1, n, T1, n))
        for t in range(T1):
            k = max(0, t - H)
            s = np.arange(k, t + 1)
            out[:, t, :, s, :] = np.moveaxis(K4[:, t - k, :, s - k, :], 0, 0)
        return out.reshape(K.shape[0], T1 * n, T1 * n)

    f = np.empty((T1, n))
    f[:T1h] = prev["f"]
    K = prev["ntk"][H][:, :P]
    for t in range(H, steps):
        f[t + 1] = f[t] + lr * K @ (y - f[t, :P])
    return {"f": f, "phi": clamp(prev["phi"]), "g": clamp(prev["g"]), "A": shift(prev["A"]),
            "B": shift(prev["B"])}


def solve_deep(kx, y, activation: str, depth: int, gamma0: float, lr: float, steps: int, *,
               samples: int, seed, phi0, g0, f0, responses: bool = True,
               response_samples: int | None = None, damping: float = 1.0, anderson: int = 0,
               tol: float = 1e-4, noise_factor: float = 0.25, max_iter: int = 50,
               chunk_mb: float = 64.0, relu_eps: float | None = None, newton: bool = True,
               window: int | None = 10, init: dict | None = None,
               b_estimator: str = "auto", stein_rtol: float = 1e-6,
               response_cv: bool = True, callback=None, logger=None, bar=None) -> dict:
    """Alternating Monte Carlo solution of the DMFT of a network with ``depth`` >= 2 layers.

    Starts from the static kernels ``phi0``, ``g0`` (L, n, n) held constant in time, the
    static-NTK predictions ``f0`` (T1, n) and A = B = 0 (or from ``init``, flat layouts as
    returned); each iteration draws the same standard normals (common random numbers),
    marches the layers in order l = 1 .. L, each with this sweep's Phi^{l-1}, A^{l-1}
    (Gauss-Seidel over layers) and the previous G^{l+1}, B^l, re-estimates Phi^l, G^l, f and
    (``responses=True``) A^l, B^l, and mixes (:func:`solvers.fixedpoint.iterate`).

    Three measures make the iteration converge in a few sweeps (L = 3 tanh, 40 steps: 47
    damped Jacobi sweeps before, ~15 sweeps at horizons 10, 20, 40 after):

    - Gauss-Seidel over layers (a Jacobi sweep propagates the layer chain one layer per
      iteration and oscillated);
    - a quasi-Newton step on the f -> Delta -> f loop (``newton``; see ``newton_f``);
    - continuation in time (``window``): the map is causal, so [0, H] is solved first with
      H = max(window, steps / 2) recursively (with a quarter of the samples, not below 2048)
      and extended (:func:`_extend`). Without it the static-NTK error signal over the whole
      horizon drives ReLU fields to overflow.

    Residual: max|f' - f| and, per kernel, RMS(K' - K) / RMS(K); floor: the same norms of the
    batch-mean standard errors. Mixing: ``damping`` (default 1 here: plain iteration), halved
    (down to 0.25) when the residual stalls for 3 iterations at the noise level.

    GIA (``responses=False``): predictions follow f(t+1) = f(t) + lr K(t) Delta(t) (the
    reading gamma0^{-1} <w phi(h^L)> needs A^{L-1}; without it even the lazy limit is wrong).

    Responses: A^l always by per-sample tangents (``response_samples`` samples; with
    ``response_cv`` their first-order term is averaged over all samples instead,
    :func:`response_control`). B^{l-1} by ``b_estimator``: ``"tangent"`` (per-sample tangents)
    or ``"stein"`` (Stein's lemma in the causally whitened sources, :func:`stein_finish`, from
    all ``samples`` samples; innovations below ``stein_rtol`` of a source's variance are
    dropped); ``"auto"``: Stein for ReLU, tangents otherwise. For ReLU per-sample tangents
    cannot give B: the sources of layers l >= 2 have innovations of ~1e-2 of their scale per
    step, so E[z | h = x] has structure on that scale, a smoothed delta wide enough to have a
    finite variance is biased (measured 10-50 % on B phi at eps = 0.2-0.1, L = 2, 40 steps,
    against Stein with 4e6 samples), and a narrower one makes the per-sample tangents blow up
    (the delta is re-injected at every step a unit hovers near 0). A does not see the delta
    directly (r enters h through one memory step) and its smoothed-delta tangents agree with
    Stein within 3 %.

    ``residuals``, ``floors``, plus ``samples``, ``response_samples``, ``relu_eps``,
    ``b_estimator``.
    """
    kw = dict(samples=samples, seed=seed, phi0=phi0, g0=g0, responses=responses,
              response_samples=response_samples, damping=damping, anderson=anderson, tol=tol,
              noise_factor=noise_factor, max_iter=max_iter, chunk_mb=chunk_mb,
              relu_eps=relu_eps, newton=newton, window=window, b_estimator=b_estimator,
              stein_rtol=stein_rtol, response_cv=response_cv, callback=callback, logger=logger,
              bar=bar)
    if b_estimator == "auto":
        b_estimator = "stein" if activation == "relu" else "tangent"
    if b_estimator not in ("tangent", "stein"):
        raise ValueError(f"b_estimator must be 'auto', 'tangent' or 'stein', got "
                         f"{b_estimator!r}")
    kw["b_estimator"] = b_estimator
    if init is None and window is not None and steps > window:
        # continuation in time: the map is causal, so the problem on [0, H] is the same problem
        # with fewer steps. Solving it first and extending keeps the fields from being driven
        # by the static-NTK error signal over the whole horizon (exponential at large gamma0 t,
        # fatal for ReLU), and the short horizons are cheap (tangents cost ~ H^3).
        H = max(int(window), -(-steps // 2))
        # the shorter horizons only give the starting point: a quarter of the samples (not
        # below 2048) is enough, since the last stage starts from an extension whose error
        # (~0.25 relative on the kernels) is far above the noise of S / 4 samples
        kw_h = dict(kw, samples=max(min(int(samples), 2048), int(samples) // 4))
        prev = solve_deep(kx, y, activation, depth, gamma0, lr, H, f0=f0[:H + 1], **kw_h)
        if logger is not None:
            logger.info("mc horizon %d of %d solved in %d iterations", H, steps,
                        prev["iterations"])
        kw.pop("window")
        out = solve_deep(kx, y, activation, depth, gamma0, lr, steps, f0=f0,
                         init=_extend(prev, kx, y, lr, H, steps), window=None, **kw)
        out["iterations"] += prev["iterations"]
        out["stages"] = (prev.get("stages") or [(H, prev["iterations"])]) + [
            (steps, out["iterations"] - prev["iterations"])]
        out["residuals"] = np.concatenate([prev["residuals"], out["residuals"]])
        out["floors"] = np.concatenate([prev["floors"], out["floors"]])
        return out
    L = int(depth)
    n = kx.shape[0]
    P = y.shape[0]
    T1 = steps + 1
    m = T1 * n
    c, ct = _chunk_sizes(samples, T1, n, P, chunk_mb)
    nchunks = -(-samples // c)
    S = nchunks * c
    Sr = 0
    if responses:
        Sr = S if response_samples is None else min(S, max(2, int(response_samples)))
    # ReLU's smoothed delta (A's tangents): never wider than at 2048 tangent samples, the
    # count it was validated with before the control variate made fewer tangents enough
    eps = (default_relu_eps(max(Sr, 2048)) if relu_eps is None else float(relu_eps))
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    # children[l][kind][chunk]: the same normals every iteration (common random numbers)
    children = [[k.spawn(nchunks) for k in lay.spawn(2)] for lay in ss.spawn(L)]
    ones = np.ones((m, m))
    kx_flat = np.kron(np.ones((T1, T1)), kx)
    Sx = psd_sqrt(kx)

    # state layout: f | phi^1..L | g^1..L | A^1..L-1 | B^1..L-1
    nr = (L - 1) if responses else 0
    sizes = [m] + [m * m] * (2 * L + 2 * nr)
    offs = np.concatenate([[0], np.cumsum(sizes)])

    def unpack(x):
        f = x[:m].reshape(T1, n)
        blocks = [x[offs[i]:offs[i + 1]].reshape(m, m) for i in range(1, len(sizes))]
        phi = blocks[:L]
        g = blocks[L:2 * L]
        A = blocks[2 * L:2 * L + nr] if nr else None
        B = blocks[2 * L + nr:] if nr else None
        return f, phi, g, A, B

    x0 = np.empty(offs[-1])
    f_, phi_, g_, A_, B_ = unpack(x0)
    if init is None:
        f_[...] = f0
        for l in range(L):
            phi_[l][...] = np.kron(np.ones((T1, T1)), phi0[l])
            g_[l][...] = np.kron(np.ones((T1, T1)), g0[l])
        x0[offs[1 + 2 * L]:] = 0.0
    else:
        f_[...] = init["f"]
        for l in range(L):
            phi_[l][...] = init["phi"][l]
            g_[l][...] = init["g"][l]
        for l in range(nr):
            A_[l][...] = init["A"][l] if init["A"] is not None else 0.0
            B_[l][...] = init["B"][l] if init["B"] is not None else 0.0
    last = {}

    def fmap(x):
        f, phi, g, A, B = unpack(x)
        dcol = np.zeros((T1, n))
        dcol[:, :P] = y[None, :] - f[:, :P]
        dcol = dcol.reshape(-1)
        y_new = np.empty_like(x)
        fn, phin, gn, An, Bn = unpack(y_new)
        f_blocks = np.zeros((nchunks, T1, n))
        eq_phi = np.zeros((L, nchunks, T1, n, n))
        eq_g = np.zeros((L, nchunks, T1, n, n))
        se = {"phi": [], "g": []}
        diag_idx = (np.arange(T1)[:, None] * n + np.arange(n)[None, :])
        for l in range(L):
            # Gauss-Seidel over layers: layer l sees this sweep's Phi^{l-1}, A^{l-1}
            phi_prev = kx_flat if l == 0 else phin[l - 1]
            g_next = ones if l == L - 1 else g[l + 1]
            a_prev = An[l - 1] if (nr and l >= 1) else None
            b_l = B[l] if (nr and l <= L - 2) else None
            C, D = causal_operators(phi_prev, g_next, a_prev, b_l, dcol, lr, T1, n)
            Su = Sx if l == 0 else psd_sqrt(phi_prev)
            Sg = None if l == L - 1 else psd_sqrt(g[l + 1])
            phin[l][...] = 0.0
            gn[l][...] = 0.0
            sq_phi = np.zeros((m, m))
            sq_g = np.zeros((m, m))
            need_r = nr and l <= L - 2
            stein_u = bool(nr and l >= 1 and b_estimator == "stein")
            need_u = nr and l >= 1 and not stein_u
            accA = np.zeros((m, m)) if need_r else None
            accB = np.zeros((m, m)) if need_u else None
            cv = bool(response_cv and (need_r or need_u))
            # with the control variate the tangents give only the noisy remainder: float32
            tdtype = np.float32 if cv else np.float64
            # the operators in the tangents' precision, cast once per layer (not per sub-chunk)
            Ct, Dt = C.astype(tdtype, copy=False), D.astype(tdtype, copy=False)
            if cv:
                # control variate (response_control): sums of Lam1 Lam1^T and Lam2 over all
                # samples and over the tangent samples
                kl_all, kl_r = np.zeros((m, m)), np.zeros((m, m))
                l2_all, l2_r = np.zeros(m), np.zeros(m)
            if stein_u:
                groups = stein_groups(Su @ Su, T1, n, P, stein_rtol)
                accS = [np.zeros((len(gr["rows"]), len(gr["cols"]))) for gr in groups]
            for ci in range(nchunks):
                half = c // 2
                ru = np.random.default_rng(children[l][0][ci])
                rr = np.random.default_rng(children[l][1][ci])
                if l == 0:
                    u = np.repeat(ru.standard_normal((half, n)) @ Sx, 2, axis=0)
                    u = np.tile(u, (1, T1))
                else:
                    u = np.repeat(ru.standard_normal((half, m)) @ Su, 2, axis=0)
                if l == L - 1:
                    e = rr.standard_normal(half)
                    r = np.repeat(np.stack([e, -e], axis=1).reshape(-1, 1), m, axis=1)
                else:
                    e = rr.standard_normal((half, m)) @ Sg
                    r = np.stack([e, -e], axis=1).reshape(c, m)
                H, PH, Z, G = march_layer(u, r, C, D, gamma0, activation, T1, n)
                if not (np.all(np.isfinite(H)) and np.all(np.isfinite(G))):
                    raise FloatingPointError(
                        f"non-finite fields in layer {l + 1}; gamma0 or lr is too large")
                kp = PH.T @ PH / c              # NumPy uses syrk for a.T @ a
                kg = G.T @ G / c
                phin[l] += kp
                gn[l] += kg
                sq_phi += kp * kp
                sq_g += kg * kg
                eq_phi[l, ci] = kp[diag_idx[:, :, None], diag_idx[:, None, :]]
                eq_g[l, ci] = kg[diag_idx[:, :, None], diag_idx[:, None, :]]
                if l == L - 1:
                    f_blocks[ci] = (Z * PH).mean(axis=0).reshape(T1, n) / gamma0
                if stein_u:
                    stein_accumulate(groups, u, G, accS)
                lo = ci * c
                k = min(c, Sr - lo) if lo < Sr else 0
                if cv:
                    lam1, lam2 = _lam(activation, H, Z, eps, PH)
                    kl = lam1.T @ lam1
                    kl_all += kl
                    if k:
                        kl_r += kl if k == c else lam1[:k].T @ lam1[:k]
                    if need_u:
                        l2_all += lam2.sum(axis=0)
                        l2_r += lam2[:k].sum(axis=0)
                if k:
                    for j in range(0, k, ct):
                        sl = slice(j, min(k, j + ct))
                        if need_r:
                            response_sums(H[sl], Z[sl], Ct, Dt, gamma0, activation, T1, n,
                                          P, "r", accA, eps, dtype=tdtype)
                        if need_u:
                            response_sums(H[sl], Z[sl], Ct, Dt, gamma0, activation, T1, n,
                                          P, "u", accB, eps, dtype=tdtype)
            phin[l] /= nchunks
            gn[l] /= nchunks
            # symmetrise against rounding in the per-chunk products
            phin[l][...] = 0.5 * (phin[l] + phin[l].T)
            gn[l][...] = 0.5 * (gn[l] + gn[l].T)
            for key, sq, mean in (("phi", sq_phi, phin[l]), ("g", sq_g, gn[l])):
                se[key].append(np.sqrt(np.maximum(sq / nchunks - mean * mean, 0.0)
                                       / max(nchunks - 1, 1)))
            if cv:
                response_control(accA, accB, C, D, kl_all, kl_r, l2_all, l2_r, S, Sr, gamma0)
            if need_r:
                An[l][...] = accA / (gamma0 * Sr)
            if need_u:
                Bn[l - 1][...] = accB / (gamma0 * Sr)
            if stein_u:
                Bn[l - 1][...] = stein_finish(groups, accS, S, gamma0, m)
        # NTK per block: sum_{l=0}^{L} G^{l+1}(t,t) Phi^l(t,t)
        ntk_b = eq_phi[L - 1].copy()
        for l in range(L):
            ph_l = kx[None, None] if l == 0 else eq_phi[l - 1]
            ntk_b += eq_g[l] * ph_l
        if not nr:
            # GIA: gamma0^{-1} <w phi(h^L)> needs A^{L-1} to carry the hidden layers'
            # contribution (without it even the lazy limit is wrong), so the predictions
            # follow the kernel form f(t+1) = f(t) + lr K(t) Delta(t) (THEORY.md §4)
            dtr = dcol.reshape(T1, n)[:, :P]
            f_blocks[:, 1:] = lr * np.einsum("btma,ta->btm", ntk_b[:, :-1, :, :P], dtr[:-1])
            f_blocks = np.cumsum(f_blocks, axis=1)
        fn[...] = f_blocks.mean(axis=0)
        f_se = f_blocks.std(axis=0, ddof=1) / math.sqrt(nchunks)
        last.update(f_se=f_se, phi_se=np.array(se["phi"]), g_se=np.array(se["g"]),
                    ntk=ntk_b.mean(axis=0),
                    ntk_se=ntk_b.std(axis=0, ddof=1) / math.sqrt(nchunks))
        # predictions: max norm; kernels: root-mean-square change relative to the kernel's
        # RMS (a max over ~(nT)^2 entries would chase the noisiest entry of heavy-tailed G)
        res = float(np.abs(fn - f).max())
        floor = float(f_se.max())
        parts = {"f": res}
        rms = lambda a: float(np.sqrt(np.mean(a * a)))               # noqa: E731
        for l in range(L):
            for key, new, old, s in (("phi", phin[l], phi[l], se["phi"][l]),
                                     ("g", gn[l], g[l], se["g"][l])):
                scale = max(rms(new), 1e-300)
                parts[f"{key}{l + 1}"] = rms(new - old) / scale
                res = max(res, parts[f"{key}{l + 1}"])
                floor = max(floor, rms(s) / scale)
        if nr:
            for l in range(nr):
                for key, new, old in (("A", An[l], A[l]), ("B", Bn[l], B[l])):
                    parts[f"{key}{l + 1}"] = float(np.abs(new - old).max()) / max(
                        float(np.abs(new).max()), 1e-300)
        last["parts"] = parts
        if logger is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug("mc residual parts: %s",
                         " ".join(f"{k}={v:.2e}" for k, v in parts.items()))
        return y_new, res, floor

    def newton_f(x, r):
        # The stiff loop of the map is f -> Delta -> f: f'(t) ~ f(0) + lr sum_{s<t} K(s) Delta(s)
        # with Delta = y - f, so dF(t)/df(s) ~ -lr K(s)[:, train] (s < t). Plain iteration of
        # that Volterra map grows errors like (lr K T)^k / k! before they shrink; solving
        # (I + lr tril K) d = r by forward substitution removes it (kernels held fixed).
        K = last["ntk"][:, :, :P]
        rf = r[:m].reshape(T1, n)
        d = np.empty((T1, n))
        acc = np.zeros(n)
        for t in range(T1):
            d[t] = rf[t] - acc
            acc += lr * (K[t] @ d[t, :P])
        r = r.copy()
        r[:m] = d.reshape(-1)
        return r

    with _single_thread_blas():
        fp = fixedpoint.iterate(fmap, x0, damping=damping, anderson=anderson, tol=tol,
                                noise_factor=noise_factor, max_iter=max_iter,
                                precondition=newton_f if newton else None, stall=3,
                                min_damping=min(damping, 0.25), callback=callback,
                                logger=logger, bar=bar, name="mc")
    f, phi, g, A, B = unpack(fp.x)
    phi, g = np.array(phi), np.array(g)
    # NTK from the final kernels (not the mean of per-block products, biased by O(1/chunk))
    idx = np.arange(T1)[:, None] * n + np.arange(n)[None, :]
    eq = lambda K: K[idx[:, :, None], idx[:, None, :]]            # noqa: E731
    ntk = eq(phi[L - 1]).copy()
    for l in range(L):
        ntk += eq(g[l]) * (kx[None] if l == 0 else eq(phi[l - 1]))
    return {"f": f.copy(), "phi": phi, "g": g,
            "A": np.array(A) if nr else None, "B": np.array(B) if nr else None,
            "f_se": last["f_se"], "phi_se": last["phi_se"], "g_se": last["g_se"],
            "ntk": ntk, "ntk_se": last["ntk_se"], "converged": fp.converged,
            "iterations": fp.iterations, "residuals": fp.residuals, "floors": fp.floors,
            "samples": S, "response_samples": Sr, "relu_eps": eps if activation == "relu"
            else None, "b_estimator": b_estimator, "chunk": c, "tangent_chunk": ct}
