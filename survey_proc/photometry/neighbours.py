"""Aperture fluxes with the window's other detections' light taken out (``photometry.subtract_neighbours``).

An aperture of 1 FWHM around a star also holds the light of every detection within a few
FWHM; the aperture correction and the calibration cannot know it. Once the residual pass
(:mod:`survey_proc.detect.hidden`) finds the neighbours a brighter star hid, they sit
0.5-1.5 FWHM away and put a quarter to a half of their light into each other's apertures.
Here each target's aperture is measured on the image less the Moffat models of all *other*
detections of the window, their fluxes from one linear simultaneous fit (the detector's
:class:`~survey_proc.detect.base.Neighbours`), as DAOPHOT measures its neighbour-subtracted
apertures. The subtraction's own error, ``model_error_frac`` x the neighbours' light in the
aperture, is added to ``flux_err`` in quadrature.

The target's own model cancels: ``ap_i(data - M + m_i) = ap_i(data) - ap_i(M) + f_i a_i``,
with ``M`` every detection's model and ``a_i`` the aperture's share of a unit model at the
target's sub-pixel phase (rendered once per target in a mosaic of stamps), so a PSF that is
not a Moffat changes only the neighbours' part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

from survey_proc.photometry.psffit import moffat_alpha, render

MODEL_RADIUS_FWHM = 2.0  # each detection's model is rendered out to this radius (x FWHM)


@dataclass(frozen=True)
class NeighbourLight:
    """The neighbours' modelled light in each target's aperture (ADU) and its error (ADU)."""

    flux_adu: np.ndarray
    err_adu: np.ndarray


def neighbour_light(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, r_ap_px: float,
                    nb_x: np.ndarray, nb_y: np.ndarray, nb_flux_adu: np.ndarray, targets: np.ndarray,
                    fwhm_px: float, beta: float = 3.0, model_error_frac: float = 0.1) -> NeighbourLight:
    """The light of every other detection inside each target's aperture (see the module docstring).

    Parameters
    ----------
    shape
        The window's shape (px).
    x, y
        The targets' aperture centres (px, window frame).
    r_ap_px
        The aperture radius (px).
    nb_x, nb_y, nb_flux_adu
        Every detection of the window (px) and its PSF-fit total flux (ADU; negative ones count as 0).
    targets
        Index into ``nb_x`` of each target (its own model is not subtracted).
    fwhm_px, beta
        The Moffat model (FWHM in px).
    model_error_frac
        The model's error as a fraction of the subtracted light.

    Returns
    -------
    NeighbourLight
        Per target: the light to subtract from its aperture flux (ADU) and its error (ADU).
    """
    n = len(x)
    if n == 0:
        return NeighbourLight(np.zeros(0), np.zeros(0))
    alpha = moffat_alpha(fwhm_px, beta)
    radius = max(3, int(np.ceil(MODEL_RADIUS_FWHM * fwhm_px)))
    flux = np.clip(np.asarray(nb_flux_adu, float), 0.0, None)
    model = np.ascontiguousarray(render(shape, np.asarray(nb_x, float), np.asarray(nb_y, float), flux, alpha, beta,
                                        radius), dtype=np.float64)
    # no mask here: sep scales a masked aperture's sum up by its lost area, which the own share below cannot know
    total, _, _ = sep.sum_circle(model, x, y, r_ap_px, subpix=5)
    own = flux[np.asarray(targets, np.int64)] * _unit_share(x, y, r_ap_px, alpha, beta, radius)
    light = np.clip(total - own, 0.0, None)
    return NeighbourLight(light, model_error_frac * light)


def _unit_share(x: np.ndarray, y: np.ndarray, r_ap_px: float, alpha: float, beta: float, radius: int) -> np.ndarray:
    """The share of a unit Moffat at each ``(x, y)``'s sub-pixel phase inside the aperture (drawn as :func:`render`)."""
    n = len(x)
    side = 2 * radius + 3
    ncol = int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    k = np.arange(n)
    fx = np.asarray(x, float) - np.floor(np.asarray(x, float) + 0.5)
    fy = np.asarray(y, float) - np.floor(np.asarray(y, float) + 0.5)
    cx = (k % ncol) * side + radius + 1 + fx
    cy = (k // ncol) * side + radius + 1 + fy
    mosaic = np.ascontiguousarray(render((nrow * side, ncol * side), cx, cy, np.ones(n), alpha, beta, radius))
    share, _, _ = sep.sum_circle(mosaic, cx, cy, r_ap_px, subpix=5)
    return np.asarray(share, float)
