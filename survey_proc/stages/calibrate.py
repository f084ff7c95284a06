"""Stage 3, calibrate: per field and band, aperture corrections, ensemble photometry, one absolute level.

For each field (the science is in :mod:`survey_proc.catalog.calibrate`):

1. epochs whose aperture correction could not be measured take the field's ``apcorr(FWHM)``
   line;
2. per band, the **ensemble stars**: the bright (S/N >= ``calibration.ensemble_snr_min``),
   unflagged, isolated stars of a reference epoch (the one with most detections, or
   ``calibration.reference_epoch``), up to ``calibration.ensemble_max_stars``
   (``calibration/field=F/band=B/stars.parquet``);
3. every epoch's relative zero point from the weighted least-squares ensemble solution over
   those stars in all epochs of the band (variables and outliers rejected), so light curves
   carry no per-epoch offsets even where a reference catalogue has few stars;
4. one absolute zero point per field and band: the ensemble magnitudes of the stars against
   the reference catalogue (``mag_<band>`` columns, or ``mag`` for a single-band survey).
   Without a usable reference the level is the store's nominal zero point and the sources
   get ``ZP_RELATIVE``;
5. the cross-epoch model ``zp(airmass)`` over the ensemble's epochs; epochs with fewer than
   ``calibration.min_stars_fit`` ensemble stars take it (flag ``ZP_MODEL``). With no model
   either, the epochs are calibrate failures (left out of the light curves).

Only units whose zero point or aperture correction changed are rewritten (atomically), so a
resumed run rewrites nothing. ``epochs.parquet`` gets one row per epoch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.spatial import cKDTree

from survey_proc import storage
from survey_proc.catalog import calibrate as cal
from survey_proc.config import CalibrationConfig
from survey_proc.errors import ConfigError, SurveyProcError
from survey_proc.outputs import write_parquet_atomic
from survey_proc.stages.base import OutputUnit, Stage, StageContext, Submission, task_config, worker_task
from survey_proc.stages.extract import SOURCES_UNIT, read_epoch, write_epoch
from survey_proc.stages.plan import FieldPlan, reference_stars
from survey_proc.stages.records import APCORR_FROM_MODEL, EpochRecord

ENSEMBLE_STARS_UNIT = OutputUnit("calibration/field={field}/band={band}/stars.parquet",
                                 pa.schema([(c, pa.float64()) for c in ("ra", "dec", "x_ref", "y_ref", "mag",
                                                                        "mag_err")]))
NO_BAND = "none"  # the band label of a store with one band for all epochs (format 1)
EPOCHS_UNIT = OutputUnit("epochs.parquet", None)


@worker_task
def recalibrate_epoch_task(out: str, field: str, epoch: int, model_zp: dict | None, cfg_json: str,
                           fingerprint: str, apcorr: float | None = None) -> EpochRecord:
    """Re-calibrate a written epoch and rewrite the unit atomically.

    ``apcorr`` (optional) replaces the epoch's aperture correction (fluxes are rescaled when
    the magnitudes are aperture photometry; the BPNN's do not depend on it); then the zero
    point is ``model_zp`` (a :meth:`ZeroPoint.to_dict`), or, with none, left pending for the
    ensemble fit.
    """
    cfg = task_config(cfg_json)
    record, src = read_epoch(out, field, epoch)
    if apcorr is not None:
        if record.aperture_photometry(cfg.detector, cfg.bpnn.enabled):
            cal.rescale_aperture_photometry(src, record.apcorr, apcorr)
        record = record.with_(apcorr=apcorr, apcorr_source=APCORR_FROM_MODEL)
    zp = cal.ZeroPoint.from_dict(model_zp) if model_zp is not None else cal.ZeroPoint.pending()
    cal.apply_zeropoint(src, zp)
    return write_epoch(out, src, record.with_(zp=zp, fingerprint=fingerprint))


#: looser isolation (radius in FWHM, neighbour flux ratio) tried in turn when the configured one leaves fewer
#: than ``calibration.min_stars`` ensemble stars: on a crowded plate core every star has ~16 detections
#: (stars and grain) within 3 FWHM, and 2 of 543 pass; at 2 FWHM and 10 % 39 do
ISOLATION_STEPS = ((2.0, 0.1), (1.5, 0.25))


def ensemble_config(cfg: CalibrationConfig, isolation: tuple[float, float] | None = None) -> CalibrationConfig:
    """The calibration settings of the ensemble stars (their S/N floor, number and isolation)."""
    c = replace(cfg, snr_min=cfg.ensemble_snr_min, max_stars=cfg.ensemble_max_stars)
    if isolation is not None:
        c = replace(c, isolation_fwhm=float(isolation[0]), isolation_flux_ratio=float(isolation[1]))
    return c


@worker_task
def reference_matches_task(out: str, field: str, epoch: int, stars_path: str, cfg_json: str,
                           isolation: tuple[float, float] | None = None) -> pd.DataFrame:
    """The ensemble-star matches of one written epoch: epoch, star, mag_inst, mag_inst_err.

    ``isolation``: the (radius in FWHM, flux ratio) the ensemble stars were chosen with.
    """
    cfg = task_config(cfg_json)
    record, src = read_epoch(out, field, epoch, columns=["x_ref", "y_ref", "snr", "flags", "flux", "mag_inst",
                                                         "mag_inst_err"])
    i_src, i_ref = cal.calibrator_matches(src, reference_stars(stars_path, ""), record.fwhm_px,
                                          ensemble_config(cfg.calibration, isolation))
    return pd.DataFrame({"epoch": epoch, "star": i_ref, "mag_inst": src["mag_inst"].to_numpy()[i_src],
                         "mag_inst_err": src["mag_inst_err"].to_numpy()[i_src]})


def band_label(band: str) -> str:
    """The band's name in output paths and run.json (:data:`NO_BAND` for a single-band store)."""
    return band or NO_BAND


def apcorr_from_field_model(aper: dict[int, EpochRecord]) -> tuple[dict[str, Any], dict[int, float]]:
    """The field's apcorr(FWHM) line and the epochs that take it: ``(line, {epoch: apcorr})``.

    The line is fitted to the epochs that measured their own correction (at least
    ``APCORR_MIN_STARS`` stars); an epoch that could not measure one takes the line's value
    at its FWHM, unless it already has it, or it has its exposure's own PSF model's
    correction (``survey-proc ingest --psfex``: PSFEx fitted that exposure's stars over the
    whole CCD, so it describes that epoch's PSF; the line describes other epochs').

    Parameters
    ----------
    aper
        The epoch records of the field whose fluxes are aperture fluxes.
    """
    measured = [r for r in aper.values() if r.n_apcorr_stars >= cal.APCORR_MIN_STARS and not r.apcorr_from_model]
    apc = cal.fit_apcorr_model(np.array([r.fwhm_px for r in measured]), np.array([r.apcorr for r in measured]))
    new = {e: float(np.polyval(apc["coef"], r.fwhm_px)) for e, r in aper.items()
           if r.n_apcorr_stars < cal.APCORR_MIN_STARS and not r.apcorr_from_model and not r.apcorr_from_psf_model
           and apc["n"] > 0}
    return apc, new


class CalibrateStage(Stage):
    """Per-field and per-band calibration: apcorr model, ensemble photometry, absolute level, zero-point model."""

    name = "calibrate"
    unit = SOURCES_UNIT
    also_writes = (ENSEMBLE_STARS_UNIT, EPOCHS_UNIT)
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
                     jobs: dict[int, tuple[dict | None, float | None]]) -> None:
        """Rewrite epochs: epoch -> (zero point, new apcorr)."""
        def done(key: dict[str, Any], rec: EpochRecord) -> None:
            ctx.state.records[(key["field"], key["epoch"])] = rec
            recs[key["epoch"]] = rec

        ctx.map(self.name, [Submission({"field": p.field, "epoch": e}, recalibrate_epoch_task,
                                       (ctx.cfg.out, p.field, e, zp, ctx.cfg_json, ctx.fingerprint, apcorr))
                            for e, (zp, apcorr) in jobs.items()], done)

    def _ensemble_stars(self, ctx: StageContext, p: FieldPlan, band: str, recs: dict[int, EpochRecord],
                        only_band: bool) -> dict[str, Any]:
        """The ensemble stars of a field and band (written once per fingerprint); returns the footer record."""
        out = ctx.cfg.out
        label = band_label(band)
        meta = ENSEMBLE_STARS_UNIT.record(out, field=p.field, band=label)
        if meta is None or meta.get("fingerprint") != ctx.fingerprint:
            requested = ctx.cfg.calibration.reference_epoch
            if requested is not None and requested not in recs and not only_band:  # an epoch of another band
                requested = None
            # the reference epoch's magnitudes define the field's: it must have measured its aperture correction
            candidates = {e: r.n_sources for e, r in recs.items() if not r.apcorr_from_model or e == requested}
            try:
                ref_epoch = cal.choose_reference_epoch(candidates, requested)
            except ValueError as exc:
                raise ConfigError(f"field {p.field} band {label}: {exc}") from None
            if recs[ref_epoch].apcorr_from_model:
                raise SurveyProcError(f"field {p.field}: the reference epoch {ref_epoch} has no measured "
                                      "aperture correction; set calibration.reference_epoch to another epoch")
            _, src = read_epoch(out, p.field, ref_epoch)
            ccfg = ctx.cfg.calibration
            tried: list[dict[str, Any]] = []
            steps: list[tuple[tuple[float, float], pd.DataFrame]] = []
            for iso in ((ccfg.isolation_fwhm, ccfg.isolation_flux_ratio), *ISOLATION_STEPS):
                stars = cal.internal_reference(src, p.zeropoint_nominal, recs[ref_epoch].fwhm_px,
                                               ensemble_config(ccfg, iso))
                tried.append({"isolation_fwhm": iso[0], "isolation_flux_ratio": iso[1], "n_stars": len(stars)})
                steps.append((iso, stars))
                if len(stars) >= ccfg.min_stars:
                    break
            # the first step with enough stars; when none has enough, the one with the most (the first of equals)
            iso, stars = steps[-1] if len(stars) >= ccfg.min_stars else max(steps, key=lambda s: len(s[1]))
            meta = {"fingerprint": ctx.fingerprint, "reference_epoch": ref_epoch, "n_stars": len(stars),
                    "isolation": list(iso), "isolation_tried": tried}
            write_parquet_atomic(stars, ENSEMBLE_STARS_UNIT.schema,
                                 ENSEMBLE_STARS_UNIT.path(out, field=p.field, band=label), meta)
        return meta

    def _field(self, ctx: StageContext, p: FieldPlan, recs: dict[int, EpochRecord]) -> dict[str, Any]:
        info: dict[str, Any] = {"reference": str(ctx.reference) if ctx.reference else "internal"}
        # 1. epochs whose aperture correction could not be measured take the field's apcorr(FWHM)
        # only aperture photometry has an aperture correction (PNet's and the BPNN's fluxes are totals)
        aper = {e: r for e, r in recs.items() if r.aperture_photometry(ctx.cfg.detector, ctx.cfg.bpnn.enabled)}
        apc, new_apcorr = apcorr_from_field_model(aper)
        info["apcorr_model"] = apc
        info["n_apcorr_model_epochs"] = len(new_apcorr)
        # their fluxes change with it: rewrite them before the ensemble measures them
        self._recalibrate(ctx, p, recs, {e: (None, a) for e, a in new_apcorr.items()})
        bands = sorted({r.band for r in recs.values()})
        info["bands"] = {}
        for band in bands:
            brecs = {e: r for e, r in recs.items() if r.band == band}
            info["bands"][band_label(band)] = self._band(ctx, p, band, brecs, len(bands) == 1)
        if len(bands) == 1:  # the single-band form of earlier versions, kept for readers of run.json
            info.update({k: v for k, v in info["bands"][band_label(bands[0])].items() if k != "failed_epochs"})
        info["n_model_epochs"] = sum(b["n_model_epochs"] for b in info["bands"].values())
        return info

    def _band(self, ctx: StageContext, p: FieldPlan, band: str, recs: dict[int, EpochRecord],
              only_band: bool) -> dict[str, Any]:
        """Steps 2-5 of the module docstring for the epochs ``recs`` of one band; returns the band's info."""
        ccfg = ctx.cfg.calibration
        label = band_label(band)
        info: dict[str, Any] = {}
        meta = self._ensemble_stars(ctx, p, band, recs, only_band)
        info["reference_epoch"] = meta["reference_epoch"]
        info["reference_stars"] = meta["n_stars"]
        info["isolation"] = meta.get("isolation")
        info["isolation_tried"] = meta.get("isolation_tried")
        stars_path = str(ENSEMBLE_STARS_UNIT.path(ctx.cfg.out, field=p.field, band=label))
        # 3. relative zero points: the ensemble solution over every epoch of the band
        parts: list[pd.DataFrame] = []
        ctx.map(self.name, [Submission({"field": p.field, "epoch": e}, reference_matches_task,
                                       (ctx.cfg.out, p.field, e, stars_path, ctx.cfg_json,
                                        tuple(meta.get("isolation") or ()) or None)) for e in sorted(recs)],
                lambda key, m: parts.append(m))
        # in (epoch, star) order, not the order the tasks finished: the solution's floating-point sums
        # (and so the outputs' bytes) must not depend on the cluster's timing
        matches = pd.concat(parts, ignore_index=True).sort_values(["epoch", "star"], kind="stable").reset_index(
            drop=True) if parts else pd.DataFrame(columns=["epoch", "star", "mag_inst", "mag_inst_err"])
        zps, stars = cal.ensemble_zeropoints(matches, ccfg.clip_sigma, ccfg.min_stars, min_stars_fit=ccfg.min_stars_fit)
        info["ensemble_stars_used"] = int(stars["used"].sum()) if len(stars) else 0
        # 4. one absolute level per field and band
        level, absolute = p.zeropoint_nominal, False
        if ctx.reference is not None and len(stars):
            info["absolute"] = self._absolute(ctx, p, band, only_band, stars_path, stars)
            if info["absolute"]["status"] != cal.ZpStatus.FEW:
                level, absolute = info["absolute"]["zp"], True
        info["level"] = {"zp": level, "absolute": absolute}
        ens = cal.ensemble_epoch_zeropoints(zps, sorted(recs), level, absolute)
        # 5. the cross-epoch model, for the epochs the ensemble did not reach
        table = pd.DataFrame([{"epoch": e, "airmass": recs[e].airmass, "zp": z.zp, "zp_err": z.zp_err,
                               "zp_status": str(z.status)} for e, z in ens.items()])
        model = cal.fit_airmass_model(table, ccfg.clip_sigma)
        info["model"] = model
        needs_model = [e for e, z in ens.items() if z.status == cal.ZpStatus.FEW]
        info["n_model_epochs"] = len(needs_model)
        failed: list[int] = []
        if needs_model and not np.isfinite(model["zp0"]):
            failed = needs_model
            self._report_failed(ctx, p, label, info, ens, failed)
        elif needs_model:
            for e in needs_model:
                ens[e] = cal.model_epoch_zeropoint(model, recs[e].airmass, ens[e].n_candidates, absolute)
        info["failed_epochs"] = failed
        jobs: dict[int, tuple[dict | None, float | None]] = {}
        for e, r in recs.items():
            if e in failed:
                continue
            zp = ens[e].to_dict()
            if zp != r.zp.to_dict():
                jobs[e] = (zp, None)
        self._recalibrate(ctx, p, recs, jobs)
        return info

    def _absolute(self, ctx: StageContext, p: FieldPlan, band: str, only_band: bool, stars_path: str,
                  stars: pd.DataFrame) -> dict[str, Any]:
        """The absolute level of a field and band against the reference catalogue (info for run.json)."""
        ccfg = ctx.cfg.calibration
        ref = reference_stars(str(ctx.reference), p.ref_wcs_text)
        mags = cal.reference_magnitudes(ref, band, only_band)
        if mags is None:
            return {"status": str(cal.ZpStatus.FEW), "why": f"the reference catalogue has no mag_{band} column "
                    "(a plain 'mag' column calibrates a single-band survey only)"}
        ens = storage.read_table(stars_path).to_pandas()
        ok = np.isfinite(ref["x_ref"].to_numpy(float))
        if not ok.any() or len(ens) == 0:
            return {"status": str(cal.ZpStatus.FEW), "why": "no reference star falls in the field (no WCS?)"}
        i_ok = np.flatnonzero(ok)
        d, j = cKDTree(ref[["x_ref", "y_ref"]].to_numpy(float)[ok]).query(
            ens[["x_ref", "y_ref"]].to_numpy(float), distance_upper_bound=ccfg.match_radius_px)
        hit = np.isfinite(d)
        zp = cal.absolute_level(stars, mags[0], mags[1], np.flatnonzero(hit), i_ok[j[hit]], ccfg)
        return {**zp.to_dict(), "n_matched": int(hit.sum())}

    def _report_failed(self, ctx: StageContext, p: FieldPlan, label: str, info: dict[str, Any],
                       ens: dict[int, cal.ZeroPoint], failed: list[int]) -> None:
        ccfg = ctx.cfg.calibration
        tried = "; ".join(f"{t['n_stars']} isolated within {t['isolation_fwhm']:g} FWHM at a flux ratio of "
                          f"{t['isolation_flux_ratio']:g}" for t in info.get("isolation_tried") or [])
        advice = (f"the field's ensemble (band {label}, reference epoch {info['reference_epoch']}) has "
                  f"{info['reference_stars']} star(s) unflagged with S/N >= calibration.ensemble_snr_min = "
                  f"{ccfg.ensemble_snr_min:g} and isolated ({tried}); lower calibration.ensemble_snr_min or "
                  "calibration.min_stars_fit, or choose a deeper calibration.reference_epoch")
        for e in failed:
            z = ens[e]
            ctx.state.failures.append({
                "stage": self.name, "field": p.field, "epoch": e,
                "error": f"field {p.field} epoch {e}: {z.n_used} usable ensemble star(s) of {z.n_candidates} "
                         f"matched (a zero point needs calibration.min_stars_fit = {ccfg.min_stars_fit}), and no "
                         "epoch of the band had enough for the cross-epoch zero-point model; the epoch is left "
                         f"out of the light curves. {advice[0].upper()}{advice[1:]}"})
