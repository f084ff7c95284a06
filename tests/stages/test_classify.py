"""The classify stage in a real pipeline run: objects gain classes and periods; it resumes on its own."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.lightcurves.classifier import CLASSES
from survey_proc.outputs import OutputLayout, read_meta
from survey_proc.simulate import load_scenario, simulate_survey
from tests.conftest import CLEAN, planted_stars, run_config


@pytest.fixture(scope="module")
def variable_survey(tmp_path_factory) -> dict:
    """Six bright isolated stars (an eclipsing binary, a pulsator, four constant) over 0.55 d, 40 epochs."""
    out = tmp_path_factory.mktemp("variables") / "var.zarr"
    scn = load_scenario("dense", {**CLEAN, "size_px": 96, "n_epochs": 40, "cadence_s": 1200.0, "psf_fwhm_px": 2.0,
                                  "jitter_px": 0.3, "seed": 23})
    rows = [{"x": 20.0, "y": 20.0, "mag": 19.0, "var_class": "eclipsing_binary", "period": 0.3, "t0": 61000.05,
             "depth": 0.5, "duration": 0.04, "secondary_ratio": 0.3, "ellipsoidal": 0.0},
            {"x": 70.0, "y": 25.0, "mag": 19.0, "var_class": "pulsator", "period": 0.4, "t0": 61000.1,
             "amplitude": 0.6}]
    rows += [{"x": 15.0 + 22 * i, "y": 70.0, "mag": 19.5} for i in range(4)]
    stars = planted_stars(scn, rows)
    simulate_survey(scn, out, workers=0, stars=stars, progress=False)
    return {"store": out, "stars": stars}


def test_classify_stage_fills_objects_and_resumes_alone(variable_survey, client, tmp_path):
    out = tmp_path / "out"
    cfg = run_config(variable_survey["store"], out, tile_px=96, halo_px=16, reference="none",
                     crossmatch={"region_px": 96, "min_epochs": 10}, classify={"min_points": 10})
    run = run_pipeline(cfg, client=client)
    obj = pd.read_parquet(out / "objects")
    assert len(obj) == 6
    done = obj["n_points_classified"] >= 10
    assert done.sum() == 6 == run["counts"]["objects_classified"]
    assert obj["var_class"].isin(CLASSES).all() and obj["p_periodic"].between(0, 1).all()
    assert (obj["period"] > 0.25 * 0.99).all() and (obj["period"] < 0.55 / 1.15 * 1.01).all()
    eb = obj.iloc[np.argmin(np.hypot(obj["x"] - 20, obj["y"] - 20))]
    assert min(abs(eb["period_bls"] / 0.3 - 1), abs(eb["period_bls"] / 0.15 - 1)) < 0.05
    puls = obj.iloc[np.argmin(np.hypot(obj["x"] - 70, obj["y"] - 25))]
    assert abs(puls["period_ls"] / 0.4 - 1) < 0.1
    const = obj[obj["y"] > 60]
    assert (const["robust_rms"] < 0.1 * puls["robust_rms"]).all()
    assert (const["mag_std"] < 0.5 * eb["mag_std"]).all()
    meta = read_meta(OutputLayout(out).objects("F000", 0))
    assert meta["classify_fingerprint"] == run["classify_fingerprint"] and meta["classify"]["n_classified"] == 6
    # a new threshold re-runs only the classify stage
    cfg2 = run_config(variable_survey["store"], out, tile_px=96, halo_px=16, reference="none",
                      crossmatch={"region_px": 96, "min_epochs": 10}, classify={"min_points": 10, "threshold": 0.97})
    run2 = run_pipeline(cfg2, client=client)
    assert run2["fingerprint"] == run["fingerprint"] and run2["classify_fingerprint"] != run["classify_fingerprint"]
    assert run2["counts"]["epochs_skipped_resume"] == 40 and run2["counts"]["regions_skipped_resume"] == 1
    assert run2["counts"]["classify_regions_skipped_resume"] == 0
    obj2 = pd.read_parquet(out / "objects")
    pd.testing.assert_series_equal(obj2["period_bls"], obj["period_bls"])
    assert (obj2["p_periodic"] >= 0.97).sum() == obj2["var_class"].isin(("eclipsing_binary", "pulsator",
                                                                          "transit")).sum()
    assert json.loads((out / "run.json").read_text())["counts"]["objects_classified"] == 6


def test_short_surveys_are_not_searched_and_a_missing_region_is_named(border_survey, client, tmp_path):
    from survey_proc.errors import SurveyProcError
    from survey_proc.stages.classify import classify_region_task

    out = tmp_path / "out"
    cfg = run_config(border_survey["store"], out, tile_px=128, halo_px=16, crossmatch={"region_px": 128,
                                                                                        "min_epochs": 2})
    run = run_pipeline(cfg, client=client)
    assert run["status"] == "complete" and run["counts"]["objects_classified"] == 0
    meta = read_meta(OutputLayout(out).objects("F000", 0))
    assert "no light curve with 20 points" in meta["classify"]["not_searched"]
    assert pd.read_parquet(out / "objects")["var_class"].isna().all()
    with pytest.raises(SurveyProcError, match=r"objects/field=F000/region=9\.parquet: missing or unreadable"):
        classify_region_task(str(out), "F000", 9, json.dumps(cfg.to_dict()), "x")
