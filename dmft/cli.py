"""The ``dmft`` command line: ``demo``, ``run``, ``sweep``, ``plot``, ``methods``.

``main(argv=None)`` returns the exit code: 0 on success, 2 for bad input (a one-line message
on standard error, no traceback), 1 when a solver failed (:class:`~dmft.results.ConvergenceError`),
130 when interrupted (Ctrl-C, or SIGTERM, which the command turns into an interrupt). Bad input
includes every output path (``-o``, ``--plot``, the demo's folder), checked before any work, and
a problem whose estimated memory exceeds what is available (refused before any allocation).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ._version import __version__

__all__ = ["main", "demo"]

#: the built-in demo task (``dmft demo``); ``--quick`` shrinks the sample counts only
DEMO = {"P": 8, "Q": 8, "D": 10, "data_seed": 0, "depth": 1, "activation": "tanh",
        "gamma0": 1.0, "lr": 0.1, "steps": 50, "widths": (128, 1024), "seeds": 16,
        "samples": 20000, "solve_seed": 0}
DEMO_QUICK = dict(DEMO, seeds=8, samples=4000)


def _say(msg):
    print(msg, flush=True)


def demo(outdir=".", *, quick=False, progress=None, log=_say) -> dict:
    """Run the built-in demo; returns {name: path} of the files written.

    Task: P = 8 train and Q = 8 test points in D = 10 from a random two-layer tanh teacher
    (:func:`dmft.config.teacher_student`), a two-layer tanh network (L = 1) at gamma0 = 1,
    lr = 0.1, 50 steps. Computes the static-NTK solution, the DMFT (method "mc", when this
    installation has it) and simulated networks of widths 128 and 1024.

    Files: ``demo.h5`` (the DMFT Solution; the static one if "mc" is unavailable),
    ``demo_static.h5``, ``demo_width{N}.h5`` (Ensembles), ``demo.png`` (the comparison figure).
    """
    import dmft
    from .config import teacher_student
    from .plotting import compare

    cfg = DEMO_QUICK if quick else DEMO
    os.makedirs(outdir, exist_ok=True)
    data = teacher_student(cfg["P"], cfg["Q"], cfg["D"], cfg["data_seed"])
    net = dmft.MLP(depth=cfg["depth"], activation=cfg["activation"])
    train = dmft.GradientDescent(gamma0=cfg["gamma0"], lr=cfg["lr"], steps=cfg["steps"])
    log(f"dmft demo: two-layer {cfg['activation']} network, P={data.P} train / Q={data.Q} test "
        f"points in D={data.D} (teacher-student), gamma0={train.gamma0:g}, lr={train.lr:g}, "
        f"{train.steps} steps")
    files, curves = {}, {}

    start = time.perf_counter()
    static = dmft.solve(net, data, train, method="static")
    curves["static NTK"] = static
    files["static"] = os.path.join(outdir, "demo_static.h5")
    static.save(files["static"])
    log(f"  static NTK        {time.perf_counter() - start:6.2f} s  final train loss "
        f"{static.train_loss[-1]:.4g}, test loss {static.test_loss[-1]:.4g}")

    start = time.perf_counter()
    sol = dmft.solve(net, data, train, method="mc", samples=cfg["samples"],
                     seed=cfg["solve_seed"], progress=progress)
    curves["DMFT (mc)"] = sol
    log(f"  DMFT (mc)         {time.perf_counter() - start:6.2f} s  final train loss "
        f"{sol.train_loss[-1]:.4g}, test loss {sol.test_loss[-1]:.4g}  "
        f"({cfg['samples']} samples, converged={sol.converged})")
    files["solution"] = os.path.join(outdir, "demo.h5")
    sol.save(files["solution"])

    for width in cfg["widths"]:
        start = time.perf_counter()
        ens = dmft.simulate(net, data, train, width=width, seeds=range(cfg["seeds"]),
                            progress=progress)
        curves[f"width {width}"] = ens
        files[f"width{width}"] = os.path.join(outdir, f"demo_width{width}.h5")
        ens.save(files[f"width{width}"])
        log(f"  width {width:<5d} x {cfg['seeds']:2d}  {time.perf_counter() - start:6.2f} s  final "
            f"train loss {ens.train_loss[:, -1].mean():.4g}, test loss "
            f"{ens.test_loss[:, -1].mean():.4g} (seed mean)")

    files["figure"] = os.path.join(outdir, "demo.png")
    compare(curves, files["figure"],
            title=f"two-layer tanh, gamma0={train.gamma0:g}: static NTK vs DMFT vs networks")
    log("wrote:")
    for key, path in files.items():
        log(f"  {path}")
    return files


# ------------------------------------------------------------------------------------------
def _check_output_file(path, what):
    """Refuse (ValueError) an output file that cannot be written, before any work: a
    directory, a missing or unwritable folder, an existing unwritable file."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory; give a file name (e.g. "
                         f"{os.path.join(path, 'out.h5' if what == 'output' else 'fig.png')})")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"the folder of {what} {path} ({directory}) does not exist; create it "
                         f"first")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {path}: the folder {directory} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write {what} {path}: the file exists and is not writable")


def _check_figure(path):
    """A figure path: writable (:func:`_check_output_file`) with a format matplotlib draws."""
    _check_output_file(path, "figure")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp",
               "pgf", "raw", "rgba")
    if ext not in formats:
        raise ValueError(f"figure {path}: unknown image format {ext or '(no extension)'!r}; "
                         f"use a name ending in .png, .pdf or .svg")


def _check_outdir(outdir):
    """The demo's output folder: an existing writable folder, or one that can be created."""
    if os.path.exists(outdir):
        if not os.path.isdir(outdir):
            raise ValueError(f"output directory {outdir} exists and is not a directory")
        if not os.access(outdir, os.W_OK | os.X_OK):
            raise ValueError(f"output directory {outdir} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(outdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create output directory {outdir}: {parent} is not a "
                         f"writable folder")


def _cmd_demo(args):
    _check_outdir(args.outdir)
    demo(args.outdir, quick=args.quick, progress=args.progress)
    return 0


def _cmd_run(args):
    import dmft
    from .config import load_config, run
    out = args.output or os.path.splitext(os.path.basename(args.config))[0] + ".h5"
    # every output path is checked before the configuration is even read
    _check_output_file(out, "output")
    if args.plot:
        _check_figure(args.plot)
        if os.path.abspath(args.plot) == os.path.abspath(out):
            raise ValueError(f"--plot {args.plot} is the result file itself; give another name")
    cfg = load_config(args.config)
    start = time.perf_counter()
    result = run(cfg, progress=args.progress)
    dmft.save(result, out)
    what = f"method={cfg.options['method']}" if cfg.task == "solve" else \
        f"width={cfg.options['width']}, {len(cfg.options['seeds'])} seeds"
    print(f"{type(result).__name__} ({cfg.task}, {what}) in {time.perf_counter() - start:.2f} s"
          f" -> {out}")
    if args.plot:
        dmft.plot(result, args.plot)
        print(f"figure -> {args.plot}")
    return 0


# --- dmft sweep (dmft/sweep.py) ------------------------------------------------------------
def _cmd_sweep(args):
    from .sweep import sweep
    out = args.output or os.path.splitext(os.path.basename(args.config))[0] + ".h5"
    _check_output_file(out, "output")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1 (processes of the local cluster), got "
                         f"{args.workers}")
    try:
        ds = sweep(args.config, out=out, scheduler=args.scheduler, workers=args.workers,
                   serial=args.serial, progress=args.progress,
                   retry_failed=args.retry_failed, keep_arrays=args.keep_arrays, log=_say)
    except ImportError as exc:   # no dask: a one-line message naming the extra (exit 2)
        raise ValueError(str(exc)) from None
    if ds.attrs["failed"]:
        print(f"{ds.attrs['failed']} of {ds.attrs['points']} points failed (see the status "
              f"and message variables of {out})", file=sys.stderr)
    return 0


def _cmd_plot(args):
    from .plotting import plot
    if args.points < 1:
        raise ValueError(f"--points must be >= 1 (train and test points to draw), got "
                         f"{args.points}")
    out = args.output or os.path.splitext(args.result)[0] + ".png"
    _check_figure(out)
    plot(args.result, out, points=args.points)
    print(f"figure -> {out}")
    return 0


def _cmd_methods(args):
    from .api import METHODS
    for name in METHODS:
        print(f"{name:14s}{METHODS[name].description}")
    return 0


def _parser():
    p = argparse.ArgumentParser(
        prog="dmft",
        description="Dynamical mean field theory of wide neural networks: infinite-width "
                    "feature-learning dynamics, finite-width fluctuations and simulated "
                    "networks in one convention.",
        epilog="Exit codes: 0 success, 1 a solver failed to converge, 2 bad input (also: "
               "output paths that cannot be written, problems too large for the memory), "
               "130 interrupted (Ctrl-C or SIGTERM). "
               "See `dmft COMMAND --help`.")
    p.add_argument("--version", action="version", version=f"dmft {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def file_command(name, help, source, source_help, output_help, description):
        """A command reading one file (the positional ``source``) into ``-o OUTPUT``."""
        sp = sub.add_parser(name, help=help, description=description)
        sp.add_argument(source, help=source_help)
        sp.add_argument("-o", "--output", help=output_help)
        return sp

    def progress_flags(sp):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--progress", dest="progress", action="store_const", const=True,
                       default=None, help="always show progress bars (default: on a terminal)")
        g.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                       help="never show progress bars")
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="log one line per solver iteration")

    d = sub.add_parser("demo", help="run the built-in demo (DMFT vs static NTK vs networks), "
                                    "write HDF5 files and a PNG figure",
                       description=demo.__doc__.split("\n\n")[0])
    d.add_argument("-o", "--outdir", default=".", help="output directory (default: .)")
    d.add_argument("--quick", action="store_true", help="fewer samples and seeds (seconds)")
    progress_flags(d)
    d.set_defaults(func=_cmd_demo)

    r = file_command(
        "run", "run a configured solve or simulation (TOML) into an HDF5 file",
        "config", "TOML configuration file", "result file (default: CONFIG's name with .h5)",
        "Run CONFIG.toml (see examples/ and dmft.config) and save the result. "
        "[train] takes gamma0, lr, steps and (docs/theory.rst §7) loss = mse | "
        "cross_entropy | logistic | hinge, weight_decay, decay_to = init | zero, "
        "batch_size (omit: full batch), batch_seed, schedule = epochs | online. "
        "[data] takes a generator (P, Q, D, seed, outputs = C, classes = C, "
        "labels = true for +-1 labels) or files X_train, y_train ((P,) or (P, C)), "
        "X_test, y_test, with labels = true (and classes = C) when the y files "
        "hold integer class labels. The file records the losses (and accuracies "
        "for classification) per split.")
    r.add_argument("--plot", metavar="FIG", help="also draw the result into FIG (e.g. fig.png)")
    progress_flags(r)
    r.set_defaults(func=_cmd_run)

    w = file_command(
        "sweep", "run a grid of solves / simulations (TOML with a [sweep] table) on "
                 "dask into one netCDF-compatible HDF5 file",
        "config", "TOML sweep file", "sweep file (default: CONFIG's name with .h5)",
        "Run SWEEP.toml: the sections of `dmft run` plus a [sweep] table of "
        "'section.key' = [values] axes (product), [[sweep.zip]] groups (keys "
        "varying together) and [[sweep.variant]] tables (docs/sweeps.rst). Points "
        "run on an embedded dask LocalCluster (one process per core) unless "
        "--scheduler or --serial; each finished point is saved at once into "
        "OUTPUT.points/, and rerunning the command computes only the missing "
        "points. Failed points are recorded (status, message), not fatal.")
    w.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running dask scheduler (e.g. tcp://host:8786)")
    w.add_argument("--workers", type=int, metavar="N",
                   help="processes of the embedded LocalCluster (default: the cores)")
    w.add_argument("--serial", action="store_true",
                   help="run the points one by one in this process, without dask")
    w.add_argument("--retry-failed", action="store_true",
                   help="recompute points an earlier run recorded as failed")
    w.add_argument("--keep-arrays", action="store_true",
                   help="also store the equal-time NTK per point in the sweep file")
    progress_flags(w)
    w.set_defaults(func=_cmd_sweep)

    q = file_command("plot", "draw a saved result (Solution, Ensemble or Fluctuations)",
                     "result", "HDF5 file written by dmft",
                     "figure file (default: RESULT's name with .png)",
                     "Draw a saved result: the loss named by train.loss per split, predictions "
                     "(with C outputs one line per point and output, at most --points points "
                     "and 3 outputs), the NTK, and the accuracy per split for classification.")
    q.add_argument("--points", type=int, default=4,
                   help="how many train/test points to draw (default 4)")
    q.set_defaults(func=_cmd_plot, verbose=False)

    m = sub.add_parser("methods", help="list the solve methods")
    m.set_defaults(func=_cmd_methods, verbose=False)
    return p


def main(argv=None) -> int:
    """Entry point of the ``dmft`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .results import ConvergenceError
    if args.verbose:
        from ._progress import enable_logging
        enable_logging()
    previous = _install_sigterm()
    try:
        return args.func(args)
    except ConvergenceError as exc:
        print(f"dmft {args.command}: solver failed: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError, NotImplementedError) as exc:
        msg = str(exc).replace("\n", " ")
        print(f"dmft {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"dmft {args.command}: error: out of memory ({exc or 'MemoryError'}); reduce "
              f"steps / points / depth / samples", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dmft {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _restore_sigterm(previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


_raise_interrupt._dmft_interrupt = True   # dmft.io defers it during a save, like Ctrl-C


def _install_sigterm():
    """SIGTERM -> KeyboardInterrupt while a command runs (exit code 130, like Ctrl-C).

    Only in the main thread (signal handlers cannot be set elsewhere); returns the previous
    handler (None when nothing was installed)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None
    if hasattr(signal, "SIGXFSZ"):
        # a file-size limit makes writes fail (EFBIG, one clear error from dmft.save)
        # instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _restore_sigterm(previous):
    import signal
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
