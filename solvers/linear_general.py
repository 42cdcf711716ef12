"""The general deep-linear march: C outputs, any loss, weight decay, mini-batches
(docs/theory.rst §3 and §7).

:func:`march_general` solves every problem but the plain one (one mse output, full batch, no
weight decay), which keeps its own bit-for-bit path (:func:`solvers.linear_march.march`); its
docstring derives the reduction over the backward index (t, c). :func:`verify_general`
re-evaluates the equations densely and :func:`full_responses_general` builds the full-index
responses to the raw sources. The block-row update of Phi^l, the divergence test, the NaN
fill and the per-layer dense check are shared with the plain march
(:mod:`solvers.linear_march`). All three functions are importable from :mod:`solvers.linear`.
"""
from __future__ import annotations

import numpy as np

from .linear_march import _change, _check_layer, _divergence, _nan_from, _phi_row

__all__ = ["march_general", "verify_general", "full_responses_general"]


def march_general(kx, obj, depth: int, gamma0: float, lr: float, steps: int, *,
                  divergence: float = 1e8, callback=None) -> dict:
    """March the deep linear DMFT for any objective (docs/theory.rst §3 and §7).

    The plain problem (one mse output, full batch, no weight decay) has its own path,
    :func:`solvers.linear.march`; this one solves C >= 1 outputs, every loss of
    :mod:`solvers.objective`, weight decay toward the initialisation or toward zero, and
    mini-batch / online schedules.

    Reduction (derived here, checked against :func:`solvers.linear.march`, the dense check
    :func:`verify_general` and simulated networks in tests/test_linear_objectives.py)
    -----------------------------------------------------------------------------------
    The backward pass of a linear network never sees the input: z^L_c = w_c and
    z^l = W^{lT} g^{l+1} / sqrt(N), so g^l_{mu c}(t) = z^l_c(t) for every point mu and
    G^l_{mu c, nu c'}(t, s) = G^l_{c c'}(t, s). The backward index is (t, c) (size C T1), the
    forward one (t, mu) (size n T1). With a = 1 - lr lambda, the memory weight
    m(t, s) = a^(t-1-s) (s < t) and the source scale s_t = a^t toward zero (1 otherwise):

        h^l = s (u^l + gamma0 A^{l-1} g^l) + gamma0 Cm^l g^l,
        z^l = s (r^l + gamma0 B^l h^l)     + gamma0 Dm^l h^l,

        Cm^l[(t,mu),(s,c)]  = lr m(t,s) sum_alpha Phi^{l-1}_{mu alpha}(t,s) Delta_{alpha c}(s)
        Dm^l[(t,c),(s,alpha)] = lr m(t,s) sum_c' G^{l+1}_{c c'}(t,s) Delta_{alpha c'}(s)

    (weight decay toward zero: W(t) = a^t W(0) + sum_s a^(t-1-s) lr (...), so the fields carried
    by W(0) -- the sources and the response terms -- are multiplied by a^t; A^l, B^l are the
    responses to the raw sources). With c = S A^{l-1} S + Cm, d = S B^l S + Dm (S = diag(s_t)),
    P~ = S Phi^{l-1} S and G~ = S G^{l+1} S the algebra of :func:`march` carries over:
    mt = (I - gamma0^2 d c)^{-1} (C T1 x C T1, unit lower block-triangular), a = c mt,
    b = mt d, E = d P~, W = G~ + gamma0^2 E d^T, Phi^l = P~ + gamma0^2 [a E + (a E)^T + a W a^T],
    G^l = mt W mt^T, f_{mu c}(t) = [mt (E + W a^T)]((t, c), (t, mu)), and the raw responses
    A^l = a^l S, B^{l-1} = b^l S. G^{L+1}_{c c'} = delta_{c c'} at all times, B^L = 0, A^0 = 0,
    Phi^0 = K^x. Delta(t) = obj.delta(t, f(t)) is evaluated at each step (the march is causal).

    Parameters
    ----------
    kx : array (n, n)
    obj : solvers.objective.Objective
        Loss, targets (P, C), batches, weight decay.
    depth, gamma0, lr, steps, divergence, callback
        As in :func:`march`; the divergence check uses the objective's training loss.

    Returns
    -------
    dict
        ``f`` (T+1, n, C); ``ntk`` (T+1, n, C, n, C); ``Phi`` list of L flat (n T1, n T1);
        ``G`` (L, C T1, C T1) flat over (t, c); ``a``, ``c`` (L, n T1, C T1); ``d``, ``b``, ``E``
        (L, C T1, n T1) (``b[l]`` = B^l before the source scale, ``b[0]`` unused); ``mt``,
        ``W`` (L, C T1, C T1); ``scale`` (T+1,) the source scale s_t; ``delta`` (T+1, n, C)
        (Delta(T), never used by the dynamics, is the full-batch error signal);
        ``diverged_at``, ``message``, ``shape``.
    """
    kx = np.asarray(kx, dtype=np.float64)
    L, T, n, P, C = int(depth), int(steps), kx.shape[0], obj.P, obj.C
    if obj.n != n or obj.steps != T:
        raise ValueError(f"obj: the objective is for n = {obj.n} points and {obj.steps} steps, "
                         f"the problem has n = {n} and steps = {T}; build it with "
                         f"Objective.from_specs(data, train)")
    T1 = T + 1
    N1, M1 = n * T1, C * T1
    g2 = float(gamma0) ** 2
    lr = float(lr)
    scale = np.array([obj.init_scale(t) for t in range(T1)])
    sf = np.repeat(scale, n)            # source scale on the forward index (t, mu)
    sb = np.repeat(scale, C)            # ... and on the backward index (t, c)
    decay_zero = bool(np.any(scale != 1.0))

    Phi0 = np.tile(kx, (T1, T1))
    Phi = [np.zeros((N1, N1)) for _ in range(L)]
    Gout = np.kron(np.ones((T1, T1)), np.eye(C))    # G^{L+1}_{c c'}(t, s) = delta_{c c'}
    G = [np.zeros((M1, M1)) for _ in range(L)] + [Gout]
    c = np.zeros((L, N1, M1))
    a = np.zeros((L, N1, M1))
    d = np.zeros((L, M1, N1))
    b = np.zeros((L + 1, M1, N1))
    mt = np.zeros((L, M1, M1))
    E = np.zeros((L, M1, N1))
    W = np.zeros((L, M1, M1))
    f = np.zeros((T1, n, C))
    delta = np.zeros((T1, n, C))
    ntk = np.zeros((T1, n, C, n, C))
    loss0 = float(obj.loss_at(np.zeros((P, C))))
    eye_c = np.eye(C)

    def phi_prev(l, rows, cols):
        """P~^{l-1}[rows, cols] = s Phi^{l-1} s (the source covariance of layer l)."""
        X = Phi0[rows, cols] if l == 0 else Phi[l - 1][rows, cols]
        if decay_zero:
            X = X * sf[rows][:, None] * sf[cols][None, :]
        return X

    def g_next(l, rows, cols):
        X = G[l + 1][rows, cols]
        if decay_zero:
            X = X * sb[rows][:, None] * sb[cols][None, :]
        return X

    diverged_at, message = None, ""
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T1):
            pf, rf, uf = slice(0, t * n), slice(t * n, (t + 1) * n), slice(0, (t + 1) * n)
            pb, rb, ub = slice(0, t * C), slice(t * C, (t + 1) * C), slice(0, (t + 1) * C)
            mem = obj.memory(t) if t > 0 else None
            dmem = delta[:t] * mem[:, None, None] * lr if t > 0 else None   # (t, n, C)
            # -- backward sweep over layers: rows < t of the forward quantities --------------
            for l in range(L - 1, -1, -1):
                dl, ml, Wl, El = d[l], mt[l], W[l], E[l]
                ml[rb, rb] = eye_c
                if t > 0:
                    Gn = G[l + 1][rb, pb].reshape(C, t, C)
                    row = np.einsum("csk,sak->csa", Gn, dmem).reshape(C, t * n)
                    if l < L - 1:
                        row += scale[t] * b[l + 1][rb, pf] * sf[pf][None, :]
                    dl[rb, pf] = row
                    dc = row @ c[l][pf, pb]
                    ml[rb, pb] = g2 * (dc @ ml[pb, pb])
                    if l > 0:
                        b[l][rb, pf] = ml[rb, ub] @ dl[ub, pf]
                    El[rb, pf] = row @ phi_prev(l, pf, pf)
                    Wl[rb, ub] = g_next(l, rb, ub) + g2 * (El[rb, pf] @ dl[ub, pf].T)
                    Wl[pb, rb] = Wl[rb, pb].T
                    blk = Wl[rb, rb]
                    Wl[rb, rb] = 0.5 * (blk + blk.T)
                else:
                    Wl[rb, rb] = g_next(l, rb, rb)
                V = ml[rb, ub] @ Wl[ub, ub]
                col = ml[ub, ub] @ V.T                      # G^l[(s <= t), (t)]
                G[l][ub, rb] = col
                G[l][rb, ub] = col.T
                blk = col[t * C:]
                G[l][rb, rb] = 0.5 * (blk + blk.T)
            # -- forward sweep over layers: rows <= t of the backward quantities ----------------
            for l in range(L):
                cl, al, El, Wl = c[l], a[l], E[l], W[l]
                if t > 0:
                    prow = (Phi0 if l == 0 else Phi[l - 1])[rf, pf].reshape(n, t, n)
                    row = np.einsum("msa,sac->msc", prow, dmem).reshape(n, t * C)
                    if l > 0:
                        row += scale[t] * a[l - 1][rf, pb] * sb[pb][None, :]
                    cl[rf, pb] = row
                    al[rf, pb] = row @ mt[l][pb, pb]
                    El[ub, rf] = d[l][ub, pf] @ phi_prev(l, pf, rf)
                _phi_row(Phi[l], phi_prev(l, rf, uf).copy(), t, n, g2, al, El, Wl, pb)
            # -- output, error signal, NTK ---------------------------------------------------
            l = L - 1
            if t > 0:
                X = mt[l][rb, ub] @ (E[l][ub, rf] + W[l][ub, pb] @ a[l][rf, pb].T)   # (C, n)
                f[t] = X.T
            K = np.einsum("ab,cd->acbd", kx, G[0][rb, rb])
            for l in range(L):
                K = K + np.einsum("ab,cd->acbd", Phi[l][rf, rf], G[l + 1][rb, rb])
            ntk[t] = K
            if t < T or obj.mask is None:
                delta[t] = obj.delta(t, f[t])
            else:   # Delta(T) is never used by the dynamics: the full-batch error signal
                delta[t, :P] = _full_error(obj, f[t])
            loss = float(obj.loss_at(f[t, :P]))
            if callback is not None:
                callback(t)
            diverged_at, message = _divergence(t, f[t], K, loss, loss0, divergence)
            if diverged_at is not None:
                break

    G = np.stack(G[:L])
    if diverged_at is not None:
        _nan_from(diverged_at, n, C, f, ntk, delta, Phi, G)
    return {"f": f, "ntk": ntk, "Phi": Phi, "G": G, "a": a, "c": c, "d": d, "b": b[:L].copy(),
            "mt": mt, "E": E, "W": W, "delta": delta, "scale": scale,
            "diverged_at": diverged_at, "message": message,
            "shape": {"n": n, "P": P, "C": C, "T1": T1, "L": L}}


def _full_error(obj, F):
    """Delta on the training rows without the batch mask."""
    from .objective import error_signal
    return error_signal(obj.loss, obj._shift(np.asarray(F)[:obj.P]), obj.Y, **obj.params)


def _memory_matrix(obj, T1):
    """m(t, s) = a^(t-1-s) for s < t, else 0: (T1, T1)."""
    m = np.zeros((T1, T1))
    for t in range(1, T1):
        m[t, :t] = obj.memory(t)
    return m


def verify_general(res: dict, kx, obj, gamma0: float, lr: float) -> float:
    """Residual of one global (dense) evaluation of the equations of :func:`march_general`.

    With Delta taken from the march, every layer's c, d, mt (dense solve), a, b, E, W, Phi, G
    and the output f are recomputed from whole matrices. Returns the largest change relative
    to each field's size (rounding level, ~1e-14, at a fixed point).
    """
    n, T1, L, C = (res["shape"][k] for k in ("n", "T1", "L", "C"))
    N1, M1 = n * T1, C * T1
    g2 = float(gamma0) ** 2
    delta = res["delta"]
    m = _memory_matrix(obj, T1) * lr
    sf = np.repeat(res["scale"], n)
    sb = np.repeat(res["scale"], C)
    Phi, G, a, b = res["Phi"], res["G"], res["a"], res["b"]
    phi0 = np.tile(kx, (T1, T1))
    gout = np.kron(np.ones((T1, T1)), np.eye(C))
    rel = []
    for l in range(L):
        phi_prev = phi0 if l == 0 else Phi[l - 1]
        g_next = gout if l == L - 1 else G[l + 1]
        cm = np.einsum("tmsa,sac->tmsc", phi_prev.reshape(T1, n, T1, n), delta)
        cm = (cm * m[:, None, :, None]).reshape(N1, M1)
        dm = np.einsum("tcsk,sak->tcsa", g_next.reshape(T1, C, T1, C), delta)
        dm = (dm * m[:, None, :, None]).reshape(M1, N1)
        c_new = cm + (0.0 if l == 0 else sf[:, None] * a[l - 1] * sb[None, :])
        d_new = dm + (0.0 if l == L - 1 else sb[:, None] * b[l + 1] * sf[None, :])
        pt = sf[:, None] * phi_prev * sf[None, :]
        changes, X = _check_layer(l, res, c_new, d_new, pt, sb[:, None] * g_next * sb[None, :],
                                  g2)
        rel += changes
        if X is not None:
            X = X.reshape(T1, C, T1, n)
            f_new = X[np.arange(T1), :, np.arange(T1), :].transpose(0, 2, 1)   # (T1, n, C)
            rel.append(_change(f_new, res["f"]))
    return max(rel)

def full_responses_general(res: dict, kx, obj, gamma0: float, lr: float):
    """Full-index responses to the raw sources for one output (C = 1), any objective.

    A^l_{mu alpha}(t, s) = gamma0^-1 d h^l_mu(t) / d r^l_alpha(s) = [M^l C^l S](t mu, s alpha)
    with C^l = S A^{l-1} S + lr m(t, s) Phi^{l-1} Delta(s) (s < t), M^l = I + gamma0^2 a^l d^l;
    B^{l-1}_{mu alpha}(t, s) = [b^l S](t, (s, alpha)) for every mu. Returns (A, B) flat
    (L-1, n T1, n T1) each, or (None, None) for L = 1.
    """
    n, T1, L, C = (res["shape"][k] for k in ("n", "T1", "L", "C"))
    if C != 1:
        raise ValueError("full_responses_general: one output only (C = 1)")
    if L == 1:
        return None, None
    N1 = n * T1
    g2 = float(gamma0) ** 2
    m = _memory_matrix(obj, T1) * lr
    sf = np.repeat(res["scale"], n)
    dcol = np.nan_to_num(res["delta"][:, :, 0])              # (T1, n)
    A = np.empty((L - 1, N1, N1))
    B = np.empty((L - 1, N1, N1))
    prev = np.zeros((N1, N1))
    for l in range(L - 1):              # layer l + 1
        phi_prev = np.tile(kx, (T1, T1)) if l == 0 else res["Phi"][l - 1]
        mem = (phi_prev.reshape(T1, n, T1, n) * (m[:, None, :, None] * dcol[None, None, :, :]))
        Cl = sf[:, None] * prev * sf[None, :] + mem.reshape(N1, N1)
        A[l] = (Cl + g2 * (res["a"][l] @ (res["d"][l] @ Cl))) * sf[None, :]
        prev = A[l]
        B[l] = np.repeat(res["b"][l + 1] * sf[None, :], n, axis=0)
    return A, B
