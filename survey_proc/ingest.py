"""FITS exposures -> survey store (``survey-proc ingest``).

One exposure is one image HDU of a FITS file: a single-HDU file, or every image extension
of a multi-extension file (one per CCD), or the HDUs chosen with ``hdus``. Compressed
files (``.fits.fz`` tile compression, ``.fits.gz``) are read by astropy directly.

Header handling (each rule names the keywords it reads, in order)
-----------------------------------------------------------------
- **Time** (mid-exposure MJD): ``MJD-MID``; ``MJD-OBS`` (start) + half the exposure;
  ``DATE-OBS`` (ISO ``YYYY-MM-DD[Thh:mm:ss]``, or the pre-2000 ``DD/MM/YY`` meaning 19YY)
  with ``TIME-OBS``/``UT``/``UTSTART`` (or SDSS's ``TAIHMS``, a TAI time) when the date has
  no time, + half the exposure;
  ``JD`` (start) + half the exposure. The time scale is ``TIMESYS`` (default UTC); the
  store records it. None of these: an error naming the file.
- **Exposure time** (s): ``EXPTIME``, ``EXPOSURE``, ``ITIME``; a comment saying minutes
  (``min``) converts. Missing: NaN, reported (the time is then the start time).
- **Gain** (e/ADU): ``GAIN``, ``EGAIN``, ``CCDGAIN``; **read noise** (e): ``RDNOISE``,
  ``READNOIS``, ``RON``, ``READNOISE``; **saturation** (ADU): ``SATURATE``, ``SATLEVEL``.
  Options override headers. A missing gain or read noise without an option is an error
  naming the file and the keywords. A missing saturation is estimated from the data when
  the pixels pile up at the image's maximum (:func:`saturation_pileup`: a clipped or
  saturated detector); else it becomes the largest value of an unscaled integer image's
  type (or none for float images). Either way it is reported, and the field records where
  its ``saturation_adu`` came from (attribute ``saturation_source``).
- **Band**: the ``band`` column of the epoch table, else the ``band`` option, else the
  header: ``BAND``, ``FILTER``, ``FILTNAM``, ``FILTNAME``, ``FILTER1``, ``FILTER2`` (the
  first that is set and not a clear/open position, whitespace stripped), else Spitzer's
  ``INSTRUME`` = IRAC with ``CHNLNUM`` n (band ``IRACn``). None: "" (unknown), reported; a
  field that would mix epochs of unknown band with epochs of a known band is an error
  naming the files and the three ways to give the band.
- **Airmass**: ``AIRMASS``, ``SECZ``; else computed (astropy AltAz, plane-parallel sec z)
  from the pointing (``RA``/``DEC`` in degrees or sexagesimal hours/degrees, else
  ``CRVAL1/2``), the mid-exposure time and the site (``SITELAT``/``SITELONG``,
  ``LATITUDE``/``LONGITUD``, ``OBSGEO-B``/``OBSGEO-L``, or the ``site`` option); else NaN,
  reported.
- **WCS**: a celestial WCS in the header (``CTYPE1/2``) is stored as header text; none: "".
- **Seeing FWHM** (:func:`header_fwhm`): ``FWHM``, ``PSF_FWHM``, ``SEEING``, ``L1FWHM`` (the
  first that gives a usable value), stored per epoch (``header_fwhm_px``, with the keyword in
  ``header_fwhm_source``). The extract stage uses it for a block with too few stars to
  measure its own FWHM (a small cutout, a sparse or shallow frame) instead of
  ``photometry.fwhm_default_px``: the aperture (1 FWHM) and the Moffat aperture correction
  scale with it, so a default 2x off biases every flux (DECam cutouts: 0.79 of the truth
  with 2.5 px where the seeing is 4-6 px). The keywords mean different things on different
  instruments, so the *unit* is taken from the card's comment only: the FITS unit
  convention (``[pix]``, ``[arcsec]`` at the start), else the words ``pixel(s)``/``pix``/``px``
  or ``arcsec``/``"``. A comment naming both (``[arcsec/pixel]``: a pixel scale) or neither
  is not guessed: the value is refused. Arcseconds convert with the pixel scale of the
  header's celestial WCS (the square root of the pixel area; none: refused). Values outside
  :data:`FWHM_PLAUSIBLE_PX` (0.5-50 px), non-numbers and NaN are refused. A refusal is
  stored as ``"refused: <keyword = value>: <why>"`` in ``header_fwhm_source`` (the FWHM is
  NaN) and listed in the report (``fwhm_refused``), so the run falls back to the default as
  before and anyone can see why. DECam's Community Pipeline writes ``FWHM`` in the CCD
  extension as "Median FWHM in pixels" (4.18 for the legacypipe test cutout
  c4d_150110_053718 S4), which is the image's own delivered seeing. Deliberately **not**
  read: DECam's primary-header ``DIMMSEE``/``DIMM2SEE`` (the site seeing monitor: free
  atmosphere at zenith, not this image's delivered FWHM; often the string 'NaN') and
  ``G-SEEING`` (the guider's average, 2.1-2.6 arcsec on the test frames where the images'
  FWHM is 1.1-1.7 arcsec: a 2x misread), the plates' ``PLTSCALE`` (arcsec per *mm*), and
  ``PIXSCAL1/2``/``PIXSCALE`` (a scale, not a seeing; the WCS gives the scale). None of the
  other real test images (SDSS, 2MASS, the plates, Spitzer) has a seeing keyword: their
  FWHM is measured from their stars.
- **PSFEx aperture correction** (option ``psfex``, ``survey-proc ingest --psfex``;
  :func:`psfex_epoch_apcorr`): for an image with a PSFEx model, the aperture correction
  (total / aperture flux) of that model with the pipeline's apertures, stored per epoch
  (``header_apcorr``, with the FWHM its radii were scaled with in ``header_apcorr_fwhm_px``
  and the file, CCD and point in ``header_apcorr_source``). The extract stage uses it for a
  block with too few stars to measure its own correction, in place of the Moffat(3) model's
  (DECam cutouts: injected stars' flux ratio 1.043 -> 0.99, benchmarks/results/issue21-*).
  Which model belongs to which image: ``psfex`` lists PSFEx files, folders or globs; an
  image's model is the file whose name less ``-psfex.fits`` (``.fits.gz``, ``.fits.fz``) or
  ``.psf`` is the image's name less its FITS extension, or its start up to a ``.``
  (legacypipe: ``c4d_150110_053718_ooi_z_ls9-psfex.fits`` for
  ``c4d_150110_053718_ooi_z_ls9.S4.fits``; the longest such name wins). The CCD is the
  HDU's ``EXTNAME`` (else ``CCDNAME``, ``DETPOS``), the row of legacypipe's merged table or
  the extension of a multi-chip ``.psf``. A model that cannot be read or has no entry for
  the CCD stops the ingest with an error naming both files (nothing is written); an image
  without a model is ingested with none and listed in the report (``psfex_missing``). The
  correction is computed at the FWHM the extraction falls back to (the header FWHM, else
  ``photometry.fwhm_default_px``) with the default :class:`~survey_proc.config.PhotometryConfig`'s
  radii (``aperture_fwhm``, ``apcorr_fwhm``, no local sky:
  :func:`~survey_proc.photometry.aperture.stored_apcorr_config`); a run with other radii does
  not use it. The model is evaluated at the image's centre in the
  image's own pixel frame (the frame of its WCS: legacypipe's cutouts carry models rewritten
  into the cutout's frame, as their ``CRPIX``; their ``LTV1/2`` = -1 are not that offset), or
  at its constant term (``POLZERO``, the centre of the stars it was fitted on) when the centre
  lies outside the fitted area (``|u|`` or ``|v|`` above :data:`PSFEX_FIT_HALF_RANGE` in
  PSFEx's scaled coordinates: a model of another frame); the source says which.
- **Pixels**: float32 ADU. astropy applies ``BSCALE``/``BZERO``; integer images are
  converted. Mask bits: 1 for NaN/inf pixels and for nonzero pixels of a ``BPM``/``MASK``/``DQ``
  extension of the same shape; 2 for pixels at or above saturation.

Fields: exposures are grouped by the value of ``field_key`` (e.g. ``OBJECT``) and the
detector (``EXTNAME``, else ``CCDNAME``/``DETECTOR``, else the HDU index); without a key, by
pointing (``CRVAL1/2``, else ``RA``/``DEC``, rounded to 0.01 deg) and detector. Epochs are
ordered by time.

Reading is parallel over files on a Dask cluster when a client is given (``survey-proc
ingest`` starts a local one with ``--workers`` > 0); the store is written by the caller.

Appending: every epoch records its source (``file basename[HDU]@mjd``). Ingesting a source
already in the field is skipped, so the same files ingested twice are added once. New
exposures must be later than the field's last epoch (the store keeps time order).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from survey_proc import store
from survey_proc.errors import SurveyProcError

TIME_KEYS = ("MJD-MID", "MJD-OBS", "DATE-OBS", "JD")
EXPTIME_KEYS = ("EXPTIME", "EXPOSURE", "ITIME")
GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN")
RDNOISE_KEYS = ("RDNOISE", "READNOIS", "RON", "READNOISE")
SATURATION_KEYS = ("SATURATE", "SATLEVEL")
BAND_KEYS = ("BAND", "FILTER", "FILTNAM", "FILTNAME", "FILTER1", "FILTER2")
#: filter-wheel positions that name no band (HST's FILTER1 = CLEAR1L beside FILTER2 = F606W, ...)
_NO_BAND = re.compile(r"(clear|open|none|empty|n/?a|dark|blank)\w*", re.IGNORECASE)
AIRMASS_KEYS = ("AIRMASS", "SECZ")
#: keywords that may hold the image's seeing FWHM, read in this order (units from the comment: :func:`header_fwhm`)
FWHM_KEYS = ("FWHM", "PSF_FWHM", "SEEING", "L1FWHM")
#: a header FWHM outside this range (px) is refused (a misread unit or keyword, or a failed measurement)
FWHM_PLAUSIBLE_PX = (0.5, 50.0)
MASK_EXTNAMES = ("BPM", "MASK", "DQ")
#: name endings of PSFEx model files (stripped to match an image's name; :func:`match_psfex`)
PSFEX_SUFFIXES = ("-psfex.fits", "-psfex.fits.gz", "-psfex.fits.fz", ".psf")
_FITS_SUFFIXES = (".fits.fz", ".fits.gz", ".fits.bz2", ".fits", ".fit", ".fts")
#: an image centre further than this from POLZERO in PSFEx's scaled coordinates (u, v; the fitted stars span
#: about -0.5..0.5) lies outside the area the model was fitted on: its constant term is used instead
PSFEX_FIT_HALF_RANGE = 0.6


class IngestError(SurveyProcError):
    """A file that cannot be ingested; the message names the file and what to do."""


class PSFExIngestError(IngestError):
    """A PSFEx model given for an image that cannot be used; stops the whole ingest (nothing is written)."""


EPOCH_TABLE_COLUMNS = ("file", "mjd_mid", "exptime_s", "timescale", "band")


def read_epoch_table(path: str | Path) -> dict[str, dict[str, Any]]:
    """A table of per-file values that override (or stand in for) the headers' times and exposures.

    A CSV (or Parquet) with a ``file`` column (the file's name, without its folder) and any of
    ``mjd_mid`` (mid-exposure MJD, days), ``exptime_s`` (seconds), ``timescale`` (utc, tai,
    tt or tdb; default utc) and ``band`` (the photometric band, whitespace stripped). Empty
    cells keep the header's value.

    Returns
    -------
    dict
        File name -> {column: value} of the cells that are set.

    Raises
    ------
    IngestError
        When the file cannot be read or has unknown columns, no ``file`` column or a file twice.
    """
    import pandas as pd

    p = Path(path)
    try:
        df = (pd.read_parquet(p) if p.suffix == ".parquet"
              else pd.read_csv(p, dtype={"file": str, "band": str}, skipinitialspace=True))
    except Exception as exc:
        raise IngestError(f"epoch table {p}: cannot be read ({exc})") from None
    unknown = [c for c in df.columns if c not in EPOCH_TABLE_COLUMNS]
    if "file" not in df.columns or unknown:
        raise IngestError(f"epoch table {p}: needs a 'file' column and may have {', '.join(EPOCH_TABLE_COLUMNS[1:])}"
                          + (f"; unknown column(s) {', '.join(map(str, unknown))}" if unknown else ""))
    dup = df["file"][df["file"].duplicated()].tolist()
    if dup:
        raise IngestError(f"epoch table {p}: file(s) listed twice: {', '.join(dup[:5])}")
    out: dict[str, dict[str, Any]] = {}
    for row in df.to_dict("records"):
        vals = {str(k): v for k, v in row.items()
                if k != "file" and v is not None and not (isinstance(v, float) and np.isnan(v))}
        if "timescale" in vals:
            vals["timescale"] = str(vals["timescale"]).strip().lower()
        if "band" in vals:
            vals["band"] = str(vals["band"]).strip()
            if not vals["band"]:
                del vals["band"]
        out[Path(str(row["file"])).name] = vals
    return out


@dataclass
class Exposure:
    """One image HDU, read and interpreted."""

    source: str  # "basename[hdu]@mjd": the idempotency key
    path: str
    hdu: int
    detector: str
    pointing: str
    field_value: str | None
    image: np.ndarray
    mask: np.ndarray
    mjd: float
    timescale: str
    exptime_s: float
    airmass: float
    wcs: str
    gain: float | None
    read_noise: float | None
    saturation: float | None
    missing: list[str] = field(default_factory=list)
    band: str = ""  # "" when unknown
    band_source: str | None = None  # "epoch table", "option --band" or the header keyword
    saturation_source: str = ""  # where ``saturation`` came from (option, keyword, pile-up, data type)
    saturation_estimated: bool = False  # True when ``saturation`` comes from a pile-up in the pixels
    header_fwhm_px: float = float("nan")  # seeing FWHM (px) from the header (:func:`header_fwhm`); NaN: none
    header_fwhm_source: str = ""  # the keyword it came from, "refused: ..." with the reason, or "" (none)
    header_apcorr: float = float("nan")  # aperture correction of the PSFEx model (:func:`psfex_epoch_apcorr`)
    header_apcorr_fwhm_px: float = float("nan")  # the FWHM (px) its radii were scaled with
    header_apcorr_source: str = ""  # PSFEx file, CCD and point of evaluation; "" without a model
    psfex_path: str | None = None  # the PSFEx file given for this image (None: none)


def _strip_suffix(name: str, suffixes: tuple[str, ...]) -> str:
    low = name.lower()
    for suf in suffixes:
        if low.endswith(suf):
            return name[: len(name) - len(suf)]
    return name


def psfex_files(specs: Sequence[str | Path]) -> list[str]:
    """The PSFEx files named by ``specs``: files, folders (their files ending in :data:`PSFEX_SUFFIXES`) or globs.

    Raises
    ------
    IngestError
        When a spec names nothing, or two files would match the same images (the same name
        less its suffix).
    """
    import glob

    out: list[str] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            hits = sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.lower().endswith(PSFEX_SUFFIXES))
        elif p.exists():
            hits = [str(p)]
        else:
            hits = sorted(glob.glob(str(spec)))
        if not hits:
            raise IngestError(f"--psfex {spec}: matches no file (give PSFEx files, a folder of *-psfex.fits or *.psf, "
                              "or a glob)")
        out.extend(h for h in hits if h not in out)
    stems: dict[str, str] = {}
    for f in out:
        stem = _strip_suffix(_strip_suffix(Path(f).name, PSFEX_SUFFIXES), _FITS_SUFFIXES)
        if stem in stems:
            raise IngestError(f"--psfex: {stems[stem]} and {f} would both be the model of images named {stem}*; "
                              "give one")
        stems[stem] = f
    return out


def match_psfex(image_path: str | Path, psfex: Sequence[str]) -> str | None:
    """The PSFEx file of an image (the rule of the module docstring), or None.

    Parameters
    ----------
    image_path
        The image's FITS file.
    psfex
        Candidate PSFEx files (:func:`psfex_files`).

    Returns
    -------
    str or None
        The file whose name less its PSFEx suffix is the image's name less its FITS
        extension, or the longest one that is its start up to a ``.``; None when none is.
    """
    stem = _strip_suffix(Path(image_path).name, _FITS_SUFFIXES)
    best: tuple[int, str] | None = None
    for f in psfex:
        s = _strip_suffix(_strip_suffix(Path(f).name, PSFEX_SUFFIXES), _FITS_SUFFIXES)
        if s and (stem == s or stem.startswith(s + ".")) and (best is None or len(s) > best[0]):
            best = (len(s), f)
    return best[1] if best else None


def psfex_epoch_apcorr(psfex_path: str, header: Any, shape: tuple[int, int], fwhm_px: float, where: str
                       ) -> tuple[float, str]:
    """The aperture correction of an image's PSFEx model with the pipeline's apertures, and its source.

    The model (:func:`survey_proc.photometry.psfex.read_psfex`, the CCD from the header's
    ``EXTNAME``/``CCDNAME``/``DETPOS``) is evaluated at the image's centre in its own pixel
    frame, or at its constant term when that centre is outside the fitted area (module
    docstring); then :func:`survey_proc.photometry.psfex.psfex_apcorr` at ``fwhm_px`` with
    :func:`~survey_proc.photometry.aperture.stored_apcorr_config`'s radii.

    Parameters
    ----------
    psfex_path
        The PSFEx file (``.psf`` or legacypipe's ``*-psfex.fits``).
    header
        The image HDU's header (:func:`hdu_header`).
    shape
        The image's ``(ny, nx)`` (px).
    fwhm_px
        The FWHM (px) the apertures scale with.
    where
        The image and HDU, for messages (``file[hdu]``).

    Returns
    -------
    apcorr, source
        The correction (total / aperture flux; NaN when the model is too small for the
        apertures) and ``"<file>[<CCD>] at ..."`` (or why none was computed).

    Raises
    ------
    PSFExIngestError
        When the model cannot be read or has no entry for the CCD; the message names both files.
    """
    from survey_proc.photometry.psfex import PSFExError, psfex_apcorr, read_psfex

    ccd = next((str(header[k]).strip() for k in ("EXTNAME", "CCDNAME", "DETPOS")
                if k in header and str(header[k]).strip()), None)
    try:
        model = read_psfex(psfex_path, ccd)
    except PSFExError as exc:
        raise PSFExIngestError(f"{where}: its PSFEx model cannot be used: {exc}. Fix the file, or leave it out of "
                               "--psfex (the image is then ingested without one)") from None
    ny, nx = shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    name = f"{Path(psfex_path).name}[{model.ccdname or ccd or '-'}]"
    if model.poldeg == 0:
        x, y, at = xc, yc, "constant model"
    else:
        u = (xc + 1.0 - model.polzero[0]) / model.polscal[0]
        v = (yc + 1.0 - model.polzero[1]) / model.polscal[1]
        if max(abs(u), abs(v)) <= PSFEX_FIT_HALF_RANGE:
            x, y, at = xc, yc, f"image centre ({xc:.1f}, {yc:.1f}) px, image frame (u {u:+.3f}, v {v:+.3f})"
        else:
            x, y = model.polzero[0] - 1.0, model.polzero[1] - 1.0
            at = (f"constant term (the image centre ({xc:.1f}, {yc:.1f}) px is at u {u:+.2f}, v {v:+.2f}, outside the "
                  "model's fitted area)")
    from survey_proc.photometry.aperture import stored_apcorr_config

    cfg = stored_apcorr_config()
    try:
        apcorr = psfex_apcorr(model.evaluate(x, y), fwhm_px, cfg)
    except ValueError as exc:  # the large aperture is beyond the model's stamp
        return float("nan"), f"not computed: {name} at FWHM {fwhm_px:.2f} px: {exc}"
    if not (np.isfinite(apcorr) and apcorr > 0):
        return float("nan"), f"not computed: {name} at FWHM {fwhm_px:.2f} px gives {apcorr}"
    return float(apcorr), (f"{name} at {at}; FWHM {fwhm_px:.3f} px, radii {cfg.aperture_fwhm:g} and "
                           f"{cfg.apcorr_fwhm:g} FWHM")


def _first(header: Any, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        if k in header and header[k] not in (None, ""):
            return k, header[k]
    return None, None


def _parse_date(text: str, path: str, key: str) -> tuple[str, bool]:
    """ISO date(-time) string from a FITS date; returns (iso, has_time)."""
    t = str(text).strip()
    m = re.fullmatch(r"(\d{2})/(\d{2})/(\d{2})", t)
    if m:  # pre-2000 FITS: DD/MM/YY, years 19YY
        return f"19{m.group(3)}-{m.group(2)}-{m.group(1)}", False
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", t):
        return t, False
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}[T ]\d{1,2}:\d{2}(:\d{2}(\.\d*)?)?", t):
        return t.replace(" ", "T"), True
    raise IngestError(f"{path}: {key} = {t!r} is not a date this reader knows (YYYY-MM-DD[Thh:mm:ss] or DD/MM/YY); "
                      "fix the header or add MJD-OBS")


def exposure_time_s(header: Any) -> tuple[float, str | None]:
    """Exposure time in seconds and the keyword it came from (NaN, None when missing).

    Parameters
    ----------
    header
        A FITS header (:class:`astropy.io.fits.Header` or a mapping with ``comments``).

    Returns
    -------
    exptime_s, keyword
        Seconds (a comment saying minutes converts) and the keyword read.
    """
    k, v = _first(header, EXPTIME_KEYS)
    if k is None:
        return float("nan"), None
    scale = 60.0 if "min" in str(header.comments[k]).lower() else 1.0
    return float(v) * scale, k


def mid_exposure_mjd(header: Any, path: str, exptime_s: float | None = None) -> tuple[float, str]:
    """Mid-exposure MJD and its time scale from a header (see the module docstring).

    Parameters
    ----------
    header
        A FITS header.
    path
        The file, for error messages.
    exptime_s
        The exposure time (s) when it does not come from the header (an epoch table).

    Returns
    -------
    mjd, timescale
        Mid-exposure MJD (days) and the time scale (``utc``, ``tai``, ``tt`` or ``tdb``).

    Raises
    ------
    IngestError
        When no time keyword can be read or the time scale is not supported.
    """
    from astropy.time import Time

    scale = str(header.get("TIMESYS", "UTC")).strip().lower() or "utc"
    if scale not in ("utc", "tai", "tt", "tdb"):
        raise IngestError(f"{path}: TIMESYS = {scale!r} is not supported (UTC, TAI, TT or TDB)")
    exptime = exptime_s if exptime_s is not None else exposure_time_s(header)[0]
    half = 0.0 if not np.isfinite(exptime) else exptime / 2.0 / 86400.0
    if "MJD-MID" in header:
        return float(header["MJD-MID"]), scale
    if "MJD-OBS" in header:
        return float(header["MJD-OBS"]) + half, scale
    if "DATE-OBS" in header:
        iso, has_time = _parse_date(header["DATE-OBS"], path, "DATE-OBS")
        if not has_time:
            k, tod = _first(header, ("TIME-OBS", "UT", "UTSTART", "TAIHMS"))
            if k is None:
                raise IngestError(f"{path}: DATE-OBS = {header['DATE-OBS']!r} has no time of day and there is no "
                                  "TIME-OBS/UT/UTSTART/TAIHMS; add one (or MJD-OBS) to the header")
            if k == "TAIHMS":  # SDSS: the TAI time of the exposure's start (of its first row, in a drift scan)
                scale = "tai"
            iso = f"{iso}T{str(tod).strip()}"
        try:
            import warnings

            with warnings.catch_warnings():  # ERFA calls pre-1960 UTC "dubious"; it is still the date
                warnings.simplefilter("ignore")
                return float(Time(iso, format="isot", scale=scale).mjd) + half, scale
        except ValueError as exc:
            raise IngestError(f"{path}: DATE-OBS/time {iso!r} cannot be read ({exc})") from None
    if "JD" in header:
        return float(header["JD"]) - 2400000.5 + half, scale
    raise IngestError(f"{path}: no observation time: none of {', '.join(TIME_KEYS)} is in the header; "
                      "add MJD-OBS or DATE-OBS")


def header_band(header: Any) -> tuple[str, str | None]:
    """The photometric band a header names and the keyword it came from ("", None when none).

    Reads :data:`BAND_KEYS` in order (the first value that is set and is not a clear/open
    filter position, whitespace stripped), then Spitzer's ``INSTRUME`` = IRAC with
    ``CHNLNUM`` n (band ``IRACn``).

    Parameters
    ----------
    header
        A FITS header.

    Returns
    -------
    band, keyword
        The band ("" when the header names none) and the keyword read (None when none).
    """
    for k in BAND_KEYS:
        if k in header and header[k] is not None:
            value = str(header[k]).strip()
            if value and not _NO_BAND.fullmatch(value):
                return value, k
    if str(header.get("INSTRUME", "")).strip().upper().startswith("IRAC") and "CHNLNUM" in header:
        try:
            return f"IRAC{int(header['CHNLNUM'])}", "INSTRUME/CHNLNUM"
        except (TypeError, ValueError):
            pass
    return "", None


def _fwhm_unit(comment: str) -> str | None:
    """``"px"``, ``"arcsec"`` or None (not stated, or both named: a pixel scale) from a card's comment."""
    text = str(comment).strip().lower()
    m = re.match(r"\[([^\]]*)\]", text)  # the FITS unit convention: the unit in brackets first
    if m:
        text = m.group(1)
    px = re.search(r"\bpix(el)?s?\b|\bpx\b", text) is not None
    arcsec = re.search(r"arc\s*-?\s*sec|\basec\b|\"", text) is not None
    if px == arcsec:
        return None
    return "px" if px else "arcsec"


def _wcs_pixel_scale_arcsec(header: Any) -> float | None:
    """Pixel scale (arcsec/px, the square root of the pixel area) of the header's celestial WCS; None without one."""
    if not _wcs_text(header):
        return None
    import warnings

    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_area

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scale = float(np.sqrt(proj_plane_pixel_area(WCS(header, naxis=2).celestial))) * 3600.0
    except Exception:
        return None
    return scale if np.isfinite(scale) and scale > 0 else None


def header_fwhm(header: Any) -> tuple[float, str]:
    """The seeing FWHM (px) a header states and where it came from (see the module docstring).

    Reads :data:`FWHM_KEYS` in order; the first that gives a usable value wins. The unit
    comes from the card's comment (``[pix]``/``pixels``/``px`` or ``[arcsec]``/``arcsec``/``"``);
    arcseconds convert with the pixel scale of the header's celestial WCS. A value is
    refused, never guessed, when its unit is not stated (or the comment names both, as a
    pixel scale's ``[arcsec/pixel]`` does), when arcseconds come without a WCS, when it is not
    a finite number, or when it lies outside :data:`FWHM_PLAUSIBLE_PX`.

    Parameters
    ----------
    header
        A FITS header (:class:`astropy.io.fits.Header`: the values and their comments).

    Returns
    -------
    fwhm_px, source
        The FWHM (px; NaN when none is usable) and its source: the keyword with its unit
        (``"FWHM [px]"``, ``"SEEING [arcsec] / 0.2620 arcsec/px (WCS)"``), ``"refused: ..."``
        with every candidate's reason, or "" when the header has none of the keywords.
    """
    lo, hi = FWHM_PLAUSIBLE_PX
    refused: list[str] = []
    for k in FWHM_KEYS:
        if k not in header or header[k] is None or (isinstance(header[k], str) and not header[k].strip()):
            continue
        raw = header[k]
        try:
            value = float(raw) if not isinstance(raw, bool) else float("nan")
        except (TypeError, ValueError):
            refused.append(f"{k} = {raw!r} is not a number")
            continue
        if not np.isfinite(value):
            refused.append(f"{k} = {raw!r} is not a finite number")
            continue
        comment = str(header.comments[k]) if hasattr(header, "comments") else ""
        unit = _fwhm_unit(comment)
        if unit is None:
            refused.append(f"{k} = {value:g}: its comment {comment.strip()!r} does not say whether it is in pixels or "
                           "arcsec")
            continue
        if unit == "px":
            px, source = value, f"{k} [px]"
        else:
            scale = _wcs_pixel_scale_arcsec(header)
            if scale is None:
                refused.append(f"{k} = {value:g} arcsec: no celestial WCS gives the pixel scale to convert it")
                continue
            px, source = value / scale, f"{k} [arcsec] / {scale:.4f} arcsec/px (WCS)"
        if not lo <= px <= hi:
            refused.append(f"{k} = {value:g} {unit}" + (f" = {px:.3g} px" if unit != "px" else "")
                           + f" is implausible (outside {lo:g}-{hi:g} px)")
            continue
        return float(px), source
    if refused:
        return float("nan"), "refused: " + "; ".join(refused)
    return float("nan"), ""


def saturation_pileup(image: np.ndarray, *, rel_tol: float = 1e-3, min_px: int = 5, contrast: float = 5.0
                      ) -> tuple[float, int, float] | None:
    """A saturation level (ADU) from a pile-up of pixels at the image's maximum; None without one.

    A clipped or saturated detector leaves many pixels at (within ``rel_tol`` of the range
    above the median of) the largest value; a continuous distribution of star peaks leaves
    about one. A pile-up is at least ``min_px`` pixels in that top bin and ``contrast``
    times more than the mean count of the 10 bins of the same width just below it (+1).
    The level returned is the bottom of the top bin: a little below the clip, so every
    piled-up pixel is at or above it.

    Parameters
    ----------
    image
        Pixels (ADU); non-finite pixels are ignored.
    rel_tol
        Width of the top bin as a fraction of (maximum - median); at least 0.5 ADU for
        integer-valued pixels.
    min_px
        Fewest pixels that make a pile-up.
    contrast
        How many times the neighbouring bins' mean count the top bin must hold.

    Returns
    -------
    (level_adu, n_pixels, maximum_adu) or None
        The saturation level (ADU), the pixels in the pile-up and the image's maximum (ADU).
    """
    px = np.asarray(image, dtype=np.float64)
    px = px[np.isfinite(px)]
    if px.size < 100:
        return None
    top, med = float(px.max()), float(np.median(px))
    if not top > med:
        return None
    integer_valued = bool(np.all(px == np.round(px)))
    tol = max(rel_tol * (top - med), 0.5 if integer_valued else 0.0, float(np.spacing(np.float32(abs(top)))))
    n_top = int(np.count_nonzero(px >= top - tol))
    n_below = int(np.count_nonzero((px >= top - 11 * tol) & (px < top - tol)))
    if n_top < min_px or n_top < contrast * (n_below / 10 + 1):
        return None
    return top - tol, n_top, top


def _wcs_text(header: Any) -> str:
    ctype1, ctype2 = str(header.get("CTYPE1", "")), str(header.get("CTYPE2", ""))
    if not (ctype1.startswith(("RA", "GLON", "ELON")) and ctype2.startswith(("DEC", "GLAT", "ELAT"))):
        return ""
    from astropy.wcs import WCS

    try:
        w = WCS(header, naxis=2)
    except Exception:
        return ""
    return w.to_header(relax=True).tostring(sep="\n") if w.has_celestial else ""


def _angle(value: Any, hours: bool) -> float | None:
    """Degrees from a number or a sexagesimal string (hours when ``hours``)."""
    from astropy.coordinates import Angle

    try:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip()
        if re.fullmatch(r"[+-]?\d+(\.\d*)?", text):
            return float(text)
        return float(Angle(text, unit="hourangle" if hours else "deg").deg)
    except (ValueError, TypeError):
        return None


def computed_airmass(header: Any, mjd: float, timescale: str, site: tuple[float, float] | None = None
                     ) -> float | None:
    """Sec z at mid-exposure from the header's pointing and site (or ``site`` = (lat, lon) deg); None if unknown.

    Parameters
    ----------
    header
        A FITS header (pointing: ``RA``/``DEC``, else ``CRVAL1/2``; site keywords).
    mjd
        Mid-exposure MJD (days).
    timescale
        Time scale of ``mjd`` (``utc``, ``tai``, ``tt``, ``tdb``).
    site
        Observatory (latitude, longitude) in degrees; None: from the header.

    Returns
    -------
    float or None
        The airmass (plane-parallel sec z), None without a pointing or a site.
    """
    from astropy import units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time

    ra = dec = None
    if "RA" in header and "DEC" in header:
        ra, dec = _angle(header["RA"], hours=isinstance(header["RA"], str) and ":" in header["RA"]), \
            _angle(header["DEC"], hours=False)
    elif "CRVAL1" in header and "CRVAL2" in header:
        ra, dec = _angle(header["CRVAL1"], False), _angle(header["CRVAL2"], False)
    if site is None:
        for klat, klon in (("SITELAT", "SITELONG"), ("LATITUDE", "LONGITUD"), ("OBSGEO-B", "OBSGEO-L")):
            if klat in header and klon in header:
                lat, lon = _angle(header[klat], False), _angle(header[klon], False)
                if lat is not None and lon is not None:
                    site = (lat, lon)
                    break
    if ra is None or dec is None or site is None:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loc = EarthLocation.from_geodetic(lon=site[1] * u.deg, lat=site[0] * u.deg)
        altaz = SkyCoord(ra * u.deg, dec * u.deg).transform_to(
            AltAz(obstime=Time(mjd, format="mjd", scale=timescale), location=loc))
    alt = float(altaz.alt.deg)
    return 1.0 / np.sin(np.radians(alt)) if alt > 0 else float("nan")


def _pointing(header: Any) -> str:
    for ka, kd in (("CRVAL1", "CRVAL2"), ("RA", "DEC")):
        if ka in header and kd in header:
            try:
                return f"{float(header[ka]):.2f}{float(header[kd]):+.2f}"
            except (TypeError, ValueError):
                continue
    return "nopointing"


def hdu_header(hdul: Any, index: int) -> Any:
    """A copy of HDU ``index``'s header with the primary header's keywords it lacks (the MEF convention).

    This is the header every rule of the module docstring reads.

    Parameters
    ----------
    hdul
        An open :class:`astropy.io.fits.HDUList`.
    index
        The HDU.

    Returns
    -------
    astropy.io.fits.Header
        The merged header (the HDU's own cards win; COMMENT and HISTORY are not inherited).
    """
    header = hdul[index].header.copy()
    for card in hdul[0].header.cards:
        if card.keyword not in header and card.keyword not in ("", "COMMENT", "HISTORY"):
            header[card.keyword] = (card.value, card.comment)
    return header


def read_fits(path: str | Path, *, hdus: list[int] | None = None, field_key: str | None = None,
              gain: float | None = None, read_noise: float | None = None, saturation: float | None = None,
              site: tuple[float, float] | None = None, epoch_values: dict[str, Any] | None = None,
              band: str | None = None, psfex: str | None = None) -> list[Exposure]:
    """Read every image HDU of one FITS file (or the ``hdus`` listed) as :class:`Exposure` objects.

    Parameters
    ----------
    path
        A FITS file (``.fits``, ``.fits.fz``, ``.fits.gz``).
    hdus
        HDU indices to read; None: every 2-D image HDU except mask extensions.
    field_key
        Header keyword whose value names the field (e.g. ``OBJECT``).
    gain, read_noise, saturation
        Values that override the headers (e/ADU, e, ADU).
    site
        Observatory (latitude, longitude) in degrees, for the airmass when the header has none.
    epoch_values
        This file's row of an epoch table (:func:`read_epoch_table`): ``mjd_mid``,
        ``exptime_s``, ``timescale`` and ``band`` replace the header's (and ``band`` the
        ``band`` option).
    band
        Photometric band of every exposure, overriding the header (not the epoch table).
    psfex
        This file's PSFEx model (:func:`match_psfex`); each HDU's aperture correction is
        computed from it (:func:`psfex_epoch_apcorr`). None: no correction.

    Returns
    -------
    list of Exposure
        One per image HDU read.

    Raises
    ------
    IngestError
        When the file cannot be read or has no usable image or time.
    PSFExIngestError
        When ``psfex`` cannot be read or has no model for an HDU's CCD.
    """
    from astropy.io import fits

    path = str(path)
    try:
        hl = fits.open(path, memmap=False)
    except FileNotFoundError:
        raise IngestError(f"{path}: no such file") from None
    except OSError as exc:
        raise IngestError(f"{path}: not a readable FITS file ({exc}); check the file is complete") from None
    with hl:
        images = [i for i, h in enumerate(hl) if h.is_image and h.header.get("NAXIS", 0) == 2
                  and str(h.header.get("EXTNAME", "")).upper() not in MASK_EXTNAMES]
        if hdus is not None:
            bad = [i for i in hdus if i not in images]
            if bad:
                raise IngestError(f"{path}: HDU(s) {bad} are not 2-D image HDUs (image HDUs: {images})")
            images = list(hdus)
        if not images:
            raise IngestError(f"{path}: no 2-D image HDU in the file; nothing to ingest")
        masks = {str(h.header.get("EXTNAME", "")).upper(): h for h in hl if h.is_image
                 and str(h.header.get("EXTNAME", "")).upper() in MASK_EXTNAMES}
        out = []
        for i in images:
            hdu = hl[i]
            header = hdu_header(hl, i)
            try:
                data = np.asarray(hdu.data, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise IngestError(f"{path}[{i}]: the image data cannot be read ({exc})") from None
            missing: list[str] = []
            ev = epoch_values or {}
            k_exp: str | None
            if "exptime_s" in ev:
                exptime, k_exp = float(ev["exptime_s"]), "epoch table"
            else:
                exptime, k_exp = exposure_time_s(header)
            if "mjd_mid" in ev:
                mjd, scale = float(ev["mjd_mid"]), str(ev.get("timescale", "utc"))
                if scale not in ("utc", "tai", "tt", "tdb"):
                    raise IngestError(f"{path}: the epoch table's timescale {scale!r} is not supported "
                                      "(utc, tai, tt or tdb)")
            else:
                mjd, scale = mid_exposure_mjd(header, f"{path}[{i}]", exptime if "exptime_s" in ev else None)
            if k_exp is None:
                missing.append("EXPTIME")
            _, g = _first(header, GAIN_KEYS)
            _, rn = _first(header, RDNOISE_KEYS)
            k_sat, sat = _first(header, SATURATION_KEYS)
            g = gain if gain is not None else (float(g) if g is not None else None)
            rn = read_noise if read_noise is not None else (float(rn) if rn is not None else None)
            where = f"{Path(path).name}[{i}]"
            sat_estimated = False
            if saturation is not None:
                sat, sat_source = float(saturation), "option --saturation"
            elif sat is not None:
                sat, sat_source = float(sat), f"header {k_sat} of {where}"
            else:
                missing.append("SATURATE")
                pile = saturation_pileup(data)
                raw_kind = np.dtype(hdu.data.dtype).kind if hdu.data is not None else "f"
                if pile is not None:
                    sat, sat_estimated = pile[0], True
                    sat_source = f"estimated from a pile-up of {pile[1]} pixels at {pile[2]:.6g} ADU in {where}"
                elif raw_kind in "iu" and "BSCALE" not in header and "BZERO" not in header:
                    sat = float(np.iinfo(hdu.data.dtype).max)
                    sat_source = (f"the largest value of {where}'s data type {np.dtype(hdu.data.dtype).name} "
                                  "(no saturation keyword, no pile-up at the maximum)")
                else:
                    sat_source = (f"none: no saturation keyword in {where}, no pile-up at its maximum, and a float "
                                  "or scaled image type says nothing; pass --saturation if stars saturate")
            band_source: str | None
            if "band" in ev:
                band_value, band_source = str(ev["band"]).strip(), "epoch table"
            elif band is not None and band.strip():
                band_value, band_source = band.strip(), "option --band"
            else:
                band_value, band_source = header_band(header)
            if not band_value:
                missing.append("FILTER")
            fwhm_hdr, fwhm_source = header_fwhm(header)
            _, am = _first(header, AIRMASS_KEYS)
            if am is None:
                am = computed_airmass(header, mjd, scale, site)
            if am is None:
                missing.append("AIRMASS")
            mask = np.zeros(data.shape, np.uint8)
            mask[~np.isfinite(data)] |= 1
            for m in masks.values():
                if m.data is not None and m.data.shape == data.shape:
                    mask[np.asarray(m.data) != 0] |= 1
            if sat is not None:
                with np.errstate(invalid="ignore"):
                    mask[data >= sat] |= 2
            det = str(header.get("EXTNAME", "") or header.get("CCDNAME", "") or header.get("DETECTOR", "")
                      or (f"hdu{i}" if len(images) > 1 or i > 0 else "")).strip()
            fv = None
            if field_key:
                if field_key not in header:
                    raise IngestError(f"{path}[{i}]: the field key {field_key} is not in the header; "
                                      "choose another --field-key or leave it out to group by pointing")
                fv = str(header[field_key]).strip()
            out.append(Exposure(f"{Path(path).name}[{i}]@{mjd:.8f}", path, i, det, _pointing(header), fv, data,
                                mask, mjd, scale, exptime, float(am) if am is not None else float("nan"),
                                _wcs_text(header), g, rn, sat, missing, band=band_value, band_source=band_source,
                                saturation_source=sat_source, saturation_estimated=sat_estimated,
                                header_fwhm_px=fwhm_hdr, header_fwhm_source=fwhm_source))
            if psfex is not None:
                from survey_proc.photometry.aperture import stored_apcorr_config

                fwhm_ap = fwhm_hdr if np.isfinite(fwhm_hdr) else stored_apcorr_config().fwhm_default_px
                apc, apc_source = psfex_epoch_apcorr(psfex, header, data.shape, fwhm_ap, f"{path}[{i}]")
                out[-1].header_apcorr, out[-1].header_apcorr_fwhm_px = apc, float(fwhm_ap)
                out[-1].header_apcorr_source, out[-1].psfex_path = apc_source, psfex
    return out


def sky_gain_estimate(image: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """A rough gain (e-/ADU) from the sky's mean over its variance, for the missing-gain message.

    Valid for a sky-limited image in ADU whose sky was not subtracted (Poisson: the variance
    in e- equals the mean in e-; read noise makes it an underestimate). None when the sky
    mean is not positive. It is only suggested to the user, never used silently.

    Parameters
    ----------
    image, mask
        Pixels (ADU) and the store's mask bits (non-zero: not used).
    """
    from astropy.stats import sigma_clipped_stats

    px = image[np.isfinite(image) & ((mask == 0) if mask is not None else True)]
    if px.size < 100:
        return None
    mean, _, std = sigma_clipped_stats(px, sigma=5.0, maxiters=5)  # (3 sigma would bias the variance low)
    if not (mean > 0 and std > 0):
        return None
    return float(mean / std**2)


def _field_saturation(exps: list[Exposure]) -> Exposure:
    """The exposure whose saturation a new field records.

    The first's when an option or header gives it, else the lowest of the estimates from
    pile-ups (else the first's fallback).
    """
    e0 = exps[0]
    if e0.saturation is not None and not e0.saturation_estimated:
        return e0
    estimated = [e for e in exps if e.saturation_estimated and e.saturation is not None]
    return min(estimated, key=lambda e: float(e.saturation or 0.0)) if estimated else e0


def _check_bands(fid: str, exps: list[Exposure], stored: list[str]) -> None:
    """Refuse a field that would mix epochs of unknown band ("") with epochs of a known band."""
    known = sorted({e.band for e in exps if e.band} | {b for b in stored if b})
    unknown = [e for e in exps if not e.band]
    if known and (unknown or "" in stored):
        if unknown:
            what = (f"{', '.join(f'{e.path}[{e.hdu}]' for e in unknown[:3])}"
                    + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "") + " name no band")
        else:
            what = "epochs already in the store have no band"
        raise IngestError(
            f"field {fid}: {what}, while other epochs are in band(s) {', '.join(known)}; a light curve must not mix "
            f"bands. Give every file its band: --band for all files, a 'band' column in --epoch-table, or a "
            f"FILTER (or {', '.join(k for k in BAND_KEYS if k != 'FILTER')}) keyword in the header")


def field_id_of(exp: Exposure) -> str:
    """The field an exposure belongs to: the field key's value (or the pointing) and the detector.

    Parameters
    ----------
    exp
        The exposure.

    Returns
    -------
    str
        The field id (letters, digits, ``.+-`` and ``_``).
    """
    base = exp.field_value if exp.field_value is not None else exp.pointing
    name = f"{base}_{exp.detector}" if exp.detector else base
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "field"


def ingest(paths: Sequence[str | Path], out: str | Path, *, field_key: str | None = None, hdus: list[int] | None = None,
           append: bool = False, gain: float | None = None, read_noise: float | None = None,
           saturation: float | None = None, site: tuple[float, float] | None = None, band: str | None = None,
           pixel_scale_arcsec: float = float("nan"),
           zeropoint_nominal: float = 25.0, client: Any = None, progress: bool = True,
           epoch_table: dict[str, dict[str, Any]] | None = None,
           psfex: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Ingest FITS files into a survey store (created, or appended to with ``append``).

    A file that cannot be read (corrupt, truncated, no image, no time) is left out and
    listed under ``rejected`` with the reason; the others are ingested. Problems that
    concern a whole field (no gain, images of different shapes) stop the call before
    anything is written.

    Returns
    -------
    dict
        Per field the epochs added and skipped, per file the missing header values, the
        rejected files and why, the header FWHMs refused (``fwhm_refused``: file[HDU] -> why), with
        ``psfex`` the model of each file (``psfex``: file -> PSFEx file), the files without one
        (``psfex_missing``) and the HDUs whose correction could not be computed
        (``psfex_not_computed``: file[HDU] -> why), the bytes read and the wall time (for MB/s).

    Parameters
    ----------
    paths
        FITS files (``.fits``, ``.fits.fz``, ``.fits.gz``).
    out
        The survey store to create (or to append to).
    field_key
        Header keyword whose value names the field (e.g. ``OBJECT``); None: group by pointing.
    hdus
        HDU indices to read from every file; None: every 2-D image HDU except mask extensions.
    append
        Add to an existing store (epochs already there are skipped); else ``out`` must not exist.
    gain, read_noise, saturation
        Values that override the headers (e-/ADU, e-, ADU).
    site
        Observatory (latitude, longitude) in degrees, for airmasses the headers lack.
    band
        Photometric band of every file, overriding the headers (a ``band`` cell of the epoch
        table overrides it); None: from the headers (:func:`header_band`).
    pixel_scale_arcsec
        Nominal pixel scale (arcsec per pixel) recorded in the store.
    zeropoint_nominal
        Expected zero point (mag for 1 ADU per exposure) recorded for new fields.
    client
        A ``distributed.Client`` to read the files in parallel on; None reads them here.
    progress
        Show a progress bar.
    epoch_table
        File name -> times and exposures that replace the headers' (:func:`read_epoch_table`);
        every file it names must be among ``paths``.
    psfex
        PSFEx model files, folders or globs (:func:`psfex_files`); each image takes the one its
        name matches (:func:`match_psfex`) and stores its aperture correction
        (:func:`psfex_epoch_apcorr`). None: no PSFEx (the store keeps no correction).

    Raises
    ------
    IngestError
        When nothing can be ingested or a field cannot be (module docstring); with ``psfex``,
        when a spec names no file, no image matches any model, or a model cannot be used
        for its image (:class:`PSFExIngestError`, naming both files).
    """
    t0 = time.perf_counter()
    files = [str(p) for p in paths]
    if not files:
        raise IngestError("no input files: give FITS paths or globs that match files")
    out = Path(out)
    if out.exists() and not append:
        raise IngestError(f"{out} already exists; pass --append to add exposures to it")
    if append and not out.exists():
        append = False
    epoch_table = epoch_table or {}
    names = {Path(f).name for f in files}
    stray = sorted(set(epoch_table) - names)
    if stray:
        raise IngestError(f"the epoch table names file(s) that are not among the inputs: {', '.join(stray[:5])}; "
                          "its 'file' column holds file names without their folder")
    kwargs: dict[str, Any] = dict(hdus=hdus, field_key=field_key, gain=gain, read_noise=read_noise,
                                  saturation=saturation, site=site, band=band)
    psfex_of: dict[str, str | None] = {}
    if psfex is not None:
        models = psfex_files(psfex)
        psfex_of = {f: match_psfex(f, models) for f in files}
        if not any(psfex_of.values()):
            raise IngestError(f"--psfex: none of the {len(models)} PSFEx file(s) ({Path(models[0]).name}, ...) matches "
                              f"an input image's name ({Path(files[0]).name}, ...); a model named "
                              "<image name less .fits>-psfex.fits (or .psf) belongs to the image")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    exposures: list[Exposure] = []
    rejected: dict[str, str] = {}  # file -> why it could not be read
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("read FITS", total=len(files))
        if client is not None:  # files are read in parallel on the cluster's workers
            from distributed import as_completed

            futures = {client.submit(read_fits, f, **kwargs, epoch_values=epoch_table.get(Path(f).name),
                                     psfex=psfex_of.get(f), pure=False): f for f in files}
            for fut in as_completed(list(futures)):
                try:
                    exposures.extend(fut.result())
                except PSFExIngestError:  # the model the user gave is unusable: stop before writing
                    raise
                except IngestError as exc:  # a bad file is left out; the others go on
                    rejected[futures[fut]] = str(exc)
                bar.advance(task)
        else:
            for f in files:
                try:
                    exposures.extend(read_fits(f, **kwargs, epoch_values=epoch_table.get(Path(f).name),
                                               psfex=psfex_of.get(f)))
                except PSFExIngestError:
                    raise
                except IngestError as exc:
                    rejected[f] = str(exc)
                bar.advance(task)
    if not exposures:
        raise IngestError(f"no readable exposure in {len(files)} file(s); nothing was written. First problem: "
                          f"{next(iter(rejected.values()))}")
    t_read = time.perf_counter() - t0
    n_bytes = sum(Path(f).stat().st_size for f in files)
    groups: dict[str, list[Exposure]] = {}
    for e in exposures:
        groups.setdefault(field_id_of(e), []).append(e)
    have = set(store.list_fields(out)) if append else set()
    one_band_store = append and not store.bands_per_epoch(out)
    root_band = str(store.store_attrs(out).get("band", "")) if append else ""
    for fid, exps in groups.items():  # check before writing anything
        e0 = exps[0]
        _check_bands(fid, exps, store.read_epoch_table(out, fid)["band"].tolist() if fid in have else [])
        foreign = sorted({e.band for e in exps if e.band not in ("", root_band)})
        if one_band_store and foreign:
            first = next(e for e in exps if e.band in foreign)
            raise IngestError(f"{out} is a format-1 store, which has one band for all epochs ({root_band!r}); "
                              f"{first.path}[{first.hdu}] has band {first.band!r} ({first.band_source}). Ingest the "
                              "files into a new store (which keeps a band per epoch), or give them the store's band "
                              "with --band if that is what they are")
        by_time: dict[float, Exposure] = {}
        for e in sorted(exps, key=lambda e: e.mjd):
            other = by_time.setdefault(e.mjd, e)
            if other.source != e.source:  # (the same exposure given twice counts once)
                raise IngestError(
                    f"field {fid}: {other.path}[{other.hdu}] and {e.path}[{e.hdu}] have the same mid-exposure time "
                    f"(MJD {e.mjd:.6f}); two exposures of one field cannot be one epoch. If the headers are "
                    "copies (reprojected or stacked images), give each file its time with --epoch-table "
                    "(columns file, mjd_mid, exptime_s); if they are different detectors, separate them with "
                    "--field-key or --hdu")
        shapes = {e.image.shape for e in exps}
        if fid in have:
            shapes.add(store.image_shape(out, fid)[1:])
        if len(shapes) > 1:
            raise IngestError(f"field {fid}: images of different shapes {sorted(shapes)} "
                              f"({', '.join(e.source for e in exps[:4])}); a field is one detector: "
                              "choose the HDUs with --hdu or a --field-key that separates them")
        if fid not in have:
            if e0.gain is None:
                est = sky_gain_estimate(e0.image, e0.mask)
                hint = (f"for a sky-limited image whose sky was not subtracted, gain ~ sky mean / sky variance "
                        f"(ADU), which is {est:.3g} e-/ADU for this image" if est is not None else
                        "this image's sky mean is not positive (sky-subtracted or calibrated units), so its "
                        "gain cannot be estimated from its pixels")
                raise IngestError(f"{e0.path}[{e0.hdu}]: no gain in the header (looked for {', '.join(GAIN_KEYS)}); "
                                  f"pass --gain in e-/ADU, from the instrument's documentation or the raw frames' "
                                  f"headers ({hint})")
            if e0.read_noise is None:
                raise IngestError(f"{e0.path}[{e0.hdu}]: no read noise in the header (looked for "
                                  f"{', '.join(RDNOISE_KEYS)}); pass --read-noise in electrons, from the instrument's "
                                  "documentation (or a bias frame's standard deviation in ADU times the gain)")
    if not append:
        all_bands = sorted({e.band for e in exposures})
        store.create_store(out, band=all_bands[0] if len(all_bands) == 1 else "",
                           pixel_scale_arcsec=pixel_scale_arcsec, attrs={"created_by": "survey-proc ingest"})
    report: dict[str, Any] = {"fields": {}, "missing": {}, "files": len(files), "rejected": rejected,
                              "fwhm_refused": {}}
    if psfex is not None:
        report.update(psfex={f: m for f, m in psfex_of.items() if m}, psfex_missing=sorted(
            f for f, m in psfex_of.items() if not m), psfex_not_computed={})
    for fid, exps in sorted(groups.items()):
        exps.sort(key=lambda e: e.mjd)
        if fid in have:
            done = set(store.read_source_files(out, fid))
        else:
            e0 = exps[0]
            assert e0.gain is not None and e0.read_noise is not None  # checked for every new field above
            ny, nx = e0.image.shape
            sat_exp = _field_saturation(exps)
            saturation_adu = sat_exp.saturation if sat_exp.saturation is not None else float(np.finfo(np.float32).max)
            store.create_field(out, fid, ny=ny, nx=nx, n_epochs=0, gain_e_per_adu=e0.gain,
                               read_noise_e=e0.read_noise, saturation_adu=saturation_adu,
                               zeropoint_nominal=zeropoint_nominal, mjd_timescale=e0.timescale,
                               attrs={"ingest_field_key": field_key, "saturation_source": sat_exp.saturation_source})
            done = set()
        new = [e for e in exps if e.source not in done]
        # the same exposure twice in one call counts once
        seen: set[str] = set()
        unique: list[Exposure] = []
        for e in new:
            if e.source not in seen:
                seen.add(e.source)
                unique.append(e)
        new = unique
        if new:
            store.append_epochs(out, fid, np.stack([e.image for e in new]),
                                store.EpochMeta(np.array([e.mjd for e in new]), np.array([e.exptime_s for e in new]),
                                                np.array([e.airmass for e in new]), [e.wcs for e in new],
                                                [e.source for e in new], band=[e.band for e in new],
                                                header_fwhm_px=np.array([e.header_fwhm_px for e in new]),
                                                header_fwhm_source=[e.header_fwhm_source for e in new],
                                                header_apcorr=np.array([e.header_apcorr for e in new])
                                                if psfex is not None else None,
                                                header_apcorr_fwhm_px=np.array([e.header_apcorr_fwhm_px for e in new])
                                                if psfex is not None else None,
                                                header_apcorr_source=[e.header_apcorr_source for e in new]
                                                if psfex is not None else None),
                                np.stack([e.mask for e in new]))
        fa = store.field_attrs(out, fid)
        report["fields"][fid] = {"added": len(new), "skipped_already_ingested": len(exps) - len(new),
                                 "bands": list(dict.fromkeys(e.band for e in exps)),
                                 "saturation_adu": float(fa["saturation_adu"]),
                                 "saturation_source": str(fa.get("saturation_source", ""))}
        for e in exps:
            if e.missing:
                report["missing"].setdefault(e.path, sorted(set(e.missing)))
            if e.header_fwhm_source.startswith("refused"):
                report["fwhm_refused"][f"{e.path}[{e.hdu}]"] = e.header_fwhm_source
            if e.header_apcorr_source.startswith("not computed"):
                report["psfex_not_computed"][f"{e.path}[{e.hdu}]"] = e.header_apcorr_source
    wall = time.perf_counter() - t0
    report.update(bytes=n_bytes, wall_s=wall, read_s=t_read, mb_per_s=n_bytes / 1e6 / max(wall, 1e-9))
    return report
