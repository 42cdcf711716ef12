"""Finite-width fluctuations of deep networks (THEORY.md §5): ``method="deep-linear"``.

Grouped by what they prove:
- independent routes: at depth 1 the deep propagator equals the exact two-layer moment
  closure (``"linear-exact"``) to rounding; its infinite-width trajectory equals the exact
  deep-linear solver (:mod:`solvers.linear`);
- analytic limit: as gamma0 -> 0 it reduces to the lazy universal form with the exact
  Wishart-chain kernel moments of a deep linear network at initialisation (centred and not);
  the response order parameters' own (formal) noise is needed for that;
- theory against simulated ensembles: a quick check here, and slow tests (>= 400 seeds per
  width, widths 128 .. 2048, depth 3 and depth 2);
- the adapter: method selection, shapes, options and errors.
"""
import numpy as np
import pytest

import dmft
from solvers import fluct, fluct_deep

TOL = {
    "rounding": 1e-9,       # two exact routes, same quantity
    "solver": 1e-10,        # infinite-width trajectory vs solvers.linear
    "lazy": 2e-3,           # gamma0 = 1e-3 against the gamma0 -> 0 form (error O(gamma0))
    "z": 4.0,               # Monte Carlo agreement, in standard errors
    "width_rel": 0.10,      # slow tests: N Var at the largest width within 10 % ...
}


def _data(P=2, Q=1, D=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    y = np.linspace(1.0, -0.5, P)
    return dmft.Dataset(X[:P], y, X[P:] if Q else None)


def _pooled_ratio(x, theory):
    """sum over entries of the ensemble variance / sum of the theory, with a standard error
    from the spread over seeds of the summed squared deviations."""
    S = x.shape[0]
    d2 = ((x - x.mean(0)) ** 2).reshape(S, -1).sum(1) * S / (S - 1)
    tot = float(np.sum(theory))
    return d2.mean() / tot, d2.std(ddof=1) / np.sqrt(S) / tot


# --------------------------------------------------------------------------------------------
# independent routes
# --------------------------------------------------------------------------------------------
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
def test_quick_simulation_check_depth_two():
    data = _data()
    net = dmft.MLP(2, "linear")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=8)
    sol = dmft.solve(net, data, train, method="linear")
    fl = dmft.fluctuations(sol, center=True)
    N, S = 256, 200
    ens = dmft.simulate(net, data, train, width=N, seeds=range(S), center=True)
    T = train.steps
    i, j = np.triu_indices(3)
    for x, th in ((np.sqrt(N) * ens.predictions[:, T], np.diag(fl.prediction_cov[T])),
                  (np.sqrt(N) * ens.ntk[:, T][:, i, j], fl.ntk_var[T][i, j])):
        r, se = _pooled_ratio(x, th)
        # finite-width bias is O(1/N) ~ a few % here; tolerance: 4 standard errors + 5 %
        assert abs(r - 1) < TOL["z"] * se + 0.05, (r, se)


# --------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------
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
# slow: theory against simulated ensembles, widths 128 .. 2048
# --------------------------------------------------------------------------------------------
def _sweep(net, data, train, fl, widths, seeds, center, times):
    """Pooled ratios (simulation N Var / theory) at the given times, per width; ``seeds`` maps
    width -> number of networks."""
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


@pytest.mark.slow
@pytest.mark.validation
def test_deep_linear_depth_three_against_simulations():
    """Depth 3, gamma0 = 1, 20 steps of lr 0.1, centred; 400 networks at widths 128 and 512,
    1000 at 2048 (about 20 CPU minutes, mostly the width-2048 ensemble)."""
    data = _data()
    net = dmft.MLP(3, "linear")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=20)
    sol = dmft.solve(net, data, train, method="linear")
    fl = dmft.fluctuations(sol, center=True)
    rows = _sweep(net, data, train, fl, (128, 512, 2048), {128: 400, 512: 400, 2048: 1000},
                  True, (10, 20))
    for N, t, rp, rk in rows:
        if N == 2048:
            for r, se in (rp, rk):
                assert abs(r - 1) < max(TOL["width_rel"], 3 * se), rows


@pytest.mark.slow
def test_deep_linear_depth_two_uncentred_against_simulations():
    """With the initial-output variance (it dominates at t = 0 and decays with training)."""
    data = _data()
    net = dmft.MLP(2, "linear")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=20)
    sol = dmft.solve(net, data, train, method="linear")
    fl = dmft.fluctuations(sol)
    rows = _sweep(net, data, train, fl, (256, 1024), {256: 400, 1024: 400}, False,
                  (0, 10, 20))
    for N, t, rp, rk in rows:
        if N == 1024:
            for r, se in (rp, rk):
                assert abs(r - 1) < max(TOL["width_rel"], 3 * se), rows


@pytest.mark.slow
def test_deep_linear_strong_feature_learning_against_simulations():
    """Depth 3 at gamma0 = 1.5 (the NTK grows about tenfold during training), centred."""
    data = _data()
    net = dmft.MLP(3, "linear")
    train = dmft.GradientDescent(gamma0=1.5, lr=0.1, steps=20)
    sol = dmft.solve(net, data, train, method="linear")
    fl = dmft.fluctuations(sol, center=True)
    rows = _sweep(net, data, train, fl, (256, 1024), {256: 400, 1024: 400}, True, (10, 20))
    for N, t, rp, rk in rows:
        if N == 1024:
            for r, se in (rp, rk):
                assert abs(r - 1) < max(TOL["width_rel"], 3 * se), rows
