"""Per-block extraction: pixels of a block of tiles -> one catalogue of owned detections.

A block is a set of tiles whose windows (core + halo) are read together as one window.
The background is modelled once on the window, sep searches the window once (the tiles of
a block share their halos, so searching each tile's window would repeat work), each
detection goes to the tile whose core holds it (kept up to the margin of
:mod:`survey_proc.tiling` outside the core, for the de-duplication across blocks), and
the block measures them together: windowed centroids, aperture photometry, mask flags
and the aperture correction.

:func:`extract_block_pnet` fills the same table with the learned detector. PNet is fully
convolutional, so the block window is one batch of its tiles that share their halos (the
same pixels the tiles would be cut into, without computing the overlaps twice); positions
and total fluxes come from its heads, the aperture columns are measured at its positions.

Nothing here knows about Dask or the store: the caller passes pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import sep

from survey_proc import vocab as F
from survey_proc.config import RunConfig
from survey_proc.detect import classical
from survey_proc.photometry import aperture
from survey_proc.photometry.measure import Window, bpnn_photometry
from survey_proc.photometry.psffit import refine_positions
from survey_proc.tiling import Tile

COLUMNS = ("tile", "depth_px", "x", "y", "x_iso", "y_iso", "flux_aper", "flux_aper_err", "flux", "flux_err",
           "snr", "bkg_adu", "npix", "peak_adu", "flags")


@dataclass
class BlockInfo:
    """What a block measured about its pixels (kept in the epoch record)."""

    n_detections: int
    fwhm_px: float
    n_fwhm_stars: int
    apcorr: float
    n_apcorr_stars: int
    bkg_adu: float  # median background level (ADU)
    rms_adu: float  # median background noise (ADU)
    bad_px: int
    fallback: str | None
    n_px: int = 0  # pixels in the window
    nonfinite_px: int = 0  # NaN or inf
    saturated_px: int = 0  # finite and at or above the saturation level
    usable_ptp_adu: float = float("nan")  # max - min of the usable pixels (0: a constant image; NaN: none usable)

    def to_dict(self) -> dict:
        return asdict(self)


def pixel_census(image: np.ndarray, bad: np.ndarray, saturation_adu: float) -> dict[str, int | float]:
    """Counts of a window's unusable pixels and the range of its usable ones (BlockInfo fields)."""
    usable = image[~bad]
    finite = np.isfinite(image)
    saturated = int(np.count_nonzero(image[finite] >= saturation_adu)) if np.isfinite(saturation_adu) else 0
    return {"n_px": int(image.size), "nonfinite_px": int(image.size - np.count_nonzero(finite)),
            "saturated_px": saturated, "usable_ptp_adu": float(np.ptp(usable)) if usable.size else float("nan")}


def epoch_pixel_problem(infos: list[BlockInfo], saturation_adu: float) -> str | None:
    """Why an epoch's pixels cannot be measured at all, or None when some can.

    Two cases: no usable pixel (every one NaN/inf, flagged in the mask or saturated), and
    usable pixels that all hold one value (an empty or failed readout: no sky, no noise).
    Partly bad epochs pass: their bad pixels are masked and their detections flagged.
    """
    n = sum(i.n_px for i in infos)
    if n == 0:
        return None  # blocks measured before the census existed
    ptp = np.array([i.usable_ptp_adu for i in infos], float)
    if not np.isfinite(ptp).any():
        pct = {k: 100.0 * sum(getattr(i, k) for i in infos) / n for k in ("nonfinite_px", "saturated_px")}
        masked = 100.0 - pct["nonfinite_px"] - pct["saturated_px"]
        return (f"no usable pixels ({pct['nonfinite_px']:.0f} % NaN/inf, {pct['saturated_px']:.0f} % at or above "
                f"the saturation level {saturation_adu:g} ADU, {masked:.0f} % flagged bad in the mask)")
    if np.nanmax(ptp) == 0.0:
        return "every usable pixel has the same value (an empty or failed readout: no sky, no noise)"
    return None


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: np.zeros(0, np.int32 if c in ("tile", "npix", "flags") else float) for c in COLUMNS})


def _owner(x: np.ndarray, y: np.ndarray, tiles: list[Tile], margin_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For image-frame positions: owning tile index, depth in its core (px), and kept-mask."""
    if len(x) == 0:
        return np.zeros(0, np.int32), np.zeros(0), np.zeros(0, bool)
    depth = np.stack([t.depth_px(x, y) for t in tiles])
    best = np.argmax(depth, axis=0)
    d = depth[best, np.arange(len(x))]
    return np.array([t.index for t in tiles], np.int32)[best], d, d >= -margin_px


def extract_block(image: np.ndarray, mask: np.ndarray | None, origin_yx: tuple[int, int], tiles: list[Tile],
                  gain_e_per_adu: float, saturation_adu: float, cfg: RunConfig, bpnn=None, *, seed: int = 0,
                  return_window: bool = False):
    """Detect and measure the sources owned by ``tiles`` in a window of one epoch.

    Parameters
    ----------
    image, mask
        The window's pixels (ADU, sky not subtracted) and mask bits (or None).
    origin_yx
        Image-frame pixel index of the window's first row and column.
    tiles
        The block's tiles (image-frame indices); their halo windows lie inside the window.
    gain_e_per_adu, saturation_adu
        Detector gain (e-/ADU) and saturation level (ADU).
    cfg
        Run configuration (``detection``, ``photometry`` and ``bpnn`` sections).
    bpnn, seed
        A :class:`survey_proc.photometry.bpnn.LoadedBPNN` to measure magnitudes with, and
        the MC seed (:func:`survey_proc.photometry.measure.block_seed`); None keeps the
        aperture photometry.
    return_window
        Also return the :class:`~survey_proc.photometry.measure.Window` and the indices of
        the kept detections in it (for training the BPNN on exactly the pipeline's inputs).

    Returns
    -------
    catalogue, info
        One row per owned detection, positions in the image frame (0-based pixel centres),
        fluxes in ADU; and a :class:`BlockInfo`. With a BPNN the catalogue also has the
        magnitude columns of :func:`~survey_proc.photometry.measure.bpnn_photometry`, and
        its ``flux``/``flux_err`` (the aperture ones stay in ``flux_aper``).
    """
    oy, ox = origin_yx
    bad = classical.bad_pixels(image, mask, saturation_adu)
    bkg = classical.estimate_background(image, bad, cfg.detection)
    data = np.ascontiguousarray(np.where(bad, 0.0, image - bkg.back), dtype=np.float32)
    # One noise level per window: sep's per-mesh rms map counts star light as noise in crowded
    # meshes (it halves the detections of a dense field); the sky + read noise is what matters.
    noise = bkg.global_rms

    # sep runs once on the whole window: the tiles of a block share their halos, so searching
    # each tile window separately would only repeat work (27 % more pixels at 512 + 2 x 32).
    # Ownership is then decided per tile, exactly as for a per-tile detector.
    objs, fallback = classical.extract(data, bad, noise, cfg.detection)
    x = objs["x"] + ox
    y = objs["y"] + oy
    owner, _, keep = _owner(np.asarray(x), np.asarray(y), tiles, cfg.detection.own_margin_px)
    o = objs[keep]
    fl = np.zeros(len(o), np.int32)
    fl[(o["flag"] & sep.OBJ_MERGED) != 0] |= F.BLENDED
    fl[(o["flag"] & sep.OBJ_TRUNC) != 0] |= F.EDGE
    if fallback:
        fl |= F.EXTRACT_FALLBACK
    det = pd.DataFrame({"tile": owner[keep], "x_iso": x[keep], "y_iso": y[keep], "flux_iso": o["flux"],
                        "npix": o["npix"].astype(np.int32), "peak_adu": o["peak"].astype(float), "flags": fl})
    fallbacks = [fallback] if fallback else []
    info_common = dict(bkg_adu=float(np.median(bkg.back)), rms_adu=bkg.global_rms, bad_px=int(bad.sum()),
                       fallback=",".join(sorted(set(fallbacks))) or None, **pixel_census(image, bad, saturation_adu))
    if len(det) == 0:
        res = (_empty(), BlockInfo(0, cfg.photometry.fwhm_default_px, 0, 1.0, 0, **info_common))
        return (*res, None, np.zeros(0, np.int64)) if return_window else res

    xw = det["x_iso"].to_numpy() - ox
    yw = det["y_iso"].to_numpy() - oy
    flags = det["flags"].to_numpy().copy()
    # a rough S/N of the isophotal flux selects the bright stars for FWHM and aperture correction
    iso_var = det["npix"].to_numpy() * bkg.global_rms**2 + np.clip(det["flux_iso"].to_numpy(), 0, None) / gain_e_per_adu
    snr_iso = det["flux_iso"].to_numpy() / np.sqrt(iso_var)
    pcfg = cfg.photometry
    clean = (flags & F.EDGE) == 0  # (at 1.5 sigma most bright stars touch a neighbour: BLENDED is normal)
    fwhm, n_fwhm = aperture.estimate_fwhm(data, bad, xw, yw, snr_iso, clean, pcfg)

    xc, yc, failed = aperture.windowed_centroids(data, bad, xw, yw, fwhm, pcfg.winpos_subpix)
    flags[failed] |= F.CENTROID
    r_ap = pcfg.aperture_fwhm * fwhm
    f_ap, f_ap_err, trunc = aperture.aperture_flux(data, noise, bad, xc, yc, r_ap, gain_e_per_adu)
    flags[trunc] |= F.EDGE
    flags |= aperture.mask_bits_in_aperture(mask, bad, xc, yc, r_ap)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(f_ap_err > 0, f_ap / f_ap_err, 0.0)
    ok = (flags & (F.PHOTOMETRY_BAD | F.CENTROID)) == 0
    apcorr, n_ap = aperture.aperture_correction(data, bad, xc, yc, f_ap, snr, ok, fwhm, pcfg)
    flags[f_ap <= 0] |= F.NONPOSITIVE

    x_img, y_img = xc + ox, yc + oy
    tile_of = {t.index: t for t in tiles}
    depth = np.empty(len(det))
    for idx, t in tile_of.items():
        sel = det["tile"].to_numpy() == idx
        depth[sel] = t.depth_px(x_img[sel], y_img[sel])
    iy = np.clip(np.round(yc).astype(int), 0, image.shape[0] - 1)
    ix = np.clip(np.round(xc).astype(int), 0, image.shape[1] - 1)
    out = pd.DataFrame({
        "tile": det["tile"].to_numpy(), "depth_px": depth, "x": x_img, "y": y_img,
        "x_iso": det["x_iso"].to_numpy(), "y_iso": det["y_iso"].to_numpy(),
        "flux_aper": f_ap, "flux_aper_err": f_ap_err, "flux": f_ap * apcorr, "flux_err": f_ap_err * apcorr,
        "snr": snr, "bkg_adu": bkg.back[iy, ix].astype(float), "npix": det["npix"].to_numpy(),
        "peak_adu": det["peak_adu"].to_numpy(), "flags": flags.astype(np.int32),
    })
    info = BlockInfo(len(out), fwhm, n_fwhm, apcorr, n_ap, **info_common)
    if bpnn is None and not return_window:
        return out, info
    # the BPNN's neighbours are every detection of the window (halo ones at sep's positions),
    # with fluxes from one linear simultaneous PSF fit at fixed positions
    targets = np.flatnonzero(keep)
    x_all, y_all = np.asarray(objs["x"], float).copy(), np.asarray(objs["y"], float).copy()
    x_all[targets], y_all[targets] = xc, yc
    fit = refine_positions(data, bad, noise, gain_e_per_adu, x_all, y_all, np.asarray(objs["flux"], float), fwhm,
                           n_iter=0, beta=cfg.bpnn.psf_beta)
    win = Window(data, bad, bkg.back, noise, gain_e_per_adu, fwhm, x_all, y_all, fit.flux)
    if bpnn is not None:
        out = _with_bpnn(out, win, targets, bpnn, cfg, seed)
    return (out, info, win, targets) if return_window else (out, info)


def extract_block_pnet(image: np.ndarray, mask: np.ndarray | None, origin_yx: tuple[int, int], tiles: list[Tile],
                       gain_e_per_adu: float, saturation_adu: float, cfg: RunConfig, detector, bpnn=None, *,
                       seed: int = 0, return_window: bool = False):
    """:func:`extract_block` with PNet: detections, positions and total fluxes from the network.

    Parameters are those of :func:`extract_block` plus ``detector``, a
    :class:`survey_proc.detect.pnet.LoadedDetector`. With ``bpnn`` the magnitude columns
    come from the BPNN on stamps at the refined positions (the neighbours at their PSF-fit
    fluxes), and ``flux``/``flux_err`` follow them; the PSF fit's flux is ``flux_fit`` (this
    table only: the sources schema does not carry it).

    Columns
    -------
    ``x, y`` are PNet's (peak + offset head), refined for detections with S/N >=
    ``pnet.refine_snr_min`` by a simultaneous PSF fit of the whole window
    (:mod:`survey_proc.photometry.psffit`); ``x_iso, y_iso`` keep PNet's own position (this
    table only: the sources schema does not carry them);
    ``flux`` is the total flux (ADU) of that PSF fit where it ran and converged, else the
    flux head's (the head is good to ~0.1 dex; the fit to near the Cramér-Rao bound);
    detections whose fitted S/N is below ``pnet.min_fit_snr`` are dropped;
    ``flux_err`` is the PSF-fit noise estimate ``sqrt(flux / gain + noise^2 * n_eff)`` with
    ``n_eff = pnet.flux_neff_fwhm2 * FWHM^2`` (a Moffat(3) PSF's noise-equivalent area),
    until the BPNN gives learned uncertainties; ``flux_aper(_err)`` is a 1-FWHM aperture at
    PNet's position (diagnostic); ``npix`` is 0;
    ``confidence`` is the heatmap peak. The aperture correction is 1: the fluxes are total.
    """
    from survey_proc.detect import pnet

    oy, ox = origin_yx
    bad = classical.bad_pixels(image, mask, saturation_adu)
    bkg = classical.estimate_background(image, bad, cfg.detection)
    noise = bkg.global_rms
    norm = pnet.normalise(image, bad, bkg.back, noise)
    threshold = cfg.pnet.threshold or None
    d = pnet.predict(detector, norm, threshold=threshold, noise_adu=noise)[0]
    info_common = dict(bkg_adu=float(np.median(bkg.back)), rms_adu=noise, bad_px=int(bad.sum()), fallback=None,
                       **pixel_census(image, bad, saturation_adu))
    empty = (_empty().assign(confidence=np.zeros(0, np.float32)),
             BlockInfo(0, cfg.photometry.fwhm_default_px, 0, 1.0, 0, **info_common))
    if return_window:
        empty = (*empty, None, np.zeros(0, np.int64))
    if len(d) == 0:
        return empty
    data = np.ascontiguousarray(np.where(bad, 0.0, image - bkg.back), dtype=np.float32)
    pcfg = cfg.photometry
    flux = d.flux
    snr0 = flux / np.sqrt(np.clip(flux, 0, None) / gain_e_per_adu + noise**2 * 4 * pcfg.fwhm_default_px**2)
    fwhm, n_fwhm = aperture.estimate_fwhm(data, bad, d.x, d.y, snr0, np.ones(len(d), bool), pcfg)
    n_eff = cfg.pnet.flux_neff_fwhm2 * fwhm**2
    flux_err = np.sqrt(np.clip(flux, 0, None) / gain_e_per_adu + noise**2 * n_eff)
    snr = flux / flux_err
    xw, yw = d.x.copy(), d.y.copy()
    if cfg.pnet.refine:
        # every detection of the window (halo ones too) is a neighbour to subtract
        fit = snr >= cfg.pnet.refine_snr_min
        r = refine_positions(data, bad, noise, gain_e_per_adu, d.x, d.y, flux, fwhm, fit=fit, beta=cfg.pnet.psf_beta)
        xw, yw = r.x, r.y
        # the fit's flux replaces the head's where the fit ran and converged (see docs/pnet.md)
        use = fit & r.ok & (r.flux > 0)
        flux = np.where(use, r.flux, flux)
        flux_err = np.sqrt(np.clip(flux, 0, None) / gain_e_per_adu + noise**2 * n_eff)
        snr = flux / flux_err
        # a second opinion: a peak the PSF fit (its neighbours subtracted) finds no light in is an
        # artefact of a brighter star's wings, not a star
        real = ~(fit & r.ok & (snr < cfg.pnet.min_fit_snr))
    else:
        real = np.ones(len(d), bool)
    x, y = xw + ox, yw + oy
    tile_index, depth, keep = _owner(x, y, tiles, cfg.detection.own_margin_px)
    keep &= real
    if not keep.any():
        return empty
    win = Window(data, bad, bkg.back, noise, gain_e_per_adu, fwhm, xw.copy(), yw.copy(), flux.copy())
    targets = np.flatnonzero(keep)
    xw, yw, flux, flux_err, snr = xw[keep], yw[keep], flux[keep], flux_err[keep], snr[keep]
    flags = np.zeros(len(xw), np.int32)
    r_ap = pcfg.aperture_fwhm * fwhm
    f_ap, f_ap_err, trunc = aperture.aperture_flux(data, noise, bad, xw, yw, r_ap, gain_e_per_adu)
    flags[trunc] |= F.EDGE
    flags |= aperture.mask_bits_in_aperture(mask, bad, xw, yw, r_ap)
    flags[flux <= 0] |= F.NONPOSITIVE
    iy = np.clip(np.round(yw).astype(int), 0, image.shape[0] - 1)
    ix = np.clip(np.round(xw).astype(int), 0, image.shape[1] - 1)
    out = pd.DataFrame({
        "tile": tile_index[keep], "depth_px": depth[keep], "x": x[keep], "y": y[keep],
        "x_iso": d.x[keep] + ox, "y_iso": d.y[keep] + oy,
        "flux_aper": f_ap, "flux_aper_err": f_ap_err, "flux": flux, "flux_err": flux_err,
        "snr": snr, "bkg_adu": bkg.back[iy, ix].astype(float), "npix": np.zeros(len(xw), np.int32),
        "peak_adu": image[iy, ix].astype(float), "flags": flags,
        "confidence": d.confidence[keep].astype(np.float32),
    })
    info = BlockInfo(len(out), fwhm, n_fwhm, 1.0, len(out), **info_common)
    if bpnn is not None:
        out = _with_bpnn(out, win, targets, bpnn, cfg, seed)
    return (out, info, win, targets) if return_window else (out, info)


def _with_bpnn(out: pd.DataFrame, win: Window, targets: np.ndarray, bpnn, cfg: RunConfig, seed: int) -> pd.DataFrame:
    """The block table with the BPNN's magnitude columns (``flux``/``flux_err`` follow them)."""
    cols = bpnn_photometry(win, targets, bpnn, beta=cfg.bpnn.psf_beta, n_samples=cfg.bpnn.n_samples or None,
                           seed=seed)
    out = out.copy()
    for k in ("mag_inst", "mag_inst_err", "mag_err_aleatoric", "mag_err_epistemic", "flux", "flux_err", "flux_fit"):
        out[k] = cols[k]
    flags = out["flags"].to_numpy().copy()
    flags[cols["stamp_masked"]] |= F.STAMP_FILLED
    # NONPOSITIVE describes the measurement in the table: the BPNN's magnitudes are always finite
    flags &= ~np.int32(F.NONPOSITIVE)
    out["flags"] = flags.astype(np.int32)
    return out
