"""Bands through the pipeline: calibration per band, a band column in sources and light curves,
objects with per-band means; bands are never mixed in one zero point or one mean."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from survey_proc import vocab as F
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.simulate import load_scenario, simulate_survey
from tests.conftest import CLEAN, planted_stars, run_config

R_FLUX_RATIO = 0.5  # the r epochs see every star (and the sky) at half the g flux: +0.753 mag


@pytest.fixture(scope="module")
def two_band_survey(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bands") / "bands.zarr"
    scn = load_scenario("dense", {**CLEAN, "size_px": 192, "n_epochs": 6, "psf_fwhm_px": 2.5, "jitter_px": 0.5,
                                  "seed": 31})
    rng = np.random.default_rng(8)
    rows = [{"x": 16 + 32 * i + rng.uniform(-0.5, 0.5), "y": 16 + 32 * j + rng.uniform(-0.5, 0.5),
             "mag": 18.0 + 0.4 * ((i + 2 * j) % 6)} for i in range(6) for j in range(6)]
    stars = planted_stars(scn, rows)
    simulate_survey(scn, out, workers=0, stars=stars, progress=False)
    g = zarr.open_group(str(out / "fields" / "F000"), mode="r+")
    g["band"][:] = np.array(["g", "r"] * 3, dtype=object)
    for e in (1, 3, 5):
        g["image"][e] = g["image"][e] * np.float32(R_FLUX_RATIO)
    return {"store": out, "stars": stars}


def _read(path) -> pd.DataFrame:
    return pd.read_parquet(path)


def test_each_band_is_calibrated_alone_and_objects_carry_per_band_means(two_band_survey, client, tmp_path):
    out = tmp_path / "out"
    run = run_pipeline(run_config(two_band_survey["store"], out, tile_px=192, halo_px=16,
                                  crossmatch={"region_px": 192, "min_epochs": 3}), client=client)
    assert run["status"] == "complete"
    src = _read(out / "sources")
    assert (src.groupby("epoch")["band"].first() == pd.Series(["g", "r"] * 3, index=range(6))).all()
    info = run["zeropoints"]["F000"]["bands"]
    assert set(info) == {"g", "r"}
    assert info["g"]["reference_epoch"] in (0, 2, 4) and info["r"]["reference_epoch"] in (1, 3, 5)
    # the simulator's reference catalogue has one 'mag' column: it cannot calibrate two bands
    for b in ("g", "r"):
        assert info[b]["absolute"]["why"].startswith(f"the reference catalogue has no mag_{b} column")
        assert info[b]["level"]["absolute"] is False
    assert ((src["flags"] & F.ZP_RELATIVE) != 0).all()
    lc = _read(out / "lightcurves")
    assert set(lc["band"]) == {"g", "r"}
    obj = _read(out / "objects")
    bright = obj[obj["n_good_g"].eq(3) & obj["n_good_r"].eq(3)]
    assert len(bright) >= 30
    # bands are not mixed: both means exist, they differ by the flux ratio, and each band's own
    # light curve is constant (chi2 about the primary band's mean)
    assert (bright["mag_mean_r"] - bright["mag_mean_g"]).median() == pytest.approx(-2.5 * np.log10(R_FLUX_RATIO),
                                                                                   abs=0.02)
    assert (bright["band"] == "g").all()  # a tie in points goes to the store's first band
    assert bright["mag_mean"].to_numpy() == pytest.approx(bright["mag_mean_g"].to_numpy())
    assert bright["chi2_const"].median() < 5


def test_a_reference_with_a_column_per_band_calibrates_each_band(two_band_survey, client, tmp_path):
    store = two_band_survey["store"]
    ref = pd.read_parquet(str(store).replace(".zarr", ".reference.parquet"))
    ref = ref.assign(mag_g=ref["mag"], mag_err_g=ref["mag_err"], mag_r=ref["mag"] + 1.0, mag_err_r=ref["mag_err"])
    path = tmp_path / "ref_gr.parquet"
    ref.to_parquet(path)
    out = tmp_path / "out"
    run = run_pipeline(run_config(store, out, tile_px=192, halo_px=16, reference=str(path),
                                  crossmatch={"region_px": 192, "min_epochs": 3}), client=client)
    assert run["status"] == "complete"
    info = run["zeropoints"]["F000"]["bands"]
    for b in ("g", "r"):
        assert info[b]["level"]["absolute"] and info[b]["absolute"]["status"] == "fit"
    obj = _read(out / "objects")
    bright = obj[obj["n_good_g"].eq(3) & obj["n_good_r"].eq(3)]
    # each band lands on its own catalogue column: r = g + 1 in the catalogue
    assert (bright["mag_mean_r"] - bright["mag_mean_g"]).median() == pytest.approx(1.0, abs=0.02)
    assert not (_read(out / "sources")["flags"] & F.ZP_RELATIVE).any()
