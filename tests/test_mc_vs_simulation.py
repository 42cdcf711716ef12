"""The Monte Carlo DMFT solver (method="mc") against simulated finite-width networks.

The DMFT describes the N -> infinity limit of the ensemble mean over initialisations. At finite
width the mean of any observable is DMFT + c/N + O(N^-2), so ensemble means at >= 3 widths are
extrapolated linearly in 1/N (weighted least squares, entrywise) and the intercept is compared
with the solver: the final predictions (train and test) and the final NTK.

Centring (``center=True``). In the convention of docs/theory.rst §1 the raw output is
f = w . phi(h^L) / (gamma0 N), so f(0) ~ N(0, Phi^L(0,0) / (gamma0^2 N)): mean zero, standard
deviation O(1/(gamma0 sqrt N)) (0.06 at gamma0 = 0.5, N = 256). Both the raw and the centred
model f(theta) - f(theta_0) have ensemble means DMFT + O(1/N) (f(0) -> 0 at infinite width),
so either is a valid route. We train the centred model: the random offset f(0) then does not
enter the error signal Delta = y - f and is not carried along the trajectory, which removes
most of the seed-to-seed variance of the predictions. The raw initial outputs (still recorded
in ``extras["f0"]``) are used as control variates.

Control variates (quantities with exactly known means, regressed out of the per-seed
observables; this removes the initial-condition noise that the trajectory carries along):
- f(0) (raw initial output): mean exactly 0 at every width and depth.
- the initial NTK K(0) minus the static NTK: for L = 1 its mean is exactly 0 at every width
  (h^1 = W^0 x / sqrt(D) is exactly Gaussian and w is independent). For L >= 2 the mean of K(0)
  differs from the static value by O(1/N) (h^l, l >= 2 are Gaussian only given layer l-1); the
  regression then shifts each mean by beta . O(1/N), which the linear-in-1/N fit absorbs into
  its slope: the intercept stays unbiased to O(N^-2).

Error bars: the intercept's standard error (from the per-width standard errors of the adjusted
means, one independent ensemble per width with disjoint seeds) combined in quadrature with the
solver's own Monte Carlo standard error (``Solution.stderr``). z = gap / combined stderr. For deep
networks the solver runs ``replicates`` independent solves (``DEEP_MC``): the one-solve
batch-means stderr misses the noise propagated through the layers and the self-consistency and
was measured 2-4x too small, which is what made the L = 3 check fail before.

The gap at each width must shrink like 1/N: a common power law gap_j(N) = c_j N^p + d_j is
fitted to all entries with a clear finite-width trend at once (weighted nonlinear least
squares, one amplitude per entry; d_j is the solver's own Monte Carlo error, common to all
widths, with prior N(0, stderr_j^2)), and p must be -1 within its error bars, with error bars
small enough that a 1/sqrt(N) gap would be rejected. Power: the static (frozen-NTK) solution must be rejected by the same data.

The default test is one cheap L = 1 case; the must-show cases (benchmarks/README.md) are ``slow``.
"""
import numpy as np
import pytest
from scipy.optimize import least_squares

import dmft
from conftest import control_variate_mean
from dmft.config import teacher_student
from solvers.stats import fit_inverse_width

TOL = {
    "z": 4.5,            # max |z| over ~27 entries (false alarm ~1e-4 for independent entries)
    "pred": 0.01,        # |extrapolated - DMFT| on predictions (targets of order 1): the target
    "ntk_rel": 0.02,     # |extrapolated - DMFT| / max|K(T)| on the final NTK: the target
    "slope_sigmas": 3.0,  # fitted exponent within 3 standard errors of -1
    "slope_se": 0.25,    # and pinned well enough to tell -1 from -1/2
    "static_z": 2 * 4.5,  # the static solution must be rejected clearly
}


def _seeds(i, count):
    """Disjoint seeds per width: shared seeds would make a narrow network's weights a block of
    the wider one's and correlate the errors across widths (invalidating the 1/N fit)."""
    return range(100_000 * (i + 1), 100_000 * (i + 1) + count)


def extrapolate(widths, means, ses):
    """Weighted least squares of ensemble means against 1/N, entrywise
    (:func:`solvers.stats.fit_inverse_width`).

    Parameters
    ----------
    widths : (k,) widths N.
    means, ses : (k, m) ensemble means and their standard errors, m entries.

    Returns
    -------
    b0, se0, b1, se1 : (m,) intercept (N = infinity), its standard error, the 1/N coefficient
    and its standard error.
    """
    return fit_inverse_width(widths, means, ses)


def fit_power(widths, gaps, ses, se_theory, significant):
    """Common exponent p of gap_j(N) = mean_j(N) - DMFT_j = c_j (N / N_0)^p + d_j.

    d_j is the solver's Monte Carlo error, the same at every width: it is a free parameter with
    the prior d_j ~ N(0, se_theory_j^2) (one extra residual d_j / se_theory_j), so a gap that
    levels off at the solver's noise floor does not flatten the fitted exponent. The ensemble
    means are independent across widths with standard errors ``ses`` (k, m). Only the entries
    flagged ``significant`` (a clear 1/N trend) carry information on p. Weighted nonlinear
    least squares; the standard error of p from the Gauss-Newton covariance, inflated by
    sqrt(chi2/dof) when that exceeds 1. N_0 = smallest width.

    Returns p, its standard error, and the number of entries used.
    """
    widths = np.asarray(widths, dtype=float)
    if not np.any(significant):
        return np.nan, np.inf, 0
    G, E, D = gaps[:, significant], ses[:, significant], se_theory[significant]
    m = G.shape[1]
    r = widths / widths[0]

    def resid(theta):
        p, c, d = theta[0], theta[1:m + 1], theta[m + 1:]
        fit = c[None, :] * r[:, None] ** p + d[None, :]
        return np.concatenate([((G - fit) / E).ravel(), d / D])

    fit = least_squares(resid, np.concatenate([[-1.0], G[0] - G[-1], np.zeros(m)]),
                        method="lm")
    J = fit.jac
    dof = max(fit.fun.size - J.shape[1], 1)
    chi2 = float(np.sum(fit.fun ** 2)) / dof
    cov = np.linalg.pinv(J.T @ J) * max(chi2, 1.0)
    return float(fit.x[0]), float(np.sqrt(cov[0, 0])), m


def width_stats(net, data, train, width, seeds):
    """Ensemble of centred networks at one width; adjusted means of the final predictions and
    the final NTK (upper triangle) with control variates f(0) and K(0) - K_static(0).

    Returns means (m,), standard errors (m,), and the raw ensemble."""
    n = data.P + data.Q
    iu = np.triu_indices(n)
    ens = dmft.simulate(net, data, train, width=width, seeds=seeds, center=True,
                        progress=False)
    S = ens.n_seeds
    k_static = dmft.solve(net, data, train, method="static").ntk[0]
    obs = np.concatenate([ens.predictions[:, -1], ens.ntk[:, -1][:, iu[0], iu[1]]], axis=1)
    Z = np.concatenate([ens.extras["f0"], (ens.ntk[:, 0] - k_static)[:, iu[0], iu[1]]], axis=1)
    if S <= 4 * Z.shape[1]:
        raise ValueError(f"seeds: {S} networks are too few for {Z.shape[1]} control variates; "
                         f"use at least {4 * Z.shape[1] + 1}")
    # the known means of Z are 0: regress the centred Z out, keep the known-mean offset
    return (*control_variate_mean(obs, Z), ens)


def compare(L, activation, gamma0, widths, counts, *, P=4, Q=2, D=8, steps=40, lr=0.1,
            data_seed=0, mc_options=None):
    """Solve by method="mc" and method="static", simulate ensembles at ``widths`` with
    ``counts`` seeds, extrapolate to N = infinity. Returns a dict of everything (for asserts
    and printing)."""
    data = teacher_student(P=P, Q=Q, D=D, seed=data_seed)
    net = dmft.MLP(L, activation)
    train = dmft.GradientDescent(gamma0, lr, steps)
    n = P + Q
    iu = np.triu_indices(n)
    sol = dmft.solve(net, data, train, method="mc", seed=1, progress=False,
                     **(mc_options or {}))
    stat = dmft.solve(net, data, train, method="static")
    theory = np.concatenate([sol.predictions[-1], sol.ntk[-1][iu]])
    se_mc = np.concatenate([sol.stderr["train_predictions"][-1],
                            sol.stderr["test_predictions"][-1], sol.stderr["ntk"][-1][iu]])
    lazy = np.concatenate([stat.predictions[-1], stat.ntk[-1][iu]])
    means, ses, sim_time = [], [], 0.0
    for i, (N, S) in enumerate(zip(widths, counts)):
        m, s, ens = width_stats(net, data, train, N, _seeds(i, S))
        means.append(m)
        ses.append(s)
        sim_time += ens.elapsed
    means, ses = np.array(means), np.array(ses)
    b0, se0, b1, se1 = extrapolate(widths, means, ses)
    se_tot = np.hypot(se0, se_mc)
    gap = b0 - theory
    gaps_N = means - theory[None, :]
    # entries with a clear finite-width trend (|1/N coefficient| > 4 of its standard errors)
    p, p_se, used = fit_power(widths, gaps_N, ses, np.maximum(se_mc, 1e-12),
                              np.abs(b1) > 4 * se1)
    knorm = np.abs(sol.ntk[-1]).max()
    out = dict(L=L, activation=activation, gamma0=gamma0, widths=list(widths),
               counts=list(counts), n=n, n_pred=n, theory=theory, se_mc=se_mc, b0=b0, se0=se0,
               b1=b1, gap=gap, z=gap / se_tot, z_static=(b0 - lazy) / se_tot,
               pred_gap=np.abs(gap[:n]).max(), pred_se=se_tot[:n].max(),
               ntk_gap_rel=np.abs(gap[n:]).max() / knorm, ntk_se_rel=se_tot[n:].max() / knorm,
               slope=p, slope_se=p_se, slope_entries=int(used),
               mc_time=sol.elapsed, sim_time=sim_time, iterations=sol.iterations,
               static_pred_gap=np.abs((b0 - lazy)[:n]).max(),
               trend_t=np.abs(b1 / se1).max(), means=means, ses=ses,
               pred_se_mc=se_mc[:n].max(), pred_se_sim=se0[:n].max(),
               ntk_se_mc=se_mc[n:].max() / knorm, ntk_se_sim=se0[n:].max() / knorm)
    print(report(out))
    return out


def report(r):
    return ("\n[mc vs simulation] L=%(L)d %(activation)s gamma0=%(gamma0)g widths=%(widths)s "
            "seeds=%(counts)s\n  pred gap %(pred_gap).2e (combined se <= %(pred_se).2e: solver %(pred_se_mc).1e, intercept %(pred_se_sim).1e), NTK gap "
            "%(ntk_gap_rel).2e of max|K| (se <= %(ntk_se_rel).2e: solver %(ntk_se_mc).1e, intercept %(ntk_se_sim).1e), max|z| %(zmax).2f, static "
            "max|z| %(zs).1f (static pred gap %(static_pred_gap).3f)\n  1/N exponent %(slope).2f "
            "+- %(slope_se).2f (%(slope_entries)d entries, max |1/N coef|/se %(trend_t).1f); mc %(mc_time).1f s (%(iterations)d "
            "it), simulations %(sim_time).1f s" % dict(r, zmax=np.abs(r["z"]).max(),
                                                       zs=np.abs(r["z_static"]).max()))


def check(r, *, absolute=True, slope=True):
    """The assertions shared by all cases (see the module docstring)."""
    assert np.abs(r["z"]).max() < TOL["z"], report(r)
    assert np.abs(r["z_static"]).max() > TOL["static_z"], report(r)
    if absolute:
        assert r["pred_gap"] < TOL["pred"], report(r)
        assert r["ntk_gap_rel"] < TOL["ntk_rel"], report(r)
        # the bounds above are only meaningful if the data could have violated them
        assert r["pred_se"] < TOL["pred"] / 3 and r["ntk_se_rel"] < TOL["ntk_rel"] / 3, report(r)
    if slope:
        assert r["slope_se"] < TOL["slope_se"], report(r)
        assert abs(r["slope"] + 1.0) < TOL["slope_sigmas"] * r["slope_se"], report(r)


# ---------------------------------------------------------------- helpers under test

def test_extrapolate_recovers_known_line():
    """The WLS intercept of exact a + b/N data is a, with the textbook stderr
    sigma sqrt[(X^T X)^-1]_00; the power fit recovers a planted exponent (here -1/2, so a
    fit that always answers -1 would fail) despite a constant offset of the size of the
    theory's error bars."""
    widths = np.array([128, 256, 512, 1024])
    a, b = np.array([0.3, -1.2]), np.array([5.0, -8.0])
    means = a[None] + b[None] / widths[:, None]
    ses = np.full_like(means, 1e-3)
    b0, se0, b1, se1 = extrapolate(widths, means, ses)
    np.testing.assert_allclose(b0, a, atol=1e-12)
    np.testing.assert_allclose(b1, b, rtol=1e-9)
    X = np.stack([np.ones(4), 1.0 / widths], axis=1)
    np.testing.assert_allclose(se0, 1e-3 * np.sqrt(np.linalg.inv(X.T @ X)[0, 0]), rtol=1e-9)
    rng = np.random.default_rng(0)
    offset = np.array([2e-3, -2e-3, 0.0])
    gaps = np.array([[0.05, -0.03, 1e-5]]) * (widths[:, None] / 128.0) ** -0.5 + offset
    gaps = gaps + 1e-4 * rng.standard_normal(gaps.shape)
    p, p_se, used = fit_power(widths, gaps, np.full_like(gaps, 1e-4), np.full(3, 2e-3),
                              np.array([True, True, False]))
    assert used == 2
    assert abs(p + 0.5) < 3 * p_se and p_se < 0.1, (p, p_se)


# ---------------------------------------------------------------- default (cheap) check

def test_two_layer_tanh_agrees_with_simulations_small():
    """L = 1 tanh, gamma0 = 1, 3 train + 1 test points, 20 steps: centred ensembles at
    widths 128, 256, 512 (300 networks each) extrapolated in 1/N agree with method="mc" within
    combined error bars, and the static NTK is rejected by the same data."""
    r = compare(1, "tanh", 1.0, [128, 256, 512], [300, 300, 300], P=3, Q=1, D=6, steps=20,
                lr=0.1, mc_options={"samples": 1 << 15})
    check(r, absolute=False, slope=False)


# ---------------------------------------------------------------- the must-show cases

#: deep networks: the solver's own error is dominated by noise propagated through the layers
#: and the self-consistency, which the one-solve batch-means stderr misses (measured, L = 3
#: tanh below: the spread over seeds of the final NTK was 2-4x the reported stderr; with the
#: default 8192 samples the NTK moved by ~3% between seeds). Independent replicates give
#: honest error bars; 4 x 32768 samples put the solver's NTK error near 0.5%.
#: With the control variate of the responses the default 128 tangent samples suffice for the
#: predictions but not for a 0.5% NTK: the solver's replicate NTK stderr was 0.69% at 128
#: against 0.32% at 256 (1 Dec 2026), so the test uses 512 (and 8 replicates). With the
#: one-pass solver (the default since 4 Dec 2026) these are 8 populations of 32768 samples.
DEEP_MC = {"samples": 8 * 32768, "response_samples": 8 * 512, "replicates": 8}


@pytest.mark.slow
@pytest.mark.validation
@pytest.mark.parametrize("gamma0", [0.5, 2.0])
def test_two_layer_tanh_must_show(gamma0):
    r = compare(1, "tanh", gamma0, [64, 128, 256, 512, 1024], [6000] * 5,
                mc_options={"samples": 1 << 18})
    check(r)


@pytest.mark.slow
@pytest.mark.validation
def test_three_layer_tanh_must_show():
    """Measured on 2 shared cores (23 Nov 2026, this test as written): pred gap 3.5e-3 (se
    3.0e-3), NTK gap 0.75% of max|K| (se 0.35%), max|z| 3.46, 1/N exponent -0.59 +- 0.14 (close
    to the 3-sigma bound: the finite-width trend of this case is weak), mc 417 s (66
    iterations over 4 replicates), simulations 330 s. With the DMFT as the mean of 4 solves at
    32768 samples with seeds 1-4: NTK gap 0.55% (se 0.57%), exponent -0.70 +- 0.14; adding
    width 2048 (400 seeds): NTK gap 0.83% (se 0.56%). The earlier failure (NTK gap 3.75%, "se
    1.1%") was the solver's own Monte Carlo error at the default 8192 samples and one seed
    (seed-to-seed spread of the final NTK ~3%), with a stderr that missed it.
    With the control variate of the tangent responses and 256 response samples (1 Dec 2026,
    two jobs on the cores): pred gap 3.0e-3 (se 2.6e-3), NTK gap 0.40% (se 0.37%), max|z|
    2.83, exponent -0.95 +- 0.23, mc 142 s (65 iterations), simulations 880 s. With 128
    (float32 tangents): pred gap 3.3e-3 (se 2.3e-3), NTK gap 0.56% (se 0.71%: above the 2%/3
    the bound needs to be meaningful, so the test failed that check), max|z| 2.68, mc 97 s.
    With 512, 4 replicates: pred gap 3.5e-3 (se 2.7e-3), NTK gap 0.49% (se 0.37%), max|z|
    2.66, exponent -1.11 +- 0.33; with 512, 8 replicates (as written now, 2 Dec 2026, alone on
    the cores): pred gap 3.5e-3 (se 1.5e-3), NTK gap 0.30% (se 0.35%), max|z| 2.30, exponent
    -1.20 +- 0.26, mc 220 s, simulations 285 s. Both FAILED only the check that the exponent is
    pinned to +- 0.25 (the agreement checks pass with margin); not loosened.
    Width 128 (3200 seeds) added: the 1/N lever arm 4 -> 8 and a 2x larger gap at the
    narrowest width pin the exponent. Measured 2 Dec 2026 (the same solve, the 256-1024
    ensembles reused, 128 with its own seeds): exponent -0.91 +- 0.09 over 14 entries (the
    same data without 128: -1.20 +- 0.26 over 6); pred gap 3.5e-3 (se 1.5e-3), NTK gap 0.35%
    (se 0.33%), max|z| 2.34; widths 128-512 alone: -0.98 +- 0.10, so the O(1/N^2) terms at
    N = 128 do not bend the fit; simulations at 128 cost ~70 s. This test as written (new
    seeds at every width, alone on the cores): passed, exponent -0.97 +- 0.10 over 15 entries,
    pred gap 3.2e-3 (se 1.5e-3), NTK gap 0.71% (se 0.33%), max|z| 2.74, mc 232 s (124 it),
    simulations 358 s, 591 s in all.
    With the one-pass solver (4 Dec 2026; DEEP_MC now means 8 independent one-pass populations
    of 32768 samples and 512 tangent samples each; another job on the second core): pred gap
    2.5e-4 (se 1.2e-3), NTK gap 0.22% (se 0.46%), max|z| 1.73, exponent -0.94 +- 0.07 over 15
    entries, mc 45.7 s (one pass), simulations 199 s."""
    r = compare(3, "tanh", 1.0, [128, 256, 512, 1024], [3200, 1600, 800, 400],
                mc_options=DEEP_MC)
    check(r)


#: deep ReLU: B by Stein's lemma (b_estimator="auto"), whose noise is larger than that of the
#: tangents: more samples, and 12 replicates so that the replicate error bars have 11 degrees
#: of freedom (with 4, t_3 tails make a 4.5-sigma bound over 27 entries fail often)
DEEP_RELU_MC = {"samples": 12 * 49152, "response_samples": 12 * 4096, "replicates": 12}


@pytest.mark.slow
@pytest.mark.validation
def test_two_layer_hidden_relu_must_show():
    """Measured on 2 shared cores (1 Dec 2026, this test as written): pred gap 4.0e-3 (se
    2.0e-3), NTK gap 0.21% of max|K| (se 0.43%), max|z| 2.50, 1/N exponent -0.71 +- 0.20,
    mc 1630 s (349 iterations over 12 replicates), simulations 393 s. With 4 x 65536 samples:
    pred gap 8.9e-3 (se 2.7e-3), NTK gap 0.90% (se 0.88%, too coarse for the 2% bound), max|z|
    3.25. Before Stein's lemma for B (smoothed-delta tangents): NTK gap 12.7% (se 6.2%),
    max|z| 7.8, and divergence at the default samples for some seeds. With the control variate
    on A's tangents (float32; 2 Dec 2026, another job on the cores): pred gap 3.6e-3 (se
    1.8e-3), NTK gap 0.19% (se 0.39%), max|z| 2.28, exponent -0.70 +- 0.18, mc 1480 s
    (314 iterations), simulations 366 s. With the one-pass solver (4 Dec 2026; 12 populations
    of 49152 samples, 4096 tangent samples each for A, Stein's B; another job on the second
    core): pred gap 2.6e-3 (se 1.5e-3), NTK gap 0.49% (se 0.30%), max|z| 2.49, exponent
    -0.79 +- 0.16, mc 108 s, simulations 78 s."""
    r = compare(2, "relu", 1.0, [256, 512, 1024], [1600, 800, 400], mc_options=DEEP_RELU_MC)
    check(r)
