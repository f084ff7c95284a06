"""The pixel-level centroid of the varying light (survey_proc.lightcurves.blend_vetting) on synthetic stamps."""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.lightcurves.blend_vetting import model_variation, vet_blend

FWHM = 1.75
N = 15  # stamp side (px)


def _psf(xx: np.ndarray, yy: np.ndarray, x0: float, y0: float) -> np.ndarray:
    s = FWHM / 2.3548
    return np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)


def _survey(f_const: float, f_var: float, sep: tuple[float, float], n_ep: int = 500, seed: int = 1
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Stamps of a constant star (the object) with a pulsating variable ``sep`` px away, dithered epochs."""
    rng = np.random.default_rng(seed)
    mjd = 61000.0 + np.sort(rng.uniform(0, 3.5, n_ep))
    period, t0 = 0.61, 61000.1
    var = f_var * (1.0 + 0.45 * np.sin(2 * np.pi * (mjd - t0) / period))
    xo, yo = 100.3, 200.6  # the object in the reference frame
    shift = rng.uniform(-1.0, 1.0, (n_ep, 2))  # dither: epoch = reference + shift
    yy, xx = np.mgrid[0:N, 0:N].astype(float)
    stamps = np.empty((n_ep, N, N))
    dxs, dys = np.empty(n_ep), np.empty(n_ep)
    r = N // 2
    for e in range(n_ep):
        xe, ye = xo + shift[e, 0], yo + shift[e, 1]
        ix, iy = int(np.rint(xe)), int(np.rint(ye))
        dxs[e], dys[e] = xe - ix, ye - iy
        sky = 40.0 + rng.normal(0, 1.0)
        img = (sky + f_const * _psf(xx, yy, r + dxs[e], r + dys[e])
               + var[e] * _psf(xx, yy, r + dxs[e] + sep[0], r + dys[e] + sep[1]))
        stamps[e] = img + rng.normal(0, 1.0, img.shape) * np.sqrt(img)
    flux = f_const + var + rng.normal(0, np.sqrt(f_const + f_var + 40 * 12), n_ep)
    return stamps, dxs, dys, mjd, flux, period, t0


def test_blend_offset_points_to_the_variable() -> None:
    sep = (1.2, -0.9)  # 1.5 px
    stamps, dx, dy, mjd, flux, period, t0 = _survey(20000.0, 1500.0, sep)
    m = model_variation(mjd, flux, period, t0)
    res = vet_blend(stamps, dx, dy, m, fwhm_px=FWHM, n_boot=60, seed=3)
    assert res.amplitude_snr > 5
    assert abs(res.dx - sep[0]) < 3 * res.sigma_dx + 0.05
    assert abs(res.dy - sep[1]) < 3 * res.sigma_dy + 0.05
    assert res.offset == pytest.approx(1.5, abs=0.2)
    assert res.offset_significance > 5
    assert not res.at_bound
    assert res.variability_image.shape == (N - 4, N - 4)


def test_masked_pixels_leave_only_their_epochs_out() -> None:
    sep = (1.2, -0.9)
    stamps, dx, dy, mjd, flux, period, t0 = _survey(20000.0, 1500.0, sep, seed=5)
    stamps[::3, 2, 2] = np.nan  # a bad pixel in a third of the epochs, a saturated column in all
    stamps[:, :, 12] = np.nan
    m = model_variation(mjd, flux, period, t0)
    res = vet_blend(stamps, dx, dy, m, fwhm_px=FWHM, n_boot=30, seed=3)
    assert res.n_epochs == 500
    assert res.offset == pytest.approx(1.5, abs=0.2)
    assert not np.isfinite(res.variability_error[:, -1]).any()


def test_isolated_variable_has_no_offset() -> None:
    stamps, dx, dy, mjd, flux, period, t0 = _survey(0.0, 3000.0, (0.0, 0.0), seed=2)
    m = model_variation(mjd, flux, period, t0)
    res = vet_blend(stamps, dx, dy, m, fwhm_px=FWHM, n_boot=60, seed=3)
    assert res.offset < 0.1
    assert res.offset < 3 * res.sigma_offset + 0.05


def test_jacobian_maps_the_offset_to_the_reference_frame() -> None:
    sep = (1.5, 0.0)
    stamps, dx, dy, mjd, flux, period, t0 = _survey(20000.0, 1500.0, sep, seed=4)
    m = model_variation(mjd, flux, period, t0)
    # epoch x = -y_ref, epoch y = x_ref (a 90 degree rotation): an epoch offset of +1.5 in x is -1.5 in y_ref
    res = vet_blend(stamps, dx, dy, m, fwhm_px=FWHM, jacobian=np.array([[0.0, -1.0], [1.0, 0.0]]), n_boot=20)
    assert res.dx == pytest.approx(0.0, abs=0.2)
    assert res.dy == pytest.approx(-1.5, abs=0.2)


def test_errors_name_the_problem() -> None:
    stamps, dx, dy, mjd, flux, period, t0 = _survey(0.0, 3000.0, (0.0, 0.0), n_ep=30)
    m = model_variation(mjd, flux, period, t0)
    bad = stamps.copy()
    bad[:15] = np.nan
    with pytest.raises(ValueError, match=r"15 usable epochs .* 20 needed"):
        vet_blend(bad, dx, dy, m, fwhm_px=FWHM)
    with pytest.raises(ValueError, match=r"dx has shape \(29,\), expected \(30,\)"):
        vet_blend(stamps, dx[:-1], dy, m, fwhm_px=FWHM)
    with pytest.raises(ValueError, match=r"n odd"):
        vet_blend(stamps[:, :-1, :-1], dx, dy, m, fwhm_px=FWHM)
    with pytest.raises(ValueError, match=r"crop_px 1 < 2; .*\(crop at least 2\)"):
        vet_blend(stamps, dx, dy, m, fwhm_px=FWHM, crop_px=1)
    masked = stamps.copy()
    masked[:, :, 3:] = np.nan  # only 3 columns of the 15 px stamp: 1 of the 11 cropped columns keeps its epochs
    with pytest.raises(ValueError, match=r"pixels of the aligned stamp have 20 or more good epochs, 9 needed"):
        vet_blend(masked, dx, dy, m, fwhm_px=FWHM)
    with pytest.raises(ValueError, match=r"nothing varies"):
        vet_blend(stamps, dx, dy, np.zeros(30), fwhm_px=FWHM)
    with pytest.raises(ValueError, match=r"period -1.0 d is not a positive"):
        model_variation(mjd, flux, -1.0, t0)


def test_a_small_offset_gets_fewer_draws_and_the_same_point_estimate() -> None:
    # the blend rule needs an offset above a threshold: below half of it only the reported
    # uncertainty comes from fewer draws; a candidate above it gets them all
    stamps, dx, dy, mjd, flux, period, t0 = _survey(0.0, 3000.0, (0.0, 0.0), seed=2)
    m = model_variation(mjd, flux, period, t0)
    full = vet_blend(stamps, dx, dy, m, fwhm_px=FWHM, n_boot=60, seed=3)
    few = vet_blend(stamps, dx, dy, m, fwhm_px=FWHM, n_boot=60, seed=3, full_boot_above_px=0.5, n_boot_small=10)
    assert full.n_boot == 60 and few.n_boot == 10
    assert few.offset == full.offset and few.dx == full.dx
    assert few.sigma_offset == pytest.approx(full.sigma_offset, rel=0.6)
    blend = _survey(20000.0, 1500.0, (1.2, -0.9), seed=1)
    mb = model_variation(blend[3], blend[4], blend[5], blend[6])
    res = vet_blend(*blend[:3], mb, fwhm_px=FWHM, n_boot=40, seed=3, full_boot_above_px=0.5, n_boot_small=10)
    assert res.n_boot == 40 and res.offset > 1.0


def test_batched_alignment_is_scipys_spline_shift_per_epoch() -> None:
    """_align gives ndimage.shift's numbers (order 3, mode nearest) and its bad-pixel reach, for all epochs at once."""
    from scipy import ndimage

    from survey_proc.lightcurves.blend_vetting import _align

    stamps, dx, dy, *_ = _survey(20000.0, 1500.0, (1.2, -0.9), n_ep=60, seed=7)
    stamps[::4, 3, 5] = np.nan
    stamps[1::7, :, 11] = np.nan
    stamps[5, 0, :] = np.nan
    aligned, bad = _align(stamps, dx, dy, 2)
    inner = (slice(2, N - 2), slice(2, N - 2))
    for i in range(len(dx)):
        nan = ~np.isfinite(stamps[i])
        st = np.where(nan, np.nanmedian(stamps[i]), stamps[i])
        want = ndimage.shift(st, (-dy[i], -dx[i]), order=3, mode="nearest")[inner]
        moved = ndimage.shift(nan.astype(float), (-dy[i], -dx[i]), order=1, mode="constant", cval=1.0) > 0
        want_bad = ndimage.binary_dilation(moved, np.ones((3, 3), bool))[inner]
        np.testing.assert_allclose(aligned[i], want, rtol=1e-12, atol=1e-9)
        assert np.array_equal(bad[i], want_bad)
    assert bad[::4].any() and not bad[2].any()


def test_batched_bootstrap_pieces_match_the_one_draw_versions() -> None:
    """The bootstrap's batched regression and Gaussian fits give what _coefficients and scipy's fit give per draw."""
    from survey_proc.lightcurves.blend_vetting import _boot_coefficients, _coefficients, _fit_gaussian, _fit_gaussians

    rng = np.random.default_rng(4)
    n_ep, k = 80, 11
    x = np.column_stack([np.ones(n_ep), rng.normal(size=n_ep), rng.uniform(-0.5, 0.5, (n_ep, 2))])
    yy, xx = np.mgrid[0:k, 0:k]
    img = 30.0 * np.exp(-((xx - 6.3) ** 2 + (yy - 4.8) ** 2) / (2 * 0.8 ** 2))
    y = 100 + np.outer(x[:, 1], img.ravel()) + rng.normal(0, 1.0, (n_ep, k * k))
    w = np.ones_like(y)
    w[rng.random(y.shape) < 0.05] = 0.0  # scattered bad epochs of some pixels
    w[:70, 0] = 0.0  # a pixel with too few good epochs
    y = np.where(w > 0, y, 0.0)
    draws = [rng.integers(0, n_ep, n_ep) for _ in range(6)]
    counts = np.stack([np.bincount(d, minlength=n_ep) for d in draws]).astype(float)
    batched = _boot_coefficients(y, w, x, counts)
    for b, idx in enumerate(draws):
        one, _ = _coefficients(y[idx], w[idx], x[idx])
        np.testing.assert_allclose(batched[b], one, rtol=1e-9, atol=1e-9)
    _, err = _coefficients(y, w, x)
    err = np.where(np.isfinite(err), err, np.inf).reshape(k, k)
    fits = _fit_gaussians(batched.reshape(-1, k, k), err, 0.8, 5.0, 5.0)
    for b in range(len(draws)):
        ref = _fit_gaussian(batched[b].reshape(k, k), err, 0.8, [(5.0, 5.0)])
        assert ref is not None
        np.testing.assert_allclose(fits[b, 1:3], ref[1:3], atol=1e-5)
        np.testing.assert_allclose(fits[b, 0], ref[0], rtol=1e-5)
    assert np.all(np.abs(fits[:, 1] - 6.3) < 0.1) and np.all(np.abs(fits[:, 2] - 4.8) < 0.1)
