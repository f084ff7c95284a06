"""The survey store: Zarr v3, one group per field, readable as an ``xarray.Dataset``.

Layout (the format ``../shared/DESIGN.md`` records and docs/store.md explains;
``survey_proc_format`` = :data:`FORMAT_VERSION`)::

    survey.zarr/                 root attrs: survey_proc_format, band, pixel_scale_arcsec,
                                 [reference_catalog (path relative to the store), ...]
                                 (format 2: ``band`` is the default for epochs written
                                 without one; readers use the per-epoch ``band``)
      fields/<field_id>/         attrs: gain_e_per_adu, read_noise_e, saturation_adu,
                                 zeropoint_nominal, mjd_timescale, [reference_wcs, ...]
        image     float32 (epoch, y, x)  ADU, sky not subtracted
        mask      uint8   (epoch, y, x)  optional; bits: MASK_BAD | MASK_SATURATED | MASK_COSMIC
        epoch     int32   (epoch)        0..N-1 in time order (the index coordinate)
        mjd       float64 (epoch)        mid-exposure MJD, time scale in attrs["mjd_timescale"]
        exptime   float32 (epoch)        seconds
        airmass   float32 (epoch)        NaN when unknown
        wcs       string  (epoch)        FITS WCS header text, "" when unknown
        band      string  (epoch)        photometric band, "" when unknown (format 2)
        source_file string (epoch)       where the epoch came from (optional)
        header_fwhm_px float32 (epoch)   seeing FWHM (px) from the exposure's FITS header, NaN when
                                         none (optional; written by ingest, see below)
        header_fwhm_source string (epoch)  the keyword it came from, why a value was refused, or ""
                                         (optional, written with ``header_fwhm_px``)
        header_apcorr float32 (epoch)    aperture correction (total / aperture flux) of the epoch's
                                         PSFEx model, NaN when none (optional; ``ingest --psfex``)
        header_apcorr_fwhm_px float32 (epoch)  the FWHM (px) its radii were scaled with
        header_apcorr_source string (epoch)  the PSFEx file, CCD, where the model was evaluated, or ""

Format versions: 2 adds the per-epoch ``band`` variable. A format-1 store (one band for
all epochs, the root attribute ``band``) stays readable: :func:`read_epoch_table` and
:func:`open_field` give every epoch the root band ("" when absent) and
:func:`bands_per_epoch` says False, so a caller can say so where it matters. Fields
created in a format-1 store (``ingest --append``) stay format 1.

The two ``header_fwhm_*`` variables exist only in fields whose epochs were written with
:attr:`EpochMeta.header_fwhm_px` (``survey-proc ingest`` always gives it; the simulator
never does, so its stores have neither). They are optional within format 2: a reader
without them sees no header FWHM (:func:`read_header_fwhm` returns None). The extract
stage uses an epoch's header FWHM for a block with too few stars to measure its own, in
place of ``photometry.fwhm_default_px``.

The three ``header_apcorr*`` variables are optional in the same way: written only when
:attr:`EpochMeta.header_apcorr` is given (``survey-proc ingest --psfex``), read with
:func:`read_header_apcorr` (None for a field without them). The extract stage uses an
epoch's PSFEx aperture correction for a block with too few stars to measure its own, in
place of the Moffat model's (:func:`survey_proc.photometry.aperture.model_apcorr`).

Chunks are ``(1, cy, cx)``: per axis the smallest multiple of :data:`TILE_GRID_PX` (the
default tile size) that covers it, capped at :data:`MAX_CHUNK_PX` (2048), or the whole axis
when one such chunk covers it (:func:`chunk_px_for`). So a tile's core never straddles a
chunk boundary and a worker reading one epoch of one tile block touches few chunks. Pixels
are compressed with Blosc-zstd level 3 (byte shuffle); the numeric per-epoch vectors with
zstd level 3 (chunks of 4096 epochs).

Writers here are used by the simulator and by ingest; readers by every stage. Workers
open the store themselves from its path (never pass arrays between processes).
"""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec
from zarr.core.metadata import ArrayV3Metadata

from survey_proc import storage
from survey_proc.errors import StoreError, StoreValidationError
from survey_proc.storage import Location
from survey_proc.vocab import MASK_BAD, MASK_COSMIC, MASK_SATURATED  # noqa: F401  (the store's mask bits)

FORMAT_VERSION = 2
#: format versions this survey-proc reads (1: one band in the root attributes; 2: a band per epoch)
SUPPORTED_FORMATS = (1, 2)
TILE_GRID_PX = 512
MAX_CHUNK_PX = 2048


REQUIRED_ROOT_ATTRS = ("survey_proc_format", "band", "pixel_scale_arcsec")
REQUIRED_FIELD_ATTRS = ("gain_e_per_adu", "read_noise_e", "saturation_adu", "zeropoint_nominal")

#: variable -> (dtype kind description, numpy dtype or None for strings, dimensions)
SCHEMA: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "image": ("float32", np.dtype("float32"), ("epoch", "y", "x")),
    "mask": ("uint8", np.dtype("uint8"), ("epoch", "y", "x")),
    "epoch": ("int32", np.dtype("int32"), ("epoch",)),
    "mjd": ("float64", np.dtype("float64"), ("epoch",)),
    "exptime": ("float32", np.dtype("float32"), ("epoch",)),
    "airmass": ("float32", np.dtype("float32"), ("epoch",)),
    "wcs": ("string", None, ("epoch",)),
    "band": ("string", None, ("epoch",)),
    "source_file": ("string", None, ("epoch",)),
    "header_fwhm_px": ("float32", np.dtype("float32"), ("epoch",)),
    "header_fwhm_source": ("string", None, ("epoch",)),
    "header_apcorr": ("float32", np.dtype("float32"), ("epoch",)),
    "header_apcorr_fwhm_px": ("float32", np.dtype("float32"), ("epoch",)),
    "header_apcorr_source": ("string", None, ("epoch",)),
}
#: optional per-epoch variables written only when :class:`EpochMeta` gives them
HEADER_FWHM_VARIABLES = ("header_fwhm_px", "header_fwhm_source")
#: optional per-epoch variables of the PSFEx aperture correction (:attr:`EpochMeta.header_apcorr`)
HEADER_APCORR_VARIABLES = ("header_apcorr", "header_apcorr_fwhm_px", "header_apcorr_source")
REQUIRED_VARIABLES = ("image", "epoch", "mjd", "exptime", "airmass", "wcs")
#: variables required from format 2 on
REQUIRED_VARIABLES_V2 = ("band",)
_PIXEL_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)
_VECTOR_COMPRESSOR = ZstdCodec(level=3)
_EPOCH_VECTOR_CHUNK = 4096


@dataclass(frozen=True)
class EpochMeta:
    """Per-epoch metadata for one or more epochs (arrays of equal length).

    Attributes
    ----------
    mjd : mid-exposure MJD (days)
    exptime_s : exposure time (seconds)
    airmass : airmass, NaN when unknown
    wcs : FITS WCS header text per epoch, "" when unknown
    source_file : where each epoch came from
    band : photometric band per epoch ("" when unknown); None: the store's root ``band``
        for every epoch
    header_fwhm_px : seeing FWHM (px) per epoch from the FITS header, NaN when none; None:
        the field keeps no header FWHM (the variables are not created)
    header_fwhm_source : per epoch the keyword (and unit conversion) the FWHM came from,
        ``"refused: ..."`` with the reason a header value was not used, or "" when the
        header has none; None: "" for every epoch
    header_apcorr : aperture correction (total / aperture flux, dimensionless) per epoch
        from the exposure's PSFEx model, NaN when none; None: the field keeps none (the
        variables are not created)
    header_apcorr_fwhm_px : the FWHM (px) the correction's radii were scaled with (NaN when
        none); needed with ``header_apcorr``
    header_apcorr_source : per epoch the PSFEx file, CCD and where the model was evaluated
        (or why no correction was computed), "" when none; None: "" for every epoch
    """

    mjd: np.ndarray
    exptime_s: np.ndarray
    airmass: np.ndarray
    wcs: Sequence[str]
    source_file: Sequence[str]
    band: Sequence[str] | None = None
    header_fwhm_px: np.ndarray | None = None
    header_fwhm_source: Sequence[str] | None = None
    header_apcorr: np.ndarray | None = None
    header_apcorr_fwhm_px: np.ndarray | None = None
    header_apcorr_source: Sequence[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.mjd)
        for name in ("exptime_s", "airmass", "wcs", "source_file", "band", "header_fwhm_px", "header_fwhm_source",
                     "header_apcorr", "header_apcorr_fwhm_px", "header_apcorr_source"):
            if getattr(self, name) is not None and len(getattr(self, name)) != n:
                raise StoreError(f"epoch metadata: {name} has {len(getattr(self, name))} entries, mjd has {n}")
        if self.header_apcorr is not None and self.header_apcorr_fwhm_px is None:
            raise StoreError("epoch metadata: header_apcorr needs header_apcorr_fwhm_px (the FWHM of its radii)")


def chunk_px_for(size_px: int) -> int:
    """Chunk edge (pixels) for an image axis of ``size_px``: a multiple of the tile grid, <= 2048.

    Parameters
    ----------
    size_px
        Length of the image axis (pixels).

    Returns
    -------
    int
        The chunk edge (pixels).
    """
    return min(MAX_CHUNK_PX, TILE_GRID_PX * max(1, math.ceil(size_px / TILE_GRID_PX)))


def _axis_chunk(size_px: int) -> int:
    """Chunk edge along one axis: the whole axis when one chunk covers it, else :func:`chunk_px_for`."""
    c = chunk_px_for(size_px)
    return max(1, size_px) if c >= size_px else c


_Mode = Literal["r", "r+", "a", "w", "w-"]


def _open_root(path: str | Path, mode: _Mode = "r") -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise StoreError(f"survey store {path} does not exist; create it with `survey-proc simulate` "
                         "or `survey-proc ingest`") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"{path} is not a Zarr v3 survey store ({exc})") from None
    except Exception as exc:  # an object store that cannot be reached or refuses (botocore, aiohttp, OSError...)
        raise StoreError(f"survey store {path}: cannot open it ({type(exc).__name__}: {exc}); check the path, and "
                         "for a URL the endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID... for "
                         "s3://)") from None


def create_store(
    path: str | Path,
    *,
    band: str,
    pixel_scale_arcsec: float,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Create an empty survey store.

    Parameters
    ----------
    path
        Directory of the new store (conventionally ``NAME.zarr``).
    band
        Photometric band name, e.g. ``"i"``: the band of epochs whose :class:`EpochMeta`
        gives none (every epoch keeps its own in the ``band`` variable).
    pixel_scale_arcsec
        Nominal pixel scale in arcsec per pixel.
    attrs
        Extra root attributes (JSON-serialisable).
    overwrite
        Replace an existing store; otherwise an existing path is an error.

    Returns
    -------
    Path
        The store's path.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update(
        {"survey_proc_format": FORMAT_VERSION, "band": band, "pixel_scale_arcsec": float(pixel_scale_arcsec),
         **(attrs or {})}
    )
    root.require_group("fields")
    return path


def create_field(
    path: str | Path,
    field_id: str,
    *,
    ny: int,
    nx: int,
    n_epochs: int,
    gain_e_per_adu: float,
    read_noise_e: float,
    saturation_adu: float,
    zeropoint_nominal: float,
    mjd_timescale: str = "utc",
    with_mask: bool = True,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Create a field group with arrays sized for ``n_epochs`` (pixels filled later).

    Parameters
    ----------
    ny, nx
        Image size in pixels.
    n_epochs
        Number of epochs to allocate (may be 0; :func:`append_epochs` grows it).
    gain_e_per_adu, read_noise_e, saturation_adu
        Detector properties (electrons per ADU, electrons, ADU).
    zeropoint_nominal
        Expected zero point (mag for 1 ADU per exposure) at airmass 1.
    mjd_timescale
        Time scale of ``mjd`` ("utc" or "tdb").
    """
    root = _open_root(path, mode="r+")
    fields_group = root.require_group("fields")
    if field_id in fields_group:
        raise StoreError(f"field {field_id!r} already exists in {path}; use append_epochs to add epochs")
    g = fields_group.create_group(field_id)
    g.attrs.update(
        {
            "gain_e_per_adu": float(gain_e_per_adu),
            "read_noise_e": float(read_noise_e),
            "saturation_adu": float(saturation_adu),
            "zeropoint_nominal": float(zeropoint_nominal),
            "mjd_timescale": mjd_timescale,
            **(attrs or {}),
        }
    )
    cpx = (1, _axis_chunk(ny), _axis_chunk(nx))
    g.create_array("image", shape=(n_epochs, ny, nx), chunks=cpx, dtype="float32", fill_value=np.nan,
                   compressors=[_PIXEL_COMPRESSOR], dimension_names=["epoch", "y", "x"])
    if with_mask:
        g.create_array("mask", shape=(n_epochs, ny, nx), chunks=cpx, dtype="uint8", fill_value=0,
                       compressors=[_PIXEL_COMPRESSOR], dimension_names=["epoch", "y", "x"])
    vec: dict[str, Any] = dict(chunks=(_EPOCH_VECTOR_CHUNK,), dimension_names=["epoch"])
    num: dict[str, Any] = dict(compressors=[_VECTOR_COMPRESSOR], **vec)  # numeric per-epoch vectors
    g.create_array("epoch", shape=(n_epochs,), dtype="int32", fill_value=-1, **num)
    g.create_array("mjd", shape=(n_epochs,), dtype="float64", fill_value=np.nan, **num)
    g.create_array("exptime", shape=(n_epochs,), dtype="float32", fill_value=np.nan, **num)
    g.create_array("airmass", shape=(n_epochs,), dtype="float32", fill_value=np.nan, **num)
    g.create_array("wcs", shape=(n_epochs,), dtype=str, fill_value="", **vec)
    if _format_version(root) >= 2:  # a field added to a format-1 store stays format 1
        g.create_array("band", shape=(n_epochs,), dtype=str, fill_value="", **vec)
    g.create_array("source_file", shape=(n_epochs,), dtype=str, fill_value="", **vec)
    if n_epochs:
        _array(g, "epoch")[:] = np.arange(n_epochs, dtype="int32")


def _array(g: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of group ``g`` (KeyError when absent, StoreError when it is a group)."""
    node = g[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{g.path or '/'}: {name!r} is a {type(node).__name__}, expected an array")
    return node


def _group(g: zarr.Group, name: str) -> zarr.Group:
    """The subgroup ``name`` of group ``g`` (KeyError when absent, StoreError when it is an array)."""
    node = g[name]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{g.path or '/'}: {name!r} is a {type(node).__name__}, expected a group")
    return node


def _field_group(path: str | Path, field_id: str, mode: _Mode = "r") -> zarr.Group:
    root = _open_root(path, mode=mode)
    try:
        return _group(_group(root, "fields"), field_id)
    except KeyError:
        have = ", ".join(list_fields(path)) or "none"
        raise StoreError(f"field {field_id!r} is not in survey store {path} (fields: {have})") from None


def write_epoch_meta(path: str | Path, field_id: str, start_epoch: int, meta: EpochMeta) -> None:
    """Write metadata for epochs ``start_epoch .. start_epoch + len(meta) - 1`` of a field.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field (it must exist, with room for the epochs: :func:`create_field`).
    start_epoch
        Index of the first epoch written.
    meta
        The epochs' metadata (mjd in days, exposure times in seconds, airmass, WCS text).
    """
    g = _field_group(path, field_id, mode="r+")
    stop = start_epoch + len(meta.mjd)
    _check_band_fits(path, g, field_id, meta)
    n_alloc = _array(g, "mjd").shape[0]
    if stop > n_alloc:
        raise StoreError(f"field {field_id!r}: epochs up to {stop - 1} do not fit in {n_alloc} allocated epochs")
    sl = slice(start_epoch, stop)
    _array(g, "epoch")[sl] = np.arange(start_epoch, stop, dtype="int32")
    _array(g, "mjd")[sl] = np.asarray(meta.mjd, dtype="float64")
    _array(g, "exptime")[sl] = np.asarray(meta.exptime_s, dtype="float32")
    _array(g, "airmass")[sl] = np.asarray(meta.airmass, dtype="float32")
    _array(g, "wcs")[sl] = np.asarray(list(meta.wcs), dtype=object)
    _array(g, "source_file")[sl] = np.asarray(list(meta.source_file), dtype=object)
    if "band" in g:
        _array(g, "band")[sl] = np.asarray(_meta_bands(path, meta), dtype=object)
    if meta.header_fwhm_px is not None:
        _write_optional_vectors(g, n_alloc, sl, {"header_fwhm_px": meta.header_fwhm_px},
                                {"header_fwhm_source": meta.header_fwhm_source})
    if meta.header_apcorr is not None and meta.header_apcorr_fwhm_px is not None:
        _write_optional_vectors(g, n_alloc, sl, {"header_apcorr": meta.header_apcorr,
                                                 "header_apcorr_fwhm_px": meta.header_apcorr_fwhm_px},
                                {"header_apcorr_source": meta.header_apcorr_source})


def _write_optional_vectors(g: Any, n_alloc: int, sl: slice, floats: dict[str, Any], strings: dict[str, Any]
                            ) -> None:
    """Write optional per-epoch variables at ``sl``, each created on first use (earlier epochs read NaN / "").

    A string variable given None is "" for every epoch of ``sl``.
    """
    vec: dict[str, Any] = dict(chunks=(_EPOCH_VECTOR_CHUNK,), dimension_names=["epoch"])
    for name, values in floats.items():
        if name not in g:
            g.create_array(name, shape=(n_alloc,), dtype="float32", fill_value=np.nan,
                           compressors=[_VECTOR_COMPRESSOR], **vec)
        _array(g, name)[sl] = np.asarray(values, dtype="float32")
    for name, values in strings.items():
        if name not in g:
            g.create_array(name, shape=(n_alloc,), dtype=str, fill_value="", **vec)
        texts = [""] * (sl.stop - sl.start) if values is None else [str(v) for v in values]
        _array(g, name)[sl] = np.asarray(texts, dtype=object)


def _optional_strings(g: Any, name: str, n: int) -> list[str]:
    """An optional per-epoch string variable ("" for missing values, or every epoch when the field has none)."""
    if name not in g:
        return [""] * n
    return [str(v) if v is not None else "" for v in np.asarray(_array(g, name)[:])]


def _meta_bands(path: str | Path, meta: EpochMeta) -> list[str]:
    """The band of every epoch of ``meta`` (stripped; the store's root ``band`` where ``meta.band`` is None)."""
    if meta.band is None:
        return [str(_open_root(path).attrs.get("band", ""))] * len(meta.mjd)
    return [str(b).strip() for b in meta.band]


def _check_band_fits(path: str | Path, g: zarr.Group, field_id: str, meta: EpochMeta) -> None:
    """Refuse epochs of another band than the root's in a field without a ``band`` variable (format 1)."""
    if "band" in g:
        return
    root_band = str(_open_root(path).attrs.get("band", ""))
    other = sorted({b for b in _meta_bands(path, meta) if b not in ("", root_band)})
    if other:
        raise StoreError(f"{path}: field {field_id!r} is in a format-1 store, which has one band for all epochs "
                         f"({root_band!r}); the new epochs have band(s) {', '.join(other)}. Ingest them into a new "
                         "store (format 2 keeps a band per epoch), or re-create this one with this survey-proc")


def _format_version(root: zarr.Group) -> int:
    """The store's ``survey_proc_format`` (1 when absent or unreadable: the oldest layout)."""
    try:
        return int(root.attrs.get("survey_proc_format", 1))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 1


def write_epoch_pixels(
    path: str | Path, field_id: str, epoch: int, image: np.ndarray, mask: np.ndarray | None = None
) -> None:
    """Write one epoch's image (ADU, float32) and optional mask (uint8 bits).

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.
    epoch
        Index of the epoch (already allocated).
    image
        The ``(ny, nx)`` image (ADU), the field's shape.
    mask
        Optional ``(ny, nx)`` mask bits (:data:`MASK_BAD`, :data:`MASK_SATURATED`,
        :data:`MASK_COSMIC`); the field must have a mask array.
    """
    g = _field_group(path, field_id, mode="r+")
    img = _array(g, "image")
    if image.shape != img.shape[1:]:
        raise StoreError(f"field {field_id!r} epoch {epoch}: image shape {image.shape} != field shape {img.shape[1:]}")
    img[epoch] = np.asarray(image, dtype="float32")
    if mask is not None:
        if "mask" not in g:
            raise StoreError(f"field {field_id!r} has no mask array; create the field with with_mask=True")
        _array(g, "mask")[epoch] = np.asarray(mask, dtype="uint8")


def append_epochs(
    path: str | Path,
    field_id: str,
    images: np.ndarray,
    meta: EpochMeta,
    masks: np.ndarray | None = None,
) -> list[int]:
    """Append epochs (later in time than every epoch already there) to a field.

    Parameters
    ----------
    images
        Array (n, ny, nx) in ADU.
    meta
        Metadata for the n new epochs; ``mjd`` must be increasing and after the field's last.
    masks
        Optional (n, ny, nx) uint8 masks.

    Returns
    -------
    list of int
        The new epoch indices.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise StoreError(f"field {field_id!r}: append_epochs needs images of shape (n, ny, nx), got {images.shape}")
    n_new = images.shape[0]
    if len(meta.mjd) != n_new:
        raise StoreError(f"field {field_id!r}: {n_new} images but metadata for {len(meta.mjd)} epochs")
    g = _field_group(path, field_id, mode="r+")
    n_old = _array(g, "image").shape[0]
    new_mjd = np.asarray(meta.mjd, dtype="float64")
    if np.any(np.diff(new_mjd) <= 0):
        raise StoreError(f"field {field_id!r}: appended epochs are not in increasing mjd order; "
                         "sort them by time first")
    if n_old:
        last = float(np.asarray(_array(g, "mjd")[n_old - 1]))
        if new_mjd[0] <= last:
            raise StoreError(
                f"field {field_id!r}: appended epoch mjd {new_mjd[0]:.6f} is not after the last epoch "
                f"(epoch {n_old - 1}, mjd {last:.6f}); the store keeps epochs in time order"
            )
    _check_band_fits(path, g, field_id, meta)  # before anything is resized
    for name in ("image", "mask"):
        if name in g:
            arr = _array(g, name)
            arr.resize((n_old + n_new, *arr.shape[1:]))
    for name in ("epoch", "mjd", "exptime", "airmass", "wcs", "band", "source_file", *HEADER_FWHM_VARIABLES,
                 *HEADER_APCORR_VARIABLES):
        if name in g:
            _array(g, name).resize((n_old + n_new,))
    write_epoch_meta(path, field_id, n_old, meta)
    for i in range(n_new):
        write_epoch_pixels(path, field_id, n_old + i, images[i], None if masks is None else masks[i])
    return list(range(n_old, n_old + n_new))


def list_fields(path: str | Path) -> list[str]:
    """Field ids in a store, sorted.

    Parameters
    ----------
    path
        The survey store.

    Returns
    -------
    list of str
        The field ids (empty when the store has no ``fields`` group).
    """
    root = _open_root(path)
    if "fields" not in root:
        return []
    return sorted(name for name, _ in _group(root, "fields").groups())


def store_attrs(path: str | Path) -> dict[str, Any]:
    """Root attributes of a store.

    Parameters
    ----------
    path
        The survey store.

    Returns
    -------
    dict
        A copy of the root attributes (``survey_proc_format``, ``band``, ...).
    """
    return dict(_open_root(path).attrs)


def bands_per_epoch(path: str | Path) -> bool:
    """Whether the store keeps a band per epoch (format 2 and later).

    False for a format-1 store: every epoch has the root attribute ``band``, so a caller
    can say "this store has one band for all epochs (format 1)" where bands matter.

    Parameters
    ----------
    path
        The survey store.

    Returns
    -------
    bool
        True when the store's format records a band per epoch.
    """
    return _format_version(_open_root(path)) >= 2


def store_bands(path: str | Path) -> list[str]:
    """Every band of the store, in a stable order: first appearance over fields (sorted) and epochs.

    A format-1 store gives its one root ``band`` ("" when absent). An epoch whose band is
    unknown contributes "" (a band of its own).

    Parameters
    ----------
    path
        The survey store.

    Returns
    -------
    list of str
        The distinct bands.
    """
    seen: dict[str, None] = {}
    for fid in list_fields(path):
        for b in _field_bands(path, fid):
            seen.setdefault(str(b), None)
    if not seen and not bands_per_epoch(path):
        seen[str(store_attrs(path).get("band", ""))] = None
    return list(seen)


def _field_bands(path: str | Path, field_id: str) -> np.ndarray:
    """Band per epoch of a field (str array); the root ``band`` for a field without a ``band`` variable."""
    g = _field_group(path, field_id)
    n = _array(g, "mjd").shape[0]
    if "band" not in g:
        return np.full(n, str(store_attrs(path).get("band", "")), dtype=object).astype(str)
    vals = np.asarray(_array(g, "band")[:])
    return np.asarray([str(b).strip() if b is not None else "" for b in vals], dtype=str).reshape(n)


def field_attrs(path: str | Path, field_id: str) -> dict[str, Any]:
    """Attributes of one field group.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.

    Returns
    -------
    dict
        A copy of the field's attributes (gain in e-/ADU, read noise in e-, saturation in ADU, ...).
    """
    return dict(_field_group(path, field_id).attrs)


def open_field(path: str | Path, field_id: str, *, chunks: Any = None) -> xr.Dataset:
    """Open one field as a lazy, dask-backed ``xarray.Dataset``.

    ``chunks=None`` keeps the store's chunks. The dataset's ``attrs`` merge the field's
    attributes over the store's root attributes.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.
    chunks
        Dask chunks, as for :func:`xarray.open_zarr`; None keeps the store's.

    Returns
    -------
    xarray.Dataset
        The field's variables (``image``, ``mask``, ``mjd``, ...), indexed by ``epoch``.
    """
    _field_group(path, field_id)  # clear error for a missing field
    ds = xr.open_zarr(str(path), group=f"fields/{field_id}", consolidated=False, zarr_format=3,
                      chunks={} if chunks is None else chunks)
    ds.attrs = {**store_attrs(path), **ds.attrs, "field": field_id}
    if "band" not in ds:  # format 1: the root band for every epoch
        ds = ds.assign(band=("epoch", _field_bands(path, field_id)))
    return ds


def reference_catalog_path(path: str | Path) -> Location | None:
    """Absolute path of the reference catalogue the store names, or None.

    Parameters
    ----------
    path
        The survey store.

    Returns
    -------
    Path, URL or None
        The catalogue's absolute path (a relative attribute is taken relative to the store,
        which may be a URL); None when the store names none.
    """
    rel = store_attrs(path).get("reference_catalog")
    if not rel:
        return None
    if storage.is_remote(rel) or os.path.isabs(rel):
        return storage.location(rel, "the store's reference_catalog")
    if storage.is_remote(path):
        scheme, key = str(path).split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(key, rel))}"
    return (Path(path) / rel).resolve()


def _dtype_ok(arr: zarr.Array, expected: Any) -> bool:
    if expected is None:  # variable-length string
        return (arr.dtype == np.dtype("O") or arr.dtype.kind in ("T", "O", "U")
                or (isinstance(arr.metadata, ArrayV3Metadata) and "str" in str(arr.metadata.data_type).lower()))
    return arr.dtype == expected


def validate_store(path: str | Path, *, raise_on_error: bool = True, epoch_checks: bool = True) -> list[str]:
    """Check a store against the format; return (or raise with) every problem found.

    Checks: the format version and root attributes; that there are fields; per field the
    required variables, their dtypes, dimensions and shapes, chunking, the ``epoch``
    coordinate, strictly increasing ``mjd`` (over its finite values), the required
    detector attributes and, with ``epoch_checks``, :func:`epoch_problems` (finite ``mjd``,
    positive ``exptime``). ``survey-proc run`` checks those per epoch instead and leaves the
    bad epochs out. Each problem names the field and variable.

    Raises
    ------
    StoreValidationError
        When ``raise_on_error`` and anything is wrong.

    Parameters
    ----------
    path
        The survey store.
    raise_on_error
        Raise when a problem is found (else only return the list).
    epoch_checks
        Include the per-epoch metadata checks of :func:`epoch_problems`.

    Returns
    -------
    list of str
        One message per problem; empty for a valid store.
    """
    problems: list[str] = []
    root = _open_root(path)
    attrs = dict(root.attrs)
    version = attrs.get("survey_proc_format")
    if version is None:
        problems.append("root: attribute 'survey_proc_format' is missing; this is not a survey-proc store")
    elif version not in SUPPORTED_FORMATS or isinstance(version, bool):
        reads = " and ".join(str(v) for v in SUPPORTED_FORMATS)
        newer = isinstance(version, int) and version > FORMAT_VERSION
        problems.append(
            f"root: format version {version!r} is not supported (this survey-proc reads versions {reads}); "
            + ("the store was written by a newer survey-proc: upgrade survey-proc, or " if newer else "")
            + "re-create the store with this survey-proc (survey-proc ingest or simulate)"
        )
    for key in REQUIRED_ROOT_ATTRS[1:]:
        if key not in attrs:
            problems.append(f"root: attribute {key!r} is missing")
    field_ids = list_fields(path)
    if not field_ids:
        problems.append("root: the store has no fields (expected groups under fields/)")
    for fid in field_ids:
        problems.extend(_validate_field(_group(_group(root, "fields"), fid), fid, epoch_checks,
                                        version=_format_version(root)))
    if problems and raise_on_error:
        raise StoreValidationError(str(path), problems)
    return problems


def epoch_problems(mjd: np.ndarray, exptime_s: np.ndarray) -> dict[int, str]:
    """Epochs whose metadata make them unusable; returns epoch -> message.

    Unusable: a non-finite mid-exposure MJD or an exposure time that is not > 0. The
    message names the variable and what to do.

    Parameters
    ----------
    mjd
        Mid-exposure MJD per epoch (days).
    exptime_s
        Exposure time per epoch (seconds).
    """
    out: dict[int, str] = {}
    for e in np.flatnonzero(~(exptime_s > 0)):
        out[int(e)] = f"variable 'exptime': {exptime_s[e]} s at epoch {e}; exposure times must be > 0"
    for e in np.flatnonzero(~np.isfinite(mjd)):
        out[int(e)] = f"variable 'mjd': not finite at epoch {e}; every epoch needs a mid-exposure MJD"
    return dict(sorted(out.items()))


def _validate_field(g: zarr.Group, fid: str, epoch_checks: bool = True, version: int = FORMAT_VERSION) -> list[str]:
    problems: list[str] = []
    where = f"field {fid!r}"
    arrays = dict(g.arrays())
    names = set(arrays)
    for key in REQUIRED_FIELD_ATTRS:
        if key not in g.attrs:
            problems.append(f"{where}: attribute {key!r} is missing")
    for var in REQUIRED_VARIABLES:
        if var not in names:
            problems.append(f"{where}, variable {var!r}: missing (required by the survey store format)")
    for var in REQUIRED_VARIABLES_V2 if version >= 2 else ():
        if var not in names:
            problems.append(f"{where}, variable {var!r}: missing (required by format {version}, which keeps a "
                            "band per epoch); re-create the store, or set its survey_proc_format to 1 if it has "
                            "one band for all epochs")
    n_epochs = arrays["image"].shape[0] if "image" in names else None
    for var in sorted(names & set(SCHEMA)):
        arr = arrays[var]
        label, dtype, dims = SCHEMA[var]
        if not _dtype_ok(arr, dtype):
            problems.append(f"{where}, variable {var!r}: dtype {arr.dtype} but the format requires {label}")
        meta = arr.metadata
        got_dims = tuple((meta.dimension_names if isinstance(meta, ArrayV3Metadata) else None) or ())
        if got_dims != dims:
            problems.append(f"{where}, variable {var!r}: dimensions {got_dims} but the format requires {dims}")
        if len(arr.shape) != len(dims):
            problems.append(f"{where}, variable {var!r}: shape {arr.shape} has {len(arr.shape)} axes, "
                            f"expected {len(dims)}")
            continue
        if n_epochs is not None and arr.shape[0] != n_epochs:
            problems.append(f"{where}, variable {var!r}: {arr.shape[0]} epochs but image has {n_epochs}")
    if "image" in names and len(arrays["image"].shape) == 3:
        chunks = arrays["image"].chunks
        if chunks[0] != 1 or chunks[1] > MAX_CHUNK_PX or chunks[2] > MAX_CHUNK_PX:
            problems.append(f"{where}, variable 'image': chunks {chunks} but the format requires (1, <=2048, <=2048)")
        if "mask" in names and arrays["mask"].shape != arrays["image"].shape:
            problems.append(f"{where}, variable 'mask': shape {arrays['mask'].shape} differs from image "
                            f"{arrays['image'].shape}")
    if "epoch" in names and n_epochs is not None and arrays["epoch"].shape == (n_epochs,):
        ep = np.asarray(arrays["epoch"][:])
        if not np.array_equal(ep, np.arange(n_epochs)):
            bad = int(np.flatnonzero(ep != np.arange(n_epochs))[0])
            problems.append(f"{where}, variable 'epoch': must be 0..{n_epochs - 1} in order; "
                            f"epoch index {bad} holds {ep[bad]}")
    mjd = np.asarray(arrays["mjd"][:], dtype="float64") if "mjd" in names and arrays["mjd"].ndim == 1 else None
    exptime = (np.asarray(arrays["exptime"][:], dtype="float64")
               if "exptime" in names and arrays["exptime"].ndim == 1 else None)
    if epoch_checks and mjd is not None and exptime is not None and len(mjd) == len(exptime):
        problems.extend(f"{where}, {msg}" for msg in epoch_problems(mjd, exptime).values())
    problems.extend(_wcs_problems(g, fid, arrays, epoch_checks))
    if mjd is not None:
        ok = np.flatnonzero(np.isfinite(mjd))
        steps = np.diff(mjd[ok])
        if np.any(steps <= 0):
            i = int(np.flatnonzero(steps <= 0)[0])
            bad, prev = int(ok[i + 1]), int(ok[i])
            problems.append(
                f"{where}, variable 'mjd': not strictly increasing at epoch {bad} "
                f"(mjd {mjd[bad]:.6f} after {mjd[prev]:.6f}); epochs must be stored in time order"
            )
    return problems


def _wcs_problems(g: zarr.Group, fid: str, arrays: dict[str, zarr.Array], every_epoch: bool) -> list[str]:
    """WCS texts that cannot be parsed: the field's reference frame always, every epoch's with ``every_epoch``.

    The reference frame is the ``reference_wcs`` attribute, else the first epoch with a WCS
    (as ``survey-proc run`` chooses it): a bad one stops a run, a bad epoch WCS only leaves
    that epoch out.
    """
    from survey_proc.catalog.astrometry import WcsParseError, parse_wcs

    where = f"field {fid!r}"
    texts: list[str] = []
    if "wcs" in arrays and arrays["wcs"].ndim == 1:
        texts = [str(t) if t is not None else "" for t in np.asarray(arrays["wcs"][:])]
    problems: list[str] = []
    ref_attr = str(g.attrs.get("reference_wcs") or "")
    first = next((e for e, t in enumerate(texts) if t.strip()), None)
    checks: list[tuple[str, str]] = []  # (what, text)
    if ref_attr.strip():
        checks.append(("attribute 'reference_wcs' (the field's reference frame)", ref_attr))
    elif first is not None:
        checks.append((f"variable 'wcs' at epoch {first} (the field's reference frame)", texts[first]))
    if every_epoch:
        checks.extend((f"variable 'wcs' at epoch {e}", t) for e, t in enumerate(texts)
                      if t.strip() and not (e == first and not ref_attr.strip()))
    bad = 0
    for what, text in checks:
        try:
            parse_wcs(text)
        except WcsParseError as exc:
            bad += 1
            if bad <= 5:
                problems.append(f"{where}, {what}: {exc}")
    if bad > 5:
        problems.append(f"{where}: {bad - 5} more epoch(s) with a WCS that cannot be parsed")
    return problems


def read_window(path: str | Path, field_id: str, epoch: int, y0: int, y1: int, x0: int, x1: int
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixels ``image[epoch, y0:y1, x0:x1]`` (float32, ADU) and the mask window (or None).

    Reads straight from Zarr (no xarray/dask), so a worker task decompresses only the
    chunks its window touches. Raises :class:`StoreError` naming the field and epoch when
    the chunk cannot be read. A task reading many epochs opens a :class:`PixelReader` once.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.
    epoch
        Index of the epoch.
    y0, y1, x0, x1
        The window's rows ``y0:y1`` and columns ``x0:x1`` (pixels, image frame).

    Returns
    -------
    image, mask
        ``(y1 - y0, x1 - x0)`` pixels (float32, ADU) and mask bits (uint8), or None without a mask.
    """
    return PixelReader(path, field_id).window(epoch, y0, y1, x0, x1)


class PixelReader:
    """Windows of one field's epochs, its Zarr group and arrays opened once.

    Opening the group and arrays costs more than decompressing a 512^2 chunk (measured: 4.7 ms
    against 1.3 ms per epoch): a task that reads every epoch (the blend vetting) keeps one reader.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.

    Raises
    ------
    StoreError
        When the field or its ``image`` array cannot be opened.
    """

    def __init__(self, path: str | Path, field_id: str) -> None:
        self.path, self.field_id = path, field_id
        g = _field_group(path, field_id)
        try:
            self._image = _array(g, "image")
            self._mask = _array(g, "mask") if "mask" in g else None
        except Exception as exc:  # a missing or damaged array's metadata
            raise StoreError(f"{path}: field {field_id}: cannot open the pixel arrays ({type(exc).__name__}: {exc}); "
                             "check the store with `survey-proc validate`") from exc
        self._check = not storage.is_remote(path)

    def window(self, epoch: int, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``image[epoch, y0:y1, x0:x1]`` (float32, ADU) and the mask window (uint8 or None), as :func:`read_window`."""
        image, mask = self._read([epoch], slice(epoch, epoch + 1), y0, y1, x0, x1, f"epoch {epoch}", "that epoch")
        return image[0], None if mask is None else mask[0]

    def windows(self, epochs: list[int], y0: int, y1: int, x0: int, x1: int
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """``image[epochs, y0:y1, x0:x1]`` (float32, ADU) and the mask windows (uint8, or None) in one read.

        One Zarr selection for several epochs (their chunks decoded together): per epoch about half
        the time of :meth:`window` on a 256^2 field. A damaged chunk fails the whole read with a
        :class:`StoreError` naming the epochs; a caller that must isolate it reads them one by one.

        Parameters
        ----------
        epochs
            Epoch indices (any order; consecutive ones are read as one slice).
        y0, y1, x0, x1
            The window, the same for every epoch (pixels, image frame).

        Returns
        -------
        images, masks
            ``(len(epochs), y1 - y0, x1 - x0)`` pixels (float32, ADU) and mask bits (uint8), or None
            without a mask, in the order of ``epochs``.
        """
        ep = np.asarray(epochs, int)
        sel: Any = slice(int(ep[0]), int(ep[-1]) + 1) if len(ep) and np.all(np.diff(ep) == 1) else ep
        what = f"epochs {ep.min()}-{ep.max()}" if len(ep) else "no epochs"
        return self._read([int(e) for e in ep], sel, y0, y1, x0, x1, what, "those epochs")

    def _read(self, epochs: list[int], sel: Any, y0: int, y1: int, x0: int, x1: int, what: str, which: str
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """The Blosc check of every epoch's chunks, then one selection ``sel`` of both arrays; errors name ``what``."""
        path, field_id = self.path, self.field_id
        try:
            if self._check:  # an object is whole or absent (one PUT)
                for e in epochs:
                    for name, arr in (("image", self._image), ("mask", self._mask)):
                        if arr is not None:
                            _check_blosc_chunks(Path(path) / "fields" / field_id / name, arr, e, y0, y1, x0, x1)
            box = (sel, slice(y0, y1), slice(x0, x1))
            image = np.asarray(self._image.get_orthogonal_selection(box), dtype=np.float32)
            mask = np.asarray(self._mask.get_orthogonal_selection(box)) if self._mask is not None else None
        except Exception as exc:  # a corrupt or missing chunk: zarr/numcodecs raise many types
            raise StoreError(f"{path}: field {field_id} {what}: cannot read pixels [{y0}:{y1}, {x0}:{x1}] "
                             f"({type(exc).__name__}: {exc}); check or re-ingest {which}") from exc
        return image, mask


def _check_blosc_chunks(array_dir: Path, arr: zarr.Array, epoch: int, y0: int, y1: int, x0: int, x1: int) -> None:
    """Refuse a truncated or damaged Blosc chunk file before it is decompressed.

    Blosc trusts the compressed size in its 16-byte header; decompressing a file shorter
    than that reads past the buffer, which can crash the worker process (seen with a chunk
    cut in half: the task killed four workers in a row). A chunk whose file size is not
    the header's is reported instead. Absent chunks are fine (they read as the fill value).
    """
    if not array_dir.is_dir() or not any(isinstance(c, BloscCodec) for c in arr.compressors):
        return
    _, cy, cx = arr.chunks
    for iy in range(y0 // cy, (y1 - 1) // cy + 1):
        for ix in range(x0 // cx, (x1 - 1) // cx + 1):
            chunk = array_dir / "c" / str(epoch) / str(iy) / str(ix)
            try:
                size = chunk.stat().st_size
                with open(chunk, "rb") as f:
                    header = f.read(16)
            except FileNotFoundError:
                continue
            said = int.from_bytes(header[12:16], "little") if len(header) == 16 else None
            if said != size:
                raise ValueError(f"chunk file {chunk} is truncated or damaged ({size} bytes; its Blosc header says "
                                 f"{said if said is not None else 'nothing'})")


def read_epoch_table(path: str | Path, field_id: str) -> dict[str, np.ndarray]:
    """Per-epoch metadata of a field as arrays: epoch, mjd, exptime, airmass, wcs (header text), band.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.

    Returns
    -------
    dict of str to ndarray
        ``epoch``, ``mjd`` (days), ``exptime`` (seconds), ``airmass``, ``wcs`` (object
        array of header text, "" when unknown) and ``band`` (str array, "" when unknown; the
        root ``band`` for every epoch of a format-1 store, see :func:`bands_per_epoch`), one
        entry per epoch.
    """
    g = _field_group(path, field_id)
    out = {name: np.asarray(_array(g, name)[:]) for name in ("epoch", "mjd", "exptime", "airmass")}
    out["wcs"] = np.asarray([str(s) if s is not None else "" for s in np.asarray(_array(g, "wcs")[:])], dtype=object)
    out["band"] = _field_bands(path, field_id)
    return out


def read_header_fwhm(path: str | Path, field_id: str) -> tuple[np.ndarray, list[str]] | None:
    """The seeing FWHM from each epoch's FITS header and where it came from; None when the field keeps none.

    Written by ``survey-proc ingest`` (:func:`survey_proc.ingest.header_fwhm`); a simulated
    store has none.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.

    Returns
    -------
    (fwhm_px, source) or None
        Per epoch the FWHM (px, float64; NaN when the header gave none or it was refused)
        and the keyword it came from (``"refused: ..."`` with the reason, "" when none).
    """
    g = _field_group(path, field_id)
    if "header_fwhm_px" not in g:
        return None
    fwhm = np.asarray(_array(g, "header_fwhm_px")[:], dtype="float64")
    return fwhm, _optional_strings(g, "header_fwhm_source", len(fwhm))


def read_header_apcorr(path: str | Path, field_id: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Each epoch's aperture correction from its PSFEx model; None when the field keeps none.

    Written by ``survey-proc ingest --psfex`` (:func:`survey_proc.ingest.psfex_epoch_apcorr`);
    a simulated store, and a store ingested without ``--psfex``, has none.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.

    Returns
    -------
    (apcorr, fwhm_px, source) or None
        Per epoch the correction (total / aperture flux, float64; NaN when none), the FWHM
        (px, float64) its radii were scaled with, and the PSFEx file, CCD and point of
        evaluation ("" when none).
    """
    g = _field_group(path, field_id)
    if "header_apcorr" not in g or "header_apcorr_fwhm_px" not in g:
        return None
    apcorr = np.asarray(_array(g, "header_apcorr")[:], dtype="float64")
    fwhm = np.asarray(_array(g, "header_apcorr_fwhm_px")[:], dtype="float64")
    return apcorr, fwhm, _optional_strings(g, "header_apcorr_source", len(apcorr))


def read_source_files(path: str | Path, field_id: str) -> list[str]:
    """The recorded source of every epoch of a field ("" where unknown).

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.

    Returns
    -------
    list of str
        One entry per epoch.
    """
    g = _field_group(path, field_id)
    if "source_file" not in g:
        return [""] * _array(g, "mjd").shape[0]
    return [str(s) if s is not None else "" for s in np.asarray(_array(g, "source_file")[:])]


def image_shape(path: str | Path, field_id: str) -> tuple[int, int, int]:
    """``(n_epochs, ny, nx)`` of a field's image array.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.

    Returns
    -------
    tuple of int
        Epochs, rows and columns (pixels).
    """
    n, ny, nx = _array(_field_group(path, field_id), "image").shape
    return int(n), int(ny), int(nx)


def image_chunks(path: str | Path, field_id: str) -> tuple[int, int, int]:
    """Chunk shape ``(1, cy, cx)`` of a field's image array.

    Parameters
    ----------
    path
        The survey store.
    field_id
        The field.

    Returns
    -------
    tuple of int
        1 (epoch), rows and columns (pixels) of one chunk.
    """
    c0, cy, cx = _array(_field_group(path, field_id), "image").chunks
    return int(c0), int(cy), int(cx)
