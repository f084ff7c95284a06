"""Issue 22, "saying when it cannot know": single events, too few / too sparse / too short curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from survey_proc import model_registry
from survey_proc.config import ClassifySettings
from survey_proc.lightcurves import classifier as C
from survey_proc.lightcurves.periodogram import search_grid
from survey_proc.lightcurves.preprocess import preprocess
from survey_proc.lightcurves.search import classify_table, trained_period_min
from survey_proc.simulate.variables import delta_mag
from survey_proc.vocab import PERIODIC_CLASSES, SINGLE_EVENT

CADENCE_D = 300.0 / 86400.0
T = np.arange(1000) * CADENCE_D  # the default survey: 1000 epochs of 300 s, 3.47 d


def _box(t: np.ndarray, centres: list[float], depth: float, duration: float) -> np.ndarray:
    y = np.zeros_like(t)
    for c in centres:
        y[np.abs(t - c) < duration / 2] = -depth
    return y


def test_count_events_counts_repeated_dips_not_one_deep_event():
    rng = np.random.default_rng(0)
    w = np.full(len(T), 1 / 0.003**2)
    periodic = _box(T, [0.3 + 0.7 * k for k in range(5)], 0.01, 0.1) + rng.normal(0, 0.003, len(T))
    assert C.count_events(T, periodic, w, 0.7, 0.3, 0.1) == 5
    single = _box(T, [1.7], 0.05, 0.15) + rng.normal(0, 0.003, len(T))
    # folded at any period, the other "events" are noise: one event
    assert C.count_events(T, single, w, 1.2, 0.5, 0.15) == 1
    assert C.count_events(T, single, w, np.nan, 0.5, 0.15) == 0


def test_a_single_transit_gets_no_period():
    clf = model_registry.load("classifier", device="cpu")
    rng = np.random.default_rng(4)
    stars = pd.DataFrame([{"var_class": "transit", "period": 50.0, "t0": 61001.7 + k * 0.011, "depth": 0.04,
                           "duration": 0.15, "ingress_frac": 0.15, "mag": 20.0} for k in range(6)])
    dm = delta_mag(stars, T + 61000.0)
    mag = 20.0 + dm + rng.normal(0, 0.004, dm.shape)
    b = preprocess(np.arange(6), T + 61000.0, mag, np.full(dm.shape, 0.004), np.zeros(dm.shape, np.int32))
    res = C.classify(b, clf, search_grid(T))
    periodic = res["var_class"].isin(PERIODIC_CLASSES)
    assert not periodic.any()  # single_event (period NaN) or a non-periodic class
    single = res["var_class"] == SINGLE_EVENT
    assert res.loc[single, "period"].isna().all() and (res.loc[single, "n_events"] < 2).all()


def _long(n_obj: int, n_ep: int, cadence_d: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    mjd = 61000.0 + np.arange(n_ep) * cadence_d
    return pd.DataFrame({"object_id": np.repeat(np.arange(n_obj), n_ep), "epoch": np.tile(np.arange(n_ep), n_obj),
                         "mjd": np.tile(mjd, n_obj), "mag": 20 + rng.normal(0, 0.01, n_obj * n_ep),
                         "mag_err": 0.01, "flags": 0})


def test_classify_table_records_why_a_curve_was_not_classified():
    clf = model_registry.load("classifier", device="cpu")
    lc = _long(4, 400, CADENCE_D)
    keep = np.ones(len(lc), bool)
    keep[(lc["object_id"] == 1) & (lc["epoch"] >= 15)] = False  # 15 points: too few
    keep[(lc["object_id"] == 2) & (lc["epoch"] % 15 != 0)] = False  # 27 of 400: too sparse (< 10 %)
    keep[(lc["object_id"] == 3) & (lc["epoch"] >= 100)] = False  # 100 points over 0.34 d: too short
    res, info = classify_table(lc[keep], clf, ClassifySettings())
    assert res is not None
    why = res["classify_reason"]
    assert pd.isna(why[0]) and res.loc[0, "var_class"] in ("constant", "non_periodic")
    assert why[1].startswith("too_few_points: fewer than 20 points")
    assert why[2].startswith("too_sparse: fewer than 40 points (10% of 400 epochs)")
    assert why[3] == "too_short: kept points span less than 0.4 d"
    assert res.loc[[1, 2, 3], "var_class"].isna().all()
    assert info["not_classified"] == {"too_few_points": 1, "too_sparse": 1, "too_short": 1}


def test_a_region_too_short_for_any_period_is_recorded_not_searched():
    clf = model_registry.load("classifier", device="cpu")
    res, info = classify_table(_long(3, 60, CADENCE_D), clf, ClassifySettings(min_points=10))
    assert res is not None and res["classify_reason"].str.startswith("too_short").all()
    assert "period range" in info["not_searched"] or "0.4 d" in info["not_searched"]


def test_the_search_never_goes_below_the_classifier_training_range():
    clf = model_registry.load("classifier", device="cpu")
    assert trained_period_min(clf) == pytest.approx(0.25)  # the shipped v2 card has no search section
    lc = _long(2, 1000, CADENCE_D)
    _, info = classify_table(lc, clf, ClassifySettings())
    assert info["n_ls_freq"] == len(search_grid(T, period_min_days=0.25).ls_freq)
    _, info2 = classify_table(lc, clf, ClassifySettings(period_min_from_model=False))
    assert info2["n_ls_freq"] == len(search_grid(T, period_min_days=0.03).ls_freq) > 8 * info["n_ls_freq"]


def test_decide_applies_the_card_calibration_before_the_threshold():
    prob = np.array([[0.5, 0.2, 0.2, 0.05, 0.05], [0.1, 0.3, 0.5, 0.05, 0.05]])
    cal = {"x": [0.0, 0.5, 1.0], "y": [0.0, 0.2, 0.9]}  # raw 0.45 -> 0.18, raw 0.85 -> 0.69
    p, names, _ = C.decide(prob, 0.5, cal)
    np.testing.assert_allclose(p, [0.18, 0.69])
    assert names.tolist() == ["constant", "pulsator"]


def test_a_model_without_the_magnitude_input_ignores_the_magnitude():
    from dataclasses import replace

    from survey_proc.lightcurves import views

    clf = model_registry.load("classifier", device="cpu")
    assert C.uses_magnitude(clf)  # the shipped v2 takes it
    no_mag = replace(clf, card={**clf.card, "inputs": {"magnitude": False}})
    assert not C.uses_magnitude(no_mag)
    rng = np.random.default_rng(5)
    t = T[::2]
    dm = 0.2 * np.sin(2 * np.pi * t / 0.9)
    out = []
    for m0 in (14.0, 19.0):
        mag = m0 + dm[None] + rng.normal(0, 0.01, (1, len(t)))
        b = preprocess(np.arange(1), t + 61000.0, mag, np.full(mag.shape, 0.01), np.zeros(mag.shape, np.int32))
        out.append(C.classify(b, no_mag, search_grid(t)).iloc[0])
        _bls, _ls, (_g, _loc, aux) = C.search(b, search_grid(t), use_magnitude=False)
        assert aux[0, views.AUX_NAMES.index("mag")] == 0.0
    assert out[0]["var_class"] == out[1]["var_class"]


def test_ls_false_alarm_separates_noise_from_a_pulsation():
    rng = np.random.default_rng(8)
    t = np.sort(rng.uniform(0, 3.47, 40))
    w = np.full(40, 1 / 0.01**2)
    g = search_grid(t, period_min_days=0.25)
    from survey_proc.lightcurves.periodogram import BatchedLS

    noise = rng.normal(0, 0.01, 40)
    puls = noise + 0.05 * np.sin(2 * np.pi * t / 0.7)
    r = BatchedLS(t, g)(np.vstack([noise, puls]), np.vstack([w, w]))
    fmax = float(g.ls_freq[-1])
    assert C.ls_false_alarm(t, noise, w, float(r.power[0]), fmax) > 1e-2
    assert C.ls_false_alarm(t, puls, w, float(r.power[1]), fmax) < 1e-6
    assert C.ls_false_alarm(t[:3], puls[:3], w[:3], 0.9, fmax) == 1.0  # too few points to judge


def test_the_cnn_route_labels_non_periodic_only_with_variability_correlated_in_time(monkeypatch):
    """Whatever the CNN says, white noise about the mean is no evidence of variability: constant; a slow random
    walk of the same scatter keeps non_periodic; with the test off (0) both keep the model's label."""
    clf = model_registry.load("classifier", device="cpu")
    rng = np.random.default_rng(9)
    white = 20.0 + rng.normal(0, 0.01, len(T))
    walk = 20.0 + np.cumsum(rng.normal(0, 0.01, len(T))) * 0.05 + rng.normal(0, 0.005, len(T))
    mag = np.stack([white, walk])
    b = preprocess(np.arange(2), T + 61000.0, mag, np.full(mag.shape, 0.01), np.zeros(mag.shape, np.int32))
    probs = np.zeros(len(C.CLASSES), np.float32)
    probs[C.CLASSES.index("non_periodic")], probs[C.CLASSES.index("constant")] = 0.9, 0.1

    def all_non_periodic(_clf, g, *_a, **_k):
        return np.tile(probs, (len(g), 1))

    monkeypatch.setattr(C, "predict_proba", all_non_periodic)
    res = C.classify(b, clf, search_grid(T), non_periodic_min_z=4.0)
    assert list(res["var_class"]) == ["constant", "non_periodic"]
    assert res.loc[0, "var_class_prob"] == pytest.approx(0.1)
    assert list(C.classify(b, clf, search_grid(T), non_periodic_min_z=0.0)["var_class"]) == ["non_periodic"] * 2
    assert ClassifySettings().non_periodic_min_z == 4.0
