"""The classical detector: sep (SExtractor) background and extraction.

This is the baseline the learned detector (PNet) is measured against, tuned for crowded
fields:

- the background is estimated on a small mesh (``bkg_mesh_px``, default 32 px) with
  SExtractor's clipped-mode estimator and subtracted *before* extraction, so the local
  sky under a crowded field does not raise the threshold;
- a low threshold (1.5 sigma of the background rms, on the 3x3 matched-filtered image)
  with a 3-pixel minimum area, and aggressive deblending (32 levels, contrast 0.0005);
- no SExtractor "cleaning": it merges faint neighbours into the wings of bright stars.
  Measured on a dense epoch (1024^2, 26k stars, 1 px match): cleaning off gives recall
  0.636 vs 0.593 for stars above the 5-sigma limit at precision 0.992 vs 0.994, and
  halves the extraction time (0.47 s vs 1.14 s);
- bad pixels (mask bits, NaN/inf, saturation) are masked, never passed as numbers.

Overflows
---------
In crowded fields sep can raise "internal pixel buffer full" (too many pixels above
threshold at once) or "object deblending overflow" (too many sub-objects). They are
handled, not fatal: :func:`extract` first raises sep's limits (``set_extract_pixstack``
x10, ``set_sub_object_limit`` x4) and retries; if that fails it retries with twice the
threshold, then without deblending. Whatever rung succeeded is returned as ``fallback``
and the detections get the ``EXTRACT_FALLBACK`` flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

from survey_proc.config import DetectionConfig
from survey_proc.errors import SurveyProcError

_OVERFLOW_MESSAGES = ("pixel buffer full", "deblending overflow", "sub-object", "object deblending")


@dataclass
class Background:
    """A background model of one image window (ADU)."""

    back: np.ndarray  # background level per pixel (ADU)
    rms: np.ndarray  # background noise per pixel (ADU)
    global_rms: float  # median noise (ADU)


def bad_pixels(image: np.ndarray, mask: np.ndarray | None, saturation_adu: float) -> np.ndarray:
    """Boolean map of pixels that must not be used: flagged in ``mask``, non-finite, or saturated."""
    bad = ~np.isfinite(image)
    if mask is not None:
        bad |= mask != 0
    if np.isfinite(saturation_adu):
        with np.errstate(invalid="ignore"):
            bad |= image >= saturation_adu
    return bad


def estimate_background(image: np.ndarray, bad: np.ndarray, cfg: DetectionConfig) -> Background:
    """Sep background and noise maps of ``image`` (ADU) ignoring ``bad`` pixels."""
    data = np.where(bad, 0.0, image).astype(np.float32)
    mesh = int(min(cfg.bkg_mesh_px, max(8, min(image.shape) // 2)))
    bkg = sep.Background(data, mask=bad, bw=mesh, bh=mesh, fw=cfg.bkg_filter_px, fh=cfg.bkg_filter_px)
    back = bkg.back()
    rms = bkg.rms()
    grms = float(bkg.globalrms)
    if not np.isfinite(grms) or grms <= 0:
        good = rms[np.isfinite(rms) & (rms > 0)]
        grms = float(np.median(good)) if good.size else 1.0
    return Background(back=back, rms=rms, global_rms=grms)


def pixstack_for(data: np.ndarray) -> int:
    """The largest sep pixel stack ``data`` can use: one slot per pixel, and a few to spare (sep keeps one free)."""
    return int(data.size) + 16


def _is_overflow(exc: Exception) -> bool:
    msg = str(exc).lower()
    return any(m in msg for m in _OVERFLOW_MESSAGES)


def _run_extract(data: np.ndarray, bad: np.ndarray, noise: float | np.ndarray, thresh: float, cfg: DetectionConfig,
                 deblend_cont: float, segmap: bool) -> tuple[np.ndarray, np.ndarray | None]:
    out = sep.extract(data, thresh, err=noise, mask=bad, minarea=cfg.minarea_px,
                      deblend_nthresh=cfg.deblend_nthresh, deblend_cont=deblend_cont, clean=cfg.clean,
                      segmentation_map=segmap)
    return (out[0], out[1]) if segmap else (out, None)


def extract(data: np.ndarray, bad: np.ndarray, noise_adu: float | np.ndarray, cfg: DetectionConfig
            ) -> tuple[np.ndarray, str | None]:
    """Detect sources on a background-subtracted image (:func:`extract_segmap` without the map)."""
    objs, _, fallback = extract_segmap(data, bad, noise_adu, cfg, segmap=False)
    return objs, fallback


def extract_segmap(data: np.ndarray, bad: np.ndarray, noise_adu: float | np.ndarray, cfg: DetectionConfig,
                   segmap: bool = True) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """Detect sources on a background-subtracted image, with sep's segmentation map.

    Parameters
    ----------
    data
        Background-subtracted image (ADU), C-contiguous float32; bad pixels may hold anything.
    bad
        Boolean map of pixels to ignore.
    noise_adu
        Background noise (ADU); the threshold is ``thresh_sigma * noise_adu``.
    cfg
        Detection settings.

    segmap
        Also return sep's segmentation map (else None in its place).

    Returns
    -------
    objects, segmap, fallback
        sep's structured array (``x``, ``y`` 0-based pixel centres, ``flag``, ``npix``, ...),
        its segmentation map (int32 image: 0 sky, ``k`` the pixels of ``objects[k - 1]``)
        and the fallback rung used (``None``, ``"limits"``, ``"threshold"``, ``"no_deblend"``).
    """
    # sep's limits are process-global: set them every time. sep allocates and links the whole pixel stack on every
    # call (~57 ms for 3M pixels), and an image cannot hold more pixels above the threshold than it has: no more
    sep.set_extract_pixstack(min(cfg.pixstack, pixstack_for(data)))
    sep.set_sub_object_limit(cfg.sub_object_limit)
    rungs = [(None, cfg.thresh_sigma, cfg.deblend_cont),
             ("limits", cfg.thresh_sigma, cfg.deblend_cont),
             ("threshold", 2 * cfg.thresh_sigma, cfg.deblend_cont),
             ("no_deblend", 2 * cfg.thresh_sigma, 1.0)]
    last: Exception | None = None
    for name, thresh, cont in rungs:
        if name == "limits":
            sep.set_extract_pixstack(10 * sep.get_extract_pixstack())
            sep.set_sub_object_limit(4 * sep.get_sub_object_limit())
        try:
            objs, seg = _run_extract(data, bad, noise_adu, thresh, cfg, cont, segmap)
            return objs, seg, name
        except Exception as exc:  # sep raises plain Exception subclasses
            if not _is_overflow(exc):
                raise
            last = exc
    raise SurveyProcError(f"sep extraction overflowed even without deblending ({last}); "
                          "raise [detection] pixstack or thresh_sigma")
