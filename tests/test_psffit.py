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
