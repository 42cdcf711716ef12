"""Finite-width fluctuations of deep nonlinear networks: ``method="deep-propagator"``.

The sampled deep propagator (:mod:`solvers.fluct.deep_mc`) is the linearised Monte Carlo
single-site map plus a sampled noise covariance kappa with the formal MSR cumulants of the
response order parameters. Proved here by:
- an independent exact route: on linear networks (where every single-site average is a
  Gaussian integral) it must reproduce ``method="deep-linear"`` (solvers.fluct.deep_linear,
  itself checked against simulated linear networks) within its Monte Carlo standard errors, centred
  and not, including the initial-output variance and the response-noise terms;
- reproducibility and the adapter (method selection, options, errors);
- theory against simulated tanh networks (depths 2 and 3), widths 128 .. 2048 (validation: tens of
  CPU minutes).
"""
import numpy as np
import pytest

import dmft
from conftest import small_data as _data

# the deep propagator differentiates the sampled single-site map with torch
pytestmark = pytest.mark.usefixtures("torch_or_skip")

TOL = {
    "z": 4.5,           # Monte Carlo agreement, in standard errors (max over ~40 entries)
    "width_rel": 0.10,  # validation: N Var at the largest width within 10 % (or 3 s.e.)
}


@pytest.mark.parametrize("depth,center", [
    (2, False), (2, True), pytest.param(3, False, marks=pytest.mark.slow)])
def test_linear_network_reproduces_exact_deep_linear_propagator(depth, center):
    """Depth 2 (and 3, slow), gamma0 = 1, 3 steps of lr 0.2 (m = 12 flat indices): every entry
    of N Cov(f) and N Var(K) at every time within TOL['z'] standard errors of the exact
    propagator (measured at depth 3: max z 2.3 / 1.3, 174 s).

    The standard errors are the batch means of kappa's samples; the map's own sampling error
    (samples = 8192, antithetic pairs) is part of what this test bounds: if it were not
    below kappa's, the z-scores would exceed the bound."""
    data = _data()
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=3)
    sol = dmft.solve(dmft.MLP(depth, "linear"), data, train, method="linear")
    ex = dmft.fluctuations(sol, method="deep-linear", center=center)
    mc = dmft.fluctuations(sol, method="deep-propagator", center=center, samples=8192,
                           kappa_samples=4096, seed=3)
    assert mc.method == "deep-propagator" and mc.options["residual"] < 1e-6
    for key, se_key in (("prediction_cov", "prediction_cov"), ("ntk_var", "ntk_var")):
        a, b = getattr(mc, key), getattr(ex, key)
        se = mc.stderr[se_key]
        scale = np.abs(b).max()
        nz = np.abs(b) > 1e-9 * scale
        if center and key == "prediction_cov":
            # centred: f(0) = 0 exactly, no noise at t = 0
            assert np.allclose(a[0], 0.0, atol=1e-12)
        z = np.abs(a - b)[nz] / np.maximum(se[nz], 1e-3 * scale)
        assert z.max() < TOL["z"], (key, z.max(), a[-1], b[-1], se[-1])
        # the test has power: standard errors below 10 % of the largest entry (measured
        # ~7 %), so a relative error of ~1/3 in the large entries fails it
        assert se.max() < 0.1 * scale, (key, se.max() / scale)
    # the initial-output variance Phi^L(0, 0) / gamma0^2 = kx enters uncentred
    if not center:
        assert np.max(np.abs(mc.prediction_cov[0] - data.kx)) < TOL["z"] * \
            mc.stderr["prediction_cov"][0].max() + 1e-12


def test_seed_reproducibility_selection_and_errors():
    data = _data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=2)
    sol = dmft.solve(dmft.MLP(2, "tanh"), data, train, method="mc", samples=4096, seed=0,
                     progress=False)
    kw = dict(samples=512, kappa_samples=256, map_replicates=2, ntk=False)
    a = dmft.fluctuations(sol, seed=5, **kw)
    assert a.method == "deep-propagator" and a.options["kappa_samples"] == 256
    assert a.options["map_replicates"] == 2 and set(a.options["map_noise_ratio"]) == {
        "predictions"}
    b = dmft.fluctuations(sol, seed=5, **kw)
    assert np.array_equal(a.prediction_cov, b.prediction_cov)
    assert np.all(np.isnan(a.ntk_var))
    c = dmft.fluctuations(sol, seed=6, **kw)
    assert not np.array_equal(a.prediction_cov, c.prediction_cov)
    assert np.all(np.isfinite(a.prediction_cov)) and np.all(np.linalg.eigvalsh(
        a.prediction_cov[-1]) > 0)
    with pytest.raises(ValueError, match="kappa_samples"):
        dmft.fluctuations(sol, samples=512, kappa_samples=0)
    with pytest.raises(ValueError, match="too small for blocks"):
        dmft.fluctuations(sol, samples=512, kappa_samples=16)
    with pytest.raises(NotImplementedError, match="depth=1"):
        dmft.fluctuations(sol, method="propagator")
    # numerical trouble is reported, not returned: the same order parameters with a learning
    # rate far past the stable one are not a fixed point of the single-site map there (the
    # causal adjoint's check; the iterative adjoint's linearised dynamics blow up)
    fields = ("net", "data", "method", "t", "train_predictions", "test_predictions", "ntk",
              "phi", "g", "A", "B")
    bad = dmft.Solution(**{**{k: getattr(sol, k) for k in fields},
                           "train": dmft.GradientDescent(gamma0=1.0, lr=40.0, steps=2)})
    with pytest.raises(dmft.ConvergenceError, match="not a fixed point|did not converge|"
                                                    "diverged"):
        dmft.fluctuations(bad, samples=512, kappa_samples=256, seed=5, ntk=False)


def _check_against_simulations(net, data, train, sol, center, times):
    """Deep propagator (16384 / 4096 samples) against 400 simulated networks at widths 512 and
    2048 (pooled ratios, tests/test_fluctuations_deep._sweep); at 2048 within TOL['width_rel']
    (or 3 standard errors of the ensemble)."""
    from tests.test_fluctuations_deep import _sweep
    fl = dmft.fluctuations(sol, center=center, samples=16384, kappa_samples=4096, seed=1)
    rows = _sweep(net, data, train, fl, (512, 2048), {512: 400, 2048: 400}, center, times)
    for N, t, rp, rk in rows:
        if N == 2048:
            for r, se in (rp, rk):
                assert abs(r - 1) < max(TOL["width_rel"], 3 * se), (center, rows)


@pytest.mark.slow
@pytest.mark.validation
def test_tanh_depth_two_against_simulations():
    """tanh, depth 2, gamma0 = 1, 6 steps of lr 0.2, 2 train + 1 test points, centred and not:
    N Var of the predictions and NTK entries (pooled over entries) of simulated ensembles of
    400 networks at widths 512 and 2048 against the deep propagator at t = 3 and 6; at the
    largest width within 10 % (or 3 standard errors of the ensemble).

    Measured (1 Dec 2026, 2-core machine): the propagator (16384 / 4096 samples) took 735 s
    centred, 420 s raw; ratios at N = 2048, centred: predictions
    1.026 +- 0.048 (t = 3), 0.973 +- 0.048 (t = 6), NTK 0.958 +- 0.053, 0.939 +- 0.057; raw:
    predictions 0.993 +- 0.046, 1.013 +- 0.052, NTK 0.965 +- 0.053, 0.955 +- 0.056 (all widths
    128 .. 2048 in benchmarks/README.md)."""
    from dmft.config import teacher_student
    data = teacher_student(P=2, Q=1, D=6, seed=0)
    net = dmft.MLP(2, "tanh")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=6)
    sol = dmft.solve(net, data, train, method="mc", samples=1 << 18, replicates=4, seed=0,
                     progress=False)
    for center in (True, False):
        _check_against_simulations(net, data, train, sol, center, (3, 6))


@pytest.mark.slow
@pytest.mark.validation
def test_tanh_depth_three_against_simulations():
    """tanh, depth 3 (a middle layer with both response channels), gamma0 = 1, 4 steps of lr
    0.2, 2 train + 1 test points, centred; 400 networks at widths 512 and 2048.

    Measured (1 Dec 2026): propagator 426 s; ratios at N = 2048: predictions 0.968 +- 0.046
    (t = 2), 0.933 +- 0.046 (t = 4), NTK 0.993 +- 0.052, 1.042 +- 0.067 (at N = 512 the
    predictions' ratio is 0.854 +- 0.040 at t = 4: a finite-width correction)."""
    from dmft.config import teacher_student
    data = teacher_student(P=2, Q=1, D=6, seed=0)
    net = dmft.MLP(3, "tanh")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=4)
    sol = dmft.solve(net, data, train, method="mc", samples=1 << 17, replicates=4, seed=0,
                     progress=False)
    _check_against_simulations(net, data, train, sol, True, (2, 4))


def test_replicate_errors_include_the_map_noise():
    """solvers.fluct.deep_mc.combine_replicates on synthetic replicates: each entry's R = 4
    estimates scatter with variance (1 + rho) se^2 around the truth while every replicate
    reports se (its batch means see kappa only). The pooled excess ratio recovers rho
    (2000 entries x 3 degrees of freedom: its sampling sd is ~(1 + rho) sqrt(2 / 6000) ~ 0.04
    at rho = 1.2; bound 5 sd, and rho = 0 must give ~0, not rho), and the returned errors
    cover the spread of the means over many draws."""
    from solvers.fluct.deep_mc import combine_replicates
    rng = np.random.default_rng(0)
    R, n, T1 = 4, 20, 10          # 10 x 210 upper-triangle entries per group
    truth = rng.uniform(1.0, 5.0, (T1, n, n))
    truth = truth + truth.transpose(0, 2, 1)
    se = 0.05 * truth
    for rho in (0.0, 1.2):
        means, errs = [], []
        for rep in range(40):
            outs = []
            for r in range(R):
                up = np.triu(rng.standard_normal((T1, n, n)))        # symmetric, unit var
                noise = up + np.triu(up, 1).transpose(0, 2, 1)
                x = truth + np.sqrt(1 + rho) * se * noise
                outs.append({"cov": np.zeros((T1, T1, n, n)), "pred_cov": x, "pred_cov_se": se,
                             "ntk_var": None, "ntk_var_se": None, "residual": 0.0,
                             "fixed_point_gap": None})
            res = combine_replicates(outs)
            if rep == 0:
                got = res["map_noise_ratio"]["predictions"]
                assert abs(got - rho) < 5 * (1 + rho) * np.sqrt(2 / (3 * 2100)) + 0.02, \
                    (rho, got)
            means.append(res["pred_cov"])
            errs.append(res["pred_cov_se"])
        spread = np.std(means, axis=0, ddof=1)
        ratio = float(np.sqrt(np.mean(spread ** 2) / np.mean(np.square(errs))))
        # honest errors: ratio 1 within ~3 % (2100 entries x 39 degrees of freedom)
        assert abs(ratio - 1.0) < 0.05, (rho, ratio)
        # and without the excess (one replicate's batch means only) they would not be
        if rho:
            assert abs(np.sqrt(np.mean(spread ** 2) / np.mean(se ** 2 / R)) - 1.0) > 0.3


def test_replicate_progress_is_one_monotone_bar(monkeypatch):
    """With map_replicates the engine reports one overall fraction (adjoint, then kappa, of
    each replicate), never going back, ending at 1."""
    import dmft._fluctuations as F

    data = _data(2, 1)
    sol = dmft.solve(dmft.MLP(2, "tanh"), data, dmft.GradientDescent(1.0, 0.2, 2),
                     method="mc", samples=4096, seed=0, progress=False)
    seen = []
    orig = F._deep_mc.deep_propagator

    def run(*a, **k):
        inner = k["progress"]

        def rec(done, total, what):
            seen.append((done / total, what))
            inner(done, total, what)
        k["progress"] = rec
        return orig(*a, **k)

    monkeypatch.setattr(F._deep_mc, "deep_propagator", run)
    dmft.fluctuations(sol, samples=512, kappa_samples=256, seed=1, ntk=False, progress=True)
    frac = [x for x, _ in seen]
    assert all(b >= a for a, b in zip(frac, frac[1:])) and frac[-1] == 1.0
    assert seen[0][1] == "map 1/4: adjoint" and seen[-1][1] == "map 4/4: kappa"
