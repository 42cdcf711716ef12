"""A reference infinite-width solution of two-layer networks, independent of ``method="mc"``.

:func:`solve_two_layer` marches a population of single-site samples forward with the
predictions read from the population at each step (at L = 1 no outer iteration is needed;
docs/theory.rst §2). The tests and ``benchmarks/fluctuations.py`` linearise the propagators
around it, so that they do not depend on the solver they are compared with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solvers import fluct as _engine
from solvers.activations import apply
from solvers.layout import two_time

from solvers.objective import Objective

from ._method import FEATURES, Method, Options, option, positive_int
from .results import ConvergenceError, Solution

__all__ = ["solve_two_layer", "TwoLayerMarch", "TwoLayerMarchOptions"]


@dataclass(frozen=True)
class TwoLayerMarchOptions(Options):
    """Options of :func:`solve_two_layer`."""

    samples: int = option(100_000, positive_int(" (population size, e.g. 100000)"), "pairs")
    kernel_samples: int = option(4096, positive_int(" (e.g. 4096)"), "for phi and g")


class TwoLayerMarch(Method, name="two-layer-march", options=TwoLayerMarchOptions):
    """Infinite-width two-layer dynamics by a self-consistent population march.

    A hidden unit is a sample (u ~ N(0, Phi^0), w0 ~ N(0, 1)); at each step the predictions are
    the population mean of w phi(h) / gamma0 and every sample moves one step under
    Delta = y - f (docs/theory.rst §2, "Two-layer networks"). Samples come in antithetic pairs
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

    description = "two-layer networks: self-consistent population march (reference solver)"
    #: every objective of docs/theory.rst §7 (the march is the finite network's own update)
    supports = frozenset(FEATURES)

    def estimate(self, net, data, train, *, opts):
        """The population (samples x n fields), the kernel samples' histories and features
        (ks, T1 n) and phi, g flat and two-time."""
        from ._resources import estimate, kernel_bytes
        n, P, T1 = data.P + data.Q, data.P, train.steps + 1
        S = 2 * max(1, opts.samples // 2)
        ks = min(opts.kernel_samples, S)
        K1 = kernel_bytes(1, T1, n)
        result = 2 * K1 + 8 * 4 * T1 * n * n
        work = 8 * S * (8 * n + 4) + 8 * 4 * ks * T1 * (n + 1) + 2 * K1
        units = S * T1 * n * (2 * P + 20) + 2 * ks * (T1 * n) ** 2
        return estimate("two-layer-march", result, result + work, units,
                        f"{S} samples, kernels from {ks}", knobs="steps / points / samples")

    def run(self, ctx, net, data, train, *, opts) -> Solution:
        if net.depth != 1:
            raise NotImplementedError("solve_two_layer handles two-layer networks (depth=1) only")
        if train.gamma0 <= 0:
            raise ValueError("solve_two_layer needs gamma0 > 0; use method='static' for gamma0 = 0")
        samples, kernel_samples = opts.samples, opts.kernel_samples
        half = max(1, samples // 2)
        rng = ctx.rng()
        kx = data.kx
        obj = Objective.from_specs(data, train, net) if hasattr(train, "loss") else None
        if obj is not None and not obj.plain:
            return self._run_objective(ctx, net, data, train, obj, half, kernel_samples, rng)
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
        ph = apply(net.activation, h, 0).reshape(idx.size, (T + 1) * n)
        g = (apply(net.activation, h, 1) * w[:, :, None]).reshape(idx.size, (T + 1) * n)
        phi = two_time(ph.T @ ph / idx.size, T + 1, n)[None]
        gg = two_time(g.T @ g / idx.size, T + 1, n)[None]
        f = pop["f"]
        return Solution(net=net, data=data, train=train, method="two-layer-march", t=train.times,
                        train_predictions=f[:, :P].copy(), test_predictions=f[:, P:].copy(),
                        ntk=pop["ntk"], phi=phi, g=gg,
                        converged=True, iterations=0, stderr={
                            "train_predictions": pop["f_stderr"][:, :P].copy(),
                            "test_predictions": pop["f_stderr"][:, P:].copy()},
                        seed=ctx.seed_int,
                        options={"samples": 2 * half, "kernel_samples": int(idx.size),
                                 "antithetic": True})


    def _run_objective(self, ctx, net, data, train, obj, half, kernel_samples, rng):
        """C outputs, any loss, weight decay, batches (docs/theory.rst §7): the same march
        with w of shape (samples, C); antithetic pairs negate every output's weight."""
        kx = data.kx
        T, P, n, C = train.steps, data.P, data.P + data.Q, obj.C
        u, w0 = _engine.draw_units_multi(kx, half, C, rng)
        u2 = np.concatenate([u, u])
        w2 = np.concatenate([w0, -w0])
        try:
            pop = _engine.population_march_objective(net.activation, u2, w2, kx, obj,
                                                     train.gamma0, antithetic=True)
        except FloatingPointError as exc:
            raise ConvergenceError(f"solve_two_layer: {exc}; reduce lr or gamma0") from exc
        ks = min(kernel_samples, 2 * half)
        idx = np.r_[0:(ks + 1) // 2, half:half + ks // 2]
        h, w = _engine.march_multi(net.activation, u2[idx], w2[idx], kx, pop["delta"],
                                   train.lr * train.gamma0, obj.a, obj.decay_to)
        ph = apply(net.activation, h, 0).reshape(idx.size, (T + 1) * n)
        g = (apply(net.activation, h, 1)[:, :, :, None] * w[:, :, None, :]).reshape(
            idx.size, (T + 1) * n * C)
        phi = two_time(ph.T @ ph / idx.size, T + 1, n)[None]
        gg = two_time(g.T @ g / idx.size, T + 1, n * C)[None]
        f, fse, ntk = pop["f"], pop["f_stderr"], pop["ntk"]
        if data.multi_output:
            gg = gg.reshape(1, T + 1, T + 1, n, C, n, C)
        else:
            f, fse, ntk = f[..., 0], fse[..., 0], ntk[:, :, 0, :, 0]
        return Solution(net=net, data=data, train=train, method="two-layer-march",
                        t=train.times, train_predictions=f[:, :P].copy(),
                        test_predictions=f[:, P:].copy(), ntk=np.ascontiguousarray(ntk),
                        phi=phi, g=gg, converged=True, iterations=0, stderr={
                            "train_predictions": fse[:, :P].copy(),
                            "test_predictions": fse[:, P:].copy()},
                        seed=ctx.seed_int,
                        options={"samples": 2 * half, "kernel_samples": int(idx.size),
                                 "antithetic": True})


TWO_LAYER_MARCH = TwoLayerMarch()


#: ``solve_two_layer(net, data, train, *, seed=None, throw=True, progress=None, **options)``
solve_two_layer = TWO_LAYER_MARCH
