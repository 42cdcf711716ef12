"""``method="linear"``: deep linear networks, exact algebraic DMFT (docs/theory.rst §3).

For phi(h) = h the DMFT closes into matrix equations with no sampling. The engine
:mod:`solvers.linear` marches them forward in exact discrete time (gradient descent with step
lr), using that the backward kernels G^l do not depend on the data index (one output) and the
strictly causal structure in time: nothing of size (P T) x (P T) is inverted. The result is
deterministic; ``seed`` is only recorded.

Beyond one squared-error output (docs/theory.rst §7) -- C outputs, the cross-entropy, logistic
and hinge losses, weight decay toward the initialisation or toward zero, mini-batch and online
schedules -- the backward fields stay point-independent (G^l_{mu c, nu c'} = G^l_{c c'}), the
backward index becomes (t, c), and :func:`solvers.linear.march_general` marches the same
closed matrix equations with the error signal Delta(t) = Objective.delta(t, f(t)), memory
weights a^(t-1-s) and, toward zero, the source scale a^t. The plain problem keeps its own path
(:func:`solvers.linear.solve`, with the whitened fast path) and its numbers bit for bit.

``method="auto"`` picks this solver for linear networks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solvers import linear as _engine
from solvers.objective import Objective

from ._method import Method, Options, boolean, one_of, option
from ._progress import logger
from .results import Solution
from .specs import MLP, Dataset, GradientDescent

__all__ = ["solve_linear", "max_stable_gamma0", "LinearOptions", "LINEAR"]


def _positive(hint):
    def check(name, value):
        import numbers
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}; {hint}")
        return float(value)
    return check


def _nan_after(t0: int, *responses) -> None:
    """NaN every entry of the two-time responses (L-1, T1, T1, ...) at times >= t0 (the
    march diverged there)."""
    for X in responses:
        X[:, t0:] = np.nan
        X[:, :, t0:] = np.nan


def _phi_two_time(res: dict, L: int, T1: int, n: int) -> np.ndarray:
    """Phi^l(t, s) as (L, T1, T1, n, n) from the march's flat kernels (each freed after
    use: the flat and two-time forms are not held together)."""
    phi = np.empty((L, T1, T1, n, n))
    for l in range(L):
        phi[l] = _engine.two_time(res["Phi"][l], T1, n)
        res["Phi"][l] = None
    return phi



def _march(ctx, net, data, train, march, multi: bool):
    """Run ``march(callback)`` under a progress bar over the time steps: (result, None), or
    (None, a failed all-NaN Solution) when it overflowed inside BLAS (with errstate raise): no
    trajectory survives, and the skeleton applies throw=. ``multi``: shapes with an output
    axis (C = data.C)."""
    L, P, Q, T1, C = net.depth, data.P, data.Q, train.steps + 1, data.C
    n = P + Q
    bar = ctx.bar(T1, "linear DMFT", unit="step")
    try:
        return march(lambda t: bar.update(1)), None
    except FloatingPointError as exc:
        fshape = (T1, P, C) if multi else (T1, P)
        kshape = (T1, n, C, n, C) if multi else (T1, n, n)
        return None, Solution(
            net=net, data=data, train=train, method="linear", t=train.times,
            train_predictions=np.full(fshape, np.nan),
            test_predictions=np.full((T1, Q) + fshape[2:], np.nan),
            ntk=np.full(kshape, np.nan), phi=np.full((L, T1, T1, n, n), np.nan),
            g=np.full((L, T1, T1) + kshape[1:], np.nan), iterations=0,
            seed=ctx.seed_int).fail("diverged", (
                f"method='linear' diverged: {exc} (gamma0 = {train.gamma0:g}, lr = "
                f"{train.lr:g}); Reduce lr or gamma0"))
    finally:
        bar.close()


def _residuals(res: dict, opts, check) -> np.ndarray:
    """[relative residual of the global check ``check()``], empty when ``verify=False`` or
    the march diverged."""
    if not opts.verify or res["diverged_at"] is not None:
        return np.zeros(0)
    with np.errstate(all="ignore"):
        r = check()
    logger.info("linear DMFT: verification residual %.3e (tol %.1e)", r, opts.tol)
    return np.array([r])


def _options(opts, used: bool) -> dict:
    """The options recorded on the Solution (``used``: the whitened fast path ran)."""
    fast_path = opts.fast_path
    return {"fast_path": fast_path if isinstance(fast_path, str) else bool(fast_path),
            "fast_path_used": used, "responses": opts.responses, "verify": opts.verify,
            "tol": opts.tol, "divergence": opts.divergence}


def _judge(sol: Solution, res: dict, opts, remedy: str = "") -> Solution:
    """Mark ``sol`` failed when the march diverged ("diverged", ``remedy`` appended to the
    message) or the global check exceeded ``tol`` ("not_converged")."""
    train = sol.train
    residuals = sol.residuals
    if res["diverged_at"] is not None:
        sol.fail("diverged", (
            f"method='linear' diverged: {res['message']} (gamma0 = {train.gamma0:g}, lr = "
            f"{train.lr:g}); the discrete dynamics are unstable at this gamma0 * lr. Reduce lr "
            f"or gamma0{remedy}"))
    elif residuals.size and not residuals[0] <= opts.tol:
        sol.fail("not_converged", (
            f"method='linear': the marched solution fails the global check of the matrix "
            f"equations (relative residual {residuals[0]:.3g} > tol = {opts.tol:g}); the "
            f"kernels have grown so large that rounding dominates. Reduce gamma0 * lr or "
            f"steps"))
    if not sol.converged:
        sol.extras["message"] = sol.message   # where earlier versions kept it
    return sol

@dataclass(frozen=True)
class LinearOptions(Options):
    """Options of ``method="linear"`` (see :func:`solve_linear`)."""

    fast_path: object = option("auto", one_of(
        ("auto", True, False), "{name} must be 'auto', True or False (whitened-data one-point "
        "reduction), got {value!r}"), "whitened-data one-point reduction")
    responses: bool = option(True, boolean(), "fill the full-index responses A, B")
    verify: bool = option(True, boolean(), "re-check the matrix equations globally")
    tol: float = option(1e-8, _positive("e.g. tol=1e-8"), "tolerance of that check")
    divergence: float = option(1e8, _positive("e.g. divergence=1e8"),
                               "loss growth factor that stops the march")


class Linear(Method, name="linear", options=LinearOptions):
    """Exact infinite-width dynamics of a deep linear network (docs/theory.rst §3).

    Parameters
    ----------
    net, data, train : MLP, Dataset, GradientDescent
        ``net.activation`` must be ``"linear"``. ``train.gamma0 = 0`` is allowed: it is the
        lazy limit and reproduces ``method="static"``. Every feature of docs/theory.rst §7 is
        solved: targets of shape (P, C), ``train.loss`` of any kind, ``weight_decay`` with
        ``decay_to="init"`` or ``"zero"``, ``batch_size`` with either schedule; those
        problems use the general march (no whitened fast path).
    seed : optional
        Recorded only: the method draws no random numbers.
    throw : bool
        If True (default), divergence raises :class:`~dmft.results.ConvergenceError`; if
        False the result is returned with ``converged=False`` (``status`` ``"diverged"`` or
        ``"not_converged"``, ``message``) and NaN from the first failed step on.
    fast_path : {"auto", True, False}
        Whitened training inputs (X_train X_train^T / D = lambda I, always true for P = 1)
        reduce any depth to a one-point problem along y
        (:func:`solvers.linear.whitened_reduction`); "auto" uses it when it applies. Only the
        plain problem (one mse output, full batch, no weight decay) has it; True raises for
        the others.
    responses : bool
        Fill the full-index responses ``A``, ``B`` (L-1, T+1, T+1, n, n) (L >= 2), the
        responses to the raw sources (under weight decay toward zero the sources enter scaled
        by a^t). False leaves them None and saves memory and two GEMMs per layer. With C >= 2
        outputs they carry output indices that the result layout has no axes for: ``A`` and
        ``B`` are None there.
    verify : bool
        Re-evaluate the matrix equations globally at the marched solution (dense GEMMs and a
        triangular solve, independent of the row recursion); the relative change is
        ``residuals[0]``. Above ``tol`` the solution is reported as not converged.
    tol : float
        Tolerance of that check (default 1e-8; rounding gives ~1e-14).
    divergence : float
        The march stops when the training loss exceeds ``divergence`` times its initial
        value or a value is not finite (default 1e8).
    progress : bool or None
        Progress bar over time steps (None: only on a terminal).

    Returns
    -------
    Solution
        All contract fields; ``phi``, ``g`` (L, T+1, T+1, n, n), ``A``, ``B``
        (L-1, T+1, T+1, n, n) or None; ``iterations = 1`` (one march: causality makes it
        exact, no outer iteration); ``residuals`` = [verification residual] (empty when
        ``verify=False``); ``stderr = {}``. ``extras``: ``kx`` (n, n), ``G`` (L, T+1, T+1)
        the point-independent G^l(t, s), ``delta`` (T+1, n) the error signal. With C >= 2
        outputs (dmft/results.py): predictions (T+1, P, C), ``ntk`` (T+1, n, C, n, C),
        ``g`` (L, T+1, T+1, n, C, n, C), ``extras["G"]`` (L, T+1, T+1, C, C) = G^l_{c c'}(t, s),
        ``extras["delta"]`` (T+1, n, C).

    Raises
    ------
    ValueError
        Non-linear activation (use method="mc") or bad options.
    ConvergenceError
        Divergence at large gamma0 * lr (see :func:`max_stable_gamma0`), or a failed check.
    """

    description = "deep linear networks: exact algebraic DMFT matrix equations (no sampling)"
    supports = frozenset({"outputs", "losses", "hinge", "weight_decay", "decay_to_zero",
                          "batches", "barlow_twins", "output_offset"})

    def estimate(self, net, data, train, *, opts):
        """Memory: the march's flat kernels Phi^l (n T1)^2 (L of them), the global check
        (~5 such matrices), the responses (A^l flat and two-time, ~6 work matrices) and the
        result phi, g (L, T1, T1, n, n), A, B (L-1, ...); the peak is the largest stage.
        Time: ~ L n^2 T1^3 (march, check and responses are each of that order)."""
        from ._resources import estimate, kernel_bytes
        if not net.linear:
            return None
        L, n, T1 = net.depth, data.P + data.Q, train.steps + 1
        K1 = kernel_bytes(1, T1, n)           # one (n T1)^2 float64 matrix = one two-time kernel
        if not Objective.from_specs(data, train).plain:
            # march_general: L flat Phi, 5 (n T1) x (C T1) operators and 2 (C T1)^2 per layer,
            # the check (~6 flat matrices); the result phi, g (g with C^2 output entries)
            C = data.C
            ops = 8 * L * (5 * n * T1 * C * T1 + 2 * (C * T1) ** 2)
            resp = bool(opts.responses) and L >= 2 and C == 1
            result = (L + L * C * C + (2 * (L - 1) if resp else 0)) * K1 + 8 * T1 * (n * C) ** 2
            peak = max((L + 1) * K1 + ops + (6 * K1 if opts.verify else 0),
                       L * K1 + ops + result + (6 * K1 if resp else 0))
            units = L * n ** 2 * C * T1 ** 3 * (1 + (1 if opts.verify else 0)
                                                 + (1 if resp else 0))
            return estimate("linear", result, peak, units,
                            f"{L} layers x (n T1)^2 = ({n} x {T1})^2 float64 matrices, "
                            f"C = {C} outputs",
                            knobs="steps / points / depth / outputs (or responses=False)")
        resp = bool(opts.responses) and L >= 2
        small = 8 * (6 * L + 2) * T1 * T1 * n + 8 * 3 * T1 * n * n
        result = (2 * L + (2 * (L - 1) if resp else 0)) * K1 + 8 * T1 * n * n
        stages = [L * K1 + (5 * K1 if opts.verify else 0),               # march (+ check)
                  (L + 1) * K1 + (2 * (L - 1) * K1 if resp else 0),     # phi from the flats
                  result + K1]                                          # the result
        if resp:
            stages.append((2 * L - 1) * K1 + 6 * K1)                    # full_responses
            stages.append((3 * L - 2) * K1)                             # A flat + two-time
        units = L * n ** 2 * T1 ** 3 * (1 + (1 if opts.verify else 0) + (1 if resp else 0))
        return estimate("linear", result, max(stages) + small, units,
                        f"{L} layers x (n T1)^2 = ({n} x {T1})^2 float64 matrices",
                        knobs="steps / points / depth (or pass responses=False)")

    def run(self, ctx, net, data, train, *, opts) -> Solution:
        if not net.linear:
            raise ValueError(f"method='linear' solves linear networks only, but net.activation "
                             f"is {net.activation!r}; use method='mc' for nonlinear networks "
                             f"(or method='auto')")
        L, P, Q, T = net.depth, data.P, data.Q, train.steps
        n, T1 = P + Q, T + 1
        kx = data.kx
        gamma0, lr = train.gamma0, train.lr
        obj = Objective.from_specs(data, train, net)
        if not obj.plain:
            return self._run_general(ctx, net, data, train, obj, opts)

        res, failed = _march(ctx, net, data, train, lambda cb: _engine.solve(
            kx, data.y_train, L, gamma0, lr, T, fast_path=opts.fast_path,
            divergence=opts.divergence, callback=cb), multi=False)
        if failed is not None:
            return failed
        diverged = res["diverged_at"] is not None
        residuals = _residuals(res, opts, lambda: _engine.verify(res, kx, data.y_train, gamma0,
                                                                 lr))

        # Build the outputs one array at a time and drop the flat copies as they are
        # converted: the fields themselves are O(L T^2 n^2) numbers, and peak memory should
        # stay near that.
        A = B = None
        if opts.responses and L >= 2:
            with np.errstate(all="ignore"):
                Aflat = _engine.full_responses(res, kx, gamma0, lr)
            A = _engine.two_time(Aflat, T1, n)
            del Aflat
            # B^l_{mu alpha}(t, s) = b^l_alpha(t, s) for every row mu (G^l is point-independent)
            b = res["b"][1:].reshape(L - 1, T1, T1, n)
            B = np.empty((L - 1, T1, T1, n, n))
            B[...] = b[:, :, :, None, :]
            if diverged:
                _nan_after(res["diverged_at"], A, B)
        phi = _phi_two_time(res, L, T1, n)
        g = np.empty((L, T1, T1, n, n))
        g[...] = res["G"][:, :, :, None, None]
        f = res["f"]
        sol = Solution(
            net=net, data=data, train=train, method="linear", t=train.times,
            train_predictions=f[:, :P].copy(), test_predictions=f[:, P:].copy(),
            ntk=res["ntk"], phi=phi, g=g, A=A, B=B, iterations=1, residuals=residuals,
            seed=ctx.seed_int, options=_options(opts, bool(res["fast_path"])),
            extras={"kx": kx, "G": res["G"], "delta": res["delta"]})
        return _judge(sol, res, opts, "; dmft._linear.max_stable_gamma0(net, data, train) "
                                      "gives the largest stable gamma0 for this lr")

    def _run_general(self, ctx, net, data, train, obj, opts) -> Solution:
        """Every problem but the plain one (docs/theory.rst §7): :func:`solvers.linear.
        march_general` (no whitened fast path)."""
        L, P, Q, T = net.depth, data.P, data.Q, train.steps
        n, T1, C = P + Q, T + 1, data.C
        multi = data.multi_output
        kx = data.kx
        gamma0, lr = train.gamma0, train.lr
        if opts.fast_path is True:
            raise ValueError(
                "fast_path=True needs the plain problem (one mse output, full batch, no weight "
                "decay) with whitened training inputs; use fast_path='auto' or False")
        res, failed = _march(ctx, net, data, train, lambda cb: _engine.march_general(
            kx, obj, L, gamma0, lr, T, divergence=opts.divergence, callback=cb), multi=multi)
        if failed is not None:
            return failed
        diverged = res["diverged_at"] is not None
        residuals = _residuals(res, opts, lambda: _engine.verify_general(res, kx, obj, gamma0,
                                                                         lr))

        A = B = None
        if opts.responses and L >= 2 and C == 1:
            with np.errstate(all="ignore"):
                Aflat, Bflat = _engine.full_responses_general(res, kx, obj, gamma0, lr)
            A = _engine.two_time(Aflat, T1, n)
            B = _engine.two_time(Bflat, T1, n)
            del Aflat, Bflat
            if diverged:
                _nan_after(res["diverged_at"], A, B)
        phi = _phi_two_time(res, L, T1, n)
        Gr = res["G"].reshape(L, T1, C, T1, C).transpose(0, 1, 3, 2, 4)   # (L, t, s, c, c')
        f = res["f"]
        if multi:
            g = np.empty((L, T1, T1, n, C, n, C))
            g[...] = Gr[:, :, :, None, :, None, :]
            ntk, Gx, delta = res["ntk"], Gr, res["delta"]
        else:
            g = np.empty((L, T1, T1, n, n))
            g[...] = Gr[:, :, :, 0, 0, None, None]
            f = f[:, :, 0]
            ntk, Gx, delta = res["ntk"][:, :, 0, :, 0], Gr[..., 0, 0], res["delta"][:, :, 0]
        sol = Solution(
            net=net, data=data, train=train, method="linear", t=train.times,
            train_predictions=f[:, :P].copy(), test_predictions=f[:, P:].copy(),
            ntk=np.ascontiguousarray(ntk), phi=phi, g=g, A=A, B=B, iterations=1,
            residuals=residuals, seed=ctx.seed_int, options=_options(opts, False),
            extras={"kx": kx, "G": np.ascontiguousarray(Gx), "delta": delta})
        return _judge(sol, res, opts)


LINEAR = Linear()


#: ``solve_linear(net, data, train, *, seed=None, throw=True, progress=None, **options)``
solve_linear = LINEAR


def max_stable_gamma0(net: MLP, data: Dataset, train: GradientDescent, *, start: float = 0.25,
                      rtol: float = 1e-3, gamma_max: float = 1e4) -> float:
    """Largest stable gamma0 of a deep linear network at ``train.lr`` and ``train.steps``.

    ``train.gamma0`` is ignored. A gamma0 is *stable* when the exact infinite-width trajectory
    over ``train.steps`` steps stays below the edge of stability at every step,
    max_t lr lambda_max(K_train(t)) < 2, so that each gradient step contracts the training
    error in its linearisation (and nothing diverges). The NTK grows with gamma0 (two-layer,
    one point, gradient flow: K ends at 2 sqrt(1 + gamma0^2 y^2), so the edge is
    ``gamma0* = sqrt(1/lr^2 - 1) / |y|``). The first unstable gamma0 met scanning upward from
    ``start`` (doubling) is bracketed and bisected to relative width ``rtol``; the stable end
    is returned (``inf`` if none below ``gamma_max``; 0.0 if lr is unstable even for the
    lazy, gamma0 = 0, kernel). Above it the error oscillates; the dynamics may still catapult
    to a flatter minimum, or diverge (then :func:`solve_linear` raises).

    Returns
    -------
    float
    """
    if not net.linear:
        raise ValueError(f"max_stable_gamma0 needs a linear network, got activation "
                         f"{net.activation!r}")
    if not Objective.from_specs(data, train).plain:
        raise ValueError(
            "max_stable_gamma0 is defined for one mse output trained full-batch without weight "
            "decay (its edge is lr lambda_max(K_train) < 2 for the squared error); pass "
            "train = GradientDescent(gamma0, lr, steps) and one column of targets, or scan "
            "gamma0 with dmft.solve(..., throw=False) for other objectives")
    return _engine.max_stable_gamma0(data.kx, data.y_train, net.depth, train.lr, train.steps,
                                     start=start, rtol=rtol, gamma_max=gamma_max)
