"""``method="mc"`` and ``method="gia"``: the nonlinear DMFT by alternating Monte Carlo.

docs/theory.rst §2. Each hidden unit of layer l is a sample of a single-site process driven by
Gaussian sources u^l ~ N(0, Phi^{l-1}) and r^l ~ N(0, G^{l+1}); the order parameters Phi^l,
G^l, the responses A^l, B^l and the predictions f are averages over samples, iterated to self
consistency (engine: :mod:`solvers.mc`, loop: :mod:`solvers.fixedpoint`).

- Two-layer networks (L = 1): no responses; all samples are marched forward together, f(t)
  read from the population at each step (no outer iteration, ``iterations = 1``). Sources by
  randomised quasi-Monte Carlo (scrambled Sobol replicates in rank(Kx) + 1 dimensions,
  ``sampler="sobol"``) or i.i.d. (``"random"``), in antithetic pairs (u, +-w0); the two-time
  kernels are computed once at the end from ``kernel_samples`` re-marched samples.
- Deep networks (L >= 2), default ``scheme="onepass"`` (:mod:`solvers.mc.causal`): the
  discrete-time DMFT is causal across layers, so all layers and samples are marched
  time-major in one pass with no outer iteration. Sources are drawn causally (u(t) from the
  causal Cholesky factor of Phi^{l-1}, extended one time block per step; innovations below
  ``src_rtol`` of a variable's variance dropped), every kernel row, response row and f(t) is
  estimated from the population as soon as it exists. Responses A by forward-mode tangents
  marched with the fields (first ``response_samples`` samples of each replicate, smoothed
  delta of width ``relu_eps`` for ReLU's phi''), with the control variate
  (``response_control``); B by tangents for smooth activations and by Stein's lemma in the
  causally whitened sources for ReLU (``b_estimator``). The one-pass values are the fixed
  point of the alternating map of the iterative solver with the same random numbers
  (tests/test_causal.py re-marches them with its machinery).
- ``scheme="iterative"`` (deep networks, kept for comparison; no known case needs it): the
  alternating solver that preceded it -- static start, common random numbers, Gauss-Seidel
  sweeps over layers, a quasi-Newton step on f -> Delta -> f and continuation in time. Its
  sources use the symmetric square root of the whole two-time kernel, so u(t) depends on Phi at
  later times and the problem needs ~20 sweeps; it reported divergence on deep problems that
  networks (and the one-pass solver) train without trouble (benchmarks/README.md).
- ``"gia"``: the same solvers with the responses forced to zero (gradient-independence
  ansatz), predictions from f(t+1) = f(t) + lr K(t) Delta(t); for L = 1 it is identical to
  ``"mc"``.

Beyond one squared-error output (docs/theory.rst §7): C outputs, the cross-entropy, logistic
and hinge losses, weight decay toward the initialisation or toward zero and mini-batch / online
schedules are solved by the two-layer march and by the one-pass deep solver
(:func:`solvers.mc.causal_objective._population_objective`: the backward fields, G, the r-sources and
the responses carry the output index; Delta(t) = Objective.delta(t, f(t)); memory terms
lr a^(t-1-s) Delta(s); toward zero the initial-weight channel -- sources and responses --
scaled by a^t). The plain problem keeps its original code path, bit for bit. With C >= 2
outputs ``A`` and ``B`` are not returned (None). ``scheme="iterative"`` refuses every new
feature (ValueError naming ``scheme="onepass"``); ``"gia"`` at depth >= 2 refuses weight decay
(its prediction update has no decay term). Checked against simulated networks extrapolated
in width: tests/test_mc_deep_objectives.py.

Barlow Twins with the NNGP output offset (issue 17, docs/theory.rst §7) by the same two
solvers, unchanged: its error signal couples all points and outputs (batch standardisation,
cross-correlation), and both solvers form Delta(t) = Objective.delta(t, f(t)) from the whole
(n, C) population estimate of f(t) -- each replicate population of the two-layer march and each
population of the one-pass solver from its own estimate -- with no per-point step on
f -> Delta -> f anywhere. The offset f0 is added inside the Objective; the solvers march the
network's own output (f(0) = 0) and ``Method.finish`` adds f0 to the reported predictions
(their standard errors are unchanged: f0 is a constant). BT without an offset is refused
(``check_start``: f = 0 is stationary). Checked against the exact deep-linear method, the
static limit and width-extrapolated networks: tests/test_mc_barlow.py.

Standard errors (``Solution.stderr``): L = 1: the ``blocks`` replicates solved as separate
populations (includes the feedback of noise through Delta). L >= 2, one pass: the spread of
``replicates`` (default samples / 1024 within [8, 16]: 16 at the default 16384 samples)
independent one-pass populations sharing the ``samples``,
divided by sqrt(replicates); the result is their mean. Each population is a complete solution
with its own order parameters and Delta, so the spread includes the propagation of the
sampling noise through the layers, the sources and the self-consistency; the standard errors
have replicates - 1 degrees of freedom (use Student-t quantiles for intervals). Their coverage
was checked against the spread over independent seeds (tests/test_causal.py, slow). L >= 2,
iterative: as before, ``replicates`` independent fixed-point solutions (default 1: batch means,
which underestimate the error several-fold).

Layout: the options, their defaults and the sample counts they resolve to are in
:mod:`dmft._mc_options`; the engines' outputs are put in the Solution layout by
:mod:`dmft._mc_layout`; this module holds the methods and the body of the solve.
"""
from __future__ import annotations

import numpy as np

from solvers.layout import two_time as _two_time
from solvers.mc import causal as _causal
from solvers.mc import two_layer as _two_layer
from solvers.objective import Objective as _Objective
from solvers import mc as _engine
from solvers import static as _static

from . import _checkpoint
from ._mc_layout import _combine_replicates, _deep_fields, _deep_objective_fields
from ._mc_options import DEFAULTS, MCOptions, _check_deep_objective, _sizes, _value
from ._method import Method
from ._progress import logger
from .results import Solution
from .specs import MLP, Dataset, GradientDescent

__all__ = ["solve_mc", "solve_gia", "DEFAULTS", "MCOptions", "MC", "GIA"]


class MonteCarlo(Method, name="mc", options=MCOptions):
    """Nonlinear DMFT of ``net`` trained on ``data`` by Monte Carlo (docs/theory.rst §2).

    Parameters
    ----------
    net, data, train : MLP, Dataset, GradientDescent
        Specification; ``train.gamma0`` must be > 0 (use ``method="static"`` for the lazy limit).
    seed : int, SeedSequence or None
        Seed of all random numbers; the same seed gives bit-identical results.
    throw : bool
        Raise :class:`~dmft.results.ConvergenceError` when the iteration did not converge
        (default) or return the result with ``converged=False``.
    samples : int
        Monte Carlo samples per layer (antithetic pairs). L = 1: rounded down to a multiple of
        2 ``blocks`` (default 65536). L >= 2, one pass: the total, split equally over the
        ``replicates`` populations, each rounded down to an even number (default 16384 =
        16 x 1024). L >= 2, iterative: per replicate, rounded up to whole chunks (default
        8192). ``options["samples"]`` has the number used.
    response_samples : int
        Samples used for the tangent estimates of A, B (L >= 2; at most ``samples``; with
        ``response_control`` only the tangents' remainder beyond first order comes from
        them). One pass: the total over the replicates, default replicates x max(4,
        samples / replicates / 64); iterative: per replicate, default 128. Tangents cost
        ~ n P^2 T^3 per sample and layer, the march ~ n^2 T^2 per sample: at large P T the
        tangents dominate and this is the knob (benchmarks/README.md).
    kernel_samples : int
        L = 1 only: samples for the two-time kernels phi, g (default 4096, taken equally
        from the replicates); predictions and NTK use all ``samples``. The kernels cost
        ~ kernel_samples (n (T+1))^2 flops (one symmetric rank-k BLAS update per chunk) and
        are computed once, after the predictions, which never need them. With C >= 2 outputs
        the (n C (T+1))^2 kernel g is accumulated per block in single precision (rounding
        ~1e-6 relative, against a sampling error ~ kernel_samples^-0.5).
    sampler : {"sobol", "random"}
        "sobol" (default) draws the first layer's sources and the readouts w(0) by randomised
        quasi-Monte Carlo in the rank(Kx) + 1 dimensions (L = 1: an Owen-scrambled Sobol set
        per block; L >= 2: a randomly digitally shifted Sobol set per replicate; a smaller
        standard error of f at equal cost, benchmarks/README.md); "random" draws i.i.d.
        normals.
        Both use antithetic pairs (u, +-w0); for the deeper sources see ``deep_sources``.
    deep_sources : {"orthogonal", "normal"}
        L >= 2, one pass: the innovations of the deeper layers' causal sources (u^l for
        l >= 2, r^l for l < L). "orthogonal" (default): moment-matched in each replicate
        (centred and orthogonalised over its samples, so the sampled sources have exactly the
        covariance they are drawn for), i.i.d. once there are more innovations than
        antithetic pairs; about half the variance of the predictions at equal cost
        (benchmarks/README.md). "normal": i.i.d. normals (the estimator before 5 Dec 2026).
    tangent_blocks : "adaptive" (default), "auto" or int >= 1
        L >= 2, one pass: the tangent directions of source time s are carried by the block
        s mod m of ``response_samples / replicates`` samples, so that response entries of
        different source times come from different samples (each still the average of that
        many exact derivatives, at the same cost). A sample's derivatives for all source
        times are strongly correlated: where training is stable the march reads sums of them
        and blocks give 2-4x less variance of the predictions at equal cost; where training
        passes the edge of stability (a catapult: lr lambda_max(K_train(t)) peaks well above
        2) their noise cancels in what the march reads and blocks give 1.7-5x more
        (benchmarks/README.md). "auto": one block per source time, T + 1, where the replicate
        holds that many; 1: one set of samples for every direction. "adaptive" (default):
        the first replicate with one block; the others with "auto"'s blocks if that
        replicate's peak lr lambda_max(K_train(t)) is below 2.5, else with one block (one
        block for general objectives and for one replicate). The number the later replicates
        used is recorded in ``options["tangent_blocks"]``, the peak in
        ``options["peak_lr_lambda"]``, the rule in ``options["tangent_blocks_rule"]``.
    initial_kernels : {"exact", "sampled"}
        L >= 2, one pass: the kernels Phi^{l-1}(0, 0) the deeper sources u^l(0) are drawn
        with. "exact" (default): the NNGP kernels at initialisation, known in advance (closed
        forms or quadrature); the t = 0 innovations are mapped so that u^l(0) has exactly that
        covariance, the later rows by the same map (docs/theory.rst §2): 1.2-1.4x less variance
        of the predictions at equal cost (benchmarks/README.md). "sampled": the population's
        own estimates (the estimator before 6 Dec 2026).
    damping : float in (0, 1]
        Weight of the new estimate in the mixing (default 1: plain Gauss-Seidel iteration;
        halved automatically, not below 0.25, when the residual stalls).
    anderson : int
        Anderson mixing history (default 0: plain damping).
    tol, noise_factor : float
        Stop when the residual is below max(tol, noise_factor * Monte Carlo floor)
        (defaults 1e-4, 0.25). The residual is max|f' - f| and, per kernel, the largest
        change relative to the kernel's largest entry.
    max_iter : int
        Iteration limit (default 60).
    blocks : int
        L = 1: independent replicates / populations for the standard errors (default 8; 1
        disables). With "sobol" each replicate is an independently scrambled point set.
    chunk_mb : float
        Memory per streamed chunk of samples (default 64 MB).
    relu_eps : float
        Width of the smoothed delta for ReLU's phi'' in the tangents of A (default
        ``0.3 * max(response_samples, 2048) ** -0.2``).
    b_estimator : {"auto", "tangent", "stein"}
        How B^{l-1} = gamma0^{-1} <dg^l / du^l> is estimated (L >= 2). "tangent": per-sample
        forward-mode tangents (``response_samples`` samples). "stein": Stein's lemma in the
        causally whitened sources, B = gamma0^{-1} <g xi^T> L^{-1} with u = L xi, from all
        ``samples`` samples (:func:`solvers.mc.stein_finish`): unbiased for every activation,
        ReLU's delta included, noisier per sample but much cheaper (no tangents). "auto"
        (default): "stein" for relu, "tangent" otherwise. Elementwise, a Stein B is noisy
        where the source kernel is ill-conditioned (entries can be far larger than the true
        ones); applied to features, as the dynamics use it, it is accurate.
    response_control : bool
        Control variate for the tangent responses (default True;
        :func:`solvers.mc.response_control`): the first-order terms of the tangents,
        A^l ~ C (.) <phi'(h) phi'(h)^T> and B^{l-1} ~ gamma0^{-1} diag<phi''(h) z>
        + D (.) <phi'(h) phi'(h)^T>, are averaged over all ``samples`` (they cost one GEMM
        per chunk, like the kernels) and only the remainder comes from the
        ``response_samples`` tangents. Unbiased; the remainder's variance is an order of
        magnitude or more below the tangents' (benchmarks/README.md).
    stein_rtol : float
        "stein" only: a source whose innovation variance (given the earlier ones in time) is
        below this fraction of its variance gets no innovation of its own (default 1e-6;
        its share of the fields is below sqrt(stein_rtol)).
    window : int
        First time horizon of the continuation in time (default 10): horizons
        max(window, steps/2^k) are solved in turn, each started from the previous one.
    replicates : int
        L >= 2 only: number of independent solutions (independent seeds). The result is their
        mean and ``stderr`` their standard error of the mean, which includes the propagation
        of sampling noise through the layers and the self-consistency. One pass: populations
        marched one after the other, which share ``samples``; default ``samples`` / 1024
        clipped to [8, 16] (16 at the default 16384 samples; below ~1024 samples per
        population their fixed per-step cost weighs, and 8 are 14-19 % faster than 16 at
        4096-8192 samples, at the same variance per sample, with standard errors of 7
        instead of 15 degrees of freedom; benchmarks/README.md). Where the training reaches
        the edge of stability (peak lr lambda_max(K_train(t)) near 2; the solve logs it) the
        late-time errors fall with the number of populations, not their size: prefer more
        populations of >= 8192 samples (>= 16384 past a catapult, where smaller ones are
        biased). Iterative: each with
        ``samples`` and ``response_samples`` (the cost is ``replicates`` times one solve),
        default 1 (one solve, batch-means standard errors that underestimate the error
        several-fold; see the module docstring).
    scheme : {"onepass", "iterative"}
        L >= 2: the causal one-pass solver (default) or the alternating fixed-point iteration
        (``damping``, ``anderson``, ``tol``, ``noise_factor``, ``max_iter``, ``window``,
        ``callback`` apply to it only; passing them with "onepass" is an error). Every option
        declares the regimes it applies to (two-layer march, one pass, iterative:
        ``MCOptions.for_regime``); one given for another regime raises ValueError.
    src_rtol : float
        One pass: a source variable whose innovation variance (given the earlier ones) is below
        this fraction of its variance gets no innovation of its own (default 1e-6; smaller
        values let near-degenerate pivots compound and the factor lose accuracy, which is
        detected and reported).
    backward_sources : {"auto", "factor", "mix"}
        One pass, general objectives (C outputs, losses, weight decay, batches): how the
        backward sources r^l are drawn. "factor": from the causal factor of G^{l+1}; "mix": by
        a fixed Gaussian mixing of the samples of g^{l+1} within the replicate, which has
        exactly the same law (docs/theory.rst §2) at ~T n C S^2 flops for S samples per
        replicate, cheaper than the factor's ~(T n C)^2 S when n C T exceeds S (many
        outputs); then the result's two-time G rows are computed in single precision
        (rounding ~1e-6 relative). "auto" (default): whichever costs fewer flops. The plain
        problem (one mse output, full batch, no decay) always uses "factor".
    max_memory_gb : float
        One pass: refuse (ValueError, before any work) a solve whose estimated memory per
        replicate exceeds this (default: ``memory_limit``, else 80 % of the memory available
        now). The estimate and a flop count are logged at INFO level. The whole solve (result
        arrays included) is checked against ``memory_limit=`` (GB), a keyword of every method.
    checkpoint : str or os.PathLike
        One pass only: a file (e.g. ``"run.ckpt.npz"``) written atomically after each finished
        replicate (the running sums and the next replicate's index: ~(6L - 2) ((T+1) n)^2 float64).
        If it exists, the solve resumes from it and the result is bit-identical to an
        uninterrupted one; at most one replicate's work (1 / ``replicates`` of the solve) is
        lost to an interruption (more replicates: finer checkpoints at the same cost, but
        another result). A file of another problem, other options or another seed is
        refused (ValueError). Removed when the solve finishes. Not for depth 1 (seconds) or
        ``scheme="iterative"`` (ValueError). dmft/_checkpoint.py.
    callback : callable
        ``callback(iteration, state, residual)`` after each iteration (L >= 2); return True
        to stop.
    progress : bool or None
        Progress bar (None: on a terminal).

    Returns
    -------
    Solution
        With ``A``, ``B`` (L-1, T+1, T+1, n, n) for L >= 2 (None with C >= 2 outputs) and
        ``stderr`` for ``train_predictions``, ``test_predictions``, ``ntk``, ``phi``, ``g``
        (with C >= 2 outputs the prediction, NTK and G fields carry output axes,
        dmft/results.py). Every training objective of docs/theory.rst §7 (outputs, losses,
        Barlow Twins with ``output_offset="nngp"``, weight decay, batches) is solved by the
        two-layer march and the one-pass deep solver; ``scheme="iterative"`` refuses them.
        With an output offset the predictions include f0 (``extras["output_offset"]``).
        With the hinge loss ``extras["hinge_margin_z"]`` is the smallest distance of a
        training margin y f(t) from 1 in standard errors (a warning below 3). One pass:
        ``extras["population_outliers"]`` (0-based) names populations whose final
        predictions lie more than 10 times farther from the populations' median than the
        typical population's (a logged warning; they stay in the mean and the standard
        errors).
    """

    description = ("nonlinear DMFT by Monte Carlo sampling of the single-site fields (one causal "
                   "pass)")

    responses = True

    #: docs/theory.rst §7, every feature (Barlow Twins and the output offset included): the
    #: two-layer march and the one-pass deep solver solve them all; ``scheme="iterative"``
    #: refuses them (and ``"gia"`` at depth >= 2 refuses weight decay) with a ValueError
    #: naming the fix
    supports = frozenset({"outputs", "losses", "hinge", "weight_decay", "decay_to_zero",
                          "batches", "barlow_twins", "output_offset"})

    def estimate(self, net, data, train, *, opts):
        from ._mc_estimate import estimate_mc
        return estimate_mc(net, data, train, opts, self.name, self.responses)

    def run(self, ctx, net, data, train, *, opts) -> Solution:
        return _solve(ctx, net, data, train, opts, self.name, self.responses)


class GradientIndependence(MonteCarlo, name="gia"):
    """Gradient-independence approximation: ``method="mc"`` with A = B = 0 (docs/theory.rst §4).

    Same options as :class:`MonteCarlo` (``response_samples`` is ignored). ``A`` and ``B``
    are None; ``options["gia"]`` is True. For L = 1 (no responses) the result equals
    ``method="mc"`` with the same seed. At depth >= 2 weight decay is refused: the ansatz's
    update f(t+1) = f(t) + lr K(t) Delta(t) has no decay term (docs/theory.rst §7).
    """

    description = "gradient-independence approximation: the Monte Carlo DMFT with A = B = 0"

    responses = False

    def parse_options(self, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("response_samples", None)
        return super().parse_options(kwargs)


MC = MonteCarlo()
GIA = GradientIndependence()


#: ``solve_mc(net, data, train, *, seed=None, throw=True, progress=None, **options)``
solve_mc = MC


#: ``solve_gia(net, data, train, *, seed=None, throw=True, progress=None, **options)``
solve_gia = GIA


#: peak lr lambda_max(K_train(t)) from which a one-pass solve logs the edge-of-stability advice
#: (:func:`_edge_of_stability_advice`); gradient descent on the squared error is stable below 2
EDGE_ADVICE = 1.9


def _edge_of_stability_advice(ntk, lr: float, P: int, replicates: int, per_rep: int):
    """Log how to spend samples when the training reaches the edge of stability (peak lr
    lambda_max(K_train(t)) >= EDGE_ADVICE): there each population's late kernels and
    predictions oscillate with period 2 and a random phase, as width-N networks' do, so their
    late-time standard errors fall with the number of populations, not with the samples in
    each; past a catapult (peak >= 2.5) small populations are biased instead. Measured in
    benchmarks/README.md ("More populations at the edge of stability"). The peak is that of
    the populations' mean NTK ``ntk`` (T1, n, n): a single population's is noisier (relu L = 3
    at the default 16 x 1024 samples: 2.54 in the first population, 2.16 in the mean; the
    means of 2^19-sample solves 2.07-2.15)."""
    peak = float(_static.peak_lr_lambda(ntk, P, lr))
    if not np.isfinite(peak) or peak < EDGE_ADVICE:
        return
    if peak < _causal.EDGE_OF_STABILITY:
        logger.info(
            "mc one-pass: the training reaches the edge of stability (peak lr "
            "lambda_max(K_train(t)) = %.3g): the populations' late kernels and predictions "
            "oscillate with period 2 and random phase, so their late-time standard errors "
            "fall with the number of populations (replicates = %d, %d samples each), not with "
            "the samples in each. For tighter late-time answers prefer more populations of "
            ">= 8192 samples (relu L = 3: 64 x 8192 against 16 x 32768 samples cut the "
            "prediction error 4x, the NTK's 2x; benchmarks/README.md)", peak, replicates,
            per_rep)
    else:
        logger.info(
            "mc one-pass: the training passes the edge of stability (peak lr "
            "lambda_max(K_train(t)) = %.3g, a catapult): populations carry a "
            "finite-population bias like finite-width networks' (tanh L = 3, gamma0 = 2: "
            "the NTK 6 %% off with 4096 samples per population, 3 %% with 16384); keep "
            ">= 16384 samples per population (now %d x %d; benchmarks/README.md)", peak,
            replicates, per_rep)


def _objective_fingerprint(train) -> dict:
    """The checkpoint items of the Barlow Twins options and the output offset (only where they
    matter, so that the fingerprints of the other problems are unchanged)."""
    items = {}
    if train.loss == "barlow_twins":
        items.update(off_diagonal=float(train.off_diagonal),
                     standardize=bool(train.standardize))
    if getattr(train, "output_offset", "none") != "none":
        items.update(output_offset=train.output_offset,
                     offset_scale=float(train.offset_scale),
                     offset_seed=int(train.offset_seed))
    return items


def _solve(ctx, net: MLP, data: Dataset, train: GradientDescent, opts: MCOptions,
           method: str, responses: bool) -> Solution:
    """The body of ``method="mc"`` / ``"gia"``: defaults, the solver for the depth, result."""
    if train.gamma0 <= 0:
        raise ValueError(f"gamma0 must be > 0 for method={method!r} (got {train.gamma0}); "
                         f"use method='static' for the lazy limit gamma0 = 0")
    L, P, Q, T = net.depth, data.P, data.Q, train.steps
    n, T1 = P + Q, T + 1
    def value(name, default_key=None):
        return _value(opts, name, default_key)

    sz = _sizes(net, opts)
    scheme, onepass = sz.scheme, sz.onepass
    regime = "two_layer" if L == 1 else scheme
    if opts.checkpoint is not None and regime != "onepass":
        raise ValueError(
            f"checkpoint= is supported by the one-pass deep solver only (depth >= 2, "
            f"scheme='onepass'), not by {opts.REGIMES[regime]}: "
            + ("a two-layer solve takes seconds" if L == 1 else
               "scheme='iterative' is kept for comparison only") + "; drop checkpoint=")
    given = opts.inapplicable(regime)
    if given and regime == "onepass" and set(given) <= set(opts.for_regime("iterative")):
        raise ValueError(f"option(s) {given} belong to the iterative deep solver; "
                         f"the default one-pass solver (scheme='onepass') has no outer "
                         f"iteration. Drop them, or pass scheme='iterative'")
    if given:
        raise ValueError(f"option(s) {given} do not apply to {opts.REGIMES[regime]}; its "
                         f"options are {list(opts.for_regime(regime))}; drop them")
    if L >= 2:
        _check_deep_objective(data, train, scheme, method, responses)
    samples, replicates = sz.samples, sz.replicates
    if samples < 2:
        raise ValueError("samples must be >= 2 (antithetic pairs); use e.g. samples=4096")
    src_rtol = value("src_rtol")
    backward_sources = value("backward_sources")
    max_memory_gb = opts.max_memory_gb
    response_samples = value("response_samples")
    kernel_samples = value("kernel_samples")
    if L == 1 and kernel_samples < 2:
        raise ValueError(f"kernel_samples must be >= 2 (an antithetic pair for the two-time "
                         f"kernels), got {kernel_samples}; use e.g. kernel_samples=4096")
    damping, anderson, tol = value("damping"), value("anderson"), value("tol")
    noise_factor, max_iter = value("noise_factor"), value("max_iter")
    blocks, chunk_mb, window = value("blocks"), value("chunk_mb"), value("window")
    per_rep, tang_rep = sz.per_rep, sz.tang_rep
    if onepass and per_rep < 2:
        raise ValueError(f"samples={samples} is too few for replicates={replicates}: each "
                         f"replicate needs an antithetic pair; use samples >= "
                         f"{2 * replicates} or fewer replicates")
    relu_eps = opts.relu_eps
    b_estimator, stein_rtol = value("b_estimator"), value("stein_rtol")
    response_control = value("response_control")
    callback = opts.callback
    sampler = value("sampler")
    deep_sources = value("deep_sources")
    initial_kernels = value("initial_kernels")
    tangent_blocks = value("tangent_blocks")
    ss, seed_int = ctx.seed_sequence, ctx.seed_int


    kx = data.kx
    y = np.asarray(data.y_train, dtype=np.float64)
    options = {"samples": int(samples), "damping": damping, "anderson": int(anderson),
               "tol": tol, "noise_factor": noise_factor, "max_iter": int(max_iter),
               "chunk_mb": chunk_mb, "gia": not responses,
               "seed_entropy": str(ss.entropy), "seed_spawn_key": list(ss.spawn_key)}
    try:
        if L == 1:
            # docs/theory.rst §7: C outputs, any loss, weight decay and batches by the same
            # population march (solvers.mc.two_layer.solve_two_layer_objective); the plain
            # problem keeps its original engine (bit-for-bit)
            objective = _Objective.from_specs(data, train, net)
            bar = ctx.bar(T, f"dmft {method} (two-layer march)", unit="step")
            try:
                if objective.plain:
                    out = _engine.solve_two_layer(kx, y, net.activation, train.gamma0,
                                                  train.lr, T, samples=samples, seed=ss,
                                                  kernel_samples=kernel_samples,
                                                  blocks=blocks if blocks >= 2 else 0,
                                                  sampler=sampler, bar=bar)
                else:
                    out = _two_layer.solve_two_layer_objective(
                        kx, objective, net.activation, train.gamma0, train.lr, T,
                        samples=samples, seed=ss, kernel_samples=kernel_samples,
                        blocks=blocks if blocks >= 2 else 0, sampler=sampler, bar=bar)
            finally:
                bar.close()
            logger.info("%s two-layer march: %d samples, %d steps", method, out["samples"], T)
            converged, iterations, residuals = True, 1, np.zeros(0)
            options.update(samples=int(out["samples"]), kernel_samples=int(out["kernel_samples"]),
                           blocks=int(blocks), sampler=sampler)
            A = B = None
            if objective.plain:
                phi = _two_time(out["phi"], T1, n)[None]
                g = _two_time(out["g"], T1, n)[None]
                phi_se = _two_time(out["phi_se"], T1, n)[None]
                g_se = _two_time(out["g_se"], T1, n)[None]
            else:
                C = objective.C
                phi = _two_time(out["phi"], T1, n)[None]
                phi_se = _two_time(out["phi_se"], T1, n)[None]
                # flat index (t n + mu) C + c -> (t, s, mu, c, nu, c')
                g, g_se = (np.ascontiguousarray(
                    out[k].reshape(T1, n, C, T1, n, C).transpose(0, 3, 1, 2, 4, 5))[None]
                    for k in ("g", "g_se"))
                if not data.multi_output:
                    # one output (logistic, hinge, or mse with decay / batches): the
                    # single-output shapes (dmft/results.py)
                    g, g_se = g[..., 0, :, 0], g_se[..., 0, :, 0]
                    out = dict(out, f=out["f"][..., 0], f_se=out["f_se"][..., 0],
                               ntk=out["ntk"][:, :, 0, :, 0],
                               ntk_se=out["ntk_se"][:, :, 0, :, 0])
            extras = {}
            if "margin_z" in out:
                extras["hinge_margin_z"] = np.float64(out["margin_z"])
                if out["margin_z"] < 3.0:
                    logger.warning(
                        "%s (hinge loss): the margin of training point %d at step %d is "
                        "%.2g standard errors from 1; the error signal y 1[y f < 1] switches "
                        "there, so later predictions may be off by more than their standard "
                        "errors; increase samples", method, out["margin_point"],
                        out["margin_step"], out["margin_z"])
        elif onepass:
            # per replicate; default: the run's memory_limit (set by the skeleton's preflight)
            limit = max_memory_gb * 1e9 if max_memory_gb is not None else ctx.memory_limit
            # docs/theory.rst §7: C outputs, any loss, weight decay and batches; the plain
            # problem keeps its original march (bit-for-bit)
            deep_obj = _Objective.from_specs(data, train, net)
            ckpt = state = None
            if opts.checkpoint is not None:
                ckpt = _checkpoint.Checkpoint(
                    opts.checkpoint, f"{method}-onepass", kx=kx, y=y,
                    activation=net.activation, depth=L, gamma0=train.gamma0, lr=train.lr,
                    steps=T, samples=per_rep * replicates, replicates=replicates,
                    responses=responses, response_samples=tang_rep * replicates,
                    b_estimator=b_estimator, response_control=bool(response_control),
                    relu_eps=relu_eps, src_rtol=src_rtol, stein_rtol=stein_rtol,
                    sampler=sampler, deep_sources=deep_sources,
                    initial_kernels=initial_kernels, tangent_blocks=tangent_blocks, seed=ss,
                    loss=train.loss,
                    backward_sources=backward_sources,
                    weight_decay=float(train.weight_decay), decay_to=train.decay_to,
                    batch_size=train.batch_size, batch_seed=int(train.batch_seed),
                    schedule=train.schedule, **_objective_fingerprint(train))
                state = ckpt.load()
                if state is not None:
                    state = {"next": state[1]["next"],
                             "peak_lr_lambda": state[1].get("peak_lr_lambda"),
                             "acc": {k[4:]: v for k, v in state[0].items() if k[:4] == "acc."},
                             "acc2": {k[5:]: v for k, v in state[0].items()
                                      if k[:5] == "acc2."},
                             "f_final": state[0].get("f_final")}

            def on_population(st):
                arrays = {f"acc.{k}": v for k, v in st["acc"].items()}
                arrays.update({f"acc2.{k}": v for k, v in st["acc2"].items()})
                arrays["f_final"] = st["f_final"]
                meta = {"next": int(st["next"]), "replicates": int(replicates)}
                if "peak_lr_lambda" in st:
                    meta["peak_lr_lambda"] = float(st["peak_lr_lambda"])
                ckpt.save(arrays, meta)

            bar = ctx.bar(T1 * replicates, f"dmft {method} (one pass)", unit="step")
            try:
                out = _causal.solve_causal(
                    kx, y, net.activation, L, train.gamma0, train.lr, T,
                    samples=per_rep * replicates, seed=ss, populations=replicates,
                    responses=responses, response_samples=tang_rep * replicates,
                    b_estimator=b_estimator, response_cv=bool(response_control),
                    relu_eps=relu_eps, src_rtol=src_rtol, stein_rtol=stein_rtol,
                    sampler=sampler, max_memory=limit, logger=logger, bar=bar, state=state,
                    on_population=on_population if ckpt is not None else None,
                    objective=deep_obj, r_sources=backward_sources,
                    deep_sources=deep_sources, initial_kernels=initial_kernels,
                    tangent_blocks=tangent_blocks)
            finally:
                bar.close()
            if ckpt is not None:
                ckpt.remove()
            converged, iterations, residuals = True, 1, np.zeros(0)
            options.update(samples=int(out["samples"]),
                           response_samples=int(out["response_samples"]),
                           relu_eps=out["relu_eps"], replicates=int(replicates),
                           b_estimator=out["b_estimator"], stein_rtol=stein_rtol,
                           src_rtol=src_rtol, response_control=bool(response_control),
                           scheme="onepass", sampler=sampler,
                           deep_sources=deep_sources, initial_kernels=initial_kernels,
                           tangent_blocks=int(out["tangent_blocks"]),
                           tangent_blocks_rule=str(tangent_blocks),
                           peak_lr_lambda=(None if out["peak_lr_lambda"] is None
                                           else float(out["peak_lr_lambda"])),
                           backward_sources=out["r_sources"])
            if ckpt is not None:
                # populations read back from the checkpoint, not recomputed
                options["resumed_units"] = int(state["next"]) if state is not None else 0
            for key in ("damping", "anderson", "tol", "noise_factor", "max_iter"):
                options.pop(key, None)
            if deep_obj.plain:
                phi, g, phi_se, g_se, A, B = _deep_fields(out, T1, n)
            else:
                out, phi, g, phi_se, g_se, A, B = _deep_objective_fields(
                    out, T1, n, deep_obj.C, data.multi_output)
            extras = {"memory_estimate_bytes": np.int64(out["memory_bytes"])}
            if out.get("population_outliers"):
                # one population far from the others (solvers.mc.causal.population_outliers):
                # kept in the mean and the standard error, which it inflates; named here
                worst = out["population_outliers"]
                extras["population_outliers"] = np.array([p for p, _ in worst], dtype=np.int64)
                logger.warning(
                    "%s: population(s) %s of %d end far from the others (largest: %.3g times "
                    "the typical population's distance from their median); Monte Carlo noise "
                    "near the edge of stability (peak lr lambda_max(K_train) %.3g) can drive a "
                    "small population unstable. "
                    "The mean and the standard errors include it; raise samples (more per "
                    "replicate) for a trustworthy answer", method,
                    ", ".join(str(p + 1) for p, _ in worst), int(replicates), worst[0][1],
                    float("nan") if out["peak_lr_lambda"] is None else out["peak_lr_lambda"])
            if deep_obj.plain and int(replicates) > 1:
                _edge_of_stability_advice(out["ntk"], train.lr, P, int(replicates), per_rep)
            if train.loss == "hinge" and T:
                # the error signal y 1[y f < 1] switches where a margin crosses 1: a margin
                # within a few standard errors of 1 makes later steps sensitive to the noise
                # (each replicate switches on its own, so the spread still shows it)
                yv = np.asarray(data.y_train, dtype=np.float64).reshape(P)
                zm = (np.abs(yv[None, :] * out["f"][:T, :P] - 1.0)
                      / np.maximum(out["f_se"][:T, :P], 1e-300))
                step, point = np.unravel_index(int(np.argmin(zm)), zm.shape)
                extras["hinge_margin_z"] = np.float64(zm[step, point])
                if zm[step, point] < 3.0:
                    logger.warning(
                        "%s (hinge loss): the margin of training point %d at step %d is %.2g "
                        "standard errors from 1; the error signal y 1[y f < 1] switches there, "
                        "so later predictions may be off by more than their standard errors; "
                        "increase samples", method, point, step, zm[step, point])
        else:
            st = _static.static_kernels(net.activation, kx, L)
            f0 = _static.frozen_dynamics(st["ntk"], y, train.lr, T)
            if not np.all(np.isfinite(f0)) or np.abs(f0).max() > 1e6:
                raise FloatingPointError("the static-NTK dynamics that start the iteration "
                                         "diverge; lr is too large")
            bar = ctx.bar(max_iter * replicates, f"dmft {method}")
            try:
                # replicates = 1: the seed itself (bit-identical to earlier versions)
                seeds = [ss] if replicates == 1 else ss.spawn(replicates)
                reps = []
                for k, sk in enumerate(seeds):
                    o = _engine.solve_deep(
                        kx, y, net.activation, L, train.gamma0, train.lr, T, samples=samples,
                        seed=sk, phi0=st["phi"], g0=st["g"], f0=f0, responses=responses,
                        response_samples=response_samples, damping=damping,
                        anderson=anderson, tol=tol, noise_factor=noise_factor,
                        max_iter=max_iter, chunk_mb=chunk_mb, relu_eps=relu_eps,
                        window=window, b_estimator=b_estimator, stein_rtol=stein_rtol,
                        response_cv=bool(response_control), callback=callback,
                        logger=logger, bar=bar)
                    if replicates > 1:
                        logger.info("%s replicate %d of %d: %d iterations", method, k + 1,
                                    replicates, o["iterations"])
                    reps.append(o)
            finally:
                bar.close()
            out = _combine_replicates(reps)
            converged, iterations = out["converged"], out["iterations"]
            residuals = out["residuals"]
            options.update(samples=int(out["samples"]),
                           response_samples=int(out["response_samples"]),
                           relu_eps=out["relu_eps"], window=int(window),
                           replicates=int(replicates), b_estimator=out["b_estimator"],
                           stein_rtol=stein_rtol, response_control=bool(response_control),
                           scheme="iterative")
            phi, g, phi_se, g_se, A, B = _deep_fields(out, T1, n)
            extras = {"noise_floors": out["floors"]}
            if out.get("stages"):
                extras["stages"] = np.asarray(out["stages"], dtype=np.int64)
            if replicates > 1:
                extras["replicate_iterations"] = np.asarray(out["replicate_iterations"],
                                                            dtype=np.int64)
    except (FloatingPointError, np.linalg.LinAlgError) as exc:
        # no trajectory survives an overflow inside the engine: the partial result is NaN
        # (status "diverged"; the skeleton raises it on exc.result or returns it, throw=)
        # with C >= 2 outputs the prediction, NTK and G fields carry output axes
        oc = (data.C,) if data.multi_output else ()
        nan = np.full((T1, n) + oc, np.nan)
        nan_k = np.full((L, T1, T1, n, n), np.nan)
        sol = Solution(net=net, data=data, train=train, method=method, t=train.times,
                       train_predictions=nan[:, :P].copy(), test_predictions=nan[:, P:].copy(),
                       ntk=np.full((T1, n) + oc + (n,) + oc, np.nan), phi=nan_k,
                       g=np.full((L, T1, T1, n) + oc + (n,) + oc, np.nan),
                       converged=False, iterations=0, seed=seed_int, options=options)
        return sol.fail("diverged", (
            f"method={method!r} diverged: {exc}. The fields blow up when gamma0 or lr is too "
            f"large; reduce lr (or gamma0). Feature learning grows the NTK, so lr can exceed "
            f"2 / lambda_max(K(t)) during training (edge of stability) even below the static "
            f"method's stable rate 2 / lambda_max(K(0)); dmft.simulate shows whether finite "
            f"networks catapult there. Near that edge the Monte Carlo noise of a small "
            f"population can also drive it unstable where a larger one trains: if the "
            f"networks train, raise samples (more per replicate) before lowering lr"))

    f = out["f"]
    stderr = {"train_predictions": out["f_se"][:, :P], "test_predictions": out["f_se"][:, P:],
              "ntk": out["ntk_se"], "phi": phi_se, "g": g_se}
    sol = Solution(net=net, data=data, train=train, method=method, t=train.times,
                   train_predictions=np.ascontiguousarray(f[:, :P]),
                   test_predictions=np.ascontiguousarray(f[:, P:]), ntk=out["ntk"], phi=phi,
                   g=g, A=A, B=B, converged=bool(converged), iterations=int(iterations),
                   residuals=np.asarray(residuals, dtype=np.float64), stderr=stderr,
                   seed=seed_int, options=options, extras=extras)
    if not all(np.all(np.isfinite(a)) for a in (f, out["ntk"], phi, g)):
        return sol.fail("diverged", f"method={method!r} produced non-finite values; gamma0 or "
                                    f"lr is too large")
    if not converged:
        floor = out["floors"][-1] if "floors" in out else 0.0
        sol.fail("not_converged", (
            f"method={method!r} did not converge in {iterations} iterations: last residual "
            f"{residuals[-1]:.3g} (stop rule max(tol={tol:g}, {noise_factor:g} x noise "
            f"floor {floor:.3g})); increase max_iter, lower damping, or raise tol"))
    return sol
