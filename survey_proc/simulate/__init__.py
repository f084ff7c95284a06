"""GalSim-based survey simulator with truth (see ``survey.py`` for what it writes).

Modules: ``scenario`` (presets and parameters), ``conditions`` (per-epoch observing
conditions), ``stars`` and ``variables`` (catalogues and light-curve models), ``wcs``
(reference and epoch frames), ``psf`` (effective-PSF banks), ``render`` (one epoch's
pixels), ``depth`` (5σ limit, saturation), ``reference`` (Gaia-like calibration catalogue),
``survey`` (orchestration on Dask).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from survey_proc.simulate.scenario import PRESETS, Scenario, load_scenario, parse_overrides
    from survey_proc.simulate.survey import SurveyPaths, simulate_survey

#: Bumped whenever the same scenario and seed render different pixels or truth. The cached default
#: survey of ``survey-proc run`` carries it in its name (a survey simulated by an older renderer is
#: not reused) and every simulated store records it (``simulator_version``). 1: stamps renormalised
#: to unit sum; 2 (issue 21): stamps truncated, not renormalised (docs/simulator.md).
SIMULATOR_VERSION = 2

__all__ = ["PRESETS", "Scenario", "SurveyPaths", "load_scenario", "parse_overrides", "simulate_survey"]

_HOME = {"PRESETS": "scenario", "Scenario": "scenario", "load_scenario": "scenario",
         "parse_overrides": "scenario", "SurveyPaths": "survey", "simulate_survey": "survey"}


def __getattr__(name: str) -> Any:
    """Import the public names lazily (PEP 562).

    So numpy-only submodules such as ``stamps`` import where GalSim, Zarr or Dask are not
    installed (a GPU training node).
    """
    if name in _HOME:
        return getattr(importlib.import_module(f"survey_proc.simulate.{_HOME[name]}"), name)
    raise AttributeError(f"module 'survey_proc.simulate' has no attribute {name!r}")
