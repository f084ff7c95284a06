"""PSF-fit photometry on the block's empirical PSF: unbiased fluxes, honest errors, wired into extraction."""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.catalog.extract import extract_block
from survey_proc.config import load_config
from survey_proc.detect.registry import make_detector
from survey_proc.errors import ConfigError
from survey_proc.photometry.psfphot import psf_photometry
from survey_proc.simulate.psf import build_bank
from survey_proc.simulate.stamps import render_stars
from survey_proc.tiling import tile_grid

SKY, GAIN, RN = 100.0, 2.0, 5.0


def _field(seed: int, n: int = 120, size: int = 256, profile: str = "kolmogorov", fwhm: float = 3.0):
    rng = np.random.default_rng(seed)
    bank = build_bank(profile, fwhm, oversample=5, base_radius_px=8, max_factor=4)
    x, y = rng.uniform(8, size - 9, n), rng.uniform(8, size - 9, n)
    flux = 10 ** rng.uniform(3.0, 5.0, n)
    sig = float(np.sqrt(SKY / GAIN + (RN / GAIN) ** 2))
    img = render_stars((size, size), x, y, flux, bank, sig) + SKY
    img = rng.poisson(img * GAIN) / GAIN + rng.normal(0, RN / GAIN, img.shape)
    return img, x, y, flux, sig


def test_fluxes_on_the_empirical_psf_are_unbiased_with_honest_errors() -> None:
    """A common flux scale (the zero point absorbs it) within 1 %; no brightness-dependent bias; z width ~1.

    Kolmogorov PSF of 3 px, 120 stars of 1e3-1e5 ADU (S/N 20-800) per 256^2 field, 3 fields.
    """
    fl, fit, err = [], [], []
    for seed in range(3):
        img, x, y, flux, sig = _field(seed)
        data = img - SKY
        bad = np.zeros(img.shape, bool)
        r = psf_photometry(img, bad, data, np.full(img.shape, SKY), sig, GAIN, 1e9, 3.0,
                           x + 0.05, y - 0.05, flux * 1.1, np.arange(len(x)))
        assert r.psf == "epsf" and r.n_psf_stars >= 10
        near = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
        ok = r.ok & (np.sort(near, axis=1)[:, 1] > 12)  # isolated
        fl.append(flux[ok])
        fit.append(r.flux[ok])
        err.append(r.flux_err[ok])
    f, g, e = (np.concatenate(v) for v in (fl, fit, err))
    scale = float(np.median(g / f))
    assert abs(scale - 1) < 0.01
    z = (g - scale * f) / e
    for lo, hi in ((1e3, 3e3), (3e3, 1e4), (1e4, 3e4), (3e4, 1e5)):
        m = (f >= lo) & (f < hi)
        ratio = g[m] / f[m]
        tol = max(0.003, 3 * 1.2533 * np.std(ratio) / np.sqrt(m.sum()))  # 3 mmag, or 3x the median's error
        assert abs(np.median(ratio) / scale - 1) < tol
        if hi <= 3e4:  # S/N < 300; above, the per-pixel profile error underestimates the ePSF's (0.4-0.6 %)
            assert np.std(z[m]) == pytest.approx(1.0, abs=0.3)


def test_extraction_with_psf_model_epsf_uses_the_fit(tmp_path) -> None:
    img, x, y, flux, _ = _field(7)
    cfg = load_config(None, {"store": str(tmp_path / "s.zarr"), "out": str(tmp_path / "o"),
                             "photometry": {"psf_model": "epsf"}, "bpnn": {"enabled": False}})
    tiles = tile_grid(*img.shape, cfg.tile_px, cfg.halo_px)
    t = extract_block(img, None, (0, 0), tiles, GAIN, 1e9, cfg, make_detector(cfg)).table
    j = np.argmin(np.hypot(t["x"].to_numpy()[:, None] - x[None], t["y"].to_numpy()[:, None] - y[None]), axis=1)
    bright = (flux[j] > 2e4) & ((t["flags"].to_numpy() & (1 << 15)) == 0)
    assert bright.sum() > 10
    # 0.988 (0.996 before issue 21's galaxy mask): sep flags 12 of these stars EXTENDED (a bright neighbour's
    # wing in the 2-FWHM annulus, just beyond the test's 3-FWHM isolation), so the ePSF is built from 57 stars
    # instead of 65; a common scale, which the zero point absorbs (held-out simulations: median |dm| unchanged)
    assert abs(np.median(t["flux"].to_numpy()[bright] / flux[j][bright]) - 1) < 0.015


def test_unknown_psf_model_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"photometry\.psf_model must be 'none' or 'epsf'"):
        load_config(None, {"photometry": {"psf_model": "gaussian"}})


def test_an_empirical_psf_that_does_not_fit_the_stars_falls_back_to_the_moffat(monkeypatch) -> None:
    """A window whose ePSF misdescribes its stars (here: built on a field of FWHM 5 px for stars of
    3 px; on real data a photographic plate's nonlinear profiles) is fitted with the Moffat when that
    does better, and says why, instead of returning fluxes off by factors (M67: 9.66 x).
    """
    import survey_proc.photometry.epsf as epsf_mod

    wide, xw, yw, fw, sw = _field(5, fwhm=5.0)
    wrong = epsf_mod.build_epsf(wide, None, SKY, sw, xw, yw, fw, 5.0, None, gain_e_per_adu=GAIN, order=0)
    monkeypatch.setattr(epsf_mod, "build_epsf", lambda *a, **k: wrong)
    img, x, y, flux, sig = _field(6, profile="moffat")
    bad = np.zeros(img.shape, bool)
    args = (img, bad, img - SKY, np.full(img.shape, SKY), sig, GAIN, 1e9, 3.0, x, y, flux * 1.1, np.arange(len(x)))
    by_fwhm = psf_photometry(*args)  # its FWHM (5 px) is off the window's (3 px) by > 30 %
    assert by_fwhm.psf == "moffat"
    assert by_fwhm.why_moffat is not None
    assert "differs from the window's 3.00 px by more than 30%" in by_fwhm.why_moffat
    r = psf_photometry(*args, max_fwhm_mismatch=1.0)  # the FWHM test off: the profile-error test
    assert r.psf == "moffat"
    assert r.why_moffat is not None
    assert "empirical PSF's profile error" in r.why_moffat
    assert r.model_error_frac < 0.05
    bright = r.ok & (flux > 1e4)
    assert np.median(r.flux[bright] / flux[bright]) == pytest.approx(1.0, abs=0.01)
    kept = psf_photometry(*args, max_model_error=1.0, max_fwhm_mismatch=1.0)  # neither test: the wrong ePSF stays
    assert kept.psf == "epsf"
    assert kept.model_error_frac >= 0.1


def test_peakup_correction_values() -> None:
    """flux - err^2/flux above S/N 3, a linear ramp to 0 below, non-positive and unknown-error fluxes unchanged."""
    from survey_proc.photometry.psfphot import peakup_corrected

    f = np.array([100.0, 30.0, 15.0, 0.0, -5.0, 50.0, 50.0])
    e = np.array([10.0, 10.0, 10.0, 10.0, 10.0, np.nan, 0.0])
    out = peakup_corrected(f, e)
    np.testing.assert_allclose(out, [99.0, 30.0 - 100.0 / 30.0, 15.0 - 15.0 / 9.0, 0.0, -5.0, 50.0, 50.0])
    # continuous at S/N 3
    assert abs(peakup_corrected(np.array([30.0 - 1e-9]), np.array([10.0]))[0] - out[1]) < 1e-6


def test_free_position_flux_bias_is_removed_by_the_peakup_correction() -> None:
    """Monte Carlo: isolated Moffat stars at fit S/N ~10-13 are biased high with the position fitted; corrected, not.

    Each star is fitted twice on the same pixels: position free (from a start 0.1 px off) and
    fixed at the truth. The fixed fit is unbiased (the control); the free fit's mean excess over
    it is ~(flux_err/flux)^2 (~0.6-1 %); after :func:`peakup_corrected` it is within a fifth of
    that (paired differences: the noise common to both fits cancels).
    """
    from survey_proc.photometry.psffit import MoffatPSF, refine_positions, render_psf
    from survey_proc.photometry.psfphot import peakup_corrected

    rng = np.random.default_rng(7)
    fwhm, noise, n = 3.0, 10.0, 12
    psf = MoffatPSF(fwhm, 3.0)
    g = np.arange(n) * 24 + 16.0
    X, Y = (a.ravel() for a in np.meshgrid(g, g))
    shape = (n * 24 + 8, n * 24 + 8)
    flux = 20.0 * noise * np.sqrt(4 * np.pi * (fwhm / 2.355) ** 2)
    free, fixed, err = [], [], []
    for _ in range(10):
        xt, yt = X + rng.uniform(-0.5, 0.5, X.size), Y + rng.uniform(-0.5, 0.5, X.size)
        img = render_psf(shape, xt, yt, np.full(X.size, flux), psf, 12) + rng.normal(0, noise, shape)
        bad = np.zeros(shape, bool)
        f0 = np.full(X.size, flux)
        rf = refine_positions(img, bad, noise, 1e9, xt + rng.normal(0, 0.1, X.size), yt + rng.normal(0, 0.1, X.size),
                              f0, fwhm, n_iter=3, psf=psf, flux_errors=True)
        rx = refine_positions(img, bad, noise, 1e9, xt, yt, f0, fwhm, n_iter=0, psf=psf)
        assert rf.flux_err is not None
        free.append(rf.flux[rf.ok])
        err.append(rf.flux_err[rf.ok])
        fixed.append(rx.flux[rf.ok])
    fr, fe, fx = np.concatenate(free), np.concatenate(err), np.concatenate(fixed)
    s2 = float(np.median(fe / fr) ** 2)
    assert 0.005 < s2 < 0.01  # fit S/N 10-14
    assert len(fr) > 0.95 * 10 * X.size
    assert abs(np.mean(fx) / flux - 1) < 3 * float(np.std(fx)) / flux / np.sqrt(len(fx))  # the control
    d_free = (fr - fx) / flux
    d_corr = (peakup_corrected(fr, fe) - fx) / flux
    se = float(np.std(d_free)) / np.sqrt(len(d_free))
    assert np.mean(d_free) > 0.6 * s2 and np.mean(d_free) > 5 * se
    assert abs(np.mean(d_corr)) < max(3 * se, 0.2 * np.mean(d_free))
