"""Every validation error of the specs and the public entry points, with its message.

Each bad input must raise ValueError whose message names the argument (and, where there is
one, the fix); the accepted edge cases next to each error are checked too, so that a test fails
if validation becomes either too loose or too strict.
"""
import dataclasses
import math

import numpy as np
import pytest

import dmft
from dmft import GradientDescent, MLP, Dataset


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return Dataset(rng.normal(size=(4, 3)), rng.normal(size=4), rng.normal(size=(2, 3)),
                   rng.normal(size=2))


# ------------------------------------------------------------------------------------------
# MLP
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, -1, 1.5, 2.0, "2", True, None])
def test_mlp_bad_depth(depth):
    with pytest.raises(ValueError, match=r"depth must be an integer >= 1 \(number of hidden "
                                         r"layers; 1 is a two-layer network\), got"):
        MLP(depth=depth)


@pytest.mark.parametrize("activation", ["sigmoid", "", "tan h"])
def test_mlp_unknown_activation(activation):
    with pytest.raises(ValueError, match=r"activation .* is unknown; use one of "
                                         r"\['erf', 'linear', 'relu', 'tanh'\]"):
        MLP(activation=activation)


@pytest.mark.parametrize("activation", [None, 3, np.tanh])
def test_mlp_activation_not_a_name(activation):
    with pytest.raises(ValueError, match=r"activation must be a name \(a string\), one of "
                                         r"\['erf', 'linear', 'relu', 'tanh'\]"):
        MLP(activation=activation)


def test_mlp_accepts_and_normalises():
    assert MLP(depth=np.int64(3), activation="TanH") == MLP(3, "tanh")
    assert MLP(1, "linear").linear and not MLP(1, "relu").linear
    with pytest.raises(ValueError, match="depth must be"):
        dataclasses.replace(MLP(), depth=0)  # replace re-validates


# ------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------
def test_dataset_one_dimensional_inputs():
    with pytest.raises(ValueError, match=r"X_train must be 2-D with shape \(points, input "
                                         r"dimension\), got shape \(4,\); use X.reshape\(-1, 1\)"):
        Dataset(np.ones(4), np.ones(4))


@pytest.mark.parametrize("shape", [(2, 2, 2), (4, 0), ()])
def test_dataset_bad_input_shapes(shape):
    with pytest.raises(ValueError, match=r"X_train must be 2-D with shape \(points, input "
                                         r"dimension\) and D >= 1, got shape"):
        Dataset(np.ones(shape), np.ones(4))


def test_dataset_no_training_points():
    with pytest.raises(ValueError, match="X_train must hold at least one training point"):
        Dataset(np.ones((0, 3)), np.ones(0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dataset_non_finite_values(bad):
    X, y = np.ones((3, 2)), np.ones(3)
    Xb = X.copy()
    Xb[1, 1] = bad
    yb = y.copy()
    yb[2] = bad
    fix = "contains NaN or inf; remove or impute those entries"
    with pytest.raises(ValueError, match=f"X_train {fix}"):
        Dataset(Xb, y)
    with pytest.raises(ValueError, match=f"y_train {fix}"):
        Dataset(X, yb)
    with pytest.raises(ValueError, match=f"X_test {fix}"):
        Dataset(X, y, Xb)
    with pytest.raises(ValueError, match=f"y_test {fix}"):
        Dataset(X, y, X, yb)


@pytest.mark.parametrize("X", [[["a", "b"]], [[1 + 1j, 2]], [[1.0], [1.0, 2.0]]])
def test_dataset_not_real_arrays(X):
    with pytest.raises(ValueError, match=r"X_train must be a real \(P, D\) array"):
        Dataset(X, [1.0])


def test_dataset_target_shapes():
    X = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"y_train must have shape \(3,\) \(one output\) or "
                                         r"\(3, C\) \(C outputs\), one row per point, got "
                                         r"shape \(4,\)"):
        Dataset(X, np.ones(4))
    with pytest.raises(ValueError, match=r"y_train must have shape \(3,\).*got shape \(3, 2, 1\)"):
        Dataset(X, np.ones((3, 2, 1)))
    with pytest.raises(ValueError, match=r"y_train must be a real array of shape \(3,\)"):
        Dataset(X, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"y_test must have shape \(2,\)"):
        Dataset(X, np.ones(3), np.ones((2, 2)), np.ones(3))
    with pytest.raises(ValueError, match=r"y_test has 1 outputs but y_train has 2"):
        Dataset(X, np.ones((3, 2)), np.ones((2, 2)), np.ones(2))
    d = Dataset(X, np.ones((3, 1)))  # a column vector of targets is accepted
    assert d.y_train.shape == (3,) and d.C == 1 and not d.multi_output
    d = Dataset(X, np.ones((3, 2)))  # two outputs
    assert d.C == 2 and d.multi_output and d.Y_train.shape == (3, 2)


def test_dataset_test_set_consistency():
    X, y = np.ones((3, 2)), np.ones(3)
    with pytest.raises(ValueError, match="y_test was given without X_test; pass X_test too"):
        Dataset(X, y, None, np.ones(2))
    with pytest.raises(ValueError, match="X_test has input dimension 5 but X_train has 2; both "
                                         "need the same number of columns"):
        Dataset(X, y, np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"X_test must be 2-D.*use X.reshape"):
        Dataset(X, y, np.ones(2))
    assert Dataset(X, y).Q == 0 and Dataset(X, y, np.ones((0, 2))).Q == 0
    assert Dataset(X, y, []).Q == 0


def test_dataset_arrays_are_copied_and_read_only():
    X = np.ones((3, 2))
    d = Dataset(X, np.ones(3))
    X[0, 0] = 5.0
    assert d.X_train[0, 0] == 1.0
    with pytest.raises(ValueError, match="read-only"):
        d.X_train[0, 0] = 2.0


# ------------------------------------------------------------------------------------------
# GradientDescent
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma0", [-0.1, -1, math.nan, math.inf, "1", True, None])
def test_bad_gamma0(gamma0):
    with pytest.raises(ValueError, match=r"gamma0 must be a finite number >= 0 "
                                         r"\(feature-learning strength; 0 is the lazy limit\)"):
        GradientDescent(gamma0=gamma0)


@pytest.mark.parametrize("lr", [0, 0.0, -0.1, math.nan, math.inf, "0.1", None])
def test_bad_lr(lr):
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0 \(learning rate / "
                                         r"time step\)"):
        GradientDescent(lr=lr)


@pytest.mark.parametrize("steps", [0, -5, 10.0, 2.5, True, "10"])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        GradientDescent(steps=steps)


def test_bad_loss():
    with pytest.raises(ValueError, match=r"loss 'l1' is not supported; use one of "
                                         r"\('mse', 'cross_entropy', 'logistic', 'hinge', "
                                         r"'barlow_twins'\)"):
        GradientDescent(loss="l1")


def test_gradient_descent_accepts():
    gd = GradientDescent(gamma0=0, lr=np.float32(0.5), steps=np.int32(4))
    assert gd.gamma0 == 0.0 and isinstance(gd.lr, float) and gd.steps == 4
    np.testing.assert_allclose(gd.times, [0, 0.5, 1.0, 1.5, 2.0])
    with pytest.raises(ValueError, match="lr must be"):
        dataclasses.replace(gd, lr=-1.0)


# ------------------------------------------------------------------------------------------
# dmft.solve / dmft.simulate / dmft.fluctuations
# ------------------------------------------------------------------------------------------
def test_solve_bad_spec_types(data):
    net, train = MLP(), GradientDescent()
    with pytest.raises(ValueError, match=r"net must be a dmft.MLP, got dict; build one with "
                                         r"dmft.MLP\(depth=..., activation=...\)"):
        dmft.solve({"depth": 1}, data, train)
    with pytest.raises(ValueError, match=r"data must be a dmft.Dataset, got tuple; build one "
                                         r"with dmft.Dataset\(X_train, y_train"):
        dmft.solve(net, (np.ones((2, 2)), np.ones(2)), train)
    with pytest.raises(ValueError, match=r"train must be a dmft.GradientDescent, got MLP"):
        dmft.solve(net, data, net)
    with pytest.raises(ValueError, match="net must be a dmft.MLP"):
        dmft.simulate("tanh", data, train, width=8, seeds=[0])


def test_solve_bad_method(data):
    net, train = MLP(), GradientDescent()
    with pytest.raises(ValueError, match=r"method 'newton' is unknown; use 'auto' or one of "
                                         r"\['static', 'linear', 'mc'"):
        dmft.solve(net, data, train, method="newton")
    with pytest.raises(ValueError, match="method must be a string"):
        dmft.solve(net, data, train, method=None)


def test_static_unknown_option(data):
    with pytest.raises(ValueError, match=r"unknown option\(s\) for method='static': "
                                         r"\['samples'\]"):
        dmft.solve(MLP(), data, GradientDescent(), method="static", samples=10)
    with pytest.raises(ValueError, match="quad_order must be an integer >= 2"):
        dmft.solve(MLP(), data, GradientDescent(), method="static", quad_order=1)


def test_linear_method_refuses_nonlinear_network(data):
    with pytest.raises(ValueError, match="linear"):
        dmft.solve(MLP(2, "tanh"), data, GradientDescent(), method="linear")


def test_mc_refuses_bad_samples(data):
    with pytest.raises(ValueError, match="samples"):
        dmft.solve(MLP(1, "tanh"), data, GradientDescent(steps=2), method="mc", samples=0)


@pytest.mark.parametrize("width", [0, -8, 8.0, "8", True])
def test_simulate_bad_width(data, width):
    with pytest.raises(ValueError, match=r"width must be a positive integer \(the number of "
                                         r"hidden units per layer"):
        dmft.simulate(MLP(), data, GradientDescent(), width=width, seeds=[0])


@pytest.mark.parametrize("seeds,match", [
    (5, "seeds must be a non-empty iterable of non-negative integers"),
    ("01", "seeds must be a non-empty iterable"),
    ([], "seeds is empty"),
    ([0, -1], "seeds must hold non-negative integers, got -1"),
    ([0, 1.5], "seeds must hold non-negative integers, got 1.5"),
    ([1, 1], "seeds contains duplicates"),
])
def test_simulate_bad_seeds(data, seeds, match):
    with pytest.raises(ValueError, match=match):
        dmft.simulate(MLP(), data, GradientDescent(), width=8, seeds=seeds)


def test_simulate_other_errors(data):
    net = MLP()
    with pytest.raises(ValueError, match="gamma0 must be > 0 to simulate a network"):
        dmft.simulate(net, data, GradientDescent(gamma0=0.0), width=8, seeds=[0])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['seed'\] for simulate "
                                         r"\(simulate takes seeds="):
        dmft.simulate(net, data, GradientDescent(), width=8, seeds=[0], seed=1)
    with pytest.raises(ValueError, match="record_kernels must be True or False"):
        dmft.simulate(net, data, GradientDescent(), width=8, seeds=[0], record_kernels="yes")


def test_fluctuations_needs_a_solution():
    with pytest.raises(ValueError, match="Solution"):
        dmft.fluctuations("run.h5")
