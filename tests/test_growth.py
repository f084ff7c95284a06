"""photometry/growth.py: the aperture-correction stars' outer light, wing and sky separated (issue 21)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.special import erf

from survey_proc.config import ConfigError, PhotometryConfig, RunConfig
from survey_proc.photometry import aperture as A
from survey_proc.photometry import growth as G

SIZE = 600
NOISE = 3.0
FWHM = 3.0
HALO_FRAC = 0.06  # of each star's light, in a broad Gaussian (the wing a 4-FWHM sum half misses)
HALO_SIGMA = 5.0  # px
PEDESTAL = 0.6  # ADU per pixel the "mesh" left (unresolved light)


def _gauss(img: np.ndarray, x0: float, y0: float, flux: float, sigma: float, half: int) -> None:
    """Add a pixel-integrated Gaussian of total ``flux`` (ADU) at (x0, y0)."""
    ix, iy = round(x0), round(y0)
    edges = np.arange(-half, half + 2) - 0.5
    ex = 0.5 * (1 + erf((ix + edges - x0) / (np.sqrt(2) * sigma)))
    ey = 0.5 * (1 + erf((iy + edges - y0) / (np.sqrt(2) * sigma)))
    y0s, x0s = iy - half, ix - half
    img[y0s:y0s + 2 * half + 1, x0s:x0s + 2 * half + 1] += flux * np.outer(np.diff(ey), np.diff(ex))


def _field(seed: int, n_faint: int = 3000, fwhm: float = FWHM):
    """Bright stars (core + halo) on a grid, faint neighbours scattered everywhere, a sky pedestal, noise."""
    rng = np.random.default_rng(seed)
    g = np.arange(40, SIZE - 40, 40)
    xx, yy = np.meshgrid(g, g)
    x = xx.ravel() + rng.uniform(-0.5, 0.5, xx.size)
    y = yy.ravel() + rng.uniform(-0.5, 0.5, xx.size)
    flux = 10 ** rng.uniform(4.0, 5.5, x.size)
    img = rng.normal(PEDESTAL, NOISE, (SIZE, SIZE))
    for xi, yi, fi in zip(x, y, flux, strict=True):
        _gauss(img, xi, yi, fi * (1 - HALO_FRAC), fwhm / 2.3548, 14)
        _gauss(img, xi, yi, fi * HALO_FRAC, HALO_SIGMA, 30)
    for xi, yi in rng.uniform(35, SIZE - 35, (n_faint, 2)):  # neighbours a sum collects and a ring median does not
        _gauss(img, xi, yi, 10 ** rng.uniform(2.0, 3.0), fwhm / 2.3548, 10)
    return np.ascontiguousarray(img, np.float32), x, y, flux


def _apcorr(img: np.ndarray, x: np.ndarray, y: np.ndarray, cfg: PhotometryConfig, fwhm: float = FWHM):
    bad = np.zeros(img.shape, bool)
    fap, fe, flags = A.aperture_measure(img, NOISE, bad, None, x, y, cfg.aperture_fwhm * fwhm, np.inf)
    return A.aperture_correction(img, bad, x, y, fap, fap / fe, flags == 0, fwhm, cfg), fap


def test_the_growth_method_recovers_the_total_flux_where_the_sum_does_not():
    """Stars with a 6 % halo, 3,000 faint neighbours and a 0.6 ADU/px pedestal: the ring medians and the
    regression give the total flux within 0.6 %; the 4-FWHM sum is off by several per cent."""
    img, x, y, flux = _field(1)
    cfg = PhotometryConfig()
    (ap_sum, n_sum, _), fap = _apcorr(img, x, y, cfg)
    (ap_g, n_g, _), _ = _apcorr(img, x, y, replace(cfg, apcorr_method="growth"))
    true_apcorr = float(np.median(flux / fap))
    assert n_sum >= G.MIN_STARS and n_g >= G.MIN_STARS
    assert ap_g == pytest.approx(true_apcorr, rel=0.006)
    assert abs(ap_sum / true_apcorr - 1) > 0.02


def test_outer_flux_separates_the_wing_from_the_pedestal():
    """No faint neighbours (they lift a median too): the intercepts give the pedestal, the slopes the halo."""
    img, x, y, flux = _field(2, n_faint=0)
    bad = np.zeros(img.shape, bool)
    fap, _, _ = A.aperture_measure(img, NOISE, bad, None, x, y, FWHM, np.inf)
    out = G.outer_flux(img, bad, x, y, fap, 2 * FWHM, 6 * FWHM)
    assert out is not None and out.n_rings >= G.MIN_RINGS
    assert out.pedestal_adu == pytest.approx(PEDESTAL, abs=0.25)
    # the halo's light between 2 and 6 FWHM (its Gaussian's, a fraction of the total), over the aperture's share
    r1, r2 = 2 * FWHM, 6 * FWHM
    halo_true = HALO_FRAC * (np.exp(-r1**2 / (2 * HALO_SIGMA**2)) - np.exp(-r2**2 / (2 * HALO_SIGMA**2)))
    assert out.halo == pytest.approx(halo_true / float(np.median(fap / flux)), rel=0.25)


def test_the_regression_is_not_attempted_when_undetermined():
    """Too few stars, or an undersampled PSF (fewer than MIN_RINGS one-pixel rings): None, and the sum is kept."""
    img, x, y, _ = _field(3, n_faint=0)
    bad = np.zeros(img.shape, bool)
    fap, _, _ = A.aperture_measure(img, NOISE, bad, None, x, y, FWHM, np.inf)
    assert G.outer_flux(img, bad, x[:G.MIN_STARS - 1], y[:G.MIN_STARS - 1], fap[:G.MIN_STARS - 1],
                        2 * FWHM, 6 * FWHM) is None
    assert G.outer_flux(img, bad, x, y, fap, 2 * 1.1, 6 * 1.1) is None  # FWHM 1.1 px: 5 rings
    img1, x1, y1, _ = _field(4, n_faint=0, fwhm=1.1)
    cfg = PhotometryConfig()
    assert _apcorr(img1, x1, y1, replace(cfg, apcorr_method="growth"), 1.1)[0] == _apcorr(img1, x1, y1, cfg, 1.1)[0]


def test_the_growth_settings_are_checked():
    with pytest.raises(ConfigError, match=r"photometry\.apcorr_method must be 'sum'"):
        RunConfig(photometry=PhotometryConfig(apcorr_method="curve")).validate()
    with pytest.raises(ConfigError, match=r"photometry\.apcorr_growth_fwhm must be > 2"):
        RunConfig(photometry=PhotometryConfig(apcorr_method="growth", apcorr_growth_fwhm=2.0)).validate()
