"""photometry/aperture.py: the core FWHM estimate."""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.photometry.aperture import core_fwhm


def test_core_fwhm_of_gaussians():
    yy, xx = np.mgrid[:64, :64].astype(float)
    for sigma in (0.9, 1.5, 2.5):
        for cx, cy in ((31.0, 31.0), (31.37, 30.81)):
            img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
            f = core_fwhm(img, np.array([cx]), np.array([cy]))[0]
            assert f == pytest.approx(2.3548 * sigma, rel=1e-6)


def test_estimate_fwhm_steps_its_snr_floor_down_when_few_stars_are_bright():
    from survey_proc.config import PhotometryConfig
    from survey_proc.photometry.aperture import estimate_fwhm

    rng = np.random.default_rng(4)
    fwhm_true, n = 1.3, 12
    yy, xx = np.mgrid[0:200, 0:200]
    x = 15 + 170 * rng.random(n)
    y = 15 + 170 * rng.random(n)
    sigma = fwhm_true / 2.3548
    data = rng.normal(0, 1.0, (200, 200))
    for xi, yi in zip(x, y, strict=True):
        data += 60.0 * np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * sigma**2))
    snr = np.full(n, 30.0)  # none reaches apcorr_snr_min = 50
    bad = np.zeros(data.shape, bool)
    cfg = PhotometryConfig()
    fwhm, n_stars = estimate_fwhm(data, bad, x, y, snr, np.ones(n, bool), cfg)
    assert n_stars >= 5 and fwhm == pytest.approx(fwhm_true, rel=0.15)  # measured at the S/N 20 step
    fwhm, n_stars = estimate_fwhm(data, bad, x, y, np.full(n, 8.0), np.ones(n, bool), cfg)
    assert (fwhm, n_stars) == (cfg.fwhm_default_px, 0)  # below every step: the default


def test_the_moffat_aperture_correction_is_the_default_without_stars():
    from survey_proc.config import PhotometryConfig
    from survey_proc.photometry.aperture import aperture_correction, moffat_apcorr

    assert moffat_apcorr(1.0, 4.0) == pytest.approx(1.3123, abs=2e-4)  # a Moffat(3): 76 % within 1 FWHM
    assert moffat_apcorr(2.0, 2.0) == 1.0
    data = np.zeros((50, 50))
    one = np.ones(1)
    apc, n, _ = aperture_correction(data, data > 0, 25 * one, 25 * one, one, 100 * one, one > 0, 3.0,
                                    PhotometryConfig())
    assert (apc, n) == (pytest.approx(1.3123, abs=2e-4), 0)


def test_extended_sources_are_told_from_stars_by_their_concentration():
    from survey_proc.photometry.aperture import aperture_flux, extended

    rng = np.random.default_rng(9)
    size, fwhm, noise = 300, 2.5, 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    data = rng.normal(0, noise, (size, size))
    pos = [(25 + 50 * i, 25 + 50 * j) for i in range(6) for j in range(6)]
    kinds = ["star" if k % 3 else "galaxy" for k in range(len(pos))]
    for (x, y), kind in zip(pos, kinds, strict=True):
        s = fwhm / 2.3548 * (1.0 if kind == "star" else 2.5)  # a galaxy of 2.5x the PSF's width
        data += 4000.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s**2)) / (2 * np.pi * s**2)
    x = np.array([p[0] for p in pos], float)
    y = np.array([p[1] for p in pos], float)
    bad = np.zeros(data.shape, bool)
    f1, e1, _ = aperture_flux(data, noise, bad, x, y, fwhm, 1.0)
    ext = extended(data, bad, x, y, f1, f1 / e1, fwhm, fwhm, noise, np.ones(len(x), bool))
    is_gal = np.array([k == "galaxy" for k in kinds])
    assert ext[is_gal].all() and not ext[~is_gal].any()
    # a star with a neighbour inside 3 FWHM is not judged (its annulus holds the neighbour's light)
    x2, y2 = np.r_[x, x[1] + 5.0], np.r_[y, y[1]]
    f2, e2, _ = aperture_flux(data, noise, bad, x2, y2, fwhm, 1.0)
    ext2 = extended(data, bad, x2, y2, f2, f2 / e2, fwhm, fwhm, noise, np.ones(len(x2), bool))
    assert not ext2[1] and not ext2[-1]


def test_a_masked_pixel_in_the_window_does_not_throw_the_windowed_centroid_away():
    """sep notes a masked pixel in the window (``APER_HASMASKED``) and leaves it out; the centroid is still
    the better position (the isophotal one is kept only where it fails or moves > 1 px off a peak)."""
    import sep

    from survey_proc.photometry.aperture import windowed_centroids

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:64].astype(float)
    sigma = 1.9 / 2.3548
    xs, ys = 10.0 + rng.uniform(-0.5, 0.5, 6) + 8.0 * np.arange(6), 32.0 + rng.uniform(-0.5, 0.5, 6)
    img = sum(5000.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) for x, y in zip(xs, ys, strict=True))
    data = (img + rng.normal(0, 5.0, img.shape)).astype(np.float32)
    bad = np.zeros(img.shape, bool)
    bad[np.rint(ys).astype(int) + 2, np.rint(xs).astype(int) + 2] = True  # a masked pixel 2.2-3.6 px away
    x0, y0 = xs + 0.4, ys - 0.4  # rough detection positions
    _, _, flag = sep.winpos(data, x0, y0, np.full(6, sigma), mask=bad, subpix=5)
    assert (flag & sep.APER_HASMASKED).all()
    xc, yc, failed = windowed_centroids(data, bad, x0, y0, 1.9, 5, 5.0)
    assert not failed.any()
    err = np.hypot(xc - xs, yc - ys)  # the windowed centroids (the rough positions are 0.57 px off)
    assert err.max() < 0.15 and np.median(err) < 0.05, err
    core = np.zeros(img.shape, bool)
    core[np.rint(ys).astype(int), np.rint(xs).astype(int)] = True  # each star's own peak masked (saturated)
    _, _, fc = windowed_centroids(data, core, x0, y0, 1.9, 5, 5.0)
    assert fc.all()  # the centroid of the wings alone is not trusted: the input kept, flagged


def test_a_windowed_centroid_that_moves_onto_a_brighter_peak_is_kept_and_flagged():
    """An isophote holding a star and a fainter neighbour has its centre between them; the windowed
    centroid moves > 1 px onto the star. It is kept (``failed`` still True: a blend) when it is a
    significantly brighter peak than the start and no other detection is there; the start is kept
    otherwise."""
    from survey_proc.photometry.aperture import WINDOW_MOVE_MAX_FWHM, windowed_centroids

    yy, xx = np.mgrid[0:48, 0:48].astype(float)
    fwhm = 1.9
    sigma = fwhm / 2.3548
    star, faint = (20.3, 24.1), (23.6, 24.6)  # 3.3 px apart: one isophote at a low threshold
    img = sum(a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) for a, (x, y) in
              ((5000.0, star), (1200.0, faint))).astype(np.float32)
    bad = np.zeros(img.shape, bool)
    x0, y0 = np.array([21.7]), np.array([24.3])  # the isophotal centre, 1.4 px off the star
    xc, yc, failed = windowed_centroids(img, bad, x0, y0, fwhm, 5, 5.0)
    assert failed[0]  # moved > 1 px: flagged
    assert np.hypot(xc[0] - star[0], yc[0] - star[1]) < 0.3  # but on the star (the faint one pulls a little)
    # another detection already there: the start is kept
    xo, yo, _ = windowed_centroids(img, bad, x0, y0, fwhm, 5, 5.0, (np.array([21.7, 20.4]), np.array([24.3, 24.0])))
    assert xo[0] == x0[0] and yo[0] == y0[0]
    # the same pixels with a noise that makes the brighter peak insignificant (a faint source's window wandering)
    xn, _, fn = windowed_centroids(img, bad, x0, y0, fwhm, 5, 2000.0)
    assert fn[0] and xn[0] == x0[0]
    # started on the faint star itself, sep's window walks the 3.3 px to the bright one: beyond the limit, not kept
    assert 3.3 > WINDOW_MOVE_MAX_FWHM * fwhm
    xf, yf, ff = windowed_centroids(img, bad, np.array([faint[0]]), np.array([faint[1]]), fwhm, 5, 5.0)
    assert ff[0] and xf[0] == faint[0] and yf[0] == faint[1]


def test_an_aperture_correction_that_is_no_measurement_is_refused():
    """Below 1 (less light within 4 FWHM than within 1: the sky under the stars is wrong, as on a nebula)
    or known to worse than 10 %: the model's value, n_stars 0 and the reason."""
    from survey_proc.config import PhotometryConfig
    from survey_proc.photometry.aperture import APCORR_MAX_REL_ERROR, apcorr_refusal, aperture_correction, model_apcorr

    assert apcorr_refusal(np.array([1.30, 1.31, 1.29, 1.32, 1.30])) == ""
    assert apcorr_refusal(np.array([0.213, 0.083, 0.242, -0.988, 2.64])) == \
        "measured 0.213 on 5 stars refused: below 1"  # the Horsehead's 5 stars on its nebula
    wide = np.array([1.0, 1.3, 1.9, 2.6, 1.1])
    assert 1.2533 * 1.4826 * np.median(np.abs(wide - 1.3)) / np.sqrt(5) / 1.3 > APCORR_MAX_REL_ERROR
    assert apcorr_refusal(wide) == "measured 1.300 on 5 stars refused: its standard error 19.2% exceeds 10%"

    # ten Gaussian stars, each sitting in a hole of the sky 2-4 FWHM out (a sky over-subtracted around them)
    rng = np.random.default_rng(0)
    fwhm = 3.0
    sigma = fwhm / 2.3548
    yy, xx = np.mgrid[0:200, 0:200].astype(float)
    xs, ys = 30.0 + 35.0 * (np.arange(10) % 5), 50.0 + 90.0 * (np.arange(10) // 5)
    img = np.zeros(xx.shape)
    for x, y in zip(xs, ys, strict=True):
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        img += 3000.0 * np.exp(-r2 / (2 * sigma**2)) / (2 * np.pi * sigma**2)
        img -= 20.0 * ((r2 > (2 * fwhm) ** 2) & (r2 < (4 * fwhm) ** 2))
    img += rng.normal(0, 0.5, img.shape)
    cfg = PhotometryConfig()
    from survey_proc.photometry.aperture import aperture_flux

    f, fe = aperture_flux(img, 0.5, np.zeros(img.shape, bool), xs, ys, cfg.aperture_fwhm * fwhm, np.inf)[:2]
    ok = np.ones(10, bool)
    apc, n, why = aperture_correction(img, np.zeros(img.shape, bool), xs, ys, f, f / fe, ok, fwhm, cfg)
    assert (apc, n) == (model_apcorr(cfg), 0)
    assert why.startswith("measured ") and why.endswith("stars refused: below 1")
    # the same stars on a flat sky: measured (a Gaussian has 6 % of its light beyond 1 FWHM)
    clean = img - np.where(img < -10, -20.0, 0.0)
    f, fe = aperture_flux(clean, 0.5, np.zeros(img.shape, bool), xs, ys, cfg.aperture_fwhm * fwhm, np.inf)[:2]
    apc, n, why = aperture_correction(clean, np.zeros(img.shape, bool), xs, ys, f, f / fe, ok, fwhm, cfg)
    assert n == 10 and why == "" and apc == pytest.approx(1 / (1 - np.exp(-2.3548**2 / 2)), rel=0.02)  # (pixels)
