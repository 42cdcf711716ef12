"""The self-consistency loop, written once: damping or Anderson mixing, a stop rule against the
Monte Carlo noise floor, the residual history, one log line per iteration and a callback.

The engine supplies the map ``fmap(x) -> (y, residual, floor)``: ``y = F(x)`` is the new
estimate of the (flattened) order parameters, ``residual`` a scalar distance between ``y`` and
``x`` in the engine's own norm, and ``floor`` the Monte Carlo standard error of ``y`` in the
same norm (0 for deterministic maps). The loop stops when

    residual <= max(tol, noise_factor * floor)

and returns ``y`` (the last map output, so every returned quantity is one consistent set of
estimates). Iterating further than a fraction of the noise floor cannot improve the answer:
with common random numbers the map is a deterministic function of the samples, and its fixed
point differs from the infinite-sample one by about ``floor`` anyway.

Mixing (``x`` the input, ``y = F(x)``, ``r = y - x``):

- damping ``beta``: ``x <- x + beta r`` (``beta = 1`` is plain iteration);
- Anderson (type II, ``anderson = m > 0``): with the last ``m`` differences ``dX`` of inputs and
  ``dR`` of residuals, ``gamma = argmin |r - dR gamma|``, ``x <- x + beta r - (dX + beta dR)
  gamma`` (Walker & Ni 2011). The history is reset whenever the residual grows.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FixedPointResult", "iterate"]


@dataclass
class FixedPointResult:
    """Outcome of :func:`iterate`.

    ``x`` the last map output, ``converged``, ``iterations`` (map evaluations),
    ``residuals`` (iterations,), ``floors`` (iterations,), ``elapsed`` seconds, ``info``
    (``damping``: the final mixing weight after stall reductions; ``stalled``).
    """

    x: np.ndarray
    converged: bool
    iterations: int
    residuals: np.ndarray
    floors: np.ndarray
    elapsed: float = 0.0
    info: dict = field(default_factory=dict)


def iterate(fmap, x0, *, damping: float = 1.0, anderson: int = 0, tol: float = 1e-4,
            noise_factor: float = 0.25, max_iter: int = 50, min_iter: int = 1,
            divergence: float = 1e6, precondition=None, stall: int = 0,
            min_damping: float = 0.25, callback=None,
            logger: logging.Logger | None = None, bar=None,
            name: str = "fixed point") -> FixedPointResult:
    """Solve ``x = F(x)`` by damped (or Anderson-accelerated) iteration.

    Parameters
    ----------
    fmap : callable
        ``fmap(x) -> (y, residual, floor)`` as in the module docstring. May raise
        ``FloatingPointError`` for non-finite fields; it propagates.
    x0 : array (m,)
        Starting point (flattened order parameters).
    damping : float in (0, 1]
        Mixing weight beta of the new estimate.
    anderson : int
        History length m of Anderson mixing (0: plain damping).
    tol : float
        Absolute floor of the stop rule.
    noise_factor : float
        Stop once the residual is below this fraction of the Monte Carlo floor.
    max_iter, min_iter : int
        Bounds on the number of map evaluations.
    divergence : float
        A residual above this (or non-finite) raises ``FloatingPointError``.
    stall, min_damping : int, float
        If ``stall > 0``: halve the damping (not below ``min_damping``) whenever the residual
        has not reached a new minimum for ``stall`` iterations; once at ``min_damping`` and
        stalled again with ``residual <= floor`` the loop stops as converged
        (``info["stalled"]``): a sampled map that is discontinuous (ReLU's kink) jitters at
        the noise level and cannot be iterated below it.
    precondition : callable, optional
        ``precondition(x, r) -> r'``: an approximation of ``(I - F'(x))^{-1} r`` (a
        quasi-Newton step). Mixing and Anderson then act on ``r'`` instead of ``r``, i.e. on
        the preconditioned map ``x + r'(x)``, which has the same fixed points.
    callback : callable, optional
        ``callback(k, y, residual)`` after every map evaluation; returning True stops the loop
        (reported as not converged unless the stop rule also holds).
    logger : logging.Logger, optional
        One INFO line per iteration.
    bar : progress bar, optional
        Object with ``update(n)`` and ``set_postfix_str(s)`` (see :mod:`dmft._progress`).

    Returns
    -------
    FixedPointResult
    """
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")
    start = time.perf_counter()
    x = np.array(x0, dtype=np.float64, copy=True)
    residuals, floors = [], []
    best, best_k = np.inf, 0
    stalled = False
    dX, dR = [], []
    x_prev = r_prev = None
    converged = False
    y = x
    for k in range(1, max_iter + 1):
        y, res, floor = fmap(x)
        res, floor = float(res), float(floor)
        residuals.append(res)
        floors.append(floor)
        if res < best:
            best, best_k = res, k
        threshold = max(tol, noise_factor * floor)
        if logger is not None:
            logger.info("%s iteration %d: residual %.3e (stop below %.3e, noise floor %.3e)",
                        name, k, res, threshold, floor)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"residual {res:.2e} / {threshold:.1e}")
        if not np.isfinite(res) or res > divergence:
            raise FloatingPointError(
                f"{name} diverged at iteration {k} (residual {res:.3g})")
        stop = bool(callback(k, y, res)) if callback is not None else False
        if res <= threshold and k >= min_iter:
            converged = True
            break
        if (stall and damping <= min_damping and k - best_k >= stall and res <= floor
                and floor > 0):
            # the map jitters at the Monte Carlo noise level and the smallest step did not
            # settle it: every further change is within one standard error
            converged = True
            stalled = True
            if logger is not None:
                logger.info("%s stalled at the noise floor (residual %.3e <= floor %.3e): "
                            "accepted", name, res, floor)
            break
        if stop:
            break
        r = y - x
        if stall and k - best_k >= stall and damping > min_damping:
            # no new best residual for `stall` iterations: the map jitters at the noise
            # level (e.g. ReLU's kink makes a sampled map discontinuous); averaging the
            # iterates with a smaller step settles it
            damping = max(min_damping, 0.5 * damping)
            best_k = k
            dX.clear()
            dR.clear()
        if precondition is not None:
            r = precondition(x, r)
        if anderson > 0 and x_prev is not None:
            if len(residuals) >= 2 and residuals[-1] > residuals[-2]:
                dX.clear()
                dR.clear()
            else:
                dX.append(x - x_prev)
                dR.append(r - r_prev)
                if len(dX) > anderson:
                    dX.pop(0)
                    dR.pop(0)
        x_prev, r_prev = x, r
        if dX:
            mR = np.stack(dR, axis=1)
            gamma = np.linalg.lstsq(mR, r, rcond=1e-10)[0]
            x = x + damping * r - (np.stack(dX, axis=1) + damping * mR) @ gamma
        else:
            x = x + damping * r
    return FixedPointResult(x=y, converged=converged, iterations=len(residuals),
                            residuals=np.array(residuals), floors=np.array(floors),
                            elapsed=time.perf_counter() - start,
                            info={"damping": damping, "stalled": stalled})
