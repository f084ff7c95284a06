"""Aperture photometry of detections (sep), with windowed centroids and an aperture correction.

Fluxes
------
``flux_aper`` is the flux (ADU) inside a circular aperture of radius
``aperture_fwhm x FWHM`` on the background-subtracted image. The background is sep's
local mesh background (a clipped mode over ``bkg_mesh_px`` meshes), i.e. a local sky at
the scale of the mesh: an annulus in a crowded field is mostly other stars, and the mesh
estimator is robust to them. ``flux`` is the total-flux estimate
``flux_aper x apcorr``, where the aperture correction ``apcorr`` is the median ratio of
the flux within ``apcorr_fwhm x FWHM`` to the flux within the aperture, over bright,
unflagged, isolated stars of the same block. Total fluxes make zero points comparable
with the truth (1 ADU summed over the whole star) and seeing-independent.

Local sky (option ``photometry.local_sky = "annulus"``, default ``"none"``): the aperture flux
less a sigma-clipped annulus median of the mesh-subtracted pixels around each detection
(:func:`local_sky`, :func:`with_local_sky`), for stars on a bright star's halo or a sky finer
than the mesh. Not the default (issue 21, benchmarks/results/issue21-local-sky.md): on the
DECam cutouts it took the injected stars' ratio from 1.47 to 1.28 only (a convex halo, read low
by an annulus median), and on the held-out simulations it added the annulus' noise (sparse
RMS/CRLB with the epoch offset removed 1.21 -> 1.37) and, in the dense field, neighbours' light.

Errors
------
``flux_aper_err`` is sep's: the background noise (the window's global rms) plus the source's
Poisson noise (the detector gain), over the aperture. The total flux's error is that times
``apcorr`` plus, in quadrature, ``s_rel x flux``: the star-to-star scatter of the aperture
correction (:func:`aperture_correction_scatter`, added by the extraction,
:mod:`survey_proc.catalog.extract`). ``flux = flux_aper x apcorr`` assumes each star holds
the median star's share of its light in the aperture; a star holds its own share, which
differs by its sub-pixel phase (on an undersampled PSF a 1-FWHM aperture holds 0.61-0.66 of
a Moffat depending on the phase), by the windowed centroid's error (sep's ``winpos`` pulls
positions up to 0.23 px towards the pixel centre at FWHM 1.2 px) and by the PSF's variation
across the window. The ratio ``F(2 r_ap) / F_ap`` of the stars that give ``apcorr``
measures that scatter on the window's own bright stars, once galaxies (the ratio's upper tail)
are clipped and their noise is taken out by a maximum-likelihood fit that weighs each star by
its precision: 2.2-4.4 % on the SDSS frames (FWHM 1.15-1.2 px),
3.3 % on the Spitzer mosaic, 12-30 % on the 2MASS Galactic-centre mosaics (crowding). Without
it, the injected stars of benchmarks/real.py had z std 3-90 at S/N 20-300 while it was 0.9-1.0
at S/N 5-20: the noise terms were right, the proportional term missing. On the simulated
fields (well-sampled Moffat PSF) it measures a fraction of a per cent and changes little.
The median's own error (``~1.25 s_rel / sqrt(n)``, common to the window's stars and absorbed
by the zero point) is not added. ``snr`` stays the aperture's (the detection significance
the thresholds and star selections use), so ``flux_err`` is no longer ``flux / snr``.
Forced photometry (:mod:`survey_proc.photometry.forced`) does not add the term yet: it needs
the epoch's ``s_rel`` next to its ``apcorr``.

Noise correlations of resampled images (2MASS, Spitzer mosaics) were measured and are not
corrected: the scatter of empty apertures over sep's prediction is 0.84-0.99 (SDSS) and
0.94-1.04 (2MASS J, H) at the 1-1.5 px radii used, rising to 1.2 (SDSS) and 2.2-2.7 (2MASS)
only at 4 px; and the injected stars' z std at S/N 5-20 was 0.6-1.7 before the scatter term.

FWHM
----
The block's FWHM is the median core FWHM (:func:`core_fwhm`, from the log-curvature of
the peak pixel) of its bright, unflagged stars. It sets the apertures, the centroid
window and the match radii.
"""

from __future__ import annotations

import numpy as np
import sep
from scipy import ndimage
from scipy.optimize import minimize_scalar
from scipy.spatial import cKDTree

from survey_proc import vocab as F
from survey_proc.config import PhotometryConfig
from survey_proc.photometry import growth
from survey_proc.vocab import MASK_COSMIC, MASK_SATURATED

MIN_STARS_FOR_FWHM = 5
GROWTH_CORE_FWHM = 2.0  # apcorr_method "growth": the summed core's radius (x FWHM); rings beyond it
FWHM_SNR_STEPS = (20.0, 10.0)  # lower S/N floors tried in turn when too few stars reach apcorr_snr_min
WINDOW_MOVE_MAX_FWHM = 1.5  # a windowed centroid that moved > 1 px is kept only within this many FWHM ...
WINDOW_PEAK_NSIGMA = 3.0  # ... and where a 1-FWHM aperture holds this many sigma more light than at the start


def _isolated(x: np.ndarray, y: np.ndarray, radius_px: float) -> np.ndarray:
    if len(x) < 2:
        return np.ones(len(x), bool)
    tree = cKDTree(np.c_[x, y])
    counts = tree.query_ball_point(np.c_[x, y], radius_px, return_length=True)
    return counts <= 1


def core_fwhm(data: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """FWHM (px) of each star's core from the log-curvature of its peak pixel and the 2 neighbours per axis.

    For a Gaussian ``ln I`` is exactly quadratic, so ``sigma^2 = -1 / (ln I[-1] - 2 ln I[0] + ln I[+1])``
    on each axis wherever the centre lies; for a Moffat(beta) it gives the core width
    (0.94 FWHM at beta = 3). It uses only the 3 x 3 pixels around the peak, so neighbours a
    few pixels away do not bias it (a half-light radius would need an aperture of several
    FWHM, which in a crowded field always holds other stars). NaN where undefined.

    Parameters
    ----------
    data
        Background-subtracted image (ADU).
    x, y
        Star positions (px, image frame).

    Returns
    -------
    ndarray
        FWHM (px) per star.
    """
    ny, nx = data.shape
    ix = np.clip(np.round(x).astype(int), 2, nx - 3)
    iy = np.clip(np.round(y).astype(int), 2, ny - 3)
    # move to the brightest pixel of the 3 x 3 neighbourhood
    offs = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    vals = np.stack([data[iy + dy, ix + dx] for dy, dx in offs])
    best = offs[np.argmax(vals, axis=0)]
    iy = np.clip(iy + best[:, 0], 1, ny - 2)
    ix = np.clip(ix + best[:, 1], 1, nx - 2)
    c = data[iy, ix]
    with np.errstate(divide="ignore", invalid="ignore"):
        lx = np.log(data[iy, ix - 1]) - 2 * np.log(c) + np.log(data[iy, ix + 1])
        ly = np.log(data[iy - 1, ix]) - 2 * np.log(c) + np.log(data[iy + 1, ix])
        var = 0.5 * (-1.0 / lx - 1.0 / ly)
    ok = (lx < 0) & (ly < 0) & (var > 0)
    return np.where(ok, 2.3548 * np.sqrt(np.where(ok, var, 1.0)), np.nan)


def estimate_fwhm(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, snr: np.ndarray,
                  ok: np.ndarray, cfg: PhotometryConfig) -> tuple[float, int]:
    """FWHM (px) of a block: median :func:`core_fwhm` of its brightest clean stars; ``(fwhm, n_stars)``.

    Stars: unflagged, S/N >= ``apcorr_snr_min``, no bad pixel and no other detection within
    3 px; the 300 brightest. When fewer than 5 qualify, the S/N floor steps down to 20, then
    10 (:data:`FWHM_SNR_STEPS`): a crowded, undersampled or shallow image (the 2MASS K mosaic
    has 1 isolated star at S/N 50 but 113 at S/N 20) still measures its seeing instead of
    taking a default 2-8x off. Falls back to ``cfg.fwhm_default_px`` (n_stars = 0) when even
    S/N 10 gives fewer than 5.

    Parameters
    ----------
    data
        Background-subtracted image (ADU).
    bad
        Pixels not to use.
    x, y
        Detection positions (px).
    snr
        A S/N per detection (it selects and ranks the stars).
    ok
        Detections allowed (e.g. without EDGE flags).
    cfg
        Photometry settings (``apcorr_snr_min``, ``fwhm_default_px``).

    Returns
    -------
    fwhm_px, n_stars
        The FWHM (px) and the number of stars that measured it.
    """
    usable = ok & _isolated(x, y, 3.0)
    if usable.any():
        ixs = np.clip(np.round(x).astype(int), 0, data.shape[1] - 1)
        iys = np.clip(np.round(y).astype(int), 0, data.shape[0] - 1)
        usable &= ~ndimage.maximum_filter(bad, size=5)[iys, ixs]
    for snr_min in (cfg.apcorr_snr_min, *(s for s in FWHM_SNR_STEPS if s < cfg.apcorr_snr_min)):
        sel = np.flatnonzero(usable & (snr >= snr_min))
        sel = sel[np.argsort(-snr[sel])[:300]]
        if len(sel) < MIN_STARS_FOR_FWHM:
            continue
        f = core_fwhm(data, x[sel], y[sel])
        f = f[np.isfinite(f) & (f > 0.5) & (f < 50)]
        if len(f) >= MIN_STARS_FOR_FWHM:
            return float(np.median(f)), len(f)
    return cfg.fwhm_default_px, 0


def windowed_centroids(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm_px: float,
                       subpix: int, noise_adu: float | np.ndarray,
                       others_xy: tuple[np.ndarray, np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sep's windowed centroids (Gaussian window of sigma FWHM / 2.355).

    Returns ``(x, y, failed)``. ``failed`` is True where the windowed centroid fails or moves
    more than 1 px from the detection; there the input position is kept, except for a move
    onto a peak (below). sep's notes that the window held a masked pixel (``APER_HASMASKED``:
    sep leaves it out) or reached the image's edge (``APER_TRUNC``) are not failures: on the
    held-out dense survey (epoch 1, against the truth, offset removed) such windowed centroids
    were off by a median 0.058 and 0.088 px at S/N >= 20, the isophotal centres kept in their
    place by 0.170 and 0.376 px (clean ones: 0.046 against 0.124). 16 % of the default survey's
    detections had one of the two. A masked pixel within 1 FWHM of the detection still fails it
    (its own core masked: a saturated star's).

    **A move onto a peak.** A move of more than 1 px is mostly an isophote that holds two
    sources (a star and a faint neighbour or galaxy sep did not split): its isophotal centre
    lies between them, on neither, and an aperture there measures part of each (SDSS injected
    stars at 0.47-0.66 of their flux, z -8 to -20). The windowed centroid is kept there
    (``failed`` still True: the detection is a blend) when it moved at most
    :data:`WINDOW_MOVE_MAX_FWHM` FWHM, no other detection lies within 1 FWHM of it, and an
    aperture of 1 FWHM holds :data:`WINDOW_PEAK_NSIGMA` sigma more light there than at the
    isophotal centre (the window converged on a brighter peak, not a faint source's window
    wandering on noise: on M67's 8.7 px PSF faint sources' windows walk 13-24 px).

    Parameters
    ----------
    data
        Background-subtracted image (ADU).
    bad
        Pixels not to use.
    x, y
        Detection positions (px).
    fwhm_px
        The block's FWHM (px).
    subpix
        sep's sub-pixel sampling.
    noise_adu
        The image's noise (ADU per pixel; a scalar or a map like ``data``).
    others_xy
        Every detection of the window (px; the ones in ``x, y`` included, at those
        positions): a move onto another detection is not kept. None: not checked.
    """
    if len(x) == 0:
        return x.copy(), y.copy(), np.zeros(0, bool)
    sig = np.full(len(x), fwhm_px / 2.3548)
    xw, yw, flag = sep.winpos(data, x, y, sig, mask=bad, subpix=subpix)
    moved = np.hypot(xw - x, yw - y)
    hard = ((flag & ~(sep.APER_HASMASKED | sep.APER_TRUNC)) != 0) | ~np.isfinite(xw) | ~np.isfinite(yw)
    # a masked pixel within 1 FWHM of the detection is its own core (a saturated star's): the centroid of the wings
    # alone is not trusted there
    r = max(1, int(np.ceil(fwhm_px)))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    disc = ox**2 + oy**2 <= fwhm_px**2
    ny, nx = bad.shape
    for i in np.flatnonzero(((flag & sep.APER_HASMASKED) != 0) & ~hard):
        cx, cy = int(np.rint(x[i])), int(np.rint(y[i]))
        y0, y1, x0, x1 = max(0, cy - r), min(ny, cy + r + 1), max(0, cx - r), min(nx, cx + r + 1)
        if y0 < y1 and x0 < x1 and (bad[y0:y1, x0:x1] & disc[y0 - cy + r:y1 - cy + r, x0 - cx + r:x1 - cx + r]).any():
            hard[i] = True
    far = ~hard & (moved > 1.0)
    failed = hard | far
    use = ~failed
    cand = np.flatnonzero(far & (moved <= WINDOW_MOVE_MAX_FWHM * fwhm_px))
    if others_xy is not None and len(cand):
        ox_all, oy_all = np.asarray(others_xy[0], float), np.asarray(others_xy[1], float)
        tree = cKDTree(np.c_[ox_all, oy_all])
        keep = [not any(np.hypot(ox_all[j] - x[i], oy_all[j] - y[i]) > 1e-6  # the detection itself is not another
                        for j in tree.query_ball_point((xw[i], yw[i]), fwhm_px)) for i in cand]
        cand = cand[np.asarray(keep, bool)]
    if len(cand):
        s_new, e_new, _ = sep.sum_circle(data, xw[cand], yw[cand], fwhm_px, err=noise_adu, mask=bad, subpix=5)
        s_old, e_old, _ = sep.sum_circle(data, x[cand], y[cand], fwhm_px, err=noise_adu, mask=bad, subpix=5)
        # the two apertures share pixels: the difference's noise is that of the pixels in one only
        a, d = fwhm_px, moved[cand]
        lens = 2 * a**2 * np.arccos(np.clip(d / (2 * a), 0, 1)) - 0.5 * d * np.sqrt(np.clip(4 * a**2 - d**2, 0, None))
        e_diff = np.hypot(e_new, e_old) * np.sqrt(np.clip(1 - lens / (np.pi * a**2), 0, 1))
        use[cand[s_new - s_old > WINDOW_PEAK_NSIGMA * e_diff]] = True
    return np.where(use, xw, x), np.where(use, yw, y), failed


def mask_bits_in_aperture(bitmask: np.ndarray | None, bad: np.ndarray, x: np.ndarray, y: np.ndarray,
                          r_px: float) -> np.ndarray:
    """Flags for saturated / cosmic / other bad pixels inside each aperture (int32).

    Parameters
    ----------
    bitmask
        The store's mask bits of the window, or None (then every bad pixel is MASKED).
    bad
        Pixels not to use.
    x, y
        Aperture centres (px).
    r_px
        Aperture radius (px).

    Returns
    -------
    ndarray
        Source flags (SATURATED, COSMIC, MASKED) per aperture.
    """
    out = np.zeros(len(x), np.int32)
    if len(x) == 0 or not bad.any():
        return out
    layers = [(bad, F.MASKED)]
    if bitmask is not None:
        layers = [((bitmask & MASK_SATURATED) != 0, F.SATURATED), ((bitmask & MASK_COSMIC) != 0, F.COSMIC),
                  (bad & ((bitmask & (MASK_SATURATED | MASK_COSMIC)) == 0), F.MASKED)]
    for layer, bit in layers:
        if not layer.any():
            continue
        s, _, _ = sep.sum_circle(layer.astype(np.float32), x, y, r_px, subpix=1)
        out[s > 0] |= bit
    return out


def aperture_flux(data: np.ndarray, noise: float | np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray,
                  r_px: float, gain_e_per_adu: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flux and error (ADU) in circular apertures of radius ``r_px``; returns ``(flux, err, truncated)``.

    Parameters
    ----------
    data
        Background-subtracted image (ADU).
    noise
        Background noise (ADU per pixel): one value or a per-pixel map.
    bad
        Pixels left out of the sums.
    x, y
        Aperture centres (px).
    r_px
        Aperture radius (px).
    gain_e_per_adu
        Detector gain (e-/ADU), for the source's Poisson noise.

    Returns
    -------
    flux, err, truncated
        Flux and its error (ADU) per aperture, and whether the aperture leaves the image.
    """
    if len(x) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, bool)
    f, fe, flag = sep.sum_circle(data, x, y, r_px, err=noise, mask=bad, gain=gain_e_per_adu, subpix=5)
    return f, fe, (flag & sep.APER_TRUNC) != 0


def aperture_measure(data: np.ndarray, noise: float | np.ndarray, bad: np.ndarray, mask: np.ndarray | None,
                     x: np.ndarray, y: np.ndarray, r_px: float, gain_e_per_adu: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aperture flux and error (ADU) with the aperture's flags: ``EDGE`` and the mask bits (``(flux, err, flags)``).

    :func:`aperture_flux` plus :func:`mask_bits_in_aperture`, the measurement detections and forced
    points share (parameters as there; ``mask`` the store's mask bits or None).
    """
    f, fe, trunc = aperture_flux(data, noise, bad, x, y, r_px, gain_e_per_adu)
    flags = np.zeros(len(x), np.int32)
    flags[trunc] |= F.EDGE
    flags |= mask_bits_in_aperture(mask, bad, x, y, r_px)
    return f, fe, flags


LOCAL_SKY_CLIP_SIGMA = 3.0  # the annulus' pixels further than this many (MAD) sigma from its median are clipped
LOCAL_SKY_MIN_PX = 20  # fewer annulus pixels left (masks, clipping, image edge): no local sky, the mesh's stays
MEDIAN_NOISE_FACTOR = float(np.sqrt(np.pi / 2.0))  # error of a median over the mean's, for Gaussian noise


def local_sky(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, r_in_px: float, r_out_px: float,
              noise_adu: float | np.ndarray, mask_x: np.ndarray | None = None, mask_y: np.ndarray | None = None,
              mask_r_px: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sky left in ``data`` around each source: a sigma-clipped annulus median; ``(sky, sky_err, n_px)``.

    ``data`` is the mesh-subtracted window, so the median is what the mesh missed at the
    source: a bright star's halo or a gradient finer than the mesh. Pixels of ``bad`` and
    circles of radius ``mask_r_px`` around ``mask_x, mask_y`` (the other detections'
    apertures) are left out, then pixels beyond ``LOCAL_SKY_CLIP_SIGMA`` (MAD) sigma of the
    median are clipped, iteratively (photutils ``CircularAnnulus`` + ``ApertureStats`` with
    astropy's ``SigmaClip``; pixel centres, no partial pixels). The error of the sky per pixel is
    that of a median of ``n_px`` pixels of the window's noise: ``sqrt(pi / 2) noise / sqrt(n_px)``
    (the window's single noise level, as the aperture's own error; a halo's Poisson noise is not
    in it). Where fewer than ``LOCAL_SKY_MIN_PX`` pixels are left, sky and error are 0: the mesh
    sky stays.

    Parameters
    ----------
    data, bad
        Mesh-subtracted window (ADU) and the pixels not to use.
    x, y
        Source positions (px).
    r_in_px, r_out_px
        The annulus' radii (px).
    noise_adu
        The background noise (ADU per pixel): one value or a per-pixel map.
    mask_x, mask_y, mask_r_px
        Circles to leave out of every annulus (px); None: none.

    Returns
    -------
    sky, sky_err, n_px
        Sky per pixel and its error (ADU) and the annulus pixels used, per source.
    """
    from astropy.stats import SigmaClip
    from photutils.aperture import ApertureStats, CircularAnnulus  # type: ignore[import-untyped]

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = len(x)
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
    m = np.asarray(bad, bool).copy()
    if mask_x is not None and mask_y is not None and len(mask_x) and mask_r_px > 0:
        sep.mask_ellipse(m, np.asarray(mask_x, float), np.asarray(mask_y, float), mask_r_px, mask_r_px, 0.0, r=1.0)
    clip = SigmaClip(sigma=LOCAL_SKY_CLIP_SIGMA, maxiters=10, cenfunc="median", stdfunc="mad_std")
    st = ApertureStats(np.asarray(data, float), CircularAnnulus(np.c_[x, y], r_in_px, r_out_px), mask=m,
                       sigma_clip=clip)
    med = np.atleast_1d(np.asarray(st.median, float))
    npx = np.nan_to_num(np.atleast_1d(np.asarray(st.center_aper_area.value, float)), nan=0.0)
    if np.ndim(noise_adu):
        iy = np.clip(np.round(y).astype(int), 0, data.shape[0] - 1)
        ix = np.clip(np.round(x).astype(int), 0, data.shape[1] - 1)
        sig = np.asarray(noise_adu, float)[iy, ix]
    else:
        sig = np.full(n, float(noise_adu))
    good = (npx >= LOCAL_SKY_MIN_PX) & np.isfinite(med)
    sky = np.where(good, med, 0.0)
    err = np.where(good, MEDIAN_NOISE_FACTOR * sig / np.sqrt(np.maximum(npx, 1.0)), 0.0)
    return sky, err, np.where(good, npx, 0).astype(np.int64)


def with_local_sky(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, r_px: float,
                   flux: np.ndarray, flux_err: np.ndarray, noise_adu: float | np.ndarray, r_in_px: float,
                   r_out_px: float, mask_x: np.ndarray | None = None, mask_y: np.ndarray | None = None,
                   min_snr: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Aperture fluxes of radius ``r_px`` less their :func:`local_sky`, and their errors (ADU): ``(flux, err)``.

    The sky per pixel times the aperture's usable area (``bad`` pixels out, as in the sums)
    is subtracted; the sky's error times that area is added to ``flux_err`` in quadrature
    (the annulus' pixels are not the aperture's, so the two are independent). The other
    detections (``mask_x, mask_y``) are masked out to the aperture's radius ``r_px``; their
    wings beyond it are left to the clipping. With ``min_snr`` > 0 the sky is applied (and
    its error added) only where ``|sky| >= min_snr x sky_err``: where the mesh sky is not
    demonstrably wrong the aperture keeps it and its lower noise.

    Why the aperture correction (:func:`aperture_correction`, the flux within ``apcorr_fwhm``
    x FWHM over this flux) keeps the mesh sky: it is one number per block, a median over
    bright stars chosen for having no bright neighbour, so a few of them in a halo do not
    move it; a local sky for the 4-FWHM aperture would need an annulus beyond 4 FWHM (16
    times the aperture's area, mostly neighbours in a crowded field); and the local sky's
    own-star share (the star's light in the annulus, 0.57 % of its flux for a Moffat(3) at
    2-3 FWHM, the default) is a fixed fraction that the ratio's denominator already carries.
    """
    if len(x) == 0:
        return np.asarray(flux, float), np.asarray(flux_err, float)
    sky, sky_err, _ = local_sky(data, bad, x, y, r_in_px, r_out_px, noise_adu, mask_x, mask_y, r_px)
    if min_snr > 0:
        use = np.abs(sky) >= min_snr * sky_err
        sky, sky_err = np.where(use, sky, 0.0), np.where(use, sky_err, 0.0)
    area, _, _ = sep.sum_circle(np.ones(data.shape, np.float32), x, y, r_px, mask=bad, subpix=5)
    area = np.asarray(area, float)
    return np.asarray(flux, float) - area * sky, np.hypot(np.asarray(flux_err, float), area * sky_err)


def _no_bright_neighbour(x: np.ndarray, y: np.ndarray, flux: np.ndarray, idx: np.ndarray, radius_px: float,
                         max_ratio: float) -> np.ndarray:
    """For stars ``idx``: True when no neighbour within ``radius_px`` is brighter than ``max_ratio`` x the star.

    Faint neighbours are allowed: they are unavoidable in crowded fields.
    """
    tree = cKDTree(np.c_[x, y])
    out = np.ones(len(idx), bool)
    for k, (i, near) in enumerate(zip(idx, tree.query_ball_point(np.c_[x[idx], y[idx]], radius_px), strict=True)):
        others = [j for j in near if j != i]
        if others and np.max(flux[others]) > max_ratio * flux[i]:
            out[k] = False
    return out


EXTENDED_SNR_MIN = 10.0  # fainter detections are not judged (their concentration is noise)
EXTENDED_ISOLATION_FWHM = 3.0  # nor those with another detection this close (its light enters the annulus)
EXTENDED_MARGIN = 0.1  # and the excess must be at least this fraction of a star's annulus light


def extended(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, flux_ap: np.ndarray, snr: np.ndarray,
             r_ap_px: float, fwhm_px: float, noise_adu: float, ok: np.ndarray) -> np.ndarray:
    """Detections more extended than the PSF, by their concentration (a boolean per detection).

    The concentration is ``c = F(2 r_ap) / F(r_ap)`` (aperture fluxes, ADU; ``r_ap`` is the
    photometric aperture, 1 FWHM by default). A star's ``c_psf`` is the median over the
    window's bright (S/N >= 50), clean, isolated detections, or a Moffat(3)'s (1.267 for
    1 FWHM) when fewer than 5 qualify. A detection is extended when
    ``c - c_psf`` exceeds both 3 times its noise (the sky noise of the annulus over ``F(1)``)
    and ``EXTENDED_MARGIN (c_psf - 1)``. Only detections with S/N >= 10 and no other detection
    within 3 FWHM are judged: a neighbour's light in the annulus would call every crowded
    star extended. Written here rather than taken from sep's shape parameters because PNet
    has none, and a concentration is what SExtractor's CLASS_STAR and the SDSS
    ``psfMag - cmodelMag`` test measure too.

    Parameters
    ----------
    data, bad
        Background-subtracted window (ADU) and unusable pixels.
    x, y
        Detection positions (px).
    flux_ap, snr
        The aperture flux within ``r_ap_px`` (ADU) and S/N of each detection.
    r_ap_px
        The aperture radius (px).
    fwhm_px, noise_adu
        The window's FWHM (px) and sky noise per pixel (ADU).
    ok
        Detections allowed to be judged and to define ``c_psf`` (no photometry flag).

    Returns
    -------
    numpy.ndarray
        True for the extended ones.
    """
    n = len(x)
    out = np.zeros(n, bool)
    if n == 0:
        return out
    r1, r2 = r_ap_px, 2.0 * r_ap_px
    f2, _, flag2 = sep.sum_circle(data, x, y, r2, mask=bad, subpix=5)
    d, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2) if n > 1 else (np.full((1, 2), np.inf), None)
    alone = d[:, 1] > EXTENDED_ISOLATION_FWHM * fwhm_px
    with np.errstate(divide="ignore", invalid="ignore"):
        c = f2 / flux_ap
        sig = noise_adu * np.sqrt(np.pi * (r2**2 - r1**2)) / flux_ap
    judged = ok & alone & (snr >= EXTENDED_SNR_MIN) & (flux_ap > 0) & (flag2 == 0) & np.isfinite(c)
    bright = judged & (snr >= 50.0)
    c_model = moffat_apcorr(r_ap_px / fwhm_px, 2.0 * r_ap_px / fwhm_px)
    c_psf = float(np.median(c[bright])) if bright.sum() >= MIN_STARS_FOR_FWHM else c_model
    excess = c - c_psf
    out[judged] = (excess[judged] > 3.0 * sig[judged]) & (excess[judged] > EXTENDED_MARGIN * (c_psf - 1.0))
    return out


def moffat_apcorr(r_ap_fwhm: float, r_big_fwhm: float, beta: float = 3.0) -> float:
    """Flux within ``r_big_fwhm`` over flux within ``r_ap_fwhm`` (both in FWHM) for a Moffat profile of ``beta``.

    The enclosed fraction of a Moffat is ``1 - (1 + (r / alpha)^2)^(1 - beta)`` with
    ``alpha = FWHM / (2 sqrt(2^(1/beta) - 1))``: the aperture correction an image gets when
    too few of its stars measure one.
    """
    alpha = 1.0 / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))

    def enclosed(r: float) -> float:
        return 1.0 - (1.0 + (r / alpha) ** 2) ** (1.0 - beta)

    return float(enclosed(r_big_fwhm) / enclosed(r_ap_fwhm))


def moffat_enclosed(r_fwhm: float, beta: float = 3.0) -> float:
    """Share of a Moffat(``beta``) star's flux within ``r_fwhm`` x FWHM of its centre."""
    alpha = 1.0 / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return float(1.0 - (1.0 + (r_fwhm / alpha) ** 2) ** (1.0 - beta))


def model_apcorr(cfg: PhotometryConfig) -> float:
    """The aperture correction of a block too poor in stars to measure one: a Moffat(3)'s.

    :func:`moffat_apcorr` from ``aperture_fwhm`` to ``apcorr_fwhm``; with ``local_sky =
    "annulus"`` the aperture flux is net of the star's own light in the annulus (its mean
    surface brightness there times the aperture's area: 0.57 % of the flux for an annulus
    of 2-3 FWHM, 0.05 % at 3-5), which a measured correction carries in its denominator and
    the model must too.
    """
    e_ap, e_big = moffat_enclosed(cfg.aperture_fwhm), moffat_enclosed(cfg.apcorr_fwhm)
    if cfg.local_sky == "annulus":
        r_in, r_out = cfg.local_sky_inner_fwhm, cfg.local_sky_outer_fwhm
        sb = (moffat_enclosed(r_out) - moffat_enclosed(r_in)) / (np.pi * (r_out**2 - r_in**2))
        e_ap -= sb * np.pi * cfg.aperture_fwhm**2
    return float(e_big / e_ap)


APCORR_MAX_REL_ERROR = 0.1  # a measured aperture correction less certain than this (relative) is refused
#: relative difference between a block's FWHM and the FWHM a stored (PSFEx) correction was computed at beyond
#: which the stored one is not used (its radii would be another FWHM's: ~0.4 % of apcorr per 1 % of FWHM)
STORED_APCORR_FWHM_RTOL = 0.01
#: the photometry settings whose radii a stored correction must share (:func:`stored_apcorr_config`)
_RADII_FIELDS = ("aperture_fwhm", "apcorr_fwhm", "local_sky", "local_sky_inner_fwhm", "local_sky_outer_fwhm")
APCORR_MEASURED = "measured"
APCORR_MOFFAT = "model Moffat(3)"
APCORR_PSFEX = "psfex"  # prefix of the source of a stored (PSFEx) correction: "psfex <file[CCD] at ...>"


def stored_apcorr_config() -> PhotometryConfig:
    """The photometry settings a stored aperture correction is computed with (``ingest --psfex``): the defaults."""
    return PhotometryConfig()


def fallback_apcorr(cfg: PhotometryConfig, fwhm_px: float, stored: float | None = None,
                    stored_fwhm_px: float | None = None, stored_source: str = "") -> tuple[float, str]:
    """The aperture correction of a block too poor in stars to measure one, and where it came from.

    The epoch's stored correction (its PSFEx model's, ``survey-proc ingest --psfex``:
    ``header_apcorr``) when there is one and it applies: computed at the block's FWHM (within
    :data:`STORED_APCORR_FWHM_RTOL`, i.e. the block took the header FWHM it was computed at)
    and with the radii ``cfg`` uses (:func:`stored_apcorr_config`'s). Else the Moffat(3)
    model's (:func:`model_apcorr`), with the reason the stored one was not used.

    Parameters
    ----------
    cfg
        Photometry settings of the run (``aperture_fwhm``, ``apcorr_fwhm``, ``local_sky``...).
    fwhm_px
        The block's FWHM (px).
    stored, stored_fwhm_px, stored_source
        The epoch's stored correction (total / aperture flux), the FWHM (px) its radii were
        scaled with and its source (the store's ``header_apcorr``, ``header_apcorr_fwhm_px``,
        ``header_apcorr_source``); None or NaN: none.

    Returns
    -------
    apcorr, source
        The correction (dimensionless) and ``"psfex <source>"`` or :data:`APCORR_MOFFAT`
        (with ``" (stored correction not used: <why>)"`` when one was refused).
    """
    model = model_apcorr(cfg)
    if stored is None or not np.isfinite(stored) or stored <= 0:
        return model, APCORR_MOFFAT
    ref = stored_apcorr_config()
    diff = [f"{k} {getattr(cfg, k)!r} (stored: {getattr(ref, k)!r})" for k in _RADII_FIELDS
            if getattr(cfg, k) != getattr(ref, k) and (k in ("aperture_fwhm", "apcorr_fwhm", "local_sky")
                                                       or cfg.local_sky == "annulus")]
    why = ""
    if diff:
        why = "other radii: " + ", ".join(diff)
    elif stored_fwhm_px is None or not np.isfinite(stored_fwhm_px) or stored_fwhm_px <= 0:
        why = "no FWHM stored with it"
    elif abs(fwhm_px / stored_fwhm_px - 1.0) > STORED_APCORR_FWHM_RTOL:
        why = f"computed at FWHM {stored_fwhm_px:.3f} px, the block's is {fwhm_px:.3f} px"
    if why:
        return model, f"{APCORR_MOFFAT} (stored correction not used: {why})"
    return float(stored), f"{APCORR_PSFEX} {stored_source}".strip()


def aperture_correction(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, flux_ap: np.ndarray,
                        snr: np.ndarray, ok: np.ndarray, fwhm_px: float, cfg: PhotometryConfig
                        ) -> tuple[float, int, str]:
    """Median ratio of the flux within ``apcorr_fwhm x FWHM`` to the aperture flux; ``(apcorr, n_stars, refused)``.

    Uses the 300 brightest unflagged stars (S/N >= ``apcorr_snr_min``, or 0.4 of it when
    fewer than 5 qualify) with no detected neighbour brighter than 2 % of them within the
    large radius plus one FWHM (in a dense field no star is perfectly alone; 2 % neighbours
    bias a median by < 0.5 %). With fewer than 5 stars it returns the PSF model's value
    (:func:`moffat_apcorr`, a Moffat of beta 3: 1.312 for apertures of 1 and 4 FWHM; it
    used to be 1, i.e. 0.3 mag of the flux missing) with n_stars = 0, and the calibration
    stage replaces it by the field's apcorr(FWHM) relation when other epochs measured it.

    A median that is no measurement is refused, the model's value returned with n_stars = 0
    and ``refused`` saying why (:func:`apcorr_refusal`): below 1 (less light within the large
    radius than within the aperture: the sky under the stars is wrong, as on a nebula, where 5
    stars gave 0.21), or known to no better than :data:`APCORR_MAX_REL_ERROR`.

    With ``cfg.apcorr_method = "growth"`` the same stars' flux within
    ``apcorr_growth_fwhm x FWHM`` is :func:`survey_proc.photometry.growth.outer_flux`'s: a
    core sum within ``GROWTH_CORE_FWHM`` plus ring medians, the stars' wing and the sky left
    by the mesh separated. Where that regression is undetermined (too few stars or rings, an
    implausible wing) the sum within ``apcorr_fwhm`` is kept.

    Parameters
    ----------
    data
        Background-subtracted image (ADU).
    bad
        Pixels not to use.
    x, y
        Detection positions (px).
    flux_ap
        Aperture fluxes (ADU).
    snr
        Aperture S/N per detection.
    ok
        Detections allowed (no photometry or centroid flag).
    fwhm_px
        The block's FWHM (px).
    cfg
        Photometry settings (``apcorr_fwhm``, ``apcorr_snr_min``, ``apcorr_method``).

    Returns
    -------
    apcorr, n_stars, refused
        The correction factor (total / aperture flux), the stars that measured it (0: the
        model's value) and why a measured one was refused ("" if none was).
    """
    idx, fb = _apcorr_stars(data, bad, x, y, flux_ap, snr, ok, fwhm_px, cfg)
    if idx is None or len(idx) < MIN_STARS_FOR_FWHM:  # (it returned 1.0 when the large apertures were flagged)
        return model_apcorr(cfg), 0, ""
    if cfg.apcorr_method == "growth":  # the outer light split into wing and sky; the sum where undetermined
        outer = growth.outer_flux(data, bad, x[idx], y[idx], flux_ap[idx], GROWTH_CORE_FWHM * fwhm_px,
                                  cfg.apcorr_growth_fwhm * fwhm_px)
        if outer is not None:
            idx, fb = idx[outer.good], outer.flux
    ratio = fb / flux_ap[idx]
    refused = apcorr_refusal(ratio)
    if refused:
        return model_apcorr(cfg), 0, refused
    return float(np.median(ratio)), len(idx), ""


def apcorr_refusal(ratio: np.ndarray) -> str:
    """Why the median of the stars' total / aperture flux ``ratio`` is no aperture correction ("" if it is one).

    Refused when the median is below 1 (no point source has less light within a large radius
    than within a smaller one: the sky under the stars is wrong) or when its standard error,
    1.2533 x NMAD / sqrt(n), exceeds :data:`APCORR_MAX_REL_ERROR` of it (on the real images'
    frames it is 0.3-1.1 %; 2MASS K's 41 crowded stars 5.7 %).
    """
    med = float(np.median(ratio))
    if not med >= 1.0:
        return f"measured {med:.3f} on {len(ratio)} stars refused: below 1"
    rel = 1.2533 * 1.4826 * float(np.median(np.abs(ratio - med))) / np.sqrt(len(ratio)) / med
    if rel > APCORR_MAX_REL_ERROR:
        return (f"measured {med:.3f} on {len(ratio)} stars refused: its standard error {rel:.1%} exceeds "
                f"{APCORR_MAX_REL_ERROR:.0%}")
    return ""


def _apcorr_stars(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, flux_ap: np.ndarray,
                  snr: np.ndarray, ok: np.ndarray, fwhm_px: float, cfg: PhotometryConfig,
                  r_big_fwhm: float | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """The stars of :func:`aperture_correction` and their flux within ``r_big_fwhm x FWHM``: ``(idx, flux_big)``.

    ``r_big_fwhm`` defaults to ``cfg.apcorr_fwhm``. ``idx`` is None when fewer than 5 stars
    qualify (the Moffat default applies); it holds the stars whose large aperture is clean (no
    flag), possibly fewer than 5.
    """
    r_big = (cfg.apcorr_fwhm if r_big_fwhm is None else r_big_fwhm) * fwhm_px
    idx = np.zeros(0, np.int64)
    for snr_min in (cfg.apcorr_snr_min, 0.4 * cfg.apcorr_snr_min):  # fainter stars only when needed
        idx = np.flatnonzero(ok & (snr >= snr_min) & (flux_ap > 0))
        idx = idx[np.argsort(-snr[idx])[:300]]
        if len(idx) < MIN_STARS_FOR_FWHM:
            continue
        idx = idx[_no_bright_neighbour(x, y, np.where(flux_ap > 0, flux_ap, 0.0), idx, r_big + fwhm_px, 0.02)]
        if len(idx) >= MIN_STARS_FOR_FWHM:
            break
    if len(idx) < MIN_STARS_FOR_FWHM:
        return None, np.zeros(0)
    fb, _, flag = sep.sum_circle(data, x[idx], y[idx], r_big, mask=bad, subpix=5)
    good = flag == 0
    return idx[good], np.asarray(fb, float)[good]


APCORR_SCATTER_CLIP = 3.0  # stars further than this many of their own sigma from the median are left out (galaxies)
APCORR_SCATTER_RADIUS = 2.0  # the scatter's outer aperture, x the photometric aperture's radius
MIN_STARS_FOR_SCATTER = 20  # fewer: no term (the NMAD of 10 stars is uncertain by a third)


def aperture_correction_scatter(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray,
                                flux_ap: np.ndarray, flux_ap_err: np.ndarray, ok: np.ndarray, fwhm_px: float,
                                noise_adu: float, gain_e_per_adu: float, cfg: PhotometryConfig
                                ) -> tuple[float, int]:
    """Fractional star-to-star scatter of the aperture correction, net of the stars' noise; ``(s_rel, n_stars)``.

    The stars are selected as in :func:`aperture_correction` (S/N = ``flux_ap / flux_ap_err``),
    but the outer aperture is ``APCORR_SCATTER_RADIUS`` times the photometric one: the
    scatter of the aperture fraction (sub-pixel phase, centroid, PSF variation) lives in the
    core, while a 4-FWHM annulus adds sky noise beyond sep's prediction and faint
    neighbours, which made 8-30 stars of a simulated field scatter by 1-3 % although their
    aperture fluxes did not. Each star's ratio ``r_i = F(outer) / F_ap`` has a noise ``e_i`` (the sky
    noise and Poisson noise of the annulus, and the aperture's own error, over ``F_ap``);
    Stars more than ``APCORR_SCATTER_CLIP`` of their sigma from the median are dropped,
    iteratively, with the scatter that brings the normalised residuals
    ``(r_i - median) / sqrt((median s)^2 + e_i^2)`` to a NMAD of 1: the ratio is a
    concentration, and galaxies and blends (a quarter of SDSS's S/N > 50 detections) are its
    upper tail. ``s_rel`` is then the maximum-likelihood scatter of the kept stars
    (:func:`_scatter_student_t`), which weighs each star by its precision: the NMAD counts
    every star alike, so in a field of a hundred candidates whose noise (~1.4 %) is five times
    the scatter, it is set by the faint ones and by any error in their ``e_i`` (on the
    held-out sparse survey it gave 0.47-0.57 % in two epochs whose brightest stars scatter by
    0.2-0.3 %, and bright stars' errors 1.5-3 times too large). 0 with fewer than
    ``MIN_STARS_FOR_SCATTER`` stars.

    Parameters
    ----------
    data, bad
        Background-subtracted window (ADU) and unusable pixels.
    x, y
        Detection positions (px).
    flux_ap, flux_ap_err
        Aperture fluxes and errors (ADU).
    ok
        Detections allowed (no photometry or centroid flag).
    fwhm_px
        The window's FWHM (px).
    noise_adu, gain_e_per_adu
        Background noise (ADU per pixel) and gain (e-/ADU) for the ratios' noise.
    cfg
        Photometry settings (``aperture_fwhm``, ``apcorr_fwhm``, ``apcorr_snr_min``).

    Returns
    -------
    s_rel, n_stars
        The fractional scatter (0 when none is measurable) and the stars left after clipping.
    """
    flux_ap = np.asarray(flux_ap, float)
    flux_ap_err = np.asarray(flux_ap_err, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(flux_ap_err > 0, flux_ap / flux_ap_err, 0.0)
    big_fwhm = APCORR_SCATTER_RADIUS * cfg.aperture_fwhm
    idx, fb = _apcorr_stars(data, bad, x, y, flux_ap, snr, ok, fwhm_px, cfg, big_fwhm)
    if idx is None or len(idx) < MIN_STARS_FOR_SCATTER:
        return 0.0, 0
    fa = flux_ap[idx]
    r = fb / fa
    r_ap, r_big = cfg.aperture_fwhm * fwhm_px, big_fwhm * fwhm_px
    gain = gain_e_per_adu if np.isfinite(gain_e_per_adu) and gain_e_per_adu > 0 else np.inf
    var_ann = noise_adu**2 * np.pi * (r_big**2 - r_ap**2) + np.clip(fb - fa, 0.0, None) / gain
    e = np.sqrt(var_ann / fa**2 + (r - 1.0) ** 2 * (flux_ap_err[idx] / fa) ** 2)
    keep = np.isfinite(r) & np.isfinite(e)
    s_rel = 0.0
    for _ in range(10):
        if keep.sum() < MIN_STARS_FOR_SCATTER:
            return 0.0, 0
        med = float(np.median(r[keep]))
        s_rel = _scatter_for_unit_nmad(r[keep], e[keep], med)
        z = np.abs(r - med) / np.sqrt((med * s_rel) ** 2 + e**2)
        new = keep & (z <= APCORR_SCATTER_CLIP * 1.4826 * float(np.median(z[keep])))
        if (new == keep).all():
            break
        keep = new
    if keep.sum() < MIN_STARS_FOR_SCATTER:
        return 0.0, 0
    return _scatter_student_t(r[keep], e[keep], float(np.median(r[keep]))), int(keep.sum())


SCATTER_T_NU = 4.0  # degrees of freedom of the Student t of _scatter_student_t
# the t's scale over a Gaussian's sigma that a maximum-likelihood t fit returns on Gaussian data
# (solves E[(nu + 1) u^2 / (nu + u^2)] = 1 with u = z / c, z ~ N(0, 1)): with it, s is unbiased for Gaussian ratios
SCATTER_T_SCALE = 0.8310035


def _scatter_student_t(r: np.ndarray, e: np.ndarray, med: float) -> float:
    """Maximum-likelihood fractional scatter ``s`` of ratios ``r`` with noise ``e`` around ``med``.

    Model: ``r_i = med + SCATTER_T_SCALE sqrt((med s)^2 + e_i^2) t_i``, ``t_i`` Student t of
    ``SCATTER_T_NU`` degrees of freedom. A Gaussian likelihood would weigh each star by its
    precision too, but the few stars left beyond 3 sigma after the clip (blends, cosmic-ray
    hits) drove it to 5-10 times the NMAD's value on real frames (2MASS, SDSS); the t's tails
    take them, and ``SCATTER_T_SCALE`` keeps ``s`` unbiased when the ratios are Gaussian
    (Monte Carlo with the held-out sparse field's 90 noise levels: s = 0 / 0.2 / 0.5 / 2 %
    estimated as 0.06 / 0.20 / 0.51 / 1.99 %, spread 0.06-0.21 %, a third of the NMAD
    estimator's; ``tests/test_aperture_errors.py``). Bounded at [0, 1].
    """
    d = np.asarray(r, float) - med
    e = np.asarray(e, float)
    nu = SCATTER_T_NU

    def nll(s: float) -> float:
        scale = SCATTER_T_SCALE * np.sqrt((med * s) ** 2 + e**2)
        return float(np.sum(np.log(scale) + 0.5 * (nu + 1.0) * np.log1p((d / scale) ** 2 / nu)))

    res = minimize_scalar(nll, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-6})
    s = float(res.x)
    return 0.0 if nll(0.0) <= nll(s) else s


def _scatter_for_unit_nmad(r: np.ndarray, e: np.ndarray, med: float) -> float:
    """The fractional ``s`` with NMAD of ``(r - med) / sqrt((med s)^2 + e^2)`` equal to 1 (0 if already <= 1)."""

    def nmad(s: float) -> float:
        return 1.4826 * float(np.median(np.abs(r - med) / np.sqrt((med * s) ** 2 + e**2)))

    if nmad(0.0) <= 1.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while nmad(hi) > 1.0 and hi < 64.0:
        hi *= 2.0
    for _ in range(40):  # bisection: nmad decreases with s
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if nmad(mid) > 1.0 else (lo, mid)
    return hi


def with_scatter(flux: np.ndarray, flux_err: np.ndarray, s_rel: float) -> np.ndarray:
    """``flux_err`` with a fractional error ``s_rel`` of the (non-negative) flux added in quadrature (ADU)."""
    flux = np.asarray(flux, float)
    return np.sqrt(np.asarray(flux_err, float) ** 2 + (s_rel * np.clip(flux, 0.0, None)) ** 2)
