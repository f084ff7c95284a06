"""Recalibration of predicted magnitude uncertainties after training (a per-sigma variance scaling).

A network's predicted sigma is only as honest as its training data is like the images it
measures: on the held-out surveys the BPNN's sigma came out about twice too large for
constant stars (benchmarks/RESULTS.md, issues 6 and 21). The PNet paper recalibrates its
BPNN's uncertainties after training with isotonic regression (uncertainty-toolbox). Here
the recalibration is a *variance scaling as a function of the predicted sigma*, fitted on
whole simulated validation surveys run through the pipeline (``training/calibrate_bpnn_sigma.py``):

- the matched detections are put in bins of 0.2 dex in ``log10 sigma_pred``, neighbours
  merged until each holds 100 (so the few bright stars get bins of their own);
- in each bin the scale ``s`` is the standard deviation of ``z = delta / sigma_pred``
  after an iterative 5-sigma clip (the clipped z std the benchmarks' criterion uses; the
  clip keeps blends and mismatches from setting the width of everyone's error bar);
- ``sigma_cal = sigma_pred * s``: at the bins' median ``log10 sigma_pred`` (the knots)
  ``log10 sigma_cal`` is made non-decreasing (a star the network finds more uncertain
  never ends up with a smaller error bar) and interpolated linearly between the knots in
  ``log10 sigma_pred``; beyond them the end bins' scales apply.

Why a binned scaling rather than isotonic regression of coverage: the criterion is the
width of z per magnitude bin, which a per-sigma scale sets directly, and the result is a
dozen numbers on the model card (``sigma_calibration``) that any reader can apply. numpy
only; nothing here knows of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

CARD_KEY = "sigma_calibration"


@dataclass(frozen=True)
class SigmaCalibration:
    """``sigma_cal = sigma * scale(log10 sigma)`` (see the module docstring).

    Attributes
    ----------
    log10_sigma
        Knots: the median ``log10 sigma_pred`` (mag) of each bin, ascending.
    scale
        The scale at each knot.
    """

    log10_sigma: np.ndarray
    scale: np.ndarray

    def apply(self, sigma_mag: np.ndarray) -> np.ndarray:
        """Calibrated sigma (mag) for predicted ``sigma_mag`` (mag); NaN stays NaN.

        Between the knots ``log10 sigma_cal`` is interpolated linearly in ``log10 sigma``
        through the knots' calibrated values made non-decreasing; beyond them the end
        scales apply.
        """
        s = np.asarray(sigma_mag, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = np.log10(s)
        lg = np.maximum.accumulate(self.log10_sigma + np.log10(self.scale))
        inner = 10.0 ** np.interp(ls, self.log10_sigma, lg)
        out = np.where(ls < self.log10_sigma[0], s * 10.0 ** (lg[0] - self.log10_sigma[0]),
                       np.where(ls > self.log10_sigma[-1], s * 10.0 ** (lg[-1] - self.log10_sigma[-1]), inner))
        return np.where(np.isfinite(s), out, np.nan)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for a model card."""
        return {"log10_sigma_mag": [float(v) for v in self.log10_sigma], "scale": [float(v) for v in self.scale]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SigmaCalibration:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ValueError
            When the knots are not ascending or the lengths differ.
        """
        k = np.asarray(d["log10_sigma_mag"], float)
        s = np.asarray(d["scale"], float)
        if len(k) != len(s) or len(k) < 1 or np.any(np.diff(k) <= 0) or np.any(s <= 0):
            raise ValueError("sigma_calibration on the model card is malformed: it needs ascending "
                             "log10_sigma_mag knots and as many positive scales; refit it with "
                             "python -m training.calibrate_bpnn_sigma")
        return cls(k, s)

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> SigmaCalibration | None:
        """The card's calibration, or None when it has none."""
        d = card.get(CARD_KEY)
        return None if not d else cls.from_dict(d)


def clipped_std(z: np.ndarray, clip: float = 5.0, n_iter: int = 10) -> float:
    """Standard deviation of ``z`` after iterative ``clip``-sigma clipping about zero."""
    z = np.asarray(z, float)
    z = z[np.isfinite(z)]
    s = float(np.std(z)) if len(z) else np.nan
    for _ in range(n_iter):
        keep = np.abs(z) < clip * s
        new = float(np.sqrt(np.mean(z[keep] ** 2))) if keep.any() else np.nan
        if not np.isfinite(new) or abs(new - s) < 1e-4 * s:
            return new
        s = new
    return s


def fit_sigma_calibration(delta_mag: np.ndarray, sigma_mag: np.ndarray, width_dex: float = 0.2,
                          min_per_bin: int = 100) -> SigmaCalibration:
    """Fit the per-sigma scale on residuals ``delta_mag`` (measured − true, mag) and predicted ``sigma_mag``.

    Parameters
    ----------
    delta_mag
        Residuals (mag) of detections matched to truth.
    sigma_mag
        Their predicted uncertainties (mag).
    width_dex
        Bin width in ``log10 sigma`` (dex); neighbouring bins are merged until each holds
        ``min_per_bin`` detections (bright stars are few, faint ones many).
    min_per_bin
        Least detections per bin.

    Returns
    -------
    SigmaCalibration

    Raises
    ------
    ValueError
        With fewer than ``min_per_bin`` usable detections.
    """
    d = np.asarray(delta_mag, float)
    s = np.asarray(sigma_mag, float)
    ok = np.isfinite(d) & np.isfinite(s) & (s > 0)
    d, s = d[ok], s[ok]
    if len(d) < min_per_bin:
        raise ValueError(f"only {len(d)} detections with a finite residual and sigma (at least {min_per_bin} "
                         "needed): use larger or more validation surveys")
    ls = np.log10(s)
    # bins of width_dex in log10 sigma, neighbours merged until each holds min_per_bin
    edges = np.arange(np.floor(ls.min() / width_dex) * width_dex, ls.max() + width_dex, width_dex)
    counts = np.histogram(ls, edges)[0]
    groups, cur, n_cur = [], [], 0
    for i, c in enumerate(counts):
        cur.append(i)
        n_cur += c
        if n_cur >= min_per_bin:
            groups.append(cur)
            cur, n_cur = [], 0
    if cur and groups:
        groups[-1].extend(cur)
    elif cur:
        groups.append(cur)
    knots, scales = [], []
    for g in groups:
        m = (ls >= edges[g[0]]) & (ls < edges[g[-1] + 1])
        if m.sum() < min_per_bin // 2:
            continue
        knots.append(float(np.median(ls[m])))
        scales.append(clipped_std(d[m] / s[m]))
    k = np.asarray(knots)
    order = np.argsort(k)
    k, sc = k[order], np.asarray(scales)[order]
    keep = np.r_[True, np.diff(k) > 0]
    return SigmaCalibration(k[keep], sc[keep])
