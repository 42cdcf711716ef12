"""Helpers shared by the Monte Carlo deep solvers (iterative and one-pass)."""
from __future__ import annotations

import contextlib


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
