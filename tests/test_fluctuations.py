"""Finite-width fluctuations (docs/theory.rst §5): dmft.fluctuations and solvers.fluct.

Grouped by what they prove:
- kernels: the Numba march equals its NumPy reference and the finite network's per-unit
  update; forward-mode tangents equal finite differences; the Numba tangent path equals the
  NumPy one;
- analytic limits: the lazy one-point linear closed form (discrete time exactly, gradient flow
  as lr -> 0 with an error linear in lr); the general methods reduce to the lazy form as
  gamma0 -> 0; the initial-output variance Phi^1 / gamma0^2 at t = 0;
- independent routes: the sampled propagator against the exact moment closure of two-layer
  linear networks (itself checked against a finite network to rounding); sampled lazy
  moments against Isserlis; theory against simulated ensembles (slow tests: >= 300 seeds per
  width, widths 128 .. 2048);
- invariants, reproducibility, bad input.

Monte Carlo tolerances are multiples of the reported batch-means standard errors (or of the
ensemble-variance error sqrt(2 / (S - 1)) and its fourth-moment generalisation).
"""
import numpy as np
import pytest

import dmft
from conftest import small_data
from dmft._two_layer import solve_two_layer
from _reference import march_numpy
from solvers import fluct, network

# --------------------------------------------------------------------------------------------
# tolerances (one table)
# --------------------------------------------------------------------------------------------
TOL = {
    "kernel": 1e-12,          # Numba vs NumPy, per-unit march vs finite network
    "tangent_fd": 1e-6,       # forward-mode tangents vs central differences (relative)
    "closed_form": 1e-12,     # lazy one-point closed form in discrete time
    "z": 4.0,                 # Monte Carlo agreement, in standard errors
    "width_rel": 0.10,        # slow tests: N Var at the largest width within 10 % ...
}


_data = small_data      # the shared small data set (tests/conftest.py)


def _one_point():
    return dmft.Dataset(np.array([[1.0]]), np.array([1.0]))


def _exact_linear_solution(data, train):
    """Infinite-width Solution of a two-layer linear network from the exact moment march."""
    net = dmft.MLP(1, "linear")
    n = data.P + data.Q
    S = np.zeros((n + 1, n + 1))
    S[:n, :n] = data.kx
    S[n, n] = 1.0
    f, K = fluct.linear_moments_march(S, data.kx, np.asarray(data.y_train), train.gamma0,
                                      train.lr, train.steps)
    T1 = train.steps + 1
    nan = np.full((1, T1, T1, n, n), np.nan)
    return dmft.Solution(net=net, data=data, train=train, method="exact-linear-march",
                         t=train.times, train_predictions=f[:, :data.P].copy(),
                         test_predictions=f[:, data.P:].copy(), ntk=K, phi=nan, g=nan.copy())


def _zmax(est, ref, se, floor=1e-12):
    return float(np.max(np.abs(est - ref) / (se + floor)))


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["tanh", "erf", "linear", "relu"])
def test_march_kernel_matches_numpy(act):
    rng = np.random.default_rng(1)
    data = _data(3, 2)
    u, w0 = fluct.draw_units(data.kx, 40, rng)
    delta = 0.5 * rng.standard_normal((6, 3))
    h, w = fluct.march(act, u, w0, data.kx, delta, 0.3)
    h2, w2 = march_numpy(act, u, w0, data.kx, delta, 0.3)
    assert np.max(np.abs(h - h2)) < TOL["kernel"]
    assert np.max(np.abs(w - w2)) < TOL["kernel"]


@pytest.mark.parametrize("act", ["tanh", "linear"])
def test_march_is_the_finite_network_per_unit_update(act):
    """Driven by a width-64 network's own Delta(t), the per-unit march averaged over the
    network's units reproduces its predictions and NTK (docs/theory.rst §1 vs §2 at L = 1)."""
    data = _data(3, 2)
    gamma0, lr, T, N = 1.3, 0.2, 8, 64
    weights = network.Weights.draw(np.random.default_rng(3), data.D, N, 1)
    u = weights.W0 @ data.X.T / np.sqrt(data.D)
    w0 = weights.w.copy()
    res = network.train(data.X, np.asarray(data.y_train), weights, activation=act,
                        gamma0=gamma0, lr=lr, steps=T)
    delta = np.asarray(data.y_train) - res["predictions"][:T, :data.P]
    h, w = fluct.march(act, u, w0, data.kx, delta, lr * gamma0)
    O, k = fluct.unit_observables(act, h, w, data.kx, gamma0)
    assert np.max(np.abs(O.mean(0) - res["predictions"])) < 1e-11
    i, j = fluct.triu_index(data.P + data.Q)
    assert np.max(np.abs(k.mean(0) - res["ntk"][:, i, j])) < 1e-10


def _tangent_case(seed, P, Q, T, samples, gamma0, lr, act):
    """A toy tangent problem: single-site samples of the small data set (P + Q points), a
    random error signal Delta (T, P) and the marched fields under it."""
    rng = np.random.default_rng(seed)
    kx = _data(P, Q).kx
    u, w0 = fluct.draw_units(kx, samples, rng)
    delta = 0.5 * rng.standard_normal((T, P))
    h, w = fluct.march(act, u, w0, kx, delta, lr * gamma0)
    return kx, u, w0, delta, h, w, fluct.triu_index(P + Q)


@pytest.mark.parametrize("act", ["tanh", "erf"])
def test_tangents_match_finite_differences(act):
    n, P, T = 3, 2, 5
    gamma0, lr = 1.5, 0.2
    c = lr * gamma0
    kx, u, w0, delta, h, w, iu = _tangent_case(2, P, 1, T, 30, gamma0, lr, act)
    m = iu[0].size
    JO = np.zeros((T + 1, n, T * P))
    Jk = np.zeros((T + 1, m, T * P))
    fluct.accumulate_response(act, h, w, kx, delta, c, gamma0, JO, Jk, iu)

    def sums(d):
        hh, ww = fluct.march(act, u, w0, kx, d, c)
        O, k = fluct.unit_observables(act, hh, ww, kx, gamma0, False, iu)
        return O.sum(0), k.sum(0)

    eps = 1e-6
    for s in range(T):
        for a in range(P):
            dp, dm = delta.copy(), delta.copy()
            dp[s, a] += eps
            dm[s, a] -= eps
            (Op, kp), (Om, km) = sums(dp), sums(dm)
            d = s * P + a
            np.testing.assert_allclose(JO[:, :, d], (Op - Om) / (2 * eps),
                                       atol=TOL["tangent_fd"] * np.abs(JO).max())
            np.testing.assert_allclose(Jk[:, :, d], (kp - km) / (2 * eps),
                                       atol=TOL["tangent_fd"] * np.abs(Jk).max())
            # causality: Delta(s) does not move anything at times <= s
            assert np.all(JO[:s + 1, :, d] == 0)
    # the Numba tangent path (direction-major layout) equals the NumPy reference
    JO2 = np.zeros((T + 1, T * P, n))
    Jk2 = np.zeros((T + 1, T * P, m))
    fluct.accumulate_response_jit(act, h, w, kx, delta, c, gamma0, JO2, Jk2, iu)
    assert np.max(np.abs(JO2.transpose(0, 2, 1) - JO)) < 1e-12 * max(1, np.abs(JO).max())
    assert np.max(np.abs(Jk2.transpose(0, 2, 1) - Jk)) < 1e-12 * max(1, np.abs(Jk).max())


def test_numpy_and_jit_propagators_agree():
    rng = np.random.default_rng(4)
    data = _data(2, 1)
    u, w0 = fluct.draw_units(data.kx, 400, rng)
    delta = 0.4 * rng.standard_normal((4, 2))
    a = fluct.two_layer_propagator("tanh", u, w0, data.kx, delta, 1.0, 0.2, blocks=4,
                                   chunk=64, engine="jit")
    b = fluct.two_layer_propagator("tanh", u, w0, data.kx, delta, 1.0, 0.2, blocks=4,
                                   chunk=100, engine="numpy")
    for key in ("cov", "ntk_var", "pred_cov_stderr", "response"):
        assert np.allclose(a[key], b[key], rtol=1e-10, atol=1e-13), key


# --------------------------------------------------------------------------------------------
# the exact linear route
# --------------------------------------------------------------------------------------------
def test_linear_moment_closure_is_exact_for_a_finite_network():
    """The second-moment march started from a width-32 network's *empirical* moments gives
    that network's predictions and NTK to rounding (discrete-time exactness at finite N)."""
    data = _data(3, 1)
    gamma0, lr, T, N = 1.0, 0.15, 12, 32
    for center in (False, True):
        weights = network.Weights.draw(np.random.default_rng(5), data.D, N, 1)
        s0 = np.concatenate([weights.W0 @ data.X.T / np.sqrt(data.D), weights.w[:, None]], 1)
        M0 = s0.T @ s0 / N
        res = network.train(data.X, np.asarray(data.y_train), weights, activation="linear",
                            gamma0=gamma0, lr=lr, steps=T, center=center)
        f, K = fluct.linear_moments_march(M0, data.kx, np.asarray(data.y_train), gamma0, lr,
                                          T, center)
        assert np.max(np.abs(f - res["predictions"])) < 1e-11
        assert np.max(np.abs(K - res["ntk"])) < 1e-11


@pytest.mark.parametrize("center", [False, True])
def test_propagator_matches_exact_linear_route(center):
    data = _data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=8)
    sol = _exact_linear_solution(data, train)
    ex = dmft.fluctuations(sol, method="linear-exact", center=center)
    assert ex.options["max_prediction_gap"] < 1e-12
    fl = dmft.fluctuations(sol, method="propagator", samples=20_000, seed=11, center=center)
    se_f, se_k = fl.stderr["prediction_cov"], fl.stderr["ntk_var"]
    t = slice(1, None)
    # pooled over entries: sum |diff| within TOL["z"] pooled standard errors
    assert np.sum(np.abs(fl.prediction_cov - ex.prediction_cov)[t]) < TOL["z"] * np.sum(se_f[t])
    assert np.sum(np.abs(fl.ntk_var - ex.ntk_var)) < TOL["z"] * np.sum(se_k)
    # and entrywise (heavier tails of a 10-block error bar): 6 standard errors
    assert _zmax(fl.prediction_cov[t], ex.prediction_cov[t], se_f[t]) < 6
    assert _zmax(fl.ntk_var, ex.ntk_var, se_k) < 6
    # the comparison can fail: the error bars are small next to the effect of feature learning
    lazy = dmft.fluctuations(sol, method="lazy", center=center)
    assert np.sum(np.abs(lazy.ntk_var - ex.ntk_var)[-1]) > 8 * np.sum(se_k[-1])


# --------------------------------------------------------------------------------------------
# lazy limit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("center", [True, False])
def test_lazy_one_point_closed_form_discrete(center):
    """Two-layer linear, one point, |x|^2/D = 1: K = 2, Delta(k) = y (1 - 2 lr)^k and
    N Var f(k) = 4 lr^2 k^2 y^2 (1 - 2 lr)^(2(k-1)) [+ (1 - 2 lr)^(2k) / gamma0^2]."""
    y, lr, T, gamma0 = 1.0, 0.05, 60, 0.5
    data = _one_point()
    train = dmft.GradientDescent(gamma0=gamma0, lr=lr, steps=T)
    sol = dmft.solve(dmft.MLP(1, "linear"), data, train, method="static")
    fl = dmft.fluctuations(sol, center=center)
    assert fl.method == "lazy"
    k = np.arange(T + 1)
    a = 1 - 2 * lr
    expect = 4 * lr ** 2 * k ** 2 * y ** 2 * a ** (2.0 * (k - 1))
    if not center:
        expect = expect + a ** (2.0 * k) / gamma0 ** 2
    np.testing.assert_allclose(fl.prediction_cov[:, 0, 0], expect, rtol=TOL["closed_form"],
                               atol=1e-15)
    np.testing.assert_allclose(fl.ntk_var[:, 0, 0], 4.0, rtol=TOL["closed_form"])
    # two-time covariance: N Cov(Delta(k), Delta(j)) = 4 lr^2 k j y^2 a^(k-1) a^(j-1) (centred)
    if center:
        two = fl.extras["prediction_cov_two_time"][:, :, 0, 0]
        kk = k[:, None] * k[None, :] * a ** (k[:, None] - 1.0) * a ** (k[None, :] - 1.0)
        np.testing.assert_allclose(two, 4 * lr ** 2 * y ** 2 * kk, rtol=1e-12, atol=1e-15)


def test_lazy_gradient_flow_limit_is_first_order_in_lr():
    """N Var Delta(t) -> 4 y^2 t^2 e^{-4t} (gradient flow), with an error linear in lr."""
    y = 1.0
    data = _one_point()
    errs = []
    for lr in (4e-3, 2e-3):
        T = int(round(2.0 / lr))
        train = dmft.GradientDescent(gamma0=1.0, lr=lr, steps=T)
        sol = dmft.solve(dmft.MLP(1, "linear"), data, train, method="static")
        fl = dmft.fluctuations(sol, center=True)
        t = train.times
        flow = 4 * y ** 2 * t ** 2 * np.exp(-4 * t)
        errs.append(np.max(np.abs(fl.prediction_cov[:, 0, 0] - flow)))
    assert errs[1] < 0.02 * 0.25          # small: max of the curve is 4 e^{-2} y^2 ~ 0.54
    assert 1.8 < errs[0] / errs[1] < 2.2  # first order in lr


def test_sampled_lazy_moments_match_isserlis():
    data = _data(2, 1)
    train = dmft.GradientDescent(gamma0=0.7, lr=0.1, steps=15)
    sol = dmft.solve(dmft.MLP(1, "linear"), data, train, method="static")
    ex = dmft.fluctuations(sol, method="lazy")
    mc = dmft.fluctuations(sol, method="lazy", moments="sampled", samples=100_000, seed=3)
    assert ex.options["moments"] == "exact" and mc.options["moments"] == "sampled"
    for name in ("prediction_cov", "ntk_var"):
        est, ref, se = getattr(mc, name), getattr(ex, name), mc.stderr[name]
        assert np.sum(np.abs(est - ref)) < TOL["z"] * np.sum(se)
        assert _zmax(est, ref, se) < 6


def test_exact_linear_reduces_to_lazy_as_gamma0_to_zero():
    """The exact finite-width route (no lazy assumption) approaches the lazy form like gamma0^2."""
    data = _data(2, 1)
    gaps = []
    for gamma0 in (0.02, 0.01):
        train = dmft.GradientDescent(gamma0=gamma0, lr=0.2, steps=10)
        sol = _exact_linear_solution(data, train)
        ex = dmft.fluctuations(sol, method="linear-exact", center=True)
        lazy = dmft.fluctuations(sol, method="lazy", center=True)
        scale = np.abs(lazy.prediction_cov).max() + np.abs(lazy.ntk_var).max()
        gaps.append((np.abs(ex.prediction_cov - lazy.prediction_cov).max()
                     + np.abs(ex.ntk_var - lazy.ntk_var).max()) / scale)
    assert gaps[0] < 2e-3
    assert 3.5 < gaps[0] / gaps[1] < 4.5


def test_tanh_propagator_reduces_to_lazy_as_gamma0_to_zero():
    """tanh, centred: the general propagator at gamma0 = 1e-3 equals the lazy form within its
    Monte Carlo error (same samples); at gamma0 = 1 it is far from it."""
    data = _data(2, 1)
    net = dmft.MLP(1, "tanh")
    out = {}
    for gamma0 in (1e-3, 1.0):
        train = dmft.GradientDescent(gamma0=gamma0, lr=0.2, steps=10)
        static = dmft.solve(net, data, train, method="static")
        sol = static if gamma0 < 0.01 else solve_two_layer(net, data, train, samples=20_000,
                                                          seed=1)
        fl = dmft.fluctuations(sol, method="propagator", samples=10_000, seed=5, center=True)
        lazy = dmft.fluctuations(static, method="lazy", samples=10_000, seed=5, center=True)
        out[gamma0] = (fl, lazy)
    fl, lazy = out[1e-3]
    se = fl.stderr["prediction_cov"]
    assert np.sum(np.abs(fl.prediction_cov - lazy.prediction_cov)) < TOL["z"] * np.sum(se)
    sek = fl.stderr["ntk_var"]
    assert np.sum(np.abs(fl.ntk_var - lazy.ntk_var)) < TOL["z"] * np.sum(sek)
    fl, lazy = out[1.0]
    assert np.sum(np.abs(fl.ntk_var - lazy.ntk_var)[-1]) > 10 * np.sum(fl.stderr["ntk_var"][-1])


def test_initial_output_variance_is_included():
    """Not centred: N Cov f(0) = Phi^1(0, 0) / gamma0^2 (the NNGP kernel); centred: 0."""
    data = _data(2, 1)
    net = dmft.MLP(1, "tanh")
    train = dmft.GradientDescent(gamma0=0.5, lr=0.2, steps=6)
    sol = solve_two_layer(net, data, train, samples=20_000, seed=2)
    nngp = dmft.solve(net, data, train, method="static").phi[0, 0, 0]
    fl = dmft.fluctuations(sol, samples=20_000, seed=3)
    se = fl.stderr["prediction_cov"][0]
    assert _zmax(fl.prediction_cov[0], nngp / 0.25, se) < TOL["z"]
    np.testing.assert_allclose(fl.extras["kappa"][0], fl.prediction_cov[0], rtol=1e-12)
    flc = dmft.fluctuations(sol, samples=2_000, seed=3, center=True)
    assert np.all(flc.prediction_cov[0] == 0)


# --------------------------------------------------------------------------------------------
# against simulated networks (quick version; the slow tests below do widths 128 .. 2048)
# --------------------------------------------------------------------------------------------
def _ensemble_var_stderr(x):
    """N-free variance estimate over the seed axis and its standard error (4th moment)."""
    S = x.shape[0]
    d2 = (x - x.mean(0)) ** 2
    return d2.sum(0) / (S - 1), d2.std(0, ddof=1) / np.sqrt(S)


def _pooled_ratio(x, theory):
    """sum over entries of the ensemble variance / sum of the theory, with a standard error
    from the spread over seeds of the summed squared deviations."""
    S = x.shape[0]
    d2 = ((x - x.mean(0)) ** 2).reshape(S, -1).sum(1) * S / (S - 1)
    tot = float(np.sum(theory))
    return d2.mean() / tot, d2.std(ddof=1) / np.sqrt(S) / tot


def test_quick_simulation_check():
    data = _data(2, 1)
    net = dmft.MLP(1, "tanh")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=10)
    sol = solve_two_layer(net, data, train, samples=40_000, seed=1)
    fl = dmft.fluctuations(sol, samples=10_000, seed=2)
    N, S = 512, 200
    ens = dmft.simulate(net, data, train, width=N, seeds=range(S))
    for x, th in ((np.sqrt(N) * ens.predictions[:, -1], np.diag(fl.prediction_cov[-1])),
                  (np.sqrt(N) * np.diagonal(ens.ntk[:, -1], axis1=1, axis2=2),
                   np.diag(fl.ntk_var[-1]))):
        r, se = _pooled_ratio(x, th)
        # finite-width bias is O(1/N) ~ a few % here; tolerance: 4 standard errors + 5 %
        assert abs(r - 1) < TOL["z"] * se + 0.05, (r, se)


# --------------------------------------------------------------------------------------------
# invariants, reproducibility, I/O
# --------------------------------------------------------------------------------------------
def test_invariants_and_reproducibility(tmp_path):
    data = _data(2, 1)
    net = dmft.MLP(1, "erf")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=5)
    sol = solve_two_layer(net, data, train, samples=4_000, seed=1)
    a = dmft.fluctuations(sol, samples=2_000, seed=7)
    b = dmft.fluctuations(sol, samples=2_000, seed=7, chunk=300)
    c = dmft.fluctuations(sol, samples=2_000, seed=8)
    assert np.array_equal(a.prediction_cov, dmft.fluctuations(sol, samples=2_000,
                                                              seed=7).prediction_cov)
    assert np.allclose(a.prediction_cov, b.prediction_cov, rtol=1e-10, atol=1e-14)
    assert not np.allclose(a.prediction_cov, c.prediction_cov)
    T1, n = train.steps + 1, 3
    assert a.prediction_cov.shape == (T1, n, n) and a.ntk_var.shape == (T1, n, n)
    assert a.extras["prediction_cov_two_time"].shape == (T1, T1, n, n)
    assert a.extras["response"].shape == (T1, n, train.steps, data.P)
    assert a.stderr["prediction_cov"].shape == (T1, n, n)
    assert np.allclose(a.prediction_cov, a.prediction_cov.transpose(0, 2, 1))
    assert np.all(np.linalg.eigvalsh(a.prediction_cov) > -1e-12)
    two = a.extras["prediction_cov_two_time"]
    flat = two.transpose(0, 2, 1, 3).reshape(T1 * n, T1 * n)
    assert np.allclose(flat, flat.T) and np.linalg.eigvalsh(flat).min() > -1e-10
    assert np.all(a.ntk_var >= 0) and np.allclose(a.ntk_var, a.ntk_var.transpose(0, 2, 1))
    assert a.options["samples"] == 2_000 and a.options["seed"] == 7 and a.elapsed > 0
    path = tmp_path / "fl.h5"
    a.save(path)
    back = dmft.load(path)
    assert isinstance(back, dmft.Fluctuations)
    assert np.array_equal(back.prediction_cov, a.prediction_cov)
    assert np.array_equal(back.ntk_var, a.ntk_var)


def test_ntk_false_skips_kernel_variance():
    data = _data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=4)
    sol = solve_two_layer(dmft.MLP(1, "tanh"), data, train, samples=2_000, seed=1)
    fl = dmft.fluctuations(sol, samples=1_000, seed=1, ntk=False)
    assert np.all(np.isnan(fl.ntk_var)) and "ntk_var" not in fl.stderr
    full = dmft.fluctuations(sol, samples=1_000, seed=1)
    assert np.allclose(fl.prediction_cov, full.prediction_cov, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tanh_sol():
    data = _data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=3)
    return solve_two_layer(dmft.MLP(1, "tanh"), data, train, samples=1_000, seed=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"samples": 0}, "samples must be a positive integer"),
    ({"samples": 10}, "too small for blocks"),
    ({"blocks": 1}, "blocks must be an integer >= 2"),
    ({"chunk": -3}, "chunk must be a positive integer"),
    ({"center": "yes"}, "center must be True or False"),
    ({"ntk": 1}, "ntk must be True or False"),
    ({"method": "magic"}, "method 'magic' is unknown"),
    ({"moments": "guess"}, "moments 'guess' is unknown"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"samples_": 5}, r"unknown option\(s\) \['samples_'\]"),
    ({"method": "linear-exact"}, "needs a linear network"),
    ({"method": "lazy", "moments": "exact"}, "moments='exact' is available for linear"),
])
def test_bad_options(tanh_sol, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dmft.fluctuations(tanh_sol, **kwargs)


def test_bad_solution_and_unsupported_cases(tanh_sol):
    with pytest.raises(ValueError, match="sol must be a dmft.Solution"):
        dmft.fluctuations("not a solution")
    data = _data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=3)
    deep = dmft.solve(dmft.MLP(2, "tanh"), data, train, method="static")
    with pytest.raises(NotImplementedError, match="two-layer networks"):
        dmft.fluctuations(deep)
    relu = dmft.solve(dmft.MLP(1, "relu"), data, train, method="static")
    with pytest.raises(NotImplementedError, match="does not support relu"):
        dmft.fluctuations(relu, method="propagator")
    fl = dmft.fluctuations(relu, samples=2_000, seed=0)   # lazy handles relu
    assert fl.method == "lazy" and np.all(np.isfinite(fl.prediction_cov))
    lazy0 = dmft.solve(dmft.MLP(1, "tanh"), data, dmft.GradientDescent(gamma0=0.0, lr=0.2,
                                                                       steps=3),
                       method="static")
    with pytest.raises(ValueError, match="infinite at gamma0 = 0; use center=True"):
        dmft.fluctuations(lazy0)
    with pytest.raises(ValueError, match="needs gamma0 > 0"):
        dmft.fluctuations(lazy0, method="propagator", center=True)
    bad = dmft.Solution(**{**{f: getattr(tanh_sol, f) for f in (
        "net", "data", "train", "method", "t", "test_predictions", "ntk", "phi", "g")},
        "train_predictions": np.full_like(tanh_sol.train_predictions, np.nan)})
    with pytest.raises(ValueError, match="non-finite predictions"):
        dmft.fluctuations(bad)


def test_divergence_raises_convergence_error():
    data = _data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=6)
    sol = solve_two_layer(dmft.MLP(1, "tanh"), data, train, samples=2_000, seed=0)
    huge = dmft.Solution(**{**{f: getattr(sol, f) for f in (
        "net", "data", "t", "test_predictions", "ntk", "phi", "g", "method")},
        "train": dmft.GradientDescent(gamma0=1e3, lr=50.0, steps=6),
        "train_predictions": sol.train_predictions - 1e150})
    with pytest.raises(dmft.ConvergenceError, match="diverged|non-finite"):
        dmft.fluctuations(huge, samples=200, seed=0)


# --------------------------------------------------------------------------------------------
# slow: theory against simulated ensembles, widths 128 .. 2048
# --------------------------------------------------------------------------------------------
WIDTHS = (128, 256, 512, 1024, 2048)


def _width_sweep(net, data, train, fl, seeds, center=False):
    """Pooled ratios (simulation N Var / theory) of final-time predictions (all points) and
    NTK entries (upper triangle) per width, with standard errors."""
    T = train.steps
    i, j = np.triu_indices(data.P + data.Q)
    rows = []
    for N in WIDTHS:
        ens = dmft.simulate(net, data, train, width=N, seeds=range(seeds), center=center)
        rp = _pooled_ratio(np.sqrt(N) * ens.predictions[:, T],
                           np.diag(fl.prediction_cov[T]))
        rk = _pooled_ratio(np.sqrt(N) * ens.ntk[:, T][:, i, j], fl.ntk_var[T][i, j])
        rows.append((N, rp, rk))
        print(f"N={N:5d}  pred ratio {rp[0]:.3f} +- {rp[1]:.3f}   ntk ratio {rk[0]:.3f} +- "
              f"{rk[1]:.3f}")
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("gamma0", [0.1, 1.0, 2.0])
def test_tanh_two_layer_against_simulations(gamma0):
    data = _data(4, 2, D=8, seed=1)
    net = dmft.MLP(1, "tanh")
    train = dmft.GradientDescent(gamma0=gamma0, lr=0.1, steps=30)
    sol = solve_two_layer(net, data, train, samples=400_000, seed=1)
    fl = dmft.fluctuations(sol, samples=40_000, seed=2)
    rows = _width_sweep(net, data, train, fl, seeds=1000)
    N, rp, rk = rows[-1]
    for r, se in (rp, rk):
        # within 10 % at the largest width, unless the error bar itself is wider
        assert abs(r - 1) < max(TOL["width_rel"], 3 * se), rows


@pytest.mark.slow
def test_linear_two_layer_against_simulations_centred():
    data = _data(3, 1, D=6, seed=2)
    net = dmft.MLP(1, "linear")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=30)
    sol = _exact_linear_solution(data, train)
    fl = dmft.fluctuations(sol, center=True)
    rows = _width_sweep(net, data, train, fl, seeds=1000, center=True)
    N, rp, rk = rows[-1]
    for r, se in (rp, rk):
        assert abs(r - 1) < max(TOL["width_rel"], 3 * se), rows


@pytest.mark.slow
def test_lazy_one_point_against_simulations():
    """gamma0 = 0.01, centred, one point: N Var Delta(t) = 4 lr^2 k^2 y^2 (1 - 2 lr)^(2(k-1))."""
    data = _one_point()
    net = dmft.MLP(1, "linear")
    lr, T = 0.05, 40
    train = dmft.GradientDescent(gamma0=0.01, lr=lr, steps=T)
    sol = dmft.solve(net, data, train, method="static")
    fl = dmft.fluctuations(sol, center=True)
    N, S = 2048, 1000
    ens = dmft.simulate(net, data, train, width=N, seeds=range(S), center=True)
    x = np.sqrt(N) * ens.train_predictions[:, :, 0]
    v, se = _ensemble_var_stderr(x)
    k = np.arange(T + 1)
    print("N Var Delta, t = 10 lr, 20 lr, 40 lr:", v[[10, 20, 40]], "theory",
          fl.prediction_cov[[10, 20, 40], 0, 0])
    np.testing.assert_allclose(fl.prediction_cov[:, 0, 0],
                               4 * lr ** 2 * k ** 2 * (1 - 2 * lr) ** (2.0 * (k - 1)), rtol=1e-12)
    assert np.all(np.abs(v[1:] - fl.prediction_cov[1:, 0, 0]) < TOL["z"] * se[1:] + 0.02
                  * fl.prediction_cov[1:, 0, 0])
