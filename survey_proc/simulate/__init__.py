"""GalSim-based survey simulator with truth (see ``survey.py`` for what it writes).

Modules: ``scenario`` (presets and parameters), ``conditions`` (per-epoch observing
conditions), ``stars`` and ``variables`` (catalogues and light-curve models), ``wcs``
(reference and epoch frames), ``psf`` (effective-PSF banks), ``render`` (one epoch's
pixels), ``depth`` (5σ limit, saturation), ``reference`` (Gaia-like calibration catalogue),
``survey`` (orchestration on Dask).
"""

from survey_proc.simulate.scenario import PRESETS, Scenario, load_scenario, parse_overrides
from survey_proc.simulate.survey import SurveyPaths, simulate_survey

__all__ = ["PRESETS", "Scenario", "SurveyPaths", "load_scenario", "parse_overrides", "simulate_survey"]
