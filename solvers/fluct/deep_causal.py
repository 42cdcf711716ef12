"""Adjoint rows of the deep propagator in one backward pass, through the causal single-site map.

docs/theory.rst §5 on top of §2 (the causal structure of the discrete-time DMFT,
:mod:`solvers.mc.causal`). The deep propagator (:mod:`solvers.fluct.deep_mc`) needs, for every
observable o (predictions, NTK entries at chosen times), the adjoint rows

    J_o = d o / d E = grad o (I - M_q)^{-1} M_E

of the linearised fixed point q = M(q, E) of the sampled single-site map, E the finite-width
noise of every order parameter (Phi^l, G^l, A^l, B^l, f; their conventions are those of
:mod:`solvers.fluct.deep_mc`). Iterating w <- grad o + w M_q with the non-causal sweep of that
module costs T + L full backward passes per batch of observables. This module uses causality
instead.

Causal recursion
----------------
Every row of the order parameters at time t is a function of the rows at times <= t only:
bottom-up at step t, layer l needs its sources u^l(t) (the causal Cholesky factor of
Phi^{l-1}(<= t, <= t)), the memory C^l(t, < t) (Phi^{l-1}(t, < t), A^{l-1}(t, < t), Delta(< t))
and the past of its own fields; it gives Phi^l(t, <= t) and A^l(t, < t). Top-down it needs
r^l(t) (the factor of G^{l+1}(<= t, <= t)) and D^l(t, <= t) (G^{l+1}, B^l(t, <= t), Delta(< t));
it gives G^l(t, <= t), B^{l-1}(t, <= t) and, at the top, f(t). So the recursion

    q_t = M_t(q_{<=t}, E)       t = 0, 1, ..., T (layers in the order above)

defines q(E) with q = M(q, E) for every E near 0, and the chain rule through it gives
dq/dE = (I - M_q)^{-1} M_E exactly: ONE reverse-mode pass per batch of observables, no
iteration (the Neumann series of the causal M_q is summed by the order of the recursion).

Pinning. The recursion is evaluated with

    row_t = q0_t + (est_t - stop_gradient(est_t)) + E_t

(est_t the Monte Carlo estimate of the row from the samples marched with the rows before it):
its value is the solution q0 being linearised (so the samples are marched exactly as by the
non-causal sweep at q0), and its derivative is the derivative of the estimator. The one
remaining within-step coupling, the equal-time memory C^l(t, t) = A^{l-1}(t, t) (zero at the
linearisation point), enters at first order as gamma0 C^l(t, t) g(t) with g(t) at E = 0,
taken from a value pass.

Equal-time responses. A^{l-1}(t, t) is zero at the linearisation point (h(t) does not read
r(t)), but not its first-order change: it is the noise E_a^{l-1}(t, t) / gamma0 *plus* the mean
response of layer l - 1 to its own equal-time memory. With h^l(t) = ... + gamma0 C^l(t, t)
g^l(t) and g(t) = phi'(h(t)) (r(t) + ...), d phi(h_mu(t)) / d r_nu(t) = phi'(h_mu) gamma0
C_{mu nu}(t, t) phi'(h_nu) at first order, so A^l(t, t) = C^l(t, t) (.) <Lam1 Lam1^T>(t)
(:func:`equal_time_response`): the equal-time noise of every layer is carried up to the next,
as in the exact deep-linear propagator (a^l(t, t) = a^{l-1}(t, t) + noise there). Stein's
lemma in the training innovations of times < t sees this derivative too, along the part of
r(t) that regresses on them (Cov(r(t), xi_k) = (beta L)_k), so it is subtracted from those
columns (A^l(t, keep) -= A^l(t, t) beta). Without the two (until 6 Dec 2026, session 30)
the first layer's E_a(0, 0) reached nothing: its adjoint row was 0.018 against the exact
-0.970 (linear depth 3, one point, one step), N Var f(1) 13 % high there, and the test
points' N Var f ~5 % high at 4 + 2 points and 15 steps (benchmarks/README.md). The
non-causal sweep of :mod:`solvers.fluct.deep_mc` has the same two terms.

Differences from the non-causal sweep: sources of variables without an innovation (dropped
below ``rtol``) are their regression on the kept innovations *up to their own time* (the
non-causal factor K[:, keep] L^{-T} also loads, by O(rtol), on later ones); everything else,
Stein responses included (A in the kept training innovations of G^{l+1}, B in the row groups of
:func:`solvers.mc.responses.stein_groups`), is the same estimator, row by row.

Responses outside their structure. The mean response B^{l-1}(t mu, s q) of a test column q in
another row (a training point's g, or another test point's, to a test point's source u(s q))
is zero at the linearisation point: nothing reads a test point's fields there. Its derivative
is not: with the noise of the memory kernels switched on (E_b(t mu, s q) in D, E_a(t mu, s q)
in C, both on every pair), u(s q) reaches the other points' g at first order. Holding these
entries at zero (as until 6 Dec 2026) dropped that change; it enters the predictions from
depth 3 on, through the middle layer's D (linear depth 3, 2 + 1 points, 8 steps: the test
point's N Var f 0.469 against the exact 0.403). They are estimated by forward tangents of the
march along every u(s q) (T1 Q directions) on the first ``tangent_samples`` samples of the map:
the tangent starts on the kicked point alone (its zero-order value, known in closed form) and
spreads through the perturbed C, D rows of the graph pass. Tangent instead of Stein estimates
elsewhere, and the responses A(t mu, s q) of test columns, were tried and change nothing
(benchmarks/README.md). Cost: ~T1 Q ts extra columns per layer >= 1 in the graph pass.

Memory: the graph keeps the fields (n, S) per time and layer and small (n, n) blocks; products
with histories are taken block by block in time, so no (t n, S) history is copied per step.
"""
from __future__ import annotations

import numpy as np

from .._memory import release
from ..layout import causal_mask

__all__ = ["AdjointRows", "causal_adjoint", "equal_time_response", "regression_rows",
           "tangent_count"]


class _IncChol:
    """Causal Cholesky factor of a kernel revealed one time block at a time, at a fixed set of
    kept innovations (global flat indices, increasing, time-major).

    ``extend(t, row)`` with the row block K(t, <= t) as an (n, (t+1) n) tensor (columns: flat
    indices 0 .. (t+1) n - 1) appends the innovations of time t. Differentiable in the rows.
    """

    def __init__(self, torch, keep, n):
        self.torch = torch
        self.keep = np.asarray(keep, dtype=np.int64)
        self.n = n
        self.kt = self.keep // n
        self.L = None                       # (k_<=t, k_<=t) lower triangular
        self.k = 0                          # kept innovations so far
        self.new_loc = None                 # positions in their block of the last new ones

    def count(self, t):
        """Number of kept innovations with time <= t."""
        return int(np.searchsorted(self.kt, t, side="right"))

    def extend(self, t, row):
        torch = self.torch
        k0, k1 = self.k, self.count(t)
        if k1 == k0:
            return None
        new = self.keep[k0:k1]
        loc = self.new_loc = torch.as_tensor(new - t * self.n)
        Knn = row[loc][:, torch.as_tensor(new)]
        Knn = 0.5 * (Knn + Knn.T)
        if k0:
            Kno = row[loc][:, torch.as_tensor(self.keep[:k0])]
            L21 = torch.linalg.solve_triangular(self.L, Kno.T, upper=False).T
            L22 = torch.linalg.cholesky(Knn - L21 @ L21.T)
            top = torch.cat([self.L, torch.zeros(k0, k1 - k0, dtype=row.dtype)], 1)
            self.L = torch.cat([top, torch.cat([L21, L22], 1)], 0)
        else:
            L21 = None
            L22 = torch.linalg.cholesky(Knn)
            self.L = L22
        self.k = k1
        return L21, L22

    def rows(self, row):
        """F(t, kept <= t) (n, k) with u(t) = F xi: the regression of every variable of the
        block on the kept innovations so far (= the factor's rows for kept variables)."""
        torch = self.torch
        Kc = row[:, torch.as_tensor(self.keep[:self.k])]
        return torch.linalg.solve_triangular(self.L, Kc.T, upper=False).T

    def solve_right(self, J):
        """J L^{-1} for J (r, k) over the first k kept innovations."""
        k = J.shape[1]
        return self.torch.linalg.solve_triangular(self.L[:k, :k], J, upper=False, left=False)


def equal_time_response(Ctt, lam):
    """First-order change of the mean equal-time response A^l(t, t) = gamma0^{-1} <d phi(h(t))
    / d r(t)> of a layer whose equal-time memory C^l(t, t) = A^{l-1}(t, t) is perturbed to
    ``Ctt`` (n, n): with h(t) = ... + gamma0 C(t, t) g(t) and g(t) = phi'(h(t)) z(t),
    z(t) = r(t) + ..., d phi(h_mu(t)) / d r_nu(t) = phi'(h_mu) gamma0 C_{mu nu}(t, t) phi'(h_nu)
    to first order, so A^l(t, t)_{mu nu} = C_{mu nu}(t, t) <phi'(h_mu(t)) phi'(h_nu(t))>.

    ``lam`` (n, S): phi'(h(t)) of the samples at the linearisation point. Zero at the
    linearisation point (C(t, t) = 0 there), so the mean response has no
    equal-time part, but its derivative carries the equal-time noise of every layer below up
    to the next one (the exact deep-linear propagator's a^l(t, t) = a^{l-1}(t, t) + noise)."""
    return Ctt * (lam @ lam.T / lam.shape[1])


def regression_rows(torch, K, rows, keep):
    """(len(rows), len(keep)) coefficients beta = K[rows, keep] K[keep, keep]^{-1} of the
    variables ``rows`` on the variables ``keep`` of the covariance K (torch). For a source
    r = F xi whitened on ``keep`` (r_keep = L xi), Cov(r_rows, xi) = beta L: the weight with
    which Stein's lemma in those innovations sees a derivative along r_rows (the equal-time
    correction of A, module docstring)."""
    Kk = K[keep][:, keep]
    return torch.linalg.solve(0.5 * (Kk + Kk.T), K[rows][:, keep].T).T


def causal_adjoint(torch, *, act, kx, y, L, gamma0, lr, T1, n, center, q0, keep_u, keep_r,
                   keep_rtr, groups, xi_u, xi_r, times, ntk=True, batch=32, logger=None,
                   progress=None, transient_bytes=1_500_000_000, cache_bytes=800_000,
                   values_only=False, lazy=False, tangent_samples=64):
    """Adjoint rows J (module docstring) of the observables at ``times``.

    Parameters
    ----------
    torch : module; act : callable act(x, order) (order 0: phi, 1: phi').
    kx : (n, n) numpy input kernel; y : (P,) numpy targets.
    q0 : dict of float64 torch tensors, the linearisation point: ``f`` (T1, n), ``phi``,
        ``g`` lists of L flat (m, m), ``A``, ``B`` lists of L - 1 flat (m, m).
    keep_u, keep_r : per layer kept innovations of the source kernels (flat indices);
    keep_rtr : per layer < L - 1 kept training innovations of G^{l+1};
    groups : per layer (None for layer 0) the Stein groups of B (``stein_groups``);
    xi_u, xi_r : per layer (S, k) standard normals of the kept innovations (torch).
    times : sorted steps of the observables.
    batch : int
        Most observables per batched backward pass; fewer when one pass would hold more than
        ``transient_bytes`` of adjoint fields (about 64 L T1 n S bytes per observable), and
        at most ``cache_bytes / (8 n S)``: the backward's products then stay in the cache
        (per observable up to 1.8x faster than larger passes, measured).
    lazy : bool
        Return an :class:`AdjointRows` (rows of chosen observables on demand, the graph
        retained) instead of the rows of every observable.
    values_only : bool
        Only the value pass: return ``(fields, gaps)`` of these sources (the fresh kappa
        samples of :func:`solvers.fluct.deep_mc.deep_propagator`'s cross estimate), no graph.

    Returns
    -------
    J : list over layers of dicts ``pp``, ``gg``, ``a``, ``b`` (K, m, m), ``f`` (K, m), in
        the conventions of :func:`solvers.fluct.deep_mc.deep_propagator`;
    fields : list over layers of dicts ``phi``, ``g``, ``z`` (m, S) and ``u``, ``r`` (S, m)
        at the linearisation point, and ``C``, ``D`` (m, m) values of the memory kernels.
    K : number of observables (n per time for f, then n (n + 1) / 2 per time for the NTK).
    gaps : dict
        Fixed-point check: the largest |sample estimate - solution| of the rows of Phi, G
        (relative to the kernel's largest entry) and of gamma0 f (relative to its largest
        value), the samples marched with the solution's order parameters. Monte Carlo noise
        makes them a few per cent; a solution that is not a fixed point of the single-site
        map (another lr or gamma0, a diverging linearisation) makes them O(1).
    """
    dt = torch.float64
    P = int(np.asarray(y).size)
    m = T1 * n
    S = xi_u[0].shape[0]
    T = lambda a: torch.tensor(np.array(a, dtype=np.float64))               # noqa: E731
    kx_t = T(kx)
    yv = T(y)
    train = np.arange(n) < P
    trainf = T(train.astype(float))
    pb = np.tile(np.arange(n), T1)
    # masks on a row block (t, <= t): A's mean on training columns (s <= t), B's mean on its
    # structure (s <= t); their noise on every column (s <= t for A, s < t for B: the
    # zero-mean responses of test columns fluctuate too, solvers.fluct.deep_mc)
    maskA_cols = T(np.tile(train, T1).astype(float))                    # (m,)
    maskB_struct = np.zeros((m, m), bool)
    tr_flat = pb < P
    maskB_struct[np.ix_(tr_flat, tr_flat)] = True
    for q in range(P, n):
        rows = pb == q
        maskB_struct[np.ix_(rows, tr_flat | rows)] = True
    maskB_struct_t = T(maskB_struct.astype(float))
    # where B enters D: its structure, and every column at s < t (the noise)
    maskB_use_t = T((maskB_struct | causal_mask(T1, n)).astype(float))

    kx_flat_t = T(np.tile(kx, (T1, T1)))
    ones_t = torch.ones(m, m, dtype=dt)
    yfull = torch.zeros(n, dtype=dt)
    yfull[:P] = yv
    xiu_T = [x.T.contiguous() for x in xi_u]                              # (k, S)
    xir_T = [x.T.contiguous() for x in xi_r]
    # B^{l-1}(t mu, s q) outside its structure (test columns q of other rows): zero at the
    # linearisation point but not its derivative, by tangents of the march along u^l(s q)
    # (module docstring, "Responses outside their structure"), on the first ``ts`` samples;
    # directions d = (s_d, q_d), s_d = 0 .. T1 - 1, q_d test, direction-major
    Q = n - P
    ts = tangent_count(S, T1 * Q, tangent_samples) if L >= 2 else 0
    ND = T1 * Q
    dir_s = np.repeat(np.arange(T1), Q)
    dir_q = np.tile(np.arange(P, n), T1)
    # the pairs s < t outside B's structure (all of them in test columns)
    extra = causal_mask(T1, n) & ~maskB_struct
    extra_t = T(extra.astype(float))
    # direction d -> flat column (s_d q_d) of the row block t, for s_d < t
    scatter = []
    for t in range(T1):
        sc = np.zeros((ND, (t + 1) * n))
        for d in np.flatnonzero(dir_s < t):
            sc[d, dir_s[d] * n + dir_q[d]] = 1.0
        scatter.append(T(sc))

    def run(E, V):
        """One causal pass. ``E`` None: the value pass (no noise, no graph), returns the value
        buffers ``V``; else the graph pass with the noise leaves E, every field written as a
        zero-valued perturbation around ``V`` where products with histories are linearised
        (A dB + dA B at the values: no graph history is saved)."""
        grad = E is not None
        fu = [_IncChol(torch, keep_u[l], n) for l in range(L)]
        fr = [_IncChol(torch, keep_r[l], n) for l in range(L)]
        ftr = [_IncChol(torch, keep_rtr[l], n) for l in range(L - 1)]
        fg = [None] + [[_IncChol(torch, grp["cols"], n) for grp in groups[l]]
                       for l in range(1, L)]
        # graph blocks per time (graph pass) / value buffers (value pass)
        hh = [[] for _ in range(L)]
        uu = [[] for _ in range(L)]
        # graph-minus-value blocks (graph pass): zero-valued perturbations (n, S) per time of
        # phi and g, (k, S) per step of the whitened innovations (None: no new innovation)
        dph = [[] for _ in range(L)]
        dgg = [[] for _ in range(L)]
        xtr = [[] for _ in range(L - 1)]
        xg = [None] + [[[] for _ in groups[l]] for l in range(1, L)]
        PhiR = [[] for _ in range(L)]          # rows (n, (t+1) n)
        GR = [[] for _ in range(L)]
        AR = [[] for _ in range(L - 1)]
        BR = [[] for _ in range(L - 1)]
        fr_rows = []
        dcol = []
        # tangent fields along the test sources (graph pass, layers >= 1): (n, ND, ts)
        tH = [[] for _ in range(L)]
        tP = [[] for _ in range(L)]
        tG = [[] for _ in range(L)]
        if not grad:
            gaps = {}
            V = {"ph": [torch.empty(T1, n, S, dtype=dt) for _ in range(L)],
                 "g": [torch.empty(T1, n, S, dtype=dt) for _ in range(L)],
                 "z": [torch.empty(T1, n, S, dtype=dt) for _ in range(L)],
                 "h": [torch.empty(T1, n, S, dtype=dt) for _ in range(L)],
                 "u": [torch.empty(T1, n, S, dtype=dt) for _ in range(L)],
                 "r": [torch.empty(T1, n, S, dtype=dt) for _ in range(L)],
                 "xtr": [torch.empty(len(keep_rtr[l]), S, dtype=dt) for l in range(L - 1)],
                 "xg": [None] + [[torch.empty(len(grp["cols"]), S, dtype=dt)
                                  for grp in groups[l]] for l in range(1, L)],
                 "C": [torch.zeros(m, m, dtype=dt) for _ in range(L)],
                 "D": [torch.zeros(m, m, dtype=dt) for _ in range(L)]}

        def gap_of(key, diff, ref):
            """Largest |estimate - solution| of a row, relative to the solution's scale."""
            scale = float(torch.max(torch.abs(ref))) + 1e-300
            gaps[key] = max(gaps.get(key, 0.0), float(torch.max(torch.abs(diff))) / scale)

        # Products with a history perturbation are taken block by block (no (t n, S) history
        # is formed per step; the same numbers to 5e-16). The peak memory of the pass is
        # set by the freed temporaries the allocator keeps, returned after every step below
        # (solvers/_memory.py: 3.1 -> 1.4 GB for one map at depth 3, 2048 samples).
        def rows_with(Vrow, blocks):
            """Vrow @ [blocks]^T: (r, sum of the blocks' rows), Vrow (r, S) a value."""
            return torch.cat([Vrow @ d.T for d in blocks if d is not None], 1)

        def times_hist(M, blocks):
            """M @ [blocks]: the sum over blocks of M's matching columns times the block."""
            out, c0 = None, 0
            for d in blocks:
                if d is None:
                    continue
                c1 = c0 + d.shape[0]
                term = M[:, c0:c1] @ d
                out = term if out is None else out + term
                c0 = c1
            return out

        def whiten(fac, ext, src_rows, blocks, vbuf):
            """Innovations of the kept variables new at this step: L22^{-1} (x - L21 xi_old);
            in the graph pass their zero-valued perturbation (graph minus value), the block
            that later products with the innovations' history use."""
            L21, L22 = ext
            k0, k1 = fac.k - L22.shape[0], fac.k
            rhs = src_rows[fac.new_loc]
            if k0:
                xold_val = vbuf[:k0]
                rhs = rhs - L21 @ xold_val
                if grad:
                    # L21 x_old linearised at the values: + L21_val (x_old - x_old_val)
                    rhs = rhs - times_hist(L21.detach(), blocks)
            x = torch.linalg.solve_triangular(L22, rhs, upper=False)
            if not grad:
                vbuf[k0:k1] = x
                return x
            return x - vbuf[k0:k1]

        def g0_tangent(l, t):
            """Zero-order tangent g~0(t) (n, ND, ts) of layer l along u(s_d q_d): on the
            kicked point only, phi''(h) [t = s_d] z + phi'(h) gamma0 D(t q, s_d q) phi'(h(s_d))
            (at the linearisation point nothing else reads a test point's fields)."""
            out = torch.zeros(n, ND, ts, dtype=dt)
            sel = np.flatnonzero(dir_s <= t)
            if not sel.size:
                return out
            qd, sd = dir_q[sel], dir_s[sel]
            hq = V["h"][l][t][qd, :ts]                                   # (k, ts)
            zq = V["z"][l][t][qd, :ts]
            dq = V["D"][l][t * n + qd, sd * n + qd]                       # (k,)
            hs = V["h"][l][sd, qd, :ts]                                   # (k, ts)
            zt = gamma0 * dq[:, None] * act(hs, 1)
            gt = act(hq, 1) * zt + act(hq, 2) * zq * torch.as_tensor(
                (sd == t).astype(float))[:, None]
            out[qd, sel] = gt
            return out

        for t in range(T1):
            a, e = t * n, (t + 1) * n
            # ------------------------------ bottom-up: h^l(t), Phi^l(t, <=t), A^l(t, <t)
            for l in range(L):
                # sources u^l(t) of Phi^{l-1}(<= t, <= t) (layer 1: kx at every time pair)
                Krow = kx_flat_t[a:e, :e] if l == 0 else PhiR[l - 1][t]
                fu[l].extend(t, Krow)
                F = fu[l].rows(Krow)
                u = F @ xiu_T[l][:F.shape[1]]
                # memory row C^l(t, < t): lr Phi^{l-1}(t, s) Delta(s) + A^{l-1}(t, s)
                if t:
                    Kp = kx_flat_t[a:e, :a] if l == 0 else PhiR[l - 1][t][:, :a]
                    Crow = lr * Kp * torch.cat(dcol[:t])[None, :]
                    if l >= 1:
                        Crow = Crow + AR[l - 1][t][:, :a]
                if not grad:
                    V["u"][l][t] = u
                    h = u
                    if t:
                        V["C"][l][a:e, :a] = Crow
                        h = h + gamma0 * (Crow @ V["g"][l][:t].reshape(a, S))
                    V["h"][l][t] = h
                    p = act(h, 0)
                    V["ph"][l][t] = p
                else:
                    h = u
                    if t:
                        # C g(< t) at the values: C g_val + C_val dg (dg: the g history
                        # perturbation)
                        h = h + gamma0 * (Crow @ V["g"][l][:t].reshape(a, S)
                                          + times_hist(V["C"][l][a:e, :a], dgg[l][:t]))
                    if l >= 1:
                        # the equal-time memory C^l(t, t) = A^{l-1}(t, t), first order:
                        # gamma0 C(t, t) g(t). A^{l-1}(t, t) is zero at the linearisation
                        # point; its perturbation is the noise E_a(t, t) / gamma0 plus the
                        # change of the mean response carried up from the layers below
                        # (equal_time_response)
                        Ctt = AR[l - 1][t][:, a:e] - q0["A"][l - 1][a:e, a:e] * \
                            maskA_cols[a:e][None, :]
                        h = h + gamma0 * (Ctt @ V["g"][l][t])
                    p = act(h, 0)
                    dph[l].append(p - V["ph"][l][t])
                    hh[l].append(h)
                    uu[l].append(u)
                    if ts and l >= 1:
                        # h~(t) = kick + gamma0 C(t, < t) g~(< t) + E_a(t, t) g~0(t), the
                        # last with the zero-order tangent g~0(t), which lives on the
                        # kicked point alone (as the march's equal-time term, first order)
                        kick = torch.zeros(n, ND, ts, dtype=dt)
                        sel = np.flatnonzero(dir_s == t)
                        kick[dir_q[sel], sel] = 1.0
                        hT = kick
                        if t:
                            hT = hT + gamma0 * times_hist(
                                Crow, [b.reshape(n, ND * ts) for b in tG[l][:t]]
                            ).reshape(n, ND, ts)
                        hT = hT + gamma0 * torch.einsum(
                            "ij,jdk->idk", Ctt, g0_tangent(l, t))
                        tH[l].append(hT)
                        tP[l].append(act(h[:, None, :ts], 1) * hT)
                # Phi^l(t, <= t)
                row = q0["phi"][l][a:e, :e]
                if not grad:
                    gap_of("phi", p @ V["ph"][l][:t + 1].reshape(e, S).T / S - row,
                           q0["phi"][l])
                if grad:
                    pv = V["ph"][l][:t + 1].reshape(e, S)
                    est = (p @ pv.T + rows_with(V["ph"][l][t], dph[l])) / S
                    row = row + (est - est.detach()) + E[l]["pp"][t]
                PhiR[l].append(row)
                # A^l(t, < t): Stein in the whitened training sources of r^l (times < t)
                if l <= L - 2:
                    Arow = q0["A"][l][a:e, :e] * maskA_cols[:e][None, :]
                    if grad:
                        kA = ftr[l].count(t - 1) if t else 0
                        est = torch.zeros(n, e, dtype=dt)
                        if kA:
                            xv = V["xtr"][l][:kA]
                            Jst = (p @ xv.T + rows_with(V["ph"][l][t], xtr[l])) / S
                            X = ftr[l].solve_right(Jst)
                            est = est.index_copy(1, torch.as_tensor(keep_rtr[l][:kA]), X)
                        noise = E[l]["a"][t]
                        Arow = Arow + (est - est.detach()) / gamma0 + noise / gamma0
                        if l >= 1:
                            # the mean equal-time response, zero at the linearisation point,
                            # to first order in C(t, t) (equal_time_response); Stein's
                            # lemma above saw it along the training innovations of times < t
                            # that r(t) regresses on, so it is taken out of those columns
                            Aeq = equal_time_response(Ctt, act(V["h"][l][t], 1))
                            corr = torch.zeros(n, e, dtype=dt)
                            if kA:
                                keep = torch.as_tensor(keep_rtr[l][:kA])
                                beta = regression_rows(torch, q0["g"][l + 1],
                                                       torch.arange(a, e), keep)
                                corr = corr.index_copy(1, keep, -Aeq @ beta)
                            Arow = Arow + corr + torch.cat([torch.zeros(n, a, dtype=dt), Aeq], 1)
                    AR[l].append(Arow)
            # ------------------------------ top-down: z^l(t), G^l(t, <=t), B^{l-1}(t, <=t), f
            for l in range(L - 1, -1, -1):
                # sources r^l(t) of G^{l+1}(<= t, <= t) (top layer: G^{L+1} = 1, r = w(0))
                Krow = ones_t[a:e, :e] if l == L - 1 else GR[l + 1][t]
                fr[l].extend(t, Krow)
                F = fr[l].rows(Krow)
                r = F @ xir_T[l][:F.shape[1]]
                if l <= L - 2:
                    ext = ftr[l].extend(t, Krow)
                    x = None if ext is None else whiten(ftr[l], ext, r, xtr[l], V["xtr"][l])
                    if grad:
                        xtr[l].append(x)
                # memory row D^l(t, <= t): lr G^{l+1}(t, s) Delta(s) (s < t) + B^l(t, s)
                Drow = torch.zeros(n, e, dtype=dt)
                if t:
                    Gp = ones_t[a:e, :a] if l == L - 1 else GR[l + 1][t][:, :a]
                    Drow = torch.cat([lr * Gp * torch.cat(dcol[:t])[None, :],
                                      torch.zeros(n, n, dtype=dt)], 1)
                if l <= L - 2:
                    Drow = Drow + BR[l][t] * maskB_use_t[a:e, :e]
                pv = V["ph"][l][:t + 1].reshape(e, S)
                if not grad:
                    V["r"][l][t] = r
                    V["D"][l][a:e, :e] = Drow
                    z = r + gamma0 * (Drow @ pv)
                    V["z"][l][t] = z
                    g = act(V["h"][l][t], 1) * z
                    V["g"][l][t] = g
                else:
                    z = r + gamma0 * (Drow @ pv + times_hist(V["D"][l][a:e, :e], dph[l]))
                    g = act(hh[l][t], 1) * z
                    dgg[l].append(g - V["g"][l][t])
                    if ts and l >= 1:
                        zT = gamma0 * times_hist(
                            Drow, [b.reshape(n, ND * ts) for b in tP[l][:t + 1]]
                        ).reshape(n, ND, ts)
                        hs = hh[l][t][:, None, :ts]
                        tG[l].append(act(hs, 2) * tH[l][t] * z[:, None, :ts]
                                     + act(hs, 1) * zT)
                row = q0["g"][l][a:e, :e]
                if not grad:
                    gap_of("g", g @ V["g"][l][:t + 1].reshape(e, S).T / S - row, q0["g"][l])
                if grad:
                    gv = V["g"][l][:t + 1].reshape(e, S)
                    est = (g @ gv.T + rows_with(V["g"][l][t], dgg[l])) / S
                    row = row + (est - est.detach()) + E[l]["gg"][t]
                GR[l].append(row)
                # B^{l-1}(t, <= t): Stein in the row groups of u^l
                if l >= 1:
                    Krow = PhiR[l - 1][t]
                    u_t = uu[l][t] if grad else V["u"][l][t]
                    est = torch.zeros(n, e, dtype=dt)
                    for gi, grp in enumerate(groups[l]):
                        fgi = fg[l][gi]
                        ext = fgi.extend(t, Krow)
                        x = None if ext is None else whiten(fgi, ext, u_t, xg[l][gi],
                                                            V["xg"][l][gi])
                        if not grad:
                            continue
                        xg[l][gi].append(x)
                        rows = grp["rows"][grp["row_t"] == t] - a
                        if not rows.size or not fgi.k:
                            continue
                        ridx = torch.as_tensor(rows)
                        xv = V["xg"][l][gi][:fgi.k]
                        Jst = (g[ridx] @ xv.T + rows_with(V["g"][l][t][ridx], xg[l][gi])) / S
                        X = fgi.solve_right(Jst)
                        cols = torch.as_tensor(fgi.keep[:fgi.k])
                        est = est.index_put((ridx[:, None], cols[None, :]), X)
                    Brow = q0["B"][l - 1][a:e, :e] * maskB_struct_t[a:e, :e]
                    if grad:
                        strict = torch.zeros(n, e, dtype=dt)
                        strict[:, :a] = 1.0
                        if ts and t:
                            # <dg(t) / du(s q)> at the test columns, s < t
                            # scattered by a product with a fixed 0/1 matrix (the batched
                            # backward has no fast rule for index_copy)
                            est = est + (tG[l][t].mean(2) @ scatter[t]) * extra_t[a:e, :e]
                        Brow = Brow + (est - est.detach()) / gamma0 + \
                            E[l]["b"][t] * strict / gamma0
                    BR[l - 1].append(Brow)
                if l == L - 1:
                    frow = q0["f"][t]
                    if not grad:
                        gap_of("f", gamma0 * ((z * V["ph"][l][t]).mean(1) / gamma0 - frow),
                               gamma0 * q0["f"])
                    if grad:
                        est = (z * V["ph"][l][t] + V["z"][l][t] * dph[l][t]).mean(1)
                        frow = frow + (est - est.detach()) / gamma0 + E[l]["f"][t] / gamma0
                    fr_rows.append(frow)
            fc = fr_rows[t] - (fr_rows[0] if center else 0.0)
            dcol.append((yfull - fc) * trainf)
            release()           # the step's temporaries (solvers/_memory.py)
        if not grad:
            V["gaps"] = gaps
            return V
        return {"PhiR": PhiR, "GR": GR, "f": fr_rows}

    with torch.no_grad():
        V = run(None, None)
    fields = []
    for l in range(L):
        fields.append({"phi": V["ph"][l].reshape(m, S), "g": V["g"][l].reshape(m, S),
                       "z": V["z"][l].reshape(m, S), "u": V["u"][l].reshape(m, S).T.contiguous(),
                       "r": V["r"][l].reshape(m, S).T.contiguous(), "C": V["C"][l],
                       "D": V["D"][l]})
    if values_only:
        return fields, V["gaps"]

    # the noise leaves, one per row block (t, <= t): the gradient of a slice of an (m, m)
    # leaf would materialise an (m, m) array per use
    kinds = ("pp", "gg", "a", "b")
    E = [{**{k: [torch.zeros(n, (t + 1) * n, dtype=dt, requires_grad=True) for t in range(T1)]
             for k in kinds},
          "f": [torch.zeros(n, dtype=dt, requires_grad=True) for t in range(T1)]}
         for _ in range(L)]
    out = run(E, V)
    obs = []
    iu = np.triu_indices(n)
    for t in times:
        fc = out["f"][t] - (out["f"][0] if center else 0.0)
        obs.append(fc)
    if ntk:
        for t in times:
            K = kx_t * out["GR"][0][t][:, t * n:(t + 1) * n]
            for l in range(L):
                Gl1 = out["GR"][l + 1][t][:, t * n:(t + 1) * n] if l < L - 1 else 1.0
                K = K + Gl1 * out["PhiR"][l][t][:, t * n:(t + 1) * n]
            obs.append(K[iu[0], iu[1]])
    obs = torch.cat(obs)
    leaves = [x for El in E for k in AdjointRows.keys for x in El[k]]
    # the batched backward holds the adjoint of every field at every time per observable
    # (about 8 L T1 n S floats): observables per pass within ``transient_bytes``, and few
    # enough that one (batch, n, S) adjoint field stays within ``cache_bytes`` (at S = 2048:
    # 0.62-0.76 s per observable at 3-4 per pass, 1.0-1.2 s at 6-12; S = 4096: 1.3 s at 2,
    # 2.0-2.3 s at 4-8; depth 3, n = 12, T1 = 41, one thread)
    # the tangent columns of layers >= 1 count as samples of the graph
    nb = backward_batch(L, T1, n, S + ND * ts, batch, transient_bytes, cache_bytes)
    rows = AdjointRows(torch, obs, leaves, L, T1, n, nb, logger, progress)
    if lazy:
        return rows, fields, rows.K, V["gaps"]
    return rows.rows(range(rows.K)), fields, rows.K, V["gaps"]


def tangent_count(S, ND, requested=64):
    """Tangent samples for the responses outside their structure: ``requested``, at most S
    and at most S / (4 ND) (at least 2), so that the ND directions' tangent columns stay
    within a quarter of the samples' (8 + 4 points, 40 steps: ND = 164, 6 per map of 4096);
    0 without test points (ND = 0)."""
    if ND <= 0 or requested <= 0:
        return 0
    return int(min(requested, S, max(2, S // (4 * ND))))


def backward_batch(L, T1, n, S, batch=32, transient_bytes=1_500_000_000,
                   cache_bytes=800_000):
    """Observables per batched backward pass of :func:`causal_adjoint` (its ``batch``,
    ``transient_bytes`` and ``cache_bytes``; also the up-front memory estimate's)."""
    per_obs = 8 * 8 * L * T1 * n * S
    return int(max(1, min(batch, transient_bytes // per_obs, cache_bytes // (8 * n * S))))


class AdjointRows:
    """The adjoint rows of chosen observables, on demand, from one retained graph of the
    causal recursion (:func:`causal_adjoint` with ``lazy=True``): the kappa step asks for them a
    group of observables at a time, so only one group's rows (K_g, m, m) per layer is held."""

    keys = ("pp", "gg", "f", "a", "b")

    def __init__(self, torch, obs, leaves, L, T1, n, batch, logger=None, progress=None):
        self.torch, self.obs, self.leaves = torch, obs, leaves
        self.L, self.T1, self.n, self.batch = L, T1, n, batch
        self.K = obs.numel()
        self.logger, self.progress = logger, progress
        self.done = 0                       # observables differentiated so far (progress)

    def free(self):
        """Drop the retained graph (the fields of every time and layer, most of the map's
        memory: ~0.7 GB per map at depth 3, 8 + 4 points, 40 steps, 2048 samples) once no
        more rows will be asked for; :meth:`rows` refuses afterwards."""
        self.obs = self.leaves = None

    def rows(self, idx, dtype=None, batch=None):
        """J for the observables ``idx``: list over layers of dicts ``pp``, ``gg``, ``a``,
        ``b`` (len(idx), m, m) and ``f`` (len(idx), m). ``idx`` may also be a (k, K) float
        array of weights: then row i is the adjoint row of the combination sum_j idx[i, j]
        obs_j (one backward pass seeded with that row; linear in the seed). ``dtype``: the
        rows' storage (default the observables'; the passes run in theirs). ``batch``: at most
        this many observables per backward pass (default and cap ``self.batch``; the same
        rows, less transient memory)."""
        torch, L, T1, n = self.torch, self.L, self.T1, self.n
        if self.obs is None:
            raise RuntimeError("AdjointRows.rows after free(): the graph was dropped")
        W = seed_matrix(idx, self.K)
        m = T1 * n
        dt = self.obs.dtype if dtype is None else dtype
        k = W.shape[0]
        nb = self.batch if batch is None else max(1, min(int(batch), self.batch))
        J = [{key: torch.zeros((k, m) if key == "f" else (k, m, m), dtype=dt)
              for key in self.keys} for _ in range(L)]
        for lo in range(0, k, nb):
            hi = min(k, lo + nb)
            eye = torch.as_tensor(W[lo:hi], dtype=self.obs.dtype)
            gr = torch.autograd.grad(self.obs, self.leaves, grad_outputs=eye,
                                     retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
            i = 0
            for l in range(L):
                for key in self.keys:
                    for t in range(T1):
                        x = gr[i]
                        i += 1
                        if x is None:
                            continue
                        if key == "f":
                            J[l][key][lo:hi, t * n:(t + 1) * n] = x
                        else:
                            J[l][key][lo:hi, t * n:(t + 1) * n, :(t + 1) * n] = x
            del gr
            release()
            self.done += hi - lo
            if self.progress is not None:
                self.progress(min(self.done, self.K), self.K, "adjoint")
            if self.logger is not None:
                self.logger.info("deep propagator (causal adjoint): rows %d-%d of %d (of %d "
                                 "observables)", lo, hi - 1, k, self.K)
        return J


def seed_matrix(idx, K):
    """The (k, K) seed rows of ``idx``: indices of observables (one-hot rows) or a (k, K)
    array of weights (combinations of observables), checked against K."""
    a = np.asarray(idx)
    if a.ndim == 2:
        if a.shape[1] != K or not np.all(np.isfinite(a)):
            raise ValueError(f"seed rows of shape {a.shape}: need (k, {K}) finite weights")
        return np.asarray(a, dtype=np.float64)
    a = np.asarray(list(np.ravel(a)), dtype=np.int64)
    W = np.zeros((a.size, K))
    W[np.arange(a.size), a] = 1.0
    return W
