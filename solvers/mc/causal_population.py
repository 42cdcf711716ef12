"""One population of the one-pass causal solver, plain problem (one mse output, full batch,
no weight decay): :func:`_population`, the march of docs/theory.rst §2 in exact discrete time
described in :mod:`solvers.mc.causal` (bottom-up h, phi, Phi and A rows; top-down z, g, G and
B rows; then f(t), the NTK and Delta(t)). Any other objective: :mod:`solvers.mc.causal_objective`.
"""
from __future__ import annotations

import numpy as np

from ._common import _check_predictions
from .causal_layer import _Layer, _causal_gemm, _stein_row, _top_D
from .responses import _lam
from .sources import _first_layer_sources


def _population(kx, y, act, L, gamma0, lr, T, S, Sr, seed, *, responses, stein, cv, tdtype,
                eps, src_rtol, stein_rtol, divergence, record_sources, bar, sampler="sobol",
                ortho=True, phi0=None, tblocks=1):
    """One population of S samples (Sr of them with tangents) marched through all steps and
    layers; returns its own f, NTK, flat kernels and responses (and, with
    ``record_sources``, the sources u, r of every layer as (T1 n, S) arrays). ``phi0``
    (L, n, n) or None: the exact Phi^l(0, 0) (NNGP) that the sources u^{l+1}(0) are drawn
    with (:func:`solvers.mc.causal_layer._source_half`)."""
    n = kx.shape[0]
    P = y.shape[0]
    Q = n - P
    T1 = T + 1
    m = T1 * n
    half = S // 2
    rng = np.random.default_rng(seed)
    # the results are written in place into stacked arrays (no copy at the end)
    phi_all, g_all = np.zeros((L, m, m)), np.zeros((L, m, m))
    layers = [_Layer(T1, n, P, S, Sr, r_sys=responses and l <= L - 2,
                     u_sys=responses and l >= 1 and not stein,
                     stein=responses and l >= 1 and stein, resp=responses, cv=cv,
                     tdtype=tdtype, src_rtol=src_rtol, stein_rtol=stein_rtol,
                     phi=phi_all[l], g=g_all[l], ortho=ortho, tblocks=tblocks)
              for l in range(L)]
    # responses, flat (T1 n, T1 n): A[l] = A^{l+1}, B[l] = B^{l+1} (1-based layers)
    A_all, B_all = np.zeros((L - 1, m, m)), np.zeros((L - 1, m, m))
    A, B = list(A_all), list(B_all)
    # layer 1: u^1 constant in time, u = Fx xi with Fx the low-rank factor of Kx; with w(0)
    # these are rank(Kx) + 1 numbers per pair, drawn by randomised QMC (``sampler="sobol"``)
    u1, w0h = _first_layer_sources(kx, half, rng, sampler)
    w0 = np.stack([w0h, -w0h], axis=1).reshape(-1)     # antithetic pairs (u, r), (u, -r)
    w = w0.copy()                                       # z^L(t) = w(t), one scalar per sample
    cols_all = T1 * P * Sr
    dw = np.zeros(cols_all, dtype=tdtype)               # u-tangents of w (top layer)
    f = np.zeros((T1, n))
    delta = np.zeros((T1, P))
    ntk = np.zeros((T1, n, n))
    tr = np.arange(P)
    te = np.arange(P, n)
    rec = {"u": [np.zeros((m, S)) for _ in range(L)],
           "r": [np.zeros((m, S)) for _ in range(L)]} if record_sources else None
    for t in range(T1):
        a, e = t * n, (t + 1) * n
        cz1 = (t + 1) * P * Sr                  # tangent columns of directions s <= t
        # ------------- bottom-up: h^l(t), phi, Phi^l(t, <=t), A^l(t, <t), dh ---------------
        for l, ly in enumerate(layers):
            if l == 0:
                u = u1
                # C^1(t, s) = lr Delta(s) Kx for s < t (A^0 = 0)
                C3 = lr * kx[:, None, :P] * delta[None, :t, :]
            else:
                lo = layers[l - 1]
                u = ly.draw_u(lo.phi[a:e, :e], rng,
                              None if phi0 is None else phi0[l - 1])
                C3 = (A[l - 1][a:e, :a].reshape(n, t, n)[:, :, :P]
                      + lr * lo.phi[a:e, :a].reshape(n, t, n)[:, :, :P] * delta[None, :t, :])
            ly.C3 = C3
            Crow = np.ascontiguousarray(C3).reshape(n, t * P)
            if rec is not None:
                rec["u"][l][a:e] = u
            ly.u = u
            h = u + gamma0 * (Crow @ ly.Gtr[:t].reshape(t * P, S)) if t else u.copy()
            ly.forward(h, t, act, l + 1)
            # dh(t)/du(s), s <= t, and dh(t)/dr(s), s < t; A(t, <t) from the latter
            dphi = ly.tangents_h(t, Crow, gamma0, 1.0)
            if ly.r_sys and t:
                Arow = dphi.reshape(n, t, P, Sr).sum(-1, dtype=np.float64) / (gamma0 * Sr)
                if cv:
                    Arow += C3 * (ly.psi[t, :, :t] - ly.psi_r[t, :, :t])
                A[l][a:e, :a].reshape(n, t, n)[:, :, :P] = Arow
        # ------------- top-down: z^l(t), g, G^l(t, <=t), B^{l-1}(t, <=t), dz ----------------
        for l in reversed(range(L)):
            ly = layers[l]
            if l == L - 1:
                z = np.broadcast_to(w, (n, S))
                D4 = _top_D(delta, t, n, P, lr)
                if rec is not None:
                    rec["r"][l][a:e] = w0[None, :]
            else:
                up = layers[l + 1]
                r = ly.draw_r(up.g[a:e, :e], rng)
                if rec is not None:
                    rec["r"][l][a:e] = r
                # D(t, s) = B^l(t, s) + lr Delta(s) G^{l+1}(t, s) [s < t]
                D4 = B[l][a:e, :e].reshape(n, t + 1, n).copy()
                D4[:, :t, :P] += lr * up.g[a:e, :a].reshape(n, t, n)[:, :, :P] * delta[None, :t]
                Dtr = np.ascontiguousarray(D4[:, :, :P]).reshape(n, (t + 1) * P)
                z = r + gamma0 * (Dtr @ ly.PHtr[:t + 1].reshape((t + 1) * P, S))
                if Q:
                    # test-test diagonal blocks of B (a test point sees only itself)
                    Dqq = D4[te, :, te]                                  # (Q, t+1)
                    z[P:] += gamma0 * np.einsum("qs,sqk->qk", Dqq, ly.PHte[:t + 1])
            g = ly.lam1 * z
            ly.backward(g, t, l + 1)
            if ly.r_sys or ly.u_sys:
                l1t = ly.lam1[:, :ly.Srt].astype(tdtype, copy=False)
                # Lam2 = phi''(h) z: over all samples where B needs its average (u-system),
                # else over the tangent samples only
                k = S if ly.u_sys else ly.Srt
                lam2 = _lam(act, ly.H[:, :k], z[:, :k], eps,
                            ly.PH[t][:, :k] if act == "tanh" else None)[1]
                l2t = lam2[:, :ly.Srt].astype(tdtype, copy=False)
            if ly.r_sys:
                # dz(t)/dr(s), s <= t (train rows): direct term at s = t plus gamma0 D dphi
                ly.r_tangent_g(t, Dtr, l1t, l2t, gamma0, 1.0, t == T)
            if ly.u_sys:
                if l == L - 1:
                    # z^L = w: dz(t) = gamma0 lr sum_{s<t} Delta(s) . dphi_train(s)
                    dz = np.broadcast_to(dw[:cz1], (n, cz1))
                else:
                    Dt = Dtr.astype(tdtype)
                    dz = _causal_gemm(Dt, ly.udphi, t + 1, t + 1, P * Sr, gamma0)
                    if Q:
                        dz[P:] += gamma0 * np.einsum("qs,sqc->qc", Dqq.astype(tdtype),
                                                     ly.udphi_te[:t + 1, :, :cz1])
                dg = ly.u_tangent_g(t, dz, l1t, l2t)
                Brow = dg.reshape(n, t + 1, P, Sr).sum(-1, dtype=np.float64) / (gamma0 * Sr)
                l2_all = lam2.mean(-1)
                if cv:
                    Brow += D4[:, :, :P] * (ly.psi[t, :, :t + 1] - ly.psi_r[t, :, :t + 1])
                    l2_r = lam2[:, ly.tidx[t]].mean(-1)
                    Brow[tr, t, tr] += (l2_all[:P] - l2_r[:P]) / gamma0
                Bb = B[l - 1][a:e, :e].reshape(n, t + 1, n)
                Bb[:, :, :P] = Brow
                if Q:
                    # test sources: closed form over all samples (only their own point responds)
                    blockqq = D4[te, :, te] * ly.psi_qq[t, :t + 1].T      # (Q, t+1)
                    blockqq[:, t] += l2_all[P:] / gamma0
                    Bb[te, :, te] = blockqq
            if ly.stein:
                _stein_row(ly, B[l - 1], layers[l - 1].phi, ly.u, g, t, n, gamma0)
        # ------------- predictions, NTK, Delta(t) ---------------------------------------
        top = layers[L - 1]
        if responses:
            f[t] = (w[None, :] * top.PH[t]).mean(axis=1) / gamma0
        K = top.phi[a:e, a:e].copy()
        for l in range(L):
            K += layers[l].g[a:e, a:e] * (kx if l == 0 else layers[l - 1].phi[a:e, a:e])
        ntk[t] = K
        _check_predictions(f[t], t, divergence)
        delta[t] = y - f[t, :P]
        if t < T:
            if not responses:
                # GIA: f(t+1) = f(t) + lr K(t) Delta(t) (the reading <w phi> needs A^{L-1})
                f[t + 1] = f[t] + lr * K[:, :P] @ delta[t]
            # z^L(t+1) = z^L(t) + gamma0 lr Delta(t) . phi_train(h^L(t))
            w = w + gamma0 * lr * (delta[t] @ top.PHtr[t])
            if top.u_sys:
                dw[:cz1] += (gamma0 * lr) * (delta[t].astype(tdtype) @ top.udphi[t, :, :cz1])
        if bar is not None:
            bar.update(1)
    out = {"f": f, "ntk": ntk, "phi": phi_all, "g": g_all,
           "A": A_all if (responses and L >= 2) else None,
           "B": B_all if (responses and L >= 2) else None}
    if rec is not None:
        out["sources"] = rec
    return out
