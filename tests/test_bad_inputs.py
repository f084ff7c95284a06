"""Bad inputs: each gives a result or a clear, specific error, and loses nothing else.

A bad epoch inside a store fails only that epoch (recorded in run.json after its retry);
the other epochs are processed and the output validates. A bad run-level input (reference
catalogue, output directory) is refused before anything is written. Other kinds are pinned
beside the code they concern (listed in benchmarks/RESULTS.md, "Reliability").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.errors import ConfigError, StoreValidationError, SurveyProcError
from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.store import validate_store
from survey_proc.validate import validate_output
from tests.conftest import run_config

SETTINGS = dict(tile_px=128, halo_px=24, crossmatch={"region_px": 128, "min_epochs": 2})


@pytest.fixture(scope="module")
def small_field(tmp_path_factory) -> Path:
    """256 x 256 px, 4 epochs, ~600 detections per epoch, 49 reference stars."""
    out = tmp_path_factory.mktemp("bad-inputs") / "field.zarr"
    scn = load_scenario("dense", {"size_px": 256, "n_epochs": 4, "seed": 21, "psf_oversample": 5,
                                  "star_density_per_px2": 0.04, "psf_fwhm_px": 2.2})
    simulate_survey(scn, out, workers=0, progress=False)
    return out


def _reference(store: Path) -> Path:
    return Path(str(store).replace(".zarr", ".reference.parquet"))


def _set_epoch(value: float):
    def damage(group: zarr.Group, store: Path) -> None:
        group["fields/F000/image"][1] = value
    return damage


def _malformed_wcs(group: zarr.Group, store: Path) -> None:
    group["fields/F000/wcs"][1] = "CTYPE1  = 'RA---TA'  / a truncated projection code"


def _truncated_chunk(group: zarr.Group, store: Path) -> None:
    chunk = store / "fields" / "F000" / "image" / "c" / "1" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])


BAD_EPOCHS = {
    "nan": (_set_epoch(np.nan), r"field F000 epoch 1: no usable pixels \(100 % NaN/inf, 0 % at or above the "
                                r"saturation level \d+ ADU, 0 % flagged bad in the mask\); the epoch is left out of "
                                r"this run\. Check the exposure it came from \(the store's source_file\) and "
                                r"re-ingest"),
    "inf": (_set_epoch(np.inf), r"field F000 epoch 1: no usable pixels \(100 % NaN/inf"),
    "all-zero": (_set_epoch(0.0), r"field F000 epoch 1: every usable pixel has the same value \(an empty or failed "
                                  r"readout: no sky, no noise\); the epoch is left out"),
    "all-saturated": (_set_epoch(1e9), r"field F000 epoch 1: no usable pixels \(0 % NaN/inf, 100 % at or above the "
                                       r"saturation level \d+ ADU"),
    "malformed-wcs": (_malformed_wcs, r"field F000 epoch 1: the stored WCS is unusable \(.*\); fix the epoch's wcs "
                                      r"header text"),
    # a Blosc chunk cut in half crashed worker processes (KilledWorker) before read_window checked its size
    "truncated-chunk": (_truncated_chunk,
                        r"field F000 epoch 1: cannot read pixels \[0:256, 0:256\] \(ValueError: chunk "
                        r"file .*image/c/1/0/0 is truncated or damaged \(\d+ bytes; its Blosc header "
                        r"says \d+\)\); check or re-ingest that epoch"),
}


@pytest.mark.parametrize("kind", sorted(BAD_EPOCHS))
def test_a_bad_epoch_fails_alone(kind, small_field, client, tmp_path):
    damage, message = BAD_EPOCHS[kind]
    store = tmp_path / "bad.zarr"
    shutil.copytree(small_field, store)
    damage(zarr.open_group(str(store), mode="r+"), store)
    out = tmp_path / "out"
    run = run_pipeline(run_config(store, out, reference=str(_reference(small_field)), **SETTINGS), client=client)
    assert run["status"] == "incomplete"
    (fail,) = run["failures"]
    assert (fail["stage"], fail["field"], fail["epoch"], fail["attempts"]) == ("extract", "F000", 1, 2)
    with pytest.raises(SurveyProcError, match=message):
        raise SurveyProcError(fail["error"].removeprefix("SurveyProcError: "))
    written = sorted(p.name for p in (out / "sources" / "field=F000").glob("*.parquet"))
    assert written == ["epoch=0.parquet", "epoch=2.parquet", "epoch=3.parquet"]
    lc = pd.read_parquet(out / "lightcurves")
    assert set(lc["epoch"]) == {0, 2, 3} and len(lc) > 1000
    assert validate_output(out) == []


def test_epochs_without_a_time_or_exposure_are_left_out_of_the_run(small_field, client, tmp_path):
    """store.validate_store refuses these (tests/test_store.py); a run leaves just those epochs out."""
    store = tmp_path / "meta.zarr"
    shutil.copytree(small_field, store)
    g = zarr.open_group(str(store), mode="r+")["fields/F000"]
    g["mjd"][1] = np.nan
    g["exptime"][2] = 0.0
    out = tmp_path / "out"
    run = run_pipeline(run_config(store, out, reference=str(_reference(small_field)), **SETTINGS), client=client)
    assert run["status"] == "incomplete"
    assert [(f["epoch"], f["attempts"]) for f in run["failures"]] == [(1, 0), (2, 0)]
    with pytest.raises(SurveyProcError, match=r"meta\.zarr: field F000, variable 'mjd': not finite at epoch 1; every "
                                              r"epoch needs a mid-exposure MJD; the epoch is left out\. Fix the "
                                              r"store's metadata \(or re-ingest the exposure\) and run again"):
        raise SurveyProcError(run["failures"][0]["error"])
    with pytest.raises(SurveyProcError, match=r"variable 'exptime': 0\.0 s at epoch 2; exposure times must be > 0"):
        raise SurveyProcError(run["failures"][1]["error"])
    assert set(pd.read_parquet(out / "lightcurves")["epoch"]) == {0, 3}
    assert validate_output(out) == []


def test_half_an_epoch_of_nan_is_masked_not_failed(small_field, client, tmp_path):
    """Partly bad pixels are masked and the epoch is measured (only a wholly unusable one fails)."""
    store = tmp_path / "half.zarr"
    shutil.copytree(small_field, store)
    image = zarr.open_group(str(store), mode="r+")["fields/F000/image"]
    image[1, :128, :] = np.nan
    run = run_pipeline(run_config(store, tmp_path / "out", reference=str(_reference(small_field)), **SETTINGS),
                       client=client)
    assert run["status"] == "complete"
    src = pd.read_parquet(tmp_path / "out" / "sources" / "field=F000" / "epoch=1.parquet")
    full = pd.read_parquet(tmp_path / "out" / "sources" / "field=F000" / "epoch=0.parquet")
    assert len(src) > 0.3 * len(full) and (src["y"] > 120).all()


def test_an_empty_reference_catalogue_is_refused(small_field, tmp_path):
    empty = tmp_path / "empty.parquet"
    pd.read_parquet(_reference(small_field)).iloc[:0].to_parquet(empty)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"reference catalogue .*empty\.parquet has no rows; pass a catalogue of the "
                                          r"field's stars with --reference PATH, or --reference none"):
        run_pipeline(run_config(small_field, out, reference=str(empty), **SETTINGS))
    assert not out.exists()


def test_a_reference_catalogue_of_another_sky_is_refused(small_field, tmp_path):
    elsewhere = tmp_path / "elsewhere.parquet"
    ref = pd.read_parquet(_reference(small_field))
    ref.assign(ra=ref["ra"] - 40.0, dec=ref["dec"] + 5.0).to_parquet(elsewhere)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"elsewhere\.parquet has no star inside field F000 \(centre RA 270\.\d+, "
                                          r"Dec -30\.\d+ deg; the catalogue spans RA 229\.\d+\.\.230\.\d+, Dec "
                                          r"-25\.\d+\.\.-24\.\d+\); pass a catalogue that covers the field"):
        run_pipeline(run_config(small_field, out, reference=str(elsewhere), **SETTINGS))
    assert not out.exists()


def test_an_output_below_a_file_is_refused_with_a_message(small_field, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SurveyProcError, match=r"--out .*a-file/out: cannot write there \(Not a directory\); choose a "
                                              r"directory you can write to"):
        run_pipeline(run_config(small_field, blocker / "out", reference="none", **SETTINGS))


def test_a_read_only_output_is_refused_with_a_message(small_field, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: a read-only directory is still writable")
        with pytest.raises(SurveyProcError, match=r"--out .*locked/out: cannot write there \(Permission denied\)"):
            run_pipeline(run_config(small_field, locked / "out", reference="none", **SETTINGS))
    finally:
        locked.chmod(0o755)


def test_an_image_of_the_wrong_dtype_is_named(small_field, tmp_path):
    store = tmp_path / "int.zarr"
    shutil.copytree(small_field, store)
    g = zarr.open_group(str(store / "fields" / "F000"), mode="r+")
    data = g["image"][:]
    del g["image"]
    g.create_array("image", data=data.astype(np.int16), chunks=(1, 256, 256), dimension_names=("epoch", "y", "x"))
    with pytest.raises(StoreValidationError, match=r"field 'F000', variable 'image': dtype int16 but the format "
                                                   r"requires float32"):
        validate_store(store)


def test_a_damaged_output_unit_is_redone_on_resume(small_field, client, tmp_path):
    """A sources file truncated after the run (a bad copy, a disk error) is extracted again, not trusted."""
    out = tmp_path / "out"
    cfg = run_config(small_field, out, reference=str(_reference(small_field)), **SETTINGS)
    first = run_pipeline(cfg, client=client)
    unit = out / "sources" / "field=F000" / "epoch=2.parquet"
    good = pd.read_parquet(unit)
    unit.write_bytes(unit.read_bytes()[:200])
    assert validate_output(out) != []
    again = run_pipeline(cfg, client=client)
    assert again["status"] == "complete" and again["counts"]["epochs_skipped_resume"] == 3
    pd.testing.assert_frame_equal(pd.read_parquet(unit), good)
    assert again["counts"]["lightcurve_points"] == first["counts"]["lightcurve_points"]
    assert validate_output(out) == []


def test_negative_retries_are_refused():
    with pytest.raises(ConfigError, match=r"retries must be >= 0 \(0: a failed unit is quarantined at once\), got -1"):
        run_config(Path("s.zarr"), Path("o"), retries=-1)


def _fits(path: Path, shape: tuple[int, int], mjd: float) -> Path:
    from astropy.io import fits

    h = fits.Header()
    h["MJD-OBS"], h["EXPTIME"], h["GAIN"], h["RDNOISE"], h["OBJECT"] = mjd, 10.0, 1.5, 4.0, "M67"
    data = np.random.default_rng(int(mjd * 100) % 2**32).normal(100.0, 5.0, shape).astype(np.float32)
    fits.PrimaryHDU(data, h).writeto(path)
    return path


def test_unreadable_fits_files_are_left_out_and_named(tmp_path, capsys):
    from survey_proc.cli import main
    from survey_proc.store import image_shape, list_fields

    for i in range(2):
        _fits(tmp_path / f"good{i}.fits", (64, 64), 60000.0 + 0.1 * i)
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(_fits(tmp_path / "whole.fits", (64, 64), 60000.3).read_bytes()[:5000])
    (tmp_path / "whole.fits").unlink()
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"not a FITS file " * 400)
    out = tmp_path / "s.zarr"
    rc = main(["ingest", str(tmp_path / "*.fits"), "--out", str(out), "--field-key", "OBJECT", "--quiet"])
    assert rc == 1
    (fid,) = list_fields(out)
    assert image_shape(out, fid) == (2, 64, 64)  # the good files are in
    err = capsys.readouterr().err
    assert "2 file(s) could not be read and were left out:" in err
    assert "truncated.fits[0]: the image data cannot be read (cannot reshape array of size 530 into shape (64,64))" \
        in err
    assert "garbage.fits: not a readable FITS file (No SIMPLE card found" in err
    assert "ingest them with --append" in err


def test_only_unreadable_files_write_nothing(tmp_path):
    from survey_proc.ingest import IngestError, ingest

    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"\0" * 2880)
    with pytest.raises(IngestError, match=r"no readable exposure in 1 file\(s\); nothing was written\. First problem: "
                                          r".*garbage\.fits: not a readable FITS file"):
        ingest([garbage], tmp_path / "s.zarr", progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_images_of_different_shapes_in_one_field_write_nothing(tmp_path):
    from survey_proc.ingest import IngestError, ingest

    files = [_fits(tmp_path / "a.fits", (64, 64), 60000.0), _fits(tmp_path / "b.fits", (64, 80), 60000.1)]
    with pytest.raises(IngestError, match=r"field M67: images of different shapes \[\(64, 64\), \(64, 80\)\] .*a field "
                                          r"is one detector: choose the HDUs with --hdu or a --field-key"):
        ingest(files, tmp_path / "s.zarr", field_key="OBJECT", progress=False)
    assert not (tmp_path / "s.zarr").exists()
