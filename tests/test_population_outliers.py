"""Outlier populations of the one-pass solver (solvers.mc.causal.population_outliers).

What they prove:
- the score (a population's largest distance from the median over the populations, against
  the typical population's) flags a population far out (also a non-finite one) and nothing in
  normal spread, nor anything with fewer than 5 populations;
- ``dmft.solve(method="mc")`` names such a population in ``extras["population_outliers"]``
  with a logged warning, keeps it in the mean, and still names it after a resume from a
  checkpoint (each population's f(T) is part of the checkpoint);
- at the edge of stability the solve logs how to spend samples (more populations; past a
  catapult, larger ones), and below it nothing.
"""
import logging

import numpy as np
import pytest

import dmft
from conftest import interrupt_after, small_deep_problem
from solvers.mc import causal
from solvers.mc.causal import OUTLIER_RATIO, population_outliers

SMALL = dict(samples=1536, response_samples=48, replicates=6, progress=False)


def test_robust_score():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 12)) * 0.01 + 1.0
    assert population_outliers(x) == []
    y = x.copy()
    y[5, 3] += 0.01 * 4.0                      # 4 standard deviations: normal spread
    assert population_outliers(y) == []
    y[5, 3] += 0.5                             # ~50 standard deviations
    y[9] = np.nan
    out = population_outliers(y)
    assert [p for p, _ in out] == [9, 5]       # non-finite first (score inf), then 5
    assert out[1][1] > OUTLIER_RATIO
    assert population_outliers(y[:4]) == []   # too few populations to judge


@pytest.fixture(scope="module")
def problem():
    return small_deep_problem()


def _shift_population(monkeypatch, k, by=100.0):
    """Population k (0-based call order) returns its predictions shifted by ``by``."""
    orig = causal._population
    calls = []

    def wrapped(*args, **kwargs):
        o = orig(*args, **kwargs)
        if len(calls) == k:
            o = dict(o, f=o["f"] + by)
        calls.append(1)
        return o

    monkeypatch.setattr(causal, "_population", wrapped)
    return calls


def test_solve_names_the_outlier(problem, monkeypatch, caplog, tmp_path):
    net, data, train = problem
    ref = dmft.solve(net, data, train, method="mc", seed=4, **SMALL)
    assert "population_outliers" not in ref.extras
    with monkeypatch.context() as m:
        _shift_population(m, 2)
        with caplog.at_level(logging.WARNING, logger="dmft"):
            sol = dmft.solve(net, data, train, method="mc", seed=4, **SMALL)
    assert sol.converged
    assert sol.extras["population_outliers"].tolist() == [2]
    assert any("population(s) 3 of 6" in r.getMessage() for r in caplog.records)
    # kept in the mean: the shift of one population of 6 moves the mean by 100 / 6
    assert np.allclose(sol.train_predictions - ref.train_predictions, 100.0 / 6, atol=1e-9)

    # interrupted after 4 populations (the outlier among them) and resumed: still named
    path = tmp_path / "mc.ckpt.npz"
    with monkeypatch.context() as m:
        _shift_population(m, 2)
        interrupt_after(m, causal, "_population", 4)
        with pytest.raises(KeyboardInterrupt):
            dmft.solve(net, data, train, method="mc", seed=4, checkpoint=path, **SMALL)
    with np.load(path) as z:
        assert z["f_final"].shape[0] == 4
    res = dmft.solve(net, data, train, method="mc", seed=4, checkpoint=path, **SMALL)
    assert res.extras["population_outliers"].tolist() == [2]
    assert np.array_equal(res.train_predictions, sol.train_predictions)


@pytest.mark.parametrize("peak,expect", [(1.5, None), (2.05, "reaches the edge of stability"),
                                         (3.0, "a catapult")])
def test_edge_of_stability_advice(peak, expect, caplog):
    """At the edge of stability the solve says how to spend samples (more populations; past a
    catapult, larger ones), from the peak lr lambda_max(K_train(t)) of the mean NTK; below 1.9
    it says nothing."""
    from dmft._mc import _edge_of_stability_advice
    lr, P = 0.1, 3
    ntk = np.zeros((4, 5, 5))
    ntk[:, :P, :P] = np.eye(P)
    ntk[2, 1, 1] = peak / lr                   # the peak at t = 2 on a training point
    ntk[3, 4, 4] = 10 * peak / lr              # a test point's entry does not count
    with caplog.at_level(logging.INFO, logger="dmft"):
        _edge_of_stability_advice(ntk, lr, P, 16, 1024)
    msgs = [r.getMessage() for r in caplog.records]
    if expect is None:
        assert msgs == []
    else:
        assert len(msgs) == 1 and expect in msgs[0] and f"{peak:.3g}" in msgs[0]
