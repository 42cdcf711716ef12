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
seed, runs, sets ``result.elapsed``, logs one line, and applies ``throw=``: a result whose
``status`` is not ``"converged"`` raises :class:`~dmft.results.ConvergenceError` (with the
result attached as ``exc.result``) when ``throw=True`` (default), or is returned, after a
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
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from dataclasses import dataclass

import numpy as np

from ._progress import logger, progress_bar
from .results import STATUSES, ConvergenceError
from .specs import check_positive_int

__all__ = ["Options", "Method", "Run", "option", "parse_seed", "STATUSES",
           "positive_int", "int_at_least", "real_in", "boolean", "one_of", "is_callable"]


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
    #: how results and log lines name the method (formatted with ``name``)
    label_format = "method={name!r}"
    #: the message for unknown options (formatted with ``label``, ``unknown``, ``valid``)
    unknown_format = ("unknown option(s) for {label}: {unknown}; valid options: {valid} "
                      "(and seed, throw, progress)")

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

    def __call__(self, *args, seed=None, throw: bool = True, progress=None, **options):
        opts = self.parse_options(options)
        ctx = Run(self.label, seed, progress)
        result = self.run(ctx, *args, opts=opts)
        return self.finish(ctx, result, throw)

    def finish(self, ctx: Run, result, throw: bool):
        """Set ``elapsed``, log, and raise or return a result that did not converge."""
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
