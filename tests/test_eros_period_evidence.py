"""benchmarks/eros_period_evidence.py: which of two periods a curve's own points prefer."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.eros_period_evidence import DECISIVE, clean_band, evidence, verdict

SIDEREAL = 1.0027379  # 1/day: a nightly cadence's alias spacing


def _nightly_sawtooth(rng: np.random.Generator, period_days: float, n: int = 240, noise: float = 0.05
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fast-rise, slow-decline pulsator seen once a night (+-1.5 h) over ~900 d, with its quoted errors."""
    t = np.sort(rng.choice(900, n, replace=False) + rng.normal(0.0, 0.06, n))
    ph = (t / period_days) % 1.0
    flux = 1.0 + 0.4 * np.where(ph < 0.2, ph / 0.2, (1.0 - ph) / 0.8)
    err = np.full(n, noise)
    return t, flux + rng.normal(0.0, noise, n), err


def test_the_true_period_beats_its_one_day_alias_and_a_wrong_period_loses() -> None:
    rng = np.random.default_rng(3)
    p_true = 0.5531
    bands = [_nightly_sawtooth(rng, p_true), _nightly_sawtooth(rng, p_true, noise=0.08)]
    alias = 1.0 / (1.0 / p_true - SIDEREAL)  # the 1-day alias (~1.24 d), a Cepheid's period
    # the catalogue right, ours the alias: the data prefer the catalogue's (negative, decisively)
    d = evidence(bands, p_true, alias, k=3)
    assert d < -DECISIVE
    assert verdict(d) == "catalogue"
    # the catalogue wrong (the alias), ours right: the same evidence with the opposite sign
    d2 = evidence(bands, alias, p_true, k=3)
    assert d2 > DECISIVE
    assert verdict(d2) == "reported"
    # two periods within the refinement window of each other are the same period: neither
    assert verdict(evidence(bands, p_true, p_true * (1 + 2e-5), k=3)) == "neither"


def test_a_doubled_catalogue_period_is_judged_at_its_better_multiple() -> None:
    rng = np.random.default_rng(5)
    bands = [_nightly_sawtooth(rng, 0.9), _nightly_sawtooth(rng, 0.9)]
    # the catalogue gives half the true period; with catalogue_doubles its 2x is tried and ties with ours
    assert abs(evidence(bands, 0.45, 0.9, k=3, catalogue_doubles=True)) < DECISIVE
    # without it, half the period cannot follow the sawtooth: the data prefer ours decisively
    assert evidence(bands, 0.45, 0.9, k=3) > DECISIVE


def test_clean_band_drops_bad_points_and_gross_outliers_only() -> None:
    t = np.arange(10.0)
    f = np.array([1.0, 1.1, 0.9, 1.0, 50.0, 1.05, np.nan, 0.95, 1.0, 1.02])
    e = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.1, 0.1])
    tt, ff, ee = clean_band(t, f, e)
    assert list(tt) == [0, 1, 2, 3, 5, 8, 9]
    assert ff.max() == pytest.approx(1.1)
    assert (ee > 0).all()


def test_main_on_real_eros_stars_counts_verdicts_and_ceilings(tmp_path, capsys):
    """Three real test-split stars: one right, one given no period, one given a period its points reject
    (the catalogue's fits better): one wrong period, judged for the catalogue; nothing rejects the catalogue, so
    both ceilings are 1."""
    import json

    import pandas as pd

    from benchmarks.eros_period_evidence import main
    from training.build_cadence_data import EROS

    if not (EROS / "test.csv").is_file():
        pytest.skip("EROS-1 light curves not present (../shared/data/lightcurves/eros)")
    lab = pd.read_csv(EROS / "test.csv", index_col=0)
    sid = "166_6669"  # a Cepheid of 3.7655 d
    p_true = float(lab.loc[sid, "period"] / lab.loc[sid, "div_period"])
    rows = [{"star": sid, "type": 2, "p_true": p_true, "pred": 2, "period_ok": True, "period": p_true},
            {"star": "149_499", "type": 3, "p_true": 0.2586, "pred": 0, "period_ok": False, "period": np.nan},
            {"star": sid, "type": 2, "p_true": p_true, "pred": 3, "period_ok": False, "period": 0.4321}]
    csv = tmp_path / "r.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    main(["--split", "test", "--stars", str(csv), "--json", str(tmp_path / "e.json")])
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["stars"] == 3 and out["no_period"] == 1 and out["wrong_periods"] == 1
    assert out["rows"][0]["verdict"] == "catalogue" and out["rows"][0]["dchi2"] < -DECISIVE
    # the Cepheid's catalogue period is a strong signal in its points, the third row's class is wrong but its period
    # is not rejected and the star has signal: nothing is out of reach
    assert out["no_signal"] == 0
    assert out["ceilings"] == {"period_within_1pct": 1.0, "class_accuracy": 1.0, "class_accuracy_signal": 1.0}
    assert "ceilings: periods 1.000, classes 1.000 (1.000 counting the stars without signal)" in capsys.readouterr().out


def test_signal_fap_is_small_for_a_pulsator_and_uniform_like_for_noise() -> None:
    from benchmarks.eros_period_evidence import SIGNAL_FAP, signal_fap

    rng = np.random.default_rng(11)
    bands = [_nightly_sawtooth(rng, 0.61, noise=0.2), _nightly_sawtooth(rng, 0.61, noise=0.3)]
    assert signal_fap(bands, 0.61, 3) < 1e-10
    # pure noise: the 41-trial F test passes SIGNAL_FAP rarely (a few per thousand at most)
    hits = 0
    for _ in range(200):
        noise = [(b[0], 1.0 + rng.normal(0, 0.2, len(b[0])), b[2] * 0 + 0.2) for b in bands]
        hits += signal_fap(noise, 0.61, 3) <= SIGNAL_FAP
    assert hits <= 2
