"""Simultaneous PSF-fit refinement of positions in a crowded window (DAOPHOT ALLSTAR-like).

A detector gives positions good to a few hundredths of a pixel; the Cramér-Rao bound of a
bright star is a few thousandths. This module closes the gap the classical way: every
star's model (flux x PSF) is rendered into one image; each star is then refitted on its own
stamp *with all its neighbours' models subtracted*: first a linear weighted least-squares
fit of (flux, local sky) at the detector's position (a detector's flux may be far off, and
a position step scaled by a wrong flux overshoots), then ``n_iter`` Gauss-Newton steps of
(flux, dx, dy, local sky), the position steps rescaled to the updated flux; the model image
is re-rendered before each step (Jacobi iterations: every star moves at once from the
previous estimates, so the result does not depend on the order of the stars).

PSF model: any :class:`PixelPSF` (``psf=``: an empirical PSF of the epoch through
:class:`TabulatedPSF`), by default a pixel-integrated Moffat of the block's measured FWHM and ``beta`` (3 by
default: the dense preset's PSF, and close to the wings of real seeing-limited PSFs). The
integral over each pixel is a 3 x 3 sub-pixel average in the central 5 x 5 pixels of a
star and one sample at the pixel centre further out (:func:`render`). A wrong profile
biases fluxes, but for a symmetric PSF it does not bias the centre, which is what is
refined here.

Weights: ``1 / (noise^2 + model / gain)`` (sky + read noise, plus the stars' own Poisson
noise). Steps are capped at ``max_step_px`` (0.25 px) per iteration; a star whose fit fails
(singular system, a non-positive flux) or that ends more than ``max_shift_px`` (0.75 px)
from the detector's position keeps its detector position (``ok`` False). After the
iterations, with ``flux_errors``, one more pass builds the weighted normal matrix of (flux, dx, dy, sky) at the
final estimates: its inverse is the Fisher bound, whose flux term is ``flux_err``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

_SUB = (np.arange(3) - 1) / 3.0  # 3 x 3 sub-pixel offsets for the pixel integral


@dataclass
class RefineResult:
    """Refined positions (same frame as the inputs), fitted fluxes (ADU) and a per-star success mask.

    ``flux_err`` (ADU) is the flux's standard error from the fit's Fisher information
    (the inverse of the weighted normal matrix of flux, position and local sky at the final
    estimates, neighbours fixed); NaN for stars that were not refit.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    ok: np.ndarray
    flux_err: np.ndarray | None = None


class PixelPSF(Protocol):
    """What the fitter needs of a PSF: pixel-integrated values and their offset derivatives.

    ``pixel_grad(du, dv)`` returns ``(p, dp/du, dp/dv)`` for pixel-centre offsets (du, dv)
    from the star (px); ``profile(du, dv)`` returns the pixel-integrated values for the
    (cheaper) rendering of every star's model, which may be approximate far from the core.
    A model may also offer ``stamps(x, y, radius, grad)``: whole square stamps on
    :func:`_stamps`' grid at once, or None where it cannot (:meth:`TabulatedPSF.stamps`, a
    constant empirical PSF's phase tables); the renders and fitters then use it.
    """

    def pixel_grad(self, du: np.ndarray, dv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel-integrated values and their derivatives with respect to du and dv (per px)."""
        ...

    def profile(self, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
        """Pixel-integrated values for rendering."""
        ...


@dataclass(frozen=True)
class MoffatPSF:
    """The analytic pixel-integrated Moffat of a FWHM (px) and beta (the fitter's default PSF)."""

    fwhm_px: float
    beta: float = 3.0

    @property
    def alpha(self) -> float:
        """Moffat core width (px)."""
        return moffat_alpha(self.fwhm_px, self.beta)

    def pixel_grad(self, du: np.ndarray, dv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """See :class:`PixelPSF`."""
        return moffat_pixel_grad(du, dv, self.alpha, self.beta)

    def profile(self, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
        """Pixel centres sampled (the 3 x 3 pixel integral in the central 5 x 5 pixels: :func:`render`)."""
        return _moffat_profile(du, dv, self.alpha, self.beta)


@dataclass(frozen=True)
class TabulatedPSF:
    """Adapter for a PSF object with ``evaluate(du, dv)`` and ``gradient(du, dv)`` (an empirical PSF)."""

    psf: Any

    def pixel_grad(self, du: np.ndarray, dv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """See :class:`PixelPSF`."""
        gu, gv = self.psf.gradient(du, dv)
        return self.psf.evaluate(du, dv), gu, gv

    def profile(self, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
        """See :class:`PixelPSF`."""
        return self.psf.evaluate(du, dv)

    def stamps(self, x: np.ndarray, y: np.ndarray, radius: int, grad: bool) -> tuple[np.ndarray, ...] | None:
        """Stamps on :func:`_stamps`' grid from the wrapped PSF's phase tables, or None where it has none.

        The fast path of :func:`render_psf` and :func:`refine_positions`: a constant empirical PSF
        (:meth:`~survey_proc.photometry.epsf.EmpiricalPSF.stamp_values`) gives every star's
        stamp from its sub-pixel phase. The values are those of ``profile`` / ``pixel_grad`` on
        the same grid to 4e-4 of the peak (the pixels off the image included, unclipped).
        """
        fast = getattr(self.psf, "stamp_values", None)
        if fast is None or getattr(self.psf, "order", 0) != 0:
            return None
        x, y = np.asarray(x, float), np.asarray(y, float)
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            return None  # a position that is no number: evaluated pixel by pixel, as before
        return cast(tuple[np.ndarray, ...], fast(x - np.floor(x + 0.5), y - np.floor(y + 0.5), radius, grad))


def tabled_stamps(psf: Any, x: np.ndarray, y: np.ndarray, radius: int, grad: bool) -> tuple[np.ndarray, ...] | None:
    """``psf.stamps(x, y, radius, grad)`` where the model offers whole stamps (see :class:`PixelPSF`), else None.

    None also for no stars: the caller then evaluates pixel by pixel (``profile`` / ``pixel_grad``).
    """
    fn = getattr(psf, "stamps", None)
    return cast("tuple[np.ndarray, ...] | None", fn(x, y, radius, grad)) if fn is not None and len(x) else None


def as_pixel_psf(psf: Any) -> PixelPSF:
    """``psf`` as the fitter's :class:`PixelPSF` (an object with ``evaluate``/``gradient`` is wrapped)."""
    if hasattr(psf, "pixel_grad") and hasattr(psf, "profile"):
        return cast(PixelPSF, psf)
    if hasattr(psf, "evaluate") and hasattr(psf, "gradient"):
        return TabulatedPSF(psf)
    raise TypeError(f"{type(psf).__name__} is not a PSF model for the fitter: it needs pixel_grad/profile "
                    "or evaluate/gradient (see survey_proc/photometry/psffit.py)")


def moffat_alpha(fwhm_px: float, beta: float) -> float:
    """Moffat core width α (px) for a FWHM (px).

    Parameters
    ----------
    fwhm_px
        FWHM (px).
    beta
        Moffat index.

    Returns
    -------
    float
        α (px).
    """
    return fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def moffat_pixel(du: np.ndarray, dv: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Fraction of a unit-flux Moffat centred at 0 falling in pixels centred at (du, dv) (px).

    Parameters
    ----------
    du, dv
        Pixel-centre offsets from the star (px), broadcastable.
    alpha, beta
        The Moffat profile (α in px).

    Returns
    -------
    ndarray
        Flux fractions (3 x 3 sub-pixel average), the broadcast shape.
    """
    du, dv = np.asarray(du, float), np.asarray(dv, float)
    out = np.zeros(np.broadcast(du, dv).shape)
    norm = (beta - 1.0) / (np.pi * alpha**2) / len(_SUB) ** 2
    for sy in _SUB:
        for sx in _SUB:
            r2 = (du + sx) ** 2 + (dv + sy) ** 2
            out += _tpow(1.0 + r2 / alpha**2, beta)
    return out * norm


def _tpow(t: np.ndarray, beta: float) -> np.ndarray:
    """``t ** -beta`` (integer beta by multiplication: 5x faster than pow)."""
    if beta == 3.0:
        return 1.0 / (t * t * t)
    return t ** (-beta)


def moffat_pixel_grad(du: np.ndarray, dv: np.ndarray, alpha: float, beta: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`moffat_pixel` and its derivatives with respect to ``du`` and ``dv``.

    Parameters
    ----------
    du, dv
        Pixel-centre offsets from the star (px), broadcastable.
    alpha, beta
        The Moffat profile (α in px).

    Returns
    -------
    p, dp_du, dp_dv
        Flux fractions and their derivatives (per px).
    """
    shape = np.broadcast(du, dv).shape
    p = np.zeros(shape)
    gu = np.zeros(shape)
    gv = np.zeros(shape)
    a2 = alpha**2
    for sy in _SUB:
        v = dv + sy
        for sx in _SUB:
            u = du + sx
            t = 1.0 + (u * u + v * v) / a2
            q = _tpow(t, beta)
            p += q
            dq = q / t  # t^-(beta+1)
            gu += u * dq
            gv += v * dq
    norm = (beta - 1.0) / (np.pi * a2) / len(_SUB) ** 2
    k = -2.0 * beta / a2
    return p * norm, gu * (k * norm), gv * (k * norm)


def _stamps(x: np.ndarray, y: np.ndarray, radius: int, shape: tuple[int, int]):
    """Pixel index grids (N, S, S) of stamps centred on the nearest pixels, and an in-image mask."""
    j = np.arange(-radius, radius + 1)
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    py = iy[:, None, None] + j[None, :, None]
    px = ix[:, None, None] + j[None, None, :]
    inside = (py >= 0) & (py < shape[0]) & (px >= 0) & (px < shape[1])
    return np.clip(py, 0, shape[0] - 1), np.clip(px, 0, shape[1] - 1), inside


def render(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, alpha: float, beta: float,
           radius: int) -> np.ndarray:
    """Image of point sources (flux x pixel-integrated Moffat) within ``radius`` px of each.

    The pixel integral (3 x 3 sub-samples) is computed for the central 5 x 5 pixels of each
    star; further out the profile is smooth enough for a single sample at the pixel centre
    (relative error < 1 % there), which makes rendering 4x faster.

    Parameters
    ----------
    shape
        ``(ny, nx)`` of the image (px).
    x, y
        Star positions (px).
    flux
        Total fluxes (ADU).
    alpha, beta
        The Moffat profile (α in px).
    radius
        Half-size of each star's square stamp (px).

    Returns
    -------
    ndarray
        The model image (ADU).
    """
    return _render(shape, x, y, flux, radius, lambda du, dv: _moffat_profile(du, dv, alpha, beta))


def render_psf(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, psf: PixelPSF,
               radius: int) -> np.ndarray:
    """Image of point sources (flux x ``psf.profile``) within ``radius`` px of each (as :func:`render`).

    Parameters
    ----------
    shape
        ``(ny, nx)`` of the image (px).
    x, y
        Star positions (px).
    flux
        Total fluxes (ADU).
    psf
        The PSF model.
    radius
        Half-size of each star's square stamp (px).

    Returns
    -------
    ndarray
        The model image (ADU).
    """
    return _render(shape, x, y, flux, radius, psf.profile, psf)


def _render(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, radius: int,
            profile: Any, psf: Any = None) -> np.ndarray:
    """Sum ``flux x profile(du, dv)`` over each star's ``2 radius + 1`` square stamp into an image.

    Where ``psf`` gives whole stamps (:func:`tabled_stamps`) they are used instead of ``profile``.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    py, px, inside = _stamps(x, y, radius, shape)
    got = tabled_stamps(psf, x, y, radius, False)
    if got is not None:
        prof = got[0]
    else:
        du, dv = np.broadcast_arrays(px - x[:, None, None], py - y[:, None, None])
        prof = profile(np.array(du, float), np.array(dv, float))
    vals = flux[:, None, None] * prof
    img = np.bincount((py * shape[1] + px)[inside], weights=vals[inside], minlength=shape[0] * shape[1])
    return img.reshape(shape)


def _moffat_profile(du: np.ndarray, dv: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """The Moffat sampled at pixel centres, pixel-integrated (3 x 3) in the stamp's central 5 x 5 pixels."""
    a2 = alpha**2
    prof = _tpow(1.0 + (du * du + dv * dv) / a2, beta) * ((beta - 1.0) / (np.pi * a2))
    radius = du.shape[-1] // 2
    c = slice(max(0, radius - 2), radius + 3)
    prof[..., c, c] = moffat_pixel(du[..., c, c], dv[..., c, c], alpha, beta)
    return prof


def damped(a: np.ndarray) -> np.ndarray:
    """Normal matrices ``(N, K, K)`` with a tiny ridge on each diagonal element, relative to that element.

    The parameters' scales differ by many orders (a flux column is the PSF, of order 0.1 per
    pixel; a position column is the flux times its gradient, of order 10^4 for a bright star):
    a ridge of 1e-9 of the *trace* (what this was until the twenty-first session) was several
    times the flux's own diagonal for stars above ~10^4 ADU, which damped every flux step and
    shrank the Fisher flux error (measured: a 40000 ADU star's error 0.60 x its scatter, a
    200000 ADU star's 0.05 x, its flux 0.15 % low after 3 steps). A ridge of ``1e-9`` of each
    diagonal element (plus ``1e-15`` of the trace, so an empty column stays solvable with a zero
    step) keeps the solve regular without changing it.
    """
    d = np.einsum("nii->ni", a)
    out = a.copy()
    idx = np.arange(a.shape[-1])
    out[:, idx, idx] += 1e-9 * d + 1e-15 * d.sum(axis=1, keepdims=True)
    return out


def fit_radii_px(fwhm_px: float, fit_radius_fwhm: float = 1.5, model_radius_fwhm: float = 3.0) -> tuple[int, int]:
    """:func:`refine_positions`' stamp half-size and model rendering radius (px) for a FWHM (px)."""
    rfit = max(2, int(np.ceil(fit_radius_fwhm * fwhm_px)))
    return rfit, max(rfit + 1, int(np.ceil(model_radius_fwhm * fwhm_px)))


def refine_positions(data: np.ndarray, bad: np.ndarray, noise_adu: float, gain_e_per_adu: float,
                     x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm_px: float, *, fit: np.ndarray | None = None,
                     beta: float = 3.0, n_iter: int = 2, fit_radius_fwhm: float = 1.5,
                     model_radius_fwhm: float = 3.0, max_step_px: float = 0.25, max_shift_px: float = 0.75,
                     psf: Any = None, flux_errors: bool = False, model_error_frac: float = 0.0,
                     fixed_light: np.ndarray | None = None) -> RefineResult:
    """Refine the positions of all stars of a window together (see the module docstring).

    Parameters
    ----------
    data
        Background-subtracted window (ADU); ``bad`` pixels are ignored.
    noise_adu, gain_e_per_adu
        Background noise per pixel (ADU) and gain (e-/ADU) for the weights.
    x, y, flux
        Initial positions (px, window frame) and total fluxes (ADU) of every detection.
    fwhm_px, beta
        The PSF (Moffat).
    fit
        Which stars to refit (default all); the others stay where they are but their models
        are still subtracted from their neighbours' stamps.
    psf
        The PSF model (:class:`PixelPSF`, or an object with ``evaluate``/``gradient`` such as
        an empirical PSF); default the Moffat of ``fwhm_px`` and ``beta``.
    flux_errors
        Also compute ``flux_err`` from the Fisher information (one more pass over the
        window, about a third of the fit's cost); otherwise it is all NaN.
    model_error_frac
        The PSF model's own error per pixel as a fraction of the model (DAOPHOT's profile
        error): adds ``(model_error_frac * model)^2`` to each pixel's variance in the weights
        and hence in ``flux_err``.
    fixed_light
        The modelled light of sources that are not in ``x, y`` (ADU per pixel, the window's
        shape; None: none): added to the model, so that it is subtracted from the stars' stamps
        and its Poisson noise weighs them, as if those sources were passed and held. A few stars
        refitted among many held ones then cost only their own rendering per pass.

    Returns
    -------
    RefineResult
    """
    n = len(x)
    x0 = np.asarray(x, float).copy()
    y0 = np.asarray(y, float).copy()
    xc, yc = x0.copy(), y0.copy()
    f = np.clip(np.asarray(flux, float), 1e-3, None).copy()
    ok = np.ones(n, bool)
    ferr = np.full(n, np.nan)
    if n == 0:
        return RefineResult(xc, yc, f, ok, ferr)
    idx = np.flatnonzero(np.ones(n, bool) if fit is None else fit)
    m = len(idx)
    model_psf = MoffatPSF(fwhm_px, beta) if psf is None else as_pixel_psf(psf)
    rfit, rmod = fit_radii_px(fwhm_px, fit_radius_fwhm, model_radius_fwhm)
    good = ~bad
    for it in range(n_iter + 1 + int(flux_errors)):
        flux_only = it == 0  # first a linear (flux, sky) step at the detector's positions
        final = it == n_iter + 1  # no step: the Fisher information at the final estimates
        model = render_psf(data.shape, xc, yc, f, model_psf, rmod)
        if fixed_light is not None:
            model = model + fixed_light
        if m == 0:
            break
        xs, ys, fs = xc[idx], yc[idx], f[idx]
        py, px, inside = _stamps(xs, ys, rfit, data.shape)
        use = inside & good[py, px]
        got = tabled_stamps(model_psf, xs, ys, rfit, True)
        if got is not None:  # a constant empirical PSF: its phase tables
            p, gu, gv = got
        else:
            p, gu, gv = model_psf.pixel_grad(px - xs[:, None, None], py - ys[:, None, None])
        dpx, dpy = -gu, -gv  # d model / d x_c = -d P / d u
        resid = data[py, px] - model[py, px]  # residual of the full model: the star's own step fits it
        mpos = np.clip(model[py, px], 0, None)
        w = use / (noise_adu**2 + mpos / gain_e_per_adu + (model_error_frac * mpos) ** 2)
        if flux_only:
            cols = np.stack([p, np.ones_like(p)], axis=1)
        else:
            cols = np.stack([p, fs[:, None, None] * dpx, fs[:, None, None] * dpy, np.ones_like(p)], axis=1)
        k_par = cols.shape[1]
        cols = cols.reshape(m, k_par, -1)
        wv = w.reshape(m, 1, -1)
        a = np.einsum("nis,njs->nij", cols * wv, cols)
        b = np.einsum("nis,ns->ni", cols * wv, resid.reshape(m, -1))
        a = damped(a)
        if final:
            with np.errstate(invalid="ignore"):
                cov = np.linalg.pinv(a)
            ferr[idx] = np.sqrt(np.clip(cov[:, 0, 0], 0, None))
            break
        try:
            sol = np.linalg.solve(a, b[..., None])[..., 0]
        except np.linalg.LinAlgError:
            sol = np.zeros((m, k_par))
            for k in range(m):
                try:
                    sol[k] = np.linalg.solve(a[k], b[k])
                except np.linalg.LinAlgError:
                    ok[idx[k]] = False
        step = np.zeros((m, 4))
        if flux_only:
            step[:, 0] = sol[:, 0]
        else:
            # the position columns were scaled by the old flux: rescale the steps to the new one
            step[:, :3] = sol[:, :3]
            scale = fs / np.where(fs + sol[:, 0] > 0, fs + sol[:, 0], np.inf)
            step[:, 1:3] *= scale[:, None]
        bad_fit = ~np.isfinite(step).all(axis=1) | (fs + step[:, 0] <= 0)
        ok[idx[bad_fit]] = False
        step[~ok[idx]] = 0.0
        f[idx] = fs + step[:, 0]
        xc[idx] = xs + np.clip(step[:, 1], -max_step_px, max_step_px)
        yc[idx] = ys + np.clip(step[:, 2], -max_step_px, max_step_px)
    moved = np.hypot(xc - x0, yc - y0) > max_shift_px
    ok &= ~moved
    xc[~ok], yc[~ok] = x0[~ok], y0[~ok]
    return RefineResult(xc, yc, f, ok, ferr)
