"""World coordinate systems of simulated fields and epochs (TAN projection).

Each field has a reference frame: a TAN WCS centred on the field with ``CRPIX`` at the
detector centre and the nominal pixel scale and rotation. An epoch's WCS keeps the same
tangent point (``CRVAL``) but shifts ``CRPIX`` by the pointing offset and rotates the CD
matrix by the rotation jitter, so the mapping from reference pixels to epoch pixels is an
exact affine transform (:func:`reference_to_epoch`), which the renderer uses, and the epoch
WCS stored in the survey maps sky to the very same pixel positions.
"""

from __future__ import annotations

import warnings

import numpy as np
from astropy.wcs import WCS

from survey_proc.simulate.scenario import Scenario

FIELD_SPACING_FACTOR = 1.1  # fields tile the sky eastwards with a 10 % gap


def field_center(scn: Scenario, field_index: int) -> tuple[float, float]:
    """(ra, dec) in degrees of the centre of field ``field_index``.

    Parameters
    ----------
    scn
        The scenario.
    field_index
        Index of the field.

    Returns
    -------
    ra, dec
        Degrees; fields are spaced eastwards by 1.1 field widths.
    """
    width_deg = scn.size_px * scn.pixel_scale_arcsec / 3600.0
    cos_dec = max(np.cos(np.deg2rad(scn.field_dec_deg)), 1e-3)
    ra = (scn.field_ra_deg + field_index * FIELD_SPACING_FACTOR * width_deg / cos_dec) % 360.0
    return float(ra), float(scn.field_dec_deg)


def _cd(scale_deg: float, rotation_deg: float) -> np.ndarray:
    """CD matrix with east to the left (RA increases towards -x), north up, then rotated."""
    th = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return rot @ np.array([[-scale_deg, 0.0], [0.0, scale_deg]])


def make_wcs(crval: tuple[float, float], crpix0: tuple[float, float], cd: np.ndarray, size_px: int) -> WCS:
    """A TAN WCS. ``crpix0`` is the 0-based pixel (x, y) of the tangent point.

    Parameters
    ----------
    crval
        Tangent point (ra, dec) in degrees.
    crpix0
        Its 0-based pixel (x, y).
    cd
        The 2 x 2 CD matrix (deg per pixel).
    size_px
        Image size (pixels, square).

    Returns
    -------
    astropy.wcs.WCS
    """
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [crpix0[0] + 1.0, crpix0[1] + 1.0]  # FITS is 1-based
    w.wcs.cd = cd
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (size_px, size_px)
    w.wcs.set()
    return w


def reference_wcs(scn: Scenario, field_index: int) -> WCS:
    """The field's reference frame (no pointing offset).

    Parameters
    ----------
    scn
        The scenario.
    field_index
        Index of the field.

    Returns
    -------
    astropy.wcs.WCS
    """
    c = (scn.size_px - 1) / 2.0
    return make_wcs(field_center(scn, field_index), (c, c),
                    _cd(scn.pixel_scale_arcsec / 3600.0, scn.field_rotation_deg), scn.size_px)


def epoch_wcs(scn: Scenario, field_index: int, dx_px: float, dy_px: float, rotation_deg: float) -> WCS:
    """WCS of one epoch: tangent point at reference pixel centre + (dx, dy), rotated by ``rotation_deg``.

    Parameters
    ----------
    scn
        The scenario.
    field_index
        Index of the field.
    dx_px, dy_px
        Pointing offset of the epoch (px).
    rotation_deg
        Rotation of the epoch relative to the reference frame (deg).

    Returns
    -------
    astropy.wcs.WCS
    """
    c = (scn.size_px - 1) / 2.0
    return make_wcs(field_center(scn, field_index), (c + dx_px, c + dy_px),
                    _cd(scn.pixel_scale_arcsec / 3600.0, scn.field_rotation_deg + rotation_deg), scn.size_px)


def reference_to_epoch(
    scn: Scenario, x: np.ndarray, y: np.ndarray, dx_px: float, dy_px: float, rotation_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Map reference-frame pixels to an epoch's detector pixels (exact for these TAN WCSs).

    Both frames share CRVAL, so intermediate world coordinates agree:
    ``CD_e (p_e - crpix_e) = CD_ref (p - crpix_ref)``.

    Parameters
    ----------
    scn
        The scenario.
    x, y
        Reference-frame positions (px, 0-based).
    dx_px, dy_px, rotation_deg
        The epoch's pointing offset (px) and rotation (deg), as in :func:`epoch_wcs`.

    Returns
    -------
    x_epoch, y_epoch
        Detector positions (px, 0-based).
    """
    c = (scn.size_px - 1) / 2.0
    th = np.deg2rad(rotation_deg)
    # CD_e = R(th) CD_ref  =>  p_e - crpix_e = CD_ref^-1 R(-th) CD_ref (p - crpix_ref)
    scale = scn.pixel_scale_arcsec / 3600.0
    cd_ref = _cd(scale, scn.field_rotation_deg)
    rot = np.array([[np.cos(-th), -np.sin(-th)], [np.sin(-th), np.cos(-th)]])
    a = np.linalg.solve(cd_ref, rot @ cd_ref)
    u = np.asarray(x) - c
    v = np.asarray(y) - c
    return c + dx_px + a[0, 0] * u + a[0, 1] * v, c + dy_px + a[1, 0] * u + a[1, 1] * v


def wcs_header_text(w: WCS) -> str:
    """FITS header text of a WCS (what the store's ``wcs`` variable holds).

    Parameters
    ----------
    w
        A WCS.

    Returns
    -------
    str
        Header cards separated by newlines.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return w.to_header(relax=True).tostring(sep="\n")


def wcs_from_text(text: str) -> WCS | None:
    """Parse a store ``wcs`` entry; None for the empty string (no WCS).

    Parameters
    ----------
    text
        Header cards separated by newlines or 80-character cards run together (read
        liberally: :func:`survey_proc.catalog.astrometry.header_from_text`), or "".

    Returns
    -------
    astropy.wcs.WCS or None
    """
    if not text or not text.strip():
        return None
    from survey_proc.catalog.astrometry import header_from_text

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(header_from_text(text), relax=True, fix=True)


def shift_wcs_text(text: str, dx_px: float, dy_px: float) -> str:
    """A WCS header text with its reference pixel moved by ``(dx_px, dy_px)`` pixels: a WCS that far off.

    Tests and benchmarks use it to make a rough WCS (the sky then lands ``dx_px, dy_px``
    pixels away from where the stars are).

    Parameters
    ----------
    text
        FITS header text (the store's ``wcs`` entry of an epoch; newline-separated or
        80-character cards).
    dx_px, dy_px
        Shift of CRPIX1 and CRPIX2 (pixels).

    Returns
    -------
    str
        The header text with the shifted reference pixel.
    """
    from survey_proc.catalog.astrometry import header_from_text

    h = header_from_text(text)
    h["CRPIX1"] += dx_px
    h["CRPIX2"] += dy_px
    return str(h.tostring(sep="\n"))
