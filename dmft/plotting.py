"""Quick-look figures of results (matplotlib, no display needed).

Figures are built with the object-oriented API (:class:`matplotlib.figure.Figure`), never
through ``pyplot``, so they work without a display and do not change the user's backend.

- :func:`plot`: one result (a Solution, Ensemble, Fluctuations or the path of a saved one):
  losses, predictions, NTK entries against time t; ensembles as mean +- std bands over seeds;
  fluctuations add N * Var of predictions and NTK entries. Problems of docs/theory.rst §7:
  the loss panel names ``train.loss``; with C >= 2 outputs one line per (point, output)
  (at most ``points`` points and :data:`MAX_OUTPUTS` outputs); classification adds a row with
  the accuracy per split and, for C >= 2, the coupling of the outputs through the NTK.
- :func:`compare`: several results on shared axes (what ``dmft demo`` draws): train and test
  loss, relative NTK movement ||K(t) - K(0)||_F / ||K(0)||_F, and test predictions.
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from solvers.objective import error_signal

from .results import Ensemble, Fluctuations, Solution

__all__ = ["plot", "compare", "ntk_movement", "output_coupling", "MAX_OUTPUTS"]

#: with C >= 2 outputs, per-point panels draw at most this many outputs (c = 0 .. 2)
MAX_OUTPUTS = 3


def _as_result(result_or_path):
    if isinstance(result_or_path, (Solution, Ensemble, Fluctuations)):
        return result_or_path
    if isinstance(result_or_path, (str, os.PathLike)):
        from .io import load
        return load(result_or_path)
    raise ValueError(f"plot needs a Solution, Ensemble, Fluctuations or the path of a saved "
                     f"result, got {type(result_or_path).__name__}")


def _flat_ntk(ntk, multi_output):
    """(..., n, C, n, C) -> (..., n C, n C) over point-major (point, output) pairs."""
    ntk = np.asarray(ntk)
    if not multi_output:
        return ntk
    n, C = ntk.shape[-4], ntk.shape[-3]
    return ntk.reshape(ntk.shape[:-4] + (n * C, n * C))


def output_coupling(ntk: np.ndarray) -> np.ndarray:
    """Share of the C-output NTK between different outputs:
    ||K_{mu c, nu c'}, c != c'||_F / ||K||_F (docs/theory.rst §7).

    Zero at t = 0 (K_{mu c, nu c'}(0) = delta_{cc'} K0_{mu nu}: outputs decouple in the lazy
    limit); feature learning couples them.

    Parameters
    ----------
    ntk : array (..., T+1, n, C, n, C)

    Returns
    -------
    array (..., T+1)
    """
    ntk = np.asarray(ntk)
    C = ntk.shape[-1]
    off = 1.0 - np.eye(C)[:, None, :]          # (C, 1, C): broadcast over (c, nu, c')
    num = np.sqrt(np.sum((ntk * off) ** 2, axis=(-4, -3, -2, -1)))
    den = np.sqrt(np.sum(ntk ** 2, axis=(-4, -3, -2, -1)))
    return num / np.where(den > 0, den, 1.0)


def ntk_movement(ntk: np.ndarray, multi_output: bool = False) -> np.ndarray:
    """Relative kernel movement ||K(t) - K(0)||_F / ||K(0)||_F.

    Parameters
    ----------
    ntk : array (..., T+1, n, n)
        Equal-time NTK (leading axes, e.g. seeds, are kept). A C-output NTK
        (..., T+1, n, C, n, C) (docs/theory.rst §7) is read as the matrix over the n C
        (point, output) pairs: pass ``multi_output=True``.

    Returns
    -------
    array (..., T+1)
    """
    ntk = _flat_ntk(ntk, multi_output)
    k0 = ntk[..., :1, :, :]
    num = np.sqrt(np.sum((ntk - k0) ** 2, axis=(-2, -1)))
    den = np.sqrt(np.sum(k0 ** 2, axis=(-2, -1)))
    return num / den


def _band(ax, t, samples, label, color=None, **kw):
    """Mean line with a +- std band over the leading (seed) axis."""
    mean = samples.mean(axis=0)
    std = samples.std(axis=0, ddof=1) if samples.shape[0] > 1 else np.zeros_like(mean)
    line, = ax.plot(t, mean, label=label, color=color, **kw)
    ax.fill_between(t, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    return line


def _line(ax, t, y, err, label, color=None, **kw):
    line, = ax.plot(t, y, label=label, color=color, **kw)
    if err is not None:
        ax.fill_between(t, y - 2 * err, y + 2 * err, color=line.get_color(), alpha=0.2, lw=0)
    return line


def _loss_se(sol, split):
    """Delta-method standard error of a loss from the prediction standard errors:
    sqrt(sum_{mu c} (d loss / d f_{mu c} se_{mu c})^2) with d loss / d f = -Delta
    (:func:`solvers.objective.error_signal`; f - y for mse)."""
    se = sol.stderr.get(f"{split}_predictions")
    Y = sol.data.Y_train if split == "train" else sol.data.Y_test
    if se is None or Y is None:
        return None
    f = sol.train_predictions if split == "train" else sol.test_predictions
    C = sol.data.C
    f, se = np.asarray(f).reshape(f.shape[0], -1, C), np.asarray(se).reshape(f.shape[0], -1, C)
    return np.sqrt(np.sum((error_signal(sol.train.loss, f, Y, **sol.train.loss_params) * se) ** 2,
                          axis=(-2, -1)))


def _split_curves(ax, sol, t, ens, name, draw):
    """``train_<name>`` and ``test_<name>`` of ``sol`` (those not None) on ``ax``: an
    Ensemble's as mean +- std bands, else by ``draw(split, values, label)``."""
    for split in ("train", "test"):
        values = getattr(sol, f"{split}_{name}")
        if values is None:
            continue
        if ens:
            _band(ax, t, values, f"{split} {name}")
        else:
            draw(split, values, f"{split} {name}")


def _cross_correlation_panel(ax, sol, t, ens):
    from .representation import cross_correlation
    try:
        cc = cross_correlation(sol)
    except FloatingPointError:
        ax.text(0.5, 0.5, "cross-correlation undefined (collapsed embedding)",
                ha="center", va="center", transform=ax.transAxes)
        return
    C = cc.shape[-1]
    for i in range(min(C, MAX_OUTPUTS)):
        for j in range(min(C, MAX_OUTPUTS)):
            y = cc[..., i, j]
            lab = f"C[{i},{j}]"
            ls = "-" if i == j else ":"
            if ens:
                _band(ax, t, y, lab, ls=ls)
            else:
                ax.plot(t, y, ls=ls, label=lab)
    ax.set_xlabel("t")
    ax.set_ylabel("cross-correlation C_ij of the views")
    ax.legend(fontsize="small")


def _probe_panel(ax, sol, t, ens):
    from .representation import linear_probe
    acc = linear_probe(sol)
    if ens:
        _band(ax, t, acc, "linear probe")
    else:
        ax.plot(t, acc, label="linear probe")
    ax.set_xlabel("t")
    ax.set_ylabel("linear-probe accuracy (held-out test points)")
    ax.legend(fontsize="small")


def _title(result):
    net, train = result.net, result.train
    kind = type(result).__name__
    extra = f", N={result.width}, {result.n_seeds} seeds" if isinstance(result, Ensemble) else ""
    method = result.solution.method if isinstance(result, Fluctuations) else result.method
    return (f"{kind} ({method}): L={net.depth} {net.activation}, gamma0={train.gamma0:g}, "
            f"lr={train.lr:g}, P={result.data.P}, Q={result.data.Q}{extra}")


def _select(n, points):
    return list(range(min(n, points)))


def plot(result_or_path, path=None, *, points: int = 4, title: str | None = None) -> Figure:
    """Quick-look figure of one result.

    Parameters
    ----------
    result_or_path : Solution, Ensemble, Fluctuations, str or os.PathLike
        A result, or an HDF5 file written by :func:`dmft.save`.
    path : str or os.PathLike, optional
        Also write the figure there (format from the extension, e.g. ``.png``, ``.pdf``).
    points : int
        Draw predictions / NTK diagonal entries of at most this many train and test points.
    title : str, optional
        Figure title (default: a summary of the spec).

    Returns
    -------
    matplotlib.figure.Figure
        Panels: losses (the loss named by ``train.loss``), train predictions (dashed:
        targets), test predictions, NTK diagonal K_mu,mu(t), relative NTK movement and the
        feature kernels' diagonal; for Fluctuations also N * Var f_mu(t) and
        N * Var K_mu,mu(t). With C >= 2 outputs (docs/theory.rst §7) the per-point panels
        draw one line per (point, output) pair, c < :data:`MAX_OUTPUTS`, and the NTK entries
        K_{mu c, mu c}. Classification (``result.classifies``: a classification loss, or C >= 2
        outputs) adds a last row: the accuracy per split and, for C >= 2, the output coupling
        (:func:`output_coupling`). Barlow Twins: the second panel draws the views'
        cross-correlation C_ij(t) (:func:`dmft.cross_correlation`) and the third, with labelled
        test points, the linear-probe accuracy (:func:`dmft.linear_probe`).
    """
    result = _as_result(result_or_path)
    sol = result.solution if isinstance(result, Fluctuations) else result
    ens = isinstance(sol, Ensemble)
    fluct = isinstance(result, Fluctuations)
    classifies = bool(getattr(sol, "classifies", False))
    multi = bool(getattr(sol.data, "multi_output", False))
    nrows = 2 + fluct + classifies
    fig = Figure(figsize=(11, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, 3)
    t = np.asarray(sol.t)
    P, Q = sol.data.P, sol.data.Q
    outs = list(range(min(sol.data.C, MAX_OUTPUTS))) if multi else [None]

    def pair(i, c):
        """Label and index suffix of point i, output c (c None: one output)."""
        return ("", ()) if c is None else (f", c={c}", (c,))

    ax = axes[0, 0]
    _split_curves(ax, sol, t, ens, "loss",
                  lambda split, v, label: _line(ax, t, v, _loss_se(sol, split), label))
    ax.set_yscale("log")
    ax.set_xlabel("t")
    loss_name = getattr(sol.train, "loss", "mse")
    named = "loss" if loss_name == "mse" else f"{loss_name} loss"
    ax.set_ylabel(f"{named} (sum over points" + (" and outputs)" if multi else ")"))
    ax.legend()

    panels = [(axes[0, 1], "train", P, sol.data.y_train),
              (axes[0, 2], "test", Q, sol.data.y_test)]
    if loss_name == "barlow_twins":
        # docs/theory.rst §7: the views' cross-correlation, and the linear probe if labelled
        _cross_correlation_panel(axes[0, 1], sol, t, ens)
        panels = panels[1:]
        if getattr(sol.data, "labels_test", None) is not None and Q >= 4:
            _probe_panel(axes[0, 2], sol, t, ens)
            panels = []
    for ax, split, n_pts, targets in panels:
        f = getattr(sol, f"{split}_predictions")
        se = None if ens else sol.stderr.get(f"{split}_predictions")
        for i in _select(n_pts, points):
            for c in outs:
                lab, oc = pair(i, c)
                ix = (i,) + oc
                if ens:
                    line = _band(ax, t, f[(slice(None), slice(None)) + ix],
                                 f"{split} {i}{lab}")
                else:
                    line = _line(ax, t, f[(slice(None),) + ix],
                                 None if se is None else se[(slice(None),) + ix],
                                 f"{split} {i}{lab}")
                if targets is not None:
                    ax.axhline(targets[ix], color=line.get_color(), ls="--", lw=0.8)
        ax.set_xlabel("t")
        ax.set_ylabel(f"f on {split} points" + (" (per output c)" if multi else ""))
        if n_pts == 0:
            ax.text(0.5, 0.5, f"no {split} points", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            ax.legend(fontsize="small")

    ax = axes[1, 0]
    idx = _select(P, points) + [P + i for i in _select(Q, points)]
    for mu in idx:
        for c in outs:
            lab, oc = pair(mu, c)
            ix = (mu,) + oc + (mu,) + oc
            name = f"K[{mu},{mu}]" if c is None else f"K[{mu}.{c},{mu}.{c}]"
            lab = name + (" (test)" if mu >= P else "")
            if ens:
                _band(ax, t, sol.ntk[(slice(None), slice(None)) + ix], lab)
            else:
                se = sol.stderr.get("ntk")
                _line(ax, t, sol.ntk[(slice(None),) + ix],
                      None if se is None else se[(slice(None),) + ix], lab)
    ax.set_xlabel("t")
    ax.set_ylabel("NTK diagonal" + (" K_{mu c, mu c}" if multi else ""))
    ax.legend(fontsize="small")

    ax = axes[1, 1]
    if ens:
        _band(ax, t, ntk_movement(sol.ntk, multi), "ensemble")
    else:
        ax.plot(t, ntk_movement(sol.ntk, multi), label=sol.method)
    ax.set_xlabel("t")
    ax.set_ylabel("||K(t) - K(0)|| / ||K(0)||")

    ax = axes[1, 2]
    if sol.phi is not None and np.all(np.isfinite(sol.phi)) and sol.phi.ndim >= 5:
        phi = sol.phi.mean(axis=0) if ens else sol.phi  # (L, T+1, T+1, n, n)
        for l in range(phi.shape[0]):
            diag = np.einsum("ttmm->tm", phi[l])[:, :P].mean(axis=1)
            ax.plot(t, diag, label=f"layer {l + 1}")
        ax.set_ylabel("mean Phi^l_mu,mu(t, t) (train)")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no two-time kernels recorded", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_xlabel("t")

    if fluct:
        ax = axes[2, 0]
        cov = result.prediction_cov
        for mu in idx:
            for c in outs:
                lab, oc = pair(mu, c)
                ax.plot(t, cov[(slice(None),) + (mu,) + oc + (mu,) + oc],
                        label=f"point {mu}{lab}" + (" (test)" if mu >= P else ""))
        ax.set_xlabel("t")
        ax.set_ylabel("N Var f_mu(t)" if not multi else "N Var f_mu,c(t)")
        ax.legend(fontsize="small")
        ax = axes[2, 1]
        for mu in idx:
            for c in outs:
                lab, oc = pair(mu, c)
                ax.plot(t, result.ntk_var[(slice(None),) + (mu,) + oc + (mu,) + oc],
                        label=(f"K[{mu},{mu}]" if c is None else f"K[{mu}.{c},{mu}.{c}]"))
        ax.set_xlabel("t")
        ax.set_ylabel("N Var K_mu,mu(t)")
        ax.legend(fontsize="small")
        axes[2, 2].axis("off")

    if classifies:
        row = axes[-1]
        ax = row[0]
        _split_curves(ax, sol, t, ens, "accuracy",
                      lambda split, v, label: ax.plot(t, v, label=label))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("t")
        ax.set_ylabel("accuracy (argmax over outputs)" if multi else "accuracy (sign)")
        ax.legend(fontsize="small")
        ax = row[1]
        if multi:
            if ens:
                _band(ax, t, output_coupling(sol.ntk), "ensemble")
            else:
                ax.plot(t, output_coupling(sol.ntk), label=sol.method)
            ax.set_xlabel("t")
            ax.set_ylabel("||K_{c != c'}|| / ||K|| (output coupling)")
        else:
            ax.set_axis_off()
        row[2].set_axis_off()

    fig.suptitle(title if title is not None else _title(result))
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


def compare(results: dict, path=None, *, title: str | None = None, point: int = 0) -> Figure:
    """Several results of the same task on shared axes.

    Parameters
    ----------
    results : dict label -> Solution or Ensemble
        Solutions are lines (with a +-2 stderr band where Monte Carlo errors are known);
        ensembles are seed means with +-1 std bands over seeds.
    path : str or os.PathLike, optional
        Also write the figure there.
    point : int
        Which test point (or train point when there is no test set) the prediction panel shows.

    Returns
    -------
    matplotlib.figure.Figure
        Four panels against t: train loss, test loss, relative NTK movement, one prediction.
    """
    if not results:
        raise ValueError("compare needs at least one result")
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    first = next(iter(results.values()))
    has_test = first.data.Q > 0
    for label, res in results.items():
        if isinstance(res, Fluctuations):
            res = res.solution
        t = np.asarray(res.t)
        ens = isinstance(res, Ensemble)
        for ax, split in ((axes[0, 0], "train"), (axes[0, 1], "test")):
            loss = res.train_loss if split == "train" else res.test_loss
            if loss is None:
                continue
            if ens:
                _band(ax, t, loss, label)
            else:
                _line(ax, t, loss, _loss_se(res, split), label)
        multi = bool(getattr(res.data, "multi_output", False))
        mv = ntk_movement(res.ntk, multi)
        if ens:
            _band(axes[1, 0], t, mv, label)
        else:
            axes[1, 0].plot(t, mv, label=label)
        split = "test" if has_test else "train"
        f = getattr(res, f"{split}_predictions")
        ix = (point, 0) if multi else (point,)     # C >= 2 outputs: output c = 0
        if ens:
            _band(axes[1, 1], t, f[(slice(None), slice(None)) + ix], label)
        else:
            se = res.stderr.get(f"{split}_predictions")
            _line(axes[1, 1], t, f[(slice(None),) + ix],
                  None if se is None else se[(slice(None),) + ix], label)
    y = first.data.y_test if has_test else first.data.y_train
    first_multi = bool(getattr(first.data, "multi_output", False))
    if y is not None:
        axes[1, 1].axhline(y[(point, 0) if first_multi else point], color="k", ls="--",
                           lw=0.8, label="target")
    loss_name = getattr(first.train, "loss", "mse")
    named = "" if loss_name == "mse" else f" ({loss_name})"
    for ax, ylabel in ((axes[0, 0], f"train loss{named}"),
                       (axes[0, 1], f"test loss{named}"),
                       (axes[1, 0], "||K(t) - K(0)|| / ||K(0)||"),
                       (axes[1, 1], f"f on {'test' if has_test else 'train'} point {point}"
                                    + (", output 0" if first_multi else ""))):
        ax.set_xlabel("t")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(fontsize="small")
    axes[0, 0].set_yscale("log")
    if axes[0, 1].lines:
        axes[0, 1].set_yscale("log")
    fig.suptitle(title if title is not None else _title(first))
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig
