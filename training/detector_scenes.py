"""Realistic training tiles for PNet: stars as positives, everything a real image adds as negatives.

The basic generator (:mod:`training.detector_data`) draws stars on a smooth sky. Real
images add what a star detector must *not* call a star, and measured on them (issue 20,
``benchmarks/real.py``) the network trained only on stars fires on all of it. Each tile
here is a :class:`training.detector_data.TileGenerator`-like scene with, at random:

- **PSF** from a precomputed GalSim library (:mod:`training.detector_assets`: FWHM 0.8-10
  px, Moffat / Kolmogorov / core + wings, elliptical), rendered with the simulator's own
  phase banks (:func:`survey_proc.simulate.stamps.render_stars`);
- **galaxies** (library stamps convolved with the same PSF; 0-4e-3 per px^2, ``m - m_lim``
  -7 to +1.5): *negatives*, no heatmap target;
- **a bright star** with halo and diffraction spikes (30 % of tiles, centred anywhere
  within 40 px of the tile, 8-14 mag above the limit, saturating): the star itself is a
  positive, its halo and spikes are negatives; its saturated core bleeds along the
  column (the bleed trail is masked in half the tiles, as pipelines without a bleed mask
  leave it);
- **hot pixels** (unmasked, 10-1000 sigma) and **cosmic rays** of which half are left
  unmasked;
- **correlated noise** (25 %: the noise smoothed with a Gaussian of 0.5-1.2 px and rescaled
  to the same per-pixel rms, as resampled and coadded images have);
- **photographic grain** (15 %: a skewed, clumpy extra noise of 0.5-2 sigma, scale 0.6-1.5
  px);
- **nebulosity** (25 %: a smooth random field with a power-law spectrum on scales of 4-40
  px, 1-30 sigma, left after a background estimate that cannot follow it).

The image is normalised as the pipeline does (``(image - background) / noise``, the noise
being the per-pixel rms of the sky including grain; bad pixels 0). Targets are
:func:`training.detector_data.make_targets` for the *stars* whose isolated PSF-fit S/N
against the sky noise is >= ``snr_target``. numpy and scipy only: runs where GalSim is not
installed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from survey_proc.simulate.stamps import PSFBank, bank_from_epsf, render_stars
from training.detector_data import cosmic_track, finish_tile, luminosity_function, stack_tiles


@dataclass(frozen=True)
class SceneConfig:
    """Ranges of the randomised conditions (units in the names)."""

    size_px: int = 64
    pad_px: int = 12
    sky_adu: tuple[float, float] = (15.0, 500.0)
    gain_e_per_adu: tuple[float, float] = (1.0, 5.0)
    read_noise_e: tuple[float, float] = (3.0, 8.0)
    full_well_e: tuple[float, float] = (6e4, 1.5e5)
    density_per_px2: tuple[float, float] = (3e-4, 0.04)
    frac_crowded: float = 0.4
    crowded_per_px2: tuple[float, float] = (0.012, 0.04)
    mag_rel: tuple[float, float] = (-10.0, 1.5)
    lf_slope: float = 0.30
    frac_galaxies: float = 0.6
    galaxies_per_px2: tuple[float, float] = (3e-4, 4e-3)
    galaxy_mag_rel: tuple[float, float] = (-7.0, 1.5)
    galaxy_lf_slope: float = 0.35
    frac_bright_star: float = 0.3
    bright_mag_rel: tuple[float, float] = (-14.0, -8.0)
    bright_reach_px: int = 40
    frac_bleed_masked: float = 0.5
    hot_pixels_per_tile: float = 1.0
    hot_pixel_sigma: tuple[float, float] = (10.0, 1000.0)
    cosmics_per_tile: float = 0.8
    frac_cosmics_unmasked: float = 0.5
    frac_bad_column: float = 0.05
    frac_correlated: float = 0.25
    correlation_px: tuple[float, float] = (0.5, 1.2)
    frac_grain: float = 0.15
    grain_sigma: tuple[float, float] = (0.5, 2.0)
    grain_scale_px: tuple[float, float] = (0.6, 1.5)
    frac_nebula: float = 0.25
    nebula_sigma: tuple[float, float] = (1.0, 30.0)
    bkg_error_sigma: float = 0.1
    noise_scale_error: float = 0.03
    snr_target: float = 3.0
    sigma_hm_px: float = 0.8

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Psf:
    bank: PSFBank
    n_eff: float
    fwhm_px: float
    galaxies: np.ndarray  # (n_gal, 63, 63) unit flux
    bright: np.ndarray  # (97, 97) unit flux


def load_library(path: Path) -> list[_Psf]:
    """The PSFs, galaxies and bright-star profiles of an asset file (``detector_assets``)."""
    z = np.load(path)
    k = int(z["oversample"])
    out = []
    for i, fwhm in enumerate(z["psf_fwhm_px"]):
        radii = tuple(int(r) for r in z["psf_radii_px"][i] if r > 0)
        bank = bank_from_epsf(z[f"epsf_{i}"].astype(np.float64), k, radii)
        centred = bank.banks[0][-bank.t_min, -bank.t_min]
        out.append(_Psf(bank, float(1.0 / np.sum(centred**2)), float(fwhm),
                        z["galaxies"][i].astype(np.float32), _tapered(z["bright"][i].astype(np.float32))))
    return out


def _tapered(stamp: np.ndarray) -> np.ndarray:
    """The stamp times a cos^2 window from 2/3 of its half-size to its edge (no square edge)."""
    h = stamp.shape[0] // 2
    j = np.arange(-h, h + 1)
    r = np.hypot(j[None, :], j[:, None]) / h
    w = np.where(r < 2 / 3, 1.0, np.cos(np.clip((r - 2 / 3) * 1.5, 0, 1) * np.pi / 2) ** 2)
    return (stamp * w).astype(np.float32)


def _add_stamp(img: np.ndarray, stamp: np.ndarray, x0: int, y0: int, flux: float) -> None:
    """Add ``flux * stamp`` centred on pixel (x0, y0), clipped at the image edges."""
    h = stamp.shape[0] // 2
    ny, nx = img.shape
    ya, yb = max(0, y0 - h), min(ny, y0 + h + 1)
    xa, xb = max(0, x0 - h), min(nx, x0 + h + 1)
    if ya >= yb or xa >= xb:
        return
    img[ya:yb, xa:xb] += flux * stamp[ya - (y0 - h):yb - (y0 - h), xa - (x0 - h):xb - (x0 - h)]


def _powerlaw_field(rng: np.random.Generator, n: int, scale_px: tuple[float, float]) -> np.ndarray:
    """A zero-mean, unit-rms random field with power on scales ``scale_px`` (P ~ k^-3)."""
    kx = np.fft.fftfreq(n)
    k = np.hypot(kx[None, :], kx[:, None])
    amp = np.where((k >= 1 / scale_px[1]) & (k <= 1 / scale_px[0]), np.clip(k, 1e-6, None) ** -1.5, 0.0)
    f = np.fft.ifft2(amp * (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n)))).real
    s = f.std()
    return f / s if s > 0 else f


class SceneGenerator:
    """Reproducible stream of realistic (normalised image, targets, truth) tiles.

    Parameters
    ----------
    cfg
        The ranges.
    seed
        The stream's seed (training < 1000; validation a different one).
    library
        The PSF library (:func:`load_library`), shared between generators.
    """

    def __init__(self, cfg: SceneConfig, seed: int, library: list[_Psf]):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.psfs = library

    def _mags(self, k: int, lo: float, hi: float, slope: float) -> np.ndarray:
        return luminosity_function(self.rng, k, lo, hi, slope)

    def tile(self) -> dict:
        """One tile: ``image`` (H, W) float32 normalised, ``bad``, targets and the star list."""
        c, rng = self.cfg, self.rng
        n, pad = c.size_px, c.pad_px
        psf = self.psfs[rng.integers(len(self.psfs))]
        gain = float(np.exp(rng.uniform(*np.log(c.gain_e_per_adu))))
        rn_e = float(rng.uniform(*c.read_noise_e))
        sky = float(np.exp(rng.uniform(*np.log(c.sky_adu))))
        sigma = float(np.sqrt(sky / gain + (rn_e / gain) ** 2))
        s2 = 25.0
        f5 = 0.5 * (s2 / gain + np.sqrt((s2 / gain) ** 2 + 4 * s2 * sigma**2 * psf.n_eff))
        # stars
        dens = (float(rng.uniform(*c.crowded_per_px2)) if rng.random() < c.frac_crowded
                else float(np.exp(rng.uniform(*np.log(c.density_per_px2)))))
        k = rng.poisson(dens * (n + 2 * pad) ** 2)
        flux = f5 * 10 ** (-0.4 * self._mags(k, *c.mag_rel, c.lf_slope))
        x = rng.uniform(-pad - 0.5, n + pad - 0.5, k)
        y = rng.uniform(-pad - 0.5, n + pad - 0.5, k)
        if rng.random() < c.frac_bright_star:  # a bright star: its core a positive, halo/spikes negatives
            bx, by = rng.uniform(-c.bright_reach_px, n + c.bright_reach_px, 2)
            bflux = f5 * 10 ** (-0.4 * rng.uniform(*c.bright_mag_rel))
        else:
            bx = by = bflux = None
        img = render_stars((n, n), x, y, flux, psf.bank, sigma)
        if bflux is not None:
            ibx, iby = int(np.floor(bx + 0.5)), int(np.floor(by + 0.5))
            _add_stamp(img, psf.bright, ibx, iby, bflux)
            x, y, flux = np.r_[x, ibx], np.r_[y, iby], np.r_[flux, bflux]
        # galaxies (negatives)
        if rng.random() < c.frac_galaxies:
            ng = rng.poisson(float(np.exp(rng.uniform(*np.log(c.galaxies_per_px2)))) * (n + 2 * pad) ** 2)
            gflux = f5 * 10 ** (-0.4 * self._mags(ng, *c.galaxy_mag_rel, c.galaxy_lf_slope))
            for gf in gflux:
                gx, gy = rng.integers(-pad, n + pad, 2)
                _add_stamp(img, psf.galaxies[rng.integers(len(psf.galaxies))], int(gx), int(gy), float(gf))
        # nebulosity: smooth structure a background estimate leaves behind
        if rng.random() < c.frac_nebula:
            neb = np.exp(float(rng.uniform(0.3, 1.2)) * _powerlaw_field(rng, n, (4.0, 40.0)))  # emission > 0
            neb = (neb - neb.mean()) / max(neb.std(), 1e-12)
            img += neb * float(np.exp(rng.uniform(*np.log(c.nebula_sigma)))) * sigma
        # noise: Poisson + read; correlated or grainy in some tiles
        expect = np.clip(img + sky, 0, None)
        noise = (rng.poisson(expect * gain) / gain - expect) + rng.normal(0, rn_e / gain, img.shape)
        if rng.random() < c.frac_correlated:
            sm = gaussian_filter(noise, float(rng.uniform(*c.correlation_px)), mode="wrap")
            noise = sm * (noise.std() / max(sm.std(), 1e-12))
        noise_sigma = sigma
        if rng.random() < c.frac_grain:
            g = rng.gamma(float(rng.uniform(0.5, 2.0)), size=img.shape)
            g = gaussian_filter(g, float(rng.uniform(*c.grain_scale_px)), mode="wrap")
            g = (g - g.mean()) / max(g.std(), 1e-12)
            gs = float(rng.uniform(*c.grain_sigma)) * sigma
            noise = noise + gs * g
            noise_sigma = float(np.hypot(sigma, gs))
        img = img + sky + noise
        bad = np.zeros((n, n), bool)
        sat = float(rng.uniform(*c.full_well_e)) / gain
        over = img >= sat
        if over.any():  # bleed: the saturated charge spills along the columns
            cols = np.flatnonzero(over.any(axis=0))
            for col in cols:
                rows = np.flatnonzero(over[:, col])
                extra = int(min(n, (img[rows, col] - sat).sum() / sat))
                lo, hi = max(0, rows.min() - extra // 2), min(n, rows.max() + extra // 2 + 1)
                img[lo:hi, col] = np.maximum(img[lo:hi, col], sat)
                if rng.random() < c.frac_bleed_masked:
                    bad[lo:hi, col] = True
            bad |= img >= sat
        for _ in range(rng.poisson(c.hot_pixels_per_tile)):
            hx, hy = rng.integers(0, n, 2)
            img[hy, hx] += float(np.exp(rng.uniform(*np.log(c.hot_pixel_sigma)))) * sigma
        for _ in range(rng.poisson(c.cosmics_per_tile)):
            cy, cx = cosmic_track(rng, n)
            img[cy, cx] += float(rng.uniform(200, 3000)) / gain
            if rng.random() >= c.frac_cosmics_unmasked:
                bad[cy, cx] = True
        if rng.random() < c.frac_bad_column:
            bad[rng.integers(n):, rng.integers(n)] = True
        return finish_tile(img, bad, x, y, flux, sky, noise_sigma, sigma, gain, psf.n_eff, psf.fwhm_px, c, rng)

    def batch(self, size: int) -> dict:
        """``size`` tiles stacked (:func:`training.detector_data.stack_tiles`)."""
        return stack_tiles([self.tile() for _ in range(size)])
