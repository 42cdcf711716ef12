"""Up-front memory and time estimate of the :func:`dmft.fluctuations` methods (the
``estimate`` hook of :class:`dmft._fluctuations.FluctuationMethod`; see
:mod:`dmft._resources`)."""
from __future__ import annotations

from ._fluctuations import DEFAULT_KAPPA_SAMPLES
from ._resources import estimate, kernel_bytes
from .results import Solution

__all__ = ["estimate_fluct"]


def estimate_fluct(method, sol, opts):
    """Result: the two-time covariance (T1, T1, n, n) and (T1, n, n) arrays. Work, by
    method: "propagator" the chunked tangents (~32 MB), the NTK tangents 2 T1 n(n+1)/2 P T
    and the flat (n T1)^2 accumulator; "lazy" the sampled per-unit kernels and n^4
    moments; "linear-exact" (n+1)^2 perturbed trajectories; "deep-linear" the adjoint
    rows n T1 (2 (n T1 + T1))^2 per layer and the march's graph; "deep-propagator" the
    solution's flat kernels, the masks and the adjoint rows J (~4 L (n T1)^3)."""
    if not isinstance(sol, Solution):
        return None
    L, P, n, T = sol.net.depth, sol.data.P, sol.data.P + sol.data.Q, sol.train.steps
    # C >= 2 outputs (docs/theory.rst §7): every point index becomes a (point, output) pair
    # (the deep-linear backward index (t, c) is bounded the same way)
    C = sol.data.C if getattr(sol.data, "multi_output", False) else 1
    P, n = P * C, n * C
    T1 = T + 1
    m = n * T1
    K1 = kernel_bytes(1, T1, n)
    samples = getattr(opts, "samples", None) or method.default_samples or 0
    blocks = getattr(opts, "blocks", 2)
    result = K1 + 8 * 6 * T1 * n * n
    name = method.name
    torch_bytes, startup = 500_000_000, 0.0     # importing PyTorch (the deep methods)
    if name == "propagator":
        work = (3 * K1 + 2 * 32_000_000 + 8 * samples * (n + 1) + 8 * T1 * n * T * P
                + (8 * 2 * T1 * n * (n + 1) // 2 * P * T if opts.ntk else 0))
        units = 10 * samples * T1 * T * P * n
    elif name == "lazy":
        work = 8 * (samples * n * n * 2 + 4 * n ** 4 + 2 * T1 * n * n * P
                    + 2 * blocks * T1 * n * n)
        units = samples * n ** 4 + (blocks + 1) * T1 * n ** 3 * P
    elif name == "linear-exact":
        d = n + 1
        work = 16 * 2 * d * d * T1 * n * (n + 1)
        units = d * d * T1 * n ** 3 * 10
    elif name == "deep-linear":
        work = 8 * L * m * (2 * (m + T1)) ** 2 + 10 * L * K1 + K1 + torch_bytes
        startup = 5.0
        units = L * T1 * m ** 3 + L * m * (2 * (m + T1)) ** 2
    elif name == "deep-propagator":
        ks = min(samples, getattr(opts, "kappa_samples", None) or DEFAULT_KAPPA_SAMPLES)
        work = ((4 * L - 2 + 4 + 2 * blocks) * K1 + 8 * 4 * L * m ** 3
                + 8 * 4 * L * samples * m + 5 * m * m + torch_bytes)
        startup = 5.0
        units = (samples + 4 * ks) * L * m ** 2 + 4 * L * m ** 3
    else:
        return None
    return estimate("fluctuations", result, result + work, units,
                    f"method={name!r}, n={n} points, T+1={T1} times",
                    knobs="steps / points / samples of the solution's problem",
                    fixed_seconds=startup)
