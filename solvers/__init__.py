"""Numerical engines of the ``dmft`` package: *how* things are computed.

Engines take NumPy arrays and plain options and return arrays or plain dicts; they never
import :mod:`dmft` (dependencies run one way, ``dmft -> solvers``), so each can be tested on
toy inputs. Users normally call :func:`dmft.solve`, :func:`dmft.simulate` and
:func:`dmft.fluctuations` instead.

Modules
-------
activations   phi, phi', phi'' for NumPy and Numba (integer codes)
layout        flat <-> two-time kernels, causal masks, PSD and causal factorisations
gaussian      two-point Gaussian expectations (closed forms, quadrature)
static        NNGP / NTK recursions at t = 0 and frozen-kernel dynamics
network       finite-width network simulator (BLAS); network_weights: its weight storage
linear        deep linear DMFT: algebraic matrix equations (linear_march: the plain march,
              linear_general: C outputs, any loss, weight decay, batches)
mc            Monte Carlo DMFT (package): two-layer march, one layer's march, responses,
              the iterative and the one-pass causal deep solvers
fluct         O(1/N) fluctuations (package): two-layer propagator (every step, selected
              times, any objective), lazy, linear-exact, deep linear and deep sampled
              propagators
perturbative  expansion in gamma0^2 around the lazy dynamics (package)
fixedpoint    the one self-consistency loop (damping / Anderson mixing)
stats         1/N extrapolation of ensemble means (tests, benchmarks)
"""
