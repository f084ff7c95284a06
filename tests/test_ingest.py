"""FITS ingest: round trip from a simulated store, headers, masks, appending, errors on bad files."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.time import Time

from survey_proc import store
from survey_proc.ingest import IngestError, ingest, read_fits
from survey_proc.simulate import load_scenario, simulate_survey
from tests.conftest import CLEAN

# the project's real plate (outside the repository; the test is skipped where it is absent)
REAL = str(Path(__file__).resolve().parents[1].parent / "shared/data/real/M6707HH.fits")


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ingest") / "sim.zarr"
    scn = load_scenario("dense", {**CLEAN, "size_px": 64, "n_epochs": 4, "n_fields": 2, "seed": 31,
                                  "star_density_per_px2": 0.01})
    simulate_survey(scn, out, workers=0, progress=False)
    return {"store": out, "scn": scn}


def _header(mjd: float, exptime: float, wcs_text: str, *, iso: bool) -> fits.Header:
    h = fits.Header.fromstring(wcs_text.strip(), sep="\n") if wcs_text else fits.Header()
    start = mjd - exptime / 2 / 86400
    if iso:
        h["DATE-OBS"] = Time(start, format="mjd", scale="utc").isot
    else:
        h["MJD-OBS"] = start
    h["EXPTIME"] = exptime
    h["GAIN"], h["RDNOISE"], h["SATURATE"] = 1.5, 5.0, 60000.0
    h["OBJECT"] = "SIMFIELD"
    return h


def _write_mef(sim: dict, tmp_path, with_wcs: bool) -> list:
    """One MEF per epoch, one extension per field (CCD), as a camera writes them."""
    paths = []
    fids = store.list_fields(sim["store"])
    for e in range(4):
        hdus = [fits.PrimaryHDU()]
        for fid in fids:
            ds = store.open_field(sim["store"], fid)
            img = ds["image"].values[e]
            t = store.read_epoch_table(sim["store"], fid)
            h = _header(float(t["mjd"][e]), float(t["exptime"][e]), str(t["wcs"][e]) if with_wcs else "",
                        iso=e % 2 == 1)
            hdus.append(fits.ImageHDU(img, header=h, name=fid))
        p = tmp_path / f"exp{e}.fits"
        fits.HDUList(hdus).writeto(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("with_wcs", [True, False])
def test_mef_round_trip_gives_the_simulated_store(sim, tmp_path, with_wcs):
    paths = _write_mef(sim, tmp_path, with_wcs)
    out = tmp_path / "ingested.zarr"
    rep = ingest(paths, out, field_key="OBJECT", band="i")
    assert store.validate_store(out, raise_on_error=False) == []
    assert sorted(rep["fields"]) == ["SIMFIELD_F000", "SIMFIELD_F001"]
    for fid in ("F000", "F001"):
        a = store.open_field(sim["store"], fid)
        b = store.open_field(out, f"SIMFIELD_{fid}")
        np.testing.assert_array_equal(a["image"].values, b["image"].values)
        np.testing.assert_allclose(b["mjd"].values, a["mjd"].values, atol=2e-8)  # ms precision of ISO dates
        np.testing.assert_array_equal(b["exptime"].values, a["exptime"].values)
        ta, tb = store.read_epoch_table(sim["store"], fid), store.read_epoch_table(out, f"SIMFIELD_{fid}")
        assert all(bool(w) == with_wcs for w in tb["wcs"])
        if with_wcs:
            from astropy.wcs import WCS

            wa = WCS(fits.Header.fromstring(ta["wcs"][2], sep="\n"))
            wb = WCS(fits.Header.fromstring(tb["wcs"][2], sep="\n"))
            np.testing.assert_allclose(wb.all_pix2world([[10.0, 20.0]], 0), wa.all_pix2world([[10.0, 20.0]], 0),
                                       atol=1e-9)
    attrs = store.field_attrs(out, "SIMFIELD_F000")
    assert attrs["gain_e_per_adu"] == 1.5 and attrs["read_noise_e"] == 5.0 and attrs["saturation_adu"] == 60000.0
    assert rep["missing"][str(paths[0])] == ["AIRMASS"]  # reported, not invented


def test_ingesting_twice_and_appending_a_later_night_adds_no_duplicates(sim, tmp_path):
    paths = _write_mef(sim, tmp_path, True)
    out = tmp_path / "app.zarr"
    ingest(paths[:2], out, field_key="OBJECT")
    rep = ingest(paths[:3], out, field_key="OBJECT", append=True)  # 2 again + 1 new
    assert rep["fields"]["SIMFIELD_F000"] == {"added": 1, "skipped_already_ingested": 2, "bands": [""],
                                              "saturation_adu": 60000.0,
                                              "saturation_source": "header SATURATE of exp0.fits[1]"}
    rep = ingest(paths, out, field_key="OBJECT", append=True)
    assert {k: rep["fields"]["SIMFIELD_F001"][k] for k in ("added", "skipped_already_ingested")} == {
        "added": 1, "skipped_already_ingested": 3}
    assert store.image_shape(out, "SIMFIELD_F000")[0] == 4
    np.testing.assert_array_equal(store.open_field(out, "SIMFIELD_F001")["image"].values,
                                  store.open_field(sim["store"], "F001")["image"].values)
    # an exposure earlier than the field's last epoch cannot be appended: the store keeps time order
    early = tmp_path / "early.fits"
    with fits.open(paths[0]) as hl:
        for h in hl[1:]:
            h.header["MJD-OBS"] = h.header.get("MJD-OBS", 60999.0) - 1.0
            h.header.remove("DATE-OBS", ignore_missing=True)
        hl.writeto(early)
    with pytest.raises(Exception, match=r"is not after the last epoch"):
        ingest([early], out, field_key="OBJECT", append=True)
    with pytest.raises(IngestError, match=r"already exists; pass --append"):
        ingest(paths, out, field_key="OBJECT")


def _single(tmp_path, data, name="x.fits", **cards) -> str:
    h = fits.Header()
    for k, v in cards.items():
        h[k.replace("_", "-")] = v
    p = tmp_path / name
    fits.PrimaryHDU(data, header=h).writeto(p)
    return str(p)


def test_header_times_exptime_units_and_pixel_scaling(tmp_path):
    img = np.arange(100, dtype=np.int16).reshape(10, 10)
    p = _single(tmp_path, img, DATE_OBS="29/11/51", UT="12:07:00", EXPOSURE=(50.0, "Exposure time minutes"),
                GAIN=2.0, RDNOISE=4.0)
    e = read_fits(p)[0]
    assert e.exptime_s == 3000.0
    assert e.mjd == pytest.approx(Time("1951-11-29T12:07:00", scale="utc").mjd + 1500 / 86400, abs=1e-9)
    assert e.saturation == 32767.0 and "SATURATE" in e.missing and "AIRMASS" in e.missing
    # BSCALE/BZERO: astropy applies them; the store gets physical ADU as float32
    hdu = fits.PrimaryHDU(np.array([[0.5, 1000.5], [2.0, 16000.0]], dtype=np.float64))
    hdu.scale("int16", bscale=0.5, bzero=8192)
    hdu.header["JD"] = 2460000.5
    hdu.header["EXPTIME"], hdu.header["GAIN"], hdu.header["RDNOISE"] = 10.0, 1.0, 3.0
    q = tmp_path / "scaled.fits"
    hdu.writeto(q)
    e = read_fits(q)[0]
    np.testing.assert_allclose(e.image, [[0.5, 1000.5], [2.0, 16000.0]])
    assert e.saturation is None  # a scaled integer image: its type's maximum says nothing
    assert e.image.dtype == np.float32 and e.mjd == pytest.approx(60000.0 + 5 / 86400)


def test_an_sdss_header_with_its_time_of_day_in_taihms_is_read_as_tai(tmp_path):
    # SDSS frames: DATE-OBS holds only the date; TAIHMS the TAI time of the exposure's start
    p = _single(tmp_path, np.zeros((4, 4), np.float32), DATE_OBS="2000-09-27", TAIHMS="02:50:45.01",
                EXPTIME="53.907456", GAIN=1.0, RDNOISE=3.0)
    e = read_fits(p)[0]
    assert e.timescale == "tai" and e.exptime_s == pytest.approx(53.907456)
    assert e.mjd == pytest.approx(Time("2000-09-27T02:50:45.01", scale="tai").mjd + 53.907456 / 2 / 86400,
                                  abs=1e-9)


def test_nan_regions_bad_pixel_extension_and_saturation_are_masked(tmp_path):
    img = np.full((8, 8), 100.0, np.float32)
    img[0:2, 0:3] = np.nan
    img[5, 5] = 70000.0
    bpm = np.zeros((8, 8), np.uint8)
    bpm[:, 7] = 1
    h = fits.Header()
    h["MJD-OBS"], h["EXPTIME"], h["GAIN"], h["RDNOISE"], h["SATURATE"] = 60000.0, 30.0, 1.0, 3.0, 65000.0
    p = tmp_path / "masked.fits.gz"
    raw = tmp_path / "masked.fits"
    fits.HDUList([fits.PrimaryHDU(img, header=h), fits.ImageHDU(bpm, name="BPM")]).writeto(raw)
    with open(raw, "rb") as f, gzip.open(p, "wb") as g:
        shutil.copyfileobj(f, g)
    e, = read_fits(p)  # compressed, and the BPM extension is not an exposure
    assert np.all(e.mask[0:2, 0:3] & 1) and np.all(e.mask[:, 7] & 1) and e.mask[5, 5] == 2
    assert e.mask.sum() == 6 + 8 + 2 - 0 and e.mask[3, 3] == 0


@pytest.mark.parametrize("cards, match", [
    ({"EXPTIME": 10.0, "GAIN": 1.0, "RDNOISE": 3.0}, r"x\.fits\[0\]: no observation time: none of MJD-MID, MJD-OBS"),
    ({"DATE_OBS": "Nov 29 1951", "GAIN": 1.0, "RDNOISE": 3.0}, r"DATE-OBS = 'Nov 29 1951' is not a date"),
    ({"DATE_OBS": "2024-03-01", "GAIN": 1.0, "RDNOISE": 3.0},
     r"has no time of day and there is no TIME-OBS/UT/UTSTART/TAIHMS"),
    ({"MJD_OBS": 60000.0, "TIMESYS": "GPS", "GAIN": 1.0, "RDNOISE": 3.0}, r"TIMESYS = 'gps' is not supported"),
])
def test_missing_or_odd_headers_name_the_file_and_keyword(tmp_path, cards, match):
    p = _single(tmp_path, np.zeros((4, 4), np.float32), **cards)
    with pytest.raises(IngestError, match=match):
        read_fits(p)


def test_bad_files_and_missing_detector_values_are_clear_errors(tmp_path):
    p = _single(tmp_path, np.zeros((16, 16), np.float32), MJD_OBS=60000.0, EXPTIME=10.0)
    with pytest.raises(IngestError, match=r"x\.fits\[0\]: no gain in the header .*; pass --gain in e-/ADU, from the "
                                          r"instrument's documentation .*\(this image's sky mean is not positive"):
        ingest([p], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()  # nothing written
    # a sky-limited image in ADU (gain 2 e-/ADU, 800 e- of sky): the message suggests its gain
    sky = np.random.default_rng(8).poisson(800.0, (64, 64)).astype(np.float32) / 2.0
    q = _single(tmp_path, sky, name="sky.fits", MJD_OBS=60000.0, EXPTIME=10.0, RDNOISE=3.0)
    with pytest.raises(IngestError, match=r"gain ~ sky mean / sky variance \(ADU\), which is [\d.]+ e-/ADU for this"):
        ingest([q], tmp_path / "t.zarr", progress=False)
    from survey_proc.ingest import sky_gain_estimate

    assert sky_gain_estimate(sky) == pytest.approx(2.0, rel=0.05)
    r = _single(tmp_path, sky, name="rn.fits", MJD_OBS=60000.0, EXPTIME=10.0, GAIN=2.0)
    with pytest.raises(IngestError, match=r"rn\.fits\[0\]: no read noise in the header \(looked for RDNOISE, "
                                          r"READNOIS, RON, READNOISE\); pass --read-noise in electrons"):
        ingest([r], tmp_path / "u.zarr", progress=False)
    trunc = tmp_path / "trunc.fits"
    trunc.write_bytes(open(p, "rb").read()[:3000])
    with pytest.raises(IngestError, match=r"trunc\.fits"):
        read_fits(trunc)
    table = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])]
                 ).writeto(table)
    with pytest.raises(IngestError, match=r"table\.fits: no 2-D image HDU in the file"):
        read_fits(table)
    with pytest.raises(IngestError, match=r"no input files"):
        ingest([], tmp_path / "t.zarr")


@pytest.mark.skipif(not Path(REAL).exists(), reason="the real plate ../shared/data/real/M6707HH.fits is not here")
def test_the_real_plate_ingests_with_its_odd_header(tmp_path):
    out = tmp_path / "m67.zarr"
    rep = ingest([REAL], out, gain=1.0, read_noise=5.0)
    fid, = rep["fields"]
    t = store.read_epoch_table(out, fid)
    assert t["exptime"][0] == 3000.0  # EXPOSURE in minutes
    assert t["mjd"][0] == pytest.approx(Time("1951-11-29T12:07:00", scale="utc").mjd + 1500 / 86400, abs=1e-8)
    assert store.image_shape(out, fid) == (1, 1059, 1059)
    assert rep["missing"][REAL] == ["AIRMASS", "FILTER", "SATURATE"]
    # no FILTER: band unknown (""); a plate has no pile-up at its maximum: saturation is the int16 maximum
    assert t["band"].tolist() == [""] and store.field_attrs(out, fid)["saturation_adu"] == 32767.0
    assert "data type int16" in store.field_attrs(out, fid)["saturation_source"]


def test_airmass_is_computed_from_pointing_site_and_time_when_missing(tmp_path):
    from astropy import units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord

    p = _single(tmp_path, np.zeros((4, 4), np.float32), DATE_OBS="2024-03-01T05:00:00", EXPTIME=600.0, GAIN=1.0,
                RDNOISE=3.0, RA="08:51:20.0", DEC="+11:48:00", SITELAT="+33:21:22", SITELONG="-116:51:53")
    e = read_fits(p)[0]
    t = Time("2024-03-01T05:05:00", scale="utc")
    loc = EarthLocation.from_geodetic(lon=-(116 + 51 / 60 + 53 / 3600) * u.deg, lat=(33 + 21 / 60 + 22 / 3600) * u.deg)
    alt = SkyCoord("08h51m20s", "+11d48m00s").transform_to(AltAz(obstime=t, location=loc)).alt.deg
    assert e.airmass == pytest.approx(1 / np.sin(np.radians(alt)), rel=1e-6) and "AIRMASS" not in e.missing
    # an explicit site works when the header has none
    q = _single(tmp_path, np.zeros((4, 4), np.float32), "y.fits", DATE_OBS="2024-03-01T05:00:00", EXPTIME=600.0,
                GAIN=1.0, RDNOISE=3.0, RA=132.8333, DEC=11.8)
    assert np.isnan(read_fits(q)[0].airmass)
    assert read_fits(q, site=(33.356, -116.865))[0].airmass == pytest.approx(e.airmass, rel=1e-3)


@pytest.mark.parametrize("with_wcs, mef", [(True, False), (False, False), (False, True)])
def test_ingested_fits_give_the_same_objects_and_light_curves_as_the_store(tmp_path, client, with_wcs, mef):
    """FITS from a jittered simulated survey (single-HDU or MEF, with or without WCS), ingested and run."""
    from survey_proc.catalog.registration import register
    from survey_proc.distributed.pipeline import run_pipeline
    from tests.conftest import run_config

    st = tmp_path / "sim.zarr"
    scn = load_scenario("dense", {"size_px": 192, "n_epochs": 6, "seed": 43, "psf_oversample": 5,
                                  "star_density_per_px2": 0.006, "jitter_px": 8.0, "rotation_jitter_deg": 0.3,
                                  "n_bad_columns": 0})
    simulate_survey(scn, st, workers=0, progress=False)
    paths = []
    ds = store.open_field(st, "F000")
    t = store.read_epoch_table(st, "F000")
    for e in range(6):
        h = _header(float(t["mjd"][e]), float(t["exptime"][e]), str(t["wcs"][e]) if with_wcs else "", iso=False)
        h["SATURATE"] = store.field_attrs(st, "F000")["saturation_adu"]
        p = tmp_path / f"e{e}.fits"
        bpm = fits.ImageHDU(ds["mask"].values[e], name="BPM")  # the camera's data-quality mask
        if mef:  # a camera's file: an empty primary header, the CCD as an extension
            hl = fits.HDUList([fits.PrimaryHDU(header=h), fits.ImageHDU(ds["image"].values[e], name="CCD1"), bpm])
        else:
            hl = fits.HDUList([fits.PrimaryHDU(ds["image"].values[e], header=h), bpm])
        hl.writeto(p)
        paths.append(p)
    ing = tmp_path / "ing.zarr"
    ingest(paths, ing, field_key="OBJECT", zeropoint_nominal=store.field_attrs(st, "F000")["zeropoint_nominal"])
    runs = {}
    for name, s in (("direct", st), ("ingested", ing)):
        out = tmp_path / f"out-{name}"
        run = run_pipeline(run_config(s, out, tile_px=192, halo_px=24, reference="none",
                                      crossmatch={"region_px": 192}), client=client)
        assert run["status"] == "complete", run["failures"]
        runs[name] = (pd.read_parquet(out / "objects"), pd.read_parquet(out / "lightcurves"), run)
    (oa, la, _), (ob, lb, rb) = runs["direct"], runs["ingested"]
    assert bool(rb["registration"]) != with_wcs  # registered exactly when there was no WCS
    # the two reference frames differ by the pointing of their reference epochs: align them
    reg = register(ob[["x", "y"]].to_numpy(), -ob["mag_median"].to_numpy(), oa[["x", "y"]].to_numpy(),
                   -oa["mag_median"].to_numpy())
    bx, by = reg.apply(ob["x"].to_numpy(), ob["y"].to_numpy())
    from survey_proc.evaluate import match_one_to_one

    i_a, i_b = match_one_to_one(oa["x"].to_numpy(), oa["y"].to_numpy(), bx, by, 0.5)
    bright = oa["mag_median"].to_numpy()[i_a] < 22
    assert len(i_a) >= 0.95 * min(len(oa), len(ob))
    # relative calibration: the level is the reference epoch's, so compare up to one constant
    dm = (ob["mag_median"].to_numpy()[i_b] - oa["mag_median"].to_numpy()[i_a])[bright]
    offset = float(np.median(dm))
    assert abs(offset) < 0.05 and np.median(np.abs(dm - offset)) < 0.005
    assert np.mean(oa["n_epochs"].to_numpy()[i_a] == ob["n_epochs"].to_numpy()[i_b]) > 0.95
    # light curves of bright matched objects: the same epochs, the same magnitudes
    ida, idb = oa["object_id"].to_numpy()[i_a][bright][:20], ob["object_id"].to_numpy()[i_b][bright][:20]
    for a_id, b_id in zip(ida, idb, strict=True):
        ca, cb = la[la["object_id"] == a_id], lb[lb["object_id"] == b_id]
        assert ca["epoch"].tolist() == cb["epoch"].tolist()
        np.testing.assert_allclose(cb["mjd"].to_numpy(), ca["mjd"].to_numpy(), atol=1e-7)
        np.testing.assert_allclose(cb["mag"].to_numpy() - offset, ca["mag"].to_numpy(), atol=0.02)


def test_cli_ingest_and_append_with_worker_processes(sim, tmp_path, capsys):
    from survey_proc.cli import main

    paths = [str(p) for p in _write_mef(sim, tmp_path, True)]
    out = tmp_path / "cli.zarr"
    assert main(["ingest", *paths[:2], "--out", str(out), "--field-key", "OBJECT", "--quiet"]) == 0
    assert main(["ingest", str(tmp_path / "exp*.fits"), "--out", str(out), "--field-key", "OBJECT", "--append",
                 "--workers", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "field SIMFIELD_F000: 2 epoch(s) added, 2 already ingested" in text and "MB/s" in text
    assert store.image_shape(out, "SIMFIELD_F001")[0] == 4
    assert main(["ingest", str(tmp_path / "nothing*.fits"), "--out", str(tmp_path / "n.zarr")]) == 1
    assert "nothing*.fits: matches no file" in capsys.readouterr().err


def test_copied_headers_are_a_clear_error_and_an_epoch_table_gives_each_file_its_time(tmp_path, capsys):
    from survey_proc.cli import main
    from survey_proc.ingest import read_epoch_table

    rng = np.random.default_rng(3)
    cards = {"DATE_OBS": "2000-09-27", "TAIHMS": "02:50:45.01", "EXPTIME": 53.9, "GAIN": 1.0, "RDNOISE": 3.0}
    files = [_single(tmp_path, rng.normal(100, 5, (16, 16)).astype(np.float32), name=f"band_{b}.fits", **cards)
             for b in "gri"]  # reprojected images whose headers are copies of one (as the SDSS set in ../shared)
    with pytest.raises(IngestError, match=r"band_g\.fits\[0\] and \S*band_[ri]\.fits\[0\] have the same mid-exposure "
                                          r"time \(MJD 51814\.118888\); .*give each file its time with --epoch-table"):
        ingest(files, tmp_path / "dup.zarr", progress=False)
    assert not (tmp_path / "dup.zarr").exists()  # nothing written
    table = tmp_path / "times.csv"
    table.write_text("file,mjd_mid,exptime_s,timescale\nband_r.fits,51814.1192,50.0,tai\n"
                     "band_i.fits,51814.1200,,\nband_g.fits,51814.1225,,TAI\n")
    et = read_epoch_table(table)
    assert et == {"band_r.fits": {"mjd_mid": 51814.1192, "exptime_s": 50.0, "timescale": "tai"},
                  "band_i.fits": {"mjd_mid": 51814.12}, "band_g.fits": {"mjd_mid": 51814.1225, "timescale": "tai"}}
    out = tmp_path / "s.zarr"
    assert main(["ingest", *files, "--out", str(out), "--epoch-table", str(table), "--quiet"]) == 0
    t = store.read_epoch_table(out, store.list_fields(out)[0])
    np.testing.assert_allclose(t["mjd"], [51814.1192, 51814.1200, 51814.1225])
    np.testing.assert_allclose(t["exptime"], [50.0, 53.9, 53.9])
    # a table that names a file not given, or has an unknown column, is refused before anything is read
    bad = tmp_path / "bad.csv"
    bad.write_text("file,mjd_mid\nband_z.fits,51814.2\n")
    with pytest.raises(IngestError, match=r"the epoch table names file\(s\) that are not among the inputs: "
                                          r"band_z\.fits"):
        ingest(files, tmp_path / "x.zarr", epoch_table=read_epoch_table(bad), progress=False)
    bad.write_text("file,mjd,exptime_s\nband_g.fits,51814.2,10\n")
    with pytest.raises(IngestError, match=r"needs a 'file' column and may have mjd_mid, exptime_s, timescale, band; "
                                          r"unknown column\(s\) mjd"):
        read_epoch_table(bad)


# ---------------------------------------------------------------- bands (store format 2)

REAL_DIR = Path(REAL).parent


@pytest.mark.parametrize("cards, band, key", [
    ({"FILTER": "  r  "}, "r", "FILTER"),  # whitespace stripped
    ({"BAND": "z", "FILTER": "z DECam SDSS c0004 9260.0 1520.0"}, "z", "BAND"),  # DECam: BAND is the short name
    ({"FILTNAM": "F555W"}, "F555W", "FILTNAM"),  # WFPC2
    ({"FILTER1": "CLEAR1L", "FILTER2": "F606W"}, "F606W", "FILTER2"),  # ACS: a clear position names no band
    ({"INSTRUME": "IRAC", "CHNLNUM": 2}, "IRAC2", "INSTRUME/CHNLNUM"),  # Spitzer IRAC channel 2 (4.5 um)
    ({"FILTER": "Open"}, "", None),
    ({}, "", None),
])
def test_header_band_keyword_forms(cards, band, key):
    from survey_proc.ingest import header_band

    h = fits.Header()
    for k, v in cards.items():
        h[k] = v
    assert header_band(h) == (band, key)


@pytest.mark.skipif(not (REAL_DIR / "gc_2mass_j.fits").exists(), reason="../shared/data/real is not here")
def test_real_headers_give_their_bands():
    from survey_proc.ingest import header_band

    expect = {"gc_2mass_j.fits": "J", "gc_2mass_h.fits": "H", "gc_2mass_k.fits": "K", "HorseHead.fits": "OG590",
              "M6707HH.fits": "", "spitzer_example_image.fits": "IRAC2",
              "sdss_r.fits.bz2": "g"}  # the SDSS r header is a copy of g's: --epoch-table's band column fixes it
    for name, band in expect.items():
        assert header_band(fits.getheader(REAL_DIR / name))[0] == band, name


def _band_files(tmp_path, bands, **extra):
    rng = np.random.default_rng(5)
    out = []
    for k, b in enumerate(bands):
        cards = {"MJD_OBS": 60000.0 + k, "EXPTIME": 30.0, "GAIN": 1.0, "RDNOISE": 3.0, **extra}
        if b is not None:
            cards["FILTER"] = b
        out.append(_single(tmp_path, rng.normal(100, 5, (16, 16)).astype(np.float32), name=f"b{k}.fits", **cards))
    return out


def test_band_from_header_option_and_epoch_table(tmp_path, capsys):
    from survey_proc.cli import main

    files = _band_files(tmp_path, ["g", " r ", "g"])
    out = tmp_path / "h.zarr"
    rep = ingest(files, out, progress=False)
    fid, = rep["fields"]
    assert store.read_epoch_table(out, fid)["band"].tolist() == ["g", "r", "g"]
    assert store.store_bands(out) == ["g", "r"] and store.bands_per_epoch(out)
    assert rep["fields"][fid]["bands"] == ["g", "r"]
    # --band overrides the headers; a band cell of the epoch table overrides --band
    table = tmp_path / "t.csv"
    table.write_text("file,band\nb1.fits, i \nb2.fits,\n")
    out2 = tmp_path / "o.zarr"
    assert main(["ingest", *files, "--out", str(out2), "--band", "V", "--epoch-table", str(table), "--quiet"]) == 0
    assert store.read_epoch_table(out2, fid)["band"].tolist() == ["V", "i", "V"]
    assert "; band(s) V, i" in capsys.readouterr().out


def test_a_field_mixing_unknown_and_known_bands_is_refused(tmp_path):
    files = _band_files(tmp_path, ["g", None, "r"])
    with pytest.raises(IngestError, match=r"field nopointing: \S*b1\.fits\[0\] name no band, while other epochs are "
                                          r"in band\(s\) g, r; a light curve must not mix bands\. Give every file its "
                                          r"band: --band for all files, a 'band' column in --epoch-table, or a FILTER"):
        ingest(files, tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()
    # no band anywhere: one unknown band (""), reported as a missing FILTER
    (tmp_path / "none").mkdir()
    none = _band_files(tmp_path / "none", [None, None])
    rep = ingest(none, tmp_path / "n.zarr", progress=False)
    assert store.store_bands(tmp_path / "n.zarr") == [""] and "FILTER" in rep["missing"][none[0]]
    # ... and appending a file with a band to that field is refused too
    later = _single(tmp_path, np.zeros((16, 16), np.float32), name="late.fits", MJD_OBS=60010.0, EXPTIME=30.0,
                    GAIN=1.0, RDNOISE=3.0, FILTER="g")
    with pytest.raises(IngestError, match=r"field nopointing: epochs already in the store have no band, while other "
                                          r"epochs are in band\(s\) g"):
        ingest([later], tmp_path / "n.zarr", append=True, progress=False)


def test_appending_another_band_to_a_format1_store_is_refused(tmp_path):
    import zarr

    first = _band_files(tmp_path, ["i"])
    out = tmp_path / "f1.zarr"
    ingest(first, out, progress=False)
    g = zarr.open_group(str(out))
    del g["fields/nopointing/band"]
    g.attrs["survey_proc_format"] = 1
    later = _single(tmp_path, np.zeros((16, 16), np.float32), name="late.fits", MJD_OBS=60010.0, EXPTIME=30.0,
                    GAIN=1.0, RDNOISE=3.0, FILTER="r")
    with pytest.raises(IngestError, match=r"f1\.zarr is a format-1 store, which has one band for all epochs "
                                          r"\('i'\); \S*late\.fits\[0\] has band 'r' \(FILTER\)\. Ingest the files "
                                          r"into a new store"):
        ingest([later], out, append=True, progress=False)
    rep = ingest([later], out, append=True, band="i", progress=False)  # the store's own band is fine
    assert rep["fields"]["nopointing"]["added"] == 1
    assert store.read_epoch_table(out, "nopointing")["band"].tolist() == ["i", "i"]


# ---------------------------------------------------------------- saturation from a pile-up at the maximum

def _clipped_frames(tmp_path, n=2, size=128, clip=3000, seed=4) -> list[str]:
    """int16 frames of 25 stars (peaks 200-30000 ADU over a 100-ADU sky) clipped at ``clip`` ADU, no SATURATE."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    xs, ys = rng.uniform(10, size - 10, 25), rng.uniform(10, size - 10, 25)
    peaks = np.geomspace(200, 30000, 25)
    paths = []
    for e in range(n):
        img = 100.0 + rng.normal(0, 5, (size, size))
        for x, y, p in zip(xs + 0.3 * e, ys, peaks, strict=True):
            img += p * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
        data = np.clip(np.round(img), -32768, clip).astype(np.int16)
        paths.append(_single(tmp_path, data, name=f"clip{e}.fits", MJD_OBS=60000.0 + 0.1 * e, EXPTIME=30.0,
                             GAIN=2.0, RDNOISE=5.0, FILTER="r"))
    return paths


def test_saturation_pileup_detects_a_clip_and_not_a_continuous_image():
    from survey_proc.ingest import saturation_pileup

    rng = np.random.default_rng(1)
    img = rng.normal(100, 5, (200, 200))
    img[50:54, 60:66] = 3000.0  # 24 clipped pixels
    level, n, top = saturation_pileup(img)
    assert (n, top) == (24, 3000.0) and 3000.0 - 3.0 < level < 3000.0
    stars = rng.normal(100, 5, (200, 200))
    yy, xx = np.mgrid[0:200, 0:200]
    for k, p in enumerate(np.geomspace(200, 20000, 30)):  # unclipped stars: about one pixel at the top
        stars += p * np.exp(-((xx - 6 * k - 10) ** 2 + (yy - 100) ** 2) / (2 * 1.5**2))
    assert saturation_pileup(stars) is None
    assert saturation_pileup(np.round(stars).astype(np.int16)) is None
    assert saturation_pileup(np.full((20, 20), 7.0)) is None  # flat: no range above the median


def test_int16_clipped_at_3000_is_estimated_masked_and_flagged_saturated(tmp_path, client, capsys):
    from survey_proc import vocab
    from survey_proc.cli import main
    from survey_proc.distributed.pipeline import run_pipeline
    from tests.conftest import run_config

    files = _clipped_frames(tmp_path)
    out = tmp_path / "clip.zarr"
    assert main(["ingest", *files, "--out", str(out), "--quiet"]) == 0
    assert re.search(r"saturation 2997\.\d+ ADU: estimated from a pile-up of \d+ pixels at 3000 ADU in "
                     r"clip[01]\.fits\[0\] \(--saturation overrides it\)", capsys.readouterr().out)
    fid, = store.list_fields(out)
    attrs = store.field_attrs(out, fid)
    assert 2995.0 < attrs["saturation_adu"] < 3000.0
    assert re.fullmatch(r"estimated from a pile-up of \d+ pixels at 3000 ADU in clip[01]\.fits\[0\]",
                        attrs["saturation_source"])
    ds = store.open_field(out, fid)
    img, mask = ds["image"].values, ds["mask"].values
    assert np.count_nonzero(img == 3000.0) > 100
    assert np.all(mask[img == 3000.0] & vocab.MASK_SATURATED) and not np.any(mask[img < 2990.0])
    # a header or an option still wins over the estimate
    assert read_fits(files[0], saturation=2500.0)[0].saturation_source == "option --saturation"
    # extraction (sep): every source with a clipped pixel within 2 px carries SATURATED, no other does
    run = run_pipeline(run_config(out, tmp_path / "run", tile_px=128, halo_px=16, reference="none",
                                  classify={"enabled": False}, crossmatch={"region_px": 128}), client=client)
    assert run["status"] == "complete", run["failures"]
    src = pd.read_parquet(tmp_path / "run" / "sources" / f"field={fid}" / "epoch=0.parquet")
    ys, xs = np.nonzero(img[0] >= 3000.0)
    near = np.array([np.hypot(xs - x, ys - y).min() < 2 for x, y in zip(src["x"], src["y"], strict=True)])
    sat = (src["flags"].to_numpy() & vocab.SATURATED) != 0
    assert near.sum() >= 10 and np.all(sat[near]) and not np.any(sat[~near])
