"""Truth matching and metrics. This module starts with the loaders every stage shares.

A simulated survey ``DIR/NAME.zarr`` has its truth in ``DIR/NAME.truth/`` (never inside
the pipeline's inputs). Always read truth through these functions so benchmarks, tests and
the CLI summary agree on what the truth is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from survey_proc.errors import SurveyProcError
from survey_proc.simulate.survey import SurveyPaths
from survey_proc.simulate.variables import magnitudes_at

TRUTH_FILES = ("stars.parquet", "lightcurves.parquet", "epochs.parquet")


def truth_paths(store_path: str | Path) -> SurveyPaths:
    """Paths of the truth directory and reference catalogue that belong to a store.

    Raises
    ------
    SurveyProcError
        When the truth directory or one of its files is missing (e.g. an ingested, real survey).
    """
    paths = SurveyPaths.for_store(store_path)
    if not paths.truth.is_dir():
        raise SurveyProcError(
            f"no truth for {store_path}: {paths.truth} does not exist (truth exists only for surveys made by "
            "`survey-proc simulate`)"
        )
    for name in TRUTH_FILES:
        if not (paths.truth / name).is_file():
            raise SurveyProcError(f"truth file {paths.truth / name} is missing; re-run `survey-proc simulate`")
    return paths


def _filters(field: str | None, **extra: Any) -> list[tuple] | None:
    f = [("field", "==", field)] if field is not None else []
    for k, v in extra.items():
        if v is not None:
            f.append((k, "in", list(v)))
    return f or None


def load_truth_stars(store_path: str | Path, field: str | None = None, *, in_frame_only: bool = False) -> pd.DataFrame:
    """Truth star table (``stars.parquet``), optionally one field / only stars on the detector."""
    df = pd.read_parquet(truth_paths(store_path).truth / "stars.parquet", filters=_filters(field))
    return df[df["in_frame"]].reset_index(drop=True) if in_frame_only else df


def load_truth_epochs(store_path: str | Path, field: str | None = None) -> pd.DataFrame:
    """Per field x epoch truth conditions (``epochs.parquet``): zeropoint, airmass, seeing, sky, ..."""
    return pd.read_parquet(truth_paths(store_path).truth / "epochs.parquet", filters=_filters(field))


def load_truth_lightcurves(
    store_path: str | Path, field: str | None = None, star_ids: list[int] | np.ndarray | None = None
) -> pd.DataFrame:
    """Exact model magnitudes of non-constant stars per epoch (``lightcurves.parquet``)."""
    return pd.read_parquet(truth_paths(store_path).truth / "lightcurves.parquet",
                           filters=_filters(field, star_id=star_ids))


def load_truth_fields(store_path: str | Path) -> pd.DataFrame:
    """Per-field pointing and reference-frame WCS (``fields.parquet``)."""
    return pd.read_parquet(truth_paths(store_path).truth / "fields.parquet")


def load_truth_summary(store_path: str | Path) -> dict[str, Any]:
    """The simulator's summary (scenario, crowding, depth, timing)."""
    return json.loads((truth_paths(store_path).truth / "summary.json").read_text())


def load_reference_catalog(path: str | Path) -> pd.DataFrame:
    """A reference catalogue (ra, dec, mag, mag_err) with a clear error for a bad file."""
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
    """
    return magnitudes_at(stars, mjd)


def truth_at_epoch(store_path: str | Path, field: str, epoch: int, *, in_frame_only: bool = True) -> pd.DataFrame:
    """Truth stars of one field with their magnitude, flux (ADU) and detector position at one epoch.

    Adds columns ``mag_epoch``, ``flux_adu`` (``10**(-0.4*(mag_epoch - zeropoint))``) and
    ``x_epoch``, ``y_epoch`` (the star's position in that epoch's detector pixels, through the
    epoch WCS stored in the survey).
    """
    from survey_proc.simulate.wcs import wcs_from_text
    from survey_proc.store import open_field

    stars = load_truth_stars(store_path, field)
    ep = load_truth_epochs(store_path, field)
    row = ep[ep["epoch"] == epoch]
    if row.empty:
        raise SurveyProcError(f"field {field!r} has no epoch {epoch} in the truth of {store_path}")
    row = row.iloc[0]
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
