"""The models each worker holds: loaded once per worker process, onto the worker's device.

:class:`ModelPlugin` is a Dask ``WorkerPlugin``: ``client.register_plugin`` runs its
``setup`` once on every worker, now and on workers that join later, and the weights of the
model kinds a run needs (:data:`survey_proc.model_registry.KINDS`) stay in that worker's
memory for every task it runs. Loading follows :func:`survey_proc.model_registry.load`:
an explicit device, else the worker's GPU when it has one (on a dask-cuda worker
``CUDA_VISIBLE_DEVICES`` puts it first), else the CPU, with torch's threads set to the
worker's thread count.

Tasks get a model with :func:`worker_model`; outside a worker (a test, a notebook calling
the task function directly) it loads the weights once per process instead.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin

from survey_proc import model_registry
from survey_proc.model_registry import KINDS

PLUGIN_NAME = "survey-proc-models"
LOADS = dict.fromkeys(KINDS, 0)  # how many times this process loaded weights, per kind (tests count them)


def _cpu_settings() -> None:
    import torch

    # (denormals are flushed per task, not here: see survey_proc.stages.base.worker_task)
    try:
        from distributed import get_worker

        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except ValueError:  # not in a worker
        pass


def _load(kind: str, path: str | None, device: str | None) -> Any:
    """Load ``kind`` from ``path`` (None: shipped) onto ``device``; CPU threads set, counted in LOADS."""
    model = model_registry.load(kind, path or None, device=device)
    if model.device.type == "cpu":
        _cpu_settings()
    LOADS[kind] += 1
    return model


def _same_file(model: Any, kind: str, path: str | Path | None) -> bool:
    """Whether ``model`` was loaded from ``path`` (None or "": the shipped weights of ``kind``)."""
    return model.path == str(Path(path) if path else model_registry.default_weights(kind))


class ModelPlugin(WorkerPlugin):
    """Loads the models a run needs on each worker, once.

    Parameters
    ----------
    models
        Model kind (``"detector"``, ``"bpnn"``, ``"classifier"``) -> weights file, None or ""
        for the shipped ``survey_proc/models/<kind>.pt``. Only the kinds listed are loaded.
    device
        Torch device; None picks the worker's GPU if it has one, else the CPU.
    """

    name = PLUGIN_NAME

    def __init__(self, models: dict[str, str | None], device: str | None = None):
        for kind in models:
            model_registry.default_weights(kind)  # an unknown kind fails here, on the client
        self.paths: dict[str, str | None] = {k: str(p) if p else None for k, p in models.items()}
        self.device = device
        self.models: dict[str, Any] = {}

    def setup(self, worker: Any) -> None:
        """Load the run's models onto this worker's device (once per worker)."""
        self.models = {kind: _load(kind, path, self.device) for kind, path in self.paths.items()}

    def teardown(self, worker: Any) -> None:
        """Drop the models (the worker is closing)."""
        self.models = {}


@functools.lru_cache(maxsize=6)
def _local(kind: str, path: str | None) -> Any:
    """Model ``kind`` loaded once per process (outside a worker, or from other weights)."""
    return _load(kind, path, None)


def worker_model(kind: str, path: str | Path | None = None) -> Any:
    """The model ``kind`` of this worker, as :func:`survey_proc.model_registry.load` returns it.

    Parameters
    ----------
    kind
        One of :data:`~survey_proc.model_registry.KINDS`.
    path
        The weights file; None or "" for the shipped one.

    Returns
    -------
    The :class:`ModelPlugin`'s model when this worker holds one of ``kind`` loaded from
    ``path``; otherwise (not in a worker, no plugin, other weights) one loaded once per process.
    """
    model_registry.default_weights(kind)  # an unknown kind fails here
    path = str(path) if path else None
    try:
        from distributed import get_worker

        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except ValueError:  # not in a worker
        return _local(kind, path)
    model = getattr(plugin, "models", {}).get(kind)
    if model is None or not _same_file(model, kind, path):
        return _local(kind, path)
    return model
