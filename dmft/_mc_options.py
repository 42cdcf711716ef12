"""The options of ``method="mc"`` / ``"gia"``: :class:`MCOptions`, the :data:`DEFAULTS`
that fill its None fields (documented in :class:`dmft._mc.MonteCarlo`), the sample counts
they resolve to, and the checks of what the deep regimes solve."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from . import _checkpoint
from ._method import (Options, boolean, int_at_least, is_callable, one_of, option,
                      positive_int, real_in)

__all__ = ["DEFAULTS", "MCOptions"]

#: default options (None in :class:`MCOptions`); chosen so that the benchmark sizes reach ~1e-2
#: on the predictions in about a minute or less on 2 cores (measurements: benchmarks/README.md)
DEFAULTS = {
    "samples_two_layer": 1 << 16,
    "samples_deep": 8192,
    "response_samples": 128,
    "kernel_samples": 4096,
    "damping": 1.0,
    "anderson": 0,
    "tol": 1e-4,
    "noise_factor": 0.25,
    "max_iter": 60,
    "blocks": 8,
    "sampler": "sobol",
    "deep_sources": "orthogonal",
    "initial_kernels": "exact",
    "tangent_blocks": "adaptive",
    "chunk_mb": 64.0,
    "window": 10,
    "replicates": 1,
    # one pass: samples // samples_per_replicate populations, clipped to [8, 16] (the
    # populations' fixed per-step cost weighs below ~1024 samples each: at 4096 / 8192 samples
    # in benchmarks/perf_mc.py case (b) 8 populations are 14 / 19 % faster than 16 at the same
    # variance per sample; at 16384 the two take the same time; benchmarks/README.md)
    "replicates_onepass": 16,
    "replicates_onepass_min": 8,
    "samples_per_replicate": 1024,
    "samples_onepass": 16384,
    "response_samples_onepass": 4,
    "scheme": "onepass",
    "src_rtol": 1e-6,
    "backward_sources": "auto",
    "response_control": True,
    "b_estimator": "auto",
    "stein_rtol": 1e-6,
}


#: bytes of memory available now (moved to :mod:`dmft._resources`; kept under this name)


def _auto_or_positive_int(what, words=("auto",)):
    """One of ``words`` or an integer >= 1 (``what`` explains the option)."""
    def check(name, value):
        if isinstance(value, str) and value in words:
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            said = ", ".join(f"'{w}'" for w in words)
            raise ValueError(f"{name} must be {said} or an integer >= 1 ({what}), got "
                             f"{value!r}")
        return int(value)
    return check


@dataclass(frozen=True)
class MCOptions(Options):
    """Options of ``method="mc"`` and ``"gia"`` (see :func:`solve_mc`); None: the default.

    The defaults are in :data:`DEFAULTS` (some depend on the depth and the ``scheme``).
    """

    samples: int | None = option(None, positive_int(" (Monte Carlo samples per layer)"),
                                 "Monte Carlo samples per layer")
    response_samples: int | None = option(
        None, positive_int(" (samples for the response tangents)"),
        "samples for the tangent estimates of A, B (L >= 2)",
        applies=("onepass", "iterative"))
    kernel_samples: int | None = option(
        None, positive_int(" (samples for the two-time kernels of two-layer networks)"),
        "L = 1: samples for the two-time kernels",
        applies=("two_layer",))
    damping: float | None = option(None, real_in(
        0, 1, "the weight of the new estimate in the mixing, e.g. damping=0.5"),
        "iterative: weight of the new estimate in the mixing",
        applies=("iterative",))
    anderson: int | None = option(None, int_at_least(0, "history length; 0 disables"),
                                  "iterative: Anderson mixing history",
                                  applies=("iterative",))
    tol: float | None = option(None, real_in(0, np.inf, "e.g. tol=1e-4"),
                               "iterative: residual tolerance",
                               applies=("iterative",))
    noise_factor: float | None = option(None, real_in(0, np.inf, "e.g. noise_factor=0.25"),
                                        "iterative: stop at this multiple of the noise floor",
                                        applies=("iterative",))
    max_iter: int | None = option(None, positive_int(" (iteration limit)"),
                                  "iterative: iteration limit",
                                  applies=("iterative",))
    blocks: int | None = option(
        None, positive_int(" (independent populations for standard errors)"),
        "L = 1: independent populations for the standard errors",
        applies=("two_layer",))
    chunk_mb: float | None = option(None, real_in(
        0, np.inf, "memory per chunk in MB, e.g. chunk_mb=64"), "memory per streamed chunk",
        applies=("iterative",))
    relu_eps: float | None = option(None, real_in(0, np.inf, "e.g. relu_eps=0.05"),
                                    "width of the smoothed delta for relu's phi''",
                                    applies=("onepass", "iterative"))
    window: int | None = option(
        None, positive_int(" (first time horizon of the continuation in time)"),
        "iterative: first horizon of the continuation in time",
        applies=("iterative",))
    sampler: str | None = option(None, one_of(
        ("sobol", "random"), "{name} must be 'sobol' (randomised quasi-Monte Carlo) or "
        "'random' (i.i.d.), got {value!r}"), "'sobol' or 'random' sources",
        applies=("two_layer", "onepass"))
    deep_sources: str | None = option(None, one_of(
        ("orthogonal", "normal"), "{name} must be 'orthogonal' (moment-matched innovations, "
        "default) or 'normal' (i.i.d.), got {value!r}"),
        "one pass: the deeper layers' source innovations", applies=("onepass",))
    tangent_blocks: int | str | None = option(None, _auto_or_positive_int(
        "blocks of tangent samples, one per source time modulo their number",
        ("adaptive", "auto")),
        "one pass: which tangent samples carry which source times' directions",
        applies=("onepass",))
    initial_kernels: str | None = option(None, one_of(
        ("exact", "sampled"), "{name} must be 'exact' (the known NNGP kernels at t = 0, "
        "default) or 'sampled' (the population's estimates), got {value!r}"),
        "one pass: the t = 0 kernels the deeper sources are drawn with", applies=("onepass",))
    replicates: int | None = option(None, positive_int(
        " (independent fixed-point solutions for honest standard errors, L >= 2)"),
        "L >= 2: independent populations / solutions",
        applies=("onepass", "iterative"))
    b_estimator: str | None = option(None, one_of(
        ("auto", "tangent", "stein"), "{name} must be 'auto', 'tangent' or 'stein', got "
        "{value!r} ('auto': Stein's lemma for relu, tangents otherwise)"),
        "how B is estimated (L >= 2)",
        applies=("onepass", "iterative"))
    stein_rtol: float | None = option(None, real_in(0, 1, "e.g. stein_rtol=1e-6"),
                                      "'stein': innovation variance cut-off",
                                      applies=("onepass", "iterative"))
    response_control: bool | None = option(
        None, boolean(" (the control variate of the tangent responses)"),
        "control variate of the tangent responses",
        applies=("onepass", "iterative"))
    callback: object = option(None, is_callable("callback(iteration, state, residual)"),
                              "iterative: callback(iteration, state, residual)",
                              applies=("iterative",))
    scheme: str | None = option(None, one_of(
        ("onepass", "iterative"), "{name} must be 'onepass' (causal one-pass solver, "
        "default) or 'iterative' (alternating fixed-point iteration), got {value!r}"),
        "L >= 2: 'onepass' or 'iterative'",
        applies=("onepass", "iterative"))
    src_rtol: float | None = option(None, real_in(0, 1, "e.g. src_rtol=1e-6"),
                                    "one pass: source innovation cut-off",
                                    applies=("onepass",))
    backward_sources: str | None = option(None, one_of(
        ("auto", "factor", "mix"), "{name} must be 'auto', 'factor' (causal factor of G) or "
        "'mix' (Gaussian mixing of the upper layer's samples), got {value!r}"),
        "one pass: how the backward sources are drawn (C outputs)",
        applies=("onepass",))
    max_memory_gb: float | None = option(None, real_in(
        0, np.inf, "the memory a solve may use, in GB, e.g. max_memory_gb=8"),
        "one pass: refuse solves estimated above this memory",
        applies=("onepass",))
    checkpoint: object = option(
        None, _checkpoint.check_path,
        "one pass: checkpoint file, written after each replicate; a rerun resumes from it",
        applies=("onepass",))

    #: the regimes of ``applies=``: "two_layer" (depth 1, the forward march), "onepass" and
    #: "iterative" (depth >= 2, ``scheme``); an option given for another regime is an error
    REGIMES = {"two_layer": "two-layer networks (depth 1: one forward march)",
               "onepass": "the one-pass deep solver (scheme='onepass', the default)",
               "iterative": "the iterative deep solver (scheme='iterative')"}


def _value(opts, name, default_key=None):
    """An option's value, its default (:data:`DEFAULTS`, key ``default_key``) when None."""
    v = getattr(opts, name)
    return DEFAULTS[default_key or name] if v is None else v


def _sizes(net, opts):
    """The sample counts of a solve, defaults resolved: ``samples`` and ``replicates``; one
    pass: ``per_rep`` and ``tang_rep`` (march and tangent samples per replicate, the totals
    split equally; ``per_rep < 2`` is too few)."""
    L = net.depth
    scheme = _value(opts, "scheme")
    onepass = L >= 2 and scheme == "onepass"
    samples = _value(opts, "samples", "samples_two_layer" if L == 1 else
                     "samples_onepass" if onepass else "samples_deep")
    if opts.replicates is None and onepass:
        replicates = min(DEFAULTS["replicates_onepass"],
                         max(DEFAULTS["replicates_onepass_min"],
                             samples // DEFAULTS["samples_per_replicate"]))
    else:
        replicates = _value(opts, "replicates")
    per_rep = tang_rep = None
    if onepass:
        per_rep = 2 * (samples // (2 * replicates))
        if opts.response_samples is None:
            # the tangent noise (variance ~ b / response samples) and the march noise (~ a /
            # samples) balanced against their costs: ~1 tangent sample per 64 march samples
            # (1 per 128 before the moment-matched deeper innovations lowered a; measured in
            # benchmarks/README.md)
            tang_rep = max(DEFAULTS["response_samples_onepass"], per_rep // 64)
        else:
            tang_rep = -(-opts.response_samples // replicates)
        tang_rep = min(tang_rep, per_rep)
    return SimpleNamespace(scheme=scheme, onepass=onepass, samples=samples,
                           replicates=replicates, per_rep=per_rep, tang_rep=tang_rep)


def _check_deep_objective(data, train, scheme, method, responses):
    """ValueError (before any work) for what the deep regimes do not solve: the iterative
    scheme solves the plain problem only (one mse output, full batch, no weight decay); the
    gradient-independence ansatz has no weight-decay term in f(t+1) = f(t) + lr K Delta."""
    from ._method import FEATURES, features
    need = features(data, train)
    if scheme == "iterative" and need:
        what = "; ".join(FEATURES[k] for k in sorted(need))
        raise ValueError(
            f"method={method!r} with scheme='iterative' solves one mse output trained full "
            f"batch without weight decay, not {what}; use scheme='onepass' (the default)")
    if not responses and train.weight_decay > 0:
        raise ValueError(
            f"method={method!r} (the gradient-independence ansatz) reads the predictions from "
            f"f(t+1) = f(t) + lr K(t) Delta(t), which has no weight-decay term, at depth >= 2; "
            f"use method='mc' for weight_decay > 0")
