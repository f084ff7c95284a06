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

import functools
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
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


SPLINE_PAD_PX = 12  # what scipy.ndimage pads a stamp with (edge values) before its spline filter in mode "nearest"


@functools.lru_cache(maxsize=8)
def _prefilter_matrix(n: int) -> np.ndarray:
    """``(n, n)``: a line of ``n`` pixels -> its cubic spline coefficients, as ``scipy.ndimage.shift`` computes them.

    scipy pads the line with its edge values by :data:`SPLINE_PAD_PX` and filters the padded
    line (mode ``"nearest"``); the filter is linear, so the central ``n`` coefficients are this
    matrix times the line. A shift of at most 0.5 px evaluated on pixels at least 2 px from the
    edges only reaches those ``n`` coefficients.
    """
    pad = SPLINE_PAD_PX
    eye = np.pad(np.eye(n), ((pad, pad), (0, 0)), mode="edge")
    coef = ndimage.spline_filter1d(eye, 3, axis=0, mode="nearest", output=np.float64)
    return np.asarray(coef[pad:pad + n])


def _bspline_rows(start: np.ndarray, k: int, n: int) -> np.ndarray:
    """``(E, k, n)`` cubic B-spline interpolation weights of positions ``start[e] + 0..k-1`` over ``n`` knots."""
    pos = np.asarray(start, float)[:, None] + np.arange(k)[None, :]
    f = np.floor(pos)
    t = pos - f
    wts = np.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4, -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1, t ** 3], -1) / 6
    rows = np.zeros((len(pos), k, n))
    e_idx, o_idx = np.meshgrid(np.arange(len(pos)), np.arange(k), indexing="ij")
    for j in range(4):
        rows[e_idx, o_idx, f.astype(int) - 1 + j] = wts[..., j]
    return rows


def _spoiled(nan: np.ndarray, dx: np.ndarray, dy: np.ndarray, crop_px: int) -> np.ndarray:
    """``(E, k, k)``: the aligned (shifted, cropped) pixels that a bad input pixel reaches.

    What ``binary_dilation(ndimage.shift(nan, (-dy, -dx), order=1, mode="constant", cval=1) > 0,
    3x3)`` cropped by ``crop_px`` gives per epoch: an output pixel is reached when a bad pixel
    has a non-zero weight in its bilinear interpolation (``floor(o + d)``, and the next pixel
    when the fraction is positive), then 1 px around. For ``|d| <= 0.5`` and ``crop_px >= 2``
    every pixel read lies inside the stamp (the ``cval`` never enters).
    """
    n = nan.shape[1]
    o = np.arange(crop_px - 1, n - crop_px + 1)  # the pixels the 3x3 dilation of the cropped ones reads

    def along(a: np.ndarray, d: np.ndarray, axis: int) -> np.ndarray:
        p = o[None, :] + d[:, None]
        f = np.floor(p).astype(int)
        nxt = (p - f) > 0
        idx0, idx1 = f, np.minimum(f + 1, n - 1)
        if axis == 1:
            g0 = np.take_along_axis(a, idx0[:, :, None], axis=1)
            g1 = np.take_along_axis(a, idx1[:, :, None], axis=1) & nxt[:, :, None]
        else:
            g0 = np.take_along_axis(a, idx0[:, None, :], axis=2)
            g1 = np.take_along_axis(a, idx1[:, None, :], axis=2) & nxt[:, None, :]
        return np.asarray(g0 | g1)

    moved = along(along(nan, dy, 1), dx, 2)  # (E, k + 2, k + 2)
    out = np.zeros_like(moved[:, 1:-1, 1:-1])
    for sy in range(3):
        for sx in range(3):
            out |= moved[:, sy:sy + out.shape[1], sx:sx + out.shape[2]]
    return out


def _align(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray, crop_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Stamps shifted by ``(-dy, -dx)`` and cropped by ``crop_px``, and the aligned pixels a bad pixel spoils.

    The numbers of ``scipy.ndimage.shift(stamp, (-dy, -dx), order=3, mode="nearest")`` per epoch
    (the stamp's cubic spline coefficients, :func:`_prefilter_matrix`, evaluated at the shifted
    pixels) for all epochs at once: the per-epoch calls were most of the vetting's time.
    ``|dx|, |dy| <= 0.5`` and ``crop_px >= 2`` keep every spline tap inside the stamp. A bad
    (NaN) pixel is filled with the epoch's median before the spline; the aligned pixels it
    reaches (:func:`_spoiled`) are returned as bad for that epoch only.
    """
    n_ep, n = stamps.shape[0], stamps.shape[1]
    k = n - 2 * crop_px
    nan = ~np.isfinite(stamps)
    has_nan = np.flatnonzero(nan.any(axis=(1, 2)))
    filled = stamps.copy()
    if len(has_nan):
        med = np.nanmedian(stamps[has_nan].reshape(len(has_nan), -1), axis=1)
        filled[has_nan] = np.where(nan[has_nan], med[:, None, None], stamps[has_nan])
    pm = _prefilter_matrix(n)
    coef = pm @ filled @ pm.T
    ry = _bspline_rows(crop_px + dy, k, n)
    rx = _bspline_rows(crop_px + dx, k, n)
    aligned = (ry @ coef) @ rx.transpose(0, 2, 1)
    bad = np.zeros((n_ep, k, k), bool)
    if len(has_nan):
        bad[has_nan] = _spoiled(nan[has_nan], dx[has_nan], dy[has_nan], crop_px)
    return aligned, bad

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


def _boot_coefficients(y: np.ndarray, w: np.ndarray, x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """:func:`_coefficients`' coefficients for bootstrap draws given as epoch multiplicities.

    ``counts`` is ``(n_draws, n_epochs)``: how often each epoch was drawn (a draw with replacement
    weights the normal equations by it). Returns ``(n_draws, n_pix)`` coefficients of column 1 of
    ``x`` (0 for a pixel with fewer than :data:`MIN_EPOCHS` usable epochs in the draw). Pixels good
    in every epoch share one normal matrix per draw; the others get their own.
    """
    n_ep, nx = x.shape
    n_draws, n_pix = counts.shape[0], y.shape[1]
    xx = (x[:, :, None] * x[:, None, :]).reshape(n_ep, nx * nx)
    rhs = (counts[:, :, None] * x[None, :, :]).transpose(0, 2, 1) @ y  # (draws, nx, pix); y is 0 where w is 0
    a_all = counts @ xx  # (draws, nx * nx): the normal matrix of a pixel good in every epoch
    coef = np.zeros((n_draws, n_pix))
    good_all = w.all(axis=0)
    full = np.flatnonzero(good_all)
    if len(full):
        inv = _inverse(a_all.reshape(n_draws, nx, nx))
        coef[:, full] = np.einsum("bk,bkp->bp", inv[:, 1, :], rhs[:, :, full])
    part = np.flatnonzero(~good_all)
    if len(part):
        # a pixel's matrix is the full one less its bad epochs' terms (sparse: few bad epochs per pixel)
        bad_t, bad_p = np.nonzero(w[:, part] == 0)
        cols = (bad_p[:, None] * nx * nx + np.arange(nx * nx)[None, :]).ravel()
        less = sparse.csr_matrix((xx[bad_t].ravel(), (np.repeat(bad_t, nx * nx), cols)),
                                 shape=(n_ep, len(part) * nx * nx))
        a = (a_all[:, None, :] - np.asarray((less.T @ counts.T).T).reshape(n_draws, len(part), nx * nx))
        a = a.reshape(n_draws, len(part), nx, nx)
        ok = (counts @ w[:, part]) >= MIN_EPOCHS
        inv = np.zeros_like(a)
        inv[ok] = _inverse(a[ok])
        coef[:, part] = np.einsum("bpk,bkp->bp", inv[:, :, 1, :], rhs[:, :, part])
    return coef


def _inverse(a: np.ndarray) -> np.ndarray:
    """Inverses of a stack of square matrices (the pseudo-inverses when one is singular)."""
    try:
        return np.asarray(np.linalg.inv(a))
    except np.linalg.LinAlgError:
        return np.asarray(np.linalg.pinv(a))


FIT_MAX_ITER = 100


def _fit_gaussians(b: np.ndarray, err: np.ndarray, sigma_px: float, x_start: float, y_start: float) -> np.ndarray:
    """:func:`_fit_gaussian` for a stack of images at once (Levenberg-Marquardt, bounds by projection).

    ``b`` is ``(n, k, k)``, all weighted by ``1 / err``; every fit starts at ``(x_start, y_start)``
    with the amplitude and constant :func:`_fit_gaussian` starts from. Returns ``(n, 4)``
    ``(amp, x0, y0, const)``; NaN rows for fits that did not give a finite result. Written for the
    bootstrap, where one scipy ``least_squares`` call per draw was most of the time; the minimum
    found is the same (the fits are smooth 4-parameter problems started near it).
    """
    nb, k = b.shape[0], b.shape[1]
    c = (k - 1) / 2.0
    yy, xx = np.mgrid[0:k, 0:k].astype(float)
    xx, yy = xx.ravel(), yy.ravel()
    wt = (1.0 / err).ravel()
    bf = b.reshape(nb, -1)
    lo = np.array([0.0, c - MAX_FIT_OFFSET_PX, c - MAX_FIT_OFFSET_PX, -np.inf])
    hi = np.array([np.inf, c + MAX_FIT_OFFSET_PX, c + MAX_FIT_OFFSET_PX, np.inf])
    med = np.median(bf, axis=1)
    amp0 = np.maximum(bf.max(axis=1) - med, 1e-12)
    p = np.column_stack([amp0, np.full(nb, np.clip(x_start, lo[1] + 1e-6, hi[1] - 1e-6)),
                         np.full(nb, np.clip(y_start, lo[2] + 1e-6, hi[2] - 1e-6)), med])
    s2 = sigma_px * sigma_px
    scale = np.column_stack([amp0, np.ones(nb), np.ones(nb), amp0])

    def model(q: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.exp(-((xx - q[:, 1:2]) ** 2 + (yy - q[:, 2:3]) ** 2) / (2.0 * s2))
        r = (q[:, 0:1] * g + q[:, 3:4] - data) * wt
        return r, g

    r, g = model(p, bf)
    cost = np.sum(r * r, axis=1)
    lam = np.full(nb, 1e-3)
    active = np.isfinite(cost)
    for _ in range(FIT_MAX_ITER):
        if not active.any():
            break
        ia = np.flatnonzero(active)
        q, ga = p[ia], g[ia]
        ag = q[:, 0:1] * ga
        jac = np.stack([ga, ag * (xx - q[:, 1:2]) / s2, ag * (yy - q[:, 2:3]) / s2, np.ones_like(ga)], -1)
        jac *= wt[None, :, None]
        jtj = jac.transpose(0, 2, 1) @ jac
        grad = np.einsum("bpk,bp->bk", jac, r[ia])
        diag = np.diagonal(jtj, axis1=1, axis2=2)
        damp = jtj + (lam[ia, None] * np.maximum(diag, 1e-30))[:, :, None] * np.eye(4)
        step = np.einsum("bij,bj->bi", np.linalg.pinv(damp), -grad)
        trial = np.clip(q + step, lo, hi)
        rt, gt = model(trial, bf[ia])
        ct = np.sum(rt * rt, axis=1)
        better = np.isfinite(ct) & (ct < cost[ia])
        gain = np.where(better, cost[ia] - ct, 0.0)
        ib = ia[better]
        p[ib], r[ib], g[ib] = trial[better], rt[better], gt[better]
        moved = np.max(np.abs(trial - q) / scale[ia], axis=1)  # in units of scipy's x_scale of _fit_gaussian
        cost[ib] = ct[better]
        lam[ia] = np.where(better, lam[ia] / 3.0, lam[ia] * 4.0)
        done = (better & ((gain <= 1e-12 * np.maximum(cost[ia], 1e-300)) | (moved < 1e-9))) | (lam[ia] > 1e12)
        active[ia[done]] = False
    out = p.copy()
    out[~np.isfinite(cost)] = np.nan
    return out


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
        When the shapes disagree, ``crop_px`` is below 2, the stamps are not square with an odd
        side larger than ``2 * crop_px + 2``, fewer than :data:`MIN_EPOCHS` epochs are usable, ``m`` does not
        vary, or no Gaussian can be fitted to the variability image.
    """
    stamps = np.asarray(stamps, float)
    dx, dy, m = (np.asarray(a, float) for a in (dx, dy, m))
    if stamps.ndim != 3 or stamps.shape[1] != stamps.shape[2] or stamps.shape[1] % 2 == 0:
        raise ValueError(f"vet_blend: stamps must be (n_epochs, n, n) with n odd, got shape {stamps.shape}")
    n_ep, n = stamps.shape[0], stamps.shape[1]
    if crop_px < 2:
        raise ValueError(f"vet_blend: crop_px {crop_px} < 2; the aligned stamp's spline reaches 2 px beyond a "
                         "pixel shifted by up to 0.5 px (crop at least 2)")
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
    aligned, bad = _align(stamps, dx, dy, crop_px)
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
    counts = np.array([np.bincount(rng.integers(0, len(m), len(m)), minlength=len(m)) for _ in range(n_boot)],
                      float).reshape(n_boot, len(m))
    fits = np.zeros((0, 4))
    if n_boot > 0:
        bb = _boot_coefficients(y, w, x, counts)
        fits = _fit_gaussians(bb.reshape(-1, k, k), err, sigma_psf, float(fit[1]), float(fit[2]))
        fits = fits[np.all(np.isfinite(fits), axis=1)]
    draws = (jinv @ np.stack([fits[:, 1] - c, fits[:, 2] - c])).T
    amps = list(fits[:, 0])
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
