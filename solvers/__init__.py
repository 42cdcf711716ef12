"""Numerical engines of the ``dmft`` package: *how* things are computed.

Engines take NumPy arrays and plain options and return arrays or plain dicts; they never
import :mod:`dmft` (dependencies run one way, ``dmft -> solvers``), so each can be tested on
toy inputs. Users normally call :func:`dmft.solve`, :func:`dmft.simulate` and
:func:`dmft.fluctuations` instead.

Modules
-------
activations  phi, phi', phi'' for NumPy and Numba (integer codes)
gaussian     two-point Gaussian expectations (closed forms, quadrature)
static       NNGP / NTK recursions at t = 0 and frozen-kernel dynamics
network      finite-width network simulator (BLAS)
linear       deep linear DMFT: algebraic matrix equations
mc           Monte Carlo field marching for nonlinear DMFT (Numba)
fixedpoint   the one self-consistency loop (damping / Anderson mixing)
stats        1/N extrapolation of ensemble means (tests, benchmarks)
"""
