"""The Monte Carlo engines' outputs in the layout of :class:`~dmft.results.Solution`
(``method="mc"`` / ``"gia"``, :mod:`dmft._mc`): the flat two-time kernels and responses as
(t, s, point, point) arrays, the output axes of a general objective, and the mean and standard
error of independent deep solutions (``replicates``)."""
from __future__ import annotations

import numpy as np

from solvers.layout import two_time as _two_time


def _deep_fields(out, T1, n):
    """The engines' flat kernels and responses in the Solution layout (two-time axes)."""
    tt = lambda key: (None if out[key] is None                          # noqa: E731
                      else _two_time(out[key], T1, n))
    return tt("phi"), tt("g"), tt("phi_se"), tt("g_se"), tt("A"), tt("B")


def _combine_replicates(reps):
    """Mean and standard error of the mean of independent deep solutions (``replicates``)."""
    if len(reps) == 1:
        return reps[0]
    R = len(reps)
    out = dict(reps[0])
    for key, se_key in (("f", "f_se"), ("ntk", "ntk_se"), ("phi", "phi_se"), ("g", "g_se"),
                        ("A", None), ("B", None)):
        if reps[0][key] is None:
            continue
        stack = np.stack([o[key] for o in reps])
        out[key] = stack.mean(axis=0)
        if se_key is not None:
            out[se_key] = stack.std(axis=0, ddof=1) / np.sqrt(R)
        del stack
    out["converged"] = all(o["converged"] for o in reps)
    out["replicate_iterations"] = [int(o["iterations"]) for o in reps]
    out["iterations"] = int(sum(out["replicate_iterations"]))
    for key in ("residuals", "floors"):
        out[key] = np.concatenate([o[key] for o in reps])
    out["stages"] = None
    return out

def _deep_objective_fields(out, T1, n, C, multi):
    """The one-pass engine's results for a general objective (docs/theory.rst §7) in the
    Solution layout: f (T1, n, C), ntk (T1, n, C, n, C), g two-time (L, T1, T1, n, C, n, C),
    squeezed to the single-output shapes when not ``multi`` (C = 1). Responses: A
    (L-1, T1 n, T1 n C) and B (L-1, T1 n C, T1 n) in two-time form for C = 1; None for
    C >= 2 (the results have no output-indexed response fields)."""
    def g2(K):
        L = K.shape[0]
        return np.ascontiguousarray(
            K.reshape(L, T1, n, C, T1, n, C).transpose(0, 1, 4, 2, 3, 5, 6))
    res = dict(out)
    res["g"], res["g_se"] = g2(out["g"]), g2(out["g_se"])
    if not multi:
        for k in ("g", "g_se"):
            res[k] = np.ascontiguousarray(res[k][..., 0, :, 0])
        for k in ("f", "f_se"):
            res[k] = np.ascontiguousarray(out[k][..., 0])
        for k in ("ntk", "ntk_se"):
            res[k] = np.ascontiguousarray(out[k][:, :, 0, :, 0])
    else:
        res["A"] = res["B"] = None
    phi = _two_time(out["phi"], T1, n)
    phi_se = _two_time(out["phi_se"], T1, n)
    A = None if res["A"] is None else _two_time(res["A"], T1, n)
    B = None if res["B"] is None else _two_time(res["B"], T1, n)
    return res, phi, res["g"], phi_se, res["g_se"], A, B

