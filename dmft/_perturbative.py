"""``method="perturbative"``: leading order in gamma0^2 around the lazy dynamics.

Theory: docs/theory.rst §4.

Every order parameter is expanded as q = q0 + gamma0^2 q2 + O(gamma0^4) around the static
(lazy, gamma0 -> 0) solution, in exact discrete time: the kernels move at O(gamma0^2) with the
lazy error signal Delta0(t), and the predictions change at O(gamma0^2) through the NTK
correction (plus the discrete-time lr^2 gamma0^2 terms). The derivation is in the docstring of
the engine :mod:`solvers.perturbative`; for P = 1, L = 1 under gradient flow it reduces to
K = 2 + 4 gamma0^2 v^2 (the paper's Eq. (13)).

Scope: deep linear networks (any depth; exact and deterministic) and networks of any depth with
a smooth activation ("tanh", "erf"), whose O(gamma0^2) coefficients are Gaussian expectations
over the t = 0 sources estimated by (quasi-)Monte Carlo (``samples``, ``seed``): L = 1 by
:func:`solvers.perturbative.two_layer_expansion` (Richardson extrapolation of the single-site
march), L >= 2 by :func:`solvers.perturbative.deep_expansion` (order-by-order Taylor jets of
the single-site fields, responses by forward-mode tangents, Price's theorem for the sources'
covariance change; ``blocks`` independent blocks give ``stderr``). ReLU raises ``ValueError``
pointing to ``method="gia"`` / ``"mc"`` or ``"static"``: phi'' is a Dirac delta, the
coefficients contain E[phi''(u)^2] (divergent), and relu's two-time kernels move at
``O(|gamma0|)``, not O(gamma0^2) (module docstring of :mod:`solvers.perturbative`).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from solvers import perturbative as _engine
from solvers import static as _static

from ._method import Method, Options, int_at_least, option
from .results import ConvergenceError, Solution


__all__ = ["solve_perturbative", "PerturbativeOptions", "PERTURBATIVE"]

_SMOOTH = ("tanh", "erf")


@dataclass(frozen=True)
class PerturbativeOptions(Options):
    """Options of ``method="perturbative"`` (see :func:`solve_perturbative`)."""

    samples: int = option(20000, int_at_least(16, "Monte Carlo source draws for nonlinear "
                                                 "networks"), "Monte Carlo source draws")
    blocks: int = option(16, None, "independent blocks for the standard errors (L >= 2)")

    def __post_init__(self):
        super().__post_init__()
        b = self.blocks
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 2 \
                or b > self.samples // 2:
            raise ValueError(f"blocks must be an integer between 2 and samples // 2 "
                             f"(independent blocks for the standard errors of deep nonlinear "
                             f"networks), got {b!r}")


class Perturbative(Method, name="perturbative", options=PerturbativeOptions):
    """Leading-order (gamma0^2) perturbation theory around the lazy dynamics.

    Parameters
    ----------
    net, data, train : MLP, Dataset, GradientDescent
        ``net.activation`` ``"linear"`` (exact), ``"tanh"`` or ``"erf"``; any depth.
        ``train.gamma0 = 0`` gives the static solution.
    seed : int or SeedSequence, optional
        Seed of the Monte Carlo sources (nonlinear networks); the same seed gives the same
        numbers.
    samples : int
        Nonlinear networks: L = 1, antithetic pairs of Gaussian sources (default 20000);
        L >= 2, source draws per layer, rounded to ``blocks`` times a power of two (default
        20000 -> 16384; ``options["samples"]`` has the number used). Error ~ samples^-1/2,
        reported in ``stderr``. Ignored for linear networks. Cost for L >= 2: about
        10 samples n (n (T+1))^2 flops per layer.
    blocks : int
        L >= 2 nonlinear: independent sample blocks for the standard errors (default 16).
    throw : bool
        If True, non-finite results raise :class:`~dmft.results.ConvergenceError`; if False
        the result is returned with ``status="diverged"``.

    Returns
    -------
    Solution
        ``train_predictions`` (T+1, P), ``test_predictions`` (T+1, Q), ``ntk`` (T+1, n, n),
        ``phi``, ``g`` (L, T+1, T+1, n, n), each ``q0 + gamma0^2 q2``; ``A = B = None``.
        ``extras``: ``f0``, ``f2`` (T+1, n) the order-0 and order-gamma0^2 coefficients of the
        predictions, ``ntk2`` (T+1, n, n) that of the NTK, ``delta0`` (T+1, n) the lazy error
        signal; so ``f0 + g^2 f2`` evaluates the expansion at any other gamma0 = g.
        ``stderr`` (nonlinear networks): ``train_predictions``, ``test_predictions``; for
        L >= 2 also ``ntk``, ``phi``, ``g`` (Monte Carlo standard errors at this gamma0).

    Raises
    ------
    ValueError
        ReLU networks, bad ``samples`` / ``blocks``, or unknown options.
    """

    description = "leading order in gamma0^2 around the lazy dynamics"

    def run(self, ctx, net, data, train, *, opts) -> Solution:
        if not net.linear and net.activation not in _SMOOTH:
            raise ValueError(
                f"method='perturbative' handles linear networks and networks with a smooth "
                f"activation in {list(_SMOOTH)} (any depth), got activation="
                f"{net.activation!r}: the O(gamma0^2) coefficients need phi'' and phi''' (for "
                f"relu phi'' is a Dirac delta, E[phi''(u)^2] diverges and the two-time kernels "
                f"move at O(|gamma0|), so there is no gamma0^2 expansion); use method='gia' or "
                f"method='mc' (full dynamics) or method='static' (the gamma0 -> 0 limit)")
        return _expand(net, data, train, ctx.seed, int(opts.samples), int(opts.blocks))


PERTURBATIVE = Perturbative()


#: ``solve_perturbative(net, data, train, *, seed=None, throw=True, progress=None, **options)``
solve_perturbative = PERTURBATIVE


def _expand(net, data, train, seed, samples, blocks) -> Solution:
    """The expansion proper (engines :mod:`solvers.perturbative`, :mod:`solvers.static`)."""
    L, P, T = net.depth, data.P, train.steps
    n = data.P + data.Q
    kx = data.kx
    stderr, opts = {}, {"order": 2}
    with np.errstate(over="raise", invalid="raise"):
        try:
            if net.linear:
                ex = _engine.linear_expansion(kx, data.y_train, L, train.lr, T)
            elif L >= 2:
                ex = _engine.deep_expansion(kx, data.y_train, L, net.activation, train.lr, T,
                                            seed=seed, samples=int(samples),
                                            blocks=int(blocks))
                e2 = train.gamma0 ** 2
                se = e2 * ex["f2_se"]
                stderr = {"train_predictions": se[:, :P], "test_predictions": se[:, P:],
                          "ntk": e2 * ex["ntk2_se"], "phi": e2 * ex["phi2_se"],
                          "g": e2 * ex["g2_se"]}
                opts.update(samples=int(ex["samples"]), blocks=int(blocks),
                            route="jets")
            else:
                kern = _static.static_kernels(net.activation, kx, 1)
                K0 = kern["ntk"]
                ss = seed if isinstance(seed, np.random.SeedSequence) else \
                    np.random.SeedSequence(seed)
                xi = np.random.default_rng(ss).standard_normal((int(samples), n + 1))
                ex = _engine.two_layer_expansion(kx, data.y_train, K0, net.activation,
                                                 train.lr, T, xi)
                # the source's Monte Carlo error, carried by the causal propagation
                se = train.gamma0 ** 2 * ex["source2_se"]
                stderr = {"train_predictions": se[:, :P], "test_predictions": se[:, P:]}
                ex["phi0"], ex["g0"] = kern["phi"], kern["g"]
                opts.update(samples=int(samples))
            val = _engine.evaluate(ex, kx, train.gamma0)
        except FloatingPointError as exc:
            raise ConvergenceError(f"method='perturbative' overflowed: {exc}; the lazy "
                                   f"dynamics diverge at lr = {train.lr:g}, reduce lr") from exc
    f = val["f"]
    sol = Solution(
        net=net, data=data, train=train, method="perturbative", t=train.times,
        train_predictions=f[:, :P].copy(), test_predictions=f[:, P:].copy(),
        ntk=val["ntk"], phi=val["phi"], g=val["g"], A=None, B=None, iterations=0,
        stderr=stderr, seed=int(seed) if isinstance(seed, numbers.Integral) else None,
        options=opts,
        extras={"f0": ex["f0"], "f2": ex["f2"], "ntk2": ex["ntk2"], "delta0": ex["delta0"]})
    if not all(np.all(np.isfinite(x)) for x in (f, val["ntk"])):
        sol.fail("diverged", f"method='perturbative' produced non-finite values (lr = "
                             f"{train.lr:g}); the lazy dynamics are unstable, reduce lr")
    return sol
