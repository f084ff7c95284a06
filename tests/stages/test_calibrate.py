"""stages/calibrate.py in a run: an epoch calibration gave up on is quarantined and never reaches the light curves;
an error that stops a run is recorded in run.json."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.validate import validate_output
from tests.conftest import run_config


def test_epochs_that_cannot_be_calibrated_are_failures_left_out_of_the_light_curves(border_survey, client, tmp_path):
    # relative calibration that asks for more stars than the field has: no epoch is "fit", so there is
    # no zero-point model either; every epoch fails calibration
    out = tmp_path / "out"
    run = run_pipeline(run_config(border_survey["store"], out, tile_px=128, halo_px=16, reference="none",
                                  calibration={"min_stars": 10_000, "min_stars_fit": 10_000},
                                  crossmatch={"region_px": 128, "min_epochs": 2}), client=client)
    assert run["status"] == "incomplete"
    failed = [f for f in run["failures"] if f["stage"] == "calibrate"]
    assert sorted(f["epoch"] for f in failed) == [0, 1, 2]
    for f in failed:
        assert f["error"].startswith(f"field F000 epoch {f['epoch']}: ")
        assert " usable ensemble star(s) of " in f["error"]
        assert ("(a zero point needs calibration.min_stars_fit = 10000), and no epoch of the band had enough for the "
                "cross-epoch zero-point model; the epoch is left out of the light curves. The field's ensemble "
                "(band i, reference epoch ") in f["error"]
        assert "star(s) unflagged with S/N >= calibration.ensemble_snr_min = 10 and isolated (" in f["error"]
        assert " isolated within 3 FWHM at a flux ratio of 0.025; " in f["error"]  # every step tried is counted
        assert " isolated within 1.5 FWHM at a flux ratio of 0.25); " in f["error"]
        assert f["error"].endswith("; lower calibration.ensemble_snr_min or calibration.min_stars_fit, or choose a "
                                   "deeper calibration.reference_epoch")
    assert run["counts"]["epochs_written"] == 3 and run["counts"]["epochs_left_out"] == 3
    assert run["counts"]["lightcurve_points"] == 0 and run["counts"]["objects"] == 0
    lc = out / "lightcurves"
    assert not lc.exists() or pq.read_table(lc).num_rows == 0
    assert validate_output(out) == []


def test_an_error_that_stops_the_run_is_recorded_in_run_json(border_survey, client, tmp_path, monkeypatch):
    from survey_proc.stages import STAGES

    calibrate = next(s for s in STAGES if s.name == "calibrate")

    def broken(ctx):
        raise RuntimeError("the calibrate stage broke")

    monkeypatch.setattr(calibrate, "run", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the calibrate stage broke"):
        run_pipeline(run_config(border_survey["store"], out, tile_px=128, halo_px=16,
                                crossmatch={"region_px": 128, "min_epochs": 2}), client=client)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == "RuntimeError: the calibrate stage broke"
    assert run["counts"]["epochs_written"] == 3  # what was done before is recorded; a re-run resumes from it


@pytest.mark.parametrize("n_ref", [5, 2])
def test_a_field_with_few_calibrators_is_calibrated_relative_to_its_own_stars(border_survey, client, tmp_path, n_ref):
    # a reference catalogue with 5 (3-9: a few-star absolute level) or 2 stars (too few: relative only);
    # the per-epoch offsets come from the ensemble of the field's own stars either way
    import numpy as np
    import pandas as pd

    from survey_proc import vocab as F

    ref = pd.read_parquet(str(border_survey["store"]).replace(".zarr", ".reference.parquet"))
    assert len(ref) >= 10
    few = tmp_path / "few.parquet"
    ref.sort_values("mag").head(n_ref).to_parquet(few)
    out = tmp_path / "out"
    run = run_pipeline(run_config(border_survey["store"], out, tile_px=128, halo_px=16, reference=str(few),
                                  crossmatch={"region_px": 128, "min_epochs": 2}), client=client)
    assert run["status"] == "complete" and run["failures"] == []
    info = run["zeropoints"]["F000"]
    epochs = pd.read_parquet(out / "epochs.parquet")
    assert (epochs["zp_status"] == "fit").all() and np.isfinite(epochs["zp"]).all()
    flags = pd.read_parquet(out / "sources")["flags"]
    if n_ref == 5:
        assert info["absolute"]["status"] == "fit_few" and info["absolute"]["n_used"] == 5
        assert info["absolute"]["zp_err"] >= info["absolute"]["scatter"]  # widened to the per-star scatter
        assert info["level"]["absolute"] and not (flags & F.ZP_RELATIVE).any()
    else:
        assert info["absolute"]["status"] == "few" and info["level"]["absolute"] is False
        assert ((flags & F.ZP_RELATIVE) != 0).all()


def test_a_crowded_real_plate_loosens_the_ensemble_isolation_and_calibrates_every_epoch(tmp_path, client):
    # five 320-px sub-frames of the M67 plate core: at 3 FWHM and 2.5 % only a handful of stars are isolated
    # (every epoch failed calibration); the ensemble steps to a looser isolation and says which in run.json
    from tests.test_registration_real import m67_subframe_store

    size = 320
    st = tmp_path / "m67.zarr"
    m67_subframe_store(st, size, band="R")
    out = tmp_path / "out"
    run = run_pipeline(run_config(st, out, tile_px=size, halo_px=32, reference="none",
                                  crossmatch={"region_px": size}), client=client)
    assert run["status"] == "complete", run["failures"]
    info = run["zeropoints"]["F000"]
    first = info["isolation_tried"][0]
    assert (first["isolation_fwhm"], first["isolation_flux_ratio"]) == (3.0, 0.025) and first["n_stars"] < 10
    assert info["isolation"] != [3.0, 0.025] and info["reference_stars"] >= 10
    assert info["isolation_tried"][-1]["n_stars"] == info["reference_stars"]
