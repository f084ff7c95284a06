"""Folded views and auxiliary features: the classifier's inputs (Astronet style).

For every light curve (a row of a :class:`~survey_proc.lightcurves.preprocess.LightCurveBatch`):

- **global view** (2 x 201 bins): the median-filtered relative flux folded over the whole
  phase, event at the centre; channel 0 folded at the BLS period around the BLS mid-event
  time, channel 1 at the Lomb-Scargle period around the sinusoid's minimum light
  (pulsators). Each bin is the weighted mean of its kept points; empty bins are linearly
  interpolated from their neighbours (circularly).
- **local view** (1 x 61 bins): the BLS fold within +-2 durations of the event (at most
  +-half a period); empty bins are linearly interpolated (the edges take the nearest bin).
- Each view is normalised as in Astronet: median 0, minimum -1 (a view whose minimum is
  not below its median is only centred). The amplitude is not lost: it is an auxiliary
  feature.
- **auxiliary features** (:data:`AUX_NAMES`, 19): the BLS and LS periods and their ratio,
  the duty cycle (duration / period), the BLS depth and its S/N, the BLS SDE, the LS power,
  amplitude and amplitude S/N, the secondary-eclipse and odd-even depth S/N, the
  variability statistics (:func:`~survey_proc.lightcurves.preprocess.variability_stats`),
  the median magnitude, the fractions of kept and clipped points and the fraction of kept
  points inside the BLS box. Logarithms and ``arcsinh`` keep them of order 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from survey_proc.lightcurves.periodogram import BLSResult, LSResult
from survey_proc.lightcurves.preprocess import LightCurveBatch

GLOBAL_BINS = 201
LOCAL_BINS = 61
LOCAL_HALF_WIDTH_DURATIONS = 2.0

AUX_NAMES = (
    "log_period_bls", "log_period_ls", "log_duty_cycle", "depth_snr", "depth_pct", "log_sde", "ls_power",
    "ls_amp_snr", "ls_amp_pct", "secondary_snr", "odd_even_snr", "log_chi2_red", "von_neumann", "log_robust_rms",
    "mag", "kept_fraction", "log2_period_ratio", "clipped_fraction", "box_fraction",
)


def _binned(phase_bins: np.ndarray, values: np.ndarray, weights: np.ndarray, n_bins: int) -> np.ndarray:
    """Weighted mean per (row, bin); ``phase_bins`` (n, n_t) integer, -1 = not used. Empty bins NaN."""
    n = values.shape[0]
    use = (phase_bins >= 0) & (weights > 0)
    idx = (np.arange(n)[:, None] * n_bins + phase_bins)[use]
    sw = np.bincount(idx, weights[use], minlength=n * n_bins).reshape(n, n_bins)
    swy = np.bincount(idx, (weights * values)[use], minlength=n * n_bins).reshape(n, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sw > 0, swy / sw, np.nan)


def _fill_circular(v: np.ndarray) -> np.ndarray:
    """Fill NaN bins by linear interpolation along each row, wrapping around; all-NaN rows become 0."""
    out = v.copy()
    nb = v.shape[1]
    x = np.arange(nb)
    for i in np.flatnonzero(np.isnan(v).any(axis=1)):
        ok = np.isfinite(v[i])
        if not ok.any():
            out[i] = 0.0
            continue
        xs = np.r_[x[ok] - nb, x[ok], x[ok] + nb]
        ys = np.r_[v[i, ok], v[i, ok], v[i, ok]]
        out[i, ~ok] = np.interp(x[~ok], xs, ys)
    return out


def _fill_linear(v: np.ndarray) -> np.ndarray:
    """Fill NaN bins by linear interpolation along each row (edges: nearest); all-NaN rows become 0."""
    out = v.copy()
    x = np.arange(v.shape[1])
    for i in np.flatnonzero(np.isnan(v).any(axis=1)):
        ok = np.isfinite(v[i])
        out[i] = np.interp(x, x[ok], v[i, ok]) if ok.any() else 0.0
    return out


def _normalise(v: np.ndarray) -> np.ndarray:
    med = np.median(v, axis=1, keepdims=True)
    v = v - med
    depth = -v.min(axis=1, keepdims=True)
    return (v / np.where(depth > 1e-12, depth, 1.0)).astype(np.float32)


def fold_phase(t_days: np.ndarray, period_days: np.ndarray, t0_days: np.ndarray) -> np.ndarray:
    """Phase in [-0.5, 0.5) of every epoch for every curve, 0 at ``t0``: shape (n, n_t).

    Parameters
    ----------
    t_days
        Epoch times (days), shape (n_t,).
    period_days, t0_days
        Period and reference time (days) per curve, shape (n,).

    Returns
    -------
    ndarray
        Phases (cycles).
    """
    return np.mod((t_days[None, :] - t0_days[:, None]) / period_days[:, None] + 0.5, 1.0) - 0.5


def global_view(batch: LightCurveBatch, period_days: np.ndarray, t0_days: np.ndarray,
                n_bins: int = GLOBAL_BINS) -> np.ndarray:
    """(n, n_bins) folded, binned, filled and normalised view over the whole phase.

    Parameters
    ----------
    batch
        Preprocessed light curves.
    period_days, t0_days
        Folding period and event time (days) per curve.
    n_bins
        Phase bins.

    Returns
    -------
    ndarray
        Normalised view (float32).
    """
    ph = fold_phase(batch.t_days, period_days, t0_days)
    bins = np.minimum(((ph + 0.5) * n_bins).astype(np.int64), n_bins - 1)
    v = _binned(bins, batch.y_smooth.astype(float), batch.w.astype(float), n_bins)
    return _normalise(_fill_circular(v))


def local_view(batch: LightCurveBatch, period_days: np.ndarray, t0_days: np.ndarray, duration_days: np.ndarray,
               n_bins: int = LOCAL_BINS, half_width_durations: float = LOCAL_HALF_WIDTH_DURATIONS) -> np.ndarray:
    """(n, n_bins) view of +-``half_width_durations`` durations around the event.

    Parameters
    ----------
    batch
        Preprocessed light curves.
    period_days, t0_days, duration_days
        Folding period, event time and event duration (days) per curve.
    n_bins
        Bins over the window.
    half_width_durations
        Half-width of the window (durations), at most half a period.

    Returns
    -------
    ndarray
        Normalised view (float32).
    """
    ph = fold_phase(batch.t_days, period_days, t0_days)
    dt = ph * period_days[:, None]  # days from the event
    half = np.minimum(half_width_durations * duration_days, 0.5 * period_days)[:, None]
    b = np.floor((dt + half) / (2 * half) * n_bins).astype(np.int64)
    b = np.where((b >= 0) & (b < n_bins), b, -1)
    v = _binned(b, batch.y_smooth.astype(float), batch.w.astype(float), n_bins)
    return _normalise(_fill_linear(v))


def _box_depth(batch: LightCurveBatch, inside: np.ndarray, outside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted depth (mean outside - mean inside, relative flux) and its error per row."""
    w = batch.w.astype(float)
    y = batch.y.astype(float)
    wi, wo = np.where(inside, w, 0.0), np.where(outside, w, 0.0)
    ri, ro = wi.sum(1), wo.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = (wo * y).sum(1) / ro - (wi * y).sum(1) / ri
        e = np.sqrt(1.0 / ri + 1.0 / ro)
    ok = (ri > 0) & (ro > 0)
    return np.where(ok, d, 0.0), np.where(ok, e, np.inf)


def eclipse_tests(batch: LightCurveBatch, bls: BLSResult) -> tuple[np.ndarray, np.ndarray]:
    """S/N of a secondary eclipse at phase 0.5, and of the odd-even difference of the primary depths.

    Returns
    -------
    secondary_snr, odd_even_snr (n,)
        ``depth_secondary / err`` and ``(depth_odd - depth_even) / err``.

    Parameters
    ----------
    batch
        Preprocessed light curves.
    bls
        Their BLS results (period, mid-event time and duration).
    """
    P, t0, D = bls.period_days, bls.t0_days, bls.duration_days
    ph = fold_phase(batch.t_days, P, t0)
    half_q = (0.5 * D / P)[:, None]
    prim = np.abs(ph) < half_q
    sec = np.abs(np.abs(ph) - 0.5) < half_q
    out = ~prim & ~sec
    d2, e2 = _box_depth(batch, sec, out)
    cycle = np.floor((batch.t_days[None, :] - t0[:, None]) / P[:, None] + 0.5).astype(np.int64)
    odd = prim & (cycle % 2 == 1)
    even = prim & (cycle % 2 == 0)
    do, eo = _box_depth(batch, odd, out)
    de, ee = _box_depth(batch, even, out)
    with np.errstate(invalid="ignore"):
        oe = np.where(np.isfinite(eo) & np.isfinite(ee), (do - de) / np.hypot(eo, ee), 0.0)
    return np.where(np.isfinite(e2), d2 / e2, 0.0), oe


def make_inputs(batch: LightCurveBatch, bls: BLSResult, ls: LSResult, stats: pd.DataFrame,
                use_magnitude: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classifier's inputs: global (n, 2, 201), local (n, 1, 61), aux (n, len(AUX_NAMES)) float32.

    Parameters
    ----------
    batch
        Preprocessed light curves.
    bls, ls
        Their BLS and LS results.
    stats
        :func:`~survey_proc.lightcurves.preprocess.variability_stats` of the batch.
    use_magnitude
        False: the ``mag`` feature is 0 for every curve (models trained without it, issue 22:
        no class may depend on the magnitude; the card's ``inputs.magnitude``).

    Returns
    -------
    global, local, aux
        The views and the auxiliary features, one row per curve.
    """
    g_bls = global_view(batch, bls.period_days, bls.t0_days)
    g_ls = global_view(batch, ls.period_days, ls.t_min_days)
    loc = local_view(batch, bls.period_days, bls.t0_days, bls.duration_days)
    sec, oe = eclipse_tests(batch, bls)
    n_t = len(batch.t_days)
    wsum = batch.w.astype(float).sum(1)
    with np.errstate(all="ignore"):
        amp_snr = ls.amplitude * np.sqrt(np.maximum(wsum, 0) / 2.0)
        aux = np.c_[
            np.log10(bls.period_days), np.log10(ls.period_days), np.log10(bls.duration_days / bls.period_days),
            np.arcsinh(bls.depth / bls.depth_err / 5.0), np.arcsinh(100 * bls.depth),
            np.log10(1.0 + np.maximum(bls.sde, 0.0)), ls.power, np.arcsinh(amp_snr / 5.0),
            np.arcsinh(100 * ls.amplitude), np.arcsinh(sec / 3.0), np.arcsinh(oe / 3.0),
            np.log10(np.clip(stats["chi2_red"].to_numpy(float), 1e-3, 1e6)),
            np.clip(stats["von_neumann"].to_numpy(float), 0.0, 3.0),
            np.log10(np.clip(stats["robust_rms"].to_numpy(float), 1e-5, 10.0)),
            (batch.mag_median - 22.0) / 3.0 if use_magnitude else np.zeros(len(batch)), batch.n_points / n_t,
            np.clip(np.log2(ls.period_days / bls.period_days), -3, 3), batch.n_clipped / n_t,
            bls.n_in / np.maximum(batch.n_points, 1),
        ]
    aux = np.nan_to_num(aux, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    return np.stack([g_bls, g_ls], 1), loc[:, None, :], aux
