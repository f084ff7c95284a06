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
- mesh and model are estimated in turn until the mesh moves by less than
  :data:`CONVERGED_SIGMA` x the noise (at most :data:`N_ITER_MAX` times after the first; 6-8
  on the test field, whose sky far out was 1.4 ADU = 0.23 sigma high after two): the mesh from
  the pixels where the model is below :data:`HALO_SIGMA` x the noise (one level, the mesh's
  lower quartile, when that leaves under a quarter of the window: a cutout that is all halo),
  the model on the image less that mesh. The last step is a mesh, so that the sky is a
  function of the halos alone (:func:`sky_from_profiles`).

The halos are kept as profiles (:class:`HaloProfile`, in an epoch's record): the forced
photometry renders them on its own windows instead of fitting them again (it measured every
epoch's window again: ``make run``'s forced photometry took 10x longer with the halo sky).

Diffraction spikes (``detection.halo_spikes``, on by default) are modelled on top, in what the
halo leaves (:class:`Spikes`, :func:`fit_spikes`): per ray, medians over windows of radius with
the stars left out. A running median along each ray with the stars in it (how the artefact
suppression models them) is moved by the stars on the ray as much as by the spike (it took
55-80 % of injected stars' aperture light on the DECam cutouts). Measured on the DECam
cutouts' shared injections: 1.045 -> 0.999 against the halo alone. Detections on a modelled
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

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage

from survey_proc.config import DetectionConfig
from survey_proc.detect import artefacts, classical
from survey_proc.lightcurves.nanmedian import nanmedian_rows

#: the model is followed outwards while its edge is at least this x the noise (as the artefact suppression)
HALO_SIGMA = artefacts.HALO_SIGMA
#: sky (mesh) and halo model are estimated in turn until the sky moves by less than this x the noise ...
CONVERGED_SIGMA = 0.05
#: ... or this many times after the first
N_ITER_MAX = 12
#: the halo's power-law tail beyond the profile is followed down to this x the noise ...
TAIL_SIGMA = 0.1
#: ... and at most this x the profile's radius
TAIL_FACTOR = 4.0
#: a tail falling slower than r^-1 is not a star's halo (a nebula, a gradient): no tail
MIN_TAIL_SLOPE = 1.0
#: a detection where the modelled halo is at least this x the noise per pixel is flagged HALO
ON_HALO_SIGMA = 0.1
#: the sources left out of the ring medians are searched this far around the modelled halos (px) ...
SOURCES_MARGIN_PX = 16
#: ... in the first this many passes (then kept: the halo-subtracted image no longer changes much)
SOURCES_PASSES = 2
#: diffraction spikes (:class:`Spikes`): rays per turn, log-spaced radii, and the excess over the angles' median
#: (x their robust spread) a ray's median about a radius needs to be a spike
SPIKE_N_THETA = 360
SPIKE_SEGMENTS = 12
SPIKE_SIGMA = 3.0
#: a source segment this many times longer than wide is a spike's piece, not a star: kept in the spikes' medians
ELONGATED_RATIO = 3.0
#: the spikes are fitted this many times, the sources found again on the image less the last fit's spikes
SPIKE_PASSES = 2


@dataclass(frozen=True)
class HaloProfile:
    """One saturated star's modelled light: a radial profile about a centre, then a power-law tail.

    Attributes
    ----------
    x_px, y_px
        The centre (px, in the frame of the image it is rendered on).
    r_max_px
        The profile is used out to this radius (px) ...
    r_mean_px, prof_adu
        ... interpolated (:func:`_interp_profile`) between these rings' mean radii (px) and
        their medians (ADU per pixel);
    tail_slope, r_tail_px
        beyond it, ``prof_adu[-1] (r / r_mean_px[-1])^-tail_slope`` out to ``r_tail_px`` (px;
        no tail when ``r_tail_px <= r_max_px``).
    spikes
        The diffraction spikes on top (:class:`Spikes`), or None.
    """

    x_px: float
    y_px: float
    r_max_px: float
    r_mean_px: np.ndarray
    prof_adu: np.ndarray
    tail_slope: float = 0.0
    r_tail_px: float = 0.0
    spikes: Spikes | None = None

    def shifted(self, dx_px: float, dy_px: float) -> HaloProfile:
        """The same profile with its centre moved by ``(dx_px, dy_px)`` (another frame's origin)."""
        return replace(self, x_px=self.x_px + dx_px, y_px=self.y_px + dy_px)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what an epoch's record keeps; radii to 1e-4 px, values to 7 significant digits)."""
        d = {"x_px": float(self.x_px), "y_px": float(self.y_px), "r_max_px": float(self.r_max_px),
             "r_mean_px": [round(float(v), 4) for v in self.r_mean_px],
             "prof_adu": [float(f"{v:.7g}") for v in self.prof_adu],
             "tail_slope": float(self.tail_slope), "r_tail_px": float(self.r_tail_px)}
        if self.spikes is not None:
            d["spikes"] = self.spikes.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HaloProfile:
        """The inverse of :meth:`to_dict`."""
        return cls(float(d["x_px"]), float(d["y_px"]), float(d["r_max_px"]), np.asarray(d["r_mean_px"], float),
                   np.asarray(d["prof_adu"], float), float(d.get("tail_slope", 0.0)), float(d.get("r_tail_px", 0.0)),
                   Spikes.from_dict(d["spikes"]) if d.get("spikes") else None)

    def render_into(self, out: np.ndarray, origin_yx: tuple[int, int] = (0, 0)) -> None:
        """Add the modelled light (ADU per pixel) to ``out``, whose first pixel is ``origin_yx`` of this frame."""
        ny, nx = out.shape
        sx, sy = self.x_px - origin_yx[1], self.y_px - origin_yx[0]
        r_out = max(self.r_max_px, self.r_tail_px)
        x0, x1 = max(0, int(np.floor(sx - r_out))), min(nx, int(np.ceil(sx + r_out)) + 1)
        y0, y1 = max(0, int(np.floor(sy - r_out))), min(ny, int(np.ceil(sy + r_out)) + 1)
        if x0 >= x1 or y0 >= y1 or len(self.prof_adu) < 2:
            return
        yy, xx = np.mgrid[y0:y1, x0:x1]
        pr = np.hypot(xx - sx, yy - sy)
        inner = pr <= self.r_max_px
        add = np.zeros(pr.shape)
        add[inner] = _interp_profile(pr[inner], self.r_mean_px, self.prof_adu)
        if self.r_tail_px > self.r_max_px and self.tail_slope > 0:
            r_end = float(self.r_mean_px[-1])
            tail = (pr > self.r_max_px) & (pr <= self.r_tail_px)
            add[tail] = self.prof_adu[-1] * (np.maximum(pr[tail], r_end) / r_end) ** (-self.tail_slope)
        out[y0:y1, x0:x1] += add
        if self.spikes is not None:
            self.spikes.render_into(out, sx, sy)


@dataclass(frozen=True)
class Spikes:
    """A saturated star's diffraction spikes: what its halo's residual holds along a few directions.

    The residual (image less mesh and ring-median halo) is sampled on rays every
    ``360 / N_THETA`` degrees from ``r0_px`` to ``r1_px``, with the compact sources (stars)
    left out: sep's segments at 3 sigma that are not long and thin (:data:`ELONGATED_RATIO`;
    a spike's own pieces stay in), found again on the residual less the first fit's spikes
    (:data:`SPIKE_PASSES`: a star on a spike is one segment with it until the spike is
    gone). Per ray, the median in a window about each of :data:`SPIKE_SEGMENTS` log-spaced
    radii (one grid step either side); where it stands :data:`SPIKE_SIGMA` x the spread over
    the angles above their median, that excess is the spike (and one ray either side). A
    running median along the ray without the stars left out took 55-80 % of injected stars'
    light. Between the radii the values are interpolated log-log (linearly where one is not
    positive), and continued beyond the ends with the end pair's power law when it falls
    outwards (else kept constant).

    Attributes
    ----------
    r0_px, r1_px
        The radii the spikes are modelled over (px from the star's centre).
    seg_px
        The radii the levels are given at (px).
    adu
        ``(N_THETA, len(seg_px))``: the spikes' level per ray and radius (ADU per pixel; 0: none).
    """

    r0_px: float
    r1_px: float
    seg_px: np.ndarray
    adu: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the non-zero levels only, as ``[ray, segment, value]``."""
        ii, kk = np.nonzero(self.adu)
        return {"r0_px": float(self.r0_px), "r1_px": float(self.r1_px),
                "seg_px": [round(float(v), 4) for v in self.seg_px], "n_theta": int(self.adu.shape[0]),
                "levels": [[int(i), int(k), float(f"{self.adu[i, k]:.7g}")] for i, k in zip(ii, kk, strict=True)]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spikes:
        """The inverse of :meth:`to_dict`."""
        seg = np.asarray(d["seg_px"], float)
        adu = np.zeros((int(d["n_theta"]), len(seg)))
        for i, k, v in d["levels"]:
            adu[int(i), int(k)] = float(v)
        return cls(float(d["r0_px"]), float(d["r1_px"]), seg, adu)

    def render_into(self, out: np.ndarray, sx: float, sy: float) -> None:
        """Add the spikes (ADU per pixel) to ``out``, about the centre ``(sx, sy)`` in its frame (px)."""
        ny, nx = out.shape
        r1 = self.r1_px
        x0, x1 = max(0, int(np.floor(sx - r1))), min(nx, int(np.ceil(sx + r1)) + 1)
        y0, y1 = max(0, int(np.floor(sy - r1))), min(ny, int(np.ceil(sy + r1)) + 1)
        if x0 >= x1 or y0 >= y1 or not self.adu.any():
            return
        yy, xx = np.mgrid[y0:y1, x0:x1]
        pr = np.hypot(xx - sx, yy - sy)
        inside = (pr >= self.r0_px) & (pr <= r1)
        if not inside.any():
            return
        n_th = self.adu.shape[0]
        ang = (np.degrees(np.arctan2(yy[inside] - sy, xx[inside] - sx)) % 360.0) * n_th / 360.0
        i0 = np.floor(ang).astype(int) % n_th
        w = ang - np.floor(ang)
        val = np.zeros(int(inside.sum()))
        for i, wt in ((i0, 1.0 - w), ((i0 + 1) % n_th, w)):
            rows = self.adu[i]  # (pixels, segments)
            val += wt * _interp_segments(pr[inside], self.seg_px, rows)
        add = np.zeros(pr.shape)
        add[inside] = val
        out[y0:y1, x0:x1] += add


def _interp_segments(r: np.ndarray, seg: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each pixel's level at radius ``r`` from its ray's values ``rows`` (pixels x segments) at radii ``seg``.

    Log-log between the neighbouring segments where both are positive, linear otherwise;
    beyond the ends the end pair's power law when it falls outwards, else the end value.
    """
    n = len(seg)
    if n == 1:
        return rows[:, 0].copy()
    lr = np.log(np.maximum(r, 1e-6))
    ls = np.log(seg)
    j = np.clip(np.searchsorted(seg, r) - 1, 0, n - 2)  # the pair [j, j + 1] (the end pair beyond the ends)
    a, b = rows[np.arange(len(r)), j], rows[np.arange(len(r)), j + 1]
    t = (lr - ls[j]) / (ls[j + 1] - ls[j])
    pos = (a > 0) & (b > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        loglin = np.exp(np.log(np.where(pos, a, 1.0)) * (1 - t) + np.log(np.where(pos, b, 1.0)) * t)
    lin = a * (1 - t) + b * t
    v = np.where(pos, loglin, lin)
    # beyond the ends: the power law only when it falls outwards (t < 0 inwards: rises; t > 1 outwards: falls)
    below, above = t < 0, t > 1
    falls = pos & (b < a)
    v = np.where(below & ~falls, a, v)
    v = np.where(above & ~falls, b, v)
    return np.asarray(v)


def render_halos(profiles: list[HaloProfile], shape: tuple[int, int], origin_yx: tuple[int, int] = (0, 0)
                 ) -> np.ndarray:
    """The modelled light of ``profiles`` (ADU per pixel, float64) on a window of ``shape`` at ``origin_yx``.

    Parameters
    ----------
    profiles
        The stars' profiles (centres in the frame ``origin_yx`` refers to).
    shape
        ``(ny, nx)`` of the window (px).
    origin_yx
        The frame's pixel index of the window's first row and column.

    Returns
    -------
    ndarray
        The sum of the profiles (0 away from them).
    """
    out = np.zeros(shape)
    for p in profiles:
        p.render_into(out, origin_yx)
    return out


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
    lab, n_lab = ndimage.label(bad, structure=np.ones((3, 3)))
    # each region's rim is the good pixels within 2 px (city-block) of it: its brightest pixel is the brightest good
    # pixel within 2 px of any of the region's pixels
    ny, nx = bad.shape
    by, bx = np.nonzero(bad)
    good_val = np.where(bad, -np.inf, np.asarray(data, float))
    peak = np.full(n_lab + 1, -np.inf)
    lab_b = lab[by, bx]
    for dy in range(-2, 3):
        for dx in range(-2 + abs(dy), 3 - abs(dy)):
            yy, xx = by + dy, bx + dx
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            np.maximum.at(peak, lab_b[inside], good_val[yy[inside], xx[inside]])
    peak = peak[1:]
    area = np.bincount(lab.ravel(), minlength=n_lab + 1)[1:]
    level = cfg.bright_peak_sigma * noise_adu
    out = []
    objects = ndimage.find_objects(lab)
    for k in np.flatnonzero((area >= 3) & (peak >= level)):
        sl = objects[k]
        if sl is None:
            continue
        y0, y1 = max(0, sl[0].start - 3), min(ny, sl[0].stop + 3)  # as far as the rim and one more
        x0, x1 = max(0, sl[1].start - 3), min(nx, sl[1].stop + 3)
        region = lab[y0:y1, x0:x1] == k + 1
        edt = ndimage.distance_transform_edt(np.pad(bad[y0:y1, x0:x1], 1))[1:-1, 1:-1]
        deep = float(edt[region].max())
        yy, xx = np.nonzero(region & (edt >= deep - 0.5))
        out.append((float(xx.mean() + x0), float(yy.mean() + y0), deep, float(area[k])))
    out.sort(key=lambda s: -s[3])
    return [(x, y, r) for x, y, r, _ in out]


def halo_model(data: np.ndarray, bad: np.ndarray, noise_adu: float, fwhm_px: float, cfg: DetectionConfig,
               ignore: np.ndarray | None = None, cores: list[tuple[float, float, float]] | None = None
               ) -> tuple[np.ndarray, list[HaloProfile]]:
    """The light of the window's saturated stars left in ``data`` (ADU per pixel) and their profiles.

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
    cores
        The window's saturated cores (:func:`saturated_cores`); None: found in ``data``.

    Returns
    -------
    model, profiles
        The modelled light (0 away from saturated stars) and one :class:`HaloProfile` per star
        modelled (window frame; ``model`` is :func:`render_halos` of them).
    """
    ny, nx = data.shape
    total = np.zeros(data.shape)
    rest = np.array(data, np.float64)  # data less the stars modelled so far
    profiles: list[HaloProfile] = []
    fwhm = max(float(fwhm_px), 1.0)
    skip = bad if ignore is None else bad | ignore
    for sx, sy, r_sat in (saturated_cores(data, bad, noise_adu, cfg) if cores is None else cores):
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
        # beyond r_max a power law matched to the profile's outer half, until it is below TAIL_SIGMA x the noise
        amp, slope = _power_tail(r_mean, prof, max(r_sat + 2.0 * fwhm, 0.5 * r_max))
        r_tail = 0.0
        if amp > 0 and prof[-1] > TAIL_SIGMA * noise_adu:
            r_end = float(r_mean[-1])
            r_tail = min(r_end * (prof[-1] / (TAIL_SIGMA * noise_adu)) ** (1.0 / slope), TAIL_FACTOR * r_end)
        p = HaloProfile(float(sx), float(sy), float(r_max), r_mean, prof, slope if r_tail > r_max else 0.0,
                        r_tail if r_tail > r_max else 0.0)
        one = np.zeros(data.shape)
        p.render_into(one)
        total += one
        rest -= one
        profiles.append(p)
    return total, profiles


def _sources(res: np.ndarray, bad: np.ndarray, noise_adu: float, fwhm_px: float,
             profiles: list[HaloProfile] | None = None, compact_only: bool = False) -> np.ndarray:
    """The pixels of the sources on a halo-subtracted window (sep's segments at 3 sigma, grown by 1 px).

    Left out of the ring medians: a bright star on a ring moves its median (by 1-2 % of the star's
    aperture flux on the test field), and spikes move it too. Not within 2 FWHM of a bad region
    (a saturated core's rim is the halo itself). With ``profiles``, sep searches only where the
    ring medians look: each star's box out to its profile's radius and
    :data:`SOURCES_MARGIN_PX` more (the whole window: 80 ms of a dense 512^2 epoch, each time).
    """
    ny, nx = bad.shape
    out = np.zeros(bad.shape, bool)
    if profiles is None:
        boxes = [(0, ny, 0, nx)]
    else:
        m = SOURCES_MARGIN_PX
        boxes = [(max(0, int(p.y_px - p.r_max_px) - m), min(ny, int(np.ceil(p.y_px + p.r_max_px)) + m + 1),
                  max(0, int(p.x_px - p.r_max_px) - m), min(nx, int(np.ceil(p.x_px + p.r_max_px)) + m + 1))
                 for p in profiles]
    for y0, y1, x0, x1 in boxes:
        if y1 > y0 and x1 > x0:
            out[y0:y1, x0:x1] |= _sources_in(res[y0:y1, x0:x1], bad[y0:y1, x0:x1], noise_adu, fwhm_px, compact_only)
    return out


def _sources_in(res: np.ndarray, bad: np.ndarray, noise_adu: float, fwhm_px: float, compact_only: bool = False
                ) -> np.ndarray:
    """:func:`_sources` on one box.

    sep without deblending (``deblend_nthresh = 1``): only the segments' pixels matter here, and
    they are the same within 0.4 % (a dense 272^2 box: 5 ms against 22 ms).
    """
    import sep

    b = np.ascontiguousarray(bad)
    data = np.ascontiguousarray(np.where(b, 0.0, res), dtype=np.float32)
    prev = sep.get_extract_pixstack()
    sep.set_extract_pixstack(classical.pixstack_for(data))  # (sep allocates it all on every call)
    try:
        _, seg = sep.extract(data, 3.0, err=float(noise_adu), mask=b, minarea=5, segmentation_map=True,
                             deblend_nthresh=1)
    except Exception:  # sep's buffers (a window of a plate core): no masking rather than no halo
        return np.zeros(b.shape, bool)
    finally:
        sep.set_extract_pixstack(prev)
    if compact_only:
        seg = np.where(np.isin(seg, _elongated(seg)), 0, seg)
    src = ndimage.binary_dilation(seg > 0, iterations=1)
    near_bad = ndimage.binary_dilation(b, iterations=max(1, int(np.ceil(2.0 * fwhm_px))))
    return np.asarray(src & ~near_bad)


def _elongated(seg: np.ndarray) -> np.ndarray:
    """The labels of ``seg`` whose pixels lie along a line (axis ratio >= :data:`ELONGATED_RATIO`, 10+ px): a spike."""
    n = int(seg.max())
    if n == 0:
        return np.zeros(0, int)
    idx = np.arange(1, n + 1)
    yy, xx = np.indices(seg.shape)
    cnt = np.asarray(ndimage.sum(np.ones(seg.shape), seg, idx))
    mx, my = (np.asarray(ndimage.mean(a, seg, idx)) for a in (xx, yy))
    sxx = np.asarray(ndimage.mean(xx.astype(float) ** 2, seg, idx)) - mx**2
    syy = np.asarray(ndimage.mean(yy.astype(float) ** 2, seg, idx)) - my**2
    sxy = np.asarray(ndimage.mean(xx.astype(float) * yy, seg, idx)) - mx * my
    half_tr, det = 0.5 * (sxx + syy), sxx * syy - sxy**2
    disc = np.sqrt(np.maximum(half_tr**2 - det, 0.0))
    lam1, lam2 = half_tr + disc, np.maximum(half_tr - disc, 1.0 / 12.0)  # (a 1-px wide line: 1/12)
    return idx[(cnt >= 10) & (lam1 >= ELONGATED_RATIO**2 * lam2)]


def fit_spikes(res: np.ndarray, skip: np.ndarray, prof: HaloProfile, fwhm_px: float) -> Spikes | None:
    """The diffraction spikes of one star in the residual of its halo (see :class:`Spikes`).

    Parameters
    ----------
    res
        The window less its sky and halos (ADU).
    skip
        Pixels not to use (bad ones, and the sources on the halo).
    prof
        The star's halo (window frame): the spikes are modelled from ``2 FWHM`` beyond its
        first ring out to the halo's reach.
    fwhm_px
        The PSF's FWHM (px).

    Returns
    -------
    Spikes or None
        None when no ray stands out, or the halo is too small.
    """
    r0 = float(prof.r_mean_px[0]) + 2.0 * max(float(fwhm_px), 1.0)
    r1 = max(prof.r_max_px, prof.r_tail_px)
    if r1 < 1.5 * r0 or r1 - r0 < 8.0:
        return None
    r = np.arange(r0, r1 + 0.5, 1.0)
    th = np.deg2rad(np.arange(SPIKE_N_THETA) * 360.0 / SPIKE_N_THETA)
    rr, tt = np.meshgrid(r, th)  # (rays, radii)
    src = np.where(skip, np.nan, res)
    v = ndimage.map_coordinates(src, [prof.y_px + rr * np.sin(tt), prof.x_px + rr * np.cos(tt)], order=1,
                                mode="constant", cval=np.nan)
    # overlapping windows about log-spaced radii, each reaching one grid step either side
    centres = np.geomspace(r0, r1, SPIKE_SEGMENTS)
    step = (r1 / r0) ** (1.0 / (SPIKE_SEGMENTS - 1))
    level = np.zeros((SPIKE_N_THETA, SPIKE_SEGMENTS))
    for k, c in enumerate(centres):
        cols = v[:, (r >= c / step) & (r <= c * step)]
        n_ok = np.sum(np.isfinite(cols), axis=1)
        med = np.full(SPIKE_N_THETA, np.nan)
        some = n_ok >= 3
        if some.sum() < SPIKE_N_THETA // 4:
            continue
        med[some] = nanmedian_rows(cols[some])
        ok = np.isfinite(med)
        base = float(np.median(med[ok]))
        spread = 1.4826 * float(np.median(np.abs(med[ok] - base)))
        hot = ok & (med - base > SPIKE_SIGMA * max(spread, 1e-12))
        hot = (hot | np.roll(hot, 1) | np.roll(hot, -1)) & ok  # and one ray either side (the turn wraps)
        level[hot, k] = np.maximum(med[hot] - base, 0.0)
    if not level.any():
        return None
    return Spikes(r0, float(r1), centres, level)


@dataclass(frozen=True)
class HaloSky:
    """A window's sky with its saturated stars' halos (:func:`fit_halo_sky`).

    Attributes
    ----------
    background
        ``back`` is the mesh (estimated beyond the halos) plus the halos; ``rms`` and
        ``global_rms`` are the plain mesh's.
    halo_adu
        The halos alone (ADU per pixel, float32; all 0 without a modelled star).
    mesh
        The plain mesh background of the window (the halos in it).
    profiles
        The stars' profiles (window frame).
    """

    background: classical.Background
    halo_adu: np.ndarray
    mesh: classical.Background
    profiles: list[HaloProfile]


def fit_halo_sky(image: np.ndarray, bad: np.ndarray, cfg: DetectionConfig, fwhm_px: float) -> HaloSky:
    """The mesh background plus the saturated stars' halos, fitted (see the module docstring).

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
    HaloSky
        The sky, the halos and their profiles.
    """
    b0 = classical.estimate_background(image, bad, cfg)
    cores = saturated_cores(np.where(bad, 0.0, image - b0.back), bad, b0.global_rms, cfg)
    if not cores:
        return HaloSky(b0, np.zeros(image.shape, np.float32), b0, [])
    h1, profiles = halo_model(np.where(bad, 0.0, image - b0.back), bad, b0.global_rms, fwhm_px, cfg, cores=cores)
    if not profiles:
        return HaloSky(b0, np.zeros(image.shape, np.float32), b0, [])
    h2 = h1
    b_prev = None
    src = None
    for it in range(N_ITER_MAX):
        b1 = sky_beyond_halos(image, bad, cfg, h2, b0)
        if b_prev is not None and np.max(np.abs(b1.back - b_prev.back)) < CONVERGED_SIGMA * b0.global_rms:
            break  # the sky beyond the halos no longer moves: b1 is the last model's
        rest = np.where(bad, 0.0, image - b1.back)
        if it < SOURCES_PASSES:  # the sources on the halo: found again while the model still moves much
            src = _sources(rest - h2, bad, b0.global_rms, fwhm_px, profiles)
        h2, profiles = halo_model(rest, bad, b0.global_rms, fwhm_px, cfg, src, cores=cores)
        b_prev = b1
    else:
        b1 = sky_beyond_halos(image, bad, cfg, h2, b0)
    if cfg.halo_spikes:  # the spikes in what the halos leave, then the mesh beyond both (the sky a function of them)
        res = np.where(bad, 0.0, image - b1.back - h2)
        # the compact sources left out (stars); a spike's own segments (long and thin) are what is modelled. A star
        # on a spike is one segment with it: found again once the first spikes are subtracted, and left out
        spk = np.zeros(image.shape)
        with_spikes = list(profiles)
        for _ in range(SPIKE_PASSES):
            stars = _sources(res - spk, bad, b0.global_rms, fwhm_px, profiles, compact_only=True)
            skip = bad | stars
            with_spikes = []
            for p in profiles:
                sp = fit_spikes(res, skip, p, fwhm_px)
                with_spikes.append(p if sp is None else replace(p, spikes=sp))
            spk = render_halos(with_spikes, image.shape) - h2
        if any(p.spikes is not None for p in with_spikes):
            profiles = with_spikes
            h2 = render_halos(profiles, image.shape)
            b1 = sky_beyond_halos(image, bad, cfg, h2, b0)
    h2 = h2.astype(np.float32)
    sky = classical.Background(back=(b1.back + h2).astype(np.float32), rms=b0.rms, global_rms=b0.global_rms)
    return HaloSky(sky, h2, b0, profiles)


def sky_beyond_halos(image: np.ndarray, bad: np.ndarray, cfg: DetectionConfig, halo_adu: np.ndarray,
                     mesh: classical.Background) -> classical.Background:
    """The mesh background from the pixels beyond the halos (the halos not included in ``back``).

    Parameters
    ----------
    image, bad
        The window's pixels (ADU) and the pixels not to use.
    cfg
        Detection settings (mesh and filter).
    halo_adu
        The halos (ADU per pixel): pixels where they reach :data:`HALO_SIGMA` x the noise are
        left out, the rest has them subtracted.
    mesh
        The window's plain mesh background (its ``global_rms`` sets the level; a window that
        is (almost) all halo takes the lower quartile of its mesh as one sky level).

    Returns
    -------
    Background
        The sky without the halos.
    """
    lit = bad | (np.abs(halo_adu) >= HALO_SIGMA * mesh.global_rms)
    if lit.mean() > 0.75:  # (almost) all halo: one sky level, that of the faintest quarter of the mesh
        return classical.Background(back=np.full(image.shape, float(np.percentile(mesh.back, 25)), np.float32),
                                    rms=mesh.rms, global_rms=mesh.global_rms)
    return classical.estimate_background(np.where(bad, image, image - halo_adu).astype(np.float32), lit, cfg)


def background_with_halos(image: np.ndarray, bad: np.ndarray, cfg: DetectionConfig, fwhm_px: float
                          ) -> tuple[classical.Background, np.ndarray]:
    """The mesh background plus the saturated stars' halos: :func:`fit_halo_sky`'s ``background, halo_adu``."""
    fit = fit_halo_sky(image, bad, cfg, fwhm_px)
    return fit.background, fit.halo_adu


def sky_from_profiles(image: np.ndarray, bad: np.ndarray, cfg: DetectionConfig, profiles: list[HaloProfile],
                      origin_yx: tuple[int, int] = (0, 0)) -> tuple[classical.Background, np.ndarray]:
    """The halo sky of a window from halos already fitted (an epoch's, kept by its extraction).

    The halos are rendered (:func:`render_halos`), the mesh is estimated beyond them
    (:func:`sky_beyond_halos`), as the fit's last step does; no fitting.

    Parameters
    ----------
    image, bad
        The window's pixels (ADU) and the pixels not to use.
    cfg
        Detection settings (mesh and filter).
    profiles
        The halos' profiles in the frame ``origin_yx`` refers to (the image's).
    origin_yx
        That frame's pixel index of the window's first row and column.

    Returns
    -------
    background, halo
        As :func:`background_with_halos`.
    """
    b0 = classical.estimate_background(image, bad, cfg)
    h = render_halos(profiles, image.shape, origin_yx).astype(np.float32)
    if not h.any():
        return b0, h
    b1 = sky_beyond_halos(image, bad, cfg, h, b0)
    return classical.Background(back=(b1.back + h).astype(np.float32), rms=b0.rms, global_rms=b0.global_rms), h


def on_halo(halo_adu: np.ndarray | None, x: np.ndarray, y: np.ndarray, noise_adu: float) -> np.ndarray:
    """True for the positions (px, window frame) where the modelled halo is >= :data:`ON_HALO_SIGMA` x the noise."""
    x = np.asarray(x, float)
    if halo_adu is None or not halo_adu.any() or len(x) == 0:
        return np.zeros(len(x), bool)
    ny, nx = halo_adu.shape
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(np.asarray(y, float)).astype(int), 0, ny - 1)
    return np.asarray(np.abs(halo_adu[iy, ix]) >= ON_HALO_SIGMA * noise_adu)


#: the ray samples of :func:`sky_model_error`: from ``RAY_ERROR[0]`` to ``RAY_ERROR[1]`` aperture radii either side;
#: they count only where their robust size is ``RAY_MIN_EXCESS`` x what white noise gives (a dozen correlated disc
#: averages scatter by ~40 %: without the gate, pure noise read ~1 x the aperture's own noise)
RAY_ERROR = (1.5, 3.0)
RAY_MIN_EXCESS = 2.0


def sky_model_error(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, r_ap_px: float,
                    noise_adu: float, det_x: np.ndarray, det_y: np.ndarray,
                    centres_xy: np.ndarray | None = None) -> np.ndarray:
    """The error of the halo sky in an aperture sum at each position (ADU): what the model leaves on that scale.

    The residual (``data``, the window less its sky, detections masked out to ``r_ap + 1``:
    their cores, not the spikes' long pieces) is averaged over an aperture-sized disc at every
    pixel; around each position, in an annulus of 3-6 aperture radii, the robust size of those averages about zero
    (1.4826 x the median of their absolute values: a local offset of the model counts, as it
    would in the aperture) less the white noise of such an average (``noise / sqrt(N_ap)``)
    is the model's error per pixel on the aperture's scale; times the aperture's area, the
    sum's. Spikes and the lopsided parts of a halo that a ring median does not describe come
    out in it; a halo the model describes gives ~0.

    With ``centres_xy`` (the halos' centres) the same is measured along the ray from the nearest
    centre through the position, at 1.5-3 aperture radii either side of it (:data:`RAY_ERROR`), and
    the larger of the two is the error: a spike's residual runs along its ray and crosses the
    annulus in two short pieces, so the annulus alone misses it (DECam injections on a spike were
    8-13 sigma off).

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
    centres_xy
        The halos' centres (n, 2) (px, window frame), or None (the annulus alone).

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
    # only the box that the positions' annuli and their discs reach (the same values, for less work)
    reach = int(np.ceil(6.0 * r_ap)) + int(np.ceil(r_ap)) + 2
    cy0 = max(0, int(np.floor(y.min())) - reach)
    cy1 = min(data.shape[0], int(np.ceil(y.max())) + reach + 1)
    cx0 = max(0, int(np.floor(x.min())) - reach)
    cx1 = min(data.shape[1], int(np.ceil(x.max())) + reach + 1)
    if cy0 >= cy1 or cx0 >= cx1:
        return out
    data, bad = data[cy0:cy1, cx0:cx1], bad[cy0:cy1, cx0:cx1]
    x, y = x - cx0, y - cy0
    det_x, det_y = np.asarray(det_x, float) - cx0, np.asarray(det_y, float) - cy0
    inside = (det_x > -reach) & (det_x < data.shape[1] + reach) & (det_y > -reach) & (det_y < data.shape[0] + reach)
    det_x, det_y = det_x[inside], det_y[inside]
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
    oy, ox = (o.ravel() for o in np.mgrid[-ro:ro + 1, -ro:ro + 1])
    cx, cy = np.rint(x).astype(int), np.rint(y).astype(int)
    for s0 in range(0, len(x), 256):  # all positions at once, in chunks: (positions, annulus pixels)
        sl = slice(s0, s0 + 256)
        px, py = cx[sl, None] + ox, cy[sl, None] + oy
        d = np.hypot(px - x[sl, None], py - y[sl, None])
        inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        v = np.full(d.shape, np.nan)
        v[inside] = avg[py[inside], px[inside]]
        v[~((d >= r_in) & (d <= r_out))] = np.nan
        n = np.sum(np.isfinite(v), axis=1)
        s2 = (1.4826 * nanmedian_rows(np.abs(v))) ** 2
        out[sl] = np.where(n >= 8, n_ap * np.sqrt(np.maximum(np.nan_to_num(s2) - floor2, 0.0)), 0.0)
    if centres_xy is not None and len(centres_xy):
        c = np.asarray(centres_xy, float).reshape(-1, 2) - (cx0, cy0)
        k = np.argmin((x[:, None] - c[None, :, 0]) ** 2 + (y[:, None] - c[None, :, 1]) ** 2, axis=1)
        ux, uy = x - c[k, 0], y - c[k, 1]
        r = np.hypot(ux, uy)
        ux, uy = ux / np.maximum(r, 1e-9), uy / np.maximum(r, 1e-9)
        lo, hi = RAY_ERROR
        steps = np.arange(-np.ceil(hi * r_ap), np.ceil(hi * r_ap) + 1)
        steps = steps[np.abs(steps) >= lo * r_ap]
        px = np.rint(x[:, None] + steps[None, :] * ux[:, None]).astype(int)
        py = np.rint(y[:, None] + steps[None, :] * uy[:, None]).astype(int)
        inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny) & (r[:, None] + steps[None, :] > 0.5 * r[:, None])
        v = np.full(px.shape, np.nan)
        v[inside] = avg[py[inside], px[inside]]
        n = np.sum(np.isfinite(v), axis=1)
        s2 = (1.4826 * nanmedian_rows(np.abs(v))) ** 2
        s2 = np.nan_to_num(s2)
        ray = np.where((n >= 4) & (s2 > RAY_MIN_EXCESS**2 * floor2), n_ap * np.sqrt(np.maximum(s2 - floor2, 0.0)), 0.0)
        out = np.maximum(out, np.where(r > 0, ray, 0.0))
    return out
