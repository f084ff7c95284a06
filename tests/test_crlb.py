"""The Cramér-Rao bounds against Monte Carlo PSF fits, and their closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import least_squares

from survey_proc.photometry.crlb import crlb_point_source, gaussian_psf
from survey_proc.simulate.psf import galsim_psf


def test_bound_matches_closed_form_in_the_background_limit():
    # faint star on a bright sky, well sampled: var(F) = 4 pi sigma^2 v  and  var(x) = 8 pi sigma^4 v / F^2
    sigma, sky, gain, rn = 3.0, 1e6, 1.0, 0.0  # pixel integration widens sigma^2 by 1/12: < 1 %
    b = crlb_point_source(gaussian_psf(sigma, 61), 100.0, sky, gain, rn)
    v = sky / gain
    assert b.sigma_flux_adu == pytest.approx(np.sqrt(4 * np.pi * sigma**2 * v), rel=0.02)
    assert b.sigma_x_px == pytest.approx(np.sqrt(8 * np.pi * sigma**4 * v) / 100.0, rel=0.02)


def test_bound_matches_closed_form_in_the_photon_limit():
    # bright star, no sky, no read noise: var(F) = F / g (every photon counts once)
    b = crlb_point_source(gaussian_psf(1.5, 31), 1e6, 0.0, 2.0, 0.0)
    assert b.sigma_flux_adu == pytest.approx(np.sqrt(1e6 / 2.0), rel=1e-3)


def test_psf_fit_variance_matches_the_bound_monte_carlo():
    """An isolated Gaussian-PSF star fitted by weighted least squares over 1000 noise draws."""
    rng = np.random.default_rng(42)
    sigma, size, flux, sky, gain, rn = 1.3, 19, 3000.0, 40.0, 1.5, 5.0
    psf = gaussian_psf(sigma, size)
    x0, y0 = 0.23, -0.31
    mu = flux * psf(x0, y0) + sky
    v = mu / gain + (rn / gain) ** 2
    w = 1.0 / np.sqrt(v)
    fits = []
    for _ in range(1000):
        electrons = rng.poisson(mu * gain) + rng.normal(0.0, rn, mu.shape)
        img = electrons / gain

        def resid(t, img=img):
            return ((t[0] * psf(t[1], t[2]) + sky - img) * w).ravel()

        fits.append(least_squares(resid, [flux, 0.0, 0.0], x_scale=[100.0, 0.1, 0.1]).x)
    fits = np.array(fits)
    bound = crlb_point_source(psf, flux, sky, gain, rn, x0=x0, y0=y0)
    assert np.std(fits[:, 0]) == pytest.approx(bound.sigma_flux_adu, rel=0.10)
    assert np.std(fits[:, 1]) == pytest.approx(bound.sigma_x_px, rel=0.10)
    assert np.std(fits[:, 2]) == pytest.approx(bound.sigma_y_px, rel=0.10)
    assert abs(np.mean(fits[:, 0]) - flux) < 4 * bound.sigma_flux_adu / np.sqrt(1000)


def test_galsim_psf_bound_is_worse_for_wider_psfs_and_fitted_sky():
    narrow = crlb_point_source(galsim_psf("moffat", 1.75, 31), 2000.0, 40.0, 1.5, 5.0, n_phases=3)
    wide = crlb_point_source(galsim_psf("moffat", 3.5, 31), 2000.0, 40.0, 1.5, 5.0, n_phases=3)
    fitted_sky = crlb_point_source(galsim_psf("moffat", 1.75, 31), 2000.0, 40.0, 1.5, 5.0, n_phases=3,
                                   fit_background=True)
    assert narrow.snr > wide.snr > 0
    assert narrow.sigma_x_px < wide.sigma_x_px
    assert fitted_sky.sigma_flux_adu > narrow.sigma_flux_adu


def test_crowding_factor_is_one_alone_and_grows_as_a_neighbour_approaches():
    from survey_proc.photometry.crlb import crowding_factor

    x = np.array([20.0, 40.0])
    y = np.array([20.0, 20.0])
    f = np.array([5000.0, 5000.0])
    alone = crowding_factor(x, y, f, np.array([0]), 2.0, 40.0, 1.5, 5.0)
    assert alone[0] == pytest.approx(1.0, abs=1e-6)  # the other star is 20 px away
    factors = []
    for sep in (6.0, 3.0, 2.0, 1.0):
        factors.append(crowding_factor(np.array([20.0, 20.0 + sep]), y, f, np.array([0]), 2.0, 40.0, 1.5, 5.0)[0])
    assert factors[0] < 1.1 and np.all(np.diff(factors) > 0) and factors[-1] > 3


def test_crowding_factors_flux_bound_grows_as_a_neighbour_approaches():
    """The flux factor: 1 alone, larger as a neighbour closes in; the position factor is crowding_factor's."""
    from survey_proc.photometry.crlb import crowding_factor, crowding_factors

    y = np.array([20.0, 20.0])
    f = np.array([5000.0, 5000.0])
    alone = crowding_factors(np.array([20.0, 40.0]), y, f, np.array([0]), 2.0, 40.0, 1.5, 5.0)
    assert alone.flux[0] == pytest.approx(1.0, abs=1e-6)
    flux = []
    for sep in (6.0, 3.0, 2.0, 1.0):
        xs = np.array([20.0, 20.0 + sep])
        c = crowding_factors(xs, y, f, np.array([0]), 2.0, 40.0, 1.5, 5.0)
        assert c.position_x[0] == crowding_factor(xs, y, f, np.array([0]), 2.0, 40.0, 1.5, 5.0)[0]
        flux.append(c.flux[0])
    assert flux[0] < 1.05 and np.all(np.diff(flux) > 0) and flux[-1] > 2
