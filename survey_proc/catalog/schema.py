"""Column contracts of the Parquet outputs (DESIGN.md), as pyarrow schemas.

The DESIGN.md columns come first, in its order, with its names and units; columns after
them are additions (allowed: never rename, never drop). Writers cast to these schemas, so
a type drift fails loudly at write time instead of in a user's DuckDB query.
"""

from __future__ import annotations

import pyarrow as pa

# ``field`` is a dictionary-encoded string: it is also the hive partition key
# (``field=F000/``), which pyarrow/pandas infer as dictionary<string>; storing the same type
# lets ``pandas.read_parquet("OUT/sources")`` merge the two. DuckDB reads it as VARCHAR.
FIELD = pa.dictionary(pa.int32(), pa.string())

SOURCES = pa.schema([
    ("field", FIELD),
    ("epoch", pa.int32()),
    ("mjd", pa.float64()),
    ("source_id", pa.int64()),
    ("tile", pa.int32()),
    ("x", pa.float64()),  # epoch pixel frame, 0-based, pixel centres at integers
    ("y", pa.float64()),
    ("ra", pa.float64()),  # deg, NaN without a WCS
    ("dec", pa.float64()),
    ("flux", pa.float64()),  # ADU per exposure, total (aperture-corrected)
    ("flux_err", pa.float64()),
    ("mag_inst", pa.float64()),  # -2.5 log10(flux)
    ("mag_inst_err", pa.float64()),
    ("mag_err_aleatoric", pa.float64()),
    ("mag_err_epistemic", pa.float64()),
    ("mag", pa.float64()),  # calibrated
    ("mag_err", pa.float64()),  # includes the zero-point error
    ("confidence", pa.float32()),  # 0..1
    ("flags", pa.int32()),  # survey_proc.vocab
    # additions
    ("x_ref", pa.float64()),  # field reference pixel frame
    ("y_ref", pa.float64()),
    ("flux_aper", pa.float64()),  # ADU inside the aperture
    ("flux_aper_err", pa.float64()),
    ("snr", pa.float32()),
    ("bkg_adu", pa.float32()),  # local background (ADU per pixel)
    ("npix", pa.int32()),  # pixels above the detection threshold
    ("peak_adu", pa.float32()),
    ("zp", pa.float64()),  # the epoch's zero point (mag for 1 ADU per exposure)
    ("band", pa.string()),  # the epoch's band ("" when the store does not say)
])

OBJECTS = pa.schema([
    ("object_id", pa.int64()),
    ("field", FIELD),
    ("region", pa.int32()),
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("x", pa.float64()),  # reference frame
    ("y", pa.float64()),
    ("n_epochs", pa.int32()),
    ("mag_mean", pa.float64()),  # inverse-variance weighted mean of clean points
    ("mag_median", pa.float64()),
    ("mag_std", pa.float64()),
    ("chi2_const", pa.float64()),  # reduced chi^2 about mag_mean
    ("period", pa.float64()),  # days
    ("period_power", pa.float64()),
    ("depth", pa.float64()),
    ("duration", pa.float64()),
    ("p_periodic", pa.float64()),
    ("var_class", pa.string()),
    ("var_class_prob", pa.float64()),
    # additions
    ("n_good", pa.int32()),  # points without PHOTOMETRY_BAD flags
    ("mag_err_median", pa.float64()),
    ("astrom_rms_px", pa.float64()),  # rms scatter of the positions per axis (reference frame)
    ("t0_mjd", pa.float64()),  # periodic: mid-eclipse/transit (BLS) or minimum light (pulsators)
    ("period_bls", pa.float64()),  # days, best BLS period before refinement
    ("period_ls", pa.float64()),  # days, best Lomb-Scargle period before refinement
    ("von_neumann", pa.float64()),  # mean squared successive difference / variance (2: white noise)
    ("robust_rms", pa.float64()),  # NMAD of the relative flux
    ("iqr", pa.float64()),  # interquartile range of the relative flux
    ("n_points_classified", pa.int32()),  # points kept by the preprocessing
    ("band", pa.string()),  # the band of mag_mean..chi2_const and n_good: the object's band with most clean points
    ("detrend", pa.string()),  # what the classify stage removed before the period search ("sysrem:2", "none")
    ("detrend_rms", pa.float64()),  # rms of that correction for this object (mag); NaN before classify
    ("n_detected", pa.int32()),  # light-curve points that are detections (n_epochs counts forced points too)
    ("n_forced", pa.int32()),  # forced points (flag FORCED, source_id null)
])

LIGHTCURVES = pa.schema([
    ("object_id", pa.int64()),
    ("field", FIELD),
    ("epoch", pa.int32()),
    ("mjd", pa.float64()),
    ("mag", pa.float64()),
    ("mag_err", pa.float64()),
    ("flux", pa.float64()),
    ("flux_err", pa.float64()),
    ("flags", pa.int32()),
    ("source_id", pa.int64()),  # null for forced measurements
    # additions
    ("band", pa.string()),
])

SCHEMAS = {"sources": SOURCES, "objects": OBJECTS, "lightcurves": LIGHTCURVES}

#: per-band statistics of ``objects``, one set of columns per band of the store (``mag_mean_g``, ...)
BAND_STAT_COLUMNS = (("mag_mean", pa.float64()), ("mag_std", pa.float64()), ("n_good", pa.int32()))


def band_column(stat: str, band: str) -> str:
    """The objects column of a per-band statistic: ``mag_mean_g``; band names are made identifier-safe."""
    safe = "".join(c if c.isalnum() else "_" for c in band.strip()) or "none"
    return f"{stat}_{safe}"


def objects_schema(bands: list[str], base: pa.Schema = OBJECTS) -> pa.Schema:
    """``base`` plus the per-band columns of ``bands`` (:data:`BAND_STAT_COLUMNS`), in the bands' order."""
    extra = [pa.field(band_column(s, b), t) for b in bands if b for s, t in BAND_STAT_COLUMNS]
    return pa.schema([*base, *(f for f in extra if f.name not in base.names)])

#: ``objects`` columns the classify stage fills (null / NaN / 0 until it has run)
CLASSIFY_COLUMNS = ("period", "period_power", "depth", "duration", "p_periodic", "var_class", "var_class_prob",
                    "t0_mjd", "period_bls", "period_ls", "von_neumann", "robust_rms", "iqr", "n_points_classified")
