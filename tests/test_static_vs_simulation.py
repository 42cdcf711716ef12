"""The static (t = 0, infinite-width) kernels and dynamics against simulated networks.

(a) At t = 0 every finite-width kernel is an average over N hidden units, so the simulated
    NTK / NNGP Phi^l / G^l differ from the static values by O(N^-1/2) (plus an O(1/N) mean
    shift): the RMS error over seeds and entries must fall with a fitted log-log slope of
    -1/2 over widths 64 .. 1024. The initial output f(0) ~ N(0, Phi^L / (gamma0^2 N)) checks
    the NNGP of the last layer independently of the kernel estimators.
(b) At small gamma0 the networks are lazy, and the centred model f(theta_t) - f(theta_0)
    (``center=True``) follows f(t+1) = f(t) + lr K Delta(t) from f = 0 with the static K. Without
    centring the random initial output, of size 1 / (gamma0 sqrt(N)) ~ 3 at gamma0 = 0.01,
    N = 1024, would dominate. The gradient updates of the simulator are derived from the
    loss (and checked by finite differences in its own tests), so agreement of the dynamics
    is an independent check of K = sum_l G^{l+1} Phi^l, which the simulator's recorded NTK
    shares with the static method.

Tolerances are multiples of the ensembles' own standard errors (fixed seeds).
"""
import math

import numpy as np
import pytest

import dmft

SLOPE_SIGMAS = 3.0       # fitted slope within 3 fitted standard errors of -1/2
CLEARLY_NEGATIVE = -0.25  # and slope + 3 se below this
MEAN_SIGMAS = 5.0        # ensemble mean within 5 standard errors (max over ~200 entries)
COV_SIGMAS = 4.0         # N Cov f(0) against Phi^L, Wishart standard errors


def _data(seed=0, P=4, Q=2, D=8):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(P + Q, D))
    return dmft.Dataset(X[:P], rng.normal(size=P), X[P:])


def _seeds(i, n_seeds):
    """Disjoint seeds for the i-th width. With shared seeds the narrower network's weights
    are a block of the wider one's (same generator stream), which correlates the errors
    across widths and invalidates the independent-points slope fit."""
    return range(10_000 * (i + 1), 10_000 * (i + 1) + n_seeds)


def fit_slope(widths, per_seed_sq):
    """Weighted least-squares slope of log(RMS error) against log(width).

    ``per_seed_sq[i]`` holds, for width i, one mean squared error per seed. The RMS error is
    sqrt(mean over seeds); its log has standard error se(mean) / (2 mean) (delta method).
    The slope's standard error is inflated by sqrt(chi^2 / dof) when the scatter about the
    line exceeds those error bars (heavy-tailed squared errors).

    Returns slope, its standard error, and the RMS errors.
    """
    logN = np.log(np.asarray(widths, dtype=float))
    means = np.array([np.mean(v) for v in per_seed_sq])
    ses = np.array([np.std(v, ddof=1) / math.sqrt(len(v)) for v in per_seed_sq])
    y = 0.5 * np.log(means)
    w = 1.0 / (0.5 * ses / means) ** 2
    A = np.column_stack([np.ones_like(logN), logN])
    cov = np.linalg.inv(A.T @ (w[:, None] * A))
    beta = cov @ A.T @ (w * y)
    dof = len(widths) - 2
    chi2 = float(np.sum(w * (y - A @ beta) ** 2))
    se = math.sqrt(cov[1, 1] * max(1.0, chi2 / dof))
    return float(beta[1]), se, np.sqrt(means)


def _check_slope(name, slope, se):
    assert abs(slope + 0.5) < SLOPE_SIGMAS * se, f"{name}: slope {slope:.3f} +- {se:.3f}"
    assert slope + SLOPE_SIGMAS * se < CLEARLY_NEGATIVE, f"{name}: slope {slope:.3f} +- {se:.3f}"


def _t0_kernels_vs_width(act, depth, widths, n_seeds, data=None):
    data = data or _data()
    net = dmft.MLP(depth, act)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.01, steps=1)
    st = dmft.solve(net, data, train, method="static")
    K, Phi, G = st.ntk[0], st.phi[:, 0, 0], st.g[:, 0, 0]
    err = {"ntk": [], "phi": [], "g": []}
    f0 = []  # sqrt(N) f(0), N(0, Phi^L / gamma0^2) in the limit
    for i, N in enumerate(widths):
        ens = dmft.simulate(net, data, train, width=N, seeds=_seeds(i, n_seeds),
                            record_kernels=True)
        err["ntk"].append(((ens.ntk[:, 0] - K) ** 2).mean(axis=(1, 2)))
        err["phi"].append(((ens.phi[:, :, 0, 0] - Phi) ** 2).mean(axis=(1, 2, 3)))
        err["g"].append(((ens.g[:, :, 0, 0] - G) ** 2).mean(axis=(1, 2, 3)))
        if N >= 256:  # f(0) is Gaussian with covariance Phi^L only up to O(1/N)
            f0.append(math.sqrt(N) * train.gamma0 * np.concatenate(
                [ens.train_predictions[:, 0], ens.test_predictions[:, 0]], axis=1))
    slopes = {k: fit_slope(widths, v) for k, v in err.items()}
    return slopes, np.concatenate(f0), Phi[-1]


def _check_t0(act, depth, widths, n_seeds):
    slopes, f0, phiL = _t0_kernels_vs_width(act, depth, widths, n_seeds)
    for name, (slope, se, rms) in slopes.items():
        print(f"{act} L={depth} {name}: slope {slope:.3f} +- {se:.3f}, RMS {rms}")
        _check_slope(f"{act} {name}", slope, se)
    # N Cov[f(0)] = Phi^L: sample covariance with Wishart standard errors
    S = f0.shape[0]
    C = f0.T @ f0 / S  # mean zero by symmetry of the weights
    se = np.sqrt((np.outer(np.diag(phiL), np.diag(phiL)) + phiL ** 2) / S)
    z = np.abs(C - phiL) / se
    print(f"{act} L={depth} N Cov f(0) vs Phi^L: max z {z.max():.2f} over {S} networks")
    assert z.max() < COV_SIGMAS


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_t0_kernels_error_shrinks_like_inverse_sqrt_width(act):
    _check_t0(act, 2, [64, 128, 256, 512, 1024], 32)


@pytest.mark.slow
@pytest.mark.parametrize("act,depth", [("erf", 3), ("tanh", 3), ("linear", 3), ("relu", 1),
                                       ("tanh", 1)])
def test_t0_kernels_error_shrinks_like_inverse_sqrt_width_more(act, depth):
    _check_t0(act, depth, [64, 128, 256, 512, 1024, 2048], 64)


def _dynamics_vs_width(act, depth, gamma0, widths, n_seeds, lr=0.2, steps=30):
    data = _data(1)
    net = dmft.MLP(depth, act)
    train = dmft.GradientDescent(gamma0=gamma0, lr=lr, steps=steps)
    st = dmft.solve(net, data, train, method="static")
    f = st.predictions
    dev, ens = [], None
    for i, N in enumerate(widths):
        ens = dmft.simulate(net, data, train, width=N, seeds=_seeds(i, n_seeds), center=True)
        fp = np.concatenate([ens.train_predictions, ens.test_predictions], axis=2)
        dev.append(((fp - f) ** 2).mean(axis=(1, 2)))
    # mean over seeds at the largest width, against the static trajectory (t > 0)
    m = fp.mean(axis=0)[1:]
    se = fp.std(axis=0, ddof=1)[1:] / math.sqrt(n_seeds)
    z = np.abs(m - f[1:]) / se
    fit = fit_slope(widths, dev) if len(widths) > 2 else None
    return fit, z, st


@pytest.mark.parametrize("act,depth,widths", [
    ("tanh", 2, [64, 128, 256, 512]),
    ("relu", 1, [64, 128, 256, 512, 1024, 2048]),  # two-layer nets cost O(N), not O(N^2)
])
def test_static_dynamics_match_lazy_networks(act, depth, widths):
    (slope, se, rms), z, st = _dynamics_vs_width(act, depth, 0.01, widths, 32)
    assert st.train_loss[-1] < 0.1 * st.train_loss[0]  # the run really trains
    print(f"{act} L={depth}: per-network deviation slope {slope:.3f} +- {se:.3f}, RMS {rms}; "
          f"ensemble mean max z {z.max():.2f}")
    assert z.max() < MEAN_SIGMAS
    _check_slope(f"{act} dynamics", slope, se)


def test_static_dynamics_differ_from_feature_learning_networks():
    # Power check: at gamma0 = 0.5 the kernels move at O(gamma0^2) and the same comparison
    # must reject the static trajectory.
    _, z, _ = _dynamics_vs_width("tanh", 2, 0.5, [256], 8)
    assert z.max() > 3 * MEAN_SIGMAS  # measured: max z ~ 29


@pytest.mark.slow
@pytest.mark.parametrize("act,depth", [("erf", 3), ("tanh", 2), ("relu", 2), ("linear", 2)])
def test_static_dynamics_match_lazy_networks_more(act, depth):
    (slope, se, rms), z, _ = _dynamics_vs_width(act, depth, 0.003, [64, 128, 256, 512, 1024],
                                                 48)
    print(f"{act} L={depth}: deviation slope {slope:.3f} +- {se:.3f}; max z {z.max():.2f}")
    assert z.max() < MEAN_SIGMAS
    _check_slope(f"{act} dynamics", slope, se)
