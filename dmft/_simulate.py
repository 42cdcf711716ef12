"""``dmft.simulate``: finite-width networks trained in the package's convention.

Convention: docs/theory.rst §1.

An adapter: validates the options, turns the specs into arrays, trains one network per seed
with the engine :mod:`solvers.network` and collects the trajectories in an
:class:`~dmft.results.Ensemble`.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import numpy as np

from solvers import network
from solvers.objective import Objective

from . import _checkpoint
from ._method import FEATURES, Method, Options, Run, boolean, one_of, option, positive_int
from .results import Ensemble
from .specs import MLP, Dataset, GradientDescent

__all__ = ["simulate", "SimulateOptions", "SIMULATE"]


def _check_seeds(name, seeds) -> np.ndarray:
    hint = "pass e.g. seeds=range(16) or seeds=[0, 1, 2]"
    if isinstance(seeds, (str, bytes)) or isinstance(seeds, numbers.Number) or \
            (isinstance(seeds, np.ndarray) and seeds.ndim != 1):
        raise ValueError(f"seeds must be a non-empty iterable of non-negative integers "
                         f"(one network per seed); got {seeds!r}: {hint}")
    try:
        items = list(seeds)
    except TypeError:
        raise ValueError(f"seeds must be a non-empty iterable of non-negative integers "
                         f"(one network per seed); got {seeds!r}: {hint}") from None
    if not items:
        raise ValueError(f"seeds is empty; {hint}")
    for s in items:
        if not isinstance(s, numbers.Integral) or isinstance(s, (bool, np.bool_)) or s < 0:
            raise ValueError(f"seeds must hold non-negative integers, got {s!r}; {hint}")
    arr = np.array([int(s) for s in items], dtype=np.int64)
    if np.unique(arr).size != arr.size:
        raise ValueError("seeds contains duplicates, which would train identical networks; "
                         "pass distinct seeds, e.g. seeds=range(16)")
    return arr


#: the parameterisations :func:`simulate` trains (docs: :func:`simulate`)
PARAMETERIZATIONS = ("mup", "ntk")


def effective_gamma0(parameterization: str, gamma0: float, width: int) -> float:
    """The gamma0 a network is trained with: ``gamma0`` (muP, the package's convention) or
    1/sqrt(N) (the NTK parameterisation, where the given gamma0 is ignored)."""
    return 1.0 / np.sqrt(float(width)) if parameterization == "ntk" else float(gamma0)


@dataclass(frozen=True)
class SimulateOptions(Options):
    """Options of :func:`simulate`."""

    width: int = option(None, positive_int(" (the number of hidden units per layer, e.g. "
                                           "width=1024)"), "N, the hidden-layer width")
    seeds: object = option(None, _check_seeds, "one network per seed")
    record_kernels: bool = option(False, boolean(), "record the two-time kernels")
    center: bool = option(False, boolean(), "train the centred model f - f(theta_0)")
    checkpoint: object = option(
        None, _checkpoint.check_path,
        "checkpoint file, written after each seed; a rerun resumes from it")
    parameterization: str = option(
        "mup", one_of(PARAMETERIZATIONS,
                      "{name} must be 'mup' (the package's mean-field convention with the given "
                      "gamma0) or 'ntk' (the NTK parameterisation, gamma0 = 1/sqrt(N)), got "
                      "{value!r}"),
        "'mup' (gamma0 as given) or 'ntk' (gamma0 = 1/sqrt(N), train.gamma0 ignored)")


class Simulate(Method):
    """The finite-width adapter behind :func:`simulate` (no ``seed``: ``seeds``)."""

    name = "simulate"
    description = "finite-width networks trained in the package's convention, one per seed"
    Options = SimulateOptions
    label = "simulate"
    #: every loss, C outputs, weight decay (toward the initialisation or zero) and batches
    supports = frozenset(FEATURES)

    def unknown_error(self, unknown):
        extra = ""
        if "seed" in unknown:
            extra = " (simulate takes seeds=..., an iterable with one seed per network)"
        return ValueError(f"unknown option(s) {unknown} for simulate{extra}; known options: "
                          f"{', '.join(self.Options.names())}, progress, throw, memory_limit")

    def __call__(self, net, data, train, *, throw: bool = True, progress=None,
                 memory_limit=None, **options):
        opts = self.parse_options(options)
        for f in dataclasses.fields(opts)[:2]:   # width and seeds are required: None fails
            if getattr(opts, f.name) is None:
                f.metadata["check"](f.name, None)
        ctx = Run(self.label, None, progress)
        self.preflight(ctx, (net, data, train), opts, memory_limit)
        return self.finish(ctx, self.run(ctx, net, data, train, opts=opts, throw=throw), throw)

    def estimate(self, net, data, train, *, opts):
        """Result: predictions (S, T1, n), NTKs (S, T1, n, n), with ``record_kernels`` phi, g
        (S, L, T1, T1, n, n). Work: one network in flight, (L-1) N^2 + N D weights, the
        pending low-rank factors, the activations and, with ``record_kernels``, its field
        histories 2 L T1 n N and kernels (with C outputs the backward fields and G carry the
        output axis; decay toward the initialisation keeps a second copy of the weights).
        Time: 6 n N (N (L-1) (1 + C) / 2 + D) flops per step."""
        from solvers.network import FOLD_BLOCK, default_fold_every
        from ._resources import estimate, kernel_bytes
        if train.gamma0 <= 0 and opts.parameterization != "ntk":
            return None
        N, S, L, D = int(opts.width), int(opts.seeds.size), net.depth, data.D
        n, P, T1 = data.P + data.Q, data.P, train.steps + 1
        C = data.C
        rk = bool(opts.record_kernels)
        result = 8 * S * T1 * n * C * (2 + n * C) + 8 * S * n * C + \
            ((kernel_bytes(S * L, T1, n) + kernel_bytes(S * L, T1, n * C)) if rk else 0)
        r = min(N, default_fold_every(N, N, P) * P + P)
        copies = 2 if (train.weight_decay > 0 and train.decay_to == "init") else 1
        weights = 8 * (copies * ((L - 1) * N * N + N * D + N * C) + 2 * 2 * r * N * L
                       + FOLD_BLOCK * N)
        acts = 8 * 8 * L * n * C * N + (8 * L * T1 * n * (C + 1) * N + kernel_bytes(L, T1, n)
                                        + kernel_bytes(L, T1, n * C) if rk else 0)
        # the backward pass runs over n C rows (point, output)
        units = S * T1 * 6 * n * N * ((N * (L - 1) * (1 + C)) // 2 + D)
        return estimate("simulate", result, result + weights + acts, units,
                        f"{S} networks of width {N}: {(L - 1)} x N^2 weights each",
                        knobs="width / steps / points / seeds (or record_kernels=False)")

    def run(self, ctx, net: MLP, data: Dataset, train: GradientDescent, *,
            opts: SimulateOptions, throw: bool = True) -> Ensemble:
        ntk_param = opts.parameterization == "ntk"
        if train.gamma0 <= 0 and not ntk_param:
            raise ValueError(
                "gamma0 must be > 0 to simulate a network: the mean-field output scale "
                "1/(gamma0 N) is undefined at gamma0 = 0; use a small gamma0 (e.g. 1e-3) for "
                "the lazy regime, parameterization='ntk' (gamma0 = 1/sqrt(N)), or "
                "method='static' in dmft.solve for the gamma0 -> 0 limit")
        if train.loss == "barlow_twins" and opts.center and train.output_offset == "none":
            raise ValueError(
                "simulate: center=True with loss='barlow_twins' starts every network at "
                "f(0) = 0, the loss's stationary point (every gradient vanishes, and "
                "standardisation is undefined there); add an O(1) start with "
                "GradientDescent(..., output_offset='nngp'), or pass center=False")
        width, seeds = opts.width, opts.seeds
        # the NTK parameterisation is the package's convention at gamma0 = 1/sqrt(N): the
        # network is trained, and the Ensemble reports its train, with that gamma0
        gamma0 = effective_gamma0(opts.parameterization, train.gamma0, width)
        given = train
        if ntk_param:
            train = dataclasses.replace(train, gamma0=gamma0)
        record_kernels, center = opts.record_kernels, opts.center
        X = np.ascontiguousarray(data.X)
        y = np.array(data.y_train)
        P, Q, L, T = data.P, data.Q, net.depth, train.steps
        n = P + Q
        S = seeds.size
        obj = Objective.from_specs(data, train, net)
        multi = bool(data.multi_output)
        C = data.C
        oc = (C,) if multi else ()                 # the output axis (C >= 2 only)
        preds = np.empty((S, T + 1, n) + oc)
        ntk = np.empty((S, T + 1, n) + oc + (n,) + oc)
        f0 = np.empty((S, n) + oc)
        phi = np.empty((S, L, T + 1, T + 1, n, n)) if record_kernels else None
        g = np.empty((S, L, T + 1, T + 1, n) + oc + (n,) + oc) if record_kernels else None

        diverged, reasons = [], {}
        rows = {"predictions": preds, "ntk": ntk, "f0": f0, "phi": phi, "g": g}
        rows = {k: v for k, v in rows.items() if v is not None}
        ckpt, done = None, 0
        if opts.checkpoint is not None:
            ckpt = _checkpoint.Checkpoint(
                opts.checkpoint, "simulate", X=X, y=y, P=P, activation=net.activation,
                depth=L, gamma0=gamma0, lr=train.lr, steps=T, width=width, seeds=seeds,
                record_kernels=record_kernels, center=center, loss=train.loss,
                weight_decay=train.weight_decay, decay_to=train.decay_to,
                batch_size=train.batch_size, batch_seed=train.batch_seed,
                schedule=train.schedule, off_diagonal=train.off_diagonal,
                standardize=train.standardize, output_offset=train.output_offset,
                offset_scale=train.offset_scale, offset_seed=train.offset_seed,
                parameterization=opts.parameterization)
            state = ckpt.load()
            if state is not None:
                done = int(state[1]["done"])
                diverged = [int(s) for s in state[1]["diverged"]]
                reasons = dict(state[1].get("reasons", {}))
                for k, arr in rows.items():
                    arr[:done] = state[0][k]

        def saved(i):
            if ckpt is not None:
                ckpt.save({k: arr[:i + 1] for k, arr in rows.items()},
                          {"done": i + 1, "seeds": int(S), "diverged": diverged,
                           "reasons": reasons})
            bar.update(1)

        bar = ctx.bar(S, "simulate", unit="net")
        if done:
            bar.update(done)
        try:
            for i, seed in enumerate(seeds):
                if i < done:
                    continue
                rng = np.random.default_rng(int(seed))
                weights = network.Weights.draw(rng, data.D, width, L, C if multi else None)
                try:
                    res = network.train(X, y, weights, activation=net.activation,
                                        gamma0=gamma0, lr=train.lr, steps=T,
                                        record_kernels=bool(record_kernels), center=bool(center),
                                        fold_at_end=False, objective=obj)
                except FloatingPointError as exc:
                    # a NaN row; the skeleton raises (throw=True, the Ensemble on exc.result)
                    # or returns the Ensemble with status "diverged"
                    diverged.append(int(seed))
                    reasons.setdefault("first", f"; the network with seed {int(seed)} "
                                                f"diverged: {exc}")
                    for arr in (preds, ntk, f0, phi, g):
                        if arr is not None:
                            arr[i] = np.nan
                    saved(i)
                    continue
                del weights
                preds[i] = res["predictions"]
                ntk[i] = res["ntk"]
                f0[i] = res["f0"]
                if record_kernels:
                    phi[i] = res["phi"]
                    g[i] = res["g"]
                saved(i)
        finally:
            bar.close()
        if ckpt is not None:
            ckpt.remove()

        options = {"record_kernels": bool(record_kernels), "center": bool(center),
                   "init": "iid N(0,1), draw order W0, W1..W(L-1), w", "dtype": "float64",
                   "parameterization": opts.parameterization}
        if ntk_param:
            options["gamma0_given"] = float(given.gamma0)    # ignored; train.gamma0 = 1/sqrt(N)
        if ckpt is not None:
            options["resumed_units"] = int(done)      # networks read back from the checkpoint
        extras = {"f0": f0} if center else {}
        ens = Ensemble(net=net, data=data, train=train, width=int(width), seeds=seeds,
                       t=train.times, train_predictions=preds[:, :, :P].copy(),
                       test_predictions=preds[:, :, P:].copy(), ntk=ntk, phi=phi, g=g,
                       center=bool(center), options=options, extras=extras)
        if diverged:
            ens.fail("diverged", f"simulate: the networks with seeds {diverged} diverged (their "
                                 f"rows are NaN){reasons.get('first', '')}; reduce lr"
                                 f"{'' if ntk_param else ' or gamma0'}")
        return ens


SIMULATE = Simulate()


def simulate(net: MLP, data: Dataset, train: GradientDescent, *, width, seeds,
             throw: bool = True, progress=None, **options) -> Ensemble:
    """Train finite-width networks, one per seed, exactly in the convention of docs/theory.rst §1.

    Each network has all weights i.i.d. N(0, 1) drawn from ``numpy.random.default_rng(seed)``
    (order W^0, W^1 .. W^{L-1}, w; with C >= 2 outputs the readout w is drawn as
    ``rng.standard_normal((N, C))`` at the same place), mean-field output
    f_c = w_c . phi(h^L) / (gamma0 N), and is trained by gradient descent
    ``theta <- theta - lr (gamma0^2 N dLoss/dtheta + weight_decay (theta - theta_bar))`` on
    ``train.loss`` summed over the step's batch, for ``train.steps`` steps (docs/theory.rst
    §7): every matrix and the readout decay toward their initial values
    (``decay_to="init"``) or toward zero; ``batch_size`` / ``schedule`` pick the points of each
    step (:func:`solvers.objective.batch_schedule`, the same batches in every method and
    network). Test points are passive.

    ``parameterization="ntk"`` trains the same networks in the NTK parameterisation, which is
    this convention at gamma0 = 1/sqrt(N): f_c = w_c . phi(h^L) / sqrt(N) (hidden layers
    unchanged) and plain gradient descent ``theta <- theta - lr (dLoss/dtheta + weight_decay
    (theta - theta_bar))`` (lr gamma0^2 N = lr). Its initial output is O(1) (a draw that
    tends to the NNGP as N -> infinity) and its NTK hardly moves (lazy training; the kernels
    move by O(gamma0^2) = O(1/N) for a smooth activation, within the O(N^(-1/2)) bound proved
    for Barlow Twins by the seed of issue 17; tests/test_simulate_barlow.py measures it): with
    ``center=True`` and ``train.output_offset="nngp"`` the networks converge, as N -> infinity,
    to ``dmft.solve(..., method="static")`` with the same ``train``, with differences
    O(N^(-1/2)).

    Parameters
    ----------
    net, data, train : MLP, Dataset, GradientDescent
        The specification. ``train.gamma0`` must be > 0 (muP); with
        ``parameterization="ntk"`` it is ignored (any value >= 0).
    width : int
        N, the width of every hidden layer.
    seeds : iterable of int
        Distinct non-negative seeds, one network each (S = len(seeds)).
    record_kernels : bool
        Also record the two-time kernels Phi^l(t, s) and G^l(t, s) of every network
        (memory: 2 S L (T+1)^2 (P+Q)^2 floats in the result, plus 2 L (T+1) (P+Q) N while
        training one network).
    center : bool
        Train the centred model f(theta) - f(theta_0): the initial output is subtracted, so the
        recorded predictions start at 0 (the raw initial outputs go to ``extras["f0"]``,
        shape (S, P+Q)). Gradients are unchanged. With ``train.output_offset="nngp"`` the
        offset is added after centring (the predictions start at the offset); with
        ``loss="barlow_twins"`` centring needs that offset (f = 0 is the loss's stationary
        point; ValueError otherwise).
    checkpoint : str or os.PathLike
        A file (e.g. ``"simulate.ckpt.npz"``) written atomically after each seed with the
        trajectories of the networks trained so far (its size grows to that of the result).
        If it exists, the run resumes after the last finished seed and the Ensemble is
        bit-identical to an uninterrupted run; an interruption loses at most the network in
        flight. A file of another problem, other seeds or options is refused (ValueError).
        Removed when the run finishes (dmft/_checkpoint.py).
    parameterization : str
        ``"mup"`` (default): the package's mean-field convention with ``train.gamma0``.
        ``"ntk"``: the NTK parameterisation, gamma0 = 1/sqrt(N) whatever ``train.gamma0`` says.
        The returned Ensemble then describes what was trained: its ``train`` is the given one
        with ``gamma0 = 1/sqrt(N)``, ``options["parameterization"] = "ntk"`` and
        ``options["gamma0_given"]`` keeps the ignored value (both saved by :func:`dmft.save`).
        Every loss, ``center`` and ``train.output_offset`` combine with it: without either the
        loss sees the network's own O(1) output (the NTK-parameterised network as usually
        defined); ``center=True`` with ``output_offset="nngp"`` starts the centred network at
        the NNGP draw f0 shared with the infinite-width methods.
    progress : bool or None
        Progress bar over seeds (None: only on a terminal).
    throw : bool
        If True (default) a diverging network raises :class:`~dmft.results.ConvergenceError`
        (the Ensemble on ``exc.result``); if False the Ensemble is returned with
        ``converged=False``, ``status="diverged"`` and a ``message`` naming the seeds. A network
        diverges when its output or NTK overflows (its rows are NaN) or under the divergence
        rule of every method (:func:`dmft._method.check_divergence`: training loss above 1e4
        x its initial value, NTK above 1e8 x its initial scale).

    Returns
    -------
    Ensemble
        ``train_predictions`` (S, T+1, P), ``test_predictions`` (S, T+1, Q),
        ``ntk`` (S, T+1, P+Q, P+Q) (each network's own NTK), and with ``record_kernels``
        ``phi``, ``g`` (S, L, T+1, T+1, P+Q, P+Q). With C >= 2 outputs (dmft/results.py):
        ``train_predictions`` (S, T+1, P, C), ``test_predictions`` (S, T+1, Q, C), ``ntk``
        (S, T+1, n, C, n, C) = K_{mu c, nu c'}, ``g`` (S, L, T+1, T+1, n, C, n, C); ``phi``
        unchanged; with ``center`` ``extras["f0"]`` (S, n, C).

    Notes
    -----
    Cost per network: T + 1 forward and backward passes, each one BLAS product with every
    N x N matrix (O(N^2 (P+Q)) work per layer and step); the rank-P weight updates are kept as
    pending low-rank factors and folded every few steps (:mod:`solvers.network`), so a step
    reads each N x N matrix twice rather than three times. Memory: (L - 1) N^2 floats for the
    weights of the network in flight. The products are memory-bound for few points: on a
    machine shared with other jobs, ``OPENBLAS_NUM_THREADS=1`` is often faster than oversubscribed
    threads.

    Raises
    ------
    ValueError
        Bad width, seeds, gamma0 = 0 (muP), an unknown parameterization or unknown options.
    ConvergenceError
        A network diverged (non-finite output; ``throw=True``); reduce ``lr`` or ``gamma0``.
    """
    return SIMULATE(net, data, train, width=width, seeds=seeds, throw=throw,
                    progress=progress, **options)
