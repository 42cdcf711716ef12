"""Deep networks (L >= 2) by the alternating (iterative) Monte Carlo solver (docs/theory.rst §2).

Notation. n = P + Q points (train first), T1 = T + 1 times, flattened field index
``i = t * n + mu`` (time-major, :mod:`solvers.layout`). Two-time kernels are held as flat
(T1 n, T1 n) matrices. Per layer l the single-site process is marched by
:func:`solvers.mc.layer.march_layer` with Gaussian sources u ~ N(0, Phi^{l-1}) (u^1 constant in
time, covariance X X^T / D) and r ~ N(0, G^{l+1}) (r^L = w(0), one scalar per sample); Delta
acts on the column index (train columns only: test points are passive). Responses come from
:mod:`solvers.mc.responses`.

Predictions f(t) = gamma0^{-1} < z^L(t) phi(h^L(t)) > with antithetic pairs (u, r), (u, -r):
the t = 0 term, of Monte Carlo size 1 / (gamma0 sqrt S), cancels exactly.

Chunks of samples are streamed, so at most ``chunk`` x (T1 n) x (T P) numbers are held, and
all BLAS calls run on one thread (thin GEMMs).
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .. import fixedpoint
from ..layout import equal_time, psd_sqrt
from ._common import _single_thread_blas
from .layer import causal_operators, march_layer
from .responses import (_lam, default_relu_eps, response_control, response_sums,
                        stein_accumulate, stein_finish, stein_groups)

__all__ = ["solve_deep"]


def _chunk_sizes(samples: int, T1: int, n: int, P: int, chunk_mb: float, min_blocks: int = 8):
    """Even chunk sizes: march chunks (also the batch-means blocks) and tangent sub-chunks."""
    per = 8.0 * T1 * n * 8                       # ~8 (S, T1 n) float64 arrays in flight
    c = int(chunk_mb * 1e6 / per)
    c = max(2, min(c, -(-samples // min_blocks)))
    c += c % 2
    per_t = 8.0 * (3 * T1 * P + T1 * n + 2 * n) * T1 * P + 1.0
    ct = max(1, int(chunk_mb * 1e6 / per_t))
    return c, ct


def _extend(prev: dict, kx, y, lr: float, H: int, steps: int) -> dict:
    """Starting point on [0, steps] from a solution on [0, H] (flat (H+1) n layouts).

    Kernels Phi, G: clamp both times to H (kernels vary slowly late in training). Responses
    A, B: shift along the diagonal (keep the lag t - s, which preserves causality). f: the
    frozen-NTK dynamics continued from f(H) with K(H).
    """
    n = kx.shape[0]
    P = y.shape[0]
    T1h, T1 = H + 1, steps + 1
    tc = np.minimum(np.arange(T1), H)
    ic = (tc[:, None] * n + np.arange(n)[None, :]).reshape(-1)

    def clamp(K):
        return K[..., ic[:, None], ic[None, :]]

    def shift(K):
        if K is None:
            return None
        K4 = K.reshape(K.shape[0], T1h, n, T1h, n)
        out = np.zeros((K.shape[0], T1, n, T1, n))
        for t in range(T1):
            k = max(0, t - H)
            s = np.arange(k, t + 1)
            out[:, t, :, s, :] = np.moveaxis(K4[:, t - k, :, s - k, :], 0, 0)
        return out.reshape(K.shape[0], T1 * n, T1 * n)

    f = np.empty((T1, n))
    f[:T1h] = prev["f"]
    K = prev["ntk"][H][:, :P]
    for t in range(H, steps):
        f[t + 1] = f[t] + lr * K @ (y - f[t, :P])
    return {"f": f, "phi": clamp(prev["phi"]), "g": clamp(prev["g"]), "A": shift(prev["A"]),
            "B": shift(prev["B"])}


def solve_deep(kx, y, activation: str, depth: int, gamma0: float, lr: float, steps: int, *,
               samples: int, seed, phi0, g0, f0, responses: bool = True,
               response_samples: int | None = None, damping: float = 1.0, anderson: int = 0,
               tol: float = 1e-4, noise_factor: float = 0.25, max_iter: int = 50,
               chunk_mb: float = 64.0, relu_eps: float | None = None, newton: bool = True,
               window: int | None = 10, init: dict | None = None,
               b_estimator: str = "auto", stein_rtol: float = 1e-6,
               response_cv: bool = True, callback=None, logger=None, bar=None) -> dict:
    """Alternating Monte Carlo solution of the DMFT of a network with ``depth`` >= 2 layers.

    Starts from the static kernels ``phi0``, ``g0`` (L, n, n) held constant in time, the
    static-NTK predictions ``f0`` (T1, n) and A = B = 0 (or from ``init``, flat layouts as
    returned); each iteration draws the same standard normals (common random numbers),
    marches the layers in order l = 1 .. L, each with this sweep's Phi^{l-1}, A^{l-1}
    (Gauss-Seidel over layers) and the previous G^{l+1}, B^l, re-estimates Phi^l, G^l, f and
    (``responses=True``) A^l, B^l, and mixes (:func:`solvers.fixedpoint.iterate`).

    Three measures make the iteration converge in a few sweeps (measurements:
    benchmarks/README.md):

    - Gauss-Seidel over layers (a Jacobi sweep propagates the layer chain one layer per
      iteration and oscillated);
    - a quasi-Newton step on the f -> Delta -> f loop (``newton``; see ``newton_f``);
    - continuation in time (``window``): the map is causal, so [0, H] is solved first with
      H = max(window, steps / 2) recursively (with a quarter of the samples, not below 2048)
      and extended (:func:`_extend`). Without it the static-NTK error signal over the whole
      horizon drives ReLU fields to overflow.

    Residual: max|f' - f| and, per kernel, RMS(K' - K) / RMS(K); floor: the same norms of the
    batch-mean standard errors. Mixing: ``damping`` (default 1 here: plain iteration), halved
    (down to 0.25) when the residual stalls for 3 iterations at the noise level.

    GIA (``responses=False``): predictions follow f(t+1) = f(t) + lr K(t) Delta(t) (the
    reading gamma0^{-1} <w phi(h^L)> needs A^{L-1}; without it even the lazy limit is wrong).

    Responses: A^l always by per-sample tangents (``response_samples`` samples; with
    ``response_cv`` their first-order term is averaged over all samples instead,
    :func:`response_control`). B^{l-1} by ``b_estimator``: ``"tangent"`` (per-sample tangents)
    or ``"stein"`` (Stein's lemma in the causally whitened sources, :func:`stein_finish`, from
    all ``samples`` samples; innovations below ``stein_rtol`` of a source's variance are
    dropped); ``"auto"``: Stein for ReLU, tangents otherwise. For ReLU per-sample tangents
    cannot give B: the sources of layers l >= 2 have innovations of ~1e-2 of their scale per
    step, so E[z | h = x] has structure on that scale, a smoothed delta wide enough to have a
    finite variance is biased, and a narrower one makes the per-sample tangents blow up
    (the delta is re-injected at every step a unit hovers near 0). A does not see the delta
    directly (r enters h through one memory step) and its smoothed-delta tangents agree with
    Stein (measurements: benchmarks/README.md).

    ``residuals``, ``floors``, plus ``samples``, ``response_samples``, ``relu_eps``,
    ``b_estimator``.
    """
    kw = dict(samples=samples, seed=seed, phi0=phi0, g0=g0, responses=responses,
              response_samples=response_samples, damping=damping, anderson=anderson, tol=tol,
              noise_factor=noise_factor, max_iter=max_iter, chunk_mb=chunk_mb,
              relu_eps=relu_eps, newton=newton, window=window, b_estimator=b_estimator,
              stein_rtol=stein_rtol, response_cv=response_cv, callback=callback, logger=logger,
              bar=bar)
    if b_estimator == "auto":
        b_estimator = "stein" if activation == "relu" else "tangent"
    if b_estimator not in ("tangent", "stein"):
        raise ValueError(f"b_estimator must be 'auto', 'tangent' or 'stein', got "
                         f"{b_estimator!r}")
    kw["b_estimator"] = b_estimator
    if init is None and window is not None and steps > window:
        # continuation in time: the map is causal, so the problem on [0, H] is the same problem
        # with fewer steps. Solving it first and extending keeps the fields from being driven
        # by the static-NTK error signal over the whole horizon (exponential at large gamma0 t,
        # fatal for ReLU), and the short horizons are cheap (tangents cost ~ H^3).
        H = max(int(window), -(-steps // 2))
        # the shorter horizons only give the starting point: a quarter of the samples (not
        # below 2048) is enough, since the last stage starts from an extension whose error
        # (~0.25 relative on the kernels) is far above the noise of S / 4 samples
        kw_h = dict(kw, samples=max(min(int(samples), 2048), int(samples) // 4))
        prev = solve_deep(kx, y, activation, depth, gamma0, lr, H, f0=f0[:H + 1], **kw_h)
        if logger is not None:
            logger.info("mc horizon %d of %d solved in %d iterations", H, steps,
                        prev["iterations"])
        kw.pop("window")
        out = solve_deep(kx, y, activation, depth, gamma0, lr, steps, f0=f0,
                         init=_extend(prev, kx, y, lr, H, steps), window=None, **kw)
        out["iterations"] += prev["iterations"]
        out["stages"] = (prev.get("stages") or [(H, prev["iterations"])]) + [
            (steps, out["iterations"] - prev["iterations"])]
        out["residuals"] = np.concatenate([prev["residuals"], out["residuals"]])
        out["floors"] = np.concatenate([prev["floors"], out["floors"]])
        return out
    L = int(depth)
    n = kx.shape[0]
    P = y.shape[0]
    T1 = steps + 1
    m = T1 * n
    c, ct = _chunk_sizes(samples, T1, n, P, chunk_mb)
    nchunks = -(-samples // c)
    S = nchunks * c
    Sr = 0
    if responses:
        Sr = S if response_samples is None else min(S, max(2, int(response_samples)))
    # ReLU's smoothed delta (A's tangents): never wider than at 2048 tangent samples, the
    # count it was validated with before the control variate made fewer tangents enough
    eps = (default_relu_eps(max(Sr, 2048)) if relu_eps is None else float(relu_eps))
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    # children[l][kind][chunk]: the same normals every iteration (common random numbers)
    children = [[k.spawn(nchunks) for k in lay.spawn(2)] for lay in ss.spawn(L)]
    ones = np.ones((m, m))
    kx_flat = np.kron(np.ones((T1, T1)), kx)
    Sx = psd_sqrt(kx)

    # state layout: f | phi^1..L | g^1..L | A^1..L-1 | B^1..L-1
    nr = (L - 1) if responses else 0
    sizes = [m] + [m * m] * (2 * L + 2 * nr)
    offs = np.concatenate([[0], np.cumsum(sizes)])

    def unpack(x):
        f = x[:m].reshape(T1, n)
        blocks = [x[offs[i]:offs[i + 1]].reshape(m, m) for i in range(1, len(sizes))]
        phi = blocks[:L]
        g = blocks[L:2 * L]
        A = blocks[2 * L:2 * L + nr] if nr else None
        B = blocks[2 * L + nr:] if nr else None
        return f, phi, g, A, B

    x0 = np.empty(offs[-1])
    f_, phi_, g_, A_, B_ = unpack(x0)
    if init is None:
        f_[...] = f0
        for l in range(L):
            phi_[l][...] = np.kron(np.ones((T1, T1)), phi0[l])
            g_[l][...] = np.kron(np.ones((T1, T1)), g0[l])
        x0[offs[1 + 2 * L]:] = 0.0
    else:
        f_[...] = init["f"]
        for l in range(L):
            phi_[l][...] = init["phi"][l]
            g_[l][...] = init["g"][l]
        for l in range(nr):
            A_[l][...] = init["A"][l] if init["A"] is not None else 0.0
            B_[l][...] = init["B"][l] if init["B"] is not None else 0.0
    last = {}

    def fmap(x):
        f, phi, g, A, B = unpack(x)
        dcol = np.zeros((T1, n))
        dcol[:, :P] = y[None, :] - f[:, :P]
        dcol = dcol.reshape(-1)
        y_new = np.empty_like(x)
        fn, phin, gn, An, Bn = unpack(y_new)
        f_blocks = np.zeros((nchunks, T1, n))
        eq_phi = np.zeros((L, nchunks, T1, n, n))
        eq_g = np.zeros((L, nchunks, T1, n, n))
        se = {"phi": [], "g": []}
        for l in range(L):
            # Gauss-Seidel over layers: layer l sees this sweep's Phi^{l-1}, A^{l-1}
            phi_prev = kx_flat if l == 0 else phin[l - 1]
            g_next = ones if l == L - 1 else g[l + 1]
            a_prev = An[l - 1] if (nr and l >= 1) else None
            b_l = B[l] if (nr and l <= L - 2) else None
            C, D = causal_operators(phi_prev, g_next, a_prev, b_l, dcol, lr, T1, n)
            Su = Sx if l == 0 else psd_sqrt(phi_prev)
            Sg = None if l == L - 1 else psd_sqrt(g[l + 1])
            phin[l][...] = 0.0
            gn[l][...] = 0.0
            sq_phi = np.zeros((m, m))
            sq_g = np.zeros((m, m))
            need_r = nr and l <= L - 2
            stein_u = bool(nr and l >= 1 and b_estimator == "stein")
            need_u = nr and l >= 1 and not stein_u
            accA = np.zeros((m, m)) if need_r else None
            accB = np.zeros((m, m)) if need_u else None
            cv = bool(response_cv and (need_r or need_u))
            # with the control variate the tangents give only the noisy remainder: float32
            tdtype = np.float32 if cv else np.float64
            # the operators in the tangents' precision, cast once per layer (not per sub-chunk)
            Ct, Dt = C.astype(tdtype, copy=False), D.astype(tdtype, copy=False)
            if cv:
                # control variate (response_control): sums of Lam1 Lam1^T and Lam2 over all
                # samples and over the tangent samples
                kl_all, kl_r = np.zeros((m, m)), np.zeros((m, m))
                l2_all, l2_r = np.zeros(m), np.zeros(m)
            if stein_u:
                groups = stein_groups(Su @ Su, T1, n, P, stein_rtol)
                accS = [np.zeros((len(gr["rows"]), len(gr["cols"]))) for gr in groups]
            for ci in range(nchunks):
                half = c // 2
                ru = np.random.default_rng(children[l][0][ci])
                rr = np.random.default_rng(children[l][1][ci])
                if l == 0:
                    u = np.repeat(ru.standard_normal((half, n)) @ Sx, 2, axis=0)
                    u = np.tile(u, (1, T1))
                else:
                    u = np.repeat(ru.standard_normal((half, m)) @ Su, 2, axis=0)
                if l == L - 1:
                    e = rr.standard_normal(half)
                    r = np.repeat(np.stack([e, -e], axis=1).reshape(-1, 1), m, axis=1)
                else:
                    e = rr.standard_normal((half, m)) @ Sg
                    r = np.stack([e, -e], axis=1).reshape(c, m)
                H, PH, Z, G = march_layer(u, r, C, D, gamma0, activation, T1, n)
                if not (np.all(np.isfinite(H)) and np.all(np.isfinite(G))):
                    raise FloatingPointError(
                        f"non-finite fields in layer {l + 1}; gamma0 or lr is too large")
                kp = PH.T @ PH / c              # NumPy uses syrk for a.T @ a
                kg = G.T @ G / c
                phin[l] += kp
                gn[l] += kg
                sq_phi += kp * kp
                sq_g += kg * kg
                eq_phi[l, ci] = equal_time(kp, T1, n)
                eq_g[l, ci] = equal_time(kg, T1, n)
                if l == L - 1:
                    f_blocks[ci] = (Z * PH).mean(axis=0).reshape(T1, n) / gamma0
                if stein_u:
                    stein_accumulate(groups, u, G, accS, n)
                lo = ci * c
                k = min(c, Sr - lo) if lo < Sr else 0
                if cv:
                    lam1, lam2 = _lam(activation, H, Z, eps, PH)
                    kl = lam1.T @ lam1
                    kl_all += kl
                    if k:
                        kl_r += kl if k == c else lam1[:k].T @ lam1[:k]
                    if need_u:
                        l2_all += lam2.sum(axis=0)
                        l2_r += lam2[:k].sum(axis=0)
                if k:
                    for j in range(0, k, ct):
                        sl = slice(j, min(k, j + ct))
                        if need_r:
                            response_sums(H[sl], Z[sl], Ct, Dt, gamma0, activation, T1, n,
                                          P, "r", accA, eps, dtype=tdtype)
                        if need_u:
                            response_sums(H[sl], Z[sl], Ct, Dt, gamma0, activation, T1, n,
                                          P, "u", accB, eps, dtype=tdtype)
            phin[l] /= nchunks
            gn[l] /= nchunks
            # symmetrise against rounding in the per-chunk products
            phin[l][...] = 0.5 * (phin[l] + phin[l].T)
            gn[l][...] = 0.5 * (gn[l] + gn[l].T)
            for key, sq, mean in (("phi", sq_phi, phin[l]), ("g", sq_g, gn[l])):
                se[key].append(np.sqrt(np.maximum(sq / nchunks - mean * mean, 0.0)
                                       / max(nchunks - 1, 1)))
            if cv:
                response_control(accA, accB, C, D, kl_all, kl_r, l2_all, l2_r, S, Sr, gamma0)
            if need_r:
                An[l][...] = accA / (gamma0 * Sr)
            if need_u:
                Bn[l - 1][...] = accB / (gamma0 * Sr)
            if stein_u:
                Bn[l - 1][...] = stein_finish(groups, accS, S, gamma0, m)
        # NTK per block: sum_{l=0}^{L} G^{l+1}(t,t) Phi^l(t,t)
        ntk_b = eq_phi[L - 1].copy()
        for l in range(L):
            ph_l = kx[None, None] if l == 0 else eq_phi[l - 1]
            ntk_b += eq_g[l] * ph_l
        if not nr:
            # GIA: gamma0^{-1} <w phi(h^L)> needs A^{L-1} to carry the hidden layers'
            # contribution (without it even the lazy limit is wrong), so the predictions
            # follow the kernel form f(t+1) = f(t) + lr K(t) Delta(t) (docs/theory.rst §4)
            dtr = dcol.reshape(T1, n)[:, :P]
            f_blocks[:, 1:] = lr * np.einsum("btma,ta->btm", ntk_b[:, :-1, :, :P], dtr[:-1])
            f_blocks = np.cumsum(f_blocks, axis=1)
        fn[...] = f_blocks.mean(axis=0)
        f_se = f_blocks.std(axis=0, ddof=1) / math.sqrt(nchunks)
        last.update(f_se=f_se, phi_se=np.array(se["phi"]), g_se=np.array(se["g"]),
                    ntk=ntk_b.mean(axis=0),
                    ntk_se=ntk_b.std(axis=0, ddof=1) / math.sqrt(nchunks))
        # predictions: max norm; kernels: root-mean-square change relative to the kernel's
        # RMS (a max over ~(nT)^2 entries would chase the noisiest entry of heavy-tailed G)
        res = float(np.abs(fn - f).max())
        floor = float(f_se.max())
        parts = {"f": res}
        rms = lambda a: float(np.sqrt(np.mean(a * a)))               # noqa: E731
        for l in range(L):
            for key, new, old, s in (("phi", phin[l], phi[l], se["phi"][l]),
                                     ("g", gn[l], g[l], se["g"][l])):
                scale = max(rms(new), 1e-300)
                parts[f"{key}{l + 1}"] = rms(new - old) / scale
                res = max(res, parts[f"{key}{l + 1}"])
                floor = max(floor, rms(s) / scale)
        if nr:
            for l in range(nr):
                for key, new, old in (("A", An[l], A[l]), ("B", Bn[l], B[l])):
                    parts[f"{key}{l + 1}"] = float(np.abs(new - old).max()) / max(
                        float(np.abs(new).max()), 1e-300)
        last["parts"] = parts
        if logger is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug("mc residual parts: %s",
                         " ".join(f"{k}={v:.2e}" for k, v in parts.items()))
        return y_new, res, floor

    def newton_f(x, r):
        # The stiff loop of the map is f -> Delta -> f: f'(t) ~ f(0) + lr sum_{s<t} K(s) Delta(s)
        # with Delta = y - f, so dF(t)/df(s) ~ -lr K(s)[:, train] (s < t). Plain iteration of
        # that Volterra map grows errors like (lr K T)^k / k! before they shrink; solving
        # (I + lr tril K) d = r by forward substitution removes it (kernels held fixed).
        K = last["ntk"][:, :, :P]
        rf = r[:m].reshape(T1, n)
        d = np.empty((T1, n))
        acc = np.zeros(n)
        for t in range(T1):
            d[t] = rf[t] - acc
            acc += lr * (K[t] @ d[t, :P])
        r = r.copy()
        r[:m] = d.reshape(-1)
        return r

    with _single_thread_blas():
        fp = fixedpoint.iterate(fmap, x0, damping=damping, anderson=anderson, tol=tol,
                                noise_factor=noise_factor, max_iter=max_iter,
                                precondition=newton_f if newton else None, stall=3,
                                min_damping=min(damping, 0.25), callback=callback,
                                logger=logger, bar=bar, name="mc")
    f, phi, g, A, B = unpack(fp.x)
    phi, g = np.array(phi), np.array(g)
    # NTK from the final kernels (not the mean of per-block products, biased by O(1/chunk))
    ntk = equal_time(phi[L - 1], T1, n).copy()
    for l in range(L):
        ntk += equal_time(g[l], T1, n) * (kx[None] if l == 0 else equal_time(phi[l - 1], T1, n))
    return {"f": f.copy(), "phi": phi, "g": g,
            "A": np.array(A) if nr else None, "B": np.array(B) if nr else None,
            "f_se": last["f_se"], "phi_se": last["phi_se"], "g_se": last["g_se"],
            "ntk": ntk, "ntk_se": last["ntk_se"], "converged": fp.converged,
            "iterations": fp.iterations, "residuals": fp.residuals, "floors": fp.floors,
            "samples": S, "response_samples": Sr, "relu_eps": eps if activation == "relu"
            else None, "b_estimator": b_estimator, "chunk": c, "tangent_chunk": ct}
