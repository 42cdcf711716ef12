"""Checkpoint and resume (``checkpoint=path``; dmft/_checkpoint.py).

What they prove:
- ``method="mc"`` (depth 2, one pass) and ``"gia"``: a solve interrupted by KeyboardInterrupt
  in the middle of a replicate and rerun with the same ``checkpoint`` resumes from the last
  finished replicate and is bit-identical (every field) to an uninterrupted solve; the
  checkpoint survives the interruption and is removed after success;
- ``dmft.simulate``: the same per seed (also with ``record_kernels``, and with a diverged
  seed: its NaN rows and message survive the resume, with ``throw=False`` and ``True``);
- a checkpoint of another problem, other options or another seed is refused, naming what
  differs; a file that is not a checkpoint is refused; ``checkpoint=`` with depth 1 or
  ``scheme="iterative"`` is refused;
- writes are atomic: an interruption during a write leaves the previous checkpoint intact and
  no temporary file behind.
The kill -9 test (separate processes, timing) is tests/test_checkpoint_kill.py (slow).
"""
import dataclasses
import os

import numpy as np
import pytest

import dmft
from conftest import interrupt_after as _interrupt_after, small_deep_problem
import dmft.config
from dmft import _checkpoint
from solvers import network
from solvers.mc import causal

SMALL = dict(samples=768, response_samples=24, replicates=4, progress=False)


@pytest.fixture(scope="module")
def problem():
    return small_deep_problem()


def assert_identical(a, b, resumed=None):
    """Every field of two results equal bit for bit (``elapsed`` excepted, and the provenance
    ``options["resumed_units"]`` of a checkpointed run ``a``, checked equal to ``resumed``)."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        if f.name == "elapsed":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "options" and "resumed_units" in x:
            assert x["resumed_units"] == resumed
            x = {k: v for k, v in x.items() if k != "resumed_units"}
        _same(x, y, f.name)


def _same(x, y, where):
    if isinstance(x, dict):
        assert set(x) == set(y), where
        for k in x:
            _same(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        assert np.asarray(x).dtype == np.asarray(y).dtype, where
        assert np.array_equal(x, y, equal_nan=np.asarray(x).dtype.kind == "f"), where
    elif dataclasses.is_dataclass(x):
        assert x == y or repr(x) == repr(y), where
    else:
        assert x == y, where


@pytest.mark.parametrize("method", ["mc", "gia"])
def test_mc_resume_bit_identical(problem, tmp_path, monkeypatch, method):
    net, data, train = problem
    ref = dmft.solve(net, data, train, method=method, seed=3, **SMALL)
    path = tmp_path / "mc.ckpt.npz"
    with monkeypatch.context() as m:
        _interrupt_after(m, causal, "_population", 2)
        with pytest.raises(KeyboardInterrupt):
            dmft.solve(net, data, train, method=method, seed=3, checkpoint=path, **SMALL)
    assert path.exists()
    with np.load(path) as z:
        assert "acc.f" in z.files and "acc2.phi" in z.files
    calls = _interrupt_after(monkeypatch, causal, "_population", 99)
    res = dmft.solve(net, data, train, method=method, seed=3, checkpoint=str(path), **SMALL)
    assert len(calls) == 2                     # only the two unfinished replicates were run
    assert_identical(res, ref, resumed=2)
    assert not path.exists()                   # removed after success
    assert os.listdir(tmp_path) == []


def test_mc_checkpoint_every_replicate(problem, tmp_path, monkeypatch):
    """One atomic write per replicate; an interruption after the last write still resumes."""
    net, data, train = problem
    path = tmp_path / "c.npz"
    writes = []
    orig = _checkpoint.Checkpoint.save

    def save(self, arrays, meta):
        orig(self, arrays, meta)
        writes.append(meta["next"])
        if meta["next"] == SMALL["replicates"]:
            raise KeyboardInterrupt            # after the last write, before the removal

    monkeypatch.setattr(_checkpoint.Checkpoint, "save", save)
    with pytest.raises(KeyboardInterrupt):
        dmft.solve(net, data, train, method="mc", seed=1, checkpoint=path, **SMALL)
    assert writes == [1, 2, 3, 4]
    monkeypatch.undo()
    calls = _interrupt_after(monkeypatch, causal, "_population", 99)
    res = dmft.solve(net, data, train, method="mc", seed=1, checkpoint=path, **SMALL)
    assert calls == []
    assert_identical(res, dmft.solve(net, data, train, method="mc", seed=1, **SMALL), resumed=4)


def test_mc_refuses_other_work(problem, tmp_path, monkeypatch):
    net, data, train = problem
    path = tmp_path / "mc.ckpt.npz"
    with monkeypatch.context() as m:
        _interrupt_after(m, causal, "_population", 1)
        with pytest.raises(KeyboardInterrupt):
            dmft.solve(net, data, train, method="mc", seed=3, checkpoint=path, **SMALL)
    other = [(dict(seed=4), "seed"), (dict(seed=3, samples=1024), "samples"),
             (dict(seed=3, train=dmft.GradientDescent(gamma0=1.0, lr=0.05, steps=5)), "lr"),
             (dict(seed=3, method="gia"), "kind")]
    for change, key in other:
        kw = dict(SMALL, checkpoint=path, method="mc", train=train)
        kw.update(change)
        with pytest.raises(ValueError, match=f"belongs to other work.*'{key}'"):
            dmft.solve(net, data, **kw)
    assert path.exists()                       # a refused resume leaves the file alone
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a dmft checkpoint"):
        dmft.solve(net, data, train, method="mc", seed=3, checkpoint=path, **SMALL)


def test_checkpoint_refused_where_unsupported(problem, tmp_path):
    net, data, train = problem
    path = tmp_path / "x.npz"
    with pytest.raises(ValueError, match="one-pass deep solver only.*two-layer"):
        dmft.solve(dmft.MLP(depth=1), data, train, method="mc", seed=0, checkpoint=path,
                   samples=256, progress=False)
    with pytest.raises(ValueError, match="one-pass deep solver only.*iterative"):
        dmft.solve(net, data, train, method="mc", seed=0, checkpoint=path, scheme="iterative",
                   progress=False)
    with pytest.raises(ValueError, match="checkpoint must be a file path"):
        dmft.solve(net, data, train, method="mc", seed=0, checkpoint=3, **SMALL)
    with pytest.raises(ValueError, match="does not exist"):
        dmft.solve(net, data, train, method="mc", seed=0, checkpoint=tmp_path / "no" / "x",
                   **SMALL)
    assert os.listdir(tmp_path) == []


SIM = dict(width=64, progress=False)


@pytest.mark.parametrize("kernels", [False, True])
def test_simulate_resume_bit_identical(problem, tmp_path, monkeypatch, kernels):
    net, data, train = problem
    seeds = range(10, 18)
    ref = dmft.simulate(net, data, train, seeds=seeds, record_kernels=kernels, **SIM)
    path = tmp_path / "sim.ckpt.npz"
    with monkeypatch.context() as m:
        _interrupt_after(m, network, "train", 5)
        with pytest.raises(KeyboardInterrupt):
            dmft.simulate(net, data, train, seeds=seeds, checkpoint=path,
                          record_kernels=kernels, **SIM)
    with np.load(path) as z:
        assert z["predictions"].shape[0] == 5
    calls = _interrupt_after(monkeypatch, network, "train", 99)
    res = dmft.simulate(net, data, train, seeds=seeds, checkpoint=path, record_kernels=kernels,
                        **SIM)
    assert len(calls) == 3
    assert_identical(res, ref, resumed=5)
    assert not path.exists()


def test_simulate_resume_with_diverged_seed(tmp_path, monkeypatch):
    """throw=False: a diverged seed's NaN rows and its name survive the resume."""
    data = dmft.config.teacher_student(P=3, Q=1, D=4, seed=0)
    net = dmft.MLP(depth=2, activation="relu")
    train = dmft.GradientDescent(gamma0=1.0, lr=3.0, steps=30)
    seeds = range(6)
    ref = dmft.simulate(net, data, train, seeds=seeds, throw=False, **SIM)
    if ref.status != "diverged":
        pytest.skip("no seed diverged at these settings")
    path = tmp_path / "sim.npz"
    with monkeypatch.context() as m:
        _interrupt_after(m, network, "train", 4)
        with pytest.raises(KeyboardInterrupt):
            dmft.simulate(net, data, train, seeds=seeds, throw=False, checkpoint=path, **SIM)
    res = dmft.simulate(net, data, train, seeds=seeds, throw=False, checkpoint=path, **SIM)
    assert_identical(res, ref, resumed=4)
    with monkeypatch.context() as m:
        _interrupt_after(m, network, "train", 2)
        with pytest.raises(KeyboardInterrupt):
            dmft.simulate(net, data, train, seeds=seeds, throw=False, checkpoint=path, **SIM)
    with pytest.raises(dmft.ConvergenceError) as err:        # throw=True: the same result
        dmft.simulate(net, data, train, seeds=seeds, checkpoint=path, **SIM)
    assert_identical(err.value.result, ref, resumed=2)
    with monkeypatch.context() as m:
        _interrupt_after(m, network, "train", 2)
        with pytest.raises(KeyboardInterrupt):
            dmft.simulate(net, data, train, seeds=seeds, throw=False, checkpoint=path, **SIM)
    with pytest.raises(ValueError, match="belongs to other work.*'seeds'"):
        dmft.simulate(net, data, train, seeds=range(7), throw=False, checkpoint=path, **SIM)
    with pytest.raises(ValueError, match="belongs to other work.*'width'"):
        dmft.simulate(net, data, train, seeds=seeds, throw=False, checkpoint=path,
                      **dict(SIM, width=32))


def test_atomic_write(tmp_path, monkeypatch):
    """An interruption inside a write keeps the previous checkpoint and leaves no temp file."""
    ck = _checkpoint.Checkpoint(tmp_path / "a.npz", "test", x=np.arange(3.0), s="a")
    ck.save({"v": np.arange(4.0)}, {"next": 1})
    before = (tmp_path / "a.npz").read_bytes()

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", broken)
        with pytest.raises(KeyboardInterrupt):
            ck.save({"v": np.arange(5.0)}, {"next": 2})
    assert os.listdir(tmp_path) == ["a.npz"]
    assert (tmp_path / "a.npz").read_bytes() == before
    arrays, meta = ck.load()
    assert meta == {"next": 1} and np.array_equal(arrays["v"], np.arange(4.0))
    x = np.arange(3.0)
    x[2] = np.nextafter(2.0, 3.0)              # one ulp: refused
    other = _checkpoint.Checkpoint(tmp_path / "a.npz", "test", x=x, s="a")
    with pytest.raises(ValueError, match=r"differs in \['x'\]"):
        other.load()
    ck.remove()
    assert os.listdir(tmp_path) == [] and ck.load() is None
