"""Small statistics shared by the tests and benchmarks that compare with simulated networks."""
from __future__ import annotations

import numpy as np

__all__ = ["fit_inverse_width", "summed_variance"]


def fit_inverse_width(widths, means, ses):
    """Weighted least squares of ensemble means against 1/N, entrywise:
    means_j(N) = b0_j + b1_j / N, weights 1 / ses_j(N)^2.

    The intercept b0 is the N = infinity extrapolation; the slope b1 the finite-width
    coefficient. Closed form of the 2 x 2 normal equations, vectorised over entries.

    Parameters
    ----------
    widths : (k,) widths N, k >= 2 distinct.
    means, ses : (k, m) ensemble means and their standard errors (m entries).

    Returns
    -------
    b0, se0, b1, se1 : (m,) intercept, its standard error, slope, its standard error.
    """
    x = 1.0 / np.asarray(widths, dtype=float)[:, None]
    means = np.asarray(means, dtype=float)
    w = 1.0 / np.asarray(ses, dtype=float) ** 2
    if x.shape[0] < 2 or np.unique(x).size < 2:
        raise ValueError(f"widths: a fit in 1/N needs at least 2 distinct widths, got "
                         f"{np.asarray(widths).tolist()}")
    sw, sx, sxx = w.sum(0), (w * x).sum(0), (w * x ** 2).sum(0)
    sy, sxy = (w * means).sum(0), (w * x * means).sum(0)
    det = sw * sxx - sx ** 2
    b0 = (sxx * sy - sx * sxy) / det
    b1 = (sw * sxy - sx * sy) / det
    return b0, np.sqrt(sxx / det), b1, np.sqrt(sw / det)


def summed_variance(x, width=1):
    """The summed variance over entries of an ensemble, width-scaled, and its standard error.

    For x of shape (seeds, ...) (one row per network), per seed the squared deviations from
    the ensemble mean summed over the entries, times ``width`` and seeds / (seeds - 1): their
    mean is N sum_j Var x_j (unbiased), their spread over seeds / sqrt(seeds) its standard
    error, which includes the correlations between the entries (an error of the sum, not the
    entries' errors in quadrature).

    Returns
    -------
    value, se : floats.
    """
    x = np.asarray(x, dtype=float)
    S = x.shape[0]
    if S < 2:
        raise ValueError(f"x: a variance needs at least 2 seeds (rows), got {S}")
    d2 = ((x - x.mean(0)) ** 2).reshape(S, -1).sum(1) * (S / (S - 1) * float(width))
    return float(d2.mean()), float(d2.std(ddof=1) / np.sqrt(S))
