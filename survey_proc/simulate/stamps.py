"""Phase banks of an effective PSF and the stamp renderer; numpy only.

Split from ``psf.py`` (which draws the PSF with GalSim) and ``render.py`` so that code
running where GalSim is not installed (the detector's training generator on a GPU worker,
fed by a precomputed PSF library) renders stars exactly as the simulator does. The
method (phase banks, bilinear phase interpolation, the stamp radius rule) is described
in ``psf.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BLOCK_PIXELS = 2_000_000  # stamp pixels per vectorised block: bounds temporaries to ~16 MB each

RADIUS_LADDER_FACTORS = (1, 2, 4, 8)


@dataclass
class PSFBank:
    """Phase banks of one epoch's effective PSF.

    Attributes
    ----------
    oversample : K, sub-pixel samples per pixel (odd)
    t_min : the smallest phase index (bank index 0 corresponds to t_min)
    radii_px : stamp radii, ascending
    banks : per radius, array (K+2, K+2, 2R+1, 2R+1), the effective PSF cut to the stamp
        (each stamp sums to EE(R) at its phase: truncated, not renormalised)
    missing_flux : per radius, 1 - EE(R) for a centred star (flux outside the stamp)
    peak_fraction : largest fraction of a star's flux in one pixel (star centred on a pixel)
    """

    oversample: int
    t_min: int
    radii_px: tuple[int, ...]
    banks: tuple[np.ndarray, ...]
    missing_flux: tuple[float, ...]
    peak_fraction: float

    def radius_index(self, flux_adu: np.ndarray, sigma_pix_adu: float) -> np.ndarray:
        """Index into ``radii_px`` of the stamp each star needs (see module docstring).

        Parameters
        ----------
        flux_adu
            Star fluxes (ADU).
        sigma_pix_adu
            Per-pixel noise of the sky (ADU).

        Returns
        -------
        ndarray of int
            The radius index per star.
        """
        flux = np.asarray(flux_adu, dtype="float64")
        idx = np.full(flux.shape, len(self.radii_px) - 1, dtype=int)
        for k in range(len(self.radii_px) - 1, -1, -1):
            ok = flux * self.missing_flux[k] <= sigma_pix_adu
            idx[ok] = k
        return idx


def bank_from_epsf(epsf: np.ndarray, oversample: int, radii_px: tuple[int, ...]) -> PSFBank:
    """Cut an oversampled effective PSF into phase banks for the radius ladder.

    Parameters
    ----------
    epsf
        Pixel-integrated PSF tabulated every ``1/oversample`` px, centred, shape (M, M)
        with ``M = 2 * oversample * (max(radii_px) + 2) + 1`` or larger (odd).
    oversample
        K, sub-pixel phases per pixel (odd).
    radii_px
        The stamp radii (px), ascending.

    Returns
    -------
    PSFBank
    """
    k = int(oversample)
    c = (epsf.shape[0] - 1) // 2
    t_min = -(k // 2) - 1
    t_max = k // 2 + 1
    phases = np.arange(t_min, t_max + 1)
    banks = []
    missing = []
    for r in radii_px:
        j = np.arange(-r, r + 1)
        rows = c + phases[:, None] + k * j[None, :]  # (n_phase, 2R+1)
        bank = epsf[rows[:, None, :, None], rows[None, :, None, :]]  # (P, P, 2R+1, 2R+1)
        centred = bank[-t_min, -t_min]
        missing.append(float(max(0.0, 1.0 - centred.sum())))
        # truncated, not renormalised: every pixel of the stamp is the PSF's own value (see psf.py)
        banks.append(np.ascontiguousarray(bank))
    peak = float(epsf[c, c])
    return PSFBank(oversample=k, t_min=t_min, radii_px=tuple(radii_px), banks=tuple(banks),
                   missing_flux=tuple(missing), peak_fraction=peak)


def render_stars(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux_adu: np.ndarray, bank: PSFBank, sigma_pix: float
) -> np.ndarray:
    """Noise-free image (ADU) of point sources at detector pixels (x, y) with total fluxes.

    Each star's stamp is its flux times the effective PSF, truncated to the stamp (see
    ``psf.py``: the light left out is below one pixel's noise); pixels outside the image are
    dropped, so a star near the edge puts only its in-frame light on it.

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
