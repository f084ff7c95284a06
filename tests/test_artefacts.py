"""Artefact suppression of the sep path (survey_proc/detect/artefacts.py) on synthetic pixels.

A bright star with a wide halo and four diffraction spikes, a faint star beside it, and an
exponential (Sersic n = 1) galaxy: plain sep splits the halo, the spikes and the galaxy
into pieces; the default (filtered) sep keeps one detection each and the faint star.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from survey_proc.catalog.extract import extract_block
from survey_proc.config import RunConfig
from survey_proc.detect import artefacts, classical
from survey_proc.detect.registry import make_detector
from survey_proc.errors import SurveyProcError
from survey_proc.tiling import tile_grid

SKY, NOISE, GAIN = 100.0, 5.0, 1e6  # sky (ADU), its noise (ADU, Gaussian); gain high: no Poisson term
FWHM = 3.0
SIZE = 200


def _moffat(xx: np.ndarray, yy: np.ndarray, x: float, y: float, flux: float, fwhm: float = FWHM,
            beta: float = 3.0) -> np.ndarray:
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return flux * (beta - 1) / (np.pi * alpha**2) * (1 + ((xx - x) ** 2 + (yy - y) ** 2) / alpha**2) ** (-beta)


def _bright_star(xx: np.ndarray, yy: np.ndarray, x: float, y: float, flux: float) -> np.ndarray:
    """A Moffat core, a wide r^-2.5 halo (1 % of the flux) and four diffraction spikes (1 %)."""
    r = np.hypot(xx - x, yy - y)
    img = _moffat(xx, yy, x, y, flux)
    halo = (1 + (r / (2 * FWHM)) ** 2) ** -1.25
    img += 0.1 * flux * halo / halo.sum()
    for ang in (np.pi / 4, 3 * np.pi / 4):  # two lines through the centre: four spikes
        dist = np.abs(-(xx - x) * np.sin(ang) + (yy - y) * np.cos(ang))
        spike = np.exp(-0.5 * (dist / 0.8) ** 2) * (1 + (r / FWHM) ** 2) ** -1.0
        img += 0.03 * flux * spike / spike.sum()
    return img


def _image(seed: int, bright: bool = True, faint: tuple[float, float, float] | None = None,
           galaxy: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    img = np.full((SIZE, SIZE), SKY)
    if bright:
        star = _bright_star(xx, yy, 100.3, 99.6, 3.0e6)
        # a lumpy halo (plate grain, scattered light): 30 % correlated fluctuations of the star's light
        lumps = ndimage.gaussian_filter(rng.normal(0, 1, img.shape), 1.5)
        img += star * (1 + 0.3 * lumps / lumps.std())
    if faint is not None:
        img += _moffat(xx, yy, *faint)
    if galaxy:  # exponential disk, half-light radius 10 px, axis ratio 0.6, position angle 30 deg
        c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
        u, v = (xx - 100.2) * c + (yy - 99.7) * s, -(xx - 100.2) * s + (yy - 99.7) * c
        re, q = 10.0, 0.6
        rr = np.hypot(u, v / q)
        gal = np.exp(-1.678 * rr / re)
        lumps = ndimage.gaussian_filter(rng.normal(0, 1, img.shape), 1.5)
        img += 1.5e5 * gal / gal.sum() * (1 + 0.3 * lumps / lumps.std())
    img += rng.normal(0, NOISE, img.shape)
    return img.astype(np.float32)


def _detect(img: np.ndarray, on: bool, saturation: float = np.inf) -> np.ndarray:
    cfg = RunConfig(detector="sep")
    cfg = replace(cfg, detection=replace(cfg.detection, suppress_artefacts=on))
    tiles = tile_grid(SIZE, SIZE, cfg.tile_px, cfg.halo_px)
    t = extract_block(img, None, (0, 0), tiles, GAIN, saturation, cfg, make_detector(cfg)).table
    return t[["x", "y"]].to_numpy()


def _within(xy: np.ndarray, x: float, y: float, r: float) -> int:
    return int(np.sum(np.hypot(xy[:, 0] - x, xy[:, 1] - y) <= r))


def _saturation(img: np.ndarray) -> float:
    return float(np.percentile(img, 99.5))  # the core's ~200 brightest pixels are saturated (bad)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_saturated_star_with_lumpy_halo_and_spikes(seed: int) -> None:
    img = _image(seed)
    sat = _saturation(img)
    plain, filt = _detect(img, False, sat), _detect(img, True, sat)
    r = 4 * FWHM  # the benchmark's radius: extra detections within 4 FWHM of the star, beyond one
    extra_plain = _within(plain, 100.3, 99.6, r) - 1
    extra_filt = _within(filt, 100.3, 99.6, r) - 1
    assert extra_plain >= 2, extra_plain
    assert 0 <= extra_filt <= 1, extra_filt  # one piece stands for the saturated star
    assert len(filt) < len(plain)


@pytest.mark.parametrize(("dist", "flux"), [(6 * FWHM, 3000.0), (10 * FWHM, 2500.0)])
def test_faint_star_beside_a_bright_one_is_kept(dist: float, flux: float) -> None:
    # S/N of the faint star: F / (noise sqrt(N_eff)), N_eff ~ 4 pi (FWHM / 2.355)^2 ~ 20 px: 3000 -> 27,
    # 2500 -> 22 (plain sep itself misses some at 1500)
    x, y = 100.3 + dist, 99.6  # between the spikes, on the halo
    for seed in (4, 5):
        img = _image(seed, faint=(x, y, flux))
        filt = _detect(img, True, _saturation(img))
        assert _within(filt, x, y, 1.5) == 1, (seed, dist, flux)


def test_faint_star_on_a_spike_is_kept() -> None:
    d = 8 * FWHM
    x, y = 100.3 + d / np.sqrt(2), 99.6 + d / np.sqrt(2)  # on the 45 deg spike
    img = _image(6, faint=(x, y, 4000.0))
    filt = _detect(img, True, _saturation(img))
    assert _within(filt, x, y, 1.5) == 1


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_extended_galaxy_is_one_detection(seed: int) -> None:
    img = _image(seed, bright=False, galaxy=True)
    filt = _detect(img, True)
    on_gal = _within(filt, 100.2, 99.7, 15.0)  # within 1.5 half-light radii
    assert on_gal <= 1.5
    assert on_gal == 1


def test_isolated_faint_stars_untouched() -> None:
    rng = np.random.default_rng(10)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    img = np.full((SIZE, SIZE), SKY)
    pos = rng.uniform(20, SIZE - 20, (30, 2))
    for x, y in pos:
        img += _moffat(xx, yy, x, y, 1200.0)
    img = (img + rng.normal(0, NOISE, img.shape)).astype(np.float32)
    plain, filt = _detect(img, False), _detect(img, True)
    assert len(plain) == len(filt)
    np.testing.assert_allclose(plain, filt)


def test_errors_are_pinned() -> None:
    data = np.zeros((20, 20), np.float32)
    bad = np.zeros((20, 20), bool)
    objs, _, _ = classical.extract_segmap(data + 1, bad, 1.0, RunConfig().detection)
    cfg = RunConfig().detection
    with pytest.raises(SurveyProcError, match=r"segmentation map \(10, 10\) is not the window's shape \(20, 20\)"):
        artefacts.suppress(data, bad, 1.0, objs, np.zeros((10, 10), np.int32), 3.0, cfg)
    with pytest.raises(SurveyProcError, match="needs a positive FWHM and noise, got FWHM nan px"):
        artefacts.suppress(data, bad, 1.0, objs, np.zeros((20, 20), np.int32), float("nan"), cfg)
    with pytest.raises(SurveyProcError, match=r"needs a positive FWHM and noise, got FWHM 3\.0 px and noise 0\.0 ADU"):
        artefacts.suppress(data, bad, 0.0, objs, np.zeros((20, 20), np.int32), 3.0, cfg)
