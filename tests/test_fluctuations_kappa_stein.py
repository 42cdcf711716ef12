"""The deep propagator's noise covariance kappa without per-sample Hessians
(solvers/fluct/kappa_stein.py, issue 21).

Proved here by:
- same adjoint rows J, same sampled fields: the forward-mode/Hutchinson route
  (``kappa="jvp"``, the default) against the per-sample Hessian route (``kappa="hessian"``)
  on every layer of linear and tanh networks (first, middle and last layers: both response
  channels and the output channel), within the batch-means standard error of their
  *difference* (both see the same samples, so this error is the probes' noise alone, far below
  the Monte Carlo error of kappa itself: the comparison is sharper than the propagator's
  own error bars);
- the Hessian-free route costs no accuracy: its standard errors equal the Hessian route's
  within 10 % (the probes add little variance);
- the Stein route (``kappa="stein"``, whitened sources, no derivatives) is unbiased where the
  sources are non-degenerate but its noise grows as 1 / (smallest kept innovation): measured
  here on the linear network, where it is more than 10 times the Hessian route's (this is
  why it is not the default);
- end to end, ``method="deep-propagator"`` with the default kappa reproduces the exact
  deep-linear propagator: tests/test_fluctuations_deep_mc.py
  ::test_linear_network_reproduces_exact_deep_linear_propagator;
- seeds and bad input.
"""
import numpy as np
import pytest

import dmft
from conftest import small_data as _data

pytestmark = pytest.mark.usefixtures("torch_or_skip")

TOL = {
    "z_diff": 5.0,     # |jvp - hessian| in standard errors of the paired difference (32 blocks,
                       # max over ~700 entries of a near-normal variable: 5 has p ~ 4e-4)
    "z_mean": 1.2,     # mean |z| of the paired difference (0.80 for an unbiased normal)
    "se_ratio": 0.10,  # jvp's standard errors within 10 % of the Hessian route's (median)
}


def _solution(act, depth, steps=3):
    data = _data(2, 1)
    train = dmft.GradientDescent(gamma0=1.0, lr=0.2, steps=steps)
    if act == "linear":
        sol = dmft.solve(dmft.MLP(depth, "linear"), data, train, method="linear")
    else:
        sol = dmft.solve(dmft.MLP(depth, act), data, train, method="mc", samples=1 << 14,
                         seed=0, progress=False)
    return data, train, sol


def _run(data, train, sol, act, depth, kappa, **kw):
    """deep_propagator (solvers.fluct.deep_mc) on the solution's order parameters."""
    import solvers.fluct.deep_mc as dm
    T1, n = train.steps + 1, data.P + data.Q

    def flat(K):
        K = np.asarray(K)
        return np.moveaxis(K, -2, -3).reshape(K.shape[:-4] + (T1 * n, T1 * n))

    f_all = np.concatenate([sol.train_predictions, sol.test_predictions], axis=1)
    return dm.deep_propagator(
        data.kx, np.asarray(data.y_train), act, depth, train.gamma0, train.lr, train.steps,
        f=f_all, phi=flat(sol.phi), g=flat(sol.g), A=flat(sol.A), B=flat(sol.B),
        kappa=kappa, **kw)


def _block_covs(mom, edges):
    out = []
    for b in range(len(edges) - 1):
        cnt = edges[b + 1] - edges[b]
        m1, m2 = mom["m1"][b] / cnt, mom["m2"][b] / cnt
        out.append((m2 - np.outer(m1, m1)) * cnt / (cnt - 1))
    return np.array(out)


@pytest.mark.parametrize("act,depth", [
    ("linear", 2), ("tanh", 2), pytest.param("tanh", 3, marks=pytest.mark.slow),
    pytest.param("linear", 3, marks=pytest.mark.slow)])
def test_jvp_kappa_equals_hessian_kappa_on_the_same_samples(monkeypatch, act, depth):
    """Every layer: the jvp route's kappa (contracted with J) against the Hessian route's on
    the same fields and J, in standard errors of the paired difference (32 batch means).

    Measured (2 + 1 points, 3 steps, 4096 kappa samples, 32 blocks): linear depth 3 max z
    2.7 / 4.0 / 2.1 (first / middle / last layer), mean 0.68 / 0.81 / 0.51; |difference| below
    0.4 % of the largest entry while kappa's own standard error is 5-7 %; time per layer
    jvp 6-12 s, Hessian 8-16 s."""
    import solvers.fluct.deep_mc as dm
    from solvers.fluct.kappa_stein import jvp_kappa_layer

    data, train, sol = _solution(act, depth)
    rows = []
    hess = dm._kappa_layer

    def both(torch, fl, Jl, first, last, edges, chunk, gamma0, act_fn, T1_, n_, progress=None):
        a = hess(torch, fl, Jl, first, last, edges, chunk, gamma0, act_fn, T1_, n_)
        b = jvp_kappa_layer(torch, fl, Jl, first, last, edges, chunk, gamma0=gamma0,
                            act=act_fn, T1=T1_, n=n_, seed=len(rows))
        rows.append((first, last, _block_covs(a, edges), _block_covs(b, edges)))
        return a

    monkeypatch.setattr(dm, "_kappa_layer", both)
    _run(data, train, sol, act, depth, "hessian", samples=2048, kappa_samples=1024,
         blocks=32, seed=3, ntk=True)
    # every layer once per group of observables (the predictions; then the NTK entries):
    # each layer's checks pool the entries of both groups (blocks, entries)
    assert len(rows) == 2 * depth
    layers = []
    for l in range(depth):
        parts = rows[l::depth]
        layers.append((parts[0][0], parts[0][1],
                       np.concatenate([p[2].reshape(len(p[2]), -1) for p in parts], 1),
                       np.concatenate([p[3].reshape(len(p[3]), -1) for p in parts], 1)))
    for first, last, bh, bj in layers:
        ch, cj = bh.mean(0), bj.mean(0)
        scale = np.abs(ch).max()
        nz = np.abs(ch) > 1e-6 * scale
        se_d = (bj - bh).std(0, ddof=1) / np.sqrt(len(bh))
        z = np.abs(cj - ch)[nz] / np.maximum(se_d[nz], 1e-9 * scale)
        assert z.max() < TOL["z_diff"] and z.mean() < TOL["z_mean"], (first, last, z.max(),
                                                                      z.mean())
        # power: the paired comparison resolves far less than kappa's own error bars
        se_h = bh.std(0, ddof=1) / np.sqrt(len(bh))
        se_j = bj.std(0, ddof=1) / np.sqrt(len(bj))
        assert np.median(se_d[nz] / se_h[nz]) < 0.5
        assert abs(np.median(se_j[nz] / se_h[nz]) - 1) < TOL["se_ratio"]


def test_stein_kappa_noise_on_degenerate_sources(monkeypatch):
    """Linear depth 2, first layer (its r sources are nearly degenerate: kept innovations of
    0.1-0.4 % of a source's variance): the Stein route agrees with the Hessian route within
    their combined errors, but its standard error is more than 5 times larger (measured
    10.6x at 4096 samples; end to end the prediction covariance's standard error grew from
    8 % to 140 times the largest entry). On the last layer it is also biased (max z 10.7,
    5 % of the largest entry): Stein's lemma sees derivatives only along the sources'
    support, the formal MSR moments need them along every source coordinate. Hence
    kappa="jvp" is the default."""
    import solvers.fluct.deep_mc as dm
    from solvers.fluct.kappa_stein import stein_kappa_layer

    data, train, sol = _solution("linear", 2)
    rows = []

    def both(torch, fl, Jl, first, last, edges, chunk, *, progress=None, **kw):
        a = stein_kappa_layer(torch, fl, Jl, first, last, edges, chunk, **kw)
        b = dm._kappa_layer(torch, fl, Jl, first, last, edges, chunk, 1.0,
                            dm._activation(torch, "linear"), train.steps + 1,
                            data.P + data.Q)
        rows.append((first, _block_covs(a, edges), _block_covs(b, edges)))
        return a

    monkeypatch.setattr(dm, "stein_kappa_layer", both)
    _run(data, train, sol, "linear", 2, "stein", samples=2048, kappa_samples=1024,
         blocks=16, seed=3, ntk=False)
    assert [r[0] for r in rows] == [True, False]
    for first, bs, bh in rows[:1]:
        cs, ch = bs.mean(0), bh.mean(0)
        se_s = bs.std(0, ddof=1) / np.sqrt(len(bs))
        se_h = bh.std(0, ddof=1) / np.sqrt(len(bh))
        scale = np.abs(ch).max()
        nz = np.abs(ch) > 1e-6 * scale
        z = np.abs(cs - ch)[nz] / np.hypot(se_s, se_h)[nz]
        assert z.max() < 4.5, z.max()
        assert np.median(se_s[nz] / se_h[nz]) > 5.0


def test_jvp_kappa_seeded_and_bad_kappa_refused():
    data, train, sol = _solution("tanh", 2, steps=2)
    kw = dict(samples=512, kappa_samples=256, ntk=False)
    a = _run(data, train, sol, "tanh", 2, "jvp", seed=5, **kw)
    b = _run(data, train, sol, "tanh", 2, "jvp", seed=5, **kw)
    c = _run(data, train, sol, "tanh", 2, "jvp", seed=6, **kw)
    assert np.array_equal(a["pred_cov"], b["pred_cov"])
    assert not np.array_equal(a["pred_cov"], c["pred_cov"])
    assert np.all(np.isfinite(a["pred_cov"])) and np.all(a["pred_cov_se"] > 0)
    with pytest.raises(ValueError, match="kappa='exact'.*'jvp'"):
        _run(data, train, sol, "tanh", 2, "exact", seed=5, **kw)
    with pytest.raises(ValueError, match="kappa_divergence='hutch'.*'exact' or 'probe'"):
        _run(data, train, sol, "tanh", 2, "jvp", seed=5, kappa_divergence="hutch", **kw)


def _batched_march(torch, act, gamma0, C, D, T1, n):
    """A plain torch version of one layer's march as a function of batched sources (B, m) ->
    (phi, g, z), each (B, m): the recursion of ``kappa_hessian._kappa_layer.fields1``
    (h(t) = u(t) + gamma0 C(t, <t) g, z(t) = r(t) + gamma0 D(t, <=t) phi), rows = samples;
    differentiable by torch.func, the reference of solvers.fluct.march_tangents."""
    def fields(u, r):
        Ps, Gs, Zs = [], [], []
        for t in range(T1):
            a, e = t * n, (t + 1) * n
            h = u[:, a:e]
            if t:
                h = h + gamma0 * (torch.cat(Gs, 1) @ C[a:e, :a].T)
            p = act(h, 0)
            z = r[:, a:e] + gamma0 * (torch.cat(Ps + [p], 1) @ D[a:e, :e].T)
            Ps.append(p)
            Zs.append(z)
            Gs.append(act(h, 1) * z)
        return torch.cat(Ps, 1), torch.cat(Gs, 1), torch.cat(Zs, 1)
    return fields


def _synthetic_layer(torch, first, last, S=4096, K=6, n=3, T1=4, coupling=0.3, jscale=0.3,
                     seed=0):
    """A tanh layer with couplings C, D strong enough that every term of kappa, including the
    products of two responses, is resolved; its sampled fields; random adjoint rows J with the
    structural masks of deep_mc."""
    from solvers.fluct.deep_mc import _activation

    rng = np.random.default_rng(seed)
    m = n * T1
    tb = np.repeat(np.arange(T1), n)
    strict = tb[:, None] > tb[None, :]
    lower = tb[:, None] >= tb[None, :]
    dt = torch.float64
    C = torch.tensor(coupling * rng.standard_normal((m, m)) * strict, dtype=dt)
    D = torch.tensor(coupling * rng.standard_normal((m, m)) * lower, dtype=dt)
    Lu = np.linalg.cholesky(np.eye(m) + 0.5)           # correlated, full-rank sources
    u = torch.tensor(rng.standard_normal((S, m)) @ Lu.T, dtype=dt)
    r = torch.tensor(rng.standard_normal((S, m)) @ Lu.T, dtype=dt)
    act = _activation(torch, "tanh")
    with torch.no_grad():
        ph, gg, zz = _batched_march(torch, act, 1.0, C, D, T1, n)(u, r)
    fl = {"phi": ph.T.contiguous(), "g": gg.T.contiguous(), "z": zz.T.contiguous(),
          "u": u, "r": r, "C": C, "D": D}
    J = {k: torch.tensor(rng.standard_normal((K, m, m)) / m, dtype=dt) for k in ("pp", "gg")}
    J["a"] = torch.tensor(jscale * rng.standard_normal((K, m, m)) * lower * (not last),
                          dtype=dt)
    J["b"] = torch.tensor(jscale * rng.standard_normal((K, m, m)) * strict * (not first),
                          dtype=dt)
    J["f"] = torch.tensor(rng.standard_normal((K, m)) * last, dtype=dt)
    return fl, J, act, T1, n


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["exact", "probe"])
@pytest.mark.parametrize("first,last", [(False, False), (True, False), (False, True)])
def test_jvp_kappa_equals_hessian_kappa_strong_coupling(first, last, divergence):
    """Synthetic tanh layer (couplings 0.3, dense random J; 4096 samples, 32 blocks): jvp
    route against the Hessian route on the same samples, first, middle and last layer.
    Power, checked when written (middle layer): dropping V . grad div V, V . grad Y or
    div V div V fails this test (max z 5.3, mean z 1.26, max z 4.0); dropping
    tr(grad V grad V) does not: its mean is below the probes' noise here and in every case
    above (the term is not covered with power by any test in this file). Dense random J is
    the probes' worst case: their noise is 2.4 times kappa's own (on the propagator's J, 1.0
    times). Both divergence routes (exact, the default since 7 Dec 2026, and the two-probe
    Hutchinson estimate; measured on these samples: max z 1.36 / 1.68 middle layer, 3.04 /
    1.99 first, 1.91 / 1.53 last)."""
    import torch

    from solvers.fluct.deep_mc import _kappa_layer
    from solvers.fluct.kappa_stein import jvp_kappa_layer

    fl, J, act, T1, n = _synthetic_layer(torch, first, last)
    edges = np.linspace(0, fl["u"].shape[0], 33).astype(int)
    nthreads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        bh = _block_covs(_kappa_layer(torch, fl, J, first, last, edges, 32, 1.0, act, T1, n),
                         edges)
        bj = _block_covs(jvp_kappa_layer(torch, fl, J, first, last, edges, 32, gamma0=1.0,
                                         act=act, T1=T1, n=n, seed=1, divergence=divergence),
                         edges)
    torch.set_num_threads(nthreads)
    ch, cj = bh.mean(0), bj.mean(0)
    se_d = (bj - bh).std(0, ddof=1) / np.sqrt(len(bh))
    z = np.abs(cj - ch) / np.maximum(se_d, 1e-12 * np.abs(ch).max())
    assert z.max() < TOL["z_diff"] and z.mean() < TOL["z_mean"], (z.max(), z.mean())


@pytest.mark.parametrize("name", ["tanh", "erf", "linear"])
def test_hand_tangents_equal_autodiff(name):
    """solvers.fluct.march_tangents against torch.func.jvp of the same march
    (_batched_march above): first derivatives along k directions per sample and the mixed
    second derivative along direction pairs (nested jvp), on a synthetic layer with strong
    couplings, to rounding."""
    import torch
    from torch.func import jvp

    from solvers.fluct import march_tangents as mt
    from solvers.fluct.deep_mc import _activation

    fl, _, _, T1, n = _synthetic_layer(torch, False, False, S=8)
    act = _activation(torch, name)
    C, D, u, r = fl["C"], fl["D"], fl["u"], fl["r"]
    s, m = u.shape
    k = 3
    rng = np.random.default_rng(4)
    dirs = [torch.tensor(rng.standard_normal((k, s, m))) for _ in range(4)]
    march = _batched_march(torch, act, 0.7, C, D, T1, n)
    U, R = u.repeat(k, 1), r.repeat(k, 1)
    flat = [d.reshape(k * s, m) for d in dirs]
    pr = mt.primal(torch, act, 0.7, C, D, T1, n, u, r)
    ref = march(u, r)
    for key, x in zip(("p", "g", "z"), ref):
        assert torch.allclose(pr[key], x, rtol=0, atol=1e-13)
    tA = mt.tangent(torch, pr, 0.7, C, D, T1, n, du=dirs[0], dr=dirs[1])
    tB = mt.tangent(torch, pr, 0.7, C, D, T1, n, du=None, dr=dirs[2])
    _, dA = jvp(march, (U, R), (flat[0], flat[1]))
    for key, x in zip(("p", "g", "z"), dA):
        got = tA[key].reshape(k * s, m)
        assert torch.allclose(got, x, rtol=0, atol=1e-12 * float(x.abs().max())), key
    # second order: along A (both sources) and B (r only), nested forward mode
    (_, _), (_, d2) = jvp(lambda x, y: jvp(march, (x, y), (flat[0], flat[1])), (U, R),
                          (torch.zeros_like(flat[2]), flat[2]))
    q = mt.second(torch, pr, 0.7, C, D, T1, n, tA, tB)
    for key, x in zip(("p", "g", "z"), d2):
        got = q[key].reshape(k * s, m)
        assert float(x.abs().max()) > 0 or name == "linear"
        assert torch.allclose(got, x, rtol=0, atol=1e-12 * max(1.0, float(x.abs().max()))), key
    # one direction per sample broadcast over the k of A (the probe of jvp_kappa_layer)
    tB1 = {key: v[:1] for key, v in tB.items()}
    q1 = mt.second(torch, pr, 0.7, C, D, T1, n, tA, tB1)
    (_, _), (_, d21) = jvp(lambda x, y: jvp(march, (x, y), (flat[0], flat[1])), (U, R),
                           (torch.zeros_like(flat[2]), dirs[2][:1].repeat(k, 1, 1).reshape(
                               k * s, m)))
    for key, x in zip(("p", "g", "z"), d21):
        assert torch.allclose(q1[key].reshape(k * s, m), x, rtol=0,
                              atol=1e-12 * max(1.0, float(x.abs().max()))), key


@pytest.mark.parametrize("slot,tgroup", [(0, 1), (1, 2), (0, 3)])
def test_exact_divergence_is_the_trace_of_the_autodiff_jacobian(slot, tgroup):
    """kappa_stein._exact_divergence (unit directions marched causally from their own time,
    several time steps per march) against tr(J_i^T dF/dsrc) with the Jacobian of the plain
    torch march by torch.func.jacfwd, per sample, to rounding: channel b (slot 0: g in u)
    and channel a (slot 1: phi in r), time groups that do and do not divide T + 1."""
    import torch
    from torch.func import jacfwd

    from solvers.fluct import march_tangents as mt
    from solvers.fluct.deep_mc import _activation
    from solvers.fluct.kappa_stein import _exact_divergence

    fl, J, _, T1, n = _synthetic_layer(torch, False, False, S=5)
    act = _activation(torch, "tanh")
    C, D, u, r = fl["C"], fl["D"], fl["u"], fl["r"]
    Jc = J["a"] if slot == 1 else J["b"]
    march = _batched_march(torch, act, 0.7, C, D, T1, n)
    pr = mt.primal(torch, act, 0.7, C, D, T1, n, u, r)
    got = _exact_divergence(torch, pr, 0.7, C, D, T1, n, Jc, slot, "p" if slot else "g",
                            tgroup=tgroup)
    for i in range(u.shape[0]):
        if slot == 0:
            A = jacfwd(lambda x: march(x[None], r[i:i + 1])[1][0])(u[i])
        else:
            A = jacfwd(lambda x: march(u[i:i + 1], x[None])[0][0])(r[i])
        want = torch.einsum("kab,ab->k", Jc, A)
        assert float(want.abs().max()) > 0
        assert torch.allclose(got[i], want, rtol=0, atol=1e-12 * float(want.abs().max()))
