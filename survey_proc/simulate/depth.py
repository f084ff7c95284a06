"""Depth and saturation of a simulated epoch, computed from its effective PSF and noise.

The 5σ limiting magnitude is the Cramér-Rao one for PSF-fit photometry of an isolated
point source with known position, PSF and sky: ``var(F) = 1 / sum_i p_i^2 / v_i`` with
``v_i = (F p_i + sky) / g + (rn / g)^2`` (ADU^2), averaged over sub-pixel phases. Real
methods reach it only approximately, so it is the depth of the data, not of a pipeline.
"""

from __future__ import annotations

import numpy as np

from survey_proc.simulate.psf import build_bank
from survey_proc.simulate.scenario import Scenario


def _phase_stamps(scn: Scenario, fwhm_px: float, radius_index: int = 1) -> np.ndarray:
    bank = build_bank(scn.psf_profile, fwhm_px, beta=scn.moffat_beta, oversample=scn.psf_oversample,
                      base_radius_px=scn.stamp_radius_px, max_factor=2)
    b = bank.banks[radius_index]
    k = bank.oversample
    inner = slice(1, 1 + k)  # the K phases that cover [-0.5, 0.5)
    return b[inner, inner].reshape(k * k, *b.shape[2:])


def flux_snr(scn: Scenario, flux_adu: np.ndarray, fwhm_px: float, sky_adu: float,
             phase_stamps: np.ndarray | None = None) -> np.ndarray:
    """Cramér-Rao S/N of PSF-fit flux for point sources of the given fluxes (ADU).

    ``phase_stamps`` (phases, ny, nx), each summing to 1, may be passed to skip drawing the PSF.

    Parameters
    ----------
    scn
        The scenario.
    flux_adu
        Star fluxes (ADU).
    fwhm_px
        The epoch's PSF FWHM (px).
    sky_adu
        Sky per pixel (ADU).

    Returns
    -------
    ndarray
        S/N per flux, averaged over sub-pixel phases (information mean).
    """
    p = _phase_stamps(scn, fwhm_px) if phase_stamps is None else phase_stamps
    g, rn = scn.gain_e_per_adu, scn.read_noise_e
    flux = np.atleast_1d(np.asarray(flux_adu, dtype="float64"))
    out = np.empty_like(flux)
    for i, f in enumerate(flux):
        v = (f * p + sky_adu) / g + (rn / g) ** 2
        info = np.sum(p * p / v, axis=(1, 2))
        out[i] = f * np.sqrt(np.mean(info))
    return out


def limiting_magnitude(scn: Scenario, fwhm_px: float, sky_adu: float, zeropoint: float, snr: float = 5.0) -> float:
    """Magnitude at which the Cramér-Rao PSF-fit S/N equals ``snr``.

    Parameters
    ----------
    scn
        The scenario.
    fwhm_px
        The epoch's PSF FWHM (px).
    sky_adu
        Sky per pixel (ADU).
    zeropoint
        The epoch's zero point (mag for 1 ADU).
    snr
        The S/N that defines the limit.

    Returns
    -------
    float
        The limiting magnitude (mag).
    """
    stamps = _phase_stamps(scn, fwhm_px)
    lo, hi = -3.0, 9.0  # log10 flux (ADU)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if flux_snr(scn, np.array([10.0**mid]), fwhm_px, sky_adu, stamps)[0] < snr:
            lo = mid
        else:
            hi = mid
    return float(zeropoint - 2.5 * hi)


def saturation_magnitude(scn: Scenario, fwhm_px: float, sky_adu: float, zeropoint: float) -> float:
    """Magnitude at which a star centred on a pixel brings that pixel to saturation.

    Parameters
    ----------
    scn
        The scenario.
    fwhm_px
        The epoch's PSF FWHM (px).
    sky_adu
        Sky per pixel (ADU).
    zeropoint
        The epoch's zero point (mag for 1 ADU).

    Returns
    -------
    float
        The saturation magnitude (mag); brighter stars saturate.
    """
    bank = build_bank(scn.psf_profile, fwhm_px, beta=scn.moffat_beta, oversample=scn.psf_oversample,
                      base_radius_px=scn.stamp_radius_px, max_factor=1)
    flux = (scn.saturation_adu - sky_adu) / bank.peak_fraction
    return float(zeropoint - 2.5 * np.log10(flux))
