"""Shared fixtures: small simulated surveys (seconds each), written to real Zarr on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.simulate.scenario import Scenario
from survey_proc.simulate.wcs import reference_wcs

# An empty, artefact-free detector: planted stars are isolated and measurable.
CLEAN = {
    "star_density_per_px2": 0.0,
    "n_bad_columns": 0,
    "cosmic_rate_per_px_s": 0.0,
    "psf_oversample": 5,
    "stamp_radius_px": 6,
}


def planted_stars(scn: Scenario, rows: list[dict], field_index: int = 0) -> pd.DataFrame:
    """A star table in ``make_stars`` format from a few dicts (x, y, mag, var_class, params)."""
    cols = ["period", "amplitude", "t0", "depth", "duration", "secondary_ratio", "ellipsoidal",
            "ingress_frac", "rise_days", "decay_days", "trend_mag_per_day", "trend_mag_per_day2"]
    df = pd.DataFrame([{c: np.nan for c in cols} | {"var_class": "constant"} | r for r in rows])
    wcs = reference_wcs(scn, field_index)
    ra, dec = wcs.all_pix2world(df["x"].to_numpy(), df["y"].to_numpy(), 0)
    df["ra"], df["dec"] = ra, dec
    df["field"] = f"F{field_index:03d}"
    df["star_id"] = np.arange(len(df), dtype="int64") + (field_index << 32)
    return df


def aperture_flux(image: np.ndarray, x: float, y: float, radius_px: float, sky: float) -> tuple[float, int]:
    """Sum of (image - sky) within a circular aperture; returns (flux ADU, pixel count)."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    sel = (xx - x) ** 2 + (yy - y) ** 2 <= radius_px**2
    return float(np.sum(image[sel] - sky)), int(sel.sum())


@pytest.fixture(scope="session")
def grid_survey(tmp_path_factory) -> dict:
    """Isolated constant stars on a grid, Moffat PSF, 6 epochs, no artefacts."""
    out = tmp_path_factory.mktemp("grid") / "grid.zarr"
    scn = load_scenario("dense", {**CLEAN, "size_px": 160, "n_epochs": 6, "psf_fwhm_px": 2.5,
                                  "jitter_px": 0.7, "seed": 11})
    rng = np.random.default_rng(5)
    rows = [{"x": 20 + 40 * i + rng.uniform(-0.5, 0.5), "y": 20 + 40 * j + rng.uniform(-0.5, 0.5),
             "mag": 19.0 + 0.5 * ((i + j) % 4)} for i in range(4) for j in range(4)]
    stars = planted_stars(scn, rows)
    summary = simulate_survey(scn, out, workers=0, stars=stars, progress=False)
    return {"store": out, "scn": scn, "stars": stars, "summary": summary}


@pytest.fixture(scope="session")
def dense_small(tmp_path_factory) -> dict:
    """A small crowded field with every artefact switched on (default dense scenario)."""
    out = tmp_path_factory.mktemp("dense") / "dense.zarr"
    scn = load_scenario("dense", {"size_px": 256, "n_epochs": 4, "seed": 3, "psf_oversample": 7})
    summary = simulate_survey(scn, out, workers=0, progress=False)
    return {"store": out, "scn": scn, "summary": summary}


def store_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a directory tree, relative path -> bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster of 2 worker processes, shared by the pipeline tests of one session."""
    from survey_proc.distributed.cluster import local_client

    with local_client(2, quiet=True) as c:
        yield c


def run_config(store: Path, out: Path, **overrides):
    """A quiet RunConfig for tests (no truth evaluation, no progress bars; sep and aperture
    photometry unless ``detector`` / ``bpnn`` are given)."""
    from survey_proc.config import load_config

    return load_config(None, {"store": str(store), "out": str(out), "progress": False, "evaluate": False,
                              "detector": "sep", "bpnn": {"enabled": False}, **overrides})


@pytest.fixture(scope="session")
def border_survey(tmp_path_factory) -> dict:
    """Bright isolated stars on and across the borders of 128-px tiles (and 128-px regions), 3 epochs."""
    out = tmp_path_factory.mktemp("border") / "border.zarr"
    scn = load_scenario("dense", {**CLEAN, "size_px": 256, "n_epochs": 3, "psf_fwhm_px": 2.0, "jitter_px": 0.3,
                                  "seed": 17})
    rows = []
    b = 127.5  # the coordinate of the border between pixel 127 and pixel 128
    offsets = np.arange(-3.0, 3.01, 0.5)
    for k, d in enumerate(offsets):  # sweep across the vertical border, and across the horizontal one
        rows.append({"x": b + d, "y": 10.0 + 9.0 * k, "mag": 19.5})
        rows.append({"x": 140.0 + 9.0 * k, "y": b + d, "mag": 19.5})
    rows.append({"x": b, "y": b, "mag": 19.0})  # exactly on the corner of four tiles
    rows.append({"x": b, "y": 230.0, "mag": 19.0})  # exactly on a border
    stars = planted_stars(scn, rows)
    simulate_survey(scn, out, workers=0, stars=stars, progress=False)
    return {"store": out, "scn": scn, "stars": stars}


@pytest.fixture(scope="session")
def field_survey(tmp_path_factory) -> dict:
    """A moderately populated field with a reference catalogue, variables and every artefact, 8 epochs."""
    out = tmp_path_factory.mktemp("field") / "field.zarr"
    scn = load_scenario("dense", {"size_px": 384, "n_epochs": 8, "seed": 21, "psf_oversample": 5,
                                  "star_density_per_px2": 0.01, "psf_fwhm_px": 2.2})
    summary = simulate_survey(scn, out, workers=0, progress=False)
    return {"store": out, "scn": scn, "summary": summary}


@pytest.fixture(scope="session")
def field_run(field_survey, client, tmp_path_factory) -> dict:
    """The default pipeline (sep) on ``field_survey`` (128-px tiles, 192-px regions); read-only for the tests."""
    from survey_proc.distributed.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("field-out") / "out"
    cfg = run_config(field_survey["store"], out, tile_px=128, halo_px=24, crossmatch={"region_px": 192})
    run = run_pipeline(cfg, client=client)
    return {"out": out, "run": run, "cfg": cfg, **field_survey}
