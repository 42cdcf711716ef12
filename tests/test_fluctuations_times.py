"""``dmft.fluctuations(..., times=...)`` and the adjoint two-layer engine (issue 21).

What they prove:
- kernels: the training-point tangent march with rows only at selected times
  (:func:`solvers.fluct.propagator.accumulate_response_times`) equals the full tangent sums
  (:func:`accumulate_response_jit`) row for row, to rounding;
- semantics of ``times``: NaN outside the selected steps (equal-time arrays, their standard
  errors) and outside the times x times blocks of the two-time covariance; negative steps
  count from the end, duplicates are dropped; with every sample carrying tangents
  (``response_samples = samples``) the adjoint engine gives the full run's numbers at the
  selected times to rounding (same draws, algebraically the same estimator);
- independent route: with the default response subsample (1 sample in 8 carries tangents) and
  with scrambled Sobol samples, the estimate agrees with the exact moment closure of two-layer
  linear networks within its reported batch-means errors (and the comparison can fail: the
  lazy form is many error bars away);
- coverage (slow): over 40 seeds the spread of the estimates matches the reported standard
  errors;
- bad ``times`` raise ValueError naming the option.
"""
import numpy as np
import pytest

import dmft
from conftest import small_data
from dmft._two_layer import solve_two_layer
from solvers import fluct
from solvers.fluct.propagator_times import accumulate_response_times

from test_fluctuations import TOL, _exact_linear_solution, _tangent_case


@pytest.fixture(scope="module")
def tanh_sol():
    data = small_data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=6)
    return solve_two_layer(dmft.MLP(1, "tanh"), data, train, samples=4_000, seed=0)


@pytest.mark.parametrize("ntk", [True, False])
def test_selected_rows_equal_full_tangents(ntk):
    n, P, T = 5, 3, 6
    gamma0, lr = 1.3, 0.2
    c = lr * gamma0
    kx, u, w0, delta, h, w, iu = _tangent_case(3, P, 2, T, 50, gamma0, lr, "tanh")
    m = iu[0].size
    JO = np.zeros((T + 1, T * P, n))
    Jk = np.zeros((T + 1, T * P, m))
    fluct.accumulate_response_jit("tanh", h, w, kx, delta, c, gamma0, JO, Jk, iu)
    times = [2, 6]
    JE = np.zeros((T, T * P, P))
    JOs = np.zeros((2, T * P, n))
    Jks = np.zeros((2, T * P, m)) if ntk else None
    accumulate_response_times("tanh", h, w, kx, delta, c, gamma0, {2: 0, 6: 1}, JE, JOs, Jks,
                              iu)
    scale = max(1.0, np.abs(Jk).max())
    assert np.max(np.abs(JE - JO[:T, :, :P])) < 1e-12 * scale
    assert np.max(np.abs(JOs - JO[times])) < 1e-12 * scale
    if ntk:
        assert np.max(np.abs(Jks - Jk[times])) < 1e-12 * scale


@pytest.mark.parametrize("center", [False, True])
def test_times_semantics_and_equality_with_full_run(tanh_sol, center):
    T, n = tanh_sol.train.steps, 3
    full = dmft.fluctuations(tanh_sol, method="propagator", samples=1_000, seed=4,
                             center=center)
    sel = dmft.fluctuations(tanh_sol, method="propagator", samples=1_000, seed=4,
                            center=center, times=[-1, 2, 2, 0], response_samples=1_000,
                            sampler="random")
    times = [0, 2, T]
    off = [t for t in range(T + 1) if t not in times]
    assert sel.options["times"] == times and sel.options["response_samples"] == 1_000
    assert sel.converged and sel.prediction_cov.shape == (T + 1, n, n)
    two = sel.extras["prediction_cov_two_time"]
    assert two.shape == (T + 1, T + 1, n, n)
    for arr in (sel.prediction_cov, sel.ntk_var, sel.stderr["prediction_cov"],
                sel.stderr["ntk_var"]):
        assert np.all(np.isnan(arr[off])) and np.all(np.isfinite(arr[times]))
    assert np.all(np.isnan(two[off])) and np.all(np.isnan(two[:, off]))
    assert np.all(np.isfinite(two[np.ix_(times, times)]))
    # nothing else changes: the same numbers to rounding
    scale = np.abs(full.ntk_var).max()
    for a, b in ((sel.prediction_cov, full.prediction_cov), (sel.ntk_var, full.ntk_var),
                 (sel.stderr["prediction_cov"], full.stderr["prediction_cov"]),
                 (sel.stderr["ntk_var"], full.stderr["ntk_var"])):
        assert np.max(np.abs(a[times] - b[times])) < 1e-12 * scale
    ref = full.extras["prediction_cov_two_time"][np.ix_(times, times)]
    assert np.max(np.abs(two[np.ix_(times, times)] - ref)) < 1e-12 * scale
    # the response rows it has: every selected time, the training points at every t < T
    resp, rfull = sel.extras["response"], full.extras["response"]
    assert np.max(np.abs(resp[times] - rfull[times])) < 1e-12
    assert np.max(np.abs(resp[:T, :2] - rfull[:T, :2])) < 1e-12
    # reproducible, and a default run (1 sample in 8 with tangents) records its choice
    again = dmft.fluctuations(tanh_sol, method="propagator", samples=1_000, seed=4,
                              center=center, times=[0, 2, T], response_samples=1_000,
                              sampler="random")
    assert np.array_equal(again.ntk_var[times], sel.ntk_var[times])
    sub = dmft.fluctuations(tanh_sol, samples=1_000, seed=4, times=[T], center=center)
    assert sub.options["response_samples"] == 125 and sub.options["sampler"] == "sobol"
    assert "block_prediction_cov" in sub.extras and sub.extras["block_ntk_var"].shape == \
        (10, T + 1, n, n)
    # Sobol draws: the same seed gives the same numbers, another seed others
    sub2 = dmft.fluctuations(tanh_sol, samples=1_000, seed=4, times=[T], center=center)
    sub3 = dmft.fluctuations(tanh_sol, samples=1_000, seed=5, times=[T], center=center)
    assert np.array_equal(sub2.ntk_var[T], sub.ntk_var[T])
    assert not np.allclose(sub3.ntk_var[T], sub.ntk_var[T])


def test_times_with_ntk_false_and_auto(tanh_sol):
    T = tanh_sol.train.steps
    fl = dmft.fluctuations(tanh_sol, samples=1_000, seed=1, times=[T], ntk=False)
    assert fl.method == "propagator" and np.all(np.isnan(fl.ntk_var))
    assert np.all(np.isfinite(fl.prediction_cov[T])) and "ntk_var" not in fl.stderr


def test_old_path_unchanged_without_times(tanh_sol):
    """times=None and the other new options at their defaults: the original engine runs (no
    response subsample, no extras of the adjoint engine)."""
    fl = dmft.fluctuations(tanh_sol, samples=1_000, seed=1)
    assert fl.options["times"] is None and "response_samples" not in fl.options
    assert "sampler" not in fl.options
    assert np.all(np.isfinite(fl.prediction_cov)) and "block_ntk_var" not in fl.extras


@pytest.mark.parametrize("sampler", ["random", "sobol"])
def test_subsampled_response_matches_exact_linear_route(sampler):
    """The adjoint engine with the default response subsample (and with scrambled Sobol
    blocks) against the exact moment closure of two-layer linear networks, at two times."""
    data = small_data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=8)
    sol = _exact_linear_solution(data, train)
    ex = dmft.fluctuations(sol, method="linear-exact", center=True)
    times = [4, 8]
    fl = dmft.fluctuations(sol, method="propagator", samples=20_000, seed=11, center=True,
                           times=times, sampler=sampler)
    assert fl.options["response_samples"] == 2_500
    se_f, se_k = fl.stderr["prediction_cov"][times], fl.stderr["ntk_var"][times]
    df = np.abs(fl.prediction_cov[times] - ex.prediction_cov[times])
    dk = np.abs(fl.ntk_var[times] - ex.ntk_var[times])
    assert np.sum(df) < TOL["z"] * np.sum(se_f)
    assert np.sum(dk) < TOL["z"] * np.sum(se_k)
    assert np.max(df / (se_f + 1e-12)) < 6 and np.max(dk / (se_k + 1e-12)) < 6
    lazy = dmft.fluctuations(sol, method="lazy", center=True)
    assert np.sum(np.abs(lazy.ntk_var - ex.ntk_var)[8]) > 8 * np.sum(se_k[-1])


@pytest.mark.parametrize("times, match", [
    (5, "times must be None or a sequence of integer steps"),
    ("last", "times must be None or a sequence"),
    ([], "times is empty"),
    ([1.5], "times must contain integer steps"),
    ([True], "times must contain integer steps"),
    ([[1, 2]], "times must be None or a sequence"),
    ([7], r"times=\[7\] has step\(s\) \[7\] outside 0 .. 6"),
    ([-8], r"outside 0 .. 6 \(or -7 .. -1"),
])
def test_bad_times(tanh_sol, times, match):
    with pytest.raises(ValueError, match=match):
        dmft.fluctuations(tanh_sol, method="propagator", samples=200, times=times)


def test_bad_sampler_and_response_samples(tanh_sol):
    with pytest.raises(ValueError, match="sampler 'qmc' is unknown"):
        dmft.fluctuations(tanh_sol, samples=200, sampler="qmc")
    with pytest.raises(ValueError, match="response_samples must be a positive integer"):
        dmft.fluctuations(tanh_sol, samples=200, response_samples=0)
    with pytest.raises(ValueError, match=r"option\(s\) \['times'\] do not apply"):
        dmft.fluctuations(tanh_sol, method="lazy", times=[1])


def test_estimate_reflects_selected_times():
    from dmft._fluctuations import FLUCTUATION_METHODS, PropagatorOptions
    data = dmft.Dataset(np.random.default_rng(0).standard_normal((32, 10))[:16],
                        np.ones(16), np.random.default_rng(0).standard_normal((32, 10))[16:])
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=100)
    T1, n = 101, 32
    sol = dmft.Solution(net=dmft.MLP(1, "tanh"), data=data, train=train, method="mc",
                        t=train.times, train_predictions=np.zeros((T1, 16)),
                        test_predictions=np.zeros((T1, 16)), ntk=np.zeros((T1, n, n)),
                        phi=np.zeros((1, T1, T1, n, n)), g=np.zeros((1, T1, T1, n, n)))
    m = FLUCTUATION_METHODS["propagator"]
    old = m.estimate(sol, opts=PropagatorOptions(samples=20_000))
    new = m.estimate(sol, opts=PropagatorOptions(samples=20_000, times=(100,)))
    # issue 21: about an hour before; the adjoint engine at one time: about a minute
    assert old["seconds"] > 1800 and new["seconds"] < 120
    assert new["bytes"] < 1 << 30


def test_deep_propagator_times_are_masked():
    data = small_data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=3)
    sol = dmft.solve(dmft.MLP(2, "tanh"), data, train, "mc", seed=0, samples=1024)
    kw = dict(method="deep-propagator", seed=0, samples=512, kappa_samples=128, blocks=4,
              map_replicates=2)
    full = dmft.fluctuations(sol, **kw)
    sel = dmft.fluctuations(sol, times=[-1], **kw)
    T = train.steps
    assert sel.options["times"] == [T]
    assert np.all(np.isnan(sel.prediction_cov[:T])) and np.all(np.isnan(sel.ntk_var[:T]))
    assert np.all(np.isnan(sel.extras["prediction_cov_two_time"][:T]))
    se = np.hypot(sel.stderr["prediction_cov"][T], full.stderr["prediction_cov"][T])
    assert np.all(np.abs(sel.prediction_cov[T] - full.prediction_cov[T]) <= 6 * se + 1e-12)


@pytest.mark.slow
def test_error_bars_cover_the_spread_over_seeds():
    """Coverage: over 40 seeds, the standard deviation of the estimates of a pooled sum
    (sum of the final N Var K entries and of N Var f) against the mean reported batch-means
    error of that sum (from the per-block estimates). The ratio's own sampling error with 40
    seeds is ~1 / sqrt(2 * 39) = 11 %, the 10-block errors add ~ 24 % / sqrt(40): tolerance
    3 x the quadrature sum."""
    data = small_data(3, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=10)
    sol = solve_two_layer(dmft.MLP(1, "tanh"), data, train, samples=20_000, seed=0)
    T, seeds = train.steps, 40
    est, ses = [], []
    for s in range(seeds):
        fl = dmft.fluctuations(sol, samples=2_000, seed=100 + s, times=[T], center=True)
        bf = np.trace(fl.extras["block_prediction_cov"][:, T], axis1=1, axis2=2)
        bk = fl.extras["block_ntk_var"][:, T].sum(axis=(1, 2))
        est.append((np.trace(fl.prediction_cov[T]), fl.ntk_var[T].sum()))
        ses.append((bf.std(ddof=1), bk.std(ddof=1)))
    est, ses = np.array(est), np.array(ses) / np.sqrt(10)
    ratio = est.std(axis=0, ddof=1) / ses.mean(axis=0)
    tol = 3 * np.hypot(1 / np.sqrt(2 * (seeds - 1)), 0.24 / np.sqrt(seeds))
    print(f"coverage: spread / mean stderr = {ratio} (tolerance 1 +- {tol:.2f})")
    assert np.all(np.abs(ratio - 1) < tol), ratio
