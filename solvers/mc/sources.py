"""Sources of the Monte Carlo marches, in antithetic pairs (docs/theory.rst §2).

- :func:`two_layer_sources`: u^1 and w(0) of the two-layer march, by randomised quasi-Monte
  Carlo (independent Owen-scrambled Sobol sets, one per replicate) or i.i.d. normals;
- :func:`_kernel_subset`: which of those samples the two-time kernels are estimated from;
- :func:`_sobol_normals`: the randomly digitally shifted Sobol sets of the one-pass deep
  solver's first layer (:mod:`solvers.mc.causal`).
"""
from __future__ import annotations

import numpy as np

from ..layout import low_rank_factor, psd_sqrt

__all__ = ["two_layer_sources"]


def two_layer_sources(kx, samples: int, seed, replicates: int = 1, sampler: str = "sobol",
                      outputs: int | None = None):
    """Sources (u, w0) of a two-layer network in antithetic pairs (u, w0), (u, -w0).

    ``outputs=None``: one readout per sample, w0 (S,) (the original problem). ``outputs=C``:
    a readout vector per sample, w0 (S, C) ~ N(0, I_C) (docs/theory.rst §7), a sample being a
    point of R^{r + C}; for C = 1 the numbers equal those of ``outputs=None`` as a column.

    ``sampler="sobol"``: randomised quasi-Monte Carlo. u = F xi with F the rank-r factor of
    Kx (:func:`low_rank_factor`, r <= D), so a sample is a point of R^{r + 1} (xi, eta);
    ``replicates`` independent Owen-scrambled Sobol sets of ``samples / (2 replicates)``
    points each are mapped through the normal quantile (cell midpoints, never 0 or 1) and
    concatenated: each replicate is an unbiased estimate of every average, and the spread of
    the replicate estimates gives an honest standard error. ``sampler="random"``: i.i.d.
    normals (the replicates are then consecutive blocks).

    Returns
    -------
    u : (S, n), w0 : (S,), with S = 2 replicates floor(samples / (2 replicates)); sample
    2k and 2k + 1 form a pair, replicate b occupies rows [b S / replicates, (b+1) S / replicates).
    """
    from scipy.special import ndtri

    n = kx.shape[0]
    B = max(1, int(replicates))
    hb = (int(samples) // 2) // B
    if hb < 1:
        raise ValueError(f"samples={samples} is too small for {B} replicates: need at least "
                         f"{2 * B}")
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    if sampler == "random":
        rng = np.random.default_rng(ss)
        xi = rng.standard_normal((hb * B, n))
        eta = rng.standard_normal(hb * B if outputs is None else (hb * B, outputs))
        u = xi @ psd_sqrt(kx)
    elif sampler == "sobol":
        import warnings

        from scipy.stats import qmc
        F = low_rank_factor(kx)
        r = F.shape[1]
        C = 1 if outputs is None else int(outputs)
        bits = 30
        zs = []
        for child in ss.spawn(B):
            gen = np.random.default_rng(child)
            try:
                eng = qmc.Sobol(r + C, scramble=True, bits=bits, rng=gen)
            except TypeError:                      # scipy < 1.15 names it ``seed``
                eng = qmc.Sobol(r + C, scramble=True, bits=bits, seed=gen)
            with warnings.catch_warnings():
                # balance is exact for powers of 2; other sizes are still unbiased
                warnings.simplefilter("ignore", UserWarning)
                x = eng.random(hb)
            zs.append(ndtri(x + 0.5 ** (bits + 1)))
        z = np.concatenate(zs)
        u = z[:, :r] @ F.T
        eta = z[:, r] if outputs is None else z[:, r:r + C]
    else:
        raise ValueError(f"sampler must be 'sobol' or 'random', got {sampler!r}")
    u = np.repeat(u, 2, axis=0)                    # pairs (u, w0), (u, -w0) adjacent
    if outputs is not None:
        return u, np.stack([eta, -eta], axis=1).reshape(-1, eta.shape[1])
    w0 = np.stack([eta, -eta], axis=1).reshape(-1)
    return u, w0


def _kernel_subset(S: int, B: int, kernel_samples):
    """The samples the two-time kernels are estimated from: ``(idx, ks, kblocks)``. With
    ``B >= 2`` replicates the same number of antithetic pairs from every replicate (kernel
    blocks = replicates), else the first ``ks`` samples in up to 8 blocks."""
    ks = S if kernel_samples is None else min(S, 2 * (int(kernel_samples) // 2))
    if B >= 2 and ks >= 2 * B:
        kb = 2 * ((ks // 2) // B)
        Sr = S // B
        idx = (np.arange(B)[:, None] * Sr + np.arange(kb)[None, :]).reshape(-1)
        return idx, kb * B, B
    return np.arange(ks), ks, max(2, min(8, ks // 2))


_SOBOL_CACHE: dict = {}


def _sobol_normals(d: int, count: int, rng) -> np.ndarray:
    """(count, d) normals from a randomly digitally shifted Sobol set: the first ``count``
    points of the (unscrambled) Sobol sequence, each coordinate's 30-bit integer XORed with an
    independent uniform random integer (a random digital shift: every point is uniform on
    [0, 1)^d and the set keeps its stratification), cell midpoints through the normal quantile
    (never 0 or 1). Unbiased; independent shifts give independent replicates (cheaper than
    Owen's scrambling; measurements: benchmarks/README.md)."""
    import warnings

    from scipy.special import ndtri
    from scipy.stats import qmc
    bits = 30
    key = (d, count)
    if key not in _SOBOL_CACHE:
        eng = qmc.Sobol(d, scramble=False, bits=bits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # balance is exact for powers of 2
            _SOBOL_CACHE[key] = np.round(eng.random(count) * 2.0 ** bits).astype(np.int64)
    shift = rng.integers(0, 2 ** bits, size=d, dtype=np.int64)
    x = (np.bitwise_xor(_SOBOL_CACHE[key], shift[None, :]) + 0.5) / 2.0 ** bits
    return ndtri(x)


def _first_layer_sources(kx, half: int, rng, sampler: str, outputs: int | None = None):
    """First-layer sources of one population of the one-pass solver: ``(u1, w0h)``.

    u^1 = Fx xi is constant in time (Fx the low-rank factor of Kx), with each column repeated
    for the antithetic pair: (n, 2 half). w0h is the first member of each pair's readout,
    (half,), or (C, half) with ``outputs=C``. These are rank(Kx) + C numbers per pair, by
    randomised QMC (``sampler="sobol"``, :func:`_sobol_normals`) or i.i.d. normals.
    """
    Fx = low_rank_factor(kx)
    r1 = Fx.shape[1]
    C = 1 if outputs is None else int(outputs)
    if sampler == "sobol":
        z = _sobol_normals(r1 + C, half, rng)
        xi1 = z[:, :r1].T
        w0h = z[:, r1].copy() if outputs is None else z[:, r1:].T.copy()
    else:
        xi1 = rng.standard_normal((r1, half))
        w0h = rng.standard_normal(half if outputs is None else (C, half))
    return np.repeat(Fx @ xi1, 2, axis=1), w0h
