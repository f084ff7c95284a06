"""Training stamps for the BPNN, cut at the pipeline's own detections on simulated windows.

Each window is a raw scene of :class:`training.detector_data.TileGenerator` (randomised
PSF, sky, gain, read noise, saturation, density from sparse to crowded, cosmics and bad
columns; see its docstring), ``size_px`` square. The window goes through the pipeline's
extraction exactly as a block would (:func:`survey_proc.catalog.extract.extract_block`
with the shipped PNet for a fraction ``frac_pnet`` of windows, else with sep), with
one tile whose core leaves a ``halo_px`` border; the stamps are cut from the extraction's
:class:`~survey_proc.photometry.measure.Window` for the detections it keeps. So blends,
mis-centring, wrong neighbour fluxes, spurious detections near bright stars and the
background errors are those the network will meet in a run.

The network's PSF-profile inputs (:func:`survey_proc.photometry.stamps.profile_ratios`)
are what a pipeline block (up to 2048^2 px, hundreds of bright stars) measures; a
160^2 training window may have none, so they are measured on a *calibration scene* of
the same PSF, noise and FWHM estimate: 16 isolated stars of S/N 40-1000 at random
sub-pixel positions, fitted at their positions (0.02 px noise) exactly as in a window.

Each kept detection is matched one-to-one to the true stars within
``max(0.5 FWHM, 1 px)``; the target is ``m_true - m_s`` (mag), ``m_true = -2.5 log10 F``
of the matched star. Unmatched detections (spurious) have no truth and are left out.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import asdict, dataclass, field

import numpy as np

from survey_proc.evaluate import match_one_to_one, match_radius_px
from survey_proc.photometry.measure import window_stamps
from survey_proc.photometry.psffit import moffat_alpha, refine_positions, render
from survey_proc.photometry.stamps import _model_radius, profile_ratios
from survey_proc.simulate.render import render_stars
from survey_proc.tiling import Tile
from training.detector_data import TileConfig, TileGenerator


@dataclass(frozen=True)
class StampDataConfig:
    """How windows are drawn and extracted."""

    tile: TileConfig = field(default_factory=lambda: TileConfig(size_px=160, pad_px=16))
    halo_px: int = 24
    frac_pnet: float = 0.7
    binning: int | None = None  # None: the stamps' size rule (override only for out-of-distribution tests)

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_profile(gen: TileGenerator, sc: dict, fwhm_px: float, beta: float) -> np.ndarray:
    """PSF-profile features measured on a scene of bright isolated stars of ``sc``'s PSF and noise."""
    rng, psf, g = gen.rng, sc["psf"], sc["gain"]
    n, k = 128, 4
    cx = 16 + 32 * np.arange(k)
    x = np.repeat(cx, k) + rng.uniform(-0.5, 0.5, k * k)
    y = np.tile(cx, k) + rng.uniform(-0.5, 0.5, k * k)
    snr = np.exp(rng.uniform(np.log(40.0), np.log(1000.0), k * k))
    s2, v = snr**2, sc["sigma"] ** 2 * psf.n_eff
    flux = 0.5 * (s2 / g + np.sqrt((s2 / g) ** 2 + 4 * s2 * v))
    img = render_stars((n, n), x, y, flux, psf.bank, sc["sigma"]) + sc["sky"]
    img = rng.poisson(np.clip(img, 0, None) * g) / g + rng.normal(0, sc["read_noise_e"] / g, img.shape)
    data = img - sc["sky"]
    bad = img >= sc["saturation_adu"]
    xd, yd = x + rng.normal(0, 0.02, k * k), y + rng.normal(0, 0.02, k * k)
    fit = refine_positions(data, bad, sc["sigma"], g, xd, yd, flux, fwhm_px, n_iter=0, beta=beta)
    model = render(data.shape, xd, yd, np.clip(fit.flux, 0, None), moffat_alpha(fwhm_px, beta), beta,
                   _model_radius(fwhm_px, 3.0))
    return profile_ratios(data, bad, model, xd, yd, fit.flux, fwhm_px, sc["sigma"], g, beta=beta)


def window_samples(gen: TileGenerator, cfg: StampDataConfig, detector, use_pnet: bool) -> dict[str, np.ndarray] | None:
    """Stamps, auxiliary inputs and targets of one simulated window (None if nothing matched)."""
    from survey_proc.catalog.extract import extract_block
    from survey_proc.config import RunConfig
    from survey_proc.detect.registry import make_detector

    rc = RunConfig(detector="pnet" if use_pnet else "sep")
    sc = gen.scene()
    n, h = cfg.tile.size_px, cfg.halo_px
    tiles = [Tile(0, h, n - h, h, n - h, 0, n, 0, n)]
    mask = sc["bad"].astype(np.uint8)
    res = extract_block(sc["image"], mask, (0, 0), tiles, sc["gain"], sc["saturation_adu"], rc,
                        make_detector(rc, detector if use_pnet else None), keep_window=True)
    win, targets = res.window, res.targets
    if win is None or len(targets) == 0:
        return None
    profile = calibration_profile(gen, sc, win.fwhm_px, rc.bpnn.psf_beta)
    st = window_stamps(win, targets, beta=rc.bpnn.psf_beta, profile=profile, binning=cfg.binning)
    psf = sc["psf"]
    i_d, i_t = match_one_to_one(win.x[targets], win.y[targets], sc["x"], sc["y"], match_radius_px(psf.fwhm_px))
    if len(i_d) == 0:
        return None
    f = sc["flux"][i_t]
    snr = f / np.sqrt(f / sc["gain"] + sc["sigma"] ** 2 * psf.n_eff)
    return {"pixels": st.pixels[i_d], "aux": st.aux[i_d],
            "target": (-2.5 * np.log10(f) - st.mag_scale[i_d]).astype(np.float32),
            "snr_true": snr.astype(np.float32), "fwhm_px": np.full(len(i_d), psf.fwhm_px, np.float32),
            "pnet": np.full(len(i_d), use_pnet), "flux_true": f, "scale_adu": st.scale_adu[i_d]}


def _worker(args: tuple[int, int, StampDataConfig]) -> dict[str, np.ndarray]:
    import torch

    from survey_proc import model_registry

    seed, n_windows, cfg = args
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    det = model_registry.load("detector", None, device="cpu")
    gen = TileGenerator(cfg.tile, seed)
    rng = np.random.default_rng(seed + 7)
    parts = []
    for _ in range(n_windows):
        s = window_samples(gen, cfg, det, bool(rng.random() < cfg.frac_pnet))
        if s is not None:
            parts.append(s)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def make_dataset(seed: int, n_windows: int, cfg: StampDataConfig = StampDataConfig(), processes: int = 2
                 ) -> dict[str, np.ndarray]:
    """``n_windows`` windows' samples, generated by ``processes`` processes (seeds ``seed + 1000 k``)."""
    per = [n_windows // processes + (k < n_windows % processes) for k in range(processes)]
    jobs = [(seed + 1000 * k, per[k], cfg) for k in range(processes) if per[k] > 0]
    if processes == 1:
        outs = [_worker(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            outs = pool.map(_worker, jobs)
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
