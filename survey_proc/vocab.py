"""The shared vocabulary at the bottom of the package: every module may import it, it imports nothing of ours.

- **Mask bits** of the store's ``mask`` array (uint8, per pixel): :data:`MASK_BAD`,
  :data:`MASK_SATURATED`, :data:`MASK_COSMIC`.
- **Source flags**: the ``flags`` bit mask (int32) of sources and light-curve points. A flag
  never removes a row: it says why a measurement may be less trustworthy. Clean photometry
  is ``flags & PHOTOMETRY_BAD == 0``.
- **Magnitude constants**: :data:`MAG_PER_FLUX`, ``2.5 / ln 10`` (1.0857), so that
  ``sigma_mag = MAG_PER_FLUX * sigma_flux / flux``.
- **Detector names** and the configuration sections each reads (:data:`DETECTOR_SECTIONS`).
- **Class names**: the simulator's truth classes (:data:`VAR_CLASSES`), the classifier's
  output classes (:data:`CLASSIFIER_CLASSES`) and the periodic ones both share
  (:data:`PERIODIC_CLASSES`).
"""

from __future__ import annotations

import math

# ------------------------------------------------------------------ store mask bits (uint8)
MASK_BAD = 1  # a bad pixel (bad column, hot pixel, a value the detector could not record)
MASK_SATURATED = 2  # at or above the saturation level
MASK_COSMIC = 4  # a cosmic-ray hit

# ------------------------------------------------------------------ source flags (int32)
SATURATED = 1 << 0  # the photometric aperture holds a saturated pixel
MASKED = 1 << 1  # the aperture holds a bad pixel (bad column, NaN or inf in the image)
COSMIC = 1 << 2  # the aperture holds a pixel flagged as a cosmic-ray hit
BLENDED = 1 << 3  # deblended from a larger connected region (its isophote touched another source)
EDGE = 1 << 4  # the object or aperture is truncated by the image edge
CENTROID = 1 << 5  # the windowed centroid failed or moved > 1 px: the isophotal centre kept, bar a move onto a peak
NONPOSITIVE = 1 << 6  # flux <= 0: magnitudes are NaN
EXTRACT_FALLBACK = 1 << 7  # the epoch was extracted with relaxed settings after a sep overflow
ZP_MODEL = 1 << 8  # the epoch's zero point comes from the cross-epoch model (too few reference stars)
NO_WCS = 1 << 9  # the epoch has no WCS: ra/dec are NaN, the cross-match uses pixel positions
FORCED = 1 << 10  # forced photometry at an object position in an epoch that did not detect it (source_id null)
STAMP_FILLED = 1 << 11  # the BPNN stamp had masked or off-image pixels, filled with the PSF model
ZP_FEW = 1 << 12  # the epoch's zero point rests on fewer than calibration.min_stars stars; its error is widened
ZP_RELATIVE = 1 << 13  # no absolute calibration for this field and band: mag = relative mag + nominal zero point
EXTENDED = 1 << 14  # more extended than the PSF (concentration test): a galaxy, a nebula knot, an unresolved blend
PSF_FIT = 1 << 15  # photometry.psf_model = "epsf": the PSF fit failed here, the detector's flux is kept
HALO = 1 << 16  # detection.halo_sky: on a saturated star's modelled halo (>= 0.1 sigma per pixel); its sky rests on it

NAMES: dict[int, str] = {
    SATURATED: "SATURATED", MASKED: "MASKED", COSMIC: "COSMIC", BLENDED: "BLENDED", EDGE: "EDGE",
    CENTROID: "CENTROID", NONPOSITIVE: "NONPOSITIVE", EXTRACT_FALLBACK: "EXTRACT_FALLBACK",
    ZP_MODEL: "ZP_MODEL", NO_WCS: "NO_WCS", FORCED: "FORCED", STAMP_FILLED: "STAMP_FILLED", ZP_FEW: "ZP_FEW",
    ZP_RELATIVE: "ZP_RELATIVE", EXTENDED: "EXTENDED", PSF_FIT: "PSF_FIT",
    HALO: "HALO",
}

# flags that make a point unfit for photometric statistics (object means, calibration)
PHOTOMETRY_BAD = SATURATED | MASKED | COSMIC | EDGE | NONPOSITIVE


def describe(flags: int) -> list[str]:
    """Names of the bits set in ``flags``.

    Parameters
    ----------
    flags
        A source-flag bit mask.

    Returns
    -------
    list of str
        The flag names, in bit order.
    """
    return [name for bit, name in NAMES.items() if flags & bit]


# ------------------------------------------------------------------ magnitudes
MAG_PER_FLUX = 2.5 / math.log(10.0)  # 1.0857: d(mag) = 1.0857 d(flux) / flux

# ------------------------------------------------------------------ detectors
# name -> the configuration sections only that detector reads (a run with another detector leaves them out of
# its fingerprint); survey_proc.detect.registry maps the same names to the implementations (a test checks)
DETECTOR_SECTIONS: dict[str, tuple[str, ...]] = {"sep": (), "pnet": ("pnet",)}

# ------------------------------------------------------------------ variability classes
VAR_CLASSES = ("constant", "eclipsing_binary", "pulsator", "transit", "flare", "trend")  # simulator truth
CLASSIFIER_CLASSES = ("constant", "eclipsing_binary", "pulsator", "transit", "non_periodic")  # classifier output
PERIODIC_CLASSES = ("eclipsing_binary", "pulsator", "transit")
# the classify stage's var_class beyond the classifier's: a periodic-looking signal with fewer than two events
# (eclipses, transits) or 1.15 cycles in the object's own baseline; its period is NaN (issue 22)
SINGLE_EVENT = "single_event"
# a periodic call whose varying light lies on a neighbour, not on the object (issue 22: the blend vetting of the
# classify stage, stages/blend_io.py); not in PERIODIC_CLASSES: the signal is real, the period is kept, but it
# belongs to a star about blend_offset_px away
BLENDED_VARIABLE = "blended_variable"
