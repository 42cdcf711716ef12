"""dmft.sweep: a real dask LocalCluster against the serial run, persistence and resume,
failed points, zipped axes, bad grids, the CLI (docs/sweeps.rst)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dmft
from dmft import cli
from dmft.sweep import TIMING_VARIABLES, expand_grid

xr = pytest.importorskip("xarray")

BASE = {"net": {"depth": 1, "activation": "tanh"},
        "data": {"P": 4, "Q": 3, "D": 5, "seed": 0},
        "train": {"gamma0": 1.0, "lr": 0.2, "steps": 8}}
#: static / linear DMFT and a small simulation side by side; "linear" with tanh is a bad
#: combination (ValueError -> "invalid"), lr = 60 makes the networks and the static NTK
#: dynamics diverge (status "diverged")
GRID = {"net.activation": ["linear", "tanh"],
        "train.lr": [0.2, 60.0],
        "variant": [{"name": "static", "solve": {"method": "static"}},
                    {"name": "linear", "solve": {"method": "linear"}},
                    {"name": "N=32", "simulate": {"width": 32, "seeds": 2}}]}


def assert_same(a, b, skip=TIMING_VARIABLES):
    """Every variable and coordinate of two sweep Datasets equal bit for bit (NaN = NaN)."""
    assert set(a.data_vars) == set(b.data_vars)
    for name in list(a.data_vars) + list(a.coords):
        if name in skip:
            continue
        x, y = a[name].values, b[name].values
        assert x.shape == y.shape, name
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), name
        else:
            assert np.array_equal(x, y), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("distributed")
    serial_dir = tmp_path_factory.mktemp("serial")
    cluster_dir = tmp_path_factory.mktemp("cluster")
    start = time.perf_counter()
    serial = dmft.sweep(BASE, GRID, out=serial_dir / "s.h5", serial=True, progress=False)
    t_serial = time.perf_counter() - start
    start = time.perf_counter()
    cluster = dmft.sweep(BASE, GRID, out=cluster_dir / "s.h5", workers=2, progress=False)
    t_cluster = time.perf_counter() - start
    print(f"serial {t_serial:.1f} s, LocalCluster(2) {t_cluster:.1f} s")
    return serial, cluster, serial_dir / "s.h5", cluster_dir / "s.h5"


def test_existing_client_results_sent_back(runs, tmp_path):
    """client= (an existing cluster): the workers send the results back and this process
    writes the files (no shared file system needed); the numbers are the same bits."""
    distributed = pytest.importorskip("distributed")
    from dmft.sweep import WORKER_ENV
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                                  env=WORKER_ENV) as cluster, \
            distributed.Client(cluster) as client:
        ds = dmft.sweep(BASE, GRID, out=tmp_path / "s.h5", client=client, progress=False)
        assert client.status == "running"   # a cluster we were given stays up
    assert_same(runs[0], ds)
    assert_same(runs[0], dmft.load_sweep(tmp_path / "s.h5"))


def test_local_cluster_bit_identical_to_serial(runs):
    serial, cluster, _, path = runs
    assert cluster.attrs["computed"] == 12 and cluster.attrs["reused"] == 0
    assert_same(serial, cluster)
    assert_same(serial, dmft.load_sweep(path))   # what was written is what was returned


def test_file_opens_in_xarray_with_named_coordinates(runs):
    _, _, _, path = runs
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds["final_test_loss"].dims == ("net.activation", "train.lr", "variant")
        assert list(ds["variant"].values) == ["static", "linear", "N=32"]
        assert list(ds["net.activation"].values) == ["linear", "tanh"]
        assert ds["test_predictions"].dims == ("net.activation", "train.lr", "variant",
                                               "step", "test_point")
        point = ds.sel({"net.activation": "tanh", "train.lr": 0.2, "variant": "static"})
        assert str(point.status.values) == "converged"
        assert np.isfinite(float(point.final_test_loss))
        assert ds.attrs["points"] == 12


def test_failed_points_are_recorded_and_the_others_run(runs):
    ds = runs[1]
    status = ds.status
    bad = status.sel({"net.activation": "tanh", "variant": "linear"})
    assert list(bad.values) == ["invalid", "invalid"]
    msg = str(ds.message.sel({"net.activation": "tanh", "variant": "linear",
                              "train.lr": 0.2}).values)
    assert "linear" in msg and "tanh" in msg
    assert np.isnan(ds.final_test_loss.sel({"net.activation": "tanh", "variant": "linear"})
                    ).all()
    # lr = 60 diverges (recorded with the result's status), lr = 0.2 converges
    assert set(status.sel({"train.lr": 60.0, "variant": ["static", "N=32"]}).values.ravel()) \
        == {"diverged"}
    good = status.sel({"train.lr": 0.2}).values.ravel()
    assert list(good).count("converged") == 5
    assert ds.attrs["failed"] == int((status != "converged").sum()) >= 6
    # the networks' N Var of the predictions is there, the DMFT's is not
    assert np.isfinite(ds.test_prediction_nvar.sel({"variant": "N=32", "train.lr": 0.2})).all()
    assert np.isnan(ds.test_prediction_nvar.sel({"variant": "static"})).all()


def test_out_of_memory_and_other_errors_are_recorded(tmp_path, monkeypatch):
    import dmft.config
    real = dmft.config.run

    def flaky(config, **kw):
        if config.train.lr == 0.2:
            raise MemoryError("cannot allocate 1 TiB")
        if config.train.lr == 0.3:
            raise RuntimeError("something else broke")
        return real(config, **kw)

    monkeypatch.setattr(dmft.config, "run", flaky)
    ds = dmft.sweep(SMALL, {"train.lr": [0.1, 0.2, 0.3]}, out=tmp_path / "m.h5", serial=True)
    assert ds.status.values.tolist() == ["converged", "out_of_memory", "error"]
    assert "out of memory (cannot allocate 1 TiB)" in str(ds.message.values[1])
    assert str(ds.message.values[2]) == "RuntimeError: something else broke"
    assert ds.attrs["failed"] == 2 and str(ds.point_file.values[1]) == ""
    # such failures may not recur: a rerun computes them again (and reuses the rest)
    monkeypatch.setattr(dmft.config, "run", real)
    again = dmft.sweep(SMALL, {"train.lr": [0.1, 0.2, 0.3]}, out=tmp_path / "m.h5",
                       serial=True)
    assert (again.attrs["computed"], again.attrs["reused"], again.attrs["failed"]) == (2, 1, 0)


def test_deterministic_failures_are_reused_unless_retry_failed(tmp_path):
    grid = {"solve.method": ["static", "linear"]}     # linear with tanh: invalid
    ds = dmft.sweep(SMALL, grid, out=tmp_path / "r.h5", serial=True)
    assert ds.status.values.tolist() == ["converged", "invalid"]
    again = dmft.sweep(SMALL, grid, out=tmp_path / "r.h5", serial=True)
    assert again.attrs["reused"] == 2
    retry = dmft.sweep(SMALL, grid, out=tmp_path / "r.h5", serial=True, retry_failed=True)
    assert (retry.attrs["computed"], retry.attrs["reused"]) == (1, 1)


def test_load_point_returns_the_full_result(runs):
    _, cluster, _, path = runs
    sol = dmft.load_point(path, {"net.activation": "linear", "train.lr": 0.2,
                                 "variant": "linear"})
    assert isinstance(sol, dmft.Solution) and sol.method == "linear"
    assert sol.phi.ndim == 5   # the two-time kernels live in the per-point file
    pt = cluster.sel({"net.activation": "linear", "train.lr": 0.2, "variant": "linear"})
    assert np.array_equal(sol.test_predictions, pt.test_predictions.values)
    ens = dmft.load_point(path, 5)   # flat index (C order): linear, lr 60, N=32
    assert isinstance(ens, dmft.Ensemble) and ens.width == 32
    with pytest.raises(ValueError, match="no result"):
        dmft.load_point(path, {"net.activation": "tanh", "train.lr": 0.2,
                               "variant": "linear"})


SMALL = dict(BASE, solve={"method": "static"})
SMALL_GRID = {"train.gamma0": [0.5, 1.0], "train.lr": [0.1, 0.2, 0.3]}


def test_resume_computes_only_missing_points(tmp_path):
    full = dmft.sweep(SMALL, SMALL_GRID, out=tmp_path / "a.h5", serial=True)
    assert (full.attrs["computed"], full.attrs["reused"]) == (6, 0)
    again = dmft.sweep(SMALL, SMALL_GRID, out=tmp_path / "a.h5", serial=True)
    assert (again.attrs["computed"], again.attrs["reused"]) == (0, 6)
    for i in (1, 4):
        os.remove(tmp_path / "a.h5.points" / f"{i:04d}.npz")
    os.remove(tmp_path / "a.h5.points" / "0002.h5")   # a record without its result file
    lines = []
    resumed = dmft.sweep(SMALL, SMALL_GRID, out=tmp_path / "a.h5", serial=True,
                         log=lines.append)
    assert (resumed.attrs["computed"], resumed.attrs["reused"]) == (3, 3)
    assert sum(" point " in line for line in lines) == 3
    assert_same(full, resumed)
    # a changed base config is a different point: nothing is reused
    changed = dict(SMALL, train=dict(BASE["train"], steps=9))
    redo = dmft.sweep(changed, SMALL_GRID, out=tmp_path / "a.h5", serial=True)
    assert redo.attrs["computed"] == 6


def test_crash_midway_then_resume(tmp_path, monkeypatch):
    import importlib
    mod = importlib.import_module("dmft.sweep")   # dmft.sweep, the attribute, is the function
    full = dmft.sweep(SMALL, SMALL_GRID, out=tmp_path / "full.h5", serial=True)
    real, calls = mod.run_point, []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt   # Ctrl-C while the third point runs
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "run_point", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        dmft.sweep(SMALL, SMALL_GRID, out=tmp_path / "b.h5", serial=True)
    assert not (tmp_path / "b.h5").exists()   # no half-written sweep file
    assert len(list((tmp_path / "b.h5.points").glob("*.npz"))) == 2
    monkeypatch.setattr(mod, "run_point", real)
    resumed = dmft.sweep(SMALL, SMALL_GRID, out=tmp_path / "b.h5", serial=True)
    assert (resumed.attrs["computed"], resumed.attrs["reused"]) == (4, 2)
    assert_same(full, resumed, skip=TIMING_VARIABLES + ("point_file",))


def test_identical_points_are_computed_once(tmp_path):
    grid = {"simulate.width": [16, 32],
            "variant": [{"name": "dmft", "solve": {"method": "static"}},
                        {"name": "nets", "simulate": {"seeds": 2}}]}
    ds = dmft.sweep(SMALL, grid, out=tmp_path / "d.h5", serial=True, keep_arrays=True)
    assert (ds.attrs["computed"], ds.attrs["distinct_computed"]) == (4, 3)
    dm = ds.sel(variant="dmft")
    assert_same(dm.isel({"simulate.width": 0}), dm.isel({"simulate.width": 1}),
                skip=TIMING_VARIABLES + ("point_file", "simulate.width"))
    a, b = (dmft.load_point(tmp_path / "d.h5", {"simulate.width": w, "variant": "dmft"})
            for w in (16, 32))
    assert np.array_equal(a.phi, b.phi)
    # the networks differ along the axis; keep_arrays stores the equal-time NTK
    nets = ds.sel(variant="nets")
    assert not np.array_equal(nets.ntk.isel({"simulate.width": 0}),
                              nets.ntk.isel({"simulate.width": 1}))
    assert ds.ntk.dims[-3:] == ("step", "point", "point_")


def test_zipped_axes_share_one_dimension(tmp_path):
    ds = dmft.sweep(SMALL, {"train.gamma0": [0.5, 1.0]},
                    zip={"train.lr": [0.1, 0.2, 0.4], "train.steps": [4, 6, 8]},
                    out=tmp_path / "z.h5", serial=True)
    assert ds["train.lr"].dims == ("zip0",) and ds["train.steps"].dims == ("zip0",)
    assert ds.final_train_loss.dims == ("train.gamma0", "zip0")
    assert ds.sizes["step"] == 9
    # shorter runs are padded with NaN past their last step
    assert np.isnan(ds.train_loss.isel(zip0=0).values[:, 5:]).all()
    assert np.isfinite(ds.train_loss.isel(zip0=0).values[:, :5]).all()
    t = ds.t.isel({"train.gamma0": 0, "zip0": 1}).values
    assert np.allclose(t[:7], 0.2 * np.arange(7))
    # the final loss is at each point's own last step
    assert ds.final_train_loss.isel({"train.gamma0": 0, "zip0": 0}) == \
        ds.train_loss.isel({"train.gamma0": 0, "zip0": 0, "step": 4})
    # TOML spelling: [[sweep.zip]] with a name
    axes = expand_grid({"zip": [{"name": "schedule", "train": {"lr": [1, 2]},
                                 "solve": {"samples": [10, 20]}}]})
    assert axes[0].name == "schedule" and list(axes[0].coords) == ["train.lr", "solve.samples"]


@pytest.mark.parametrize("grid, match", [
    ({"train.gama0": [1.0]}, "grid key 'train.gama0'"),
    ({"foo.bar": [1]}, "unknown section 'foo'"),
    ({"gamma0": [1.0]}, "grid key 'gamma0' must be 'section.key'"),
    ({"train.gamma0": []}, "grid key 'train.gamma0' has no values"),
    ({"train.gamma0": 1.0}, "grid key 'train.gamma0' needs a list"),
    ({"solve.nonsense": [1]}, "grid key 'solve.nonsense'"),
    ({"simulate.width": [8]}, "grid key 'simulate.width': no point has a \\[simulate\\]"),
    ({"zip": {"train.lr": [0.1, 0.2], "train.steps": [3]}}, "one length"),
    ({"train.lr": [0.1], "zip": {"train.lr": [0.2]}}, "'train.lr' appears twice"),
])
def test_bad_grids_name_the_key(tmp_path, grid, match):
    with pytest.raises(ValueError, match=match):
        dmft.sweep(SMALL, grid, out=tmp_path / "x.h5", serial=True)
    assert not (tmp_path / "x.h5.points").exists() or \
        not list((tmp_path / "x.h5.points").iterdir())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown section 'solver'"):
        dmft.sweep(dict(SMALL, solver={}), {}, out=tmp_path / "x.h5", serial=True)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        dmft.sweep(SMALL, {}, out=tmp_path / "x.h5", workers=0)
    with pytest.raises(ValueError, match="serial=True runs the points in this process"):
        dmft.sweep(SMALL, {}, out=tmp_path / "x.h5", serial=True, workers=2)
    with pytest.raises(ValueError, match="does not exist"):
        dmft.sweep(SMALL, {}, out=tmp_path / "nope" / "x.h5", serial=True)


def test_without_dask_serial_works_and_the_default_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)   # import distributed fails
    with pytest.raises(ImportError, match=r'pip install "dmft\[sweeps\]"'):
        dmft.sweep(SMALL, {"train.lr": [0.1]}, out=tmp_path / "x.h5")
    ds = dmft.sweep(SMALL, {"train.lr": [0.1]}, out=tmp_path / "x.h5", serial=True)
    assert ds.status.values.tolist() == ["converged"]


TOML = """
[net]
depth = 1
activation = "tanh"

[data]
P = 4
Q = 3
D = 5

[train]
gamma0 = 1.0
lr = 0.2
steps = 6

[solve]
method = "static"

[sweep]
train.gamma0 = [0.5, 1.0]
net.depth = [1, 2]
"""


def test_cli_sweep(tmp_path, capsys):
    cfg = tmp_path / "sw.toml"
    cfg.write_text(TOML)
    out = tmp_path / "sw.h5"
    assert cli.main(["sweep", str(cfg), "-o", str(out), "--serial", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "4 points" in text and "4 computed, 0 reused" in text
    ds = dmft.load_sweep(out)
    assert ds.final_test_loss.dims == ("train.gamma0", "net.depth")
    assert (ds.status == "converged").all()
    assert cli.main(["sweep", str(cfg), "-o", str(out), "--serial", "--no-progress"]) == 0
    assert "0 computed, 4 reused" in capsys.readouterr().out
    cfg.write_text(TOML.replace("net.depth", "net.dept"))
    assert cli.main(["sweep", str(cfg), "-o", str(out), "--serial"]) == 2
    assert "net.dept" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_of_the_cli_then_rerun(tmp_path):
    """The real thing: kill -9 the driver of a LocalCluster sweep midway, rerun it."""
    pytest.importorskip("distributed")
    cfg = tmp_path / "sw.toml"
    cfg.write_text(TOML.replace('method = "static"', 'method = "mc"\nsamples = 3000\nseed = 1')
                   .replace("[0.5, 1.0]", "[0.25, 0.5, 1.0, 2.0]"))
    out = tmp_path / "sw.h5"
    cmd = [sys.executable, "-m", "dmft", "sweep", str(cfg), "-o", str(out), "--workers", "2",
           "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    points = tmp_path / "sw.h5.points"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if points.exists() and len(list(points.glob("*.npz"))) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(points.glob("*.npz")))
    assert 0 < done < 8 and not out.exists()
    lines = []
    ds = dmft.sweep(str(cfg), out=out, workers=2, log=lines.append)
    assert ds.attrs["computed"] == 8 - done and ds.attrs["reused"] == done
    ref = dmft.sweep(str(cfg), out=tmp_path / "ref.h5", serial=True)
    assert_same(ref, ds, skip=TIMING_VARIABLES + ("point_file",))


def test_benchmark_identity_check_sees_differences(runs):
    """benchmarks/sweep.py's bit-identity verdict: 0 for equal files, the size of a planted
    difference, and a status mismatch reported (and left out of the numeric comparison)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "sweep.py")
    spec = importlib.util.spec_from_file_location("bench_sweep", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    serial, cluster = runs[0], runs[1]
    diffs, differ = bench.max_diffs(serial, cluster)
    assert max(diffs.values()) == 0 and differ == []
    planted = cluster.copy(deep=True)
    v = planted.test_predictions.values
    sel = (0, 0, 0, 3, 1)         # linear, lr 0.2, static: converged
    v[sel] += 1e-12
    diffs, _ = bench.max_diffs(serial, planted)
    assert diffs["test_predictions"] == pytest.approx(1e-12, rel=1e-3)
    planted.status.values[0, 0, 0] = "error"
    diffs, differ = bench.max_diffs(serial, planted)
    assert differ == [0] and diffs["test_predictions"] == 0


def test_barlow_twins_sweep_records_the_representation_read_outs(tmp_path):
    """Self-supervised points (docs/theory.rst §7): the sweep file carries the views'
    cross-correlation, its off-diagonal mass and the linear probe, equal to the read-outs of
    the per-point results; no kernel-target alignment (there are no targets)."""
    base = {"net": {"depth": 1, "activation": "tanh"},
            "data": {"generator": "views", "M": 5, "Q": 6, "D": 4, "dim": 2},
            "train": {"gamma0": 0.0, "lr": 0.3, "steps": 5, "loss": "barlow_twins",
                      "output_offset": "nngp"}}
    grid = {"variant": [{"name": "static", "solve": {"method": "static"}},
                        {"name": "N=32", "simulate": {"width": 32, "seeds": 2,
                                                      "center": True,
                                                      "parameterization": "ntk"}}]}
    ds = dmft.sweep(base, grid, out=str(tmp_path / "bt.h5"), serial=True, progress=False)
    assert list(ds.status.values) == ["converged", "converged"]
    assert "ntk_alignment" not in ds and ds.cross_correlation.dims[-2:] == ("embed", "embed_")
    for i in range(2):
        res = dmft.load_point(str(tmp_path / "bt.h5"), i)
        cc = dmft.cross_correlation(res)
        probe = dmft.linear_probe(res)
        off = cc[..., -1, :, :] * (1 - np.eye(2))
        mass = np.sum(off ** 2, axis=(-2, -1))
        if cc.ndim == 4:                     # an Ensemble: means over the networks
            cc, probe, mass = cc.mean(0), probe.mean(0), mass.mean(0)
        np.testing.assert_allclose(ds.cross_correlation.values[i], cc, rtol=1e-12)
        np.testing.assert_allclose(ds.linear_probe.values[i], probe, rtol=1e-12)
        assert float(ds.final_off_diagonal_mass.values[i]) == pytest.approx(float(mass),
                                                                            rel=1e-12)
