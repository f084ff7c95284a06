"""Astrometry: pixel <-> sky through each epoch's FITS WCS (astropy), and the field's reference frame.

Every epoch carries its own WCS (header text in the store). Detections get (ra, dec)
from it; the cross-match works in the *reference frame* of the field: the pixel frame of
the field's ``reference_wcs`` attribute (the simulator's nominal pointing; for ingested
data the first epoch that has a WCS). Without any WCS, positions stay in the epoch's
pixel frame (``NO_WCS`` flag), which is only right for a registered (aligned) stack.
"""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from survey_proc.errors import SurveyProcError

#: what the store's ``wcs`` entries may be, for error messages
WCS_TEXT_FORMS = ("FITS header cards separated by newlines, or 80-character cards run together (as astropy's "
                  "WCS.to_header_string() writes them)")
_WCS_KEY = re.compile(r"(WCSAXES|NAXIS\d*|CTYPE\d|CUNIT\d|CRPIX\d|CRVAL\d|CDELT\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+|"
                      r"[AB]P?_\d+_\d+|[AB]P?_ORDER|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|MJD-OBS|DATE-OBS)")
_FREE_CARD = re.compile(r"\s*([A-Za-z0-9_-]{1,8})\s*=\s*('(?:[^']|'')*'|[^/]*?)\s*(?:/.*)?")


class WcsParseError(SurveyProcError, ValueError):
    """Stored WCS header text that cannot be made into a celestial WCS; the message says where and what to do."""


def _card_strings(text: str) -> list[str]:
    """The card images of header text: newline-separated lines, or 80-character cards run together.

    Trailing spaces and blank lines are dropped; reading stops at ``END``.
    """
    out: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.rstrip()
        chunks = [line[i:i + 80] for i in range(0, len(line), 80)] if len(line) > 80 else [line]
        for chunk in chunks:
            card = chunk.rstrip()
            if not card.strip():
                continue
            if card.strip() == "END":
                return out
            out.append(card)
    return out


def _free_card(image: str) -> fits.Card | None:
    """A card from a non-standard ``KEY = value [/ comment]`` line (unquoted strings, odd columns); None if not one."""
    m = _FREE_CARD.fullmatch(image)
    if not m:
        return None
    key, raw = m.group(1).upper(), m.group(2).strip()
    value: str | int | float | bool
    if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
        value = raw[1:-1].replace("''", "'").rstrip()
    elif raw in ("T", "F"):
        value = raw == "T"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw.replace("D", "E").replace("d", "e"))
            except ValueError:
                value = raw
    return fits.Card(key, value)


def header_from_text(text: str, where: str = "") -> fits.Header:
    r"""A FITS header from stored header text, read liberally.

    Accepts cards separated by newlines (``Header.tostring(sep="\\n")``, the store's own
    form) and 80-character cards run together without newlines (``WCS.to_header_string()``,
    a FITS file's header block), with or without ``END`` and padding, with trailing spaces,
    CRLF line ends and non-standard cards (``KEY = value`` in free columns, unquoted string
    values). Cards astropy cannot read are fixed where ``verify("fix")`` can, else read as
    ``KEY = value``; an unreadable card that matters to a WCS is an error, others are dropped.

    Parameters
    ----------
    text
        The header text.
    where
        What the text belongs to (e.g. ``"field 'F000' epoch 3"``), for error messages.

    Returns
    -------
    astropy.io.fits.Header
        The cards read.

    Raises
    ------
    WcsParseError
        When a WCS card cannot be read.
    """
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for image in _card_strings(text):
            card: fits.Card | None = None
            standard = image[8:10] == "= " or not _FREE_CARD.fullmatch(image)  # "KEY     = value" or no value
            if standard:
                try:
                    card = fits.Card.fromstring(image.ljust(80))
                    card.verify("silentfix")
                    _ = card.value  # parses the value: raises for an unreadable card
                    lead = re.split(r"[\s=]", image.strip(), maxsplit=1)[0].upper()
                    if _WCS_KEY.fullmatch(lead) and ("=" not in image or card.keyword != lead):
                        card = None  # a WCS keyword without a value, or misread
                except Exception:
                    card = None
            if card is None:
                card = _free_card(image)
            if card is None:
                key = re.split(r"[\s=]", image.strip(), maxsplit=1)[0].upper()
                if _WCS_KEY.fullmatch(key):
                    prefix = f"{where}: " if where else ""
                    raise WcsParseError(f"{prefix}the WCS card {image.strip()!r} cannot be read; the store's wcs "
                                        f"entries are {WCS_TEXT_FORMS}. Fix the card (KEY = value), re-ingest the "
                                        "exposure, or set the entry to \"\" (no WCS)")
                continue
            if card.keyword in ("", "COMMENT", "HISTORY", "END", "CONTINUE"):
                continue
            header.append(card, end=True)
    return header


@functools.lru_cache(maxsize=256)
def parse_wcs(header_text: str, where: str = "") -> WCS | None:
    """An astropy WCS from stored FITS header text; None for "" (no WCS).

    The text is read liberally (:func:`header_from_text`: newline-separated or 80-character
    cards, trailing spaces, missing ``END``, non-standard cards), then ``WCS(header,
    relax=True)`` with astropy's fixes applied.

    Parameters
    ----------
    header_text
        FITS header cards (the store's ``wcs`` variable, or a field's ``reference_wcs``).
    where
        What the text belongs to (e.g. ``"field 'F000' epoch 3"``), named in the error.

    Returns
    -------
    astropy.wcs.WCS or None
        The celestial part of the WCS.

    Raises
    ------
    WcsParseError
        (a ``ValueError``) When the text is not a usable celestial WCS; the message names
        ``where`` and what to do.
    """
    if not header_text or not header_text.strip():
        return None
    prefix = f"{where}: " if where else ""
    header = header_from_text(header_text, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FITSFixedWarning: astropy's fixes (units, dates, RADECSYS...)
            w = WCS(header, relax=True, fix=True)
    except Exception as exc:  # astropy raises many types for a malformed WCS
        why = " ".join(str(exc).split())
        raise WcsParseError(f"{prefix}the stored WCS cannot be parsed ({type(exc).__name__}: {why}); the store's wcs "
                            f"entries are {WCS_TEXT_FORMS} with CTYPE1/2, CRPIX1/2, CRVAL1/2 and "
                            "CD or CDELT. Re-ingest the exposure, fix the entry, or set it to \"\" (no WCS)") from None
    if not w.has_celestial:
        raise WcsParseError(f"{prefix}the stored WCS has no celestial axes (no CTYPE1/2 such as RA---TAN/DEC--TAN "
                            f"among {len(header)} card(s) read); the store's wcs entries are {WCS_TEXT_FORMS}. "
                            "Re-ingest the exposure, fix the entry, or set it to \"\" (no WCS)")
    missing = _missing_wcs_numbers(header, (int(w.wcs.lng) + 1, int(w.wcs.lat) + 1))
    if missing:
        raise WcsParseError(f"{prefix}the stored WCS lacks a number for {', '.join(missing)} (astropy would silently "
                            f"use 0 or 1 deg/px); the store's wcs entries are {WCS_TEXT_FORMS} with CTYPE1/2, "
                            "CRPIX1/2, CRVAL1/2 and CD or CDELT. Re-ingest the exposure, fix the entry, or set it to "
                            "\"\" (no WCS)")
    return w.celestial


def _missing_wcs_numbers(header: fits.Header, axes: tuple[int, int]) -> list[str]:
    """The reference pixel, reference value and scale keywords of the celestial ``axes`` (1-based) without a number."""

    def number(key: str) -> bool:
        return key in header and isinstance(header[key], (int, float)) and not isinstance(header[key], bool)

    missing = [f"{k}{i}" for k in ("CRPIX", "CRVAL") for i in axes if not number(f"{k}{i}")]
    for i in axes:
        scale = [f"CDELT{i}"] + [f"CD{i}_{j}" for j in axes]
        if not any(number(k) for k in scale):
            missing.append(f"CDELT{i} or CD{i}_*")
    return missing


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
