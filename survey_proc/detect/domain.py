"""The domain check: whether an epoch's seeing lies inside the range a learned model was trained on.

A learned model is trusted only where it was trained. Each model card records the FWHM
range of its training PSFs (PNet: ``training.tile.fwhm_px``; the BPNN:
``data.tile.fwhm_px``; 1.3-5 px for the shipped ones). A block whose measured FWHM lies
outside that range is not left to the model silently: the detection is redone with the
classical path (sep), and the BPNN is not used there (the detector's own photometry is
kept). Why the classical path rather than resampling the window into range: resampling
changes the noise's correlation, which PNet has not seen either, and moves every flux
through an interpolation kernel; sep has no training range. What was done is recorded per
block (:class:`~survey_proc.catalog.merge.BlockInfo` ``domain``), per epoch (the record's
``domain``, a column of ``epochs.parquet``, ``run.json`` ``domain_actions``) and said in
the run's summary.

A block whose FWHM could not be measured (too few stars: the default FWHM) is not
judged: there is nothing to compare.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: a measured FWHM is the PSF's convolved with the 1-px pixel box (FWHM-equivalent 2.3548 / sqrt(12) = 0.68 px
#: in quadrature); the cards' ranges are the PSF's before pixel integration
PIXEL_FWHM_PX = 2.3548 / np.sqrt(12.0)


def card_fwhm_range(card: dict[str, Any], *path: str) -> tuple[float, float] | None:
    """The ``[lo, hi]`` FWHM range (px) at ``path`` in a model card, or None when the card has none."""
    node: Any = card
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    try:
        lo, hi = (float(v) for v in node)
    except (TypeError, ValueError):
        return None
    return lo, hi


def outside(fwhm_px: float, fwhm_range_px: tuple[float, float] | None) -> bool:
    """Whether a measured FWHM (px, on the pixels) lies outside a model's training range (None: never outside).

    The range's ends are put on the pixels first (:data:`PIXEL_FWHM_PX` added in quadrature):
    a PSF of 1.3 px measures 1.47 px.
    """
    if fwhm_range_px is None:
        return False
    lo, hi = (float(np.hypot(v, PIXEL_FWHM_PX)) for v in fwhm_range_px)
    return not lo <= fwhm_px <= hi


def describe(what: str, fwhm_px: float, fwhm_range_px: tuple[float, float], action: str) -> str:
    """The record of one domain action, e.g. ``"pnet: FWHM 9.10 px outside its training range 1.3-5 px; ..."``.

    The range is the card's (the PSF before pixel integration); the FWHM is measured on the pixels.
    """
    return (f"{what}: FWHM {fwhm_px:.2f} px outside its training range {fwhm_range_px[0]:g}-{fwhm_range_px[1]:g} px "
            f"(PSF before the pixel); {action}")
