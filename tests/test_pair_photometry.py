"""photometry/pairs.py: the close pairs' PSF fluxes from the residual pass's joint fit, on the block's total scale."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from survey_proc.catalog.extract import extract_block
from survey_proc.config import load_config
from survey_proc.detect.base import PairPhotometry, TotalFlux
from survey_proc.detect.registry import make_detector
from survey_proc.errors import ConfigError
from survey_proc.photometry.pairs import MIN_SCALE_STARS, psf_to_total_scale, with_pair_fluxes
from survey_proc.photometry.psffit import moffat_alpha, render
from survey_proc.tiling import tile_grid

FWHM = 2.0
NOISE = 5.0
GAIN = 1.0  # e-/ADU: the stars' Poisson noise in the image


def test_the_scale_is_the_median_total_to_psf_ratio_of_the_bright_allowed_stars():
    total = np.array([103.0, 206.0, 309.0, 412.0, 515.0, 618.0, 50.0, 900.0])
    psf = np.array([100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 10.0, 100.0])
    snr = np.array([60, 60, 60, 60, 60, 60, 60, 10.0])  # the last is too faint: its 9.0 does not count
    ok = np.array([True] * 6 + [False, True])  # the 7th is flagged: its 5.0 does not count
    scale, n = psf_to_total_scale(total, snr, psf, ok, 50.0)
    assert scale == pytest.approx(1.03) and n == 6
    # fewer than MIN_SCALE_STARS at the S/N: 0.4 of it; fewer still: NaN, the count returned
    snr2 = np.r_[np.full(MIN_SCALE_STARS, 25.0), np.full(3, 5.0)]
    assert psf_to_total_scale(total, snr2, psf, np.ones(8, bool), 50.0) == (pytest.approx(1.03), MIN_SCALE_STARS)
    scale3, n3 = psf_to_total_scale(total, np.full(8, 5.0), psf, np.ones(8, bool), 50.0)
    assert np.isnan(scale3) and n3 == 0


def test_pair_members_take_the_scaled_psf_flux_and_the_rest_keep_theirs():
    n = 8
    total = TotalFlux(flux=np.linspace(1000, 2000, n), flux_err=np.full(n, 10.0), snr=np.full(n, 100.0),
                      apcorr=1.2, n_apcorr=6)
    psf = total.flux / 1.1
    pair_flux, pair_err = np.full(n, np.nan), np.full(n, np.nan)
    pair_flux[[2, 7]], pair_err[[2, 7]] = [500.0, 150.0], [5.0, 3.0]
    psf[7] = np.nan  # a new source: no first-pass PSF flux
    pairs = PairPhotometry(pair_flux, pair_err, psf, np.zeros(n), np.zeros(n))
    out, sc = with_pair_fluxes(total, pairs, np.ones(n, bool), 50.0)
    assert sc.scale == pytest.approx(1.1) and sc.n_stars == n - 2 and sc.n_pairs == 2
    assert out.flux[2] == pytest.approx(550.0) and out.flux_err[2] == pytest.approx(5.5)
    assert out.flux[7] == pytest.approx(165.0) and out.snr[7] == pytest.approx(50.0)
    others = np.setdiff1d(np.arange(n), [2, 7])
    np.testing.assert_array_equal(out.flux[others], total.flux[others])
    np.testing.assert_array_equal(out.flux_err[others], total.flux_err[others])
    # no scale (too few stars): nothing changes
    no_psf = replace(pairs, psf_flux_adu=np.full(n, np.nan))
    same, sc0 = with_pair_fluxes(total, no_psf, np.ones(n, bool), 50.0)
    assert same is total and sc0.n_pairs == 0 and np.isnan(sc0.scale)


def _field(seed=8):
    """Bright lone stars on a grid and a pair of 40000 / 10000 ADU 1.1 FWHM apart at (100.2, 100.3)."""
    g = np.arange(20.3, 180, 32.0)
    xs, ys = (v.ravel() for v in np.meshgrid(g, g + 0.4))
    keep = np.hypot(xs - 100, ys - 100) > 12
    xs, ys = np.r_[xs[keep], 100.2, 102.4], np.r_[ys[keep], 100.3, 100.5]
    fl = np.r_[np.full(keep.sum(), 30000.0), 40000.0, 10000.0]
    shape = (196, 196)
    img = render(shape, xs, ys, fl, moffat_alpha(FWHM, 3.0), 3.0, 20)
    rng = np.random.default_rng(seed)
    img = rng.poisson(np.clip(img, 0, None) * GAIN) / GAIN
    return (img + rng.normal(0, NOISE, shape)).astype(np.float32), xs, ys, fl


def _block(cfg, data):
    tiles = tile_grid(*data.shape, data.shape[0], 0)
    return extract_block(data + 100.0, None, (0, 0), tiles, GAIN, 1e9, cfg, make_detector(cfg)).table


@pytest.mark.parametrize(("mode", "seed"), [("subtract", 8), ("subtract", 3), ("psf_fit", 8)])
def test_a_resolved_pair_reads_its_true_fluxes_on_the_lone_stars_scale(mode, seed):
    data, xs, ys, fl = _field(seed)
    base = load_config(None, {"detection": {"residual_detect": True, "residual_psf": "epsf"}})
    assert base.detection.residual_pair_photometry == "subtract"  # the default with the empirical-PSF pass
    fitted = _block(replace(base, detection=replace(base.detection, residual_pair_photometry=mode)), data)
    apert = _block(replace(base, detection=replace(base.detection, residual_pair_photometry="aperture")), data)

    def row(t, i):
        j = int(np.argmin(np.hypot(t["x"] - xs[i], t["y"] - ys[i])))
        return j, float(np.hypot(t["x"][j] - xs[i], t["y"][j] - ys[i]))

    def ratio(t, i):
        return t["flux"][row(t, i)[0]] / fl[i]

    lone = np.median([ratio(fitted, i) for i in range(len(xs) - 2)])  # the block's total scale (apcorr's)
    assert len(fitted) == len(apert) == len(xs)  # the same detections either way: both members found
    bright, faint = len(xs) - 2, len(xs) - 1
    # the apertures hold each other's light: the faint one reads 2.7x its flux, the bright one 13 % high
    assert ratio(apert, faint) / lone > 2.0 and ratio(apert, bright) / lone > 1.08
    # from the pair's fit: within 2 % (bright; its error 0.6 %) and 6 % (faint; 2 %) of the lone stars' scale
    # (with 8 Jacobi passes and the old trace-scaled ridge, instead of the joint refit, the faint one read 11-14 % low)
    assert ratio(fitted, bright) / lone == pytest.approx(1.0, abs=0.02)
    assert ratio(fitted, faint) / lone == pytest.approx(1.0, abs=0.06)
    # the bright star moved to its place in the pair's fit (its windowed centroid leaned towards the neighbour)
    assert row(fitted, bright)[1] < 0.1 < row(apert, bright)[1]


def test_the_pair_photometry_setting_is_checked():
    with pytest.raises(ConfigError, match=r"detection\.residual_pair_photometry must be 'subtract' .*, 'psf_fit' .* "
                                          r"or 'aperture', got 'yes'"):
        load_config(None, {"detection": {"residual_pair_photometry": "yes"}})


def test_each_members_model_is_measured_in_the_others_aperture():
    import sep

    from survey_proc.detect.hidden import PairFit
    from survey_proc.photometry.psffit import MoffatPSF, as_pixel_psf, render_psf

    psf = MoffatPSF(FWHM, 3.0)
    pf = PairFit(flux_adu=np.array([3000.0, np.nan]), flux_err_adu=np.array([30.0, np.nan]),
                 parent=np.array([4, 9]), parent_x=np.array([40.2, 70.0]), parent_y=np.array([50.1, 20.0]),
                 parent_flux_adu=np.array([12000.0, 5000.0]), parent_flux_err_adu=np.array([50.0, 40.0]),
                 first_flux_adu=np.zeros(10), psf=psf, model_error=0.05)
    new_x, new_y = np.array([42.5, 72.0]), np.array([50.3, 20.5])
    on_parents, on_new = pf.light_in_apertures((96, 96), new_x, new_y, 2.0, FWHM)
    radius = max(3, int(np.ceil(4.0 * FWHM)))
    m_new = render_psf((96, 96), new_x[:1], new_y[:1], np.array([3000.0]), as_pixel_psf(psf), radius)
    m_par = render_psf((96, 96), pf.parent_x[:1], pf.parent_y[:1], np.array([12000.0]), as_pixel_psf(psf), radius)
    expect_parent = sep.sum_circle(np.ascontiguousarray(m_new), pf.parent_x[:1], pf.parent_y[:1], 2.0, subpix=5)[0][0]
    expect_new = sep.sum_circle(np.ascontiguousarray(m_par), new_x[:1], new_y[:1], 2.0, subpix=5)[0][0]
    assert on_parents[0] == pytest.approx(expect_parent, rel=1e-9) and on_parents[0] > 0.1 * 3000
    assert on_new[0] == pytest.approx(expect_new, rel=1e-9) and on_new[0] > 0.1 * 12000
    # a failed fit (NaN flux) puts no light anywhere; the second pair's parent still lights its new source
    assert on_parents[1] == pytest.approx(0.0, abs=1e-9) and on_new[1] > 0


def test_the_model_error_a_candidate_inherits_from_its_neighbours_wings():
    from survey_proc.detect.hidden import WING_FWHM, model_flux_error
    from survey_proc.photometry.psffit import MoffatPSF, render_psf

    psf = MoffatPSF(FWHM, 3.0)
    shape = (64, 64)
    x, y = np.array([30.2, 34.7]), np.array([30.1, 30.3])  # a bright star and a faint source 2.25 FWHM away
    f = np.array([40000.0, 300.0])
    err = model_flux_error(shape, NOISE, GAIN, x, y, f, psf, FWHM, 0.02, 0.1, np.array([1]))
    # by hand: the star's light split at WING_FWHM[0] FWHM into core and wing, the source's PSF as the weights
    radius = int(np.ceil(4.0 * FWHM))
    yy, xx = np.mgrid[:64, :64]
    star = render_psf(shape, x[:1], y[:1], f[:1], psf, radius)
    is_wing = np.hypot(xx - x[0], yy - y[0]) >= WING_FWHM[0] * FWHM
    light = render_psf(shape, x, y, f, psf, radius)
    own = render_psf(shape, x[1:], y[1:], np.ones(1), psf, radius)
    near = (np.abs(xx - round(x[1])) <= 3) & (np.abs(yy - round(y[1])) <= 3)  # the fit's 1.5-FWHM stamp
    v0 = NOISE**2 + light / GAIN
    w = np.where(near, own / v0, 0)
    expect = np.hypot(0.02 * (w * np.where(is_wing, 0, star)).sum(), 0.1 * (w * np.where(is_wing, star, 0)).sum())
    expect /= (w * own).sum()
    assert err[0] == pytest.approx(expect, rel=1e-6)
    # the wing's error is what matters 2.25 FWHM away: without it the error is several times smaller
    assert err[0] > 3 * model_flux_error(shape, NOISE, GAIN, x, y, f, psf, FWHM, 0.02, 0.0, np.array([1]))[0]


def test_companions_that_share_one_offset_from_their_stars_are_a_psf_feature():
    from survey_proc.detect.hidden import shared_offsets

    rng = np.random.default_rng(5)
    n_real = 200  # isotropic companions, 0.7-3 FWHM away, flux ratios 0.05-0.6
    r = rng.uniform(0.7, 3.0, n_real)
    a = rng.uniform(0, 2 * np.pi, n_real)
    ratio = np.exp(rng.uniform(np.log(0.05), np.log(0.6), n_real))
    n_feat = 6  # a lobe the PSF lacks: 2.5 FWHM to the right of every bright star, 1 % of its light
    dx = np.r_[r * np.cos(a), 2.5 + rng.normal(0, 0.05, n_feat)]
    dy = np.r_[r * np.sin(a), 0.5 + rng.normal(0, 0.05, n_feat)]
    fr = np.r_[ratio, 0.01 * np.exp(rng.normal(0, 0.1, n_feat))]
    shared = shared_offsets(dx, dy, fr)
    assert shared[n_real:].all()
    assert shared[:n_real].sum() <= 2  # chance clusters among 200 isotropic companions: at most a couple
    # two alike are no evidence (SHARED_MIN): they stay
    assert not shared_offsets(np.array([2.5, 2.52, -1.0]), np.array([0.5, 0.5, 1.0]), np.array([0.01, 0.01, 0.3])).any()
