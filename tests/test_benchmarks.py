"""Helpers of the benchmark scripts whose arithmetic their tables rest on."""
import importlib.util
import os

import numpy as np
import pytest

from solvers.stats import fit_inverse_width

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                     name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_perf_mc_bias_fit_ignores_the_reference_offset():
    """perf_mc's finite-width bias: a common offset (the reference's own error) must not be
    read as bias. Planted c_j = 0 with an offset of 4e-3 (the size of case (b)'s reference
    error) at widths 128-512, stderr 2e-4 (slope stderr 0.047 per entry, 400 entries): the
    free-intercept fit finds c_rms ~ 0 with a 2-sigma bound below 0.05, a fit through the
    origin reads the offset as c_rms ~ 0.5; a planted c_rms = 1.5 is recovered within 0.05."""
    pm = _load("perf_mc")
    rng = np.random.default_rng(3)
    widths = np.array([128.0, 256.0, 512.0])
    m, se = 400, 2e-4
    ses = np.full((3, m), se)
    offset = 4e-3 * rng.choice([-1.0, 1.0], m)
    means = offset[None] + se * rng.standard_normal((3, m))
    _, _, c, c_se = fit_inverse_width(widths, means, ses)
    c_rms, upper = pm.bias_rms(c, c_se ** 2)
    assert c_rms <= upper < 0.05, (c_rms, upper)
    x = 1.0 / widths
    c0 = means[0] / x[0]                       # through the origin, from the widest lever
    assert pm.bias_rms(c0, np.full(m, (se / x[0]) ** 2))[0] > 0.4
    c_true = 1.5 * rng.choice([-1.0, 1.0], m)
    means = offset[None] + c_true[None] / widths[:, None] + se * rng.standard_normal((3, m))
    _, _, c, c_se = fit_inverse_width(widths, means, ses)
    c_rms, upper = pm.bias_rms(c, c_se ** 2)
    assert abs(c_rms - 1.5) < 0.05 and upper > c_rms, (c_rms, upper)
    # the slope's variance is the textbook one: se^2 / sum (x - xbar)^2 for equal weights
    np.testing.assert_allclose(c_se ** 2, se ** 2 / np.sum((x - x.mean()) ** 2), rtol=1e-10)


def test_fit_inverse_width_matches_the_normal_equations():
    """The closed form equals the textbook WLS solve (X^T W X)^-1 X^T W y entry by entry,
    with unequal weights, and refuses a single width."""
    rng = np.random.default_rng(5)
    widths = np.array([64.0, 128.0, 256.0, 1024.0])
    means = rng.standard_normal((4, 7))
    ses = rng.uniform(0.1, 2.0, (4, 7))
    b0, se0, b1, se1 = fit_inverse_width(widths, means, ses)
    X = np.stack([np.ones(4), 1.0 / widths], axis=1)
    for j in range(7):
        w = 1.0 / ses[:, j] ** 2
        cov = np.linalg.inv(X.T @ (w[:, None] * X))
        beta = cov @ (X.T @ (w * means[:, j]))
        np.testing.assert_allclose([b0[j], b1[j]], beta, rtol=1e-10)
        np.testing.assert_allclose([se0[j], se1[j]], np.sqrt(np.diag(cov)), rtol=1e-10)
    with pytest.raises(ValueError, match="widths"):
        fit_inverse_width(widths[:1], means[:1], ses[:1])


def test_barlow_twins_slope_and_extrapolation_helpers():
    """barlow_twins.py's tables: the log-log slope recovers a planted power law N^-0.5 (and
    N^-1) within 3 of its own standard errors, and the 1/N extrapolation keeps entries
    without spread (the t = 0 cross-correlation every centred network shares) exact instead
    of dividing by a zero standard error."""
    bt = _load("barlow_twins")
    rng = np.random.default_rng(7)
    widths = np.array([128, 256, 512, 1024, 2048, 4096])
    for p in (-0.5, -1.0):
        means = 0.3 * widths ** p * (1 + 0.02 * rng.standard_normal(widths.size))
        slope, se = bt.loglog_slope(widths, means, 0.02 * means)
        assert abs(slope - p) < 3 * se and se < 0.02, (p, slope, se)
    means = np.stack([np.array([0.5, 1.0 + 2.0 / n]) for n in widths[:3]])
    ses = np.array([[0.0, 1e-3]] * 3)
    b0, se0 = bt.extrapolate(widths[:3], means, ses)
    assert b0[0] == 0.5 and se0[0] == 0.0
    np.testing.assert_allclose(b0[1], 1.0, rtol=1e-12)
    assert se0[1] > 0


@pytest.mark.slow
def test_barlow_twins_quick_run():
    """benchmarks/barlow_twins.py --quick runs end to end (about 40 s) and prints its three
    tables."""
    import contextlib
    import io
    bt = _load("barlow_twins")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bt.main(["--quick"])
    out = buf.getvalue()
    for head in ("(a) NTK parameterisation", "(b) rich regime", "(c) linear probe"):
        assert head in out, out


def test_deep_cases_fit_from_the_wide_widths_only():
    """deep_cases.py --fit-min-width: the 1/N extrapolation from the widths >= N only recovers
    a + b / N exactly where the narrow width is off that line (and the fit over all widths does
    not); fewer than two widths left is refused before any work."""
    dc = _load("deep_cases")
    widths = [1024, 4096, 8192]
    a, b = np.array([1.0, -2.0]), np.array([300.0, 50.0])
    means = a + b / np.array(widths, float)[:, None]
    means[0] += 0.2                                  # the narrow width outside the 1/N regime
    ses = np.full_like(means, 1e-3)
    b0, _ = dc._fit(widths, means, ses, 4096)
    np.testing.assert_allclose(b0, a, rtol=0, atol=1e-9)
    b_all, _ = dc._fit(widths, means, ses)
    assert np.abs(b_all - a).max() > 0.02
    with pytest.raises(SystemExit):
        dc.main(["--quick", "--fit-min-width", "100000"])
