"""Tests of the Monte Carlo engines (solvers/mc/): kernels against references.

Grouped by what they prove:

- Kernels vs references: the Numba two-layer step and the blocked tangent march against plain
  NumPy / dense per-sample solves; tangents against finite differences of the march; the
  two-layer sources' distribution; the two-layer solver against the exact linear solver;
  the response control variate and Stein's lemma for B.

The solver-level tests (deep linear networks against the exact solver, limits, behaviour, the
fixed-point loop) are in tests/test_mc_solver.py, which shares this file's tolerance table;
the simulation comparisons are in tests/test_mc_vs_simulation.py. Monte Carlo tolerances are
multiples of reported standard errors (TOL["z"]) at fixed seeds.
"""
import numpy as np
import pytest

import dmft
import dmft.config
from _reference import (march_layer_reference, response_reference, two_layer_step,
                        two_layer_step_reference)
from solvers import mc
from solvers.activations import ACTIVATIONS

TOL = {
    "z": 4.5,            # max |z-score| over entries of a Monte Carlo comparison
    "exact": 1e-12,      # same arithmetic by two routes
    "fd": 1e-6,          # tangents vs central finite differences (relative)
    "slope": 0.35,       # fitted exponent vs the expected one
    "closed_form": 1e-3,  # two-layer one-point closed form (docs/theory.rst §3), absolute
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
def _step_args(seed, S, n, P, nb):
    """Two identical copies of random arguments (h, w, phi_h, g, drive, wdrive) of a
    two-layer step, and a zero accumulator fsum for each."""
    rng = np.random.default_rng(seed)
    args = [rng.standard_normal((S, n)), rng.standard_normal(S), rng.standard_normal((S, n)),
            rng.standard_normal((S, n)), rng.standard_normal((nb, n, P)),
            rng.standard_normal((nb, P))]
    return ([x.copy() for x in args], [x.copy() for x in args], np.zeros((nb, n)),
            np.zeros((nb, n)))


@pytest.mark.parametrize("act", ["tanh", "relu", "linear", "erf"])
def test_two_layer_step_matches_numpy(act):
    S, n, P, nb = 12, 3, 2, 3
    a, b, fa, fb = _step_args(3, S, n, P, nb)
    two_layer_step(*a, S // nb, ACTIVATIONS[act], fa)
    two_layer_step_reference(*b, S // nb, act, fb)
    for x, z in zip(a + [fa], b + [fb]):
        np.testing.assert_allclose(x, z, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("act", ["tanh", "relu", "erf"])
def test_two_layer_step_fast_matches_numba_kernel(act):
    """The vectorised march step (BLAS + NumPy, slices of ``cache_rows``) equals the
    per-sample Numba kernel, and its fused equal-time sums equal phi^T phi, g^T g."""
    S, n, P, nb = 30, 4, 3, 3
    a, b, fa, fb = _step_args(4, S, n, P, nb)
    pt, gt = np.zeros((nb, n, n)), np.zeros((nb, n, n))
    two_layer_step(*a, S // nb, ACTIVATIONS[act], fa)
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
    ref = march_layer_reference(u, r, C, D, gamma0, act, T1, n)
    out = mc.march_layer(u, r, C, D, gamma0, act, T1, n, tblock=tblock)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("direction", ["r", "u"])
@pytest.mark.parametrize("tblock", [1, 3, 8])
def test_blocked_tangents_match_dense_solve(act, direction, tblock):
    """The time-blocked tangent march equals the dense per-sample solve of
    (I - gamma0 C M) dh = ... (docs/theory.rst §2) on every entry it fills."""
    T1, n, P, S = 7, 4, 3, 5
    u, r, C, D, gamma0 = _toy_layer(T1, n, P, S, act)
    H, _, Z, _ = mc.march_layer(u, r, C, D, gamma0, act, T1, n)
    ref = response_reference(H, Z, C, D, gamma0, act, direction, 0.2) * S
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
        mc.stein_accumulate(groups, u[sl], G, acc, n)
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
