"""Finite-width fluctuations of two-layer networks: sampling and the single-site march.

Notation as in docs/theory.rst: n = P + Q points (P training points first), T steps, c = lr * gamma0,
kx = Phi^0 (n, n), Delta (T, P) the infinite-width error signal on the training points at the
times t = 0 .. T-1 that drive the updates.

The single-site process of a two-layer network (L = 1)
------------------------------------------------------
A hidden unit is one sample (u, w0), u ~ N(0, kx) in R^n, w0 ~ N(0, 1). Given Delta it moves
deterministically (docs/theory.rst §2 with L = 1, which is the finite network's per-unit update):

    h_mu(t+1) = h_mu(t) + c sum_a Delta_a(t) kx_{mu a} w(t) phi'(h_a(t))
    w(t+1)    = w(t)    + c sum_a Delta_a(t) phi(h_a(t))                       (a over train)

with per-unit prediction O_mu(t) = w(t) phi(h_mu(t)) / gamma0 (f = mean of O over units) and
per-unit NTK k_{mu nu}(t) = kx_{mu nu} g_mu g_nu + phi_mu phi_nu, g = phi'(h) w. The march is
the engines' one two-layer march (:func:`solvers.mc.two_layer.march_fixed_delta`, one step
:func:`solvers.mc.two_layer.two_layer_step_fast`).
"""
from __future__ import annotations

import numpy as np

from ..activations import apply
from ..layout import eig_factor
from ..mc.two_layer import march_fixed_delta, two_layer_step_fast

__all__ = ["draw_units", "march", "triu_index", "unit_observables", "population_march"]


def draw_units(kx: np.ndarray, samples: int, rng: np.random.Generator):
    """Draw ``samples`` single-site initial conditions: u ~ N(0, kx) (S, n), w0 ~ N(0, 1) (S,).

    The standard normals are drawn in a fixed order (first the (S, n) block for u, then w0)
    so that a seed fixes every sample whatever the chunking downstream.
    """
    xi = rng.standard_normal((samples, kx.shape[0]))
    w0 = rng.standard_normal(samples)
    return xi @ eig_factor(kx).T, w0


def march(activation: str, u, w0, kx, delta, c, h_out=None, w_out=None):
    """March S single-site samples of a two-layer network under a given error signal.

    Parameters
    ----------
    activation : str
    u : array (S, n)
        Initial pre-activations h(0) (u ~ N(0, kx)).
    w0 : array (S,)
        Initial readout weights.
    kx : array (n, n)
        Input kernel Phi^0.
    delta : array (T, P)
        Error signal Delta(t), t = 0 .. T-1, on the P training points (the first P of n).
    c : float
        lr * gamma0.
    h_out : array (S, T+1, n), optional; w_out : array (S, T+1), optional
        Preallocated outputs (written in place).

    Returns
    -------
    h : (S, T+1, n), w : (S, T+1)
        The fields of every sample at every time (update rule in the module docstring).
    """
    out = {}
    if h_out is not None:
        out["h"] = h_out
    if w_out is not None:
        out["w"] = w_out
    out = march_fixed_delta(activation, u, w0, kx, np.asarray(delta, dtype=np.float64),
                            float(c), record=("h", "w"), out=out)
    return out["h"], out["w"]


def triu_index(n: int):
    """Row and column indices of the upper triangle (mu <= nu) of an (n, n) matrix."""
    return np.triu_indices(n)


def unit_observables(activation, h, w, kx, gamma0, center=False, iu=None):
    """Per-unit prediction and NTK of marched samples.

    Parameters
    ----------
    h : array (S, T+1, n); w : array (S, T+1)
    iu : tuple of index arrays, optional
        Entries of the NTK to return (default: upper triangle, m = n (n + 1) / 2 entries).

    Returns
    -------
    O : (S, T+1, n)
        w phi(h) / gamma0, minus its t = 0 value when ``center``.
    k : (S, T+1, m)
        kx_{mu nu} g_mu g_nu + phi_mu phi_nu at the entries ``iu``, g = phi'(h) w.
    """
    if iu is None:
        iu = triu_index(h.shape[2])
    ph = apply(activation, h, 0)
    g = apply(activation, h, 1) * w[:, :, None]
    O = w[:, :, None] * ph / gamma0
    if center:
        O = O - O[:, :1]
    i, j = iu
    k = kx[i, j] * g[:, :, i] * g[:, :, j] + ph[:, :, i] * ph[:, :, j]
    return O, k


def population_march(activation, u, w0, kx, y, gamma0, lr, steps, center=False,
                     antithetic=False):
    """Infinite-width two-layer dynamics by a self-consistent forward march of a population.

    At each step f(t) = <O(t)> over the S samples, Delta(t) = y - f_train(t) (centred:
    f - f(0)), then every sample moves one step (docs/theory.rst §2, "Two-layer networks": no outer
    iteration is needed). With ``antithetic`` samples i and i + S/2 must share u and have
    opposite w0, so that the t = 0 term of f cancels exactly and the standard error is taken
    over pair means.

    Returns
    -------
    dict with ``f`` (T+1, n), ``f_stderr`` (T+1, n), ``delta`` (T, P), ``ntk`` (T+1, n, n)
    (population mean of the per-unit NTK).

    Raises
    ------
    FloatingPointError
        When the fields become non-finite (divergence); names the step.
    """
    S, n = u.shape
    P = y.shape[0]
    T = int(steps)
    c = lr * gamma0
    h = np.array(u, dtype=np.float64)
    w = np.array(w0, dtype=np.float64)
    f = np.empty((T + 1, n))
    f_se = np.empty((T + 1, n))
    ntk = np.empty((T + 1, n, n))
    delta = np.empty((T, P))
    half = S // 2

    def reduce(x):
        # x: (S, ...) per-unit values -> mean and standard error (over pair means if paired)
        if antithetic:
            x = 0.5 * (x[:half] + x[half:])
        return x.mean(axis=0), x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])

    f00 = None
    kdrive = c * np.asarray(kx)[:, :P]
    fs = np.zeros((1, n))
    with np.errstate(over="ignore", invalid="ignore"):
        ph = apply(activation, h, 0)
        g = apply(activation, h, 1) * w[:, None]
        for t in range(T + 1):
            O = w[:, None] * ph / gamma0
            f[t], f_se[t] = reduce(O)
            if f00 is None:
                f00 = f[0].copy()
            # population NTK by two GEMMs; no per-sample (S, n, n) array
            ntk[t] = (kx * (g.T @ g) + ph.T @ ph) / S
            if not (np.all(np.isfinite(f[t])) and np.all(np.isfinite(ntk[t]))):
                raise FloatingPointError(f"the single-site fields diverged at step {t}")
            if t == T:
                break
            ft = f[t, :P] - (f00[:P] if center else 0.0)
            delta[t] = y - ft
            two_layer_step_fast(h, w, ph, g, (kdrive * delta[t][None, :])[None],
                                (c * delta[t])[None], S, activation, fs)
    if center:
        f = f - f00
    return {"f": f, "f_stderr": f_se, "delta": delta, "ntk": ntk}


# --------------------------------------------------------------------------------------------
# beyond one squared-error output (docs/theory.rst §7): C outputs, weight decay, any Delta
# --------------------------------------------------------------------------------------------
def draw_units_multi(kx: np.ndarray, samples: int, outputs: int, rng: np.random.Generator):
    """Like :func:`draw_units` with C = ``outputs`` readout weights per unit: u (S, n),
    w0 (S, C) i.i.d. N(0, 1) (the same draw order: first u's normals, then w0's)."""
    xi = rng.standard_normal((samples, kx.shape[0]))
    w0 = rng.standard_normal((samples, int(outputs)))
    return xi @ eig_factor(kx).T, w0


def decay_step(x, x0, a: float, decay_to: str):
    """The weight-decay part of one step of a field linear in the weights (in place):
    x <- a x + (1 - a) x0 toward the initialisation, x <- a x toward zero
    (docs/theory.rst §7; a = 1 - lr lambda)."""
    if a == 1.0:
        return x
    x *= a
    if decay_to == "init":
        x += (1.0 - a) * x0
    return x


def march_multi(activation: str, u, w0, kx, delta, c, a: float = 1.0, decay_to: str = "init"):
    """March S single-site samples of a two-layer network with C outputs under a given Delta.

    docs/theory.rst §7 with L = 1 (the finite network's per-unit update): with
    q_al = sum_c Delta_{al c}(t) w_c(t),

        h_mu(t+1) = D[h_mu](t) + c sum_al kx_{mu al} phi'(h_al(t)) q_al
        w_c(t+1)  = D[w_c](t)  + c sum_al Delta_{al c}(t) phi(h_al(t))

    where D is the weight decay (:func:`decay_step`; the identity without it).

    Parameters
    ----------
    u : (S, n); w0 : (S, C); kx : (n, n); delta : (T, P, C); c : lr * gamma0;
    a : float
        1 - lr lambda.
    decay_to : {"init", "zero"}

    Returns
    -------
    h : (S, T+1, n), w : (S, T+1, C)
    """
    u = np.asarray(u, dtype=np.float64)
    w0 = np.asarray(w0, dtype=np.float64)
    S, n = u.shape
    T, P, C = delta.shape
    kxP = np.asarray(kx)[:, :P]
    H = np.empty((S, T + 1, n))
    W = np.empty((S, T + 1, C))
    H[:, 0] = u
    W[:, 0] = w0
    for t in range(T):
        h, w = H[:, t], W[:, t]
        hP = h[:, :P]
        q = w @ delta[t].T                                    # (S, P)
        hn = h.copy()
        wn = w.copy()
        decay_step(hn, u, a, decay_to)
        decay_step(wn, w0, a, decay_to)
        hn += c * (apply(activation, hP, 1) * q) @ kxP.T
        wn += c * apply(activation, hP, 0) @ delta[t]
        H[:, t + 1] = hn
        W[:, t + 1] = wn
    return H, W


def ntk_multi_index(n: int, C: int):
    """Upper-triangle indices (I <= J) of the (n C, n C) NTK over (point, output) pairs,
    I = mu C + c."""
    return np.triu_indices(n * C)


def unit_observables_multi(activation, h, w, kx, gamma0, center=False, iu=None):
    """Per-unit prediction and NTK with C outputs (docs/theory.rst §7).

    Parameters
    ----------
    h : (S, T+1, n); w : (S, T+1, C)
    iu : index arrays into the (n C, n C) NTK, default :func:`ntk_multi_index`.

    Returns
    -------
    O : (S, T+1, n C)
        w_c phi(h_mu) / gamma0 at I = mu C + c (minus its t = 0 value when ``center``).
    k : (S, T+1, m)
        kx_{mu nu} g_{mu c} g_{nu c'} + delta_{c c'} phi_mu phi_nu, g_{mu c} = phi'(h_mu) w_c.
    """
    S, T1, n = h.shape
    C = w.shape[2]
    if iu is None:
        iu = ntk_multi_index(n, C)
    ph = apply(activation, h, 0)
    g = (apply(activation, h, 1)[:, :, :, None] * w[:, :, None, :]).reshape(S, T1, n * C)
    O = (ph[:, :, :, None] * w[:, :, None, :]).reshape(S, T1, n * C) / gamma0
    if center:
        O = O - O[:, :1]
    i, j = iu
    mi, ci = np.divmod(i, C)
    mj, cj = np.divmod(j, C)
    same = (ci == cj).astype(np.float64)
    k = kx[mi, mj] * g[:, :, i] * g[:, :, j] + same * ph[:, :, mi] * ph[:, :, mj]
    return O, k


def population_march_objective(activation, u, w0, kx, objective, gamma0, center=False,
                               antithetic=False):
    """:func:`population_march` for any objective (docs/theory.rst §7): C outputs, any loss,
    weight decay, batches. ``objective`` is a :class:`solvers.objective.Objective`; Delta(t)
    = objective.delta(t, f_train(t)) (centred: f - f(0)).

    Returns
    -------
    dict with ``f`` (T+1, n, C), ``f_stderr`` (T+1, n, C), ``delta`` (T, P, C), ``ntk``
    (T+1, n, C, n, C) (population mean of the per-unit NTK).
    """
    u = np.asarray(u, dtype=np.float64)
    w0 = np.asarray(w0, dtype=np.float64)
    S, n = u.shape
    obj = objective
    T, P, C = obj.steps, obj.P, obj.C
    c = obj.lr * gamma0
    a = obj.a
    kx = np.asarray(kx, dtype=np.float64)
    kxP = kx[:, :P]
    h, w = u.copy(), w0.copy()
    f = np.empty((T + 1, n, C))
    f_se = np.empty((T + 1, n, C))
    ntk = np.empty((T + 1, n, C, n, C))
    delta = np.empty((T, P, C))
    half = S // 2
    eyeC = np.eye(C)

    def reduce(x):
        if antithetic:
            x = 0.5 * (x[:half] + x[half:])
        return x.mean(axis=0), x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])

    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T + 1):
            ph = apply(activation, h, 0)
            dph = apply(activation, h, 1)
            O = ph[:, :, None] * w[:, None, :] / gamma0
            f[t], f_se[t] = reduce(O)
            g = (dph[:, :, None] * w[:, None, :]).reshape(S, n * C)
            ntk[t] = (np.repeat(np.repeat(kx, C, 0), C, 1) * (g.T @ g) / S).reshape(
                n, C, n, C) + (ph.T @ ph / S)[:, None, :, None] * eyeC[None, :, None, :]
            if not (np.all(np.isfinite(f[t])) and np.all(np.isfinite(ntk[t]))):
                raise FloatingPointError(f"the single-site fields diverged at step {t}")
            if t == T:
                break
            ft = f[t] - (f[0] if center else 0.0)
            delta[t] = obj.delta(t, ft)[:P]
            q = w @ delta[t].T
            hn = decay_step(h.copy(), u, a, obj.decay_to)
            wn = decay_step(w.copy(), w0, a, obj.decay_to)
            hn += c * (dph[:, :P] * q) @ kxP.T
            wn += c * ph[:, :P] @ delta[t]
            h, w = hn, wn
    if center:
        f = f - f[:1]
    return {"f": f, "f_stderr": f_se, "delta": delta, "ntk": ntk}
