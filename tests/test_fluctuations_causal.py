"""The deep propagator's adjoint rows in one backward pass through the causal recursion
(:mod:`solvers.fluct.deep_causal`, ``deep_propagator(..., adjoint="causal")``, the default).

Proved here by:
- the exact route: on linear networks ``method="deep-propagator"`` reproduces
  ``method="deep-linear"`` (tests/test_fluctuations_deep_mc.py runs that with the defaults, and
  this file with the Hessian noise covariance, so that the adjoint is tested on its own);
- the iterative adjoint (T + L backward passes of the non-causal sweep, the previous default):
  on tanh networks of depth 2 and 3 both give the same N Var within their joint Monte Carlo
  errors (same samples for kappa, different linearisation order);
- the ``times`` option: observables at a subset of steps are the full run's at those steps.
"""
import numpy as np
import pytest

import dmft
from conftest import TOL, fix_deep_propagator_options, small_data

pytestmark = pytest.mark.usefixtures("torch_or_skip")


@pytest.mark.parametrize("center", [False, True])
def test_causal_adjoint_reproduces_exact_linear_propagator(monkeypatch, center):
    """Depth 2, gamma0 = 1, 3 steps of lr 0.2: every entry of N Cov(f) and N Var(K) at every
    time within TOL['z_max'] standard errors of the exact propagator, with the per-sample
    Hessian kappa (measured: max z 3.0 / 2.5, relative gaps 5 % / 2.6 %, the same as the
    iterative adjoint's 3.3 / 2.7 with the same samples)."""
    fix_deep_propagator_options(monkeypatch, adjoint="causal", kappa="hessian")
    data = small_data()
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=3)
    sol = dmft.solve(dmft.MLP(2, "linear"), data, train, method="linear")
    ex = dmft.fluctuations(sol, method="deep-linear", center=center)
    mc = dmft.fluctuations(sol, method="deep-propagator", center=center, samples=8192,
                           kappa_samples=4096, seed=3)
    for key in ("prediction_cov", "ntk_var"):
        a, b, se = getattr(mc, key), getattr(ex, key), mc.stderr[key]
        scale = np.abs(b).max()
        nz = np.abs(b) > 1e-9 * scale
        z = np.abs(a - b)[nz] / np.maximum(se[nz], 1e-3 * scale)
        assert z.max() < TOL["z_max"], (key, z.max())
        # power: the error bars resolve a 30 % error of the large entries
        assert se.max() < 0.1 * scale


def _pooled(fl, T):
    f = float(np.trace(fl.prediction_cov[T]))
    fse = float(np.sum(np.diag(fl.stderr["prediction_cov"][T])))
    K = float(np.sum(fl.ntk_var[T]))
    Kse = float(np.sum(fl.stderr["ntk_var"][T]))
    return f, fse, K, Kse


@pytest.mark.slow
@pytest.mark.parametrize("depth", [2, 3])
def test_causal_and_iterative_adjoints_agree_on_tanh(monkeypatch, depth):
    """tanh, gamma0 = 1, 4 steps of lr 0.2, 2 + 1 points, centred; the same seed (so the same
    kappa samples): the pooled sums of N Var f(T) and N Var K(T) of the two adjoints within
    TOL['z'] of their (summed, an upper bound) standard errors. Measured (depth 2): 0.6228 vs
    0.6255 (+- 0.020) and 10.04 vs 10.03 (+- 0.57); the causal run is the faster one."""
    from dmft.config import teacher_student
    data = teacher_student(P=2, Q=1, D=6, seed=0)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=4)
    sol = dmft.solve(dmft.MLP(depth, "tanh"), data, train, method="mc", samples=1 << 16,
                     seed=0, progress=False)
    out = {}
    for adj in ("causal", "iterate"):
        monkeypatch.undo()
        fix_deep_propagator_options(monkeypatch, adjoint=adj, kappa="hessian")
        out[adj] = _pooled(dmft.fluctuations(sol, center=True, samples=8192,
                                             kappa_samples=4096, seed=1), 4)
    c, i = out["causal"], out["iterate"]
    for k in (0, 2):
        assert abs(c[k] - i[k]) < TOL["z"] * max(c[k + 1], i[k + 1]), (c, i)


def test_times_selects_steps_of_the_full_run():
    """times=[1, 3] gives the full run's prediction covariance and NTK variance at steps 1 and
    3 (same samples; rounding aside) and NaN at the others."""
    data = small_data()
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=3)
    sol = dmft.solve(dmft.MLP(2, "tanh"), data, train, method="mc", samples=4096, seed=0,
                     progress=False)
    kw = dict(samples=1024, kappa_samples=512, seed=4)
    full = dmft.fluctuations(sol, **kw)
    part = dmft.fluctuations(sol, times=[1, -1], **kw)
    assert part.options["times"] == [1, 3]
    for key in ("prediction_cov", "ntk_var"):
        a, b = getattr(part, key), getattr(full, key)
        for t in (1, 3):
            np.testing.assert_allclose(a[t], b[t], rtol=1e-9, atol=1e-12)
        assert np.all(np.isnan(a[[0, 2]]))
    two = part.extras["prediction_cov_two_time"]
    np.testing.assert_allclose(two[1, 3], full.extras["prediction_cov_two_time"][1, 3],
                               rtol=1e-9, atol=1e-12)
    assert np.all(np.isnan(two[0]))
