"""The method contract: options dataclasses, one adapter skeleton, seeds and statuses.

Every way of computing a result -- the methods of :func:`dmft.solve` (:data:`dmft.METHODS`),
of :func:`dmft.fluctuations` (:data:`dmft.FLUCTUATION_METHODS`) and :func:`dmft.simulate` --
is an *adapter*: a subclass of :class:`Method` (like the solver classes behind
``scipy.integrate.solve_ivp``'s ``METHODS`` or diffrax's solver objects) that declares

``name``, ``description``
    The table key and a one-line description (``dmft methods`` prints it).
``Options``
    A frozen dataclass derived from :class:`Options`, one field per keyword option, each made
    with :func:`option` (default, validator, one-line doc). Unknown keywords raise
    ``ValueError`` listing the dataclass's fields; each value is checked by its field's
    validator, whose message names the option and the fix.
``run(self, ctx, *args, opts)``
    The computation proper: specs and options in, a result out. ``ctx`` is a :class:`Run`:
    the validated seed (``ctx.seed``, ``ctx.seed_sequence``, ``ctx.seed_int``,
    ``ctx.rng()``), the progress bar factory ``ctx.bar(total, desc, unit)`` and the start
    time. A numerical failure that leaves a result behind is reported with
    ``result.fail(status, message)``, never raised by ``run``; only failures without any
    result raise :class:`~dmft.results.ConvergenceError` directly.

:meth:`Method.__call__` is written once for all methods: it parses the options, validates the
seed, estimates the resources (the optional hook ``estimate(*args, opts)``: memory from the
shapes that will be allocated, time from a calibrated cost; logged, and a ``ValueError`` naming
the GiB needed when they exceed ``memory_limit=`` GB, default 80 % of the memory available,
see :mod:`dmft._resources`), runs, sets ``result.elapsed``, logs one line, and applies
``throw=``: a result whose ``status`` is not ``"converged"`` raises
:class:`~dmft.results.ConvergenceError` (with the result attached as ``exc.result``) when ``throw=True`` (default), or is returned, after a
logged warning, when ``throw=False``.

The status vocabulary (``result.status``, :data:`STATUSES`):

``"converged"``
    The method finished and every check passed (``converged=True``).
``"not_converged"``
    The method finished but a check failed: an iteration limit, a residual above its
    tolerance, an adjoint iteration that did not settle (``converged=False``).
``"diverged"``
    The dynamics blew up: an unstable learning rate, an overflow, non-finite values
    (``converged=False``).

``result.message`` says in words what happened and, on failure, the remedy.

The divergence rule (:func:`check_divergence`, applied by :meth:`Method.finish` to every
result not already reported as diverged, so that it holds for every method and for
``simulate`` alike; per network for an Ensemble): a trajectory has *diverged* when

- a prediction or NTK entry is NaN or infinite, or
- the training loss exceeds ``DIVERGENCE_LOSS_FACTOR`` (1e4) times its initial value at some
  step, or
- an NTK entry exceeds ``DIVERGENCE_NTK_FACTOR`` (1e8) times the largest entry of K(0).

The message states the peak loss ratio, the step, and the frozen-kernel stability limit
2 / lambda_max(K_train(0)) of the learning rate. The loss bound is far above what training
does on its own: gradient descent lowers the loss, and a feature-learning network at the edge
of stability catapults (the loss first rises, then falls: measured 1.2-1.8 x for two-layer
tanh networks of width 1024 and the DMFT at lr = 1.2-1.3 x 2 / lambda_max(K(0)); catapults
in the literature rise by ~10-100 x), while an unstable rate multiplies the loss every step
(measured 1e4 to 1e10 x within 5-10 steps, 1e30 to 1e100 x within 50). The rule sees only the
steps computed: a blow-up that starts at the last few steps may stay below the bound. Standard
errors that are NaN or infinite (too few samples or replicates) are never returned as
converged either: the result gets ``status="not_converged"`` naming the fix.
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from dataclasses import dataclass

import numpy as np

from solvers import static as _static

from . import _resources
from ._progress import logger, progress_bar
from .results import STATUSES, ConvergenceError, _loss
from .specs import check_positive_int

__all__ = ["Options", "Method", "Run", "option", "parse_seed", "STATUSES",
           "positive_int", "int_at_least", "real_in", "boolean", "one_of", "is_callable",
           "check_divergence", "apply_offset", "DIVERGENCE_LOSS_FACTOR",
           "DIVERGENCE_NTK_FACTOR"]

#: the training loss may grow to this multiple of its initial value before a result counts
#: as diverged (a catapult at the edge of stability rises by ~10-100; see the module docstring)
DIVERGENCE_LOSS_FACTOR = 1e4
#: an NTK entry may grow to this multiple of the largest entry of K(0)
DIVERGENCE_NTK_FACTOR = 1e8


# ------------------------------------------------------------------------------------------
# validators: check(name, value) -> normalised value, or ValueError naming the option
# ------------------------------------------------------------------------------------------
def positive_int(hint=""):
    """An integer >= 1 (``hint`` follows "must be a positive integer" in the message)."""
    return lambda name, value: check_positive_int(name, value, hint)


def int_at_least(lo, what):
    """An integer >= ``lo``; ``what`` (e.g. "history length") explains the option."""
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo} ({what}), got {value!r}")
        return value
    return check


def real_in(lo, hi, hint):
    """A finite real number in (lo, hi]; ``hint`` (e.g. ``"e.g. tol=1e-4"``) ends the message."""
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not np.isfinite(value) or not lo < value <= hi:
            raise ValueError(f"{name} must be a number in ({lo}, {hi}], got {value!r}; {hint}")
        return float(value)
    return check


def boolean(what=""):
    """True or False (``what``, e.g. ``" (the control variate)"``, explains the option)."""
    def check(name, value):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False{what}, got {value!r}")
        return bool(value)
    return check


def one_of(choices, message):
    """One of ``choices``; ``message`` is formatted with ``name`` and ``value``."""
    def check(name, value):
        if value not in choices:
            raise ValueError(message.format(name=name, value=value))
        return value
    return check


def is_callable(signature):
    """A callable, called as ``signature`` says."""
    def check(name, value):
        if not callable(value):
            raise ValueError(f"{name} must be callable: {signature}")
        return value
    return check


def option(default=None, check=None, doc="", applies=None):
    """A field of an :class:`Options` dataclass: default, validator and a one-line doc.

    ``check(name, value)`` returns the normalised value or raises ``ValueError``; it is not
    called for ``None`` (which means "the method's default"). ``applies``: for a method
    with several regimes (e.g. ``"mc"``: two-layer march, one-pass or iterative deep
    solver), the regimes the option applies to (None: all); :meth:`Options.inapplicable`
    lists the options given for another regime.
    """
    return dataclasses.field(default=default,
                             metadata={"check": check, "doc": doc, "applies": applies})


@dataclass(frozen=True)
class Options:
    """Base of every method's options: a frozen dataclass validated field by field.

    Subclasses declare fields with :func:`option`; ``__post_init__`` runs each field's
    validator on its (non-None) value, so ``dataclasses.replace`` re-validates too. Checks
    that involve several options or the problem (network, data) belong in the method's
    ``run``.
    """

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and value is not None:
                object.__setattr__(self, f.name, check(f.name, value))

    @classmethod
    def names(cls) -> tuple:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def describe(cls) -> dict:
        """name -> (type annotation as text, default, doc) of every option."""
        return {f.name: (str(f.type), f.default, f.metadata.get("doc", ""))
                for f in dataclasses.fields(cls)}

    @classmethod
    def unknown(cls, kwargs) -> list:
        """The keys of ``kwargs`` that are not options, sorted."""
        return sorted(set(kwargs) - set(cls.names()))

    @classmethod
    def for_regime(cls, regime) -> tuple:
        """The option names that apply in ``regime`` (see :func:`option`)."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.metadata.get("applies") is None or regime in f.metadata["applies"])

    def inapplicable(self, regime) -> list:
        """The options given (not None) that do not apply in ``regime``, sorted."""
        valid = set(self.for_regime(regime))
        return sorted(name for name in self.names()
                      if name not in valid and getattr(self, name) is not None)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.names()}


def parse_seed(seed):
    """Validate a seed: ``(numpy.random.SeedSequence, int or None)``.

    Accepted: None (fresh entropy), a non-negative integer (recorded as the int) or a
    ``SeedSequence``; anything else (-1, 1.5, "abc", True) raises ``ValueError``.
    """
    if isinstance(seed, np.random.SeedSequence):
        return seed, None
    if seed is None:
        return np.random.SeedSequence(), None
    if isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_)) \
            and seed >= 0:
        return np.random.SeedSequence(int(seed)), int(seed)
    raise ValueError(f"seed must be a non-negative integer, a numpy.random.SeedSequence or "
                     f"None, got {seed!r}")


class Run:
    """What the skeleton hands to ``Method.run``: seed, progress and the start time."""

    #: bytes the run may use and the resource estimate (set by :meth:`Method.preflight`)
    memory_limit = None
    estimate = None

    def __init__(self, label, seed=None, progress=None):
        self.label = label
        self.seed_sequence, self.seed_int = parse_seed(seed)
        self.seed = seed
        self.progress = progress
        self.start = time.perf_counter()

    def rng(self) -> np.random.Generator:
        """A generator seeded by the run's seed (``default_rng(seed)`` for an int seed)."""
        return np.random.default_rng(self.seed_sequence)

    def bar(self, total, desc, unit="it"):
        """A progress bar shown according to ``progress`` (None: on a terminal)."""
        return progress_bar(total, desc, self.progress, unit=unit)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Method:
    """One adapter: ``Options``, ``run`` and the skeleton around them (module docstring).

    Call it like :func:`dmft.solve` without ``method``:
    ``adapter(net, data, train, *, seed=None, throw=True, progress=None, **options)``.
    ``name``, ``description`` and ``options`` (the ``Options`` class) may be given as class
    keywords: ``class Mine(Method, name="mine", description="...", options=MineOptions)``.
    """

    name = ""
    description = ""
    Options = Options
    #: what the method solves beyond one squared-error output trained full-batch without
    #: weight decay (docs/theory.rst §7): a subset of :data:`FEATURES`; the rest is refused
    #: with a ValueError before any work (:func:`check_features`)
    supports = frozenset()
    #: how results and log lines name the method (formatted with ``name``)
    label_format = "method={name!r}"
    #: the message for unknown options (formatted with ``label``, ``unknown``, ``valid``)
    unknown_format = ("unknown option(s) for {label}: {unknown}; valid options: {valid} "
                      "(and seed, throw, progress, memory_limit)")

    def __init_subclass__(cls, name=None, description=None, options=None, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr, value in (("name", name), ("description", description),
                            ("Options", options)):
            if value is not None:
                setattr(cls, attr, value)

    @property
    def label(self) -> str:
        return self.label_format.format(name=self.name)

    def unknown_error(self, unknown) -> ValueError:
        names = self.Options.names()
        return ValueError(self.unknown_format.format(label=self.label, unknown=unknown,
                                                     valid=list(names), names=", ".join(names)))

    def parse_options(self, kwargs) -> Options:
        """Options from keyword arguments: unknown names raise, values are validated."""
        unknown = self.Options.unknown(kwargs)
        if unknown:
            raise self.unknown_error(unknown)
        return self.Options(**kwargs)

    def run(self, ctx: Run, *args, opts):
        raise NotImplementedError

    def estimate(self, *args, opts):
        """Resources the run will need (:func:`dmft._resources.estimate`), or None.

        Called with ``run``'s arguments before ``run``; must be cheap (no allocation of the
        problem's size) and compute in Python numbers, so that absurd sizes are refused fast.
        """
        return None

    def preflight(self, ctx: Run, args, opts, memory_limit=None):
        """Log the estimate and refuse (ValueError) a run that would exceed the memory limit.

        ``memory_limit`` (GB; None: 80 % of the memory available now) is kept as
        ``ctx.memory_limit`` (bytes) for methods with checks of their own.
        """
        ctx.memory_limit = _resources.limit_bytes(memory_limit)
        ctx.estimate = est = self.estimate(*args, opts=opts)
        if est is None:
            return None
        logger.info("%s: estimated %s (limit %.3g GiB)", ctx.label, _resources.describe(est),
                    ctx.memory_limit / _resources.GiB)
        _resources.check(ctx.label, est, ctx.memory_limit, given=memory_limit is not None)
        return est

    def __call__(self, *args, seed=None, throw: bool = True, progress=None, memory_limit=None,
                 **options):
        if len(args) >= 3:
            check_features(self.label, self.supports, args[0], args[1], args[2])
            check_start(self.label, args[2])
        opts = self.parse_options(options)
        ctx = Run(self.label, seed, progress)
        self.preflight(ctx, args, opts, memory_limit)
        result = self.run(ctx, *args, opts=opts)
        return self.finish(ctx, result, throw)

    def finish(self, ctx: Run, result, throw: bool):
        """Add the output offset (:func:`apply_offset`), apply the divergence rule
        (:func:`check_divergence`, to every result not already "diverged"), set ``elapsed``,
        log, and raise or return a result that did not converge."""
        apply_offset(result)
        if result.status != "diverged":
            check_divergence(result, self.label)
        result.elapsed = ctx.elapsed
        if result.status == "converged":
            logger.info("%s: %s in %.3g s", ctx.label, result.message, result.elapsed)
            return result
        if throw:
            raise ConvergenceError(result.message, result=result)
        logger.warning("%s", result.message)
        return result

    def __repr__(self):
        return f"<dmft method {self.name!r}: {self.description}>"


#: problem features beyond the original one (one mse output, full batch, no decay)
FEATURES = {
    "outputs": "C >= 2 outputs (targets of shape (P, C))",
    "losses": "losses other than mse",
    "hinge": "the hinge loss",
    "weight_decay": "weight decay toward the initialisation",
    "decay_to_zero": "weight decay toward zero",
    "batches": "mini-batches and online schedules (batch_size)",
    "barlow_twins": "the Barlow Twins loss (couples all points and outputs)",
    "output_offset": "an output offset (output_offset='nngp')",
}


def features(data, train) -> set:
    """The :data:`FEATURES` a problem needs."""
    need = set()
    if data.multi_output:
        need.add("outputs")
    if train.loss != "mse":
        need.add("losses")
    if train.loss == "hinge":
        need.add("hinge")
    if train.weight_decay > 0:
        need.add("decay_to_zero" if train.decay_to == "zero" else "weight_decay")
    if train.batch_size is not None:
        need.add("batches")
    if train.loss == "barlow_twins":
        need.add("barlow_twins")
    if getattr(train, "output_offset", "none") != "none":
        need.add("output_offset")
    return need


def check_features(label, supports, net, data, train) -> None:
    """ValueError naming what a method does not solve (and which methods do)."""
    if not hasattr(train, "loss") or not hasattr(data, "multi_output"):
        return
    need = features(data, train)
    missing = sorted(need - set(supports))
    if missing:
        what = "; ".join(FEATURES[m] for m in missing)
        from .api import METHODS
        able = [f"method={k!r}" for k, m in METHODS.items()
                if k != "auto" and need <= set(getattr(m, "supports", ()))]
        able.append("dmft.simulate")
        raise ValueError(
            f"{label} does not solve {what}; use {' or '.join(able)} (see docs/methods.rst "
            f"for which method solves what), or change train / data")


def apply_offset(result):
    """Add the output offset f0 of ``train.output_offset`` (docs/theory.rst §7) to the
    predictions of a Solution or Ensemble, once, in this one place: every method (and
    simulate) marches its own output f, with f(0) = 0 at infinite width, and its objective adds
    f0 inside the loss (:class:`solvers.objective.Objective`); the reported predictions are
    f + f0, and ``extras["output_offset"]`` (n, C) keeps f0. Returns ``result``."""
    train, data, net = (getattr(result, k, None) for k in ("train", "data", "net"))
    if getattr(train, "output_offset", "none") == "none" \
            or getattr(result, "train_predictions", None) is None \
            or "output_offset" in getattr(result, "extras", {}):
        return result
    from solvers.objective import Objective
    f0 = Objective.from_specs(data, train, net).offset
    P = data.P
    if data.multi_output:
        tr, te = f0[:P], f0[P:]
    else:
        tr, te = f0[:P, 0], f0[P:, 0]
    result.train_predictions = np.asarray(result.train_predictions) + tr
    result.test_predictions = np.asarray(result.test_predictions) + te
    result.extras["output_offset"] = np.array(f0)
    return result


def check_start(label, train) -> None:
    """ValueError for Barlow Twins at infinite width without an output offset: f(0) = 0 there,
    a stationary point of the loss (docs/theory.rst §7), so nothing would move."""
    if getattr(train, "loss", None) == "barlow_twins" \
            and getattr(train, "output_offset", "none") == "none":
        raise ValueError(
            f"{label}: Barlow Twins at infinite width starts at f(0) = 0, a stationary point of "
            f"the loss (every gradient vanishes, and standardisation is undefined there); give "
            f"the output an O(1) start with GradientDescent(..., output_offset='nngp') (a fixed "
            f"draw of the NNGP added to the output, docs/theory.rst §7), or simulate networks "
            f"in the NTK parameterisation (dmft.simulate(..., parameterization='ntk'))")


def _stable_lr(ntk0, P):
    """2 / lambda_max of the t = 0 NTK on the training points (None if unknown); for one NTK
    per seed the smallest of the networks' limits (:func:`solvers.static.stable_lr`)."""
    K = np.asarray(ntk0, dtype=np.float64)[..., :P, :P].reshape(-1, P, P)
    K = K[np.all(np.isfinite(K), axis=(1, 2))]
    try:
        lr = min((_static.stable_lr(k) for k in K), default=np.inf)
    except np.linalg.LinAlgError:
        return None
    return float(lr) if np.isfinite(lr) else None


def check_divergence(result, label="result"):
    """The one divergence rule of every method (module docstring); marks ``result`` failed.

    A Solution (or Fluctuations: only finiteness of the standard errors) or an Ensemble
    (per network: the message names the seeds) whose predictions or NTK are not finite, whose
    training loss exceeds :data:`DIVERGENCE_LOSS_FACTOR` times its initial value, or whose NTK
    exceeds :data:`DIVERGENCE_NTK_FACTOR` times its initial scale gets ``status="diverged"``
    (also when it had failed a milder check: divergence is the more informative status)
    and a message with the peak, the step and the frozen-kernel limit 2 / lambda_max(K(0)) of
    lr. A converged result with NaN or infinite standard errors gets
    ``status="not_converged"``. Returns ``result``.
    """
    preds = getattr(result, "train_predictions", None)
    ntk = getattr(result, "ntk", None)
    data, train = getattr(result, "data", None), getattr(result, "train", None)
    if preds is not None and ntk is not None and data is not None and train is not None \
            and getattr(result, "t", None) is not None:
        with np.errstate(all="ignore"):
            f = np.concatenate([np.asarray(preds).reshape(-1),
                                np.asarray(result.test_predictions).reshape(-1)])
            try:
                loss = np.atleast_2d(_loss(np.asarray(preds), data.y_train, train.loss,
                                           getattr(train, "loss_params", None)))
            except FloatingPointError:      # Barlow Twins standardisation of a collapse
                loss = np.full(np.asarray(preds).shape[:-2 if data.multi_output else -1],
                               np.nan)
                loss = np.atleast_2d(loss)
            S, T1 = loss.shape
            # the NTK as (S, T+1, n C, n C) over point-major (point, output) pairs
            K = np.asarray(ntk, dtype=np.float64).reshape(S, T1, -1)
            nC = int(round(np.sqrt(K.shape[-1])))
            K = K.reshape(S, T1, nC, nC)
            finite = (np.all(np.isfinite(f.reshape(S, -1)), axis=1)
                      & np.all(np.isfinite(K.reshape(S, -1)), axis=1))
            loss0 = np.maximum(loss[:, 0], 1e-30)
            ratio = loss / loss0[:, None]
            k0 = np.abs(K.reshape(S, T1, -1)[:, 0]).max(axis=1)
            kmax = np.abs(K.reshape(S, T1, -1)).max(axis=(1, 2))
            grown = kmax > DIVERGENCE_NTK_FACTOR * np.maximum(k0, 1e-300)
            bad = ~finite | (ratio.max(axis=1) > DIVERGENCE_LOSS_FACTOR) | grown
        if np.any(bad):
            lr_max = _stable_lr(K[:, 0], data.P * data.C)
            limit = (f"; the frozen-kernel (static NTK) stability limit is 2 / "
                     f"lambda_max(K_train(0)) = {lr_max:.4g}" if lr_max is not None else "")
            if S == 1 and getattr(result, "seeds", None) is None:
                r = ratio[0]
                if not finite[0]:
                    what = "non-finite predictions or NTK"
                elif np.max(r) > DIVERGENCE_LOSS_FACTOR:
                    k = int(np.argmax(r > DIVERGENCE_LOSS_FACTOR))
                    what = (f"the training loss grew from {loss[0, 0]:.4g} to "
                            f"{np.max(loss[0]):.4g} ({np.max(r):.3g} x; it exceeded "
                            f"{DIVERGENCE_LOSS_FACTOR:g} x its initial value at step {k})")
                else:
                    what = (f"the NTK grew to {kmax[0] / k0[0]:.3g} x its initial scale "
                            f"(bound {DIVERGENCE_NTK_FACTOR:g})")
                result.fail("diverged", (
                    f"{label} diverged: {what} at lr = {train.lr:g}, gamma0 = "
                    f"{train.gamma0:g}{limit}. Reduce lr (or gamma0)"))
            else:
                seeds = [int(s) for s in np.asarray(result.seeds)[bad]]
                peak = float(np.nanmax(np.where(bad, ratio.max(axis=1), np.nan))) \
                    if np.any(bad & finite) else np.inf
                result.fail("diverged", (
                    f"{label}: the networks with seeds {seeds} diverged (training loss above "
                    f"{DIVERGENCE_LOSS_FACTOR:g} x its initial value, peak {peak:.3g} x, or "
                    f"non-finite values) at lr = {train.lr:g}, gamma0 = {train.gamma0:g}"
                    f"{limit}. Reduce lr (or gamma0)"))
            return result
    stderr = (getattr(result, "stderr", None) or {}) if result.status == "converged" else {}
    bad_se = sorted(k for k, v in stderr.items()
                    if v is not None and not np.all(np.isfinite(np.asarray(v))))
    if bad_se:
        result.fail("not_converged", (
            f"{label}: the standard errors of {bad_se} are NaN or infinite (too few Monte "
            f"Carlo samples per replicate or block to estimate a spread); increase samples "
            f"(or replicates / blocks)"))
    return result
