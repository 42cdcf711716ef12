"""Two-layer networks (L = 1) by the forward march of the population (docs/theory.rst §2).

u^1 and w(0) only see the population through Delta, so all samples are marched together one
step at a time, reading f(t) from the population (:func:`two_layer_step_fast`: BLAS + NumPy
SIMD activations). Sources by randomised quasi-Monte Carlo (:func:`two_layer_sources`); the
two-time kernels are computed once at the end by symmetric rank-k updates
(:func:`two_layer_kernels`). Predictions f(t) = gamma0^{-1} < w(t) phi(h(t)) > with antithetic
pairs (u, w0), (u, -w0): the t = 0 term cancels exactly.

Beyond one squared-error output (docs/theory.rst §7: C outputs, any loss, weight decay, batch
schedules): :mod:`solvers.mc.two_layer_objective`, whose functions are importable from here
too. The plain problem keeps the functions of this module, bit-for-bit.
"""
from __future__ import annotations

import math

import numpy as np

from ..activations import apply
from ._common import _activate, _check_predictions, _rank_k_kernels
from .sources import _kernel_subset, two_layer_sources
from .two_layer_objective import (march_fixed_objective, march_objective, objective_kernels,
                                  objective_step, solve_two_layer_objective)

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
            _activate(activation, hs, ps, gs)
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
        _check_predictions(f[:, t + 1], t + 1, divergence)
        if bar is not None:
            bar.update(1)
    return {"f": f, "delta": delta, "phi_tt": phi_tt, "g_tt": g_tt}


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
    S, n = u.shape
    T1 = delta.shape[0]
    m = T1 * n

    def features(c0, c1):
        return march_fixed_delta(activation, u[c0:c1], w0[c0:c1], kx, delta[:T1 - 1],
                                 gamma0 * lr, record=("phi", "g"))

    return _rank_k_kernels(features, S, {"phi": m, "g": m}, blocks, chunk)


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
