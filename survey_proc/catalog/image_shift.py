"""The translation between two images of one field by phase correlation (no star lists needed).

Used by :func:`survey_proc.catalog.registration.register_by_image` when asterism matching
of two star lists fails (crowded frames whose brightest sources are blends or saturated
cores, lists dominated by artefacts). The shift itself is
:func:`skimage.registration.phase_cross_correlation` (upsampled DFT refinement, Guizar-Sicairos
et al. 2008); what this module adds is the preparation real frames need and a significance:

- **Window.** A central window of at most ``max_size_px`` per side (the translation of a
  frame is the translation of its centre; a 2048-px window costs ~0.5 s), with a Hann taper
  so the frame edges do not correlate with themselves.
- **Robust scaling.** Bad pixels (NaN, inf, masked) are filled; the sky is removed with
  sep's background mesh (64 px) and the image divided by its noise; then ``asinh(z / 5)``:
  linear to ~5 sigma, logarithmic above, so saturated cores and halos of the few brightest
  stars do not outweigh the hundreds of fainter ones.
- **Band-limited phase correlation.** Pure phase correlation whitens the cross-power
  spectrum, so the high frequencies, which in images of stars several pixels wide hold only
  independent noise, weigh as much as the stars. The whitened spectra are multiplied by a
  Gaussian low-pass (``smooth_px``: the correlation surface smoothed by a Gaussian of that
  sigma) before skimage's upsampled peak search (``space="fourier"``,
  ``normalization=None``: the normalisation is done here, once).
- **Significance.** The peak of the correlation surface above its median, in units of the
  surface's robust scatter (1.4826 MAD): pure noise gives ~4-5 sigma for a 1024-px window
  (the maximum of ~10^6 values); an aligned pair of star fields gives tens.

Sign convention: the returned ``dx, dy`` are added to a pixel position in the moving image
to get the position of the same star in the reference image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep
from skimage.filters import window
from skimage.registration import phase_cross_correlation

from survey_proc.errors import SurveyProcError

BKG_MESH_PX = 64  # sep background mesh of the preparation (px)
ASINH_SOFTENING = 5.0  # asinh(z / 5): linear below ~5 sigma, logarithmic above


class ImageShiftError(SurveyProcError):
    """Two images could not be aligned by phase correlation."""


@dataclass(frozen=True)
class ImageShift:
    """Result of :func:`image_shift`.

    Attributes
    ----------
    dx, dy
        Translation (px) that takes a position in the moving image to the reference image:
        ``x_ref = x + dx``, ``y_ref = y + dy``.
    significance
        Height of the correlation peak above the surface's median in robust sigma.
    window
        ``(y0, y1, x0, x1)``: the (central) window of both images that was correlated (px).
    """

    dx: float
    dy: float
    significance: float
    window: tuple[int, int, int, int]


def central_window(shape: tuple[int, ...], max_size_px: int) -> tuple[int, int, int, int]:
    """The central window ``(y0, y1, x0, x1)`` of at most ``max_size_px`` per side of an image of ``shape``.

    Parameters
    ----------
    shape
        ``(ny, nx)`` of the image (px).
    max_size_px
        Largest side of the window (px).

    Returns
    -------
    tuple of int
        Rows ``y0:y1`` and columns ``x0:x1``.
    """
    ny, nx = int(shape[0]), int(shape[1])
    wy, wx = min(ny, max_size_px), min(nx, max_size_px)
    y0, x0 = (ny - wy) // 2, (nx - wx) // 2
    return y0, y0 + wy, x0, x0 + wx


def prepare_image(image: np.ndarray, bad: np.ndarray | None = None) -> np.ndarray:
    """An image scaled for correlation: sky removed, in noise units, asinh-compressed, bad pixels 0.

    Parameters
    ----------
    image
        The pixels (ADU, any float or int type; NaN/inf allowed).
    bad
        Pixels not to use (True), e.g. mask bits or saturation; non-finite pixels are always bad.

    Returns
    -------
    ndarray
        float64 ``asinh(((image - sky) / noise) / 5)`` with bad pixels set to 0.
    """
    img = np.asarray(image, dtype=np.float32)
    badm = ~np.isfinite(img)
    if bad is not None:
        badm |= np.asarray(bad, bool)
    if badm.all():
        raise ImageShiftError("no usable pixel in the image (all NaN, inf or masked)")
    data = np.ascontiguousarray(np.where(badm, np.float32(np.median(img[~badm])), img))
    mesh = int(min(BKG_MESH_PX, max(8, min(img.shape) // 4)))
    bkg = sep.Background(data, mask=badm, bw=mesh, bh=mesh, fw=3, fh=3)
    z = data - bkg.back()
    noise = float(bkg.globalrms)
    if not np.isfinite(noise) or noise <= 0:
        dev = np.abs(z[~badm] - np.median(z[~badm]))
        noise = float(1.4826 * np.median(dev)) or 1.0
    out = np.arcsinh(z.astype(np.float64) / (ASINH_SOFTENING * noise))
    out[badm] = 0.0
    return out


def _whitened_spectrum(prepared: np.ndarray, taper: np.ndarray, lowpass: np.ndarray) -> np.ndarray:
    f = np.fft.fft2(prepared * taper)
    return f / np.maximum(np.abs(f), 1e-12 * np.abs(f).max()) * lowpass


def image_shift(image: np.ndarray, ref_image: np.ndarray, *, bad: np.ndarray | None = None,
                ref_bad: np.ndarray | None = None, max_size_px: int = 1024, smooth_px: float = 1.5,
                upsample: int = 20, min_significance: float = 12.0) -> ImageShift:
    """Translation of ``image`` onto ``ref_image`` by band-limited phase correlation (see the module docstring).

    Parameters
    ----------
    image, ref_image
        The moving and the reference image, same shape (ADU).
    bad, ref_bad
        Pixels of each not to use (True), or None.
    max_size_px
        Side of the central window correlated (px); shifts up to half of it are found.
    smooth_px
        Sigma of the Gaussian that smooths the correlation surface (px).
    upsample
        Sub-pixel refinement factor (the shift is found to 1/``upsample`` px).
    min_significance
        A peak below this many robust sigma is an error.

    Returns
    -------
    ImageShift
        ``dx, dy`` (px, moving -> reference), the peak's significance and the window.

    Raises
    ------
    ImageShiftError
        When the shapes differ, an image has no usable pixel, or the peak is not significant.
    """
    if np.shape(image) != np.shape(ref_image) or np.ndim(image) != 2:
        raise ImageShiftError(f"the images have different shapes ({np.shape(image)} and {np.shape(ref_image)}); "
                              "phase correlation needs two 2-D images of one size")
    y0, y1, x0, x1 = central_window(np.shape(image), max_size_px)
    sub = (slice(y0, y1), slice(x0, x1))
    a = prepare_image(np.asarray(ref_image)[sub], None if ref_bad is None else np.asarray(ref_bad)[sub])
    b = prepare_image(np.asarray(image)[sub], None if bad is None else np.asarray(bad)[sub])
    taper = window("hann", a.shape)
    fy, fx = np.fft.fftfreq(a.shape[0])[:, None], np.fft.fftfreq(a.shape[1])[None, :]
    lowpass = np.exp(-np.pi**2 * smooth_px**2 * (fx**2 + fy**2))  # squared: the surface smoothed by smooth_px
    fa, fb = _whitened_spectrum(a, taper, lowpass), _whitened_spectrum(b, taper, lowpass)
    surface = np.fft.ifft2(fa * fb.conj()).real
    med = float(np.median(surface))
    scatter = float(1.4826 * np.median(np.abs(surface - med)))
    significance = (float(surface.max()) - med) / scatter if scatter > 0 else 0.0
    if not significance >= min_significance:
        raise ImageShiftError(f"image cross-correlation found no significant peak ({significance:.1f} sigma, need "
                              f"{min_significance:g}); the images may not overlap or hold too few stars")
    shift, _, _ = phase_cross_correlation(fa, fb, upsample_factor=upsample, space="fourier", normalization=None)
    return ImageShift(dx=float(shift[1]), dy=float(shift[0]), significance=float(significance),
                      window=(y0, y1, x0, x1))
