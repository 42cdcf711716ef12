"""dmft: dynamical mean field theory of wide neural networks.

Solve the infinite-width training dynamics of deep networks in the feature-learning
(mean-field / muP) regime (Bordelon & Pehlevan, NeurIPS 2022 / JSTAT 2023, arXiv 2205.09653),
their O(1/width) fluctuations (NeurIPS 2023, arXiv 2304.03408), and simulate finite-width
networks in exactly the same convention to check them.

Specifying a problem
--------------------
MLP               network: depth L (hidden layers) and activation ("linear", "tanh", "relu", "erf")
Dataset           training points (X_train, y_train) and passive test points (X_test, y_test)
GradientDescent   gamma0 (feature-learning strength), lr (step = time step), steps, loss="mse"
                  (or cross_entropy, logistic, hinge, barlow_twins), weight decay, batches
augment           augmentations for self-supervised views (Dataset.views / Dataset.augmented)

Solving at infinite width
-------------------------
solve             dispatch over METHODS: "static" (frozen NTK), "linear" (exact matrix equations
                  for linear nets), "mc" (alternating Monte Carlo DMFT), "gia", "perturbative"
Solution          result: predictions, losses, NTK, two-time kernels phi / g, responses A / B,
                  diagnostics (converged, status, message, iterations, residuals), Monte
                  Carlo stderr, provenance. ``status``: "converged", "not_converged" or
                  "diverged"; ``throw=False`` returns failed results instead of raising

Adding a method
---------------
Method            base of every adapter: ``name``, ``description``, ``Options``, ``run``; the
                  skeleton does seeds, timing, progress, logging, ``throw=`` and the status
Options, option   base of a method's frozen options dataclass, and its field helper
                  (``dmft.METHODS["name"] = MyMethod()`` registers one; docs/examples)

Finite width
------------
simulate          train finite-width networks (one per seed) -> Ensemble
fluctuations      O(1/N) propagators: N * Cov of predictions and kernels -> Fluctuations
FLUCTUATION_METHODS  its table: "auto", "propagator", "lazy", "linear-exact", "deep-linear", ...

Sweeps
------
sweep             a grid of configurations (the ``dmft run`` format) on dask -> xarray.Dataset,
                  persisted per point and resumable (``dmft sweep SWEEP.toml -o sweep.h5``)
load_sweep        the sweep file as an xarray.Dataset; ``load_point`` one point's full result

Files and figures
-----------------
save, load        HDF5 round trip of Solution / Ensemble / Fluctuations (``sol.save(path)``)
plot              quick-look figure of a result

Representations (self-supervised training, docs/theory.rst §7)
---------------------------------------------------------------
cross_correlation, ntk_change, linear_probe   read-outs over time of any result

Glossary (names follow the equations, docs/theory.rst)
------------------------------------------------
L = depth, N = width, P / Q = number of train / test points, n = P + Q, T = steps,
eta = lr, gamma0 = feature-learning strength, t = k * lr. Kernels and responses::

    phi[l-1, t, s, mu, nu] = Phi^l_{mu nu}(t, s) = <phi(h^l_mu(t)) phi(h^l_nu(s))>
    g[l-1, t, s, mu, nu]   = G^l_{mu nu}(t, s)   = <g^l_mu(t) g^l_nu(s)>
    ntk[t, mu, nu]         = K_{mu nu}(t) = sum_{l=0}^{L} G^{l+1}(t,t) Phi^l(t,t)
                             (G^{L+1} = 1, Phi^0 = X X^T / D)
    A[l-1], B[l-1]         = responses A^l, B^l (l = 1 .. L-1),
                             A^l = <d phi(h^l) / d r^l> / gamma0,
                             B^l = <d g^{l+1} / d u^{l+1}> / gamma0
"""
from ._version import __version__
from ._progress import enable_logging
from ._method import Method, Options, option
from .api import METHODS, fluctuations, simulate, solve
from .results import ConvergenceError, Ensemble, Fluctuations, Solution
from .specs import MLP, Dataset, GradientDescent
# the function shadows its module's name on the package (dask and xarray load lazily inside)
from .sweep import load_point, load_sweep, sweep
from . import augment
from .representation import cross_correlation, linear_probe, ntk_change


def __getattr__(name):
    # the fluctuation table lives with its engines, imported on first use (PEP 562)
    if name == "FLUCTUATION_METHODS":
        from ._fluctuations import FLUCTUATION_METHODS
        return FLUCTUATION_METHODS
    raise AttributeError(f"module 'dmft' has no attribute {name!r}")


def save(result, path):
    """Write a Solution, Ensemble or Fluctuations to an HDF5 file (atomically)."""
    from .io import save as _save
    return _save(result, path)


def load(path):
    """Read a result written by :func:`save` (any schema version this package knows)."""
    from .io import load as _load
    return _load(path)


def plot(result, path=None, **kwargs):
    """Quick-look figure of a result (or of an HDF5 file); saves a PNG when ``path`` is given."""
    from .plotting import plot as _plot
    return _plot(result, path, **kwargs)


__all__ = ["MLP", "Dataset", "GradientDescent", "solve", "simulate", "fluctuations",
           "Solution", "Ensemble", "Fluctuations", "ConvergenceError", "METHODS",
           "save", "load", "plot", "enable_logging", "__version__", "Method", "Options",
           "option", "augment", "cross_correlation", "linear_probe", "ntk_change",
           "sweep", "load_sweep", "load_point"]
