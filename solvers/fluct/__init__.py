"""Finite-width fluctuations at O(1/N) (docs/theory.rst §5).

Engines only (arrays in, arrays or plain dicts out; no :mod:`dmft` import). Notation as in
docs/theory.rst: n = P + Q points (P training points first), T steps, c = lr * gamma0, kx = Phi^0
(n, n), Delta (T, P) the infinite-width error signal on the training points at the times
t = 0 .. T-1 that drive the updates. One module per route:

- :mod:`solvers.fluct.two_layer`: the single-site process of a two-layer network (sampling,
  the march under a given Delta, the self-consistent population march);
- :mod:`solvers.fluct.propagator`: the two-layer O(1/N) propagator by forward-mode tangents
  and influence vectors, with :mod:`solvers.fluct.propagator_times` (selected times, adjoint
  rows), :mod:`solvers.fluct.propagator_objective` (C outputs, any loss) and their shared
  batch-means estimation :mod:`solvers.fluct.influence`;
- :mod:`solvers.fluct.lazy`: the lazy (frozen-kernel) limit;
- :mod:`solvers.fluct.linear_exact`: the exact closure of two-layer linear networks;
- :mod:`solvers.fluct.deep_linear`: deep linear networks, exact (PyTorch);
- :mod:`solvers.fluct.deep_mc`: deep nonlinear networks, sampled (PyTorch), with the adjoint
  rows in one backward pass (:mod:`solvers.fluct.deep_causal`) and the noise covariance kappa
  by forward mode or Stein (:mod:`solvers.fluct.kappa_stein`) or per-sample Hessians
  (:mod:`solvers.fluct.kappa_hessian`).
"""
from .lazy import (lazy_delta, lazy_propagator, lazy_propagator_objective, lazy_trajectory,
                   linear_lazy_moments, linear_lazy_moments_multi, sampled_lazy_moments,
                   sampled_lazy_moments_multi)
from .linear_exact import linear_exact_fluctuations, linear_moments_march
from .propagator import (accumulate_response, accumulate_response_jit, default_chunk,
                         influence_moments, two_layer_propagator)
from .propagator_objective import objective_propagator
from .propagator_times import two_layer_propagator_times
from .two_layer import (draw_units, draw_units_multi, march, march_multi, population_march,
                        population_march_objective, triu_index, unit_observables,
                        unit_observables_multi)

__all__ = ["draw_units", "march", "population_march", "unit_observables", "accumulate_response",
           "accumulate_response_jit", "influence_moments", "two_layer_propagator",
           "lazy_propagator", "linear_lazy_moments", "sampled_lazy_moments",
           "linear_moments_march", "linear_exact_fluctuations", "triu_index", "default_chunk",
           "lazy_delta", "draw_units_multi", "march_multi", "population_march_objective",
           "unit_observables_multi", "objective_propagator", "lazy_propagator_objective",
           "lazy_trajectory", "linear_lazy_moments_multi", "sampled_lazy_moments_multi",
           "two_layer_propagator_times"]
