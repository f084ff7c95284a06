"""Recalibration of predicted uncertainties on a toy problem with a known miscalibration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from survey_proc.photometry.sigma_calibration import SigmaCalibration, clipped_std, fit_sigma_calibration


def _toy(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted sigma 2x too large for small sigma, 0.8x for large; 2 % gross outliers."""
    rng = np.random.default_rng(seed)
    sig_pred = 10 ** rng.uniform(-3, -0.5, n)
    true_scale = np.interp(np.log10(sig_pred), [-3, -0.5], [0.5, 1.25])
    delta = rng.normal(0, sig_pred * true_scale)
    out = rng.random(n) < 0.02
    delta[out] += rng.normal(0, 1.0, out.sum())
    return delta, sig_pred, true_scale


def test_fitted_scale_restores_unit_z_width_per_sigma_bin() -> None:
    d, s, _ = _toy(40000)
    cal = fit_sigma_calibration(d, s)
    d2, s2, _ = _toy(40000, seed=1)  # fresh data
    z_raw, z_cal = d2 / s2, d2 / cal.apply(s2)
    edges = np.quantile(np.log10(s2), np.linspace(0, 1, 6))
    for lo, hi in itertools.pairwise(edges):
        m = (np.log10(s2) >= lo) & (np.log10(s2) < hi)
        assert clipped_std(z_cal[m]) == pytest.approx(1.0, abs=0.06)
    assert clipped_std(z_raw[np.log10(s2) < -2.5]) == pytest.approx(0.55, abs=0.06)  # sigma ~2x too large


def test_calibrated_sigma_is_non_decreasing_and_round_trips() -> None:
    cal = SigmaCalibration(np.array([-3.0, -2.0, -1.0]), np.array([2.0, 0.1, 1.0]))  # a dip
    s = 10 ** np.linspace(-3.5, 0, 200)
    c = cal.apply(s)
    assert np.all(np.diff(c) >= -1e-15)
    assert np.isnan(cal.apply(np.array([np.nan]))[0])
    back = SigmaCalibration.from_dict(cal.to_dict())
    np.testing.assert_allclose(back.apply(s), c)
    assert SigmaCalibration.from_card({}) is None


def test_errors_are_pinned() -> None:
    with pytest.raises(ValueError, match="only 5 detections with a finite residual"):
        fit_sigma_calibration(np.zeros(5), np.ones(5))
    with pytest.raises(ValueError, match="sigma_calibration on the model card is malformed"):
        SigmaCalibration.from_dict({"log10_sigma_mag": [-1.0, -2.0], "scale": [1.0, 1.0]})
