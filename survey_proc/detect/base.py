"""What a detector is: the :class:`Detector` protocol and the data it is given and returns.

A block's extraction (:func:`survey_proc.catalog.extract.extract_block`) prepares one
window (bad pixels, background, noise), hands it to a detector as a
:class:`DetectorInput`, and measures and tabulates what comes back. A detector does two
things:

1. :meth:`Detector.detect` finds the window's sources, keeps those the block owns (it
   asks :attr:`DetectorInput.owner`, at the positions where it decides ownership),
   positions them and measures the block's FWHM: a :class:`Detections`. With
   :attr:`DetectorInput.want_neighbours` it also lists every detection of the window with
   a PSF-fit flux (:class:`Neighbours`), for the BPNN's stamps.
2. :meth:`Detector.total_flux` turns the aperture photometry the block measured at the
   final positions (:class:`Aperture`) and the detector's own measurements into total
   fluxes and S/N (:class:`TotalFlux`): sep corrects the aperture flux to total, PNet
   keeps its PSF-fit or flux-head fluxes.

Coordinates are window-frame pixel indices (0-based pixel centres); fluxes are ADU.
The implementations are :class:`survey_proc.detect.sep_detector.SepDetector` and
:class:`survey_proc.detect.pnet_detector.PNetDetector`; the only map from a detector's
name to its class is :mod:`survey_proc.detect.registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from survey_proc.config import RunConfig

#: ``owner(x, y) -> (tile, owned)``: for window-frame positions (px), the index of the tile
#: whose core holds each one and whether the block keeps it (arrays of the positions' length).
Owner = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DetectorInput:
    """One block window, prepared for a detector (window frame, ADU).

    Attributes
    ----------
    image
        The window's pixels as read (ADU, sky not subtracted; NaN/inf where unusable).
    mask
        The window's mask bits (:mod:`survey_proc.vocab` ``MASK_*``), or None.
    data
        ``image - bkg_adu`` with bad pixels set to 0 (ADU), C-contiguous float32.
    bad
        Boolean map of pixels not to use (flagged, non-finite or saturated).
    bkg_adu
        The subtracted background model (ADU per pixel).
    noise_adu
        The window's background noise (ADU per pixel), one value for the window.
    gain_e_per_adu
        Detector gain (e-/ADU).
    origin_yx
        Image-frame index of the window's first row and column (px).
    cfg
        The run configuration (``detection``, ``photometry``, ``pnet`` and ``bpnn``
        sections; ``photometry.fwhm_default_px`` is the FWHM when too few stars measure it).
    owner
        The block's ownership rule (:data:`Owner`).
    want_neighbours
        Fill :attr:`Detections.neighbours` (a BPNN will run, or the caller keeps the window).
    halo_adu
        The saturated stars' modelled halos included in ``bkg_adu`` (``detection.halo_sky``,
        :mod:`survey_proc.photometry.halo`; ADU per pixel), or None.
    detect_data
        The image sep thresholds when it is not ``data`` (``halo_sky`` with ``halo_detect =
        false``: the window less the mesh sky alone, so the detections are those without the
        halo model), or None. Centroids, FWHM and photometry stay on ``data``.
    """

    image: np.ndarray
    mask: np.ndarray | None
    data: np.ndarray
    bad: np.ndarray
    bkg_adu: np.ndarray
    noise_adu: float
    gain_e_per_adu: float
    origin_yx: tuple[int, int]
    cfg: RunConfig
    owner: Owner
    want_neighbours: bool = False
    halo_adu: np.ndarray | None = None
    detect_data: np.ndarray | None = None


@dataclass
class Neighbours:
    """Every detection of a window, for the BPNN's stamps (window frame).

    Attributes
    ----------
    x, y
        Positions (px) of every detection of the window, owned or not, halo ones too.
    flux_fit
        Their PSF-fit total fluxes (ADU): the light a stamp must account for.
    targets
        Index into ``x`` of each row of the :class:`Detections` (int64, in row order).
    """

    x: np.ndarray
    y: np.ndarray
    flux_fit: np.ndarray
    targets: np.ndarray


@dataclass
class PairPhotometry:
    """PSF fluxes of close pairs that one aperture cannot measure apart (one entry per row).

    Attributes
    ----------
    flux_adu, flux_err_adu
        The pair's joint PSF fit (ADU) for each member of a pair the detector resolved
        (:mod:`survey_proc.detect.hidden`), NaN for every other row.
    psf_flux_adu
        Each row's PSF flux from one linear fit of the window (ADU; NaN where none): it
        scales the pairs' PSF fluxes to the block's total-flux scale.
    light_adu, light_err_adu
        The other member's modelled light inside each member's photometric aperture and its
        error (ADU; 0 for every other row).
    """

    flux_adu: np.ndarray
    flux_err_adu: np.ndarray
    psf_flux_adu: np.ndarray
    light_adu: np.ndarray
    light_err_adu: np.ndarray


@dataclass
class Detections:
    """The sources a detector keeps in one window, one entry per row (window frame).

    Attributes
    ----------
    tile
        Owning tile index of each detection (int32), as :attr:`DetectorInput.owner` gave it.
    x, y
        Final positions (px, 0-based pixel centres): where the block measures the aperture.
    x_det, y_det
        The detector's own positions (px): sep's isophotal centroid, PNet's network output.
    flags
        The detector's source flags (int32, :mod:`survey_proc.vocab`).
    npix
        Pixels of each detection's isophote (int32; 0 when the detector has none).
    peak_adu
        Peak value of each detection (ADU, float64).
    fwhm_px, n_fwhm
        The window's FWHM (px) and the number of stars it was measured on (0: the default).
    flux, flux_err, snr
        The detector's own total flux (ADU), its error (ADU) and S/N; None when the
        detector measures none (then :meth:`Detector.total_flux` starts from the aperture).
    confidence
        Detection confidence (float32, dimensionless), or None when the detector has none;
        when set, the block table has a ``confidence`` column (also when empty).
    fallback
        The relaxed setting the detector had to fall back to, or None.
    neighbours
        Every detection of the window (with :attr:`DetectorInput.want_neighbours`), else None.
    pairs
        The PSF photometry of the close pairs the detector resolved, or None
        (``detection.residual_psf = "epsf"``).
    """

    tile: np.ndarray
    x: np.ndarray
    y: np.ndarray
    x_det: np.ndarray
    y_det: np.ndarray
    flags: np.ndarray
    npix: np.ndarray
    peak_adu: np.ndarray
    fwhm_px: float
    n_fwhm: int
    flux: np.ndarray | None = None
    flux_err: np.ndarray | None = None
    snr: np.ndarray | None = None
    confidence: np.ndarray | None = None
    fallback: str | None = None
    neighbours: Neighbours | None = field(default=None, repr=False)
    pairs: PairPhotometry | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def empty(cls, fwhm_px: float, *, confidence: bool = False, fallback: str | None = None) -> Detections:
        """No detection kept; ``confidence`` says whether the detector has a confidence column."""
        def z(dtype: type = np.float64) -> np.ndarray:
            return np.zeros(0, dtype)

        return cls(tile=z(np.int32), x=z(), y=z(), x_det=z(), y_det=z(), flags=z(np.int32), npix=z(np.int32),
                   peak_adu=z(), fwhm_px=fwhm_px, n_fwhm=0,
                   confidence=np.zeros(0, np.float32) if confidence else None, fallback=fallback)


@dataclass
class Aperture:
    """The aperture photometry the block measured at the final positions (one entry per row).

    Attributes
    ----------
    flux, flux_err
        Flux in the aperture and its error (ADU).
    flags
        ``EDGE`` where the aperture is truncated, and the mask bits inside it (int32).
    radius_px
        The aperture radius (px): ``photometry.aperture_fwhm`` x the window's FWHM.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    flags: np.ndarray
    radius_px: float


@dataclass
class TotalFlux:
    """A detector's total fluxes (one entry per row) and its aperture correction.

    Attributes
    ----------
    flux, flux_err
        Total flux and error (ADU).
    snr
        Signal-to-noise ratio of the detection (dimensionless).
    apcorr, n_apcorr
        Aperture-to-total flux ratio applied (1 when the fluxes are total already) and
        the number of stars it was measured on.
    apcorr_refused
        Why the block's measured correction was refused ("" if none was).
    """

    flux: np.ndarray
    flux_err: np.ndarray
    snr: np.ndarray
    apcorr: float
    n_apcorr: int
    apcorr_refused: str = ""


@runtime_checkable
class Detector(Protocol):
    """A source detector for :func:`survey_proc.catalog.extract.extract_block`.

    Attributes
    ----------
    name
        Its name in the run configuration (``detector = NAME``).
    model_kind
        The kind of model it needs from :mod:`survey_proc.model_registry` (``"detector"``),
        or None when it needs none.
    weights_setting
        The run-configuration setting naming that model's weights file, as
        ``"section.key"`` (``"pnet.weights"``), or None.
    """

    name: ClassVar[str]
    model_kind: ClassVar[str | None]
    weights_setting: ClassVar[str | None]

    def detect(self, inp: DetectorInput) -> Detections:
        """Find, keep (by ``inp.owner``) and position the window's sources; measure its FWHM."""
        ...

    def total_flux(self, inp: DetectorInput, found: Detections, ap: Aperture) -> TotalFlux:
        """Total fluxes of ``found`` given the block's aperture photometry ``ap`` at ``found.x, found.y``."""
        ...


def nearest_pixel(x: np.ndarray, y: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(iy, ix)``: the window pixel nearest each position (px), clipped to a window of ``shape``."""
    iy = np.clip(np.round(y).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.round(x).astype(int), 0, shape[1] - 1)
    return iy, ix
