"""Hostile input: every invalid argument of the public API gets a ValueError that names it.

A table of invalid inputs (specs, every method's options, seeds, simulate, fluctuations, files,
plotting) is run through the public entry points. Each case must raise ``ValueError`` (or a
subclass) whose message contains the name of the offending argument: no other exception type
(TypeError, KeyError, ZeroDivisionError, MemoryError ... count as crashes), no silent
acceptance. The divergent settings (numerical trouble rather than bad input) are in
tests/test_divergence.py, oversized problems in tests/test_resources.py, damaged files in
tests/test_io.py.
"""
import numpy as np
import pytest

import dmft

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 4))
Y = np.array([1.0, -0.5, 0.25])
XT = RNG.standard_normal((2, 4))
DATA = dmft.Dataset(X, Y, XT, np.array([0.1, 0.2]))
NET1, NET2 = dmft.MLP(1, "tanh"), dmft.MLP(2, "tanh")
LIN2 = dmft.MLP(2, "linear")
TRAIN = dmft.GradientDescent(1.0, 0.1, 3)
BAD_NUMBERS = [0, -1, 1.5, float("nan"), float("inf"), "3", True, None, [2]]


def _cases():
    c = []

    def add(name, fn, match):
        c.append(pytest.param(fn, match, id=name))

    # specs -------------------------------------------------------------------------------
    for v in [0, -1, 1.5, "2", True, None, float("nan")]:
        add(f"MLP.depth={v!r}", lambda v=v: dmft.MLP(v, "tanh"), "depth")
    for v in ["sigmoid", "", 3, None, ["tanh"]]:
        add(f"MLP.activation={v!r}", lambda v=v: dmft.MLP(1, v), "activation")
    bad_X = {"nan": np.where(np.eye(3, 4) > 0, np.nan, X), "inf": X + np.inf,
             "complex": X + 1j, "strings": np.array([["a"] * 4] * 3), "empty": np.zeros((0, 4)),
             "3d": X[None], "object": np.array([[object()] * 4] * 3)}
    for k, v in bad_X.items():
        add(f"Dataset.X_train={k}", lambda v=v: dmft.Dataset(v, Y), "X_train")
    bad_y = {"nan": np.array([1.0, np.nan, 0.0]), "complex": Y + 1j, "short": Y[:2],
             "2d-wrong": np.ones((3, 2, 2)), "strings": np.array(["a", "b", "c"]),
             "inf": np.array([np.inf, 0.0, 0.0])}
    for k, v in bad_y.items():
        add(f"Dataset.y_train={k}", lambda v=v: dmft.Dataset(X, v), "y_train")
    add("Dataset.X_test=wrong-D", lambda: dmft.Dataset(X, Y, XT[:, :3]), "X_test")
    add("Dataset.X_test=nan", lambda: dmft.Dataset(X, Y, XT + np.nan), "X_test")
    add("Dataset.X_test=complex", lambda: dmft.Dataset(X, Y, XT + 0j + 1j), "X_test")
    add("Dataset.y_test-without-X_test", lambda: dmft.Dataset(X, Y, None, Y), "y_test")
    add("Dataset.y_test=wrong-shape", lambda: dmft.Dataset(X, Y, XT, Y), "y_test")
    for v in [-1, float("nan"), float("inf"), "1", None, True]:
        add(f"GradientDescent.gamma0={v!r}", lambda v=v: dmft.GradientDescent(v, 0.1, 3),
            "gamma0")
    for v in [0, -0.1, float("nan"), float("inf"), "0.1", None]:
        add(f"GradientDescent.lr={v!r}", lambda v=v: dmft.GradientDescent(1.0, v, 3), "lr")
    for v in [0, -1, 1.5, "3", None, True]:
        add(f"GradientDescent.steps={v!r}", lambda v=v: dmft.GradientDescent(1.0, 0.1, v),
            "steps")
    add("GradientDescent.loss=unknown", lambda: dmft.GradientDescent(1.0, 0.1, 3,
                                                                      loss="l7"), "loss")

    # solve: specs, method, seeds, options --------------------------------------------------
    add("solve.net=str", lambda: dmft.solve("mlp", DATA, TRAIN), "net")
    add("solve.data=array", lambda: dmft.solve(NET1, X, TRAIN), "data")
    add("solve.train=dict", lambda: dmft.solve(NET1, DATA, {"lr": 0.1}), "train")
    for v in ["foo", 3, None, ""]:
        add(f"solve.method={v!r}", lambda v=v: dmft.solve(NET1, DATA, TRAIN, method=v), "method")
    add("solve.linear-with-tanh", lambda: dmft.solve(NET1, DATA, TRAIN, method="linear"),
        "linear")
    for method in ("static", "linear", "mc", "gia", "perturbative"):
        net = LIN2 if method == "linear" else NET1
        for v in ["abc", -1, 1.5, True, [1], 2 ** 128 * 1.0]:
            add(f"solve.{method}.seed={v!r}",
                lambda v=v, m=method, n=net: dmft.solve(n, DATA, TRAIN, method=m, seed=v),
                "seed")
        add(f"solve.{method}.unknown-option",
            lambda m=method, n=net: dmft.solve(n, DATA, TRAIN, method=m, bogus_option=1),
            "bogus_option")
    add("solve.mc.gamma0=0", lambda: dmft.solve(NET1, DATA, dmft.GradientDescent(0.0, 0.1, 3),
                                                method="mc"), "gamma0")
    mc_bad = {
        "samples": [0, -1, 1, 1.5, "10", True],
        "replicates": [0, -1, 1.5],
        "response_samples": [0, -2],
        "relu_eps": [0, -1.0, float("nan")],
        "sampler": ["x", 1],
        "scheme": ["x", None and 0],
        "src_rtol": [0, 2.0, -1e-6],
        "stein_rtol": [0, 1.5],
        "b_estimator": ["x"],
        "response_control": ["yes", 1],
        "max_memory_gb": [0, -1.0],
    }
    for opt, values in mc_bad.items():
        for v in values:
            if v is None:
                continue
            add(f"solve.mc(depth2).{opt}={v!r}",
                lambda o=opt, v=v: dmft.solve(NET2, DATA, TRAIN, method="mc", seed=0,
                                              samples=64 if o != "samples" else v,
                                              **({} if o == "samples" else {o: v})), opt)
    for opt, values in {"kernel_samples": [0, 1, -1], "blocks": [0, -2],
                        "samples": [0, 1]}.items():
        for v in values:
            add(f"solve.mc(depth1).{opt}={v!r}",
                lambda o=opt, v=v: dmft.solve(NET1, DATA, TRAIN, method="mc", seed=0,
                                              **({"samples": 256} if o != "samples" else {}),
                                              **{o: v}), opt)
    for opt, values in {"damping": [0, 1.5], "tol": [0, -1.0], "max_iter": [0, 2.5],
                        "anderson": [-1], "window": [0], "callback": [3]}.items():
        for v in values:
            add(f"solve.mc(iterative).{opt}={v!r}",
                lambda o=opt, v=v: dmft.solve(NET2, DATA, TRAIN, method="mc", seed=0,
                                              scheme="iterative", samples=64, **{o: v}), opt)
    add("solve.mc(onepass).tol", lambda: dmft.solve(NET2, DATA, TRAIN, method="mc", tol=1e-3),
        "tol")
    add("solve.static.quad_order=1", lambda: dmft.solve(NET1, DATA, TRAIN, method="static",
                                                        quad_order=1), "quad_order")
    add("solve.linear.tol=-1", lambda: dmft.solve(LIN2, DATA, TRAIN, method="linear",
                                                  tol=-1.0), "tol")

    # simulate ------------------------------------------------------------------------------
    for v in [0, -1, 1.5, "64", None, True]:
        add(f"simulate.width={v!r}", lambda v=v: dmft.simulate(NET1, DATA, TRAIN, width=v,
                                                               seeds=[0]), "width")
    for k, v in {"empty": [], "negative": [-1], "string": "abc", "float": [1.5],
                 "dup": [1, 1], "int": 5, "nested": [[1]], "none": None}.items():
        add(f"simulate.seeds={k}", lambda v=v: dmft.simulate(NET1, DATA, TRAIN, width=8,
                                                             seeds=v), "seeds")
    add("simulate.record_kernels=str", lambda: dmft.simulate(NET1, DATA, TRAIN, width=8,
                                                             seeds=[0], record_kernels="yes"),
        "record_kernels")
    add("simulate.seed=", lambda: dmft.simulate(NET1, DATA, TRAIN, width=8, seed=0), "seed")

    # fluctuations --------------------------------------------------------------------------
    lin1 = dmft.MLP(1, "linear")

    def sol():
        return dmft.solve(lin1, DATA, TRAIN, method="linear")
    add("fluctuations.sol=ensemble",
        lambda: dmft.fluctuations(dmft.simulate(NET1, DATA, TRAIN, width=8, seeds=[0, 1])),
        "sol")
    add("fluctuations.sol=array", lambda: dmft.fluctuations(np.zeros(3)), "sol")
    add("fluctuations.method=x", lambda: dmft.fluctuations(sol(), method="x"), "method")
    for opt, v in [("samples", 0), ("blocks", 1), ("center", "yes"), ("ntk", 2),
                   ("moments", "x"), ("kappa_samples", 0), ("chunk", -1), ("bogus", 1)]:
        add(f"fluctuations.{opt}={v!r}",
            lambda o=opt, v=v: dmft.fluctuations(sol(), method="propagator" if o not in (
                "moments",) else "lazy", **{o: v}), opt)
    add("fluctuations.seed=abc", lambda: dmft.fluctuations(sol(), seed="abc"), "seed")
    add("fluctuations.inapplicable", lambda: dmft.fluctuations(sol(), samples=100), "samples")

    # files and plotting --------------------------------------------------------------------
    add("save.result=dict", lambda: dmft.save({"a": 1}, "/tmp/never.h5"), "result")
    return c


CASES = _cases()


def test_the_table_is_large():
    assert len(CASES) >= 152      # the hostile probe had 152 inputs


@pytest.mark.parametrize("fn,match", CASES)
def test_invalid_input_raises_value_error_naming_it(fn, match):
    with pytest.raises(ValueError) as exc:
        fn()
    assert match.lower() in str(exc.value).lower(), str(exc.value)


def test_missing_file_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="x.h5"):
        dmft.load("/nonexistent/dir/x.h5")


def test_not_a_hdf5_file(tmp_path):
    p = tmp_path / "x.h5"
    p.write_text("not hdf5")
    with pytest.raises(ValueError, match="x.h5"):
        dmft.load(p)
    empty = tmp_path / "e.h5"
    import h5py
    with h5py.File(empty, "w"):
        pass
    with pytest.raises(ValueError, match="e.h5"):
        dmft.load(empty)
