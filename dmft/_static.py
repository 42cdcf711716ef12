"""``method="static"``: kernels frozen at their t = 0 infinite-width values (docs/theory.rst §4).

The lazy / static-NTK baseline: the NNGP recursion gives Phi^l and G^l at t = 0, the NTK
K = sum_l G^{l+1} * Phi^l, and the predictions follow f(t+1) = f(t) + lr K Delta(t) exactly
in discrete time, starting from f(0) = 0. The result does not depend on gamma0 (gamma0 = 0,
the lazy limit itself, is allowed) and is deterministic (``seed`` is only recorded).

Beyond one squared-error output (docs/theory.rst §7): any loss through Delta(t), C outputs
sharing the kernel (K_{mu c, nu c'} = delta_cc' K_{mu nu}, G^l likewise), batches (Delta
masked) and weight decay toward the initialisation, f(t+1) = a f(t) + lr K Delta(t) with
a = 1 - lr lambda (a kernel machine: ridge regression for mse, the soft-margin SVM for hinge).
Weight decay toward zero is refused: the initial weights shrink, so the kernel is not static
even as gamma0 -> 0 (use method="mc" or dmft.simulate).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solvers import static as _engine
from solvers.objective import Objective

from ._method import Method, Options, check_features, option
from .results import ConvergenceError, Solution


__all__ = ["solve_static", "StaticOptions", "STATIC"]


def _quad_order(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
        raise ValueError(f"{name} must be an integer >= 2 (quadrature nodes per axis) or "
                         f"None for automatic, got {value!r}")
    return int(value)


def _quad_tol(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class StaticOptions(Options):
    """Options of ``method="static"`` (see :func:`solve_static`)."""

    quad_order: int | None = option(None, _quad_order, "quadrature nodes per axis (tanh)")
    quad_tol: float = option(1e-12, _quad_tol, "target error of the automatic quadrature")


class Static(Method, name="static", options=StaticOptions):
    """Frozen-kernel (static NTK / NNGP) solution of the training dynamics.

    Parameters
    ----------
    net, data, train : MLP, Dataset, GradientDescent
        Specification. ``train.gamma0`` is ignored (any value >= 0, including 0).
    seed : optional
        Recorded for provenance only: the method draws no random numbers.
    throw : bool
        If True, an unstable learning rate for the squared error (lr > (1 + a) /
        lambda_max(K_train), a = 1 - lr weight_decay, so that ``|a - lr lambda_max| > 1``
        and the error grows geometrically) raises :class:`~dmft.results.ConvergenceError`;
        if False the (diverging) trajectory is returned with ``converged=False`` and
        ``status="diverged"``.
    quad_order : int, optional
        Quadrature nodes per axis for activations without closed-form Gaussian
        expectations (tanh); default: chosen from the largest variance so that the error
        is below ``quad_tol`` (:func:`solvers.gaussian.auto_order`).
    quad_tol : float
        Target absolute error of the automatic quadrature (default 1e-12).

    Returns
    -------
    Solution
        ``ntk`` (T+1, n, n), ``phi`` / ``g`` (L, T+1, T+1, n, n), all constant in time (with
        C >= 2 outputs ``train_predictions`` (T+1, P, C), ``ntk`` (T+1, n, C, n, C) =
        delta_cc' K and ``g`` (L, T+1, T+1, n, C, n, C) = delta_cc' G^l);
        ``A = B = None``; ``iterations = 0``; ``stderr = {}``. ``extras``: ``kx`` (n, n) the
        input kernel Phi^0, ``gdot`` (L, n, n) the derivative kernels E[phi' phi'^T],
        ``ntk_eigvals`` (P,) the eigenvalues of K on the training points (the largest stable
        lr is 2 / their maximum).
    """

    description = "frozen kernels at their t = 0 infinite-width values (static NTK / NNGP)"
    #: weight decay toward zero is not a frozen-kernel problem (module docstring)
    supports = frozenset({"outputs", "losses", "hinge", "weight_decay", "batches",
                          "barlow_twins", "output_offset"})

    def __call__(self, *args, **kwargs):
        if len(args) >= 3:
            train = args[2]
            if getattr(train, "weight_decay", 0) > 0 and getattr(train, "decay_to", "") == "zero":
                raise ValueError(
                    "method='static' does not solve weight decay toward zero: the initial "
                    "weights shrink by a^t, so the kernel moves even at gamma0 -> 0 (not a "
                    "static-kernel problem); use method='mc' or dmft.simulate, or "
                    "decay_to='init' (the kernel-machine limit)")
            check_features(self.label, self.supports, *args[:3])
        return super().__call__(*args, **kwargs)

    def estimate(self, net, data, train, *, opts):
        """phi, g (L, T+1, T+1, n, n) dominate; time: the elements written plus the kernel
        recursion (~1000 quadrature operations per layer and pair of points)."""
        from ._resources import estimate, kernel_bytes
        L, n, T1 = net.depth, data.P + data.Q, train.steps + 1
        result = 2 * kernel_bytes(L, T1, n) + 8 * T1 * n * n + 16 * T1 * n
        work = 8 * 8 * L * n * n + 8 * 4 * T1 * n
        units = 2 * L * T1 ** 2 * n ** 2 + 1000 * L * n ** 2
        return estimate("static", result, result + work, units,
                        f"phi, g: 2 x (L={L}, T+1={T1}, T+1, n={n}, n) float64",
                        knobs="steps / points / depth")

    def run(self, ctx, net, data, train, *, opts) -> Solution:
        L, P, n, T = net.depth, data.P, data.P + data.Q, train.steps
        multi, C = bool(data.multi_output), data.C
        quad = {"tol": opts.quad_tol}
        if opts.quad_order is not None:
            quad["order"] = opts.quad_order
        try:
            kern = _engine.static_kernels(net.activation, data.kx, L, **quad)
        except (ValueError, FloatingPointError) as exc:
            raise ConvergenceError(f"static kernels could not be computed: {exc}") from exc
        K = kern["ntk"]
        if not np.all(np.isfinite(K)):
            raise ConvergenceError("the static NTK is not finite (overflow in the kernel "
                                   "recursion); rescale the inputs X")

        eig = np.linalg.eigvalsh(K[:P, :P])
        obj = Objective.from_specs(data, train, net)
        a = obj.a
        # mse: f <- (a - lr K) f + ..., stable iff lr lambda_max < 1 + a (2 without decay);
        # the other losses have smaller curvature (softmax <= 1/2, logistic 1/4, hinge 0), so
        # the same bound is sufficient for them and only the squared error is judged by it
        lr_max = (1.0 + a) / eig.max() if eig.max() > 0 else np.inf
        if obj.plain:
            f = _engine.frozen_dynamics(K, data.y_train, train.lr, T)
        else:
            f = _engine.frozen_dynamics_objective(K, obj)
            if not multi:
                f = f[..., 0]

        # real arrays, constant in (t, s): later code may write into them
        phi = np.empty((L, T + 1, T + 1, n, n))
        phi[...] = kern["phi"][:, None, None]
        if multi:
            # outputs decouple at t = 0: G^l_{mu c, nu c'} = delta_cc' G^l_{mu nu}
            eye = np.eye(C)
            g = np.empty((L, T + 1, T + 1, n, C, n, C))
            g[...] = (kern["g"][:, :, None, :, None] * eye[:, None, :])[:, None, None]
            ntk = np.empty((T + 1, n, C, n, C))
            ntk[...] = K[:, None, :, None] * eye[:, None, :]
        else:
            g = np.empty_like(phi)
            g[...] = kern["g"][:, None, None]
            ntk = np.empty((T + 1, n, n))
            ntk[...] = K

        sol = Solution(
            net=net, data=data, train=train, method="static", t=train.times,
            train_predictions=f[:, :P].copy(), test_predictions=f[:, P:].copy(),
            ntk=ntk, phi=phi, g=g, iterations=0, seed=ctx.seed_int,
            options={"quad_order": opts.quad_order, "quad_tol": opts.quad_tol},
            extras={"kx": kern["kx"], "gdot": kern["gdot"], "ntk_eigvals": eig})
        # full batch only: with batches each step sees a sub-kernel (smaller lambda_max) and
        # the generic divergence rule judges the trajectory
        if train.lr > lr_max and train.loss == "mse" and obj.mask is None:
            return sol.fail("diverged", (
                f"lr = {train.lr:g} is unstable for the frozen NTK: lambda_max(K_train) = "
                f"{eig.max():.6g} gives |{a:g} - lr lambda_max| = "
                f"{abs(a - train.lr * eig.max()):.4g} > 1, so the training error grows "
                f"geometrically; the largest stable learning rate is "
                f"{'2' if a == 1.0 else '(1 + a)'} / lambda_max = {lr_max:.6g}"))
        if not np.all(np.isfinite(f)):
            return sol.fail("diverged", "non-finite predictions in the frozen-kernel dynamics")
        return sol


STATIC = Static()


#: ``solve_static(net, data, train, *, seed=None, throw=True, progress=None, **options)``
solve_static = STATIC
