"""A library of GalSim-drawn stamps for the detector's realistic training scenes.

    python -m training.detector_assets [--out training/assets/detector_assets.npz] [--seed 11] [--n-psf 96]

GalSim draws everything that needs it once, here, so that the scene generator
(:mod:`training.detector_scenes`) is numpy-only and runs where GalSim is not installed (a
GPU training node; the library travels as one compressed file of ~20-30 MB). Per PSF:

- the **effective PSF** (pixel-integrated, oversampled ``K = 5``), from which
  :func:`survey_proc.simulate.stamps.bank_from_epsf` cuts the phase banks the simulator's
  renderer uses. FWHM log-uniform in ``fwhm_px`` (0.8-10 px: undersampled 2MASS-like to
  photographic plates); profile Moffat (beta 2-4.5), Kolmogorov, or a core + wings
  mixture (a Moffat core plus 10-30 % of the light in a Moffat of beta 1.5-2.5 and 2-4
  times the FWHM, the shape of real PSFs); ellipticity rms 0.05;
- **galaxies** convolved with that PSF, pixelised, unit flux within the stamp (the truth of
  what is drawn): exponential, de Vaucouleurs, Sérsic (n 0.5-4.5) and bulge + disk profiles
  (:func:`survey_proc.simulate.galaxies.galaxy_profile`), half-light radius log-uniform in
  0.35-4 FWHM (and at least 0.7 px), |e| Rayleigh (sigma 0.25, < 0.8), a random sub-pixel
  centre; in a 63 px stamp;
- one **bright-star profile**: the core PSF with a halo (1-10 % of the light in a Moffat
  of beta 1.5, 6-20 FWHM) and, for 60 % of the PSFs, diffraction spikes (GalSim's
  OpticalPSF with 3, 4 or 6 struts at a random angle, lambda/D 0.5-2 px)
  (:func:`survey_proc.simulate.psf.bright_star_profile`), centred on a pixel, in a 97 px
  stamp, unit flux within it.

Arrays are stored as float16 where they are stamps (relative precision 1e-3, far below
the training noise) and every PSF's parameters as a table (``psf_*``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import galsim
import numpy as np
from scipy.ndimage import uniform_filter

from survey_proc.simulate.galaxies import galaxy_profile
from survey_proc.simulate.psf import bright_star_profile

DEFAULT_ASSETS = Path(__file__).parent / "assets" / "detector_assets.npz"
GALAXY_STAMP_PX = 63
BRIGHT_STAMP_PX = 97
OVERSAMPLE = 5
GALAXY_PROFILES = ("exponential", "devaucouleurs", "sersic", "bulge_disk")
#: Looser FFT accuracy for the galaxy stamps: some profile/PSF pairs otherwise ask GalSim for
#: FFTs of >8k^2 (minutes and GB per stamp); the aliasing this allows is far below the noise.
FAST = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=3e-3, maximum_fft_size=4096)


@dataclass(frozen=True)
class AssetConfig:
    """Ranges of the drawn PSFs and galaxies (units in the names)."""

    n_psf: int = 96
    fwhm_px: tuple[float, float] = (0.8, 10.0)
    frac_kolmogorov: float = 0.25
    frac_wings: float = 0.3
    moffat_beta: tuple[float, float] = (2.0, 4.5)
    ellipticity_rms: float = 0.05
    galaxies_per_psf: int = 24
    galaxy_hlr_fwhm: tuple[float, float] = (0.35, 4.0)
    galaxy_hlr_min_px: float = 0.7
    galaxy_e_sigma: float = 0.25
    halo_fraction: tuple[float, float] = (0.01, 0.10)
    halo_fwhm_factor: tuple[float, float] = (6.0, 20.0)
    frac_spikes: float = 0.6

    def to_dict(self) -> dict:
        return asdict(self)


def psf_object(rng: np.random.Generator, cfg: AssetConfig) -> tuple[galsim.GSObject, dict]:
    """One random PSF: the GalSim object and its parameters."""
    fwhm = float(np.exp(rng.uniform(np.log(cfg.fwhm_px[0]), np.log(cfg.fwhm_px[1]))))
    g1, g2 = (float(v) for v in np.clip(rng.normal(0, cfg.ellipticity_rms, 2), -0.3, 0.3))
    u = rng.random()
    beta = float(rng.uniform(*cfg.moffat_beta))
    if u < cfg.frac_kolmogorov:
        kind, obj = "kolmogorov", galsim.Kolmogorov(fwhm=fwhm)
    elif u < cfg.frac_kolmogorov + cfg.frac_wings:
        w = float(rng.uniform(0.1, 0.3))
        wide = galsim.Moffat(beta=float(rng.uniform(1.5, 2.5)), fwhm=float(rng.uniform(2, 4)) * fwhm)  # no trunc:
        # a hard edge would make GalSim convolve the halo in real space (minutes per stamp)
        kind, obj = "core_wings", galsim.Add([galsim.Moffat(beta=beta, fwhm=fwhm).withFlux(1 - w), wide.withFlux(w)])
    else:
        kind, obj = "moffat", galsim.Moffat(beta=beta, fwhm=fwhm)
    obj = obj.shear(g1=g1, g2=g2)
    return obj, {"kind": kind, "fwhm_px": fwhm, "beta": beta, "g1": g1, "g2": g2}


def stamp_radii(fwhm_px: float) -> tuple[int, ...]:
    """The stamp radius ladder (px) of a PSF of this FWHM: R0 = max(7, 2 FWHM), up to 48 px."""
    base = max(7, int(np.ceil(2 * fwhm_px)))
    return tuple(r for r in (base, 2 * base, 4 * base) if r <= 48) or (base,)


def effective_psf_of(obj: galsim.GSObject, radius_px: int, oversample: int = OVERSAMPLE) -> np.ndarray:
    """Pixel-integrated PSF of ``obj`` every ``1/oversample`` px (see ``simulate/psf.py``)."""
    k = int(oversample)
    m = 2 * k * (radius_px + 1) + 1
    img = obj.drawImage(nx=m, ny=m, scale=1.0 / k, method="no_pixel", dtype=np.float64)
    return uniform_filter(img.array * (k * k), size=k, mode="constant")


def draw_galaxy(rng: np.random.Generator, psf: galsim.GSObject, fwhm_px: float, cfg: AssetConfig
                ) -> tuple[np.ndarray, dict]:
    """One PSF-convolved, pixelised galaxy of unit flux in its stamp, and its parameters."""
    prof = GALAXY_PROFILES[rng.integers(len(GALAXY_PROFILES))]
    hlr = max(cfg.galaxy_hlr_min_px,
              fwhm_px * float(np.exp(rng.uniform(*np.log(cfg.galaxy_hlr_fwhm)))))
    hlr = min(hlr, 12.0)
    e = min(0.8, float(rng.rayleigh(cfg.galaxy_e_sigma)))
    phi = rng.uniform(0, np.pi)
    n = float(rng.uniform(0.5, 4.5))
    bt = float(rng.uniform(0.1, 0.7))
    obj = galaxy_profile(prof, hlr, e * np.cos(2 * phi), e * np.sin(2 * phi), n, bt)
    off = rng.uniform(-0.5, 0.5, 2)
    img = galsim.Convolve(obj, psf, gsparams=FAST).drawImage(nx=GALAXY_STAMP_PX, ny=GALAXY_STAMP_PX, scale=1.0,
                                              offset=(float(off[0]), float(off[1])), dtype=np.float64).array
    img /= img.sum()
    return img, {"profile": prof, "hlr_px": hlr, "e": e, "sersic_n": n, "bulge_fraction": bt}


def draw_bright(rng: np.random.Generator, psf: galsim.GSObject, fwhm_px: float, cfg: AssetConfig
                ) -> tuple[np.ndarray, dict]:
    """The bright-star profile (core + halo, maybe spikes) of this PSF, unit flux in its stamp."""
    spikes = bool(rng.random() < cfg.frac_spikes)
    par = {"spikes": spikes, "halo_fraction": float(rng.uniform(*cfg.halo_fraction)),
           "halo_fwhm_factor": float(rng.uniform(*cfg.halo_fwhm_factor)),
           "nstruts": int(rng.choice([3, 4, 6])), "strut_angle_deg": float(rng.uniform(0, 90)),
           "lam_over_diam_px": float(rng.uniform(0.5, 2.0))}
    r = BRIGHT_STAMP_PX // 2
    obj = bright_star_profile(psf, fwhm_px, spikes=spikes, halo_fraction=par["halo_fraction"],
                              halo_fwhm_factor=par["halo_fwhm_factor"], radius_px=r,
                              lam_over_diam_px=par["lam_over_diam_px"], nstruts=par["nstruts"],
                              strut_angle_deg=par["strut_angle_deg"])
    img = obj.drawImage(nx=BRIGHT_STAMP_PX, ny=BRIGHT_STAMP_PX, scale=1.0, dtype=np.float64).array
    img = np.clip(img, 0, None)
    img /= img.sum()
    return img, par


def build_assets(cfg: AssetConfig, seed: int) -> dict[str, np.ndarray]:
    """Draw the library: per PSF the effective PSF, its galaxies and its bright-star profile."""
    rng = np.random.default_rng(seed)
    epsfs, gals, brights, rows = [], [], [], []
    for _ in range(cfg.n_psf):
        psf, par = psf_object(rng, cfg)
        radii = stamp_radii(par["fwhm_px"])
        epsfs.append(effective_psf_of(psf, radii[-1] + 1).astype(np.float16))
        g = [draw_galaxy(rng, psf, par["fwhm_px"], cfg)[0] for _ in range(cfg.galaxies_per_psf)]
        gals.append(np.stack(g).astype(np.float16))
        b, bpar = draw_bright(rng, psf, par["fwhm_px"], cfg)
        brights.append(b.astype(np.float16))
        rows.append({**par, **{f"bright_{k}": v for k, v in bpar.items()}, "radii_px": radii})
        print(f"psf {len(rows)}/{cfg.n_psf} {par['kind']} fwhm {par['fwhm_px']:.2f} px", flush=True)
    out: dict[str, np.ndarray] = {f"epsf_{i}": e for i, e in enumerate(epsfs)}
    out["galaxies"] = np.stack(gals)  # (n_psf, n_gal, 63, 63)
    out["bright"] = np.stack(brights)  # (n_psf, 97, 97)
    out["psf_fwhm_px"] = np.array([r["fwhm_px"] for r in rows])
    out["psf_kind"] = np.array([r["kind"] for r in rows])
    out["psf_radii_px"] = np.array([list(r["radii_px"]) + [0] * (3 - len(r["radii_px"])) for r in rows])
    out["bright_spikes"] = np.array([r["bright_spikes"] for r in rows])
    out["oversample"] = np.array(OVERSAMPLE)
    out["config"] = np.array(str(cfg.to_dict()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_ASSETS)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--n-psf", type=int, default=AssetConfig.n_psf)
    p.add_argument("--galaxies-per-psf", type=int, default=AssetConfig.galaxies_per_psf)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    lib = build_assets(AssetConfig(n_psf=a.n_psf, galaxies_per_psf=a.galaxies_per_psf), a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **lib)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
