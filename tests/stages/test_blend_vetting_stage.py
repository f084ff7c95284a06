"""Issue 22: the classify stage vets its periodic calls for blends (where the varying light is, from the pixels)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.outputs import OutputLayout, read_meta
from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.stages.blend_io import cut_stamps, is_blend, zp_scale
from survey_proc.vocab import BLENDED_VARIABLE, PERIODIC_CLASSES
from tests.conftest import CLEAN, planted_stars, run_config

BLEND_COLS = ["blend_dx_px", "blend_dy_px", "blend_offset_px", "blend_offset_sigma_px"]


@pytest.fixture(scope="module")
def blend_survey(tmp_path_factory) -> dict:
    """A faint pulsator 1.5 px from a brighter constant star (never an object of its own), an isolated pulsator
    and five constant stars; 60 epochs over 0.83 d."""
    out = tmp_path_factory.mktemp("blend") / "blend.zarr"
    scn = load_scenario("dense", {**CLEAN, "size_px": 96, "n_epochs": 60, "cadence_s": 1200.0, "psf_fwhm_px": 2.0,
                                  "jitter_px": 0.3, "seed": 31})
    rows = [{"x": 25.0, "y": 25.0, "mag": 18.5},
            {"x": 26.5, "y": 25.0, "mag": 19.5, "var_class": "pulsator", "period": 0.3, "t0": 61000.1,
             "amplitude": 0.8},
            {"x": 70.0, "y": 25.0, "mag": 19.0, "var_class": "pulsator", "period": 0.4, "t0": 61000.1,
             "amplitude": 0.6}]
    rows += [{"x": 12.0 + 18 * i, "y": 70.0 + 8 * (i % 2), "mag": 19.0} for i in range(5)]
    stars = planted_stars(scn, rows)
    simulate_survey(scn, out, workers=0, stars=stars, progress=False)
    return {"store": out, "stars": stars}


def _cfg(survey: dict, out, **classify):
    # the shipped threshold calls neither 60-epoch toy variable periodic (as in test_classify.py): 0.04 calls both
    # (p_periodic 0.057 for the blend, 0.071 for the isolated pulsator, 0.026 for the constant stars)
    return run_config(survey["store"], out, tile_px=96, halo_px=16, reference="none",
                      crossmatch={"region_px": 96, "min_epochs": 10},
                      classify={"min_points": 10, "threshold": 0.04, "blend_n_boot": 30, **classify})


def test_a_blended_periodic_call_is_flagged_and_an_isolated_one_is_not(blend_survey, client, tmp_path):
    out = tmp_path / "out"
    run = run_pipeline(_cfg(blend_survey, out), client=client)
    obj = pd.read_parquet(out / "objects")
    assert len(obj) == 7  # the faint pulsator has no object of its own
    blend = obj.iloc[np.argmin(np.hypot(obj["x"] - 25.0, obj["y"] - 25.0))]
    iso = obj.iloc[np.argmin(np.hypot(obj["x"] - 70.0, obj["y"] - 25.0))]
    assert blend["var_class"] == BLENDED_VARIABLE, "the blend must be called periodic, then flagged"
    assert np.isfinite(blend["period"]) and blend["p_periodic"] > 0.04  # the signal is real: period kept
    # the varying light: ~1.5 px from the constant star, toward the pulsator (x + 1.5), on it within 0.3 px
    assert 1.0 < blend["blend_offset_px"] < 2.0 and blend["blend_dx_px"] > 1.0 and abs(blend["blend_dy_px"]) < 0.3
    assert np.hypot(blend["x"] + blend["blend_dx_px"] - 26.5, blend["y"] + blend["blend_dy_px"] - 25.0) < 0.3
    assert blend["blend_offset_px"] > 5 * blend["blend_offset_sigma_px"] and not blend["blend_at_bound"]
    assert iso["var_class"] in PERIODIC_CLASSES and iso["blend_offset_px"] < 0.5
    assert np.isfinite(iso[BLEND_COLS].to_numpy(float)).all() and pd.isna(iso["blend_reason"])
    # objects that are not periodic calls are not vetted: NaN, null reason
    rest = obj[~obj["object_id"].isin([blend["object_id"], iso["object_id"]])]
    assert rest[BLEND_COLS].isna().all().all() and rest["blend_reason"].isna().all()
    meta = read_meta(OutputLayout(out).objects("F000", 0))
    assert meta is not None and meta["classify"]["n_blended"] == 1
    assert meta["classify"]["blend"]["n_candidates"] == 2 and meta["classify"]["blend"]["n_vetted"] == 2
    assert meta["classify"]["blend"]["n_epochs"] == 60 and meta["classify"]["blend"]["n_epochs_skipped"] == 0
    assert meta["classify"]["blend"]["n_frames_kept"] == 60  # the forced stage's frame maps, not fitted again
    assert run["counts"]["blended_variables"] == 1 and run["counts"]["periodic_variables"] == 1
    assert json.loads((out / "run.json").read_text())["counts"]["blended_variables"] == 1

    # resume: nothing to redo, the stage's output unchanged
    run2 = run_pipeline(_cfg(blend_survey, out), client=client)
    assert run2["classify_fingerprint"] == run["classify_fingerprint"]
    assert run2["counts"]["classify_regions_skipped_resume"] == 1 and run2["counts"]["blended_variables"] == 1
    pd.testing.assert_frame_equal(pd.read_parquet(out / "objects"), obj)

    # the vetting's settings are the classify stage's: switching it off re-runs only classify, nothing flagged
    run3 = run_pipeline(_cfg(blend_survey, out, blend_vetting=False), client=client)
    assert run3["classify_fingerprint"] != run["classify_fingerprint"]
    assert run3["counts"]["classify_regions_skipped_resume"] == 0 and run3["counts"]["regions_skipped_resume"] == 1
    obj3 = pd.read_parquet(out / "objects")
    assert (obj3["var_class"] != BLENDED_VARIABLE).all() and obj3[BLEND_COLS].isna().all().all()
    assert run3["counts"]["blended_variables"] == 0 and run3["counts"]["periodic_variables"] == 2

    # a task that cannot read pixels classifies the region anyway; the periodic calls keep their class, with a reason
    from survey_proc.stages.classify import classify_region_task

    cfg = _cfg(blend_survey, out)
    rec = classify_region_task(str(out), "F000", 0, json.dumps(cfg.to_dict()), "x", None)
    assert rec["n_blended"] == 0 and rec["blend"]["n_vetted"] == 0
    obj4 = pd.read_parquet(out / "objects")
    per = obj4["var_class"].isin(PERIODIC_CLASSES)
    assert per.sum() == 2 and obj4.loc[per, "blend_reason"].str.startswith("no_pixels:").all()
    assert obj4[BLEND_COLS].isna().all().all() and obj4.loc[~per, "blend_reason"].isna().all()


def test_vetting_without_readable_pixels_names_why(blend_survey, client, tmp_path):
    """A store that cannot be read: every epoch is skipped with its reason, the candidates are not vetted."""
    from survey_proc.catalog.crossmatch import Region
    from survey_proc.stages.blend_io import vet_region

    out = tmp_path / "out"
    cfg = _cfg(blend_survey, out, blend_vetting=False)
    run_pipeline(cfg, client=client)
    obj = pd.read_parquet(out / "objects")
    cand = obj[obj["var_class"].isin(PERIODIC_CLASSES)]
    assert len(cand) == 2
    epochs = pd.read_parquet(out / "epochs.parquet")
    eps = [{"epoch": int(r.epoch), "mjd": float(r.mjd), "fwhm_px": float(r.fwhm_px), "zp": float(r.zp)}
           for r in epochs.itertuples()]
    res, info = vet_region(str(tmp_path / "missing.zarr"), str(out), "F000", Region(0, 0, 96, 0, 96), cand, eps,
                           (96, 96), cfg.forced, n_boot=5)
    assert info["n_epochs"] == 60 and info["n_epochs_skipped"] == 60 and len(info["epochs_skipped"]) == 20
    assert res["blend_reason"].str.startswith("not_vetted: vet_blend: 0 usable epochs").all()
    assert res["blend_offset_px"].isna().all()
    # with the real store the same call measures both
    res2, info2 = vet_region(str(blend_survey["store"]), str(out), "F000", Region(0, 0, 96, 0, 96), cand, eps,
                             (96, 96), cfg.forced, n_boot=5)
    assert info2["n_epochs_skipped"] == 0 and res2["blend_reason"].isna().all()
    assert sorted(np.round(res2["blend_offset_px"].to_numpy(), 0)) == [0.0, 1.0]
    assert info2["n_frames_kept"] == 60


def test_kept_frame_maps_are_the_fitted_ones_and_stale_ones_are_not_used(blend_survey, client, tmp_path):
    """The forced stage keeps each epoch's frame map; the vetting uses them only while they match the light curves."""
    import pyarrow.parquet as pq

    from survey_proc.catalog.crossmatch import Region
    from survey_proc.stages.blend_io import vet_region
    from survey_proc.stages.forced import FRAMES_UNIT, _epoch_frame, load_frames

    out = tmp_path / "out"
    cfg = _cfg(blend_survey, out, blend_vetting=False)
    run_pipeline(cfg, client=client)
    region = Region(0, 0, 96, 0, 96)
    kept = load_frames(str(out), "F000", 0)
    assert kept is not None and sorted(kept) == list(range(60))
    for e in (0, 17, 59):
        fitted, _ = _epoch_frame(str(out), "F000", e, region, cfg.forced)
        assert kept[e].degree == fitted.degree and kept[e].n_stars == fitted.n_stars
        np.testing.assert_array_equal(kept[e].coef_x, fitted.coef_x)
        np.testing.assert_array_equal(kept[e].coef_y, fitted.coef_y)
    obj = pd.read_parquet(out / "objects")
    cand = obj[obj["var_class"].isin(PERIODIC_CLASSES)]
    eps = [{"epoch": int(r.epoch), "mjd": float(r.mjd), "fwhm_px": float(r.fwhm_px), "zp": float(r.zp)}
           for r in pd.read_parquet(out / "epochs.parquet").itertuples()]
    res, info = vet_region(str(blend_survey["store"]), str(out), "F000", region, cand, eps, (96, 96), cfg.forced,
                           n_boot=5)
    assert info["n_frames_kept"] == 60
    # a frames file left by another forced run (its fingerprint is not the light curves'): fitted again, same result
    path = FRAMES_UNIT.path(str(out), field="F000", region=0)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"survey_proc"])
    pq.write_table(table.replace_schema_metadata({b"survey_proc": json.dumps({**meta, "forced_fingerprint": "old"})}),
                   path)
    assert load_frames(str(out), "F000", 0) is None
    res2, info2 = vet_region(str(blend_survey["store"]), str(out), "F000", region, cand, eps, (96, 96), cfg.forced,
                             n_boot=5)
    assert info2["n_frames_kept"] == 0
    pd.testing.assert_frame_equal(res, res2)

    # one epoch's chunk cut in half: that epoch is left out with its name, the other 59 of its read block are read
    import shutil

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(blend_survey["store"], damaged)
    chunk = next((damaged / "fields" / "F000" / "image" / "c" / "7").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    res3, info3 = vet_region(str(damaged), str(out), "F000", region, cand, eps, (96, 96), cfg.forced, n_boot=5)
    assert info3["n_epochs_skipped"] == 1 and list(info3["epochs_skipped"]) == ["7"]
    assert "field F000 epoch 7: cannot read pixels" in info3["epochs_skipped"]["7"]
    assert res3["blend_reason"].isna().all()
    np.testing.assert_allclose(res3["blend_offset_px"], res["blend_offset_px"], atol=0.05)


def test_stamps_scales_and_rule():
    img = np.arange(100, dtype=np.float32).reshape(10, 10)
    st, dx, dy = cut_stamps(img, np.array([4.3, 0.0]), np.array([5.6, 9.4]), 2)
    assert st.shape == (2, 5, 5) and dx == pytest.approx([0.3, 0.0]) and dy == pytest.approx([-0.4, 0.4])
    assert st[0, 2, 2] == img[6, 4] and st[0, 0, 0] == img[4, 2]
    assert np.isnan(st[1, :, :2]).all() and np.isnan(st[1, 3:, :]).all() and st[1, 2, 2] == img[9, 0]
    # an epoch 0.5 mag more sensitive (higher zero point) gets its ADU scaled down by 10 ** -0.2
    assert zp_scale(np.array([25.0, 25.5, 24.5])) == pytest.approx([1.0, 10 ** -0.2, 10 ** 0.2])
    off = np.array([1.5, 1.5, 0.8, np.nan, 4.1, 1.2])
    sig = np.array([0.1, 0.5, 0.01, np.nan, np.nan, 0.2])
    bound = np.array([False, False, False, None, True, None], object)
    assert is_blend(off, sig, bound).tolist() == [True, False, False, False, True, True]
    assert is_blend(off, sig, bound, min_offset_px=1.3, min_sigma=2.0).tolist() == [True, True, False, False,
                                                                                     True, False]
