"""What the driver learns while a run goes, and the run.json summary made from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from survey_proc.stages.plan import FieldPlan
from survey_proc.stages.records import EpochRecord

REGISTRATION_KEYS = ("reference_epoch", "against", "method", "correlation_sigma", "rms_px", "n_stars")  # to run.json


@dataclass
class RunState:
    """The driver's state of a run.

    ``records``: (field, epoch) -> the sources unit's :class:`EpochRecord`; ``regions``:
    (field, region) -> the cross-match record; ``classified``: (field, region) -> the
    classify record; ``failures``: quarantined units (after their retries); ``retried``:
    units that succeeded on a retry.
    """

    records: dict[tuple[str, int], EpochRecord] = field(default_factory=dict)
    regions: dict[tuple[str, int], dict] = field(default_factory=dict)
    classified: dict[tuple[str, int], dict] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    retried: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, dict] = field(default_factory=dict)

    def field_records(self, plan: FieldPlan) -> dict[int, EpochRecord]:
        """Epoch -> record of the field's written epochs that no stage has failed, in epoch order.

        An epoch quarantined by a later stage (registration, calibration) keeps its sources
        unit, but nothing downstream reads it: it never reaches the light curves.
        """
        failed = self.failed_epochs()
        return {e: self.records[(plan.field, e)] for e in range(plan.n_epochs)
                if (plan.field, e) in self.records and (plan.field, e) not in failed}

    def failed_epochs(self) -> set[tuple[str, int]]:
        """(field, epoch) of every epoch some stage quarantined."""
        return {(f["field"], int(f["epoch"])) for f in self.failures if "epoch" in f}

    def summary(self, plans: list[FieldPlan]) -> dict[str, Any]:
        """The run.json keys the run adds: timings, counts, cross-match, zero points, registration, failures."""
        recs = list(self.records.values())
        n_src = np.array([r.n_sources for r in recs]) if recs else np.zeros(0)
        regs = list(self.regions.values())
        zp_by_field = {}
        for p in plans:
            z = np.array([r.zp.zp for r in self.field_records(p).values()], float)
            z = z[np.isfinite(z)]
            zp_by_field[p.field] = {"median": float(np.median(z)) if len(z) else None,
                                    "std": float(np.std(z)) if len(z) > 1 else None,
                                    **self.calibration.get(p.field, {})}
        classified = self.classified.values()
        return {
            "timings_s": self.timings,
            "counts": {
                **self.counts,
                "epochs_total": int(sum(p.n_epochs for p in plans)),
                "epochs_written": len(recs),
                "epochs_left_out": len(self.failed_epochs()),
                "sources": int(n_src.sum()),
                "sources_per_epoch": {"median": float(np.median(n_src)) if len(n_src) else 0,
                                      "min": int(n_src.min()) if len(n_src) else 0,
                                      "max": int(n_src.max()) if len(n_src) else 0},
                "border_duplicates_removed": int(sum(r.n_duplicates for r in recs)),
                "objects": int(sum(r["n_objects"] for r in regs)),
                "lightcurve_points": int(sum(r["n_points"] + r.get("forced", {}).get("n_points", 0) for r in regs)),
                "forced_points": int(sum(r.get("forced", {}).get("n_points", 0) for r in regs)),
                "forced_epochs_skipped": int(sum(r.get("forced", {}).get("n_epochs_skipped", 0) for r in regs)),
                "regions_written": len(regs),
                "objects_classified": int(sum(r.get("n_classified", 0) for r in classified)),
                "periodic_variables": int(sum(r.get("n_periodic", 0) for r in classified)),
            },
            "crossmatch": {f"{k[0]}/{k[1]}": {kk: v[kk] for kk in ("match_radius_px", "astrom_rms90_px", "n_objects",
                                                                     "n_points", "wall_s")}
                           for k, v in sorted(self.regions.items())},
            "zeropoints": zp_by_field,
            "registration": {f"{r.field}/{r.epoch}": {k: r.registration.get(k) for k in REGISTRATION_KEYS}
                             for r in recs if r.registration is not None},
            "extraction_fallbacks": [{"field": r.field, "epoch": r.epoch, "fallback": r.fallback}
                                     for r in recs if r.fallback],
            "domain_actions": [{"field": r.field, "epoch": r.epoch, "action": r.domain} for r in recs if r.domain],
            "failures": self.failures,
            "retried": self.retried,
        }
