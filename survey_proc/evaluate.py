"""Truth matching and metrics. This module starts with the truth loaders everything shares.

A simulated survey ``DIR/NAME.zarr`` has its truth in ``DIR/NAME.truth/`` (never inside
the pipeline's inputs). Always read truth through these functions so benchmarks, tests and
the CLI summary agree on what the truth is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from survey_proc import storage
from survey_proc.errors import SurveyProcError
from survey_proc.matching import DEFAULT_MATCH_RADIUS_PX, match_one_to_one
from survey_proc.simulate.variables import magnitudes_at
from survey_proc.storage import Location

TRUTH_FILES = ("stars.parquet", "lightcurves.parquet", "epochs.parquet")


@dataclass(frozen=True)
class TruthPaths:
    """Where a simulated store's truth lives: beside the store, locally or in the same bucket."""

    store: Location
    truth: Location
    reference: Location


def truth_paths(store_path: Location) -> TruthPaths:
    """Paths of the truth directory and reference catalogue that belong to a store.

    ``DIR/NAME.zarr`` has ``DIR/NAME.truth/`` and ``DIR/NAME.reference.parquet``; ``DIR`` may
    be an object-store prefix (``s3://bucket/surveys``).

    Raises
    ------
    SurveyProcError
        When the truth directory or one of its files is missing (e.g. an ingested, real survey).

    Parameters
    ----------
    store_path
        The simulated survey store (``DIR/NAME.zarr``).

    Returns
    -------
    TruthPaths
        The store, its reference catalogue and its truth directory.
    """
    base = storage.name(store_path)
    stem = base[: -len(".zarr")] if base.endswith(".zarr") else base
    where = storage.parent(store_path)
    paths = TruthPaths(store=store_path, truth=storage.join(where, f"{stem}.truth"),
                       reference=storage.join(where, f"{stem}.reference.parquet"))
    if not storage.is_dir(paths.truth):
        raise SurveyProcError(
            f"no truth for {store_path}: {paths.truth} does not exist (truth exists only for surveys made by "
            "`survey-proc simulate`)"
        )
    for name in TRUTH_FILES:
        if not storage.is_file(storage.join(paths.truth, name)):
            raise SurveyProcError(f"truth file {storage.join(paths.truth, name)} is missing; re-run "
                                  "`survey-proc simulate`")
    return paths


def _truth_table(store_path: Location, name: str, **kwargs: Any) -> pd.DataFrame:
    return storage.read_table(storage.join(truth_paths(store_path).truth, name), **kwargs).to_pandas()


def _filters(field: str | None, **extra: Any) -> list[tuple[str, str, Any]] | None:
    f: list[tuple[str, str, Any]] = [("field", "==", field)] if field is not None else []
    for k, v in extra.items():
        if v is not None:
            f.append((k, "in", list(v)))
    return f or None


def load_truth_stars(store_path: str | Path, field: str | None = None, *, in_frame_only: bool = False) -> pd.DataFrame:
    """Truth star table (``stars.parquet``), optionally one field / only stars on the detector.

    Parameters
    ----------
    store_path
        The simulated survey store (``DIR/NAME.zarr``).
    field
        Only this field; None: every field.
    in_frame_only
        Only stars whose reference position lies on the detector (``in_frame``).

    Returns
    -------
    DataFrame
        One row per star: ``star_id``, ``field``, positions (reference frame, px; ra, dec in
        deg), ``mag`` and the variability model's parameters.
    """
    df = _truth_table(store_path, "stars.parquet", filters=_filters(field))
    return df[df["in_frame"]].reset_index(drop=True) if in_frame_only else df


def load_truth_epochs(store_path: str | Path, field: str | None = None) -> pd.DataFrame:
    """Per field x epoch truth conditions (``epochs.parquet``): zeropoint, airmass, seeing, sky, ...

    Parameters
    ----------
    store_path
        The simulated survey store (``DIR/NAME.zarr``).
    field
        Only this field; None: every field.

    Returns
    -------
    DataFrame
        One row per field x epoch (``mjd`` in days, ``zeropoint`` in mag, ...).
    """
    return _truth_table(store_path, "epochs.parquet", filters=_filters(field))


def load_truth_lightcurves(
    store_path: str | Path, field: str | None = None, star_ids: list[int] | np.ndarray | None = None
) -> pd.DataFrame:
    """Exact model magnitudes of non-constant stars per epoch (``lightcurves.parquet``).

    Parameters
    ----------
    store_path
        The simulated survey store (``DIR/NAME.zarr``).
    field
        Only this field; None: every field.
    star_ids
        Only these stars; None: all.

    Returns
    -------
    DataFrame
        One row per star x epoch with the model magnitude (mag).
    """
    return _truth_table(store_path, "lightcurves.parquet", filters=_filters(field, star_id=star_ids))


def load_truth_fields(store_path: str | Path) -> pd.DataFrame:
    """Per-field pointing and reference-frame WCS (``fields.parquet``).

    Parameters
    ----------
    store_path
        The simulated survey store (``DIR/NAME.zarr``).

    Returns
    -------
    DataFrame
        One row per field.
    """
    return _truth_table(store_path, "fields.parquet")


def load_truth_summary(store_path: str | Path) -> dict[str, Any]:
    """The simulator's summary (scenario, crowding, depth, timing).

    Parameters
    ----------
    store_path
        The simulated survey store (``DIR/NAME.zarr``).

    Returns
    -------
    dict
        The parsed ``summary.json``.
    """
    return json.loads(storage.read_text(storage.join(truth_paths(store_path).truth, "summary.json")))


def load_reference_catalog(path: str | Path) -> pd.DataFrame:
    """A reference catalogue (ra, dec, mag, mag_err) with a clear error for a bad file.

    Parameters
    ----------
    path
        A Parquet file with at least ra, dec (deg), mag and mag_err (mag).

    Returns
    -------
    DataFrame
        The catalogue.

    Raises
    ------
    SurveyProcError
        When the file is missing or lacks one of those columns.
    """
    p = Path(path)
    if not p.is_file():
        raise SurveyProcError(f"reference catalogue {p} does not exist; pass --reference or re-simulate")
    df = pd.read_parquet(p)
    missing = [c for c in ("ra", "dec", "mag", "mag_err") if c not in df]
    if missing:
        raise SurveyProcError(f"reference catalogue {p} lacks column(s) {missing}; it needs ra, dec, mag, mag_err")
    return df


def truth_magnitudes(stars: pd.DataFrame, mjd: float | np.ndarray) -> np.ndarray:
    """True magnitude of every star at the given time(s), shape (n_stars, n_times).

    Uses the same variability models as the renderer, so it agrees with the pixels and with
    ``lightcurves.parquet`` at the epochs' mid-exposure times.

    Parameters
    ----------
    stars
        Truth star rows (``stars.parquet``).
    mjd
        Time or times (MJD, days).

    Returns
    -------
    ndarray
        Magnitudes (mag), shape (n_stars, n_times).
    """
    return magnitudes_at(stars, mjd)


def truth_at_epoch(store_path: str | Path, field: str, epoch: int, *, in_frame_only: bool = True) -> pd.DataFrame:
    """Truth stars of one field with their magnitude, flux (ADU) and detector position at one epoch.

    Adds columns ``mag_epoch``, ``flux_adu`` (``10**(-0.4*(mag_epoch - zeropoint))``) and
    ``x_epoch``, ``y_epoch`` (the star's position in that epoch's detector pixels, through the
    epoch WCS stored in the survey).

    Parameters
    ----------
    store_path
        The simulated survey store (``DIR/NAME.zarr``).
    field
        The field.
    epoch
        Index of the epoch.
    in_frame_only
        Only stars whose epoch position lies on the detector.

    Returns
    -------
    DataFrame
        :func:`load_truth_stars` of the field with the added columns.
    """
    from survey_proc.simulate.wcs import wcs_from_text
    from survey_proc.store import open_field

    stars = load_truth_stars(store_path, field)
    ep = load_truth_epochs(store_path, field)
    rows = ep[ep["epoch"] == epoch]
    if rows.empty:
        raise SurveyProcError(f"field {field!r} has no epoch {epoch} in the truth of {store_path}")
    row = rows.iloc[0]
    out = stars.copy()
    out["mag_epoch"] = truth_magnitudes(stars, float(row["mjd"]))[:, 0]
    out["flux_adu"] = 10.0 ** (-0.4 * (out["mag_epoch"] - float(row["zeropoint"])))
    ds = open_field(store_path, field)
    wcs = wcs_from_text(str(ds["wcs"].values[epoch]))
    if wcs is None:
        out["x_epoch"], out["y_epoch"] = np.nan, np.nan
    else:
        xe, ye = wcs.all_world2pix(out["ra"].to_numpy(), out["dec"].to_numpy(), 0)
        out["x_epoch"], out["y_epoch"] = xe, ye
    if in_frame_only:
        keep = (out["x_epoch"].between(-0.5, ds.sizes["x"] - 0.5)
                & out["y_epoch"].between(-0.5, ds.sizes["y"] - 0.5))
        out = out[keep].reset_index(drop=True)
    return out


# ------------------------------------------------------------------ matching and metrics
def detection_metrics(sources: pd.DataFrame, truth: pd.DataFrame, mag_limit: float,
                      radius_px: float = DEFAULT_MATCH_RADIUS_PX) -> dict[str, float]:
    """Recall, precision and measurement errors of one epoch's sources against its truth.

    Parameters
    ----------
    sources
        One epoch's sources (x, y epoch pixels; mag calibrated).
    truth
        :func:`truth_at_epoch` of the same epoch.
    mag_limit
        Recall counts true stars brighter than this (e.g. the 5-sigma limit).

    Returns
    -------
    dict
        ``recall`` (true stars < mag_limit matched), ``precision`` (detections matched to any
        true star), ``f1``, ``n_det``, ``n_true``, and for matched stars brighter than
        ``mag_limit - 3``: ``mag_abs_err_median`` (calibrated - true, mag), ``mag_bias``,
        ``astrom_rms_px`` (per axis).
    """
    i_d, i_t = match_one_to_one(sources["x"].to_numpy(), sources["y"].to_numpy(), truth["x_epoch"].to_numpy(),
                                truth["y_epoch"].to_numpy(), radius_px)
    bright = truth["mag_epoch"].to_numpy() < mag_limit
    matched_t = np.zeros(len(truth), bool)
    matched_t[i_t] = True
    recall = float(matched_t[bright].mean()) if bright.any() else float("nan")
    precision = float(len(i_d) / len(sources)) if len(sources) else float("nan")
    f1 = 2 * recall * precision / (recall + precision) if recall + precision > 0 else float("nan")
    sel = truth["mag_epoch"].to_numpy()[i_t] < mag_limit - 3
    dm = sources["mag"].to_numpy()[i_d][sel] - truth["mag_epoch"].to_numpy()[i_t][sel]
    dm = dm[np.isfinite(dm)]
    dx = sources["x"].to_numpy()[i_d][sel] - truth["x_epoch"].to_numpy()[i_t][sel]
    dy = sources["y"].to_numpy()[i_d][sel] - truth["y_epoch"].to_numpy()[i_t][sel]
    return {"recall": recall, "precision": precision, "f1": f1, "n_det": len(sources),
            "n_true": int(bright.sum()), "n_matched": len(i_d),
            "mag_abs_err_median": float(np.median(np.abs(dm))) if len(dm) else float("nan"),
            "mag_bias": float(np.median(dm)) if len(dm) else float("nan"),
            "astrom_rms_px": float(np.sqrt(0.5 * np.mean(dx**2 + dy**2))) if len(dx) else float("nan")}


def evaluate_run(out: str | Path, store_path: str | Path, n_sample_epochs: int = 10) -> dict[str, Any]:
    """Compare a run's outputs with the truth of its simulated store.

    Returns per field: zero points against truth (all calibrated epochs), and detection
    metrics averaged over up to ``n_sample_epochs`` evenly spaced epochs.

    Parameters
    ----------
    out
        The run's output directory.
    store_path
        The simulated store it processed.
    n_sample_epochs
        Epochs per field whose sources are matched to the truth.

    Returns
    -------
    dict
        ``mag_limit``, ``match_radius_px`` and per field the zero-point differences
        (``zp_minus_truth_*``, mag), the sampled epochs and the mean
        :func:`detection_metrics`.
    """
    from survey_proc.outputs import OutputLayout

    layout = OutputLayout(out)
    summary = load_truth_summary(store_path)
    mag_limit = float(summary["limiting_mag_5sigma_psf_crlb"])
    epochs = storage.read_table(layout.epochs_table).to_pandas()
    truth_ep = load_truth_epochs(store_path)
    result: dict[str, Any] = {"mag_limit": mag_limit, "match_radius_px": DEFAULT_MATCH_RADIUS_PX, "fields": {}}
    for fid, ep in epochs.groupby("field"):
        t = truth_ep[truth_ep["field"] == fid].set_index("epoch")
        ep = ep.set_index("epoch")
        dzp = (ep["zp"] - t["zeropoint"].reindex(ep.index)).dropna()
        sample = ep.index.to_numpy()[np.unique(np.linspace(0, len(ep) - 1, min(n_sample_epochs, len(ep))).astype(int))]
        per = []
        for e in sample:
            src = storage.read_table(layout.sources(str(fid), int(e))).to_pandas()
            per.append(detection_metrics(src, truth_at_epoch(store_path, str(fid), int(e)), mag_limit))
        m = pd.DataFrame(per)
        result["fields"][str(fid)] = {
            "zp_minus_truth_rms": float(np.sqrt(np.mean(dzp**2))) if len(dzp) else None,
            "zp_minus_truth_max_abs": float(np.max(np.abs(dzp))) if len(dzp) else None,
            "zp_minus_truth_median": float(np.median(dzp)) if len(dzp) else None,
            "sample_epochs": [int(e) for e in sample],
            **{k: float(m[k].mean()) for k in m.columns},
        }
    return result


# ------------------------------------------------------------------ metrics on matched catalogues
def match_radius_px(fwhm_px: float, factor: float = 0.5, min_px: float = 1.0) -> float:
    """A match radius in PSF units: ``max(factor x FWHM, min_px)`` pixels.

    Parameters
    ----------
    fwhm_px
        The PSF FWHM (px).
    factor
        Radius in FWHM.
    min_px
        Smallest radius (px).

    Returns
    -------
    float
        The radius (px).
    """
    return max(factor * fwhm_px, min_px)


def nmad(x: np.ndarray) -> float:
    """Normalised median absolute deviation ``1.4826 median(|x - median(x)|)`` (NaN if empty).

    Parameters
    ----------
    x
        Values (non-finite ones are ignored).

    Returns
    -------
    float
        The NMAD, in the unit of ``x``.
    """
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if len(x) else float("nan")


def error_stats(delta: np.ndarray, outlier_nmad: float = 3.0) -> dict[str, float]:
    """Bias (median), RMS, NMAD and outlier fraction of errors ``delta``.

    An outlier lies more than ``outlier_nmad`` NMADs from the median (a robust analogue of
    a 3-sigma outlier; with Gaussian errors 0.27 % are outliers).

    Parameters
    ----------
    delta
        Errors, measured - true (non-finite ones are ignored).
    outlier_nmad
        Outlier threshold in NMADs.

    Returns
    -------
    dict
        ``n``, ``bias``, ``rms``, ``nmad`` (unit of ``delta``) and ``outlier_frac``.
    """
    d = np.asarray(delta, float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return {"n": 0, "bias": float("nan"), "rms": float("nan"), "nmad": float("nan"), "outlier_frac": float("nan")}
    s = nmad(d)
    med = float(np.median(d))
    return {"n": len(d), "bias": med, "rms": float(np.sqrt(np.mean(d**2))), "nmad": s,
            "outlier_frac": float(np.mean(np.abs(d - med) > outlier_nmad * s)) if s > 0 else 0.0}


def median_abs_error_at_bound(sigma: np.ndarray) -> float:
    """The median |error| that unbiased Gaussian estimates at the given per-star bounds would give.

    The median of the pooled |Δ| over stars whose errors are N(0, σ_i²): the value ``m`` with
    ``mean_i erf(m / (σ_i √2)) = 1/2`` (the population median of the mixture of half-normals,
    so no random draws). With one σ for every star it is 0.6745 σ. Used to state the floor
    under a "median |Δmag|" criterion: no method reaches below it on those stars.

    Parameters
    ----------
    sigma
        Per-star standard deviations (for instance the Cramér-Rao bound in mag); non-finite
        or non-positive ones are ignored.

    Returns
    -------
    float
        The median |error|, in the unit of ``sigma`` (NaN if none is usable).
    """
    from scipy.optimize import brentq
    from scipy.special import erf

    s = np.asarray(sigma, float)
    s = s[np.isfinite(s) & (s > 0)]
    if len(s) == 0:
        return float("nan")
    return float(brentq(lambda m: float(np.mean(erf(m / (s * np.sqrt(2.0))))) - 0.5, 0.0, 10.0 * float(s.max())))


def per_bin(values: np.ndarray, key: np.ndarray, edges: np.ndarray, fn) -> list[dict[str, Any]]:
    """Apply ``fn(values[in bin])`` per bin of ``key``; returns one dict per bin with its edges.

    Parameters
    ----------
    values
        Values to summarise.
    key
        The binning variable, one per value.
    edges
        Bin edges of ``key`` (bins ``[edges[i], edges[i + 1])``).
    fn
        Summary of one bin's values, returning a dict (e.g. :func:`error_stats`).

    Returns
    -------
    list of dict
        Per bin ``lo``, ``hi`` and ``fn``'s entries.
    """
    out = []
    idx = np.digitize(key, edges) - 1
    for b in range(len(edges) - 1):
        sel = idx == b
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), **fn(values[sel])})
    return out


def average_precision(confidence: np.ndarray, is_true: np.ndarray, n_truth: int) -> dict[str, Any]:
    """Precision-recall curve over the confidence threshold and its area (all-point AP).

    Parameters
    ----------
    confidence
        Confidence of every detection.
    is_true
        Whether each detection matched a true star.
    n_truth
        Number of true stars that could be found (the recall denominator).

    Returns
    -------
    dict
        ``ap`` (area under the interpolated precision-recall curve), and per detection in
        order of decreasing confidence ``recall``, ``precision`` and ``threshold``.
    """
    order = np.argsort(-np.asarray(confidence, float), kind="stable")
    tp = np.cumsum(np.asarray(is_true, bool)[order])
    fp = np.cumsum(~np.asarray(is_true, bool)[order])
    recall = tp / max(n_truth, 1)
    precision = tp / np.maximum(tp + fp, 1)
    # all-point interpolation: precision envelope (max precision at recall >= r)
    env = np.maximum.accumulate(precision[::-1])[::-1]
    r = np.r_[0.0, recall]
    ap = float(np.sum((r[1:] - r[:-1]) * env))
    return {"ap": ap, "recall": recall, "precision": precision, "threshold": np.asarray(confidence, float)[order]}


def z_score_calibration(delta: np.ndarray, sigma: np.ndarray, n_levels: int = 99) -> dict[str, Any]:
    """How honest quoted errors are: z-scores, interval coverage and the miscalibration area.

    ``z = delta / sigma``. For each confidence level ``p`` the observed fraction of
    ``|z| <= Phi^-1((1 + p) / 2)`` is compared with ``p`` (the average-calibration curve of
    PNet's Fig. 9); the miscalibration area is the mean ``|observed - p|`` over ``p`` in
    (0, 1) (0: perfect; 0.5: useless).

    Parameters
    ----------
    delta
        Errors, measured - true.
    sigma
        Quoted uncertainties (same unit); pairs with a non-finite or non-positive ``sigma`` are ignored.
    n_levels
        Confidence levels ``p`` evaluated, evenly spaced in (0, 1).

    Returns
    -------
    dict
        ``n``, ``z_mean``, ``z_std``, ``z_nmad``, ``coverage_68``, ``coverage_95``,
        ``miscalibration_area``, and the curve: ``levels`` (p) and ``observed``.
    """
    from scipy.stats import norm

    d = np.asarray(delta, float)
    s = np.asarray(sigma, float)
    ok = np.isfinite(d) & np.isfinite(s) & (s > 0)
    z = d[ok] / s[ok]
    p = (np.arange(n_levels) + 1) / (n_levels + 1)
    half = norm.ppf(0.5 + p / 2)
    observed = np.array([np.mean(np.abs(z) <= h) for h in half]) if len(z) else np.full(n_levels, np.nan)
    return {"n": len(z), "z_mean": float(np.mean(z)) if len(z) else float("nan"),
            "z_std": float(np.std(z)) if len(z) else float("nan"), "z_nmad": nmad(z),
            "coverage_68": float(np.mean(np.abs(z) <= 1.0)) if len(z) else float("nan"),
            "coverage_95": float(np.mean(np.abs(z) <= 1.959964)) if len(z) else float("nan"),
            "miscalibration_area": float(np.mean(np.abs(observed - p))), "levels": p, "observed": observed}


def classification_metrics(true_class: np.ndarray, pred_class: np.ndarray,
                           classes: list[str] | None = None) -> dict[str, Any]:
    """Per-class precision and recall and the confusion matrix (rows: truth, columns: predicted).

    Parameters
    ----------
    true_class, pred_class
        Class names, one per object.
    classes
        The classes, in the order of the matrix; None: every class present, sorted.

    Returns
    -------
    dict
        ``classes``, ``per_class`` (``precision``, ``recall``, ``n_true`` per class) and
        ``confusion`` (nested lists of counts).
    """
    t = np.asarray(true_class, dtype=object)
    pr = np.asarray(pred_class, dtype=object)
    classes = classes or sorted(set(t) | set(pr))
    conf = pd.crosstab(pd.Categorical(t, classes), pd.Categorical(pr, classes), dropna=False)
    pred_totals, true_totals = conf.sum(axis=0), conf.sum(axis=1)  # per predicted / per true class
    per = {}
    for c in classes:
        tp = float(conf[c].loc[c])
        n_pred, n_true = pred_totals.loc[c], true_totals.loc[c]
        per[c] = {"precision": tp / n_pred if n_pred else float("nan"),
                  "recall": tp / n_true if n_true else float("nan"),
                  "n_true": int(n_true)}
    return {"classes": classes, "per_class": per, "confusion": conf.to_numpy().tolist()}


def period_recovered(p_found: np.ndarray, p_true: np.ndarray, rel_tol: float = 0.01,
                     harmonics: tuple[float, ...] = (1.0, 0.5, 2.0)) -> np.ndarray:
    """Whether each found period matches the true one (or a listed harmonic) within ``rel_tol``.

    Eclipsing binaries are often found at half their period; pass ``harmonics=(1.0,)`` to
    require the exact period.

    Parameters
    ----------
    p_found, p_true
        Found and true periods (days), one per object.
    rel_tol
        Relative tolerance.
    harmonics
        Multiples of the true period that count as recovered.

    Returns
    -------
    ndarray of bool
        One per object.
    """
    pf = np.asarray(p_found, float)[:, None]
    pt = np.asarray(p_true, float)[:, None] * np.asarray(harmonics)[None, :]
    return np.any(np.abs(pf - pt) <= rel_tol * pt, axis=1)


def lightcurve_completeness(objects: pd.DataFrame, stars: pd.DataFrame, mag_limit: float, n_epochs: int,
                            radius_px: float = DEFAULT_MATCH_RADIUS_PX) -> dict[str, Any]:
    """How many true stars got a light curve, and how full the light curves are.

    Parameters
    ----------
    objects
        ``objects`` rows: x, y (reference frame), n_epochs.
    stars
        Truth ``stars.parquet`` rows of the same field: x, y (reference frame), mag; only
        ``in_frame`` stars are counted when that column exists.
    mag_limit
        Completeness counts true stars brighter than this (mean magnitude).
    n_epochs
        Epochs processed (a full light curve has this many points).

    Returns
    -------
    dict
        ``completeness`` (bright true stars with an object), ``n_true``, ``n_objects``,
        ``object_purity`` (objects matched to a true star) and ``points_fraction_median``
        (median fraction of the epochs in a matched bright star's light curve).
    """
    if "in_frame" in stars.columns:
        stars = stars[stars["in_frame"]]
    i_o, i_s = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), stars["x"].to_numpy(),
                                stars["y"].to_numpy(), radius_px)
    bright = stars["mag"].to_numpy() < mag_limit
    has = np.zeros(len(stars), bool)
    has[i_s] = True
    frac = objects["n_epochs"].to_numpy()[i_o] / max(n_epochs, 1)
    sel = bright[i_s]
    return {"completeness": float(has[bright].mean()) if bright.any() else float("nan"),
            "n_true": int(bright.sum()), "n_objects": len(objects),
            "object_purity": float(len(i_o) / len(objects)) if len(objects) else float("nan"),
            "points_fraction_median": float(np.median(frac[sel])) if sel.any() else float("nan")}
