"""Stamps around detections, cut from a window in memory: the BPNN's inputs.

Size rule
---------
The network always sees ``STAMP_PX`` x ``STAMP_PX`` (9 x 9) binned pixels. The binning
factor is the integer nearest to ``fwhm_px / 2`` (halves round up), so that the FWHM is
about 2 binned pixels: ``b = max(1, floor(fwhm_px / 2 + 0.5))`` (:func:`stamp_binning`).
The stamp is cut at ``9 b`` x ``9 b`` image pixels and summed in ``b x b`` blocks. So a
stamp spans ±4.5 binned pixels = ±2.25 binned FWHM at the nominal 2 px (±1.5 FWHM at the
widest, just under 3 binned px, ±3.5 FWHM at the narrowest, 1.3 px), and every FWHM of
1.3 px or more becomes 1.3-3 binned px, whatever the seeing. Binning sums pixels, so fluxes and
Poisson statistics are preserved; the binned FWHM is an auxiliary input.

The stamp of a star at ``x`` spans image pixels ``x0 .. x0 + 9b - 1`` with
``x0 = round(x - (9b - 1) / 2)``, so the star lies within half an image pixel of the
stamp centre; the offset (in binned pixels) is an auxiliary input.

Channels (all divided by the star's flux scale ``s``, see below)
----------------------------------------------------------------
0. the background-subtracted data; masked pixels and pixels outside the window are
   *filled* with the PSF model (the star's own at flux ``s`` plus its neighbours');
1. the neighbours' PSF model (every other detection of the window, rendered at its fitted
   flux): what a deblender would subtract. The network sees both, not their difference,
   so it can learn where the neighbour model is wrong;
2. the fraction of each binned pixel that was masked (the flag of the fill).

Flux scale
----------
``s = max(f_fit, 3 sigma_f)``: the star's flux from the simultaneous linear PSF fit
(:mod:`survey_proc.photometry.psffit`) floored at 3 sigma, ``sigma_f^2 = noise^2 n_eff +
f / gain``. Dividing by ``s`` makes the network equivariant to brightness over the survey's
10^4 dynamic range: it predicts ``m - m_s`` with ``m_s = -2.5 log10 s``, a quantity of
order 0.01-1 mag, instead of magnitudes spanning 10 mag.

Auxiliary inputs (:data:`AUX_NAMES`): sub-pixel offset (binned px), binned FWHM, the
scale's S/N per binned pixel and in electrons (log10), the local background against the
window's median in units of the noise, the masked fraction of the stamp, and the window's
*PSF profile* (:func:`profile_ratios`): the median over its bright stars (S/N > 30) of the
light within 1 and 2.5 FWHM relative to the PSF fit's flux, in mag x 10, and whether it
could be measured. The fit's Moffat(3) is not the true PSF; a faint star's stamp cannot
show the difference, the window's bright stars can (an aperture correction, given to
the network rather than applied).

Nothing here knows about tiles, Dask or the store: the caller passes pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from survey_proc.photometry.psffit import _stamps, _tpow, moffat_alpha, moffat_pixel, render

STAMP_PX = 9
AUX_NAMES = ("dx_bin", "dy_bin", "fwhm_bin_minus_2", "log_snr_per_binned_px", "log_scale_e_minus_3",
             "local_bkg_over_noise", "masked_fraction", "profile_r1_dmag", "profile_r2_dmag", "profile_known")
PROFILE_SNR_MIN = 30.0  # stars that measure the window's PSF profile
PROFILE_RADII_FWHM = (1.0, 2.5)
CHANNELS = ("data", "neighbours", "masked")


@dataclass
class Stamps:
    """Network inputs for N detections.

    Attributes
    ----------
    pixels
        (N, 3, 9, 9) float32, the channels of the module docstring.
    aux
        (N, 10) float32, :data:`AUX_NAMES`.
    scale_adu
        (N,) flux scale ``s`` (ADU); the network predicts ``m - (-2.5 log10 s)``.
    masked
        (N,) bool: the stamp had masked or off-window pixels (filled with the model).
    binning
        The binning factor ``b``.
    """

    pixels: np.ndarray
    aux: np.ndarray
    scale_adu: np.ndarray
    masked: np.ndarray
    binning: int

    @property
    def mag_scale(self) -> np.ndarray:
        """``-2.5 log10(scale_adu)`` (mag).

        Returns
        -------
        ndarray
            ``m_s`` per stamp (mag).
        """
        return -2.5 * np.log10(self.scale_adu)

    def __len__(self) -> int:
        return len(self.scale_adu)


def stamp_binning(fwhm_px: float) -> int:
    """The binning factor of the size rule: ``max(1, floor(fwhm_px / 2 + 0.5))`` (halves round up).

    Parameters
    ----------
    fwhm_px
        The window's FWHM (image px).

    Returns
    -------
    int
        ``b`` (image pixels per binned pixel along each axis).
    """
    return max(1, int(np.floor(float(fwhm_px) / 2.0 + 0.5)))


def flux_scale(flux_adu: np.ndarray, noise_adu: float, gain_e_per_adu: float, n_eff_px: float) -> np.ndarray:
    """``max(flux, 3 sigma_flux)`` (ADU) with ``sigma^2 = noise^2 n_eff + flux / gain``.

    Parameters
    ----------
    flux_adu
        PSF-fit fluxes (ADU); NaN counts as 0.
    noise_adu
        Background noise per pixel (ADU).
    gain_e_per_adu
        Detector gain (e-/ADU).
    n_eff_px
        Noise-equivalent area of the PSF (px).

    Returns
    -------
    ndarray
        The flux scale ``s`` (ADU), > 0.
    """
    f = np.asarray(flux_adu, float)
    sig = np.sqrt(noise_adu**2 * n_eff_px + np.clip(f, 0, None) / gain_e_per_adu)
    return np.maximum(np.nan_to_num(f, nan=0.0), 3.0 * sig)


def own_model(du: np.ndarray, dv: np.ndarray, near: np.ndarray, within: np.ndarray, alpha: float,
              beta: float) -> np.ndarray:
    """A unit-flux star's model on pixels at offsets (du, dv), exactly as :func:`psffit.render` draws it.

    ``near``: pixels within 2 px of the star's nearest pixel (pixel-integrated there);
    ``within``: pixels inside render's model radius (0 elsewhere).

    Parameters
    ----------
    du, dv
        Pixel-centre offsets from the star (px).
    near, within
        Boolean maps (see above), the shape of ``du``.
    alpha, beta
        The Moffat profile (α in px).

    Returns
    -------
    ndarray
        The model (flux fraction per pixel), the shape of ``du``.
    """
    a2 = alpha**2
    prof = _tpow(1.0 + (du * du + dv * dv) / a2, beta) * ((beta - 1.0) / (np.pi * a2))
    if near.any():
        prof[near] = moffat_pixel(du[near], dv[near], alpha, beta)
    return np.where(within, prof, 0.0)


def _model_radius(fwhm_px: float, model_radius_fwhm: float) -> int:
    return max(max(2, int(np.ceil(1.5 * fwhm_px))) + 1, int(np.ceil(model_radius_fwhm * fwhm_px)))


def profile_ratios(data: np.ndarray, bad: np.ndarray, model: np.ndarray, x: np.ndarray, y: np.ndarray,
                   flux_adu: np.ndarray, fwhm_px: float, noise_adu: float, gain_e_per_adu: float, *,
                   beta: float = 3.0, model_radius_fwhm: float = 3.0, n_eff_fwhm2: float = 3.78,
                   max_stars: int = 300) -> np.ndarray:
    """The window's PSF profile against the fit's model: ``[dm1, dm2, known]``.

    For stars with fit S/N > :data:`PROFILE_SNR_MIN` and no bad pixel within 2.5 FWHM,
    ``dm_k = -2.5 log10(median(A_k / f))`` x 10, ``A_k`` the light within
    :data:`PROFILE_RADII_FWHM` of the star with its neighbours' models subtracted and ``f``
    the fit's flux; ``known`` is 1 with at least 3 such stars, else ``[0, 0, 0]``.
    ``model`` is the rendered model image of every star (:func:`psffit.render`).

    Parameters
    ----------
    data
        Background-subtracted window (ADU).
    bad
        Pixels not to use.
    model
        The model image (ADU).
    x, y, flux_adu
        Every detection of the window: positions (px) and PSF-fit fluxes (ADU).
    fwhm_px, beta
        The window's PSF (Moffat; FWHM in px).
    noise_adu, gain_e_per_adu
        Background noise per pixel (ADU) and gain (e-/ADU), for the S/N.
    model_radius_fwhm
        Radius of the rendered models (FWHM), as in the fit.
    n_eff_fwhm2
        Noise-equivalent area / FWHM^2.
    max_stars
        The brightest stars used at most.

    Returns
    -------
    ndarray
        ``[dm1, dm2, known]`` (mag x 10, mag x 10, 0 or 1).
    """
    x, y, f = (np.asarray(a, float) for a in (x, y, flux_adu))
    sig = np.sqrt(noise_adu**2 * n_eff_fwhm2 * fwhm_px**2 + np.clip(f, 0, None) / gain_e_per_adu)
    sel = np.flatnonzero(f / sig > PROFILE_SNR_MIN)
    if len(sel) > max_stars:
        sel = sel[np.argsort(-f[sel])[:max_stars]]
    if len(sel) < 3:
        return np.zeros(3)
    r2 = PROFILE_RADII_FWHM[1] * fwhm_px
    rad = int(np.ceil(r2)) + 1
    alpha = moffat_alpha(fwhm_px, beta)
    rmod = _model_radius(fwhm_px, model_radius_fwhm)
    # stamps centred on the stars' nearest pixels (psffit's grids: clipped indices + in-image mask)
    pyc, pxc, inside = _stamps(x[sel], y[sel], rad, data.shape)
    j = np.abs(np.arange(-rad, rad + 1))
    off = np.maximum(j[:, None], j[None, :])  # Chebyshev distance from the nearest pixel
    du = np.arange(-rad, rad + 1)[None, None, :] + (np.floor(x[sel] + 0.5) - x[sel])[:, None, None]
    dv = np.arange(-rad, rad + 1)[None, :, None] + (np.floor(y[sel] + 0.5) - y[sel])[:, None, None]
    du, dv = (np.ascontiguousarray(a) for a in np.broadcast_arrays(du, dv))
    near = np.broadcast_to(off <= 2, du.shape).copy()
    within = np.broadcast_to(off <= rmod, du.shape).copy()
    own = f[sel][:, None, None] * own_model(du, dv, near, within, alpha, beta)
    star = data[pyc, pxc] - (model[pyc, pxc] - own)  # the star alone: its neighbours' models subtracted
    r = np.hypot(du, dv)
    clean = ~((r <= r2) & (~inside | bad[pyc, pxc])).any(axis=(1, 2))
    if clean.sum() < 3:
        return np.zeros(3)
    out = []
    for rk in PROFILE_RADII_FWHM:
        a = np.sum(np.where(r <= rk * fwhm_px, star, 0.0), axis=(1, 2))[clean] / f[sel][clean]
        out.append(-25.0 * np.log10(max(float(np.median(a)), 1e-3)))
    return np.array([*out, 1.0])


def cut_stamps(data: np.ndarray, bad: np.ndarray, bkg_adu: np.ndarray | None, x: np.ndarray, y: np.ndarray,
               flux_adu: np.ndarray, targets: np.ndarray, fwhm_px: float, noise_adu: float, gain_e_per_adu: float,
               *, beta: float = 3.0, model_radius_fwhm: float = 3.0, n_eff_fwhm2: float = 3.78,
               profile: np.ndarray | None = None, binning: int | None = None) -> Stamps:
    """Stamps of the stars ``targets`` among all the window's detections (see the module docstring).

    Parameters
    ----------
    data, bad
        Background-subtracted window (ADU) and its unusable pixels.
    bkg_adu
        The background map that was subtracted (ADU), or None (auxiliary input 0).
    x, y, flux_adu
        Every detection of the window (window frame, px; PSF-fit fluxes, ADU): the
        neighbours' model is rendered from all of them.
    targets
        Indices (into x, y) of the stars to cut stamps for.
    fwhm_px, beta
        The window's PSF (Moffat), as in the fit.
    noise_adu, gain_e_per_adu
        Background noise per pixel (ADU) and gain (e-/ADU).
    profile
        The PSF profile features (:func:`profile_ratios`); None measures them on this window.
    binning
        Override the size rule's binning factor (out-of-distribution experiments only).

    Returns
    -------
    Stamps
    """
    targets = np.asarray(targets, np.int64)
    n = len(targets)
    b = stamp_binning(fwhm_px) if binning is None else int(binning)
    size = STAMP_PX * b
    alpha = moffat_alpha(fwhm_px, beta)
    rmod = _model_radius(fwhm_px, model_radius_fwhm)
    f_all = np.clip(np.nan_to_num(np.asarray(flux_adu, float)), 0.0, None)
    model = render(data.shape, np.asarray(x, float), np.asarray(y, float), f_all, alpha, beta, rmod)
    if profile is None:
        profile = profile_ratios(data, bad, model, x, y, f_all, fwhm_px, noise_adu, gain_e_per_adu, beta=beta,
                                 model_radius_fwhm=model_radius_fwhm, n_eff_fwhm2=n_eff_fwhm2)
    xs, ys, fs = np.asarray(x, float)[targets], np.asarray(y, float)[targets], f_all[targets]
    n_eff = n_eff_fwhm2 * fwhm_px**2
    scale = flux_scale(np.asarray(flux_adu, float)[targets], noise_adu, gain_e_per_adu, n_eff)
    half = (size - 1) / 2.0
    x0 = np.floor(xs - half + 0.5).astype(np.int64)
    y0 = np.floor(ys - half + 0.5).astype(np.int64)
    j = np.arange(size)
    py = y0[:, None, None] + j[None, :, None]
    px = x0[:, None, None] + j[None, None, :]
    ny, nx = data.shape
    inside = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
    pyc, pxc = np.clip(py, 0, ny - 1), np.clip(px, 0, nx - 1)
    du, dv = np.broadcast_arrays(px - xs[:, None, None], py - ys[:, None, None])
    ix = np.floor(xs + 0.5).astype(np.int64)[:, None, None]
    iy = np.floor(ys + 0.5).astype(np.int64)[:, None, None]
    near = (np.abs(px - ix) <= 2) & (np.abs(py - iy) <= 2)
    within = (np.abs(px - ix) <= rmod) & (np.abs(py - iy) <= rmod)
    unit = own_model(np.ascontiguousarray(du, float), np.ascontiguousarray(dv, float), near, within, alpha, beta)
    m_all = np.where(inside, model[pyc, pxc], 0.0)
    own_fit = fs[:, None, None] * unit
    neigh = m_all - own_fit
    # the in-window pixels of the model include the own star at its fitted flux; off-window
    # pixels get the neighbours' model there as 0 (nothing was rendered) plus the own star
    masked = ~inside | bad[pyc, pxc]
    filled = np.where(masked, neigh + scale[:, None, None] * unit, data[pyc, pxc])
    mfrac = masked.astype(np.float64)

    def binned(a: np.ndarray) -> np.ndarray:
        return a.reshape(n, STAMP_PX, b, STAMP_PX, b).sum(axis=(2, 4))

    s = scale[:, None, None]
    pixels = np.stack([binned(filled) / s, binned(neigh) / s, binned(mfrac) / (b * b)], axis=1).astype(np.float32)
    dx = (xs - x0 - half) / b
    dy = (ys - y0 - half) / b
    if bkg_adu is not None:
        med = float(np.median(bkg_adu))
        local = (bkg_adu[np.clip(np.round(ys).astype(int), 0, ny - 1), np.clip(np.round(xs).astype(int), 0, nx - 1)]
                 - med) / noise_adu
    else:
        local = np.zeros(n)
    aux = np.stack([
        dx, dy, np.full(n, fwhm_px / b - 2.0),
        np.log10(scale / (noise_adu * b)) / 2.0 - 1.0,
        np.log10(scale * gain_e_per_adu) / 2.0 - 3.0,
        np.clip(local, -10, 10) / 3.0,
        mfrac.mean(axis=(1, 2)),
        *(np.full(n, v) for v in np.asarray(profile, float)),
    ], axis=1).astype(np.float32)
    return Stamps(pixels, aux, scale, masked.any(axis=(1, 2)), b)


__all__ = ["AUX_NAMES", "CHANNELS", "STAMP_PX", "Stamps", "cut_stamps", "flux_scale", "own_model", "profile_ratios",
           "stamp_binning"]
