"""Gaussian expectations (solvers.gaussian) and the static-NTK baseline (method="static").

Grouped by what they prove: closed forms against independent routes (quadrature, a direct
numerical integral, Price's theorem, Monte Carlo); quadrature accuracy by convergence in the
order; invariants of the kernels; the exact discrete-time dynamics; the Solution contract;
bad input.
"""
import math

import numpy as np
import pytest
from scipy import integrate

import dmft
from dmft.results import ConvergenceError
from solvers import gaussian as G
from solvers import static as S

ALL_ORDERS = [(a, b) for a in (0, 1, 2) for b in (0, 1, 2)]
ACTS = ["linear", "tanh", "relu", "erf"]

# Tolerances, in one place.
TOL_CLOSED_VS_QUAD = 1e-10     # smooth closed forms against the trapezoidal quadrature
TOL_QUAD_SELF = 1e-10          # automatic order against twice as many nodes (tanh)
TOL_DIRECT_INTEGRAL = 1e-9     # relu closed forms against scipy dblquad
TOL_PRICE = 1e-6               # central differences with step 1e-4 (error O(step^2))
MC_SIGMAS = 5.0                # Monte Carlo: |error| < 5 standard errors (fixed seed)


def _cov(seed=0, n=7, max_var=3.0, degenerate=True):
    """A covariance with variances spread over (~0.05, max_var]; optionally with a repeated
    point (rho = 1), a negated point (rho = -1) and a zero input (zero variance)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)) * rng.uniform(0.2, 1.5, size=(n, 1))
    if degenerate:
        X = np.vstack([X, X[:1], -X[1:2], np.zeros((1, 4))])
    Sig = X @ X.T
    return Sig * (max_var / Sig.diagonal().max())


# ------------------------------------------------------------------ closed forms vs routes
@pytest.mark.parametrize("orders", ALL_ORDERS)
def test_erf_closed_forms_equal_quadrature(orders):
    Sig = _cov(max_var=10.0)
    c = G.expect("erf", Sig, orders, method="closed")
    q = G.expect("erf", Sig, orders, method="quadrature")
    assert np.all(np.isfinite(c))
    np.testing.assert_allclose(c, q, rtol=0, atol=TOL_CLOSED_VS_QUAD)


@pytest.mark.parametrize("orders", ALL_ORDERS)
def test_linear_closed_forms_equal_quadrature(orders):
    Sig = _cov(1)
    c = G.expect("linear", Sig, orders, method="closed")
    q = G.expect("linear", Sig, orders, method="quadrature")
    np.testing.assert_allclose(c, q, rtol=0, atol=TOL_CLOSED_VS_QUAD * Sig.max())


def _relu_dblquad(s11, s22, s12, a, b):
    """E[relu^(a)(u1) relu^(b)(u2)], a, b in {0, 1}, by a direct 2-D integral of the
    bivariate normal density over the quadrant u1 > 0, u2 > 0 (where the integrand lives)."""
    det = s11 * s22 - s12 ** 2
    inv = np.array([[s22, -s12], [-s12, s11]]) / det
    norm = 1.0 / (2 * math.pi * math.sqrt(det))

    def f(u2, u1):
        dens = norm * math.exp(-0.5 * (inv[0, 0] * u1 * u1 + 2 * inv[0, 1] * u1 * u2
                                       + inv[1, 1] * u2 * u2))
        return (u1 if a == 0 else 1.0) * (u2 if b == 0 else 1.0) * dens

    hi1, hi2 = 12 * math.sqrt(s11), 12 * math.sqrt(s22)
    val, err = integrate.dblquad(f, 0, hi1, 0, hi2, epsabs=1e-13, epsrel=1e-12)
    return val


@pytest.mark.parametrize("rho", [-0.95, -0.3, 0.0, 0.6, 0.99])
def test_relu_arccos_closed_form_equals_direct_integral(rho):
    s11, s22 = 0.7, 2.3
    s12 = rho * math.sqrt(s11 * s22)
    for a, b in [(0, 0), (1, 1), (0, 1), (1, 0)]:
        direct = _relu_dblquad(s11, s22, s12, a, b)
        closed = G.expect_pairs("relu", s11, s22, s12, (a, b))
        assert abs(closed - direct) < TOL_DIRECT_INTEGRAL, (a, b, closed, direct)


def _price_checks(act, s11, s22, s12, method):
    """Price's theorem: d E[F] / d s12 = E[d1 d2 F], d E[F] / d s11 = E[d1^2 F] / 2."""
    h = 1e-4
    E = lambda a, b, x=s11, z=s22, c=s12: float(G.expect_pairs(act, x, z, c, (a, b),
                                                              method=method))
    out = []
    # off-diagonal derivative: (a, b) -> (a + 1, b + 1)
    for a, b in [(0, 0), (1, 1)]:
        fd = (E(a, b, c=s12 + h) - E(a, b, c=s12 - h)) / (2 * h)
        out.append(((a + 1, b + 1), fd, E(a + 1, b + 1)))
    # diagonal derivative: (a, b) -> (a + 2, b)
    for b in (0, 1, 2):
        fd = 2 * (E(0, b, x=s11 + h) - E(0, b, x=s11 - h)) / (2 * h)
        out.append(((2, b), fd, E(2, b)))
    return out


@pytest.mark.parametrize("act,method", [("relu", "closed"), ("erf", "closed"),
                                        ("tanh", "quadrature")])
def test_second_derivative_expectations_obey_price_theorem(act, method):
    # The phi'' entries (relu's delta included) checked against derivatives of the lower
    # orders with respect to the covariance.
    for s11, s22, s12 in [(0.8, 1.7, 0.5), (2.0, 0.5, -0.6)]:
        for orders, fd, val in _price_checks(act, s11, s22, s12, method):
            assert abs(fd - val) < TOL_PRICE * max(1.0, abs(val)), (act, orders, fd, val)


@pytest.mark.parametrize("act", ACTS)
def test_kernels_match_monte_carlo(act):
    Sig = _cov(2, n=5, max_var=2.0, degenerate=False)
    rng = np.random.default_rng(12345)
    n_samples = 200_000
    u = rng.multivariate_normal(np.zeros(len(Sig)), Sig, size=n_samples, method="eigh")
    for orders in [(0, 0), (1, 1), (0, 1)]:
        f1 = G._act.apply(act, u, orders[0])
        f2 = G._act.apply(act, u, orders[1])
        prod = f1[:, :, None] * f2[:, None, :]
        mc = prod.mean(axis=0)
        se = prod.std(axis=0, ddof=1) / math.sqrt(n_samples)
        exact = G.expect(act, Sig, orders)
        z = np.abs(mc - exact) / np.maximum(se, 1e-15)
        # (exact constants such as linear phi' = 1 have se = 0 and agree exactly)
        assert np.all((z < MC_SIGMAS) | (np.abs(mc - exact) < 1e-12)), (act, orders, z.max())


# ------------------------------------------------------------------ quadrature accuracy
@pytest.mark.parametrize("orders", [(0, 0), (1, 1), (0, 2), (2, 2)])
def test_tanh_quadrature_converges_in_the_order(orders):
    # variances up to 10 (the largest the static recursion meets for tanh is |x|^2/D)
    Sig = _cov(3, n=5, max_var=10.0)
    m = G.auto_order(10.0, orders)
    ref = G.expect("tanh", Sig, orders, order=2 * m + 1)
    auto = G.expect("tanh", Sig, orders)
    assert np.abs(auto - ref).max() < TOL_QUAD_SELF
    # the error falls geometrically with the node count (sinc rule: exp(-pi^2 / (s h)))
    errs = [np.abs(G.expect("tanh", Sig, orders, order=k) - ref).max()
            for k in (41, 81, 121)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-3 * errs[0]


def test_gauss_hermite_rule_agrees_at_small_variance():
    # an independent rule: Gauss-Hermite is excellent for smooth, slowly varying integrands
    Sig = _cov(4, n=4, max_var=0.5)
    for orders in [(0, 0), (1, 1), (2, 0)]:
        gh = G.expect("tanh", Sig, orders, method="quadrature", rule="hermite", order=120)
        tr = G.expect("tanh", Sig, orders)
        np.testing.assert_allclose(gh, tr, rtol=0, atol=1e-11)


@pytest.mark.parametrize("act", ["tanh", "erf", "linear"])
def test_numba_quadrature_kernel_matches_numpy_path(act):
    Sig = _cov(5)
    for orders in [(0, 0), (1, 1), (0, 2), (2, 1)]:
        a = G.expect(act, Sig, orders, method="quadrature", engine="numba", order=61)
        b = G.expect(act, Sig, orders, method="quadrature", engine="numpy", order=61)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * max(1, np.abs(b).max()))


def test_one_point_means():
    v = [0.0, 0.3, 2.0, 9.0]
    for act in ACTS:
        for k in (0, 1, 2):
            if act == "relu" and k == 2:
                continue
            got = G.expect1(act, np.array(v), k)
            for var, val in zip(v, got):
                sd = math.sqrt(var)
                f = lambda z: (G._act.apply(act, sd * z, k)
                               * math.exp(-z * z / 2) / math.sqrt(2 * math.pi))
                direct = integrate.quad(f, -12, 0, epsabs=1e-13)[0] + \
                    integrate.quad(f, 0, 12, epsabs=1e-13)[0]
                assert abs(val - direct) < 1e-10, (act, k, var, val, direct)
    assert np.allclose(G.expect1("relu", v[1:], 2), 1 / np.sqrt(2 * np.pi * np.array(v[1:])))


# ------------------------------------------------------------------ degenerate covariances
@pytest.mark.parametrize("act", ACTS)
def test_degenerate_covariances_give_no_nan(act):
    Sig = _cov(6)  # contains rho = +1, rho = -1 and a zero-variance point
    for orders in ALL_ORDERS:
        if act == "relu" and 2 in orders:
            continue  # a delta at zero variance is +inf by convention (tested below)
        M = G.expect(act, Sig, orders)
        assert np.all(np.isfinite(M)), (act, orders)
    # rho = +1: the pair is one variable; the repeated point's row equals the original's
    i, j = 0, len(Sig) - 3
    M = G.expect(act, Sig, (0, 0))
    assert abs(M[i, j] - M[i, i]) < 1e-10
    d = G.derivative_kernel(act, Sig)
    assert abs(d[i, j] - d[i, i]) < 1e-10


def test_degenerate_closed_form_values():
    s = 1.7
    # rho = -1: E[relu(u) relu(-u)] = 0, E[step(u) step(-u)] = 0, erf: -E[erf(u)^2]
    assert G.expect_pairs("relu", s, s, -s) == pytest.approx(0.0, abs=1e-15)
    assert G.expect_pairs("relu", s, s, -s, (1, 1)) == pytest.approx(0.0, abs=1e-15)
    assert G.expect_pairs("erf", s, s, -s) == pytest.approx(-G.expect_pairs("erf", s, s, s))
    # rho = +1 diagonal values
    assert G.expect_pairs("relu", s, s, s) == pytest.approx(s / 2)
    assert G.expect_pairs("relu", s, s, s, (1, 1)) == pytest.approx(0.5)
    assert G.expect_pairs("erf", s, s, s) == pytest.approx(2 / np.pi * np.arcsin(2 * s / (1 + 2 * s)))
    # zero variance: relu(0) = relu'(0) = 0; tanh'(0) = 1 so E[tanh'(0) tanh'(u)] = E[tanh'(u)]
    assert G.expect_pairs("relu", 0.0, s, 0.0, (1, 1)) == 0.0
    assert G.expect_pairs("relu", 0.0, s, 0.0, (0, 0)) == 0.0
    assert G.expect_pairs("tanh", 0.0, s, 0.0, (1, 1)) == pytest.approx(
        float(G.expect1("tanh", s, 1)), abs=1e-12)
    assert G.expect_pairs("erf", 0.0, 0.0, 0.0, (1, 1)) == pytest.approx(4 / np.pi)
    # deltas at zero variance or |rho| = 1: documented +inf, never NaN
    assert G.expect_pairs("relu", s, s, s, (2, 2)) == np.inf
    assert G.expect_pairs("relu", s, 0.0, 0.0, (0, 2)) == np.inf
    assert G.expect_pairs("relu", s, s, s, (0, 2)) == 0.0
    assert G.expect_pairs("relu", s, s, s, (1, 2)) == pytest.approx(1 / (2 * np.sqrt(2 * np.pi * s)))


def test_gaussian_bad_input():
    with pytest.raises(ValueError, match="activation 'swish' is unknown"):
        G.expect("swish", np.eye(2))
    with pytest.raises(ValueError, match="orders must be a pair"):
        G.expect("tanh", np.eye(2), (0, 3))
    with pytest.raises(ValueError, match="not positive semidefinite"):
        G.expect("tanh", np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="negative variance"):
        G.expect("erf", np.array([[-1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        G.expect("erf", np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        G.expect("erf", np.array([[1.0, 0.5], [0.1, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        G.expect("erf", np.ones((2, 3)))
    with pytest.raises(ValueError, match="Dirac delta"):
        G.expect("relu", np.eye(2), (2, 0), method="quadrature")
    with pytest.raises(ValueError, match="no closed form"):
        G.expect("tanh", np.eye(2), method="closed")
    with pytest.raises(ValueError, match="order must be an integer >= 2"):
        G.expect("tanh", np.eye(2), order=1)
    with pytest.raises(ValueError, match="rule must be"):
        G.quad_rule(10, "simpson")


# ------------------------------------------------------------------ static kernels
def _data(seed=0, P=6, Q=3, D=5, scale=1.0):
    rng = np.random.default_rng(seed)
    X = scale * rng.normal(size=(P, D))
    y = rng.normal(size=P)
    Xt = scale * rng.normal(size=(Q, D)) if Q else None
    yt = rng.normal(size=Q) if Q else None
    return dmft.Dataset(X, y, Xt, yt)


@pytest.mark.parametrize("act", ACTS)
def test_static_kernels_symmetric_psd(act):
    data = _data(1)
    k = S.static_kernels(act, data.kx, 3)
    for name in ("phi", "g", "gdot"):
        for M in k[name]:
            np.testing.assert_array_equal(M, M.T)
            assert np.linalg.eigvalsh(M).min() > -1e-12 * np.abs(M).max(), (act, name)
    K = k["ntk"]
    np.testing.assert_allclose(K, K.T, rtol=0, atol=1e-14)
    lam = np.linalg.eigvalsh(K)
    if act == "linear":  # K = (L + 1) X X^T / D has rank D = 5 < n = 9
        assert lam.min() > -1e-12 * lam.max()
    else:  # nonlinear kernels of distinct points are positive definite
        assert lam.min() > 1e-6 * lam.max()


def test_static_kernels_linear_and_relu_identities():
    data = _data(2)
    kx = data.kx
    X = data.X
    L = 3
    lin = S.static_kernels("linear", kx, L)
    # Phi^l = Phi^0 = X X^T / D for every layer (diag = input norms / D), G = 1, K = (L+1) Kx
    np.testing.assert_allclose(np.diag(kx), (X * X).sum(1) / data.D)
    for l in range(L):
        np.testing.assert_allclose(lin["phi"][l], kx, atol=1e-15)
        np.testing.assert_array_equal(lin["g"][l], 1.0)
    np.testing.assert_allclose(lin["ntk"], (L + 1) * kx, atol=1e-14)
    # relu: E[relu(u)^2] = var / 2 and E[relu'(u)^2] = 1/2, so diag Phi^l = diag Kx / 2^l,
    # diag G^l = 2^-(L - l + 1) and diag K = (L + 1) diag Kx / 2^L
    relu = S.static_kernels("relu", kx, L)
    for l in range(1, L + 1):
        np.testing.assert_allclose(np.diag(relu["phi"][l - 1]), np.diag(kx) / 2 ** l)
        np.testing.assert_allclose(np.diag(relu["g"][l - 1]), 0.5 ** (L - l + 1))
    np.testing.assert_allclose(np.diag(relu["ntk"]), (L + 1) * np.diag(kx) / 2 ** L)


def test_static_ntk_two_layer_formula():
    # L = 1: K = G^1 Phi^0 + Phi^1 = E[phi' phi'] * Kx + E[phi phi], written out for erf
    data = _data(3)
    kx = data.kx
    d = np.diag(kx)
    A = 1 + 2 * d
    nngp = 2 / np.pi * np.arcsin(2 * kx / np.sqrt(np.outer(A, A)))
    dk = 4 / (np.pi * np.sqrt(np.outer(A, A) - 4 * kx ** 2))
    k = S.static_kernels("erf", kx, 1)
    np.testing.assert_allclose(k["ntk"], dk * kx + nngp, rtol=1e-13)


# ------------------------------------------------------------------ dynamics
def test_frozen_dynamics_equals_discrete_time_formula():
    data = _data(4)
    K = S.static_kernels("tanh", data.kx, 2)["ntk"]
    P, y, T = data.P, data.y_train, 40
    lr = 0.9 * S.stable_lr(K[:P, :P])
    f = S.frozen_dynamics(K, y, lr, T)
    Kp = K[:P, :P]
    I = np.eye(P)
    for t in (0, 1, 7, 40):
        direct = (I - np.linalg.matrix_power(I - lr * Kp, t)) @ y
        np.testing.assert_allclose(f[t, :P], direct, rtol=0, atol=1e-12)
    np.testing.assert_allclose(f, S.frozen_dynamics_closed_form(K, y, lr, T), rtol=0,
                               atol=1e-11)
    # test points: f_test(t) = K_test,train K_train^-1 f_train(t)
    np.testing.assert_allclose(f[:, P:], f[:, :P] @ np.linalg.solve(Kp, K[:P, P:]),
                               rtol=0, atol=1e-10)


def test_frozen_dynamics_tends_to_gradient_flow():
    # at small lr the discrete dynamics approach f(t) = (I - exp(-K t)) y with error O(lr)
    data = _data(5, Q=0)
    K = S.static_kernels("erf", data.kx, 2)["ntk"]
    y = data.y_train
    lam, V = np.linalg.eigh(K)
    tmax = 2.0
    errs = []
    for lr in (0.02, 0.01):
        f = S.frozen_dynamics(K, y, lr, int(round(tmax / lr)))
        flow = V @ ((1 - np.exp(-lam * tmax)) * (V.T @ y))
        errs.append(np.abs(f[-1] - flow).max())
    assert errs[1] < errs[0] < 0.1
    assert errs[0] / errs[1] == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("act", ACTS)
def test_solve_static_solution_contract(act):
    data = _data(6)
    train = dmft.GradientDescent(gamma0=0.0, lr=0.1, steps=12)
    L, T, P, Q = 2, 12, data.P, data.Q
    n = P + Q
    sol = dmft.solve(dmft.MLP(L, act), data, train, method="static")
    assert sol.method == "static"
    assert sol.t.shape == (T + 1,) and np.allclose(sol.t, 0.1 * np.arange(T + 1))
    assert sol.train_predictions.shape == (T + 1, P)
    assert sol.test_predictions.shape == (T + 1, Q)
    assert sol.ntk.shape == (T + 1, n, n)
    assert sol.phi.shape == sol.g.shape == (L, T + 1, T + 1, n, n)
    assert sol.A is None and sol.B is None
    assert sol.converged is True and sol.iterations == 0 and sol.stderr == {}
    assert sol.train_loss.shape == (T + 1,) and sol.test_loss.shape == (T + 1,)
    assert sol.elapsed >= 0
    for arr in (sol.phi, sol.g, sol.ntk):  # real arrays, not broadcast views
        assert arr.flags.owndata and arr.flags.writeable
    k = S.static_kernels(act, data.kx, L)
    np.testing.assert_array_equal(sol.ntk, np.broadcast_to(k["ntk"], sol.ntk.shape))
    np.testing.assert_array_equal(sol.phi[:, 3, 7], k["phi"])
    np.testing.assert_array_equal(sol.g[:, 5, 0], k["g"])
    np.testing.assert_array_equal(sol.phi[:, 0, 0], sol.phi[:, T, T])
    np.testing.assert_array_equal(sol.train_predictions[0], 0.0)
    f = S.frozen_dynamics(k["ntk"], data.y_train, 0.1, T)
    np.testing.assert_array_equal(sol.predictions, f)
    assert sol.train_loss[-1] < sol.train_loss[0]
    # gamma0 does not matter; the method is deterministic
    sol2 = dmft.solve(dmft.MLP(L, act), data, dmft.GradientDescent(gamma0=3.0, lr=0.1,
                                                                 steps=12),
                      method="static", seed=7)
    np.testing.assert_array_equal(sol2.predictions, sol.predictions)
    assert sol2.seed == 7


def test_solve_static_without_test_points_and_quad_order():
    data = _data(7, Q=0)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=5)
    net = dmft.MLP(2, "tanh")
    sol = dmft.solve(net, data, train, method="static")
    assert sol.test_predictions.shape == (6, 0) and sol.test_loss is None
    sol2 = dmft.solve(net, data, train, method="static", quad_order=301)
    np.testing.assert_allclose(sol2.ntk, sol.ntk, rtol=0, atol=1e-10)
    assert sol2.options["quad_order"] == 301


def test_unstable_learning_rate_is_detected():
    data = _data(8)
    net = dmft.MLP(2, "relu")
    lam = np.linalg.eigvalsh(S.static_kernels("relu", data.kx, 2)["ntk"][:data.P, :data.P])
    lr_max = 2 / lam.max()
    ok = dmft.solve(net, data, dmft.GradientDescent(lr=0.99 * lr_max, steps=30),
                    method="static")
    assert ok.converged
    bad = dmft.GradientDescent(lr=1.05 * lr_max, steps=30)
    with pytest.raises(ConvergenceError, match=r"largest stable learning rate is "
                       r"2 / lambda_max = " + f"{lr_max:.6g}") as info:
        dmft.solve(net, data, bad, method="static")
    assert info.value.result is not None and not info.value.result.converged
    sol = dmft.solve(net, data, bad, method="static", throw=False)
    assert not sol.converged
    # the error really grows along the top eigenvector
    assert sol.train_loss[-1] > sol.train_loss[0]


def test_solve_static_bad_options():
    data = _data(9)
    net, train = dmft.MLP(1, "tanh"), dmft.GradientDescent(lr=0.1, steps=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) for method='static': "
                                         r"\['samples'\]"):
        dmft.solve(net, data, train, method="static", samples=100)
    with pytest.raises(ValueError, match="quad_order must be an integer >= 2"):
        dmft.solve(net, data, train, method="static", quad_order=1)
    with pytest.raises(ValueError, match="quad_tol must be a number in"):
        dmft.solve(net, data, train, method="static", quad_tol=2.0)


def test_huge_variance_is_refused_with_a_remedy():
    with pytest.raises(ValueError, match="rescale the inputs"):
        G.auto_order(5000.0)
    data = _data(10, scale=100.0)  # |x|^2 / D ~ 1e4: tanh quadrature would need ~5000 nodes
    with pytest.raises(ConvergenceError, match="rescale the inputs"):
        dmft.solve(dmft.MLP(1, "tanh"), data, dmft.GradientDescent(lr=1e-4, steps=2),
                   method="static")
    # closed forms have no such limit
    sol = dmft.solve(dmft.MLP(1, "erf"), data, dmft.GradientDescent(lr=1e-5, steps=2),
                     method="static")
    assert np.all(np.isfinite(sol.ntk))
