"""The deep propagator's noise covariance kappa without per-sample Hessians (issue 21).

:func:`solvers.fluct.deep_mc.deep_propagator` needs, for each layer and pair of observables
(i, j), the single-site covariance of the contracted averages::

    X_i = Y_i + <J_i^a, phi rho_r^T> + <J_i^b, g rho_u^T>,
    Y_i = <J_i^pp, phi phi^T> + <J_i^gg, g g^T> + <J_i^f, z phi>,

with the formal MSR rules for the response fields: <F rho_c> = <dF/dsrc_c>,
<F rho_c rho_d> = <d^2 F / dsrc_c dsrc_d>, the derivatives being *partial* derivatives of the
layer's march in each source coordinate (u, r at every point and time; ``_kappa_layer`` and,
for linear networks, the exact :mod:`solvers.fluct.deep_linear`). In the joint source
s = (u, r) (2m coordinates, m = n (T + 1)) the response part is a first-order operator
V_i . d/ds with the per-sample direction V_i = (J_i^b^T g, J_i^a^T phi), and::

    M1_i  = E[Y_i + div V_i],
    M2_ij = E[Y_i Y_j + Y_i div V_j + Y_j div V_i + V_j . grad Y_i + V_i . grad Y_j
              + V_j . grad div V_i + V_i . grad div V_j + tr(grad V_i grad V_j)
              + div V_i div V_j],                                                  (1)

N kappa_ij = M2_ij - M1_i M1_j (expand d_c d_d (V_i,c V_j,d) and d_c (Y V_j,c)).
``_kappa_layer`` evaluates (1) from per-sample Jacobians and Hessians, (chunk, m, m, m) per
layer: ~1 GB per sample at m = 492 (the out-of-memory failure of issue 21).

Exact route (``kappa="jvp"``, :func:`jvp_kappa_layer`, the default)
-------------------------------------------------------------------
Every term of (1) is a directional derivative of the march or a trace of one:

* V_j . grad Y_i: grad Y_i in the fields (2 J^pp_sym phi + J^f z, 2 J^gg_sym g, J^f phi)
  contracted with the forward-mode tangent of (phi, g, z) along V_j: K tangents per sample.
* div V_i = tr(J_i^T dF/dsrc) (F = phi for channel a, g for b), exactly by default
  (``divergence="exact"``, :func:`_exact_divergence`): the Jacobian dF/dsrc of each sample,
  one unit direction per source coordinate. The march is causal, so a direction at time t0
  has no tangent before t0 and marches on the trailing blocks only (about 2 m^3 / 3 flops per
  sample and channel, a third of full marches), and the traces are O(K m^2). Then
  div V_i div V_j, Y_i div V_j and M1 carry no probe noise. ``divergence="probe"`` (the
  route before 7 Dec 2026): Hutchinson, E_zeta[(J_i zeta) . (dF/dsrc zeta)] with Rademacher
  zeta (E zeta zeta^T = I), one tangent per probe, two independent probes per sample for an
  unbiased product (D^1_i D^2_j). Its variance per sample was 70-285 times the divergences'
  own spread over samples (tanh depth 2, 8 + 4 points, 40 steps, the propagator's J: probe
  variance sum_{k<l} (B_kl + B_lk)^2 of B = J_i^T dF/dsrc, from the exact Jacobians of 48
  samples, against the samples' variance of tr B), and the probes were most of kappa's
  error (benchmarks/README.md, "Exact divergences in kappa").
* V_j . grad div V_i = E_zeta[(J_i zeta) . d_zeta d_{V_j} F]: a second-order forward tangent
  (forward over forward) with V_j held fixed; the same nested pass also gives the first-order
  tangents along V_j.
* tr(grad V_i grad V_j) = E_zeta[zeta^T grad V_i (grad V_j zeta)]: grad V_j zeta =
  (J_j^b^T d_zeta g, J_j^a^T d_zeta phi) =: W_j, then (J_i zeta) . d_{W_j} F: K tangents.

Each channel (a: sources r, field phi; b: sources u, field g) gets its own probes (a probe
shared by both would add the zero-mean but large cross terms zeta_u . dg/dr zeta_r). All
derivatives are the exact partial derivatives of the same march as ``_kappa_layer``, so the
two routes estimate the same moments (checked on the same samples to the error of their
difference, ``tests/test_fluctuations_kappa_stein.py``); the probes only add variance.
Cost per sample, besides the exact divergences: about (2 + 5 K) (middle layers: 10 K) march
evaluations, each O(m^2) flops as GEMMs over (K chunk) rows; memory: the J's themselves (K m^2
each) and O(K chunk m) work space (the exact divergences add O(n chunk m) per time step of
directions). No Hessian, and no Jacobian beyond the divergences'. The derivatives of the march
are written out (:mod:`solvers.fluct.march_tangents`, checked against ``torch.func.jvp``);
through ``torch.func.jvp`` the per-operation dispatch of forward-mode AD was most of the time
(tanh depth 2, 4 + 2 points, 15 steps, 4096 samples: kappa 50 s -> 6 s). What remains is
mostly the products of the samples with the adjoint rows, O(K m^2) per sample: J^pp, J^gg
enter through their symmetric parts (one product each), J^a, J^b are causal and their products
skip the zero blocks (:func:`_xJ`, :func:`_Jx`), and they use every thread (synthetic middle
layer, m = 492, K = 90: 55.7 -> 36.6 ms per sample on one thread). ``dtype=torch.float32``
(the deep propagator's default, ``kappa_precision="single"``) runs the per-sample work in
single precision and sums the moments in double: 5e-8 - 7e-7 relative to double on the same
samples and probes, far below the sampling error; with chunks of 128 samples (the
per-operation overhead of the marches amortised) 0.11 ms per sample and row against 0.23 in
double with chunks of 32 (m = 492, 32 rows, two threads).

Stein route (``kappa="stein"``, :func:`stein_kappa_layer`): no derivatives at all
---------------------------------------------------------------------------------
The map draws u = F_u xi_u, r = F_r xi_r from standard normals of the kept innovations
(F = K[:, keep] L^{-T}). Gaussian integration by parts, E[F xi_k] = E[dF/dxi_k] and
E[F (xi_k xi_l - delta_kl)] = E[d^2 F / dxi_k dxi_l], turns (1) into moments of::

    X_i = Y_i + alpha_i . xi_r + beta_i . xi_u,
    alpha_i = L_r^{-1} (J_i^a^T phi)[keep_r],   beta_i = L_u^{-1} (J_i^b^T g)[keep_u],
    N kappa_ij = Cov_s(X_i, X_j) - E[alpha_i . alpha_j + beta_i . beta_j]

(xi_r, xi_u independent: the mixed pairs need no correction). Cost K m^2 per sample as
GEMMs. It is exact when every innovation is kept (then d/dsrc = L^{-T} d/dxi), but measured
unusable as a default (tests/test_fluctuations_kappa_stein.py).
(i) its noise grows as 1 / (smallest kept innovation): the adjoint rows J are causally
truncated, so J^T phi has components of O(1) along innovations of variance down to ``rtol``
(1e-3) of a source's; on the linear depth-2 test case the first layer's standard error is
10.6 times the Hessian route's and the end-to-end prediction covariance's 140 times its
largest entry;
(ii) Stein's lemma sees derivatives only along the sources' support, while (1) needs partial
derivatives along every source coordinate, including the directions where the sources are
(nearly) degenerate (linear networks: the kept innovations are 3-5 of 12): bias of 5 % of
the largest entry, 10 standard errors, on the last layer of the same case.
"""
from __future__ import annotations

import numpy as np

from . import march_tangents as mt

__all__ = ["jvp_kappa_layer", "stein_kappa_layer"]


def block_chunks(edges, chunk):
    """(block, slice) pairs over the batch-means blocks [edges[b], edges[b + 1]) of the
    samples, in slices of at most ``chunk`` samples (the loop of every kappa route)."""
    for b in range(len(edges) - 1):
        for c0 in range(edges[b], edges[b + 1], chunk):
            yield b, slice(c0, min(edges[b + 1], c0 + chunk))


def moment_sums(edges, K):
    """Zeroed per-block sums of the first (K,) and second (K, K) moments."""
    nb = len(edges) - 1
    return [np.zeros(K) for _ in range(nb)], [np.zeros((K, K)) for _ in range(nb)]


def stein_kappa_layer(torch, fl, Jl, first, last, edges, chunk, *, keep_u, keep_r,
                      progress=None):
    """Per-block sums of the formal first and second moments of X_i for one layer by Stein's
    lemma in the whitened sources (module docstring, "Stein route"), a drop-in for
    ``kappa_hessian._kappa_layer``: ``m1[b]`` (K,) = sum over the block's samples of X_i,
    ``m2[b]`` (K, K) = sum of X_i X_j - alpha_i . alpha_j - beta_i . beta_j.

    Parameters
    ----------
    fl : dict of torch tensors from ``deep_mc.sweep(keep_fields=True)``: ``phi``, ``g``, ``z``
        (m, S) fields; ``xi_u`` (S, k_u), ``xi_r`` (S, k_r) the standard normals of the kept
        innovations; ``Ku``, ``Kr`` (m, m) the source covariances the map whitened.
    Jl : dict of the adjoint rows of this layer: ``pp``, ``gg``, ``a``, ``b`` (K, m, m),
        ``f`` (K, m).
    first, last : bool
        Layer 1 has no B channel; the last layer has no A channel (r = w) and has the output
        channel <J^f, z phi>.
    edges : (blocks + 1,) sample edges of the blocks; chunk : samples per GEMM.
    keep_u, keep_r : kept innovations of u and r (the map's ``keep_u[l]``, ``keep_r[l]``).
    progress : callable, optional, called with the number of samples done.
    """
    dt = Jl["pp"].dtype
    K = Jl["pp"].shape[0]
    m = Jl["pp"].shape[1]
    use_a, use_b = not last, not first
    # quadratic forms: (s, m) @ (m, K m) with J viewed as (K m, m) (no copy)
    Jp = Jl["pp"].reshape(K * m, m)
    Jg = Jl["gg"].reshape(K * m, m)
    Jf = Jl["f"]

    def fold(Jc, K_src, keep):
        """(K k, m) rows of L^{-1} J_c[:, :, keep]^T: alpha_i = L^{-1} (J_i^T field)[keep]."""
        keep = np.asarray(keep)
        Lc = torch.linalg.cholesky(K_src[keep][:, keep])
        out = torch.linalg.solve_triangular(Lc, Jc[:, :, keep].transpose(1, 2), upper=False)
        return out.reshape(K * len(keep), m), len(keep)

    if use_a:
        JaT, kr = fold(Jl["a"], fl["Kr"], keep_r)
    if use_b:
        JbT, ku = fold(Jl["b"], fl["Ku"], keep_u)
    m1, m2 = moment_sums(edges, K)
    for b, sl in block_chunks(edges, chunk):
        ph, gg, zz = fl["phi"][:, sl].T, fl["g"][:, sl].T, fl["z"][:, sl].T    # (s, m)
        s = ph.shape[0]
        X = ((ph @ Jp.T).reshape(s, K, m) * ph[:, None, :]).sum(2)
        X += ((gg @ Jg.T).reshape(s, K, m) * gg[:, None, :]).sum(2)
        if last:
            X += (zz * ph) @ Jf.T
        corr = torch.zeros(K, K, dtype=dt)
        if use_a:
            al = (ph @ JaT.T).reshape(s, K, kr)
            X += torch.bmm(al, fl["xi_r"][sl, :, None])[:, :, 0]
            ala = al.transpose(0, 1).reshape(K, s * kr)
            corr += ala @ ala.T
        if use_b:
            be = (gg @ JbT.T).reshape(s, K, ku)
            X += torch.bmm(be, fl["xi_u"][sl, :, None])[:, :, 0]
            bea = be.transpose(0, 1).reshape(K, s * ku)
            corr += bea @ bea.T
        m1[b] += X.sum(0).numpy()
        m2[b] += (X.T @ X - corr).numpy()
        if progress is not None:
            progress(sl.stop)
    return {"m1": m1, "m2": m2}


def _bands(T1, n, nb=8):
    """Row bands (r0, r1) of flat indices, whole time blocks, for products with causal
    (block lower triangular) adjoint rows: J[:, r0:r1] vanishes beyond column r1."""
    cuts = np.unique(np.linspace(0, T1, min(nb, T1) + 1).astype(int))
    return [(int(a) * n, int(b) * n) for a, b in zip(cuts[:-1], cuts[1:])]


def _xJ(torch, x, J, bands):
    """x @ J for x (s, m) and block lower triangular J (K, m, m): (K, s, m), skipping the
    zero blocks above the diagonal (about half the flops with 8 bands: 56 %)."""
    K, m = J.shape[0], J.shape[1]
    out = torch.zeros(K, x.shape[0], m, dtype=J.dtype)
    for r0, r1 in bands:
        out[:, :, :r1] += torch.matmul(x[None, :, r0:r1], J[:, r0:r1, :r1])
    return out


def _Jx(torch, J, xT, bands):
    """J @ xT for block lower triangular J (K, m, m) and xT (m, s): (K, m, s)."""
    out = torch.empty(J.shape[0], J.shape[1], xT.shape[1], dtype=J.dtype)
    for r0, r1 in bands:
        out[:, r0:r1] = torch.matmul(J[:, r0:r1, :r1], xT[:r1])
    return out


def _exact_divergence(torch, pr, gamma0, C, D, T1, n, Jc, slot, fkey, tgroup=2):
    """div V_i = tr(J_i^T dF/dsrc) exactly, (s, K): the Jacobian of the field in this
    channel's sources, a unit direction per source coordinate. The march is causal, so the
    directions at times t0 .. t0 + tgroup - 1 have zero tangents before t0 and march from t0
    on the trailing blocks of C, D and the primal (about a third of a full march's flops)."""
    s, m = pr["p"].shape
    K = Jc.shape[0]
    out = torch.zeros(s, K, dtype=Jc.dtype)
    for t0 in range(0, T1, tgroup):
        t1 = min(T1, t0 + tgroup)
        c0, c1 = t0 * n, t1 * n
        k = c1 - c0
        prs = {key: v[:, c0:] for key, v in pr.items()}
        x = torch.zeros(k, s, m - c0, dtype=Jc.dtype)
        x[torch.arange(k), :, torch.arange(k)] = 1.0
        t = mt.tangent(torch, prs, gamma0, C[c0:, c0:], D[c0:, c0:], T1 - t0, n,
                       du=x if slot == 0 else None, dr=x if slot == 1 else None)
        F = t[fkey]                                        # (k, s, m - c0): dF_q / dsrc_j
        out += torch.einsum("iqj,jsq->si", Jc[:, c0:, c0:c1], F)
    return out


def jvp_kappa_layer(torch, fl, Jl, first, last, edges, chunk, *, gamma0, act, T1, n,
                    seed=0, progress=None, dtype=None, divergence="exact"):
    """Per-block sums of the formal first and second moments of X_i for one layer, a drop-in
    for ``kappa_hessian._kappa_layer`` with the same exact partial derivatives in the sources
    but no Hessian tensor: directional derivatives (forward mode) along K directions per
    sample, each sample's Jacobian for the divergences (or, with ``divergence="probe"``,
    Hutchinson probes) and one probe for the second-order traces (module docstring, "Exact
    route").

    ``fl`` needs ``phi``, ``g``, ``z`` (m, S), ``u``, ``r`` (S, m), ``C``, ``D`` (m, m);
    ``Jl`` as :func:`stein_kappa_layer`; ``act`` the activation (``deep_mc._activation``);
    ``seed`` (int or SeedSequence) draws the Rademacher probes. ``dtype`` (a torch dtype)
    runs the per-sample work in that precision (the moments are summed in double precision).
    ``divergence``: "exact" (the divergences from each sample's Jacobian,
    :func:`_exact_divergence`) or "probe" (Hutchinson, two probes per sample; module
    docstring).
    """
    if divergence not in ("exact", "probe"):
        raise ValueError(f"divergence={divergence!r}: use 'exact' or 'probe'")
    if dtype is not None:
        Jl = {k: v.to(dtype) for k, v in Jl.items()}
        fl = {k: (v.to(dtype) if k in ("phi", "g", "z", "u", "r", "C", "D") else v)
              for k, v in fl.items()}
    dt = Jl["pp"].dtype
    K, m = Jl["pp"].shape[0], Jl["pp"].shape[1]
    use_a, use_b = not last, not first
    # Y_i = phi^T J^pp_i phi + g^T J^gg_i g only sees the symmetric parts, and its gradient
    # is 2 J_sym phi: one product with J per field instead of two
    Jp = 0.5 * (Jl["pp"] + Jl["pp"].transpose(1, 2))
    Jg = 0.5 * (Jl["gg"] + Jl["gg"].transpose(1, 2))
    Jf = Jl["f"]
    Ja, Jb = Jl["a"], Jl["b"]
    C, D = fl["C"], fl["D"]
    bands = _bands(T1, n)           # J^a, J^b are causal: products skip their zero blocks
    rng = np.random.default_rng(seed)

    chans = ([("a", Ja, 1)] if use_a else []) + ([("b", Jb, 0)] if use_b else [])
    # channel a: source r (slot 1 of (u, r)), field phi (slot 0 of (phi, g, z));
    # channel b: source u (slot 0), field g (slot 1)

    def probe(s):
        """Rademacher probes (s, m), one per channel, in that channel's own source space:
        a probe shared across channels would add the zero-mean but large cross terms
        (zeta_u . d g / dr zeta_r) to every trace."""
        return [torch.as_tensor(rng.integers(0, 2, size=(s, m)) * 2.0 - 1.0, dtype=dt)
                for _ in chans]

    m1, m2 = moment_sums(edges, K)
    for b, sl in block_chunks(edges, chunk):
        u, r = fl["u"][sl], fl["r"][sl]                                        # (s, m)
        ph, gg, zz = fl["phi"][:, sl].T, fl["g"][:, sl].T, fl["z"][:, sl].T    # (s, m)
        s = ph.shape[0]
        # physical part Y_i and its gradients in the fields, (K, s, m)
        Jp_ph, Jg_g = torch.matmul(ph[None], Jp), torch.matmul(gg[None], Jg)  # (K, s, m)
        Y = (Jp_ph * ph[None]).sum(2).T + (Jg_g * gg[None]).sum(2).T         # (s, K)
        dYp = 2.0 * Jp_ph
        dYg = 2.0 * Jg_g
        dYz = None
        if last:
            Y = Y + (zz * ph) @ Jf.T
            dYp = dYp + Jf[:, None, :] * zz[None]
            dYz = Jf[:, None, :] * ph[None]
        # the directions V_i = (Jb_i^T g, Ja_i^T phi) in the (u, r) sources, (K, s, m)
        Vu = _xJ(torch, gg, Jb, bands) if use_b else None
        Vr = _xJ(torch, ph, Ja, bands) if use_a else None
        # forward-mode derivatives of the march written out (solvers.fluct.march_tangents):
        # the primal once per chunk, first-order tangents along V_j once for both channels
        pr = mt.primal(torch, act, gamma0, C, D, T1, n, u, r)
        tV = mt.tangent(torch, pr, gamma0, C, D, T1, n, du=Vu, dr=Vr)
        vp, vg, vz = tV["p"], tV["g"], tV["z"]
        # V_j . grad Y_i
        E = torch.einsum("ism,jsm->ij", dYp, vp) + torch.einsum("ism,jsm->ij", dYg, vg)
        if dYz is not None:
            E = E + torch.einsum("ism,jsm->ij", dYz, vz)

        D1 = torch.zeros(s, K, dtype=dt)
        # exact divergences need no second estimate: D2 is D1 itself
        D2 = torch.zeros(s, K, dtype=dt) if divergence == "probe" else D1
        T3 = torch.zeros(K, K, dtype=dt)
        TR = torch.zeros(K, K, dtype=dt)
        z1, z2 = probe(s), probe(s)
        for (name, Jc, slot), zeta1, zeta2 in zip(chans, z1, z2):
            fkey = "p" if slot == 1 else "g"        # phi for channel a, g for channel b
            # two independent probes: divergences D^1, D^2 (unbiased product D^1 D^2)
            zz12 = torch.stack([zeta1, zeta2] if divergence == "probe" else [zeta1])
            t12 = mt.tangent(torch, pr, gamma0, C, D, T1, n,
                             du=zz12 if slot == 0 else None, dr=zz12 if slot == 1 else None)
            lhs1 = _Jx(torch, Jc, zeta1.T, bands)                      # (K, m, s)
            if divergence == "probe":
                lhs2 = _Jx(torch, Jc, zeta2.T, bands)
                D1 += torch.einsum("ias,sa->si", lhs1, t12[fkey][0])
                D2 += torch.einsum("ias,sa->si", lhs2, t12[fkey][1])
            else:
                D1 += _exact_divergence(torch, pr, gamma0, C, D, T1, n, Jc, slot, fkey)
            # V_j . grad div V_i: the mixed second derivative along V_j and the probe
            tz1 = {key: t12[key][:1] for key in ("p", "g", "z", "h")}
            d2 = mt.second(torch, pr, gamma0, C, D, T1, n, tV, tz1)
            T3 += torch.einsum("ias,jsa->ij", lhs1, d2[fkey])
            # tr(grad V_i grad V_j) = E[zeta^T grad V_i (grad V_j zeta)], the probe in
            # this channel's sources: W_j = grad V_j zeta has components in both
            Wu = _xJ(torch, t12["g"][0], Jb, bands) if use_b else None
            Wr = _xJ(torch, t12["p"][0], Ja, bands) if use_a else None
            dW = mt.tangent(torch, pr, gamma0, C, D, T1, n, du=Wu, dr=Wr)
            TR += torch.einsum("ias,jsa->ij", lhs1, dW[fkey])
        Dbar = 0.5 * (D1 + D2)
        M1 = Y + Dbar
        A2 = Y.T @ Dbar + E + T3
        M2 = Y.T @ Y + A2 + A2.T + 0.5 * (TR + TR.T) + 0.5 * (D1.T @ D2 + D2.T @ D1)
        m1[b] += M1.sum(0, dtype=torch.float64).numpy()
        m2[b] += M2.double().numpy()
        if progress is not None:
            progress(sl.stop)
    return {"m1": m1, "m2": m2}
