"""The models each worker holds: loaded once per worker process, onto the worker's device.

:class:`ModelPlugin` is a Dask ``WorkerPlugin``: ``client.register_plugin`` runs its
``setup`` once on every worker, now and on workers that join later, and the weights stay
in that worker's memory for every task it runs. On a dask-cuda worker the device is the
worker's GPU (``CUDA_VISIBLE_DEVICES`` puts it first); elsewhere the CPU, with torch's
threads set to the worker's thread count.

Tasks get the model with :func:`worker_detector`; outside a worker (a test, a notebook
calling the task function directly) it loads the weights once per process instead.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from distributed import WorkerPlugin

from survey_proc.detect import pnet

PLUGIN_NAME = "survey-proc-models"
LOADS = {"detector": 0}  # how many times this process loaded weights (tests count them)


def weights_digest(path: str | Path | None) -> str:
    """sha256 (16 hex digits) of a weights file (the shipped one for None/"")."""
    p = Path(path) if path else pnet.DEFAULT_WEIGHTS
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def _load(path: str | None, device: str | None) -> pnet.LoadedDetector:
    import torch

    det = pnet.load_detector(path or None, device=device)
    if det.device.type == "cpu":
        # normalised sky pixels make near-zero activations; denormal floats are slow on x86
        torch.set_flush_denormal(True)
        try:
            from distributed import get_worker

            torch.set_num_threads(max(1, get_worker().state.nthreads))
        except ValueError:  # not in a worker
            pass
    LOADS["detector"] += 1
    return det


class ModelPlugin(WorkerPlugin):
    """Loads the detector (PNet) on each worker once.

    Parameters
    ----------
    detector_path
        Weights file; None or "" for the shipped ``survey_proc/models/detector.pt``.
    device
        Torch device; None picks the worker's GPU if it has one, else the CPU.
    """

    name = PLUGIN_NAME

    def __init__(self, detector_path: str | None = None, device: str | None = None):
        self.detector_path = detector_path or None
        self.device = device
        self.detector: pnet.LoadedDetector | None = None

    def setup(self, worker) -> None:
        self.detector = _load(self.detector_path, self.device)

    def teardown(self, worker) -> None:
        self.detector = None


@functools.lru_cache(maxsize=2)
def _local_detector(path: str | None) -> pnet.LoadedDetector:
    return _load(path, None)


def worker_detector(path: str | None = None) -> pnet.LoadedDetector:
    """The detector of this worker (from :class:`ModelPlugin`), or one loaded once per process."""
    try:
        from distributed import get_worker

        w = get_worker()
    except ValueError:
        return _local_detector(path or None)
    plugin = w.plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.detector is None or (plugin.detector_path or None) != (path or None):
        return _local_detector(path or None)
    return plugin.detector
