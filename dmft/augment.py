"""Augmentations for self-supervised data (two views per sample; docs/theory.rst §7).

Each factory returns a callable ``augment(X, rng) -> X'`` that draws one random view of every
row of X (M, D) with the ``numpy.random.Generator`` ``rng``; :meth:`dmft.Dataset.augmented`
calls it twice (views A and B) with one generator seeded by ``seed``::

    data = dmft.Dataset.augmented(X, dmft.augment.gaussian_noise(0.3), dim=3, seed=0)

Built in: additive Gaussian noise and random masking for vectors, and integer shifts of
images stored as flattened rows (e.g. the 8 x 8 scikit-learn digits, :func:`shift`), and
:func:`compose` to chain them.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["gaussian_noise", "random_mask", "shift", "compose"]


def _real(name, value, lo, hi=np.inf, lo_open=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < lo or (lo_open and value == lo) or value > hi:
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise ValueError(f"{name} must be a finite number {bound}"
                         f"{'' if hi == np.inf else f' and <= {hi}'}, got {value!r}")
    return float(value)


def gaussian_noise(sigma: float):
    """X + sigma * xi, xi i.i.d. standard normal (the same sigma for every input)."""
    sigma = _real("sigma", sigma, 0.0)

    def augment(X, rng):
        return X + sigma * rng.standard_normal(X.shape)
    augment.__name__ = f"gaussian_noise({sigma:g})"
    return augment


def random_mask(p: float, rescale: bool = False):
    """Zero each input independently with probability p (``rescale``: divide the kept ones
    by 1 - p, as inverted dropout does)."""
    p = _real("p", p, 0.0, 1.0)
    if p == 1.0:
        raise ValueError("p must be < 1 (p = 1 masks every input: both views would be 0)")

    def augment(X, rng):
        keep = rng.random(X.shape) >= p
        out = X * keep
        return out / (1.0 - p) if rescale else out
    augment.__name__ = f"random_mask({p:g})"
    return augment


def shift(max_shift: int = 1, shape=(8, 8), fill: float = 0.0):
    """Shift each image (a row of X holding an image of ``shape``, row-major, like the
    scikit-learn digits) by integers (dy, dx) drawn uniformly from -max_shift .. max_shift,
    filling the pixels that enter with ``fill``."""
    if isinstance(max_shift, bool) or not isinstance(max_shift, numbers.Integral) \
            or max_shift < 0:
        raise ValueError(f"max_shift must be an integer >= 0 (pixels), got {max_shift!r}")
    h, w = (int(v) for v in shape)
    if max_shift >= min(h, w):
        raise ValueError(f"max_shift={max_shift} must be smaller than the image ({h} x {w})")

    def augment(X, rng):
        if X.shape[1] != h * w:
            raise ValueError(f"shift: rows of X must be {h} x {w} = {h * w} pixels (pass "
                             f"shape=), got D = {X.shape[1]}")
        imgs = X.reshape(-1, h, w)
        out = np.full_like(imgs, fill)
        d = rng.integers(-max_shift, max_shift + 1, size=(imgs.shape[0], 2))
        for k, (dy, dx) in enumerate(d):
            ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else \
                (slice(-dy, h), slice(0, h + dy))
            xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else \
                (slice(-dx, w), slice(0, w + dx))
            out[k, yd, xd] = imgs[k, ys, xs]
        return out.reshape(X.shape)
    augment.__name__ = f"shift({max_shift})"
    return augment


def compose(*augments):
    """Apply several augmentations in turn (each with the same generator)."""
    for a in augments:
        if not callable(a):
            raise ValueError(f"compose takes callables augment(X, rng), got {a!r}")

    def augment(X, rng):
        for a in augments:
            X = a(X, rng)
        return X
    augment.__name__ = "compose(" + ", ".join(getattr(a, "__name__", "?") for a in augments) + ")"
    return augment
