"""The Barlow Twins loss, paired-view data, the output offset and the representation read-outs
(docs/theory.rst §7; issue 17's foundation).

What they prove:
- the error signal of :func:`solvers.objective.barlow_twins` is -dL/dF: against central finite
  differences of the loss (to 1e-7 relative) and against torch autograd of the loss written
  out independently, with and without batch standardisation, for several lambda_off, C and
  leading axes;
- the cross-correlation is, with standardisation, the Pearson correlation of the views'
  embeddings (numpy.corrcoef), and its loss is ||C - I||_F^2 at lambda_off = 1;
- the static method with Barlow Twins is kernelized Barlow Twins with the static NTK: equal
  to a march written here with the closed-form NTK and NNGP of a linear network and torch
  autograd gradients; the linear method (exact DMFT of linear networks) tends to it as
  gamma0 -> 0 with the O(gamma0^2) rate;
- the offset is one array, the same in every method, a draw of the NNGP kernel (its sample
  covariance over seeds matches Phi^L within sampling error), added once to the predictions;
- bad input and the stationary trap are refused with a message naming the fix;
- the read-outs (linear probe, NTK change) are right on constructed cases;
- paired data, probe labels and the offset survive the HDF5 round trip.
"""
import numpy as np
import pytest

import dmft
from conftest import requires_torch
from solvers.objective import (Objective, barlow_twins, cross_correlation, nngp_offset,
                               standardize_views)
from solvers.static import static_kernels


def _views(M=5, D=4, Q=6, dim=2, sigma=0.4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((M, D))
    Xt = rng.standard_normal((Q, D))
    return dmft.Dataset.augmented(X, dmft.augment.gaussian_noise(sigma), dim=dim, seed=seed,
                                  X_test=Xt, labels_test=np.arange(Q) % 2)


def _bt(**kw):
    base = dict(gamma0=0.0, lr=0.3, steps=12, loss="barlow_twins", output_offset="nngp")
    base.update(kw)
    return dmft.GradientDescent(**base)


def _torch_bt(z, M, lam, standardize):
    """The Barlow Twins loss of torch embeddings z (2M, C), written out independently."""
    A, B = z[:M], z[M:]
    if standardize:
        A = (A - A.mean(0)) / A.std(0, unbiased=False)
        B = (B - B.mean(0)) / B.std(0, unbiased=False)
    Cc = A.T @ B / M
    on = Cc.diagonal()
    return ((1 - on) ** 2).sum() + lam * ((Cc ** 2).sum() - (on ** 2).sum())


# --- the loss and its gradient ------------------------------------------------------------
@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("lam,C", [(1.0, 1), (1.0, 3), (0.05, 2), (0.0, 3)])
def test_error_signal_against_finite_differences(standardize, lam, C):
    rng = np.random.default_rng(C)
    F = rng.standard_normal((10, C)) + 0.5
    value, delta = barlow_twins(F, lam, standardize)
    fd = np.empty_like(F)
    h = 1e-6
    for i in range(F.shape[0]):
        for j in range(C):
            Fp, Fm = F.copy(), F.copy()
            Fp[i, j] += h
            Fm[i, j] -= h
            fd[i, j] = (barlow_twins(Fp, lam, standardize)[0]
                        - barlow_twins(Fm, lam, standardize)[0]) / (2 * h)
    # central differences: truncation h^2 |L'''| ~ 1e-12, rounding eps |L| / h ~ 1e-10
    assert np.max(np.abs(delta + fd)) <= 1e-7 * np.max(np.abs(fd))
    assert value.shape == ()


def test_error_signal_leading_axes():
    rng = np.random.default_rng(3)
    F = rng.standard_normal((2, 3, 8, 2))
    v, d = barlow_twins(F, 0.5, True)
    assert v.shape == (2, 3) and d.shape == F.shape
    for a in range(2):
        for b in range(3):
            v1, d1 = barlow_twins(F[a, b], 0.5, True)
            assert v1 == pytest.approx(v[a, b], rel=1e-14)
            np.testing.assert_allclose(d1, d[a, b], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("standardize", [True, False])
def test_error_signal_against_autograd(standardize):
    torch = requires_torch()
    rng = np.random.default_rng(7)
    M, C, lam = 6, 3, 0.3
    F = rng.standard_normal((2 * M, C))
    f = torch.tensor(F, requires_grad=True)
    loss = _torch_bt(f, M, lam, standardize)
    loss.backward()
    value, delta = barlow_twins(F, lam, standardize)
    assert value == pytest.approx(loss.item(), rel=1e-13)
    np.testing.assert_allclose(delta, -f.grad.numpy(), rtol=1e-11, atol=1e-13)


def test_cross_correlation_is_the_pearson_correlation():
    rng = np.random.default_rng(1)
    F = rng.standard_normal((14, 3))
    C = cross_correlation(F, True)
    A, B = F[:7], F[7:]
    ref = np.corrcoef(A.T, B.T)[:3, 3:]
    np.testing.assert_allclose(C, ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cross_correlation(F, False), A.T @ B / 7, rtol=1e-13)
    # lambda_off = 1: L = ||C - I||_F^2
    assert barlow_twins(F, 1.0, True)[0] == pytest.approx(np.sum((C - np.eye(3)) ** 2),
                                                          rel=1e-13)


def test_standardisation_of_a_collapsed_embedding_is_refused():
    with pytest.raises(FloatingPointError, match="output_offset='nngp'"):
        standardize_views(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="even number of training points"):
        barlow_twins(np.ones((5, 2)))


# --- the static method: kernelized Barlow Twins ---------------------------------------------
@pytest.mark.parametrize("standardize", [True, False])
def test_static_is_kernelized_barlow_twins(standardize):
    """Linear two-layer network: NNGP Phi^1 = X X^T / D, NTK K = 2 X X^T / D (closed forms);
    kernelized BT: f(t+1) = f(t) + lr K[:, train] Delta(f(t) + f0), Delta by torch autograd."""
    torch = requires_torch()
    data = _views(M=5, D=4, Q=3, dim=2)
    net = dmft.MLP(1, "linear")
    # without standardisation the loss is quartic in f: a smaller step keeps it stable
    lr = 0.2 if standardize else 0.02
    train = _bt(lr=lr, steps=15, standardize=standardize, off_diagonal=0.7, offset_seed=4)
    sol = dmft.solve(net, data, train, method="static")
    X = data.X
    kx = X @ X.T / data.D
    f0 = nngp_offset(kx, 2, 1.0, 4)
    K = 2 * kx
    P, M = data.P, data.M
    f = np.zeros((train.steps + 1, data.P + data.Q, 2))
    for t in range(train.steps):
        z = torch.tensor(f[t, :P] + f0[:P], requires_grad=True)
        _torch_bt(z, M, 0.7, standardize).backward()
        f[t + 1] = f[t] - train.lr * K[:, :P] @ z.grad.numpy()
    f += f0
    np.testing.assert_allclose(sol.train_predictions, f[:, :P], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sol.test_predictions, f[:, P:], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(sol.extras["output_offset"], f0)
    # the loss fell and the kernel did not move
    assert sol.train_loss[-1] < 0.5 * sol.train_loss[0]
    assert np.all(dmft.ntk_change(sol) == 0.0)


def test_linear_method_tends_to_static_as_gamma0_vanishes():
    data = _views(M=4, D=5, Q=2, dim=2)
    net = dmft.MLP(2, "linear")
    lazy = dmft.solve(net, data, _bt(gamma0=0.0), method="static")
    errs = []
    for g in (0.1, 0.05):
        sol = dmft.solve(net, data, _bt(gamma0=g), method="linear")
        errs.append(np.max(np.abs(sol.train_predictions - lazy.train_predictions)))
        np.testing.assert_array_equal(sol.extras["output_offset"],
                                      lazy.extras["output_offset"])
    # O(gamma0^2): halving gamma0 divides the gap by ~4 (3 to 5 allows the next order)
    assert 3.0 < errs[0] / errs[1] < 5.0, errs
    # feature learning at gamma0 = 1 moves the kernel and the loss
    rich = dmft.solve(net, data, _bt(gamma0=1.0), method="linear")
    assert dmft.ntk_change(rich)[-1] > 0.05
    assert np.all(np.isfinite(rich.train_loss))


# --- the offset ------------------------------------------------------------------------------
def test_offset_is_a_draw_of_the_nngp():
    data = _views(M=3, D=4, Q=1, dim=1)
    net = dmft.MLP(2, "tanh")
    K = static_kernels("tanh", data.kx, 2)["phi"][-1]
    draws = np.stack([nngp_offset(K, 1, 1.0, s)[:, 0] for s in range(4000)])
    cov = draws.T @ draws / len(draws)
    # sample covariance of 4000 Gaussian draws: sd of an entry sqrt((K_ii K_jj + K_ij^2)/S)
    se = np.sqrt((np.outer(np.diag(K), np.diag(K)) + K ** 2) / len(draws))
    assert np.max(np.abs(cov - K) / se) < 5.0
    obj = Objective.from_specs(data, _bt(offset_scale=0.5, offset_seed=2), net)
    np.testing.assert_allclose(obj.offset, 0.5 * nngp_offset(K, 1, 1.0, 2), rtol=1e-14)
    # deferred: the plain check does not need the network; drawing it does
    lazy = Objective.from_specs(data, _bt())
    assert not lazy.plain and lazy.has_offset
    with pytest.raises(ValueError, match="from_specs\\(data, train, net\\)"):
        lazy.offset


def test_offset_works_with_mse_and_is_added_once():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 3))
    data = dmft.Dataset(X, rng.standard_normal(5), rng.standard_normal((2, 3)))
    net = dmft.MLP(1, "linear")
    train = dmft.GradientDescent(0.0, 0.2, 10, output_offset="nngp")
    sol = dmft.solve(net, data, train, method="static")
    f0 = sol.extras["output_offset"][:, 0]
    np.testing.assert_allclose(sol.train_predictions[0], f0[:5], rtol=0, atol=0)
    # mse on f + f0 from f0: the residual decays as (1 - lr K) (y - f0)
    K = 2 * data.kx[:5, :5]
    r = data.y_train - f0[:5]
    for _ in range(10):
        r = r - 0.2 * K @ r
    np.testing.assert_allclose(data.y_train - sol.train_predictions[-1], r, rtol=1e-10,
                               atol=1e-12)


# --- refusals ----------------------------------------------------------------------------------
def test_refusals_name_the_fix():
    data = _views()
    net = dmft.MLP(1, "tanh")
    with pytest.raises(ValueError, match="output_offset='nngp'"):
        dmft.solve(net, data, _bt(output_offset="none"), method="static")
    with pytest.raises(ValueError, match="mini-batches are not supported"):
        _bt(batch_size=2)
    with pytest.raises(ValueError, match="Dataset.views"):
        dmft.solve(net, dmft.Dataset(np.ones((4, 2)), np.zeros(4)), _bt(), method="static")
    with pytest.raises(ValueError, match="loss='barlow_twins', not 'mse'"):
        dmft.solve(net, data, dmft.GradientDescent(0.0, 0.1, 3), method="static")
    with pytest.raises(ValueError, match="does not solve the Barlow Twins loss"):
        dmft.solve(net, data, _bt(gamma0=1.0), method="perturbative")
    with pytest.raises(ValueError, match="off_diagonal must be"):
        _bt(off_diagonal=-1)
    with pytest.raises(ValueError, match="output_offset must be one of"):
        _bt(output_offset="ntk")
    with pytest.raises(ValueError, match="offset_scale must be"):
        _bt(offset_scale=0)
    with pytest.raises(ValueError, match="X_a and X_b must have the same shape"):
        dmft.Dataset.views(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="dim must be an integer"):
        dmft.Dataset.views(np.ones((3, 2)), np.ones((3, 2)), dim=0)
    with pytest.raises(ValueError, match="labels_test must be 2 integer"):
        dmft.Dataset.views(np.ones((3, 2)), np.ones((3, 2)), X_test=np.ones((2, 2)),
                           labels_test=[0.5, 1])
    with pytest.raises(ValueError, match="paired=True needs an even number"):
        dmft.Dataset(np.ones((3, 2)), np.zeros(3), paired=True)
    with pytest.raises(ValueError, match="augment must be a callable"):
        dmft.Dataset.augmented(np.ones((3, 2)), "noise")


# --- augmentations -------------------------------------------------------------------------------
def test_augmentations():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 16))
    a = dmft.augment.gaussian_noise(0.5)(X, np.random.default_rng(1))
    assert np.std(a - X) == pytest.approx(0.5, rel=0.03)        # 3200 draws: se 1.3 %
    m = dmft.augment.random_mask(0.25)(X, np.random.default_rng(1))
    assert np.mean(m == 0) == pytest.approx(0.25, abs=0.03)      # se 0.8 %
    img = np.arange(16.0).reshape(1, 16)
    s = dmft.augment.shift(1, shape=(4, 4))
    out = s(img, np.random.default_rng(5)).reshape(4, 4)
    dy, dx = np.random.default_rng(5).integers(-1, 2, size=(1, 2))[0]
    ref = np.zeros((4, 4))
    src = img.reshape(4, 4)
    for i in range(4):
        for j in range(4):
            if 0 <= i - dy < 4 and 0 <= j - dx < 4:
                ref[i, j] = src[i - dy, j - dx]
    np.testing.assert_array_equal(out, ref)
    d1 = dmft.Dataset.augmented(X[:5], dmft.augment.compose(
        dmft.augment.gaussian_noise(0.1), dmft.augment.random_mask(0.1)), dim=3, seed=9)
    d2 = dmft.Dataset.augmented(X[:5], dmft.augment.compose(
        dmft.augment.gaussian_noise(0.1), dmft.augment.random_mask(0.1)), dim=3, seed=9)
    assert d1 == d2 and d1.paired and d1.M == 5 and d1.P == 10 and d1.C == 3
    assert not np.array_equal(d1.X_train[:5], d1.X_train[5:])
    with pytest.raises(ValueError, match="must be smaller than the image"):
        dmft.augment.shift(8)
    with pytest.raises(ValueError, match="rows of X must be 8 x 8"):
        dmft.augment.shift(1)(X, rng)
    with pytest.raises(ValueError, match="p must be < 1"):
        dmft.augment.random_mask(1.0)


# --- read-outs -----------------------------------------------------------------------------------
def test_linear_probe_and_ntk_change_on_constructed_cases():
    data = _views(M=4, Q=40, dim=2)
    net = dmft.MLP(1, "tanh")
    sol = dmft.solve(net, data, _bt(steps=3), method="static")
    labels = data.labels_test
    # embeddings that carry the label: a perfect probe; pure noise: chance
    rng = np.random.default_rng(0)
    sol.test_predictions = np.stack([np.column_stack([labels * 3.0 - 1.5,
                                                      rng.standard_normal(40)])] * 4)
    assert np.all(dmft.linear_probe(sol) == 1.0)
    sol.test_predictions = rng.standard_normal((4, 40, 2))
    acc = dmft.linear_probe(sol)
    assert np.all(acc <= 0.85)          # 20 held-out points at chance: P(acc > 0.85) ~ 1e-3
    sol.ntk = sol.ntk.copy()
    sol.ntk[2] *= 1.5
    np.testing.assert_allclose(dmft.ntk_change(sol), [0, 0, 0.5, 0], atol=1e-14)
    with pytest.raises(ValueError, match="labels_test"):
        dmft.linear_probe(dmft.solve(net, _views(Q=4).__class__.views(
            data.X_train[:4], data.X_train[4:], dim=2), _bt(steps=2), method="static"))
    with pytest.raises(ValueError, match="train_fraction"):
        dmft.linear_probe(sol, train_fraction=1.5)


def test_read_outs_of_an_ensemble_have_a_seed_axis():
    data = _views(M=4, Q=6, dim=2)
    net = dmft.MLP(1, "tanh")
    ens = dmft.simulate(net, data, _bt(gamma0=1.0, steps=4), width=64, seeds=range(3),
                        center=True)
    assert dmft.cross_correlation(ens).shape == (3, 5, 2, 2)
    assert dmft.ntk_change(ens).shape == (3, 5)
    assert dmft.linear_probe(ens).shape == (3, 5)
    # every network starts at the same offset (centred networks): same C(0)
    C0 = dmft.cross_correlation(ens)[:, 0]
    np.testing.assert_allclose(C0, C0[:1].repeat(3, 0), rtol=1e-12, atol=1e-14)


# --- files ---------------------------------------------------------------------------------------
def test_hdf5_round_trip(tmp_path):
    data = _views(M=4, Q=5, dim=3)
    sol = dmft.solve(dmft.MLP(1, "erf"), data, _bt(steps=5, standardize=False), method="static")
    path = tmp_path / "bt.h5"
    sol.save(path)
    back = dmft.load(path)
    assert back.data == data and back.data.paired and back.data.M == 4
    np.testing.assert_array_equal(back.data.labels_test, data.labels_test)
    assert back.train == sol.train
    np.testing.assert_array_equal(back.train_predictions, sol.train_predictions)
    np.testing.assert_array_equal(back.extras["output_offset"], sol.extras["output_offset"])
    np.testing.assert_allclose(back.train_loss, sol.train_loss, rtol=1e-15)
    assert back.test_loss is None and back.train_accuracy is None


# --- configuration files -------------------------------------------------------------------------
def test_config_views_generator_and_barlow_twins_keys(tmp_path):
    from dmft.config import clustered_views, load_config, run
    cfg = tmp_path / "bt.toml"
    cfg.write_text('[net]\ndepth = 1\nactivation = "tanh"\n'
                   '[data]\ngenerator = "views"\nM = 5\nQ = 6\nD = 4\ndim = 2\nnoise = 0.3\n'
                   '[train]\ngamma0 = 0.0\nlr = 0.3\nsteps = 6\nloss = "barlow_twins"\n'
                   'output_offset = "nngp"\noff_diagonal = 0.5\nstandardize = true\n'
                   'offset_seed = 3\n[solve]\nmethod = "static"\n')
    conf = load_config(str(cfg))
    assert conf.data == clustered_views(M=5, Q=6, D=4, dim=2, noise=0.3)
    assert conf.train.off_diagonal == 0.5 and conf.train.offset_seed == 3
    sol = run(conf)
    assert sol.train_loss[-1] < sol.train_loss[0]
    assert dmft.linear_probe(sol).shape == (7,)
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ngenerator = "views"\nP = 4\n[train]\nloss = "barlow_twins"\n'
                   '[solve]\nmethod = "static"\n')
    with pytest.raises(ValueError, match="P"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="data.M must be an integer >= 2"):
        clustered_views(M=1)


def test_plot_draws_the_cross_correlation_and_the_probe(tmp_path):
    data = _views(M=4, Q=8, dim=2)
    sol = dmft.solve(dmft.MLP(1, "tanh"), data, _bt(steps=4), method="static")
    fig = dmft.plot(sol, tmp_path / "bt.png")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "cross-correlation C_ij of the views" in labels
    assert "linear-probe accuracy (held-out test points)" in labels
    assert (tmp_path / "bt.png").stat().st_size > 0
