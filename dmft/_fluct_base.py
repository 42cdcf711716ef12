"""The skeleton shared by the methods of :func:`dmft.fluctuations`: the error signal and loss
Jacobian of a solution, the checks, the run state and :class:`FluctuationMethod`, whose ``run``
validates the solution, calls the method's ``compute`` and wraps its arrays in a
:class:`~dmft.results.Fluctuations` (the methods: :mod:`dmft._fluct_two_layer`,
:mod:`dmft._fluctuations`)."""
from __future__ import annotations

import numpy as np

from solvers.objective import Objective

from ._fluct_options import DEFAULT_SAMPLES, FluctuationOptions, _resolve_times, _selected
from ._method import FEATURES, Method, features
from .results import Fluctuations, Solution


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
        from ._fluctuations import FLUCTUATION_METHODS   # the table holds this class's subclasses
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



class _TwoLayer(FluctuationMethod):
    def check(self, sol, opts):
        if sol.net.depth != 1:
            raise NotImplementedError(
                f"method={self.name!r} handles two-layer networks (depth=1) only; for a deep "
                f"network (depth={sol.net.depth}) use method='deep-propagator' (or "
                f"'deep-linear' for a linear one, or 'auto')")

