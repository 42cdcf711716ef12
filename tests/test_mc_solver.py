"""Tests of method="mc" / method="gia" as solvers (dmft/_mc.py, solvers/mc/, fixedpoint).

Grouped by what they prove:

- Independent routes: deep linear networks against the exact algebraic solver
  (method="linear": predictions, NTK, responses A and B); the two-layer one-point closed form.
- Limits: gamma0 -> 0 approaches method="static" at O(gamma0^2); gia == mc for L = 1 (by
  design), gia differs from mc at gamma0 = 1 and agrees at small gamma0.
- Solver behaviour: determinism, throw / converged semantics, divergence, the callback, the
  progress option, the fixed-point loop on toy maps, bad options.

Tolerances: the table of tests/test_mc.py (Monte Carlo ones are multiples of reported standard
errors at fixed seeds).
"""
import logging

import numpy as np
import pytest
from scipy.integrate import solve_ivp

import dmft
import dmft.config
from dmft.results import ConvergenceError
from _reference import mc_and_exact_linear
from solvers import fixedpoint
from solvers import mc
from test_mc import TOL, _data


# --------------------------------------------------------------------------------------------
# deep linear networks: method="linear" is exact
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[2, 3])
def linear_pair(request):
    return mc_and_exact_linear(request.param, dmft.config.teacher_student(P=3, Q=1, D=6, seed=0),
                               dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=8), (0, 1),
                               samples=65536, response_samples=16384, progress=False)


def test_linear_net_predictions_and_ntk_within_stderr(linear_pair):
    sol, _, exact = linear_pair
    assert sol.converged
    for key in ("train_predictions", "test_predictions", "ntk"):
        se = sol.stderr[key][1:]
        z = np.abs(getattr(sol, key)[1:] - getattr(exact, key)[1:]) / np.maximum(se, 1e-12)
        assert z.max() < TOL["z"], (key, z.max())


def test_linear_net_responses_match_exact(linear_pair):
    """A, B from the tangents agree with A = M C, B = M~ D (docs/theory.rst §3) to within the
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
    features equals the exact B^1 (= M~ D, docs/theory.rst §3) applied to them, within 4.5 batch
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
        mc.stein_accumulate(groups, u, G, acc, n)
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
    """Exact discrete-time recursion of docs/theory.rst §3 (two-layer linear, one point)."""
    K, f = 2.0, 0.0
    out = [f]
    for _ in range(T):
        a = lr * gamma0 * (y - f)
        K, f = (1 + a * a) * K + 4 * a * gamma0 * f, (1 + a * a) * f + a * K / gamma0
        out.append(f)
    return np.array(out)


def test_two_layer_linear_one_point_closed_form():
    """Two-layer linear net, one point |x|^2/D = 1 (docs/theory.rst §3): the Monte Carlo solution
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
    """max |mc(gamma0) - mc(gamma0 -> 0)| ~ gamma0^2 (the O(gamma0) term vanishes, docs/theory.rst
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
