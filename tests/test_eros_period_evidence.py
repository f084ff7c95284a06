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
