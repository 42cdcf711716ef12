"""Hand-written forward-mode derivatives of one layer's single-site march (the kappa step of
:func:`solvers.fluct.kappa_stein.jvp_kappa_layer`).

The march of ``kappa_hessian._kappa_layer`` (``fields1``), with rows = samples,

    h(t) = u(t) + gamma0 C(t, <t) g(<t),   p = phi(h),
    z(t) = r(t) + gamma0 D(t, <=t) p(<=t), g = phi'(h) z,

has, along a source direction (du, dr), the tangent

    dh = du + gamma0 C dg,  dp = phi' dh,  dz = dr + gamma0 D dp,  dg = phi'' dh z + phi' dz,

and, for two directions A, B (the march is linear in the sources, so d2u = d2r = 0), the
mixed second derivative

    d2h = gamma0 C d2g,  d2p = phi'' dhA dhB + phi' d2h,  d2z = gamma0 D d2p,
    d2g = phi''' dhA dhB z + phi'' (d2h z + dhA dzB + dhB dzA) + phi' d2z.

Written out instead of ``torch.func.jvp``, the primal march runs once per chunk of samples
(not once per direction), the tangents of k directions per sample are (k, s, m) arrays that
broadcast the primal's derivatives, and there is no per-operation dispatch of forward-mode
AD, which was most of the kappa step's time (measured in benchmarks/README.md). The test
``tests/test_fluctuations_kappa_stein.py::test_hand_tangents_equal_autodiff`` checks both
orders against ``torch.func.jvp`` of a plain torch version of the march.
"""
from __future__ import annotations

__all__ = ["primal", "tangent", "second"]


def primal(torch, act, gamma0, C, D, T1, n, u, r):
    """The march on (s, m) sources: dict of phi ``p``, g ``g``, z ``z`` (s, m) and the
    activation's derivatives ``d1``, ``d2``, ``d3`` at h (s, m)."""
    s, m = u.shape
    out = {k: torch.empty(s, m, dtype=u.dtype) for k in ("p", "g", "z", "d1", "d2", "d3")}
    P, G, Z = out["p"], out["g"], out["z"]
    for t in range(T1):
        a, e = t * n, (t + 1) * n
        h = u[:, a:e]
        if t:
            h = h + gamma0 * (G[:, :a] @ C[a:e, :a].T)
        P[:, a:e] = act(h, 0)
        z = r[:, a:e] + gamma0 * (P[:, :e] @ D[a:e, :e].T)
        Z[:, a:e] = z
        d1 = act(h, 1)
        out["d1"][:, a:e] = d1
        out["d2"][:, a:e] = act(h, 2)
        out["d3"][:, a:e] = act(h, 3)
        G[:, a:e] = d1 * z
    return out


def tangent(torch, pr, gamma0, C, D, T1, n, du=None, dr=None):
    """First derivatives along k directions per sample: ``du``, ``dr`` (k, s, m) or None
    (zero). Returns dict ``p``, ``g``, ``z``, ``h`` (k, s, m)."""
    x = du if du is not None else dr
    k, s, m = x.shape
    out = {key: torch.empty(k, s, m, dtype=x.dtype) for key in ("p", "g", "z", "h")}
    dP, dG, dZ, dH = out["p"], out["g"], out["z"], out["h"]
    d1, d2, Z = pr["d1"], pr["d2"], pr["z"]
    for t in range(T1):
        a, e = t * n, (t + 1) * n
        dh = du[:, :, a:e] if du is not None else torch.zeros(k, s, n, dtype=x.dtype)
        if t:
            dh = dh + gamma0 * (dG[:, :, :a] @ C[a:e, :a].T)
        dH[:, :, a:e] = dh
        dP[:, :, a:e] = d1[:, a:e] * dh
        dz = gamma0 * (dP[:, :, :e] @ D[a:e, :e].T)
        if dr is not None:
            dz = dz + dr[:, :, a:e]
        dZ[:, :, a:e] = dz
        dG[:, :, a:e] = d2[:, a:e] * dh * Z[:, a:e] + d1[:, a:e] * dz
    return out


def second(torch, pr, gamma0, C, D, T1, n, tA, tB):
    """Mixed second derivatives along direction pairs (A_i, B_i) from their first-order
    tangents ``tA``, ``tB`` (dicts of :func:`tangent`; (k, s, m), or (1, s, m) to broadcast
    one direction per sample over the k of A). Returns dict ``p``, ``g``, ``z`` (k, s, m)."""
    k, s, m = tA["h"].shape
    dt = tA["h"].dtype
    out = {key: torch.empty(k, s, m, dtype=dt) for key in ("p", "g", "z")}
    qP, qG, qZ = out["p"], out["g"], out["z"]
    d1, d2, d3, Z = pr["d1"], pr["d2"], pr["d3"], pr["z"]
    for t in range(T1):
        a, e = t * n, (t + 1) * n
        hA, hB = tA["h"][:, :, a:e], tB["h"][:, :, a:e]
        zA, zB = tA["z"][:, :, a:e], tB["z"][:, :, a:e]
        hAB = hA * hB
        if t:
            qh = gamma0 * (qG[:, :, :a] @ C[a:e, :a].T)
            qP[:, :, a:e] = d2[:, a:e] * hAB + d1[:, a:e] * qh
        else:
            qh = None
            qP[:, :, a:e] = d2[:, a:e] * hAB
        qz = gamma0 * (qP[:, :, :e] @ D[a:e, :e].T)
        qZ[:, :, a:e] = qz
        zt = Z[:, a:e]
        inner = hA * zB + hB * zA
        if qh is not None:
            inner = inner + qh * zt
        qG[:, :, a:e] = d3[:, a:e] * hAB * zt + d2[:, a:e] * inner + d1[:, a:e] * qz
    return out
