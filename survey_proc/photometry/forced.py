"""Forced photometry: the flux at a given position of one epoch, whether or not a star was detected there.

The measurement is the one the epoch's detections got, so that forced points and detected
points of a light curve share one photometric scale: the same bad-pixel map and sep mesh
background (:mod:`survey_proc.detect.classical`; with ``photometry.background = "masked"``
estimated again with the epoch's detections masked, :mod:`survey_proc.photometry.background`),
the same single noise level per window,
the same aperture (``photometry.aperture_fwhm`` x the epoch's FWHM, sep's ``sum_circle``
with the detector gain) and the epoch's aperture correction to total flux. Only the
centre differs: it is the object's position mapped onto the epoch
(:mod:`survey_proc.catalog.frame_map`), not a centroid, so a faint or absent star gives
an unbiased, possibly negative, flux.

Neighbours are treated as in the detected points: the aperture holds the same share of a
neighbour's light whether the object was detected or not, so its light curve is not
changed by the neighbour. Subtracting the neighbours only from the forced points (a
simultaneous fit with the neighbours held fixed, as a PSF-fit pipeline does) would put the
forced and detected points of a blended object on two different levels; that belongs with
PSF-fit photometry of the detections too (``photometry.psf_model = "epsf"``), which the
forced stage does not do yet.

Errors: sep's aperture error (the window's background noise plus the source's Poisson noise
for a positive flux) times the aperture correction, as for detections. Flags: ``FORCED``
always; ``EDGE``, ``SATURATED``, ``COSMIC``, ``MASKED`` from the aperture as for detections;
``NONPOSITIVE`` when the flux is <= 0 (its magnitude is NaN; the flux is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from survey_proc import vocab as F
from survey_proc.config import DetectionConfig, PhotometryConfig
from survey_proc.detect import classical
from survey_proc.detect.base import nearest_pixel
from survey_proc.photometry import aperture
from survey_proc.photometry.background import masked_background


@dataclass(frozen=True)
class ForcedFluxes:
    """Forced measurements at given positions of one window (ADU).

    Attributes
    ----------
    flux, flux_err
        Total flux (aperture flux x aperture correction) and its error (ADU per exposure).
    flux_aper, flux_aper_err
        Flux inside the aperture and its error (ADU).
    flags
        :mod:`survey_proc.vocab` source flags (``FORCED`` set on all).
    bkg_adu
        The subtracted background at each position (ADU per pixel).
    noise_adu
        The window's background noise (ADU per pixel).
    """

    flux: np.ndarray
    flux_err: np.ndarray
    flux_aper: np.ndarray
    flux_aper_err: np.ndarray
    flags: np.ndarray
    bkg_adu: np.ndarray
    noise_adu: float


def forced_aperture(image: np.ndarray, mask: np.ndarray | None, x: np.ndarray, y: np.ndarray, *, fwhm_px: float,
                    apcorr: float, gain_e_per_adu: float, saturation_adu: float, detection: DetectionConfig,
                    photometry: PhotometryConfig, detections: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                    ) -> ForcedFluxes:
    """Aperture photometry at fixed positions of a window, on the detections' scale.

    Parameters
    ----------
    image, mask
        The window's pixels (ADU, sky not subtracted) and mask bits (or None).
    x, y
        Positions in the window's frame (px, 0-based pixel centres).
    fwhm_px
        The epoch's FWHM (px): the aperture radius is ``photometry.aperture_fwhm`` times it.
    apcorr
        The epoch's aperture correction (total flux / aperture flux).
    gain_e_per_adu, saturation_adu
        Detector gain (e-/ADU) and saturation level (ADU).
    detection, photometry
        The run's settings (background mesh; aperture radius; background kind).
    detections
        ``(x, y, peak_adu)`` of the epoch's detections in the window (window frame, px; peak
        above the background, ADU), masked for the photometry's background when
        ``photometry.background`` is ``"masked"``; None: nothing masked.

    Returns
    -------
    ForcedFluxes
        One measurement per position.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    bad = classical.bad_pixels(image, mask, saturation_adu)
    bkg = classical.estimate_background(image, bad, detection)
    noise = bkg.global_rms
    if photometry.background == "masked" and detections is not None and len(detections[0]):
        bkg = masked_background(image, bad, detections[0], detections[1], detections[2], noise, fwhm_px, detection)
    data = np.ascontiguousarray(np.where(bad, 0.0, image - bkg.back), dtype=np.float32)
    r_ap = photometry.aperture_fwhm * fwhm_px
    f_ap, f_ap_err, flags = aperture.aperture_measure(data, noise, bad, mask, x, y, r_ap, gain_e_per_adu)
    flags |= F.FORCED
    flux = f_ap * apcorr
    flags[~(flux > 0)] |= F.NONPOSITIVE
    iy, ix = nearest_pixel(x, y, image.shape)
    return ForcedFluxes(flux=flux, flux_err=f_ap_err * apcorr, flux_aper=f_ap, flux_aper_err=f_ap_err,
                        flags=flags, bkg_adu=bkg.back[iy, ix].astype(float), noise_adu=float(noise))
