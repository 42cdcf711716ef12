"""dmft.simulate beyond one squared-error output (docs/theory.rst §7), against autograd.

What they prove:
- every loss (mse with C = 3, cross-entropy with C = 3, logistic, hinge), weight decay toward
  the initialisation and toward zero, mini-batches (epochs and online) and the centred model,
  at depth 1 and 2: the predictions and the NTK of dmft.simulate equal those of the same
  network written independently in PyTorch (float64) and trained step by step with
  ``theta <- theta - lr (gamma0^2 N dLoss/dtheta + lambda (theta - theta_bar))`` by autograd,
  the NTK being gamma0^2 N J J^T of the autograd Jacobian over (point, output) pairs;
- the recorded two-time kernels with C outputs rebuild the recorded NTK over (point, output)
  pairs at every time, and the ensemble summaries (mean, var, NaN kernels when not recorded)
  have the output-axis shapes;
- the mean initial NTK over outputs is delta_cc' times the static NTK, within error bars;
- the pending low-rank machinery with weight decay (scalar factor toward zero, per-step fold
  toward the initialisation) equals dense updates to rounding;
- one-output problems keep the (N,) readout and the original draw order; a plain problem takes
  the original code path bit for bit; checkpoints fingerprint the new training fields.
"""

import numpy as np
import pytest

import dmft
from conftest import loss_data, requires_torch, torch_train_mlp
from solvers import network
from solvers.objective import Objective

#: every tolerance of this file, with where it comes from
TOL = {
    # the same float64 arithmetic in another order (BLAS vs torch, pending low-rank factors);
    # a convention error (a missing gamma0, N, a, or mask) is O(1) relative
    "autograd": dict(rtol=1e-10, atol=1e-12),
    "rounding": dict(rtol=1e-11, atol=1e-13),
}


# --- an independent PyTorch network of the package's convention ------------------------------
def _torch_loss(torch, loss, f, Y):
    """Summed loss of predictions f (B, C) against targets Y (B, C), written out directly."""
    if loss == "mse":
        return 0.5 * ((f - Y) ** 2).sum()
    if loss == "cross_entropy":
        return -(Y * torch.log_softmax(f, dim=1)).sum()
    if loss == "logistic":
        return torch.nn.functional.softplus(-Y * f).sum()
    if loss == "hinge":
        return torch.relu(1.0 - Y * f).sum()
    raise AssertionError(loss)


def _epochs(P, steps, B, seed):
    """The 'epochs' schedule spelled out: a fresh permutation per epoch, cut into chunks."""
    rng = np.random.default_rng(seed)
    batches = []
    while len(batches) < steps:
        perm = rng.permutation(P)
        batches += [perm[i:i + B] for i in range(0, P, B)]
    return batches[:steps]


def _torch_run(*args, **kwargs):
    """Train the network of ``numpy.random.default_rng(seed)`` in torch; returns f (T+1, n, C)
    and K (T+1, n, C, n, C). Tiny tensors: one torch thread (several oversubscribe a shared
    machine), restored afterwards."""
    torch = requires_torch()
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _torch_train(torch, *args, **kwargs)
    finally:
        torch.set_num_threads(prev)


def _torch_train(torch, X, Y, P, N, L, act, gamma0, lr, steps, loss, wd=0.0, decay_to="init",
                 batches=None, center=False, seed=0, C=None):
    Yt = torch.tensor(Y.reshape(P, -1), dtype=torch.float64)

    def loss_of(f, k):
        idx = np.arange(P) if batches is None else np.asarray(batches[k])
        return _torch_loss(torch, loss, f[:P][idx], Yt[idx])
    return torch_train_mlp(torch, X, N, L, act, steps, lr, loss_of, out_scale=1.0 / (gamma0 * N),
                           grad_scale=gamma0 ** 2 * N, C=C, wd=wd, decay_to=decay_to,
                           center=center, seed=seed)


def _data(loss, P=4, Q=2, D=3, C=3, seed=0):
    return loss_data(loss, P, Q, D, C, seed)


CASES = [
    # loss, depth, gamma0, lr, weight decay, decay_to, batch_size, schedule, center
    ("mse", 1, 1.0, 0.4, 0.0, "init", None, "epochs", False),
    ("mse", 2, 0.7, 0.4, 0.3, "zero", 3, "epochs", False),
    ("cross_entropy", 1, 1.5, 0.8, 0.5, "init", None, "epochs", False),
    ("cross_entropy", 2, 1.0, 0.8, 0.0, "init", 2, "epochs", True),
    ("logistic", 1, 1.0, 0.8, 0.4, "zero", None, "epochs", True),
    ("logistic", 2, 2.0, 0.5, 0.2, "init", 1, "online", False),
    ("hinge", 1, 1.0, 0.5, 0.3, "init", 3, "epochs", False),
    ("hinge", 2, 1.0, 0.5, 0.3, "zero", None, "epochs", False),
]


@pytest.mark.parametrize("loss, L, gamma0, lr, wd, to, B, schedule, center", CASES)
def test_simulate_matches_autograd(loss, L, gamma0, lr, wd, to, B, schedule, center):
    requires_torch()
    N, T, seed = 32, 5, 3
    data = _data(loss, P=6 if schedule == "online" else 4)
    P, multi = data.P, data.multi_output
    train = dmft.GradientDescent(gamma0, lr, T, loss=loss, weight_decay=wd, decay_to=to,
                                 batch_size=B, batch_seed=4, schedule=schedule)
    net = dmft.MLP(L, "tanh")
    ens = dmft.simulate(net, data, train, width=N, seeds=[seed], center=center)
    if B is None:
        batches = None
    elif schedule == "online":
        batches = [np.arange(t * B, (t + 1) * B) for t in range(T)]
    else:
        batches = _epochs(P, T, B, 4)
    f, K = _torch_run(data.X, data.y_train, P, N, L, "tanh", gamma0, lr, T, loss, wd, to,
                      batches, center, seed, C=data.C if multi else None)
    if not multi:
        f, K = f[..., 0], K[:, :, 0, :, 0]
    np.testing.assert_allclose(ens.predictions[0], f, **TOL["autograd"])
    np.testing.assert_allclose(ens.ntk[0], K, **TOL["autograd"])
    # the run is not trivial: the predictions and the kernel moved
    assert np.abs(f[-1] - f[0]).max() > 1e-2
    assert np.abs(K[-1] - K[0]).max() > 1e-3 * np.abs(K[0]).max()


def test_record_kernels_with_outputs():
    """G(t, t) and Phi(t, t) rebuild the recorded NTK over (point, output) pairs; summaries."""
    data = _data("cross_entropy", P=3, Q=1)
    net, C, n = dmft.MLP(2, "relu"), data.C, 4
    train = dmft.GradientDescent(1.0, 0.5, 3, loss="cross_entropy", weight_decay=0.2)
    ens = dmft.simulate(net, data, train, width=24, seeds=range(2), record_kernels=True)
    assert ens.g.shape == (2, 2, 4, 4, n, C, n, C) and ens.phi.shape == (2, 2, 4, 4, n, n)
    assert ens.ntk.shape == (2, 4, n, C, n, C) and ens.train_predictions.shape == (2, 4, 3, C)
    kx = data.kx
    for t in range(4):
        d = np.arange(t, t + 1)
        phi = ens.phi[:, :, d, d][:, :, 0]          # (S, L, n, n)
        g = ens.g[:, :, d, d][:, :, 0]              # (S, L, n, C, n, C)
        K = np.einsum("sab,scd->sacbd", phi[:, 1], np.eye(C)[None].repeat(2, 0))
        K = K + kx[None, :, None, :, None] * g[:, 0] + phi[:, 0, :, None, :, None] * g[:, 1]
        np.testing.assert_allclose(ens.ntk[:, t], K, **TOL["rounding"])
    m, v = ens.mean(), ens.var()
    assert m.g.shape == ens.g.shape[1:] and v.ntk.shape == ens.ntk.shape[1:]
    m2 = dmft.simulate(net, data, train, width=24, seeds=range(2)).mean()
    assert m2.g.shape == ens.g.shape[1:] and np.all(np.isnan(m2.g))
    np.testing.assert_array_equal(m2.ntk, m.ntk)
    assert ens.train_accuracy.shape == (2, 4) and ens.train_loss.shape == (2, 4)


@pytest.mark.parametrize("to", ["init", "zero"])
def test_low_rank_with_decay_matches_dense(to):
    """Pending factors under weight decay (any fold schedule) equal dense per-step updates."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((5, 3))
    Y = rng.standard_normal((4, 2))
    obj = Objective("mse", Y, 5, 6, 0.3, weight_decay=0.4, decay_to=to)
    out = []
    for fold in (1, 3, None):
        wts = network.Weights.draw(np.random.default_rng(2), 3, 40, 3, outputs=2)
        out.append(network.train(X, Y, wts, activation="tanh", gamma0=0.8, lr=0.3, steps=6,
                                 fold_every=fold, objective=obj))
        out[-1]["W"] = wts.W[1].copy()
    for o in out[1:]:
        for k in ("predictions", "ntk", "W"):
            np.testing.assert_allclose(o[k], out[0][k], **TOL["rounding"])


def test_one_output_keeps_readout_and_plain_path():
    """C = 1: readout (N,), the draw order of before; a plain objective is the old path."""
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((5, 3)), rng.standard_normal(3)
    a = network.Weights.draw(np.random.default_rng(9), 3, 16, 2)
    b = network.Weights.draw(np.random.default_rng(9), 3, 16, 2, outputs=3)
    assert a.w.shape == (16,) and b.w.shape == (16, 3)
    np.testing.assert_array_equal(a.W0, b.W0)
    np.testing.assert_array_equal(a.W[0], b.W[0])
    ra = network.train(X, y, a, activation="erf", gamma0=1.0, lr=0.2, steps=4)
    c = network.Weights.draw(np.random.default_rng(9), 3, 16, 2)
    rc = network.train(X, y, c, activation="erf", gamma0=1.0, lr=0.2, steps=4,
                       objective=Objective("mse", y, 5, 4, 0.2))
    for k in ra:
        assert np.array_equal(ra[k], rc[k]), k
    with pytest.raises(ValueError, match="outputs=C"):
        network.train(X, y, b, activation="erf", gamma0=1.0, lr=0.2, steps=4,
                      objective=Objective("mse", y, 5, 4, 0.2))
    with pytest.raises(ValueError, match="needs objective="):
        network.train(X, y, b, activation="erf", gamma0=1.0, lr=0.2, steps=4)


def test_checkpoint_resumes_and_fingerprints_training_fields(tmp_path, monkeypatch):
    """A run interrupted after one network resumes bit for bit; another loss, decay or batch
    schedule is refused (the checkpoint fingerprints the training fields)."""
    data = _data("hinge", P=4, Q=1)
    net = dmft.MLP(1, "tanh")
    path = tmp_path / "sim.ckpt.npz"
    tr = dmft.GradientDescent(1.0, 0.3, 3, loss="hinge", weight_decay=0.1, batch_size=2)
    full = dmft.simulate(net, data, tr, width=16, seeds=range(3))
    real = network.train
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(network, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            dmft.simulate(net, data, tr, width=16, seeds=range(3), checkpoint=path)
    assert path.exists()
    for other in (dict(weight_decay=0.2), dict(decay_to="zero"), dict(batch_size=3),
                  dict(batch_seed=1), dict(loss="logistic")):
        changed = dmft.GradientDescent(1.0, 0.3, 3, **{**dict(
            loss="hinge", weight_decay=0.1, batch_size=2), **other})
        with pytest.raises(ValueError, match="checkpoint"):
            dmft.simulate(net, data, changed, width=16, seeds=range(3), checkpoint=path)
    res = dmft.simulate(net, data, tr, width=16, seeds=range(3), checkpoint=path)
    assert res.options["resumed_units"] == 1 and not path.exists()
    np.testing.assert_array_equal(res.predictions, full.predictions)
    np.testing.assert_array_equal(res.ntk, full.ntk)


def test_initial_ntk_over_outputs_matches_static():
    """E K_{mu c, nu c'}(0) of simulated networks = delta_cc' K_static (docs/theory.rst §7),
    within Monte Carlo error bars (max over entries: TOL_Z standard errors)."""
    TOL_Z = 4.5               # a max over ~150 correlated entries, false alarm ~1e-4 each
    data = _data("cross_entropy", P=3, Q=1, D=5)
    net = dmft.MLP(2, "relu")
    train = dmft.GradientDescent(1.0, 0.1, 1, loss="cross_entropy")
    ens = dmft.simulate(net, data, train, width=256, seeds=range(24))
    K0 = ens.ntk[:, 0]                                        # (S, n, C, n, C)
    mean, se = K0.mean(0), K0.std(0, ddof=1) / np.sqrt(K0.shape[0])
    ref = dmft.solve(net, data, train, method="static").ntk[0]
    assert ref.shape == mean.shape
    z = np.abs(mean - ref) / np.maximum(se, 1e-12)
    assert z.max() < TOL_Z, z.max()
    # the check can fail: the outputs are not coupled at t = 0, a coupled reference is refuted
    C = ref.shape[1]
    assert C >= 2
    wrong = ref + ref[:, :1, :, :1] * (1 - np.eye(C))[None, :, None, :]
    assert (np.abs(mean - wrong) / np.maximum(se, 1e-12)).max() > 10


def test_ntk_parameterised_networks_approach_the_static_kernel_machine():
    """gamma0 = 1/sqrt(N) is the NTK parameterisation (benchmarks/nn_svm.py): centred networks
    trained with cross-entropy (C = 3), weight decay toward the initialisation and mini-batches
    approach method="static" (the kernel machine) like N^(-1/2)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 5))
    labels = np.array([0, 1, 2, 0, 1, 2, 1, 0])
    data = dmft.Dataset.from_labels(X[:6], labels[:6], X[6:], labels[6:])
    assert data.C == 3
    net, S, widths = dmft.MLP(1, "tanh"), 12, (256, 4096)
    kw = dict(loss="cross_entropy", weight_decay=0.3, batch_size=3)
    f_static = dmft.solve(net, data, dmft.GradientDescent(0.0, 0.5, 20, **kw),
                          method="static").predictions
    d, se = [], []
    for N in widths:
        tr = dmft.GradientDescent(1 / np.sqrt(N), 0.5, 20, **kw)
        ens = dmft.simulate(net, data, tr, width=N, seeds=range(S), center=True)
        dist = np.abs(ens.predictions - f_static[None]).mean(axis=(1, 2, 3))   # per network
        d.append(dist.mean())
        se.append(dist.std(ddof=1) / np.sqrt(S))
    slope = np.log(d[1] / d[0]) / np.log(widths[1] / widths[0])
    se_slope = np.hypot(se[0] / d[0], se[1] / d[1]) / np.log(widths[1] / widths[0])
    # 0.1: subleading O(1/N) terms at these widths (the benchmark's range); 4 se: sampling
    assert abs(slope + 0.5) < 0.1 + 4 * se_slope, (slope, se_slope)
    # and the limit is the decayed machine: without decay the static answer is far away
    f_nodecay = dmft.solve(net, data, dmft.GradientDescent(
        0.0, 0.5, 20, loss="cross_entropy", batch_size=3), method="static").predictions
    assert d[1] < 0.2 * np.abs(f_nodecay - f_static).mean(), d
