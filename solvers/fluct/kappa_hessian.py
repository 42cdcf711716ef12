"""Noise covariance kappa of the deep propagator from per-sample Jacobians and Hessians.

The ``kappa="hessian"`` route of :func:`solvers.fluct.deep_mc.deep_propagator`: for each layer
the formal MSR moments of the per-sample scalars X_i (module docstring of
:mod:`solvers.fluct.deep_mc`) are evaluated with the exact first and second derivatives of the
layer's march with respect to its sources, by nested forward-mode ``torch.func.jacfwd``. It
stores (chunk, m, m, m) per layer, so it is meant for small m = (T + 1) n; the default
``kappa="jvp"`` of :mod:`solvers.fluct.kappa_stein` evaluates the same moments with
directional derivatives and is compared against this one in the tests.
"""
from __future__ import annotations

from .kappa_stein import block_chunks, moment_sums


def _kappa_layer(torch, fl, Jl, first, last, edges, chunk, gamma0, act, T1, n, progress=None):
    """Per-block sums of the formal first and second moments of X_i
    (:mod:`solvers.fluct.deep_mc`) for one layer: M1_i = Y_i + div_r v^a_i + div_u v^b_i,
    M2_ij = E[X_i X_j] by the MSR rules, from per-sample Jacobians and Hessians of the
    layer's march w.r.t. its sources.

    ``first``: no B channel (layer 1 has no u-response order parameter); ``last``: no A
    channel (r^L = w) and the output channel <J^f, z phi>.
    """
    from torch.func import jacfwd, vmap

    C, D = fl["C"], fl["D"]
    K = Jl["pp"].shape[0]
    Jp = 0.5 * (Jl["pp"] + Jl["pp"].transpose(1, 2))
    Jg = 0.5 * (Jl["gg"] + Jl["gg"].transpose(1, 2))
    Ja, Jb, Jf = Jl["a"], Jl["b"], Jl["f"]
    use_a, use_b = not last, not first

    def fields1(u, r):
        Ps, Gs, Zs = [], [], []
        for t in range(T1):
            a, e = t * n, (t + 1) * n
            h = u[a:e]
            if t:
                h = h + gamma0 * (C[a:e, :a] @ torch.cat(Gs))
            p = act(h, 0)
            z = r[a:e] + gamma0 * (D[a:e, :e] @ torch.cat(Ps + [p]))
            Ps.append(p)
            Zs.append(z)
            Gs.append(act(h, 1) * z)
        return torch.cat(Ps), torch.cat(Gs), torch.cat(Zs)

    jac = vmap(jacfwd(fields1, argnums=(0, 1)))
    if use_a:
        hess_p = vmap(jacfwd(jacfwd(lambda u, r: fields1(u, r)[0], argnums=1), argnums=(0, 1)))
    if use_b:
        hess_g = vmap(jacfwd(jacfwd(lambda u, r: fields1(u, r)[1], argnums=0), argnums=(0, 1)))
    m1, m2 = moment_sums(edges, K)
    ein = torch.einsum
    for b, sl in block_chunks(edges, chunk):
        u, r = fl["u"][sl], fl["r"][sl]                            # (s, m)
        ph, gg, zz = fl["phi"][:, sl].T, fl["g"][:, sl].T, fl["z"][:, sl].T   # (s, m)
        (pu, pr), (gu, gr), (zu, zr) = jac(u, r)                   # (s, m, m) each
        # physical part and its first derivatives
        Jpph = ein("kab,sb->ska", Jp, ph)
        Jggg = ein("kab,sb->ska", Jg, gg)
        Y = ein("ska,sa->sk", Jpph, ph) + ein("ska,sa->sk", Jggg, gg)
        dYdp, dYdg = 2 * Jpph, 2 * Jggg
        dYdz = None
        if last:
            Y = Y + (zz * ph) @ Jf.T
            dYdp = dYdp + Jf[None] * zz[:, None, :]
            dYdz = Jf[None] * ph[:, None, :]
        M1 = Y.clone()
        M2 = ein("si,sj->ij", Y, Y)

        def dY(ru_p, ru_g, ru_z):
            out = ein("ska,sad->skd", dYdp, ru_p) + ein("ska,sad->skd", dYdg, ru_g)
            if dYdz is not None:
                out = out + ein("ska,sad->skd", dYdz, ru_z)
            return out

        def channel(Jc, field, d_own, d_other, h_own, h_other, dY_own):
            """One response channel's terms (A: over r, B: over u): the pairs with Y and
            with itself added to M2; returns what the mixed r-u pairs need."""
            nonlocal M1, M2
            v = ein("kab,sa->skb", Jc, field)                        # (s, K, m)
            div = ein("kab,sab->sk", Jc, d_own)
            dv_own = ein("kab,sad->skbd", Jc, d_own)                 # d v_b / d own_d
            T2 = ein("sid,sjd->ij", dY_own, v) + ein("si,sj->ij", Y, div)
            M2 += T2 + T2.T
            T3 = ein("sjd,sid->ij", v, ein("kab,sabd->skd", Jc, h_own))
            M2 += T3 + T3.T + ein("sibd,sjdb->ij", dv_own, dv_own) + \
                ein("si,sj->ij", div, div)
            M1 = M1 + div
            return {"v": v, "div": div,
                    "dv_other": ein("kab,sad->skbd", Jc, d_other),
                    "gdiv_other": ein("kab,sabd->skd", Jc, h_other)}

        if use_a:
            hur, hrr = hess_p(u, r)                                  # (s, m, m_r, m_u/m_r)
            ca = channel(Ja, ph, pr, pu, hrr, hur, dY(pr, gr, zr))
        if use_b:
            huu, hur_g = hess_g(u, r)                                # (s, m, m_u, m_u/m_r)
            cb = channel(Jb, gg, gu, gr, huu, hur_g, dY(pu, gu, zu))
        if use_a and use_b:
            # mixed r-u pairs: v^b_j . grad_u(div v^a_i) + div v^a_i div v^b_j
            #   + tr(d_u v^a_i d_r v^b_j) + v^a_i . grad_r(div v^b_j), and i <-> j
            T4 = ein("sjd,sid->ij", cb["v"], ca["gdiv_other"]) + \
                ein("si,sj->ij", ca["div"], cb["div"]) + \
                ein("sibd,sjdb->ij", ca["dv_other"], cb["dv_other"]) + \
                ein("sid,sjd->ij", ca["v"], cb["gdiv_other"])
            M2 += T4 + T4.T
        m1[b] += M1.sum(0).numpy()
        m2[b] += M2.numpy()
        if progress is not None:
            progress(sl.stop)
    return {"m1": m1, "m2": m2}

