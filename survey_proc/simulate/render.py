"""Render one field x epoch: stars, sky, noise, cosmic rays, bad columns, saturation.

Order of operations (all in ADU unless named ``_e``):

1. Star positions: reference frame -> epoch detector frame (exact affine, see ``wcs.py``).
2. Star fluxes: ``10 ** (-0.4 * (m(t) - zeropoint))`` with ``m(t)`` from the variable models.
3. Stars are rendered with the epoch's effective-PSF phase banks (``psf.py``) and summed
   with one ``np.bincount`` per stamp size (vectorised; no per-star Python loop).
4. Sky (uniform per epoch) is added; GalSim's ``CCDNoise`` applies Poisson noise to
   sky + stars in electrons (``gain_e_per_adu``) and Gaussian read noise.
5. Cosmic rays (short straight tracks, charge per pixel log-normal about
   ``cosmic_charge_e``) are added after the noise: mask bit 4.
6. Bad columns (fixed per field in detector pixels; dead = read noise only, hot = +2x sky)
   from a random row to the top: mask bit 1.
7. Pixels at or above ``saturation_adu`` are clipped to it: mask bit 2.

Options (all off in the presets; see ``scenario.py``), each leaving the rest unchanged:

- **Bright-star PSF** (``spikes`` and/or ``halo_fraction > 0``): stars whose truth ``mag``
  is below ``spike_mag_max`` are drawn one by one with GalSim on a stamp of half-size
  ``spike_radius_px`` with :func:`~survey_proc.simulate.psf.bright_star_profile` (core +
  halo, convolved with an OpticalPSF with struts), each stamp the profile times the star's
  flux, truncated (the light beyond the stamp is left out, not put into the core; the truth
  flux is the total). Spikes are fixed in the detector frame.
- **Galaxies** (``galaxy_density_per_arcmin2 > 0``; ``galaxies.py``) are added to the
  noise-free image with the stars.
- **Hot pixels** (``hot_pixel_frac > 0``): fixed per field, ``hot_pixel_adu`` log-normal
  (0.3 dex rms) per exposure, added before the noise (so with shot noise) and not masked.
- **Bleed trails** (``bleed_trails``): before the clip, the charge above saturation of
  each run of saturated pixels in a column is moved half up and half down the column,
  filling pixels to saturation; the trail carries mask bit 2.
"""

from __future__ import annotations

import galsim
import numpy as np
import pandas as pd

from survey_proc.simulate.conditions import STREAM_BADCOLS, STREAM_COSMICS, STREAM_HOTPIX, STREAM_NOISE, rng_for
from survey_proc.simulate.galaxies import make_galaxies, render_galaxies
from survey_proc.simulate.psf import bright_star_profile, build_bank, galsim_profile
from survey_proc.simulate.scenario import Scenario
from survey_proc.simulate.stamps import render_stars
from survey_proc.simulate.variables import magnitudes_at
from survey_proc.simulate.wcs import reference_to_epoch
from survey_proc.vocab import MASK_BAD, MASK_COSMIC, MASK_SATURATED


def sigma_pix_adu(scn: Scenario, sky_adu: float) -> float:
    """Per-pixel noise (ADU) of the sky background: Poisson on sky plus read noise.

    Parameters
    ----------
    scn
        The scenario.
    sky_adu
        Sky per pixel (ADU).

    Returns
    -------
    float
        The noise (ADU).
    """
    return float(np.sqrt(sky_adu / scn.gain_e_per_adu + (scn.read_noise_e / scn.gain_e_per_adu) ** 2))





def bright_star_mask(scn: Scenario, mag: np.ndarray) -> np.ndarray:
    """Which stars get the bright-star PSF (spikes and/or halo): truth ``mag < spike_mag_max``.

    Parameters
    ----------
    scn
        The scenario.
    mag
        Truth (catalogue) magnitudes of the stars (mag).

    Returns
    -------
    ndarray of bool
        All False unless ``scn.bright_star_psf``.
    """
    mag = np.asarray(mag, dtype="float64")
    if not scn.bright_star_psf:
        return np.zeros(mag.shape, dtype=bool)
    return mag < scn.spike_mag_max


def render_bright_stars(img: np.ndarray, x: np.ndarray, y: np.ndarray, flux_adu: np.ndarray,
                        profile: galsim.GSObject, radius_px: int) -> int:
    """Add bright stars drawn one by one with GalSim to a noise-free image in place (ADU).

    Each star's ``(2 radius_px + 1)``-pixel stamp (``profile`` ⊗ pixel, at the star's
    sub-pixel position) is the profile times the star's flux, truncated to the stamp and not
    renormalised (as the faint stars' stamps: ``survey_proc.simulate.psf``); the part outside
    the image is dropped.

    Parameters
    ----------
    img
        The image (ADU, float64), modified in place.
    x, y
        Star positions (px, 0-based detector frame).
    flux_adu
        Total fluxes (ADU).
    profile
        The bright-star PSF (unit flux, pixel units).
    radius_px
        Stamp half-size (px).

    Returns
    -------
    int
        Stars drawn (those whose stamp touches the image).
    """
    ny, nx = img.shape
    r = int(radius_px)
    drawn = 0
    for xs, ys, f in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux_adu, float), strict=True):
        ix, iy = int(np.floor(xs + 0.5)), int(np.floor(ys + 0.5))
        x0, x1 = max(ix - r, 0), min(ix + r + 1, nx)
        y0, y1 = max(iy - r, 0), min(iy + r + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        stamp = profile.drawImage(nx=2 * r + 1, ny=2 * r + 1, scale=1.0, offset=(xs - ix, ys - iy),
                                  dtype=np.float64).array
        stamp *= f / profile.flux  # the light beyond the stamp is left out, not put into the core
        img[y0:y1, x0:x1] += stamp[y0 - (iy - r) : y1 - (iy - r), x0 - (ix - r) : x1 - (ix - r)]
        drawn += 1
    return drawn


def hot_pixels(scn: Scenario, field_index: int) -> pd.DataFrame:
    """The field's hot pixels (fixed in detector pixels): x, y and excess per exposure (ADU).

    Parameters
    ----------
    scn
        The scenario (``hot_pixel_frac``, ``hot_pixel_adu``).
    field_index
        Index of the field.

    Returns
    -------
    DataFrame
        ``x``, ``y`` (px) and ``excess_adu`` (ADU per exposure, log-normal about
        ``hot_pixel_adu`` with 0.3 dex rms); empty when ``hot_pixel_frac`` is 0.
    """
    n = round(scn.hot_pixel_frac * scn.size_px**2)
    if n == 0:
        return pd.DataFrame({"x": np.zeros(0, int), "y": np.zeros(0, int), "excess_adu": np.zeros(0)})
    rng = rng_for(scn, STREAM_HOTPIX, field_index)
    flat = rng.choice(scn.size_px**2, size=n, replace=False)
    return pd.DataFrame({"x": flat % scn.size_px, "y": flat // scn.size_px,
                         "excess_adu": scn.hot_pixel_adu * 10.0 ** (0.3 * rng.standard_normal(n))})


def bleed_columns(img: np.ndarray, saturation_adu: float) -> int:
    """Move the charge above saturation along each column (bleed trails), in place.

    For every run of pixels above ``saturation_adu`` in a column, the excess charge is set
    to saturation and the excess is shared half up, half down the column, filling pixels
    to saturation one after the other (charge beyond the image edge is lost).

    Parameters
    ----------
    img
        The image (ADU), modified in place.
    saturation_adu
        Saturation level (ADU).

    Returns
    -------
    int
        Pixels that received bled charge.
    """
    ny = img.shape[0]
    filled = 0
    for x in np.flatnonzero((img > saturation_adu).any(axis=0)):
        col = img[:, x]
        over = np.concatenate([[False], col > saturation_adu, [False]])
        edges = np.flatnonzero(np.diff(over.astype(np.int8)))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            excess = float(np.sum(col[a:b] - saturation_adu))
            col[a:b] = saturation_adu
            for start, step in ((b, 1), (a - 1, -1)):
                left, p = excess / 2.0, start
                while left > 0 and 0 <= p < ny:
                    room = saturation_adu - col[p]
                    if room > 0:
                        add = min(room, left)
                        col[p] += add
                        left -= add
                        filled += 1
                    p += step
    return filled


def epoch_rotation_rad(scn: Scenario, dx_px: float, dy_px: float, rotation_deg: float) -> float:
    """Rotation angle (rad, counter-clockwise in pixel coordinates) of the epoch frame relative to the reference.

    Parameters
    ----------
    scn
        The scenario.
    dx_px, dy_px, rotation_deg
        The epoch's pointing offset (px) and rotation (deg).

    Returns
    -------
    float
        The angle (rad).
    """
    c = (scn.size_px - 1) / 2.0
    xe, ye = reference_to_epoch(scn, np.array([c, c + 1.0]), np.array([c, c]), dx_px, dy_px, rotation_deg)
    return float(np.arctan2(ye[1] - ye[0], xe[1] - xe[0]))


def bad_columns(scn: Scenario, field_index: int) -> pd.DataFrame:
    """The field's bad columns: column x, first bad row, kind ('dead' or 'hot').

    Parameters
    ----------
    scn
        The scenario.
    field_index
        Index of the field.

    Returns
    -------
    DataFrame
        ``x``, ``y_start`` (first bad row) and ``kind`` per bad column.
    """
    rng = rng_for(scn, STREAM_BADCOLS, field_index)
    n = scn.n_bad_columns
    return pd.DataFrame(
        {
            "x": rng.choice(scn.size_px, size=n, replace=False) if n else np.zeros(0, int),
            "y_start": rng.integers(0, scn.size_px // 2, size=n),
            "kind": rng.choice(["dead", "hot"], size=n),
        }
    )


def add_cosmic_rays(img: np.ndarray, mask: np.ndarray, scn: Scenario, rng: np.random.Generator) -> int:
    """Add cosmic-ray tracks in place (ADU) and flag them; return the number of events.

    Parameters
    ----------
    img
        The image (ADU), modified in place.
    mask
        Its mask bits, modified in place (:data:`~survey_proc.vocab.MASK_COSMIC`).
    scn
        The scenario.
    rng
        The epoch's cosmic-ray stream.

    Returns
    -------
    int
        The number of cosmic-ray events.
    """
    ny, nx = img.shape
    n = int(rng.poisson(scn.cosmic_rate_per_px_s * ny * nx * scn.exptime_s))
    if n == 0:
        return 0
    length = 1.0 + rng.exponential(3.0, n)  # pixels
    angle = rng.uniform(0, np.pi, n)
    x0 = rng.uniform(-0.5, nx - 0.5, n)
    y0 = rng.uniform(-0.5, ny - 0.5, n)
    charge = scn.cosmic_charge_e * np.exp(0.5 * rng.standard_normal(n))  # e- per pixel
    steps = np.maximum(1, np.ceil(2 * length).astype(int))
    idx = np.repeat(np.arange(n), steps)
    frac = (np.arange(idx.size) - np.repeat(np.cumsum(steps) - steps, steps)) / np.repeat(steps, steps)
    xs = np.floor(x0[idx] + frac * length[idx] * np.cos(angle[idx]) + 0.5).astype(int)
    ys = np.floor(y0[idx] + frac * length[idx] * np.sin(angle[idx]) + 0.5).astype(int)
    ok = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    flat = ys[ok] * nx + xs[ok]
    # each hit pixel gets its track's charge once (sampling at half-pixel steps would double it)
    key = np.unique(np.column_stack([flat, idx[ok]]), axis=0)
    dep = np.bincount(key[:, 0], weights=charge[key[:, 1]], minlength=ny * nx).reshape(ny, nx)
    img += dep / scn.gain_e_per_adu
    mask[dep > 0] |= MASK_COSMIC
    return n


def render_epoch(
    scn: Scenario,
    field_index: int,
    stars: pd.DataFrame,
    cond: dict,
    bad_cols: pd.DataFrame | None = None,
    galaxies: pd.DataFrame | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one field x epoch.

    Parameters
    ----------
    scn
        Scenario.
    field_index
        0-based field number (seeds the field's noise, cosmics, bad columns).
    stars
        The field's star catalogue (``make_stars`` output, or any table with the same columns).
    cond
        One row of ``field_epochs``: epoch, mjd, seeing_fwhm_px, psf_g1, psf_g2, sky_adu,
        zeropoint, dx_px, dy_px, rotation_deg.
    bad_cols
        The field's bad columns (default: :func:`bad_columns`).
    galaxies
        The field's galaxies (``make_galaxies`` rows); default: :func:`make_galaxies` when
        ``galaxy_density_per_arcmin2 > 0``, else none.

    Returns
    -------
    image : float32 (ny, nx) in ADU, sky included
    mask : uint8 (ny, nx), bits from ``survey_proc.store``
    """
    n = scn.size_px
    epoch = int(cond["epoch"])
    bank = build_bank(scn.psf_profile, float(cond["seeing_fwhm_px"]), beta=scn.moffat_beta,
                      g1=float(cond["psf_g1"]), g2=float(cond["psf_g2"]),
                      oversample=scn.psf_oversample, base_radius_px=scn.stamp_radius_px)
    xe, ye = reference_to_epoch(scn, stars["x"].to_numpy(), stars["y"].to_numpy(),
                                float(cond["dx_px"]), float(cond["dy_px"]), float(cond["rotation_deg"]))
    mag = magnitudes_at(stars, float(cond["mjd"]))[:, 0]
    flux = 10.0 ** (-0.4 * (mag - float(cond["zeropoint"])))
    sky = float(cond["sky_adu"])
    fwhm = float(cond["seeing_fwhm_px"])
    bright = bright_star_mask(scn, stars["mag"].to_numpy())
    if bright.any():
        faint = ~bright
        img = render_stars((n, n), xe[faint], ye[faint], flux[faint], bank, sigma_pix_adu(scn, sky))
        core = galsim_profile(scn.psf_profile, fwhm, scn.moffat_beta, float(cond["psf_g1"]), float(cond["psf_g2"]))
        profile = bright_star_profile(
            core, fwhm, spikes=scn.spikes, halo_fraction=scn.halo_fraction, halo_fwhm_factor=scn.halo_fwhm_factor,
            radius_px=scn.spike_radius_px, lam_over_diam_px=scn.spike_lam_over_diam_px,
            obscuration=scn.spike_obscuration, nstruts=scn.spike_nstruts, strut_thick=scn.spike_strut_thick,
            strut_angle_deg=scn.spike_angle_deg)
        render_bright_stars(img, xe[bright], ye[bright], flux[bright], profile, scn.spike_radius_px)
    else:
        img = render_stars((n, n), xe, ye, flux, bank, sigma_pix_adu(scn, sky))
    if galaxies is None and scn.galaxy_density_per_arcmin2 > 0:
        galaxies = make_galaxies(scn, field_index)
    if galaxies is not None and len(galaxies):
        gxe, gye = reference_to_epoch(scn, galaxies["x"].to_numpy(), galaxies["y"].to_numpy(),
                                      float(cond["dx_px"]), float(cond["dy_px"]), float(cond["rotation_deg"]))
        gflux = 10.0 ** (-0.4 * (galaxies["mag"].to_numpy() - float(cond["zeropoint"])))
        psf = galsim_profile(scn.psf_profile, fwhm, scn.moffat_beta, float(cond["psf_g1"]), float(cond["psf_g2"]))
        rot = epoch_rotation_rad(scn, float(cond["dx_px"]), float(cond["dy_px"]), float(cond["rotation_deg"]))
        render_galaxies(img, galaxies, gxe, gye, gflux, psf, fwhm, rot)
    if scn.hot_pixel_frac > 0:
        hp = hot_pixels(scn, field_index)
        img[hp["y"].to_numpy(), hp["x"].to_numpy()] += hp["excess_adu"].to_numpy()
    img += sky
    gimg = galsim.Image(img, copy=False)
    seed = int(np.random.SeedSequence([int(scn.seed), STREAM_NOISE, field_index, epoch]).generate_state(1)[0])
    gimg.addNoise(galsim.CCDNoise(galsim.BaseDeviate(seed), gain=scn.gain_e_per_adu, read_noise=scn.read_noise_e))
    img = gimg.array
    mask = np.zeros((n, n), dtype="uint8")
    add_cosmic_rays(img, mask, scn, rng_for(scn, STREAM_COSMICS, field_index, epoch))
    bc = bad_columns(scn, field_index) if bad_cols is None else bad_cols
    if len(bc):
        col_rng = rng_for(scn, STREAM_BADCOLS, field_index, epoch)
        for x, y0, kind in bc.itertuples(index=False):
            rows = slice(int(y0), n)
            nrow = n - int(y0)
            noise = col_rng.standard_normal(nrow) * scn.read_noise_e / scn.gain_e_per_adu
            img[rows, int(x)] = noise if kind == "dead" else img[rows, int(x)] + 2.0 * sky
            mask[rows, int(x)] |= MASK_BAD
    sat = scn.saturation_adu
    if scn.bleed_trails:
        bleed_columns(img, sat)
    over = img >= sat
    img[over] = sat
    mask[over] |= MASK_SATURATED
    return img.astype("float32"), mask
