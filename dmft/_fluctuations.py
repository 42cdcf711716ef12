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
    engine (:func:`solvers.fluct.propagator.two_layer_propagator_times`): only the selected
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
"""
from __future__ import annotations

from dataclasses import dataclass

import numbers

import numpy as np

from solvers import fluct as _engine
from solvers.fluct import deep_linear as _deep
from solvers.fluct import deep_mc as _deep_mc
from solvers.fluct import propagator as _prop

from solvers.objective import Objective

from ._method import FEATURES, Method, Options, boolean, features, one_of, option, positive_int
from ._progress import logger
from .results import Fluctuations, Solution
from .specs import check_positive_int

__all__ = ["fluctuations", "FLUCTUATION_METHODS", "FluctuationOptions",
           "SampledOptions", "PropagatorOptions", "LazyOptions", "DeepPropagatorOptions",
           "AutoOptions", "FluctuationMethod"]

_MOMENTS = ("auto", "exact", "sampled")
DEFAULT_SAMPLES = {"propagator": 20_000, "lazy": 200_000, "deep-propagator": 16384}
#: single-site samples for kappa (per-sample Jacobians and Hessians) in "deep-propagator"
DEFAULT_KAPPA_SAMPLES = 8192
#: "propagator" with ``times``: by default 1 sample in 8 also carries tangents for the
#: response J (the rest feed kappa and the influence vectors only; a tangent march costs
#: ~50 x a plain one at P = 16, T = 100); measured in benchmarks/README.md (fluctuations.py,
#: part ``speed``)
DEFAULT_RESPONSE_FRACTION = 8
_SAMPLERS = ("random", "sobol")


def _times(name, value):
    """``times``: a non-empty sequence of integer steps (range checked against the solution
    by :func:`_resolve_times`); normalised to a tuple of ints."""
    fix = "; pass a list of steps, e.g. times=[-1] for the last step or times=[0, 10, 20]"
    if isinstance(value, (str, bytes, dict, set)) or np.ndim(value) != 1:
        raise ValueError(f"{name} must be None or a sequence of integer steps, got "
                         f"{value!r}{fix}")
    out = []
    for v in np.asarray(value, dtype=object).tolist():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must contain integer steps, got {v!r} in {value!r}{fix}")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name} is empty{fix} (or times=None for every step)")
    return tuple(out)


def _resolve_times(times, T):
    """Sorted distinct steps in 0 .. T (negative: from the end, -1 = T), or None."""
    if times is None:
        return None
    bad = [t for t in times if not -(T + 1) <= t <= T]
    if bad:
        raise ValueError(f"times={list(times)} has step(s) {bad} outside 0 .. {T} (or "
                         f"-{T + 1} .. -1 counted from the end) of the solution's {T} "
                         f"training steps; use steps in that range, e.g. times=[{T}]")
    return sorted({t % (T + 1) for t in times})


def _selected(cov, times):
    """The times x times blocks of a two-time (T1, T1, ...) covariance (all when None)."""
    cov = np.asarray(cov)
    return cov if times is None else cov[np.ix_(times, times)]


def _mask_times(res, times, T1, keys=("pred_cov", "ntk_var", "pred_cov_stderr",
                                      "ntk_var_stderr", "kappa")):
    """NaN outside the selected ``times`` (equal-time arrays) and outside the times x times
    blocks (``cov``), in place."""
    if times is None:
        return res
    off = np.ones(T1, dtype=bool)
    off[times] = False
    for key in keys:
        if res.get(key) is not None:
            res[key] = np.array(res[key], dtype=np.float64)
            res[key][off] = np.nan
    if res.get("cov") is not None:
        cov = np.array(res["cov"], dtype=np.float64)
        cov[off] = np.nan
        cov[:, off] = np.nan
        res["cov"] = cov
    return res


def _blocks(name, value):
    value = check_positive_int(name, value, " >= 2 (batch-means blocks for the error bars), "
                               "e.g. blocks=10")
    if value < 2:
        raise ValueError(f"{name} must be an integer >= 2 (batch-means blocks for the error "
                         f"bars), got {value}")
    return value


@dataclass(frozen=True)
class FluctuationOptions(Options):
    """Options every fluctuation method takes (see :func:`fluctuations`)."""

    center: bool = option(False, boolean(), "fluctuations of the centred model")
    ntk: bool = option(True, boolean(), "also compute ntk_var")


@dataclass(frozen=True)
class SampledOptions(FluctuationOptions):
    """Options of the methods that draw single-site samples."""

    samples: int | None = option(None, positive_int(" (single-site samples, e.g. "
                                                    "samples=20000)"), "single-site samples")
    blocks: int = option(10, _blocks, "batch-means blocks for the standard errors")


@dataclass(frozen=True)
class PropagatorOptions(SampledOptions):
    """Options of ``method="propagator"``."""

    chunk: int | None = option(None, positive_int(" (samples per batch, e.g. chunk=256) or None"),
                               "samples processed together")
    times: tuple | None = option(None, _times, "steps at which to compute the covariances "
                                               "(None: every step)")
    response_samples: int | None = option(
        None, positive_int(" (samples whose tangents form the response J, e.g. 4096) or None"),
        "samples for the response J (default samples / 8)")
    sampler: str | None = option(None, one_of(_SAMPLERS, "sampler {value!r} is unknown; use "
                                                 "one of " + str(list(_SAMPLERS))),
                                 "i.i.d. ('random') or scrambled Sobol ('sobol'); default "
                                 "'sobol' with times, else 'random'")


@dataclass(frozen=True)
class LazyOptions(SampledOptions):
    """Options of ``method="lazy"``."""

    moments: str = option("auto", one_of(_MOMENTS, "moments {value!r} is unknown; use one of "
                                         + str(list(_MOMENTS))), "exact or sampled moments")


@dataclass(frozen=True)
class DeepPropagatorOptions(SampledOptions):
    """Options of ``method="deep-propagator"``."""

    kappa_samples: int | None = option(None, positive_int(" (samples for kappa, e.g. 8192)"),
                                       "samples for kappa")
    times: tuple | None = option(None, _times, "steps at which to compute the covariances "
                                               "(None: every step)")


@dataclass(frozen=True)
class AutoOptions(PropagatorOptions, LazyOptions, DeepPropagatorOptions):
    """Options of ``method="auto"``: those of every method it may choose; the ones that do
    not apply to the method chosen for a solution are refused then (:func:`fluctuations`)."""


def _delta(sol: Solution, center: bool) -> np.ndarray:
    """(T, P) infinite-width error signal Delta(t) = y - f(t), t = 0 .. T-1."""
    f = np.asarray(sol.train_predictions, dtype=np.float64)
    if center:
        # at infinite width f(0) = 0; a Monte Carlo solution carries noise there, which the
        # centred model removes by construction
        f = f - f[:1]
    return np.asarray(sol.data.y_train)[None, :] - f[:-1]


def _objective(sol: Solution) -> Objective:
    """The solution's loss, targets, batches and weight decay (docs/theory.rst §7)."""
    return Objective.from_specs(sol.data, sol.train)


def _delta_jacobian(sol: Solution, center: bool):
    """Infinite-width error signal and loss Jacobian for any objective (docs/theory.rst §7):
    Delta (T, P, C) = objective.delta(t, f(t)) and jac (T, P, C, C) = d Delta(t) / d f(t)
    (zero off-batch), from the (centred when ``center``) predictions of the solution."""
    obj = _objective(sol)
    F = np.asarray(sol.train_predictions, dtype=np.float64)
    if F.ndim == 2:
        F = F[:, :, None]
    if center:
        F = F - F[:1]
    T, P = sol.train.steps, sol.data.P
    delta = np.stack([obj.delta(t, F[t])[:P] for t in range(T)])
    jac = np.stack([obj.jacobian(t, F[t]) for t in range(T)])
    return delta, jac, obj


def _output_shape(arr, n: int, C: int, multi: bool):
    """(..., n C, n C) over I = mu C + c -> (..., n, C, n, C) for C >= 2 outputs, or
    (..., n, n) for one (dmft/results.py shape convention)."""
    arr = np.asarray(arr)
    lead = arr.shape[:-2]
    return arr.reshape(lead + ((n, C, n, C) if multi else (n, n)))


def _need_gamma0(method, gamma0):
    if gamma0 <= 0:
        raise ValueError(f"method={method!r} needs gamma0 > 0; use method='lazy' for the "
                         f"gamma0 -> 0 limit")


def _need_linear(method, net, hint=""):
    if not net.linear:
        raise ValueError(f"method={method!r} needs a linear network, got "
                         f"activation={net.activation!r}{hint}")


class _State:
    """What one fluctuation run accumulates: options, stderr, extras, a failure."""

    def __init__(self, ctx, sol, opts, samples):
        self.ctx, self.sol, self.opts, self.samples = ctx, sol, opts, samples
        self.f_all = np.concatenate([sol.train_predictions, sol.test_predictions], axis=1)
        self.options, self.stderr, self.extras = {}, {}, {}
        self.failure = None


class FluctuationMethod(Method):
    """A method of :func:`fluctuations`: ``check`` the solution, ``compute`` the propagator.

    ``compute(state)`` returns the engine's dict (``cov``, ``pred_cov``, ``ntk_var``) and
    fills ``state.options`` / ``stderr`` / ``extras``; a failure with a result sets
    ``state.failure = (status, message)``. The skeleton (``run``) does the rest once.
    """

    Options = FluctuationOptions

    @property
    def default_samples(self):
        """Default ``samples`` (None: the method draws none unless ``uses_samples`` says so)."""
        return DEFAULT_SAMPLES.get(self.name)

    label_format = "fluctuations ({name})"
    unknown_format = ("unknown option(s) {unknown} for fluctuations; known options: method, "
                      "{names}, seed, throw, progress")

    def resolve(self, sol) -> "FluctuationMethod":
        return self

    def check(self, sol: Solution, opts: FluctuationOptions):
        """Refuse a solution the method cannot use (before any work)."""

    def check_problem(self, sol: Solution):
        """ValueError where the solution's problem (outputs, loss, weight decay, batches;
        docs/theory.rst §7) needs a feature outside :attr:`supports` (before any work)."""
        if not hasattr(sol.train, "loss") or not hasattr(sol.data, "multi_output"):
            return
        need = features(sol.data, sol.train)
        missing = sorted(need - set(self.supports))
        if missing:
            what = "; ".join(FEATURES[m] for m in missing)
            able = [m.name for m in FLUCTUATION_METHODS.values()
                    if m.name != "auto" and need <= set(m.supports)]
            fix = (f"use method={able[0]!r}" + (f" (or one of {able[1:]})" if able[1:] else "")
                   + " where it applies to the network") if able else \
                "no fluctuation method handles this yet; use dmft.simulate at several widths"
            raise ValueError(f"fluctuations method={self.name!r} does not handle {what}; "
                             f"{fix}, or change train / data")

    def uses_samples(self, sol: Solution, opts: FluctuationOptions) -> bool:
        return self.default_samples is not None

    def compute(self, state: _State) -> dict:
        raise NotImplementedError

    def finish(self, ctx, result, throw):
        """As :meth:`Method.finish`; with ``times`` the standard errors are NaN outside the
        selected times by design, so the finiteness rule is applied to those times only."""
        times = result.options.get("times") if isinstance(result.options, dict) else None
        if times is None or result.status != "converged":
            return super().finish(ctx, result, throw)
        full = result.stderr
        result.stderr = {k: (None if v is None else np.asarray(v)[times])
                         for k, v in full.items()}
        try:
            return super().finish(ctx, result, throw)
        finally:
            result.stderr = full

    def estimate(self, sol, *, opts):
        """Memory and time before the work (:func:`dmft._fluct_estimate.estimate_fluct`)."""
        from ._fluct_estimate import estimate_fluct
        return estimate_fluct(self, sol, opts)

    def run(self, ctx, sol: Solution, *, opts: FluctuationOptions) -> Fluctuations:
        if getattr(sol, "status", "converged") != "converged":
            raise ValueError(
                f"sol did not converge (status={sol.status!r}: {sol.message}); fluctuations "
                f"linearise around a converged infinite-width solution. Fix the solve first "
                f"(as its message says: e.g. a smaller lr or gamma0, more samples, or another "
                f"method) and pass a Solution with status 'converged'")
        self.check_problem(sol)
        self.check(sol, opts)
        samples = getattr(opts, "samples", None)
        if samples is not None or self.uses_samples(sol, opts):
            if samples is None:
                samples = self.default_samples or DEFAULT_SAMPLES["lazy"]
            if samples < 2 * opts.blocks:
                raise ValueError(f"samples={samples} is too small for blocks={opts.blocks}: "
                                 f"need at least 2 samples per block; increase samples (e.g. "
                                 f"samples=20000)")
        state = _State(ctx, sol, opts, samples)
        if not np.all(np.isfinite(state.f_all)) or not np.all(np.isfinite(sol.ntk[0])):
            raise ValueError("sol has non-finite predictions or NTK; fluctuations need a "
                             "finite infinite-width solution (reduce lr or gamma0 in the solve)")
        state.rng = ctx.rng()
        state.times = _resolve_times(getattr(opts, "times", None), sol.train.steps)
        state.options.update(method=self.name, center=opts.center, ntk=opts.ntk,
                             seed=ctx.seed_int,
                             **{k: getattr(opts, k) for k in ("blocks", "chunk")
                                if hasattr(opts, k)})
        if hasattr(opts, "times"):
            state.options["times"] = state.times
        try:
            res = self.compute(state)
        except FloatingPointError as exc:
            # an overflow leaves no covariance: a NaN partial result (the skeleton applies
            # throw=: raised with it on exc.result, or returned)
            T, n = sol.train.steps, sol.data.P + sol.data.Q
            pair = (n, sol.data.C, n, sol.data.C) if getattr(sol.data, "multi_output", False) \
                else (n, n)
            nan = np.full((T + 1,) + pair, np.nan)
            return Fluctuations(
                solution=sol, prediction_cov=nan, ntk_var=nan.copy(), center=opts.center,
                method=self.name, options=state.options,
                extras={"prediction_cov_two_time": np.full((T + 1, T + 1) + pair, np.nan)},
            ).fail("diverged", f"fluctuations ({self.name}) diverged: {exc}; reduce lr or "
                               f"gamma0")
        state.extras["prediction_cov_two_time"] = res["cov"]
        ntk_var = res["ntk_var"] if opts.ntk and res.get("ntk_var") is not None else \
            np.full(np.shape(res["pred_cov"]), np.nan)
        fl = Fluctuations(solution=sol, prediction_cov=res["pred_cov"], ntk_var=ntk_var,
                          center=opts.center, method=self.name, stderr=state.stderr,
                          options=state.options, extras=state.extras)
        if state.failure is not None:
            fl.fail(*state.failure)
        elif not np.all(np.isfinite(_selected(res["cov"], state.times))):
            fl.fail("diverged", f"fluctuations ({self.name}): non-finite covariance (the "
                                f"linearised dynamics diverged); reduce lr or gamma0")
        return fl


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


class _TwoLayer(FluctuationMethod):
    def check(self, sol, opts):
        if sol.net.depth != 1:
            raise NotImplementedError(
                f"method={self.name!r} handles two-layer networks (depth=1) only; for a deep "
                f"network (depth={sol.net.depth}) use method='deep-propagator' (or "
                f"'deep-linear' for a linear one, or 'auto')")


class _Propagator(_TwoLayer, name="propagator", options=PropagatorOptions,
                  description="two-layer networks, sampled single-site propagator (any smooth "
                              "activation)"):
    #: docs/theory.rst §7: the loss enters through its Jacobian d Delta / d f; the hinge
    #: loss's Jacobian is zero almost everywhere but its kink (y f = 1) moves with the
    #: fluctuations, a delta term the linearisation misses (like ReLU's phi'')
    supports = frozenset({"outputs", "losses", "weight_decay", "decay_to_zero", "batches"})

    def compute(self, state):
        sol, opts = state.sol, state.opts
        net, train = sol.net, sol.train
        _need_gamma0(self.name, train.gamma0)
        if net.activation == "relu":
            raise NotImplementedError(
                "method='propagator' does not support relu: the per-sample tangents miss "
                "the phi'' = delta(h) contribution; use a smooth activation (tanh, erf) or "
                "method='lazy' for the gamma0 -> 0 limit")
        kx = sol.data.kx
        delta, jac, obj = _delta_jacobian(sol, opts.center)
        plain = obj.plain
        T = train.steps
        # selected times, a response subsample or QMC: the adjoint engine (original problem)
        fast = plain and (state.times is not None or opts.response_samples is not None
                          or opts.sampler == "sobol")
        sampler = opts.sampler or ("sobol" if fast else "random")
        if not plain and (opts.response_samples is not None or sampler != "random"):
            raise ValueError("response_samples and sampler apply to the original problem (mse, "
                             "one output, full batch, no weight decay) only; drop them")
        if fast:
            times = list(range(T + 1)) if state.times is None else state.times
            R = -(-state.samples // DEFAULT_RESPONSE_FRACTION) \
                if opts.response_samples is None else opts.response_samples
            if sampler == "sobol":
                u, w0 = _prop.draw_units_sobol(kx, state.samples, opts.blocks, state.rng)
            else:
                u, w0 = _engine.draw_units(kx, state.samples, state.rng)
        elif plain:
            # the original problem: the original (Numba) path, numbers unchanged
            u, w0 = _engine.draw_units(kx, state.samples, state.rng)
        else:
            u, w0 = _engine.draw_units_multi(kx, state.samples, obj.C, state.rng)
        bar = state.ctx.bar(state.samples, "fluctuations", unit="sample")
        try:
            if fast:
                res = _prop.two_layer_propagator_times(
                    net.activation, u, w0, kx, _delta(sol, opts.center), train.gamma0,
                    train.lr, times, center=opts.center, blocks=opts.blocks,
                    chunk=opts.chunk, ntk=opts.ntk, response_samples=R, progress=bar.update)
            elif plain:
                res = _engine.two_layer_propagator(
                    net.activation, u, w0, kx, _delta(sol, opts.center), train.gamma0,
                    train.lr, center=opts.center, blocks=opts.blocks, chunk=opts.chunk,
                    ntk=opts.ntk, progress=bar.update)
            else:
                res = _engine.objective_propagator(
                    net.activation, u, w0, kx, delta, jac, train.gamma0, train.lr, a=obj.a,
                    decay_to=obj.decay_to, center=opts.center, blocks=opts.blocks,
                    chunk=opts.chunk, ntk=opts.ntk, progress=bar.update)
        finally:
            bar.close()
        if not plain:
            n, C, multi = sol.data.P + sol.data.Q, obj.C, sol.data.multi_output
            for key in ("cov", "pred_cov", "ntk_var", "pred_cov_stderr", "ntk_var_stderr",
                        "kappa"):
                if res.get(key) is not None:
                    res[key] = _output_shape(res[key], n, C, multi)
            T = train.steps
            res["response"] = res["response"].reshape(
                (T + 1, n, C, T, sol.data.P, C) if multi else (T + 1, n, T, sol.data.P))
        if not fast:
            _mask_times(res, state.times, T + 1)
        state.stderr["prediction_cov"] = res["pred_cov_stderr"]
        if opts.ntk:
            state.stderr["ntk_var"] = res["ntk_var_stderr"]
        state.extras["response"] = res["response"]
        state.extras["kappa"] = res["kappa"]
        state.options["samples"] = state.samples
        if fast:
            state.options.update(response_samples=res["response_samples"], sampler=sampler)
            state.extras["block_prediction_cov"] = res["block_pred_cov"]
            if opts.ntk:
                state.extras["block_ntk_var"] = res["block_ntk_var"]
        return res


class _Lazy(FluctuationMethod, name="lazy", options=LazyOptions,
            description="gamma0 -> 0: frozen random kernel, linear dynamics (exact or sampled "
                        "moments)"):
    #: docs/theory.rst §7: the frozen-kernel dynamics f = f(0) + K alpha, alpha(t+1) =
    #: a alpha(t) + lr Delta(t); not decay toward zero (the weights leave the neighbourhood
    #: of their initialisation: no lazy limit) nor the hinge loss (kink)
    supports = frozenset({"outputs", "losses", "weight_decay", "batches"})

    def uses_samples(self, sol, opts):
        return not (opts.moments in ("auto", "exact") and sol.net.linear)

    def compute(self, state):
        sol, opts = state.sol, state.opts
        net, data, train = sol.net, sol.data, sol.train
        if not opts.center and train.gamma0 <= 0:
            raise ValueError(
                "the initial-output variance Phi^1 / gamma0^2 is infinite at gamma0 = 0; "
                "use center=True (the centred model f - f(theta_0)) or a gamma0 > 0")
        g0 = None if opts.center else train.gamma0
        kx = data.kx
        if hasattr(train, "loss") and not _objective(sol).plain:
            return self._compute_objective(state, g0)
        K = np.asarray(sol.ntk[0], dtype=np.float64)
        delta = _engine.lazy_delta(K, np.asarray(data.y_train), train.lr, train.steps)
        use_exact = net.linear and opts.moments in ("auto", "exact")
        if opts.moments == "exact" and not net.linear:
            raise ValueError(f"moments='exact' is available for linear networks only, got "
                             f"activation={net.activation!r}; use moments='sampled'")
        if net.depth != 1 and not use_exact:
            raise NotImplementedError(
                f"sampled lazy moments are implemented for two-layer networks only "
                f"(depth={net.depth}, activation={net.activation!r}): a deep linear network "
                f"uses moments='exact'; a deep nonlinear one needs a method='mc' solution "
                f"and method='deep-propagator'")
        if use_exact:
            kf, kK = (_deep.deep_linear_lazy_kappa(kx, net.depth, g0) if net.depth != 1
                      else _engine.linear_lazy_moments(kx, g0))
            res = _engine.lazy_propagator(K, delta, train.lr, kK, kf)
            state.options["moments"] = "exact"
        else:
            u, w0 = _engine.draw_units(kx, state.samples, state.rng)
            mom = _engine.sampled_lazy_moments(net.activation, u, w0, kx, g0, opts.blocks)
            res = _engine.lazy_propagator(K, delta, train.lr, mom["kappa_K"], mom["kappa_f0"])
            per = [_engine.lazy_propagator(K, delta, train.lr, b["kappa_K"], b["kappa_f0"])
                   for b in mom["blocks"]]
            for key, name in (("pred_cov", "prediction_cov"), ("ntk_var", "ntk_var")):
                arr = np.stack([r[key] for r in per])
                state.stderr[name] = arr.std(axis=0, ddof=1) / np.sqrt(opts.blocks)
            state.options["moments"] = "sampled"
            state.options["samples"] = state.samples
            state.extras["sampled_ntk"] = mom["mean_K"]
        state.extras["lazy_delta"] = delta
        return res

    def _compute_objective(self, state, g0):
        """docs/theory.rst §7: C outputs, any smooth loss, weight decay toward the
        initialisation, batches (:func:`solvers.fluct.lazy.lazy_propagator_objective`)."""
        sol, opts = state.sol, state.opts
        net, data, train = sol.net, sol.data, sol.train
        obj = _objective(sol)
        n, C, multi = data.P + data.Q, obj.C, data.multi_output
        nC = n * C
        use_exact = net.linear and opts.moments in ("auto", "exact")
        if opts.moments == "exact" and not net.linear:
            raise ValueError(f"moments='exact' is available for linear networks only, got "
                             f"activation={net.activation!r}; use moments='sampled'")
        if net.depth != 1 and not (use_exact and C == 1):
            raise ValueError(
                f"the lazy propagator beyond one squared-error output handles depth > 1 only "
                f"for one output of a linear network (exact moments); depth={net.depth}, "
                f"C={C}, activation={net.activation!r}: use method='deep-linear' for a linear "
                f"network")
        K = np.asarray(sol.ntk[0], dtype=np.float64).reshape(nC, nC)
        tr = _engine.lazy_trajectory(K, obj)

        def propagate(kK, kf):
            return _engine.lazy_propagator_objective(K, tr["alpha"], tr["jac"], obj.a,
                                                     train.lr, kK, kf)

        if use_exact:
            kf, kK = (_deep.deep_linear_lazy_kappa(data.kx, net.depth, g0)
                      if net.depth != 1 else _engine.linear_lazy_moments_multi(data.kx, C, g0))
            res = propagate(kK, kf)
            state.options["moments"] = "exact"
        else:
            u, w0 = _engine.draw_units_multi(data.kx, state.samples, C, state.rng)
            mom = _engine.sampled_lazy_moments_multi(net.activation, u, w0, data.kx, g0,
                                                     opts.blocks)
            res = propagate(mom["kappa_K"], mom["kappa_f0"])
            per = [propagate(b["kappa_K"], b["kappa_f0"]) for b in mom["blocks"]]
            for key, name in (("pred_cov", "prediction_cov"), ("ntk_var", "ntk_var")):
                arr = np.stack([r[key] for r in per])
                state.stderr[name] = _output_shape(arr.std(axis=0, ddof=1)
                                                   / np.sqrt(opts.blocks), n, C, multi)
            state.options["moments"] = "sampled"
            state.options["samples"] = state.samples
            state.extras["sampled_ntk"] = _output_shape(mom["mean_K"], n, C, multi)
        for key in ("cov", "pred_cov", "ntk_var"):
            res[key] = _output_shape(res[key], n, C, multi)
        state.extras["lazy_delta"] = tr["delta"] if multi else tr["delta"][..., 0]
        return res


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
        ks = min(DEFAULT_KAPPA_SAMPLES if opts.kappa_samples is None else opts.kappa_samples,
                 samples)
        if ks < 4 * opts.blocks:
            raise ValueError(f"kappa_samples={ks} is too small for blocks={opts.blocks}; use at "
                             f"least {4 * opts.blocks}")

        def flat(K):
            K = np.asarray(K, dtype=np.float64)
            return np.moveaxis(K, -2, -3).reshape(K.shape[:-4] + ((T + 1) * n, (T + 1) * n))

        ss = np.random.SeedSequence(int(state.rng.integers(2 ** 63)))
        bar = state.ctx.bar(100, "fluctuations (deep)", unit="%")

        def _tick(done, total, what, _state=[0]):
            # adjoint iterations: first half of the bar; kappa samples: second half
            pct = int(50 * done / total) + (50 if what == "kappa" else 0)
            if pct > _state[0]:
                bar.update(pct - _state[0])
                _state[0] = pct
                bar.set_postfix_str(what)

        extra = {} if state.times is None else {"times": state.times}
        try:
            res = _deep_mc.deep_propagator(
                data.kx, np.asarray(data.y_train), net.activation, net.depth, train.gamma0,
                train.lr, T, f=state.f_all, phi=flat(sol.phi), g=flat(sol.g), A=flat(sol.A),
                B=flat(sol.B), center=opts.center, ntk=opts.ntk, samples=samples,
                kappa_samples=ks, seed=ss, blocks=opts.blocks, progress=_tick, logger=logger,
                **extra)
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
        if opts.ntk:
            state.stderr["ntk_var"] = res["ntk_var_se"]
        state.options.update(samples=int(samples), kappa_samples=int(ks),
                             residual=float(res["residual"]))
        if res.get("fixed_point_gap") is not None:
            state.options["fixed_point_gap"] = {k: float(v) for k, v in
                                                res["fixed_point_gap"].items()}
        return res


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
        ``"deep-propagator"`` only: samples (<= ``samples``) for the single-site covariance
        kappa (default 8192; per-sample Jacobians and Hessians, the expensive part).
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
