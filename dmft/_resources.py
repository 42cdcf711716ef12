"""Up-front resource estimates: memory from the shapes a method will allocate, time from a
calibrated cost per unit of work.

Every adapter (:class:`dmft._method.Method`) may define ``estimate(*args, opts)`` returning the
dict built by :func:`estimate`; the skeleton calls it before ``run``, logs it at INFO level and
refuses (``ValueError``, before any allocation) a problem whose peak memory would exceed the
limit: ``memory_limit=`` (GB, a keyword every method takes) or, by default, 80 % of the memory
available now (:func:`available_memory`). Everything is computed in Python integers and
floats, so absurd sizes (``depth=10**6``, ``steps=10**12``) give a finite, huge estimate and a
refusal in microseconds, not an overflow or an allocation attempt.

The time is an estimate only (logged, never enforced): ``units`` (a flop-like count of the
method's dominant work, defined by each adapter) times :data:`SECONDS_PER_UNIT` of the
method, measured once on the development machine (2 cores, OpenBLAS; benchmarks/README.md
style sizes). Expect a factor ~2-3 either way on other machines and problem shapes.
"""
from __future__ import annotations

import math
import numbers
import os

__all__ = ["GiB", "available_memory", "default_limit", "limit_bytes", "kernel_bytes",
           "estimate", "describe", "check", "SECONDS_PER_UNIT"]

GiB = float(1 << 30)

#: seconds per unit of work (see each adapter's ``estimate`` for its unit), measured on the
#: development machine: 2 cores, numpy/OpenBLAS, December 2026
SECONDS_PER_UNIT = {
    "static": 2.5e-8,           # per result element written (L T1^2 n^2) + kernel recursion
    "linear": 6e-9,             # per L n^2 T1^3 x (1 + verify + responses)
    "mc": 3e-10,                # per modelled flop (solvers.mc.cost.estimate_flops and kin)
    "perturbative": 3e-10,      # per flop of the dense (n T1)^3 products / sampled jets
    "simulate": 2.7e-10,        # per flop: 6 n N^2 per hidden N x N matrix and step
    "fluctuations": 5e-9,       # per modelled unit (see FluctuationMethod.estimate)
    "two-layer-march": 3e-10,   # per modelled flop (as "mc" at depth 1)
}


def available_memory() -> float:
    """Bytes of memory available now (Linux ``MemAvailable``; else physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def default_limit() -> float:
    """The default memory limit in bytes: 80 % of the memory available now."""
    return 0.8 * available_memory()


def limit_bytes(memory_limit=None) -> float:
    """``memory_limit`` (GB, or None for :func:`default_limit`) validated, in bytes."""
    if memory_limit is None:
        return default_limit()
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, numbers.Real) \
            or not math.isfinite(memory_limit) or memory_limit <= 0:
        raise ValueError(f"memory_limit must be a number of GB > 0 (e.g. memory_limit=8) or "
                         f"None (80% of the memory available now), got {memory_limit!r}")
    return float(memory_limit) * 1e9


def kernel_bytes(L, T1, n) -> int:
    """Bytes of ``L`` float64 two-time kernels (L, T1, T1, n, n) (Python integers)."""
    return 8 * int(L) * int(T1) ** 2 * int(n) ** 2


def estimate(method, result, peak=None, units=0.0, detail="", knobs=None,
             fixed_seconds=0.0) -> dict:
    """The estimate dict of an adapter.

    ``result``: bytes of the arrays the result keeps; ``peak``: bytes at the peak of the
    computation (default: ``result``; never below it); ``units``: work in the method's unit
    (time = units x :data:`SECONDS_PER_UNIT` ``[method]`` + ``fixed_seconds``, a start-up
    such as importing PyTorch); ``knobs``: what shrinks the problem (text).
    Returns ``{"bytes", "result_bytes", "work_bytes", "seconds", "units", "detail",
    "knobs"}``.
    """
    result = int(result)
    peak = max(result, int(result if peak is None else peak))
    units = float(units)
    return {"bytes": peak, "result_bytes": result, "work_bytes": peak - result,
            "seconds": units * SECONDS_PER_UNIT.get(method, 1e-9) + float(fixed_seconds),
            "units": units,
            "detail": detail, "knobs": knobs or "steps / points / depth / samples"}


def _gib(x) -> str:
    return f"{x / GiB:.3g}"


def _seconds(s) -> str:
    if s < 120:
        return f"{s:.2g} s"
    if s < 7200:
        return f"{s / 60:.2g} min"
    if s < 48 * 3600:
        return f"{s / 3600:.2g} h"
    return f"{s / 86400:.2g} days"


def describe(est) -> str:
    """One line: memory (result + work), time, detail."""
    return (f"~{_gib(est['bytes'])} GiB (result arrays {_gib(est['result_bytes'])} GiB, work "
            f"{_gib(est['work_bytes'])} GiB), ~{_seconds(est['seconds'])}"
            + (f"; {est['detail']}" if est.get("detail") else ""))


def check(label, est, limit, given=False):
    """Raise ``ValueError`` when ``est["bytes"]`` exceeds ``limit`` bytes."""
    if est["bytes"] <= limit:
        return
    where = ("memory_limit" if given else "80% of the memory available now")
    raise ValueError(
        f"{label} needs ~{_gib(est['bytes'])} GiB (result arrays {_gib(est['result_bytes'])} "
        f"GiB, work {_gib(est['work_bytes'])} GiB) but {_gib(limit)} GiB are available "
        f"({where}); reduce {est['knobs']}, or pass memory_limit=... (GB) to override")
