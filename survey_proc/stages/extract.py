"""Stage 1, extract: per (field, epoch), the epoch's pixels -> ``sources/field=F/epoch=E.parquet``.

One task per block of tiles reads its own window from Zarr and runs the detector (and the
BPNN) on it (:func:`extract_block_task`); one task per epoch merges the blocks,
de-duplicates the tile borders, adds astrometry, fits the zero point against an external
reference catalogue and writes the unit (:func:`finalize_epoch_task`). Without a
reference catalogue the zero point stays ``pending`` for the calibrate stage.

FWHM: a block with too few stars to measure its FWHM takes the epoch's seeing from its FITS
header when the store keeps one (``header_fwhm_px``, read at ingest), else
``photometry.fwhm_default_px`` (:mod:`survey_proc.catalog.extract`); the epoch's FWHM falls
back the same way when no block measured it. The record says which (``fwhm_source``).
A store without header FWHMs (the simulator's) runs exactly as before.

Aperture correction: a block with too few stars to measure its own takes the epoch's PSFEx
correction when the store keeps one (``header_apcorr``, computed at ingest with
``--psfex``) and it applies (:func:`survey_proc.photometry.aperture.fallback_apcorr`), else
the Moffat model's. The record's ``apcorr_source`` says so when a block did not measure its
own (None when every block did: :func:`epoch_apcorr_source`). A store without
``header_apcorr`` (the simulator's, an ingest without ``--psfex``) runs exactly as before.

Resume: an epoch whose unit exists with this run's fingerprint is skipped. Epochs whose
metadata make them unusable (no time, no exposure) are recorded as failures without a
task (attempts 0): no retry can give them one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from survey_proc import storage, store
from survey_proc.catalog import calibrate as cal
from survey_proc.catalog.astrometry import parse_wcs
from survey_proc.catalog.extract import FWHM_DEFAULT, FWHM_MEASURED, BlockInfo, epoch_pixel_problem, extract_block
from survey_proc.catalog.merge import merge_epoch
from survey_proc.catalog.schema import SOURCES
from survey_proc.errors import SurveyProcError
from survey_proc.outputs import write_parquet_atomic
from survey_proc.photometry.aperture import APCORR_MEASURED
from survey_proc.photometry.measure import block_seed
from survey_proc.stages.base import OutputUnit, Stage, StageContext, Submission, task_config, worker_task
from survey_proc.stages.plan import FieldPlan, reference_stars
from survey_proc.stages.records import EpochRecord
from survey_proc.tiling import Tile

SOURCES_UNIT = OutputUnit("sources/field={field}/epoch={epoch}.parquet", SOURCES)


@dataclass(frozen=True)
class EpochJob:
    """What the tasks of one epoch need (paths and small values; the pixels are read by the task)."""

    store: str
    out: str
    field: str
    field_index: int
    epoch: int
    # mjd, exptime, airmass, wcs (the store's epoch table row) [, header_fwhm_px/_source, header_apcorr*]
    meta: dict[str, Any]
    ref_wcs_text: str
    reference_path: str | None
    gain_e_per_adu: float
    saturation_adu: float
    cfg_json: str
    fingerprint: str
    t_submit: float


def _block_models(cfg_json: str) -> tuple[Any, Any]:
    """The detector (from the registry, with its model) and the BPNN (or None) this worker holds."""
    from survey_proc.detect.registry import detector_class, make_detector, weights_path
    from survey_proc.distributed.plugins import worker_model

    cfg = task_config(cfg_json)
    kind = detector_class(cfg.detector).model_kind
    detector = make_detector(cfg, worker_model(kind, weights_path(cfg)) if kind else None)
    bpnn = worker_model("bpnn", cfg.bpnn.weights or None) if cfg.bpnn.enabled else None
    return detector, bpnn


@worker_task
def extract_block_task(job: EpochJob, tiles: list[Tile], window: tuple[int, int, int, int]
                       ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read one block's window of one epoch; return its owned detections and its BlockInfo as a dict."""
    t0 = time.perf_counter()
    cfg = task_config(job.cfg_json)
    y0, y1, x0, x1 = window
    image, mask = store.read_window(job.store, job.field, job.epoch, y0, y1, x0, x1)
    t_read = time.perf_counter() - t0
    try:
        detector, bpnn = _block_models(job.cfg_json)
        res = extract_block(image, mask, (y0, x0), tiles, job.gain_e_per_adu, job.saturation_adu, cfg, detector,
                            bpnn, seed=block_seed(cfg.bpnn.seed, job.epoch, (y0, x0)),
                            header_fwhm_px=job.meta.get("header_fwhm_px"),
                            header_fwhm_source=str(job.meta.get("header_fwhm_source", "")),
                            header_apcorr=job.meta.get("header_apcorr"),
                            header_apcorr_fwhm_px=job.meta.get("header_apcorr_fwhm_px"),
                            header_apcorr_source=str(job.meta.get("header_apcorr_source", "")))
    except SurveyProcError as exc:
        raise SurveyProcError(f"field {job.field} epoch {job.epoch} window {window}: {exc}") from exc
    return res.table, {**res.info.to_dict(), "read_s": t_read, "task_s": time.perf_counter() - t0}


def _domain_summary(infos: list[BlockInfo]) -> str | None:
    """The epoch's domain action (:mod:`survey_proc.detect.domain`): the first block's, with the count of blocks."""
    actions = [i.domain for i in infos if i.domain]
    return f"{actions[0]} ({len(actions)} of {len(infos)} block(s))" if actions else None


def header_fwhm_px(meta: dict[str, Any]) -> float | None:
    """The epoch's usable header FWHM (px) from its metadata row, or None."""
    v = meta.get("header_fwhm_px")
    return float(v) if v is not None and np.isfinite(v) and v > 0 else None


def epoch_fwhm_source(infos: list[BlockInfo], meta: dict[str, Any]) -> str:
    """Where the epoch's FWHM came from: its blocks' stars, the header or the default (with a refusal's reason)."""
    srcs = [i.fwhm_source for i in infos]
    n_measured = sum(s == FWHM_MEASURED for s in srcs)
    others = ", ".join(sorted({s for s in srcs if s and s != FWHM_MEASURED})) or FWHM_DEFAULT
    refused = str(meta.get("header_fwhm_source", ""))
    if refused.startswith("refused") and FWHM_DEFAULT in others:
        others += f" (header {refused})"
    if n_measured == len(srcs):
        return FWHM_MEASURED
    if n_measured == 0:
        return others
    return f"{FWHM_MEASURED} in {n_measured} of {len(srcs)} blocks; the others: {others}"


def epoch_apcorr_source(infos: list[BlockInfo]) -> str | None:
    """Where the epoch's aperture corrections came from when a block did not measure its own; None when all did.

    None too when no block has one (a detector's own total flux, blocks from before).
    """
    srcs = [i.apcorr_source for i in infos if i.apcorr_source]
    n_measured = sum(s == APCORR_MEASURED for s in srcs)
    if n_measured == len(srcs):
        return None
    others = "; ".join(sorted({s for s in srcs if s != APCORR_MEASURED}))
    if n_measured == 0:
        return others
    return f"{APCORR_MEASURED} in {n_measured} of {len(srcs)} blocks; the others: {others}"


@worker_task
def finalize_epoch_task(job: EpochJob, blocks: list[tuple[pd.DataFrame, dict[str, Any]]]) -> EpochRecord:
    """Merge an epoch's blocks, add astrometry, calibrate (with an external reference), write sources.

    Returns the epoch record (also stored in the file's footer). An epoch with no measurable
    pixel (all NaN/inf/masked/saturated, or a constant image) raises and writes nothing.
    """
    t0 = time.perf_counter()
    cfg = task_config(job.cfg_json)
    field, epoch, meta = job.field, job.epoch, job.meta
    infos = [BlockInfo(**{k: v for k, v in b[1].items() if k not in ("read_s", "task_s")}) for b in blocks]
    problem = epoch_pixel_problem(infos, job.saturation_adu)
    if problem:
        raise SurveyProcError(f"field {field} epoch {epoch}: {problem}; the epoch is left out of this run. "
                              "Check the exposure it came from (the store's source_file) and re-ingest it")
    try:
        epoch_wcs = parse_wcs(meta["wcs"])
    except ValueError as exc:
        raise SurveyProcError(f"field {field} epoch {epoch}: the stored WCS is unusable ({exc}); "
                              "fix the epoch's wcs header text") from exc
    ref_wcs = parse_wcs(job.ref_wcs_text) if job.ref_wcs_text else None
    src, fwhm, n_dup = merge_epoch([b[0] for b in blocks], infos, field=field, field_index=job.field_index,
                                   epoch=epoch, mjd=meta["mjd"], epoch_wcs=epoch_wcs, ref_wcs=ref_wcs,
                                   dedup_radius_fwhm=cfg.detection.dedup_radius_fwhm,
                                   default_fwhm_px=header_fwhm_px(meta) or cfg.photometry.fwhm_default_px,
                                   band=meta.get("band", ""))
    if job.reference_path is not None:
        zp = cal.calibrate_epoch(src, reference_stars(job.reference_path, job.ref_wcs_text), fwhm, cfg.calibration)
    else:
        zp = cal.ZeroPoint.pending()
    cal.apply_zeropoint(src, zp)
    record = EpochRecord(
        field=field, epoch=epoch, band=meta.get("band", ""), mjd=meta["mjd"], airmass=meta["airmass"],
        exptime_s=meta["exptime"],
        n_sources=len(src), n_duplicates=n_dup, fwhm_px=fwhm, apcorr=float(np.median([i.apcorr for i in infos])),
        n_apcorr_stars=int(min(i.n_apcorr_stars for i in infos)), bkg_adu=float(np.median([i.bkg_adu for i in infos])),
        rms_adu=float(np.median([i.rms_adu for i in infos])), bad_px=int(sum(i.bad_px for i in infos)),
        fallback=",".join(sorted({i.fallback for i in infos if i.fallback})) or None,
        domain=_domain_summary(infos), apcorr_source=epoch_apcorr_source(infos),
        has_wcs=epoch_wcs is not None, zp=zp, fingerprint=job.fingerprint,
        queue_to_done_s=time.time() - job.t_submit, finalize_s=time.perf_counter() - t0,
        read_s=float(sum(b[1].get("read_s", 0.0) for b in blocks)),
        extract_s=float(sum(b[1].get("task_s", 0.0) for b in blocks)),
        extra={"fwhm_source": epoch_fwhm_source(infos, meta)},
        halos=None if all(i.halos is None for i in infos) else [h for i in infos for h in (i.halos or [])])
    write_parquet_atomic(src, SOURCES, SOURCES_UNIT.path(job.out, field=field, epoch=epoch), record.to_dict())
    return record


class ExtractStage(Stage):
    """Detection, photometry, astrometry and (with an external reference) calibration per epoch."""

    name = "extract"
    unit = SOURCES_UNIT
    config_sections = ("detection", "pnet", "bpnn", "photometry", "calibration")

    def run(self, ctx: StageContext) -> None:
        """Extract every epoch not yet written with this fingerprint; unusable epochs become failures."""
        cfg, state = ctx.cfg, ctx.state
        todo: list[tuple[FieldPlan, int]] = []
        for p in ctx.plans:
            for e, why in p.unusable.items():  # not submitted: no retry can give it a time or an exposure
                state.failures.append({"stage": self.name, "field": p.field, "epoch": e, "attempts": 0,
                                       "error": f"{cfg.store}: field {p.field}, {why}; the epoch is left out. Fix "
                                                "the store's metadata (or re-ingest the exposure) and run again"})
            for e in p.epochs:
                rec = self.done(ctx, field=p.field, epoch=e)
                if rec is not None:
                    state.records[(p.field, e)] = EpochRecord.from_dict(rec)
                else:
                    todo.append((p, e))
        total = sum(len(p.epochs) for p in ctx.plans)
        bar = ctx.bar(self.name, total, total - len(todo))
        state.counts["epochs_skipped_resume"] = total - len(todo)
        # the seeing from the FITS headers, where ingest stored it (None: a store without, e.g. simulated)
        header_fwhm = {f: store.read_header_fwhm(cfg.store, f) for f in {p.field for p, _ in todo}}
        # ... and the PSFEx aperture correction, where ingest stored one (--psfex)
        header_apcorr = {f: store.read_header_apcorr(cfg.store, f) for f in {p.field for p, _ in todo}}

        def epoch_meta(p: FieldPlan, e: int) -> dict[str, Any]:
            meta = p.epoch_meta[e]
            h = header_fwhm.get(p.field)
            if h is not None and e < len(h[0]):
                meta = {**meta, "header_fwhm_px": float(h[0][e]), "header_fwhm_source": h[1][e]}
            a = header_apcorr.get(p.field)
            if a is not None and e < len(a[0]) and np.isfinite(a[0][e]):
                meta = {**meta, "header_apcorr": float(a[0][e]), "header_apcorr_fwhm_px": float(a[1][e]),
                        "header_apcorr_source": a[2][e]}
            return meta

        def submit(p: FieldPlan, e: int, attempt: int) -> Any:
            job = EpochJob(cfg.store, cfg.out, p.field, p.index, e, epoch_meta(p, e), p.ref_wcs_text,
                           str(ctx.reference) if ctx.reference else None, p.gain_e_per_adu, p.saturation_adu,
                           ctx.cfg_json, ctx.fingerprint, time.time())
            tag = f"{ctx.run_token}-a{attempt}"
            blocks = [ctx.submit(extract_block_task, job, tiles, window, key=f"extract-{p.field}-{e}-{b}-{tag}")
                      for b, (tiles, window) in enumerate(p.blocks)]
            return ctx.submit(finalize_epoch_task, job, blocks, key=f"epoch-{p.field}-{e}-{tag}")

        # the block futures of a failed attempt must not be reused: a retry resubmits the whole epoch
        def starter(p: FieldPlan, e: int) -> Callable[[int], Any]:
            return lambda attempt: submit(p, e, attempt)

        units = [Submission({"field": p.field, "epoch": e}, start=starter(p, e)) for p, e in todo]

        def done(key: dict[str, Any], rec: EpochRecord) -> None:
            state.records[(key["field"], key["epoch"])] = rec

        ctx.map(self.name, units, done, bar)


def read_epoch(out: str, field: str, epoch: int, columns: list[str] | None = None
               ) -> tuple[EpochRecord, pd.DataFrame]:
    """A written sources unit: its record and its table (``columns`` only, when given).

    Raises
    ------
    SurveyProcError
        When the unit is missing or unreadable, saying how to get it back.
    """
    import json

    import pyarrow as pa

    from survey_proc.outputs import META_KEY

    path = SOURCES_UNIT.path(out, field=field, epoch=epoch)
    try:  # one read: the record is in the table's own footer metadata
        table = storage.read_table(path, columns=columns)
        rec = json.loads((table.schema.metadata or {})[META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        raise SurveyProcError(f"{path}: missing or unreadable; re-run to extract field {field} epoch {epoch}") from None
    return EpochRecord.from_dict(rec), table.to_pandas()


def write_epoch(out: str, src: pd.DataFrame, record: EpochRecord) -> EpochRecord:
    """Rewrite a sources unit atomically with its (updated) record; returns the record."""
    write_parquet_atomic(src, SOURCES, SOURCES_UNIT.path(out, field=record.field, epoch=record.epoch),
                         record.to_dict())
    return record
