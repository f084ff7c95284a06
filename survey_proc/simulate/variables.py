"""Variable-star models: one vectorised function gives every star's magnitude at any time.

The renderer and the truth light curves both call :func:`magnitudes_at`, so the pixels
and the truth cannot disagree. Models are evaluated at mid-exposure (no smearing over the
exposure; for 300 s exposures this matters only for the fastest flare rises).

Classes and their parameters (columns of ``stars.parquet``; NaN where not used):

``constant``
    ``mag`` only.
``eclipsing_binary``
    Detached/semi-detached: primary eclipse (flux depth ``depth``, total ``duration``
    days) at phase 0 (``t0`` = time of primary minimum), secondary at phase 0.5 with
    depth ``depth * secondary_ratio``, plus ellipsoidal variation of semi-amplitude
    ``ellipsoidal`` (flux fraction). Eclipse profile ``(1 - (dphi/half_width)^2)^1.5``.
    ``amplitude`` = primary depth in mag.
``pulsator``
    RR Lyrae-like: a fixed fast-rise/slow-decline Fourier template (zero mean in mag,
    unit peak-to-peak) scaled by ``amplitude`` (mag, peak to peak); ``t0`` = maximum light.
``transit``
    Trapezoid: flux depth ``depth``, total ``duration`` days, ingress+egress each
    ``ingress_frac * duration``; ``t0`` = mid-transit. ``amplitude`` = depth in mag.
``flare``
    One flare at ``t0``: linear rise over ``rise_days``, exponential decay with e-folding
    ``decay_days``; peak flux increase ``depth`` times quiescent. ``amplitude`` = peak
    brightening in mag (positive).
``trend``
    Quadratic drift ``mag + trend_mag_per_day * dt + trend_mag_per_day2 * dt^2`` with
    ``dt = t - t0`` (``t0`` the middle of the survey). ``amplitude`` = range over the survey.

``mag`` is the star's reference magnitude: out of eclipse/transit/flare, the time-average
(in magnitudes) for pulsators, the value at ``t0`` for trends.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from survey_proc.vocab import VAR_CLASSES

# RRab-like template: sawtooth-ish Fourier series, evaluated once on a fine phase grid.
_TEMPLATE_PHASE = np.linspace(0.0, 1.0, 2001)


def _make_template() -> np.ndarray:
    k = np.arange(1, 7)[:, None]
    # Magnitude: a sawtooth -sum(sin(2 pi k phi)/k) fades slowly and brightens suddenly (RRab);
    # with a damping that softens the sharp rise.
    m = -np.sum(np.sin(2 * np.pi * k * _TEMPLATE_PHASE[None, :]) / k * np.exp(-0.25 * (k - 1)), axis=0)
    m = m - np.mean(m[:-1])
    m = m / (m.max() - m.min())
    i_max = int(np.argmin(m[:-1]))  # maximum light = minimum magnitude
    shifted = np.roll(m[:-1], -i_max)
    return np.append(shifted, shifted[0])


_TEMPLATE_MAG = _make_template()


def pulsator_template(phase: np.ndarray) -> np.ndarray:
    """Unit peak-to-peak, zero-mean magnitude template; maximum light at phase 0.

    Parameters
    ----------
    phase
        Phases (cycles; any real value, taken modulo 1).

    Returns
    -------
    ndarray
        Magnitude offsets (mag; negative is brighter).
    """
    return np.interp(np.mod(phase, 1.0), _TEMPLATE_PHASE, _TEMPLATE_MAG)


def _phase(t: np.ndarray, t0: np.ndarray, period: np.ndarray) -> np.ndarray:
    """Phase in [-0.5, 0.5) relative to t0."""
    return np.mod((t - t0) / period + 0.5, 1.0) - 0.5


def _eclipse_profile(dphi: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    u = np.clip(1.0 - (dphi / half_width) ** 2, 0.0, None)
    return u**1.5


def delta_mag(stars: pd.DataFrame, mjd: np.ndarray) -> np.ndarray:
    """Magnitude change relative to ``mag`` for every star at every time.

    Parameters
    ----------
    stars
        Star table with the model columns documented in this module.
    mjd
        Times (days), shape (n_times,).

    Returns
    -------
    ndarray, shape (n_stars, n_times)
        ``m(t) - mag`` in magnitudes (0 for constant stars).
    """
    t = np.atleast_1d(np.asarray(mjd, dtype="float64"))[None, :]
    n = len(stars)
    out = np.zeros((n, t.shape[1]))
    cls = stars["var_class"].to_numpy()

    def col(name: str, sel: np.ndarray) -> np.ndarray:
        return stars[name].to_numpy(dtype="float64")[sel][:, None]

    sel = cls == "eclipsing_binary"
    if sel.any():
        period, t0 = col("period", sel), col("t0", sel)
        depth, ratio, ell = col("depth", sel), col("secondary_ratio", sel), col("ellipsoidal", sel)
        half_w = col("duration", sel) / period / 2.0
        ph = _phase(t, t0, period)
        flux = 1.0 - depth * _eclipse_profile(ph, half_w)
        ph2 = _phase(t, t0 + 0.5 * period, period)
        flux -= depth * ratio * _eclipse_profile(ph2, half_w)
        flux -= ell * 0.5 * (1.0 + np.cos(4 * np.pi * ph))  # ellipsoidal: minima at conjunctions
        out[sel] = -2.5 * np.log10(np.clip(flux, 1e-6, None))
    sel = cls == "pulsator"
    if sel.any():
        out[sel] = col("amplitude", sel) * pulsator_template((t - col("t0", sel)) / col("period", sel))
    sel = cls == "transit"
    if sel.any():
        period, t0, depth = col("period", sel), col("t0", sel), col("depth", sel)
        dur, ing = col("duration", sel), col("ingress_frac", sel) * col("duration", sel)
        dt = np.abs(_phase(t, t0, period) * period)
        shape = np.clip((dur / 2.0 - dt) / ing, 0.0, 1.0)  # 0 outside, ramps to 1 over ingress
        out[sel] = -2.5 * np.log10(1.0 - depth * shape)
    sel = cls == "flare"
    if sel.any():
        t0, amp, rise, decay = col("t0", sel), col("depth", sel), col("rise_days", sel), col("decay_days", sel)
        dt = t - t0
        rel = np.where(dt < -rise, 0.0, np.where(dt < 0, 1.0 + dt / rise, np.exp(-np.clip(dt, 0, None) / decay)))
        out[sel] = -2.5 * np.log10(1.0 + amp * rel)
    sel = cls == "trend"
    if sel.any():
        dt = t - col("t0", sel)
        out[sel] = col("trend_mag_per_day", sel) * dt + col("trend_mag_per_day2", sel) * dt**2
    return out


def magnitudes_at(stars: pd.DataFrame, mjd: np.ndarray | float) -> np.ndarray:
    """True magnitudes of every star at the given time(s); shape (n_stars, n_times).

    Parameters
    ----------
    stars
        Star rows with ``mag`` and the variability columns (``stars.parquet``).
    mjd
        Time or times (MJD, days).

    Returns
    -------
    ndarray
        Magnitudes (mag).
    """
    return stars["mag"].to_numpy(dtype="float64")[:, None] + delta_mag(stars, np.atleast_1d(mjd))


def assign_variables(
    rng: np.random.Generator,
    n: int,
    *,
    fractions: dict[str, float],
    t_start: float,
    t_end: float,
    eb_period_days: tuple[float, float],
    pulsator_period_days: tuple[float, float],
    transit_period_days: tuple[float, float],
    pulsator_amplitude_mag: tuple[float, float],
    eb_depth: tuple[float, float],
    transit_depth: tuple[float, float],
    transit_duration_h: tuple[float, float],
    flare_amplitude: tuple[float, float],
    trend_amplitude_mag: tuple[float, float],
) -> pd.DataFrame:
    """Draw variability classes and model parameters for ``n`` stars.

    Parameters
    ----------
    fractions
        Fraction of stars in each non-constant class (keys from :data:`VAR_CLASSES`).
    t_start, t_end
        Survey time span (MJD), used for epochs of flares/trends and reference epochs t0.

    Returns
    -------
    DataFrame with var_class, period, amplitude, t0, depth, duration, secondary_ratio,
    ellipsoidal, ingress_frac, rise_days, decay_days, trend_mag_per_day, trend_mag_per_day2.
    """
    cls = np.full(n, "constant", dtype=object)
    order = rng.permutation(n)
    start = 0
    for name in VAR_CLASSES[1:]:
        k = round(fractions.get(name, 0.0) * n)
        cls[order[start : start + k]] = name
        start += k
    nan = np.full(n, np.nan)
    cols = {c: nan.copy() for c in ("period", "amplitude", "t0", "depth", "duration", "secondary_ratio",
                                    "ellipsoidal", "ingress_frac", "rise_days", "decay_days",
                                    "trend_mag_per_day", "trend_mag_per_day2")}

    def uni(rng_: np.random.Generator, lo_hi: tuple[float, float], k: int) -> np.ndarray:
        return rng_.uniform(lo_hi[0], lo_hi[1], k)

    span = max(t_end - t_start, 1e-6)
    sel = np.flatnonzero(cls == "eclipsing_binary")
    k = len(sel)
    if k:
        lo, hi = np.log(eb_period_days[0]), np.log(eb_period_days[1])
        p = np.exp(rng.uniform(lo, hi, k))
        cols["period"][sel] = p
        cols["t0"][sel] = t_start + rng.uniform(0, 1, k) * p
        d = uni(rng, eb_depth, k)
        cols["depth"][sel] = d
        cols["secondary_ratio"][sel] = rng.uniform(0.05, 1.0, k)
        # total eclipse duration 4-12 % of the period (shorter periods: wider eclipses)
        frac = np.clip(0.12 - 0.03 * np.log10(p / 0.3), 0.04, 0.12) * rng.uniform(0.8, 1.2, k)
        cols["duration"][sel] = frac * p
        cols["ellipsoidal"][sel] = np.where(p < 1.0, rng.uniform(0.0, 0.05, k), 0.0)
        cols["amplitude"][sel] = -2.5 * np.log10(1 - d)
    sel = np.flatnonzero(cls == "pulsator")
    k = len(sel)
    if k:
        p = uni(rng, pulsator_period_days, k)
        cols["period"][sel] = p
        cols["t0"][sel] = t_start + rng.uniform(0, 1, k) * p
        cols["amplitude"][sel] = uni(rng, pulsator_amplitude_mag, k)
    sel = np.flatnonzero(cls == "transit")
    k = len(sel)
    if k:
        p = uni(rng, transit_period_days, k)
        cols["period"][sel] = p
        cols["t0"][sel] = t_start + rng.uniform(0, 1, k) * p
        d = uni(rng, transit_depth, k)
        cols["depth"][sel] = d
        cols["duration"][sel] = uni(rng, transit_duration_h, k) / 24.0
        cols["ingress_frac"][sel] = rng.uniform(0.1, 0.25, k)
        cols["amplitude"][sel] = -2.5 * np.log10(1 - d)
    sel = np.flatnonzero(cls == "flare")
    k = len(sel)
    if k:
        cols["t0"][sel] = t_start + rng.uniform(0.05, 0.9, k) * span
        a = uni(rng, flare_amplitude, k)
        cols["depth"][sel] = a
        cols["rise_days"][sel] = rng.uniform(2, 10, k) / 1440.0
        cols["decay_days"][sel] = rng.uniform(10, 90, k) / 1440.0
        cols["duration"][sel] = cols["rise_days"][sel] + 3 * cols["decay_days"][sel]
        cols["amplitude"][sel] = 2.5 * np.log10(1 + a)
    sel = np.flatnonzero(cls == "trend")
    k = len(sel)
    if k:
        amp = uni(rng, trend_amplitude_mag, k) * rng.choice([-1.0, 1.0], k)
        curv_frac = rng.uniform(-0.5, 0.5, k)  # share of the change that is quadratic
        half = span / 2.0
        cols["t0"][sel] = t_start + half
        cols["trend_mag_per_day"][sel] = amp * (1 - np.abs(curv_frac)) / span
        cols["trend_mag_per_day2"][sel] = amp * curv_frac / half**2
    out = pd.DataFrame({"var_class": cls.astype(str), **cols})
    trends = np.flatnonzero(cls == "trend")
    if len(trends):  # amplitude of a trend: the range of its quadratic over the survey span
        dm = delta_mag(out.iloc[trends], np.linspace(t_start, t_end, 257))
        out.loc[out.index[trends], "amplitude"] = dm.max(axis=1) - dm.min(axis=1)
    return out
