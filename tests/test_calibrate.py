"""catalog/calibrate.py: zero points, calibrators, the airmass and aperture-correction models, the reference epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from survey_proc.catalog import calibrate as cal
from survey_proc.config import CalibrationConfig

ROOT = Path(__file__).resolve().parents[1]


def test_robust_zeropoint_ignores_outliers_and_quotes_its_error():
    rng = np.random.default_rng(1)
    n = 80
    err = np.full(n, 0.02)
    dz = 25.3 + rng.normal(0, 0.02, n)
    dz[:15] += rng.uniform(0.2, 1.0, 15)  # blends / variables: one-sided outliers
    zp, zp_err, scatter, used = cal.robust_zeropoint(dz, err, 3.0)
    assert zp == pytest.approx(25.3, abs=3 * 0.02 / np.sqrt(65))
    assert used >= 60 and scatter == pytest.approx(0.02, rel=0.35)
    assert zp_err == pytest.approx(0.02 / np.sqrt(used), rel=0.4)
    assert cal.robust_zeropoint(np.array([]), np.array([]), 3.0)[3] == 0


def test_fit_epoch_zeropoint_status_depends_on_star_count():
    cfg = CalibrationConfig(min_stars=10, min_stars_fit=3)
    rng = np.random.default_rng(4)
    for n, status in ((12, "fit"), (9, "fit_few"), (3, "fit_few"), (2, "few")):
        m = np.linspace(-12, -9, n)
        dz = rng.normal(0.0, 0.02, n)
        z = cal.fit_epoch_zeropoint(m, np.full(n, 0.005), m + 30.0 + dz, np.full(n, 0.005), cfg)
        assert z.status == status and z.n_used == n and z.zp == pytest.approx(30.0, abs=0.05), n
        if status == "fit_few":  # the error is widened to the per-star scatter
            assert z.zp_err == pytest.approx(max(z.scatter, 0.005 * np.sqrt(2) / np.sqrt(n)))


def test_a_field_with_3_to_9_calibrators_is_calibrated_and_flagged():
    from survey_proc import vocab as F

    cfg = CalibrationConfig(min_stars=10, min_stars_fit=3)
    src = pd.DataFrame({"mag_inst": [-10.0, -11.0], "mag_inst_err": [0.01, 0.02], "flags": np.zeros(2, np.int32)})
    m = np.array([-12.0, -11.5, -11.0, -10.0])
    z = cal.fit_epoch_zeropoint(m, np.full(4, 0.01), m + 25.0, np.full(4, 0.01), cfg)
    cal.apply_zeropoint(src, z)
    assert z.status == cal.ZpStatus.FIT_FEW and (src["flags"] & F.ZP_FEW).all()
    assert not (src["flags"] & F.ZP_MODEL).any()
    assert src["mag"].to_numpy() == pytest.approx([15.0, 14.0])
    assert F.describe(F.ZP_FEW) == ["ZP_FEW"]


def test_ensemble_recovers_injected_offsets_and_fits_few_star_epochs():
    rng = np.random.default_rng(11)
    n_star, n_epoch = 40, 12
    mag = rng.uniform(15, 19, n_star)
    offset = rng.normal(0, 0.05, n_epoch)
    rows = []
    for e in range(n_epoch):
        stars = range(n_star) if e != 5 else range(4)  # epoch 5 sees only 4 stars
        for s in stars:
            rows.append({"epoch": e, "star": s, "mag_inst": mag[s] - 25.0 - offset[e] + rng.normal(0, 0.0005),
                         "mag_inst_err": 0.0005})
    zps, _ = cal.ensemble_zeropoints(pd.DataFrame(rows), 3.0, min_stars=10, min_stars_fit=3)
    rel = zps["zp"].to_numpy() - offset
    assert np.ptp(rel) < 0.001  # per-epoch offsets recovered to < 1 mmag (up to the free constant)
    assert zps.loc[5, "status"] == "fit_few" and (zps.drop(5)["status"] == "fit").all()
    assert zps.loc[5, "zp_err"] >= zps.loc[5, "scatter"]


def test_airmass_model_recovers_extinction():
    rng = np.random.default_rng(2)
    X = rng.uniform(1.0, 2.0, 200)
    zp = 31.0 - 0.12 * (X - 1) + rng.normal(0, 0.005, 200)
    zp[:10] -= 0.5  # clouds
    t = pd.DataFrame({"airmass": X, "zp": zp, "zp_err": 0.005, "zp_status": "fit"})
    m = cal.fit_airmass_model(t)
    assert m["k_mag_per_airmass"] == pytest.approx(0.12, abs=0.005)
    assert m["zp0"] == pytest.approx(31.0, abs=0.003) and m["n"] >= 185
    assert cal.model_zeropoint(m, 1.5) == pytest.approx(31.0 - 0.06, abs=0.004)
    space = t.assign(airmass=np.nan)
    assert np.isnan(cal.fit_airmass_model(space)["k_mag_per_airmass"])


def test_select_calibrators_with_no_reference_star_in_reach_returns_nothing():
    from survey_proc.catalog.calibrate import CalibrationConfig, select_calibrators

    x = np.array([10.0, 50.0])
    i_s, i_r = select_calibrators(x, x, np.array([100.0, 100.0]), np.zeros(2, np.int32), x + 30.0, x + 30.0, 2.0,
                                  CalibrationConfig())
    assert len(i_s) == 0 and len(i_r) == 0


def test_zero_point_status_is_an_enum_that_reads_and_writes_as_text():
    z = cal.ZeroPoint(30.0, 0.01, 0.02, 5, 9, "few")
    assert z.status is cal.ZpStatus.FEW and z.to_dict()["status"] == "few"
    assert cal.ZeroPoint.from_dict(z.to_dict()) == z
    with pytest.raises(ValueError, match="'best' is not a valid ZpStatus"):
        cal.ZeroPoint(30.0, 0.01, 0.02, 5, 9, "best")


def test_apcorr_model_is_a_clipped_line_or_a_median():
    f = np.linspace(1.8, 3.0, 12)
    a = 1.02 + 0.05 * f
    a[3] += 0.5  # an outlier
    m = cal.fit_apcorr_model(f, a)
    assert m["n"] == 12 and m["coef"] == pytest.approx([0.05, 1.02], abs=1e-9)
    few = cal.fit_apcorr_model(f[:4], a[:4] * 0 + 1.1)
    assert few == {"coef": [0.0, pytest.approx(1.1)], "n": 4}
    assert cal.fit_apcorr_model(np.zeros(0), np.zeros(0)) == {"coef": [0.0, 1.0], "n": 0}


def test_reference_epoch_choice():
    assert cal.choose_reference_epoch({0: 10, 1: 30, 2: 30}) == 1
    assert cal.choose_reference_epoch({0: 10, 1: 30}, requested=0) == 0
    with pytest.raises(ValueError, match=r"reference_epoch = 5 was not extracted in this run \(epochs 0..1\)"):
        cal.choose_reference_epoch({0: 10, 1: 30}, requested=5)


def test_internal_reference_keeps_bright_stars_with_faint_neighbours():
    cfg = CalibrationConfig(snr_min=20.0, isolation_fwhm=3.0, isolation_flux_ratio=0.025, max_stars=300)
    # three bright stars: one alone, one with a neighbour 5 mag fainter at 2 px, one with an equal neighbour at 2 px
    x = np.array([20.0, 60.0, 62.0, 100.0, 102.0])
    flux = np.array([1e5, 1e5, 1e3, 1e5, 1e5])
    src = pd.DataFrame({"x": x, "y": np.full(5, 30.0), "x_ref": x, "y_ref": np.full(5, 30.0), "ra": x, "dec": x,
                        "flux": flux, "snr": np.sqrt(flux), "flags": np.zeros(5, np.int32),
                        "mag_inst": -2.5 * np.log10(flux), "mag_inst_err": 1.0857 / np.sqrt(flux)})
    ref = cal.internal_reference(src, 25.0, 2.0, cfg)
    assert sorted(ref["x_ref"]) == [20.0, 60.0]  # the faint neighbour is ignored; the equal pair is not isolated
    assert ref["mag"].to_numpy() == pytest.approx(25.0 - 2.5 * 5)


def test_ensemble_least_squares_recovers_offsets_to_1_mmag_despite_variables_and_outliers():
    rng = np.random.default_rng(3)
    n_star, n_epoch = 300, 60
    mag = rng.uniform(14, 20, n_star)
    err = 0.002 + 0.03 * 10 ** (0.4 * (mag - 20))  # photon noise grows towards the faint end
    offset = rng.normal(0, 0.05, n_epoch)
    variable = rng.choice(n_star, 10, replace=False)
    e, s = np.meshgrid(np.arange(n_epoch), np.arange(n_star), indexing="ij")
    e, s = e.ravel(), s.ravel()
    seen = rng.random(len(e)) > 0.2  # each star missing from a fifth of the epochs
    e, s = e[seen], s[seen]
    m = mag[s] - 25.0 - offset[e] + rng.normal(0, err[s])
    var = np.isin(s, variable)
    m[var] += 0.3 * np.sin(e[var] * 1.3 + s[var])
    hit = rng.random(len(m)) < 0.01
    m[hit] -= 0.5  # cosmic rays and blends
    zps, stars = cal.ensemble_zeropoints(pd.DataFrame({"epoch": e, "star": s, "mag_inst": m,
                                                       "mag_inst_err": err[s]}), 3.0, min_stars=10)
    rel = zps["zp"].to_numpy() - offset
    assert np.std(rel - rel.mean()) <= 0.001  # per-epoch offsets to <= 1 mmag rms
    assert (zps["status"] == "fit").all()
    assert not stars.loc[variable, "used"].any()  # the variables were rejected as a whole
    assert stars["used"].sum() >= n_star - 20
    assert zps["zp_err"].median() == pytest.approx(np.std(rel - rel.mean()), rel=0.6)  # honest errors


def test_ensemble_of_no_measurements_is_empty():
    zps, stars = cal.ensemble_zeropoints(pd.DataFrame({"epoch": [1], "star": [0], "mag_inst": [np.nan],
                                                       "mag_inst_err": [0.01]}))
    assert zps.empty and stars.empty
