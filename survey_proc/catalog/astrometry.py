"""Astrometry: pixel <-> sky through each epoch's FITS WCS (astropy), and the field's reference frame.

Every epoch carries its own WCS (header text in the store). Detections get (ra, dec)
from it; the cross-match works in the *reference frame* of the field: the pixel frame of
the field's ``reference_wcs`` attribute (the simulator's nominal pointing; for ingested
data the first epoch that has a WCS). Without any WCS, positions stay in the epoch's
pixel frame (``NO_WCS`` flag), which is only right for a registered (aligned) stack.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning


@functools.lru_cache(maxsize=64)
def parse_wcs(header_text: str) -> WCS | None:
    """An astropy WCS from FITS header text; None for "" (no WCS).

    Raises ValueError when the text is not a usable celestial WCS.

    Parameters
    ----------
    header_text
        FITS header cards separated by newlines (the store's ``wcs`` variable).

    Returns
    -------
    astropy.wcs.WCS or None
        The celestial part of the WCS.
    """
    if not header_text or not header_text.strip():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        header = fits.Header.fromstring(header_text, sep="\n")
        w = WCS(header)
    if not w.has_celestial:
        raise ValueError("the header has no celestial WCS (CTYPE1/2 missing)")
    return w.celestial


def pixel_to_world(w: WCS | None, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of 0-based pixel positions; NaN without a WCS.

    Parameters
    ----------
    w
        The epoch's WCS, or None.
    x, y
        Pixel positions (0-based, pixel centres at integers).

    Returns
    -------
    ra, dec
        Degrees (ra in [0, 360)).
    """
    if w is None or len(x) == 0:
        return np.full(len(x), np.nan), np.full(len(x), np.nan)
    ra, dec = w.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    return np.mod(ra, 360.0), dec


def world_to_pixel(w: WCS, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of (ra, dec) in degrees.

    Parameters
    ----------
    w
        A WCS.
    ra, dec
        Sky positions (deg).

    Returns
    -------
    x, y
        Pixel positions (0-based).
    """
    if len(ra) == 0:
        return np.zeros(0), np.zeros(0)
    x, y = w.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
    return x, y


def to_reference_frame(epoch_wcs: WCS | None, ref_wcs: WCS | None, x: np.ndarray, y: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the field's reference pixel frame (through the sky when both WCS exist).

    Parameters
    ----------
    epoch_wcs, ref_wcs
        The epoch's and the field reference frame's WCS; when either is None the positions
        are returned unchanged.
    x, y
        Epoch pixel positions (px).

    Returns
    -------
    x_ref, y_ref
        Reference-frame pixel positions (px).
    """
    if epoch_wcs is None or ref_wcs is None:
        return np.asarray(x, float).copy(), np.asarray(y, float).copy()
    ra, dec = pixel_to_world(epoch_wcs, x, y)
    return world_to_pixel(ref_wcs, ra, dec)
