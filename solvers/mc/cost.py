"""Cost model of the one-pass solver (:func:`solvers.mc.causal.solve_causal`): peak memory
and floating-point operations of one population."""
from __future__ import annotations

__all__ = ["estimate_memory", "estimate_flops"]


def estimate_memory(T1: int, n: int, P: int, depth: int, samples_per_population: int,
                    tangent_samples: int, responses: bool, stein: bool,
                    tangent_bytes: int = 4) -> int:
    """Peak bytes of one population of :func:`solve_causal` (all layers in flight).

    Fields: per layer phi(h), g, phi'(h) histories (T1 n S doubles each) and the source
    normals of u and r (T1 n S / 2 each); tangents: per tangent system the phi- and g-tangent
    histories (T1 x rows x T1 P Sr) in ``tangent_bytes``; kernels: Phi, G, A, B, the
    control-variate kernel and their population sums (flat (T1 n)^2 doubles).
    """
    L = int(depth)
    S = int(samples_per_population)
    m = T1 * n
    fields = L * (3 * m * S + m * S) * 8
    tang = 0
    if responses and L >= 2:
        cols = T1 * P * int(tangent_samples)
        nr = L - 1                                  # r-systems (layers 1 .. L-1)
        nu = 0 if stein else L - 1                  # u-systems (layers 2 .. L)
        tang = (nr * (2 * T1 * P) + nu * (T1 * n + T1 * P)) * cols * tangent_bytes
    kernels = (5 * L) * m * m * 8 * 3
    stein_b = (L - 1) * (n - P + 1) * T1 * (P + 1) * S * 8 if stein else 0
    return int(fields + tang + kernels + stein_b)


def estimate_flops(T1: int, n: int, P: int, depth: int, samples: int, tangent_samples: int,
                   responses: bool) -> float:
    """Floating-point operations of one population of :func:`solve_causal` (model).

    Per sample and layer ~ T1^2 (2 n P + 5 n^2) (memory terms of h and z, the causal sources
    u and r, the kernel rows of Phi, G and the control-variate kernel); per tangent sample and
    tangent system ~ 4 n P^2 T1^3 / 3 (the h- and z-parts of the T1 P directions, each causal).
    """
    L = int(depth)
    march = L * samples * T1 ** 2 * (2 * n * P + 5 * n * n)
    tang = 0.0
    if responses and L >= 2:
        tang = 2 * (L - 1) * tangent_samples * 4 * n * P * P * T1 ** 3 / 3
    return float(march + tang)
