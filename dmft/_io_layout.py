"""The layout of a result file (:mod:`dmft.io`): the named dimensions of every array (HDF5
dimension scales, netCDF4-compatible), their coordinate values and the descriptions written as
``long_name`` attributes."""
from __future__ import annotations

import numpy as np

from .results import DIMS, dims

#: extra named dimensions of arrays that are not Solution fields
_EXTRA_DIMS = {
    "X_train": ("train_point", "input_dim"),
    "y_train": ("train_point",),
    "X_test": ("test_point", "input_dim"),
    "y_test": ("test_point",),
    "labels_test": ("test_point",),
    "output_offset": ("point", "output"),
    "f0": ("point",),
    "f_std": ("t", "point"),
    "predictions": ("t", "point"),
}
#: ... and with C >= 2 outputs (an output axis after the point axis)
_EXTRA_DIMS_OUTPUTS = {
    "y_train": ("train_point", "output"),
    "y_test": ("test_point", "output"),
    "labels_test": ("test_point",),
    "output_offset": ("point", "output"),
    "f0": ("point", "output"),
    "f_std": ("t", "point", "output"),
    "predictions": ("t", "point", "output"),
}

_DESCRIPTIONS = {
    "t": "time k * lr",
    "s": "second time argument of two-time kernels (same grid as t)",
    "layer": "hidden layer l = 1 .. L",
    "response_layer": "layer l = 1 .. L-1 of the responses A^l, B^l",
    "point": "kernel index over train then test points",
    "point_": "second kernel index over train then test points",
    "train_point": "training point (kernel index)",
    "test_point": "test point (kernel index, after the P training points)",
    "iteration": "solver iteration",
    "seed": "random seed of each network",
    "input_dim": "input coordinate",
    "output": "network output c = 0 .. C-1",
    "output_": "second network output index c' = 0 .. C-1",
    "train_loss": "training loss (train.loss) summed over training points and outputs "
                  "(derived copy; dmft.load recomputes it)",
    "test_loss": "test loss (train.loss) summed over test points and outputs (derived copy)",
    "train_accuracy": "fraction of training points classified right (derived copy)",
    "test_accuracy": "fraction of test points classified right (derived copy)",
    "train_predictions": "network output f on training points",
    "test_predictions": "network output f on test points",
    "ntk": "equal-time neural tangent kernel K(t)",
    "phi": "feature kernel Phi^l(t, s)",
    "g": "gradient kernel G^l(t, s)",
    "A": "response A^l(t, s)",
    "B": "response B^l(t, s)",
    "residuals": "residual of each solver iteration",
    "prediction_cov": "N * Cov[f_mu(t), f_nu(t)] as N -> infinity",
    "ntk_var": "N * Var[K_mu,nu(t)] as N -> infinity",
}


def _dims_for(key, arr, lead=(), multi_output=False):
    """Named dimensions for an array stored under ``key`` (None when unknown); with
    ``multi_output`` (C >= 2 outputs) those of :data:`dmft.results.DIMS_OUTPUTS`.

    :meth:`_Scales.attach` leaves the array without scales when they do not fit its shape.
    """
    if key in DIMS:
        names = dims(key, multi_output)
    elif multi_output and key in _EXTRA_DIMS_OUTPUTS:
        names = _EXTRA_DIMS_OUTPUTS[key]
    else:
        names = _EXTRA_DIMS.get(key)
    if names is None:
        return None
    return tuple(lead) + tuple(names)



def _coords(result, times, lead_seeds=None):
    data, net = result.data, result.net
    P, Q, n, L = data.P, data.Q, data.P + data.Q, net.depth
    coords = {"t": times, "s": times, "layer": np.arange(1, L + 1),
              "response_layer": np.arange(1, L), "point": np.arange(n),
              "point_": np.arange(n), "train_point": np.arange(P),
              "test_point": np.arange(P, P + Q), "input_dim": np.arange(data.D)}
    if _multi(data):
        coords["output"] = coords["output_"] = np.arange(data.C)
    if lead_seeds is not None:
        coords["seed"] = lead_seeds
    return coords


def _multi(data) -> bool:
    """Whether results of ``data`` carry output axes (C >= 2 outputs, docs/theory.rst §7)."""
    return bool(getattr(data, "multi_output", False))

