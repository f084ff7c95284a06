"""Per-block extraction: pixels of a block of tiles -> one catalogue of owned detections.

A block is a set of tiles whose windows (core + halo) are read together as one window.
:func:`extract_block` prepares the window once (bad pixels, background model, one noise
level) and hands it to a :class:`~survey_proc.detect.base.Detector` (sep or PNet, from
:mod:`survey_proc.detect.registry`), which searches the window once (the tiles of a
block share their halos, so searching each tile's window would repeat work), keeps each
detection the block owns (the tile whose core holds it, up to the margin of
:mod:`survey_proc.tiling` outside the core, for the de-duplication across blocks) and
positions it. The block then measures every kept detection the same way whatever the
detector: aperture flux and mask flags at the final position, the detector's total flux
(:meth:`~survey_proc.detect.base.Detector.total_flux`), ``NONPOSITIVE``, and with a BPNN
the magnitude columns from stamps of the window (:func:`_with_bpnn`).

Columns
-------
Image-frame positions (0-based pixel centres, px), fluxes in ADU:

- ``tile``, ``depth_px``: the owning tile and the final position's depth in its core;
- ``x, y``: the final position (sep: windowed centroid; PNet: PSF-fit refined);
  ``x_iso, y_iso``: the detector's own position (sep: isophotal; PNet: the network's);
- ``flux_aper(_err)``: a circular aperture of ``photometry.aperture_fwhm`` x FWHM at the
  final position; ``flux(_err)``, ``snr``: the detector's total flux (sep: the aperture
  flux times the block's aperture correction; PNet: the PSF fit's or the flux head's);
- ``bkg_adu``: the photometry's background model at the nearest pixel (the detection's; with
  ``photometry.background = "masked"`` the mesh background estimated again with the
  detections masked, :mod:`survey_proc.photometry.background`); ``npix``, ``peak_adu``: the
  detector's (sep: isophotal area and peak; PNet: 0 and the raw pixel value);
- ``flags``: the detector's, ``EDGE`` and the mask bits of the aperture, and
  ``NONPOSITIVE`` where ``flux <= 0``;
- ``confidence`` for a detector that has one (PNet's heatmap peak).

FWHM
----
Every radius scales with the block's FWHM, which the detector measures on the block's
bright, isolated stars (:func:`~survey_proc.photometry.aperture.estimate_fwhm`). A block
with too few of them (a small cutout, a sparse or shallow frame) takes the epoch's seeing
from its FITS header when the caller gives it (``header_fwhm_px``: the store's
``header_fwhm_px``, read at ingest, :func:`survey_proc.ingest.header_fwhm`), else
``photometry.fwhm_default_px``. The header value simply takes the default's place in the
configuration the block runs with, so the detectors, the aperture, the Moffat aperture
correction and an empty block all use it the same way. :attr:`BlockInfo.fwhm_source` says
which of the three the block used.

Aperture correction
-------------------
sep's total flux is the aperture flux times the block's aperture correction, measured on its
own bright, isolated stars (:func:`~survey_proc.photometry.aperture.aperture_correction`). A
block with too few of them takes the epoch's PSFEx correction when the caller gives it
(``header_apcorr``: the store's, computed at ingest from the exposure's PSFEx model,
``survey-proc ingest --psfex``) and it applies to the block (computed at the block's FWHM
and with its radii: :func:`~survey_proc.photometry.aperture.fallback_apcorr`), else the
Moffat(3) model's, as before. :attr:`BlockInfo.apcorr_source` says which (``measured``,
``psfex <file[CCD] at ...>`` or ``model Moffat(3)``, with why a stored one was not used). A
detector with its own total flux (PNet) has no aperture correction to replace.

Nothing here knows about Dask or the store: the caller passes pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from survey_proc import vocab as F
from survey_proc.config import RunConfig
from survey_proc.detect import classical, domain
from survey_proc.detect.base import Aperture, Detections, Detector, DetectorInput, TotalFlux, nearest_pixel
from survey_proc.detect.registry import make_detector
from survey_proc.photometry import aperture, halo
from survey_proc.photometry.background import masked_background
from survey_proc.photometry.measure import Window, bpnn_photometry
from survey_proc.photometry.neighbours import neighbour_light
from survey_proc.photometry.pairs import with_pair_fluxes
from survey_proc.tiling import Tile

if TYPE_CHECKING:
    from survey_proc.photometry.bpnn import LoadedBPNN

#: :attr:`BlockInfo.fwhm_source` of a block that measured its FWHM on its own stars
FWHM_MEASURED = "measured"
#: :attr:`BlockInfo.fwhm_source` of a block that took ``photometry.fwhm_default_px``
FWHM_DEFAULT = "default photometry.fwhm_default_px"

#: flags of an owned detection that keep it out of the empirical PSF's stars (:func:`_point_sources`); it is
#: still fitted and measured. CENTROID too was measured and rejected (issue 21: the sparse simulation's
#: miscalibration area 0.027 -> 0.049; benchmarks/results/issue21-epsf-galaxies.md)
PSF_STAR_EXCLUDE = F.EXTENDED

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
    domain: str | None = None  # what the domain check did (survey_proc.detect.domain), None when nothing
    fwhm_source: str = ""  # FWHM_MEASURED, "header <keyword ...>" or FWHM_DEFAULT ("": a block from before)
    # aperture.APCORR_MEASURED, "psfex <source>" or aperture.APCORR_MOFFAT[ (why a stored one was not used)]; "": no
    # aperture correction (a detector's own total flux, an empty block, a block from before)
    apcorr_source: str = ""
    # with photometry.psf_model = "epsf": the PSF fit's psf ("epsf"/"moffat"), n_psf_stars, model_error_frac
    # (the profile error in its flux_err) and why_moffat; None without the PSF fit
    psf_fit: dict[str, Any] | None = None
    # with detection.halo_sky: the halos of the saturated stars whose centres the block owns
    # (:meth:`survey_proc.photometry.halo.HaloProfile.to_dict`, image frame); None without the halo sky
    halos: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict:
        """The fields as a dict (what a block task returns to the epoch task)."""
        return asdict(self)


@dataclass
class BlockResult:
    """Everything :func:`extract_block` measured in one block window (always complete).

    Attributes
    ----------
    table
        One row per owned detection: :data:`COLUMNS` (image-frame positions, 0-based pixel
        centres, px; fluxes in ADU), then ``confidence`` for a detector that has one, then
        with a BPNN the magnitude columns of
        :func:`~survey_proc.photometry.measure.bpnn_photometry` (its ``flux``/``flux_err``
        replace the detector's; the aperture flux stays in ``flux_aper``).
    info
        What the block measured about its pixels.
    window
        The :class:`~survey_proc.photometry.measure.Window` (the background-subtracted
        pixels and every detection of the window with its PSF-fit flux) when a BPNN ran or
        ``keep_window`` asked for it and a detection was kept; else None.
    targets
        Index into ``window.x`` of each table row (int64); empty when ``window`` is None.
    """

    table: pd.DataFrame
    info: BlockInfo
    window: Window | None
    targets: np.ndarray


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


def _owner(x: np.ndarray, y: np.ndarray, tiles: list[Tile], margin_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The owning tile of image-frame positions (px) and whether the block keeps them.

    The owner is the tile in whose core each position lies deepest (int32 index); a position
    is kept when it is at most ``margin_px`` outside that core.
    """
    if len(x) == 0:
        return np.zeros(0, np.int32), np.zeros(0, bool)
    depth = np.stack([t.depth_px(x, y) for t in tiles])
    best = np.argmax(depth, axis=0)
    d = depth[best, np.arange(len(x))]
    return np.array([t.index for t in tiles], np.int32)[best], d >= -margin_px


def extract_block(image: np.ndarray, mask: np.ndarray | None, origin_yx: tuple[int, int], tiles: list[Tile],
                  gain_e_per_adu: float, saturation_adu: float, cfg: RunConfig, detector: Detector,
                  bpnn: LoadedBPNN | None = None, *, seed: int = 0, keep_window: bool = False,
                  header_fwhm_px: float | None = None, header_fwhm_source: str = "",
                  header_apcorr: float | None = None, header_apcorr_fwhm_px: float | None = None,
                  header_apcorr_source: str = "") -> BlockResult:
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
        Run configuration (``detection``, ``photometry``, ``pnet`` and ``bpnn`` sections).
    detector
        The :class:`~survey_proc.detect.base.Detector`
        (:func:`survey_proc.detect.registry.make_detector`).
    bpnn, seed
        A :class:`survey_proc.photometry.bpnn.LoadedBPNN` to measure magnitudes with, and
        the MC seed (:func:`survey_proc.photometry.measure.block_seed`); None keeps the
        detector's photometry.
    keep_window
        Return the :class:`~survey_proc.photometry.measure.Window` also without a BPNN
        (for training the BPNN on exactly the pipeline's inputs). It costs sep a linear PSF
        fit of every detection of the window, which it otherwise skips.
    header_fwhm_px, header_fwhm_source
        The epoch's seeing FWHM (px) from its FITS header and the keyword it came from (the
        store's ``header_fwhm_px`` / ``header_fwhm_source``); used in place of
        ``photometry.fwhm_default_px`` when the block has too few stars to measure its FWHM.
        None, NaN or not positive: no header value (the default stays).
    header_apcorr, header_apcorr_fwhm_px, header_apcorr_source
        The epoch's aperture correction from its PSFEx model (total / aperture flux), the
        FWHM (px) it was computed at and its source (the store's ``header_apcorr*``); used in
        place of the Moffat model's when the block has too few stars to measure its own and
        it applies (:func:`~survey_proc.photometry.aperture.fallback_apcorr`). None or NaN:
        none (the Moffat model stays).

    Returns
    -------
    BlockResult
        The table of owned detections, the :class:`BlockInfo`, and the window and the
        rows' indices in it (with a BPNN or ``keep_window``; else None and empty).

    Raises
    ------
    TypeError
        When ``detector`` is not a :class:`~survey_proc.detect.base.Detector`.
    """
    if not isinstance(detector, Detector):
        raise TypeError(f"extract_block needs a Detector (survey_proc.detect.registry.make_detector) after cfg, "
                        f"got a {type(detector).__name__}; the BPNN comes after the detector")
    fwhm_fallback = FWHM_DEFAULT
    if header_fwhm_px is not None and np.isfinite(header_fwhm_px) and header_fwhm_px > 0:
        cfg = replace(cfg, photometry=replace(cfg.photometry, fwhm_default_px=float(header_fwhm_px)))
        fwhm_fallback = f"header {header_fwhm_source or 'FWHM'}".strip()
    oy, ox = origin_yx
    bad = classical.bad_pixels(image, mask, saturation_adu)
    halo_adu = detect_data = None
    halos: list[dict[str, Any]] | None = None
    halo_centres = None
    if cfg.detection.halo_sky:  # the saturated stars' halos in the sky (photometry/halo.py)
        fit = halo.fit_halo_sky(image, bad, cfg.detection, cfg.photometry.fwhm_default_px)
        bkg, halo_adu = fit.background, fit.halo_adu
        if not cfg.detection.halo_detect and halo_adu.any():
            detect_data = np.ascontiguousarray(np.where(bad, 0.0, image - fit.mesh.back), dtype=np.float32)
        # the block's own halos (centre in its tiles' cores), image frame: the forced photometry renders them
        cx, cy = np.array([p.x_px for p in fit.profiles]), np.array([p.y_px for p in fit.profiles])
        halo_centres = np.c_[cx, cy]
        owned = _owner(cx + ox, cy + oy, tiles, 0.0)[1] if fit.profiles else np.zeros(0, bool)
        halos = [p.shifted(ox, oy).to_dict() for p, own in zip(fit.profiles, owned, strict=True) if own]
    else:
        bkg = classical.estimate_background(image, bad, cfg.detection)
    data = np.ascontiguousarray(np.where(bad, 0.0, image - bkg.back), dtype=np.float32)
    # One noise level per window: sep's per-mesh rms map counts star light as noise in crowded
    # meshes (it halves the detections of a dense field); the sky + read noise is what matters.
    noise = bkg.global_rms
    margin = cfg.detection.own_margin_px

    def owner(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _owner(x + ox, y + oy, tiles, margin)

    use_epsf = cfg.photometry.psf_model == "epsf"
    want_window = bpnn is not None or keep_window or use_epsf
    inp = DetectorInput(image=image, mask=mask, data=data, bad=bad, bkg_adu=bkg.back, noise_adu=noise,
                        gain_e_per_adu=gain_e_per_adu, origin_yx=origin_yx, cfg=cfg, owner=owner,
                        want_neighbours=want_window or cfg.photometry.subtract_neighbours, halo_adu=halo_adu,
                        detect_data=detect_data)
    found = detector.detect(inp)
    # the domain check (survey_proc.detect.domain): a learned model outside its training seeing is not trusted
    actions: list[str] = []
    det_range = getattr(detector, "fwhm_range_px", None)
    if det_range is not None and found.n_fwhm > 0 and domain.outside(found.fwhm_px, det_range):
        actions.append(domain.describe(detector.name, found.fwhm_px, det_range, "detected with sep"))
        detector = make_detector(replace(cfg, detector="sep"))
        found = detector.detect(inp)
    bpnn_range = domain.card_fwhm_range(bpnn.card, "data", "tile", "fwhm_px") if bpnn is not None else None
    if bpnn_range is not None and found.n_fwhm > 0 and domain.outside(found.fwhm_px, bpnn_range):
        actions.append(domain.describe("bpnn", found.fwhm_px, bpnn_range, f"{detector.name}'s photometry kept"))
        bpnn = None
    info_common: dict[str, Any] = {"bkg_adu": float(np.median(bkg.back)), "rms_adu": noise, "bad_px": int(bad.sum()),
                                   "fallback": found.fallback or None, **pixel_census(image, bad, saturation_adu),
                                   "domain": "; ".join(actions) or None,
                                   "fwhm_source": FWHM_MEASURED if found.n_fwhm > 0 else fwhm_fallback,
                                   "halos": halos}
    no_window = np.zeros(0, np.int64)
    if len(found) and cfg.photometry.background == "masked":  # the stars' light out of the photometry's sky
        bkg = masked_background(image, bad, found.x, found.y, found.peak_adu, noise, found.fwhm_px, cfg.detection)
        if halo_adu is not None:
            bkg = replace(bkg, back=(bkg.back + halo_adu).astype(np.float32))
        data = np.ascontiguousarray(np.where(bad, 0.0, image - bkg.back), dtype=np.float32)
        inp = replace(inp, data=data, bkg_adu=bkg.back)
        info_common["bkg_adu"] = float(np.median(bkg.back))
    if len(found) == 0:
        table = _empty() if found.confidence is None else _empty().assign(confidence=found.confidence)
        return BlockResult(table, BlockInfo(0, cfg.photometry.fwhm_default_px, 0, 1.0, 0, **info_common), None,
                           no_window)

    ap, flux_mesh = _aperture(inp, found)
    total, apcorr_source = _with_fallback_apcorr(inp, found, ap, detector.total_flux(inp, found, ap),
                                                 header_apcorr, header_apcorr_fwhm_px, header_apcorr_source)
    total = _with_apcorr_scatter(inp, found, ap, total)
    if found.pairs is not None and inp.cfg.detection.residual_pair_photometry == "psf_fit":  # the pairs' PSF fluxes
        allowed = ((found.flags | ap.flags) & (F.PHOTOMETRY_BAD | F.CENTROID | F.HALO)) == 0
        total, _ = with_pair_fluxes(total, found.pairs, allowed, cfg.photometry.apcorr_snr_min)
    flags = found.flags | ap.flags
    lit = halo.on_halo(halo_adu, found.x, found.y, noise)
    flags[lit] |= F.HALO
    if lit.any():  # the halo sky's own error on the aperture's scale, in both errors
        e_sky = halo.sky_model_error(data, bad, found.x[lit], found.y[lit], ap.radius_px, noise, found.x, found.y,
                                     halo_centres)
        fe_ap = ap.flux_err.copy()
        fe_ap[lit] = np.hypot(fe_ap[lit], e_sky)
        fe = np.asarray(total.flux_err, float).copy()
        fe[lit] = np.hypot(fe[lit], total.apcorr * e_sky)
        ap, total = replace(ap, flux_err=fe_ap), replace(total, flux_err=fe)
    ok = (flags & F.PHOTOMETRY_BAD) == 0
    # the concentration test compares two apertures on the same (mesh) sky
    flags[aperture.extended(data, bad, found.x, found.y, flux_mesh, total.snr, ap.radius_px, found.fwhm_px, noise,
                            ok)] |= F.EXTENDED
    flags[total.flux <= 0] |= F.NONPOSITIVE
    x_img, y_img = found.x + ox, found.y + oy
    depth = np.empty(len(found))
    for t in tiles:
        sel = found.tile == t.index
        depth[sel] = t.depth_px(x_img[sel], y_img[sel])
    iy, ix = nearest_pixel(found.x, found.y, image.shape)
    cols = {
        "tile": found.tile, "depth_px": depth, "x": x_img, "y": y_img,
        "x_iso": found.x_det + ox, "y_iso": found.y_det + oy,
        "flux_aper": ap.flux, "flux_aper_err": ap.flux_err, "flux": total.flux, "flux_err": total.flux_err,
        "snr": total.snr, "bkg_adu": bkg.back[iy, ix].astype(float), "npix": found.npix,
        "peak_adu": found.peak_adu, "flags": flags.astype(np.int32),
    }
    if found.confidence is not None:
        cols["confidence"] = found.confidence
    out = pd.DataFrame(cols)
    info = BlockInfo(len(out), found.fwhm_px, found.n_fwhm, total.apcorr, total.n_apcorr, **info_common,
                     apcorr_source=apcorr_source)
    if not want_window:
        return BlockResult(out, info, None, no_window)
    nb = found.neighbours
    if nb is None:
        raise RuntimeError(f"detector {detector.name!r} returned no neighbours for the window it was asked for")
    win = Window(data, bad, bkg.back, noise, gain_e_per_adu, found.fwhm_px, nb.x, nb.y, nb.flux_fit)
    if use_epsf:  # the PSF fit's magnitudes take the place of the BPNN's and the detector's
        point = _point_sources(win, nb.targets, flags, mask, ap.radius_px)
        out, psf_fit = _with_psf_fit(out, image, win, nb.targets, saturation_adu, cfg, point)
        info = replace(info, psf_fit=psf_fit)
        if cfg.bpnn.enabled:
            out = _with_detector_magnitudes(out)
        return BlockResult(out, info, win, nb.targets)
    if bpnn is not None:
        out = _with_bpnn(out, win, nb.targets, bpnn, cfg, seed)
    elif actions and cfg.bpnn.enabled:  # the other blocks of the epoch bring BPNN magnitude columns: match them
        out = _with_detector_magnitudes(out)
    return BlockResult(out, info, win, nb.targets)


def _with_detector_magnitudes(out: pd.DataFrame) -> pd.DataFrame:
    """The BPNN's magnitude columns from the detector's own flux (a block the BPNN was not used on)."""
    from survey_proc.catalog.calibrate import instrumental_mag

    out = out.copy()
    out["mag_inst"], out["mag_inst_err"] = instrumental_mag(out["flux"].to_numpy(), out["flux_err"].to_numpy())
    out["mag_err_aleatoric"] = out["mag_inst_err"]
    out["mag_err_epistemic"] = 0.0  # the classical measurement has no model uncertainty
    return out


def _point_sources(win: Window, targets: np.ndarray, flags: np.ndarray, mask: np.ndarray | None, r_ap_px: float
                   ) -> np.ndarray:
    """Per detection of the window: True where it may build the empirical PSF (issue 21: galaxies out of it).

    False for an owned detection (``targets``, with ``flags`` in the table's row order) with
    a :data:`PSF_STAR_EXCLUDE` flag, and for any detection of the window that the same
    concentration test (:func:`~survey_proc.photometry.aperture.extended`) calls extended
    when it is run on all of them: the halo's detections have no flags, and a galaxy just
    outside the block's cores is as bad a PSF star as one inside. (Treating them as point
    sources would let the halo's galaxies back in; the test costs two aperture sums per
    detection.) Run on the whole window, the isolation test also sees the halo's neighbours.
    """
    f, fe, fl = aperture.aperture_measure(win.data, win.noise_adu, win.bad, mask, win.x, win.y, r_ap_px,
                                          win.gain_e_per_adu)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(fe > 0, f / fe, 0.0)
    ok = ((fl & F.PHOTOMETRY_BAD) == 0) & (f > 0)
    ext = aperture.extended(win.data, win.bad, win.x, win.y, f, snr, r_ap_px, win.fwhm_px, win.noise_adu, ok)
    ext[np.asarray(targets, np.int64)] |= (np.asarray(flags) & PSF_STAR_EXCLUDE) != 0
    return ~ext


def _with_psf_fit(out: pd.DataFrame, image: np.ndarray, win: Window, targets: np.ndarray, saturation_adu: float,
                  cfg: RunConfig, point: np.ndarray | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``flux``/``flux_err`` from the PSF fit on the window's empirical PSF (:mod:`~survey_proc.photometry.psfphot`).

    A target whose fit failed keeps the detector's flux and is flagged ``PSF_FIT``. ``point``
    (per window detection, :func:`_point_sources`) keeps extended sources out of the PSF model.
    Also returns what the fit used (:attr:`BlockInfo.psf_fit`).
    """
    from survey_proc.photometry.psfphot import psf_photometry

    r = psf_photometry(image, win.bad, win.data, win.bkg_adu, win.noise_adu, win.gain_e_per_adu, saturation_adu,
                       win.fwhm_px, win.x, win.y, win.flux_fit, targets, beta=cfg.bpnn.psf_beta, point=point)
    out = out.copy()
    ok = r.ok & np.isfinite(r.flux_err) & (r.flux_err > 0)
    out.loc[ok, "flux"] = r.flux[ok]
    out.loc[ok, "flux_err"] = r.flux_err[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        out.loc[ok, "snr"] = r.flux[ok] / r.flux_err[ok]
    flags = out["flags"].to_numpy().copy()
    flags[~ok] |= F.PSF_FIT
    flags[ok] &= ~np.int32(F.NONPOSITIVE)
    flags[ok & (r.flux <= 0)] |= F.NONPOSITIVE
    out["flags"] = flags.astype(np.int32)
    return out, {"psf": r.psf, "n_psf_stars": r.n_psf_stars, "model_error_frac": float(r.model_error_frac),
                 "psf_fwhm_px": r.psf_fwhm_px, "why_moffat": r.why_moffat,
                 "n_not_point": -1 if point is None else int((~point).sum())}


def _aperture(inp: DetectorInput, found: Detections) -> tuple[Aperture, np.ndarray]:
    """Aperture flux (radius ``aperture_fwhm`` x FWHM), ``EDGE`` and the mask bits at ``found``'s final positions.

    With ``photometry.local_sky = "annulus"`` the flux is net of each detection's local sky
    (:func:`~survey_proc.photometry.aperture.with_local_sky`: an annulus of
    ``local_sky_inner_fwhm``-``local_sky_outer_fwhm`` x FWHM, the block's other detections
    masked; only where it is at least ``local_sky_min_snr`` times its error) and its error
    includes the sky's. Also returns the flux on the mesh sky alone
    (the concentration test's, whose larger aperture has no local sky).
    """
    pcfg = inp.cfg.photometry
    r_ap = pcfg.aperture_fwhm * found.fwhm_px
    f_ap, f_ap_err, flags = aperture.aperture_measure(inp.data, inp.noise_adu, inp.bad, inp.mask, found.x, found.y,
                                                      r_ap, inp.gain_e_per_adu)
    f_mesh = f_ap
    nb = found.neighbours
    if pcfg.subtract_neighbours and nb is not None and len(nb.x) > 1:  # the other detections' light out of it
        light = neighbour_light(inp.data.shape, found.x, found.y, r_ap, nb.x, nb.y, nb.flux_fit, nb.targets,
                                found.fwhm_px, inp.cfg.bpnn.psf_beta, inp.cfg.detection.residual_model_error)
        f_ap = f_ap - light.flux_adu
        f_ap_err = np.hypot(f_ap_err, light.err_adu)
    if found.pairs is not None and inp.cfg.detection.residual_pair_photometry == "subtract":
        f_ap = f_ap - found.pairs.light_adu  # a resolved pair's other member out of each aperture
        f_ap_err = np.hypot(f_ap_err, found.pairs.light_err_adu)
    if pcfg.local_sky == "annulus":
        f_ap, f_ap_err = aperture.with_local_sky(inp.data, inp.bad, found.x, found.y, r_ap, f_ap, f_ap_err,
                                                 inp.noise_adu, pcfg.local_sky_inner_fwhm * found.fwhm_px,
                                                 pcfg.local_sky_outer_fwhm * found.fwhm_px, found.x, found.y,
                                                 pcfg.local_sky_min_snr)
    return Aperture(flux=f_ap, flux_err=f_ap_err, flags=flags, radius_px=r_ap), f_mesh


def _with_fallback_apcorr(inp: DetectorInput, found: Detections, ap: Aperture, total: TotalFlux,
                          stored: float | None, stored_fwhm_px: float | None, stored_source: str
                          ) -> tuple[TotalFlux, str]:
    """The detector's total flux, with the epoch's stored (PSFEx) correction where the block measured none.

    Applies to an aperture-based total flux (``flux = flux_aper x apcorr``, sep) whose
    correction is the Moffat model's because too few stars measured one or its measurement was refused
    (``n_apcorr`` 0):
    the flux and its error are rescaled to the correction
    :func:`~survey_proc.photometry.aperture.fallback_apcorr` returns. Also returns the
    correction's source (:attr:`BlockInfo.apcorr_source`; "" for a detector's own total flux).
    """
    if not np.array_equal(total.flux, ap.flux * total.apcorr, equal_nan=True):
        return total, ""  # a detector's own total flux (PNet): no aperture correction
    if total.n_apcorr > 0:
        return total, aperture.APCORR_MEASURED
    apcorr, source = aperture.fallback_apcorr(inp.cfg.photometry, found.fwhm_px, stored, stored_fwhm_px,
                                              stored_source)
    if total.apcorr_refused:
        source = f"{source} ({total.apcorr_refused})"
    if apcorr == total.apcorr:
        return total, source
    return replace(total, flux=ap.flux * apcorr, flux_err=ap.flux_err * apcorr, apcorr=apcorr), source


def _with_apcorr_scatter(inp: DetectorInput, found: Detections, ap: Aperture, total: TotalFlux) -> TotalFlux:
    """An aperture-based total flux's error with the aperture correction's star-to-star scatter added.

    Applies when ``total.flux`` is the aperture flux times the aperture correction (sep);
    a detector with its own total flux (PNet's PSF fit) keeps its errors.
    ``snr`` stays the aperture's (the detection significance the thresholds use).
    :func:`~survey_proc.photometry.aperture.aperture_correction_scatter` says how it is measured.
    """
    if not np.array_equal(total.flux, ap.flux * total.apcorr):
        return total
    ok = ((found.flags | ap.flags) & (F.PHOTOMETRY_BAD | F.CENTROID)) == 0
    s_rel, _ = aperture.aperture_correction_scatter(inp.data, inp.bad, found.x, found.y, ap.flux, ap.flux_err, ok,
                                                    found.fwhm_px, inp.noise_adu, inp.gain_e_per_adu,
                                                    inp.cfg.photometry)
    if s_rel <= 0:
        return total
    return replace(total, flux_err=aperture.with_scatter(total.flux, total.flux_err, s_rel))


def _with_bpnn(out: pd.DataFrame, win: Window, targets: np.ndarray, bpnn: LoadedBPNN, cfg: RunConfig, seed: int
               ) -> pd.DataFrame:
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
