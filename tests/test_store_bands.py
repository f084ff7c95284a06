"""Store format 2: a band per epoch; format-1 stores (one root band) stay readable."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from survey_proc import store
from survey_proc.errors import StoreError, StoreValidationError


def _meta(mjd, band=None):
    n = len(mjd)
    return store.EpochMeta(mjd=np.asarray(mjd, float), exptime_s=np.full(n, 30.0), airmass=np.full(n, np.nan),
                           wcs=[""] * n, source_file=[f"f{m}.fits" for m in mjd], band=band)


def _field(path, fid, n_epochs=0):
    store.create_field(path, fid, ny=8, nx=8, n_epochs=n_epochs, gain_e_per_adu=1.0, read_noise_e=3.0,
                       saturation_adu=6e4, zeropoint_nominal=25.0)


def _make_format1(path, band="i"):
    """A store as format 1 wrote it: no ``band`` variable, the band in the root attributes."""
    store.create_store(path, band=band, pixel_scale_arcsec=0.4)
    _field(path, "A", 2)
    store.write_epoch_meta(path, "A", 0, _meta([1.0, 2.0]))
    g = zarr.open_group(str(path))
    del g["fields/A/band"]
    g.attrs["survey_proc_format"] = 1
    return path


def test_band_per_epoch_round_trip(tmp_path):
    path = tmp_path / "b.zarr"
    store.create_store(path, band="g", pixel_scale_arcsec=0.4)
    assert zarr.open_group(str(path)).attrs["survey_proc_format"] == 2
    _field(path, "B")
    _field(path, "A")
    store.append_epochs(path, "B", np.zeros((3, 8, 8)), _meta([1.0, 2.0, 3.0], [" z ", "g", "r"]))
    store.append_epochs(path, "A", np.zeros((2, 8, 8)), _meta([1.0, 2.0], ["r", "i"]))
    store.append_epochs(path, "A", np.zeros((1, 8, 8)), _meta([3.0]))  # no band given: the root's
    table = store.read_epoch_table(path, "A")
    assert table["band"].tolist() == ["r", "i", "g"] and table["band"].dtype.kind == "U"
    assert store.read_epoch_table(path, "B")["band"].tolist() == ["z", "g", "r"]
    assert store.store_bands(path) == ["r", "i", "g", "z"]  # field A (sorted first), then B
    assert store.bands_per_epoch(path)
    assert store.open_field(path, "B")["band"].values.tolist() == ["z", "g", "r"]
    assert store.validate_store(path) == []


def test_format1_store_reads_as_one_band(tmp_path):
    path = _make_format1(tmp_path / "f1.zarr", band="i")
    assert store.validate_store(path) == []
    assert not store.bands_per_epoch(path)
    assert store.read_epoch_table(path, "A")["band"].tolist() == ["i", "i"]
    assert store.store_bands(path) == ["i"]
    assert store.open_field(path, "A")["band"].values.tolist() == ["i", "i"]
    # epochs of the root band (or none given) can still be appended; fields added stay format 1
    store.append_epochs(path, "A", np.zeros((1, 8, 8)), _meta([3.0], ["i"]))
    _field(path, "C", 0)
    assert "band" not in zarr.open_group(str(path))["fields/C"]
    assert store.validate_store(path, epoch_checks=False) == []


def test_format1_store_without_band_attribute(tmp_path):
    path = _make_format1(tmp_path / "f1.zarr")
    del zarr.open_group(str(path)).attrs["band"]
    assert store.read_epoch_table(path, "A")["band"].tolist() == ["", ""]
    assert store.store_bands(path) == [""]


def test_format1_store_refuses_another_band(tmp_path):
    path = _make_format1(tmp_path / "f1.zarr", band="i")
    with pytest.raises(StoreError, match=r"field 'A' is in a format-1 store, which has one band for all epochs "
                                         r"\('i'\); the new epochs have band\(s\) r\. Ingest them into a new store"):
        store.append_epochs(path, "A", np.zeros((1, 8, 8)), _meta([3.0], ["r"]))
    assert store.image_shape(path, "A")[0] == 2  # nothing was resized


def test_format2_field_without_band_variable_is_reported(tmp_path):
    path = tmp_path / "b.zarr"
    store.create_store(path, band="g", pixel_scale_arcsec=0.4)
    _field(path, "A", 1)
    store.write_epoch_meta(path, "A", 0, _meta([1.0]))
    del zarr.open_group(str(path))["fields/A/band"]
    with pytest.raises(StoreValidationError, match=r"field 'A', variable 'band': missing \(required by format 2"):
        store.validate_store(path)


@pytest.mark.parametrize("version, match", [
    (3, r"format version 3 is not supported \(this survey-proc reads versions 1 and 2\); the store was written by "
        r"a newer survey-proc: upgrade survey-proc, or re-create the store"),
    ("two", r"format version 'two' is not supported \(this survey-proc reads versions 1 and 2\); re-create the "
            r"store with this survey-proc"),
    (0, r"format version 0 is not supported"),
])
def test_unknown_format_versions_are_refused(tmp_path, version, match):
    path = tmp_path / "b.zarr"
    store.create_store(path, band="g", pixel_scale_arcsec=0.4)
    _field(path, "A", 1)
    store.write_epoch_meta(path, "A", 0, _meta([1.0]))
    zarr.open_group(str(path)).attrs["survey_proc_format"] = version
    with pytest.raises(StoreValidationError, match=match):
        store.validate_store(path)


def test_epoch_meta_band_length_is_checked():
    with pytest.raises(StoreError, match=r"epoch metadata: band has 1 entries, mjd has 2"):
        _meta([1.0, 2.0], ["g"])
