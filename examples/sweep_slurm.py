"""Run a dmft sweep on a Slurm cluster through dask-jobqueue.

    pip install -e ".[sweeps]" dask-jobqueue
    python examples/sweep_slurm.py examples/sweeps/sweep_gamma0_depth.toml -o gamma0_depth.h5 \
        --jobs 8 --partition short --walltime 02:00:00

This process is the driver: it starts a dask scheduler, submits ``--jobs`` Slurm jobs that
each run one dask worker (one core, one thread: the points are single-threaded), hands the
points to them and writes every file itself (so the workers need dmft installed, but no shared
file system for the results; data files named in the configuration must exist at the same
paths on the nodes). With ``--shared-fs`` (the output folder is on a file system the nodes
share) the workers write the per-point result files themselves (``worker_writes=True``). Run it on a login node or inside a small job. If it dies, run the same
command again: the points already saved in ``OUT.points/`` are reused.
"""
import argparse
import sys

import dmft


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="TOML sweep file (a run configuration plus [sweep])")
    p.add_argument("-o", "--output", required=True, help="sweep file to write")
    p.add_argument("--jobs", type=int, default=4, help="Slurm jobs = dask workers")
    p.add_argument("--partition", default=None, help="Slurm partition (queue)")
    p.add_argument("--account", default=None, help="Slurm account")
    p.add_argument("--walltime", default="01:00:00", help="time limit per worker job")
    p.add_argument("--memory", default="4GB", help="memory per worker job (the worker's limit)")
    p.add_argument("--shared-fs", action="store_true",
                   help="the nodes see the output folder: workers write the result files")
    args = p.parse_args(argv)

    from dask_jobqueue import SLURMCluster   # optional: pip install dask-jobqueue
    from distributed import Client

    cluster = SLURMCluster(
        queue=args.partition, account=args.account, walltime=args.walltime,
        cores=1, processes=1, memory=args.memory,
        # one thread per numerical library, as in dmft's own LocalCluster
        job_script_prologue=["export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "
                             "MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1"],
    )
    cluster.scale(jobs=args.jobs)   # or cluster.adapt(minimum_jobs=1, maximum_jobs=args.jobs)
    print(cluster.job_script())
    try:
        with Client(cluster) as client:
            ds = dmft.sweep(args.config, out=args.output, client=client, log=print,
                            worker_writes=args.shared_fs)
    finally:
        cluster.close()
    print(f"{ds.attrs['points']} points ({ds.attrs['computed']} computed, "
          f"{ds.attrs['reused']} reused, {ds.attrs['failed']} failed) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
