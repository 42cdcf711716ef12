"""The public entry points: ``solve``, ``simulate``, ``fluctuations``, ``load``.

``solve`` is one convenience entry point dispatching over a table of methods (like
``scipy.integrate.solve_ivp``'s ``METHODS``); each method is an adapter
(:class:`dmft._method.Method`: a frozen options dataclass and ``run``, inside one skeleton
for seeds, timing, progress, logging, ``throw=`` and the result's status) that turns the specs
into plain arrays, calls an engine from :mod:`solvers` and wraps the result in a
:class:`~dmft.results.Solution`. ``fluctuations`` dispatches the same way over
:data:`dmft._fluctuations.FLUCTUATION_METHODS`, and ``simulate`` is an adapter too.
"""
from __future__ import annotations

import importlib

from ._method import Method
from .specs import MLP, Dataset, GradientDescent

__all__ = ["solve", "simulate", "fluctuations", "METHODS", "MethodTable"]


class MethodTable(dict):
    """name -> adapter (:class:`dmft._method.Method`), imported on first use.

    An entry is a :class:`~dmft._method.Method` instance, or a ``"module:attribute"`` string
    naming one (imported when first looked up, so ``import dmft`` stays light). Looking an
    entry up (``METHODS[name]``, ``.get``, ``.values()``, ``.items()``) gives the adapter.
    """

    def __getitem__(self, name):
        entry = dict.__getitem__(self, name)
        if isinstance(entry, Method):
            return entry
        modname, _, attr = entry.partition(":")
        adapter = getattr(importlib.import_module(modname), attr)
        dict.__setitem__(self, name, adapter)       # cache the import
        return adapter

    def get(self, name, default=None):
        return self[name] if name in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]


#: method name -> adapter; ``dmft.solve(..., method=name)`` calls ``METHODS[name]``. Add a
#: method with one entry: ``dmft.METHODS["mine"] = MyMethod()`` (docs/examples/example_method.py)
METHODS = MethodTable({
    "static": "dmft._static:STATIC",
    "linear": "dmft._linear:LINEAR",
    "mc": "dmft._mc:MC",
    "gia": "dmft._mc:GIA",
    "perturbative": "dmft._perturbative:PERTURBATIVE",
})


def _check_specs(net, data, train):
    if not isinstance(net, MLP):
        raise ValueError(f"net must be a dmft.MLP, got {type(net).__name__}; "
                         f"build one with dmft.MLP(depth=..., activation=...)")
    if not isinstance(data, Dataset):
        raise ValueError(f"data must be a dmft.Dataset, got {type(data).__name__}; "
                         f"build one with dmft.Dataset(X_train, y_train, X_test, y_test)")
    if not isinstance(train, GradientDescent):
        raise ValueError(f"train must be a dmft.GradientDescent, got {type(train).__name__}; "
                         f"build one with dmft.GradientDescent(gamma0=..., lr=..., steps=...)")
    train.check(data)


def solve(net: MLP, data: Dataset, train: GradientDescent, method: str = "auto", *,
          seed=None, throw: bool = True, **options):
    """Solve the infinite-width training dynamics of ``net`` on ``data`` under ``train``.

    Parameters
    ----------
    net, data, train : MLP, Dataset, GradientDescent
        The specification (docs/theory.rst §1 convention).
    method : str
        ``"auto"`` (``"linear"`` for linear networks, else ``"mc"``), or one of
        :data:`METHODS`: ``"static"``, ``"linear"``, ``"mc"``, ``"gia"``, ``"perturbative"``.
    seed : int or numpy.random.SeedSequence, optional
        Seed of every random number the method draws (Monte Carlo methods); the same seed
        gives bit-for-bit the same result on the same machine. Deterministic methods record
        it. Anything but None, a non-negative integer or a SeedSequence raises ValueError.
    throw : bool
        If True (default) a solver that did not converge raises
        :class:`~dmft.results.ConvergenceError` (the result is ``exc.result``); if False it
        returns the result with ``converged=False`` and its ``status`` and ``message``.
    progress : bool or None
        Progress bar (None: only on a terminal), for the methods that show one.
    memory_limit : float, optional
        GB the method may use (default: 80 % of the memory available now). Every method
        estimates its memory (from the shapes it will allocate) and time before any work and
        logs them at INFO level; an estimate above the limit raises ValueError naming the GiB
        needed and the options that shrink the problem.
    **options
        Method-specific keyword options (e.g. ``samples`` for ``"mc"``): the fields of
        ``METHODS[method].Options``. An unknown one raises ValueError listing them.

    Returns
    -------
    Solution
    """
    _check_specs(net, data, train)
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, one of {['auto', *METHODS]}")
    if method == "auto":
        method = "linear" if net.linear else "mc"
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; use 'auto' or one of {list(METHODS)}")
    return METHODS[method](net, data, train, seed=seed, throw=throw, **options)


def simulate(net: MLP, data: Dataset, train: GradientDescent, width: int = 1024,
             seeds=range(16), *, throw: bool = True, **options):
    """Train finite-width networks in the package's convention (one per seed).

    See :func:`dmft._simulate.simulate` for the options (``record_kernels``, ``center``,
    ``progress``). Returns an :class:`~dmft.results.Ensemble`. With ``throw=False`` a
    diverging network leaves NaN rows and ``status="diverged"`` instead of raising.
    """
    _check_specs(net, data, train)
    from ._simulate import simulate as _sim
    return _sim(net, data, train, width=width, seeds=seeds, throw=throw, **options)


def fluctuations(sol, *, throw: bool = True, **options):
    """O(1/width) fluctuations around an infinite-width solution (docs/theory.rst §5).

    Dispatches over :data:`dmft._fluctuations.FLUCTUATION_METHODS` (``method=``; see
    :func:`dmft._fluctuations.fluctuations` for the options). Returns a
    :class:`~dmft.results.Fluctuations` with ``prediction_cov`` and ``ntk_var``
    (N * covariances as N -> infinity); ``throw=False`` returns one that did not converge
    (``status``, ``message``) instead of raising.
    """
    from ._fluctuations import fluctuations as _fl
    return _fl(sol, throw=throw, **options)
