"""Make or attach to a Dask cluster.

``local``: a LocalCluster of worker processes, one thread each by default, so that
workers x threads never exceed the cores (torch and numpy threads are capped to match).
``cuda``: dask-cuda's LocalCUDACluster, one worker per GPU (the ``cuda`` extra).
``--scheduler ADDR`` attaches to a cluster someone else started (SLURM, Kubernetes, ...).

Thread sizing: each worker runs ``threads_per_worker`` tasks at once, and every numeric
library inside a task (torch, OpenMP, BLAS) is capped at
``max(1, cores // (workers * threads_per_worker))`` threads, so that
workers x threads x library threads never exceed the cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

from survey_proc.errors import ConfigError


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks / cgroups where visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _quiet_core_log() -> None:
    logging.getLogger("distributed.core").setLevel(logging.WARNING)


def library_thread_env(n_workers: int, threads_per_worker: int) -> dict[str, str]:
    """Environment capping OpenMP/BLAS/torch threads so workers x threads x these <= cores."""
    k = str(max(1, available_cores() // max(1, n_workers * threads_per_worker)))
    # (Dask's own MALLOC_TRIM_THRESHOLD_=64 KiB is kept: a larger heap moves the cost of
    # fresh pages from kernel to user time -- measured no faster for these tasks.)
    return {"OMP_NUM_THREADS": k, "MKL_NUM_THREADS": k, "OPENBLAS_NUM_THREADS": k}


@contextlib.contextmanager
def cuda_client(n_workers: int | None = None, *, quiet: bool = False) -> Iterator[Client]:
    """A Client on dask-cuda's LocalCUDACluster (one worker per visible GPU)."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ConfigError("--cluster cuda needs dask-cuda, which is not installed: "
                          "pip install 'survey-proc[cuda]' (and a CUDA-capable torch), "
                          f"or use --cluster local ({exc})") from None
    kwargs = {"n_workers": n_workers} if n_workers else {}
    with LocalCUDACluster(dashboard_address=":0", silence_logs=logging.ERROR, **kwargs) as cluster, \
            Client(cluster) as client:
        if not quiet:
            print(f"Dask dashboard: {client.dashboard_link}  ({len(cluster.workers)} GPU worker(s))")
        yield client


@contextlib.contextmanager
def make_client(cluster: str, *, scheduler: str | None, workers: int | None, threads_per_worker: int = 1,
                quiet: bool = False) -> Iterator[Client]:
    """The client a run uses: attach to ``scheduler``, else start a ``local`` or ``cuda`` cluster."""
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); "
                              "check the address or start the cluster first") from None
        with client:
            if not quiet:
                n = len(client.scheduler_info().get("workers", {}))
                print(f"Attached to {scheduler} ({n} workers); dashboard: {client.dashboard_link}")
            yield client
        return
    if cluster == "cuda":
        with cuda_client(workers, quiet=quiet) as client:
            yield client
        return
    with local_client(workers, threads_per_worker=threads_per_worker, quiet=quiet, glibc_malloc=True) as client:
        yield client


# Dask spawns workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand memory back to the OS).
# Setting any MALLOC_* variable switches off glibc's dynamic mmap threshold, so each large
# temporary becomes a fresh mmap the kernel must zero. For the simulator's render tasks that
# costs 0.85 s instead of 0.60 s per dense epoch (interleaved A/B, 3 rounds: system time
# 0.31 vs 0.07 s). sep extraction showed no measurable difference, but PNet + the PSF-fit
# refinement (large numpy/torch temporaries) extracted 40 default-survey epochs in 30 s with
# glibc's defaults against 53-63 s with Dask's setting (interleaved A/B, 2 rounds, 2 workers;
# the workers spent most of their time in the kernel). So runs (make_client) and the
# simulator both start their LocalClusters with glibc's defaults (``glibc_malloc=True``).
_GLIBC_MALLOC = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


@contextlib.contextmanager
def local_client(n_workers: int | None = None, *, threads_per_worker: int = 1, quiet: bool = False,
                 glibc_malloc: bool = False) -> Iterator[Client]:
    """A distributed Client on a new LocalCluster of processes (attaching: :func:`make_client`).

    Parameters
    ----------
    n_workers
        Worker processes (default: one per core / threads_per_worker).
    glibc_malloc
        Start workers with glibc's malloc defaults instead of Dask's trim threshold (see above).
    """
    n = n_workers or max(1, available_cores() // threads_per_worker)
    env = library_thread_env(n, threads_per_worker)
    core_log = logging.getLogger("distributed.core")
    with contextlib.ExitStack() as stack:
        # glibc and OpenMP read these when a process starts, so they must be in the environment
        # the worker is spawned with (Dask's pre-spawn-environ), not set after (``env=``).
        pre_spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in env.items()}
        stack.enter_context(dask.config.set({**pre_spawn, **(_GLIBC_MALLOC if glibc_malloc else {})}))
        if glibc_malloc and os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536":
            # left in this process's environment by an earlier cluster (Dask sets it pre-spawn)
            stack.callback(os.environ.__setitem__, "MALLOC_TRIM_THRESHOLD_", "65536")
            del os.environ["MALLOC_TRIM_THRESHOLD_"]
        cluster = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True,
                                                   dashboard_address=":0", silence_logs=logging.ERROR, env=env))
        client = stack.enter_context(Client(cluster))
        # The teardown logs "connection closed" INFO lines from the event loop thread, some
        # after the cluster has closed; they are expected, so distributed.core stays at
        # WARNING from the teardown on (it is not restored).
        stack.callback(core_log.setLevel, logging.WARNING)
        # the workers log "connection closed" at INFO when the scheduler goes: expected
        client.run(_quiet_core_log)
        if not quiet:
            print(f"Dask dashboard: {client.dashboard_link}  ({n} workers x {threads_per_worker} thread, "
                  f"{env['OMP_NUM_THREADS']} library thread(s) each)")
        def retire() -> None:
            # Retire workers before the scheduler closes: otherwise a worker heartbeat can race
            # the shutdown and log a CommClosedError traceback (dask/distributed#7192).
            core_log.setLevel(logging.WARNING)
            with contextlib.suppress(Exception):
                client.retire_workers(close_workers=True)

        try:
            yield client
        except KeyboardInterrupt:
            # Ctrl-C reached the workers too (one process group): a graceful retire would wait
            # on dying workers without a timeout (a CLI once did not exit within 120 s in CI);
            # closing the cluster ends them.
            core_log.setLevel(logging.WARNING)
            raise
        except BaseException:
            retire()
            raise
        else:
            retire()
