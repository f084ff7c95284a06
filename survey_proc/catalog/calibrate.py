"""Photometric calibration: per-epoch zero points against reference stars, and a cross-epoch model.

Per epoch
---------
Reference stars (a Gaia-like catalogue, or without one the stable stars of a reference
epoch) are projected into the epoch through its WCS and matched to detections within
``match_radius_px``. A star is used when its detection is unflagged (no saturated, bad,
cosmic, edge or blend flag), has S/N >= ``snr_min``, and no other detection lies within
``isolation_fwhm`` FWHM (a neighbour would add flux to the aperture correction). Of those
the ``max_stars`` brightest are kept. Each gives ``zp_i = m_ref - m_inst`` with
``m_inst = -2.5 log10(flux)`` (total flux in ADU per exposure), so ``mag = m_inst + zp``
and ``zp`` is the magnitude of a source that gives 1 ADU in the exposure.

Clipping choice. The seed papers use 50-100 stars clipped at 1 sigma. Iterated 1-sigma
clipping of Gaussian scatter discards about a third of the good stars on every pass (its
fixed point keeps ~40 %), which inflates the zero-point error by ~1.6x for no gain, and the
mean of a 1-sigma-clipped sample is biased when the outliers are one-sided (blends and
variables make stars *brighter* or fainter, not both). We clip at ``clip_sigma`` = 3
about the median with a MAD-based sigma (robust to 50 % contamination), iterate to
convergence, and take the inverse-variance weighted mean of the survivors. The error is
the larger of the weighted-mean error and ``scatter / sqrt(n)`` (the scatter includes
catalogue noise, crowding and any residual variability).

Across epochs
-------------
:func:`fit_airmass_model` fits ``zp(X) = zp0 - k (X - 1)`` to the well-calibrated epochs
of a field by iteratively clipped weighted least squares (``k``: extinction, mag per
airmass; space data with no airmass fit a constant). Epochs with fewer than ``min_stars``
usable reference stars but at least ``min_stars_fit`` (3) keep their own fit, status
``fit_few``, with the error widened to the per-star scatter (not divided by sqrt(n): a few
stars say little about the scatter's mean) and the ``ZP_FEW`` flag on their sources; a
small field with a handful of calibrators is calibrated rather than failed. Epochs with
fewer than ``min_stars_fit`` take the model's zero point, with the model's scatter as
error, and their sources get the ``ZP_MODEL`` flag.

Aperture correction across epochs
---------------------------------
An epoch whose blocks had fewer than :data:`APCORR_MIN_STARS` bright isolated stars to
measure its aperture correction takes the field's ``apcorr(FWHM)`` line
(:func:`fit_apcorr_model`), fitted by 3-sigma clipped least squares over the epochs that
measured it; :func:`rescale_aperture_photometry` applies it to a written epoch.

Everything that fits or applies a zero point lives here; the calibrate stage
(:mod:`survey_proc.stages.calibrate`) only reads units, calls these functions and writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from survey_proc import vocab as F
from survey_proc.config import CalibrationConfig

APCORR_MIN_STARS = 5  # an epoch's aperture correction counts as measured with at least this many stars
APCORR_LINE_MIN_EPOCHS = 5  # fewer measured epochs: the field's apcorr is their median, not a line in FWHM


class ZpStatus(StrEnum):
    """How an epoch's zero point was obtained (stored as its string value in records and ``epochs.parquet``)."""

    FIT = "fit"  # fitted against reference stars
    FIT_FEW = "fit_few"  # fitted on min_stars_fit..min_stars-1 stars, error widened; sources get ZP_FEW
    MODEL = "model"  # the field's cross-epoch model (too few reference stars); sources get ZP_MODEL
    FEW = "few"  # too few reference stars: awaiting the model
    PENDING = "pending"  # no reference yet (relative calibration: the ensemble fit comes later)


@dataclass
class ZeroPoint:
    """A zero point (mag for 1 ADU per exposure) and how it was obtained.

    Attributes
    ----------
    zp, zp_err
        Zero point and its error (mag); NaN when not (yet) known.
    scatter
        Robust rms of the per-star zero points (mag).
    n_used, n_candidates
        Reference stars kept after clipping, and matched before it.
    status
        A :class:`ZpStatus`.
    absolute
        False when the field's level is the nominal zero point, not a reference catalogue's
        (sources get ``ZP_RELATIVE``).
    """

    zp: float
    zp_err: float
    scatter: float
    n_used: int
    n_candidates: int
    status: ZpStatus
    absolute: bool = True

    def __post_init__(self) -> None:
        self.status = ZpStatus(self.status)

    @classmethod
    def pending(cls) -> ZeroPoint:
        """No zero point yet (relative calibration before the ensemble fit)."""
        return cls(np.nan, np.nan, np.nan, 0, 0, ZpStatus.PENDING, absolute=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZeroPoint:
        """Read :meth:`to_dict`'s form back."""
        return cls(float(d["zp"]), float(d["zp_err"]), float(d["scatter"]), int(d["n_used"]),
                   int(d["n_candidates"]), ZpStatus(d["status"]), bool(d.get("absolute", True)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (the status as its text), as stored in records."""
        return {**asdict(self), "status": str(self.status)}


def instrumental_mag(flux: np.ndarray, flux_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``-2.5 log10(flux)`` and its error (mag); NaN for non-positive flux."""
    flux = np.asarray(flux, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(flux > 0, -2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
        e = np.where(flux > 0, F.MAG_PER_FLUX * np.asarray(flux_err, float) / flux, np.nan)
    return m, e


def robust_zeropoint(dz: np.ndarray, err: np.ndarray, clip_sigma: float) -> tuple[float, float, float, int]:
    """Clipped weighted mean of per-star zero points; ``(zp, zp_err, scatter, n_used)``.

    Clipping is iterated about the median with sigma = 1.4826 MAD (floored at the median
    error so that a tight core does not clip good stars).
    """
    dz = np.asarray(dz, float)
    err = np.asarray(err, float)
    keep = np.isfinite(dz) & np.isfinite(err) & (err > 0)
    if keep.sum() == 0:
        return np.nan, np.nan, np.nan, 0
    for _ in range(10):
        med = np.median(dz[keep])
        sig = max(1.4826 * np.median(np.abs(dz[keep] - med)), float(np.median(err[keep])), 1e-4)
        new = np.isfinite(dz) & np.isfinite(err) & (err > 0) & (np.abs(dz - med) <= clip_sigma * sig)
        if new.sum() == 0 or np.array_equal(new, keep):
            break
        keep = new
    w = 1.0 / err[keep] ** 2
    zp = float(np.sum(w * dz[keep]) / np.sum(w))
    n = int(keep.sum())
    scatter = float(1.4826 * np.median(np.abs(dz[keep] - np.median(dz[keep])))) if n > 1 else float(err[keep][0])
    zp_err = max(float(1.0 / np.sqrt(np.sum(w))), scatter / np.sqrt(n))
    return zp, zp_err, scatter, n


def select_calibrators(x: np.ndarray, y: np.ndarray, snr: np.ndarray, flags: np.ndarray, ref_x: np.ndarray,
                       ref_y: np.ndarray, fwhm_px: float, cfg: CalibrationConfig,
                       flux: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(i_source, i_ref)`` of usable reference-star matches in one epoch.

    A calibrator must be unflagged, have S/N >= ``snr_min`` and be isolated: no other
    detection within ``isolation_fwhm`` x FWHM, counting (when ``flux`` is given) only
    neighbours with at least ``isolation_flux_ratio`` of its flux. A detector that finds the
    faint stars of a crowded field (PNet: ~0.02 detections/px² in the dense preset) gives
    almost every bright star a faint neighbour within 3 FWHM; one 4 mag fainter changes its
    flux by ~0.01 % in a PSF fit that subtracts it, and by < 0.3 % in a 1-FWHM aperture.

    Parameters
    ----------
    x, y, snr, flags
        The epoch's detections (pixels, S/N, flag bits).
    ref_x, ref_y
        Reference stars projected into the same pixel frame.
    flux
        The detections' fluxes (any unit); None counts every neighbour.
    """
    if len(x) == 0 or len(ref_x) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    tree = cKDTree(np.c_[x, y])
    d, i = tree.query(np.c_[ref_x, ref_y], distance_upper_bound=cfg.match_radius_px)
    has = np.isfinite(d)
    i_ref = np.flatnonzero(has)
    i_src = i[has]
    # one reference star per detection: keep the nearest
    order = np.lexsort((d[has], i_src))
    i_src, i_ref = i_src[order], i_ref[order]
    if len(i_src) == 0:  # no reference star within the match radius (e.g. a WCS tens of pixels off)
        return np.zeros(0, int), np.zeros(0, int)
    first = np.r_[True, i_src[1:] != i_src[:-1]]
    i_src, i_ref = i_src[first], i_ref[first]
    bad = F.PHOTOMETRY_BAD | F.CENTROID  # BLENDED is not excluded: isolation is tested directly
    good = ((flags[i_src] & bad) == 0) & (snr[i_src] >= cfg.snr_min)
    near = tree.query_ball_point(np.c_[x[i_src], y[i_src]], cfg.isolation_fwhm * fwhm_px)
    if flux is None:
        n_near = np.array([len(n) for n in near])
    else:
        f = np.asarray(flux, float)
        n_near = np.array([int(np.sum(f[n] >= cfg.isolation_flux_ratio * f[k]))
                           for n, k in zip(near, i_src, strict=True)])
    good &= n_near <= 1
    i_src, i_ref = i_src[good], i_ref[good]
    order = np.argsort(-snr[i_src], kind="stable")[: cfg.max_stars]
    return i_src[order], i_ref[order]


def zeropoint_status(n_used: int, min_stars: int, min_stars_fit: int) -> ZpStatus:
    """``fit`` with ``min_stars`` or more stars, ``fit_few`` with ``min_stars_fit`` or more, else ``few``."""
    if n_used >= min_stars:
        return ZpStatus.FIT
    return ZpStatus.FIT_FEW if n_used >= min_stars_fit else ZpStatus.FEW


def few_star_error(zp_err: float, scatter: float) -> float:
    """The error of a zero point fitted on few stars: at least the per-star scatter (mag)."""
    return float(np.nanmax([zp_err, scatter]))


def fit_epoch_zeropoint(mag_inst: np.ndarray, mag_inst_err: np.ndarray, ref_mag: np.ndarray,
                        ref_mag_err: np.ndarray, cfg: CalibrationConfig) -> ZeroPoint:
    """Zero point from matched calibrators (already selected): status ``fit``, ``fit_few`` or ``few``."""
    n_cand = len(mag_inst)
    err = np.hypot(mag_inst_err, ref_mag_err)
    zp, zp_err, scatter, n = robust_zeropoint(ref_mag - mag_inst, err, cfg.clip_sigma)
    status = zeropoint_status(n, cfg.min_stars, cfg.min_stars_fit)
    if status == ZpStatus.FIT_FEW:
        zp_err = few_star_error(zp_err, scatter)
    return ZeroPoint(zp, zp_err, scatter, n, n_cand, status)


def fit_airmass_model(epochs: pd.DataFrame, clip_sigma: float = 3.0) -> dict:
    """Fit ``zp = zp0 - k (airmass - 1)`` over well-calibrated epochs of one field.

    Parameters
    ----------
    epochs
        Columns ``zp``, ``zp_err``, ``airmass``, ``zp_status``.

    Returns
    -------
    dict
        ``zp0`` (mag), ``k_mag_per_airmass`` (NaN when airmass is unknown or constant),
        ``scatter`` (robust rms of the residuals, mag), ``n`` epochs used.
    """
    e = epochs[(epochs["zp_status"] == ZpStatus.FIT) & np.isfinite(epochs["zp"])]
    if len(e) == 0:
        return {"zp0": np.nan, "k_mag_per_airmass": np.nan, "scatter": np.nan, "n": 0}
    zp = e["zp"].to_numpy(float)
    err = np.maximum(e["zp_err"].to_numpy(float), 1e-4)
    X = e["airmass"].to_numpy(float)
    use_airmass = bool(np.all(np.isfinite(X)) and len(e) >= 3 and np.ptp(X) > 0.05)
    keep = np.ones(len(e), bool)
    for _ in range(10):
        w = 1.0 / err[keep] ** 2
        if use_airmass:
            A = np.c_[np.ones(keep.sum()), -(X[keep] - 1.0)]
            coef, *_ = np.linalg.lstsq(A * np.sqrt(w)[:, None], zp[keep] * np.sqrt(w), rcond=None)
            model = coef[0] - coef[1] * (X - 1.0)
        else:
            coef = np.array([np.sum(w * zp[keep]) / np.sum(w), np.nan])
            model = np.full(len(e), coef[0])
        res = zp - model
        sig = max(1.4826 * np.median(np.abs(res[keep] - np.median(res[keep]))), 1e-4)
        new = np.abs(res) <= clip_sigma * np.hypot(sig, err)
        if new.sum() < 2 or np.array_equal(new, keep):
            break
        keep = new
    return {"zp0": float(coef[0]), "k_mag_per_airmass": float(coef[1]) if use_airmass else float("nan"),
            "scatter": float(sig), "n": int(keep.sum())}


def model_zeropoint(model: dict, airmass: float) -> float:
    """The cross-epoch model's zero point at ``airmass``."""
    k = model["k_mag_per_airmass"]
    if np.isfinite(k) and np.isfinite(airmass):
        return float(model["zp0"] - k * (airmass - 1.0))
    return float(model["zp0"])


def apply_zeropoint(sources: pd.DataFrame, zp: ZeroPoint) -> pd.DataFrame:
    """Set ``mag`` and ``mag_err`` (the zero-point error added in quadrature) in place; returns it."""
    sources["mag"] = sources["mag_inst"] + zp.zp
    sources["mag_err"] = np.hypot(sources["mag_inst_err"], zp.zp_err if np.isfinite(zp.zp_err) else np.nan)
    sources["zp"] = zp.zp
    sources["flags"] = sources["flags"].to_numpy() & ~np.int32(F.ZP_MODEL | F.ZP_FEW | F.ZP_RELATIVE)  # a re-fit
    if zp.status == ZpStatus.MODEL:
        sources["flags"] = sources["flags"].to_numpy() | F.ZP_MODEL
    elif zp.status == ZpStatus.FIT_FEW:
        sources["flags"] = sources["flags"].to_numpy() | F.ZP_FEW
    if not zp.absolute:
        sources["flags"] = sources["flags"].to_numpy() | F.ZP_RELATIVE
    return sources


def internal_reference(sources: pd.DataFrame, zeropoint_nominal: float, fwhm_px: float,
                       cfg: CalibrationConfig) -> pd.DataFrame:
    """A reference catalogue from one epoch's stable-looking stars (relative calibration).

    Bright, unflagged, isolated detections of the reference epoch, with
    ``mag = mag_inst + zeropoint_nominal``. Isolated as for an external reference
    (:func:`select_calibrators`): no neighbour within ``isolation_fwhm`` FWHM with at least
    ``isolation_flux_ratio`` of the star's flux (a crowded field gives every bright star a
    faint neighbour; counting those left 0-13 stars on real crowded plates). Variables among
    them are removed by the clipping of every epoch's fit. Columns: ra, dec, x_ref, y_ref,
    mag, mag_err.
    """
    s = sources
    idx = np.arange(len(s))
    bad = F.PHOTOMETRY_BAD | F.CENTROID  # BLENDED is not excluded: isolation is tested directly
    good = ((s["flags"].to_numpy() & bad) == 0) & (s["snr"].to_numpy() >= cfg.snr_min)
    if len(s) > 1 and good.any():
        xy = np.c_[s["x"], s["y"]]
        flux = s["flux"].to_numpy(float)
        cand = np.flatnonzero(good)
        near = cKDTree(xy).query_ball_point(xy[cand], cfg.isolation_fwhm * fwhm_px)
        n_near = np.array([int(np.sum(flux[n] >= cfg.isolation_flux_ratio * flux[k]))
                           for n, k in zip(near, cand, strict=True)])
        good[cand[n_near > 1]] = False  # the star itself is one of its neighbours
    idx = idx[good]
    idx = idx[np.argsort(-s["snr"].to_numpy()[idx], kind="stable")][: cfg.max_stars]
    r = s.iloc[idx]
    return pd.DataFrame({"ra": r["ra"].to_numpy(), "dec": r["dec"].to_numpy(), "x_ref": r["x_ref"].to_numpy(),
                         "y_ref": r["y_ref"].to_numpy(), "mag": r["mag_inst"].to_numpy() + zeropoint_nominal,
                         "mag_err": r["mag_inst_err"].to_numpy()})


ENSEMBLE_FLOOR_MAG = 0.002  # added in quadrature to every ensemble measurement (flat-field, PSF systematics)


def _weighted_solution(e: np.ndarray, s: np.ndarray, m: np.ndarray, w: np.ndarray, n_e: int, n_s: int,
                       n_iter: int, tol_mag: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of ``m[i] = M[s[i]] - zp[e[i]]`` by alternating exact updates.

    Each half-step is the exact minimiser for one set of unknowns given the other
    (Gauss-Seidel on the normal equations), so the iteration converges to the
    least-squares solution on every connected set of epochs and stars. Epochs or stars
    without weight get NaN.
    """
    we = np.bincount(e, w, n_e)
    ws = np.bincount(s, w, n_s)
    with np.errstate(invalid="ignore", divide="ignore"):
        M = np.bincount(s, w * m, n_s) / ws
        zp = np.zeros(n_e)
        for _ in range(n_iter):
            zp_new = np.bincount(e, w * (M[s] - m), n_e) / we
            zp_new = np.where(we > 0, zp_new, np.nan)
            M = np.bincount(s, w * (m + np.nan_to_num(zp_new[e])), n_s) / ws
            M = np.where(ws > 0, M, np.nan)
            done = np.nanmax(np.abs(zp_new - zp)) < tol_mag if np.isfinite(zp_new).any() else True
            zp = zp_new
            if done:
                break
    return zp, M


def ensemble_zeropoints(matches: pd.DataFrame, clip_sigma: float = 3.0, min_stars: int = 10,
                        n_iter: int = 500, min_stars_fit: int | None = None,
                        floor_mag: float = ENSEMBLE_FLOOR_MAG) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Relative zero points of many epochs from the same stars (ensemble photometry, "ubercal").

    Solves ``m_inst[e, s] = M[s] - zp[e]`` for every star ``s`` seen in epoch ``e`` by
    weighted least squares (weights ``1 / (err^2 + floor_mag^2)``: the floor keeps the
    brightest stars from dominating where flat-field and PSF systematics, not photon
    noise, set their scatter), with outlier rejection repeated to convergence:

    - a measurement whose residual exceeds ``clip_sigma`` times its error (scaled by the
      robust width of all normalised residuals when the errors are too small) is dropped
      (cosmic rays, blends, a bad pixel);
    - a star whose robust scatter of normalised residuals exceeds 3 times the typical one
      (a variable, a blend that changes with seeing) is dropped as a whole.

    A plain median per epoch (the earlier solver) has ~1.25x the noise of the weighted
    mean and ignores that faint stars say less; least squares also uses every star, not
    only those seen in every epoch. Written here rather than taken from a library because
    the model is two bincounts per iteration: scipy's sparse ``lsqr`` gives the same
    solution but not the per-star rejection loop around it.

    The level is free (``M + c``, ``zp + c``); it is fixed so that the median zero point of
    the well-measured epochs is 0 (the caller adds the absolute level).

    Parameters
    ----------
    matches
        One row per (epoch, star): ``epoch``, ``star``, ``mag_inst``, ``mag_inst_err`` (mag).
    clip_sigma
        Rejection threshold for single measurements (in units of their scaled error).
    min_stars, min_stars_fit
        The star counts of :func:`zeropoint_status` (``min_stars_fit`` None: ``min_stars``,
        i.e. no few-star fits).
    n_iter
        Maximum iterations of the least-squares solution per rejection round.
    floor_mag
        Error floor added in quadrature (mag).

    Returns
    -------
    zps, stars
        Per epoch (index ``epoch``): ``zp``, ``zp_err`` (relative, mag), ``scatter``,
        ``n_used``, ``n_candidates``, ``status``; per star (index ``star``): ``mag``
        (= ``M``), ``mag_err``, ``rms`` (robust scatter of its normalised residuals), ``n``,
        ``used``.
    """
    cols = ["zp", "zp_err", "scatter", "n_used", "n_candidates", "status"]
    ok = np.isfinite(matches["mag_inst"].to_numpy(float)) & np.isfinite(matches["mag_inst_err"].to_numpy(float))
    mt = matches[ok]
    if len(mt) == 0:
        return (pd.DataFrame(columns=cols).rename_axis("epoch"),
                pd.DataFrame(columns=["mag", "mag_err", "rms", "n", "used"]).rename_axis("star"))
    epochs, e = np.unique(mt["epoch"].to_numpy(), return_inverse=True)
    stars_id, s = np.unique(mt["star"].to_numpy(), return_inverse=True)
    m = mt["mag_inst"].to_numpy(float)
    sig = np.hypot(mt["mag_inst_err"].to_numpy(float), floor_mag)
    n_e, n_s = len(epochs), len(stars_id)
    keep = np.ones(len(m), bool)
    star_ok = np.ones(n_s, bool)
    for _ in range(10):
        use = keep & star_ok[s]
        zp, M = _weighted_solution(e[use], s[use], m[use], 1.0 / sig[use] ** 2, n_e, n_s, n_iter)
        # stars left out (rejected, or all their points clipped) keep a magnitude from all their points
        out = ~np.isfinite(M)
        if out.any():
            sel = out[s] & np.isfinite(zp[e]) & keep
            with np.errstate(invalid="ignore", divide="ignore"):
                M_all = np.bincount(s[sel], (m[sel] + zp[e[sel]]) / sig[sel] ** 2, n_s) / np.bincount(
                    s[sel], 1.0 / sig[sel] ** 2, n_s)
            M = np.where(out, M_all, M)
        pull = (m + zp[e] - M[s]) / sig
        fin = np.isfinite(pull)
        width = max(1.4826 * float(np.median(np.abs(pull[use & fin]))) if (use & fin).any() else 1.0, 1.0)
        new_keep = fin & (np.abs(pull) <= clip_sigma * width)
        # a star's scatter over all its measurements (the clipped ones included: a variable's
        # extremes are clipped point by point first, which would hide it), about the star's
        # own median (robust to an offset of its mean magnitude)
        pf, sf = pull[fin], s[fin]
        star_rms = 1.4826 * _group_median(sf, np.abs(pf - _group_median(sf, pf, n_s)[sf]), n_s)
        typical = float(np.nanmedian(star_rms)) if np.isfinite(star_rms).any() else 1.0
        new_star_ok = ~(star_rms > 3.0 * max(typical, 1.0))
        if np.array_equal(new_keep, keep) and np.array_equal(new_star_ok, star_ok):
            break
        keep, star_ok = new_keep, new_star_ok
    use = keep & star_ok[s]
    w = 1.0 / sig ** 2
    res = m + zp[e] - M[s]
    n_used = np.bincount(e[use], minlength=n_e)
    chi2 = np.bincount(e[use], w[use] * res[use] ** 2, n_e)
    with np.errstate(invalid="ignore", divide="ignore"):
        red = np.where(n_used > 1, chi2 / np.maximum(n_used - 1, 1), 1.0)
        zp_err = np.sqrt(np.maximum(red, 1.0) / np.bincount(e[use], w[use], n_e))
        Merr = 1.0 / np.sqrt(np.bincount(s[use], w[use], n_s))
        Merr = np.where(star_ok, Merr, 1.0 / np.sqrt(np.bincount(s[np.isfinite(res)], w[np.isfinite(res)], n_s)))
    scatter = 1.4826 * _group_median(e[use], np.abs(res[use] - _group_median(e[use], res[use], n_e)[e[use]]), n_e)
    rows = []
    for k, ep in enumerate(epochs):
        status = zeropoint_status(int(n_used[k]), min_stars, min_stars if min_stars_fit is None else min_stars_fit)
        ze = float(zp_err[k])
        if status == ZpStatus.FIT_FEW:
            ze = few_star_error(ze, float(scatter[k]))
        z = float(zp[k]) if status != ZpStatus.FEW else np.nan
        rows.append({"epoch": ep, "zp": z, "zp_err": ze if status != ZpStatus.FEW else np.nan,
                     "scatter": float(scatter[k]), "n_used": int(n_used[k]),
                     "n_candidates": int(np.sum(e == k)), "status": str(status)})
    zps = pd.DataFrame(rows).set_index("epoch")
    stars = pd.DataFrame({"mag": M, "mag_err": Merr, "rms": star_rms, "n": np.bincount(s, minlength=n_s),
                          "used": star_ok}, index=pd.Index(stars_id, name="star"))
    fit = zps["status"] == ZpStatus.FIT
    if not fit.any():  # no epoch with min_stars: the few-star fits set the level
        fit = zps["status"] == ZpStatus.FIT_FEW
    level = float(np.median(zps.loc[fit, "zp"])) if fit.any() else 0.0
    zps["zp"] -= level
    stars["mag"] -= level  # m_inst = M - zp holds for the shifted pair
    return zps, stars


def _group_median(g: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Median of ``v`` per group index ``g`` in ``0..n-1`` (NaN for empty groups)."""
    out = np.full(n, np.nan)
    if len(g) == 0:
        return out
    order = np.lexsort((v, g))
    gs, vs = g[order], v[order]
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    ends = np.r_[starts[1:], len(gs)]
    lo, hi = (starts + ends - 1) // 2, (starts + ends) // 2
    out[gs[starts]] = 0.5 * (vs[lo] + vs[hi])
    return out


# ------------------------------------------------------------------ reference stars in a field's frame
def reference_in_frame(ref: pd.DataFrame, wcs: Any) -> pd.DataFrame:
    """A reference catalogue (ra, dec, mag, mag_err) with ``x_ref``/``y_ref`` in a field's reference frame.

    Catalogues that already carry ``x_ref``/``y_ref`` (the internal reference) are returned
    as they are; without a WCS (``wcs`` None) the positions are NaN.
    """
    from survey_proc.catalog.astrometry import world_to_pixel

    if {"x_ref", "y_ref"} <= set(ref.columns):
        return ref
    if wcs is None:
        return ref.assign(x_ref=np.nan, y_ref=np.nan)
    x, y = world_to_pixel(wcs, ref["ra"].to_numpy(), ref["dec"].to_numpy())
    return ref.assign(x_ref=x, y_ref=y)


def calibrator_matches(sources: pd.DataFrame, ref: pd.DataFrame, fwhm_px: float,
                       cfg: CalibrationConfig) -> tuple[np.ndarray, np.ndarray]:
    """:func:`select_calibrators` on a sources table and a reference, both in the reference frame.

    ``sources`` needs ``x_ref, y_ref, snr, flags, flux``; ``ref`` needs ``x_ref, y_ref``.
    Returns ``(i_source, i_ref)``.
    """
    return select_calibrators(sources["x_ref"].to_numpy(), sources["y_ref"].to_numpy(), sources["snr"].to_numpy(),
                              sources["flags"].to_numpy(), ref["x_ref"].to_numpy(), ref["y_ref"].to_numpy(),
                              fwhm_px, cfg, flux=sources["flux"].to_numpy())


def calibrate_epoch(sources: pd.DataFrame, ref: pd.DataFrame, fwhm_px: float, cfg: CalibrationConfig) -> ZeroPoint:
    """Fit one epoch's zero point (``sources`` in the reference frame) against reference stars ``ref``.

    The magnitudes are not changed: apply the result with :func:`apply_zeropoint`.
    """
    i_src, i_ref = calibrator_matches(sources, ref, fwhm_px, cfg)
    return fit_epoch_zeropoint(sources["mag_inst"].to_numpy()[i_src], sources["mag_inst_err"].to_numpy()[i_src],
                               ref["mag"].to_numpy()[i_ref], ref["mag_err"].to_numpy()[i_ref], cfg)


def reference_magnitudes(ref: pd.DataFrame, band: str, only_band: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """A reference catalogue's magnitudes and errors for ``band``; None when it has none for it.

    Columns ``mag_<band>``/``mag_err_<band>`` are used when present; otherwise the plain
    ``mag``/``mag_err`` serve when ``band`` is the survey's only band (``only_band``), since
    a single-band catalogue cannot calibrate several bands.
    """
    if band and f"mag_{band}" in ref.columns:
        err = ref[f"mag_err_{band}"] if f"mag_err_{band}" in ref.columns else pd.Series(0.02, index=ref.index)
        return ref[f"mag_{band}"].to_numpy(float), err.to_numpy(float)
    if only_band and "mag" in ref.columns:
        return ref["mag"].to_numpy(float), ref["mag_err"].to_numpy(float)
    return None


def absolute_level(stars: pd.DataFrame, ref_mag: np.ndarray, ref_err: np.ndarray, i_star: np.ndarray,
                   i_ref: np.ndarray, cfg: CalibrationConfig) -> ZeroPoint:
    """The field's absolute zero point: ensemble star magnitudes against a reference catalogue.

    Parameters
    ----------
    stars
        :func:`ensemble_zeropoints`' per-star table (``mag`` relative, ``mag_err``, ``used``),
        indexed by star.
    ref_mag, ref_err
        The reference catalogue's magnitudes and errors (mag).
    i_star, i_ref
        Matched pairs (star index labels of ``stars``, row numbers of the reference).
    cfg
        Clipping and the star counts (``min_stars``, ``min_stars_fit``).

    Returns
    -------
    ZeroPoint
        ``zp`` to add to the relative magnitudes, with its error, scatter and counts; status
        ``fit``, ``fit_few`` or ``few`` (then ``zp`` is NaN).
    """
    st = stars.reindex(i_star)
    ok = st["used"].fillna(False).to_numpy(bool) & np.isfinite(ref_mag[i_ref])
    dz = ref_mag[i_ref][ok] - st["mag"].to_numpy(float)[ok]
    err = np.hypot(ref_err[i_ref][ok], st["mag_err"].to_numpy(float)[ok])
    zp, zp_err, scatter, n = robust_zeropoint(dz, err, cfg.clip_sigma)
    status = zeropoint_status(n, cfg.min_stars, cfg.min_stars_fit)
    if status == ZpStatus.FIT_FEW:
        zp_err = few_star_error(zp_err, scatter)
    if status == ZpStatus.FEW:
        zp = np.nan
    return ZeroPoint(zp, zp_err, scatter, n, int(ok.sum()), status)


def ensemble_epoch_zeropoints(zps: pd.DataFrame, epochs: list[int], level: float,
                              absolute: bool = True) -> dict[int, ZeroPoint]:
    """The :func:`ensemble_zeropoints` result per epoch as :class:`ZeroPoint`, ``level`` (mag) added.

    Epochs the ensemble did not reach, or reached with too few stars, get NaN with status
    ``few`` (they then take the model's). ``absolute`` False: the level is the nominal zero
    point (sources get ``ZP_RELATIVE``).
    """
    out = {}
    for e in epochs:
        if e in zps.index and zps.loc[e, "status"] != ZpStatus.FEW:
            z = zps.loc[e].to_dict()
            out[e] = ZeroPoint(float(z["zp"]) + level, float(z["zp_err"]), float(z["scatter"]), int(z["n_used"]),
                               int(z["n_candidates"]), ZpStatus(str(z["status"])), absolute)
        else:
            n = zps.loc[e].to_dict() if e in zps.index else {"n_used": 0, "n_candidates": 0, "scatter": np.nan}
            out[e] = ZeroPoint(np.nan, np.nan, float(n["scatter"]), int(n["n_used"]), int(n["n_candidates"]),
                               ZpStatus.FEW, absolute)
    return out


def model_epoch_zeropoint(model: dict, airmass: float, n_candidates: int, absolute: bool = True) -> ZeroPoint:
    """The zero point an epoch without enough reference stars takes from the field's model."""
    return ZeroPoint(model_zeropoint(model, airmass), float(model["scatter"]), float(model["scatter"]), 0,
                     n_candidates, ZpStatus.MODEL, absolute)


# ------------------------------------------------------------------ aperture correction across epochs
def fit_apcorr_model(fwhm_px: np.ndarray, apcorr: np.ndarray, clip_sigma: float = 3.0) -> dict[str, Any]:
    """Aperture correction as a line in FWHM over the epochs that measured it.

    Parameters
    ----------
    fwhm_px, apcorr
        Per measured epoch: FWHM (px) and aperture correction (total / aperture flux).
    clip_sigma
        Residuals beyond this many robust sigma (1.4826 MAD, at least 0.001) are dropped
        before the final fit.

    Returns
    -------
    dict
        ``coef`` (``numpy.polyval`` order: slope per px, intercept) and ``n`` epochs. With fewer
        than :data:`APCORR_LINE_MIN_EPOCHS` epochs or FWHMs spanning <= 0.05 px, a constant (the median).
    """
    f, a = np.asarray(fwhm_px, float), np.asarray(apcorr, float)
    if len(f) == 0:
        return {"coef": [0.0, 1.0], "n": 0}
    if len(f) >= APCORR_LINE_MIN_EPOCHS and np.ptp(f) > 0.05:
        coef = np.polyfit(f, a, 1)
        res = a - np.polyval(coef, f)
        keep = np.abs(res) <= clip_sigma * max(1.4826 * np.median(np.abs(res)), 1e-3)
        coef = np.polyfit(f[keep], a[keep], 1)
    else:
        coef = np.array([0.0, float(np.median(a))])
    return {"coef": [float(c) for c in coef], "n": len(f)}


def rescale_aperture_photometry(sources: pd.DataFrame, old_apcorr: float, new_apcorr: float) -> pd.DataFrame:
    """Replace an epoch's aperture correction in place: fluxes scaled, instrumental magnitudes recomputed."""
    scale = new_apcorr / old_apcorr
    sources["flux"] *= scale
    sources["flux_err"] *= scale
    sources["mag_inst"], sources["mag_inst_err"] = instrumental_mag(sources["flux"].to_numpy(),
                                                                    sources["flux_err"].to_numpy())
    sources["mag_err_aleatoric"] = sources["mag_inst_err"]
    return sources


def choose_reference_epoch(n_sources: dict[int, int], requested: int | None = None) -> int:
    """The reference epoch of relative calibration: ``requested`` if given, else the one with most detections.

    Raises
    ------
    ValueError
        When ``requested`` is not among the epochs.
    """
    if requested is not None:
        if requested not in n_sources:
            raise ValueError(f"calibration.reference_epoch = {requested} was not extracted in this run "
                             f"(epochs 0..{max(n_sources)})")
        return requested
    return max(sorted(n_sources), key=lambda e: n_sources[e])
