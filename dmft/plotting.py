"""Quick-look figures of results (matplotlib, no display needed).

Figures are built with the object-oriented API (:class:`matplotlib.figure.Figure`), never
through ``pyplot``, so they work without a display and do not change the user's backend.

- :func:`plot`: one result (a Solution, Ensemble, Fluctuations or the path of a saved one):
  losses, predictions, NTK entries against time t; ensembles as mean +- std bands over seeds;
  fluctuations add N * Var of predictions and NTK entries.
- :func:`compare`: several results on shared axes (what ``dmft demo`` draws): train and test
  loss, relative NTK movement ||K(t) - K(0)||_F / ||K(0)||_F, and test predictions.
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from .results import Ensemble, Fluctuations, Solution

__all__ = ["plot", "compare", "ntk_movement"]


def _as_result(result_or_path):
    if isinstance(result_or_path, (Solution, Ensemble, Fluctuations)):
        return result_or_path
    if isinstance(result_or_path, (str, os.PathLike)):
        from .io import load
        return load(result_or_path)
    raise ValueError(f"plot needs a Solution, Ensemble, Fluctuations or the path of a saved "
                     f"result, got {type(result_or_path).__name__}")


def ntk_movement(ntk: np.ndarray) -> np.ndarray:
    """Relative kernel movement ||K(t) - K(0)||_F / ||K(0)||_F.

    Parameters
    ----------
    ntk : array (..., T+1, n, n)
        Equal-time NTK (leading axes, e.g. seeds, are kept).

    Returns
    -------
    array (..., T+1)
    """
    ntk = np.asarray(ntk)
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
    """Delta-method standard error of a loss from the prediction standard errors."""
    se = sol.stderr.get(f"{split}_predictions")
    y = sol.data.y_train if split == "train" else sol.data.y_test
    if se is None or y is None:
        return None
    f = sol.train_predictions if split == "train" else sol.test_predictions
    return np.sqrt(np.sum(((f - y) * se) ** 2, axis=-1))


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
        Panels: losses, train predictions (dashed: targets), test predictions, NTK diagonal
        K_mu,mu(t) and relative NTK movement; for Fluctuations also N * Var f_mu(t) and
        N * Var K_mu,mu(t).
    """
    result = _as_result(result_or_path)
    sol = result.solution if isinstance(result, Fluctuations) else result
    ens = isinstance(sol, Ensemble)
    nrows = 3 if isinstance(result, Fluctuations) else 2
    fig = Figure(figsize=(11, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, 3)
    t = np.asarray(sol.t)
    P, Q = sol.data.P, sol.data.Q

    ax = axes[0, 0]
    for split in ("train", "test"):
        loss = sol.train_loss if split == "train" else sol.test_loss
        if loss is None:
            continue
        if ens:
            _band(ax, t, loss, f"{split} loss")
        else:
            _line(ax, t, loss, _loss_se(sol, split), f"{split} loss")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("loss (sum over points)")
    ax.legend()

    for ax, split, n_pts, targets in ((axes[0, 1], "train", P, sol.data.y_train),
                                      (axes[0, 2], "test", Q, sol.data.y_test)):
        f = getattr(sol, f"{split}_predictions")
        se = None if ens else sol.stderr.get(f"{split}_predictions")
        for i in _select(n_pts, points):
            if ens:
                line = _band(ax, t, f[:, :, i], f"{split} {i}")
            else:
                line = _line(ax, t, f[:, i], None if se is None else se[:, i], f"{split} {i}")
            if targets is not None:
                ax.axhline(targets[i], color=line.get_color(), ls="--", lw=0.8)
        ax.set_xlabel("t")
        ax.set_ylabel(f"f on {split} points")
        if n_pts == 0:
            ax.text(0.5, 0.5, f"no {split} points", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            ax.legend(fontsize="small")

    ax = axes[1, 0]
    idx = _select(P, points) + [P + i for i in _select(Q, points)]
    for mu in idx:
        lab = f"K[{mu},{mu}]" + (" (test)" if mu >= P else "")
        if ens:
            _band(ax, t, sol.ntk[:, :, mu, mu], lab)
        else:
            se = sol.stderr.get("ntk")
            _line(ax, t, sol.ntk[:, mu, mu], None if se is None else se[:, mu, mu], lab)
    ax.set_xlabel("t")
    ax.set_ylabel("NTK diagonal")
    ax.legend(fontsize="small")

    ax = axes[1, 1]
    if ens:
        _band(ax, t, ntk_movement(sol.ntk), "ensemble")
    else:
        ax.plot(t, ntk_movement(sol.ntk), label=sol.method)
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

    if isinstance(result, Fluctuations):
        ax = axes[2, 0]
        cov = result.prediction_cov
        for mu in idx:
            ax.plot(t, cov[:, mu, mu], label=f"point {mu}" + (" (test)" if mu >= P else ""))
        ax.set_xlabel("t")
        ax.set_ylabel("N Var f_mu(t)")
        ax.legend(fontsize="small")
        ax = axes[2, 1]
        for mu in idx:
            ax.plot(t, result.ntk_var[:, mu, mu], label=f"K[{mu},{mu}]")
        ax.set_xlabel("t")
        ax.set_ylabel("N Var K_mu,mu(t)")
        ax.legend(fontsize="small")
        axes[2, 2].axis("off")

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
        mv = ntk_movement(res.ntk)
        if ens:
            _band(axes[1, 0], t, mv, label)
        else:
            axes[1, 0].plot(t, mv, label=label)
        split = "test" if has_test else "train"
        f = getattr(res, f"{split}_predictions")
        if ens:
            _band(axes[1, 1], t, f[:, :, point], label)
        else:
            se = res.stderr.get(f"{split}_predictions")
            _line(axes[1, 1], t, f[:, point], None if se is None else se[:, point], label)
    y = first.data.y_test if has_test else first.data.y_train
    if y is not None:
        axes[1, 1].axhline(y[point], color="k", ls="--", lw=0.8, label="target")
    for ax, ylabel in ((axes[0, 0], "train loss"), (axes[0, 1], "test loss"),
                       (axes[1, 0], "||K(t) - K(0)|| / ||K(0)||"),
                       (axes[1, 1], f"f on {'test' if has_test else 'train'} point {point}")):
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
