"""One layer of one population of the one-pass causal solver (:mod:`solvers.mc.causal`).

:class:`_Layer` holds a layer's fields, kernels, source factors and response tangents and does
the work that is the same for the plain problem (:mod:`solvers.mc.causal_population`) and for
any objective with C outputs (:mod:`solvers.mc.causal_objective`): drawing the causal sources
of step t, storing h(t), phi(h(t)), g(t) with their kernel rows, and the tangents of h(t)
and g(t). Row helpers: :func:`_rows`, :func:`_store_row`; B by Stein's lemma:
:func:`_stein_row`.

Layout: fields are time-major (T1, n_points, S) with the sample axis last (one time slice a
contiguous (n, S) matrix, the history up to t a contiguous ((t+1) n, S) one), train and test
points in separate arrays; backward fields have rows (mu, c), point-major, for C outputs.
Kernels are flat (T1 n, T1 n) with index t n + mu (G: (T1 n C)^2, index t n C + mu C + c).
Tangent directions are (s, a, c, k) for r (source r_ac(s) of tangent sample k) and (s, a, k)
for u.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

from ..activations import apply
from ..layout import CausalFactor
from . import responses


def _check_finite(name, a, t, layer):
    if not np.all(np.isfinite(a)):
        raise FloatingPointError(f"non-finite {name} in layer {layer} at step {t}; the fields "
                                 f"diverged (gamma0 or lr is too large)")


def _rows(cur, hist, t):
    """Kernel row block K(t, <=t) = cur hist[:t+1]^T / S as (n, (t+1) n') from a (n, S)
    current slice and a (T1, n', S) history."""
    S = cur.shape[1]
    return cur @ hist[:t + 1].reshape(-1, S).T / S


def _store_row(K, row, t, n):
    """Write row block t (n, (t+1) n) of a symmetric flat kernel and its transpose."""
    a, e = t * n, (t + 1) * n
    K[a:e, :e] = row
    K[:e, a:e] = row.T


# orthonormal innovations are generated ahead in chunks of at least this many rows (one
# Gram-Schmidt and one QR per chunk instead of per step: the same law, fewer calls)
ORTHO_CHUNK = 64


def _draw(fac, xi_store, rng, half, ortho=False):
    """Normals for the innovations a factor just gained (``fac.new``, stored at rows
    fac.k - len(new) .. fac.k of ``xi_store``); returns the number in use, fac.k.

    With ``ortho`` the rows are moment-matched (:func:`_orthonormal_rows`) while they fit in
    the centred space (row index < half - 1: centred rows of length half span half - 1
    dimensions); beyond that they are i.i.d. normals. The orthonormal rows are generated
    ahead, in chunks of ``ORTHO_CHUNK`` (their count is ``fac.gen``; rows fac.k .. fac.gen of
    the store are generated and not yet in use): row j is the normalised residual of its own
    normal draw against the ones vector and rows < j, whatever the chunking, so the rows in
    use have the law of one Gram-Schmidt per step (and no row depends on a later one)."""
    r = len(fac.new)
    if not r:
        return fac.k
    k0 = fac.k - r
    cap = half - 1 if ortho else 0           # rows that can be centred and orthonormal
    n_orth = max(0, min(fac.k, cap) - k0)     # new rows that are orthonormal
    if n_orth and fac.gen < k0 + n_orth:
        gen = fac.gen
        c = min(max(ORTHO_CHUNK, k0 + n_orth - gen), cap - gen, xi_store.shape[0] - gen)
        _orthonormal_rows(xi_store, gen, rng.standard_normal((c, half)))
        fac.gen = gen + c
    if r > n_orth:
        xi_store[k0 + n_orth:fac.k] = rng.standard_normal((r - n_orth, half))
    return fac.k


def _orthonormal_rows(xi_store, k0, x):
    """Store the rows x (b, half) at k0.. after Gram-Schmidt against the ones vector and the
    earlier rows xi_store[:k0] (themselves centred and orthogonal), each scaled to
    sum_i xi^2 = half: over the population, the innovations then have mean exactly 0 and
    second moments exactly the identity (moment matching), so the sources u = F xi have
    exactly the covariance F F^T they were drawn for.

    Given the earlier rows, each new row is uniform on the sphere of radius sqrt(half) in
    their orthogonal complement (a Gaussian direction projected and normalised), so the
    samples stay exchangeable and no row depends on later ones (causality is kept); the law
    of one sample differs from the normal one at O(k / half), like the finite population's
    own O(1 / S) effects (docs/theory.rst §2). Classical Gram-Schmidt, with a second pass
    where a row's residual is much shorter than the row (only near k = half), keeps the rows
    orthogonal to ~1e-15."""
    half = x.shape[1]
    x = x - x.mean(axis=1, keepdims=True)
    if k0:
        Q = xi_store[:k0]
        norm0 = np.einsum("ij,ij->i", x, x)
        x -= ((x @ Q.T) / half) @ Q
        x -= x.mean(axis=1, keepdims=True)
        # a second pass only where the residual lost more than 1 - 1/64 of the squared norm
        # (rounding then matters: "twice is enough"); close to k = half only
        if np.any(np.einsum("ij,ij->i", x, x) < norm0 / 64.0):
            x -= ((x @ Q.T) / half) @ Q
            x -= x.mean(axis=1, keepdims=True)
    q, r = np.linalg.qr(x.T)                         # Gram-Schmidt of the block, in order
    sgn = np.where(np.diag(r) < 0.0, -1.0, 1.0)
    xi_store[k0:k0 + x.shape[0]] = (q * (sgn * np.sqrt(half))).T


def _source_half(fac, xi_store, krow, rng, ortho=False, exact0=None):
    """One member of each antithetic pair of a causal source at step t, (rows, S / 2): the
    factor gains the row block ``krow`` = K(t, <=t) of the source's covariance, its new
    innovations get normals (:func:`_draw`; moment-matched with ``ortho``), and the source
    is F(t, <=t) xi.

    ``exact0`` (b, b): the known t = 0 block of the covariance. At the first call it fixes
    M0 = Lk^{-1} chol(exact0[piv, piv]) on the t = 0 innovations (stored on the factor), and
    every source is then F(t, <=t) diag(M0, I) xi: the sampled u(0) has exactly the
    covariance ``exact0`` on its kept variables, and the later rows the regression-consistent
    transform of the sampled kernel (a covariance of a linear map of the sources: positive
    semidefinite by construction)."""
    Frow = fac.extend(krow)
    k = _draw(fac, xi_store, rng, xi_store.shape[1], ortho)
    if exact0 is not None and fac.nvar == krow.shape[0] and k:
        piv = fac.piv[:k]
        try:
            LE = np.linalg.cholesky(np.asarray(exact0)[np.ix_(piv, piv)])
            fac.M0 = solve_triangular(fac.Lk[:k, :k], LE, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            fac.M0 = None
    M0 = getattr(fac, "M0", None)
    if M0 is not None:
        k0 = M0.shape[0]
        Frow = Frow.copy()
        Frow[:, :k0] = Frow[:, :k0] @ M0
    return Frow @ xi_store[:k]


def _antithetic(rh):
    """(rows, S / 2) -> (rows, S) with columns (rh, -rh) per antithetic pair."""
    r = np.empty((rh.shape[0], 2 * rh.shape[1]))
    r[:, 0::2] = rh
    r[:, 1::2] = -rh
    return r


def mixing_cheaper(T1: int, b: int, S: int) -> bool:
    """True when drawing a backward source of b variables per step by mixing the layer
    above's samples (:meth:`_Layer.draw_r_mix`, ~T1 b S^2 flops) costs fewer flops than its
    causal factor (:class:`CausalFactor`: extension ~b k^2 + b^2 k and application ~b k S per
    step with k = min((t+1) b, S) innovations, plus the float64 kernel rows ~2 S b (t+1) b that
    the factor reads and the mixing leaves to single precision: half of them counted)."""
    T1, b, S = int(T1), int(b), int(S)
    factor = 0.0
    for t in range(T1):
        k = min((t + 1) * b, S)
        factor += b * k * k + b * b * k + b * k * S + S * b * (t + 1) * b
    return T1 * b * float(S) * S < factor


def _causal_gemm(M, X, nt, nb, w, gamma0=1.0, chunks=8):
    """gamma0 M X(<nt) over the first ``nb`` column blocks (width ``w``) of a tangent history X
    (T1, q, cols) whose column block s (the directions of source time s) is zero at times < s
    (causality: a source perturbed at time s moves nothing before s); M is (r, nt q), time-major
    columns. Returns (r, nb w). The blocks go in ``chunks`` groups of source times, each
    multiplied from its first time on only: ~(1 + 1 / chunks) / 2 of the dense product's
    flops, the same sums (the skipped terms are exact zeros); fewer groups when there are
    fewer than 6 source times per group."""
    q = X.shape[1]
    out = np.empty((M.shape[0], nb * w), dtype=np.result_type(M, X))
    # about six source times per group at least: below that the calls cost more than they save
    k = max(1, min(nb // 6, int(chunks)))
    edges = (np.arange(k + 1) * nb) // k
    for s0, s1 in zip(edges[:-1], edges[1:]):       # k <= nb: no empty group
        t0 = min(int(s0), nt)
        if t0 == nt:
            out[:, s0 * w:s1 * w] = 0.0
            continue
        Xs = X[t0:nt].reshape((nt - t0) * q, X.shape[2])[:, s0 * w:s1 * w]
        out[:, s0 * w:s1 * w] = M[:, t0 * q:nt * q] @ Xs
    if gamma0 != 1.0:
        out *= gamma0
    return out


def _tangent_h(dg, t, c0, Ct, gamma0):
    """gamma0 C(t, <t) dg(<t) over the tangent directions < c0, zero beyond: (n, cols)."""
    cols = dg.shape[2]
    dh = np.zeros((Ct.shape[0], cols), dtype=dg.dtype)
    if t:
        dh[:, :c0] = _causal_gemm(Ct, dg, t, t, c0 // t, gamma0)
    return dh


class _Layer:
    """State of one layer of one population (see the module docstring for the layout)."""

    def __init__(self, T1, n, P, S, Sr, *, r_sys, u_sys, stein, resp, cv, tdtype, src_rtol,
                 stein_rtol, C=1, phi=None, g=None, mix=False, ortho=True, tblocks=1):
        # C outputs (docs/theory.rst §7): backward fields and G over rows (mu, c), point-major
        Q = n - P
        m = T1 * n
        self.n, self.P, self.Q, self.C, self.Sr, self.tdtype = n, P, Q, C, Sr, tdtype
        # tangent blocks (:meth:`per_dir`): the directions of source time s are carried by the
        # samples tidx[s] = block (s mod m) of Sr samples; m = 1: the first Sr carry them all
        self.m = max(1, int(tblocks))
        self.Srt = self.m * Sr                          # samples that carry tangents
        self.tidx = ((np.arange(T1) % self.m) * Sr)[:, None] + np.arange(Sr)[None, :]
        self.PH = np.zeros((T1, n, S))
        self.G = np.zeros((T1, n * C, S))
        self.Gtr = np.zeros((T1, P * C, S))           # train rows of g, for the memory GEMMs
        self.PHtr = np.zeros((T1, P, S))
        self.PHte = np.zeros((T1, Q, S)) if Q else None
        # the flat kernels may be views into the population's stacked (L, ...) results
        self.phi = np.zeros((m, m)) if phi is None else phi
        self.g = np.zeros((m * C, m * C)) if g is None else g
        # <Lam1 Lam1^T> over all samples and over the tangent samples (responses' control
        # variate and the closed-form test-test blocks of B)
        # (only its train columns and the test-test diagonal blocks are ever used)
        self.L1tr = np.zeros((T1, P, S)) if resp else None
        self.L1te = np.zeros((Q, T1, S)) if (resp and Q) else None    # point-major
        self.psi = np.zeros((T1, n, T1, P)) if resp else None       # [t, mu, s, a]
        self.psi_r = np.zeros((T1, n, T1, P)) if cv else None
        # with blocks: Lam1_train(s) on the tangent samples of source time s, (Sr, P)
        self.L1blk = np.zeros((T1, Sr, P)) if (cv and self.m > 1) else None
        self.psi_qq = np.zeros((T1, T1, Q)) if resp else None       # [t, s, q]
        self.fac_u = CausalFactor(m, src_rtol)
        self.xi_u = np.zeros((m, S // 2))
        # backward sources: causal factor of G^{l+1} (default) or, with ``mix``, a fixed
        # Gaussian mixing of the layer above's samples (:meth:`draw_r_mix`); then this layer's
        # kernel rows G(t, <t) are read by nothing but the result and are formed in single
        # precision from a float32 history, the equal-time block in double precision, and the
        # memory term of the layer below reads the Delta-contracted history GD (:meth:`mem_rows`)
        self.mix = bool(mix)
        if self.mix:
            self.Xi = None                              # (S, S / 2), drawn at the first use
            self.G32 = np.zeros((T1, n * C, S), dtype=np.float32)
            self.GD = np.zeros((T1, P, S))
        else:
            self.fac_r = CausalFactor(m * C, src_rtol)
            self.xi_r = np.zeros((m * C, S // 2))
        self.r_sys, self.u_sys, self.stein = r_sys, u_sys, stein
        self.ortho = bool(ortho)                        # moment-matched innovations
        cols = T1 * P * Sr
        if r_sys:
            # directions (s, a, c, k): r_ac(s) of tangent sample k. Train rows are all that
            # later times need: C and D have train columns only, apart from D's test-test
            # blocks, which r-tangents of test rows reach only through test rows themselves
            self.rdphi = np.zeros((T1, P, cols * C), dtype=tdtype)
            self.rdg = np.zeros((T1, P * C, cols * C), dtype=tdtype)
        if u_sys:
            self.udphi = np.zeros((T1, P, cols), dtype=tdtype)
            self.udphi_te = np.zeros((T1, Q, cols), dtype=tdtype) if Q else None
            self.udg = np.zeros((T1, P * C, cols), dtype=tdtype)
        if stein:
            self.groups = []
            for q in [None] + list(range(P, n)):
                pts = np.arange(P) if q is None else np.append(np.arange(P), q)
                rows = np.arange(P) if q is None else np.array([q])
                self.groups.append({"pts": pts, "rows": rows,
                                    "fac": CausalFactor(T1 * len(pts), stein_rtol),
                                    "xi": np.zeros((T1 * len(pts), S)),
                                    "base": np.zeros((len(rows) * C, T1 * len(pts)))})

    # ---- sources ------------------------------------------------------------------------
    def draw_u(self, phi_row, rng, exact0=None):
        """u^l(t) (n, S) from the row block Phi^{l-1}(t, <=t); both members of a pair share
        it. ``exact0``: the known (NNGP) Phi^{l-1}(0, 0), or None (:func:`_source_half`)."""
        return np.repeat(_source_half(self.fac_u, self.xi_u, phi_row, rng, self.ortho,
                                      exact0), 2, axis=1)

    def draw_r(self, g_row, rng):
        """r^l(t) (n C, S) from the row block G^{l+1}(t, <=t), antithetic: (r, -r) per pair."""
        return _antithetic(_source_half(self.fac_r, self.xi_r, g_row, rng, self.ortho))

    def draw_r_mix(self, g_up, rng):
        """r^l(t) (n C, S) from the layer above's backward fields g^{l+1}(t) (n C, S, float32)
        by a fixed Gaussian mixing of its samples, antithetic: rho(t) = g^{l+1}(t) Xi / sqrt(S)
        with Xi (S, S / 2) i.i.d. N(0, 1) (float32), drawn once, and (rho, -rho) per pair.

        Given the fields, rho(<=t) has the covariance G^{l+1}(<=t, <=t) of the population
        (g Xi Xi^T g^T / S averages to g g^T / S), and it has exactly the law of the causal
        factor's draw, feedback included: the past reveals only the projection of Xi on the
        span V of the earlier rows of g^{l+1}, on which g^{l+1}(t) depends; the component
        of Xi orthogonal to V is a fresh Gaussian, so rho(t) given the past is the regression
        on rho(<t) plus an independent normal with the Schur complement's variance
        (proof: docs/theory.rst §2). Innovations are never dropped (no ``src_rtol``)."""
        S = g_up.shape[1]
        if self.Xi is None:
            self.Xi = rng.standard_normal((S, S // 2), dtype=np.float32)
        # single precision (g_up: the upper layer's float32 copy): rounding ~sqrt(S) 6e-8
        # relative on an O(1) Gaussian source, against a sampling error ~S^-1/2
        rh = (g_up @ self.Xi).astype(np.float64)
        rh *= 1.0 / np.sqrt(S)
        return _antithetic(rh)

    def mem_rows(self, g, t):
        """sum_c' G_{x, a c'}(t, s) Delta_{a c'}(s) for s < t as (n C, t, P) from this layer's
        g(t) (n C, S) and its Delta-contracted history GD (:meth:`contract_delta`)."""
        S = g.shape[1]
        return (g @ self.GD[:t].reshape(t * self.P, S).T / S).reshape(-1, t, self.P)

    def contract_delta(self, t, delta_t):
        """GD(t) = sum_c Delta_{a c}(t) g_{a c}(t) (P, S), once Delta(t) is known."""
        P, C = self.P, self.C
        S = self.Gtr.shape[2]
        np.einsum("acs,ac->as", self.Gtr[t].reshape(P, C, S), delta_t, out=self.GD[t])

    # ---- fields -------------------------------------------------------------------------
    def forward(self, h, t, act, layer):
        """Store h(t) and what later steps read from it: phi(h(t)) (all, train and test rows),
        Lam1 = phi'(h(t)), the kernel row Phi(t, <=t) and, with responses, the rows t of
        <Lam1 Lam1^T> (train columns over all samples and, with the control variate, over the
        tangent samples; the test-test diagonal)."""
        n, P, Q = self.n, self.P, self.Q
        S = h.shape[1]
        _check_finite("pre-activations", h, t, layer)
        self.H = h
        ph = np.tanh(h) if act == "tanh" else apply(act, h, 0)
        self.PH[t] = ph
        self.PHtr[t] = ph[:P]
        if Q:
            self.PHte[t] = ph[P:]
        self.lam1 = (1.0 - ph * ph) if act == "tanh" else apply(act, h, 1)
        _store_row(self.phi, _rows(ph, self.PH, t), t, n)
        if self.psi is not None:
            Sr = self.Sr
            self.L1tr[t] = self.lam1[:P]
            self.psi[t, :, :t + 1] = _rows(self.lam1, self.L1tr, t).reshape(n, t + 1, P)
            if self.psi_r is not None and self.m == 1:
                self.psi_r[t, :, :t + 1] = _rows(self.lam1[:, :Sr], self.L1tr[:, :, :Sr],
                                                 t).reshape(n, t + 1, P)
            elif self.psi_r is not None:
                # over the samples that carry the directions of each source time s: block
                # s mod m, samples (s mod m) Sr .. + Sr; L1blk[s] = Lam1_train(s) there
                m = self.m
                self.L1blk[t] = self.lam1[:P, self.tidx[t]].T                # (Sr, P)
                lb = self.lam1[:, :m * Sr].reshape(n, m, Sr)
                lb = lb[:, :t + 1] if t < m else lb[:, np.arange(t + 1) % m]   # (n, t+1, Sr)
                self.psi_r[t, :, :t + 1] = np.matmul(
                    lb.transpose(1, 0, 2), self.L1blk[:t + 1]).transpose(1, 0, 2) / Sr
            if Q:
                self.L1te[:, t] = self.lam1[P:]
                self.psi_qq[t, :t + 1] = np.matmul(
                    self.L1te[:, :t + 1], self.lam1[P:, :, None])[:, :, 0].T / S

    def backward(self, g, t, layer):
        """Store g(t) (n C, S) (all and train rows) and the kernel row G(t, <=t)."""
        _check_finite("backward fields", g, t, layer)
        self.G[t] = g
        self.Gtr[t] = g[:self.P * self.C]
        nC = self.n * self.C
        if not self.mix:
            _store_row(self.g, _rows(g, self.G, t), t, nC)
            return
        # result-only rows: single precision (rounding ~1e-6 relative, far below the sampling
        # error), the equal-time block (the NTK) in double precision
        S = g.shape[1]
        self.G32[t] = g
        row = np.empty((nC, (t + 1) * nC))
        if t:
            row[:, :t * nC] = self.G32[t] @ self.G32[:t].reshape(t * nC, S).T
            row[:, :t * nC] /= S
        row[:, t * nC:] = g @ g.T / S
        _store_row(self.g, row, t, nC)

    # ---- tangents -----------------------------------------------------------------------
    def tangents_h(self, t, Crow, gamma0, direct):
        """The bottom-up tangents of step t, in ``tdtype``: :meth:`u_tangent_h` (direct term
        ``direct``) and :meth:`r_tangent_h` from the operator row ``Crow`` = C(t, <t)
        (n, t P C). Returns the r-system's dphi (None without it)."""
        if not (self.r_sys or self.u_sys):
            return None
        Ct = Crow.astype(self.tdtype, copy=False)
        l1t = self.lam1[:, :self.Srt].astype(self.tdtype, copy=False)
        if self.u_sys:
            self.u_tangent_h(t, Ct, l1t, gamma0, direct)
        if self.r_sys:
            return self.r_tangent_h(t, Ct, l1t, gamma0)
        return None

    def per_dir(self, x, nt):
        """A per-sample factor x (rows, >= Srt) of the tangent samples, arranged against
        tangent columns (s, ..., k) of the source times s < nt: (rows, nt, 1, Sr) (each s
        its own block of samples), or (rows, 1, 1, Sr) with one block."""
        if self.m == 1:
            return x[:, None, None, :self.Sr]
        return x[:, self.tidx[:nt]][:, :, None, :]

    def r_tangent_h(self, t, Ct, l1t, gamma0):
        """dh(t)/dr(s), s < t: gamma0 C(t, <t) dg(<t). Keeps the train rows of dh and of
        dphi = Lam1 dh; returns dphi (n, t P C Sr)."""
        n, P, Sr = self.n, self.P, self.Sr
        c0 = t * P * self.C * Sr
        dh = _tangent_h(self.rdg, t, c0, Ct, gamma0)
        self.rdh = dh[:P]
        dphi = (dh[:, :c0].reshape(n, t, P * self.C, Sr)
                * self.per_dir(l1t, t)).reshape(n, c0)
        self.rdphi[t, :, :c0] = dphi[:P]
        return dphi

    def u_tangent_h(self, t, Ct, l1t, gamma0, direct):
        """dh(t)/du(s), s <= t: the direct term ``direct`` at s = t plus gamma0 C(t, <t)
        dg(<t). Keeps dh and dphi = Lam1 dh (train and test rows)."""
        n, P, Q, Sr = self.n, self.P, self.Q, self.Sr
        c0, c1 = t * P * Sr, (t + 1) * P * Sr
        dh = _tangent_h(self.udg, t, c0, Ct, gamma0)
        tr = np.arange(P)
        dh[:P, c0:c1].reshape(P, P, Sr)[tr, tr, :] += direct
        self.udh = dh
        dphi = (dh[:, :c1].reshape(n, t + 1, P, Sr)
                * self.per_dir(l1t, t + 1)).reshape(n, c1)
        self.udphi[t, :, :c1] = dphi[:P]
        if Q:
            self.udphi_te[t, :, :c1] = dphi[P:]

    def r_tangent_g(self, t, Dtr, l1t, l2t, gamma0, direct, last):
        """dz(t)/dr(s), s <= t, on the train rows: gamma0 D(t, <=t) dphi(<=t) plus the direct
        term ``direct`` at s = t (none at the ``last`` step, whose r is never used); stores
        dg = Lam2 dh + Lam1 dz. ``Dtr`` (n C, (t+1) P) holds D's train columns, ``l2t`` Lam2
        over rows (mu, c)."""
        P, C, Sr = self.P, self.C, self.Sr
        PC = P * C
        c0, c1 = t * PC * Sr, (t + 1) * PC * Sr
        Dt = Dtr[:PC].astype(self.rdphi.dtype)
        dz = _causal_gemm(Dt, self.rdphi, t + 1, t + 1, PC * Sr, gamma0)
        if not last:
            trc = np.arange(PC)
            dz[:, c0:c1].reshape(PC, PC, Sr)[trc, trc, :] += direct
        nt = t + 1
        dg = (self.rdh[:, :c1].reshape(P, 1, nt, PC, Sr)
              * self.per_dir(l2t[:PC], nt).reshape(P, C, -1, 1, Sr)
              + dz.reshape(P, C, nt, PC, Sr) * self.per_dir(l1t[:P], nt)[:, None])
        self.rdg[t, :, :c1] = dg.reshape(PC, c1)

    def u_tangent_g(self, t, dz, l1t, l2t):
        """dg(t)/du(s) = Lam2 dh + Lam1 dz over rows (mu, c) from dz (n C, (t+1) P Sr);
        stores the train rows and returns dg (n C, (t+1) P Sr)."""
        n, C, Sr = self.n, self.C, self.Sr
        c1 = (t + 1) * self.P * Sr
        nt = t + 1
        dg = (self.udh[:, :c1].reshape(n, 1, nt, -1, Sr)
              * self.per_dir(l2t, nt).reshape(n, C, -1, 1, Sr)
              + dz.reshape(n, C, nt, -1, Sr) * self.per_dir(l1t, nt)[:, None]
              ).reshape(n * C, c1)
        self.udg[t, :, :c1] = dg[:self.P * C]
        return dg


def _top_D(delta, t, n, P, lr):
    """D^L(t, s) = lr Delta(s) 1[s < t] (G^{L+1} = 1, B^L = 0) as (n, t+1, n)."""
    D = np.zeros((n, t + 1, n))
    D[:, :t, :P] = lr * delta[None, :t, :]
    return D


def _stein_row(ly, Bl, phi_src, u, g, t, n, gamma0, C=1):
    """Row block t of B^{l-1} = gamma0^{-1} <dg^l / du^l> by Stein's lemma, per row group.

    In each group (the train rows with the train sources; each test point with the train
    sources and itself: test points are passive) the sources are whitened causally,
    u_g = F xi_g with F the causal factor of Phi^{l-1} on the group (:class:`CausalFactor`,
    innovations below ``stein_rtol`` of a variable's variance dropped). Stein's lemma in
    whitened coordinates, <g(t) xi^T> = <dg(t)/du_g> F, is exact for Gaussian u; g(t) does not
    depend on innovations of later times, so the row block is J(t) Lk^{-1} with J over the
    innovations up to t: causal, no pseudo-inverse, no regularisation.

    Baseline (:data:`solvers.mc.responses.STEIN_BASELINE`): the column of an innovation of time
    s >= 1 is <(g(t) - g(s - 1)) xi>, the product g(s - 1) xi / S stored in ``grp["base"]``
    when the innovation appears. g(s - 1) depends on earlier sources and the independent
    backward sources only, so the term has mean zero and the estimate stays unbiased (as
    :func:`solvers.mc.responses.stein_accumulate`).

    With C outputs (docs/theory.rst §7) g is (n C, S) with rows (mu, c) point-major and B^{l-1}
    flat (T1 n C, T1 n) with row t n C + mu C + c.
    """
    S = u.shape[1]
    g3 = g.reshape(n, C, S)
    for grp in ly.groups:
        pts, rows, fac, xi = grp["pts"], grp["rows"], grp["fac"], grp["xi"]
        b = len(pts)
        cols = (np.arange(t + 1)[:, None] * n + pts[None, :]).reshape(-1)
        Frow = fac.extend(phi_src[np.ix_(t * n + pts, cols)])
        new, k = fac.new, fac.k
        k0 = k - len(new)
        if len(new):
            Fn = Frow[new]
            rhs = u[pts[new]] - Fn[:, :k0] @ xi[:k0]
            xi[k0:k] = solve_triangular(Fn[:, k0:k], rhs, lower=True, check_finite=False)
            if t and responses.STEIN_BASELINE:
                grp["base"][:, k0:k] = (ly.G[t - 1].reshape(n, C, S)[rows].reshape(-1, S)
                                        @ xi[k0:k].T / S)
        J = g3[rows].reshape(-1, S) @ xi[:k].T / S - grp["base"][:, :k]
        X = solve_triangular(fac.Lk[:k, :k], J.T, lower=True, trans="T", check_finite=False).T
        piv = fac.piv[:k]
        flat = (piv // b) * n + pts[piv % b]
        out_rows = (t * n * C + rows[:, None] * C + np.arange(C)[None, :]).reshape(-1)
        Bl[np.ix_(out_rows, flat)] = X / gamma0
