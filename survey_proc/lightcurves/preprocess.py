"""Light-curve preprocessing: the CSST steps on a batch of light curves that share epochs.

All light curves of a field share its epochs, so a batch is a matrix: one row per object,
one column per epoch (time order). Missing points are NaN. The steps, per object:

1. **Rejection**: points with non-finite magnitudes or errors, ``mag_err <= 0`` or any of
   ``bad_flags`` (default :data:`~survey_proc.vocab.PHOTOMETRY_BAD`) are dropped.
2. **Normalisation**: relative flux ``y = 10**(-0.4 (mag - median)) - 1`` (0 at the median,
   -0.01 is 1 % fainter), error ``0.4 ln(10) mag_err (1 + y)``.
3. **3-sigma clipping** of isolated outliers: ``z = (y - running median) / sigma`` over
   ``clip_window_points`` consecutive epochs; points with ``|z| > clip_sigma x NMAD(z)``
   are dropped. Against a *running* median, an eclipse or a transit
   spanning more than half the window is kept: only points unlike their neighbours go.
4. **Weights**: ``w = 1 / (s sigma)^2`` with the per-object error scale ``s`` = NMAD(z) of
   step 3 (the pipeline's quoted errors are not exact); 0 for a dropped or missing point.
   Known bias: a running median of 7 absorbs part of the noise, so for white noise
   ``s`` is ~12 % low and the weighted reduced chi^2 is ~1.3, not 1. The shipped classifier
   was trained with this scale; change it (successive differences give an unbiased scale)
   only together with a retraining.
5. **Gap interpolation**: a missing or dropped point is filled by linear interpolation in
   time between its kept neighbours when they are at most ``max_gap_days`` apart, else with
   0 (the median). Filled points keep weight 0: the periodograms ignore them; the folded
   views (:mod:`~survey_proc.lightcurves.views`) see a continuous series.
6. **Median filter**: a running median of ``median_filter_points`` (3) over the filled
   series, for the views only (suppresses single-point noise before binning).

Objects with fewer than ``max(min_points, min_fraction x n_epochs)`` kept points are marked
``usable = False`` and are not searched or classified.

There is no detrending against a common mode: measured on the default survey, the
per-epoch median residual of bright stars after calibration is 0.003 mag rms, with no
epoch-to-epoch correlation, below the single-point noise of every star. Slow trends are a
class of their own (non-periodic variables) and are left in.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from survey_proc import vocab as F
from survey_proc.lightcurves.nanmedian import nanmedian_rows, nmad_rows, running_nanmedian

LN10_04 = 0.4 * np.log(10.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings (see the module docstring)."""

    clip_sigma: float = 3.0
    clip_window_points: int = 7
    max_gap_days: float = 0.5
    median_filter_points: int = 3
    min_points: int = 20
    min_fraction: float = 0.1
    bad_flags: int = F.PHOTOMETRY_BAD


@dataclass
class LightCurveBatch:
    """Preprocessed light curves on a common epoch grid.

    Attributes
    ----------
    object_id
        (n,) ids.
    t_days
        (n_t,) times relative to ``t_ref_mjd`` (days), increasing.
    t_ref_mjd
        MJD of ``t_days = 0`` (the first epoch).
    y
        (n, n_t) relative flux, gaps filled (float32).
    w
        (n, n_t) inverse variance of ``y`` (1 / relative flux^2); 0 where filled.
    y_smooth
        (n, n_t) ``y`` after the median filter (for the views).
    mag_median
        (n,) median magnitude of the kept points.
    noise_scale
        (n,) factor applied to the quoted errors (NMAD of the clipping z-scores).
    n_points
        (n,) kept points.
    n_clipped
        (n,) points dropped by the clipping.
    usable
        (n,) enough points to search.
    clipped_row, clipped_col
        (k,) row and epoch index of each point the clipping dropped (step 3).
    clipped_y, clipped_w
        (k,) its relative flux and weight (as a kept point's: ``1 / (s sigma)^2``). The
        sparse route measures a long curve with them too (:meth:`kept`, ``with_clipped``):
        against a running median of nightly points, a detached binary's eclipse points are
        the "outliers" the clip drops (RESULTS.md, issue 22).
    """

    object_id: np.ndarray
    t_days: np.ndarray
    t_ref_mjd: float
    y: np.ndarray
    w: np.ndarray
    y_smooth: np.ndarray
    mag_median: np.ndarray
    noise_scale: np.ndarray
    n_points: np.ndarray
    n_clipped: np.ndarray
    usable: np.ndarray
    clipped_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    clipped_col: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    clipped_y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    clipped_w: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.object_id)

    def kept(self, i: int, with_clipped: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Curve ``i``'s kept points (weight > 0): times (MJD, days), relative flux and its error.

        ``with_clipped``: the points the clipping dropped too (time order).
        """
        y = self.y[i].astype(float)
        w = self.w[i].astype(float)
        if with_clipped:
            at = self.clipped_row == i
            cols = self.clipped_col[at]
            y[cols] = self.clipped_y[at]
            w[cols] = self.clipped_w[at]
        keep = w > 0
        return self.t_days[keep] + self.t_ref_mjd, y[keep], 1.0 / np.sqrt(w[keep])

    def subset(self, sel: np.ndarray) -> LightCurveBatch:
        """The rows ``sel`` (boolean mask or indices).

        Parameters
        ----------
        sel
            A boolean mask or indices over the curves.

        Returns
        -------
        LightCurveBatch
            The selected curves on the same epochs.
        """
        rows = np.arange(len(self))[sel]
        new = np.full(len(self), -1)
        new[rows] = np.arange(len(rows))
        at = np.flatnonzero(new[self.clipped_row] >= 0)
        return LightCurveBatch(self.object_id[sel], self.t_days, self.t_ref_mjd, self.y[sel], self.w[sel],
                               self.y_smooth[sel], self.mag_median[sel], self.noise_scale[sel], self.n_points[sel],
                               self.n_clipped[sel], self.usable[sel], new[self.clipped_row[at]],
                               self.clipped_col[at], self.clipped_y[at], self.clipped_w[at])


def to_matrix(lc: pd.DataFrame, epochs: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pivot long-format light curves (one row per point) to (object, epoch) matrices.

    Parameters
    ----------
    lc
        Columns object_id, epoch, mjd, mag, mag_err, flags (the ``lightcurves`` schema).
    epochs
        The epochs of the grid; None: every epoch present in ``lc``.

    Returns
    -------
    object_id (n,), epochs (n_t,), mjd (n_t,), mag, mag_err (n, n_t; NaN where missing),
    flags (n, n_t; 0 where missing).
    """
    ids, obj_idx = np.unique(lc["object_id"].to_numpy(), return_inverse=True)
    ep_all = lc["epoch"].to_numpy()
    if epochs is None:
        epochs = np.unique(ep_all)
    epochs = np.asarray(epochs)
    mjd_of = pd.Series(lc["mjd"].to_numpy(), index=ep_all).groupby(level=0).first()
    mjd = mjd_of.reindex(epochs).to_numpy(float)
    col = np.searchsorted(epochs, ep_all)
    ok = (col < len(epochs)) & (epochs[np.minimum(col, len(epochs) - 1)] == ep_all)
    order = np.argsort(mjd, kind="stable")  # time order (epochs are normally already)
    epochs, mjd = epochs[order], mjd[order]
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    col = inv[np.minimum(col, len(order) - 1)]
    shape = (len(ids), len(epochs))
    mag = np.full(shape, np.nan)
    err = np.full(shape, np.nan)
    flg = np.zeros(shape, np.int32)
    mag[obj_idx[ok], col[ok]] = lc["mag"].to_numpy(float)[ok]
    err[obj_idx[ok], col[ok]] = lc["mag_err"].to_numpy(float)[ok]
    flg[obj_idx[ok], col[ok]] = lc["flags"].to_numpy()[ok]
    return ids, epochs, mjd, mag, err, flg


@contextlib.contextmanager
def _empty_slices_ok() -> Iterator[None]:
    """Silence numpy's all-NaN / empty-slice RuntimeWarnings: a row without points gives NaN, by design."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _fill_gaps(t: np.ndarray, y: np.ndarray, keep: np.ndarray, max_gap_days: float) -> np.ndarray:
    """Linear interpolation of the dropped points of each row across gaps <= ``max_gap_days``; else 0."""
    out = np.where(keep, y, 0.0)
    for i in np.flatnonzero((~keep).any(axis=1) & keep.any(axis=1)):
        k = keep[i]
        tk, yk = t[k], y[i, k]
        miss = np.flatnonzero(~k)
        j = np.searchsorted(tk, t[miss])
        lo = np.clip(j - 1, 0, len(tk) - 1)
        hi = np.clip(j, 0, len(tk) - 1)
        inside = (j > 0) & (j < len(tk)) & (tk[hi] - tk[lo] <= max_gap_days)
        out[i, miss[inside]] = np.interp(t[miss[inside]], tk, yk)
    return out


def preprocess(object_id: np.ndarray, mjd: np.ndarray, mag: np.ndarray, mag_err: np.ndarray, flags: np.ndarray,
               cfg: PreprocessConfig = PreprocessConfig()) -> LightCurveBatch:
    """Run the preprocessing steps on a batch of light curves sharing the epochs ``mjd``.

    Parameters
    ----------
    object_id
        (n,) object ids.
    mjd
        (n_t,) epoch times (MJD, days), increasing.
    mag, mag_err
        (n, n_t) calibrated magnitudes and errors (mag), NaN where missing.
    flags
        (n, n_t) flag bits of each point.
    cfg
        The settings.

    Returns
    -------
    LightCurveBatch
        The preprocessed batch.

    Raises
    ------
    ValueError
        When ``mjd`` is not strictly increasing.
    """
    mjd = np.asarray(mjd, float)
    if np.any(np.diff(mjd) <= 0):
        raise ValueError("preprocess: the epochs' mjd must be strictly increasing (sort the light curves by mjd)")
    mag = np.asarray(mag, float)
    err = np.asarray(mag_err, float)
    _n, n_t = mag.shape
    valid = np.isfinite(mag) & np.isfinite(err) & (err > 0) & ((np.asarray(flags) & cfg.bad_flags) == 0)
    m = np.where(valid, mag, np.nan)
    med = nanmedian_rows(m)
    y = 10.0 ** (-0.4 * (m - med[:, None])) - 1.0
    sig = LN10_04 * np.where(valid, err, np.nan) * (1.0 + y)
    # clipping against a running median over consecutive *kept* points is approximated by a
    # running median over epochs that ignores missing ones (the same when few are missing)
    run = running_nanmedian(y, cfg.clip_window_points)
    z = (y - run) / sig
    scale = nmad_rows(z)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    keep = valid & (np.abs(z) <= cfg.clip_sigma * scale[:, None])
    n_valid = valid.sum(axis=1)
    n_keep = keep.sum(axis=1)
    w = np.where(keep, 1.0 / np.where(keep, sig * scale[:, None], 1.0) ** 2, 0.0)
    t = mjd - mjd[0]
    yf = _fill_gaps(t, np.where(keep, y, 0.0), keep, cfg.max_gap_days)
    smooth = running_nanmedian(yf, cfg.median_filter_points) if cfg.median_filter_points > 1 else yf.copy()
    need = max(cfg.min_points, int(np.ceil(cfg.min_fraction * n_t)))
    cr, cc = np.nonzero(valid & ~keep)
    cw = 1.0 / (sig[cr, cc] * scale[cr]) ** 2
    return LightCurveBatch(np.asarray(object_id), t, float(mjd[0]), yf.astype(np.float32), w.astype(np.float32),
                           smooth.astype(np.float32), med, scale, n_keep, n_valid - n_keep, n_keep >= need,
                           cr, cc, y[cr, cc].astype(np.float32), cw.astype(np.float32))


def correlated_variability_z(eta: float, n_points: int) -> float:
    """How far a curve's von Neumann ratio lies below white noise's, in white-noise spreads.

    ``eta`` (mean squared successive difference over the variance, time-ordered points; the
    ``von_neumann`` column of :func:`variability_stats`) is 2 for white noise with a spread of
    about ``2 / sqrt(n)``; correlated variability (random walks, trends, anything slower than the
    sampling) lowers it. Returns ``(2 - eta) sqrt(n) / 2``. Both classifier routes label a curve
    ``non_periodic`` only above a threshold of it (docs/classify.md).
    """
    return float((2.0 - eta) * np.sqrt(max(n_points, 1)) / 2.0)


def variability_stats(batch: LightCurveBatch) -> pd.DataFrame:
    """Cheap variability statistics of every light curve (kept points only).

    Returns
    -------
    DataFrame (one row per object) with
    ``chi2_red`` (reduced chi^2 against the weighted mean, with the rescaled errors),
    ``robust_rms`` (NMAD of the relative flux), ``iqr`` (interquartile range of the relative
    flux) and ``von_neumann`` (mean squared successive difference over the variance: 2 for
    white noise, small for a signal correlated in time).

    Parameters
    ----------
    batch
        Preprocessed light curves.
    """
    w = batch.w.astype(float)
    y = batch.y.astype(float)
    keep = w > 0
    sw = w.sum(axis=1)
    mean = np.where(sw > 0, (w * y).sum(axis=1) / np.where(sw > 0, sw, 1), np.nan)
    k = keep.sum(axis=1)
    chi2 = (w * (y - mean[:, None]) ** 2).sum(axis=1) / np.maximum(k - 1, 1)
    yk = np.where(keep, y, np.nan)
    with _empty_slices_ok():
        q25, q75 = np.nanpercentile(yk, [25, 75], axis=1)
        rms = nmad_rows(yk)
        var = np.nanvar(yk, axis=1, ddof=1)
    # successive differences between consecutive kept points
    vn = np.full(len(y), np.nan)
    for i in range(len(y)):
        v = yk[i][keep[i]]
        if len(v) > 2 and var[i] > 0:
            vn[i] = np.mean(np.diff(v) ** 2) / var[i]
    return pd.DataFrame({"chi2_red": chi2, "robust_rms": rms, "iqr": q75 - q25, "von_neumann": vn})
