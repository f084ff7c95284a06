"""The learned detector as a :class:`~survey_proc.detect.base.Detector`: PNet, then a PSF fit.

PNet is fully convolutional, so the block window goes through it as one image: the same
pixels its tiles would be cut into, without computing the shared halos twice
(:func:`survey_proc.detect.pnet.predict` on the window normalised by its background and
noise, :func:`survey_proc.detect.pnet.normalise`). Then, on every detection of the window
(halo ones too: they are neighbours to subtract):

- the window's FWHM is measured on the bright isolated detections, selected by the
  flux head's S/N with a ``4 x fwhm_default_px^2`` noise area;
- ``flux`` is the flux head's total flux (ADU; good to ~0.1 dex) and ``flux_err`` the
  PSF-fit noise estimate ``sqrt(flux / gain + noise^2 * n_eff)`` with
  ``n_eff = pnet.flux_neff_fwhm2 * FWHM^2`` (a Moffat(3) PSF's noise-equivalent area);
- with ``pnet.refine``, detections of S/N >= ``pnet.refine_snr_min`` are refined by a
  simultaneous PSF fit of the whole window (:mod:`survey_proc.photometry.psffit`): its
  positions, and its flux where it converged positive (near the Cramér-Rao bound);
  a detection whose fitted S/N is below ``pnet.min_fit_snr`` is dropped (a peak the fit,
  its neighbours subtracted, finds no light in is an artefact of a brighter star's wings).

Ownership is decided at the final positions. The kept detections carry PNet's own
position (``x_det, y_det``), the heatmap peak as ``confidence``, ``npix`` 0 and the raw
image value at the nearest pixel as ``peak_adu``. :meth:`PNetDetector.total_flux` keeps
these fluxes: they are total, the aperture correction is 1. The BPNN's neighbours are
every detection at its final position and flux (no extra fit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from survey_proc.detect.base import Aperture, Detections, DetectorInput, Neighbours, TotalFlux, nearest_pixel
from survey_proc.photometry import aperture
from survey_proc.photometry.psffit import refine_positions

if TYPE_CHECKING:
    from survey_proc.detect.pnet import LoadedDetector


class PNetDetector:
    """PNet detections with PSF-fit refinement. See the module docstring.

    Parameters
    ----------
    model
        The loaded network (:func:`survey_proc.model_registry.load` of kind ``"detector"``).
    """

    name: ClassVar[str] = "pnet"
    model_kind: ClassVar[str | None] = "detector"
    weights_setting: ClassVar[str | None] = "pnet.weights"

    def __init__(self, model: LoadedDetector):
        self.model = model

    @property
    def fwhm_range_px(self) -> tuple[float, float] | None:
        """The FWHM range (px) of the model's training PSFs (its card), for the domain check."""
        from survey_proc.detect.domain import card_fwhm_range

        return card_fwhm_range(self.model.card, "training", "tile", "fwhm_px")

    def detect(self, inp: DetectorInput) -> Detections:
        """The owned PNet detections at their refined positions (window frame, px) and the window's FWHM.

        Parameters
        ----------
        inp
            The prepared window. ``cfg.pnet.threshold`` (0: the model's) is the heatmap threshold.

        Returns
        -------
        Detections
            With ``flux``, ``flux_err`` (ADU), ``snr``, ``confidence`` and every detection of
            the window as :attr:`~survey_proc.detect.base.Detections.neighbours`.
        """
        from survey_proc.detect import pnet

        cfg, pcfg = inp.cfg, inp.cfg.photometry
        noise, gain = inp.noise_adu, inp.gain_e_per_adu
        norm = pnet.normalise(inp.image, inp.bad, inp.bkg_adu, noise)
        d = pnet.predict(self.model, norm, threshold=cfg.pnet.threshold or None, noise_adu=noise)[0]
        if len(d) == 0:
            return Detections.empty(pcfg.fwhm_default_px, confidence=True)
        flux = d.flux
        snr0 = flux / np.sqrt(np.clip(flux, 0, None) / gain + noise**2 * 4 * pcfg.fwhm_default_px**2)
        fwhm, n_fwhm = aperture.estimate_fwhm(inp.data, inp.bad, d.x, d.y, snr0, np.ones(len(d), bool), pcfg)
        n_eff = cfg.pnet.flux_neff_fwhm2 * fwhm**2
        flux_err = np.sqrt(np.clip(flux, 0, None) / gain + noise**2 * n_eff)
        snr = flux / flux_err
        xw, yw = d.x.copy(), d.y.copy()
        real = np.ones(len(d), bool)
        if cfg.pnet.refine:
            fit = snr >= cfg.pnet.refine_snr_min
            r = refine_positions(inp.data, inp.bad, noise, gain, d.x, d.y, flux, fwhm, fit=fit, beta=cfg.pnet.psf_beta)
            xw, yw = r.x, r.y
            use = fit & r.ok & (r.flux > 0)  # the fit's flux where it ran and converged (see docs/pnet.md)
            flux = np.where(use, r.flux, flux)
            flux_err = np.sqrt(np.clip(flux, 0, None) / gain + noise**2 * n_eff)
            snr = flux / flux_err
            real = ~(fit & r.ok & (snr < cfg.pnet.min_fit_snr))
        tile, keep = inp.owner(xw, yw)
        keep = keep & real
        if not keep.any():
            return Detections.empty(pcfg.fwhm_default_px, confidence=True)
        x, y = xw[keep], yw[keep]
        iy, ix = nearest_pixel(x, y, inp.image.shape)
        return Detections(tile=tile[keep], x=x, y=y, x_det=d.x[keep], y_det=d.y[keep],
                          flags=np.zeros(len(x), np.int32), npix=np.zeros(len(x), np.int32),
                          peak_adu=inp.image[iy, ix].astype(float), fwhm_px=fwhm, n_fwhm=n_fwhm, flux=flux[keep],
                          flux_err=flux_err[keep], snr=snr[keep], confidence=d.confidence[keep].astype(np.float32),
                          neighbours=Neighbours(x=xw, y=yw, flux_fit=flux, targets=np.flatnonzero(keep)))

    def total_flux(self, inp: DetectorInput, found: Detections, ap: Aperture) -> TotalFlux:
        """PNet's own total fluxes (ADU) and S/N; the aperture correction is 1 (``n_apcorr``: every row)."""
        if found.flux is None or found.flux_err is None or found.snr is None:
            raise ValueError("PNetDetector.total_flux needs the Detections of PNetDetector.detect")
        return TotalFlux(flux=found.flux, flux_err=found.flux_err, snr=found.snr, apcorr=1.0, n_apcorr=len(found))
