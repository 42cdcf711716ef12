"""Tests of the finite-width simulator (solvers/network.py, dmft.simulate).

What they prove:
- the simulated NTK equals gamma0^2 N J J^T with J the finite-difference Jacobian of an
  independently written forward pass (every activation, depth 1..3, at init and after steps);
- the recorded features, backward fields and two-time kernels equal those of independent
  per-point code at three times;
- one gradient step equals theta - lr gamma0^2 N dLoss/dtheta with finite-difference gradients of
  the loss (plain and centred model);
- exact discrete-time identities of the two-layer linear network (docs/theory.rst §3) hold per
  network to machine precision, and the ensemble mean matches the infinite-width recursion
  within its standard error;
- N Var f(0) = Phi^L(0,0) / gamma0^2, E K(0) = the infinite-width NTK (quadrature / closed form)
  and N Var K(0) = its exact two-layer value, within sampling errors; Var K(T) ~ 1/N (slope);
- the pending low-rank weight updates (any fold schedule) equal dense updates to rounding, and
  the LowRank matrix equals a plain NumPy array; test points are passive;
- bit-for-bit seed reproducibility, validation messages, divergence errors.
"""
import math

import numpy as np
import pytest
from scipy import special

import dmft
from conftest import one_point_recursion
from dmft.results import ConvergenceError
from solvers import network

ACTS = ["linear", "tanh", "relu", "erf"]

#: every tolerance of this file, with where it comes from
TOL = {
    # central differences with eps = 1e-6 on O(1) weights: truncation ~eps^2, round-off
    # ~1e-16 / eps ~ 1e-10 relative, so 1e-6 leaves a wide margin; convention errors are O(1)
    "fd": dict(rtol=1e-6, atol=1e-8),
    "fd_weights": dict(rtol=1e-6, atol=1e-9),      # step = lr gamma0^2 N * FD gradient
    "fd_predictions": dict(rtol=1e-7, atol=1e-9),  # forward pass at FD-stepped weights
    # the same arithmetic associated differently (BLAS blocking, pending low-rank factors)
    "rounding": dict(rtol=1e-11, atol=1e-13),
    "exact": dict(rtol=1e-13, atol=1e-14),         # identical operations up to summation order
    # Monte Carlo over seeds: |estimate - exact| < N_SIGMA standard errors
    "n_sigma": 4,
    "n_sigma_var": 5,                              # sample variances (chi-square, heavier tail)
}

# --- independent reference code (written separately from solvers.network) -------------------
_PHI = {
    "linear": (lambda x: x, lambda x: 1.0),
    "tanh": (math.tanh, lambda x: 1.0 - math.tanh(x) ** 2),
    "relu": (lambda x: max(x, 0.0), lambda x: 1.0 if x > 0 else 0.0),
    "erf": (math.erf, lambda x: 2.0 / math.sqrt(math.pi) * math.exp(-x * x)),
}


def _pack(wts):
    return np.concatenate([wts.W0.ravel()] + [W.ravel() for W in wts.W] + [wts.w])


def _unpack(theta, N, D, L):
    W0 = theta[:N * D].reshape(N, D)
    pos = N * D
    Ws = []
    for _ in range(L - 1):
        Ws.append(theta[pos:pos + N * N].reshape(N, N))
        pos += N * N
    return W0, Ws, theta[pos:pos + N]


def _ref_fields(theta, X, N, L, act, gamma0):
    """Per-point loops: pre-activations h[l][mu], features, backward fields, outputs f."""
    phi, dphi = _PHI[act]
    W0, Ws, w = _unpack(theta, N, X.shape[1], L)
    n, D = X.shape
    H = np.zeros((L, n, N))
    F = np.zeros((L, n, N))
    Gf = np.zeros((L, n, N))
    f = np.zeros(n)
    for mu in range(n):
        for i in range(N):
            H[0, mu, i] = sum(W0[i, j] * X[mu, j] for j in range(D)) / math.sqrt(D)
            F[0, mu, i] = phi(H[0, mu, i])
        for l in range(1, L):
            for i in range(N):
                H[l, mu, i] = sum(Ws[l - 1][i, j] * F[l - 1, mu, j]
                                  for j in range(N)) / math.sqrt(N)
                F[l, mu, i] = phi(H[l, mu, i])
        f[mu] = sum(w[i] * F[L - 1, mu, i] for i in range(N)) / (gamma0 * N)
        for i in range(N):
            Gf[L - 1, mu, i] = dphi(H[L - 1, mu, i]) * w[i]
        for l in range(L - 2, -1, -1):
            for j in range(N):
                z = sum(Ws[l][i, j] * Gf[l + 1, mu, i] for i in range(N)) / math.sqrt(N)
                Gf[l, mu, j] = dphi(H[l, mu, j]) * z
    return H, F, Gf, f


def _ref_output(theta, X, N, L, act, gamma0):
    """Vectorised forward pass (own code) used for finite differences."""
    phi = {"linear": lambda x: x, "tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0),
           "erf": special.erf}[act]
    W0, Ws, w = _unpack(theta, N, X.shape[1], L)
    a = phi(W0 @ X.T / math.sqrt(X.shape[1]))            # (N, n)
    for W in Ws:
        a = phi(W @ a / math.sqrt(N))
    return w @ a / (gamma0 * N)


def _fd_jacobian(theta, X, N, L, act, gamma0, eps=1e-6):
    J = np.empty((X.shape[0], theta.size))
    for k in range(theta.size):
        tp, tm = theta.copy(), theta.copy()
        tp[k] += eps
        tm[k] -= eps
        J[:, k] = (_ref_output(tp, X, N, L, act, gamma0) -
                   _ref_output(tm, X, N, L, act, gamma0)) / (2 * eps)
    return J


def _problem(P=3, Q=2, D=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    y = rng.standard_normal(P)
    return X, y


# --- (a) NTK against brute-force parameter Jacobians -----------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("L", [1, 2, 3])
def test_ntk_equals_bruteforce_jacobian_ntk(act, L):
    N, gamma0, lr, steps = 7, 0.8, 0.2, 3
    X, y = _problem()
    wts = network.Weights.draw(np.random.default_rng(10 + L), X.shape[1], N, L)
    theta0 = _pack(wts)
    # fold_every=2 over 3 steps: one fold mid-run and pending factors in the last passes
    res = network.train(X, y, wts, activation=act, gamma0=gamma0, lr=lr, steps=steps,
                        fold_every=2)
    for k, theta in ((0, theta0), (steps, _pack(wts))):
        H, _, _, f = _ref_fields(theta, X, N, L, act, gamma0)
        if act == "relu":   # finite differences are valid only away from the kinks
            assert np.abs(H).min() > 1e-4
        J = _fd_jacobian(theta, X, N, L, act, gamma0)
        K_bf = gamma0 ** 2 * N * J @ J.T
        np.testing.assert_allclose(res["ntk"][k], K_bf, **TOL["fd"])
        np.testing.assert_allclose(res["predictions"][k], f, **TOL["rounding"])
    # training moved the kernel: the comparison after steps is not the t = 0 one again
    assert np.abs(res["ntk"][steps] - res["ntk"][0]).max() > 1e-3


# --- (b) one gradient step against finite-difference loss gradients ---------------------------
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("act,L", [("tanh", 3), ("relu", 2), ("erf", 1), ("linear", 2)])
def test_one_step_matches_explicit_loss_gradient(act, L, center):
    N, gamma0, lr = 7, 1.3, 0.05
    X, y = _problem(seed=3)
    P = y.size
    wts = network.Weights.draw(np.random.default_rng(5), X.shape[1], N, L)
    theta0 = _pack(wts)
    f_init = _ref_output(theta0, X, N, L, act, gamma0)

    def loss(theta):
        f = _ref_output(theta, X, N, L, act, gamma0)
        if center:
            f = f - f_init
        return 0.5 * np.sum((f[:P] - y) ** 2)

    eps = 1e-6
    grad = np.empty_like(theta0)
    for k in range(theta0.size):
        tp, tm = theta0.copy(), theta0.copy()
        tp[k] += eps
        tm[k] -= eps
        grad[k] = (loss(tp) - loss(tm)) / (2 * eps)
    theta1 = theta0 - lr * gamma0 ** 2 * N * grad

    res = network.train(X, y, wts, activation=act, gamma0=gamma0, lr=lr, steps=1, center=center)
    step = theta1 - theta0
    assert np.abs(step).max() > 1e-3        # the step is not negligible against the tolerance
    np.testing.assert_allclose(_pack(wts) - theta0, step, **TOL["fd_weights"])
    f1 = _ref_output(theta1, X, N, L, act, gamma0) - (f_init if center else 0.0)
    np.testing.assert_allclose(res["predictions"][1], f1, **TOL["fd_predictions"])
    if center:
        assert np.all(res["predictions"][0] == 0.0)
        np.testing.assert_allclose(res["f0"], f_init, **TOL["rounding"])


@pytest.mark.parametrize("act,L", [("tanh", 3), ("relu", 2)])
def test_low_rank_pending_updates_match_dense(act, L):
    """Every fold schedule (fold each step, every 3 steps, never) gives the same trajectory
    and the same final weights up to rounding; the last fold is optional."""
    X, y = _problem(P=3, Q=2, D=5, seed=7)
    kw = dict(activation=act, gamma0=1.2, lr=0.2, steps=8, record_kernels=True)
    w0 = network.Weights.draw(np.random.default_rng(3), 5, 24, L)
    runs = {}
    for k in (1, 3, 100):
        w = w0.copy()
        runs[k] = (network.train(X, y, w, fold_every=k, fold_at_end=(k != 100), **kw), w)
    assert runs[100][1].layers[1].r == 3 * 8          # nothing was folded in that run
    ref, wref = runs[1]
    for k in (3, 100):
        res, w = runs[k]
        for key in ("predictions", "ntk", "phi", "g"):
            np.testing.assert_allclose(res[key], ref[key], **TOL["rounding"])
        np.testing.assert_allclose(_pack(w), _pack(wref), **TOL["rounding"])
    assert runs[100][1].layers[1].r == 0             # reading the weights folded them
    with pytest.raises(ValueError, match="fold_every must be a positive integer"):
        network.train(X, y, w0.copy(), fold_every=0, **kw)


def test_low_rank_matrix_against_plain_numpy():
    """LowRank (W = Wd + Ut^T Vt, blocked fold) against a plain dense array, with more rows
    than one fold block and adds that overflow the buffer."""
    rng = np.random.default_rng(0)
    rows, cols = network.FOLD_BLOCK * 2 + 37, 11
    W = rng.standard_normal((rows, cols))
    m = network.LowRank(W.copy())
    m.reserve(5)
    A, B = rng.standard_normal((4, cols)), rng.standard_normal((4, rows))
    for k in (2, 3, 4, 1, 6):         # 2+3 fills the buffer, 4 forces a fold, 6 > capacity
        u, v = rng.standard_normal((k, rows)), rng.standard_normal((k, cols))
        m.add(u, v)
        W += u.T @ v
        np.testing.assert_allclose(m.matmul_t(A), A @ W.T, **TOL["rounding"])
        np.testing.assert_allclose(m.matmul(B), B @ W, **TOL["rounding"])
    assert m.r == 6
    np.testing.assert_allclose(m.dense(), W, **TOL["rounding"])
    assert m.r == 0


def test_test_points_are_passive():
    """Adding test points changes no training quantity (they never enter Delta)."""
    X, y = _problem(P=3, Q=4, seed=8)
    kw = dict(activation="tanh", gamma0=1.0, lr=0.3, steps=5)
    r_all = network.train(X, y, network.Weights.draw(np.random.default_rng(2), 3, 16, 2), **kw)
    r_tr = network.train(X[:3], y, network.Weights.draw(np.random.default_rng(2), 3, 16, 2), **kw)
    np.testing.assert_allclose(r_all["predictions"][:, :3], r_tr["predictions"],
                               **TOL["exact"])
    np.testing.assert_allclose(r_all["ntk"][:, :3, :3], r_tr["ntk"], **TOL["exact"])


# --- (d) two-time kernels: against independent fields, and consistent with the NTK ------------
@pytest.mark.parametrize("act,L", [("tanh", 3), ("relu", 2), ("erf", 1)])
def test_two_time_kernels_match_reference_fields(act, L):
    N, gamma0, lr = 6, 1.0, 0.3
    X, y = _problem(seed=4)
    wts0 = network.Weights.draw(np.random.default_rng(9), X.shape[1], N, L)
    w1 = wts0.copy()
    network.train(X, y, w1, activation=act, gamma0=gamma0, lr=lr, steps=1)
    w2 = wts0.copy()
    res = network.train(X, y, w2, activation=act, gamma0=gamma0, lr=lr, steps=2,
                        record_kernels=True)
    fields = [_ref_fields(_pack(w), X, N, L, act, gamma0) for w in (wts0, w1, w2)]
    for l in range(L):
        for t in range(3):
            for s in range(3):
                Phi = fields[t][1][l] @ fields[s][1][l].T / N
                G = fields[t][2][l] @ fields[s][2][l].T / N
                np.testing.assert_allclose(res["phi"][l, t, s], Phi, **TOL["rounding"])
                np.testing.assert_allclose(res["g"][l, t, s], G, **TOL["rounding"])


@pytest.mark.parametrize("L", [1, 2, 3])
def test_record_kernels_consistent_with_ntk(L):
    X, y = _problem(P=4, Q=2, D=5, seed=1)
    data = dmft.Dataset(X[:4], y, X[4:])
    train = dmft.GradientDescent(gamma0=1.5, lr=0.2, steps=6)
    ens = dmft.simulate(dmft.MLP(L, "tanh"), data, train, width=64, seeds=[0, 1],
                        record_kernels=True)
    S, T1, n = 2, 7, 6
    assert ens.phi.shape == ens.g.shape == (S, L, T1, T1, n, n)
    kx = data.kx
    t = np.arange(T1)
    for i in range(S):
        phi_tt = ens.phi[i][:, t, t]                  # (L, T+1, n, n)
        g_tt = ens.g[i][:, t, t]
        K = kx * g_tt[0] + phi_tt[L - 1]
        for l in range(1, L):
            K = K + g_tt[l] * phi_tt[l - 1]
        np.testing.assert_allclose(ens.ntk[i], K, **TOL["rounding"])
        # symmetry in (t, mu) <-> (s, nu); exact symmetry of the NTK
        np.testing.assert_allclose(ens.phi[i], ens.phi[i].transpose(0, 2, 1, 4, 3), rtol=0,
                                   atol=TOL["exact"]["atol"])
        np.testing.assert_allclose(ens.g[i], ens.g[i].transpose(0, 2, 1, 4, 3), rtol=0,
                                   atol=TOL["exact"]["atol"])
        assert np.array_equal(ens.ntk[i], ens.ntk[i].transpose(0, 2, 1))
        assert np.linalg.eigvalsh(ens.ntk[i]).min() > -1e-12
    # the NTK without record_kernels is the same numbers
    ens2 = dmft.simulate(dmft.MLP(L, "tanh"), data, train, width=64, seeds=[0, 1])
    assert np.array_equal(ens2.ntk, ens.ntk) and ens2.phi is None and ens2.g is None


# --- exact discrete-time identities and the infinite-width limit (docs/theory.rst §3) -------
def _one_point_data(D=4):
    x = np.ones((1, D))      # |x|^2 / D = 1
    return dmft.Dataset(x, [0.7], np.array([[1.0, -1.0, 0.5, 2.0]]))


def test_two_layer_linear_exact_recursion_per_network():
    """Each unit maps h <- h + a w, w <- w + a h with a = lr gamma0 Delta, so every network's
    own K_t and f_t obey K_{t+1} = (1+a^2) K_t + 4 a gamma0 f_t and
    f_{t+1} = (1+a^2) f_t + a K_t / gamma0 (docs/theory.rst §3)."""
    data = _one_point_data()
    gamma0, lr = 1.7, 0.15
    ens = dmft.simulate(dmft.MLP(1, "linear"), data, dmft.GradientDescent(gamma0, lr, 12),
                        width=300, seeds=[4, 5, 6])
    f = ens.train_predictions[:, :, 0]
    K = ens.ntk[:, :, 0, 0]
    a = lr * gamma0 * (0.7 - f[:, :-1])
    np.testing.assert_allclose(K[:, 1:], (1 + a ** 2) * K[:, :-1] + 4 * a * gamma0 * f[:, :-1],
                               rtol=TOL["rounding"]["rtol"])
    np.testing.assert_allclose(f[:, 1:], (1 + a ** 2) * f[:, :-1] + a * K[:, :-1] / gamma0,
                               **TOL["rounding"])
    assert np.abs(f[:, -1] - 0.7).max() < 0.05   # and it did train


def test_two_layer_linear_ensemble_mean_matches_infinite_width():
    """Mean over seeds of wide networks equals the N -> infinity recursion (K_0 = 2, f_0 = 0)
    within 4 standard errors; N is large enough that the O(1/N) bias is < 0.1 stderr."""
    data = _one_point_data()
    gamma0, lr, T, y = 1.0, 0.1, 30, 0.7
    ens = dmft.simulate(dmft.MLP(1, "linear"), data, dmft.GradientDescent(gamma0, lr, T),
                        width=2 ** 15, seeds=range(12))
    f, K = one_point_recursion(gamma0, y, lr, T)
    m, v = ens.mean(), ens.var()
    se_f = m.stderr["train_predictions"][:, 0]
    se_K = m.stderr["ntk"][:, 0, 0]
    assert np.all(np.abs(m.train_predictions[:, 0] - f) < TOL["n_sigma"] * se_f)
    assert np.all(np.abs(m.ntk[:, 0, 0] - K) < TOL["n_sigma"] * se_K + 1e-12)
    assert K[-1] > 2.3     # feature learning moved the kernel well beyond the noise
    assert v.train_predictions.shape == (T + 1, 1)


def test_initial_output_variance():
    """Var f(0) = Phi^1(0,0) / (gamma0^2 N) for a two-layer net (w independent of h), checked
    within 5 sampling standard errors of a variance, sqrt(2 / (S - 1))."""
    S, N, gamma0 = 1500, 32, 0.5
    X = np.array([[1.0, 0.5, -1.0], [0.2, -2.0, 0.3]])
    data = dmft.Dataset(X, [0.0, 0.0])
    ens = dmft.simulate(dmft.MLP(1, "linear"), data, dmft.GradientDescent(gamma0, 0.1, 1),
                        width=N, seeds=range(S))
    var = ens.train_predictions[:, 0].var(axis=0, ddof=1)
    expected = data.kx.diagonal() / (gamma0 ** 2 * N)
    np.testing.assert_allclose(var / expected, 1.0,
                               atol=TOL["n_sigma_var"] * math.sqrt(2 / (S - 1)))


def _gauss2(f, C, n=48):
    """E[f(u1, u2)] for u ~ N(0, C) (2 x 2) by tensor Gauss-Hermite quadrature."""
    z, wq = np.polynomial.hermite_e.hermegauss(n)
    wq = wq / wq.sum()
    lam, V = np.linalg.eigh(C)          # C may be singular (mu = nu): no Cholesky
    R = V * np.sqrt(np.clip(lam, 0, None))
    Z1, Z2 = np.meshgrid(z, z, indexing="ij")
    u1 = R[0, 0] * Z1 + R[0, 1] * Z2
    u2 = R[1, 0] * Z1 + R[1, 1] * Z2
    return float(np.sum(np.outer(wq, wq) * f(u1, u2)))


@pytest.mark.parametrize("act,L", [("tanh", 1), ("linear", 3)])
def test_initial_ntk_mean_is_infinite_width_value(act, L):
    """At t = 0 every kernel is an average over independent units, so E[K(0)] equals the
    infinite-width NTK at any width: tanh L = 1 by quadrature, K = Phi^1 + G^1 K^x with
    Phi^1 = <tanh u tanh u'>, G^1 = <tanh' u tanh' u'>; linear L = 3: K = 4 K^x."""
    X = np.array([[1.0, 0.3, -0.5], [-0.4, 1.2, 0.8], [0.5, 0.5, 0.5]])
    data = dmft.Dataset(X[:2], [0.0, 0.0], X[2:])
    kx = data.kx
    if act == "linear":
        K_inf = 4 * kx
    else:
        K_inf = np.empty((3, 3))
        for a in range(3):
            for b in range(3):
                C = kx[np.ix_([a, b], [a, b])]
                phi = _gauss2(lambda u, v: np.tanh(u) * np.tanh(v), C)
                dd = _gauss2(lambda u, v: (1 - np.tanh(u) ** 2) * (1 - np.tanh(v) ** 2), C)
                K_inf[a, b] = phi + dd * kx[a, b]
    ens = dmft.simulate(dmft.MLP(L, act), data, dmft.GradientDescent(1.0, 0.1, 1), width=128,
                        seeds=range(40))
    m = ens.mean()
    se = m.stderr["ntk"][0]
    assert np.all(np.abs(m.ntk[0] - K_inf) < TOL["n_sigma"] * se)
    assert se.max() < 0.05 * np.abs(K_inf).max()     # the check has teeth


def test_ntk_fluctuations_scale_as_one_over_width():
    """Two-layer linear net: K(0) = sum_i (h_i h_i^T + w_i^2 K^x) / N with independent Gaussian
    units, so N Var K_{mu nu}(0) = K^x_{mu mu} K^x_{nu nu} + 3 (K^x_{mu nu})^2 exactly; checked
    within 5 sampling errors of a variance. After training, Var K(T) falls as 1/N: the fitted
    slope over widths 64 -> 1024 is -1 within 5 standard errors plus 0.03 for O(1/N^2) terms."""
    X = np.array([[1.0, 0.3, -0.5], [-0.4, 1.2, 0.8]])
    data = dmft.Dataset(X, [1.0, -0.5])
    kx = data.kx
    train = dmft.GradientDescent(gamma0=1.5, lr=0.2, steps=10)
    S = 1500
    var = {}
    for N in (64, 1024):
        ens = dmft.simulate(dmft.MLP(1, "linear"), data, train, width=N, seeds=range(S))
        var[N] = ens.ntk.var(axis=0, ddof=1)
        if N == 64:
            expected = np.outer(kx.diagonal(), kx.diagonal()) + 3 * kx ** 2
            np.testing.assert_allclose(N * var[N][0] / expected, 1.0,
                                       atol=TOL["n_sigma_var"] * math.sqrt(2 / (S - 1)))
    slope = np.log(var[1024][-1] / var[64][-1]) / np.log(1024 / 64)
    se_slope = math.sqrt(2 * 2 / (S - 1)) / np.log(1024 / 64)
    assert np.all(np.abs(slope + 1) < TOL["n_sigma_var"] * se_slope + 0.03), slope


# --- (c) reproducibility ----------------------------------------------------------------------
def test_seed_reproducibility_bit_for_bit():
    X, y = _problem(P=3, Q=1, D=4, seed=2)
    data = dmft.Dataset(X[:3], y, X[3:])
    net, train = dmft.MLP(2, "relu"), dmft.GradientDescent(1.0, 0.2, 5)
    a = dmft.simulate(net, data, train, width=40, seeds=[3, 7], record_kernels=True)
    b = dmft.simulate(net, data, train, width=40, seeds=[3, 7], record_kernels=True)
    for name in ("train_predictions", "test_predictions", "ntk", "phi", "g"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    # a network depends on its own seed only, not on the rest of the ensemble
    c = dmft.simulate(net, data, train, width=40, seeds=[7, 11], record_kernels=True)
    assert np.array_equal(c.ntk[0], a.ntk[1]) and np.array_equal(c.phi[0], a.phi[1])
    assert not np.allclose(a.ntk[0], a.ntk[1])
    assert a.seeds.dtype.kind == "i" and list(a.seeds) == [3, 7]


def test_ensemble_fields_and_center():
    X, y = _problem(P=3, Q=2, seed=6)
    data = dmft.Dataset(X[:3], y, X[3:], y_test=[0.1, -0.2])
    net, train = dmft.MLP(2, "erf"), dmft.GradientDescent(0.7, 0.25, 4)
    raw = dmft.simulate(net, data, train, width=32, seeds=range(3))
    cen = dmft.simulate(net, data, train, width=32, seeds=range(3), center=True)
    assert raw.train_predictions.shape == (3, 5, 3) and raw.test_predictions.shape == (3, 5, 2)
    assert raw.ntk.shape == (3, 5, 5, 5) and raw.train_loss.shape == (3, 5)
    assert raw.test_loss.shape == (3, 5)
    np.testing.assert_array_equal(raw.t, train.times)
    assert np.all(cen.train_predictions[:, 0] == 0) and np.all(cen.test_predictions[:, 0] == 0)
    np.testing.assert_array_equal(cen.extras["f0"], raw.predictions[:, 0])
    np.testing.assert_array_equal(cen.ntk[:, 0], raw.ntk[:, 0])   # same initial network
    assert not np.allclose(cen.ntk[:, -1], raw.ntk[:, -1])        # different training signal
    assert cen.center and not raw.center
    assert cen.options["center"] is True and raw.options["record_kernels"] is False
    assert raw.elapsed > 0 and raw.width == 32
    assert np.all(raw.train_loss[:, -1] < raw.train_loss[:, 0])


# --- (e) validation -------------------------------------------------------------------------
def _small():
    X, y = _problem(P=2, Q=0, D=2, seed=0)
    return dmft.MLP(1, "tanh"), dmft.Dataset(X, y), dmft.GradientDescent(1.0, 0.1, 2)


@pytest.mark.parametrize("width", [0, -3, 2.5, "64", True, None])
def test_bad_width(width):
    net, data, train = _small()
    with pytest.raises(ValueError, match=r"width must be a positive integer.*hidden units"):
        dmft.simulate(net, data, train, width=width, seeds=[0])


@pytest.mark.parametrize("seeds,match", [
    ([], r"seeds is empty"),
    (5, r"seeds must be a non-empty iterable.*range\(16\)"),
    ("01", r"seeds must be a non-empty iterable"),
    (None, r"seeds must be a non-empty iterable"),
    ([0, -1], r"seeds must hold non-negative integers, got -1"),
    ([0, 1.5], r"seeds must hold non-negative integers, got 1.5"),
    ([True], r"seeds must hold non-negative integers"),
    ([2, 3, 2], r"seeds contains duplicates"),
    (np.zeros((2, 2), dtype=int), r"seeds must be a non-empty iterable"),
])
def test_bad_seeds(seeds, match):
    net, data, train = _small()
    with pytest.raises(ValueError, match=match):
        dmft.simulate(net, data, train, width=8, seeds=seeds)


def test_seeds_accept_numpy_and_generators():
    net, data, train = _small()
    ens = dmft.simulate(net, data, train, width=8, seeds=np.arange(2, dtype=np.uint32))
    ens2 = dmft.simulate(net, data, train, width=8, seeds=(s for s in (0, 1)))
    assert np.array_equal(ens.ntk, ens2.ntk)


def test_gamma0_zero_rejected():
    net, data, _ = _small()
    with pytest.raises(ValueError, match=r"gamma0 must be > 0.*1/\(gamma0 N\).*method='static'"):
        dmft.simulate(net, data, dmft.GradientDescent(0.0, 0.1, 2), width=8, seeds=[0])


def test_bad_options():
    net, data, train = _small()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['seed'\].*seeds="):
        dmft.simulate(net, data, train, width=8, seed=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['samples'\]"):
        dmft.simulate(net, data, train, width=8, seeds=[0], samples=3)
    with pytest.raises(ValueError, match=r"record_kernels must be True or False"):
        dmft.simulate(net, data, train, width=8, seeds=[0], record_kernels="yes")
    with pytest.raises(ValueError, match=r"center must be True or False"):
        dmft.simulate(net, data, train, width=8, seeds=[0], center=1)
    with pytest.raises(ValueError, match=r"net must be a dmft.MLP"):
        dmft.simulate("mlp", data, train, width=8, seeds=[0])


def test_engine_validation():
    X, y = _problem()
    wts = network.Weights.draw(np.random.default_rng(0), 3, 4, 1)
    with pytest.raises(ValueError, match=r"activation 'sigmoid' is unknown"):
        network.train(X, y, wts, activation="sigmoid", gamma0=1.0, lr=0.1, steps=1)
    with pytest.raises(ValueError, match=r"gamma0 must be > 0"):
        network.train(X, y, wts, activation="tanh", gamma0=0.0, lr=0.1, steps=1)
    with pytest.raises(ValueError, match=r"input dimension"):
        network.train(X[:, :2], y, wts, activation="tanh", gamma0=1.0, lr=0.1, steps=1)


# --- (f) divergence ---------------------------------------------------------------------------
def test_divergence_raises():
    X, y = _problem(P=3, Q=0, seed=0)
    data = dmft.Dataset(X, 5 * y)
    train = dmft.GradientDescent(gamma0=2.0, lr=3.0, steps=200)
    with pytest.raises(ConvergenceError, match=r"seed 1 diverged.*at step \d+ of 200.*smaller lr"):
        dmft.simulate(dmft.MLP(2, "linear"), data, train, width=16, seeds=[1])
    wts = network.Weights.draw(np.random.default_rng(1), 3, 16, 2)
    with pytest.raises(FloatingPointError, match=r"non-finite output or NTK at step"):
        network.train(X, 5 * y, wts, activation="linear", gamma0=2.0, lr=3.0, steps=200)
