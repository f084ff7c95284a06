"""Galaxies: GalSim parametric profiles, constant over epochs, convolved with each epoch's PSF.

Galaxies are negatives for a star detector: they are written to ``NAME.truth/galaxies.parquet``
and never to ``stars.parquet`` or the reference catalogue. They are off unless
``galaxy_density_per_arcmin2 > 0``.

Catalogue (per field, own random stream ``STREAM_GALAXIES``)
-----------------------------------------------------------
- **Counts**: ``galaxy_density_per_arcmin2`` galaxies per arcmin² (Poisson) between the
  magnitudes ``galaxy_mag_range``, with ``dN/dm ∝ 10 ** (galaxy_count_slope * m)`` (0.4
  dex/mag by default, so most are faint; the faint end may lie below the 5σ limit). They are
  placed uniformly over the detector plus the same margin as stars.
- **Profiles** (fractions of all galaxies): 35 % exponential disks, 15 % de Vaucouleurs, 20 %
  Sérsic with ``n`` log-uniform in 0.5-6 (rounded to 0.1 so GalSim's Sérsic tables are
  shared), 30 % bulge + disk with a bulge-to-total flux fraction uniform in 0.1-0.7 and a
  bulge half-light radius half the disk's. De Vaucouleurs and Sérsic profiles are truncated
  at ``TRUNC_HLR`` half-light radii (GalSim ``trunc``; the flux and half-light radius are
  those of the truncated profile).
- **Sizes**: half-light radius (of the disk for bulge + disk) log-normal about
  ``1.0" x 10 ** (-0.1 (m - 20))`` (2.5" at m = 16, 0.4" at m = 24) with 0.2 dex rms,
  clipped to ``galaxy_hlr_arcsec``, converted to pixels with ``pixel_scale_arcsec``.
- **Shapes**: reduced shear ``|g| = (a - b) / (a + b)`` from a Rayleigh distribution
  (σ = 0.25) truncated at ``galaxy_e_max``, position angle uniform; ``e1 = |g| cos 2φ``,
  ``e2 = |g| sin 2φ`` (GalSim ``g1, g2`` in the reference frame).

Rendering (per epoch)
---------------------
Each galaxy is drawn by GalSim (``method='auto'``: profile ⊗ epoch PSF ⊗ pixel, by FFT) at
its epoch position, rotated by the epoch's rotation relative to the reference frame, with
flux ``10 ** (-0.4 (mag - zeropoint))`` ADU, on a stamp holding the truncated profile and
the PSF (radius capped at ``MAX_STAMP_RADIUS_PX``). It costs about 2-4 ms per galaxy.
"""

from __future__ import annotations

import galsim
import numpy as np
import pandas as pd

from survey_proc.simulate.conditions import STREAM_GALAXIES, rng_for
from survey_proc.simulate.scenario import Scenario
from survey_proc.simulate.stars import field_id_for, margin_px, sample_magnitudes
from survey_proc.simulate.wcs import reference_wcs

PROFILES = ("exponential", "devaucouleurs", "sersic", "bulge_disk")
PROFILE_FRACTIONS = (0.35, 0.15, 0.20, 0.30)
TRUNC_HLR = 5.0  # truncation radius of de Vaucouleurs / Sérsic profiles, in half-light radii
BULGE_HLR_RATIO = 0.5  # bulge half-light radius over the disk's (bulge + disk)
SIZE_SCATTER_DEX = 0.2
E_SIGMA = 0.25
MAX_STAMP_RADIUS_PX = 256
GALAXY_ID_OFFSET = 1 << 31  # galaxy_id = field << 32 + 2**31 + running number: never a star_id


def _truncated_rayleigh(rng: np.random.Generator, n: int, sigma: float, e_max: float) -> np.ndarray:
    """``n`` draws of a Rayleigh(σ) distribution truncated at ``e_max`` (inverse CDF)."""
    if e_max <= 0:
        return np.zeros(n)
    u = rng.uniform(0.0, 1.0 - np.exp(-(e_max**2) / (2 * sigma**2)), n)
    return np.minimum(sigma * np.sqrt(-2.0 * np.log1p(-u)), e_max)


def make_galaxies(scn: Scenario, field_index: int) -> pd.DataFrame:
    """Simulate the galaxy catalogue of one field (the rows of ``galaxies.parquet``).

    Parameters
    ----------
    scn
        The scenario (``galaxy_*`` parameters).
    field_index
        0-based field number.

    Returns
    -------
    DataFrame
        galaxy_id (int64), field, ra, dec (deg), x, y (reference-frame px, 0-based), mag
        (total), profile (one of :data:`PROFILES`), half_light_radius_px (px; the disk's for
        bulge + disk), e1, e2 (reduced shear), sersic_n (1 exponential, 4 de Vaucouleurs, n
        for Sérsic, NaN for bulge + disk), bulge_fraction (bulge-to-total flux; 0 exponential,
        1 de Vaucouleurs, NaN Sérsic), in_frame. Empty (same columns) when the density is 0.
    """
    rng = rng_for(scn, STREAM_GALAXIES, field_index)
    m = margin_px(scn)
    side = scn.size_px + 2 * m
    area_arcmin2 = (side * scn.pixel_scale_arcsec / 60.0) ** 2
    n = int(rng.poisson(scn.galaxy_density_per_arcmin2 * area_arcmin2)) if scn.galaxy_density_per_arcmin2 > 0 else 0
    x = rng.uniform(-m, scn.size_px - 1 + m, n)
    y = rng.uniform(-m, scn.size_px - 1 + m, n)
    mag = sample_magnitudes(rng, n, scn.galaxy_mag_range[0], scn.galaxy_mag_range[1], scn.galaxy_count_slope)
    kind = rng.choice(len(PROFILES), size=n, p=PROFILE_FRACTIONS)
    hlr_arcsec = 10.0 ** (-0.1 * (mag - 20.0) + SIZE_SCATTER_DEX * rng.standard_normal(n))
    hlr_px = np.clip(hlr_arcsec, *scn.galaxy_hlr_arcsec) / scn.pixel_scale_arcsec
    g = _truncated_rayleigh(rng, n, E_SIGMA, scn.galaxy_e_max)
    phi = rng.uniform(0.0, np.pi, n)
    n_sersic = np.round(np.exp(rng.uniform(np.log(0.5), np.log(6.0), n)), 1)
    bulge = rng.uniform(0.1, 0.7, n)
    sersic_n = np.select([kind == 0, kind == 1, kind == 2], [1.0, 4.0, n_sersic], np.nan)
    bulge_fraction = np.select([kind == 0, kind == 1, kind == 3], [0.0, 1.0, bulge], np.nan)
    ra, dec = reference_wcs(scn, field_index).all_pix2world(x, y, 0)
    return pd.DataFrame(
        {
            "galaxy_id": (np.int64(field_index) << np.int64(32)) + GALAXY_ID_OFFSET + np.arange(n, dtype="int64"),
            "field": field_id_for(field_index),
            "ra": np.asarray(ra, dtype="float64"),
            "dec": np.asarray(dec, dtype="float64"),
            "x": x,
            "y": y,
            "mag": mag,
            "profile": np.asarray(PROFILES, dtype=object)[kind] if n else np.zeros(0, dtype=object),
            "half_light_radius_px": hlr_px,
            "e1": g * np.cos(2 * phi),
            "e2": g * np.sin(2 * phi),
            "sersic_n": sersic_n,
            "bulge_fraction": bulge_fraction,
            "in_frame": (x >= -0.5) & (x <= scn.size_px - 0.5) & (y >= -0.5) & (y <= scn.size_px - 0.5),
        }
    )


def galaxy_profile(profile: str, hlr_px: float, e1: float, e2: float, sersic_n: float,
                   bulge_fraction: float) -> galsim.GSObject:
    """The intrinsic (unconvolved) unit-flux profile of one galaxy, in pixel units.

    Parameters
    ----------
    profile
        One of :data:`PROFILES`.
    hlr_px
        Half-light radius (px; the disk's for ``bulge_disk``).
    e1, e2
        Reduced shear of the shape.
    sersic_n
        Sérsic index (``sersic`` only).
    bulge_fraction
        Bulge-to-total flux fraction (``bulge_disk`` only).

    Returns
    -------
    galsim.GSObject
        Flux 1.
    """
    if profile == "exponential":
        obj: galsim.GSObject = galsim.Exponential(half_light_radius=hlr_px)
    elif profile == "devaucouleurs":
        obj = galsim.DeVaucouleurs(half_light_radius=hlr_px, trunc=TRUNC_HLR * hlr_px)
    elif profile == "sersic":
        obj = galsim.Sersic(n=float(sersic_n), half_light_radius=hlr_px, trunc=TRUNC_HLR * hlr_px)
    elif profile == "bulge_disk":
        b_hlr = BULGE_HLR_RATIO * hlr_px
        obj = galsim.Add([
            galsim.DeVaucouleurs(half_light_radius=b_hlr, trunc=TRUNC_HLR * b_hlr, flux=float(bulge_fraction)),
            galsim.Exponential(half_light_radius=hlr_px, flux=1.0 - float(bulge_fraction)),
        ])
    else:
        raise ValueError(f"unknown galaxy profile {profile!r} (use one of {', '.join(PROFILES)})")
    if e1 or e2:
        obj = obj.shear(g1=float(e1), g2=float(e2))
    return obj


def stamp_radius_px(hlr_px: np.ndarray, e1: np.ndarray, e2: np.ndarray, psf_fwhm_px: float) -> np.ndarray:
    """Half-size (px) of the stamp a galaxy is drawn on: its truncation radius along the major axis + 3 FWHM.

    Parameters
    ----------
    hlr_px
        Half-light radii (px).
    e1, e2
        Reduced shears.
    psf_fwhm_px
        The epoch's PSF FWHM (px).

    Returns
    -------
    ndarray of int
        Radii (px), at most :data:`MAX_STAMP_RADIUS_PX`.
    """
    g = np.minimum(np.hypot(e1, e2), 0.95)
    major = TRUNC_HLR * np.asarray(hlr_px) * np.sqrt((1 + g) / (1 - g))
    return np.minimum(np.ceil(major + 3.0 * psf_fwhm_px + 2.0), MAX_STAMP_RADIUS_PX).astype(int)


def render_galaxies(img: np.ndarray, galaxies: pd.DataFrame, x_epoch: np.ndarray, y_epoch: np.ndarray,
                    flux_adu: np.ndarray, psf: galsim.GSObject, psf_fwhm_px: float,
                    rotation_rad: float = 0.0) -> int:
    """Add PSF-convolved galaxies to a noise-free image in place (ADU).

    Parameters
    ----------
    img
        The image (ADU, float64, (ny, nx)), modified in place.
    galaxies
        Rows of :func:`make_galaxies`.
    x_epoch, y_epoch
        The galaxies' positions in the epoch's detector frame (px, 0-based).
    flux_adu
        Total fluxes (ADU).
    psf
        The epoch's PSF (GalSim object in pixel units, unit flux, before the pixel).
    psf_fwhm_px
        Its FWHM (px), for the stamp size.
    rotation_rad
        Rotation of the epoch frame relative to the reference frame (rad, counter-clockwise
        in pixel coordinates), applied to the shapes.

    Returns
    -------
    int
        The number of galaxies drawn (those whose stamp touches the image).
    """
    ny, nx = img.shape
    radius = stamp_radius_px(galaxies["half_light_radius_px"].to_numpy(), galaxies["e1"].to_numpy(),
                             galaxies["e2"].to_numpy(), psf_fwhm_px)
    rows = galaxies[["profile", "half_light_radius_px", "e1", "e2", "sersic_n", "bulge_fraction"]].itertuples(
        index=False, name=None)
    drawn = 0
    for i, row in enumerate(rows):
        r = int(radius[i])
        ix = int(np.floor(x_epoch[i] + 0.5))
        iy = int(np.floor(y_epoch[i] + 0.5))
        x0, x1 = max(ix - r, 0), min(ix + r + 1, nx)
        y0, y1 = max(iy - r, 0), min(iy + r + 1, ny)
        if x0 >= x1 or y0 >= y1 or flux_adu[i] <= 0:
            continue
        obj = galaxy_profile(*row)
        if rotation_rad:
            obj = obj.rotate(rotation_rad * galsim.radians)
        conv = galsim.Convolve(obj, psf).withFlux(float(flux_adu[i]))
        stamp = conv.drawImage(nx=2 * r + 1, ny=2 * r + 1, scale=1.0,
                               offset=(x_epoch[i] - ix, y_epoch[i] - iy), dtype=np.float64).array
        img[y0:y1, x0:x1] += stamp[y0 - (iy - r) : y1 - (iy - r), x0 - (ix - r) : x1 - (ix - r)]
        drawn += 1
    return drawn


__all__ = ["PROFILES", "galaxy_profile", "make_galaxies", "render_galaxies", "stamp_radius_px"]
