"""A dask-jobqueue SLURMCluster of dask-cuda GPU workers for ``survey-proc run --scheduler``.

    python deployments/slurm/cluster.py --jobs 4 --gpus-per-job 1 --walltime 04:00:00 \\
        --partition gpu --account myproj --scheduler-file ~/survey-proc-scheduler.json

starts the scheduler here (the login or head node), submits the worker jobs, writes the
scheduler file and waits; ``survey-proc run STORE --out OUT --scheduler $(address from the
file)`` then runs on the workers. See README.md.

Worker lifetimes follow the walltime: each worker retires ``lifetime_margin_min`` minutes
before its job is killed (staggered), so Dask moves its work elsewhere instead of losing it
mid-task. dask-cuda's worker CLI has no ``--lifetime`` option, so the lifetime is set through
Dask's configuration (``DASK_DISTRIBUTED__WORKER__LIFETIME__*``) in the job prologue.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def walltime_minutes(walltime: str) -> int:
    """Minutes in a SLURM walltime ``[D-]HH:MM:SS``."""
    days = 0
    if "-" in walltime:
        d, walltime = walltime.split("-", 1)
        days = int(d)
    parts = [int(p) for p in walltime.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return days * 1440 + h * 60 + m + (1 if s else 0)


def slurm_gpu_cluster(*, gpus_per_job: int = 1, cores_per_gpu: int = 8, memory_per_gpu_gb: int = 64,
                      walltime: str = "04:00:00", partition: str | None = None, account: str | None = None,
                      lifetime_margin_min: int = 10, python: str = "python", env_setup: list[str] | None = None,
                      **kwargs: Any):
    """A ``dask_jobqueue.SLURMCluster`` whose jobs each start one dask-cuda worker per GPU.

    Parameters
    ----------
    gpus_per_job
        GPUs per SLURM job (``--gres=gpu:N``); dask-cuda starts one worker process per GPU.
    cores_per_gpu, memory_per_gpu_gb
        CPU cores and host memory (GB) booked per GPU.
    walltime
        SLURM walltime; worker lifetimes end ``lifetime_margin_min`` minutes before it.
    partition, account
        SLURM partition (``queue``) and account.
    python
        The Python of the environment where survey-proc and dask-cuda are installed.
    env_setup
        Shell lines run first in each job (``module load cuda``, ``conda activate ...``).
    """
    from dask_jobqueue import SLURMCluster

    life = max(5, walltime_minutes(walltime) - lifetime_margin_min)
    prologue = list(env_setup or []) + [
        f"export DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION={life}m",
        "export DASK_DISTRIBUTED__WORKER__LIFETIME__STAGGER=4m",
        "export DASK_DISTRIBUTED__WORKER__LIFETIME__RESTART=false",
    ]
    return SLURMCluster(
        cores=cores_per_gpu * gpus_per_job, processes=1, memory=f"{memory_per_gpu_gb * gpus_per_job}GB",
        walltime=walltime, queue=partition, account=account, python=python,
        job_extra_directives=[f"--gres=gpu:{gpus_per_job}"], job_script_prologue=prologue,
        worker_command="dask_cuda.cli", **kwargs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--gpus-per-job", type=int, default=1)
    ap.add_argument("--walltime", default="04:00:00")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--python", default="python")
    ap.add_argument("--scheduler-file", default=str(Path.home() / "survey-proc-scheduler.json"))
    ap.add_argument("--print-job-script", action="store_true", help="print the job script and exit")
    args = ap.parse_args(argv)
    cluster = slurm_gpu_cluster(gpus_per_job=args.gpus_per_job, walltime=args.walltime, partition=args.partition,
                                account=args.account, python=args.python)
    if args.print_job_script:
        print(cluster.job_script())
        cluster.close()
        return
    cluster.scale(jobs=args.jobs)
    Path(args.scheduler_file).write_text(json.dumps({"address": cluster.scheduler_address}))
    print(f"scheduler {cluster.scheduler_address} (written to {args.scheduler_file}); dashboard "
          f"{cluster.dashboard_link}; Ctrl-C stops the workers")
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
