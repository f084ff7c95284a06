"""The PSFEx aperture correction wired into the pipeline (issue 21): ingest --psfex -> store -> extraction.

Real components: FITS files written with astropy, PSFEx models in legacypipe's merged layout
(the helpers of tests/test_psfex.py), a Zarr store on disk, the block extraction and the
pipeline on a real LocalCluster. The stars are Moffat profiles of beta 4.5 (more light in
the core than the Moffat(3) fallback assumes: aperture correction 1.201 against 1.312), so
a block that uses the PSFEx correction recovers the total flux and one that uses the
fallback reads 9 % high.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from survey_proc import store
from survey_proc.catalog.extract import extract_block
from survey_proc.config import PhotometryConfig, RunConfig
from survey_proc.detect.registry import make_detector
from survey_proc.ingest import IngestError, ingest, match_psfex
from survey_proc.photometry.aperture import APCORR_MEASURED, APCORR_MOFFAT, model_apcorr
from survey_proc.photometry.psfex import psfex_apcorr, read_psfex
from survey_proc.stages.extract import epoch_apcorr_source
from survey_proc.tiling import tile_grid
from tests.test_header_fwhm import _moffat
from tests.test_psfex import _moffat_stamp, _write_legacypipe

FWHM_PX = 4.5
BETA = 4.5
FLUX = 40000.0
STAR_XY = (32.3, 31.6)
SHAPE = (64, 64)


def _image(rng: np.random.Generator, sky: float = 200.0, noise: float = 4.0) -> np.ndarray:
    """One bright Moffat(4.5) star (FWHM 4.5 px) on a 64x64 sky: too few stars to measure a correction."""
    img = sky + _moffat(SHAPE, *STAR_XY, FWHM_PX, FLUX, beta=BETA) + rng.normal(0.0, noise, SHAPE)
    return img.astype(np.float32)


def _fits(path: Path, mjd: float, rng: np.random.Generator, ccd: str = "S4") -> Path:
    """A DECam-like file: an empty primary HDU and the CCD's image extension (EXTNAME, FWHM in pixels)."""
    h = fits.Header()
    h["EXTNAME"] = ccd
    h["MJD-OBS"], h["EXPTIME"], h["FILTER"] = mjd, 60.0, "r"
    h["GAIN"], h["RDNOISE"], h["SATURATE"] = 1.0, 5.0, 60000.0
    h["FWHM"] = (FWHM_PX, "Median FWHM in pixels")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(_image(rng), header=h)]).writeto(path)
    return path


def _psf_model(path: Path, ccds: tuple[str, ...] = ("S4", "N10")) -> Path:
    """A legacypipe merged PSFEx table: per CCD a Moffat(4.5) of FWHM 4.5 px (41^2 px, PSF_SAMP 1)."""
    stamp = _moffat_stamp(FWHM_PX, 20, beta=BETA)
    return _write_legacypipe(path, {c: stamp for c in ccds})


def _expected(model_path: Path, ccd: str = "S4") -> float:
    """The correction ingest must store: the model at the 64^2 image's centre, the header FWHM, default radii."""
    m = read_psfex(model_path, ccd)
    return psfex_apcorr(m.evaluate((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2), FWHM_PX, PhotometryConfig())


# ------------------------------------------------------------------------------------------------ ingest
def test_an_image_finds_its_model_by_name():
    models = ["/p/c4d_1_ooi_z_ls9-psfex.fits", "/p/c4d_1_ooi_z-psfex.fits", "/p/other.psf"]
    assert match_psfex("/i/c4d_1_ooi_z_ls9.S4.fits", models) == models[0]  # the longest name that fits
    assert match_psfex("/i/c4d_1_ooi_z_ls9.fits.fz", models) == models[0]
    assert match_psfex("/i/other.fits", models) == models[2]
    assert match_psfex("/i/c4d_1_ooi_z_ls9x.S4.fits", models) is None  # a longer name is another image


def test_ingest_stores_the_psfex_correction_per_epoch(tmp_path):
    rng = np.random.default_rng(1)
    files = [_fits(tmp_path / "a.S4.fits", 60000.1, rng), _fits(tmp_path / "b.S4.fits", 60000.2, rng)]
    model = _psf_model(tmp_path / "a-psfex.fits")
    out = tmp_path / "s.zarr"
    rep = ingest(files, out, progress=False, psfex=[str(tmp_path / "*-psfex.fits")])
    assert store.validate_store(out, raise_on_error=False) == []
    assert rep["psfex"] == {str(files[0]): str(model)} and rep["psfex_missing"] == [str(files[1])]
    (fid,) = store.list_fields(out)
    got = store.read_header_apcorr(out, fid)
    assert got is not None
    apcorr, fwhm, src = got
    assert apcorr[0] == pytest.approx(_expected(model), rel=1e-6)
    assert apcorr[0] == pytest.approx(1.201, abs=0.01)  # the Moffat(4.5)'s, not the fallback's 1.312
    assert fwhm[0] == pytest.approx(FWHM_PX)  # the header FWHM the extraction falls back to
    assert src[0].startswith("a-psfex.fits[S4] at image centre (31.5, 31.5) px, image frame")
    assert np.isnan(apcorr[1]) and src[1] == ""  # no model for b: none, the Moffat stays


def test_an_ingest_without_psfex_keeps_no_correction(tmp_path):
    out = tmp_path / "s.zarr"
    ingest([_fits(tmp_path / "a.S4.fits", 60000.1, np.random.default_rng(1))], out, progress=False)
    assert store.read_header_apcorr(out, store.list_fields(out)[0]) is None


def test_an_unreadable_psfex_file_stops_the_ingest_naming_both_files(tmp_path):
    img = _fits(tmp_path / "a.S4.fits", 60000.1, np.random.default_rng(1))
    (tmp_path / "a-psfex.fits").write_bytes(b"not a FITS file at all" * 200)
    out = tmp_path / "s.zarr"
    with pytest.raises(IngestError, match=r"a\.S4\.fits\[1\]: its PSFEx model cannot be used: .*a-psfex\.fits: "
                                          r"not a readable FITS file"):
        ingest([img], out, progress=False, psfex=[str(tmp_path / "a-psfex.fits")])
    assert not out.exists()  # nothing written


def test_a_psfex_file_without_the_ccd_stops_the_ingest(tmp_path):
    img = _fits(tmp_path / "a.S4.fits", 60000.1, np.random.default_rng(1))
    _psf_model(tmp_path / "a-psfex.fits", ccds=("N10", "S9"))
    with pytest.raises(IngestError, match=r"a\.S4\.fits\[1\]: its PSFEx model cannot be used: .*a-psfex\.fits: "
                                          r"no model for CCD 'S4' \(it holds N10, S9\)"):
        ingest([img], tmp_path / "s.zarr", progress=False, psfex=[str(tmp_path)])


def test_psfex_that_matches_no_image_is_an_error(tmp_path):
    img = _fits(tmp_path / "a.S4.fits", 60000.1, np.random.default_rng(1))
    _psf_model(tmp_path / "zzz-psfex.fits")
    with pytest.raises(IngestError, match=r"--psfex: none of the 1 PSFEx file\(s\) \(zzz-psfex\.fits, \.\.\.\) "
                                          "matches an input image"):
        ingest([img], tmp_path / "s.zarr", progress=False, psfex=[str(tmp_path / "zzz-psfex.fits")])
    with pytest.raises(IngestError, match=r"--psfex .*nothing-psfex\.fits: matches no file"):
        ingest([img], tmp_path / "s.zarr", progress=False, psfex=[str(tmp_path / "nothing-psfex.fits")])


# ------------------------------------------------------------------------------------------------ extraction
def _block(img: np.ndarray, cfg: RunConfig | None = None, **kw) -> tuple:
    cfg = cfg or RunConfig(detector="sep")
    tiles = tile_grid(*img.shape, cfg.tile_px, cfg.halo_px)
    r = extract_block(img, None, (0, 0), tiles, 1.0, 60000.0, cfg, make_detector(cfg), header_fwhm_px=FWHM_PX,
                      header_fwhm_source="FWHM [px]", **kw)
    t = r.table
    j = int(np.argmin(np.hypot(t["x"] - STAR_XY[0], t["y"] - STAR_XY[1])))
    return r.info, t.iloc[j]


def test_a_block_with_too_few_stars_uses_the_psfex_correction(tmp_path):
    a = _expected(_psf_model(tmp_path / "a-psfex.fits"))
    img = _image(np.random.default_rng(7))
    info, star = _block(img, header_apcorr=a, header_apcorr_fwhm_px=FWHM_PX, header_apcorr_source="a-psfex.fits[S4]")
    assert info.n_apcorr_stars == 0 and info.fwhm_px == pytest.approx(FWHM_PX)
    assert info.apcorr == pytest.approx(a, rel=1e-12)
    assert info.apcorr_source == "psfex a-psfex.fits[S4]"
    assert star["flux"] == pytest.approx(star["flux_aper"] * a, rel=1e-12)
    assert star["flux"] / FLUX == pytest.approx(1.0, rel=0.02)  # the total, where the Moffat(3) reads 9 % high
    before, star0 = _block(img)  # no stored correction: the Moffat fallback, as before
    assert before.apcorr == pytest.approx(model_apcorr(PhotometryConfig())) and before.apcorr_source == APCORR_MOFFAT
    assert star0["flux"] / FLUX == pytest.approx(1.312 / 1.201, rel=0.02)
    assert star0["flux_aper"] == star["flux_aper"]


def test_a_stored_correction_of_another_fwhm_or_other_radii_is_not_used():
    img = _image(np.random.default_rng(7))
    info, _ = _block(img, header_apcorr=1.2, header_apcorr_fwhm_px=5.0, header_apcorr_source="x")
    assert info.apcorr == pytest.approx(model_apcorr(PhotometryConfig()))
    assert info.apcorr_source == (f"{APCORR_MOFFAT} (stored correction not used: computed at FWHM 5.000 px, the "
                                  "block's is 4.500 px)")
    cfg = RunConfig(detector="sep", photometry=PhotometryConfig(aperture_fwhm=1.5))
    info, _ = _block(img, cfg, header_apcorr=1.2, header_apcorr_fwhm_px=FWHM_PX, header_apcorr_source="x")
    assert info.apcorr == pytest.approx(model_apcorr(cfg.photometry))
    assert info.apcorr_source == (f"{APCORR_MOFFAT} (stored correction not used: other radii: aperture_fwhm 1.5 "
                                  "(stored: 1.0))")


def test_a_block_with_enough_stars_measures_its_own(grid_survey):
    img = store.open_field(grid_survey["store"], "F000")["image"].values[0]
    cfg = RunConfig(detector="sep")
    tiles = tile_grid(*img.shape, cfg.tile_px, cfg.halo_px)
    det = make_detector(cfg)
    plain = extract_block(img, None, (0, 0), tiles, 1.0, np.inf, cfg, det)
    stored = extract_block(img, None, (0, 0), tiles, 1.0, np.inf, cfg, det, header_apcorr=2.0,
                           header_apcorr_fwhm_px=plain.info.fwhm_px, header_apcorr_source="x")
    assert plain.info.n_apcorr_stars >= 5 and plain.info.apcorr_source == APCORR_MEASURED
    assert stored.info == plain.info
    assert stored.table.equals(plain.table)  # the stored correction is only a fallback


def test_a_refused_measurement_falls_back_and_says_why(grid_survey, monkeypatch):
    """A block whose measured correction is refused (:func:`apcorr_refusal`) takes the stored PSFEx one or the
    model's, and its source says why the measurement was not used."""
    import survey_proc.photometry.aperture as A

    img = store.open_field(grid_survey["store"], "F000")["image"].values[0]
    cfg = RunConfig(detector="sep")
    tiles = tile_grid(*img.shape, cfg.tile_px, cfg.halo_px)
    det = make_detector(cfg)
    plain = extract_block(img, None, (0, 0), tiles, 1.0, np.inf, cfg, det)
    why = "measured 0.213 on 5 stars refused: below 1"
    monkeypatch.setattr(A, "aperture_correction", lambda *a, **k: (A.model_apcorr(cfg.photometry), 0, why))
    refused = extract_block(img, None, (0, 0), tiles, 1.0, np.inf, cfg, det)
    assert refused.info.n_apcorr_stars == 0 and refused.info.apcorr == pytest.approx(model_apcorr(cfg.photometry))
    assert refused.info.apcorr_source == f"{APCORR_MOFFAT} ({why})"
    stored = extract_block(img, None, (0, 0), tiles, 1.0, np.inf, cfg, det, header_apcorr=1.25,
                           header_apcorr_fwhm_px=plain.info.fwhm_px, header_apcorr_source="x")
    assert stored.info.apcorr == 1.25 and stored.info.apcorr_source == f"psfex x ({why})"
    assert np.allclose(stored.table["flux"], stored.table["flux_aper"] * 1.25)


def test_the_epoch_record_says_where_its_apcorr_came_from():
    from survey_proc.catalog.extract import BlockInfo

    def info(src: str) -> BlockInfo:
        return BlockInfo(1, 4.5, 0, 1.3, 0 if src != APCORR_MEASURED else 9, 0.0, 1.0, 0, None, apcorr_source=src)

    assert epoch_apcorr_source([info(APCORR_MEASURED)] * 2) is None
    assert epoch_apcorr_source([info("")]) is None  # no aperture correction (PNet's own totals)
    assert epoch_apcorr_source([info("psfex a[S4]")] * 2) == "psfex a[S4]"
    assert (epoch_apcorr_source([info(APCORR_MEASURED), info(APCORR_MOFFAT)])
            == f"measured in 1 of 2 blocks; the others: {APCORR_MOFFAT}")


# ------------------------------------------------------------------------------------------------ pipeline
def test_the_pipeline_uses_the_ingested_psfex_correction_and_old_stores_still_run(tmp_path, client):
    """Ingest --psfex -> store -> extract stage; a store without the arrays (ingested before) runs as before."""
    from survey_proc.distributed.pipeline import run_pipeline
    from survey_proc.stages.extract import read_epoch
    from tests.conftest import run_config

    rng = np.random.default_rng(3)
    img = _fits(tmp_path / "a.S4.fits", 60000.1, rng)
    model = _psf_model(tmp_path / "a-psfex.fits")
    results = {}
    for name, psfex in (("with", [str(model)]), ("without", None)):
        st = tmp_path / f"{name}.zarr"
        ingest([img], st, progress=False, psfex=psfex)
        (fid,) = store.list_fields(st)
        out = tmp_path / f"out_{name}"
        run_pipeline(run_config(st, out, tile_px=64, halo_px=16, reference="none", crossmatch={"region_px": 64}),
                     client=client)
        rec, src = read_epoch(str(out), fid, 0)
        j = int(np.argmin(np.hypot(src["x"] - STAR_XY[0], src["y"] - STAR_XY[1])))
        results[name] = (rec, float(src["flux"].iloc[j]))
    rec, flux = results["with"]
    assert rec.apcorr == pytest.approx(_expected(model), rel=1e-6)
    assert rec.apcorr_source is not None and rec.apcorr_source.startswith("psfex a-psfex.fits[S4] at image centre")
    assert flux / FLUX == pytest.approx(1.0, rel=0.03)
    rec0, flux0 = results["without"]
    assert store.read_header_apcorr(tmp_path / "without.zarr", fid) is None
    assert rec0.apcorr == pytest.approx(model_apcorr(PhotometryConfig())) and rec0.apcorr_source == APCORR_MOFFAT
    assert flux0 / flux == pytest.approx(model_apcorr(PhotometryConfig()) / rec.apcorr, rel=1e-6)
