"""Shared test data, tolerances and statistics (plain functions: ``from conftest import ...``).

- :func:`small_data`: the small Gaussian data set of the fluctuation tests (2 train + 1 test
  points, D = 4, targets spread over [-0.5, 1]).
- :data:`TOL`: the tolerances that several files share; a file adds its own entries with
  ``TOL = {**conftest.TOL, ...}`` and keeps them in one table.
- :func:`pooled_ratio`, :func:`ensemble_var_stderr`: simulated N Var against a theory, with
  the standard errors of the ensemble variance (fourth-moment form; sqrt(2 / (S - 1)) relative
  for Gaussian outputs).
- :func:`one_point_recursion`: the exact discrete-time dynamics of a two-layer linear network
  on one point with |x|^2 / D = 1 at infinite width (docs/theory.rst §3).
- :func:`requires_torch`: skip (not fail) a test that needs PyTorch when it is not installed
  (it is in the ``test`` extra, so ``pip install -e .[test]`` runs everything).
- :func:`loss_data`: small data sets for each loss of docs/theory.rst §7.
- :func:`torch_train_mlp`: an independent finite network trained in PyTorch (autograd
  gradients and NTK), the reference of the simulator tests.
- :func:`control_variate_mean`, :func:`extrapolate_widths`: ensembles of simulated networks
  at several widths, reduced with control variates and extrapolated in 1/N.
"""
import math

import numpy as np
import pytest

import dmft

#: tolerances shared across test files (each with where it comes from)
TOL = {
    # Monte Carlo agreement, in standard errors, for a handful of (correlated) entries
    "z": 4.0,
    # ... and for the max over tens to thousands of entries (false alarm ~1e-4 per entry)
    "z_max": 4.5,
    # simulated N Var against the O(1/N) propagator: at the largest width within 10 % (or
    # width_se standard errors of the ensemble, where the error bar itself is wider); the
    # 1/N extrapolation over all widths within width_se of its standard error
    "width_rel": 0.10,
    "width_se": 3.0,
}


def small_data(P=2, Q=1, D=4, seed=0):
    """P train and Q test points with i.i.d. standard normal inputs; y = linspace(1, -0.5, P)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    y = np.linspace(1.0, -0.5, P)
    return dmft.Dataset(X[:P], y, X[P:] if Q else None)


def ensemble_var_stderr(x):
    """Variance over the seed axis (axis 0) per entry and its standard error (4th moment)."""
    S = x.shape[0]
    d2 = (x - x.mean(0)) ** 2
    return d2.sum(0) / (S - 1), d2.std(0, ddof=1) / np.sqrt(S)


def pooled_ratio(x, theory):
    """sum over entries of the ensemble variance of ``x`` (seeds on axis 0) / sum of the theory,
    with a standard error from the spread over seeds of the summed squared deviations."""
    S = x.shape[0]
    d2 = ((x - x.mean(0)) ** 2).reshape(S, -1).sum(1) * S / (S - 1)
    tot = float(np.sum(theory))
    return d2.mean() / tot, d2.std(ddof=1) / np.sqrt(S) / tot


def one_point_recursion(gamma0, y, lr, T):
    """docs/theory.rst §3, two-layer linear network, one point, infinite width, step lr: with
    a_t = lr gamma0 (y - f_t), K_{t+1} = (1 + a^2) K_t + 4 a gamma0 f_t and
    f_{t+1} = (1 + a^2) f_t + a K_t / gamma0 from K_0 = 2, f_0 = 0. Returns (f, K), (T + 1,)."""
    fs, Ks = [0.0], [2.0]
    for _ in range(T):
        f, K = fs[-1], Ks[-1]
        a = lr * gamma0 * (y - f)
        fs.append((1 + a * a) * f + a * K / gamma0)
        Ks.append((1 + a * a) * K + 4 * a * gamma0 * f)
    return np.array(fs), np.array(Ks)


def requires_torch():
    """``pytest.importorskip("torch")`` with the install hint; returns the module."""
    return pytest.importorskip("torch", reason="torch is not installed (pip install -e "
                                               "'.[test]' or '.[fluctuations]')")


@pytest.fixture
def torch_or_skip():
    """Fixture form of :func:`requires_torch`: ``@pytest.mark.usefixtures("torch_or_skip")``."""
    return requires_torch()


def unseal(path):
    """Make a saved result file look as dmft wrote it before checksums existed (no whole-file
    trailer, no ``dmft_sha256`` attribute), so that a test can edit it as an old file."""
    import h5py
    from dmft import io as dio
    data = path.read_bytes()
    if data[-dio._TRAILER_LEN:].startswith(dio._TRAILER_MAGIC):
        path.write_bytes(data[:-dio._TRAILER_LEN])
    with h5py.File(path, "r+") as f:
        del f.attrs["dmft_sha256"]


def fix_deep_propagator_options(monkeypatch, **fixed):
    """Run dmft.fluctuations's deep propagator with engine keywords fixed (``adjoint=``,
    ``kappa=``, ...: options of :func:`solvers.fluct.deep_mc.deep_propagator_once` that the
    API does not expose)."""
    from solvers.fluct import deep_mc
    import dmft._fluctuations as F
    orig = deep_mc.deep_propagator

    def run(*a, **k):
        k.update(fixed)
        return orig(*a, **k)

    monkeypatch.setattr(F._deep_mc, "deep_propagator", run)


def small_deep_problem():
    """A small depth-2 tanh problem (3 + 1 points, 5 steps) for solver-behaviour tests."""
    import dmft.config
    data = dmft.config.teacher_student(P=3, Q=1, D=4, seed=0)
    return (dmft.MLP(depth=2, activation="tanh"), data,
            dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=5))


def loss_data(loss, P, Q, D, C=3, seed=0):
    """P train and Q test Gaussian inputs with targets for ``loss``: integer labels of C
    classes (cross-entropy), Gaussian (P, C) targets (mse with C > 1), else labels +-1."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P + Q, D))
    if loss == "cross_entropy":
        lab = rng.integers(0, C, P + Q)
        return dmft.Dataset.from_labels(X[:P], lab[:P], X[P:], lab[P:])
    if loss == "mse" and C > 1:
        return dmft.Dataset(X[:P], rng.standard_normal((P, C)), X[P:],
                            rng.standard_normal((Q, C)))
    y = np.where(rng.standard_normal(P + Q) > 0, 1.0, -1.0)
    return dmft.Dataset(X[:P], y[:P], X[P:], y[P:])


def torch_train_mlp(torch, X, N, L, act, steps, lr, loss_of, *, out_scale, grad_scale,
                    C=None, wd=0.0, decay_to="init", center=False, offset=None, seed=0):
    """Train the width-N network of ``numpy.random.default_rng(seed)`` (drawn in the order
    W0 (N, D), the L - 1 hidden (N, N), w (N,) or (N, C)) by full gradient steps in PyTorch.

    f(x) = w . phi(h^L) * out_scale (minus its initial value if ``center``, plus ``offset``);
    theta -= lr (grad_scale dLoss/dtheta + wd (theta - bar)) with bar the initial weights
    (``decay_to="init"``) or zero; ``loss_of(f, k)`` is the loss of step k from the outputs
    f (n, C) of all n points. K = grad_scale J J^T with J the autograd Jacobian of the
    outputs. Returns f (T+1, n, C) and K (T+1, n, C, n, C)."""
    rng = np.random.default_rng(seed)
    n, D = X.shape
    arrays = [rng.standard_normal((N, D))] + [rng.standard_normal((N, N)) for _ in range(L - 1)]
    arrays.append(rng.standard_normal(N if C is None else (N, C)))
    params = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    bar = [p.detach().clone() if decay_to == "init" else torch.zeros_like(p) for p in params]
    act_fn = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda x: x,
              "erf": torch.special.erf}[act]
    Xt = torch.tensor(X, dtype=torch.float64)

    def net(ps):
        h = act_fn(Xt @ ps[0].T / math.sqrt(D))
        for W in ps[1:-1]:
            h = act_fn(h @ W.T / math.sqrt(N))
        return ((h @ ps[-1]) * out_scale).reshape(n, -1)

    raw0 = net(params).detach()
    off = None if offset is None else \
        torch.tensor(np.asarray(offset), dtype=torch.float64).reshape(raw0.shape)
    fs, Ks = [], []
    for k in range(steps + 1):
        f = net(params)
        if center:
            f = f - raw0
        if off is not None:
            f = f + off
        rows = [torch.cat([g.reshape(-1) for g in
                           torch.autograd.grad(f.reshape(-1)[i], params, retain_graph=True)])
                for i in range(f.numel())]
        J = torch.stack(rows)
        Cn = f.shape[1]
        Ks.append((grad_scale * (J @ J.T)).reshape(n, Cn, n, Cn).numpy())
        fs.append(f.detach().numpy().copy())
        if k == steps:
            break
        grads = torch.autograd.grad(loss_of(f, k), params)
        with torch.no_grad():
            for p, g, b in zip(params, grads, bar):
                p -= lr * (grad_scale * g + wd * (p - b))
    return np.array(fs), np.array(Ks)


def control_variate_mean(obs, Z):
    """Mean over seeds (axis 0) of the observables ``obs`` (S, m) adjusted by control variates
    ``Z`` (S, k) whose means are known (zero, or absorbed by a fit), and its standard error.
    The coefficients are fitted on the same seeds (k + 1 degrees of freedom used)."""
    S = obs.shape[0]
    assert S > 4 * Z.shape[1], f"{S} networks are too few for {Z.shape[1]} control variates"
    Zc = Z - Z.mean(0)
    beta = np.linalg.lstsq(Zc, obs - obs.mean(0), rcond=None)[0]
    adj = obs - Z @ beta
    return adj.mean(0), adj.std(0, ddof=Z.shape[1] + 1) / np.sqrt(S)


def extrapolate_widths(stats, widths, counts, seed_base):
    """Simulated observables extrapolated to N = infinity.

    ``stats(N, seeds)`` -> (mean, se, seconds) of the networks at width N; the seeds of the
    i-th width are ``seed_base * (i + 1) + range(count)`` (disjoint: shared seeds would
    correlate the errors across widths). The means are fitted by a + b/N
    (:func:`solvers.stats.fit_inverse_width`). Returns a, its standard error and the seconds
    spent simulating."""
    from solvers.stats import fit_inverse_width
    rows = [stats(N, range(seed_base * (i + 1), seed_base * (i + 1) + S))
            for i, (N, S) in enumerate(zip(widths, counts))]
    b0, se0, _, _ = fit_inverse_width(widths, np.array([r[0] for r in rows]),
                                      np.array([r[1] for r in rows]))
    return b0, se0, sum(r[2] for r in rows)


def interrupt_after(monkeypatch, module, name, k):
    """Make ``module.name`` raise KeyboardInterrupt on its call number k + 1 (Ctrl-C in the
    middle of the work after k finished units)."""
    orig = getattr(module, name)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) > k:
            raise KeyboardInterrupt
        return orig(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls
