"""The classical detector as a :class:`~survey_proc.detect.base.Detector`: sep, then aperture photometry.

:meth:`SepDetector.detect` runs sep once on the block window
(:func:`survey_proc.detect.classical.extract`; the tiles of a block share their halos, so
searching each tile's window would repeat work), removes the artefacts of bright stars and
the fragments of extended sources from the window's detections
(:mod:`survey_proc.detect.artefacts`; ``detection.suppress_artefacts = false`` keeps plain
sep), and keeps the detections the block owns at their isophotal centroids. On those only it then

- flags ``BLENDED`` (deblended from a larger region), ``EDGE`` (isophote truncated) and,
  after a sep overflow, ``EXTRACT_FALLBACK``;
- measures the window's FWHM on the bright unflagged stars, selected by a rough S/N of
  the isophotal flux (``npix * noise^2 + flux / gain`` variance);
- moves each to sep's windowed centroid (``CENTROID`` where that fails or moves > 1 px; a
  move onto a brighter peak is kept, flagged: :func:`~survey_proc.photometry.aperture.windowed_centroids`).

:meth:`SepDetector.total_flux` corrects the block's aperture flux to total with the
aperture correction measured on the block's bright, unflagged, isolated stars
(:func:`survey_proc.photometry.aperture.aperture_correction`); the S/N is that of the
aperture flux.

For the BPNN, every sep detection of the window is a neighbour (halo ones at sep's
isophotal positions, owned ones at their windowed centroids), with fluxes from one
linear simultaneous PSF fit at fixed positions. The fit is the costly part and runs only
when :attr:`~survey_proc.detect.base.DetectorInput.want_neighbours` asks for it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import sep

from survey_proc import vocab as F
from survey_proc.detect import artefacts, classical, hidden
from survey_proc.detect.base import Aperture, Detections, DetectorInput, Neighbours, PairPhotometry, TotalFlux
from survey_proc.photometry import aperture, halo
from survey_proc.photometry.psffit import refine_positions


class SepDetector:
    """sep (SExtractor) detection with windowed centroids and an aperture correction. See the module docstring."""

    name: ClassVar[str] = "sep"
    model_kind: ClassVar[str | None] = None
    weights_setting: ClassVar[str | None] = None

    def detect(self, inp: DetectorInput) -> Detections:
        """The owned sep detections at their windowed centroids (window frame, px), and the window's FWHM.

        Parameters
        ----------
        inp
            The prepared window.

        Returns
        -------
        Detections
            ``x_det, y_det`` are sep's isophotal centroids, ``npix`` its isophotal area (px)
            and ``peak_adu`` its peak of the background-subtracted window (ADU).
        """
        cfg, pcfg = inp.cfg, inp.cfg.photometry
        oy, ox = inp.origin_yx
        thresholded = inp.data if inp.detect_data is None else inp.detect_data  # (halo_detect = false: mesh only)
        if cfg.detection.suppress_artefacts:
            objs, segmap, fallback = classical.extract_segmap(thresholded, inp.bad, inp.noise_adu, cfg.detection)
            objs = self._suppress(inp, objs, segmap)
        else:
            objs, fallback = classical.extract(thresholded, inp.bad, inp.noise_adu, cfg.detection)
        tile, keep = inp.owner(objs["x"], objs["y"])
        o = objs[keep]
        if len(o) == 0:
            return Detections.empty(pcfg.fwhm_default_px, fallback=fallback)
        flags = np.zeros(len(o), np.int32)
        flags[(o["flag"] & sep.OBJ_MERGED) != 0] |= F.BLENDED
        flags[(o["flag"] & sep.OBJ_TRUNC) != 0] |= F.EDGE
        if fallback:
            flags |= F.EXTRACT_FALLBACK
        # through the image frame and back, as the positions always went: (x + ox) - ox differs from x
        # in the last bits, and the centroids, hence the tables, stay bit-identical to the original code
        xw = (o["x"] + ox) - ox
        yw = (o["y"] + oy) - oy
        npix = o["npix"].astype(np.int32)
        flux_iso = o["flux"]
        # a rough S/N of the isophotal flux selects the bright stars for the FWHM
        iso_var = npix * inp.noise_adu**2 + np.clip(flux_iso, 0, None) / inp.gain_e_per_adu
        snr_iso = flux_iso / np.sqrt(iso_var)
        flags[halo.on_halo(inp.halo_adu, xw, yw, inp.noise_adu)] |= F.HALO
        # (at 1.5 sigma most bright stars touch a neighbour: BLENDED is normal; HALO: the sky rests on a model)
        clean = (flags & (F.EDGE | F.HALO)) == 0
        fwhm, n_fwhm = aperture.estimate_fwhm(inp.data, inp.bad, xw, yw, snr_iso, clean, pcfg)
        xc, yc, failed = aperture.windowed_centroids(inp.data, inp.bad, xw, yw, fwhm, pcfg.winpos_subpix,
                                                     inp.noise_adu, ((objs["x"] + ox) - ox, (objs["y"] + oy) - oy))
        flags[failed] |= F.CENTROID
        tile_k, x_det, y_det = tile[keep], o["x"].astype(float), o["y"].astype(float)
        peak = o["peak"].astype(float)
        pairs = None
        if cfg.detection.residual_detect:
            keep_before = keep
            objs, keep, more = self._hidden(inp, thresholded, objs, keep, xc, yc, fwhm)
            if "pairs" in more and cfg.detection.residual_pair_photometry != "aperture":
                pairs, xc, yc = self._pair_rows(more["pairs"], keep_before, xc, yc, more["own_index"],
                                                more["new_xy"], thresholded.shape,
                                                pcfg.aperture_fwhm * fwhm, fwhm)
            tile_k = np.r_[tile_k, more["tile"]]
            xc, yc = np.r_[xc, more["x"]], np.r_[yc, more["y"]]
            x_det, y_det = np.r_[x_det, more["x_det"]], np.r_[y_det, more["y_det"]]
            flags = np.r_[flags, more["flags"]].astype(np.int32)
            npix, peak = np.r_[npix, more["npix"]].astype(np.int32), np.r_[peak, more["peak"]]
        found = Detections(tile=tile_k, x=xc, y=yc, x_det=x_det, y_det=y_det,
                           flags=flags, npix=npix, peak_adu=peak, fwhm_px=fwhm, n_fwhm=n_fwhm,
                           fallback=fallback, pairs=pairs)
        if inp.want_neighbours:
            found.neighbours = self._neighbours(inp, objs, np.flatnonzero(keep), found)
        return found

    @staticmethod
    def _hidden(inp: DetectorInput, thresholded: np.ndarray, objs: np.ndarray, keep: np.ndarray, xc: np.ndarray,
                yc: np.ndarray, fwhm: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The residual pass (:mod:`.hidden`).

        Returns the window's objects and owned mask with the new sources appended, and the
        owned new sources' columns (flagged ``BLENDED``, at the joint fit's positions).
        """
        x_all, y_all = np.asarray(objs["x"], float).copy(), np.asarray(objs["y"], float).copy()
        x_all[keep], y_all[keep] = xc, yc
        flux0 = np.asarray(objs["flux"], float)
        model = hidden.residual_psf(inp.image, inp.bad, inp.data, inp.bkg_adu, inp.noise_adu, inp.gain_e_per_adu,
                                    x_all, y_all, flux0, fwhm, inp.cfg.detection, beta=inp.cfg.bpnn.psf_beta)
        if model.skip:  # the window's stars do not follow any PSF model well enough for a residual
            return objs, keep, {"tile": np.zeros(0, np.int32), "x": np.zeros(0), "y": np.zeros(0),
                                "x_det": np.zeros(0), "y_det": np.zeros(0), "flags": np.zeros(0, np.int32),
                                "npix": np.zeros(0, np.int32), "peak": np.zeros(0)}
        found = hidden.find_hidden(thresholded, inp.bad, inp.noise_adu, inp.gain_e_per_adu, x_all, y_all,
                                   flux0, fwhm, inp.cfg.detection, beta=inp.cfg.bpnn.psf_beta, model=model)
        new = found.objs.copy()
        new["x"], new["y"] = found.x, found.y  # the joint fit's positions
        tile, own = inp.owner(new["x"], new["y"]) if len(new) else (np.zeros(0, np.int32), np.zeros(0, bool))
        n = new[own]
        x, y = np.asarray(n["x"], float), np.asarray(n["y"], float)
        flags = np.full(len(n), F.BLENDED, np.int32)
        flags[(n["flag"] & sep.OBJ_TRUNC) != 0] |= F.EDGE
        flags[halo.on_halo(inp.halo_adu, x, y, inp.noise_adu)] |= F.HALO
        more: dict[str, Any] = {"tile": tile[own], "x": x, "y": y, "x_det": found.objs["x"][own].astype(float),
                                "y_det": found.objs["y"][own].astype(float), "flags": flags, "npix": n["npix"],
                                "peak": n["peak"].astype(float)}
        if found.pairs is not None:
            more["pairs"], more["own_index"] = found.pairs, np.flatnonzero(own)
            more["new_xy"] = (np.asarray(found.x, float), np.asarray(found.y, float))
        return np.concatenate([objs, new]), np.r_[keep, own], more

    @staticmethod
    def _pair_rows(pf: hidden.PairFit, keep: np.ndarray, xc: np.ndarray, yc: np.ndarray, own_new: np.ndarray,
                   new_xy: tuple[np.ndarray, np.ndarray], shape: tuple[int, int], r_ap_px: float, fwhm_px: float
                   ) -> tuple[PairPhotometry, np.ndarray, np.ndarray]:
        """The pairs' photometry per row (first-pass rows, then the owned new ones) and the moved positions.

        A first-pass star of a kept pair moves to its position in the pair's fit: its windowed
        centroid was pulled towards the neighbour it hid.
        """
        rows = np.full(len(keep), -1, np.int64)  # window object -> owned first-pass row
        rows[np.flatnonzero(keep)] = np.arange(int(keep.sum()))
        n_first, n_new = len(xc), len(own_new)
        flux, err = np.full(n_first + n_new, np.nan), np.full(n_first + n_new, np.nan)
        flux[n_first:], err[n_first:] = pf.flux_adu[own_new], pf.flux_err_adu[own_new]
        psf_flux = np.r_[pf.first_flux_adu[np.flatnonzero(keep)], np.full(n_new, np.nan)]
        r = rows[pf.parent]
        mine = (r >= 0) & np.isfinite(pf.parent_flux_adu)
        flux[r[mine]], err[r[mine]] = pf.parent_flux_adu[mine], pf.parent_flux_err_adu[mine]
        xc, yc = xc.copy(), yc.copy()
        xc[r[mine]], yc[r[mine]] = pf.parent_x[mine], pf.parent_y[mine]
        on_parents, on_new = pf.light_in_apertures(shape, new_xy[0], new_xy[1], r_ap_px, fwhm_px)
        light = np.zeros(n_first + n_new)
        light[n_first:] = on_new[own_new]
        np.add.at(light, r[mine], on_parents[mine])  # (one new source per first-pass star: no repeats)
        return PairPhotometry(flux, err, psf_flux, light, pf.model_error * light), xc, yc

    def total_flux(self, inp: DetectorInput, found: Detections, ap: Aperture) -> TotalFlux:
        """The aperture flux corrected to total (ADU) and the aperture flux's S/N.

        The correction is measured on the block's own stars: those without a photometry
        or centroid flag (the detector's and the aperture's).
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(ap.flux_err > 0, ap.flux / ap.flux_err, 0.0)
        ok = ((found.flags | ap.flags) & (F.PHOTOMETRY_BAD | F.CENTROID | F.HALO)) == 0
        apcorr, n_ap, refused = aperture.aperture_correction(inp.data, inp.bad, found.x, found.y, ap.flux, snr, ok,
                                                             found.fwhm_px, inp.cfg.photometry)
        return TotalFlux(flux=ap.flux * apcorr, flux_err=ap.flux_err * apcorr, snr=snr, apcorr=apcorr,
                         n_apcorr=n_ap, apcorr_refused=refused)

    @staticmethod
    def _suppress(inp: DetectorInput, objs: np.ndarray, segmap: np.ndarray | None) -> np.ndarray:
        """The window's detections less the artefacts of bright stars and extended sources (:mod:`.artefacts`).

        The FWHM the tests scale with is measured on all the window's detections, as
        :meth:`detect` measures it on the owned ones. They judge the image sep thresholded
        (``detect_data`` where given: the detections' own pixels).
        """
        if len(objs) == 0 or segmap is None:
            return objs
        data = inp.data if inp.detect_data is None else inp.detect_data
        snr_iso = objs["flux"] / np.sqrt(objs["npix"] * inp.noise_adu**2
                                         + np.clip(objs["flux"], 0, None) / inp.gain_e_per_adu)
        clean = (objs["flag"] & sep.OBJ_TRUNC) == 0
        fwhm, _ = aperture.estimate_fwhm(data, inp.bad, np.asarray(objs["x"], float),
                                         np.asarray(objs["y"], float), snr_iso, clean, inp.cfg.photometry)
        res = artefacts.suppress(data, inp.bad, inp.noise_adu, objs, segmap, fwhm, inp.cfg.detection)
        return objs[res.keep]

    @staticmethod
    def _neighbours(inp: DetectorInput, objs: np.ndarray, targets: np.ndarray, found: Detections) -> Neighbours:
        """Every sep detection of the window (owned ones at their centroids) with linear PSF-fit fluxes."""
        x_all, y_all = np.asarray(objs["x"], float).copy(), np.asarray(objs["y"], float).copy()
        x_all[targets], y_all[targets] = found.x, found.y
        fit = refine_positions(inp.data, inp.bad, inp.noise_adu, inp.gain_e_per_adu, x_all, y_all,
                               np.asarray(objs["flux"], float), found.fwhm_px, n_iter=0, beta=inp.cfg.bpnn.psf_beta)
        return Neighbours(x=x_all, y=y_all, flux_fit=fit.flux, targets=targets)
