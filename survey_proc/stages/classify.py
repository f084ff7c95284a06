"""Stage 5, classify: per (field, region), the periodic-variable search and classifier on the region's light curves.

The task reads ``lightcurves/``, runs :func:`survey_proc.lightcurves.search.classify_table`
with the worker's classifier, and rewrites the region's ``objects/`` file with period,
class and probabilities (the cross-match record kept, ``classify_fingerprint`` and
``classify`` added).

Resume: the stage has its own fingerprint (the run's, its ``[classify]`` settings and the
classifier's weights), so a new classifier re-runs only this stage on a resumed output.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from survey_proc.catalog.schema import CLASSIFY_COLUMNS, OBJECTS
from survey_proc.errors import SurveyProcError
from survey_proc.outputs import write_parquet_atomic
from survey_proc.stages.base import Stage, StageContext, Submission, task_config, worker_task
from survey_proc.stages.crossmatch import LIGHTCURVES_UNIT, OBJECTS_UNIT


@worker_task
def classify_region_task(out: str, field: str, region: int, cfg_json: str, classify_fingerprint: str
                         ) -> dict[str, Any]:
    """Search and classify the light curves of one region; rewrite its objects file with the results."""
    from dataclasses import replace

    from survey_proc.distributed.plugins import worker_model
    from survey_proc.lightcurves.search import classify_table

    t0 = time.perf_counter()
    cc = task_config(cfg_json).classify
    opath = OBJECTS_UNIT.path(out, field=field, region=region)
    record = OBJECTS_UNIT.record(out, field=field, region=region)
    if record is None:
        raise SurveyProcError(f"{opath}: missing or unreadable; re-run to cross-match field {field} region {region}")
    objects = pq.read_table(opath).to_pandas()
    for c in CLASSIFY_COLUMNS:  # outputs of an older version lack some of the additions
        if c not in objects.columns:
            objects[c] = 0 if c == "n_points_classified" else np.nan
    lc = pq.read_table(LIGHTCURVES_UNIT.path(out, field=field, region=region),
                       columns=["object_id", "epoch", "mjd", "mag", "mag_err", "flags"]).to_pandas()
    clf = worker_model("classifier", cc.weights or None)
    if cc.threshold > 0:
        clf = replace(clf, threshold=cc.threshold)
    res, found = classify_table(lc, clf, cc)
    info: dict[str, Any] = {"n_objects": len(objects), **found}
    if res is not None:
        res = res.rename(columns={"chi2_red": "_chi2_red"})
        idx = objects["object_id"].to_numpy()
        for c in CLASSIFY_COLUMNS:
            if c in res.columns:
                vals = res[c].reindex(idx)
                objects[c] = (vals.to_numpy() if c != "n_points_classified"
                              else vals.fillna(0).astype(np.int32).to_numpy())
    info["wall_s"] = time.perf_counter() - t0
    write_parquet_atomic(objects, OBJECTS, opath, {**record, "classify_fingerprint": classify_fingerprint,
                                                   "classify": info})
    return {"field": field, "region": region, **info}


class ClassifyStage(Stage):
    """Periods, classes and probabilities of the objects of each region."""

    name = "classify"
    unit = OBJECTS_UNIT
    config_sections = ("classify",)

    def enabled(self, ctx: StageContext) -> bool:
        """Only when the run classifies (``[classify] enabled``)."""
        return ctx.classify_fingerprint is not None

    def done(self, ctx: StageContext, **key: Any) -> dict[str, Any] | None:
        """The region's objects carry this classify fingerprint; returns the objects record."""
        m = self.unit.record(ctx.cfg.out, **key)
        return m if m is not None and m.get("classify_fingerprint") == ctx.classify_fingerprint else None

    def run(self, ctx: StageContext) -> None:
        """Classify every cross-matched region not yet classified with this classify fingerprint."""
        state = ctx.state
        units = [(p.field, r.index) for p in ctx.plans for r in p.regions if (p.field, r.index) in state.regions]
        todo = []
        for f, r in units:
            rec = self.done(ctx, field=f, region=r)
            if rec is None:
                todo.append((f, r))
            else:
                state.classified[(f, r)] = {"field": f, "region": r, **rec["classify"]}
        bar = ctx.bar(self.name, len(units), len(units) - len(todo))
        state.counts["classify_regions_skipped_resume"] = len(units) - len(todo)

        def done(key: dict[str, Any], rec: dict[str, Any]) -> None:
            state.classified[(key["field"], key["region"])] = rec

        ctx.map(self.name, [Submission({"field": f, "region": r}, classify_region_task,
                                       (ctx.cfg.out, f, r, ctx.cfg_json, ctx.classify_fingerprint))
                            for f, r in todo], done, bar)
