"""Star catalogues per field: positions, a rising luminosity function, variability.

Stars are placed uniformly over the field's reference pixel frame, extended by a margin so
that stars just outside the detector still spill light onto it when the pointing jitters.
Magnitudes follow ``dN/dm ∝ 10**(lf_slope * m)`` between ``mag_min`` and ``mag_max``
(``mag_max`` sits below the 5σ limit so the faintest stars are undetectable, as on a real
sky). ``star_density_per_px2`` counts all simulated stars per detector pixel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from survey_proc.simulate.conditions import STREAM_STARS, STREAM_VARIABLES, rng_for
from survey_proc.simulate.scenario import Scenario
from survey_proc.simulate.variables import assign_variables
from survey_proc.simulate.wcs import reference_wcs


def field_id_for(index: int) -> str:
    """Field identifier of the ``index``-th simulated field (``F000``, ``F001``, ...).

    Parameters
    ----------
    index
        Index of the field.

    Returns
    -------
    str
    """
    return f"F{index:03d}"


def margin_px(scn: Scenario) -> float:
    """Width (pixels) of the border around the detector where stars are also simulated.

    Parameters
    ----------
    scn
        The scenario.

    Returns
    -------
    float
        ``5 jitter_px + 4 psf_fwhm_px + 2 stamp_radius_px`` (pixels).
    """
    return 5.0 * scn.jitter_px + 4.0 * scn.psf_fwhm_px + 2.0 * scn.stamp_radius_px


def sample_magnitudes(rng: np.random.Generator, n: int, mag_min: float, mag_max: float, slope: float) -> np.ndarray:
    """Draw ``n`` magnitudes from ``dN/dm ∝ 10**(slope*m)`` on [mag_min, mag_max] (inverse CDF).

    Parameters
    ----------
    rng
        The random stream.
    n
        Number of magnitudes.
    mag_min, mag_max
        The magnitude range (mag).
    slope
        Luminosity-function slope (dex per mag); 0 is uniform.

    Returns
    -------
    ndarray
        ``n`` magnitudes (mag).
    """
    u = rng.uniform(0.0, 1.0, n)
    if slope == 0:
        return mag_min + u * (mag_max - mag_min)
    a = 10.0 ** (slope * mag_min)
    b = 10.0 ** (slope * mag_max)
    return np.log10(a + u * (b - a)) / slope


def make_stars(scn: Scenario, field_index: int, t_start: float, t_end: float) -> pd.DataFrame:
    """Simulate the star catalogue of one field (truth columns of ``stars.parquet``).

    Parameters
    ----------
    scn
        The scenario.
    field_index
        0-based field number (its id is :func:`field_id_for`).
    t_start, t_end
        MJD span of the survey (for variable-star epochs).

    Returns
    -------
    DataFrame
        star_id (int64, unique across fields), field, ra, dec (deg), x, y (reference-frame
        pixels, 0-based, may lie up to :func:`margin_px` outside the detector), mag, var_class,
        period (days), amplitude (mag), t0 (MJD) and the model parameters of variables.
    """
    rng = rng_for(scn, STREAM_STARS, field_index)
    m = margin_px(scn)
    side = scn.size_px + 2 * m
    n = int(rng.poisson(scn.star_density_per_px2 * side * side))
    x = rng.uniform(-m, scn.size_px - 1 + m, n)
    y = rng.uniform(-m, scn.size_px - 1 + m, n)
    mag = sample_magnitudes(rng, n, scn.mag_min, scn.mag_max, scn.lf_slope)
    var = assign_variables(
        rng_for(scn, STREAM_VARIABLES, field_index),
        n,
        fractions={
            "eclipsing_binary": scn.frac_eclipsing_binary,
            "pulsator": scn.frac_pulsator,
            "transit": scn.frac_transit,
            "flare": scn.frac_flare,
            "trend": scn.frac_trend,
        },
        t_start=t_start,
        t_end=t_end,
        eb_period_days=scn.eb_period_days,
        pulsator_period_days=scn.pulsator_period_days,
        transit_period_days=scn.transit_period_days,
        pulsator_amplitude_mag=scn.pulsator_amplitude_mag,
        eb_depth=scn.eb_depth,
        transit_depth=scn.transit_depth,
        transit_duration_h=scn.transit_duration_h,
        flare_amplitude=scn.flare_amplitude,
        trend_amplitude_mag=scn.trend_amplitude_mag,
    )
    wcs = reference_wcs(scn, field_index)
    ra, dec = wcs.all_pix2world(x, y, 0)
    fid = field_id_for(field_index)
    stars = pd.DataFrame(
        {
            "star_id": (np.int64(field_index) << np.int64(32)) + np.arange(n, dtype="int64"),
            "field": fid,
            "ra": np.asarray(ra, dtype="float64"),
            "dec": np.asarray(dec, dtype="float64"),
            "x": x,
            "y": y,
            "mag": mag,
        }
    )
    stars = pd.concat([stars, var], axis=1)
    stars["in_frame"] = (x >= -0.5) & (x <= scn.size_px - 0.5) & (y >= -0.5) & (y <= scn.size_px - 0.5)
    return stars


def neighbour_fraction(x: np.ndarray, y: np.ndarray, radius_px: float) -> float:
    """Fraction of points with another point closer than ``radius_px``.

    Parameters
    ----------
    x, y
        Positions (px).
    radius_px
        The distance (px).

    Returns
    -------
    float
        The fraction, in [0, 1].
    """
    from scipy.spatial import cKDTree

    if len(x) < 2:
        return 0.0
    tree = cKDTree(np.column_stack([x, y]))
    d, _ = tree.query(np.column_stack([x, y]), k=2)
    return float(np.mean(d[:, 1] < radius_px))
