"""Stage 3, calibrate: per field, aperture corrections, relative calibration and the zero-point model.

For each field, in order (the science is in :mod:`survey_proc.catalog.calibrate`):

1. epochs whose aperture correction could not be measured take the field's ``apcorr(FWHM)``
   line (with an external reference their zero point is fitted again);
2. without a reference catalogue, the stable stars of a reference epoch (the one with most
   detections, or ``calibration.reference_epoch``) become the internal reference
   (``calibration/field=F/reference.parquet``), and every epoch's zero point comes from the
   ensemble photometry of those stars over all epochs;
3. the cross-epoch zero-point model (with an airmass term) is fitted, and epochs with too
   few reference stars take its zero point (flag ``ZP_MODEL``).

Rewritten units are written atomically; ``epochs.parquet`` gets one row per epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from survey_proc.catalog import calibrate as cal
from survey_proc.errors import ConfigError, SurveyProcError
from survey_proc.outputs import write_parquet_atomic
from survey_proc.stages.base import OutputUnit, Stage, StageContext, Submission, task_config, worker_task
from survey_proc.stages.extract import SOURCES_UNIT, read_epoch, write_epoch
from survey_proc.stages.plan import FieldPlan, reference_stars
from survey_proc.stages.records import APCORR_FROM_MODEL, EpochRecord

INTERNAL_REFERENCE_UNIT = OutputUnit("calibration/field={field}/reference.parquet",
                                     pa.schema([(c, pa.float64()) for c in ("ra", "dec", "x_ref", "y_ref", "mag",
                                                                            "mag_err")]))
EPOCHS_UNIT = OutputUnit("epochs.parquet", None)


@worker_task
def recalibrate_epoch_task(out: str, field: str, epoch: int, model_zp: dict | None, reference_path: str | None,
                           ref_wcs_text: str, cfg_json: str, fingerprint: str, apcorr: float | None = None
                           ) -> EpochRecord:
    """Re-calibrate a written epoch and rewrite the unit atomically.

    ``apcorr`` (optional) replaces the epoch's aperture correction (fluxes are rescaled when
    the magnitudes are aperture photometry; the BPNN's do not depend on it); then the zero
    point is ``model_zp`` (a :meth:`ZeroPoint.to_dict`) or fitted against ``reference_path``,
    or, with neither, left pending for the ensemble fit.
    """
    cfg = task_config(cfg_json)
    record, src = read_epoch(out, field, epoch)
    if apcorr is not None:
        if not cfg.bpnn.enabled:
            cal.rescale_aperture_photometry(src, record.apcorr, apcorr)
        record = record.with_(apcorr=apcorr, apcorr_source=APCORR_FROM_MODEL)
    if model_zp is not None:
        zp = cal.ZeroPoint.from_dict(model_zp)
    elif reference_path is not None:
        zp = cal.calibrate_epoch(src, reference_stars(reference_path, ref_wcs_text), record.fwhm_px,
                                 cfg.calibration)
    else:
        zp = cal.ZeroPoint.pending()
    cal.apply_zeropoint(src, zp)
    return write_epoch(out, src, record.with_(zp=zp, fingerprint=fingerprint))


@worker_task
def reference_matches_task(out: str, field: str, epoch: int, reference_path: str, cfg_json: str) -> pd.DataFrame:
    """The calibrator matches of one written epoch against a reference: epoch, star, mag_inst, mag_inst_err."""
    cfg = task_config(cfg_json)
    record, src = read_epoch(out, field, epoch, columns=["x_ref", "y_ref", "snr", "flags", "flux", "mag_inst",
                                                         "mag_inst_err"])
    i_src, i_ref = cal.calibrator_matches(src, reference_stars(reference_path, ""), record.fwhm_px, cfg.calibration)
    return pd.DataFrame({"epoch": epoch, "star": i_ref, "mag_inst": src["mag_inst"].to_numpy()[i_src],
                         "mag_inst_err": src["mag_inst_err"].to_numpy()[i_src]})


class CalibrateStage(Stage):
    """Per-field calibration: aperture-correction model, relative calibration, zero-point model."""

    name = "calibrate"
    unit = SOURCES_UNIT
    also_writes = (INTERNAL_REFERENCE_UNIT, EPOCHS_UNIT)
    config_sections = ("calibration",)

    def run(self, ctx: StageContext) -> None:
        """Calibrate each field (module docstring), then write ``epochs.parquet``."""
        bar = ctx.bar(self.name, len(ctx.plans))
        for p in ctx.plans:
            recs = ctx.state.field_records(p)
            if recs:
                try:
                    ctx.state.calibration[p.field] = self._field(ctx, p, recs)
                except SurveyProcError as exc:  # this field cannot be calibrated: its epochs are left out
                    ctx.state.calibration[p.field] = {"error": str(exc)}
                    ctx.state.failures += [{"stage": self.name, "field": p.field, "epoch": e, "error": str(exc),
                                            "attempts": 1} for e in sorted(recs)]
            ctx.advance(bar)
        rows = [r.summary() for _, r in sorted(ctx.state.records.items())]
        if rows:
            df = pd.DataFrame(rows)
            write_parquet_atomic(df, pa.Schema.from_pandas(df, preserve_index=False), EPOCHS_UNIT.path(ctx.cfg.out),
                                 {"fingerprint": ctx.fingerprint})

    def _recalibrate(self, ctx: StageContext, p: FieldPlan, recs: dict[int, EpochRecord],
                     jobs: dict[int, tuple[dict | None, str | None, float | None]]) -> None:
        """Rewrite epochs: epoch -> (model zero point, reference path, new apcorr)."""
        def done(key: dict[str, Any], rec: EpochRecord) -> None:
            ctx.state.records[(key["field"], key["epoch"])] = rec
            recs[key["epoch"]] = rec

        ctx.map(self.name, [Submission({"field": p.field, "epoch": e}, recalibrate_epoch_task,
                                       (ctx.cfg.out, p.field, e, zp, ref, p.ref_wcs_text, ctx.cfg_json,
                                        ctx.fingerprint, apcorr))
                            for e, (zp, ref, apcorr) in jobs.items()], done)

    def _internal_reference(self, ctx: StageContext, p: FieldPlan, recs: dict[int, EpochRecord],
                            new_apcorr: dict[int, float]) -> dict[str, Any]:
        """The internal reference of a field (written once per fingerprint); returns its footer record."""
        out = ctx.cfg.out
        meta = INTERNAL_REFERENCE_UNIT.record(out, field=p.field)
        if meta is None or meta.get("fingerprint") != ctx.fingerprint:
            requested = ctx.cfg.calibration.reference_epoch
            # the reference epoch's magnitudes define the field's: it must have measured its aperture correction
            candidates = {e: r.n_sources for e, r in recs.items() if e not in new_apcorr or e == requested}
            try:
                ref_epoch = cal.choose_reference_epoch(candidates, requested)
            except ValueError as exc:
                raise ConfigError(f"field {p.field}: {exc}") from None
            if ref_epoch in new_apcorr:
                raise SurveyProcError(f"field {p.field}: the reference epoch {ref_epoch} has no measured "
                                      "aperture correction; set calibration.reference_epoch to another epoch")
            _, src = read_epoch(out, p.field, ref_epoch)
            iref = cal.internal_reference(src, p.zeropoint_nominal, recs[ref_epoch].fwhm_px, ctx.cfg.calibration)
            meta = {"fingerprint": ctx.fingerprint, "reference_epoch": ref_epoch, "n_stars": len(iref)}
            write_parquet_atomic(iref, INTERNAL_REFERENCE_UNIT.schema, INTERNAL_REFERENCE_UNIT.path(out, field=p.field),
                                 meta)
        return meta

    def _field(self, ctx: StageContext, p: FieldPlan, recs: dict[int, EpochRecord]) -> dict[str, Any]:
        ccfg = ctx.cfg.calibration
        reference = str(ctx.reference) if ctx.reference else None
        info: dict[str, Any] = {"reference": reference or "internal"}
        # 1. epochs whose aperture correction could not be measured take the field's apcorr(FWHM)
        measured = [r for r in recs.values() if r.n_apcorr_stars >= cal.APCORR_MIN_STARS and not r.apcorr_from_model]
        apc = cal.fit_apcorr_model(np.array([r.fwhm_px for r in measured]), np.array([r.apcorr for r in measured]))
        info["apcorr_model"] = apc
        new_apcorr = {e: float(np.polyval(apc["coef"], r.fwhm_px)) for e, r in recs.items()
                      if r.n_apcorr_stars < cal.APCORR_MIN_STARS and not r.apcorr_from_model and apc["n"] > 0}
        # 2. without a reference catalogue: the stable stars of a reference epoch
        ref_path = reference
        if reference is None:
            meta = self._internal_reference(ctx, p, recs, new_apcorr)
            info["reference_epoch"] = meta["reference_epoch"]
            info["reference_stars"] = meta["n_stars"]
            ref_path = str(INTERNAL_REFERENCE_UNIT.path(ctx.cfg.out, field=p.field))
        # with an external reference the apcorr-corrected epochs are refitted against it;
        # without one they only get the new aperture correction here (zero point: ensemble below)
        self._recalibrate(ctx, p, recs, {e: (None, reference, a) for e, a in new_apcorr.items()})
        if reference is None and any(r.zp.status == cal.ZpStatus.PENDING for r in recs.values()):
            # relative calibration: ensemble photometry of the reference stars over all epochs
            parts: list[pd.DataFrame] = []
            ctx.map(self.name, [Submission({"field": p.field, "epoch": e}, reference_matches_task,
                                           (ctx.cfg.out, p.field, e, ref_path, ctx.cfg_json)) for e in sorted(recs)],
                    lambda key, m: parts.append(m))
            zps, stars = cal.ensemble_zeropoints(pd.concat(parts, ignore_index=True), ccfg.clip_sigma,
                                                 ccfg.min_stars, min_stars_fit=ccfg.min_stars_fit)
            info["ensemble_stars_used"] = int(stars["used"].sum())
            ens = cal.ensemble_epoch_zeropoints(zps, sorted(recs), p.zeropoint_nominal)
            self._recalibrate(ctx, p, recs, {e: (zp.to_dict(), None, None) for e, zp in ens.items()})
        info["n_apcorr_model_epochs"] = len(new_apcorr)
        # 3. the cross-epoch model, for the epochs with too few reference stars
        table = pd.DataFrame([{"epoch": e, "airmass": r.airmass, "zp": r.zp.zp, "zp_err": r.zp.zp_err,
                               "zp_status": str(r.zp.status)} for e, r in sorted(recs.items())])
        model = cal.fit_airmass_model(table, ccfg.clip_sigma)
        info["model"] = model
        needs_model = [e for e, r in recs.items() if r.needs_model_zp]
        if needs_model and not np.isfinite(model["zp0"]):
            if reference is None:
                advice = (f"the internal reference (epoch {info['reference_epoch']}) has {info['reference_stars']} "
                          "star(s); pass a reference catalogue with --reference, or lower "
                          "calibration.min_stars_fit")
            else:
                advice = (f"check that the reference catalogue {reference} covers the field and reaches its "
                          f"stars (S/N >= calibration.snr_min = {ccfg.snr_min:g}, isolated)")
            for e in needs_model:
                z = recs[e].zp
                ctx.state.failures.append({
                    "stage": self.name, "field": p.field, "epoch": e,
                    "error": f"field {p.field} epoch {e}: {z.n_used} usable reference star(s) of {z.n_candidates} "
                             f"matched (a zero point needs calibration.min_stars_fit = {ccfg.min_stars_fit}), and no "
                             "epoch of the field had enough for the cross-epoch zero-point model; the epoch is left "
                             f"out of the light curves. {advice[0].upper()}{advice[1:]}"})
        elif needs_model:
            self._recalibrate(ctx, p, recs, {e: (cal.model_epoch_zeropoint(model, recs[e].airmass,
                                                                           recs[e].zp.n_candidates).to_dict(),
                                                 None, None) for e in needs_model})
        info["n_model_epochs"] = len(needs_model)
        return info
