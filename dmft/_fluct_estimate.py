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
    and the flat (n T1)^2 accumulator (with ``times`` / ``response_samples`` / ``sampler``:
    the adjoint engine, its cost below); "lazy" the sampled per-unit kernels and n^4
    moments; "linear-exact" (n+1)^2 perturbed trajectories; "deep-linear" the adjoint
    rows n T1 (2 (n T1 + T1))^2 per layer and the march's graph; "deep-propagator" the
    value buffers and graph of the causal recursion (~23 L T1 n S floats), the batched
    backward's adjoint fields (<= 1.5 GB), the adjoint rows J (4 L K (n T1)^2 for K
    observables at the chosen ``times``) and the forward-mode kappa chunk; time calibrated on
    tanh depth 2 / 3, 8 + 4 points, 40 steps (2 shared cores, Dec 2026)."""
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
    fast = name == "propagator" and C == 1 and (
        getattr(opts, "times", None) is not None or getattr(opts, "response_samples", None)
        is not None or getattr(opts, "sampler", None) == "sobol")
    if fast:
        # the adjoint engine (solvers.fluct.propagator_times.two_layer_propagator_times): tangents
        # of R samples on the training points (~T^2 P^3 / 2 each) plus the selected rows;
        # three plain marches of every sample; one triangular solve per estimate (blocks + 1)
        # for the k (n + m) adjoint rows; J sums 2 k P T (n + m) + 2 T P T P; chunk buffers
        # ~32 MB x 4; block estimates 2 blocks T1 n^2; the response (T1, n, P T) and a copy
        # of the two-time result. Measured peak at 16 + 16 points, T = 100, one time: 0.6 GB
        # above the interpreter's 0.45 GB (estimate 0.47 GiB). Units calibrated to 5e-9 s (2 cores:
        # 5-7 ms per tangent sample at P = 16, T = 100, n = 32, one time).
        times = getattr(opts, "times", None)
        k = T1 if times is None else len(set(t % T1 for t in times if -T1 <= t <= T))
        mm = n * (n + 1) // 2 if opts.ntk else 0
        p = T * P
        R = min(samples, getattr(opts, "response_samples", None) or -(-samples // 8))
        result += 8 * 2 * blocks * T1 * n * n
        work = K1 + 8 * (16_000_000 + 2 * p * n * n + 4 * k * p * (n + mm) + 2 * T * p * P
                         + 2 * p * p + samples * (n + 1) + T1 * n * p)
        units = (R * (T * T * P * P * (P + 2) / 28 + k * T * P * n * (n + P) / 4)
                 + samples * (0.3 * T * n * P + 0.03 * p * k * (n + mm))
                 + (blocks + 1) * 0.005 * p * p * k * (n + mm))
    elif name == "propagator":
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
        # solvers.fluct.deep_causal (one backward pass per batch of observables) and
        # solvers.fluct.kappa_stein (forward-mode kappa); K observables at the chosen times
        ks = getattr(opts, "kappa_samples", None) or min(samples, DEFAULT_KAPPA_SAMPLES)
        times = getattr(opts, "times", None)
        nt = T1 if times is None else len(set(int(t) % T1 for t in times))
        E = n * (n + 1) // 2
        rank = getattr(opts, "ntk_rank", None)
        # ntk_rank: principal directions and probes instead of every NTK entry
        Kn = E if rank is None or rank >= E else rank + opts.ntk_probes
        K = nt * (n + (Kn if opts.ntk else 0))
        # map_replicates >= 2: pairs of maps, both maps' graphs retained during the pair's
        # kappa step, which asks for the adjoint rows one group of observables at a time (all
        # predictions; then 32 rows of NTK entries at a time), the rows of both maps stacked
        R = getattr(opts, "map_replicates", 1) or 1
        pairs, Sm = R > 1, samples // R                       # one map's samples
        nm = 2 if pairs else 1
        G = max(nt * n, (32 // nm) if opts.ntk else 0)        # the largest group
        # value buffers + retained graph (measured ~16 floats per layer, time, point and
        # sample once the freed pages are returned, solvers/_memory.py)
        # the tangent columns of the responses outside their structure (layers >= 1) count
        # as samples of the graph (solvers.fluct.deep_causal.tangent_count)
        from solvers.fluct.deep_causal import backward_batch, tangent_count
        Sg = Sm + T1 * (n - P) * tangent_count(Sm, T1 * (n - P))
        fields = nm * 8 * 16 * L * T1 * n * Sg
        if pairs:
            fields += 8 * 8 * L * T1 * n * 2 * ks // R        # a pair's fresh kappa samples
        # one backward batch per map (the maps of a pair side by side): observables per pass
        # as solvers.fluct.deep_causal chooses them (the cache-sized batch; a pair's maps side
        # by side at most solvers.fluct.deep_mc.PAIR_BATCH each)
        per_obs = 64 * L * T1 * n * Sg
        nb = backward_batch(L, T1, n, Sg)
        if pairs:
            from solvers.fluct.deep_mc import PAIR_BATCH
            nb = min(nb, PAIR_BATCH)
        transient = nm * nb * 3 * per_obs // 4              # measured ~3/4 of per_obs
        # a group's rows, + one stacked key in cat and kappa's symmetric J^pp, J^gg
        J = nm * (8 * L * (4 * G * m * m + G * m) + 8 * 3 * G * m * m)
        kappa = 300 * 128 * nm * G * m              # chunk 128, single precision
        work = fields + transient + J + kappa + 8 * 8 * L * m * m + torch_bytes
        startup = 5.0
        # measured 5 Dec 2026 (tanh, 8 + 4 points, 40 steps, depth 3, one pair of 2048-sample
        # maps, kappa 4096 samples, two cores): adjoint rows ~80 s (the maps side by side),
        # kappa ~190 s in single precision (benchmarks/README.md)
        units = 0.08 * (0.75 if pairs else 1.0) * K * L * T1 ** 2 * n ** 2 * samples + \
            0.07 * K * L * T1 ** 2 * n ** 2 * ks * (2 if pairs else 1)
    else:
        return None
    return estimate("fluctuations", result, result + work, units,
                    f"method={name!r}, n={n} points, T+1={T1} times",
                    knobs="steps / points / samples of the solution's problem",
                    fixed_seconds=startup)
