"""The sparse long-baseline classifier: features, routing from the classify path, the shipped model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from survey_proc import model_registry
from survey_proc.config import ClassifySettings
from survey_proc.errors import ConfigError
from survey_proc.lightcurves import classifier as C
from survey_proc.lightcurves.fourier_features import FEATURE_NAMES, curve_features
from survey_proc.lightcurves.preprocess import PreprocessConfig, preprocess
from survey_proc.lightcurves.search import classify_table
from survey_proc.lightcurves.sparse_classifier import SPARSE_CLASSES, FourierMLP, SparseClassifierConfig


def ground_cadence(rng: np.random.Generator, n: int = 130, years: float = 3.0) -> np.ndarray:
    """Irregular ground-based times (days): seasons of ~7 months, one visit a night at varying hour angle."""
    nights = np.sort(rng.choice(int(365 * years), n * 3, replace=False)).astype(float)
    nights = nights[(nights % 365) < 210][:n]
    return nights + rng.uniform(-0.15, 0.15, len(nights))


def rrab(t: np.ndarray, period: float, amp: float = 0.8) -> np.ndarray:
    """A sawtooth RR Lyrae (ab) light curve (mag): fast rise, slow decline."""
    ph = (t / period) % 1.0
    rise = 0.15
    shape = np.where(ph < rise, 1 - ph / rise, (ph - rise) / (1 - rise))
    return amp * (shape - 0.5)


def eclipsing(t: np.ndarray, period: float, depth: float = 0.6, width: float = 0.06) -> np.ndarray:
    """Two equal eclipses per orbit (mag)."""
    ph = (t / period) % 1.0
    d = np.minimum(np.abs(ph - 0.0), np.abs(ph - 1.0))
    d2 = np.abs(ph - 0.5)
    return depth * (np.exp(-0.5 * (d / width) ** 2) + np.exp(-0.5 * (d2 / width) ** 2))


def one_batch(t: np.ndarray, mag: np.ndarray, err: np.ndarray):
    return preprocess(np.array([0]), t, mag[None], err[None], np.zeros((1, len(t)), np.int32),
                      PreprocessConfig(min_points=20))


def test_features_recover_a_sparse_pulsator_period_and_the_eclipse_half_period():
    rng = np.random.default_rng(3)
    t = ground_cadence(rng)
    err = np.full(len(t), 0.03)
    m = 18.0 + rrab(t, 0.5731) + rng.normal(0, 0.03, len(t))
    fit = curve_features(t, 10 ** (-0.4 * (m - 18.0)), err, 0.1)
    assert fit.features.shape == (len(FEATURE_NAMES),)
    assert abs(fit.period_days / 0.5731 - 1) < 0.01
    assert fit.ls_power > 0.5
    m = 17.0 + eclipsing(t, 2.3456) + rng.normal(0, 0.02, len(t))
    fit = curve_features(t, 10 ** (-0.4 * (m - 17.0)), np.full(len(t), 0.02), 0.1)
    # two equal eclipses: the best single-period description is half the orbit (reported x2 for an EB)
    assert abs(fit.period_days / (2.3456 / 2) - 1) < 0.01


def test_joint_band_search_finds_the_period_a_noisy_band_alone_misses():
    # B: a clear RR Lyrae; R: the same star at a fifth of the amplitude under three times the noise, on its own nights
    p_true = 0.6127
    alone, joint = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        tb, tr = ground_cadence(rng, 120), ground_cadence(rng, 120)
        yb = 10 ** (-0.4 * (rrab(tb, p_true, 0.8) + rng.normal(0, 0.05, len(tb))))
        yr = 10 ** (-0.4 * (rrab(tr, p_true, 0.15) + rng.normal(0, 0.15, len(tr))))
        sb, sr = np.full(len(tb), 0.046), np.full(len(tr), 0.138)
        alone.append(curve_features(tr, yr, sr, 0.1).period_days / p_true)
        fit_r = curve_features(tr, yr, sr, 0.1, others=[(tb, yb, sb)])
        fit_b = curve_features(tb, yb, sb, 0.1, others=[(tr, yr, sr)])
        joint.append(fit_r.period_days / p_true)
        assert fit_b.period_days == pytest.approx(fit_r.period_days)  # one period for the object
        assert fit_r.ls_power < fit_b.ls_power  # each band's own power at it
    assert np.all(np.abs(np.array(joint) - 1) < 0.001)
    assert np.sum(np.abs(np.array(alone) - 1) > 0.01) >= 5  # R alone: aliases and noise peaks (7 of 8 here)


def test_harmonic_false_alarm_is_calibrated_on_white_noise_and_finds_narrow_eclipses():
    from survey_proc.lightcurves.fourier_features import harmonic_false_alarm

    fap_h, fap_ls = [], []
    for seed in range(60):
        rng = np.random.default_rng(500 + seed)
        t = ground_cadence(rng, 90)
        fit = curve_features(t, 1.0 + rng.normal(0, 0.05, len(t)), np.full(len(t), 0.05), 0.1)
        fap_h.append(fit.fap_harmonic)
        fap_ls.append(fit.fap)
    # searched white noise: about 7 % below 0.1 in 400 curves (the LS Baluev FAP: 6 %)
    assert np.mean(np.array(fap_h) <= 0.1) <= 0.2 and np.mean(np.array(fap_h) <= 0.01) <= 0.05
    # narrow eclipses (5 % of the orbit each): weak as a sinusoid, strong as a harmonic series
    rng = np.random.default_rng(1)
    t = ground_cadence(rng, 120)
    y = 10 ** (-0.4 * (eclipsing(t, 3.1416, depth=0.3, width=0.02) + rng.normal(0, 0.03, len(t))))
    fit = curve_features(t, y, np.full(len(t), 0.028), 0.1)
    assert fit.fap_harmonic < 1e-6 and fit.fap_harmonic < fit.fap
    f = 1.0 / fit.period_days
    assert harmonic_false_alarm(t, y, np.full(len(t), 0.028), f, 3, 10.0) >= fit.fap_harmonic
    assert harmonic_false_alarm(t[:7], y[:7], np.full(7, 0.028), f, 3, 10.0) == 1.0  # too few points for 3 harmonics


def test_sparse_model_round_trips_through_the_registry(tmp_path):
    model = FourierMLP(SparseClassifierConfig())
    model.mean.fill_(0.5)
    path = tmp_path / "cs.pt"
    model_registry.save("classifier_sparse", model, path, card={"search": {"period_min_days": 0.2}}, threshold=0.7)
    loaded = model_registry.load("classifier_sparse", path, device="cpu")
    assert loaded.threshold == pytest.approx(0.7)
    assert float(loaded.model.mean[0]) == pytest.approx(0.5)  # the standardisation travels with the weights
    # the CNN's kind refuses it, naming both
    with pytest.raises(Exception, match="is not a classifier model: it holds a 'classifier_sparse' model"):
        model_registry.load("classifier", path, device="cpu")


def test_shipped_sparse_model_classifies_long_curves_and_leaves_short_ones_to_the_cnn():
    rng = np.random.default_rng(11)
    t = ground_cadence(rng, 140)
    cnn = model_registry.load("classifier", device="cpu")
    sparse = model_registry.load("classifier_sparse", device="cpu")
    assert set(sparse.card["classes"]) == set(SPARSE_CLASSES)
    rows = []
    truth = {}
    for k in range(6):  # 3 RR Lyrae, 3 constants, at EROS-like errors
        err = np.full(len(t), 0.05)
        signal = rrab(t, 0.45 + 0.05 * k) if k < 3 else 0.0
        mag = 18.5 + signal + rng.normal(0, 0.05, len(t))
        truth[k] = ("pulsator", 0.45 + 0.05 * k) if k < 3 else ("constant", np.nan)
        rows.append(pd.DataFrame({"object_id": k, "epoch": np.arange(len(t)), "mjd": 50000.0 + t, "mag": mag,
                                  "mag_err": err, "flags": 0}))
    lc = pd.concat(rows, ignore_index=True)
    cc = ClassifySettings()
    res, info = classify_table(lc, cnn, cc, sparse)
    assert info["n_sparse"] == 6
    assert res["sparse"].all()
    for k, (cls, p) in truth.items():
        r = res.loc[k]
        if cls == "pulsator":
            assert r["var_class"] == "pulsator", (k, r["var_class"], r["p_periodic"])
            assert abs(r["period"] / p - 1) < 0.01
        else:
            assert r["var_class"] in ("constant", "non_periodic")
            assert np.isnan(r["period"])
        assert np.isnan(r["prob_transit"])  # the sparse model has no transit class
    # the same curves cut to their first 20 days: inside the CNN's span limit, classified by the CNN
    short = lc[lc["mjd"] < 50020.0]
    batch = preprocess(*_matrix(short), PreprocessConfig(min_points=5))
    out = C.classify(batch, cnn, sparse=sparse, sparse_span_days=cc.sparse_span_days)
    assert not out["sparse"].any()


def _matrix(lc: pd.DataFrame):
    from survey_proc.lightcurves.preprocess import to_matrix

    ids, _, mjd, mag, err, flg = to_matrix(lc)
    return ids, mjd, mag, err, flg


def test_sparse_span_setting_is_checked():
    from survey_proc.config import load_config

    with pytest.raises(ConfigError, match=r"classify\.sparse_span_days must be >= 0 days"):
        load_config(None, {"classify": {"sparse_span_days": -1}})


def test_a_multi_band_object_is_classified_per_band_and_reconciled():
    rng = np.random.default_rng(5)
    t = ground_cadence(rng, 150)
    n = len(t)
    band = np.where(np.arange(n) % 3 == 0, "g", "r")  # r is the better-sampled band
    colour = np.where(band == "g", 0.8, 0.0)  # mixed into one curve this would be a 0.8-mag "variable"
    base = pd.DataFrame({"object_id": 7, "epoch": np.arange(n), "mjd": 50000.0 + t, "mag_err": 0.05, "flags": 0,
                         "band": band})
    rows = [base.assign(mag=18.0 + colour + rng.normal(0, 0.05, n))]
    # object 8: an RR Lyrae seen in r, constant in g
    rows.append(base.assign(object_id=8, mag=18.5 + colour + np.where(band == "r", rrab(t, 0.5123), 0.0)
                            + rng.normal(0, 0.05, n)))
    lc = pd.concat(rows, ignore_index=True)
    sparse = model_registry.load("classifier_sparse", device="cpu")
    res, info = classify_table(lc, model_registry.load("classifier", device="cpu"), ClassifySettings(), sparse)
    assert info["n_bands"] == 2 and set(info["bands"]) == {"g", "r"} and info["n_classified"] == 2
    assert res.loc[7, "var_class"] in ("constant", "non_periodic") and np.isnan(res.loc[7, "period"])
    assert res.loc[7, "band_classified"] == "r"  # neither band periodic: the better-sampled band
    assert res.loc[8, "var_class"] == "pulsator" and abs(res.loc[8, "period"] / 0.5123 - 1) < 0.01
    assert res.loc[8, "band_classified"] == "r"  # the periodic band wins


@pytest.mark.parametrize("joint", [True, False])
def test_classify_table_searches_an_objects_long_bands_jointly(monkeypatch, joint):
    from survey_proc.lightcurves import fourier_features, sparse_classifier

    seen: list[tuple[int, int]] = []
    real = fourier_features.curve_features

    def spy(t, y, sigma, period_min_days=0.1, others=(), rescale_bands=False):
        seen.append((len(t), sum(len(o[0]) for o in others)))
        return real(t, y, sigma, period_min_days, others=others, rescale_bands=rescale_bands)

    monkeypatch.setattr(sparse_classifier, "curve_features", spy)
    rng = np.random.default_rng(9)
    t = ground_cadence(rng, 150)
    n = len(t)
    band = np.where(np.arange(n) % 3 == 0, "g", "r")
    lc = pd.DataFrame({"object_id": 4, "epoch": np.arange(n), "mjd": 50000.0 + t, "mag_err": 0.05, "flags": 0,
                       "band": band, "mag": 18.0 + rrab(t, 0.4321) + rng.normal(0, 0.05, n)})
    # a second object seen in g only: nothing to search it with
    lc = pd.concat([lc, lc[lc["band"] == "g"].assign(object_id=5)], ignore_index=True)
    res, _ = classify_table(lc, model_registry.load("classifier", device="cpu"), ClassifySettings(joint_bands=joint),
                            model_registry.load("classifier_sparse", device="cpu"))
    n_g, n_r = int((band == "g").sum()), int((band == "r").sum())
    # object 4's g and r, object 5's g, each in the clipped view (kept points: a few are clipped) and, when the
    # clip dropped any point, again in the unclipped view (all points)
    assert 3 <= len(seen) <= 6
    own = sorted(k for k, _ in seen)
    assert all(n_g - 3 <= k <= n_g or n_r - 3 <= k <= n_r for k in own)
    if joint:  # each of object 4's bands searched with the other's points of the same view; object 5 alone
        pairs = [p for p in seen if p[1] > 0]
        assert 2 <= len(pairs) <= 4 and all(o in range(n_g - 3, n_g + 1) or o in range(n_r - 3, n_r + 1)
                                            for _, o in pairs)
        if len(seen) > 3:  # an unclipped view was searched: with all of the other band's points
            assert any(k in (n_g, n_r) and o in (n_g, n_r) for k, o in pairs)
        assert 1 <= sum(o == 0 for _, o in seen) <= 2
    else:
        assert all(o == 0 for _, o in seen)
    assert res.loc[4, "var_class"] == "pulsator" and abs(res.loc[4, "period"] / 0.4321 - 1) < 0.01


def test_white_noise_objects_off_the_training_cadence_are_not_called_periodic():
    # two bands of 50 and 100 points over 3 years (EROS-1, the training data: ~120 + 120), noise exactly as quoted
    cnn = model_registry.load("classifier", device="cpu")
    sparse = model_registry.load("classifier_sparse", device="cpu")
    rows = []
    for k in range(30):
        rng = np.random.default_rng(100 + k)
        t = ground_cadence(rng, 150)
        band = np.where(np.arange(len(t)) % 3 == 0, "g", "r")
        rows.append(pd.DataFrame({"object_id": k, "epoch": np.arange(len(t)), "mjd": 50000.0 + t, "mag_err": 0.05,
                                  "flags": 0, "band": band,
                                  "mag": 18.0 + np.where(band == "g", 0.8, 0.0) + rng.normal(0, 0.05, len(t))}))
    res, info = classify_table(pd.concat(rows, ignore_index=True), cnn, ClassifySettings(), sparse)
    assert info["n_classified"] == 30 and res["sparse"].all()
    # without the card's FAP gate the model called 12 of 40 such objects periodic (p_periodic up to 0.94)
    assert res["var_class"].isin(["constant", "non_periodic"]).sum() >= 29
    assert (res["ls_fap"] > sparse.card["max_fap"]).sum() >= 25


def test_reconcile_bands_rules():
    from survey_proc.lightcurves.search import reconcile_bands

    g = pd.DataFrame({"var_class": ["pulsator", "constant", None, "non_periodic", "constant"],
                      "var_class_prob": [0.7, 0.9, np.nan, 0.6, 0.9], "n_points_classified": [40, 40, 0, 40, 40],
                      "classify_reason": [None, None, "too_few_points: x", None, None]},
                     index=pd.Index([1, 2, 3, 4, 5], name="object_id"))
    r = pd.DataFrame({"var_class": ["pulsator", "non_periodic", None, "constant", "constant"],
                      "var_class_prob": [0.9, 0.6, np.nan, 0.9, 0.8], "n_points_classified": [80, 80, 5, 80, 80],
                      "classify_reason": [None, None, "too_few_points: y", None, None]},
                     index=pd.Index([1, 2, 3, 4, 5], name="object_id"))
    out = reconcile_bands({"g": g, "r": r})
    assert list(out.index) == [1, 2, 3, 4, 5]
    assert out.loc[1, "band_classified"] == "r"  # both periodic: the higher class probability
    assert out.loc[2, "band_classified"] == "r"  # neither periodic: the band that sees variability
    # ... even with fewer points: correlated variability in any band is the object's
    assert out.loc[4, "band_classified"] == "g" and out.loc[4, "var_class"] == "non_periodic"
    assert out.loc[5, "band_classified"] == "r"  # neither periodic nor varying: the more points
    assert out.loc[3, "classify_reason"] == "too_few_points: y"  # none classified: the band with more points
    assert reconcile_bands({}) is None


def _eb_model(tmp_path, views, max_fap: float = 1.0):
    """A sparse model that calls every curve an eclipsing binary (p = 0.9997; non_periodic 10x more probable than
    constant), with the card's ``views`` and ``max_fap``."""
    import torch

    n_views = 2 if views == ["clipped", "unclipped"] else 1
    model = FourierMLP(SparseClassifierConfig(n_features=len(FEATURE_NAMES) * n_views))
    with torch.no_grad():
        last = model.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 10.0, 0.0, float(np.log(10.0))]))
    path = tmp_path / "eb.pt"
    model_registry.save("classifier_sparse", model, path, card={"views": views, "max_fap": max_fap}, threshold=0.5)
    return model_registry.load("classifier_sparse", path, device="cpu")


def test_a_two_view_model_takes_an_eclipsing_binarys_period_from_the_unclipped_view(tmp_path):
    """Nightly visits of a detached binary: each eclipse point is alone among out-of-eclipse neighbours and the
    clip drops it. The unclipped view still holds the eclipses: its period is the orbit's; the clipped view's is
    not."""
    from survey_proc.lightcurves.sparse_classifier import classify_sparse

    rng = np.random.default_rng(21)
    t = ground_cadence(rng, 240)
    p_true = 2.7183
    mag = 17.0 + eclipsing(t, p_true, depth=0.7, width=0.015) + rng.normal(0, 0.01, len(t))
    b = one_batch(t, mag, np.full(len(t), 0.01))
    assert b.n_clipped[0] >= 10
    two = classify_sparse(b, np.array([0]), _eb_model(tmp_path, ["clipped", "unclipped"])).iloc[0]
    one = classify_sparse(b, np.array([0]), _eb_model(tmp_path, ["clipped"])).iloc[0]
    assert two["var_class"] == one["var_class"] == "eclipsing_binary"
    assert any(abs(two["period"] / (k * p_true) - 1) < 0.01 for k in (1, 2))
    assert not any(abs(one["period"] / (k * p_true) - 1) < 0.01 for k in (0.5, 1, 2))
    # the time of minimum light is on the unclipped view's clock too: an eclipse
    ph = ((two["t0_days"] + b.t_ref_mjd) % p_true) / p_true  # the eclipses are at phases 0 and 0.5 of t
    assert min(ph, 1 - ph, abs(ph - 0.5)) < 0.05


def test_a_sparse_card_naming_an_unknown_view_is_refused(tmp_path):
    from survey_proc.lightcurves.sparse_classifier import classify_sparse

    rng = np.random.default_rng(2)
    t = ground_cadence(rng, 60)
    b = one_batch(t, 17.0 + rng.normal(0, 0.01, len(t)), np.full(len(t), 0.01))
    with pytest.raises(ValueError, match=r"card views \['raw'\] must be a non-empty list of \['clipped', "
                                         r"'unclipped'\]; retrain it"):
        classify_sparse(b, np.array([0]), _eb_model(tmp_path, ["raw"]))


def test_a_periodic_score_without_a_significant_period_is_labelled_constant(tmp_path):
    """Out of its domain the model may score noise p_periodic ~ 1; the gate refuses the period, and the label is
    constant, not whichever of its two tiny non-periodic probabilities is larger (here non_periodic's)."""
    from survey_proc.lightcurves.sparse_classifier import classify_sparse

    rng = np.random.default_rng(4)
    t = ground_cadence(rng, 100)
    b = one_batch(t, 17.0 + rng.normal(0, 0.01, len(t)), np.full(len(t), 0.01))
    r = classify_sparse(b, np.array([0]), _eb_model(tmp_path, ["clipped", "unclipped"], max_fap=1e-9)).iloc[0]
    assert r["p_periodic"] > 0.99 and r["prob_non_periodic"] > 5 * r["prob_constant"]
    assert r["var_class"] == "constant" and np.isnan(r["period"])
    assert r["var_class_prob"] == pytest.approx(r["prob_constant"])


def _np_model(tmp_path, card: dict | None = None):
    """A sparse model that calls every curve non_periodic (10x more probable than constant; p_periodic ~1e-5)."""
    import torch

    model = FourierMLP(SparseClassifierConfig(n_features=len(FEATURE_NAMES) * 2))
    with torch.no_grad():
        model.net[-1].weight.zero_()
        model.net[-1].bias.copy_(torch.tensor([0.0, -10.0, -10.0, float(np.log(10.0))]))
    path = tmp_path / "np.pt"
    model_registry.save("classifier_sparse", model, path, card={"views": ["clipped", "unclipped"], **(card or {})},
                        threshold=0.5)
    return model_registry.load("classifier_sparse", path, device="cpu")


def test_non_periodic_needs_correlated_variability_white_noise_is_constant(tmp_path):
    """Whatever the model's probabilities, a curve whose points are white noise about their mean carries no
    evidence of variability (its errors are scaled to its own scatter): constant. A random walk of the same
    scatter is non_periodic."""
    from survey_proc.lightcurves.preprocess import correlated_variability_z
    from survey_proc.lightcurves.sparse_classifier import NON_PERIODIC_MIN_Z, classify_sparse

    rng = np.random.default_rng(12)
    t = ground_cadence(rng, 150)
    white = 17.0 + rng.normal(0, 0.05, len(t))
    walk = 17.0 + np.cumsum(rng.normal(0, 0.05, len(t))) * 0.3 + rng.normal(0, 0.02, len(t))
    clf = _np_model(tmp_path)
    r_white = classify_sparse(one_batch(t, white, np.full(len(t), 0.05)), np.array([0]), clf).iloc[0]
    r_walk = classify_sparse(one_batch(t, walk, np.full(len(t), 0.05)), np.array([0]), clf).iloc[0]
    assert r_white["prob_non_periodic"] > 5 * r_white["prob_constant"] and r_white["p_periodic"] < 1e-3
    assert r_white["var_class"] == "constant" and np.isnan(r_white["period"])
    assert r_white["var_class_prob"] == pytest.approx(r_white["prob_constant"])
    assert r_walk["var_class"] == "non_periodic"
    # the statistic: 0 for white noise's eta = 2, sqrt(n) / 2 per unit below; the card may set the threshold
    assert correlated_variability_z(2.0, 100) == 0.0 and correlated_variability_z(1.0, 100) == pytest.approx(5.0)
    assert NON_PERIODIC_MIN_Z == 3.0
    loose = _np_model(tmp_path, {"non_periodic_min_z": -100.0})
    assert classify_sparse(one_batch(t, white, np.full(len(t), 0.05)), np.array([0]), loose).iloc[0][
        "var_class"] == "non_periodic"


def test_rescaled_bands_weighs_each_band_by_its_own_scatter_about_the_periodic_fit():
    from survey_proc.lightcurves.fourier_features import rescaled_bands

    rng = np.random.default_rng(8)
    t_b, t_r = ground_cadence(rng, 120), ground_cadence(rng, 120)
    p = 0.5678
    y_b = 0.3 * np.sin(2 * np.pi * t_b / p) + rng.normal(0, 0.02, len(t_b))
    y_r = 0.15 * np.sin(2 * np.pi * t_r / p) + rng.normal(0, 0.01, len(t_r))
    # quoted errors inflated by the variability itself, by different factors (as the running-median scale is)
    curves = [(t_b, y_b, np.full(len(t_b), 0.2)), (t_r, y_r, np.full(len(t_r), 0.03))]
    out = rescaled_bands(curves, 0.1)
    assert out[0][2][0] == pytest.approx(0.02, rel=0.2) and out[1][2][0] == pytest.approx(0.01, rel=0.2)
    for (t, y, _), (t2, y2, _) in zip(curves, out, strict=True):
        assert t2 is t and y2 is y
    fit = curve_features(*curves[0], 0.1, others=[curves[1]], rescale_bands=True)
    assert abs(fit.period_days / p - 1) < 0.01
    # the features keep the errors as given: the band's own chi^2 is that of the quoted 0.2 mag errors
    plain = curve_features(*curves[0], 0.1, others=[curves[1]])
    assert fit.features[FEATURE_NAMES.index("log_chi2nu")] == pytest.approx(
        plain.features[FEATURE_NAMES.index("log_chi2nu")], abs=0.05)
