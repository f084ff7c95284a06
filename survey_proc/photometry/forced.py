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

Neighbours (``forced.subtract_neighbours``, default off). Off, they are treated as in the
detected points: the aperture holds whatever share of a neighbour's light falls in it. That
share is not the same in the forced epochs: a star is missed mostly in poor seeing, when a
brighter neighbour's wings reach its aperture most (measured on the default run: forced
points of 20.5-22 mag constant stars with z std 8 against 3 for their detections; RESULTS.md
"Cross-match: alternate centroids ..."). On, the epoch's detections are modelled as Moffat
profiles (``forced.neighbour_beta``, the epoch's FWHM, their total fluxes) and subtracted from
the window before the aperture sums, except those within ``forced.neighbour_exclude_fwhm``
x FWHM of any measured position (they may be the object itself, detected as a blend). The
anchors are measured the same way (each keeps its own light), so the flux scale stays the
detections'. Detected points are not corrected: a blended object's forced points then sit
below its detections by the neighbour's share in good seeing (a few per cent at 3 px).
Measured on a held-out 512² x 1000 survey, it does not help (the biasing light is mostly the
star's own blend, within the exclusion radius): it stays off.

Errors: sep's aperture error (the window's background noise plus the source's Poisson noise
for a positive flux) times the aperture correction, as for detections. Flags: ``FORCED``
always; ``EDGE``, ``SATURATED``, ``COSMIC``, ``MASKED`` from the aperture as for detections;
``NONPOSITIVE`` when the flux is <= 0 (its magnitude is NaN; the flux is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from survey_proc import vocab as F
from survey_proc.config import DetectionConfig, PhotometryConfig
from survey_proc.detect import classical
from survey_proc.detect.base import nearest_pixel
from survey_proc.photometry import aperture
from survey_proc.photometry.background import masked_background
from survey_proc.photometry.halo import (
    HaloProfile,
    background_with_halos,
    on_halo,
    sky_from_profiles,
    sky_model_error,
)


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
                    photometry: PhotometryConfig, detections: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                    neighbours: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                    neighbour_exclude_px: float = 0.0, neighbour_beta: float = 3.0,
                    halos: list[HaloProfile] | None = None, origin_yx: tuple[int, int] = (0, 0)) -> ForcedFluxes:
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
    neighbours
        ``(x, y, flux)`` of detections to subtract (window frame, px; total flux, ADU) as
        Moffat profiles of ``fwhm_px`` and ``neighbour_beta``; None: none.
    neighbour_exclude_px
        Neighbours closer than this (px) to any position are kept (not subtracted).
    neighbour_beta
        Moffat index of the neighbours' model.
    halos, origin_yx
        With ``detection.halo_sky``: the epoch's saturated stars' halos as its extraction fitted
        them (image frame) and the image-frame pixel of the window's first row and column; they
        are rendered, not fitted again (the detections' sky, and ~10x faster). None: fitted on
        this window (:func:`~survey_proc.photometry.halo.background_with_halos`).

    Returns
    -------
    ForcedFluxes
        One measurement per position.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    bad = classical.bad_pixels(image, mask, saturation_adu)
    halo_adu = None
    if detection.halo_sky and halos is not None:  # the saturated stars' halos the extraction fitted
        bkg, halo_adu = sky_from_profiles(image, bad, detection, halos, origin_yx)
    elif detection.halo_sky:  # an epoch extracted without keeping them: fitted on the window
        bkg, halo_adu = background_with_halos(image, bad, detection, fwhm_px)
    else:
        bkg = classical.estimate_background(image, bad, detection)
    noise = bkg.global_rms
    if photometry.background == "masked" and detections is not None and len(detections[0]):
        bkg = masked_background(image, bad, detections[0], detections[1], detections[2], noise, fwhm_px, detection)
        if halo_adu is not None:
            bkg = replace(bkg, back=(bkg.back + halo_adu).astype(np.float32))
    sky_sub = image - bkg.back
    if neighbours is not None and len(neighbours[0]):
        sky_sub = sky_sub - neighbour_model(image.shape, x, y, neighbours, fwhm_px, neighbour_beta,
                                            neighbour_exclude_px)
    data = np.ascontiguousarray(np.where(bad, 0.0, sky_sub), dtype=np.float32)
    r_ap = photometry.aperture_fwhm * fwhm_px
    f_ap, f_ap_err, flags = aperture.aperture_measure(data, noise, bad, mask, x, y, r_ap, gain_e_per_adu)
    flags |= F.FORCED
    lit = on_halo(halo_adu, x, y, noise)
    flags[lit] |= F.HALO
    if lit.any():  # the halo sky's own error, as the extraction adds it
        dx, dy = (detections[0], detections[1]) if detections is not None else (x, y)
        f_ap_err = f_ap_err.copy()
        centres = (None if not (detection.halo_sky and halos)
                   else np.array([(p.x_px - origin_yx[1], p.y_px - origin_yx[0]) for p in halos]))
        f_ap_err[lit] = np.hypot(f_ap_err[lit], sky_model_error(data, bad, x[lit], y[lit], r_ap, noise, dx, dy,
                                                                centres))
    flux = f_ap * apcorr
    flags[~(flux > 0)] |= F.NONPOSITIVE
    iy, ix = nearest_pixel(x, y, image.shape)
    return ForcedFluxes(flux=flux, flux_err=f_ap_err * apcorr, flux_aper=f_ap, flux_aper_err=f_ap_err,
                        flags=flags, bkg_adu=bkg.back[iy, ix].astype(float), noise_adu=float(noise))


def neighbour_model(shape: tuple[int, int], x: np.ndarray, y: np.ndarray,
                    neighbours: tuple[np.ndarray, np.ndarray, np.ndarray], fwhm_px: float, beta: float,
                    exclude_px: float) -> np.ndarray:
    """Image (ADU) of the neighbours as Moffat profiles, without those within ``exclude_px`` of a position.

    Parameters
    ----------
    shape
        ``(ny, nx)`` of the window (px).
    x, y
        The measured positions (window frame, px).
    neighbours
        ``(x, y, flux)`` of the detections (window frame, px; total flux, ADU); non-finite or
        non-positive fluxes are left out.
    fwhm_px, beta
        The Moffat profile (FWHM in px).
    exclude_px
        Detections closer than this (px) to any position are not modelled.

    Returns
    -------
    ndarray
        The model image (ADU), float64.
    """
    from scipy.spatial import cKDTree

    from survey_proc.photometry.psffit import moffat_alpha, render

    nx_, ny_, nf = (np.asarray(v, float) for v in neighbours)
    keep = np.isfinite(nx_) & np.isfinite(ny_) & np.isfinite(nf) & (nf > 0)
    if exclude_px > 0 and len(x) and keep.any():
        d, _ = cKDTree(np.c_[x, y]).query(np.c_[nx_, ny_])
        keep &= d >= exclude_px
    radius = int(np.ceil(4.0 * fwhm_px)) + 2
    return render(shape, nx_[keep], ny_[keep], nf[keep], moffat_alpha(fwhm_px, beta), beta, radius)
