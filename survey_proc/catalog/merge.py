"""Merge the block catalogues of one epoch: border de-duplication, source ids, astrometry, magnitudes.

Source ids are deterministic: ``(field_index * 2**24 + epoch) * 2**24 + n`` where ``n``
numbers the epoch's sources in (y, x) order. So an id encodes its field and epoch, is
unique over the survey, and a re-run of the same input gives the same ids.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from survey_proc import vocab as F
from survey_proc.catalog.astrometry import pixel_to_world, to_reference_frame
from survey_proc.catalog.calibrate import instrumental_mag
from survey_proc.catalog.extract import BlockInfo
from survey_proc.tiling import deduplicate

EPOCH_BITS = 24
SOURCE_BITS = 24


def source_ids(field_index: int, epoch: int, n: int) -> np.ndarray:
    """Deterministic int64 ids for ``n`` sources of one field x epoch.

    Parameters
    ----------
    field_index
        Index of the field in the store.
    epoch
        Index of the epoch.
    n
        Number of sources.

    Returns
    -------
    ndarray
        int64 ids, ``(field_index * 2**24 + epoch) * 2**24 + (0 .. n - 1)``.

    Raises
    ------
    ValueError
        When ``n`` or ``epoch`` does not fit in 24 bits.
    """
    if n >= 2**SOURCE_BITS or epoch >= 2**EPOCH_BITS:
        raise ValueError(f"too many sources ({n}) or epochs ({epoch}) for 24-bit source ids")
    base = (np.int64(field_index) * 2**EPOCH_BITS + np.int64(epoch)) * 2**SOURCE_BITS
    return base + np.arange(n, dtype=np.int64)


def epoch_fwhm(infos: list[BlockInfo], default_px: float) -> float:
    """The epoch's FWHM (px): the star-count-weighted mean over blocks that measured it.

    Parameters
    ----------
    infos
        The blocks' measurements (``fwhm_px``, ``n_fwhm_stars``).
    default_px
        FWHM (px) when no block measured it.

    Returns
    -------
    float
        The FWHM (px).
    """
    w = np.array([i.n_fwhm_stars for i in infos], float)
    if w.sum() == 0:
        return default_px
    return float(np.sum(w * np.array([i.fwhm_px for i in infos])) / w.sum())


def confidence_from_snr(snr: np.ndarray) -> np.ndarray:
    """The classical detector's confidence: ``1 - exp(-snr^2 / 18)`` (0.5 at S/N 3.5, 0.75 at 5, 0.99 at 9).

    A monotone map of the measured S/N onto 0..1 so that classical and learned detections
    share one column; it is not a calibrated probability.

    Parameters
    ----------
    snr
        S/N per source (NaN counts as 0).

    Returns
    -------
    ndarray
        Confidence in [0, 1) (float32).
    """
    s = np.clip(np.nan_to_num(np.asarray(snr, float), nan=0.0), 0, None)
    return (1.0 - np.exp(-(s**2) / 18.0)).astype(np.float32)


def merge_epoch(frames: list[pd.DataFrame], infos: list[BlockInfo], *, field: str, field_index: int, epoch: int,
                mjd: float, epoch_wcs, ref_wcs, dedup_radius_fwhm: float, default_fwhm_px: float,
                band: str = "") -> tuple[pd.DataFrame, float, int]:
    """One epoch's source table from its block catalogues.

    Returns
    -------
    sources, fwhm_px, n_duplicates
        Sources sorted by (y, x) with ids, sky and reference-frame positions and
        instrumental magnitudes (calibrated columns are NaN until calibration); the epoch
        FWHM (px); and how many border duplicates were removed.

    Parameters
    ----------
    frames
        The block catalogues of the epoch (at least one; image-frame ``x``, ``y`` in px,
        ``tile``, ``depth_px``, ``flags``, ``flux``, ``flux_err`` (ADU), ...).
    infos
        The blocks' measurements (FWHM and the stars that measured it).
    field, field_index
        The field's id and its index in the store.
    epoch, mjd
        Index of the epoch and its mid-exposure MJD (days).
    epoch_wcs, ref_wcs
        The epoch's WCS and the field reference frame's (astropy; None when unknown).
    dedup_radius_fwhm
        Border de-duplication radius (FWHM; at least 1 px).
    band
        The epoch's band (the ``band`` column; "" when the store does not say).
    default_fwhm_px
        FWHM (px) when no block measured it.
    """
    fwhm = epoch_fwhm(infos, default_fwhm_px)
    df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else frames[0]
    radius = max(1.0, dedup_radius_fwhm * fwhm)
    keep = deduplicate(df["x"].to_numpy(), df["y"].to_numpy(), df["tile"].to_numpy(), df["depth_px"].to_numpy(),
                       radius)
    n_dup = int((~keep).sum())
    df = df[keep]
    df = df.sort_values(["y", "x"], kind="stable").reset_index(drop=True)
    n = len(df)
    df.insert(0, "field", field)
    df.insert(1, "epoch", np.int32(epoch))
    df.insert(2, "mjd", float(mjd))
    df.insert(3, "source_id", source_ids(field_index, epoch, n))
    df["band"] = band
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    df["ra"], df["dec"] = pixel_to_world(epoch_wcs, x, y)
    df["x_ref"], df["y_ref"] = to_reference_frame(epoch_wcs, ref_wcs, x, y)
    if epoch_wcs is None:
        df["flags"] = df["flags"].to_numpy() | F.NO_WCS
    if "mag_inst" not in df.columns:  # the BPNN brings its own magnitudes and their two uncertainties
        df["mag_inst"], df["mag_inst_err"] = instrumental_mag(df["flux"].to_numpy(), df["flux_err"].to_numpy())
        df["mag_err_aleatoric"] = df["mag_inst_err"]
        df["mag_err_epistemic"] = 0.0  # the classical measurement has no model uncertainty
    df["mag"] = np.nan
    df["mag_err"] = np.nan
    df["zp"] = np.nan
    if "confidence" not in df.columns:  # a learned detector brings its own
        df["confidence"] = confidence_from_snr(df["snr"].to_numpy())
    return df, fwhm, n_dup
