"""Saturated stars' halos in the sky model (``detection.halo_sky``).

The mesh background (:func:`survey_proc.detect.classical.estimate_background`, 32-px meshes
under a 3 x 3 median filter) cannot follow the light of a saturated star: its halo falls by
tens of sigma per pixel over a mesh. Measured on the DECam cutouts of
``../shared/data/real`` (100^2 px around a saturated star with a bleed trail), a star
injected 2 FWHM or more from the saturated core collects, in its 1-FWHM aperture, 1.44 x
its own flux of halo light the mesh left (median over 125 injections, S/N 20-300); the
benchmark's injected stars read 1.42 x their flux (benchmarks/RESULTS.md).

With ``halo_sky`` the sky is the mesh plus a model of each saturated star's light:

- a saturated core is a connected region of bad pixels (saturated or masked) whose rim
  holds a pixel at least ``bright_peak_sigma`` x the noise above the mesh (as
  :mod:`survey_proc.detect.artefacts` defines it). Its centre starts at the point deepest
  inside the region (the maximum of the distance transform: a bleed trail, thinner than the
  core, does not pull it along the columns as the region's centroid would), then moves until
  the rings' first angular harmonic vanishes (:func:`_refine_centre`: 0.5 px off, 30 px out
  on a DECam halo, is +-35 ADU per pixel on either side);
- the model is the median of the pixels of each 1-px ring about that centre (bad pixels and,
  after the first pass, the sources found on the halo-subtracted window left out: a star on a
  ring moves its median), interpolated log-log between the rings' mean radii (a halo is near
  a power law; a linear interpolation, or a polar resampling, reads its convex profile high),
  from the core out to where it falls below :data:`HALO_SIGMA` x the noise (at least 8 FWHM
  beyond the core, at most ``bright_max_radius_fwhm`` FWHM and
  :data:`~survey_proc.detect.artefacts.MAX_RADIUS_PX`), then a power law fitted to its outer
  half down to :data:`TAIL_SIGMA` x the noise (at most :data:`TAIL_FACTOR` x further), so
  that it meets the mesh without a step;
- mesh and model are estimated in turn (:data:`N_ITER` times after the first): the mesh from
  the pixels where the model is below :data:`HALO_SIGMA` x the noise (one level, the mesh's
  lower quartile, when that leaves under a quarter of the window: a cutout that is all halo),
  the model on the image less that mesh.

Diffraction spikes are not modelled: a running median along each ray (how the artefact
suppression models them) is moved by the stars on the ray as much as by the spike (it took
55-80 % of injected stars' aperture light on the DECam cutouts). Detections on a modelled
halo (model >= :data:`ON_HALO_SIGMA` x the noise at their position) are flagged ``HALO``: their
sky rests on the model, they measure neither the block's FWHM nor its aperture correction
(a spike's residual pieces, narrow across, would take the FWHM down to 2.6 px where the
stars' is 4.5), and their errors carry the model's own error on the aperture's scale
(:func:`sky_model_error`: what spikes and lopsided halos leave).

Written here rather than with photutils: photutils has no bright-star halo model (its
``Background2D`` is the mesh estimator sep also implements); survey pipelines model the
halos of bright stars themselves (the Legacy Surveys subtract a radial profile of every
bright Gaia star; SDSS and HSC mask them).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from survey_proc.config import DetectionConfig
from survey_proc.detect import artefacts, classical

#: the model is followed outwards while its edge is at least this x the noise (as the artefact suppression)
HALO_SIGMA = artefacts.HALO_SIGMA
#: sky (mesh) and halo model estimated in turn this many times after the first
N_ITER = 2
#: the halo's power-law tail beyond the profile is followed down to this x the noise ...
TAIL_SIGMA = 0.1
#: ... and at most this x the profile's radius
TAIL_FACTOR = 4.0
#: a tail falling slower than r^-1 is not a star's halo (a nebula, a gradient): no tail
MIN_TAIL_SLOPE = 1.0
#: a detection where the modelled halo is at least this x the noise per pixel is flagged HALO
ON_HALO_SIGMA = 0.1


def _dipole_coefs(res: np.ndarray, ok: np.ndarray, dx: np.ndarray, dy: np.ndarray, pr: np.ndarray, r_max: int,
                  clip: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """The first angular harmonic ``(cos, sin)`` coefficients of ``res`` per integer radius (a clipped fit; 0: none)."""
    ring = np.rint(pr).astype(int)
    c = np.zeros(r_max + 1)
    s = np.zeros(r_max + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos, sin = dx / np.maximum(pr, 1e-9), dy / np.maximum(pr, 1e-9)
    for k in range(1, r_max + 1):
        sel = ok & (ring == k)
        if sel.sum() < 12:
            continue
        v, a, b = res[sel], cos[sel], sin[sel]
        keep = np.ones(v.size, bool)
        coef = np.zeros(3)
        for _ in range(3):
            coef = np.linalg.lstsq(np.c_[np.ones(keep.sum()), a[keep], b[keep]], v[keep], rcond=None)[0]
            r = v - (coef[0] + coef[1] * a + coef[2] * b)
            mad = 1.4826 * np.median(np.abs(r[keep]))
            if not mad > 0:
                break
            keep = np.abs(r) <= clip * mad
        c[k], s[k] = coef[1], coef[2]
    return c, s


def _refine_centre(rest: np.ndarray, bad: np.ndarray, sx: float, sy: float, r_lo: float, r_hi: float,
                   n_iter: int = 4) -> tuple[float, float]:
    """The halo's centre: shifted until its first harmonic over ``[r_lo, r_hi]`` vanishes.

    A centre off by ``(dx, dy)`` leaves ``-dI/dr (dx cos t + dy sin t)`` on each ring: the
    median over the rings of ``-c(r) / I'(r)`` is the shift. 0.5 px off on a DECam halo, 30 px
    out, is +-35 ADU per pixel on either side, which the deepest point of a saturated core
    with a bleed trail does not promise.
    """
    ny, nx = rest.shape
    r_hi_i = int(np.ceil(r_hi))
    for _ in range(n_iter):
        x0, x1 = max(0, int(sx) - r_hi_i - 1), min(nx, int(sx) + r_hi_i + 2)
        y0, y1 = max(0, int(sy) - r_hi_i - 1), min(ny, int(sy) + r_hi_i + 2)
        cut = rest[y0:y1, x0:x1].astype(np.float64)
        ok = ~bad[y0:y1, x0:x1]
        yy, xx = np.mgrid[y0:y1, x0:x1]
        pr = np.hypot(xx - sx, yy - sy)
        r_mean, prof = _ring_profile(cut, ok, pr, r_hi_i)
        if len(prof) < 5:
            break
        c, s = _dipole_coefs(cut - _interp_profile(pr, r_mean, prof), ok, xx - sx, yy - sy, pr, r_hi_i)
        grad = np.interp(np.arange(r_hi_i + 1), r_mean, np.gradient(prof, r_mean))
        k = np.arange(r_hi_i + 1)
        use = (k >= r_lo) & (k <= r_hi) & (grad < 0) & ((c != 0) | (s != 0))
        if use.sum() < 3:
            break
        dx, dy = float(np.median(-c[use] / grad[use])), float(np.median(-s[use] / grad[use]))
        step = np.hypot(dx, dy)
        if step > 3.0:  # not a centring error: an asymmetric halo, left to the first harmonic
            break
        sx, sy = sx + dx, sy + dy
        if step < 0.02:
            break
    return sx, sy


def _ring_profile(cut: np.ndarray, ok: np.ndarray, pr: np.ndarray, r_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Median of the usable pixels per 1-px ring out to ``r_max`` and the rings' mean radius (rings with >= 3 only).

    The pixels themselves, not a polar resampling: interpolating a steep, convex halo between
    pixels would read it high (by ~10 ADU/px 20 px from a DECam saturated star).
    """
    ring = np.rint(pr).astype(int)
    use = ok & (ring <= r_max)
    idx = np.arange(r_max + 1)
    n = np.bincount(ring[use], minlength=r_max + 1)[:r_max + 1]
    with np.errstate(invalid="ignore", divide="ignore"):  # empty rings: NaN, dropped below
        med = np.asarray(ndimage.median(cut[use], ring[use], idx), float)
        rm = np.asarray(ndimage.mean(pr[use], ring[use], idx), float)
    keep = (n >= 3) & np.isfinite(med)
    return rm[keep], med[keep]


def _interp_profile(pr: np.ndarray, r_mean: np.ndarray, prof: np.ndarray) -> np.ndarray:
    """``prof`` (given at the rings' mean radii ``r_mean``) at radii ``pr``.

    Log-log interpolation where both neighbours are positive (a halo is near a power law; a
    linear one reads a convex profile high), linear elsewhere; constant beyond the ends.
    """
    lin = np.interp(pr, r_mean, prof)
    pos = prof > 0
    if pos.sum() < 2:
        return lin
    j = np.clip(np.searchsorted(r_mean, pr), 1, len(r_mean) - 1)
    both = pos[j] & pos[j - 1] & (pr > r_mean[0]) & (pr < r_mean[-1]) & (r_mean[j - 1] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = np.log(np.maximum(r_mean[j - 1], 1e-6)), np.log(r_mean[j])
        t = (np.log(np.maximum(pr, 1e-6)) - lo) / (hi - lo)
        logv = (1 - t) * np.log(np.where(pos[j - 1], prof[j - 1], 1.0)) + t * np.log(np.where(pos[j], prof[j], 1.0))
    return np.where(both, np.exp(np.where(both, logv, 0.0)), lin)


def _power_tail(r: np.ndarray, prof: np.ndarray, r_lo: float) -> tuple[float, float]:
    """``(value at the last ring, slope)`` of a power law ``prof ~ r^-slope`` fitted beyond ``r_lo``; (0, 0): none."""
    sel = (r >= r_lo) & (prof > 0)
    if sel.sum() < 4:
        return 0.0, 0.0
    slope = -float(np.polyfit(np.log(r[sel]), np.log(prof[sel]), 1)[0])
    if not np.isfinite(slope) or slope < MIN_TAIL_SLOPE:
        return 0.0, 0.0
    return float(prof[-1]), slope


def saturated_cores(data: np.ndarray, bad: np.ndarray, noise_adu: float, cfg: DetectionConfig
                    ) -> list[tuple[float, float, float]]:
    """The saturated stars of a window: ``(x, y, core_radius_px)`` each, the largest core first.

    Parameters
    ----------
    data
        The window less its mesh background (ADU).
    bad
        Pixels not to use (saturated, masked, non-finite).
    noise_adu
        The window's background noise (ADU per pixel).
    cfg
        ``bright_peak_sigma``: the rim of a saturated core holds a pixel at least this x the noise.

    Returns
    -------
    list of tuple
        Centre (px, the point deepest inside the region) and radius of the largest disc
        inside it (px).
    """
    if not bad.any():
        return []
    lab, _ = ndimage.label(bad, structure=np.ones((3, 3)))
    level = cfg.bright_peak_sigma * noise_adu
    ny, nx = bad.shape
    out = []
    for k, sl in enumerate(ndimage.find_objects(lab)):
        if sl is None:
            continue
        # the region's box grown by its rim (2 px) and one more for the distance transform
        y0, y1 = max(0, sl[0].start - 3), min(ny, sl[0].stop + 3)
        x0, x1 = max(0, sl[1].start - 3), min(nx, sl[1].stop + 3)
        region = lab[y0:y1, x0:x1] == k + 1
        area = int(region.sum())
        if area < 3:
            continue
        rim = ndimage.binary_dilation(region, iterations=2) & ~bad[y0:y1, x0:x1]
        vals = data[y0:y1, x0:x1][rim]
        if not vals.size or not np.nanmax(vals) >= level:
            continue
        edt = ndimage.distance_transform_edt(np.pad(bad[y0:y1, x0:x1], 1))[1:-1, 1:-1]
        deep = float(edt[region].max())
        yy, xx = np.nonzero(region & (edt >= deep - 0.5))
        out.append((float(xx.mean() + x0), float(yy.mean() + y0), deep, float(area)))
    out.sort(key=lambda s: -s[3])
    return [(x, y, r) for x, y, r, _ in out]


def halo_model(data: np.ndarray, bad: np.ndarray, noise_adu: float, fwhm_px: float, cfg: DetectionConfig,
               ignore: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The light of the window's saturated stars left in ``data`` (ADU per pixel) and how many were modelled.

    Parameters
    ----------
    data
        The window less its sky (ADU).
    bad
        Pixels not to use.
    noise_adu
        The window's background noise (ADU per pixel).
    fwhm_px
        The PSF's FWHM (px): sets how far out the model starts to be followed.
    cfg
        ``bright_peak_sigma`` and ``bright_max_radius_fwhm`` (see the module docstring).
    ignore
        Pixels left out of the ring medians only (the sources on the halo), or None.

    Returns
    -------
    model, n_stars
        The modelled light (0 away from saturated stars) and the number of stars modelled.
    """
    ny, nx = data.shape
    total = np.zeros(data.shape)
    rest = np.array(data, np.float64)  # data less the stars modelled so far
    n_model = 0
    fwhm = max(float(fwhm_px), 1.0)
    skip = bad if ignore is None else bad | ignore
    for sx, sy, r_sat in saturated_cores(data, bad, noise_adu, cfg):
        if not artefacts._has_halo(rest, bad, sx, sy, r_sat + max(3.0 * fwhm, 4.0), HALO_SIGMA * noise_adu):
            continue  # its light is below the noise 3 FWHM out: the mesh holds it
        r_cap = int(np.ceil(r_sat + min(cfg.bright_max_radius_fwhm * fwhm, artefacts.MAX_RADIUS_PX)))
        r_max = min(r_cap, int(np.ceil(r_sat + 8.0 * fwhm)) + 2)
        sx, sy = _refine_centre(rest, skip, sx, sy, r_sat + 1.0, r_sat + 4.0 * fwhm)
        while True:
            x0, x1 = max(0, int(sx) - r_max), min(nx, int(sx) + r_max + 2)
            y0, y1 = max(0, int(sy) - r_max), min(ny, int(sy) + r_max + 2)
            cut = rest[y0:y1, x0:x1].astype(np.float64)
            ok = ~skip[y0:y1, x0:x1]
            yy, xx = np.mgrid[y0:y1, x0:x1]
            pr = np.hypot(xx - sx, yy - sy)
            r_mean, prof = _ring_profile(cut, ok, pr, r_max)
            if r_max >= r_cap or len(prof) < 2 or prof[-2:].max() < HALO_SIGMA * noise_adu:
                break
            r_max = min(r_cap, 2 * r_max)  # still above the floor at the edge: look further
        if len(prof) < 2:
            continue
        model = _interp_profile(pr, r_mean, prof)
        add = np.where(pr <= r_max, model, 0.0)
        total[y0:y1, x0:x1] += add
        rest[y0:y1, x0:x1] -= add
        # beyond r_max a power law matched to the profile's outer half, until it is below TAIL_SIGMA x the noise
        amp, slope = _power_tail(r_mean, prof, max(r_sat + 2.0 * fwhm, 0.5 * r_max))
        if amp > 0 and prof[-1] > TAIL_SIGMA * noise_adu:
            r_end = float(r_mean[-1])
            r_tail = min(r_end * (prof[-1] / (TAIL_SIGMA * noise_adu)) ** (1.0 / slope), TAIL_FACTOR * r_end)
            t0, t1 = max(0, int(sx - r_tail)), min(nx, int(np.ceil(sx + r_tail)) + 1)
            u0, u1 = max(0, int(sy - r_tail)), min(ny, int(np.ceil(sy + r_tail)) + 1)
            ty, tx = np.mgrid[u0:u1, t0:t1]
            tr = np.hypot(tx - sx, ty - sy)
            with np.errstate(divide="ignore"):
                tail = prof[-1] * (np.maximum(tr, r_end) / r_end) ** (-slope)
            add = np.where((tr > r_max) & (tr <= r_tail), tail, 0.0)
            total[u0:u1, t0:t1] += add
            rest[u0:u1, t0:t1] -= add
        n_model += 1
    return total, n_model


def _sources(res: np.ndarray, bad: np.ndarray, noise_adu: float, fwhm_px: float) -> np.ndarray:
    """The pixels of the sources on a halo-subtracted window (sep's segments at 3 sigma, grown by 1 px).

    Left out of the ring medians: a bright star on a ring moves its median (by 1-2 % of the star's
    aperture flux on the test field), and spikes move it too. Not within 2 FWHM of a bad region
    (a saturated core's rim is the halo itself).
    """
    import sep

    data = np.ascontiguousarray(np.where(bad, 0.0, res), dtype=np.float32)
    try:
        _, seg = sep.extract(data, 3.0, err=float(noise_adu), mask=bad, minarea=5, segmentation_map=True)
    except Exception:  # sep's buffers (a window of a plate core): no masking rather than no halo
        return np.zeros(bad.shape, bool)
    src = ndimage.binary_dilation(seg > 0, iterations=1)
    near_bad = ndimage.binary_dilation(bad, iterations=max(1, int(np.ceil(2.0 * fwhm_px))))
    return src & ~near_bad


def background_with_halos(image: np.ndarray, bad: np.ndarray, cfg: DetectionConfig, fwhm_px: float
                          ) -> tuple[classical.Background, np.ndarray]:
    """The mesh background plus the saturated stars' halos (see the module docstring).

    Parameters
    ----------
    image
        The window's pixels (ADU, sky not subtracted).
    bad
        Pixels not to use.
    cfg
        Detection settings (mesh, filter, ``bright_peak_sigma``, ``bright_max_radius_fwhm``).
    fwhm_px
        The PSF's FWHM as known before detection (px): the header's or the default.

    Returns
    -------
    background, halo
        The background (``back`` includes the halo model; ``rms`` and ``global_rms`` are
        the mesh's) and the halo model alone (ADU per pixel; all 0 without saturated stars).
    """
    b0 = classical.estimate_background(image, bad, cfg)
    h1, n = halo_model(np.where(bad, 0.0, image - b0.back), bad, b0.global_rms, fwhm_px, cfg)
    if n == 0:
        return b0, np.zeros(image.shape, np.float32)
    h2 = h1
    for _ in range(N_ITER):
        lit = bad | (np.abs(h2) >= HALO_SIGMA * b0.global_rms)  # the mesh from the sky beyond the halo
        if lit.mean() > 0.75:  # (almost) all halo: one sky level, that of the faintest quarter of the mesh
            b1 = classical.Background(back=np.full(image.shape, float(np.percentile(b0.back, 25)), np.float32),
                                      rms=b0.rms, global_rms=b0.global_rms)
        else:
            b1 = classical.estimate_background(np.where(bad, image, image - h2).astype(np.float32), lit, cfg)
        rest = np.where(bad, 0.0, image - b1.back)
        h2, _ = halo_model(rest, bad, b0.global_rms, fwhm_px, cfg,
                           _sources(rest - h2, bad, b0.global_rms, fwhm_px))
    h2 = h2.astype(np.float32)
    return classical.Background(back=(b1.back + h2).astype(np.float32), rms=b0.rms, global_rms=b0.global_rms), h2


def on_halo(halo_adu: np.ndarray | None, x: np.ndarray, y: np.ndarray, noise_adu: float) -> np.ndarray:
    """True for the positions (px, window frame) where the modelled halo is >= :data:`ON_HALO_SIGMA` x the noise."""
    x = np.asarray(x, float)
    if halo_adu is None or not halo_adu.any() or len(x) == 0:
        return np.zeros(len(x), bool)
    ny, nx = halo_adu.shape
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(np.asarray(y, float)).astype(int), 0, ny - 1)
    return np.asarray(np.abs(halo_adu[iy, ix]) >= ON_HALO_SIGMA * noise_adu)


def sky_model_error(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, r_ap_px: float,
                    noise_adu: float, det_x: np.ndarray, det_y: np.ndarray) -> np.ndarray:
    """The error of the halo sky in an aperture sum at each position (ADU): what the model leaves on that scale.

    The residual (``data``, the window less its sky, detections masked out to ``r_ap + 1``:
    their cores, not the spikes' long pieces) is averaged over an aperture-sized disc at every
    pixel; around each position, in an annulus of 3-6 aperture radii, the robust size of those averages about zero
    (1.4826 x the median of their absolute values: a local offset of the model counts, as it
    would in the aperture) less the white noise of such an average (``noise / sqrt(N_ap)``)
    is the model's error per pixel on the aperture's scale; times the aperture's area, the
    sum's. Spikes and the lopsided parts of a halo that a ring median does not describe come
    out in it; a halo the model describes gives ~0.

    Parameters
    ----------
    data
        The window less its sky (ADU), bad pixels ignored.
    bad
        Pixels not to use.
    x, y
        Positions to give an error for (px, window frame).
    r_ap_px
        The aperture radius (px).
    noise_adu
        The window's background noise (ADU per pixel).
    det_x, det_y
        All the window's detections (px): masked.

    Returns
    -------
    ndarray
        One error per position (ADU, of the aperture sum; 0 where it cannot be measured).
    """
    from scipy.signal import fftconvolve

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    out = np.zeros(len(x))
    if len(x) == 0:
        return out
    r_ap = max(float(r_ap_px), 0.5)
    ny, nx = data.shape
    good = ~bad.copy()
    r_mask = r_ap + 1.0
    rm = int(np.ceil(r_mask))
    oy, ox = np.mgrid[-rm:rm + 1, -rm:rm + 1]
    disc_mask = oy**2 + ox**2 <= r_mask**2
    for dx_, dy_ in zip(np.rint(np.asarray(det_x, float)).astype(int), np.rint(np.asarray(det_y, float)).astype(int),
                        strict=True):
        y0, y1, x0, x1 = max(0, dy_ - rm), min(ny, dy_ + rm + 1), max(0, dx_ - rm), min(nx, dx_ + rm + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        good[y0:y1, x0:x1] &= ~disc_mask[y0 - dy_ + rm:y1 - dy_ + rm, x0 - dx_ + rm:x1 - dx_ + rm]
    ra = int(np.ceil(r_ap))
    ky, kx = np.mgrid[-ra:ra + 1, -ra:ra + 1]
    kern = (ky**2 + kx**2 <= r_ap**2).astype(float)
    n_ap = float(kern.sum())
    num = fftconvolve(np.where(good, data, 0.0), kern, mode="same")
    den = fftconvolve(good.astype(float), kern, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = np.where(den > 0.7 * n_ap, num / np.maximum(den, 1e-9), np.nan)
    floor2 = noise_adu**2 / n_ap
    r_in, r_out = 3.0 * r_ap, 6.0 * r_ap
    ro = int(np.ceil(r_out))
    for k in range(len(x)):
        cx, cy = int(np.rint(x[k])), int(np.rint(y[k]))
        y0, y1, x0, x1 = max(0, cy - ro), min(ny, cy + ro + 1), max(0, cx - ro), min(nx, cx + ro + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = np.hypot(xx - x[k], yy - y[k])
        v = avg[y0:y1, x0:x1][(d >= r_in) & (d <= r_out)]
        v = v[np.isfinite(v)]
        if v.size < 8:
            continue
        s2 = (1.4826 * float(np.median(np.abs(v)))) ** 2
        out[k] = n_ap * np.sqrt(max(s2 - floor2, 0.0))
    return out
