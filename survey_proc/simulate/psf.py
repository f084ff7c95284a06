"""Effective (pixel-integrated) PSF of an epoch, drawn once with GalSim, sampled in phase banks.

Why not one GalSim draw per star: that costs about 1.2 ms per star (measured here), i.e.
hours per 1000-epoch dense field. Instead, per epoch:

1. GalSim draws the PSF profile (Moffat or Kolmogorov, sheared for ellipticity) on a grid
   oversampled ``K`` times (``K`` odd), with ``method='no_pixel'`` (surface brightness
   samples, no pixel convolution).
2. A ``K x K`` box average integrates it over the square detector pixel, giving the
   effective PSF ``ePSF(u, v)``: the fraction of the star's flux falling into a pixel whose
   centre is ``(u, v)`` pixels from the star, tabulated every ``1/K`` pixel.
3. For each stamp radius ``R`` (a ladder R0, 2R0, 4R0, 8R0), the table is cut into phase
   banks ``bank[a, b, j, i] = ePSF(i - dx, j - dy)`` for the ``K + 2`` sub-pixel phases per
   axis. Stamps are truncated, not renormalised: every pixel a star puts on the image is the
   PSF's own value, and the light beyond the stamp (below one pixel's noise by the stamp
   radius rule below) is left out. Renormalising each stamp to unit sum, as this did before
   issue 21's bias check, put that light into the core instead: faint stars' pixels were
   brighter than the PSF by the missing fraction (Kolmogorov 3.4 px: 2.4 % at R = 7, 0.7 %
   at 14, 0.2 % at 28), so every flux measured within the stamp read faint stars 0.2-2 %
   brighter than their truth, a systematic above issue 21's 0.005-mag bias tolerance.

The renderer interpolates bilinearly between the four nearest phases. That keeps the
centroid exact to first order and broadens the profile by at most ``1/(4K^2)`` px^2 in
variance (0.2 % of the FWHM for the dense scenario).

Stamp radius rule: a star of flux ``F`` (ADU) uses the smallest radius on the ladder whose
missing flux fraction ``1 - EE(R)`` (EE within the square stamp) satisfies
``F * (1 - EE(R)) <= sigma_pix``, the per-pixel noise of the sky, in ADU. So the flux left
out beyond the stamp is below one pixel's noise (the image holds the truth flux less at
most that). The largest radius is used beyond that.
"""

from __future__ import annotations

import functools

import galsim
import numpy as np
from scipy.ndimage import uniform_filter

from survey_proc.photometry.crlb import PSF
from survey_proc.simulate.stamps import RADIUS_LADDER_FACTORS, PSFBank, bank_from_epsf

__all__ = ["RADIUS_LADDER_FACTORS", "PSFBank", "bank_from_epsf", "build_bank", "effective_psf", "galsim_profile"]




def galsim_profile(profile: str, fwhm_px: float, beta: float = 3.0, g1: float = 0.0, g2: float = 0.0
                   ) -> galsim.GSObject:
    """The PSF as a GalSim object in pixel units (1 'arcsec' = 1 pixel), unit flux.

    Parameters
    ----------
    profile
        ``moffat`` or ``kolmogorov``.
    fwhm_px
        FWHM before pixel integration (px).
    beta
        Moffat index (Moffat only).
    g1, g2
        Reduced shear (ellipticity) applied to the profile.

    Returns
    -------
    galsim.GSObject
    """
    if profile == "moffat":
        obj = galsim.Moffat(beta=beta, fwhm=fwhm_px)
    elif profile == "kolmogorov":
        obj = galsim.Kolmogorov(fwhm=fwhm_px)
    else:
        raise ValueError(f"unknown PSF profile {profile!r} (use 'moffat' or 'kolmogorov')")
    if g1 or g2:
        obj = obj.shear(g1=g1, g2=g2)
    return obj


@functools.lru_cache(maxsize=4)
def optical_psf(lam_over_diam_px: float, obscuration: float, nstruts: int, strut_thick: float,
                strut_angle_deg: float) -> galsim.GSObject:
    """GalSim ``OpticalPSF`` (Airy with central obscuration and struts) in pixel units, cached.

    The object is the same for every epoch; caching it keeps GalSim's internal pupil FFT
    (about 0.2-0.4 s) to one per process.

    Parameters
    ----------
    lam_over_diam_px
        lambda / D (px).
    obscuration
        Central obscuration (fraction of the pupil diameter).
    nstruts
        Number of struts (0: none; spikes come from struts).
    strut_thick
        Strut thickness (fraction of the pupil diameter).
    strut_angle_deg
        Angle of the first strut from the +y axis, counter-clockwise (deg).

    Returns
    -------
    galsim.GSObject
        Unit flux.
    """
    return galsim.OpticalPSF(lam_over_diam=lam_over_diam_px, obscuration=obscuration, nstruts=nstruts,
                             strut_thick=strut_thick, strut_angle=strut_angle_deg * galsim.degrees)


def bright_star_profile(atmospheric: galsim.GSObject, fwhm_px: float, *, spikes: bool, halo_fraction: float,
                        halo_fwhm_factor: float, radius_px: int, lam_over_diam_px: float = 1.0,
                        obscuration: float = 0.3, nstruts: int = 4, strut_thick: float = 0.02,
                        strut_angle_deg: float = 0.0) -> galsim.GSObject:
    """The PSF of a bright star: core + halo, convolved with the optics' diffraction spikes.

    ``((1 - h) core + h core ⊗ halo) ⊗ optics`` with ``h = halo_fraction``; the halo is a
    Moffat (beta 1.5, i.e. surface brightness ∝ r^-3 far out) of FWHM ``halo_fwhm_factor x
    fwhm_px`` truncated at ``radius_px``, scattering light of the seeing-limited core; the
    optics are :func:`optical_psf` when ``spikes`` (else none). Unit flux. (Convolving the
    halo with the core also keeps GalSim's draw fast: about 1-10 ms per 129 px stamp.)

    Parameters
    ----------
    atmospheric
        The epoch's core PSF (:func:`galsim_profile`).
    fwhm_px
        Its FWHM (px).
    spikes
        Convolve with the OpticalPSF with struts.
    halo_fraction
        Fraction of the flux in the halo (0: none).
    halo_fwhm_factor
        Halo FWHM over the core FWHM.
    radius_px
        Truncation radius of the halo (px): the bright-star stamp's half-size.
    lam_over_diam_px, obscuration, nstruts, strut_thick, strut_angle_deg
        The optics (:func:`optical_psf`).

    Returns
    -------
    galsim.GSObject
    """
    obj = atmospheric
    if halo_fraction > 0:
        halo = galsim.Moffat(beta=1.5, fwhm=halo_fwhm_factor * fwhm_px, trunc=float(radius_px))
        obj = galsim.Add([atmospheric.withFlux(1.0 - halo_fraction),
                          galsim.Convolve(atmospheric, halo).withFlux(halo_fraction)])
    if spikes:
        obj = galsim.Convolve(obj, optical_psf(lam_over_diam_px, obscuration, nstruts, strut_thick, strut_angle_deg))
    return obj


def effective_psf(
    profile: str, fwhm_px: float, *, beta: float = 3.0, g1: float = 0.0, g2: float = 0.0,
    oversample: int = 11, radius_px: int = 56,
) -> np.ndarray:
    """Pixel-integrated PSF tabulated every ``1/oversample`` pixel.

    Returns
    -------
    ndarray, shape (M, M), M = 2*c + 1 with c = oversample*(radius_px + 1)
        ``out[c + K*v, c + K*u]`` is the flux fraction in a pixel centred (u, v) pixels
        from the star.

    Parameters
    ----------
    profile, fwhm_px, beta, g1, g2
        The PSF (:func:`galsim_profile`; FWHM in px).
    oversample
        K, samples per pixel (odd).
    radius_px
        Half-size of the table (px).
    """
    k = int(oversample)
    c = k * (radius_px + 1)
    m = 2 * c + 1
    obj = galsim_profile(profile, fwhm_px, beta, g1, g2)
    img = obj.drawImage(nx=m, ny=m, scale=1.0 / k, method="no_pixel", dtype=np.float64)
    # no_pixel samples give surface brightness x (1/K)^2; a K x K box mean times K^2 is the
    # integral over one detector pixel.
    sb = img.array * (k * k)
    return uniform_filter(sb, size=k, mode="constant")  # K x K mean of density = pixel integral


def build_bank(
    profile: str, fwhm_px: float, *, beta: float = 3.0, g1: float = 0.0, g2: float = 0.0,
    oversample: int = 11, base_radius_px: int = 7, max_factor: int = 8,
) -> PSFBank:
    """Draw the epoch's effective PSF and cut it into phase banks for the radius ladder.

    Parameters
    ----------
    profile, fwhm_px, beta, g1, g2
        The PSF (:func:`galsim_profile`; FWHM in px).
    oversample
        K, sub-pixel phases per pixel (odd).
    base_radius_px
        R0, the smallest stamp radius (px).
    max_factor
        The largest ladder factor used (1, 2, 4 or 8).

    Returns
    -------
    PSFBank
    """
    k = int(oversample)
    radii = tuple(base_radius_px * f for f in RADIUS_LADDER_FACTORS if f <= max_factor)
    epsf = effective_psf(profile, fwhm_px, beta=beta, g1=g1, g2=g2, oversample=k, radius_px=radii[-1] + 1)
    return bank_from_epsf(epsf, k, radii)


def fit_point_source(image: np.ndarray, x: float, y: float, profile: str = "moffat", beta: float = 3.0,
                     sky: float = 0.0, radius_px: int = 8, oversample: int = 5) -> dict[str, float]:
    """Fit one star by forward-modelling its pixels with a pixel-integrated PSF profile.

    Free parameters: flux (ADU), centre (x, y in 0-based pixels) and the optical FWHM
    (pixels) of the given profile family; the sky level (ADU) is fixed. The stamp is
    ``2*radius_px + 1`` pixels around the nearest pixel to (x, y).

    Returns
    -------
    dict with flux, x, y, fwhm_px

    Parameters
    ----------
    image
        The image (ADU).
    x, y
        Initial position (px, 0-based).
    profile, beta
        The PSF family (:func:`galsim_profile`).
    sky
        Sky level subtracted first (ADU per pixel).
    radius_px
        Stamp half-size (px).
    oversample
        Sub-pixel samples per pixel of the model.
    """
    from scipy.optimize import least_squares

    ix, iy = round(x), round(y)
    stamp = image[iy - radius_px : iy + radius_px + 1, ix - radius_px : ix + radius_px + 1] - sky
    k = oversample
    n = 2 * radius_px + 1

    def model(p: np.ndarray) -> np.ndarray:
        flux, dx, dy, fwhm = p
        obj = galsim_profile(profile, abs(fwhm), beta)
        img = obj.drawImage(nx=n * k, ny=n * k, scale=1.0 / k, method="no_pixel",
                            offset=(dx * k, dy * k), dtype=np.float64).array
        return flux * img.reshape(n, k, n, k).sum(axis=(1, 3))

    p0 = np.array([stamp.sum(), x - ix, y - iy, 2.0])
    res = least_squares(lambda p: (model(p) - stamp).ravel(), p0, x_scale=[max(p0[0], 1), 0.1, 0.1, 0.2])
    return {"flux": float(res.x[0]), "x": float(ix + res.x[1]), "y": float(iy + res.x[2]),
            "fwhm_px": float(abs(res.x[3]))}


def galsim_psf(profile: str, fwhm_px: float, size_px: int, beta: float = 3.0) -> PSF:
    """Pixel-integrated GalSim PSF (``moffat`` or ``kolmogorov``) on a ``size x size`` stamp.

    Parameters
    ----------
    profile
        ``moffat`` or ``kolmogorov``.
    fwhm_px
        FWHM before pixel integration (px).
    size_px
        Stamp size (px).
    beta
        Moffat index.

    Returns
    -------
    callable
        ``psf(x0, y0)``: flux fractions (size_px, size_px) for a star at offset ``(x0, y0)`` px
        from the stamp centre (:data:`survey_proc.photometry.crlb.PSF`).
    """
    obj = galsim_profile(profile, fwhm_px, beta)

    def psf(x0: float, y0: float) -> np.ndarray:
        img = obj.drawImage(nx=size_px, ny=size_px, scale=1.0, offset=(x0, y0), method="auto")
        return img.array.astype(np.float64)

    return psf
