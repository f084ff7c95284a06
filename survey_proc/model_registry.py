"""The model registry: one place to save, load, fingerprint and describe survey-proc's networks.

Kinds
-----
:data:`KINDS` names the four networks a run can use:

- ``"detector"``: PNet (:mod:`survey_proc.detect.pnet`), setting ``threshold`` (heatmap
  confidence, dimensionless);
- ``"bpnn"``: the Bayesian photometry network (:mod:`survey_proc.photometry.bpnn`),
  setting ``n_samples`` (T, Monte-Carlo weight samples per prediction);
- ``"classifier"``: the periodic-variable CNN (:mod:`survey_proc.lightcurves.classifier`),
  setting ``threshold`` (on ``p_periodic``, dimensionless);
- ``"classifier_sparse"``: the MLP on Fourier features for sparse, long-baseline curves
  (:mod:`survey_proc.lightcurves.sparse_classifier`), setting ``threshold`` (on its
  ``p_periodic``).

The architectures and the inference code stay in those modules; this module only knows
how a kind is stored, loaded onto a device and recorded in ``run.json``.

Files
-----
A model is two files side by side: the weights ``NAME.pt`` (written by :func:`save`) and its
card ``NAME.json`` (a free-form JSON record of the data, training and validation). The
weights file is a :func:`torch.save` dictionary::

    {"format": 1, "kind": KIND, "config": {architecture hyper-parameters},
     SETTING: value,            # "threshold" or "n_samples" (see above)
     "state_dict": {...}}

The shipped models are ``survey_proc/models/{detector,bpnn,classifier}.pt``
(:func:`default_weights`). Their sha256 is part of every run's fingerprint, so they are
never rewritten to a newer layout.

Legacy files
------------
Two shipped files predate this layout and are read as they are:

- ``detector.pt`` has ``format`` and ``threshold`` but no ``kind``;
- ``classifier.pt`` has only ``config`` and ``state_dict`` (no ``format``, no ``kind``, its
  threshold is on the card).

A file without ``kind`` is identified by its ``config``: its keys must all be fields of
exactly one kind's architecture dataclass. A file without ``format`` is read as format 1.
A file of another kind (by its ``kind`` key or, for a legacy file, by its config) is refused
with an error naming both kinds.

Settings rule (all kinds)
-------------------------
The value saved in the weights file when present, else the card's value under the same
key, else :data:`DEFAULT_SETTINGS`. This reproduces the shipped models' values exactly:
detector threshold 0.14 (weights file), BPNN T = 8 (weights file), classifier threshold
0.94 (card). A run configuration's override (``[pnet] threshold``, ``[bpnn] n_samples``,
``[classify] threshold``) is applied by the caller, not here.

Device rule (all kinds)
-----------------------
An explicit device; else CUDA when available; else the CPU (:func:`choose_device`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import torch

from survey_proc.errors import SurveyProcError

if TYPE_CHECKING:
    from survey_proc.detect.pnet import LoadedDetector
    from survey_proc.lightcurves.classifier import LoadedClassifier
    from survey_proc.lightcurves.sparse_classifier import LoadedSparseClassifier
    from survey_proc.photometry.bpnn import LoadedBPNN

    Loaded: TypeAlias = LoadedDetector | LoadedBPNN | LoadedClassifier | LoadedSparseClassifier

KINDS: tuple[str, ...] = ("detector", "bpnn", "classifier", "classifier_sparse")
FORMAT = 1  # the layout of the weights dictionary (see the module docstring)
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_SETTINGS: dict[str, float | int] = {"threshold": 0.5, "n_samples": 8}
_SETTING_TYPES: dict[str, type] = {"threshold": float, "n_samples": int}


@dataclass(frozen=True)
class _Spec:
    """How one kind is built, prepared for inference, named in messages and described in run.json."""

    module: str  # where the architecture lives
    model: str  # its nn.Module class, built as ``model(config(**cfg))``
    config: str  # its architecture dataclass
    loaded: str  # the Loaded* dataclass that :func:`load` returns
    label: str  # the model's name in messages
    retrain: str  # the command that retrains the weights
    setting: str | None  # "threshold", "n_samples" or None
    validation_key: str  # the run.json key of the card's validation summary
    validation: Callable[[dict], Any]  # card -> that summary
    fuse_batchnorm: bool = False  # fold BatchNorm into the convolutions (PNet)
    channels_last: bool = False  # 2-D convolutions in channels-last (BPNN's 9 x 9 stamps: 1.6x on the CPU, measured)


_SPECS: dict[str, _Spec] = {
    "detector": _Spec("survey_proc.detect.pnet", "PNet", "PNetConfig", "LoadedDetector", "PNet",
                      "python -m training.train_detector", "threshold", "validation_best",
                      lambda card: card.get("validation", {}).get("best", {}),
                      fuse_batchnorm=True, channels_last=True),
    "bpnn": _Spec("survey_proc.photometry.bpnn", "BPNN", "BPNNConfig", "LoadedBPNN", "BPNN",
                  "python -m training.train_bpnn", "n_samples", "validation",
                  lambda card: card.get("validation"), channels_last=True),
    "classifier": _Spec("survey_proc.lightcurves.classifier", "LocalGlobalCNN", "ClassifierConfig",
                        "LoadedClassifier", "classifier", "PYTHONPATH=. python training/train_classifier.py",
                        "threshold", "validation_threshold",
                        lambda card: card.get("validation", {}).get("threshold")),
    "classifier_sparse": _Spec("survey_proc.lightcurves.sparse_classifier", "FourierMLP", "SparseClassifierConfig",
                               "LoadedSparseClassifier", "sparse classifier",
                               "PYTHONPATH=. python training/train_sparse_classifier.py", "threshold",
                               "validation", lambda card: card.get("validation")),
}


def _spec(kind: str) -> _Spec:
    if kind not in _SPECS:
        raise SurveyProcError(f"unknown model kind {kind!r}; the kinds are {', '.join(KINDS)}")
    return _SPECS[kind]


def _attr(spec: _Spec, name: str) -> Any:
    """Attribute ``name`` of the kind's module (imported on first use: the registry imports no model)."""
    return getattr(importlib.import_module(spec.module), name)


def default_weights(kind: str) -> Path:
    """The shipped weights file of ``kind``: ``survey_proc/models/<kind>.pt``."""
    _spec(kind)
    return MODELS_DIR / f"{kind}.pt"


def card_path(path: str | Path) -> Path:
    """The card (JSON) beside weights file ``path``."""
    return Path(path).with_suffix(".json")


def weights_path(kind: str, path: str | Path | None = None) -> Path:
    """``path`` (None or "": the shipped weights of ``kind``), checked to be a file.

    Raises
    ------
    SurveyProcError
        When the file is missing; the message names it and how to get weights back.
    """
    spec = _spec(kind)
    p = Path(path) if path else default_weights(kind)
    if not p.is_file():
        raise SurveyProcError(f"{spec.label} weights not found at {p}: reinstall survey-proc (the shipped weights "
                              f"are in survey_proc/models/), pass another weights file, or retrain them with "
                              f"`{spec.retrain}`")
    return p


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The device rule of every kind: ``device`` if given, else CUDA when available, else the CPU."""
    if device is not None and device != "":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _file_kind(blob: dict) -> tuple[str | None, bool]:
    """(kind, inferred): the ``kind`` key, or for a legacy file the one kind whose config fields hold its config."""
    if "kind" in blob:
        return blob["kind"], False
    keys = set(blob["config"])
    found = [k for k in KINDS if keys and keys <= {f.name for f in fields(_attr(_SPECS[k], _SPECS[k].config))}]
    return (found[0] if len(found) == 1 else None), True


def _corrupt(spec: _Spec, path: Path, exc: Exception) -> SurveyProcError:
    """The error for a file that is not a readable weights file of ``spec``'s kind."""
    return SurveyProcError(f"{spec.label} weights file {path} is corrupt or not a {spec.label} model "
                           f"({type(exc).__name__}: {str(exc)[:200]}); reinstall survey-proc or retrain with "
                           f"`{spec.retrain}`")


def _read(kind: str, path: Path) -> tuple[torch.nn.Module, dict]:
    """The model of ``kind`` in ``path`` (on the CPU, untouched) and the weights dictionary."""
    spec = _spec(kind)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
            raise ValueError("not a survey-proc weights file (no config and state_dict)")
        if blob.get("format", 1) != FORMAT:
            raise ValueError(f"format {blob.get('format')!r} is not supported (this survey-proc reads {FORMAT})")
        found, inferred = _file_kind(blob)
        if found is None:
            raise ValueError("no 'kind' key, and its config matches no model kind")
    except Exception as exc:
        raise _corrupt(spec, path, exc) from exc
    if found != kind:
        how = " (a legacy file without a 'kind' key: inferred from its config)" if inferred else ""
        raise SurveyProcError(f"{spec.label} weights file {path} is not a {spec.label} model: it holds a "
                              f"{found!r} model{how}; pass {kind} weights or retrain with `{spec.retrain}`")
    try:
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in blob["config"].items()}
        model = _attr(spec, spec.model)(_attr(spec, spec.config)(**cfg))
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:
        raise _corrupt(spec, path, exc) from exc
    return model, blob


def _setting(name: str, blob: dict, card: dict) -> float | int:
    """The settings rule: the weights file's value, else the card's, else :data:`DEFAULT_SETTINGS`."""
    for source in (blob, card):
        if source.get(name) is not None:
            return _SETTING_TYPES[name](source[name])
    return DEFAULT_SETTINGS[name]


@overload
def load(kind: Literal["detector"], path: str | Path | None = None,
         device: str | torch.device | None = None) -> LoadedDetector: ...
@overload
def load(kind: Literal["bpnn"], path: str | Path | None = None,
         device: str | torch.device | None = None) -> LoadedBPNN: ...
@overload
def load(kind: Literal["classifier"], path: str | Path | None = None,
         device: str | torch.device | None = None) -> LoadedClassifier: ...
@overload
def load(kind: Literal["classifier_sparse"], path: str | Path | None = None,
         device: str | torch.device | None = None) -> LoadedSparseClassifier: ...
@overload
def load(kind: str, path: str | Path | None = None, device: str | torch.device | None = None) -> Loaded: ...


def load(kind: str, path: str | Path | None = None, device: str | torch.device | None = None) -> Loaded:
    """Load weights of ``kind`` for inference.

    Parameters
    ----------
    kind
        One of :data:`KINDS`.
    path
        The weights file; None or "" for the shipped one (:func:`default_weights`). Legacy
        files without a ``kind`` key are accepted (see the module docstring).
    device
        Torch device; None: CUDA when available, else the CPU (:func:`choose_device`).

    Returns
    -------
    The kind's ``Loaded*`` object (:class:`~survey_proc.detect.pnet.LoadedDetector`,
    :class:`~survey_proc.photometry.bpnn.LoadedBPNN` or
    :class:`~survey_proc.lightcurves.classifier.LoadedClassifier`): the model in eval mode
    with gradients off on ``device`` (PNet with its BatchNorm folded; 2-D convolutions
    channels-last), its setting (``threshold`` or ``n_samples``, by the settings rule), the
    card (``{}`` when there is none), ``path`` (``str`` of the file read) and ``device``.

    Raises
    ------
    SurveyProcError
        When the file is missing, is not a weights file, or holds another kind's model
        (the message names the file and what to do).
    """
    spec = _spec(kind)
    p = weights_path(kind, path)
    model, blob = _read(kind, p)
    cp = card_path(p)
    card = json.loads(cp.read_text()) if cp.is_file() else {}
    dev = choose_device(device)
    model.eval()
    if spec.fuse_batchnorm:
        _attr(spec, "fuse_batchnorm")(model)
    model = model.to(dev)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (not in the stubs)
    for prm in model.parameters():
        prm.requires_grad_(False)
    settings = {spec.setting: _setting(spec.setting, blob, card)} if spec.setting else {}
    return _attr(spec, spec.loaded)(model=model, device=dev, card=card, path=str(p), **settings)


def save(kind: str, model: torch.nn.Module, path: str | Path, *, card: dict, **settings: float | int) -> None:
    """Write ``model``'s weights to ``path`` and ``card`` beside it as JSON (:func:`card_path`).

    Parameters
    ----------
    kind
        One of :data:`KINDS`; ``model`` must be that kind's network.
    model
        The network; its ``cfg`` (architecture dataclass) is stored with the weights.
    path
        The weights file to write (its directory must exist).
    card
        The model card (any JSON-serialisable dictionary).
    **settings
        The kind's inference setting, required: ``threshold`` (detector, classifier;
        dimensionless) or ``n_samples`` (bpnn). It is stored in the weights file, where
        :func:`load` looks first.

    Raises
    ------
    SurveyProcError
        For an unknown kind, a model of another kind, or missing or unexpected settings.
    """
    spec = _spec(kind)
    if not isinstance(model, _attr(spec, spec.model)):
        raise SurveyProcError(f"save({kind!r}) needs a {spec.model}, got a {type(model).__name__}")
    wanted = {spec.setting} if spec.setting else set()
    if set(settings) != wanted:
        raise SurveyProcError(f"save({kind!r}) takes the settings {sorted(wanted)}, got {sorted(settings)}")
    blob: dict[str, Any] = {"format": FORMAT, "kind": kind, "config": asdict(model.cfg)}
    blob.update({k: _SETTING_TYPES[k](v) for k, v in settings.items()})
    blob["state_dict"] = model.state_dict()
    path = Path(path)
    torch.save(blob, path)
    card_path(path).write_text(json.dumps(card, indent=2) + "\n")


def digest(kind: str, path: str | Path | None) -> str:
    """The weights' fingerprint: the first 16 hex digits of the sha256 of the file.

    ``path`` None or "" means the shipped weights of ``kind``. Part of every run's
    fingerprint: the value must never change for the same file.
    """
    return hashlib.sha256(weights_path(kind, path).read_bytes()).hexdigest()[:16]


def card_digest(kind: str, path: str | Path | None) -> str:
    """The first 16 hex digits of the sha256 of the weights' JSON card ("" without a card).

    The classifier's card holds settings that change its outputs (the p_periodic
    calibration and the threshold on its scale), so the classify stage's fingerprint takes it
    beside the weights' :func:`digest`.
    """
    cp = card_path(weights_path(kind, path))
    return hashlib.sha256(cp.read_bytes()).hexdigest()[:16] if cp.is_file() else ""


def describe(kind: str, path: str | Path | None = None) -> dict[str, Any]:
    """The ``run.json`` entry of a model (loading it on the CPU first: a bad file fails here).

    Returns
    -------
    ``path``, ``sha256`` (:func:`digest`), the kind's setting (``threshold`` or
    ``n_samples``, as loaded: a run configuration's override is the caller's to apply),
    ``trained`` (the card's ``date``), ``git_revision`` and the card's validation summary:
    ``validation_best`` (detector: ``validation.best``), ``validation`` (bpnn) or
    ``validation_threshold`` (classifier: ``validation.threshold``).
    """
    spec = _spec(kind)
    m = load(kind, path, device="cpu")
    entry: dict[str, Any] = {"path": m.path, "sha256": digest(kind, m.path), "card_sha256": card_digest(kind, m.path)}
    if spec.setting:
        entry[spec.setting] = getattr(m, spec.setting)
    entry.update({"trained": m.card.get("date"), "git_revision": m.card.get("git_revision"),
                  spec.validation_key: spec.validation(m.card)})
    return entry
