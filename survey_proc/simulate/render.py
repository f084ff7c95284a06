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
7. Pixels at or above ``saturation_adu`` are clipped to it: mask bit 2. (No bleed trails.)
"""

from __future__ import annotations

import galsim
import numpy as np
import pandas as pd

from survey_proc.simulate.conditions import STREAM_BADCOLS, STREAM_COSMICS, STREAM_NOISE, rng_for
from survey_proc.simulate.psf import PSFBank, build_bank
from survey_proc.simulate.scenario import Scenario
from survey_proc.simulate.variables import magnitudes_at
from survey_proc.simulate.wcs import reference_to_epoch
from survey_proc.vocab import MASK_BAD, MASK_COSMIC, MASK_SATURATED

_BLOCK_PIXELS = 2_000_000  # stamp pixels per vectorised block: bounds temporaries to ~16 MB each


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


def render_stars(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux_adu: np.ndarray, bank: PSFBank, sigma_pix: float
) -> np.ndarray:
    """Noise-free image (ADU) of point sources at detector pixels (x, y) with total fluxes.

    Each star's stamp is normalised to its flux exactly (see ``psf.py``); pixels outside
    the image are dropped, so a star near the edge puts only its in-frame light on it.

    Parameters
    ----------
    shape
        ``(ny, nx)`` of the image (px).
    x, y
        Star positions (px, 0-based detector frame).
    flux_adu
        Total fluxes (ADU).
    bank
        The epoch's effective-PSF phase banks.
    sigma_pix
        Per-pixel sky noise (ADU), for the stamp radius rule.

    Returns
    -------
    ndarray
        The image (ADU, float64).
    """
    ny, nx = shape
    acc = np.zeros(ny * nx, dtype="float64")
    x = np.asarray(x, dtype="float64")
    y = np.asarray(y, dtype="float64")
    flux = np.asarray(flux_adu, dtype="float64")
    k = bank.oversample
    r_idx = bank.radius_index(flux, sigma_pix)
    for ri, radius in enumerate(bank.radii_px):
        sel = np.flatnonzero(r_idx == ri)
        # keep stars whose stamp touches the image
        sel = sel[(x[sel] > -radius - 1) & (x[sel] < nx + radius) & (y[sel] > -radius - 1) & (y[sel] < ny + radius)]
        if not len(sel):
            continue
        b = bank.banks[ri].astype(np.float32)  # float32 stamps: half the memory traffic
        j = np.arange(-radius, radius + 1)
        block = max(1, _BLOCK_PIXELS // (2 * radius + 1) ** 2)
        for start in range(0, len(sel), block):
            s = sel[start : start + block]
            ix = np.floor(x[s] + 0.5).astype(np.int64)
            iy = np.floor(y[s] + 0.5).astype(np.int64)
            tx = -k * (x[s] - ix)
            ty = -k * (y[s] - iy)
            tx0 = np.floor(tx)
            ty0 = np.floor(ty)
            wx = (tx - tx0).astype(np.float32)[:, None, None]
            wy = (ty - ty0).astype(np.float32)[:, None, None]
            ax = tx0.astype(np.int64) - bank.t_min
            ay = ty0.astype(np.int64) - bank.t_min
            stamp = ((1 - wy) * ((1 - wx) * b[ay, ax] + wx * b[ay, ax + 1])
                     + wy * ((1 - wx) * b[ay + 1, ax] + wx * b[ay + 1, ax + 1]))
            stamp *= flux[s].astype(np.float32)[:, None, None]
            py = iy[:, None, None] + j[None, :, None]
            px = ix[:, None, None] + j[None, None, :]
            ok = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
            ok = np.broadcast_to(ok, stamp.shape)
            flat = (py * nx + px)
            flat = np.broadcast_to(flat, stamp.shape)
            acc += np.bincount(flat[ok], weights=stamp[ok], minlength=ny * nx)
    return acc.reshape(ny, nx)


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
    img = render_stars((n, n), xe, ye, flux, bank, sigma_pix_adu(scn, sky))
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
    over = img >= sat
    img[over] = sat
    mask[over] |= MASK_SATURATED
    return img.astype("float32"), mask
