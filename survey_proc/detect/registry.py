"""The detector registry: the one map from a detector's name (``detector = NAME``) to its class.

:data:`DETECTORS` lists them; :func:`make_detector` builds the run's detector from its
configuration and, for a detector that needs one (``model_kind`` not None), the model the
caller loaded from :mod:`survey_proc.model_registry` from the file :func:`weights_path`
names. Code elsewhere asks these functions instead of comparing ``cfg.detector`` with a
name, so a new detector is one class (a :class:`~survey_proc.detect.base.Detector`) and
one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from survey_proc.detect.base import Detector
from survey_proc.detect.pnet_detector import PNetDetector
from survey_proc.detect.sep_detector import SepDetector
from survey_proc.errors import ConfigError

if TYPE_CHECKING:
    from survey_proc.config import RunConfig

DETECTORS: dict[str, type[Detector]] = {
    "sep": SepDetector,
    "pnet": PNetDetector,
}


def detector_class(name: str) -> type[Detector]:
    """The detector class registered as ``name``.

    Raises
    ------
    ConfigError
        For an unknown name; the message names it and the known detectors.
    """
    try:
        return DETECTORS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown detector {name!r}; the detectors are: {', '.join(DETECTORS)}") from None


def make_detector(cfg: RunConfig, model: Any = None) -> Detector:
    """The run's detector (``cfg.detector``), built with ``model`` when it needs one.

    Parameters
    ----------
    cfg
        The run configuration; ``cfg.detector`` names the detector.
    model
        The loaded model of the detector's ``model_kind`` (e.g. a
        :class:`~survey_proc.detect.pnet.LoadedDetector` for ``"pnet"``); None for a
        detector that needs no model (``"sep"``).

    Raises
    ------
    ConfigError
        For an unknown detector name.
    ValueError
        When ``model`` is missing for a detector that needs one, or given to one that does not.
    """
    cls = detector_class(cfg.detector)
    build: Callable[..., Detector] = cls  # the constructor takes the model when there is one
    kind = cls.model_kind
    if kind is None:
        if model is not None:
            raise ValueError(f"detector {cfg.detector!r} takes no model, got a {type(model).__name__}")
        return build()
    if model is None:
        raise ValueError(f"detector {cfg.detector!r} needs a loaded {kind!r} model "
                         f"(survey_proc.model_registry.load({kind!r}, weights_path(cfg)))")
    return build(model)


def weights_path(cfg: RunConfig) -> str | None:
    """The weights file the configuration names for its detector's model.

    Returns
    -------
    str or None
        The setting (e.g. ``cfg.pnet.weights``), or None when it is empty (the shipped
        weights) or the detector needs no model.
    """
    cls = detector_class(cfg.detector)
    if cls.model_kind is None or cls.weights_setting is None:
        return None
    section, key = cls.weights_setting.split(".")
    return getattr(getattr(cfg, section), key) or None
