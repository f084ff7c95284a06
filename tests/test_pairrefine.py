"""refine_pairs: disjoint pairs refitted as one Gauss-Newton system each (photometry/pairrefine.py)."""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.photometry.pairrefine import refine_pairs
from survey_proc.photometry.psffit import (
    MoffatPSF,
    as_pixel_psf,
    fit_radii_px,
    refine_positions,
    render_psf,
)

FWHM = 2.0
NOISE = 5.0
GAIN = 1e6  # the stars' own Poisson noise left out: a known variance per pixel


class _ExactMoffat:
    """The pixel-integrated Moffat rendered exactly as fitted (as an empirical PSF is).

    ``MoffatPSF.profile`` samples pixel centres beyond a star's central 5 x 5 pixels, an
    approximation its ``pixel_grad`` does not make: Gauss-Newton then converges linearly and
    a noise-free test could not tell a slow fitter from a wrong one.
    """

    m = MoffatPSF(FWHM, 3.0)

    def pixel_grad(self, du, dv):
        return self.m.pixel_grad(du, dv)

    def profile(self, du, dv):
        return self.m.pixel_grad(du, dv)[0]


PSF = _ExactMoffat()


def _pairs_image(flux_a=40000.0, flux_b=10000.0, sep_px=2.2, seed=None):
    """Nine pairs (bright at (x, y), faint ``sep_px`` along x) on a 3 x 3 grid 40 px apart; noise-free without seed."""
    g = np.array([30.3, 70.6, 110.1])
    xa, ya = (v.ravel() for v in np.meshgrid(g, g + 0.25))
    xb, yb = xa + sep_px, ya + 0.2
    x, y = np.r_[xa, xb], np.r_[ya, yb]
    f = np.r_[np.full(9, flux_a), np.full(9, flux_b)]
    # the fitters' own rendering, so that a noise-free image is exactly their model
    img = render_psf((140, 145), x, y, f, PSF, fit_radii_px(FWHM)[1])
    if seed is not None:
        img = img + np.random.default_rng(seed).normal(0.0, NOISE, img.shape)
    return img, x, y, f


def test_a_pair_one_fwhm_apart_converges_to_the_truth_from_a_poor_start():
    img, x, y, f = _pairs_image()
    bad = np.zeros(img.shape, bool)
    rng = np.random.default_rng(1)
    # the residual pass's start: the candidate ~0.5 px off, the fluxes 30-50 % off
    x0, y0 = x + rng.uniform(-0.4, 0.4, len(x)), y + rng.uniform(-0.4, 0.4, len(y))
    f0 = f * np.r_[np.full(9, 1.3), np.full(9, 0.5)]
    r = refine_pairs(img, bad, NOISE, GAIN, x0, y0, f0, FWHM, np.arange(9), np.arange(9, 18), psf=PSF, n_iter=30,
                     max_shift_px=2.0)
    assert r.ok.all()
    np.testing.assert_allclose(r.flux, f, rtol=1e-6)
    np.testing.assert_allclose(r.x, x, atol=1e-6)
    np.testing.assert_allclose(r.y, y, atol=1e-6)
    # the same start with 8 Jacobi passes (each star alone, its partner held) is still off on the faint side
    j = refine_positions(img, bad, NOISE, GAIN, x0, y0, f0, FWHM, n_iter=8, max_shift_px=2.0, psf=PSF)
    assert np.max(np.abs(j.flux[9:] / f[9:] - 1.0)) > 1e-3


def test_noisy_pairs_are_unbiased_and_the_flux_errors_match_the_scatter_of_a_lone_star():
    ratios, errs = [], []
    for seed in range(12):
        img, x, y, f = _pairs_image(sep_px=2.2, seed=seed)
        r = refine_pairs(img, np.zeros(img.shape, bool), NOISE, GAIN, x, y, f, FWHM, np.arange(9), np.arange(9, 18),
                         psf=PSF, n_iter=30, flux_errors=True)
        assert r.ok.all()
        ratios.append(r.flux / f)
        errs.append(r.flux_err / f)
    ratios_a, errs_a = np.array(ratios), np.array(errs)
    n = ratios_a.shape[0] * 9
    for sl in (slice(0, 9), slice(9, 18)):  # bright, faint members: the mean within 3 standard errors of 1
        mean, sd = ratios_a[:, sl].mean(), ratios_a[:, sl].std()
        assert abs(mean - 1.0) < 3.0 * sd / np.sqrt(n)
    # each member's error holds its partner fixed: at 1.1 FWHM the faint one's actual scatter is larger (the
    # partner's flux correlates with it); both sit between 0.5 and 1.2 x the scatter
    for sl in (slice(0, 9), slice(9, 18)):
        q = np.median(errs_a[:, sl]) / ratios_a[:, sl].std()
        assert 0.5 < q < 1.2
    # far apart (8 FWHM) the partner's flux no longer matters: the error is the scatter
    ratios, errs = [], []
    for seed in range(12):
        img, x, y, f = _pairs_image(sep_px=16.0, seed=100 + seed)
        r = refine_pairs(img, np.zeros(img.shape, bool), NOISE, GAIN, x, y, f, FWHM, np.arange(9), np.arange(9, 18),
                         psf=PSF, n_iter=30, flux_errors=True)
        ratios.append(r.flux[9:] / f[9:])
        errs.append(r.flux_err[9:] / f[9:])
    assert np.median(errs) / np.std(ratios) == pytest.approx(1.0, abs=0.2)


def test_stars_in_no_pair_are_held_and_subtracted_as_fixed_light_would_be():
    img, x, y, f = _pairs_image(seed=4)
    bad = np.zeros(img.shape, bool)
    # a lone star beside the first pair, held
    lone = render_psf(img.shape, np.array([35.0]), np.array([33.0]), np.array([30000.0]), PSF, fit_radii_px(FWHM)[1])
    data = img + lone
    xa, ya, fa = np.r_[x, 35.0], np.r_[y, 33.0], np.r_[f, 30000.0]
    held = refine_pairs(data, bad, NOISE, GAIN, xa, ya, fa, FWHM, np.arange(9), np.arange(9, 18), psf=PSF,
                        n_iter=10, flux_errors=True)
    fixed = render_psf(img.shape, np.array([35.0]), np.array([33.0]), np.array([30000.0]), as_pixel_psf(PSF),
                       fit_radii_px(FWHM)[1])
    part = refine_pairs(data, bad, NOISE, GAIN, x, y, f, FWHM, np.arange(9), np.arange(9, 18), psf=PSF, n_iter=10,
                        flux_errors=True, fixed_light=fixed)
    assert held.x[-1] == 35.0 and held.flux[-1] == 30000.0 and held.ok[-1]
    np.testing.assert_allclose(part.flux, held.flux[:-1], rtol=1e-9)
    np.testing.assert_allclose(part.x, held.x[:-1], rtol=0, atol=1e-9)
    np.testing.assert_allclose(part.flux_err, held.flux_err[:-1], rtol=1e-9)


def test_a_pair_that_runs_off_fails_as_one_and_keeps_its_start():
    img, x, y, f = _pairs_image()
    bad = np.zeros(img.shape, bool)
    x0 = x.copy()
    x0[9] += 1.5  # the first pair's faint member starts 1.5 px from its place: it must move back
    r = refine_pairs(img, bad, NOISE, GAIN, x0, y, f, FWHM, np.arange(9), np.arange(9, 18), psf=PSF, n_iter=30,
                     max_shift_px=0.75)
    assert not r.ok[0] and not r.ok[9]  # both members of the pair
    assert r.x[9] == x0[9] and r.x[0] == x0[0]
    assert r.ok[1:9].all() and r.ok[10:].all()


def test_pairs_must_be_disjoint_and_complete():
    img, x, y, f = _pairs_image()
    bad = np.zeros(img.shape, bool)
    with pytest.raises(ValueError, match="one second member per first member: got 9 first and 8 second"):
        refine_pairs(img, bad, NOISE, GAIN, x, y, f, FWHM, np.arange(9), np.arange(9, 17), psf=PSF)
    with pytest.raises(ValueError, match="a star is in more than one pair"):
        refine_pairs(img, bad, NOISE, GAIN, x, y, f, FWHM, np.array([0, 1]), np.array([1, 2]), psf=PSF)


def test_pairs_at_the_edge_and_over_masked_pixels_are_fitted_on_what_is_left():
    img, x, y, f = _pairs_image()
    bad = np.zeros(img.shape, bool)
    # the first pair cut by the image's left edge, the second with its bright member's core pixel masked
    cut = 29
    img, bad = img[:, cut:], bad[:, cut:]
    xs, ys = x - cut, y.copy()
    bad[int(np.floor(ys[1] + 0.5)), int(np.floor(xs[1] + 0.5))] = True
    img = np.where(bad, 0.0, img)
    r = refine_pairs(img, bad, NOISE, GAIN, xs, ys, f, FWHM, np.arange(9), np.arange(9, 18), psf=PSF, n_iter=30,
                     flux_errors=True)
    assert r.ok.all() and np.isfinite(r.flux_err).all()
    np.testing.assert_allclose(r.flux, f, rtol=1e-6)  # noise-free: the pixels left still hold the truth
    assert r.flux_err[0] > r.flux_err[2] and r.flux_err[1] > r.flux_err[2]  # fewer pixels, larger errors


def test_an_empirical_psfs_phase_tables_give_the_pixel_by_pixel_fit():
    """With a constant ePSF the pair systems read its phase tables: the same fit as evaluating every pixel."""
    from survey_proc.photometry.epsf import EmpiricalPSF
    from survey_proc.photometry.psffit import TabulatedPSF

    m = MoffatPSF(FWHM, 3.0)
    epsf = EmpiricalPSF(alpha=m.alpha, beta=3.0, oversample=2.0, resid_radius_px=4, resid=np.zeros((1, 17, 17)),
                        eval_oversample=5, table_radius_px=8, n_gl=4)

    class PixelByPixel:  # the same model without its phase tables
        def evaluate(self, du, dv):
            return epsf.evaluate(du, dv)

        def gradient(self, du, dv):
            return epsf.gradient(du, dv)

    xa, ya = np.array([30.3, 70.6]), np.array([40.25, 60.8])
    x, y, f = np.r_[xa, xa + 2.2], np.r_[ya, ya + 0.2], np.array([40000.0, 30000.0, 10000.0, 8000.0])
    img = render_psf((100, 100), x, y, f, TabulatedPSF(PixelByPixel()), fit_radii_px(FWHM)[1])
    # a window's worth of stamps asked for first, so that the phase tables are built (a few stars do without)
    epsf.stamp_values(np.zeros(3000), np.zeros(3000), fit_radii_px(FWHM)[1])
    assert epsf._phase is not None
    img = img + np.random.default_rng(3).normal(0.0, NOISE, img.shape)
    start = dict(x=x + 0.3, y=y - 0.2, flux=f * 0.8)
    bad = np.zeros(img.shape, bool)
    fast = refine_pairs(img, bad, NOISE, GAIN, start["x"], start["y"], start["flux"], FWHM, np.array([0, 1]),
                        np.array([2, 3]), n_iter=30, psf=TabulatedPSF(epsf), flux_errors=True)
    slow = refine_pairs(img, bad, NOISE, GAIN, start["x"], start["y"], start["flux"], FWHM, np.array([0, 1]),
                        np.array([2, 3]), n_iter=30, psf=TabulatedPSF(PixelByPixel()), flux_errors=True)
    assert fast.ok.all() and slow.ok.all()
    np.testing.assert_allclose(fast.flux, slow.flux, rtol=2e-3)
    np.testing.assert_allclose(fast.x, slow.x, atol=2e-3)
    np.testing.assert_allclose(fast.flux_err, slow.flux_err, rtol=2e-3)
    assert np.all(np.abs(fast.flux - f) < 5 * fast.flux_err)  # and both are right
