"""The survey store: format, round trips, append, validation errors (real Zarr on disk)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from survey_proc import store
from survey_proc.errors import StoreError, StoreValidationError


def _meta(mjd, wcs=None):
    n = len(mjd)
    return store.EpochMeta(mjd=np.asarray(mjd, float), exptime_s=np.full(n, 300.0), airmass=np.full(n, np.nan),
                           wcs=wcs or [""] * n, source_file=[f"file{i}.fits" for i in range(n)])


def _wcs_text(crval1: float) -> str:
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype, w.wcs.crval = ["RA---TAN", "DEC--TAN"], [crval1, 2.0]
    w.wcs.crpix, w.wcs.cdelt = [25, 20], [-1e-4, 1e-4]
    return w.to_header(relax=True).tostring(sep="\n")


WCS0, WCS2 = _wcs_text(150.0), _wcs_text(150.001)


@pytest.fixture
def small_store(tmp_path):
    path = tmp_path / "s.zarr"
    store.create_store(path, band="i", pixel_scale_arcsec=0.1)
    store.create_field(path, "F000", ny=40, nx=50, n_epochs=3, gain_e_per_adu=2.0, read_noise_e=4.0,
                       saturation_adu=5e4, zeropoint_nominal=30.0)
    store.write_epoch_meta(path, "F000", 0, _meta([60000.1, 60000.2, 60000.3], [WCS0, "", WCS2]))
    for e in range(3):
        store.write_epoch_pixels(path, "F000", e, np.full((40, 50), 100.0 + e), np.full((40, 50), e, np.uint8))
    return path


def test_roundtrip_is_lazy_xarray(small_store):
    ds = store.open_field(small_store, "F000")
    assert isinstance(ds["image"].data, da.Array)
    assert ds["image"].dims == ("epoch", "y", "x")
    assert ds["image"].dtype == np.float32 and ds["mask"].dtype == np.uint8
    assert ds.sizes == {"epoch": 3, "y": 40, "x": 50}
    assert ds["epoch"].values.tolist() == [0, 1, 2]
    assert ds["image"].isel(epoch=2).values.mean() == pytest.approx(102.0)
    assert ds["mask"].isel(epoch=1).values.max() == 1
    assert ds["wcs"].values.tolist() == [WCS0, "", WCS2]
    assert np.isnan(ds["airmass"].values).all()
    assert ds.attrs["gain_e_per_adu"] == 2.0 and ds.attrs["band"] == "i" and ds.attrs["field"] == "F000"
    assert store.validate_store(small_store) == []


def test_append_epochs_extends_in_time_order(small_store):
    new = store.append_epochs(small_store, "F000", np.full((2, 40, 50), 7.0), _meta([60000.4, 60000.5]))
    assert new == [3, 4]
    ds = store.open_field(small_store, "F000")
    assert ds.sizes["epoch"] == 5
    assert ds["epoch"].values.tolist() == [0, 1, 2, 3, 4]
    assert ds["image"].isel(epoch=4).values.mean() == pytest.approx(7.0)
    assert ds["source_file"].values.tolist()[3:] == ["file0.fits", "file1.fits"]
    assert store.validate_store(small_store) == []


def test_append_rejects_epochs_before_the_last(small_store):
    with pytest.raises(StoreError,
                       match=r"field 'F000': appended epoch mjd 60000.250000 is not after the last epoch \(epoch 2"):
        store.append_epochs(small_store, "F000", np.zeros((1, 40, 50)), _meta([60000.25]))


def test_compression_and_tile_aligned_chunks(tmp_path):
    assert store.chunk_px_for(1024) == 1024
    assert store.chunk_px_for(4096) == 2048
    assert store.chunk_px_for(700) == 1024
    assert store.chunk_px_for(100) == 512
    path = tmp_path / "c.zarr"
    store.create_store(path, band="r", pixel_scale_arcsec=0.2)
    store.create_field(path, "A", ny=3000, nx=1500, n_epochs=1, gain_e_per_adu=1, read_noise_e=1,
                       saturation_adu=1e4, zeropoint_nominal=25)
    img = zarr.open_group(str(path))["fields/A/image"]
    assert img.chunks == (1, 2048, 1500)  # x: one chunk covers the axis; y: tile-aligned
    assert img.chunks[1] % store.TILE_GRID_PX == 0
    codec = img.metadata.codecs[-1]
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd"


def test_missing_field_and_store_errors(tmp_path, small_store):
    with pytest.raises(StoreError, match=r"field 'F9' is not in survey store .* \(fields: F000\)"):
        store.open_field(small_store, "F9")
    with pytest.raises(StoreError, match=r"does not exist; create it with `survey-proc simulate`"):
        store.open_field(tmp_path / "nope.zarr", "F000")
    with pytest.raises(StoreError, match=r"already exists; pass overwrite=True"):
        store.create_store(small_store, band="i", pixel_scale_arcsec=0.1)
    with pytest.raises(StoreError, match=r"image shape \(3, 3\) != field shape \(40, 50\)"):
        store.write_epoch_pixels(small_store, "F000", 0, np.zeros((3, 3)))


def test_validation_missing_variable(small_store):
    del zarr.open_group(str(small_store))["fields/F000/wcs"]
    with pytest.raises(StoreValidationError, match=r"field 'F000', variable 'wcs': missing"):
        store.validate_store(small_store)


def test_validation_wrong_dtype(small_store):
    g = zarr.open_group(str(small_store))["fields/F000"]
    del g["mjd"]
    g.create_array("mjd", data=np.array([1.0, 2.0, 3.0], dtype="float32"), dimension_names=["epoch"])
    with pytest.raises(StoreValidationError, match=r"variable 'mjd': dtype float32 but the format requires float64"):
        store.validate_store(small_store)


def test_validation_wrong_shape(small_store):
    g = zarr.open_group(str(small_store))["fields/F000"]
    del g["airmass"]
    g.create_array("airmass", data=np.ones(2, dtype="float32"), dimension_names=["epoch"])
    with pytest.raises(StoreValidationError, match=r"variable 'airmass': 2 epochs but image has 3"):
        store.validate_store(small_store)


def test_validation_non_monotonic_mjd(small_store):
    zarr.open_group(str(small_store))["fields/F000/mjd"][2] = 60000.15
    with pytest.raises(StoreValidationError, match=r"variable 'mjd': not strictly increasing at epoch 2"):
        store.validate_store(small_store)


def test_validation_non_finite_mjd_and_bad_exptime(small_store):
    g = zarr.open_group(str(small_store))["fields/F000"]
    g["mjd"][1] = np.nan
    g["exptime"][0] = 0.0
    with pytest.raises(StoreValidationError, match=r"2 problem\(s\)") as info:
        store.validate_store(small_store)
    assert any("'mjd': not finite at epoch 1" in p for p in info.value.problems)
    assert any("'exptime': 0.0 s at epoch 0" in p for p in info.value.problems)


def test_validation_format_version(small_store):
    zarr.open_group(str(small_store)).attrs["survey_proc_format"] = 99
    with pytest.raises(StoreValidationError,
                       match=r"format version 99 is not supported \(this survey-proc reads versions 1 and 2\); "
                             r"the store was written by a newer survey-proc: upgrade survey-proc"):
        store.validate_store(small_store)


def test_validation_missing_attribute_and_wrong_dims(small_store):
    g = zarr.open_group(str(small_store))["fields/F000"]
    del g.attrs["gain_e_per_adu"]
    del g["exptime"]
    g.create_array("exptime", data=np.full(3, 300, dtype="float32"), dimension_names=["time"])
    problems = store.validate_store(small_store, raise_on_error=False)
    assert "field 'F000': attribute 'gain_e_per_adu' is missing" in problems
    assert any("variable 'exptime': dimensions ('time',) but the format requires ('epoch',)" in p for p in problems)


def test_validation_empty_store(tmp_path):
    path = tmp_path / "e.zarr"
    store.create_store(path, band="i", pixel_scale_arcsec=0.1)
    with pytest.raises(StoreValidationError, match=r"the store has no fields"):
        store.validate_store(path)


def test_pixel_reader_reads_what_read_window_reads_and_names_what_is_missing(tmp_path, small_store):
    import shutil

    reader = store.PixelReader(small_store, "F000")
    for e in range(2):
        img, mask = reader.window(e, 3, 17, 5, 30)
        want_img, want_mask = store.read_window(small_store, "F000", e, 3, 17, 5, 30)
        assert img.dtype == np.float32 and img.shape == (14, 25)
        assert np.array_equal(img, want_img, equal_nan=True)
        assert (mask is None and want_mask is None) or np.array_equal(mask, want_mask)
    many, masks = reader.windows([0, 1], 3, 17, 5, 30)  # contiguous epochs: one slice
    some, _ = reader.windows([1, 0], 3, 17, 5, 30)  # any order: an orthogonal selection
    for k, e in enumerate((0, 1)):
        assert np.array_equal(many[k], store.read_window(small_store, "F000", e, 3, 17, 5, 30)[0], equal_nan=True)
        assert np.array_equal(some[1 - k], many[k], equal_nan=True)
    assert many.shape == (2, 14, 25) and many.dtype == np.float32
    assert masks is not None and masks.shape == (2, 14, 25) and masks[1].max() == 1  # the mask bits of epoch 1
    with pytest.raises(StoreError, match=r"field F000 epochs 0-9: cannot read pixels \[3:17, 5:30\]"):
        reader.windows([0, 9], 3, 17, 5, 30)  # no epoch 9 in this store
    with pytest.raises(StoreError, match=r"field 'F9' is not in survey store"):
        store.PixelReader(small_store, "F9")
    broken = tmp_path / "broken.zarr"
    shutil.copytree(small_store, broken)
    shutil.rmtree(broken / "fields" / "F000" / "image")
    with pytest.raises(StoreError, match=r"field F000: cannot open the pixel arrays .*survey-proc validate"):
        store.PixelReader(broken, "F000")
