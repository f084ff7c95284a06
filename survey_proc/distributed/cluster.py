"""Make or attach to a Dask cluster.

``local``: a LocalCluster of worker processes, one thread each by default, so that
workers x threads never exceed the cores (torch and numpy threads are capped to match).
``--scheduler ADDR`` attaches to a cluster someone else started. (The dask-cuda path
arrives with the pipeline issue.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks / cgroups where visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def local_client(n_workers: int | None = None, *, scheduler: str | None = None,
                 threads_per_worker: int = 1, quiet: bool = False) -> Iterator[Client]:
    """A distributed Client on a new LocalCluster of processes, or on ``scheduler``.

    Parameters
    ----------
    n_workers
        Worker processes (default: one per core / threads_per_worker).
    scheduler
        Address of a running scheduler (``tcp://host:8786``); no cluster is started.
    """
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    n = n_workers or max(1, available_cores() // threads_per_worker)
    env = {"OMP_NUM_THREADS": str(threads_per_worker), "MKL_NUM_THREADS": str(threads_per_worker),
           "OPENBLAS_NUM_THREADS": str(threads_per_worker)}
    with LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True,
                      dashboard_address=":0", silence_logs=logging.ERROR, env=env) as cluster, Client(cluster) as client:
        if not quiet:
            print(f"Dask dashboard: {client.dashboard_link}  ({n} workers x {threads_per_worker} thread)")
        try:
            yield client
        finally:
            # Retire workers before the scheduler closes: otherwise a worker heartbeat can race
            # the shutdown and log a CommClosedError traceback (dask/distributed#7192).
            core_log = logging.getLogger("distributed.core")
            level = core_log.level
            core_log.setLevel(logging.WARNING)  # "connection closed" INFO lines are expected here
            try:
                with contextlib.suppress(Exception):
                    client.retire_workers(close_workers=True)
            finally:
                core_log.setLevel(level)
