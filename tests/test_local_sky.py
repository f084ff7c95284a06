"""The local annulus sky of the aperture photometry (photometry.local_sky = "annulus", issue 21)."""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.catalog.extract import extract_block
from survey_proc.config import ConfigError, DetectionConfig, PhotometryConfig, load_config
from survey_proc.detect import classical
from survey_proc.detect.registry import make_detector
from survey_proc.photometry import aperture as A
from survey_proc.tiling import tile_grid

N = 160
FWHM = 3.0
BETA = 3.0
SKY, NOISE = 200.0, 5.0
HALO_XY = (40.0, 80.0)  # a bright star's halo, centred here (its core is not in the test)
STAR_XY = (70.0, 80.3)  # the measured star, 30 px (10 FWHM) from the halo's centre
YY, XX = np.mgrid[0:N, 0:N].astype(float)


def _moffat(x0: float, y0: float, flux: float) -> np.ndarray:
    alpha = FWHM / (2.0 * np.sqrt(2.0 ** (1.0 / BETA) - 1.0))
    r2 = (XX - x0) ** 2 + (YY - y0) ** 2
    return flux * (BETA - 1.0) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** (-BETA)


def _halo(peak: float = 3000.0, core_px: float = 8.0) -> np.ndarray:
    """A steep, curved halo: at the star it is 64 ADU/px and falls by 2 ADU/px per px; the 32-px mesh leaves ~38."""
    r2 = (XX - HALO_XY[0]) ** 2 + (YY - HALO_XY[1]) ** 2
    return peak / (1.0 + r2 / core_px**2) ** 1.5


def _measure(data: np.ndarray, x: np.ndarray, y: np.ndarray, local: bool) -> tuple[np.ndarray, np.ndarray]:
    bad = np.zeros(data.shape, bool)
    f, fe, _ = A.aperture_measure(data, NOISE, bad, None, x, y, FWHM, 1e9)
    if local:
        f, fe = A.with_local_sky(data, bad, x, y, FWHM, f, fe, NOISE, 2.0 * FWHM, 3.0 * FWHM, x, y)
    return f, fe


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_star_on_a_halo_is_measured_with_the_annulus_and_biased_without(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = np.array([STAR_XY[0]]), np.array([STAR_XY[1]])
    star, noise = _moffat(*STAR_XY, 4e4), rng.normal(0.0, NOISE, (N, N))
    flat = np.ascontiguousarray(star + noise, dtype=np.float32)  # the true sky subtracted
    img = (SKY + _halo() + star + noise).astype(np.float32)
    back = classical.estimate_background(img, np.zeros(img.shape, bool), DetectionConfig()).back
    on_halo = np.ascontiguousarray(img - back, dtype=np.float32)  # what the pipeline subtracts
    for local, lo, hi in ((False, 0.03, 0.05), (True, -0.01, 0.01)):
        f_flat, _ = _measure(flat, x, y, local)
        f_halo, _ = _measure(on_halo, x, y, local)
        bias = float(f_halo[0] / f_flat[0] - 1.0)
        assert lo < bias < hi, (local, bias)


def test_the_annulus_reads_the_halo_left_by_the_mesh() -> None:
    img = (SKY + _halo()).astype(np.float32)
    back = classical.estimate_background(img, np.zeros(img.shape, bool), DetectionConfig()).back
    left = np.ascontiguousarray(img - back, dtype=np.float32)
    x, y = np.array([STAR_XY[0]]), np.array([STAR_XY[1]])
    sky, err, n = A.local_sky(left, np.zeros(img.shape, bool), x, y, 2 * FWHM, 3 * FWHM, NOISE)
    assert 30.0 < left[80, 70] < 45.0  # the mesh misses ~38 ADU/px of the halo here
    # within 10 %: the halo is curved, and an annulus median reads a convex profile a little low
    assert abs(sky[0] - left[80, 70]) < 0.1 * left[80, 70]
    assert n[0] == pytest.approx(np.pi * (9.0**2 - 6.0**2), rel=0.1)
    assert err[0] == pytest.approx(np.sqrt(np.pi / 2) * NOISE / np.sqrt(n[0]))


def test_flux_err_with_the_annulus_matches_monte_carlo() -> None:
    """Blank-sky apertures with a narrow annulus (1.2-1.8 FWHM), so that the sky's error is half the variance."""
    rng = np.random.default_rng(7)
    g = np.arange(16.0, N - 15, 16.0)
    x, y = (a.ravel() for a in np.meshgrid(g, g))
    bad = np.zeros((N, N), bool)
    fluxes, errs, errs_sep = [], [], []
    for _ in range(60):
        data = np.ascontiguousarray(rng.normal(0.0, NOISE, (N, N)), dtype=np.float32)
        f, fe, _ = A.aperture_measure(data, NOISE, bad, None, x, y, FWHM, 1e9)
        fl, fel = A.with_local_sky(data, bad, x, y, FWHM, f, fe, NOISE, 1.2 * FWHM, 1.8 * FWHM, x, y)
        fluxes.append(fl)
        errs.append(fel)
        errs_sep.append(fe)
    scatter = float(np.std(np.concatenate(fluxes)))
    assert float(np.median(np.concatenate(errs))) / scatter == pytest.approx(1.0, abs=0.15)
    assert float(np.median(np.concatenate(errs_sep))) / scatter < 0.85  # sep's error alone misses the sky's


def test_too_few_annulus_pixels_keep_the_mesh_sky() -> None:
    data = np.full((40, 40), 50.0, np.float32)
    bad = np.ones((40, 40), bool)
    bad[:, :2] = False  # 80 usable pixels, none in the annulus
    sky, err, n = A.local_sky(data, bad, np.array([20.0]), np.array([20.0]), 6.0, 9.0, NOISE)
    assert sky[0] == 0.0 and err[0] == 0.0 and n[0] == 0


def test_the_model_apcorr_carries_the_annulus_own_light() -> None:
    none = A.model_apcorr(PhotometryConfig())
    ann = A.model_apcorr(PhotometryConfig(local_sky="annulus"))
    assert none == pytest.approx(A.moffat_apcorr(1.0, 4.0))
    assert ann / none == pytest.approx(1.0075, abs=0.001)  # 0.57 % of the flux in a 0.76 aperture share


def test_extraction_uses_the_setting_on_the_halo() -> None:
    rng = np.random.default_rng(5)
    stars = sum(_moffat(xs, ys, 2e4) for xs, ys in ((70.3, 80.4), (120.6, 40.2), (115.2, 125.7)))
    img = (SKY + _halo() + stars + rng.normal(0.0, NOISE, (N, N))).astype(np.float32)
    tiles = tile_grid(N, N, 128, 16)
    out = {}
    for mode in ("none", "annulus"):
        cfg = load_config(None, {"detector": "sep", "photometry": {"local_sky": mode}, "forced": {"enabled": False}})
        t = extract_block(img, None, (0, 0), tiles, 1e9, 1e9, cfg, make_detector(cfg)).table
        j = int(np.argmin(np.hypot(t["x"] - 70.3, t["y"] - 80.4)))
        k = int(np.argmin(np.hypot(t["x"] - 120.6, t["y"] - 40.2)))
        out[mode] = (t["flux_aper"].iloc[j], t["flux_aper"].iloc[k], t["flux_aper_err"].iloc[k])
    assert out["none"][0] / out["annulus"][0] > 1.04  # the halo's light, taken out by the annulus
    assert out["annulus"][1] == pytest.approx(out["none"][1], rel=0.02)  # far from it: the same within noise
    assert out["annulus"][2] > out["none"][2]  # the sky's error added


def test_the_local_sky_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"photometry\.local_sky = 'annulus' is not applied by forced photometry"):
        load_config(None, {"photometry": {"local_sky": "annulus"}})
    with pytest.raises(ConfigError, match=r"photometry\.local_sky must be 'none' \(the mesh sky only\) or 'annulus'"):
        load_config(None, {"photometry": {"local_sky": "plane"}})
    with pytest.raises(ConfigError, match=r"photometry\.local_sky_inner_fwhm \(3\.0\) must lie between "
                                          r"photometry\.aperture_fwhm \(1\.0\) and photometry\.local_sky_outer_fwhm"):
        load_config(None, {"forced": {"enabled": False},
                           "photometry": {"local_sky": "annulus", "local_sky_inner_fwhm": 3.0,
                                          "local_sky_outer_fwhm": 2.5}})


def test_the_gate_keeps_the_mesh_sky_where_the_annulus_agrees_with_it() -> None:
    rng = np.random.default_rng(11)
    g = np.arange(16.0, N - 15, 16.0)
    x, y = (a.ravel() for a in np.meshgrid(g, g))
    bad = np.zeros((N, N), bool)
    data = np.ascontiguousarray(rng.normal(0.0, NOISE, (N, N)), dtype=np.float32)
    f, fe, _ = A.aperture_measure(data, NOISE, bad, None, x, y, FWHM, 1e9)
    fg, feg = A.with_local_sky(data, bad, x, y, FWHM, f, fe, NOISE, 3 * FWHM, 5 * FWHM, x, y, min_snr=3.0)
    assert np.mean(fg == f) > 0.95 and np.all(feg[fg == f] == fe[fg == f])  # blank sky: the mesh's, unchanged
    on_halo = np.ascontiguousarray(data + _halo(), dtype=np.float32)
    xs, ys = np.array([STAR_XY[0]]), np.array([STAR_XY[1]])
    f, fe, _ = A.aperture_measure(on_halo, NOISE, bad, None, xs, ys, FWHM, 1e9)
    always = A.with_local_sky(on_halo, bad, xs, ys, FWHM, f, fe, NOISE, 3 * FWHM, 5 * FWHM, xs, ys)
    gated = A.with_local_sky(on_halo, bad, xs, ys, FWHM, f, fe, NOISE, 3 * FWHM, 5 * FWHM, xs, ys, min_snr=3.0)
    assert gated[0][0] == always[0][0] < 0.5 * f[0]  # a halo of ~50 ADU/px (10 sigma): far above the gate


def test_the_gate_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"photometry\.local_sky_min_snr must be >= 0"):
        load_config(None, {"photometry": {"local_sky_min_snr": -1.0}})
