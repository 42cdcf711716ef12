"""``dmft.fluctuations``: O(1/width) fluctuations around an infinite-width solution (THEORY.md §5).

An adapter: validates the options, turns the Solution into arrays (the error signal
Delta(t) = y - f(t) on the training points, the input kernel Phi^0), calls an engine from
:mod:`solvers.fluct` and wraps the result in a :class:`~dmft.results.Fluctuations`.

Methods (``method=``):

``"propagator"``
    Two-layer networks (L = 1), any smooth activation, any gamma0 > 0: single-site samples
    marched under the solution's Delta(t); N Cov(f) = (I + J E)^{-1} kappa (I + J E)^{-T} with
    J = d<O>/dDelta from forward-mode tangents and kappa the single-site covariance (it contains
    the initial-output variance Phi^1 / gamma0^2 unless ``center=True``). Monte Carlo standard
    errors by batch means.
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
    order parameters (:mod:`solvers.fluct_deep`). No sampling. At depth 1 it equals
    ``"linear-exact"`` to rounding.
``"deep-propagator"``
    Deep networks (depth >= 2) with a smooth activation (tanh, erf; linear as a check): the
    same propagator with sampled single-site fields (:mod:`solvers.fluct_mc`): the linear
    response of the Monte Carlo single-site map (PyTorch, sources reparameterised, responses
    by Stein's lemma) gives the adjoint rows d obs / dE, and kappa, with the formal MSR
    cumulants of the response order parameters, comes from per-sample Jacobians and
    Hessians of each layer's march. Reduces to ``"deep-linear"`` for linear networks (a
    test). Standard errors: batch means of kappa's samples (not the map's sampling, whose
    effect is below them at the default ``samples``). Cost grows like (n (T+1))^3 per
    sample: meant for modest n (T+1) (tens to ~100).
``"auto"``
    ``"lazy"`` for a ``method="static"`` solution or gamma0 = 0, ``"linear-exact"`` for a
    two-layer linear network, ``"deep-linear"`` for a deeper linear one,
    ``"deep-propagator"`` for a deep nonlinear one, else ``"propagator"``.

Also here: :func:`solve_two_layer`, the infinite-width two-layer dynamics by a self-consistent
forward march of a sample population (no outer iteration is needed at L = 1), used by the tests
and the benchmark as a reference Solution independent of ``method="mc"``.
"""
from __future__ import annotations

import numbers
import time

import numpy as np

from solvers import fluct as _engine
from solvers import fluct_deep as _deep
from solvers import fluct_mc as _deep_mc

from ._progress import logger, progress_bar
from .results import ConvergenceError, Fluctuations, Solution
from .specs import MLP, Dataset, GradientDescent, check_positive_int

__all__ = ["fluctuations", "solve_two_layer", "FLUCTUATION_METHODS"]

FLUCTUATION_METHODS = ("auto", "propagator", "lazy", "linear-exact", "deep-linear",
                       "deep-propagator")
_MOMENTS = ("auto", "exact", "sampled")
DEFAULT_SAMPLES = {"propagator": 20_000, "lazy": 200_000, "deep-propagator": 16384}
#: single-site samples for kappa (per-sample Jacobians and Hessians) in "deep-propagator"
DEFAULT_KAPPA_SAMPLES = 8192


def _rng(seed):
    if seed is None or isinstance(seed, np.random.SeedSequence):
        return np.random.default_rng(seed)
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0:
        return np.random.default_rng(int(seed))
    raise ValueError(f"seed must be a non-negative integer, a numpy.random.SeedSequence or "
                     f"None, got {seed!r}")


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _delta(sol: Solution, center: bool) -> np.ndarray:
    """(T, P) infinite-width error signal Delta(t) = y - f(t), t = 0 .. T-1."""
    f = np.asarray(sol.train_predictions, dtype=np.float64)
    if center:
        # at infinite width f(0) = 0; a Monte Carlo solution carries noise there, which the
        # centred model removes by construction
        f = f - f[:1]
    return np.asarray(sol.data.y_train)[None, :] - f[:-1]


def fluctuations(sol, *, method: str = "auto", samples=None, seed=None, center=False,
                 blocks: int = 10, chunk=None, ntk=True, moments: str = "auto",
                 kappa_samples=None, progress=None, **unknown) -> Fluctuations:
    """Leading-order finite-width fluctuations N Cov over initialisations (THEORY.md §5).

    Parameters
    ----------
    sol : Solution
        Infinite-width solution (``dmft.solve``) of a two-layer network (depth 1) or of a
        linear network of any depth. Its error signal Delta(t) = y - f(t) is the point of
        linearisation (``"propagator"``); ``"deep-linear"`` and ``"linear-exact"`` recompute
        the exact infinite-width trajectory and report its distance to ``sol`` in
        ``options["max_prediction_gap"]``.
    method : str
        ``"auto"``, ``"propagator"``, ``"lazy"``, ``"linear-exact"`` or ``"deep-linear"``
        (module docstring).
    samples : int, optional
        Single-site samples (default 20 000 for ``"propagator"``, 200 000 for sampled lazy
        moments, 16384 per layer for the map of ``"deep-propagator"``). The relative Monte Carlo error of the covariances is about sqrt(2 / samples)
        times a problem-dependent factor; ``stderr`` reports it.
    seed : int or SeedSequence, optional
        Seed of the single-site samples; the same seed gives bit-identical results.
    center : bool
        Fluctuations of the centred model f(theta) - f(theta_0) (``simulate(..., center=True)``):
        no initial-output variance, Delta from centred predictions.
    blocks : int
        Batch-means blocks (>= 2) for the standard errors.
    chunk : int, optional
        Samples processed together (memory ~ chunk P T (P + 1 + 3 (P+Q)) floats; default
        about 32 MB, :func:`solvers.fluct.default_chunk`). Does not change the result
        beyond rounding.
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

    Returns
    -------
    Fluctuations
        ``prediction_cov`` (T+1, n, n): N Cov[f_mu(t), f_nu(t)]; ``ntk_var`` (T+1, n, n):
        N Var[K_mu,nu(t)] (NaN when ``ntk=False``); ``stderr`` with the same keys (Monte Carlo
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
        Bad options or a solution the method cannot use.
    NotImplementedError
        ``"propagator"``/``"linear-exact"`` at depth > 1, sampled lazy moments at depth > 1,
        and ReLU with ``"propagator"`` or ``"deep-propagator"`` (their derivatives miss the
        phi'' = delta term; ``method="lazy"`` handles two-layer ReLU).
    ConvergenceError
        The single-site fields or the linearised dynamics diverged.
    """
    start = time.perf_counter()
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for fluctuations; known options: "
                         f"method, samples, seed, center, blocks, chunk, ntk, moments, "
                         f"kappa_samples, progress")
    if not isinstance(sol, Solution):
        raise ValueError(f"sol must be a dmft.Solution (from dmft.solve), got "
                         f"{type(sol).__name__}; for an Ensemble of simulated networks use "
                         f"ens.var() and multiply by ens.width")
    if not isinstance(method, str) or method not in FLUCTUATION_METHODS:
        raise ValueError(f"method {method!r} is unknown; use one of {list(FLUCTUATION_METHODS)}")
    center = _check_bool("center", center)
    ntk = _check_bool("ntk", ntk)
    blocks = check_positive_int("blocks", blocks, " >= 2 (batch-means blocks for the error "
                                "bars), e.g. blocks=10")
    if blocks < 2:
        raise ValueError(f"blocks must be an integer >= 2 (batch-means blocks for the error "
                         f"bars), got {blocks}")
    if chunk is not None:
        chunk = check_positive_int("chunk", chunk, " (samples per batch, e.g. chunk=256) or None")
    if not isinstance(moments, str) or moments not in _MOMENTS:
        raise ValueError(f"moments {moments!r} is unknown; use one of {list(_MOMENTS)}")
    net, data, train = sol.net, sol.data, sol.train
    gamma0 = train.gamma0
    if method == "auto":
        if sol.method == "static" or gamma0 == 0:
            method = "lazy"
        elif net.linear:
            method = "linear-exact" if net.depth == 1 else "deep-linear"
        else:
            method = "propagator" if net.depth == 1 else "deep-propagator"
    if net.depth != 1 and method in ("propagator", "linear-exact"):
        raise NotImplementedError(
            f"method={method!r} handles two-layer networks (depth=1) only; for a deep "
            f"network (depth={net.depth}) use method='deep-propagator' (or 'deep-linear' for "
            f"a linear one, or 'auto')")
    if method == "deep-propagator":
        if net.depth < 2:
            raise ValueError("method='deep-propagator' needs depth >= 2; a two-layer network "
                             "uses method='propagator'")
        if net.activation == "relu":
            raise NotImplementedError(
                "method='deep-propagator' does not support relu: the derivative of the "
                "sampled single-site map misses the phi'' = delta term; use tanh or erf")
        if sol.A is None or sol.B is None:
            raise ValueError(f"method='deep-propagator' linearises around the responses A, B "
                             f"of the solution; sol (method={sol.method!r}) has none: solve "
                             f"with method='mc' (or 'linear' for a linear network)")
    if samples is not None or method in ("propagator", "deep-propagator") or (
            method == "lazy" and not (moments in ("auto", "exact") and net.linear)):
        if samples is None:
            samples = DEFAULT_SAMPLES[method if method in DEFAULT_SAMPLES else "lazy"]
        samples = check_positive_int("samples", samples, " (single-site samples, e.g. "
                                     "samples=20000)")
        if samples < 2 * blocks:
            raise ValueError(f"samples={samples} is too small for blocks={blocks}: need at least "
                             f"2 samples per block; increase samples (e.g. samples=20000)")
    f_all = np.concatenate([sol.train_predictions, sol.test_predictions], axis=1)
    if not np.all(np.isfinite(f_all)) or not np.all(np.isfinite(sol.ntk[0])):
        raise ValueError("sol has non-finite predictions or NTK; fluctuations need a finite "
                         "infinite-width solution (reduce lr or gamma0 in the solve)")
    kx = data.kx
    T, P, n = train.steps, data.P, data.P + data.Q
    rng = _rng(seed)
    options = {"method": method, "center": center, "blocks": blocks, "chunk": chunk,
               "ntk": ntk, "seed": int(seed) if isinstance(seed, numbers.Integral) else None}
    stderr, extras = {}, {}

    try:
        if method == "propagator":
            if gamma0 <= 0:
                raise ValueError("method='propagator' needs gamma0 > 0; use method='lazy' for "
                                 "the gamma0 -> 0 limit")
            if net.activation == "relu":
                raise NotImplementedError(
                    "method='propagator' does not support relu: the per-sample tangents miss "
                    "the phi'' = delta(h) contribution; use a smooth activation (tanh, erf) or "
                    "method='lazy' for the gamma0 -> 0 limit")
            u, w0 = _engine.draw_units(kx, samples, rng)
            bar = progress_bar(samples, "fluctuations", progress, unit="sample")
            try:
                res = _engine.two_layer_propagator(
                    net.activation, u, w0, kx, _delta(sol, center), gamma0, train.lr,
                    center=center, blocks=blocks, chunk=chunk, ntk=ntk, progress=bar.update)
            finally:
                bar.close()
            stderr["prediction_cov"] = res["pred_cov_stderr"]
            if ntk:
                stderr["ntk_var"] = res["ntk_var_stderr"]
            extras["response"] = res["response"]
            extras["kappa"] = res["kappa"]
            options["samples"] = samples
        elif method == "lazy":
            if not center and gamma0 <= 0:
                raise ValueError(
                    "the initial-output variance Phi^1 / gamma0^2 is infinite at gamma0 = 0; "
                    "use center=True (the centred model f - f(theta_0)) or a gamma0 > 0")
            g0 = None if center else gamma0
            K = np.asarray(sol.ntk[0], dtype=np.float64)
            delta = _engine.lazy_delta(K, np.asarray(data.y_train), train.lr, T)
            use_exact = net.linear and moments in ("auto", "exact")
            if moments == "exact" and not net.linear:
                raise ValueError(f"moments='exact' is available for linear networks only, got "
                                 f"activation={net.activation!r}; use moments='sampled'")
            if net.depth != 1 and not use_exact:
                raise NotImplementedError(
                    f"sampled lazy moments are implemented for two-layer networks only "
                    f"(depth={net.depth}, activation={net.activation!r}): a deep linear network "
                    f"uses moments='exact'; a deep nonlinear one needs a method='mc' solution "
                    f"and method='deep-propagator'")
            if use_exact and net.depth != 1:
                kf, kK = _deep.deep_linear_lazy_kappa(kx, net.depth, g0)
                res = _engine.lazy_propagator(K, delta, train.lr, kK, kf)
                options["moments"] = "exact"
            elif use_exact:
                kf, kK = _engine.linear_lazy_moments(kx, g0)
                res = _engine.lazy_propagator(K, delta, train.lr, kK, kf)
                options["moments"] = "exact"
            else:
                u, w0 = _engine.draw_units(kx, samples, rng)
                mom = _engine.sampled_lazy_moments(net.activation, u, w0, kx, g0, blocks)
                res = _engine.lazy_propagator(K, delta, train.lr, mom["kappa_K"],
                                              mom["kappa_f0"])
                per = [_engine.lazy_propagator(K, delta, train.lr, b["kappa_K"], b["kappa_f0"])
                       for b in mom["blocks"]]
                for key, name in (("pred_cov", "prediction_cov"), ("ntk_var", "ntk_var")):
                    arr = np.stack([r[key] for r in per])
                    stderr[name] = arr.std(axis=0, ddof=1) / np.sqrt(blocks)
                options["moments"] = "sampled"
                options["samples"] = samples
                extras["sampled_ntk"] = mom["mean_K"]
            extras["lazy_delta"] = delta
        elif method == "deep-propagator":
            if gamma0 <= 0:
                raise ValueError("method='deep-propagator' needs gamma0 > 0; use "
                                 "method='lazy' for the gamma0 -> 0 limit")
            ks = DEFAULT_KAPPA_SAMPLES if kappa_samples is None else check_positive_int(
                "kappa_samples", kappa_samples, " (samples for kappa, e.g. 8192)")
            ks = min(ks, samples)
            if ks < 4 * blocks:
                raise ValueError(f"kappa_samples={ks} is too small for blocks={blocks}; use at "
                                 f"least {4 * blocks}")
            flat = lambda K: np.moveaxis(np.asarray(K, dtype=np.float64), -2, -3).reshape(  # noqa: E731
                K.shape[:-4] + ((T + 1) * n, (T + 1) * n))
            ss = np.random.SeedSequence(int(rng.integers(2 ** 63)))
            bar = progress_bar(100, "fluctuations (deep)", progress, unit="%")

            def _tick(done, total, what, _state=[0]):
                # adjoint iterations: first half of the bar; kappa samples: second half
                pct = int(50 * done / total) + (50 if what == "kappa" else 0)
                if pct > _state[0]:
                    bar.update(pct - _state[0])
                    _state[0] = pct
                    bar.set_postfix_str(what)

            try:
                res = _deep_mc.deep_propagator(
                    kx, np.asarray(data.y_train), net.activation, net.depth, gamma0, train.lr,
                    T, f=f_all, phi=flat(sol.phi), g=flat(sol.g), A=flat(sol.A),
                    B=flat(sol.B), center=center, ntk=ntk, samples=samples,
                    kappa_samples=ks, seed=ss, blocks=blocks, progress=_tick, logger=logger)
            finally:
                bar.close()
            if not (np.all(np.isfinite(res["cov"])) and res["residual"] < 1e-6):
                raise ConvergenceError(
                    f"fluctuations (deep-propagator): the adjoint iteration of the linearised "
                    f"single-site map did not converge (relative change {res['residual']:.3g} "
                    f"after the last iteration): the sampled map's Jacobian has an eigenvalue "
                    f"of modulus >= 1, from unstable dynamics or from sampling noise amplified "
                    f"by near-degenerate two-time kernels; use more samples, fewer steps, or "
                    f"a smaller lr or gamma0")
            stderr["prediction_cov"] = res["pred_cov_se"]
            if ntk:
                stderr["ntk_var"] = res["ntk_var_se"]
            options.update(samples=int(samples), kappa_samples=int(ks),
                           residual=float(res["residual"]))
        elif method == "deep-linear":
            if not net.linear:
                raise ValueError(f"method='deep-linear' needs a linear network, got "
                                 f"activation={net.activation!r}")
            if gamma0 <= 0:
                raise ValueError("method='deep-linear' needs gamma0 > 0; use method='lazy' "
                                 "for the gamma0 -> 0 limit")
            res = _deep.deep_linear_propagator(kx, np.asarray(data.y_train), net.depth, gamma0,
                                               train.lr, T, center=center, ntk=ntk)
            if not (np.all(np.isfinite(res["f"])) and res["residual"] < 1e-8 * max(
                    1.0, float(np.max(np.abs(res["f"]))))):
                raise ConvergenceError(
                    f"fluctuations (deep-linear): the infinite-width fixed point diverged or "
                    f"did not converge (residual {res['residual']:.3g}); reduce lr or gamma0")
            ref = f_all - (f_all[:1] if center else 0.0)
            options["max_prediction_gap"] = float(np.max(np.abs(res["f"] - ref)))
            options["residual"] = res["residual"]
            extras["exact_predictions"] = res["f"]
            extras["exact_ntk"] = res["ntk_mean"]
        else:  # linear-exact
            if not net.linear:
                raise ValueError(f"method='linear-exact' needs a linear network, got "
                                 f"activation={net.activation!r}; use method='propagator'")
            if gamma0 <= 0:
                raise ValueError("method='linear-exact' needs gamma0 > 0; use method='lazy' "
                                 "for the gamma0 -> 0 limit")
            res = _engine.linear_exact_fluctuations(kx, np.asarray(data.y_train), gamma0,
                                                    train.lr, T, center)
            ref = f_all - (f_all[:1] if center else 0.0)
            options["max_prediction_gap"] = float(np.max(np.abs(res["f"] - ref)))
            extras["exact_predictions"] = res["f"]
    except FloatingPointError as exc:
        raise ConvergenceError(f"fluctuations ({method}): {exc}") from exc

    cov2 = res["cov"]
    if not np.all(np.isfinite(cov2)):
        raise ConvergenceError(f"fluctuations ({method}): non-finite covariance (the "
                               f"linearised dynamics diverged); reduce lr or gamma0")
    extras["prediction_cov_two_time"] = cov2
    ntk_var = res["ntk_var"] if ntk and res.get("ntk_var") is not None else \
        np.full((T + 1, n, n), np.nan)
    return Fluctuations(solution=sol, prediction_cov=res["pred_cov"], ntk_var=ntk_var,
                        center=center, method=method, stderr=stderr,
                        elapsed=time.perf_counter() - start, options=options, extras=extras)


def solve_two_layer(net: MLP, data: Dataset, train: GradientDescent, *, seed=None,
                    throw: bool = True, samples: int = 100_000, kernel_samples: int = 4096,
                    **unknown) -> Solution:
    """Infinite-width two-layer dynamics by a self-consistent population march.

    A hidden unit is a sample (u ~ N(0, Phi^0), w0 ~ N(0, 1)); at each step the predictions are
    the population mean of w phi(h) / gamma0 and every sample moves one step under
    Delta = y - f (THEORY.md §2, "Two-layer networks"). Samples come in antithetic pairs
    (u, w0), (u, -w0), which cancel the t = 0 output exactly. An adapter with the signature of
    :data:`dmft.api.METHODS` entries; independent of ``method="mc"``.

    Parameters
    ----------
    samples : int
        Population size (even; pairs). Prediction error ~ 1/sqrt(samples) (``stderr``).
    kernel_samples : int
        Samples (<= samples) used for the two-time kernels ``phi`` and ``g``.

    Returns
    -------
    Solution
        method ``"two-layer-march"``; ``stderr["train_predictions"]``,
        ``stderr["test_predictions"]``.
    """
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for solve_two_layer; known: "
                         f"samples, kernel_samples, seed, throw")
    if net.depth != 1:
        raise NotImplementedError("solve_two_layer handles two-layer networks (depth=1) only")
    if train.gamma0 <= 0:
        raise ValueError("solve_two_layer needs gamma0 > 0; use method='static' for gamma0 = 0")
    samples = check_positive_int("samples", samples, " (population size, e.g. 100000)")
    kernel_samples = check_positive_int("kernel_samples", kernel_samples, " (e.g. 4096)")
    start = time.perf_counter()
    half = max(1, samples // 2)
    rng = _rng(seed)
    kx = data.kx
    u, w0 = _engine.draw_units(kx, half, rng)
    u2 = np.concatenate([u, u])
    w2 = np.concatenate([w0, -w0])
    T, P, n = train.steps, data.P, data.P + data.Q
    try:
        pop = _engine.population_march(net.activation, u2, w2, kx, np.asarray(data.y_train),
                                       train.gamma0, train.lr, T, antithetic=True)
    except FloatingPointError as exc:
        raise ConvergenceError(f"solve_two_layer: {exc}; reduce lr or gamma0") from exc
    ks = min(kernel_samples, 2 * half)
    idx = np.r_[0:(ks + 1) // 2, half:half + ks // 2]
    h, w = _engine.march(net.activation, u2[idx], w2[idx], kx, pop["delta"],
                         train.lr * train.gamma0)
    from solvers.activations import apply
    ph = apply(net.activation, h, 0).reshape(idx.size, (T + 1) * n)
    g = (apply(net.activation, h, 1) * w[:, :, None]).reshape(idx.size, (T + 1) * n)
    phi = (ph.T @ ph / idx.size).reshape(T + 1, n, T + 1, n).transpose(0, 2, 1, 3)[None]
    gg = (g.T @ g / idx.size).reshape(T + 1, n, T + 1, n).transpose(0, 2, 1, 3)[None]
    f = pop["f"]
    return Solution(net=net, data=data, train=train, method="two-layer-march", t=train.times,
                    train_predictions=f[:, :P].copy(), test_predictions=f[:, P:].copy(),
                    ntk=pop["ntk"], phi=np.ascontiguousarray(phi), g=np.ascontiguousarray(gg),
                    converged=True, iterations=0, stderr={
                        "train_predictions": pop["f_stderr"][:, :P].copy(),
                        "test_predictions": pop["f_stderr"][:, P:].copy()},
                    seed=int(seed) if isinstance(seed, numbers.Integral) else None,
                    elapsed=time.perf_counter() - start,
                    options={"samples": 2 * half, "kernel_samples": int(idx.size),
                             "antithetic": True})
