"""O(1/N) propagator of deep *linear* networks (docs/theory.rst §5 on top of §3), exact.

The model of the finite-width noise (derived for this module; checked against the exact
two-layer closure, the lazy universal form and simulated networks in
``tests/test_fluctuations_deep.py``)
---------------------------------------------------------------------------------------
Integrating out the initial weights W^l(0) couples layers l and l + 1 only through averages
over the units of one layer: the kernels Phi^l = <h h^T> (source covariance of layer l + 1),
G^{l+1} = <z z^T> (source covariance of layer l), the output gamma0 f = <z^L h^L>, and the
pair of *response* averages

    a^l(t, s)     = <h^l(t) rho_r^l(s)> / gamma0        (layer l;     used by layer l + 1)
    b^l(t, s)     = <z^{l+1}(t) rho_u^{l+1}(s)> / gamma0 (layer l + 1; used by layer l)

where rho_u, rho_r are the MSR response fields conjugate to the sources u, r of a unit
(<F rho(s)> = d<F>/d(source shift at s)). At width N each average is its single-unit mean plus
sampling noise E / sqrt(N). For a linear network a unit is Gaussian, and the noise of every
average (physical or response) follows from Wick's theorem on the formal Gaussian vector
w = (h, z, rho_u, rho_r) with <v v^T> = S (the unit covariance), <v rho^T> = R (the unit's
linear response to its sources) and <rho rho^T> = 0:

    N Cov(w_a w_b, w_c w_d) = S^_ac S^_bd + S^_ad S^_bc,   S^ = [[S, R], [R^T, 0]].

The response noise is formal (it can be negative), and it is needed: with the responses
treated as deterministic functions of the kernels the centred lazy limit is off by several
per cent. One more subtlety: a^l and b^l pair index by index in the coupling, a^l lives on
s < t and b^l on t < s, and the diagonal s = t (zero mean for a linear network) still
fluctuates; it is kept here as part of a^l (the memory operator c^{l+1} uses a^l on s <= t).

Linearising the deterministic fixed point q = <O(q)> + E / sqrt(N) (the causal deep-linear
march of :mod:`solvers.linear`, re-implemented in PyTorch with the noises E as inputs)
gives dq/dE = (I - D)^{-1}; reverse-mode differentiation of the observables (predictions at
every time, NTK entries) gives their adjoint rows J^l = d obs / d E^l, and

    N Cov(obs_i, obs_j) = sum_l 2 tr(J_i^l S^_l J_j^l S^_l)     (J^l symmetrised)

i.e. Sigma = (I - D)^{-1} kappa (I - D)^{-T} contracted with the observables, with no
sampling and no dense D. Cost: one causal march (O(L T (nT)^3) with n points, T steps) and
one batched backward pass per 32 observables; memory about n (T+1) (2 (n+1)(T+1))^2 floats
per layer for the two-time prediction covariance (e.g. 40 MB per layer at n = 3, T = 20).
"""
from __future__ import annotations

import numpy as np

from ..layout import equal_time, two_time

__all__ = ["deep_linear_propagator", "deep_linear_lazy_kappa"]


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the deep-linear propagator differentiates the fixed point with "
                          "PyTorch; install it: pip install torch (or the package's "
                          "'fluctuations' extra)") from exc
    return torch


def _expand_kx(kx, T1):
    """Phi^0 in the flat time-major layout: kx at every pair of times."""
    return np.tile(kx, (T1, T1))


def _march(torch, kx_flat, y, L, g0, lr, n, P, T1, E, center, iters, responses=True):
    """Causal fixed point of the deep linear DMFT with injected noises E[l], a dict of blocks
    of the formal unit matrix w w^T (w = (h, z, rho_u, rho_r)): "hh" (m, m), "zz" (T1, T1),
    "hz" (m, T1), "a" = h rho_r^T (m, T1), "b" = z rho_u^T (T1, m).

    Returns dict of torch tensors: f (T1, n), ntk (T1, n, n), Phi list, G list, S list
    (unit covariances), delta (T1, P).
    """
    m = n * T1
    dt = torch.float64
    eyeT = torch.eye(T1, dtype=dt)
    eyem = torch.eye(m, dtype=dt)
    strict = torch.tril(torch.ones(T1, T1, dtype=dt), -1)          # s < t
    strict_m_T = strict.repeat_interleave(n, 0)                     # (m, T1): row (t,mu), col s
    lower_m_T = torch.tril(torch.ones(T1, T1, dtype=dt)).repeat_interleave(n, 0)   # s <= t
    strict_T_m = strict.repeat_interleave(n, 1)                     # (T1, m): row t, col (s,a)
    Phi0 = torch.tensor(np.array(kx_flat, dtype=np.float64))
    yv = torch.tensor(np.array(y, dtype=np.float64))
    Phi = [Phi0.clone() for _ in range(L)]
    G = [torch.ones(T1, T1, dtype=dt) for _ in range(L + 1)]
    a = [torch.zeros(m, T1, dtype=dt) for _ in range(L + 1)]     # a[l] = a^l, a[0] = 0
    b = [torch.zeros(T1, m, dtype=dt) for _ in range(L + 1)]     # b[l] = b^l, b[L] = 0
    X = [torch.zeros(m, T1, dtype=dt) for _ in range(L + 1)]
    delta = yv.expand(T1, P).clone()
    f = torch.zeros(T1, n, dtype=dt)
    idx_t = torch.arange(T1)
    R = [None] * L
    for it in range(iters):
        # causal horizon: Delta beyond step it is not yet final; zero it so that the
        # not-yet-converged future cannot overflow (it never feeds back into the past)
        delta = delta * (idx_t[:, None] <= it).to(dt)
        # Delta padded with zeros on test points: (T1, n) -> flat (m,)
        dfull = torch.zeros(T1, n, dtype=dt)
        dfull[:, :P] = delta
        dflat = dfull.reshape(m)
        for l in range(1, L + 1):
            Pm = Phi0 if l == 1 else Phi[l - 2]
            Gp = G[l]                      # G^{l+1}
            # c^l[(t,mu), s] = a^{l-1} + lr sum_alpha Phi^{l-1}[(t,mu),(s,alpha)] Delta_alpha(s)
            cterm = (Pm * dflat[None, :]).reshape(m, T1, n).sum(2)
            # a^{l-1} on s <= t: its mean vanishes at s = t (strict causality) but its
            # fluctuation there pairs with b^{l-1}(s = t) in the exact coupling
            c = a[l - 1] * lower_m_T + lr * cterm * strict_m_T
            # d^l[t, (s,alpha)] = b^l + lr Delta_alpha(s) G^{l+1}(t, s)
            dterm = Gp.repeat_interleave(n, 1) * dflat[None, :]
            d = (b[l] + lr * dterm) * strict_T_m
            mt = torch.linalg.inv(eyeT - g0 * g0 * (d @ c))
            M = eyem + g0 * g0 * (c @ mt @ d)
            Hu, Hr = M, g0 * (M @ c)
            Zu, Zr = g0 * (mt @ d), mt
            El = E[l - 1]
            Phi_l = Hu @ Pm @ Hu.T + Hr @ Gp @ Hr.T + El["hh"]
            G_l = Zu @ Pm @ Zu.T + Zr @ Gp @ Zr.T + El["zz"]
            X_l = Hu @ Pm @ Zu.T + Hr @ Gp @ Zr.T + El["hz"]
            Phi[l - 1] = Phi_l
            G[l - 1] = G_l
            X[l] = X_l
            a[l] = M @ c
            b[l - 1] = mt @ d
            if responses:
                # response order parameters a^l = <h rho_r> / gamma0 (used by layer l + 1) and
                # b^{l-1} = <z rho_u> / gamma0 (used by layer l - 1), with their own noise
                a[l] = a[l] + El["a"] / g0
                b[l - 1] = b[l - 1] + El["b"] / g0
            R[l - 1] = torch.cat([torch.cat([Hu, Hr], 1), torch.cat([Zu, Zr], 1)], 0)
        # f_mu(t) = <z^L(t) h^L_mu(t)> / gamma0
        XL = X[L].reshape(T1, n, T1)
        f = XL[idx_t, :, idx_t] / g0
        fc = f - f[:1] if center else f
        delta = yv[None, :] - fc[:, :P]
    fc = f - f[:1] if center else f
    # equal-time NTK: sum_{l=0}^{L} G^{l+1}(t,t) Phi^l(t,t)
    kxt = equal_time(Phi0, T1, n)
    ntk = G[0][idx_t, idx_t][:, None, None] * kxt
    for l in range(1, L + 1):
        Gl1 = G[l][idx_t, idx_t] if l < L else torch.ones(T1, dtype=dt)
        Pl = equal_time(Phi[l - 1], T1, n)
        ntk = ntk + Gl1[:, None, None] * Pl
    return {"f": fc, "f_raw": f, "ntk": ntk, "Phi": Phi, "G": G[:L],
            "S": _unit_covariances(torch, Phi, G, X, R, L), "delta": delta}


def _unit_covariances(torch, Phi, G, X, R, L):
    """Formal MSR covariance of the unit vector (v, rho) of each layer l = 1 .. L:
    <v v^T> = [[Phi^{l-1}, X^l], [X^l^T, G^{l-1}]], <v rho^T> = R^{l-1}, <rho rho^T> = 0."""
    S = []
    for l in range(1, L + 1):
        top = torch.cat([Phi[l - 1], X[l]], 1)
        bot = torch.cat([X[l].T, G[l - 1]], 1)
        Sv = torch.cat([top, bot], 0)
        Rl = R[l - 1]
        Z = torch.zeros_like(Sv)
        S.append(torch.cat([torch.cat([Sv, Rl], 1), torch.cat([Rl.T, Z], 1)], 0))
    return S


def _error_signal(torch, loss, F, Y):
    """Delta = -d loss / d F (solvers.objective.error_signal) in PyTorch, differentiable."""
    if loss == "mse":
        return Y - F
    if loss == "cross_entropy":
        return Y - torch.softmax(F, dim=-1)
    if loss == "logistic":
        return Y * torch.sigmoid(-Y * F)
    raise ValueError(f"loss={loss!r} is not differentiable here; the deep-linear propagator "
                     f"handles 'mse', 'cross_entropy' and 'logistic'")


def _march_objective(torch, kx_flat, Y, L, g0, lr, n, P, T1, E, center, iters, responses,
                     loss, mask, a, decay_to):
    """:func:`_march` for any objective (docs/theory.rst §7): C outputs (the backward index
    is the flattened (t, c), t-major, of size T1 C), the loss through its error signal,
    batches (``mask`` (T, P) or None), weight decay (a = 1 - lr lambda; memory terms
    lr Delta(s) -> lr a^(t-1-s) Delta(s); toward zero also the initial-weight channel
    scaled by a^t: sources and the responses to them, h = a^t [u + g0 a^{l-1} z] + memory,
    z = a^t [r + g0 b^l h] + memory, with a^l, b^l the responses to the raw sources).

    Noise blocks: "hh" (m, m), "zz" (T1 C, T1 C), "hz" (m, T1 C), "a" (m, T1 C),
    "b" (T1 C, m). Returns as :func:`_march` with f (T1, n, C), ntk (T1, n, C, n, C).
    """
    C = Y.shape[1]
    m, Tc = n * T1, T1 * C
    dt = torch.float64
    eyeTc = torch.eye(Tc, dtype=dt)
    eyem = torch.eye(m, dtype=dt)
    tt = np.arange(T1)
    dec = np.where(tt[:, None] > tt[None, :],
                   float(a) ** np.maximum(tt[:, None] - 1 - tt[None, :], 0), 0.0)
    strict = torch.tensor((tt[:, None] > tt[None, :]).astype(np.float64))
    lower = torch.tensor((tt[:, None] >= tt[None, :]).astype(np.float64))
    dec = torch.tensor(dec)
    # masks in the (t, mu) x (s, c) and (t, c) x (s, alpha) layouts
    lower_m_T = lower.repeat_interleave(n, 0).repeat_interleave(C, 1)
    dec_m_T = dec.repeat_interleave(n, 0).repeat_interleave(C, 1)
    strict_T_m = strict.repeat_interleave(C, 0).repeat_interleave(n, 1)
    dec_T_m = dec.repeat_interleave(C, 0).repeat_interleave(n, 1)
    lam = float(a) ** tt if (decay_to == "zero" and a != 1.0) else np.ones(T1)
    lam_m = torch.tensor(np.repeat(lam, n))
    lam_T = torch.tensor(np.repeat(lam, C))
    Phi0 = torch.tensor(np.array(kx_flat, dtype=np.float64))
    Yv = torch.tensor(np.array(Y, dtype=np.float64))
    bmask = torch.ones(T1, P, 1, dtype=dt)
    if mask is not None:
        bmask[:T1 - 1] = torch.tensor(np.asarray(mask, dtype=np.float64))[:, :, None]
    Phi = [Phi0.clone() for _ in range(L)]
    eyeC = torch.eye(C, dtype=dt)
    G_top = torch.ones(T1, T1, dtype=dt).repeat_interleave(C, 0).repeat_interleave(C, 1) \
        * eyeC.repeat(T1, T1)                                           # delta_cc'
    G = [G_top.clone() for _ in range(L + 1)]
    a_r = [torch.zeros(m, Tc, dtype=dt) for _ in range(L + 1)]
    b_r = [torch.zeros(Tc, m, dtype=dt) for _ in range(L + 1)]
    X = [torch.zeros(m, Tc, dtype=dt) for _ in range(L + 1)]
    delta = (Yv[None] * bmask).expand(T1, P, C).clone()
    f = torch.zeros(T1, n, C, dtype=dt)
    idx_t = torch.arange(T1)
    R = [None] * L
    for it in range(iters):
        delta = delta * (idx_t[:, None, None] <= it).to(dt)
        dfull = torch.zeros(T1, n, C, dtype=dt)
        dfull[:, :P] = delta
        for l in range(1, L + 1):
            Pm = Phi0 if l == 1 else Phi[l - 2]
            Gp = G[l]
            # c[(t,mu),(s,c)] = a^t a^{l-1} + lr a^(t-1-s) sum_al Phi^{l-1}[(t,mu),(s,al)] D_al,c(s)
            cterm = torch.einsum("isa,sac->isc", Pm.reshape(m, T1, n), dfull).reshape(m, Tc)
            c = lam_m[:, None] * (a_r[l - 1] * lower_m_T) + lr * cterm * dec_m_T
            # d[(t,c),(s,al)] = a^t b^l + lr a^(t-1-s) sum_c' G^{l+1}[(t,c),(s,c')] D_al,c'(s)
            dterm = torch.einsum("isd,sad->isa", Gp.reshape(Tc, T1, C), dfull).reshape(Tc, m)
            d = (lam_T[:, None] * b_r[l] + lr * dterm * dec_T_m) * strict_T_m
            mt = torch.linalg.inv(eyeTc - g0 * g0 * (d @ c))
            M = eyem + g0 * g0 * (c @ mt @ d)
            Hu, Hr = M * lam_m[None, :], g0 * (M @ c) * lam_T[None, :]
            Zu, Zr = g0 * (mt @ d) * lam_m[None, :], mt * lam_T[None, :]
            El = E[l - 1]
            Phi[l - 1] = Hu @ Pm @ Hu.T + Hr @ Gp @ Hr.T + El["hh"]
            G[l - 1] = Zu @ Pm @ Zu.T + Zr @ Gp @ Zr.T + El["zz"]
            X[l] = Hu @ Pm @ Zu.T + Hr @ Gp @ Zr.T + El["hz"]
            a_r[l] = Hr / g0
            b_r[l - 1] = Zu / g0
            if responses:
                a_r[l] = a_r[l] + El["a"] / g0
                b_r[l - 1] = b_r[l - 1] + El["b"] / g0
            R[l - 1] = torch.cat([torch.cat([Hu, Hr], 1), torch.cat([Zu, Zr], 1)], 0)
        XL = X[L].reshape(T1, n, T1, C)
        f = XL[idx_t, :, idx_t, :] / g0
        fc = f - f[:1] if center else f
        delta = _error_signal(torch, loss, fc[:, :P], Yv[None]) * bmask
    fc = f - f[:1] if center else f
    # equal-time NTK: K_{mu c, nu c'} = sum_{l=0}^{L} G^{l+1}_{cc'}(t,t) Phi^l_{mu nu}(t,t)
    kxt = equal_time(Phi0, T1, n)

    def gtt(Gl):
        return Gl.reshape(T1, C, T1, C)[idx_t, :, idx_t, :]

    ntk = gtt(G[0])[:, None, :, None, :] * kxt[:, :, None, :, None]
    for l in range(1, L + 1):
        Gl1 = gtt(G[l]) if l < L else eyeC.expand(T1, C, C)
        Pl = equal_time(Phi[l - 1], T1, n)
        ntk = ntk + Gl1[:, None, :, None, :] * Pl[:, :, None, :, None]
    return {"f": fc, "f_raw": f, "ntk": ntk, "Phi": Phi, "G": G[:L],
            "S": _unit_covariances(torch, Phi, G, X, R, L), "delta": delta}


def deep_linear_propagator(kx, y, depth, gamma0, lr, steps, *, center=False, ntk=True,
                           iters=None, responses=True, objective=None):
    """Exact O(1/N) covariances of a deep linear network (module docstring).

    Parameters
    ----------
    kx : (n, n) input kernel (train first); y : (P,) targets; depth : L >= 1;
    gamma0 > 0, lr > 0; steps : T.
    center : bool
        Centred model f - f(theta_0).
    ntk : bool
        Also N Var of each equal-time NTK entry.
    iters : int, optional
        Sweeps of the causal march (default T + L + 3, enough by causality; ``residual``
        checks it).
    responses : bool
        Include the noise of the response order parameters (default; set False only to see
        what it contributes: without it the result is wrong, see the module docstring).
    objective : solvers.objective.Objective, optional
        Any objective of docs/theory.rst §7 (C outputs; mse, cross-entropy or logistic loss;
        weight decay toward the initialisation or zero; batches): :func:`_march_objective`.
        ``y`` is then ignored (the objective's targets are used). None or a plain objective:
        the original march (numbers unchanged).

    Returns
    -------
    dict with ``f`` (T+1, n) and ``ntk_mean`` (T+1, n, n) at infinite width, ``cov``
    (T+1, T+1, n, n) two-time N Cov(f), ``pred_cov`` (T+1, n, n), ``ntk_var`` (T+1, n, n) or
    None, ``residual`` (the fixed point's last change, a convergence check). With a
    non-plain ``objective`` every point index is the flattened (point, output) pair
    I = mu C + c: ``f`` (T+1, n C), ``ntk_mean`` and ``ntk_var`` (T+1, n C, n C), ``cov``
    (T+1, T+1, n C, n C).
    """
    if objective is not None and not objective.plain:
        return _deep_linear_objective(kx, objective, depth, gamma0, lr, steps, center=center,
                                      ntk=ntk, iters=iters, responses=responses)
    torch = _torch()
    kx = np.asarray(kx, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, P, L, T1 = kx.shape[0], y.size, int(depth), int(steps) + 1
    m = n * T1
    if iters is None:
        # causality: each sweep fixes at least one more time step, and information from the
        # top layer needs up to L - 1 sweeps to reach the bottom one
        iters = T1 + L + 2
    kx_flat = _expand_kx(kx, T1)
    nthreads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        E = [_noise_leaves(torch, m, T1) for _ in range(L)]
        out, residual = _converged_march(torch, _march, (kx_flat, y, L, gamma0, lr, n, P, T1),
                                         E, center, iters, responses)
        iu = np.triu_indices(n)
        S = [s.detach().numpy() for s in out["S"]]
        obs_f = out["f"].reshape(-1)
        cov, ntk_v = _contract(torch, obs_f, E, S, full=True)
        if ntk:
            obs_k = out["ntk"][:, iu[0], iu[1]].reshape(-1)
            _, ntk_v = _contract(torch, obs_k, E, S, full=False)
        f_inf = out["f"].detach().numpy()
        ntk_inf = out["ntk"].detach().numpy()
    finally:
        torch.set_num_threads(nthreads)
    return _result(f_inf, ntk_inf, cov, ntk_v if ntk else None, residual, iu)


def _converged_march(torch, march, head, E, center, iters, responses, tail=()):
    """``march(torch, *head, E, center, iters, responses, *tail)`` and its residual: the
    largest change of f and of the NTK when the noise-free march runs two more sweeps
    (convergence: one more sweep must not move anything)."""
    out = march(torch, *head, E, center, iters, responses, *tail)
    with torch.no_grad():
        Ez = [{k: torch.zeros_like(e) for k, e in El.items()} for El in E]
        ref = march(torch, *head, Ez, center, iters + 2, responses, *tail)
        residual = max(float((ref["f"] - out["f"]).abs().max()),
                       float((ref["ntk"] - out["ntk"]).abs().max()))
    return out, residual


def _result(f_inf, ntk_inf, cov, ntk_v, residual, iu):
    """The result dict from the contracted covariances: ``cov`` (T1 n, T1 n) flat two-time,
    ``ntk_v`` (T1 m,) the N Var of the NTK entries ``iu`` (n points) or None."""
    T1, n = f_inf.shape[0], ntk_inf.shape[-1]
    cf = two_time(cov, T1, n)
    res = {"f": f_inf, "ntk_mean": ntk_inf, "cov": cf,
           "pred_cov": np.ascontiguousarray(cf[np.arange(T1), np.arange(T1)]),
           "residual": residual, "ntk_var": None}
    if ntk_v is not None:
        v = ntk_v.reshape(T1, iu[0].size)
        var = np.empty((T1, n, n))
        var[:, iu[0], iu[1]] = v
        var[:, iu[1], iu[0]] = v
        res["ntk_var"] = var
    return res


def _deep_linear_objective(kx, obj, depth, gamma0, lr, steps, *, center, ntk, iters,
                           responses):
    """:func:`deep_linear_propagator` for a non-plain objective (:func:`_march_objective`)."""
    torch = _torch()
    kx = np.asarray(kx, dtype=np.float64)
    Y = np.asarray(obj.Y, dtype=np.float64)
    n, P, C, L, T1 = kx.shape[0], obj.P, obj.C, int(depth), int(steps) + 1
    m, Tc, nC = n * T1, T1 * C, n * C
    if iters is None:
        iters = T1 + L + 2
    kx_flat = _expand_kx(kx, T1)
    args = (obj.loss, obj.mask, obj.a, obj.decay_to)
    nthreads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        E = [_noise_leaves(torch, m, Tc) for _ in range(L)]
        out, residual = _converged_march(torch, _march_objective,
                                         (kx_flat, Y, L, gamma0, lr, n, P, T1), E, center,
                                         iters, responses, args)
        iu = np.triu_indices(nC)
        S = [s.detach().numpy() for s in out["S"]]
        cov, _ = _contract(torch, out["f"].reshape(-1), E, S, full=True, fast_trace=True)
        ntk_flat = out["ntk"].reshape(T1, nC, nC)
        if ntk:
            _, ntk_v = _contract(torch, ntk_flat[:, iu[0], iu[1]].reshape(-1), E, S,
                                 full=False, fast_trace=True)
        f_inf = out["f"].detach().numpy().reshape(T1, nC)
        ntk_inf = ntk_flat.detach().numpy()
    finally:
        torch.set_num_threads(nthreads)
    return _result(f_inf, ntk_inf, cov, ntk_v if ntk else None, residual, iu)


def _noise_leaves(torch, m, T1):
    shapes = {"hh": (m, m), "zz": (T1, T1), "hz": (m, T1), "a": (m, T1), "b": (T1, m)}
    return {k: torch.zeros(*sh, dtype=torch.float64, requires_grad=True)
            for k, sh in shapes.items()}


def _assemble(grads, B, m, T1):
    """Gradients of B observables w.r.t. the noise blocks -> (B, d, d) matrices over the
    formal unit vector w = (h, z, rho_u, rho_r), d = 2 (m + T1)."""
    v = m + T1
    J = np.zeros((B, 2 * v, 2 * v))
    where = {"hh": (slice(0, m), slice(0, m)), "zz": (slice(m, v), slice(m, v)),
             "hz": (slice(0, m), slice(m, v)), "a": (slice(0, m), slice(v + m, 2 * v)),
             "b": (slice(m, v), slice(v, v + m))}
    for key, g in grads.items():
        if g is not None:
            J[(slice(None),) + where[key]] = g.numpy()
    return 0.5 * (J + J.transpose(0, 2, 1))


def _contract(torch, obs, E, S, full, batch=32, fast_trace=False):
    """N Cov of the observables ``obs`` (a 1-d tensor built from the noises E):
    sum_l 2 tr(J_i S_l J_j S_l) with J = d obs / d E^l symmetrised (Isserlis / Wick).

    Returns (cov (K, K) or None, var (K,)). Memory: K (2 (m + T1))^2 floats per layer when
    ``full``, else one batch."""
    K = obs.numel()
    var = np.zeros(K)
    Ys = [[] for _ in E] if full else None
    eye = torch.eye(K, dtype=obs.dtype)
    keys = list(E[0].keys())
    leaves = [El[k] for El in E for k in keys]
    m, T1 = E[0]["hz"].shape
    for lo in range(0, K, batch):
        hi = min(K, lo + batch)
        grads = torch.autograd.grad(obs, leaves, grad_outputs=eye[lo:hi], retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        for l in range(len(E)):
            gl = dict(zip(keys, grads[l * len(keys):(l + 1) * len(keys)]))
            if all(g is None for g in gl.values()):
                continue
            J = _assemble(gl, hi - lo, m, T1)
            Y = J @ S[l]
            if fast_trace:
                # tr(Y_i Y_i) elementwise: d^2 per observable, not a batched d^3 product
                var[lo:hi] += 2.0 * np.sum(Y * Y.transpose(0, 2, 1), axis=(1, 2))
            else:   # the original problem: the original arithmetic (bit-identical numbers)
                var[lo:hi] += 2.0 * np.einsum("iab,iba->i", Y, Y, optimize=True)
            if full:
                Ys[l].append(Y)
    cov = None
    if full:
        cov = np.zeros((K, K))
        for Yl in Ys:
            if not Yl:
                continue
            Y = np.concatenate(Yl).reshape(K, -1)
            Yt = np.concatenate(Yl).transpose(0, 2, 1).reshape(K, -1)
            cov += 2.0 * (Y @ Yt.T)
        cov = 0.5 * (cov + cov.T)
    return cov, var


def deep_linear_lazy_kappa(kx, depth, gamma0=None):
    """Exact N Cov of the initial NTK (and output) of a deep linear network.

    At initialisation Phi^l = kx + sum_{k <= l} eps_k / sqrt(N) and
    G^l = 1 + sum_{k >= l} eta_k / sqrt(N) with independent Wishart noises
    (N Cov eps = kx (x) kx + transposed, N Var eta = 2), so with K = sum_{l=0}^{L} G^{l+1} Phi^l

        N Cov(K, K) = sum_k (L - k + 1)^2 W(kx) + 2 sum_k k^2 kx (x) kx,  k = 1 .. L

    and N Cov f(0) = kx / gamma0^2. An independent route for the gamma0 -> 0 check.
    """
    L = int(depth)
    W = np.einsum("ik,jl->ijkl", kx, kx) + np.einsum("il,jk->ijkl", kx, kx)
    kk = np.einsum("ij,kl->ijkl", kx, kx)
    kK = sum((L - k + 1) ** 2 * W + 2.0 * k * k * kk for k in range(1, L + 1))
    kf = None if gamma0 is None else kx / gamma0 ** 2
    return kf, kK
