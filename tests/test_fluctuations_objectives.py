"""Finite-width fluctuations beyond one squared-error output (docs/theory.rst §5, §7):
C outputs, cross-entropy and logistic losses, weight decay (toward the initialisation and
toward zero), mini-batches, in ``method="propagator"`` (two-layer, sampled) and
``method="deep-linear"`` (linear networks of any depth, exact).

Grouped by what they prove:
- engines: the general two-layer engine (C outputs, loss Jacobian, decay) equals the original
  one on the plain problem to rounding, and its forward-mode tangents equal central
  differences of its march; the general deep-linear march equals the original one on the
  plain problem, and its infinite-width trajectory equals the exact deep-linear solver
  (:mod:`solvers.linear`, another engineer's code) for every objective;
- independent routes: for a two-layer *linear* network the sampled propagator agrees with the
  exact deep-linear propagator (depth 1) within its Monte Carlo errors, for C = 2 outputs with
  weight decay toward zero, for the logistic loss with mini-batches, for cross-entropy;
- theory against simulated networks (``dmft.simulate``): quick checks at one width here, slow
  width sweeps (128 .. 2048) below with the 1/N extrapolation of tests/test_fluctuations_deep.py;
- the adapter: shapes for C >= 2 outputs, refusals (hinge; methods without the features).

Tolerances come from Monte Carlo error bars (``TOL`` of tests/conftest.py) or rounding.
"""
import numpy as np
import pytest

import dmft
from conftest import TOL as _SHARED, pooled_ratio as _pooled_ratio
from dmft._two_layer import solve_two_layer
from solvers import fluct
from solvers.fluct import deep_linear as fluct_deep
from solvers.fluct import propagator_objective as fluct_prop
from solvers.objective import Objective

# the width-sweep criterion of the deep-linear tests (same TOL['width_rel'], ['width_se'])
from test_fluctuations_deep import _assert_width_sweep

needs_torch = pytest.mark.usefixtures("torch_or_skip")

TOL = {
    **_SHARED,              # z, z_max, width_rel, width_se (tests/conftest.py)
    "rounding": 1e-11,      # the same quantity by two code paths (relative)
    "solver": 1e-10,        # infinite-width trajectory vs solvers.linear
    "tangent_fd": 1e-6,     # forward-mode tangents vs central differences (relative)
    "lazy": 2e-3,           # gamma0 = 1e-3 against the gamma0 -> 0 form (error O(gamma0))
}


def _X(P=3, Q=2, D=4, seed=0):
    return np.random.default_rng(seed).standard_normal((P + Q, D))


def _classes(test=True):
    """P = 3 training points of 3 classes, Q = 2 test points or none (one-hot targets,
    C = 3)."""
    X = _X()
    if not test:
        return dmft.Dataset.from_labels(X[:3], [0, 1, 2])
    return dmft.Dataset.from_labels(X[:3], [0, 1, 2], X[3:], [1, 0])


def _binary():
    X = _X()
    return dmft.Dataset(X[:3], np.array([1.0, -1.0, 1.0]), X[3:])


def _two_outputs(P=2, Q=1):
    X = _X(P, Q)
    Y = np.array([[1.0, -0.5], [0.3, 0.8], [-0.4, 0.2]])[:P]
    return dmft.Dataset(X[:P], Y, X[P:])


def _flat(a, n, C):
    """(..., n, C, n, C) or (..., n, n) -> (..., nC, nC)."""
    return np.asarray(a).reshape(np.shape(a)[:-4 if C > 1 else -2] + (n * C, n * C))


# --------------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------------
def test_general_two_layer_engine_is_the_plain_one_on_the_plain_problem():
    """mse, C = 1, no decay: population march, propagator, stderr, response and kappa of the
    general engine equal the original (Numba) path to rounding."""
    X = _X(3, 2)
    data = dmft.Dataset(X[:3], np.array([1.0, -0.5, 0.3]), X[3:])
    kx, y = data.kx, np.asarray(data.y_train)
    u, w0 = fluct.draw_units(kx, 1500, np.random.default_rng(0))
    T, lr, g0 = 4, 0.4, 1.0
    pop = fluct.population_march("tanh", u, w0, kx, y, g0, lr, T)
    obj = Objective("mse", y, 5, T, lr)
    pop2 = fluct.population_march_objective("tanh", u, w0[:, None], kx, obj, g0)
    assert np.max(np.abs(pop["f"] - pop2["f"][..., 0])) < TOL["rounding"]
    assert np.max(np.abs(pop["ntk"] - pop2["ntk"][:, :, 0, :, 0])) < TOL["rounding"]
    r1 = fluct.two_layer_propagator("tanh", u, w0, kx, pop["delta"], g0, lr, blocks=3)
    jac = np.broadcast_to(-np.eye(1), (T, 3, 1, 1))
    r2 = fluct.objective_propagator("tanh", u, w0[:, None], kx, pop["delta"][..., None], jac,
                                    g0, lr, blocks=3)
    for key in ("cov", "ntk_var", "pred_cov_stderr", "ntk_var_stderr", "kappa", "response"):
        a, b = r1[key], r2[key].reshape(r1[key].shape)
        assert np.max(np.abs(a - b)) < TOL["rounding"] * np.max(np.abs(a)), key


@pytest.mark.parametrize("decay_to", ["init", "zero"])
def test_general_tangents_equal_central_differences(decay_to):
    """dO / dDelta and dk / dDelta of the C-output march with weight decay (forward mode)
    against central differences of the march itself."""
    rng = np.random.default_rng(3)
    X = _X(3, 1)
    kx = X @ X.T / X.shape[1]
    T, P, C, n, S = 3, 3, 2, 4, 3
    u, w0 = fluct.draw_units_multi(kx, S, C, rng)
    delta = 0.5 * rng.standard_normal((T, P, C))
    c, g0, a = 0.7, 1.3, 0.8
    iu = np.triu_indices(n * C)
    JO = np.zeros((T + 1, n * C, T * P * C))
    Jk = np.zeros((T + 1, iu[0].size, T * P * C))
    h, w = fluct.march_multi("tanh", u, w0, kx, delta, c, a, decay_to)
    fluct_prop.accumulate_response_multi("tanh", h, w, kx, delta, c, g0, a, JO, Jk, iu)

    def obs(d):
        hh, ww = fluct.march_multi("tanh", u, w0, kx, d, c, a, decay_to)
        O, k = fluct.unit_observables_multi("tanh", hh, ww, kx, g0, iu=iu)
        return O.sum(0), k.sum(0)

    eps = 1e-6
    for dd in range(T * P * C):
        e = np.zeros(T * P * C)
        e[dd] = eps
        (Op, kp), (Om, km) = obs(delta + e.reshape(T, P, C)), obs(delta - e.reshape(T, P, C))
        fdO, fdk = (Op - Om) / (2 * eps), (kp - km) / (2 * eps)
        assert np.max(np.abs(fdO - JO[:, :, dd])) < TOL["tangent_fd"] * (1 + np.abs(fdO).max())
        assert np.max(np.abs(fdk - Jk[:, :, dd])) < TOL["tangent_fd"] * (1 + np.abs(fdk).max())


@needs_torch
def test_general_deep_linear_march_is_the_plain_one_on_the_plain_problem():
    data = _two_outputs()
    X = np.concatenate([data.X_train, data.X_test])
    y = np.array([1.0, -0.5])
    kx = X @ X.T / X.shape[1]
    T, lr, g0, L = 4, 0.3, 1.2, 2
    r1 = fluct_deep.deep_linear_propagator(kx, y, L, g0, lr, T)
    r2 = fluct_deep._deep_linear_objective(kx, Objective("mse", y, 3, T, lr), L, g0, lr, T,
                                           center=False, ntk=True, iters=None, responses=True)
    for key in ("f", "ntk_mean", "cov", "ntk_var"):
        assert np.max(np.abs(r1[key] - r2[key])) < TOL["rounding"] * np.max(np.abs(r1[key]))


_LINEAR_CASES = {
    "mse_C2": (_two_outputs, {}),
    "mse_C2_decay_init": (_two_outputs, dict(weight_decay=0.5)),
    "mse_C2_decay_zero": (_two_outputs, dict(weight_decay=0.5, decay_to="zero")),
    "cross_entropy_C3_batches": (_classes, dict(loss="cross_entropy", batch_size=2)),
    "logistic_decay_init": (_binary, dict(loss="logistic", weight_decay=0.3)),
}


@needs_torch
@pytest.mark.parametrize("case", sorted(_LINEAR_CASES))
def test_deep_linear_trajectory_is_the_exact_solver(case):
    """The infinite-width trajectory the deep-linear propagator linearises around equals
    dmft.solve(method="linear") (an independent implementation of docs/theory.rst §3, §7)."""
    make, kw = _LINEAR_CASES[case]
    data = make()
    train = dmft.GradientDescent(1.0, 0.3, 5, **kw)
    sol = dmft.solve(dmft.MLP(2, "linear"), data, train, method="linear")
    fl = dmft.fluctuations(sol, method="deep-linear", ntk=False)
    assert fl.options["max_prediction_gap"] < TOL["solver"]
    assert np.all(np.isfinite(fl.prediction_cov))


# --------------------------------------------------------------------------------------------
# independent routes: sampled two-layer propagator vs the exact deep-linear one at depth 1
# --------------------------------------------------------------------------------------------
_ROUTE_CASES = {
    "mse_C2_decay_zero": (_two_outputs, dict(weight_decay=0.5, decay_to="zero")),
    "logistic_batches": (_binary, dict(loss="logistic", batch_size=2)),
    "cross_entropy_C3_decay_init": (lambda: _classes(test=False),
                                    dict(loss="cross_entropy", weight_decay=0.3)),
}


@needs_torch
@pytest.mark.parametrize("case", sorted(_ROUTE_CASES))
def test_sampled_propagator_equals_exact_route_for_linear_networks(case):
    """Two-layer linear network: N Cov(f) and N Var(K) of the sampled propagator (loss
    Jacobian, decay, outputs, batches in the sampled engine) against the exact deep-linear
    propagator, within TOL['z_max'] of the batch-means standard errors (plus 1e-3 of the
    scale for entries whose error bar is tiny)."""
    make, kw = _ROUTE_CASES[case]
    data = make()
    train = dmft.GradientDescent(1.0, 0.4, 4, **kw)
    sol = dmft.solve(dmft.MLP(1, "linear"), data, train, method="linear")
    ex = dmft.fluctuations(sol, method="deep-linear")
    # 20 blocks: the batch-means errors are then close enough to normal for TOL['z_max']
    # (with 6 blocks they are t-distributed with 5 degrees of freedom: heavy tails)
    sa = dmft.fluctuations(sol, method="propagator", seed=2, samples=6000, blocks=20)
    for key in ("prediction_cov", "ntk_var"):
        est, ref, se = getattr(sa, key), getattr(ex, key), sa.stderr[key]
        assert est.shape == ref.shape == se.shape
        z = np.abs(est - ref) / (se + 1e-3 * np.abs(ref).max())
        assert z.max() < TOL["z_max"], (key, z.max())


# --------------------------------------------------------------------------------------------
# the lazy limit: gamma0 -> 0 of the exact deep-linear propagator is the frozen-kernel form
# --------------------------------------------------------------------------------------------
_LAZY_CASES = {
    "mse_C2_decay_init": (_two_outputs, dict(weight_decay=0.5), 1),
    "logistic_batches": (_binary, dict(loss="logistic", batch_size=2), 1),
    "logistic_decay_init_depth2": (_binary, dict(loss="logistic", weight_decay=0.3), 2),
}


@needs_torch
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("case", sorted(_LAZY_CASES))
def test_deep_linear_reduces_to_the_lazy_form(case, center):
    """gamma0 = 1e-3: the deep-linear propagator (exact, any gamma0) against method="lazy"
    (frozen kernel f = f(0) + K alpha, alpha(t+1) = a alpha(t) + lr Delta(t), exact Isserlis
    moments over (point, output) pairs): error O(gamma0), TOL['lazy']."""
    make, kw, depth = _LAZY_CASES[case]
    train = dmft.GradientDescent(1e-3, 0.4, 5, **kw)
    sol = dmft.solve(dmft.MLP(depth, "linear"), make(), train, method="linear")
    fl = dmft.fluctuations(sol, method="deep-linear", center=center)
    lz = dmft.fluctuations(sol, method="lazy", center=center)
    assert fl.prediction_cov.shape == lz.prediction_cov.shape
    rel = np.abs(fl.prediction_cov - lz.prediction_cov).max() / np.abs(lz.prediction_cov).max()
    assert rel < TOL["lazy"], rel
    assert np.abs(fl.ntk_var / lz.ntk_var - 1).max() < TOL["lazy"]


def test_sampled_lazy_moments_with_outputs_match_isserlis():
    """Sampled single-site moments over (point, output) pairs against the closed form
    (linear network, C = 2, weight decay), within TOL['z_max'] standard errors."""
    train = dmft.GradientDescent(1e-3, 0.4, 4, weight_decay=0.3)
    sol = dmft.solve(dmft.MLP(1, "linear"), _two_outputs(), train, method="linear")
    ex = dmft.fluctuations(sol, method="lazy", center=True)
    sa = dmft.fluctuations(sol, method="lazy", center=True, moments="sampled", samples=20_000,
                           seed=0)
    for key in ("prediction_cov", "ntk_var"):
        z = np.abs(getattr(sa, key) - getattr(ex, key)) / (sa.stderr[key] + 1e-12)
        assert z.max() < TOL["z_max"], (key, z.max())


# --------------------------------------------------------------------------------------------
# theory against simulated networks
# --------------------------------------------------------------------------------------------
def _sweep(net, data, train, fl, seeds, center, times):
    """Pooled ratios (simulation N Var / theory) per width and time, for the predictions
    (diagonal of N Cov over (point, output)) and every NTK entry K_{mu c, nu c'}; the ratio's
    standard error combines the ensemble's and the theory's (batch means; its sum over
    entries bounded by the sum of the entries' errors). Rows (N, t, (r, se), (r, se))."""
    n, C = data.P + data.Q, data.C
    nc = n * C
    iu = np.triu_indices(nc)
    rows = []
    for N in sorted(seeds):
        S = seeds[N]
        ens = dmft.simulate(net, data, train, width=N, seeds=range(S), center=center)
        for t in times:
            out = []
            for x, th, se in (
                    (ens.predictions[:, t].reshape(S, nc),
                     np.diag(_flat(fl.prediction_cov[t], n, C)),
                     np.diag(_flat(fl.stderr.get("prediction_cov", np.zeros_like(
                         fl.prediction_cov))[t], n, C))),
                    (ens.ntk[:, t].reshape(S, nc, nc)[:, iu[0], iu[1]],
                     _flat(fl.ntk_var[t], n, C)[iu],
                     _flat(fl.stderr.get("ntk_var", np.zeros_like(fl.ntk_var))[t], n, C)[iu])):
                r, se_r = _pooled_ratio(np.sqrt(N) * x, th)
                rel_th = float(np.sum(se) / np.sum(th))
                out.append((r, float(np.hypot(se_r, r * rel_th))))
            rows.append((N, t, out[0], out[1]))
            print(f"N={N:5d} t={t:3d}  pred ratio {out[0][0]:.3f} +- {out[0][1]:.3f}   ntk "
                  f"ratio {out[1][0]:.3f} +- {out[1][1]:.3f}")
    return rows


def _two_layer_theory(data, train, center, samples=8000, pop=60_000):
    net = dmft.MLP(1, "tanh")
    sol = solve_two_layer(net, data, train, seed=0, samples=pop)
    fl = dmft.fluctuations(sol, method="propagator", seed=1, samples=samples, center=center)
    return net, fl


def test_quick_two_layer_cross_entropy_three_classes_against_simulation():
    """tanh, cross-entropy, C = 3, 6 steps of lr 1, uncentred; 300 networks of width 256."""
    data = _classes()
    train = dmft.GradientDescent(1.0, 1.0, 6, loss="cross_entropy")
    net, fl = _two_layer_theory(data, train, False, samples=4000, pop=40_000)
    assert fl.prediction_cov.shape == (7, 5, 3, 5, 3)
    _assert_width_sweep(_sweep(net, data, train, fl, {256: 300}, False, (3, 6)))


@needs_torch
def test_quick_deep_linear_two_outputs_weight_decay_against_simulation():
    """Depth 2 linear, C = 2 (mse), weight decay toward the initialisation (a = 0.9), centred;
    300 networks of width 256."""
    data = _two_outputs()
    train = dmft.GradientDescent(1.0, 0.2, 6, weight_decay=0.5)
    net = dmft.MLP(2, "linear")
    fl = dmft.fluctuations(dmft.solve(net, data, train, method="linear"), center=True)
    assert fl.method == "deep-linear"
    _assert_width_sweep(_sweep(net, data, train, fl, {256: 300}, True, (3, 6)))


_WIDE = {128: 400, 512: 400, 2048: 400}


@pytest.mark.slow
@pytest.mark.parametrize("loss,kw,center", [
    ("cross_entropy", dict(), False),
    ("logistic", dict(), True),
    ("cross_entropy", dict(weight_decay=0.2, batch_size=2), True),
    ("cross_entropy", dict(weight_decay=0.2, decay_to="zero"), False),
])
def test_two_layer_width_sweep(loss, kw, center):
    """tanh, 8 steps of lr 1: cross-entropy over C = 3 classes (with weight decay toward the
    initialisation and mini-batches of 2, or toward zero) and the logistic loss; 400
    networks at widths 128, 512, 2048."""
    data = _classes() if loss == "cross_entropy" else _binary()
    train = dmft.GradientDescent(1.0, 1.0, 8, loss=loss, **kw)
    net, fl = _two_layer_theory(data, train, center, samples=20_000, pop=200_000)
    _assert_width_sweep(_sweep(net, data, train, fl, _WIDE, center, (4, 8)))


@needs_torch
@pytest.mark.slow
@pytest.mark.validation         # 2-36 CPU minutes each (1200 linear networks up to N = 2048)
@pytest.mark.parametrize("depth,kw,center", [
    (2, dict(weight_decay=0.5), True),
    (2, dict(weight_decay=0.5, decay_to="zero"), False),
    (3, dict(), False),
])
def test_deep_linear_two_outputs_width_sweep(depth, kw, center):
    """Linear, C = 2 (mse), 10 steps of lr 0.2: depth 2 with weight decay toward the
    initialisation (centred) or toward zero (uncentred), depth 3 without; 400 networks at
    widths 128, 512, 2048."""
    data = _two_outputs()
    train = dmft.GradientDescent(1.0, 0.2, 10, **kw)
    net = dmft.MLP(depth, "linear")
    fl = dmft.fluctuations(dmft.solve(net, data, train, method="linear"), center=center,
                           method="deep-linear")
    _assert_width_sweep(_sweep(net, data, train, fl, _WIDE, center, (5, 10)))


# --------------------------------------------------------------------------------------------
# adapter: shapes and refusals
# --------------------------------------------------------------------------------------------
def test_multi_output_shapes():
    data = _classes()
    train = dmft.GradientDescent(1.0, 0.5, 3, loss="cross_entropy")
    sol = solve_two_layer(dmft.MLP(1, "tanh"), data, train, seed=0, samples=2000)
    fl = dmft.fluctuations(sol, method="propagator", seed=0, samples=200, blocks=2)
    assert fl.prediction_cov.shape == fl.ntk_var.shape == (4, 5, 3, 5, 3)
    assert fl.stderr["prediction_cov"].shape == fl.stderr["ntk_var"].shape == (4, 5, 3, 5, 3)
    assert fl.extras["prediction_cov_two_time"].shape == (4, 4, 5, 3, 5, 3)
    assert fl.extras["response"].shape == (4, 5, 3, 3, 3, 3)
    # one output with another loss keeps the one-output shapes
    sol1 = solve_two_layer(dmft.MLP(1, "tanh"), _binary(), dmft.GradientDescent(
        1.0, 0.5, 3, loss="logistic"), seed=0, samples=2000)
    fl1 = dmft.fluctuations(sol1, method="propagator", seed=0, samples=200, blocks=2)
    assert fl1.prediction_cov.shape == fl1.ntk_var.shape == (4, 5, 5)


def test_refusals_name_the_fix():
    data = _binary()
    hinge = dmft.GradientDescent(1.0, 0.5, 3, loss="hinge")
    sol = solve_two_layer(dmft.MLP(1, "tanh"), data, hinge, seed=0, samples=2000)
    with pytest.raises(ValueError, match="hinge"):
        dmft.fluctuations(sol, method="propagator", samples=200)
    with pytest.raises(ValueError, match="hinge"):
        dmft.fluctuations(sol, method="deep-linear")
    # methods without the features refuse and point to one that has them
    logistic = dmft.GradientDescent(1.0, 0.5, 3, loss="logistic")
    sol = solve_two_layer(dmft.MLP(1, "tanh"), data, logistic, seed=0, samples=2000)
    for method in ("linear-exact", "deep-propagator"):
        with pytest.raises(ValueError, match="method='propagator'"):
            dmft.fluctuations(sol, method=method)
    # no lazy limit under weight decay toward zero
    zero = dmft.GradientDescent(1.0, 0.5, 3, loss="logistic", weight_decay=0.1,
                                decay_to="zero")
    sol = solve_two_layer(dmft.MLP(1, "tanh"), data, zero, seed=0, samples=2000)
    with pytest.raises(ValueError, match="toward zero"):
        dmft.fluctuations(sol, method="lazy")
    # the lazy form beyond one mse output at depth > 1: one output of a linear network only
    sol = dmft.solve(dmft.MLP(2, "linear"), _two_outputs(), dmft.GradientDescent(1e-3, 0.3, 3),
                     method="linear")
    with pytest.raises(ValueError, match="method='deep-linear'"):
        dmft.fluctuations(sol, method="lazy")


@needs_torch
def test_auto_uses_deep_linear_for_a_two_layer_linear_network_beyond_mse():
    data = _two_outputs()
    train = dmft.GradientDescent(1.0, 0.3, 3, weight_decay=0.2)
    sol = dmft.solve(dmft.MLP(1, "linear"), data, train, method="linear")
    fl = dmft.fluctuations(sol)
    assert fl.method == "deep-linear"
    assert fl.prediction_cov.shape == (4, 3, 2, 3, 2)
