"""PSFEx models (survey_proc.photometry.psfex): the reader, the evaluation and the aperture correction.

The real models are the DECam exposures' of ../shared/data/real/legacypipe_decam/psfex
(legacypipe's merged layout); the synthetic ones are Moffat profiles written in PSFEx's own
layout and in legacypipe's, so the correction can be checked against the analytic Moffat's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from survey_proc.config import PhotometryConfig
from survey_proc.ingest import header_fwhm
from survey_proc.photometry.aperture import model_apcorr, moffat_apcorr
from survey_proc.photometry.psfex import PSFExError, curve_of_growth, psfex_apcorr, read_psfex, stamp_fwhm

DECAM = Path(__file__).resolve().parents[1].parent / "shared/data/real/legacypipe_decam"
IMAGES = sorted((DECAM / "images").glob("*_ooi_*.fits")) if DECAM.exists() else []
needs_decam = pytest.mark.skipif(not IMAGES,
                                 reason="the DECam cutouts ../shared/data/real/legacypipe_decam are not here")


def _decam(image: Path):
    """The model of an image's CCD (its EXTNAME) at the cutout's centre, and the image header's FWHM (px)."""
    with fits.open(image) as h:
        hd = h[1].header
        ny, nx = h[1].data.shape
    m = read_psfex(DECAM / "psfex" / (image.name.split(".")[0] + "-psfex.fits"), hd["EXTNAME"])
    return m, m.evaluate((nx - 1) / 2, (ny - 1) / 2), header_fwhm(hd)[0]


def _moffat_stamp(fwhm_px: float, half: int, step: float = 1.0, beta: float = 3.0, sub: int = 11) -> np.ndarray:
    """A Moffat(beta) of unit flux on a grid of ``step`` px, each cell integrated (``sub``^2 samples)."""
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    n = 2 * half + 1
    o = (np.arange(sub) + 0.5) / sub - 0.5
    c = (np.arange(n) - half)[:, None] + o[None, :]  # (n, sub): cell centres plus sub-offsets
    c = c.ravel() * step
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    img = (beta - 1.0) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** (-beta) * step**2
    return img.reshape(n, sub, n, sub).mean(axis=(1, 3))


def _write_psfex(path: Path, const: np.ndarray, samp: float = 1.0, deg: int = 1) -> Path:
    """PSFEx's own layout: PSF_DATA with the keywords in the header and PSF_MASK in one row."""
    n_terms = (deg + 1) * (deg + 2) // 2
    cube = np.zeros((n_terms, *const.shape), np.float32)
    cube[0] = const
    col = fits.Column(name="PSF_MASK", format=f"{cube.size}E", dim=f"({const.shape[1]},{const.shape[0]},{n_terms})",
                      array=cube[None])
    t = fits.BinTableHDU.from_columns([col], name="PSF_DATA")
    for k, v in {"LOADED": 100, "ACCEPTED": 90, "CHI2": 1.0, "POLNAXIS": 2, "POLGRP1": 1, "POLNAME1": "X_IMAGE",
                 "POLZERO1": 1024.5, "POLSCAL1": 2048.0, "POLGRP2": 1, "POLNAME2": "Y_IMAGE", "POLZERO2": 2048.5,
                 "POLSCAL2": 4096.0, "POLNGRP": 1, "POLDEG1": deg, "PSF_FWHM": 6.0, "PSF_SAMP": samp, "PSFNAXIS": 3,
                 "PSFAXIS1": const.shape[1], "PSFAXIS2": const.shape[0], "PSFAXIS3": n_terms}.items():
        t.header[k] = v
    fits.HDUList([fits.PrimaryHDU(), t]).writeto(path)
    return path


def _write_legacypipe(path: Path, consts: dict[str, np.ndarray], samp: float = 1.0) -> Path:
    """legacypipe's merged layout: one row per CCD, the keywords as lowercase columns (degree 0 terms only used)."""
    names = list(consts)
    shape = next(iter(consts.values())).shape
    cube = np.zeros((len(names), 3, *shape), np.float32)
    for i, nm in enumerate(names):
        cube[i, 0] = consts[nm]
    rows = len(names)
    cols = [fits.Column(name="psf_mask", format=f"{cube[0].size}E", dim=f"({shape[1]},{shape[0]},3)", array=cube),
            fits.Column(name="ccdname", format="3A", array=np.array(names))]
    for k, v, fmt in (("polname1", "X_IMAGE", "7A"), ("polname2", "Y_IMAGE", "7A"), ("polzero1", 1024.5, "D"),
                      ("polzero2", 2048.5, "D"), ("polscal1", 2048.0, "D"), ("polscal2", 4096.0, "D"),
                      ("poldeg1", 1, "K"), ("polnaxis", 2, "K"), ("polngrp", 1, "K"), ("psf_samp", samp, "D"),
                      ("psf_fwhm", 6.0, "D")):
        cols.append(fits.Column(name=k, format=fmt, array=np.array([v] * rows)))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    return path


@needs_decam
@pytest.mark.parametrize("image", IMAGES, ids=lambda p: p.name.split("_ls9")[0])
def test_decam_model_normalised_and_its_fwhm_the_headers(image: Path) -> None:
    m, psf, hf = _decam(image)
    assert m.poldeg == 2 and m.samp == 1.0 and m.ccdname == fits.getheader(image, 1)["EXTNAME"]
    assert psf.shape == (63, 63)
    assert abs(psf.sum() - 1.0) < 0.03  # PSFEx normalises the constant term: 1.013-1.023 here
    assert np.unravel_index(np.argmax(psf), psf.shape) == (31, 31)
    fwhm = stamp_fwhm(psf)
    assert abs(fwhm / hf - 1.0) < 0.10  # the CP header's FWHM: 0.92-0.97 of it
    # PSFEx's own PSF_FWHM (legacypipe's psf_fwhm) is the sample stars' SExtractor FWHM_IMAGE, 15-23 % above
    # the model's half-maximum width: pinned so that a change of either shows
    assert 1.1 < m.fwhm_px / fwhm < 1.3
    # the correction a header-FWHM block would get lies below the Moffat fallback's (DECam holds more within 1 FWHM)
    cfg = PhotometryConfig()
    a = psfex_apcorr(psf, hf, cfg)
    assert 1.15 < a < model_apcorr(cfg)


@needs_decam
def test_decam_ccd_row_must_match() -> None:
    path = DECAM / "psfex" / "c4d_150110_053718_ooi_z_ls9-psfex.fits"
    assert read_psfex(path).ccdname == "S4"  # one row: no name needed
    assert read_psfex(path, "s4").ccdname == "S4"
    with pytest.raises(PSFExError, match=r"c4d_150110_053718_ooi_z_ls9-psfex\.fits: no model for CCD 'S9'"):
        read_psfex(path, "S9")


@pytest.mark.parametrize("local_sky", ["none", "annulus"])
def test_moffat_shaped_model_gives_the_analytic_correction(tmp_path: Path, local_sky: str) -> None:
    # 10 px: at 6 px the pixelised Moffat's ratio is 0.7 % above the analytic one (0.27 % from sampling the
    # peak on a pixel grid, 0.23 % from integrating the pixels, 0.2 % from sep's subpix=5), as a star's is
    fwhm = 10.0
    path = _write_psfex(tmp_path / "moffat.psf", _moffat_stamp(fwhm, 45))
    m = read_psfex(path)
    psf = m.evaluate(700.0, 3000.0)  # the higher terms are zero: the same anywhere
    assert abs(psf.sum() - 1.0) < 0.01
    cfg = PhotometryConfig(local_sky=local_sky)
    assert psfex_apcorr(psf, fwhm, cfg) == pytest.approx(model_apcorr(cfg), rel=0.005)
    r = np.array([1.0, 2.0, 4.0]) * fwhm
    cog = curve_of_growth(psf, r)
    assert np.all(np.diff(cog) > 0)
    assert cog[2] / cog[0] == pytest.approx(moffat_apcorr(1.0, 4.0), rel=0.005)


def test_oversampled_legacypipe_layout_resamples_to_image_pixels(tmp_path: Path) -> None:
    fwhm = 10.0
    fine = _moffat_stamp(fwhm, 90, step=0.5)  # PSF_SAMP 0.5: model pixels of half an image pixel
    wide = _moffat_stamp(0.5 * fwhm, 90, step=0.5)
    path = _write_legacypipe(tmp_path / "merged-psfex.fits", {"N4": wide, "S9": fine}, samp=0.5)
    with pytest.raises(PSFExError, match=r"merged-psfex\.fits: 2 CCDs \(N4, S9\); say which"):
        read_psfex(path)
    m = read_psfex(path, "S9")
    psf = m.evaluate(50.0, 50.0)
    assert psf.shape == (91, 91)
    assert psf.sum() == pytest.approx(1.0, abs=0.01)
    assert stamp_fwhm(psf) == pytest.approx(fwhm, rel=0.03)
    assert psfex_apcorr(psf, fwhm, PhotometryConfig()) == pytest.approx(moffat_apcorr(1.0, 4.0), rel=0.005)
    assert stamp_fwhm(read_psfex(path, "N4").evaluate(50.0, 50.0)) == pytest.approx(0.5 * fwhm, rel=0.03)


def test_polynomial_terms_in_psfex_order(tmp_path: Path) -> None:
    m = read_psfex(_write_psfex(tmp_path / "d2.psf", _moffat_stamp(4.0, 15), deg=2))
    u, v = (100.0 + 1 - 1024.5) / 2048.0, (300.0 + 1 - 2048.5) / 4096.0  # 0-based pixel -> 1-based X_IMAGE
    assert np.allclose(m.terms(100.0, 300.0), [1, u, u * u, v, u * v, v * v])


def test_malformed_files_raise_naming_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notfits.psf"
    text.write_text("this is not FITS\n")
    with pytest.raises(PSFExError, match=r"notfits\.psf: not a readable FITS file"):
        read_psfex(text)
    nomask = tmp_path / "nomask.psf"
    t = fits.BinTableHDU.from_columns([fits.Column(name="FLUX", format="E", array=np.ones(3))], name="PSF_DATA")
    fits.HDUList([fits.PrimaryHDU(), t]).writeto(nomask)
    with pytest.raises(PSFExError, match=r"nomask\.psf: no PSF_MASK column"):
        read_psfex(nomask)
    short = _write_psfex(tmp_path / "short.psf", _moffat_stamp(4.0, 15), deg=1)
    with fits.open(short, mode="update") as h:
        h[1].header["POLDEG1"] = 3  # 10 terms claimed, 3 basis images held
    with pytest.raises(PSFExError, match=r"short\.psf: PSF_MASK of shape \(3, 31, 31\) does not hold the 10"):
        read_psfex(short)
    nokey = _write_psfex(tmp_path / "nokey.psf", _moffat_stamp(4.0, 15))
    with fits.open(nokey, mode="update") as h:
        del h[1].header["POLSCAL2"]
    with pytest.raises(PSFExError, match=r"nokey\.psf: PSFEx header lacks POLSCAL2"):
        read_psfex(nokey)
    m = read_psfex(_write_psfex(tmp_path / "small.psf", _moffat_stamp(4.0, 15)))
    with pytest.raises(ValueError, match="exceeds the stamp"):
        curve_of_growth(m.evaluate(0.0, 0.0), 16.0)
