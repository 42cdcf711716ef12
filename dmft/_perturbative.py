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

Problems beyond one squared-error output (docs/theory.rst §7): for deep linear networks and
for two-layer networks with a smooth activation the expansion carries an output index, any
smooth loss (mse with C outputs, cross-entropy, logistic: the second order sees the loss only
through its Jacobian d Delta / d f at the lazy dynamics), mini-batch and online schedules, and
weight decay toward the initialisation (memory weights a^(t-1-s)):
:func:`solvers.perturbative.objective_linear_expansion` (exact) and
:func:`solvers.perturbative.objective_two_layer_expansion` (Monte Carlo and Richardson, as
for one output), checked against ``method="linear"``, the exact expansion and ``method="mc"``
in tests/test_io_objectives.py. Refused, with a ValueError naming the fix: these features for
deep (L >= 2) nonlinear networks (the jet route is written for one mse output; use
``method="mc"``), the hinge loss (its error signal jumps where y f crosses 1, so the dynamics
have no gamma0^2 expansion; use ``"mc"``, or ``"linear"`` / ``"static"``), and weight decay
toward zero (the initial-weight sources shrink like a^t; use ``"linear"`` for linear networks
or ``"mc"``).

Range: the expansion reports when it is out of its depth. The ratio
``correction/lazy = max_t |gamma0^2 K2(t)|_F / |K0|_F`` (the NTK's relative movement, i.e.
the size of the last order kept relative to the one before it, which estimates the neglected
O(gamma0^4) term relative to the O(gamma0^2) one) is stored in
``extras["correction_ratio"]``; above :data:`CORRECTION_BOUND` (1: the correction is
larger than the lazy term it corrects) the result gets ``status="not_converged"`` (raised as
ConvergenceError with ``throw=True``, returned with a logged warning with ``throw=False``);
between :data:`WARN_BOUND` (0.5) and 1 it is converged but logs a warning. Calibration
against the exact deep-linear solver (depths 1, 2, 4, gamma0 0.1-2, lr 0.2, 50 steps):
|pert - exact| / |exact - static| (the error relative to the feature-learning correction) is
0.07, 0.18, 0.27, 0.40, 0.59, 0.82, 1.1, 1.3 at ratios 0.075, 0.21, 0.38, 0.67, 0.83, 1.5,
1.9, 2.7; depth-3 tanh against the Monte Carlo DMFT (tests/test_perturbative.py): 0.17 and
0.69 at gamma0 = 0.2 and 0.4 (ratio 0.63 at 0.4).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from solvers import perturbative as _engine
from solvers import static as _static
from solvers.objective import Objective

from ._method import Method, Options, features, int_at_least, option
from ._progress import logger
from .results import Solution


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
        If True, non-finite or diverging results (``status="diverged"``) and a gamma0 outside
        the perturbative range (``status="not_converged"``, correction/lazy above 1) raise
        :class:`~dmft.results.ConvergenceError` (the result on ``exc.result``); if False the
        result is returned with that status and a logged warning.

    Returns
    -------
    Solution
        ``train_predictions`` (T+1, P), ``test_predictions`` (T+1, Q), ``ntk`` (T+1, n, n),
        ``phi``, ``g`` (L, T+1, T+1, n, n), each ``q0 + gamma0^2 q2``; ``A = B = None``.
        ``extras``: ``f0``, ``f2`` (T+1, n) the order-0 and order-gamma0^2 coefficients of the
        predictions, ``ntk2`` (T+1, n, n) that of the NTK, ``delta0`` (T+1, n) the lazy error
        signal; so ``f0 + g^2 f2`` evaluates the expansion at any other gamma0 = g.
        ``correction_ratio`` (scalar): max_t |gamma0^2 K2(t)| / |K0| (module docstring);
        above 1 the result is ``status="not_converged"`` (outside the perturbative range),
        above 0.5 a warning is logged.
        ``stderr`` (nonlinear networks): ``train_predictions``, ``test_predictions``; for
        L >= 2 also ``ntk``, ``phi``, ``g`` (Monte Carlo standard errors at this gamma0).
        With C >= 2 outputs (linear networks, docs/theory.rst §7) the output axes of
        :mod:`dmft.results`: predictions (T+1, P, C), ``ntk`` (T+1, n, C, n, C), ``g``
        (L, T+1, T+1, n, C, n, C), extras ``f0``, ``f2``, ``delta0`` (T+1, n, C), ``ntk2``
        (T+1, n, C, n, C).

    Raises
    ------
    ValueError
        ReLU networks, bad ``samples`` / ``blocks``, unknown options, and the problems of
        docs/theory.rst §7 it does not expand (module docstring: the hinge loss, weight decay
        toward zero, and any §7 feature with a nonlinear activation).
    """

    description = "leading order in gamma0^2 around the lazy dynamics"
    #: docs/theory.rst §7 for linear networks and two-layer smooth ones (deep nonlinear ones
    #: refuse them in :func:`check_regime`); not the hinge loss, not weight decay toward zero
    supports = frozenset({"outputs", "losses", "weight_decay", "batches"})

    def __call__(self, *args, **kwargs):
        if len(args) >= 3:
            check_regime(*args[:3])
        return super().__call__(*args, **kwargs)

    def estimate(self, net, data, train, *, opts):
        """Linear: the expansion's dense (n T1)^2 operators (about 10 L + 11 of them at the
        peak). Deep smooth: the order-0 operators, every block's flat second-order kernels and
        their stacked two-time copies. Two-layer smooth: the marched fields (T1, 2 samples,
        n) of two Richardson points and the two-time moments. Result: phi, g
        (L, T1, T1, n, n)."""
        from ._resources import estimate, kernel_bytes
        if not net.linear and net.activation not in _SMOOTH:
            return None
        L, n, T1 = net.depth, data.P + data.Q, train.steps + 1
        m = n * T1
        K1 = kernel_bytes(1, T1, n)
        result = 2 * L * K1 + 8 * 6 * T1 * n * n
        C = getattr(data, "C", 1)
        if net.linear and C > 1:
            # the (N C)^2 backward operators of objective_linear_expansion (N = n T1)
            KC = K1 * C * C
            result = L * K1 + L * KC + 8 * 6 * T1 * n * n * C * C
            peak, units = (6 * L + 8) * KC + 4 * L * K1, 8 * L * (m * C) ** 3
            return estimate("perturbative", result, peak, units,
                            f"{6 * L + 8} dense ({n} x {C} x {T1})^2 float64 operators",
                            knobs="steps / points / outputs / depth")
        if net.linear:
            peak, units = (10 * L + 11) * K1, 8 * L * m ** 3
            detail = f"{10 * L + 11} dense ({n} x {T1})^2 float64 operators"
        elif L >= 2:
            B = int(opts.blocks)
            per_block = 1 << max(1, int(round(math.log2(max(2, int(opts.samples) // B)))))
            chunk = max(8, int(2e6 // (4 * m * n)))
            peak = ((3 * L + 4 + 2 * B * (L + 1) + 4 * B * L + 2 * L) * K1
                    + 8 * 8 * n * n * 201 ** 2          # Gaussian moments on a 201^2 grid
                    + 8 * 12 * 6 * chunk * m)           # one chunk of jets (N, 6 chunk)
            units = 10 * per_block * B * n * m * m * L
            detail = f"{B} blocks x {2 * (L + 1)} flat kernels of ({n} x {T1})^2"
        else:
            S = 2 * int(opts.samples)
            # with C outputs (objective_two_layer_expansion) the fields g carry C columns
            peak = 6 * 8 * T1 * S * (n + 1) * C + 10 * K1 * C * C
            units = 8 * S * T1 ** 2 * n ** 2 * C * C
            detail = f"two marches of {S} samples" + (f" x {C} outputs" if C > 1 else "")
        return estimate("perturbative", result, peak, units, detail,
                        knobs="steps / points / depth / samples / blocks")

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


def check_regime(net, data, train) -> None:
    """ValueError (naming the fix) for the docs/theory.rst §7 problems this method does not
    expand (module docstring); the rest of the refusals is :func:`dmft._method.check_features`.
    """
    if not hasattr(train, "loss") or not hasattr(data, "multi_output"):
        return
    if train.loss == "hinge":
        raise ValueError(
            "method='perturbative' does not expand the hinge loss: its error signal "
            "y 1[y f < 1] jumps where a prediction crosses the margin, so the dynamics have no "
            "gamma0^2 expansion; use method='mc' (or method='linear' for a linear network, "
            "method='static' for the gamma0 -> 0 limit)")
    if train.weight_decay > 0 and train.decay_to == "zero":
        raise ValueError(
            "method='perturbative' does not expand weight decay toward zero (the initial-weight "
            "sources shrink like a^t, docs/theory.rst §7); use method='linear' for a linear "
            "network or method='mc', or decay_to='init'")
    need = features(data, train)
    if need and not net.linear and net.depth >= 2:
        raise ValueError(
            f"method='perturbative' expands {', '.join(sorted(need))} (docs/theory.rst §7) for "
            f"linear networks and two-layer networks (depth=1) only, got depth={net.depth} "
            f"with activation={net.activation!r}: the deep nonlinear (jet) route is written for "
            f"one squared-error output; use method='mc' (full dynamics) or method='static' "
            f"(the gamma0 -> 0 limit)")


#: ``solve_perturbative(net, data, train, *, seed=None, throw=True, progress=None, **options)``
solve_perturbative = PERTURBATIVE


def _expand(net, data, train, seed, samples, blocks) -> Solution:
    """The expansion proper (engines :mod:`solvers.perturbative`, :mod:`solvers.static`)."""
    L, P, T = net.depth, data.P, train.steps
    n = data.P + data.Q
    kx = data.kx
    stderr, opts = {}, {"order": 2}
    general = bool(features(data, train))       # docs/theory.rst §7 (check_regime: linear)
    multi = data.multi_output
    with np.errstate(over="raise", invalid="raise"):
        try:
            if general:
                objective = Objective.from_specs(data, train)
                C = objective.C
                if net.linear:
                    ex = _engine.objective_linear_expansion(kx, L, train.lr, T, objective)
                else:                   # two-layer smooth (check_regime)
                    kern = _static.static_kernels(net.activation, kx, 1)
                    ss = seed if isinstance(seed, np.random.SeedSequence) else \
                        np.random.SeedSequence(seed)
                    xi = np.random.default_rng(ss).standard_normal((int(samples), n + C))
                    ex = _engine.objective_two_layer_expansion(
                        kx, kern["ntk"], net.activation, train.lr, T, xi, objective)
                    se = train.gamma0 ** 2 * ex["source2_se"]
                    stderr = {"train_predictions": se[:, :P], "test_predictions": se[:, P:]}
                    ex["phi0"] = kern["phi"]
                    ex["g0"] = np.einsum("lmn,cd->lmcnd", kern["g"], np.eye(C))
                    opts.update(samples=int(samples))
                if not multi:           # one output: the shapes of the plain problem
                    ex = _squeeze_outputs(ex)
                    stderr = {k: v[..., 0] for k, v in stderr.items()}
                else:
                    opts.update(outputs=int(C))
            elif net.linear:
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
            # no expansion survives the overflow: a NaN partial result, status "diverged"
            T1 = T + 1
            oc = (data.C,) if multi else ()
            nan_k = np.full((L, T1, T1, n, n), np.nan)
            sol = Solution(
                net=net, data=data, train=train, method="perturbative", t=train.times,
                train_predictions=np.full((T1, P) + oc, np.nan),
                test_predictions=np.full((T1, n - P) + oc, np.nan),
                ntk=np.full((T1, n) + oc + (n,) + oc, np.nan), phi=nan_k,
                g=np.full((L, T1, T1, n) + oc + (n,) + oc, np.nan), iterations=0,
                seed=int(seed) if isinstance(seed, numbers.Integral) else None, options=opts)
            return sol.fail("diverged", (
                f"method='perturbative' overflowed: {exc}; the lazy dynamics diverge at lr = "
                f"{train.lr:g}{_lr_limit(net, data)}, reduce lr"))
    f = val["f"]
    sol = Solution(
        net=net, data=data, train=train, method="perturbative", t=train.times,
        train_predictions=f[:, :P].copy(), test_predictions=f[:, P:].copy(),
        ntk=val["ntk"], phi=val["phi"], g=val["g"], A=None, B=None, iterations=0,
        stderr=stderr, seed=int(seed) if isinstance(seed, numbers.Integral) else None,
        options=opts,
        extras={"f0": ex["f0"], "f2": ex["f2"], "ntk2": ex["ntk2"], "delta0": ex["delta0"]})
    if not all(np.all(np.isfinite(x)) for x in (f, val["ntk"])):
        return sol.fail("diverged", f"method='perturbative' produced non-finite values (lr = "
                                    f"{train.lr:g}{_lr_limit(net, data)}); the lazy dynamics "
                                    f"are unstable, reduce lr")
    # the size of the neglected order: gamma0^2 |K2| / |K0| estimates |O(gamma0^4)| /
    # |O(gamma0^2)| (the next term of the series in gamma0^2 relative to the last one kept)
    ratio = correction_ratio(ex["ntk0"], ex["ntk2"], train.gamma0)
    sol.extras["correction_ratio"] = np.float64(ratio)
    if WARN_BOUND < ratio <= CORRECTION_BOUND:
        logger.warning(
            "method='perturbative': gamma0 = %g is near the edge of the perturbative range "
            "(correction/lazy = %.3g > %g; the expansion's error is then ~%d-%d %% of the "
            "feature-learning correction); compare with method='mc' (or 'linear')",
            train.gamma0, ratio, WARN_BOUND, 30, 60)
    if ratio > CORRECTION_BOUND:
        sol.fail("not_converged", (
            f"method='perturbative': gamma0 = {train.gamma0:g} is outside the perturbative "
            f"range: the O(gamma0^2) NTK correction is {ratio:.3g} x the lazy NTK "
            f"(correction/lazy = max_t |gamma0^2 K2(t)| / |K0|, bound {CORRECTION_BOUND:g}), "
            f"so the neglected O(gamma0^4) terms are comparable to the correction kept; use "
            f"method='mc' (or 'linear' for a linear network), or a gamma0 below about "
            f"{train.gamma0 * np.sqrt(CORRECTION_BOUND / ratio):.3g}"))
    return sol


def _squeeze_outputs(ex: dict) -> dict:
    """One output (y of shape (P,)): drop the C = 1 axes of an objective expansion."""
    out = dict(ex)
    for k in ("f0", "f2", "delta0", "delta2", "source2", "source2_se", "a1"):
        if k in ex:
            out[k] = ex[k][..., 0]
    out["ntk0"], out["ntk2"] = ex["ntk0"][..., 0, :, 0], ex["ntk2"][..., 0, :, 0]
    out["g2"] = ex["g2"][..., 0, :, 0]
    if "g0" in ex:                              # (L or 1, n, 1, n, 1) -> (L or 1, n, n)
        out["g0"] = ex["g0"][..., 0, :, 0]
    return out


#: the largest correction/lazy ratio (:func:`correction_ratio`) accepted as converged: above
#: it the O(gamma0^2) correction exceeds the lazy term it corrects, the series in gamma0^2 is
#: no longer an approximation, and the measured error of the expansion is as large as the
#: feature-learning correction itself (module docstring)
CORRECTION_BOUND = 1.0
#: above this ratio a converged expansion logs a warning: its measured error is ~30-60 % of
#: the feature-learning correction there
WARN_BOUND = 0.5


def correction_ratio(ntk0, ntk2, gamma0) -> float:
    """max_t |gamma0^2 K2(t)|_F / |K0|_F: the NTK's movement relative to the lazy NTK, the
    estimate of the expansion's neglected order relative to the order kept."""
    K0 = np.linalg.norm(np.asarray(ntk0)[0])
    K2 = np.linalg.norm(np.asarray(ntk2).reshape(np.shape(ntk2)[0], -1), axis=1).max()
    return float(gamma0 ** 2 * K2 / K0) if K0 > 0 else 0.0


def _lr_limit(net, data) -> str:
    """"; the static NTK's largest stable lr is ..." (empty if it cannot be computed)."""
    try:
        K = _static.static_kernels(net.activation, data.kx, net.depth)["ntk"][:data.P, :data.P]
        return f"; the static NTK's largest stable lr is 2 / lambda_max = " \
               f"{2.0 / np.linalg.eigvalsh(K).max():.4g}"
    except Exception:           # noqa: BLE001 -- a hint only
        return ""
