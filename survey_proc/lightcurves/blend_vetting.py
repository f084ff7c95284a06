"""Where is the varying light? A pixel-level (difference-image) centroid test for periodic candidates.

In a dense field a faint periodic variable 1-2 px from a brighter constant star is often not
detected as an object of its own (the PSF has FWHM ~1.75 px), and the constant star's light
curve then carries the variable's signal: a periodic candidate on the wrong star. Kepler and
TESS data validation vet such candidates with a difference-image centroid: the pixels that
vary in phase with the signal show where the varying light is. This module does the same on
the per-epoch stamps of one object:

1. **Model variation.** :func:`model_variation` folds the object's light curve on its period,
   takes the median flux per phase bin and interpolates it (circularly) back onto every epoch:
   ``m(t) = F_model(phase(t)) / F_0 - 1`` with ``F_0`` the median flux (dimensionless).
2. **Aligned stamps.** Each epoch's stamp is cut at the pixel nearest to the object's position
   in that epoch; its sub-pixel offset ``(dx, dy)`` (px, epoch frame) is removed by a cubic
   spline shift (:func:`scipy.ndimage.shift`) so the object sits at the centre of every
   aligned stamp, and a margin is then cropped away (the spline's edge effects). A per-epoch
   local sky (the median of the aligned stamp's outer ring) is subtracted. A bad pixel (NaN:
   masked, saturated, off the image) and the aligned pixels its spline reaches are left out
   of that epoch only.
3. **Variability image.** Every pixel is regressed, over the epochs, on
   ``[1, m, dx, dy, nuisance...]`` (the pixels share the design, each with its own 0/1 weights
   of the epochs where it is good). The coefficient of ``m`` is the variability image ``b(p)``
   (ADU per unit of ``m``): the light that varies in phase with the signal. The constant light (a bright
   neighbour, its wings, the residuals of the alignment and of seeing changes, absorbed or
   left uncorrelated with ``m``) does not enter it, which is why this test does not suffer
   from the bias of a catalogue (windowed) centroid, pulled by a neighbour's wings when the
   variable fades.
4. **Centroid.** A circular Gaussian of the epochs' mean FWHM plus a constant is fitted to
   ``b`` (weighted by the coefficients' standard errors); its centre's offset from the stamp
   centre is the varying light's offset from the object, mapped to the reference frame by
   the inverse of the mean Jacobian of the reference -> epoch map.
5. **Uncertainty.** A bootstrap over epochs (steps 3-4 on epochs drawn with replacement,
   explicit seed) gives the covariance of the offset and of the amplitude.

Why written here: photutils (``centroid_2dg``, ``centroid_com``) centroids one image, and
astropy fits a model to one image; neither builds the in-phase image from a stamp time
series with dithered sub-pixel offsets. lightkurve (not a dependency) and the TESS/Kepler DV
codes work on target pixel files with a fixed pixel grid, not on our dithered stamps. The
pieces used here are numpy's least squares, scipy's spline shift and scipy's
``least_squares``.

Assumptions: the epochs differ from each other by translations over the stamp (a rotation of
0.01 rad moves a pixel 5 px from the centre by 0.05 px); the variation ``m(t)`` is not
correlated with the dither offsets, the seeing or the sky (the regression includes the offsets
and any ``nuisance`` regressors to soak up what is left).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import least_squares

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
MIN_EPOCHS = 20  # fewer usable epochs than this is an error: the regression has ~5 parameters per pixel
MAX_FIT_OFFSET_PX = 4.0  # the Gaussian's centre is kept within this of the stamp centre


@dataclass(frozen=True)
class BlendVetting:
    """Where the varying light of one candidate is, relative to the object.

    Attributes
    ----------
    dx, dy
        Offset of the varying light from the object (px, reference-frame axes).
    offset
        ``hypot(dx, dy)`` (px).
    sigma_dx, sigma_dy
        Bootstrap standard deviations of ``dx, dy`` (px).
    sigma_offset
        Standard deviation of the offset along its own direction (px; the bootstrap covariance
        projected on ``(dx, dy) / offset``; the mean of ``sigma_dx, sigma_dy`` when offset is 0).
    offset_significance
        ``sqrt(d^T C^-1 d)``: the offset in units of its bootstrap covariance ``C``.
    amplitude
        Peak of the fitted Gaussian of the variability image (ADU per unit of ``m``, after any
        ``scale`` applied to the stamps).
    amplitude_snr
        ``amplitude`` over its bootstrap standard deviation: is varying light seen at all.
    n_epochs
        Epochs used.
    n_boot
        Bootstrap draws that gave a fit.
    at_bound
        The fitted centre sits on the box it is kept in (:data:`MAX_FIT_OFFSET_PX` from the
        object on an axis): the varying light is farther away (e.g. the wings of a bright
        variable), its direction is meaningful, its offset a lower limit and the bootstrap
        sigma (draws stuck on the bound) meaningless.
    variability_image
        ``b(p)``, the coefficient of ``m`` per pixel of the cropped aligned stamp (ADU per unit
        of ``m``), epoch-frame axes, centre pixel = object.
    variability_error
        Standard errors of ``b(p)`` from the regression's residuals.
    """

    dx: float
    dy: float
    offset: float
    sigma_dx: float
    sigma_dy: float
    sigma_offset: float
    offset_significance: float
    amplitude: float
    amplitude_snr: float
    n_epochs: int
    n_boot: int
    at_bound: bool
    variability_image: np.ndarray
    variability_error: np.ndarray


def model_variation(mjd: np.ndarray, flux: np.ndarray, period_d: float, t0_mjd: float, *,
                    n_bins: int = 50) -> np.ndarray:
    """The normalised variation of the phase-binned flux model at every epoch.

    Parameters
    ----------
    mjd
        Times of the epochs (MJD, days).
    flux
        The object's flux at those times (any linear unit on one photometric scale; NaN for
        missing points, negative values allowed).
    period_d
        Period (days).
    t0_mjd
        Reference epoch of phase 0 (MJD, days).
    n_bins
        Phase bins of the model.

    Returns
    -------
    ndarray
        ``m(t) = F_model(phase(t)) / F_0 - 1`` (dimensionless), with ``F_model`` the median
        flux per phase bin interpolated linearly (circularly) between bin centres and ``F_0``
        the median of the finite fluxes.

    Raises
    ------
    ValueError
        When the period is not positive and finite, or fewer than 3 bins hold a finite flux,
        or the median flux is not positive.
    """
    mjd = np.asarray(mjd, float)
    flux = np.asarray(flux, float)
    if not (np.isfinite(period_d) and period_d > 0):
        raise ValueError(f"model_variation: period {period_d!r} d is not a positive finite number")
    phase = np.mod((mjd - t0_mjd) / period_d, 1.0)
    ok = np.isfinite(flux) & np.isfinite(phase)
    b = np.minimum((phase[ok] * n_bins).astype(int), n_bins - 1)
    med = np.full(n_bins, np.nan)
    for k in np.unique(b):
        med[k] = np.median(flux[ok][b == k])
    have = np.flatnonzero(np.isfinite(med))
    if len(have) < 3:
        raise ValueError(f"model_variation: {len(have)} of {n_bins} phase bins hold a finite flux, 3 needed")
    f0 = float(np.median(flux[ok]))
    if not f0 > 0:
        raise ValueError(f"model_variation: the median flux {f0:.4g} is not positive; no relative variation")
    centres = (have + 0.5) / n_bins
    # circular interpolation: the bins repeated one period before and after
    xp = np.r_[centres - 1.0, centres, centres + 1.0]
    fp = np.r_[med[have], med[have], med[have]]
    model = np.interp(np.where(np.isfinite(phase), phase, 0.0), xp, fp)
    return np.asarray(model / f0 - 1.0)


def _gauss(params: np.ndarray, xx: np.ndarray, yy: np.ndarray, sigma: float) -> np.ndarray:
    amp, x0, y0, c = params
    return np.asarray(amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2.0 * sigma * sigma)) + c)


def _fit_gaussian(b: np.ndarray, err: np.ndarray, sigma_px: float, starts: list[tuple[float, float]]
                  ) -> np.ndarray | None:
    """``(amp, x0, y0, const)`` of the best circular Gaussian fit to ``b`` (None when none converged)."""
    n = b.shape[0]
    c = (n - 1) / 2.0
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    w = 1.0 / err

    def resid(p: np.ndarray) -> np.ndarray:
        return np.asarray(((_gauss(p, xx, yy, sigma_px) - b) * w).ravel())

    best, best_cost = None, np.inf
    amp0 = max(float(np.nanmax(b) - np.nanmedian(b)), 1e-12)
    lo = [0.0, c - MAX_FIT_OFFSET_PX, c - MAX_FIT_OFFSET_PX, -np.inf]
    hi = [np.inf, c + MAX_FIT_OFFSET_PX, c + MAX_FIT_OFFSET_PX, np.inf]
    for x0, y0 in starts:
        p0 = np.array([amp0, np.clip(x0, lo[1] + 1e-6, hi[1] - 1e-6), np.clip(y0, lo[2] + 1e-6, hi[2] - 1e-6),
                       float(np.nanmedian(b))])
        try:
            r = least_squares(resid, p0, bounds=(lo, hi), x_scale=[amp0, 1.0, 1.0, amp0], max_nfev=200)
        except ValueError:
            continue
        if r.cost < best_cost:
            best, best_cost = r.x, r.cost
    return best


def _coefficients(y: np.ndarray, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``y``, the least-squares coefficient of column 1 of ``x`` over the rows where ``w`` is 1.

    ``y`` is ``(n_epochs, n_pix)`` (0 where ``w`` is 0), ``w`` its 0/1 usability, ``x`` the shared design.
    Returns the coefficients and their standard errors from the residuals (inf for a pixel with
    fewer than :data:`MIN_EPOCHS` usable epochs).
    """
    nx = x.shape[1]
    a = (w.T @ (x[:, :, None] * x[:, None, :]).reshape(len(x), -1)).reshape(-1, nx, nx)  # per-pixel normal matrices
    rhs = (w * y).T @ x
    n_use = w.sum(axis=0)
    ok = n_use >= MIN_EPOCHS
    coef = np.zeros((y.shape[1], x.shape[1]))
    inv = np.zeros_like(a)
    inv[ok] = np.linalg.pinv(a[ok])
    coef[ok] = np.einsum("pij,pj->pi", inv[ok], rhs[ok])
    r = (y - x @ coef.T) * w
    s2 = np.sum(r * r, axis=0) / np.maximum(n_use - x.shape[1], 1)
    err = np.where(ok, np.sqrt(np.maximum(s2 * inv[:, 1, 1], 1e-30)), np.inf)
    return coef[:, 1], err


def vet_blend(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray, m: np.ndarray, *, fwhm_px: float,
              jacobian: np.ndarray | None = None, nuisance: np.ndarray | None = None, crop_px: int = 2,
              n_boot: int = 100, seed: int = 0, full_boot_above_px: float = 0.0, n_boot_small: int = 20
              ) -> BlendVetting:
    """Offset of the light that varies in phase with ``m`` from the object, from its per-epoch stamps.

    Parameters
    ----------
    stamps
        ``(n_epochs, n, n)`` pixels (ADU, on one photometric scale; sky not subtracted), ``n`` odd,
        each cut with its centre pixel at the pixel nearest to the object's position in that
        epoch; NaN marks a bad (masked, saturated, off-image) pixel: it and the aligned pixels
        its spline reaches (1 px around) are left out of that epoch's regression.
    dx, dy
        ``(n_epochs,)`` the object's position minus the centre pixel's, per epoch (px, epoch
        frame; within +-0.5).
    m
        ``(n_epochs,)`` normalised model variation (:func:`model_variation`; dimensionless).
    fwhm_px
        Mean PSF FWHM of the epochs (px): the width of the Gaussian fitted to the variability image.
    jacobian
        ``(2, 2)`` mean derivative of the epoch position over the reference position
        (``[[dx/dx_ref, dx/dy_ref], [dy/dx_ref, dy/dy_ref]]``); the offset is mapped to the
        reference frame by its inverse. Identity when None.
    nuisance
        ``(n_epochs, k)`` extra per-epoch regressors (e.g. FWHM, airmass); centred here.
    crop_px
        Pixels cropped from every side of the aligned stamps (the spline shift's edge effects).
    n_boot
        Bootstrap draws over epochs for the uncertainties.
    seed
        Seed of the bootstrap.
    full_boot_above_px, n_boot_small
        A candidate whose fitted offset is below ``full_boot_above_px`` (px; not at the fit
        bound) gets ``n_boot_small`` draws instead of ``n_boot``: a blend rule that needs an
        offset above a threshold cannot flag it whatever its uncertainty, so only the reported
        uncertainty is coarser (the classify stage passes half its ``blend_offset_px``; 0: every
        candidate gets ``n_boot``). Most of the vetting's cost is the bootstrap.

    Returns
    -------
    BlendVetting
        The offset (px, reference frame), its uncertainty and significance, the variability image.

    Raises
    ------
    ValueError
        When the shapes disagree, the stamps are not square with an odd side larger than
        ``2 * crop_px + 2``, fewer than :data:`MIN_EPOCHS` epochs are usable, ``m`` does not
        vary, or no Gaussian can be fitted to the variability image.
    """
    stamps = np.asarray(stamps, float)
    dx, dy, m = (np.asarray(a, float) for a in (dx, dy, m))
    if stamps.ndim != 3 or stamps.shape[1] != stamps.shape[2] or stamps.shape[1] % 2 == 0:
        raise ValueError(f"vet_blend: stamps must be (n_epochs, n, n) with n odd, got shape {stamps.shape}")
    n_ep, n = stamps.shape[0], stamps.shape[1]
    if n - 2 * crop_px < 5:
        raise ValueError(f"vet_blend: stamps of {n} px leave {n - 2 * crop_px} px after cropping {crop_px}; "
                         "cut larger stamps")
    for name, a in (("dx", dx), ("dy", dy), ("m", m)):
        if a.shape != (n_ep,):
            raise ValueError(f"vet_blend: {name} has shape {a.shape}, expected ({n_ep},) like the stamps")
    nuis = np.zeros((n_ep, 0)) if nuisance is None else np.asarray(nuisance, float).reshape(n_ep, -1)
    good = (np.isfinite(stamps).any(axis=(1, 2)) & np.isfinite(dx) & np.isfinite(dy) & np.isfinite(m)
            & np.isfinite(nuis).all(axis=1))
    if good.sum() < MIN_EPOCHS:
        raise ValueError(f"vet_blend: {int(good.sum())} usable epochs (a finite pixel, offsets and model), "
                         f"{MIN_EPOCHS} needed")
    stamps, dx, dy, m, nuis = stamps[good], dx[good], dy[good], m[good], nuis[good]
    if np.std(m) <= 0:
        raise ValueError("vet_blend: the model variation m is constant over the usable epochs; nothing varies")
    k = n - 2 * crop_px
    aligned = np.empty((len(m), k, k))
    bad = np.zeros((len(m), k, k), bool)
    inner = (slice(crop_px, n - crop_px), slice(crop_px, n - crop_px))
    for i in range(len(m)):
        st, nan = stamps[i], ~np.isfinite(stamps[i])
        if nan.any():  # a bad pixel spoils the aligned pixels its spline reaches: they are left out of this epoch
            st = np.where(nan, np.nanmedian(st), st)
            moved = ndimage.shift(nan.astype(float), (-dy[i], -dx[i]), order=1, mode="constant", cval=1.0) > 0
            bad[i] = ndimage.binary_dilation(moved, np.ones((3, 3), bool))[inner]
        aligned[i] = ndimage.shift(st, (-dy[i], -dx[i]), order=3, mode="nearest")[inner]
    ring = np.ones((k, k), bool)
    ring[1:-1, 1:-1] = False
    with warnings.catch_warnings():  # an epoch whose whole ring is bad: NaN sky, the epoch left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        sky = np.nanmedian(np.where(bad, np.nan, aligned)[:, ring], axis=1)
    bad |= ~np.isfinite(sky)[:, None, None]
    aligned -= np.nan_to_num(sky)[:, None, None]
    w = (~bad).reshape(len(m), -1).astype(float)
    y = np.where(bad, 0.0, aligned).reshape(len(m), -1)
    x = np.column_stack([np.ones(len(m)), m - m.mean(), dx - dx.mean(), dy - dy.mean(), nuis - nuis.mean(axis=0)])

    sigma_psf = float(fwhm_px) * FWHM_TO_SIGMA
    c = (k - 1) / 2.0
    b, err = _coefficients(y, w, x)
    b, err = b.reshape(k, k), err.reshape(k, k)
    if np.isfinite(err).sum() < 9:
        raise ValueError(f"vet_blend: {int(np.isfinite(err).sum())} pixels of the aligned stamp have "
                         f"{MIN_EPOCHS} or more good epochs, 9 needed (masked or off the image)")
    b = np.where(np.isfinite(err), b, 0.0)
    snr_img = ndimage.uniform_filter(b / err, size=3)  # 0 where err is inf
    iy, ix = np.unravel_index(int(np.argmax(snr_img)), snr_img.shape)
    fit = _fit_gaussian(b, err, sigma_psf, [(c, c), (float(ix), float(iy))])
    if fit is None:
        raise ValueError("vet_blend: no Gaussian could be fitted to the variability image")
    jac = np.eye(2) if jacobian is None else np.asarray(jacobian, float)
    jinv = np.linalg.inv(jac)
    d_ref = jinv @ np.array([fit[1] - c, fit[2] - c])

    at_bound = bool(max(abs(fit[1] - c), abs(fit[2] - c)) > MAX_FIT_OFFSET_PX - 1e-3)
    if float(np.hypot(*d_ref)) < full_boot_above_px and not at_bound:
        n_boot = min(n_boot, n_boot_small)
    rng = np.random.default_rng(seed)
    draws, amps = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, len(m), len(m))
        bb, _ = _coefficients(y[idx], w[idx], x[idx])
        f = _fit_gaussian(bb.reshape(k, k), err, sigma_psf, [(float(fit[1]), float(fit[2]))])
        if f is not None:
            draws.append(jinv @ np.array([f[1] - c, f[2] - c]))
            amps.append(f[0])
    dd = np.array(draws).reshape(-1, 2)
    cov = np.cov(dd.T) if len(dd) >= 3 else np.full((2, 2), np.nan)
    off = float(np.hypot(*d_ref))
    if off > 0 and np.all(np.isfinite(cov)):
        u = d_ref / off
        sig_off = float(np.sqrt(max(u @ cov @ u, 0.0)))
    else:
        sig_off = float(np.sqrt(np.mean(np.diag(cov))))
    try:
        signif = float(np.sqrt(max(d_ref @ np.linalg.solve(cov, d_ref), 0.0)))
    except np.linalg.LinAlgError:
        signif = float("nan")
    amp_sd = float(np.std(amps)) if len(amps) >= 3 else float("nan")
    return BlendVetting(
        dx=float(d_ref[0]), dy=float(d_ref[1]), offset=off,
        sigma_dx=float(np.sqrt(cov[0, 0])), sigma_dy=float(np.sqrt(cov[1, 1])), sigma_offset=sig_off,
        offset_significance=signif, amplitude=float(fit[0]),
        amplitude_snr=float(fit[0] / amp_sd) if amp_sd > 0 else float("nan"),
        n_epochs=len(m), n_boot=len(dd),
        at_bound=at_bound,
        variability_image=b, variability_error=err)
