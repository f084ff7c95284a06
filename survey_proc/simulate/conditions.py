"""Observing conditions per epoch: times, gaps, airmass, seeing, sky, zero point, pointing.

Each quantity draws from its own random stream (``SeedSequence([seed, STREAM, ...])``), so
the first N epochs of a longer simulation equal an N-epoch simulation with the same seed,
and each field x epoch renders the same whatever the order Dask runs it in.

Epoch conditions are shared by all fields (the fields are detectors of one exposure),
except a constant per-field zero-point offset and sky scale.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from survey_proc.simulate.scenario import Scenario

SECONDS_PER_DAY = 86400.0

# Random-stream keys (never reuse one for a different purpose).
STREAM_TIMES, STREAM_SEEING, STREAM_SKY, STREAM_ZP, STREAM_JITTER, STREAM_SHAPE = 1, 2, 3, 4, 5, 6
STREAM_FIELD = 10  # + per-field keys
STREAM_STARS, STREAM_VARIABLES, STREAM_NOISE, STREAM_COSMICS, STREAM_BADCOLS, STREAM_REFERENCE = 20, 21, 22, 23, 24, 25
STREAM_GALAXIES, STREAM_HOTPIX = 26, 27


def rng_for(scn: Scenario, *keys: int) -> np.random.Generator:
    """A generator for one random stream of this scenario (seeded by ``scn.seed`` and ``keys``).

    Parameters
    ----------
    scn
        The scenario.
    keys
        Stream keys (the ``STREAM_*`` constants, then e.g. a field index).

    Returns
    -------
    numpy.random.Generator
    """
    return np.random.default_rng(np.random.SeedSequence([int(scn.seed), *map(int, keys)]))


def _ar1(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """Unit-variance AR(1) series with lag-1 correlation ``corr`` (prefix-stable in ``n``)."""
    eps = rng.standard_normal(n)
    out = np.empty(n)
    if n == 0:
        return out
    out[0] = eps[0]
    innov = np.sqrt(max(0.0, 1.0 - corr * corr))
    for i in range(1, n):
        out[i] = corr * out[i - 1] + innov * eps[i]
    return out


def gmst_hours(mjd: np.ndarray) -> np.ndarray:
    """Greenwich mean sidereal time in hours (IAU 1982 linear term; < 1 s error over decades).

    Parameters
    ----------
    mjd
        Times (MJD UT1, days; UTC is close enough here).

    Returns
    -------
    ndarray
        GMST in [0, 24) hours.
    """
    return np.mod(18.697374558 + 24.06570982441908 * (np.asarray(mjd) - 51544.5), 24.0)


def airmass_at(mjd: np.ndarray, ra_deg: float, dec_deg: float, lat_deg: float, lon_deg: float) -> np.ndarray:
    """Plane-parallel airmass sec(z) of a pointing at ``mjd`` (inf when below the horizon).

    Parameters
    ----------
    mjd
        Times (MJD, days).
    ra_deg, dec_deg
        The pointing (deg).
    lat_deg, lon_deg
        The site (deg; longitude east positive).

    Returns
    -------
    ndarray
        Airmass per time.
    """
    lst_h = gmst_hours(mjd) + lon_deg / 15.0
    ha = np.deg2rad(lst_h * 15.0 - ra_deg)
    lat, dec = np.deg2rad(lat_deg), np.deg2rad(dec_deg)
    cos_z = np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(ha)
    with np.errstate(divide="ignore"):
        return np.where(cos_z > 0, 1.0 / np.maximum(cos_z, 1e-9), np.inf)


def exposure_start_mjds(scn: Scenario) -> np.ndarray:
    """MJD at the start of each exposure, honouring night-only observing and random gaps.

    Parameters
    ----------
    scn
        The scenario.

    Returns
    -------
    ndarray
        ``scn.n_epochs`` start times (MJD, days), increasing.

    Raises
    ------
    RuntimeError
        When the field is never observable from the site.
    """
    step_d = scn.cadence_or_exptime_s / SECONDS_PER_DAY
    rng = rng_for(scn, STREAM_TIMES)
    # Random gaps: each starts after a uniformly chosen epoch index (in the gap-free sequence).
    gap_after = np.sort(rng.integers(1, max(2, scn.n_epochs), size=scn.n_random_gaps))
    starts = np.empty(scn.n_epochs)
    t = scn.start_mjd
    i = 0
    g = 0
    guard = 0
    while i < scn.n_epochs:
        guard += 1
        if guard > 200 * scn.n_epochs + 10000:
            raise RuntimeError("could not schedule exposures: the field is never observable; check max_airmass/site")
        while g < len(gap_after) and gap_after[g] == i:
            t += scn.random_gap_h / 24.0
            g += 1
        if scn.site == "ground" and scn.night_only:
            mid = t + scn.exptime_s / 2 / SECONDS_PER_DAY
            local_h = np.mod((mid % 1.0) * 24.0 + scn.site_lon_deg / 15.0, 24.0)
            night = local_h >= scn.night_start_h or local_h <= scn.night_end_h
            x = airmass_at(np.array([mid]), scn.field_ra_deg, scn.field_dec_deg, scn.site_lat_deg, scn.site_lon_deg)[0]
            if not (night and x <= scn.max_airmass):
                t += step_d
                continue
        starts[i] = t
        t += step_d
        i += 1
    return starts


def epoch_conditions(scn: Scenario) -> pd.DataFrame:
    """Conditions shared by all fields, one row per epoch.

    Columns: epoch, mjd (mid-exposure), exptime_s, airmass (NaN in space), seeing_fwhm_px,
    psf_g1, psf_g2, sky_adu (before the per-field scale), zp_drift_mag, dx_px, dy_px,
    rotation_deg (pointing offset of the detector relative to the field's reference frame).

    Parameters
    ----------
    scn
        The scenario.

    Returns
    -------
    DataFrame
        The table above.
    """
    n = scn.n_epochs
    mjd = exposure_start_mjds(scn) + scn.exptime_s / 2 / SECONDS_PER_DAY
    if scn.site == "ground":
        airmass = airmass_at(mjd, scn.field_ra_deg, scn.field_dec_deg, scn.site_lat_deg, scn.site_lon_deg)
        airmass = np.where(np.isfinite(airmass), airmass, np.nan)
    else:
        airmass = np.full(n, np.nan)
    seeing = scn.psf_fwhm_px * np.exp(scn.seeing_scatter * _ar1(rng_for(scn, STREAM_SEEING), n, scn.seeing_corr))
    seeing = np.clip(seeing, 0.6 * scn.psf_fwhm_px, 1.8 * scn.psf_fwhm_px)
    if scn.site == "ground":  # seeing degrades as airmass^0.6
        seeing = seeing * np.where(np.isfinite(airmass), airmass, 1.0) ** 0.6
    shape_rng = rng_for(scn, STREAM_SHAPE)
    g1 = scn.psf_ellipticity_rms * shape_rng.standard_normal(n)
    g2 = scn.psf_ellipticity_rms * shape_rng.standard_normal(n)
    sky = scn.sky_adu * np.exp(scn.sky_scatter * _ar1(rng_for(scn, STREAM_SKY), n, 0.8))
    if scn.site == "ground":
        sky = sky * (1.0 + scn.sky_airmass_coeff * (np.where(np.isfinite(airmass), airmass, 1.0) - 1.0))
    drift = scn.zp_drift_mag * _ar1(rng_for(scn, STREAM_ZP), n, 0.99)
    jit = rng_for(scn, STREAM_JITTER)
    dx = scn.jitter_px * jit.standard_normal(n)
    dy = scn.jitter_px * jit.standard_normal(n)
    rot = scn.rotation_jitter_deg * jit.standard_normal(n)
    return pd.DataFrame(
        {
            "epoch": np.arange(n, dtype="int32"),
            "mjd": mjd,
            "exptime_s": np.full(n, scn.exptime_s),
            "airmass": airmass,
            "seeing_fwhm_px": seeing,
            "psf_g1": g1,
            "psf_g2": g2,
            "sky_adu": sky,
            "zp_drift_mag": drift,
            "dx_px": dx,
            "dy_px": dy,
            "rotation_deg": rot,
        }
    )


def field_offsets(scn: Scenario, field_index: int) -> tuple[float, float]:
    """Constant (zero-point offset in mag, sky scale factor) of one field's detector.

    Parameters
    ----------
    scn
        The scenario.
    field_index
        Index of the field.

    Returns
    -------
    zp_offset_mag, sky_scale
        Added to every epoch's zero point (mag); multiplies every epoch's sky.
    """
    rng = rng_for(scn, STREAM_FIELD, field_index)
    return float(scn.zp_field_scatter_mag * rng.standard_normal()), float(1.0 + 0.02 * rng.standard_normal())


def field_epochs(scn: Scenario, field_index: int, field_id: str, cond: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-field epoch table: the shared conditions plus this field's zero point and sky.

    ``zeropoint`` is the epoch's magnitude zero point: ``mag = -2.5 log10(flux_adu) + zeropoint``.

    Parameters
    ----------
    scn
        The scenario.
    field_index
        Index of the field.
    field_id
        Its id (the ``field`` column).
    cond
        :func:`epoch_conditions` of ``scn``, when already computed.

    Returns
    -------
    DataFrame
        :func:`epoch_conditions` with ``field`` first, ``zeropoint`` (mag) and the field's ``sky_adu``.
    """
    cond = epoch_conditions(scn) if cond is None else cond
    zp_off, sky_scale = field_offsets(scn, field_index)
    out = cond.copy()
    extinction = np.where(np.isfinite(out["airmass"]), scn.extinction_k_mag * out["airmass"], 0.0)
    out["zeropoint"] = scn.zeropoint_mag - extinction + out["zp_drift_mag"] + zp_off
    out["sky_adu"] = out["sky_adu"] * sky_scale
    out.insert(0, "field", field_id)
    return out
