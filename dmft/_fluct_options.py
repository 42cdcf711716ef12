"""The options of :func:`dmft.fluctuations`, one frozen dataclass per method (validated on
construction, :mod:`dmft._method`), their defaults, and the selection of ``times``: the steps
at which the propagators compute the covariances (NaN elsewhere)."""
from __future__ import annotations

from dataclasses import dataclass

import numbers

import numpy as np

from ._method import Options, boolean, int_at_least, one_of, option, positive_int
from .specs import check_positive_int

_MOMENTS = ("auto", "exact", "sampled")
DEFAULT_SAMPLES = {"propagator": 20_000, "lazy": 200_000, "deep-propagator": 16384}
#: single-site samples for kappa (per-sample Jacobians and Hessians) in "deep-propagator"
DEFAULT_KAPPA_SAMPLES = 8192
#: "deep-propagator": independent sampled maps, whose spread puts the map's own noise in the
#: error bars (solvers.fluct.deep_mc.deep_propagator; coverage in benchmarks/README.md)
DEFAULT_MAP_REPLICATES = 4
#: "deep-propagator": a logged warning when the maps' noise variance exceeds this multiple of
#: kappa's (options["map_noise_ratio"]). Measured (benchmarks/README.md): 0.2-1 at the
#: defaults on the coverage problems, 2.7 at one pair of 2048-sample maps at 8 + 4 points and
#: 40 steps (still unbiased), 184-634 where 1024-sample maps blew up (tanh, depth 3, 4 + 2
#: points, 30 steps: VK 711 +- 2176 against 368 +- 33 from networks)
MAP_NOISE_WARN = 10.0
#: "propagator" with ``times``: by default 1 sample in 8 also carries tangents for the
#: response J (the rest feed kappa and the influence vectors only; a tangent march costs
#: ~50 x a plain one at P = 16, T = 100); measured in benchmarks/README.md (fluctuations.py,
#: part ``speed``)
DEFAULT_RESPONSE_FRACTION = 8
_SAMPLERS = ("random", "sobol")


def _times(name, value):
    """``times``: a non-empty sequence of integer steps (range checked against the solution
    by :func:`_resolve_times`); normalised to a tuple of ints."""
    fix = "; pass a list of steps, e.g. times=[-1] for the last step or times=[0, 10, 20]"
    if isinstance(value, (str, bytes, dict, set)) or np.ndim(value) != 1:
        raise ValueError(f"{name} must be None or a sequence of integer steps, got "
                         f"{value!r}{fix}")
    out = []
    for v in np.asarray(value, dtype=object).tolist():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must contain integer steps, got {v!r} in {value!r}{fix}")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name} is empty{fix} (or times=None for every step)")
    return tuple(out)


def _resolve_times(times, T):
    """Sorted distinct steps in 0 .. T (negative: from the end, -1 = T), or None."""
    if times is None:
        return None
    bad = [t for t in times if not -(T + 1) <= t <= T]
    if bad:
        raise ValueError(f"times={list(times)} has step(s) {bad} outside 0 .. {T} (or "
                         f"-{T + 1} .. -1 counted from the end) of the solution's {T} "
                         f"training steps; use steps in that range, e.g. times=[{T}]")
    return sorted({t % (T + 1) for t in times})


def _selected(cov, times):
    """The times x times blocks of a two-time (T1, T1, ...) covariance (all when None)."""
    cov = np.asarray(cov)
    return cov if times is None else cov[np.ix_(times, times)]


def _mask_times(res, times, T1, keys=("pred_cov", "ntk_var", "pred_cov_stderr",
                                      "ntk_var_stderr", "kappa")):
    """NaN outside the selected ``times`` (equal-time arrays) and outside the times x times
    blocks (``cov``), in place."""
    if times is None:
        return res
    off = np.ones(T1, dtype=bool)
    off[times] = False
    for key in keys:
        if res.get(key) is not None:
            res[key] = np.array(res[key], dtype=np.float64)
            res[key][off] = np.nan
    if res.get("cov") is not None:
        cov = np.array(res["cov"], dtype=np.float64)
        cov[off] = np.nan
        cov[:, off] = np.nan
        res["cov"] = cov
    return res


def _times_option():
    """The ``times`` field of the two propagators' options (validated by :func:`_times`)."""
    return option(None, _times, "steps at which to compute the covariances (None: every step)")


def _blocks(name, value):
    value = check_positive_int(name, value, " >= 2 (batch-means blocks for the error bars), "
                               "e.g. blocks=10")
    if value < 2:
        raise ValueError(f"{name} must be an integer >= 2 (batch-means blocks for the error "
                         f"bars), got {value}")
    return value


@dataclass(frozen=True)
class FluctuationOptions(Options):
    """Options every fluctuation method takes (see :func:`fluctuations`)."""

    center: bool = option(False, boolean(), "fluctuations of the centred model")
    ntk: bool = option(True, boolean(), "also compute ntk_var")


@dataclass(frozen=True)
class SampledOptions(FluctuationOptions):
    """Options of the methods that draw single-site samples."""

    samples: int | None = option(None, positive_int(" (single-site samples, e.g. "
                                                    "samples=20000)"), "single-site samples")
    blocks: int = option(10, _blocks, "batch-means blocks for the standard errors")


@dataclass(frozen=True)
class PropagatorOptions(SampledOptions):
    """Options of ``method="propagator"``."""

    chunk: int | None = option(None, positive_int(" (samples per batch, e.g. chunk=256) or None"),
                               "samples processed together")
    times: tuple | None = _times_option()
    response_samples: int | None = option(
        None, positive_int(" (samples whose tangents form the response J, e.g. 4096) or None"),
        "samples for the response J (default samples / 8)")
    sampler: str | None = option(None, one_of(_SAMPLERS, "sampler {value!r} is unknown; use "
                                                 "one of " + str(list(_SAMPLERS))),
                                 "i.i.d. ('random') or scrambled Sobol ('sobol'); default "
                                 "'sobol' with times, else 'random'")


@dataclass(frozen=True)
class LazyOptions(SampledOptions):
    """Options of ``method="lazy"``."""

    moments: str = option("auto", one_of(_MOMENTS, "moments {value!r} is unknown; use one of "
                                         + str(list(_MOMENTS))), "exact or sampled moments")


@dataclass(frozen=True)
class DeepPropagatorOptions(SampledOptions):
    """Options of ``method="deep-propagator"``."""

    kappa_samples: int | None = option(None, positive_int(" (samples for kappa, e.g. 8192)"),
                                       "samples for kappa")
    times: tuple | None = _times_option()
    map_replicates: int = option(
        DEFAULT_MAP_REPLICATES, positive_int(" (independent maps whose spread enters the "
                                             "error bars, e.g. map_replicates=4)"),
        "independent sampled maps (error bars include the map's noise)")
    ntk_rank: int | None = option(
        None, positive_int(" (principal directions of the NTK entries per time, e.g. "
                           "ntk_rank=8) or None"),
        "the sum of the NTK entries' N Var from this many principal directions plus probes "
        "(extras['ntk_var_total']; ntk_var is then NaN); None: every entry")
    ntk_probes: int = option(
        4, int_at_least(0, "Gaussian probes of the NTK entries outside the principal "
                           "directions, 0 or >= 2"),
        "probes of the remainder with ntk_rank")


@dataclass(frozen=True)
class AutoOptions(PropagatorOptions, LazyOptions, DeepPropagatorOptions):
    """Options of ``method="auto"``: those of every method it may choose; the ones that do
    not apply to the method chosen for a solution are refused then (:func:`fluctuations`)."""

