"""stages/register.py: epochs without a WCS registered to the reference epoch; rough WCSs refined."""

from __future__ import annotations

import numpy as np


def test_a_survey_without_wcs_is_registered_in_the_pipeline(tmp_path, client):
    """Jittered pointings (tens of px, ~1 degree), every WCS removed: epochs registered to <= 0.05 px."""
    import zarr

    from survey_proc.distributed.pipeline import run_pipeline
    from survey_proc.evaluate import truth_at_epoch
    from survey_proc.simulate import load_scenario, simulate_survey
    from tests.conftest import run_config

    st = tmp_path / "nowcs.zarr"
    scn = load_scenario("dense", {"size_px": 256, "n_epochs": 5, "seed": 41, "psf_oversample": 5,
                                  "star_density_per_px2": 0.006, "jitter_px": 20.0, "rotation_jitter_deg": 0.5,
                                  "n_bad_columns": 0, "cosmic_rate_per_px_s": 0.0})
    simulate_survey(scn, st, workers=0, progress=False)
    truth = {e: truth_at_epoch(st, "F000", e, in_frame_only=False).set_index("star_id") for e in range(5)}
    g = zarr.open_group(str(st / "fields" / "F000"), mode="r+")
    g["wcs"][:] = np.asarray([""] * 5, dtype=object)
    g.attrs.pop("reference_wcs", None)
    out = tmp_path / "out"
    run = run_pipeline(run_config(st, out, tile_px=256, halo_px=24, reference="none",
                                  crossmatch={"region_px": 256}), client=client)
    assert run["status"] == "complete", run["failures"]
    regs = run["registration"]
    ref_epoch = next(iter(regs.values()))["reference_epoch"]
    assert len(regs) == 4 and f"F000/{ref_epoch}" not in regs  # every epoch but the reference
    assert all(r["reference_epoch"] == ref_epoch for r in regs.values())
    # accuracy: the true positions of bright stars in each epoch, through our transform, against
    # their true positions in the reference epoch
    import pyarrow.parquet as pq

    t_ref = truth[ref_epoch]
    for e in range(5):
        if e == ref_epoch:
            continue
        meta = json_meta(out / "sources" / "field=F000" / f"epoch={e}.parquet")
        m = np.array(meta["registration"]["matrix"])
        te = truth[e]
        inside_e = te["x_epoch"].between(0, 255) & te["y_epoch"].between(0, 255)
        bright = te[(te["mag"] < 22) & inside_e].index
        x, y = te.loc[bright, "x_epoch"].to_numpy(), te.loc[bright, "y_epoch"].to_numpy()
        xr = m[0, 0] * x + m[0, 1] * y + m[0, 2]
        yr = m[1, 0] * x + m[1, 1] * y + m[1, 2]
        d = np.hypot(xr - t_ref.loc[bright, "x_epoch"].to_numpy(), yr - t_ref.loc[bright, "y_epoch"].to_numpy())
        inside = np.isfinite(d)
        rms = np.sqrt(np.mean(d[inside] ** 2))
        print(f"epoch {e}: registration error {rms:.4f} px RMS over {inside.sum()} bright stars; fit residual "
              f"{meta['registration']['rms_px']:.3f} px over {meta['registration']['n_stars']} stars")
        assert rms <= 0.05, (e, rms)
        assert meta["registration"]["rms_px"] < 0.3  # centroid noise of all matched stars, faint ones included
    assert pq.read_table(out / "objects").num_rows > 100


def json_meta(path):
    from survey_proc.outputs import read_meta

    return read_meta(path)


def test_a_rough_wcs_is_refined_against_the_reference_catalogue(tmp_path, client):
    """Two epochs whose WCS is 25-30 px off: registered to the catalogue, calibrated, positions right."""
    import zarr

    from survey_proc.distributed.pipeline import run_pipeline
    from survey_proc.evaluate import load_truth_stars
    from survey_proc.simulate import load_scenario, simulate_survey
    from survey_proc.simulate.wcs import shift_wcs_text
    from tests.conftest import run_config

    st = tmp_path / "rough.zarr"
    scn = load_scenario("dense", {"size_px": 256, "n_epochs": 4, "seed": 47, "psf_oversample": 5,
                                  "star_density_per_px2": 0.01, "n_bad_columns": 0,
                                  "reference_mag_faint": 23.0})
    simulate_survey(scn, st, workers=0, progress=False)
    g = zarr.open_group(str(st / "fields" / "F000"), mode="r+")
    wcs = [str(w) for w in g["wcs"][:]]
    for e, (dx, dy) in ((1, (30.0, -12.0)), (3, (-25.0, 20.0))):
        wcs[e] = shift_wcs_text(wcs[e], dx, dy)
    g["wcs"][:] = np.asarray(wcs, dtype=object)
    out = tmp_path / "out"
    run = run_pipeline(run_config(st, out, tile_px=256, halo_px=24, crossmatch={"region_px": 256}), client=client)
    assert run["status"] == "complete", run["failures"]
    assert sorted(run["registration"]) == ["F000/1", "F000/3"]
    assert all(r["against"] == "reference catalogue" for r in run["registration"].values())
    stars = load_truth_stars(st)
    bright = stars[stars["mag"] < 21]
    import pandas as pd
    from scipy.spatial import cKDTree

    for e in (1, 3):
        src = pd.read_parquet(out / "sources" / "field=F000" / f"epoch={e}.parquet")
        src = src[src["snr"] > 100]
        d, _ = cKDTree(bright[["x", "y"]].to_numpy()).query(src[["x_ref", "y_ref"]].to_numpy(),
                                                             distance_upper_bound=1.0)
        ok = np.isfinite(d)
        print(f"rough WCS epoch {e}: {ok.sum()} bright stars, median distance to truth {np.median(d[ok]):.4f} px")
        assert ok.sum() >= 10 and np.median(d[ok]) < 0.05
        meta = json_meta(out / "sources" / "field=F000" / f"epoch={e}.parquet")
        assert meta["zp"]["status"] == "fit" and meta["zp"]["n_used"] >= 10


def test_m67_subframes_without_wcs_register_and_phase_correlation_takes_over_when_asterisms_fail(
        tmp_path, client, monkeypatch):
    """Five 512-px sub-frames of the real M67 plate (shifts <= 50 px, rotations <= 1 deg, no WCS), sep detector.

    The run completes with every epoch registered to <= 0.1 px (RMS over a 20-px grid of the
    frame); then, with asterism matching made to fail, the task reads both images from the
    store and phase correlation + stars gives the same transform; with the epoch's pixels
    replaced by noise as well, the error names the field, both epochs and both reasons.
    """
    import json

    import pytest
    import zarr

    from survey_proc.catalog.registration import PHASE_CORRELATION, RegistrationError
    from survey_proc.distributed.pipeline import run_pipeline
    from survey_proc.errors import SurveyProcError
    from survey_proc.stages import register as register_stage
    from tests.conftest import run_config
    from tests.test_registration_real import POSES, m67_subframe_store

    size = 512
    st = tmp_path / "m67.zarr"
    maps = m67_subframe_store(st, size)
    rng = np.random.default_rng(1)
    out = tmp_path / "out"
    cfg = run_config(st, out, tile_px=size, halo_px=32, reference="none", crossmatch={"region_px": size})
    run = run_pipeline(cfg, client=client)
    assert run["status"] == "complete", run["failures"]
    regs = run["registration"]
    ref_epoch = next(iter(regs.values()))["reference_epoch"]
    assert len(regs) == 4 and all(r["reference_epoch"] == ref_epoch for r in regs.values())

    def grid_rms(matrix, e):
        m, true = np.asarray(matrix), (np.linalg.inv(maps[ref_epoch]) @ maps[e])[:2]
        g = np.mgrid[0:size:20, 0:size:20].reshape(2, -1)[::-1].T.astype(float)
        return float(np.sqrt(np.mean(np.sum(((g @ m[:, :2].T + m[:, 2]) - (g @ true[:, :2].T + true[:, 2])) ** 2, 1))))

    epochs = [e for e in range(5) if e != ref_epoch]
    for e in epochs:
        reg = json_meta(out / "sources" / "field=F000" / f"epoch={e}.parquet")["registration"]
        print(f"M67 epoch {e}: {reg['method']}, grid error {grid_rms(reg['matrix'], e):.4f} px RMS, fit residual "
              f"{reg['rms_px']:.3f} px over {reg['n_stars']} stars")
        assert regs[f"F000/{e}"]["rms_px"] == reg["rms_px"] < 0.3 and reg["n_stars"] >= 100
        assert grid_rms(reg["matrix"], e) <= 0.1

    def no_asterisms(*args, **kwargs):
        raise RegistrationError("asterisms switched off by the test")

    monkeypatch.setattr(register_stage, "register", no_asterisms)
    e = max(epochs, key=lambda k: np.hypot(*POSES[k][0]))
    args = (str(out), "F000", e, ref_epoch, "", None, json.dumps(cfg.to_dict()), "test")
    rec = register_stage.register_epoch_task(*args)
    reg = rec.registration
    print(f"M67 epoch {e} by phase correlation: grid error {grid_rms(reg['matrix'], e):.4f} px RMS, fit residual "
          f"{reg['rms_px']:.3f} px over {reg['n_stars']} stars, peak {reg['correlation_sigma']:.0f} sigma")
    assert reg["method"] == PHASE_CORRELATION and reg["asterism_error"] == "asterisms switched off by the test"
    assert reg["correlation_sigma"] > 20 and reg["reference_epoch"] == ref_epoch and reg["rms_px"] < 0.3
    assert grid_rms(reg["matrix"], e) <= 0.1
    assert json_meta(out / "sources" / "field=F000" / f"epoch={e}.parquet")["registration"]["method"] == (
        PHASE_CORRELATION)

    zarr.open_group(str(st / "fields" / "F000"), mode="r+")["image"][e] = rng.normal(3000, 50, (size, size))
    with pytest.raises(SurveyProcError, match=(
            rf"field F000 epoch {e}: no WCS, and registration to reference epoch {ref_epoch} failed by asterism "
            r"matching \(asterisms switched off by the test\) and by image phase correlation \(image "
            r"cross-correlation found no significant peak .*\)\. Check that the epoch shows the same field as the "
            r"reference epoch .* or add a WCS to the epoch, or exclude it")):
        register_stage.register_epoch_task(*args)
