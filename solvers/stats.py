"""Small statistics shared by the tests and benchmarks that compare with simulated networks."""
from __future__ import annotations

import numpy as np

__all__ = ["fit_inverse_width"]


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
