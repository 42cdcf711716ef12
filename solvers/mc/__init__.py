"""Monte Carlo engines of the nonlinear DMFT (docs/theory.rst §2), in exact discrete time.

One module per idea:

- :mod:`solvers.mc.two_layer`: two-layer networks (L = 1) by the forward march of the
  population (no outer iteration), replicate errors, two-time kernels by rank-k updates;
  :mod:`solvers.mc.two_layer_objective`: the same with C outputs, any loss, weight decay and
  batch schedules (docs/theory.rst §7);
- :mod:`solvers.mc.sources`: the quasi-Monte Carlo sources in antithetic pairs;
- :mod:`solvers.mc.layer`: one layer of a deep network, its causal operators C, D and the
  BLAS-batched march of its fields;
- :mod:`solvers.mc.responses`: the responses A, B by forward-mode tangents, Stein's lemma
  (ReLU) and the control variate;
- :mod:`solvers.mc.iterative`: the alternating (fixed-point) deep solver;
- :mod:`solvers.mc.causal`: the one-pass causal deep solver (:mod:`solvers.mc.cost`: its
  memory and flop model), marching each population with :mod:`solvers.mc.causal_population`
  (plain problem) or :mod:`solvers.mc.causal_objective` (any objective), one layer's state
  and per-step work in :mod:`solvers.mc.causal_layer`.

Helpers shared by the engines (BLAS threading, the divergence check, rank-k kernel sums) are
in :mod:`solvers.mc._common`.

Flat two-time layouts, causal masks and the PSD factorisations are in :mod:`solvers.layout`.
"""
from ..activations import ACTIVATIONS
from ..layout import causal_cholesky, low_rank_factor, psd_sqrt
from ._common import _single_thread_blas
from .causal import CausalFactor, solve_causal
from .cost import estimate_flops, estimate_memory
from .iterative import solve_deep
from .layer import causal_operators, march_layer
from .responses import (_lam, default_relu_eps, response_control, response_sums,
                        stein_accumulate, stein_finish, stein_groups)
from .sources import two_layer_sources
from .two_layer import (march_fixed_delta, march_two_layer, solve_two_layer, two_layer_kernels,
                        two_layer_step_fast)

__all__ = ["psd_sqrt", "two_layer_step_fast", "march_fixed_delta", "march_two_layer",
           "two_layer_kernels", "causal_operators", "march_layer", "response_sums",
           "response_control", "solve_two_layer", "solve_deep", "solve_causal", "low_rank_factor",
           "two_layer_sources", "default_relu_eps", "causal_cholesky", "stein_groups",
           "stein_accumulate", "stein_finish", "CausalFactor", "estimate_memory",
           "estimate_flops", "ACTIVATIONS", "_lam", "_single_thread_blas"]
