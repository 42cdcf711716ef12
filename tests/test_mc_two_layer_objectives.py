"""method="mc" at depth 1 beyond one squared-error output (docs/theory.rst §7).

The two-layer population march (:func:`solvers.mc.two_layer.solve_two_layer_objective`) with C
outputs, the cross-entropy, logistic and hinge losses, weight decay toward the initialisation
and toward zero, and mini-batch / online schedules, against:

- exact identities of the N = infinity theory that need no simulation: the original engine on
  the plain problem (to rounding), C outputs with identical target columns = one output at
  gamma0 sqrt(C) (the readouts enter the hidden units only through their sum), the symmetry
  of the kernels and K(0) = delta_{cc'} K_static;
- simulated networks (``dmft.simulate``, the ground truth) extrapolated to N = infinity in 1/N
  (:func:`solvers.stats.fit_inverse_width`), the pattern of tests/test_mc_vs_simulation.py:
  centred networks, control variates with known means (the raw initial outputs f(0), mean 0;
  the t = 0 NTK's same-output blocks minus the static NTK, mean exactly 0 at L = 1), one
  independent ensemble per width (disjoint seeds), z = gap / sqrt(se_mc^2 + se_intercept^2).

Tolerances are multiples of Monte Carlo standard errors (TOL). The default cases are small
(z-scores only); the must-show cases (predictions within 0.01, NTK within 2 % of max|K|, and
standard errors small enough that these bounds could have failed) are ``slow``.
"""
import math

import numpy as np
import pytest

import dmft
from dmft._mc import MonteCarlo
from dmft._method import FEATURES
from conftest import control_variate_mean
from dmft.config import teacher_student
from solvers.mc import two_layer as tl
from solvers.objective import Objective
from solvers.stats import fit_inverse_width

TOL = {
    "z": 4.5,            # max |z| over the compared entries (as tests/test_mc_vs_simulation.py)
    "pred": 0.01,        # |extrapolated - DMFT| on predictions (targets of order 1)
    "ntk_rel": 0.02,     # |extrapolated - DMFT| / max|K(T)| on the final NTK
    "identity_z": 5.0,   # exact identities compared within the solvers' standard errors
    "rounding": 1e-12,   # the same arithmetic in another order
}

def solve_mc(net, data, train, **kw):
    """``dmft.solve(..., method="mc")`` (the method declares every feature of
    docs/theory.rst §7: :data:`dmft._method.FEATURES`)."""
    return dmft.solve(net, data, train, method="mc", progress=False, **kw)


def test_mc_declares_the_features():
    """method="mc" and "gia" solve every §7 feature (two-layer: this file; Barlow Twins and
    the output offset: tests/test_mc_barlow.py)."""
    assert MonteCarlo.supports == frozenset(FEATURES)


def _seeds(i, count):
    """Disjoint seeds per width (shared seeds would correlate the widths' errors)."""
    return range(100_000 * (i + 1), 100_000 * (i + 1) + count)


def _flat_ntk(K, C):
    """(n, n) or (n, C, n, C) -> (n C, n C) (point-major pairs)."""
    if K.ndim == 2:
        return K
    n = K.shape[0]
    return K.reshape(n * C, n * C)


def width_stats(net, data, train, width, seeds, k_static):
    """Centred ensemble at one width: adjusted means (control variates f(0) and the same-output
    blocks of K(0) - K_static, all with known mean 0) of the final predictions and the upper
    triangle of the final NTK over (point, output) pairs."""
    C = data.C
    n = data.P + data.Q
    iu = np.triu_indices(n * C)
    ens = dmft.simulate(net, data, train, width=width, seeds=seeds, center=True,
                        progress=False)
    S = ens.n_seeds
    KT = np.stack([_flat_ntk(k, C) for k in ens.ntk[:, -1]])
    obs = np.concatenate([ens.predictions[:, -1].reshape(S, -1), KT[:, iu[0], iu[1]]], axis=1)
    K0 = ens.ntk[:, 0]
    if C > 1:
        K0 = np.einsum("smcnc->smn", K0) / C        # same-output blocks, averaged over c
    iu0 = np.triu_indices(n)
    if S <= 4 * (n * C + len(iu0[0])):
        iu0 = (np.arange(n), np.arange(n))        # too many for the seeds: the diagonal
    Z = np.concatenate([ens.extras["f0"].reshape(S, -1), (K0 - k_static)[:, iu0[0], iu0[1]]],
                       axis=1)
    mean, se = control_variate_mean(obs, Z)
    # per-network standard deviation of the training predictions at every time (T1, P, ...)
    traj_sd = ens.predictions[:, :, :data.P].std(axis=0, ddof=1)
    return mean, se, ens.elapsed, traj_sd


def compare(data, train, widths, counts, *, samples=1 << 15, label="", mc_options=None):
    """method="mc" (L = 1 tanh) against centred ensembles extrapolated in 1/N."""
    net = dmft.MLP(1, "tanh")
    C = data.C
    n = data.P + data.Q
    iu = np.triu_indices(n * C)
    sol = solve_mc(net, data, train, seed=1, samples=samples, **(mc_options or {}))
    plain = dmft.Dataset(data.X_train, np.zeros(data.P), data.X_test, np.zeros(data.Q))
    k_static = dmft.solve(net, plain, dmft.GradientDescent(train.gamma0, train.lr, 1),
                          method="static").ntk[0]
    KT = _flat_ntk(sol.ntk[-1], C)
    KTse = _flat_ntk(sol.stderr["ntk"][-1], C)
    theory = np.concatenate([sol.predictions[-1].ravel(), KT[iu]])
    se_mc = np.concatenate([sol.stderr["train_predictions"][-1].ravel(),
                            sol.stderr["test_predictions"][-1].ravel(), KTse[iu]])
    means, ses, sim_time, seed_sd = [], [], 0.0, []
    for i, (N, S) in enumerate(zip(widths, counts)):
        m, s, el, sd = width_stats(net, data, train, N, _seeds(i, S), k_static)
        means.append(m)
        ses.append(s)
        seed_sd.append(sd)
        sim_time += el
    b0, se0, b1, se1 = fit_inverse_width(widths, np.array(means), np.array(ses))
    gap = b0 - theory
    z = gap / np.hypot(se0, se_mc)
    m = n * C
    knorm = np.abs(KT).max()
    r = dict(label=label, z=np.abs(z).max(), pred_gap=np.abs(gap[:m]).max(),
             pred_se=np.hypot(se0, se_mc)[:m].max(), ntk_gap=np.abs(gap[m:]).max() / knorm,
             ntk_se=np.hypot(se0, se_mc)[m:].max() / knorm, mc_time=sol.elapsed,
             sim_time=sim_time, widths=list(widths), counts=list(counts),
             pred_se_mc=se_mc[:m].max(), pred_se_sim=se0[:m].max(), samples=samples,
             seed_sd=seed_sd, sol=sol)
    print("\n[mc L=1 vs simulation] %(label)s widths=%(widths)s seeds=%(counts)s "
          "samples=%(samples)d: pred gap %(pred_gap).2e (se <= %(pred_se).2e: mc "
          "%(pred_se_mc).1e, intercept %(pred_se_sim).1e), NTK gap %(ntk_gap).2e of max|K| "
          "(se <= %(ntk_se).2e), max|z| %(z).2f; mc %(mc_time).2f s, simulations "
          "%(sim_time).2f s" % r)
    return r


def check(r, absolute=False):
    assert r["z"] < TOL["z"], r
    if absolute:
        assert r["pred_gap"] < TOL["pred"] and r["ntk_gap"] < TOL["ntk_rel"], r
        # the bounds are only meaningful if the data could have violated them
        assert r["pred_se"] < TOL["pred"] / 3 and r["ntk_se"] < TOL["ntk_rel"] / 3, r


# ---------------------------------------------------------------------------- problems

def _mse3(P, Q, D=6, seed=0):
    return teacher_student(P=P, Q=Q, D=D, seed=seed, outputs=3)


def _classes3(P, Q, D=6, seed=0):
    return teacher_student(P=P, Q=Q, D=D, seed=seed, classes=3)


def _binary(P, Q, D=6, seed=0):
    return teacher_student(P=P, Q=Q, D=D, seed=seed, labels=True)


def _scalar(P, Q, D=6, seed=0):
    return teacher_student(P=P, Q=Q, D=D, seed=seed)


# ------------------------------------------------------------------ exact identities

def test_engine_plain_objective_equals_original_engine():
    """The general march with the plain objective (mse, C = 1, full batch, no decay) is the
    original march: same sources, same arithmetic up to summation order."""
    data = _scalar(3, 2)
    kx = data.kx
    y = np.asarray(data.y_train, dtype=np.float64)
    a = tl.solve_two_layer(kx, y, "tanh", 1.0, 0.2, 8, samples=4096,
                           seed=np.random.SeedSequence(3), kernel_samples=1024)
    obj = Objective("mse", y, 5, 8, 0.2)
    b = tl.solve_two_layer_objective(kx, obj, "tanh", 1.0, 0.2, 8, samples=4096,
                                     seed=np.random.SeedSequence(3), kernel_samples=1024)
    for k in ("f", "f_se"):
        np.testing.assert_allclose(b[k][..., 0], a[k], rtol=0, atol=TOL["rounding"])
    for k in ("ntk", "ntk_se"):
        np.testing.assert_allclose(b[k][:, :, 0, :, 0], a[k], rtol=0, atol=TOL["rounding"])
    for k in ("phi", "g", "phi_se", "g_se"):
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=TOL["rounding"])


def test_plain_problem_keeps_the_original_code_path():
    """C = 1 mse, full batch, no decay through dmft.solve: bit-identical to the original
    engine (the plain path is not routed through the general march)."""
    data = _scalar(3, 2)
    net, tr = dmft.MLP(1, "tanh"), dmft.GradientDescent(1.0, 0.2, 6)
    sol = dmft.solve(net, data, tr, method="mc", seed=0, samples=4096, progress=False)
    ss = np.random.SeedSequence(0)                     # dmft's seed=0
    ref = tl.solve_two_layer(data.kx, np.asarray(data.y_train, dtype=np.float64), "tanh", 1.0,
                             0.2, 6, samples=4096, seed=ss, kernel_samples=4096)
    assert sol.train_predictions.shape == (7, 3) and sol.ntk.shape == (7, 5, 5)
    assert sol.g.shape == (1, 7, 7, 5, 5)
    np.testing.assert_array_equal(sol.train_predictions, ref["f"][:, :3])
    np.testing.assert_array_equal(sol.ntk, ref["ntk"])


def test_identical_columns_equal_one_output_at_rescaled_gamma0():
    """C outputs with identical target columns at gamma0 = one output at gamma0 sqrt(C):
    the hidden units see the readouts only through v = sum_c w_c / sqrt(C) ~ N(0, 1), which
    obeys the one-output march with gamma0 sqrt(C) (docs/theory.rst §7), so f_c = f' and
    sum_c' K_{mu c, nu c'} = K'_{mu nu} at N = infinity. Independent sources on both sides:
    compared within the combined standard errors."""
    base = _scalar(3, 1)
    C = 3
    Y = np.repeat(np.asarray(base.y_train)[:, None], C, axis=1)
    Yt = np.repeat(np.asarray(base.y_test)[:, None], C, axis=1)
    multi = dmft.Dataset(base.X_train, Y, base.X_test, Yt)
    net = dmft.MLP(1, "tanh")
    g0 = 0.8
    a = solve_mc(net, multi, dmft.GradientDescent(g0, 0.1, 15), seed=2, samples=1 << 15)
    b = solve_mc(net, base, dmft.GradientDescent(g0 * math.sqrt(C), 0.1, 15), seed=3,
                 samples=1 << 15)
    assert a.predictions.shape == (16, 4, C) and a.ntk.shape == (16, 4, C, 4, C)
    assert a.g.shape == (1, 16, 16, 4, C, 4, C) and a.phi.shape == (1, 16, 16, 4, 4)
    fa, fa_se = a.predictions, np.concatenate([a.stderr["train_predictions"],
                                               a.stderr["test_predictions"]], axis=1)
    fb, fb_se = b.predictions, np.concatenate([b.stderr["train_predictions"],
                                               b.stderr["test_predictions"]], axis=1)
    z = (fa - fb[..., None]) / np.hypot(fa_se, fb_se[..., None])
    assert np.abs(z[1:]).max() < TOL["identity_z"], np.abs(z).max()
    Ka = a.ntk.sum(axis=-1)                              # (T1, n, C, n): sum over c'
    # the standard error of the sum: at most the sum of the standard errors
    Ka_se = a.stderr["ntk"].sum(axis=-1)
    z = (Ka - b.ntk[:, :, None, :]) / np.hypot(Ka_se, b.stderr["ntk"][:, :, None, :])
    assert np.abs(z).max() < TOL["identity_z"], np.abs(z).max()
    # the prediction moved: the check is not vacuous
    assert np.abs(fb[-1]).max() > 0.3


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_kernels_symmetric_and_decoupled_at_start(loss):
    """K(t) and G(t, t) are symmetric over (point, output) pairs; at t = 0,
    K_{mu c, nu c'} = delta_{cc'} K_static within the standard errors (docs/theory.rst §7)."""
    data = _mse3(3, 1) if loss == "mse" else _classes3(3, 1)
    net = dmft.MLP(1, "tanh")
    tr = dmft.GradientDescent(1.0, 0.2, 10, loss=loss)
    sol = solve_mc(net, data, tr, seed=0, samples=1 << 14)
    n, C = 4, 3
    K = sol.ntk.reshape(11, n * C, n * C)
    np.testing.assert_allclose(K, K.transpose(0, 2, 1), rtol=0, atol=1e-12)
    G = sol.g[0].reshape(11, 11, n * C, n * C)
    np.testing.assert_allclose(G, G.transpose(1, 0, 3, 2), rtol=0, atol=1e-12)
    plain = dmft.Dataset(data.X_train, np.zeros(3), data.X_test, np.zeros(1))
    ks = dmft.solve(net, plain, dmft.GradientDescent(1.0, 0.2, 1), method="static").ntk[0]
    expect = np.einsum("mn,cd->mcnd", ks, np.eye(C))
    z = (sol.ntk[0] - expect) / np.maximum(sol.stderr["ntk"][0], 1e-300)
    assert np.abs(z).max() < TOL["identity_z"]
    # feature learning couples the outputs later on
    off = np.abs(sol.ntk[-1] - np.einsum("mcnd,cd->mcnd", sol.ntk[-1], np.eye(C))).max()
    off_se = sol.stderr["ntk"][-1].max()
    assert off > 10 * off_se, (off, off_se)


@pytest.mark.parametrize("loss", ["logistic", "cross_entropy"])
def test_lazy_limit_is_the_kernel_machine_with_decay(loss):
    """gamma0 -> 0 with weight decay toward the initialisation is the kernel machine with the
    static NTK (K0 (x) I_C) trained by gradient descent with decay: f(t) = K0 alpha(t),
    alpha(t+1) = a alpha(t) + lr Delta(f(t)) (docs/theory.rst §7). The gap is O(gamma0^2): it
    must fall ~4x when gamma0 halves, and be far above the Monte Carlo error (else the rate
    says nothing)."""
    data = _binary(4, 2) if loss == "logistic" else _classes3(4, 2)
    C = data.C
    net = dmft.MLP(1, "tanh")
    plain = dmft.Dataset(data.X_train, np.zeros(4), data.X_test, np.zeros(2))
    K0 = dmft.solve(net, plain, dmft.GradientDescent(1.0, 0.1, 1), method="static").ntk[0]
    T, lr, lam = 30, 0.2, 0.5
    obj = Objective(loss, data.y_train, 6, T, lr, lam, "init")
    alpha = np.zeros((4, C))
    f_ref = [np.zeros((6, C))]
    for t in range(T):
        alpha = obj.a * alpha + lr * obj.delta(t, f_ref[-1])[:4]
        f_ref.append(K0[:, :4] @ alpha)
    f_ref = np.array(f_ref)
    if C == 1:
        f_ref = f_ref[..., 0]
    # method="static" is the same kernel machine (an independent implementation)
    st = dmft.solve(net, data, dmft.GradientDescent(0.3, lr, T, loss=loss, weight_decay=lam),
                    method="static")
    np.testing.assert_allclose(st.predictions, f_ref, rtol=0, atol=1e-10)
    gaps, rel = [], []
    for g0 in (0.3, 0.15):
        tr = dmft.GradientDescent(g0, lr, T, loss=loss, weight_decay=lam)
        sol = solve_mc(net, data, tr, seed=0, samples=1 << 16, kernel_samples=64)
        se = np.concatenate([sol.stderr["train_predictions"], sol.stderr["test_predictions"]],
                            axis=1)
        gap = np.abs(sol.predictions - f_ref)
        i = np.unravel_index(gap.argmax(), gap.shape)
        gaps.append(gap[i])
        rel.append(se[i] / gap[i])
    ratio = gaps[0] / gaps[1]
    ratio_se = ratio * math.hypot(*rel)
    print(f"\n[lazy {loss}] gaps {gaps}, ratio {ratio:.2f} +- {ratio_se:.2f}")
    # the ratio is informative: it tells 4 (gamma0^2) from 2 (gamma0) and 1 (a fixed bias)
    assert ratio_se < 0.5, (gaps, rel)
    # 4 up to the noise and an allowance of 0.5 for the O(gamma0^4) terms (measured 3.5 - 3.9)
    assert abs(ratio - 4.0) < 3 * ratio_se + 0.5, (ratio, ratio_se)
    assert np.abs(f_ref[-1]).max() > 0.3


def test_sources_with_outputs():
    """Sources for C outputs: antithetic pairs (u, w0), (u, -w0) with w0 (S, C); C = 1 equals
    the original sources as a column (both samplers); i.i.d. and quasi-random sources give the
    same solution within the standard errors."""
    kx = _scalar(3, 1).kx
    for sampler in ("sobol", "random"):
        u, w = tl.two_layer_sources(kx, 64, np.random.SeedSequence(1), 4, sampler, outputs=3)
        assert u.shape == (64, 4) and w.shape == (64, 3)
        np.testing.assert_array_equal(w[0::2], -w[1::2])
        np.testing.assert_array_equal(u[0::2], u[1::2])
        u1, w1 = tl.two_layer_sources(kx, 64, np.random.SeedSequence(1), 4, sampler, outputs=1)
        u0, w0 = tl.two_layer_sources(kx, 64, np.random.SeedSequence(1), 4, sampler)
        np.testing.assert_array_equal(u1, u0)
        np.testing.assert_array_equal(w1[:, 0], w0)
    data = _classes3(3, 1)
    net, tr = dmft.MLP(1, "tanh"), dmft.GradientDescent(1.0, 0.3, 10, loss="cross_entropy")
    a = solve_mc(net, data, tr, seed=0, samples=1 << 14, kernel_samples=64)
    b = solve_mc(net, data, tr, seed=1, samples=1 << 14, kernel_samples=64, sampler="random")
    z = (a.train_predictions - b.train_predictions) / np.hypot(
        a.stderr["train_predictions"], b.stderr["train_predictions"]).clip(1e-300)
    assert np.abs(z[1:]).max() < TOL["identity_z"]


def test_hinge_reports_margins_within_the_noise(caplog):
    """Hinge with weight decay: once margins are reached the discrete-time dynamics chatter
    around y f = 1 (the error signal switches on and off), and a decision within the Monte
    Carlo error makes later predictions uncertain beyond their standard errors. The solver
    reports the closest call (extras["hinge_margin_z"], in standard errors) and warns below 3;
    before any margin is reached it is large and there is no warning."""
    data = _binary(4, 2)
    net = dmft.MLP(1, "tanh")
    far = solve_mc(net, data, dmft.GradientDescent(1.0, 0.1, 7, loss="hinge",
                                                  weight_decay=0.5), seed=0, samples=1 << 14)
    assert far.extras["hinge_margin_z"] > 10
    with caplog.at_level("WARNING", logger="dmft"):
        near = solve_mc(net, data, dmft.GradientDescent(1.0, 0.1, 30, loss="hinge",
                                                       weight_decay=0.5),
                        seed=0, samples=1 << 14)
    assert near.extras["hinge_margin_z"] < 3
    assert any("standard errors from 1" in r.getMessage() for r in caplog.records)
    assert "hinge_margin_z" not in solve_mc(net, data, dmft.GradientDescent(
        1.0, 0.1, 7, loss="logistic"), seed=0, samples=1 << 12).extras


# ---------------------------------------------------------------- against simulations
#: the default cases: 3 train + 1 test points, 20 steps, widths 128 / 256 / 512 x 300 nets

#: (the two-time kernels are not compared here: few kernel samples keep the tests short)
SMALL = dict(widths=[128, 256, 512], counts=[300, 300, 300], mc_options={"kernel_samples": 64})
HINGE = dict(SMALL, widths=[1024, 2048, 4096])


@pytest.mark.parametrize("case", ["mse3", "cross_entropy3", "logistic", "hinge_decay"])
def test_losses_agree_with_simulations_small(case):
    """Each loss (mse C = 3, cross-entropy C = 3, logistic, hinge with weight decay toward the
    initialisation), tanh, L = 1, gamma0 = 1: mc within combined error bars of the networks
    extrapolated to N = infinity."""
    if case == "mse3":
        data, tr = _mse3(3, 1), dmft.GradientDescent(1.0, 0.1, 20)
    elif case == "cross_entropy3":
        data = _classes3(3, 1)
        tr = dmft.GradientDescent(1.0, 0.3, 20, loss="cross_entropy")
    elif case == "logistic":
        data, tr = _binary(3, 1), dmft.GradientDescent(1.0, 0.2, 20, loss="logistic")
    else:
        data = _binary(4, 2, seed=2)
        tr = dmft.GradientDescent(1.0, 0.2, 7, loss="hinge", weight_decay=0.5)
    # hinge: wider networks, so that no margin decision is within their fluctuations
    # (check_margins)
    r = compare(data, tr, **(HINGE if case == "hinge_decay" else SMALL), label=case)
    if case == "hinge_decay":
        check_margins(r, data, tr)
    check(r)


def check_margins(r, data, train, sigmas=3.0, jumps=2):
    """The hinge loss's error signal y 1[y f < 1] jumps where a margin is crossed, and in
    discrete time the N = infinity trajectory is a discontinuous function of f: a network
    whose f(t) differs from the limit by its O(N^-1/2) fluctuation takes the other branch
    when y f(t) is that close to 1, and the ensemble mean is then smeared non-analytically
    in 1/N (measured: a margin crossed at y f = 1.002 put the width 128 - 2048 means 0.02 -
    0.03 away from the limit, at z ~ 9). The comparison is meaningful (and made) only where
    every decision y_mu f_mu(t) vs 1, t < T, of the limit is at least ``sigmas`` per-network
    standard deviations (smallest width) away from 1, and the hinge is active: at least
    ``jumps`` decisions switch a point off."""
    y = np.asarray(data.y_train, dtype=np.float64)
    m = y[None] * r["sol"].train_predictions[:train.steps]
    dist = np.abs(m - 1.0).min()
    sd = r["seed_sd"][0][:train.steps]
    zdist = (np.abs(m[1:] - 1.0) / sd[1:]).min()     # t = 0: f = 0 on every network
    print("  hinge: closest margin decision |y f - 1| = %.3f, %.1f per-network sd (width %d) "
          "away; %d decisions off" % (dist, zdist, r["widths"][0], int((m >= 1).sum())))
    assert zdist > sigmas, (dist, zdist)
    assert (m >= 1).sum() >= jumps


@pytest.mark.parametrize("decay_to", ["init", "zero"])
def test_weight_decay_agrees_with_simulations_small(decay_to):
    """mse with weight decay toward the initialisation and toward zero (the initial-weight
    channel a^t), C = 3: mc against networks."""
    data = _mse3(3, 1)
    tr = dmft.GradientDescent(1.0, 0.1, 20, weight_decay=1.0, decay_to=decay_to)
    check(compare(data, tr, **SMALL, label=f"mse3 decay_to={decay_to}"))


@pytest.mark.parametrize("schedule", ["epochs", "online"])
def test_batches_agree_with_simulations_small(schedule):
    """Mini-batch epochs (batch 2 of 4 points) and online SGD (a fresh point per step), the
    same schedule (batch_seed) for the networks and the theory."""
    if schedule == "epochs":
        data = _scalar(4, 1)
        tr = dmft.GradientDescent(1.0, 0.2, 20, batch_size=2, batch_seed=5)
    else:
        data = _scalar(10, 1)
        tr = dmft.GradientDescent(1.0, 0.5, 10, batch_size=1, schedule="online")
    check(compare(data, tr, **SMALL, label=f"batches {schedule}"))


# ---------------------------------------------------------------- the must-show cases
#: 4 train + 2 test points, 40 steps; widths 128 - 1024, disjoint seeds; 2^18 mc samples
MUST = dict(widths=[128, 256, 512, 1024], counts=[3200, 1600, 800, 400], samples=1 << 18)
HINGE_MUST = dict(widths=[1024, 2048, 4096], counts=[3200, 1600, 800], samples=1 << 18)


def _must_case(case):
    if case == "mse3":
        return _mse3(4, 2, D=8), dmft.GradientDescent(1.0, 0.1, 40)
    if case == "cross_entropy3":
        return _classes3(4, 2, D=8), dmft.GradientDescent(1.0, 0.3, 40, loss="cross_entropy")
    if case == "logistic":
        return _binary(4, 2, D=8), dmft.GradientDescent(1.0, 0.2, 40, loss="logistic")
    if case == "hinge_decay":
        # see check_margins: the horizon ends before a margin is met within the networks' noise
        return _binary(4, 2, seed=2), dmft.GradientDescent(1.0, 0.2, 7, loss="hinge",
                                                            weight_decay=0.5)
    if case in ("decay_init", "decay_zero"):
        return _mse3(4, 2, D=8), dmft.GradientDescent(1.0, 0.1, 40, weight_decay=1.0,
                                                       decay_to=case[6:])
    if case == "hinge_decay_zero":
        return _binary(4, 2, seed=3), dmft.GradientDescent(1.0, 0.3, 5, loss="hinge",
                                                            weight_decay=0.5, decay_to="zero")
    if case == "epochs":
        return _scalar(6, 2, D=8), dmft.GradientDescent(1.0, 0.2, 40, batch_size=2,
                                                         batch_seed=5)
    if case == "online":
        # lr below 2 / lambda_max(K_train(0)) = 0.47: the package's divergence rule applies
        # the full-batch bound to every schedule
        return _scalar(20, 2, D=8), dmft.GradientDescent(1.0, 0.4, 20, batch_size=1,
                                                          schedule="online")
    raise KeyError(case)


@pytest.mark.slow
@pytest.mark.validation
@pytest.mark.parametrize("case", ["mse3", "cross_entropy3", "logistic", "hinge_decay",
                                  "decay_init", "decay_zero", "hinge_decay_zero", "epochs",
                                  "online"])
def test_two_layer_objectives_must_show(case):
    """mc (L = 1 tanh, gamma0 = 1) against networks extrapolated to N = infinity: predictions
    within 0.01, NTK within 2 % of max|K|, within combined error bars, and error bars small
    enough that these bounds could fail (measured numbers: MEASURED below)."""
    data, tr = _must_case(case)
    opts = HINGE_MUST if case.startswith("hinge") else MUST
    r = compare(data, tr, **opts, label=case)
    if case.startswith("hinge"):
        check_margins(r, data, tr)
    check(r, absolute=True)


#: MEASURED (4 Dec 2026, 2 shared cores at a load of ~11, this file as written; mc 2^18
#: samples in 8 replicates, seed 1; networks centred, widths 128 / 256 / 512 / 1024 with
#: 3200 / 1600 / 800 / 400 disjoint seeds, hinge 1024 / 2048 / 4096 with 3200 / 1600 / 800):
#:   case              pred gap (combined se)   NTK gap / max|K| (se)   max|z|
#:   mse3              8.4e-4 (8.0e-4)          0.25 % (0.25 %)         3.11
#:   cross_entropy3    1.7e-3 (1.7e-3)          0.24 % (0.37 %)         2.30
#:   logistic          6.9e-4 (8.8e-4)          0.09 % (0.08 %)         1.14
#:   hinge_decay       4.7e-4 (5.0e-4)          0.03 % (0.08 %)         1.97  (margins 3.1 sd)
#:   decay_init        4.4e-4 (5.2e-4)          0.19 % (0.16 %)         2.60
#:   decay_zero        7.9e-5 (1.5e-4)          0.01 % (0.04 %)         1.46
#:   hinge_decay_zero  9.3e-5 (3.5e-4)          0.06 % (0.08 %)         1.58  (margins 3.3 sd)
#:   epochs            3.3e-4 (5.8e-4)          0.10 % (0.14 %)         2.62
#:   online            1.4e-3 (6.9e-4)          0.18 % (0.16 %)         2.58
#: mc 1 - 19 s per case, simulations 31 - 241 s per case (wall, loaded machine). Before the
#: margin precondition, hinge with decay at 20 steps (a margin crossed at y f = 1.002, then
#: chattering) gave max|z| 9.4 against widths 128 - 512: the networks' means sit between the
#: two branches (see check_margins).
