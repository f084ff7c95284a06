"""Stage 6, classify: per (field, region), the periodic-variable search and classifier on the region's light curves.

Detrending first (``[classify] detrend = "sysrem"``, :mod:`survey_proc.lightcurves.detrend`):
the systematics are shared by a whole field but the search runs per region, so the stage
runs in two steps. One task per field (:func:`detrend_field_task`) reads the light curves
of the field's best-measured stars from every region, fits the SysRem components (per
band when the light curves carry a ``band`` column) and writes them to
``calibration/field=<f>/detrend.parquet`` (``band, epoch, component, value``; its footer
records what was fitted). Then each region task fits every object's own amplitudes of
those components and subtracts them before the period search. The light-curve files keep
the calibrated magnitudes: detrending only feeds the search and the classifier.

The region task reads ``lightcurves/``, runs :func:`survey_proc.lightcurves.search.classify_table`
with the worker's classifier, and rewrites the region's ``objects/`` file with period,
class and probabilities (the cross-match record kept, ``classify_fingerprint`` and
``classify`` added) and the columns ``detrend`` (``"sysrem:<k>"`` or ``"none"``) and
``detrend_rms`` (rms of the correction subtracted from the object, mag; 0 when none).
run.json records per field what was fitted under ``counts.detrend`` (method, components,
stars used, the rms of those stars before and after, or ``"none: <why>"``).

Blend vetting (issue 22, ``[classify] blend_vetting``): after the classifier, each periodic
call of the region (``var_class`` in :data:`survey_proc.vocab.PERIODIC_CLASSES`) is measured
for where its varying light is (:mod:`survey_proc.stages.blend_io`: per-epoch stamps read from
the store; :func:`survey_proc.lightcurves.blend_vetting.vet_blend`: the pixels varying in phase
with the signal). A call whose varying light lies more than ``blend_offset_px`` and
``blend_min_sigma`` sigma from the object (or beyond the fit box) becomes
:data:`survey_proc.vocab.BLENDED_VARIABLE` (period and probabilities kept). Columns
``blend_*`` (:data:`BLEND_COLUMNS`); the region's record gets ``classify.blend`` and
``classify.n_blended``. A call that cannot be vetted (no pixels, too few epochs) keeps its
class with a ``blend_reason``; the region never fails for it.

Resume: the stage has its own fingerprint (the run's, its ``[classify]`` settings and the
classifier's weights), so a new classifier re-runs only this stage on a resumed output.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from survey_proc import storage
from survey_proc.catalog.schema import CLASSIFY_COLUMNS, OBJECTS
from survey_proc.errors import SurveyProcError
from survey_proc.outputs import write_parquet_atomic
from survey_proc.stages.base import OutputUnit, Stage, StageContext, Submission, task_config, worker_task
from survey_proc.stages.crossmatch import LIGHTCURVES_UNIT, OBJECTS_UNIT

#: the SysRem components of a field (all bands): ``band, epoch, component, value``
DETREND_UNIT = OutputUnit("calibration/field={field}/detrend.parquet", None)
DETREND_SCHEMA = pa.schema([("band", pa.string()), ("epoch", pa.int32()), ("component", pa.int32()),
                            ("value", pa.float64())])
#: ``objects`` columns the classify stage adds (after the contract's and the cross-match's)
DETREND_COLUMNS = (("detrend", pa.string()), ("detrend_rms", pa.float64()))
#: and (issue 22): why an object was not classified (null when it was: ``too_few_points``,
#: ``too_sparse``, ``too_short``, ``no_points``, each with ": <detail>"), and the events its box shows
#: (-1 when not counted: not classified, or not an eclipsing binary / transit), and the Baluev
#: false-alarm probability of the Lomb-Scargle peak (NaN where not computed)
REASON_COLUMNS = (("classify_reason", pa.string()), ("n_events", pa.int32()), ("ls_fap", pa.float64()))
#: and (issue 22) the blend vetting of the periodic calls (:mod:`survey_proc.stages.blend_io`): the offset of the
#: light varying in phase with the signal from the object (px, reference frame), its standard deviation (px)
#: and significance, the amplitude's S/N, whether the fit hit its box (the offset is then a lower limit), and
#: why a periodic call was not vetted (null when it was, and for every object not vetted because not periodic)
BLEND_COLUMNS = (("blend_dx_px", pa.float64()), ("blend_dy_px", pa.float64()), ("blend_offset_px", pa.float64()),
                 ("blend_offset_sigma_px", pa.float64()), ("blend_significance", pa.float64()),
                 ("blend_amp_snr", pa.float64()), ("blend_at_bound", pa.bool_()), ("blend_reason", pa.string()))


def classified_schema(written: pa.Schema) -> pa.Schema:
    """The schema of a classified objects file: the contract's, the columns the cross-match added, the detrending's.

    Parameters
    ----------
    written
        The schema of the region's objects file as the cross-match wrote it (it may carry
        per-band columns, ``mag_mean_<band>``..., that the rewrite must keep).
    """
    extra = [f for f in written.remove_metadata() if f.name not in OBJECTS.names]
    have = {*OBJECTS.names, *(f.name for f in extra)}
    return pa.schema([*OBJECTS, *extra, *(pa.field(n, t) for n, t in (*DETREND_COLUMNS, *REASON_COLUMNS,
                                                                       *BLEND_COLUMNS) if n not in have)])


def _lc_columns(path: Any) -> list[str]:
    cols = ["object_id", "epoch", "mjd", "mag", "mag_err", "flags"]
    return [*cols, "band"] if "band" in storage.read_schema(path).names else cols


@worker_task
def detrend_field_task(out: str, field: str, regions: list[int], cfg_json: str, classify_fingerprint: str,
                       inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the SysRem components of one field on its best-measured stars; write them with a record.

    Parameters
    ----------
    out
        The run's output directory.
    field
        The field.
    regions
        The field's cross-matched regions (their objects and light curves are read).
    cfg_json
        The run configuration as JSON (its ``[classify]`` detrend settings are used).
    classify_fingerprint
        Recorded in the unit's footer; the region tasks use the components only when it matches.
    inputs
        The cross-match digest of each region read (region -> digest), recorded in the footer:
        a resumed run fits again when a region was cross-matched again (e.g. an epoch added).

    Returns
    -------
    dict
        ``field`` and ``detrend``: what was fitted (:func:`_field_info`).
    """
    import pandas as pd

    from survey_proc.lightcurves.detrend import MAX_FIT_STARS, fit_field
    from survey_proc.vocab import PHOTOMETRY_BAD

    t0 = time.perf_counter()
    cc = task_config(cfg_json).classify
    objs = []
    for r in regions:
        path = OBJECTS_UNIT.path(out, field=field, region=r)
        names = storage.read_schema(path).names
        cols = [c for c in ("object_id", "n_epochs", "n_good", "mag_err_median") if c in names]
        objs.append(storage.read_table(path, columns=cols).to_pandas().assign(region=r))
    objects = pd.concat(objs, ignore_index=True) if objs else pd.DataFrame(columns=["object_id", "region"])
    n_good = objects["n_good"] if "n_good" in objects else objects.get("n_epochs", pd.Series(dtype=float))
    # candidates: measured on at least half the epochs the best-sampled object has; the best-measured first
    cand = objects[n_good >= 0.5 * (n_good.max() if len(n_good) else 0)]
    if "mag_err_median" in cand:
        cand = cand.sort_values("mag_err_median", kind="stable")
    cand = cand.head(MAX_FIT_STARS)
    lcs = []
    for reg in sorted(set(cand["region"].tolist())):
        path = LIGHTCURVES_UNIT.path(out, field=field, region=reg)
        ids = cand.loc[cand["region"] == reg, "object_id"].to_numpy().tolist()
        lcs.append(storage.read_table(path, columns=_lc_columns(path), filters=[("object_id", "in", ids)]).to_pandas())
    lc = (pd.concat(lcs, ignore_index=True) if lcs else
          pd.DataFrame({c: pd.Series(dtype=float) for c in ("object_id", "epoch", "mag", "mag_err", "flags")}))
    lc["flags"] = lc["flags"].astype(np.int64)
    table, per_band = fit_field(lc, cc.detrend_components, cc.detrend_min_stars, PHOTOMETRY_BAD)
    info = _field_info(cc.detrend_components, per_band, len(cand))
    info["wall_s"] = time.perf_counter() - t0
    write_parquet_atomic(table, DETREND_SCHEMA, DETREND_UNIT.path(out, field=field),
                         {"classify_fingerprint": classify_fingerprint, "detrend": info, "inputs": inputs or {}})
    return {"field": field, "detrend": info}


def _field_info(k: int, per_band: dict[str, dict[str, Any]], n_candidates: int) -> dict[str, Any]:
    """run.json's record of a field's detrending: the one band's figures, or per band (``bands``) for several."""
    info: dict[str, Any] = {"method": "sysrem", "components": k, "n_candidates": n_candidates}
    if not per_band:
        return {**info, "applied": "none: no light curves to fit", "n_stars": 0}
    if len(per_band) == 1:
        return {**info, **next(iter(per_band.values()))}
    applied = [b["applied"] for b in per_band.values()]
    fitted = [a for a in applied if not a.startswith("none")]
    return {**info, "applied": fitted[0] if fitted else applied[0],
            "n_stars": int(sum(b["n_stars"] for b in per_band.values())), "bands": per_band}


def _detrend_region(out: str, field: str, lc: Any, cc: Any, classify_fingerprint: str
                    ) -> tuple[Any, Any, str]:
    """The region's light curves with the field's components removed, the per-object figures, and what was applied.

    Returns ``(lc, per_object, applied)``; ``per_object`` is None when nothing was applied.
    """
    from survey_proc.lightcurves.detrend import apply_components
    from survey_proc.vocab import PHOTOMETRY_BAD

    if cc.detrend == "none":
        return lc, None, "none"
    path = DETREND_UNIT.path(out, field=field)
    rec = DETREND_UNIT.record(out, field=field)
    if rec is None or rec.get("classify_fingerprint") != classify_fingerprint:
        return lc, None, (f"none: {path} is missing or from other settings (its fit failed: see run.json "
                          "failures); re-run to fit it")
    applied = str(rec["detrend"]["applied"])
    comps = storage.read_table(path).to_pandas()
    if not len(comps):
        return lc, None, applied
    lc, per_object = apply_components(lc, comps, PHOTOMETRY_BAD)
    return lc, per_object, applied


def _vet_blends(objects: Any, out: str, field: str, cc: Any, cfg: Any, pixels: dict[str, Any] | None
                ) -> dict[str, Any]:
    """Fill the blend columns of the region's periodic calls; a flagged call becomes :data:`BLENDED_VARIABLE`.

    ``pixels`` holds what reading the epochs needs (``store``, ``region`` (a
    :class:`~survey_proc.catalog.crossmatch.Region`), ``epochs``, ``image_shape``); without it, or when
    the pixels cannot be read, the periodic calls keep their class and get a ``blend_reason``. Never raises
    for the data: the region is classified either way. Returns run.json's record of the vetting.
    """
    from survey_proc.stages.blend_io import is_blend, vet_region
    from survey_proc.vocab import BLENDED_VARIABLE, PERIODIC_CLASSES

    t0 = time.perf_counter()
    for n, _ in BLEND_COLUMNS:
        objects[n] = None if n in ("blend_reason", "blend_at_bound") else np.nan
    periodic = objects["var_class"].isin(PERIODIC_CLASSES).to_numpy()
    info: dict[str, Any] = {"enabled": bool(cc.blend_vetting), "n_candidates": int(periodic.sum()), "n_vetted": 0,
                            "n_blended": 0}
    if not cc.blend_vetting or not periodic.any():
        return info
    cand = objects.loc[periodic, ["object_id", "x", "y", "period", "t0_mjd"]]
    why = None
    if pixels is None:
        why = "no_pixels: the task was given no store, region or epochs to read"
    elif not pixels.get("epochs"):
        why = "no_pixels: no calibrated epoch"
    else:
        try:
            res, read = vet_region(pixels["store"], out, field, pixels["region"], cand, pixels["epochs"],
                                   tuple(pixels["image_shape"]), cfg.forced, n_boot=cc.blend_n_boot,
                                   stamp_px=cc.blend_stamp_px, full_boot_above_px=0.5 * cc.blend_offset_px)
        except (SurveyProcError, OSError) as exc:  # the store or the light curves cannot be read: not vetted
            why = f"no_pixels: {exc}"
        else:
            info.update(read)
    if why is not None:
        objects.loc[periodic, "blend_reason"] = why
        info["not_vetted"] = why
    else:
        sel = objects.index[periodic]
        for n, _ in BLEND_COLUMNS:
            objects.loc[sel, n] = res[n].to_numpy()
        flag = is_blend(objects["blend_offset_px"].to_numpy(float), objects["blend_offset_sigma_px"].to_numpy(float),
                        objects["blend_at_bound"].to_numpy(), min_offset_px=cc.blend_offset_px,
                        min_sigma=cc.blend_min_sigma) & periodic
        objects.loc[flag, "var_class"] = BLENDED_VARIABLE
        info["n_vetted"] = int(res["blend_reason"].isna().sum())
        info["n_blended"] = int(flag.sum())
        reasons = res["blend_reason"].dropna()
        if len(reasons):
            info["not_vetted"] = {str(k): str(v) for k, v in list(reasons.items())[:20]}
    info["wall_s"] = time.perf_counter() - t0
    return info


@worker_task
def classify_region_task(out: str, field: str, region: int, cfg_json: str, classify_fingerprint: str,
                         pixels: dict[str, Any] | None = None) -> dict[str, Any]:
    """Detrend, search and classify the light curves of one region; rewrite its objects file with the results.

    ``pixels`` (``store``, ``region``, ``epochs``, ``image_shape``: the calibrated epochs as
    :func:`survey_proc.stages.blend_io.read_stamps` takes them) lets the task vet the region's
    periodic calls for blends (``[classify] blend_vetting``); without it they are not vetted (the
    reason is in ``blend_reason``).
    """
    from dataclasses import replace

    import pandas as pd

    from survey_proc.distributed.plugins import worker_model
    from survey_proc.lightcurves.search import classify_table

    t0 = time.perf_counter()
    cfg = task_config(cfg_json)
    cc = cfg.classify
    opath = OBJECTS_UNIT.path(out, field=field, region=region)
    record = OBJECTS_UNIT.record(out, field=field, region=region)
    if record is None:
        raise SurveyProcError(f"{opath}: missing or unreadable; re-run to cross-match field {field} region {region}")
    objects = storage.read_table(opath).to_pandas()
    for c in CLASSIFY_COLUMNS:  # outputs of an older version lack some of the additions
        if c not in objects.columns:
            objects[c] = 0 if c == "n_points_classified" else np.nan
    lpath = LIGHTCURVES_UNIT.path(out, field=field, region=region)
    lc = storage.read_table(lpath, columns=_lc_columns(lpath)).to_pandas()
    lc, per_object, applied = _detrend_region(out, field, lc, cc, classify_fingerprint)
    idx = objects["object_id"].to_numpy()
    if per_object is None:
        objects["detrend"], objects["detrend_rms"] = "none", 0.0
    else:
        objects["detrend"] = per_object["detrend"].reindex(idx).fillna("none").to_numpy()
        objects["detrend_rms"] = per_object["detrend_rms"].reindex(idx).fillna(0.0).to_numpy()
    clf = worker_model("classifier", cc.weights or None)
    if cc.threshold > 0:
        clf = replace(clf, threshold=cc.threshold)
    sparse = worker_model("classifier_sparse", cc.sparse_weights or None) if cc.sparse_span_days > 0 else None
    res, found = classify_table(lc, clf, cc, sparse)
    info: dict[str, Any] = {"n_objects": len(objects), **found, "detrend": applied,
                            "n_detrended": int((objects["detrend"] != "none").sum())}
    objects["classify_reason"] = "no_points: no light-curve points"
    objects["n_events"] = np.int32(-1)
    objects["ls_fap"] = np.nan
    if res is not None:
        why = res["classify_reason"].reindex(idx)
        done = (res["var_class"].reindex(idx).notna() if "var_class" in res
                else pd.Series(False, index=why.index))
        why = why.where(why.notna() | done, "no_points: no light-curve points")  # objects without points
        objects["classify_reason"] = why.where(~done, None).to_numpy()
        if "n_events" in res:
            objects["n_events"] = res["n_events"].reindex(idx).fillna(-1).astype(np.int32).to_numpy()
        if "ls_fap" in res:
            objects["ls_fap"] = res["ls_fap"].reindex(idx).astype(float).to_numpy()
        res = res.rename(columns={"chi2_red": "_chi2_red"})
        for c in CLASSIFY_COLUMNS:
            if c in res.columns:
                vals = res[c].reindex(idx)
                objects[c] = (vals.to_numpy() if c != "n_points_classified"
                              else vals.fillna(0).astype(np.int32).to_numpy())
    info["blend"] = _vet_blends(objects, out, field, cc, cfg, pixels)
    info["n_blended"] = info["blend"]["n_blended"]  # no longer periodic: run.json's periodic_variables leaves them out
    info["n_periodic"] = int(info.get("n_periodic", 0)) - info["n_blended"]
    info["wall_s"] = time.perf_counter() - t0
    write_parquet_atomic(objects, classified_schema(storage.read_schema(opath)), opath,
                         {**record, "classify_fingerprint": classify_fingerprint, "classify": info})
    return {"field": field, "region": region, **info}


class ClassifyStage(Stage):
    """Periods, classes and probabilities of the objects of each region (after detrending, per field)."""

    name = "classify"
    unit = OBJECTS_UNIT
    also_writes = (DETREND_UNIT,)
    config_sections = ("classify",)

    def enabled(self, ctx: StageContext) -> bool:
        """Only when the run classifies (``[classify] enabled``)."""
        return ctx.classify_fingerprint is not None

    def done(self, ctx: StageContext, **key: Any) -> dict[str, Any] | None:
        """The region's objects carry this classify fingerprint; returns the objects record."""
        m = self.unit.record(ctx.cfg.out, **key)
        return m if m is not None and m.get("classify_fingerprint") == ctx.classify_fingerprint else None

    def run(self, ctx: StageContext) -> None:
        """Fit each field's detrending components where needed, then classify every region not yet classified."""
        state = ctx.state
        units = [(p.field, r.index) for p in ctx.plans for r in p.regions if (p.field, r.index) in state.regions]
        todo = []
        for f, r in units:
            rec = self.done(ctx, field=f, region=r)
            if rec is None:
                todo.append((f, r))
            else:
                state.classified[(f, r)] = {"field": f, "region": r, **rec["classify"]}
        self._detrend(ctx, units, {f for f, _ in todo})
        bar = ctx.bar(self.name, len(units), len(units) - len(todo))
        state.counts["classify_regions_skipped_resume"] = len(units) - len(todo)

        def done(key: dict[str, Any], rec: dict[str, Any]) -> None:
            state.classified[(key["field"], key["region"])] = rec

        pixels = self._pixels(ctx) if ctx.cfg.classify.blend_vetting else {}
        ctx.map(self.name, [Submission({"field": f, "region": r}, classify_region_task,
                                       (ctx.cfg.out, f, r, ctx.cfg_json, ctx.classify_fingerprint,
                                        pixels.get((f, r))))
                            for f, r in todo], done, bar)
        state.counts["blended_variables"] = int(sum(r.get("n_blended", 0) for r in state.classified.values()))

    def _pixels(self, ctx: StageContext) -> dict[tuple[str, int], dict[str, Any]]:
        """Per (field, region): what the blend vetting reads (the store, the region, the calibrated epochs)."""
        out: dict[tuple[str, int], dict[str, Any]] = {}
        for p in ctx.plans:
            recs = [r for r in ctx.state.field_records(p).values() if r.calibrated]
            epochs = [{"epoch": int(r.epoch), "mjd": float(r.mjd), "fwhm_px": float(r.fwhm_px),
                       "zp": float(r.zp.zp)} for r in recs]
            for reg in p.regions:
                out[(p.field, reg.index)] = {"store": ctx.cfg.store, "region": reg, "epochs": epochs,
                                             "image_shape": (p.ny, p.nx)}
        return out

    def _detrend(self, ctx: StageContext, units: list[tuple[str, int]], fields_todo: set[str]) -> None:
        """Fit the components of the fields with regions to classify (unless done); record them in run.json.

        run.json has no section per stage: the record goes to ``counts.detrend`` (field -> what was applied).
        """
        cc = ctx.cfg.classify
        fields = sorted({f for f, _ in units})
        summary: dict[str, Any] = {}
        ctx.state.counts["detrend"] = summary
        if cc.detrend == "none":
            summary.update({f: {"method": "none", "applied": "none"} for f in fields})
            return
        subs = []
        for f in fields:
            rec = DETREND_UNIT.record(ctx.cfg.out, field=f)
            inputs = {str(r): ctx.state.regions[(ff, r)].get("digest") for ff, r in units if ff == f}
            if rec is not None and rec.get("classify_fingerprint") == ctx.classify_fingerprint and (
                    rec.get("inputs") == inputs or f not in fields_todo):
                summary[f] = rec["detrend"]
            elif f in fields_todo:
                regions = sorted(r for ff, r in units if ff == f)
                subs.append(Submission({"field": f, "part": "detrend"}, detrend_field_task,
                                       (ctx.cfg.out, f, regions, ctx.cfg_json, ctx.classify_fingerprint, inputs)))
            else:  # every region done, the field's unit gone: what the regions' records say
                applied = sorted({str(rec.get("detrend", "unknown")) for (ff, _), rec in ctx.state.classified.items()
                                  if ff == f})
                summary[f] = {"method": cc.detrend, "applied": "; ".join(applied),
                              "note": f"{DETREND_UNIT.path(ctx.cfg.out, field=f)} is missing; from the regions"}
        if not subs:
            return

        def done(key: dict[str, Any], rec: dict[str, Any]) -> None:
            summary[key["field"]] = rec["detrend"]

        ctx.map(self.name, subs, done, ctx.bar("detrend", len(subs)))
