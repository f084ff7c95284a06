"""The periodic-variable classifier: an Astronet-style local/global CNN, and the classify step.

Model (plain PyTorch; nothing here knows about Dask or the output layout)
-------------------------------------------------------------------------
Astronet's ``local_global`` shape (Shallue & Vanderburg 2018), scaled from 2001/201 bins to
the CSST 201/61-bin views:

- global column on (2, 201) (the BLS and LS folds, :mod:`~survey_proc.lightcurves.views`):
  3 blocks of [conv1d k5 - ReLU - conv1d k5 - ReLU - max-pool 5, stride 2] with 16, 32, 64
  channels (Astronet: 5 blocks, 16-256 channels, on 2001 bins);
- local column on (1, 61): 2 blocks with 16, 32 channels (Astronet: 2 blocks, 16/32);
- the flattened columns and the auxiliary features (:data:`~survey_proc.lightcurves.views.AUX_NAMES`)
  go through 3 fully connected layers of 128 (Astronet: 4 of 512) with dropout, then a
  softmax over :data:`CLASSES`.

``p_periodic`` is the summed probability of the periodic classes, mapped through the card's
calibration when it has one (``calibration.p_periodic``: knots ``x`` (raw) and ``y``
(calibrated), applied piecewise linearly, :func:`apply_calibration`; checked by
:func:`check_calibration`). The shipped v2 card's map is a Platt scaling fitted on four
simulated 1000-epoch validation surveys run with the default pipeline, none a held-out one
(``training/calibrate_classifier.py``; the provenance is in the block): ``p_periodic`` then
estimates the probability that a true periodic star lies within 1 px of the object. An object
is periodic when ``p_periodic >= threshold``: the card's threshold is on the same (calibrated)
scale; for v2 it is 0.5 (a periodic star more likely than not; raw
``calibration.threshold_raw`` = 0.99827, the map being strictly increasing). Its class is
then the most probable periodic class, otherwise the more probable of ``constant`` and
``non_periodic`` (flares, trends and other aperiodic variables).

The same raw score means less with fewer points: a card may carry maps for sparser curves
(``calibration.p_periodic_by_points``: a list of ``{"max_points": N, "x": [...], "y": [...]}``,
fitted on the validation surveys' light curves cut to every k-th epoch,
``training/calibrate_classifier.py --fit-cadences``). A curve with ``n`` kept points takes the
first block (in increasing ``max_points``) with ``n <= max_points``, else the main map; the
threshold stays on the calibrated scale, so a sparse curve is called periodic when a periodic
star is as probable as for a dense one (:func:`calibrate_p_periodic`).

Reported period
---------------
- eclipsing binaries and transits: the BLS period refined by a fine BLS (:func:`refine_bls`);
  an eclipsing binary whose refined BLS fold is more likely half its orbit (its two eclipses
  folded onto each other) than the orbit has its period doubled: a likelihood ratio of the
  secondary depth at phase 0.5 and the odd/even depth difference (:func:`_folded_eclipses`);
- pulsators: the Lomb-Scargle period refined by a 3-harmonic Fourier fit (:func:`refine_fourier`).

Saying when it cannot know (issue 22)
-------------------------------------
A periodic class whose signal shows fewer than two events in the object's own span of
kept points becomes ``single_event`` (:data:`survey_proc.vocab.SINGLE_EVENT`) with period
NaN: for eclipsing binaries and transits, fewer than two cycles whose kept in-box points
show the dip (:func:`count_events`), or a period longer than the span; for pulsators, a
period longer than span / 1.15. ``n_events`` records the count (-1 where not counted).

A ``pulsator`` must also be a significant Lomb-Scargle peak: Baluev's false-alarm
probability over the searched band (:func:`ls_false_alarm`) at most ``pulsator_max_fap``
(1e-3, chosen a priori, not tuned on held-out data); otherwise the class is the more
probable of ``constant`` and ``non_periodic`` (``ls_fap`` records it; ``p_periodic`` is
left as the classifier gave it). Likewise an ``eclipsing_binary`` or ``transit`` must be a
significant box: its refined box's depth S/N (:func:`box_snr`, errors rescaled by the scatter)
at least ``eclipse_min_snr`` (7 by default, set on the validation surveys; ``box_snr``
records it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from survey_proc import model_registry
from survey_proc.lightcurves import views
from survey_proc.lightcurves.periodogram import (
    BatchedBLS,
    BatchedLS,
    BLSResult,
    LSResult,
    SearchGrid,
    search_grid,
)
from survey_proc.lightcurves.preprocess import LightCurveBatch, correlated_variability_z, variability_stats
from survey_proc.vocab import CLASSIFIER_CLASSES, PERIODIC_CLASSES, SINGLE_EVENT

if TYPE_CHECKING:
    from survey_proc.lightcurves.sparse_classifier import LoadedSparseClassifier

CLASSES = CLASSIFIER_CLASSES
PERIODIC = PERIODIC_CLASSES
DEFAULT_WEIGHTS = model_registry.default_weights("classifier")
#: a pulsator's period must fit this many times in the object's own span, else it is a ``single_event``
SINGLE_EVENT_CYCLES = 1.15


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of :class:`LocalGlobalCNN`."""

    global_channels: tuple[int, ...] = (16, 32, 64)
    local_channels: tuple[int, ...] = (16, 32)
    kernel: int = 5
    hidden: tuple[int, ...] = (128, 128, 128)
    dropout: float = 0.2
    n_aux: int = len(views.AUX_NAMES)
    global_in: int = 2
    local_in: int = 1
    global_bins: int = views.GLOBAL_BINS
    local_bins: int = views.LOCAL_BINS
    n_classes: int = len(CLASSES)


def _column(c_in: int, channels: tuple[int, ...], kernel: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv1d(c_in, c, kernel, padding=kernel // 2), nn.ReLU(),
                   nn.Conv1d(c, c, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool1d(5, stride=2)]
        c_in = c
    return nn.Sequential(*layers)


class LocalGlobalCNN(nn.Module):
    """Two convolutional columns + auxiliary features -> class logits."""

    aux_mean: torch.Tensor  # buffers (register_buffer in __init__)
    aux_std: torch.Tensor

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        self.glob = _column(cfg.global_in, cfg.global_channels, cfg.kernel)
        self.loc = _column(cfg.local_in, cfg.local_channels, cfg.kernel)
        with torch.no_grad():
            n_g = self.glob(torch.zeros(1, cfg.global_in, cfg.global_bins)).numel()
            n_l = self.loc(torch.zeros(1, cfg.local_in, cfg.local_bins)).numel()
        layers: list[nn.Module] = []
        n_in = n_g + n_l + cfg.n_aux
        for h in cfg.hidden:
            layers += [nn.Linear(n_in, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            n_in = h
        layers.append(nn.Linear(n_in, cfg.n_classes))
        self.head = nn.Sequential(*layers)
        # the aux features are standardised with the training set's moments (saved with the weights)
        self.register_buffer("aux_mean", torch.zeros(cfg.n_aux))
        self.register_buffer("aux_std", torch.ones(cfg.n_aux))

    def forward(self, g: torch.Tensor, loc: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) from global (B, 2, 201), local (B, 1, 61) and aux (B, n_aux)."""
        a = (aux - self.aux_mean) / self.aux_std
        return self.head(torch.cat([self.glob(g).flatten(1), self.loc(loc).flatten(1), a], 1))


@dataclass
class LoadedClassifier:
    """A classifier ready for inference (from :func:`survey_proc.model_registry.load`) and its threshold."""

    model: LocalGlobalCNN
    threshold: float
    card: dict
    path: str
    device: torch.device


@torch.no_grad()
def predict_proba(clf: LoadedClassifier, g: np.ndarray, loc: np.ndarray, aux: np.ndarray,
                  batch: int = 1024) -> np.ndarray:
    """Class probabilities (n, n_classes) for the inputs of :func:`views.make_inputs`."""
    out = []
    for i in range(0, len(g), batch):
        t = [torch.as_tensor(a[i:i + batch], device=clf.device) for a in (g, loc, aux)]
        out.append(torch.softmax(clf.model(*t), 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def check_calibration(cal: object) -> dict:
    """A card's ``calibration.p_periodic`` block, checked: returns it, or raises ValueError saying what is wrong.

    The block is ``{"x": [...], "y": [...]}``: at least two knots, ``x`` (raw summed periodic
    probability) strictly increasing within [0, 1], ``y`` (calibrated) non-decreasing within
    [0, 1], all finite, of equal length.
    """
    where = "classifier card calibration.p_periodic"
    if not isinstance(cal, dict) or "x" not in cal or "y" not in cal:
        raise ValueError(f"{where} must be a mapping with knot lists 'x' and 'y', got {cal!r:.80}")
    try:
        x = np.asarray(cal["x"], dtype=float)
        y = np.asarray(cal["y"], dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: knots must be numbers ({e})") from None
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"{where}: 'x' and 'y' must be flat lists of equal length >= 2 "
                         f"(got {x.shape} and {y.shape})")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{where}: knots must be finite")
    if x.min() < 0 or x.max() > 1 or y.min() < 0 or y.max() > 1:
        raise ValueError(f"{where}: knots must lie within [0, 1]")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"{where}: 'x' must be strictly increasing")
    if np.any(np.diff(y) < 0):
        raise ValueError(f"{where}: 'y' must be non-decreasing (a calibration map is monotone)")
    return cal


def calibration_of(clf: LoadedClassifier) -> dict | None:
    """The card's p_periodic calibration (``calibration.p_periodic``: ``x``, ``y`` knots, checked), or None."""
    cal = (clf.card or {}).get("calibration", {}).get("p_periodic")
    return None if cal is None else check_calibration(cal)


def cadence_calibrations_of(clf: LoadedClassifier) -> list[dict]:
    """The card's maps for sparser curves (``calibration.p_periodic_by_points``), checked, by increasing ``max_points``.

    Each is ``{"max_points": N, "x": [...], "y": [...]}`` (``x``, ``y`` as :func:`check_calibration`
    wants them; ``N`` a positive integer, each ``N`` once). ``[]`` when the card has none.
    """
    blocks = (clf.card or {}).get("calibration", {}).get("p_periodic_by_points")
    if blocks is None:
        return []
    where = "classifier card calibration.p_periodic_by_points"
    if not isinstance(blocks, list):
        raise ValueError(f"{where} must be a list of {{'max_points', 'x', 'y'}} blocks, got {blocks!r:.80}")
    out = []
    for b in blocks:
        n = b.get("max_points") if isinstance(b, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{where}: each block needs a positive integer 'max_points', got {n!r}")
        check_calibration(b)
        out.append(b)
    out.sort(key=lambda b: b["max_points"])
    if len({b["max_points"] for b in out}) != len(out):
        raise ValueError(f"{where}: 'max_points' values must differ")
    return out


def calibrate_p_periodic(p_raw: np.ndarray, calibration: dict | None, n_points: np.ndarray | None = None,
                         by_points: list[dict] | None = None) -> np.ndarray:
    """Calibrated p_periodic: each curve's map chosen by its number of kept points (see the module docstring).

    Parameters
    ----------
    p_raw
        (n,) raw summed periodic probabilities.
    calibration
        The main map (``{"x", "y"}``) or None (raw scores stay raw where no sparse map applies).
    n_points
        (n,) kept points of each curve; None: the main map for all.
    by_points
        :func:`cadence_calibrations_of`'s blocks, by increasing ``max_points``.
    """
    p_raw = np.asarray(p_raw, float)
    out = apply_calibration(p_raw, calibration).astype(float)
    if n_points is None or not by_points:
        return out
    n_points = np.asarray(n_points)
    todo = np.ones(len(p_raw), bool)
    for b in by_points:
        sel = todo & (n_points <= b["max_points"])
        out[sel] = apply_calibration(p_raw[sel], b)
        todo &= ~sel
    return out


def apply_calibration(p_raw: np.ndarray, calibration: dict | None) -> np.ndarray:
    """Map raw summed periodic probabilities through the card's calibration (piecewise linear between knots).

    Below the first knot and above the last the map is flat (numpy's ``interp``); ``None``
    returns ``p_raw`` unchanged.
    """
    if not calibration:
        return np.asarray(p_raw)
    return np.interp(np.asarray(p_raw, float), np.asarray(calibration["x"], float),
                     np.asarray(calibration["y"], float))


def decide(prob: np.ndarray, threshold: float, calibration: dict | None = None,
           n_points: np.ndarray | None = None, by_points: list[dict] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p_periodic, class name, class probability) per row of ``prob`` (see the module docstring).

    ``calibration`` (the card's isotonic map, ``{"x": [...], "y": [...]}``) maps the summed
    periodic probability to a calibrated one (piecewise linear between the knots); the
    threshold is then on the calibrated scale. ``n_points`` (kept points per row) and
    ``by_points`` (the card's maps for sparser curves) choose a map per row
    (:func:`calibrate_p_periodic`).
    """
    idx = {c: i for i, c in enumerate(CLASSES)}
    per = [idx[c] for c in PERIODIC]
    non = [idx["constant"], idx["non_periodic"]]
    p_per = prob[:, per].sum(1)
    if calibration or by_points:
        p_per = calibrate_p_periodic(p_per, calibration, n_points, by_points)
    is_per = p_per >= threshold
    k = np.where(is_per, np.array(per)[prob[:, per].argmax(1)], np.array(non)[prob[:, non].argmax(1)])
    names = np.array(CLASSES, dtype=object)[k]
    return p_per, names, prob[np.arange(len(prob)), k]


def refine_bls(t_days: np.ndarray, y: np.ndarray, w: np.ndarray, period_days: float, duration_days: float,
               coarse: SearchGrid, n_freq: int = 81, bins_per_duration: int = 8) -> tuple[float, float, float]:
    """Refine one BLS peak; returns (period, duration, t0) in days.

    A fine frequency grid over +-2 coarse steps, a phase grid of ``bins_per_duration`` bins
    per duration.
    """
    f0 = 1.0 / period_days
    if len(coarse.bls_freq) > 1:  # the coarse grid's local step (it grows with f above q_min / duration_min)
        i = int(np.clip(np.searchsorted(coarse.bls_freq, f0), 1, len(coarse.bls_freq) - 1))
        step = float(coarse.bls_freq[i] - coarse.bls_freq[i - 1])
    else:
        step = 0.01 * f0
    freq = np.linspace(max(f0 - 2 * step, 0.5 * f0), f0 + 2 * step, n_freq)
    nb = int(np.clip(round(bins_per_duration * period_days / max(duration_days, 1e-6)), 32, 1024))
    k = bins_per_duration
    widths = tuple(sorted({max(1, round(k * s)) for s in (0.5, 0.75, 1.0, 1.25, 1.5)}))
    grid = SearchGrid(freq, coarse.ls_freq, nb, widths, 0.0, 1 / freq.max(), 1 / freq.min(), coarse.baseline_days,
                      coarse.cadence_days)
    r = BatchedBLS(t_days, grid, min_points_in_box=3)(y[None, :], w[None, :])
    if not np.isfinite(r.period_days[0]) or r.power[0] <= 0:
        return period_days, duration_days, float("nan")
    return float(r.period_days[0]), float(r.duration_days[0]), float(r.t0_days[0])


def refine_fourier(t_days: np.ndarray, y: np.ndarray, w: np.ndarray, period_days: float, coarse: SearchGrid,
                   n_harmonics: int = 6, n_freq: int = 81) -> float:
    """Refine one LS period by a weighted ``n_harmonics`` Fourier fit over +-2 LS grid steps."""
    keep = w > 0
    t, yy, sw = t_days[keep], y[keep], np.sqrt(w[keep])
    f0 = 1.0 / period_days
    step = float(coarse.ls_freq[1] - coarse.ls_freq[0]) if len(coarse.ls_freq) > 1 else 0.01 * f0
    best, f_best = np.inf, f0
    for f in np.linspace(f0 - 2 * step, f0 + 2 * step, n_freq):
        arg = 2 * np.pi * f * t
        cols = [np.ones_like(t)] + [fn(h * arg) for h in range(1, n_harmonics + 1) for fn in (np.cos, np.sin)]
        A = np.stack(cols, 1) * sw[:, None]
        coef, *_ = np.linalg.lstsq(A, yy * sw, rcond=None)
        chi2 = float(np.sum((A @ coef - yy * sw) ** 2))
        if chi2 < best:
            best, f_best = chi2, f
    return 1.0 / f_best


#: BLS folds a binary's two eclipses onto half the orbit when the secondary is deeper than
#: this fraction of the primary: (1 + r) / 2 * sqrt(2) > 1, the box S/N of both eclipses at P/2
#: against the primary alone at P
FOLD_RATIO = np.sqrt(2.0) - 1.0
#: the shallowest secondary counted on (fraction of the primary's depth): the simulator's lower
#: bound (``secondary_ratio`` ~ U(0.05, 1)); without one, "no secondary and equal odd/even depths"
#: at high S/N is as well explained by a dark companion (r ~ 0) as by twins (r ~ 1)
SECONDARY_RATIO_MIN = 0.05


def _folded_eclipses(one: LightCurveBatch, period: float, duration: float, t0: float) -> bool:
    """True when an eclipsing binary's BLS period is more likely half its orbit than the orbit.

    Two hypotheses for the refined BLS fold at ``period`` (P_b), compared by their marginal
    likelihoods (equal prior odds) on three box depths measured at P_b, in S/N units with the
    errors rescaled by the out-of-eclipse scatter when it exceeds them:

    - **H1, P_b is the orbit**: the secondary at phase 0.5 has depth r x the primary's with
      r uniform on [:data:`SECONDARY_RATIO_MIN`, :data:`FOLD_RATIO`] (a deeper secondary would
      have made BLS fold the eclipses, so r is below it), plus a non-negative ellipsoidal dimming (conjunction);
      the odd and even primary events are equal (difference ~ N(0, 1)).
    - **H2, the orbit is 2 P_b** (both eclipses folded): phase 0.5 of P_b is quadrature, so
      nothing there but a non-negative ellipsoidal brightening; the odd and even events are
      the two eclipses, whose depths differ by 2 (1 - r) / (1 + r) x the folded depth, r
      uniform on [:data:`FOLD_RATIO`, 1].

    The ellipsoidal term is uniform on [0, max(1, 0.5 x the primary S/N)] in both.

    The earlier rule ("no secondary at S/N >= 3: double") was measured on bright binaries of
    the training survey; on weak ones (primary S/N ~ 10, secondary 0.1-0.25 of it) a secondary
    is never at S/N 3, and real orbits were doubled (RESULTS.md, issue 22, sixth session).
    An absent secondary is evidence of folding only when the primary is strong enough to have
    shown it, and equal odd/even depths are evidence against folding.
    """
    from scipy.stats import norm

    ph = views.fold_phase(one.t_days, np.array([period]), np.array([t0]))
    half_q = 0.5 * duration / period
    prim = np.abs(ph) < half_q
    sec = np.abs(np.abs(ph) - 0.5) < half_q
    out = ~prim & ~sec
    d1, e1 = (float(v[0]) for v in views._box_depth(one, prim, out))
    d2, e2 = (float(v[0]) for v in views._box_depth(one, sec, out))
    cycle = np.floor((one.t_days[None, :] - t0) / period + 0.5).astype(np.int64)
    do, eo = (float(v[0]) for v in views._box_depth(one, prim & (cycle % 2 == 1), out))
    de, ee = (float(v[0]) for v in views._box_depth(one, prim & (cycle % 2 == 0), out))
    if not (np.isfinite(e1) and e1 > 0):
        return False
    scale = _error_scale(one.y[0].astype(float), one.w[0].astype(float), out[0] & (one.w[0] > 0))
    z1 = d1 / e1 / scale
    # the integrals over r and the ellipsoidal term e, on grids of <= 0.1 S/N unit steps
    e_max = max(1.0, 0.5 * abs(z1))
    ell = np.linspace(0.0, e_max, int(min(20000, max(50, np.ceil(e_max / 0.1)))) + 1)
    l1 = l2 = 1.0
    if np.isfinite(e2):
        z2 = d2 / e2 / scale
        k = abs(z1) * e1 / e2  # the secondary's S/N per unit r
        lo, hi = k * SECONDARY_RATIO_MIN, max(k * FOLD_RATIO, k * SECONDARY_RATIO_MIN + 1e-9)
        # H1: mean over r in [SECONDARY_RATIO_MIN, FOLD_RATIO] of phi(z2 - k r - e), analytic in r
        l1 *= float(np.mean((norm.cdf(z2 - ell - lo) - norm.cdf(z2 - ell - hi)) / (hi - lo)))
        l2 *= float(np.mean(norm.pdf(z2 + ell)))
    if np.isfinite(eo) and np.isfinite(ee):
        s_oe = float(np.hypot(eo, ee)) * scale
        zoe = (do - de) / s_oe
        b = abs(d1) / s_oe
        # H2: u = 2 (1 - r) / (1 + r) from 0 (r = 1) to u_max (r = FOLD_RATIO); dr = 4 du / (2 + u)^2
        u_max = 2.0 * (1.0 - FOLD_RATIO) / (1.0 + FOLD_RATIO)
        u = np.linspace(0.0, u_max, int(min(20000, max(200, np.ceil(u_max * b / 0.1)))) + 1)
        dens = 4.0 / (2.0 + u) ** 2 / (1.0 - FOLD_RATIO)  # the density of u under r ~ U[FOLD_RATIO, 1]
        f = 0.5 * (norm.pdf(zoe - b * u) + norm.pdf(zoe + b * u)) * dens
        l1 *= float(norm.pdf(zoe))
        l2 *= float(np.sum(0.5 * (f[1:] + f[:-1]) * np.diff(u)))
    return bool(l2 > l1)


def box_snr(t_days: np.ndarray, y: np.ndarray, w: np.ndarray, period_days: float, t0_days: float,
            duration_days: float) -> float:
    """S/N of a box's depth: (weighted mean outside - inside) / its error, the errors rescaled by the scatter.

    The error is that of the two weighted means, times ``max(1, sqrt(chi^2 / dof))`` of the
    points outside the boxes about their mean (errors too small for the scatter do not make a
    dip significant). 0 when the box holds no kept point.

    Parameters
    ----------
    t_days
        Epoch times (days).
    y, w
        Relative flux and weights (inverse variance; 0 = no point) of one curve.
    period_days, t0_days, duration_days
        The box: period, mid-event time (days, same origin as ``t_days``) and duration (days).

    Returns
    -------
    float
    """
    keep = w > 0
    if not (np.isfinite(period_days) and period_days > 0 and np.isfinite(t0_days)) or keep.sum() < 3:
        return 0.0
    t, yy, ww = t_days[keep], y[keep], w[keep]
    ph = (t - t0_days) / period_days
    inside = np.abs(ph - np.round(ph)) * period_days < 0.5 * duration_days
    if not inside.any() or inside.sum() == len(t) or (~inside).sum() < 3:
        return 0.0
    wi, wo = ww[inside], ww[~inside]
    mo = float(np.sum(wo * yy[~inside]) / np.sum(wo))
    mi = float(np.sum(wi * yy[inside]) / np.sum(wi))
    err = np.sqrt(1.0 / np.sum(wi) + 1.0 / np.sum(wo)) * _error_scale(yy, ww, ~inside)
    return float((mo - mi) / err)


def _error_scale(y: np.ndarray, w: np.ndarray, outside: np.ndarray) -> float:
    """``max(1, sqrt(chi^2 / dof))`` of the kept points ``outside`` a box about their weighted mean.

    The factor by which errors too small for the scatter are enlarged (:func:`box_snr`,
    :func:`_folded_eclipses`); 1 with fewer than 3 such points.
    """
    o = outside & (w > 0)
    if o.sum() < 3:
        return 1.0
    wo, yo = w[o], y[o]
    mo = float(np.sum(wo * yo) / np.sum(wo))
    return max(1.0, float(np.sqrt(np.sum(wo * (yo - mo) ** 2) / (len(wo) - 1))))


def count_events(t_days: np.ndarray, y: np.ndarray, w: np.ndarray, period_days: float, t0_days: float,
                 duration_days: float, min_snr: float = 1.0, rel_snr: float = 0.3) -> int:
    """The number of distinct events (cycles) whose kept points show the box's dip.

    Each cycle ``round((t - t0) / P)`` with kept points inside the box (``|t - t0 - k P| <
    duration / 2``) gives a depth ``d_k`` (weighted mean outside the boxes minus inside, relative
    flux) and its S/N. A cycle counts when its S/N is at least ``max(min_snr, rel_snr x`` the
    largest one's): one deep event and noise elsewhere is one event, however the period folds
    it; a shallow signal repeated in many cycles counts every cycle.

    Parameters
    ----------
    t_days
        Epoch times (days).
    y, w
        Relative flux and weights (inverse variance; 0 = no point) of one curve.
    period_days, t0_days, duration_days
        The box: period, mid-event time (days, same origin as ``t_days``) and duration (days).
    min_snr, rel_snr
        The S/N thresholds above.

    Returns
    -------
    int
        The events that show the dip (0 when the box holds no kept point).
    """
    if not (np.isfinite(period_days) and np.isfinite(t0_days) and period_days > 0):
        return 0
    keep = w > 0
    t, yy, ww = t_days[keep], y[keep], w[keep]
    cyc = np.round((t - t0_days) / period_days)
    inside = np.abs(t - t0_days - cyc * period_days) < 0.5 * duration_days
    if not inside.any() or inside.all():
        return 0
    out_mean = float(np.sum(ww[~inside] * yy[~inside]) / np.sum(ww[~inside]))
    ks, inv = np.unique(cyc[inside], return_inverse=True)
    sw = np.bincount(inv, ww[inside], minlength=len(ks))
    swy = np.bincount(inv, ww[inside] * yy[inside], minlength=len(ks))
    snr = (out_mean - swy / sw) * np.sqrt(sw)
    top = float(snr.max())
    if top <= 0:
        return 0
    return int(np.sum(snr >= max(min_snr, rel_snr * top)))


def search(batch: LightCurveBatch, grid: SearchGrid, device: torch.device | str | None = None,
           stats: pd.DataFrame | None = None, bls_batch: int = 16, use_magnitude: bool = True
           ) -> tuple[BLSResult, LSResult, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """BLS and LS of every curve of ``batch`` and the classifier's inputs (global, local, aux)."""
    stats = variability_stats(batch) if stats is None else stats
    bls = BatchedBLS(batch.t_days, grid, device=device)(batch.y, batch.w, batch=bls_batch)
    ls = BatchedLS(batch.t_days, grid, device=device)(batch.y, batch.w)
    return bls, ls, views.make_inputs(batch, bls, ls, stats, use_magnitude=use_magnitude)


def uses_magnitude(clf: LoadedClassifier) -> bool:
    """Whether the model takes the magnitude feature: its card's ``inputs.magnitude`` (default true, model v2)."""
    return bool((clf.card or {}).get("inputs", {}).get("magnitude", True))


def ls_false_alarm(t_days: np.ndarray, y: np.ndarray, w: np.ndarray, power: float, fmax: float) -> float:
    """Baluev (2008) false-alarm probability of a Lomb-Scargle peak of ``power`` (standard normalisation).

    Parameters
    ----------
    t_days
        Epoch times (days).
    y, w
        Relative flux and weights (inverse variance; 0 = no point) of one curve.
    power
        The peak's power (0..1).
    fmax
        The highest frequency searched (1/day).

    Returns
    -------
    float
        The probability that white noise with these times and errors gives a peak this high
        anywhere in the searched band (astropy's ``method="baluev"``).
    """
    from astropy.timeseries.periodograms.lombscargle._statistics import false_alarm_probability

    keep = w > 0
    if keep.sum() < 5 or not np.isfinite(power):
        return 1.0
    return float(false_alarm_probability(np.array([power]), fmax, t_days[keep], y[keep], 1 / np.sqrt(w[keep]),
                                         normalization="standard", method="baluev")[0])


def classify(batch: LightCurveBatch, clf: LoadedClassifier, grid: SearchGrid | None = None,
             bls_batch: int = 16, pulsator_max_fap: float = 1e-3, eclipse_min_snr: float = 0.0,
             sparse: LoadedSparseClassifier | None = None,
             sparse_span_days: float = 30.0, sparse_others: Mapping[Any, list] | None = None,
             sparse_others_unclipped: Mapping[Any, list] | None = None,
             non_periodic_min_z: float = 0.0) -> pd.DataFrame:
    """Search, classify and measure every usable light curve of ``batch``.

    ``non_periodic_min_z``: a curve the CNN labels ``non_periodic`` whose von Neumann ratio lies
    fewer than this many white-noise spreads below 2
    (:func:`~survey_proc.lightcurves.preprocess.correlated_variability_z`) is labelled
    ``constant`` (no evidence of variability correlated in time; 0: no test). The sparse route
    has its own (its card's, :data:`~survey_proc.lightcurves.sparse_classifier.NON_PERIODIC_MIN_Z`).

    With ``sparse`` (:mod:`survey_proc.lightcurves.sparse_classifier`), the curves whose kept
    points span more than ``sparse_span_days`` are classified by it (outside the CNN's
    training cadence); their ``prob_transit`` is NaN and ``sparse`` True. ``sparse_others``
    maps an object_id to its other bands' kept curves, ``(t_mjd, y, sigma)`` each: the
    sparse route searches the period in all of them jointly; ``sparse_others_unclipped``: the
    same curves with their clipped points, for a two-view sparse model
    (:mod:`~survey_proc.lightcurves.sparse_classifier`).

    Returns
    -------
    DataFrame, one row per object of the batch (unusable ones with NaN / None): object_id,
    period (days), period_power (BLS SDE for eclipsing binaries and transits, LS power for
    pulsators and the rest), depth (relative flux: BLS depth, or the LS peak-to-peak for
    pulsators), duration (days, BLS), p_periodic, var_class, var_class_prob, t0_mjd, the
    variability statistics, the class probabilities ``prob_<class>`` and ``sparse`` (which
    model classified the row).
    """
    n = len(batch)
    out = pd.DataFrame({"object_id": batch.object_id})
    for c in ("period", "period_power", "depth", "duration", "p_periodic", "var_class_prob", "t0_mjd",
              "period_bls", "period_ls", "bls_sde", "ls_power"):
        out[c] = np.nan
    out["var_class"] = pd.Series([None] * n, dtype=object)
    out["n_events"] = -1
    out["ls_fap"] = np.nan
    out["box_snr"] = np.nan
    for c in CLASSES:
        out[f"prob_{c}"] = np.nan
    stats = variability_stats(batch)
    for c in stats.columns:
        out[c] = stats[c].to_numpy()
    out["sparse"] = False
    use = np.flatnonzero(batch.usable)
    if sparse is not None and sparse_span_days > 0 and len(use):
        span_u = np.array([np.ptp(batch.t_days[batch.w[i] > 0]) for i in use])
        long_rows, use = use[span_u > sparse_span_days], use[span_u <= sparse_span_days]
        if len(long_rows):
            _fill_sparse(out, batch, long_rows, sparse, pulsator_max_fap, sparse_others, sparse_others_unclipped)
    if len(use) == 0:
        return out
    sub = batch.subset(use)
    grid = grid or search_grid(batch.t_days)
    bls, ls, (g, loc, aux) = search(sub, grid, clf.device, stats.iloc[use].reset_index(drop=True), bls_batch,
                                    use_magnitude=uses_magnitude(clf))
    prob = predict_proba(clf, g, loc, aux)
    p_per, names, p_cls = decide(prob, clf.threshold, calibration_of(clf), np.asarray(sub.n_points),
                                 cadence_calibrations_of(clf))
    # a pulsation must be a significant Lomb-Scargle peak (false-alarm probability <= pulsator_max_fap)
    fap = np.full(len(use), np.nan)
    non = [CLASSES.index("constant"), CLASSES.index("non_periodic")]
    for i in np.flatnonzero(names == "pulsator"):
        fap[i] = ls_false_alarm(batch.t_days, sub.y[i].astype(float), sub.w[i].astype(float), float(ls.power[i]),
                                float(grid.ls_freq[-1]))
        if fap[i] > pulsator_max_fap:
            k = non[int(np.argmax(prob[i, non]))]
            names[i], p_cls[i] = CLASSES[k], prob[i, k]
    period = np.where(names == "pulsator", ls.period_days, bls.period_days)
    power = np.where(names == "pulsator", ls.power, bls.sde)
    depth = np.where(names == "pulsator", 2 * ls.amplitude, bls.depth)
    duration = bls.duration_days.copy()
    t0 = np.where(names == "pulsator", ls.t_min_days, bls.t0_days)
    box = np.full(len(use), np.nan)
    for i in np.flatnonzero(np.isin(names, PERIODIC)):
        if names[i] == "pulsator":
            period[i] = refine_fourier(batch.t_days, sub.y[i].astype(float), sub.w[i].astype(float), period[i], grid)
        else:
            p, d, t0i = refine_bls(batch.t_days, sub.y[i].astype(float), sub.w[i].astype(float), period[i],
                                   duration[i], grid)
            period[i], duration[i] = p, d
            if np.isfinite(t0i):
                t0[i] = t0i
            box[i] = box_snr(batch.t_days, sub.y[i].astype(float), sub.w[i].astype(float), p, t0[i], d)
            if box[i] < eclipse_min_snr:  # not a significant box: no eclipse, no transit
                k = non[int(np.argmax(prob[i, non]))]
                names[i], p_cls[i] = CLASSES[k], prob[i, k]
                period[i], duration[i], t0[i] = bls.period_days[i], bls.duration_days[i], bls.t0_days[i]
                continue
            if names[i] == "eclipsing_binary" and _folded_eclipses(sub.subset(np.array([i])), p, d, t0[i]):
                period[i] *= 2.0
    # non_periodic needs variability correlated in time: white noise about the mean is no evidence of any
    # (the errors are scaled to each curve's own scatter; [classify] non_periodic_min_z says why the threshold)
    if non_periodic_min_z > 0:
        vn, k_const = stats["von_neumann"].to_numpy()[use], CLASSES.index("constant")
        for i in np.flatnonzero(names == "non_periodic"):
            if not correlated_variability_z(float(vn[i]), int(sub.n_points[i])) >= non_periodic_min_z:
                names[i], p_cls[i] = CLASSES[k_const], prob[i, k_const]
    # can it know? Fewer than two events (boxes) or 1.15 cycles (pulsators) in the object's own span: no period
    span = np.array([np.ptp(batch.t_days[sub.w[i] > 0]) if (sub.w[i] > 0).any() else 0.0 for i in range(len(use))])
    n_events = np.full(len(use), -1)
    for i in np.flatnonzero(np.isin(names, PERIODIC)):
        if names[i] == "pulsator":
            enough = period[i] * SINGLE_EVENT_CYCLES <= span[i]
        else:
            n_events[i] = count_events(batch.t_days, sub.y[i].astype(float), sub.w[i].astype(float), period[i], t0[i],
                                       duration[i])
            enough = n_events[i] >= 2 and period[i] <= span[i]
        if not enough:
            names[i] = SINGLE_EVENT
            period[i] = np.nan
    rows = use
    out.loc[rows, "period"] = period
    out.loc[rows, "period_power"] = power
    out.loc[rows, "depth"] = depth
    out.loc[rows, "duration"] = duration
    out.loc[rows, "p_periodic"] = p_per
    out.loc[rows, "var_class_prob"] = p_cls
    out.loc[rows, "t0_mjd"] = t0 + batch.t_ref_mjd
    out.loc[rows, "period_bls"] = bls.period_days
    out.loc[rows, "period_ls"] = ls.period_days
    out.loc[rows, "bls_sde"] = bls.sde
    out.loc[rows, "ls_power"] = ls.power
    out.loc[rows, "var_class"] = names
    out.loc[rows, "n_events"] = n_events
    out.loc[rows, "ls_fap"] = fap
    out.loc[rows, "box_snr"] = box
    for j, c in enumerate(CLASSES):
        out.loc[rows, f"prob_{c}"] = prob[:, j]
    return out


def _fill_sparse(out: pd.DataFrame, batch: LightCurveBatch, rows: np.ndarray, sparse: LoadedSparseClassifier,
                 pulsator_max_fap: float, others: Mapping[Any, list] | None = None,
                 others_unclipped: Mapping[Any, list] | None = None) -> None:
    """Rows ``rows`` of ``out`` from the sparse long-baseline classifier (:func:`classify`)."""
    from survey_proc.lightcurves.sparse_classifier import classify_sparse

    r = classify_sparse(batch, rows, sparse, pulsator_max_fap, others, others_unclipped)
    for c in ("period", "period_power", "depth", "duration", "p_periodic", "var_class_prob", "period_ls",
              "ls_power", "n_events", "ls_fap", "var_class"):
        out.loc[rows, c] = r[c].to_numpy()
    out.loc[rows, "t0_mjd"] = r["t0_days"].to_numpy() + batch.t_ref_mjd
    for c in CLASSES:
        out.loc[rows, f"prob_{c}"] = r[f"prob_{c}"].to_numpy() if f"prob_{c}" in r else np.nan
    out.loc[rows, "sparse"] = True
