"""Finite-width fluctuations of deep networks (docs/theory.rst §5): ``method="deep-linear"``.

Grouped by what they prove:
- independent routes: at depth 1 the deep propagator equals the exact two-layer moment
  closure (``"linear-exact"``) to rounding; its infinite-width trajectory equals the exact
  deep-linear solver (:mod:`solvers.linear`);
- analytic limit: as gamma0 -> 0 it reduces to the lazy universal form with the exact
  Wishart-chain kernel moments of a deep linear network at initialisation (centred and not);
  the response order parameters' own (formal) noise is needed for that;
- theory against simulated ensembles: a quick check here, and slow tests (>= 400 seeds per
  width, widths 128 .. 2048, depth 3 and depth 2): the pooled ratios N Var / theory at every
  width extrapolate in 1/N to 1, and at the largest width they are within 10 % of 1;
- the adapter: method selection, shapes, options and errors.
"""
import numpy as np
import pytest

import dmft
from conftest import TOL as _SHARED, pooled_ratio as _pooled_ratio, small_data as _data
from solvers import fluct
from solvers.fluct import deep_linear as fluct_deep
from solvers.stats import fit_inverse_width

# the deep-linear propagator differentiates the march with torch: skip without it
needs_torch = pytest.mark.usefixtures("torch_or_skip")

TOL = {
    **_SHARED,              # z, width_rel, width_se (tests/conftest.py)
    "rounding": 1e-9,       # two exact routes, same quantity
    "solver": 1e-10,        # infinite-width trajectory vs solvers.linear
    "lazy": 2e-3,           # gamma0 = 1e-3 against the gamma0 -> 0 form (error O(gamma0))
}


# --------------------------------------------------------------------------------------------
# independent routes
# --------------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("center", [False, True])
def test_depth_one_equals_exact_two_layer_closure(center):
    data = _data()
    y = np.asarray(data.y_train)
    deep = fluct_deep.deep_linear_propagator(data.kx, y, 1, 1.3, 0.1, 6, center=center)
    ex = fluct.linear_exact_fluctuations(data.kx, y, 1.3, 0.1, 6, center)
    scale = np.abs(ex["cov"]).max()
    assert np.max(np.abs(deep["cov"] - ex["cov"])) < TOL["rounding"] * scale
    assert np.max(np.abs(deep["ntk_var"] - ex["ntk_var"])) < TOL["rounding"] * \
        np.abs(ex["ntk_var"]).max()


@needs_torch
@pytest.mark.parametrize("depth", [2, 3])
def test_infinite_width_trajectory_is_the_exact_solver(depth):
    data = _data()
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=6)
    sol = dmft.solve(dmft.MLP(depth, "linear"), data, train, method="linear")
    fl = dmft.fluctuations(sol)
    assert fl.method == "deep-linear"
    f = np.concatenate([sol.train_predictions, sol.test_predictions], 1)
    assert np.max(np.abs(fl.extras["exact_predictions"] - f)) < TOL["solver"]
    assert np.max(np.abs(fl.extras["exact_ntk"] - sol.ntk)) < TOL["solver"] * \
        np.abs(sol.ntk).max()
    assert fl.options["residual"] < 1e-12


@needs_torch
def test_fixed_point_and_its_derivative_are_converged():
    """More sweeps of the causal march change neither the trajectory nor the propagator."""
    data = _data()
    y = np.asarray(data.y_train)
    a = fluct_deep.deep_linear_propagator(data.kx, y, 4, 1.0, 0.1, 5)
    b = fluct_deep.deep_linear_propagator(data.kx, y, 4, 1.0, 0.1, 5, iters=20)
    assert a["residual"] < 1e-12
    assert np.allclose(a["cov"], b["cov"], rtol=1e-10, atol=1e-12)
    assert np.allclose(a["ntk_var"], b["ntk_var"], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# lazy limit
# --------------------------------------------------------------------------------------------
def test_deep_lazy_kappa_reduces_to_two_layer_moments():
    kx = _data().kx
    kf1, kK1 = fluct.linear_lazy_moments(kx, 0.5)
    kf, kK = fluct_deep.deep_linear_lazy_kappa(kx, 1, 0.5)
    assert np.allclose(kf, kf1, rtol=1e-14) and np.allclose(kK, kK1, rtol=1e-14)


@needs_torch
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("center", [True, False])
def test_reduces_to_the_lazy_universal_form(depth, center):
    data = _data()
    train = dmft.GradientDescent(gamma0=1e-3, lr=0.1, steps=5)
    sol = dmft.solve(dmft.MLP(depth, "linear"), data, train, method="linear")
    fl = dmft.fluctuations(sol, center=center)
    lz = dmft.fluctuations(sol, method="lazy", center=center)
    assert fl.method == "deep-linear" and lz.method == "lazy"
    rel = np.abs(fl.prediction_cov - lz.prediction_cov).max() / np.abs(lz.prediction_cov).max()
    assert rel < TOL["lazy"], rel
    # the NTK variance is the exact Wishart-chain value at every time
    assert np.abs(fl.ntk_var / lz.ntk_var - 1).max() < TOL["lazy"]


@needs_torch
def test_response_noise_is_needed_for_the_lazy_limit():
    """Without the (formal) noise of the response order parameters the centred lazy limit is
    wrong by a few per cent: the responses are not deterministic functions of the kernels at
    finite width."""
    data = _data()
    y = np.asarray(data.y_train)
    lz = dmft.fluctuations(dmft.solve(dmft.MLP(2, "linear"), data, dmft.GradientDescent(
        gamma0=1e-3, lr=0.1, steps=4), method="linear"), method="lazy", center=True)
    full = fluct_deep.deep_linear_propagator(data.kx, y, 2, 1e-3, 0.1, 4, center=True)
    naive = fluct_deep.deep_linear_propagator(data.kx, y, 2, 1e-3, 0.1, 4, center=True,
                                              responses=False)
    ref = np.abs(lz.prediction_cov).max()
    assert np.abs(full["pred_cov"] - lz.prediction_cov).max() < TOL["lazy"] * ref
    assert np.abs(naive["pred_cov"] - lz.prediction_cov).max() > 0.01 * ref


# --------------------------------------------------------------------------------------------
# against simulated networks (quick version; the slow tests below do widths 128 .. 2048)
# --------------------------------------------------------------------------------------------
@needs_torch
def test_quick_simulation_check_depth_two():
    data = _data()
    net = dmft.MLP(2, "linear")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=8)
    sol = dmft.solve(net, data, train, method="linear")
    fl = dmft.fluctuations(sol, center=True)
    N, S = 256, 200
    _assert_width_sweep(_sweep(net, data, train, fl, (N,), {N: S}, True, (train.steps,)))


# --------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------
@needs_torch
def test_adapter_shapes_options_and_errors():
    data = _data()
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=4)
    sol = dmft.solve(dmft.MLP(2, "linear"), data, train, method="linear")
    fl = dmft.fluctuations(sol, method="deep-linear", center=True)
    T1, n = 5, 3
    assert fl.prediction_cov.shape == (T1, n, n) and fl.ntk_var.shape == (T1, n, n)
    assert fl.extras["prediction_cov_two_time"].shape == (T1, T1, n, n)
    assert fl.stderr == {} and fl.center
    assert np.allclose(fl.prediction_cov[0], 0.0, atol=1e-12)      # centred: f(0) = 0
    raw = dmft.fluctuations(sol)
    # the initial-output variance Phi^L(0, 0) / gamma0^2 = kx for a linear net
    assert np.allclose(raw.prediction_cov[0], data.kx, rtol=1e-10)
    no_k = dmft.fluctuations(sol, ntk=False)
    assert np.all(np.isnan(no_k.ntk_var))
    assert np.array_equal(no_k.prediction_cov, raw.prediction_cov)
    with pytest.raises(NotImplementedError, match="deep-linear"):
        dmft.fluctuations(sol, method="propagator")
    with pytest.raises(NotImplementedError, match="deep-linear"):
        dmft.fluctuations(sol, method="linear-exact")
    tanh = dmft.solve(dmft.MLP(2, "tanh"), data, train, method="static")
    with pytest.raises(NotImplementedError, match="two-layer networks only.*deep-propagator"):
        dmft.fluctuations(tanh)             # a static solution: auto -> lazy
    with pytest.raises(ValueError, match="has none: solve with method='mc'"):
        dmft.fluctuations(tanh, method="deep-propagator")
    relu2 = dmft.solve(dmft.MLP(2, "relu"), data, train, method="static")
    with pytest.raises(NotImplementedError, match="does not support relu"):
        dmft.fluctuations(relu2, method="deep-propagator")
    tanh1 = dmft.solve(dmft.MLP(1, "tanh"), data, train, method="static")
    with pytest.raises(ValueError, match="needs a linear network"):
        dmft.fluctuations(tanh1, method="deep-linear")
    static = dmft.solve(dmft.MLP(3, "linear"), data, train, method="static")
    lz = dmft.fluctuations(static, center=True)
    assert lz.method == "lazy" and lz.options["moments"] == "exact"


@needs_torch
def test_divergence_raises_convergence_error():
    data = _data()
    sol = dmft.solve(dmft.MLP(3, "linear"), data, dmft.GradientDescent(gamma0=1.0, lr=0.1,
                                                                        steps=8))
    unstable = dmft.GradientDescent(gamma0=3.0, lr=0.8, steps=8)
    bad = dmft.Solution(**{**{f: getattr(sol, f) for f in (
        "net", "data", "method", "t", "train_predictions", "test_predictions", "ntk", "phi",
        "g")}, "train": unstable})
    with pytest.raises(dmft.ConvergenceError, match="diverged"):
        dmft.fluctuations(bad)


# --------------------------------------------------------------------------------------------
# theory against simulated ensembles, widths 128 .. 2048 (slow)
# --------------------------------------------------------------------------------------------
def _sweep(net, data, train, fl, widths, seeds, center, times):
    """Pooled ratios (simulation N Var / theory) at the given times, per width; ``seeds`` maps
    width -> number of networks. Rows (N, t, (pred ratio, se), (ntk ratio, se)), printed."""
    i, j = np.triu_indices(data.P + data.Q)
    rows = []
    for N in widths:
        ens = dmft.simulate(net, data, train, width=N, seeds=range(seeds[N]), center=center)
        for t in times:
            rp = _pooled_ratio(np.sqrt(N) * ens.predictions[:, t],
                               np.diag(fl.prediction_cov[t]))
            rk = _pooled_ratio(np.sqrt(N) * ens.ntk[:, t][:, i, j], fl.ntk_var[t][i, j])
            rows.append((N, t, rp, rk))
            print(f"N={N:5d} t={t:3d}  pred ratio {rp[0]:.3f} +- {rp[1]:.3f}   ntk ratio "
                  f"{rk[0]:.3f} +- {rk[1]:.3f}")
    return rows


def _assert_width_sweep(rows):
    """N Var approaches the propagator as the width grows. Every width takes part: with two
    or more widths, the weighted fit r(N) = r_inf + b / N of each pooled ratio (predictions,
    NTK; each time) must extrapolate to r_inf within TOL['width_se'] of its standard error of
    1 (the errors of r(N) are the ensembles' own: the spread over seeds of the summed squared
    deviations, about sqrt(2 / (S - 1)) relative). At the largest width the ratios must also
    be within TOL['width_rel'] of 1 (or width_se standard errors, where that is wider)."""
    widths = sorted({N for N, *_ in rows})
    for N, t, rp, rk in rows:
        for what, (r, se) in (("predictions", rp), ("ntk", rk)):
            if N == widths[-1]:
                assert abs(r - 1) < max(TOL["width_rel"], TOL["width_se"] * se), \
                    (what, N, t, r, se, rows)
    if len(widths) < 2:
        return
    for k, what in ((2, "predictions"), (3, "ntk")):
        # (widths, times) arrays: rows are ordered width-major, times in the same order
        means = np.array([[row[k][0] for row in rows if row[0] == N] for N in widths])
        ses = np.array([[row[k][1] for row in rows if row[0] == N] for N in widths])
        r_inf, se_inf, _, _ = fit_inverse_width(widths, means, ses)
        assert np.all(np.abs(r_inf - 1) < TOL["width_se"] * se_inf), \
            (what, r_inf, se_inf, rows)


def _against_simulations(depth, gamma0, center, seeds, times):
    data = _data()
    net = dmft.MLP(depth, "linear")
    train = dmft.GradientDescent(gamma0=gamma0, lr=0.1, steps=20)
    fl = dmft.fluctuations(dmft.solve(net, data, train, method="linear"), center=center)
    _assert_width_sweep(_sweep(net, data, train, fl, sorted(seeds), seeds, center, times))


@needs_torch
@pytest.mark.slow
@pytest.mark.validation
def test_deep_linear_depth_three_against_simulations():
    """Depth 3, gamma0 = 1, 20 steps of lr 0.1, centred; 400 networks at widths 128 and 512,
    1000 at 2048 (about 20 CPU minutes, mostly the width-2048 ensemble)."""
    _against_simulations(3, 1.0, True, {128: 400, 512: 400, 2048: 1000}, (10, 20))


@needs_torch
@pytest.mark.slow
def test_deep_linear_depth_two_uncentred_against_simulations():
    """With the initial-output variance (it dominates at t = 0 and decays with training)."""
    _against_simulations(2, 1.0, False, {256: 400, 1024: 400}, (0, 10, 20))


@needs_torch
@pytest.mark.slow
def test_deep_linear_strong_feature_learning_against_simulations():
    """Depth 3 at gamma0 = 1.5 (the NTK grows about tenfold during training), centred."""
    _against_simulations(3, 1.5, True, {256: 400, 1024: 400}, (10, 20))
