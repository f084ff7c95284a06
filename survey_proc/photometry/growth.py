"""The aperture-correction stars' light out to a large radius, split into their own wing and the sky.

``photometry.apcorr_method = "growth"``, out to ``apcorr_growth_fwhm x FWHM`` (6). It is an
option; the default ``"sum"`` sums each star's pixels within ``apcorr_fwhm x FWHM``. Why a sum is
not enough (issue 21, benchmarks/RESULTS.md "Where sep's total flux loses light"):

- in a sparse field the 32-px mesh sky takes part of the bright stars' wings, so a larger
  aperture loses flux instead of gaining it (zero point − truth -0.015, -0.030 in the
  widest-seeing epoch);
- in a dense field the sum collects the neighbours that the 2 % selection cut leaves, detected
  or not, and the unresolved stars lift the sky (zero point − truth +0.014).

The method:

1. Each star's flux within ``r_core_px`` (2 FWHM) is summed. Its light between
   ``r_core_px`` and ``r_big_px`` is taken ring by ring (1 px wide) as the ring's median
   times the ring's area. A median drops a neighbour that covers a small part of a ring,
   detected or not.
2. Across the stars, each ring's median is a straight line in the star's aperture flux,
   ``median_ik = h_k F_ap,i + c_k`` (Theil-Sen, scipy's ``theilslopes``). Light that scales
   with the star is its wing (``halo = sum_k h_k area_k``, a fraction of ``F_ap``). Light
   that does not is sky: a pedestal ``median_k c_k`` (ADU per pixel) that the mesh left (the
   unresolved stars' light, the mesh's errors). The pedestal is also taken off the core.
3. Each star's outer flux is ``F_core,i − pedestal x pi r_core^2 + halo x F_ap,i``.

A local annulus sky would be the textbook alternative. It fails where the PSF has a halo out
to tens of pixels (the simulated sparse survey's: zero point − truth -0.036 with the annulus
at 10-14 FWHM), because the annulus sits on the star's own light; the regression separates
the two by how they scale.

The regression needs enough stars and rings to be determined. With fewer than
``MIN_STARS`` stars or ``MIN_RINGS`` rings, or a halo outside ``[0, MAX_HALO]``, it is not
used and the caller keeps the sum. On the 2MASS frames (FWHM 1.1 px: 4-5 one-pixel rings,
9-36 stars) the unguarded fit gave halos from -1.35 to +1.10 of the aperture flux: rings a
pixel wide a few pixels from an undersampled star measure its pixel phase, not its wing.

Measured (benchmarks/RESULTS.md, "The aperture correction's light from ring medians"), sep's
zero point − truth on the held-out simulations:

- sparse: -0.0148 (max 0.0298) -> -0.0102 (max 0.0117);
- dense: +0.0142 (max 0.0179) -> +0.0041 (max 0.0046).

On the real frames SDSS, 2MASS and DECam are unchanged, and the injected Spitzer stars go
1.012 -> 1.036. The benchmark's injected stars are a 17-px stack without the real stars'
far wing, so that figure cannot judge the method; it stays an option until the injections
carry a measured wing.

photutils has curves of growth (``photutils.profiles.CurveOfGrowth``) but neither ring medians
nor a wing/sky split across stars; hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep
from scipy.stats import theilslopes

MIN_STARS = 20  # fewer aperture-correction stars: the regression is not attempted
MIN_RINGS = 7  # fewer 1-px rings between the core and the outer radius (undersampled frames): not attempted
MAX_HALO = 0.3  # a wing beyond 2 FWHM larger than this fraction of the aperture flux is not believed
MIN_RING_PX = 5  # a ring with fewer usable pixels makes the star unusable


@dataclass(frozen=True)
class OuterLight:
    """The result of :func:`outer_flux`.

    Attributes
    ----------
    flux
        Each usable star's flux within ``r_big_px`` (ADU), wing and pedestal separated.
    good
        Which of the input stars are usable (all rings measured, core aperture unflagged).
    halo
        The wing between the core and the outer radius, as a fraction of the aperture flux.
    pedestal_adu
        The sky left by the mesh (ADU per pixel).
    n_rings
        Rings between the core and the outer radius.
    """

    flux: np.ndarray
    good: np.ndarray
    halo: float
    pedestal_adu: float
    n_rings: int


def ring_medians(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, edges_px: np.ndarray
                 ) -> np.ndarray:
    """Median pixel value (ADU) of each star's rings ``edges_px[k] <= r < edges_px[k + 1]``.

    Pixel centres decide membership. A ring with fewer than ``MIN_RING_PX`` usable pixels,
    or a star too close to the edge for its outer ring, gives NaN.

    Parameters
    ----------
    data
        Background-subtracted image (ADU).
    bad
        Pixels not to use.
    x, y
        Star positions (px).
    edges_px
        Ring edges (px), increasing.

    Returns
    -------
    ndarray
        Shape ``(len(x), len(edges_px) - 1)``.
    """
    half = int(np.ceil(edges_px[-1])) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    h, w = data.shape
    out = np.full((len(x), len(edges_px) - 1), np.nan)
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        ix, iy = round(float(xi)), round(float(yi))
        if ix - half < 0 or iy - half < 0 or ix + half >= w or iy + half >= h:
            continue
        stamp = data[iy - half:iy + half + 1, ix - half:ix + half + 1]
        use = ~bad[iy - half:iy + half + 1, ix - half:ix + half + 1]
        r = np.hypot(xx + ix - xi, yy + iy - yi)
        ring = np.digitize(r, edges_px) - 1
        for k in range(len(edges_px) - 1):
            m = (ring == k) & use
            if m.sum() >= MIN_RING_PX:
                out[i, k] = np.median(stamp[m])
    return out


def outer_flux(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, flux_ap: np.ndarray,
               r_core_px: float, r_big_px: float) -> OuterLight | None:
    """Each star's flux within ``r_big_px``: core sum, ring-median wing and sky pedestal separated.

    See the module docstring for the method.

    Parameters
    ----------
    data
        Background-subtracted image (ADU).
    bad
        Pixels not to use.
    x, y
        Positions of the aperture-correction stars (px).
    flux_ap
        Their aperture fluxes (ADU), the regressor.
    r_core_px
        Radius of the summed core (px).
    r_big_px
        Outer radius (px).

    Returns
    -------
    OuterLight or None
        None when the regression is not determined: fewer than ``MIN_STARS`` usable stars,
        fewer than ``MIN_RINGS`` rings, or a halo outside ``[0, MAX_HALO]``.
    """
    edges = np.arange(r_core_px, r_big_px + 1e-9, 1.0)
    if edges[-1] < r_big_px - 1e-9:
        edges = np.r_[edges, r_big_px]
    n_rings = len(edges) - 1
    if n_rings < MIN_RINGS or len(x) < MIN_STARS:
        return None
    core, _, flag = sep.sum_circle(data, x, y, r_core_px, mask=bad, subpix=5)
    med = ring_medians(data, bad, x, y, edges)
    fa = np.asarray(flux_ap, float)
    good = (flag == 0) & np.isfinite(med).all(axis=1) & (fa > 0)
    if good.sum() < MIN_STARS:
        return None
    slope = np.empty(n_rings)
    icept = np.empty(n_rings)
    for k in range(n_rings):
        slope[k], icept[k], _, _ = theilslopes(med[good, k], fa[good])
    area = np.pi * (edges[1:] ** 2 - edges[:-1] ** 2)
    halo = float(np.sum(slope * area))
    if not 0.0 <= halo <= MAX_HALO:
        return None
    pedestal = float(np.median(icept))
    flux = np.asarray(core, float)[good] - pedestal * np.pi * r_core_px**2 + halo * fa[good]
    return OuterLight(flux=flux, good=good, halo=halo, pedestal_adu=pedestal, n_rings=n_rings)
