"""Neighbours hidden in a brighter star's light, found in the residual of a PSF model (``detection.residual_detect``).

sep thresholds the image and deblends each isophote at ``deblend_nthresh`` levels; a
fainter star 0.5-1.5 FWHM from a brighter one rarely makes a saddle above the threshold,
and stays inside the brighter one's isophote. On the held-out dense survey (FWHM 1.9 px)
these hidden neighbours are what widen the photometric errors of 20-25 mag stars: the
stars whose undetected neighbours add >= 5 % of their light (PSF-weighted) have z NMAD
3-14 and read 0.2 mag bright, while the stars with no such neighbour have z NMAD
0.8-1.2 (benchmarks/RESULTS.md, issue 21, eighteenth session). 50 % of those neighbours
lie 0.5-1 FWHM away at a quarter of the star's flux, 23 % at 1-1.5 FWHM at half of it.

This is DAOPHOT's second pass: every detection of the window is modelled as a Moffat at
its position with the flux of one linear simultaneous fit
(:func:`~survey_proc.photometry.psffit.refine_positions`), the model is subtracted, and
sep runs again on the residual with the same threshold. The residual's noise includes
the model's own error, ``residual_model_error x model`` per pixel (DAOPHOT's profile
error), so a PSF that is not a Moffat leaves no detections in its stars' cores. A
residual source is a candidate when it lies at least ``residual_min_sep_fwhm`` FWHM from
every first-pass position (closer, it is the core's mismatch) and its aperture S/N on the
residual is at least ``residual_min_snr``. The candidates and the first pass are then fitted
together, positions free (two Jacobi passes): a candidate is kept when its fitted flux still
has that S/N and it still lies that far from every fitted first-pass star. Without that
refit a merged pair's isophotal centre, between the two stars, leaves a ghost on the
brighter star's far side.

With ``residual_psf = "epsf"`` the model is the window's empirical PSF
(:func:`~survey_proc.photometry.epsf.build_epsf`, built from the first pass's bright isolated
point sources) and the model error is measured, not assumed: the 75th percentile over the
window's bright (S/N >= 50) point stars of each star's excess residual within 1.5 FWHM
(:func:`profile_errors`). Measured (session 19, scratch): the Moffat(3) of the measured FWHM
misses SDSS's undersampled stars by 0.50-0.54 of the model per pixel (median star; 0.17 on the
dense simulation), the ePSF by 0.00-0.01 (quartile 0.07); so the fixed 10 % error of the Moffat
left the real stars' cores as detections. Where even the chosen PSF's error exceeds
``residual_max_model_error`` (2MASS's crowded, resampled frames: 0.7-0.9) the pass is skipped.
In that mode (:func:`_pairs_in_rounds`) each first-pass star's candidates are tried one per round
(its strongest first, ``PAIR_ROUNDS`` rounds), each pair refitted to convergence with the rest of
the window held (one joint Gauss-Newton system per pair), and a kept pair's photometry
(:class:`PairFit`: both members' fluxes with the profile error in their weights, and each member's
model in the other's aperture) goes to the block (``residual_pair_photometry``,
:mod:`survey_proc.photometry.pairs`). Guards against features of the PSF taken for companions: a
candidate's S/N counts the error its neighbours' model puts into its flux (:func:`model_flux_error`,
with the wing's error measured in a ``WING_FWHM`` ring of the bright stars), companions sharing one
offset and flux ratio from several stars beyond chance are dropped (:func:`shared_offsets`), and
none is kept next to a masked pixel.

Written here rather than taken from photutils (``IterativePSFPhotometry`` does the same
loop) because that needs a fitted PSF model and runs star by star in Python: 4-13x the
pipeline's cost on these fields (issue 21), where this costs one linear fit and one sep
call per window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep
from scipy import ndimage
from scipy.spatial import cKDTree

from survey_proc.config import DetectionConfig
from survey_proc.detect import classical
from survey_proc.photometry import aperture
from survey_proc.photometry.aperture import aperture_flux
from survey_proc.photometry.pairrefine import refine_pairs
from survey_proc.photometry.psffit import (
    MoffatPSF,
    RefineResult,
    _stamps,
    as_pixel_psf,
    fit_radii_px,
    refine_positions,
    render_psf,
    tabled_stamps,
)

MODEL_RADIUS_FWHM = 4.0  # each detection's model is rendered out to this radius (x FWHM)
PAIR_ROUNDS = 2  # "epsf": a first-pass star's candidates tried one at a time, at most this many
# a pair's stars may move this far (x FWHM) in its refit: the residual's peak of a neighbour sits up to ~1 FWHM
# off where the first pass's centre, between the two, was subtracted (0.75 px, the default, lost bright pairs)
PAIR_MAX_SHIFT_FWHM = 1.0
# "epsf": Gauss-Newton steps at most of a pair's joint refit (photometry/pairrefine.py; a converged pair is held).
# On a dense epoch 10 steps leave 0.7 % in flux at the 99th percentile, 30 none. The Jacobi passes it replaced leave
# 19 / 4 / 0.6 % after 10 / 20 / 40 passes (against 200; with the fitter's ridge fixed, psffit.damped)
PAIR_ITER = 30
PROFILE_SNR_MIN = 50.0  # the stars that measure the profile error: fit S/N at least this ...
PROFILE_QUANTILE = 75.0  # ... and the error is this percentile of theirs
# the wing's error is measured in this ring (x FWHM) of the same stars; its light beyond the inner radius gets it
WING_FWHM = (1.5, 3.0)
# companions at one offset (within SHARED_TOL_FWHM) and ratio (within a factor SHARED_RATIO) from SHARED_MIN + 1 or
# more stars, beyond chance, are a PSF feature (shared_offsets)
SHARED_TOL_FWHM = 0.3
SHARED_RATIO = 2.0
SHARED_MIN = 2
PROFILE_MIN_STARS = 3  # fewer such stars: the configured residual_model_error
MAX_FWHM_MISMATCH = 0.3  # an empirical PSF this far (fraction) from the window's FWHM is not used (psfphot's rule)


@dataclass(frozen=True)
class ResidualPSF:
    """The PSF the residual pass subtracts, its error per pixel (fraction of the model), and why.

    ``kind`` is ``"epsf"`` or ``"moffat"``; ``skip`` is True when the model describes the
    window's stars too badly for a residual pass (``why`` says so, as it says why the
    empirical PSF was not used).
    """

    psf: object
    model_error: float
    kind: str
    n_stars: int
    skip: bool = False
    why: str | None = None
    check_fit: bool = False  # keep a candidate only where the joint model describes its pair (residual_max_chi2)
    wing_error: float = 0.0  # "epsf": the model's error beyond WING_FWHM[0] FWHM of a star (fraction of the model)


def profile_errors(data: np.ndarray, bad: np.ndarray, noise_adu: float, gain_e_per_adu: float, x: np.ndarray,
                   y: np.ndarray, flux_adu: np.ndarray, psf: object, fwhm_px: float, sel: np.ndarray,
                   ring_fwhm: tuple[float, float] | None = None) -> np.ndarray:
    """Each selected star's residual beyond its noise, as a fraction of its model per pixel.

    Within 1.5 FWHM of each star of ``sel`` (indices; with ``ring_fwhm = (r0, r1)`` in the ring
    from r0 to r1 FWHM instead: the wing), with every star's model subtracted:
    ``sqrt(max(0, sum(r^2 - var) / sum(model^2)))``, ``var`` the sky, read and the model's
    Poisson noise (ADU^2). Per star, where
    :func:`~survey_proc.photometry.psfphot.model_error_fraction` pools the stars (and so is
    led by the worst: a galaxy or a saturated core).
    """
    p = as_pixel_psf(psf)
    r1 = 1.5 if ring_fwhm is None else ring_fwhm[1]
    model = render_psf(data.shape, x, y, flux_adu, p, max(3, int(np.ceil(max(3.0, r1 + 1.0) * fwhm_px))))
    py, px, inside = _stamps(x[sel], y[sel], max(2, int(np.ceil(r1 * fwhm_px))), data.shape)
    use = inside & ~bad[py, px]
    if ring_fwhm is not None:
        rr = np.hypot(px - x[sel][:, None, None], py - y[sel][:, None, None])
        use &= (rr >= ring_fwhm[0] * fwhm_px) & (rr <= ring_fwhm[1] * fwhm_px)
    m = model[py, px]
    r = data[py, px] - m
    var = noise_adu**2 + np.clip(m, 0, None) / gain_e_per_adu
    excess = np.where(use, r * r - var, 0.0).sum(axis=(1, 2))
    norm = np.maximum(np.where(use, m * m, 0.0).sum(axis=(1, 2)), 1e-30)
    return np.sqrt(np.clip(excess / norm, 0.0, None))


def _reaching(x: np.ndarray, y: np.ndarray, xq: np.ndarray, yq: np.ndarray, reach_px: int) -> np.ndarray:
    """Indices of the stars ``(x, y)`` whose rounded centre lies within ``reach_px`` + 1 px of a query's, per axis.

    A star rendered in a square of half-size ``r`` around its rounded centre reaches a query's
    square of half-size ``h`` only if the centres are within ``r + h`` px on both axes; rendering
    only these stars gives the same pixels there (each pixel's sum holds the same terms in the
    same order).
    """
    if len(xq) == 0 or len(x) == 0:
        return np.zeros(0, np.int64)
    tree = cKDTree(np.c_[np.floor(np.asarray(x, float) + 0.5), np.floor(np.asarray(y, float) + 0.5)])
    hits = tree.query_ball_point(np.c_[np.floor(np.asarray(xq, float) + 0.5), np.floor(np.asarray(yq, float) + 0.5)],
                                 reach_px + 1.0, p=np.inf)
    return np.unique(np.concatenate([np.asarray(h, np.int64) for h in hits] + [np.zeros(0, np.int64)]))


def pair_chi2(data: np.ndarray, bad: np.ndarray, noise_adu: float, gain_e_per_adu: float, x: np.ndarray,
              y: np.ndarray, flux_adu: np.ndarray, psf: object, fwhm_px: float, model_error: float,
              xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray) -> np.ndarray:
    """Chi^2 per pixel of the window's model around each pair (``xa, ya``)-(``xb, yb``) (px).

    The model is every star at ``(x, y)`` with ``flux_adu``; the variance per pixel is the
    sky and read noise, the model's Poisson noise and ``(model_error x model)^2``. Each pair's
    pixels lie within ``d / 2 + 1.5 FWHM`` of its midpoint (``d`` its separation). Two PSFs
    describe a real pair to its noise (~1); a galaxy or a core the PSF misses stays above it.
    """
    xm, ym = 0.5 * (xa + xb), 0.5 * (ya + yb)
    rad = 0.5 * np.hypot(xa - xb, ya - yb) + 1.5 * fwhm_px
    out = np.full(len(xa), np.inf)
    half = int(np.ceil(rad.max())) if len(rad) else 0
    radius = max(3, int(np.ceil(MODEL_RADIUS_FWHM * fwhm_px)))
    near = _reaching(x, y, xm, ym, radius + half)  # the stars whose model reaches the pairs' pixels
    light = render_psf(data.shape, x[near], y[near], flux_adu[near], as_pixel_psf(psf), radius)
    var = noise_adu**2 + np.clip(light, 0.0, None) / gain_e_per_adu + (model_error * light) ** 2
    z2 = (data - light) ** 2 / var
    py, px, inside = _stamps(xm, ym, half, data.shape)
    r2 = (px - xm[:, None, None]) ** 2 + (py - ym[:, None, None]) ** 2
    use = inside & ~bad[py, px] & (r2 <= rad[:, None, None] ** 2)
    n = use.sum(axis=(1, 2))
    s = np.where(use, z2[py, px], 0.0).sum(axis=(1, 2))
    out[n > 0] = s[n > 0] / n[n > 0]
    return out


def residual_psf(image: np.ndarray, bad: np.ndarray, data: np.ndarray, background_adu: np.ndarray,
                 noise_adu: float, gain_e_per_adu: float, x: np.ndarray, y: np.ndarray, flux_adu: np.ndarray,
                 fwhm_px: float, cfg: DetectionConfig, beta: float = 3.0) -> ResidualPSF:
    """The residual pass's PSF model and error for a window (``detection.residual_psf``; module docstring).

    Parameters
    ----------
    image, bad, data, background_adu
        The window's raw pixels (ADU), unusable pixels, background-subtracted pixels and
        background (ADU).
    noise_adu, gain_e_per_adu
        Background noise per pixel (ADU) and gain (e-/ADU).
    x, y, flux_adu
        Every first-pass detection (px, window frame) and a first flux (ADU).
    fwhm_px, beta
        The window's FWHM (px) and the Moffat index of the fallback.
    cfg
        ``residual_psf``, ``residual_model_error`` and ``residual_max_model_error``.

    Returns
    -------
    ResidualPSF
    """
    from survey_proc.photometry.epsf import build_epsf

    moffat = MoffatPSF(fwhm_px, beta)
    if cfg.residual_psf == "moffat":
        return ResidualPSF(moffat, cfg.residual_model_error, "moffat", 0)
    x, y = np.asarray(x, float), np.asarray(y, float)
    f0 = np.clip(np.asarray(flux_adu, float), 1e-3, None)
    r_ap = max(1.0, fwhm_px)
    f_ap, fe_ap, fl = aperture.aperture_measure(data, noise_adu, bad, None, x, y, r_ap, gain_e_per_adu)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr_ap = np.where(fe_ap > 0, f_ap / fe_ap, 0.0)
    point = ~aperture.extended(data, bad, x, y, f_ap, snr_ap, r_ap, fwhm_px, noise_adu, (fl == 0) & (f_ap > 0))
    psf: object = moffat
    kind, n_stars, why = "moffat", 0, None
    try:
        epsf = build_epsf(image, bad, background_adu, noise_adu, x, y, f0, fwhm_px, None,
                          gain_e_per_adu=gain_e_per_adu, order=0, psf_candidate=point)
        if abs(float(epsf.fwhm_px) / fwhm_px - 1.0) <= MAX_FWHM_MISMATCH:
            psf, kind, n_stars = epsf, "epsf", int(epsf.meta.get("n_used", 0))
        else:
            why = (f"the empirical PSF's FWHM {float(epsf.fwhm_px):.2f} px differs from the window's {fwhm_px:.2f} px "
                   f"by more than {MAX_FWHM_MISMATCH:.0%}")
    except ValueError as exc:  # too few usable stars
        why = str(exc)
    fit = refine_positions(data, bad, noise_adu, gain_e_per_adu, x, y, f0, fwhm_px, n_iter=1, psf=psf,
                           flux_errors=True)
    fe = fit.flux_err if fit.flux_err is not None else np.full(len(x), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        bright = fit.ok & point & np.isfinite(fe) & (fe > 0) & (fit.flux / fe >= PROFILE_SNR_MIN)
    sel = np.flatnonzero(bright)
    if len(sel) < PROFILE_MIN_STARS:
        return ResidualPSF(psf, cfg.residual_model_error, kind, n_stars, why=why, check_fit=True)
    err = float(np.percentile(profile_errors(data, bad, noise_adu, gain_e_per_adu, fit.x, fit.y, fit.flux, psf,
                                             fwhm_px, sel), PROFILE_QUANTILE))
    if err > cfg.residual_max_model_error:
        return ResidualPSF(psf, err, kind, n_stars, skip=True,
                           why=(f"the {kind} PSF's profile error {err:.3f} (the {PROFILE_QUANTILE:.0f}th percentile of "
                                f"{len(sel)} bright stars) exceeds residual_max_model_error "
                                f"{cfg.residual_max_model_error:g}: no residual pass"), check_fit=True)
    wing = float(np.percentile(profile_errors(data, bad, noise_adu, gain_e_per_adu, fit.x, fit.y, fit.flux, psf,
                                              fwhm_px, sel, ring_fwhm=WING_FWHM), PROFILE_QUANTILE))
    return ResidualPSF(psf, err, kind, n_stars, why=why, check_fit=True, wing_error=wing)


@dataclass(frozen=True)
class Hidden:
    """The residual's new sources and what they were found on.

    ``objs`` is sep's object array (window frame), ``residual`` and ``noise_adu`` the image
    it ran on and its per-pixel noise (ADU), ``x, y`` the new sources' positions from the
    joint fit (px, window frame).
    """

    objs: np.ndarray
    residual: np.ndarray
    noise_adu: np.ndarray
    x: np.ndarray
    y: np.ndarray
    pairs: PairFit | None = None


@dataclass(frozen=True)
class PairFit:
    """The photometry of the kept sources' pairs from their joint fit (``residual_psf = "epsf"`` only).

    Per kept source (like :attr:`Hidden.x`): its PSF flux and error (ADU), its first-pass star
    (``parent``, an index into the first pass) and that star's position (px) and PSF flux and
    error (ADU) in the same fit: both refitted to convergence with the rest of the window held,
    the fluxes then once more with the measured profile error in the weights and the errors
    from the Fisher information (positions and a local sky free). ``first_flux_adu`` is every
    first-pass star's flux from the linear fit at its first-pass position (ADU), which puts
    the PSF fluxes on the aperture photometry's total-flux scale
    (:func:`survey_proc.photometry.pairs.with_pair_fluxes`).
    """

    flux_adu: np.ndarray
    flux_err_adu: np.ndarray
    parent: np.ndarray
    parent_x: np.ndarray
    parent_y: np.ndarray
    parent_flux_adu: np.ndarray
    parent_flux_err_adu: np.ndarray
    first_flux_adu: np.ndarray
    psf: object = None
    model_error: float = 0.0

    def light_in_apertures(self, shape: tuple[int, int], new_x: np.ndarray, new_y: np.ndarray, r_ap_px: float,
                           fwhm_px: float) -> tuple[np.ndarray, np.ndarray]:
        """The other member's modelled light in each member's aperture (ADU): (parents', new sources').

        Each kept source's model (its PSF flux, at ``new_x, new_y``) summed in its first-pass
        star's aperture (at ``parent_x, parent_y``), and the first-pass stars' models in the new
        sources' apertures; radius ``r_ap_px``, sep's exact circle (``subpix=5``) on the
        rendered models. Its error is :attr:`model_error` times it.
        """
        p = as_pixel_psf(self.psf)
        radius = max(3, int(np.ceil(MODEL_RADIUS_FWHM * fwhm_px)))
        f_new = np.nan_to_num(np.clip(self.flux_adu, 0.0, None))
        f_par = np.nan_to_num(np.clip(self.parent_flux_adu, 0.0, None))
        if len(f_new) == 0:
            return np.zeros(0), np.zeros(0)
        m_new = np.ascontiguousarray(render_psf(shape, new_x, new_y, f_new, p, radius), dtype=np.float64)
        m_par = np.ascontiguousarray(render_psf(shape, self.parent_x, self.parent_y, f_par, p, radius),
                                     dtype=np.float64)
        on_parents = sep.sum_circle(m_new, self.parent_x, self.parent_y, r_ap_px, subpix=5)[0]
        on_new = sep.sum_circle(m_par, np.asarray(new_x, float), np.asarray(new_y, float), r_ap_px, subpix=5)[0]
        return np.asarray(on_parents, float), np.asarray(on_new, float)


def find_hidden(data: np.ndarray, bad: np.ndarray, noise_adu: float, gain_e_per_adu: float, x: np.ndarray,
                y: np.ndarray, flux_adu: np.ndarray, fwhm_px: float, cfg: DetectionConfig, beta: float = 3.0,
                model: ResidualPSF | None = None) -> Hidden:
    """Sources in ``data`` less a PSF model of the detections at ``(x, y)`` (see the module docstring).

    Parameters
    ----------
    data, bad
        The background-subtracted window sep thresholded (ADU) and its bad pixels.
    noise_adu, gain_e_per_adu
        The window's background noise per pixel (ADU) and the gain (e-/ADU).
    x, y, flux_adu
        Every first-pass detection of the window (px, window frame) and a first flux (ADU,
        sep's isophotal one) to start the linear fit from.
    fwhm_px, beta
        The window's FWHM (px) and the Moffat index of the model.
    cfg
        ``residual_model_error``, ``residual_min_sep_fwhm``, ``residual_min_snr`` and sep's
        extraction settings.
    model
        The PSF and its error (:func:`residual_psf`); None: the Moffat of ``fwhm_px`` and
        ``beta`` with ``residual_model_error``.

    Returns
    -------
    Hidden
        The kept residual sources (sep's fields: ``x``, ``y``, ``flux``, ``npix``, ``peak``,
        ``flag``...), the residual and its per-pixel noise (ADU), and the kept sources' fitted
        positions (px).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if model is None:
        model = ResidualPSF(MoffatPSF(fwhm_px, beta), cfg.residual_model_error, "moffat", 0)
    psf = model.psf
    light = np.zeros(data.shape)
    if len(x):
        fit = refine_positions(data, bad, noise_adu, gain_e_per_adu, x, y, np.asarray(flux_adu, float), fwhm_px,
                               n_iter=0, beta=beta, psf=psf)
        light = render_psf(data.shape, x, y, np.clip(fit.flux, 0.0, None), as_pixel_psf(psf),
                           max(3, int(np.ceil(MODEL_RADIUS_FWHM * fwhm_px))))
    residual = np.ascontiguousarray(np.where(bad, 0.0, data - light), dtype=np.float32)
    err = np.ascontiguousarray(np.hypot(noise_adu, model.model_error * light), dtype=np.float32)
    objs, _ = classical.extract(residual, bad, err, cfg)
    if len(objs) == 0 or len(x) == 0:
        return Hidden(objs[:0], residual, err, np.zeros(0), np.zeros(0))
    d, near = cKDTree(np.c_[x, y]).query(np.c_[objs["x"], objs["y"]])
    far = d >= cfg.residual_min_sep_fwhm * fwhm_px
    f, fe, _ = aperture_flux(residual, err, bad, objs["x"], objs["y"], max(1.0, fwhm_px), gain_e_per_adu)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(fe > 0, f / fe, 0.0)
    cand = np.flatnonzero(far & (snr >= cfg.residual_min_snr))
    if model.check_fit:
        return _pairs_in_rounds(data, bad, noise_adu, gain_e_per_adu, x, y, fit.flux, fwhm_px, cfg, model, objs,
                                residual, err, cand, near, f, snr)
    if len(cand) == 0:
        return Hidden(objs[cand], residual, err, np.zeros(0), np.zeros(0))
    # all together again, positions free: a candidate that was only the first model's error (a merged pair's
    # isophotal centre between the two leaves a ghost on the brighter star's far side) loses its flux to its star
    n0 = len(x)
    xs, ys = np.r_[x, objs["x"][cand]], np.r_[y, objs["y"][cand]]
    f_start = np.r_[np.clip(fit.flux, 1.0, None), np.clip(f[cand], 1.0, None)]
    ref = refine_positions(data, bad, noise_adu, gain_e_per_adu, xs, ys, f_start, fwhm_px, n_iter=2, beta=beta,
                           psf=psf, flux_errors=True)
    ok, _, _, _ = _refit_survivors(ref, n0, n0, cfg, fwhm_px)
    return Hidden(objs[cand[ok]], residual, err, ref.x[n0:][ok], ref.y[n0:][ok])


def _refit_survivors(ref: RefineResult, n0: int, n_fixed: int, cfg: DetectionConfig, fwhm_px: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which refitted candidates (``ref``'s entries from ``n_fixed`` on) still have a source's S/N and distance.

    A candidate survives where its fit succeeded, its flux has ``residual_min_snr`` and it lies
    ``residual_min_sep_fwhm`` FWHM from every first-pass star (``ref``'s first ``n0``). Returns the
    mask, each candidate's nearest first-pass star, and the candidates' fluxes and errors (ADU).
    """
    fn = ref.flux[n_fixed:]
    en = ref.flux_err[n_fixed:] if ref.flux_err is not None else np.full(len(fn), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = ref.ok[n_fixed:] & np.isfinite(en) & (en > 0) & (fn / en >= cfg.residual_min_snr)
    d_ref, j_ref = cKDTree(np.c_[ref.x[:n0], ref.y[:n0]]).query(np.c_[ref.x[n_fixed:], ref.y[n_fixed:]])
    return ok & (d_ref >= cfg.residual_min_sep_fwhm * fwhm_px), j_ref, fn, en


def _pairs_in_rounds(data: np.ndarray, bad: np.ndarray, noise_adu: float, gain_e_per_adu: float, x: np.ndarray,
                     y: np.ndarray, first_flux: np.ndarray, fwhm_px: float, cfg: DetectionConfig,
                     model: ResidualPSF, objs: np.ndarray, residual: np.ndarray, err: np.ndarray, cand: np.ndarray,
                     near: np.ndarray, f_cand: np.ndarray, snr: np.ndarray) -> Hidden:
    """``residual_psf = "epsf"``: each first-pass star with its strongest untried candidate, for ``PAIR_ROUNDS`` rounds.

    Per round, one candidate per first-pass star (its strongest not yet tried), each pair
    refitted alone to convergence with the rest of the window held; a candidate is kept where
    its flux has ``residual_min_snr``, it stays ``residual_min_sep_fwhm`` from every first-pass
    star and the pair's chi^2 per pixel is at most ``residual_max_chi2``. A merged pair's
    first-pass centre lies between the two stars and leaves residuals on both sides; the
    brighter star's side (a ghost) is often the stronger, and with both in one refit the
    ghost keeps part of the light: so one at a time, and where the ghost was tried and lost
    its flux to its star, the next round tries the real neighbour.
    """
    n0 = len(x)
    psf = model.psf
    if bad.any() and len(cand):  # a masked pixel in the candidate's or its star's core: its residual is the mask's
        r_px = max(1, int(np.ceil(fwhm_px)))
        yy, xx = np.mgrid[-r_px:r_px + 1, -r_px:r_px + 1]
        near_bad = ndimage.binary_dilation(bad, structure=(xx * xx + yy * yy) <= r_px * r_px)
        ny, nx = bad.shape

        def masked_at(xv: np.ndarray, yv: np.ndarray) -> np.ndarray:
            ix = np.clip(np.floor(xv + 0.5).astype(np.int64), 0, nx - 1)
            iy = np.clip(np.floor(yv + 0.5).astype(np.int64), 0, ny - 1)
            return near_bad[iy, ix]

        cand = cand[~masked_at(np.asarray(objs["x"][cand], float), np.asarray(objs["y"][cand], float))
                    & ~masked_at(x[near[cand]], y[near[cand]])]
    order = cand[np.argsort(-snr[cand], kind="stable")]
    tried = np.zeros(len(objs), bool)
    done = np.zeros(n0, bool)  # first-pass stars that have a kept neighbour
    kept: list[int] = []
    new_x: list[float] = []
    new_y: list[float] = []
    new_f: list[float] = []
    par_x, par_y, par_f = x.copy(), y.copy(), np.clip(np.asarray(first_flux, float), 1.0, None)
    for _ in range(PAIR_ROUNDS):
        todo = order[~tried[order] & ~done[near[order]]]
        if len(todo) == 0:
            break
        _, first = np.unique(near[todo], return_index=True)
        c = np.sort(todo[first])
        tried[c] = True
        # the first pass as it stands (the parents of earlier rounds' pairs refitted) with the kept sources so far
        xs = np.r_[par_x, new_x, objs["x"][c]]
        ys = np.r_[par_y, new_y, objs["y"][c]]
        f_start = np.r_[par_f, new_f, np.clip(f_cand[c], 1.0, None)]
        n_fixed = n0 + len(kept)
        ref = _refit_movers(data, bad, noise_adu, gain_e_per_adu, xs, ys, f_start, fwhm_px, near[c],
                            n_fixed + np.arange(len(c)), psf)
        ok, j_ref, fn, en = _refit_survivors(ref, n0, n_fixed, cfg, fwhm_px)
        if ok.any():  # the same S/N with the model's own error (core and wing) at the candidate in its variance
            e_mod = model_flux_error(data.shape, noise_adu, gain_e_per_adu, ref.x, ref.y, np.clip(ref.flux, 0.0, None),
                                     psf, fwhm_px, model.model_error, model.wing_error, n_fixed + np.flatnonzero(ok))
            with np.errstate(divide="ignore", invalid="ignore"):
                ok[ok] &= fn[ok] / np.hypot(en[ok], e_mod) >= cfg.residual_min_snr
        if ok.any():
            chi2 = pair_chi2(data, bad, noise_adu, gain_e_per_adu, ref.x,
                             ref.y, np.clip(ref.flux, 0.0, None), psf, fwhm_px, model.model_error,
                             ref.x[n_fixed:], ref.y[n_fixed:], ref.x[j_ref], ref.y[j_ref])
            ok &= chi2 <= cfg.residual_max_chi2
        for k in np.flatnonzero(ok):
            p = near[c[k]]
            kept.append(int(c[k]))
            new_x.append(float(ref.x[n_fixed + k]))
            new_y.append(float(ref.y[n_fixed + k]))
            new_f.append(float(max(ref.flux[n_fixed + k], 1.0)))
            par_x[p], par_y[p], par_f[p] = ref.x[p], ref.y[p], max(float(ref.flux[p]), 1.0)
            done[p] = True
    idx = np.asarray(kept, np.int64)
    nx, ny = np.asarray(new_x, float), np.asarray(new_y, float)
    if len(idx) >= SHARED_MIN + 1:  # a feature of the PSF sits at one offset from every bright star: not a companion
        parent = near[idx]
        shared = shared_offsets((nx - par_x[parent]) / fwhm_px, (ny - par_y[parent]) / fwhm_px,
                                np.asarray(new_f, float) / par_f[parent])
        if shared.any():
            p = parent[shared]
            par_x[p], par_y[p] = x[p], y[p]
            par_f[p] = np.clip(np.asarray(first_flux, float)[p], 1.0, None)
            idx, nx, ny = idx[~shared], nx[~shared], ny[~shared]
            new_f = [v for v, s_ in zip(new_f, shared, strict=True) if not s_]
    if len(idx) == 0:
        return Hidden(objs[idx], residual, err, nx, ny)
    pairs = _pair_fit(data, bad, noise_adu, gain_e_per_adu, fwhm_px, x, y, first_flux, par_x, par_y, par_f,
                      nx, ny, np.asarray(new_f, float), near[idx], model)
    return Hidden(objs[idx], residual, err, nx, ny, pairs)


@dataclass(frozen=True)
class _RingPSF:
    """A PSF's profile beyond ``r0_px`` of the star only (its wing), or within it only (its core)."""

    psf: object
    r0_px: float
    wing: bool

    def profile(self, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
        out = as_pixel_psf(self.psf).profile(du, dv)
        far = np.hypot(du, dv) >= self.r0_px
        return np.where(far if self.wing else ~far, out, 0.0)

    def pixel_grad(self, du: np.ndarray, dv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError("a ring of a PSF is only rendered")  # pragma: no cover

    def stamps(self, x: np.ndarray, y: np.ndarray, radius: int, grad: bool) -> tuple[np.ndarray, ...] | None:
        """The ring of the PSF's tabled stamps (:meth:`~survey_proc.photometry.psffit.TabulatedPSF.stamps`)."""
        if grad:
            raise NotImplementedError("a ring of a PSF is only rendered")  # pragma: no cover
        got = tabled_stamps(as_pixel_psf(self.psf), x, y, radius, False)
        if got is None:
            return None
        j = np.arange(-radius, radius + 1)
        fx, fy = x - np.floor(x + 0.5), y - np.floor(y + 0.5)
        far = np.hypot(j[None, None, :] - fx[:, None, None], j[None, :, None] - fy[:, None, None]) >= self.r0_px
        return (np.where(far if self.wing else ~far, got[0], 0.0),)


def model_flux_error(shape: tuple[int, int], noise_adu: float, gain_e_per_adu: float, x: np.ndarray, y: np.ndarray,
                     flux_adu: np.ndarray, psf: object, fwhm_px: float, core_error: float, wing_error: float,
                     idx: np.ndarray) -> np.ndarray:
    """The error (ADU) that the other stars' model errors put into a PSF fit's flux of each star of ``idx``.

    The model of every other star carries ``core_error`` (a fraction of its light) within
    ``WING_FWHM[0]`` FWHM of that star and ``wing_error`` beyond. A PSF's mismatch is smooth,
    of one sign over a star's footprint, so with the fit's weights ``w = p/V`` (``p`` the star's
    PSF, ``V`` sky, read and Poisson noise) it shifts the flux by ``e sum(w L) / sum(w p)``
    (``L`` the others' core or wing light), the two parts in quadrature. A source that is only
    the mismatch of its neighbours' wings has no S/N once this is counted (a sum of independent
    per-pixel errors, sqrt(n_px) smaller, kept such sources between two bright stars).
    """
    p = as_pixel_psf(psf)
    radius = max(3, int(np.ceil(MODEL_RADIUS_FWHM * fwhm_px)))
    r0 = WING_FWHM[0] * fwhm_px
    rfit, _ = fit_radii_px(fwhm_px)
    near = _reaching(x, y, x[idx], y[idx], radius + rfit)  # the stars whose model reaches the stamps
    core = render_psf(shape, x[near], y[near], flux_adu[near], _RingPSF(psf, r0, False), radius)
    wing = render_psf(shape, x[near], y[near], flux_adu[near], _RingPSF(psf, r0, True), radius)
    light = core + wing  # the two rings split each star's profile
    py, px, inside = _stamps(x[idx], y[idx], rfit, shape)
    du, dv = (np.array(a, float) for a in np.broadcast_arrays(px - x[idx][:, None, None], py - y[idx][:, None, None]))
    tabled = tabled_stamps(p, x[idx], y[idx], rfit, False)
    own = tabled[0] if tabled is not None else p.profile(du, dv)
    own_f = flux_adu[idx][:, None, None] * own
    own_core = np.where(np.hypot(du, dv) < r0, own_f, 0.0)
    # the others' light only: the star's own model error is its own profile's, not a neighbour's
    l_core = np.clip(core[py, px] - own_core, 0, None)
    l_wing = np.clip(wing[py, px] - (own_f - own_core), 0, None)
    v0 = noise_adu**2 + np.clip(light[py, px], 0, None) / gain_e_per_adu
    w = np.where(inside, own / v0, 0.0)
    den = np.maximum((w * own).sum(axis=(1, 2)), 1e-30)
    # a PSF's mismatch is smooth: over one star's footprint it has one sign, so it enters the flux coherently
    e_core = core_error * (w * l_core).sum(axis=(1, 2)) / den
    e_wing = wing_error * (w * l_wing).sum(axis=(1, 2)) / den
    return np.hypot(e_core, e_wing)


def shared_offsets(dx_fwhm: np.ndarray, dy_fwhm: np.ndarray, flux_ratio: np.ndarray) -> np.ndarray:
    """The companions that share their offset from their star with more others than chance allows (a PSF feature).

    A companion is isotropic about its star: among the ``m`` others at the same separation
    (within ``SHARED_TOL_FWHM``) and a similar flux ratio (within a factor ``SHARED_RATIO``),
    about ``m tol / (pi r)`` lie within ``tol`` of its offset by chance. A ghost, a spike or
    a lobe the PSF model lacks puts one at the same offset and ratio beside every bright star.
    True where at least ``SHARED_MIN`` others share the offset and that exceeds the chance
    count by 3 sigma + 1.

    Parameters
    ----------
    dx_fwhm, dy_fwhm
        Each companion's offset from its star (FWHM).
    flux_ratio
        Its flux over its star's.

    Returns
    -------
    ndarray of bool
    """
    n = len(dx_fwhm)
    out = np.zeros(n, bool)
    if n <= SHARED_MIN:
        return out
    r = np.hypot(dx_fwhm, dy_fwhm)
    lr = np.log(np.clip(flux_ratio, 1e-6, None))
    similar = (np.abs(r[:, None] - r[None, :]) <= SHARED_TOL_FWHM) & \
        (np.abs(lr[:, None] - lr[None, :]) <= np.log(SHARED_RATIO))
    np.fill_diagonal(similar, False)
    close = similar & (np.hypot(dx_fwhm[:, None] - dx_fwhm[None, :], dy_fwhm[:, None] - dy_fwhm[None, :])
                       <= SHARED_TOL_FWHM)
    count = close.sum(axis=1)
    chance = similar.sum(axis=1) * np.minimum(1.0, SHARED_TOL_FWHM / (np.pi * np.maximum(r, 1e-6)))
    return (count >= SHARED_MIN) & (count > chance + 3.0 * np.sqrt(chance) + 1.0)


def _refit_movers(data: np.ndarray, bad: np.ndarray, noise_adu: float, gain_e_per_adu: float, x: np.ndarray,
                  y: np.ndarray, flux: np.ndarray, fwhm_px: float, first: np.ndarray, second: np.ndarray,
                  psf: object) -> RefineResult:
    """The pairs ``(first[i], second[i])`` refitted jointly to convergence, every other star held.

    The held stars' light is rendered once (with the radius the fitters model with) and passed
    as ``fixed_light``; each pair is one Gauss-Newton system (:func:`refine_pairs`: the Jacobi
    passes of ``refine_positions`` needed ~40 to converge for a pair a FWHM apart). Returns the
    result for every star (the held ones where they were, ``ok``).
    """
    _, rmod = fit_radii_px(fwhm_px)  # the fitters' own
    move = np.zeros(len(x), bool)
    move[first] = True
    move[second] = True
    held = ~move
    fixed = render_psf(data.shape, x[held], y[held], flux[held], as_pixel_psf(psf), rmod)
    pos = np.cumsum(move) - 1  # index among the movers
    r = refine_pairs(data, bad, noise_adu, gain_e_per_adu, x[move], y[move], flux[move], fwhm_px, pos[first],
                     pos[second], n_iter=PAIR_ITER, psf=psf, flux_errors=True,
                     max_shift_px=max(PAIR_MAX_SHIFT_FWHM * fwhm_px, 0.75), fixed_light=fixed)
    xo, yo, fo = x.astype(float).copy(), y.astype(float).copy(), flux.astype(float).copy()
    ok, fe = np.ones(len(x), bool), np.full(len(x), np.nan)
    xo[move], yo[move], fo[move], ok[move] = r.x, r.y, r.flux, r.ok
    if r.flux_err is not None:
        fe[move] = r.flux_err
    return RefineResult(xo, yo, fo, ok, fe)


def _pair_fit(data: np.ndarray, bad: np.ndarray, noise_adu: float, gain_e_per_adu: float, fwhm_px: float,
              x: np.ndarray, y: np.ndarray, first_flux: np.ndarray, par_x: np.ndarray, par_y: np.ndarray,
              par_f: np.ndarray, new_x: np.ndarray, new_y: np.ndarray, new_f: np.ndarray, parent: np.ndarray,
              model: ResidualPSF) -> PairFit:
    """The kept pairs' fluxes and errors (:class:`PairFit`) at their converged positions.

    The window's model holds the first pass (``par_x, par_y, par_f``: the kept sources' parents
    at their refitted positions) and the kept sources (``new_x, new_y, new_f``); the pairs'
    fluxes are fitted once more at those positions with ``model.model_error`` in the weights,
    so that their errors include the PSF's profile error as well as the noise.
    """
    n0 = len(x)
    xs, ys = np.r_[par_x, new_x], np.r_[par_y, new_y]
    f0 = np.r_[par_f, np.clip(new_f, 1.0, None)]
    move = np.zeros(len(xs), bool)
    move[n0:] = True
    move[parent] = True
    e = refine_positions(data, bad, noise_adu, gain_e_per_adu, xs, ys, f0, fwhm_px, fit=move, n_iter=0,
                         psf=model.psf, flux_errors=True, model_error_frac=model.model_error)
    fe = e.flux_err if e.flux_err is not None else np.full(len(xs), np.nan)
    bad_fit = ~e.ok
    flux, flux_err = e.flux.copy(), fe.copy()
    flux[bad_fit], flux_err[bad_fit] = np.nan, np.nan
    px_, py_ = par_x, par_y
    return PairFit(flux_adu=flux[n0:], flux_err_adu=flux_err[n0:], parent=np.asarray(parent, np.int64),
                   parent_x=px_[parent], parent_y=py_[parent], parent_flux_adu=flux[parent],
                   parent_flux_err_adu=flux_err[parent], first_flux_adu=np.asarray(first_flux, float).copy(),
                   psf=model.psf, model_error=float(model.model_error))
