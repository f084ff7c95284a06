"""Issue 21: the seeing FWHM from the FITS header, read at ingest, stored per epoch and used by a block
with too few stars to measure its own FWHM (in place of ``photometry.fwhm_default_px``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from survey_proc import store
from survey_proc.catalog.extract import FWHM_DEFAULT, FWHM_MEASURED, BlockInfo, extract_block
from survey_proc.config import RunConfig
from survey_proc.detect.registry import make_detector
from survey_proc.ingest import header_fwhm, ingest, read_fits
from survey_proc.photometry.aperture import moffat_apcorr
from survey_proc.stages.extract import epoch_fwhm_source
from survey_proc.tiling import tile_grid

DECAM = Path(__file__).resolve().parents[1].parent / "shared/data/real/legacypipe_decam/images"
SCALE = 0.262  # arcsec/px of the test WCS


def _wcs_cards(h: fits.Header, scale_arcsec: float = SCALE) -> fits.Header:
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"], h["CRPIX1"], h["CRPIX2"] = 150.0, 2.0, 32.0, 32.0
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -scale_arcsec / 3600, 0.0, 0.0, scale_arcsec / 3600
    return h


def _hdr(cards: dict[str, tuple], wcs: bool = False) -> fits.Header:
    h = fits.Header()
    for k, (v, c) in cards.items():
        h[k] = (v, c)
    return _wcs_cards(h) if wcs else h


# ------------------------------------------------------------------------------------------- reading the keyword
def test_fwhm_in_pixels_is_read_as_is():
    fwhm, src = header_fwhm(_hdr({"FWHM": (4.178819, "Median FWHM in pixels")}))
    assert fwhm == pytest.approx(4.178819) and src == "FWHM [px]"
    fwhm, src = header_fwhm(_hdr({"SEEING": (3.1, "[pix] Seeing FWHM")}))
    assert fwhm == pytest.approx(3.1) and src == "SEEING [px]"


def test_fwhm_in_arcsec_is_converted_with_the_wcs_pixel_scale():
    fwhm, src = header_fwhm(_hdr({"SEEING": (1.1, "[arcsec] seeing FWHM")}, wcs=True))
    assert fwhm == pytest.approx(1.1 / SCALE, rel=1e-6)  # 4.198 px
    assert src == f"SEEING [arcsec] / {SCALE:.4f} arcsec/px (WCS)"
    fwhm, _ = header_fwhm(_hdr({"PSF_FWHM": (0.9, 'PSF FWHM in arcsec')}, wcs=True))
    assert fwhm == pytest.approx(0.9 / SCALE, rel=1e-6)


def test_arcsec_without_a_wcs_is_refused_with_the_reason():
    fwhm, src = header_fwhm(_hdr({"SEEING": (1.1, "[arcsec] seeing FWHM")}))
    assert np.isnan(fwhm)
    assert src == "refused: SEEING = 1.1 arcsec: no celestial WCS gives the pixel scale to convert it"


@pytest.mark.parametrize("cards, reason", [
    ({"FWHM": (0.2, "FWHM in pixels")}, "refused: FWHM = 0.2 px is implausible (outside 0.5-50 px)"),
    ({"FWHM": (120.0, "[pixel]")}, "refused: FWHM = 120 px is implausible (outside 0.5-50 px)"),
    ({"SEEING": (20.0, "[arcsec]")}, "refused: SEEING = 20 arcsec = 76.3 px is implausible (outside 0.5-50 px)"),
    ({"FWHM": (1.2, "seeing")}, "refused: FWHM = 1.2: its comment 'seeing' does not say whether it is in pixels "
                                "or arcsec"),
    ({"FWHM": (0.27, "[arcsec/pixel] pixel scale")}, "refused: FWHM = 0.27: its comment '[arcsec/pixel] pixel "
                                                     "scale' does not say whether it is in pixels or arcsec"),
    ({"FWHM": ("NaN", "[pix]")}, "refused: FWHM = 'NaN' is not a finite number"),
    ({"FWHM": ("n/a", "[pix]")}, "refused: FWHM = 'n/a' is not a number"),
])
def test_implausible_or_unitless_values_are_refused_and_the_reason_recorded(cards, reason):
    fwhm, src = header_fwhm(_hdr(cards, wcs=True))
    assert np.isnan(fwhm)
    assert src == reason


def test_a_refused_keyword_lets_the_next_one_give_the_value():
    fwhm, src = header_fwhm(_hdr({"FWHM": (0.1, "[pix]"), "SEEING": (1.05, "[arcsec]")}, wcs=True))
    assert fwhm == pytest.approx(1.05 / SCALE, rel=1e-6) and src.startswith("SEEING [arcsec]")


def test_site_and_guider_seeing_and_pixel_scales_are_not_read():
    # DECam's primary header: the DIMM (site) and guider seeing, the pixel scale; none is the image's FWHM
    h = _hdr({"DIMMSEE": (0.712, "[arcsec] DIMM Seeing"), "G-SEEING": (2.367, "[arcsec] Guider average seeing"),
              "PIXSCAL1": (0.27, "[arcsec/pixel] Pixel scale, axis 1"),
              "PLTSCALE": (67.2, "Plate Scale arcsec per mm")}, wcs=True)
    fwhm, src = header_fwhm(h)
    assert np.isnan(fwhm) and src == ""


@pytest.mark.skipif(not DECAM.is_dir(), reason="the real DECam cutouts are not here")
def test_real_decam_ccd_header_gives_its_fwhm_in_pixels():
    e = read_fits(DECAM / "c4d_150110_053718_ooi_z_ls9.S4.fits")
    assert len(e) == 1
    assert e[0].header_fwhm_px == pytest.approx(4.178819) and e[0].header_fwhm_source == "FWHM [px]"


# ------------------------------------------------------------------------------------------- ingest -> store
def _fits(path: Path, mjd: float, cards: dict[str, tuple], rng: np.random.Generator) -> Path:
    h = _wcs_cards(fits.Header())
    h["MJD-OBS"], h["EXPTIME"], h["FILTER"] = mjd, 60.0, "r"
    h["GAIN"], h["RDNOISE"], h["SATURATE"] = 1.0, 5.0, 60000.0
    for k, (v, c) in cards.items():
        h[k] = (v, c)
    fits.PrimaryHDU(_star_image(rng), header=h).writeto(path)
    return path


def test_ingest_stores_the_header_fwhm_and_its_keyword_per_epoch(tmp_path):
    rng = np.random.default_rng(1)
    files = [_fits(tmp_path / "a.fits", 60000.1, {"FWHM": (4.5, "Median FWHM in pixels")}, rng),
             _fits(tmp_path / "b.fits", 60000.2, {"SEEING": (1.2, "[arcsec] seeing")}, rng),
             _fits(tmp_path / "c.fits", 60000.3, {"FWHM": (0.3, "[pix]")}, rng),
             _fits(tmp_path / "d.fits", 60000.4, {}, rng)]
    out = tmp_path / "s.zarr"
    rep = ingest(files, out, progress=False)
    assert store.validate_store(out, raise_on_error=False) == []
    (fid,) = store.list_fields(out)
    got = store.read_header_fwhm(out, fid)
    assert got is not None
    fwhm, src = got
    np.testing.assert_allclose(fwhm[[0, 1]], [4.5, 1.2 / SCALE], rtol=1e-6)
    assert np.isnan(fwhm[2]) and np.isnan(fwhm[3])
    assert src[0] == "FWHM [px]" and src[1].startswith("SEEING [arcsec] / 0.2620 arcsec/px")
    assert src[2] == "refused: FWHM = 0.3 px is implausible (outside 0.5-50 px)" and src[3] == ""
    assert rep["fwhm_refused"] == {f"{files[2]}[0]": src[2]}


def test_a_simulated_store_keeps_no_header_fwhm(grid_survey):
    assert store.read_header_fwhm(grid_survey["store"], "F000") is None


# ------------------------------------------------------------------------------------------- extraction
FWHM_TRUE = 4.5
FLUX = 40000.0
STAR_XY = (32.3, 31.6)


def _moffat(shape: tuple[int, int], x0: float, y0: float, fwhm: float, flux: float, beta: float = 3.0,
            oversample: int = 5) -> np.ndarray:
    """A Moffat star integrated over the pixels (``oversample``^2 sub-pixels), total ``flux``."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    yy, xx = np.indices(shape, dtype=float)
    img = np.zeros(shape)
    for dy in sub:
        for dx in sub:
            r2 = ((xx + dx - x0) ** 2 + (yy + dy - y0) ** 2) / alpha**2
            img += (1.0 + r2) ** (-beta)
    img *= (beta - 1.0) / (np.pi * alpha**2) / oversample**2
    return flux * img


def _star_image(rng: np.random.Generator, sky: float = 200.0, noise: float = 4.0) -> np.ndarray:
    """One bright Moffat star (FWHM 4.5 px) on a 64x64 sky: too few stars to measure the FWHM."""
    img = sky + _moffat((64, 64), *STAR_XY, FWHM_TRUE, FLUX) + rng.normal(0.0, noise, (64, 64))
    return img.astype(np.float32)


def _block(img: np.ndarray, **kw) -> tuple:
    cfg = RunConfig(detector="sep")
    tiles = tile_grid(*img.shape, cfg.tile_px, cfg.halo_px)
    r = extract_block(img, None, (0, 0), tiles, 1.0, 60000.0, cfg, make_detector(cfg), **kw)
    t = r.table
    j = int(np.argmin(np.hypot(t["x"] - STAR_XY[0], t["y"] - STAR_XY[1])))
    return r.info, t.iloc[j]


def test_a_block_with_too_few_stars_uses_the_header_fwhm():
    img = _star_image(np.random.default_rng(7))
    info, star = _block(img, header_fwhm_px=FWHM_TRUE, header_fwhm_source="FWHM [px]")
    assert info.n_fwhm_stars == 0  # one star: not enough to measure it
    assert info.fwhm_px == pytest.approx(FWHM_TRUE)  # the aperture radius is 1 x this
    assert info.fwhm_source == "header FWHM [px]"
    # the aperture holds the Moffat's share within 1 FWHM (radius 4.5 px); the correction brings it to the total
    share = 1.0 / moffat_apcorr(1.0, 4.0)
    assert star["flux_aper"] / FLUX == pytest.approx(share, rel=0.02)
    assert star["flux"] / FLUX == pytest.approx(1.0, rel=0.02)


def test_without_a_header_fwhm_the_default_stays():
    img = _star_image(np.random.default_rng(7))
    for kw in ({}, {"header_fwhm_px": float("nan"), "header_fwhm_source": "refused: ..."}):
        info, star = _block(img, **kw)
        assert info.fwhm_px == RunConfig().photometry.fwhm_default_px == 2.5
        assert info.fwhm_source == FWHM_DEFAULT
        assert star["flux"] / FLUX < 0.75  # an aperture of 2.5 px on a 4.5 px star: the bias of issue 21


def test_a_block_that_measures_its_fwhm_ignores_the_header(grid_survey):
    img = store.open_field(grid_survey["store"], "F000")["image"].values[0]
    cfg = RunConfig(detector="sep")
    tiles = tile_grid(*img.shape, cfg.tile_px, cfg.halo_px)
    det = make_detector(cfg)
    plain = extract_block(img, None, (0, 0), tiles, 1.0, np.inf, cfg, det)
    hdr = extract_block(img, None, (0, 0), tiles, 1.0, np.inf, cfg, det, header_fwhm_px=9.0,
                        header_fwhm_source="FWHM [px]")
    assert plain.info.n_fwhm_stars >= 5 and plain.info.fwhm_source == FWHM_MEASURED
    assert hdr.info.fwhm_px == plain.info.fwhm_px and hdr.info.fwhm_source == FWHM_MEASURED
    assert hdr.table.equals(plain.table)  # the same results: the header value is only a fallback


def test_the_epoch_record_says_where_its_fwhm_came_from():
    def info(src: str) -> BlockInfo:
        return BlockInfo(1, 4.5, 0 if src != FWHM_MEASURED else 9, 1.3, 0, 0.0, 1.0, 0, None, fwhm_source=src)

    assert epoch_fwhm_source([info(FWHM_MEASURED)] * 2, {}) == FWHM_MEASURED
    assert epoch_fwhm_source([info("header FWHM [px]")] * 2, {"header_fwhm_px": 4.5}) == "header FWHM [px]"
    assert (epoch_fwhm_source([info(FWHM_MEASURED), info("header FWHM [px]")], {})
            == "measured in 1 of 2 blocks; the others: header FWHM [px]")
    refused = "refused: FWHM = 0.3 px is implausible (outside 0.5-50 px)"
    assert (epoch_fwhm_source([info(FWHM_DEFAULT)], {"header_fwhm_px": float("nan"), "header_fwhm_source": refused})
            == f"{FWHM_DEFAULT} (header {refused})")


def test_the_pipeline_uses_the_ingested_header_fwhm(tmp_path, client):
    """Ingest -> store -> extract stage: the epoch's FWHM and its source come from the header."""
    from survey_proc.distributed.pipeline import run_pipeline
    from survey_proc.stages.extract import read_epoch
    from tests.conftest import run_config

    rng = np.random.default_rng(3)
    files = [_fits(tmp_path / "a.fits", 60000.1, {"FWHM": (FWHM_TRUE, "Median FWHM in pixels")}, rng),
             _fits(tmp_path / "b.fits", 60000.2, {"FWHM": (0.2, "[pix]")}, rng)]
    st = tmp_path / "s.zarr"
    ingest(files, st, progress=False)
    (fid,) = store.list_fields(st)
    out = tmp_path / "out"
    run_pipeline(run_config(st, out, tile_px=64, halo_px=16, reference="none", crossmatch={"region_px": 64}),
                 client=client)
    rec0, src0 = read_epoch(str(out), fid, 0)
    assert rec0.fwhm_px == pytest.approx(FWHM_TRUE) and rec0.extra["fwhm_source"] == "header FWHM [px]"
    j = int(np.argmin(np.hypot(src0["x"] - STAR_XY[0], src0["y"] - STAR_XY[1])))
    assert src0["flux"].iloc[j] / FLUX == pytest.approx(1.0, rel=0.03)
    rec1, _ = read_epoch(str(out), fid, 1)  # the refused header value: the default, and why
    assert rec1.fwhm_px == 2.5
    assert rec1.extra["fwhm_source"] == (f"{FWHM_DEFAULT} (header refused: FWHM = 0.2 px is implausible "
                                         "(outside 0.5-50 px))")
