"""The public entry points: ``solve``, ``simulate``, ``fluctuations``, ``load``.

``solve`` is one convenience entry point dispatching over a table of methods (like
``scipy.integrate.solve_ivp``'s ``METHODS``); each method is an adapter that turns the specs
into plain arrays, calls an engine from :mod:`solvers` and wraps the result in a
:class:`~dmft.results.Solution`.
"""
from __future__ import annotations

import importlib

from .specs import MLP, Dataset, GradientDescent

__all__ = ["solve", "simulate", "fluctuations", "METHODS"]

#: method name -> (module, function, one-line description). Adapters have the signature
#: ``fn(net, data, train, *, seed=None, throw=True, **options) -> Solution``.
METHODS = {
    "static": ("dmft._static", "solve_static",
               "frozen kernels at their t = 0 infinite-width values (static NTK / NNGP)"),
    "linear": ("dmft._linear", "solve_linear",
               "deep linear networks: exact algebraic DMFT matrix equations (no sampling)"),
    "mc": ("dmft._mc", "solve_mc",
           "nonlinear DMFT by Monte Carlo sampling of the single-site fields (one causal pass)"),
    "gia": ("dmft._mc", "solve_gia",
            "gradient-independence approximation: the Monte Carlo DMFT with A = B = 0"),
    "perturbative": ("dmft._perturbative", "solve_perturbative",
                     "leading order in gamma0^2 around the lazy dynamics"),
}


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


def _method_function(method):
    modname, fname, _ = METHODS[method]
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            raise NotImplementedError(f"method={method!r} is not available in this version "
                                      f"of dmft") from None
        raise
    return getattr(module, fname)


def solve(net: MLP, data: Dataset, train: GradientDescent, method: str = "auto", *,
          seed=None, throw: bool = True, **options):
    """Solve the infinite-width training dynamics of ``net`` on ``data`` under ``train``.

    Parameters
    ----------
    net, data, train : MLP, Dataset, GradientDescent
        The specification (THEORY.md §1 convention).
    method : str
        ``"auto"`` (``"linear"`` for linear networks, else ``"mc"``), or one of
        :data:`METHODS`: ``"static"``, ``"linear"``, ``"mc"``, ``"gia"``, ``"perturbative"``.
    seed : int or numpy.random.SeedSequence, optional
        Seed of every random number the method draws (Monte Carlo methods); the same seed
        gives bit-for-bit the same result on the same machine.
    throw : bool
        If True (default) a solver that did not converge raises
        :class:`~dmft.results.ConvergenceError`; if False it returns the result with
        ``converged=False``.
    **options
        Method-specific keyword options (e.g. ``samples`` for ``"mc"``); see each method.

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
    fn = _method_function(method)
    return fn(net, data, train, seed=seed, throw=throw, **options)


def simulate(net: MLP, data: Dataset, train: GradientDescent, width: int = 1024,
             seeds=range(16), **options):
    """Train finite-width networks in the package's convention (one per seed).

    See :func:`dmft._simulate.simulate` for the options (``record_kernels``, ``center``,
    ``progress``). Returns an :class:`~dmft.results.Ensemble`.
    """
    _check_specs(net, data, train)
    from ._simulate import simulate as _sim
    return _sim(net, data, train, width=width, seeds=seeds, **options)


def fluctuations(sol, **options):
    """O(1/width) fluctuations around an infinite-width solution (THEORY.md §5).

    Returns a :class:`~dmft.results.Fluctuations` with ``prediction_cov`` and ``ntk_var``
    (N * covariances as N -> infinity).
    """
    from ._fluctuations import fluctuations as _fl
    return _fl(sol, **options)
