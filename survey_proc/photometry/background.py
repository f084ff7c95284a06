"""The photometric background: sep's mesh background again, with the detected stars masked.

Detection needs a background first (:func:`survey_proc.detect.classical.estimate_background`,
SExtractor's clipped mode per mesh). That estimate still holds part of the stars' light: in
a crowded mesh the wings and cores of the stars pull the clipped mode up. Measured on the
simulator's surveys against the true sky (first epoch, 512² window): +0.17 rms per pixel in
a field of 523 detections, +0.32 in the dense held-out field, +0.05 in the sparse one. Summed
over an aperture of radius 1 FWHM (15-20 px), that is an additive deficit of about a third
of the aperture noise in every flux: faint stars came out 2-8 % low at S/N 3-30, their
forced fluxes 0.3 sigma low, while the zero point, fitted on bright stars, hides it.

Once the stars are known, the photometry's background is estimated again on the same mesh
with each detection masked out to where its light falls below ``level_sigma`` times the
noise (a Moffat beta = 3 profile of the window's FWHM scaled to the detection's peak; at
least ``min_radius_fwhm``, at most ``max_radius_fwhm`` FWHM). The same masks with a
level of 0.1 sigma took the bias to +0.075, +0.16 and +0.02 rms per pixel (what remains is
the light of the stars too faint to detect, a real part of every aperture's background
on average). When the masks would cover more than ``max_masked_fraction`` of the window
(a plate core), the radii shrink until they do not (down to 1 px; beyond that the first
estimate is kept), so the meshes keep sky pixels.

It is an option (``[photometry] background = "masked"``), not the default: on the held-out
surveys the same star light had been offsetting two other biases (neighbour light in the
aperture correction's 4-FWHM aperture, the selection of detections near the limit), so the
per-detection magnitude bias and the zero points against truth came out worse with the
mask, although forced fluxes at fixed positions became unbiased (benchmarks/RESULTS.md,
issue 22).

Written here rather than with photutils' ``Background2D`` and ``make_source_mask``: sep's
mesh estimator is the one detection used (the same mesh, filter and clipping), and
``sep.mask_ellipse`` paints the circles in C.
"""

from __future__ import annotations

import numpy as np
import sep

from survey_proc.config import DetectionConfig
from survey_proc.detect import classical

MOFFAT_BETA = 3.0


def mask_radii_px(peak_adu: np.ndarray, noise_adu: float, fwhm_px: float, *, level_sigma: float = 0.1,
                  min_radius_fwhm: float = 1.5, max_radius_fwhm: float = 10.0) -> np.ndarray:
    """Radius (px) where a Moffat (beta 3) star of peak ``peak_adu`` falls to ``level_sigma`` x the noise.

    Parameters
    ----------
    peak_adu
        The detections' peak above the background (ADU).
    noise_adu
        The background noise (ADU per pixel).
    fwhm_px
        The PSF's FWHM (px).
    level_sigma, min_radius_fwhm, max_radius_fwhm
        The light level masked down to (x noise) and the radius bounds (x FWHM).

    Returns
    -------
    ndarray
        One radius per detection (px).
    """
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / MOFFAT_BETA) - 1.0))
    ratio = np.maximum(np.nan_to_num(np.asarray(peak_adu, float), nan=0.0) / (level_sigma * noise_adu), 1.0)
    r = alpha * np.sqrt(ratio ** (1.0 / MOFFAT_BETA) - 1.0)
    return np.clip(r, min_radius_fwhm * fwhm_px, max_radius_fwhm * fwhm_px)


def masked_background(image: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, peak_adu: np.ndarray,
                      noise_adu: float, fwhm_px: float, cfg: DetectionConfig, *, level_sigma: float = 0.1,
                      max_masked_fraction: float = 0.5, min_peak_sigma: float = 3.0) -> classical.Background:
    """The mesh background of ``image`` with the detections at ``x, y`` masked (see the module docstring).

    Parameters
    ----------
    image
        The window's pixels (ADU, sky not subtracted).
    bad
        Pixels not to use.
    x, y
        Detections in the window's frame (px).
    peak_adu
        Their peak above the first background (ADU).
    noise_adu
        The window's background noise (ADU per pixel).
    fwhm_px
        The window's FWHM (px).
    cfg
        The detection settings (mesh and filter sizes, as for the first background).
    level_sigma
        Light masked down to this many noise sigma.
    max_masked_fraction
        Radii are scaled down until the masks (with the bad pixels) cover at most this share.
    min_peak_sigma
        Only detections peaking at least this many noise sigma above the background are
        masked: masking the noise peaks a low threshold also detects would take the sky's
        upward fluctuations out of the meshes and bias the sky low.

    Returns
    -------
    Background
        The background and noise maps of the masked image (the photometry keeps the first
        estimate's global noise for its errors, as detection does).
    """
    keep = np.nan_to_num(np.asarray(peak_adu, float), nan=0.0) >= min_peak_sigma * noise_adu
    x = np.asarray(x, float)[keep]
    y = np.asarray(y, float)[keep]
    peak_adu = np.asarray(peak_adu, float)[keep]
    if len(x) == 0:
        return classical.estimate_background(image, bad, cfg)
    r = mask_radii_px(peak_adu, noise_adu, fwhm_px, level_sigma=level_sigma)
    while True:
        m = bad.copy()
        sep.mask_ellipse(m, x, y, r, r, 0.0, r=1.0)
        if m.mean() <= max_masked_fraction:
            return classical.estimate_background(image, m, cfg)
        if r.max() <= 1.0:  # even 1-px masks cover too much (a plate core): the first estimate
            return classical.estimate_background(image, bad, cfg)
        r = np.maximum(r * 0.7, 1.0)
