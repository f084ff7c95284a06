"""The driver's plan of a run: which fields, epochs, blocks and regions, and which reference catalogue.

Everything here runs on the driver before any task, and refuses bad input before
anything is written (a refused run writes nothing).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from survey_proc import storage, store
from survey_proc.catalog.astrometry import parse_wcs, pixel_to_world
from survey_proc.catalog.calibrate import reference_in_frame
from survey_proc.catalog.crossmatch import Region, region_grid
from survey_proc.config import RunConfig
from survey_proc.errors import ConfigError, SurveyProcError
from survey_proc.storage import Location
from survey_proc.tiling import Tile, block_window, tile_blocks, tile_grid

REFERENCE_COLUMNS = ("ra", "dec", "mag", "mag_err")


@dataclass
class FieldPlan:
    """What a run does with one field."""

    field: str
    index: int  # position in the store's sorted field list (part of source/object ids)
    n_epochs: int  # epochs processed: the first n of the store
    ny: int
    nx: int
    gain_e_per_adu: float
    saturation_adu: float
    zeropoint_nominal: float
    ref_wcs_text: str
    epoch_meta: list[dict[str, Any]]
    blocks: list[tuple[list[Tile], tuple[int, int, int, int]]]  # (tiles, window)
    regions: list[Region]
    unusable: dict[int, str] = dataclasses.field(default_factory=dict)  # epoch -> why its metadata make it unusable

    @property
    def epochs(self) -> list[int]:
        """The epochs to process (the unusable ones left out)."""
        return [e for e in range(self.n_epochs) if e not in self.unusable]


@functools.lru_cache(maxsize=8)
def reference_stars(path: str, ref_wcs_text: str) -> pd.DataFrame:
    """The reference catalogue at ``path`` in a field's reference frame (cached per process)."""
    wcs = parse_wcs(ref_wcs_text) if ref_wcs_text else None
    return reference_in_frame(storage.read_table(path).to_pandas(), wcs)


def resolve_reference(cfg: RunConfig) -> Location | None:
    """The reference catalogue to use (``--reference`` or the store's), checked; None: relative calibration.

    ``--reference none`` asks for relative calibration even when the store names a catalogue.
    """
    if cfg.reference is not None and cfg.reference.lower() == "none":
        return None
    path = storage.location(cfg.reference, "--reference") if cfg.reference else store.reference_catalog_path(cfg.store)
    if path is None:
        return None
    if not storage.exists(path):
        src = "--reference" if cfg.reference else f"the store's reference_catalog attribute ({cfg.store})"
        raise ConfigError(f"reference catalogue {path} (from {src}) does not exist; pass --reference PATH "
                          "or remove the attribute to calibrate relative to a reference epoch")
    try:
        names = storage.read_schema(path).names
    except Exception as exc:
        raise ConfigError(f"reference catalogue {path} is not a readable Parquet file ({exc})") from None
    missing = [c for c in REFERENCE_COLUMNS if c not in names]
    if missing:
        raise ConfigError(f"reference catalogue {path} lacks column(s) {', '.join(missing)}; "
                          f"it needs {', '.join(REFERENCE_COLUMNS)} (deg, deg, mag, mag)")
    if storage.read_metadata(path).num_rows == 0:
        raise ConfigError(f"reference catalogue {path} has no rows; pass a catalogue of the field's stars with "
                          "--reference PATH, or --reference none to calibrate relative to a reference epoch")
    return path if storage.is_remote(path) else Path(path).resolve()


def check_reference_overlap(reference: Location, plans: list[FieldPlan]) -> None:
    """Refuse a reference catalogue with no star inside a field (a field without a WCS is not checked)."""
    for p in plans:
        if not p.ref_wcs_text:
            continue
        ref = reference_stars(str(reference), p.ref_wcs_text)
        x, y = ref["x_ref"].to_numpy(), ref["y_ref"].to_numpy()
        if not np.any((x >= -0.5) & (x < p.nx - 0.5) & (y >= -0.5) & (y < p.ny - 0.5)):
            ra, dec = pixel_to_world(parse_wcs(p.ref_wcs_text), np.array([(p.nx - 1) / 2]), np.array([(p.ny - 1) / 2]))
            raise ConfigError(
                f"reference catalogue {reference} has no star inside field {p.field} (centre RA {ra[0]:.4f}, "
                f"Dec {dec[0]:.4f} deg; the catalogue spans RA {ref['ra'].min():.4f}..{ref['ra'].max():.4f}, "
                f"Dec {ref['dec'].min():.4f}..{ref['dec'].max():.4f}); pass a catalogue that covers the field, "
                "or --reference none to calibrate relative to a reference epoch")


def plan_fields(cfg: RunConfig) -> list[FieldPlan]:
    """One :class:`FieldPlan` per field to process."""
    all_fields = store.list_fields(cfg.store)
    if not all_fields:
        raise SurveyProcError(f"{cfg.store}: the store has no fields")
    wanted = list(cfg.fields) if cfg.fields else all_fields
    unknown = [f for f in wanted if f not in all_fields]
    if unknown:
        raise ConfigError(f"--fields {', '.join(unknown)}: not in {cfg.store} (it has {', '.join(all_fields)})")
    plans = []
    for fid in wanted:
        attrs = store.field_attrs(cfg.store, fid)
        n_total, ny, nx = store.image_shape(cfg.store, fid)
        n = n_total if cfg.epochs is None else min(cfg.epochs, n_total)
        table = store.read_epoch_table(cfg.store, fid)
        metas = [{"mjd": float(table["mjd"][e]), "exptime": float(table["exptime"][e]),
                  "airmass": float(table["airmass"][e]), "wcs": str(table["wcs"][e]),
                  "band": str(table["band"][e]) if "band" in table else ""} for e in range(n)]
        ref_wcs = str(attrs.get("reference_wcs") or next((m["wcs"] for m in metas if m["wcs"]), ""))
        _, cy, cx = store.image_chunks(cfg.store, fid)
        tiles = tile_grid(ny, nx, cfg.tile_px, cfg.halo_px)
        blocks = [(b, block_window(b)) for b in tile_blocks(tiles, cfg.tiles_per_task, (cy, cx))]
        unusable = store.epoch_problems(table["mjd"][:n].astype(float), table["exptime"][:n].astype(float))
        plans.append(FieldPlan(fid, all_fields.index(fid), n, ny, nx, float(attrs["gain_e_per_adu"]),
                               float(attrs.get("saturation_adu", np.inf)), float(attrs["zeropoint_nominal"]),
                               ref_wcs, metas, blocks, region_grid(ny, nx, cfg.crossmatch.region_px), unusable))
    return plans
