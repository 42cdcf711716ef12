"""Full DMFT vs its approximations (static NTK, GIA, perturbative) vs simulated networks.

For a grid of (activation, depth) x gamma0 on one small data set, solves the infinite-width
dynamics with

- ``full``: the exact DMFT (``method="linear"`` for linear nets, ``"mc"`` otherwise),
- ``static``: frozen kernels (lazy / NTK limit),
- ``gia``: the gradient-independence approximation (Monte Carlo DMFT with A = B = 0),
- ``pert``: leading order in gamma0^2 (exact for linear nets; tanh / erf nets of any depth
  with Monte Carlo Gaussian expectations at t = 0; not available for relu),

and trains finite networks (``dmft.simulate(..., record_kernels=True)``) at two or more widths.
For each it records train/test loss curves, the final NTK's alignment with the target
y y^T (training points), the NTK movement |K(T) - K(0)| / |K(0)|, and the kernel alignment
A(Phi_T, Phi_N) = Tr(Phi_T Phi_N) / (|Phi_T| |Phi_N|) between each theory's last-layer kernel
Phi^L(T, T) (all points) and each simulated network's (averaged over seeds).

Data: ``--data teacher`` (default, no extra dependency: ``dmft.config.teacher_student``) or
``--data digits`` (two-class subset 0 vs 1 of scikit-learn's ``load_digits``, inputs centred
and scaled to |x|^2 = D, targets +-1).

Writes one HDF5 file (atomic) and PNG figures to ``--out``. Usage:
``python benchmarks/vs_static_ntk.py [--quick] [--data digits] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dmft  # noqa: E402
import dmft.config  # noqa: E402
from dmft.plotting import ntk_movement  # noqa: E402

METHODS = ("full", "static", "gia", "pert")


def digits_data(P: int, Q: int, seed: int = 0) -> dmft.Dataset:
    """Two-class (0 vs 1) subset of sklearn's digits, |x|^2 = D, y = +-1."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("--data digits needs scikit-learn (pip install -e '.[benchmarks]'); "
                         "use --data teacher") from exc
    X, y = load_digits(return_X_y=True)
    keep = (y == 0) | (y == 1)
    X, y = X[keep].astype(float), np.where(y[keep] == 0, 1.0, -1.0)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))[:P + Q]
    X, y = X[idx], y[idx]
    X = X - X.mean(axis=0)
    X *= np.sqrt(X.shape[1]) / np.linalg.norm(X, axis=1, keepdims=True)
    return dmft.Dataset(X[:P], y[:P], X[P:], y[P:])


def alignment(a: np.ndarray, b: np.ndarray) -> float:
    """A(a, b) = Tr(a b) / (|a|_F |b|_F) for symmetric matrices."""
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def target_alignment(K: np.ndarray, y: np.ndarray) -> float:
    """Kernel-target alignment y^T K y / (|K|_F |y|^2) on the training points."""
    return float(y @ K @ y / (np.linalg.norm(K) * (y @ y)))


def _solve(method, net, data, train, samples, seed, pert_samples=None):
    name = {"full": "linear" if net.linear else "mc", "static": "static", "gia": "gia",
            "pert": "perturbative"}[method]
    opts = {} if name in ("linear", "static") or (name == "perturbative" and net.linear) \
        else {"samples": samples}
    if name == "perturbative" and not net.linear and pert_samples is not None:
        opts = {"samples": pert_samples}
    try:
        return dmft.solve(net, data, train, method=name, seed=seed, **opts), ""
    except (dmft.results.ConvergenceError, ValueError) as exc:
        return None, str(exc).split(";")[0][:60]


def run(cases, gammas, widths, data, *, steps, lr, seeds, samples, seed=0, pert_samples=None):
    """Run the grid; return a list of row dicts (arrays included)."""
    P = data.P
    rows = []
    for act, depth in cases:
        net = dmft.MLP(depth=depth, activation=act)
        for g0 in gammas:
            train = dmft.GradientDescent(gamma0=g0, lr=lr, steps=steps)
            sims = {}
            for N in widths:
                t0 = time.perf_counter()
                ens = dmft.simulate(net, data, train, width=N, seeds=seeds,
                                    record_kernels=True, center=True)
                sims[N] = (ens, time.perf_counter() - t0)
            for method in METHODS + tuple(f"net{N}" for N in widths):
                t0 = time.perf_counter()
                if method.startswith("net"):
                    ens, el = sims[int(method[3:])]
                    f = ens.predictions.mean(axis=0)
                    ntk = ens.ntk.mean(axis=0)
                    phiT = None
                    note, el = f"{len(seeds)} seeds", el
                else:
                    sol, note = _solve(method, net, data, train, samples, seed, pert_samples)
                    el = time.perf_counter() - t0
                    if sol is None:
                        rows.append({"activation": act, "depth": depth, "gamma0": g0,
                                     "method": method, "note": note, "elapsed": el})
                        continue
                    f, ntk, phiT = sol.predictions, sol.ntk, sol.phi[-1, -1, -1]
                row = {"activation": act, "depth": depth, "gamma0": g0, "method": method,
                       "note": note, "elapsed": el, "predictions": f, "ntk": ntk,
                       "train_loss": 0.5 * np.sum((f[:, :P] - data.y_train) ** 2, axis=1),
                       "test_loss": 0.5 * np.sum((f[:, P:] - data.y_test) ** 2, axis=1),
                       "target_alignment": target_alignment(ntk[-1, :P, :P], data.y_train),
                       "movement": float(ntk_movement(ntk)[-1])}
                for N in widths:
                    ens = sims[N][0]
                    sim_phi = ens.phi[:, -1, -1, -1]          # (S, n, n): Phi^L(T, T)
                    if phiT is None:
                        continue
                    row[f"align_{N}"] = float(np.mean([alignment(phiT, k) for k in sim_phi]))
                    row[f"pred_err_{N}"] = float(np.abs(f - ens.predictions.mean(0)).max())
                rows.append(row)
    return rows


def print_table(rows, widths, file=None):
    head = (f"{'act':>6} {'L':>2} {'g0':>5} {'method':>7} {'train L':>9} {'test L':>9} "
            f"{'align y':>8} {'move':>7} " + " ".join(f"{'A@' + str(N):>8}" for N in widths)
            + " " + " ".join(f"{'|df|@' + str(N):>9}" for N in widths) + f" {'s':>6}  note")
    print(head, file=file)
    for r in rows:
        if "train_loss" not in r:
            print(f"{r['activation']:>6} {r['depth']:>2} {r['gamma0']:>5.2f} {r['method']:>7} "
                  f"{'-':>9} {'-':>9} {'-':>8} {'-':>7} " + " ".join(f"{'-':>8}" for _ in widths)
                  + " " + " ".join(f"{'-':>9}" for _ in widths)
                  + f" {r['elapsed']:6.1f}  {r['note']}", file=file)
            continue
        al = " ".join(f"{r[f'align_{N}']:8.5f}" if f"align_{N}" in r else f"{'-':>8}"
                      for N in widths)
        pe = " ".join(f"{r[f'pred_err_{N}']:9.2e}" if f"pred_err_{N}" in r else f"{'-':>9}"
                      for N in widths)
        print(f"{r['activation']:>6} {r['depth']:>2} {r['gamma0']:>5.2f} {r['method']:>7} "
              f"{r['train_loss'][-1]:9.2e} {r['test_loss'][-1]:9.2e} "
              f"{r['target_alignment']:8.4f} {r['movement']:7.4f} {al} {pe} "
              f"{r['elapsed']:6.1f}  {r['note']}", file=file)


def write_h5(path, rows, args_dict):
    """One HDF5 file, one group per row; atomic (temporary file, then rename)."""
    import h5py
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".h5.tmp", dir=d)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h:
            for k, v in args_dict.items():
                h.attrs[k] = str(v)
            h.attrs["dmft_version"] = dmft.__version__
            for i, r in enumerate(rows):
                g = h.create_group(f"row{i:03d}")
                for k, v in r.items():
                    if isinstance(v, np.ndarray):
                        g.create_dataset(k, data=v)
                    else:
                        g.attrs[k] = v
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def plot(rows, widths, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = sorted({(r["activation"], r["depth"]) for r in rows})
    paths = []
    for act, depth in cases:
        sub = [r for r in rows if (r["activation"], r["depth"]) == (act, depth)
               and "train_loss" in r]
        gammas = sorted({r["gamma0"] for r in sub})
        fig, ax = plt.subplots(1, 3, figsize=(14, 4))
        for i, g0 in enumerate(gammas):
            for r in sub:
                if r["gamma0"] != g0:
                    continue
                style = {"full": "-", "static": ":", "gia": "-.", "pert": "--"}.get(
                    r["method"], "")
                marker = "o" if r["method"].startswith("net") else None
                kw = dict(color=f"C{i}", ls=style or "none", marker=marker, ms=3, markevery=4)
                ax[0].semilogy(r["train_loss"], label=f"g0={g0} {r['method']}", **kw)
                ax[1].semilogy(r["test_loss"], **kw)
            for j, m in enumerate(METHODS):
                r = next((r for r in sub if r["gamma0"] == g0 and r["method"] == m), None)
                if r is not None and f"align_{widths[-1]}" in r:
                    ax[2].plot(widths, [r[f"align_{N}"] for N in widths],
                               color=f"C{i}", ls={"full": "-", "static": ":", "gia": "-.",
                                                   "pert": "--"}[m], marker="o",
                               label=f"g0={g0} {m}")
        ax[0].set(title=f"{act} L={depth}: train loss", xlabel="step")
        ax[1].set(title="test loss", xlabel="step")
        ax[2].set(title="A(Phi_theory, Phi_net) at T", xlabel="width", xscale="log")
        ax[0].legend(fontsize=6, ncol=2)
        ax[2].legend(fontsize=6)
        fig.tight_layout()
        p = os.path.join(outdir, f"vs_static_ntk_{act}_L{depth}.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small preset (about a minute)")
    ap.add_argument("--data", choices=("teacher", "digits"), default="teacher")
    ap.add_argument("--out", default="benchmark_out", help="output folder")
    ap.add_argument("--gammas", type=str, default=None, help="comma list of gamma0")
    ap.add_argument("--widths", type=str, default=None, help="comma list of widths")
    ap.add_argument("--cases", type=str, default=None,
                    help="comma list of activation:depth, e.g. tanh:1,linear:2")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=None, help="networks per width")
    ap.add_argument("--samples", type=int, default=None, help="Monte Carlo samples (mc, gia)")
    ap.add_argument("--pert-samples", type=int, default=None,
                    help="samples of the nonlinear perturbative method (default: --samples; its "
                         "cost grows like (P+Q)^3 T^2 per sample at depth >= 2)")
    ap.add_argument("--P", type=int, default=None)
    ap.add_argument("--Q", type=int, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        preset = dict(gammas="0.3,1.0", widths="128,512", cases="tanh:1,linear:2", steps=20,
                      seeds=4, samples=4096, P=6, Q=6)
    else:
        preset = dict(gammas="0.25,0.5,1", widths="256,1024",
                      cases="tanh:1,tanh:2,relu:1,linear:1,linear:2,linear:3", steps=40, seeds=8,
                      samples=32768, P=8, Q=8)
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    gammas = [float(x) for x in args.gammas.split(",")]
    widths = [int(x) for x in args.widths.split(",")]
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    if args.data == "digits":
        data = digits_data(args.P, args.Q)
    else:
        data = dmft.config.teacher_student(P=args.P, Q=args.Q, D=8, seed=0)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    rows = run(cases, gammas, widths, data, steps=args.steps, lr=args.lr,
               seeds=range(args.seeds), samples=args.samples, pert_samples=args.pert_samples)
    print(f"data={args.data} P={data.P} Q={data.Q} D={data.D} steps={args.steps} "
          f"lr={args.lr} seeds={args.seeds} samples={args.samples}")
    print_table(rows, widths)
    path = os.path.join(args.out, f"vs_static_ntk_{args.data}.h5")
    write_h5(path, rows, vars(args))
    figs = plot(rows, widths, args.out)
    print(f"wrote {path} and {len(figs)} figures in {time.perf_counter() - t0:.1f} s")
    return rows


if __name__ == "__main__":
    main()
