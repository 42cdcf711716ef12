"""Helpers shared by the Monte Carlo engines: BLAS threading, the divergence check, the in-place
activation of the two-layer marches and the rank-k accumulation of two-time kernels with
batch-means errors."""
from __future__ import annotations

import contextlib
import math

import numpy as np

from .._jit import njit
from ..activations import apply


def _single_thread_blas():
    """Context limiting BLAS to one thread (no-op without ``threadpoolctl``).

    The GEMMs of the march and the tangents are thin (n or tblock * n rows / columns):
    threaded OpenBLAS spends more time synchronising than computing (measurements:
    benchmarks/README.md).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                            # optional dependency
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _check_predictions(f, step: int, divergence: float):
    """Raise a FloatingPointError naming the remedy when the predictions ``f`` of ``step`` are
    not finite or exceed ``divergence`` in magnitude."""
    if not np.all(np.isfinite(f)) or np.abs(f).max() > divergence:
        raise FloatingPointError(f"the predictions diverged at step {step} (|f| = "
                                 f"{np.abs(f).max():.3g}); gamma0 or lr is too large")


def _activate(activation: str, h, phi_h, dphi):
    """phi(h) and phi'(h) written into the preallocated ``phi_h`` and ``dphi`` (same shape as
    h). For tanh NumPy's SIMD tanh and phi' = 1 - phi^2 in place, without temporaries."""
    if activation == "tanh":
        np.tanh(h, out=phi_h)
        np.multiply(phi_h, phi_h, out=dphi)
        np.subtract(1.0, dphi, out=dphi)
    else:
        phi_h[...] = apply(activation, h, 0)
        dphi[...] = apply(activation, h, 1)


@njit
def _accumulate_upper(tmp, scale, total, sq):
    """total += tmp, sq += (scale tmp)^2 on the upper triangle (i <= j) of Fortran-ordered
    (m, m) arrays (column j contiguous): one memory pass instead of four NumPy temporaries."""
    m = tmp.shape[0]
    for j in range(m):
        for i in range(j + 1):
            v = tmp[i, j]
            total[i, j] += v
            v *= scale
            sq[i, j] += v * v


@njit
def _finish_upper(total, sq, inv_s, nb, mean, se):
    """Symmetric C-ordered mean = total / S and batch-means standard error
    se = sqrt(max(sq / nb - mean^2, 0) / (nb - 1)) from the upper triangles of the
    Fortran-ordered accumulators of :func:`_accumulate_upper` (one pass, no temporaries)."""
    m = total.shape[0]
    for j in range(m):
        for i in range(j + 1):
            mu = total[i, j] * inv_s
            mean[i, j] = mu
            mean[j, i] = mu
            v = 0.0
            if nb > 1:
                v = math.sqrt(max(sq[i, j] / nb - mu * mu, 0.0) / (nb - 1))
            se[i, j] = v
            se[j, i] = v


def _rank_k_kernels(features, S: int, dims: dict, blocks: int, chunk: int,
                    single=()) -> dict:
    """Flat two-time kernels K = <F F^T> over S independent samples by symmetric rank-k updates.

    ``features(c0, c1)`` re-marches samples c0..c1-1 and returns, for each key of ``dims``, an
    array whose reshape to (c1 - c0, dims[key]) is the feature matrix F of those samples
    (flat index t n + mu, or (t n + mu) C + c). Each kernel is accumulated by one BLAS
    ``dsyrk`` per chunk (K += F^T F, half the flops of a GEMM, into a preallocated
    Fortran-ordered buffer); standard errors by batch means over ``blocks`` consecutive sample
    blocks (edges kept even so antithetic pairs stay together), the per-block update of the
    sums and sums of squares one fused pass over the upper triangle (:func:`_accumulate_upper`).

    Keys in ``single`` are accumulated per block in single precision (``ssyrk`` on float32
    features: half the time; rounding ~1e-6 relative, far below the sampling error of a
    kernel from S samples) and summed over blocks in double precision.

    Returns a dict with ``key`` and ``key + "_se"`` (dims[key], dims[key]) for each key.
    """
    from scipy.linalg.blas import dsyrk, ssyrk

    blocks = max(1, min(int(blocks), S // 2))
    edges = [2 * ((S // 2) * k // blocks) for k in range(blocks)] + [S]
    keys = tuple(dims)
    tmp = {k: np.zeros((dims[k], dims[k]), order="F",
                       dtype=np.float32 if k in single else np.float64) for k in keys}
    total = {k: np.zeros((dims[k], dims[k]), order="F") for k in keys}
    sq = {k: np.zeros((dims[k], dims[k]), order="F") for k in keys}
    chunk = max(2, int(chunk))
    for b0, b1 in zip(edges[:-1], edges[1:]):
        first = True
        for c0 in range(b0, b1, chunk):
            c1 = min(b1, c0 + chunk)
            feats = features(c0, c1)
            for k in keys:
                # F^T as a (dims, Sc) Fortran view: dsyrk computes a a^T = F^T F without copies
                F = feats[k].reshape(c1 - c0, dims[k])
                syrk = dsyrk
                if k in single:
                    F, syrk = F.astype(np.float32), ssyrk
                tmp[k] = syrk(1.0, F.T, beta=0.0 if first else 1.0, c=tmp[k], trans=0,
                              lower=0, overwrite_c=1)
            first = False
        for k in keys:
            _accumulate_upper(tmp[k], 1.0 / (b1 - b0), total[k], sq[k])
    out = {}
    nb = len(edges) - 1
    for k in keys:
        del tmp[k]
        out[k] = np.empty((dims[k], dims[k]))
        out[k + "_se"] = np.empty((dims[k], dims[k]))
        _finish_upper(total[k], sq[k], 1.0 / S, nb, out[k], out[k + "_se"])
        del total[k], sq[k]
    return out
