"""dmft.simulate with the Barlow Twins loss, in the muP convention and the NTK parameterisation.

What they prove:
- the Barlow Twins loss's error signal (solvers.objective.barlow_twins) is -dL/dF of the loss
  written independently in PyTorch (autograd, float64) and of central finite differences, with
  and without standardisation, for C = 1, 2, 3 outputs;
- networks trained by dmft.simulate on the Barlow Twins loss (C = 2, 3; depth 1 and 2; muP and
  ``parameterization="ntk"``; with and without standardisation; with the NNGP output offset,
  centred or not; weight decay toward the initialisation and toward zero) have the predictions
  and NTK of the same network written independently in PyTorch and trained step by step by
  plain gradient descent on the Barlow Twins loss computed in torch (the NTK-parameterised one
  written in its own textbook form: f = w . phi / sqrt(N), theta <- theta - lr dL/dtheta,
  K = J J^T), to 1e-10 relative;
- ``parameterization="ntk"`` is exactly the package's convention at gamma0 = 1/sqrt(N) (bit
  for bit), ignores train.gamma0 (0 allowed), records what it did (train.gamma0 = 1/sqrt(N),
  options["parameterization"], options["gamma0_given"]) and round-trips through HDF5 and a
  config file; bad values are refused; a checkpoint of one parameterisation does not resume
  the other;
- (slow) the NTK-constancy theorem (arXiv 2411.11176): two-layer tanh and relu networks in the NTK parameterisation
  trained on the Barlow Twins loss have sup_t ||K(t) - K(0)||_F / ||K(0)||_F falling with
  width at least as fast as N^(-1/2) (the theorem's bound; the rate measured is faster, see
  :func:`test_ntk_change_falls_with_width`), and the centred networks started at the NNGP
  offset converge to method="static" with the same train, max |f_N - f_static| ~ N^(-1/2).
"""
import math
import os

import numpy as np
import pytest

import dmft
from conftest import requires_torch, torch_train_mlp
from solvers.objective import barlow_twins

#: every tolerance of this file, with where it comes from
TOL = {
    # the same float64 arithmetic in another order (BLAS vs torch, pending low-rank factors,
    # gamma0 N = N / sqrt(N) vs sqrt(N)); a convention error (a missing gamma0, N, a, the
    # offset, a standardisation term) is O(1) relative. Over a few steps the rounding stays
    # ~1e-14 relative.
    "autograd": dict(rtol=1e-10, atol=1e-12),
    # central differences with step h: truncation O(h^2 L''') ~ 1e-10 and rounding
    # O(eps L / h) ~ 1e-11 at h = 1e-5, relative to the O(1) gradient entries
    "fd": dict(rtol=1e-7, atol=1e-9),
    # the theorem's bound: sup_t ||K(t) - K(0)|| / ||K(0)|| falls at least as fast as N^(-1/2);
    # the tolerance on the fitted slope is 0.1
    "slope": 0.1,
}


def _torch():
    torch = requires_torch()
    return torch


# --- the Barlow Twins loss written independently in torch ------------------------------------
def _bt_torch(torch, F, off_diagonal, standardize):
    """L = sum_i (1 - C_ii)^2 + off_diagonal sum_{i != j} C_ij^2 with C = Z^A^T Z^B / M,
    F (2M, C) the views A then B, Z standardised per column over the M samples when asked."""
    M = F.shape[0] // 2
    ZA, ZB = F[:M], F[M:]
    if standardize:
        ZA = (ZA - ZA.mean(0)) / torch.sqrt(((ZA - ZA.mean(0)) ** 2).mean(0))
        ZB = (ZB - ZB.mean(0)) / torch.sqrt(((ZB - ZB.mean(0)) ** 2).mean(0))
    Cm = ZA.T @ ZB / M
    d = torch.diagonal(Cm)
    off = Cm - torch.diag(d)
    return ((1.0 - d) ** 2).sum() + off_diagonal * (off ** 2).sum()


@pytest.mark.parametrize("C, standardize, off", [(1, True, 1.0), (2, True, 1.0),
                                                 (3, False, 0.3), (3, True, 2.0)])
def test_bt_gradient_against_autograd_and_fd(C, standardize, off):
    torch = _torch()
    rng = np.random.default_rng(C)
    F = rng.standard_normal((10, C))
    value, delta = barlow_twins(F, off_diagonal=off, standardize=standardize)
    Ft = torch.tensor(F, dtype=torch.float64, requires_grad=True)
    Lt = _bt_torch(torch, Ft, off, standardize)
    (grad,) = torch.autograd.grad(Lt, Ft)
    np.testing.assert_allclose(value, Lt.item(), **TOL["autograd"])
    np.testing.assert_allclose(-delta, grad.numpy(), **TOL["autograd"])
    # central finite differences of the package's own loss value
    h = 1e-5
    fd = np.empty_like(F)
    for idx in np.ndindex(*F.shape):
        e = np.zeros_like(F)
        e[idx] = h
        fd[idx] = (barlow_twins(F + e, off, standardize)[0]
                   - barlow_twins(F - e, off, standardize)[0]) / (2 * h)
    scale = np.abs(fd).max()
    np.testing.assert_allclose(-delta / scale, fd / scale, **TOL["fd"])


# --- an independent torch network trained on the Barlow Twins loss ---------------------------
def _torch_bt_train(torch, X, P, N, L, act, steps, lr, *, param="mup", gamma0=1.0, C=2,
                    off_diagonal=1.0, standardize=True, offset=None, center=False, wd=0.0,
                    decay_to="init", seed=0, loss_fn=None):
    """f (T+1, n, C) as reported (network output, minus its initial value if ``center``, plus
    ``offset``) and K (T+1, n, C, n, C) of the network drawn from default_rng(seed) in the
    order W0, W1.., w. ``param="ntk"``: f = w . phi / sqrt(N), theta -= lr (dL/dtheta +
    wd (theta - bar)), K = J J^T; ``"mup"``: f = w . phi / (gamma0 N), the gradient times
    gamma0^2 N, K = gamma0^2 N J J^T. ``loss_fn(f_train)``: another loss (default Barlow
    Twins)."""
    out_scale = 1.0 / math.sqrt(N) if param == "ntk" else 1.0 / (gamma0 * N)
    grad_scale = 1.0 if param == "ntk" else gamma0 ** 2 * N

    def loss_of(f, k):
        return _bt_torch(torch, f[:P], off_diagonal, standardize) if loss_fn is None \
            else loss_fn(f[:P])
    return torch_train_mlp(torch, X, N, L, act, steps, lr, loss_of, out_scale=out_scale,
                           grad_scale=grad_scale, C=C, wd=wd, decay_to=decay_to,
                           center=center, offset=offset, seed=seed)


def _views(M=3, D=4, C=2, Q=2, seed=0, sigma=0.3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((M, D))
    return dmft.Dataset.augmented(X, dmft.augment.gaussian_noise(sigma), dim=C, seed=seed + 1,
                                  X_test=rng.standard_normal((Q, D)),
                                  labels_test=np.arange(Q) % 2)


CASES = [
    # param, C, depth, act, standardize, off_diagonal, offset, center, wd, decay_to, gamma0
    ("mup", 2, 1, "tanh", True, 1.0, "none", False, 0.0, "init", 0.5),
    ("mup", 3, 2, "tanh", False, 0.5, "nngp", True, 0.4, "init", 1.0),
    ("mup", 2, 1, "relu", True, 1.0, "nngp", False, 0.3, "zero", 2.0),
    ("ntk", 2, 1, "tanh", True, 1.0, "none", False, 0.0, "init", 0.0),
    ("ntk", 3, 1, "relu", True, 2.0, "nngp", True, 0.5, "init", 1.0),
    ("ntk", 2, 2, "tanh", False, 1.0, "nngp", True, 0.0, "init", 3.0),
    ("ntk", 3, 2, "relu", True, 0.7, "nngp", False, 0.4, "zero", 1.0),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-C{c[1]}-L{c[2]}-{c[3]}-std{c[4]}-"
                                             f"{c[6]}-center{c[7]}-wd{c[8]}{c[9]}"
                                             for c in CASES])
def test_bt_training_matches_autograd(case):
    torch = _torch()
    param, C, L, act, std, off, offset, center, wd, decay_to, gamma0 = case
    data = _views(C=C, seed=L)
    N, T, lr = 12, 4, 0.3
    train = dmft.GradientDescent(gamma0=gamma0, lr=lr, steps=T, loss="barlow_twins",
                                 off_diagonal=off, standardize=std, weight_decay=wd,
                                 decay_to=decay_to, output_offset=offset)
    ens = dmft.simulate(dmft.MLP(L, act), data, train, width=N, seeds=[3], center=center,
                        parameterization=param)
    f0 = ens.extras.get("output_offset") if offset == "nngp" else None
    assert (f0 is not None) == (offset == "nngp")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        f, K = _torch_bt_train(torch, data.X, data.P, N, L, act, T, lr, param=param,
                               gamma0=gamma0, C=C, off_diagonal=off, standardize=std,
                               offset=f0, center=center, wd=wd, decay_to=decay_to, seed=3)
    finally:
        torch.set_num_threads(prev)
    P = data.P
    pred = np.concatenate([ens.train_predictions[0], ens.test_predictions[0]], axis=1)
    scale_f = np.abs(f).max()
    np.testing.assert_allclose(pred / scale_f, f / scale_f, **TOL["autograd"])
    scale_k = np.abs(K).max()
    np.testing.assert_allclose(ens.ntk[0] / scale_k, K / scale_k, **TOL["autograd"])
    # the loss moved: the comparison covers real training, not a standing network
    assert np.abs(f[-1, :P] - f[0, :P]).max() > 1e-3 * scale_f


@pytest.mark.parametrize("loss, C, center", [("mse", 2, False), ("cross_entropy", 3, True),
                                             ("logistic", 1, False), ("hinge", 1, True)])
def test_ntk_other_losses_match_autograd(loss, C, center):
    """parameterization="ntk" with the per-point losses, against the textbook NTK network."""
    torch = _torch()
    rng = np.random.default_rng(7)
    P, Q, D, N, T, lr = 4, 2, 3, 12, 4, 0.5
    X = rng.standard_normal((P + Q, D))
    if loss == "cross_entropy":
        lab = rng.integers(0, C, P + Q)
        data = dmft.Dataset.from_labels(X[:P], lab[:P], X[P:], lab[P:])
    elif loss == "mse":
        data = dmft.Dataset(X[:P], rng.standard_normal((P, C)), X[P:])
    else:
        data = dmft.Dataset(X[:P], np.array([1.0, -1.0, -1.0, 1.0]), X[P:])
    Y = torch.tensor(np.asarray(data.y_train).reshape(P, C), dtype=torch.float64)
    fns = {"mse": lambda f: 0.5 * ((f - Y) ** 2).sum(),
           "cross_entropy": lambda f: -(Y * torch.log_softmax(f, dim=1)).sum(),
           "logistic": lambda f: torch.nn.functional.softplus(-Y * f).sum(),
           "hinge": lambda f: torch.relu(1.0 - Y * f).sum()}
    train = dmft.GradientDescent(gamma0=0.0, lr=lr, steps=T, loss=loss)
    ens = dmft.simulate(dmft.MLP(1, "tanh"), data, train, width=N, seeds=[2], center=center,
                        parameterization="ntk")
    f, K = _torch_bt_train(torch, data.X, P, N, 1, "tanh", T, lr, param="ntk", C=C,
                           center=center, seed=2, loss_fn=fns[loss])
    pred = np.concatenate([ens.train_predictions[0], ens.test_predictions[0]], axis=1)
    pred = pred.reshape(f.shape)
    np.testing.assert_allclose(pred, f, **TOL["autograd"])
    np.testing.assert_allclose(ens.ntk[0].reshape(K.shape), K, **TOL["autograd"])
    assert np.abs(f[-1, :P] - f[0, :P]).max() > 1e-3


# --- the option itself -----------------------------------------------------------------------
def _bt_problem(C=2, steps=3, **kw):
    data = _views(C=C)
    return dmft.MLP(1, "tanh"), data, dmft.GradientDescent(gamma0=0.0, lr=0.2, steps=steps,
                                                          loss="barlow_twins", **kw)


def test_ntk_is_mup_at_gamma0_one_over_sqrt_n():
    net, data, train = _bt_problem(output_offset="nngp")
    N = 64
    ntk = dmft.simulate(net, data, train, width=N, seeds=[0, 1], parameterization="ntk",
                        center=True)
    import dataclasses
    mup = dmft.simulate(net, data, dataclasses.replace(train, gamma0=1 / np.sqrt(N)),
                        width=N, seeds=[0, 1], center=True)
    assert np.array_equal(ntk.train_predictions, mup.train_predictions)
    assert np.array_equal(ntk.ntk, mup.ntk)
    assert ntk.train.gamma0 == 1 / np.sqrt(N) and ntk.train.lr == train.lr
    assert ntk.options["parameterization"] == "ntk" and ntk.options["gamma0_given"] == 0.0
    assert mup.options["parameterization"] == "mup" and "gamma0_given" not in mup.options
    # the given gamma0 is ignored
    other = dmft.simulate(net, data, dataclasses.replace(train, gamma0=5.0), width=N,
                          seeds=[0, 1], parameterization="ntk", center=True)
    assert np.array_equal(other.train_predictions, ntk.train_predictions)
    assert other.options["gamma0_given"] == 5.0


def test_ntk_plain_output_is_order_one():
    """Without offset or centring the loss sees the network's own f(0) = w . phi / sqrt(N),
    O(1) at every width: over seeds and outputs E f(x)^2 is the NNGP Phi^L(x, x)."""
    from solvers.static import static_kernels
    net, data, train = _bt_problem(steps=1)
    S = 12
    ens = dmft.simulate(net, data, train, width=2048, seeds=range(S), parameterization="ntk")
    assert "output_offset" not in ens.extras
    f0 = ens.train_predictions[:, 0]                        # (S, P, C)
    var = (f0 ** 2).mean(axis=(0, 2))                      # per view
    kdiag = np.diag(static_kernels(net.activation, data.kx, net.depth)["phi"][-1])[:data.P]
    # S C = 24 nearly Gaussian samples per view (the finite-width corrections are O(1/N)):
    # var / Phi ~ chi^2_24 / 24 lies in [0.35, 2.0] with probability > 0.998 per view
    ratio = var / kdiag
    assert np.all((ratio > 0.35) & (ratio < 2.0)), ratio


def test_options_refused_and_recorded(tmp_path):
    net, data, train = _bt_problem()
    with pytest.raises(ValueError, match=r"parameterization must be 'mup'.*or 'ntk'.*'NTK'"):
        dmft.simulate(net, data, train, width=8, seeds=[0], parameterization="NTK")
    # muP with gamma0 = 0 is still refused, and the message points at the NTK option
    with pytest.raises(ValueError, match=r"gamma0 must be > 0.*parameterization='ntk'"):
        dmft.simulate(net, data, train, width=8, seeds=[0])
    # the centred network without an offset starts at f = 0, the loss's stationary point
    with pytest.raises(ValueError, match=r"center=True.*f\(0\) = 0.*stationary.*"
                                         r"output_offset='nngp'"):
        dmft.simulate(net, data, train, width=8, seeds=[0], parameterization="ntk",
                      center=True)
    ens = dmft.simulate(net, data, train, width=8, seeds=[0, 1], parameterization="ntk")
    path = tmp_path / "ntk.h5"
    dmft.save(ens, path)
    back = dmft.load(path)
    assert back.options["parameterization"] == "ntk"
    assert back.options["gamma0_given"] == 0.0
    assert back.train.gamma0 == ens.train.gamma0 == 1 / np.sqrt(8)
    assert np.array_equal(back.train_predictions, ens.train_predictions)


def test_config_key():
    from dmft.config import parse_config, run
    cfg = {"net": {"depth": 1, "activation": "tanh"},
           "data": {"generator": "teacher_student", "P": 4, "Q": 2, "D": 3},
           "train": {"gamma0": 0.0, "lr": 0.1, "steps": 2},
           "simulate": {"width": 16, "seeds": 2, "parameterization": "ntk"}}
    res = run(parse_config(cfg))
    assert res.options["parameterization"] == "ntk" and res.train.gamma0 == 0.25
    cfg["simulate"]["parameterization"] = "standard"
    with pytest.raises(ValueError, match=r"parameterization must be"):
        parse_config(cfg)


def test_checkpoint_keeps_the_parameterization_apart(tmp_path, monkeypatch):
    net, data, train = _bt_problem(output_offset="nngp")
    ck = os.fspath(tmp_path / "c.npz")
    ref = dmft.simulate(net, data, train, width=16, seeds=[0, 1, 2], parameterization="ntk")
    from dmft import _checkpoint
    from dmft._simulate import SIMULATE
    # a checkpoint written by an interrupted ntk run resumes bit for bit ...
    orig = _checkpoint.Checkpoint.save
    calls = []

    def save_then_stop(self, arrays, meta):
        orig(self, arrays, meta)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(_checkpoint.Checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        SIMULATE(net, data, train, width=16, seeds=[0, 1, 2], parameterization="ntk",
                 checkpoint=ck)
    monkeypatch.setattr(_checkpoint.Checkpoint, "save", orig)
    assert os.path.exists(ck)
    # ... is refused by a muP run of the same problem ...
    import dataclasses
    with pytest.raises(ValueError):
        dmft.simulate(net, data, dataclasses.replace(train, gamma0=0.25), width=16,
                      seeds=[0, 1, 2], checkpoint=ck)
    # ... and resumed by the ntk run
    res = dmft.simulate(net, data, train, width=16, seeds=[0, 1, 2], parameterization="ntk",
                        checkpoint=ck)
    assert res.options["resumed_units"] == 2
    assert np.array_equal(res.train_predictions, ref.train_predictions)


# --- the NTK-constancy theorem (arXiv 2411.11176) (slow) ---------------------------------------------------------------
WIDTHS = (128, 512, 2048, 8192)


def ntk_bt_run(activation, width, seeds, *, M=6, D=8, C=2, sigma=0.2, lr=0.2, steps=40,
               offset=True, data_seed=0):
    """One NTK-parameterised Barlow Twins run at ``width``: two-layer ``activation`` networks on
    M samples in D dimensions with Gaussian-noise views (sigma), C outputs, ``steps`` steps of
    ``lr``; with ``offset`` centred and started at the NNGP draw (so that N -> infinity is
    method="static" with the same train). Returns (ensemble, (net, data, train))."""
    rng = np.random.default_rng(data_seed)
    X = rng.standard_normal((M, D))
    data = dmft.Dataset.augmented(X, dmft.augment.gaussian_noise(sigma), dim=C,
                                  seed=data_seed + 1)
    net = dmft.MLP(1, activation)
    train = dmft.GradientDescent(gamma0=1.0, lr=lr, steps=steps, loss="barlow_twins",
                                 output_offset="nngp" if offset else "none")
    ens = dmft.simulate(net, data, train, width=width, seeds=seeds, parameterization="ntk",
                        center=bool(offset))
    return ens, (net, data, train)


def _slope(widths, values):
    """Least-squares slope of log(values) on log(widths) and its standard error."""
    x, y = np.log(np.asarray(widths, float)), np.log(np.asarray(values, float))
    A = np.vstack([x, np.ones_like(x)]).T
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    r = y - A @ coef
    se = math.sqrt(r @ r / (len(x) - 2) / ((x - x.mean()) ** 2).sum())
    return coef[0], se


#: networks per width in the slow tests (the seed average of the sup over t)
SEEDS = 12
#: (activation, C, lr, steps) of the slow tests (C = 2 keeps them at ~25 s on one free core).
#: Measured with C = 3 as well (not run here: 4 x the time): at lr = 0.05, 80 steps the slopes
#: are -1.011 +- 0.010 (tanh) and -0.715 +- 0.029 (relu) for the NTK change and -0.520 +-
#: 0.048, -0.509 +- 0.019 for |f_N - f_static|. At lr = 0.2, C = 3 the static dynamics sits
#: near the edge of stability in its first steps (single networks' loss rises again after
#: step 4, 0.09 -> 0.21, while the static loss falls monotonically), so the O(N^(-1/2))
#: differences of K(0) are amplified into O(0.05 - 0.4) transients that have not settled into
#: the N^(-1/2) law even at N = 32768 (mean max |f_N - f_static| = 0.057 at 8192, 0.055 at
#: 32768).
THEOREM_CASES = [("tanh", 2, 0.2, 40), ("relu", 2, 0.2, 40)]
_ids = [f"{a}-C{c}" for a, c, _, _ in THEOREM_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("activation, C, lr, steps", THEOREM_CASES, ids=_ids)
def test_ntk_change_falls_with_width(activation, C, lr, steps):
    """The NTK-constancy theorem (arXiv 2411.11176): sup_t ||K(t) - K(0)||_F / ||K(0)||_F -> 0 as N -> infinity for
    two-layer networks in the NTK parameterisation trained on the Barlow Twins loss, its bound
    falling as N^(-1/2). Measured on the networks as the seed defines them (the loss sees each
    network's own O(1) output; no offset, no centring).

    The fitted slope must be at most -0.5 + 0.1 (the bound, with the issue's tolerance). The
    rate itself is faster: in this package's convention the NTK parameterisation is
    gamma0 = 1/sqrt(N), and the kernels move by O(gamma0^2) = O(1/N) for a smooth activation
    (the O(gamma0) motion of each unit is odd in its readout weight and averages out over the
    N units to O(gamma0 / sqrt(N)) = O(1/N) as well), so tanh must show slope -1 +- 0.1
    (measured -1.00 +- 0.01 with C = 2, -1.01 +- 0.01 with C = 3). ReLU's derivative jumps:
    the units whose pre-activation crosses zero (a fraction O(N^(-1/2))) change K by O(1/N)
    each with random signs, heuristically O(N^(-3/4)) in all; measured -0.70 +- 0.02 (C = 2)
    over 128 .. 8192 (-0.68 +- 0.02 over 512 .. 32768) and -0.72 +- 0.03 (C = 3), so only the
    bounds -1.1 .. -0.4 are asserted for it.
    """
    sup = []
    for N in WIDTHS:
        ens, _ = ntk_bt_run(activation, N, range(SEEDS), C=C, lr=lr, steps=steps,
                            offset=False)
        assert ens.options["parameterization"] == "ntk"
        sup.append(dmft.ntk_change(ens).max(axis=-1).mean())
    slope, se = _slope(WIDTHS, sup)
    table = ", ".join(f"N={N}: {s:.3g}" for N, s in zip(WIDTHS, sup))
    msg = f"{activation}, C = {C}: slope {slope:.3f} +- {se:.3f} ({table})"
    print(msg)
    assert slope <= -0.5 + TOL["slope"], msg
    if activation == "tanh":
        assert abs(slope + 1.0) <= TOL["slope"], msg
    else:
        assert -1.0 - TOL["slope"] <= slope, msg


@pytest.mark.slow
@pytest.mark.parametrize("activation, C, lr, steps", THEOREM_CASES, ids=_ids)
def test_embeddings_approach_static(activation, C, lr, steps):
    """Centred NTK-parameterised networks started at the NNGP offset converge to
    method="static" (kernelized Barlow Twins with the static NTK) with the same train: the
    networks' NTK(0) differs from the static NTK by O(N^(-1/2)) (a sum of N independent
    units), which moves the embeddings by O(N^(-1/2)); the NTK's own motion is O(1/N). So the
    seed average of max_t,mu,c |f_N - f_static| must fall with slope -0.5 +- 0.1."""
    diffs = []
    static = None
    for N in WIDTHS:
        ens, (net, data, train) = ntk_bt_run(activation, N, range(SEEDS), C=C, lr=lr,
                                             steps=steps, offset=True)
        if static is None:
            static = dmft.solve(net, data, train, method="static")
            assert np.allclose(static.train_predictions[0],
                               ens.extras["output_offset"][:data.P])
        d = np.abs(ens.train_predictions - static.train_predictions[None])
        diffs.append(d.reshape(SEEDS, -1).max(axis=1).mean())
    slope, se = _slope(WIDTHS, diffs)
    table = ", ".join(f"N={N}: {s:.3g}" for N, s in zip(WIDTHS, diffs))
    msg = f"{activation}, C = {C}: slope {slope:.3f} +- {se:.3f} ({table})"
    print(msg)
    assert abs(slope + 0.5) <= TOL["slope"], msg
    # and the networks do get close: within 0.05 of the O(1) embeddings at N = 8192
    assert diffs[-1] < 0.05 * np.abs(static.train_predictions).max(), msg
