"""``dmft.fluctuations``: O(1/width) fluctuations around an infinite-width solution.

Theory: docs/theory.rst §5.

An adapter: validates the options, turns the Solution into arrays (the error signal
Delta(t) = y - f(t) on the training points, the input kernel Phi^0), calls an engine from
:mod:`solvers.fluct` and wraps the result in a :class:`~dmft.results.Fluctuations`.

Methods (``method=``):

``"propagator"``
    Two-layer networks (L = 1), any smooth activation, any gamma0 > 0: single-site samples
    marched under the solution's Delta(t); N Cov(f) = (I + J E)^{-1} kappa (I + J E)^{-T} with
    J = d<O>/dDelta from forward-mode tangents and kappa the single-site covariance (it contains
    the initial-output variance Phi^1 / gamma0^2 unless ``center=True``). Monte Carlo standard
    errors by batch means. With ``times`` (or ``response_samples`` / ``sampler``) the adjoint
    engine (:func:`solvers.fluct.propagator_times.two_layer_propagator_times`): only the selected
    rows of J, each observable's influence psi_o = o - <o> - w_o . (E e) with the adjoint row
    w_o = (I + E J)^-T J_o^T, J from a subsample (``response_samples``, default 1 in 8),
    scrambled-Sobol samples by default; the same estimand, at a fraction of the cost.
``"lazy"``
    The gamma0 -> 0 universal form: frozen random kernel, linear dynamics; exact moments for
    linear networks, sampled otherwise (any activation, ReLU included). Uses only the t = 0 NTK
    of the solution (and recomputes the frozen-kernel Delta(t) from it).
``"linear-exact"``
    Two-layer linear networks: the exact finite-width moment closure linearised in the
    (Wishart) initial moments; no sampling, no DMFT propagator (an independent route).
``"deep-linear"``
    Linear networks of any depth: the exact propagator (I - D)^{-1} kappa (I - D)^{-T} over
    all order parameters (Phi^l, G^l, the responses a^l, b^l and f), with D from
    reverse-mode differentiation of the causal deep-linear fixed point and kappa the Wick
    cumulants of the Gaussian unit, including the formal (MSR) cumulants of the response
    order parameters (:mod:`solvers.fluct.deep_linear`). No sampling. At depth 1 it equals
    ``"linear-exact"`` to rounding.
``"deep-propagator"``
    Deep networks (depth >= 2) with a smooth activation (tanh, erf; linear as a check): the
    same propagator with sampled single-site fields (:mod:`solvers.fluct.deep_mc`): the adjoint
    rows d obs / dE of the linearised Monte Carlo single-site map (PyTorch, sources
    reparameterised, responses by Stein's lemma) come from ONE batched backward pass through
    the map's causal recursion (:mod:`solvers.fluct.deep_causal`), and kappa, with the formal
    MSR cumulants of the response order parameters, from forward-mode directional
    derivatives of each layer's march (:mod:`solvers.fluct.kappa_stein`, no per-sample
    Hessians). Reduces to ``"deep-linear"`` for linear networks (a test). Standard errors:
    batch means of kappa's samples (not the map's sampling). Cost grows with the number of
    observables: ``times=[T]`` (the last step) is the fast way to the end of training.
    The solution must be a fixed point of the sampled map at the given training (checked:
    ``options["fixed_point_gap"]``).
``"auto"``
    ``"lazy"`` for a ``method="static"`` solution or gamma0 = 0, ``"linear-exact"`` for a
    two-layer linear network, ``"deep-linear"`` for a deeper linear one,
    ``"deep-propagator"`` for a deep nonlinear one, else ``"propagator"``.

Beyond one squared-error output (docs/theory.rst §7). Each method's ``supports`` lists what
it handles; anything else is refused with a ValueError before any work, naming a method
that handles it:

- ``"propagator"``: C outputs, cross-entropy and logistic losses, weight decay toward the
  initialisation and toward zero, mini-batches. The loss enters through its Jacobian
  d Delta / d f (``Objective.jacobian``; -I for mse): N Cov(f) = (I - J D E)^{-1} kappa
  (I - J D E)^{-T}; weight decay through the per-unit march (exact at L = 1).
- ``"deep-linear"``: the same, over the flattened (t, c) backward index; toward zero the
  initial-weight channel (sources and the responses to them) carries a^t.
- ``"lazy"``: C outputs, those losses, decay toward the initialisation, batches
  (f = f(0) + K alpha, alpha(t+1) = a alpha(t) + lr Delta(t)); depth > 1 only for one
  output of a linear network. Decay toward zero has no lazy limit (refused).
- ``"linear-exact"``, ``"deep-propagator"``: the original problem only (``"auto"`` picks
  ``"deep-linear"`` for a two-layer linear network beyond it).
- the hinge loss: refused everywhere (its kink y f = 1 moves with the fluctuations, a
  delta term the linearisations miss, like ReLU's phi'').

With C >= 2 outputs ``prediction_cov``, ``ntk_var`` and their ``stderr`` have shape
(T+1, n, C, n, C) (``extras["prediction_cov_two_time"]`` (T+1, T+1, n, C, n, C)), per
dmft/results.py; with one output every shape is as before, and the original problem (mse,
C = 1, full batch, no decay) runs the original code paths (numbers unchanged).

The reference two-layer solution the tests and the benchmark linearise around is in
:mod:`dmft._two_layer` (``solve_two_layer``; every objective).

Layout: the options of each method are in :mod:`dmft._fluct_options`, the skeleton every
method shares (:class:`FluctuationMethod`) in :mod:`dmft._fluct_base`, ``"propagator"`` and
``"lazy"`` in :mod:`dmft._fluct_two_layer`; this module holds ``"deep-propagator"``, the
exact linear methods, ``"auto"``, the table :data:`FLUCTUATION_METHODS` and
:func:`fluctuations`.
"""
from __future__ import annotations

import time

import numpy as np

from solvers import fluct as _engine
from solvers.fluct import deep_linear as _deep
from solvers.fluct import deep_mc as _deep_mc

from ._fluct_base import (FluctuationMethod, _TwoLayer, _need_gamma0, _need_linear,
                          _objective, _output_shape)
from ._fluct_options import (DEFAULT_KAPPA_SAMPLES, MAP_NOISE_WARN, AutoOptions,
                             DeepPropagatorOptions, FluctuationOptions, LazyOptions,
                             PropagatorOptions, SampledOptions, _selected)
from ._fluct_two_layer import _Lazy, _Propagator
from ._progress import logger
from .results import Fluctuations, Solution

__all__ = ["fluctuations", "FLUCTUATION_METHODS", "FluctuationOptions",
           "SampledOptions", "PropagatorOptions", "LazyOptions", "DeepPropagatorOptions",
           "AutoOptions", "FluctuationMethod"]


class _Auto(FluctuationMethod, name="auto", options=AutoOptions,
            description="'lazy' for a static solution or gamma0 = 0, 'linear-exact' / "
                        "'deep-linear' for linear networks, else 'propagator' / "
                        "'deep-propagator'"):

    def resolve(self, sol):
        net = sol.net
        if sol.method == "static" or sol.train.gamma0 == 0:
            name = "lazy"
        elif net.linear:
            plain = _objective(sol).plain if hasattr(sol.train, "loss") else True
            name = "linear-exact" if net.depth == 1 and plain else "deep-linear"
        else:
            name = "propagator" if net.depth == 1 else "deep-propagator"
        return FLUCTUATION_METHODS[name]


class _DeepPropagator(FluctuationMethod, name="deep-propagator",
                      options=DeepPropagatorOptions,
                      description="deep smooth networks: propagator with sampled single-site "
                                  "fields"):
    def check(self, sol, opts):
        if sol.net.depth < 2:
            raise ValueError("method='deep-propagator' needs depth >= 2; a two-layer network "
                             "uses method='propagator'")
        if sol.net.activation == "relu":
            raise NotImplementedError(
                "method='deep-propagator' does not support relu: the derivative of the "
                "sampled single-site map misses the phi'' = delta term; use tanh or erf")
        if sol.A is None or sol.B is None:
            raise ValueError(f"method='deep-propagator' linearises around the responses A, B "
                             f"of the solution; sol (method={sol.method!r}) has none: solve "
                             f"with method='mc' (or 'linear' for a linear network)")

    def compute(self, state):
        sol, opts, samples = state.sol, state.opts, state.samples
        net, data, train = sol.net, sol.data, sol.train
        T, n = train.steps, data.P + data.Q
        _need_gamma0(self.name, train.gamma0)
        if int((sol.options or {}).get("tangent_blocks", 1) or 1) > 1:
            logger.warning(
                "fluctuations (deep-propagator): the solution's responses A, B were estimated "
                "with tangent samples in blocks by source time (tangent_blocks=%s, the adaptive "
                "default where training is stable). The propagator's validations used one "
                "block, and one of them (tanh L = 3, 8 + 4 points, lr = 0.1, at the edge of "
                "stability) gave the NTK's N Var 3.5 standard errors above the networks with "
                "a blocked background (benchmarks/README.md); until that is settled, solve the "
                "background with tangent_blocks=1", sol.options.get("tangent_blocks"))
        # kappa's samples are fresh draws, independent of the maps': an explicit count is used
        # as given (also above ``samples``); the default is capped at ``samples``
        ks = (min(DEFAULT_KAPPA_SAMPLES, samples) if opts.kappa_samples is None
              else int(opts.kappa_samples))
        R = opts.map_replicates
        if R > 1 and R % 2:
            raise ValueError(f"map_replicates={R}: use 1 or an even number (pairs of "
                             f"independent maps give the unbiased cross estimate), e.g. "
                             f"map_replicates={R + 1}")
        if ks // R < 4 * opts.blocks:
            raise ValueError(f"kappa_samples={ks} is too small for blocks={opts.blocks} in each "
                             f"of map_replicates={R}; use at least {4 * opts.blocks * R} (or "
                             f"fewer blocks or map_replicates)")
        if samples // R < 128:
            raise ValueError(f"samples={samples} leaves {samples // R} map samples to each of "
                             f"map_replicates={R}; use samples >= {128 * R} or fewer "
                             f"map_replicates")

        def flat(K):
            K = np.asarray(K, dtype=np.float64)
            return np.moveaxis(K, -2, -3).reshape(K.shape[:-4] + ((T + 1) * n, (T + 1) * n))

        ss = np.random.SeedSequence(int(state.rng.integers(2 ** 63)))
        bar = state.ctx.bar(100, "fluctuations (deep)", unit="%")

        def _tick(done, total, what, _state=[0]):
            # the engine reports the overall fraction (adjoint then kappa of each replicate)
            pct = int(100 * done / total)
            if pct > _state[0]:
                bar.update(pct - _state[0])
                _state[0] = pct
                bar.set_postfix_str(what)

        extra = {} if state.times is None else {"times": state.times}
        rank = getattr(opts, "ntk_rank", None)
        if rank is not None:
            if not opts.ntk:
                raise ValueError(f"ntk_rank={rank} needs ntk=True (it estimates the sum of "
                                 f"the NTK entries' N Var); drop ntk_rank or ntk=False")
            if opts.ntk_probes == 1:
                raise ValueError("ntk_probes=1 gives the remainder no error bar; use "
                                 "ntk_probes >= 2 (default 4) or 0 to leave it out")
            W, layout, pilot = _principal_seeds(sol, opts, state)
            extra["ntk_seeds"] = W
        try:
            res = _deep_mc.deep_propagator(
                data.kx, np.asarray(data.y_train), net.activation, net.depth, train.gamma0,
                train.lr, T, f=state.f_all, phi=flat(sol.phi), g=flat(sol.g), A=flat(sol.A),
                B=flat(sol.B), center=opts.center, ntk=opts.ntk, samples=samples,
                kappa_samples=ks, seed=ss, blocks=opts.blocks, map_replicates=R,
                progress=_tick, logger=logger, **extra)
        finally:
            bar.close()
        # the engine computes the observables at the selected times only (NaN elsewhere)
        if not (np.all(np.isfinite(_selected(res["cov"], state.times)))
                and res["residual"] < 1e-6):
            gaps = res.get("fixed_point_gap")
            if gaps is not None and not np.isfinite(res["residual"]):
                state.failure = ("not_converged", (
                    f"fluctuations (deep-propagator): the solution is not a fixed point of "
                    f"the single-site map at these parameters (largest relative gap between "
                    f"the samples' estimates and the solution's kernels and predictions: "
                    f"{ {k: round(v, 3) for k, v in gaps.items()} }, Monte Carlo noise makes "
                    f"them a few per cent): the solution comes from another lr / gamma0 / "
                    f"problem, or the dynamics diverge at them; solve again with the "
                    f"training you pass, or reduce lr or gamma0"))
            else:
                state.failure = ("not_converged", (
                    f"fluctuations (deep-propagator): the linearised single-site map did not "
                    f"give finite adjoint rows (relative change {res['residual']:.3g} after "
                    f"the last iteration): the sampled map's Jacobian has an eigenvalue of "
                    f"modulus >= 1, from unstable dynamics or from sampling noise amplified "
                    f"by near-degenerate two-time kernels; use more samples, fewer steps, "
                    f"or a smaller lr or gamma0"))
        state.stderr["prediction_cov"] = res["pred_cov_se"]
        if opts.ntk and rank is None:
            state.stderr["ntk_var"] = res["ntk_var_se"]
        state.options.update(samples=int(samples), kappa_samples=int(ks),
                             residual=float(res["residual"]))
        state.options["map_replicates"] = int(R)
        for key in ("map_noise_ratio", "map_noise_bias"):
            if res.get(key) is not None:
                state.options[key] = {k: float(v) for k, v in res[key].items()}
        noisy = {k: v for k, v in (res.get("map_noise_ratio") or {}).items()
                 if v > MAP_NOISE_WARN}
        if noisy:
            logger.warning(
                "fluctuations (deep-propagator): the sampled maps' noise is %s times kappa's "
                "(map_noise_ratio); the error bars include it, but the adjoint rows are a "
                "nonlinear function of the map's samples, and at this noise their O(1 / "
                "samples) bias is not negligible. At (T + 1) (P + Q) = %d flat points use "
                "more samples per map: samples=%d (4x) or more",
                ", ".join(f"{v:.0f} ({k})" for k, v in noisy.items()), (T + 1) * n,
                4 * int(samples))
        if res.get("block") is not None:
            # per pair of maps: kappa's batch-means estimates and delta (the maps' noise), so
            # that sums of entries get errors: Var = mean_p(var_b / blocks + delta^2) / pairs
            state.extras["pair_block_prediction_cov"] = res["block"]["pred_cov"]
            state.extras["pair_delta_prediction_cov"] = res["delta"]["pred_cov"]
            if opts.ntk and rank is None:
                state.extras["pair_block_ntk_var"] = res["block"]["ntk_var"]
                state.extras["pair_delta_ntk_var"] = res["delta"]["ntk_var"]
        if res.get("fixed_point_gap") is not None:
            state.options["fixed_point_gap"] = {k: float(v) for k, v in
                                                res["fixed_point_gap"].items()}
        if rank is not None and res.get("combo") is not None:
            sel = _selected_times(state.times, T)
            tot, se, resid = _deep_mc.ntk_trace(res["combo"], layout, len(sel))
            full = np.full(T + 1, np.nan)
            full_se = np.full(T + 1, np.nan)
            full[sel], full_se[sel] = tot, se
            state.extras["ntk_var_total"] = full
            state.stderr["ntk_var_total"] = full_se
            dirs = ~layout["probe"]
            state.extras["ntk_direction_var"] = np.stack(
                [res["combo"]["var"][dirs & (layout["time"] == j)] for j in range(len(sel))])
            state.extras["ntk_directions"] = pilot.pop("directions")
            state.extras["ntk_residual_var"] = resid
            state.options.update(ntk_rank=int(rank), ntk_probes=int(opts.ntk_probes),
                                 ntk_pilot=pilot)
        return res


def _selected_times(times, T):
    """The steps computed: ``state.times`` (already sorted and distinct) or every step."""
    return list(range(T + 1)) if times is None else list(times)


#: the pilot ensemble that picks the principal directions of ``ntk_rank``: any directions
#: leave the estimate unbiased (solvers.fluct.deep_mc.ntk_trace_seeds); good ones make the
#: probes' part small. Measured at depth 3, 8 + 4 points, 40 steps: 8 directions from 128
#: networks of width 256 carry 93 % of the entries' summed variance of 512 other networks.
PILOT_WIDTH, PILOT_SEEDS = 256, 128


def _principal_seeds(sol, opts, state):
    """Seed rows for ``ntk_rank``: per selected time the leading ``ntk_rank`` eigenvectors of
    the NTK entries' covariance over a small simulated ensemble (the pilot), plus
    ``ntk_probes`` Gaussian probes of the rest (solvers.fluct.deep_mc.ntk_trace_seeds)."""
    from .api import simulate
    net, data, train = sol.net, sol.data, sol.train
    T, n = train.steps, data.P + data.Q
    sel = _selected_times(state.times, T)
    iu = np.triu_indices(n)
    E = iu[0].size
    r = min(int(opts.ntk_rank), E)
    base = int(state.rng.integers(2 ** 31))
    clock = time.perf_counter()
    ens = simulate(net, data, train, width=PILOT_WIDTH, center=opts.center,
                   seeds=range(base, base + PILOT_SEEDS))
    K = np.asarray(ens.ntk)[:, sel][:, :, iu[0], iu[1]]            # (seeds, times, E)
    dirs, captured, q = [], [], []
    for j in range(len(sel)):
        w, V = np.linalg.eigh(np.cov(K[:, j].T))
        w, V = np.maximum(w[::-1], 0.0), V[:, ::-1]
        dirs.append(np.ascontiguousarray(V[:, :r]))
        captured.append(float(w[:r].sum() / w.sum()) if w.sum() > 0 else 1.0)
        # the remainder's tr(C_r^2) / tr(C_r)^2: the probes' relative variance / 2
        q.append(float((w[r:] ** 2).sum() / w[r:].sum() ** 2) if w[r:].sum() > 0 else 0.0)
    W, layout = _deep_mc.ntk_trace_seeds(dirs, opts.ntk_probes, state.rng)
    layout["q"], layout["share"] = np.asarray(q), np.asarray(captured)
    seconds = time.perf_counter() - clock
    logger.info("fluctuations (deep-propagator): %d principal directions of the NTK entries "
                "per time from %d networks of width %d (%.1f s; pilot share of the summed "
                "variance %.3f-%.3f), %d probes of the rest", r, PILOT_SEEDS, PILOT_WIDTH,
                seconds, min(captured), max(captured), 0 if r >= E else opts.ntk_probes)
    return W, layout, {"width": PILOT_WIDTH, "seeds": PILOT_SEEDS, "captured": captured,
                       "seconds": seconds, "directions": np.stack(dirs)}


class _ExactLinear(FluctuationMethod):
    """The exact routes for linear networks: no sampling; they recompute the trajectory."""

    hint = ""

    def compute(self, state):
        sol, opts = state.sol, state.opts
        _need_linear(self.name, sol.net, self.hint)
        _need_gamma0(self.name, sol.train.gamma0)
        res = self.exact(sol.net, sol.data, sol.train, opts, state)
        ref = state.f_all - (state.f_all[:1] if opts.center else 0.0)
        state.options["max_prediction_gap"] = float(np.max(np.abs(res["f"] - ref)))
        state.extras["exact_predictions"] = res["f"]
        return res


class _DeepLinear(_ExactLinear, name="deep-linear",
                  description="linear networks of any depth: exact propagator, no sampling"):

    #: docs/theory.rst §7: outputs over the flattened (t, c) backward index, the loss
    #: through its (differentiable) error signal, weight decay (toward zero: the
    #: initial-weight channel scaled by a^t), batches; not the hinge loss (its kink moves
    #: with the fluctuations, a term the linearisation misses)
    supports = frozenset({"outputs", "losses", "weight_decay", "decay_to_zero", "batches"})

    def exact(self, net, data, train, opts, state):
        obj = _objective(state.sol)
        res = _deep.deep_linear_propagator(data.kx, np.asarray(data.y_train), net.depth,
                                           train.gamma0, train.lr, train.steps,
                                           center=opts.center, ntk=opts.ntk, objective=obj)
        if not obj.plain:
            n, C, multi = data.P + data.Q, obj.C, data.multi_output
            T1 = train.steps + 1
            res["f"] = res["f"].reshape((T1, n, C) if multi else (T1, n))
            for key in ("cov", "pred_cov", "ntk_var", "ntk_mean"):
                if res.get(key) is not None:
                    res[key] = _output_shape(res[key], n, C, multi)
        if not (np.all(np.isfinite(res["f"])) and res["residual"] < 1e-8 * max(
                1.0, float(np.max(np.abs(res["f"]))))):
            state.failure = ("not_converged", (
                f"fluctuations (deep-linear): the infinite-width fixed point diverged or "
                f"did not converge (residual {res['residual']:.3g}); reduce lr or gamma0"))
        state.options["residual"] = res["residual"]
        state.extras["exact_ntk"] = res["ntk_mean"]
        return res


class _LinearExact(_ExactLinear, _TwoLayer, name="linear-exact",
                   description="two-layer linear networks: exact finite-width moment closure, "
                               "no sampling"):
    hint = "; use method='propagator'"

    def exact(self, net, data, train, opts, state):
        return _engine.linear_exact_fluctuations(data.kx, np.asarray(data.y_train),
                                                 train.gamma0, train.lr, train.steps,
                                                 opts.center)


#: method name -> adapter of :func:`fluctuations` (add one: ``FLUCTUATION_METHODS[name] =
#: adapter``, a :class:`FluctuationMethod`)
FLUCTUATION_METHODS = {m.name: m for m in (_Auto(), _Propagator(), _Lazy(), _LinearExact(),
                                           _DeepLinear(), _DeepPropagator())}


def fluctuations(sol, *, method: str = "auto", seed=None, throw: bool = True, progress=None,
                 memory_limit=None, **options) -> Fluctuations:
    """Leading-order finite-width fluctuations N Cov over initialisations (docs/theory.rst §5).

    Parameters
    ----------
    sol : Solution
        Infinite-width solution (``dmft.solve``) of a two-layer network (depth 1) or of a
        linear network of any depth. Its error signal Delta(t) = y - f(t) is the point of
        linearisation (``"propagator"``); ``"deep-linear"`` and ``"linear-exact"`` recompute
        the exact infinite-width trajectory and report its distance to ``sol`` in
        ``options["max_prediction_gap"]``.
    method : str
        A key of :data:`FLUCTUATION_METHODS`: ``"auto"``, ``"propagator"``, ``"lazy"``,
        ``"linear-exact"``, ``"deep-linear"`` or ``"deep-propagator"`` (module docstring).
        Each method takes the options of its dataclass (``center`` and ``ntk`` always;
        ``samples`` and ``blocks`` for the sampled methods; ``chunk``, ``response_samples``
        and ``sampler`` for ``"propagator"``, ``times`` for both propagators, ``moments``
        for ``"lazy"``, ``kappa_samples`` for ``"deep-propagator"``); an option
        that does not apply to the method (for ``"auto"``: to the method it chooses for
        ``sol``) raises ValueError.
    samples : int, optional
        Single-site samples (default 20 000 for ``"propagator"``, 200 000 for sampled lazy
        moments, 16384 per layer for the map of ``"deep-propagator"``). The relative Monte
        Carlo error of the covariances is about sqrt(2 / samples) times a problem-dependent
        factor; ``stderr`` reports it.
    seed : int or SeedSequence, optional
        Seed of the single-site samples; the same seed gives bit-identical results.
    throw : bool
        If True (default) a computation that did not converge raises
        :class:`~dmft.results.ConvergenceError` (the result is ``exc.result``); if False the
        Fluctuations are returned with ``converged=False``, ``status`` and ``message``.
    center : bool
        Fluctuations of the centred model f(theta) - f(theta_0) (``simulate(..., center=True)``):
        no initial-output variance, Delta from centred predictions.
    blocks : int
        Batch-means blocks (>= 2) for the standard errors.
    chunk : int, optional
        Samples processed together (memory ~ chunk P T (P + 1 + 3 (P+Q)) floats; default
        about 32 MB, :func:`solvers.fluct.default_chunk`). Does not change the result
        beyond rounding.
    times : sequence of int, optional
        ``"propagator"`` and ``"deep-propagator"``: the steps (0 .. T; negative counts from
        the end, -1 = T; duplicates dropped, sorted; recorded in ``options["times"]``) at
        which ``prediction_cov``, ``ntk_var`` and their ``stderr`` are computed; every other
        step is NaN (shapes unchanged), and ``extras["prediction_cov_two_time"]`` is filled on
        the times x times blocks only. None (default): every step. ``"propagator"`` then
        forms the response only for those rows (issue 21: 16 + 16 points, 100 steps at
        ``times=[-1]`` in seconds to a minute instead of about an hour), with
        ``response_samples`` of the samples carrying tangents.
    response_samples : int, optional
        ``"propagator"``: samples (of ``samples``, spread over the batch-means blocks) whose
        forward-mode tangents form the response J; the others feed kappa and the influence
        vectors only (a plain march costs ~1/50 of a tangent march). Default
        ceil(samples / 8) with ``times``; given without ``times``, every step with the
        adjoint engine. Each block uses its own J, so ``stderr`` includes J's noise;
        ``options["response_samples"]`` records the count used, ``extras`` the per-block
        estimates ``block_prediction_cov`` and ``block_ntk_var``.
    sampler : str, optional
        ``"propagator"``: ``"random"`` (i.i.d. normals) or ``"sobol"`` (each batch-means
        block an independently scrambled Sobol set over the rank of Phi^0 plus one
        dimension: independent replicates, honest error bars; uses the adjoint engine).
        Default: ``"sobol"`` with ``times`` or ``response_samples`` (measured: half the
        spread of ``"random"`` over seeds at equal cost, benchmarks/README.md), else
        ``"random"`` (the original engine, numbers unchanged).
    ntk : bool
        Also compute ``ntk_var`` (``"propagator"``: memory 2 (T+1) n(n+1)/2 P T floats).
    moments : str
        ``"lazy"`` only: ``"exact"`` (linear networks), ``"sampled"``, or ``"auto"`` (exact
        when available).
    kappa_samples : int, optional
        ``"deep-propagator"`` only: samples for the single-site covariance kappa, in total
        over the map pairs (default min(8192, ``samples``); fresh draws, independent of the
        maps', so any count is used as given: kappa's batch means set most of the error of
        the predictions' variances where the maps' noise is small, ``options["map_noise_ratio"]``
        well below 1; forward-mode derivatives of the march along every observable's direction
        per sample, with the adjoint the expensive part). Before 6 Dec 2026 a count above
        ``samples`` was silently cut to ``samples``.
    map_replicates : int
        ``"deep-propagator"`` only: 1 or an even number of independent sampled single-site
        maps (default 4), each with ``samples / map_replicates`` map samples. With R >= 2 the
        maps form R / 2 pairs, and each pair's estimate is the cross term
        (J^a kappa J^b^T + J^b kappa J^a^T) / 2 of the two maps' adjoint rows, with kappa from
        ``2 kappa_samples / R`` fresh samples: free of the upward bias that the maps' noise
        puts into a plain quadratic form J kappa J^T (for the NTK's N Var at depth 3, n (T+1)
        = 492: +8 % at 4096 and +37 % at 2048 map samples, and +33 % in all at 4096 when
        kappa came from the map's own samples; benchmarks/README.md). The
        result is the mean over the pairs; the standard errors add the maps' noise (from half
        the difference of each pair's two plain forms, pooled over entries:
        ``options["map_noise_ratio"]``), and ``options["map_noise_bias"]`` reports the plain
        estimate's relative excess that the cross term removed. ``map_replicates=1`` is one
        map and the plain (biased) form, its errors kappa's batch means only, a lower bound.
        The pairs cost about twice the plain kappa step at equal ``kappa_samples`` (each
        sample is contracted with both maps' rows) and keep both maps' graphs in memory.
        Errors of a sum of entries (e.g. the NTK's summed variance): from
        ``extras["pair_block_ntk_var"]`` (pairs, blocks, T+1, n, n; each pair's batch-means
        estimates) and ``extras["pair_delta_ntk_var"]`` (pairs, T+1, n, n), Var(sum) =
        mean over pairs of (variance over blocks of the block sums / blocks + delta_sum^2),
        divided by the number of pairs (likewise ``pair_*_prediction_cov``).
    progress : bool or None
        Progress bar (None: only on a terminal).
    memory_limit : float, optional
        GB the computation may use (default: 80 % of the memory available now); a larger
        estimate (logged at INFO level) is refused with a ValueError before any work.

    Returns
    -------
    Fluctuations
        (For C >= 2 outputs every (n, n) below is (n, C, n, C) over (point, output) pairs,
        docs/theory.rst §7; see the module docstring for which method handles which loss,
        weight decay and batches.)
        ``prediction_cov`` (T+1, n, n): N Cov[f_mu(t), f_nu(t)]; ``ntk_var`` (T+1, n, n):
        N Var[K_mu,nu(t)] (NaN when ``ntk=False``, and both NaN outside ``times``); ``stderr`` with the same keys (Monte Carlo
        batch means; absent for deterministic methods); ``extras["prediction_cov_two_time"]``
        (T+1, T+1, n, n) N Cov[f_mu(t), f_nu(s)]; ``"propagator"`` adds ``extras["response"]``
        (T+1, n, T, P) J = d<O_mu(t)>/dDelta_a(s) and ``extras["kappa"]`` (T+1, n, n), the
        equal-time single-site covariance of O; ``"deep-linear"`` adds
        ``extras["exact_predictions"]`` (T+1, n) and ``extras["exact_ntk"]`` (T+1, n, n), the
        exact infinite-width trajectory it linearises around, and ``options["residual"]``
        (fixed-point check) and ``options["max_prediction_gap"]`` (distance to ``sol``).

    Raises
    ------
    ValueError
        Bad options, a solution the method cannot use (including a problem feature outside
        the method's ``supports``: outputs, loss, weight decay, batches), or a solution that
        did not converge (``sol.status != "converged"``, e.g. from
        ``solve(..., throw=False)``).
    NotImplementedError
        ``"propagator"``/``"linear-exact"`` at depth > 1, sampled lazy moments at depth > 1,
        and ReLU with ``"propagator"`` or ``"deep-propagator"`` (their derivatives miss the
        phi'' = delta term; ``method="lazy"`` handles two-layer ReLU).
    ConvergenceError
        The single-site fields or the linearised dynamics diverged (``throw=True``, or no
        result to return).
    """
    unknown = AutoOptions.unknown(options)
    if unknown:
        raise FLUCTUATION_METHODS["auto"].unknown_error(unknown)
    if not isinstance(sol, Solution):
        raise ValueError(f"sol must be a dmft.Solution (from dmft.solve), got "
                         f"{type(sol).__name__}; for an Ensemble of simulated networks use "
                         f"ens.var() and multiply by ens.width")
    if not isinstance(method, str) or method not in FLUCTUATION_METHODS:
        raise ValueError(f"method {method!r} is unknown; use one of {list(FLUCTUATION_METHODS)}")
    AutoOptions(**options)  # validate the values before resolving "auto"
    adapter = FLUCTUATION_METHODS[method].resolve(sol)
    inapplicable = sorted(set(options) - set(adapter.Options.names()))
    if inapplicable:
        chosen = "" if method == adapter.name else \
            f" (the method that method={method!r} chose for this solution)"
        raise ValueError(f"option(s) {inapplicable} do not apply to fluctuations method="
                         f"{adapter.name!r}{chosen}; its options are "
                         f"{list(adapter.Options.names())}; drop them")
    return adapter(sol, seed=seed, throw=throw, progress=progress, memory_limit=memory_limit,
                   **options)
