"""Reading a result file (:mod:`dmft.io`): the plain tree read from the file (after its checks
and migrations) -> Solution, Ensemble or Fluctuations, and the derived copies of the losses
and accuracies that a file records and the reader checks against the recomputed ones."""
from __future__ import annotations

import logging

import numpy as np

from ._json import get_json as _get_json
from .results import Ensemble, Fluctuations, Solution
from .specs import MLP, Dataset, GradientDescent

logger = logging.getLogger("dmft.io")

#: the losses and accuracies recorded as read-only derived copies (properties of results)
_DERIVED = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")


def _derived_values(result) -> dict:
    """The recorded losses and accuracies of a Solution or Ensemble (None fields left out)."""
    out = {}
    with np.errstate(all="ignore"):     # a diverged run's NaN / inf predictions stay NaN
        for name in _DERIVED:
            value = getattr(result, name, None)
            if value is not None:
                out[name] = np.asarray(value, dtype=np.float64)
    return out



def _check_derived(tree, result, where):
    """Warn (never fail) where a recorded loss / accuracy differs from the one recomputed
    from the stored predictions (e.g. a file written by a dmft whose loss differed)."""
    stored = {k: tree["datasets"][k] for k in _DERIVED if k in tree["datasets"]}
    if not stored:
        return
    now = _derived_values(result)
    for name, value in stored.items():
        new = now.get(name)
        same = new is not None and new.shape == np.shape(value) and np.allclose(
            new, value, rtol=1e-10, atol=1e-12, equal_nan=True)
        if not same:
            logger.warning("%s: the recorded %s differs from the one recomputed from the "
                           "predictions and train.loss (the file's copy is ignored)",
                           where, name)



def _read_mapping(tree) -> dict:
    plain = _get_json(tree, "values_json", "{}")
    keys = _get_json(tree, "keys_json", "[]")
    out = {}
    for key in keys:
        if key in tree["datasets"]:
            out[key] = tree["datasets"][key]
        elif key in tree["groups"]:
            out[key] = _read_mapping(tree["groups"][key])
        else:
            out[key] = plain[key]
    return out


def _read_data(tree) -> Dataset:
    g = tree["groups"]["data"]
    d = g["datasets"]
    paired = bool(g.get("attrs", {}).get("paired", False))
    return Dataset(d["X_train"], d["y_train"], d["X_test"], d.get("y_test"),
                   d.get("labels_test"), paired)


def _read_specs(tree):
    net = MLP(**_get_json(tree, "net"))
    train = GradientDescent(**_get_json(tree, "train"))
    return net, train, _read_data(tree) if "data" in tree["groups"] else None


def _read_status(meta) -> dict:
    """Files written before results carried ``status`` / ``message`` get them from
    ``converged`` (True where that is missing too)."""
    return {"converged": bool(meta.get("converged", True)), "status": meta.get("status"),
            "message": meta.get("message")}


def _build_solution(tree) -> Solution:
    d = tree["datasets"]
    net, train, data = _read_specs(tree)
    meta = _get_json(tree, "meta")
    sol = Solution(net=net, data=data, train=train, method=meta["method"], t=d["t"],
                   train_predictions=d["train_predictions"],
                   test_predictions=d["test_predictions"], ntk=d["ntk"], phi=d["phi"],
                   g=d["g"], A=d.get("A"), B=d.get("B"), **_read_status(meta),
                   iterations=meta["iterations"], residuals=d["residuals"],
                   stderr=_read_mapping(tree["groups"]["stderr"]), seed=meta["seed"],
                   elapsed=meta["elapsed"], options=_get_json(tree, "options"),
                   extras=_read_mapping(tree["groups"]["extras"]))
    _check_derived(tree, sol, "Solution")
    return sol


def _build_ensemble(tree) -> Ensemble:
    d = tree["datasets"]
    net, train, data = _read_specs(tree)
    meta = _get_json(tree, "meta")
    ens = Ensemble(net=net, data=data, train=train, width=meta["width"], seeds=d["seed"],
                   t=d["t"], train_predictions=d["train_predictions"],
                   test_predictions=d["test_predictions"], ntk=d["ntk"], phi=d.get("phi"),
                   g=d.get("g"), center=meta["center"], elapsed=meta["elapsed"],
                   **_read_status(meta),
                   options=_get_json(tree, "options"),
                   extras=_read_mapping(tree["groups"]["extras"]))
    _check_derived(tree, ens, "Ensemble")
    return ens


def _build_fluctuations(tree) -> Fluctuations:
    d = tree["datasets"]
    meta = _get_json(tree, "meta")
    return Fluctuations(solution=_build_solution(tree["groups"]["solution"]),
                        prediction_cov=d["prediction_cov"], ntk_var=d["ntk_var"],
                        center=meta["center"], method=meta["method"], **_read_status(meta),
                        stderr=_read_mapping(tree["groups"]["stderr"]),
                        elapsed=meta["elapsed"], options=_get_json(tree, "options"),
                        extras=_read_mapping(tree["groups"]["extras"]))
