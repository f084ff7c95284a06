"""p_periodic calibration (issue 22): the isotonic fit, the card's map at inference, malformed cards."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from survey_proc import model_registry
from survey_proc.lightcurves import classifier as C
from survey_proc.lightcurves.preprocess import preprocess
from survey_proc.vocab import PERIODIC_CLASSES
from training.calibrate_classifier import fit_isotonic, fit_platt, pav, raw_threshold_for, summary, threshold_curve


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Over-confident scores: the true probability is s**3, the score claims s."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 1, n)
    return s, rng.uniform(0, 1, n) < s**3


def test_isotonic_makes_overconfident_scores_reliable_on_fresh_data():
    p, y = _toy(20000, 1)
    before = summary(p, y)
    assert before["max_gap"] > 0.2  # miscalibrated: the middle bins are far off
    cal = fit_isotonic(p, y, min_block=20)
    p2, y2 = _toy(20000, 2)  # held out from the fit
    after = summary(C.apply_calibration(p2, cal), y2)
    assert after["max_gap"] < 0.05 and after["ece"] < 0.02
    assert all(b["n"] >= 100 for b in after["bins"] if b["n"])  # the bins are populated, the check is decidable
    # the map is strictly increasing over [0, 1], so a threshold converts without changing any decision
    x, yk = np.array(cal["x"]), np.array(cal["y"])
    assert x[0] == 0 and x[-1] == 1 and np.all(np.diff(yk) > 0)
    t = C.apply_calibration(np.array([0.7]), cal)[0]
    assert np.array_equal(p2 >= 0.7, C.apply_calibration(p2, cal) >= t)
    C.check_calibration(cal)


def test_a_calibrated_threshold_converts_to_the_raw_score_that_reaches_it():
    p, y = _toy(20000, 4)
    cal = fit_isotonic(p, y, min_block=20)
    t = raw_threshold_for(cal, 0.5)
    # every score at or above t is calibrated to >= 0.5, every one below to < 0.5: the same decisions
    pc = C.apply_calibration(p, cal)
    assert np.array_equal(p >= t, pc >= 0.5)
    assert t == pytest.approx(0.5 ** (1 / 3), abs=0.03)  # the toy's truth: P(periodic | s) = s**3
    rows = threshold_curve(p, y, np.ones(len(p), bool), [0.0, t])
    assert rows[0]["recall"] == 1.0 and rows[1]["precision"] == pytest.approx(np.mean(y[p >= t]))
    assert rows[1]["precision"] > rows[0]["precision"]
    with pytest.raises(SystemExit, match=r"never reaches p_periodic = 1\.5"):
        raw_threshold_for(cal, 1.5)


def test_pav_pools_violators_and_merges_small_blocks():
    lo, hi, v, n = pav(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1]))
    np.testing.assert_allclose(v, [0, 0.5, 1])
    np.testing.assert_allclose(n, [1, 2, 1])
    np.testing.assert_allclose(lo, [0.1, 0.2, 0.4])
    np.testing.assert_allclose(hi, [0.1, 0.3, 0.4])
    _, _, v, n = pav(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1]), min_block=2)
    assert n.min() >= 2 and np.all(np.diff(v) > 0)
    platt = fit_platt(*_toy(5000, 3))
    C.check_calibration({"x": platt["x"], "y": platt["y"]})


def _variable_batch() -> tuple[pd.DataFrame, np.ndarray]:
    t = np.arange(1000) * 300 / 86400
    rng = np.random.default_rng(5)
    mag = 20 + 0.01 * rng.standard_normal((3, len(t)))
    mag[1] += 0.3 * np.sin(2 * np.pi * t / 0.9)
    mag[2] += np.where(((t / 1.3) % 1) < 0.04, 0.4, 0.0)
    return preprocess(np.arange(3), t + 61000.0, mag, np.full_like(mag, 0.01), np.zeros(mag.shape, np.int64)), t


def test_the_cards_calibration_is_applied_at_inference():
    clf = model_registry.load("classifier", device="cpu")
    b, _ = _variable_batch()
    raw_clf = replace(clf, card={k: v for k, v in clf.card.items() if k != "calibration"})
    raw = C.classify(b, raw_clf)
    p_raw = raw[[f"prob_{c}" for c in PERIODIC_CLASSES]].sum(axis=1).to_numpy()
    np.testing.assert_allclose(raw["p_periodic"], p_raw, rtol=1e-6)
    # a known map: p_periodic is exactly that map of the raw sum
    cal = {"x": [0.0, 0.5, 1.0], "y": [0.0, 0.1, 0.6]}
    toy = C.classify(b, replace(clf, card={**clf.card, "calibration": {"p_periodic": cal}}))
    np.testing.assert_allclose(toy["p_periodic"], np.interp(p_raw, cal["x"], cal["y"]), rtol=1e-6)
    assert toy["p_periodic"].max() <= 0.6
    # the shipped card: calibrated on validation surveys, threshold converted so the classes do not change
    block = clf.card["calibration"]
    assert block["provenance"]["surveys"] and block["threshold_raw"] == pytest.approx(0.99827, abs=1e-5)
    shipped = C.classify(b, clf)
    np.testing.assert_allclose(shipped["p_periodic"], C.apply_calibration(p_raw, block["p_periodic"]), rtol=1e-6)
    at_raw_threshold = C.classify(b, replace(raw_clf, threshold=block["threshold_raw"]))
    assert shipped["var_class"].tolist() == at_raw_threshold["var_class"].tolist()
    assert clf.threshold == pytest.approx(C.apply_calibration(np.array([block["threshold_raw"]]),
                                                              block["p_periodic"])[0])


def test_decide_keeps_the_classes_of_the_raw_threshold():
    clf = model_registry.load("classifier", device="cpu")
    block = clf.card["calibration"]
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (5000, len(C.CLASSES)))
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    _, names_raw, _ = C.decide(prob, block["threshold_raw"])
    p_cal, names_cal, _ = C.decide(prob, clf.threshold, C.calibration_of(clf))
    assert np.array_equal(names_raw, names_cal)
    assert p_cal.min() >= 0 and p_cal.max() <= 1


@pytest.mark.parametrize("block, match", [
    ({"x": [0, 1]}, "must be a mapping with knot lists 'x' and 'y'"),
    ({"x": [0, 0.5, 1], "y": [0, 1]}, "equal length >= 2"),
    ({"x": [0, 0.6, 0.5, 1], "y": [0, 0.1, 0.2, 1]}, "'x' must be strictly increasing"),
    ({"x": [0, 0.5, 1], "y": [0, 0.8, 0.3]}, "'y' must be non-decreasing"),
    ({"x": [0, 0.5, 1.5], "y": [0, 0.5, 1]}, r"within \[0, 1\]"),
    ({"x": [0, "a", 1], "y": [0, 0.5, 1]}, "knots must be numbers"),
    ({"x": [0, float("nan"), 1], "y": [0, 0.5, 1]}, "knots must be finite"),
])
def test_a_malformed_calibration_block_is_refused(block, match):
    clf = model_registry.load("classifier", device="cpu")
    bad = replace(clf, card={**clf.card, "calibration": {"p_periodic": block}})
    with pytest.raises(ValueError, match=f"classifier card calibration.p_periodic.*{match}"):
        C.calibration_of(bad)
    b, _ = _variable_batch()
    with pytest.raises(ValueError, match=match):
        C.classify(b, bad)


def test_write_puts_the_calibrated_threshold_in_a_weights_file_that_carries_its_own(tmp_path):
    # a file saved by training/train_classifier.py holds its raw validation threshold, which the
    # registry reads before the card's: --write must change it too, or the calibrated one is ignored
    import json

    import torch

    from training.calibrate_classifier import _rewrite_weights_threshold

    path = tmp_path / "clf.pt"
    model_registry.save("classifier", C.LocalGlobalCNN(), path, card={"threshold": 0.98}, threshold=0.98)
    card = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**card, "threshold": 0.5}))
    assert model_registry.load("classifier", path=path, device="cpu").threshold == pytest.approx(0.98)
    _rewrite_weights_threshold(path, 0.5)
    assert model_registry.load("classifier", path=path, device="cpu").threshold == pytest.approx(0.5)
    assert torch.load(path, map_location="cpu", weights_only=False)["state_dict"].keys()


def test_a_sparse_curve_takes_the_map_of_its_cadence():
    clf = model_registry.load("classifier", device="cpu")
    b, _ = _variable_batch()  # 1000 points each
    raw_clf = replace(clf, card={k: v for k, v in clf.card.items() if k != "calibration"})
    p_raw = C.classify(b, raw_clf)[[f"prob_{c}" for c in PERIODIC_CLASSES]].sum(axis=1).to_numpy()
    main = {"x": [0.0, 1.0], "y": [0.0, 0.9]}
    sparse = {"max_points": 63, "x": [0.0, 1.0], "y": [0.0, 0.2]}
    mid = {"max_points": 2000, "x": [0.0, 1.0], "y": [0.0, 0.5]}
    # 1000 kept points: the first block with max_points >= 1000 (mid), not the 63-point one nor the main map
    res = C.classify(b, replace(clf, card={**clf.card, "calibration": {"p_periodic": main,
                                                                      "p_periodic_by_points": [mid, sparse]}}))
    np.testing.assert_allclose(res["p_periodic"], 0.5 * p_raw, rtol=1e-5)
    # directly: rows by their number of points
    p = np.array([0.8, 0.8, 0.8])
    out = C.calibrate_p_periodic(p, main, np.array([40, 300, 5000]), C.cadence_calibrations_of(
        replace(clf, card={"calibration": {"p_periodic_by_points": [mid, sparse]}})))
    np.testing.assert_allclose(out, [0.16, 0.4, 0.72])
    # the threshold is on the calibrated scale: a 40-point curve needs a higher raw score
    prob = np.zeros((2, len(C.CLASSES)))
    prob[:, C.CLASSES.index("pulsator")] = 0.95
    prob[:, C.CLASSES.index("constant")] = 0.05
    _, names, _ = C.decide(prob, 0.5, main, np.array([40, 1000]), [sparse])
    assert names.tolist() == ["constant", "pulsator"]


@pytest.mark.parametrize("blocks, match", [
    ({"max_points": 40, "x": [0, 1], "y": [0, 1]}, "must be a list"),
    ([{"x": [0, 1], "y": [0, 1]}], "positive integer 'max_points'"),
    ([{"max_points": 0, "x": [0, 1], "y": [0, 1]}], "positive integer 'max_points'"),
    ([{"max_points": 40, "x": [0, 1], "y": [1, 0]}], "'y' must be non-decreasing"),
    ([{"max_points": 40, "x": [0, 1], "y": [0, 1]}, {"max_points": 40, "x": [0, 1], "y": [0, 1]}],
     "'max_points' values must differ"),
])
def test_a_malformed_cadence_block_is_refused(blocks, match):
    clf = model_registry.load("classifier", device="cpu")
    bad = replace(clf, card={**clf.card, "calibration": {**clf.card["calibration"], "p_periodic_by_points": blocks}})
    with pytest.raises(ValueError, match=match):
        C.cadence_calibrations_of(bad)


def test_cadence_maps_are_fitted_per_cadence_with_their_own_raw_thresholds():
    from training.calibrate_classifier import cadence_maps, fit_isotonic, fit_platt

    rng = np.random.default_rng(3)

    def survey(n: int, power: float) -> tuple[np.ndarray, np.ndarray]:
        s = rng.uniform(0, 1, n)
        return s, rng.uniform(0, 1, n) < s**power  # sparser: more over-confident (higher power)

    cuts = {40: [survey(3000, 6.0) for _ in range(3)], 100: [survey(3000, 3.0) for _ in range(3)]}
    cands = {"isotonic_min_block_20": lambda p, y: fit_isotonic(p, y, 20), "platt": fit_platt}
    blocks = cadence_maps(cuts, [100, 40], cands, full_epochs=1000, calibrated_threshold=0.5)
    assert [b["max_points"] for b in blocks] == [63, 316] and [b["epochs"] for b in blocks] == [40, 100]
    for b, power in zip(blocks, (6.0, 3.0), strict=True):
        # fresh data of the same cadence: reliable within a few points, and the raw threshold is where
        # the true probability s**power reaches 0.5
        s, y = survey(20000, power)
        pc = np.interp(s, b["x"], b["y"])
        sm, raw = summary(pc, y), summary(s, y)
        assert sm["ece"] < 0.02 and sm["max_gap_bins_n>=20"] < 0.1  # raw: ece 0.3-0.4, gaps up to 0.5-0.6
        assert raw["ece"] > 0.25
        assert b["threshold_raw"] == pytest.approx(0.5 ** (1 / power), abs=0.05)
    never = cadence_maps({40: [(np.linspace(0, 1, 500), np.zeros(500, bool))] * 2}, [40], cands, 1000, 0.5)
    assert never[0]["threshold_raw"] is None
    with pytest.raises(SystemExit, match=r"--fit-cadences 200: not among --check-cadences \[40, 100\]"):
        cadence_maps(cuts, [100, 200], cands, 1000, 0.5)
