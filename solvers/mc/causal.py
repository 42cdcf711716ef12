"""One-pass causal Monte Carlo solver of the deep DMFT, in exact discrete time.

The discrete-time DMFT is causal across all layers. At step t, bottom-up, layer l needs only

    h^l(t)  = u^l(t) + gamma0 sum_{s<t} C^l(t, s) g^l(s),  C^l = A^{l-1} + lr tril_{-1}[Phi^{l-1} Delta]

with u^l(t) drawn from Phi^{l-1}(<=t, <=t), and A^{l-1}(t, <t), Phi^{l-1}(t, <=t) are estimated
from layer l-1 at the same t; then, top-down,

    z^l(t)  = r^l(t) + gamma0 sum_{s<=t} D^l(t, s) phi(h^l(s)),  D^l = B^l + lr tril_{-1}[G^{l+1} Delta]

with r^l(t) drawn from G^{l+1}(<=t, <=t), and B^l(t, <=t), G^{l+1}(t, <=t) estimated from layer
l+1 at the same t; g^l(t) = phi'(h^l(t)) z^l(t); finally f(t) = gamma0^{-1} <z^L(t) phi(h^L(t))>
and Delta(t) = y - f(t), first used at step t + 1. Every order parameter at time t is therefore
a function of the samples' fields at times <= t, and the fields at time t of the order
parameters at times <= t (and, within a step, of lower layers going up and upper layers going
down): the dependency graph over (t, pass, layer) is acyclic. Marching all samples and all
layers time-major and estimating each new kernel row, response row and f(t) from the
population as soon as it exists solves the self-consistency in one pass.

Sources are drawn causally: with Phi^{l-1} = F F^T the causal (time-major, block lower
triangular) Cholesky factor, u(t) = sum_{s<=t} F(t, s) xi(s), xi i.i.d. N(0, 1). The factor is
extended by one time block per step (:class:`CausalFactor`); its row block t depends on
Phi(<=t, <=t) only (the Cholesky factor of a leading block is the leading block of the factor).
An innovation whose variance, given all earlier variables, is below ``rtol`` times the
variable's own variance is dropped (the variable is then the regression on the earlier ones;
exactly so for the time-constant u^1, whose covariance has no innovations after t = 0).

Fixed-point property (the proof is the causality above, checked by a test): with common random
numbers xi, the alternating map of the iterative solver -- march every sample with the order
parameters q held fixed, re-estimate q -- restricted to times <= t depends on q at times <= t
only, and strictly so except for the within-step layer order. By induction over t (and over
layers within a step) its fixed point restricted to [0, t] is unique and equals the one-pass
values. ``tests/test_causal.py`` marches the one-pass sources with the iterative solver's
machinery (:func:`solvers.mc.march_layer`, :func:`solvers.mc.response_sums`) and the one-pass
order parameters, and recovers them to rounding.

Responses. A^l(t, s) = gamma0^{-1} <d phi(h^l(t)) / d r^l(s)> and B^{l-1}(t, s) =
gamma0^{-1} <d g^l(t) / d u^l(s)> by forward-mode tangents of the march, marched causally with
it on the first ``response_samples`` samples of each population: the h-part of each tangent
in the bottom-up pass, the z-part in the top-down pass. With the control variate (default) the
first-order terms C (.) <Lam1 Lam1^T>, D (.) <Lam1 Lam1^T> and gamma0^{-1} diag <Lam2> come
from all samples and the tangents give only the remainder (float32). For ReLU, B by Stein's
lemma in causally whitened sources (per row group, :class:`CausalFactor` with ``stein_rtol``),
accumulated row by row as g(t) appears.

Error bars. The samples form ``populations`` independent populations, each a complete one-pass
solution with its own order parameters and Delta; the result is their mean and the standard
error their spread / sqrt(populations). That includes the propagation of the sampling noise
through the layers, the sources and the self-consistency.

Training objectives (docs/theory.rst §7). C outputs, any loss, weight decay (toward the
initialisation or toward zero) and mini-batch schedules:
:func:`solvers.mc.causal_objective._population_objective`, the same march with an output index
on the backward fields, memory weights a^(t-1-s) and the initial-weight channel a^t (its
docstring has the equations). The plain problem (one mse output, full batch, no decay) keeps
:func:`solvers.mc.causal_population._population`, bit for bit.

This module holds the driver (:func:`solve_causal`: populations, error bars, checkpoints) and
the cost model with C outputs; one layer's state and its per-step work are in
:mod:`solvers.mc.causal_layer`, the first layer's sources in :mod:`solvers.mc.sources`.

Layout: per layer, fields are held time-major as (T1, n_points, S) with the sample axis last
(one time slice is a contiguous (n, S) matrix, the history up to t a contiguous ((t+1) n, S)
one), train and test points in separate arrays so that the memory terms, which have train
columns only, are single GEMMs. Kernels are flat (T1 n, T1 n) with index t n + mu.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..layout import CausalFactor
from ..static import peak_lr_lambda, static_kernels
from ._common import _single_thread_blas
from .causal_layer import mixing_cheaper
from .causal_objective import _population_objective
from .causal_population import _population
from .cost import estimate_flops, estimate_memory
from .responses import default_relu_eps
from .sources import _sobol_normals

# the private names are importable here for the tests (tests/test_causal.py, test_checkpoint.py)
__all__ = ["CausalFactor", "solve_causal", "estimate_memory", "estimate_flops",
           "estimate_memory_outputs", "estimate_flops_outputs", "_population",
           "_population_objective", "_sobol_normals"]


def estimate_memory_outputs(T1, n, P, depth, samples_per_population, tangent_samples,
                            responses, stein, tangent_bytes=4, C=1, mix=False) -> int:
    """:func:`solvers.mc.cost.estimate_memory` with C outputs (docs/theory.rst §7): the
    backward fields, G and its sources have n C rows per time, the r-tangents T1 P C
    directions per sample and P C g-rows, the u-tangents P C g-rows; C = 1 is that function.
    With ``mix`` (mixed backward sources) the r-normals are replaced by the (S, S / 2) mixing
    matrix per source layer, a float32 copy of g and the Delta-contracted history.
    """
    if C == 1 and not mix:
        return estimate_memory(T1, n, P, depth, samples_per_population, tangent_samples,
                               responses, stein, tangent_bytes)
    L, S, m = int(depth), int(samples_per_population), T1 * n
    fields = L * (2 * m * S + 2 * m * C * S + m * S * (1 + C) // 2) * 8
    if mix:
        fields += L * (T1 * P * S * 8 + m * C * S * 4 - m * C * S // 2 * 8) \
            + (L - 1) * S * (S // 2) * 4
    tang = 0
    if responses and L >= 2:
        cols = T1 * P * int(tangent_samples)
        nr = L - 1
        nu = 0 if stein else L - 1
        tang = (nr * T1 * P * (1 + C) * C + nu * (T1 * n + T1 * P * C)) * cols * tangent_bytes
    kernels = L * (2 + 3 * C * C) * m * m * 8 * 3
    stein_b = (L - 1) * (n - P + 1) * T1 * (P + 1) * S * 8 if stein else 0
    return int(fields + tang + kernels + stein_b)


def estimate_flops_outputs(T1, n, P, depth, samples, tangent_samples, responses, C=1,
                           mix=False) -> float:
    """:func:`solvers.mc.cost.estimate_flops` with C outputs: the march and the G rows scale
    like C and C^2, the r-tangents like C^2 (T1 P C directions on P C rows), the u-tangents
    like C; C = 1 is that function. With ``mix`` (``samples`` of one population) the
    backward sources cost T1 n C S^2 per source layer instead of their factor's share."""
    if C == 1 and not mix:
        return estimate_flops(T1, n, P, depth, samples, tangent_samples, responses)
    L = int(depth)
    march = L * samples * T1 ** 2 * (2 * n * P * C + (2 + 3 * C * C) * n * n)
    if mix:
        march += (L - 1) * T1 * n * C * float(samples) ** 2 \
            - (L - 1) * samples * T1 ** 2 * C * C * n * n
    tang = 0.0
    if responses and L >= 2:
        tang = (L - 1) * tangent_samples * 4 * n * P * P * T1 ** 3 / 3 * (C * C + C)
    return float(march + tang)


@njit(cache=True)
def _add_with_square(acc, acc2, x):
    """acc += x and acc2 += x * x in one pass over flat arrays (the same float64 operations
    as numpy's, without the temporaries: the per-population sums of the two-time kernels
    are the largest arrays of the solve)."""
    for i in range(x.size):
        v = x[i]
        acc[i] += v
        acc2[i] += v * v


# "adaptive" tangent blocks: blocks by source time only where the training stays below this
# peak lr lambda_max(K_train(t)) (benchmarks/README.md, "Tangent samples in blocks": every
# problem measured that peaks at <= 2.33 gains 2-4x in variance from the blocks, every one that
# catapults to >= 2.78 loses 1.7-5x)
EDGE_OF_STABILITY = 2.5

#: a population whose final predictions lie this many times farther from the populations'
#: median than the typical population's is reported as an outlier (:func:`population_outliers`)
OUTLIER_RATIO = 10.0


def population_outliers(f_final, threshold: float = OUTLIER_RATIO) -> list:
    """Indices of the populations whose final predictions are outliers, largest first.

    ``f_final`` (R, ...) holds each population's f(T). A population's distance is its largest
    |f(T) - median| over the entries (the median over the R populations, entry by entry); its
    score is that distance over the median distance of all populations. With normal spread the
    scores stay within ~3; a catapult's heavy-tailed but trained populations within ~5 (tanh
    depth 3 at gamma0 = 2 of benchmarks/deep_cases.py: 4.7). Near the edge of stability a
    population's Monte Carlo noise can drive it unstable late in training (relu depth 3 there:
    about 1 population in 500 at the default 1024 samples each; its f reached 22 against
    targets of order 1: score ~400) while the others train: the mean and the standard error
    then carry it, and this names it. A non-finite population scores inf. Below 5
    populations nothing is judged.

    Returns a list of (population index, score) with score > ``threshold``.
    """
    x = np.asarray(f_final, dtype=np.float64)
    R = x.shape[0]
    if R < 5:
        return []
    x = x.reshape(R, -1)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.sum() > R // 2:
        return [(int(p), float("inf")) for p in np.flatnonzero(bad)]
    med = np.median(x[~bad], axis=0)
    with np.errstate(invalid="ignore"):
        dist = np.abs(x - med).max(axis=1)
    typical = float(np.median(dist[~bad]))
    floor = 1e-12 + 1e-9 * float(np.abs(med).max(initial=0.0))
    score = dist / max(typical, floor)
    score[bad] = np.inf
    out = [(int(p), float(score[p])) for p in np.flatnonzero(score > threshold)]
    return sorted(out, key=lambda ps: -ps[1])


def solve_causal(kx, y, activation: str, depth: int, gamma0: float, lr: float, steps: int, *,
                 samples: int, seed, populations: int = 8, responses: bool = True,
                 response_samples: int = 128, b_estimator: str = "auto",
                 response_cv: bool = True, relu_eps: float | None = None,
                 src_rtol: float = 1e-6, stein_rtol: float = 1e-6, divergence: float = 1e8,
                 sampler: str = "sobol", max_memory: float | None = None,
                 flop_rate: float = 10e9, record_sources: bool = False, logger=None,
                 bar=None, state: dict | None = None, on_population=None,
                 objective=None, r_sources: str = "auto",
                 deep_sources: str = "orthogonal", initial_kernels: str = "exact",
                 tangent_blocks="adaptive") -> dict:
    """One-pass solution of the deep DMFT by ``populations`` independent causal marches.

    Parameters
    ----------
    kx : (n, n) input kernel; y : (P,) train targets; activation, depth (L >= 2), gamma0, lr,
    steps : problem.
    samples : total samples (rounded to ``populations`` times an even number).
    seed : SeedSequence (or int); population p uses ``seed.spawn(populations)[p]``.
    responses : False for the gradient-independence ansatz (A = B = 0, predictions by
        f(t+1) = f(t) + lr K(t) Delta(t)).
    response_samples : total tangent samples (split equally over the populations).
    b_estimator : "auto" (Stein for relu, tangents otherwise), "tangent" or "stein".
    response_cv : control variate of the tangent responses (float32 tangents).
    state, on_population : checkpoint hook. After each finished population
        ``on_population(state)`` is called with ``state = {"next": p + 1, "acc": {...},
        "acc2": {...}, "f_final": (p + 1, ...)}``, the running sums over populations 0..p
        of each result and of its square (arrays that are updated in place afterwards: save
        them before returning) and each population's final predictions (for
        :func:`population_outliers`, returned as ``population_outliers``).
        Passing such a state back as ``state`` resumes with population ``state["next"]``:
        the sums are copied, the finished populations skipped, the others drawn from their own
        (unchanged) seeds, so the result is bit-identical to an uninterrupted solve. Not with
        ``record_sources``.
    objective : :class:`solvers.objective.Objective` or None
        The training objective (docs/theory.rst §7: C outputs, loss, weight decay, batches).
        None or a plain one (mse, one output, full batch, no decay) marches the original
        problem with targets ``y`` (bit-identical to earlier versions); otherwise ``y`` is
        ignored and :func:`_population_objective` marches ``objective``. Then ``f``
        is (T1, n, C), ``ntk`` (T1, n, C, n, C), flat ``g`` (L, T1 n C, T1 n C) (index
        t n C + mu C + c), ``A`` (L-1, T1 n, T1 n C), ``B`` (L-1, T1 n C, T1 n).
    max_memory : bytes a population may use (:func:`estimate_memory`); a larger solve is
        refused with a ValueError before any work (None: no check). The estimate and a flop
        count (:func:`estimate_flops`, a time at ``flop_rate``) are logged.
    r_sources : how the backward sources r^l of a general ``objective`` are drawn: "factor"
        (the causal factor of G^{l+1}), "mix" (a fixed Gaussian mixing of the samples of
        g^{l+1}: the same law, :meth:`solvers.mc.causal_layer._Layer.draw_r_mix`; the result's
        two-time G then in single-precision rows) or "auto" (default: "mix" where
        :func:`solvers.mc.causal_layer.mixing_cheaper`, i.e. with many outputs). The plain
        problem always uses the factor.
    sampler : "sobol" (default): the first layer's sources and the readouts w(0), rank(Kx) + 1
        numbers per antithetic pair, by randomised quasi-Monte Carlo (one scrambled Sobol set
        per population); "random": i.i.d. normals.
    deep_sources : the innovations of the deeper layers' causal sources u^l (l >= 2) and
        r^l (l < L). "orthogonal" (default): moment-matched within each population (centred,
        orthogonal, each with sum of squares S / 2 over the S / 2 antithetic pairs:
        :func:`solvers.mc.causal_layer._orthonormal_rows`) while there are fewer than S / 2
        of them, i.i.d. beyond; the sampled sources then have exactly the covariance drawn
        for. "normal": i.i.d. normals throughout (the estimator before 5 Dec 2026).
        Independent of ``sampler``; the mixed backward sources (``r_sources="mix"``) are
        not affected.
    tangent_blocks : "adaptive" (default), "auto", or an integer m >= 1: which samples carry the
        forward-mode tangents of which source times. The tangent directions of source time s (the
        columns (s, a) of A and B) are carried by the block s mod m of ``response_samples /
        populations`` samples (blocks in sample order from the start of the population), so
        each response entry is still the average of that many exact per-sample derivatives
        (unbiased, the same cost: each block carries 1/m of the directions), but entries of
        different source times come from different samples. A sample's derivatives for all
        source times are strongly correlated (a saturated unit has small ones for every s:
        the variance of a sum over s of a sample's control-variate remainders is 4-10x the
        sum of the variances at 40-50 steps), and the predictions read the responses
        through such sums; where the training is stable that noise falls (2-4x less variance
        of the predictions at equal cost on benchmarks/perf_mc.py cases (b), (c) and seven
        teacher-student problems), but where the training passes the edge of stability
        (a catapult: lr lambda_max(K_train(t)) peaks at 2.8-5.4 and falls back) the correlated
        noise of different source times cancels in what the march reads, and blocks give
        1.7-5x MORE variance (benchmarks/deep_cases.py problems; benchmarks/README.md).
        "auto": m = T + 1 (one block per source time) where the population holds that many
        blocks, else as many as it holds; 1: one set of samples carries every direction.
        "adaptive" (default): the first population with m = 1; from its NTK the peak
        ``peak_lr_lambda`` = max_t lr lambda_max(K_train(t)); the other populations with
        "auto"'s m where it is below ``EDGE_OF_STABILITY`` (2.5), else with m = 1. Every
        population is unbiased, and the spread over populations still estimates the variance
        of their mean (independent, equal means), so the error bars stay honest. General
        objectives (and a single population) use m = 1.
    initial_kernels : the kernels Phi^{l-1}(0, 0) that the deeper forward sources u^l(0)
        (l >= 2) are drawn with. "exact" (default): the NNGP kernels at initialisation
        (:func:`solvers.static.static_kernels`, closed forms or quadrature), known in
        advance; the t = 0 innovations are mapped so that the sampled u^l(0) have exactly
        that covariance, and every later row of the source by the same linear map (the
        population's two-time kernel is used as before for the rest of the factor; the
        sources stay a linear image of normals, so their law is a covariance and the causal
        factor stays valid; docs/theory.rst §2). Removes the sampling noise of the t = 0
        kernels from the deeper layers: 1.2-1.4x less variance of the predictions at equal
        cost (benchmarks/README.md). "sampled": the population's own estimates (the
        estimator before 6 Dec 2026).

    Returns
    -------
    dict with ``f`` (T1, n), ``ntk`` (T1, n, n), flat ``phi``, ``g`` (L, T1 n, T1 n), ``A``,
    ``B`` (L-1, T1 n, T1 n) or None: the population means; ``f_se``, ``ntk_se``, ``phi_se``,
    ``g_se``: standard errors of the means (spread over populations / sqrt(populations); zero
    for one population); ``samples``, ``response_samples``, ``populations``, ``relu_eps``,
    ``b_estimator``, ``memory_bytes``, ``r_sources`` ("factor" or "mix"), ``tangent_blocks``
    (the m of the populations after the first) and ``peak_lr_lambda`` (None unless
    "adaptive" decided).
    """
    L = int(depth)
    n = kx.shape[0]
    general = objective is not None and not objective.plain
    if general:
        if record_sources:
            raise ValueError("record_sources is for the plain problem (one mse output, full "
                             "batch, no weight decay); drop record_sources")
        if not responses and objective.decays:
            raise ValueError(
                "the gradient-independence ansatz (responses=False) reads the predictions "
                "from f(t+1) = f(t) + lr K(t) Delta(t), which has no weight-decay term; use "
                "the full solver (method='mc') for weight_decay > 0")
        P, Cout = objective.P, objective.C
    else:
        if objective is not None:
            y = objective.Y[:, 0]
        P, Cout = y.shape[0], 1
    T1 = steps + 1
    R = max(1, int(populations))
    Sp = max(2, 2 * (int(samples) // (2 * R)))
    Srp = 0
    if responses:
        Srp = max(1, min(Sp, -(-int(response_samples) // R)))
    if b_estimator == "auto":
        b_estimator = "stein" if activation == "relu" else "tangent"
    stein = responses and b_estimator == "stein"
    cv = bool(response_cv) and responses
    tdtype = np.float32 if cv else np.float64
    eps = default_relu_eps(max(Srp * R, 2048)) if relu_eps is None else float(relu_eps)
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    if deep_sources not in ("orthogonal", "normal"):
        raise ValueError(f"deep_sources must be 'orthogonal' (moment-matched innovations) or "
                         f"'normal' (i.i.d.), got {deep_sources!r}")
    ortho = deep_sources == "orthogonal"
    if initial_kernels not in ("exact", "sampled"):
        raise ValueError(f"initial_kernels must be 'exact' (the known NNGP kernels at t = 0) "
                         f"or 'sampled' (the population's estimates), got {initial_kernels!r}")
    if not (tangent_blocks in ("adaptive", "auto") or (
            isinstance(tangent_blocks, (int, np.integer)) and not isinstance(tangent_blocks, bool)
            and tangent_blocks >= 1)):
        raise ValueError(f"tangent_blocks must be 'adaptive', 'auto' or an integer >= 1, got "
                         f"{tangent_blocks!r}")
    tblocks = 1
    if responses:
        # at most one block per source time, and no more blocks than the population holds
        tblocks = max(1, min(T1 if tangent_blocks in ("auto", "adaptive")
                             else int(tangent_blocks), Sp // Srp))
    # "adaptive": the first population with one block; the rest with one block per source time
    # unless that population's training passed the edge of stability (peak_lr_lambda)
    adaptive = tangent_blocks == "adaptive" and tblocks > 1 and not general and R > 1
    peak = None
    phi0 = None
    if initial_kernels == "exact" and L >= 2:
        phi0 = static_kernels(activation, kx, L)["phi"]
    if r_sources not in ("auto", "factor", "mix"):
        raise ValueError(f"backward_sources (r_sources) must be 'auto', 'factor' or 'mix', "
                         f"got {r_sources!r}")
    if r_sources == "mix" and not general:
        raise ValueError("backward_sources='mix' is implemented for general objectives (C "
                         "outputs, losses, weight decay, batches); one mse output trained full "
                         "batch without decay uses the factor: drop backward_sources or pass "
                         "'factor' / 'auto'")
    mix = general and L >= 2 and (r_sources == "mix" or (
        r_sources == "auto" and mixing_cheaper(T1, n * Cout, Sp)))
    mem = estimate_memory_outputs(T1, n, P, L, Sp, Srp, responses, stein,
                                  4 if tdtype == np.float32 else 8, Cout, mix=mix)
    flops = R * estimate_flops_outputs(T1, n, P, L, Sp, Srp, responses, Cout, mix=mix)
    if logger is not None:
        logger.info("mc one-pass: %d populations x %d samples (%d tangent), %d steps: "
                    "~%.2g GFlop (~%.0f s at %.0f GFlop/s), %.3g GB per population%s", R, Sp,
                    Srp, steps, flops / 1e9, flops / flop_rate, flop_rate / 1e9, mem / 1e9,
                    "" if max_memory is None else f" (limit {max_memory / 1e9:.3g} GB)")
    if max_memory is not None and mem > max_memory:
        raise ValueError(
            f"the one-pass solve needs ~{mem / 2**30:.3g} GiB per replicate but "
            f"{max_memory / 2**30:.3g} GiB are available (max_memory_gb or 80% of free "
            f"memory); raise replicates (memory ~ samples / replicates x T n, and "
            f"~ response_samples / replicates x T^2 P n for the tangents) or lower samples")
    keys = ("f", "ntk", "phi", "g", "A", "B")
    acc, acc2 = {}, {}                     # running sums over populations (no R-fold stack)
    pops = []
    f_final = []                           # each population's f(T), for population_outliers
    p0 = 0
    if state is not None:
        if record_sources:
            raise ValueError("state (resume) and record_sources exclude each other")
        p0 = int(state["next"])
        if not 1 <= p0 <= R:
            raise ValueError(f"state['next'] = {p0} is not a population index in 1..{R}")
        if adaptive:
            peak = float(state["peak_lr_lambda"])
            if peak >= EDGE_OF_STABILITY:
                tblocks = 1
        acc = {k: np.array(v, dtype=np.float64) for k, v in state["acc"].items()}
        acc2 = {k: np.array(v, dtype=np.float64) for k, v in state["acc2"].items()}
        if state.get("f_final") is not None:
            f_final = list(np.asarray(state["f_final"], dtype=np.float64))
        if bar is not None:
            bar.update(p0 * T1)
        if logger is not None:
            logger.info("mc one-pass: resumed at population %d/%d", p0 + 1, R)
    with _single_thread_blas():
        for p, sp in enumerate(ss.spawn(R) if R > 1 else [ss]):
            if p < p0:
                continue
            tb = 1 if adaptive and p == 0 else tblocks
            try:
                if general:
                    o = _population_objective(
                        kx, objective, activation, L, gamma0, lr, steps, Sp, Srp, sp,
                        responses=responses, stein=stein, cv=cv, tdtype=tdtype, eps=eps,
                        src_rtol=src_rtol, stein_rtol=stein_rtol, divergence=divergence,
                        bar=bar, sampler=sampler, mix=mix, ortho=ortho, phi0=phi0, tblocks=tb)
                else:
                    o = _population(kx, y, activation, L, gamma0, lr, steps, Sp, Srp, sp,
                                    responses=responses, stein=stein, cv=cv, tdtype=tdtype,
                                    eps=eps, src_rtol=src_rtol, stein_rtol=stein_rtol,
                                    divergence=divergence, record_sources=record_sources,
                                    bar=bar, sampler=sampler, ortho=ortho, phi0=phi0,
                                    tblocks=tb)
            except FloatingPointError as exc:
                # which population, and how large: near the edge of stability the Monte Carlo
                # noise of a small population can drive it unstable where a larger one trains
                # (relu L = 3 of benchmarks/deep_cases.py: 8 x 512 samples diverge, 8 x 1024 not)
                done = f"; populations 1..{p} finished" if p > p0 else ""
                raise FloatingPointError(
                    f"{exc} (in population {p + 1} of {R}, {Sp} samples each{done})") from exc
            if adaptive and p == 0:
                peak = peak_lr_lambda(o["ntk"], P, lr)
                if peak >= EDGE_OF_STABILITY:
                    tblocks = 1                 # the later populations: one block
                if logger is not None:
                    logger.info(
                        "mc one-pass: peak lr lambda_max(K_train(t)) = %.3g in population 1 "
                        "(%s %.3g): populations 2..%d carry the tangents in %s", peak,
                        "below" if peak < EDGE_OF_STABILITY else "at or above",
                        EDGE_OF_STABILITY, R, f"{tblocks} blocks by source time"
                        if tblocks > 1 else "one block")
            for key in keys:
                if o[key] is None:
                    continue
                if p == 0:
                    acc[key] = o[key].copy()
                    if key in ("f", "ntk", "phi", "g"):
                        acc2[key] = o[key] * o[key]
                elif key in acc2:
                    _add_with_square(acc[key].reshape(-1), acc2[key].reshape(-1),
                                     o[key].reshape(-1))
                else:
                    acc[key] += o[key]
            f_final.append(np.array(o["f"][-1], dtype=np.float64))
            if record_sources:
                pops.append(o)
            if logger is not None:
                logger.info("mc population %d/%d: f(T) rms %.4g", p + 1, R,
                            float(np.sqrt(np.mean(o["f"][-1] ** 2))))
            del o
            if on_population is not None:
                st = {"next": p + 1, "acc": acc, "acc2": acc2, "f_final": np.array(f_final)}
                if adaptive:
                    st["peak_lr_lambda"] = peak
                on_population(st)
    res = {}
    for key in keys:
        if key not in acc:
            res[key] = None
            continue
        mean = acc.pop(key) / R
        res[key] = mean
        if key in acc2:
            if R > 1:
                var = np.maximum(acc2.pop(key) / R - mean * mean, 0.0) * (R / (R - 1))
                res[key + "_se"] = np.sqrt(var / R)
            else:
                res[key + "_se"] = np.zeros_like(mean)
    if record_sources:
        res["sources"] = [o["sources"] for o in pops]
        res["population_results"] = pops
    # judged over the populations whose f(T) is known (all, unless resumed from a checkpoint
    # written before f(T) was kept)
    res["population_outliers"] = population_outliers(f_final) if len(f_final) == R else []
    res.update(samples=Sp * R, response_samples=Srp * R, populations=R,
               relu_eps=eps if activation == "relu" else None, b_estimator=b_estimator,
               memory_bytes=mem, r_sources="mix" if mix else "factor",
               deep_sources=deep_sources, initial_kernels=initial_kernels,
               tangent_blocks=tblocks, peak_lr_lambda=peak)
    return res
