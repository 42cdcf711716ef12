"""The training objective (solvers/objective.py, docs/theory.rst §7): losses and their error
signals against finite differences, targets checked per loss, batch schedules, weight-decay
factors, the GradientDescent / Dataset options and the refusal of unsupported features.
"""
import numpy as np
import pytest

import dmft
from dmft import _method
from solvers import objective as ob

RNG = np.random.default_rng(0)


def _targets(loss, P, C):
    if loss in ("logistic", "hinge"):
        return np.where(RNG.standard_normal((P, 1)) > 0, 1.0, -1.0)
    if loss == "cross_entropy":
        Y = np.zeros((P, C))
        Y[np.arange(P), RNG.integers(0, C, P)] = 1.0
        return Y
    return RNG.standard_normal((P, C))


@pytest.mark.parametrize("loss,C", [("mse", 1), ("mse", 3), ("cross_entropy", 3),
                                    ("cross_entropy", 2), ("logistic", 1), ("hinge", 1)])
def test_error_signal_is_minus_the_gradient(loss, C):
    """Delta = -d loss / dF by central differences (step 1e-6: error ~1e-9); the Jacobian of
    Delta likewise; hinge away from its kink."""
    P = 5
    Y = _targets(loss, P, C)
    F = 1.5 * RNG.standard_normal((P, C))
    if loss == "hinge":
        F = np.where(np.abs(Y * F - 1) < 0.1, F + 0.3, F)
    D = ob.error_signal(loss, F, Y)
    J = ob.loss_jacobian(loss, F, Y)
    h = 1e-6
    for mu in range(P):
        for c in range(C):
            E = np.zeros_like(F)
            E[mu, c] = h
            grad = (ob.loss_value(loss, F + E, Y) - ob.loss_value(loss, F - E, Y)) / (2 * h)
            assert abs(D[mu, c] + grad) < 1e-7
            dD = (ob.error_signal(loss, F + E, Y) - ob.error_signal(loss, F - E, Y)) / (2 * h)
            # only point mu's row moves, by its C x C block
            assert np.allclose(np.delete(dD, mu, axis=0), 0.0)
            assert np.allclose(dD[mu], J[mu, :, c], atol=1e-7)


def test_loss_values_closed_forms():
    F = np.array([[0.0], [2.0], [-1.0]])
    Y = np.array([[1.0], [1.0], [1.0]])
    assert ob.loss_value("mse", F, Y) == pytest.approx(0.5 * (1 + 1 + 4))
    assert ob.loss_value("hinge", F, Y) == pytest.approx(1 + 0 + 2)
    assert ob.loss_value("logistic", F, Y) == pytest.approx(
        np.log(2) + np.log1p(np.exp(-2)) + np.log1p(np.exp(1)))
    # cross-entropy at f = 0 is log C per point; huge logits stay finite
    assert ob.loss_value("cross_entropy", np.zeros((4, 3)), np.eye(3)[[0, 1, 2, 0]]) == \
        pytest.approx(4 * np.log(3))
    big = np.array([[800.0, -800.0]])
    assert np.isfinite(ob.loss_value("cross_entropy", big, np.array([[0.0, 1.0]])))
    assert np.isfinite(ob.error_signal("logistic", np.array([[-800.0]]), np.array([[1.0]]))).all()
    assert ob.accuracy(np.array([[1.0, 0.0], [0.2, 0.1]]), np.array([[1.0, 0], [0, 1.0]])) == 0.5
    assert ob.accuracy(np.array([[0.5], [-0.5]]), np.array([[1.0], [1.0]])) == 0.5


def test_targets_checked_per_loss():
    X = np.ones((3, 2))
    with pytest.raises(ValueError, match="labels \\+1 / -1 in y_train.*2 \\* y - 1"):
        dmft.GradientDescent(loss="logistic").check(dmft.Dataset(X, [0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="loss='hinge' has one output.*cross_entropy"):
        dmft.GradientDescent(loss="hinge").check(dmft.Dataset(X, np.ones((3, 2))))
    with pytest.raises(ValueError, match="needs C >= 2 classes.*from_labels"):
        dmft.GradientDescent(loss="cross_entropy").check(dmft.Dataset(X, [1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="probability vector"):
        dmft.GradientDescent(loss="cross_entropy").check(dmft.Dataset(X, np.ones((3, 2))))
    data = dmft.Dataset.from_labels(X, [0, 2, 1], classes=4)
    assert data.y_train.shape == (3, 4) and data.multi_output
    assert np.array_equal(data.y_train.argmax(1), [0, 2, 1])
    dmft.GradientDescent(loss="cross_entropy").check(data)
    with pytest.raises(ValueError, match="labels outside 0 .. 2"):
        dmft.Dataset.from_labels(X, [0, 3, 1], classes=3)
    with pytest.raises(ValueError, match="integer class labels"):
        dmft.Dataset.from_labels(X, [0.5, 1, 0])
    # dmft.solve checks the targets before any work
    with pytest.raises(ValueError, match="labels \\+1 / -1"):
        dmft.solve(dmft.MLP(1, "tanh"), dmft.Dataset(X, [0.0, 1.0, 1.0]),
                   dmft.GradientDescent(loss="hinge"), method="static")


def test_gradient_descent_options():
    for kw, msg in [(dict(weight_decay=-1), "weight_decay must be a finite number >= 0"),
                    (dict(weight_decay=20.0, lr=0.1), "lr \\* weight_decay = 2 must be < 1"),
                    (dict(decay_to="one"), "decay_to must be one of"),
                    (dict(batch_size=0), "batch_size must be None"),
                    (dict(batch_size=2.0), "batch_size must be None"),
                    (dict(schedule="online"), "give batch_size"),
                    (dict(schedule="shuffled", batch_size=2), "schedule must be one of"),
                    (dict(batch_seed=-1), "batch_seed must be an integer >= 0")]:
        with pytest.raises(ValueError, match=msg):
            dmft.GradientDescent(**kw)
    gd = dmft.GradientDescent(steps=4, batch_size=5)
    with pytest.raises(ValueError, match="batch_size=5 exceeds the P = 3"):
        gd.batch_mask(3)
    with pytest.raises(ValueError, match="schedule='online' sees each training point once.*"
                                         "4 \\* 2 = 8 points"):
        dmft.GradientDescent(steps=4, batch_size=2, schedule="online").batch_mask(6)
    assert dmft.GradientDescent().plain
    assert not dmft.GradientDescent(weight_decay=0.1).plain
    # the spec round-trips through its dict
    gd = dmft.GradientDescent(loss="hinge", weight_decay=0.5, decay_to="zero", batch_size=3,
                              batch_seed=7, schedule="online")
    assert dmft.GradientDescent(**gd.to_dict()) == gd


def test_batch_schedules():
    P, T, B = 10, 12, 4
    m = ob.batch_schedule(P, T, B, batch_seed=3)
    # epochs of 10 points: batches 4, 4, 2, then a fresh permutation
    assert m.shape == (T, P) and list(m.sum(1)) == [4, 4, 2] * 4
    for e in range(4):
        assert np.array_equal(m[3 * e:3 * e + 3].sum(0), np.ones(P))   # each point once
    assert np.array_equal(m, ob.batch_schedule(P, T, B, batch_seed=3))
    assert not np.array_equal(m, ob.batch_schedule(P, T, B, batch_seed=4))
    on = ob.batch_schedule(12, 3, 4, schedule="online")
    assert np.array_equal(on, np.kron(np.eye(3, dtype=bool), np.ones(4, dtype=bool)))
    assert ob.batch_schedule(P, T, None) is None


def test_objective_delta_and_decay():
    Y = np.array([[1.0], [-1.0], [1.0]])
    mask = np.array([[True, False, True], [False, True, False]])
    o = ob.Objective("hinge", Y, n=5, steps=2, lr=0.1, weight_decay=2.0, decay_to="zero",
                     mask=mask)
    F = np.array([0.5, 0.0, 2.0, 9.0, 9.0])
    d = o.delta(0, F)
    assert d.shape == (5, 1) and np.array_equal(d[:, 0], [1.0, 0.0, 0.0, 0.0, 0.0])
    assert np.array_equal(o.delta(1, F)[:, 0], [0.0, -1.0, 0.0, 0.0, 0.0])
    assert o.a == pytest.approx(0.8)
    assert np.allclose(o.memory(3), [0.8 ** 2, 0.8, 1.0])
    assert o.init_scale(2) == pytest.approx(0.64)
    assert ob.Objective("hinge", Y, 5, 2, 0.1, 2.0, "init").init_scale(2) == 1.0
    assert not o.plain and ob.Objective("mse", Y, 5, 2, 0.1).plain


def test_unsupported_features_refused_before_work():
    """A method refuses what it does not solve, naming it (dmft/_method.py FEATURES)."""
    class Plain(dmft.Method, name="plain-test"):
        def run(self, ctx, net, data, train, *, opts):
            raise AssertionError("must not run")

    X = np.ones((3, 2))
    net = dmft.MLP(1, "tanh")
    for data, train, what in [
            (dmft.Dataset(X, np.ones((3, 2))), dmft.GradientDescent(), "C >= 2 outputs"),
            (dmft.Dataset(X, [1.0, -1, 1]), dmft.GradientDescent(loss="hinge"), "the hinge"),
            (dmft.Dataset(X, np.ones(3)), dmft.GradientDescent(weight_decay=1.0),
             "weight decay toward the initialisation"),
            (dmft.Dataset(X, np.ones(3)), dmft.GradientDescent(weight_decay=1.0,
                                                                decay_to="zero"),
             "weight decay toward zero"),
            (dmft.Dataset(X, np.ones(3)), dmft.GradientDescent(batch_size=2), "mini-batches")]:
        with pytest.raises(ValueError, match=f"method='plain-test' does not solve .*{what}"):
            Plain()(net, data, train)
    assert _method.features(dmft.Dataset(X, np.ones(3)), dmft.GradientDescent()) == set()
