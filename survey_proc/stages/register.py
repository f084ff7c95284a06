"""Stage 2, register: epochs without a WCS, and epochs whose WCS is rough, get positions in the field's frame.

- An epoch **without a WCS** is registered to the field's reference epoch (the epoch with a
  WCS, else any, with most detections) by asterism matching
  (:mod:`survey_proc.catalog.registration`); where that fails (crowded frames whose
  brightest sources are blends, lists full of artefacts), by the translation between the
  two images (phase correlation on the central 1024 px, read from the store by the task)
  refined with matched stars. ``x_ref``/``y_ref`` become the affine transform of
  ``x``/``y``, ``ra``/``dec`` follow from the reference WCS when there is one, and with a
  reference catalogue the zero point is fitted again (:func:`register_epoch_task`).
- An epoch **with a WCS** that matched fewer than ``calibration.min_stars`` reference stars
  (a rough WCS) is registered the same way against the reference catalogue
  (:func:`refine_wcs_task`); when no correction of 0.5 px or more is found it is kept.

The residual RMS goes to run.json (``registration``); the sources unit's record also says
which route was used (``method``: "asterism" or "phase correlation + stars"). An epoch that cannot be registered is
quarantined and left out of the later stages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from survey_proc import store
from survey_proc import vocab as F
from survey_proc.catalog import calibrate as cal
from survey_proc.catalog.astrometry import parse_wcs, pixel_to_world
from survey_proc.catalog.image_shift import central_window
from survey_proc.catalog.registration import Registration, RegistrationError, register, register_by_image
from survey_proc.errors import SurveyProcError
from survey_proc.stages.base import Stage, StageContext, Submission, task_config, worker_task
from survey_proc.stages.extract import SOURCES_UNIT, read_epoch, write_epoch
from survey_proc.stages.plan import reference_stars
from survey_proc.stages.records import EpochRecord

NO_CORRECTION_PX = 0.5  # a rough-WCS registration moving no star by this much leaves the epoch as it was
PHASE_WINDOW_PX = 1024  # side of the central window of both images read for phase correlation (px)


def _match_radius_px(rec: EpochRecord) -> float:
    return max(1.0, 0.75 * float(rec.fwhm_px))


@worker_task
def refine_wcs_task(out: str, field: str, epoch: int, ref_wcs_text: str, reference_path: str, cfg_json: str,
                    fingerprint: str) -> EpochRecord:
    """Register an epoch with a rough WCS to the reference catalogue and fit its zero point again.

    When the registration fails or finds no correction (< 0.5 px anywhere), the unit is left
    as it was and the record says why (``wcs_refinement``).
    """
    cfg = task_config(cfg_json)
    record, src = read_epoch(out, field, epoch)
    ref = reference_stars(reference_path, ref_wcs_text)
    ref = ref[np.isfinite(ref["x_ref"]) & np.isfinite(ref["y_ref"])]
    good = ((src["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0) & np.isfinite(src["x_ref"].to_numpy())
    try:
        reg = register(src[["x_ref", "y_ref"]].to_numpy()[good], src["flux"].to_numpy()[good],
                       ref[["x_ref", "y_ref"]].to_numpy(), 10 ** (-0.4 * ref["mag"].to_numpy()),
                       match_radius_px=_match_radius_px(record), snr=src["snr"].to_numpy()[good])
    except RegistrationError as exc:
        return write_epoch(out, src, record.with_(wcs_refinement=f"not refined: {exc}"))
    x0, y0 = src["x_ref"].to_numpy(float), src["y_ref"].to_numpy(float)
    x1, y1 = reg.apply(x0, y0)
    if np.nanmax(np.hypot(x1 - x0, y1 - y0)) < NO_CORRECTION_PX:  # a good WCS with few reference stars
        return write_epoch(out, src, record.with_(
            wcs_refinement=f"not refined: the WCS agrees with the reference catalogue to {NO_CORRECTION_PX} px"))
    src["x_ref"], src["y_ref"] = x1, y1
    ref_wcs = parse_wcs(ref_wcs_text) if ref_wcs_text else None
    src["ra"], src["dec"] = pixel_to_world(ref_wcs, x1, y1)
    zp = cal.calibrate_epoch(src, ref, record.fwhm_px, cfg.calibration)
    cal.apply_zeropoint(src, zp)
    return write_epoch(out, src, record.with_(
        zp=zp, registration={**reg.to_dict(), "reference_epoch": None, "against": "reference catalogue"},
        wcs_refinement="refined against the reference catalogue", fingerprint=fingerprint))


def _register_by_images(store_path: str, field: str, epoch: int, ref_epoch: int, src: Any, good: np.ndarray,
                        ref: Any, rgood: np.ndarray, match_radius_px: float) -> Registration:
    """The phase-correlation route: the central windows of both epochs' images, then matched stars.

    The reference epoch's sources are matched at their pixel positions in its image (``x``,
    ``y``) and the transform is fitted to their positions in the field's frame (``x_ref``,
    ``y_ref``), so a reference epoch with a WCS works too.
    """
    _, ny, nx = store.image_shape(store_path, field)
    y0, y1, x0, x1 = central_window((ny, nx), PHASE_WINDOW_PX)
    image, mask = store.read_window(store_path, field, epoch, y0, y1, x0, x1)
    ref_image, ref_mask = store.read_window(store_path, field, ref_epoch, y0, y1, x0, x1)
    return register_by_image(
        src[["x", "y"]].to_numpy(float)[good], src["flux"].to_numpy(float)[good],
        ref[["x", "y"]].to_numpy(float)[rgood], ref["flux"].to_numpy(float)[rgood], image, ref_image,
        image_origin_px=(x0, y0), ref_xy_out=ref[["x_ref", "y_ref"]].to_numpy(float)[rgood],
        bad=None if mask is None else mask != 0, ref_bad=None if ref_mask is None else ref_mask != 0,
        match_radius_px=match_radius_px, snr=src["snr"].to_numpy(float)[good], max_window_px=PHASE_WINDOW_PX)


@worker_task
def register_epoch_task(out: str, field: str, epoch: int, ref_epoch: int, ref_wcs_text: str,
                        reference_path: str | None, cfg_json: str, fingerprint: str) -> EpochRecord:
    """Register an epoch without a WCS to the reference epoch's sources; rewrite its positions.

    The epoch's clean sources are matched to the reference epoch's by asterisms
    (:func:`~survey_proc.catalog.registration.register`); when that fails, the two epochs'
    images are read from the store (``cfg.store``) and the translation found by phase
    correlation seeds a star match
    (:func:`~survey_proc.catalog.registration.register_by_image`). ``x_ref``/``y_ref``
    become the affine transform of ``x``/``y``, ``ra``/``dec`` follow from the reference WCS
    when there is one, and with a reference catalogue the zero point is fitted again. The
    record gains ``registration`` (matrix, stars, residual RMS, ``method``; after phase
    correlation also ``correlation_sigma`` and why asterism matching failed).

    Raises
    ------
    SurveyProcError
        When both routes fail: names the field, the epoch, the reference epoch and both reasons.
    """
    cfg = task_config(cfg_json)
    record, src = read_epoch(out, field, epoch)
    _, ref = read_epoch(out, field, ref_epoch, columns=["x", "y", "x_ref", "y_ref", "flux", "flags"])
    good = (src["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0
    rgood = (ref["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0
    extra: dict[str, Any] = {}
    try:
        reg = register(src[["x", "y"]].to_numpy()[good], src["flux"].to_numpy()[good],
                       ref[["x_ref", "y_ref"]].to_numpy()[rgood], ref["flux"].to_numpy()[rgood],
                       match_radius_px=_match_radius_px(record), snr=src["snr"].to_numpy()[good])
    except RegistrationError as exc:
        try:
            reg = _register_by_images(cfg.store, field, epoch, ref_epoch, src, good, ref, rgood,
                                      _match_radius_px(record))
        except SurveyProcError as exc2:  # RegistrationError, or the store's pixels unreadable
            raise SurveyProcError(
                f"field {field} epoch {epoch}: no WCS, and registration to reference epoch {ref_epoch} failed "
                f"by asterism matching ({exc}) and by image phase correlation ({exc2}). Check that the epoch "
                "shows the same field as the reference epoch (shifted by less than half the frame, rotated by "
                "less than 1 degree, with stars detected), or add a WCS to the epoch, or exclude it") from None
        extra = {"asterism_error": str(exc)}
    src["x_ref"], src["y_ref"] = reg.apply(src["x"].to_numpy(float), src["y"].to_numpy(float))
    ref_wcs = parse_wcs(ref_wcs_text) if ref_wcs_text else None
    src["ra"], src["dec"] = pixel_to_world(ref_wcs, src["x_ref"].to_numpy(), src["y_ref"].to_numpy())
    zp = record.zp
    if reference_path is not None and ref_wcs is not None:
        zp = cal.calibrate_epoch(src, reference_stars(reference_path, ref_wcs_text), record.fwhm_px, cfg.calibration)
        cal.apply_zeropoint(src, zp)
    return write_epoch(out, src, record.with_(
        zp=zp, registration={**reg.to_dict(), "reference_epoch": ref_epoch, **extra}, fingerprint=fingerprint))


def registration_reference_epoch(recs: dict[int, EpochRecord]) -> int:
    """The epoch the epochs without a WCS are registered to.

    A resumed run whose epochs have no WCS keeps the frame it started with; otherwise the
    epoch with a WCS (else any) with most detections.
    """
    with_wcs = [e for e, r in recs.items() if r.has_wcs]
    earlier = {r.registration["reference_epoch"] for r in recs.values() if r.registration is not None}
    if earlier and not with_wcs:
        return min(earlier)
    return max(sorted(with_wcs or recs), key=lambda e: recs[e].n_sources)


class RegisterStage(Stage):
    """Registration of epochs without a WCS (to the reference epoch) and with a rough one (to the catalogue)."""

    name = "register"
    unit = SOURCES_UNIT
    config_sections = ("calibration",)

    def run(self, ctx: StageContext) -> None:
        """Refine the rough WCSs and register the epochs without one, field by field."""
        cfg, state = ctx.cfg, ctx.state
        units: list[Submission] = []
        for p in ctx.plans:
            recs = state.field_records(p)
            if ctx.reference is not None and p.ref_wcs_text:
                rough = [e for e, r in recs.items() if r.has_wcs and r.wcs_refinement is None
                         and r.zp.n_candidates < cfg.calibration.min_stars]
                units += [Submission({"field": p.field, "epoch": e}, refine_wcs_task,
                                     (cfg.out, p.field, e, p.ref_wcs_text, str(ctx.reference), ctx.cfg_json,
                                      ctx.fingerprint)) for e in rough]
            todo = [e for e, r in recs.items() if not r.has_wcs and r.registration is None]
            if not todo:
                continue
            ref_epoch = registration_reference_epoch(recs)
            if ref_epoch in todo:  # no epoch has a WCS: the reference epoch's pixels are the frame
                todo.remove(ref_epoch)
                rec = recs[ref_epoch]
                state.records[(p.field, ref_epoch)] = rec.with_(registration={
                    "reference_epoch": ref_epoch, "rms_px": 0.0, "n_stars": rec.n_sources,
                    "matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]})
            units += [Submission({"field": p.field, "epoch": e}, register_epoch_task,
                                 (cfg.out, p.field, e, ref_epoch, p.ref_wcs_text,
                                  str(ctx.reference) if ctx.reference else None, ctx.cfg_json, ctx.fingerprint))
                      for e in todo]
        if not units:
            return
        def done(key: dict[str, Any], rec: EpochRecord) -> None:
            state.records[(key["field"], key["epoch"])] = rec

        # an unregistered epoch is a failure: the later stages leave it out (RunState.field_records)
        ctx.map(self.name, units, done, ctx.bar(self.name, len(units)))
