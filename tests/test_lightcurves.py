"""Light-curve preprocessing, batched periodograms against astropy, and the shipped classifier."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from survey_proc import model_registry
from survey_proc import vocab as F
from survey_proc.lightcurves import classifier as C
from survey_proc.lightcurves.periodogram import (
    BatchedBLS,
    BatchedLS,
    astropy_bls,
    astropy_ls,
    sampling_interval,
    search_grid,
)
from survey_proc.lightcurves.preprocess import (
    PreprocessConfig,
    preprocess,
    to_matrix,
    variability_stats,
)
from survey_proc.simulate.variables import delta_mag

CADENCE_D = 300.0 / 86400.0
T = np.arange(1000) * CADENCE_D  # the default survey: 1000 epochs of 300 s, 3.47 d


def _curves(dm: np.ndarray, sigma_mag: float, seed: int, mag0: float = 20.0):
    rng = np.random.default_rng(seed)
    mag = mag0 + dm + rng.normal(0, sigma_mag, dm.shape)
    err = np.full(dm.shape, sigma_mag)
    return mag, err, np.zeros(dm.shape, np.int32)


def _stars(rows: list[dict]) -> pd.DataFrame:
    cols = ["period", "amplitude", "t0", "depth", "duration", "secondary_ratio", "ellipsoidal", "ingress_frac",
            "rise_days", "decay_days", "trend_mag_per_day", "trend_mag_per_day2"]
    return pd.DataFrame([{c: np.nan for c in cols} | {"mag": 20.0} | r for r in rows])


# ------------------------------------------------------------------ preprocessing
def test_preprocess_clips_a_spike_keeps_a_transit_and_interpolates_a_gap():
    t = T[:300]
    y = np.zeros(300)
    y[100:120] = 0.05  # a 5 % deep, 20-point dip (in magnitudes ~0.056)
    mag = 20.0 + np.where(y > 0, -2.5 * np.log10(1 - y), 0.0) + np.random.default_rng(0).normal(0, 0.005, 300)
    mag[50] -= 0.2  # a single bright outlier (40 sigma)
    mag[200:205] = np.nan  # a 25-minute gap
    err = np.full(300, 0.005)
    flags = np.zeros(300, np.int32)
    flags[250] = F.SATURATED
    b = preprocess(np.array([7]), t + 61000.0, mag[None], err[None], flags[None], PreprocessConfig())
    assert b.w[0, 50] == 0 and b.w[0, 250] == 0  # clipped spike, rejected flag
    assert np.all(b.w[0, 100:120] > 0)  # the dip is kept
    assert abs(np.median(b.y[0, 102:118]) + 0.05) < 0.005
    assert np.all(b.w[0, 200:205] == 0)
    lo, hi = b.y[0, 199], b.y[0, 205]
    expect = lo + (hi - lo) * (t[200:205] - t[199]) / (t[205] - t[199])
    np.testing.assert_allclose(b.y[0, 200:205], expect, atol=1e-6)  # linear interpolation across the gap
    assert b.n_clipped[0] >= 1 and b.n_points[0] == 300 - 5 - 1 - b.n_clipped[0]
    assert 0.75 < b.noise_scale[0] < 1.1  # the quoted errors were right (scale ~0.88: see preprocess.py)
    assert b.usable[0]


def test_preprocess_keeps_the_clipped_points_on_the_side_for_the_sparse_route():
    """An eclipse sampled once a night is an isolated faint point: the running-median clip drops it. The batch keeps
    it aside, so ``kept(i, with_clipped=True)`` is what an unclipped preprocessing keeps, also after ``subset``."""
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 900, 200)) + 50000.0
    mag = 18.0 + rng.normal(0, 0.01, (3, 200))
    mag[1, ::25] += 0.8  # one eclipse point in 25 nights: isolated, 80 sigma faint
    err = np.full((3, 200), 0.01)
    flags = np.zeros((3, 200), np.int32)
    flags[2, 7] = F.SATURATED  # a rejected point stays rejected in both views
    b = preprocess(np.array([4, 5, 6]), t, mag, err, flags, PreprocessConfig())
    raw = preprocess(np.array([4, 5, 6]), t, mag, err, flags, PreprocessConfig(clip_sigma=np.inf))
    assert b.n_clipped[1] >= 8 and np.all(b.w[1, ::25] == 0)  # the clip drops the eclipse points
    for i in range(3):
        for got, want in zip(b.kept(i, with_clipped=True), raw.kept(i), strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-6)
        assert len(b.kept(i)[0]) == b.n_points[i] and len(b.kept(i, with_clipped=True)[0]) == 200 - (i == 2)
    sub = b.subset(np.array([2, 1]))
    for k, i in enumerate([2, 1]):
        for got, want in zip(sub.kept(k, with_clipped=True), b.kept(i, with_clipped=True), strict=True):
            np.testing.assert_array_equal(got, want)
    mask = b.subset(np.array([False, True, False]))
    np.testing.assert_array_equal(mask.kept(0, with_clipped=True)[1], b.kept(1, with_clipped=True)[1])


def test_preprocess_marks_sparse_curves_unusable_and_rejects_unsorted_times():
    mag = np.full((1, 100), np.nan)
    mag[0, :5] = 20.0
    b = preprocess(np.array([1]), T[:100], mag, np.full((1, 100), 0.01), np.zeros((1, 100), np.int32))
    assert not b.usable[0]
    with pytest.raises(ValueError, match="strictly increasing"):
        preprocess(np.array([1]), T[:100][::-1], mag, mag, np.zeros((1, 100), np.int32))


def test_to_matrix_pivots_long_light_curves():
    lc = pd.DataFrame({"object_id": [5, 5, 9], "epoch": [0, 2, 2], "mjd": [1.0, 3.0, 3.0], "mag": [20.0, 20.1, 21.0],
                       "mag_err": [0.1, 0.1, 0.2], "flags": [0, 1, 0]})
    ids, ep, mjd, mag, _err, flg = to_matrix(lc)
    assert ids.tolist() == [5, 9] and ep.tolist() == [0, 2] and mjd.tolist() == [1.0, 3.0]
    assert mag[0].tolist() == [20.0, 20.1] and np.isnan(mag[1, 0]) and flg[0, 1] == 1


def test_variability_statistics_separate_white_noise_from_a_slow_signal():
    dm = np.vstack([np.zeros(1000), 0.05 * np.sin(2 * np.pi * T / 2.0)])
    mag, err, flg = _curves(dm, 0.01, 1)
    s = variability_stats(preprocess(np.arange(2), T, mag, err, flg))
    # white noise: 1 / 0.88^2 = 1.3, the running-median scale bias documented in preprocess.py
    assert 1.1 < s["chi2_red"][0] < 1.5 and s["chi2_red"][1] > 5
    assert 1.8 < s["von_neumann"][0] < 2.2 and s["von_neumann"][1] < 0.5


# ------------------------------------------------------------------ periodograms
def test_search_grid_stays_inside_the_baseline_and_reaches_delta_scuti_periods():
    g = search_grid(T)  # 1000 x 300 s, T = 3.47 d
    base = T[-1] - T[0]
    assert g.period_max_days == pytest.approx(base / 1.15) == g.ls_period_max_days  # < baseline
    assert g.ls_period_min_days == pytest.approx(0.03) and g.period_min_days == pytest.approx(0.25)
    assert g.bls_freq.min() == pytest.approx(1 / g.period_max_days)
    assert 1 / g.ls_freq.max() == pytest.approx(0.03, rel=0.01)
    assert 400 < len(g.bls_freq) < 500 and g.bls_oversample == 1.0
    assert np.diff(g.bls_freq)[0] == pytest.approx(2 / 64 / base)  # q_min / T
    # down to 0.14 d, boxes of 2 bins are shorter than 2 cadences above 4.5 / d: the step grows there
    g2 = search_grid(T, bls_period_min_days=0.14)
    assert g2.duration_min_days == pytest.approx(2 * CADENCE_D)
    s2 = np.diff(g2.bls_freq)
    assert s2[-2] == pytest.approx(4 / 64 / base, rel=1e-6) and s2[0] == pytest.approx(2 / 64 / base)
    with pytest.raises(ValueError, match=r"period range .* is empty"):
        search_grid(T[:80])  # 6.6 h of data: periods up to 0.24 d < 0.25 d
    with pytest.raises(ValueError, match="need at least 3 epochs"):
        search_grid(T[:2])


def test_search_grid_nyquist_limit_only_for_regular_sampling():
    daily = np.arange(200) * 1.0
    assert sampling_interval(daily) == pytest.approx(1.0)
    assert search_grid(daily).ls_period_min_days == pytest.approx(2.0)
    jitter = daily + np.random.default_rng(1).uniform(-0.15, 0.15, 200)  # nightly at varying hours
    assert sampling_interval(jitter) == 0.0
    assert search_grid(jitter).ls_period_min_days == pytest.approx(0.03)


def test_search_grid_cost_is_capped_for_a_ten_year_curve():
    t = np.sort(np.random.default_rng(2).uniform(0, 3652.5, 10_000))
    g = search_grid(t)
    assert len(g.bls_freq) * len(t) <= 5e8 * 1.001 and g.bls_oversample < 1
    assert 1e6 < len(g.ls_freq) < 1.5e6  # resolution 1 / (10 T) from 0.03 d to T / 1.5
    assert g.ls_period_max_days == pytest.approx((t[-1] - t[0]) / 1.15)


@pytest.mark.parametrize("period, depth", [(0.62, 0.3), (1.31, 0.05), (2.07, 0.03)])
def test_batched_bls_finds_the_same_period_as_astropy(period, depth):
    g = search_grid(T)
    stars = _stars([{"var_class": "transit", "period": period, "t0": 0.3, "depth": depth, "duration": 0.12,
                     "ingress_frac": 0.15}])
    dm = delta_mag(stars, T)
    mag, err, flg = _curves(dm, 0.004, int(period * 100))
    b = preprocess(np.arange(1), T, mag, err, flg)
    ours = BatchedBLS(T, g)(b.y, b.w)
    p_ref, _, _ = astropy_bls(T, b.y[0].astype(float), b.w[0].astype(float), g,
                              durations_days=np.array([0.06, 0.09, 0.12, 0.16]))
    i = np.searchsorted(g.bls_freq, 1 / period)
    step = (g.bls_freq[i] - g.bls_freq[i - 1]) * period**2  # grid resolution in period at this period
    assert abs(ours.period_days[0] - period) <= 1.5 * step
    assert abs(ours.period_days[0] - p_ref) <= 2.0 * step
    assert ours.depth[0] == pytest.approx(depth, rel=0.35)
    # refinement brings the period within 1 %
    p, _d, _ = C.refine_bls(T, b.y[0].astype(float), b.w[0].astype(float), ours.period_days[0],
                           ours.duration_days[0], g)
    assert abs(p / period - 1) < 0.01


def test_batched_lomb_scargle_equals_astropy():
    g = search_grid(T)
    dm = np.vstack([0.1 * np.sin(2 * np.pi * T / 1.7 + 0.3), 0.02 * np.sin(2 * np.pi * T / 0.55)])
    mag, err, flg = _curves(dm, 0.01, 3)
    mag[0, 300:340] = np.nan
    b = preprocess(np.arange(2), T, mag, err, flg)
    ours = BatchedLS(T, g)(b.y, b.w, keep_spectrum=True)
    for i, p in enumerate((1.7, 0.55)):
        p_ref, power_ref = astropy_ls(T, b.y[i].astype(float), b.w[i].astype(float), g)
        np.testing.assert_allclose(ours.spectrum[i], power_ref, rtol=1e-5, atol=1e-8)
        assert abs(ours.period_days[i] / p - 1) < 0.01
        assert abs(1 / ours.period_days[i] - 1 / p_ref) <= g.ls_freq[1] - g.ls_freq[0]


def test_chunked_bls_equals_the_one_matrix_bls(monkeypatch):
    from survey_proc.lightcurves import periodogram as P

    g = search_grid(T)
    stars = _stars([{"var_class": "transit", "period": 0.9, "t0": 0.2, "depth": 0.02, "duration": 0.1,
                     "ingress_frac": 0.15}, {"var_class": "transit", "period": 1.4, "t0": 0.5, "depth": 0.05,
                                             "duration": 0.08, "ingress_frac": 0.15}])
    mag, err, flg = _curves(delta_mag(stars, T), 0.004, 7)
    mag[0, 100:180] = np.nan
    b = preprocess(np.arange(2), T, mag, err, flg)
    one = BatchedBLS(T, g)(b.y, b.w, keep_spectrum=True)
    monkeypatch.setattr(P, "BLS_CHUNK_NNZ", 37 * len(T))  # 37 frequencies per chunk, built on the fly
    chunked = P.BatchedBLS(T, g)
    assert chunked.fold is None and chunked.chunk == 37
    two = chunked(b.y, b.w, keep_spectrum=True)
    np.testing.assert_allclose(two.spectrum, one.spectrum, rtol=1e-4, atol=1e-3)
    for k in ("period_days", "duration_days", "t0_days", "n_in"):
        np.testing.assert_allclose(getattr(two, k), getattr(one, k))
    np.testing.assert_allclose(two.depth, one.depth, rtol=1e-5)
    assert abs(one.period_days[0] / 0.9 - 1) < 0.02 and abs(one.period_days[1] / 1.4 - 1) < 0.02


def test_large_lomb_scargle_grid_per_curve_equals_astropy():
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 1500, 400))  # 4 years: 500k frequencies, beyond the dense product
    y = 0.1 * np.sin(2 * np.pi * t / 0.5612 + 1.0) + 0.02 * rng.normal(size=400)
    w = np.full(400, 1 / 0.02**2)
    w[::7] = 0.0
    g = search_grid(t)
    ls = BatchedLS(t, g)
    assert not ls.dense and len(g.ls_freq) > 4e5
    ours = ls(y[None], w[None], keep_spectrum=True)
    p_ref, power_ref = astropy_ls(t, y, w, g)
    np.testing.assert_allclose(ours.spectrum[0], power_ref, atol=2e-4)
    assert abs(ours.period_days[0] / 0.5612 - 1) < 1e-4 and abs(ours.period_days[0] / p_ref - 1) < 1e-4


# ------------------------------------------------------------------ classifier
def test_shipped_classifier_recognises_clean_injected_curves():
    clf = model_registry.load("classifier", device="cpu")
    stars = _stars([
        {"var_class": "constant"},
        {"var_class": "constant", "mag": 21.0},
        {"var_class": "eclipsing_binary", "period": 0.83, "t0": 0.2, "depth": 0.35, "duration": 0.08,
         "secondary_ratio": 0.4, "ellipsoidal": 0.02},
        {"var_class": "eclipsing_binary", "period": 1.9, "t0": 0.9, "depth": 0.25, "duration": 0.15,
         "secondary_ratio": 0.2, "ellipsoidal": 0.0},
        {"var_class": "transit", "period": 1.6, "t0": 0.5, "depth": 0.03, "duration": 0.12, "ingress_frac": 0.15},
        {"var_class": "transit", "period": 2.3, "t0": 0.7, "depth": 0.04, "duration": 0.1, "ingress_frac": 0.2},
        {"var_class": "pulsator", "period": 1.8, "t0": 0.1, "amplitude": 0.4},
    ])
    dm = delta_mag(stars, T + 61000.0 - 61000.0)
    mag, err, flg = _curves(dm, 0.006, 11)
    b = preprocess(np.arange(len(stars)), T + 61000.0, mag, err, flg)
    res = C.classify(b, clf)
    assert res["var_class"].tolist() == ["constant", "constant", "eclipsing_binary", "eclipsing_binary", "transit",
                                         "transit", "pulsator"]
    per = res.iloc[2:]
    assert np.all(per["p_periodic"] > clf.threshold) and np.all(res["p_periodic"].iloc[:2] < clf.threshold)
    true_p = stars["period"].to_numpy()[2:]
    assert np.all(np.abs(per["period"].to_numpy() / true_p - 1) < 0.01)


def test_decide_uses_the_threshold_on_the_summed_periodic_probability():
    prob = np.array([[0.5, 0.2, 0.2, 0.05, 0.05], [0.8, 0.05, 0.05, 0.05, 0.05], [0.1, 0.0, 0.0, 0.0, 0.9]])
    p, names, pc = C.decide(prob, 0.4)
    np.testing.assert_allclose(p, [0.45, 0.15, 0.0])
    assert names.tolist() == ["eclipsing_binary", "constant", "non_periodic"]
    np.testing.assert_allclose(pc, [0.2, 0.8, 0.9])


