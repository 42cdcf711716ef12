"""Barlow Twins at infinite width, lazy and rich (issue 17; docs/theory.rst §7).

Data: the scikit-learn 8 x 8 digits (classes 0, 1, 2 by default), M samples, each row scaled
to unit mean square; two views per sample from ``dmft.augment.shift(1)`` (one-pixel shifts)
with ``Dataset.augmented(..., seed=0)``; C-dimensional embeddings; loss ``barlow_twins``
(off-diagonal weight 1, batch standardisation on). Every network is centred
(``center=True``) and every run uses ``output_offset="nngp"`` (offset_seed 0): the loss
acts on f + f0 with the same fixed NNGP draw f0 in every method and network, so all start
at the same O(1) output (the package's convention for the O(1) initial output).

Three parts, one table each:

(a) ``the NTK-constancy theorem`` (arXiv 2411.11176): two-layer tanh and relu networks in the NTK parameterisation
    (``dmft.simulate(..., parameterization="ntk")``, gamma0 = 1/sqrt(N)) of widths
    128 ... 8192, several seeds. Per width: sup_t ||K(t) - K(0)||_F / ||K(0)||_F over the
    training views (:func:`dmft.ntk_change`), sup_t ||K(t) - K_static||_F / ||K_static||_F
    and sup_{t, view, output} |f_N - f_static| against kernelized Barlow Twins
    (``method="static"``, the same train), mean +- standard error over the networks; fitted
    slope of log(mean) vs log N (weighted least squares with the standard errors of the
    logs), goal -0.5 +- 0.1. Measured: -0.5 for the last two; the NTK's own change falls
    faster (1/N for tanh, ~N^-3/4 for relu), inside the theorem's O(N^-1/2) bound.

(b) ``rich regime``: the DMFT (``method="mc"``, gamma0 = 1, tanh, depth L = 1 and 2) vs muP
    networks of growing width extrapolated to N = infinity entry by entry
    (:func:`solvers.stats.fit_inverse_width`, means_j(N) = b0_j + b1_j / N). Columns:
    max over (t, i, j) of |C_ij^DMFT - C_ij^inf| of the cross-correlation (goal 0.01), its
    error bar (the extrapolation's standard error and the Monte Carlo error, from two
    independent mc runs, in quadrature, at the worst entry), the largest |difference| /
    error bar, the largest difference at the last step, and max_t ||K^DMFT(t) - K^inf(t)||_F
    / ||K^inf(t)||_F over the training views (goal 2 %) with its error bar.

(c) ``does feature learning help?``: linear-probe accuracy (:func:`dmft.linear_probe`:
    ridge regression on the embeddings of the first half of Q labelled held-out digits,
    accuracy on the other half) vs gamma0 in {0 (static), 0.25, 0.5, 1, 2, 3}, one table per
    embedding dimension C in ``--dims-c`` (3 and 4): the DMFT (mc, L = 1; only for C in
    ``--mc-dims``, its memory grows as C^2) beside muP networks (width ~1024, several seeds), with the final BT loss, the
    NTK's change sup_t ||K(t) - K(0)|| / ||K(0)||, and the cross-correlation's off-diagonal
    mass sum_{i != j} C_ij^2 at the last step. Baselines: the probe on the raw pixels, on the
    NNGP offset f0 alone (t = 0). Column ``@eq loss``: the probe at the first step (``step``)
    where the run's BT loss reaches the static solution's final loss, to separate "more
    training" from "feature learning" (at a fixed number of steps the rich runs reach a lower
    loss).

Usage: ``python benchmarks/barlow_twins.py [--quick] [--parts a b c] [--out FILE.json]``.
Writes nothing unless ``--out`` is given (atomically).
The measured tables and what they answer: benchmarks/README.md, section "barlow_twins.py".
"""
from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import numpy as np

import dmft
from dmft._atomic import replace_atomically
from solvers.stats import fit_inverse_width


# --- data ------------------------------------------------------------------------------------
def digits_views(per_class, q_per_class, C, classes=(0, 1, 2), seed=0, max_shift=1):
    """Self-supervised digits: ``per_class`` training samples and ``q_per_class`` labelled
    probe points per class (drawn without overlap with ``numpy.random.default_rng(seed)``;
    probe points shuffled so that both halves of the probe hold every class), rows scaled to
    unit mean square, two views by ``dmft.augment.shift(max_shift)`` with the same seed."""
    from sklearn.datasets import load_digits
    d = load_digits()
    X, y = d.data / 16.0, d.target
    rng = np.random.default_rng(seed)
    tr, te, lab = [], [], []
    for k, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        tr.append(idx[:per_class])
        te.append(idx[per_class:per_class + q_per_class])
        lab += [k] * q_per_class
    tr, te, lab = np.concatenate(tr), np.concatenate(te), np.array(lab, dtype=int)
    perm = rng.permutation(te.size)
    te, lab = te[perm], lab[perm]

    def scale(A):
        return A / np.sqrt(np.mean(A ** 2, axis=1, keepdims=True))
    X_test = scale(X[te]) if q_per_class else None
    return dmft.Dataset.augmented(scale(X[tr]), dmft.augment.shift(max_shift), dim=C,
                                  seed=seed, X_test=X_test,
                                  labels_test=lab if q_per_class else None)


def bt_train(gamma0, lr, steps):
    return dmft.GradientDescent(gamma0=gamma0, lr=lr, steps=steps, loss="barlow_twins",
                                output_offset="nngp", offset_seed=0)


# --- statistics ------------------------------------------------------------------------------
def mean_se(x):
    """Mean and standard error over the first axis."""
    x = np.asarray(x, dtype=float)
    return x.mean(0), (x.std(0, ddof=1) / np.sqrt(x.shape[0]) if x.shape[0] > 1
                       else np.full(x.shape[1:], np.nan))


def loglog_slope(widths, means, ses):
    """Weighted least-squares slope of log(mean) vs log(N) with weights 1 / se(log)^2,
    se(log) = se / mean; returns (slope, its standard error)."""
    x = np.log(np.asarray(widths, dtype=float))
    y = np.log(np.asarray(means, dtype=float))
    w = (np.asarray(means) / np.asarray(ses)) ** 2
    X = np.stack([np.ones_like(x), x], axis=1)
    cov = np.linalg.inv(X.T @ (w[:, None] * X))
    beta = cov @ (X.T @ (w * y))
    return float(beta[1]), float(np.sqrt(cov[1, 1]))


def extrapolate(widths, means, ses):
    """N = infinity intercept and its standard error of :func:`fit_inverse_width`, entry by
    entry; entries without spread over the networks (se = 0 at every width, e.g. the
    cross-correlation at t = 0, where every centred network starts at the same offset f0)
    are exact: their common value, with error 0."""
    means, ses = np.asarray(means, dtype=float), np.asarray(ses, dtype=float)
    b0, se0 = means[-1].copy(), np.zeros(means.shape[1])
    ok = np.all(ses > 0, axis=0)
    if ok.any():
        fit = fit_inverse_width(widths, means[:, ok], ses[:, ok])
        b0[ok], se0[ok] = fit[0], fit[1]
    return b0, se0


def off_diagonal_mass(cc):
    """sum_{i != j} C_ij^2 over the last two axes."""
    C = cc.shape[-1]
    mask = ~np.eye(C, dtype=bool)
    return np.sum(cc[..., mask] ** 2, axis=-1)


def probe_raw(data, ridge=1e-3):
    """The linear probe (the same code, :func:`dmft.linear_probe`) on the raw inputs."""
    fake = SimpleNamespace(data=SimpleNamespace(labels_test=data.labels_test,
                                                multi_output=True),
                           test_predictions=np.asarray(data.X_test)[None])
    return float(dmft.linear_probe(fake, ridge=ridge)[0])


def log(msg):
    print(msg, flush=True)


# --- (a) the NTK-constancy theorem (arXiv 2411.11176) ------------------------------------------------------------------
def part_a(args):
    widths = args.widths_a
    data = digits_views(args.per_class_a, 0, args.C)
    train = bt_train(1.0, args.lr, args.steps_a)
    out = {}
    log(f"\n(a) NTK parameterisation (gamma0 = 1/sqrt(N)), two-layer, centred + NNGP offset; "
        f"M = {data.M} digits x 2 views, C = {data.C}, lr = {args.lr}, {args.steps_a} steps, "
        f"{args.seeds_a} seeds; static = kernelized BT (method='static')")
    for act in ("tanh", "relu"):
        net = dmft.MLP(depth=1, activation=act)
        static = dmft.solve(net, data, train, method="static")
        f_st = dmft.representation.embeddings(static, "train")
        K_st = np.asarray(static.ntk)[0].ravel()
        rows = []
        log(f"  {act}: static BT loss {static.train_loss[0]:.3f} -> {static.train_loss[-1]:.3f}")
        log(f"  {'N':>6} {'sup_t dK/K':>11} {'+-se':>8} {'|K-K_st|/K':>11} {'+-se':>8} "
            f"{'sup|f_N-f_st|':>14} {'+-se':>8} {'time s':>7}")
        for N in widths:
            t0 = time.perf_counter()
            ens = dmft.simulate(net, data, train, width=N, seeds=range(args.seeds_a),
                                center=True, parameterization="ntk")
            dk = dmft.ntk_change(ens).max(axis=-1)
            K = np.asarray(ens.ntk).reshape(len(ens.ntk), train.steps + 1, -1)
            ds = (np.linalg.norm(K - K_st, axis=-1) / np.linalg.norm(K_st)).max(axis=-1)
            df = np.abs(dmft.representation.embeddings(ens, "train") - f_st[None])
            df = df.reshape(df.shape[0], -1).max(axis=1)
            (mk, sk), (mf, sf), (ms, ss) = mean_se(dk), mean_se(df), mean_se(ds)
            dt = time.perf_counter() - t0
            rows.append(dict(N=int(N), dK=float(mk), dK_se=float(sk), dS=float(ms),
                             dS_se=float(ss), df=float(mf), df_se=float(sf), time_s=dt))
            log(f"  {N:>6} {mk:>11.4e} {sk:>8.1e} {ms:>11.4e} {ss:>8.1e} {mf:>14.4e} "
                f"{sf:>8.1e} {dt:>7.1f}")
        ws = [r["N"] for r in rows]
        sk = loglog_slope(ws, [r["dK"] for r in rows], [r["dK_se"] for r in rows])
        sf = loglog_slope(ws, [r["df"] for r in rows], [r["df_se"] for r in rows])
        ss = loglog_slope(ws, [r["dS"] for r in rows], [r["dS_se"] for r in rows])
        log(f"  slopes: NTK change {sk[0]:+.3f} +- {sk[1]:.3f}; NTK vs static {ss[0]:+.3f} +- "
            f"{ss[1]:.3f}; |f_N - f_static| {sf[0]:+.3f} +- {sf[1]:.3f}")
        out[act] = dict(rows=rows, slope_dK=sk, slope_dS=ss, slope_df=sf,
                        static_loss=[float(static.train_loss[0]),
                                     float(static.train_loss[-1])])
    return out


# --- (b) rich regime: DMFT vs extrapolated networks ------------------------------------------
def part_b(args):
    data = digits_views(args.per_class_b, 0, args.C)
    train = bt_train(1.0, args.lr_b, args.steps_b)
    out = {}
    log(f"\n(b) rich regime, gamma0 = 1, tanh, muP centred networks + NNGP offset, "
        f"M = {data.M} digits x 2 views, C = {data.C}, lr = {args.lr_b}, {args.steps_b} steps; "
        f"widths {args.widths_b} (L = 2: {args.widths_b2}) x {args.seeds_b} seeds extrapolated in 1/N; mc "
        f"{args.samples_b} samples x 2 runs")
    log(f"  {'L':>2} {'max|C_mc-C_inf|':>16} {'+-err':>8} {'at t':>4} {'max z':>6} "
        f"{'at t=T':>9} {'NTK rel diff':>13} "
        f"{'+-err':>8} {'at t':>4} {'NTK rel T':>10} {'loss mc':>8} {'loss inf':>8} {'mc s':>6} {'nets s':>7}")
    for L in args.depths_b:
        net = dmft.MLP(depth=L, activation="tanh")
        t0 = time.perf_counter()
        sols = [dmft.solve(net, data, train, method="mc", samples=args.samples_b[L - 1],
                           seed=s) for s in (0, 1)]
        t_mc = time.perf_counter() - t0
        cc_mc = np.mean([dmft.cross_correlation(s) for s in sols], axis=0)
        cc_mc_se = np.abs(dmft.cross_correlation(sols[0]) - dmft.cross_correlation(sols[1])) / 2
        K_mcs = [np.asarray(s.ntk)[:, :data.P, :, :data.P, :] for s in sols]
        K_mc, K_mc_se = np.mean(K_mcs, axis=0), np.abs(K_mcs[0] - K_mcs[1]) / 2
        t0 = time.perf_counter()
        cc_m, cc_s, K_m, K_s, loss_m, loss_s = [], [], [], [], [], []
        widths = args.widths_b if L == 1 else args.widths_b2
        for N in widths:
            ens = dmft.simulate(net, data, train, width=N, seeds=range(args.seeds_b),
                                center=True)
            m, s = mean_se(dmft.cross_correlation(ens))
            cc_m.append(m.ravel())
            cc_s.append(s.ravel())
            K = np.asarray(ens.ntk)[:, :, :data.P, :, :data.P, :]
            m, s = mean_se(K)
            K_m.append(m.ravel())
            K_s.append(s.ravel())
            m, s = mean_se(ens.train_loss)
            loss_m.append(m)
            loss_s.append(s)
        t_net = time.perf_counter() - t0
        cc_inf, cc_inf_se = extrapolate(widths, cc_m, cc_s)
        K_inf, K_inf_se = extrapolate(widths, K_m, K_s)
        loss_inf = extrapolate(widths, loss_m, loss_s)[0]
        d = np.abs(cc_mc.ravel() - cc_inf)
        err = np.sqrt(cc_inf_se ** 2 + cc_mc_se.ravel() ** 2)
        j = int(np.argmax(d))
        T1 = train.steps + 1
        d_final = float(d.reshape(T1, -1)[-1].max())
        z = float(np.max(d / np.maximum(err, 1e-15)))
        Kd = (K_mc.reshape(T1, -1) - K_inf.reshape(T1, -1))
        Kn = np.linalg.norm(K_inf.reshape(T1, -1), axis=1)
        rel = np.linalg.norm(Kd, axis=1) / Kn
        k = int(np.argmax(rel))
        rel_err = float(np.sqrt(np.sum(K_inf_se.reshape(T1, -1)[k] ** 2
                                       + K_mc_se.reshape(T1, -1)[k] ** 2)) / Kn[k])
        row = dict(L=L, cc_maxdiff=float(d[j]), cc_err=float(err[j]), cc_maxz=z,
                   cc_maxdiff_t=j // (d.size // T1), cc_final=d_final,
                   ntk_rel=float(rel[k]), ntk_rel_err=rel_err, ntk_rel_t=k,
                   ntk_rel_final=float(rel[-1]),
                   loss_mc=float(np.mean([s.train_loss[-1] for s in sols])),
                   loss_inf=float(loss_inf[-1]), time_mc=t_mc, time_nets=t_net)
        out[f"L{L}"] = row
        log(f"  {L:>2} {d[j]:>16.4e} {err[j]:>8.1e} {j // (d.size // T1):>4} {z:>6.2f} "
            f"{d_final:>9.4f} {rel[k]:>13.4e} {rel_err:>8.1e} "
            f"{k:>4} {rel[-1]:>10.4e} {row['loss_mc']:>8.4f} {row['loss_inf']:>8.4f} {t_mc:>6.1f} {t_net:>7.1f}")
    return out


# --- (c) linear probe vs gamma0 --------------------------------------------------------------
def part_c(args):
    return {f"C{C}": probe_table(args, C, C in args.mc_dims) for C in args.dims_c}


def probe_table(args, C, with_mc):
    data = digits_views(args.per_class_c, args.q_per_class, C)
    net = dmft.MLP(depth=1, activation="tanh")
    raw = probe_raw(data)
    log(f"\n(c) linear probe vs gamma0: tanh, depth 1, M = {data.M} digits x 2 views, "
        f"C = {data.C}, Q = {data.Q} labelled probe points (fit on {int(np.ceil(data.Q / 2))}, "
        f"accuracy on {data.Q - int(np.ceil(data.Q / 2))}), lr = {args.lr_c}, {args.steps_c} "
        f"steps; networks muP width {args.width_c} x {args.seeds_c} seeds; "
        f"{f'mc {args.samples_c} samples' if with_mc else 'no mc rows'}")
    rows, curves = [], {}
    target = []

    def add(model, g0, res, t):
        """One row from a Solution or an Ensemble (then means over the networks)."""
        pc = np.atleast_2d(dmft.linear_probe(res))
        loss = np.atleast_2d(np.asarray(res.train_loss, dtype=float))
        dk = np.atleast_1d(dmft.ntk_change(res).max(axis=-1))
        offd = np.atleast_1d(off_diagonal_mass(dmft.cross_correlation(res)[..., -1, :, :]))
        if not target:
            target.append(float(loss[:, -1].mean()))
        # the probe when the loss first reaches the static solution's final loss
        reach = loss <= target[0] * (1 + 1e-12)
        t_eq = np.where(reach.any(axis=1), reach.argmax(axis=1), -1)
        p_eq = np.array([pc[k, j] if j >= 0 else np.nan for k, j in enumerate(t_eq)])
        fin = pc[:, -1]
        r = dict(model=model, gamma0=g0, probe=float(fin.mean()),
                 probe_se=float(mean_se(fin)[1]) if fin.size > 1 else None,
                 probe_equal_loss=float(np.mean(p_eq)), step_equal_loss=float(np.mean(t_eq)),
                 loss=float(loss[:, -1].mean()), ntk_change=float(dk.mean()),
                 off_diagonal=float(offd.mean()), time_s=t)
        rows.append(r)
        curves[f"{model} {g0:g}"] = pc.mean(axis=0).tolist()
        se = f"+-{r['probe_se']:.3f}" if r["probe_se"] is not None else " " * 8
        log(f"  {model:>22} {g0:>6g} {r['probe']:>7.3f} {se:>8} {r['probe_equal_loss']:>8.3f} "
            f"{r['step_equal_loss']:>6.1f} {r['loss']:>9.4f} {r['ntk_change']:>9.3f} "
            f"{r['off_diagonal']:>9.2e} {t:>7.1f}")

    log(f"  {'model':>22} {'gamma0':>6} {'probe':>7} {'':>8} {'@eq loss':>8} {'step':>6} "
        f"{'BT loss':>9} {'dK/K':>9} {'offdiag':>9} {'time s':>7}")
    log(f"  {'raw pixels':>22} {'-':>6} {raw:>7.3f}")
    t0 = time.perf_counter()
    st = dmft.solve(net, data, bt_train(0.0, args.lr_c, args.steps_c), method="static")
    t = time.perf_counter() - t0
    probe0 = float(dmft.linear_probe(st)[0])
    log(f"  {'NNGP offset f0 (t=0)':>22} {'-':>6} {probe0:>7.3f}")
    add("static (kernel BT)", 0, st, t)
    for g0 in args.gammas:
        train = bt_train(g0, args.lr_c, args.steps_c)
        if with_mc:
            t0 = time.perf_counter()
            sol = dmft.solve(net, data, train, method="mc", samples=args.samples_c, seed=0)
            add("DMFT (mc)", g0, sol, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ens = dmft.simulate(net, data, train, width=args.width_c, seeds=range(args.seeds_c),
                            center=True)
        add(f"networks N={args.width_c}", g0, ens, time.perf_counter() - t0)
    return dict(raw_pixels=raw, nngp_offset=probe0, rows=rows, probe_curves=curves)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small preset (~2 min)")
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--C", type=int, default=None, help="embedding dimension of (a), (b)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--widths-a", type=int, nargs="+", default=None)
    ap.add_argument("--seeds-a", type=int, default=None)
    ap.add_argument("--steps-a", type=int, default=None)
    ap.add_argument("--per-class-a", type=int, default=None)
    ap.add_argument("--widths-b", type=int, nargs="+", default=None)
    ap.add_argument("--widths-b2", type=int, nargs="+", default=None, help="(b) at L = 2")
    ap.add_argument("--lr-b", type=float, default=0.1, help="learning rate of part (b)")
    ap.add_argument("--seeds-b", type=int, default=None)
    ap.add_argument("--steps-b", type=int, default=None)
    ap.add_argument("--per-class-b", type=int, default=None)
    ap.add_argument("--depths-b", type=int, nargs="+", default=None)
    ap.add_argument("--samples-b", type=int, nargs=2, default=None,
                    help="mc samples at L = 1 and L = 2")
    ap.add_argument("--lr-c", type=float, default=0.2, help="learning rate of part (c)")
    ap.add_argument("--gammas", type=float, nargs="+", default=None)
    ap.add_argument("--width-c", type=int, default=None)
    ap.add_argument("--seeds-c", type=int, default=None)
    ap.add_argument("--steps-c", type=int, default=None)
    ap.add_argument("--per-class-c", type=int, default=None)
    ap.add_argument("--q-per-class", type=int, default=None)
    ap.add_argument("--samples-c", type=int, default=None)
    ap.add_argument("--dims-c", type=int, nargs="+", default=None,
                    help="(c): embedding dimensions C")
    ap.add_argument("--mc-dims", type=int, nargs="*", default=None,
                    help="(c): the C with DMFT (mc) rows (mc's memory grows as C^2)")
    ap.add_argument("--out", default=None, help="save the numbers as JSON (atomically)")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = dict(
        C=3,
        widths_a=[128, 512, 2048] if q else [128, 256, 512, 1024, 2048, 4096, 8192],
        seeds_a=3 if q else 6, steps_a=20 if q else 40, per_class_a=4,
        widths_b=[256, 512] if q else [256, 512, 1024, 2048],
        widths_b2=[256, 512] if q else [256, 512, 1024],
        seeds_b=4 if q else 24, steps_b=10 if q else 20, per_class_b=2 if q else 4,
        depths_b=[1] if q else [1, 2], samples_b=[2000, 1000] if q else [16000, 4000],
        gammas=[0.5, 2.0] if q else [0.25, 0.5, 1.0, 2.0, 3.0],
        width_c=256 if q else 1024, seeds_c=2 if q else 4, steps_c=15 if q else 30,
        per_class_c=4 if q else 8, q_per_class=10 if q else 20,
        samples_c=1000 if q else 4000, dims_c=[3] if q else [3, 4], mc_dims=[3])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    start = time.perf_counter()
    results = {"args": vars(args)}
    for p in args.parts:
        results[p] = {"a": part_a, "b": part_b, "c": part_c}[p](args)
    log(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.out:
        text = json.dumps(results, indent=1, default=float).encode()
        path = os.path.abspath(args.out)
        replace_atomically(path, os.path.dirname(path), lambda fd: os.write(fd, text))
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
