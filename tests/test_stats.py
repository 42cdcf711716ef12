"""The ensemble statistics shared by the tests and benchmarks (:mod:`solvers.stats`)."""
import numpy as np
import pytest

from solvers.stats import fit_inverse_width, summed_variance


def _correlated(rng, shape, rho=0.8):
    """(..., 3) entries with unit variances and correlation rho between every two."""
    C = np.full((3, 3), rho) + (1 - rho) * np.eye(3)
    return rng.standard_normal(shape + (3,)) @ np.linalg.cholesky(C).T


def test_summed_variance_is_unbiased_and_its_error_is_that_of_the_sum():
    """Strongly correlated entries (rho = 0.8, covariance C): the sum's error is
    sqrt(2 tr C^2 / (2 * 3)) = 1.51x the entries' errors in quadrature (Gaussian entries:
    Var sum_j x_j^2 = 2 tr C^2); over 2000 ensembles of 40 seeds the reported error matches
    the spread of the estimates (within 8 %; the ratio's own error is ~2 % here) and the mean
    is the true summed variance, width-scaled."""
    rng = np.random.default_rng(0)
    reps, S, N = 2000, 40, 7.0
    x = _correlated(rng, (reps, S))
    est = np.array([summed_variance(xi, N) for xi in x])
    value, se = est[:, 0], est[:, 1]
    assert abs(value.mean() / (3 * N) - 1) < 4 * value.std() / np.sqrt(reps) / (3 * N)
    assert abs(value.std() / np.sqrt(np.mean(se ** 2)) - 1) < 0.08
    # the quadrature of per-entry errors would understate the sum's error
    quad = np.array([np.sqrt(sum(summed_variance(xi[:, [j]], N)[1] ** 2 for j in range(3)))
                     for xi in x[:50]])
    assert 1.35 < np.mean(se[:50]) / np.mean(quad) < 1.7


def test_summed_variance_refuses_one_seed():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        summed_variance(np.ones((1, 4)))


def test_fit_inverse_width_recovers_a_line_in_one_over_width():
    widths = np.array([128, 256, 512])
    means = (3.0 + 40.0 / widths)[:, None] * np.ones((1, 2))
    b0, se0, b1, _ = fit_inverse_width(widths, means, np.full((3, 2), 0.1))
    assert np.allclose(b0, 3.0) and np.allclose(b1, 40.0) and np.all(se0 > 0)
    with pytest.raises(ValueError, match="widths"):
        fit_inverse_width([128, 128], means[:2], np.ones((2, 2)))
