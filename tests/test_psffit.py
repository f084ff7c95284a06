"""Simultaneous PSF-fit refinement: crowded pairs reach the Cramér-Rao bound."""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.photometry import psffit
from survey_proc.photometry.crlb import crlb_point_source
from survey_proc.simulate.psf import galsim_psf


def test_moffat_pixel_integrates_to_one():
    j = np.arange(-60, 61)
    du, dv = np.meshgrid(j + 0.3, j - 0.2)
    total = psffit.moffat_pixel(du, dv, psffit.moffat_alpha(2.0, 3.0), 3.0).sum()
    assert abs(total - 1) < 2e-3  # the rest is in the wings beyond 60 px


@pytest.mark.parametrize("sep_px", [4.0, 2.5])
def test_refinement_of_blended_pairs_reaches_the_bound(sep_px):
    rng = np.random.default_rng(4)
    fwhm, beta, gain, rn_e, sky = 2.0, 3.0, 1.5, 5.0, 40.0
    alpha = psffit.moffat_alpha(fwhm, beta)
    # 36 pairs 2 FWHM (or 1.25 FWHM) apart, the second star 2.5x fainter
    cx, cy = np.meshgrid(np.arange(12, 128, 20.0), np.arange(12, 128, 20.0))
    x1 = cx.ravel() + rng.uniform(-0.5, 0.5, cx.size)
    y1 = cy.ravel() + rng.uniform(-0.5, 0.5, cx.size)
    x = np.r_[x1, x1 + sep_px]
    y = np.r_[y1, y1 + 0.4]
    flux = np.r_[np.full(x1.size, 20000.0), np.full(x1.size, 8000.0)]
    model = psffit.render((128, 128), x, y, flux, alpha, beta, 12)
    sigma = np.sqrt(sky / gain + (rn_e / gain) ** 2)
    errs = []
    for _ in range(6):
        img = rng.poisson((model + sky) * gain) / gain + rng.normal(0, rn_e / gain, model.shape) - sky
        x0 = x + rng.normal(0, 0.15, x.size)  # a detector's positions
        y0 = y + rng.normal(0, 0.15, x.size)
        r = psffit.refine_positions(img, np.zeros(img.shape, bool), sigma, gain, x0, y0, flux * 1.1, fwhm, beta=beta)
        assert r.ok.all()
        errs.append(np.c_[r.x - x, r.y - y])
    e = np.concatenate(errs).reshape(6, 2, -1, 2)  # draw, star kind, star, axis
    size = 25
    psf = galsim_psf("moffat", fwhm, size, beta)
    for k, f in enumerate((20000.0, 8000.0)):
        bound = crlb_point_source(psf, f, sky, gain, rn_e, n_phases=2)
        rms = np.sqrt(np.mean(e[:, k] ** 2))
        assert rms > 0.8 * bound.sigma_x_px  # nothing beats the bound
        if sep_px >= 2 * fwhm:  # the isolated-star bound, within 1.5x, from 0.15 px starting errors
            assert rms < 1.5 * bound.sigma_x_px, (k, rms, bound.sigma_x_px)
        else:  # close blends converge more slowly (Jacobi steps), but still far below the start
            assert rms < 0.3 * 0.15 and rms < 5 * bound.sigma_x_px, (k, rms, bound.sigma_x_px)


def test_refinement_keeps_stars_it_cannot_fit_where_they_were():
    img = np.zeros((32, 32))
    r = psffit.refine_positions(img, np.ones(img.shape, bool), 1.0, 1.0, np.array([10.0]), np.array([12.0]),
                                np.array([100.0]), 2.0)
    assert not r.ok[0] and (r.x[0], r.y[0]) == (10.0, 12.0)


def _isolated_field(rng: np.random.Generator, flux: float, fwhm: float = 2.5, beta: float = 3.0,
                    noise: float = 6.0, gain: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 7 x 7 grid of isolated stars (Moffat) with Poisson + Gaussian noise; truth positions."""
    cx, cy = np.meshgrid(np.arange(10, 150, 20.0), np.arange(10, 150, 20.0))
    x = cx.ravel() + rng.uniform(-0.5, 0.5, cx.size)
    y = cy.ravel() + rng.uniform(-0.5, 0.5, cx.size)
    img = psffit.render((160, 160), x, y, np.full(x.size, flux), psffit.moffat_alpha(fwhm, beta), beta, 30)
    data = img + rng.normal(0, 1, img.shape) * np.sqrt(noise**2 + img / gain)
    return data, x, y


# 500000 ADU (a bright star of a real frame): the ridge of 1e-9 of the normal matrix's trace that the solve had
# until the twenty-first session damped the flux steps and shrank this error to a fraction of the scatter
@pytest.mark.parametrize("flux", [800.0, 20000.0, 500000.0])
def test_flux_err_from_fisher_matches_monte_carlo(flux: float) -> None:
    rng = np.random.default_rng(11)
    fits, errs = [], []
    for _ in range(6):
        data, x, y = _isolated_field(rng, flux)
        r = psffit.refine_positions(data, np.zeros(data.shape, bool), 6.0, 2.0, x + 0.1, y - 0.1,
                                    np.full(x.size, flux * 0.9), 2.5, flux_errors=True)
        fits.append(r.flux[r.ok])
        errs.append(r.flux_err[r.ok])
    f, e = np.concatenate(fits), np.concatenate(errs)
    assert np.std(f - flux) / np.median(e) == pytest.approx(1.0, abs=0.15)
    assert abs(np.median(f) / flux - 1) < 0.01


class _WrappedMoffat:
    """A PSF given as evaluate/gradient (an empirical PSF's interface), here the Moffat itself."""

    def __init__(self, fwhm: float, beta: float):
        self.m = psffit.MoffatPSF(fwhm, beta)

    def evaluate(self, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
        return self.m.pixel_grad(du, dv)[0]

    def gradient(self, du: np.ndarray, dv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, gu, gv = self.m.pixel_grad(du, dv)
        return gu, gv


def test_a_tabulated_psf_gives_the_moffat_fit() -> None:
    data, x, y = _isolated_field(np.random.default_rng(3), 5000.0)
    args = (data, np.zeros(data.shape, bool), 6.0, 2.0, x + 0.2, y - 0.1, np.full(x.size, 4000.0), 2.5)
    a = psffit.refine_positions(*args)
    b = psffit.refine_positions(*args, psf=_WrappedMoffat(2.5, 3.0))
    np.testing.assert_allclose(b.x, a.x, atol=5e-3)  # the renderings differ in the wings (< 1 %)
    np.testing.assert_allclose(b.flux, a.flux, rtol=2e-3)
    with pytest.raises(TypeError, match="is not a PSF model for the fitter"):
        psffit.refine_positions(*args, psf=object())
