"""Metrics on hand-made catalogues where the right answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from survey_proc import evaluate as ev


def _truth(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # a grid, so that no two stars are within the match radius of each other
    g = np.arange(20) * 10.0 + 5.0
    x, y = np.meshgrid(g, g)
    mag = rng.uniform(17.0, 24.0, x.size)
    return pd.DataFrame({"x_epoch": x.ravel()[:n], "y_epoch": y.ravel()[:n], "mag_epoch": mag[:n]})


def _sources(truth: pd.DataFrame, dx: float = 0.0, dmag: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame({"x": truth["x_epoch"] + dx, "y": truth["y_epoch"], "mag": truth["mag_epoch"] + dmag})


def test_perfect_recovery():
    t = _truth()
    m = ev.detection_metrics(_sources(t), t, mag_limit=30.0)
    assert m["recall"] == 1.0 and m["precision"] == 1.0 and m["f1"] == 1.0
    assert m["mag_abs_err_median"] == 0.0 and m["astrom_rms_px"] == 0.0
    ap = ev.average_precision(np.linspace(1, 0, len(t)), np.ones(len(t), bool), len(t))
    assert ap["ap"] == pytest.approx(1.0)


def test_half_the_stars_missing():
    t = _truth()
    m = ev.detection_metrics(_sources(t).iloc[::2], t, mag_limit=30.0)
    assert m["recall"] == pytest.approx(0.5) and m["precision"] == 1.0
    assert m["f1"] == pytest.approx(2 * 0.5 / 1.5)
    # per magnitude bin: every bin loses half (within one star)
    matched = np.zeros(len(t), bool)
    matched[::2] = True
    bins = ev.per_bin(matched.astype(float), t["mag_epoch"].to_numpy(), np.arange(17, 25, 1.0),
                      lambda v: {"recall": float(np.mean(v)) if len(v) else np.nan, "n": len(v)})
    assert sum(b["recall"] * b["n"] for b in bins) == matched.sum()
    for b in bins:  # each bin loses half, within binomial noise
        assert abs(b["recall"] - 0.5) < 3 * np.sqrt(0.25 / b["n"])


def test_false_detections_lower_precision_and_ap():
    t = _truth()
    fake = pd.DataFrame({"x": t["x_epoch"] + 5.0, "y": t["y_epoch"] + 5.0, "mag": 25.0})  # between the stars
    src = pd.concat([_sources(t), fake], ignore_index=True)
    m = ev.detection_metrics(src, t, mag_limit=30.0)
    assert m["recall"] == 1.0 and m["precision"] == pytest.approx(0.5)
    # ranked by a confidence that puts every real star first: AP 1; ranked in reverse: AP ~0.5
    is_true = np.r_[np.ones(len(t), bool), np.zeros(len(t), bool)]
    good = ev.average_precision(np.r_[np.ones(len(t)), np.zeros(len(t))], is_true, len(t))
    bad = ev.average_precision(np.r_[np.zeros(len(t)), np.ones(len(t))], is_true, len(t))
    assert good["ap"] == pytest.approx(1.0) and bad["ap"] == pytest.approx(0.5, abs=0.01)


def test_shifted_positions():
    t = _truth()
    m = ev.detection_metrics(_sources(t, dx=0.3), t, mag_limit=30.0, radius_px=1.0)
    assert m["recall"] == 1.0 and m["astrom_rms_px"] == pytest.approx(0.3 / np.sqrt(2))
    _, i_t = ev.match_one_to_one(t["x_epoch"] + 0.3, t["y_epoch"], t["x_epoch"], t["y_epoch"], 1.0)
    s = ev.error_stats((t["x_epoch"].to_numpy()[i_t] + 0.3) - t["x_epoch"].to_numpy()[i_t])
    assert s["bias"] == pytest.approx(0.3) and s["nmad"] == pytest.approx(0.0, abs=1e-12)
    far = ev.detection_metrics(_sources(t, dx=2.0), t, mag_limit=30.0, radius_px=1.0)
    assert far["recall"] == 0.0 and far["precision"] == 0.0
    assert ev.match_radius_px(4.0) == 2.0 and ev.match_radius_px(1.2) == 1.0


def test_missscaled_sigma_gives_a_known_z_width():
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.01, 0.1, 200_000)
    delta = rng.normal(0.0, 2.0 * sigma)  # the quoted errors are half the true ones
    c = ev.z_score_calibration(delta, sigma)
    assert c["z_std"] == pytest.approx(2.0, rel=0.01) and c["z_nmad"] == pytest.approx(2.0, rel=0.02)
    # P(|N(0, 2)| <= 1) = erf(1 / (2 sqrt 2)) = 0.3829
    assert c["coverage_68"] == pytest.approx(0.3829, abs=0.005)
    honest = ev.z_score_calibration(rng.normal(0.0, sigma), sigma)
    assert honest["coverage_68"] == pytest.approx(0.6827, abs=0.005)
    assert honest["coverage_95"] == pytest.approx(0.95, abs=0.003)
    assert honest["miscalibration_area"] < 0.005 < 0.1 < c["miscalibration_area"]


def test_error_stats_outliers():
    rng = np.random.default_rng(2)
    d = rng.normal(0.01, 0.05, 10_000)
    d[:250], d[250:500] = 1.0, -1.0
    s = ev.error_stats(d)
    # 5 % outliers widen the NMAD by 6.2 %: 0.95 P(|z| < m) = 1/2 gives m = 0.7166 instead of 0.6745
    assert s["bias"] == pytest.approx(0.01, abs=0.003) and s["nmad"] == pytest.approx(0.05 * 1.0625, rel=0.03)
    assert s["outlier_frac"] == pytest.approx(0.05 + 0.95 * 0.0027, abs=0.003)


def test_classification_metrics_and_period_recovery():
    t = np.array(["eb", "eb", "puls", "puls", "const", "const"])
    p = np.array(["eb", "puls", "puls", "puls", "const", "eb"])
    m = ev.classification_metrics(t, p, ["const", "eb", "puls"])
    assert m["per_class"]["eb"] == {"precision": 0.5, "recall": 0.5, "n_true": 2}
    assert m["per_class"]["puls"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["puls"]["recall"] == 1.0
    assert m["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    ok = ev.period_recovered(np.array([1.0, 0.5, 1.3, 2.005]), np.array([1.0, 1.0, 1.0, 1.0]))
    assert ok.tolist() == [True, True, False, True]
    assert ev.period_recovered(np.array([0.5]), np.array([1.0]), harmonics=(1.0,)).tolist() == [False]


def test_lightcurve_completeness():
    t = _truth().rename(columns={"x_epoch": "x", "y_epoch": "y", "mag_epoch": "mag"})
    t["in_frame"] = True
    objs = t.iloc[::2][["x", "y"]].assign(n_epochs=50)
    spurious = pd.DataFrame({"x": [1000.0], "y": [1000.0], "n_epochs": [3]})
    m = ev.lightcurve_completeness(pd.concat([objs, spurious]), t, mag_limit=30.0, n_epochs=100)
    assert m["completeness"] == pytest.approx(0.5) and m["points_fraction_median"] == 0.5
    assert m["object_purity"] == pytest.approx(len(objs) / (len(objs) + 1))


def test_median_abs_error_at_bound():
    """One σ: 0.6745 σ; a mixture: the median of many draws; nothing usable: NaN."""
    assert ev.median_abs_error_at_bound(np.full(10, 0.02)) == pytest.approx(0.6745 * 0.02, rel=1e-3)
    sig = np.r_[np.full(300, 0.002), np.full(700, 0.03)]
    rng = np.random.default_rng(3)
    draws = np.abs(rng.standard_normal((400, len(sig))) * sig)
    assert ev.median_abs_error_at_bound(sig) == pytest.approx(np.median(draws), rel=0.01)
    assert np.isnan(ev.median_abs_error_at_bound(np.array([np.nan, 0.0])))
