"""One population of the one-pass causal solver for any training objective (docs/theory.rst
§7): C outputs, any loss, weight decay toward the initialisation or zero, mini-batch schedules.
:func:`_population_objective` is the march of :mod:`solvers.mc.causal_population` with an
output index on the backward fields, memory weights a^(t-1-s) and the initial-weight channel
a^t (its docstring has the equations).
"""
from __future__ import annotations

import numpy as np

from ._common import _check_predictions
from .causal_layer import _Layer, _causal_gemm, _stein_row
from .responses import _lam
from .sources import _first_layer_sources


def _population_objective(kx, obj, act, L, gamma0, lr, T, S, Sr, seed, *, responses, stein,
                          cv, tdtype, eps, src_rtol, stein_rtol, divergence, bar,
                          sampler="sobol", mix=False, ortho=True, phi0=None, tblocks=1):
    """:func:`_population` for any training objective (docs/theory.rst §7): C outputs, any
    loss, weight decay, mini-batches (``obj``: :class:`solvers.objective.Objective`);
    ``phi0``, ``tblocks`` as there.

    With m(t, s) = a^(t-1-s) (:meth:`Objective.memory`) and iota(t) = a^t toward zero, else 1
    (:meth:`Objective.init_scale`, the initial-weight channel), per layer

        h_mu(t)    = iota(t) [u_mu(t) + gamma0 sum_{s<t} A^{l-1}_{mu,ac}(t,s) g_ac(s)]
                     + gamma0 lr sum_{s<t} m(t,s) Delta_ac(s) Phi^{l-1}_{mu a}(t,s) g_ac(s)
        z_mc(t)    = iota(t) [r_mc(t) + gamma0 sum_{s<=t} B^l_{mc,a}(t,s) phi(h_a(s))]
                     + gamma0 lr sum_{s<t} m(t,s) Delta_ac'(s) G^{l+1}_{mc,ac'}(t,s) phi(h_a(s))
        z^L_c(t)   = w_c(t) = iota(t) w_c(0) + gamma0 lr sum_{s<t} m(t,s) Delta_c(s) . phi(h^L(s))

    (sums over repeated indices: train points a, outputs c'), i.e. the plain march with the
    operators C(t, s) = iota(t) A(t, s) + lr m(t, s) Delta(s) Phi(t, s), D(t, s) = iota(t) B(t, s)
    + lr m(t, s) G(t, s) Delta(s) and sources iota(t) u, iota(t) r. A and B are derivatives in
    the raw sources u, r, so the tangents' direct terms are iota(s) and the control variates'
    first-order terms carry iota(s). Delta(t) = obj.delta(t, f(t)) (zero off-batch).

    Layout: the backward fields have rows (mu, c) point-major, so flat G is (T1 n C)^2 with
    index t n C + mu C + c, A^l is (T1 n, T1 n C), B^l (T1 n C, T1 n).

    ``mix``: the backward sources r^l by a fixed Gaussian mixing of the samples of g^{l+1}
    (:meth:`solvers.mc.causal_layer._Layer.draw_r_mix`, the same law as the causal factor's
    draw), the memory terms from the Delta-contracted histories and the result's G rows in
    single precision; chosen by :func:`solvers.mc.causal_layer.mixing_cheaper` (many outputs).
    """
    n = kx.shape[0]
    P, Cout = obj.P, obj.C
    Q = n - P
    T1 = T + 1
    m = T1 * n
    nC, PC, QC = n * Cout, P * Cout, Q * Cout
    mC = T1 * nC
    half = S // 2
    rng = np.random.default_rng(seed)
    iota = np.array([obj.init_scale(t) for t in range(T1)])
    phi_all, g_all = np.zeros((L, m, m)), np.zeros((L, mC, mC))
    layers = [_Layer(T1, n, P, S, Sr, r_sys=responses and l <= L - 2,
                     u_sys=responses and l >= 1 and not stein,
                     stein=responses and l >= 1 and stein, resp=responses, cv=cv,
                     tdtype=tdtype, src_rtol=src_rtol, stein_rtol=stein_rtol, C=Cout,
                     phi=phi_all[l], g=g_all[l], mix=mix, ortho=ortho,
                     tblocks=tblocks)
              for l in range(L)]
    A_all, B_all = np.zeros((L - 1, m, mC)), np.zeros((L - 1, mC, m))
    A, B = list(A_all), list(B_all)
    u1, w0h = _first_layer_sources(kx, half, rng, sampler, outputs=Cout)    # w0h (C, half)
    w0 = np.stack([w0h, -w0h], axis=2).reshape(Cout, S)        # antithetic pairs (u, +-r)
    wm = np.zeros((Cout, S))                # memory part of the readouts w_c(t)
    colsu = T1 * P * Sr                     # u-tangent directions (s, a, k)
    dwm = np.zeros((Cout, colsu), dtype=tdtype)
    f = np.zeros((T1, n, Cout))
    delta = np.zeros((T1, P, Cout))
    ntk = np.zeros((T1, n, Cout, n, Cout))
    eyeC = np.eye(Cout)
    tr = np.arange(P)
    te = np.arange(P, n)

    def lam2_of(ly, zz, k):
        """phi''(h) z over rows (mu, c) and the first k samples."""
        H = np.repeat(ly.H[:, :k], Cout, axis=0)
        PH = np.repeat(ly.PH[ly.t][:, :k], Cout, axis=0) if act == "tanh" else None
        return _lam(act, H, zz[:, :k], eps, PH)[1]

    for t in range(T1):
        a, e = t * n, (t + 1) * n
        ac, ec = t * nC, (t + 1) * nC
        it = iota[t]
        mw = obj.memory(t)                                   # (t,) a^(t-1-s)
        lrm = lr * mw
        cu1 = (t + 1) * P * Sr                  # u-tangent columns of directions s <= t
        # ------------- bottom-up: h^l(t), phi, Phi^l(t, <=t), A^l(t, <t), dh ---------------
        for l, ly in enumerate(layers):
            ly.t = t
            if l == 0:
                u = u1
                C3 = (lrm[None, :, None, None] * kx[:, None, :P, None]
                      * delta[None, :t, :, :])
            else:
                lo = layers[l - 1]
                u = ly.draw_u(lo.phi[a:e, :e], rng,
                              None if phi0 is None else phi0[l - 1])
                C3 = (it * A[l - 1][a:e, :t * nC].reshape(n, t, n, Cout)[:, :, :P, :]
                      + lrm[None, :, None, None]
                      * lo.phi[a:e, :a].reshape(n, t, n)[:, :, :P, None]
                      * delta[None, :t, :, :])
            Crow = np.ascontiguousarray(C3).reshape(n, t * PC)
            ly.u = u
            h = it * u
            if t:
                h = h + gamma0 * (Crow @ ly.Gtr[:t].reshape(t * PC, S))
            ly.forward(h, t, act, l + 1)
            # dh(t)/du_a(s), s <= t (direct term iota(t) at s = t plus gamma0 C dg(<t)), and
            # dh(t)/dr_ac(s), s < t; A(t, <t) from the latter
            dphi = ly.tangents_h(t, Crow, gamma0, it)
            if ly.r_sys and t:
                Arow = (dphi.reshape(n, t, PC, Sr).sum(-1, dtype=np.float64)
                        / (gamma0 * Sr)).reshape(n, t, P, Cout)
                if cv:
                    Arow += (C3 * iota[None, :t, None, None]
                             * (ly.psi[t, :, :t] - ly.psi_r[t, :, :t])[..., None])
                A[l][a:e, :t * nC].reshape(n, t, n, Cout)[:, :, :P, :] = Arow
        # ------------- top-down: z^l(t), g, G^l(t, <=t), B^{l-1}(t, <=t), dz ----------------
        for l in reversed(range(L)):
            ly = layers[l]
            if l == L - 1:
                w = it * w0 + wm                                        # (C, S)
                z = np.ascontiguousarray(np.broadcast_to(w[None], (n, Cout, S))).reshape(nC, S)
                # D^L_{mc, a}(t, s) = lr m(t, s) Delta_ac(s), s < t
                D4 = np.zeros((n, Cout, t + 1, n))
                D4[:, :, :t, :P] = (lrm[None, :, None] * delta[:t].transpose(2, 0, 1))[None]
                D4 = D4.reshape(nC, t + 1, n)
            else:
                up = layers[l + 1]
                if mix:
                    r = ly.draw_r_mix(up.G32[t], rng)
                else:
                    r = ly.draw_r(up.g[ac:ec, :ec], rng)
                # D(t, s) = iota(t) B^l(t, s) + lr m(t, s) sum_c' G^{l+1}_{mc, ac'}(t, s)
                # Delta_ac'(s) [s < t]
                D4 = it * B[l][ac:ec, :e].reshape(nC, t + 1, n)
                if mix:
                    if t:
                        D4[:, :t, :P] += up.mem_rows(up.G[t], t) * lrm[None, :, None]
                else:
                    mem = np.einsum("xsac,sac->xsa",
                                    up.g[ac:ec, :t * nC].reshape(nC, t, n, Cout)[:, :, :P, :],
                                    delta[:t]) * lrm[None, :, None]
                    D4[:, :t, :P] += mem
                Dtr = np.ascontiguousarray(D4[:, :, :P]).reshape(nC, (t + 1) * P)
                z = it * r + gamma0 * (Dtr @ ly.PHtr[:t + 1].reshape((t + 1) * P, S))
                if Q:
                    # test-test diagonal blocks (a test point sees only itself)
                    Dqq = D4.reshape(n, Cout, t + 1, n)[te, :, :, te]       # (Q, C, t+1)
                    z[PC:] += gamma0 * np.einsum("qcs,sqk->qck", Dqq,
                                                 ly.PHte[:t + 1]).reshape(QC, S)
            l1 = np.repeat(ly.lam1, Cout, axis=0)                        # rows (mu, c)
            g = l1 * z
            ly.backward(g, t, l + 1)
            if ly.r_sys or ly.u_sys:
                l1t = ly.lam1[:, :ly.Srt].astype(tdtype, copy=False)
                k = S if ly.u_sys else ly.Srt
                lam2 = lam2_of(ly, z, k)                                  # (n C, k)
                l2t = lam2[:, :ly.Srt].astype(tdtype, copy=False)
            if ly.r_sys:
                # dz_mc(t)/dr_ac(s), s <= t (train rows): direct iota(t) at s = t plus
                # gamma0 D dphi
                ly.r_tangent_g(t, Dtr, l1t, l2t, gamma0, it, t == T)
            if ly.u_sys:
                if l == L - 1:
                    dz = np.ascontiguousarray(np.broadcast_to(
                        dwm[None, :, :cu1], (n, Cout, cu1))).reshape(nC, cu1)
                else:
                    Dt = Dtr.astype(tdtype)
                    dz = _causal_gemm(Dt, ly.udphi, t + 1, t + 1, cu1 // (t + 1), gamma0)
                    if Q:
                        dz[PC:] += gamma0 * np.einsum(
                            "qcs,sqx->qcx", Dqq.astype(tdtype),
                            ly.udphi_te[:t + 1, :, :cu1]).reshape(QC, cu1)
                dg = ly.u_tangent_g(t, dz, l1t, l2t)
                Brow = dg.reshape(nC, t + 1, P, Sr).sum(-1, dtype=np.float64) / (gamma0 * Sr)
                l2_all = lam2.mean(-1)
                if cv:
                    psi = np.repeat(ly.psi[t, :, :t + 1] - ly.psi_r[t, :, :t + 1], Cout, axis=0)
                    Brow += D4[:, :, :P] * iota[None, :t + 1, None] * psi
                    l2_r = lam2[:, ly.tidx[t]].mean(-1)
                    Brow[:PC].reshape(P, Cout, t + 1, P)[tr, :, t, tr] += (
                        it * (l2_all[:PC] - l2_r[:PC]) / gamma0).reshape(P, Cout)
                Bb = B[l - 1][ac:ec, :e].reshape(nC, t + 1, n)
                Bb[:, :, :P] = Brow
                if Q:
                    # test sources: closed form over all samples (only their own point responds)
                    Dqq_l = D4.reshape(n, Cout, t + 1, n)[te, :, :, te]      # (Q, C, t+1)
                    blockqq = (Dqq_l * iota[None, None, :t + 1]
                               * ly.psi_qq[t, :t + 1].T[:, None, :])
                    blockqq[:, :, t] += it * l2_all[PC:].reshape(Q, Cout) / gamma0
                    Bb.reshape(n, Cout, t + 1, n)[te, :, :, te] = blockqq
            if ly.stein:
                _stein_row(ly, B[l - 1], layers[l - 1].phi, ly.u, g, t, n, gamma0, C=Cout)
        # ------------- predictions, NTK, Delta(t) ---------------------------------------
        top = layers[L - 1]
        if responses:
            f[t] = top.PH[t] @ w.T / (S * gamma0)
        K = top.phi[a:e, a:e][:, None, :, None] * eyeC[None, :, None, :]
        for l in range(L):
            lower = kx if l == 0 else layers[l - 1].phi[a:e, a:e]
            K = K + layers[l].g[ac:ec, ac:ec].reshape(n, Cout, n, Cout) * lower[:, None, :, None]
        ntk[t] = K
        _check_predictions(f[t], t, divergence)
        if t < T:
            delta[t] = obj.delta(t, f[t])[:P]
            if mix:
                for upper in layers[1:]:
                    upper.contract_delta(t, delta[t])
            if not responses:
                # GIA: f(t+1) = f(t) + lr K(t) Delta(t) (no weight decay: refused upstream)
                f[t + 1] = f[t] + lr * np.einsum("xcad,ad->xc", K[:, :, :P, :], delta[t])
            # memory part of the readouts: w_m(t+1) = a w_m(t) + gamma0 lr Delta(t)^T phi(t)
            wm = obj.a * wm + gamma0 * lr * (delta[t].T @ top.PHtr[t])
            if top.u_sys:
                dwm[:, :cu1] = obj.a * dwm[:, :cu1] + (gamma0 * lr) * (
                    delta[t].T.astype(tdtype) @ top.udphi[t, :, :cu1])
        if bar is not None:
            bar.update(1)
    return {"f": f, "ntk": ntk, "phi": phi_all, "g": g_all,
            "A": A_all if (responses and L >= 2) else None,
            "B": B_all if (responses and L >= 2) else None}
