"""detect/hidden.py (the residual pass) and photometry/neighbours.py (neighbour-subtracted apertures)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import sep

from survey_proc.catalog.extract import extract_block
from survey_proc.config import DetectionConfig, RunConfig, load_config
from survey_proc.detect import classical
from survey_proc.detect.hidden import find_hidden, residual_psf
from survey_proc.detect.registry import make_detector
from survey_proc.errors import ConfigError
from survey_proc.photometry.neighbours import neighbour_light
from survey_proc.photometry.psffit import moffat_alpha, render
from survey_proc.tiling import tile_grid

FWHM = 2.0
NOISE = 5.0
GAIN = 1e6  # the stars' Poisson noise left out: the tests are about the neighbours' light


def _image(xs, ys, fluxes, shape=(96, 96), seed=0):
    img = render(shape, np.asarray(xs, float), np.asarray(ys, float), np.asarray(fluxes, float),
                 moffat_alpha(FWHM, 3.0), 3.0, 20)
    return (img + np.random.default_rng(seed).normal(0, NOISE, shape)).astype(np.float32)


def test_the_residual_pass_finds_a_neighbour_hidden_in_a_brighter_stars_isophote():
    # a star of 40000 ADU and one of 10000 ADU 1.1 FWHM away: sep sees one isophote
    data = _image([40.3, 42.5], [50.2, 50.4], [40000, 10000])
    bad = np.zeros(data.shape, bool)
    cfg = DetectionConfig()
    first, _ = classical.extract(data, bad, NOISE, cfg)
    assert len(first) == 1
    found = find_hidden(data, bad, NOISE, GAIN, first["x"], first["y"], first["flux"], FWHM, cfg)
    assert len(found.objs) == 1
    assert np.hypot(found.x[0] - 42.5, found.y[0] - 50.4) < 0.6  # the joint fit's (sep's: 1 px off)


def test_the_residual_pass_adds_nothing_around_a_lone_star_or_on_noise():
    data = _image([40.3], [50.2], [40000], seed=3)
    bad = np.zeros(data.shape, bool)
    cfg = DetectionConfig()
    first, _ = classical.extract(data, bad, NOISE, cfg)
    found = find_hidden(data, bad, NOISE, GAIN, first["x"], first["y"], first["flux"], FWHM, cfg)
    assert len(found.objs) == 0
    # the residual of the lone star is noise: its core left no more than the noise and the model's error
    r = found.residual[46:55, 36:45]
    assert np.abs(r / found.noise_adu[46:55, 36:45]).max() < 5


def test_neighbour_light_is_the_other_stars_model_inside_the_aperture():
    x, y, f = np.array([30.4, 33.1, 70.0]), np.array([40.6, 41.9, 70.0]), np.array([5000.0, 12000.0, 3000.0])
    light = neighbour_light((96, 96), x, y, FWHM, x, y, f, np.arange(3), FWHM, model_error_frac=0.1)
    other = render((96, 96), x[1:2], y[1:2], f[1:2], moffat_alpha(FWHM, 3.0), 3.0, 4)  # the same 2-FWHM model
    expect = sep.sum_circle(np.ascontiguousarray(other), x[:1], y[:1], FWHM, subpix=5)[0][0]
    assert light.flux_adu[0] == pytest.approx(expect, rel=1e-6)
    assert light.flux_adu[2] == pytest.approx(0.0, abs=1e-3)  # a lone star keeps its aperture (rounding only)
    assert light.err_adu[0] == pytest.approx(0.1 * light.flux_adu[0])


def _block(cfg, data):
    tiles = tile_grid(*data.shape, data.shape[0], 0)
    return extract_block(data + 100.0, None, (0, 0), tiles, GAIN, 1e9, cfg, make_detector(cfg)).table


def test_the_options_through_extract_block_find_the_neighbour_and_take_its_light_out():
    g = np.arange(20.3, 180, 32.0)  # bright lone stars on a grid, for the FWHM and the aperture correction
    xs, ys = (v.ravel() for v in np.meshgrid(g, g + 0.4))
    keep = np.hypot(xs - 100, ys - 100) > 12
    xs, ys = np.r_[xs[keep], 100.2, 102.4], np.r_[ys[keep], 100.3, 100.5]
    fl = np.r_[np.full(keep.sum(), 30000.0), 40000.0, 10000.0]
    data = _image(xs, ys, fl, shape=(196, 196), seed=6)
    base = load_config(None, {})
    plain = _block(base, data)
    on = replace(base, detection=replace(base.detection, residual_detect=True))
    found = _block(on, data)
    sub = _block(replace(on, photometry=replace(on.photometry, subtract_neighbours=True)), data)

    def near(t, x, y):
        return t.iloc[int(np.argmin(np.hypot(t["x"] - x, t["y"] - y)))]

    assert len(found) == len(plain) + 1
    assert np.hypot(near(found, 102.4, 100.5)["x"] - 102.4, near(found, 102.4, 100.5)["y"] - 100.5) < 0.6
    # the bright star's aperture held some of the neighbour's light; subtracted, it reads closer to its own flux
    ratio_found = near(found, 100.2, 100.3)["flux"] / 40000.0
    ratio_sub = near(sub, 100.2, 100.3)["flux"] / 40000.0
    assert ratio_found > 1.02
    assert abs(ratio_sub - 1) < abs(ratio_found - 1) / 2


def test_residual_settings_are_checked():
    with pytest.raises(ConfigError, match=r"detection\.residual_model_error, residual_min_sep_fwhm, residual_min_snr, "
                                          r"residual_max_model_error and residual_max_chi2 must be >= 0"):
        load_config(None, {"detection": {"residual_min_snr": -1}})
    with pytest.raises(ConfigError, match=r"detection\.residual_psf must be 'moffat' .* or 'epsf'"):
        load_config(None, {"detection": {"residual_psf": "gauss"}})
    assert not RunConfig().detection.residual_detect and not RunConfig().photometry.subtract_neighbours


def _grid_field(fwhms=None, seed=8, pair=(40000.0, 10000.0)):
    """Bright lone stars on a grid (for the empirical PSF) and a hidden pair at (100.2, 100.3) / (102.4, 100.5)."""
    g = np.arange(20.3, 180, 32.0)
    xs, ys = (v.ravel() for v in np.meshgrid(g, g + 0.4))
    keep = np.hypot(xs - 100, ys - 100) > 12
    xs, ys = xs[keep], ys[keep]
    shape = (196, 196)
    img = np.zeros(shape)
    fw = np.full(len(xs), FWHM) if fwhms is None else np.asarray(fwhms, float)
    for w in np.unique(fw):
        s = fw == w
        img += render(shape, xs[s], ys[s], np.full(s.sum(), 30000.0), moffat_alpha(w, 3.0), 3.0, 20)
    img += render(shape, np.array([100.2, 102.4]), np.array([100.3, 100.5]), np.array(pair, float),
                  moffat_alpha(FWHM, 3.0), 3.0, 20)
    return (img + np.random.default_rng(seed).normal(0, NOISE, shape)).astype(np.float32), xs, ys


def test_the_empirical_psf_residual_finds_the_neighbour_with_a_measured_model_error():
    data, xs, ys = _grid_field(pair=(8000.0, 2500.0))
    bad = np.zeros(data.shape, bool)
    cfg = replace(DetectionConfig(), residual_psf="epsf")
    x, y = np.r_[xs, 100.6], np.r_[ys, 100.35]  # the pair as sep sees it: one detection between the two
    f = np.r_[np.full(len(xs), 30000.0), 50000.0]
    model = residual_psf(data + 100.0, bad, data, np.full(data.shape, 100.0), NOISE, GAIN, x, y, f, FWHM, cfg)
    assert model.kind == "epsf" and not model.skip
    assert 0.0 <= model.model_error < 0.05  # the stars are what the ePSF was built from: it describes them
    assert model.check_fit
    found = find_hidden(data, bad, NOISE, GAIN, x, y, f, FWHM, cfg, model=model)
    assert len(found.objs) == 1
    assert np.hypot(found.x[0] - 102.4, found.y[0] - 100.5) < 0.6


def test_the_residual_pass_is_skipped_where_no_psf_describes_the_stars():
    # every star elongated (two halves 1 px apart), half along x and half along y: no one PSF describes them all
    data, xs, ys = _grid_field(pair=(0.0, 0.0))
    along_x = np.arange(len(xs)) % 2 == 0
    dx, dy = np.where(along_x, 0.5, 0.0), np.where(along_x, 0.0, 0.5)
    shape = data.shape
    data = data - render(shape, xs, ys, np.full(len(xs), 30000.0), moffat_alpha(FWHM, 3.0), 3.0, 20)
    data = (data + render(shape, np.r_[xs - dx, xs + dx], np.r_[ys - dy, ys + dy], np.full(2 * len(xs), 15000.0),
                          moffat_alpha(FWHM, 3.0), 3.0, 20)).astype(np.float32)
    bad = np.zeros(shape, bool)
    cfg = replace(DetectionConfig(), residual_psf="epsf", residual_max_model_error=0.03)  # measured here: ~0.06
    f = np.full(len(xs), 30000.0)
    model = residual_psf(data + 100.0, bad, data, np.full(shape, 100.0), NOISE, GAIN, xs, ys, f, FWHM, cfg)
    assert model.skip and model.model_error > cfg.residual_max_model_error
    assert model.why is not None and "no residual pass" in model.why
    # the Moffat mode keeps the fixed error and never skips
    moffat = residual_psf(data + 100.0, bad, data, np.full(shape, 100.0), NOISE, GAIN, xs, ys, f, FWHM,
                          DetectionConfig())
    assert moffat.kind == "moffat" and not moffat.skip and moffat.model_error == DetectionConfig().residual_model_error


def test_refine_positions_with_the_held_stars_as_fixed_light_is_the_same_fit():
    from survey_proc.photometry.psffit import MoffatPSF, as_pixel_psf, fit_radii_px, refine_positions, render_psf

    data, xs, ys = _grid_field(pair=(40000.0, 10000.0))
    bad = np.zeros(data.shape, bool)
    x, y = np.r_[xs, 100.4, 103.2], np.r_[ys, 100.3, 100.6]
    f = np.r_[np.full(len(xs), 30000.0), 45000.0, 6000.0]
    move = np.zeros(len(x), bool)
    move[-2:] = True
    full = refine_positions(data, bad, NOISE, GAIN, x, y, f, FWHM, fit=move, n_iter=5, flux_errors=True)
    _, rmod = fit_radii_px(FWHM)
    fixed = render_psf(data.shape, x[~move], y[~move], f[~move], as_pixel_psf(MoffatPSF(FWHM, 3.0)), rmod)
    part = refine_positions(data, bad, NOISE, GAIN, x[move], y[move], f[move], FWHM, n_iter=5, flux_errors=True,
                            fixed_light=fixed)
    np.testing.assert_allclose(part.x, full.x[move], rtol=0, atol=1e-9)
    np.testing.assert_allclose(part.flux, full.flux[move], rtol=1e-9)
    np.testing.assert_allclose(part.flux_err, full.flux_err[move], rtol=1e-9)
    assert np.hypot(part.x[1] - 102.4, part.y[1] - 100.5) < 0.3  # and it found the neighbour's place


def test_only_the_stars_whose_model_reaches_the_query_squares_are_rendered():
    from survey_proc.detect.hidden import _reaching

    rng = np.random.default_rng(5)
    x, y = rng.uniform(0, 300, 2000), rng.uniform(0, 300, 2000)
    xq, yq = rng.uniform(0, 300, 15), rng.uniform(0, 300, 15)
    got = _reaching(x, y, xq, yq, 9)
    rx, ry = np.floor(x + 0.5), np.floor(y + 0.5)
    cheb = np.maximum(np.abs(rx[:, None] - np.floor(xq + 0.5)), np.abs(ry[:, None] - np.floor(yq + 0.5))).min(axis=1)
    np.testing.assert_array_equal(got, np.flatnonzero(cheb <= 10))  # every star within reach + 1 px, no other
    assert 0 < len(got) < len(x)
    assert len(_reaching(x, y, xq[:0], yq[:0], 9)) == 0
