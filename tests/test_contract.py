"""The method contract (dmft._method): one options dataclass and one skeleton for every method.

What these tests prove
- Adding a method takes one adapter file and one table entry: docs/examples/example_method.py
  (gradient flow under the frozen NTK) registers, solves, and matches an independent closed
  form (eigendecomposition of K); its options and its failure status go through the skeleton.
- Every built-in method of ``solve`` refuses unknown options with a message listing its
  options (generated from the dataclass), rejects bad seeds the same way, and its results
  carry ``converged`` / ``status`` / ``message``; so do ``simulate`` and ``fluctuations``.
- ``throw=False`` returns a failed result (status and message) where ``throw=True`` raises
  ``ConvergenceError`` with that result attached.
- ``Ensemble.var().stderr`` is the standard error of the sample variance.
- HDF5 files keep ``status`` / ``message``; files without them load with defaults.
"""
import dataclasses
import importlib.util
import json
import os
import re

import h5py
import numpy as np
import pytest

import dmft
import dmft.config
from dmft import ConvergenceError
from dmft._fluctuations import FLUCTUATION_METHODS, FluctuationOptions
from dmft._method import parse_seed
from conftest import unseal
from dmft.results import STATUSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "docs", "examples", "example_method.py")

BAD_SEEDS = ["abc", -1, 1.5, True, [0]]


@pytest.fixture
def example():
    """Import the example file (which registers "gradient-flow"); unregister afterwards."""
    spec = importlib.util.spec_from_file_location("example_method", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    dmft.METHODS.pop("gradient-flow", None)


def _data(P=4, Q=3, D=5, seed=0):
    return dmft.config.teacher_student(P=P, Q=Q, D=D, seed=seed)


# ------------------------------------------------------------------------------------------
# the worked example: one adapter file, one table entry
# ------------------------------------------------------------------------------------------
def test_example_method_matches_closed_form(example):
    data = _data()
    net, train = dmft.MLP(2, "tanh"), dmft.GradientDescent(1.0, 0.05, 40)
    sol = dmft.solve(net, data, train, method="gradient-flow", seed=3)
    assert isinstance(dmft.METHODS["gradient-flow"], example.GradientFlow)
    assert sol.method == "gradient-flow" and sol.seed == 3
    assert sol.converged and sol.status == "converged" and sol.message
    # independent closed form: K_PP = V diag(lam) V^T, f(t) = K[:, :P] V diag((1-e^{-lam t})
    # / lam) V^T y
    K = dmft.solve(net, data, train, method="static").ntk[0]
    P = data.P
    lam, V = np.linalg.eigh(K[:P, :P])
    ref = np.stack([K[:, :P] @ V @ (((1 - np.exp(-lam * t)) / lam) * (V.T @ data.y_train))
                    for t in train.times])
    np.testing.assert_allclose(sol.predictions, ref, rtol=1e-9, atol=1e-12)
    # on the training points, f = (I - expm(-K t)) y
    np.testing.assert_allclose(sol.train_predictions[-1],
                               V @ ((1 - np.exp(-lam * train.times[-1])) * (V.T @ data.y_train)),
                               rtol=1e-9, atol=1e-12)
    # small lr: gradient descent (method="static") approaches the flow, error O(lr)
    fine = dmft.GradientDescent(1.0, 0.002, 1000)
    gap = np.abs(dmft.solve(net, data, fine, method="static").predictions[-1]
                 - dmft.solve(net, data, fine, method="gradient-flow").predictions[-1]).max()
    assert gap < 1e-2


def test_example_method_options_and_status(example):
    data = _data()
    net, train = dmft.MLP(1, "relu"), dmft.GradientDescent(1.0, 0.05, 10)
    with pytest.raises(ValueError, match=r"unknown option\(s\) for method='gradient-flow': "
                                         r"\['samples'\]; valid options: \['quad_tol', "
                                         r"'fit_tol'\]"):
        dmft.solve(net, data, train, method="gradient-flow", samples=10)
    with pytest.raises(ValueError, match=r"fit_tol must be a number in \(0, 1\), got 2"):
        dmft.solve(net, data, train, method="gradient-flow", fit_tol=2)
    with pytest.raises(ConvergenceError, match="not below fit_tol") as exc:
        dmft.solve(net, data, train, method="gradient-flow", fit_tol=1e-9)
    assert exc.value.result.status == "not_converged"
    sol = dmft.solve(net, data, train, method="gradient-flow", fit_tol=1e-9, throw=False)
    assert not sol.converged and sol.status == "not_converged"
    assert "not below fit_tol = 1e-09" in sol.message
    assert sol.elapsed > 0 and sol.options["fit_tol"] == 1e-9


# ------------------------------------------------------------------------------------------
# the built-in methods
# ------------------------------------------------------------------------------------------
def _net_for(method):
    return dmft.MLP(2, "linear") if method == "linear" else dmft.MLP(1, "tanh")


@pytest.mark.parametrize("method", ["static", "linear", "mc", "gia", "perturbative"])
def test_unknown_option_lists_the_valid_ones(method):
    adapter = dmft.METHODS[method]
    names = adapter.Options.names()
    assert names and isinstance(adapter, dmft.Method) and adapter.description
    with pytest.raises(ValueError) as exc:
        dmft.solve(_net_for(method), _data(), dmft.GradientDescent(1.0, 0.1, 3), method=method,
                   bogus_option=1)
    msg = str(exc.value)
    assert f"unknown option(s) for method={method!r}: ['bogus_option']" in msg
    assert str(list(names)) in msg
    for field in dataclasses.fields(adapter.Options):  # every option is documented
        assert field.metadata["doc"]


@pytest.mark.parametrize("method", ["static", "linear", "mc", "gia", "perturbative"])
@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_bad_seed_rejected_by_every_method(method, seed):
    with pytest.raises(ValueError, match="seed must be a non-negative integer, a "
                                         "numpy.random.SeedSequence or None"):
        dmft.solve(_net_for(method), _data(), dmft.GradientDescent(1.0, 0.1, 3), method=method,
                   seed=seed)


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_bad_seed_rejected_by_fluctuations(seed):
    sol = dmft.solve(dmft.MLP(1, "linear"), _data(), dmft.GradientDescent(1.0, 0.1, 3))
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        dmft.fluctuations(sol, seed=seed)
    from dmft._two_layer import solve_two_layer
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        solve_two_layer(dmft.MLP(1, "tanh"), _data(), dmft.GradientDescent(1.0, 0.1, 3),
                        samples=100, seed=seed)


def test_parse_seed():
    ss, s = parse_seed(7)
    assert s == 7 and ss.entropy == 7
    ss0 = np.random.SeedSequence(3)
    assert parse_seed(ss0) == (ss0, None)
    assert parse_seed(np.int64(2))[1] == 2
    assert parse_seed(None)[1] is None


def test_status_on_every_result():
    data = _data()
    train = dmft.GradientDescent(1.0, 0.1, 3)
    sol = dmft.solve(dmft.MLP(1, "linear"), data, train, method="linear")
    ens = dmft.simulate(dmft.MLP(1, "linear"), data, train, width=32, seeds=range(3))
    fl = dmft.fluctuations(sol)
    for result in (sol, ens, fl, ens.mean(), ens.var()):
        assert result.converged is True and result.status == "converged"
        assert isinstance(result.message, str) and result.message
    assert set(STATUSES) == {"converged", "not_converged", "diverged"}
    # results built by hand get a status from converged
    assert dataclasses.replace(sol, converged=False, status=None,
                               message=None).status == "not_converged"
    with pytest.raises(ValueError, match="status must be one of"):
        dataclasses.replace(sol, status="fine")


@pytest.mark.parametrize("method, options", [
    ("static", {}), ("linear", {}), ("perturbative", {}),
    ("mc", {"samples": 256, "kernel_samples": 64}), ("gia", {"samples": 256, "blocks": 2})])
def test_every_method_reports_its_status(method, options, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="dmft"):
        sol = dmft.solve(_net_for(method), _data(), dmft.GradientDescent(1.0, 0.1, 3),
                         method=method, seed=2, **options)
    assert (sol.method, sol.converged, sol.status, sol.message) == (method, True,
                                                                    "converged", "converged")
    assert sol.seed == 2 and sol.elapsed > 0
    assert any(r.getMessage().startswith(f"method={method!r}: converged in")
               for r in caplog.records)


def test_throw_false_static_and_linear():
    data = _data()
    train = dmft.GradientDescent(1.0, 50.0, 5)   # far above 2 / lambda_max
    with pytest.raises(ConvergenceError, match="unstable for the frozen NTK") as exc:
        dmft.solve(dmft.MLP(1, "tanh"), data, train, method="static")
    assert exc.value.result.status == "diverged"
    sol = dmft.solve(dmft.MLP(1, "tanh"), data, train, method="static", throw=False)
    assert (sol.converged, sol.status) == (False, "diverged")
    assert "largest stable learning rate" in sol.message
    lin = dmft.solve(dmft.MLP(2, "linear"), data, dmft.GradientDescent(5.0, 1.0, 30),
                     method="linear", throw=False)
    assert lin.status == "diverged" and lin.message.startswith("method='linear' diverged")
    assert lin.extras["message"] == lin.message


def test_throw_false_mc_iteration_limit():
    data = _data(3, 2, 4)
    kw = dict(method="mc", scheme="iterative", samples=256, response_samples=64, max_iter=1,
              seed=0)
    net, train = dmft.MLP(2, "tanh"), dmft.GradientDescent(1.0, 0.1, 3)
    with pytest.raises(ConvergenceError, match="did not converge in 1 iterations") as exc:
        dmft.solve(net, data, train, **kw)
    sol = dmft.solve(net, data, train, throw=False, **kw)
    assert (sol.converged, sol.status) == (False, "not_converged")
    assert sol.message == str(exc.value)
    np.testing.assert_array_equal(sol.train_predictions, exc.value.result.train_predictions)


def test_mc_iterative_options_refused_with_onepass():
    with pytest.raises(ValueError, match=r"option\(s\) \['max_iter', 'tol'\] belong to the "
                                         r"iterative deep solver"):
        dmft.solve(dmft.MLP(2, "tanh"), _data(), dmft.GradientDescent(1.0, 0.1, 3),
                   method="mc", tol=1e-3, max_iter=3)


@pytest.mark.parametrize("depth,options,regime", [
    (1, {"response_samples": 64}, "two-layer networks"),
    (1, {"scheme": "onepass", "replicates": 4}, "two-layer networks"),
    (2, {"blocks": 4}, "the one-pass deep solver"),
    (2, {"kernel_samples": 64, "tol": 1e-3}, "the one-pass deep solver"),
    (2, {"scheme": "iterative", "src_rtol": 1e-5}, "the iterative deep solver"),
    (2, {"scheme": "iterative", "sampler": "random"}, "the iterative deep solver"),
])
def test_mc_options_of_another_regime_refused(depth, options, regime):
    """mc's options declare the regimes they apply to (option(..., applies=)); one given for
    another regime (depth 1 march, one pass, iterative) is an error naming the valid ones."""
    names = sorted(options)
    opts = dmft._mc.MCOptions(**options)
    mode = "two_layer" if depth == 1 else options.get("scheme", "onepass")
    valid = list(opts.for_regime(mode))
    bad = opts.inapplicable(mode)
    assert bad and set(bad) <= set(names) and not set(bad) & set(valid)
    with pytest.raises(ValueError, match=rf"option\(s\) {re.escape(str(bad))} do not apply to "
                                         rf"{regime}.*its options are "
                                         rf"{re.escape(str(valid))}"):
        dmft.solve(dmft.MLP(depth, "tanh"), _data(), dmft.GradientDescent(1.0, 0.1, 3),
                   method="mc", seed=0, **options)


def test_mc_regimes_generated_from_the_dataclass():
    O = dmft._mc.MCOptions
    assert set(O.for_regime("two_layer")) == {"samples", "kernel_samples", "blocks", "sampler"}
    assert "src_rtol" in O.for_regime("onepass") and "src_rtol" not in O.for_regime("iterative")
    assert {"damping", "anderson", "tol", "noise_factor", "max_iter", "window", "callback",
            "chunk_mb"} == set(O.for_regime("iterative")) - set(O.for_regime("onepass"))
    assert set(O.names()) == set().union(*(O.for_regime(r) for r in O.REGIMES))


def test_throw_false_simulate():
    data = _data()
    net, train = dmft.MLP(2, "linear"), dmft.GradientDescent(5.0, 1.0, 30)
    with pytest.raises(ConvergenceError, match="the network with seed 0 diverged"):
        dmft.simulate(net, data, train, width=16, seeds=[0, 1])
    ens = dmft.simulate(net, data, train, width=16, seeds=[0, 1], throw=False)
    assert (ens.converged, ens.status) == (False, "diverged")
    assert "seeds [0, 1] diverged" in ens.message
    assert np.all(np.isnan(ens.train_predictions))


def test_throw_false_fluctuations(monkeypatch):
    sol = dmft.solve(dmft.MLP(1, "linear"), _data(), dmft.GradientDescent(1.0, 0.1, 3))
    good = dmft.fluctuations(sol, method="linear-exact")
    from dmft import _fluctuations

    def blow_up(*args, **kwargs):   # an engine whose linearised dynamics overflow
        return {"f": good.extras["exact_predictions"],
                "cov": np.full_like(good.extras["prediction_cov_two_time"], np.inf),
                "pred_cov": good.prediction_cov, "ntk_var": good.ntk_var}

    monkeypatch.setattr(_fluctuations._engine, "linear_exact_fluctuations", blow_up)
    with pytest.raises(ConvergenceError, match=r"fluctuations \(linear-exact\): non-finite "
                                               r"covariance") as exc:
        dmft.fluctuations(sol, method="linear-exact")
    assert exc.value.result.status == "diverged"
    fl = dmft.fluctuations(sol, method="linear-exact", throw=False)
    assert (fl.converged, fl.status) == (False, "diverged")


def test_fluctuation_table():
    assert list(FLUCTUATION_METHODS) == ["auto", "propagator", "lazy", "linear-exact",
                                         "deep-linear", "deep-propagator"]
    for name, adapter in FLUCTUATION_METHODS.items():
        assert adapter.name == name and adapter.description
        assert issubclass(adapter.Options, FluctuationOptions)
    # each method takes its own options, generated from its dataclass
    names = {name: set(a.Options.names()) for name, a in FLUCTUATION_METHODS.items()}
    assert names["linear-exact"] == names["deep-linear"] == {"center", "ntk"}
    assert names["propagator"] == {"center", "ntk", "samples", "blocks", "chunk", "times",
                                  "response_samples", "sampler"}
    assert names["lazy"] == {"center", "ntk", "samples", "blocks", "moments"}
    assert names["deep-propagator"] == {"center", "ntk", "samples", "blocks", "kappa_samples",
                                       "times", "map_replicates", "ntk_rank", "ntk_probes"}
    assert names["auto"] == set().union(*names.values())
    data = _data()
    train = dmft.GradientDescent(1.0, 0.1, 3)
    static = dmft.solve(dmft.MLP(1, "tanh"), data, train, method="static")
    lin = dmft.solve(dmft.MLP(1, "linear"), data, train)
    deep = dmft.solve(dmft.MLP(2, "linear"), data, train)
    auto = FLUCTUATION_METHODS["auto"]
    assert auto.resolve(static).name == "lazy"
    assert auto.resolve(lin).name == "linear-exact"
    assert auto.resolve(deep).name == "deep-linear"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\] for fluctuations; "
                                         r"known options: method, center"):
        dmft.fluctuations(lin, bogus=1)
    # an option of another method: refused, naming the method (and what "auto" chose)
    with pytest.raises(ValueError, match=r"option\(s\) \['samples'\] do not apply to "
                                         r"fluctuations method='linear-exact' \(the method "
                                         r"that method='auto' chose"):
        dmft.fluctuations(lin, samples=1000)
    with pytest.raises(ValueError, match=r"\['chunk', 'kappa_samples'\] do not apply to "
                                         r"fluctuations method='lazy'; its options are"):
        dmft.fluctuations(static, method="lazy", chunk=10, kappa_samples=10)
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        dmft.fluctuations(lin, method="linear-exact", samples=-1)


# ------------------------------------------------------------------------------------------
# Ensemble.var(): standard error of the sample variance
# ------------------------------------------------------------------------------------------
def _ensemble(values):
    """An Ensemble whose train predictions (S, 2, 1) are ``values`` (S,) at both times."""
    data = dmft.Dataset([[1.0]], [0.5])
    S = len(values)
    f = np.repeat(np.asarray(values, dtype=float)[:, None, None], 2, axis=1)
    return dmft.Ensemble(net=dmft.MLP(1, "linear"), data=data,
                         train=dmft.GradientDescent(1.0, 0.1, 1), width=8,
                         seeds=np.arange(S), t=np.array([0.0, 0.1]), train_predictions=f,
                         test_predictions=np.zeros((S, 2, 0)), ntk=np.ones((S, 2, 1, 1)))


def test_ensemble_var_stderr_is_that_of_the_variance():
    rng = np.random.default_rng(0)
    S, sigma = 400, 2.0
    x = sigma * rng.standard_normal(S)
    v = _ensemble(x).var()
    s2 = x.var(ddof=1)
    np.testing.assert_allclose(v.train_predictions[0, 0], s2)
    se = v.stderr["train_predictions"][0, 0]
    # Gaussian data: se(s^2) ~ s^2 sqrt(2 / (S - 1)) (not the standard error of the mean)
    assert abs(se / (s2 * np.sqrt(2 / (S - 1))) - 1) < 0.15
    m4 = np.mean((x - x.mean()) ** 4)
    np.testing.assert_allclose(se, np.sqrt((m4 - (S - 3) / (S - 1) * s2 ** 2) / S))
    # the spread of s^2 over many replicate ensembles agrees with the reported stderr
    reps = sigma * rng.standard_normal((2000, 50))
    spread = reps.var(axis=1, ddof=1).std()
    reported = np.mean([_ensemble(r).var().stderr["train_predictions"][0, 0]
                        for r in reps[:200]])
    assert abs(reported / spread - 1) < 0.1
    mean_se = _ensemble(x).mean().stderr["train_predictions"][0, 0]
    np.testing.assert_allclose(mean_se, x.std(ddof=1) / np.sqrt(S))


def test_ensemble_var_needs_two_seeds():
    with pytest.raises(ValueError, match=r"var\(\) needs at least 2 seeds"):
        _ensemble([1.0]).var()
    assert _ensemble([1.0]).mean().stderr == {}


# ------------------------------------------------------------------------------------------
# files and configs
# ------------------------------------------------------------------------------------------
def test_status_round_trips_and_old_files_load(tmp_path):
    data = _data()
    sol = dmft.solve(dmft.MLP(1, "tanh"), data, dmft.GradientDescent(1.0, 50.0, 3),
                     method="static", throw=False)
    path = tmp_path / "s.h5"
    sol.save(path)
    back = dmft.load(path)
    assert (back.converged, back.status, back.message) == (False, "diverged", sol.message)
    ens = dmft.simulate(dmft.MLP(1, "linear"), data, dmft.GradientDescent(1.0, 0.1, 2),
                        width=8, seeds=[0, 1])
    ens.save(tmp_path / "e.h5")
    assert dmft.load(tmp_path / "e.h5").status == "converged"
    # a file written before status / message existed (and before checksums)
    unseal(path)
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        del meta["status"], meta["message"]
        f.attrs["meta"] = json.dumps(meta)
    old = dmft.load(path)
    assert (old.converged, old.status, old.message) == (False, "not_converged",
                                                        STATUSES["not_converged"])


def test_config_options_come_from_the_dataclasses(tmp_path):
    base = {"data": {"P": 3, "Q": 1, "D": 2}, "train": {"lr": 0.1, "steps": 2}}
    with pytest.raises(ValueError, match=r"unknown option\(s\) for method='static': "
                                         r"\['samples'\]; valid options: \['quad_order', "
                                         r"'quad_tol'\]"):
        dmft.config.parse_config(dict(base, solve={"method": "static", "samples": 3}))
    with pytest.raises(ValueError, match="quad_order must be an integer >= 2"):
        dmft.config.parse_config(dict(base, solve={"method": "static", "quad_order": 1}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\] for fluctuations"):
        dmft.config.parse_config(dict(base, solve={"method": "static"},
                                      fluctuations={"bogus": 1}))
    cfg = dmft.config.parse_config(dict(base, solve={"method": "mc", "samples": 64,
                                                     "seed": 1, "throw": False}))
    assert cfg.options["samples"] == 64
