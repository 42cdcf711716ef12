"""The command line and the TOML configs.

What these tests prove
- ``dmft --help`` / ``--version`` / ``methods`` work, also as ``python -m dmft``.
- ``dmft demo --quick`` writes the HDF5 files and the PNG, and the saved static solution is the
  one dmft.solve gives for the documented demo spec (so the files hold what they claim).
- ``dmft run`` with the shipped example configs writes results equal to calling the API with the
  same specs; data from .npy / .csv files are read as given.
- ``dmft plot`` draws Solution, Ensemble and Fluctuations files.
- Bad configs and bad files give exit code 2 and a one-line message naming the problem, not a
  traceback.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import dmft
from dmft import cli
from dmft.config import load_config, parse_config, teacher_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC and os.path.getsize(path) > 10_000


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "run", "plot", "methods"):
        assert cmd in out
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert dmft.__version__ in capsys.readouterr().out


def test_python_dash_m_dmft():
    proc = subprocess.run([sys.executable, "-m", "dmft", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"dmft {dmft.__version__}"
    proc = subprocess.run([sys.executable, "-m", "dmft", "run", "missing.toml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["dmft run: error: config file missing.toml "
                                                "does not exist"]


def test_methods_lists_table(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in dmft.METHODS:
        assert name in out


def test_demo_quick_writes_files(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "-o", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    names = {"demo.h5", "demo_static.h5", "demo_width128.h5", "demo_width1024.h5", "demo.png"}
    assert names <= set(os.listdir(tmp_path))
    for name in names:
        assert str(tmp_path / name) in out
    assert _is_png(tmp_path / "demo.png")
    cfg = cli.DEMO_QUICK
    static = dmft.load(tmp_path / "demo_static.h5")
    data = teacher_student(cfg["P"], cfg["Q"], cfg["D"], cfg["data_seed"])
    net = dmft.MLP(cfg["depth"], cfg["activation"])
    train = dmft.GradientDescent(cfg["gamma0"], cfg["lr"], cfg["steps"])
    again = dmft.solve(net, data, train, method="static")
    assert static.data == data and static.net == net and static.train == train
    np.testing.assert_array_equal(static.train_predictions, again.train_predictions)
    ens = dmft.load(tmp_path / "demo_width1024.h5")
    assert ens.width == 1024 and ens.n_seeds == cfg["seeds"]
    main = dmft.load(tmp_path / "demo.h5")
    assert main.method == "mc"


def test_demo_uses_mc_method_from_the_table(tmp_path, monkeypatch, capsys):
    """The demo takes the DMFT from dmft.METHODS['mc'], whatever adapter is registered."""
    import dataclasses
    calls = []

    class FakeMC(dmft.Method, name="mc", description="fake"):
        Options = dataclasses.make_dataclass(
            "FakeOptions", [("samples", int, dmft.option(None, None, "samples"))],
            bases=(dmft.Options,), frozen=True)

        def run(self, ctx, net, data, train, *, opts):
            calls.append({"seed": ctx.seed_int, "samples": opts.samples})
            sol = dmft.solve(net, data, train, method="static")
            return dataclasses.replace(sol, method="mc", seed=ctx.seed_int,
                                       options={"samples": opts.samples})

    monkeypatch.setitem(dmft.METHODS, "mc", FakeMC())
    assert cli.main(["demo", "--quick", "-o", str(tmp_path), "--no-progress"]) == 0
    assert calls == [{"seed": cli.DEMO_QUICK["solve_seed"],
                      "samples": cli.DEMO_QUICK["samples"]}]
    sol = dmft.load(tmp_path / "demo.h5")
    assert sol.method == "mc" and sol.options == {"samples": cli.DEMO_QUICK["samples"]}
    assert "DMFT (mc)" in capsys.readouterr().out


def test_run_static_example_matches_api(tmp_path, capsys):
    out = tmp_path / "static.h5"
    fig = tmp_path / "static.png"
    assert cli.main(["run", os.path.join(EXAMPLES, "static_ntk.toml"), "-o", str(out),
                     "--plot", str(fig)]) == 0
    sol = dmft.load(out)
    assert sol.method == "static" and sol.net == dmft.MLP(2, "relu")
    ref = dmft.solve(sol.net, teacher_student(8, 8, 10, 0), sol.train, method="static")
    np.testing.assert_array_equal(sol.test_predictions, ref.test_predictions)
    assert _is_png(fig)
    assert "static.h5" in capsys.readouterr().out


def test_run_simulate_example_and_plot(tmp_path):
    out = tmp_path / "sim.h5"
    assert cli.main(["run", os.path.join(EXAMPLES, "simulate.toml"), "-o", str(out),
                     "--no-progress"]) == 0
    ens = dmft.load(out)
    assert isinstance(ens, dmft.Ensemble) and ens.width == 512
    assert list(ens.seeds) == list(range(16))
    ref = dmft.simulate(ens.net, ens.data, ens.train, width=512, seeds=[3])
    np.testing.assert_array_equal(ens.ntk[3], ref.ntk[0])
    assert cli.main(["plot", str(out), "-o", str(tmp_path / "sim.png")]) == 0
    assert _is_png(tmp_path / "sim.png")
    assert cli.main(["plot", str(out)]) == 0  # default name next to the file
    assert _is_png(tmp_path / "sim.png")


def test_every_example_config_parses():
    names = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".toml"))
    assert len(names) >= 3
    for name in names:
        cfg = load_config(os.path.join(EXAMPLES, name))
        assert cfg.task in ("solve", "simulate")
        if cfg.task == "solve":
            assert cfg.options["method"] in dmft.METHODS


def test_run_mc_example(tmp_path):
    out = tmp_path / "mc.h5"
    assert cli.main(["run", os.path.join(EXAMPLES, "dmft_mc.toml"), "-o", str(out)]) == 0
    assert dmft.load(out).method == "mc"


def test_plot_fluctuations_file(tmp_path):
    from test_io import make_fluctuations
    fl = make_fluctuations(np.random.default_rng(0))
    fl.save(tmp_path / "f.h5")
    fig = dmft.plot(tmp_path / "f.h5", tmp_path / "f.png")
    assert len(fig.axes) == 9 and _is_png(tmp_path / "f.png")
    assert cli.main(["plot", str(tmp_path / "f.h5"), "-o", str(tmp_path / "g.png")]) == 0


def test_data_from_files(tmp_path):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(5, 3)), rng.normal(size=5)
    Xt = rng.normal(size=(2, 3))
    np.save(tmp_path / "X.npy", X)
    np.savetxt(tmp_path / "y.csv", y, delimiter=",")
    np.savetxt(tmp_path / "Xt.csv", Xt, delimiter=",")
    (tmp_path / "cfg.toml").write_text(
        '[net]\ndepth = 1\nactivation = "erf"\n'
        '[data]\nX_train = "X.npy"\ny_train = "y.csv"\nX_test = "Xt.csv"\n'
        '[train]\ngamma0 = 0.5\nlr = 0.2\nsteps = 3\n'
        '[solve]\nmethod = "static"\n')
    cfg = load_config(tmp_path / "cfg.toml")
    np.testing.assert_array_equal(cfg.data.X_train, X)
    np.testing.assert_allclose(cfg.data.y_train, y, rtol=1e-15)  # through decimal text
    assert cfg.data.Q == 2 and cfg.data.y_test is None
    assert cli.main(["run", str(tmp_path / "cfg.toml"), "-o", str(tmp_path / "o.h5")]) == 0
    assert dmft.load(tmp_path / "o.h5").data == cfg.data


BASE = {"net": {"depth": 1, "activation": "tanh"},
        "data": {"P": 4, "Q": 2, "D": 3, "seed": 0},
        "train": {"gamma0": 1.0, "lr": 0.1, "steps": 5},
        "solve": {"method": "static"}}


def _with(**changes):
    cfg = {k: dict(v) for k, v in BASE.items()}
    for path, value in changes.items():
        section, _, key = path.partition("__")
        if key:
            cfg.setdefault(section, {})[key] = value
        elif value is None:
            cfg.pop(section)
        else:
            cfg[section] = value
    return cfg


@pytest.mark.parametrize("changes,match", [
    ({"net__width": 3}, r"unknown key 'width' in \[net\]"),
    ({"train__learning_rate": 0.1}, r"unknown key 'learning_rate' in \[train\]"),
    ({"data__n_train": 4}, r"unknown key 'n_train' in \[data\]"),
    ({"simulate__width": 16}, "exactly one of a \\[solve\\] or a \\[simulate\\]"),
    ({"solve": None}, "exactly one of a \\[solve\\] or a \\[simulate\\]"),
    ({"train": None}, r"no \[train\] section"),
    ({"data": None}, r"no \[data\] section"),
    ({"output": {"path": "x"}}, r"unknown key 'output' in \[top level\]"),
    ({"net__activation": "sigmoid"}, "activation 'sigmoid' is unknown"),
    ({"train__lr": -1.0}, "lr must be a finite number > 0"),
    ({"data__P": 0}, r"data.P must be an integer >= 1"),
    ({"data__generator": "mnist"}, "data.generator 'mnist' is unknown"),
    ({"data__generator": "teacher_student", "data__X_train": "X.npy"},
     "both a generator and files"),
    ({"solve__method": 3}, "solve.method must be a string"),
])
def test_bad_config_values(changes, match):
    with pytest.raises(ValueError, match=match):
        parse_config(_with(**changes))


def test_bad_simulate_and_file_sections(tmp_path):
    sim = _with(solve=None, simulate={"width": 8, "seeds": 2, "widht": 3})
    with pytest.raises(ValueError, match=r"unknown key 'widht' in \[simulate\]"):
        parse_config(sim)
    with pytest.raises(ValueError, match=r"\[simulate\] needs width"):
        parse_config(_with(solve=None, simulate={"seeds": 2}))
    with pytest.raises(ValueError, match="simulate.seeds must be >= 1"):
        parse_config(_with(solve=None, simulate={"width": 8, "seeds": 0}))
    with pytest.raises(ValueError, match=r"\[fluctuations\] needs a \[solve\]"):
        parse_config(_with(solve=None, simulate={"width": 8}, fluctuations={}))
    files = {"data": {"X_train": "nope.npy", "y_train": "y.npy"}}
    with pytest.raises(ValueError, match="data.X_train: file .*nope.npy does not exist"):
        parse_config(_with(**files), base_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'y_train' is missing"):
        parse_config(_with(data={"X_train": "X.npy"}), base_dir=str(tmp_path))
    (tmp_path / "X.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.xlsx'"):
        parse_config(_with(data={"X_train": "X.xlsx", "y_train": "X.xlsx"}),
                     base_dir=str(tmp_path))


def test_run_bad_config_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[net]\ndepth = 1\nactivaton = "tanh"\n[data]\nP = 4\n'
                   '[train]\nlr = 0.1\n[solve]\nmethod = "static"\n')
    assert cli.main(["run", str(bad), "-o", str(tmp_path / "o.h5")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "unknown key 'activaton' in [net]" in err and "bad.toml" in err
    assert not (tmp_path / "o.h5").exists()
    bad.write_text("[net\n")
    assert cli.main(["run", str(bad)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    bad.write_text('[data]\nP = 4\n[train]\nlr = 0.1\n[solve]\nmethod = "nope"\n')
    assert cli.main(["run", str(bad), "-o", str(tmp_path / "o.h5")]) == 2
    assert "method 'nope' is unknown" in capsys.readouterr().err
    bad.write_text('[data]\nP = 4\n[train]\nlr = 0.1\n[solve]\nmethod = "static"\n'
                   'samples = 10\n')
    assert cli.main(["run", str(bad), "-o", str(tmp_path / "o.h5")]) == 2
    assert "unknown option(s)" in capsys.readouterr().err
    bad.write_text('[data]\nP = 4\n[train]\nlr = 0.1\n[solve]\nmethod = "static"\n')
    assert cli.main(["run", str(bad), "-o", str(tmp_path / "missing" / "o.h5")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plot_bad_file_exits_2(tmp_path, capsys):
    (tmp_path / "x.h5").write_text("not hdf5")
    assert cli.main(["plot", str(tmp_path / "x.h5")]) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path / "y.h5")]) == 2
    assert "no such result file" in capsys.readouterr().err


def test_teacher_student_generator():
    d = teacher_student(6, 3, 5, seed=2)
    assert (d.P, d.Q, d.D) == (6, 3, 5)
    y = np.concatenate([d.y_train, d.y_test])
    assert np.mean(y ** 2) == pytest.approx(1.0, rel=1e-12)
    assert teacher_student(6, 3, 5, seed=2) == d and teacher_student(6, 3, 5, seed=3) != d
    assert teacher_student(4, 0, 5).Q == 0
    with pytest.raises(ValueError, match="data.noise must be a number >= 0"):
        teacher_student(noise=-1.0)


def test_plot_draws_the_data():
    """The quick-look panels show the result's own numbers (not just 'a figure exists')."""
    from dmft.plotting import compare, ntk_movement
    from test_io import make_ensemble, make_solution
    rng = np.random.default_rng(3)
    sol = make_solution(rng, L=1)
    fig = dmft.plot(sol)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), sol.train_loss)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), sol.t)
    np.testing.assert_array_equal(fig.axes[1].lines[0].get_ydata(), sol.train_predictions[:, 0])
    ens = make_ensemble(rng)
    fig = dmft.plot(ens)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), ens.train_loss.mean(axis=0))
    fig = compare({"sol": sol, "ens": ens})
    np.testing.assert_allclose(fig.axes[1].lines[1].get_ydata(), ens.test_loss.mean(axis=0))
    K0 = np.array([[2.0, 1.0], [1.0, 3.0]])
    t = np.linspace(0, 1, 5)
    np.testing.assert_allclose(ntk_movement(K0 * (1 + t)[:, None, None]), t)
    with pytest.raises(ValueError, match="plot needs a Solution, Ensemble, Fluctuations or the "
                                         "path"):
        dmft.plot(42)


# ------------------------------------------------------------------------------------------
# issue 20: output paths checked before work, --points, interrupts, oversized problems
# ------------------------------------------------------------------------------------------
_STATIC_CFG = ('[net]\ndepth = 1\nactivation = "tanh"\n[data]\nP = 4\nQ = 2\n[train]\n'
               'lr = 0.1\nsteps = 5\n[solve]\nmethod = "static"\n')


def test_run_output_paths_checked_before_work(tmp_path, capsys, monkeypatch):
    import dmft.config
    cfg = tmp_path / "c.toml"
    cfg.write_text(_STATIC_CFG)
    calls = []
    monkeypatch.setattr(dmft.config, "run", lambda *a, **k: calls.append(1))
    cases = [(["-o", str(tmp_path)], "is a directory"),
             (["-o", str(tmp_path / "nope" / "o.h5")], "does not exist"),
             (["--plot", str(tmp_path / "nope" / "f.png")], "does not exist"),
             (["--plot", str(tmp_path)], "is a directory"),
             (["--plot", str(tmp_path / "f.xyz")], "unknown image format"),
             (["-o", str(tmp_path / "o.png"), "--plot", str(tmp_path / "o.png")],
              "is the result file itself")]
    for extra, match in cases:
        assert cli.main(["run", str(cfg), "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0] and err[0].startswith("dmft run: error:"), err
    assert calls == []                              # nothing was computed
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "o.h5").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_run_unwritable_folder(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(_STATIC_CFG)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(["run", str(cfg), "-o", str(ro / "o.h5")]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_demo_outdir_checked(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["demo", "--quick", "-o", str(f)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["demo", "--quick", "-o", str(f / "sub")]) == 2
    assert "cannot create output directory" in capsys.readouterr().err


def test_plot_points_must_be_positive(tmp_path, capsys):
    sol = dmft.solve(dmft.MLP(1, "tanh"), teacher_student(4, 2, 5, 0),
                     dmft.GradientDescent(0.5, 0.1, 5), method="static")
    sol.save(tmp_path / "s.h5")
    for k in ("0", "-2"):
        assert cli.main(["plot", str(tmp_path / "s.h5"), "--points", k]) == 2
        assert "--points must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()
    assert cli.main(["plot", str(tmp_path / "s.h5"), "-o", str(tmp_path / "nope" / "f.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path / "s.h5"), "--points", "1"]) == 0


def test_run_oversized_problem_is_one_line(tmp_path):
    cfg = tmp_path / "big.toml"
    cfg.write_text('[net]\ndepth = 3\nactivation = "linear"\n[data]\nP = 200\nQ = 20\nD = 10\n'
                   '[train]\ngamma0 = 0.5\nlr = 0.05\nsteps = 500\n[solve]\nmethod = "linear"\n'
                   'memory_limit = 24\n')
    proc = subprocess.run([sys.executable, "-m", "dmft", "run", str(cfg), "-o",
                           str(tmp_path / "o.h5")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert err[0].startswith("dmft run: error: method='linear' needs ~") and "GiB" in err[0]
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_run_interrupted_exits_130(tmp_path, signame):
    import signal
    cfg = tmp_path / "slow.toml"
    cfg.write_text('[net]\ndepth = 3\nactivation = "tanh"\n[data]\nP = 8\nQ = 0\n[train]\n'
                   'gamma0 = 0.5\nlr = 0.01\nsteps = 100000\n[simulate]\nwidth = 512\n'
                   'seeds = 64\n')
    # SIGINT may be inherited as ignored (background jobs): restore the default, as a
    # terminal's Ctrl-C would find it
    proc = subprocess.Popen([sys.executable, "-m", "dmft", "run", str(cfg), "-v", "-o",
                             str(tmp_path / "o.h5"), "--no-progress"], cwd=ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:                    # the estimate is logged: the run started
            if "estimated" in line:
                break
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "dmft run: interrupted" in err
    assert not (tmp_path / "o.h5").exists()
