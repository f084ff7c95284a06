"""Neighbours hidden in a brighter star's light, found in the residual of a PSF model (``detection.residual_detect``).

sep thresholds the image and deblends each isophote at ``deblend_nthresh`` levels; a
fainter star 0.5-1.5 FWHM from a brighter one rarely makes a saddle above the threshold,
and stays inside the brighter one's isophote. On the held-out dense survey (FWHM 1.9 px)
these hidden neighbours are what widen the photometric errors of 20-25 mag stars: the
stars whose undetected neighbours add >= 5 % of their light (PSF-weighted) have z NMAD
3-14 and read 0.2 mag bright, while the stars with no such neighbour have z NMAD
0.8-1.2 (benchmarks/RESULTS.md, issue 21, eighteenth session). 50 % of those neighbours
lie 0.5-1 FWHM away at a quarter of the star's flux, 23 % at 1-1.5 FWHM at half of it.

This is DAOPHOT's second pass: every detection of the window is modelled as a Moffat at
its position with the flux of one linear simultaneous fit
(:func:`~survey_proc.photometry.psffit.refine_positions`), the model is subtracted, and
sep runs again on the residual with the same threshold. The residual's noise includes
the model's own error, ``residual_model_error x model`` per pixel (DAOPHOT's profile
error), so a PSF that is not a Moffat leaves no detections in its stars' cores. A
residual source is a candidate when it lies at least ``residual_min_sep_fwhm`` FWHM from
every first-pass position (closer, it is the core's mismatch) and its aperture S/N on the
residual is at least ``residual_min_snr``. The candidates and the first pass are then fitted
together, positions free (two Jacobi passes): a candidate is kept when its fitted flux still
has that S/N and it still lies that far from every fitted first-pass star. Without that
refit a merged pair's isophotal centre, between the two stars, leaves a ghost on the
brighter star's far side.

Written here rather than taken from photutils (``IterativePSFPhotometry`` does the same
loop) because that needs a fitted PSF model and runs star by star in Python: 4-13x the
pipeline's cost on these fields (issue 21), where this costs one linear fit and one sep
call per window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from survey_proc.config import DetectionConfig
from survey_proc.detect import classical
from survey_proc.photometry.aperture import aperture_flux
from survey_proc.photometry.psffit import moffat_alpha, refine_positions, render

MODEL_RADIUS_FWHM = 4.0  # each detection's model is rendered out to this radius (x FWHM)


@dataclass(frozen=True)
class Hidden:
    """The residual's new sources and what they were found on.

    ``objs`` is sep's object array (window frame), ``residual`` and ``noise_adu`` the image
    it ran on and its per-pixel noise (ADU), ``x, y`` the new sources' positions from the
    joint fit (px, window frame).
    """

    objs: np.ndarray
    residual: np.ndarray
    noise_adu: np.ndarray
    x: np.ndarray
    y: np.ndarray


def find_hidden(data: np.ndarray, bad: np.ndarray, noise_adu: float, gain_e_per_adu: float, x: np.ndarray,
                y: np.ndarray, flux_adu: np.ndarray, fwhm_px: float, cfg: DetectionConfig, beta: float = 3.0
                ) -> Hidden:
    """Sources in ``data`` less a Moffat model of the detections at ``(x, y)`` (see the module docstring).

    Parameters
    ----------
    data, bad
        The background-subtracted window sep thresholded (ADU) and its bad pixels.
    noise_adu, gain_e_per_adu
        The window's background noise per pixel (ADU) and the gain (e-/ADU).
    x, y, flux_adu
        Every first-pass detection of the window (px, window frame) and a first flux (ADU,
        sep's isophotal one) to start the linear fit from.
    fwhm_px, beta
        The window's FWHM (px) and the Moffat index of the model.
    cfg
        ``residual_model_error``, ``residual_min_sep_fwhm``, ``residual_min_snr`` and sep's
        extraction settings.

    Returns
    -------
    Hidden
        The kept residual sources (sep's fields: ``x``, ``y``, ``flux``, ``npix``, ``peak``,
        ``flag``...), the residual and its per-pixel noise (ADU), and the kept sources' fitted
        positions (px).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    model = np.zeros(data.shape)
    if len(x):
        fit = refine_positions(data, bad, noise_adu, gain_e_per_adu, x, y, np.asarray(flux_adu, float), fwhm_px,
                               n_iter=0, beta=beta)
        model = render(data.shape, x, y, np.clip(fit.flux, 0.0, None), moffat_alpha(fwhm_px, beta), beta,
                       max(3, int(np.ceil(MODEL_RADIUS_FWHM * fwhm_px))))
    residual = np.ascontiguousarray(np.where(bad, 0.0, data - model), dtype=np.float32)
    err = np.ascontiguousarray(np.hypot(noise_adu, cfg.residual_model_error * model), dtype=np.float32)
    objs, _ = classical.extract(residual, bad, err, cfg)
    if len(objs) == 0 or len(x) == 0:
        return Hidden(objs[:0], residual, err, np.zeros(0), np.zeros(0))
    d, _ = cKDTree(np.c_[x, y]).query(np.c_[objs["x"], objs["y"]])
    far = d >= cfg.residual_min_sep_fwhm * fwhm_px
    f, fe, _ = aperture_flux(residual, err, bad, objs["x"], objs["y"], max(1.0, fwhm_px), gain_e_per_adu)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(fe > 0, f / fe, 0.0)
    cand = np.flatnonzero(far & (snr >= cfg.residual_min_snr))
    if len(cand) == 0:
        return Hidden(objs[cand], residual, err, np.zeros(0), np.zeros(0))
    # all together again, positions free: a candidate that was only the first model's error (a merged pair's
    # isophotal centre between the two leaves a ghost on the brighter star's far side) loses its flux to its star
    n0 = len(x)
    xs, ys = np.r_[x, objs["x"][cand]], np.r_[y, objs["y"][cand]]
    ref = refine_positions(data, bad, noise_adu, gain_e_per_adu, xs, ys,
                           np.r_[np.clip(fit.flux, 1.0, None), np.clip(f[cand], 1.0, None)], fwhm_px, n_iter=2,
                           beta=beta, flux_errors=True)
    fn = ref.flux[n0:]
    en = ref.flux_err[n0:] if ref.flux_err is not None else np.full(len(fn), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = ref.ok[n0:] & np.isfinite(en) & (en > 0) & (fn / en >= cfg.residual_min_snr)
    d_ref, _ = cKDTree(np.c_[ref.x[:n0], ref.y[:n0]]).query(np.c_[ref.x[n0:], ref.y[n0:]])
    ok &= d_ref >= cfg.residual_min_sep_fwhm * fwhm_px
    return Hidden(objs[cand[ok]], residual, err, ref.x[n0:][ok], ref.y[n0:][ok])
