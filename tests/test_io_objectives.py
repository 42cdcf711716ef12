"""Files, configs, plots and docs for the problems of docs/theory.rst §7: C outputs, losses,
weight decay, mini-batches.

What these tests prove
- HDF5: results with C >= 2 outputs (Solution, Ensemble, Fluctuations) round-trip exactly,
  every array axis carries its named dimension (``output`` / ``output_`` from
  dmft.results.DIMS_OUTPUTS, coordinates 0 .. C-1), the new GradientDescent fields
  (including ``batch_size=None``) come back as an equal spec, targets of shape (P, C)
  round-trip, and the losses and accuracies per split are recorded as derived datasets equal
  to the result's properties (absent where the property is None). Files without the new keys
  (written before they existed) still load; a tampered derived copy is only warned about
  (load recomputes it); checksums still catch damage.
- Config: the [train] table takes loss / weight_decay / decay_to / batch_size / batch_seed /
  schedule, the [data] table takes (P, C) target files and integer class labels
  (``labels = true``, ``classes = C``), and every bad value is a ValueError naming the key and
  the fix; ``dmft run`` writes such a problem and ``dmft plot`` draws it.
- Plots: C >= 2 results draw one line per (point, output) up to a cap, name the loss, and add
  an accuracy panel for classification; one-output mse figures keep their panels.
- docs/methods.rst's "which method solves what" table matches each method's ``supports``.
"""
import dataclasses
import logging
import os
import re

import h5py
import numpy as np
import pytest

import dmft
from dmft import io as dio
from dmft.results import DIMS, DIMS_OUTPUTS, Ensemble, Fluctuations, Solution
from test_io import open_with_xarray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------
# builders: results with C outputs, built directly with the documented shapes
# ------------------------------------------------------------------------------------------
def make_class_data(rng, P=4, Q=3, D=5, C=3, y_test=True):
    labels = np.arange(P) % C
    return dmft.Dataset.from_labels(rng.normal(size=(P, D)), labels,
                                    rng.normal(size=(Q, D)) if Q else None,
                                    (np.arange(Q) % C) if (Q and y_test) else None, classes=C)


TRAIN_CE = dict(gamma0=0.8, lr=0.05, loss="cross_entropy", weight_decay=0.5,
                decay_to="zero", batch_size=2, batch_seed=7, schedule="epochs")


def make_solution_c(rng, L=2, P=4, Q=3, T=5, C=3, y_test=True, **train_kw):
    data = make_class_data(rng, P, Q, C=C, y_test=y_test)
    n = P + Q
    train = dmft.GradientDescent(steps=T, **dict(TRAIN_CE, **train_kw))
    return Solution(
        net=dmft.MLP(depth=L, activation="tanh"), data=data, train=train, method="mc",
        t=train.times, train_predictions=rng.normal(size=(T + 1, P, C)),
        test_predictions=rng.normal(size=(T + 1, Q, C)),
        ntk=rng.normal(size=(T + 1, n, C, n, C)),
        phi=rng.normal(size=(L, T + 1, T + 1, n, n)),
        g=rng.normal(size=(L, T + 1, T + 1, n, C, n, C)),
        iterations=3, residuals=np.array([0.5, 0.01]), seed=5, elapsed=1.5,
        stderr={"train_predictions": rng.random((T + 1, P, C)),
                "ntk": rng.random((T + 1, n, C, n, C))},
        options={"samples": 100},
        extras={"f_std": rng.random((T + 1, n, C)), "f0": rng.normal(size=(n, C))})


def make_ensemble_c(rng, L=1, P=4, Q=3, S=3, T=4, C=3):
    data = make_class_data(rng, P, Q, C=C)
    n = P + Q
    train = dmft.GradientDescent(steps=T, **TRAIN_CE)
    return Ensemble(net=dmft.MLP(depth=L, activation="relu"), data=data, train=train,
                    width=128, seeds=np.arange(S, dtype=np.int64), t=train.times,
                    train_predictions=rng.normal(size=(S, T + 1, P, C)),
                    test_predictions=rng.normal(size=(S, T + 1, Q, C)),
                    ntk=rng.normal(size=(S, T + 1, n, C, n, C)),
                    phi=rng.normal(size=(S, L, T + 1, T + 1, n, n)),
                    g=rng.normal(size=(S, L, T + 1, T + 1, n, C, n, C)), center=True,
                    extras={"f0": rng.normal(size=(S, n, C))})


def make_fluctuations_c(rng):
    sol = make_solution_c(rng, L=1)
    T1, n, C = sol.t.size, sol.P + sol.Q, sol.data.C
    return Fluctuations(solution=sol, prediction_cov=rng.normal(size=(T1, n, C, n, C)),
                        ntk_var=rng.random((T1, n, C, n, C)), center=True, method="propagator",
                        stderr={"prediction_cov": rng.random((T1, n, C, n, C))})


def assert_same(a, b, where="result"):
    """Exact equality of results (arrays bit for bit)."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        if isinstance(a, dmft.Dataset):
            assert a == b and a.y_train.shape == b.y_train.shape, where
            return
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=True), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _labels(ds):
    return tuple(ds.dims[i].label for i in range(ds.ndim))


# ------------------------------------------------------------------------------------------
# HDF5
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", None])
def test_multi_output_solution_round_trips(tmp_path, compression):
    sol = make_solution_c(np.random.default_rng(0), T=12)  # g above the compression size
    dio.save(sol, tmp_path / "s.h5", compression=compression)
    back = dmft.load(tmp_path / "s.h5")
    assert_same(sol, back)
    assert back.train == sol.train and back.train.batch_size == 2
    assert back.data.y_train.shape == (4, 3) and back.data.multi_output
    assert np.array_equal(back.train_loss, sol.train_loss)
    assert np.array_equal(back.test_accuracy, sol.test_accuracy)


def test_multi_output_file_has_output_dims(tmp_path):
    sol = make_solution_c(np.random.default_rng(1))
    sol.save(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        for name in ("train_predictions", "test_predictions", "ntk", "g"):
            assert _labels(f[name]) == DIMS_OUTPUTS[name], name
        assert _labels(f["phi"]) == DIMS["phi"]          # phi has no output index
        assert np.array_equal(f["output"][...], [0, 1, 2]) and f["output"].is_scale
        assert np.array_equal(f["output_"][...], [0, 1, 2])
        assert _labels(f["data/y_train"]) == ("train_point", "output")
        assert _labels(f["data/y_test"]) == ("test_point", "output")
        assert _labels(f["stderr/ntk"]) == DIMS_OUTPUTS["ntk"]
        assert _labels(f["extras/f_std"]) == ("t", "point", "output")
        assert _labels(f["extras/f0"]) == ("point", "output")
        a = f.attrs
        assert a["train_loss"] == "cross_entropy" and a["train_decay_to"] == "zero"
        assert a["train_weight_decay"] == 0.5 and a["train_batch_size"] == 2
        assert a["train_schedule"] == "epochs" and a["data_outputs"] == 3


def test_losses_and_accuracies_are_recorded(tmp_path):
    sol = make_solution_c(np.random.default_rng(2))
    sol.save(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        for name in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            ds = f[name]
            assert ds.attrs["derived"] == 1 and ds.attrs["loss"] == "cross_entropy", name
            assert _labels(ds) == ("t",)
            assert np.array_equal(ds[...], getattr(sol, name)), name
        # cross-entropy really: the recorded loss is -sum y log softmax(f)
        f_tr = sol.train_predictions
        logp = f_tr - np.log(np.exp(f_tr).sum(axis=-1, keepdims=True))
        assert np.allclose(f["train_loss"][...], -(sol.data.Y_train * logp).sum(axis=(1, 2)))
        acc = (f_tr.argmax(-1) == sol.data.Y_train.argmax(-1)).mean(axis=1)
        assert np.array_equal(f["train_accuracy"][...], acc)


def test_none_losses_and_accuracies_are_absent(tmp_path):
    # one-output mse: no accuracies; no y_test: no test loss
    rng = np.random.default_rng(3)
    data = dmft.Dataset(rng.normal(size=(3, 2)), rng.normal(size=3), rng.normal(size=(2, 2)))
    train = dmft.GradientDescent(steps=2, weight_decay=1.0, batch_size=None)
    sol = Solution(net=dmft.MLP(), data=data, train=train, method="static", t=train.times,
                   train_predictions=rng.normal(size=(3, 3)),
                   test_predictions=rng.normal(size=(3, 2)), ntk=rng.normal(size=(3, 5, 5)),
                   phi=rng.normal(size=(1, 3, 3, 5, 5)), g=rng.normal(size=(1, 3, 3, 5, 5)))
    sol.save(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert "train_loss" in f and "test_loss" not in f
        assert "train_accuracy" not in f and "test_accuracy" not in f
        assert "train_batch_size" not in f.attrs                 # None: full batch
        assert "output" not in f and _labels(f["ntk"]) == DIMS["ntk"]
    back = dmft.load(tmp_path / "s.h5")
    assert back.train == train and back.train.batch_size is None
    assert back.data.y_train.shape == (3,)
    # logistic, one output: accuracies recorded (sign), no output axis
    y = np.array([1.0, -1.0, 1.0])
    data = dmft.Dataset(data.X_train, y, data.X_test, np.array([1.0, -1.0]))
    sol = dataclasses.replace(sol, data=data, train=dataclasses.replace(train, loss="logistic"))
    sol.save(tmp_path / "l.h5")
    with h5py.File(tmp_path / "l.h5", "r") as f:
        assert np.array_equal(f["train_accuracy"][...],
                              (np.sign(sol.train_predictions) == y).mean(axis=1))
        assert "output" not in f


def test_multi_output_ensemble_and_fluctuations_round_trip(tmp_path):
    ens = make_ensemble_c(np.random.default_rng(4))
    ens.save(tmp_path / "e.h5")
    assert_same(ens, dmft.load(tmp_path / "e.h5"))
    with h5py.File(tmp_path / "e.h5", "r") as f:
        assert _labels(f["ntk"]) == ("seed",) + DIMS_OUTPUTS["ntk"]
        assert _labels(f["g"]) == ("seed",) + DIMS_OUTPUTS["g"]
        assert _labels(f["extras/f0"]) == ("seed", "point", "output")
        assert _labels(f["train_loss"]) == ("seed", "t")
        assert np.array_equal(f["test_accuracy"][...], ens.test_accuracy)
    fl = make_fluctuations_c(np.random.default_rng(5))
    fl.save(tmp_path / "f.h5")
    assert_same(fl, dmft.load(tmp_path / "f.h5"))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert _labels(f["prediction_cov"]) == DIMS_OUTPUTS["prediction_cov"]
        assert _labels(f["stderr/prediction_cov"]) == DIMS_OUTPUTS["prediction_cov"]
        assert _labels(f["solution/ntk"]) == DIMS_OUTPUTS["ntk"]
        assert "train_loss" in f["solution"]


def test_files_without_the_new_keys_still_load(tmp_path, monkeypatch):
    """A file as written before §7: ``train`` without the new fields, no recorded losses."""
    rng = np.random.default_rng(6)
    data = dmft.Dataset(rng.normal(size=(3, 2)), rng.normal(size=3))
    train = dmft.GradientDescent(gamma0=0.5, lr=0.1, steps=2)
    sol = Solution(net=dmft.MLP(), data=data, train=train, method="static", t=train.times,
                   train_predictions=rng.normal(size=(3, 3)),
                   test_predictions=np.zeros((3, 0)), ntk=rng.normal(size=(3, 3, 3)),
                   phi=rng.normal(size=(1, 3, 3, 3, 3)), g=rng.normal(size=(1, 3, 3, 3, 3)))
    old = {"gamma0": 0.5, "lr": 0.1, "steps": 2, "loss": "mse"}
    with monkeypatch.context() as m:
        m.setattr(dmft.GradientDescent, "to_dict", lambda self: dict(old))
        m.setattr(dio, "_write_derived", lambda *a, **k: None)
        sol.save(tmp_path / "old.h5")
    with h5py.File(tmp_path / "old.h5", "r") as f:
        assert "train_loss" not in f and "weight_decay" not in f.attrs["train"]
    back = dmft.load(tmp_path / "old.h5")
    assert back.train == train                      # the defaults: mse, no decay, full batch
    assert np.array_equal(back.train_loss, sol.train_loss)


def test_tampered_derived_copy_is_warned_and_ignored(tmp_path, monkeypatch, caplog):
    sol = make_solution_c(np.random.default_rng(7))
    real = dio._derived_values
    with monkeypatch.context() as m:
        m.setattr(dio, "_derived_values",
                  lambda r: {k: v + 1.0 for k, v in real(r).items()})
        sol.save(tmp_path / "s.h5")
    with caplog.at_level(logging.WARNING, logger="dmft.io"):
        back = dmft.load(tmp_path / "s.h5")
    assert "recorded train_loss differs" in caplog.text
    assert np.array_equal(back.train_loss, sol.train_loss)   # recomputed, not the copy


def test_checksums_still_cover_the_new_datasets(tmp_path):
    sol = make_solution_c(np.random.default_rng(8))
    sol.save(tmp_path / "s.h5")
    assert dio.verify_checksum(tmp_path / "s.h5")
    raw = bytearray((tmp_path / "s.h5").read_bytes())
    with h5py.File(tmp_path / "s.h5", "r") as f:
        offset = f["train_accuracy"].id.get_chunk_info(0).byte_offset
    raw[offset + 3] ^= 0xFF
    (tmp_path / "bad.h5").write_bytes(bytes(raw))
    with pytest.raises(dio.CorruptFileError, match="damaged"):
        dmft.load(tmp_path / "bad.h5")


def test_xarray_reads_output_dims(tmp_path):
    sol = make_solution_c(np.random.default_rng(9))
    with open_with_xarray(sol, tmp_path / "s.h5") as ds:
        assert ds["ntk"].dims == DIMS_OUTPUTS["ntk"]
        assert np.array_equal(ds["train_accuracy"].values, sol.train_accuracy)


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------
def test_plot_multi_output_draws_each_point_and_output():
    from dmft.plotting import MAX_OUTPUTS, ntk_movement, output_coupling
    rng = np.random.default_rng(10)
    sol = make_solution_c(rng, L=1, P=4, Q=3, C=5)
    fig = dmft.plot(sol, points=2)
    assert len(fig.axes) == 9                       # a third row: accuracy, output coupling
    ax_loss, ax_train = fig.axes[0], fig.axes[1]
    assert "cross_entropy" in ax_loss.get_ylabel()
    np.testing.assert_array_equal(ax_loss.lines[0].get_ydata(), sol.train_loss)
    lines = [ln for ln in ax_train.lines if ln.get_linestyle() == "-"]
    assert len(lines) == 2 * MAX_OUTPUTS            # 2 points x 3 of the 5 outputs
    np.testing.assert_array_equal(lines[1].get_ydata(), sol.train_predictions[:, 0, 1])
    assert lines[1].get_label() == "train 0, c=1"
    ax_ntk = fig.axes[3]
    np.testing.assert_array_equal(ax_ntk.lines[0].get_ydata(), sol.ntk[:, 0, 0, 0, 0])
    np.testing.assert_allclose(fig.axes[4].lines[0].get_ydata(),
                               ntk_movement(sol.ntk.reshape(sol.t.size, 35, 35)))
    ax_acc, ax_cpl = fig.axes[6], fig.axes[7]
    np.testing.assert_array_equal(ax_acc.lines[0].get_ydata(), sol.train_accuracy)
    np.testing.assert_array_equal(ax_acc.lines[1].get_ydata(), sol.test_accuracy)
    np.testing.assert_allclose(ax_cpl.lines[0].get_ydata(), output_coupling(sol.ntk))
    # output coupling: 0 for delta_{cc'} K0 (outputs decoupled), 1 for a purely off-diagonal K
    K0 = rng.normal(size=(2, 4, 4))
    assert np.all(output_coupling(np.einsum("tmn,cd->tmcnd", K0, np.eye(3))) == 0)
    assert np.allclose(output_coupling(np.einsum("tmn,cd->tmcnd", K0, 1 - np.eye(3))), 1)
    ens = make_ensemble_c(rng)
    fig = dmft.plot(ens, points=1)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), ens.train_loss.mean(axis=0))
    np.testing.assert_allclose(fig.axes[6].lines[0].get_ydata(),
                               ens.train_accuracy.mean(axis=0))
    fig = dmft.plot(make_fluctuations_c(rng), points=1)
    assert len(fig.axes) == 12
    fig = dmft.plotting.compare({"sol": sol, "ens": ens})
    np.testing.assert_array_equal(fig.axes[3].lines[0].get_ydata(), sol.test_predictions[:, 0, 0])
    assert "cross_entropy" in fig.axes[0].get_ylabel()


def test_plot_one_output_classification_and_plain_mse():
    rng = np.random.default_rng(11)
    data = dmft.Dataset(rng.normal(size=(3, 2)), [1.0, -1.0, 1.0], rng.normal(size=(2, 2)),
                        [-1.0, 1.0])
    train = dmft.GradientDescent(steps=3, loss="hinge", weight_decay=0.5)
    sol = Solution(net=dmft.MLP(), data=data, train=train, method="static", t=train.times,
                   train_predictions=rng.normal(size=(4, 3)),
                   test_predictions=rng.normal(size=(4, 2)), ntk=rng.normal(size=(4, 5, 5)),
                   phi=rng.normal(size=(1, 4, 4, 5, 5)), g=rng.normal(size=(1, 4, 4, 5, 5)),
                   stderr={"train_predictions": np.full((4, 3), 0.1)})
    fig = dmft.plot(sol)
    assert len(fig.axes) == 9 and "hinge" in fig.axes[0].get_ylabel()
    assert "sign" in fig.axes[6].get_ylabel()
    np.testing.assert_array_equal(fig.axes[6].lines[0].get_ydata(), sol.train_accuracy)
    # the loss band: delta method with d hinge / d f = -y 1[y f < 1]
    from dmft.plotting import _loss_se
    f, y = sol.train_predictions, data.y_train
    expect = np.sqrt(np.sum((y * (y * f < 1) * 0.1) ** 2, axis=1))
    np.testing.assert_allclose(_loss_se(sol, "train"), expect)
    # plain mse, one output: the two rows of before, the old labels
    sol = dataclasses.replace(sol, data=dmft.Dataset(data.X_train, rng.normal(size=3)),
                              test_predictions=np.zeros((4, 0)),
                              train=dmft.GradientDescent(steps=3),
                              ntk=rng.normal(size=(4, 3, 3)),
                              phi=rng.normal(size=(1, 4, 4, 3, 3)),
                              g=rng.normal(size=(1, 4, 4, 3, 3)))
    fig = dmft.plot(sol)
    assert len(fig.axes) == 6 and fig.axes[0].get_ylabel() == "loss (sum over points)"
    expect = np.sqrt(np.sum(((f - sol.data.y_train) * 0.1) ** 2, axis=1))
    np.testing.assert_allclose(_loss_se(sol, "train"), expect)


# ------------------------------------------------------------------------------------------
# config and CLI
# ------------------------------------------------------------------------------------------
from dmft import cli  # noqa: E402
from dmft.config import load_config, parse_config, teacher_student  # noqa: E402

_BASE = {"net": {"depth": 1, "activation": "tanh"},
         "data": {"P": 6, "Q": 3, "D": 3, "seed": 0},
         "train": {"gamma0": 1.0, "lr": 0.1, "steps": 4},
         "solve": {"method": "static"}}


def _cfg(data=None, train=None, **sections):
    cfg = {k: dict(v) for k, v in _BASE.items()}
    cfg["data"].update(data or {})
    cfg["train"].update(train or {})
    cfg.update(sections)
    return cfg


def test_config_train_table_takes_the_new_keys():
    train = {"loss": "cross_entropy", "weight_decay": 0.5, "decay_to": "zero",
             "batch_size": 2, "batch_seed": 3, "schedule": "epochs"}
    rc = parse_config(_cfg({"classes": 3}, train))
    assert rc.train == dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=4, **train)
    assert rc.data.y_train.shape == (6, 3) and rc.data.y_test.shape == (3, 3)
    assert np.all(rc.data.y_train.sum(axis=1) == 1)               # one-hot
    rc = parse_config(_cfg({"outputs": 2}, {"batch_size": 3, "schedule": "online",
                                            "steps": 2}))
    assert rc.data.y_train.shape == (6, 2) and rc.train.batch_size == 3
    assert np.allclose(np.mean(np.concatenate([rc.data.y_train, rc.data.y_test]) ** 2,
                               axis=0), 1.0)                    # each output at unit scale
    rc = parse_config(_cfg({"labels": True}, {"loss": "hinge", "weight_decay": 1.0}))
    assert set(np.unique(rc.data.y_train)) <= {-1.0, 1.0} and rc.data.y_train.ndim == 1
    assert parse_config(_cfg()).train.batch_size is None         # full batch by default
    # one output: the generator draws the same numbers as before C outputs existed
    d = teacher_student(6, 3, 3, seed=0)
    assert d == parse_config(_cfg()).data
    signs = teacher_student(6, 3, 3, seed=0, labels=True)
    assert np.array_equal(signs.y_train, np.where(d.y_train >= 0, 1.0, -1.0))


@pytest.mark.parametrize("data,train,match", [
    ({}, {"loss": "cross_entropy"}, r"\[train\] does not suit \[data\]: loss='cross_entropy' "
                                    r"needs C >= 2 classes"),
    ({}, {"loss": "logistic"}, r"does not suit \[data\]: loss='logistic' needs labels \+1 / -1"),
    ({"classes": 3}, {"loss": "hinge"}, r"loss='hinge' has one output"),
    ({}, {"batch_size": 7}, r"batch_size=7 exceeds the P = 6 training points"),
    ({}, {"batch_size": 0}, r"train.batch_size must be an integer >= 1 .*omit the key for "
                            r"full-batch"),
    ({}, {"batch_size": "none"}, r"omit the key for full-batch"),
    ({}, {"schedule": "online"}, r"schedule='online' draws fresh points each step: give "
                                 r"batch_size"),
    ({}, {"batch_size": 2, "schedule": "online"}, r"steps \* batch_size = 4 \* 2 = 8 points "
                                                   r"are needed but the dataset has P = 6"),
    ({}, {"weight_decay": 20.0}, r"lr \* weight_decay = 2 must be < 1"),
    ({}, {"decay_to": "origin"}, r"decay_to must be one of"),
    ({}, {"loss": "l1"}, r"loss 'l1' is not supported"),
    ({}, {"batch_seeds": 1}, r"unknown key 'batch_seeds' in \[train\]"),
    ({"classes": 1}, {}, r"data.classes must be an integer >= 2"),
    ({"classes": 3, "outputs": 2}, {}, r"data.classes = 3 labels by the largest of 3 teacher "
                                       r"outputs, but data.outputs = 2"),
    ({"outputs": 0}, {}, r"data.outputs must be an integer >= 1"),
    ({"labels": "yes"}, {}, r"data.labels must be true or false"),
    ({"labels": True, "noise": 0.1}, {}, r"data.noise = 0.1 adds Gaussian noise .* set "
                                         r"noise = 0"),
])
def test_bad_objective_config_values(data, train, match):
    with pytest.raises(ValueError, match=match):
        parse_config(_cfg(data, train))


def _write_files(tmp_path, y, yt=None, ext=".csv"):
    rng = np.random.default_rng(12)
    np.save(tmp_path / "X.npy", rng.normal(size=(len(y), 3)))
    np.save(tmp_path / "Xt.npy", rng.normal(size=(2, 3)))
    for name, arr in (("y", y), ("yt", yt)):
        if arr is not None:
            if ext == ".csv":
                np.savetxt(tmp_path / f"{name}.csv", arr, delimiter=",")
            else:
                np.save(tmp_path / f"{name}.npy", arr)


def _file_cfg(tmp_path, extra="", train="", ext=".csv", test=True):
    t = (f'X_test = "Xt.npy"\ny_test = "yt{ext}"\n' if test else "")
    text = ('[net]\ndepth = 1\nactivation = "tanh"\n'
            f'[data]\nX_train = "X.npy"\ny_train = "y{ext}"\n{t}{extra}'
            f'[train]\ngamma0 = 1.0\nlr = 0.1\nsteps = 3\n{train}'
            '[solve]\nmethod = "static"\n')
    (tmp_path / "c.toml").write_text(text)
    return tmp_path / "c.toml"


def test_config_target_files_and_label_files(tmp_path):
    rng = np.random.default_rng(13)
    Y = rng.normal(size=(5, 3))
    _write_files(tmp_path, Y, rng.normal(size=(2, 3)))
    rc = load_config(_file_cfg(tmp_path))
    np.testing.assert_allclose(rc.data.y_train, Y, rtol=1e-15)
    assert rc.data.C == 3 and rc.data.y_test.shape == (2, 3)
    # integer class labels -> one-hot, classes from the labels or given
    _write_files(tmp_path, np.array([0, 2, 1, 2, 0]), np.array([1, 0]))
    rc = load_config(_file_cfg(tmp_path, "labels = true\n", 'loss = "cross_entropy"\n'))
    assert np.array_equal(rc.data.y_train.argmax(axis=1), [0, 2, 1, 2, 0])
    assert rc.data.C == 3 and np.array_equal(rc.data.y_test, [[0, 1, 0], [1, 0, 0]])
    rc = load_config(_file_cfg(tmp_path, "classes = 5\n", 'loss = "cross_entropy"\n'))
    assert rc.data.C == 5
    _write_files(tmp_path, np.array([0, 1, 1, 0, 1]), ext=".npy")
    rc = load_config(_file_cfg(tmp_path, "labels = true\n", ext=".npy", test=False))
    assert rc.data.C == 2 and rc.data.Q == 0 and rc.data.y_test is None
    # +-1 labels from a file for logistic: no labels key
    _write_files(tmp_path, np.array([1.0, -1.0, 1.0, 1.0, -1.0]), ext=".npy")
    rc = load_config(_file_cfg(tmp_path, "", 'loss = "logistic"\n', ext=".npy", test=False))
    assert rc.data.y_train.ndim == 1 and rc.train.loss == "logistic"


@pytest.mark.parametrize("y,extra,match", [
    (np.array([0, 1.5, 1, 0, 1]), "labels = true\n",
     r"data.y_train: with labels = true the file must hold one integer class label"),
    (np.array([0, -1, 1, 0, 1]), "labels = true\n", r"non-integer or negative"),
    (np.ones((5, 2)), "labels = true\n", r"one integer class label 0 .. C-1 per point .*"
                                         r"shape \(5, 2\)"),
    (np.array([0, 3, 1, 0, 1]), "classes = 3\n", r"labels = true: labels_train holds labels "
                                                 r"outside 0 .. 2"),
    (np.array([0, 1, 1, 0, 1]), "classes = 2\nlabels = false\n",
     r"data.classes needs data.labels = true"),
    (np.array([0, 1, 1, 0, 1]), "labels = 1\n", r"data.labels must be true"),
    (np.array([0, 1, 1, 0, 1]), "classes = 1.5\n", r"data.classes must be an integer >= 2"),
    (np.array([0, 1, 1, 0, 1]), "outputs = 2\n", r"unknown key 'outputs' in \[data\]"),
])
def test_bad_label_files(tmp_path, y, extra, match):
    _write_files(tmp_path, y, ext=".npy")
    with pytest.raises(ValueError, match=match):
        load_config(_file_cfg(tmp_path, extra, ext=".npy", test=False))


def test_run_and_plot_a_classification_config(tmp_path, capsys):
    """``dmft run`` writes a C-output cross-entropy problem with mini-batches and weight decay
    (the static method), ``dmft plot`` draws it; the file holds the recorded accuracies."""
    cfg = tmp_path / "cls.toml"
    cfg.write_text('[net]\ndepth = 1\nactivation = "erf"\n'
                   '[data]\nP = 6\nQ = 3\nD = 4\nclasses = 3\n'
                   '[train]\ngamma0 = 0.5\nlr = 0.2\nsteps = 6\nloss = "cross_entropy"\n'
                   'weight_decay = 0.1\nbatch_size = 3\nbatch_seed = 1\n'
                   '[solve]\nmethod = "static"\n')
    out = tmp_path / "cls.h5"
    code = cli.main(["run", str(cfg), "-o", str(out), "--plot", str(tmp_path / "r.png")])
    err = capsys.readouterr().err
    assert code == 0, err
    rc = load_config(cfg)
    res = dmft.load(out)
    assert res.train == rc.train and res.data == rc.data
    assert res.train_predictions.shape == (7, 6, 3) and res.ntk.shape == (7, 9, 3, 9, 3)
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["test_accuracy"][...], res.test_accuracy)
        assert _labels(f["train_predictions"]) == DIMS_OUTPUTS["train_predictions"]
    assert cli.main(["plot", str(out), "-o", str(tmp_path / "p.png"), "--points", "2"]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_names_the_new_keys(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in ("loss = mse | cross_entropy | logistic | hinge", "weight_decay",
                "decay_to = init | zero", "batch_size", "batch_seed",
                "schedule = epochs | online", "labels = true", "classes = C"):
        assert key in text, key


# ------------------------------------------------------------------------------------------
# docs: the "which method solves what" table is the code's `supports`
# ------------------------------------------------------------------------------------------
_COLUMNS = ("outputs", "losses", "hinge", "weight_decay", "decay_to_zero", "batches",
            "barlow_twins", "output_offset")


def _supports_in_code() -> dict:
    from dmft._method import FEATURES
    from dmft._simulate import SIMULATE
    assert tuple(FEATURES) == _COLUMNS       # a new feature needs a new column in the docs
    rows = {f"solve: {k}": m for k, m in dmft.METHODS.items()}
    rows["simulate"] = SIMULATE
    rows.update({f"fluctuations: {k}": m for k, m in dmft.FLUCTUATION_METHODS.items()
                 if k != "auto"})           # "auto" picks one of the others
    return {k: {f for f in _COLUMNS if f in m.supports} for k, m in rows.items()
            if type(m).__module__.startswith("dmft.")}     # not methods a test registered


def _supports_in_docs() -> dict:
    text = open(os.path.join(ROOT, "docs", "methods.rst")).read()
    section = text.split(".. _methods-support:")[1].split("\nWhere a method")[0]
    rows = re.findall(r"\* - ``([^`]+)``\n((?:\s+- (?:yes|no)\n){8})", section)
    return {name: {f for f, cell in zip(_COLUMNS, re.findall(r"yes|no", cells))
                   if cell == "yes"} for name, cells in rows}


def test_docs_table_of_supported_features_matches_the_code():
    code, docs = _supports_in_code(), _supports_in_docs()
    rows = "\n".join(f"{k}: " + " ".join("yes" if f in v else "no" for f in _COLUMNS)
                     for k, v in code.items())
    assert docs == code, f"update the table in docs/methods.rst to:\n{rows}"
