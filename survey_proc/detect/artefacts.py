"""Artefact suppression for the classical (sep) detector: bright-star halos and spikes, shattered extended sources.

sep (SExtractor) tuned for crowded fields (1.5 sigma threshold, 32-level deblending at
contrast 0.0005, no cleaning; :mod:`survey_proc.detect.classical`) splits two kinds of
object into many "stars" on real images (benchmarks/RESULTS.md, issue 20): the halos,
rings and diffraction spikes of bright and saturated stars (noise bumps on a bright,
slowly varying light become deblended children), and galaxies and nebulosity (the knots
and noise of one smooth extended light). Survey pipelines remove them the same two ways
(SExtractor's cleaning and deblending contrast, the SDSS/HSC bright-star handling and
deblender's "is this child point-like against its parent" test); this module does both
against a *model of the offending light*, so that a real star on that light is kept:

**Bright stars.** A bright star is a detection whose peak is at least
``bright_peak_sigma`` x the window's noise (or half the window's highest peak when that is
lower, but at least 10 sigma: photographic plates saturate at 25-50 sigma), or a connected region of >= 3 bad pixels
(saturated or masked) bordered by pixels at least that bright (a saturated core). Only a
star whose light is still above :data:`HALO_SIGMA` x the noise 3 FWHM beyond its core
can lift noise over sep's threshold there; its light is modelled in polar coordinates
about its centre (bad pixels left out):

- the azimuthal median at each radius (halo, rings), and
- a running median along each ray over ``max(3 FWHM, 7 px)`` of radius (diffraction spikes
  and other radial streaks: smooth along the ray; a star on the ray, about one FWHM long,
  does not survive a median three times its size),

and the model is the larger of the two. Every fainter detection (lower peak) where that
model is above :data:`HALO_SIGMA` x the noise (and within 2 FWHM of a saturated core's rim;
modelled from 8 FWHM out, further while the model's edge is above that level, up to
``bright_max_radius_fwhm`` FWHM and :data:`MAX_RADIUS_PX`) is kept only when the
residual (data - model), filtered with the PSF
(a Gaussian of the FWHM: the matched filter), peaks within 1 px of it at least
``artefact_ksigma`` x the scatter of that filtered residual at its radius: 1.4826 MAD over
an annulus, of the pixels no detection claims (sep's segmentation map), floored at the
filtered white noise. That scatter holds the noise *and* what the model does not describe
(spike and halo structure, plate grain, correlated noise) on the scale of a star, so the
test needs no noise model; leaving the claimed pixels out keeps other stars of a crowded
field from inflating it. Of the pieces sep leaves on the rim of a saturated core, the
brightest one stands for the star and is kept.

Why a floor of 2x the noise: in a confusion-limited field (2MASS towards the Galactic
centre) the azimuthal median of *any* bright star's surroundings is the crowd's light,
about 1 sigma, and judging every star there against it removed real stars (detections
removed at the 1-sigma floor repeated across bands like the kept ones: 0.42-0.45 against
0.55, 300-840 per frame); at 2 sigma 14-30 per frame go.

**Extended sources.** sep's segmentation map gives each detection's parent (the
connected region above the threshold that the deblender split). A parent with several
children whose light is mostly smooth (the median filter of ``3 FWHM`` box, which point
sources do not survive, keeps at least ``extended_smooth_frac`` of its flux) is one
extended source (galaxy, nebulosity), not a blend of stars. Its brightest child is kept;
each other child is kept only when it is point-like against the parent's smooth light:
the same matched-filter residual test, with the median-filtered light as the model and
the scatter measured over the parent. A crowd of stars is not extended by this measure
(the median filter removes the stars), so crowded-field children are never tested.

Detections not near a bright star and not children of an extended parent are never
touched: the faint isolated detections and the crowded-field recall of plain sep are
unchanged. :func:`suppress` returns the mask of detections to keep and why the others
went; ``detection.suppress_artefacts = false`` turns it off (plain sep).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from survey_proc.config import DetectionConfig
from survey_proc.errors import SurveyProcError

#: the robust standard deviation of a normal distribution per MAD
MAD_TO_SIGMA = 1.4826
#: a bright star's light is modelled at most this far beyond its saturated core (px)
MAX_RADIUS_PX = 120.0
#: detections are judged where a bright star's modelled light is above this x the noise
HALO_SIGMA = 2.0


@dataclass
class Suppression:
    """What :func:`suppress` decided for each detection of a window.

    Attributes
    ----------
    keep
        True for the detections to keep (bool, one per detection).
    near_bright
        Rejected as an artefact of a bright or saturated star's light.
    extended
        Rejected as a fragment of an extended source.
    n_bright
        Bright stars (including saturated regions) whose light was modelled.
    n_extended
        Parents judged extended (several children, mostly smooth light).
    """

    keep: np.ndarray
    near_bright: np.ndarray
    extended: np.ndarray
    n_bright: int = 0
    n_extended: int = 0

    @property
    def n_removed(self) -> int:
        """Detections removed."""
        return int(np.count_nonzero(~self.keep))


def _filtered(res: np.ndarray, ok: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian convolution of ``res`` over the ``ok`` pixels (the PSF's matched filter)."""
    w = ok.astype(np.float64)
    num = ndimage.gaussian_filter(np.where(ok, res, 0.0), sigma, mode="constant")
    den = ndimage.gaussian_filter(w, sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0.2, num / np.maximum(den, 1e-12), np.nan)


def _white_floor(noise: float, sigma: float) -> float:
    """The noise of a Gaussian-filtered (normalised) white-noise image of per-pixel ``noise``."""
    return float(noise / (2.0 * np.sqrt(np.pi) * max(sigma, 0.5)))


def _peak_near(f: np.ndarray, x: float, y: float, x0: int, y0: int) -> float:
    """The largest finite value of ``f`` (a cutout at ``x0, y0``) within 1 px of the image position ``x, y``."""
    ix, iy = int(np.rint(x)) - x0, int(np.rint(y)) - y0
    ny, nx = f.shape
    sub = f[max(0, iy - 1):min(ny, iy + 2), max(0, ix - 1):min(nx, ix + 2)]
    sub = sub[np.isfinite(sub)]
    return float(sub.max()) if sub.size else -np.inf


def _bright_stars(data: np.ndarray, bad: np.ndarray, noise: float, objs: np.ndarray, cfg: DetectionConfig
                  ) -> list[tuple[float, float, float, int]]:
    """Bright stars ``(x, y, r_sat, index)``: bright detections (index >= 0) and saturated regions (index -1).

    Brightest first; a detection inside a saturated region's reach is that region's star.
    """
    level = cfg.bright_peak_sigma * noise
    if len(objs):  # photographic plates saturate below the ADC's limit, at tens of sigma: half the brightest peak
        level = max(10.0 * noise, min(level, 0.5 * float(np.max(objs["peak"]))))
    out: list[tuple[float, float, float, int, float]] = []
    if bad.any():
        lab, n = ndimage.label(bad, structure=np.ones((3, 3)))
        if n:
            idx = np.arange(1, n + 1)
            area = np.asarray(ndimage.sum(np.ones_like(lab), lab, idx))
            rim = ndimage.binary_dilation(bad, iterations=2) & ~bad
            # the brightest usable pixel on each region's rim (labels spread to the rim by a grey dilation)
            rim_lab = np.where(rim, ndimage.grey_dilation(lab, size=5), 0)
            rim_max = np.asarray(ndimage.maximum(np.where(rim, data, -np.inf), rim_lab, idx))
            com = ndimage.center_of_mass(np.ones_like(lab), lab, idx)
            for a, c, m in zip(area, com, rim_max, strict=True):
                if a >= 3 and np.isfinite(m) and m >= level:
                    out.append((float(c[1]), float(c[0]), float(np.sqrt(a / np.pi)), -1, np.inf))
    if len(objs):
        peak = np.asarray(objs["peak"], float)
        for i in np.flatnonzero(peak >= level):
            out.append((float(objs["x"][i]), float(objs["y"][i]), 0.0, int(i), float(peak[i])))
    out.sort(key=lambda s: -s[4])
    return [(x, y, r, i) for x, y, r, i, _ in out]


def _polar_model(cut: np.ndarray, ok: np.ndarray, cx: float, cy: float, r_max: int, ray_px: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The star's light on the cutout pixels and its azimuthal median profile (one value per integer radius).

    The model is the larger of the azimuthal median and the running median along each ray
    (``ray_px`` long) of the polar resampling; bad pixels are left out of both.
    """
    n_t = int(np.clip(2 * np.pi * r_max / 1.5, 64, 360))
    r = np.arange(r_max + 1, dtype=float)
    t = np.arange(n_t) * (2 * np.pi / n_t)
    rr, tt = np.meshgrid(r, t, indexing="ij")
    xs, ys = cx + rr * np.cos(tt), cy + rr * np.sin(tt)
    vals = ndimage.map_coordinates(np.where(ok, cut, 0.0), [ys, xs], order=1, mode="constant", cval=0.0)
    good = ndimage.map_coordinates(ok.astype(float), [ys, xs], order=1, mode="constant", cval=0.0) > 0.99
    polar = np.where(good, vals, np.nan)
    prof = np.median(polar, axis=1)  # NaN on the radii that hold a bad pixel: those again without them
    holed = np.flatnonzero(~np.isfinite(prof))
    if holed.size:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a radius with no usable pixel: NaN, filled below
            prof[holed] = np.nanmedian(polar[holed], axis=1)
    prof = np.where(np.isfinite(prof), prof, 0.0)
    filled = np.where(np.isfinite(polar), polar, prof[:, None])
    ray = ndimage.median_filter(filled, size=(max(3, ray_px | 1), 1), mode="nearest")
    model_polar = np.maximum(ray, prof[:, None])
    # back onto the cutout's pixels (theta wraps: pad one column each side)
    padded = np.concatenate([model_polar[:, -1:], model_polar, model_polar[:, :1]], axis=1)
    ny, nx = cut.shape
    yy, xx = np.mgrid[:ny, :nx]
    pr = np.hypot(xx - cx, yy - cy)
    pt = np.mod(np.arctan2(yy - cy, xx - cx), 2 * np.pi) * (n_t / (2 * np.pi)) + 1.0
    model = ndimage.map_coordinates(padded, [np.minimum(pr, r_max), pt], order=1, mode="nearest")
    model[pr > r_max] = 0.0
    return model, prof


def _bin_scatter(f: np.ndarray, pr: np.ndarray, width: float, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per annulus (``width`` px): 1.4826 MAD of the finite values of ``f`` and their count."""
    fin = np.isfinite(f)
    bins = np.minimum(np.floor(pr[fin] / width).astype(int), n_bins - 1)
    v = f[fin]
    idx = np.arange(n_bins)
    cnt = np.bincount(bins, minlength=n_bins)
    if v.size == 0:
        return np.zeros(n_bins), cnt
    med = np.nan_to_num(np.asarray(ndimage.median(v, bins, idx), float))
    mad = np.nan_to_num(np.asarray(ndimage.median(np.abs(v - med[bins]), bins, idx), float))
    return MAD_TO_SIGMA * mad, cnt


def _annulus_scatter(f: np.ndarray, sky: np.ndarray, pr: np.ndarray, width: float, floor: float) -> np.ndarray:
    """Robust scatter of ``f`` per integer radius over annuli ``width`` px wide, floored.

    Measured on the ``sky`` pixels (no detection claims them) where an annulus has enough
    of them (>= 8 and a quarter of its pixels), else on all its pixels (the rim of a
    saturated core, which sep's pieces claim entirely).
    """
    n = int(pr.max()) + 1
    n_bins = int(np.floor(pr.max() / width)) + 1
    s_sky, c_sky = _bin_scatter(np.where(sky, f, np.nan), pr, width, n_bins)
    s_all, c_all = _bin_scatter(f, pr, width, n_bins)
    use_sky = (c_sky >= 8) & (c_sky >= 0.25 * c_all)
    per_bin = np.where(use_sky, s_sky, np.where(c_all >= 8, s_all, floor))
    per_bin = np.maximum(per_bin, floor)
    return per_bin[np.minimum((np.arange(n) / width).astype(int), n_bins - 1)]


def _has_halo(data: np.ndarray, bad: np.ndarray, x: float, y: float, r: float, noise: float) -> bool:
    """Whether the median of the usable pixels on the circle of radius ``r`` about ``(x, y)`` is above ``noise``."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    ix = np.rint(x + r * np.cos(t)).astype(int)
    iy = np.rint(y + r * np.sin(t)).astype(int)
    ny, nx = data.shape
    inside = (ix >= 0) & (iy >= 0) & (ix < nx) & (iy < ny)
    ix, iy = ix[inside], iy[inside]
    v = data[iy, ix][~bad[iy, ix]]
    return bool(v.size >= 8 and np.median(v) > noise)


def _near_bright(data: np.ndarray, bad: np.ndarray, noise: float, objs: np.ndarray, segmap: np.ndarray, fwhm: float,
                 cfg: DetectionConfig, reject: np.ndarray) -> int:
    """Mark in ``reject`` the detections insignificant against a bright star's light; the stars modelled."""
    stars = _bright_stars(data, bad, noise, objs, cfg)
    if not stars:
        return 0
    ny, nx = data.shape
    x, y = np.asarray(objs["x"], float), np.asarray(objs["y"], float)
    flux = np.asarray(objs["flux"], float)
    peak = np.asarray(objs["peak"], float)
    sigma = max(fwhm / 2.355, 0.6)
    floor = _white_floor(noise, sigma)
    ray_px = int(max(7, np.ceil(3 * fwhm)))
    done = np.zeros(len(objs), bool)  # stars already modelled (a fainter star never judges a brighter)
    n_model = 0
    for sx, sy, r_sat, si in stars:
        if si >= 0 and (reject[si] or done[si]):
            continue
        if not _has_halo(data, bad, sx, sy, r_sat + max(3.0 * fwhm, 4.0), HALO_SIGMA * noise):
            continue  # its light is below the noise 3 FWHM out: nothing for sep to split there
        # the model out to 8 FWHM beyond the core; further (up to the cap) where the halo is still above the noise
        r_cap = int(np.ceil(r_sat + min(cfg.bright_max_radius_fwhm * fwhm, MAX_RADIUS_PX)))
        r_max = min(r_cap, int(np.ceil(r_sat + 8.0 * fwhm)) + 2)
        while True:
            x0, x1 = max(0, int(sx) - r_max), min(nx, int(sx) + r_max + 2)
            y0, y1 = max(0, int(sy) - r_max), min(ny, int(sy) + r_max + 2)
            cut = data[y0:y1, x0:x1].astype(np.float64)
            ok = ~bad[y0:y1, x0:x1]
            model, _ = _polar_model(cut, ok, sx - x0, sy - y0, r_max, ray_px)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            pr = np.hypot(xx - sx, yy - sy)
            edge = model[(pr >= r_max - 1.5) & (pr <= r_max)]
            if r_max >= r_cap or not (edge.size and edge.max() >= HALO_SIGMA * noise):
                break
            r_max = min(r_cap, 2 * r_max)  # a halo or spike still above the floor at the edge: look further
        # judged: where the star's modelled light (halo or spike) is above the floor, and the rim of a saturated core
        d = np.hypot(x - sx, y - sy)
        ix = np.clip(np.rint(x).astype(int) - x0, 0, x1 - x0 - 1)
        iy = np.clip(np.rint(y).astype(int) - y0, 0, y1 - y0 - 1)
        lit = (d <= r_max) & (model[iy, ix] >= HALO_SIGMA * noise)
        if si < 0:
            lit |= d <= r_sat + 2.0 * fwhm
        cand = np.flatnonzero(lit & ~reject)
        if si >= 0:
            cand = cand[(cand != si) & (peak[cand] < peak[si])]
            done[si] = True
        else:  # a saturated core: its brightest rim piece stands for the star
            rim = cand[d[cand] <= r_sat + 2.0 * fwhm]
            if rim.size:
                rep = rim[np.argmax(flux[rim])]
                cand = cand[cand != rep]
                done[rep] = True
        n_model += 1
        if cand.size == 0:
            continue
        f = _filtered(cut - model, ok, sigma)
        # the scatter of what no detection claims (the star's own segment aside): noise and unmodelled light
        seg = segmap[y0:y1, x0:x1]
        sky = (seg == 0) | (seg == si + 1) if si >= 0 else seg == 0
        scatter = _annulus_scatter(f, sky, pr, max(2.0 * fwhm, 3.0), floor)
        for j in cand:
            s = _peak_near(f, x[j], y[j], x0, y0) / scatter[min(int(d[j]), len(scatter) - 1)]
            if s < cfg.artefact_ksigma:
                reject[j] = True
    return n_model


def _median_smooth(img: np.ndarray, box: int) -> np.ndarray:
    """``img`` median-filtered over ``box`` px (over 7 px: on block means of ``box // 5`` px, interpolated back).

    The block-reduced filter (SExtractor's background mesh, in small) costs ``box^2 / 25``
    times less than the direct one: a plate's 27-px box over a 1000-px parent took seconds.
    """
    if box <= 7:
        return ndimage.median_filter(img, size=box, mode="nearest")
    b = box // 5
    ny, nx = img.shape
    py, px = -ny % b, -nx % b
    padded = np.pad(img, ((0, py), (0, px)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // b, b, padded.shape[1] // b, b).mean(axis=(1, 3))
    small = ndimage.median_filter(blocks, size=5, mode="nearest")
    yy = (np.arange(ny) + 0.5) / b - 0.5
    xx = (np.arange(nx) + 0.5) / b - 0.5
    return ndimage.map_coordinates(small, np.meshgrid(yy, xx, indexing="ij"), order=1, mode="nearest")


def _extended(data: np.ndarray, bad: np.ndarray, noise: float, objs: np.ndarray, segmap: np.ndarray, fwhm: float,
              cfg: DetectionConfig, reject: np.ndarray) -> int:
    """Mark in ``reject`` the children of extended parents that are not point-like; the parents judged extended."""
    n = len(objs)
    parents, n_par = ndimage.label(segmap > 0, structure=np.ones((3, 3)))
    if n_par == 0:
        return 0
    idx = np.arange(1, n + 1)
    par = np.asarray(ndimage.maximum(parents, segmap, idx)).astype(int)  # each child's parent label
    counts = np.bincount(par, minlength=n_par + 1)
    multi = np.flatnonzero(counts >= 2)
    multi = multi[multi > 0]
    if multi.size == 0:
        return 0
    flux = np.asarray(objs["flux"], float)
    x, y = np.asarray(objs["x"], float), np.asarray(objs["y"], float)
    sigma = max(fwhm / 2.355, 0.6)
    floor = _white_floor(noise, sigma)
    box = int(max(5, 2 * int(np.ceil(1.5 * fwhm)) + 1))
    margin = box + int(np.ceil(3 * sigma))
    slices = ndimage.find_objects(parents)
    ny, nx = data.shape
    n_ext = 0
    for p in multi:
        sl = slices[p - 1]
        if sl is None:
            continue
        y0, y1 = max(0, sl[0].start - margin), min(ny, sl[0].stop + margin)
        x0, x1 = max(0, sl[1].start - margin), min(nx, sl[1].stop + margin)
        cut = data[y0:y1, x0:x1].astype(np.float64)
        ok = ~bad[y0:y1, x0:x1]
        member = parents[y0:y1, x0:x1] == p
        total = float(cut[member & ok].sum())
        if total <= 0:
            continue
        smooth = _median_smooth(np.where(ok, cut, 0.0), box)
        if float(smooth[member & ok].sum()) < cfg.extended_smooth_frac * total:
            continue  # mostly point-like light: a blend of stars, left alone
        n_ext += 1
        kids = np.flatnonzero(par == p)
        kids = kids[~reject[kids]]
        if kids.size < 2:
            continue
        f = _filtered(cut - smooth, ok, sigma)
        v = f[member & np.isfinite(f)]  # the scatter of the residual over the parent: its own unmodelled structure
        scatter = floor
        if v.size >= 8:
            scatter = max(floor, MAD_TO_SIGMA * float(np.median(np.abs(v - np.median(v)))))
        main = kids[np.argmax(flux[kids])]
        for j in kids:
            if j != main and _peak_near(f, x[j], y[j], x0, y0) < cfg.artefact_ksigma * scatter:
                reject[j] = True
    return n_ext


def suppress(data: np.ndarray, bad: np.ndarray, noise_adu: float, objs: np.ndarray, segmap: np.ndarray,
             fwhm_px: float, cfg: DetectionConfig) -> Suppression:
    """Which of sep's detections of a window to keep (see the module docstring).

    Parameters
    ----------
    data
        Background-subtracted window (ADU); bad pixels may hold anything.
    bad
        Pixels not to use (saturated, masked, non-finite).
    noise_adu
        The window's background noise (ADU).
    objs
        sep's detections (``x``, ``y``, ``peak``, ``flux``; 0-based pixel centres).
    segmap
        sep's segmentation map of ``objs`` (0: sky; ``k``: ``objs[k - 1]``).
    fwhm_px
        The window's FWHM (px).
    cfg
        Detection settings (``bright_peak_sigma``, ``bright_max_radius_fwhm``,
        ``artefact_ksigma``, ``extended_smooth_frac``).

    Returns
    -------
    Suppression
        The keep mask and why the others were rejected.

    Raises
    ------
    SurveyProcError
        When ``segmap`` does not have the window's shape or ``fwhm_px`` / ``noise_adu`` are not positive.
    """
    n = len(objs)
    if segmap.shape != data.shape:
        raise SurveyProcError(f"artefact suppression: the segmentation map {segmap.shape} is not the window's "
                              f"shape {data.shape}")
    if not (np.isfinite(fwhm_px) and fwhm_px > 0 and np.isfinite(noise_adu) and noise_adu > 0):
        raise SurveyProcError(f"artefact suppression needs a positive FWHM and noise, got FWHM {fwhm_px} px "
                              f"and noise {noise_adu} ADU")
    near = np.zeros(n, bool)
    if n == 0:
        return Suppression(np.ones(0, bool), near, near.copy())
    n_bright = _near_bright(data, bad, float(noise_adu), objs, segmap, float(fwhm_px), cfg, near)
    rejected = near.copy()
    n_ext = _extended(data, bad, float(noise_adu), objs, segmap, float(fwhm_px), cfg, rejected)
    return Suppression(~rejected, near, rejected & ~near, n_bright, n_ext)
