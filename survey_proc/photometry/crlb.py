"""Cramér-Rao lower bounds for the flux and position of an isolated point source.

For a star of flux ``F`` (ADU) at ``(x0, y0)`` on a sky of ``B`` ADU/pixel, pixel ``i`` has
expectation ``mu_i = F p_i(x0, y0) + B``, where ``p_i`` is the *pixelised* PSF (the flux
fraction falling in pixel ``i``; it sums to ~1), and variance
``v_i = mu_i / g + (rn / g)^2`` (ADU^2; Poisson on electrons plus read noise, gain ``g`` in
e-/ADU, read noise ``rn`` in e-). With Gaussian noise of parameter-independent variance,
the Fisher information of ``theta = (F, x0, y0[, B])`` is

    I_jk = sum_i (d mu_i / d theta_j) (d mu_i / d theta_k) / v_i ,

and any unbiased estimator has ``cov(theta_hat) >= I^-1``. ``d mu / d x0`` is taken by
central differences of the pixelised PSF. The bound depends on the sub-pixel phase of the
star; :func:`crlb_point_source` averages the *information* over phases when asked (the
bound for a star at a random position).

The PSF is any callable ``psf(x0, y0) -> (ny, nx) array`` of pixel fractions:
:func:`gaussian_psf` here, or :func:`survey_proc.simulate.psf.galsim_psf` for GalSim
profiles (pixel-integrated; it lives with the simulator so photometry does not import
GalSim). :func:`crowding_factors` is how much neighbours raise a star's position and flux bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from survey_proc.vocab import MAG_PER_FLUX

PSF = Callable[[float, float], np.ndarray]


@dataclass(frozen=True)
class Bound:
    """Cramér-Rao standard deviations of one point source."""

    flux_adu: float
    sigma_flux_adu: float
    sigma_x_px: float
    sigma_y_px: float

    @property
    def sigma_mag(self) -> float:
        """Bound on the magnitude error (mag), ``1.0857 sigma_F / F``.

        Returns
        -------
        float
            The bound (mag).
        """
        return MAG_PER_FLUX * self.sigma_flux_adu / self.flux_adu

    @property
    def snr(self) -> float:
        """Best achievable flux S/N.

        Returns
        -------
        float
            ``F / sigma_F``.
        """
        return self.flux_adu / self.sigma_flux_adu


def gaussian_psf(sigma_px: float, size_px: int) -> PSF:
    """Pixel-integrated circular Gaussian on a ``size x size`` stamp (centre pixel ``size // 2``).

    Parameters
    ----------
    sigma_px
        Gaussian sigma (px).
    size_px
        Stamp size (px).

    Returns
    -------
    callable
        ``psf(x0, y0)``: the pixel fractions for a star at offset ``(x0, y0)`` px from the centre pixel.
    """
    edges = np.arange(size_px + 1) - 0.5 - size_px // 2

    def psf(x0: float, y0: float) -> np.ndarray:
        s = np.sqrt(2.0) * sigma_px
        fx = 0.5 * np.diff(erf((edges - x0) / s))
        fy = 0.5 * np.diff(erf((edges - y0) / s))
        return np.outer(fy, fx)

    return psf


def fisher_matrix(psf: PSF, flux_adu: float, x0: float, y0: float, sky_adu: float, gain_e_per_adu: float,
                  read_noise_e: float, *, fit_background: bool = False, step_px: float = 1e-3) -> np.ndarray:
    """Fisher information of ``(F, x0, y0[, B])`` for one star (units: ADU, px).

    Parameters
    ----------
    psf
        Pixelised PSF callable.
    flux_adu
        Total flux of the star (ADU).
    x0, y0
        Position relative to the centre pixel (px).
    sky_adu
        Sky per pixel (ADU).
    gain_e_per_adu, read_noise_e
        Detector gain (e-/ADU) and read noise (e-).
    fit_background
        Include the sky level as a fourth parameter.
    step_px
        Central-difference step of the position derivatives (px).

    Returns
    -------
    ndarray
        The 3 x 3 (or 4 x 4) information matrix.
    """
    p = psf(x0, y0)
    dpx = (psf(x0 + step_px, y0) - psf(x0 - step_px, y0)) / (2 * step_px)
    dpy = (psf(x0, y0 + step_px) - psf(x0, y0 - step_px)) / (2 * step_px)
    mu = flux_adu * p + sky_adu
    v = np.maximum(mu / gain_e_per_adu + (read_noise_e / gain_e_per_adu) ** 2, 1e-300)  # noiseless empty pixels
    grads = [p, flux_adu * dpx, flux_adu * dpy]
    if fit_background:
        grads.append(np.ones_like(p))
    g = np.stack([d.ravel() for d in grads])
    return (g / v.ravel()) @ g.T


def crlb_point_source(psf: PSF, flux_adu: float, sky_adu: float, gain_e_per_adu: float, read_noise_e: float, *,
                      x0: float = 0.0, y0: float = 0.0, n_phases: int = 1, fit_background: bool = False) -> Bound:
    """The Cramér-Rao bound for one star.

    Parameters
    ----------
    psf
        Pixelised PSF callable (offsets in px from the stamp centre).
    flux_adu, sky_adu
        Total flux of the star and sky per pixel (ADU).
    gain_e_per_adu, read_noise_e
        Detector gain (e-/ADU) and read noise (e-).
    x0, y0
        Position relative to the centre pixel (used when ``n_phases == 1``).
    n_phases
        Average the information over an ``n x n`` grid of sub-pixel phases instead.
    fit_background
        Also estimate the sky (it then costs information).

    Returns
    -------
    Bound
        Standard deviations of flux (ADU) and position (px).
    """
    if n_phases > 1:
        ph = (np.arange(n_phases) + 0.5) / n_phases - 0.5
        info = np.mean([fisher_matrix(psf, flux_adu, px, py, sky_adu, gain_e_per_adu, read_noise_e,
                                      fit_background=fit_background) for py in ph for px in ph], axis=0)
    else:
        info = fisher_matrix(psf, flux_adu, x0, y0, sky_adu, gain_e_per_adu, read_noise_e,
                             fit_background=fit_background)
    cov = np.linalg.inv(info)
    return Bound(flux_adu, float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[1, 1])), float(np.sqrt(cov[2, 2])))


def crlb_curve(psf: PSF, flux_adu: np.ndarray, sky_adu: float, gain_e_per_adu: float, read_noise_e: float,
               n_phases: int = 3) -> dict[str, np.ndarray]:
    """Bounds for many fluxes (phase-averaged): arrays ``sigma_flux_adu``, ``sigma_mag``, ``sigma_pos_px``.

    Parameters
    ----------
    psf
        Pixelised PSF callable.
    flux_adu
        Star fluxes (ADU).
    sky_adu
        Sky per pixel (ADU).
    gain_e_per_adu, read_noise_e
        Detector gain (e-/ADU) and read noise (e-).
    n_phases
        Sub-pixel phases per axis averaged over.

    Returns
    -------
    dict of ndarray
        ``flux_adu``, ``sigma_flux_adu`` (ADU), ``sigma_mag`` (mag) and ``sigma_pos_px``
        (per-axis position bound, px), one per flux.
    """
    out = [crlb_point_source(psf, float(f), sky_adu, gain_e_per_adu, read_noise_e, n_phases=n_phases)
           for f in np.atleast_1d(flux_adu)]
    return {"flux_adu": np.array([b.flux_adu for b in out]),
            "sigma_flux_adu": np.array([b.sigma_flux_adu for b in out]),
            "sigma_mag": np.array([b.sigma_mag for b in out]),
            "sigma_pos_px": np.array([np.sqrt(0.5 * (b.sigma_x_px**2 + b.sigma_y_px**2)) for b in out])}


@dataclass(frozen=True)
class CrowdingFactors:
    """How much the neighbours raise each target's bounds: crowded / isolated σ (>= 1 up to rounding).

    ``position_x`` is the factor on σ_x, ``flux`` the factor on σ_F; inf where the Fisher
    matrix is singular (a pair too close to be separated).
    """

    position_x: np.ndarray
    flux: np.ndarray


def crowding_factors(x: np.ndarray, y: np.ndarray, flux_adu: np.ndarray, targets: np.ndarray, fwhm_px: float,
                     sky_adu: float, gain_e_per_adu: float, read_noise_e: float, *, beta: float = 3.0,
                     window_fwhm: float = 3.0, min_neighbour_snr: float = 1.0) -> CrowdingFactors:
    """How much the neighbours raise each target star's position and flux bounds.

    The crowded bound treats every neighbour whose light reaches the target's window (within
    ``window_fwhm`` FWHM of the target, plus 2 FWHM) as a point source of unknown flux and
    position: the Fisher matrix over the window's pixels of (F, x, y) of the target and of
    each neighbour is inverted, and the target's x and F variances read off. This is the
    physical limit for any method on a crowded image, known PSF and sky given. The isolated
    bound uses the same window, PSF model (a pixel-integrated Moffat of ``fwhm_px`` and
    ``beta``, :func:`survey_proc.photometry.psffit.moffat_pixel_grad`) and noise, so the
    ratios are model-consistent; multiply them onto any isolated-star bound. Neighbours
    fainter than an isolated S/N of ``min_neighbour_snr`` are left out (they carry no
    information).

    Parameters
    ----------
    x, y, flux_adu
        Every star of the image (px, ADU), true values.
    targets
        Indices of the stars to compute the factors for.
    fwhm_px, sky_adu, gain_e_per_adu, read_noise_e
        The PSF's FWHM (px), the sky (ADU per pixel), the gain (e-/ADU) and read noise (e-).

    Returns
    -------
    CrowdingFactors
        One position (x) factor and one flux factor per target.
    """
    from scipy.spatial import cKDTree

    from survey_proc.photometry.psffit import moffat_alpha, moffat_pixel_grad

    alpha = moffat_alpha(fwhm_px, beta)
    rw = int(np.ceil(window_fwhm * fwhm_px))
    sig2 = sky_adu / gain_e_per_adu + (read_noise_e / gain_e_per_adu) ** 2
    n_eff = 4 * np.pi * (fwhm_px / 2.355) ** 2
    snr = flux_adu / np.sqrt(flux_adu / gain_e_per_adu + sig2 * n_eff)
    tree = cKDTree(np.c_[x, y])
    j = np.arange(-rw, rw + 1)
    pos = np.empty(len(targets))
    flux = np.empty(len(targets))
    for k, t in enumerate(targets):
        ix, iy = np.floor(x[t] + 0.5), np.floor(y[t] + 0.5)
        px = (ix + j)[None, :].repeat(len(j), 0)
        py = (iy + j)[:, None].repeat(len(j), 1)
        nb = [i for i in tree.query_ball_point([x[t], y[t]], rw + 2 * fwhm_px)
              if i != t and snr[i] >= min_neighbour_snr]
        idx = [t, *nb]
        grads = []
        mu = np.full(px.shape, float(sky_adu))
        for i in idx:
            p, gu, gv = moffat_pixel_grad(px - x[i], py - y[i], alpha, beta)
            mu += flux_adu[i] * p
            grads += [p, -flux_adu[i] * gu, -flux_adu[i] * gv]
        v = mu / gain_e_per_adu + (read_noise_e / gain_e_per_adu) ** 2
        g = np.stack([d.ravel() for d in grads])
        info = (g / v.ravel()) @ g.T
        iso = np.diag(np.linalg.inv(info[:3, :3]))
        try:
            crowded = np.diag(np.linalg.inv(info))[:3]
        except np.linalg.LinAlgError:
            crowded = np.full(3, np.inf)
        pos[k] = np.sqrt(crowded[1] / iso[1]) if crowded[1] > 0 else np.inf
        flux[k] = np.sqrt(crowded[0] / iso[0]) if crowded[0] > 0 else np.inf
    return CrowdingFactors(position_x=pos, flux=flux)


def crowding_factor(x: np.ndarray, y: np.ndarray, flux_adu: np.ndarray, targets: np.ndarray, fwhm_px: float,
                    sky_adu: float, gain_e_per_adu: float, read_noise_e: float, *, beta: float = 3.0,
                    window_fwhm: float = 3.0, min_neighbour_snr: float = 1.0) -> np.ndarray:
    """How much the neighbours raise each target star's position bound: σ_x(crowded) / σ_x(isolated).

    The position factor of :func:`crowding_factors` (see there; same parameters). A pair too
    close to be separated gives a very large factor (or inf when singular).

    Returns
    -------
    ndarray, one factor per target (>= 1 up to rounding).
    """
    return crowding_factors(x, y, flux_adu, targets, fwhm_px, sky_adu, gain_e_per_adu, read_noise_e, beta=beta,
                            window_fwhm=window_fwhm, min_neighbour_snr=min_neighbour_snr).position_x
