"""The photometry's background: the mesh background again with the detected stars masked."""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.config import DetectionConfig
from survey_proc.detect import classical
from survey_proc.errors import ConfigError
from survey_proc.photometry.background import mask_radii_px, masked_background
from tests.conftest import run_config

SKY, NOISE, FWHM = 100.0, 5.0, 2.5


def _moffat_field(n: int, n_stars: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stars (Moffat beta 3) on a flat sky with Gaussian noise; returns image, x, y."""
    alpha = FWHM / (2 * np.sqrt(2 ** (1 / 3) - 1))
    yy, xx = np.mgrid[:n, :n].astype(float)
    x, y = rng.uniform(5, n - 5, n_stars), rng.uniform(5, n - 5, n_stars)
    flux = 10 ** rng.uniform(2.5, 5.0, n_stars)  # S/N ~ 15 to 5000
    img = np.full((n, n), SKY)
    norm = (3 - 1) / (np.pi * alpha**2)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        sl = (slice(max(0, int(yi) - 40), int(yi) + 41), slice(max(0, int(xi) - 40), int(xi) + 41))
        r2 = (xx[sl] - xi) ** 2 + (yy[sl] - yi) ** 2
        img[sl] += fi * norm * (1 + r2 / alpha**2) ** -3
    return (img + rng.normal(0, NOISE, img.shape)).astype(np.float32), x, y


def _detections(img: np.ndarray, bad: np.ndarray, cfg: DetectionConfig):
    b = classical.estimate_background(img, bad, cfg)
    data = np.ascontiguousarray(img - b.back, dtype=np.float32)
    objs, _ = classical.extract(data, bad, b.global_rms, cfg)
    return b, objs


def test_masking_the_stars_takes_their_light_out_of_the_sky():
    rng = np.random.default_rng(11)
    img, _, _ = _moffat_field(512, 900, rng)
    bad = np.zeros(img.shape, bool)
    cfg = DetectionConfig()
    b, objs = _detections(img, bad, cfg)
    m = masked_background(img, bad, objs["x"], objs["y"], objs["peak"], b.global_rms, FWHM, cfg)
    first = (np.median(b.back) - SKY) / NOISE
    second = (np.median(m.back) - SKY) / NOISE
    assert first > 0.1  # the first estimate holds star light
    assert abs(second) < 0.5 * first and abs(second) < 0.06


def test_noise_peaks_are_not_masked_and_leave_the_sky_unchanged():
    from scipy import ndimage

    rng = np.random.default_rng(12)
    img = (SKY + rng.normal(0, NOISE, (512, 512))).astype(np.float32)
    bad = np.zeros(img.shape, bool)
    cfg = DetectionConfig()
    b = classical.estimate_background(img, bad, cfg)
    # the 400 highest local maxima of the smoothed noise, as a low threshold would report them (peak 2.5 sigma)
    sm = ndimage.uniform_filter(img.astype(float), 3)
    peaks = (sm == ndimage.maximum_filter(sm, 9))
    iy, ix = np.nonzero(peaks)
    top = np.argsort(-sm[iy, ix])[:400]
    x, y, pk = ix[top].astype(float), iy[top].astype(float), np.full(400, 2.5 * NOISE)
    m = masked_background(img, bad, x, y, pk, b.global_rms, FWHM, cfg)
    assert np.array_equal(m.back, b.back)  # below min_peak_sigma = 3: nothing masked
    # masking them takes the sky's upward fluctuations out of the meshes: the sky comes out low
    low = masked_background(img, bad, x, y, pk, b.global_rms, FWHM, cfg, min_peak_sigma=0)
    assert np.median(low.back) < np.median(b.back) - 0.005 * NOISE


def test_mask_radii_follow_the_moffat_wing_within_their_bounds():
    r = mask_radii_px(np.array([0.0, 10.0, 1e3, 1e5, 1e9]), 1.0, 2.0)
    assert r[0] == pytest.approx(3.0) and r[-1] == pytest.approx(20.0)  # 1.5 and 10 FWHM
    assert np.all(np.diff(r) >= 0)
    alpha = 2.0 / (2 * np.sqrt(2 ** (1 / 3) - 1))
    assert (1 + (r[2] / alpha) ** 2) ** -3 * 1e3 == pytest.approx(0.1, rel=1e-6)  # 0.1 sigma at the radius


def test_dense_masks_shrink_to_leave_half_the_window():
    rng = np.random.default_rng(13)
    img = (SKY + rng.normal(0, NOISE, (128, 128))).astype(np.float32)
    bad = np.zeros(img.shape, bool)
    x, y = np.meshgrid(np.arange(4.0, 128, 8), np.arange(4.0, 128, 8))
    m = masked_background(img, bad, x.ravel(), y.ravel(), np.full(x.size, 1e6), NOISE, FWHM, DetectionConfig())
    assert np.isfinite(m.back).all() and abs(np.median(m.back) - SKY) < 0.2 * NOISE


def test_the_background_setting_is_checked():
    with pytest.raises(ConfigError, match=r"photometry.background must be 'masked' .* or 'mesh'"):
        run_config("s.zarr", "o", photometry={"background": "annulus"})
