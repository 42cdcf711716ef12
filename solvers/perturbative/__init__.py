"""Leading-order perturbation theory in gamma0^2 around the lazy dynamics (docs/theory.rst §4).

Deep linear networks (:func:`linear_expansion`, exact and deterministic; with C outputs,
smooth losses, mini-batches and weight decay toward the initialisation
:func:`objective_linear_expansion`, docs/theory.rst §7; for two-layer networks
:func:`objective_two_layer_expansion`), two-layer networks
with a smooth activation (:func:`two_layer_expansion`, Gaussian expectations at t = 0 by Monte
Carlo and Richardson extrapolation; derivation in its module) and deep networks
with a smooth activation (:func:`deep_expansion`, order-by-order Taylor jets of the single-site
fields, Gaussian expectations at t = 0; derivation in its module), in exact discrete time (gradient
descent with step ``lr``). The engines return the zeroth- and second-order coefficients of
every order parameter,

    q(gamma0) = q0 + gamma0^2 q2 + O(gamma0^4),

so that a caller can evaluate the expansion at any gamma0 without re-solving.

One module per route: :mod:`solvers.perturbative.deep_linear` (derivation for deep linear
networks), :mod:`solvers.perturbative.two_layer`, :mod:`solvers.perturbative.deep` (derivation
for deep nonlinear networks, its checks), and the shared pieces in
:mod:`solvers.perturbative.core`.
"""
from ..layout import two_time as flat_to_two_time
from .core import evaluate, lazy_dynamics
from .deep import deep_expansion, gaussian_moments
from .deep_linear import linear_expansion, objective_linear_expansion
from .two_layer import objective_two_layer_expansion, two_layer_expansion

__all__ = ["lazy_dynamics", "linear_expansion", "objective_linear_expansion", "evaluate",
           "flat_to_two_time", "two_layer_expansion", "objective_two_layer_expansion",
           "deep_expansion", "gaussian_moments"]
