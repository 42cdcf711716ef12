"""method="gia": the Monte Carlo DMFT with the responses A = B = 0 (THEORY.md §4).

Routes: the full Monte Carlo solver (L = 1: same seed, no responses exist, so the two must
be identical) and the exact deep-linear solver (L = 2). Tolerances are multiples of the
solver's reported Monte Carlo standard errors.
"""
import numpy as np
import pytest

import dmft
import dmft.config


@pytest.fixture(scope="module")
def data():
    return dmft.config.teacher_student(P=4, Q=2, D=8, seed=0)


def test_gia_equals_full_solver_two_layer(data):
    net = dmft.MLP(depth=1, activation="tanh")
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=15)
    gia = dmft.solve(net, data, train, method="gia", seed=1, samples=16384)
    mc = dmft.solve(net, data, train, method="mc", seed=1, samples=16384)
    assert gia.A is None and gia.B is None and gia.options["gia"] is True
    np.testing.assert_array_equal(gia.predictions, mc.predictions)
    np.testing.assert_array_equal(gia.ntk, mc.ntk)
    # and it is not the static answer: gamma0 = 1 moves the kernel by many standard errors
    static = dmft.solve(net, data, train, method="static")
    assert np.abs(gia.ntk[-1] - static.ntk[-1]).max() > 10 * gia.stderr["ntk"][-1].max()


@pytest.fixture(scope="module")
def deep_linear(data):
    net = dmft.MLP(depth=2, activation="linear")
    train = dmft.GradientDescent(gamma0=0.1, lr=0.1, steps=12)
    return (dmft.solve(net, data, train, method="gia", seed=0),
            dmft.solve(net, data, train, method="linear"))


def test_gia_kernels_close_to_full_at_small_gamma0(deep_linear):
    """At gamma0 = 0.1 the kernels (which move at O(gamma0^2)) agree with the exact ones
    within 5 Monte Carlo standard errors per entry (plus 1e-3 for the O(gamma0^2) bias
    that GIA carries: the dropped responses enter the kernels at that order)."""
    gia, exact = deep_linear
    for key in ("ntk", "phi", "g"):
        err = np.abs(getattr(gia, key) - getattr(exact, key))
        assert np.all(err <= 5 * gia.stderr[key] + 1e-3), key


def test_gia_predictions_close_to_full_at_small_gamma0(data, deep_linear):
    """GIA drops the responses, an O(gamma0^2) change of the dynamics, like freezing the
    kernels is: allow 5 standard errors plus twice the static model's own gap to the exact
    solution (max 4e-3 here). An earlier version of the solver read GIA predictions without
    the responses and was off by 0.27 here, which this test catches."""
    gia, exact = deep_linear
    static = dmft.solve(gia.net, data, gia.train, method="static")
    gap = np.abs(static.train_predictions - exact.train_predictions).max()
    err = np.abs(gia.train_predictions - exact.train_predictions)
    assert np.all(err <= 5 * gia.stderr["train_predictions"] + 2 * gap)
