"""Two-layer networks (L = 1) by the forward march of the population (docs/theory.rst §2).

u^1 and w(0) only see the population through Delta, so all samples are marched together one
step at a time, reading f(t) from the population (:func:`two_layer_step_fast`: BLAS + NumPy
SIMD activations). Sources by randomised quasi-Monte Carlo (:func:`two_layer_sources`); the
two-time kernels are computed once at the end by symmetric rank-k updates
(:func:`two_layer_kernels`). Predictions f(t) = gamma0^{-1} < w(t) phi(h(t)) > with antithetic
pairs (u, w0), (u, -w0): the t = 0 term cancels exactly.

Beyond one squared-error output (docs/theory.rst §7: C outputs, any loss, weight decay toward
the initialisation or zero, mini-batch and online schedules): the same march with a readout
vector w in R^C per sample and Delta(t) from :class:`solvers.objective.Objective`
(:func:`solve_two_layer_objective`, :func:`march_objective`, :func:`objective_step`,
:func:`objective_kernels`). The plain problem keeps the functions above, bit-for-bit.
"""
from __future__ import annotations

import math

import numpy as np

from ..activations import apply
from ..layout import low_rank_factor, psd_sqrt
from .._jit import njit

__all__ = ["two_layer_step_fast", "march_fixed_delta", "march_two_layer", "two_layer_kernels",
           "two_layer_sources", "solve_two_layer", "objective_step", "march_objective",
           "march_fixed_objective", "objective_kernels", "solve_two_layer_objective"]


def two_layer_step_fast(h, w, phi_h, g, drive, wdrive, block, activation, fsum, ptt=None,
                        gtt=None, cache_rows: int = 2048):
    """Advance every sample of a two-layer network by one gradient step (in place).

    docs/theory.rst §2 with L = 1, where C = lr Kx Delta is constant in time and z = w:
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
    activation : str.
    fsum : (B, n) accumulator, added to.
    ptt, gtt : (B, n, n), optional: also accumulate the equal-time kernels of the new time,
        ``ptt[b] += phi^T phi``, ``gtt[b] += g^T g`` (sums over the block's samples).

    Per slice of at most ``cache_rows`` samples of one block: one BLAS product for the h
    update and the activation with NumPy's SIMD transcendental functions, so the slice stays
    in cache (tests/_reference.py holds the per-sample Numba loop and a plain NumPy version it
    is checked against; measurements: benchmarks/README.md).
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


def march_fixed_delta(activation: str, u, w0, kx, delta, c: float,
                      record=("h", "phi", "g", "w"), out=None) -> dict:
    """March two-layer samples under a given error signal Delta(t) (no population feedback).

    The one two-layer march of the engines (the population solver, the two-time kernels, the
    fluctuation propagator, perturbation theory): each step is :func:`two_layer_step_fast`
    with drive c Kx[:, :P] Delta(t), c = gamma0 lr; the samples are independent, so their
    layout (antithetic pairs) is the caller's.

    Parameters
    ----------
    activation : str; u : (S, n) sources h(0); w0 : (S,) readouts w(0); kx : (n, n).
    delta : (T, P) Delta(t) at the T times t = 0 .. T-1 that drive the updates (P <= n: the
        first P points; columns that are zero, e.g. passive test points, may be included).
    c : float, gamma0 lr.
    record : the trajectories to return, among "h", "phi", "g" (S, T+1, n) and "w" (S, T+1).
    out : dict, optional: preallocated arrays for (some of) the recorded trajectories.

    Returns
    -------
    dict with the ``record`` trajectories, time t at index [:, t].
    """
    S, n = u.shape
    T, P = delta.shape
    out = {} if out is None else out
    for key in record:
        if key not in out:
            out[key] = np.empty((S, T + 1) if key == "w" else (S, T + 1, n))
    h = np.array(u, dtype=np.float64, copy=True)
    w = np.array(w0, dtype=np.float64, copy=True)
    ph = apply(activation, h, 0)
    g = apply(activation, h, 1) * w[:, None]
    cur = {"h": h, "phi": ph, "g": g, "w": w}

    def keep(t):
        for key in record:
            out[key][:, t] = cur[key]

    keep(0)
    kdrive = c * np.asarray(kx)[:, :P]
    fs = np.zeros((1, n))
    for t in range(T):
        d = delta[t]
        two_layer_step_fast(h, w, ph, g, (kdrive * d[None, :])[None], (c * d)[None], S,
                            activation, fs)
        keep(t + 1)
    return out


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
            feats = march_fixed_delta(activation, u[c0:c1], w0[c0:c1], kx, delta[:T1 - 1],
                                      gamma0 * lr, record=keys)
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


def two_layer_sources(kx, samples: int, seed, replicates: int = 1, sampler: str = "sobol",
                      outputs: int | None = None):
    """Sources (u, w0) of a two-layer network in antithetic pairs (u, w0), (u, -w0).

    ``outputs=None``: one readout per sample, w0 (S,) (the original problem). ``outputs=C``:
    a readout vector per sample, w0 (S, C) ~ N(0, I_C) (docs/theory.rst §7), a sample being a
    point of R^{r + C}; for C = 1 the numbers equal those of ``outputs=None`` as a column.

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
        eta = rng.standard_normal(hb * B if outputs is None else (hb * B, outputs))
        u = xi @ psd_sqrt(kx)
    elif sampler == "sobol":
        import warnings

        from scipy.stats import qmc
        F = low_rank_factor(kx)
        r = F.shape[1]
        C = 1 if outputs is None else int(outputs)
        bits = 30
        zs = []
        for child in ss.spawn(B):
            gen = np.random.default_rng(child)
            try:
                eng = qmc.Sobol(r + C, scramble=True, bits=bits, rng=gen)
            except TypeError:                      # scipy < 1.15 names it ``seed``
                eng = qmc.Sobol(r + C, scramble=True, bits=bits, seed=gen)
            with warnings.catch_warnings():
                # balance is exact for powers of 2; other sizes are still unbiased
                warnings.simplefilter("ignore", UserWarning)
                x = eng.random(hb)
            zs.append(ndtri(x + 0.5 ** (bits + 1)))
        z = np.concatenate(zs)
        u = z[:, :r] @ F.T
        eta = z[:, r] if outputs is None else z[:, r:r + C]
    else:
        raise ValueError(f"sampler must be 'sobol' or 'random', got {sampler!r}")
    u = np.repeat(u, 2, axis=0)                    # pairs (u, w0), (u, -w0) adjacent
    if outputs is not None:
        return u, np.stack([eta, -eta], axis=1).reshape(-1, eta.shape[1])
    w0 = np.stack([eta, -eta], axis=1).reshape(-1)
    return u, w0


def _kernel_subset(S: int, B: int, kernel_samples):
    """The samples the two-time kernels are estimated from: ``(idx, ks, kblocks)``. With
    ``B >= 2`` replicates the same number of antithetic pairs from every replicate (kernel
    blocks = replicates), else the first ``ks`` samples in up to 8 blocks."""
    ks = S if kernel_samples is None else min(S, 2 * (int(kernel_samples) // 2))
    if B >= 2 and ks >= 2 * B:
        kb = 2 * ((ks // 2) // B)
        Sr = S // B
        idx = (np.arange(B)[:, None] * Sr + np.arange(kb)[None, :]).reshape(-1)
        return idx, kb * B, B
    return np.arange(ks), ks, max(2, min(8, ks // 2))


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
    1 / sqrt(samples) (measurements: benchmarks/README.md). Two-time kernels use the
    first ``kernel_samples`` samples (default all) re-marched with the population's Delta
    (:func:`two_layer_kernels`); the predictions never need them.

    Returns
    -------
    dict: ``f`` (T1, n), ``f_se`` (T1, n), ``delta`` (T1, P), ``ntk``, ``ntk_se`` (T1, n, n),
    ``phi``, ``g``, ``phi_se``, ``g_se`` flat (T1 n, T1 n), ``samples``, ``kernel_samples``.
    """
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
    idx, ks, kblocks = _kernel_subset(S, B, kernel_samples)
    ker = two_layer_kernels(kx, res["delta"], u[idx], w0[idx], gamma0, lr, activation,
                            chunk=chunk, blocks=kblocks)
    res.update(phi=ker["phi"], g=ker["g"], phi_se=ker["phi_se"], g_se=ker["g_se"],
               kernel_samples=ks)
    return res


# ------------------------------------------------------------------------------------------
# beyond one squared-error output (docs/theory.rst §7): C outputs, any loss, weight decay,
# mini-batches. The plain problem keeps the functions above (bit-for-bit).

def _decay_mode(a: float, decay_to: str):
    """(a, anchored): ``anchored`` is True when weight decay pulls toward the initialisation
    (theta_bar = theta(0)), False toward zero; a = 1 (no decay) returns (1.0, True)."""
    if decay_to not in ("init", "zero"):
        raise ValueError(f"decay_to must be 'init' or 'zero', got {decay_to!r}")
    return float(a), (a == 1.0 or decay_to == "init")


def objective_step(h, w, phi_h, dphi, u, w0, kdrive, wdrive, a: float, anchored: bool,
                   activation: str, g=None):
    """Advance the samples of a slice by one gradient step under a given error signal (in
    place); C outputs, weight decay (docs/theory.rst §7).

    With theta <- theta - lr [gamma0^2 N dLoss/dtheta + lambda (theta - theta_bar)] and
    a = 1 - lr lambda, per hidden unit (sample):

        h_mu <- hbar_mu + a (h_mu - hbar_mu) + gamma0 lr sum_{alpha, c} Kx_{mu alpha}
                Delta_{alpha c} g_{alpha c}
        w_c  <- wbar_c + a (w_c - wbar_c) + gamma0 lr sum_alpha Delta_{alpha c} phi(h_alpha)

    both sums at the current time, g_{alpha c} = phi'(h_alpha) w_c; hbar = u, wbar = w(0)
    toward the initialisation (``anchored``: every memory term gets a^(t-1-s)), hbar = wbar
    = 0 toward zero (the initial-weight channel also shrinks as a^t: h(t) = a^t u + memory,
    w(t) = a^t w(0) + memory). Then phi(h), phi'(h) (and g, if given) at the new time are
    written.

    Parameters
    ----------
    h : (s, n); w : (s, C); phi_h, dphi : (s, n) phi(h), phi'(h): the state, updated.
    u : (s, n), w0 : (s, C): the initial values (read only when anchored and a != 1).
    kdrive : (P C, n) gamma0 lr Kx_{mu alpha} Delta_{alpha c} at row alpha C + c.
    wdrive : (P, C) gamma0 lr Delta.
    g : (s, n, C), optional: written with g at the new time.
    """
    s, n = h.shape
    P, C = wdrive.shape
    dw = phi_h[:, :P] @ wdrive
    gP = dphi[:, :P, None] * w[:, None, :]                 # g on the training points only
    dh = gP.reshape(s, P * C) @ kdrive
    if a != 1.0:
        if anchored:
            h -= u
            h *= a
            h += u
            w -= w0
            w *= a
            w += w0
        else:
            h *= a
            w *= a
    h += dh
    w += dw
    if activation == "tanh":
        np.tanh(h, out=phi_h)
        np.multiply(phi_h, phi_h, out=dphi)
        np.subtract(1.0, dphi, out=dphi)
    else:
        phi_h[...] = apply(activation, h, 0)
        dphi[...] = apply(activation, h, 1)
    if g is not None:
        np.multiply(dphi[:, :, None], w[:, None, :], out=g)


def _drives(kx, delta, c: float):
    """(P C, n) and (P, C) drives of :func:`objective_step` from Delta (P, C), c = gamma0 lr."""
    P, C = delta.shape
    kd = (c * np.asarray(kx)[:, :P])[:, :, None] * delta[None, :, :]      # (n, P, C)
    return np.ascontiguousarray(kd.reshape(kd.shape[0], P * C).T), c * delta


def march_objective(kx, objective, u, w0, gamma0: float, lr: float, steps: int,
                    activation: str, blocks: int = 1, equal_time: bool = True,
                    divergence: float = 1e8, bar=None, cache_rows: int = 2048) -> dict:
    """March a two-layer population forward with any objective (docs/theory.rst §7).

    As :func:`march_two_layer` (``blocks`` independent populations, each with its own f and
    Delta), with C outputs (w0 (S, C)), Delta(t) = ``objective.delta(t, f(t))`` (any loss,
    zero off-batch and on test points) and weight decay (:func:`objective_step`). Exact in
    discrete time: f(t) is read from the population at each step, no iteration.

    The equal-time G_{mu c, nu c'} = < g_{mu c} g_{nu c'} > is one symmetric rank-k update
    per slice of samples (g formed in a preallocated buffer). Measured (benchmarks/
    outputs_cost.py): faster than one GEMM of the packed products [phi'_mu phi'_nu]_{mu <= nu}
    and [w_c w_c']_{c <= c'} (a quarter of the flops) up to C = 10 at n = 16, where forming
    the packed products costs more than the flops saved.

    Parameters
    ----------
    kx : (n, n); objective : :class:`solvers.objective.Objective` (P, C, a, decay_to,
    delta); u : (S, n); w0 : (S, C); gamma0, lr, steps, activation : problem.

    Returns
    -------
    dict with ``f`` (B, T1, n, C), ``delta`` (B, T1, n, C) and, with ``equal_time``,
    ``phi_tt`` (B, T1, n, n) = Phi(t, t) and ``g_tt`` (B, T1, n C, n C) = G_{mu c, nu c'}(t, t)
    (row index mu C + c).
    """
    S, n = u.shape
    C = w0.shape[1]
    P = objective.P
    T1 = steps + 1
    if S % blocks:
        raise ValueError(f"samples ({S}) must be divisible by blocks ({blocks})")
    a, anchored = _decay_mode(objective.a, objective.decay_to)
    block = S // blocks
    u = np.ascontiguousarray(u, dtype=np.float64)
    w0 = np.ascontiguousarray(w0, dtype=np.float64)
    h = u.copy()
    w = w0.copy()
    phi_h = apply(activation, h, 0)
    dphi = apply(activation, h, 1)
    f = np.zeros((blocks, T1, n, C))
    delta = np.zeros((blocks, T1, n, C))
    phi_tt = np.zeros((blocks, T1, n, n)) if equal_time else None
    g_tt = np.zeros((blocks, T1, n * C, n * C)) if equal_time else None
    gbuf = np.empty((min(cache_rows, block), n, C)) if equal_time else None
    c = gamma0 * lr

    def accumulate(b, t, sl):
        ps, ws = phi_h[sl], w[sl]
        f[b, t] += ps.T @ ws
        if equal_time:
            phi_tt[b, t] += ps.T @ ps
            gs = gbuf[:ps.shape[0]]
            np.multiply(dphi[sl][:, :, None], ws[:, None, :], out=gs)
            gs = gs.reshape(-1, n * C)
            g_tt[b, t] += gs.T @ gs

    def slices(b):
        end = (b + 1) * block
        return [slice(c0, min(end, c0 + cache_rows)) for c0 in range(b * block, end,
                                                                      cache_rows)]

    for b in range(blocks):
        for sl in slices(b):
            accumulate(b, 0, sl)
    for t in range(T1):
        f[:, t] /= gamma0 * block
        if t == steps:
            break                  # Delta(T) drives no update: left zero
        for b in range(blocks):
            delta[b, t] = objective.delta(t, f[b, t])
        for b in range(blocks):
            kd, wd = _drives(kx, delta[b, t, :P], c)
            for sl in slices(b):
                objective_step(h[sl], w[sl], phi_h[sl], dphi[sl], u[sl], w0[sl], kd, wd, a,
                               anchored, activation)
                accumulate(b, t + 1, sl)
        ft = f[:, t + 1] / (gamma0 * block)
        if not np.all(np.isfinite(ft)) or np.abs(ft).max() > divergence:
            raise FloatingPointError(
                f"the predictions diverged at step {t + 1} (|f| = {np.abs(ft).max():.3g}); "
                f"gamma0 or lr is too large")
        if bar is not None:
            bar.update(1)
    if equal_time:
        phi_tt /= block
        g_tt /= block
    return {"f": f, "delta": delta, "phi_tt": phi_tt, "g_tt": g_tt}


def march_fixed_objective(activation: str, u, w0, kx, delta, c: float, a: float = 1.0,
                          decay_to: str = "init", out=None) -> dict:
    """March two-layer samples with C outputs under a given Delta(t) (no population feedback),
    recording phi(h) (S, T+1, n) and g (S, T+1, n, C) at every time (docs/theory.rst §7).

    delta : (T, P, C) the error signals that drive the T updates; c = gamma0 lr; a, decay_to:
    weight decay (:func:`objective_step`).
    """
    S, n = u.shape
    C = w0.shape[1]
    T, P, _ = delta.shape
    a, anchored = _decay_mode(a, decay_to)
    out = {} if out is None else out
    out.setdefault("phi", np.empty((S, T + 1, n)))
    out.setdefault("g", np.empty((S, T + 1, n, C)))
    u = np.ascontiguousarray(u, dtype=np.float64)
    w0 = np.ascontiguousarray(w0, dtype=np.float64)
    h, w = u.copy(), w0.copy()
    ph = apply(activation, h, 0)
    dph = apply(activation, h, 1)
    g = dph[:, :, None] * w[:, None, :]
    out["phi"][:, 0], out["g"][:, 0] = ph, g
    for t in range(T):
        kd, wd = _drives(kx, delta[t], c)
        objective_step(h, w, ph, dph, u, w0, kd, wd, a, anchored, activation, g=g)
        out["phi"][:, t + 1], out["g"][:, t + 1] = ph, g
    return out


def objective_kernels(kx, delta, u, w0, gamma0: float, lr: float, activation: str,
                      a: float = 1.0, decay_to: str = "init", chunk: int = 2048,
                      blocks: int = 8) -> dict:
    """Two-time kernels Phi^1(t, s) and G^1_{mu c, nu c'}(t, s) for a given Delta(t), with C
    outputs and weight decay: :func:`two_layer_kernels` with :func:`march_fixed_objective`.

    delta : (T1, P, C) (the last time is unused). Returns flat ``phi`` (T1 n, T1 n) and ``g``
    (T1 n C, T1 n C) (index (t n + mu) C + c) with batch-means standard errors ``*_se``.
    """
    from scipy.linalg.blas import dsyrk

    S, n = u.shape
    C = w0.shape[1]
    T1 = delta.shape[0]
    dims = {"phi": T1 * n, "g": T1 * n * C}
    blocks = max(1, min(int(blocks), S // 2))
    edges = [2 * ((S // 2) * k // blocks) for k in range(blocks)] + [S]
    keys = ("phi", "g")
    tmp = {k: np.zeros((dims[k], dims[k]), order="F") for k in keys}
    total = {k: np.zeros((dims[k], dims[k]), order="F") for k in keys}
    sq = {k: np.zeros((dims[k], dims[k]), order="F") for k in keys}
    chunk = max(2, int(chunk))
    for b0, b1 in zip(edges[:-1], edges[1:]):
        first = True
        for c0 in range(b0, b1, chunk):
            c1 = min(b1, c0 + chunk)
            Sc = c1 - c0
            feats = march_fixed_objective(activation, u[c0:c1], w0[c0:c1], kx, delta[:T1 - 1],
                                          gamma0 * lr, a, decay_to)
            for k in keys:
                tmp[k] = dsyrk(1.0, feats[k].reshape(Sc, dims[k]).T,
                               beta=0.0 if first else 1.0, c=tmp[k], trans=0, lower=0,
                               overwrite_c=1)
            first = False
        for k in keys:
            _accumulate_upper(tmp[k], 1.0 / (b1 - b0), total[k], sq[k])
    out = {}
    nb = len(edges) - 1
    for k in keys:
        del tmp[k]
        out[k] = np.empty((dims[k], dims[k]))
        out[k + "_se"] = np.empty((dims[k], dims[k]))
        _finish_upper(total[k], sq[k], 1.0 / S, nb, out[k], out[k + "_se"])
        del total[k], sq[k]
    return out


def _ntk_from(phi_tt, g_tt, kx, C):
    """K_{mu c, nu c'}(t) = delta_{cc'} Phi(t, t)_{mu nu} + G_{mu c, nu c'}(t, t) Kx_{mu nu}
    (readout layer + first layer; docs/theory.rst §7): (..., T1, n, C, n, C)."""
    lead = g_tt.shape[:-2]
    n = kx.shape[0]
    K = g_tt.reshape(*lead, n, C, n, C) * kx[:, None, :, None]
    idx = np.arange(C)
    K[..., :, idx, :, idx] += phi_tt[None]
    return K


def _margin_distance(objective, f, f_se, steps):
    """The hinge loss's closest call: min over the decisions y_mu f_mu(t) < 1 that drive an
    update (t = 1 .. T-1, training points in the step's batch) of |y f - 1| / se(f).

    Delta = y 1[y f < 1] is discontinuous, so the discrete-time trajectory is a discontinuous
    function of f: where a margin is within the Monte Carlo error of 1, a replicate may take
    the other branch, and the mean of the replicates is then off the N = infinity trajectory by
    up to a fraction of a step's change lr K Delta, which the standard errors need not
    cover. Returns ``margin_z`` (inf without decisions or standard errors),
    ``margin_step``, ``margin_point``."""
    y = objective.Y[:, 0]
    m = np.abs(y[None, :] * f[1:steps, :objective.P, 0] - 1.0)
    se = f_se[1:steps, :objective.P, 0]
    ok = se > 0
    if objective.mask is not None:
        ok &= objective.mask[1:steps]
    if not ok.any():
        return {"margin_z": np.inf, "margin_step": -1, "margin_point": -1}
    z = np.where(ok, m / np.where(ok, se, 1.0), np.inf)
    t, mu = np.unravel_index(np.argmin(z), z.shape)
    return {"margin_z": float(z[t, mu]), "margin_step": int(t + 1), "margin_point": int(mu)}


def solve_two_layer_objective(kx, objective, activation: str, gamma0: float, lr: float,
                              steps: int, *, samples: int, seed,
                              kernel_samples: int | None = None, blocks: int = 8,
                              chunk: int = 2048, sampler: str = "sobol", bar=None) -> dict:
    """Two-layer DMFT by the forward march for any objective (docs/theory.rst §7): C outputs,
    every loss of :mod:`solvers.objective`, weight decay toward the initialisation or zero,
    mini-batch and online schedules.

    As :func:`solve_two_layer`: ``blocks`` replicates (scrambled Sobol sets in rank(Kx) + C
    dimensions, antithetic pairs (u, +-w0) with w0 ~ N(0, I_C)) marched as independent
    populations, each with its own Delta = ``objective.delta(t, f)``; the result is their mean
    and the standard error std / sqrt(blocks) includes the feedback of the noise through
    Delta (for the hinge loss also the spread of the steps at which a point's margin is
    crossed). Two-time kernels from ``kernel_samples`` re-marched samples under the mean
    solution's Delta.

    Returns
    -------
    dict: ``f``, ``f_se`` (T1, n, C); ``delta`` (T1, n, C); ``ntk``, ``ntk_se`` (T1, n, C, n,
    C); flat ``phi``, ``phi_se`` (T1 n, T1 n) and ``g``, ``g_se`` (T1 n C, T1 n C);
    ``samples``, ``kernel_samples``; hinge loss: ``margin_z``, ``margin_step``,
    ``margin_point`` (:func:`_margin_distance`).
    """
    C = objective.C
    kx = np.asarray(kx, dtype=np.float64)
    B = max(1, min(int(blocks), samples // 2)) if blocks >= 2 else 1
    u, w0 = two_layer_sources(kx, samples, seed, B, sampler, outputs=C)
    S = u.shape[0]
    blk = march_objective(kx, objective, u, w0, gamma0, lr, steps, activation, blocks=B,
                          bar=bar)
    Kb = _ntk_from(blk["phi_tt"], blk["g_tt"], kx, C)
    f = blk["f"].mean(axis=0)
    delta = np.stack([objective.delta(t, f[t]) for t in range(steps)]
                     + [np.zeros_like(f[0])])
    res = {"f": f, "delta": delta, "ntk": Kb.mean(axis=0), "samples": S}
    if B >= 2:
        res["f_se"] = blk["f"].std(axis=0, ddof=1) / math.sqrt(B)
        res["ntk_se"] = Kb.std(axis=0, ddof=1) / math.sqrt(B)
    else:
        res["f_se"] = np.zeros_like(f)
        res["ntk_se"] = np.zeros_like(res["ntk"])
    P = objective.P
    if objective.loss == "hinge":
        res.update(_margin_distance(objective, f, res["f_se"], steps))
    idx, ks, kblocks = _kernel_subset(S, B, kernel_samples)
    ker = objective_kernels(kx, delta[:, :P], u[idx], w0[idx], gamma0, lr, activation,
                            objective.a, objective.decay_to, chunk=chunk, blocks=kblocks)
    res.update(phi=ker["phi"], g=ker["g"], phi_se=ker["phi_se"], g_se=ker["g_se"],
               kernel_samples=ks)
    return res
