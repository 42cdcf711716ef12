"""Tests of method="mc" / method="gia" (solvers/mc.py, solvers/fixedpoint.py, dmft/_mc.py).

Grouped by what they prove:

- Kernels vs references: the Numba two-layer step and the blocked tangent march against plain
  NumPy / dense per-sample solves; tangents against finite differences of the march.
- Independent routes: deep linear networks against the exact algebraic solver
  (method="linear": predictions, NTK, responses A and B); the two-layer one-point closed form.
- Limits: gamma0 -> 0 approaches method="static" at O(gamma0^2); gia == mc for L = 1, gia
  differs from mc at gamma0 = 1 and agrees at small gamma0.
- Solver behaviour: determinism, throw / converged semantics, divergence, the callback, the
  progress option, the fixed-point loop on toy maps, bad options.

Monte Carlo tolerances are multiples of reported standard errors (TOL["z"]) at fixed seeds.
The simulation comparisons live in tests/test_mc_vs_simulation.py.
"""
import logging

import numpy as np
import pytest
from scipy.integrate import solve_ivp

import dmft
import dmft.config
from dmft.results import ConvergenceError
from solvers import fixedpoint
from solvers import mc

TOL = {
    "z": 4.5,            # max |z-score| over entries of a Monte Carlo comparison
    "exact": 1e-12,      # same arithmetic by two routes
    "fd": 1e-6,          # tangents vs central finite differences (relative)
    "slope": 0.35,       # fitted exponent vs the expected one
    "closed_form": 1e-3,  # two-layer one-point closed form (THEORY.md §3), absolute
}


def _data(P=2, Q=1, D=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    y = rng.standard_normal(P)
    return dmft.Dataset(X[:P], y, X[P:] if Q else None, rng.standard_normal(Q) if Q else None)


def _toy_layer(T1, n, P, S, act, seed=1, gamma0=0.9):
    """Random causal operators with the structure of the solver's (test columns passive)."""
    rng = np.random.default_rng(seed)
    m = T1 * n
    X = rng.standard_normal((m, 3 * m))
    Y = rng.standard_normal((m, 3 * m))
    dcol = np.zeros((T1, n))
    dcol[:, :P] = rng.standard_normal((T1, P))
    tb = np.repeat(np.arange(T1), n)
    A = 0.1 * rng.standard_normal((m, m)) * (tb[:, None] > tb[None, :])
    A.reshape(T1, n, T1, n)[..., P:] = 0.0
    B = 0.1 * rng.standard_normal((m, m)) * (tb[:, None] >= tb[None, :])
    B4 = B.reshape(T1, n, T1, n)
    B4[:, :P, :, P:] = 0.0
    for q in range(P, n):
        for q2 in range(P, n):
            if q != q2:
                B4[:, q, :, q2] = 0.0
    C, D = mc.causal_operators(X @ X.T / (3 * m), Y @ Y.T / (3 * m), A, B, dcol.ravel(), 0.1,
                               T1, n)
    u = rng.standard_normal((S, m))
    r = rng.standard_normal((S, m))
    return u, r, C, D, gamma0


# --------------------------------------------------------------------------------------------
# kernels vs references
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["tanh", "relu", "linear", "erf"])
def test_two_layer_step_matches_numpy(act):
    rng = np.random.default_rng(3)
    S, n, P, nb = 12, 3, 2, 3
    args = [rng.standard_normal((S, n)), rng.standard_normal(S), rng.standard_normal((S, n)),
            rng.standard_normal((S, n)), rng.standard_normal((nb, n, P)),
            rng.standard_normal((nb, P))]
    a = [x.copy() for x in args]
    b = [x.copy() for x in args]
    fa, fb = np.zeros((nb, n)), np.zeros((nb, n))
    mc.two_layer_step(*a, S // nb, mc.ACTIVATIONS[act], fa)
    mc.two_layer_step_reference(*b, S // nb, act, fb)
    for x, z in zip(a + [fa], b + [fb]):
        np.testing.assert_allclose(x, z, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("act", ["tanh", "relu", "erf"])
def test_two_layer_step_fast_matches_numba_kernel(act):
    """The vectorised march step (BLAS + NumPy, slices of ``cache_rows``) equals the
    per-sample Numba kernel, and its fused equal-time sums equal phi^T phi, g^T g."""
    rng = np.random.default_rng(4)
    S, n, P, nb = 30, 4, 3, 3
    args = [rng.standard_normal((S, n)), rng.standard_normal(S), rng.standard_normal((S, n)),
            rng.standard_normal((S, n)), rng.standard_normal((nb, n, P)),
            rng.standard_normal((nb, P))]
    a = [x.copy() for x in args]
    b = [x.copy() for x in args]
    fa, fb = np.zeros((nb, n)), np.zeros((nb, n))
    pt, gt = np.zeros((nb, n, n)), np.zeros((nb, n, n))
    mc.two_layer_step(*a, S // nb, mc.ACTIVATIONS[act], fa)
    mc.two_layer_step_fast(*b, S // nb, act, fb, pt, gt, cache_rows=4)
    for x, z in zip(a + [fa], b + [fb]):
        np.testing.assert_allclose(x, z, rtol=1e-12, atol=1e-12)
    ph, g = b[2].reshape(nb, S // nb, n), b[3].reshape(nb, S // nb, n)
    np.testing.assert_allclose(pt, np.einsum("bsi,bsj->bij", ph, ph), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gt, np.einsum("bsi,bsj->bij", g, g), rtol=1e-12, atol=1e-12)


def test_two_layer_kernels_match_plain_numpy():
    """Chunked dsyrk accumulation of Phi(t, s), G(t, s) and the batch-means errors equal a
    plain NumPy march with F^T F / S (unequal chunks crossing block edges)."""
    rng = np.random.default_rng(0)
    n, P, T1, S, gamma0, lr = 3, 2, 5, 40, 0.8, 0.2
    kx = np.cov(rng.standard_normal((n, 6))) + np.eye(n)
    delta = rng.standard_normal((T1, P))
    u, w0 = rng.standard_normal((S, n)), rng.standard_normal(S)
    out = mc.two_layer_kernels(kx, delta, u, w0, gamma0, lr, "tanh", chunk=7, blocks=4)
    h, w = u.copy(), w0.copy()
    PH, G = [np.tanh(h)], [(1 - np.tanh(h) ** 2) * w[:, None]]
    for t in range(T1 - 1):
        dw = gamma0 * lr * PH[-1][:, :P] @ delta[t]
        h = h + gamma0 * lr * G[-1][:, :P] @ (kx[:, :P] * delta[t]).T
        w = w + dw
        PH.append(np.tanh(h))
        G.append((1 - np.tanh(h) ** 2) * w[:, None])
    for key, feats in (("phi", PH), ("g", G)):
        F = np.stack(feats, 1).reshape(S, -1)
        np.testing.assert_allclose(out[key], F.T @ F / S, rtol=1e-12, atol=1e-14)
        kb = np.array([F[a:a + 10].T @ F[a:a + 10] / 10 for a in range(0, S, 10)])
        np.testing.assert_allclose(out[key + "_se"], kb.std(0, ddof=1) / 2, rtol=1e-9,
                                   atol=1e-14)


@pytest.mark.parametrize("sampler", ["sobol", "random"])
def test_two_layer_sources_distribution(sampler):
    """Antithetic pairs (u, w0), (u, -w0); u ~ N(0, Kx) (rank-deficient Kx: D < n) and
    w0 ~ N(0, 1) independent, checked on the sample covariance of (u, w0) to within 5
    standard errors of a Gaussian covariance estimate."""
    data = dmft.config.teacher_student(P=5, Q=3, D=4, seed=2)
    kx = data.kx
    S = 1 << 14
    u, w0 = mc.two_layer_sources(kx, S, np.random.SeedSequence(7), 4, sampler)
    assert u.shape == (S, 8) and w0.shape == (S,)
    np.testing.assert_array_equal(u[0::2], u[1::2])
    np.testing.assert_array_equal(w0[0::2], -w0[1::2])
    X = np.concatenate([u, w0[:, None]], axis=1)
    C = X.T @ X / S
    ref = np.zeros((9, 9))
    ref[:8, :8], ref[8, 8] = kx, 1.0
    se = np.sqrt((np.outer(np.diag(ref), np.diag(ref)) + ref ** 2) / (S / 2))
    assert np.abs(C - ref).max() < 1e-12 + (5 * se).max()
    assert np.all(np.abs(C - ref) < 5 * se + 1e-12)


@pytest.fixture(scope="module")
def two_layer_problem():
    data = dmft.config.teacher_student(P=6, Q=4, D=4, seed=3)
    return data, dmft.MLP(1, "tanh"), dmft.GradientDescent(1.0, 0.1, 30)


def test_two_layer_sobol_and_random_agree_and_sobol_is_more_accurate(two_layer_problem):
    """Both samplers are unbiased (each within TOL z of a 2^17-sample Sobol reference, in
    units of their combined standard errors) and the quasi-random one is more accurate at
    equal cost: measured RMS error against the reference over 3 seeds, and its reported
    standard error, both smaller than i.i.d. sampling's. f(0) = 0 exactly (antithetic)."""
    data, net, train = two_layer_problem
    kw = dict(kernel_samples=64, progress=False)
    ref = dmft.solve(net, data, train, method="mc", samples=1 << 17, seed=100, **kw)
    err, se = {}, {}
    for sampler in ("sobol", "random"):
        e2, s2 = [], []
        for seed in range(3):
            sol = dmft.solve(net, data, train, method="mc", samples=4096, seed=seed,
                             sampler=sampler, **kw)
            assert sol.options["sampler"] == sampler and sol.options["samples"] == 4096
            assert np.all(sol.predictions[0] == 0.0)
            d = sol.predictions[1:] - ref.predictions[1:]
            s = np.concatenate([sol.stderr["train_predictions"],
                                sol.stderr["test_predictions"]], axis=1)[1:]
            sr = np.concatenate([ref.stderr["train_predictions"],
                                 ref.stderr["test_predictions"]], axis=1)[1:]
            z = np.abs(d) / np.sqrt(s ** 2 + sr ** 2)
            assert z.max() < TOL["z"], (sampler, seed, z.max())
            e2.append(np.mean(d ** 2))
            s2.append(np.mean(s ** 2))
        err[sampler], se[sampler] = np.sqrt(np.mean(e2)), np.sqrt(np.mean(s2))
    assert err["sobol"] < err["random"], err
    assert se["sobol"] < se["random"], se


def test_two_layer_linear_matches_exact_solver():
    """Two-layer linear network, several points: the quasi-random march against the exact
    algebraic solver (method="linear") within TOL z standard errors, predictions and NTK."""
    data = dmft.config.teacher_student(P=3, Q=2, D=5, seed=4)
    net = dmft.MLP(1, "linear")
    train = dmft.GradientDescent(1.0, 0.1, 15)
    sol = dmft.solve(net, data, train, method="mc", samples=1 << 14, seed=0,
                     kernel_samples=256, progress=False)
    exact = dmft.solve(net, data, train, method="linear")
    for key in ("train_predictions", "test_predictions", "ntk"):
        se = sol.stderr[key][1:]
        z = np.abs(getattr(sol, key)[1:] - getattr(exact, key)[1:]) / np.maximum(se, 1e-12)
        assert z.max() < TOL["z"], (key, z.max())
    # two-time kernels: 7-dof batch-means errors per entry are too rough for a max z-score
    # over 10^4 entries; the RMS error over entries must match the RMS standard error
    rms = lambda a: np.sqrt(np.mean(a ** 2))                          # noqa: E731
    assert rms(sol.phi - exact.phi) < 2 * rms(sol.stderr["phi"])
    assert rms(sol.g - exact.g) < 2 * rms(sol.stderr["g"]) + 1e-15


@pytest.mark.parametrize("act", ["tanh", "relu", "linear"])
@pytest.mark.parametrize("tblock", [1, 3, 8, 50])
def test_blocked_march_matches_step_by_step(act, tblock):
    """The time-blocked march of a deep layer equals the plain step-by-step NumPy march."""
    T1, n, P, S = 9, 4, 3, 6
    u, r, C, D, gamma0 = _toy_layer(T1, n, P, S, act)
    ref = mc.march_layer_reference(u, r, C, D, gamma0, act, T1, n)
    out = mc.march_layer(u, r, C, D, gamma0, act, T1, n, tblock=tblock)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("direction", ["r", "u"])
@pytest.mark.parametrize("tblock", [1, 3, 8])
def test_blocked_tangents_match_dense_solve(act, direction, tblock):
    """The time-blocked tangent march equals the dense per-sample solve of
    (I - gamma0 C M) dh = ... (THEORY.md §2) on every entry it fills."""
    T1, n, P, S = 7, 4, 3, 5
    u, r, C, D, gamma0 = _toy_layer(T1, n, P, S, act)
    H, _, Z, _ = mc.march_layer(u, r, C, D, gamma0, act, T1, n)
    ref = mc.response_reference(H, Z, C, D, gamma0, act, direction, 0.2) * S
    out = np.zeros_like(C)
    mc.response_sums(H, Z, C, D, gamma0, act, T1, n, P, direction, out, 0.2, tblock=tblock)
    mask = np.zeros((T1, n, T1, n), bool)
    mask[..., :P] = True
    for q in range(P, n):                     # test-test diagonal blocks (u direction only)
        mask[:, q, :, q] = direction == "u"
    mask = mask.reshape(C.shape)
    if direction == "r":
        mask &= np.repeat(np.arange(T1), n)[None, :] < T1 - 1
    scale = np.abs(ref).max()
    assert np.abs(out - ref)[mask].max() < TOL["exact"] * 100 * scale
    # entries not filled are structurally zero (test sources reach only their own point)
    assert np.abs(ref[~mask]).max() < TOL["exact"] * scale if (~mask).any() else True


@pytest.mark.parametrize("direction", ["r", "u"])
def test_tangents_match_finite_differences(direction):
    """Forward-mode tangents vs central differences of the sampled march (tanh, smooth)."""
    T1, n, P, S = 5, 3, 2, 4
    u, r, C, D, gamma0 = _toy_layer(T1, n, P, S, "tanh", seed=7)
    H, PH, Z, G = mc.march_layer(u, r, C, D, gamma0, "tanh", T1, n)
    out = np.zeros_like(C)
    mc.response_sums(H, Z, C, D, gamma0, "tanh", T1, n, P, direction, out)
    eps = 1e-5
    for s in range(T1 - 1):
        for a in range(P):
            j = s * n + a
            e = np.zeros_like(u)
            e[:, j] = eps
            if direction == "r":
                plus = mc.march_layer(u, r + e, C, D, gamma0, "tanh", T1, n)[1]
                minus = mc.march_layer(u, r - e, C, D, gamma0, "tanh", T1, n)[1]
            else:
                plus = mc.march_layer(u + e, r, C, D, gamma0, "tanh", T1, n)[3]
                minus = mc.march_layer(u - e, r, C, D, gamma0, "tanh", T1, n)[3]
            fd = ((plus - minus) / (2 * eps)).sum(axis=0)
            assert np.abs(fd - out[:, j]).max() < TOL["fd"] * max(1.0, np.abs(fd).max())


@pytest.mark.parametrize("direction", ["r", "u"])
def test_response_control_variate_unbiased_and_less_noisy(direction):
    """The control-variate responses (:func:`solvers.mc.response_control`: tangents on Sr
    samples minus their first-order term, plus that term on all S samples) agree with plain
    tangents on all S samples within 4.5 standard errors (batch means, 16 batches), and their
    batch-to-batch variance is at least 4x below that of plain tangents on the same Sr samples
    (measured 9.8x for r, 13.4x for u on this toy layer)."""
    T1, n, P = 6, 3, 2
    m = T1 * n
    S, Sr, nb = 4096, 256, 16
    u, r, C, D, gamma0 = _toy_layer(T1, n, P, S * nb, "tanh", seed=4, gamma0=1.0)
    plain, cvs, full = [], [], []
    for b in range(nb):
        sl = slice(b * S, (b + 1) * S)
        H, _, Z, _ = mc.march_layer(u[sl], r[sl], C, D, gamma0, "tanh", T1, n)
        l1 = 1.0 - np.tanh(H) ** 2
        l2 = -2.0 * np.tanh(H) * l1 * Z
        acc = np.zeros((m, m))
        mc.response_sums(H[:Sr], Z[:Sr], C, D, gamma0, "tanh", T1, n, P, direction, acc)
        plain.append(acc / (gamma0 * Sr))
        acc = acc.copy()
        pair = (acc, None) if direction == "r" else (None, acc)
        mc.response_control(*pair, C, D, l1.T @ l1, l1[:Sr].T @ l1[:Sr], l2.sum(0),
                            l2[:Sr].sum(0), S, Sr, gamma0)
        cvs.append(acc / (gamma0 * Sr))
        acc = np.zeros((m, m))
        mc.response_sums(H, Z, C, D, gamma0, "tanh", T1, n, P, direction, acc)
        full.append(acc / (gamma0 * S))
    plain, cvs, full = map(np.array, (plain, cvs, full))
    se = lambda a: a.std(0, ddof=1) / np.sqrt(nb)                    # noqa: E731
    live = full.mean(0) != 0
    z = np.abs(cvs.mean(0) - full.mean(0))[live] / np.hypot(se(cvs), se(full))[live]
    assert z.max() < TOL["z"], z.max()
    assert np.all(cvs.mean(0)[~live] == 0)
    assert plain.var(0).sum() > 4 * cvs.var(0).sum()
    assert np.abs(full.mean(0)).max() > 20 * se(cvs)[live].max()      # not vacuous


def test_causal_cholesky_drops_dependent_variables():
    """Exactly dependent variables get no innovation; the kept block is factored exactly and
    in the given order (causal: row j of the factor only uses innovations <= j)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 5))
    X[:, 3] = X[:, 1] - 2 * X[:, 0]             # variable 3 is a combination of 0 and 1
    X[:, 4] = X[:, 3]                            # and 4 a copy of 3
    K = X.T @ X
    keep, Lc = mc.causal_cholesky(K)
    assert list(keep) == [0, 1, 2]
    np.testing.assert_allclose(Lc @ Lc.T, K[np.ix_(keep, keep)], rtol=1e-12)
    assert np.allclose(Lc, np.tril(Lc))
    with pytest.raises(FloatingPointError):
        mc.causal_cholesky(np.full((2, 2), np.nan))


def _stein_toy(act, S, seed, T1=3, n=3, P=2):
    """Toy layer with correlated, well-conditioned sources u ~ N(0, K) (so that entries of B
    can be compared one by one) and the structure of the solver's operators."""
    u0, r, C, D, gamma0 = _toy_layer(T1, n, P, 2, act, seed=1)
    m = T1 * n
    rng = np.random.default_rng(100)
    W = rng.standard_normal((m, 2 * m))
    K = W @ W.T / (2 * m) + 0.3 * np.eye(m)
    Lk = np.linalg.cholesky(K)
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((S, m)) @ Lk.T
    r = rng.standard_normal((S, m))
    return u, r, C, D, gamma0, K, (T1, n, P)


def _stein_B(act, S, seed, blocks=8):
    """Stein-lemma B of the toy layer: mean over ``blocks`` independent batches of S / blocks
    samples and its standard error (batch means)."""
    u, r, C, D, gamma0, K, (T1, n, P) = _stein_toy(act, S, seed)
    groups = mc.stein_groups(K, T1, n, P)
    est = []
    Sb = S // blocks
    for b in range(blocks):
        acc = [np.zeros((len(g["rows"]), len(g["cols"]))) for g in groups]
        sl = slice(b * Sb, (b + 1) * Sb)
        G = mc.march_layer(u[sl], r[sl], C, D, gamma0, act, T1, n)[3]
        mc.stein_accumulate(groups, u[sl], G, acc)
        est.append(mc.stein_finish(groups, acc, Sb, gamma0, T1 * n))
    est = np.array(est)
    return est.mean(0), est.std(0, ddof=1) / np.sqrt(blocks), (T1, n, P)


def _live(T1, n, P):
    """Entries of B that Stein estimates: causal; training rows see training sources, test
    row q the training sources and its own."""
    m = T1 * n
    pb = np.tile(np.arange(n), T1)
    tb = np.repeat(np.arange(T1), n)
    live = np.zeros((m, m), bool)
    live[np.ix_(pb < P, pb < P)] = True
    for q in range(P, n):
        live[np.ix_(pb == q, (pb < P) | (pb == q))] = True
    return live & (tb[None, :] <= tb[:, None])


def test_stein_B_structure_and_agreement_with_tangents():
    """Stein's lemma in causally whitened sources gives the tangents' B (tanh, smooth):
    entries agree within 4.5 standard errors (batch means); B is zero outside its structure
    (causal, training rows ignore test sources, test rows ignore other test points)."""
    B, se, (T1, n, P) = _stein_B("tanh", 1 << 17, 1)
    Sb = 1 << 13
    u, r, C, D, gamma0, K, _ = _stein_toy("tanh", 8 * Sb, 3)
    tans = []
    for b in range(8):
        sl = slice(b * Sb, (b + 1) * Sb)
        H, _, Z, _ = mc.march_layer(u[sl], r[sl], C, D, gamma0, "tanh", T1, n)
        acc = np.zeros_like(C)
        mc.response_sums(H, Z, C, D, gamma0, "tanh", T1, n, P, "u", acc)
        tans.append(acc / (gamma0 * Sb))
    tan, tan_se = np.mean(tans, axis=0), np.std(tans, axis=0, ddof=1) / np.sqrt(8)
    live = _live(T1, n, P)
    assert np.all(B[~live] == 0) and np.all(np.abs(tan[~live]) < 1e-14)
    z = np.abs(B - tan)[live] / np.hypot(se, tan_se)[live]
    assert z.max() < TOL["z"], z.max()
    assert np.abs(tan).max() > 20 * se[live].max()            # not vacuous


def test_stein_B_for_relu_matches_finite_differences_of_the_average():
    """ReLU (phi'' = delta): B by Stein equals central differences of the population average
    <g> under shifts of each source's mean (common random numbers), which contain the delta
    contribution that per-sample tangents miss; tangents without it are rejected."""
    S = 1 << 18
    B, se_st, (T1, n, P) = _stein_B("relu", S, 1)
    u, r, C, D, gamma0, K, _ = _stein_toy("relu", S, 3)
    m = T1 * n
    eps = 0.05                 # bias O(eps^2 B''): below 1e-3 here (eps = 0.1 / 0.025 agree)
    fd = np.zeros((m, m))
    fd_se = np.zeros((m, m))
    for j in range(m):
        e = np.zeros(m)
        e[j] = eps
        d = (mc.march_layer(u + e, r, C, D, gamma0, "relu", T1, n)[3]
             - mc.march_layer(u - e, r, C, D, gamma0, "relu", T1, n)[3]) / (2 * eps * gamma0)
        fd[:, j] = d.mean(axis=0)
        fd_se[:, j] = d.std(axis=0) / np.sqrt(S)
    live = _live(T1, n, P)
    se = np.hypot(se_st, fd_se)[live]
    z = np.abs(B - fd)[live] / se
    assert z.max() < TOL["z"], z.max()
    assert np.abs(fd[live]).max() > 20 * se.max()
    H, _, Z, _ = mc.march_layer(u[:1 << 15], r[:1 << 15], C, D, gamma0, "relu", T1, n)
    no_delta = np.zeros((m, m))
    mc.response_sums(H, Z, C, D, gamma0, "relu", T1, n, P, "u", no_delta, relu_eps=1e6)
    no_delta /= gamma0 * (1 << 15)
    assert (np.abs(no_delta - fd)[live] / se).max() > 3 * TOL["z"]


# --------------------------------------------------------------------------------------------
# deep linear networks: method="linear" is exact
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[2, 3])
def linear_pair(request):
    L = request.param
    data = dmft.config.teacher_student(P=3, Q=1, D=6, seed=0)
    net = dmft.MLP(depth=L, activation="linear")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=8)
    kw = dict(samples=65536, response_samples=16384, progress=False)
    return (dmft.solve(net, data, train, method="mc", seed=0, **kw),
            dmft.solve(net, data, train, method="mc", seed=1, **kw),
            dmft.solve(net, data, train, method="linear"))


def test_linear_net_predictions_and_ntk_within_stderr(linear_pair):
    sol, _, exact = linear_pair
    assert sol.converged
    for key in ("train_predictions", "test_predictions", "ntk"):
        se = sol.stderr[key][1:]
        z = np.abs(getattr(sol, key)[1:] - getattr(exact, key)[1:]) / np.maximum(se, 1e-12)
        assert z.max() < TOL["z"], (key, z.max())


def test_linear_net_responses_match_exact(linear_pair):
    """A, B from the tangents agree with A = M C, B = M~ D (THEORY.md §3) to within the
    Monte Carlo scatter, measured as the difference between two independent seeds."""
    s0, s1, exact = linear_pair
    for key in ("A", "B"):
        a0, a1, ex = getattr(s0, key), getattr(s1, key), getattr(exact, key)
        scatter = np.abs(a0 - a1).max() / np.sqrt(2)
        err = np.abs(0.5 * (a0 + a1) - ex).max()
        assert err < TOL["z"] * scatter + 1e-12, (key, err, scatter)
        assert np.abs(ex).max() > 10 * scatter      # the comparison is not vacuous


def _flat(K):
    """Solution layout (..., T1, T1, n, n) -> the engine's flat (..., T1 n, T1 n)."""
    T1, n = K.shape[-3], K.shape[-1]
    return np.moveaxis(K, -2, -3).reshape(K.shape[:-4] + (T1 * n, T1 * n))


def test_stein_B_at_the_exact_linear_fixed_point():
    """Stein's lemma on a realistic, badly conditioned source kernel: at the exact fixed
    point of a depth-2 linear network (method="linear"), B^1 from Stein applied to layer-1
    features equals the exact B^1 (= M~ D, THEORY.md §3) applied to them, within 4.5 batch
    standard errors. Elementwise the estimate is noisy (cond(Phi^1) ~ 1e5); applied to fields
    with covariance Phi^1, which is how the dynamics use it, it is not."""
    data = dmft.config.teacher_student(P=3, Q=1, D=6, seed=0)
    net = dmft.MLP(depth=2, activation="linear")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=12)
    ex = dmft.solve(net, data, train, method="linear")
    T1, n, P = train.steps + 1, data.P + data.Q, data.P
    m = T1 * n
    phi1, A1, B1 = _flat(ex.phi[0]), _flat(ex.A[0]), _flat(ex.B[0])
    dcol = np.zeros((T1, n))
    dcol[:, :P] = data.y_train[None] - ex.train_predictions
    C, D = mc.causal_operators(phi1, np.ones((m, m)), A1, None, dcol.ravel(), train.lr, T1, n)
    Su = mc.psd_sqrt(phi1)
    w = np.linalg.eigvalsh(phi1)
    assert w[-1] / w[w > 1e-12 * w[-1]].min() > 1e4              # badly conditioned indeed
    groups = mc.stein_groups(Su @ Su, T1, n, P)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((512, m)) @ Su                    # fields with covariance Phi^1
    est = []
    Sb = 1 << 14
    for b in range(8):
        e = rng.standard_normal(Sb // 2)
        u = np.repeat(rng.standard_normal((Sb // 2, m)) @ Su, 2, axis=0)
        r = np.repeat(np.stack([e, -e], 1).reshape(-1, 1), m, axis=1)
        G = mc.march_layer(u, r, C, D, train.gamma0, "linear", T1, n)[3]
        acc = [np.zeros((len(g["rows"]), len(g["cols"]))) for g in groups]
        mc.stein_accumulate(groups, u, G, acc)
        est.append(feats @ mc.stein_finish(groups, acc, Sb, train.gamma0, m).T)
    est = np.array(est)
    mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(8)
    exact = feats @ B1.T
    z = np.abs(mean - exact) / np.maximum(se, 1e-12)
    assert z.max() < TOL["z"] + 0.5, z.max()          # ~30000 entries, heavier t(7) tails
    assert np.sqrt(np.mean(exact ** 2)) > 20 * np.sqrt(np.mean(se ** 2))      # not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("L", [2, 3])
def test_linear_net_with_stein_B_matches_exact(L):
    """b_estimator="stein" (the ReLU default) on linear networks: predictions and NTK agree
    with method="linear" within the replicate error bars. Samples: the self-consistent
    solution has a bias O(1/samples) (measured, L = 3: ~0.05 on early NTK entries at 4096
    samples and 0.003 on predictions at 16384, with either estimator of B) that must sit
    well below the error bars of 8 replicates."""
    data = dmft.config.teacher_student(P=3, Q=1, D=6, seed=0)
    net = dmft.MLP(depth=L, activation="linear")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=8)
    sol = dmft.solve(net, data, train, method="mc", seed=0, samples=1 << 21,
                     response_samples=8192, b_estimator="stein", replicates=8,
                     progress=False)
    exact = dmft.solve(net, data, train, method="linear")
    assert sol.converged and sol.options["b_estimator"] == "stein"
    for key in ("train_predictions", "test_predictions", "ntk"):
        se = sol.stderr[key][1:]
        z = np.abs(getattr(sol, key)[1:] - getattr(exact, key)[1:]) / np.maximum(se, 1e-12)
        assert z.max() < TOL["z"], (key, z.max())


def _one_point_recursion(gamma0, y, lr, T):
    """Exact discrete-time recursion of THEORY.md §3 (two-layer linear, one point)."""
    K, f = 2.0, 0.0
    out = [f]
    for _ in range(T):
        a = lr * gamma0 * (y - f)
        K, f = (1 + a * a) * K + 4 * a * gamma0 * f, (1 + a * a) * f + a * K / gamma0
        out.append(f)
    return np.array(out)


def test_two_layer_linear_one_point_closed_form():
    """Two-layer linear net, one point |x|^2/D = 1 (THEORY.md §3): the Monte Carlo solution
    matches the exact discrete recursion to 1e-3 (and within its standard errors); the
    recursion tends to the gradient-flow closed form df/dt = 2 sqrt(1 + gamma0^2 f^2)(y - f)
    with a gap linear in lr, below 1e-3 at lr = 0.002 (MC at that lr costs 5x more steps)."""
    gamma0, y, lr, T = 1.5, 1.0, 0.01, 60
    data = dmft.Dataset(np.ones((1, 1)), np.array([y]))
    sol = dmft.solve(dmft.MLP(1, "linear"), data, dmft.GradientDescent(gamma0, lr, T),
                     method="mc", seed=0, samples=1 << 18, kernel_samples=64, progress=False)
    f = sol.train_predictions[:, 0]
    rec = _one_point_recursion(gamma0, y, lr, T)
    se = sol.stderr["train_predictions"][:, 0]
    assert np.abs(f - rec).max() < TOL["closed_form"]
    assert np.all(np.abs(f - rec)[1:] < TOL["z"] * se[1:])
    ode = solve_ivp(lambda _, v: 2 * np.sqrt(1 + gamma0 ** 2 * v ** 2) * (y - v),
                    (0, sol.t[-1]), [0.0], t_eval=sol.t, rtol=1e-11, atol=1e-12).y[0]
    hs = np.array([0.01, 0.005, 0.002])
    gaps = [np.abs(_one_point_recursion(gamma0, y, h, int(round(0.6 / h)))[-1] - ode[-1])
            for h in hs]
    slope = np.polyfit(np.log(hs), np.log(gaps), 1)[0]
    assert abs(slope - 1) < TOL["slope"]
    assert gaps[-1] < TOL["closed_form"] < gaps[0]      # 1e-3 is reached at lr = 0.002


# --------------------------------------------------------------------------------------------
# limits and approximations
# --------------------------------------------------------------------------------------------
def test_small_gamma0_approaches_static_like_gamma0_squared():
    """max |mc(gamma0) - mc(gamma0 -> 0)| ~ gamma0^2 (the O(gamma0) term vanishes, THEORY.md
    §4); common random numbers (same seed) cancel the Monte Carlo noise in the difference.
    The gamma0 -> 0 reference is method="static" for the NTK at t = 0 and mc at 0.01."""
    data = _data(P=2, Q=1, D=3, seed=5)
    net = dmft.MLP(depth=2, activation="tanh")
    kw = dict(seed=3, samples=4096, response_samples=512, progress=False)

    def run(g0):
        return dmft.solve(net, data, dmft.GradientDescent(g0, 0.2, 8), method="mc", **kw)

    base = run(0.01)
    static = dmft.solve(net, data, dmft.GradientDescent(0.0, 0.2, 8), method="static")
    gammas = np.array([0.05, 0.1, 0.2])
    gaps = np.array([np.abs(run(g).ntk - base.ntk).max() for g in gammas])
    slope = np.polyfit(np.log(gammas), np.log(gaps), 1)[0]
    assert abs(slope - 2) < TOL["slope"], (slope, gaps)
    z = np.abs(base.ntk - static.ntk) / np.maximum(base.stderr["ntk"], 1e-12)
    assert z.max() < TOL["z"]
    gapf = np.array([np.abs(run(g).predictions - base.predictions).max() for g in gammas])
    slope_f = np.polyfit(np.log(gammas), np.log(gapf), 1)[0]
    assert abs(slope_f - 2) < TOL["slope"], (slope_f, gapf)


def test_gia_equals_mc_for_two_layer():
    data = _data()
    net = dmft.MLP(depth=1, activation="tanh")
    train = dmft.GradientDescent(1.0, 0.1, 6)
    a = dmft.solve(net, data, train, method="gia", seed=4, samples=4096, progress=False)
    b = dmft.solve(net, data, train, method="mc", seed=4, samples=4096, progress=False)
    np.testing.assert_array_equal(a.predictions, b.predictions)
    np.testing.assert_array_equal(a.phi, b.phi)


@pytest.mark.parametrize("gamma0,differs", [(1.5, True), (0.1, False)])
def test_gia_vs_mc_deep(gamma0, differs):
    """L = 2 tanh: dropping the responses matters at gamma0 = 1.5 (far beyond the error bars)
    and not at gamma0 = 0.1 (the difference is O(gamma0^2))."""
    data = _data(seed=2)
    net = dmft.MLP(depth=2, activation="tanh")
    train = dmft.GradientDescent(gamma0, 0.2, 10)
    kw = dict(seed=6, samples=65536, response_samples=16384, progress=False)
    a = dmft.solve(net, data, train, method="gia", **kw)
    b = dmft.solve(net, data, train, method="mc", **kw)
    assert a.A is None and a.options["gia"] is True and b.A is not None
    se = np.hypot(a.stderr["train_predictions"], b.stderr["train_predictions"])[1:]
    z = np.abs(a.train_predictions - b.train_predictions)[1:] / se
    if differs:
        assert z.max() > 1.5 * TOL["z"], z.max()
    else:
        assert z.max() < TOL["z"], z.max()


# --------------------------------------------------------------------------------------------
# solver behaviour
# --------------------------------------------------------------------------------------------
#: the iterative deep solver's behaviour (the one-pass solver's: tests/test_causal.py)
SMALL = dict(samples=512, response_samples=128, progress=False, scheme="iterative")


@pytest.fixture(scope="module")
def small():
    data = _data(P=2, Q=2, D=3, seed=1)
    return data, dmft.MLP(depth=2, activation="tanh"), dmft.GradientDescent(1.0, 0.1, 5)


def test_deterministic_and_fields(small):
    data, net, train = small
    a = dmft.solve(net, data, train, method="mc", seed=11, **SMALL)
    b = dmft.solve(net, data, train, method="mc", seed=11, **SMALL)
    c = dmft.solve(net, data, train, method="mc", seed=12, **SMALL)
    for key in ("train_predictions", "test_predictions", "ntk", "phi", "g", "A", "B"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.phi, c.phi)
    L, T1, n = 2, 6, 4
    assert a.phi.shape == a.g.shape == (L, T1, T1, n, n)
    assert a.A.shape == a.B.shape == (L - 1, T1, T1, n, n)
    assert a.ntk.shape == (T1, n, n)
    shapes = {"train_predictions": (T1, 2), "test_predictions": (T1, 2), "ntk": (T1, n, n),
              "phi": (L, T1, T1, n, n), "g": (L, T1, T1, n, n)}
    for key, shape in shapes.items():
        assert a.stderr[key].shape == shape and np.all(a.stderr[key] >= 0), key
    assert a.stderr["train_predictions"][1:].min() > 0
    # structure: test sources reach nothing else, kernels symmetric
    A4 = a.A[0]
    assert np.all(A4[..., 2:] == 0)
    np.testing.assert_allclose(a.phi[:, :, :, :, :], np.swapaxes(np.swapaxes(a.phi, 1, 2), 3, 4),
                               atol=1e-12)
    assert a.converged and a.iterations == len(a.residuals) and a.elapsed > 0
    assert a.options["samples"] >= 512 and a.options["response_samples"] == 128


def test_replicates_are_independent_solves_averaged(small):
    """replicates=R: the mean of R independent solves (seeds spawned from the seed) and, as
    the standard error, their spread / sqrt(R) (includes the noise propagated through the
    layers and the self-consistency, which the one-solve batch means miss)."""
    data, net, train = small
    R = 3
    sol = dmft.solve(net, data, train, method="mc", seed=7, replicates=R, **SMALL)
    kids = np.random.SeedSequence(7).spawn(R)
    single = [dmft.solve(net, data, train, method="mc", seed=k, **SMALL) for k in kids]
    for key in ("train_predictions", "test_predictions", "ntk", "phi", "g"):
        stack = np.stack([getattr(s, key) for s in single])
        np.testing.assert_allclose(getattr(sol, key), stack.mean(0), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(sol.stderr[key], stack.std(0, ddof=1) / np.sqrt(R),
                                   rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(sol.A, np.mean([s.A for s in single], axis=0), atol=1e-14)
    assert sol.iterations == sum(s.iterations for s in single) == len(sol.residuals)
    assert sol.options["replicates"] == R and sol.converged
    assert list(sol.extras["replicate_iterations"]) == [s.iterations for s in single]


def test_callback_once_per_iteration(small):
    data, net, train = small
    calls = []
    sol = dmft.solve(net, data, train, method="mc", seed=1, callback=lambda *a: calls.append(a),
                     **SMALL)
    assert len(calls) == sol.iterations
    assert [c[0] for c in calls] == list(range(1, sol.iterations + 1))


def test_not_converged_throw_semantics(small):
    data, net, train = small
    sol = dmft.solve(net, data, train, method="mc", seed=1, max_iter=1, throw=False, **SMALL)
    assert sol.converged is False and sol.iterations == 1
    with pytest.raises(ConvergenceError, match="increase max_iter") as info:
        dmft.solve(net, data, train, method="mc", seed=1, max_iter=1, **SMALL)
    assert info.value.result is not None and info.value.result.converged is False


def test_divergence_is_reported():
    data = _data(seed=3)
    net = dmft.MLP(depth=2, activation="tanh")
    with pytest.raises(ConvergenceError, match="lr"):
        dmft.solve(net, data, dmft.GradientDescent(8.0, 3.0, 10), method="mc", seed=0,
                   **SMALL)


def test_progress_and_logging(small, caplog):
    data, net, train = small
    with caplog.at_level(logging.INFO, logger="dmft"):
        sol = dmft.solve(net, data, train, method="mc", seed=1, samples=512,
                         response_samples=128, progress=True, scheme="iterative")
    lines = [r for r in caplog.records if "iteration" in r.getMessage()]
    assert len(lines) == sol.iterations


@pytest.mark.parametrize("option,value,match", [
    ("samples", 0, "samples must be a positive integer"),
    ("samples", 1, "samples must be >= 2"),
    ("samples", 2.5, "samples must be a positive integer"),
    ("response_samples", -3, "response_samples must be a positive integer"),
    ("damping", 0.0, r"damping must be a number in \(0, 1\]"),
    ("damping", 1.5, r"damping must be a number in \(0, 1\]"),
    ("tol", -1.0, "tol must be a number"),
    ("noise_factor", float("nan"), "noise_factor must be a number"),
    ("max_iter", 0, "max_iter must be a positive integer"),
    ("anderson", -1, "anderson must be an integer >= 0"),
    ("blocks", 0, "blocks must be a positive integer"),
    ("chunk_mb", 0, "chunk_mb must be a number"),
    ("relu_eps", -0.1, "relu_eps must be a number"),
    ("window", 0, "window must be a positive integer"),
    ("replicates", 0, "replicates must be a positive integer"),
    ("b_estimator", "finite", "b_estimator must be 'auto', 'tangent' or 'stein'"),
    ("stein_rtol", 0.0, "stein_rtol must be a number"),
    ("response_control", "yes", "response_control must be True or False"),
    ("callback", 3, "callback must be callable"),
    ("sampler", "halton", "sampler must be 'sobol'"),
    ("bogus", 1, "unknown option"),
])
def test_bad_options(small, option, value, match):
    data, net, train = small
    with pytest.raises(ValueError, match=match):
        dmft.solve(net, data, train, method="mc", scheme="iterative", **{option: value})


def test_bad_gamma0_and_seed(small):
    data, net, _ = small
    with pytest.raises(ValueError, match="gamma0 must be > 0"):
        dmft.solve(net, data, dmft.GradientDescent(0.0, 0.1, 3), method="mc")
    with pytest.raises(ValueError, match="seed must be"):
        dmft.solve(net, data, dmft.GradientDescent(1.0, 0.1, 3), method="mc", seed=-1)


def test_auto_uses_mc_for_nonlinear(small):
    data, net, train = small
    sol = dmft.solve(net, data, train, seed=1, **SMALL)
    assert sol.method == "mc"


# --------------------------------------------------------------------------------------------
# the fixed-point loop on toy maps
# --------------------------------------------------------------------------------------------
def _volterra(lam=2.0, T=30):
    """x = F(x): x(t) = 1 - lam h sum_{s<t} x(s) (a stiff causal map, like f -> Delta -> f)."""
    h = 1.0 / T

    def fmap(x):
        y = 1.0 - lam * h * np.concatenate([[0.0], np.cumsum(x)[:-1]])
        return y, float(np.abs(y - x).max()), 0.0

    def precond(x, r):
        d = np.empty_like(r)
        acc = 0.0
        for t in range(r.size):
            d[t] = r[t] - acc
            acc += lam * h * d[t]
        return d

    exact = (1.0 - lam * h) ** np.arange(T)
    return fmap, precond, exact


def test_fixedpoint_preconditioned_newton_is_exact_for_linear_causal_map():
    fmap, precond, exact = _volterra()
    res = fixedpoint.iterate(fmap, np.zeros(30), tol=1e-12, max_iter=5, precondition=precond)
    assert res.converged and res.iterations <= 3
    np.testing.assert_allclose(res.x, exact, atol=1e-12)
    plain = fixedpoint.iterate(fmap, np.zeros(30), tol=1e-12, max_iter=5)
    assert not plain.converged


def test_fixedpoint_anderson_and_damping():
    M = np.array([[0.0, -0.95], [0.95, 0.0]])          # a slowly rotating contraction
    b = np.array([1.0, 2.0])
    exact = np.linalg.solve(np.eye(2) - M, b)

    def fmap(x):
        y = M @ x + b
        return y, float(np.abs(y - x).max()), 0.0

    plain = fixedpoint.iterate(fmap, np.zeros(2), tol=1e-10, max_iter=40)
    andr = fixedpoint.iterate(fmap, np.zeros(2), tol=1e-10, max_iter=40, anderson=3,
                              damping=0.5)
    assert not plain.converged and andr.converged
    np.testing.assert_allclose(andr.x, exact, atol=1e-8)
    with pytest.raises(ValueError, match="damping"):
        fixedpoint.iterate(fmap, np.zeros(2), damping=0.0)
    with pytest.raises(FloatingPointError, match="diverged"):
        fixedpoint.iterate(lambda x: (2 * x + 1, float(np.abs(x + 1).max()) * 1e7, 0.0),
                           np.ones(2), max_iter=3)


def test_fixedpoint_noise_floor_stop_and_stall():
    """Stops on residual <= noise_factor * floor; a jittering map gets its damping halved."""
    rng = np.random.default_rng(0)

    def fmap(x):
        y = 0.5 * x + 1.0 + 1e-3 * rng.standard_normal(x.shape)
        return y, float(np.abs(y - x).max()), 1e-2

    res = fixedpoint.iterate(fmap, np.zeros(3), tol=0.0, noise_factor=0.5, max_iter=50)
    assert res.converged and res.residuals[-1] <= 5e-3 and res.iterations < 12

    def jitter(x):                                 # never below its floor: stalls
        y = 2.0 + 1e-2 * rng.standard_normal(x.shape)
        return y, float(np.abs(y - x).max()), 1e-4

    res = fixedpoint.iterate(jitter, np.zeros(3), tol=0.0, max_iter=30, stall=3,
                             min_damping=0.25)
    assert not res.converged and res.info["damping"] == 0.25
    res = fixedpoint.iterate(jitter, np.zeros(3), tol=0.0, max_iter=30)
    assert res.info["damping"] == 1.0

    def jitter_below_floor(x):                     # jitter within one standard error
        y, r, _ = jitter(x)
        return y, r, 0.1

    res = fixedpoint.iterate(jitter_below_floor, np.zeros(3), tol=0.0, noise_factor=0.01,
                             max_iter=30, stall=3, min_damping=0.25)
    assert res.converged and res.info["stalled"] and res.iterations < 30
