"""Up-front resource estimates (issue 20): memory checked before work.

What these tests prove
- The oversized problems of the issue (linear and mc at depth 3, P = 200, 500 steps; mc at
  depth 3, P = 60, 150 steps on a 24 GB machine; depth = 10**6; steps = 10**12) are refused
  with a ValueError naming the GiB they need, in well under a second (no allocation, no
  overflow: the estimates are Python integers).
- ``memory_limit=`` works both ways: a small problem is refused below its estimate and runs by
  default; a limit above the estimate passes the check; bad values are refused. Every method
  (solve, simulate, fluctuations) takes it; the mc option ``max_memory_gb`` keeps its meaning.
- Every adapter has an estimate, logged at INFO level.
- The estimate is within a factor 2.5 of the measured peak memory (RSS high-water mark in a
  fresh process) for ordinary problems of the deterministic methods and simulate.
"""
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import dmft
from dmft import api
from dmft._fluctuations import FLUCTUATION_METHODS
from dmft._method import Run
from dmft._resources import check, estimate, limit_bytes
from dmft._simulate import SIMULATE
from dmft._two_layer import TWO_LAYER_MARCH
from dmft.config import teacher_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(depth, P, Q, steps, activation="tanh", gamma0=0.5, lr=0.05):
    return (dmft.MLP(depth, activation), teacher_student(P, Q, 10, 0),
            dmft.GradientDescent(gamma0, lr, steps))


#: (method, depth, P, Q, steps, activation, options): the issue's oversized problems
OVERSIZED = [
    ("linear", 3, 200, 20, 500, "linear", {"memory_limit": 24}),
    ("linear", 3, 200, 0, 500, "linear", {"memory_limit": 24}),
    ("mc", 3, 200, 20, 500, "tanh", {"memory_limit": 24}),
    ("mc", 3, 60, 0, 150, "tanh", {"memory_limit": 24}),
    ("mc", 3, 60, 0, 150, "relu", {"memory_limit": 24}),
    ("gia", 3, 60, 0, 150, "tanh", {"memory_limit": 24}),
    ("static", 10 ** 6, 4, 4, 10, "tanh", {}),
    ("mc", 10 ** 6, 4, 4, 10, "tanh", {}),
    ("linear", 10 ** 6, 4, 4, 10, "linear", {}),
    ("perturbative", 10 ** 6, 4, 4, 10, "tanh", {}),
    ("static", 2, 4, 4, 10 ** 12, "tanh", {}),
    ("mc", 1, 4, 4, 10 ** 12, "tanh", {}),
    ("mc", 2, 4, 4, 10 ** 12, "tanh", {}),
    ("mc", 2, 4, 4, 10 ** 12, "tanh", {"scheme": "iterative"}),
    ("linear", 2, 4, 4, 10 ** 12, "linear", {}),
    ("perturbative", 2, 4, 4, 10 ** 12, "linear", {}),
]


@pytest.mark.parametrize("method,depth,P,Q,steps,activation,options", OVERSIZED)
def test_oversized_refused_fast(method, depth, P, Q, steps, activation, options):
    net, data, train = _problem(depth, P, Q, steps, activation)
    api.METHODS[method]                      # import the adapter outside the timing
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"needs ~[0-9.e+]+ GiB \(result arrays .* GiB, work "
                                         r".* GiB\) but .* GiB are available") as exc:
        dmft.solve(net, data, train, method=method, seed=0, **options)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    msg = str(exc.value)
    assert f"method={method!r}" in msg and "memory_limit=" in msg and "reduce" in msg


def test_issue_sizes_need_what_they_need():
    """The GiB of the issue: linear's one (n T1)^2 kernel at P = 200, T = 500 is 74.8 GiB;
    mc's outputs at depth 3, P = 60, 150 steps alone are ~10.5 GB (9.8 GiB)."""
    net, data, train = _problem(3, 200, 0, 500, "linear")
    est = api.METHODS["linear"].estimate(net, data, train,
                                         opts=api.METHODS["linear"].parse_options({}))
    K1 = 8 * (501 * 200) ** 2
    assert K1 / 2 ** 30 == pytest.approx(74.8, abs=0.05)
    assert est["result_bytes"] >= 10 * K1 and est["bytes"] > est["result_bytes"]
    net, data, train = _problem(3, 60, 0, 150)
    est = api.METHODS["mc"].estimate(net, data, train, opts=api.METHODS["mc"].parse_options({}))
    assert est["result_bytes"] / 1e9 == pytest.approx(10.5, rel=0.02)
    assert est["bytes"] > 24e9                          # refused on a 24 GB machine


def test_huge_width_simulate_refused_fast():
    net, data, train = _problem(3, 4, 4, 10)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="simulate needs ~.* GiB"):
        dmft.simulate(net, data, train, width=10 ** 6, seeds=range(2))
    assert time.perf_counter() - start < 1.0


def test_memory_limit_both_ways(caplog):
    net, data, train = _problem(2, 4, 2, 5)
    with pytest.raises(ValueError, match=r"method='static' needs ~.* GiB .* \(memory_limit\); "
                                         r"reduce steps / points / depth"):
        dmft.solve(net, data, train, method="static", memory_limit=1e-6)
    with caplog.at_level(logging.INFO, logger="dmft"):
        sol = dmft.solve(net, data, train, method="static")
    assert sol.converged
    assert any("method='static': estimated ~" in r.getMessage() for r in caplog.records)
    # a limit above the estimate passes the check of a problem the default would refuse
    big = _problem(3, 60, 0, 150)
    adapter = api.METHODS["mc"]
    opts = adapter.parse_options({})
    ctx = Run(adapter.label)
    est = adapter.preflight(ctx, big, opts, memory_limit=1e6)
    assert est["bytes"] > 24e9 and ctx.memory_limit == 1e15
    with pytest.raises(ValueError, match="needs ~"):
        adapter.preflight(ctx, big, opts, memory_limit=1.0)
    for bad in (0, -1, float("nan"), float("inf"), "8", True):
        with pytest.raises(ValueError, match="memory_limit must be a number of GB > 0"):
            dmft.solve(net, data, train, method="static", memory_limit=bad)


def test_memory_limit_everywhere():
    net, data, train = _problem(1, 4, 2, 5)
    with pytest.raises(ValueError, match="simulate needs ~"):
        dmft.simulate(net, data, train, width=64, seeds=range(2), memory_limit=1e-6)
    ens = dmft.simulate(net, data, train, width=64, seeds=range(2), memory_limit=10)
    assert ens.converged
    lnet = dmft.MLP(1, "linear")
    sol = dmft.solve(lnet, data, train, method="linear")
    with pytest.raises(ValueError, match=r"fluctuations \(linear-exact\) needs ~"):
        dmft.fluctuations(sol, memory_limit=1e-9)
    assert dmft.fluctuations(sol, memory_limit=10).converged
    # max_memory_gb keeps its documented meaning: the one-pass solver's limit per replicate
    dnet, ddata, dtrain = _problem(2, 3, 1, 4)
    with pytest.raises(ValueError, match="GiB per replicate"):
        dmft.solve(dnet, ddata, dtrain, method="mc", samples=64, max_memory_gb=1e-6)


def test_every_adapter_estimates():
    net, data, train = _problem(2, 4, 2, 5)
    lin = dmft.MLP(2, "linear")
    for name, adapter in api.METHODS.items():
        n = lin if name == "linear" else net
        est = adapter.estimate(n, data, train, opts=adapter.parse_options({}))
        assert est["bytes"] >= est["result_bytes"] > 0 and est["seconds"] > 0, name
    est = SIMULATE.estimate(net, data, train, opts=SIMULATE.parse_options(
        {"width": 32, "seeds": range(2)}))
    assert est["bytes"] > 8 * 32 * 32
    one = dmft.MLP(1, "tanh")
    est = TWO_LAYER_MARCH.estimate(one, data, train, opts=TWO_LAYER_MARCH.parse_options({}))
    assert est["bytes"] > 0
    sol = dmft.solve(lin, data, train, method="linear")
    for name, adapter in FLUCTUATION_METHODS.items():
        if name == "auto":
            continue
        est = adapter.estimate(sol, opts=adapter.parse_options({}))
        assert est["bytes"] >= est["result_bytes"] > 0, name


def test_check_and_limit_helpers():
    est = estimate("static", 3 * 2 ** 30, 5 * 2 ** 30, 1e9, "x")
    assert est["work_bytes"] == 2 * 2 ** 30 and est["seconds"] > 0
    check("m", est, 6 * 2 ** 30)
    with pytest.raises(ValueError, match=r"m needs ~5 GiB \(result arrays 3 GiB, work 2 GiB\) "
                                         r"but 4 GiB are available"):
        check("m", est, 4 * 2 ** 30)
    assert limit_bytes(2) == 2e9 and 0 < limit_bytes(None) < float("inf")
    # Python integers: no overflow at absurd sizes
    est = estimate("linear", 8 * (10 ** 12 * 8) ** 2, None, float(10 ** 40))
    assert est["bytes"] == 8 * (10 ** 12 * 8) ** 2 and np.isfinite(est["seconds"])


_PEAK = r"""
import json, resource, sys
import dmft
from dmft import api
from dmft._simulate import SIMULATE
from dmft.config import teacher_student
case = sys.argv[1]
def statm():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096
if case == "static":
    net, P, Q, T, kw, ad = dmft.MLP(2, "tanh"), 12, 12, 80, {}, api.METHODS["static"]
elif case == "linear":
    net, P, Q, T, kw, ad = dmft.MLP(2, "linear"), 12, 6, 40, {}, api.METHODS["linear"]
else:
    net, P, Q, T, ad = dmft.MLP(3, "tanh"), 8, 8, 10, SIMULATE
    kw = {"width": 2048, "seeds": range(2)}
data = teacher_student(P, Q, 10, 0)
train = dmft.GradientDescent(0.5, 0.05, T)
est = ad.estimate(net, data, train, opts=ad.parse_options(kw))
if case == "simulate":
    call = lambda: dmft.simulate(net, data, train, **kw)
else:
    call = lambda: dmft.solve(net, data, train, method=case)
def hwm():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
base = statm()
# reset the peak-RSS mark so that imports and compilation before the call do not count
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
call()
peak = hwm() - base
print(json.dumps({"est": est["bytes"], "peak": peak}))
"""


@pytest.mark.parametrize("case", ["static", "linear", "simulate"])
def test_estimate_close_to_measured_peak(case):
    proc = subprocess.run([sys.executable, "-c", _PEAK, case], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["peak"] > 10e6, out                  # large enough to measure
    assert 1 / 2.5 < out["est"] / out["peak"] < 2.5, out
