"""Total fluxes of the close pairs the residual pass resolves, from their joint PSF fit.

``detection.residual_pair_flux``. Once :mod:`survey_proc.detect.hidden` finds a
neighbour 0.7-1.5 FWHM from a brighter star, an aperture of 1 FWHM around either holds a
quarter to a half of the other's light: on the held-out dense survey sep's aperture bias
at 24-25 mag went from 0.014 to 0.030 mag with the pass on (benchmarks/RESULTS.md,
nineteenth session). The pass has fitted each pair to convergence on the window's
empirical PSF; those PSF fluxes are the pair's deblended photometry. They are on the PSF
model's normalisation, not on the block's total-flux scale (aperture x aperture
correction), so they are multiplied by the median ratio of the two measured on the block's
bright, unflagged stars that are not pair members (each star's PSF flux from the window's
linear fit at its aperture position). Every other row keeps its aperture flux.

Written here, not taken from photutils: the fit is the pass's own (it already exists for
each pair); only the scale is new.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from survey_proc.detect.base import PairPhotometry, TotalFlux

MIN_SCALE_STARS = 5  # fewer stars to measure the PSF-to-total scale: the pairs keep their apertures


@dataclass(frozen=True)
class PairScale:
    """The PSF-to-total flux ratio of a block (dimensionless), its stars, and the rows it changed."""

    scale: float
    n_stars: int
    n_pairs: int


def psf_to_total_scale(total_flux_adu: np.ndarray, snr: np.ndarray, psf_flux_adu: np.ndarray, ok: np.ndarray,
                       snr_min: float) -> tuple[float, int]:
    """Median of ``total / psf`` flux over the allowed stars with S/N >= ``snr_min`` (0.4 of it when too few).

    Parameters
    ----------
    total_flux_adu, snr
        Every row's total flux (ADU) and S/N.
    psf_flux_adu
        Every row's PSF flux (ADU; NaN where none).
    ok
        Rows allowed to measure the scale (unflagged, not a pair member).
    snr_min
        The S/N of the stars used (the aperture correction's ``apcorr_snr_min``).

    Returns
    -------
    scale, n_stars
        NaN and the count when fewer than :data:`MIN_SCALE_STARS` qualify.
    """
    good = ok & np.isfinite(psf_flux_adu) & (psf_flux_adu > 0) & np.isfinite(total_flux_adu) & (total_flux_adu > 0)
    for cut in (snr_min, 0.4 * snr_min):
        use = good & (snr >= cut)
        if use.sum() >= MIN_SCALE_STARS:
            return float(np.median(total_flux_adu[use] / psf_flux_adu[use])), int(use.sum())
    return float("nan"), int((good & (snr >= 0.4 * snr_min)).sum())


def with_pair_fluxes(total: TotalFlux, pairs: PairPhotometry, ok: np.ndarray, snr_min: float
                     ) -> tuple[TotalFlux, PairScale]:
    """``total`` with each pair member's flux, error and S/N from the pair's PSF fit on the total-flux scale.

    Parameters
    ----------
    total
        The block's total fluxes (aperture x aperture correction).
    pairs
        The detector's pair photometry (:class:`~survey_proc.detect.base.PairPhotometry`).
    ok
        Rows without a photometry or centroid flag (they may measure the scale).
    snr_min
        S/N of the stars that measure the scale.

    Returns
    -------
    TotalFlux, PairScale
        Unchanged, with ``n_pairs`` 0, where the scale cannot be measured.
    """
    member = np.isfinite(pairs.flux_adu) & np.isfinite(pairs.flux_err_adu) & (pairs.flux_err_adu > 0)
    scale, n = psf_to_total_scale(np.asarray(total.flux, float), np.asarray(total.snr, float), pairs.psf_flux_adu,
                                  ok & ~member, snr_min)
    if not np.isfinite(scale) or not member.any():
        return total, PairScale(scale, n, 0)
    flux = np.asarray(total.flux, float).copy()
    err = np.asarray(total.flux_err, float).copy()
    snr = np.asarray(total.snr, float).copy()
    flux[member] = scale * pairs.flux_adu[member]
    err[member] = scale * pairs.flux_err_adu[member]
    snr[member] = pairs.flux_adu[member] / pairs.flux_err_adu[member]
    return replace(total, flux=flux, flux_err=err, snr=snr), PairScale(scale, n, int(member.sum()))
