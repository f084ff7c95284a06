"""Extended sources (galaxies) are fitted but do not build the PSF (issue 21).

A 256^2 window of 92 Moffat stars (FWHM 3 px, 1e3-5e4 ADU) on a jittered grid (no blends)
and 8 brighter "galaxies" (Moffat FWHM 6 px, 5e4-1e5 ADU). Measured (seed 0):

=====================  ==============  =========  ===========================
ePSF built from         profile error   ePSF FWHM   median flux / true (stars)
=====================  ==============  =========  ===========================
all detections          0.200 (cap)     3.141      1.165
point-like (the mask)   0.200 (cap)     3.133      1.001
the stars alone         0.000           3.133      1.004
=====================  ==============  =========  ===========================

The galaxies, being the brightest, enter the analytic fit of the ePSF (its 25 brightest
stars) and pull a wide wing into it; the FWHM (the core) hardly moves, the fluxes do. The
profile error still counts the galaxies (their residual is not the PSF's, but leaving the
extended detections out of it made the dense simulation's errors too small: the issue's
results file); :func:`model_error_fraction`'s ``use`` measures it on the stars alone (0.000).
"""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc import vocab as F
from survey_proc.catalog.extract import extract_block
from survey_proc.config import load_config
from survey_proc.detect.registry import make_detector
from survey_proc.photometry import aperture
from survey_proc.photometry.epsf import build_epsf
from survey_proc.photometry.psffit import MoffatPSF
from survey_proc.photometry.psfphot import model_error_fraction, psf_photometry
from survey_proc.simulate.psf import build_bank
from survey_proc.simulate.stamps import render_stars
from survey_proc.tiling import tile_grid

SKY, GAIN, RN, FWHM = 100.0, 2.0, 5.0, 3.0


def _window(seed: int = 0, size: int = 256, n_gal: int = 8, gal_fwhm: float = 6.0):
    """Stars on a jittered grid, ``n_gal`` of them replaced by brighter wider blobs (ADU, sky included)."""
    rng = np.random.default_rng(seed)
    g = np.arange(16, size - 16, 24.0)
    gx, gy = np.meshgrid(g, g)
    x, y = gx.ravel() + rng.uniform(-3, 3, gx.size), gy.ravel() + rng.uniform(-3, 3, gx.size)
    gal = np.zeros(len(x), bool)
    gal[rng.choice(len(x), n_gal, replace=False)] = True
    flux = 10 ** rng.uniform(3.0, 4.7, len(x))
    flux[gal] = 10 ** rng.uniform(4.7, 5.0, n_gal)
    sig = float(np.sqrt(SKY / GAIN + (RN / GAIN) ** 2))
    star = build_bank("moffat", FWHM, oversample=5, base_radius_px=8, max_factor=4)
    blob = build_bank("moffat", gal_fwhm, oversample=5, base_radius_px=8, max_factor=4)
    img = (render_stars((size, size), x[~gal], y[~gal], flux[~gal], star, sig)
           + render_stars((size, size), x[gal], y[gal], flux[gal], blob, sig) + SKY)
    img = rng.poisson(img * GAIN) / GAIN + rng.normal(0, RN / GAIN, img.shape)
    return img, x, y, flux, sig, gal


@pytest.fixture(scope="module")
def window():
    img, x, y, flux, sig, gal = _window()
    data = img - SKY
    bad = np.zeros(img.shape, bool)
    fa, fe, _ = aperture.aperture_measure(data, sig, bad, None, x, y, FWHM, GAIN)
    ext = aperture.extended(data, bad, x, y, fa, fa / fe, FWHM, FWHM, sig, np.ones(len(x), bool))
    return img, data, bad, x, y, flux, sig, gal, ext


def _fit(window, point=None, stars_only=False):
    img, data, bad, x, y, flux, sig, gal, _ = window
    s = ~gal if stars_only else np.ones(len(x), bool)
    r = psf_photometry(img, bad, data, np.full(img.shape, SKY), sig, GAIN, 1e9, FWHM, x[s], y[s], flux[s],
                       np.arange(s.sum()), point=point)
    bright = (flux[s] > 1e4) & ~gal[s]
    return r, float(np.median(r.flux[bright] / flux[s][bright]))


def test_the_concentration_test_finds_exactly_the_galaxies(window) -> None:
    *_, gal, ext = window
    assert gal.sum() == 8 and np.array_equal(ext, gal)


def test_with_the_mask_the_psf_model_is_the_stars(window) -> None:
    ext = window[-1]
    alone, ratio_alone = _fit(window, stars_only=True)
    masked, ratio_masked = _fit(window, point=~ext)
    plain, ratio_plain = _fit(window)
    # with the galaxies left out of the PSF model: what the stars alone give
    assert masked.psf == alone.psf == "epsf"
    assert alone.model_error_frac < 0.01
    assert masked.model_error_frac == pytest.approx(0.2)  # the galaxies still count in the profile error
    assert masked.psf_fwhm_px == pytest.approx(alone.psf_fwhm_px, rel=0.005)
    assert masked.psf_fwhm_px == pytest.approx(3.13, abs=0.03)  # the pixel-integrated Moffat of 3 px
    assert ratio_masked == pytest.approx(1.0, abs=0.01) and ratio_alone == pytest.approx(1.0, abs=0.01)
    # the galaxies are still fitted and measured (all 100 targets come back, fitted)
    assert len(masked.flux) == 100 and masked.ok.all()
    # without it the galaxies set the profile error (its cap) and bend the ePSF: the stars come out 16 % bright
    assert plain.model_error_frac == pytest.approx(0.2)
    assert ratio_plain > 1.1
    assert plain.psf_fwhm_px > masked.psf_fwhm_px  # the core itself moves little (3.14 against 3.13 px)


def test_model_error_fraction_counts_only_the_allowed_stars(window) -> None:
    _, data, bad, x, y, flux, sig, _, ext = window
    psf = MoffatPSF(3.13, 3.0)  # close to the stars' profile, far from the galaxies'
    every = model_error_fraction(data, bad, sig, GAIN, x, y, flux, psf, FWHM)
    stars = model_error_fraction(data, bad, sig, GAIN, x, y, flux, psf, FWHM, use=~ext)
    assert every == pytest.approx(0.2) and stars < 0.05
    assert model_error_fraction(data, bad, sig, GAIN, x, y, flux, psf, FWHM, use=np.zeros(len(x), bool)) == 0.0


def test_build_epsf_leaves_the_non_candidates_out(window) -> None:
    img, _, bad, x, y, flux, sig, _, ext = window
    e = build_epsf(img, bad, SKY, sig, x, y, flux, FWHM, 1e9, gain_e_per_adu=GAIN, order=0, psf_candidate=~ext)
    assert e.meta["selection"]["not_candidate"] == 8
    assert e.meta["n_candidates"] <= 92
    with pytest.raises(ValueError, match="psf_candidate must have one entry per detection"):
        build_epsf(img, bad, SKY, sig, x, y, flux, FWHM, 1e9, psf_candidate=np.ones(3, bool))


def _extract(tmp_path):
    img, x, y, flux, _, gal = _window()
    cfg = load_config(None, {"store": str(tmp_path / "s.zarr"), "out": str(tmp_path / "o"),
                             "photometry": {"psf_model": "epsf"}, "bpnn": {"enabled": False}})
    tiles = tile_grid(*img.shape, cfg.tile_px, cfg.halo_px)
    res = extract_block(img, None, (0, 0), tiles, GAIN, 1e9, cfg, make_detector(cfg))
    t = res.table
    j = np.argmin(np.hypot(t["x"].to_numpy()[:, None] - x[None], t["y"].to_numpy()[:, None] - y[None]), axis=1)
    stars = ~gal[j] & (flux[j] > 1e4) & ((t["flags"].to_numpy() & F.PSF_FIT) == 0)
    return res, gal[j], float(np.median(t["flux"].to_numpy()[stars] / flux[j][stars]))


def test_extraction_keeps_flagged_galaxies_out_of_the_psf(tmp_path) -> None:
    """The pipeline's block: the galaxies are flagged EXTENDED, measured, and not used for the PSF."""
    res, gal, ratio = _extract(tmp_path)
    t = res.table
    ext = (t["flags"].to_numpy() & F.EXTENDED) != 0
    assert ext.sum() == 8 and gal[ext].all()
    pf = res.info.psf_fit
    assert pf is not None and pf["psf"] == "epsf"
    assert pf["n_not_point"] == 8
    assert pf["model_error_frac"] == pytest.approx(0.2)  # the galaxies count in it (see the module docstring)
    # 0.986: sep's mesh background sits 1.2 ADU above the true sky here (the galaxies' wings), not the PSF
    assert ratio == pytest.approx(0.986, abs=0.01)
    assert np.isfinite(t["flux"].to_numpy()[ext]).all() and (t["flux"].to_numpy()[ext] > 0).all()


def test_extraction_without_the_mask_lets_the_galaxies_bend_the_psf(tmp_path, monkeypatch) -> None:
    """The same block with every detection allowed to model the PSF (the behaviour before the mask)."""
    import survey_proc.catalog.extract as ex

    monkeypatch.setattr(ex, "_point_sources", lambda *a, **k: None)
    res, _, ratio = _extract(tmp_path)
    pf = res.info.psf_fit
    assert pf is not None and pf["n_not_point"] == -1
    assert ratio > 1.1  # 1.125 (with the mask 0.986)
