"""Whether an eclipsing binary's BLS period is half its orbit (issue 22): the likelihood-ratio test.

``classifier._folded_eclipses`` decides whether the period is doubled. The old rule ("no
secondary at S/N >= 3 at phase 0.5: double") doubled weak binaries found at their true
orbit, whose secondary is never at S/N 3; these tests pin both directions.
"""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.lightcurves import classifier as C
from survey_proc.lightcurves import views
from survey_proc.lightcurves.periodogram import BLSResult
from survey_proc.lightcurves.preprocess import preprocess

T_DAYS = np.arange(1000) * 300 / 86400  # 3.47 d, the simulated surveys' cadence
ORBIT_D, DURATION_D, T0_D = 0.8, 0.06, 0.13


def _binary(depth_mag: float, ratio: float, sigma_mag: float, seeds: range):
    """One light curve per seed: box eclipses of ``depth_mag`` (primary) and ``ratio`` x it (phase 0.5)."""
    ph = ((T_DAYS - T0_D) / ORBIT_D + 0.5) % 1.0 - 0.5
    dm = np.where(np.abs(ph) < 0.5 * DURATION_D / ORBIT_D, depth_mag, 0.0)
    dm += np.where(np.abs(np.abs(ph) - 0.5) < 0.5 * DURATION_D / ORBIT_D, ratio * depth_mag, 0.0)
    rng = np.random.default_rng(seeds.start)
    mag = 20.0 + dm[None, :] + sigma_mag * rng.standard_normal((len(seeds), len(T_DAYS)))
    return preprocess(np.arange(len(seeds)), T_DAYS + 61000.0, mag, np.full_like(mag, sigma_mag),
                      np.zeros(mag.shape, np.int64))


def _decisions(batch, period_d: float) -> tuple[np.ndarray, np.ndarray]:
    """(new decisions, the old rule's) for every curve of ``batch`` folded at ``period_d``."""
    new, old = [], []
    for i in range(len(batch)):
        one = batch.subset(np.array([i]))
        t0 = float(T0_D + 61000.0 - batch.t_ref_mjd)  # days after the batch's reference epoch
        new.append(C._folded_eclipses(one, period_d, DURATION_D, t0))
        r = BLSResult(np.array([period_d]), np.zeros(1), np.zeros(1), np.zeros(1), np.ones(1),
                      np.array([DURATION_D]), np.array([t0]), np.zeros(1))
        old.append(bool(views.eclipse_tests(one, r)[0][0] < 3.0))
    return np.array(new), np.array(old)


@pytest.mark.parametrize("ratio", [1.0, 0.6])
def test_both_eclipses_folded_onto_half_the_orbit_are_doubled(ratio):
    new, old = _decisions(_binary(0.3, ratio, 0.02, range(1, 6)), ORBIT_D / 2)
    assert new.all() and old.all()


def test_a_bright_binary_at_its_orbit_with_a_seen_secondary_is_kept():
    new, old = _decisions(_binary(0.3, 0.3, 0.02, range(11, 16)), ORBIT_D)
    assert not new.any() and not old.any()


def test_a_weak_binary_at_its_orbit_is_not_doubled_for_want_of_a_secondary():
    # primary box S/N ~ 9, secondary 0.15 of it: never at S/N 3, so the old rule doubled every one
    batch = _binary(0.1, 0.15, 0.1, range(21, 41))
    new, old = _decisions(batch, ORBIT_D)
    assert old.mean() >= 0.9
    assert new.mean() <= 0.5  # a weak case: the likelihoods differ by a small factor (measured 0.4)
    # the same weak binary with both eclipses equal, folded at half its orbit, is still doubled
    new_f, _ = _decisions(_binary(0.1, 1.0, 0.1, range(41, 61)), ORBIT_D / 2)
    assert new_f.mean() >= 0.7


def test_box_snr_is_the_depth_over_its_error_rescaled_by_the_scatter():
    batch = _binary(0.2, 0.0, 0.02, range(71, 72))
    t, y, w = batch.t_days, batch.y[0].astype(float), batch.w[0].astype(float)
    t0 = float(T0_D + 61000.0 - batch.t_ref_mjd)
    snr = C.box_snr(t, y, w, ORBIT_D, t0, DURATION_D)
    # the true depth 1 - 10**(-0.08) = 0.168 of the flux over the error of the two weighted means (the errors
    # are right here, so the scatter does not rescale them)
    inside = np.abs(((t - t0) / ORBIT_D + 0.5) % 1 - 0.5) * ORBIT_D < DURATION_D / 2
    assert 60 < inside.sum() < 90
    ideal = 0.168 / np.sqrt(1 / w[inside].sum() + 1 / w[~inside].sum())
    assert 0.8 * ideal < snr < 1.05 * ideal  # (preprocessing's clipping takes a few in-box points: 0.89 here)
    # errors twice too small: the scatter rescales them, the S/N does not double
    assert C.box_snr(t, y, 4 * w, ORBIT_D, t0, DURATION_D) == pytest.approx(snr, rel=0.02)
    # a box where nothing happens
    assert abs(C.box_snr(t, y, w, ORBIT_D, t0 + 0.4, DURATION_D)) < 4


def test_an_insignificant_box_is_not_an_eclipse_and_the_setting_is_checked():
    from survey_proc import model_registry
    from survey_proc.config import ConfigError, load_config

    clf = model_registry.load("classifier", device="cpu")
    # a clear binary (box S/N ~ 30): called at the default gate, refused when the gate is above its S/N
    batch = _binary(0.3, 0.5, 0.05, range(81, 82))
    res = C.classify(batch, clf, eclipse_min_snr=7.0)
    assert res["var_class"].iloc[0] == "eclipsing_binary" and res["box_snr"].iloc[0] > 20
    gated = C.classify(batch, clf, eclipse_min_snr=float(res["box_snr"].iloc[0]) + 1)
    assert gated["var_class"].iloc[0] in ("constant", "non_periodic")
    assert gated["period"].iloc[0] == pytest.approx(gated["period_bls"].iloc[0])
    with pytest.raises(ConfigError, match=r"classify\.eclipse_min_snr must be >= 0"):
        load_config(None, {"classify": {"eclipse_min_snr": -1}})
