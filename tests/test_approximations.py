"""method="gia": the Monte Carlo DMFT with the responses A = B = 0 (docs/theory.rst §4).

- The reference: deep linear networks, where every field is Gaussian and the DMFT closes
  in matrices (docs/theory.rst §3). :func:`_deep_linear_march` below marches those matrix equations
  in time, in NumPy, from docs/theory.rst alone (no code of the package): with the responses it must
  reproduce ``method="linear"`` to rounding (which checks the march's bookkeeping); without
  them it is the exact GIA, against which ``method="gia"`` (a Monte Carlo solver) must agree
  within its reported standard errors at depths 2 and 3. At gamma0 = 1 the full solution and
  the static one lie tens of standard errors away from it, so the check tells GIA apart from
  both.
- At depth 1 there are no responses, so ``"gia"`` and ``"mc"`` run the same code and are
  identical by design: checked as such (a cheap guard of the shared path), not as validation.
"""
import numpy as np
import pytest

import dmft
import dmft.config
from conftest import TOL as _SHARED

TOL = {
    **_SHARED,
    # Monte Carlo GIA against the exact GIA: max |z| over all entries (up to 20 000 strongly
    # correlated ones for the two-time kernels); standard errors from 16 replicates (Student t
    # with 15 degrees of freedom, heavier-tailed than a Gaussian); measured max 3.5
    "z_gia": 5.0,
    "rounding": 1e-12,   # the hand march with responses against method="linear"
    "distinct": 10.0,    # full and static solutions: at least this many s.e. from the GIA
}


@pytest.fixture(scope="module")
def data():
    return dmft.config.teacher_student(P=4, Q=2, D=8, seed=0)


def _deep_linear_march(kx, y, L, gamma0, lr, T, responses):
    """Deep linear DMFT in discrete time from the matrix equations of docs/theory.rst §3.

    Flat index (t, mu), time-major. C^l = A^{l-1} + lr tril_-1[Phi^{l-1} * Delta] and
    D^l = B^l + lr tril_-1[G^{l+1} * Delta] (Delta on the column index); M = (I - g^2 C D)^-1,
    Mt = (I - g^2 D C)^-1; Phi^l = M (Phi^{l-1} + g^2 C G^{l+1} C^T) M^T,
    G^l = Mt (G^{l+1} + g^2 D Phi^{l-1} D^T) Mt^T, A^l = M C, B^{l-1} = Mt D; Phi^0 = Kx at
    all times, G^{L+1} = 1, A^0 = B^L = 0. With ``responses`` (the exact DMFT) the
    predictions are f = <w h^L> / gamma0 = diag Mt (G^{L+1} C^T + D Phi^{L-1}) M^T of the last
    layer; without them (GIA: A = B = 0) f(t+1) = f(t) + lr K(t) Delta(t) with
    K = sum_l G^{l+1} Phi^l at equal times (the definition of method="gia").

    Causal: every block up to time k follows from Delta(s < k), so march k = 0 .. T and at
    each k sweep the layers to their fixed point (finitely many sweeps: the dependence is
    nilpotent), then read f(k) and Delta(k).
    """
    n, P, T1 = kx.shape[0], y.shape[0], T + 1
    m = n * T1
    causal = np.kron(np.tril(np.ones((T1, T1)), -1), np.ones((n, n)))    # s < t
    eye = np.eye(m)
    phi = [np.kron(np.ones((T1, T1)), kx)] * (L + 1)     # phi[l], l = 0 .. L
    g = [np.ones((m, m))] * (L + 2)                      # g[l], l = 1 .. L + 1
    A = [np.zeros((m, m))] * (L + 1)                     # A[l], A[0] = 0
    B = [np.zeros((m, m))] * (L + 1)                     # B[l], B[L] = 0
    f = np.zeros((T1, n))
    delta = np.zeros((T1, n))

    def equal_time(K):
        return np.stack([K[t * n:(t + 1) * n, t * n:(t + 1) * n] for t in range(T1)])

    for k in range(T1):
        dcol = np.tile(delta.reshape(-1), (m, 1))
        for _ in range(4 * L * T1):
            change = 0.0
            for l in range(1, L + 1):
                C = lr * causal * phi[l - 1] * dcol + (A[l - 1] if responses else 0.0)
                D = lr * causal * g[l + 1] * dcol + (B[l] if responses else 0.0)
                M = np.linalg.inv(eye - gamma0 ** 2 * C @ D)
                Mt = np.linalg.inv(eye - gamma0 ** 2 * D @ C)
                new_phi = M @ (phi[l - 1] + gamma0 ** 2 * C @ g[l + 1] @ C.T) @ M.T
                new_g = Mt @ (g[l + 1] + gamma0 ** 2 * D @ phi[l - 1] @ D.T) @ Mt.T
                change = max(change, np.abs(new_phi - phi[l]).max(),
                             np.abs(new_g - g[l]).max())
                phi[l], g[l], A[l], B[l - 1] = new_phi, new_g, M @ C, Mt @ D
            if change < 1e-14 * max(1.0, np.abs(phi[L]).max()):
                break
        else:
            raise AssertionError(f"layer sweeps did not converge at step {k}")
        ntk = sum(equal_time(g[l + 1]) * equal_time(phi[l]) for l in range(L + 1))
        if k > 0 and responses:
            wh = Mt @ (g[L + 1] @ C.T + D @ phi[L - 1]) @ M.T
            f[k] = np.diagonal(wh)[k * n:(k + 1) * n]
        elif k > 0:
            f[k] = f[k - 1] + lr * ntk[k - 1][:, :P] @ delta[k - 1, :P]
        delta[k, :P] = y - f[k, :P]

    def two_time(K):
        return K.reshape(T1, n, T1, n).transpose(0, 2, 1, 3)

    return {"predictions": f, "ntk": ntk,
            "phi": np.stack([two_time(phi[l]) for l in range(1, L + 1)]),
            "g": np.stack([two_time(g[l]) for l in range(1, L + 1)])}


def _fields(sol):
    """The compared fields of a Solution (predictions: train and test points side by side)
    and, where it has them, their standard errors."""
    out = {"predictions": np.concatenate([sol.train_predictions, sol.test_predictions], 1),
           "ntk": sol.ntk, "phi": sol.phi, "g": sol.g}
    se = None
    if sol.stderr:
        se = {"predictions": np.concatenate([sol.stderr["train_predictions"],
                                             sol.stderr["test_predictions"]], 1),
              **{k: sol.stderr[k] for k in ("ntk", "phi", "g")}}
    return out, se


def _max_z(a, b, se):
    return float(np.max(np.abs(a - b) / (se + 1e-12)))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_hand_march_with_responses_is_the_exact_solver(data, depth):
    """The reference march's bookkeeping: with the responses it is the exact deep-linear
    DMFT, so it equals method="linear" (solvers.linear, different algebra) to rounding."""
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=12)
    exact, _ = _fields(dmft.solve(dmft.MLP(depth, "linear"), data, train, method="linear"))
    ref = _deep_linear_march(data.kx, np.asarray(data.y_train), depth, 1.0, 0.1, 12, True)
    for key, val in exact.items():
        assert np.abs(ref[key] - val).max() < TOL["rounding"] * max(1.0, np.abs(val).max()), \
            key


@pytest.mark.parametrize("depth,gamma0", [(2, 1.0), (3, 1.0), (2, 0.3)])
def test_gia_matches_the_exact_gia_of_deep_linear_networks(data, depth, gamma0):
    """method="gia" (16 x 1024 Monte Carlo samples per layer, one pass) against the exact GIA
    march: every prediction, NTK, Phi and G entry within TOL['z_gia'] reported standard
    errors. The full DMFT (responses on) and the static (lazy) solution must both be more than
    TOL['distinct'] standard errors away somewhere, so a solver that kept the responses or
    froze the kernels would fail."""
    net = dmft.MLP(depth, "linear")
    train = dmft.GradientDescent(gamma0=gamma0, lr=0.1, steps=12)
    gia = dmft.solve(net, data, train, method="gia", seed=0)
    assert gia.A is None and gia.B is None and gia.options["gia"] is True
    est, se = _fields(gia)
    ref = _deep_linear_march(data.kx, np.asarray(data.y_train), depth, gamma0, 0.1, 12, False)
    for key in est:
        z = _max_z(est[key], ref[key], se[key])
        assert z < TOL["z_gia"], (key, z)
    full, _ = _fields(dmft.solve(net, data, train, method="linear"))
    static = dmft.solve(net, data, train, method="static")
    for other, fields in (("full", full), ("static", {"predictions": _fields(static)[0][
            "predictions"], "ntk": static.ntk})):
        z = max(_max_z(fields[k], ref[k], se[k]) for k in ("predictions", "ntk"))
        assert z > TOL["distinct"], (other, z)


def test_gia_equals_mc_at_depth_one_by_design(data):
    """Two-layer networks have no responses, so method="gia" and method="mc" run the same code
    (dmft._mc) and must be identical bit for bit with the same seed. This guards the shared
    path; it is not a validation of GIA (the deep-linear tests above are). Also: gamma0 = 1
    moves the kernel by many standard errors away from the static answer."""
    net = dmft.MLP(depth=1, activation="tanh")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=15)
    gia = dmft.solve(net, data, train, method="gia", seed=1, samples=16384)
    mc = dmft.solve(net, data, train, method="mc", seed=1, samples=16384)
    assert gia.A is None and gia.B is None and gia.options["gia"] is True
    np.testing.assert_array_equal(gia.predictions, mc.predictions)
    np.testing.assert_array_equal(gia.ntk, mc.ntk)
    static = dmft.solve(net, data, train, method="static")
    assert np.abs(gia.ntk[-1] - static.ntk[-1]).max() > 10 * gia.stderr["ntk"][-1].max()
