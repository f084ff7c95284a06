"""Stage 4, crossmatch: per (field, region), the calibrated sources of every epoch -> objects and light curves.

Each region task reads the sources of the region (plus a margin) from every calibrated
epoch, links them into objects (:mod:`survey_proc.catalog.crossmatch`), and writes
``lightcurves/`` then ``objects/`` (a region counts as done only when its objects file
exists). Epochs without a finite zero point are left out.

Resume: a region is skipped when both its files carry this run's fingerprint and the
digest of the inputs it read (epoch, rows and zero point of each sources unit), so a
region whose epochs changed is done again.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import pandas as pd

from survey_proc import storage, store
from survey_proc.catalog import crossmatch as xm
from survey_proc.catalog.astrometry import parse_wcs, pixel_to_world
from survey_proc.catalog.schema import LIGHTCURVES, OBJECTS, objects_schema
from survey_proc.outputs import write_parquet_atomic
from survey_proc.stages.base import OutputUnit, Stage, StageContext, Submission, task_config, worker_task
from survey_proc.stages.extract import SOURCES_UNIT
from survey_proc.stages.records import EpochRecord

OBJECTS_UNIT = OutputUnit("objects/field={field}/region={region}.parquet", OBJECTS)
LIGHTCURVES_UNIT = OutputUnit("lightcurves/field={field}/region={region}.parquet", LIGHTCURVES)
XMATCH_COLUMNS = ["source_id", "epoch", "mjd", "x_ref", "y_ref", "mag", "mag_err", "flux", "flux_err", "flags",
                  "band"]


def inputs_digest(records: list[EpochRecord]) -> str:
    """Digest of the sources a cross-match reads: (epoch, rows, zero point) of each unit."""
    items = sorted((int(r.epoch), int(r.n_sources), round(float(r.zp.zp), 9) if np.isfinite(r.zp.zp) else None)
                   for r in records)
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


@worker_task
def crossmatch_region_task(out: str, field: str, field_index: int, region: xm.Region, epochs: list[int],
                           fwhm_px: float, ref_wcs_text: str, cfg_json: str, fingerprint: str, digest: str,
                           bands: list[str] | None = None) -> dict[str, Any]:
    """Read the region's sources over all epochs, build objects and light curves, write both units.

    ``bands``: the store's bands; objects get per-band means for each (the same columns in
    every field, so a dataset over all fields has one schema).
    """
    t0 = time.perf_counter()
    xc = task_config(cfg_json).crossmatch
    margin = 6.0 * max(xc.match_radius_min_px, xc.match_radius_fwhm * fwhm_px, fwhm_px) + 4.0
    lo_x, hi_x = region.x0 - 0.5 - margin, region.x1 - 0.5 + margin
    lo_y, hi_y = region.y0 - 0.5 - margin, region.y1 - 0.5 + margin
    parts = []
    for e in epochs:
        df = storage.read_table(SOURCES_UNIT.path(out, field=field, epoch=e), columns=XMATCH_COLUMNS).to_pandas()
        sel = (df["x_ref"] >= lo_x) & (df["x_ref"] < hi_x) & (df["y_ref"] >= lo_y) & (df["y_ref"] < hi_y)
        parts.append(df[sel.to_numpy()])
    t_read = time.perf_counter() - t0
    src = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=XMATCH_COLUMNS)
    objects, lc, info = xm.crossmatch_region(src, region, field=field, field_index=field_index, fwhm_px=fwhm_px,
                                             match_radius_fwhm=xc.match_radius_fwhm,
                                             match_radius_min_px=xc.match_radius_min_px,
                                             min_epochs=xc.min_epochs, seed_bin_px=xc.seed_bin_px, bands=bands,
                                             merge_radius_fwhm=xc.merge_radius_fwhm)
    ref_wcs = parse_wcs(ref_wcs_text) if ref_wcs_text else None
    objects["ra"], objects["dec"] = pixel_to_world(ref_wcs, objects["x"].to_numpy(), objects["y"].to_numpy())
    record = {"unit": "crossmatch", "field": field, "region": region.index, "n_epochs_in": len(epochs),
              "digest": digest, "fingerprint": fingerprint, **info, "read_s": t_read,
              "wall_s": time.perf_counter() - t0}
    # light curves first: a region counts as done only when its objects file exists
    write_parquet_atomic(lc, LIGHTCURVES, LIGHTCURVES_UNIT.path(out, field=field, region=region.index), record)
    write_parquet_atomic(objects, objects_schema(bands or []), OBJECTS_UNIT.path(out, field=field, region=region.index),
                         record)
    return record


class CrossmatchStage(Stage):
    """Objects and light curves per (field, region)."""

    name = "crossmatch"
    unit = OBJECTS_UNIT
    also_writes = (LIGHTCURVES_UNIT,)
    config_sections = ("crossmatch",)

    def done(self, ctx: StageContext, **key: Any) -> dict[str, Any] | None:
        """Both files of the region carry this fingerprint and ``key["digest"]``; returns the objects record."""
        digest = key.pop("digest")
        recs = [u.record(ctx.cfg.out, **key) for u in (LIGHTCURVES_UNIT, OBJECTS_UNIT)]
        if any(m is None or m.get("fingerprint") != ctx.fingerprint or m.get("digest") != digest for m in recs):
            return None
        return recs[1]

    def run(self, ctx: StageContext) -> None:
        """Cross-match every region of every field with calibrated epochs, skipping the done ones."""
        state = ctx.state
        total = sum(len(p.regions) for p in ctx.plans)
        units: list[Submission] = []
        skipped = 0
        bands = [b for b in store.store_bands(ctx.cfg.store) if b]
        for p in ctx.plans:
            recs = [r for r in state.field_records(p).values() if r.calibrated]
            if not recs:
                continue
            epochs = sorted(int(r.epoch) for r in recs)
            digest = inputs_digest(recs)
            fwhm = float(np.median([r.fwhm_px for r in recs]))
            for reg in p.regions:
                rec = self.done(ctx, field=p.field, region=reg.index, digest=digest)
                if rec is not None:
                    skipped += 1
                    state.regions[(p.field, reg.index)] = rec
                    continue
                units.append(Submission({"field": p.field, "region": reg.index}, crossmatch_region_task,
                                        (ctx.cfg.out, p.field, p.index, reg, epochs, fwhm, p.ref_wcs_text,
                                         ctx.cfg_json, ctx.fingerprint, digest, bands)))
        bar = ctx.bar(self.name, total, skipped)
        state.counts["regions_skipped_resume"] = skipped

        def done(key: dict[str, Any], rec: dict[str, Any]) -> None:
            state.regions[(key["field"], key["region"])] = rec

        ctx.map(self.name, units, done, bar)
