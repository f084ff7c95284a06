"""Real-data detector benchmark: measures that need no truth, on the images of ``../shared/data/real``.

    python -m benchmarks.real [--out DIR] [--sets sdss,2mass,m67,horsehead,spitzer,decam] [--rounds N] [--quick]
                              [--detectors sep,sep_epsf,...]

Per real set and per detector, on the pipeline's own block extraction
(:func:`survey_proc.catalog.extract.extract_block` over the whole frame, the frame's tiles,
one block):

- ``sep``: the classical path as the pipeline runs it (the default detector);
- ``sep_suppressed``: the same with the optional artefact suppression
  (``detection.suppress_artefacts = true``, :mod:`survey_proc.detect.artefacts`: halos and
  spikes of bright stars, shattered galaxies and nebulosity); bright stars, injection
  positions and the empirical PSF are chosen from plain ``sep``'s detections, so the
  figures of the two share them;
- ``sep_epsf``: sep's detections with fluxes from the PSF fit on each block's empirical PSF
  (``photometry.psf_model = "epsf"``): its flux ratio of injected stars is the photometry check;
- ``sep_bpnn``: sep's detections with the BPNN's fluxes (the default pipeline's photometry;
  the BPNN's domain check keeps sep's flux on frames outside its training seeing);
- ``pnet``: the learned default *as the pipeline runs it*, i.e. with the domain check: a
  frame whose measured FWHM is outside PNet's training range is detected with sep (the
  action is recorded per frame, ``domain``);
- ``pnet_raw``: PNet alone, no domain check (the same block extraction with a detector
  that carries no training range), to see what the network does outside its range;
- ``dao``: photutils' DAOStarFinder, an outside reference, on the same background-subtracted
  pixels (the pipeline's background model, bad pixels masked) with the FWHM sep measured,
  threshold 5 x the background rms (the photutils documentation's usage); its flux is its
  kernel-footprint sum.

The FWHM every radius below uses is sep's measured one, or the PSFEx model's where sep
measures none (the DECam cutouts: too few stars in 100^2 px). The pipeline's own block
extraction is given each frame's header FWHM as the pipeline gets it from the store
(:func:`survey_proc.ingest.header_fwhm` on the header ingest reads; DECam: the CCD's ``FWHM``
in pixels; none of the other sets has one): a block that measures no FWHM uses it instead of
``photometry.fwhm_default_px`` (issue 21). ``fwhm_source`` per frame says which it used.
Likewise the DECam frames carry the aperture correction ``survey-proc ingest --psfex`` stores
(:func:`survey_proc.ingest.psfex_epoch_apcorr`: the PSFEx model at the cutout's centre, at
the header FWHM), which a block with too few stars to measure its own uses in place of the
Moffat(3) model's (issue 21); ``apcorr_source`` per frame says which it used.

Figures (``real.json``, tables in ``real.md``):

- **injection-recovery**: point sources with the frame's PSF injected into the real frame
  (DECam: its PSFEx model's constant term, cubic-spline shifted; else, by default
  (``--inject-psf epsf``, issue 21), the frame's empirical PSF
  (:func:`survey_proc.photometry.epsf.build_epsf` on sep's detections, constant over the
  frame) evaluated at each star's sub-pixel phase, unless it fails the checks of
  :func:`epsf_injection_psf`; else (and with ``--inject-psf stack``, the definition before
  the sixteenth session) the median of >= 5 bright (S/N 50-5000), unsaturated sep stars'
  stamps with no neighbour brighter than 5 % within 3 FWHM, each recentred by a cubic-spline
  shift and normalised, itself cubic-spline shifted to each star (on an undersampled frame
  both shifts widen the star: SDSS r 1.38 px against its stars' 1.19); else a Moffat (beta 3)
  of the measured FWHM; ``psf`` says which; every stamp ``2 ceil(4 FWHM) + 3`` px wide,
  summing to the injected flux), with Poisson noise at the frame's gain, at S/N
  5-300 in log-spaced bins (:data:`SNR_BINS`; S/N of an optimal PSF fit,
  ``F / sqrt(F / g + sigma^2 N_eff)``, ``N_eff = 1 / sum(psf^2)``). Positions avoid edges,
  existing detections (1.5 FWHM of any sep detection, 5 FWHM of S/N > 50 ones, saturated
  regions) and each other. The same injections (positions, fluxes, noise; ``seed``) go to
  every detector. An injection is recovered when a detection lies within ``max(1 FWHM,
  1.5 px)`` (the brightest of them is its measurement: a star split into pieces counts its
  main piece); ``chance`` is the share of injection positions with a detection within that
  radius in the frame *before* injection (what a match by coincidence would give). Per bin:
  recall and the median of recovered flux / injected flux; pooled over the frames for S/N
  20-300, the median flux ratio and the std of ``z = (flux - injected) / flux_err`` (the
  table's ``flux_err``, which for sep holds the aperture correction's scatter that ``snr``
  leaves out; DAOStarFinder: ``flux / snr``; raw and 5-sigma clipped), issue 21's
  real-image criteria. Injections whose 3 x 3 core reaches the frame's saturation level
  (:func:`saturated_injections`; 2MASS and the plates at high S/N) are saturated stars: they
  count for recall, but not in the flux ratios and z (``n_saturated``; the pooled figures
  with them are kept as ``*_all``, the definition before they were set apart);
- **repeatability** across the frames of a field (SDSS g/r/i, 2MASS J/H/K, the DECam
  epochs): each detection mapped through the WCS into every other frame (positions > 5 px
  inside it): the share with a detection of the other frame within ``max(FWHM_a, FWHM_b,
  1.5 px)``; ``chance``: the same with the positions shifted by 20-40 px in random
  directions;
- **artefacts**: bright stars are the saturated or masked regions of >= 3 px and the
  brightest sep stars (flux >= the 99.5th percentile and S/N >= 200; at most 15 per frame,
  none within 4 FWHM of a brighter one). Per star, the detections within 4 FWHM (``r4``)
  and within the star's extent (``rext``: 4 FWHM + the radius of sep's isophote, or of the
  saturated region) minus the star itself (floored at 0), and the same less what the
  detector's density elsewhere in the frame predicts (``excess``). Extended sources: the
  frame (less a clipped median) is median-filtered with a box of ``max(5, 3 FWHM)`` px
  (point sources vanish), smoothed (Gaussian, sigma 1 FWHM) and segmented at 3 sigma of the
  filtered map (photutils ``detect_sources``, >= ``pi (3 FWHM)^2`` px and >= 30 px);
  segments holding a bright star are left out. Per segment: the detections inside and their
  excess over the density elsewhere;
- **catalogue**: GLIMPSE on the Spitzer frame (VOTable), Gaia (legacypipe chunks, positions
  at 2015.5, no proper motion applied) on each DECam epoch; one-to-one matching within
  ``max(1 FWHM, 1.5 px)``: recall, precision, and both at the catalogue's count (the
  detector's N brightest, N the catalogue's sources in the frame);
- **gallery**: per set, crops (around the brightest star and the largest extended source)
  with each detector's detections (``benchmarks/plots/real-<set>.png``).

``--quick`` runs one 200 x 200 SDSS crop around the bright star with diffraction spikes
(g, r, i for the repeatability; injections into r, 2 rounds of 6 per bin), and writes the gallery into OUT
(the committed gallery is the full run's).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from survey_proc.catalog.extract import extract_block
from survey_proc.config import RunConfig
from survey_proc.detect import classical
from survey_proc.detect.base import Aperture, Detections, DetectorInput, TotalFlux
from survey_proc.detect.registry import make_detector
from survey_proc.evaluate import match_one_to_one
from survey_proc.ingest import hdu_header, header_fwhm, psfex_epoch_apcorr
from survey_proc.tiling import tile_grid
from survey_proc.vocab import EXTENDED, MASK_BAD

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real"
PLOTS = Path(__file__).parent / "plots"
DETECTORS = ("sep", "sep_suppressed", "sep_epsf", "sep_bpnn", "pnet", "pnet_raw", "dao")
#: rows run only when asked for (``--detectors``): the mesh sky alone (``halo_sky = false``), the halo sky thresholded
#: too (``halo_detect = true``), the halo sky with sep thresholding the image less the mesh alone, and the halo sky
#: without its diffraction spikes (``halo_spikes = false``)
EXTRA_ROWS = ("sep_mesh", "sep_halo", "sep_halo_thr", "sep_nospikes")
SETS = ("sdss", "2mass", "m67", "horsehead", "spitzer", "decam")
#: log-spaced injection S/N bins (optimal PSF-fit S/N)
#: what the injected stars are made of (``--inject-psf``): the frame's empirical PSF at each star's own sub-pixel
#: phase (issue 21: the ePSF feeds the real-data benchmark's injections), or the stack of its stars' stamps,
#: cubic-spline shifted (the definition before the sixteenth session, kept for the strict figures)
INJECT_PSFS = ("epsf", "stack")
SNR_BINS = ((5.0, 10.0), (10.0, 20.0), (20.0, 50.0), (50.0, 100.0), (100.0, 300.0))
DAO_THRESH_SIGMA = 5.0
SEED = 20


@dataclass
class Frame:
    """One real frame as the pipeline would be given it.

    Attributes
    ----------
    name
        e.g. ``"sdss_r"``.
    image
        Pixels (the file's units, called ADU here), float32; NaN where unusable.
    mask
        Mask bits (uint8, :data:`~survey_proc.vocab.MASK_BAD`) or None.
    gain
        e- per pixel unit (documented or assumed, see :func:`load_set`).
    saturation
        Saturation level (pixel units; inf when none).
    wcs
        The frame's celestial WCS, or None.
    psf, psf_fwhm
        A PSF model of the frame (centred stamp, sum 1) and its FWHM (px) where the data
        bring one (DECam: PSFEx), else None.
    header_fwhm_px, header_fwhm_source
        The seeing FWHM (px) the header states and its keyword, as ingest reads them
        (:func:`survey_proc.ingest.header_fwhm`; NaN, "" when none).
    header_apcorr, header_apcorr_fwhm_px, header_apcorr_source
        The aperture correction of the frame's PSFEx model, the FWHM (px) it was computed at
        and its source, as ``ingest --psfex`` stores them
        (:func:`survey_proc.ingest.psfex_epoch_apcorr`; NaN, NaN, "" when none).
    """

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    gain: float
    saturation: float
    wcs: Any = None
    psf: np.ndarray | None = None
    psf_fwhm: float | None = None
    header_fwhm_px: float = float("nan")
    header_fwhm_source: str = ""
    header_apcorr: float = float("nan")
    header_apcorr_fwhm_px: float = float("nan")
    header_apcorr_source: str = ""


@dataclass
class RealSet:
    """Frames of one field, an optional reference catalogue (RA/Dec or l/b SkyCoord) and gallery crop size."""

    name: str
    frames: list[Frame]
    catalogue: Any = None
    catalogue_name: str | None = None
    crop_px: int = 200
    notes: list[str] = field(default_factory=list)
    inject: list[int] | None = None  # frames that get injections (None: all)


# ---------------------------------------------------------------------------------------------------------- loading
def _wcs(header: Any) -> Any:
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(header).celestial
    return w if w.has_celestial else None


def _primary(path: Path, name: str, gain: float, saturation: float) -> Frame:
    from astropy.io import fits

    with fits.open(path) as h:
        img = np.asarray(h[0].data, np.float32)
        w = _wcs(h[0].header)
        hf = header_fwhm(hdu_header(h, 0))
    return Frame(name, img, None, gain, saturation, w, header_fwhm_px=hf[0], header_fwhm_source=hf[1])


def load_set(name: str, root: Path = REAL) -> RealSet:
    """The frames of one real set with their gains and saturation levels.

    Gains (e- per pixel unit) are those of ``docs/real-data.md`` where given (2MASS 10, SDSS
    1000 e-/nanomaggy, plates 1 as a placeholder), the header's ``GAINA`` for DECam (ADU),
    and an assumed 100 e- per MJy/sr for the Spitzer mosaic (IRAC 4.5 um: FLUXCONV ~0.15
    MJy/sr per DN/s, ~3.7 e-/DN, ~2.4 s, 2 frames). Saturation: 2997 for 2MASS (the pile-up
    ingest finds), 32767 for the int16 plates, the header's ``SATURATA`` for DECam, none
    for SDSS and Spitzer.
    """
    from astropy.coordinates import SkyCoord
    from astropy.io import fits

    if name == "sdss":
        fr = [_primary(root / f"sdss_{b}.fits.bz2", f"sdss_{b}", 1000.0, np.inf) for b in "gri"]
        return RealSet(name, fr, crop_px=200)
    if name == "2mass":
        fr = [_primary(root / f"gc_2mass_{b}.fits", f"2mass_{b}", 10.0, 2997.16) for b in "jhk"]
        return RealSet(name, fr, crop_px=120)
    if name == "m67":
        return RealSet(name, [_primary(root / "M6707HH.fits", "m67", 1.0, 32767.0)], crop_px=300)
    if name == "horsehead":
        return RealSet(name, [_primary(root / "HorseHead.fits", "horsehead", 1.0, 32767.0)], crop_px=300)
    if name == "spitzer":
        from astropy.io.votable import parse_single_table

        fr = _primary(root / "spitzer_example_image.fits", "spitzer", 100.0, np.inf)
        t = parse_single_table(str(root / "spitzer_example_catalog.xml")).to_table()
        cat = SkyCoord(np.asarray(t["l"], float), np.asarray(t["b"], float), unit="deg", frame="galactic")
        return RealSet(name, [fr], catalogue=cat, catalogue_name="GLIMPSE", crop_px=200)
    if name == "decam":
        frames = []
        for p in sorted(glob.glob(str(root / "legacypipe_decam/images/*_ooi_*.fits"))):
            with fits.open(p) as h:
                img = np.asarray(h[1].data, np.float32)
                hd = h[1].header
                w = _wcs(hd)
                hf = header_fwhm(hdu_header(h, 1))
                psfex = root / "legacypipe_decam/psfex" / (Path(p).name.split(".")[0] + "-psfex.fits")
                fwhm_ap = hf[0] if np.isfinite(hf[0]) else RunConfig().photometry.fwhm_default_px
                apc = psfex_epoch_apcorr(str(psfex), hdu_header(h, 1), img.shape, fwhm_ap, f"{p}[1]")
            ood = np.asarray(fits.getdata(p.replace("_ooi_", "_ood_"), 1))
            mask = np.where(ood != 0, MASK_BAD, 0).astype(np.uint8)
            tag = Path(p).name.split("_ooi_")[1].split("_ls9")[0] + Path(p).name[3:10]  # band + date
            ps = fits.getdata(root / "legacypipe_decam/psfex" / (Path(p).name.split(".")[0] + "-psfex.fits"), 1)
            psf = np.clip(np.asarray(ps["psf_mask"][0][0], float), 0, None)  # the constant term (PSF_SAMP 1)
            frames.append(Frame(f"decam_{tag}", img, mask, float(hd["GAINA"]), float(hd["SATURATA"]), w,
                                psf / psf.sum(), float(ps["psf_fwhm"][0]), hf[0], hf[1], apc[0], fwhm_ap, apc[1]))
        gaia = []
        for p in sorted(glob.glob(str(root / "legacypipe_decam/gaia/*.fits"))):
            g = fits.getdata(p, 1)
            gaia.append(np.c_[np.asarray(g["ra"], float), np.asarray(g["dec"], float)])
        g = np.concatenate(gaia)
        cat = SkyCoord(g[:, 0], g[:, 1], unit="deg", frame="icrs")
        return RealSet(name, frames, catalogue=cat, catalogue_name="Gaia", crop_px=100)
    raise ValueError(f"unknown real set {name!r}; the sets are {', '.join(SETS)}")


def quick_set(root: Path = REAL, size: int = 200) -> RealSet:
    """The ``--quick`` set: ``size``^2 crops of SDSS g, r, i around r's brightest pixel (the star with spikes).

    Injections go into the r crop only (g and i serve the repeatability).
    """
    full = load_set("sdss", root)
    r = full.frames[1].image
    cy, cx = np.unravel_index(np.nanargmax(r), r.shape)
    y0 = int(np.clip(cy - size // 2, 0, r.shape[0] - size))
    x0 = int(np.clip(cx - size // 2, 0, r.shape[1] - size))
    frames = []
    for f in full.frames:
        w = f.wcs.slice((slice(y0, y0 + size), slice(x0, x0 + size))) if f.wcs is not None else None
        frames.append(Frame(f.name + "_crop", np.ascontiguousarray(f.image[y0:y0 + size, x0:x0 + size]), None, f.gain,
                            f.saturation, w, header_fwhm_px=f.header_fwhm_px, header_fwhm_source=f.header_fwhm_source))
    return RealSet("sdss_crop", frames, crop_px=size, notes=[f"crop x {x0}:{x0 + size}, y {y0}:{y0 + size}"],
                   inject=[1])


# -------------------------------------------------------------------------------------------------------- detectors
class _RawPNet:
    """PNet without the domain check: the same detector with no training range (``fwhm_range_px`` absent)."""

    name = "pnet"
    model_kind = "detector"
    weights_setting = "pnet.weights"

    def __init__(self, inner: Any):
        self.inner = inner

    def detect(self, inp: DetectorInput) -> Detections:
        """PNet's detections (:meth:`survey_proc.detect.pnet_detector.PNetDetector.detect`)."""
        return self.inner.detect(inp)

    def total_flux(self, inp: DetectorInput, found: Detections, ap: Aperture) -> TotalFlux:
        """PNet's total fluxes (:meth:`survey_proc.detect.pnet_detector.PNetDetector.total_flux`)."""
        return self.inner.total_flux(inp, found, ap)


@dataclass
class Found:
    """One detector's detections on one frame (image frame, px; flux in pixel units)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    snr: np.ndarray
    fwhm_px: float = float("nan")
    domain: str | None = None
    seconds: float = 0.0
    n_fwhm: int = 0
    flux_err: np.ndarray | None = None  # the table's flux_err (None: flux / snr)
    flags: np.ndarray | None = None  # the table's flags (None: unknown)
    fwhm_source: str = ""  # the block's BlockInfo.fwhm_source (measured, header ... or the default)
    psf_fit: dict[str, Any] | None = None  # the block's BlockInfo.psf_fit (sep_epsf: psf, stars, profile error)
    apcorr: float = float("nan")  # the block's aperture correction (BlockInfo.apcorr)
    apcorr_source: str = ""  # ... and where it came from (BlockInfo.apcorr_source: measured, psfex ..., Moffat)

    def __len__(self) -> int:
        return len(self.x)


class Runner:
    """Runs the four detectors on a frame's pixels (see the module docstring)."""

    def __init__(self, detectors: tuple[str, ...] = DETECTORS, overrides: dict[str, Any] | None = None):
        from survey_proc import model_registry
        from survey_proc.config import config_from_dict

        self.detectors = detectors
        base = config_from_dict(overrides or {}).validate()  # (``--set``) under every row's own settings
        supp = replace(base, detector="sep")
        supp = replace(supp, detection=replace(supp.detection, suppress_artefacts=True))
        epsf = replace(base, detector="sep")
        epsf = replace(epsf, photometry=replace(epsf.photometry, psf_model="epsf"))
        halo = replace(base, detector="sep")
        halo = replace(halo, detection=replace(halo.detection, halo_sky=True, halo_detect=True))
        halo_thr = replace(halo, detection=replace(halo.detection, halo_detect=False))
        mesh = replace(base, detector="sep")
        mesh = replace(mesh, detection=replace(mesh.detection, halo_sky=False))
        nospikes = replace(base, detector="sep")
        nospikes = replace(nospikes, detection=replace(nospikes.detection, halo_sky=True, halo_spikes=False))
        self.cfg = {"sep": replace(base, detector="sep"), "sep_suppressed": supp, "sep_epsf": epsf,
                    "sep_mesh": mesh, "sep_halo": halo, "sep_halo_thr": halo_thr, "sep_nospikes": nospikes,
                    "pnet": replace(base, detector="pnet")}
        self.sep = make_detector(self.cfg["sep"])
        self.pnet = None
        self.bpnn = model_registry.load("bpnn", device="cpu") if "sep_bpnn" in detectors else None
        if "pnet" in detectors or "pnet_raw" in detectors:
            self.pnet = make_detector(self.cfg["pnet"], model_registry.load("detector", device="cpu"))

    def run(self, frame: Frame, image: np.ndarray | None = None, fwhm_px: float | None = None,
            exact: bool = True) -> dict[str, Found]:
        """Every detector's detections on ``image`` (default: the frame's pixels).

        ``fwhm_px`` is DAOStarFinder's FWHM (default: the one sep measures on ``image``).
        With ``exact`` False, ``pnet`` (the pipeline's) is derived from ``pnet_raw`` and
        ``sep`` by the rule of :func:`~survey_proc.catalog.extract.extract_block` (the sep
        block where PNet's measured FWHM is outside its card's range) instead of running
        PNet a second time; with ``exact`` the two are run and compared.
        """
        img = frame.image if image is None else image
        ny, nx = img.shape
        tiles = tile_grid(ny, nx, self.cfg["sep"].tile_px, self.cfg["sep"].halo_px)
        out: dict[str, Found] = {}

        def block(det: Any, cfg: RunConfig, bpnn: Any = None) -> Found:
            t0 = time.perf_counter()
            r = extract_block(img, frame.mask, (0, 0), tiles, frame.gain, frame.saturation, cfg, det, bpnn,
                              header_fwhm_px=frame.header_fwhm_px, header_fwhm_source=frame.header_fwhm_source,
                              header_apcorr=frame.header_apcorr, header_apcorr_fwhm_px=frame.header_apcorr_fwhm_px,
                              header_apcorr_source=frame.header_apcorr_source)
            t = r.table
            return Found(t["x"].to_numpy(), t["y"].to_numpy(), t["flux"].to_numpy(), t["snr"].to_numpy(),
                         r.info.fwhm_px, r.info.domain, time.perf_counter() - t0, r.info.n_fwhm_stars,
                         t["flux_err"].to_numpy(), t["flags"].to_numpy(), r.info.fwhm_source, r.info.psf_fit,
                         r.info.apcorr, r.info.apcorr_source)

        out["sep"] = block(self.sep, self.cfg["sep"])
        if "sep_suppressed" in self.detectors:
            out["sep_suppressed"] = block(self.sep, self.cfg["sep_suppressed"])
        for row in EXTRA_ROWS:  # the saturated stars' halos in the sky or not (detection.halo_sky)
            if row in self.detectors:
                out[row] = block(self.sep, self.cfg[row])
        if "sep_epsf" in self.detectors:  # sep's detections, fluxes from the PSF fit on the block's empirical PSF
            out["sep_epsf"] = block(self.sep, self.cfg["sep_epsf"])
        if "sep_bpnn" in self.detectors:  # the default pipeline's photometry: sep's detections, the BPNN's fluxes
            out["sep_bpnn"] = block(self.sep, self.cfg["sep"], self.bpnn)
        if "pnet_raw" in self.detectors:
            out["pnet_raw"] = block(_RawPNet(self.pnet), self.cfg["pnet"])
        if "pnet" in self.detectors:
            if exact or "pnet_raw" not in self.detectors:
                out["pnet"] = block(self.pnet, self.cfg["pnet"])
            else:
                out["pnet"] = self._pipeline_pnet(out["sep"], out["pnet_raw"])
            if exact and "pnet_raw" in self.detectors:
                derived = self._pipeline_pnet(out["sep"], out["pnet_raw"])
                if len(derived) != len(out["pnet"]) or derived.domain != out["pnet"].domain:
                    raise RuntimeError(f"{frame.name}: the pipeline's PNet block ({len(out['pnet'])}, "
                                       f"{out['pnet'].domain}) differs from the rule "
                                       f"({len(derived)}, {derived.domain})")
        if "dao" in self.detectors:
            out["dao"] = self.dao(frame, img, fwhm_px or _reference(out).fwhm_px)
        return {k: out[k] for k in self.detectors}

    def _pipeline_pnet(self, sep_found: Found, raw: Found) -> Found:
        """What extract_block returns for PNet, from the raw PNet and the sep blocks of the same pixels."""
        from survey_proc.detect import domain

        rng = self.pnet.fwhm_range_px if self.pnet is not None else None
        if rng is not None and raw.n_fwhm > 0 and domain.outside(raw.fwhm_px, rng):
            note = domain.describe("pnet", raw.fwhm_px, rng, "detected with sep")
            return Found(sep_found.x, sep_found.y, sep_found.flux, sep_found.snr, sep_found.fwhm_px, note,
                         raw.seconds + sep_found.seconds, sep_found.n_fwhm, sep_found.flux_err, sep_found.flags,
                         sep_found.fwhm_source)
        return raw

    def dao(self, frame: Frame, img: np.ndarray, fwhm_px: float) -> Found:
        """DAOStarFinder on the pipeline's background-subtracted window (bad pixels masked)."""
        from photutils.detection import DAOStarFinder

        t0 = time.perf_counter()
        cfg = self.cfg["sep"]
        bad = classical.bad_pixels(img, frame.mask, frame.saturation)
        bkg = classical.estimate_background(img, bad, cfg.detection)
        data = np.where(bad, 0.0, img - bkg.back)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = DAOStarFinder(DAO_THRESH_SIGMA * bkg.global_rms, max(float(fwhm_px), 0.8)).find_stars(data, mask=bad)
        if t is None or len(t) == 0:
            z = np.zeros(0)
            return Found(z, z, z, z, fwhm_px, None, time.perf_counter() - t0)
        x, y, f = (np.asarray(t[c], float) for c in ("x_centroid", "y_centroid", "flux"))
        # S/N of the footprint sum, background-limited (no Poisson term; a reference only)
        snr = f / (bkg.global_rms * np.sqrt(np.asarray(t["n_pixels"], float)))
        return Found(x, y, f, snr, fwhm_px, None, time.perf_counter() - t0, 0)


# ----------------------------------------------------------------------------------------------------------- PSF
def frame_fwhm(frame: Frame, sep_found: Found) -> float:
    """The FWHM (px) the figures use: sep's measured one, else the frame's PSF model's, else sep's default."""
    if sep_found.n_fwhm > 0 or frame.psf_fwhm is None:
        return float(sep_found.fwhm_px)
    return float(frame.psf_fwhm)


def _bad_map(frame: Frame) -> np.ndarray:
    return classical.bad_pixels(frame.image, frame.mask, frame.saturation)


def saturated_regions(frame: Frame, min_px: int = 3) -> list[tuple[float, float, float]]:
    """Saturated, non-finite or masked regions of >= ``min_px`` pixels: ``(x, y, radius_px)`` each."""
    lab, n = ndimage.label(_bad_map(frame))
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    area = ndimage.sum(np.ones_like(lab), lab, idx)
    com = ndimage.center_of_mass(np.ones_like(lab), lab, idx)
    return [(float(c[1]), float(c[0]), float(np.sqrt(a / np.pi))) for a, c in zip(area, com, strict=True)
            if a >= min_px]


def moffat_psf(fwhm_px: float, half: int, beta: float = 3.0) -> np.ndarray:
    """A normalised Moffat stamp of ``2 half + 1`` px, centred."""
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    p = (1.0 + (xx**2 + yy**2) / alpha**2) ** (-beta)
    return p / p.sum()


def empirical_psf(frame: Frame, sep_found: Found, fwhm_px: float, half: int, n_max: int = 40,
                  n_min: int = 5) -> tuple[np.ndarray, str]:
    """The frame's PSF stamp (sum 1, ``2 half + 1`` px) and how it was made (see the module docstring).

    A frame that brings a PSF model (DECam's PSFEx) uses it, cut or padded to the stamp.
    """
    if frame.psf is not None:
        p = frame.psf
        c = p.shape[0] // 2
        if c >= half:
            p = p[c - half:c + half + 1, c - half:c + half + 1]
        else:
            p = np.pad(p, half - c)
        p = np.clip(p, 0, None)
        return p / p.sum(), f"PSFEx model (constant term), FWHM {frame.psf_fwhm:.2f} px"
    bad = _bad_map(frame)
    bkg = classical.estimate_background(frame.image, bad, RunConfig().detection)
    data = np.where(bad, np.nan, frame.image - bkg.back)
    x, y, f, s = sep_found.x, sep_found.y, sep_found.flux, sep_found.snr
    ny, nx = data.shape
    tree = cKDTree(np.c_[x, y]) if len(x) else None
    order = np.argsort(-f)
    stamps = []
    for i in order:
        if len(stamps) >= n_max or tree is None:
            break
        if not (50 <= s[i] <= 5000):
            continue
        if sep_found.flags is not None and sep_found.flags[i] & EXTENDED:  # a galaxy is no PSF star
            continue
        ix, iy = int(np.rint(x[i])), int(np.rint(y[i]))
        if ix - half - 1 < 0 or iy - half - 1 < 0 or ix + half + 2 > nx or iy + half + 2 > ny:
            continue
        nb = [j for j in tree.query_ball_point((x[i], y[i]), 3.0 * fwhm_px) if j != i]
        if any(f[j] > 0.05 * f[i] for j in nb):
            continue
        st = data[iy - half - 1:iy + half + 2, ix - half - 1:ix + half + 2]
        if not np.isfinite(st).all():
            continue
        core = frame.image[iy - 1:iy + 2, ix - 1:ix + 2]
        if np.isfinite(frame.saturation) and np.nanmax(core) > 0.7 * frame.saturation:
            continue
        st = ndimage.shift(st, (iy - y[i], ix - x[i]), order=3, mode="nearest")[1:-1, 1:-1]
        tot = st.sum()
        if tot <= 0:
            continue
        stamps.append(st / tot)
    if len(stamps) >= n_min:
        p = np.clip(np.median(stamps, axis=0), 0, None)
        return p / p.sum(), f"empirical ({len(stamps)} stars)"
    return moffat_psf(fwhm_px, half), f"Moffat beta 3, FWHM {fwhm_px:.2f} px ({len(stamps)} isolated stars)"


def epsf_injection_psf(frame: Frame, sep_found: Found, fwhm_px: float, max_fwhm_mismatch: float = 0.3,
                       max_unseen: float = 0.015, max_chi2: float = 1.5) -> tuple[Any, str]:
    """The frame's empirical PSF (:func:`survey_proc.photometry.epsf.build_epsf`, constant over the frame) for the
    injections, and how it was made; ``(None, why)`` when it cannot be built or is unlike the frame's stars.

    It is built from the same sep detections as the pipeline's (extended sources not used as PSF stars), and
    refused
    - as the pipeline's PSF photometry refuses it, when its FWHM differs from the measured one by more than
      ``max_fwhm_mismatch`` (a photographic plate's few isolated stars);
    - when its analytic wing still puts more than the builder's own ``max_unseen`` of the light beyond the stamps
      after the builder's refits (``meta["light_beyond_stamp"]``): the builder's sign of a sky error taken as a
      wing. SDSS i: 4.2 %, the wing at its bounds (beta 1.9), 17 % of the light beyond 4 FWHM where the stars' own
      stack holds 1.6 %;
    - when it does not describe the stars it was built from to their noise: the median chi^2 per pixel of its fit
      to them (``meta["median_chi2_per_px"]``) above ``max_chi2`` (SDSS g/r 1.01-1.02 and the Horsehead plate 1.06
      pass; SDSS i 2.2, the crowded 2MASS frames 4.7-9.7 and Spitzer 38 do not). Injected stars must look like the
      frame's: where the model is not its stars, the stars' own stack is the better likeness.
    """
    from survey_proc.photometry.epsf import build_epsf

    bad = _bad_map(frame)
    bkg = classical.estimate_background(frame.image, bad, RunConfig().detection)
    point = None if sep_found.flags is None else (sep_found.flags & EXTENDED) == 0
    sat = frame.saturation if np.isfinite(frame.saturation) else None
    gain = frame.gain if np.isfinite(frame.gain) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            epsf = build_epsf(np.nan_to_num(frame.image), bad, bkg.back, bkg.global_rms, sep_found.x, sep_found.y,
                              sep_found.flux, fwhm_px, sat, gain_e_per_adu=gain, order=0, psf_candidate=point)
    except ValueError as exc:
        return None, f"no empirical PSF ({exc})"
    fw = float(epsf.fwhm_px)
    if not abs(fw / fwhm_px - 1.0) <= max_fwhm_mismatch:
        return None, f"no empirical PSF (its FWHM {fw:.2f} px against {fwhm_px:.2f} px measured)"
    unseen = float(epsf.meta.get("light_beyond_stamp", 0.0))
    if not unseen <= max_unseen:
        return None, f"no empirical PSF (its wing puts {unseen:.3f} of the light beyond the stamps)"
    chi2 = float(epsf.meta.get("median_chi2_per_px", np.nan))
    if not chi2 <= max_chi2:
        return None, f"no empirical PSF (its stars' median chi2 per pixel {chi2:.2f} > {max_chi2})"
    return epsf, f"empirical PSF ({int(epsf.meta.get('n_used', 0))} stars, FWHM {fw:.2f} px)"


class InjectionPSF:
    """What the injected stars look like: a stamp (sum 1, ``2 half + 1`` px) for each sub-pixel position.

    ``epsf`` (an :class:`~survey_proc.photometry.epsf.EmpiricalPSF`): its pixel-integrated model evaluated at the
    star's own sub-pixel phase (no resampling); else ``stamp`` shifted by a cubic spline (:func:`inject`'s former
    behaviour, which on an undersampled stamp widens the star: SDSS r 1.38 px against the stars' 1.19).
    """

    def __init__(self, half: int, how: str, stamp: np.ndarray | None = None, epsf: Any = None):
        if (stamp is None) == (epsf is None):
            raise ValueError("an injection PSF is either a stamp or an empirical PSF")
        self.half = half
        self.how = how
        self.stamp = stamp
        self.epsf = epsf

    def at(self, x: float, y: float) -> np.ndarray:
        """The normalised stamp of a star at ``(x, y)`` (px), centred on pixel ``(rint(x), rint(y))``."""
        ix, iy = int(np.rint(x)), int(np.rint(y))
        if self.epsf is not None:
            p = np.clip(self.epsf.stamp(self.half, x - ix, y - iy), 0, None)
        else:
            assert self.stamp is not None
            p = np.clip(ndimage.shift(self.stamp, (y - iy, x - ix), order=3, mode="constant"), 0, None)
        return p / p.sum()

    @property
    def n_eff(self) -> float:
        """The effective number of pixels ``1 / sum(psf^2)`` of a star centred on a pixel."""
        return 1.0 / float(np.sum(self.at(0.0, 0.0) ** 2))


def injection_psf(frame: Frame, sep_found: Found, fwhm_px: float, half: int, kind: str = "epsf") -> InjectionPSF:
    """The injections' PSF (``kind``, :data:`INJECT_PSFS`; see the module docstring).

    A frame that brings a PSF model (DECam's PSFEx) uses it whatever ``kind``. ``"epsf"`` falls back to the
    stack (:func:`empirical_psf`) when no empirical PSF can be built, saying so in ``how``.
    """
    if kind not in INJECT_PSFS:
        raise ValueError(f"unknown injection PSF {kind!r}; use one of {', '.join(INJECT_PSFS)}")
    why = ""
    if kind == "epsf" and frame.psf is None:
        epsf, why = epsf_injection_psf(frame, sep_found, fwhm_px)
        if epsf is not None:
            return InjectionPSF(half, why, epsf=epsf)
    stamp, how = empirical_psf(frame, sep_found, fwhm_px, half)  # (the stack, or the frame's own PSF model)
    return InjectionPSF(half, f"{how}; {why}" if why else how, stamp=stamp)


def flux_for_snr(snr: np.ndarray, sigma: float, gain: float, n_eff: float) -> np.ndarray:
    """Total flux (pixel units) whose optimal PSF-fit S/N is ``snr``: solves ``F = S sqrt(F/g + sigma^2 N_eff)``."""
    s2 = np.asarray(snr, float) ** 2
    return 0.5 * (s2 / gain + np.sqrt((s2 / gain) ** 2 + 4.0 * s2 * sigma**2 * n_eff))


# ----------------------------------------------------------------------------------------------------- injection
def choose_positions(frame: Frame, sep_found: Found, fwhm: float, half: int, n: int, rng: np.random.Generator,
                     avoid: np.ndarray | None = None) -> np.ndarray:
    """Up to ``n`` injection positions (n, 2) away from edges, detections, saturated regions and each other."""
    ny, nx = frame.image.shape
    edge = half + 4
    bad = _bad_map(frame)
    far_bad = ndimage.distance_transform_edt(~bad) > max(2.0 * fwhm, 3.0) if bad.any() else np.ones(bad.shape, bool)
    pts_all = np.c_[sep_found.x, sep_found.y]
    bright = pts_all[sep_found.snr > 50]
    t_all = cKDTree(pts_all) if len(pts_all) else None
    t_br = cKDTree(bright) if len(bright) else None
    r_all, r_br, r_sep = max(1.5 * fwhm, 2.0), max(5.0 * fwhm, 6.0), 2.0 * half + 2
    chosen: list[tuple[float, float]] = list(map(tuple, avoid)) if avoid is not None and len(avoid) else []
    n_avoid = len(chosen)
    for _ in range(200 * n):
        if len(chosen) - n_avoid >= n:
            break
        px, py = rng.uniform(edge, nx - 1 - edge), rng.uniform(edge, ny - 1 - edge)
        if not far_bad[int(np.rint(py)), int(np.rint(px))]:
            continue
        if t_all is not None and t_all.query_ball_point((px, py), r_all):
            continue
        if t_br is not None and t_br.query_ball_point((px, py), r_br):
            continue
        if chosen and min(np.hypot(px - cx, py - cy) for cx, cy in chosen) < r_sep:
            continue
        chosen.append((px, py))
    return np.asarray(chosen[n_avoid:], float).reshape(-1, 2)


def inject(image: np.ndarray, psf: InjectionPSF, xy: np.ndarray, flux: np.ndarray, gain: float,
           rng: np.random.Generator) -> np.ndarray:
    """``image`` plus the PSF at each sub-pixel position (:meth:`InjectionPSF.at`) times ``flux``, with Poisson
    noise."""
    out = np.array(image, np.float64, copy=True)
    half = psf.half
    for (x, y), f in zip(xy, flux, strict=True):
        ix, iy = int(np.rint(x)), int(np.rint(y))
        p = psf.at(x, y) * f
        noisy = rng.poisson(np.clip(p * gain, 0, None)) / gain if np.isfinite(gain) else p
        out[iy - half:iy + half + 1, ix - half:ix + half + 1] += noisy
    return out.astype(np.float32)


def saturated_injections(image: np.ndarray, xy: np.ndarray, saturation: float) -> np.ndarray:
    """Whether each injected star's 3 x 3 core reaches ``saturation`` in the injected ``image`` (False without one).

    Such a star is saturated: the pipeline takes those pixels out (``SATURATED``), as a real
    one's, and its flux is no measure of the photometry (2MASS: the injections of S/N 100-300 in
    the undersampled frames peak above the 2997 ADU level and read 0.65-0.85).
    """
    out = np.zeros(len(xy), bool)
    if not np.isfinite(saturation):
        return out
    ny, nx = image.shape
    for k, (x, y) in enumerate(xy):
        ix, iy = int(np.rint(x)), int(np.rint(y))
        core = image[max(0, iy - 1):min(ny, iy + 2), max(0, ix - 1):min(nx, ix + 2)]
        out[k] = bool(core.size and np.nanmax(core) >= saturation)
    return out


def injection_recovery(frame: Frame, runner: Runner, base: dict[str, Found], rounds: int, per_bin: int,
                       seed: int = SEED, inject_psf: str = "epsf") -> dict[str, Any]:
    """Injection-recovery figures of one frame per detector (see the module docstring)."""
    ref = _reference(base)
    fwhm = frame_fwhm(frame, ref)
    half = int(np.ceil(4.0 * fwhm)) + 1
    psf = injection_psf(frame, ref, fwhm, half, inject_psf)
    how, n_eff = psf.how, psf.n_eff
    bad = _bad_map(frame)
    sigma = classical.estimate_background(frame.image, bad, RunConfig().detection).global_rms
    rng = np.random.default_rng(seed)
    radius = max(fwhm, 1.5)
    rows: list[dict[str, Any]] = []
    base_trees = {k: cKDTree(np.c_[v.x, v.y]) if len(v) else None for k, v in base.items()}
    n_done = 0
    for _ in range(rounds):
        xy = choose_positions(frame, ref, fwhm, half, per_bin * len(SNR_BINS), rng)
        if len(xy) == 0:
            break
        # the bins cycle on across rounds: a frame with room for 2 stars a round (the DECam cutouts) got
        # only the two faintest bins every round when each round started again at the first
        b = (n_done + np.arange(len(xy))) % len(SNR_BINS)
        n_done += len(xy)
        lo = np.array([SNR_BINS[i][0] for i in b])
        hi = np.array([SNR_BINS[i][1] for i in b])
        snr = np.exp(rng.uniform(np.log(lo), np.log(hi)))
        flux = flux_for_snr(snr, sigma, frame.gain, n_eff)
        img = inject(frame.image, psf, xy, flux, frame.gain, rng)
        sat = saturated_injections(img, xy, frame.saturation)
        found = runner.run(frame, img, fwhm_px=fwhm, exact=False)
        for det, fd in found.items():
            tree = cKDTree(np.c_[fd.x, fd.y]) if len(fd) else None
            for k in range(len(xy)):
                rec, ratio, z = False, np.nan, np.nan
                near = tree.query_ball_point(xy[k], radius) if tree is not None else []
                if near:  # the brightest detection within the radius (a star split into pieces: its main one)
                    j = max(near, key=lambda i: fd.flux[i])
                    rec, ratio = True, fd.flux[j] / flux[k]
                    err = fd.flux[j] / fd.snr[j] if fd.flux_err is None else fd.flux_err[j]  # the table's error
                    if err > 0 and fd.snr[j] > 0:
                        z = (fd.flux[j] - flux[k]) / err
                chance = base_trees[det] is not None and bool(base_trees[det].query_ball_point(xy[k], radius))
                rows.append({"detector": det, "bin": int(b[k]), "snr": snr[k], "recovered": rec, "ratio": ratio,
                             "z": z, "chance": chance, "saturated": bool(sat[k])})
    df = pd.DataFrame(rows)
    res: dict[str, Any] = {"psf": how, "fwhm_px": fwhm, "n_eff_px": n_eff, "sigma": sigma, "match_radius_px": radius,
                           "per_detector": {}}
    for det in base:
        bins = []
        for i, (lo_, hi_) in enumerate(SNR_BINS):
            s = df[(df["detector"] == det) & (df["bin"] == i)] if len(df) else df
            # the photometry of injections that reached the saturation level is a saturated star's: apart
            u = s[~s["saturated"]] if len(s) else s
            r = u["ratio"].dropna() if len(u) else pd.Series(dtype=float)
            zb = u["z"].dropna() if len(u) else pd.Series(dtype=float)
            bins.append({"snr_lo": lo_, "snr_hi": hi_, "n": len(s),
                         "n_saturated": int(s["saturated"].sum()) if len(s) else 0,
                         "recall": float(s["recovered"].mean()) if len(s) else None,
                         "chance": float(s["chance"].mean()) if len(s) else None,
                         "flux_ratio_median": float(r.median()) if len(r) else None,
                         "z_std": float(zb.std(ddof=0)) if len(zb) > 1 else None, "z": [float(v) for v in zb],
                         "ratios": [float(v) for v in r],
                         "z_all": [float(v) for v in (s["z"].dropna() if len(s) else [])],
                         "ratios_all": [float(v) for v in (s["ratio"].dropna() if len(s) else [])]})
        res["per_detector"][det] = bins
    return res


# --------------------------------------------------------------------------------------------------- repeatability
def _to_frame(a: Frame, b: Frame, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions of frame ``a`` in frame ``b`` via the WCSs (the same pixels when either has none)."""
    if a.wcs is None or b.wcs is None or len(x) == 0:
        return x, y
    sky = a.wcs.pixel_to_world(x, y)
    xb, yb = b.wcs.world_to_pixel(sky)
    return np.asarray(xb, float), np.asarray(yb, float)


def repeatability(frames: list[Frame], found: list[dict[str, Found]], seed: int = SEED) -> dict[str, Any]:
    """Share of detections with a counterpart in another frame of the field, and the chance level."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for det in found[0]:
        n = m = nc = mc = 0
        pairs = []
        for ia, a in enumerate(frames):
            for ib, b in enumerate(frames):
                if ia == ib:
                    continue
                fa, fb = found[ia][det], found[ib][det]
                r = max(frame_fwhm(a, _reference(found[ia])), frame_fwhm(b, _reference(found[ib])), 1.5)
                tree = cKDTree(np.c_[fb.x, fb.y]) if len(fb) else None
                ang = rng.uniform(0, 2 * np.pi, len(fa))
                rad = rng.uniform(20, 40, len(fa))
                res = []
                for dx, dy in ((0.0, 0.0), (rad * np.cos(ang), rad * np.sin(ang))):
                    xb, yb = _to_frame(a, b, fa.x + dx, fa.y + dy)
                    ny, nx = b.image.shape
                    inside = (xb > 5) & (yb > 5) & (xb < nx - 6) & (yb < ny - 6)
                    if tree is None or not inside.any():
                        res.append((int(inside.sum()), 0))
                        continue
                    d, _ = tree.query(np.c_[xb[inside], yb[inside]])
                    res.append((int(inside.sum()), int(np.sum(d <= r))))
                n, m, nc, mc = n + res[0][0], m + res[0][1], nc + res[1][0], mc + res[1][1]
                pairs.append({"a": a.name, "b": b.name, "n": res[0][0],
                              "share": res[0][1] / res[0][0] if res[0][0] else None,
                              "chance": res[1][1] / res[1][0] if res[1][0] else None})
        out[det] = {"share": m / n if n else None, "chance": mc / nc if nc else None, "n": n, "pairs": pairs}
    return out


# ------------------------------------------------------------------------------------------------------- artefacts
def _reference(found: dict[str, Found]) -> Found:
    """The detections that choose bright stars, injection positions and the PSF: plain sep."""
    return found["sep"]


def bright_stars(frame: Frame, sep_found: Found, fwhm: float, n_max: int = 15) -> list[tuple[float, float, float]]:
    """Bright or saturated stars ``(x, y, extent_px)``: saturated/masked regions and the brightest sep stars."""
    stars = [(x, y, r) for x, y, r in saturated_regions(frame)]
    f, s = sep_found.flux, sep_found.snr
    if len(f):
        cut = np.percentile(f, 99.5)
        for i in np.argsort(-f):
            if len(stars) >= n_max or f[i] < cut or s[i] < 200:
                break
            x, y = sep_found.x[i], sep_found.y[i]
            if any(np.hypot(x - sx, y - sy) < 4 * fwhm + sr for sx, sy, sr in stars):
                continue
            stars.append((float(x), float(y), 0.0))
    return stars[:n_max]


def _iso_radius(frame: Frame, x: float, y: float, rms: float, bkg: np.ndarray) -> float:
    """Radius (px) of the region above 1.5 rms around (x, y) that is connected to it (capped at 80 px)."""
    ny, nx = frame.image.shape
    r = 80
    x0, x1, y0, y1 = max(0, int(x) - r), min(nx, int(x) + r + 1), max(0, int(y) - r), min(ny, int(y) + r + 1)
    sub = frame.image[y0:y1, x0:x1] - bkg[y0:y1, x0:x1]
    above = ~(sub < 1.5 * rms)  # NaN (saturated, masked) counts as above
    lab, _ = ndimage.label(above)
    k = lab[int(np.rint(y)) - y0, int(np.rint(x)) - x0]
    if k == 0:
        return 0.0
    return float(np.sqrt(np.sum(lab == k) / np.pi))


def artefacts(frame: Frame, found: dict[str, Found], fwhm: float) -> dict[str, Any]:
    """Extra detections per bright star and detections per extended source, per detector."""
    from photutils.segmentation import detect_sources

    bad = _bad_map(frame)
    bkg = classical.estimate_background(frame.image, bad, RunConfig().detection)
    stars = bright_stars(frame, _reference(found), fwhm)
    img = np.where(bad, np.nan, frame.image)
    ext = []
    for x, y, r_sat in stars:
        ext.append(4 * fwhm + max(r_sat, _iso_radius(frame, x, y, bkg.global_rms, bkg.back)))
    ny, nx = frame.image.shape
    yy, xx = np.mgrid[:ny, :nx]
    near_star = np.zeros((ny, nx), bool)
    for (x, y, _), re in zip(stars, ext, strict=True):
        near_star |= (xx - x) ** 2 + (yy - y) ** 2 <= re**2
    # extended emission: median filter removes point sources, a Gaussian smooths, segmentation at 3 sigma
    med = float(np.nanmedian(img))
    filled = np.where(np.isfinite(img), img - med, 0.0)
    k = int(max(5, 2 * int(1.5 * fwhm) + 1))
    smooth = ndimage.gaussian_filter(ndimage.median_filter(filled, size=k), sigma=max(fwhm, 1.0))
    from astropy.stats import sigma_clipped_stats

    _, smed, sstd = sigma_clipped_stats(smooth, sigma=3.0)
    npix = int(max(30, np.pi * (3 * fwhm) ** 2))
    seg = detect_sources(smooth - smed, 3.0 * sstd, n_pixels=npix)
    segmap = np.zeros((ny, nx), np.int32) if seg is None else np.asarray(seg.data)
    drop = set(np.unique(segmap[near_star])) - {0}
    labels = [int(v) for v in np.unique(segmap) if v != 0 and v not in drop]
    in_seg = np.isin(segmap, labels)
    area_seg = {v: int(np.sum(segmap == v)) for v in labels}
    res: dict[str, Any] = {"n_bright_stars": len(stars), "n_saturated_regions": sum(1 for s in stars if s[2] > 0),
                           "extent_px_median": float(np.median(ext)) if ext else None,
                           "n_extended": len(labels), "extended_px_median": float(np.median(list(area_seg.values())))
                           if labels else None, "per_detector": {}}
    for det, fd in found.items():
        ix = np.clip(np.round(fd.x).astype(int), 0, nx - 1)
        iy = np.clip(np.round(fd.y).astype(int), 0, ny - 1)
        outside = ~near_star[iy, ix] & ~in_seg[iy, ix]
        free_area = float(np.sum(~near_star & ~in_seg))
        dens = outside.sum() / free_area if free_area else 0.0
        tree = cKDTree(np.c_[fd.x, fd.y]) if len(fd) else None
        r4, rext, ex4, exext = [], [], [], []
        for (x, y, _), re in zip(stars, ext, strict=True):
            for r, lst, ex in ((4 * fwhm, r4, ex4), (re, rext, exext)):
                c = len(tree.query_ball_point((x, y), r)) if tree is not None else 0
                lst.append(max(c - 1, 0))
                ex.append(max(c - 1, 0) - dens * np.pi * r**2)
        seg_of = segmap[iy, ix]
        per_seg = [int(np.sum(seg_of == v)) for v in labels]
        ex_seg = [c - dens * area_seg[v] for c, v in zip(per_seg, labels, strict=True)]

        def mean(v: list[float]) -> float | None:
            return float(np.mean(v)) if len(v) else None

        res["per_detector"][det] = {
            "extra_per_star_r4": mean(r4), "excess_per_star_r4": mean(ex4),
            "extra_per_star_rext": mean(rext), "excess_per_star_rext": mean(exext),
            "per_extended": mean(per_seg), "per_extended_median": float(np.median(per_seg)) if per_seg else None,
            "excess_per_extended": mean(ex_seg), "density_per_kpx": 1000.0 * dens}
    res["_stars"] = [(x, y, re) for (x, y, _), re in zip(stars, ext, strict=True)]
    res["_segmap"] = segmap if labels else None
    res["_labels"] = labels
    return res


# ------------------------------------------------------------------------------------------------------- catalogue
def catalogue_match(frame: Frame, cat: Any, found: dict[str, Found], fwhm: float) -> dict[str, Any]:
    """Recall and precision of one detector's detections against a reference catalogue (one-to-one)."""
    xc, yc = frame.wcs.world_to_pixel(cat)
    xc, yc = np.asarray(xc, float), np.asarray(yc, float)
    ny, nx = frame.image.shape
    inside = (xc > 2) & (yc > 2) & (xc < nx - 3) & (yc < ny - 3)
    xc, yc = xc[inside], yc[inside]
    radius = max(fwhm, 1.5)
    out: dict[str, Any] = {"n_catalogue": int(inside.sum()), "match_radius_px": radius, "per_detector": {}}
    for det, fd in found.items():
        keep = (fd.x > 2) & (fd.y > 2) & (fd.x < nx - 3) & (fd.y < ny - 3)
        x, y, f = fd.x[keep], fd.y[keep], fd.flux[keep]
        i_d, i_c = match_one_to_one(x, y, xc, yc, radius)
        top = np.argsort(-f)[:len(xc)]
        j_d, _ = match_one_to_one(x[top], y[top], xc, yc, radius)
        out["per_detector"][det] = {
            "n": len(x), "matched": len(i_d), "recall": len(i_c) / len(xc) if len(xc) else None,
            "precision": len(i_d) / len(x) if len(x) else None,
            "recall_at_n": len(j_d) / len(xc) if len(xc) else None,
            "precision_at_n": len(j_d) / len(top) if len(top) else None}
    return out


def _sum_catalogue(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several frames' catalogue figures pooled (DECam epochs)."""
    nc = sum(p["n_catalogue"] for p in parts)
    out: dict[str, Any] = {"n_catalogue": nc, "per_detector": {}}
    for det in parts[0]["per_detector"]:
        n = sum(p["per_detector"][det]["n"] for p in parts)
        m = sum(p["per_detector"][det]["matched"] for p in parts)
        rn = sum((p["per_detector"][det]["recall_at_n"] or 0) * p["n_catalogue"] for p in parts)
        pn = sum((p["per_detector"][det]["precision_at_n"] or 0) * min(p["n_catalogue"], p["per_detector"][det]["n"])
                 for p in parts)
        npn = sum(min(p["n_catalogue"], p["per_detector"][det]["n"]) for p in parts)
        out["per_detector"][det] = {"n": n, "matched": m, "recall": m / nc if nc else None,
                                    "precision": m / n if n else None, "recall_at_n": rn / nc if nc else None,
                                    "precision_at_n": pn / npn if npn else None}
    return out


# --------------------------------------------------------------------------------------------------------- gallery
def gallery(rs: RealSet, frame: Frame, found: dict[str, Found], art: dict[str, Any], path: Path) -> None:
    """Crops (brightest star; largest extended source) with each detector's detections, one PNG.

    Pixels: asinh from the median - 1 sigma (sky) to + 60 sigma (MAD-based), clipped; circles of
    each detector's colour; a fixed palette of greys and those colours keeps each PNG small.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.visualization import AsinhStretch, ImageNormalize

    ny, nx = frame.image.shape
    s = min(rs.crop_px, ny, nx)
    centres = []
    if art["_stars"]:  # the brightest star whose crop it can be centred in, else the brightest
        inner = [st for st in art["_stars"] if s / 2 <= st[0] <= nx - s / 2 and s / 2 <= st[1] <= ny - s / 2]
        st = (inner or art["_stars"])[0]
        centres.append(("bright star", st[0], st[1]))
    if art["_segmap"] is not None and art["_labels"]:
        seg = art["_segmap"]
        areas = [(int(np.sum(seg == v)), v) for v in art["_labels"]]
        v = max(areas)[1]
        cy, cx = ndimage.center_of_mass(seg == v)
        centres.append(("largest extended source", cx, cy))
    if not centres:
        centres.append(("centre", nx / 2, ny / 2))
    if len(centres) == 2 and s >= min(nx, ny):  # one crop is the whole frame: draw it once
        centres = centres[:1]
    fig, axes = plt.subplots(len(centres), len(found), figsize=(3.2 * len(found), 3.35 * len(centres)),
                             squeeze=False)
    colours = {"sep": "#0000ff", "sep_suppressed": "#00a0ff", "sep_epsf": "#000080", "sep_bpnn": "#8000ff",
               "sep_halo": "#00ffa0", "sep_halo_thr": "#008060", "sep_mesh": "#a0a0a0", "sep_nospikes": "#60c0a0",
               "pnet": "#ff0000",
               "pnet_raw": "#ff00ff",
               "dao": "#00b000"}
    for row, (what, cx, cy) in enumerate(centres):
        x0 = int(np.clip(cx - s / 2, 0, nx - s))
        y0 = int(np.clip(cy - s / 2, 0, ny - s))
        crop = frame.image[y0:y0 + s, x0:x0 + s]
        good = crop[np.isfinite(crop)]
        med = float(np.median(good))
        sd = 1.4826 * float(np.median(np.abs(good - med)))
        # sky light grey, faint stars visible, bright ones black
        norm = ImageNormalize(vmin=med - 1.0 * sd, vmax=med + 60 * sd, stretch=AsinhStretch(0.08), clip=True)
        for col, (det, fd) in enumerate(found.items()):
            ax = axes[row, col]
            ax.imshow(crop, origin="lower", cmap="gray_r", norm=norm, interpolation="nearest")
            sel = (fd.x >= x0 - 0.5) & (fd.x < x0 + s - 0.5) & (fd.y >= y0 - 0.5) & (fd.y < y0 + s - 0.5)
            ax.scatter(fd.x[sel] - x0, fd.y[sel] - y0, s=30 * 200 / s, facecolors="none",
                       edgecolors=colours.get(det, "#ff0000"), linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            label = det + (" (domain: sep)" if det == "pnet" and fd.domain else "")
            ax.set_title(f"{label}: {int(sel.sum())}", fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{what}\n{s}x{s} at ({x0},{y0})", fontsize=6)
    fig.suptitle(f"{frame.name}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    from PIL import Image

    # a fixed palette (40 greys and the markers' colours): tens of kB instead of hundreds
    rgb = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in colours.values()]
    greys = [(v, v, v) for v in np.linspace(0, 255, 40).astype(int)]
    pal = Image.new("P", (1, 1))
    pal.putpalette([int(c) for t in greys + rgb for c in t] + [0] * 3 * (256 - len(greys) - len(rgb)))
    with Image.open(path) as im:
        q = im.convert("RGB").quantize(palette=pal, dither=Image.Dither.NONE)
    q.save(path, optimize=True)


# ------------------------------------------------------------------------------------------------------------ main
def benchmark_set(rs: RealSet, runner: Runner, rounds: int, per_bin: int, plot_dir: Path | None,
                  inject_psf: str = "epsf") -> dict[str, Any]:
    """Every figure of one real set (see the module docstring)."""
    t0 = time.perf_counter()
    base = [runner.run(f, fwhm_px=f.psf_fwhm) for f in rs.frames]
    frames_out = []
    for i, (f, b) in enumerate(zip(rs.frames, base, strict=True)):
        fwhm = frame_fwhm(f, _reference(b))
        inj = (injection_recovery(f, runner, b, rounds, per_bin, inject_psf=inject_psf)
               if rs.inject is None or i in rs.inject else None)
        art = artefacts(f, b, fwhm)
        fr: dict[str, Any] = {
            "frame": f.name, "shape": list(f.image.shape), "gain": f.gain, "saturation": f.saturation,
            "fwhm_px": {k: v.fwhm_px for k, v in b.items()}, "fwhm_used_px": fwhm,
            "fwhm_source": {k: v.fwhm_source for k, v in b.items()},
            "apcorr": {k: v.apcorr for k, v in b.items()},
            "apcorr_source": {k: v.apcorr_source for k, v in b.items()},
            "psf_fit": {k: v.psf_fit for k, v in b.items() if v.psf_fit is not None},
            "domain": {k: v.domain for k, v in b.items()},
            "n_detections": {k: len(v) for k, v in b.items()},
            "seconds": {k: v.seconds for k, v in b.items()},
            "injection": inj, "artefacts": {k: v for k, v in art.items() if not k.startswith("_")}}
        if rs.catalogue is not None and f.wcs is not None:
            fr["catalogue"] = catalogue_match(f, rs.catalogue, b, fwhm)
        frames_out.append(fr)
        if plot_dir is not None and f is rs.frames[_gallery_frame(rs)]:
            gallery(rs, f, b, art, plot_dir / f"real-{rs.name}.png")
    out: dict[str, Any] = {"set": rs.name, "notes": rs.notes, "frames": frames_out}
    if len(rs.frames) > 1:
        out["repeatability"] = repeatability(rs.frames, base)
    if rs.catalogue is not None:
        parts = [fr["catalogue"] for fr in frames_out if "catalogue" in fr]
        out["catalogue"] = {"name": rs.catalogue_name, **(_sum_catalogue(parts) if len(parts) > 1 else parts[0])}
    out["seconds"] = time.perf_counter() - t0
    return out


def _gallery_frame(rs: RealSet) -> int:
    """The frame drawn in the gallery: SDSS r, 2MASS K, the first DECam epoch, else the only one."""
    names = [f.name for f in rs.frames]
    for want in ("sdss_r", "2mass_k"):
        for i, n in enumerate(names):
            if n.startswith(want):
                return i
    return 0


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Per set x detector: the headline figures (recall per bin, pooled over frames; the rest averaged)."""
    out: dict[str, Any] = {}
    for rs in res["sets"]:
        per: dict[str, Any] = {}
        for det in rs["frames"][0]["n_detections"]:
            bins = []
            for i in range(len(SNR_BINS)):
                inj = [fr["injection"]["per_detector"][det][i] for fr in rs["frames"] if fr["injection"]]
                n = sum(b["n"] for b in inj)
                rec = sum((b["recall"] or 0) * b["n"] for b in inj)
                ch = sum((b["chance"] or 0) * b["n"] for b in inj)
                ratios = [b["flux_ratio_median"] for b in inj]
                ratios = [r for r in ratios if r is not None]
                bins.append({"snr_lo": SNR_BINS[i][0], "snr_hi": SNR_BINS[i][1], "n": n,
                             "recall": rec / n if n else None, "chance": ch / n if n else None,
                             "flux_ratio_median": float(np.median(ratios)) if ratios else None,
                             "n_saturated": sum(b.get("n_saturated", 0) for b in inj),
                             "z": [v for b in inj for v in b.get("z", [])],
                             "ratios": [v for b in inj for v in b.get("ratios", [])],
                             "z_all": [v for b in inj for v in b.get("z_all", b.get("z", []))],
                             "ratios_all": [v for b in inj for v in b.get("ratios_all", b.get("ratios", []))]})
            # injected stars of S/N 20-300 pooled over the frames: the median flux ratio and the z std (without the
            # saturated injections; "_all": with them, the definition before they were set apart)
            zs = np.array([v for b in bins[2:] for v in b.pop("z")])
            rr = np.array([v for b in bins[2:] for v in b.pop("ratios")])
            zs_all = np.array([v for b in bins[2:] for v in b.pop("z_all")])
            rr_all = np.array([v for b in bins[2:] for v in b.pop("ratios_all")])
            n_sat = sum(b["n_saturated"] for b in bins[2:])
            for b in bins[:2]:
                b.pop("z"), b.pop("ratios"), b.pop("z_all"), b.pop("ratios_all")

            def avg(key: str, frames: list[dict[str, Any]] = rs["frames"], det: str = det) -> float | None:
                v = [fr["artefacts"]["per_detector"][det][key] for fr in frames
                     if fr["artefacts"]["per_detector"][det][key] is not None]
                return float(np.mean(v)) if v else None

            per[det] = {"n_detections": [fr["n_detections"][det] for fr in rs["frames"]],
                        "fwhm_px": [fr["fwhm_px"][det] for fr in rs["frames"]],
                        "domain": [fr["domain"][det] for fr in rs["frames"]],
                        "recall_bins": bins,
                        "flux_ratio_pooled_s20": float(np.median(rr)) if len(rr) else None,
                        "z_std_s20": float(np.std(zs)) if len(zs) > 1 else None,
                        "z_std_clipped_s20": _clipped_std(zs),
                        "n_saturated_s20": n_sat,
                        "flux_ratio_pooled_s20_all": float(np.median(rr_all)) if len(rr_all) else None,
                        "z_std_s20_all": float(np.std(zs_all)) if len(zs_all) > 1 else None,
                        "extra_per_star_r4": avg("extra_per_star_r4"),
                        "excess_per_star_r4": avg("excess_per_star_r4"),
                        "extra_per_star_rext": avg("extra_per_star_rext"),
                        "excess_per_star_rext": avg("excess_per_star_rext"),
                        "per_extended": avg("per_extended"), "excess_per_extended": avg("excess_per_extended")}
            if "repeatability" in rs:
                per[det]["repeatability"] = rs["repeatability"][det]["share"]
                per[det]["repeatability_chance"] = rs["repeatability"][det]["chance"]
            if "catalogue" in rs:
                per[det]["catalogue"] = rs["catalogue"]["per_detector"][det]
        out[rs["set"]] = per
    return out


def _clipped_std(z: np.ndarray, k: float = 5.0) -> float | None:
    """Std of ``z`` after iterative ``k``-sigma clipping about the median (None for < 2 values)."""
    z = np.asarray(z, float)
    z = z[np.isfinite(z)]
    for _ in range(10):
        if len(z) < 2:
            return None
        keep = np.abs(z - np.median(z)) <= k * np.std(z)
        if keep.all():
            break
        z = z[keep]
    return float(np.std(z)) if len(z) > 1 else None


def _f(v: Any, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def markdown(res: dict[str, Any]) -> str:
    """The tables of ``real.md``."""
    s = res["summary"]
    lines = [f"# Real-data detector benchmark\n\n`{res['command']}` ({res['seconds']:.0f} s)\n"]
    hdr = " | ".join(f"S/N {lo:g}-{hi:g}" for lo, hi in SNR_BINS)
    lines += ["## Injection-recovery: recall (chance) per S/N bin, median flux ratio\n",
              f"| set | detector | {hdr} | flux ratio S/N 20-300 | pooled flux ratio | z std (5σ-clipped) | "
              "saturated injections S/N 20-300: n (pooled ratio, z std with them) |",
              "|---|---|" + "---|" * (len(SNR_BINS) + 4)]
    for name, per in s.items():
        for det, d in per.items():
            cells = [f"{_f(b['recall'])} ({_f(b['chance'])})" for b in d["recall_bins"]]
            fr = [b["flux_ratio_median"] for b in d["recall_bins"][2:] if b["flux_ratio_median"] is not None]
            lines.append(f"| {name} | {det} | " + " | ".join(cells) + f" | {_f(np.median(fr) if fr else None)} | "
                         f"{_f(d.get('flux_ratio_pooled_s20'), '.3f')} | {_f(d.get('z_std_s20'))} "
                         f"({_f(d.get('z_std_clipped_s20'))}) | {d.get('n_saturated_s20', 0)}"
                         + (f" ({_f(d.get('flux_ratio_pooled_s20_all'), '.3f')}, {_f(d.get('z_std_s20_all'))})"
                            if d.get("n_saturated_s20") else "") + " |")
    lines += ["\nn per bin: " + "; ".join(f"{n}: {per['sep']['recall_bins'][0]['n']}" for n, per in s.items()),
              "\n## Detections, FWHM, domain, repeatability, artefacts\n",
              "| set | detector | detections per frame | FWHM (px) | domain | repeatability (chance) | "
              "extra per bright star, 4 FWHM (excess) | extra per bright star, extent (excess) | "
              "per extended source (excess) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, per in s.items():
        for det, d in per.items():
            dom = "sep (outside range)" if any(d["domain"]) else "—"
            rep = f"{_f(d.get('repeatability'))} ({_f(d.get('repeatability_chance'))})" if "repeatability" in d else "—"
            lines.append(f"| {name} | {det} | {' / '.join(map(str, d['n_detections']))} | "
                         f"{' / '.join(_f(v) for v in d['fwhm_px'])} | {dom} | {rep} | "
                         f"{_f(d['extra_per_star_r4'])} ({_f(d['excess_per_star_r4'])}) | "
                         f"{_f(d['extra_per_star_rext'])} ({_f(d['excess_per_star_rext'])}) | "
                         f"{_f(d['per_extended'])} ({_f(d['excess_per_extended'])}) |")
    cat = [(n, per) for n, per in s.items() if "catalogue" in next(iter(per.values()))]
    if cat:
        lines += ["\n## Against a real catalogue\n",
                  "| set | catalogue (n) | detector | detections | recall | precision | recall at N | precision at N |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, per in cat:
            rs = next(r for r in res["sets"] if r["set"] == n)
            for det, d in per.items():
                c = d["catalogue"]
                cname = f"{rs['catalogue']['name']} ({rs['catalogue']['n_catalogue']})"
                lines.append(f"| {n} | {cname} | {det} | {c['n']} |"
                             f" {_f(c['recall'])} | {_f(c['precision'])} | {_f(c['recall_at_n'])} | "
                             f"{_f(c['precision_at_n'])} |")
    lines += ["\n## Per frame\n",
              "| frame | PSF for injection | pnet domain action | PSF fit (stars, profile error[, not point-like]) |",
              "|---|---|---|---|"]
    for rs in res["sets"]:
        for fr in rs["frames"]:
            psf = fr["injection"]["psf"] if fr["injection"] else "(no injections)"
            pf = "; ".join(f"{k}: {p['psf']} ({p['n_psf_stars']}, {p['model_error_frac']:.3f}"
                           + (f", {p['n_not_point']} not point-like)" if p.get("n_not_point", -1) >= 0 else ")")
                           for k, p in fr.get("psf_fit", {}).items()) or "—"
            lines.append(f"| {fr['frame']} | {psf} | {fr['domain'].get('pnet') or '—'} | {pf} |")
    return "\n".join(lines) + "\n"


def run(sets: list[str] | None = None, out: Path | None = None, quick: bool = False, rounds: int | None = None,
        per_bin: int | None = None, plot_dir: Path | None = None, root: Path = REAL,
        detectors: tuple[str, ...] = DETECTORS, overrides: dict[str, Any] | None = None,
        inject_psf: str = "epsf") -> dict[str, Any]:
    """The benchmark; returns the result dict (``sets``, ``summary``, ``command``, ``seconds``) and writes OUT.

    Parameters
    ----------
    sets
        Names from :data:`SETS` (default all); ignored with ``quick``.
    out
        Folder for ``real.json`` and ``real.md`` (None: nothing written).
    quick
        The SDSS crop only (see the module docstring).
    rounds, per_bin
        Injection rounds per frame and injections per S/N bin per round (defaults: quick 2 x 6, full 3 x 8).
    plot_dir
        Where the gallery PNGs go (None: no gallery).
    root
        The real-data folder.
    detectors
        The rows (:data:`DETECTORS`; ``sep`` is always run: it chooses the injections).
    overrides
        Run-configuration overrides for every row (``{section: {key: value}}``).
    inject_psf
        What the injected stars are made of (:data:`INJECT_PSFS`).
    """
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    rounds = rounds or (2 if quick else 3)
    per_bin = per_bin or (6 if quick else 8)
    unknown = sorted(set(detectors) - set(DETECTORS) - set(EXTRA_ROWS))
    if inject_psf not in INJECT_PSFS:
        raise ValueError(f"unknown injection PSF {inject_psf!r}; use one of {', '.join(INJECT_PSFS)}")
    if unknown:
        raise ValueError(f"unknown detector rows {unknown}; the rows are {', '.join(DETECTORS + EXTRA_ROWS)}")
    detectors = tuple(d for d in DETECTORS + EXTRA_ROWS if d in detectors or d == "sep")
    runner = Runner(detectors, overrides)
    todo = [quick_set(root)] if quick else [load_set(n, root) for n in (sets or list(SETS))]
    results = []
    for rs in todo:
        print(f"[real] {rs.name}: {len(rs.frames)} frame(s)", flush=True)
        results.append(benchmark_set(rs, runner, rounds, per_bin, plot_dir, inject_psf))
        print(f"[real] {rs.name}: {results[-1]['seconds']:.0f} s", flush=True)
    cmd = "python -m benchmarks.real" + (" --quick" if quick else "") + (f" --sets {','.join(sets)}" if sets and not
                                                                         quick else "")
    if detectors != DETECTORS:
        cmd += f" --detectors {','.join(detectors)}"
    if inject_psf != "epsf":
        cmd += f" --inject-psf {inject_psf}"
    for sec, kv in (overrides or {}).items():
        cmd += "".join(f" --set {sec}.{k}={v}" for k, v in kv.items()) if isinstance(kv, dict) else f" --set {sec}={kv}"
    res: dict[str, Any] = {"command": cmd, "rounds": rounds, "per_bin": per_bin, "seed": SEED, "inject_psf": inject_psf,
                           "sets": results}
    res["summary"] = summary(res)
    res["seconds"] = time.perf_counter() - t0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "real.json").write_text(json.dumps(res, indent=1, default=float))
        (out / "real.md").write_text(markdown(res))
    return res


def main() -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/real")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--per-bin", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--detectors", default=",".join(DETECTORS), help="rows to run (sep always)")
    ap.add_argument("--inject-psf", default="epsf", choices=INJECT_PSFS,
                    help="the injected stars: the frame's empirical PSF (default) or its stars' shifted stack")
    ap.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", dest="sets_cfg",
                    help="a run-configuration override for every row (repeatable), e.g. photometry.local_sky=annulus "
                         "(with forced.enabled=false)")
    a = ap.parse_args()
    from benchmarks.accuracy import parse_sets

    overrides = parse_sets(a.sets_cfg)
    out = Path(a.out)
    plot_dir = out if a.quick or a.detectors != ",".join(DETECTORS) else PLOTS  # the committed gallery: all rows
    res = run(a.sets.split(","), out, a.quick, a.rounds, a.per_bin, plot_dir, detectors=tuple(a.detectors.split(",")),
              overrides=overrides, inject_psf=a.inject_psf)
    print(markdown(res))


if __name__ == "__main__":
    main()
