"""Two-point Gaussian expectations of activations and their derivatives.

For a covariance matrix ``Sigma`` (n, n) and u ~ N(0, Sigma) this module computes

    M[mu, nu] = E[ phi^(a)(u_mu) phi^(b)(u_nu) ]          a, b in {0, 1, 2}

where phi^(0) = phi, phi^(1) = phi', phi^(2) = phi''. These are the building blocks of the
NNGP / NTK recursions at t = 0 (docs/theory.rst §4: Phi^l = E[phi phi^T], the derivative kernel
E[phi' phi'^T]) and of perturbation theory around them.

Every entry depends only on the 2 x 2 covariance of (u_mu, u_nu): the variances s11, s22 and
the covariance s12. The pair functions (:func:`expect_pairs`) take those three numbers
elementwise; :func:`expect` builds them from a matrix.

Routes
------
closed forms (``method="closed"``), all derivative orders:

* linear: E[u1 u2] = s12, E[1] = 1, anything with phi'' = 0 vanishes.
* relu (arc-cosine kernels, Cho & Saul 2009), with cos(theta) = s12 / sqrt(s11 s22):
  E[phi phi]   = sqrt(s11 s22) / (2 pi) (sin theta + (pi - theta) cos theta)
  E[phi' phi'] = (pi - theta) / (2 pi)
  E[phi phi']  = sqrt(s11) (1 + cos theta) / (2 sqrt(2 pi))            (phi in slot 1)
  phi'' is a Dirac delta; with det = s11 s22 - s12^2:
  E[phi'' phi]  = sqrt(det) / (2 pi s11),   E[phi'' phi'] = 1 / (2 sqrt(2 pi s11)),
  E[phi'' phi''] = 1 / (2 pi sqrt(det))                               (phi'' in slot 1)
* erf (Williams 1997), with A = 1 + 2 s11, B = 1 + 2 s22, Delta = A B - 4 s12^2:
  E[phi phi]    = (2/pi) arcsin(2 s12 / sqrt(A B))
  E[phi' phi']  = 4 / (pi sqrt(Delta))
  E[phi'' phi]  = -8 s12 / (pi A sqrt(Delta)),  E[phi'' phi''] = 16 s12 / (pi Delta^(3/2))
  E[phi phi'] = E[phi' phi''] = 0 (odd times even function).
  The phi'' entries follow from the first two by Price's theorem
  (d E[F] / d s11 = E[d^2 F / du1^2] / 2,  d E[F] / d s12 = E[d^2 F / du1 du2]).

quadrature (``method="quadrature"``), any smooth activation (tanh has no closed form):
  u1 = sqrt(s11) z1,  u2 = sqrt(s22) (rho z1 + sqrt(1 - rho^2) z2),  z1, z2 ~ N(0, 1) i.i.d.,
  and a tensor-product rule in (z1, z2). The default rule is the trapezoidal (sinc) rule on
  [-8.5, 8.5], not Gauss-Hermite: tanh(s z) has poles at z = i pi / (2 s), and for s^2 ~ 10
  Gauss-Hermite needs ~700 nodes per axis for 1e-10 (measured: error 6e-7 at 300 nodes) while
  the trapezoidal rule converges like exp(-pi^2 / (s h)) in the step h (error < 1e-11 at
  ~190 nodes). :func:`auto_order` picks the node count from the largest variance and the
  derivative orders; ``rule="hermite"`` gives Gauss-Hermite for comparison.

Degenerate covariances: ``|rho| = 1`` (e.g. the diagonal mu = nu) and zero variances are handled
without NaN. Conventions at the kink: relu'(0) = 0 (as :mod:`solvers.activations`); a delta
at a point of zero variance, or E[delta(u1) delta(u2)] with ``|rho| = 1``, is +inf; E[delta(u1)
relu'(u2)] at ``|rho| = 1`` takes its limit 1 / (2 sqrt(2 pi s11)).
"""
from __future__ import annotations

import math

import numpy as np

from . import activations as _act
from ._jit import njit

__all__ = ["expect", "expect_pairs", "expect1", "nngp", "derivative_kernel", "quad_rule",
           "auto_order", "CLOSED_FORMS", "QUAD_HALF_WIDTH",
           "MAX_AUTO_ORDER"]

#: half-width of the trapezoidal grid in standard-normal units: the Gaussian tail beyond it
#: (times |z|, for the linearly growing activations) is below 1e-15
QUAD_HALF_WIDTH = 8.5
#: activations with closed forms for every pair of derivative orders (0, 1, 2)
CLOSED_FORMS = ("linear", "relu", "erf")
_ORDERS = (0, 1, 2)
#: largest automatic node count per axis (4e6 integrand evaluations per pair): reached at
#: variances ~1e3, far beyond the O(1) kernels of normalised inputs
MAX_AUTO_ORDER = 2001
_TWO_PI = 2.0 * math.pi
_SQRT_TWO_PI = math.sqrt(_TWO_PI)


# ----------------------------------------------------------------------------- validation
def _check_activation(activation):
    if not isinstance(activation, str) or activation not in _act.ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is unknown; use one of "
                         f"{sorted(_act.ACTIVATIONS)}")


def _check_orders(orders):
    try:
        a, b = orders
    except (TypeError, ValueError):
        raise ValueError(f"orders must be a pair of derivative orders (a, b) with a, b in "
                         f"{_ORDERS}, got {orders!r}") from None
    if a not in _ORDERS or b not in _ORDERS:
        raise ValueError(f"orders must be a pair of derivative orders (a, b) with a, b in "
                         f"{_ORDERS}, got {orders!r}")
    return int(a), int(b)


def _pair_geometry(s11, s22, s12):
    """Validated (s11, s22, s12) and the correlation rho (0 where a variance is zero).

    Covariances that exceed sqrt(s11 s22) by rounding (relative 1e-8) are clipped; larger
    violations mean ``Sigma`` is not positive semidefinite and raise ValueError.
    """
    s11, s22, s12 = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                          for v in (s11, s22, s12)))
    if not (np.all(np.isfinite(s11)) and np.all(np.isfinite(s22)) and np.all(np.isfinite(s12))):
        raise ValueError("Sigma contains NaN or inf; the covariance must be finite")
    if np.any(s11 < 0) or np.any(s22 < 0):
        raise ValueError("Sigma has a negative variance on its diagonal; the covariance must "
                         "be positive semidefinite")
    root = np.sqrt(s11 * s22)
    scale = max(float(np.max(s11, initial=0.0)), float(np.max(s22, initial=0.0)), 1e-300)
    if np.any(np.abs(s12) > root + 1e-8 * np.maximum(root, 1e-6 * scale)):
        raise ValueError("Sigma is not positive semidefinite: some |Sigma_ij| exceeds "
                         "sqrt(Sigma_ii Sigma_jj); symmetrise / project the covariance first")
    rho = np.divide(s12, root, out=np.zeros_like(s12), where=root > 0)
    rho = np.clip(rho, -1.0, 1.0)
    return s11, s22, s12, rho


# ----------------------------------------------------------------------------- closed forms
def _closed_linear(a, b, s11, s22, s12, rho):
    if (a, b) == (0, 0):
        return s12.copy()
    if (a, b) == (1, 1):
        return np.ones_like(s12)
    return np.zeros_like(s12)  # E[u] = 0 against a constant, and phi'' = 0


def _closed_relu(a, b, s11, s22, s12, rho):
    if a > b:  # the formulas below put the lower order in slot 1
        return _closed_relu(b, a, s22, s11, s12, rho)
    theta = np.arccos(rho)
    sin_t = np.sqrt(np.maximum(1.0 - rho * rho, 0.0))
    det = np.maximum(s11 * s22 - s12 * s12, 0.0)
    if (a, b) == (0, 0):
        return np.sqrt(s11 * s22) / _TWO_PI * (sin_t + (math.pi - theta) * rho)
    if (a, b) == (1, 1):
        return np.where(s11 * s22 > 0, (math.pi - theta) / _TWO_PI, 0.0)
    if (a, b) == (0, 1):
        # E[relu(u1) step(u2)]; step(0) = 0 where u2 has zero variance
        return np.where(s22 > 0, np.sqrt(s11) * (1.0 + rho) / (2.0 * _SQRT_TWO_PI), 0.0)
    # b == 2: slot 2 is delta(u2), density of u2 at 0 is 1 / sqrt(2 pi s22)
    pos = s22 > 0
    if (a, b) == (0, 2):
        # p2(0) E[relu(v)], v = u1 | u2 = 0 ~ N(0, det / s22)
        return np.divide(np.sqrt(det), _TWO_PI * s22, out=np.full_like(s22, np.inf), where=pos)
    if (a, b) == (1, 2):
        # p2(0) P(u1 > 0 | u2 = 0) = p2(0) / 2 (its |rho| -> 1 limit at |rho| = 1)
        out = np.divide(1.0, 2.0 * np.sqrt(_TWO_PI * s22), out=np.full_like(s22, np.inf),
                        where=pos)
        return np.where(s11 > 0, out, np.where(pos, 0.0, np.inf))
    # (2, 2): the joint density at the origin
    return np.divide(1.0, _TWO_PI * np.sqrt(det), out=np.full_like(det, np.inf), where=det > 0)


def _closed_erf(a, b, s11, s22, s12, rho):
    if a > b:
        return _closed_erf(b, a, s22, s11, s12, rho)
    A = 1.0 + 2.0 * s11
    B = 1.0 + 2.0 * s22
    # Delta >= 1 + 2 s11 + 2 s22 for any PSD pair, so no division by zero below
    delta = A * B - 4.0 * s12 * s12
    if (a, b) == (0, 0):
        return 2.0 / math.pi * np.arcsin(np.clip(2.0 * s12 / np.sqrt(A * B), -1.0, 1.0))
    if (a, b) == (1, 1):
        return 4.0 / (math.pi * np.sqrt(delta))
    if (a, b) == (0, 2):
        return -8.0 * s12 / (math.pi * B * np.sqrt(delta))
    if (a, b) == (2, 2):
        return 16.0 * s12 / (math.pi * delta ** 1.5)
    return np.zeros_like(s12)  # (0, 1), (1, 2): odd times even


_CLOSED = {"linear": _closed_linear, "relu": _closed_relu, "erf": _closed_erf}


# ----------------------------------------------------------------------------- quadrature
def quad_rule(order: int, rule: str = "trapezoid"):
    """One-dimensional rule for E[f(z)], z ~ N(0, 1): nodes x and weights w, sum(w) = 1.

    Parameters
    ----------
    order : int
        Number of nodes m >= 2.
    rule : {"trapezoid", "hermite"}
        ``"trapezoid"``: m equispaced nodes on [-QUAD_HALF_WIDTH, QUAD_HALF_WIDTH] with
        Gaussian weights (the sinc rule; geometric convergence in the step for integrands
        analytic in a strip). ``"hermite"``: Gauss-Hermite (probabilists') nodes.

    Returns
    -------
    x, w : arrays (m,)
    """
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 2:
        raise ValueError(f"order must be an integer >= 2 (quadrature nodes per axis), "
                         f"got {order!r}")
    if rule == "trapezoid":
        x = np.linspace(-QUAD_HALF_WIDTH, QUAD_HALF_WIDTH, int(order))
        w = np.exp(-0.5 * x * x)
    elif rule == "hermite":
        x, w = np.polynomial.hermite_e.hermegauss(int(order))
    else:
        raise ValueError(f"rule must be 'trapezoid' or 'hermite', got {rule!r}")
    # renormalising removes the O(exp(-2 pi^2 / h^2)) defect so constants are exact
    return x, w / w.sum()


def auto_order(max_var: float, orders=(0, 0), tol: float = 1e-12) -> int:
    """Trapezoidal node count per axis for tanh-like integrands at variance <= ``max_var``.

    Error model (calibrated on tanh and its derivatives for variances 0.05 .. 30): for
    f(s z) with poles at distance d = pi / (2 s) from the real z-axis (tanh, s =
    sqrt(max_var)) the step-h trapezoidal rule against the N(0, 1) weight has error
    ~ C exp(-E(h)), E(h) = max_{0 < a <= d} (2 pi a / h - a^2 / 2) (shifting the contour by
    a gains exp(-2 pi a / h) and costs the Gaussian's growth exp(a^2 / 2)), with
    C ~ 50, 2e3, 1e5 for total derivative order 0, 2, 4. We take ln C = 4.5 + 2 (a + b),
    solve E(h) = ln(C / tol) for h (capped at 0.5) by bisection and return an odd count so
    that z = 0 is a node.
    """
    a, b = _check_orders(orders)
    if not np.isfinite(max_var) or max_var < 0:
        raise ValueError(f"max_var must be a finite variance >= 0, got {max_var!r}")
    if not (0 < tol < 1):
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
    target = math.log(1.0 / tol) + 4.5 + 2.0 * (a + b)
    d = math.inf if max_var == 0 else math.pi / (2.0 * math.sqrt(max_var))

    def exponent(h):
        shift = min(d, 2.0 * math.pi / h)
        return 2.0 * math.pi * shift / h - 0.5 * shift * shift

    lo, hi = 1e-6, 0.5
    if exponent(hi) < target:
        for _ in range(60):  # exponent(h) decreases in h
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if exponent(mid) >= target else (lo, mid)
        hi = lo
    m = 2 * int(math.ceil(QUAD_HALF_WIDTH / hi)) + 1
    if m > MAX_AUTO_ORDER:
        raise ValueError(f"a variance of {max_var:.4g} needs {m} quadrature nodes per axis "
                         f"(more than {MAX_AUTO_ORDER}) for tol={tol:g}; rescale the inputs "
                         f"so that |x|^2 / D = O(1), raise tol, or pass order= explicitly")
    return m


@njit(inline="always")
def _f(c, order, x):
    if order == 0:
        return _act.phi(c, x)
    if order == 1:
        return _act.dphi(c, x)
    return _act.ddphi(c, x)


@njit
def _quad_pairs_kernel(c, o1, o2, a, b1, b2, x, w, out):
    """out[k] = sum_ij w_i w_j f_o1(a_k x_i) f_o2(b1_k x_i + b2_k x_j).

    a, b1, b2, out: (K,) arrays; x, w: (m,) rule. Allocation-free.
    """
    m = x.shape[0]
    for k in range(a.shape[0]):
        total = 0.0
        for i in range(m):
            f1 = _f(c, o1, a[k] * x[i])
            if f1 == 0.0:
                continue  # e.g. relu' on the negative half-line
            mean = b1[k] * x[i]
            inner = 0.0
            for j in range(m):
                inner += w[j] * _f(c, o2, mean + b2[k] * x[j])
            total += w[i] * f1 * inner
        out[k] = total


def _quad_pairs_numpy(name, o1, o2, a, b1, b2, x, w, chunk=None):
    """Plain NumPy version of :func:`_quad_pairs_kernel` (the reference the tests use)."""
    m = x.size
    out = np.empty(a.size)
    chunk = chunk or max(1, 4_000_000 // (m * m))
    for lo in range(0, a.size, chunk):
        sl = slice(lo, lo + chunk)
        f1 = _act.apply(name, a[sl, None] * x[None, :], o1)                       # (k, m)
        u2 = b1[sl, None, None] * x[None, :, None] + b2[sl, None, None] * x[None, None, :]
        f2 = _act.apply(name, u2, o2)                                             # (k, m, m)
        out[sl] = np.einsum("ki,i,kij,j->k", f1, w, f2, w)
    return out


def _quadrature(activation, a, b, s11, s22, rho, order, rule, tol, engine):
    if activation == "relu" and 2 in (a, b):
        raise ValueError("relu'' is a Dirac delta that quadrature cannot see; use "
                         "method='closed' (or 'auto') for relu with derivative order 2")
    if order is None:
        if rule != "trapezoid":
            raise ValueError("order=None (automatic) is only defined for rule='trapezoid'; "
                             "give order=... for rule='hermite'")
        order = auto_order(float(max(np.max(s11, initial=0.0), np.max(s22, initial=0.0))),
                           (a, b), tol)
    x, w = quad_rule(order, rule)
    r1 = np.sqrt(s11).ravel()
    sd2 = np.sqrt(s22).ravel()
    rr = rho.ravel()
    b1 = sd2 * rr
    b2 = sd2 * np.sqrt(np.maximum(1.0 - rr * rr, 0.0))
    if engine == "numba":
        out = np.empty(r1.size)
        _quad_pairs_kernel(_act.code(activation), a, b, np.ascontiguousarray(r1),
                           np.ascontiguousarray(b1), np.ascontiguousarray(b2), x, w, out)
    elif engine == "numpy":
        out = _quad_pairs_numpy(activation, a, b, r1, b1, b2, x, w)
    else:
        raise ValueError(f"engine must be 'numba' or 'numpy', got {engine!r}")
    return out.reshape(s11.shape)


# ----------------------------------------------------------------------------- public API
def expect_pairs(activation: str, s11, s22, s12, orders=(0, 0), *, method: str = "auto",
                 order: int | None = None, rule: str = "trapezoid", tol: float = 1e-12,
                 engine: str = "numba") -> np.ndarray:
    """E[phi^(a)(u1) phi^(b)(u2)] for (u1, u2) ~ N(0, [[s11, s12], [s12, s22]]), elementwise.

    Parameters
    ----------
    activation : str
        ``"linear"``, ``"tanh"``, ``"relu"`` or ``"erf"``.
    s11, s22, s12 : array_like, broadcastable
        Variances of u1, u2 and their covariance.
    orders : (int, int)
        Derivative orders (a, b) in {0, 1, 2} applied to u1 and u2.
    method : {"auto", "closed", "quadrature"}
        ``"auto"`` uses the closed form where one exists (linear, relu, erf) and quadrature
        otherwise (tanh).
    order : int, optional
        Quadrature nodes per axis; default :func:`auto_order` of the largest variance.
    rule : {"trapezoid", "hermite"}
        One-dimensional rule of the tensor-product quadrature (see :func:`quad_rule`).
    tol : float
        Target absolute error of the automatic quadrature order.
    engine : {"numba", "numpy"}
        Quadrature implementation (the NumPy one is the test reference).

    Returns
    -------
    ndarray, the broadcast shape of the inputs.
    """
    _check_activation(activation)
    a, b = _check_orders(orders)
    s11, s22, s12, rho = _pair_geometry(s11, s22, s12)
    if method == "auto":
        method = "closed" if activation in _CLOSED else "quadrature"
    if method == "closed":
        if activation not in _CLOSED:
            raise ValueError(f"no closed form for activation {activation!r}; use "
                             f"method='quadrature' (or 'auto')")
        return _CLOSED[activation](a, b, s11, s22, s12, rho)
    if method == "quadrature":
        return _quadrature(activation, a, b, s11, s22, rho, order, rule, tol, engine)
    raise ValueError(f"method must be 'auto', 'closed' or 'quadrature', got {method!r}")


def _as_covariance(Sigma):
    try:
        S = np.array(Sigma, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Sigma must be a real (n, n) covariance matrix: {exc}") from None
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"Sigma must be a square (n, n) covariance matrix, got shape {S.shape}")
    if not np.all(np.isfinite(S)):
        raise ValueError("Sigma contains NaN or inf; the covariance must be finite")
    if not np.allclose(S, S.T, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(S).max(initial=0)))):
        raise ValueError("Sigma must be symmetric; pass (Sigma + Sigma.T) / 2")
    return 0.5 * (S + S.T)


def expect(activation: str, Sigma, orders=(0, 0), **kwargs) -> np.ndarray:
    """Matrix of E[phi^(a)(u_mu) phi^(b)(u_nu)] over u ~ N(0, Sigma).

    Parameters
    ----------
    activation : str
    Sigma : array (n, n)
        Symmetric positive semidefinite covariance.
    orders : (int, int)
        Derivative orders (a, b): a acts on u_mu (row index), b on u_nu (column index).
    **kwargs
        ``method``, ``order``, ``rule``, ``tol``, ``engine`` as in :func:`expect_pairs`.

    Returns
    -------
    M : array (n, n)
        Symmetric when a == b (computed on the upper triangle and mirrored);
        M(a, b) = M(b, a)^T in general.
    """
    S = _as_covariance(Sigma)
    a, b = _check_orders(orders)
    n = S.shape[0]
    d = np.diag(S)
    if a == b:
        iu, ju = np.triu_indices(n)
        vals = expect_pairs(activation, d[iu], d[ju], S[iu, ju], (a, b), **kwargs)
        M = np.empty((n, n))
        M[iu, ju] = vals
        M[ju, iu] = vals
        return M
    return expect_pairs(activation, d[:, None], d[None, :], S, (a, b), **kwargs)


def nngp(activation: str, Sigma, **kwargs) -> np.ndarray:
    """E[phi(u) phi(u)^T], u ~ N(0, Sigma): the NNGP map Phi^{l-1} -> Phi^l (theory §4)."""
    return expect(activation, Sigma, (0, 0), **kwargs)


def derivative_kernel(activation: str, Sigma, **kwargs) -> np.ndarray:
    """E[phi'(u) phi'(u)^T], u ~ N(0, Sigma): the factor in G^l = G^{l+1} * E[phi' phi'^T]."""
    return expect(activation, Sigma, (1, 1), **kwargs)


def expect1(activation: str, var, order: int = 0, *, order_nodes: int | None = None,
            tol: float = 1e-12) -> np.ndarray:
    """One-point mean E[phi^(k)(u)], u ~ N(0, var), elementwise over ``var``.

    Closed forms for linear (0, 1, 0), relu (sqrt(var / 2 pi), 1/2, 1 / sqrt(2 pi var)) and
    erf (0, 2 / sqrt(pi (1 + 2 var)), 0); tanh by the one-dimensional trapezoidal rule.
    relu'(0) = 0 and delta(0) = inf at var = 0.
    """
    _check_activation(activation)
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    v = np.asarray(var, dtype=np.float64)
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError("var must be finite and >= 0")
    if activation == "linear":
        return np.full_like(v, 1.0 if order == 1 else 0.0)
    if activation == "relu":
        if order == 0:
            return np.sqrt(v / _TWO_PI)
        if order == 1:
            return np.where(v > 0, 0.5, 0.0)
        return np.divide(1.0, np.sqrt(_TWO_PI * v), out=np.full_like(v, np.inf), where=v > 0)
    if activation == "erf":
        if order == 1:
            return 2.0 / np.sqrt(math.pi * (1.0 + 2.0 * v))
        return np.zeros_like(v)
    m = order_nodes or auto_order(float(np.max(v, initial=0.0)), (order, 0), tol)
    x, w = quad_rule(m)
    return _act.apply(activation, np.sqrt(v)[..., None] * x, order) @ w
