"""Training tiles for PNet, drawn on the fly from the survey simulator's renderer.

Each tile has its own randomised conditions, so the detector sees every survey it may be
run on, not one scenario:

- PSF: Moffat (beta 2.5-4.5) or Kolmogorov, FWHM log-uniform in ``fwhm_px`` (1.3-5 px:
  the dense CSST-like and the sparse ground-based presets and beyond), small ellipticity;
  drawn with the simulator's effective-PSF banks (:func:`survey_proc.simulate.psf.build_bank`);
- sky (15-500 ADU/px), gain (1-5 e-/ADU), read noise (3-8 e-), full well (60-150 ke-);
- the zero point is implicit: star fluxes are drawn relative to the tile's own 5-sigma
  limit, ``m - m_lim`` from -10 to +1.5 mag with the simulator's luminosity-function slope
  (dN/dm ~ 10^(0.3 m)), at a density of stars brighter than ``m_lim + 1.5`` log-uniform
  in 3e-4 - 0.04 per px^2 for half the tiles and uniform in 0.012-0.04 (crowded) for
  the other half (the dense preset has ~0.025);
- stars outside the tile (within ``pad_px``) shine into it; Poisson + read noise;
  saturated pixels, a few cosmic-ray tracks and sometimes a bad column are masked (set to
  0 after normalisation, exactly as the pipeline does);
- the background is subtracted with a small error (0.1 sigma rms) and the noise scale is
  off by a few per cent, as the pipeline's sep background estimate would be.

Targets (CenterNet): every star whose isolated PSF-fit S/N is at least ``snr_target`` gets
a Gaussian (``sigma_hm_px``) on the heatmap with exactly 1 at its centre pixel, where the
offset ``(x - ix, y - iy)`` and ``log10(flux / noise)`` are stored. Where two stars share a
pixel the brighter one's target wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from survey_proc.simulate.stamps import render_stars


@dataclass(frozen=True)
class TileConfig:
    """Ranges of the randomised conditions (units in the names)."""

    size_px: int = 64
    pad_px: int = 12
    fwhm_px: tuple[float, float] = (1.3, 5.0)
    frac_kolmogorov: float = 0.3
    moffat_beta: tuple[float, float] = (2.5, 4.5)
    ellipticity_rms: float = 0.03
    sky_adu: tuple[float, float] = (15.0, 500.0)
    gain_e_per_adu: tuple[float, float] = (1.0, 5.0)
    read_noise_e: tuple[float, float] = (3.0, 8.0)
    full_well_e: tuple[float, float] = (6e4, 1.5e5)
    density_per_px2: tuple[float, float] = (3e-4, 0.04)  # log-uniform ...
    frac_crowded: float = 0.5  # ... except this fraction of tiles, uniform in crowded_per_px2
    crowded_per_px2: tuple[float, float] = (0.012, 0.04)
    mag_rel: tuple[float, float] = (-10.0, 1.5)  # m - m_lim(5 sigma)
    lf_slope: float = 0.30
    cosmics_per_tile: float = 0.5
    frac_bad_column: float = 0.05
    bkg_error_sigma: float = 0.1
    noise_scale_error: float = 0.03
    snr_target: float = 3.0
    sigma_hm_px: float = 0.8
    n_psf: int = 48  # PSF banks drawn once per generator and reused

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Psf:
    bank: object
    n_eff: float  # 1 / sum p^2 of the centred stamp: noise-equivalent area (px)
    fwhm_px: float


class TileGenerator:
    """Reproducible stream of (normalised image, targets, truth) tiles."""

    def __init__(self, cfg: TileConfig, seed: int):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.psfs = [self._draw_psf() for _ in range(cfg.n_psf)]

    def _draw_psf(self) -> _Psf:
        from survey_proc.simulate.psf import build_bank  # GalSim: imported only where these tiles are drawn

        c, rng = self.cfg, self.rng
        fwhm = float(np.exp(rng.uniform(np.log(c.fwhm_px[0]), np.log(c.fwhm_px[1]))))
        g1, g2 = rng.normal(0, c.ellipticity_rms, 2)
        if rng.random() < c.frac_kolmogorov:
            bank = build_bank("kolmogorov", fwhm, g1=g1, g2=g2, oversample=5, base_radius_px=7, max_factor=4)
        else:
            bank = build_bank("moffat", fwhm, beta=float(rng.uniform(*c.moffat_beta)), g1=g1, g2=g2,
                              oversample=5, base_radius_px=7, max_factor=4)
        centred = bank.banks[1][-bank.t_min, -bank.t_min]
        return _Psf(bank, float(1.0 / np.sum(centred**2)), fwhm)

    def scene(self) -> dict:
        """One raw tile: ``image`` (ADU, sky included), ``bad``, conditions and every star (ADU).

        Draws exactly the random numbers :meth:`tile` draws before normalising, in the same
        order (the detector's training stream does not change).
        """
        c, rng = self.cfg, self.rng
        n = c.size_px
        psf = self.psfs[rng.integers(len(self.psfs))]
        gain = float(np.exp(rng.uniform(*np.log(c.gain_e_per_adu))))
        rn_e = float(rng.uniform(*c.read_noise_e))
        sky = float(np.exp(rng.uniform(*np.log(c.sky_adu))))
        sigma = float(np.sqrt(sky / gain + (rn_e / gain) ** 2))
        # 5-sigma flux: F / sqrt(F / g + sigma^2 n_eff) = 5
        s2 = 25.0
        f5 = 0.5 * (s2 / gain + np.sqrt((s2 / gain) ** 2 + 4 * s2 * sigma**2 * psf.n_eff))
        if rng.random() < c.frac_crowded:
            dens = float(rng.uniform(*c.crowded_per_px2))
        else:
            dens = float(np.exp(rng.uniform(*np.log(c.density_per_px2))))
        area = (n + 2 * c.pad_px) ** 2
        k = rng.poisson(dens * area)
        lo, hi = c.mag_rel
        mrel = luminosity_function(rng, k, lo, hi, c.lf_slope)
        flux = f5 * 10 ** (-0.4 * mrel)
        x = rng.uniform(-c.pad_px - 0.5, n + c.pad_px - 0.5, k)
        y = rng.uniform(-c.pad_px - 0.5, n + c.pad_px - 0.5, k)
        img = render_stars((n, n), x, y, flux, psf.bank, sigma) + sky
        img = rng.poisson(np.clip(img, 0, None) * gain) / gain + rng.normal(0, rn_e / gain, img.shape)
        bad = np.zeros((n, n), bool)
        sat = float(rng.uniform(*c.full_well_e)) / gain
        bad |= img >= sat
        for _ in range(rng.poisson(c.cosmics_per_tile)):
            cy, cx = cosmic_track(rng, n)
            img[cy, cx] += 2000.0 / gain
            bad[cy, cx] = True
        if rng.random() < c.frac_bad_column:
            col = rng.integers(n)
            bad[rng.integers(n):, col] = True
        return {"image": img, "bad": bad, "psf": psf, "gain": gain, "read_noise_e": rn_e, "sky": sky,
                "sigma": sigma, "saturation_adu": sat, "x": x, "y": y, "flux": flux}

    def tile(self) -> dict[str, np.ndarray]:
        """One tile: ``image`` (H, W) float32 normalised, ``bad``, targets and the star list."""
        c, rng = self.cfg, self.rng
        sc = self.scene()
        img, bad, psf, gain, sky, sigma = sc["image"], sc["bad"], sc["psf"], sc["gain"], sc["sky"], sc["sigma"]
        x, y, flux = sc["x"], sc["y"], sc["flux"]
        return finish_tile(img, bad, x, y, flux, sky, sigma, sigma, gain, psf.n_eff, psf.fwhm_px, c, rng)

    def batch(self, size: int) -> dict[str, np.ndarray]:
        """``size`` tiles stacked (:func:`stack_tiles`)."""
        return stack_tiles([self.tile() for _ in range(size)])


def luminosity_function(rng: np.random.Generator, k: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """``k`` magnitudes in [lo, hi] with dN/dm ~ 10^(slope m) (inverse-CDF sampling; one draw of ``k``)."""
    a = slope * np.log(10)
    u = rng.random(k)
    return np.log(np.exp(a * lo) + u * (np.exp(a * hi) - np.exp(a * lo))) / a


def cosmic_track(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows and columns of a straight cosmic-ray track in an n x n tile (length, angle, start drawn)."""
    length = int(1 + rng.exponential(3))
    ang = rng.uniform(0, np.pi)
    x0, y0 = rng.uniform(0, n, 2)
    t = np.arange(2 * length + 1) / 2
    cx = np.clip(np.round(x0 + t * np.cos(ang)).astype(int), 0, n - 1)
    cy = np.clip(np.round(y0 + t * np.sin(ang)).astype(int), 0, n - 1)
    return cy, cx


def finish_tile(img: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray, sky: float,
                noise_sigma: float, sky_sigma: float, gain: float, n_eff: float, fwhm_px: float, c: object,
                rng: np.random.Generator) -> dict:
    """Normalise a raw tile as the pipeline does and attach its CenterNet targets and star list.

    The background is ``sky`` off by ``bkg_error_sigma`` x ``noise_sigma`` and the noise
    scale off by ``noise_scale_error`` (two random draws, in that order); bad pixels are 0.
    Targets are the stars whose isolated PSF-fit S/N against ``sky_sigma`` (ADU per pixel)
    and their own Poisson noise is at least ``c.snr_target``.
    """
    cfg: Any = c
    n = img.shape[0]
    bkg = sky + rng.normal(0, cfg.bkg_error_sigma) * noise_sigma
    scale = noise_sigma * (1 + rng.normal(0, cfg.noise_scale_error))
    norm = ((img - bkg) / scale).astype(np.float32)
    norm[bad] = 0.0
    snr = flux / np.sqrt(flux / gain + sky_sigma**2 * n_eff)
    targets = make_targets(n, x, y, flux / scale, snr, cfg.snr_target, cfg.sigma_hm_px)
    return {"image": norm, "bad": bad, **targets,
            "stars": np.stack([x, y, flux / scale, snr], axis=1).astype(np.float64), "fwhm_px": fwhm_px}


def stack_tiles(tiles: list[dict]) -> dict:
    """Tiles stacked: image (B, 1, H, W), heatmap (B, 1, H, W), offset (B, 2, H, W), flux, pos; star lists."""
    out: dict = {k: np.stack([t[k] for t in tiles])[:, None] for k in ("image", "heatmap", "flux", "pos")}
    out["offset"] = np.stack([t["offset"] for t in tiles])
    out["stars"] = [t["stars"] for t in tiles]
    return out


def make_targets(n: int, x: np.ndarray, y: np.ndarray, flux_norm: np.ndarray, snr: np.ndarray,
                 snr_min: float, sigma_px: float) -> dict[str, np.ndarray]:
    """CenterNet targets of an n x n tile for the stars with ``snr >= snr_min``."""
    heat = np.zeros((n, n), np.float32)
    offset = np.zeros((2, n, n), np.float32)
    lflux = np.zeros((n, n), np.float32)
    pos = np.zeros((n, n), bool)
    ix = np.floor(x + 0.5).astype(int)
    iy = np.floor(y + 0.5).astype(int)
    sel = np.flatnonzero((snr >= snr_min) & (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n))
    sel = sel[np.argsort(flux_norm[sel])]  # faint first: the brighter star of a shared pixel wins
    r = int(np.ceil(3 * sigma_px))
    j = np.arange(-r, r + 1)
    for s in sel:
        py = np.clip(iy[s] + j, 0, n - 1)
        px = np.clip(ix[s] + j, 0, n - 1)
        g = np.exp(-((px[None, :] - x[s]) ** 2 + (py[:, None] - y[s]) ** 2) / (2 * sigma_px**2)).astype(np.float32)
        np.maximum.at(heat, (py[:, None].repeat(len(px), 1), px[None, :].repeat(len(py), 0)), g)
        offset[0, iy[s], ix[s]] = x[s] - ix[s]
        offset[1, iy[s], ix[s]] = y[s] - iy[s]
        lflux[iy[s], ix[s]] = np.log10(max(flux_norm[s], 1e-3))
        pos[iy[s], ix[s]] = True
    heat[pos] = 1.0
    return {"heatmap": heat, "offset": offset, "flux": lflux, "pos": pos}
