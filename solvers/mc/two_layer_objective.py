"""Two-layer networks beyond one squared-error output (docs/theory.rst §7): C outputs, any
loss, weight decay toward the initialisation or zero, mini-batch and online schedules.

The forward march of :mod:`solvers.mc.two_layer` with a readout vector w in R^C per sample and
Delta(t) from :class:`solvers.objective.Objective`: one step (:func:`objective_step`), the
population march reading Delta from the population (:func:`march_objective`), the march under a
given Delta (:func:`march_fixed_objective`), the two-time kernels (:func:`objective_kernels`)
and the solver with replicate errors (:func:`solve_two_layer_objective`). The plain problem
keeps the functions of :mod:`solvers.mc.two_layer`, bit-for-bit.
"""
from __future__ import annotations

import math

import numpy as np

from ..activations import apply
from ._common import _activate, _check_predictions, _rank_k_kernels
from .sources import _kernel_subset, two_layer_sources

__all__ = ["objective_step", "march_objective", "march_fixed_objective", "objective_kernels",
           "solve_two_layer_objective"]


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
    _activate(activation, h, phi_h, dphi)
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
        _check_predictions(f[:, t + 1] / (gamma0 * block), t + 1, divergence)
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
    (T1 n C, T1 n C) (index (t n + mu) C + c) with batch-means standard errors ``*_se``;
    with C >= 2 the blocks of ``g`` are accumulated in single precision.
    """
    S, n = u.shape
    C = w0.shape[1]
    T1 = delta.shape[0]

    def features(c0, c1):
        return march_fixed_objective(activation, u[c0:c1], w0[c0:c1], kx, delta[:T1 - 1],
                                     gamma0 * lr, a, decay_to)

    # with C >= 2 outputs the (T1 n C)^2 G dominates: single-precision blocks (rounding
    # ~1e-6 relative against a sampling error ~ 1 / sqrt(S))
    return _rank_k_kernels(features, S, {"phi": T1 * n, "g": T1 * n * C}, blocks, chunk,
                           single=("g",) if C >= 2 else ())


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
