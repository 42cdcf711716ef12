"""method="static" beyond one squared-error output (docs/theory.rst §7).

What they prove:
- for every loss (mse with C = 3, cross-entropy with C = 3, logistic, hinge), with weight decay
  toward the initialisation and with mini-batches (epochs, online), the static method equals
  the lazy kernel machine written here independently in its representer form,
  f(t) = K alpha(t), alpha(t+1) = a alpha(t) + lr Delta(t) (losses and batches spelled out
  below, not taken from solvers.objective), to 1e-10;
- the outputs decouple: the NTK and G over (point, output) pairs are delta_cc' times the
  one-output kernels, and mse with C outputs is C independent one-output problems;
- weight decay toward zero is refused with a ValueError naming the fix; a plain one-output mse
  problem is unchanged (bit for bit the original frozen dynamics);
- the NN-SVM benchmark's quick mode (benchmarks/nn_svm.py) runs (slow suite).
"""
import importlib.util
import os

import numpy as np
import pytest

import dmft
from conftest import loss_data
from solvers import static as static_engine

TOL = {
    # the same recursion in another algebraic form (K alpha vs f updates): rounding only
    "exact": dict(rtol=1e-10, atol=1e-12),
}


def _delta(loss, F, Y):
    """-d loss / d F written out per loss (independent of solvers.objective)."""
    if loss == "mse":
        return Y - F
    if loss == "cross_entropy":
        e = np.exp(F - F.max(axis=1, keepdims=True))
        return Y - e / e.sum(axis=1, keepdims=True)
    if loss == "logistic":
        return Y / (1.0 + np.exp(Y * F))
    if loss == "hinge":
        return np.where(Y * F < 1.0, Y, 0.0)
    raise AssertionError(loss)


def _batches(P, T, B, seed, schedule):
    if B is None:
        return [np.arange(P)] * T
    if schedule == "online":
        return [np.arange(t * B, (t + 1) * B) for t in range(T)]
    rng, out = np.random.default_rng(seed), []
    while len(out) < T:
        perm = rng.permutation(P)
        out += [perm[i:i + B] for i in range(0, P, B)]
    return out[:T]


def _kernel_machine(K, Y, loss, lr, T, wd, batches):
    """f(t) = K[:, train] alpha(t), alpha(t+1) = a alpha(t) + lr Delta(t) (zero off-batch)."""
    P, C = Y.shape
    a = 1.0 - lr * wd
    alpha = np.zeros((P, C))
    fs = []
    for t in range(T + 1):
        f = K[:, :P] @ alpha
        fs.append(f)
        if t < T:
            d = np.zeros((P, C))
            idx = batches[t]
            d[idx] = _delta(loss, f[:P][idx], Y[idx])
            alpha = a * alpha + lr * d
    return np.array(fs)


def _data(loss, P=6, Q=3, D=4, C=3, seed=0):
    return loss_data(loss, P, Q, D, C, seed)


CASES = [
    # loss, weight decay, batch size, schedule
    ("mse", 0.0, None, "epochs"),
    ("mse", 0.5, 2, "epochs"),
    ("cross_entropy", 0.0, None, "epochs"),
    ("cross_entropy", 0.3, 4, "epochs"),
    ("logistic", 0.2, None, "epochs"),
    ("logistic", 0.0, 1, "online"),
    ("hinge", 0.0, None, "epochs"),
    ("hinge", 0.4, 3, "epochs"),
]


@pytest.mark.parametrize("loss, wd, B, schedule", CASES)
def test_static_equals_kernel_machine(loss, wd, B, schedule):
    T = 25
    data = _data(loss, P=26 if schedule == "online" else 6)
    train = dmft.GradientDescent(0.0, 0.3, T, loss=loss, weight_decay=wd, batch_size=B,
                                 batch_seed=2, schedule=schedule)
    net = dmft.MLP(2, "relu")
    sol = dmft.solve(net, data, train, method="static")
    K1 = dmft.solve(net, dmft.Dataset(data.X_train, np.zeros(data.P), data.X_test),
                    dmft.GradientDescent(0.0, 0.3, 1), method="static").ntk[0]
    Y = data.Y_train
    f = _kernel_machine(K1, Y, loss, 0.3, T, wd, _batches(data.P, T, B, 2, schedule))
    if not data.multi_output:
        f = f[..., 0]
    np.testing.assert_allclose(sol.predictions, f, **TOL["exact"])
    assert np.abs(f[-1]).max() > 0.1                     # the dynamics did something
    C = data.C
    if data.multi_output:
        assert sol.ntk.shape == (T + 1, data.P + data.Q, C, data.P + data.Q, C)
        assert sol.g.shape == (2, T + 1, T + 1, data.P + data.Q, C, data.P + data.Q, C)
        eye = np.eye(C)
        np.testing.assert_array_equal(sol.ntk[3], K1[:, None, :, None] * eye[:, None, :])
        g1 = dmft.solve(net, dmft.Dataset(data.X_train, np.zeros(data.P), data.X_test),
                        dmft.GradientDescent(0.0, 0.3, 1), method="static").g[:, 0, 0]
        np.testing.assert_array_equal(sol.g[:, 2, 1],
                                      g1[:, :, None, :, None] * eye[:, None, :])
    else:
        assert sol.ntk.shape == (T + 1, data.P + data.Q, data.P + data.Q)
    assert sol.converged and np.all(np.isfinite(sol.train_loss))


def test_outputs_decouple_for_mse():
    """mse with C outputs = C separate one-output problems sharing the kernel."""
    data = _data("mse")
    net, tr = dmft.MLP(1, "tanh"), dmft.GradientDescent(0.0, 0.4, 12, weight_decay=0.2)
    sol = dmft.solve(net, data, tr, method="static")
    for c in range(data.C):
        one = dmft.Dataset(data.X_train, data.Y_train[:, c], data.X_test, data.Y_test[:, c])
        s1 = dmft.solve(net, one, tr, method="static")
        np.testing.assert_allclose(sol.train_predictions[..., c], s1.train_predictions,
                                   **TOL["exact"])
        np.testing.assert_allclose(sol.test_predictions[..., c], s1.test_predictions,
                                   **TOL["exact"])


def test_plain_problem_unchanged():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((5, 3)), rng.standard_normal(4)
    data = dmft.Dataset(X[:4], y, X[4:])
    tr = dmft.GradientDescent(1.0, 0.2, 10)
    sol = dmft.solve(dmft.MLP(2, "erf"), data, tr, method="static")
    ref = static_engine.frozen_dynamics(sol.ntk[0], y, 0.2, 10)
    assert np.array_equal(sol.predictions, ref)


def test_decay_toward_zero_refused():
    data = _data("hinge")
    tr = dmft.GradientDescent(0.0, 0.3, 5, loss="hinge", weight_decay=0.1, decay_to="zero")
    with pytest.raises(ValueError, match="method='mc' or dmft.simulate"):
        dmft.solve(dmft.MLP(1, "relu"), data, tr, method="static")
    with pytest.raises(ValueError, match="decay toward zero"):
        from solvers.objective import Objective
        static_engine.frozen_dynamics_objective(
            np.eye(data.P + data.Q), Objective("hinge", data.Y_train, data.P + data.Q, 5, 0.3,
                                               0.1, "zero"))


def test_mse_unstable_lr_with_decay_is_flagged():
    """With decay the squared-error bound is lr lambda_max < 1 + a (a = 1 - lr lambda)."""
    data = _data("mse", C=2)
    net = dmft.MLP(1, "relu")
    K = dmft.solve(net, data, dmft.GradientDescent(0.0, 0.1, 1), method="static").ntk[0]
    lam = np.linalg.eigvalsh(K.reshape(data.P + data.Q, 2, -1, 2)[:data.P, 0, :data.P, 0]).max()
    wd = 0.5
    # lr lam = 1 + a - eps  <=>  lr (lam + wd) = 2 - eps
    ok = dmft.GradientDescent(0.0, 0.98 * 2 / (lam + wd), 40, weight_decay=wd)
    bad = dmft.GradientDescent(0.0, 1.03 * 2 / (lam + wd), 40, weight_decay=wd)
    assert dmft.solve(net, data, ok, method="static").converged
    res = dmft.solve(net, data, bad, method="static", throw=False)
    assert res.status == "diverged" and "(1 + a) / lambda_max" in res.message


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_nn_svm():
    spec = importlib.util.spec_from_file_location(
        "nn_svm", os.path.join(ROOT, "benchmarks", "nn_svm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_static_hinge_with_decay_is_the_soft_margin_svm():
    """benchmarks/nn_svm.py part (a): static (hinge, decay toward init) = an independent SVM
    (closed-form arc-cosine NTK, explicit features, primal subgradient descent) to 1e-8."""
    bench = _load_nn_svm()
    data = bench.make_data(12, 10, 5, seed=1)
    sol, f_svm, dK, df = bench.part_a(data, lam=0.5, lr=0.05, steps=60)
    assert dK < 1e-12 and df < 1e-8, (dK, df)
    assert np.abs(f_svm[-1]).max() > 0.3
    # the margin is active: some training points are inside it, some beyond
    m = data.y_train * f_svm[-1, :data.P]
    assert np.any(m < 1) and np.any(m > 1)


@pytest.mark.slow
def test_nn_svm_benchmark_quick():
    """The quick preset runs and its numbers are those its docstring claims."""
    bench = _load_nn_svm()
    out = bench.main(["--quick"])
    assert out["df"] < 1e-8
    # centred networks at gamma0 = 1/sqrt(N) approach the SVM like N^(-1/2)
    assert abs(out["slope"] + 0.5) < 0.1 + 3 * out["slope_se"], out["slope"]
