"""A Gaia-like reference (calibration) catalogue of a simulated survey.

It holds the bright, unsaturated, constant stars of every field, from
``saturation magnitude (best seeing) + reference_sat_margin_mag`` to ``reference_mag_faint``,
with catalogue noise: magnitude errors growing from ``reference_err_floor_mag`` to
``reference_err_at_faint_mag`` at the faint limit (Gaia-like exponential growth) and
positions scattered by ``reference_pos_err_mas``. The published ``mag`` is the true
magnitude plus a Gaussian draw of ``mag_err``, so calibration against it carries the
catalogue's noise, as on the sky. Variables are left out (Gaia flags them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from survey_proc.simulate.conditions import STREAM_REFERENCE, rng_for
from survey_proc.simulate.scenario import Scenario


def reference_mag_err(scn: Scenario, mag: np.ndarray) -> np.ndarray:
    """Catalogue magnitude error (mag) as a function of magnitude.

    Parameters
    ----------
    scn
        The scenario.
    mag
        Magnitudes (mag).

    Returns
    -------
    ndarray
        Errors (mag): ``reference_err_floor_mag`` plus a term growing 10x per 2.5 mag that
        reaches ``reference_err_at_faint_mag`` at ``reference_mag_faint``.
    """
    floor, at_faint = scn.reference_err_floor_mag, scn.reference_err_at_faint_mag
    return floor + (at_faint - floor) * 10.0 ** (0.4 * (np.asarray(mag) - scn.reference_mag_faint))


def make_reference(scn: Scenario, stars: pd.DataFrame, mag_bright: float) -> pd.DataFrame:
    """Reference catalogue rows (ref_id, ra, dec, mag, mag_err) from truth stars.

    Parameters
    ----------
    stars
        Truth stars of all fields.
    mag_bright
        Brightest magnitude kept (saturation at the best seeing plus the margin).

    Returns
    -------
    DataFrame
        ``ref_id``, ``ra``, ``dec`` (deg, scattered by ``reference_pos_err_mas``), ``mag`` and
        ``mag_err`` (mag).
    """
    sel = (
        (stars["var_class"] == "constant")
        & stars["in_frame"]
        & (stars["mag"] >= mag_bright)
        & (stars["mag"] <= scn.reference_mag_faint)
    )
    ref = stars.loc[sel, ["star_id", "field", "ra", "dec", "mag"]].reset_index(drop=True)
    rng = rng_for(scn, STREAM_REFERENCE)
    err = reference_mag_err(scn, ref["mag"].to_numpy())
    pos_err_deg = scn.reference_pos_err_mas / 3.6e6
    cos_dec = np.cos(np.deg2rad(ref["dec"].to_numpy()))
    return pd.DataFrame(
        {
            "ref_id": np.arange(len(ref), dtype="int64"),
            "ra": ref["ra"].to_numpy() + rng.standard_normal(len(ref)) * pos_err_deg / cos_dec,
            "dec": ref["dec"].to_numpy() + rng.standard_normal(len(ref)) * pos_err_deg,
            "mag": ref["mag"].to_numpy() + rng.standard_normal(len(ref)) * err,
            "mag_err": err,
        }
    )
