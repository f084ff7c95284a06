"""SysRem detrending (survey_proc.lightcurves.detrend) on a synthetic field with known shared trends."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from survey_proc.lightcurves.detrend import (
    Components,
    apply_components,
    fit_amplitudes,
    fit_components,
    fit_field,
    sysrem,
)

N_STARS, N_T = 300, 600
P_SIN, AMP_SIN = 0.7, 0.1  # days, mag (semi-amplitude)
P_TR, DUR_TR, DEPTH_TR = 1.3, 0.15, 0.02  # days, days, mag


@pytest.fixture(scope="module")
def field() -> dict:
    """300 stars x 600 epochs over 3.5 d: two shared trends with star amplitudes of their own, white noise
    (3-20 mmag), 5 % missing points; star 0 a 0.1-mag sinusoid, star 1 (bright) a 0.02-mag transit."""
    rng = np.random.default_rng(1)
    t = np.linspace(0.0, 3.5, N_T)
    c1 = rng.normal(0.0, 0.02, N_T)  # per-epoch zero-point errors, white in time
    c2 = 0.03 * np.cos(2 * np.pi * t / 1.0) + 0.01 * t  # a slow, airmass-like trend
    a1, a2 = rng.normal(1.0, 0.1, N_STARS), rng.normal(0.5, 0.5, N_STARS)
    sig = rng.uniform(0.003, 0.02, N_STARS)
    sig[1] = 0.004
    clean = 18.0 + rng.uniform(-2, 2, N_STARS)[:, None] + rng.normal(0.0, 1.0, (N_STARS, N_T)) * sig[:, None]
    mag = clean + a1[:, None] * c1 + a2[:, None] * c2
    sin = AMP_SIN * np.sin(2 * np.pi * t / P_SIN)
    ph = ((t - 0.3) / P_TR) % 1.0
    in_tr = (ph < DUR_TR / P_TR / 2) | (ph > 1 - DUR_TR / P_TR / 2)
    mag[0] += sin
    mag[1] += np.where(in_tr, DEPTH_TR, 0.0)
    mag[rng.random(mag.shape) < 0.05] = np.nan
    err = np.repeat(sig[:, None], N_T, axis=1)
    return {"t": t, "mag": mag, "err": err, "sig": sig, "in_tr": in_tr, "good": np.isfinite(mag)}


def _detrended(f: dict) -> tuple[np.ndarray, Components]:
    comp = fit_components(f["mag"], f["err"], f["good"], 2, 20)
    _, corr = fit_amplitudes(f["mag"], f["err"], f["good"], comp.c)
    return f["mag"] - corr, comp


def test_sysrem_removes_shared_trends_and_keeps_a_sinusoid_and_a_transit(field):
    det, comp = _detrended(field)
    assert comp.applied == "sysrem:2" and comp.k == 2
    assert not comp.used[0]  # the 0.1-mag variable is not a fitting star
    assert comp.n_stars >= 0.9 * N_STARS
    sig = field["sig"][2:]

    def rms(m: np.ndarray) -> np.ndarray:
        return np.sqrt(np.nanmean((m - np.nanmean(m, axis=1, keepdims=True)) ** 2, axis=1))

    raw, after = rms(field["mag"][2:]) / sig, rms(det[2:]) / sig
    assert np.median(raw) > 2.0  # the trends dominate before
    assert np.median(after) == pytest.approx(1.0, abs=0.03) and after.max() < 1.15  # noise only after
    assert comp.rms_after < 0.5 * comp.rms_before
    # the variable's amplitude and the transit's depth are kept within 3 %
    t, g0, g1 = field["t"], field["good"][0], field["good"][1]
    x = np.vstack([np.ones_like(t), np.sin(2 * np.pi * t / P_SIN), np.cos(2 * np.pi * t / P_SIN)]).T
    coef = np.linalg.lstsq(x[g0], det[0][g0], rcond=None)[0]
    assert np.hypot(coef[1], coef[2]) == pytest.approx(AMP_SIN, rel=0.03)
    in_tr = field["in_tr"]
    depth = np.mean(det[1][g1 & in_tr]) - np.mean(det[1][g1 & ~in_tr])
    assert depth == pytest.approx(DEPTH_TR, rel=0.03)


def test_sysrem_of_an_exact_rank_one_matrix():
    rng = np.random.default_rng(3)
    a, c = rng.normal(1, 0.3, 50), rng.normal(0, 0.05, 80)
    cs, amps = sysrem(a[:, None] * c[None, :], np.ones((50, 80)), 1)
    np.testing.assert_allclose(amps[:, 0, None] * cs[0][None, :], a[:, None] * c[None, :], atol=1e-9)
    assert np.sqrt(np.mean(cs[0] ** 2)) == pytest.approx(1.0)  # unit rms: amplitudes are in mag


def test_too_few_stars_fit_nothing_and_say_why(field):
    comp = fit_components(field["mag"][:12], field["err"][:12], field["good"][:12], 2, 20)
    assert comp.k == 0 and comp.applied == "none: 12 stars < detrend_min_stars (20)"
    assert comp.info()["n_stars"] == 12
    a, corr = fit_amplitudes(field["mag"][:12], field["err"][:12], field["good"][:12], comp.c)
    assert a.shape == (12, 0) and not corr.any()


def test_long_format_per_band_round_trip(field):
    """Light curves with a ``band`` column get components per band; an object's correction is its own."""
    n, nt = 120, N_T
    rows = []
    for b, sl in (("g", slice(0, nt, 2)), ("r", slice(1, nt, 2))):
        ep = np.arange(nt)[sl]
        for i in range(n):
            rows.append(pd.DataFrame({"object_id": np.int64(1000 + i), "epoch": ep, "band": b,
                                      "mag": field["mag"][2 + i, sl], "mag_err": field["err"][2 + i, sl],
                                      "flags": np.int32(0)}))
    lc = pd.concat(rows, ignore_index=True).dropna(subset=["mag"])
    comps, info = fit_field(lc, 2, 20, bad_flags=1)
    assert set(info) == {"g", "r"} and all(v["applied"] == "sysrem:2" for v in info.values())
    assert set(comps["band"]) == {"g", "r"} and len(comps) == 2 * nt
    out, per_obj = apply_components(lc, comps, bad_flags=1)
    assert per_obj["detrended"].all() and (per_obj["detrend"] == "sysrem:2").all()
    assert (per_obj["detrend_rms"] > 0.01).all()
    assert (out["epoch"].to_numpy() == lc["epoch"].to_numpy()).all()
    sd = out.groupby(["object_id", "band"])["mag"].std() / lc.groupby(["object_id", "band"])["mag"].std()
    assert sd.median() < 0.6
    # without a band column (one band): the same call, one set of components
    comps1, info1 = fit_field(lc.drop(columns="band"), 2, 20, bad_flags=1)
    assert list(info1) == ["all"] and set(comps1["band"]) == {"all"}
    # components for one band only: objects seen in the other are left alone
    out2, _ = apply_components(lc, comps[comps["band"] == "g"], bad_flags=1)
    r = (lc["band"] == "r").to_numpy()
    np.testing.assert_array_equal(out2["mag"].to_numpy()[r], lc["mag"].to_numpy()[r])


def test_a_bright_variable_among_faint_stars_does_not_become_a_component():
    """A 0.35-mag pulsator with 3-mmag errors among 30-150-mmag stars: before the first screen and the
    weight cap, the first component locked onto it and the fit then flattened it (measured on a
    held-out survey: a mag-21 pulsator's 0.7 mag peak-to-peak removed)."""
    rng = np.random.default_rng(2)
    n, nt = 200, 500
    t = np.linspace(0.0, 1.7, nt)
    sig = rng.uniform(0.03, 0.15, n)
    sig[0] = 0.003
    common = rng.normal(0, 0.02, nt)  # a per-epoch offset shared by all
    mag = 20 + rng.normal(0, 1, (n, nt)) * sig[:, None] + common[None, :]
    mag[0] += 0.35 * np.sin(2 * np.pi * t / 0.9)
    err, good = np.repeat(sig[:, None], nt, axis=1), np.ones((n, nt), bool)
    comp = fit_components(mag, err, good, 2, 20)
    assert comp.k >= 1 and not comp.used[0]
    _, corr = fit_amplitudes(mag, err, good, comp.c)
    x = np.vstack([np.ones_like(t), np.sin(2 * np.pi * t / 0.9), np.cos(2 * np.pi * t / 0.9)]).T
    coef = np.linalg.lstsq(x, mag[0] - corr[0], rcond=None)[0]
    assert np.hypot(coef[1], coef[2]) == pytest.approx(0.35, rel=0.02)
    # its own correction is the shared offset, up to the projection of its 0.25-mag rms signal on the
    # component (~0.25 / sqrt(500) = 0.011 mag); the trap removed 0.25 mag rms
    assert np.std(corr[0] - common) < 0.025


def test_a_component_carried_by_one_star_is_dropped():
    rng = np.random.default_rng(5)
    resid = rng.normal(0.0, 0.01, (100, 200))
    resid[0] += 0.5 * np.sin(np.linspace(0, 20, 200))  # only one star has this signal
    c, a = sysrem(resid, np.full(resid.shape, 1e4), 2, min_n_eff=5)
    assert c.shape == (0, 200) and a.shape == (100, 0)


def test_white_noise_alone_is_left_alone():
    rng = np.random.default_rng(0)
    mag = rng.normal(0.0, 0.01, (300, 600))
    comp = fit_components(mag, np.full(mag.shape, 0.01), np.ones(mag.shape, bool), 2, 20)
    assert comp.k == 0 and comp.applied == "none: no component above the noise shared by >= 5 stars"
