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
LOADS = {"detector": 0, "bpnn": 0, "classifier": 0}  # how many times this process loaded weights (tests count them)


def weights_digest(path: str | Path | None) -> str:
    """sha256 (16 hex digits) of a weights file (the shipped detector for None/"")."""
    p = Path(path) if path else pnet.DEFAULT_WEIGHTS
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def _cpu_settings() -> None:
    import torch

    # normalised sky pixels make near-zero activations; denormal floats are slow on x86
    torch.set_flush_denormal(True)
    try:
        from distributed import get_worker

        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except ValueError:  # not in a worker
        pass


def _loader(name: str):
    """The ``load_*`` function of model ``name`` (detector, bpnn, classifier)."""
    if name == "detector":
        return pnet.load_detector
    if name == "bpnn":
        from survey_proc.photometry.bpnn import load_bpnn

        return load_bpnn
    from survey_proc.lightcurves.classifier import load_classifier

    return load_classifier


def _load(name: str, path: str | None, device: str | None):
    """Load model ``name`` from ``path`` (None: shipped) onto ``device``; CPU threads set, counted in LOADS."""
    model = _loader(name)(path or None, device=device)
    if model.device.type == "cpu":
        _cpu_settings()
    LOADS[name] += 1
    return model


class ModelPlugin(WorkerPlugin):
    """Loads the detector (PNet), the BPNN and the variable classifier on each worker once.

    Parameters
    ----------
    detector_path, bpnn_path, classifier_path
        Weights files; None or "" for the shipped ``survey_proc/models/detector.pt``,
        ``bpnn.pt`` and ``classifier.pt``; False: that model is not used by this run (not loaded).
    device
        Torch device; None picks the worker's GPU if it has one, else the CPU.
    """

    name = PLUGIN_NAME

    def __init__(self, detector_path: str | bool | None = None, device: str | None = None, *,
                 bpnn_path: str | bool | None = False, classifier_path: str | bool | None = False):
        self.use_detector = detector_path is not False
        self.use_bpnn = bpnn_path is not False
        self.detector_path = (detector_path or None) if self.use_detector else None
        self.bpnn_path = (bpnn_path or None) if self.use_bpnn else None
        self.use_classifier = classifier_path is not False
        self.classifier_path = (classifier_path or None) if self.use_classifier else None
        self.device = device
        self.detector: pnet.LoadedDetector | None = None
        self.bpnn = None
        self.classifier = None

    def setup(self, worker) -> None:
        if self.use_detector:
            self.detector = _load("detector", self.detector_path, self.device)
        if self.use_bpnn:
            self.bpnn = _load("bpnn", self.bpnn_path, self.device)
        if self.use_classifier:
            self.classifier = _load("classifier", self.classifier_path, self.device)

    def teardown(self, worker) -> None:
        self.detector = None
        self.bpnn = None
        self.classifier = None


@functools.lru_cache(maxsize=6)
def _local(name: str, path: str | None):
    """Model ``name`` loaded once per process (outside a worker, or from other weights)."""
    return _load(name, path, None)


def _worker_model(name: str, path: str | None):
    """This worker's plugin-held model ``name`` if it was loaded from ``path``, else :func:`_local`."""
    path = path or None
    try:
        from distributed import get_worker

        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except ValueError:  # not in a worker
        return _local(name, path)
    model = getattr(plugin, name, None)
    if model is None or (getattr(plugin, f"{name}_path") or None) != path:
        return _local(name, path)
    return model


def worker_detector(path: str | None = None) -> pnet.LoadedDetector:
    """The detector of this worker (from :class:`ModelPlugin`), or one loaded once per process."""
    return _worker_model("detector", path)


def worker_bpnn(path: str | None = None):
    """The BPNN of this worker (from :class:`ModelPlugin`), or one loaded once per process."""
    return _worker_model("bpnn", path)


def worker_classifier(path: str | None = None):
    """The variable classifier of this worker (from :class:`ModelPlugin`), or one loaded once per process."""
    return _worker_model("classifier", path)
