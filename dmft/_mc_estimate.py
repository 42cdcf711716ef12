"""Up-front memory and time estimate of ``method="mc"`` / ``"gia"`` (the ``estimate`` hook of
:class:`dmft._mc.MonteCarlo`; see :mod:`dmft._resources`)."""
from __future__ import annotations

from ._mc import _sizes, _value

__all__ = ["estimate_mc"]


def estimate_mc(net, data, train, opts, method: str, responses: bool):
    """Memory and time of ``method="mc"`` / ``"gia"`` before any work (None: options that
    ``_solve`` refuses with its own message).

    Result: phi, g and their standard errors (L, T1, T1, n, n), A, B (L-1, ...). One pass: a
    population's peak (:func:`solvers.mc.cost.estimate_memory`, kernels and running sums
    included) or, at the end, the flat means and standard errors plus their two-time copies.
    Two-layer march: the samples' fields, the kernels' three (n T1)^2 buffers per kernel and
    the flat + two-time results. Iterative: the state (all kernels) about 3 + 2 anderson times,
    the accumulators and the replicate solutions. Time: modelled flops (one-pass:
    :func:`solvers.mc.cost.estimate_flops`).
    """
    from solvers.mc.causal import estimate_flops_outputs, estimate_memory_outputs
    from solvers.mc.cost import estimate_flops
    from ._resources import estimate, kernel_bytes
    if train.gamma0 <= 0:
        return None
    L, P, n, T1 = net.depth, data.P, data.P + data.Q, train.steps + 1
    m = T1 * n
    K1 = kernel_bytes(1, T1, n)
    # C outputs (docs/theory.rst §7): G and the NTK over (point, output) pairs, C^2 times the
    # one-output size; the fields and tangents as in solvers.mc.causal.estimate_memory_outputs
    C = int(getattr(data, "C", 1)) if getattr(data, "multi_output", False) else 1

    def value(name, default_key=None):
        return _value(opts, name, default_key)

    sz = _sizes(net, opts)
    onepass, samples = sz.onepass, sz.samples
    small = 8 * T1 * n * n * 4 * C * C + 8 * T1 * n * 8 * C
    knobs = "steps / points / depth / samples"
    if L == 1:
        blocks, ks = value("blocks"), min(samples, value("kernel_samples"))
        result = (2 + 2 * C * C) * K1 + small
        kern = max(6 * K1 + 3 * 2048 * m * 8, 8 * K1) * C * C
        march = 8 * samples * (8 * n + 4) + 2 * 8 * max(blocks, 1) * T1 * n * n
        units = samples * T1 * n * (2 * P + 20) + 2 * ks * m * m
        knobs = "steps / points / kernel_samples"
        return estimate(method, result, kern + march, units,
                        f"two-layer march: {samples} samples, kernels from {ks}", knobs)
    # phi (+ se), g (+ se) C^2, A and B C each (A, B are not returned for C >= 2 but are
    # accumulated by the solver)
    nres = ((2 * L + 2 * L * C * C + 2 * (L - 1) * C) if responses
            else (2 * L + 2 * L * C * C))
    result = nres * K1 + small
    if onepass:
        replicates, per_rep = sz.replicates, sz.per_rep
        if per_rep < 2:
            return None
        tang_rep = sz.tang_rep if responses else 0
        b_est = value("b_estimator")
        stein = responses and (b_est == "stein" or (b_est == "auto" and net.activation == "relu"))
        tbytes = 4 if (responses and value("response_control")) else 8
        pop = estimate_memory_outputs(T1, n, P, L, per_rep, tang_rep, responses, stein,
                                      tbytes, C)
        peak = max(pop, 2 * nres * K1 + L * K1 * C * C) + small
        units = replicates * estimate_flops_outputs(T1, n, P, L, per_rep, tang_rep, responses,
                                                    C)
        knobs = ("steps / points / depth / samples / response_samples (or raise replicates: "
                 "memory ~ samples / replicates)")
        return estimate(method, result, peak, units,
                        f"one pass: {replicates} x {per_rep} samples ({tang_rep} tangent), "
                        f"{pop / 2 ** 30:.3g} GiB per population", knobs)
    replicates = sz.replicates
    anderson = value("anderson")
    nr = (L - 1) if responses else 0
    state = (2 * L + 2 * nr) * K1
    # march chunks of ~8 (S, T1 n) arrays, at most chunk_mb (solvers.mc.iterative)
    chunk = min(int(value("chunk_mb") * 1e6), (-(-samples // 8) + 1) * 64 * T1 * n)
    rs = min(samples, value("response_samples")) if responses else 0
    if responses:        # tangent sub-chunks, ~2 buffers of at most chunk_mb each
        per_t = 8 * (3 * T1 * P + T1 * n + 2 * n) * T1 * P
        chunk += 2 * min(int(value("chunk_mb") * 1e6), rs * per_t)
    it = (3 + 2 * anderson) * state + 8 * K1 + 2 * chunk
    reps = replicates * (4 * L + 2 * nr) * K1 + (2 * L * replicates * K1 if replicates > 1 else 0)
    peak = max(it, reps, 2 * nres * K1) + small
    sweeps = min(value("max_iter"), 20)
    units = replicates * sweeps * estimate_flops(T1, n, P, L, samples, rs, responses)
    return estimate(method, result, peak, units,
                    f"iterative: {replicates} x {samples} samples, ~{sweeps} sweeps", knobs)
