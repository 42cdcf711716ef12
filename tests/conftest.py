"""Shared test data, tolerances and statistics (plain functions: ``from conftest import ...``).

- :func:`small_data`: the small Gaussian data set of the fluctuation tests (2 train + 1 test
  points, D = 4, targets spread over [-0.5, 1]).
- :data:`TOL`: the tolerances that several files share; a file adds its own entries with
  ``TOL = {**conftest.TOL, ...}`` and keeps them in one table.
- :func:`pooled_ratio`, :func:`ensemble_var_stderr`: simulated N Var against a theory, with
  the standard errors of the ensemble variance (fourth-moment form; sqrt(2 / (S - 1)) relative
  for Gaussian outputs).
- :func:`one_point_recursion`: the exact discrete-time dynamics of a two-layer linear network
  on one point with |x|^2 / D = 1 at infinite width (docs/theory.rst §3).
- :func:`requires_torch`: skip (not fail) a test that needs PyTorch when it is not installed
  (it is in the ``test`` extra, so ``pip install -e .[test]`` runs everything).
"""
import numpy as np
import pytest

import dmft

#: tolerances shared across test files (each with where it comes from)
TOL = {
    # Monte Carlo agreement, in standard errors, for a handful of (correlated) entries
    "z": 4.0,
    # ... and for the max over tens to thousands of entries (false alarm ~1e-4 per entry)
    "z_max": 4.5,
    # simulated N Var against the O(1/N) propagator: at the largest width within 10 % (or
    # width_se standard errors of the ensemble, where the error bar itself is wider); the
    # 1/N extrapolation over all widths within width_se of its standard error
    "width_rel": 0.10,
    "width_se": 3.0,
}


def small_data(P=2, Q=1, D=4, seed=0):
    """P train and Q test points with i.i.d. standard normal inputs; y = linspace(1, -0.5, P)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    y = np.linspace(1.0, -0.5, P)
    return dmft.Dataset(X[:P], y, X[P:] if Q else None)


def ensemble_var_stderr(x):
    """Variance over the seed axis (axis 0) per entry and its standard error (4th moment)."""
    S = x.shape[0]
    d2 = (x - x.mean(0)) ** 2
    return d2.sum(0) / (S - 1), d2.std(0, ddof=1) / np.sqrt(S)


def pooled_ratio(x, theory):
    """sum over entries of the ensemble variance of ``x`` (seeds on axis 0) / sum of the theory,
    with a standard error from the spread over seeds of the summed squared deviations."""
    S = x.shape[0]
    d2 = ((x - x.mean(0)) ** 2).reshape(S, -1).sum(1) * S / (S - 1)
    tot = float(np.sum(theory))
    return d2.mean() / tot, d2.std(ddof=1) / np.sqrt(S) / tot


def one_point_recursion(gamma0, y, lr, T):
    """docs/theory.rst §3, two-layer linear network, one point, infinite width, step lr: with
    a_t = lr gamma0 (y - f_t), K_{t+1} = (1 + a^2) K_t + 4 a gamma0 f_t and
    f_{t+1} = (1 + a^2) f_t + a K_t / gamma0 from K_0 = 2, f_0 = 0. Returns (f, K), (T + 1,)."""
    fs, Ks = [0.0], [2.0]
    for _ in range(T):
        f, K = fs[-1], Ks[-1]
        a = lr * gamma0 * (y - f)
        fs.append((1 + a * a) * f + a * K / gamma0)
        Ks.append((1 + a * a) * K + 4 * a * gamma0 * f)
    return np.array(fs), np.array(Ks)


def requires_torch():
    """``pytest.importorskip("torch")`` with the install hint; returns the module."""
    return pytest.importorskip("torch", reason="torch is not installed (pip install -e "
                                               "'.[test]' or '.[fluctuations]')")


@pytest.fixture
def torch_or_skip():
    """Fixture form of :func:`requires_torch`: ``@pytest.mark.usefixtures("torch_or_skip")``."""
    return requires_torch()


def unseal(path):
    """Make a saved result file look as dmft wrote it before checksums existed (no whole-file
    trailer, no ``dmft_sha256`` attribute), so that a test can edit it as an old file."""
    import h5py
    from dmft import io as dio
    data = path.read_bytes()
    if data[-dio._TRAILER_LEN:].startswith(dio._TRAILER_MAGIC):
        path.write_bytes(data[:-dio._TRAILER_LEN])
    with h5py.File(path, "r+") as f:
        del f.attrs["dmft_sha256"]


def small_deep_problem():
    """A small depth-2 tanh problem (3 + 1 points, 5 steps) for solver-behaviour tests."""
    import dmft.config
    data = dmft.config.teacher_student(P=3, Q=1, D=4, seed=0)
    return (dmft.MLP(depth=2, activation="tanh"), data,
            dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=5))
