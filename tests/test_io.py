"""HDF5 files: exact round trips, named dimensions, atomic writes, schema versions.

What these tests prove
- save/load returns the same class with every field equal (arrays bit for bit, None fields,
  booleans, ints, floats incl. nan/inf, tuples, nested dicts) for Solution, Ensemble and
  Fluctuations, for every compression choice.
- The file is self-describing in plain h5py: schema/package version, kind and the full spec as
  attributes, and every array axis carries a dimension scale named as in dmft.results.DIMS
  with the right coordinate values (t = times, seed = seeds).
- A write that fails half way leaves neither the target nor a temporary file behind, and an
  existing file at the target is byte-for-byte untouched.
- Files from a newer schema are refused with an "upgrade" message; older ones go through the
  migration hook.
- Seeds beyond int64 round-trip.
- Integrity (checksums, damaged files, orphaned temporary files, interrupts, EFBIG) is in
  test_io_integrity.py; the kill -9 / byte-flip campaigns are in test_files_slow.py
  (``-m slow``).
"""
import dataclasses
import json
import os

import h5py
import numpy as np
import pytest

import dmft
from dmft import io as dio
from dmft.results import DIMS, Ensemble, Fluctuations, Solution


# ------------------------------------------------------------------------------------------
# builders and an exact comparison
# ------------------------------------------------------------------------------------------
def make_data(rng, P=3, Q=2, D=4, y_test=True):
    return dmft.Dataset(rng.normal(size=(P, D)), rng.normal(size=P),
                        rng.normal(size=(Q, D)) if Q else None,
                        rng.normal(size=Q) if (Q and y_test) else None)


def make_solution(rng, L=2, P=3, Q=2, T=5, y_test=True, **overrides):
    data = make_data(rng, P, Q, y_test=y_test)
    n = P + Q
    train = dmft.GradientDescent(gamma0=0.7, lr=0.05, steps=T)
    kw = dict(net=dmft.MLP(depth=L, activation="tanh"), data=data, train=train, method="mc",
              t=train.times, train_predictions=rng.normal(size=(T + 1, P)),
              test_predictions=rng.normal(size=(T + 1, Q)), ntk=rng.normal(size=(T + 1, n, n)),
              phi=rng.normal(size=(L, T + 1, T + 1, n, n)),
              g=rng.normal(size=(L, T + 1, T + 1, n, n)),
              A=rng.normal(size=(L - 1, T + 1, T + 1, n, n)) if L > 1 else None,
              B=rng.normal(size=(L - 1, T + 1, T + 1, n, n)) if L > 1 else None,
              converged=True, iterations=7, residuals=np.array([1.0, 0.1, np.nan, np.inf]),
              stderr={"train_predictions": rng.random((T + 1, P)),
                      "test_predictions": rng.random((T + 1, Q)),
                      "ntk": rng.random((T + 1, n, n))},
              seed=12345, elapsed=3.25,
              options={"samples": 1000, "damping": 0.5, "anderson": True, "tol": None,
                       "shape": (2, 3), "nested": {"a": [1, 2.5, float("inf")], "b": "x"},
                       "big": 2**62},
              extras={"f_std": rng.random((T + 1, n)), "counts": np.arange(4, dtype=np.int32),
                      "mask": np.array([True, False]), "note": "hi", "flag": False,
                      "sub": {"x": rng.normal(size=(2, 2)), "level": 3, "none": None},
                      "scalar": np.float64(2.5)})
    kw.update(overrides)
    return Solution(**kw)


def make_ensemble(rng, L=1, P=3, Q=2, S=4, T=4, kernels=True, center=True):
    data = make_data(rng, P, Q)
    n = P + Q
    train = dmft.GradientDescent(gamma0=1.0, lr=0.1, steps=T)
    return Ensemble(net=dmft.MLP(depth=L, activation="relu"), data=data, train=train,
                    width=256, seeds=np.array([3, 5, 7, 11][:S], dtype=np.int64), t=train.times,
                    train_predictions=rng.normal(size=(S, T + 1, P)),
                    test_predictions=rng.normal(size=(S, T + 1, Q)),
                    ntk=rng.normal(size=(S, T + 1, n, n)),
                    phi=rng.normal(size=(S, L, T + 1, T + 1, n, n)) if kernels else None,
                    g=rng.normal(size=(S, L, T + 1, T + 1, n, n)) if kernels else None,
                    center=center, elapsed=0.5,
                    options={"record_kernels": kernels, "center": center, "dtype": "float64"},
                    extras={"f0": rng.normal(size=(S, n))} if center else {})


def make_fluctuations(rng):
    sol = make_solution(rng, L=1)
    T1, n = sol.t.size, sol.P + sol.Q
    return Fluctuations(solution=sol, prediction_cov=rng.normal(size=(T1, n, n)),
                        ntk_var=rng.random((T1, n, n)), center=True, method="propagator",
                        stderr={"prediction_cov": rng.random((T1, n, n))}, elapsed=0.125,
                        options={"samples": 50, "jacobian": "tangent"},
                        extras={"two_time_cov": rng.normal(size=(T1, T1, n, n))})


def assert_same(a, b, where="result"):
    """Exact equality, including types of plain values and dtypes/shapes of arrays."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        if isinstance(a, dmft.Dataset):
            assert a == b, where
            assert (a.y_test is None) == (b.y_test is None), where
            return
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{where}: {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs " \
                                                          f"{b.dtype}{b.shape}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    elif isinstance(a, np.generic):
        assert a == b, where  # NumPy scalars come back as Python numbers of equal value
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


# ------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", "lzf", None])
def test_solution_round_trip_exact(tmp_path, compression):
    sol = make_solution(np.random.default_rng(0), T=12)  # phi/g above the compression size
    path = tmp_path / "sol.h5"
    dio.save(sol, path, compression=compression)
    back = dmft.load(path)
    assert isinstance(back, Solution)
    assert_same(sol, back)
    with h5py.File(path, "r") as f:
        assert (f["phi"].compression == compression) if compression else f["phi"].compression is None


def test_solution_round_trip_none_fields_and_empty_test_set(tmp_path):
    rng = np.random.default_rng(1)
    sol = make_solution(rng, L=1, Q=0, seed=None, converged=False, iterations=0,
                        residuals=np.zeros(0), stderr={}, extras={}, options={})
    assert sol.A is None and sol.data.y_test is None and sol.data.Q == 0
    sol.save(tmp_path / "s.h5")
    back = dmft.load(tmp_path / "s.h5")
    assert_same(sol, back)
    assert back.A is None and back.B is None and back.seed is None and back.converged is False
    assert back.test_loss is None and back.test_predictions.shape == (sol.t.size, 0)


def test_solution_with_y_test_missing_but_test_points(tmp_path):
    sol = make_solution(np.random.default_rng(2), y_test=False)
    sol.save(tmp_path / "s.h5")
    back = dmft.load(tmp_path / "s.h5")
    assert_same(sol, back)
    assert back.data.y_test is None and back.data.Q == 2


def test_seedsequence_seed_round_trips(tmp_path):
    ss = np.random.SeedSequence(2024, spawn_key=(1, 2))
    sol = make_solution(np.random.default_rng(3), seed=ss)
    sol.save(tmp_path / "s.h5")
    back = dmft.load(tmp_path / "s.h5").seed
    assert isinstance(back, np.random.SeedSequence)
    assert back.entropy == ss.entropy and back.spawn_key == ss.spawn_key
    assert np.array_equal(back.generate_state(4), ss.generate_state(4))


@pytest.mark.parametrize("kernels,center", [(True, True), (False, False)])
def test_ensemble_round_trip_exact(tmp_path, kernels, center):
    ens = make_ensemble(np.random.default_rng(4), kernels=kernels, center=center)
    ens.save(tmp_path / "e.h5")
    back = dmft.load(tmp_path / "e.h5")
    assert isinstance(back, Ensemble)
    assert_same(ens, back)
    assert (back.phi is None) == (not kernels)


def test_simulated_ensemble_round_trip(tmp_path):
    """A real ensemble from dmft.simulate (record_kernels) survives the round trip."""
    rng = np.random.default_rng(5)
    data = dmft.Dataset(rng.normal(size=(3, 5)), rng.normal(size=3), rng.normal(size=(2, 5)))
    ens = dmft.simulate(dmft.MLP(2, "tanh"), data, dmft.GradientDescent(1.0, 0.1, 3),
                        width=32, seeds=[0, 1], record_kernels=True, center=True)
    ens.save(tmp_path / "e.h5")
    assert_same(ens, dmft.load(tmp_path / "e.h5"))


def test_fluctuations_round_trip_exact(tmp_path):
    fl = make_fluctuations(np.random.default_rng(6))
    fl.save(tmp_path / "f.h5")
    back = dmft.load(tmp_path / "f.h5")
    assert isinstance(back, Fluctuations) and isinstance(back.solution, Solution)
    assert_same(fl, back)


def test_static_solution_round_trip(tmp_path):
    """A real Solution from dmft.solve(method='static')."""
    rng = np.random.default_rng(7)
    data = dmft.Dataset(rng.normal(size=(4, 3)), rng.normal(size=4), rng.normal(size=(2, 3)),
                        rng.normal(size=2))
    sol = dmft.solve(dmft.MLP(2, "relu"), data, dmft.GradientDescent(0.0, 0.1, 6),
                     method="static")
    sol.save(tmp_path / "s.h5")
    assert_same(sol, dmft.load(tmp_path / "s.h5"))


# ------------------------------------------------------------------------------------------
# the layout seen from plain h5py
# ------------------------------------------------------------------------------------------
def _scale_names(ds):
    return tuple(ds.dims[i].label for i in range(ds.ndim)), \
        tuple(list(ds.dims[i].keys())[0] if len(ds.dims[i]) else None for i in range(ds.ndim))


def test_solution_file_layout_in_plain_h5py(tmp_path):
    sol = make_solution(np.random.default_rng(8))
    sol.save(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        a = f.attrs
        assert a["schema_version"] == dio.SCHEMA_VERSION == 1
        assert a["dmft_version"] == dmft.__version__
        assert a["kind"] == "Solution" and a["method"] == "mc" and a["seed"] == 12345
        assert "T" in a["created"]
        assert json.loads(a["net"]) == {"depth": 2, "activation": "tanh"}
        assert json.loads(a["train"]) == sol.train.to_dict()
        assert json.loads(a["spec"])["options"]["samples"] == 1000
        assert a["net_depth"] == 2 and a["train_gamma0"] == 0.7 and a["converged"] == 1
        for name in ("train_predictions", "test_predictions", "ntk", "phi", "g", "A", "B",
                     "residuals"):
            labels, scales = _scale_names(f[name])
            assert labels == DIMS[name] == scales, name
        assert np.array_equal(f["t"][...], sol.t)
        assert np.array_equal(f["s"][...], sol.t)
        assert f["t"].is_scale and f["point"].is_scale
        assert np.array_equal(f["layer"][...], [1, 2])
        assert np.array_equal(f["test_point"][...], [3, 4])  # kernel indices, train first
        assert np.array_equal(f["ntk"][...], sol.ntk)
        assert _scale_names(f["data/X_train"])[0] == ("train_point", "input_dim")
        assert np.array_equal(f["data/X_test"][...], sol.data.X_test)
        assert _scale_names(f["stderr/ntk"])[0] == DIMS["ntk"]
        assert _scale_names(f["extras/f_std"])[0] == ("t", "point")
        assert "sub" in f["extras"] and isinstance(f["extras/sub"], h5py.Group)


def test_ensemble_file_has_seed_dimension(tmp_path):
    ens = make_ensemble(np.random.default_rng(9))
    ens.save(tmp_path / "e.h5")
    with h5py.File(tmp_path / "e.h5", "r") as f:
        assert f.attrs["kind"] == "Ensemble" and f.attrs["width"] == 256
        assert np.array_equal(f["seed"][...], [3, 5, 7, 11]) and f["seed"].is_scale
        assert _scale_names(f["phi"])[0] == ("seed",) + DIMS["phi"]
        assert _scale_names(f["train_predictions"])[0] == ("seed", "t", "train_point")
        assert _scale_names(f["extras/f0"])[0] == ("seed", "point")


def test_fluctuations_file_nests_the_solution(tmp_path):
    fl = make_fluctuations(np.random.default_rng(10))
    fl.save(tmp_path / "f.h5")
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert f.attrs["kind"] == "Fluctuations"
        assert f["solution"].attrs["kind"] == "Solution"
        assert _scale_names(f["prediction_cov"])[0] == DIMS["prediction_cov"]
        assert _scale_names(f["solution/phi"])[0] == DIMS["phi"]


def open_with_xarray(result, path, group=None):
    """Save ``result`` to ``path`` and open it with xarray through h5netcdf (the test is
    skipped where they are not installed)."""
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    if result is not None:
        result.save(path)
    return xr.open_dataset(path, engine="h5netcdf", group=group)


def test_xarray_reads_named_dimensions(tmp_path):
    sol = make_solution(np.random.default_rng(11))
    with open_with_xarray(sol, tmp_path / "s.h5") as ds:
        assert ds["ntk"].dims == DIMS["ntk"]
        assert ds["phi"].dims == DIMS["phi"]
        assert np.array_equal(ds["t"].values, sol.t)
        assert np.array_equal(ds["phi"].values, sol.phi)
    with open_with_xarray(None, tmp_path / "s.h5", group="data") as ds:
        assert ds["X_train"].dims == ("train_point", "input_dim")
    ens = make_ensemble(np.random.default_rng(12))
    with open_with_xarray(ens, tmp_path / "e.h5") as ds:
        assert ds["ntk"].dims == ("seed",) + DIMS["ntk"]
        assert np.array_equal(ds["seed"].values, ens.seeds)
        assert np.allclose(ds["train_predictions"].mean("seed").values,
                           ens.mean().train_predictions)


# ------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------
def _listing(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("existing", [False, True])
def test_crash_mid_write_leaves_no_partial_file(tmp_path, monkeypatch, existing):
    target = tmp_path / "run.h5"
    if existing:
        make_solution(np.random.default_rng(13), L=1).save(target)
        before = target.read_bytes()
    listing = _listing(tmp_path)
    calls = {"n": 0}
    real = dio._create_array

    def failing(group, name, arr, compression):
        calls["n"] += 1
        if calls["n"] == 4:  # a few datasets are already in the temporary file
            raise OSError("disk full (simulated)")
        return real(group, name, arr, compression)

    monkeypatch.setattr(dio, "_create_array", failing)
    with pytest.raises(OSError, match="simulated"):
        dio.save(make_solution(np.random.default_rng(14)), target)
    assert calls["n"] == 4
    assert _listing(tmp_path) == listing  # no temporary file left, no new file
    if existing:
        assert target.read_bytes() == before
        monkeypatch.setattr(dio, "_create_array", real)
        assert isinstance(dmft.load(target), Solution)


def test_unsavable_extras_raise_before_touching_target(tmp_path):
    target = tmp_path / "run.h5"
    sol = make_solution(np.random.default_rng(15), extras={"obj": object()})
    with pytest.raises(ValueError, match=r"extras\['obj'\].*cannot save"):
        sol.save(target)
    assert _listing(tmp_path) == []
    sol = make_solution(np.random.default_rng(15), extras={"a/b": np.zeros(2)})
    with pytest.raises(ValueError, match="key 'a/b' cannot be an HDF5 name"):
        sol.save(target)
    assert _listing(tmp_path) == []


def test_overwrite_replaces_file_and_keeps_permissions(tmp_path):
    target = tmp_path / "run.h5"
    make_solution(np.random.default_rng(16), L=1).save(target)
    sol = make_solution(np.random.default_rng(17), L=2)
    sol.save(target)
    assert dmft.load(target).net.depth == 2
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert _listing(tmp_path) == ["run.h5"]


# ------------------------------------------------------------------------------------------
# versions and bad files
# ------------------------------------------------------------------------------------------
def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.h5"
    make_solution(np.random.default_rng(18), L=1).save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = dio.SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match=r"schema version 2 .*newer.*upgrade dmft"):
        dmft.load(path)


def test_older_schema_goes_through_migration_hook(tmp_path, monkeypatch):
    """A fake schema-0 file that stored the solver diagnostics under another attribute name."""
    path = tmp_path / "old.h5"
    sol = make_solution(np.random.default_rng(19), L=1)
    sol.save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 0
        f.attrs["old_meta"] = f.attrs["meta"]
        del f.attrs["meta"]
        del f.attrs["dmft_sha256"]  # schema-0 files had no checksums
    seen = []

    def upgrade_0_to_1(tree):
        seen.append(tree["attrs"]["schema_version"])
        tree["attrs"]["meta"] = tree["attrs"].pop("old_meta")
        return tree

    monkeypatch.setattr(dio, "MIGRATIONS", {0: upgrade_0_to_1})
    assert_same(sol, dmft.load(path))
    assert seen == [0]
    monkeypatch.setattr(dio, "MIGRATIONS", {})
    with pytest.raises(ValueError, match="schema version 0 and no migration"):
        dmft.load(path)


def test_not_a_result_file(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ValueError, match="not a dmft result file"):
        dmft.load(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        dmft.load(tmp_path / "text.h5")
    with pytest.raises(FileNotFoundError, match="no such result file"):
        dmft.load(tmp_path / "missing.h5")


def test_save_argument_errors(tmp_path):
    sol = make_solution(np.random.default_rng(20), L=1)
    with pytest.raises(ValueError, match="result must be a dmft Solution"):
        dio.save({"a": 1}, tmp_path / "x.h5")
    with pytest.raises(ValueError, match="compression must be"):
        dio.save(sol, tmp_path / "x.h5", compression="zstd")
    with pytest.raises(ValueError, match="directory .* does not exist"):
        dio.save(sol, tmp_path / "nope" / "x.h5")


def test_read_attrs(tmp_path):
    make_ensemble(np.random.default_rng(21)).save(tmp_path / "e.h5")
    attrs = dio.read_attrs(tmp_path / "e.h5")
    assert attrs["kind"] == "Ensemble" and attrs["schema_version"] == 1
    assert json.loads(attrs["spec"])["width"] == 256


def test_long_json_values_round_trip(tmp_path):
    """Options / extras too long for an HDF5 attribute (64 KiB) go to a dataset, still exact."""
    rng = np.random.default_rng(22)
    long_list = rng.normal(size=20_000).tolist()
    sol = make_solution(rng, L=1, options={"history": long_list},
                        extras={"log": ["line %d" % i for i in range(5000)]})
    sol.save(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert "options" not in f.attrs and "__options" in f
    assert_same(sol, dmft.load(tmp_path / "s.h5"))


# ------------------------------------------------------------------------------------------
# seeds beyond int64
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**70, -2**70, 2**64 - 1,
                                  np.random.SeedSequence(2**200, spawn_key=(3,))])
def test_huge_seeds_round_trip(tmp_path, seed):
    sol = make_solution(np.random.default_rng(36), seed=seed)
    sol.save(tmp_path / "s.h5")
    back = dmft.load(tmp_path / "s.h5")
    if isinstance(seed, np.random.SeedSequence):
        assert back.seed.entropy == seed.entropy and back.seed.spawn_key == (3,)
    else:
        assert back.seed == seed and type(back.seed) is int
    if not isinstance(seed, np.random.SeedSequence):  # the informative flat copy
        assert dio.read_attrs(tmp_path / "s.h5")["seed"] in (seed, str(seed))


def test_solve_with_seed_2_to_the_70_saves(tmp_path):
    rng = np.random.default_rng(0)
    data = dmft.Dataset(rng.normal(size=(3, 2)), rng.normal(size=3))
    sol = dmft.solve(dmft.MLP(1, "tanh"), data, dmft.GradientDescent(1., .1, 3), method="mc",
                     seed=2**70, samples=64)
    sol.save(tmp_path / "s.h5")
    assert dmft.load(tmp_path / "s.h5").seed == 2**70
